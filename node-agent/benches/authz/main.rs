//! Authorization benchmark, on the real kernel (root). Prints, in one run, with ratios against a
//! baseline measured in the same run:
//!
//! 1. connect()+close() cost from a client pod straight to a server pod's IP:port: the baseline
//!    is a server pod whose namespace has no sk_lookup link; the measured server's namespace has
//!    the real `kmesh_authz` program attached (as the agent attaches it), with the destination
//!    unbound (no workload entry), bound by 10 and by 1,000 ALLOW policies (compile-shaped
//!    tables, see `tables.rs`; the client is allowed by the last policy). Also a denied connect
//!    (ECONNREFUSED, the end of the lookup chain) against the allowed one.
//! 2. HTTP requests with `wrk` from the client pod: requests/s and latency p50/p99, one connection
//!    per request (`Connection: close`: sk_lookup runs once per request) for the same variants,
//!    and keep-alive (sk_lookup runs only when wrk opens its connections) with 1,000 policies.
//!
//! `cargo bench -p kmesh-agent --bench authz` for the full run (needs `cargo build --release -p
//! kmesh-tests --bins` first, for `kmesh-probe`, and `wrk`), `-- --smoke` for the short run CI
//! does. Variants alternate within every round (the order rotates), the snapshot of a variant is
//! applied right before it runs, and the medians of the rounds are reported. Before measuring, the
//! benchmark checks that the tables do what it claims (the outsider is refused, the client is not),
//! so it cannot report the cost of a program that is not there.
mod http_server;
mod tables;
mod wrk;

use std::{collections::BTreeMap, fs::File, net::Ipv4Addr, sync::Arc};

use kmesh_agent::{loader, maps::GenerationMaps};
use kmesh_snapshot::Snapshot;
use kmesh_tests::{AgentDir, Pod, TcpServer, TestCgroup, TestNetwork};

use http_server::HttpServer;
use tables::{Binding, Parties, TableSizes};
use wrk::{Connections, WrkResult};

const PROBE_PORT: u16 = 8080;
const HTTP_PORT: u16 = 8081;
/// Addresses apart from the other kernel tests' and benchmarks' (agents of concurrent runs scan
/// every namespace of the machine).
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 180, 10);
const OUTSIDER: Ipv4Addr = Ipv4Addr::new(10, 244, 180, 11);
const SERVER_PLAIN: Ipv4Addr = Ipv4Addr::new(10, 244, 181, 1);
const SERVER_AUTHZ: Ipv4Addr = Ipv4Addr::new(10, 244, 181, 2);

/// Pause after a swap, before measuring.
const SETTLE: std::time::Duration = std::time::Duration::from_millis(100);

struct Plan {
    rounds: usize,
    connections: u32,
    wrk_seconds: u32,
    wrk_connections: usize,
}

/// What a measurement runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    /// The server pod whose namespace has no sk_lookup link.
    NoPrograms,
    /// sk_lookup attached; the destination has no workload entry.
    Unbound,
    /// sk_lookup attached; the destination is bound by 10 policies.
    Policies10,
    /// sk_lookup attached; the destination is bound by 1,000 policies.
    Policies1000,
}

impl Variant {
    fn label(self) -> &'static str {
        match self {
            Variant::NoPrograms => "baseline: no programs",
            Variant::Unbound => "sk_lookup, destination unbound (0 policies)",
            Variant::Policies10 => "sk_lookup, 10 policies",
            Variant::Policies1000 => "sk_lookup, 1,000 policies",
        }
    }
}

/// The benchmark's node: pods, servers, the loaded programs and each variant's snapshot.
struct Bench {
    // Field order is drop order: servers and pods go before the pins they ran with.
    _tcp: Vec<TcpServer>,
    _http: Vec<HttpServer>,
    client: Pod,
    outsider: Pod,
    _server_plain: Pod,
    _server_authz: Pod,
    probes: TestCgroup,
    maps: GenerationMaps,
    snapshots: BTreeMap<&'static str, Snapshot>,
    generation: u64,
    _net: TestNetwork,
    _programs: TestCgroup,
    _dir: AgentDir,
}

fn main() {
    let smoke = std::env::args().any(|a| a == "--smoke");
    let plan = if smoke {
        Plan {
            rounds: 3,
            connections: 1_000,
            wrk_seconds: 1,
            wrk_connections: 4,
        }
    } else {
        // Many short rounds: this machine's noise comes in bursts of seconds, which the median
        // of many alternating rounds absorbs better than a few long ones.
        Plan {
            rounds: 15,
            connections: 5_000,
            wrk_seconds: 2,
            wrk_connections: 4,
        }
    };
    wrk::require_wrk();
    println!(
        "kmesh-rs authorization benchmark ({}): {} rounds per variant, {} connections per probe \
         run, wrk {} s x {} connections",
        if smoke { "smoke run" } else { "full run" },
        plan.rounds,
        plan.connections,
        plan.wrk_seconds,
        plan.wrk_connections
    );
    let mut bench = Bench::new();
    bench.print_table_sizes();
    bench.check_verdicts();
    connect_cost(&plan, &mut bench);
    request_cost(&plan, &mut bench);
}

impl Bench {
    fn new() -> Bench {
        let net = TestNetwork::new("benchauthz").expect("test network");
        let pod = |name, ip| net.add_pod(name, ip, None).expect("pod");
        let (client, outsider) = (pod("client", CLIENT), pod("outsider", OUTSIDER));
        let (server_plain, server_authz) =
            (pod("srvplain", SERVER_PLAIN), pod("srvauthz", SERVER_AUTHZ));
        let mut tcp = vec![];
        let mut http = vec![];
        for server in [&server_plain, &server_authz] {
            tcp.push(server.serve_tcp(PROBE_PORT).expect("probe server"));
            http.push(HttpServer::start(server, HTTP_PORT).expect("http server"));
        }
        // The connect programs go to a cgroup no client runs in: only sk_lookup is measured.
        let programs = TestCgroup::new("benchauthzprog").expect("cgroup of the connect programs");
        let probes = TestCgroup::new("benchauthzprobe").expect("cgroup of the clients");
        let dir = AgentDir::new("benchauthz").expect("pin directory");
        let installation =
            loader::install_or_adopt(dir.path(), programs.path(), loader::BpfObject::Shipped)
                .expect("install programs");
        let maps = GenerationMaps::open(&installation).expect("generation maps");
        attach_authz(&installation, &server_authz);
        let parties = Parties {
            server: SERVER_AUTHZ,
            client: CLIENT,
            outsider: OUTSIDER,
        };
        let snapshots = [
            ("unbound", Binding::Unbound { policies: 1_000 }),
            ("10", Binding::Bound { policies: 10 }),
            ("1000", Binding::Bound { policies: 1_000 }),
        ]
        .into_iter()
        .map(|(name, binding)| (name, tables::snapshot(1, binding, &parties)))
        .collect();
        Bench {
            _tcp: tcp,
            _http: http,
            client,
            outsider,
            _server_plain: server_plain,
            _server_authz: server_authz,
            probes,
            maps,
            snapshots,
            generation: 0,
            _net: net,
            _programs: programs,
            _dir: dir,
        }
    }

    /// Makes the tables of `variant` live. The baseline's server has no program, but it gets a
    /// swap too, so that every measurement follows the same work (a swap frees the old tables in
    /// the kernel's background work, which must not weigh on some variants only), then a pause.
    fn prepare(&mut self, variant: Variant) {
        let name = match variant {
            Variant::NoPrograms | Variant::Unbound => "unbound",
            Variant::Policies10 => "10",
            Variant::Policies1000 => "1000",
        };
        self.generation += 1;
        let mut snapshot = self.snapshots[name].clone();
        snapshot.generation = self.generation;
        self.maps
            .apply(&snapshot, self.generation)
            .expect("apply the variant's snapshot");
        std::thread::sleep(SETTLE);
    }

    fn target(variant: Variant, port: u16) -> String {
        let server = match variant {
            Variant::NoPrograms => SERVER_PLAIN,
            _ => SERVER_AUTHZ,
        };
        format!("{server}:{port}")
    }

    fn print_table_sizes(&self) {
        println!();
        println!("authorization tables (compile-shaped: one ALLOW policy per source namespace):");
        println!(
            "  {:<34} {:>10} {:>8} {:>9} {:>9}",
            "snapshot", "workloads", "sources", "verdicts", "policies"
        );
        for (name, label) in [
            ("unbound", "destination unbound (0 policies)"),
            ("10", "10 policies"),
            ("1000", "1,000 policies"),
        ] {
            let s = TableSizes::of(&self.snapshots[name]);
            println!(
                "  {:<34} {:>10} {:>8} {:>9} {:>9}",
                label, s.workloads, s.sources, s.verdicts, s.policies
            );
        }
    }

    /// The tables do what the figures claim: with 10 and 1,000 policies the outsider is refused
    /// and the client allowed; unbound, the outsider passes.
    fn check_verdicts(&mut self) {
        for variant in [Variant::Policies10, Variant::Policies1000] {
            self.prepare(variant);
            let target = Self::target(variant, PROBE_PORT);
            let refused = self.refused(&self.outsider, &target, 20);
            assert_eq!(refused, 20, "{variant:?}: the outsider must be refused");
            connects(&self.client, &self.probes, &target, 20);
        }
        self.prepare(Variant::Unbound);
        connects(
            &self.outsider,
            &self.probes,
            &Self::target(Variant::Unbound, PROBE_PORT),
            20,
        );
    }

    /// How many of `n` connects from `pod` to `target` got ECONNREFUSED (all others must connect).
    fn refused(&self, pod: &Pod, target: &str, n: u32) -> u64 {
        let report = probe(pod, &self.probes, target, n);
        assert_eq!(
            report.ok + report.errors_of("ECONNREFUSED"),
            u64::from(n),
            "{report:?}"
        );
        report.errors_of("ECONNREFUSED")
    }
}

/// Attaches the real `kmesh_authz` to `pod`'s namespace as the agent does (a pinned bpf_link).
fn attach_authz(installation: &loader::Installation, pod: &Pod) {
    let netns = File::open(pod.netns_path()).expect("open the server's netns");
    let cookie = pod.netns_cookie().expect("server netns cookie");
    let enrolled = BTreeMap::from([(cookie, Arc::new(netns))]);
    let stats = installation
        .netns_links()
        .sync(&enrolled)
        .expect("attach sk_lookup");
    assert_eq!(stats.attached, 1, "one sk_lookup link: {stats:?}");
}

fn probe(pod: &Pod, cgroup: &TestCgroup, target: &str, n: u32) -> kmesh_tests::ProbeReport {
    pod.run_probe(
        cgroup,
        &[
            "--target",
            target,
            "--count",
            &n.to_string(),
            "--connect-only",
        ],
    )
    .expect("probe")
}

/// Microseconds per connect()+close(), every one of which must connect.
fn connects(pod: &Pod, cgroup: &TestCgroup, target: &str, n: u32) -> f64 {
    let report = probe(pod, cgroup, target, n);
    assert_eq!(report.ok, u64::from(n), "connections failed: {report:?}");
    report.elapsed_us as f64 / f64::from(n)
}

/// Microseconds per refused connect(), every one of which must get ECONNREFUSED.
fn refusals(pod: &Pod, cgroup: &TestCgroup, target: &str, n: u32) -> f64 {
    let report = probe(pod, cgroup, target, n);
    assert_eq!(
        report.errors_of("ECONNREFUSED"),
        u64::from(n),
        "connects not refused: {report:?}"
    );
    report.elapsed_us as f64 / f64::from(n)
}

/// The smallest and largest of the rounds: how noisy the machine was.
fn spread(v: &[f64]) -> (f64, f64) {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (lo, hi)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A connect measurement: a variant, allowed (the client) or denied (the outsider).
#[derive(Clone, Copy)]
struct ConnectCase {
    variant: Variant,
    denied: bool,
}

const CONNECT_CASES: [ConnectCase; 5] = [
    ConnectCase {
        variant: Variant::NoPrograms,
        denied: false,
    },
    ConnectCase {
        variant: Variant::Unbound,
        denied: false,
    },
    ConnectCase {
        variant: Variant::Policies10,
        denied: false,
    },
    ConnectCase {
        variant: Variant::Policies1000,
        denied: false,
    },
    ConnectCase {
        variant: Variant::Policies1000,
        denied: true,
    },
];

fn connect_cost(plan: &Plan, bench: &mut Bench) {
    let mut results = vec![vec![]; CONNECT_CASES.len()];
    // Warm up caches, neighbours and the program.
    for case in CONNECT_CASES {
        measure_connects(bench, case, plan.connections / 10);
    }
    for round in 0..plan.rounds {
        // Rotate the order so that no case always runs first (or right after another).
        for k in 0..CONNECT_CASES.len() {
            let i = (round + k) % CONNECT_CASES.len();
            results[i].push(measure_connects(bench, CONNECT_CASES[i], plan.connections));
        }
    }
    let spreads: Vec<(f64, f64)> = results.iter().map(|r| spread(r)).collect();
    let medians: Vec<f64> = results.into_iter().map(median).collect();
    let baseline = medians[0];
    println!();
    println!(
        "connect()+close() to the server pod's IP:port, median of {} rounds of {} connections:",
        plan.rounds, plan.connections
    );
    println!(
        "  {:<52} {:>8.2} us                (rounds {:.2}..{:.2})",
        Variant::NoPrograms.label(),
        baseline,
        spreads[0].0,
        spreads[0].1
    );
    for ((case, us), (lo, hi)) in CONNECT_CASES.iter().zip(&medians).zip(&spreads).skip(1) {
        let label = if case.denied {
            format!("{}: denied (ECONNREFUSED)", case.variant.label())
        } else {
            case.variant.label().to_string()
        };
        println!(
            "  {label:<52} {us:>8.2} us   ratio {:.3}   (rounds {lo:.2}..{hi:.2})",
            us / baseline
        );
    }
    println!(
        "  denied vs allowed connect, 1,000 policies: ratio {:.3}",
        medians[4] / medians[3]
    );
}

fn measure_connects(bench: &mut Bench, case: ConnectCase, n: u32) -> f64 {
    bench.prepare(case.variant);
    let target = Bench::target(case.variant, PROBE_PORT);
    if case.denied {
        refusals(&bench.outsider, &bench.probes, &target, n)
    } else {
        connects(&bench.client, &bench.probes, &target, n)
    }
}

/// A wrk measurement: a variant and whether each request has its own connection.
const REQUEST_CASES: [(Variant, Connections); 6] = [
    (Variant::NoPrograms, Connections::PerRequest),
    (Variant::Unbound, Connections::PerRequest),
    (Variant::Policies10, Connections::PerRequest),
    (Variant::Policies1000, Connections::PerRequest),
    (Variant::NoPrograms, Connections::KeepAlive),
    (Variant::Policies1000, Connections::KeepAlive),
];

fn request_cost(plan: &Plan, bench: &mut Bench) {
    let mut results: Vec<Vec<WrkResult>> = vec![vec![]; REQUEST_CASES.len()];
    for round in 0..plan.rounds {
        for k in 0..REQUEST_CASES.len() {
            let i = (round + k) % REQUEST_CASES.len();
            let (variant, mode) = REQUEST_CASES[i];
            bench.prepare(variant);
            let url = format!("http://{}/", Bench::target(variant, HTTP_PORT));
            let netns = bench.client.netns_name().to_string();
            results[i].push(wrk::run(
                &netns,
                &url,
                mode,
                plan.wrk_seconds,
                plan.wrk_connections,
            ));
        }
    }
    let medians: Vec<WrkResult> = results.into_iter().map(median_result).collect();
    println!();
    println!(
        "HTTP requests with wrk from the client pod, median of {} rounds of {} s \
         (ratios against the baseline of the same connection mode):",
        plan.rounds, plan.wrk_seconds
    );
    println!(
        "  {:<58} {:>8} {:>6} {:>8} {:>6} {:>8} {:>6}",
        "", "req/s", "ratio", "p50 us", "ratio", "p99 us", "ratio"
    );
    for ((variant, mode), r) in REQUEST_CASES.iter().zip(&medians) {
        let base = if *mode == Connections::PerRequest {
            medians[0]
        } else {
            medians[4]
        };
        let label = format!(
            "{}: {}",
            match mode {
                Connections::PerRequest => "conn/request",
                Connections::KeepAlive => "keep-alive",
            },
            variant.label()
        );
        println!(
            "  {label:<58} {:>8.0} {:>6.3} {:>8.1} {:>6.3} {:>8.1} {:>6.3}",
            r.requests_per_s,
            r.requests_per_s / base.requests_per_s,
            r.p50_us,
            r.p50_us / base.p50_us,
            r.p99_us,
            r.p99_us / base.p99_us
        );
    }
}

/// Each figure's median over the rounds.
fn median_result(runs: Vec<WrkResult>) -> WrkResult {
    WrkResult {
        requests_per_s: median(runs.iter().map(|r| r.requests_per_s).collect()),
        p50_us: median(runs.iter().map(|r| r.p50_us).collect()),
        p99_us: median(runs.iter().map(|r| r.p99_us).collect()),
    }
}
