//! From compile results to served snapshots, node by node, as the KmeshConfig's rollout says and
//! as the leader decides.
//!
//! Every replica compiles; a node's snapshot is served once a [`Decision`] (generation and content
//! hash) names it. The leader proposes decisions ([`Publisher::propose`]), stores them through the
//! API server, and every replica — the leader included — adopts what is stored
//! ([`Publisher::adopt`]), so all replicas serve a node the same generation of the same content.
//! A replica decided on content it has not compiled (yet) serves the decision without bytes
//! until its own compile catches up (compiles are deterministic). It may never catch up: inputs
//! that changed twice in quick succession can leave the leader's decision on content this replica
//! skipped, while a rolling rollout waits for that content to go live. So the server holds such a
//! request only briefly and sends the agent to ask again, on a new connection (`server.rs`).
//!
//! Per node, a new decision only when the content changed, so agents are woken for real changes
//! only. `AllAtOnce` moves every changed node at once. `Rolling` keeps at most `maxUnavailable`
//! nodes "in flight" (decided on a snapshot their agent has not yet reported live), and moves
//! canary nodes first: the other nodes follow once every canary runs its new one.
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use hyper::body::Bytes;
use kmesh_snapshot::NodeTables;
use tracing::{error, info};

use crate::{
    compile::Compiled,
    metrics::Metrics,
    server::{Published, SnapshotStore},
    snapshot_body::{SharedCluster, SnapshotBody},
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
    /// The generation decided for the node (0: none yet).
    pub generation: u64,
    /// This replica compiled newer content that waits for its turn (a decision).
    pub pending: bool,
}

/// A node's decided snapshot: the generation and content every replica serves it. The leader
/// makes decisions; the ETag names one ([`Decision::etag`]), so an agent that reaches another
/// replica holding the same decision gets `304`, not the same content again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Decision {
    pub generation: u64,
    pub content_hash: u64,
}

impl Decision {
    pub fn etag(&self) -> String {
        kmesh_snapshot::contract::etag(self.generation, self.content_hash)
    }

    /// `<generation>-<hash as 16 hex digits>`, as stored in the decisions ConfigMap.
    pub fn parse(value: &str) -> Option<Decision> {
        let (generation, hash) = value.trim().split_once('-')?;
        if hash.len() != 16 {
            return None;
        }
        Some(Decision {
            generation: generation.parse().ok()?,
            content_hash: u64::from_str_radix(hash, 16).ok()?,
        })
    }
}

impl std::fmt::Display for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{:016x}", self.generation, self.content_hash)
    }
}

/// Decisions by node.
pub type Decisions = BTreeMap<String, Decision>;

/// One node's compiled content: its hash, and its snapshot as encoded once: its node part (at the
/// compile's generation; served at a decision's with [`kmesh_snapshot::set_generation`]) and the
/// cluster part every node of the compile shares.
#[derive(Clone, Debug)]
struct Content {
    hash: u64,
    node_part: Bytes,
    node: Arc<NodeTables>,
    cluster: Arc<SharedCluster>,
}

pub struct Publisher {
    store: SnapshotStore,
    metrics: Arc<Metrics>,
    /// The first generation of a node without one. Seeded from the clock, so that generations keep
    /// increasing even if every decision was lost (agents compare generation and hash).
    first_generation: u64,
    /// Per node: the decision served (the leader's, read back through the API server).
    decided: Decisions,
    /// Per node: this replica's latest compile.
    latest: BTreeMap<String, Content>,
    /// Per node: the decided content, kept while `latest` moves on (a rolling rollout holds a node
    /// back on it).
    decided_content: BTreeMap<String, Content>,
    policy: RolloutPolicy,
}

impl Publisher {
    pub fn new(store: SnapshotStore, metrics: Arc<Metrics>, first_generation: u64) -> Self {
        Publisher {
            store,
            metrics,
            first_generation,
            decided: BTreeMap::new(),
            latest: BTreeMap::new(),
            decided_content: BTreeMap::new(),
            policy: RolloutPolicy::AllAtOnce,
        }
    }

    pub fn set_policy(&mut self, policy: RolloutPolicy) {
        self.policy = policy;
    }

    /// Takes the newly compiled snapshots as this replica's latest content (what a node gets
    /// next once a decision says so). A node decided on content this replica had not compiled
    /// yet is served now if this compile produced it.
    pub fn publish(&mut self, compiled: &Compiled) {
        // The cluster's tables are validated and encoded once, for every node.
        let cluster = match SharedCluster::encode(compiled.cluster.clone()) {
            Ok(cluster) => Arc::new(cluster),
            Err(e) => {
                error!(error = %e, "compiled cluster tables are invalid; nothing published");
                return;
            }
        };
        self.store.remember_cluster(&cluster);
        for (node, own) in &compiled.nodes {
            let Some(content) = encoded(node, own, compiled.generation, &cluster) else {
                continue;
            };
            let hash = content.hash;
            self.latest.insert(node.clone(), content.clone());
            if let Some(decision) = self.decided.get(node).copied()
                && decision.content_hash == hash
                && self
                    .decided_content
                    .get(node)
                    .is_none_or(|c| c.hash != hash)
            {
                self.decided_content.insert(node.clone(), content);
                self.serve(node, decision);
            }
        }
    }

    /// The leader's step: the decisions the rollout policy allows now (nodes whose latest content
    /// differs from their decided one), given what each agent reports live. Nothing is served:
    /// [`adopt`](Self::adopt) does that once the decisions are stored.
    pub fn propose(&self, live: &dyn Fn(&str) -> Option<u64>) -> Decisions {
        let pending: Vec<&String> = self
            .latest
            .iter()
            .filter(|(node, c)| {
                self.decided
                    .get(*node)
                    .is_none_or(|d| d.content_hash != c.hash)
            })
            .map(|(node, _)| node)
            .collect();
        let due: Vec<&String> = match &self.policy {
            RolloutPolicy::AllAtOnce => pending,
            RolloutPolicy::Rolling {
                max_unavailable,
                canary,
            } => self.rolling_due(&pending, *max_unavailable, canary, live),
        };
        due.into_iter()
            .filter_map(|node| {
                let content = self.latest.get(node)?;
                let generation = self
                    .decided
                    .get(node)
                    .map_or(self.first_generation, |d| d.generation + 1);
                Some((
                    node.clone(),
                    Decision {
                        generation,
                        content_hash: content.hash,
                    },
                ))
            })
            .collect()
    }

    /// Which pending nodes a rolling rollout moves now: at most `max_unavailable` in flight
    /// (decided, not yet reported live), canaries first, the others once every canary runs its
    /// decided snapshot; a node that never had a snapshot serves no traffic yet and always goes.
    fn rolling_due<'a>(
        &self,
        pending: &[&'a String],
        max_unavailable: usize,
        canary: &BTreeSet<String>,
        live: &dyn Fn(&str) -> Option<u64>,
    ) -> Vec<&'a String> {
        let in_flight = self
            .decided
            .iter()
            .filter(|(node, d)| live(node) != Some(d.generation))
            .count();
        let room = max_unavailable.max(1).saturating_sub(in_flight);
        let is_pending = |node: &String| pending.contains(&node);
        let canaries_done = canary.iter().all(|node| {
            !is_pending(node)
                && self
                    .decided
                    .get(node)
                    .is_none_or(|d| live(node) == Some(d.generation))
        });
        let mut candidates: Vec<&'a String> = pending
            .iter()
            .copied()
            .filter(|node| self.decided.contains_key(*node))
            .collect();
        // Canaries first, then the rest (by name) once every canary runs its new snapshot.
        candidates.sort_by_key(|node| (!canary.contains(*node), (*node).clone()));
        let first_snapshots = pending
            .iter()
            .copied()
            .filter(|n| !self.decided.contains_key(*n));
        candidates
            .into_iter()
            .filter(|node| canary.contains(*node) || canaries_done)
            .take(room)
            .chain(first_snapshots)
            .collect()
    }

    /// Makes `decisions` (the leader's, as stored) the served snapshots; returns the nodes whose
    /// decision changed. Content this replica has not compiled is served once it has.
    pub fn adopt(&mut self, decisions: &Decisions) -> Vec<String> {
        let mut changed = Vec::new();
        for (node, decision) in decisions {
            if self.decided.get(node) == Some(decision) {
                continue;
            }
            self.decided.insert(node.clone(), *decision);
            let kept = self
                .decided_content
                .get(node)
                .filter(|c| c.hash == decision.content_hash)
                .cloned();
            let latest = self
                .latest
                .get(node)
                .filter(|c| c.hash == decision.content_hash)
                .cloned();
            match latest.or(kept) {
                Some(content) => {
                    self.decided_content.insert(node.clone(), content);
                }
                None => {
                    self.decided_content.remove(node);
                }
            }
            self.serve(node, *decision);
            changed.push(node.clone());
        }
        changed
    }

    /// [`propose`](Self::propose) and [`adopt`](Self::adopt) at once: a replica that decides
    /// alone (no election, or a `dir:` source).
    pub fn advance(&mut self, live: &dyn Fn(&str) -> Option<u64>) -> Vec<String> {
        let proposed = self.propose(live);
        self.adopt(&proposed)
    }

    /// The decisions this replica serves.
    pub fn decisions(&self) -> &Decisions {
        &self.decided
    }

    /// Serves `decision` to `node`: its bytes when this replica has the content, else the
    /// decision alone (agents holding it get `304`; others wait for this replica to compile it).
    fn serve(&self, node: &str, decision: Decision) {
        let content = self
            .decided_content
            .get(node)
            .filter(|c| c.hash == decision.content_hash);
        // The content was validated and encoded once when compiled; only the generation differs.
        let body = content.and_then(|c| {
            let mut node_part = c.node_part.to_vec();
            match kmesh_snapshot::set_generation(&mut node_part, decision.generation) {
                Ok(()) => Some(SnapshotBody {
                    node_part: Bytes::from(node_part),
                    cluster: c.cluster.clone(),
                    node: c.node.clone(),
                    generation: decision.generation,
                }),
                Err(e) => {
                    error!(node, error = %e, "setting the generation failed; not served");
                    None
                }
            }
        });
        info!(
            node,
            generation = decision.generation,
            hash = format!("{:016x}", decision.content_hash),
            bytes = body.as_ref().map(SnapshotBody::len),
            "serving snapshot"
        );
        if let Some(b) = &body {
            self.metrics.snapshot_size(node, b.len());
        }
        self.metrics.published(node, decision.generation);
        self.store.publish(
            node,
            Published {
                generation: decision.generation,
                content_hash: decision.content_hash,
                body,
            },
        );
    }

    /// Every node the publisher has seen, with its decided generation and whether newer content
    /// waits.
    pub fn nodes(&self) -> Vec<NodeState> {
        let names: BTreeSet<&String> = self.decided.keys().chain(self.latest.keys()).collect();
        names
            .into_iter()
            .map(|node| {
                let decided = self.decided.get(node);
                NodeState {
                    node: node.clone(),
                    generation: decided.map_or(0, |d| d.generation),
                    pending: self
                        .latest
                        .get(node)
                        .is_some_and(|c| decided.is_none_or(|d| d.content_hash != c.hash)),
                }
            })
            .collect()
    }
}

/// A node's compiled content: its node part encoded for `cluster`, and the content hash (which
/// does not cover the generation: encoding validates the node's tables and gives both); `None`,
/// logged, when the node's tables do not encode.
fn encoded(
    node: &str,
    own: &NodeTables,
    generation: u64,
    cluster: &Arc<SharedCluster>,
) -> Option<Content> {
    match own
        .encode(generation, cluster.summary)
        .map(|b| kmesh_snapshot::peek_header(&b).map(|h| (h.content_hash, b)))
    {
        Ok(Ok((hash, node_part))) => Some(Content {
            hash,
            node_part: Bytes::from(node_part),
            node: Arc::new(own.clone()),
            cluster: cluster.clone(),
        }),
        Ok(Err(e)) => {
            error!(node, error = %e, "compiled snapshot does not decode; not published");
            None
        }
        Err(e) => {
            error!(node, error = %e, "compiled snapshot is invalid; not published");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use kmesh_common::mode;
    use kmesh_snapshot::Format;
    use kmesh_snapshot::builder::SnapshotBuilder;

    use super::*;

    fn compiled(nodes: &[&str], content: u16) -> Compiled {
        let mut c = Compiled {
            generation: 1,
            ..Compiled::default()
        };
        for node in nodes {
            let mut b = SnapshotBuilder::new(node, 1, mode::KERNEL_NATIVE);
            let set = b.backend_set(0, &[]);
            b.service("10.96.0.1".parse().unwrap(), content, &[(1, set)]);
            let (own, cluster) = b.build().into_parts();
            c.nodes.insert(node.to_string(), own);
            c.cluster = Arc::new(cluster);
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
    fn served_bytes_are_the_snapshot_encoded_at_the_decided_generation() {
        let (mut p, store) = publisher(RolloutPolicy::AllAtOnce);
        for (content, generation) in [(80, 100), (81, 101)] {
            let compiled = compiled(&["a"], content);
            p.publish(&compiled);
            assert_eq!(p.advance(&|_| None), vec!["a"]);
            let mut expected = compiled.snapshot("a").unwrap();
            expected.generation = generation;
            let published = store.get("a").unwrap();
            assert_eq!(published.generation, generation);
            let body = published.body.unwrap();
            for format in Format::ALL {
                assert_eq!(
                    body.to_vec(format).unwrap(),
                    expected.encode_as(format).unwrap()
                );
            }
            assert_eq!(
                kmesh_snapshot::peek_header(&body.to_vec(Format::V4).unwrap())
                    .unwrap()
                    .content_hash,
                published.content_hash
            );
        }
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
