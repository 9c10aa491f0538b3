//! The snapshot wire format. This comment is the normative specification; the encoder and the
//! decoder implement exactly this and nothing more.
//!
//! A snapshot is one byte string. All integers are little-endian. Offsets are in bytes.
//!
//! ```text
//! offset  field
//! 0       magic           [u8; 8] = b"KMSNAP\r\n"
//! 8       format_version  u16     = 4 (FORMAT_VERSION); 3 and 2 are still read and written
//!                                   (below)
//! 10      layout_version  u16     = kmesh_common::LAYOUT_VERSION
//! 12      flags           u32     = 0 (reserved, must be zero)
//! 16      generation      u64
//! 24      content_hash    u64     = FNV-1a 64 (see `content_hash`) of the 16 bytes
//!                                   le(node_hash) ++ le(cluster_hash), where node_hash is FNV-1a 64
//!                                   of bytes [40, cluster_offset) and cluster_hash is the cluster
//!                                   part's (below)
//! 32      total_len       u64     = length of the whole snapshot in bytes
//! 40      cluster_offset  u64     = where the cluster part starts: a multiple of 8, at most
//!                                   total_len, and exactly where the node part's sections end
//! 48      node_name_len   u16
//! 50      node_name       [u8; node_name_len]
//!         zero padding to the next multiple of 8
//! the node part: six sections, in this order of kind:
//!         1 NodeConfig, 6 Workloads, 7 AuthzWorkloads, 8 AuthzSources, 9 AuthzVerdicts,
//!         10 AuthzPolicies
//! the cluster part (at cluster_offset): seven sections, in this order of kind:
//!         2 Services, 3 Routes, 4 BackendSets, 5 Endpoints, 11 NameStrings, 12 WorkloadNames,
//!         13 ServiceNames
//! each section:
//!         kind            u32
//!         record_size     u32     = size_of the kmesh_common record of this kind
//!         count           u32
//!         reserved        u32     = 0
//!         count * record_size bytes of records
//!         zero padding to the next multiple of 8
//! nothing after the last section
//! ```
//!
//! The cluster part is what every node of a compile shares (services, routes, backend sets,
//! endpoints and names): it holds nothing of the node, the generation or the node part, and it
//! starts on a multiple of 8, so its bytes are the same in every node's snapshot. The operator
//! validates, encodes and hashes it once per compile ([`crate::ClusterTables::encode`]) and sends
//! each node its own node part followed by those shared bytes; the content hash needs only the two
//! parts' hashes. The node part is the rest: the header, the node name, and the node's own tables.
//!
//! The cluster hash is [`ClusterHashes::cluster_hash`](crate::ClusterHashes::cluster_hash) of the
//! seven sections: for each, in order, its record count and the wrapping sum over its records of
//! `fmix64(FNV-1a 64 of le(kind) ++ record bytes)` (murmur3's 64-bit finalizer), or for the string
//! table its chunk count and FNV-1a 64 of its bytes; then FNV-1a 64 of `le(kind) ++ le(count) ++
//! le(hash)` (20 bytes a section) over the seven. A change of a few records changes the sums by
//! those records' hashes alone, so a receiver holding the old tables and their sums can check the
//! content hash of a changed snapshot without hashing all of it (the deltas of
//! [`crate::delta_format`]).
//!
//! Format 3 (agents that read format 3 but not 4 ask for it) differs in one point: its
//! cluster_hash is FNV-1a 64 of the cluster part's bytes `[cluster_offset, total_len)`.
//!
//! Format 2 (agents before format 3 read only it; the operator still serves it to an agent that
//! does not ask for format 3, see [`crate::contract`]) differs in three points: there is no
//! `cluster_offset` (the node name length is at offset 40, the name at 42); the thirteen sections
//! come in the order of their kinds (1 to 13); and `content_hash` is FNV-1a 64 over every byte
//! from offset 40 to the end. Every other rule is the same. Format 1 had no names sections.
//!
//! Each record is exactly the in-memory bytes of the `#[repr(C)]` record of `kmesh_common`
//! ([`NodeConfig`], [`ServiceRecord`], [`RouteRecord`], [`BackendSetRecord`], [`EndpointRecord`],
//! [`WorkloadRecord`], [`AuthzWorkloadRecord`], [`AuthzSourceRecord`], [`AuthzVerdictRecord`],
//! [`AuthzPolicyRecord`], [`NameBytes`], [`WorkloadNameRecord`], [`ServiceNameRecord`]) on a
//! little-endian machine. The records have no implicit padding (asserted in `kmesh_common`), so
//! every byte is a defined field and the encoding is unique. Sections 11-13 (`kmesh_common::names`)
//! are for user space: the agent never copies them into a map.
//!
//! Rules a valid snapshot follows (the decoder checks all of them; the encoder refuses to produce a
//! snapshot that breaks one):
//!
//! - header: magic, `format_version` 2, 3 or 4, `layout_version == LAYOUT_VERSION`, `flags == 0`,
//!   `total_len` equals the length of the input, the hash matches;
//! - node name: 1..=253 bytes, a DNS subdomain as Kubernetes validates node names: dot-separated
//!   labels of `a-z`, `0-9` and `-`, each label starting and ending with a letter or digit;
//! - every reserved field and every padding byte is zero;
//! - NodeConfig: exactly one record; `mode` is one of `kmesh_common::mode`; `access_log` is one of
//!   `kmesh_common::access_log` (0, 1); `log_level` is one of `kmesh_common::log_level` (1..=5);
//!   `reserved` is zero;
//! - Services: strictly increasing by key (so keys are unique); `protocol == IPPROTO_TCP`;
//!   `pad == 0`; `port != 0`; `flags` has only bits of `kmesh_common::service_flags`; `route_id`
//!   names an existing route;
//! - Routes: strictly increasing by `route_id`; `1 <= destination_count <= MAX_ROUTE_DESTINATIONS`;
//!   `cumulative_weight[0..count]` strictly increasing from a positive first value (every weight is
//!   positive); `cumulative_weight[count - 1] == total_weight`; both arrays zero from index `count`
//!   on; every `backend_set[0..count]` names an existing backend set;
//! - BackendSets: strictly increasing by `set_id`; `lb_policy < lb_policy::COUNT`;
//! - Endpoints: strictly increasing by `(set_id, index)`; the set exists; the endpoints of a set
//!   have exactly the indexes `0..endpoint_count`; `port != 0`; `pad == 0`;
//! - Workloads: strictly increasing by `ip`; `pad == 0`;
//! - the four authorization tables (`kmesh_common::authz`) are all empty, or AuthzWorkloads is not
//!   empty (sources, verdicts and policies with no workload to use them are refused);
//! - AuthzWorkloads: strictly increasing by `ip`; `value.pad == 0`; AuthzVerdicts holds the
//!   default verdict `(policy_set, ANY_CLASS, ANY_PORT)` of the record's `policy_set`;
//! - AuthzSources: strictly increasing by key; `prefix_len <= 128`; a prefix shorter than 96 bits
//!   does not hold the IPv4-mapped range `::ffff:0:0/96` (it would match both address families;
//!   IPv4 blocks are IPv4-mapped with `prefix_len` 96..=128) unless the table also has the entry
//!   `::ffff:0:0/96` itself, which every IPv4 source then matches first; canonical: every address bit past
//!   `prefix_len` is zero; `source_class` is neither `UNKNOWN_SOURCE` (0) nor `ANY_CLASS`;
//! - AuthzVerdicts: strictly increasing by key; `key.pad == 0`; `value.pad == 0`; `action` is one
//!   of `authz_action`; `reason` is in `1..authz_reason::COUNT`; `action` is ALLOW exactly when
//!   `reason` is NO_ALLOW_POLICY or ALLOW_MATCHED; `policy == 0` exactly when `reason` is
//!   NO_ALLOW_POLICY or NO_ALLOW_MATCHED, and otherwise names an AuthzPolicies record: of kind
//!   PEER_AUTHENTICATION for STRICT_MTLS, AUTHORIZATION_POLICY for ALLOW_MATCHED and DENY_MATCHED,
//!   either for UNCOMPILABLE (a PeerAuthentication that cannot be compiled fails closed too);
//! - AuthzPolicies: strictly increasing by `policy`; `policy != 0`; `kind` is one of
//!   `authz_policy_kind`; `pad == 0`; `1 <= name_len <= MAX_POLICY_NAME_LEN`; the bytes of `name`
//!   from `name_len` on are zero; the name is `namespace/name`, a DNS label (at most 63 bytes),
//!   `/`, and a DNS subdomain (at most 253 bytes): labels of `a-z`, `0-9` and `-`, each starting
//!   and ending with a letter or digit.
//!
//! - NameStrings: the string table in 8-byte chunks (`NameBytes`): entries of a `u16` length in
//!   `1..=MAX_NAME_LEN` (253) and that many bytes of UTF-8, back to back from offset 0, each string
//!   once; after the last entry, fewer than 8 zero bytes up to the end of the last chunk;
//! - WorkloadNames: strictly increasing by `ip`; `workload`, `namespace`, `service_account`,
//!   `app` and `version` are each `NO_NAME` (`u32::MAX`) or the offset of an entry;
//! - ServiceNames: strictly increasing by `service_id`; the `service_id` is one of the services
//!   section; `host` is the offset of an entry; `name` and `namespace` are `NO_NAME` or one.
//!
//! Order means the derived `Ord` of the `kmesh_common` key types: addresses compare as big-endian
//! byte strings, integers numerically, composite keys field by field.

use crate::error::Table;
use kmesh_common::names::{NameBytes, ServiceNameRecord, WorkloadNameRecord};
use kmesh_common::{
    AuthzPolicyRecord, AuthzSourceRecord, AuthzVerdictRecord, AuthzWorkloadRecord,
    BackendSetRecord, EndpointRecord, NodeConfig, RouteRecord, ServiceRecord, WorkloadRecord,
};

// The records are copied as their in-memory bytes, which are only the little-endian wire bytes on a
// little-endian machine. Refuse to build anywhere else rather than produce wrong snapshots.
#[cfg(target_endian = "big")]
compile_error!(
    "kmesh-snapshot copies records as in-memory bytes and supports little-endian targets only"
);

/// First eight bytes of every snapshot. The `\r\n` catches text-mode transfers that mangle line
/// ends.
pub const MAGIC: [u8; 8] = *b"KMSNAP\r\n";

/// The version of the framing described in this module, the one [`crate::Snapshot::encode`]
/// writes.
pub const FORMAT_VERSION: u16 = Format::V4.number();

/// A version of the wire format this build reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Format {
    /// The thirteen sections in kind order, one hash over them all: what agents before format 3
    /// read.
    V2,
    /// A node part and a cluster part shared by every node, hashed apart.
    V3,
    /// Format 3's bytes, with a cluster hash that can be updated record by record (the current
    /// format).
    V4,
}

impl Format {
    /// Every format this build reads, oldest first.
    pub const ALL: [Format; 3] = [Format::V2, Format::V3, Format::V4];

    /// The `format_version` header field.
    pub const fn number(self) -> u16 {
        match self {
            Format::V2 => 2,
            Format::V3 => 3,
            Format::V4 => 4,
        }
    }

    /// The format of a `format_version` field; `None` for one this build does not read.
    pub const fn from_number(number: u16) -> Option<Format> {
        match number {
            2 => Some(Format::V2),
            3 => Some(Format::V3),
            4 => Some(Format::V4),
            _ => None,
        }
    }

    /// Whether the snapshot is a node part and a cluster part (format 3 on).
    pub const fn has_parts(self) -> bool {
        !matches!(self, Format::V2)
    }

    /// Where the node name's length is: after the fixed header, and from format 3 on after
    /// `cluster_offset`.
    pub(crate) const fn node_name_offset(self) -> usize {
        match self {
            Format::V2 => FIXED_HEADER_LEN,
            Format::V3 | Format::V4 => OFF_CLUSTER_OFFSET + size_of::<u64>(),
        }
    }
}

/// Length of the fixed part of the header (magic to `total_len`), the same in every format; the
/// content hash covers every byte from here to the end.
pub const FIXED_HEADER_LEN: usize = 40;

/// Longest node name (a DNS subdomain).
pub const MAX_NODE_NAME_LEN: usize = 253;

/// Length of a section header.
pub(crate) const SECTION_HEADER_LEN: usize = 16;

/// Sections and the blocks inside the header end on multiples of this.
pub(crate) const ALIGN: usize = 8;

// Field offsets of the fixed header.
pub(crate) const OFF_FORMAT_VERSION: usize = 8;
pub(crate) const OFF_LAYOUT_VERSION: usize = 10;
pub(crate) const OFF_FLAGS: usize = 12;
pub(crate) const OFF_GENERATION: usize = 16;
pub(crate) const OFF_CONTENT_HASH: usize = 24;
pub(crate) const OFF_TOTAL_LEN: usize = 32;
/// Format 3 on.
pub(crate) const OFF_CLUSTER_OFFSET: usize = 40;

/// Number of zero bytes that follow `len` bytes to reach the next multiple of [`ALIGN`].
pub(crate) const fn padding_after(len: usize) -> usize {
    (ALIGN - len % ALIGN) % ALIGN
}

mod sealed {
    pub trait Sealed {}
}

/// A `kmesh_common` record that is a section of the snapshot.
///
/// # Safety
///
/// Implementors must be `#[repr(C)]`, made only of integers and integer arrays, with no implicit
/// padding and a non-zero size: then every byte of a value is initialized (so it can be viewed as
/// bytes) and every bit pattern is a valid value (so it can be read from arbitrary bytes). The trait
/// is sealed; the thirteen implementations below are the only ones, and `kmesh_common` asserts their
/// sizes.
pub unsafe trait WireRecord: Copy + sealed::Sealed {
    /// The section kind in the wire format.
    const KIND: u32;
    /// The table this record belongs to, for error messages.
    const TABLE: Table;
}

macro_rules! wire_record {
    ($ty:ty, $table:expr) => {
        impl sealed::Sealed for $ty {}
        // SAFETY: a kmesh_common record: repr(C), integer fields only, no implicit padding (its size
        // is asserted in kmesh_common), non-zero size.
        unsafe impl WireRecord for $ty {
            const KIND: u32 = $table.kind();
            const TABLE: Table = $table;
        }
    };
}

wire_record!(NodeConfig, Table::NodeConfig);
wire_record!(ServiceRecord, Table::Services);
wire_record!(RouteRecord, Table::Routes);
wire_record!(BackendSetRecord, Table::BackendSets);
wire_record!(EndpointRecord, Table::Endpoints);
wire_record!(WorkloadRecord, Table::Workloads);
wire_record!(AuthzWorkloadRecord, Table::AuthzWorkloads);
wire_record!(AuthzSourceRecord, Table::AuthzSources);
wire_record!(AuthzVerdictRecord, Table::AuthzVerdicts);
wire_record!(AuthzPolicyRecord, Table::AuthzPolicies);
wire_record!(NameBytes, Table::NameStrings);
wire_record!(WorkloadNameRecord, Table::WorkloadNames);
wire_record!(ServiceNameRecord, Table::ServiceNames);

/// The wire `record_size` of `T`. Records are at most 328 bytes, so the cast cannot truncate.
pub(crate) const fn record_size<T: WireRecord>() -> u32 {
    size_of::<T>() as u32
}

/// Reads consecutive records from `bytes`; a trailing part shorter than one record is ignored (the
/// caller passes exactly `count * size_of::<T>()` bytes).
pub(crate) fn read_records<T: WireRecord>(bytes: &[u8]) -> Vec<T> {
    // chunks_exact yields slices of exactly size_of::<T>() bytes (size is non-zero per the trait
    // contract), and its exact size hint makes collect allocate once.
    bytes
        .chunks_exact(size_of::<T>())
        .map(|chunk| {
            // SAFETY: `chunk` holds size_of::<T>() readable bytes; read_unaligned needs no
            // alignment; T accepts every bit pattern (WireRecord contract).
            unsafe { core::ptr::read_unaligned(chunk.as_ptr().cast::<T>()) }
        })
        .collect()
}

/// The in-memory bytes of a slice of records, which are their wire bytes on little-endian targets.
pub(crate) fn records_as_bytes<T: WireRecord>(records: &[T]) -> &[u8] {
    // SAFETY: the slice is size_of_val(records) bytes of initialized memory: elements are laid out
    // back to back and have no padding (WireRecord contract). u8 has alignment 1, and the returned
    // slice borrows `records`, so it cannot outlive it.
    unsafe { core::slice::from_raw_parts(records.as_ptr().cast::<u8>(), size_of_val(records)) }
}
