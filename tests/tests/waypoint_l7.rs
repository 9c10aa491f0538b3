//! DualEngine end to end (issue #11): a client pod's connect to a waypoint-bound service is
//! steered by the real kernel programs (loaded by the real `kmesh-agent` on a test cgroup) to the
//! real `kmesh-waypoint` in its own pod, which reads the original destination from the SYN and
//! routes each request by the L7 configuration it follows (a file here; the operator serves it in
//! a cluster) to real HTTP servers (`kmesh-echo`, one per version) that answer with their version.
//!
//! - bookinfo's `virtual-service-reviews-jason-v2-v3.yaml`, as the waypoint configuration the
//!   compiler writes for it: `end-user: jason` goes to v2, every other request to v3; over IPv4
//!   and IPv6;
//! - a server-first TCP protocol through the waypoint: the client reads the server's banner
//!   without writing a byte;
//! - a waypoint-bound service whose waypoint has no ready replica: the connect is refused, never
//!   sent around the waypoint;
//! - a configuration swap under load: 0 failed requests, and once swapped every request follows
//!   the new routes.
//!
//! The clients dial service VIPs outside every on-link prefix, inside their pod (no route out), so
//! a connect the kernel does not steer fails locally. Run as root after
//! `cargo build --workspace --bins` (scripts/test.sh does both).
use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    time::Duration,
};

use kmesh_common::{lb_policy, mode};
use kmesh_snapshot::{
    builder::{Endpoint as KernelEndpoint, SnapshotBuilder},
    waypoint::{
        Cluster, Endpoint, HeaderMatch, HttpRoute, LoadBalancer, Protocol, RequestMatch,
        RouteAction, Service, ServicePort, StringMatch, WAYPOINT_CONFIG_VERSION, WaypointConfig,
        WaypointName, WeightedCluster, Workload,
    },
};
use kmesh_tests::{
    Agent, Pod,
    http_probe::{Daemon, HttpReport},
    waypoint_world::{Family, NODE, WAYPOINT_PORT, WaypointConfigFile, WaypointNode},
};

/// reviews: HTTP, bound to the waypoint.
const REVIEWS_PORT: u16 = 9080;
/// A server-first TCP service, bound to the waypoint.
const BANNER_PORT: u16 = 9300;
/// The port the echo servers listen on.
const ECHO_PORT: u16 = 9080;
/// The port the banner server (v3's pod) listens on.
const BANNER_SERVER_PORT: u16 = 9301;

/// One node (`WaypointNode`): an enrolled client pod, the waypoint's pod, and reviews v2 and v3
/// pods, and the waypoint's configuration file.
struct World {
    node: WaypointNode,
    client: Pod,
    waypoint: Pod,
    v2: Pod,
    v3: Pod,
    config_file: WaypointConfigFile,
}

impl World {
    fn new(name: &str, family: Family, subnet: u8) -> World {
        let node = WaypointNode::new(name, family, subnet);
        World {
            client: node.pod("client", 10),
            waypoint: node.pod("waypoint", 100),
            v2: node.pod("reviews-v2", 22),
            v3: node.pod("reviews-v3", 23),
            config_file: WaypointConfigFile::new(name),
            node,
        }
    }

    fn addr(&self, pod: &Pod) -> IpAddr {
        self.node.addr(pod)
    }

    fn vip(&self, n: u8) -> IpAddr {
        self.node.vip(n)
    }

    fn reviews(&self) -> String {
        SocketAddr::new(self.vip(1), REVIEWS_PORT).to_string()
    }

    /// reviews (VIP 1) and the banner service (VIP 2) bound to the waypoint; `unready` (VIP 3)
    /// bound to a waypoint with no ready replica. Returns the snapshot and the service ids of
    /// reviews and the banner service.
    fn snapshot(&self) -> (kmesh_snapshot::Snapshot, u32, u32) {
        let mut b = SnapshotBuilder::new(NODE, 1, mode::DUAL_ENGINE);
        b.workload(self.addr(&self.client), 7);
        let waypoint = KernelEndpoint::new(self.addr(&self.waypoint), WAYPOINT_PORT, 9);
        let replicas = b.backend_set(lb_policy::RANDOM, &[waypoint]);
        let none = b.backend_set(lb_policy::RANDOM, &[]);
        let to_waypoint = b.route(&[(1, replicas)]);
        let reviews = b.waypoint_service(self.vip(1), REVIEWS_PORT, to_waypoint);
        let to_waypoint = b.route(&[(1, replicas)]);
        let banner = b.waypoint_service(self.vip(2), BANNER_PORT, to_waypoint);
        let to_nothing = b.route(&[(1, none)]);
        b.waypoint_service(self.vip(3), REVIEWS_PORT, to_nothing);
        (b.build(), reviews, banner)
    }

    /// The waypoint configuration of reviews' jason route (v2 for `end-user: jason`, else
    /// `catch_all`), and the banner service's TCP destination.
    fn config(&self, reviews: u32, banner: u32, catch_all: &str) -> WaypointConfig {
        let cluster = |name: &str, pod: &Pod, port: u16| Cluster {
            name: format!("outbound|{port}|{name}|reviews.default.svc.cluster.local"),
            hostname: "reviews.default.svc.cluster.local".into(),
            port,
            subset: Some(name.into()),
            protocol: Protocol::Http,
            load_balancer: LoadBalancer::LeastRequest,
            endpoints: vec![Endpoint {
                address: SocketAddr::new(self.addr(pod), port),
            }],
        };
        let forward = |cluster: u32| {
            RouteAction::Forward(vec![WeightedCluster {
                cluster,
                weight: 100,
                ..Default::default()
            }])
        };
        let route = |origin: &str, matches, action| HttpRoute {
            origin: origin.into(),
            matches,
            action,
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
        let catch_all_cluster = if catch_all == "v2" { 0 } else { 1 };
        WaypointConfig {
            version: WAYPOINT_CONFIG_VERSION,
            waypoint: WaypointName {
                namespace: "default".into(),
                name: "waypoint".into(),
            },
            trust_domain: "cluster.local".into(),
            services: vec![
                Service {
                    id: reviews,
                    hostname: "reviews.default.svc.cluster.local".into(),
                    namespace: "default".into(),
                    name: "reviews".into(),
                    ports: vec![ServicePort {
                        port: REVIEWS_PORT,
                        protocol: Protocol::Http,
                        http: vec![
                            route("http[0]", vec![jason], forward(0)),
                            route("http[1]", vec![], forward(catch_all_cluster)),
                        ],
                        tcp: vec![],
                    }],
                },
                Service {
                    id: banner,
                    hostname: "banner.default.svc.cluster.local".into(),
                    namespace: "default".into(),
                    name: "banner".into(),
                    ports: vec![ServicePort {
                        port: BANNER_PORT,
                        protocol: Protocol::Tcp,
                        http: vec![],
                        tcp: vec![WeightedCluster {
                            cluster: 2,
                            weight: 1,
                            ..Default::default()
                        }],
                    }],
                },
            ],
            clusters: vec![
                cluster("v2", &self.v2, ECHO_PORT),
                cluster("v3", &self.v3, ECHO_PORT),
                cluster("banner", &self.v3, BANNER_SERVER_PORT),
            ],
            workloads: vec![Workload {
                addresses: vec![self.addr(&self.client)],
                namespace: "default".into(),
                name: "client".into(),
                workload: String::new(),
                service_account: "client".into(),
                labels: Default::default(),
            }],
            policies: vec![],
        }
    }

    /// The agent with the snapshot, the echo servers, and the waypoint following the
    /// configuration file, all ready.
    fn start(&self, catch_all: &str) -> Running {
        let (snapshot, reviews, banner) = self.snapshot();
        self.write_config(reviews, banner, catch_all);
        let agent = self.node.start_agent(&snapshot);
        let echoes = [
            self.node.echo(&self.v2, ECHO_PORT, "v2", &[]),
            self.node.echo(&self.v3, ECHO_PORT, "v3", &[]),
        ];
        let banner_server = self
            .v3
            .serve_tcp(BANNER_SERVER_PORT)
            .expect("banner server");
        let waypoint = self.node.waypoint(&self.waypoint, &self.config_file);
        Running {
            _agent: agent,
            _echoes: echoes,
            _banner: banner_server,
            waypoint,
            reviews,
            banner,
        }
    }

    fn write_config(&self, reviews: u32, banner: u32, catch_all: &str) {
        self.config_file
            .write(&self.config(reviews, banner, catch_all));
    }

    fn http_in(&self, pod: &Pod, args: &[&str]) -> HttpReport {
        self.node.http_in(pod, args)
    }

    /// `count` requests from the client pod to reviews' VIP, with `headers`.
    fn reviews_requests(&self, count: u32, headers: &[&str]) -> HttpReport {
        let target = self.reviews();
        let count = count.to_string();
        let mut args = vec![
            "--target",
            target.as_str(),
            "--count",
            count.as_str(),
            "--concurrency",
            "4",
        ];
        for h in headers {
            args.extend(["--header", h]);
        }
        self.http_in(&self.client, &args)
    }
}

/// The processes of a started world; stopped when dropped.
struct Running {
    _agent: Agent,
    _echoes: [Daemon; 2],
    _banner: kmesh_tests::netns::TcpServer,
    waypoint: Daemon,
    reviews: u32,
    banner: u32,
}

fn jason_route(name: &str, family: Family, subnet: u8) {
    let w = World::new(name, family, subnet);
    let running = w.start("v3");
    let jason = w.reviews_requests(200, &["end-user: jason"]);
    assert_eq!(
        (jason.status(200), jason.version("v2"), jason.requests),
        (200, 200, 200),
        "every request of jason reaches v2: {jason:?}\n{}",
        running.waypoint.stderr()
    );
    let others = w.reviews_requests(200, &["end-user: someone-else"]);
    assert_eq!(
        (others.status(200), others.version("v3"), others.requests),
        (200, 200, 200),
        "every other request reaches v3: {others:?}"
    );
    let anonymous = w.reviews_requests(100, &[]);
    assert_eq!(anonymous.version("v3"), 100, "{anonymous:?}");
}

#[test]
fn jason_goes_to_v2_and_everyone_else_to_v3_ipv4() {
    jason_route("wpl7-jason4", Family::V4, 220);
}

#[test]
fn jason_goes_to_v2_and_everyone_else_to_v3_ipv6() {
    jason_route("wpl7-jason6", Family::V6, 221);
}

/// The banner service's server speaks first; the client (`kmesh-probe`) writes nothing and reads
/// the banner (the v3 pod's name) through the waypoint's TCP pass-through.
#[test]
fn a_server_first_protocol_passes_through_the_waypoint() {
    let w = World::new("wpl7-banner", Family::V4, 222);
    let running = w.start("v3");
    let target = SocketAddr::new(w.vip(2), BANNER_PORT).to_string();
    let report = w
        .client
        .run_probe(
            &w.node.cgroup,
            &[
                "--target",
                &target,
                "--count",
                "100",
                "--timeout-ms",
                "3000",
            ],
        )
        .expect("probe");
    assert_eq!(
        (report.ok, report.replies("reviews-v3")),
        (100, 100),
        "{report:?}\n{}",
        running.waypoint.stderr()
    );
    assert!(running.banner != running.reviews);
}

/// A service bound to a waypoint with no ready replica: refused at connect(), not sent around.
#[test]
fn a_waypoint_without_a_ready_replica_refuses_the_connection() {
    let w = World::new("wpl7-unready", Family::V4, 223);
    let _running = w.start("v3");
    let target = SocketAddr::new(w.vip(3), REVIEWS_PORT).to_string();
    let report = w
        .client
        .run_probe(
            &w.node.cgroup,
            &["--target", &target, "--count", "20", "--timeout-ms", "1000"],
        )
        .expect("probe");
    assert_eq!(
        (report.ok, report.errors_of("ECONNREFUSED")),
        (0, 20),
        "{report:?}"
    );
}

/// Two clients send requests without pause while the catch-all route moves between v3 and v2
/// five times: no request fails, and after the last swap every request reaches the new version.
#[test]
fn a_configuration_swap_under_load_fails_no_request() {
    let w = World::new("wpl7-swap", Family::V4, 224);
    let running = w.start("v3");
    let stop = w.config_file.path().with_extension("stop");
    let _ = std::fs::remove_file(&stop);
    let load = std::thread::scope(|s| {
        let clients: Vec<_> = (0..2)
            .map(|_| {
                let (w, stop) = (&w, &stop);
                s.spawn(move || {
                    let target = w.reviews();
                    let until = stop.to_string_lossy().into_owned();
                    w.http_in(
                        &w.client,
                        &[
                            "--target",
                            &target,
                            "--until-file",
                            &until,
                            "--concurrency",
                            "2",
                        ],
                    )
                })
            })
            .collect();
        for catch_all in ["v2", "v3", "v2", "v3", "v2"] {
            std::thread::sleep(Duration::from_millis(400));
            w.write_config(running.reviews, running.banner, catch_all);
        }
        std::thread::sleep(Duration::from_millis(400));
        touch(&stop);
        clients
            .into_iter()
            .map(|c| c.join().expect("client"))
            .collect::<Vec<_>>()
    });
    let _ = std::fs::remove_file(&stop);
    for report in &load {
        assert!(report.requests > 100, "{report:?}");
        assert_eq!(
            report.status(200),
            report.requests,
            "no request failed: {report:?}"
        );
        assert!(
            report.version("v2") > 0 && report.version("v3") > 0,
            "{report:?}"
        );
    }
    let after = w.reviews_requests(100, &[]);
    assert_eq!(
        after.version("v2"),
        100,
        "the last configuration is followed: {after:?}"
    );
}

fn touch(path: &Path) {
    std::fs::write(path, b"").expect("touch");
}
