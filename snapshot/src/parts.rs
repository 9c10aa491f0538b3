//! The two parts of a snapshot (formats 3 and 4, see [`crate::format`]): what every node of a compile
//! shares, and what is the node's own.
//!
//! The operator compiles one [`ClusterTables`] and one [`NodeTables`] per node, validates and
//! encodes the cluster tables once ([`ClusterTables::encode`], a [`ClusterPart`]), and each node's
//! own tables against it ([`NodeTables::encode`]). A node's snapshot is its node part followed by
//! the cluster part's bytes: at 1,000 nodes the cluster-wide tables are held, checked and hashed
//! once instead of a thousand times. [`Snapshot`] is the two joined, as the agent decodes it.

use kmesh_common::{
    BackendSetRecord, EndpointRecord, NodeConfig, RouteRecord, ServiceRecord, WorkloadRecord,
};

use crate::error::{EncodeError, ValidationError};
use crate::hash::ClusterHashes;
use crate::{AuthzTables, Format, NameTables, Snapshot, encode};

/// The tables of a snapshot that are the same for every node of a compile: the format's cluster
/// part. Each table is sorted by key with no duplicates, as in [`Snapshot`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterTables {
    pub services: Vec<ServiceRecord>,
    pub routes: Vec<RouteRecord>,
    pub backend_sets: Vec<BackendSetRecord>,
    pub endpoints: Vec<EndpointRecord>,
    pub names: NameTables,
}

/// A node's own tables: the format's node part, apart from the generation (a rollout decides it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeTables {
    pub node_name: String,
    pub config: NodeConfig,
    pub workloads: Vec<WorkloadRecord>,
    pub authz: AuthzTables,
}

/// A validated and encoded cluster part: the last bytes of every format 3 and format 4 snapshot of
/// its compile (the two formats' parts are the same bytes, hashed differently).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterPart {
    pub(crate) bytes: Vec<u8>,
    /// Format 3's cluster hash: FNV-1a 64 of the bytes.
    pub(crate) bytes_hash: u64,
    /// Format 4's section hashes.
    pub(crate) hashes: ClusterHashes,
}

impl ClusterPart {
    /// The part's bytes, as they end each node's snapshot.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    /// The cluster half of the content hash of every node's snapshot in `format` (format 3 or 4;
    /// format 2 has no parts, and gets format 3's).
    pub fn cluster_hash(&self, format: Format) -> u64 {
        self.summary().cluster_hash(format)
    }

    /// Format 4's section hashes, which a delta from this part updates.
    pub fn hashes(&self) -> ClusterHashes {
        self.hashes
    }

    /// What a node part's header needs of this part, kept when the bytes go elsewhere (the
    /// operator shares them between every node's response).
    pub fn summary(&self) -> ClusterSummary {
        ClusterSummary {
            len: self.bytes.len() as u64,
            bytes_hash: self.bytes_hash,
            hashes: self.hashes,
        }
    }
}

/// The length and hashes of an encoded cluster part ([`ClusterPart::summary`]): what the header of
/// a node part that it follows counts in its total length and content hash. Made only from a
/// [`ClusterPart`], so that a node part is never encoded for a cluster part that does not exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClusterSummary {
    pub(crate) len: u64,
    pub(crate) bytes_hash: u64,
    pub(crate) hashes: ClusterHashes,
}

impl ClusterSummary {
    /// See [`ClusterPart::cluster_hash`].
    pub fn cluster_hash(&self, format: Format) -> u64 {
        match format {
            Format::V4 => self.hashes.cluster_hash(),
            Format::V2 | Format::V3 => self.bytes_hash,
        }
    }

    /// The part's length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The cluster tables of a [`Snapshot`] or a [`ClusterTables`], borrowed: what the cluster part's
/// rules and encoder read.
#[derive(Clone, Copy)]
pub(crate) struct ClusterView<'a> {
    pub services: &'a [ServiceRecord],
    pub routes: &'a [RouteRecord],
    pub backend_sets: &'a [BackendSetRecord],
    pub endpoints: &'a [EndpointRecord],
    pub names: &'a NameTables,
}

/// The node's own tables of a [`Snapshot`] or a [`NodeTables`], borrowed.
#[derive(Clone, Copy)]
pub(crate) struct NodeView<'a> {
    pub node_name: &'a str,
    pub config: &'a NodeConfig,
    pub workloads: &'a [WorkloadRecord],
    pub authz: &'a AuthzTables,
}

impl ClusterTables {
    pub(crate) fn view(&self) -> ClusterView<'_> {
        ClusterView {
            services: &self.services,
            routes: &self.routes,
            backend_sets: &self.backend_sets,
            endpoints: &self.endpoints,
            names: &self.names,
        }
    }

    /// Sorts every table into canonical order (see [`Snapshot::sort`]).
    pub fn sort(&mut self) {
        self.services.sort_unstable();
        self.routes.sort_unstable();
        self.backend_sets.sort_unstable();
        self.endpoints.sort_unstable();
        self.names.workloads.sort_unstable();
        self.names.services.sort_unstable();
    }

    /// Checks every rule of the cluster part's tables (those of [`Snapshot::validate`] that
    /// concern them: no rule relates them to a node's tables).
    pub fn validate(&self) -> Result<(), ValidationError> {
        self.view().validate()
    }

    /// Validates and encodes the cluster part, once for every node of the compile.
    pub fn encode(&self) -> Result<ClusterPart, EncodeError> {
        let view = self.view();
        view.validate()?;
        encode::cluster_part(view)
    }
}

impl NodeTables {
    pub(crate) fn view(&self) -> NodeView<'_> {
        NodeView {
            node_name: &self.node_name,
            config: &self.config,
            workloads: &self.workloads,
            authz: &self.authz,
        }
    }

    /// Sorts every table into canonical order (see [`Snapshot::sort`]).
    pub fn sort(&mut self) {
        self.workloads.sort_unstable();
        self.authz.workloads.sort_unstable();
        self.authz.sources.sort_unstable();
        self.authz.verdicts.sort_unstable();
        self.authz.policies.sort_unstable();
    }

    /// Checks every rule of the node part's tables.
    pub fn validate(&self) -> Result<(), ValidationError> {
        self.view().validate()
    }

    /// Validates and encodes the node's part at `generation`, for the cluster part `cluster`
    /// summarizes, in the current format ([`FORMAT_VERSION`](crate::FORMAT_VERSION)): the node's
    /// snapshot is these bytes followed by that part's bytes (its header counts them in the total
    /// length and the content hash).
    pub fn encode(&self, generation: u64, cluster: ClusterSummary) -> Result<Vec<u8>, EncodeError> {
        self.encode_as(Format::V4, generation, cluster)
    }

    /// [`encode`](Self::encode) in `format`, 3 or 4 (format 2 has no parts: refused with
    /// [`EncodeError::NoParts`]).
    pub fn encode_as(
        &self,
        format: Format,
        generation: u64,
        cluster: ClusterSummary,
    ) -> Result<Vec<u8>, EncodeError> {
        let view = self.view();
        view.validate()?;
        encode::node_part(view, format, generation, cluster)
    }
}

impl From<&Snapshot> for ClusterTables {
    /// A copy of the snapshot's cluster tables.
    fn from(s: &Snapshot) -> ClusterTables {
        ClusterTables {
            services: s.services.clone(),
            routes: s.routes.clone(),
            backend_sets: s.backend_sets.clone(),
            endpoints: s.endpoints.clone(),
            names: s.names.clone(),
        }
    }
}

impl Snapshot {
    /// The snapshot of a node's tables joined with the cluster's.
    pub fn from_parts(node: NodeTables, cluster: ClusterTables, generation: u64) -> Snapshot {
        Snapshot {
            node_name: node.node_name,
            generation,
            config: node.config,
            services: cluster.services,
            routes: cluster.routes,
            backend_sets: cluster.backend_sets,
            endpoints: cluster.endpoints,
            workloads: node.workloads,
            authz: node.authz,
            names: cluster.names,
        }
    }

    /// The node's tables and the cluster's; the generation is left out.
    pub fn into_parts(self) -> (NodeTables, ClusterTables) {
        (
            NodeTables {
                node_name: self.node_name,
                config: self.config,
                workloads: self.workloads,
                authz: self.authz,
            },
            ClusterTables {
                services: self.services,
                routes: self.routes,
                backend_sets: self.backend_sets,
                endpoints: self.endpoints,
                names: self.names,
            },
        )
    }

    pub(crate) fn cluster_view(&self) -> ClusterView<'_> {
        ClusterView {
            services: &self.services,
            routes: &self.routes,
            backend_sets: &self.backend_sets,
            endpoints: &self.endpoints,
            names: &self.names,
        }
    }

    pub(crate) fn node_view(&self) -> NodeView<'_> {
        NodeView {
            node_name: &self.node_name,
            config: &self.config,
            workloads: &self.workloads,
            authz: &self.authz,
        }
    }
}
