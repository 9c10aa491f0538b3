//! `kmeshctl explain` against where connections really go (issue #9): the real `kmeshctl` reads a
//! real agent's live snapshot (`/debug/config_dump.bin`), and real clients in pod network
//! namespaces connect through the real programs attached to a test cgroup.
//!
//! One node. A weighted service (70 % to a set of two pods, 30 % to a set of one: asymmetric, so
//! that swapped weights or an even split show); a source-hash service over three pods, with two
//! clients chosen to hash to different endpoints (so that a constant answer shows); a server bound
//! by a policy that denies one client and lets the other in. Checked: each pod's share of the
//! weighted service's connections is explain's percent for it (within 6 points, about 3 standard
//! deviations at 600 connections); every connection of a source-hash client reaches the one
//! endpoint explain names; the denied client's connections are all refused and explain says deny
//! by the policy, the other's all succeed and explain says allow. Also checked on the same agent:
//! `dump bpf --table T` (the kernel's active slot) holds exactly the rows `dump config` (the live
//! snapshot) has for T, for the hash, trie and verdict tables alike.
//!
//! Run as root after `cargo build --workspace --bins` (kmeshctl, kmesh-agent and kmesh-probe).
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    process::Command,
    time::Duration,
};

use kmesh_common::{
    authz::{ANY_CLASS, ANY_PORT, authz_action, authz_policy_kind, authz_reason},
    ipv4_mapped, lb_policy, mode, source_hash,
};
use kmesh_snapshot::builder::{Endpoint, SnapshotBuilder};
use kmesh_tests::{
    Agent, AgentDir, AgentOptions, AgentSource, Pod, ProbeReport, TcpServer, TempPath, TestCgroup,
    TestNetwork, workspace_bin, write_atomically,
};

const NODE: &str = "node-1";
const PORT: u16 = 8080;
/// This test's addresses (agents enrol namespaces by address, machine-wide: no other test uses
/// 10.244.171.0/24).
const SUBNET: u8 = 171;
const VIP_WEIGHTED: Ipv4Addr = Ipv4Addr::new(10, 96, 171, 1);
const VIP_HASH: Ipv4Addr = Ipv4Addr::new(10, 96, 171, 2);
/// Connections to the weighted service, and the tolerance of a share (percentage points).
const WEIGHTED_CONNECTIONS: u32 = 600;
const TOLERANCE: f64 = 6.0;
const HASH_CONNECTIONS: u32 = 30;
const DENY_POLICY: &str = "default/deny-front";

fn addr(host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, SUBNET, host)
}

/// The servers: (pod name, host part of its address).
const SERVERS: [(&str, u8); 7] = [
    ("a1", 101),
    ("a2", 102),
    ("b1", 103),
    ("h1", 111),
    ("h2", 112),
    ("h3", 113),
    ("guarded", 120),
];
const HASHED: [&str; 3] = ["h1", "h2", "h3"];

/// Two client addresses (hosts 10..=99) that hash to different endpoints of a 3-endpoint set:
/// (host of the client the policy denies, host of the other).
fn client_hosts() -> (u8, u8) {
    let index = |host: u8| source_hash(&ipv4_mapped(addr(host).octets())) % 3;
    let front = 10;
    let back = (11..=99)
        .find(|h| index(*h) != index(front))
        .expect("an address of another endpoint");
    (front, back)
}

struct World {
    _net: TestNetwork,
    cgroup: TestCgroup,
    _dir: AgentDir,
    _snapshot_file: TempPath,
    agent: Agent,
    front: Pod,
    back: Pod,
    _servers: Vec<(Pod, TcpServer)>,
}

impl World {
    fn new() -> World {
        kmesh_tests::require_root();
        let name = "explain";
        let net = TestNetwork::new(name).expect("test network");
        let cgroup = TestCgroup::new(name).expect("test cgroup");
        let dir = AgentDir::new(name).expect("pin directory");
        let (front_host, back_host) = client_hosts();
        let front = net.add_pod("front", addr(front_host), None).expect("front");
        let back = net.add_pod("back", addr(back_host), None).expect("back");
        let servers: Vec<(Pod, TcpServer)> = SERVERS
            .iter()
            .map(|(pod, host)| {
                let p = net.add_pod(pod, addr(*host), None).expect("server pod");
                let server = p.serve_tcp(PORT).expect("server");
                (p, server)
            })
            .collect();
        let snapshot_file = TempPath::new(&format!("{name}-snapshot.bin"));
        let snapshot = snapshot(front.ipv4(), back.ipv4());
        write_atomically(snapshot_file.path(), &snapshot.encode().expect("encode"))
            .expect("write snapshot");
        let mut agent = Agent::start(&AgentOptions {
            node_name: NODE,
            source: AgentSource::File(snapshot_file.path()),
            dir: &dir,
            cgroup: &cgroup,
            extra_args: vec![],
        })
        .expect("start kmesh-agent");
        agent
            .wait_ready(Duration::from_secs(20))
            .expect("agent ready");
        let pods = 2 + SERVERS.len() as u64;
        agent
            .wait_for(
                Duration::from_secs(10),
                "every pod enrolled, the authorization program on each",
                |a| {
                    let s = a.debug_snapshot()?;
                    Ok(s["enrolled_netns"] == pods && s["authz_links"] == pods)
                },
            )
            .expect("enrolment");
        World {
            _net: net,
            cgroup,
            _dir: dir,
            _snapshot_file: snapshot_file,
            agent,
            front,
            back,
            _servers: servers,
        }
    }

    fn admin(&self) -> String {
        self.agent.admin_addr().to_string()
    }

    /// `kmeshctl explain -o json` from `from` to `to`, against the agent.
    fn explain(&self, from: Ipv4Addr, to: &str) -> serde_json::Value {
        let admin = self.admin();
        let out = kmeshctl(&[
            "explain",
            "--from",
            &from.to_string(),
            "--to",
            to,
            "--agent",
            &admin,
            "-o",
            "json",
        ]);
        serde_json::from_str(&out).expect("explain -o json is JSON")
    }

    fn probe(&self, from: &Pod, to: &str, count: u32) -> ProbeReport {
        from.run_probe(
            &self.cgroup,
            &[
                "--target",
                to,
                "--count",
                &count.to_string(),
                "--timeout-ms",
                "2000",
            ],
        )
        .expect("probe")
    }

    /// The pod name of a server address (`10.244.171.101:8080` → `a1`).
    fn pod_at(&self, address: &str) -> String {
        let ip: IpAddr = address
            .rsplit_once(':')
            .and_then(|(ip, _)| ip.parse().ok())
            .unwrap_or_else(|| panic!("not IP:PORT: {address}"));
        SERVERS
            .iter()
            .find(|(_, host)| IpAddr::V4(addr(*host)) == ip)
            .map(|(pod, _)| pod.to_string())
            .unwrap_or_else(|| panic!("no server at {address}"))
    }
}

/// The node's snapshot: both clients and every server are workloads; `guarded` is bound by a
/// policy that denies `front` (class 1) and allows everyone else.
fn snapshot(front: Ipv4Addr, back: Ipv4Addr) -> kmesh_snapshot::Snapshot {
    let mut b = SnapshotBuilder::new(NODE, 1, mode::KERNEL_NATIVE);
    let endpoints = |pods: &[&str]| -> Vec<Endpoint> {
        pods.iter()
            .map(|pod| {
                let (_, host) = SERVERS.iter().find(|(p, _)| p == pod).expect("a server");
                Endpoint::new(IpAddr::V4(addr(*host)), PORT, 2)
            })
            .collect()
    };
    let set_a = b.backend_set(lb_policy::RANDOM, &endpoints(&["a1", "a2"]));
    let set_b = b.backend_set(lb_policy::RANDOM, &endpoints(&["b1"]));
    b.service(VIP_WEIGHTED.into(), 80, &[(70, set_a), (30, set_b)]);
    let hashed = b.backend_set(lb_policy::SOURCE_IP_HASH, &endpoints(&HASHED));
    b.service(VIP_HASH.into(), 80, &[(1, hashed)]);

    b.workload(front.into(), 1);
    b.workload(back.into(), 3);
    for (_, host) in SERVERS {
        b.workload(addr(host).into(), 2);
    }
    b.authz_policy(5, authz_policy_kind::AUTHORIZATION_POLICY, DENY_POLICY);
    b.authz_workload(addr(120).into(), 1);
    b.authz_source(front.into(), 32, 1);
    b.authz_source(back.into(), 32, 3);
    b.authz_verdict(
        1,
        ANY_CLASS,
        ANY_PORT,
        authz_action::ALLOW,
        authz_reason::NO_ALLOW_POLICY,
        0,
    );
    b.authz_verdict(
        1,
        1,
        ANY_PORT,
        authz_action::DENY,
        authz_reason::DENY_MATCHED,
        5,
    );
    b.build()
}

fn kmeshctl(args: &[&str]) -> String {
    let out =
        Command::new(workspace_bin("kmeshctl").expect("the kmeshctl binary (cargo build --bins)"))
            .args(args)
            .output()
            .expect("run kmeshctl");
    assert!(
        out.status.success(),
        "kmeshctl {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// Explain's share of each pod, over every destination of the explanation.
fn explained_shares(w: &World, explanation: &serde_json::Value) -> BTreeMap<String, f64> {
    let mut shares = BTreeMap::new();
    for destination in explanation["destinations"]
        .as_array()
        .expect("destinations")
    {
        for endpoint in destination["endpoints"].as_array().expect("endpoints") {
            let pod = w.pod_at(endpoint["address"].as_str().expect("an address"));
            *shares.entry(pod).or_insert(0.0) += endpoint["percent"].as_f64().expect("a percent");
        }
    }
    shares
}

/// One agent for both checks (they share the test's addresses, which only one agent may enrol).
#[test]
fn explain_and_the_dumps_agree_with_the_kernel() {
    let w = World::new();
    the_kernels_maps_hold_the_live_snapshot(&w);
    explain_agrees_with_where_connections_go(&w);
}

fn explain_agrees_with_where_connections_go(w: &World) {
    let mut failures = Vec::new();

    // The weighted service: each pod's observed share is explain's.
    let to = format!("{VIP_WEIGHTED}:80");
    let explanation = w.explain(w.front.ipv4(), &to);
    assert_eq!(explanation["steering"], "service", "{explanation:#}");
    let expected = explained_shares(w, &explanation);
    let admin = w.admin();
    let front = w.front.ipv4().to_string();
    let text = kmeshctl(&["explain", "--from", &front, "--to", &to, "--agent", &admin]);
    println!("kmeshctl explain --from {front} --to {to}:\n{text}");
    if !(text.contains(&format!("to {to}: service")) && text.contains("70.0%  backend set #1")) {
        failures.push(format!(
            "the text does not show the 70 % destination:\n{text}"
        ));
    }
    let report = w.probe(&w.front, &to, WEIGHTED_CONNECTIONS);
    assert_eq!(report.ok, u64::from(WEIGHTED_CONNECTIONS), "{report:?}");
    for (pod, percent) in &expected {
        let observed = 100.0 * report.replies(pod) as f64 / f64::from(WEIGHTED_CONNECTIONS);
        println!("weighted: {pod} explained {percent:.1} %, observed {observed:.1} %");
        if (observed - percent).abs() > TOLERANCE {
            failures.push(format!(
                "{pod}: explain says {percent:.1} %, connections went {observed:.1} %"
            ));
        }
    }
    let reached: Vec<&String> = report.by_reply.keys().collect();
    let explained: Vec<&String> = expected.keys().collect();
    if reached != explained {
        failures.push(format!(
            "connections reached {reached:?}, explain names {explained:?}"
        ));
    }

    // The source-hash service: each client reaches exactly the endpoint explain names.
    let to = format!("{VIP_HASH}:80");
    let mut chosen = Vec::new();
    for client in [&w.front, &w.back] {
        let explanation = w.explain(client.ipv4(), &to);
        let shares = explained_shares(w, &explanation);
        let named: Vec<&String> = shares
            .iter()
            .filter(|(_, p)| **p > 0.0)
            .map(|(pod, _)| pod)
            .collect();
        let report = w.probe(client, &to, HASH_CONNECTIONS);
        println!(
            "hash: client {} explained {named:?}, reached {:?}",
            client.ipv4(),
            report.by_reply
        );
        match named.as_slice() {
            [pod] if report.replies(pod) == u64::from(HASH_CONNECTIONS) => {
                chosen.push(pod.to_string())
            }
            _ => failures.push(format!(
                "client {}: explain names {named:?}, connections reached {:?}",
                client.ipv4(),
                report.by_reply
            )),
        }
    }
    if chosen.len() == 2 && chosen[0] == chosen[1] {
        failures.push(format!(
            "both clients were explained and sent to {}: the data does not tell endpoints apart",
            chosen[0]
        ));
    }

    // The guarded server: explain's verdict is what the kernel did.
    let to = format!("{}:{PORT}", addr(120));
    for (client, allowed) in [(&w.front, false), (&w.back, true)] {
        let explanation = w.explain(client.ipv4(), &to);
        let verdict = &explanation["direct"];
        let from = client.ipv4().to_string();
        let admin = w.admin();
        let text = kmeshctl(&["explain", "--from", &from, "--to", &to, "--agent", &admin]);
        println!("kmeshctl explain --from {from} --to {to}:\n{text}");
        let report = w.probe(client, &to, 10);
        println!(
            "guarded: client {} explained {verdict}, connections {report:?}",
            client.ipv4()
        );
        let explained_allow = verdict["action"] == "allow";
        let kernel_allowed = report.ok == 10;
        let kernel_refused = report.errors_of("ECONNREFUSED") == 10;
        if explained_allow != allowed
            || !(if allowed {
                kernel_allowed
            } else {
                kernel_refused
            })
        {
            failures.push(format!(
                "client {}: explain says {verdict}, connections {report:?}",
                client.ipv4()
            ));
        }
        if !allowed && verdict["policy"] != DENY_POLICY {
            failures.push(format!(
                "the deny names {}, not {DENY_POLICY}",
                verdict["policy"]
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `/debug/bpf/<table>` reads the kernel's active slot: the same rows as the live snapshot's
/// `config_dump`, for every kind of map (hash maps, the sources' LPM trie, the verdicts with their
/// policy names).
fn the_kernels_maps_hold_the_live_snapshot(w: &World) {
    let admin = w.admin();
    let config: serde_json::Value =
        serde_json::from_str(&kmeshctl(&["dump", "config", "--agent", &admin])).expect("JSON");
    assert_eq!(config["header"]["generation"], 1, "{config:#}");
    let live = w.agent.debug_snapshot().expect("/debug/snapshot");
    assert_eq!(
        config["header"]["content_hash"],
        live["live"]["content_hash"]
    );
    for (table, rows) in [
        ("services", &config["services"]),
        ("routes", &config["routes"]),
        ("backend_sets", &config["backend_sets"]),
        ("endpoints", &config["endpoints"]),
        ("authz_workloads", &config["authz"]["workloads"]),
        ("authz_sources", &config["authz"]["sources"]),
        ("authz_verdicts", &config["authz"]["verdicts"]),
    ] {
        let dump: serde_json::Value = serde_json::from_str(&kmeshctl(&[
            "dump", "bpf", "--table", table, "--agent", &admin,
        ]))
        .expect("JSON");
        assert_eq!(dump["generation"], 1, "{table}: {dump:#}");
        assert!(
            rows.as_array().is_some_and(|r| !r.is_empty()),
            "{table}: the test data has no rows"
        );
        assert_eq!(
            &dump["records"], rows,
            "{table}: the kernel holds other rows"
        );
    }
    let (code, body) = w.agent.http_get("/debug/bpf/nat").expect("GET");
    assert_eq!(code, 404);
    assert!(
        body.contains("the tables are: generation, services"),
        "{body}"
    );
}
