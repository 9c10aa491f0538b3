//! The waypoints' configurations as the snapshot server serves them (DualEngine, issue #11): each
//! waypoint long-polls `GET /v1/waypoints/{namespace}/{name}/config` (the contract is defined once,
//! in `kmesh_snapshot::waypoint_contract`).
//!
//! - What is served: the latest compile's `Compiled.waypoints`, stored by every replica as soon as
//!   it compiles ([`WaypointConfigStore::publish_all`], called where node snapshots are published).
//!   No leader decides them and no rollout paces them, unlike node snapshots: compiles are
//!   deterministic, so replicas that compiled the same inputs serve the same bytes under the same
//!   ETag (a hash of the bytes), and a waypoint that reaches another replica gets `304`. A replica
//!   whose compile lags serves the previous configuration until it catches up (a waypoint that
//!   alternates between replicas may see it once more); they converge with the compiles.
//! - A configuration whose bytes did not change wakes no long poll. A waypoint the compile no
//!   longer produces (its Gateway is gone) is dropped: its held polls are answered `404` at once,
//!   and so is every later request, as for a waypoint never compiled (not held: nothing is stored
//!   for names no compile produced, whoever asks).
//! - Who reads what: [`config_refusal`].
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use hyper::{
    Response, StatusCode,
    body::Bytes,
    header::{self, HeaderValue},
};
use kmesh_snapshot::{
    content_hash,
    waypoint::{WaypointConfig, WaypointName},
    waypoint_contract,
};
use tokio::sync::watch;
use tracing::{error, warn};

use crate::metrics::Metrics;
use crate::server::{Authenticator, Caller, authenticate, text, wait_param};
use crate::snapshot_body::Chunks;

/// One waypoint's served configuration: its JSON and the hash the ETag names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublishedConfig {
    pub json: Bytes,
    pub content_hash: u64,
}

impl PublishedConfig {
    pub fn of(config: &WaypointConfig) -> Self {
        let json = config.to_json();
        PublishedConfig {
            content_hash: content_hash(&json),
            json: Bytes::from(json),
        }
    }

    pub fn etag(&self) -> String {
        waypoint_contract::waypoint_config_etag(self.content_hash)
    }
}

/// The latest configuration of every waypoint, with change notification (a watch channel per
/// waypoint). Only [`publish_all`](Self::publish_all) adds waypoints: requests never do.
#[derive(Clone, Default)]
pub struct WaypointConfigStore {
    waypoints: Arc<Mutex<BTreeMap<WaypointName, watch::Sender<Option<PublishedConfig>>>>>,
}

/// What [`WaypointConfigStore::publish_all`] changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PublishOutcome {
    /// Configurations served with new bytes (new waypoints included).
    pub changed: usize,
    /// Waypoints no longer served.
    pub removed: usize,
    /// Configurations refused by `WaypointConfig::validate` (the previous one, if any, stays).
    pub invalid: usize,
    /// Waypoints served after the call.
    pub served: usize,
}

impl WaypointConfigStore {
    /// Makes `configs` (a compile's) the served configurations: a changed one replaces its
    /// waypoint's and wakes its long polls; an unchanged one wakes nothing; a waypoint absent from
    /// `configs` is dropped (its long polls end with `404`). A configuration that does not
    /// validate is not served (a waypoint would refuse it whole): the previous one stays.
    pub fn publish_all(&self, configs: &BTreeMap<WaypointName, WaypointConfig>) -> PublishOutcome {
        let mut outcome = PublishOutcome::default();
        let mut encoded = BTreeMap::new();
        for (waypoint, config) in configs {
            match config.validate() {
                Ok(()) => {
                    encoded.insert(waypoint, PublishedConfig::of(config));
                }
                Err(e) => {
                    error!(namespace = waypoint.namespace, name = waypoint.name, error = %e,
                        "compiled waypoint configuration is invalid; the previous one stays served");
                    outcome.invalid += 1;
                }
            }
        }
        let mut waypoints = self.waypoints.lock().unwrap_or_else(|p| p.into_inner());
        waypoints.retain(|waypoint, tx| {
            let kept = configs.contains_key(waypoint);
            if !kept {
                tx.send_replace(None);
                outcome.removed += 1;
            }
            kept
        });
        for (waypoint, published) in encoded {
            let tx = waypoints
                .entry(waypoint.clone())
                .or_insert_with(|| watch::channel(None).0);
            let changed = tx.send_if_modified(|current| {
                let unchanged = current.as_ref() == Some(&published);
                if !unchanged {
                    *current = Some(published);
                }
                !unchanged
            });
            outcome.changed += usize::from(changed);
        }
        outcome.served = waypoints.len();
        outcome
    }

    /// The configuration served to `waypoint`.
    pub fn get(&self, waypoint: &WaypointName) -> Option<PublishedConfig> {
        let waypoints = self.waypoints.lock().unwrap_or_else(|p| p.into_inner());
        waypoints.get(waypoint).and_then(|tx| tx.borrow().clone())
    }

    /// A receiver of `waypoint`'s configuration; `None` when none is served.
    fn subscribe(
        &self,
        waypoint: &WaypointName,
    ) -> Option<watch::Receiver<Option<PublishedConfig>>> {
        let waypoints = self.waypoints.lock().unwrap_or_else(|p| p.into_inner());
        waypoints.get(waypoint).map(watch::Sender::subscribe)
    }
}

/// Why `caller` may not read `waypoint`'s configuration (the body of a `403`); `None` when it may:
/// the waypoint's own service account (named like its Gateway, in its namespace), or anyone when
/// authentication is off. A node agent's token never may: configurations are the waypoints'.
pub fn config_refusal(caller: &Caller, waypoint: &WaypointName) -> Option<String> {
    let WaypointName {
        namespace: asked_namespace,
        name: asked_name,
    } = waypoint;
    match caller {
        Caller::Anyone => None,
        Caller::ServiceAccount { namespace, name }
            if namespace == asked_namespace && name == asked_name =>
        {
            None
        }
        Caller::ServiceAccount { namespace, name } => Some(format!(
            "this token is service account {namespace}/{name}'s: it reads waypoint \
             {namespace}/{name}'s configuration only, not {asked_namespace}/{asked_name}'s\n"
        )),
        Caller::Node(node) => Some(format!(
            "this token is node {node:?}'s agent's: agents read node snapshots, not waypoint \
             configurations\n"
        )),
    }
}

/// Answers one request for `waypoint`'s configuration and counts it by status only: the names a
/// request carries are its sender's to make up, so they label nothing.
pub(crate) async fn respond<A: Authenticator>(
    request: &hyper::http::request::Parts,
    waypoint: &WaypointName,
    store: &WaypointConfigStore,
    auth: &A,
    metrics: &Metrics,
    peer: SocketAddr,
) -> Response<Chunks> {
    let response = serve_config(request, waypoint, store, auth, peer).await;
    metrics.waypoint_config_served(response.status().as_u16());
    response
}

async fn serve_config<A: Authenticator>(
    request: &hyper::http::request::Parts,
    waypoint: &WaypointName,
    store: &WaypointConfigStore,
    auth: &A,
    peer: SocketAddr,
) -> Response<Chunks> {
    if request.method != hyper::Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
    }
    let caller = match authenticate(request, auth, peer).await {
        Ok(caller) => caller,
        Err(refusal) => return refusal,
    };
    if let Some(refusal) = config_refusal(&caller, waypoint) {
        warn!(%peer, ?caller, namespace = waypoint.namespace, name = waypoint.name,
            "{}", refusal.trim_end());
        return text(StatusCode::FORBIDDEN, &refusal);
    }
    long_poll(request, waypoint, store).await
}

/// The answer to a request its caller may make: the configuration when it is not the one the
/// waypoint holds, after holding the request up to `wait` for it to change; `404` when none is
/// served (then or once the hold ends).
async fn long_poll(
    request: &hyper::http::request::Parts,
    waypoint: &WaypointName,
    store: &WaypointConfigStore,
) -> Response<Chunks> {
    let not_found = || {
        let WaypointName { namespace, name } = waypoint;
        let body = format!("no configuration for waypoint {namespace}/{name}\n");
        text(StatusCode::NOT_FOUND, &body)
    };
    let Some(mut updates) = store.subscribe(waypoint) else {
        return not_found();
    };
    let held = request
        .headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    // News ends a long poll: another configuration than the held one, or none any more.
    let is_news = |current: &Option<PublishedConfig>| {
        current
            .as_ref()
            .is_none_or(|c| held.as_deref() != Some(c.etag().as_str()))
    };
    let wait = wait_param(request.uri.query());
    if !is_news(&updates.borrow()) && !wait.is_zero() {
        // A closed channel (the waypoint dropped) ends the wait too; its last value is `None`.
        let _ = tokio::time::timeout(wait, updates.wait_for(is_news)).await;
    }
    let current = updates.borrow().clone();
    match current {
        None => not_found(),
        Some(config) => {
            let etag = HeaderValue::from_str(&config.etag());
            let mut response = if is_news(&Some(config.clone())) {
                let mut response = Response::new(Chunks::from(config.json));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(waypoint_contract::WAYPOINT_CONFIG_MEDIA_TYPE),
                );
                response
            } else {
                text(StatusCode::NOT_MODIFIED, "")
            };
            if let Ok(etag) = etag {
                response.headers_mut().insert(header::ETAG, etag);
            }
            response
        }
    }
}

#[cfg(test)]
mod tests;
