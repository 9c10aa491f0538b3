//! A node's snapshot as the server sends it, without a copy of its own of the cluster's tables.
//!
//! A compile's cluster part (services, routes, backend sets, endpoints and names; the same for
//! every node) is validated, encoded and hashed once ([`SharedCluster`]); each node's response is
//! its small node part followed by those shared bytes, in format 4, or in format 3 for an agent
//! that reads nothing newer (its node part is encoded when it asks; the cluster part's bytes are
//! the same). An agent that asks for nothing newer than format 2 (one from before format 3) gets
//! format 2, encoded when it asks: that costs a copy of the cluster's tables per request, only
//! while such agents remain.

use std::{
    collections::{BTreeMap, VecDeque},
    convert::Infallible,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use hyper::body::{Body, Bytes, Frame, SizeHint};
use kmesh_snapshot::delta::ClusterDelta;
use kmesh_snapshot::delta_format::{ClusterDeltaPart, delta_head};
use kmesh_snapshot::{ClusterSummary, ClusterTables, EncodeError, Format, NodeTables, Snapshot};
use tokio::sync::OnceCell;

/// One compile's cluster part: its bytes, which every node's response shares, the tables they
/// were encoded from (for format 2, and for deltas), and the deltas to it from earlier compiles'
/// parts, each made once for every node that holds that base.
#[derive(Debug)]
pub struct SharedCluster {
    pub part: Bytes,
    /// The part's length and hashes, for the node parts' headers.
    pub summary: ClusterSummary,
    pub tables: Arc<ClusterTables>,
    /// By the base's format 4 cluster hash.
    deltas: Mutex<BTreeMap<u64, Arc<DeltaCell>>>,
}

/// The delta from one base, made by the first request that asks for it; `None` once it was found
/// not to encode (the whole snapshot is sent then).
type DeltaCell = OnceCell<Option<Arc<DeltaBody>>>;

/// The changes from one cluster part to another, encoded once: what ends every node's delta from
/// that base.
#[derive(Debug)]
pub struct DeltaBody {
    pub part: ClusterDeltaPart,
    /// `part`'s bytes, shared by every response.
    pub bytes: Bytes,
}

impl SharedCluster {
    /// Validates and encodes `tables` once for every node.
    pub fn encode(tables: Arc<ClusterTables>) -> Result<SharedCluster, EncodeError> {
        let part = tables.encode()?;
        Ok(SharedCluster {
            summary: part.summary(),
            part: Bytes::from(part.into_bytes()),
            tables,
            deltas: Mutex::default(),
        })
    }

    /// The format 4 cluster hash, which agents name in `since`.
    pub fn cluster_hash(&self) -> u64 {
        self.summary.cluster_hash(Format::V4)
    }

    /// The changes from `base` to this part, made on a blocking thread the first time a node
    /// asks and shared by every later one (requests that ask meanwhile wait for the same work).
    pub async fn delta_from(&self, base: Arc<SharedCluster>) -> Option<Arc<DeltaBody>> {
        let cell = {
            let mut deltas = self.deltas.lock().unwrap_or_else(|p| p.into_inner());
            deltas.entry(base.cluster_hash()).or_default().clone()
        };
        let (tables, summary) = (self.tables.clone(), self.summary);
        cell.get_or_init(|| async move {
            let made = tokio::task::spawn_blocking(move || {
                let changes = ClusterDelta::between(&base.tables, &tables);
                ClusterDeltaPart::encode(&changes, &base.summary, &summary)
            })
            .await;
            match made {
                Ok(Ok(part)) => Some(Arc::new(DeltaBody {
                    bytes: Bytes::copy_from_slice(part.bytes()),
                    part,
                })),
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "a cluster delta does not encode; full snapshots are sent");
                    None
                }
                Err(e) => {
                    tracing::error!(error = %e, "making a cluster delta failed; full snapshots are sent");
                    None
                }
            }
        })
        .await
        .clone()
    }
}

/// A node's snapshot at one generation.
#[derive(Clone, Debug)]
pub struct SnapshotBody {
    /// The node part in format 4, at `generation`.
    pub node_part: Bytes,
    pub cluster: Arc<SharedCluster>,
    /// The node's own tables, for format 2.
    pub node: Arc<NodeTables>,
    pub generation: u64,
}

impl SnapshotBody {
    /// The length of the snapshot in format 4 (or 3: the same length).
    pub fn len(&self) -> usize {
        self.node_part.len() + self.cluster.part.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The snapshot in `format`: format 4 as the node part and the shared cluster part; format 3
    /// as a node part of its own, encoded now (the cluster part's bytes are the same), and the
    /// shared cluster part; format 2 encoded now.
    pub fn chunks(&self, format: Format) -> Result<Chunks, EncodeError> {
        match format {
            Format::V4 => Ok(Chunks::from([
                self.node_part.clone(),
                self.cluster.part.clone(),
            ])),
            Format::V3 => {
                let node_part =
                    self.node
                        .encode_as(Format::V3, self.generation, self.cluster.summary)?;
                Ok(Chunks::from([
                    Bytes::from(node_part),
                    self.cluster.part.clone(),
                ]))
            }
            Format::V2 => {
                let snapshot = Snapshot::from_parts(
                    (*self.node).clone(),
                    (*self.cluster.tables).clone(),
                    self.generation,
                );
                Ok(Chunks::from([Bytes::from(snapshot.encode_as(Format::V2)?)]))
            }
        }
    }

    /// The node's delta from the base of `delta`: its head (header and node part) and the
    /// shared changes; `None` when the delta would not be smaller than the snapshot.
    pub fn delta_chunks(&self, delta: &DeltaBody) -> Result<Option<Chunks>, EncodeError> {
        let head = delta_head(&self.node_part, &delta.part)?;
        if head.len() + delta.bytes.len() >= self.len() {
            return Ok(None);
        }
        Ok(Some(Chunks::from([Bytes::from(head), delta.bytes.clone()])))
    }

    /// The whole snapshot in `format`, in one buffer (for tests and tools).
    pub fn to_vec(&self, format: Format) -> Result<Vec<u8>, EncodeError> {
        let chunks = self.chunks(format)?;
        Ok(chunks.0.iter().flat_map(|b| b.iter().copied()).collect())
    }
}

/// A response body of byte chunks sent in order, none copied into another: a snapshot's node part
/// and the cluster part that a thousand responses share.
#[derive(Debug, Default)]
pub struct Chunks(VecDeque<Bytes>);

impl<const N: usize> From<[Bytes; N]> for Chunks {
    fn from(chunks: [Bytes; N]) -> Self {
        Chunks(chunks.into_iter().filter(|b| !b.is_empty()).collect())
    }
}

impl From<Bytes> for Chunks {
    fn from(bytes: Bytes) -> Self {
        Chunks::from([bytes])
    }
}

impl Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.get_mut().0.pop_front().map(|b| Ok(Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }

    /// Exact, so that the response has a `Content-Length`.
    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.0.iter().map(|b| b.len() as u64).sum())
    }
}

/// A small valid snapshot body of `node` at `generation`, for tests of what serves bodies.
#[cfg(test)]
pub(crate) fn for_tests(node: &str, generation: u64) -> SnapshotBody {
    use kmesh_common::mode;
    use kmesh_snapshot::builder::SnapshotBuilder;
    let mut b = SnapshotBuilder::new(node, generation, mode::KERNEL_NATIVE);
    let set = b.backend_set(0, &[]);
    b.service("10.96.0.1".parse().expect("an address"), 80, &[(1, set)]);
    body_of(b.build())
}

/// The body of `snapshot`, as the publisher makes it.
#[cfg(test)]
pub(crate) fn body_of(snapshot: Snapshot) -> SnapshotBody {
    let generation = snapshot.generation;
    let (own, cluster) = snapshot.into_parts();
    let cluster = Arc::new(SharedCluster::encode(Arc::new(cluster)).expect("valid tables"));
    let node_part = own
        .encode(generation, cluster.summary)
        .expect("valid tables");
    SnapshotBody {
        node_part: Bytes::from(node_part),
        cluster,
        node: Arc::new(own),
        generation,
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;
    use kmesh_snapshot::Limits;

    use super::*;

    fn body() -> (Snapshot, SnapshotBody) {
        let body = for_tests("node-1", 9);
        let snapshot =
            Snapshot::from_parts((*body.node).clone(), (*body.cluster.tables).clone(), 9);
        (snapshot, body)
    }

    #[tokio::test]
    async fn every_format_is_the_snapshot_and_formats_3_and_4_are_sent_in_two_chunks() {
        let (snapshot, body) = body();
        for format in Format::ALL {
            let chunks = body.chunks(format).unwrap();
            let expected = snapshot.encode_as(format).unwrap();
            assert_eq!(chunks.size_hint().exact(), Some(expected.len() as u64));
            let frames = chunks.0.len();
            assert_eq!(frames, if format.has_parts() { 2 } else { 1 });
            let sent = chunks.collect().await.unwrap().to_bytes();
            assert_eq!(sent, expected, "{format:?}");
            let decoded = Snapshot::decode(&sent, &Limits::default()).unwrap();
            assert_eq!(
                (decoded.snapshot, decoded.format),
                (snapshot.clone(), format)
            );
        }
        assert_eq!(body.len(), snapshot.encode().unwrap().len());
    }
}
