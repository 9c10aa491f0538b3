//! The uninstall: when the node agents are going away for good, the operator tells them to remove
//! their programs and pins, so that no node is left steering connections with a snapshot nobody
//! updates any more.
//!
//! "Going away for good" is what the API server shows of the agents' DaemonSet
//! (`--agent-daemonset`, `kmesh-system/kmesh-agent`): its namespace is terminating (`kubectl
//! delete -k config/default` deletes the namespace first), or the DaemonSet itself is deleted
//! (deletionTimestamp without the `orphan` finalizer, or gone after being seen without it). A
//! rolling update of the DaemonSet replaces pods but keeps the DaemonSet, so it is never mistaken
//! for an uninstall. From then on the snapshot server answers every agent `410 Gone` (the
//! contract's uninstall; held long polls at once): each agent detaches its programs and removes
//! every pin at once, and an agent stopped before it heard asks once more on its way out.
//!
//! Why not a finalizer on the KmeshConfig: `kubectl delete -k config/default` deletes the
//! operator's RBAC and its namespace together with the CRD, so an operator holding a finalizer may
//! be unable — or no longer alive — to remove it, and the delete would hang. Here nothing waits on
//! the operator: the ordering comes from the agent pods themselves (the namespace is gone only once
//! they are, and they uninstall before they exit), and a dead operator costs the uninstall of the
//! nodes whose agents had not heard yet (left pinned: `kmesh-agent uninstall` removes them), never
//! a stuck delete. On SIGTERM during an uninstall the operator keeps serving for [`DRAIN`] so that
//! stopping agents can still ask it.
//!
//! [`removal`] is the decision, pure; [`watch`] feeds it from two watches and sets
//! [`SnapshotStore::set_uninstalling`].
use std::{fmt, str::FromStr, time::Duration};

use futures::{StreamExt as _, stream};
use k8s_openapi::api::{apps::v1::DaemonSet, core::v1::Namespace};
use kube::{
    Api, Client, Resource,
    runtime::{WatchStreamExt as _, watcher},
};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::{server::SnapshotStore, watch_backoff::WatchBackoff};

/// How long a stopping operator keeps serving while an uninstall is under way.
pub const DRAIN: Duration = Duration::from_secs(5);

/// The agents' DaemonSet, `namespace/name` on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentDaemonSet {
    pub namespace: String,
    pub name: String,
}

/// An `--agent-daemonset` that is not `namespace/name`.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("expected `namespace/name`")]
pub struct BadAgentDaemonSet;

impl FromStr for AgentDaemonSet {
    type Err = BadAgentDaemonSet;
    fn from_str(value: &str) -> Result<Self, BadAgentDaemonSet> {
        match value.split_once('/') {
            Some((namespace, name))
                if !namespace.is_empty() && !name.is_empty() && !name.contains('/') =>
            {
                Ok(AgentDaemonSet {
                    namespace: namespace.to_string(),
                    name: name.to_string(),
                })
            }
            _ => Err(BadAgentDaemonSet),
        }
    }
}

impl fmt::Display for AgentDaemonSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What the operator has seen of the agents' DaemonSet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DaemonSetSeen {
    /// Not seen (not created yet, or deleted before this operator started).
    #[default]
    NotSeen,
    Present,
    /// Being deleted: its pods go too (background or foreground propagation).
    Deleting,
    /// Being deleted with `--cascade=orphan`: its pods stay (to be adopted by a new DaemonSet).
    Orphaning,
    /// Gone, after being seen present or deleting.
    Deleted,
    /// Gone, after being seen orphaning its pods.
    Orphaned,
}

/// What the operator has seen of the agents' DaemonSet and its namespace.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sightings {
    pub namespace: NamespaceSeen,
    pub daemonset: DaemonSetSeen,
}

/// Why the agents are being removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Removal {
    /// The agents' namespace is terminating.
    NamespaceDeleted,
    /// The agents' DaemonSet is deleted, and its pods with it.
    DaemonSetDeleted,
}

impl fmt::Display for Removal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Removal::NamespaceDeleted => "the agents' namespace is being deleted",
            Removal::DaemonSetDeleted => "the agents' DaemonSet is being deleted",
        })
    }
}

/// Whether the agents are going away for good, and why.
pub fn removal(seen: &Sightings) -> Option<Removal> {
    if seen.namespace == NamespaceSeen::Terminating {
        return Some(Removal::NamespaceDeleted);
    }
    match seen.daemonset {
        DaemonSetSeen::Deleting | DaemonSetSeen::Deleted => Some(Removal::DaemonSetDeleted),
        DaemonSetSeen::NotSeen
        | DaemonSetSeen::Present
        | DaemonSetSeen::Orphaning
        | DaemonSetSeen::Orphaned => None,
    }
}

/// What one watch event shows of an object, as far as an uninstall is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Observed {
    Present,
    /// Being deleted; `orphan`: its dependents stay (`--cascade=orphan`).
    Deleting {
        orphan: bool,
    },
    Gone,
}

impl Observed {
    /// The DaemonSet `ds`: present, or being deleted (with or without its pods).
    pub fn daemonset(ds: &DaemonSet) -> Observed {
        if ds.meta().deletion_timestamp.is_none() {
            return Observed::Present;
        }
        let finalizers = ds.meta().finalizers.as_deref().unwrap_or_default();
        Observed::Deleting {
            orphan: finalizers.iter().any(|f| f == "orphan"),
        }
    }

    /// The namespace `ns`: present, or terminating.
    pub fn namespace(ns: &Namespace) -> Observed {
        let phase = ns.status.as_ref().and_then(|s| s.phase.as_deref());
        if ns.meta().deletion_timestamp.is_some() || phase == Some("Terminating") {
            Observed::Deleting { orphan: false }
        } else {
            Observed::Present
        }
    }
}

/// What is known of the DaemonSet after an event that shows it `now`.
pub fn daemonset_seen(before: DaemonSetSeen, now: Observed) -> DaemonSetSeen {
    match now {
        Observed::Present => DaemonSetSeen::Present,
        Observed::Deleting { orphan: true } => DaemonSetSeen::Orphaning,
        Observed::Deleting { orphan: false } => DaemonSetSeen::Deleting,
        Observed::Gone => match before {
            DaemonSetSeen::Orphaning | DaemonSetSeen::Orphaned => DaemonSetSeen::Orphaned,
            DaemonSetSeen::NotSeen => DaemonSetSeen::NotSeen,
            _ => DaemonSetSeen::Deleted,
        },
    }
}

/// What the operator has seen of the agents' namespace.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NamespaceSeen {
    /// Not seen: never counts as a removal (a wrong `--agent-daemonset` must not uninstall the
    /// agents of another namespace).
    #[default]
    NotSeen,
    Present,
    /// Being deleted, or gone after being seen.
    Terminating,
}

/// What is known of the namespace after an event that shows it `now`.
pub fn namespace_seen(before: NamespaceSeen, now: Observed) -> NamespaceSeen {
    match now {
        Observed::Present => NamespaceSeen::Present,
        Observed::Deleting { .. } => NamespaceSeen::Terminating,
        Observed::Gone if before == NamespaceSeen::NotSeen => NamespaceSeen::NotSeen,
        Observed::Gone => NamespaceSeen::Terminating,
    }
}

/// One change seen by the watches.
enum Seen {
    Namespace(Observed),
    DaemonSet(Observed),
    /// A watch error (retried by the watcher with backoff).
    Error(String),
}

/// Watches the agents' namespace and DaemonSet and keeps `store`'s uninstall flag equal to
/// [`removal`]; runs until aborted.
pub fn watch(client: Client, agents: AgentDaemonSet, store: SnapshotStore) -> JoinHandle<()> {
    let by_name = |name: &str| watcher::Config::default().fields(&format!("metadata.name={name}"));
    let namespace = agents.namespace.clone();
    let mut relist = Relist::default();
    let namespaces = watcher(
        Api::<Namespace>::all(client.clone()),
        by_name(&agents.namespace),
    )
    .backoff(WatchBackoff::default())
    .map(move |e| match e {
        Ok(e) => relist.seen(e, |ns| {
            Seen::Namespace(ns.map_or(Observed::Gone, |ns| Observed::namespace(&ns)))
        }),
        Err(e) => vec![Seen::Error(format!("namespace {namespace}: {e}"))],
    });
    let name = agents.name.clone();
    let mut relist = Relist::default();
    let daemonsets = watcher(
        Api::<DaemonSet>::namespaced(client, &agents.namespace),
        by_name(&agents.name),
    )
    .backoff(WatchBackoff::default())
    .map(move |e| match e {
        Ok(e) => relist.seen(e, |ds| {
            Seen::DaemonSet(ds.map_or(Observed::Gone, |ds| Observed::daemonset(&ds)))
        }),
        Err(e) => vec![Seen::Error(format!("daemonset {name}: {e}"))],
    });
    let mut changes = stream::select(namespaces, daemonsets)
        .map(stream::iter)
        .flatten()
        .boxed();
    tokio::spawn(async move {
        let mut sightings = Sightings::default();
        let mut current: Option<Removal> = None;
        while let Some(change) = changes.next().await {
            match change {
                Seen::Namespace(now) => {
                    sightings.namespace = namespace_seen(sightings.namespace, now)
                }
                Seen::DaemonSet(now) => {
                    sightings.daemonset = daemonset_seen(sightings.daemonset, now)
                }
                Seen::Error(e) => warn!(error = %e, "watching the agents for an uninstall"),
            }
            let now = removal(&sightings);
            if now != current {
                match now {
                    Some(why) => warn!(
                        agents = %agents, %why,
                        "uninstall: answering 410 Gone so that every agent detaches its programs and removes its pins"
                    ),
                    None => info!(agents = %agents, "the agents are installed; serving snapshots"),
                }
                store.set_uninstalling(now.is_some());
                current = now;
            }
        }
    })
}

/// Turns one object's watcher events into sightings: present (`Some`) or deleted (`None`). A
/// (re)list that finds no object reads as a deletion (missed while the watch was down).
#[derive(Default)]
struct Relist {
    found: bool,
}

impl Relist {
    fn seen<K, T>(&mut self, event: watcher::Event<K>, wrap: impl Fn(Option<K>) -> T) -> Vec<T> {
        match event {
            watcher::Event::Init => {
                self.found = false;
                vec![]
            }
            watcher::Event::InitApply(o) => {
                self.found = true;
                vec![wrap(Some(o))]
            }
            watcher::Event::InitDone if self.found => vec![],
            watcher::Event::InitDone => vec![wrap(None)],
            watcher::Event::Apply(o) => vec![wrap(Some(o))],
            watcher::Event::Delete(_) => vec![wrap(None)],
        }
    }
}

/// Resolves on SIGTERM or SIGINT; during an uninstall, only [`DRAIN`] later, so that agents being
/// stopped can still hear the `410` when they ask.
pub async fn shutdown_signal(store: SnapshotStore) {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            warn!(error = %e, "cannot listen for SIGTERM; waiting for SIGINT only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    drain(&store).await;
}

/// After a stop signal: during an uninstall, keeps serving `410` a little longer for stopping
/// agents, which ask once before they decide what to do with their pins.
pub async fn drain(store: &SnapshotStore) {
    if store.uninstalling() {
        info!(drain = ?DRAIN, "stopping during an uninstall: serving 410 a little longer for stopping agents");
        tokio::time::sleep(DRAIN).await;
    }
    info!("stopping");
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use serde_json::json;

    use super::*;

    fn daemonset(deleting: bool, finalizers: &[&str]) -> DaemonSet {
        let mut ds: DaemonSet = serde_json::from_value(json!({
            "metadata": {"name": "kmesh-agent", "namespace": "kmesh-system"},
        }))
        .unwrap();
        if deleting {
            ds.metadata.deletion_timestamp = Some(Time(Default::default()));
        }
        ds.metadata.finalizers = Some(finalizers.iter().map(|f| f.to_string()).collect());
        ds
    }

    fn after(events: &[Option<DaemonSet>]) -> Option<Removal> {
        let daemonset = events.iter().fold(DaemonSetSeen::NotSeen, |seen, e| {
            daemonset_seen(seen, e.as_ref().map_or(Observed::Gone, Observed::daemonset))
        });
        removal(&Sightings {
            namespace: NamespaceSeen::Present,
            daemonset,
        })
    }

    #[test]
    fn a_rolling_update_or_an_absent_daemonset_is_no_uninstall() {
        assert_eq!(after(&[]), None);
        let present = Some(daemonset(false, &[]));
        assert_eq!(after(&[present.clone(), present.clone()]), None);
        // An operator that started after the DaemonSet was gone cannot tell: no uninstall.
        assert_eq!(after(&[None]), None);
    }

    #[test]
    fn a_deleted_daemonset_is_an_uninstall_unless_it_orphans_its_pods() {
        let present = Some(daemonset(false, &[]));
        assert_eq!(
            after(&[present.clone(), None]),
            Some(Removal::DaemonSetDeleted),
            "background deletion"
        );
        let foreground = Some(daemonset(true, &["foregroundDeletion"]));
        assert_eq!(
            after(&[present.clone(), foreground]),
            Some(Removal::DaemonSetDeleted)
        );
        let orphaning = Some(daemonset(true, &["orphan"]));
        assert_eq!(after(&[present.clone(), orphaning.clone()]), None);
        assert_eq!(after(&[present.clone(), orphaning, None]), None);
        // Deleted, then created again: installed again.
        assert_eq!(after(&[present.clone(), None, present]), None);
    }

    #[test]
    fn a_terminating_namespace_is_an_uninstall_an_unseen_one_is_not() {
        let mut ns: Namespace =
            serde_json::from_value(json!({"metadata": {"name": "kmesh-system"}})).unwrap();
        let present = namespace_seen(NamespaceSeen::NotSeen, Observed::namespace(&ns));
        assert_eq!(present, NamespaceSeen::Present);
        ns.metadata.deletion_timestamp = Some(Time(Default::default()));
        assert_eq!(
            namespace_seen(present, Observed::namespace(&ns)),
            NamespaceSeen::Terminating
        );
        assert_eq!(
            namespace_seen(present, Observed::Gone),
            NamespaceSeen::Terminating
        );
        // A namespace never seen (a wrong --agent-daemonset): no uninstall.
        assert_eq!(
            namespace_seen(NamespaceSeen::NotSeen, Observed::Gone),
            NamespaceSeen::NotSeen
        );
        let seen = |namespace| Sightings {
            namespace,
            daemonset: DaemonSetSeen::Present,
        };
        assert_eq!(
            removal(&seen(NamespaceSeen::Terminating)),
            Some(Removal::NamespaceDeleted)
        );
        assert_eq!(removal(&seen(NamespaceSeen::NotSeen)), None);
    }

    #[test]
    fn a_relist_without_the_object_reads_as_its_deletion() {
        let mut relist = Relist::default();
        let mut events = |e: watcher::Event<u8>| relist.seen(e, |o| o);
        assert!(events(watcher::Event::Init).is_empty());
        assert_eq!(events(watcher::Event::InitApply(1)), [Some(1)]);
        assert!(events(watcher::Event::InitDone).is_empty());
        assert_eq!(events(watcher::Event::Delete(1)), [None]);
        assert!(events(watcher::Event::Init).is_empty());
        assert_eq!(
            events(watcher::Event::InitDone),
            [None],
            "relisted, not found"
        );
    }

    #[test]
    fn agent_daemonsets_parse_as_namespace_slash_name() {
        let ds: AgentDaemonSet = "kmesh-system/kmesh-agent".parse().unwrap();
        assert_eq!(ds.to_string(), "kmesh-system/kmesh-agent");
        for bad in ["kmesh-agent", "/x", "x/", "a/b/c"] {
            assert_eq!(
                bad.parse::<AgentDaemonSet>(),
                Err(BadAgentDaemonSet),
                "{bad}"
            );
        }
    }
}
