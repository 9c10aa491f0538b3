//! Only the leader writes the KmeshConfig status and Events: a reconciler gated by a leadership
//! that does not lead sends nothing to the API server (a mocked one that records every request),
//! and the same reconcile as leader does write both.
use http::{Request, Response, StatusCode};
use kmesh_operator::{
    crd::{KmeshConfig, KmeshConfigSpec},
    diagnostics::{Diagnostic, ObjectRef},
    kinds::Kind,
    kube_source::Publishing,
    leader::Leadership,
    reconcile::{NodeRollout, ReconcileError, ReconcileInput, Reconciler, RolloutFacts},
};
use kube::{Client, client::Body, runtime::events::Reporter};
use tower_test::mock;

/// Reconciles once (a config, one rejected object) gated by `leadership`; returns the result and
/// the paths of the requests the API server saw (each answered 200 with the config).
async fn reconcile(leadership: Leadership) -> (Result<(), ReconcileError>, Vec<String>) {
    let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let mut config = KmeshConfig::new("default", KmeshConfigSpec::default());
    config.metadata.generation = Some(1);
    let stored = serde_json::to_vec(&config).unwrap();
    let server = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Some((request, send)) = handle.next_request().await {
            seen.push(request.uri().path().to_string());
            let response = Response::builder()
                .status(StatusCode::OK)
                .header("content-type", "application/json")
                .body(Body::from(stored.clone()))
                .unwrap();
            send.send_response(response);
        }
        seen
    });
    let reporter = Reporter {
        controller: "kmesh-operator".into(),
        instance: Some("replica-1".into()),
    };
    let mut reconciler =
        Reconciler::new(Client::new(service, "default"), reporter).gated_by(leadership);
    let rejected = Diagnostic::rejected(
        ObjectRef::new(Kind::VirtualService, Some("bookinfo"), "reviews"),
        "spec.http[0].match",
        "matches on HTTP headers cannot be decided at connect()",
    );
    let rollout = RolloutFacts {
        snapshot_generation: 10,
        nodes: vec![NodeRollout {
            name: "node-a".into(),
            generation: 10,
            ready: true,
        }],
    };
    let result = reconciler
        .reconcile(&ReconcileInput {
            config: Some(&config),
            diagnostics: &[rejected],
            rollout: &rollout,
            unwatched: &[],
            publishing: &Publishing::Open,
            uid_of: &|_| None,
        })
        .await
        .map(drop);
    drop(reconciler);
    (result, server.await.unwrap())
}

#[tokio::test]
async fn a_replica_that_does_not_lead_writes_nothing() {
    let (result, seen) = reconcile(Leadership::never()).await;
    assert!(
        matches!(result, Err(ReconcileError::NotLeader)),
        "{result:?}"
    );
    assert!(seen.is_empty(), "a follower wrote: {seen:?}");
}

#[tokio::test]
async fn the_leader_writes_status_and_events() {
    let (result, seen) = reconcile(Leadership::always()).await;
    assert!(result.is_ok(), "{result:?}");
    assert!(
        seen.iter()
            .any(|p| p.ends_with("/kmeshconfigs/default/status")),
        "{seen:?}"
    );
    assert!(seen.iter().any(|p| p.contains("/events")), "{seen:?}");
}
