//! Data plane benchmark, on the real kernel (root). Prints, in one run:
//!
//! 1. connect()+close() cost through a service VIP with the programs attached, against the same
//!    loop straight to the pod IP with no programs (the baseline), as a ratio; plus the cost for
//!    non-service traffic of a cgroup that has the programs (they run and pass it through).
//! 2. decode + fill + flip time and snapshot bytes for generated snapshots of 1,000, 10,000 and
//!    100,000 services with 10 endpoints each, and the kernel memory of the live generation's maps
//!    (their fdinfo `memlock`): in all, and per service and per endpoint of their own maps.
//! 3. the agent process's memory (`kmesh-agent`, steady RSS and peak) with those snapshots.
//! 4. HTTP with `wrk` through three paths: direct, the mesh's VIP, and a haproxy pair in the pods
//!    (a userspace L4 proxy per pod, the sidecars' shape), keep-alive and a connection per request:
//!    requests/s, p50, p90 and p99, as ratios to the direct path (`dataplane_parts/http.rs`).
//! 5. connect()+close() through the VIP with 2 services loaded and with 100,000 more (1,000,000
//!    endpoints; 10,000 in the smoke run).
//!
//! Needs root, `wrk` and `haproxy` (scripts/setup.sh installs both). Writes charts of parts 2 to 4
//! (PNG) to `kmesh_bench_plots::plots_dir()` (`target/plots`, or `$KMESH_PLOTS_DIR`).
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
    Decoded, Limits, Snapshot,
    builder::{Endpoint, SnapshotBuilder, generate},
    delta_format::{Delta, delta_between},
};
use kmesh_tests::{Agent, AgentDir, AgentOptions, AgentSource, Pod, TestCgroup, TestNetwork};

#[path = "dataplane_parts/http.rs"]
mod http;
#[path = "authz/http_server.rs"]
mod http_server;
#[path = "shared/listening.rs"]
mod listening;
#[path = "authz/wrk.rs"]
mod wrk;
#[path = "shared/wrk_rounds.rs"]
mod wrk_rounds;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const POD_PORT: u16 = 8080;

struct Plan {
    rounds: usize,
    connections: u32,
    service_counts: &'static [u32],
    /// Snapshots the agent process's memory is measured at.
    agent_service_counts: &'static [u32],
    http: http::HttpPlan,
    /// Services of 10 endpoints each loaded beside the measured one for the connect() cost at
    /// scale.
    scale_services: u32,
}

fn main() {
    let smoke = std::env::args().any(|a| a == "--smoke");
    let plan = if smoke {
        Plan {
            rounds: 3,
            connections: 2_000,
            service_counts: &[1_000, 10_000],
            agent_service_counts: &[1_000],
            http: http::HttpPlan {
                rounds: 1,
                seconds: 1,
            },
            scale_services: 10_000,
        }
    } else {
        Plan {
            rounds: 5,
            connections: 20_000,
            service_counts: &[1_000, 10_000, 100_000],
            agent_service_counts: &[1_000, 10_000, 100_000],
            http: http::HttpPlan {
                rounds: 5,
                seconds: 2,
            },
            scale_services: 100_000,
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
    let snapshot = mesh_snapshot(&server, 1, 0);
    maps.apply(&snapshot, 1, None).expect("apply");
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
    let http = http::run(&plan.http, &client, &server, VIP, &plain, &mesh);
    let swaps = swap_cost(&plan, &mut maps);
    one_endpoint_change(&plan, &mut maps);
    // After the swap costs: its large generations are freed by the kernel in the background
    // (RCU), which would weigh on whatever runs next.
    connect_at_scale(&plan, &mut maps, &client, &server, &mesh);
    let memory = agent_memory(&plan);
    charts(&http, &swaps, &memory);
}

/// One snapshot's apply (`swap_cost`): services, then decode, fill, flip, total in ms, then the
/// kernel memory of its maps in MB.
type Swap = (u32, [f64; 4], f64);

/// The charts of this run, in `kmesh_bench_plots::plots_dir()`.
fn charts(http: &[http::HttpFigures], swaps: &[Swap], memory: &[(u32, f64, f64)]) {
    use kmesh_bench_plots::{BarGroup, Series, grouped_bars, log_log_lines, plots_dir};
    let dir = plots_dir();
    let mut written = Vec::new();
    for (figures, file) in http
        .iter()
        .zip(["http-keep-alive.png", "http-per-request.png"])
    {
        let groups: Vec<BarGroup> = figures
            .paths
            .iter()
            .map(|(path, values)| BarGroup {
                name: path.to_string(),
                values: values.to_vec(),
            })
            .collect();
        let title = format!(
            "HTTP latency, {} (wrk, medians of the rounds)",
            figures.mode
        );
        let path = dir.join(file);
        grouped_bars(&path, &title, "µs", &["p50", "p90", "p99"], &groups).expect("chart");
        written.push(path);
    }
    let line = |name: &str, points: Vec<(f64, f64)>| Series {
        name: name.to_string(),
        points,
    };
    let of = |i: usize| -> Vec<(f64, f64)> {
        swaps
            .iter()
            .map(|(services, ms, _)| (f64::from(*services), ms[i]))
            .collect()
    };
    let path = dir.join("node-apply.png");
    log_log_lines(
        &path,
        "Applying a snapshot on the node (10 endpoints per service)",
        "services",
        "ms",
        &[
            line("decode", of(0)),
            line("fill", of(1)),
            line("flip", of(2)),
            line("total", of(3)),
        ],
    )
    .expect("chart");
    written.push(path);
    let path = dir.join("node-memory.png");
    log_log_lines(
        &path,
        "Memory on the node (10 endpoints per service)",
        "services",
        "MB",
        &[
            line(
                "kernel: the live generation's maps",
                swaps
                    .iter()
                    .map(|(services, _, mb)| (f64::from(*services), *mb))
                    .collect(),
            ),
            line(
                "agent RSS, steady",
                memory.iter().map(|m| (f64::from(m.0), m.1)).collect(),
            ),
            line(
                "agent RSS, peak",
                memory.iter().map(|m| (f64::from(m.0), m.2)).collect(),
            ),
        ],
    )
    .expect("chart");
    written.push(path);
    println!();
    for path in written {
        println!("chart: {}", path.display());
    }
}

/// The measured services (the VIP's port 80 to the probe server, its [`http::HTTP_PORT`] to the
/// HTTP server), and `extra` services of 10 endpoints each that no traffic goes to (the table
/// sizes of a large cluster).
fn mesh_snapshot(server: &Pod, generation: u64, extra: u32) -> Snapshot {
    let mut b = SnapshotBuilder::new("bench-node", generation, mode::KERNEL_NATIVE);
    let server_ip = IpAddr::V4(server.ipv4());
    let probe = b.backend_set(lb_policy::RANDOM, &[Endpoint::new(server_ip, POD_PORT, 1)]);
    b.service(VIP.into(), 80, &[(1, probe)]);
    let web = b.backend_set(
        lb_policy::RANDOM,
        &[Endpoint::new(server_ip, http::HTTP_PORT, 1)],
    );
    b.service(VIP.into(), http::HTTP_PORT, &[(1, web)]);
    for i in 0..extra {
        let endpoints: Vec<Endpoint> = (0..10u32)
            .map(|e| {
                let n = i * 10 + e;
                let ip = Ipv4Addr::new(10, 200 + (n >> 16) as u8, (n >> 8) as u8, n as u8);
                Endpoint::new(IpAddr::V4(ip), 8080, 1)
            })
            .collect();
        let set = b.backend_set(lb_policy::RANDOM, &endpoints);
        let vip = Ipv4Addr::new(10, 100 + (i >> 16) as u8, (i >> 8) as u8, i as u8);
        b.service(vip.into(), 80, &[(1, set)]);
    }
    b.build()
}

/// connect()+close() through the VIP with only the measured services loaded, and with
/// `plan.scale_services` more (10 endpoints each): the kernel's lookups are hash lookups, so the
/// ratio should be 1. The two alternate by round (each round applies its snapshot first and lets
/// the kernel free the one before); the ratio is printed as the min, median and max of the rounds'
/// ratios.
fn connect_at_scale(
    plan: &Plan,
    maps: &mut GenerationMaps,
    client: &Pod,
    server: &Pod,
    mesh: &TestCgroup,
) {
    let vip = format!("{VIP}:80");
    let small = mesh_snapshot(server, 20, 0);
    let large = mesh_snapshot(server, 21, plan.scale_services);
    let endpoints = large.endpoints.len();
    let (mut few, mut many, mut ratios) = (vec![], vec![], vec![]);
    // A swap away from a large generation leaves the kernel freeing its maps (RCU callbacks) for
    // a while: each measurement waits for that to end, then warms up.
    let settle = |maps: &mut GenerationMaps, snapshot: &Snapshot, hash: u64| {
        maps.apply(snapshot, hash, None).expect("apply");
        std::thread::sleep(Duration::from_secs(2));
        per_connection_us(client, mesh, &vip, plan.connections / 10);
    };
    for _ in 0..plan.rounds {
        settle(maps, &small, 20);
        let a = per_connection_us(client, mesh, &vip, plan.connections);
        settle(maps, &large, 21);
        let b = per_connection_us(client, mesh, &vip, plan.connections);
        few.push(a);
        many.push(b);
        ratios.push(b / a);
    }
    println!();
    println!(
        "connect()+close() through the VIP by table size, median of {} rounds of {} connections:",
        plan.rounds, plan.connections
    );
    println!(
        "  {:<52} {:>8.2} us",
        "2 services, 2 endpoints",
        median(few)
    );
    println!(
        "  {:<52} {:>8.2} us   ratio min / median / max {}",
        format!(
            "{} services, {endpoints} endpoints",
            plan.scale_services + 2
        ),
        median(many),
        spread(&ratios),
    );
}

/// The agent process's memory: a `kmesh-agent` (the release binary, file source) of its own
/// cgroup and pins applies a generated snapshot; its RSS two seconds after the snapshot is live
/// (steady), and its peak (VmHWM, start and apply included).
fn agent_memory(plan: &Plan) -> Vec<(u32, f64, f64)> {
    let mut figures = Vec::new();
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
        figures.push((services, steady, peak));
    }
    figures
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
    // Each round's ratio to the same round's baseline, for the spread.
    let per_round =
        |v: &[f64]| -> Vec<f64> { v.iter().zip(&baseline).map(|(x, b)| x / b).collect() };
    let (vip_ratios, direct_ratios) = (per_round(&through_vip), per_round(&direct_with_programs));
    let (b, v, d) = (
        median(baseline),
        median(through_vip),
        median(direct_with_programs),
    );
    println!();
    println!(
        "connect()+close(), median of {} rounds of {} connections; the ratio of the medians, and \
         each round's ratio to its baseline min / median / max:",
        plan.rounds, plan.connections
    );
    println!("  {:<52} {:>8.2} us", "baseline: pod IP, no programs", b);
    println!(
        "  {:<52} {:>8.2} us   ratio {:.3}   {}",
        "mesh: service VIP rewritten by cgroup/connect4",
        v,
        v / b,
        spread(&vip_ratios)
    );
    println!(
        "  {:<52} {:>8.2} us   ratio {:.3}   {}",
        "mesh: pod IP, programs attached (pass-through)",
        d,
        d / b,
        spread(&direct_ratios)
    );
}

/// `min / median / max` of `ratios`, three decimals.
fn spread(ratios: &[f64]) -> String {
    let lo = ratios.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{lo:.3} / {:.3} / {hi:.3}", median(ratios.to_vec()))
}

fn swap_cost(plan: &Plan, maps: &mut GenerationMaps) -> Vec<Swap> {
    let mut figures = Vec::new();
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
            .apply(&decoded.snapshot, decoded.content_hash, None)
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
        let ms = |micros: u64| micros as f64 / 1e3;
        figures.push((
            services,
            [
                decode.as_secs_f64() * 1e3,
                ms(stats.fill_micros),
                ms(stats.flip_micros),
                total.as_secs_f64() * 1e3,
            ],
            kernel as f64 / 1e6,
        ));
    }
    figures
}

/// CPU time of this process so far (every thread), in microseconds.
fn process_cpu_micros() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid timespec to write.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut t) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_PROCESS_CPUTIME_ID)");
    t.tv_sec as u64 * 1_000_000 + t.tv_nsec as u64 / 1_000
}

/// #10's one-endpoint change at 10,000 services and 100,000 endpoints, from the bytes received to
/// the flip: as a delta against the live snapshot, applied in memory, then a swap of the shards it
/// touches; and, in the same run and alternating with it, as the whole snapshot decoded and swapped
/// whole (what an agent without a base does). Each round moves another endpoint of the live
/// generation. CPU is the process's over the whole apply, on every thread, including the installs'
/// and the mirror writes after the flip; grace periods are waits, not CPU.
fn one_endpoint_change(plan: &Plan, maps: &mut GenerationMaps) {
    let limits = Limits::default();
    let first = generate("bench-node", 1_000, 10_000, 10);
    let bytes = first.encode().expect("encode");
    let mut held: Decoded = Snapshot::decode(&bytes, &limits).expect("decode");
    maps.apply(&held.snapshot, held.content_hash, None)
        .expect("apply");
    std::thread::sleep(Duration::from_secs(1));
    // Per variant: wire bytes, receipt to flip (ms), CPU (ms), inner maps rebuilt.
    let (mut delta, mut whole): (Vec<[f64; 4]>, Vec<[f64; 4]>) = (vec![], vec![]);
    for round in 0..plan.rounds * 2 {
        let mut next = held.snapshot.clone();
        next.generation += 1;
        let moved = (round * 7_919) % next.endpoints.len();
        next.endpoints[moved].value.port ^= 1;
        let full = next.encode().expect("encode");
        let incremental = round % 2 == 0;
        let wire = if incremental {
            delta_between(&held.snapshot, &next).expect("delta")
        } else {
            full.clone()
        };
        let (received_ns, cpu_before) = (kmesh_agent::sys::monotonic_ns(), process_cpu_micros());
        let (decoded, stats) = if incremental {
            let decoded = Delta::decode(&wire, &limits)
                .expect("decode the delta")
                .apply(&held, &limits)
                .expect("apply the delta");
            let stats = maps
                .apply(
                    &decoded.snapshot,
                    decoded.content_hash,
                    Some(&held.snapshot),
                )
                .expect("incremental swap");
            (decoded, stats)
        } else {
            let decoded = Snapshot::decode(&wire, &limits).expect("decode");
            let stats = maps
                .apply(&decoded.snapshot, decoded.content_hash, None)
                .expect("whole swap");
            (decoded, stats)
        };
        let cpu = process_cpu_micros() - cpu_before;
        assert_eq!(
            decoded.snapshot, next,
            "the node holds another snapshot than was sent"
        );
        let to_flip_ms = stats.flipped_between_ns[1].saturating_sub(received_ns) as f64 / 1e6;
        let figures = [
            wire.len() as f64,
            to_flip_ms,
            cpu as f64 / 1e3,
            stats.maps_rebuilt as f64,
        ];
        if incremental {
            delta.push(figures);
        } else {
            whole.push(figures);
        }
        held = decoded;
        // The kernel frees the replaced maps in the background (RCU callbacks).
        std::thread::sleep(Duration::from_millis(300));
    }
    let medians = |rows: &[[f64; 4]]| -> [f64; 4] {
        std::array::from_fn(|i| median(rows.iter().map(|r| r[i]).collect()))
    };
    let (d, w) = (medians(&delta), medians(&whole));
    println!();
    println!(
        "one endpoint moved at 10,000 services and 100,000 endpoints (medians of {} rounds each, \
         alternating):",
        plan.rounds
    );
    println!(
        "  {:<44} {:>12} {:>16} {:>10} {:>14}",
        "", "wire bytes", "receipt→flip ms", "CPU ms", "maps rebuilt"
    );
    for (name, f) in [
        ("delta + sharded swap of the changed shards", d),
        ("whole snapshot + whole swap (baseline)", w),
    ] {
        println!(
            "  {:<44} {:>12.0} {:>16.1} {:>10.1} {:>14.0}",
            name, f[0], f[1], f[2], f[3]
        );
    }
    println!(
        "  ratios delta / whole: wire {:.5}, receipt→flip {:.3}, CPU {:.3}",
        d[0] / w[0],
        d[1] / w[1],
        d[2] / w[2]
    );
}
