//! Data plane benchmark, on the real kernel (root). Prints, in one run:
//!
//! 1. connect()+close() cost through a service VIP with the programs attached, against the same
//!    loop straight to the pod IP with no programs (the baseline), as a ratio; plus the cost for
//!    non-service traffic of a cgroup that has the programs (they run and pass it through).
//! 2. decode + fill + flip time and snapshot bytes for generated snapshots of 1,000, 10,000 and
//!    100,000 services with 10 endpoints each, and the kernel memory of the live generation's maps
//!    (their fdinfo `memlock`): in all, and per service and per endpoint of their own maps.
//! 3. the agent process's memory (`kmesh-agent`, steady RSS and peak) with those snapshots.
//!
//! `cargo bench -p kmesh-agent --bench dataplane` for the full run, `-- --smoke` for the short run
//! CI does (fewer connections, no 100,000-service snapshot). The connect loops run in the
//! `kmesh-probe` client inside a test network namespace, alternating baseline and mesh rounds so
//! that machine noise hits both; the medians of the rounds are reported.
use std::{
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use kmesh_agent::{
    loader,
    maps::{EnrolledMap, GenerationMaps},
    slots::SlotTable,
};
use kmesh_common::{EnrolledNetns, ip16, lb_policy, mode};
use kmesh_snapshot::{
    Limits, Snapshot,
    builder::{Endpoint, SnapshotBuilder, generate},
};
use kmesh_tests::{Agent, AgentDir, AgentOptions, AgentSource, Pod, TestCgroup, TestNetwork};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const POD_PORT: u16 = 8080;

struct Plan {
    rounds: usize,
    connections: u32,
    service_counts: &'static [u32],
    /// Snapshots the agent process's memory is measured at.
    agent_service_counts: &'static [u32],
}

fn main() {
    let smoke = std::env::args().any(|a| a == "--smoke");
    let plan = if smoke {
        Plan {
            rounds: 3,
            connections: 2_000,
            service_counts: &[1_000, 10_000],
            agent_service_counts: &[1_000],
        }
    } else {
        Plan {
            rounds: 5,
            connections: 20_000,
            service_counts: &[1_000, 10_000, 100_000],
            agent_service_counts: &[1_000, 10_000, 100_000],
        }
    };
    println!(
        "kmesh-rs data plane benchmark ({}): {} rounds x {} connections per variant",
        if smoke { "smoke run" } else { "full run" },
        plan.rounds,
        plan.connections
    );

    let net = TestNetwork::new("bench").expect("test network");
    let client = net
        .add_pod("client", Ipv4Addr::new(10, 244, 1, 10), None)
        .expect("client pod");
    let server = net
        .add_pod("server", Ipv4Addr::new(10, 244, 2, 1), None)
        .expect("server pod");
    let _listener = server.serve_tcp(POD_PORT).expect("server");
    let plain = TestCgroup::new("benchplain").expect("cgroup without programs");
    let mesh = TestCgroup::new("benchmesh").expect("cgroup with programs");
    let dir = AgentDir::new("bench").expect("pin directory");

    let installation =
        loader::install_or_adopt(dir.path(), mesh.path(), loader::BpfObject::Shipped)
            .expect("install programs");
    let mut maps = GenerationMaps::open(&installation).expect("generation maps");
    let mut enrolled = EnrolledMap::open(&installation).expect("enrolled map");
    let mut b = SnapshotBuilder::new("bench-node", 1, mode::KERNEL_NATIVE);
    let set = b.backend_set(
        lb_policy::RANDOM,
        &[Endpoint::new(IpAddr::V4(server.ipv4()), POD_PORT, 1)],
    );
    b.service(VIP.into(), 80, &[(1, set)]);
    let snapshot = b.build();
    maps.apply(&snapshot, 1).expect("apply");
    enrolled
        .insert(
            client.netns_cookie().expect("client cookie"),
            EnrolledNetns {
                workload_ip: ip16(IpAddr::V4(client.ipv4())),
                identity: 1,
                pad: 0,
            },
        )
        .expect("enrol client");

    connect_cost(&plan, &client, &server, &plain, &mesh);
    swap_cost(&plan, &mut maps);
    agent_memory(&plan);
}

/// The agent process's memory: a `kmesh-agent` (the release binary, file source) of its own
/// cgroup and pins applies a generated snapshot; its RSS two seconds after the snapshot is live
/// (steady), and its peak (VmHWM, start and apply included).
fn agent_memory(plan: &Plan) {
    println!();
    println!("agent process memory (kmesh-agent, file source, 10 endpoints per service):");
    println!(
        "  {:>8} {:>10} {:>12} {:>10} {:>10} {:>12}",
        "services", "endpoints", "bytes", "steady MB", "peak MB", "peak/steady"
    );
    for &services in plan.agent_service_counts {
        let tag = format!("mem{services}");
        let dir = AgentDir::new(&tag).expect("pin directory");
        let cgroup = TestCgroup::new(&tag).expect("cgroup");
        let file = std::env::temp_dir().join(format!("kmb-{tag}-{}.snap", std::process::id()));
        let bytes = generate("mem-node", 1, services, 10)
            .encode()
            .expect("encode");
        std::fs::write(&file, &bytes).expect("snapshot file");
        let mut agent = Agent::start(&AgentOptions {
            node_name: "mem-node",
            source: AgentSource::File(&file),
            dir: &dir,
            cgroup: &cgroup,
            extra_args: vec![],
        })
        .expect("agent");
        agent
            .wait_for(Duration::from_secs(120), "the snapshot live", |a| {
                Ok(a.debug_snapshot()?["live"]["generation"] == 1)
            })
            .unwrap_or_else(|e| panic!("{e}\n{}", agent.log()));
        std::thread::sleep(Duration::from_secs(2));
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", agent.pid())).unwrap_or_default();
        let kib = |field: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        let (steady, peak) = (kib("VmRSS:") / 1024.0, kib("VmHWM:") / 1024.0);
        println!(
            "  {:>8} {:>10} {:>12} {:>10.1} {:>10.1} {:>12.2}",
            services,
            services * 10,
            bytes.len(),
            steady,
            peak,
            peak / steady
        );
        let _ = agent.terminate();
        let _ = std::fs::remove_file(&file);
    }
}

/// Microseconds per connect()+close() of one probe run.
fn per_connection_us(client: &Pod, cgroup: &TestCgroup, target: &str, n: u32) -> f64 {
    let report = client
        .run_probe(
            cgroup,
            &[
                "--target",
                target,
                "--count",
                &n.to_string(),
                "--connect-only",
            ],
        )
        .expect("probe");
    assert_eq!(
        report.ok,
        u64::from(n),
        "benchmark connections failed: {report:?}"
    );
    report.elapsed_us as f64 / f64::from(n)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn connect_cost(plan: &Plan, client: &Pod, server: &Pod, plain: &TestCgroup, mesh: &TestCgroup) {
    let pod = format!("{}:{POD_PORT}", server.ipv4());
    let vip = format!("{VIP}:80");
    // Warm up caches, ARP and the program's map lookups.
    per_connection_us(client, plain, &pod, plan.connections / 10);
    per_connection_us(client, mesh, &vip, plan.connections / 10);
    let (mut baseline, mut through_vip, mut direct_with_programs) = (vec![], vec![], vec![]);
    for round in 0..plan.rounds {
        // Rotate the order so that no variant always runs first (or right after another).
        for variant in 0..3 {
            match (round + variant) % 3 {
                0 => baseline.push(per_connection_us(client, plain, &pod, plan.connections)),
                1 => through_vip.push(per_connection_us(client, mesh, &vip, plan.connections)),
                _ => direct_with_programs.push(per_connection_us(
                    client,
                    mesh,
                    &pod,
                    plan.connections,
                )),
            }
        }
    }
    let (b, v, d) = (
        median(baseline),
        median(through_vip),
        median(direct_with_programs),
    );
    println!();
    println!(
        "connect()+close(), median of {} rounds of {} connections:",
        plan.rounds, plan.connections
    );
    println!("  {:<52} {:>8.2} us", "baseline: pod IP, no programs", b);
    println!(
        "  {:<52} {:>8.2} us   ratio {:.3}",
        "mesh: service VIP rewritten by cgroup/connect4",
        v,
        v / b
    );
    println!(
        "  {:<52} {:>8.2} us   ratio {:.3}",
        "mesh: pod IP, programs attached (pass-through)",
        d,
        d / b
    );
}

fn swap_cost(plan: &Plan, maps: &mut GenerationMaps) {
    println!();
    println!("snapshot decode + fill + flip (10 endpoints per service):");
    println!(
        "  {:>8} {:>10} {:>12} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "services",
        "endpoints",
        "bytes",
        "decode ms",
        "fill ms",
        "flip ms",
        "total ms",
        "kernel MB",
        "B/service",
        "B/endpoint"
    );
    for (i, &services) in plan.service_counts.iter().enumerate() {
        let snapshot: Snapshot = generate("bench-node", 10 + i as u64, services, 10);
        let bytes = snapshot.encode().expect("encode");
        let started = Instant::now();
        let decoded = Snapshot::decode(&bytes, &Limits::default()).expect("decode");
        let decode = started.elapsed();
        let stats = maps
            .apply(&decoded.snapshot, decoded.content_hash)
            .expect("apply");
        let total = started.elapsed();
        // The live generation's maps, as the kernel charges them (memlock).
        let memory = maps.live_memory().expect("kernel memory of the maps");
        let of = |table: SlotTable| {
            memory
                .iter()
                .find(|m| m.table == table)
                .map_or(0, |m| m.bytes)
        };
        let kernel: u64 = memory.iter().map(|m| m.bytes).sum();
        let endpoints = decoded.snapshot.endpoints.len();
        println!(
            "  {:>8} {:>10} {:>12} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>10.1}",
            services,
            endpoints,
            bytes.len(),
            decode.as_secs_f64() * 1e3,
            stats.fill_micros as f64 / 1e3,
            stats.flip_micros as f64 / 1e3,
            total.as_secs_f64() * 1e3,
            kernel as f64 / 1e6,
            of(SlotTable::Services) as f64 / f64::from(services),
            of(SlotTable::Endpoints) as f64 / endpoints.max(1) as f64,
        );
    }
}
