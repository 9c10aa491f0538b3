//! One kind's watch: `KindWatch` applies watcher items (and discovery's verdicts) to the kind's
//! store and health, says which of them may change the compiler's inputs or the status, and logs
//! each change of condition once (synchronous, so it is unit-tested without an API server);
//! `spawn_watch` runs it on a task that follows the version discovery chooses.
//!
//! A kind served at no version the compiler reads is not watched: its store is emptied and its
//! state says why. A 403 (the operator's RBAC) marks it [`KindState::Forbidden`] — logged once
//! at error level, listed in the status, and no reason to hold the first compile back — and is
//! retried with backoff (0.5 s doubling to 4 s, `crate::watch_backoff`). A 404 on a CRD kind means its version stopped
//! being served: its store is emptied and discovery asked to run again. Any other error keeps the
//! store as it was and is retried with backoff.
use std::sync::Arc;

use futures::StreamExt as _;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt as _, reflector::store::Writer, watcher},
};
use tokio::{
    sync::watch::{self, error::RecvError},
    task::JoinHandle,
};
use tracing::{debug, error, info, warn};

use super::{
    discovery::Served,
    health::{KindState, SourceHealth, Watched},
    rediscover::{Rediscover, Trigger},
    stores::StoredObject,
};
use crate::{kinds::Kind, watch_backoff::WatchBackoff};

/// What a watch error means for the operator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchErrorClass {
    /// The API server does not serve the resource (404 on list or watch).
    NotServed,
    /// The API server refuses it (403): RBAC. Holds the API server's message.
    Forbidden(String),
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
        Some(s) if s.code == 403 || s.reason == "Forbidden" => {
            WatchErrorClass::Forbidden(s.message.clone())
        }
        _ => WatchErrorClass::Other(error.to_string()),
    }
}

/// What the caller does after an item: raise the change signal (the inputs or the status may
/// have changed), ask discovery to run again (a version stopped being served).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Reaction {
    pub signal: bool,
    pub rediscover: bool,
}

impl Reaction {
    const NONE: Reaction = Reaction {
        signal: false,
        rediscover: false,
    };
    const SIGNAL: Reaction = Reaction {
        signal: true,
        rediscover: false,
    };
}

/// The per-kind half of a reflector: applies watcher items to the store and the health, and
/// says which of them may change the compiler's inputs. Synchronous, so it is unit-tested
/// without an API server.
pub(super) struct KindWatch<K: StoredObject> {
    kind: Kind,
    /// The version being watched; `None` while none is.
    watched: Option<Watched>,
    writer: Writer<K>,
    health: SourceHealth,
    /// For the KmeshConfig: the generation last seen, so that our own status writes do not
    /// trigger a compile.
    last_generation: Option<Option<i64>>,
}

impl<K: StoredObject> KindWatch<K> {
    pub(super) fn new(kind: Kind, writer: Writer<K>, health: SourceHealth) -> Self {
        KindWatch {
            kind,
            watched: None,
            writer,
            health,
            last_generation: None,
        }
    }

    /// Starts watching at `version` (the store keeps its objects until the new list replaces
    /// them); returns the kind at that version, or `None` for a kind missing from the table.
    pub(super) fn start(&mut self, version: &str) -> Option<Watched> {
        let watched = Watched::new(&self.kind, version)?;
        self.health.set_version(&self.kind, Some(version));
        self.watched = Some(watched.clone());
        Some(watched)
    }

    /// Discovery says the kind is served at no version the compiler reads: stops reading it.
    /// Returns whether that changed anything (the signal is then raised).
    pub(super) fn unserved(&mut self, served: &Served) -> bool {
        let state = match served {
            Served::NotInstalled => KindState::NotInstalled,
            Served::OtherVersions(versions) => KindState::NotServed {
                served: versions.clone(),
            },
            Served::At(_) | Served::Unknown => return false,
        };
        self.watched = None;
        self.health.set_version(&self.kind, None);
        let changed = self.set_state(state);
        self.empty_store();
        changed
    }

    /// Applies one watcher item.
    pub(super) fn handle(&mut self, item: Result<watcher::Event<K>, watcher::Error>) -> Reaction {
        let event = match item {
            Ok(event) => event,
            Err(error) => return self.failed(&error),
        };
        let event = match &self.watched {
            Some(watched) => event.modify(|o| o.prepare(watched)),
            None => event,
        };
        self.writer.apply_watcher_event(&event);
        match &event {
            watcher::Event::Init | watcher::Event::InitApply(_) => Reaction::NONE,
            watcher::Event::InitDone => {
                self.set_state(KindState::Synced);
                self.last_generation = None;
                Reaction::SIGNAL
            }
            watcher::Event::Apply(object) => {
                if self.kind != Kind::KmeshConfig {
                    return Reaction::SIGNAL;
                }
                // Only the spec feeds the compiler; a status-only update (our own status write)
                // leaves metadata.generation as it was.
                let generation = object.meta().generation;
                let changed = self.last_generation != Some(generation);
                self.last_generation = Some(generation);
                Reaction {
                    signal: changed,
                    rediscover: false,
                }
            }
            watcher::Event::Delete(_) => {
                self.last_generation = None;
                Reaction::SIGNAL
            }
        }
    }

    fn failed(&mut self, error: &watcher::Error) -> Reaction {
        match classify_watch_error(error) {
            WatchErrorClass::NotServed if self.kind.is_custom() => {
                // Its version stopped being served (the CRD deleted or changed): what was listed
                // is gone with it, and discovery says where the kind is now.
                let changed = self.set_state(KindState::NotInstalled);
                self.empty_store();
                Reaction {
                    signal: changed,
                    rediscover: true,
                }
            }
            WatchErrorClass::Forbidden(message) => {
                // The store keeps what it had; the status must say the kind is not read.
                let changed = self.set_state(KindState::Forbidden(message));
                Reaction {
                    signal: changed,
                    rediscover: false,
                }
            }
            class => {
                let message = match class {
                    WatchErrorClass::Other(m) | WatchErrorClass::Forbidden(m) => m,
                    WatchErrorClass::NotServed => error.to_string(),
                };
                // The store keeps its contents: nothing to recompile.
                self.set_state(KindState::Failing(message));
                Reaction::NONE
            }
        }
    }

    /// Sets the kind's state and logs the change once; returns whether the condition changed.
    fn set_state(&mut self, state: KindState) -> bool {
        let previous = self.health.set(&self.kind, state.clone());
        let changed = !previous.same_condition(&state);
        let label = match &self.watched {
            Some(watched) => watched.to_string(),
            None => self.kind.to_string(),
        };
        if changed {
            log_change(&label, &previous, &state);
        } else {
            debug!(kind = %label, ?state, "unchanged");
        }
        changed
    }

    fn empty_store(&mut self) {
        self.writer.apply_watcher_event(&watcher::Event::Init);
        self.writer.apply_watcher_event(&watcher::Event::InitDone);
    }
}

/// How a change of condition is logged: the level and the message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum LogLine {
    Debug(&'static str),
    Info(&'static str),
    Warn(&'static str),
    Error(&'static str),
}

/// The line a change from `previous` to `state` calls for. Forbidden and served-only-at-other-
/// versions kinds are errors (the cluster holds objects the operator will not compile); a kind
/// not installed is a warning (a cluster without the Gateway API is normal).
pub(super) fn log_line(previous: &KindState, state: &KindState) -> LogLine {
    match (state, previous) {
        (KindState::Synced, KindState::NotInstalled | KindState::NotServed { .. }) => {
            LogLine::Info("now served; watching it")
        }
        (KindState::Synced, KindState::Forbidden(_) | KindState::Failing(_)) => {
            LogLine::Info("watch recovered")
        }
        (KindState::Synced | KindState::Starting, _) => LogLine::Debug("listed"),
        (KindState::NotInstalled, _) => LogLine::Warn(
            "not installed (no version served); running without it, a CRD installed later is \
             picked up",
        ),
        (KindState::NotServed { .. }, _) => LogLine::Error(
            "served only at versions the operator does not read; its objects are not compiled",
        ),
        (KindState::Forbidden(_), _) => LogLine::Error(
            "forbidden: the operator's RBAC does not allow listing and watching it; its objects \
             are not compiled until it does (retrying)",
        ),
        (KindState::Failing(_), _) => LogLine::Warn("watch failed; retrying"),
    }
}

fn log_change(kind: &str, previous: &KindState, state: &KindState) {
    let detail = match state {
        KindState::NotServed { served } => served.join(", "),
        KindState::Forbidden(m) | KindState::Failing(m) => m.clone(),
        _ => String::new(),
    };
    match log_line(previous, state) {
        LogLine::Debug(line) => debug!(%kind, "{line}"),
        LogLine::Info(line) => info!(%kind, "{line}"),
        LogLine::Warn(line) => warn!(%kind, %detail, "{line}"),
        LogLine::Error(line) => error!(%kind, %detail, "{line}"),
    }
}

/// Spawns the watch task of one kind: it watches the kind at the version `served` names, moves
/// to another when discovery says so, and stops reading it while none is served. Errors are
/// retried with [`WatchBackoff`] (0.5 s doubling to 4 s). Runs until `served`'s sender is
/// dropped or the task is aborted.
pub(super) fn spawn_watch<K: StoredObject>(
    client: Client,
    state: KindWatch<K>,
    served: watch::Receiver<Served>,
    signal: Arc<watch::Sender<u64>>,
    rediscover: Rediscover,
) -> JoinHandle<()> {
    let task = KindTask {
        client,
        state,
        served,
        signal,
        rediscover,
    };
    tokio::spawn(task.run())
}

struct KindTask<K: StoredObject> {
    client: Client,
    state: KindWatch<K>,
    served: watch::Receiver<Served>,
    signal: Arc<watch::Sender<u64>>,
    rediscover: Rediscover,
}

impl<K: StoredObject> KindTask<K> {
    async fn run(mut self) {
        loop {
            let current = self.served.borrow_and_update().clone();
            let next = match current {
                Served::At(version) => self.watch_at(&version).await,
                Served::Unknown => self.served.changed().await,
                unserved => {
                    if self.state.unserved(&unserved) {
                        self.raise();
                    }
                    self.served.changed().await
                }
            };
            if next.is_err() {
                return;
            }
        }
    }

    /// Watches at `version` until discovery's verdict changes.
    async fn watch_at(&mut self, version: &str) -> Result<(), RecvError> {
        let Some(watched) = self.state.start(version) else {
            return self.served.changed().await;
        };
        debug!(kind = %watched, "watching");
        let api = Api::<K>::all_with(self.client.clone(), &K::dynamic_type(&watched));
        let stream = watcher(api, K::watcher_config()).backoff(WatchBackoff::default());
        let mut stream = std::pin::pin!(stream);
        loop {
            tokio::select! {
                item = stream.next() => {
                    let Some(item) = item else {
                        // The watcher never ends on its own; if it did, wait for discovery.
                        return self.served.changed().await;
                    };
                    let reaction = self.state.handle(item);
                    if reaction.rediscover {
                        self.rediscover.request(Trigger::NotFound);
                    }
                    if reaction.signal {
                        self.raise();
                    }
                }
                changed = self.served.changed() => return changed,
            }
        }
    }

    fn raise(&self) {
        self.signal.send_modify(|n| *n = n.wrapping_add(1));
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
        kube_source::{Stores, Unread, health::watched_kinds, stores::LAST_APPLIED},
    };

    /// The watch of `kind` at its preferred version, over fresh stores.
    fn watch_of<K: StoredObject>(kind: Kind) -> (KindWatch<K>, Stores, SourceHealth) {
        let kinds = watched_kinds();
        let (stores, mut writers) = Stores::new(&kinds);
        let health = SourceHealth::new(&kinds);
        let writer = writers.take::<K>(&kind).expect("a writer of this type");
        let mut watch = KindWatch::new(kind.clone(), writer, health.clone());
        watch.start(kind.info().unwrap().preferred_version());
        (watch, stores, health)
    }

    fn forbidden(kind: &str) -> watcher::Error {
        watcher::Error::InitialListFailed(kube::Error::Api(
            Status::failure(
                &format!("{kind} is forbidden: User cannot list"),
                "Forbidden",
            )
            .with_code(403)
            .boxed(),
        ))
    }

    fn listed<K: StoredObject>(watch: &mut KindWatch<K>, objects: Vec<K>) -> Reaction {
        watch.handle(Ok(watcher::Event::Init));
        for object in objects {
            watch.handle(Ok(watcher::Event::InitApply(object)));
        }
        watch.handle(Ok(watcher::Event::InitDone))
    }

    #[test]
    fn a_version_no_longer_served_empties_the_store_and_asks_discovery() {
        let kind = Kind::PeerAuthentication;
        let (mut watch, stores, health) = watch_of::<DynamicObject>(kind.clone());
        let reaction = listed(&mut watch, vec![dynamic("a", "p", json!({}))]);
        assert_eq!(reaction, Reaction::SIGNAL);
        assert_eq!(health.get(&kind), KindState::Synced);
        assert_eq!(stores.count(&kind), 1);

        // The CRD goes away: noted, objects dropped, signalled once, discovery asked each time.
        let gone = watch.handle(Err(not_found()));
        assert_eq!(
            gone,
            Reaction {
                signal: true,
                rediscover: true
            }
        );
        assert_eq!(health.get(&kind), KindState::NotInstalled);
        assert_eq!(stores.count(&kind), 0);
        let again = watch.handle(Err(not_found()));
        assert_eq!(
            again,
            Reaction {
                signal: false,
                rediscover: true
            },
            "retries stay quiet"
        );

        // Served again.
        assert_eq!(listed(&mut watch, vec![]), Reaction::SIGNAL);
        assert_eq!(health.get(&kind), KindState::Synced);
    }

    #[test]
    fn discovery_verdicts_stop_the_watch() {
        let kind = Kind::TcpRoute;
        let (mut watch, stores, health) = watch_of::<DynamicObject>(kind.clone());
        listed(&mut watch, vec![dynamic("a", "r", json!({}))]);
        assert_eq!(stores.count(&kind), 1);
        let other = Served::OtherVersions(vec!["v3".into()]);
        assert!(watch.unserved(&other));
        assert!(!watch.unserved(&other), "no change, no signal");
        assert_eq!(stores.count(&kind), 0);
        assert_eq!(health.watched(&kind), None);
        let served = vec!["v3".to_string()];
        assert_eq!(health.get(&kind), KindState::NotServed { served });
        assert!(watch.unserved(&Served::NotInstalled));
        assert_eq!(health.get(&kind), KindState::NotInstalled);
        assert!(!watch.unserved(&Served::At("v1".into())));
        assert!(!watch.unserved(&Served::Unknown));
        // Found again, at v1: the objects carry the version they were read at.
        watch.start("v1");
        listed(&mut watch, vec![dynamic("a", "r", json!({}))]);
        let store = stores.typed::<DynamicObject>(&kind).unwrap();
        let types = store.state()[0].types.clone().unwrap();
        assert_eq!(types.api_version, "gateway.networking.k8s.io/v1");
        assert_eq!(types.kind, "TCPRoute");
        assert_eq!(health.watched(&kind).unwrap().version, "v1");
    }

    #[test]
    fn forbidden_is_settled_reported_once_and_keeps_the_store() {
        let (mut watch, stores, health) = watch_of::<Pod>(Kind::Pod);
        listed(
            &mut watch,
            vec![Pod {
                metadata: meta(Some("a"), "p"),
                ..Default::default()
            }],
        );
        let first = watch.handle(Err(forbidden("pods")));
        assert_eq!(first, Reaction::SIGNAL, "the status must say so");
        assert!(
            matches!(health.get(&Kind::Pod), KindState::Forbidden(m) if m.contains("forbidden"))
        );
        assert!(health.get(&Kind::Pod).is_settled());
        assert_eq!(stores.count(&Kind::Pod), 1);
        assert_eq!(watch.handle(Err(forbidden("pods"))), Reaction::NONE);
        assert_eq!(health.unwatched().len(), 1);
        // Allowed again.
        assert_eq!(listed(&mut watch, vec![]), Reaction::SIGNAL);
        assert!(health.unwatched().is_empty());
    }

    /// The watch, the health and the gate together: an authorization kind forbidden from the
    /// start holds publishing; once listed, a later 403 does not (the store keeps the policies);
    /// served only at another version, it holds again (the store is emptied).
    #[test]
    fn an_authorization_kind_never_listed_holds_publishing() {
        use crate::{crd::Mode, kube_source::gate::publishing};
        let kind = Kind::AuthorizationPolicy;
        let (mut watch, stores, health) = watch_of::<DynamicObject>(kind.clone());
        for other in Kind::watched().filter(|k| **k != kind) {
            health.set(other, KindState::Synced);
        }
        let held = |health: &SourceHealth| {
            publishing(&health.readings(), Mode::KernelNative)
                .condition()
                .into_iter()
                .map(|(_, reason)| reason)
                .collect::<Vec<_>>()
        };
        assert_eq!(held(&health), [Unread::NotListedYet]);
        watch.handle(Err(forbidden("authorizationpolicies")));
        assert_eq!(held(&health), [Unread::Forbidden]);
        listed(&mut watch, vec![dynamic("a", "deny", json!({}))]);
        assert!(held(&health).is_empty());
        watch.handle(Err(forbidden("authorizationpolicies")));
        assert!(
            held(&health).is_empty(),
            "listed once: its policies are kept"
        );
        assert_eq!(stores.count(&kind), 1);
        watch.unserved(&Served::OtherVersions(vec!["v2".into()]));
        assert_eq!(held(&health), [Unread::NotServed]);
        assert_eq!(stores.count(&kind), 0);
        watch.unserved(&Served::NotInstalled);
        assert!(held(&health).is_empty(), "no CRD, no policy");
    }

    #[test]
    fn other_errors_keep_the_store_and_hold_the_first_compile() {
        let (mut watch, stores, health) = watch_of::<Pod>(Kind::Pod);
        watch.handle(Ok(watcher::Event::Apply(Pod {
            metadata: meta(Some("a"), "p"),
            ..Default::default()
        })));
        let unavailable = watcher::Error::InitialListFailed(kube::Error::Api(
            Status::failure("etcd is down", "ServiceUnavailable")
                .with_code(503)
                .boxed(),
        ));
        assert_eq!(watch.handle(Err(unavailable)), Reaction::NONE);
        assert!(matches!(health.get(&Kind::Pod), KindState::Failing(m) if m.contains("etcd")));
        assert_eq!(stores.count(&Kind::Pod), 1);
        // A 404 on a built-in kind is not "not installed".
        assert_eq!(watch.handle(Err(not_found())), Reaction::NONE);
        assert!(matches!(health.get(&Kind::Pod), KindState::Failing(_)));
        assert!(!health.settled());
    }

    #[test]
    fn each_condition_is_logged_once_at_its_level() {
        use KindState::*;
        let forbidden = Forbidden("no".into());
        let not_served = NotServed {
            served: vec!["v3".into()],
        };
        assert!(matches!(log_line(&Starting, &forbidden), LogLine::Error(_)));
        assert!(matches!(log_line(&Synced, &not_served), LogLine::Error(_)));
        assert!(matches!(
            log_line(&Starting, &NotInstalled),
            LogLine::Warn(_)
        ));
        assert!(matches!(log_line(&forbidden, &Synced), LogLine::Info(_)));
        assert!(matches!(log_line(&NotInstalled, &Synced), LogLine::Info(_)));
        assert!(matches!(log_line(&Starting, &Synced), LogLine::Debug(_)));
        // Repeats are not logged: set_state logs only when the condition changes.
        let (mut watch, _stores, _health) = watch_of::<Pod>(Kind::Pod);
        assert!(watch.set_state(Forbidden("a".into())));
        assert!(!watch.set_state(Forbidden("b".into())));
        assert!(watch.set_state(Synced));
    }

    #[test]
    fn classified_errors() {
        assert_eq!(
            classify_watch_error(&not_found()),
            WatchErrorClass::NotServed
        );
        assert_eq!(
            classify_watch_error(&forbidden("tcproutes")),
            WatchErrorClass::Forbidden("tcproutes is forbidden: User cannot list".into())
        );
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
        let mut signals = |event| watch.handle(Ok(event)).signal;
        assert!(signals(watcher::Event::Apply(config(1))));
        assert!(!signals(watcher::Event::Apply(config(1))));
        assert!(signals(watcher::Event::Apply(config(2))));
        assert!(signals(watcher::Event::Delete(config(2))));
        assert!(signals(watcher::Event::Apply(config(2))));
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
