//! The waypoint's L7 features end to end (issue #11, item 6): a client pod (enrolled, in the test
//! cgroup, no route out) dials the reviews service's VIP; the real kernel programs, loaded by the
//! real `kmesh-agent`, steer the connection to the real `kmesh-waypoint` in its own pod, which
//! reads the original destination from the SYN and applies the route of the request to real
//! `kmesh-echo` pods that answer with their version and what they received (path, headers).
//!
//! One world for every test (`World`, one instance per test on its own subnet): reviews:9080
//! (HTTP) has one route per feature, told apart by path prefix, so that each test exercises its
//! feature alone and counts exactly what its backends saw; reviews:9400 (TCP) and reviews:9401
//! (protocol detected) pass bytes to a TCP echo. The waypoint configuration is written as a file
//! (the operator serves the same `WaypointConfig` in a cluster).
//!
//! Covered: fault abort (100 % 500) and a fixed delay, measured; retries of a failed first
//! attempt; a route timeout (504); weights 80/20 over 2,000 requests; an HTTPRoute with a header
//! match and a request header modifier; a redirect and a uri rewrite; a mirror at 50 % to a slow
//! target; h2c with 50 concurrent streams on one connection; a consistent hash on a header; an
//! AuthorizationPolicy (403 for a denied path); plain TCP passed unaltered.
//!
//! Run as root after `cargo build --workspace --bins` (scripts/test.sh does both).
use std::{collections::BTreeSet, net::SocketAddr, time::Duration};

use kmesh_common::{lb_policy, mode};
use kmesh_snapshot::{
    builder::{Endpoint as KernelEndpoint, SnapshotBuilder},
    waypoint::{
        AbortFault, AuthorizationPolicy, Cluster, DelayFault, Endpoint, Fault, HashKey, Header,
        HeaderMatch, HeaderOps, HttpRoute, LoadBalancer, Mirror, Operation, PathMatch, PathRewrite,
        PolicyAction, PolicyTarget, Protocol, Redirect, RequestMatch, RetryOn, RetryPolicy,
        Rewrite, RouteAction, Rule, Service, ServicePort, Source, StringMatch,
        WAYPOINT_CONFIG_VERSION, WaypointConfig, WaypointName, WeightedCluster, Workload,
    },
};
use kmesh_tests::{
    Agent, Pod, TempPath,
    http_probe::{COUNT_PATH, Daemon, EchoCount, HttpReport},
    waypoint_world::{Family, NODE, WAYPOINT_PORT, WaypointConfigFile, WaypointNode},
};

/// The service id the kernel writes into the SYN for every port of reviews.
const REVIEWS_ID: u32 = 4001;
/// reviews' HTTP port: every route below.
const HTTP_PORT: u16 = 9080;
/// reviews' TCP port (declared TCP: never parsed).
const TCP_PORT: u16 = 9400;
/// reviews' port whose protocol the waypoint detects from the first bytes.
const DETECT_PORT: u16 = 9401;
/// Where the echo servers answer HTTP.
const ECHO_PORT: u16 = 9080;
/// Where v1's pod echoes raw TCP.
const TCP_ECHO_PORT: u16 = 9400;

/// The fault route's fixed delay.
const FAULT_DELAY_MS: u64 = 300;
/// The timeout route's deadline.
const ROUTE_TIMEOUT_MS: u64 = 300;
/// How long the mirror target takes to answer each request.
const MIRROR_DELAY_MS: u64 = 2000;
/// The header the consistent hash is computed over.
const HASH_HEADER: &str = "x-user";
/// The client's principal (its workload's service account), which the ALLOW policy names.
const CLIENT_PRINCIPAL: &str = "cluster.local/ns/default/sa/client";

/// The path prefix of each feature's route on reviews:9080; anything else takes the catch-all
/// route to v1 (no fault, no retry, no timeout).
mod path {
    pub const ABORT: &str = "/fault/abort";
    pub const DELAY: &str = "/fault/delay";
    pub const RETRY: &str = "/retry";
    pub const TIMEOUT: &str = "/timeout";
    pub const WEIGHTED: &str = "/weighted";
    /// The HTTPRoute's path (a segment prefix).
    pub const CANARY: &str = "/canary";
    pub const REDIRECT: &str = "/old/";
    pub const REWRITE: &str = "/api/";
    pub const MIRRORED: &str = "/mirrored";
    pub const HASHED: &str = "/hashed";
    /// Denied by the AuthorizationPolicy (`/admin*`).
    pub const ADMIN: &str = "/admin";
}

/// The clusters, by index in the configuration.
#[derive(Clone, Copy)]
enum ClusterId {
    V1 = 0,
    V2 = 1,
    Mirror = 2,
    /// v1, v2 and v3, by a consistent hash on [`HASH_HEADER`].
    Hashed = 3,
    /// v1's TCP echo.
    TcpEcho = 4,
}

/// One node: the enrolled client pod, the waypoint's pod, three echo pods (v1 also echoes raw
/// TCP) and the mirror target's pod (an echo that answers after [`MIRROR_DELAY_MS`]).
struct World {
    node: WaypointNode,
    client: Pod,
    waypoint: Pod,
    v1: Pod,
    v2: Pod,
    v3: Pod,
    mirror: Pod,
    config_file: WaypointConfigFile,
    name: String,
}

/// The processes of a started world; stopped when dropped.
struct Running {
    _agent: Agent,
    _echoes: [Daemon; 4],
    waypoint: Daemon,
}

impl World {
    /// The world, started: the agent, the echo servers, and the waypoint following its
    /// configuration, all ready.
    fn start(name: &str, subnet: u8) -> (World, Running) {
        let node = WaypointNode::new(name, Family::V4, subnet);
        let w = World {
            client: node.pod("client", 10),
            waypoint: node.pod("waypoint", 100),
            v1: node.pod("echo-v1", 21),
            v2: node.pod("echo-v2", 22),
            v3: node.pod("echo-v3", 23),
            mirror: node.pod("mirror", 30),
            config_file: WaypointConfigFile::new(name),
            name: name.to_string(),
            node,
        };
        w.config_file.write(&w.config());
        let agent = w.node.start_agent(&w.snapshot());
        let tcp_echo = SocketAddr::new(w.node.addr(&w.v1), TCP_ECHO_PORT).to_string();
        let mirror_delay = MIRROR_DELAY_MS.to_string();
        let echoes = [
            w.node
                .echo(&w.v1, ECHO_PORT, "v1", &["--tcp-echo", &tcp_echo]),
            w.node.echo(&w.v2, ECHO_PORT, "v2", &[]),
            w.node.echo(&w.v3, ECHO_PORT, "v3", &[]),
            w.node.echo(
                &w.mirror,
                ECHO_PORT,
                "mirror",
                &["--delay-ms", &mirror_delay],
            ),
        ];
        let waypoint = w.node.waypoint(&w.waypoint, &w.config_file);
        let running = Running {
            _agent: agent,
            _echoes: echoes,
            waypoint,
        };
        (w, running)
    }

    /// reviews' three ports, bound to the waypoint (its one replica), under one service id.
    fn snapshot(&self) -> kmesh_snapshot::Snapshot {
        let mut b = SnapshotBuilder::new(NODE, 1, mode::DUAL_ENGINE);
        b.workload(self.node.addr(&self.client), 7);
        let waypoint = KernelEndpoint::new(self.node.addr(&self.waypoint), WAYPOINT_PORT, 9);
        let replicas = b.backend_set(lb_policy::RANDOM, &[waypoint]);
        for port in [HTTP_PORT, TCP_PORT, DETECT_PORT] {
            let to_waypoint = b.route(&[(1, replicas)]);
            b.waypoint_service(self.node.vip(1), port, to_waypoint);
        }
        let mut snapshot = b.build();
        // One Service, several ports: one id (the builder counts one per port).
        for s in &mut snapshot.services {
            s.value.service_id = REVIEWS_ID;
        }
        snapshot
    }

    fn config(&self) -> WaypointConfig {
        let endpoint = |pod: &Pod, port: u16| Endpoint {
            address: SocketAddr::new(self.node.addr(pod), port),
        };
        let cluster = |subset: &str, protocol, load_balancer, endpoints| {
            let port = if protocol == Protocol::Tcp {
                TCP_PORT
            } else {
                HTTP_PORT
            };
            Cluster {
                name: format!("outbound|{port}|{subset}|reviews.default.svc.cluster.local"),
                hostname: "reviews.default.svc.cluster.local".into(),
                port,
                subset: Some(subset.into()),
                protocol,
                load_balancer,
                endpoints,
            }
        };
        let clusters = vec![
            cluster(
                "v1",
                Protocol::Http,
                LoadBalancer::LeastRequest,
                vec![endpoint(&self.v1, ECHO_PORT)],
            ),
            cluster(
                "v2",
                Protocol::Http,
                LoadBalancer::LeastRequest,
                vec![endpoint(&self.v2, ECHO_PORT)],
            ),
            cluster(
                "mirror",
                Protocol::Http,
                LoadBalancer::LeastRequest,
                vec![endpoint(&self.mirror, ECHO_PORT)],
            ),
            cluster(
                "hashed",
                Protocol::Http,
                LoadBalancer::ConsistentHash(HashKey::Header(HASH_HEADER.into())),
                vec![
                    endpoint(&self.v1, ECHO_PORT),
                    endpoint(&self.v2, ECHO_PORT),
                    endpoint(&self.v3, ECHO_PORT),
                ],
            ),
            cluster(
                "tcp-echo",
                Protocol::Tcp,
                LoadBalancer::RoundRobin,
                vec![endpoint(&self.v1, TCP_ECHO_PORT)],
            ),
        ];
        let tcp_echo = vec![to(ClusterId::TcpEcho, 1)];
        WaypointConfig {
            version: WAYPOINT_CONFIG_VERSION,
            waypoint: WaypointName {
                namespace: "default".into(),
                name: "waypoint".into(),
            },
            trust_domain: "cluster.local".into(),
            services: vec![Service {
                id: REVIEWS_ID,
                hostname: "reviews.default.svc.cluster.local".into(),
                namespace: "default".into(),
                name: "reviews".into(),
                ports: vec![
                    ServicePort {
                        port: HTTP_PORT,
                        protocol: Protocol::Http,
                        http: reviews_routes(),
                        tcp: vec![],
                    },
                    ServicePort {
                        port: TCP_PORT,
                        protocol: Protocol::Tcp,
                        http: vec![],
                        tcp: tcp_echo.clone(),
                    },
                    ServicePort {
                        port: DETECT_PORT,
                        protocol: Protocol::Detect,
                        http: vec![forward(prefix("/"), ClusterId::V1)],
                        tcp: tcp_echo,
                    },
                ],
            }],
            clusters,
            workloads: vec![Workload {
                addresses: vec![self.node.addr(&self.client)],
                namespace: "default".into(),
                name: "client".into(),
                workload: String::new(),
                service_account: "client".into(),
                labels: Default::default(),
            }],
            policies: policies(),
        }
    }

    /// `count` requests (4 at a time, kept-alive) from the client pod to reviews:9080 at `path`,
    /// with `headers` (`name: value`) and `extra` flags of `kmesh-http` (a later flag wins).
    fn requests(&self, path: &str, count: u32, headers: &[&str], extra: &[&str]) -> HttpReport {
        let target = SocketAddr::new(self.node.vip(1), HTTP_PORT).to_string();
        let count = count.to_string();
        let mut args = vec![
            "--target",
            target.as_str(),
            "--path",
            path,
            "--count",
            count.as_str(),
            "--concurrency",
            "4",
        ];
        for h in headers {
            args.extend(["--header", h]);
        }
        args.extend(extra);
        self.node.http_in(&self.client, &args)
    }

    /// How many requests the echo server of `pod` answered so far (asked from its own pod).
    fn served(&self, pod: &Pod) -> u64 {
        let target = SocketAddr::new(self.node.addr(pod), ECHO_PORT).to_string();
        let report = self.node.http_in(
            pod,
            &["--target", &target, "--path", COUNT_PATH, "--keep-body"],
        );
        let body = report.first_body.as_deref().unwrap_or_default();
        let count: EchoCount = serde_json::from_str(body)
            .unwrap_or_else(|e| panic!("{}'s count: {e}: {report:?}", pod.name()));
        count.requests
    }

    /// `kmesh-probe --send-file` from the client pod to reviews:`port`: `count` connections, each
    /// sending `payload` and reading until the echo closes.
    fn tcp_exchanges(&self, port: u16, payload: &[u8], count: u32) -> kmesh_tests::ProbeReport {
        let file = TempPath::new(&format!("{}-{port}.payload", self.name));
        std::fs::write(file.path(), payload).expect("payload file");
        let target = SocketAddr::new(self.node.vip(1), port).to_string();
        let count = count.to_string();
        self.client
            .run_probe(
                &self.node.cgroup,
                &[
                    "--target",
                    &target,
                    "--count",
                    &count,
                    "--timeout-ms",
                    "3000",
                    "--send-file",
                    &file.path().to_string_lossy(),
                ],
            )
            .expect("kmesh-probe")
    }
}

fn to(cluster: ClusterId, weight: u32) -> WeightedCluster {
    WeightedCluster {
        cluster: cluster as u32,
        weight,
        ..Default::default()
    }
}

fn prefix(path: &str) -> RequestMatch {
    RequestMatch {
        path: Some(PathMatch::Prefix(path.into())),
        ..Default::default()
    }
}

/// A route of `matches` to `action`, with nothing else set.
fn route(origin: &str, matches: Vec<RequestMatch>, action: RouteAction) -> HttpRoute {
    HttpRoute {
        origin: origin.into(),
        matches,
        action,
        request_headers: HeaderOps::default(),
        response_headers: HeaderOps::default(),
        rewrite: None,
        timeout_ms: None,
        retries: None,
        fault: None,
        mirrors: vec![],
    }
}

fn forward(matched: RequestMatch, cluster: ClusterId) -> HttpRoute {
    let origin = format!("VirtualService default/reviews {:?}", matched.path);
    route(
        &origin,
        vec![matched],
        RouteAction::Forward(vec![to(cluster, 100)]),
    )
}

fn header(name: &str, value: &str) -> Header {
    Header {
        name: name.into(),
        value: value.into(),
    }
}

/// reviews:9080's routes, first match wins: one per feature, then a catch-all to v1.
fn reviews_routes() -> Vec<HttpRoute> {
    let mut abort = forward(prefix(path::ABORT), ClusterId::V1);
    abort.fault = Some(Fault {
        delay: None,
        abort: Some(AbortFault {
            status: 500,
            percent: 100.0,
        }),
    });
    let mut delay = forward(prefix(path::DELAY), ClusterId::V1);
    delay.fault = Some(Fault {
        delay: Some(DelayFault {
            fixed_delay_ms: FAULT_DELAY_MS,
            percent: 100.0,
        }),
        abort: None,
    });
    let mut retry = forward(prefix(path::RETRY), ClusterId::V1);
    retry.retries = Some(RetryPolicy {
        attempts: 2,
        per_try_timeout_ms: None,
        retry_on: vec![RetryOn::FiveXx],
        retriable_status_codes: vec![],
    });
    let mut timeout = forward(prefix(path::TIMEOUT), ClusterId::V1);
    timeout.timeout_ms = Some(ROUTE_TIMEOUT_MS);
    let weighted = route(
        "VirtualService default/reviews weighted",
        vec![prefix(path::WEIGHTED)],
        RouteAction::Forward(vec![to(ClusterId::V1, 80), to(ClusterId::V2, 20)]),
    );
    // An HTTPRoute as the compiler writes it: rule 0 (path and header match, a
    // RequestHeaderModifier filter) to v2, rule 1 (the path alone, no filter) to v1.
    let canary_path = Some(PathMatch::SegmentPrefix(path::CANARY.into()));
    let mut canary = route(
        "HTTPRoute default/reviews rules[0].matches[0]",
        vec![RequestMatch {
            path: canary_path.clone(),
            headers: vec![HeaderMatch {
                name: "x-canary".into(),
                value: Some(StringMatch::Exact("yes".into())),
                invert: false,
            }],
            ..Default::default()
        }],
        RouteAction::Forward(vec![to(ClusterId::V2, 1)]),
    );
    canary.request_headers = HeaderOps {
        remove: vec!["x-debug".into()],
        set: vec![header("x-route", "canary")],
        add: vec![],
    };
    let stable = route(
        "HTTPRoute default/reviews rules[1].matches[0]",
        vec![RequestMatch {
            path: canary_path,
            ..Default::default()
        }],
        RouteAction::Forward(vec![to(ClusterId::V1, 1)]),
    );
    let redirect = route(
        "VirtualService default/reviews redirect",
        vec![prefix(path::REDIRECT)],
        RouteAction::Redirect(Redirect {
            scheme: None,
            authority: Some("ratings.default.svc.cluster.local".into()),
            port: None,
            path: Some(PathRewrite::Full("/new".into())),
            status: 301,
        }),
    );
    let mut rewrite = forward(prefix(path::REWRITE), ClusterId::V1);
    rewrite.rewrite = Some(Rewrite {
        path: Some(PathRewrite::MatchedPrefix("/v1/".into())),
        authority: None,
    });
    let mut mirrored = forward(prefix(path::MIRRORED), ClusterId::V1);
    mirrored.mirrors = vec![Mirror {
        cluster: ClusterId::Mirror as u32,
        percent: 50.0,
    }];
    let hashed = forward(prefix(path::HASHED), ClusterId::Hashed);
    let catch_all = route(
        "VirtualService default/reviews catch-all",
        vec![],
        RouteAction::Forward(vec![to(ClusterId::V1, 1)]),
    );
    vec![
        abort, delay, retry, timeout, weighted, canary, stable, redirect, rewrite, mirrored,
        hashed, catch_all,
    ]
}

/// An AuthorizationPolicy targeting the waypoint that allows the client, and one targeting
/// reviews that denies `/admin*` (DENY wins over ALLOW).
fn policies() -> Vec<AuthorizationPolicy> {
    vec![
        AuthorizationPolicy {
            name: "default/allow-client".into(),
            action: PolicyAction::Allow,
            applies_to: PolicyTarget::Waypoint,
            rules: vec![Rule {
                from: vec![Source {
                    principals: vec![CLIENT_PRINCIPAL.into()],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        },
        AuthorizationPolicy {
            name: "default/deny-admin".into(),
            action: PolicyAction::Deny,
            applies_to: PolicyTarget::Services(vec![REVIEWS_ID]),
            rules: vec![Rule {
                to: vec![Operation {
                    paths: vec![format!("{}*", path::ADMIN)],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        },
    ]
}

/// The failure message's tail: the waypoint's log.
fn log(running: &Running) -> String {
    running.waypoint.stderr()
}

#[test]
fn fault_abort_answers_500_to_every_request_and_reaches_no_backend() {
    let (w, running) = World::start("wpf-abort", 230);
    let aborted = w.requests(path::ABORT, 100, &[], &["--keep-body"]);
    assert_eq!(
        (aborted.status(500), aborted.version("-"), aborted.requests),
        (100, 100, 100),
        "every request aborted with 500 by the waypoint: {aborted:?}\n{}",
        log(&running)
    );
    assert_eq!(
        aborted.first_body.as_deref(),
        Some("fault filter abort"),
        "{aborted:?}"
    );
    assert_eq!(w.served(&w.v1), 0, "an aborted request never reaches v1");
    let other = w.requests("/reviews/1", 20, &[], &[]);
    assert_eq!(
        (other.status(200), other.version("v1")),
        (20, 20),
        "the fault is its route's alone: {other:?}"
    );
}

#[test]
fn a_fixed_delay_holds_every_request_of_its_route() {
    let (w, running) = World::start("wpf-delay", 231);
    let delayed = w.requests(path::DELAY, 20, &[], &[]);
    println!("delayed: {:?}", delayed.latency_ms);
    assert_eq!(
        (delayed.status(200), delayed.version("v1")),
        (20, 20),
        "{delayed:?}\n{}",
        log(&running)
    );
    assert!(
        delayed.latency_ms.min >= FAULT_DELAY_MS as f64,
        "every delayed request takes at least {FAULT_DELAY_MS} ms: {:?}",
        delayed.latency_ms
    );
    let other = w.requests("/reviews/1", 20, &[], &[]);
    println!("undelayed: {:?}", other.latency_ms);
    assert_eq!(other.status(200), 20, "{other:?}");
    assert!(
        other.latency_ms.p50 < 100.0,
        "without the fault a request is fast: {:?}",
        other.latency_ms
    );
}

#[test]
fn a_failed_first_attempt_is_retried() {
    let (w, running) = World::start("wpf-retry", 232);
    // v1 answers 503 to the first request of each `x-echo-fail-first` key, 200 to the next.
    for key in 0..5 {
        let header = format!("x-echo-fail-first: retry-{key}");
        let retried = w.requests(path::RETRY, 1, &[&header], &[]);
        assert_eq!(
            (retried.status(200), retried.version("v1")),
            (1, 1),
            "the retry answers: {retried:?}\n{}",
            log(&running)
        );
    }
    assert_eq!(w.served(&w.v1), 10, "v1 saw two attempts per request");
    // The same failure on a route without retries reaches the client: the retry is the route's.
    let once = w.requests("/reviews/1", 1, &["x-echo-fail-first: no-retry"], &[]);
    assert_eq!(once.status(503), 1, "{once:?}");
    assert_eq!(w.served(&w.v1), 11, "one attempt without retries");
}

#[test]
fn a_backend_slower_than_the_route_timeout_gets_504() {
    let (w, running) = World::start("wpf-timeout", 233);
    let slow = w.requests(
        path::TIMEOUT,
        8,
        &["x-echo-delay-ms: 3000"],
        &["--keep-body", "--timeout-ms", "6000"],
    );
    println!("timed out: {:?}", slow.latency_ms);
    assert_eq!(
        (slow.status(504), slow.requests),
        (8, 8),
        "{slow:?}\n{}",
        log(&running)
    );
    assert_eq!(
        slow.first_body.as_deref(),
        Some("upstream request timeout"),
        "{slow:?}"
    );
    let timeout = ROUTE_TIMEOUT_MS as f64;
    assert!(
        slow.latency_ms.min >= timeout && slow.latency_ms.max < timeout + 700.0,
        "each answer comes at the route's timeout ({ROUTE_TIMEOUT_MS} ms): {:?}",
        slow.latency_ms
    );
    let fast = w.requests(path::TIMEOUT, 8, &[], &[]);
    assert_eq!(
        (fast.status(200), fast.version("v1")),
        (8, 8),
        "a backend within the deadline answers: {fast:?}"
    );
}

#[test]
fn weights_80_20_over_2000_requests() {
    let (w, running) = World::start("wpf-weights", 234);
    let report = w.requests(path::WEIGHTED, 2000, &[], &["--concurrency", "8"]);
    println!("weighted: {:?}", report.by_version);
    assert_eq!(report.status(200), 2000, "{report:?}\n{}", log(&running));
    // 80 % of 2,000 is 1,600, with a standard deviation of 18: ±90 is five of them. 50/50 (1,000)
    // or the weights swapped (400) are far outside.
    let v1 = report.version("v1");
    assert!(
        (1510..=1690).contains(&v1),
        "v1 takes about 80 %: {report:?}"
    );
    assert_eq!(v1 + report.version("v2"), 2000, "{report:?}");
    assert_eq!(w.served(&w.v1), v1);
}

#[test]
fn an_httproute_header_match_gets_its_header_modifier_and_other_requests_do_not() {
    let (w, running) = World::start("wpf-httproute", 235);
    let page = format!("{}/page", path::CANARY);
    let canary = w.requests(
        &page,
        20,
        &["x-canary: yes", "x-debug: 1"],
        &["--keep-body"],
    );
    assert_eq!(
        (canary.status(200), canary.version("v2")),
        (20, 20),
        "the header match routes to v2: {canary:?}\n{}",
        log(&running)
    );
    let seen = canary.first_echo().expect("an echo body");
    assert_eq!(
        seen.headers.get("x-route").map(Vec::as_slice),
        Some(&["canary".to_string()][..]),
        "the filter set x-route: {seen:?}"
    );
    assert!(
        !seen.headers.contains_key("x-debug"),
        "the filter removed x-debug: {seen:?}"
    );
    let stable = w.requests(&page, 20, &["x-debug: 1"], &["--keep-body"]);
    assert_eq!(
        (stable.status(200), stable.version("v1")),
        (20, 20),
        "{stable:?}"
    );
    let seen = stable.first_echo().expect("an echo body");
    assert!(
        !seen.headers.contains_key("x-route") && seen.headers.contains_key("x-debug"),
        "a request the match does not take is not modified: {seen:?}"
    );
}

#[test]
fn a_redirect_answers_301_with_its_location_and_a_rewrite_changes_the_path() {
    let (w, running) = World::start("wpf-redirect", 236);
    let old = format!("{}page?x=1", path::REDIRECT);
    let redirected = w.requests(&old, 5, &[], &["--keep-body"]);
    assert_eq!(
        (redirected.status(301), redirected.version("-")),
        (5, 5),
        "the waypoint answers the redirect itself: {redirected:?}\n{}",
        log(&running)
    );
    assert_eq!(
        redirected.first_headers.get("location").map(Vec::as_slice),
        Some(
            &[format!(
                "http://ratings.default.svc.cluster.local:{HTTP_PORT}/new?x=1"
            )][..]
        ),
        "{redirected:?}"
    );
    let api = format!("{}reviews/1?user=2", path::REWRITE);
    let rewritten = w.requests(&api, 5, &[], &["--keep-body"]);
    assert_eq!(
        (rewritten.status(200), rewritten.version("v1")),
        (5, 5),
        "{rewritten:?}"
    );
    let seen = rewritten.first_echo().expect("an echo body");
    assert_eq!(seen.path, "/v1/reviews/1?user=2", "{seen:?}");
    assert_eq!(w.served(&w.v1), 5, "the redirects reached no backend");
}

#[test]
fn a_mirror_at_50_percent_gets_about_half_and_never_delays_the_client() {
    let (w, running) = World::start("wpf-mirror", 237);
    let report = w.requests(path::MIRRORED, 400, &[], &[]);
    println!("mirrored: {:?}", report.latency_ms);
    assert_eq!(
        (report.status(200), report.version("v1")),
        (400, 400),
        "{report:?}\n{}",
        log(&running)
    );
    // The mirror target takes 2 s per request; the client never waits for it.
    assert!(
        report.latency_ms.max < 1000.0,
        "the client waited for the mirror: {:?}",
        report.latency_ms
    );
    // The mirror counts a request when it arrives (before its delay); let the last ones land.
    std::thread::sleep(Duration::from_millis(300));
    let mirrored = w.served(&w.mirror);
    println!("the mirror saw {mirrored} of 400");
    // Half of 400 is 200, with a standard deviation of 10.
    assert!(
        (150..=250).contains(&mirrored),
        "the mirror saw {mirrored} of 400"
    );
    assert_eq!(w.served(&w.v1), 400);
}

#[test]
fn h2c_with_50_concurrent_streams_on_one_connection() {
    let (w, running) = World::start("wpf-h2c", 238);
    // Each answer takes 300 ms at v1: 50 in turn would take 15 s.
    let report = w.requests(
        "/streams",
        50,
        &["x-echo-delay-ms: 300"],
        &["--h2c", "--concurrency", "50", "--keep-body"],
    );
    println!(
        "h2c: {} ms, {} connection(s)",
        report.elapsed_ms, report.connections
    );
    assert_eq!(
        (report.status(200), report.version("v1"), report.connections),
        (50, 50, 1),
        "50 streams on one connection: {report:?}\n{}",
        log(&running)
    );
    assert!(
        report.elapsed_ms < 3000,
        "the streams ran concurrently: {report:?}"
    );
    let seen = report.first_echo().expect("an echo body");
    assert_eq!(
        seen.protocol, "HTTP/2.0",
        "an h2c client's requests go upstream as HTTP/2: {seen:?}"
    );
    assert_eq!(w.served(&w.v1), 50);
}

#[test]
fn a_consistent_hash_on_a_header_keeps_each_key_on_one_endpoint() {
    let (w, running) = World::start("wpf-hash", 239);
    let mut used = BTreeSet::new();
    for key in 0..9 {
        let header = format!("{HASH_HEADER}: user-{key}");
        let report = w.requests(path::HASHED, 20, &[&header], &[]);
        assert_eq!(report.status(200), 20, "{report:?}\n{}", log(&running));
        assert_eq!(
            report.by_version.len(),
            1,
            "user-{key} always reaches the same endpoint: {report:?}"
        );
        used.extend(report.by_version.keys().cloned());
    }
    println!("9 keys over {used:?}");
    assert!(used.len() >= 2, "the keys spread: {used:?}");
}

#[test]
fn an_authorization_policy_answers_403_for_the_denied_path_and_200_for_the_allowed_one() {
    let (w, running) = World::start("wpf-authz", 240);
    let admin = format!("{}/users", path::ADMIN);
    let denied = w.requests(&admin, 20, &[], &["--keep-body"]);
    assert_eq!(
        (denied.status(403), denied.version("-")),
        (20, 20),
        "{denied:?}\n{}",
        log(&running)
    );
    assert_eq!(
        denied.first_body.as_deref(),
        Some("RBAC: access denied"),
        "{denied:?}"
    );
    let allowed = w.requests("/reviews/1", 20, &[], &[]);
    assert_eq!(
        (allowed.status(200), allowed.version("v1")),
        (20, 20),
        "{allowed:?}"
    );
    assert_eq!(w.served(&w.v1), 20, "no denied request reached v1");
}

#[test]
fn plain_tcp_to_a_bound_service_passes_unaltered() {
    let (w, running) = World::start("wpf-tcp", 241);
    // Bytes an HTTP parser would answer with a 400 (a request line, then garbage and every byte
    // value), on the port declared TCP.
    let mut http_garbage =
        b"GET / HTTP/1.1\r\nHost: \xff\xfe\r\nContent-Length: -1\r\n\r\n".to_vec();
    http_garbage.extend(0..=255u8);
    http_garbage.extend(b"\r\n\r\nPOST garbage");
    let report = w.tcp_exchanges(TCP_PORT, &http_garbage, 20);
    assert_eq!(
        (report.ok, report.replies("echoed")),
        (20, 20),
        "TCP port: {report:?}\n{}",
        log(&running)
    );
    // Binary on the detected port: not HTTP, so passed through as TCP.
    let mut binary: Vec<u8> = (0..=255u8).rev().collect();
    binary.extend(std::iter::repeat_n(0u8, 4096));
    let report = w.tcp_exchanges(DETECT_PORT, &binary, 20);
    assert_eq!(
        (report.ok, report.replies("echoed")),
        (20, 20),
        "detected port: {report:?}"
    );
    // And HTTP on the detected port is served by its routes.
    let target = SocketAddr::new(w.node.vip(1), DETECT_PORT).to_string();
    let http = w
        .node
        .http_in(&w.client, &["--target", &target, "--count", "5"]);
    assert_eq!(
        (http.status(200), http.version("v1")),
        (5, 5),
        "HTTP on the detected port: {http:?}"
    );
}

/// SIGTERM drains the waypoint: requests in flight when it comes are answered (the backend holds
/// them 800 ms), the waypoint stops listening (a new connect is refused: the kernel still steers
/// to it, nothing else takes it), and it exits 0 once its connections ended.
#[test]
fn sigterm_lets_the_requests_in_flight_finish_then_exits_0() {
    let (w, mut running) = World::start("wpf-drain", 243);
    let (in_flight, exit) = std::thread::scope(|s| {
        let in_flight = s.spawn(|| {
            w.requests(
                "/drain",
                4,
                &["x-echo-delay-ms: 800"],
                &["--timeout-ms", "5000"],
            )
        });
        std::thread::sleep(Duration::from_millis(300));
        let exit = running.waypoint.terminate(Duration::from_secs(5));
        (in_flight.join().expect("client"), exit)
    });
    assert_eq!(
        (in_flight.status(200), in_flight.requests),
        (4, 4),
        "{in_flight:?}\n{}",
        log(&running)
    );
    assert!(
        in_flight.latency_ms.min >= 800.0,
        "they were in flight: {in_flight:?}"
    );
    let exit = exit.expect("the waypoint exits within its drain timeout");
    assert!(exit.success(), "{exit:?}\n{}", log(&running));
    let after = w.requests("/drain", 2, &[], &["--timeout-ms", "1000"]);
    assert_eq!(after.status(200), 0, "{after:?}");
}
