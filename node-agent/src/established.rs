//! Established connections a new generation denies. The kernel program judges only new
//! connections (`sk_lookup` runs for a SYN's listener lookup); so after each applied generation
//! the agent looks at the live inbound TCP connections of every enrolled namespace and closes,
//! with `SOCK_DESTROY`, each one the new generation denies (the kernel aborts the server's socket
//! and sends the client a RST) — the same verdict the kernel would give its SYN now, computed with
//! the one lookup chain over the snapshot's records (`kmesh_common::authz::{source_class,
//! resolve_verdict}`): no verdict at all = deny (fail closed), the node's own addresses exempt,
//! mode Disabled = nothing denied.
//!
//! A connection is inbound ("accepted") when a listener of its namespace holds its local port on
//! its local address or on a wildcard (0.0.0.0, or `::`, which takes IPv4 too on a dual-stack
//! socket): a workload's outbound connections are not the inbound policy's business.
//!
//! [`plan`] is the pure decision (tables × one namespace's sockets → the sockets to close);
//! [`close_denied`] does the I/O for a set of namespaces, each visited once (sock_diag through
//! `sys`, behind [`SocketTable`] so the counting is unit-tested with a fake). Closing never fails
//! an apply: what could not be done is counted in [`Closed`] and logged.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    fs::File,
    io,
    net::{IpAddr, SocketAddr},
    os::{fd::AsFd as _, unix::fs::MetadataExt as _},
};

use kmesh_common::{
    AuthzVerdict, AuthzVerdictKey, Ip16,
    authz::{authz_action, resolve_verdict, source_class},
    ipv4_mapped, mode,
};
use kmesh_snapshot::AuthzTables;
use tracing::{info, warn};

use crate::sys::{self, SockDiag, TcpSocket, TcpState};

/// The states in which an accepted connection can still carry payload one way or the other: a
/// denied client must not keep sending (FIN_WAIT: the server closed its side only) nor receiving
/// (CLOSE_WAIT). SYN_RECV: its SYN passed the check of an older generation.
pub const LIVE_STATES: [TcpState; 5] = [
    TcpState::SynRecv,
    TcpState::Established,
    TcpState::CloseWait,
    TcpState::FinWait1,
    TcpState::FinWait2,
];

/// What is listed: the live connections, and the listeners that tell accepted ones apart.
const LISTED_STATES: [TcpState; 6] = [
    TcpState::SynRecv,
    TcpState::Established,
    TcpState::CloseWait,
    TcpState::FinWait1,
    TcpState::FinWait2,
    TcpState::Listen,
];

/// Whether a generation can deny anything at all: not in mode Disabled, and some policy binds a
/// workload (most nodes have none: then no namespace is entered).
pub fn can_deny(node_mode: u32, tables: &AuthzTables) -> bool {
    node_mode != mode::DISABLED && !tables.workloads.is_empty()
}

/// Why a connection is closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum DenyCause {
    /// The generation's verdict denies it: the deciding policy (0: none in particular) and the
    /// reason (one of `kmesh_common::authz::authz_reason`), as the kernel's counters key it.
    Verdict { policy: u32, reason: u8 },
    /// The workload's verdict set has no verdict for it, not even a default (a verified snapshot
    /// always has one): denied, as the kernel does (fail closed, counted INCONSISTENT).
    NoVerdict,
}

/// A connection to close.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Denied {
    pub socket: TcpSocket,
    pub cause: DenyCause,
}

/// What [`plan`] decided for one namespace's sockets.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Live accepted connections to a workload some policy binds.
    pub examined: usize,
    /// Of them, from one of the node's own addresses: exempt.
    pub node_exempt: usize,
    /// Of them, denied.
    pub denied: Vec<Denied>,
}

/// Pure: which of `sockets` (one namespace's, listeners included) `tables` deny; `host` holds the
/// node's own addresses. Mode Disabled denies nothing.
pub fn plan(
    node_mode: u32,
    tables: &AuthzTables,
    host: &BTreeSet<Ip16>,
    sockets: &[TcpSocket],
) -> Plan {
    let mut plan = Plan::default();
    if !can_deny(node_mode, tables) {
        return plan;
    }
    let listeners: HashSet<(Ip16, u16)> = sockets
        .iter()
        .filter(|s| s.state == TcpState::Listen)
        .map(|s| (s.local_ip, s.local_port))
        .collect();
    // The class lookup is linear in the sources; many connections share a client.
    let mut classes: HashMap<Ip16, u32> = HashMap::new();
    for socket in sockets {
        if !LIVE_STATES.contains(&socket.state) || !accepted(socket, &listeners) {
            continue;
        }
        let Some(policy_set) = policy_set(tables, &socket.local_ip) else {
            continue;
        };
        plan.examined += 1;
        if host.contains(&socket.remote_ip) {
            plan.node_exempt += 1;
            continue;
        }
        let class = *classes
            .entry(socket.remote_ip)
            .or_insert_with(|| source_class(&tables.sources, &socket.remote_ip));
        let cause = match verdict(tables, policy_set, class, socket.local_port) {
            Some(v) if v.action == authz_action::ALLOW => continue,
            Some(v) => DenyCause::Verdict {
                policy: v.policy,
                reason: v.reason,
            },
            None => DenyCause::NoVerdict,
        };
        plan.denied.push(Denied {
            socket: *socket,
            cause,
        });
    }
    plan
}

/// Whether a listener of the namespace holds the socket's local port, on its address or on a
/// wildcard (0.0.0.0, or `::` which also takes IPv4 on a dual-stack socket).
fn accepted(socket: &TcpSocket, listeners: &HashSet<(Ip16, u16)>) -> bool {
    [socket.local_ip, ipv4_mapped([0; 4]), [0; 16]]
        .iter()
        .any(|ip| listeners.contains(&(*ip, socket.local_port)))
}

/// The verdict set of connections to `ip`, if the generation binds a policy to it.
fn policy_set(tables: &AuthzTables, ip: &Ip16) -> Option<u32> {
    let i = tables.workloads.binary_search_by_key(ip, |w| w.ip).ok()?;
    Some(tables.workloads[i].value.policy_set)
}

/// The kernel's chain over the (sorted) verdicts: the verdict of (set, class, local port).
fn verdict(tables: &AuthzTables, policy_set: u32, class: u32, port: u16) -> Option<AuthzVerdict> {
    resolve_verdict(policy_set, class, port, |key: &AuthzVerdictKey| {
        let i = tables.verdicts.binary_search_by_key(key, |r| r.key).ok()?;
        Some(tables.verdicts[i].value)
    })
}

/// The sockets of one namespace: sock_diag in the agent, a fake in unit tests.
pub trait SocketTable {
    fn tcp_sockets(&mut self, states: &[TcpState]) -> io::Result<Vec<TcpSocket>>;
    /// `ENOENT` when the socket is gone (or another socket now has its addresses).
    fn destroy(&mut self, socket: &TcpSocket) -> io::Result<()>;
}

impl SocketTable for SockDiag {
    fn tcp_sockets(&mut self, states: &[TcpState]) -> io::Result<Vec<TcpSocket>> {
        SockDiag::tcp_sockets(self, states)
    }

    fn destroy(&mut self, socket: &TcpSocket) -> io::Result<()> {
        SockDiag::destroy(self, socket)
    }
}

/// Closed connections of one workload for one cause.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ClosedByPolicy {
    pub workload: IpAddr,
    pub cause: DenyCause,
    pub closed: u64,
}

/// What one [`close_denied`] did. Nothing in it fails an apply: the caller logs and counts it.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Closed {
    /// Namespaces whose sockets were examined.
    pub namespaces: usize,
    /// Namespaces that could not be entered or listed (each logged; a pod gone meanwhile is one).
    pub failed_netns: usize,
    /// Live accepted connections to a workload some policy binds.
    pub examined: usize,
    /// Of them, from one of the node's own addresses: exempt.
    pub node_exempt: usize,
    /// Denied and closed.
    pub closed: usize,
    /// Denied, but gone before the destroy reached them.
    pub vanished: usize,
    /// Denied, but the destroy failed (each logged): they live on.
    pub failed: usize,
    /// `closed` per workload and cause, sorted.
    pub by_policy: Vec<ClosedByPolicy>,
}

/// Plans and closes in one namespace's socket table, adding to `closed` and `by_policy`.
fn close_in_table(
    table: &mut impl SocketTable,
    node_mode: u32,
    tables: &AuthzTables,
    host: &BTreeSet<Ip16>,
    closed: &mut Closed,
    by_policy: &mut BTreeMap<(Ip16, DenyCause), u64>,
) -> io::Result<()> {
    let sockets = table.tcp_sockets(&LISTED_STATES)?;
    let plan = plan(node_mode, tables, host, &sockets);
    closed.examined += plan.examined;
    closed.node_exempt += plan.node_exempt;
    for denied in &plan.denied {
        let s = &denied.socket;
        let local = SocketAddr::new(IpAddr::from(s.local_ip).to_canonical(), s.local_port);
        let remote = SocketAddr::new(IpAddr::from(s.remote_ip).to_canonical(), s.remote_port);
        match table.destroy(s) {
            Ok(()) => {
                closed.closed += 1;
                *by_policy.entry((s.local_ip, denied.cause)).or_default() += 1;
                info!(%local, %remote, cause = ?denied.cause, "connection denied by the new generation closed");
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => closed.vanished += 1,
            Err(e) => {
                closed.failed += 1;
                warn!(%local, %remote, error = %e, "could not close a connection the new generation denies");
            }
        }
    }
    Ok(())
}

/// Enters `netns` (on the calling thread) and closes there.
fn close_in_netns(
    netns: &File,
    node_mode: u32,
    tables: &AuthzTables,
    host: &BTreeSet<Ip16>,
    closed: &mut Closed,
    by_policy: &mut BTreeMap<(Ip16, DenyCause), u64>,
) -> io::Result<()> {
    sys::enter_netns(netns.as_fd())?;
    let mut table = SockDiag::open()?;
    close_in_table(&mut table, node_mode, tables, host, closed, by_policy)
}

/// Closes, in each namespace of `namespaces` (each visited once, however many handles lead to
/// it), the connections its workloads accepted that `tables` deny; `host` (the node's own
/// addresses) is exempt. Call it after the generation is live in the kernel, so that no new
/// connection can be accepted under the old verdicts once the listing has passed.
pub fn close_denied(
    namespaces: &[&File],
    node_mode: u32,
    tables: &AuthzTables,
    host: &BTreeSet<Ip16>,
) -> Closed {
    if !can_deny(node_mode, tables) {
        return Closed::default();
    }
    // (device, inode) identifies a namespace; a handle whose identity is unknown is kept (entering
    // it fails, and is counted).
    let mut seen = HashSet::new();
    let unique: Vec<&File> = namespaces
        .iter()
        .copied()
        .filter(|ns| {
            ns.metadata()
                .map_or(true, |m| seen.insert((m.dev(), m.ino())))
        })
        .collect();
    // setns() changes the calling thread's namespace: do it on a thread that then exits.
    let outcome = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let mut closed = Closed::default();
                let mut by_policy = BTreeMap::new();
                for netns in unique {
                    match close_in_netns(
                        netns,
                        node_mode,
                        tables,
                        host,
                        &mut closed,
                        &mut by_policy,
                    ) {
                        Ok(()) => closed.namespaces += 1,
                        Err(e) => {
                            closed.failed_netns += 1;
                            warn!(error = %e, "closing denied connections in a namespace");
                        }
                    }
                }
                closed.by_policy = by_policy
                    .into_iter()
                    .map(|((workload, cause), n)| ClosedByPolicy {
                        workload: IpAddr::from(workload).to_canonical(),
                        cause,
                        closed: n,
                    })
                    .collect();
                closed
            })
            .join()
    });
    outcome.unwrap_or_else(|_| {
        warn!("the thread closing denied connections panicked");
        Closed {
            failed_netns: namespaces.len(),
            ..Closed::default()
        }
    })
}

#[cfg(test)]
mod tests;
