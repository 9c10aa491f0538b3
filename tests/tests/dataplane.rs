//! End-to-end data plane tests on the real kernel: the real `kmesh-agent` binary loads the real
//! programs into this machine's kernel, attached to a test cgroup; clients run in test network
//! namespaces with no route out, so a connect that is not rewritten fails locally (ENETUNREACH).
//!
//! Run as root after `cargo build --workspace --bins` (scripts/test.sh does both).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    sync::atomic::{AtomicU8, Ordering},
    time::{Duration, Instant},
};

use kmesh_common::{
    BackendSetRecord, BackendSetValue, EndpointKey, EndpointRecord, EndpointValue, IPPROTO_TCP,
    RouteRecord, RouteValue, ServiceKey, ServiceRecord, ServiceValue, ip16, ipv4_mapped, lb_policy,
    mode, source_hash,
};
use kmesh_snapshot::builder::{Endpoint, SnapshotBuilder};
use kmesh_tests::{
    Agent, AgentDir, AgentOptions, AgentSource, Pod, ProbeReport, StopFile, TcpServer, TestCgroup,
    TestNetwork,
    probe::{Outcome, TimedAttempt},
    write_atomically,
};

const NODE: &str = "node-1";
const TARGET_PORT: u16 = 8080;
const VIP_ALL: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const VIP_90_10: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const VIP_50_30_20: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 12);
const VIP_EMPTY: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 13);
const VIP_HASH: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 14);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
const READY: Duration = Duration::from_secs(20);

/// One test's node: a client pod (enrolled), backend pods each serving TARGET_PORT, a test cgroup
/// the programs attach to, a private pin directory and a snapshot file.
struct World {
    /// Third octet of this world's pod addresses: tests run in parallel, and every agent scans every
    /// namespace on the machine, so pod IPs must not repeat across worlds (as on a real node).
    subnet: u8,
    net: TestNetwork,
    cgroup: TestCgroup,
    dir: AgentDir,
    client: Pod,
    backends: Vec<(Pod, TcpServer)>,
    snapshot_file: PathBuf,
}

impl World {
    fn new(name: &str, backends: &[&str]) -> World {
        static NEXT_SUBNET: AtomicU8 = AtomicU8::new(1);
        let subnet = NEXT_SUBNET.fetch_add(1, Ordering::Relaxed);
        let net = TestNetwork::new(name).expect("test network");
        let cgroup = TestCgroup::new(name).expect("test cgroup");
        let dir = AgentDir::new(name).expect("pin directory");
        let client = net
            .add_pod(
                "client",
                Ipv4Addr::new(10, 244, subnet, 10),
                Some(v6(subnet, 10)),
            )
            .expect("client pod");
        let backends = backends
            .iter()
            .enumerate()
            .map(|(i, pod)| {
                let host = i as u8 + 100;
                let p = net
                    .add_pod(
                        pod,
                        Ipv4Addr::new(10, 244, subnet, host),
                        Some(v6(subnet, host)),
                    )
                    .expect("backend pod");
                let server = p.serve_tcp(TARGET_PORT).expect("backend server");
                (p, server)
            })
            .collect();
        let snapshot_file =
            std::env::temp_dir().join(format!("kmt-{name}-{}.snap", std::process::id()));
        World {
            subnet,
            net,
            cgroup,
            dir,
            client,
            backends,
            snapshot_file,
        }
    }

    fn backend(&self, name: &str) -> &Pod {
        &self
            .backends
            .iter()
            .find(|(p, _)| p.name() == name)
            .unwrap_or_else(|| panic!("no backend {name}"))
            .0
    }

    fn endpoints(&self, names: &[&str]) -> Vec<Endpoint> {
        names
            .iter()
            .map(|n| Endpoint::new(IpAddr::V4(self.backend(n).ipv4()), TARGET_PORT, 1))
            .collect()
    }

    fn endpoints6(&self, names: &[&str]) -> Vec<Endpoint> {
        names
            .iter()
            .map(|n| {
                Endpoint::new(
                    IpAddr::V6(self.backend(n).ipv6().expect("v6")),
                    TARGET_PORT,
                    1,
                )
            })
            .collect()
    }

    fn builder(&self, generation: u64, node_mode: u32) -> SnapshotBuilder {
        let mut b = SnapshotBuilder::new(NODE, generation, node_mode);
        b.workload(IpAddr::V4(self.client.ipv4()), 7);
        b
    }

    fn write(&self, snapshot: &kmesh_snapshot::Snapshot) {
        write_atomically(&self.snapshot_file, &snapshot.encode().expect("encode"))
            .expect("write snapshot");
    }

    fn start_agent(&self, extra_args: &[&str]) -> Agent {
        let mut agent = Agent::start(&AgentOptions {
            node_name: NODE,
            source: AgentSource::File(&self.snapshot_file),
            dir: &self.dir,
            cgroup: &self.cgroup,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
        })
        .expect("start kmesh-agent");
        agent.wait_ready(READY).expect("agent ready");
        agent
    }

    /// `count` connects from the client to `target` (ip:port).
    fn probe(&self, target: &str, count: u32) -> ProbeReport {
        self.probe_from(&self.client, target, count)
    }

    fn probe_from(&self, pod: &Pod, target: &str, count: u32) -> ProbeReport {
        pod.run_probe(
            &self.cgroup,
            &[
                "--target",
                target,
                "--count",
                &count.to_string(),
                "--timeout-ms",
                "2000",
            ],
        )
        .expect("probe")
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.snapshot_file);
    }
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

impl World {
    /// Another address in this world's subnet.
    fn ip(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, self.subnet, host)
    }
}

fn target(ip: Ipv4Addr) -> String {
    format!("{ip}:80")
}

fn live_generation(agent: &Agent) -> Option<u64> {
    agent.debug_snapshot().ok()?["live"]["generation"].as_u64()
}

fn wait_generation(agent: &mut Agent, generation: u64) {
    agent
        .wait_for(
            Duration::from_secs(10),
            &format!("generation {generation} live"),
            |a| Ok(live_generation(a) == Some(generation)),
        )
        .expect("generation applied");
}

fn wait_enrolled(agent: &mut Agent, n: u64) {
    agent
        .wait_for(
            Duration::from_secs(5),
            &format!("{n} enrolled netns"),
            |a| Ok(a.debug_snapshot()?["enrolled_netns"].as_u64() == Some(n)),
        )
        .expect("enrolment");
}

#[test]
fn load_balancing_reaches_every_endpoint_and_honours_weights() {
    let w = World::new("lb", &["a", "b", "c"]);
    let mut b = w.builder(1, mode::KERNEL_NATIVE);
    let all = b.backend_set(lb_policy::RANDOM, &w.endpoints(&["a", "b", "c"]));
    let only_a = b.backend_set(lb_policy::RANDOM, &w.endpoints(&["a"]));
    let only_b = b.backend_set(lb_policy::RANDOM, &w.endpoints(&["b"]));
    let only_c = b.backend_set(lb_policy::RANDOM, &w.endpoints(&["c"]));
    b.service(VIP_ALL.into(), 80, &[(1, all)]);
    b.service(VIP_90_10.into(), 80, &[(90, only_a), (10, only_b)]);
    b.service(
        VIP_50_30_20.into(),
        80,
        &[(50, only_a), (30, only_b), (20, only_c)],
    );
    w.write(&b.build());
    let mut agent = w.start_agent(&[]);
    wait_enrolled(&mut agent, 1);

    let every = w.probe(&target(VIP_ALL), 300);
    println!("uniform over a, b, c: {every:?}");
    assert_eq!(every.ok, 300, "{every:?}");
    for pod in ["a", "b", "c"] {
        assert!(every.replies(pod) > 0, "{pod} never reached: {every:?}");
    }

    let split = w.probe(&target(VIP_90_10), 2000);
    assert_eq!(split.ok, 2000, "{split:?}");
    split.assert_share("a", 0.9);
    split.assert_share("b", 0.1);

    let split3 = w.probe(&target(VIP_50_30_20), 3000);
    assert_eq!(split3.ok, 3000, "{split3:?}");
    split3.assert_share("a", 0.5);
    split3.assert_share("b", 0.3);
    split3.assert_share("c", 0.2);

    // A direct connect to a pod IP is not a service: untouched, and it works.
    let direct = w.probe(&format!("{}:{TARGET_PORT}", w.backend("c").ipv4()), 20);
    assert_eq!(direct.replies("c"), 20, "{direct:?}");

    let counters = &agent.debug_snapshot().unwrap()["counters"];
    assert!(
        counters["rewritten"].as_u64().unwrap() >= 5300,
        "{counters}"
    );
}

/// Many backend sets share each shard of the kernel's endpoints arrays (192 sets over 64 shards):
/// a set's endpoints are found at its offset in its shard's array (`BackendSetEntry`), so each
/// service must reach its own set's pods and never a neighbour's. The sets alternate between one
/// and two endpoints, so an offset is not a set's position in its shard, and neighbours in a
/// shard name different pods, so a wrong offset lands on a pod the service does not have.
#[test]
fn every_backend_set_reaches_its_own_endpoints_when_sets_share_shards() {
    const PODS: [&str; 3] = ["a", "b", "c"];
    const SETS: u8 = 192;
    let w = World::new("shards", &PODS);
    let mut b = w.builder(1, mode::KERNEL_NATIVE);
    let mut services = Vec::new();
    let mut sets_per_shard = BTreeMap::<u32, u32>::new();
    for i in 0..SETS {
        let first = PODS[usize::from(i) % 3];
        let pods: Vec<&str> = if i % 2 == 0 {
            vec![first]
        } else {
            vec![first, PODS[(usize::from(i) + 1) % 3]]
        };
        let set = b.backend_set(lb_policy::RANDOM, &w.endpoints(&pods));
        *sets_per_shard
            .entry(kmesh_common::shard::shard_of_backend_set(set))
            .or_default() += 1;
        let vip = Ipv4Addr::new(10, 96, 7, i);
        b.service(vip.into(), 80, &[(1, set)]);
        services.push((vip, pods));
    }
    let shared = sets_per_shard.values().filter(|&&n| n >= 2).count();
    assert!(
        shared >= 32,
        "the sets must share shards: {sets_per_shard:?}"
    );
    w.write(&b.build());
    let mut agent = w.start_agent(&[]);
    wait_enrolled(&mut agent, 1);

    for (vip, pods) in &services {
        let report = w.probe(&target(*vip), 6);
        assert_eq!(report.ok, 6, "{vip}: {report:?}");
        for pod in PODS.iter().filter(|p| !pods.contains(p)) {
            assert_eq!(
                report.replies(pod),
                0,
                "{vip} (set of {pods:?}) reached {pod}: {report:?}"
            );
        }
    }
}

/// Clients of a `consistentHash.useSourceIp` service for which `source_hash(ip) % 3` (the one
/// definition the kernel runs) names every endpoint of `endpoints` at least twice: the first
/// such addresses of this world's subnet from .40 on, each with the pod it must always reach.
fn hash_clients<'a>(w: &World, endpoints: &[&'a str]) -> Vec<(Ipv4Addr, &'a str)> {
    const PER_ENDPOINT: usize = 2;
    let mut clients = Vec::new();
    let mut per_endpoint = vec![0; endpoints.len()];
    for host in 40..=250 {
        let ip = w.ip(host);
        let index = source_hash(&ipv4_mapped(ip.octets())) as usize % endpoints.len();
        if per_endpoint[index] < PER_ENDPOINT {
            per_endpoint[index] += 1;
            clients.push((ip, endpoints[index]));
        }
        if per_endpoint.iter().all(|&n| n == PER_ENDPOINT) {
            return clients;
        }
    }
    panic!(
        "source_hash over {endpoints:?} leaves an endpoint without two clients in .40-.250: {per_endpoint:?}"
    );
}

/// Source-IP hashing: each client always lands on the endpoint `source_hash(its workload IP) % n`
/// predicts, and clients together reach every endpoint (a constant or different hash fails).
#[test]
fn source_ip_hash_pins_each_client_to_its_predicted_endpoint() {
    const ENDPOINTS: [&str; 3] = ["a", "b", "c"];
    let w = World::new("hash", &ENDPOINTS);
    let clients = hash_clients(&w, &ENDPOINTS);
    let mut b = w.builder(1, mode::KERNEL_NATIVE);
    for (ip, _) in &clients {
        b.workload(IpAddr::V4(*ip), 9);
    }
    let hashed = b.backend_set(lb_policy::SOURCE_IP_HASH, &w.endpoints(&ENDPOINTS));
    b.service(VIP_HASH.into(), 80, &[(1, hashed)]);
    w.write(&b.build());
    let pods: Vec<(Pod, &str)> = clients
        .iter()
        .enumerate()
        .map(|(i, (ip, expected))| {
            let pod = w
                .net
                .add_pod(&format!("hash{i}"), *ip, None)
                .expect("client pod");
            (pod, *expected)
        })
        .collect();
    let mut agent = w.start_agent(&[]);
    wait_enrolled(&mut agent, 1 + clients.len() as u64);

    let mut reached = BTreeSet::new();
    for (pod, expected) in &pods {
        let report = w.probe_from(pod, &target(VIP_HASH), 50);
        println!(
            "client {} (source_hash % 3 -> {expected}): {:?}",
            pod.ipv4(),
            report.by_reply
        );
        assert_eq!(
            report.replies(expected),
            50,
            "client {} should always reach {expected}, as source_hash predicts: {report:?}",
            pod.ipv4()
        );
        reached.insert(*expected);
    }
    assert_eq!(
        reached,
        BTreeSet::from(ENDPOINTS),
        "clients should cover every endpoint"
    );
}

#[test]
fn ipv6_and_ipv4_mapped_sockets_are_rewritten() {
    let w = World::new("ipv6", &["a", "b"]);
    let mut b = w.builder(1, mode::KERNEL_NATIVE);
    let v4 = b.backend_set(lb_policy::RANDOM, &w.endpoints(&["a", "b"]));
    let v6set = b.backend_set(lb_policy::RANDOM, &w.endpoints6(&["a", "b"]));
    b.service(VIP_ALL.into(), 80, &[(1, v4)]);
    b.service(VIP6.into(), 80, &[(1, v6set)]);
    w.write(&b.build());
    let mut agent = w.start_agent(&[]);
    wait_enrolled(&mut agent, 1);

    let v6report = w.probe(&format!("[{VIP6}]:80"), 200);
    assert_eq!(v6report.ok, 200, "IPv6 VIP: {v6report:?}");
    assert!(
        v6report.replies("a") > 0 && v6report.replies("b") > 0,
        "{v6report:?}"
    );

    // An AF_INET6 socket dialing the IPv4 VIP as ::ffff:10.96.0.10.
    let mapped = w
        .client
        .run_probe(
            &w.cgroup,
            &[
                "--target",
                &target(VIP_ALL),
                "--socket",
                "v6",
                "--count",
                "200",
                "--timeout-ms",
                "2000",
            ],
        )
        .expect("probe");
    assert_eq!(mapped.ok, 200, "IPv4-mapped on an IPv6 socket: {mapped:?}");
    assert!(
        mapped.replies("a") > 0 && mapped.replies("b") > 0,
        "{mapped:?}"
    );
}

#[test]
fn unenrolled_disabled_and_endpointless_traffic() {
    let w = World::new("pass", &["a"]);
    let outsider = w
        .net
        .add_pod("outsider", w.ip(20), None)
        .expect("outsider pod");
    let mut b = w.builder(1, mode::KERNEL_NATIVE);
    let a = b.backend_set(lb_policy::RANDOM, &w.endpoints(&["a"]));
    let empty = b.backend_set(lb_policy::RANDOM, &[]);
    b.service(VIP_ALL.into(), 80, &[(1, a)]);
    b.service(VIP_EMPTY.into(), 80, &[(1, empty)]);
    w.write(&b.build());
    let mut agent = w.start_agent(&[]);
    wait_enrolled(&mut agent, 1);

    // Enrolled client: rewritten.
    assert_eq!(w.probe(&target(VIP_ALL), 20).replies("a"), 20);

    // A namespace that is not in the snapshot's workloads is untouched: its connect to the VIP
    // goes nowhere (no route out).
    let untouched = w.probe_from(&outsider, &target(VIP_ALL), 20);
    assert_eq!(
        untouched.errors_of("ENETUNREACH"),
        20,
        "non-enrolled netns was steered: {untouched:?}"
    );

    // A service without endpoints fails fast with ECONNREFUSED (not a timeout on a dead VIP).
    let started = Instant::now();
    let refused = w.probe(&target(VIP_EMPTY), 20);
    assert_eq!(refused.errors_of("ECONNREFUSED"), 20, "{refused:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refusals were slow: {:?}",
        started.elapsed()
    );

    // Disabled: a new snapshot that says pass; the enrolled client is no longer steered.
    let mut b = w.builder(2, mode::DISABLED);
    let a = b.backend_set(lb_policy::RANDOM, &w.endpoints(&["a"]));
    b.service(VIP_ALL.into(), 80, &[(1, a)]);
    w.write(&b.build());
    wait_generation(&mut agent, 2);
    let disabled = w.probe(&target(VIP_ALL), 20);
    assert_eq!(
        disabled.errors_of("ENETUNREACH"),
        20,
        "Disabled still steered: {disabled:?}"
    );
}

/// A workload whose namespace appears after the agent started is enrolled within 2 s, and one
/// whose namespace disappears is dropped within 2 s.
#[test]
fn namespaces_that_appear_and_disappear_are_picked_up() {
    let w = World::new("enrol", &["a"]);
    let late_ip = w.ip(30);
    let mut b = w.builder(1, mode::KERNEL_NATIVE);
    b.workload(late_ip.into(), 8);
    let a = b.backend_set(lb_policy::RANDOM, &w.endpoints(&["a"]));
    b.service(VIP_ALL.into(), 80, &[(1, a)]);
    w.write(&b.build());
    let mut agent = w.start_agent(&[]);
    wait_enrolled(&mut agent, 1);

    let late = w.net.add_pod("late", late_ip, None).expect("late pod");
    let appeared = Instant::now();
    wait_enrolled(&mut agent, 2);
    println!("new namespace enrolled after {:?}", appeared.elapsed());
    assert!(appeared.elapsed() < Duration::from_secs(2));
    assert_eq!(w.probe_from(&late, &target(VIP_ALL), 10).replies("a"), 10);

    w.net.remove_pod("late").expect("remove late pod");
    let gone = Instant::now();
    wait_enrolled(&mut agent, 1);
    println!("removed namespace dropped after {:?}", gone.elapsed());
    assert!(gone.elapsed() < Duration::from_secs(2));
}

/// The three shapes of the swap test's one service (VIP_ALL:80); generation g takes shape g % 3.
/// They share no id and no endpoint and differ in endpoint count, so a read that mixes two
/// generations finds its route, set or endpoint missing (a refusal, counted `inconsistent`)
/// instead of valid entries, and every reply names the shape, hence the generation, that chose
/// it. Three, not two: the agent's two slots alternate, and a stale slot (generation g - 1 where
/// g + 1 should be) must not look right.
struct SwapShape {
    service_id: u32,
    route_id: u32,
    set_id: u32,
    pods: &'static [&'static str],
}

const SWAP_SHAPES: [SwapShape; 3] = [
    SwapShape {
        service_id: 100,
        route_id: 10,
        set_id: 1,
        pods: &["a", "b"],
    },
    SwapShape {
        service_id: 211,
        route_id: 21,
        set_id: 2,
        pods: &["c", "d", "e"],
    },
    SwapShape {
        service_id: 322,
        route_id: 32,
        set_id: 3,
        pods: &["f"],
    },
];

fn swap_shape(generation: u64) -> &'static SwapShape {
    &SWAP_SHAPES[(generation % 3) as usize]
}

/// Generation `generation` of the swap test, with the ids of its shape written out (the builder
/// numbers every snapshot's ids from 1, which would make both shapes share them).
fn alternating_snapshot(w: &World, generation: u64) -> kmesh_snapshot::Snapshot {
    let shape = swap_shape(generation);
    let mut snapshot = w.builder(generation, mode::KERNEL_NATIVE).build();
    for (index, endpoint) in w.endpoints(shape.pods).iter().enumerate() {
        snapshot.endpoints.push(EndpointRecord {
            key: EndpointKey {
                set_id: shape.set_id,
                index: index as u32,
            },
            value: EndpointValue {
                ip: ip16(endpoint.ip),
                port: endpoint.port,
                pad: 0,
                identity: endpoint.identity,
            },
        });
    }
    snapshot.backend_sets.push(BackendSetRecord {
        set_id: shape.set_id,
        value: BackendSetValue {
            endpoint_count: shape.pods.len() as u32,
            lb_policy: lb_policy::RANDOM,
        },
    });
    snapshot.routes.push(RouteRecord {
        route_id: shape.route_id,
        value: RouteValue::from_weights([(1, shape.set_id)]).expect("one destination"),
    });
    snapshot.services.push(ServiceRecord {
        key: ServiceKey {
            ip: ip16(VIP_ALL.into()),
            port: 80,
            protocol: IPPROTO_TCP,
            pad: 0,
        },
        value: ServiceValue {
            service_id: shape.service_id,
            route_id: shape.route_id,
            flags: 0,
        },
    });
    snapshot.sort();
    snapshot
}

fn start_continuous_probe(w: &World, stop: &StopFile, extra: &[&str]) -> kmesh_tests::ProbeHandle {
    let target = target(VIP_ALL);
    let mut args = vec![
        "--target",
        &target,
        "--until-file",
        stop.arg(),
        "--timeout-ms",
        "2000",
    ];
    args.extend_from_slice(extra);
    w.client
        .spawn_probe(&w.cgroup, &args)
        .expect("continuous probe")
}

/// One flip from the agent's `recent_flips`: `generation` went live between the two times.
#[derive(Debug)]
struct FlipTime {
    generation: u64,
    between_ns: [u64; 2],
}

/// The agent's recent flips; asserts they are `generations`, in order, one after the other.
fn flip_times(
    status: &serde_json::Value,
    generations: std::ops::RangeInclusive<u64>,
) -> Vec<FlipTime> {
    let flips: Vec<FlipTime> = status["recent_flips"]
        .as_array()
        .unwrap_or_else(|| panic!("no recent_flips in the agent's status: {status}"))
        .iter()
        .map(|f| FlipTime {
            generation: f["generation"].as_u64().expect("flip generation"),
            between_ns: [
                f["between_ns"][0].as_u64().expect("flip time"),
                f["between_ns"][1].as_u64().expect("flip time"),
            ],
        })
        .collect();
    let listed: Vec<u64> = flips.iter().map(|f| f.generation).collect();
    assert_eq!(listed, generations.collect::<Vec<_>>(), "the agent's flips");
    for pair in flips.windows(2) {
        assert!(
            pair[0].between_ns[0] <= pair[0].between_ns[1]
                && pair[0].between_ns[1] <= pair[1].between_ns[0],
            "flip times out of order: {pair:?}"
        );
    }
    flips
}

/// Checks every attempt of a `--timeline` probe against the flips: it must have succeeded, with a
/// reply from a pod of a generation that may have been live during its connect() — generation i
/// may be live from just before its flip until just after the next one. Returns the attempts
/// that broke this (described) and how many connects overlapped a flip.
fn check_timeline(timeline: &[TimedAttempt], flips: &[FlipTime]) -> (Vec<String>, usize) {
    // May-be-live-until time of each generation; increasing, as the flips are in order.
    let live_until: Vec<u64> = (0..flips.len())
        .map(|i| flips.get(i + 1).map_or(u64::MAX, |next| next.between_ns[1]))
        .collect();
    let mut violations = Vec::new();
    let mut overlapping = 0;
    for attempt in timeline {
        let [start, end] = attempt.connect_ns;
        let first = live_until.partition_point(|&until| until < start);
        let live: Vec<u64> = flips[first..]
            .iter()
            .take_while(|f| f.between_ns[0] <= end)
            .map(|f| f.generation)
            .collect();
        if live.len() > 1 {
            overlapping += 1;
        }
        let explained = match &attempt.outcome {
            Outcome::Reply(pod) => live
                .iter()
                .any(|&g| swap_shape(g).pods.contains(&pod.as_str())),
            Outcome::Error(_) => false,
        };
        if !explained {
            violations.push(format!(
                "connect {start}..{end} ns got {:?}; generations possibly live then: {live:?}",
                attempt.outcome
            ));
        }
    }
    (violations, overlapping)
}

/// 200 swaps while one client connects without pause: no connect fails, none is refused as
/// inconsistent, and every reply comes from the generation that was live during its connect().
#[test]
fn swap_under_load_never_mixes_or_fails() {
    const SWAPS: u64 = 200;
    let w = World::new("swap", &["a", "b", "c", "d", "e", "f"]);
    w.write(&alternating_snapshot(&w, 1));
    let mut agent = w.start_agent(&[]);
    wait_enrolled(&mut agent, 1);

    let stop = StopFile::new("swap");
    let probe = start_continuous_probe(&w, &stop, &["--timeline"]);
    let started = Instant::now();
    for generation in 2..=SWAPS + 1 {
        w.write(&alternating_snapshot(&w, generation));
        wait_generation(&mut agent, generation);
    }
    let swap_time = started.elapsed();
    stop.signal().expect("stop probe");
    let report = probe
        .wait_timeout(Duration::from_secs(30))
        .expect("probe report");
    let status = agent.debug_snapshot().unwrap();
    let flips = flip_times(&status, 1..=SWAPS + 1);
    let (violations, overlapping) = check_timeline(&report.timeline, &flips);
    println!(
        "swap under load: {SWAPS} swaps in {swap_time:?}; connections {} ok {} failed {} by endpoint {:?} \
         errors {:?}; {overlapping} connects overlapped a flip; {} not from a generation live during \
         their connect; agent applied {}, counters {}",
        report.attempts,
        report.ok,
        report.failed,
        report.by_reply,
        report.errors,
        violations.len(),
        status["applied"],
        status["counters"]
    );
    assert!(
        violations.is_empty(),
        "{} connects were not served by a generation live during their connect(); first ones:\n{}",
        violations.len(),
        violations[..violations.len().min(10)].join("\n")
    );
    assert_eq!(report.failed, 0, "{:?}", report.errors);
    assert_eq!(report.timeline.len() as u64, report.attempts);
    assert!(
        report.ok >= 1000,
        "too few connections to mean anything: {} ok",
        report.ok
    );
    let reached: BTreeSet<&str> = report.by_reply.keys().map(String::as_str).collect();
    let every: BTreeSet<&str> = SWAP_SHAPES
        .iter()
        .flat_map(|shape| shape.pods.iter().copied())
        .collect();
    assert_eq!(reached, every, "{:?}", report.by_reply);
    assert_eq!(status["applied"].as_u64(), Some(SWAPS + 1), "{status}");
    assert_eq!(
        status["counters"]["inconsistent"].as_u64(),
        Some(0),
        "{}",
        status["counters"]
    );
}

#[test]
fn sigkill_and_restart_under_load_keep_traffic_flowing() {
    let w = World::new("restart", &["a", "b"]);
    let mut b = w.builder(5, mode::KERNEL_NATIVE);
    let set = b.backend_set(lb_policy::RANDOM, &w.endpoints(&["a", "b"]));
    b.service(VIP_ALL.into(), 80, &[(1, set)]);
    w.write(&b.build());
    let mut agent = w.start_agent(&[]);
    wait_enrolled(&mut agent, 1);
    let before = agent.debug_snapshot().unwrap();
    assert_eq!(before["adopted_pins"], false);

    let stop = StopFile::new("restart");
    let probe = start_continuous_probe(&w, &stop, &[]);
    std::thread::sleep(Duration::from_millis(500));
    agent.kill().expect("SIGKILL agent");
    // No agent at all for a while: the pinned links and maps carry the traffic.
    std::thread::sleep(Duration::from_secs(2));
    let mut restarted = w.start_agent(&[]);
    let after = restarted.debug_snapshot().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    stop.signal().expect("stop probe");
    let report = probe
        .wait_timeout(Duration::from_secs(30))
        .expect("probe report");
    println!(
        "restart under load: connections {} ok {} failed {} by endpoint {:?}",
        report.attempts, report.ok, report.failed, report.by_reply
    );
    assert_eq!(report.failed, 0, "{report:?}");
    assert!(
        report.replies("a") > 0 && report.replies("b") > 0,
        "{report:?}"
    );
    assert_eq!(after["adopted_pins"], true, "{after}");
    assert_eq!(after["links"], before["links"], "links were re-attached");
    assert_eq!(
        after["unchanged"].as_u64(),
        Some(1),
        "the same generation was re-applied: {after}"
    );
    assert_eq!(after["applied"].as_u64(), Some(0), "{after}");
    wait_enrolled(&mut restarted, 1);
}

#[test]
fn corrupt_truncated_and_oversized_snapshots_are_refused_whole() {
    let w = World::new("reject", &["a", "b"]);
    let mut b = w.builder(1, mode::KERNEL_NATIVE);
    let a = b.backend_set(lb_policy::RANDOM, &w.endpoints(&["a"]));
    b.service(VIP_ALL.into(), 80, &[(1, a)]);
    w.write(&b.build());
    let mut agent = w.start_agent(&["--max-services", "2"]);
    wait_enrolled(&mut agent, 1);

    // The next snapshot would move the VIP to b; every broken form of it must change nothing.
    let mut b = w.builder(2, mode::KERNEL_NATIVE);
    let to_b = b.backend_set(lb_policy::RANDOM, &w.endpoints(&["b"]));
    b.service(VIP_ALL.into(), 80, &[(1, to_b)]);
    let good = b.build().encode().unwrap();

    // A byte of the first service record (after the cluster part's first section header): a
    // record byte, which only the content hash covers (format 4 reads the sections' framing
    // first, so a flipped header byte is refused as framing).
    let mut corrupt = good.clone();
    let cluster = u64::from_le_bytes(corrupt[40..48].try_into().unwrap()) as usize;
    corrupt[cluster + 16 + 4] ^= 0xff;
    let truncated = good[..good.len() / 2].to_vec();
    let mut b = w.builder(2, mode::KERNEL_NATIVE);
    let to_b = b.backend_set(lb_policy::RANDOM, &w.endpoints(&["b"]));
    for i in 0..3u8 {
        b.service(Ipv4Addr::new(10, 96, 1, i).into(), 80, &[(1, to_b)]);
    }
    let oversized = b.build().encode().unwrap();
    let other_node = {
        let mut b = SnapshotBuilder::new("node-2", 2, mode::KERNEL_NATIVE);
        let to_b = b.backend_set(lb_policy::RANDOM, &w.endpoints(&["b"]));
        b.service(VIP_ALL.into(), 80, &[(1, to_b)]);
        b.build().encode().unwrap()
    };

    let cases: [(&str, Vec<u8>, &str); 5] = [
        ("corrupt", corrupt, "hash"),
        ("truncated", truncated, "truncated"),
        ("over capacity", oversized, "capacity"),
        ("another node's", other_node, "node"),
        ("garbage", b"not a snapshot".to_vec(), "magic"),
    ];
    for (i, (what, bytes, reason_word)) in cases.into_iter().enumerate() {
        write_atomically(&w.snapshot_file, &bytes).unwrap();
        let rejected = i as u64 + 1;
        agent
            .wait_for(
                Duration::from_secs(5),
                &format!("{what} snapshot refused"),
                |a| Ok(a.debug_snapshot()?["rejected"].as_u64() == Some(rejected)),
            )
            .expect("refusal");
        let status = agent.debug_snapshot().unwrap();
        let reason = status["last_rejection"]["reason"]
            .as_str()
            .unwrap()
            .to_lowercase();
        println!("{what} snapshot refused: {reason}");
        assert!(
            reason.contains(reason_word),
            "{what}: reason {reason:?} should mention {reason_word:?}"
        );
        assert_eq!(
            status["last_rejection"]["over_capacity"],
            what == "over capacity"
        );
        assert_eq!(
            status["live"]["generation"], 1,
            "{what} snapshot changed the live generation"
        );
        assert_eq!(
            w.probe(&target(VIP_ALL), 20).replies("a"),
            20,
            "{what} snapshot changed routing"
        );
    }
    // The good one still applies afterwards.
    write_atomically(&w.snapshot_file, &good).unwrap();
    wait_generation(&mut agent, 2);
    assert_eq!(w.probe(&target(VIP_ALL), 20).replies("b"), 20);
}

#[test]
fn uninstall_detaches_everything() {
    let w = World::new("uninstall", &["a"]);
    let mut b = w.builder(1, mode::KERNEL_NATIVE);
    let a = b.backend_set(lb_policy::RANDOM, &w.endpoints(&["a"]));
    b.service(VIP_ALL.into(), 80, &[(1, a)]);
    w.write(&b.build());
    let mut agent = w.start_agent(&[]);
    wait_enrolled(&mut agent, 1);
    assert_eq!(w.probe(&target(VIP_ALL), 10).replies("a"), 10);
    let status = agent.terminate().expect("SIGTERM");
    assert!(status.success(), "agent exit status {status}");
    assert_eq!(
        w.probe(&target(VIP_ALL), 10).replies("a"),
        10,
        "programs must survive the agent"
    );
    assert!(!w.dir.pins().is_empty());

    let out = std::process::Command::new(kmesh_tests::workspace_bin("kmesh-agent").unwrap())
        .args(["uninstall", "--bpffs-dir"])
        .arg(w.dir.path())
        .output()
        .expect("kmesh-agent uninstall");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(w.dir.pins().is_empty(), "pins left: {:?}", w.dir.pins());
    let after = w.probe(&target(VIP_ALL), 10);
    assert_eq!(
        after.errors_of("ENETUNREACH"),
        10,
        "still steered after uninstall: {after:?}"
    );
}
