//! Waypoint benchmark (issue #11): HTTP through the DualEngine waypoint against direct and against
//! nginx as an L7 reverse proxy with the same route, in one run, on the real kernel (root).
//!
//! The world is `tests/tests/waypoint_l7.rs`'s: the real `kmesh-agent` loads the programs on a test
//! cgroup from a DualEngine snapshot in which reviews' VIP is bound to the waypoint; the real
//! `kmesh-waypoint` runs in its own pod and follows a configuration file with bookinfo's jason
//! route (`end-user: jason` to v2, every other request to v3); v2 and v3 are the benchmarks' tiny
//! HTTP server (`authz/http_server.rs`, answering `v2` or `v3`) in their own pods. `wrk` in the
//! client pod sends `end-user: jason` on every request, over three paths:
//!
//! 1. direct: to v2's pod IP (the baseline);
//! 2. waypoint: to reviews' VIP from the test cgroup: connect4 sends it to the waypoint, which reads
//!    the origin from the SYN, matches the header and forwards to v2 over its connection pool;
//! 3. nginx: to nginx in its own pod, with the same route (`waypoint_parts/nginx.rs`).
//!
//! for HTTP keep-alive and for a new connection per request (`Connection: close`), in rounds that
//! rotate the paths (`shared/wrk_rounds.rs`). It prints requests/s, p50, p90, p99 and their ratios
//! to direct, the latency each proxy adds (its p50 and p99 minus direct's, per round) and whether
//! the goal is met: the waypoint adds no more latency than nginx, and keeps at least its
//! throughput. Before measuring it checks each path's answer (v2 with the header, v3 without it
//! through both proxies), and after each wrk run that every request reached v2 and none v3.
//!
//! `cargo bench -p kmesh-agent --bench waypoint` (release) measures the release `kmesh-waypoint`:
//! build it first with `cargo build --release -p kmesh-waypoint` (the bench refuses a binary older
//! than the waypoint's sources, and a debug one in the full run). `-- --smoke` is the short run
//! CI does (scripts/test.sh, test profile, after `cargo build --workspace --bins`). Needs root,
//! `wrk`, `nginx` and `curl` (scripts/setup.sh installs them).
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant, SystemTime},
};

use kmesh_common::{lb_policy, mode};
use kmesh_snapshot::{
    Snapshot,
    builder::{Endpoint as KernelEndpoint, SnapshotBuilder},
    waypoint::{
        Cluster, Endpoint, HeaderMatch, HttpRoute, LoadBalancer, Protocol, RequestMatch,
        RouteAction, Service, ServicePort, StringMatch, WAYPOINT_CONFIG_VERSION, WaypointConfig,
        WaypointName, WeightedCluster, Workload,
    },
};
use kmesh_tests::{
    Agent, AgentDir, AgentOptions, AgentSource, Pod, TestCgroup, TestNetwork, http_probe::Daemon,
    probe::workspace_bin, write_atomically,
};

// Shared with the other benchmarks, which use the parts this one does not.
#[allow(dead_code)]
#[path = "authz/http_server.rs"]
mod http_server;
#[path = "shared/listening.rs"]
mod listening;
#[path = "waypoint_parts/nginx.rs"]
mod nginx;
#[allow(dead_code)]
#[path = "authz/wrk.rs"]
mod wrk;
#[path = "shared/wrk_rounds.rs"]
mod wrk_rounds;

use http_server::HttpServer;
use nginx::{Nginx, NginxRoute};
use wrk::{Connections, WrkRun};
use wrk_rounds::{ModeRounds, WrkPath};

const NODE: &str = "bench-node";
const SUBNET: u8 = 61;
/// reviews' port, bound to the waypoint, and the port v2, v3 and nginx listen on.
const REVIEWS_PORT: u16 = 9080;
const WAYPOINT_PORT: u16 = 15008;
const ADMIN_PORT: u16 = 15021;
/// wrk's connections (one thread), as the data plane benchmark's.
const WRK_CONNECTIONS: usize = 4;
/// The servers' threads, one connection each: wrk's, and the idle connections both proxies keep.
const SERVER_WORKERS: usize = 64;
/// The header of the route, on every measured request.
const JASON: &str = "end-user: jason";
const READY: Duration = Duration::from_secs(20);

struct Plan {
    rounds: usize,
    seconds: u32,
}

fn main() {
    let smoke = std::env::args().any(|a| a == "--smoke");
    let plan = if smoke {
        Plan {
            rounds: 1,
            seconds: 1,
        }
    } else {
        Plan {
            rounds: 5,
            seconds: 3,
        }
    };
    wrk::require_wrk();
    nginx::require_nginx();
    require_curl();
    let waypoint_bin = workspace_bin("kmesh-waypoint").unwrap_or_else(|e| {
        panic!("{e} (`cargo build --release -p kmesh-waypoint` before `cargo bench`)")
    });
    require_fresh(&waypoint_bin);
    let release = waypoint_bin
        .components()
        .any(|c| c.as_os_str() == "release");
    assert!(
        release || smoke,
        "the full run measures the release waypoint, and {} is not one: run it with `cargo bench`",
        waypoint_bin.display()
    );
    // The waypoint's runtime has a worker thread per CPU (tokio's default), or as many as
    // TOKIO_WORKER_THREADS says (tokio reads it; the waypoint inherits the bench's environment):
    // nginx gets as many worker processes.
    let threads = std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    println!(
        "kmesh-rs waypoint benchmark ({}): {} rounds x {} s per path and mode, {WRK_CONNECTIONS} \
         wrk connections; waypoint {} ({} build), nginx with {threads} workers",
        if smoke { "smoke run" } else { "full run" },
        plan.rounds,
        plan.seconds,
        waypoint_bin.display(),
        if release { "release" } else { "debug" },
    );

    let world = World::new();
    let running = world.start(threads);
    world.check_routes();
    let results = world.measure(&plan, &running);
    // Every mode's report is printed, then the verdict.
    let met: Vec<bool> = results.iter().map(report_goal).collect();
    let met = met.iter().all(|met| *met);
    println!();
    println!(
        "goal (the waypoint adds at most nginx's p50 and p99, at least nginx's requests/s), both \
         modes: {}",
        if met { "met" } else { "missed" }
    );
}

/// The pods, the agent's cgroup, pins and snapshot file, and the waypoint's configuration file.
struct World {
    _net: TestNetwork,
    cgroup: TestCgroup,
    dir: AgentDir,
    client: Pod,
    waypoint: Pod,
    nginx: Pod,
    v2: Pod,
    v3: Pod,
    snapshot_file: PathBuf,
    config_file: PathBuf,
}

/// The processes of the world, stopped when dropped.
struct Running {
    _agent: Agent,
    waypoint: Daemon,
    _nginx: Nginx,
    v2: HttpServer,
    v3: HttpServer,
}

impl World {
    fn new() -> World {
        let net = TestNetwork::new("wpbench").expect("test network");
        let pod = |name: &str, host: u8| {
            net.add_pod(name, Ipv4Addr::new(10, 244, SUBNET, host), None)
                .expect("pod")
        };
        let (client, waypoint, nginx, v2, v3) = (
            pod("client", 10),
            pod("waypoint", 100),
            pod("nginx", 101),
            pod("reviews-v2", 22),
            pod("reviews-v3", 23),
        );
        let file =
            |ext: &str| std::env::temp_dir().join(format!("kmb-wp-{}.{ext}", std::process::id()));
        World {
            cgroup: TestCgroup::new("wpbench").expect("test cgroup"),
            dir: AgentDir::new("wpbench").expect("pin directory"),
            _net: net,
            client,
            waypoint,
            nginx,
            v2,
            v3,
            snapshot_file: file("snap"),
            config_file: file("json"),
        }
    }

    /// reviews' VIP: outside every on-link prefix, so a connect the kernel does not steer fails.
    fn vip() -> IpAddr {
        Ipv4Addr::new(10, 96, SUBNET, 1).into()
    }

    fn at(pod: &Pod, port: u16) -> SocketAddr {
        SocketAddr::new(pod.ipv4().into(), port)
    }

    /// DualEngine: reviews' VIP bound to the waypoint. Returns the snapshot and reviews' id.
    fn snapshot(&self) -> (Snapshot, u32) {
        let mut b = SnapshotBuilder::new(NODE, 1, mode::DUAL_ENGINE);
        b.workload(self.client.ipv4().into(), 7);
        let waypoint = KernelEndpoint::new(self.waypoint.ipv4().into(), WAYPOINT_PORT, 9);
        let replicas = b.backend_set(lb_policy::RANDOM, &[waypoint]);
        let to_waypoint = b.route(&[(1, replicas)]);
        let reviews = b.waypoint_service(World::vip(), REVIEWS_PORT, to_waypoint);
        (b.build(), reviews)
    }

    /// bookinfo's jason route, as the compiler writes it for the waypoint.
    fn config(&self, reviews: u32) -> WaypointConfig {
        let cluster = |subset: &str, pod: &Pod| Cluster {
            name: format!("outbound|{REVIEWS_PORT}|{subset}|reviews.default.svc.cluster.local"),
            hostname: "reviews.default.svc.cluster.local".into(),
            port: REVIEWS_PORT,
            subset: Some(subset.into()),
            protocol: Protocol::Http,
            load_balancer: LoadBalancer::LeastRequest,
            endpoints: vec![Endpoint {
                address: World::at(pod, REVIEWS_PORT),
            }],
        };
        let route = |origin: &str, matches, cluster: u32| HttpRoute {
            origin: origin.into(),
            matches,
            action: RouteAction::Forward(vec![WeightedCluster {
                cluster,
                weight: 100,
                ..Default::default()
            }]),
            request_headers: Default::default(),
            response_headers: Default::default(),
            rewrite: None,
            timeout_ms: None,
            retries: None,
            fault: None,
            mirrors: vec![],
        };
        let jason = RequestMatch {
            headers: vec![HeaderMatch {
                name: "end-user".into(),
                value: Some(StringMatch::Exact("jason".into())),
                invert: false,
            }],
            ..Default::default()
        };
        WaypointConfig {
            version: WAYPOINT_CONFIG_VERSION,
            waypoint: WaypointName {
                namespace: "default".into(),
                name: "waypoint".into(),
            },
            trust_domain: "cluster.local".into(),
            services: vec![Service {
                id: reviews,
                hostname: "reviews.default.svc.cluster.local".into(),
                namespace: "default".into(),
                name: "reviews".into(),
                ports: vec![ServicePort {
                    port: REVIEWS_PORT,
                    protocol: Protocol::Http,
                    http: vec![
                        route("http[0]", vec![jason], 0),
                        route("http[1]", vec![], 1),
                    ],
                    tcp: vec![],
                }],
            }],
            clusters: vec![cluster("v2", &self.v2), cluster("v3", &self.v3)],
            workloads: vec![Workload {
                addresses: vec![self.client.ipv4().into()],
                namespace: "default".into(),
                name: "client".into(),
                workload: "client".into(),
                service_account: "client".into(),
                labels: Default::default(),
            }],
            policies: vec![],
        }
    }

    /// The servers, the agent with the snapshot, the waypoint and nginx.
    fn start(&self, threads: usize) -> Running {
        for pod in [&self.client, &self.waypoint, &self.nginx] {
            wrk::reuse_time_wait_ports(pod);
        }
        let server = |pod: &Pod, tag: &[u8; 2]| {
            HttpServer::start_tagged(pod, REVIEWS_PORT, SERVER_WORKERS, *tag).expect("HTTP server")
        };
        let (v2, v3) = (server(&self.v2, b"v2"), server(&self.v3, b"v3"));
        let (snapshot, reviews) = self.snapshot();
        write_atomically(&self.snapshot_file, &snapshot.encode().expect("encode"))
            .expect("write snapshot");
        write_atomically(&self.config_file, &self.config(reviews).to_json()).expect("config");
        let mut agent = Agent::start(&AgentOptions {
            node_name: NODE,
            source: AgentSource::File(&self.snapshot_file),
            dir: &self.dir,
            cgroup: &self.cgroup,
            extra_args: Vec::new(),
        })
        .expect("start kmesh-agent");
        agent.wait_ready(READY).expect("agent ready");
        let listen = World::at(&self.waypoint, WAYPOINT_PORT).to_string();
        let admin = format!("127.0.0.1:{ADMIN_PORT}");
        let config = self.config_file.to_string_lossy().into_owned();
        let waypoint = Daemon::spawn(
            self.waypoint.netns_name(),
            None,
            "kmesh-waypoint",
            &[
                "--listen",
                &listen,
                "--admin",
                &admin,
                "--config-file",
                &config,
            ],
        )
        .expect("kmesh-waypoint");
        let nginx = Nginx::start(
            &self.nginx,
            &NginxRoute {
                listen: World::at(&self.nginx, REVIEWS_PORT),
                jason: World::at(&self.v2, REVIEWS_PORT),
                others: World::at(&self.v3, REVIEWS_PORT),
                workers: threads,
            },
        )
        .expect("nginx");
        let mut running = Running {
            _agent: agent,
            waypoint,
            _nginx: nginx,
            v2,
            v3,
        };
        self.wait_waypoint(&mut running);
        running
    }

    fn url(&self, path: Path3) -> String {
        match path {
            Path3::Direct => format!("http://{}/", World::at(&self.v2, REVIEWS_PORT)),
            Path3::Waypoint => format!("http://{}/", SocketAddr::new(World::vip(), REVIEWS_PORT)),
            Path3::Nginx => format!("http://{}/", World::at(&self.nginx, REVIEWS_PORT)),
        }
    }

    /// The cgroup wrk runs in on `path`: the test cgroup for the VIP (where connect4 steers it),
    /// the benchmark's own (no programs) for the pod addresses.
    fn cgroup_of(&self, path: Path3) -> Option<&Path> {
        (path == Path3::Waypoint).then(|| self.cgroup.path())
    }

    /// Waits until a request through the VIP is answered by v2: the waypoint listens and has its
    /// configuration.
    fn wait_waypoint(&self, running: &mut Running) {
        let deadline = Instant::now() + READY;
        loop {
            running.waypoint.assert_running();
            let body = self.curl(Path3::Waypoint, Some(JASON));
            if body == "v2" {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the waypoint does not route after {READY:?}: {body}\n{}",
                running.waypoint.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// One request over `path` from the client pod with curl; the body, or why there is none.
    fn curl(&self, path: Path3, header: Option<&str>) -> String {
        let mut cmd = Command::new("ip");
        if let Some(cgroup) = self.cgroup_of(path) {
            kmesh_tests::cluster::process::join_cgroup_before_exec(&mut cmd, cgroup)
                .expect("curl joins the test cgroup");
        }
        cmd.args(["netns", "exec", self.client.netns_name(), "curl", "-sS"])
            .args(["--max-time", "2"]);
        if let Some(header) = header {
            cmd.args(["-H", header]);
        }
        let out = cmd.arg(self.url(path)).output().expect("run curl");
        if out.status.success() {
            String::from_utf8_lossy(&out.stdout).into_owned()
        } else {
            format!(
                "curl failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )
        }
    }

    /// Every path answers from v2 with the header; through either proxy, a request without it
    /// goes to v3 (the route is applied, not bypassed).
    fn check_routes(&self) {
        for path in Path3::ALL {
            assert_eq!(
                self.curl(path, Some(JASON)),
                "v2",
                "{} with `{JASON}`",
                path.label()
            );
        }
        for path in [Path3::Waypoint, Path3::Nginx] {
            assert_eq!(
                self.curl(path, None),
                "v3",
                "{} without `end-user`",
                path.label()
            );
        }
        println!(
            "routes checked: `{JASON}` to v2 on every path, other requests to v3 through both proxies"
        );
    }

    /// One wrk run over `path`, and the check that its requests, and only they, reached v2.
    fn wrk(&self, running: &Running, path: Path3, mode: Connections, seconds: u32) -> WrkRun {
        let before = (running.v2.answered(), running.v3.answered());
        let run = wrk::run_with_headers(
            self.client.netns_name(),
            self.cgroup_of(path),
            &self.url(path),
            mode,
            seconds,
            WRK_CONNECTIONS,
            &[JASON],
        );
        let (v2, v3) = (
            running.v2.answered() - before.0,
            running.v3.answered() - before.1,
        );
        // wrk's requests/s is its completed requests over its run (a little over `seconds`); v2 also
        // counts the requests in flight when wrk stopped.
        let expected = run.result.requests_per_s * f64::from(seconds);
        let plausible = (v2 as f64) >= 0.95 * expected && (v2 as f64) <= 1.1 * expected + 64.0;
        assert!(
            run.errors.any() || (v3 == 0 && plausible),
            "{}: v2 answered {v2} and v3 {v3} requests, wrk completed about {expected:.0}: the \
             route was not followed",
            path.label()
        );
        run
    }

    fn measure(&self, plan: &Plan, running: &Running) -> Vec<ModeRounds> {
        let paths: Vec<WrkPath> = Path3::ALL
            .iter()
            .map(|&path| WrkPath {
                label: path.label(),
                short: path.short(),
                run: Box::new(move |mode| self.wrk(running, path, mode, plan.seconds)),
            })
            .collect();
        println!();
        println!(
            "HTTP with wrk, `{JASON}` on every request ({} rounds x {} s per path and mode, \
             {WRK_CONNECTIONS} connections): each round's figure over the same round's direct \
             one, min / median / max of the rounds",
            plan.rounds, plan.seconds
        );
        [Connections::KeepAlive, Connections::PerRequest]
            .into_iter()
            .map(|mode| {
                let results = wrk_rounds::measure(&paths, mode, plan.rounds);
                wrk_rounds::print_table(&paths, &results);
                results
            })
            .collect()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.snapshot_file);
        let _ = std::fs::remove_file(&self.config_file);
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Path3 {
    Direct,
    Waypoint,
    Nginx,
}

impl Path3 {
    /// In the order of the table; the first is the baseline.
    const ALL: [Path3; 3] = [Path3::Direct, Path3::Waypoint, Path3::Nginx];

    fn index(self) -> usize {
        self as usize
    }

    fn short(self) -> &'static str {
        match self {
            Path3::Direct => "direct",
            Path3::Waypoint => "waypoint",
            Path3::Nginx => "nginx",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Path3::Direct => "direct: v2's pod IP",
            Path3::Waypoint => "waypoint: VIP, kernel, kmesh-waypoint",
            Path3::Nginx => "nginx: L7 reverse proxy, same route",
        }
    }
}

/// Prints the latency each proxy adds and the goal's three comparisons for one mode; whether all
/// three hold (on the medians of the rounds).
fn report_goal(results: &ModeRounds) -> bool {
    let minus = |this: f64, base: f64| this - base;
    let added = |path: Path3, of| results.differences(path.index(), of, minus);
    let (wp50, ng50) = (
        added(Path3::Waypoint, wrk_rounds::p50),
        added(Path3::Nginx, wrk_rounds::p50),
    );
    let (wp99, ng99) = (
        added(Path3::Waypoint, wrk_rounds::p99),
        added(Path3::Nginx, wrk_rounds::p99),
    );
    let (wp_rps, ng_rps) = (
        results.ratios(Path3::Waypoint.index(), wrk_rounds::requests_per_s),
        results.ratios(Path3::Nginx.index(), wrk_rounds::requests_per_s),
    );
    println!();
    println!(
        "  {}: added latency (the path's minus direct's, per round; min / median / max)",
        wrk_rounds::label(results.mode)
    );
    println!(
        "    {:<10} {:>26} {:>26} {:>26}",
        "", "p50 added us", "p99 added us", "req/s ratio"
    );
    for (name, p50, p99, rps) in [
        ("waypoint", &wp50, &wp99, &wp_rps),
        ("nginx", &ng50, &ng99, &ng_rps),
    ] {
        println!(
            "    {name:<10} {:>26} {:>26} {:>26}",
            spread_us(p50),
            spread_us(p99),
            wrk_rounds::spread(rps)
        );
    }
    let median = |v: &Vec<f64>| wrk_rounds::median(v.clone());
    // How many rounds agree with the medians' verdict: the spread of the verdict itself.
    let rounds_where = |a: &Vec<f64>, b: &Vec<f64>, holds: fn(f64, f64) -> bool| {
        a.iter().zip(b).filter(|(a, b)| holds(**a, **b)).count()
    };
    let at_most = |a: f64, b: f64| a <= b;
    let at_least = |a: f64, b: f64| a >= b;
    let checks = [
        (
            "p50 added: waypoint <= nginx",
            median(&wp50) <= median(&ng50),
            rounds_where(&wp50, &ng50, at_most),
            wp50.len(),
        ),
        (
            "p99 added: waypoint <= nginx",
            median(&wp99) <= median(&ng99),
            rounds_where(&wp99, &ng99, at_most),
            wp99.len(),
        ),
        (
            "req/s: waypoint >= nginx",
            median(&wp_rps) >= median(&ng_rps),
            rounds_where(&wp_rps, &ng_rps, at_least),
            wp_rps.len(),
        ),
    ];
    for (what, holds, rounds, of) in &checks {
        println!(
            "    {what:<30} {:<7} (in {rounds} of {of} rounds)",
            if *holds { "met" } else { "missed" }
        );
    }
    checks.iter().all(|c| c.1)
}

/// `min / median / max` in µs, one decimal; `-` when empty.
fn spread_us(v: &[f64]) -> String {
    if v.is_empty() {
        return "-".to_string();
    }
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{lo:.1} / {:.1} / {hi:.1}", wrk_rounds::median(v.to_vec()))
}

/// Panics with a clear message when curl is not installed (never skips).
fn require_curl() {
    if Command::new("curl").arg("--version").output().is_err() {
        panic!(
            "the waypoint benchmark checks its routes with `curl` (scripts/setup.sh installs it)"
        );
    }
}

/// Refuses a waypoint binary older than a source it is built from: the bench would measure old
/// code.
fn require_fresh(bin: &Path) {
    let built = std::fs::metadata(bin)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace");
    let mut newest: Option<(SystemTime, PathBuf)> = None;
    for source in [
        "waypoint/src",
        "waypoint/Cargo.toml",
        "snapshot/src",
        "bpf-programs/kmesh-common/src",
    ] {
        newest_file(&root.join(source), &mut newest);
    }
    if let Some((modified, file)) = newest
        && modified > built
    {
        panic!(
            "{} is older than {}: build it again (`cargo build --release -p kmesh-waypoint` for \
             `cargo bench`, `cargo build --workspace --bins` for the smoke run)",
            bin.display(),
            file.display()
        );
    }
}

fn newest_file(path: &Path, newest: &mut Option<(SystemTime, PathBuf)>) {
    let Ok(meta) = std::fs::metadata(path) else {
        return;
    };
    if meta.is_dir() {
        for entry in std::fs::read_dir(path).into_iter().flatten().flatten() {
            newest_file(&entry.path(), newest);
        }
    } else if let Ok(modified) = meta.modified()
        && newest.as_ref().is_none_or(|(n, _)| modified > *n)
    {
        *newest = Some((modified, path.to_path_buf()));
    }
}
