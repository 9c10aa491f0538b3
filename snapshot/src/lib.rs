//! The per-node policy snapshot of kmesh-rs: a versioned binary format, its encoder and its
//! verifying decoder.
//!
//! The operator compiles the policy that concerns one node into a [`Snapshot`] and encodes it; the
//! node agent decodes it with [`Snapshot::decode`], which verifies everything, and copies the record
//! tables into the eBPF maps as they are. The records are the `#[repr(C)]` types of `kmesh_common`,
//! so the format has no second definition of the layout.
//!
//! The wire format is specified in [`format`](mod@format). The encoder is deterministic: equal snapshots give
//! equal bytes, and the decoder accepts exactly one encoding of each snapshot.
//!
//! [`builder`] makes valid snapshots for tests, demos and benchmarks. [`contract`] is the HTTP
//! contract by which agents fetch their snapshot from the operator ([`waypoint_contract`], re-exported
//! there, the one by which DualEngine's waypoints fetch their configuration); [`admin_contract`] the paths of
//! the agent's admin listener that `kmeshctl` reads. [`view`] renders a snapshot's records for
//! people (the agent's `/debug/config_dump`); [`explain`] says where a connection goes and why.

pub mod admin_contract;
pub mod builder;
pub mod contract;
mod decode;
pub mod delta;
pub mod delta_format;
mod encode;
mod error;
pub mod explain;
pub mod format;
mod hash;
mod name_lookup;
pub mod name_table;
pub mod names;
mod parts;
mod validate;
mod validate_authz;
mod validate_names;
pub mod view;
pub mod waypoint;
pub mod waypoint_contract;

#[cfg(test)]
mod delta_format_tests;
#[cfg(test)]
mod delta_tests;
#[cfg(test)]
mod format3_tests;
#[cfg(test)]
mod format4_tests;
#[cfg(test)]
mod names_tests;
#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

use kmesh_common::names::{ServiceNameRecord, WorkloadNameRecord};
use kmesh_common::{
    AuthzPolicyRecord, AuthzSourceRecord, AuthzVerdictRecord, AuthzWorkloadRecord,
    BackendSetRecord, EndpointRecord, NodeConfig, RouteRecord, ServiceRecord, WorkloadRecord,
};

pub use error::{DecodeError, EncodeError, Table, ValidationError};
pub use format::{FIXED_HEADER_LEN, FORMAT_VERSION, Format, MAGIC, MAX_NODE_NAME_LEN};
pub use hash::{ClusterHashes, TableHash, content_hash, parts_hash, record_hash};
pub use name_lookup::{EndpointServices, ServiceName, SnapshotNames, WorkloadName};
pub use parts::{ClusterPart, ClusterSummary, ClusterTables, NodeTables};

/// Everything the agent loads for one node and one generation.
///
/// The tables are sorted by key with no duplicates (see [`Snapshot::sort`]); [`Snapshot::encode`]
/// refuses a snapshot that is not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// The Kubernetes node the snapshot is for (a DNS subdomain).
    pub node_name: String,
    /// Increases with every snapshot the operator publishes for the node.
    pub generation: u64,
    pub config: NodeConfig,
    /// Sorted by key, unique.
    pub services: Vec<ServiceRecord>,
    /// Sorted by `route_id`, unique.
    pub routes: Vec<RouteRecord>,
    /// Sorted by `set_id`, unique.
    pub backend_sets: Vec<BackendSetRecord>,
    /// Sorted by `(set_id, index)`, unique.
    pub endpoints: Vec<EndpointRecord>,
    /// Sorted by `ip`, unique.
    pub workloads: Vec<WorkloadRecord>,
    /// Authorization of inbound connections (see `kmesh_common::authz`).
    pub authz: AuthzTables,
    /// Names for telemetry (see `kmesh_common::names`); user space only, never loaded into a map.
    pub names: NameTables,
}

/// The names sections of a snapshot (`kmesh_common::names` says what they hold). All empty: the
/// snapshot names nothing, and telemetry labels everything `unknown`. Read them with
/// [`Snapshot::names`]; write them with [`name_table::StringTable`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NameTables {
    /// The string table, a whole number of 8-byte chunks.
    pub strings: Vec<u8>,
    /// Sorted by `ip`, unique.
    pub workloads: Vec<WorkloadNameRecord>,
    /// Sorted by `service_id`, unique.
    pub services: Vec<ServiceNameRecord>,
}

/// The authorization tables of a snapshot (`kmesh_common::authz` says what they mean). All empty:
/// no workload of the node is bound by a policy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuthzTables {
    /// Sorted by `ip`, unique.
    pub workloads: Vec<AuthzWorkloadRecord>,
    /// Sorted by key, unique.
    pub sources: Vec<AuthzSourceRecord>,
    /// Sorted by key, unique.
    pub verdicts: Vec<AuthzVerdictRecord>,
    /// Sorted by `policy`, unique.
    pub policies: Vec<AuthzPolicyRecord>,
}

/// A decoded and verified snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decoded {
    pub snapshot: Snapshot,
    /// The content hash, as in the header and verified against the bytes.
    pub content_hash: u64,
    /// The format the bytes were in.
    pub format: Format,
    /// Format 4's section hashes of the cluster part (`None` for the older formats): what a delta
    /// from this snapshot updates.
    pub cluster_hashes: Option<ClusterHashes>,
}

/// What a node accepts. A snapshot beyond a table's limit is refused with
/// [`DecodeError::OverCapacity`] before its records are read; one beyond `max_bytes` with
/// [`DecodeError::TooLarge`] before anything else.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_bytes: u64,
    pub max_services: u32,
    pub max_routes: u32,
    pub max_backend_sets: u32,
    pub max_endpoints: u32,
    pub max_workloads: u32,
    pub max_authz_workloads: u32,
    pub max_authz_sources: u32,
    pub max_authz_verdicts: u32,
    pub max_authz_policies: u32,
    /// Bytes of the names' string table.
    pub max_name_bytes: u32,
    pub max_workload_names: u32,
    pub max_service_names: u32,
}

impl Limits {
    /// The most records `table` may hold; `None` for the node config (always one record) and for
    /// the names' string table, whose limit is in bytes (`max_name_bytes`).
    pub const fn max_of(&self, table: Table) -> Option<u32> {
        match table {
            Table::NodeConfig => None,
            Table::Services => Some(self.max_services),
            Table::Routes => Some(self.max_routes),
            Table::BackendSets => Some(self.max_backend_sets),
            Table::Endpoints => Some(self.max_endpoints),
            Table::Workloads => Some(self.max_workloads),
            Table::AuthzWorkloads => Some(self.max_authz_workloads),
            Table::AuthzSources => Some(self.max_authz_sources),
            Table::AuthzVerdicts => Some(self.max_authz_verdicts),
            Table::AuthzPolicies => Some(self.max_authz_policies),
            Table::NameStrings => None,
            Table::WorkloadNames => Some(self.max_workload_names),
            Table::ServiceNames => Some(self.max_service_names),
        }
    }

    /// No limit beyond what the format can express.
    pub const UNLIMITED: Limits = Limits {
        max_bytes: u64::MAX,
        max_services: u32::MAX,
        max_routes: u32::MAX,
        max_backend_sets: u32::MAX,
        max_endpoints: u32::MAX,
        max_workloads: u32::MAX,
        max_authz_workloads: u32::MAX,
        max_authz_sources: u32::MAX,
        max_authz_verdicts: u32::MAX,
        max_authz_policies: u32::MAX,
        max_name_bytes: u32::MAX,
        max_workload_names: u32::MAX,
        max_service_names: u32::MAX,
    };
}

/// Defaults for a node: 256 MiB, 100,000 services, 100,000 routes, 200,000 backend sets,
/// 1,000,000 endpoints, 16,384 workloads (`kmesh_common::MAX_ENROLLED_NETNS`); for authorization
/// 65,536 workload addresses, 1,000,000 sources, 4,000,000 verdicts and 100,000 policies; for
/// names 32 MiB of strings, 1,000,000 workload addresses (every pod of the cluster) and 100,000
/// services.
impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 256 * 1024 * 1024,
            max_services: 100_000,
            max_routes: 100_000,
            max_backend_sets: 200_000,
            max_endpoints: 1_000_000,
            max_workloads: kmesh_common::MAX_ENROLLED_NETNS,
            max_authz_workloads: 65_536,
            max_authz_sources: 1_000_000,
            max_authz_verdicts: 4_000_000,
            max_authz_policies: 100_000,
            max_name_bytes: 32 * 1024 * 1024,
            max_workload_names: 1_000_000,
            max_service_names: 100_000,
        }
    }
}

/// The header of a snapshot, read by [`peek_header`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub format_version: u16,
    pub layout_version: u16,
    pub generation: u64,
    pub content_hash: u64,
    pub total_len: u64,
    pub node_name: String,
}

impl Snapshot {
    /// The canonical bytes of the snapshot.
    ///
    /// Sorts nothing: a snapshot whose tables are not sorted, or that breaks any other rule the
    /// decoder checks (with [`Limits::UNLIMITED`]), is refused with [`EncodeError::Invalid`], so an
    /// invalid snapshot is never produced.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        self.encode_as(Format::V4)
    }

    /// The canonical bytes of the snapshot in `format`: [`Format::V2`] for agents that read
    /// nothing newer. Refuses an invalid snapshot as [`encode`](Self::encode) does.
    pub fn encode_as(&self, format: Format) -> Result<Vec<u8>, EncodeError> {
        encode::encode(self, format)
    }

    /// Sorts every table into canonical order. Records are ordered by key, then by the rest of the
    /// record, so the result does not depend on the input order even when keys repeat (which
    /// [`Snapshot::encode`] then refuses).
    pub fn sort(&mut self) {
        // The derived Ord of each record compares its key first: that is the table order.
        self.services.sort_unstable();
        self.routes.sort_unstable();
        self.backend_sets.sort_unstable();
        self.endpoints.sort_unstable();
        self.workloads.sort_unstable();
        self.authz.workloads.sort_unstable();
        self.authz.sources.sort_unstable();
        self.authz.verdicts.sort_unstable();
        self.authz.policies.sort_unstable();
        self.names.workloads.sort_unstable();
        self.names.services.sort_unstable();
    }

    /// Decodes and verifies a snapshot: framing, sizes, padding, the content hash, the node's
    /// `limits` and every content rule. Nothing in `bytes` is trusted; no input makes this panic,
    /// and it allocates no more than about the size of the input.
    pub fn decode(bytes: &[u8], limits: &Limits) -> Result<Decoded, DecodeError> {
        decode::decode(bytes, limits)
    }
}

/// The content hash the header of `bytes` must hold, computed as its format defines it (see
/// [`format`](mod@format)), whatever the header holds; for tests and the fuzzer, which make a
/// changed snapshot's hash right again. Refuses what the hash cannot be computed for: a header the
/// decoder refuses before hashing (magic, format version, flags, length, `cluster_offset`).
pub fn computed_content_hash(bytes: &[u8]) -> Result<u64, DecodeError> {
    decode::computed_content_hash(bytes)
}

/// Reads the header (magic, versions, generation, content hash, total length, node name) without
/// hashing or reading sections, for cheap "is this the snapshot I already have?" checks.
///
/// Checks the magic, `format_version` (the header layout depends on it), that `flags` is zero and
/// that the node name is present and valid. Returns `layout_version`, `total_len` and
/// `content_hash` as found: only [`Snapshot::decode`] verifies them.
pub fn peek_header(bytes: &[u8]) -> Result<Header, DecodeError> {
    decode::peek_header(bytes)
}

/// Sets the generation of `encoded`, the bytes of a snapshot as [`Snapshot::encode`] wrote them
/// (in either format), or of a node part as [`NodeTables::encode`] wrote it.
///
/// The generation is outside the content hash (which covers what follows the fixed header), so
/// the result is byte for byte what encoding the same snapshot at `generation` gives: the
/// operator encodes (and validates) each node's content once and serves it at whatever generation
/// a rollout decides. Refuses, changing nothing, bytes whose header [`peek_header`] refuses.
pub fn set_generation(encoded: &mut [u8], generation: u64) -> Result<(), DecodeError> {
    decode::peek_header(encoded)?;
    let field = format::OFF_GENERATION..format::OFF_GENERATION + size_of::<u64>();
    // In bounds: `peek_header` read the whole fixed header, which holds the generation.
    encoded[field].copy_from_slice(&generation.to_le_bytes());
    Ok(())
}
