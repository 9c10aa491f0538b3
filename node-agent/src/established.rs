//! Established connections a new generation denies. The kernel program judges only new
//! connections (`sk_lookup` runs for a SYN's listener lookup); so after each applied generation
//! the agent looks at the established inbound TCP connections of every enrolled namespace and
//! closes, with `SOCK_DESTROY`, each one the new generation denies — the same verdict the kernel
//! would give its SYN now, computed with the one lookup chain over the snapshot's records
//! (`kmesh_common::authz::{source_class, resolve_verdict}`).
//!
//! [`denied`] is the pure decision (tables × the namespace's sockets → the sockets to close);
//! [`close_denied_in`] does the I/O for one namespace (sock_diag through `sys`).
use std::{
    collections::BTreeSet,
    fs::File,
    io,
    net::{IpAddr, SocketAddr},
    os::fd::AsFd as _,
};

use kmesh_common::{
    AuthzVerdict, AuthzVerdictKey, Ip16,
    authz::{authz_action, resolve_verdict, source_class},
    mode,
};
use kmesh_snapshot::AuthzTables;
use tracing::info;

use crate::sys::{self, TcpSocket, TcpState};

/// What the kernel program would decide for a new connection to `local`:`port` from `remote`:
/// `None` when it passes without a verdict (no policy binds `local`, or `remote` is the node's).
pub fn verdict(
    tables: &AuthzTables,
    host: &BTreeSet<Ip16>,
    local: &Ip16,
    port: u16,
    remote: &Ip16,
) -> Option<AuthzVerdict> {
    let workload = tables
        .workloads
        .binary_search_by(|w| w.ip.cmp(local))
        .ok()
        .map(|i| tables.workloads[i].value)?;
    if host.contains(remote) {
        return None;
    }
    let class = source_class(&tables.sources, remote);
    let lookup = |key: &AuthzVerdictKey| {
        tables
            .verdicts
            .binary_search_by(|v| v.key.cmp(key))
            .ok()
            .map(|i| tables.verdicts[i].value)
    };
    // No verdict at all: the kernel denies (fail closed), and so do we.
    Some(
        resolve_verdict(workload.policy_set, class, port, lookup).unwrap_or(AuthzVerdict {
            policy: 0,
            action: authz_action::DENY,
            reason: 0,
            pad: 0,
        }),
    )
}

/// Pure: the inbound connections among `sockets` that `tables` deny. A socket is inbound when its
/// local port is one a socket of the namespace listens on (`listening`); outbound connections of
/// the pod are not authorization's business. Mode Disabled denies nothing.
pub fn denied<'a>(
    node_mode: u32,
    tables: &AuthzTables,
    host: &BTreeSet<Ip16>,
    listening: &BTreeSet<u16>,
    sockets: &'a [TcpSocket],
) -> Vec<&'a TcpSocket> {
    if node_mode == mode::DISABLED || tables.workloads.is_empty() {
        return Vec::new();
    }
    sockets
        .iter()
        .filter(|s| listening.contains(&s.local_port))
        .filter(|s| {
            verdict(tables, host, &s.local, s.local_port, &s.remote)
                .is_some_and(|v| v.action != authz_action::ALLOW)
        })
        .collect()
}

/// What closing the denied connections of one namespace did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Closed {
    pub closed: usize,
    /// Gone before we closed them.
    pub vanished: usize,
    /// Namespaces that could not be swept (gone meanwhile, or an error, logged).
    pub failed_netns: usize,
}

/// Closes the connections of the namespace `netns` that `tables` deny, on a thread that enters
/// the namespace and then exits.
pub fn close_denied_in(
    netns: &File,
    node_mode: u32,
    tables: &AuthzTables,
    host: &BTreeSet<Ip16>,
) -> io::Result<Closed> {
    let netns = netns.try_clone()?;
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                sys::enter_netns(netns.as_fd())?;
                let listening: BTreeSet<u16> = sys::tcp_sockets(&[TcpState::Listen])?
                    .iter()
                    .map(|s| s.local_port)
                    .collect();
                let sockets = sys::tcp_sockets(&[TcpState::Established, TcpState::SynRecv])?;
                let mut closed = Closed::default();
                for socket in denied(node_mode, tables, host, &listening, &sockets) {
                    match sys::destroy_tcp_socket(socket) {
                        Ok(()) => {
                            info!(
                                local = %SocketAddr::new(IpAddr::from(socket.local).to_canonical(), socket.local_port),
                                remote = %SocketAddr::new(IpAddr::from(socket.remote).to_canonical(), socket.remote_port),
                                "connection denied by the new generation closed"
                            );
                            closed.closed += 1
                        }
                        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => closed.vanished += 1,
                        Err(e) => return Err(e),
                    }
                }
                Ok(closed)
            })
            .join()
            .map_err(|_| io::Error::other("connection sweep thread panicked"))?
    })
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use kmesh_common::{
        AuthzSourceKey, AuthzSourceRecord, AuthzSourceValue, AuthzVerdictRecord,
        AuthzWorkloadRecord, AuthzWorkloadValue,
        authz::{ANY_CLASS, ANY_PORT, authz_reason},
        ip16,
    };

    use super::*;

    fn ip(last: u8) -> Ip16 {
        ip16(IpAddr::V4(Ipv4Addr::new(10, 244, 1, last)))
    }

    /// Server .100 (set 1): class 1 (.10) allowed, everything else denied; .50 is the node.
    fn tables() -> AuthzTables {
        let verdict = |class, action, policy| AuthzVerdictRecord {
            key: AuthzVerdictKey {
                policy_set: 1,
                source_class: class,
                port: ANY_PORT,
                pad: 0,
            },
            value: AuthzVerdict {
                policy,
                action,
                reason: authz_reason::DENY_MATCHED,
                pad: 0,
            },
        };
        let mut verdicts = vec![
            verdict(1, authz_action::ALLOW, 7),
            verdict(ANY_CLASS, authz_action::DENY, 0),
        ];
        verdicts.sort();
        AuthzTables {
            workloads: vec![AuthzWorkloadRecord {
                ip: ip(100),
                value: AuthzWorkloadValue {
                    policy_set: 1,
                    pad: 0,
                },
            }],
            sources: vec![AuthzSourceRecord {
                key: AuthzSourceKey {
                    prefix_len: 128,
                    ip: ip(10),
                },
                value: AuthzSourceValue { source_class: 1 },
            }],
            verdicts,
            policies: vec![],
        }
    }

    #[test]
    fn the_verdict_is_the_kernels() {
        let host = BTreeSet::from([ip(50)]);
        let t = tables();
        let v = |local, remote| verdict(&t, &host, &ip(local), 8080, &ip(remote)).map(|v| v.action);
        assert_eq!(v(100, 10), Some(authz_action::ALLOW));
        assert_eq!(v(100, 11), Some(authz_action::DENY));
        assert_eq!(v(100, 50), None, "the node is exempt");
        assert_eq!(v(101, 11), None, "no policy binds .101");
        let mut broken = tables();
        broken.verdicts.clear();
        let action = verdict(&broken, &host, &ip(100), 8080, &ip(10)).map(|v| v.action);
        assert_eq!(action, Some(authz_action::DENY), "no verdict fails closed");
    }

    #[test]
    fn only_inbound_connections_the_tables_deny_are_closed() {
        let host = BTreeSet::from([ip(50)]);
        let listening = BTreeSet::from([8080]);
        let sockets = [
            TcpSocket::for_test(ip(100), 8080, ip(10)),   // allowed
            TcpSocket::for_test(ip(100), 8080, ip(11)),   // denied
            TcpSocket::for_test(ip(100), 8080, ip(50)),   // the node: exempt
            TcpSocket::for_test(ip(100), 40_001, ip(11)), // outbound from the pod
        ];
        let closed = denied(mode::KERNEL_NATIVE, &tables(), &host, &listening, &sockets);
        assert_eq!(closed, vec![&sockets[1]]);
        let closed = denied(mode::DISABLED, &tables(), &host, &listening, &sockets);
        assert!(closed.is_empty(), "mode Disabled closes nothing");
    }
}
