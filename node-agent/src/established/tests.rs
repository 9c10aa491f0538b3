//! The decision ([`plan`]) against hand-built tables, and the counting of [`close_in_table`] with
//! a scripted socket table.
use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr},
};

use kmesh_common::{
    AuthzSourceKey, AuthzSourceRecord, AuthzSourceValue, AuthzVerdictRecord, AuthzWorkloadRecord,
    AuthzWorkloadValue,
    authz::{ANY_CLASS, ANY_PORT, authz_reason},
};

use super::*;
use crate::sys::SocketFamily;

const WORKLOAD: [u8; 4] = [10, 244, 7, 2];
/// In the denied block 10.244.7.0/24, but with a full-length entry of its own (allowed).
const ALLOWED: [u8; 4] = [10, 244, 7, 3];
/// In the block only: allowed on OTHER_PORT, denied on PORT.
const IN_BLOCK: [u8; 4] = [10, 244, 7, 4];
/// In no block: unknown source.
const STRANGER: [u8; 4] = [10, 9, 9, 9];
const NODE: [u8; 4] = [10, 244, 0, 1];
const PORT: u16 = 8080;
const OTHER_PORT: u16 = 9090;
const ALLOW_POLICY: u32 = 7;
const PORT_POLICY: u32 = 8;
const KERNEL_NATIVE: u32 = mode::KERNEL_NATIVE;

fn v4(octets: [u8; 4]) -> Ip16 {
    ipv4_mapped(octets)
}

fn host() -> BTreeSet<Ip16> {
    BTreeSet::from([v4(NODE)])
}

fn verdict_record(
    class: u32,
    port: u16,
    policy: u32,
    action: u8,
    reason: u8,
) -> AuthzVerdictRecord {
    AuthzVerdictRecord {
        key: AuthzVerdictKey {
            policy_set: 1,
            source_class: class,
            port,
            pad: 0,
        },
        value: AuthzVerdict {
            policy,
            action,
            reason,
            pad: 0,
        },
    }
}

fn source(prefix_len: u32, ip: Ip16, class: u32) -> AuthzSourceRecord {
    AuthzSourceRecord {
        key: AuthzSourceKey { prefix_len, ip },
        value: AuthzSourceValue {
            source_class: class,
        },
    }
}

/// Set 1 on WORKLOAD: deny by default; allow class 2 (ALLOWED) everywhere and class 1 (the
/// block) on OTHER_PORT only.
fn tables() -> AuthzTables {
    let (allow, deny) = (authz_action::ALLOW, authz_action::DENY);
    let mut verdicts = vec![
        verdict_record(ANY_CLASS, ANY_PORT, 0, deny, authz_reason::NO_ALLOW_MATCHED),
        verdict_record(
            2,
            ANY_PORT,
            ALLOW_POLICY,
            allow,
            authz_reason::ALLOW_MATCHED,
        ),
        verdict_record(
            1,
            OTHER_PORT,
            PORT_POLICY,
            allow,
            authz_reason::ALLOW_MATCHED,
        ),
    ];
    verdicts.sort();
    let mut sources = vec![
        source(96 + 24, v4([10, 244, 7, 0]), 1),
        source(128, v4(ALLOWED), 2),
    ];
    sources.sort();
    AuthzTables {
        workloads: vec![AuthzWorkloadRecord {
            ip: v4(WORKLOAD),
            value: AuthzWorkloadValue {
                policy_set: 1,
                pad: 0,
            },
        }],
        sources,
        verdicts,
        policies: vec![],
    }
}

fn socket(state: TcpState, local: (Ip16, u16), remote: (Ip16, u16)) -> TcpSocket {
    TcpSocket {
        family: SocketFamily::Inet6,
        state,
        local_ip: local.0,
        local_port: local.1,
        remote_ip: remote.0,
        remote_port: remote.1,
        interface: 0,
        cookie: [remote.1 as u32, 0],
    }
}

fn listener(ip: Ip16, port: u16) -> TcpSocket {
    socket(TcpState::Listen, (ip, port), ([0; 16], 0))
}

fn inbound(from: [u8; 4], port: u16, client_port: u16) -> TcpSocket {
    socket(
        TcpState::Established,
        (v4(WORKLOAD), port),
        (v4(from), client_port),
    )
}

const NO_MATCH: DenyCause = DenyCause::Verdict {
    policy: 0,
    reason: authz_reason::NO_ALLOW_MATCHED,
};

fn denied_remotes(plan: &Plan) -> Vec<(Ip16, DenyCause)> {
    plan.denied
        .iter()
        .map(|d| (d.socket.remote_ip, d.cause))
        .collect()
}

#[test]
fn denied_accepted_connections_are_closed_and_allowed_ones_kept() {
    let sockets = [
        listener([0; 16], PORT),
        inbound(ALLOWED, PORT, 40001),
        inbound(IN_BLOCK, PORT, 40002),
        inbound(STRANGER, PORT, 40003),
    ];
    let plan = plan(KERNEL_NATIVE, &tables(), &host(), &sockets);
    assert_eq!(plan.examined, 3);
    assert_eq!(
        denied_remotes(&plan),
        [(v4(IN_BLOCK), NO_MATCH), (v4(STRANGER), NO_MATCH)]
    );
    assert_eq!(plan.denied[0].socket, sockets[2], "the very socket listed");
}

#[test]
fn the_longest_prefix_decides_the_class() {
    // ALLOWED is in the denied /24 too: only its /128 entry makes it class 2.
    let sockets = [listener([0; 16], PORT), inbound(ALLOWED, PORT, 40001)];
    assert!(
        plan(KERNEL_NATIVE, &tables(), &host(), &sockets)
            .denied
            .is_empty()
    );
    let mut without_own_entry = tables();
    without_own_entry
        .sources
        .retain(|s| s.key.prefix_len != 128);
    assert_eq!(
        denied_remotes(&plan(KERNEL_NATIVE, &without_own_entry, &host(), &sockets)),
        [(v4(ALLOWED), NO_MATCH)]
    );
}

#[test]
fn the_local_port_selects_the_verdict() {
    let sockets = [
        listener([0; 16], PORT),
        listener([0; 16], OTHER_PORT),
        inbound(IN_BLOCK, PORT, 40001),
        inbound(IN_BLOCK, OTHER_PORT, 40002),
    ];
    let plan = plan(KERNEL_NATIVE, &tables(), &host(), &sockets);
    assert_eq!(plan.examined, 2);
    assert_eq!(plan.denied.len(), 1);
    assert_eq!(plan.denied[0].socket.local_port, PORT);
}

#[test]
fn outbound_connections_of_a_workload_are_not_judged() {
    // The workload connected out from an ephemeral port no listener holds.
    let outbound = socket(
        TcpState::Established,
        (v4(WORKLOAD), 45000),
        (v4(STRANGER), PORT),
    );
    let sockets = [listener([0; 16], PORT), outbound];
    assert_eq!(
        plan(KERNEL_NATIVE, &tables(), &host(), &sockets),
        Plan::default()
    );
}

#[test]
fn a_listener_holds_its_own_address_or_a_wildcard() {
    let conn = inbound(STRANGER, PORT, 40001);
    for l in [
        listener(v4(WORKLOAD), PORT),
        listener(v4([0; 4]), PORT),
        listener([0; 16], PORT),
    ] {
        let plan = plan(KERNEL_NATIVE, &tables(), &host(), &[l, conn]);
        assert_eq!(plan.denied.len(), 1, "{l:?}");
    }
    // A listener on another address of the namespace (its loopback, say) on the same port does
    // not make this connection an accepted one.
    for elsewhere in [
        listener(v4([10, 244, 7, 99]), PORT),
        listener(v4([127, 0, 0, 1]), PORT),
    ] {
        let plan = plan(KERNEL_NATIVE, &tables(), &host(), &[elsewhere, conn]);
        assert!(plan.denied.is_empty(), "{elsewhere:?}");
    }
}

#[test]
fn the_nodes_own_addresses_are_exempt() {
    let sockets = [listener([0; 16], PORT), inbound(NODE, PORT, 40001)];
    let plan = plan(KERNEL_NATIVE, &tables(), &host(), &sockets);
    assert_eq!((plan.examined, plan.node_exempt), (1, 1));
    assert!(plan.denied.is_empty());
    let plan = plan_without_host(&sockets);
    assert_eq!(
        denied_remotes(&plan),
        [(v4(NODE), NO_MATCH)],
        "not exempt without the host"
    );
}

fn plan_without_host(sockets: &[TcpSocket]) -> Plan {
    plan(KERNEL_NATIVE, &tables(), &BTreeSet::new(), sockets)
}

#[test]
fn only_live_connections_are_closed() {
    let mut sockets = vec![listener([0; 16], PORT)];
    let states = [
        TcpState::SynRecv,
        TcpState::Established,
        TcpState::CloseWait,
        TcpState::FinWait1,
        TcpState::FinWait2,
        TcpState::TimeWait,
        TcpState::LastAck,
        TcpState::Closing,
        TcpState::Close,
        TcpState::SynSent,
    ];
    for (i, state) in states.iter().enumerate() {
        sockets.push(socket(
            *state,
            (v4(WORKLOAD), PORT),
            (v4(STRANGER), 40000 + i as u16),
        ));
    }
    let closed: Vec<TcpState> = plan_without_host(&sockets)
        .denied
        .iter()
        .map(|d| d.socket.state)
        .collect();
    assert_eq!(closed, LIVE_STATES);
}

#[test]
fn workloads_no_policy_binds_are_left_alone() {
    let other = socket(
        TcpState::Established,
        (v4([10, 244, 7, 50]), PORT),
        (v4(STRANGER), 40001),
    );
    assert_eq!(
        plan_without_host(&[listener([0; 16], PORT), other]),
        Plan::default()
    );
}

#[test]
fn mode_disabled_denies_nothing() {
    let sockets = [listener([0; 16], PORT), inbound(STRANGER, PORT, 40001)];
    assert_eq!(
        plan(mode::DISABLED, &tables(), &host(), &sockets),
        Plan::default()
    );
}

#[test]
fn a_missing_verdict_denies() {
    let mut t = tables();
    t.verdicts.clear();
    let sockets = [listener([0; 16], PORT), inbound(ALLOWED, PORT, 40001)];
    assert_eq!(
        denied_remotes(&plan(KERNEL_NATIVE, &t, &host(), &sockets)),
        [(v4(ALLOWED), DenyCause::NoVerdict)]
    );
}

/// A socket table whose destroy answers from a script.
struct FakeTable {
    sockets: Vec<TcpSocket>,
    /// errno per client port; absent: success.
    errors: BTreeMap<u16, i32>,
    destroyed: Vec<TcpSocket>,
}

impl SocketTable for FakeTable {
    fn tcp_sockets(&mut self, states: &[TcpState]) -> io::Result<Vec<TcpSocket>> {
        assert_eq!(states, LISTED_STATES);
        Ok(self.sockets.clone())
    }

    fn destroy(&mut self, socket: &TcpSocket) -> io::Result<()> {
        match self.errors.get(&socket.remote_port) {
            Some(errno) => Err(io::Error::from_raw_os_error(*errno)),
            None => {
                self.destroyed.push(*socket);
                Ok(())
            }
        }
    }
}

#[test]
fn a_failed_destroy_is_counted_and_the_rest_still_closed() {
    let mut table = FakeTable {
        sockets: vec![
            listener([0; 16], PORT),
            inbound(STRANGER, PORT, 40001),
            inbound(STRANGER, PORT, 40002),
            inbound(IN_BLOCK, PORT, 40003),
            inbound(IN_BLOCK, PORT, 40004),
            inbound(ALLOWED, PORT, 40005),
            inbound(NODE, PORT, 40006),
        ],
        errors: BTreeMap::from([(40001, libc::ENOENT), (40002, libc::EPERM)]),
        destroyed: vec![],
    };
    let mut closed = Closed::default();
    let mut by_policy = BTreeMap::new();
    close_in_table(
        &mut table,
        KERNEL_NATIVE,
        &tables(),
        &host(),
        &mut closed,
        &mut by_policy,
    )
    .unwrap();
    let ports: Vec<u16> = table.destroyed.iter().map(|s| s.remote_port).collect();
    assert_eq!(ports, [40003, 40004]);
    let counts = (
        closed.examined,
        closed.node_exempt,
        closed.closed,
        closed.vanished,
        closed.failed,
    );
    assert_eq!(counts, (6, 1, 2, 1, 1));
    assert_eq!(by_policy, BTreeMap::from([((v4(WORKLOAD), NO_MATCH), 2)]));
}

#[test]
fn a_policy_free_or_disabled_generation_enters_no_namespace() {
    // Not a namespace: entering it fails.
    let not_netns = File::open("/dev/null").unwrap();
    let host = BTreeSet::from([ip16_of(Ipv4Addr::from(NODE))]);
    let free = AuthzTables::default();
    assert_eq!(
        close_denied(&[&not_netns], KERNEL_NATIVE, &free, &host),
        Closed::default()
    );
    assert_eq!(
        close_denied(&[&not_netns], mode::DISABLED, &tables(), &host),
        Closed::default()
    );
    // With a policy, it is entered: the failure is counted, once for a handle given twice.
    let closed = close_denied(&[&not_netns, &not_netns], KERNEL_NATIVE, &tables(), &host);
    assert_eq!((closed.namespaces, closed.failed_netns), (0, 1));
}

fn ip16_of(ip: Ipv4Addr) -> Ip16 {
    kmesh_common::ip16(IpAddr::V4(ip))
}
