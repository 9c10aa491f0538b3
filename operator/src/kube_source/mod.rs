//! The compiler's inputs from the API server: one reflector (watcher + in-memory store) per kind
//! the compiler reads, each at the version the API server serves, a "something changed" signal,
//! and the debouncer that turns a burst of changes into one compile.
//!
//! - [`health`]: what is watched ([`watched_kinds`]: every kind the [`kinds`](crate::kinds)
//!   table marks watched) and where each watch stands ([`SourceHealth`]).
//! - [`discovery`]: which version of each CRD-defined kind to watch, from the API server's
//!   discovery; [`rediscover`]: when discovery runs again (a CRD changed, a watch got 404,
//!   periodically), at a bounded cost.
//! - [`stores`]: the per-kind stores and how they become `Inputs`:
//!   built-in kinds keep their k8s-openapi types, Istio and Gateway API kinds are
//!   [`DynamicObject`](kube::api::DynamicObject)s read through the same path as YAML.
//! - [`watch`]: one kind's watch task, following discovery's version, and what its errors mean.
//! - [`debounce`]: bursts of changes into one compile.
//! - [`gate`]: whether what is compiled may be published: not while an authorization kind has
//!   never been listed since start (a pure decision over [`SourceHealth::readings`]).
//!
//! A kind the operator cannot read does not stop it, nor hold its first compile back: a CRD
//! not installed, or serving the kind only at versions the compiler does not read, or a kind
//! the operator's RBAC forbids, is noted ([`KindState`]), logged once, listed by
//! [`SourceHealth::unwatched`] (and so in the KmeshConfig status), and its store is empty (or,
//! when forbidden, keeps what was listed before). A CRD installed later is picked up without a
//! restart: the CRD watch makes discovery run again, and the kind's watch starts. The exception
//! is publishing, not compiling: a kind whose absence would open traffic (authorization) holds
//! every new snapshot back until it is read ([`gate`]).
//!
//! Typical main loop:
//! ```no_run
//! # async fn run(client: kube::Client) {
//! use std::time::Duration;
//! use kmesh_operator::kube_source::{DebounceConfig, KubeSource};
//! let source = KubeSource::start(client);
//! // Subscribe before the first snapshot, so that no change between the two is missed.
//! let mut changes = source.changes(DebounceConfig::default());
//! source.wait_settled(Duration::from_secs(60)).await;
//! loop {
//!     let snapshot = source.snapshot();
//!     // compile(&snapshot.inputs, ...), publish, reconcile status ...
//!     if !changes.next().await {
//!         break;
//!     }
//! }
//! # }
//! ```
pub mod debounce;
pub mod discovery;
pub mod gate;
pub mod health;
pub mod rediscover;
pub mod stores;
pub mod watch;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use kube::Client;
use tokio::{sync::watch as signal, task::JoinHandle};
use tracing::warn;

pub use debounce::{Changes, DebounceConfig, Debouncer};
pub use discovery::Served;
pub use gate::{GateReport, HeldKind, Publishing, Unread, publishing};
pub use health::{KindReading, KindState, SourceHealth, Watched, watched_kinds};
pub use stores::{StoredObject, Stores, Writers};
pub use watch::{WatchErrorClass, classify_watch_error};

use self::{
    rediscover::{Discoverer, trigger_channel, watch_crds},
    stores::WatchContext,
};
use crate::{crd::UnwatchedKind, diagnostics::Diagnostic, inputs::Inputs, kinds::Kind};

/// What the compiler gets from one look at the stores.
#[derive(Clone, Debug)]
pub struct SourceSnapshot {
    pub inputs: Inputs,
    /// Objects that could not be read (a dynamic object that does not match the compiler's
    /// schema); they are left out of `inputs` and belong in the status as rejected.
    pub diagnostics: Vec<Diagnostic>,
    /// Kinds not read, and why (see [`SourceHealth::unwatched`]), for
    /// [`ReconcileInput::unwatched`](crate::reconcile::ReconcileInput::unwatched).
    pub unwatched: Vec<UnwatchedKind>,
    /// Every watched kind's state, read before the stores: a kind it says listed has its list in
    /// `inputs` (a store takes a list before the kind is marked synced). What [`publishing`]
    /// decides on.
    pub readings: Vec<KindReading>,
}

impl SourceSnapshot {
    /// Whether what is compiled from this snapshot may be published ([`gate`]), under the mode
    /// of the KmeshConfig it holds (the default mode when there is none).
    pub fn publishing(&self) -> Publishing {
        let config = self.inputs.config.as_ref();
        let mode = config.map(|c| c.spec.mode).unwrap_or_default();
        publishing(&self.readings, mode)
    }
}

/// The cluster, as the operator sees it: stores kept current by background watch tasks.
pub struct KubeSource {
    stores: Stores,
    health: SourceHealth,
    signal: Arc<signal::Sender<u64>>,
    /// The built-in kinds' versions: fixed, kept so that their tasks keep watching.
    _fixed: Vec<signal::Sender<Served>>,
    tasks: Vec<JoinHandle<()>>,
}

impl KubeSource {
    /// Starts discovery, the CRD watch and one watch task per watched kind. Must be called
    /// within a Tokio runtime. The tasks run until the `KubeSource` is dropped.
    pub fn start(client: Client) -> KubeSource {
        let kinds = watched_kinds();
        let (stores, writers) = Stores::new(&kinds);
        let health = SourceHealth::new(&kinds);
        let signal = Arc::new(signal::channel(0u64).0);
        let (rediscover, triggers) = trigger_channel();
        let (receivers, discovered, fixed) = served_channels(&kinds);
        let custom: Vec<Kind> = discovered.keys().cloned().collect();
        let context = WatchContext {
            client: client.clone(),
            health: health.clone(),
            signal: signal.clone(),
            rediscover: rediscover.clone(),
        };
        let mut tasks = writers.spawn_all(&context, receivers);
        tasks.push(watch_crds(client.clone(), &custom, rediscover));
        let discoverer = Discoverer {
            client,
            served: discovered,
            triggers,
        };
        tasks.push(tokio::spawn(discoverer.run()));
        KubeSource {
            stores,
            health,
            signal,
            _fixed: fixed,
            tasks,
        }
    }

    /// The stores, for direct reads (uids for Events, say).
    pub fn stores(&self) -> &Stores {
        &self.stores
    }

    /// The state of every watched kind.
    pub fn health(&self) -> &SourceHealth {
        &self.health
    }

    /// A debounced change signal. Changes made before this call are not reported: subscribe
    /// before taking the first snapshot.
    pub fn changes(&self, config: DebounceConfig) -> Changes {
        Changes::new(self.signal.subscribe(), config)
    }

    /// Waits until every kind is settled (listed, or known to be unreadable: not installed, not
    /// served at a version the compiler reads, forbidden), or `timeout` passes; returns whether
    /// it settled. Only a transient failure (or a discovery that does not answer) makes it wait
    /// for the timeout; such kinds keep being retried.
    pub async fn wait_settled(&self, timeout: Duration) -> bool {
        let mut rx = self.signal.subscribe();
        let wait = async {
            while !self.health.settled() {
                if rx.changed().await.is_err() {
                    return;
                }
            }
        };
        let settled = tokio::time::timeout(timeout, wait).await.is_ok();
        if !settled {
            for (kind, version, state) in self.health.all() {
                if !state.is_settled() {
                    warn!(%kind, ?version, ?state, "not listed yet; compiling without it");
                }
            }
        }
        settled
    }

    /// The compiler's inputs as of now.
    pub fn snapshot(&self) -> SourceSnapshot {
        // Health first: a kind read as listed here has its list in the stores read next.
        let readings = self.health.readings();
        let unwatched = self.health.unwatched();
        let (inputs, diagnostics) = self.stores.inputs();
        SourceSnapshot {
            inputs,
            diagnostics,
            unwatched,
            readings,
        }
    }
}

/// The channels that tell each kind's task where it is served: (every receiver; the senders
/// of the custom kinds, for discovery; the senders of the built-in kinds, fixed at their
/// preferred version).
type ServedChannels = (
    BTreeMap<Kind, signal::Receiver<Served>>,
    BTreeMap<Kind, signal::Sender<Served>>,
    Vec<signal::Sender<Served>>,
);

fn served_channels(kinds: &[Kind]) -> ServedChannels {
    let mut receivers = BTreeMap::new();
    let mut discovered = BTreeMap::new();
    let mut fixed = Vec::new();
    for kind in kinds {
        let Some(info) = kind.info() else {
            continue;
        };
        if kind.is_custom() {
            let (tx, rx) = signal::channel(Served::Unknown);
            discovered.insert(kind.clone(), tx);
            receivers.insert(kind.clone(), rx);
        } else {
            let version = info.preferred_version().to_string();
            let (tx, rx) = signal::channel(Served::At(version));
            fixed.push(tx);
            receivers.insert(kind.clone(), rx);
        }
    }
    (receivers, discovered, fixed)
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Objects and errors the unit tests of the kube source share.
#[cfg(test)]
mod fixtures {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use kube::{api::DynamicObject, core::Status, runtime::watcher};
    use serde_json::json;

    pub fn meta(namespace: Option<&str>, name: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.into()),
            namespace: namespace.map(Into::into),
            uid: Some(format!("uid-{name}")),
            ..Default::default()
        }
    }

    /// A dynamic object as a list response's item: no apiVersion/kind.
    pub fn dynamic(namespace: &str, name: &str, spec: serde_json::Value) -> DynamicObject {
        DynamicObject {
            types: None,
            metadata: meta(Some(namespace), name),
            data: json!({ "spec": spec }),
        }
    }

    /// What the apiserver answers for the path of a CRD that is not installed.
    pub fn not_found() -> watcher::Error {
        watcher::Error::InitialListFailed(kube::Error::Api(
            Status::failure("404 page not found", "Failed to parse error data")
                .with_code(404)
                .boxed(),
        ))
    }
}
