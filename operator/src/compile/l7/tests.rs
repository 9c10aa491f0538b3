//! The waypoint's routes from bookinfo's samples and from one feature at a time. Every produced set
//! is checked with the waypoint's own validation ([`WaypointConfig::validate`]).
use std::path::Path;

use kmesh_snapshot::waypoint::{
    AbortFault, Cluster, DelayFault, Fault, HashCookie, HashKey, Header, HeaderMatch, HeaderOps,
    HttpRoute, LoadBalancer, PathMatch, PathRewrite, Protocol, Redirect, RequestMatch, RetryOn,
    RetryPolicy, Rewrite, RouteAction, Service, ServicePort, StringMatch, WAYPOINT_CONFIG_VERSION,
    WaypointConfig, WeightedCluster,
};

use super::{super::CompileOptions, ClusterSet, istio_actions::default_retry_policy};
use crate::{compile::Compiler, inputs::Inputs};

/// What the waypoint gets for one service port, and the diagnostics.
struct Waypoint {
    routes: Vec<HttpRoute>,
    clusters: Vec<Cluster>,
    diagnostics: Vec<String>,
}

/// The bookinfo cluster fixture, bookinfo's `destination-rule-all.yaml`, the bookinfo networking
/// samples `files` and `yaml`, compiled for `host:port`.
fn waypoint(files: &[&str], yaml: &str, host: &str, port: u16) -> Waypoint {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let networking = root.join("../shared/reference/istio/samples/bookinfo/networking");
    let mut inputs = Inputs::default();
    let mut texts = vec![
        std::fs::read_to_string(root.join("tests/fixtures/bookinfo/cluster.yaml"))
            .expect("the bookinfo fixture"),
    ];
    for file in ["destination-rule-all.yaml"].iter().chain(files) {
        texts.push(std::fs::read_to_string(networking.join(file)).expect("a bookinfo sample"));
    }
    texts.push(yaml.to_string());
    for text in &texts {
        let read = inputs.add_yaml(text, "test.yaml", "default");
        assert!(read.is_empty(), "{read:?}");
    }
    let options = CompileOptions::default();
    let mut c = Compiler::new(&inputs, &options);
    let catalog = c.catalog();
    let sources = c.l7_sources(&catalog);
    let service = catalog.get(host).expect("the host is a service");
    let port = service.port(port).expect("the port");
    let mut clusters = ClusterSet::default();
    let routes = c.waypoint_routes(&sources, service, port, &catalog, &mut clusters);
    let clusters = clusters.into_clusters();
    let config = WaypointConfig {
        version: WAYPOINT_CONFIG_VERSION,
        services: vec![Service {
            id: 1,
            hostname: host.to_string(),
            ports: vec![ServicePort {
                port: port.port,
                protocol: Protocol::Http,
                http: routes.clone(),
                tcp: Vec::new(),
            }],
            ..Default::default()
        }],
        clusters: clusters.clone(),
        ..Default::default()
    };
    config
        .validate()
        .expect("the waypoint accepts the configuration");
    let mut diagnostics: Vec<String> = c.diagnostics.iter().map(ToString::to_string).collect();
    diagnostics.sort();
    diagnostics.dedup();
    Waypoint {
        routes,
        clusters,
        diagnostics,
    }
}

const REVIEWS: &str = "reviews.default.svc.cluster.local";
const RATINGS: &str = "ratings.default.svc.cluster.local";

fn forward(cluster: u32) -> RouteAction {
    RouteAction::Forward(vec![WeightedCluster {
        cluster,
        weight: 1,
        ..Default::default()
    }])
}

fn route(origin: &str, matches: Vec<RequestMatch>, action: RouteAction) -> HttpRoute {
    HttpRoute {
        origin: origin.to_string(),
        matches,
        action,
        request_headers: HeaderOps::default(),
        response_headers: HeaderOps::default(),
        rewrite: None,
        timeout_ms: None,
        retries: Some(default_retry_policy()),
        fault: None,
        mirrors: Vec::new(),
    }
}

fn header_exact(name: &str, value: &str) -> RequestMatch {
    RequestMatch {
        headers: vec![HeaderMatch {
            name: name.to_string(),
            value: Some(StringMatch::Exact(value.to_string())),
            invert: false,
        }],
        ..Default::default()
    }
}

/// The names and endpoints of the clusters, in index order.
fn cluster_names(clusters: &[Cluster]) -> Vec<(String, Vec<String>)> {
    clusters
        .iter()
        .map(|c| {
            let endpoints = c.endpoints.iter().map(|e| e.address.to_string()).collect();
            (c.name.clone(), endpoints)
        })
        .collect()
}

#[test]
fn jason_goes_to_v2_and_everyone_else_to_v3() {
    let w = waypoint(
        &["virtual-service-reviews-jason-v2-v3.yaml"],
        "",
        REVIEWS,
        9080,
    );
    let origin = "VirtualService default/reviews spec.http";
    assert_eq!(
        w.routes,
        [
            route(
                &format!("{origin}[0]"),
                vec![header_exact("end-user", "jason")],
                forward(0)
            ),
            route(&format!("{origin}[1]"), Vec::new(), forward(1)),
        ]
    );
    assert_eq!(
        cluster_names(&w.clusters),
        [
            (
                format!("outbound|9080|v2|{REVIEWS}"),
                vec!["10.244.77.22:9080".to_string()]
            ),
            (
                format!("outbound|9080|v3|{REVIEWS}"),
                vec!["10.244.77.23:9080".to_string()]
            ),
        ]
    );
    assert_eq!(w.clusters[0].load_balancer, LoadBalancer::LeastRequest);
    assert!(w.diagnostics.is_empty(), "{:?}", w.diagnostics);
}

#[test]
fn reviews_80_20_splits_by_weight_into_one_cluster_each() {
    let w = waypoint(&["virtual-service-reviews-80-20.yaml"], "", REVIEWS, 9080);
    let weighted = |cluster, weight| WeightedCluster {
        cluster,
        weight,
        ..Default::default()
    };
    assert_eq!(
        w.routes[0].action,
        RouteAction::Forward(vec![weighted(0, 80), weighted(1, 20)])
    );
    let names: Vec<_> = w.clusters.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        [
            format!("outbound|9080|v1|{REVIEWS}"),
            format!("outbound|9080|v2|{REVIEWS}")
        ]
    );
}

#[test]
fn ratings_test_abort_and_delay_inject_faults_for_jason_without_retries() {
    let cases = [
        (
            "virtual-service-ratings-test-abort.yaml",
            Fault {
                delay: None,
                abort: Some(AbortFault {
                    status: 500,
                    percent: 100.0,
                }),
            },
        ),
        (
            "virtual-service-ratings-test-delay.yaml",
            Fault {
                delay: Some(DelayFault {
                    fixed_delay_ms: 7000,
                    percent: 100.0,
                }),
                abort: None,
            },
        ),
    ];
    for (file, fault) in cases {
        let w = waypoint(&[file], "", RATINGS, 9080);
        let origin = "VirtualService default/ratings spec.http";
        let mut faulty = route(
            &format!("{origin}[0]"),
            vec![header_exact("end-user", "jason")],
            forward(0),
        );
        faulty.fault = Some(fault);
        faulty.retries = None;
        assert_eq!(
            w.routes,
            [
                faulty,
                route(&format!("{origin}[1]"), Vec::new(), forward(0))
            ],
            "{file}"
        );
        assert_eq!(w.clusters.len(), 1, "one cluster: ratings v1");
    }
}

/// A Service `web` in `default` with pod `web-1`, and `OBJECTS`.
fn web(objects: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec: {{clusterIP: 10.96.9.9, ports: [{{port: 8080, name: http}}, {{port: 9090, name: grpc}}], selector: {{app: web}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: web-1, namespace: default, labels: {{app: web, version: v1}}}}
spec: {{nodeName: node-1, containers: [{{name: web}}]}}
status: {{podIP: 10.244.9.9, conditions: [{{type: Ready, status: "True"}}]}}
---
{objects}"#
    )
}
const WEB: &str = "web.default.svc.cluster.local";

#[test]
fn an_http_route_matches_a_header_modifies_headers_and_rewrites_a_prefix() {
    let yaml = web(r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 8080}]
  rules:
  - backendRefs: [{name: web, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /api/}, headers: [{name: X-Canary, value: "true"}]}]
    filters:
    - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: X-Via, value: waypoint}], remove: [X-Debug]}}
    - {type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2/}}}
    backendRefs: [{name: web, port: 8080, weight: 3}, {name: missing, port: 8080}]
"#);
    let w = waypoint(&[], &yaml, WEB, 8080);
    let canary = RequestMatch {
        path: Some(PathMatch::SegmentPrefix("/api".to_string())),
        ..header_exact("x-canary", "true")
    };
    let mut first = route(
        "HTTPRoute default/web spec.rules[1].matches[0]",
        vec![canary],
        RouteAction::Forward(vec![
            WeightedCluster {
                cluster: 0,
                weight: 3,
                ..Default::default()
            },
            WeightedCluster {
                cluster: 1,
                weight: 1,
                ..Default::default()
            },
        ]),
    );
    first.request_headers = HeaderOps {
        remove: vec!["x-debug".to_string()],
        set: vec![Header {
            name: "x-via".to_string(),
            value: "waypoint".to_string(),
        }],
        add: Vec::new(),
    };
    first.rewrite = Some(Rewrite {
        path: Some(PathRewrite::MatchedPrefix("/v2/".to_string())),
        authority: None,
    });
    let catch_all = RequestMatch {
        path: Some(PathMatch::SegmentPrefix("/".to_string())),
        ..Default::default()
    };
    // The longer prefix first, although its rule comes second.
    assert_eq!(
        w.routes,
        [
            first,
            route(
                "HTTPRoute default/web spec.rules[0]",
                vec![catch_all],
                forward(0)
            )
        ]
    );
    assert_eq!(
        cluster_names(&w.clusters)[1],
        (
            "outbound|8080||missing.default.svc.cluster.local".to_string(),
            Vec::new()
        )
    );
    assert_eq!(
        w.diagnostics,
        [
            "note: HTTPRoute default/web spec.rules[1].backendRefs[1]: an invalid backend: missing.default.svc.cluster.local:8080 is not a known service port with a VIP; its share gets a 503 from the waypoint (a cluster with no endpoints)"
        ]
    );
}

#[test]
fn redirects_and_retries_with_status_codes() {
    let yaml = web(r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: default}
spec:
  hosts: [web]
  http:
  - match: [{uri: {exact: /old}}]
    redirect: {uri: /new, authority: example.com}
  - route: [{destination: {host: web}}]
    timeout: 1.5s
    retries: {attempts: 3, perTryTimeout: 0.5s, retryOn: "gateway-error,503,504,envoy-ratelimited"}
"#);
    let w = waypoint(&[], &yaml, WEB, 8080);
    let old = RequestMatch {
        path: Some(PathMatch::Exact("/old".to_string())),
        ..Default::default()
    };
    let mut redirect = route(
        "VirtualService default/web spec.http[0]",
        vec![old],
        RouteAction::Redirect(Redirect {
            scheme: None,
            authority: Some("example.com".to_string()),
            port: None,
            path: Some(PathRewrite::Full("/new".to_string())),
            status: 301,
        }),
    );
    redirect.retries = None;
    let mut retried = route(
        "VirtualService default/web spec.http[1]",
        Vec::new(),
        forward(0),
    );
    retried.timeout_ms = Some(1500);
    retried.retries = Some(RetryPolicy {
        attempts: 3,
        per_try_timeout_ms: Some(500),
        retry_on: vec![RetryOn::GatewayError, RetryOn::RetriableStatusCodes],
        retriable_status_codes: vec![503, 504],
    });
    assert_eq!(w.routes, [redirect, retried]);
    assert_eq!(
        w.diagnostics,
        [
            "not enforced: VirtualService default/web spec.http[1].retries.retryOn: \"envoy-ratelimited\" is not a retry condition the waypoint supports; left out"
        ]
    );
}

#[test]
fn consistent_hash_on_a_header_and_on_a_cookie_with_a_ttl() {
    let yaml = web(r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: default}
spec:
  host: web
  trafficPolicy:
    loadBalancer: {consistentHash: {httpHeaderName: X-User}}
    portLevelSettings:
    - port: {number: 9090}
      loadBalancer: {consistentHash: {httpCookie: {name: session, path: /, ttl: 60s}}}
  subsets:
  - {name: v1, labels: {version: v1}, trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}}
"#);
    let on = |port| waypoint(&[], &yaml, WEB, port).clusters;
    let http = on(8080);
    assert_eq!(
        http[0].load_balancer,
        LoadBalancer::ConsistentHash(HashKey::Header("x-user".to_string()))
    );
    assert_eq!(http[0].protocol, Protocol::Http);
    let grpc = on(9090);
    assert_eq!(
        grpc[0].load_balancer,
        LoadBalancer::ConsistentHash(HashKey::Cookie(HashCookie {
            name: "session".to_string(),
            path: Some("/".to_string()),
            ttl_ms: Some(60_000),
        }))
    );
    assert_eq!(grpc[0].protocol, Protocol::Http2);
    assert_eq!(grpc[0].endpoints.len(), 1);
}

#[test]
fn cors_and_a_grpc_abort_are_reported_and_the_rest_compiled() {
    let yaml = web(r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: default}
spec:
  hosts: [web]
  http:
  - route: [{destination: {host: web}}]
    corsPolicy: {allowOrigins: [{exact: "https://example.com"}]}
    fault:
      abort: {grpcStatus: UNAVAILABLE, percentage: {value: 10}}
      delay: {fixedDelay: 0.25s, percent: 5}
"#);
    let w = waypoint(&[], &yaml, WEB, 8080);
    let mut expected = route(
        "VirtualService default/web spec.http[0]",
        Vec::new(),
        forward(0),
    );
    expected.fault = Some(Fault {
        delay: Some(DelayFault {
            fixed_delay_ms: 250,
            percent: 5.0,
        }),
        abort: None,
    });
    expected.retries = None;
    assert_eq!(w.routes, [expected]);
    assert_eq!(
        w.diagnostics,
        [
            "not enforced: VirtualService default/web spec.http[0].corsPolicy: CORS is not supported by the waypoint; the rest of the route is compiled",
            "not enforced: VirtualService default/web spec.http[0].fault.abort: only httpStatus aborts are supported by the waypoint (grpcStatus and http2Error are not); the abort is left out",
        ]
    );
}

#[test]
fn a_regex_the_waypoint_cannot_compile_leaves_out_its_match_entry_only() {
    let yaml = web(r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: default}
spec:
  hosts: [web]
  http:
  - match: [{uri: {regex: "/(unclosed"}}, {uri: {prefix: /ok}}]
    route: [{destination: {host: web}}]
  - match: [{uri: {regex: "/(unclosed"}}]
    route: [{destination: {host: web}}]
"#);
    let w = waypoint(&[], &yaml, WEB, 8080);
    let ok = RequestMatch {
        path: Some(PathMatch::Prefix("/ok".to_string())),
        ..Default::default()
    };
    // The second route is left out whole: without its only entry it would match everything.
    assert_eq!(
        w.routes,
        [route(
            "VirtualService default/web spec.http[0]",
            vec![ok],
            forward(0)
        )]
    );
    assert_eq!(w.diagnostics.len(), 3, "{:?}", w.diagnostics);
    assert!(w.diagnostics[0].starts_with(
        "note: VirtualService default/web spec.http[1].match: no match entry can match"
    ));
    assert!(w.diagnostics[1].starts_with("rejected: VirtualService default/web spec.http[0].match[0].uri: the regular expression \"/(unclosed\" does not compile"));
}

#[test]
fn a_service_without_routes_gets_one_catch_all_to_itself() {
    let w = waypoint(&[], &web(""), WEB, 8080);
    assert_eq!(
        w.routes,
        [route(
            "Service default/web (no VirtualService or HTTPRoute)",
            Vec::new(),
            forward(0)
        )]
    );
    assert_eq!(
        cluster_names(&w.clusters),
        [(
            format!("outbound|8080||{WEB}"),
            vec!["10.244.9.9:8080".to_string()]
        )]
    );
}
