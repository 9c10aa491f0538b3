//! Connection events: `sock_ops` `kmesh_sockops` and the helpers the connect and authorization
//! programs call, writing one `kmesh_common::ConnEvent` per finished connection of an enrolled
//! workload into the `KM_EVENTS` ring buffer. Part of `programs.rs` (it shares `KM_ENROLLED`).
//!
//! - connect4/6 ([`remember_service`]): when they rewrite a service address, they keep it in the
//!   socket's storage (`KM_SOCK_STATE`), so the close event names the service the client dialed,
//!   with the service's id and, for a service bound to a waypoint, `sock_flags::WAYPOINT`; when
//!   they refuse one ([`no_endpoint`]), they report it at once.
//! - `kmesh_sockops`, attached to the same cgroup: on `TCP_CONNECT_CB` (outbound) and
//!   `PASSIVE_ESTABLISHED_CB` (inbound) of a socket of an enrolled network namespace it records the
//!   start and direction and turns on `BPF_SOCK_OPS_STATE_CB_FLAG` (and, for an outbound socket
//!   steered to a waypoint, `BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG`: `waypoint.rs` then writes the
//!   origin option on its SYN); it follows the state changes (which tell the FINs apart, see
//!   [`payload_bytes`]) and on the change to CLOSE reports the connection. The state it leaves
//!   tells how it ended (see `kmesh_common::events::outcome`).
//! - `kmesh_authz` ([`denied`]): a refused inbound connection.
//!
//! Never blocking, never changing a verdict: `bpf_ringbuf_output` fails at once when the ring is
//! full, and the event is counted in `KM_EVENTS_DROPPED` instead. Every hook returns what it would
//! have returned without events. The output wakes the reader only once the ring is a quarter full
//! (see [`emit`]); the reader also looks every 100 ms.
use core::ptr::{self, read_volatile};

use aya_ebpf::{
    bindings::{
        BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, BPF_RB_RING_SIZE,
        BPF_SK_STORAGE_GET_F_CREATE, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_HDR_OPT_LEN_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_SOCK_OPS_WRITE_HDR_OPT_CB,
        BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG, bpf_sock_ops,
    },
    btf_maps::{PerCpuArray, RingBuf, SkStorage},
    helpers::{
        bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns,
        generated::{bpf_ringbuf_query, bpf_sk_storage_get},
    },
    macros::{btf_map, sock_ops},
    programs::{SockAddrContext, SockOpsContext},
};
use kmesh_common::{
    ConnEvent, Ip16, ServiceValue, SockState,
    events::{DEFAULT_EVENTS_RING_BYTES, direction, events_dropped, outcome, sock_flags},
    ipv4_mapped, service_flags,
};

use super::{KM_ENROLLED, authz::words_to_ip, waypoint};

/// The events. Its size is the default; the agent sets another at load time (`--events-ring-bytes`).
#[btf_map]
static KM_EVENTS: RingBuf<ConnEvent, { DEFAULT_EVENTS_RING_BYTES as usize }> = RingBuf::new();
/// Events lost, per CPU, by `kmesh_common::events::events_dropped` index.
#[btf_map]
static KM_EVENTS_DROPPED: PerCpuArray<u64, { events_dropped::COUNT as usize }> = PerCpuArray::new();
/// Per-socket state of enrolled workloads' connections, freed by the kernel with the socket.
#[btf_map]
static KM_SOCK_STATE: SkStorage<SockState> = SkStorage::new();

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
// TCP states (`include/net/tcp_states.h`).
const TCP_ESTABLISHED: u32 = 1;
const TCP_SYN_SENT: u32 = 2;
const TCP_SYN_RECV: u32 = 3;
const TCP_FIN_WAIT1: u32 = 4;
const TCP_FIN_WAIT2: u32 = 5;
const TCP_CLOSE: u32 = 7;
const TCP_CLOSE_WAIT: u32 = 8;
const TCP_CLOSING: u32 = 11;

#[sock_ops]
pub fn kmesh_sockops(ctx: SockOpsContext) -> u32 {
    // SAFETY: the kernel hands us a valid bpf_sock_ops; `op` may always be read.
    let op = unsafe { read_volatile(&raw const (*ctx.ops).op) };
    match op {
        BPF_SOCK_OPS_TCP_CONNECT_CB => start(&ctx, direction::OUTBOUND),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => start(&ctx, direction::INBOUND),
        BPF_SOCK_OPS_STATE_CB => state_changed(&ctx),
        BPF_SOCK_OPS_HDR_OPT_LEN_CB => waypoint::reserve_origin(&ctx),
        BPF_SOCK_OPS_WRITE_HDR_OPT_CB => waypoint::write_origin(&ctx),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => waypoint::established(&ctx),
        _ => {}
    }
    // The return value only matters for ops that ask for a reply; none of ours does.
    1
}

/// The socket of a sock_ops context (a full socket for every op we handle), or null.
#[inline(always)]
pub(super) fn sock_of(ctx: &SockOpsContext) -> *mut core::ffi::c_void {
    // SAFETY: one whole-field read of the context.
    unsafe { read_volatile(&raw const (*ctx.ops).__bindgen_anon_2.sk) }.cast()
}

/// The socket's state in `KM_SOCK_STATE`, created when `create`.
#[inline(always)]
pub(super) fn sock_state(
    sk: *mut core::ffi::c_void,
    create: bool,
) -> Option<&'static mut SockState> {
    if sk.is_null() {
        return None;
    }
    let flags = if create {
        u64::from(BPF_SK_STORAGE_GET_F_CREATE)
    } else {
        0
    };
    // SAFETY: the map pointer is the map's definition (the loader relocates it to the map's fd),
    // `sk` is the context's non-null socket; a created value starts zeroed.
    let state = unsafe {
        bpf_sk_storage_get(
            ptr::from_ref(&KM_SOCK_STATE).cast_mut().cast(),
            sk,
            ptr::null_mut(),
            flags,
        )
    }
    .cast::<SockState>();
    // SAFETY: a non-null result points at this socket's value, which lives as long as the socket.
    unsafe { state.as_mut() }
}

/// The connect (outbound) or establishment (inbound) of a socket: if its network namespace is
/// enrolled, record the start and ask for the state changes; for a connect connect4/6 steered to
/// a waypoint, also for the header option callbacks of its SYN (the flags read once, written
/// once).
#[inline(always)]
fn start(ctx: &SockOpsContext, dir: u8) {
    // SAFETY: the helper only reads the context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.ops.cast()) };
    // SAFETY: value read by copy; the map is only written by the agent.
    if unsafe { KM_ENROLLED.get(&netns) }.is_none() {
        return;
    }
    let Some(state) = sock_state(sock_of(ctx), true) else {
        count_dropped(events_dropped::NO_STORAGE);
        return;
    };
    // SAFETY: helper without arguments.
    state.start_ns = unsafe { bpf_ktime_get_ns() };
    state.direction = dir;
    let waypoint = state.flags & sock_flags::WAYPOINT != 0;
    // SAFETY: one whole-field read of the context.
    let flags = unsafe { read_volatile(&raw const (*ctx.ops).bpf_sock_ops_cb_flags) };
    let mut wanted = flags | BPF_SOCK_OPS_STATE_CB_FLAG;
    if waypoint {
        wanted |= BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG;
    }
    if ctx.set_cb_flags(wanted as i32).is_err() {
        count_dropped(events_dropped::NO_STORAGE);
        if waypoint {
            super::count(kmesh_common::counter::WAYPOINT_ORIGIN_FAILED);
        }
    }
}

/// What a sock_ops context says about its connection, every field read up front (see
/// `authz.rs::connection` for why each read is a volatile load of its own).
struct SockOpsFields {
    old_state: u32,
    new_state: u32,
    family: u32,
    local4: u32,
    remote4: u32,
    local6: [u32; 4],
    remote6: [u32; 4],
    /// Host byte order.
    local_port: u32,
    /// `skc_dport` (network byte order) in the upper 16 bits (see [`remote_port`]).
    remote_port: u32,
    bytes_acked: u64,
    bytes_received: u64,
}

#[inline(always)]
fn read_fields(ops: *mut bpf_sock_ops) -> SockOpsFields {
    // SAFETY: the kernel hands us a valid bpf_sock_ops; each read is of one whole field, valid for
    // the full socket of a state change.
    unsafe {
        SockOpsFields {
            old_state: read_volatile(&raw const (*ops).__bindgen_anon_1.args[0]),
            new_state: read_volatile(&raw const (*ops).__bindgen_anon_1.args[1]),
            family: read_volatile(&raw const (*ops).family),
            local4: read_volatile(&raw const (*ops).local_ip4),
            remote4: read_volatile(&raw const (*ops).remote_ip4),
            local6: [
                read_volatile(&raw const (*ops).local_ip6[0]),
                read_volatile(&raw const (*ops).local_ip6[1]),
                read_volatile(&raw const (*ops).local_ip6[2]),
                read_volatile(&raw const (*ops).local_ip6[3]),
            ],
            remote6: [
                read_volatile(&raw const (*ops).remote_ip6[0]),
                read_volatile(&raw const (*ops).remote_ip6[1]),
                read_volatile(&raw const (*ops).remote_ip6[2]),
                read_volatile(&raw const (*ops).remote_ip6[3]),
            ],
            local_port: read_volatile(&raw const (*ops).local_port),
            remote_port: read_volatile(&raw const (*ops).remote_port),
            bytes_acked: read_volatile(&raw const (*ops).bytes_acked),
            bytes_received: read_volatile(&raw const (*ops).bytes_received),
        }
    }
}

/// The peer's port in host byte order. sock_ops (unlike the other contexts) hands `skc_dport` over
/// shifted into the upper half of the word on little-endian machines.
#[inline(always)]
fn remote_port(word: u32) -> u16 {
    if cfg!(target_endian = "little") {
        u16::from_be((word >> 16) as u16)
    } else {
        u16::from_be(word as u16)
    }
}

/// A state change of a socket we started: note what it tells about FINs; on the change to CLOSE,
/// report the connection.
#[inline(always)]
fn state_changed(ctx: &SockOpsContext) {
    let f = read_fields(ctx.ops);
    let Some(state) = sock_state(sock_of(ctx), false) else {
        return;
    };
    if state.direction == 0 {
        return;
    }
    match f.new_state {
        TCP_CLOSE_WAIT | TCP_CLOSING => state.flags |= sock_flags::PEER_FIN,
        TCP_FIN_WAIT2 => {
            state.flags |= sock_flags::FIN_WAIT2;
            state.fin_wait2_received = f.bytes_received;
        }
        TCP_CLOSE => closed(ctx, &f, state),
        _ => {}
    }
}

/// The socket reached CLOSE: report it, once.
#[inline(always)]
fn closed(ctx: &SockOpsContext, f: &SockOpsFields, state: &mut SockState) {
    let dir = state.direction;
    let (local, remote) = match f.family {
        AF_INET => (
            ipv4_mapped(f.local4.to_ne_bytes()),
            ipv4_mapped(f.remote4.to_ne_bytes()),
        ),
        AF_INET6 => (words_to_ip(f.local6), words_to_ip(f.remote6)),
        _ => return,
    };
    let (local_port, remote_port) = (f.local_port as u16, remote_port(f.remote_port));
    let outbound = dir == direction::OUTBOUND;
    let ended = close_outcome(f.old_state);
    let (sent, received) = payload_bytes(f, state, ended);
    // SAFETY: helpers reading the context, and one without arguments.
    let (netns_cookie, socket_cookie, now) = unsafe {
        (
            bpf_get_netns_cookie(ctx.ops.cast()),
            bpf_get_socket_cookie(ctx.ops.cast()),
            bpf_ktime_get_ns(),
        )
    };
    let event = ConnEvent {
        socket_cookie,
        netns_cookie,
        bytes_sent: sent,
        bytes_received: received,
        duration_ns: now.saturating_sub(state.start_ns),
        source: if outbound { local } else { remote },
        destination: if outbound { remote } else { local },
        service: state.service,
        source_port: if outbound { local_port } else { remote_port },
        destination_port: if outbound { remote_port } else { local_port },
        service_port: state.service_port,
        outcome: ended,
        direction: dir,
        policy: 0,
        pad: 0,
    };
    // Reported once: a socket reused after a disconnect starts afresh.
    *state = SockState::default();
    emit(&event);
}

/// Payload bytes sent and received: the kernel's `bytes_acked` and `bytes_received` count the
/// sequence numbers the SYN and FIN take too.
/// - Sent: the active side's SYN is acknowledged once established (the passive side's starts its
///   count after it); our FIN was acknowledged exactly when the close was orderly (CLOSED: from
///   FIN_WAIT2, CLOSING or LAST_ACK, each reached or left on that acknowledgement).
/// - Received: the peer's FIN counts once it arrived: seen as CLOSE_WAIT or CLOSING, or, for a
///   socket leaving FIN_WAIT2, as a `bytes_received` that moved since it entered FIN_WAIT2 (the
///   peer's FIN is what closes it; a socket the application closed already leaves FIN_WAIT2 on our
///   FIN's acknowledgement, with nothing received since).
#[inline(always)]
fn payload_bytes(f: &SockOpsFields, state: &SockState, ended: u8) -> (u64, u64) {
    let syn = u64::from(state.direction == direction::OUTBOUND && ended != outcome::CONNECT_FAILED);
    let our_fin = u64::from(ended == outcome::CLOSED);
    let peer_fin = state.flags & sock_flags::PEER_FIN != 0
        || (f.old_state == TCP_FIN_WAIT2
            && state.flags & sock_flags::FIN_WAIT2 != 0
            && f.bytes_received != state.fin_wait2_received);
    (
        f.bytes_acked.saturating_sub(syn + our_fin),
        f.bytes_received.saturating_sub(u64::from(peer_fin)),
    )
}

/// How a connection ended, from the state it left for CLOSE (see `kmesh_common::events::outcome`).
#[inline(always)]
fn close_outcome(old_state: u32) -> u8 {
    match old_state {
        TCP_SYN_SENT | TCP_SYN_RECV => outcome::CONNECT_FAILED,
        TCP_ESTABLISHED | TCP_CLOSE_WAIT | TCP_FIN_WAIT1 => outcome::RESET,
        // FIN_WAIT2, CLOSING (both on to TIME_WAIT), LAST_ACK.
        _ => outcome::CLOSED,
    }
}

/// connect4/6 rewrote `service`:`port` (the service `value`) for this socket: keep it for the
/// close event and, when the service is bound to a waypoint, for the SYN's origin option.
#[inline(always)]
pub(super) fn remember_service(
    ctx: &SockAddrContext,
    service: &Ip16,
    port: u16,
    value: &ServiceValue,
) {
    // SAFETY: the context's socket is valid for the program's run; a created value starts zeroed.
    let state = unsafe { KM_SOCK_STATE.get_or_insert_ptr_mut(ctx, None) };
    // SAFETY: a non-null result points at this socket's value.
    match unsafe { state.as_mut() } {
        Some(state) => {
            state.service = *service;
            state.service_port = port;
            state.service_id = value.service_id;
            if value.flags & service_flags::WAYPOINT != 0 {
                state.flags |= sock_flags::WAYPOINT;
            } else {
                state.flags &= !sock_flags::WAYPOINT;
            }
        }
        None => {
            count_dropped(events_dropped::NO_STORAGE);
            if value.flags & service_flags::WAYPOINT != 0 {
                super::count(kmesh_common::counter::WAYPOINT_ORIGIN_FAILED);
            }
        }
    }
}

/// connect4/6 refused a connect to `service`:`port` of the enrolled workload at `workload_ip`.
#[inline(always)]
pub(super) fn no_endpoint(
    ctx: &SockAddrContext,
    netns_cookie: u64,
    workload_ip: &Ip16,
    service: &Ip16,
    port: u16,
) {
    // SAFETY: the helper only reads the context.
    let socket_cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    emit(&ConnEvent {
        socket_cookie,
        netns_cookie,
        source: *workload_ip,
        destination: *service,
        service: *service,
        destination_port: port,
        service_port: port,
        outcome: outcome::NO_ENDPOINT,
        direction: direction::OUTBOUND,
        ..ConnEvent::default()
    });
}

/// `kmesh_authz` refused the connection from `remote`:`remote_port` to `local`:`port`; `policy`
/// decided (0: none did).
#[inline(always)]
pub(super) fn denied(local: &Ip16, port: u16, remote: &Ip16, remote_port: u16, policy: u32) {
    emit(&ConnEvent {
        source: *remote,
        source_port: remote_port,
        destination: *local,
        destination_port: port,
        outcome: outcome::DENIED,
        direction: direction::INBOUND,
        policy,
        ..ConnEvent::default()
    });
}

/// Writes `event` to the ring, or counts it lost when the ring is full. Never waits.
///
/// Wakes the reader only once the ring is a quarter full: below that, the reader finds the events
/// on its next periodic look (`node-agent/src/events.rs`, every 100 ms), so a busy node costs no
/// wakeup per connection (the kernel's default wakes a caught-up reader on every event).
#[inline(always)]
fn emit(event: &ConnEvent) {
    let ring = ptr::from_ref(&KM_EVENTS).cast_mut().cast();
    // SAFETY: the map pointer is the ring's definition (relocated to its fd by the loader).
    let (pending, size) = unsafe {
        (
            bpf_ringbuf_query(ring, u64::from(BPF_RB_AVAIL_DATA)),
            bpf_ringbuf_query(ring, u64::from(BPF_RB_RING_SIZE)),
        )
    };
    let wakeup = if pending >= size / 4 {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    if KM_EVENTS.output(event, u64::from(wakeup)).is_err() {
        count_dropped(events_dropped::RING_FULL);
    }
}

#[inline(always)]
fn count_dropped(index: u32) {
    if let Some(c) = KM_EVENTS_DROPPED.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, written only by programs on this CPU.
        unsafe { *c += 1 };
    }
}
