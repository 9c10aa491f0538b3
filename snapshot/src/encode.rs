//! The encoder: writes the canonical bytes of a valid snapshot, in formats 3 and 4 as its two parts
//! (see [`crate::parts`]) or in format 2.

use kmesh_common::LAYOUT_VERSION;
use kmesh_common::names::NameBytes;

use crate::error::{EncodeError, ValidationError};
use crate::format::{
    FIXED_HEADER_LEN, Format, MAGIC, OFF_CLUSTER_OFFSET, OFF_CONTENT_HASH, OFF_TOTAL_LEN,
    SECTION_HEADER_LEN, WireRecord, padding_after, record_size, records_as_bytes,
};
use crate::hash::{ClusterHashes, parts_hash};
use crate::parts::{ClusterPart, ClusterSummary, ClusterView, NodeView};
use crate::validate::shown_name;
use crate::{Snapshot, content_hash};

/// See [`Snapshot::encode_as`].
pub(crate) fn encode(snapshot: &Snapshot, format: Format) -> Result<Vec<u8>, EncodeError> {
    snapshot.validate()?;
    encode_unchecked(snapshot, format)
}

/// Writes the bytes of `snapshot` in `format` without checking its content rules. Only the
/// encoder (after validation) and tests (to produce well-framed invalid snapshots) call this.
pub(crate) fn encode_unchecked(s: &Snapshot, format: Format) -> Result<Vec<u8>, EncodeError> {
    match format {
        Format::V2 => encode_v2(s),
        Format::V3 | Format::V4 => {
            let cluster = cluster_part(s.cluster_view())?;
            let mut out = node_part(s.node_view(), format, s.generation, cluster.summary())?;
            out.extend_from_slice(cluster.bytes());
            Ok(out)
        }
    }
}

/// The cluster part: its sections, and their hash.
pub(crate) fn cluster_part(c: ClusterView<'_>) -> Result<ClusterPart, EncodeError> {
    let capacity = section_len(c.services)
        + section_len(c.routes)
        + section_len(c.backend_sets)
        + section_len(c.endpoints)
        + section_bytes_len(&c.names.strings)
        + section_len(&c.names.workloads)
        + section_len(&c.names.services);
    let mut out = Vec::with_capacity(capacity);
    write_section(&mut out, c.services)?;
    write_section(&mut out, c.routes)?;
    write_section(&mut out, c.backend_sets)?;
    write_section(&mut out, c.endpoints)?;
    write_string_section(&mut out, &c.names.strings)?;
    write_section(&mut out, &c.names.workloads)?;
    write_section(&mut out, &c.names.services)?;
    Ok(ClusterPart {
        bytes_hash: content_hash(&out),
        hashes: ClusterHashes::of(c),
        bytes: out,
    })
}

/// The node part at `generation` in `format` (3 or 4), with the header of the whole snapshot it
/// starts: its total length and content hash count `cluster`, which follows it.
pub(crate) fn node_part(
    n: NodeView<'_>,
    format: Format,
    generation: u64,
    cluster: ClusterSummary,
) -> Result<Vec<u8>, EncodeError> {
    if !format.has_parts() {
        return Err(EncodeError::NoParts {
            format: format.number(),
        });
    }
    let name = n.node_name.as_bytes();
    let name_len = name_len(name)?;
    let header_len = format.node_name_offset() + 2 + name.len();
    let capacity = header_len
        + padding_after(header_len)
        + section_len(core::slice::from_ref(n.config))
        + section_len(n.workloads)
        + section_len(&n.authz.workloads)
        + section_len(&n.authz.sources)
        + section_len(&n.authz.verdicts)
        + section_len(&n.authz.policies);
    let mut out = Vec::with_capacity(capacity);
    fixed_header(&mut out, format, generation);
    out.extend_from_slice(&0u64.to_le_bytes()); // cluster_offset, filled in below
    out.extend_from_slice(&name_len.to_le_bytes());
    out.extend_from_slice(name);
    pad(&mut out);
    write_section(&mut out, core::slice::from_ref(n.config))?;
    write_section(&mut out, n.workloads)?;
    write_section(&mut out, &n.authz.workloads)?;
    write_section(&mut out, &n.authz.sources)?;
    write_section(&mut out, &n.authz.verdicts)?;
    write_section(&mut out, &n.authz.policies)?;

    let cluster_offset = out.len() as u64;
    let total_len = cluster_offset + cluster.len();
    patch(&mut out, OFF_CLUSTER_OFFSET, &cluster_offset.to_le_bytes());
    let node_hash = content_hash(out.get(FIXED_HEADER_LEN..).unwrap_or_default());
    patch(&mut out, OFF_TOTAL_LEN, &total_len.to_le_bytes());
    patch(
        &mut out,
        OFF_CONTENT_HASH,
        &parts_hash(node_hash, cluster.cluster_hash(format)).to_le_bytes(),
    );
    Ok(out)
}

/// Format 2: the thirteen sections in kind order, one hash over all of them.
fn encode_v2(s: &Snapshot) -> Result<Vec<u8>, EncodeError> {
    let name = s.node_name.as_bytes();
    let name_len = name_len(name)?;

    // Exact size up front: one allocation, even for a million endpoints.
    let header_len = Format::V2.node_name_offset() + 2 + name.len();
    let capacity = header_len
        + padding_after(header_len)
        + section_len(core::slice::from_ref(&s.config))
        + section_len(&s.services)
        + section_len(&s.routes)
        + section_len(&s.backend_sets)
        + section_len(&s.endpoints)
        + section_len(&s.workloads)
        + section_len(&s.authz.workloads)
        + section_len(&s.authz.sources)
        + section_len(&s.authz.verdicts)
        + section_len(&s.authz.policies)
        + section_bytes_len(&s.names.strings)
        + section_len(&s.names.workloads)
        + section_len(&s.names.services);
    let mut out = Vec::with_capacity(capacity);

    fixed_header(&mut out, Format::V2, s.generation);
    out.extend_from_slice(&name_len.to_le_bytes());
    out.extend_from_slice(name);
    pad(&mut out);

    write_section(&mut out, core::slice::from_ref(&s.config))?;
    write_section(&mut out, &s.services)?;
    write_section(&mut out, &s.routes)?;
    write_section(&mut out, &s.backend_sets)?;
    write_section(&mut out, &s.endpoints)?;
    write_section(&mut out, &s.workloads)?;
    write_section(&mut out, &s.authz.workloads)?;
    write_section(&mut out, &s.authz.sources)?;
    write_section(&mut out, &s.authz.verdicts)?;
    write_section(&mut out, &s.authz.policies)?;
    write_string_section(&mut out, &s.names.strings)?;
    write_section(&mut out, &s.names.workloads)?;
    write_section(&mut out, &s.names.services)?;

    let total_len = out.len() as u64;
    let hash = content_hash(out.get(FIXED_HEADER_LEN..).unwrap_or_default());
    patch(&mut out, OFF_TOTAL_LEN, &total_len.to_le_bytes());
    patch(&mut out, OFF_CONTENT_HASH, &hash.to_le_bytes());
    Ok(out)
}

/// The fixed header with the content hash and total length zero (patched once known).
fn fixed_header(out: &mut Vec<u8>, format: Format, generation: u64) {
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&format.number().to_le_bytes());
    out.extend_from_slice(&LAYOUT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes()); // flags
    out.extend_from_slice(&generation.to_le_bytes());
    out.extend_from_slice(&0u64.to_le_bytes()); // content_hash
    out.extend_from_slice(&0u64.to_le_bytes()); // total_len
}

/// The node name's length field. Names longer than 253 bytes fail validation; this only guards
/// the unchecked path.
fn name_len(name: &[u8]) -> Result<u16, EncodeError> {
    u16::try_from(name.len()).map_err(|_| {
        EncodeError::Invalid(ValidationError::InvalidNodeName {
            name: shown_name(name),
            reason: "is longer than 253 bytes",
        })
    })
}

/// Bytes a section of `records` takes, header and padding included.
pub(crate) fn section_len<T: WireRecord>(records: &[T]) -> usize {
    let body = SECTION_HEADER_LEN + size_of_val(records);
    body + padding_after(body)
}

/// Bytes the string table's section takes, header and padding included.
pub(crate) fn section_bytes_len(bytes: &[u8]) -> usize {
    let body = SECTION_HEADER_LEN + bytes.len();
    body + padding_after(body)
}

pub(crate) fn write_section<T: WireRecord>(
    out: &mut Vec<u8>,
    records: &[T],
) -> Result<(), EncodeError> {
    write_section_of::<T>(out, records.len(), records_as_bytes(records))
}

/// The string table's section: its bytes are `NameBytes` chunks (a validated table is a whole
/// number of them; the unchecked path rounds the count up and pads).
pub(crate) fn write_string_section(out: &mut Vec<u8>, strings: &[u8]) -> Result<(), EncodeError> {
    let chunks = strings.len().div_ceil(size_of::<NameBytes>());
    write_section_of::<NameBytes>(out, chunks, strings)
}

fn write_section_of<T: WireRecord>(
    out: &mut Vec<u8>,
    count: usize,
    bytes: &[u8],
) -> Result<(), EncodeError> {
    let count = u32::try_from(count).map_err(|_| EncodeError::TooManyRecords {
        table: T::TABLE,
        count,
    })?;
    out.extend_from_slice(&T::KIND.to_le_bytes());
    out.extend_from_slice(&record_size::<T>().to_le_bytes());
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes()); // reserved
    out.extend_from_slice(bytes);
    pad(out);
    Ok(())
}

/// Appends zeros up to the next multiple of 8. Sections start at multiples of 8 from the start of
/// the snapshot (and of the cluster part, which starts at one), so padding relative to
/// `out.len()` is padding relative to the section.
fn pad(out: &mut Vec<u8>) {
    out.resize(out.len() + padding_after(out.len()), 0);
}

/// Overwrites the header field at `offset` (always within the fixed header just written).
pub(crate) fn patch(out: &mut [u8], offset: usize, value: &[u8; 8]) {
    if let Some(field) = out.get_mut(offset..offset + value.len()) {
        field.copy_from_slice(value);
    }
}
