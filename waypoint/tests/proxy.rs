//! The waypoint proxy on loopback: real sockets, in-process upstream servers and real hyper
//! clients, no kernel. Each test runs the connection handler (`listener::serve_connection`) with
//! the origin it chooses, as the SYN reader would hand it over.
use std::{
    collections::{BTreeMap, HashSet},
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use kmesh_snapshot::waypoint::{
    AbortFault, AuthorizationPolicy, Cluster, Condition, ConditionKey, DelayFault, Endpoint, Fault,
    HashKey, Header, HeaderMatch, HeaderOps, HttpRoute, LoadBalancer, Mirror, Operation, PathMatch,
    PathRewrite, PolicyAction, PolicyTarget, Protocol, Redirect, RequestMatch, RetryOn,
    RetryPolicy, Rewrite, RouteAction, Rule, Service, ServicePort, Source, StringMatch,
    WAYPOINT_CONFIG_VERSION, WaypointConfig, WaypointName, WeightedCluster, Workload,
};
use kmesh_waypoint::{
    config_store::{self, ConfigStore, FileSource},
    listener,
    metrics::{ConnectionRefusal, Metrics},
    origin::Origin,
    proxy::{Proxy, Settings},
    table::RouteTable,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::watch,
};

const SERVICE_ID: u32 = 7;
const PORT: u16 = 9080;
const HOST: &str = "reviews:9080";

// ---- upstream servers ----

/// What an upstream server saw of one request.
#[derive(Clone, Debug)]
struct Seen {
    path: String,
    authority: String,
    headers: HeaderMap,
    body_len: usize,
}

/// An HTTP/1.1 and h2c server answering with its version (`x-echo-version` and the body).
/// Request headers steer it: `x-echo-status`, `x-echo-delay-ms`, `x-echo-fail-first: KEY` (503
/// to the first request with KEY), `x-echo-slow-first: KEY` (the first request with KEY waits a
/// second).
struct Echo {
    addr: SocketAddr,
    version: String,
    count: AtomicU64,
    seen: Mutex<Vec<Seen>>,
    first: Mutex<HashSet<String>>,
    /// Every answer waits this long (a slow mirror).
    delay: Duration,
}

impl Echo {
    async fn start(version: &str) -> Arc<Echo> {
        Echo::start_with_delay(version, Duration::ZERO).await
    }

    async fn start_with_delay(version: &str, delay: Duration) -> Arc<Echo> {
        Echo::start_at("127.0.0.1:0", version, delay).await
    }

    async fn start_at(address: &str, version: &str, delay: Duration) -> Arc<Echo> {
        let listener = TcpListener::bind(address).await.unwrap();
        let echo = Arc::new(Echo {
            addr: listener.local_addr().unwrap(),
            version: version.into(),
            count: AtomicU64::new(0),
            seen: Mutex::new(vec![]),
            first: Mutex::new(HashSet::new()),
            delay,
        });
        let server = Arc::clone(&echo);
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let server = Arc::clone(&server);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let server = Arc::clone(&server);
                        async move { Ok::<_, Infallible>(server.answer(request).await) }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        echo
    }

    fn count(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    fn last(&self) -> Seen {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("a request")
    }

    fn first_time(&self, key: &str) -> bool {
        self.first.lock().unwrap().insert(key.to_owned())
    }

    async fn answer(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let (parts, body) = request.into_parts();
        let body_len = body.collect().await.map_or(0, |b| b.to_bytes().len());
        self.count.fetch_add(1, Ordering::SeqCst);
        let authority = parts
            .uri
            .authority()
            .map(|a| a.to_string())
            .or_else(|| {
                parts
                    .headers
                    .get("host")
                    .map(|h| h.to_str().unwrap().to_owned())
            })
            .unwrap_or_default();
        self.seen.lock().unwrap().push(Seen {
            path: parts.uri.path_and_query().unwrap().to_string(),
            authority,
            headers: parts.headers.clone(),
            body_len,
        });
        let header = |name: &str| parts.headers.get(name).map(|v| v.to_str().unwrap());
        let mut delay = self.delay;
        if let Some(ms) = header("x-echo-delay-ms") {
            delay = Duration::from_millis(ms.parse().unwrap());
        }
        if let Some(key) = header("x-echo-slow-first")
            && self.first_time(&format!("slow {key}"))
        {
            delay = Duration::from_secs(1);
        }
        tokio::time::sleep(delay).await;
        let mut status = header("x-echo-status").map_or(200, |s| s.parse().unwrap());
        if let Some(key) = header("x-echo-fail-first")
            && self.first_time(&format!("fail {key}"))
        {
            status = 503;
        }
        let mut response = Response::new(Full::new(Bytes::from(self.version.clone())));
        *response.status_mut() = StatusCode::from_u16(status).unwrap();
        response
            .headers_mut()
            .insert("x-echo-version", self.version.parse().unwrap());
        response
    }
}

// ---- configurations ----

fn cluster(name: &str, echoes: &[&Arc<Echo>]) -> Cluster {
    Cluster {
        name: format!("outbound|{PORT}|{name}|reviews.default.svc.cluster.local"),
        hostname: "reviews.default.svc.cluster.local".into(),
        port: PORT,
        subset: Some(name.into()),
        protocol: Protocol::Http,
        load_balancer: LoadBalancer::LeastRequest,
        endpoints: echoes
            .iter()
            .map(|e| Endpoint { address: e.addr })
            .collect(),
    }
}

fn to(cluster: u32, weight: u32) -> WeightedCluster {
    WeightedCluster {
        cluster,
        weight,
        ..WeightedCluster::default()
    }
}

fn route(matches: Vec<RequestMatch>, action: RouteAction) -> HttpRoute {
    HttpRoute {
        origin: "test".into(),
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

fn forward_to(cluster: u32) -> HttpRoute {
    route(vec![], RouteAction::Forward(vec![to(cluster, 1)]))
}

fn config(protocol: Protocol, http: Vec<HttpRoute>, clusters: Vec<Cluster>) -> WaypointConfig {
    WaypointConfig {
        version: WAYPOINT_CONFIG_VERSION,
        waypoint: WaypointName {
            namespace: "default".into(),
            name: "waypoint".into(),
        },
        trust_domain: "cluster.local".into(),
        services: vec![Service {
            id: SERVICE_ID,
            hostname: "reviews.default.svc.cluster.local".into(),
            namespace: "default".into(),
            name: "reviews".into(),
            ports: vec![ServicePort {
                port: PORT,
                protocol,
                http,
                tcp: vec![],
            }],
        }],
        clusters,
        workloads: vec![],
        policies: vec![],
    }
}

fn header_is(name: &str, value: &str) -> RequestMatch {
    RequestMatch {
        headers: vec![HeaderMatch {
            name: name.into(),
            value: Some(StringMatch::Exact(value.into())),
            invert: false,
        }],
        ..RequestMatch::default()
    }
}

// ---- the waypoint ----

struct Waypoint {
    addr: SocketAddr,
    store: Arc<ConfigStore>,
    metrics: Metrics,
    drain: watch::Sender<bool>,
}

const ORIGIN: Origin = Origin {
    service_id: SERVICE_ID,
    port: PORT,
};

/// A waypoint serving `config`, every connection with `origin`.
async fn waypoint_with_origin(config: WaypointConfig, origin: Option<Origin>) -> Waypoint {
    waypoint_at("127.0.0.1:0", config, origin).await
}

async fn waypoint_at(address: &str, config: WaypointConfig, origin: Option<Origin>) -> Waypoint {
    let metrics = Metrics::new();
    let store = Arc::new(ConfigStore::new(metrics.clone()));
    store.install(RouteTable::new(config).expect("a valid test configuration"));
    let (drain, draining) = watch::channel(false);
    let settings = Settings {
        sniff_timeout: Duration::from_millis(100),
        connect_timeout: Duration::from_secs(1),
        max_replay_body: 1 << 20,
        seed: Some(11),
    };
    let proxy = Arc::new(Proxy::new(
        Arc::clone(&store),
        metrics.clone(),
        settings,
        draining,
    ));
    let listener = TcpListener::bind(address).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, peer) = listener.accept().await.unwrap();
            tokio::spawn(listener::serve_connection(
                stream,
                peer,
                origin,
                Arc::clone(&proxy),
            ));
        }
    });
    Waypoint {
        addr,
        store,
        metrics,
        drain,
    }
}

async fn waypoint(config: WaypointConfig) -> Waypoint {
    waypoint_with_origin(config, Some(ORIGIN)).await
}

// ---- clients ----

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn http1() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

fn h2c() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
    elapsed: Duration,
}

impl Answer {
    fn version(&self) -> &str {
        self.headers
            .get("x-echo-version")
            .map_or("-", |v| v.to_str().unwrap())
    }
}

async fn send(
    client: &HttpClient,
    waypoint: &Waypoint,
    path: &str,
    headers: &[(&str, &str)],
) -> Answer {
    let mut request = Request::builder()
        .uri(format!("http://{}{path}", waypoint.addr))
        .header("host", HOST);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let start = Instant::now();
    let response = client
        .request(request.body(Full::new(Bytes::new())).unwrap())
        .await
        .expect("an answer");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
        elapsed: start.elapsed(),
    }
}

async fn get(waypoint: &Waypoint, path: &str, headers: &[(&str, &str)]) -> Answer {
    send(&http1(), waypoint, path, headers).await
}

// ---- routes ----

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bookinfo_jason_goes_to_v2_and_everyone_else_to_v3() {
    let (v1, v2, v3) = (
        Echo::start("v1").await,
        Echo::start("v2").await,
        Echo::start("v3").await,
    );
    let routes = vec![
        route(
            vec![header_is("end-user", "jason")],
            RouteAction::Forward(vec![to(1, 1)]),
        ),
        forward_to(2),
    ];
    let clusters = vec![
        cluster("v1", &[&v1]),
        cluster("v2", &[&v2]),
        cluster("v3", &[&v3]),
    ];
    let waypoint = waypoint(config(Protocol::Http, routes, clusters)).await;
    for _ in 0..10 {
        let jason = get(&waypoint, "/reviews/0", &[("end-user", "jason")]).await;
        assert_eq!((jason.status, jason.version()), (StatusCode::OK, "v2"));
        let other = get(&waypoint, "/reviews/0", &[("end-user", "mary")]).await;
        assert_eq!((other.status, other.version()), (StatusCode::OK, "v3"));
        let nobody = get(&waypoint, "/reviews/0", &[]).await;
        assert_eq!(nobody.version(), "v3");
    }
    assert_eq!(v1.count(), 0);
    // The upstream sees the service's authority, not its own address.
    assert_eq!(v2.last().authority, HOST);
    let metrics = waypoint.metrics.render();
    assert!(
        metrics.contains("istio_requests_total{reporter=\"waypoint\""),
        "{metrics}"
    );
    assert!(
        metrics.contains("destination_service=\"reviews.default.svc.cluster.local\""),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ipv6_clients_and_endpoints() {
    let v6 = Echo::start_at("[::1]:0", "v6", Duration::ZERO).await;
    let mut h2_cluster = cluster("v6", &[&v6]);
    h2_cluster.protocol = Protocol::Http2;
    let waypoint = waypoint_at(
        "[::1]:0",
        config(
            Protocol::Http,
            vec![
                route(
                    vec![header_is("x-test", "h2")],
                    RouteAction::Forward(vec![to(1, 1)]),
                ),
                forward_to(0),
            ],
            vec![cluster("v6", &[&v6]), h2_cluster],
        ),
        Some(ORIGIN),
    )
    .await;
    assert!(waypoint.addr.is_ipv6());
    for headers in [&[][..], &[("x-test", "h2")][..]] {
        let answer = get(&waypoint, "/", headers).await;
        assert_eq!((answer.status, answer.version()), (StatusCode::OK, "v6"));
        assert_eq!(v6.last().authority, HOST);
    }
    assert_eq!(v6.count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_no_route_matches_is_a_404() {
    let v1 = Echo::start("v1").await;
    let routes = vec![route(
        vec![RequestMatch {
            path: Some(PathMatch::Prefix("/reviews".into())),
            ..RequestMatch::default()
        }],
        RouteAction::Forward(vec![to(0, 1)]),
    )];
    let waypoint = waypoint(config(Protocol::Http, routes, vec![cluster("v1", &[&v1])])).await;
    let answer = get(&waypoint, "/ratings", &[]).await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    assert_eq!(answer.body, "route not found");
    assert_eq!(v1.count(), 0);
    let metrics = waypoint.metrics.render();
    assert!(
        metrics.contains("response_code=\"404\",response_flags=\"NR\""),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fault_abort_answers_its_status_and_delay_holds_the_request() {
    let v1 = Echo::start("v1").await;
    let mut abort = forward_to(0);
    abort.matches = vec![header_is("x-test", "abort")];
    abort.fault = Some(Fault {
        delay: None,
        abort: Some(AbortFault {
            status: 418,
            percent: 100.0,
        }),
    });
    let mut delay = forward_to(0);
    delay.fault = Some(Fault {
        delay: Some(DelayFault {
            fixed_delay_ms: 300,
            percent: 100.0,
        }),
        abort: None,
    });
    let waypoint = waypoint(config(
        Protocol::Http,
        vec![abort, delay],
        vec![cluster("v1", &[&v1])],
    ))
    .await;
    for _ in 0..5 {
        let answer = get(&waypoint, "/", &[("x-test", "abort")]).await;
        assert_eq!(answer.status.as_u16(), 418);
        assert_eq!(answer.body, "fault filter abort");
    }
    assert_eq!(v1.count(), 0, "an aborted request never reaches upstream");
    let answer = get(&waypoint, "/", &[]).await;
    assert_eq!((answer.status, answer.version()), (StatusCode::OK, "v1"));
    assert!(
        answer.elapsed >= Duration::from_millis(300),
        "{:?}",
        answer.elapsed
    );
    let metrics = waypoint.metrics.render();
    assert!(metrics.contains("response_flags=\"FI\""), "{metrics}");
    assert!(metrics.contains("response_flags=\"DI\""), "{metrics}");
}

fn retries(attempts: u32, per_try_timeout_ms: Option<u64>, on: RetryOn) -> RetryPolicy {
    RetryPolicy {
        attempts,
        per_try_timeout_ms,
        retry_on: vec![on],
        retriable_status_codes: vec![],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_first_try_is_retried() {
    let v1 = Echo::start("v1").await;
    let mut retried = forward_to(0);
    retried.retries = Some(retries(2, None, RetryOn::FiveXx));
    let waypoint = waypoint(config(
        Protocol::Http,
        vec![retried],
        vec![cluster("v1", &[&v1])],
    ))
    .await;
    let answer = get(&waypoint, "/", &[("x-echo-fail-first", "a")]).await;
    assert_eq!((answer.status, answer.version()), (StatusCode::OK, "v1"));
    assert_eq!(v1.count(), 2, "the first try and its retry");
    // Every try fails: the last answer, with URX.
    let answer = get(&waypoint, "/", &[("x-echo-status", "503")]).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(v1.count(), 2 + 3);
    assert!(
        waypoint
            .metrics
            .render()
            .contains("response_code=\"503\",response_flags=\"URX\"")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retried_body_is_sent_again_and_a_body_too_large_to_keep_is_sent_once() {
    let v1 = Echo::start("v1").await;
    let mut retried = forward_to(0);
    retried.retries = Some(retries(2, None, RetryOn::FiveXx));
    let waypoint = waypoint(config(
        Protocol::Http,
        vec![retried],
        vec![cluster("v1", &[&v1])],
    ))
    .await;
    let post = |key: &str, len: usize| {
        Request::post(format!("http://{}/", waypoint.addr))
            .header("host", HOST)
            .header("x-echo-fail-first", key)
            .body(Full::new(Bytes::from(vec![b'x'; len])))
            .unwrap()
    };
    let client = http1();
    let within = Duration::from_secs(5);
    let response = tokio::time::timeout(within, client.request(post("small", 10_000)))
        .await
        .expect("an answer in time")
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(v1.count(), 2);
    assert_eq!(
        v1.last().body_len,
        10_000,
        "the retry carries the whole body"
    );
    // Past the 1 MiB kept for replay: streamed once, so the first try's 503 is the answer.
    let response = tokio::time::timeout(within, client.request(post("large", 3 << 20)))
        .await
        .expect("an answer in time")
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(v1.count(), 3);
    assert_eq!(v1.last().body_len, 3 << 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn timeouts_answer_504_and_a_slow_try_is_retried() {
    let v1 = Echo::start("v1").await;
    let mut route_timeout = forward_to(0);
    route_timeout.matches = vec![header_is("x-test", "route")];
    route_timeout.timeout_ms = Some(200);
    let mut per_try = forward_to(0);
    per_try.timeout_ms = Some(3000);
    per_try.retries = Some(retries(2, Some(150), RetryOn::GatewayError));
    let waypoint = waypoint(config(
        Protocol::Http,
        vec![route_timeout, per_try],
        vec![cluster("v1", &[&v1])],
    ))
    .await;
    let answer = get(
        &waypoint,
        "/",
        &[("x-test", "route"), ("x-echo-delay-ms", "2000")],
    )
    .await;
    assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(answer.body, "upstream request timeout");
    assert!(
        answer.elapsed < Duration::from_millis(1000),
        "{:?}",
        answer.elapsed
    );
    assert!(
        answer.elapsed >= Duration::from_millis(200),
        "{:?}",
        answer.elapsed
    );
    // The first try is slow (1 s): its per-try deadline passes, the retry answers.
    let answer = get(&waypoint, "/", &[("x-echo-slow-first", "k")]).await;
    assert_eq!((answer.status, answer.version()), (StatusCode::OK, "v1"));
    assert!(
        answer.elapsed < Duration::from_millis(900),
        "{:?}",
        answer.elapsed
    );
    // Every try slow: 504 once the retries are spent.
    let answer = get(&waypoint, "/", &[("x-echo-delay-ms", "1000")]).await;
    assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(
        waypoint
            .metrics
            .render()
            .contains("response_code=\"504\",response_flags=\"UT,URX\"")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn weights_80_20_over_2000_requests() {
    let (v1, v2) = (Echo::start("v1").await, Echo::start("v2").await);
    let routes = vec![route(
        vec![],
        RouteAction::Forward(vec![to(0, 80), to(1, 20)]),
    )];
    let clusters = vec![cluster("v1", &[&v1]), cluster("v2", &[&v2])];
    let waypoint = waypoint(config(Protocol::Http, routes, clusters)).await;
    let client = http1();
    let mut by_version = BTreeMap::<String, u32>::new();
    for _ in 0..2000 {
        let answer = send(&client, &waypoint, "/", &[]).await;
        assert_eq!(answer.status, StatusCode::OK);
        *by_version.entry(answer.version().to_owned()).or_default() += 1;
    }
    let v1_share = f64::from(by_version["v1"]) / 2000.0;
    assert!((0.77..=0.83).contains(&v1_share), "{by_version:?}");
    assert_eq!(u64::from(by_version["v1"]), v1.count());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn header_operations_reach_the_upstream_and_the_client() {
    let v1 = Echo::start("v1").await;
    let header = |name: &str, value: &str| Header {
        name: name.into(),
        value: value.into(),
    };
    let mut edited = route(
        vec![],
        RouteAction::Forward(vec![WeightedCluster {
            cluster: 0,
            weight: 1,
            request_headers: HeaderOps {
                remove: vec![],
                set: vec![header("x-destination", "v1")],
                add: vec![],
            },
            response_headers: HeaderOps {
                remove: vec![],
                set: vec![header("x-response-destination", "v1")],
                add: vec![],
            },
        }]),
    );
    edited.request_headers = HeaderOps {
        remove: vec!["x-secret".into()],
        set: vec![header("x-set", "route"), header("x-destination", "route")],
        add: vec![header("x-add", "two")],
    };
    edited.response_headers = HeaderOps {
        remove: vec!["x-echo-version".into()],
        set: vec![header("x-response", "route")],
        add: vec![],
    };
    let waypoint = waypoint(config(
        Protocol::Http,
        vec![edited],
        vec![cluster("v1", &[&v1])],
    ))
    .await;
    let answer = get(
        &waypoint,
        "/",
        &[("x-secret", "s"), ("x-set", "client"), ("x-add", "one")],
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    let seen = v1.last().headers;
    let all = |name: &str| -> Vec<&str> {
        seen.get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect()
    };
    assert!(seen.get("x-secret").is_none());
    assert_eq!(all("x-set"), ["route"]);
    assert_eq!(all("x-add"), ["one", "two"]);
    assert_eq!(all("x-destination"), ["v1"], "the destination's set wins");
    assert_eq!(answer.headers.get("x-response").unwrap(), "route");
    assert_eq!(answer.headers.get("x-response-destination").unwrap(), "v1");
    assert!(answer.headers.get("x-echo-version").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redirect_answers_its_status_and_location() {
    let redirect = route(
        vec![],
        RouteAction::Redirect(Redirect {
            scheme: None,
            authority: Some("ratings".into()),
            port: None,
            path: Some(PathRewrite::Full("/v2/ratings".into())),
            status: 302,
        }),
    );
    let waypoint = waypoint(config(Protocol::Http, vec![redirect], vec![])).await;
    let answer = get(&waypoint, "/ratings/1?x=y", &[]).await;
    assert_eq!(answer.status, StatusCode::FOUND);
    assert_eq!(
        answer.headers.get("location").unwrap(),
        "http://ratings:9080/v2/ratings?x=y"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_prefix_rewrite_changes_the_path_and_authority_upstream() {
    let v1 = Echo::start("v1").await;
    let mut rewritten = route(
        vec![RequestMatch {
            path: Some(PathMatch::Prefix("/reviews/".into())),
            ..RequestMatch::default()
        }],
        RouteAction::Forward(vec![to(0, 1)]),
    );
    rewritten.rewrite = Some(Rewrite {
        path: Some(PathRewrite::MatchedPrefix("/api/v1/".into())),
        authority: Some("reviews-v1:9080".into()),
    });
    let waypoint = waypoint(config(
        Protocol::Http,
        vec![rewritten],
        vec![cluster("v1", &[&v1])],
    ))
    .await;
    let answer = get(&waypoint, "/reviews/1?user=2", &[]).await;
    assert_eq!(answer.status, StatusCode::OK);
    let seen = v1.last();
    assert_eq!(seen.path, "/api/v1/1?user=2");
    assert_eq!(seen.authority, "reviews-v1:9080");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mirror_gets_about_half_and_never_delays_the_client() {
    let v1 = Echo::start("v1").await;
    let mirror = Echo::start_with_delay("mirror", Duration::from_secs(2)).await;
    let mut mirrored = forward_to(0);
    mirrored.mirrors = vec![Mirror {
        cluster: 1,
        percent: 50.0,
    }];
    let waypoint = waypoint(config(
        Protocol::Http,
        vec![mirrored],
        vec![cluster("v1", &[&v1]), cluster("mirror", &[&mirror])],
    ))
    .await;
    let client = http1();
    for _ in 0..400 {
        let answer = send(&client, &waypoint, "/", &[]).await;
        assert_eq!((answer.status, answer.version()), (StatusCode::OK, "v1"));
        assert!(
            answer.elapsed < Duration::from_millis(500),
            "the client waited {:?}",
            answer.elapsed
        );
    }
    // The mirror counts a request when it arrives (before its 2 s sleep).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mirrored = mirror.count();
    assert!((160..=240).contains(&mirrored), "{mirrored} of 400");
    assert_eq!(v1.count(), 400);
    assert!(mirror.last().authority.starts_with("reviews-shadow"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn h2c_with_50_concurrent_streams_on_one_connection() {
    let v1 = Echo::start("v1").await;
    let mut slow = forward_to(0);
    slow.request_headers.set = vec![Header {
        name: "x-echo-delay-ms".into(),
        value: "200".into(),
    }];
    let waypoint = waypoint(config(
        Protocol::Http2,
        vec![slow],
        vec![cluster("v1", &[&v1])],
    ))
    .await;
    let stream = TcpStream::connect(waypoint.addr).await.unwrap();
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let start = Instant::now();
    let mut streams = tokio::task::JoinSet::new();
    for i in 0..50 {
        let mut sender = sender.clone();
        let uri = format!("http://{HOST}/stream/{i}");
        streams.spawn(async move {
            let request = Request::get(uri).body(Full::new(Bytes::new())).unwrap();
            let response = sender.send_request(request).await.unwrap();
            let status = response.status();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            (status, body)
        });
    }
    while let Some(done) = streams.join_next().await {
        let (status, body) = done.unwrap();
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"v1"[..]));
    }
    // Concurrent: 50 requests of 200 ms each, in far less than 50 × 200 ms.
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(v1.count(), 50);
    assert_eq!(v1.last().authority, HOST, "the :authority is the service's");
    // An HTTP/2-only port refuses HTTP/1.1.
    let mut s = TcpStream::connect(waypoint.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut buf)).await;
    assert!(!String::from_utf8_lossy(&buf).contains("200"));
    assert_eq!(v1.count(), 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn h2c_on_an_http_port_and_to_an_http2_cluster() {
    let v1 = Echo::start("v1").await;
    let mut h2_cluster = cluster("v1", &[&v1]);
    h2_cluster.protocol = Protocol::Http2;
    let waypoint = waypoint(config(
        Protocol::Http,
        vec![forward_to(0)],
        vec![h2_cluster],
    ))
    .await;
    // HTTP/1.1 client, HTTP/2 upstream.
    let answer = get(&waypoint, "/one", &[]).await;
    assert_eq!((answer.status, answer.version()), (StatusCode::OK, "v1"));
    assert_eq!(v1.last().authority, HOST);
    // h2c client on an `Http` port.
    let answer = send(&h2c(), &waypoint, "/two", &[]).await;
    assert_eq!((answer.status, answer.version()), (StatusCode::OK, "v1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_consistent_hash_on_a_header_keeps_a_key_on_one_endpoint() {
    let echoes = [
        Echo::start("a").await,
        Echo::start("b").await,
        Echo::start("c").await,
    ];
    let mut hashed = cluster("all", &[&echoes[0], &echoes[1], &echoes[2]]);
    hashed.load_balancer = LoadBalancer::ConsistentHash(HashKey::Header("x-user".into()));
    let waypoint = waypoint(config(Protocol::Http, vec![forward_to(0)], vec![hashed])).await;
    let client = http1();
    let mut used = HashSet::new();
    for user in 0..30 {
        let user = format!("user-{user}");
        let mut versions = HashSet::new();
        for _ in 0..10 {
            let answer = send(&client, &waypoint, "/", &[("x-user", &user)]).await;
            versions.insert(answer.version().to_owned());
        }
        assert_eq!(versions.len(), 1, "{user}: {versions:?}");
        used.extend(versions);
    }
    assert_eq!(used.len(), 3, "keys spread over every endpoint");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cookie_hash_sets_its_cookie_and_keeps_the_client_on_one_endpoint() {
    let echoes = [
        Echo::start("a").await,
        Echo::start("b").await,
        Echo::start("c").await,
    ];
    let mut hashed = cluster("all", &[&echoes[0], &echoes[1], &echoes[2]]);
    hashed.load_balancer =
        LoadBalancer::ConsistentHash(HashKey::Cookie(kmesh_snapshot::waypoint::HashCookie {
            name: "session".into(),
            path: Some("/".into()),
            ttl_ms: Some(60_000),
        }));
    let waypoint = waypoint(config(Protocol::Http, vec![forward_to(0)], vec![hashed])).await;
    let first = get(&waypoint, "/", &[]).await;
    let cookie = first
        .headers
        .get("set-cookie")
        .expect("a Set-Cookie for a client without the cookie")
        .to_str()
        .unwrap()
        .to_owned();
    assert!(cookie.starts_with("session="), "{cookie}");
    assert!(cookie.contains("Max-Age=60; Path=/"), "{cookie}");
    let pair = cookie.split(';').next().unwrap();
    for _ in 0..10 {
        let answer = get(&waypoint, "/", &[("cookie", pair)]).await;
        assert_eq!(answer.version(), first.version());
        assert!(answer.headers.get("set-cookie").is_none());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_endpoint_is_503_uh_and_a_refused_connect_is_503_uf() {
    let mut empty = cluster("empty", &[]);
    empty.endpoints.clear();
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let mut refusing = cluster("refusing", &[]);
    refusing.endpoints = vec![Endpoint { address: closed }];
    let mut to_empty = forward_to(0);
    to_empty.matches = vec![header_is("x-test", "empty")];
    let waypoint = waypoint(config(
        Protocol::Http,
        vec![to_empty, forward_to(1)],
        vec![empty, refusing],
    ))
    .await;
    let answer = get(&waypoint, "/", &[("x-test", "empty")]).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.body, "no healthy upstream");
    let answer = get(&waypoint, "/", &[]).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    let metrics = waypoint.metrics.render();
    assert!(metrics.contains("response_flags=\"UH\""), "{metrics}");
    assert!(metrics.contains("response_flags=\"UF\""), "{metrics}");
}

// ---- TCP ----

/// A server that writes a banner first, then echoes what it reads until the client ends its
/// writes, then writes `bye\r\n` (after the client's half-close: only a proxy that passes the
/// half-close on and keeps the other direction open delivers it) and closes.
async fn banner_server(banner: &'static [u8]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                stream.write_all(banner).await.unwrap();
                let mut buf = [0u8; 4096];
                loop {
                    let n = stream.read(&mut buf).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    stream.write_all(&buf[..n]).await.unwrap();
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                let _ = stream.write_all(b"bye\r\n").await;
                let _ = stream.shutdown().await;
            });
        }
    });
    addr
}

fn tcp_config(protocol: Protocol, upstream: SocketAddr) -> WaypointConfig {
    let mut config = config(
        protocol,
        vec![],
        vec![Cluster {
            endpoints: vec![Endpoint { address: upstream }],
            ..cluster("tcp", &[])
        }],
    );
    config.services[0].ports[0].tcp = vec![to(0, 1)];
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tcp_pass_through_with_a_server_first_protocol() {
    let upstream = banner_server(b"220 ready\r\n").await;
    let waypoint = waypoint(tcp_config(Protocol::Tcp, upstream)).await;
    let mut client = TcpStream::connect(waypoint.addr).await.unwrap();
    // The server speaks first: the client reads without having written.
    let mut banner = [0u8; 11];
    tokio::time::timeout(Duration::from_secs(2), client.read_exact(&mut banner))
        .await
        .expect("the banner without writing first")
        .unwrap();
    assert_eq!(&banner, b"220 ready\r\n");
    let payload: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    client.write_all(&payload).await.unwrap();
    // Half-close: the client ends its writes, the server sees it, answers the rest and closes.
    client.shutdown().await.unwrap();
    let mut echoed = Vec::new();
    client.read_to_end(&mut echoed).await.unwrap();
    assert_eq!(echoed.len(), payload.len() + 5);
    assert!(echoed == [&payload[..], b"bye\r\n"].concat());
    tokio::time::sleep(Duration::from_millis(50)).await;
    let metrics = waypoint.metrics.render();
    assert!(
        metrics.contains("istio_tcp_connections_closed_total{reporter=\"waypoint\""),
        "{metrics}"
    );
    assert!(metrics.contains("} 100000"), "received bytes: {metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_detect_port_passes_bytes_that_are_not_http_unaltered() {
    let upstream = banner_server(b"").await;
    let waypoint = waypoint(tcp_config(Protocol::Detect, upstream)).await;
    let mut client = TcpStream::connect(waypoint.addr).await.unwrap();
    let garbage = b"\x16\x03\x01\x00\xffnot http at all\r\n\x00\x01get / HTTP/1.1\r\n";
    client.write_all(garbage).await.unwrap();
    client.shutdown().await.unwrap();
    let mut echoed = Vec::new();
    client.read_to_end(&mut echoed).await.unwrap();
    assert_eq!(&echoed[..], &[&garbage[..], b"bye\r\n"].concat()[..]);
    // A server-first protocol on a Detect port: TCP after the sniff timeout.
    let upstream = banner_server(b"* OK IMAP4 ready\r\n").await;
    let waypoint = waypoint_with_origin(tcp_config(Protocol::Detect, upstream), Some(ORIGIN)).await;
    let mut client = TcpStream::connect(waypoint.addr).await.unwrap();
    let mut banner = [0u8; 18];
    tokio::time::timeout(Duration::from_secs(2), client.read_exact(&mut banner))
        .await
        .expect("the banner after the sniff timeout")
        .unwrap();
    assert_eq!(&banner, b"* OK IMAP4 ready\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_detect_port_serves_http_by_its_routes() {
    let v1 = Echo::start("v1").await;
    let waypoint = waypoint(config(
        Protocol::Detect,
        vec![forward_to(0)],
        vec![cluster("v1", &[&v1])],
    ))
    .await;
    let answer = get(&waypoint, "/", &[]).await;
    assert_eq!((answer.status, answer.version()), (StatusCode::OK, "v1"));
    let answer = send(&h2c(), &waypoint, "/", &[]).await;
    assert_eq!((answer.status, answer.version()), (StatusCode::OK, "v1"));
}

// ---- AuthorizationPolicy ----

/// The client's principal: the workload at 127.0.0.1 (where the tests' clients connect from, unless
/// they bind 127.0.0.2, an address no workload has).
const PRODUCTPAGE: &str = "cluster.local/ns/default/sa/bookinfo-productpage";

fn productpage_at_loopback() -> Workload {
    Workload {
        addresses: vec!["127.0.0.1".parse().unwrap()],
        namespace: "default".into(),
        name: "productpage-1".into(),
        workload: "productpage".into(),
        service_account: "bookinfo-productpage".into(),
        labels: BTreeMap::new(),
    }
}

fn authz_policy(name: &str, action: PolicyAction, rule: Rule) -> AuthorizationPolicy {
    AuthorizationPolicy {
        name: format!("default/{name}"),
        action,
        applies_to: PolicyTarget::Services(vec![SERVICE_ID]),
        rules: vec![rule],
    }
}

/// ALLOW from productpage; DENY `/admin*`; DENY requests with `x-block`.
fn guarded(mut config: WaypointConfig) -> WaypointConfig {
    config.workloads = vec![productpage_at_loopback()];
    config.policies = vec![
        authz_policy(
            "allow-productpage",
            PolicyAction::Allow,
            Rule {
                from: vec![Source {
                    principals: vec![PRODUCTPAGE.into()],
                    ..Source::default()
                }],
                ..Rule::default()
            },
        ),
        authz_policy(
            "deny-admin",
            PolicyAction::Deny,
            Rule {
                to: vec![Operation {
                    paths: vec!["/admin*".into()],
                    ..Operation::default()
                }],
                ..Rule::default()
            },
        ),
        authz_policy(
            "deny-blocked",
            PolicyAction::Deny,
            Rule {
                when: vec![Condition {
                    key: ConditionKey::RequestHeader("x-block".into()),
                    values: vec!["*".into()],
                    not_values: vec![],
                }],
                ..Rule::default()
            },
        ),
    ];
    config
}

/// An HTTP/1.1 client whose connections come from `source`.
fn http1_from(source: &str) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_local_address(Some(source.parse().unwrap()));
    Client::builder(TokioExecutor::new()).build(connector)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn authorization_policies_answer_403_to_what_they_deny() {
    let v1 = Echo::start("v1").await;
    let waypoint = waypoint(guarded(config(
        Protocol::Http,
        vec![forward_to(0)],
        vec![cluster("v1", &[&v1])],
    )))
    .await;
    let allowed = get(&waypoint, "/reviews/1", &[]).await;
    assert_eq!((allowed.status, allowed.version()), (StatusCode::OK, "v1"));
    for (path, headers) in [
        ("/admin/users", &[][..]),
        ("/reviews/1", &[("x-block", "1")][..]),
    ] {
        let denied = get(&waypoint, path, headers).await;
        assert_eq!(denied.status, StatusCode::FORBIDDEN, "{path} {headers:?}");
        assert_eq!(denied.body, "RBAC: access denied");
        assert_eq!(denied.version(), "-");
    }
    // A client that is no workload has no principal: the ALLOW policy does not allow it.
    let stranger = send(&http1_from("127.0.0.2"), &waypoint, "/reviews/1", &[]).await;
    assert_eq!(stranger.status, StatusCode::FORBIDDEN);
    assert_eq!(stranger.body, "RBAC: access denied");
    // h2c is judged the same.
    let h2 = send(&h2c(), &waypoint, "/admin", &[]).await;
    assert_eq!(h2.status, StatusCode::FORBIDDEN);
    assert_eq!(v1.count(), 1, "no denied request reached the upstream");
    let metrics = waypoint.metrics.render();
    assert!(
        metrics.contains("response_code=\"403\",response_flags=\"-\""),
        "{metrics}"
    );
    // The client is named by its workload (the Deployment), not its pod, as Istio does.
    assert!(
        metrics.contains("source_workload=\"productpage\",")
            && !metrics.contains("source_workload=\"productpage-1\""),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tcp_connection_is_judged_on_the_l4_attributes_and_closed_when_denied() {
    let upstream = banner_server(b"220 ready\r\n").await;
    // productpage is allowed by its principal: the connection goes through.
    let guarded_tcp = waypoint(guarded(tcp_config(Protocol::Tcp, upstream))).await;
    let mut client = TcpStream::connect(guarded_tcp.addr).await.unwrap();
    let mut banner = [0u8; 11];
    tokio::time::timeout(Duration::from_secs(2), client.read_exact(&mut banner))
        .await
        .expect("the banner")
        .unwrap();
    assert_eq!(&banner, b"220 ready\r\n");
    // A client that is no workload is not allowed: closed at once, nothing from the upstream.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut stranger = socket.connect(guarded_tcp.addr).await.unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(2), stranger.read_to_end(&mut buf))
        .await
        .expect("closed at once");
    assert!(read.is_err() || buf.is_empty(), "{buf:?}");
    assert_eq!(
        guarded_tcp
            .metrics
            .connections_refused_total(ConnectionRefusal::authz_denied),
        1
    );
    // An ALLOW policy with only L7 rules allows no TCP connection, productpage's included.
    let mut l7_only = tcp_config(Protocol::Tcp, upstream);
    l7_only.workloads = vec![productpage_at_loopback()];
    l7_only.policies = vec![authz_policy(
        "allow-get",
        PolicyAction::Allow,
        Rule {
            to: vec![Operation {
                methods: vec!["GET".into()],
                ..Operation::default()
            }],
            ..Rule::default()
        },
    )];
    let l7_only = waypoint(l7_only).await;
    let mut client = TcpStream::connect(l7_only.addr).await.unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(2), client.read_to_end(&mut buf))
        .await
        .expect("closed at once");
    assert!(read.is_err() || buf.is_empty(), "{buf:?}");
}

// ---- connections the waypoint refuses, and bad input ----

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_connection_without_origin_or_to_an_unknown_port_is_closed() {
    let v1 = Echo::start("v1").await;
    let cases = [
        (None, ConnectionRefusal::no_origin),
        (
            Some(Origin {
                service_id: SERVICE_ID,
                port: PORT + 1,
            }),
            ConnectionRefusal::unknown_service_port,
        ),
        (
            Some(Origin {
                service_id: SERVICE_ID + 1,
                port: PORT,
            }),
            ConnectionRefusal::unknown_service_port,
        ),
    ];
    for (origin, reason) in cases {
        let waypoint = waypoint_with_origin(
            config(
                Protocol::Http,
                vec![forward_to(0)],
                vec![cluster("v1", &[&v1])],
            ),
            origin,
        )
        .await;
        let mut client = TcpStream::connect(waypoint.addr).await.unwrap();
        let _ = client
            .write_all(b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n")
            .await;
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(2), client.read_to_end(&mut buf))
            .await
            .expect("closed at once");
        assert!(read.is_err() || buf.is_empty(), "{origin:?}: {buf:?}");
        assert_eq!(waypoint.metrics.connections_refused_total(reason), 1);
    }
    assert_eq!(v1.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_requests_get_an_error_not_a_panic() {
    let v1 = Echo::start("v1").await;
    let waypoint = waypoint(config(
        Protocol::Http,
        vec![forward_to(0)],
        vec![cluster("v1", &[&v1])],
    ))
    .await;
    for garbage in [
        &b"GET / HTTP/1.1\r\nHost: \xff\xfe\r\n\r\n"[..],
        b"GET /\x7f HTTP/1.1\r\n\r\n",
        b"\x00\x01\x02\x03\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"GET http://[::1 HTTP/1.1\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x04\x01\x00\x00\x00\x00\x00",
    ] {
        let mut client = TcpStream::connect(waypoint.addr).await.unwrap();
        let _ = client.write_all(garbage).await;
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), client.read_to_end(&mut buf)).await;
    }
    // A request without Host still goes through (HTTP/1.0), and the waypoint still serves.
    let mut client = TcpStream::connect(waypoint.addr).await.unwrap();
    client.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let mut buf = Vec::new();
    client.read_to_end(&mut buf).await.unwrap();
    assert!(
        buf.starts_with(b"HTTP/1.0 200"),
        "{}",
        String::from_utf8_lossy(&buf)
    );
    let answer = get(&waypoint, "/", &[]).await;
    assert_eq!(answer.status, StatusCode::OK);
}

// ---- configuration ----

fn temp_path(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("kmesh-waypoint-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// Writes `bytes` to `path` whole (a temporary file renamed over it).
fn write_config(path: &std::path::Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn wait_for_generation(store: &ConfigStore, generation: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while store.generation() < generation {
        assert!(
            Instant::now() < deadline,
            "configuration {generation} never adopted"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_configuration_swap_under_load_fails_no_request() {
    let (v1, v2) = (Echo::start("v1").await, Echo::start("v2").await);
    // The two configurations number their clusters differently: a request that took its route
    // from one and its cluster from the other would find no cluster 1 in `to_v2` (a 503), or
    // reach v2 by `to_v1`'s route.
    // Every request is held 5 ms between its route and its cluster (a fault delay), so that
    // swaps land while requests are in flight.
    let held = |cluster| {
        let mut route = forward_to(cluster);
        route.fault = Some(Fault {
            delay: Some(DelayFault {
                fixed_delay_ms: 5,
                percent: 100.0,
            }),
            abort: None,
        });
        route
    };
    let to_v1 = config(
        Protocol::Http,
        vec![held(1)],
        vec![cluster("v2", &[&v2]), cluster("v1", &[&v1])],
    );
    let to_v2 = config(Protocol::Http, vec![held(0)], vec![cluster("v2", &[&v2])]);
    let waypoint = waypoint(to_v1.clone()).await;
    let path = temp_path("swap.json");
    write_config(&path, &to_v1.to_json());
    let follower = tokio::spawn(config_store::follow(
        FileSource::new(&path, Duration::from_millis(20)),
        Arc::clone(&waypoint.store),
    ));
    wait_for_generation(&waypoint.store, 2).await;

    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = tokio::task::JoinSet::new();
    let addr = waypoint.addr;
    // Each client keeps its connection (keep-alive) through every swap.
    let keep_alive = http1();
    for _ in 0..2 {
        let stop = Arc::clone(&stop);
        let client = keep_alive.clone();
        clients.spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.load(Ordering::SeqCst) {
                let request = Request::get(format!("http://{addr}/"))
                    .header("host", HOST)
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                match client.request(request).await {
                    Ok(response) if response.status() == StatusCode::OK => {
                        let _ = response.into_body().collect().await;
                        ok += 1;
                    }
                    Ok(response) => failed.push(response.status().to_string()),
                    Err(error) => failed.push(error.to_string()),
                }
            }
            (ok, failed)
        });
    }
    let mut generation = 2;
    for swap in 0..5 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let next = if swap % 2 == 0 { &to_v2 } else { &to_v1 };
        write_config(&path, &next.to_json());
        generation += 1;
        wait_for_generation(&waypoint.store, generation).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.store(true, Ordering::SeqCst);
    let mut total = 0;
    while let Some(done) = clients.join_next().await {
        let (ok, failed) = done.unwrap();
        assert!(failed.is_empty(), "{failed:?}");
        total += ok;
    }
    assert!(total > 50, "{total} requests");
    // The last configuration sends to v2: every request from now on goes there, on the
    // connections that were open before the swap too.
    let v1_before = v1.count();
    for _ in 0..50 {
        let answer = send(&keep_alive, &waypoint, "/", &[]).await;
        assert_eq!(answer.version(), "v2");
    }
    assert_eq!(v1.count(), v1_before);
    follower.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_configuration_keeps_the_last_good_one() {
    let (v1, v2) = (Echo::start("v1").await, Echo::start("v2").await);
    let clusters = vec![cluster("v1", &[&v1]), cluster("v2", &[&v2])];
    let good = config(Protocol::Http, vec![forward_to(0)], clusters.clone());
    let waypoint = waypoint(good.clone()).await;
    let path = temp_path("refused.json");
    write_config(&path, &good.to_json());
    let follower = tokio::spawn(config_store::follow(
        FileSource::new(&path, Duration::from_millis(20)),
        Arc::clone(&waypoint.store),
    ));
    wait_for_generation(&waypoint.store, 2).await;

    let mut bad_regex = config(Protocol::Http, vec![forward_to(1)], clusters);
    bad_regex.services[0].ports[0].http[0].matches = vec![RequestMatch {
        path: Some(PathMatch::Regex("(unclosed".into())),
        ..RequestMatch::default()
    }];
    let mut unknown_cluster = good.clone();
    unknown_cluster.services[0].ports[0].http = vec![forward_to(9)];
    let bad: [&[u8]; 4] = [
        b"{ not json",
        br#"{"version": 1, "surprise": true}"#,
        &bad_regex.to_json(),
        &unknown_cluster.to_json(),
    ];
    for (i, bytes) in bad.into_iter().enumerate() {
        write_config(&path, bytes);
        let deadline = Instant::now() + Duration::from_secs(5);
        while waypoint.metrics.configs_refused_total() < i as u64 + 1 {
            assert!(Instant::now() < deadline, "configuration {i} not refused");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(waypoint.store.generation(), 2);
        let answer = get(&waypoint, "/", &[]).await;
        assert_eq!((answer.status, answer.version()), (StatusCode::OK, "v1"));
    }
    let metrics = waypoint.metrics.render();
    assert!(
        metrics.contains("kmesh_waypoint_configs_refused_total{reason=\"parse\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("kmesh_waypoint_configs_refused_total{reason=\"table\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("kmesh_waypoint_configs_refused_total{reason=\"invalid\"} 1"),
        "{metrics}"
    );
    follower.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_real_listener_closes_a_connection_whose_syn_has_no_origin() {
    // The listener keeps SYNs (TCP_SAVE_SYN) and reads each one's origin: a plain connect on
    // loopback carries none, so it is closed and counted, never proxied.
    let v1 = Echo::start("v1").await;
    let metrics = Metrics::new();
    let store = Arc::new(ConfigStore::new(metrics.clone()));
    store.install(
        RouteTable::new(config(
            Protocol::Http,
            vec![forward_to(0)],
            vec![cluster("v1", &[&v1])],
        ))
        .unwrap(),
    );
    let (drain, draining) = watch::channel(false);
    let proxy = Arc::new(Proxy::new(
        store,
        metrics.clone(),
        Settings::default(),
        draining,
    ));
    let bound = listener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = bound.local_addr().unwrap();
    let connections = Arc::new(listener::Connections::default());
    let accepting = tokio::spawn(listener::accept_loop(
        bound,
        Arc::clone(&proxy),
        Arc::clone(&connections),
    ));
    let mut client = TcpStream::connect(addr).await.unwrap();
    let _ = client
        .write_all(b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n")
        .await;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(2), client.read_to_end(&mut buf))
        .await
        .expect("closed at once");
    assert!(read.is_err() || buf.is_empty(), "{buf:?}");
    assert_eq!(
        metrics.connections_refused_total(ConnectionRefusal::no_origin),
        1
    );
    assert_eq!(v1.count(), 0);
    // The drain stops the accept loop; no connection is left.
    drain.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(2), accepting)
        .await
        .expect("the accept loop ends on drain")
        .unwrap();
    tokio::time::timeout(Duration::from_secs(2), connections.idle())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_drain_lets_the_requests_in_flight_finish() {
    let v1 = Echo::start("v1").await;
    let waypoint = waypoint(config(
        Protocol::Http,
        vec![forward_to(0)],
        vec![cluster("v1", &[&v1])],
    ))
    .await;
    let h1 = http1();
    let h2 = h2c();
    let slow = |client: HttpClient| {
        let addr = waypoint.addr;
        tokio::spawn(async move {
            let request = Request::get(format!("http://{addr}/"))
                .header("host", HOST)
                .header("x-echo-delay-ms", "300")
                .body(Full::new(Bytes::new()))
                .unwrap();
            let response = client.request(request).await.unwrap();
            let status = response.status();
            let _ = response.into_body().collect().await.unwrap();
            status
        })
    };
    let (first, second) = (slow(h1), slow(h2));
    tokio::time::sleep(Duration::from_millis(100)).await;
    waypoint.drain.send(true).unwrap();
    assert_eq!(first.await.unwrap(), StatusCode::OK);
    assert_eq!(second.await.unwrap(), StatusCode::OK);
    assert_eq!(v1.count(), 2);
}

/// An HTTP/2 upstream that refuses its first `refuse` streams (`RST_STREAM` with
/// `REFUSED_STREAM`, as a server past its stream limit does) and answers the others `200 ok`;
/// with the count of streams it saw.
async fn refusing_h2_upstream(refuse: u64) -> (SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(AtomicU64::new(0));
    let counter = seen.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let seen = counter.clone();
            tokio::spawn(async move {
                let Ok(mut connection) = h2::server::handshake(socket).await else {
                    return;
                };
                while let Some(Ok((_request, mut respond))) = connection.accept().await {
                    if seen.fetch_add(1, Ordering::SeqCst) < refuse {
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                        continue;
                    }
                    let response = Response::builder()
                        .status(StatusCode::OK)
                        .header("x-echo-version", "h2")
                        .body(())
                        .unwrap();
                    if let Ok(mut body) = respond.send_response(response, false) {
                        let _ = body.send_data(Bytes::from_static(b"ok"), true);
                    }
                }
            });
        }
    });
    (addr, seen)
}

/// A cluster of HTTP/2 endpoint `address`.
fn h2_cluster_at(address: SocketAddr) -> Cluster {
    Cluster {
        protocol: Protocol::Http2,
        endpoints: vec![Endpoint { address }],
        ..cluster("h2", &[])
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_http2_stream_is_retried_by_refused_stream_and_else_answered_503() {
    // retryOn: refused-stream: the refused first try is retried and answered.
    let (upstream, seen) = refusing_h2_upstream(1).await;
    let mut retried = forward_to(0);
    retried.retries = Some(retries(1, None, RetryOn::RefusedStream));
    let retrying = waypoint(config(
        Protocol::Http,
        vec![retried],
        vec![h2_cluster_at(upstream)],
    ))
    .await;
    let answer = get(&retrying, "/", &[]).await;
    assert_eq!((answer.status, answer.version()), (StatusCode::OK, "h2"));
    assert_eq!(
        seen.load(Ordering::SeqCst),
        2,
        "the refused try and its retry"
    );

    // No retry: Envoy's answer for a refused stream.
    let (upstream, seen) = refusing_h2_upstream(1).await;
    let waypoint = waypoint(config(
        Protocol::Http,
        vec![forward_to(0)],
        vec![h2_cluster_at(upstream)],
    ))
    .await;
    let answer = get(&waypoint, "/", &[]).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        answer.body,
        "upstream connect error or disconnect/reset before headers. reset reason: remote refused stream reset"
    );
    assert_eq!(seen.load(Ordering::SeqCst), 1);
    assert!(
        waypoint
            .metrics
            .render()
            .contains("response_code=\"503\",response_flags=\"UR\""),
        "{}",
        waypoint.metrics.render()
    );
}

/// The value of the `istio_requests_total` series whose labels contain every one of `labels`
/// (0 when there is none; a failure when several match).
fn requests_total(metrics: &str, labels: &[&str]) -> u64 {
    let values: Vec<u64> = metrics
        .lines()
        .filter(|line| line.starts_with("istio_requests_total{"))
        .filter(|line| labels.iter().all(|l| line.contains(l)))
        .map(|line| line.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert!(
        values.len() <= 1,
        "{labels:?} names several series:\n{metrics}"
    );
    values.first().copied().unwrap_or(0)
}

/// A connection's requests are counted in the series of their own labels, whatever the labels of
/// the request before on the same connection (the connection keeps its last series), and in the
/// series the current configuration names.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_request_on_a_connection_is_counted_under_its_own_labels() {
    let v1 = Echo::start("v1").await;
    let waypoint = waypoint(config(
        Protocol::Http,
        vec![forward_to(0)],
        vec![cluster("v1", &[&v1])],
    ))
    .await;
    let client = http1(); // one kept-alive connection: the requests are sent one after another
    let mut statuses = Vec::new();
    for status in ["200", "200", "503", "200", "503", "503", "404", "200"] {
        let answer = send(&client, &waypoint, "/", &[("x-echo-status", status)]).await;
        statuses.push(answer.status.as_u16());
    }
    assert_eq!(statuses, [200, 200, 503, 200, 503, 503, 404, 200]);
    let metrics = waypoint.metrics.render();
    let count = |code: &str, workload: &str| {
        requests_total(
            &metrics,
            &[
                &format!("response_code=\"{code}\""),
                &format!("source_workload=\"{workload}\""),
            ],
        )
    };
    assert_eq!(
        (
            count("200", "unknown"),
            count("503", "unknown"),
            count("404", "unknown")
        ),
        (4, 3, 1),
        "{metrics}"
    );

    // A new configuration names the client: the next request on the same connection is counted
    // under the new name.
    let mut named = config(
        Protocol::Http,
        vec![forward_to(0)],
        vec![cluster("v1", &[&v1])],
    );
    named.workloads = vec![productpage_at_loopback()];
    waypoint
        .store
        .install(RouteTable::new(named).expect("a valid test configuration"));
    let answer = send(&client, &waypoint, "/", &[]).await;
    assert_eq!(answer.status, StatusCode::OK);
    let metrics = waypoint.metrics.render();
    assert_eq!(
        requests_total(
            &metrics,
            &["response_code=\"200\"", "source_workload=\"productpage\""]
        ),
        1,
        "{metrics}"
    );
    assert_eq!(
        requests_total(
            &metrics,
            &["response_code=\"200\"", "source_workload=\"unknown\""]
        ),
        4,
        "{metrics}"
    );
}
