//! What the agent knows about one finished connection, and the names it labels it with: the
//! contract between the kernel-event reader (which turns ring-buffer records into [`Connection`]s)
//! and telemetry (Istio's TCP metrics and the access log, which read them with a [`NameLookup`]).
//!
//! Everything here is user space. The kernel records only addresses, ports, counts and ids; names
//! come from the snapshot's names section and are joined here, never in the kernel.
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// Which side of the connection this node's enrolled workload is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// The enrolled workload dialed out (Istio's `reporter="source"`).
    Outbound,
    /// The enrolled workload accepted it (Istio's `reporter="destination"`).
    Inbound,
}

/// How a connection ended, as the kernel saw it. Each maps to one of Istio's response flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Established and closed in order (FIN either way). Flag `-`.
    Closed,
    /// Established, then reset (RST received or sent). Flag `UR`.
    Reset,
    /// Never established: refused (RST to the SYN) or timed out. Flag `UF`.
    ConnectFailed,
    /// A mesh service with no endpoint: connect4 refused it before any packet. Flag `UH`.
    NoEndpoint,
    /// The destination's authorization refused it (sk_lookup); `policy` is the AuthzPolicies id
    /// that decided, 0 when none did (no ALLOW policy matched). Flag `DENY`.
    Denied { policy: u32 },
}

/// One connection of an enrolled workload, reported once, when it ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connection {
    pub direction: Direction,
    /// The client's address and port.
    pub source: SocketAddr,
    /// The server's address and port: the endpoint actually connected to (after connect4's
    /// rewrite for outbound connections to a service).
    pub destination: SocketAddr,
    /// The service address the client dialed, when connect4 rewrote it to `destination`
    /// (outbound only; `None` for direct connections and inbound ones).
    pub service: Option<SocketAddr>,
    /// Bytes this node's workload sent and received on it.
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// From the connect (outbound) or the accept (inbound) to the close.
    pub duration: Duration,
    pub outcome: Outcome,
}

/// Names of a workload (a pod) and of a service, for Istio's labels; an empty string means
/// unknown. The snapshot's own name records (one definition), borrowed from its string table.
pub use kmesh_snapshot::{ServiceName as ServiceNames, WorkloadName as WorkloadNames};

/// The names of the live snapshot, as telemetry reads them.
pub trait NameLookup {
    /// The workload holding `ip`, if the snapshot names one.
    fn workload(&self, ip: IpAddr) -> Option<WorkloadNames<'_>>;
    /// The service at `address` (a service address and port), if any.
    fn service(&self, address: SocketAddr) -> Option<ServiceNames<'_>>;
    /// The service `endpoint` (a workload of this node's address and port) is a backend of, if
    /// any: what names an inbound connection's destination service.
    fn service_of_endpoint(&self, endpoint: SocketAddr) -> Option<ServiceNames<'_>>;
    /// The `namespace/name` of an authorization policy id, if known.
    fn policy(&self, id: u32) -> Option<&str>;
}
