//! From compile results to served snapshots, node by node, as the KmeshConfig's rollout says.
//!
//! Per node, a new generation only when the content changed, so agents are woken for real changes
//! only. `AllAtOnce` publishes every changed node at once. `Rolling` keeps at most `maxUnavailable`
//! nodes "in flight" (given a new snapshot that their agent has not yet reported live), and gives
//! canary nodes their snapshot first: the other nodes follow once every canary runs its new one.
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use hyper::body::Bytes;
use kmesh_snapshot::Snapshot;
use tracing::{error, info};

use crate::{
    compile::Compiled,
    metrics::Metrics,
    server::{Published, SnapshotStore},
};

/// How changed snapshots reach the nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RolloutPolicy {
    AllAtOnce,
    Rolling {
        /// Nodes that may be in flight at once (at least 1).
        max_unavailable: usize,
        /// Nodes updated first.
        canary: BTreeSet<String>,
    },
}

impl RolloutPolicy {
    /// The policy a KmeshConfig asks for, over `nodes` (name and labels).
    pub fn from_config(
        config: Option<&crate::crd::KmeshConfig>,
        nodes: &[(String, BTreeMap<String, String>)],
    ) -> RolloutPolicy {
        use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
        let Some(rollout) = config.map(|c| &c.spec.rollout) else {
            return RolloutPolicy::AllAtOnce;
        };
        if rollout.strategy == crate::crd::RolloutStrategy::AllAtOnce && rollout.canary.is_none() {
            return RolloutPolicy::AllAtOnce;
        }
        let max_unavailable = match (&rollout.strategy, &rollout.max_unavailable) {
            // A canary stage without Rolling: canaries first, then everyone else at once.
            (crate::crd::RolloutStrategy::AllAtOnce, _) => nodes.len().max(1),
            (_, IntOrString::Int(n)) => usize::try_from(*n).unwrap_or(1).max(1),
            (_, IntOrString::String(s)) => {
                let percent: usize = s.trim_end_matches('%').parse().unwrap_or(0);
                (nodes.len() * percent / 100).max(1)
            }
        };
        let canary = rollout
            .canary
            .as_ref()
            .map(|c| {
                nodes
                    .iter()
                    .filter(|(_, labels)| selects(&c.node_selector, labels))
                    .map(|(name, _)| name.clone())
                    .collect()
            })
            .unwrap_or_default();
        RolloutPolicy::Rolling {
            max_unavailable,
            canary,
        }
    }
}

/// Whether a label selector matches `labels` (matchLabels and matchExpressions).
fn selects(
    selector: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
    labels: &BTreeMap<String, String>,
) -> bool {
    let labels_match = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let expressions_match = selector.match_expressions.iter().flatten().all(|e| {
        let values = e.values.as_deref().unwrap_or_default();
        let value = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    labels_match && expressions_match
}

/// What the publisher knows of one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeState {
    pub node: String,
    /// The generation published for the node (0: none yet).
    pub generation: u64,
    /// A newer snapshot waits for its turn in a rolling rollout.
    pub pending: bool,
}

pub struct Publisher {
    store: SnapshotStore,
    metrics: Arc<Metrics>,
    /// The first generation this process publishes. Seeded from the clock, so that a restarted
    /// operator's generations keep increasing (agents compare generation and hash).
    first_generation: u64,
    /// Per node: generation and content hash published.
    published: BTreeMap<String, (u64, u64)>,
    /// Per node: the snapshot and hash it should get next, waiting for its turn.
    pending: BTreeMap<String, (Snapshot, u64)>,
    policy: RolloutPolicy,
}

impl Publisher {
    pub fn new(store: SnapshotStore, metrics: Arc<Metrics>, first_generation: u64) -> Self {
        Publisher {
            store,
            metrics,
            first_generation,
            published: BTreeMap::new(),
            pending: BTreeMap::new(),
            policy: RolloutPolicy::AllAtOnce,
        }
    }

    pub fn set_policy(&mut self, policy: RolloutPolicy) {
        self.policy = policy;
    }

    /// Takes the newly compiled snapshots (a node whose content is unchanged needs nothing), then
    /// publishes what the rollout policy allows now.
    pub fn publish(&mut self, compiled: &Compiled) {
        for (node, snapshot) in &compiled.snapshots {
            // The content hash does not cover the generation: encode once to learn it.
            let hash = match snapshot
                .encode()
                .map(|b| kmesh_snapshot::peek_header(&b).map(|h| h.content_hash))
            {
                Ok(Ok(hash)) => hash,
                Ok(Err(e)) => {
                    error!(node, error = %e, "compiled snapshot does not decode; not published");
                    continue;
                }
                Err(e) => {
                    error!(node, error = %e, "compiled snapshot is invalid; not published");
                    continue;
                }
            };
            if self.published.get(node).is_some_and(|&(_, h)| h == hash) {
                self.pending.remove(node);
            } else {
                self.pending.insert(node.clone(), (snapshot.clone(), hash));
            }
        }
    }

    /// Publishes the pending snapshots the policy allows now, given what each agent reports live.
    /// Call it after `publish` and whenever agents may have made progress.
    pub fn advance(&mut self, live: &dyn Fn(&str) -> Option<u64>) -> Vec<String> {
        let due: Vec<String> = match &self.policy {
            RolloutPolicy::AllAtOnce => self.pending.keys().cloned().collect(),
            RolloutPolicy::Rolling {
                max_unavailable,
                canary,
            } => {
                let in_flight = self
                    .published
                    .iter()
                    .filter(|(node, (generation, _))| live(node) != Some(*generation))
                    .count();
                let room = max_unavailable.max(&1).saturating_sub(in_flight);
                let canaries_done = canary.iter().all(|node| {
                    !self.pending.contains_key(node)
                        && self
                            .published
                            .get(node)
                            .is_none_or(|(generation, _)| live(node) == Some(*generation))
                });
                let mut candidates: Vec<&String> = self.pending.keys().collect();
                // Canaries first, then the rest (by name) once every canary runs its new snapshot.
                candidates.sort_by_key(|node| (!canary.contains(*node), (*node).clone()));
                candidates
                    .into_iter()
                    .filter(|node| canary.contains(*node) || canaries_done)
                    .filter(|node| {
                        // A node that never had a snapshot is not serving traffic yet: it does not
                        // count against maxUnavailable.
                        self.published.contains_key(*node)
                    })
                    .take(room)
                    .chain(
                        self.pending
                            .keys()
                            .filter(|node| !self.published.contains_key(*node)),
                    )
                    .cloned()
                    .collect()
            }
        };
        let mut done = Vec::new();
        for node in due {
            if let Some((snapshot, hash)) = self.pending.remove(&node)
                && self.send(&node, snapshot, hash)
            {
                done.push(node);
            }
        }
        done
    }

    fn send(&mut self, node: &str, mut snapshot: Snapshot, hash: u64) -> bool {
        let generation = self
            .published
            .get(node)
            .map_or(self.first_generation, |(g, _)| g + 1);
        snapshot.generation = generation;
        let bytes = match snapshot.encode() {
            Ok(b) => b,
            Err(e) => {
                error!(node, error = %e, "encoding failed; not published");
                return false;
            }
        };
        info!(
            node,
            generation,
            hash = format!("{hash:016x}"),
            bytes = bytes.len(),
            "publishing snapshot"
        );
        self.metrics.snapshot_size(node, bytes.len());
        self.metrics.published(node, generation);
        self.store.publish(
            node,
            Published {
                generation,
                content_hash: hash,
                bytes: Bytes::from(bytes),
            },
        );
        self.published.insert(node.to_string(), (generation, hash));
        true
    }

    /// Every node the publisher has seen, with its published generation and whether a newer
    /// snapshot waits.
    pub fn nodes(&self) -> Vec<NodeState> {
        let names: BTreeSet<&String> = self.published.keys().chain(self.pending.keys()).collect();
        names
            .into_iter()
            .map(|node| NodeState {
                node: node.clone(),
                generation: self.published.get(node).map_or(0, |(g, _)| *g),
                pending: self.pending.contains_key(node),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use kmesh_common::mode;
    use kmesh_snapshot::builder::SnapshotBuilder;

    use super::*;

    fn compiled(nodes: &[&str], content: u16) -> Compiled {
        let mut c = Compiled::default();
        for node in nodes {
            let mut b = SnapshotBuilder::new(node, 1, mode::KERNEL_NATIVE);
            let set = b.backend_set(0, &[]);
            b.service("10.96.0.1".parse().unwrap(), content, &[(1, set)]);
            c.snapshots.insert(node.to_string(), b.build());
        }
        c
    }

    fn publisher(policy: RolloutPolicy) -> (Publisher, SnapshotStore) {
        let store = SnapshotStore::default();
        let mut p = Publisher::new(store.clone(), Arc::new(Metrics::default()), 100);
        p.set_policy(policy);
        (p, store)
    }

    #[test]
    fn all_at_once_publishes_changes_only() {
        let (mut p, store) = publisher(RolloutPolicy::AllAtOnce);
        p.publish(&compiled(&["a", "b"], 80));
        assert_eq!(p.advance(&|_| None), vec!["a", "b"]);
        assert_eq!(store.get("a").unwrap().generation, 100);
        p.publish(&compiled(&["a", "b"], 80));
        assert!(
            p.advance(&|_| None).is_empty(),
            "unchanged content is not republished"
        );
        p.publish(&compiled(&["a", "b"], 81));
        assert_eq!(p.advance(&|_| None), vec!["a", "b"]);
        assert_eq!(store.get("b").unwrap().generation, 101);
    }

    #[test]
    fn rolling_keeps_max_unavailable_and_canaries_go_first() {
        let (mut p, _store) = publisher(RolloutPolicy::Rolling {
            max_unavailable: 1,
            canary: BTreeSet::from(["c".to_string()]),
        });
        // First snapshots: nodes serve nothing yet, so all get theirs at once.
        p.publish(&compiled(&["a", "b", "c"], 80));
        assert_eq!(p.advance(&|_| None), vec!["a", "b", "c"]);
        let live = RefCell::new(BTreeMap::from([("a", 100), ("b", 100), ("c", 100)]));
        let report = |node: &str| live.borrow().get(node).copied();

        p.publish(&compiled(&["a", "b", "c"], 81));
        assert_eq!(
            p.advance(&report),
            vec!["c"],
            "the canary goes first, alone"
        );
        assert!(
            p.advance(&report).is_empty(),
            "nothing else until the canary runs it"
        );
        live.borrow_mut().insert("c", 101);
        assert_eq!(p.advance(&report), vec!["a"], "then one node at a time");
        assert!(p.advance(&report).is_empty());
        live.borrow_mut().insert("a", 101);
        assert_eq!(p.advance(&report), vec!["b"]);
        live.borrow_mut().insert("b", 101);
        assert!(p.nodes().iter().all(|n| n.generation == 101 && !n.pending));
    }

    #[test]
    fn policy_from_kmeshconfig() {
        let config: crate::crd::KmeshConfig = serde_json::from_value(serde_json::json!({
            "apiVersion": "kmesh.net/v1alpha1", "kind": "KmeshConfig", "metadata": {"name": "default"},
            "spec": {"rollout": {"strategy": "Rolling", "maxUnavailable": "50%",
                     "canary": {"nodeSelector": {"matchExpressions": [
                         {"key": "tier", "operator": "In", "values": ["canary"]}]}}}}
        }))
        .unwrap();
        let nodes: Vec<(String, BTreeMap<String, String>)> = (1..=4)
            .map(|i| {
                let tier = if i == 2 { "canary" } else { "main" };
                (
                    format!("n{i}"),
                    BTreeMap::from([("tier".to_string(), tier.to_string())]),
                )
            })
            .collect();
        assert_eq!(
            RolloutPolicy::from_config(Some(&config), &nodes),
            RolloutPolicy::Rolling {
                max_unavailable: 2,
                canary: BTreeSet::from(["n2".to_string()]),
            }
        );
        assert_eq!(
            RolloutPolicy::from_config(None, &nodes),
            RolloutPolicy::AllAtOnce
        );
    }
}
