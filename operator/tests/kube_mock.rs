//! The reconciler's error paths against a mocked API server (`tower_test::mock`): what it does
//! when the status write is refused, when the KmeshConfig does not exist (it creates it, and only
//! creates it), and when Events cannot be published. The pure status computation and the debouncer are unit-tested in their modules.
use http::{Method, Request, Response, StatusCode};
use kmesh_operator::{
    crd::{KmeshConfig, KmeshConfigSpec},
    diagnostics::{Diagnostic, ObjectRef},
    kinds::Kind,
    kube_source::Publishing,
    reconcile::{
        CREATED_BY, NodeRollout, ReconcileError, ReconcileInput, Reconciler, RolloutFacts,
    },
};
use kube::{Client, client::Body, runtime::events::Reporter};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tower_test::mock;

/// A request the mock API server saw.
#[derive(Debug)]
struct Seen {
    method: Method,
    /// Path and query.
    uri: String,
    content_type: String,
    body: Value,
}

/// What the mock answers.
enum Answer {
    Json(StatusCode, Value),
    /// A body that is not a JSON `Status`, as proxies send.
    Text(StatusCode, &'static str),
    /// No HTTP answer at all: the connection failed.
    Transport,
}

/// A client whose requests `answer` serves; the handle returns every request once the client
/// (and all its clones) are dropped.
fn mock_api(
    answer: impl Fn(&Method, &str, &Value) -> Answer + Send + 'static,
) -> (Client, JoinHandle<Vec<Seen>>) {
    let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let server = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Some((request, send)) = handle.next_request().await {
            let (parts, body) = request.into_parts();
            let bytes = body.collect_bytes().await.expect("request body");
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let uri = parts
                .uri
                .path_and_query()
                .map(|p| p.to_string())
                .unwrap_or_default();
            let response = match answer(&parts.method, &uri, &body) {
                Answer::Json(code, value) => Some(
                    Response::builder()
                        .status(code)
                        .header("content-type", "application/json")
                        .body(Body::from(serde_json::to_vec(&value).unwrap()))
                        .unwrap(),
                ),
                Answer::Text(code, text) => Some(
                    Response::builder()
                        .status(code)
                        .body(Body::from(text.as_bytes().to_vec()))
                        .unwrap(),
                ),
                Answer::Transport => None,
            };
            match response {
                Some(r) => send.send_response(r),
                None => send.send_error(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "connection reset by peer",
                )),
            }
            seen.push(Seen {
                method: parts.method,
                uri,
                content_type: parts
                    .headers
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string(),
                body,
            });
        }
        seen
    });
    (Client::new(service, "default"), server)
}

fn api_status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn config() -> KmeshConfig {
    let mut config = KmeshConfig::new("default", KmeshConfigSpec::default());
    config.metadata.generation = Some(3);
    config.metadata.uid = Some("kmc-uid".into());
    config
}

/// The stored object after a successful status write.
fn config_json(body: &Value) -> Value {
    let mut stored = serde_json::to_value(config()).unwrap();
    stored["status"] = body["status"].clone();
    stored
}

fn rollout() -> RolloutFacts {
    RolloutFacts {
        snapshot_generation: 10,
        nodes: vec![NodeRollout {
            name: "node-a".into(),
            generation: 10,
            ready: true,
        }],
    }
}

fn rejected(name: &str) -> Diagnostic {
    Diagnostic::rejected(
        ObjectRef::new(Kind::VirtualService, Some("bookinfo"), name),
        "spec.http[0].match",
        "matches on HTTP headers cannot be decided at connect()",
    )
}

fn reconciler(client: Client) -> Reconciler {
    Reconciler::new(
        client,
        Reporter {
            controller: "kmesh-operator".into(),
            instance: Some("test".into()),
        },
    )
}

fn no_uid(_: &ObjectRef) -> Option<String> {
    None
}

fn is_status_patch(method: &Method, uri: &str) -> bool {
    method == Method::PATCH
        && uri.starts_with("/apis/kmesh.net/v1alpha1/kmeshconfigs/default/status")
}

fn is_event_post(method: &Method, uri: &str) -> bool {
    method == Method::POST && uri.starts_with("/apis/events.k8s.io/v1/namespaces/")
}

async fn run_once(
    answer: impl Fn(&Method, &str, &Value) -> Answer + Send + 'static,
    config: Option<&KmeshConfig>,
    diagnostics: &[Diagnostic],
) -> (
    Result<kmesh_operator::reconcile::ReconcileOutcome, ReconcileError>,
    Vec<Seen>,
) {
    let (client, server) = mock_api(answer);
    let mut reconciler = reconciler(client);
    let rollout = rollout();
    let result = reconciler
        .reconcile(&ReconcileInput {
            config,
            diagnostics,
            rollout: &rollout,
            unwatched: &[],
            publishing: &Publishing::Open,
            uid_of: &no_uid,
        })
        .await;
    drop(reconciler);
    (result, server.await.unwrap())
}

#[tokio::test]
async fn status_write_is_a_forced_server_side_apply() {
    let config = config();
    let (result, seen) = run_once(
        |method, uri, body| {
            assert!(is_status_patch(method, uri), "{method} {uri}");
            Answer::Json(StatusCode::OK, config_json(body))
        },
        Some(&config),
        &[],
    )
    .await;
    let outcome = result.expect("reconcile succeeds");
    assert!(outcome.status_written);
    assert_eq!(seen.len(), 1);
    let patch = &seen[0];
    assert!(
        patch.uri.contains("fieldManager=kmesh-operator"),
        "{}",
        patch.uri
    );
    assert!(patch.uri.contains("force=true"), "{}", patch.uri);
    assert_eq!(patch.content_type, "application/apply-patch+yaml");
    assert_eq!(patch.body["apiVersion"], "kmesh.net/v1alpha1");
    assert_eq!(patch.body["kind"], "KmeshConfig");
    assert_eq!(patch.body["metadata"]["name"], "default");
    assert_eq!(patch.body["status"]["observedGeneration"], 3);
    assert_eq!(patch.body["status"]["snapshotGeneration"], 10);
    assert_eq!(patch.body["status"]["rollout"]["nodesReady"], 1);
    assert!(
        patch.body.get("spec").is_none(),
        "only the status is applied"
    );
}

#[tokio::test]
async fn status_conflict_is_a_specific_retryable_error() {
    let config = config();
    let (result, seen) = run_once(
        |_, _, _| {
            Answer::Json(
                StatusCode::CONFLICT,
                api_status(
                    409,
                    "Conflict",
                    "Apply failed with 1 conflict: conflict with \"kubectl\": .status.rollout",
                ),
            )
        },
        Some(&config),
        &[],
    )
    .await;
    let error = result.expect_err("a refused write is an error");
    assert!(
        matches!(&error, ReconcileError::StatusConflict { reason, message }
            if reason == "Conflict" && message.contains("kubectl")),
        "{error:?}"
    );
    assert!(error.is_retryable());
    let text = error.to_string();
    assert!(
        text.contains("HTTP 409") && text.contains("KmeshConfig \"default\""),
        "{text}"
    );
    assert_eq!(
        seen.len(),
        1,
        "one attempt, no retry loop inside the reconcile"
    );
}

#[tokio::test]
async fn status_server_error_is_reported_with_its_code() {
    let config = config();
    let (result, _) = run_once(
        |_, _, _| {
            Answer::Json(
                StatusCode::INTERNAL_SERVER_ERROR,
                api_status(500, "InternalError", "etcdserver: request timed out"),
            )
        },
        Some(&config),
        &[],
    )
    .await;
    let error = result.expect_err("a 500 is an error");
    assert!(
        matches!(&error, ReconcileError::StatusRefused { code: 500, reason, message }
            if reason == "InternalError" && message.contains("etcdserver")),
        "{error:?}"
    );
    assert!(error.is_retryable());
    assert!(error.to_string().contains("HTTP 500"), "{error}");

    // A proxy's plain-text 500 is no different.
    let (result, _) = run_once(
        |_, _, _| Answer::Text(StatusCode::INTERNAL_SERVER_ERROR, "upstream connect error"),
        Some(&config),
        &[],
    )
    .await;
    let error = result.expect_err("a 500 is an error");
    assert!(
        matches!(&error, ReconcileError::StatusRefused { code: 500, message, .. }
            if message.contains("upstream connect error")),
        "{error:?}"
    );

    // A refusal that retrying will not fix.
    let (result, _) = run_once(
        |_, _, _| {
            Answer::Json(
                StatusCode::FORBIDDEN,
                api_status(
                    403,
                    "Forbidden",
                    "cannot patch resource \"kmeshconfigs/status\"",
                ),
            )
        },
        Some(&config),
        &[],
    )
    .await;
    let error = result.expect_err("a 403 is an error");
    assert!(
        matches!(error, ReconcileError::StatusRefused { code: 403, .. }),
        "{error:?}"
    );
    assert!(!error.is_retryable());
}

#[tokio::test]
async fn transport_failure_is_reported() {
    let config = config();
    let (result, _) = run_once(|_, _, _| Answer::Transport, Some(&config), &[]).await;
    let error = result.expect_err("no answer is an error");
    assert!(
        matches!(error, ReconcileError::StatusTransport(_)),
        "{error:?}"
    );
    assert!(error.is_retryable());
}

fn is_config_create(method: &Method, uri: &str) -> bool {
    method == Method::POST && uri.starts_with("/apis/kmesh.net/v1alpha1/kmeshconfigs?")
}

/// A missing KmeshConfig is created (empty spec, annotated), then the fields the API server
/// defaulted are released (a merge patch of `managedFields`, guarded by the created
/// `resourceVersion`), and no status is written.
#[tokio::test]
async fn no_config_is_created_with_an_empty_spec_and_no_status_write() {
    let (result, seen) = run_once(
        |method, uri, body| {
            if is_config_create(method, uri) {
                let mut created = body.clone();
                created["metadata"]["resourceVersion"] = json!("17");
                return Answer::Json(StatusCode::CREATED, created);
            }
            assert!(is_config_patch(method, uri), "{method} {uri}");
            Answer::Json(
                StatusCode::OK,
                json!({"apiVersion": "kmesh.net/v1alpha1",
                "kind": "KmeshConfig", "metadata": {"name": "default"}}),
            )
        },
        None,
        &[],
    )
    .await;
    let error = result.expect_err("no KmeshConfig is reported");
    assert!(matches!(error, ReconcileError::ConfigNotFound), "{error:?}");
    assert!(!error.is_retryable());
    assert!(error.to_string().contains("does not exist"), "{error}");
    assert_eq!(
        seen.len(),
        2,
        "a create and a release, no status write: {seen:?}"
    );
    let create = &seen[0];
    assert!(
        create.uri.contains("fieldManager=kmesh-operator"),
        "{}",
        create.uri
    );
    assert_eq!(create.body["metadata"]["name"], "default");
    assert_eq!(
        create.body["spec"],
        json!({}),
        "the CRD's defaults fill it in"
    );
    assert_eq!(
        create.body["metadata"]["annotations"][CREATED_BY],
        "kmesh-operator"
    );
    let release = &seen[1];
    assert_eq!(release.content_type, "application/merge-patch+json");
    assert_eq!(
        release.body,
        json!({"metadata": {"resourceVersion": "17", "managedFields": [{}]}}),
        "only managedFields, only if unchanged since the create"
    );
}

fn is_config_patch(method: &Method, uri: &str) -> bool {
    method == Method::PATCH && uri.starts_with("/apis/kmesh.net/v1alpha1/kmeshconfigs/default?")
}

/// Someone else created it meanwhile (409), or creating it fails: never an update, and a failure
/// is retried no sooner than `RETRY` later.
#[tokio::test]
async fn a_config_is_only_ever_created() {
    for (code, reason) in [
        (409, "AlreadyExists"),
        (403, "Forbidden"),
        (404, "NotFound"),
        (405, "MethodNotAllowed"),
    ] {
        let (client, server) = mock_api(move |method, uri, _| {
            assert!(is_config_create(method, uri), "{method} {uri}");
            let status = StatusCode::from_u16(code).unwrap();
            Answer::Json(status, api_status(code, reason, "no"))
        });
        let mut reconciler = reconciler(client);
        let rollout = rollout();
        let input = ReconcileInput {
            config: None,
            diagnostics: &[],
            rollout: &rollout,
            unwatched: &[],
            publishing: &Publishing::Open,
            uid_of: &no_uid,
        };
        for _ in 0..3 {
            let error = reconciler.reconcile(&input).await.expect_err("no config");
            assert!(matches!(error, ReconcileError::ConfigNotFound), "{error:?}");
        }
        drop(reconciler);
        let seen = server.await.unwrap();
        let expected = if code == 409 { 3 } else { 1 };
        assert_eq!(seen.len(), expected, "{code}: {seen:?}");
        assert!(seen.iter().all(|s| s.method == Method::POST), "{seen:?}");
    }
}

#[tokio::test]
async fn config_deleted_since_it_was_read_is_not_found() {
    let config = config();
    let (result, seen) = run_once(
        |method, uri, _| {
            assert!(is_status_patch(method, uri), "{method} {uri}");
            Answer::Json(
                StatusCode::NOT_FOUND,
                api_status(
                    404,
                    "NotFound",
                    "kmeshconfigs.kmesh.net \"default\" not found",
                ),
            )
        },
        Some(&config),
        &[],
    )
    .await;
    let error = result.expect_err("a 404 is reported");
    assert!(matches!(error, ReconcileError::ConfigNotFound), "{error:?}");
    // One failed attempt; nothing creates the object.
    assert_eq!(seen.len(), 1);
    assert!(
        seen.iter()
            .all(|s| s.method != Method::POST && s.method != Method::PUT)
    );
}

#[tokio::test]
async fn unchanged_status_is_not_written() {
    let mut config = config();
    let (result, _) = run_once(
        |_, _, body| Answer::Json(StatusCode::OK, config_json(body)),
        Some(&config),
        &[],
    )
    .await;
    config.status = Some(result.unwrap().status);
    let (result, seen) = run_once(
        |method, uri, _| panic!("unexpected request {method} {uri}"),
        Some(&config),
        &[],
    )
    .await;
    assert!(!result.unwrap().status_written);
    assert!(seen.is_empty());
}

#[tokio::test]
async fn event_failures_do_not_fail_the_reconcile_and_are_retried() {
    let config = config();
    let diagnostics = vec![rejected("reviews"), rejected("ratings")];
    let rollout = rollout();
    let events_up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let up = events_up.clone();
    let (client, server) = mock_api(move |method, uri, body| {
        if is_status_patch(method, uri) {
            Answer::Json(StatusCode::OK, config_json(body))
        } else if is_event_post(method, uri) {
            if up.load(std::sync::atomic::Ordering::SeqCst) {
                Answer::Json(StatusCode::CREATED, body.clone())
            } else {
                Answer::Json(
                    StatusCode::FORBIDDEN,
                    api_status(403, "Forbidden", "events.events.k8s.io is forbidden"),
                )
            }
        } else {
            panic!("unexpected request {method} {uri}")
        }
    });
    let mut reconciler = reconciler(client);
    let uid_of = |o: &ObjectRef| Some(format!("uid-{}", o.name));
    let input = ReconcileInput {
        config: Some(&config),
        diagnostics: &diagnostics,
        rollout: &rollout,
        unwatched: &[],
        publishing: &Publishing::Open,
        uid_of: &uid_of,
    };

    // Events forbidden: the status is still written.
    let outcome = reconciler
        .reconcile(&input)
        .await
        .expect("events do not fail it");
    assert!(outcome.status_written);
    assert_eq!(outcome.status.rejected.len(), 2);
    assert_eq!(outcome.events.published, 0);
    assert_eq!(outcome.events.failed, 1);
    assert_eq!(
        outcome.events.deferred, 1,
        "no second attempt against a failing API"
    );

    // Events allowed again: both are published on the next compile...
    events_up.store(true, std::sync::atomic::Ordering::SeqCst);
    let outcome = reconciler.reconcile(&input).await.unwrap();
    assert_eq!((outcome.events.published, outcome.events.failed), (2, 0));

    // ...and not again while the rejections stay the same.
    let outcome = reconciler.reconcile(&input).await.unwrap();
    assert_eq!(outcome.events.published, 0);

    // A rejection that is fixed and comes back is announced again.
    let fixed = vec![rejected("ratings")];
    let outcome = reconciler
        .reconcile(&ReconcileInput {
            diagnostics: &fixed,
            ..input
        })
        .await
        .unwrap();
    assert_eq!(outcome.events.published, 0);
    let outcome = reconciler.reconcile(&input).await.unwrap();
    assert_eq!(outcome.events.published, 1);

    drop(reconciler);
    let seen = server.await.unwrap();
    let events: Vec<&Seen> = seen
        .iter()
        .filter(|s| is_event_post(&s.method, &s.uri))
        .collect();
    assert_eq!(events.len(), 1 + 2 + 1);
    let last = events.last().unwrap();
    assert_eq!(
        last.uri,
        "/apis/events.k8s.io/v1/namespaces/bookinfo/events?"
    );
    assert_eq!(last.body["type"], "Warning");
    assert_eq!(last.body["reason"], "Rejected");
    assert_eq!(last.body["regarding"]["kind"], "VirtualService");
    assert_eq!(
        last.body["regarding"]["apiVersion"],
        "networking.istio.io/v1"
    );
    assert_eq!(last.body["regarding"]["name"], "reviews");
    assert_eq!(last.body["regarding"]["uid"], "uid-reviews");
    assert!(
        last.body["note"]
            .as_str()
            .unwrap()
            .starts_with("spec.http[0].match: matches on HTTP headers"),
        "{}",
        last.body["note"]
    );
}

#[tokio::test]
async fn events_go_out_even_without_a_config() {
    let diagnostics = vec![rejected("reviews")];
    let (result, seen) = run_once(
        |method, uri, body| {
            assert!(
                is_event_post(method, uri) || is_config_create(method, uri),
                "no status write: {method} {uri}"
            );
            Answer::Json(StatusCode::CREATED, body.clone())
        },
        None,
        &diagnostics,
    )
    .await;
    assert!(matches!(result, Err(ReconcileError::ConfigNotFound)));
    let events = seen.iter().filter(|s| is_event_post(&s.method, &s.uri));
    assert_eq!(events.count(), 1, "{seen:?}");
    assert_eq!(
        seen.len(),
        2,
        "the Event and the config's creation: {seen:?}"
    );
}
