//! The wire format of a delta: a node's next snapshot as the changes from a snapshot it holds. This
//! comment is the normative specification; the encoder and the decoder implement exactly this.
//!
//! A delta is one byte string. All integers are little-endian. Offsets are in bytes.
//!
//! ```text
//! offset  field
//! 0       magic              [u8; 8] = b"KMDELTA\n" (DELTA_MAGIC)
//! 8       format_version     u16     = 4: the format of the result
//! 10      layout_version     u16     = kmesh_common::LAYOUT_VERSION
//! 12      flags              u32     bit 0 (STRINGS_REPLACED): the names' string table is
//!                                    replaced; every other bit zero
//! 16      generation         u64     the result's
//! 24      content_hash       u64     the result's: the content hash of its format 4 snapshot
//! 32      total_len          u64     = length of the whole delta in bytes
//! 40      base_cluster_hash  u64     the format 4 cluster hash of the snapshot the delta applies to
//! 48      node_part_len      u64     a multiple of 8, at least 16
//! 56      the result's node part: the bytes [40, cluster_offset) of its format 4 snapshot
//!         (cluster_offset, which is therefore 40 + node_part_len, the node name, and the six node
//!         sections), so the node part's hash is the snapshot's
//! then the changes to the cluster part, thirteen sections framed as a snapshot's, in this order:
//!         Services removed, Services upserted, Routes removed, Routes upserted, BackendSets
//!         removed, BackendSets upserted, Endpoints removed, Endpoints upserted, NameStrings,
//!         WorkloadNames removed, WorkloadNames upserted, ServiceNames removed, ServiceNames
//!         upserted
//! nothing after the last section
//! ```
//!
//! A removed section holds the records of the base that the result lacks, whole, as the base holds
//! them; an upserted section the records of the result that the base lacks or holds otherwise. Both
//! are sorted by key, and no key is in both. The NameStrings section holds the result's whole
//! string table when `STRINGS_REPLACED` is set, and nothing otherwise.
//!
//! The receiver holds the base decoded, with its format 4 section hashes
//! ([`crate::ClusterHashes`]). It checks `base_cluster_hash` against them, applies the changes
//! (refusing a removal of a record the base does not hold as given), updates the section hashes by
//! the records removed and upserted alone, and checks `content_hash` against FNV-1a 64 of
//! `le(node_hash) ++ le(cluster_hash)` exactly as for a snapshot: the result is accepted only if it
//! is, to the hash, the snapshot the operator compiled. Then the result's limits and every content
//! rule are checked, as for a snapshot. A refused delta changes nothing.
//!
//! The operator encodes the cluster changes once per base ([`ClusterDeltaPart`]), shared by every
//! node that runs that base, and each node's head (header and node part, [`delta_head`]) apart.

use kmesh_common::LAYOUT_VERSION;
use kmesh_common::names::{NameBytes, ServiceNameRecord, WorkloadNameRecord};
use kmesh_common::{BackendSetRecord, EndpointRecord, RouteRecord, ServiceRecord};

use crate::decode::{
    Reader, authz_sections, le_u16, le_u32, le_u64, node_config, node_name, section, section_bytes,
    wrong_magic,
};
use crate::delta::{ClusterDelta, DeltaError, Keyed, TableDelta};
use crate::encode::{patch, write_section, write_string_section};
use crate::error::{EncodeError, Table};
use crate::format::{ALIGN, FIXED_HEADER_LEN, Format};
use crate::hash::parts_hash;
use crate::{
    ClusterSummary, ClusterTables, DecodeError, Decoded, Limits, NodeTables, Snapshot,
    content_hash, peek_header,
};

/// First eight bytes of every delta.
pub const DELTA_MAGIC: [u8; 8] = *b"KMDELTA\n";

/// The `flags` bit saying the names' string table is replaced.
pub const STRINGS_REPLACED: u32 = 1;

/// Length of a delta's header, up to its node part.
pub const DELTA_HEADER_LEN: usize = 56;

const OFF_BASE_CLUSTER_HASH: usize = 40;
const OFF_NODE_PART_LEN: usize = 48;
/// The node part's fixed fields: `cluster_offset` (8 bytes), the node name's length (2) and at
/// least one byte of name, padded.
const MIN_NODE_PART_LEN: u64 = 16;

/// Whether `bytes` start like a delta (and not like a snapshot).
pub fn is_delta(bytes: &[u8]) -> bool {
    bytes.starts_with(&DELTA_MAGIC)
}

/// The cluster changes from one base to one result, encoded once for every node whose delta they
/// end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterDeltaPart {
    bytes: Vec<u8>,
    flags: u32,
    base_cluster_hash: u64,
    cluster_hash: u64,
}

impl ClusterDeltaPart {
    /// Encodes `delta`, the changes from the cluster part `base` summarizes to the one `result`
    /// summarizes. That it is their difference is the caller's to ensure (`ClusterDelta::between`
    /// of the two parts' tables): a delta that is not is refused by every receiver, whose result
    /// would not have `result`'s hash.
    pub fn encode(
        delta: &ClusterDelta,
        base: &ClusterSummary,
        result: &ClusterSummary,
    ) -> Result<ClusterDeltaPart, EncodeError> {
        fn table<R: Keyed>(out: &mut Vec<u8>, t: &TableDelta<R>) -> Result<(), EncodeError> {
            write_section(out, &t.removed)?;
            write_section(out, &t.upserted)
        }
        let mut out = Vec::new();
        table(&mut out, &delta.services)?;
        table(&mut out, &delta.routes)?;
        table(&mut out, &delta.backend_sets)?;
        table(&mut out, &delta.endpoints)?;
        write_string_section(&mut out, delta.name_strings.as_deref().unwrap_or_default())?;
        table(&mut out, &delta.workload_names)?;
        table(&mut out, &delta.service_names)?;
        Ok(ClusterDeltaPart {
            bytes: out,
            flags: if delta.name_strings.is_some() {
                STRINGS_REPLACED
            } else {
                0
            },
            base_cluster_hash: base.cluster_hash(Format::V4),
            cluster_hash: result.cluster_hash(Format::V4),
        })
    }

    /// The bytes that end every node's delta from this part's base.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The format 4 cluster hash of the base, which agents name in `since`.
    pub fn base_cluster_hash(&self) -> u64 {
        self.base_cluster_hash
    }
}

/// A node's delta up to the cluster changes: the header and the node part, for `node_part` (the
/// node's format 4 node part of the result, as [`NodeTables::encode`] wrote it, at the generation
/// to serve: see [`crate::set_generation`]) and the changes `part`. The delta is these bytes
/// followed by `part`'s. Refuses a node part that is not one in format 4, or that was encoded for
/// another cluster part than `part`'s result.
pub fn delta_head(node_part: &[u8], part: &ClusterDeltaPart) -> Result<Vec<u8>, EncodeError> {
    let header = peek_header(node_part).map_err(|e| EncodeError::NotANodePart(Box::new(e)))?;
    let not_a_node_part = |e| EncodeError::NotANodePart(Box::new(e));
    if header.format_version != Format::V4.number() {
        return Err(not_a_node_part(DecodeError::UnsupportedFormatVersion {
            found: header.format_version,
        }));
    }
    let own = node_part.get(FIXED_HEADER_LEN..).unwrap_or_default();
    if le_u64(node_part, FIXED_HEADER_LEN) != node_part.len() as u64 {
        return Err(not_a_node_part(DecodeError::ClusterOffset {
            offset: le_u64(node_part, FIXED_HEADER_LEN),
            len: node_part.len() as u64,
        }));
    }
    let expected = parts_hash(content_hash(own), part.cluster_hash);
    if header.content_hash != expected {
        return Err(EncodeError::NodePartOfAnotherCluster {
            node_part: header.content_hash,
            delta: expected,
        });
    }
    let total_len = DELTA_HEADER_LEN + own.len() + part.bytes.len();
    let mut out = Vec::with_capacity(DELTA_HEADER_LEN + own.len());
    out.extend_from_slice(&DELTA_MAGIC);
    out.extend_from_slice(&Format::V4.number().to_le_bytes());
    out.extend_from_slice(&LAYOUT_VERSION.to_le_bytes());
    out.extend_from_slice(&part.flags.to_le_bytes());
    out.extend_from_slice(&header.generation.to_le_bytes());
    out.extend_from_slice(&header.content_hash.to_le_bytes());
    out.extend_from_slice(&(total_len as u64).to_le_bytes());
    out.extend_from_slice(&part.base_cluster_hash.to_le_bytes());
    out.extend_from_slice(&(own.len() as u64).to_le_bytes());
    out.extend_from_slice(own);
    debug_assert_eq!(
        out.len() % ALIGN,
        0,
        "a node part is a whole number of 8-byte blocks"
    );
    Ok(out)
}

/// A delta read and checked in its framing and the node part's content, not yet applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delta {
    pub generation: u64,
    /// The result's content hash, as the header holds it (checked by [`Delta::apply`]).
    pub content_hash: u64,
    pub base_cluster_hash: u64,
    /// The result's node part.
    pub node: NodeTables,
    /// FNV-1a 64 of the node part's bytes.
    node_hash: u64,
    pub cluster: ClusterDelta,
}

impl Delta {
    /// Reads a delta: the header, the node part and the cluster changes, with the same checks of
    /// framing, sizes, padding and `limits` as [`Snapshot::decode`] (each changes section within
    /// its table's limit); nothing in `bytes` is trusted and no input makes this panic.
    pub fn decode(bytes: &[u8], limits: &Limits) -> Result<Delta, DecodeError> {
        let len = bytes.len() as u64;
        if len > limits.max_bytes {
            return Err(DecodeError::TooLarge {
                len,
                max: limits.max_bytes,
            });
        }
        if let Some(found) = wrong_magic(bytes, &DELTA_MAGIC) {
            return Err(DecodeError::DeltaMagic { found });
        }
        if bytes.len() < DELTA_HEADER_LEN {
            return Err(DecodeError::TooShort {
                len,
                min: DELTA_HEADER_LEN as u64,
            });
        }
        let format_version = le_u16(bytes, 8);
        if format_version != Format::V4.number() {
            return Err(DecodeError::UnsupportedFormatVersion {
                found: format_version,
            });
        }
        let layout_version = le_u16(bytes, 10);
        if layout_version != LAYOUT_VERSION {
            return Err(DecodeError::LayoutVersionMismatch {
                found: layout_version,
                expected: LAYOUT_VERSION,
            });
        }
        let flags = le_u32(bytes, 12);
        if flags & !STRINGS_REPLACED != 0 {
            return Err(DecodeError::HeaderFlags { flags });
        }
        let total_len = le_u64(bytes, 32);
        if total_len > len {
            return Err(DecodeError::Truncated {
                expected: total_len,
                got: len,
            });
        }
        if total_len < len {
            return Err(DecodeError::TrailingBytes {
                expected: total_len,
                got: len,
            });
        }
        let node_part_len = le_u64(bytes, OFF_NODE_PART_LEN);
        let available = len - DELTA_HEADER_LEN as u64;
        if !node_part_len.is_multiple_of(ALIGN as u64)
            || node_part_len < MIN_NODE_PART_LEN
            || node_part_len > available
        {
            return Err(DecodeError::DeltaNodePartLen {
                len: node_part_len,
                available,
            });
        }
        // In bounds and a usize: at most `available`, which came from a slice's length.
        let node_end = DELTA_HEADER_LEN + node_part_len as usize;
        let own = &bytes[DELTA_HEADER_LEN..node_end];
        let node = node_part(own, limits)?;

        let mut r = Reader::new(bytes, node_end);
        let cluster = ClusterDelta {
            services: table::<ServiceRecord>(&mut r, limits)?,
            routes: table::<RouteRecord>(&mut r, limits)?,
            backend_sets: table::<BackendSetRecord>(&mut r, limits)?,
            endpoints: table::<EndpointRecord>(&mut r, limits)?,
            name_strings: strings(&mut r, flags, limits)?,
            workload_names: table::<WorkloadNameRecord>(&mut r, limits)?,
            service_names: table::<ServiceNameRecord>(&mut r, limits)?,
        };
        if r.remaining() != 0 {
            return Err(DecodeError::TrailingData {
                offset: r.pos() as u64,
                len: r.remaining() as u64,
            });
        }
        Ok(Delta {
            generation: le_u64(bytes, 16),
            content_hash: le_u64(bytes, 24),
            base_cluster_hash: le_u64(bytes, OFF_BASE_CLUSTER_HASH),
            node,
            node_hash: content_hash(own),
            cluster,
        })
    }

    /// The result: `base` (which must be the snapshot whose cluster hash the delta names, decoded
    /// from format 4 or a delta) with the changes, checked as a snapshot is (see the module
    /// documentation). Refuses, changing nothing, a delta that does not fit `base`, a result whose
    /// hash is not the header's, or one over `limits` or breaking a content rule.
    pub fn apply(self, base: &Decoded, limits: &Limits) -> Result<Decoded, DeltaError> {
        let Some(mut hashes) = base.cluster_hashes else {
            return Err(DeltaError::BaseWithoutHashes {
                format: base.format.number(),
            });
        };
        let held = hashes.cluster_hash();
        if held != self.base_cluster_hash {
            return Err(DeltaError::OtherBase {
                delta: self.base_cluster_hash,
                held,
            });
        }
        let cluster = self
            .cluster
            .apply_view(base.snapshot.cluster_view(), &mut hashes)?;
        let computed = parts_hash(self.node_hash, hashes.cluster_hash());
        if computed != self.content_hash {
            return Err(DeltaError::HashMismatch {
                header: self.content_hash,
                computed,
            });
        }
        let snapshot = Snapshot::from_parts(self.node, cluster, self.generation);
        within_limits(&snapshot, limits)?;
        snapshot.validate().map_err(DeltaError::Invalid)?;
        Ok(Decoded {
            snapshot,
            content_hash: computed,
            format: Format::V4,
            cluster_hashes: Some(hashes),
        })
    }
}

/// Reads a delta's node part (`own`, the bytes a format 4 snapshot holds from offset 40 to its
/// cluster part) with the snapshot decoder's own readers, at the offsets they have in a snapshot.
fn node_part(own: &[u8], limits: &Limits) -> Result<NodeTables, DecodeError> {
    let mut head = vec![0u8; FIXED_HEADER_LEN];
    head.extend_from_slice(own);
    let cluster_offset = le_u64(&head, FIXED_HEADER_LEN);
    if cluster_offset != head.len() as u64 {
        return Err(DecodeError::ClusterOffset {
            offset: cluster_offset,
            len: head.len() as u64,
        });
    }
    let (node_name, mut r) = node_name(&head, Format::V4)?;
    let config = node_config(&mut r, limits)?;
    let workloads = section(&mut r, limits)?;
    let authz = authz_sections(&mut r, limits)?;
    if r.pos() != head.len() {
        return Err(DecodeError::NodePartEnd {
            end: r.pos() as u64,
            cluster_offset,
        });
    }
    Ok(NodeTables {
        node_name,
        config,
        workloads,
        authz,
    })
}

/// A table's two changes sections: removed, then upserted.
fn table<R: Keyed>(r: &mut Reader<'_>, limits: &Limits) -> Result<TableDelta<R>, DecodeError> {
    Ok(TableDelta {
        removed: section(r, limits)?,
        upserted: section(r, limits)?,
    })
}

/// The string table section: the new table when `flags` replaces it, else empty.
fn strings(
    r: &mut Reader<'_>,
    flags: u32,
    limits: &Limits,
) -> Result<Option<Vec<u8>>, DecodeError> {
    let bytes = section_bytes::<NameBytes>(r, limits)?;
    if bytes.len() as u64 > u64::from(limits.max_name_bytes) {
        return Err(DecodeError::NameBytesOverCapacity {
            bytes: bytes.len() as u64,
            capacity: limits.max_name_bytes,
        });
    }
    if flags & STRINGS_REPLACED != 0 {
        Ok(Some(bytes.to_vec()))
    } else if bytes.is_empty() {
        Ok(None)
    } else {
        Err(DecodeError::DeltaStrings {
            bytes: bytes.len() as u64,
        })
    }
}

/// The result's tables against the node's limits (a delta's own sections are checked as they are
/// read; what they add up to only here).
fn within_limits(s: &Snapshot, limits: &Limits) -> Result<(), DeltaError> {
    let over = |table: Table, count: usize| {
        let capacity = limits.max_of(table).unwrap_or(u32::MAX);
        (count > capacity as usize).then_some(DeltaError::OverCapacity {
            table,
            count: count as u64,
            capacity,
        })
    };
    let counts = [
        (Table::Services, s.services.len()),
        (Table::Routes, s.routes.len()),
        (Table::BackendSets, s.backend_sets.len()),
        (Table::Endpoints, s.endpoints.len()),
        (Table::WorkloadNames, s.names.workloads.len()),
        (Table::ServiceNames, s.names.services.len()),
    ];
    if let Some(e) = counts.into_iter().find_map(|(t, n)| over(t, n)) {
        return Err(e);
    }
    if s.names.strings.len() as u64 > u64::from(limits.max_name_bytes) {
        return Err(DeltaError::NameBytesOverCapacity {
            bytes: s.names.strings.len() as u64,
            capacity: limits.max_name_bytes,
        });
    }
    Ok(())
}

/// The whole delta from `base` to `next` (the node's snapshots of two compiles; `next`'s node is
/// the delta's), as the operator serves it: for tests and tools, which hold whole snapshots.
pub fn delta_between(base: &Snapshot, next: &Snapshot) -> Result<Vec<u8>, EncodeError> {
    let base_cluster = ClusterTables::from(base);
    let (node, next_cluster) = next.clone().into_parts();
    let (base_part, next_part) = (base_cluster.encode()?, next_cluster.encode()?);
    let part = ClusterDeltaPart::encode(
        &ClusterDelta::between(&base_cluster, &next_cluster),
        &base_part.summary(),
        &next_part.summary(),
    )?;
    let mut bytes = delta_head(&node.encode(next.generation, next_part.summary())?, &part)?;
    bytes.extend_from_slice(part.bytes());
    Ok(bytes)
}

/// Sets the generation of `encoded`, the bytes of a delta as [`delta_head`] wrote them (with or
/// without the changes after them). The generation is outside the content hash, as in a snapshot.
pub fn set_delta_generation(encoded: &mut [u8], generation: u64) -> Result<(), DecodeError> {
    if !is_delta(encoded) || encoded.len() < DELTA_HEADER_LEN {
        return Err(DecodeError::DeltaMagic {
            found: encoded.get(..DELTA_MAGIC.len()).unwrap_or(encoded).to_vec(),
        });
    }
    patch(encoded, 16, &generation.to_le_bytes());
    Ok(())
}
