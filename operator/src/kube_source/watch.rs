//! One kind's watch: `KindWatch` applies watcher items to the kind's store and health and says
//! which of them may change the compiler's inputs (synchronous, so it is unit-tested without an
//! API server); `spawn_watch` runs it on a task against the API server.
//!
//! A 404 on a CRD kind means "not installed": noted once, its store emptied, retried in the
//! background. Any other error keeps the store as it was and is retried with backoff.
use std::sync::Arc;

use futures::StreamExt as _;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt as _, reflector::store::Writer, watcher},
};
use tokio::{sync::watch, task::JoinHandle};
use tracing::{debug, info, warn};

use super::{
    health::{KindState, SourceHealth, Watched},
    stores::{StoredObject, slim},
};
use crate::kinds::Kind;

/// What a watch error means for the operator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchErrorClass {
    /// The API server does not serve the resource (404 on list or watch).
    NotServed,
    /// Anything else: retried with backoff.
    Other(String),
}

/// Classifies a watcher error. A 404 is recognised by status code as well as by reason: for an
/// API path that does not exist, the apiserver answers with a plain-text "404 page not found".
pub fn classify_watch_error(error: &watcher::Error) -> WatchErrorClass {
    let status = match error {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => Some(&**s),
        watcher::Error::WatchError(s) => Some(&**s),
        _ => None,
    };
    match status {
        Some(s) if s.code == 404 || s.reason == "NotFound" => WatchErrorClass::NotServed,
        _ => WatchErrorClass::Other(error.to_string()),
    }
}

/// The per-kind half of a reflector: applies watcher items to the store and the health, and
/// says which of them may change the compiler's inputs. Synchronous, so it is unit-tested
/// without an API server.
pub(super) struct KindWatch<K: StoredObject> {
    watched: Watched,
    writer: Writer<K>,
    health: SourceHealth,
    /// For the KmeshConfig: the generation last seen, so that our own status writes do not
    /// trigger a compile.
    last_generation: Option<Option<i64>>,
}

impl<K: StoredObject> KindWatch<K> {
    pub(super) fn new(watched: Watched, writer: Writer<K>, health: SourceHealth) -> Self {
        KindWatch {
            watched,
            writer,
            health,
            last_generation: None,
        }
    }

    /// Applies one watcher item; returns whether the inputs (or the health) may have changed.
    pub(super) fn handle(&mut self, item: Result<watcher::Event<K>, watcher::Error>) -> bool {
        let event = match item {
            Ok(event) => event.modify(slim),
            Err(error) => return self.failed(&error),
        };
        self.writer.apply_watcher_event(&event);
        match &event {
            watcher::Event::Init | watcher::Event::InitApply(_) => false,
            watcher::Event::InitDone => {
                match self.health.set(&self.watched.kind, KindState::Synced) {
                    KindState::NotInstalled => {
                        info!(kind = %self.watched, "now served; watching it")
                    }
                    KindState::Failing(_) => info!(kind = %self.watched, "watch recovered"),
                    KindState::Starting => debug!(kind = %self.watched, "listed"),
                    KindState::Synced => {}
                }
                self.last_generation = None;
                true
            }
            watcher::Event::Apply(object) => {
                if self.watched.kind != Kind::KmeshConfig {
                    return true;
                }
                // Only the spec feeds the compiler; a status-only update (our own status write)
                // leaves metadata.generation as it was.
                let generation = object.meta().generation;
                let changed = self.last_generation != Some(generation);
                self.last_generation = Some(generation);
                changed
            }
            watcher::Event::Delete(_) => {
                self.last_generation = None;
                true
            }
        }
    }

    fn failed(&mut self, error: &watcher::Error) -> bool {
        match classify_watch_error(error) {
            WatchErrorClass::NotServed if self.watched.kind.is_custom() => {
                let previous = self.health.set(&self.watched.kind, KindState::NotInstalled);
                if previous == KindState::NotInstalled {
                    debug!(kind = %self.watched, "still not served");
                    return false;
                }
                warn!(
                    kind = %self.watched,
                    "not served by the API server (CRD or this version not installed); \
                     running without it and retrying in the background"
                );
                // Whatever was listed before the CRD went away is gone with it.
                self.writer.apply_watcher_event(&watcher::Event::Init);
                self.writer.apply_watcher_event(&watcher::Event::InitDone);
                true
            }
            class => {
                let message = match class {
                    WatchErrorClass::Other(m) => m,
                    WatchErrorClass::NotServed => error.to_string(),
                };
                let failing = KindState::Failing(message.clone());
                match self.health.set(&self.watched.kind, failing) {
                    KindState::Failing(_) => {
                        debug!(kind = %self.watched, error = %message, "watch still failing")
                    }
                    _ => warn!(kind = %self.watched, error = %message, "watch failed; retrying"),
                }
                // The store keeps its contents: nothing to recompile.
                false
            }
        }
    }
}

/// Spawns the watch task of one kind: its watcher runs until the task is aborted (errors are
/// retried with the default backoff: 0.8 s doubling to 30 s), feeding the store and raising the
/// change signal.
pub(super) fn spawn_watch<K: StoredObject>(
    client: Client,
    state: KindWatch<K>,
    signal: Arc<watch::Sender<u64>>,
) -> JoinHandle<()> {
    let dynamic_type = K::dynamic_type(&state.watched);
    let api = Api::<K>::all_with(client, &dynamic_type);
    tokio::spawn(run_watch(api, K::watcher_config(), state, signal))
}

async fn run_watch<K: StoredObject>(
    api: Api<K>,
    config: watcher::Config,
    mut state: KindWatch<K>,
    signal: Arc<watch::Sender<u64>>,
) {
    debug!(kind = %state.watched, "watching");
    let mut stream = std::pin::pin!(watcher(api, config).default_backoff());
    while let Some(item) = stream.next().await {
        if state.handle(item) {
            signal.send_modify(|n| *n = n.wrapping_add(1));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::{
        api::core::v1::{Pod, Service},
        apimachinery::pkg::apis::meta::v1::ObjectMeta,
    };
    use kube::{api::DynamicObject, core::Status, runtime::reflector::Lookup as _};
    use serde_json::json;

    use super::{super::fixtures::*, *};
    use crate::{
        crd::{KmeshConfig, SINGLETON_NAME},
        kube_source::{Stores, stores::LAST_APPLIED, watch_plan},
    };

    /// The watch of `kind`, over fresh stores.
    fn watch_of<K: StoredObject>(kind: Kind) -> (KindWatch<K>, Stores, SourceHealth) {
        let plan = watch_plan();
        let (stores, mut writers) = Stores::new(&plan);
        let health = SourceHealth::new(&plan);
        let (watched, writer) = writers.take::<K>(&kind).expect("a writer of this type");
        (
            KindWatch::new(watched, writer, health.clone()),
            stores,
            health,
        )
    }

    #[test]
    fn missing_crd_is_noted_once_and_emptied() {
        let kind = Kind::PeerAuthentication;
        let (mut watch, stores, health) = watch_of::<DynamicObject>(kind.clone());
        assert!(!watch.handle(Ok(watcher::Event::Init)));
        assert!(!watch.handle(Ok(watcher::Event::InitApply(dynamic("a", "p", json!({}))))));
        assert!(watch.handle(Ok(watcher::Event::InitDone)));
        assert_eq!(health.get(&kind), KindState::Synced);
        assert_eq!(stores.count(&kind), 1);

        // The CRD goes away: the kind is noted, its objects dropped, and it signals once.
        assert!(watch.handle(Err(not_found())));
        assert_eq!(health.get(&kind), KindState::NotInstalled);
        let not_installed: Vec<Kind> = health.not_installed().into_iter().map(|w| w.kind).collect();
        assert_eq!(not_installed, vec![kind.clone()]);
        assert_eq!(stores.count(&kind), 0);
        assert!(!watch.handle(Err(not_found())), "retries stay quiet");

        // Installed again.
        assert!(!watch.handle(Ok(watcher::Event::Init)));
        assert!(watch.handle(Ok(watcher::Event::InitDone)));
        assert_eq!(health.get(&kind), KindState::Synced);
        assert!(health.not_installed().is_empty());
    }

    #[test]
    fn other_errors_keep_the_store() {
        let (mut watch, stores, health) = watch_of::<Pod>(Kind::Pod);
        watch.handle(Ok(watcher::Event::Apply(Pod {
            metadata: meta(Some("a"), "p"),
            ..Default::default()
        })));
        let forbidden = watcher::Error::InitialListFailed(kube::Error::Api(
            Status::failure("pods is forbidden", "Forbidden")
                .with_code(403)
                .boxed(),
        ));
        assert!(!watch.handle(Err(forbidden)));
        assert!(matches!(health.get(&Kind::Pod), KindState::Failing(m) if m.contains("forbidden")));
        assert_eq!(stores.count(&Kind::Pod), 1);
        // A 404 on a built-in kind is not "not installed".
        assert!(!watch.handle(Err(not_found())));
        assert!(matches!(health.get(&Kind::Pod), KindState::Failing(_)));
        assert!(!health.settled());
    }

    #[test]
    fn config_status_writes_do_not_signal() {
        let (mut watch, _stores, _health) = watch_of::<KmeshConfig>(Kind::KmeshConfig);
        let config = |generation| KmeshConfig {
            metadata: ObjectMeta {
                generation: Some(generation),
                ..meta(None, SINGLETON_NAME)
            },
            spec: Default::default(),
            status: None,
        };
        assert!(watch.handle(Ok(watcher::Event::Apply(config(1)))));
        assert!(!watch.handle(Ok(watcher::Event::Apply(config(1)))));
        assert!(watch.handle(Ok(watcher::Event::Apply(config(2)))));
        assert!(watch.handle(Ok(watcher::Event::Delete(config(2)))));
        assert!(watch.handle(Ok(watcher::Event::Apply(config(2)))));
    }

    #[test]
    fn objects_are_slimmed() {
        let (mut watch, stores, _health) = watch_of::<Service>(Kind::Service);
        let mut m = meta(Some("a"), "s");
        m.annotations = Some(BTreeMap::from([
            (LAST_APPLIED.to_string(), "{...}".to_string()),
            ("keep".to_string(), "me".to_string()),
        ]));
        m.managed_fields = Some(vec![Default::default()]);
        watch.handle(Ok(watcher::Event::Apply(Service {
            metadata: m,
            ..Default::default()
        })));
        let store = stores.typed::<Service>(&Kind::Service).unwrap();
        let stored = &store.state()[0];
        assert!(stored.metadata.managed_fields.is_none());
        assert_eq!(stored.name().as_deref(), Some("s"));
        let annotations = stored.metadata.annotations.as_ref().unwrap();
        assert_eq!(annotations.len(), 1);
        assert_eq!(annotations["keep"], "me");
    }
}
