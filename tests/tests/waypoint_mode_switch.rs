//! The mode switched under load (issue #11): `KmeshConfig.spec.mode` moves between KernelNative
//! and DualEngine while clients send requests, with every part real: `kmesh-operator --source dir:`
//! compiles the mesh and serves node-1's snapshot and the waypoint's configuration, the real
//! `kmesh-agent` follows it into the kernel (on a test cgroup), the real `kmesh-waypoint` follows
//! it in its own pod, and `kmesh-echo` servers answer with their version.
//!
//! The mesh is bookinfo's jason route on reviews, a Service bound to the waypoint
//! (`istio.io/use-waypoint`): under DualEngine the waypoint honours the header (`end-user: jason`
//! reaches v2), under KernelNative the kernel takes the catch-all route (v3 for everyone), so each
//! request's version says which mode carried it. The test asks, with a new connection per request
//! (steering is decided at connect(); a kept-alive connection stays on the path it was opened
//! on, as in ambient):
//! - no request fails, of two clients sending without pause through four switches;
//! - after each switch, every request follows the new mode within 2 s of the write (the source
//!   directory is read once a second, so about half of that is the operator noticing), and keeps
//!   following it until the next switch.
//!
//! The operator serves over TLS, and the agent and the waypoint verify it against its CA
//! (`--operator-ca`), with tokens of their own. The waypoint's pod reaches the operator (on the
//! host's loopback) through a relay listening in that pod, as a pod reaches the operator's Service
//! in a cluster. Run as root after
//! `cargo build --workspace --bins` (scripts/test.sh does both).
use std::{
    net::{SocketAddr, TcpListener},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use kmesh_tests::{
    AgentSource, Pod, TempPath, TestTls,
    cluster::services::relay,
    http_probe::HttpReport,
    waypoint_world::{Family, NODE, WAYPOINT_PORT, WaypointNode},
    workspace_bin,
};

/// This test's pods are 10.244.`SUBNET`.0/24, its VIPs 10.96.`SUBNET`.0/24.
const SUBNET: u8 = 242;
const REVIEWS_PORT: u16 = 9080;
/// Where the waypoint dials the operator, inside its pod (the relay's listener).
const OPERATOR_IN_POD: &str = "127.0.0.1:15012";
/// How soon after the KmeshConfig is written every request must follow the new mode.
const FOLLOW_WITHIN: Duration = Duration::from_secs(2);
const TOKENS: &str = "node-token node-1\nwaypoint-token waypoint:default/waypoint\n";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    KernelNative,
    DualEngine,
}

impl Mode {
    /// The version a request of jason's reaches in this mode: the header route is the waypoint's.
    fn jason_version(self) -> &'static str {
        match self {
            Mode::KernelNative => "v3",
            Mode::DualEngine => "v2",
        }
    }

    fn other(self) -> Mode {
        match self {
            Mode::KernelNative => Mode::DualEngine,
            Mode::DualEngine => Mode::KernelNative,
        }
    }
}

/// The cluster as the operator reads it: the jason route on reviews, bound to waypoint
/// `default/waypoint` (its Gateway, Service and one ready pod), and the KmeshConfig in `mode`.
fn mesh(mode: Mode) -> String {
    let s = SUBNET;
    format!(
        r#"
apiVersion: kmesh.net/v1alpha1
kind: KmeshConfig
metadata: {{name: default}}
spec: {{mode: {mode:?}}}
---
apiVersion: v1
kind: Node
metadata: {{name: {NODE}}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: default, labels: {{istio.io/dataplane-mode: Kmesh}}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: waypoint, namespace: default}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{{name: mesh, port: {WAYPOINT_PORT}, protocol: HBONE}}]
---
apiVersion: v1
kind: Service
metadata: {{name: waypoint, namespace: default}}
spec:
  clusterIP: 10.96.{s}.50
  ports: [{{port: {WAYPOINT_PORT}, name: mesh}}]
  selector: {{gateway.networking.k8s.io/gateway-name: waypoint}}
---
apiVersion: v1
kind: Service
metadata: {{name: reviews, namespace: default, labels: {{istio.io/use-waypoint: waypoint}}}}
spec:
  clusterIP: 10.96.{s}.13
  ports: [{{port: {REVIEWS_PORT}, name: http}}]
  selector: {{app: reviews}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews, namespace: default}}
spec:
  host: reviews
  subsets:
  - {{name: v2, labels: {{version: v2}}}}
  - {{name: v3, labels: {{version: v3}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: default}}
spec:
  hosts: [reviews]
  http:
  - match: [{{headers: {{end-user: {{exact: jason}}}}}}]
    route: [{{destination: {{host: reviews, subset: v2}}}}]
  - route: [{{destination: {{host: reviews, subset: v3}}}}]
{waypoint_pod}{v2}{v3}{client}"#,
        waypoint_pod = pod(
            "waypoint-1",
            100,
            "{gateway.networking.k8s.io/gateway-name: waypoint, gateway.istio.io/managed: kmesh.net-waypoint-controller}",
            WAYPOINT_PORT,
        ),
        v2 = pod(
            "reviews-v2",
            22,
            "{app: reviews, version: v2}",
            REVIEWS_PORT
        ),
        v3 = pod(
            "reviews-v3",
            23,
            "{app: reviews, version: v3}",
            REVIEWS_PORT
        ),
        client = pod("client", 10, "{app: client}", 8080),
    )
}

/// A ready pod on node-1 at 10.244.`SUBNET`.`host`.
fn pod(name: &str, host: u8, labels: &str, port: u16) -> String {
    format!(
        r#"---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: default, labels: {labels}}}
spec:
  nodeName: {NODE}
  serviceAccountName: {name}
  containers: [{{name: main, ports: [{{containerPort: {port}}}]}}]
status:
  phase: Running
  podIP: 10.244.{SUBNET}.{host}
  podIPs: [{{ip: 10.244.{SUBNET}.{host}}}]
  conditions: [{{type: Ready, status: "True"}}]
"#
    )
}

/// Writes the mesh in `mode` into the operator's source directory, whole: staged, then renamed.
fn write_mesh(source: &Path, mode: Mode) {
    let staged = source.with_extension("staged");
    std::fs::write(&staged, mesh(mode)).expect("stage the mesh");
    std::fs::rename(&staged, source.join("mesh.yaml")).expect("write the mesh");
}

/// A child process killed when dropped, with its output kept in a file for a failing test.
struct Operator {
    child: std::process::Child,
    log: TempPath,
}

impl Operator {
    fn start(source: &Path, listen: SocketAddr, tokens: &Path, tls: &TestTls) -> Operator {
        let log = TempPath::new("wpmode-operator.log");
        let out = std::fs::File::create(log.path()).expect("operator log");
        let metrics = free_port();
        let child = std::process::Command::new(workspace_bin("kmesh-operator").expect("binary"))
            .arg(format!("--source=dir:{}", source.display()))
            .arg(format!("--listen={listen}"))
            .arg(format!("--metrics-addr=127.0.0.1:{metrics}"))
            .arg(format!("--auth=static:{}", tokens.display()))
            .arg("--tls-cert")
            .arg(&tls.cert_file)
            .arg("--tls-key")
            .arg(&tls.key_file)
            .stdin(std::process::Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start kmesh-operator");
        Operator { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    kmesh_tests::ports::free_loopback_port().expect("a free loopback port")
}

/// A listener inside `pod` relaying each connection to `target` on the host's loopback, until
/// dropped.
struct PodToHostRelay {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PodToHostRelay {
    fn start(pod: &Pod, listen: SocketAddr, target: SocketAddr) -> PodToHostRelay {
        let listener = pod
            .run_in(move || {
                let l = TcpListener::bind(listen)?;
                l.set_nonblocking(true)?;
                Ok(l)
            })
            .expect("the relay's listener in the pod");
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        // This thread is the test's, in the host's network namespace: `relay` dials the host.
        let thread = std::thread::spawn(move || {
            while !stopping.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((inbound, _)) => {
                        std::thread::spawn(move || relay(inbound, target));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        PodToHostRelay {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for PodToHostRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The node (`WaypointNode`: network, cgroup, pins) and its pods.
struct World {
    node: WaypointNode,
    client: Pod,
    waypoint: Pod,
    v2: Pod,
    v3: Pod,
}

impl World {
    fn new(name: &str) -> World {
        let node = WaypointNode::new(name, Family::V4, SUBNET);
        World {
            client: node.pod("client", 10),
            waypoint: node.pod("waypoint", 100),
            v2: node.pod("reviews-v2", 22),
            v3: node.pod("reviews-v3", 23),
            node,
        }
    }

    /// `count` requests of jason's to reviews' VIP from the client pod, a connection each.
    fn jason_requests(&self, count: u32) -> HttpReport {
        let target = format!("10.96.{SUBNET}.13:{REVIEWS_PORT}");
        let count = count.to_string();
        self.node.http_in(
            &self.client,
            &[
                "--target",
                &target,
                "--count",
                &count,
                "--concurrency",
                "4",
                "--new-connections",
                "--header",
                "end-user: jason",
                "--timeout-ms",
                "2000",
            ],
        )
    }
}

/// Asks rounds of jason's requests from `written` on until a whole round follows `mode`, then for
/// 1 s more (every round must); returns how long after `written` the first such round started.
fn wait_until_followed(w: &World, mode: Mode, written: Instant) -> Duration {
    let expected = mode.jason_version();
    let mut followed_from: Option<Duration> = None;
    loop {
        let started = written.elapsed();
        let round = w.jason_requests(20);
        let follows = round.version(expected) == 20 && round.status(200) == 20;
        match followed_from {
            None if follows => followed_from = Some(started),
            None => assert!(
                started < FOLLOW_WITHIN,
                "{mode:?}: requests still do not follow it {started:?} after the switch: {round:?}"
            ),
            Some(from) => {
                assert!(
                    follows,
                    "{mode:?}: requests followed it from {from:?}, then not at {started:?}: {round:?}"
                );
                if started > from + Duration::from_secs(1) {
                    return from;
                }
            }
        }
    }
}

#[test]
fn switching_the_mode_under_load_fails_no_request_and_is_followed_within_2_s() {
    let w = World::new("wpmode");
    let dir = TempPath::new("wpmode");
    std::fs::create_dir_all(dir.path()).unwrap();
    let source = dir.path().join("source");
    std::fs::create_dir_all(&source).unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, TOKENS).unwrap();
    let node_token = dir.path().join("node-token");
    std::fs::write(&node_token, "node-token\n").unwrap();
    let waypoint_token = dir.path().join("waypoint-token");
    std::fs::write(&waypoint_token, "waypoint-token\n").unwrap();

    let mut mode = Mode::KernelNative;
    write_mesh(&source, mode);
    let operator_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let tls = TestTls::new("wpmode").expect("certificates");
    let operator = Operator::start(&source, operator_addr, &tokens, &tls);

    let agent = w.node.start_agent_from(AgentSource::Operator {
        url: format!("https://{operator_addr}"),
        token_file: Some(&node_token),
        ca_file: Some(&tls.ca_file),
    });
    let _echoes = [
        w.node.echo(&w.v2, REVIEWS_PORT, "v2", &[]),
        w.node.echo(&w.v3, REVIEWS_PORT, "v3", &[]),
    ];

    let _relay =
        PodToHostRelay::start(&w.waypoint, OPERATOR_IN_POD.parse().unwrap(), operator_addr);
    let operator_url = format!("https://{OPERATOR_IN_POD}");
    let token = waypoint_token.to_string_lossy().into_owned();
    let ca = tls.ca_file.to_string_lossy().into_owned();
    let waypoint = w.node.waypoint_following(
        &w.waypoint,
        &[
            "--operator",
            &operator_url,
            "--waypoint",
            "default/waypoint",
            "--token-file",
            &token,
            "--operator-ca",
            &ca,
        ],
    );

    // KernelNative: the header route is not the kernel's; jason reaches v3 like everyone.
    let before = w.jason_requests(40);
    assert_eq!(
        (before.status(200), before.version("v3")),
        (40, 40),
        "{before:?}\noperator:\n{}",
        operator.log()
    );

    let stop = dir.path().join("stop");
    let (load, follow_times) = std::thread::scope(|s| {
        let clients: Vec<_> = (0..2)
            .map(|_| {
                let (w, stop) = (&w, &stop);
                s.spawn(move || {
                    let target = format!("10.96.{SUBNET}.13:{REVIEWS_PORT}");
                    let until = stop.to_string_lossy().into_owned();
                    w.node.http_in(
                        &w.client,
                        &[
                            "--target",
                            &target,
                            "--until-file",
                            &until,
                            "--concurrency",
                            "2",
                            "--new-connections",
                            "--header",
                            "end-user: jason",
                            "--timeout-ms",
                            "3000",
                        ],
                    )
                })
            })
            .collect();
        let mut follow_times = Vec::new();
        for _ in 0..4 {
            std::thread::sleep(Duration::from_millis(300));
            mode = mode.other();
            let written = Instant::now();
            write_mesh(&source, mode);
            follow_times.push((mode, wait_until_followed(&w, mode, written)));
        }
        std::fs::write(&stop, b"").unwrap();
        let load: Vec<HttpReport> = clients
            .into_iter()
            .map(|c| c.join().expect("client"))
            .collect();
        (load, follow_times)
    });
    println!("every request followed the new mode after: {follow_times:?}");

    for report in &load {
        assert!(report.requests > 100, "{report:?}");
        assert_eq!(
            (report.status(200), report.errors.len()),
            (report.requests, 0),
            "no request failed: {report:?}\nwaypoint:\n{}",
            waypoint.stderr()
        );
        assert!(
            report.version("v2") > 0 && report.version("v3") > 0,
            "the load was carried by both modes: {report:?}"
        );
    }
    drop(agent);
}
