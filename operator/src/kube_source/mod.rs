//! The compiler's inputs from the API server: one reflector (watcher + in-memory store) per kind
//! the compiler reads, a "something changed" signal, and the debouncer that turns a burst of
//! changes into one compile.
//!
//! - [`health`]: what is watched ([`watch_plan`]: every kind the [`kinds`](crate::kinds) table
//!   marks watched, at an API version) and where each watch stands ([`SourceHealth`]).
//! - [`stores`]: the per-kind stores and how they become `Inputs`:
//!   built-in kinds keep their k8s-openapi types, Istio and Gateway API kinds are
//!   [`DynamicObject`](kube::api::DynamicObject)s read through the same path as YAML.
//! - [`watch`]: one kind's watch task, and what its errors mean.
//! - [`debounce`]: bursts of changes into one compile.
//!
//! A custom resource kind whose CRD (or that version of it) is not installed does not stop the
//! operator: its watcher's list fails with 404, the kind is marked [`KindState::NotInstalled`]
//! (logged once, listed by [`SourceHealth::not_installed`] and in [`SourceSnapshot`]), its store
//! is emptied, and the watcher keeps retrying with the default backoff (at most every 30 s) so that
//! a CRD installed later is picked up without a restart.
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
pub mod health;
pub mod stores;
pub mod watch;

use std::{sync::Arc, time::Duration};

use kube::Client;
use tokio::{sync::watch as signal, task::JoinHandle};
use tracing::warn;

pub use debounce::{Changes, DebounceConfig, Debouncer};
pub use health::{KindState, SourceHealth, Watched, watch_plan};
pub use stores::{StoredObject, Stores, Writers};
pub use watch::{WatchErrorClass, classify_watch_error};

use crate::{diagnostics::Diagnostic, inputs::Inputs};

/// What the compiler gets from one look at the stores.
#[derive(Clone, Debug, Default)]
pub struct SourceSnapshot {
    pub inputs: Inputs,
    /// Objects that could not be read (a dynamic object that does not match the compiler's
    /// schema); they are left out of `inputs` and belong in the status as rejected.
    pub diagnostics: Vec<Diagnostic>,
    /// Kinds the API server does not serve, so not watched; not an error, worth a note.
    pub not_installed: Vec<Watched>,
}

impl SourceSnapshot {
    /// [`Self::not_installed`] as shown to the user, for
    /// [`ReconcileInput::not_installed`](crate::reconcile::ReconcileInput::not_installed).
    pub fn not_installed_names(&self) -> Vec<String> {
        self.not_installed.iter().map(ToString::to_string).collect()
    }
}

/// The cluster, as the operator sees it: stores kept current by background watch tasks.
pub struct KubeSource {
    stores: Stores,
    health: SourceHealth,
    signal: Arc<signal::Sender<u64>>,
    tasks: Vec<JoinHandle<()>>,
}

impl KubeSource {
    /// Starts one watch task per kind of [`watch_plan`]. Must be called within a Tokio runtime.
    /// The tasks run until the `KubeSource` is dropped.
    pub fn start(client: Client) -> KubeSource {
        let plan = watch_plan();
        let (stores, writers) = Stores::new(&plan);
        let health = SourceHealth::new(&plan);
        let signal = Arc::new(signal::channel(0u64).0);
        let tasks = writers.spawn_all(&client, &health, &signal);
        KubeSource {
            stores,
            health,
            signal,
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

    /// Waits until every kind is listed or found not installed, or `timeout` passes; returns
    /// whether it settled. Kinds still failing by then (RBAC, say) keep being retried.
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
            for (kind, state) in self.health.all() {
                if !state.is_settled() {
                    warn!(%kind, ?state, "not listed yet; compiling without it");
                }
            }
        }
        settled
    }

    /// The compiler's inputs as of now.
    pub fn snapshot(&self) -> SourceSnapshot {
        let (inputs, diagnostics) = self.stores.inputs();
        SourceSnapshot {
            inputs,
            diagnostics,
            not_installed: self.health.not_installed(),
        }
    }
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
