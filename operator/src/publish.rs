//! From compile results to served snapshots: per node, a new generation only when the content
//! changed, so agents are woken for real changes only.
use std::{collections::BTreeMap, sync::Arc};

use hyper::body::Bytes;
use tracing::{error, info};

use crate::{
    compile::Compiled,
    metrics::Metrics,
    server::{Published, SnapshotStore},
};

pub struct Publisher {
    store: SnapshotStore,
    metrics: Arc<Metrics>,
    /// The first generation this process publishes. Seeded from the clock, so that a restarted
    /// operator's generations keep increasing (agents compare generation and hash).
    first_generation: u64,
    last: BTreeMap<String, (u64, u64)>,
}

/// What happened to one node's snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeUpdate {
    pub node: String,
    pub generation: u64,
    pub changed: bool,
    pub bytes: usize,
}

impl Publisher {
    pub fn new(store: SnapshotStore, metrics: Arc<Metrics>, first_generation: u64) -> Self {
        Publisher {
            store,
            metrics,
            first_generation,
            last: BTreeMap::new(),
        }
    }

    /// Publishes every node's snapshot whose content changed.
    pub fn publish(&mut self, compiled: &Compiled) -> Vec<NodeUpdate> {
        let mut updates = Vec::new();
        for (node, snapshot) in &compiled.snapshots {
            let mut snapshot = snapshot.clone();
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
            if let Some(&(generation, last_hash)) = self.last.get(node)
                && last_hash == hash
            {
                updates.push(NodeUpdate {
                    node: node.clone(),
                    generation,
                    changed: false,
                    bytes: 0,
                });
                continue;
            }
            let generation = self
                .last
                .get(node)
                .map_or(self.first_generation, |(g, _)| g + 1);
            snapshot.generation = generation;
            let bytes = match snapshot.encode() {
                Ok(b) => b,
                Err(e) => {
                    error!(node, error = %e, "encoding failed; not published");
                    continue;
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
            updates.push(NodeUpdate {
                node: node.clone(),
                generation,
                changed: true,
                bytes: bytes.len(),
            });
            self.store.publish(
                node,
                Published {
                    generation,
                    content_hash: hash,
                    bytes: Bytes::from(bytes),
                },
            );
            self.last.insert(node.clone(), (generation, hash));
        }
        updates
    }
}
