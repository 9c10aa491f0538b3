//! How the operator's replicas agree, through the API server: two ConfigMaps in the operator's
//! namespace, each kept in every replica's memory by a watch.
//!
//! - **Decisions** (`kmesh-snapshot-decisions`, [`DecisionStore`]): per node, the generation and
//!   content hash it is to run (`<node>: <generation>-<hash>`). Only the leader writes it, a
//!   resourceVersion-guarded update of the whole map made only while it leads; a write racing
//!   another (a former leader) fails with 409 and is retried once the watch shows the winner's map.
//!   Every replica, the leader too, serves what is stored, never an unstored decision: so replicas
//!   serve a node the same generation of the same content, and a new leader continues from the
//!   stored generations (no change is lost, none is re-numbered).
//! - **Live reports** (`kmesh-live-generations`, [`record_live_reports`]): per node, the highest
//!   generation its agent reported live. Whichever replica an agent polls records its report there
//!   with a JSON merge patch of that one key (no read-modify-write, so replicas never conflict), and
//!   only when the report is higher than what is stored: one write per node per applied change.
//!   Every replica merges the stored reports into its [`SnapshotStore`], so the leader sees every
//!   agent's progress whichever replica it talks to.
use std::{collections::BTreeMap, time::Duration};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api, Client,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt as _, watcher},
};
use tokio::{sync::watch, task::JoinHandle};
use tracing::{debug, info, warn};

use crate::{
    leader::Leadership,
    publish::{Decision, Decisions},
    server::SnapshotStore,
    watch_backoff::WatchBackoff,
};

/// The ConfigMap of the leader's decisions.
pub const DECISIONS_CONFIG_MAP: &str = "kmesh-snapshot-decisions";
/// The ConfigMap of the agents' live generations.
pub const LIVE_CONFIG_MAP: &str = "kmesh-live-generations";

/// How long a write to the API server may take before it counts as failed.
pub const API_TIMEOUT: Duration = Duration::from_secs(5);

/// A ConfigMap's data and resourceVersion as last seen; `None` while it does not exist.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Seen {
    pub data: BTreeMap<String, String>,
    pub resource_version: Option<String>,
}

/// Watches the object `name` of `api`; the receiver holds it as last seen (`None`: absent).
pub fn watch_object<K>(api: Api<K>, name: &str) -> (watch::Receiver<Option<K>>, JoinHandle<()>)
where
    K: kube::Resource
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (tx, rx) = watch::channel(None);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let name = name.to_string();
    let task = tokio::spawn(async move {
        let stream = watcher(api, config).backoff(WatchBackoff::default());
        let mut events = std::pin::pin!(stream);
        let mut listed = false;
        while let Some(event) = events.next().await {
            match event {
                Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => {
                    listed = true;
                    tx.send_replace(Some(o));
                }
                Ok(watcher::Event::Delete(_)) => {
                    tx.send_replace(None);
                }
                Ok(watcher::Event::Init) => listed = false,
                Ok(watcher::Event::InitDone) if !listed => {
                    tx.send_replace(None);
                }
                Ok(watcher::Event::InitDone) => {}
                Err(e) => debug!(object = name, error = %e, "watch failed; retrying"),
            }
        }
    });
    (rx, task)
}

/// Watches ConfigMap `namespace/name`'s data.
pub fn watch_config_map(
    client: &Client,
    namespace: &str,
    name: &str,
) -> (watch::Receiver<Option<Seen>>, JoinHandle<()>) {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let (mut objects, watch_task) = watch_object(api, name);
    let (tx, rx) = watch::channel(None);
    let convert = tokio::spawn(async move {
        loop {
            let seen_now = objects.borrow_and_update().clone().map(seen);
            tx.send_if_modified(|s| {
                let changed = *s != seen_now;
                *s = seen_now;
                changed
            });
            if objects.changed().await.is_err() {
                return;
            }
        }
    });
    // The watch runs for the life of the process, as the conversion does.
    drop(watch_task);
    (rx, convert)
}

fn seen(cm: ConfigMap) -> Seen {
    Seen {
        data: cm.data.unwrap_or_default(),
        resource_version: cm.metadata.resource_version,
    }
}

/// The decisions as stored; entries that do not parse are left out (and logged).
pub fn parse_decisions(data: &BTreeMap<String, String>) -> Decisions {
    data.iter()
        .filter_map(|(node, value)| match Decision::parse(value) {
            Some(d) => Some((node.clone(), d)),
            None => {
                warn!(
                    node,
                    value, "unreadable decision in {DECISIONS_CONFIG_MAP}; ignored"
                );
                None
            }
        })
        .collect()
}

/// Why the leader's decisions were not stored.
#[derive(Debug, thiserror::Error)]
pub enum DecisionWriteError {
    #[error("not the leader (any more)")]
    NotLeader,
    #[error("another replica wrote {DECISIONS_CONFIG_MAP} since this one read it (HTTP 409)")]
    Conflict,
    #[error("writing {DECISIONS_CONFIG_MAP}: {0}")]
    Api(#[source] kube::Error),
}

/// The decisions ConfigMap: read by every replica, written by the leader.
pub struct DecisionStore {
    api: Api<ConfigMap>,
    namespace: String,
    seen: watch::Receiver<Option<Seen>>,
    _task: JoinHandle<()>,
}

impl DecisionStore {
    pub fn start(client: &Client, namespace: &str) -> DecisionStore {
        let (seen, task) = watch_config_map(client, namespace, DECISIONS_CONFIG_MAP);
        DecisionStore {
            api: Api::namespaced(client.clone(), namespace),
            namespace: namespace.to_string(),
            seen,
            _task: task,
        }
    }

    /// The stored decisions, as last seen.
    pub fn current(&self) -> Decisions {
        self.seen
            .borrow()
            .as_ref()
            .map(|s| parse_decisions(&s.data))
            .unwrap_or_default()
    }

    /// Waits until the stored decisions may have changed.
    pub async fn changed(&mut self) {
        if self.seen.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Stores `proposed` over the decisions last seen, if this replica still leads, guarded by
    /// the resourceVersion last seen; returns the whole stored map.
    pub async fn write(
        &self,
        leadership: &Leadership,
        proposed: &Decisions,
    ) -> Result<Decisions, DecisionWriteError> {
        let seen = self.seen.borrow().clone();
        let mut data = seen.as_ref().map(|s| s.data.clone()).unwrap_or_default();
        for (node, decision) in proposed {
            data.insert(node.clone(), decision.to_string());
        }
        if !leadership.is_leader() {
            return Err(DecisionWriteError::NotLeader);
        }
        let config_map = ConfigMap {
            metadata: ObjectMeta {
                name: Some(DECISIONS_CONFIG_MAP.into()),
                namespace: Some(self.namespace.clone()),
                resource_version: seen.as_ref().and_then(|s| s.resource_version.clone()),
                ..ObjectMeta::default()
            },
            data: Some(data.clone()),
            ..ConfigMap::default()
        };
        let pp = PostParams::default();
        let write = async {
            match seen {
                None => self.api.create(&pp, &config_map).await,
                Some(_) => {
                    self.api
                        .replace(DECISIONS_CONFIG_MAP, &pp, &config_map)
                        .await
                }
            }
        };
        // Bounded: a leader whose API server does not answer must not stop serving and following.
        let written = tokio::time::timeout(API_TIMEOUT, write)
            .await
            .unwrap_or_else(|_| {
                Err(kube::Error::Service(
                    "the API server did not answer within 5 s".into(),
                ))
            });
        match written {
            Ok(_) => Ok(parse_decisions(&data)),
            Err(kube::Error::Api(s)) if s.code == 409 => Err(DecisionWriteError::Conflict),
            Err(e) => Err(DecisionWriteError::Api(e)),
        }
    }
}

/// Keeps the live reports flowing both ways until the task is aborted: reports agents made to
/// this replica are recorded in the live ConfigMap (only when higher than stored), and stored
/// reports are merged into `store`.
pub fn record_live_reports(
    client: &Client,
    namespace: &str,
    store: SnapshotStore,
) -> Vec<JoinHandle<()>> {
    let (mut seen, watch_task) = watch_config_map(client, namespace, LIVE_CONFIG_MAP);
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let namespace = namespace.to_string();
    let merge_store = store.clone();
    let mut merge_seen = seen.clone();
    let merge = tokio::spawn(async move {
        loop {
            let stored = merge_seen.borrow_and_update().clone().unwrap_or_default();
            for (node, generation) in parse_live(&stored.data) {
                merge_store.merge_live(&node, generation);
            }
            if merge_seen.changed().await.is_err() {
                return;
            }
        }
    });
    let record = tokio::spawn(async move {
        let mut reports = store.live_changes();
        let mut unwritten: BTreeMap<String, u64> = BTreeMap::new();
        loop {
            unwritten.extend(store.take_reported_here());
            let stored = seen.borrow_and_update().clone().unwrap_or_default();
            let stored = parse_live(&stored.data);
            unwritten.retain(|node, g| stored.get(node).is_none_or(|s| *s < *g));
            if !unwritten.is_empty() {
                match tokio::time::timeout(API_TIMEOUT, write_live(&api, &namespace, &unwritten))
                    .await
                {
                    Ok(Ok(())) => unwritten.clear(),
                    Ok(Err(e)) => warn!(error = %e, "recording live generations failed; retrying"),
                    Err(_) => warn!("recording live generations timed out; retrying"),
                }
            }
            let retry = if unwritten.is_empty() {
                Duration::from_secs(3600)
            } else {
                Duration::from_secs(1)
            };
            tokio::select! {
                r = reports.changed() => if r.is_err() { return },
                _ = seen.changed() => {}
                _ = tokio::time::sleep(retry) => {}
            }
        }
    });
    vec![watch_task, merge, record]
}

/// The stored live generations; entries that do not parse are left out.
pub fn parse_live(data: &BTreeMap<String, String>) -> BTreeMap<String, u64> {
    data.iter()
        .filter_map(|(node, value)| Some((node.clone(), value.trim().parse().ok()?)))
        .collect()
}

/// A merge patch of just these nodes' keys; creates the ConfigMap if it is missing.
async fn write_live(
    api: &Api<ConfigMap>,
    namespace: &str,
    reports: &BTreeMap<String, u64>,
) -> Result<(), kube::Error> {
    let data: BTreeMap<String, String> = reports
        .iter()
        .map(|(node, g)| (node.clone(), g.to_string()))
        .collect();
    let patch = serde_json::json!({ "data": data });
    match api
        .patch(
            LIVE_CONFIG_MAP,
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => {
            debug!(?reports, "recorded live generations");
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.code == 404 => {
            let config_map = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(LIVE_CONFIG_MAP.into()),
                    namespace: Some(namespace.to_string()),
                    ..ObjectMeta::default()
                },
                data: Some(data),
                ..ConfigMap::default()
            };
            match api.create(&PostParams::default(), &config_map).await {
                Ok(_) => {
                    info!("created {LIVE_CONFIG_MAP}");
                    Ok(())
                }
                // Another replica created it first: patch it next round.
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_round_trip_and_bad_entries_are_left_out() {
        let d = Decision {
            generation: 1_700_000_001,
            content_hash: 0xabc,
        };
        let data = BTreeMap::from([
            ("node-a".to_string(), d.to_string()),
            ("node-b".to_string(), "12".to_string()),
            ("node-c".to_string(), "x-0000000000000abc".to_string()),
        ]);
        assert_eq!(d.to_string(), "1700000001-0000000000000abc");
        assert_eq!(
            parse_decisions(&data),
            BTreeMap::from([("node-a".to_string(), d)])
        );
    }

    #[test]
    fn live_reports_parse() {
        let data = BTreeMap::from([
            ("a".to_string(), "7".to_string()),
            ("b".to_string(), "-1".to_string()),
        ]);
        assert_eq!(parse_live(&data), BTreeMap::from([("a".to_string(), 7)]));
    }
}
