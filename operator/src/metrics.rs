//! The operator's Prometheus metrics, served as text on `/metrics`.
use std::{convert::Infallible, sync::Mutex};

use http_body_util::Full;
use hyper::{Response, body::Bytes, header, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use tokio::net::TcpListener;
use tracing::warn;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabel {
    pub node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServedLabels {
    pub node: String,
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: u16,
}

pub struct Metrics {
    registry: Mutex<Registry>,
    compile_seconds: Histogram,
    snapshot_bytes: Family<NodeLabel, Gauge>,
    served: Family<ServedLabels, Counter>,
    unattributed: Family<CodeLabel, Counter>,
    rejected_objects: Gauge,
    unenforced_features: Gauge,
    published_generation: Family<NodeLabel, Gauge>,
    live_generation: Family<NodeLabel, Gauge>,
    publishing_held: Gauge,
    waypoint_config_requests: Family<CodeLabel, Counter>,
    waypoint_configs_published: Counter,
    waypoint_configs: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("kmesh_operator");
        let compile_seconds = Histogram::new([0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0]);
        let snapshot_bytes = Family::<NodeLabel, Gauge>::default();
        let served = Family::<ServedLabels, Counter>::default();
        let unattributed = Family::<CodeLabel, Counter>::default();
        let rejected_objects = Gauge::default();
        let unenforced_features = Gauge::default();
        let published_generation = Family::<NodeLabel, Gauge>::default();
        let live_generation = Family::<NodeLabel, Gauge>::default();
        let publishing_held = Gauge::default();
        let waypoint_config_requests = Family::<CodeLabel, Counter>::default();
        let waypoint_configs_published = Counter::default();
        let waypoint_configs = Gauge::default();
        registry.register(
            "waypoint_config_requests",
            "Waypoint configuration requests answered, by HTTP status (never by the waypoint a \
             request names: any client can make names up)",
            waypoint_config_requests.clone(),
        );
        registry.register(
            "waypoint_configs_published",
            "Waypoint configurations published with new content (a new waypoint's included)",
            waypoint_configs_published.clone(),
        );
        registry.register(
            "waypoint_configs",
            "Waypoints this replica serves a configuration to",
            waypoint_configs.clone(),
        );
        registry.register(
            "publishing_held",
            "1 while no new snapshot is published because objects authorization is compiled from \
             (policies, Pods, Namespaces) cannot be read \
             (KmeshConfig condition Degraded, reason AuthorizationUnreadable), else 0",
            publishing_held.clone(),
        );
        registry.register(
            "node_published_generation",
            "The snapshot generation published for the node",
            published_generation.clone(),
        );
        registry.register(
            "node_live_generation",
            "The snapshot generation the node's agent last reported live in its kernel",
            live_generation.clone(),
        );
        registry.register(
            "compile_duration_seconds",
            "Time to compile all snapshots",
            compile_seconds.clone(),
        );
        registry.register(
            "snapshot_bytes",
            "Size of the node's current snapshot",
            snapshot_bytes.clone(),
        );
        registry.register(
            "snapshots_served",
            "Snapshot requests answered, by node and HTTP status (only requests authenticated for \
             a node the operator publishes for)",
            served.clone(),
        );
        registry.register(
            "snapshot_requests_unattributed",
            "Snapshot requests answered without a node to count them under (unauthenticated, \
             refused, or for a node the operator publishes nothing for), by HTTP status",
            unattributed.clone(),
        );
        registry.register(
            "rejected_objects",
            "Objects (or fields) left out of the snapshots",
            rejected_objects.clone(),
        );
        registry.register(
            "unenforced_features",
            "Features present but not enforced in the current mode",
            unenforced_features.clone(),
        );
        Metrics {
            registry: Mutex::new(registry),
            compile_seconds,
            snapshot_bytes,
            served,
            unattributed,
            rejected_objects,
            unenforced_features,
            published_generation,
            live_generation,
            publishing_held,
            waypoint_config_requests,
            waypoint_configs_published,
            waypoint_configs,
        }
    }
}

impl Metrics {
    pub fn compiled(&self, seconds: f64, rejected: usize, unenforced: usize) {
        self.compile_seconds.observe(seconds);
        self.rejected_objects.set(rejected as i64);
        self.unenforced_features.set(unenforced as i64);
    }

    /// Whether publishing is held (see `kube_source::gate`).
    pub fn publishing_held(&self, held: bool) {
        self.publishing_held.set(i64::from(held));
    }

    pub fn published(&self, node: &str, generation: u64) {
        self.published_generation
            .get_or_create(&NodeLabel {
                node: node.to_string(),
            })
            .set(generation as i64);
    }

    pub fn live(&self, node: &str, generation: u64) {
        self.live_generation
            .get_or_create(&NodeLabel {
                node: node.to_string(),
            })
            .set(generation as i64);
    }

    pub fn snapshot_size(&self, node: &str, bytes: usize) {
        self.snapshot_bytes
            .get_or_create(&NodeLabel {
                node: node.to_string(),
            })
            .set(bytes as i64);
    }

    /// Counts an answered snapshot request, under its node when it has one (see
    /// `server::counted_node`): the node label only ever holds nodes the operator publishes for.
    pub fn served(&self, node: Option<&str>, code: u16) {
        match node {
            Some(node) => self.served.get_or_create(&ServedLabels {
                node: node.to_string(),
                code,
            }),
            None => self.unattributed.get_or_create(&CodeLabel { code }),
        }
        .inc();
    }

    /// Counts an answered waypoint configuration request.
    pub fn waypoint_config_served(&self, code: u16) {
        self.waypoint_config_requests
            .get_or_create(&CodeLabel { code })
            .inc();
    }

    /// Records a compile's publication of waypoint configurations: `changed` new contents, and
    /// `served` waypoints served after it.
    pub fn waypoint_configs_published(&self, changed: usize, served: usize) {
        self.waypoint_configs_published.inc_by(changed as u64);
        self.waypoint_configs.set(served as i64);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &registry);
        out
    }
}

/// Whether the replica is ready to serve snapshots (`/readyz`).
pub type Readiness = std::sync::Arc<dyn Fn() -> bool + Send + Sync>;

/// Serves `/metrics` (any other path but `/readyz`, answered 200 or 503 as `ready` says) until the
/// process exits.
pub async fn serve(listener: TcpListener, metrics: std::sync::Arc<Metrics>, ready: Readiness) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (metrics, ready) = (metrics.clone(), ready.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let readyz = (req.uri().path() == "/readyz").then(|| ready());
                let body = match readyz {
                    None => metrics.render(),
                    Some(true) => "ready\n".to_string(),
                    Some(false) => "not ready\n".to_string(),
                };
                let status = if readyz == Some(false) { 503 } else { 200 };
                async move {
                    Ok::<_, Infallible>(
                        Response::builder()
                            .status(status)
                            .header(header::CONTENT_TYPE, "text/plain; version=0.0.4")
                            .body(Full::new(Bytes::from(body)))
                            .unwrap_or_default(),
                    )
                }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                warn!(error = %e, "metrics connection failed");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publishing_held_is_a_gauge() {
        let metrics = Metrics::default();
        assert!(
            metrics
                .render()
                .contains("kmesh_operator_publishing_held 0\n")
        );
        metrics.publishing_held(true);
        assert!(
            metrics
                .render()
                .contains("kmesh_operator_publishing_held 1\n")
        );
        metrics.publishing_held(false);
        assert!(
            metrics
                .render()
                .contains("kmesh_operator_publishing_held 0\n")
        );
    }
}
