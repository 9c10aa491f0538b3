//! Authorization in the kernel, end to end on the real kernel: the real `kmesh-agent` attaches the
//! real `sk_lookup` program to every enrolled pod's network namespace; clients in test namespaces
//! (enrolled or not, and the node itself) connect straight to a server pod's address, and the
//! server counts what it accepts. Tables are written record by record (`kmesh_tests::authz`), so
//! each test knows exactly which verdict every connection must get.
//!
//! Run as root after `cargo build --workspace --bins` (scripts/test.sh does both).
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU8, Ordering},
    time::{Duration, Instant},
};

use kmesh_common::{authz::authz_reason, mode};
use kmesh_snapshot::builder::SnapshotBuilder;
use kmesh_tests::{
    Agent, AgentDir, AgentOptions, AgentSource, Pod, ProbeHandle, ProbeReport, StopFile, TcpServer,
    TestCgroup, TestNetwork,
    authz::{AuthzTablesBuilder, Class, Port, Verdict},
    probe::{Outcome, TimedAttempt, spawn_in_cgroup_dir},
    write_atomically,
};

const NODE: &str = "node-1";
const READY: Duration = Duration::from_secs(20);
/// A refused connect must fail at once (the kernel answers the SYN with a RST): far below the
/// 1 s retransmission a dropped SYN would cost.
const REFUSED_WITHIN: Duration = Duration::from_millis(200);
/// The server's verdict set.
const SET: u32 = 1;

/// Source classes of the tests' tables.
const ALICE: u32 = 1;
const BOB: u32 = 2;
const INNER_BLOCK: u32 = 3;
const OUTER_BLOCK: u32 = 4;
const CAROL: u32 = 5;

/// One test's node: a server pod (enrolled) listening on several ports, client pods, a test
/// cgroup, a private pin directory and a snapshot file. Pod addresses are 10.244.<subnet>.x with
/// subnets from 200 up, apart from the other kernel tests' (every agent on the machine scans every
/// namespace, so addresses must not repeat across tests).
struct World {
    subnet: u8,
    net: TestNetwork,
    cgroup: TestCgroup,
    dir: AgentDir,
    server: Pod,
    /// Port → its listener (each counts its accepts).
    servers: BTreeMap<u16, TcpServer>,
    clients: BTreeMap<&'static str, Pod>,
    snapshot_file: PathBuf,
}

impl World {
    /// `clients`: name and host part of each client pod's address.
    fn new(name: &str, ports: &[u16], clients: &[(&'static str, u8)]) -> World {
        static NEXT_SUBNET: AtomicU8 = AtomicU8::new(200);
        let subnet = NEXT_SUBNET.fetch_add(1, Ordering::Relaxed);
        let net = TestNetwork::new(name).expect("test network");
        let cgroup = TestCgroup::new(name).expect("test cgroup");
        let dir = AgentDir::new(name).expect("pin directory");
        let server = net
            .add_pod("server", v4(subnet, 100), Some(v6(subnet, 100)))
            .expect("server pod");
        let servers = ports
            .iter()
            .map(|p| (*p, server.serve_tcp(*p).expect("server listener")))
            .collect();
        let clients = clients
            .iter()
            .map(|(pod, host)| {
                let p = net
                    .add_pod(pod, v4(subnet, *host), Some(v6(subnet, *host)))
                    .expect("client pod");
                (*pod, p)
            })
            .collect();
        let snapshot_file =
            std::env::temp_dir().join(format!("kmt-{name}-{}.snap", std::process::id()));
        World {
            subnet,
            net,
            cgroup,
            dir,
            server,
            servers,
            clients,
            snapshot_file,
        }
    }

    fn client(&self, name: &str) -> &Pod {
        self.clients
            .get(name)
            .unwrap_or_else(|| panic!("no client {name}"))
    }

    fn accepted(&self, port: u16) -> u64 {
        self.servers[&port].accepted()
    }

    /// A snapshot whose workloads (enrolled namespaces) are the server and `enrolled` clients.
    fn builder(&self, generation: u64, node_mode: u32, enrolled: &[&str]) -> SnapshotBuilder {
        let mut b = SnapshotBuilder::new(NODE, generation, node_mode);
        b.workload(IpAddr::V4(self.server.ipv4()), 1);
        for name in enrolled {
            b.workload(IpAddr::V4(self.client(name).ipv4()), 2);
        }
        b
    }

    fn write(&self, snapshot: &kmesh_snapshot::Snapshot) {
        write_atomically(&self.snapshot_file, &snapshot.encode().expect("encode"))
            .expect("write snapshot");
    }

    /// Starts the agent, with the test's node namespace as the host (its addresses are exempt),
    /// and waits until `links` namespaces have the authorization program attached.
    fn start_agent(&self, links: u64) -> Agent {
        let host_netns = self.net.node_netns_path();
        let mut agent = Agent::start(&AgentOptions {
            node_name: NODE,
            source: AgentSource::File(&self.snapshot_file),
            dir: &self.dir,
            cgroup: &self.cgroup,
            extra_args: vec![
                "--test-host-netns".to_string(),
                host_netns.display().to_string(),
            ],
        })
        .expect("start kmesh-agent");
        agent.wait_ready(READY).expect("agent ready");
        wait_links(&mut agent, links);
        agent
    }

    /// `count` connects from `pod` to the server's `port`, over IPv4 or IPv6, with a timeline.
    fn probe(&self, pod: &Pod, port: u16, v6: bool, count: u32) -> ProbeReport {
        let target = self.target(port, v6);
        pod.run_probe(
            &self.cgroup,
            &probe_args(&target, &["--count", &count.to_string()]),
        )
        .expect("probe")
    }

    /// The same from the node's own namespace (the bridge address 10.244.0.1).
    fn probe_from_node(&self, port: u16, count: u32) -> ProbeReport {
        let target = self.target(port, false);
        spawn_in_cgroup_dir(
            self.net.node_netns_name(),
            self.cgroup.path(),
            &probe_args(&target, &["--count", &count.to_string()]),
        )
        .and_then(ProbeHandle::wait)
        .expect("probe from the node")
    }

    /// A probe connecting to `port` until `stop` exists.
    fn continuous_probe(&self, pod: &Pod, port: u16, stop: &StopFile) -> ProbeHandle {
        let target = self.target(port, false);
        pod.spawn_probe(
            &self.cgroup,
            &probe_args(
                &target,
                &["--until-file", stop.arg(), "--interval-us", "300"],
            ),
        )
        .expect("continuous probe")
    }

    fn target(&self, port: u16, v6: bool) -> String {
        if v6 {
            format!("[{}]:{port}", self.server.ipv6().expect("server v6"))
        } else {
            format!("{}:{port}", self.server.ipv4())
        }
    }

    fn ip(&self, host: u8) -> IpAddr {
        IpAddr::V4(v4(self.subnet, host))
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.snapshot_file);
    }
}

fn probe_args<'a>(target: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["--target", target, "--timeout-ms", "2000", "--timeline"];
    args.extend_from_slice(extra);
    args
}

fn v4(subnet: u8, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, subnet, host)
}

fn v6(subnet: u8, host: u8) -> Ipv6Addr {
    Ipv6Addr::new(
        0xfd00,
        0x244,
        0,
        0,
        0,
        0,
        u16::from(subnet),
        u16::from(host),
    )
}

fn wait_links(agent: &mut Agent, n: u64) {
    agent
        .wait_for(
            Duration::from_secs(10),
            &format!("the authorization program attached to {n} namespaces"),
            |a| {
                let s = a.debug_snapshot()?;
                Ok(s["authz_links"].as_u64() == Some(n) && s["host_addrs"].as_u64() > Some(0))
            },
        )
        .expect("authorization links");
}

fn wait_generation(agent: &mut Agent, generation: u64) {
    agent
        .wait_for(
            Duration::from_secs(10),
            &format!("generation {generation} live"),
            |a| Ok(a.debug_snapshot()?["live"]["generation"].as_u64() == Some(generation)),
        )
        .expect("generation applied");
}

fn debug_authz(agent: &Agent) -> serde_json::Value {
    let (code, body) = agent.http_get("/debug/authz").expect("/debug/authz");
    assert_eq!(code, 200, "/debug/authz: {body}");
    serde_json::from_str(&body).expect("/debug/authz JSON")
}

/// `(workload, policy, action, reason) → connections` of `/debug/authz`, with the policy's name
/// checked against `names` on the way.
fn counts_by_policy(
    authz: &serde_json::Value,
    names: &BTreeMap<u32, &str>,
) -> BTreeMap<(String, u32, String, String), u64> {
    let entries = authz["by_policy"].as_array().expect("by_policy");
    entries
        .iter()
        .map(|e| {
            let policy = e["policy"].as_u64().expect("policy") as u32;
            let name = e["policy_name"]["name"].as_str();
            assert_eq!(
                name,
                names.get(&policy).copied(),
                "name of policy {policy}: {e}"
            );
            (
                (
                    e["workload_ip"].as_str().expect("ip").to_string(),
                    policy,
                    e["action"].as_str().expect("action").to_string(),
                    e["reason"].as_str().expect("reason").to_string(),
                ),
                e["connections"].as_u64().expect("connections"),
            )
        })
        .collect()
}

/// Asserts every attempt of `report` was refused at once with ECONNREFUSED.
fn assert_refused(what: &str, report: &ProbeReport, attempts: u64) {
    assert_eq!(report.attempts, attempts, "{what}: {report:?}");
    assert_eq!(report.ok, 0, "{what}: connections got through: {report:?}");
    assert_eq!(
        report.errors_of("ECONNREFUSED"),
        attempts,
        "{what}: not refused: {report:?}"
    );
    let slowest = slowest_connect(&report.timeline);
    assert!(
        slowest < REFUSED_WITHIN,
        "{what}: a refused connect took {slowest:?}"
    );
}

fn assert_allowed(what: &str, report: &ProbeReport, attempts: u64) {
    assert_eq!(report.attempts, attempts, "{what}: {report:?}");
    assert_eq!(
        report.ok, attempts,
        "{what}: connections failed: {report:?}"
    );
    assert_eq!(report.replies("server"), attempts, "{what}: {report:?}");
}

fn slowest_connect(timeline: &[TimedAttempt]) -> Duration {
    let ns = timeline
        .iter()
        .map(|a| a.connect_ns[1] - a.connect_ns[0])
        .max()
        .unwrap_or(0);
    Duration::from_nanos(ns)
}

const PORT_A: u16 = 8080;
const PORT_B: u16 = 9090;

/// The classic world: alice (enrolled) allowed everywhere, bob (enrolled) only on PORT_B, a
/// stranger (not enrolled) in an allowed block nested inside a denied one, an outsider (not
/// enrolled) in the denied block only, and an unknown client (not enrolled, in no block).
fn classic_world(name: &str) -> World {
    World::new(
        name,
        &[PORT_A, PORT_B],
        &[
            ("alice", 10),
            ("bob", 11),
            ("unknown", 20),
            ("stranger", 130),
            ("outsider", 200),
        ],
    )
}

/// Policy ids and names of the classic tables.
fn classic_names() -> BTreeMap<u32, &'static str> {
    BTreeMap::from([
        (101, "ns/allow-alice"),
        (102, "ns/allow-bob-on-b"),
        (103, "ns/allow-inner-block"),
        (104, "ns/deny-outer-block"),
    ])
}

fn classic_snapshot(w: &World, generation: u64, node_mode: u32) -> kmesh_snapshot::Snapshot {
    let server_v4 = IpAddr::V4(w.server.ipv4());
    let server_v6 = IpAddr::V6(w.server.ipv6().expect("v6"));
    let alice_v6 = IpAddr::V6(w.client("alice").ipv6().expect("v6"));
    let mut t = AuthzTablesBuilder::new();
    t.workload(server_v4, SET)
        .workload(server_v6, SET)
        .source(IpAddr::V4(w.client("alice").ipv4()), 32, ALICE)
        .source(alice_v6, 128, ALICE)
        .source(IpAddr::V4(w.client("bob").ipv4()), 32, BOB)
        .source(w.ip(128), 26, INNER_BLOCK)
        .source(w.ip(128), 25, OUTER_BLOCK)
        .verdict(
            SET,
            Class::Any,
            Port::Any,
            Verdict::deny(authz_reason::NO_ALLOW_MATCHED, 0),
        )
        .verdict(
            SET,
            Class::Of(ALICE),
            Port::Any,
            Verdict::allow(authz_reason::ALLOW_MATCHED, 101),
        )
        .verdict(
            SET,
            Class::Of(BOB),
            Port::Of(PORT_B),
            Verdict::allow(authz_reason::ALLOW_MATCHED, 102),
        )
        .verdict(
            SET,
            Class::Of(INNER_BLOCK),
            Port::Any,
            Verdict::allow(authz_reason::ALLOW_MATCHED, 103),
        )
        .verdict(
            SET,
            Class::Of(OUTER_BLOCK),
            Port::Any,
            Verdict::deny(authz_reason::DENY_MATCHED, 104),
        );
    for (id, name) in classic_names() {
        t.policy(id, name);
    }
    let mut snapshot = w.builder(generation, node_mode, &["alice", "bob"]).build();
    snapshot.authz = t.into_tables();
    snapshot
}

/// Allow and deny by source class (enrolled clients, blocks with the longest prefix deciding, an
/// address in no block), a port-specific verdict, IPv6, the node's own address exempt; refused
/// connects fail at once with ECONNREFUSED and the server accepts exactly the allowed ones; the
/// counters show exact counts per workload and policy.
#[test]
fn verdicts_follow_source_class_and_port_and_are_counted_per_policy() {
    const N: u64 = 20;
    let w = classic_world("authz-verdicts");
    w.write(&classic_snapshot(&w, 1, mode::KERNEL_NATIVE));
    // Server, alice and bob are enrolled.
    let agent = w.start_agent(3);
    let n = N as u32;
    let alice = w.client("alice");
    let bob = w.client("bob");

    assert_allowed("alice → A", &w.probe(alice, PORT_A, false, n), N);
    assert_allowed("alice → B", &w.probe(alice, PORT_B, false, n), N);
    assert_allowed(
        "alice → A over IPv6",
        &w.probe(alice, PORT_A, true, n / 2),
        N / 2,
    );
    assert_refused("bob → A", &w.probe(bob, PORT_A, false, n), N);
    assert_allowed("bob → B", &w.probe(bob, PORT_B, false, n), N);
    // bob's IPv6 address is in no source entry: the unknown class, denied by default.
    assert_refused(
        "bob → A over IPv6",
        &w.probe(bob, PORT_A, true, n / 2),
        N / 2,
    );
    let stranger = w.client("stranger");
    assert_allowed(
        "stranger (inner block) → A",
        &w.probe(stranger, PORT_A, false, n),
        N,
    );
    let outsider = w.client("outsider");
    assert_refused(
        "outsider (outer block) → A",
        &w.probe(outsider, PORT_A, false, n),
        N,
    );
    let unknown = w.client("unknown");
    assert_refused(
        "unknown (no block) → A",
        &w.probe(unknown, PORT_A, false, n),
        N,
    );
    // The node's own address would be in the unknown class, denied: it is exempt.
    assert_allowed("node → A", &w.probe_from_node(PORT_A, n), N);

    // Exactly the allowed connections reached the server.
    assert_eq!(w.accepted(PORT_A), N + N / 2 + N + N, "accepts on A");
    assert_eq!(w.accepted(PORT_B), N + N, "accepts on B");

    let authz = debug_authz(&agent);
    println!("/debug/authz: {authz:#}");
    let server_v4 = w.server.ipv4().to_string();
    let server_v6 = w.server.ipv6().expect("v6").to_string();
    let key = |ip: &str, policy: u32, action: &str, reason: &str| {
        (
            ip.to_string(),
            policy,
            action.to_string(),
            reason.to_string(),
        )
    };
    let expected = BTreeMap::from([
        (key(&server_v4, 0, "deny", "no_allow_matched"), 2 * N),
        (key(&server_v4, 101, "allow", "allow_matched"), 2 * N),
        (key(&server_v4, 102, "allow", "allow_matched"), N),
        (key(&server_v4, 103, "allow", "allow_matched"), N),
        (key(&server_v4, 104, "deny", "deny_matched"), N),
        (key(&server_v6, 0, "deny", "no_allow_matched"), N / 2),
        (key(&server_v6, 101, "allow", "allow_matched"), N / 2),
    ]);
    assert_eq!(counts_by_policy(&authz, &classic_names()), expected);
    let c = &authz["counters"];
    assert_eq!(c["authz_allowed"].as_u64(), Some(4 * N + N / 2), "{c}");
    assert_eq!(c["authz_denied"].as_u64(), Some(3 * N + N / 2), "{c}");
    assert_eq!(c["authz_node_exempt"].as_u64(), Some(N), "{c}");
    assert_eq!(c["authz_counters_full"].as_u64(), Some(0), "{c}");
    assert_eq!(c["inconsistent"].as_u64(), Some(0), "{c}");
    assert_eq!(authz["attached_netns"].as_u64(), Some(3), "{authz}");
}

/// Mode Disabled: the program stays attached and passes everything, counting nothing.
#[test]
fn mode_disabled_enforces_nothing() {
    const N: u64 = 10;
    let w = classic_world("authz-disabled");
    w.write(&classic_snapshot(&w, 1, mode::KERNEL_NATIVE));
    let mut agent = w.start_agent(3);
    // Enforced first, so that the test knows the program runs.
    assert_refused(
        "bob → A",
        &w.probe(w.client("bob"), PORT_A, false, N as u32),
        N,
    );
    w.write(&classic_snapshot(&w, 2, mode::DISABLED));
    wait_generation(&mut agent, 2);
    for who in ["bob", "outsider", "unknown"] {
        assert_allowed(
            &format!("{who} → A with mode Disabled"),
            &w.probe(w.client(who), PORT_A, false, N as u32),
            N,
        );
    }
    assert_eq!(w.accepted(PORT_A), 3 * N);
    let c = &debug_authz(&agent)["counters"];
    assert_eq!(c["authz_denied"].as_u64(), Some(N), "{c}");
    assert_eq!(c["authz_allowed"].as_u64(), Some(0), "{c}");
    assert_eq!(debug_authz(&agent)["attached_netns"].as_u64(), Some(3));
}
