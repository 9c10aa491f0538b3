//! The encoder: writes the canonical bytes of a valid snapshot.

use kmesh_common::LAYOUT_VERSION;
use kmesh_common::names::NameBytes;

use crate::error::{EncodeError, ValidationError};
use crate::format::{
    FIXED_HEADER_LEN, FORMAT_VERSION, MAGIC, OFF_CONTENT_HASH, OFF_TOTAL_LEN, SECTION_HEADER_LEN,
    WireRecord, padding_after, record_size, records_as_bytes,
};
use crate::validate::shown_name;
use crate::{Snapshot, content_hash};

/// See [`Snapshot::encode`].
pub(crate) fn encode(snapshot: &Snapshot) -> Result<Vec<u8>, EncodeError> {
    snapshot.validate()?;
    encode_unchecked(snapshot)
}

/// Writes the bytes of `snapshot` without checking its content rules. Only the encoder (after
/// validation) and tests (to produce well-framed invalid snapshots) call this.
pub(crate) fn encode_unchecked(s: &Snapshot) -> Result<Vec<u8>, EncodeError> {
    let name = s.node_name.as_bytes();
    // Names longer than 253 bytes fail validation; this only guards the unchecked path.
    let name_len = u16::try_from(name.len()).map_err(|_| ValidationError::InvalidNodeName {
        name: shown_name(name),
        reason: "is longer than 253 bytes",
    })?;

    // Exact size up front: one allocation, even for a million endpoints.
    let header_len = FIXED_HEADER_LEN + 2 + name.len();
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

    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&LAYOUT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes()); // flags
    out.extend_from_slice(&s.generation.to_le_bytes());
    out.extend_from_slice(&0u64.to_le_bytes()); // content_hash, filled in below
    out.extend_from_slice(&0u64.to_le_bytes()); // total_len, filled in below
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

/// Bytes a section of `records` takes, header and padding included.
fn section_len<T: WireRecord>(records: &[T]) -> usize {
    let body = SECTION_HEADER_LEN + size_of_val(records);
    body + padding_after(body)
}

/// Bytes the string table's section takes, header and padding included.
fn section_bytes_len(bytes: &[u8]) -> usize {
    let body = SECTION_HEADER_LEN + bytes.len();
    body + padding_after(body)
}

fn write_section<T: WireRecord>(out: &mut Vec<u8>, records: &[T]) -> Result<(), EncodeError> {
    write_section_of::<T>(out, records.len(), records_as_bytes(records))
}

/// The string table's section: its bytes are `NameBytes` chunks (a validated table is a whole
/// number of them; the unchecked path rounds the count up and pads).
fn write_string_section(out: &mut Vec<u8>, strings: &[u8]) -> Result<(), EncodeError> {
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
/// the snapshot, so padding relative to `out.len()` is padding relative to the section.
fn pad(out: &mut Vec<u8>) {
    out.resize(out.len() + padding_after(out.len()), 0);
}

/// Overwrites the header field at `offset` (always within the fixed header just written).
fn patch(out: &mut [u8], offset: usize, value: &[u8; 8]) {
    if let Some(field) = out.get_mut(offset..offset + value.len()) {
        field.copy_from_slice(value);
    }
}
