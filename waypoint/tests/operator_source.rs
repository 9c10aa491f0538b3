//! `OperatorSource` against an in-process operator that speaks the waypoint–operator contract
//! (its paths, ETags and long poll from `kmesh_snapshot::waypoint_contract`): the first `200` is
//! adopted, a held poll answers `304` and then `200` with a changed configuration, a `403` keeps
//! the configuration and is retried, a rotated token is read again, an invalid configuration is
//! refused once (not fetched again in a loop) and the last good one kept, a `404` keeps it too.
use std::{
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use kmesh_snapshot::{
    content_hash,
    contract::parse_wait,
    waypoint::{
        Cluster, Endpoint, HeaderOps, HttpRoute, LoadBalancer, Protocol, RouteAction, Service,
        ServicePort, WAYPOINT_CONFIG_VERSION, WaypointConfig, WaypointName, WeightedCluster,
    },
    waypoint_contract::{
        WAYPOINT_CONFIG_MEDIA_TYPE, waypoint_config_etag, waypoint_of_config_path,
    },
};
use kmesh_waypoint::{
    config_store::{self, ConfigStore},
    metrics::{Metrics, OperatorOutcome},
    operator_source::{OperatorSettings, OperatorSource},
    table::PortKey,
};
use tokio::{net::TcpListener, sync::Notify};

const SERVICE_ID: u32 = 7;

fn waypoint() -> WaypointName {
    WaypointName {
        namespace: "default".into(),
        name: "waypoint".into(),
    }
}

/// A valid configuration serving the reviews service on `port`.
fn config(port: u16) -> Vec<u8> {
    let route = HttpRoute {
        origin: "test".into(),
        matches: vec![],
        action: RouteAction::Forward(vec![WeightedCluster {
            cluster: 0,
            weight: 1,
            ..WeightedCluster::default()
        }]),
        request_headers: HeaderOps::default(),
        response_headers: HeaderOps::default(),
        rewrite: None,
        timeout_ms: None,
        retries: None,
        fault: None,
        mirrors: vec![],
    };
    WaypointConfig {
        version: WAYPOINT_CONFIG_VERSION,
        waypoint: waypoint(),
        trust_domain: "cluster.local".into(),
        services: vec![Service {
            id: SERVICE_ID,
            hostname: "reviews.default.svc.cluster.local".into(),
            namespace: "default".into(),
            name: "reviews".into(),
            ports: vec![ServicePort {
                port,
                protocol: Protocol::Http,
                http: vec![route],
                tcp: vec![],
            }],
        }],
        clusters: vec![Cluster {
            name: format!("outbound|{port}||reviews.default.svc.cluster.local"),
            hostname: "reviews.default.svc.cluster.local".into(),
            port,
            subset: None,
            protocol: Protocol::Http,
            load_balancer: LoadBalancer::LeastRequest,
            endpoints: vec![Endpoint {
                address: "127.0.0.1:9".parse().unwrap(),
            }],
        }],
        workloads: vec![],
        policies: vec![],
    }
    .to_json()
}

/// One request the operator saw.
#[derive(Clone, Debug)]
struct Seen {
    if_none_match: Option<String>,
    authorization: Option<String>,
    accept: Option<String>,
    status: u16,
    etag: Option<String>,
}

/// What the operator answers: its configuration (`None`: 404), a forced status, the token it
/// accepts; and every request it saw.
#[derive(Default)]
struct State {
    config: Option<Vec<u8>>,
    forced: Option<StatusCode>,
    token: String,
    seen: Vec<Seen>,
}

struct Operator {
    addr: SocketAddr,
    state: Mutex<State>,
    changed: Notify,
}

impl Operator {
    fn set(&self, change: impl FnOnce(&mut State)) {
        change(&mut self.state.lock().unwrap());
        self.changed.notify_waiters();
    }

    fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }

    fn count(&self, status: u16) -> usize {
        self.seen().iter().filter(|s| s.status == status).count()
    }

    /// The answer now, or `None` to keep holding (the ETag held is current).
    fn decide(&self, request: &Request<Incoming>, held: bool) -> Option<(StatusCode, Vec<u8>)> {
        let state = self.state.lock().unwrap();
        let bearer = format!("Bearer {}", state.token);
        let authorization = request.headers().get(header::AUTHORIZATION);
        if authorization.and_then(|v| v.to_str().ok()) != Some(bearer.as_str()) {
            return Some((StatusCode::UNAUTHORIZED, b"unknown token\n".to_vec()));
        }
        if let Some(status) = state.forced {
            return Some((status, b"forbidden by the test\n".to_vec()));
        }
        let Some(config) = &state.config else {
            return Some((StatusCode::NOT_FOUND, b"no configuration\n".to_vec()));
        };
        let etag = waypoint_config_etag(content_hash(config));
        let if_none_match = request.headers().get(header::IF_NONE_MATCH);
        if if_none_match.and_then(|v| v.to_str().ok()) == Some(etag.as_str()) {
            return (!held).then(|| (StatusCode::NOT_MODIFIED, vec![]));
        }
        Some((StatusCode::OK, config.clone()))
    }

    async fn answer(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let path_ok = waypoint_of_config_path(request.uri().path()) == Some(waypoint());
        let wait = request.uri().query().and_then(parse_wait);
        let (status, body) = match wait.filter(|_| path_ok) {
            None => (
                StatusCode::BAD_REQUEST,
                b"not the contract's URL\n".to_vec(),
            ),
            Some(wait) => {
                // The long poll: hold while the ETag is current, until a change or the wait ends.
                let deadline = tokio::time::Instant::now() + wait;
                loop {
                    let changed = self.changed.notified();
                    let held = tokio::time::Instant::now() < deadline;
                    if let Some(answer) = self.decide(&request, held) {
                        break answer;
                    }
                    let _ = tokio::time::timeout_at(deadline, changed).await;
                }
            }
        };
        let etag = (status == StatusCode::OK).then(|| waypoint_config_etag(content_hash(&body)));
        let header_of = |name| {
            request
                .headers()
                .get(name)
                .and_then(|v: &http::HeaderValue| v.to_str().ok())
                .map(str::to_string)
        };
        self.state.lock().unwrap().seen.push(Seen {
            if_none_match: header_of(header::IF_NONE_MATCH),
            authorization: header_of(header::AUTHORIZATION),
            accept: header_of(header::ACCEPT),
            status: status.as_u16(),
            etag: etag.clone(),
        });
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        if let Some(etag) = etag {
            response
                .headers_mut()
                .insert(header::ETAG, etag.parse().unwrap());
        }
        response
    }
}

async fn operator(config: Vec<u8>, token: &str) -> Arc<Operator> {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let operator = Arc::new(Operator {
        addr: listener.local_addr().unwrap(),
        state: Mutex::new(State {
            config: Some(config),
            token: token.into(),
            ..State::default()
        }),
        changed: Notify::new(),
    });
    let serving = Arc::clone(&operator);
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let operator = Arc::clone(&serving);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let operator = Arc::clone(&operator);
                    async move { Ok::<_, Infallible>(operator.answer(request).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    operator
}

/// Waits until `done` holds, at most 10 s.
async fn eventually(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within 10 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn serves(store: &ConfigStore, port: u16) -> bool {
    store.current().is_some_and(|table| {
        table
            .port(PortKey {
                service_id: SERVICE_ID,
                port,
            })
            .is_some()
    })
}

fn token_file(token: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kmesh-wp-operator-source-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("token");
    std::fs::write(&path, format!("{token}\n")).unwrap();
    path
}

#[tokio::test]
async fn the_waypoint_follows_the_operator() {
    let first = config(9080);
    let operator = operator(first.clone(), "t1").await;
    let token = token_file("t1");
    let metrics = Metrics::new();
    let store = Arc::new(ConfigStore::new(metrics.clone()));
    let settings = OperatorSettings {
        url: format!("http://{}", operator.addr),
        waypoint: waypoint(),
        ca_file: None,
        token_file: Some(token.clone()),
        wait: Duration::from_millis(300),
    };
    let source = OperatorSource::new(settings, metrics.clone()).unwrap();
    tokio::spawn(config_store::follow(source, Arc::clone(&store)));

    // The first 200 is adopted; the first request held nothing.
    eventually("the first configuration", || serves(&store, 9080)).await;
    let first_etag = waypoint_config_etag(content_hash(&first));
    let seen = operator.seen();
    assert_eq!(seen[0].status, 200, "{seen:?}");
    assert_eq!(seen[0].if_none_match, None);
    assert_eq!(seen[0].authorization.as_deref(), Some("Bearer t1"));
    assert_eq!(seen[0].accept.as_deref(), Some(WAYPOINT_CONFIG_MEDIA_TYPE));
    assert_eq!(seen[0].etag.as_deref(), Some(first_etag.as_str()));

    // Held polls with the ETag are answered 304, and asked again at once.
    eventually("two 304s", || operator.count(304) >= 2).await;
    let held = operator.seen();
    assert!(
        held[1..]
            .iter()
            .all(|s| s.if_none_match.as_deref() == Some(first_etag.as_str())),
        "{held:?}"
    );
    eventually("304s counted", || {
        metrics.operator_requests(OperatorOutcome::NotModified) >= 2
    })
    .await;
    assert_eq!(store.generation(), 1, "a 304 adopts nothing");

    // A change ends the held poll with the new configuration, adopted.
    let started = Instant::now();
    operator.set(|s| s.config = Some(config(9081)));
    eventually("the changed configuration", || serves(&store, 9081)).await;
    assert!(
        started.elapsed() < Duration::from_millis(250),
        "not held to the end of the wait"
    );
    assert_eq!(store.generation(), 2);

    // 403: the configuration stays, the source retries (with backoff).
    operator.set(|s| s.forced = Some(StatusCode::FORBIDDEN));
    eventually("three 403s", || operator.count(403) >= 3).await;
    assert!(serves(&store, 9081));
    assert_eq!(store.generation(), 2);
    eventually("403s counted", || {
        metrics.operator_requests(OperatorOutcome::Other) >= 3
    })
    .await;

    // A rotated token: the operator wants the new one, which the source reads from its file.
    operator.set(|s| {
        s.forced = None;
        s.token = "t2".into();
        s.config = Some(config(9082));
    });
    eventually("401 for the old token", || operator.count(401) >= 1).await;
    std::fs::write(&token, "t2\n").unwrap();
    eventually("adopted with the new token", || serves(&store, 9082)).await;
    assert_eq!(store.generation(), 3);

    // An invalid configuration is refused, the last good one kept, and it is not fetched again.
    let bad = b"{\"version\": 1, \"not\": \"a configuration\"}".to_vec();
    let oks = operator.count(200);
    operator.set(|s| s.config = Some(bad.clone()));
    eventually("the refusal", || metrics.configs_refused_total() == 1).await;
    eventually("a held poll with the refused ETag", || {
        let bad_etag = waypoint_config_etag(content_hash(&bad));
        operator
            .seen()
            .iter()
            .any(|s| s.status == 304 && s.if_none_match.as_deref() == Some(bad_etag.as_str()))
    })
    .await;
    assert_eq!(operator.count(200), oks + 1, "fetched once");
    assert!(serves(&store, 9082));
    assert_eq!(store.generation(), 3);

    // 404: the operator has none; the current one stays, retried; then a new one is adopted.
    operator.set(|s| s.config = None);
    eventually("two 404s", || operator.count(404) >= 2).await;
    assert!(serves(&store, 9082));
    assert_eq!(
        metrics.configs_refused_total(),
        1,
        "a 404 offers the store nothing"
    );
    eventually("404s counted", || {
        metrics.operator_requests(OperatorOutcome::NotFound) >= 2
    })
    .await;
    operator.set(|s| s.config = Some(config(9083)));
    eventually("adopted after the 404s", || serves(&store, 9083)).await;
    assert_eq!(store.generation(), 4);
    let text = metrics.render();
    assert!(
        text.contains("kmesh_waypoint_operator_requests_total{code=\"200\"} 5"),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(token.parent().unwrap());
}

#[tokio::test]
async fn an_operator_that_does_not_answer_keeps_the_source_trying() {
    // A closed port: connection refused, counted as errors, retried with backoff.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics = Metrics::new();
    let store = Arc::new(ConfigStore::new(metrics.clone()));
    let settings = OperatorSettings {
        url: format!("http://127.0.0.1:{port}"),
        waypoint: waypoint(),
        ca_file: None,
        token_file: None,
        wait: Duration::from_millis(300),
    };
    let source = OperatorSource::new(settings, metrics.clone()).unwrap();
    let following = tokio::spawn(config_store::follow(source, Arc::clone(&store)));
    eventually("two errors", || {
        metrics.operator_requests(OperatorOutcome::Error) >= 2
    })
    .await;
    // 200 ms, then 400 ms: not a tight loop.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(metrics.operator_requests(OperatorOutcome::Error) <= 3);
    assert!(store.current().is_none());
    following.abort();
}
