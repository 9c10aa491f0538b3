//! TokenReview authentication against a mocked API server: the answers the real API server gives
//! (until the cluster harness exists, a mock is the only API here; see README).
use http::{Request, Response, StatusCode};
use kmesh_operator::{
    server::{AuthError, Authenticator, Caller},
    tokenreview::TokenReviewAuth,
};
use kube::client::Body;
use serde_json::json;

/// An authenticator whose API answers each TokenReview with `answers`, in order.
async fn with_answers(
    answers: Vec<(StatusCode, serde_json::Value)>,
) -> (TokenReviewAuth, tokio::task::JoinHandle<usize>) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let server = tokio::spawn(async move {
        let mut handle = std::pin::pin!(handle);
        let mut served = 0;
        for (status, body) in answers {
            let Some((request, send)) = handle.next_request().await else {
                break;
            };
            assert_eq!(request.method(), http::Method::POST);
            assert_eq!(
                request.uri().path(),
                "/apis/authentication.k8s.io/v1/tokenreviews"
            );
            send.send_response(
                Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&body).unwrap()))
                    .unwrap(),
            );
            served += 1;
        }
        served
    });
    (
        TokenReviewAuth::new(
            client,
            "kmesh-system",
            "kmesh-agent",
            vec!["kmesh-operator".into()],
        ),
        server,
    )
}

fn review(authenticated: bool, username: &str, node: Option<&str>) -> serde_json::Value {
    let mut extra = serde_json::Map::new();
    if let Some(node) = node {
        extra.insert(
            "authentication.kubernetes.io/node-name".into(),
            json!([node]),
        );
    }
    json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "spec": {},
        "status": {
            "authenticated": authenticated,
            "user": {"username": username, "extra": extra},
            "error": if authenticated { serde_json::Value::Null } else { json!("token has expired") },
        }
    })
}

const AGENT: &str = "system:serviceaccount:kmesh-system:kmesh-agent";

#[tokio::test]
async fn a_bound_agent_token_maps_to_its_node_and_is_cached() {
    let (auth, server) = with_answers(vec![(
        StatusCode::CREATED,
        review(true, AGENT, Some("node-1")),
    )])
    .await;
    assert_eq!(
        auth.authenticate(Some("t1")).await.unwrap(),
        Caller::Node("node-1".into())
    );
    // Cached: no second review (the mock answers only once).
    assert_eq!(
        auth.authenticate(Some("t1")).await.unwrap(),
        Caller::Node("node-1".into())
    );
    drop(auth);
    assert_eq!(server.await.unwrap(), 1);
}

/// A token of another service account (a waypoint's: named like its Gateway) is that account,
/// whether or not it is bound to a node, and is cached as the agents' are.
#[tokio::test]
async fn another_service_account_is_itself_and_is_cached() {
    let (auth, server) = with_answers(vec![(
        StatusCode::CREATED,
        review(
            true,
            "system:serviceaccount:bookinfo:waypoint",
            Some("node-1"),
        ),
    )])
    .await;
    let waypoint = Caller::ServiceAccount {
        namespace: "bookinfo".into(),
        name: "waypoint".into(),
    };
    assert_eq!(auth.authenticate(Some("t1")).await.unwrap(), waypoint);
    assert_eq!(auth.authenticate(Some("t1")).await.unwrap(), waypoint);
    drop(auth);
    assert_eq!(server.await.unwrap(), 1);
}

#[tokio::test]
async fn rejections_are_specific() {
    let cases = [
        (review(false, "", None), "token has expired"),
        (
            review(true, "alice", Some("node-1")),
            "neither the agents' service account",
        ),
        (review(true, AGENT, None), "not bound to a pod on a node"),
    ];
    for (answer, expected) in cases {
        let (auth, _server) = with_answers(vec![(StatusCode::CREATED, answer)]).await;
        match auth.authenticate(Some("t")).await {
            Err(AuthError::Rejected(reason)) => assert!(reason.contains(expected), "{reason}"),
            other => panic!("expected a rejection mentioning {expected:?}, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn an_unreachable_api_is_unavailable_not_a_rejection() {
    let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "etcd down", "reason": "InternalError", "code": 500});
    let (auth, _server) = with_answers(vec![(StatusCode::INTERNAL_SERVER_ERROR, status)]).await;
    assert!(matches!(
        auth.authenticate(Some("t")).await,
        Err(AuthError::Unavailable(_))
    ));
}

#[tokio::test]
async fn no_token_is_missing() {
    let (auth, _server) = with_answers(vec![]).await;
    assert!(matches!(
        auth.authenticate(None).await,
        Err(AuthError::Missing)
    ));
}
