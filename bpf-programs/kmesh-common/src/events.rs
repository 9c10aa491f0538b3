//! Connection events: the record the kernel programs write into the `KM_EVENTS` ring buffer, one
//! per finished connection of an enrolled workload, and the per-socket state they keep until then.
//!
//! The single definition of both: the programs (`kmesh-ebpf/src/events.rs`, `programs.rs`,
//! `authz.rs`) write them, the agent (`node-agent/src/events.rs`) reads them and turns each
//! [`ConnEvent`] into a `kmesh_agent::connection::Connection`. Kinds are modules of constants
//! ([`outcome`], [`direction`]): a Rust enum is not safe to read from bytes the kernel wrote.
//!
//! Only TCP. Addresses are [`crate::Ip16`] (IPv4 mapped), ports in host byte order.
use crate::Ip16;

/// How a connection ended. Zero is not an outcome: a zeroed record is refused by the reader.
pub mod outcome {
    /// Established, then closed in order: the socket reached CLOSE through the FIN states
    /// (FIN_WAIT2, CLOSING, TIME_WAIT or LAST_ACK).
    pub const CLOSED: u8 = 1;
    /// Established, then reset: the socket went to CLOSE straight from ESTABLISHED, CLOSE_WAIT or
    /// FIN_WAIT1 — a RST received, or one sent (SO_LINGER 0, or a close with unread data).
    pub const RESET: u8 = 2;
    /// Never established: the socket went to CLOSE from SYN_SENT (refused or timed out).
    pub const CONNECT_FAILED: u8 = 3;
    /// connect4/6 refused a connect to a mesh service that has no endpoint for it (before any
    /// packet left).
    pub const NO_ENDPOINT: u8 = 4;
    /// The destination's authorization (`sk_lookup`) refused the connection; `policy` says which.
    pub const DENIED: u8 = 5;
    /// One past the largest outcome.
    pub const END: u8 = 6;
}

/// Which side of the connection the enrolled workload is.
pub mod direction {
    /// The enrolled workload dialed out.
    pub const OUTBOUND: u8 = 1;
    /// The enrolled workload accepted it.
    pub const INBOUND: u8 = 2;
}

/// One finished connection, as the programs report it (104 bytes, 8-aligned, as the ring buffer
/// requires).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ConnEvent {
    /// `bpf_get_socket_cookie` of the enrolled side's socket; 0 for a denial (no socket exists).
    pub socket_cookie: u64,
    /// The enrolled side's network namespace cookie; 0 for a denial (`sk_lookup` cannot read it).
    pub netns_cookie: u64,
    /// Payload bytes the enrolled side sent that the peer acknowledged: `tcp_sock.bytes_acked`
    /// without the SYN and FIN (each takes a sequence number, and the kernel counts it).
    pub bytes_sent: u64,
    /// Payload bytes the enrolled side received in sequence: `tcp_sock.bytes_received` without
    /// the peer's FIN.
    pub bytes_received: u64,
    /// From the connect (outbound) or the establishment (inbound) to the close; 0 for refusals.
    pub duration_ns: u64,
    /// The client's address and port.
    pub source: Ip16,
    /// The server's address and port: for an outbound connection to a service, the endpoint
    /// connect4/6 chose; for [`outcome::NO_ENDPOINT`], the service address itself.
    pub destination: Ip16,
    /// The service address the client dialed when connect4/6 rewrote it (or refused it for lack
    /// of an endpoint); all zero with `service_port` 0 otherwise.
    pub service: Ip16,
    pub source_port: u16,
    pub destination_port: u16,
    pub service_port: u16,
    /// One of [`outcome`].
    pub outcome: u8,
    /// One of [`direction`].
    pub direction: u8,
    /// For [`outcome::DENIED`]: the deciding AuthorizationPolicy id, 0 when none decided (no ALLOW
    /// policy matched). Zero otherwise.
    pub policy: u32,
    pub pad: u32,
}

/// What the programs keep per socket of an enrolled workload (`KM_SOCK_STATE`, socket storage):
/// written by connect4/6 (the dialed service, and whether they steered it to a waypoint) and
/// `sock_ops` (start, direction, and what the state changes tell about FINs), read by `sock_ops`
/// when it writes the SYN's origin option and when the socket closes. The kernel frees it with the
/// socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockState {
    /// `bpf_ktime_get_ns` at the connect (outbound) or establishment (inbound); 0 before.
    pub start_ns: u64,
    /// `bytes_received` when the socket entered FIN_WAIT2 (valid with [`sock_flags::FIN_WAIT2`]).
    pub fin_wait2_received: u64,
    /// The service address connect4/6 rewrote; zero when it did not.
    pub service: Ip16,
    pub service_port: u16,
    /// One of [`direction`]; 0 until `sock_ops` saw the connect or the establishment.
    pub direction: u8,
    /// Bits of [`sock_flags`].
    pub flags: u8,
    /// The dialed service's id (`ServiceValue::service_id`) when connect4/6 rewrote it; 0 when
    /// they did not. Written into the SYN's origin option ([`sock_flags::WAYPOINT`]).
    pub service_id: u32,
}

/// What the state changes of a socket told so far ([`SockState::flags`]).
pub mod sock_flags {
    /// The peer's FIN arrived (the socket went through CLOSE_WAIT or CLOSING).
    pub const PEER_FIN: u8 = 1;
    /// The socket entered FIN_WAIT2 ([`super::SockState::fin_wait2_received`] is set).
    pub const FIN_WAIT2: u8 = 2;
    /// connect4/6 steered this socket to a waypoint (its service has
    /// [`crate::service_flags::WAYPOINT`]): `sock_ops` writes the origin option
    /// ([`crate::waypoint_origin`]) with [`super::SockState::service_id`] and
    /// [`super::SockState::service_port`] on its SYN.
    pub const WAYPOINT: u8 = 4;
}

/// Default size of the events ring buffer in bytes (a power of two, a multiple of the page size):
/// 256 KiB holds about 2,300 events between two reads (each takes 104 + 8 bytes of header).
pub const DEFAULT_EVENTS_RING_BYTES: u32 = 256 * 1024;

/// Indexes of the per-CPU `KM_EVENTS_DROPPED` counters.
pub mod events_dropped {
    /// An event found the ring buffer full (the connection itself was not affected).
    pub const RING_FULL: u32 = 0;
    /// A connection of an enrolled workload could not be followed: its socket storage could not be
    /// allocated, or its state callbacks not turned on (it is then never reported).
    pub const NO_STORAGE: u32 = 1;
    /// Number of counters.
    pub const COUNT: u32 = 2;
}

const _: () = {
    assert!(size_of::<ConnEvent>() == 104);
    assert!(align_of::<ConnEvent>() == 8);
    assert!(size_of::<SockState>() == 40);
};
