//! Waypoint configuration requests as the server answers them: through `server::respond`, with
//! request heads, as the snapshot tests do; long polls in virtual time.
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::{Request, header};
use kmesh_snapshot::{
    contract,
    waypoint::{WAYPOINT_CONFIG_VERSION, WaypointConfig},
};

use super::*;
use crate::server::{NoAuth, SnapshotStore, StaticTokens, respond as server_respond};

fn waypoint(namespace: &str, name: &str) -> WaypointName {
    WaypointName {
        namespace: namespace.into(),
        name: name.into(),
    }
}

/// A valid configuration of `waypoint`; `trust_domain` tells versions apart.
fn config(waypoint: &WaypointName, trust_domain: &str) -> WaypointConfig {
    WaypointConfig {
        version: WAYPOINT_CONFIG_VERSION,
        waypoint: waypoint.clone(),
        trust_domain: trust_domain.into(),
        ..Default::default()
    }
}

/// A compile's configurations: each waypoint with its trust domain.
fn compiled(waypoints: &[(&WaypointName, &str)]) -> BTreeMap<WaypointName, WaypointConfig> {
    waypoints
        .iter()
        .map(|(w, domain)| ((*w).clone(), config(w, domain)))
        .collect()
}

const TOKENS: &str = "\
    token-a waypoint:bookinfo/waypoint\n\
    token-b waypoint:bookinfo/other\n\
    token-elsewhere waypoint:elsewhere/waypoint\n\
    token-node node-1\n";

fn tokens() -> StaticTokens {
    StaticTokens::parse(TOKENS).expect("tokens")
}

fn bookinfo() -> WaypointName {
    waypoint("bookinfo", "waypoint")
}

/// A request for `waypoint`'s configuration, holding `held` and waiting up to `wait`.
fn request(
    waypoint: &WaypointName,
    token: Option<&str>,
    held: Option<&str>,
    wait: Duration,
) -> hyper::http::request::Parts {
    let mut builder = Request::get(waypoint_contract::waypoint_config_url("", waypoint, wait));
    if let Some(token) = token {
        builder = builder.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    if let Some(held) = held {
        builder = builder.header(header::IF_NONE_MATCH, held);
    }
    builder.body(()).expect("request").into_parts().0
}

/// An answer's status, ETag, body, and the (virtual) time the request was held.
struct Answer {
    status: StatusCode,
    etag: Option<String>,
    body: Bytes,
    held: Duration,
}

async fn ask<A: Authenticator>(
    store: &SnapshotStore,
    auth: &A,
    request: hyper::http::request::Parts,
) -> Answer {
    let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let started = tokio::time::Instant::now();
    let response = server_respond(&request, store, auth, &Metrics::default(), peer).await;
    let held = started.elapsed();
    let status = response.status();
    let etag = response
        .headers()
        .get(header::ETAG)
        .map(|v| v.to_str().unwrap().to_string());
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        etag,
        body,
        held,
    }
}

/// Publishes `configs` after `after` (virtual time), from another task.
fn publish_later(
    store: &SnapshotStore,
    after: Duration,
    configs: BTreeMap<WaypointName, WaypointConfig>,
) {
    let store = store.clone();
    tokio::spawn(async move {
        tokio::time::sleep(after).await;
        store.waypoint_configs().publish_all(&configs);
    });
}

const WAIT: Duration = Duration::from_secs(30);

/// 200 with the JSON and its ETag; 304 with the same ETag after the whole wait when nothing
/// changed; 200 with the new configuration as soon as it changes during a held poll.
#[tokio::test(start_paused = true)]
async fn a_waypoint_gets_its_config_then_304_then_the_change_at_once() {
    let store = SnapshotStore::default();
    let first = compiled(&[(&bookinfo(), "cluster.local")]);
    store.waypoint_configs().publish_all(&first);

    let answer = ask(
        &store,
        &tokens(),
        request(&bookinfo(), Some("token-a"), None, WAIT),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.held, Duration::ZERO);
    assert_eq!(
        WaypointConfig::from_json(&answer.body).unwrap(),
        first[&bookinfo()]
    );
    let etag = answer.etag.expect("an ETag");
    assert_eq!(
        contract::parse_waypoint_config_etag(&etag),
        Some(kmesh_snapshot::content_hash(&answer.body))
    );

    let answer = ask(
        &store,
        &tokens(),
        request(&bookinfo(), Some("token-a"), Some(&etag), WAIT),
    )
    .await;
    assert_eq!(answer.status, StatusCode::NOT_MODIFIED);
    assert_eq!(answer.held, WAIT);
    assert_eq!(answer.etag.as_deref(), Some(etag.as_str()));
    assert!(answer.body.is_empty());

    let second = compiled(&[(&bookinfo(), "example.org")]);
    publish_later(&store, Duration::from_secs(10), second.clone());
    let answer = ask(
        &store,
        &tokens(),
        request(&bookinfo(), Some("token-a"), Some(&etag), WAIT),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        answer.held,
        Duration::from_secs(10),
        "answered at the change"
    );
    assert_ne!(answer.etag.as_deref(), Some(etag.as_str()));
    assert_eq!(
        WaypointConfig::from_json(&answer.body).unwrap(),
        second[&bookinfo()]
    );
}

/// Recompiles that produce the same bytes (another waypoint's change included) wake no held poll.
#[tokio::test(start_paused = true)]
async fn unchanged_recompiles_wake_no_held_poll() {
    let store = SnapshotStore::default();
    let other = waypoint("bookinfo", "other");
    let same = compiled(&[(&bookinfo(), "cluster.local"), (&other, "cluster.local")]);
    let outcome = store.waypoint_configs().publish_all(&same);
    assert_eq!((outcome.changed, outcome.served), (2, 2));
    let etag = store.waypoint_configs().get(&bookinfo()).unwrap().etag();
    publish_later(&store, Duration::from_secs(5), same.clone());
    let other_changed = compiled(&[(&bookinfo(), "cluster.local"), (&other, "example.org")]);
    publish_later(&store, Duration::from_secs(10), other_changed.clone());
    let answer = ask(
        &store,
        &tokens(),
        request(&bookinfo(), Some("token-a"), Some(&etag), WAIT),
    )
    .await;
    assert_eq!(answer.status, StatusCode::NOT_MODIFIED);
    assert_eq!(answer.held, WAIT, "held the whole wait");
    let outcome = store.waypoint_configs().publish_all(&other_changed);
    assert_eq!(
        outcome,
        PublishOutcome {
            served: 2,
            ..Default::default()
        }
    );
}

/// A waypoint's token reads its own configuration only: not another waypoint's (in its namespace
/// or of its name elsewhere); a node agent's token reads none; without authentication anyone
/// reads any.
#[tokio::test]
async fn only_the_waypoint_itself_reads_its_config() {
    let store = SnapshotStore::default();
    let other = waypoint("bookinfo", "other");
    let elsewhere = waypoint("elsewhere", "waypoint");
    let all = [(&bookinfo(), "a"), (&other, "b"), (&elsewhere, "c")];
    store.waypoint_configs().publish_all(&compiled(&all));
    let wait = Duration::ZERO;
    for (token, status) in [
        (Some("token-a"), StatusCode::OK),
        (Some("token-b"), StatusCode::FORBIDDEN),
        (Some("token-elsewhere"), StatusCode::FORBIDDEN),
        (Some("token-node"), StatusCode::FORBIDDEN),
        (Some("not-a-token"), StatusCode::UNAUTHORIZED),
        (None, StatusCode::UNAUTHORIZED),
    ] {
        let answer = ask(&store, &tokens(), request(&bookinfo(), token, None, wait)).await;
        assert_eq!(answer.status, status, "{token:?}");
        if status == StatusCode::FORBIDDEN {
            assert!(answer.etag.is_none(), "{token:?}");
            let body = String::from_utf8_lossy(&answer.body);
            assert!(body.contains("this token is"), "{token:?}: {body}");
        }
    }
    for w in [bookinfo(), other, elsewhere] {
        let answer = ask(&store, &NoAuth, request(&w, None, None, wait)).await;
        assert_eq!(answer.status, StatusCode::OK, "{w:?}");
    }
}

/// A waypoint nothing is compiled for gets `404` at once, even asking to wait; asking creates no
/// entry.
#[tokio::test(start_paused = true)]
async fn an_unknown_waypoint_is_404_at_once() {
    let store = SnapshotStore::default();
    let answer = ask(
        &store,
        &tokens(),
        request(&bookinfo(), Some("token-a"), None, WAIT),
    )
    .await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    assert_eq!(answer.held, Duration::ZERO);
    assert_eq!(store.waypoint_configs().get(&bookinfo()), None);
    let answer = ask(
        &store,
        &NoAuth,
        request(&waypoint("x", "y"), None, None, WAIT),
    )
    .await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
}

/// A waypoint the compile drops: its held poll ends with `404` at once, and so do later requests.
#[tokio::test(start_paused = true)]
async fn a_removed_waypoint_is_404_and_its_held_poll_ends() {
    let store = SnapshotStore::default();
    let other = waypoint("bookinfo", "other");
    let both = [(&bookinfo(), "cluster.local"), (&other, "cluster.local")];
    store.waypoint_configs().publish_all(&compiled(&both));
    let etag = store.waypoint_configs().get(&bookinfo()).unwrap().etag();
    publish_later(
        &store,
        Duration::from_secs(7),
        compiled(&[(&other, "cluster.local")]),
    );
    let answer = ask(
        &store,
        &tokens(),
        request(&bookinfo(), Some("token-a"), Some(&etag), WAIT),
    )
    .await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    assert_eq!(answer.held, Duration::from_secs(7));
    let answer = ask(
        &store,
        &tokens(),
        request(&bookinfo(), Some("token-a"), Some(&etag), WAIT),
    )
    .await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    assert_eq!(answer.held, Duration::ZERO);
    let answer = ask(
        &store,
        &tokens(),
        request(&other, Some("token-b"), None, WAIT),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "the other waypoint stays");
}

/// A compiled configuration that does not validate is not served: the previous one stays.
#[test]
fn an_invalid_config_keeps_the_previous_one() {
    let store = WaypointConfigStore::default();
    let good = compiled(&[(&bookinfo(), "cluster.local")]);
    store.publish_all(&good);
    let served = store.get(&bookinfo()).unwrap();
    let mut bad = compiled(&[(&bookinfo(), "example.org")]);
    bad.get_mut(&bookinfo()).unwrap().version = WAYPOINT_CONFIG_VERSION + 1;
    let outcome = store.publish_all(&bad);
    assert_eq!(outcome.invalid, 1);
    assert_eq!(outcome.changed, 0);
    assert_eq!(store.get(&bookinfo()), Some(served));
}

/// Requests are counted by status only, whatever names they carry; publications by new content.
#[tokio::test]
async fn requests_are_counted_by_status_without_names() {
    let store = SnapshotStore::default();
    store
        .waypoint_configs()
        .publish_all(&compiled(&[(&bookinfo(), "cluster.local")]));
    let metrics = Metrics::default();
    let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let tokens = tokens();
    for i in 0..100 {
        let made_up = waypoint("bookinfo", &format!("made-up-{i}"));
        for token in [None, Some("token-a"), Some("token-node")] {
            let request = request(&made_up, token, None, Duration::ZERO);
            server_respond(&request, &store, &tokens, &metrics, peer).await;
        }
        let request = request(&made_up, None, None, Duration::ZERO);
        server_respond(&request, &store, &NoAuth, &metrics, peer).await;
    }
    let own = request(&bookinfo(), Some("token-a"), None, Duration::ZERO);
    server_respond(&own, &store, &tokens, &metrics, peer).await;
    metrics.waypoint_configs_published(3, 1);
    let rendered = metrics.render();
    let mut series: Vec<&str> = rendered
        .lines()
        .filter(|l| l.starts_with("kmesh_operator_waypoint_config_requests_total"))
        .collect();
    series.sort();
    assert_eq!(
        series,
        [
            "kmesh_operator_waypoint_config_requests_total{code=\"200\"} 1",
            "kmesh_operator_waypoint_config_requests_total{code=\"401\"} 100",
            "kmesh_operator_waypoint_config_requests_total{code=\"403\"} 200",
            "kmesh_operator_waypoint_config_requests_total{code=\"404\"} 100",
        ]
    );
    assert!(!rendered.contains("made-up"));
    assert!(
        rendered
            .lines()
            .any(|l| l == "kmesh_operator_waypoint_configs_published_total 3")
    );
    assert!(
        rendered
            .lines()
            .any(|l| l == "kmesh_operator_waypoint_configs 1")
    );
}

#[test]
fn refusals_name_who_asked_and_what() {
    let asked = bookinfo();
    let own = Caller::ServiceAccount {
        namespace: "bookinfo".into(),
        name: "waypoint".into(),
    };
    assert_eq!(config_refusal(&own, &asked), None);
    assert_eq!(config_refusal(&Caller::Anyone, &asked), None);
    let other = Caller::ServiceAccount {
        namespace: "bookinfo".into(),
        name: "other".into(),
    };
    let refusal = config_refusal(&other, &asked).unwrap();
    assert!(
        refusal.contains("bookinfo/other") && refusal.contains("not bookinfo/waypoint"),
        "{refusal}"
    );
    let refusal = config_refusal(&Caller::Node("bookinfo".into()), &asked).unwrap();
    assert!(refusal.contains("node \"bookinfo\""), "{refusal}");
}
