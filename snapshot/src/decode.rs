//! The verifying decoder. Nothing in the input is trusted: every length is checked against the bytes
//! actually present before it is used, all offset arithmetic is checked, and no allocation is larger
//! than the input itself.

use kmesh_common::names::{NameBytes, ServiceNameRecord, WorkloadNameRecord};
use kmesh_common::{
    BackendSetRecord, EndpointRecord, LAYOUT_VERSION, NodeConfig, RouteRecord, ServiceRecord,
};

use crate::error::DecodeError;
use crate::format::{
    ALIGN, FIXED_HEADER_LEN, Format, MAGIC, OFF_CLUSTER_OFFSET, OFF_CONTENT_HASH, OFF_FLAGS,
    OFF_FORMAT_VERSION, OFF_GENERATION, OFF_LAYOUT_VERSION, OFF_TOTAL_LEN, SECTION_HEADER_LEN,
    WireRecord, padding_after, read_records, record_size,
};
use crate::hash::{ClusterHashes, TableHash, parts_hash};
use crate::validate::validate_node_name;
use crate::{AuthzTables, Decoded, Header, Limits, NameTables, Snapshot, content_hash};

/// A cursor over the input that never reads out of bounds.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8], pos: usize) -> Reader<'a> {
        Reader { bytes, pos }
    }

    pub(crate) fn pos(&self) -> usize {
        self.pos
    }

    pub(crate) fn remaining(&self) -> usize {
        self.bytes.len().saturating_sub(self.pos)
    }

    /// Takes the next `len` bytes; `what` names them for the error.
    fn take(&mut self, len: usize, what: impl FnOnce() -> String) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(len);
        let taken = end.and_then(|end| Some((end, self.bytes.get(self.pos..end)?)));
        match taken {
            Some((end, slice)) => {
                self.pos = end;
                Ok(slice)
            }
            None => Err(DecodeError::Overrun {
                what: what(),
                offset: self.pos as u64,
                needed: len as u64,
                remaining: self.remaining() as u64,
            }),
        }
    }

    /// Skips the zero padding that brings the position to a multiple of 8.
    fn padding(&mut self, what: impl Fn() -> String) -> Result<(), DecodeError> {
        let offset = self.pos;
        let pad = self.take(padding_after(offset), || {
            format!("padding after {}", what())
        })?;
        if pad.iter().any(|&b| b != 0) {
            return Err(DecodeError::NonZeroPadding {
                what: what(),
                offset: offset as u64,
            });
        }
        Ok(())
    }
}

/// The prefix of `bytes` (as much as exists, up to the magic's length) when it is not `magic`'s:
/// checked before any length, so that a file of another kind is named as such.
pub(crate) fn wrong_magic(bytes: &[u8], magic: &[u8]) -> Option<Vec<u8>> {
    let prefix = bytes.get(..magic.len()).unwrap_or(bytes);
    (prefix != &magic[..prefix.len()]).then(|| prefix.to_vec())
}

pub(crate) fn le_u16(bytes: &[u8], offset: usize) -> u16 {
    u16::from_le_bytes(field(bytes, offset))
}

pub(crate) fn le_u32(bytes: &[u8], offset: usize) -> u32 {
    u32::from_le_bytes(field(bytes, offset))
}

pub(crate) fn le_u64(bytes: &[u8], offset: usize) -> u64 {
    u64::from_le_bytes(field(bytes, offset))
}

/// N bytes at `offset` of a slice the caller has already length-checked; zeros if out of range (not
/// reachable, but a wrong value is caught by the checks that follow, a panic would not be).
fn field<const N: usize>(bytes: &[u8], offset: usize) -> [u8; N] {
    bytes
        .get(offset..)
        .and_then(|rest| rest.first_chunk::<N>())
        .copied()
        .unwrap_or([0; N])
}

/// The fixed header, checked as far as it can be without hashing: magic, length, format version and
/// flags. The layout version, total length and hash are returned unchecked.
fn fixed_header(bytes: &[u8]) -> Result<(Format, Header), DecodeError> {
    // Magic first, on whatever prefix exists, so that a file of another kind is named as such.
    if let Some(found) = wrong_magic(bytes, &MAGIC) {
        return Err(DecodeError::BadMagic { found });
    }
    if bytes.len() < FIXED_HEADER_LEN {
        return Err(DecodeError::TooShort {
            len: bytes.len() as u64,
            min: FIXED_HEADER_LEN as u64,
        });
    }
    let format_version = le_u16(bytes, OFF_FORMAT_VERSION);
    let Some(format) = Format::from_number(format_version) else {
        return Err(DecodeError::UnsupportedFormatVersion {
            found: format_version,
        });
    };
    let flags = le_u32(bytes, OFF_FLAGS);
    if flags != 0 {
        return Err(DecodeError::HeaderFlags { flags });
    }
    Ok((
        format,
        Header {
            format_version,
            layout_version: le_u16(bytes, OFF_LAYOUT_VERSION),
            generation: le_u64(bytes, OFF_GENERATION),
            content_hash: le_u64(bytes, OFF_CONTENT_HASH),
            total_len: le_u64(bytes, OFF_TOTAL_LEN),
            node_name: String::new(),
        },
    ))
}

/// The `cluster_offset` of formats 3 and 4, checked against the input: it must leave room for the
/// node name's length, be a multiple of 8 and lie within the input.
fn cluster_offset(bytes: &[u8]) -> Result<usize, DecodeError> {
    let min = Format::V4.node_name_offset();
    if bytes.len() < min {
        return Err(DecodeError::TooShort {
            len: bytes.len() as u64,
            min: min as u64,
        });
    }
    let offset = le_u64(bytes, OFF_CLUSTER_OFFSET);
    match usize::try_from(offset) {
        Ok(o) if o >= min && o % ALIGN == 0 && o <= bytes.len() => Ok(o),
        _ => Err(DecodeError::ClusterOffset {
            offset,
            len: bytes.len() as u64,
        }),
    }
}

/// See [`crate::computed_content_hash`].
pub(crate) fn computed_content_hash(bytes: &[u8]) -> Result<u64, DecodeError> {
    let (format, _) = fixed_header(bytes)?;
    Ok(hash_of(bytes, format)?.hash)
}

/// What hashing a snapshot finds.
struct Hashed {
    /// The content hash as the snapshot's format defines it.
    hash: u64,
    /// Where the cluster part starts (the end of the input in format 2).
    cluster_offset: usize,
    /// Format 4's section hashes of the cluster part.
    cluster_hashes: Option<ClusterHashes>,
}

/// The content hash of `bytes` as `format` defines it. Format 4's cluster hash is made of the
/// hashes of its sections' records, so the cluster sections' framing is read here (without
/// limits: the bytes bound every count), and an error in it is reported as the section's.
fn hash_of(bytes: &[u8], format: Format) -> Result<Hashed, DecodeError> {
    let after_fixed = |end: usize| bytes.get(FIXED_HEADER_LEN..end).unwrap_or_default();
    match format {
        Format::V2 => Ok(Hashed {
            hash: content_hash(after_fixed(bytes.len())),
            cluster_offset: bytes.len(),
            cluster_hashes: None,
        }),
        Format::V3 => {
            let offset = cluster_offset(bytes)?;
            let node = content_hash(after_fixed(offset));
            let cluster = content_hash(bytes.get(offset..).unwrap_or_default());
            Ok(Hashed {
                hash: parts_hash(node, cluster),
                cluster_offset: offset,
                cluster_hashes: None,
            })
        }
        Format::V4 => {
            let offset = cluster_offset(bytes)?;
            let node = content_hash(after_fixed(offset));
            let mut r = Reader { bytes, pos: offset };
            let hashes = cluster_section_hashes(&mut r)?;
            Ok(Hashed {
                hash: parts_hash(node, hashes.cluster_hash()),
                cluster_offset: offset,
                cluster_hashes: Some(hashes),
            })
        }
    }
}

/// Reads the framing of the seven cluster sections from `r` and hashes them as format 4 does.
pub(crate) fn cluster_section_hashes(r: &mut Reader<'_>) -> Result<ClusterHashes, DecodeError> {
    fn table<T: WireRecord>(r: &mut Reader<'_>) -> Result<TableHash, DecodeError> {
        let bytes = section_bytes::<T>(r, &Limits::UNLIMITED)?;
        Ok(TableHash::of_record_bytes(T::KIND, size_of::<T>(), bytes))
    }
    Ok(ClusterHashes {
        services: table::<ServiceRecord>(r)?,
        routes: table::<RouteRecord>(r)?,
        backend_sets: table::<BackendSetRecord>(r)?,
        endpoints: table::<EndpointRecord>(r)?,
        name_strings: TableHash::of_strings(section_bytes::<NameBytes>(r, &Limits::UNLIMITED)?),
        workload_names: table::<WorkloadNameRecord>(r)?,
        service_names: table::<ServiceNameRecord>(r)?,
    })
}

/// Reads and checks the node name and its padding; returns it and the reader positioned at the
/// first section.
pub(crate) fn node_name(bytes: &[u8], format: Format) -> Result<(String, Reader<'_>), DecodeError> {
    let mut r = Reader {
        bytes,
        pos: format.node_name_offset(),
    };
    let len = le_u16(r.take(2, || String::from("node name length"))?, 0);
    let name = r.take(usize::from(len), || String::from("node name"))?;
    validate_node_name(name)?;
    // validate_node_name admits ASCII only, so the conversion is lossless.
    let name = String::from_utf8_lossy(name).into_owned();
    r.padding(|| String::from("node name"))?;
    Ok((name, r))
}

/// See [`crate::peek_header`].
pub(crate) fn peek_header(bytes: &[u8]) -> Result<Header, DecodeError> {
    let (format, mut header) = fixed_header(bytes)?;
    header.node_name = node_name(bytes, format)?.0;
    Ok(header)
}

/// See [`Snapshot::decode`].
pub(crate) fn decode(bytes: &[u8], limits: &Limits) -> Result<Decoded, DecodeError> {
    let len = bytes.len() as u64;
    // The size limit comes before any other work, hashing included.
    if len > limits.max_bytes {
        return Err(DecodeError::TooLarge {
            len,
            max: limits.max_bytes,
        });
    }
    let (format, header) = fixed_header(bytes)?;
    if header.layout_version != LAYOUT_VERSION {
        return Err(DecodeError::LayoutVersionMismatch {
            found: header.layout_version,
            expected: LAYOUT_VERSION,
        });
    }
    if header.total_len > len {
        return Err(DecodeError::Truncated {
            expected: header.total_len,
            got: len,
        });
    }
    if header.total_len < len {
        return Err(DecodeError::TrailingBytes {
            expected: header.total_len,
            got: len,
        });
    }
    let hashed = hash_of(bytes, format)?;
    if header.content_hash != hashed.hash {
        return Err(DecodeError::HashMismatch {
            header: header.content_hash,
            computed: hashed.hash,
        });
    }

    let (node_name, mut r) = node_name(bytes, format)?;
    let snapshot = match format {
        Format::V2 => sections_v2(&mut r, node_name, header.generation, limits)?,
        Format::V3 | Format::V4 => sections_v3(
            &mut r,
            hashed.cluster_offset,
            node_name,
            header.generation,
            limits,
        )?,
    };
    if r.remaining() != 0 {
        return Err(DecodeError::TrailingData {
            offset: r.pos as u64,
            len: r.remaining() as u64,
        });
    }
    snapshot.validate()?;
    Ok(Decoded {
        snapshot,
        content_hash: hashed.hash,
        format,
        cluster_hashes: hashed.cluster_hashes,
    })
}

/// The NodeConfig section, which holds exactly one record.
pub(crate) fn node_config(r: &mut Reader<'_>, limits: &Limits) -> Result<NodeConfig, DecodeError> {
    let config = section::<NodeConfig>(r, limits)?;
    match config.as_slice() {
        [only] => Ok(*only),
        _ => Err(DecodeError::NodeConfigCount {
            count: u32::try_from(config.len()).unwrap_or(u32::MAX),
        }),
    }
}

pub(crate) fn authz_sections(
    r: &mut Reader<'_>,
    limits: &Limits,
) -> Result<AuthzTables, DecodeError> {
    Ok(AuthzTables {
        workloads: section(r, limits)?,
        sources: section(r, limits)?,
        verdicts: section(r, limits)?,
        policies: section(r, limits)?,
    })
}

fn names_sections(r: &mut Reader<'_>, limits: &Limits) -> Result<NameTables, DecodeError> {
    Ok(NameTables {
        strings: string_section(r, limits)?,
        workloads: section(r, limits)?,
        services: section(r, limits)?,
    })
}

/// Format 2's sections: all thirteen in kind order.
fn sections_v2(
    r: &mut Reader<'_>,
    node_name: String,
    generation: u64,
    limits: &Limits,
) -> Result<Snapshot, DecodeError> {
    Ok(Snapshot {
        node_name,
        generation,
        config: node_config(r, limits)?,
        services: section(r, limits)?,
        routes: section(r, limits)?,
        backend_sets: section(r, limits)?,
        endpoints: section(r, limits)?,
        workloads: section(r, limits)?,
        authz: authz_sections(r, limits)?,
        names: names_sections(r, limits)?,
    })
}

/// The sections of formats 3 and 4: the node part's, which must end exactly at `cluster_offset`,
/// then the cluster part's.
fn sections_v3(
    r: &mut Reader<'_>,
    cluster_offset: usize,
    node_name: String,
    generation: u64,
    limits: &Limits,
) -> Result<Snapshot, DecodeError> {
    let config = node_config(r, limits)?;
    let workloads = section(r, limits)?;
    let authz = authz_sections(r, limits)?;
    if r.pos != cluster_offset {
        return Err(DecodeError::NodePartEnd {
            end: r.pos as u64,
            cluster_offset: cluster_offset as u64,
        });
    }
    Ok(Snapshot {
        node_name,
        generation,
        config,
        services: section(r, limits)?,
        routes: section(r, limits)?,
        backend_sets: section(r, limits)?,
        endpoints: section(r, limits)?,
        workloads,
        authz,
        names: names_sections(r, limits)?,
    })
}

/// Reads one section of `T` records: its header, `count` records and padding. The node's limit for
/// the table is checked before the records are read.
pub(crate) fn section<T: WireRecord>(
    r: &mut Reader<'_>,
    limits: &Limits,
) -> Result<Vec<T>, DecodeError> {
    Ok(read_records::<T>(section_bytes::<T>(r, limits)?))
}

/// Reads the names' string table: its section's bytes, checked against `max_name_bytes` before
/// they are copied.
pub(crate) fn string_section(r: &mut Reader<'_>, limits: &Limits) -> Result<Vec<u8>, DecodeError> {
    let bytes = section_bytes::<NameBytes>(r, limits)?;
    if bytes.len() as u64 > u64::from(limits.max_name_bytes) {
        return Err(DecodeError::NameBytesOverCapacity {
            bytes: bytes.len() as u64,
            capacity: limits.max_name_bytes,
        });
    }
    Ok(bytes.to_vec())
}

/// Reads one section's header, records and padding; returns the records' bytes.
pub(crate) fn section_bytes<'a, T: WireRecord>(
    r: &mut Reader<'a>,
    limits: &Limits,
) -> Result<&'a [u8], DecodeError> {
    let table = T::TABLE;
    let capacity = limits.max_of(table);
    let offset = r.pos;
    let header = r.take(SECTION_HEADER_LEN, || format!("{table} section header"))?;
    let kind = le_u32(header, 0);
    let size = le_u32(header, 4);
    let count = le_u32(header, 8);
    let reserved = le_u32(header, 12);
    if kind != T::KIND {
        return Err(DecodeError::SectionKind {
            offset: offset as u64,
            found: kind,
            expected: T::KIND,
            table,
        });
    }
    if size != record_size::<T>() {
        return Err(DecodeError::RecordSize {
            table,
            found: size,
            expected: record_size::<T>(),
        });
    }
    if reserved != 0 {
        return Err(DecodeError::SectionReserved {
            table,
            value: reserved,
        });
    }
    if let Some(capacity) = capacity
        && count > capacity
    {
        return Err(DecodeError::OverCapacity {
            table,
            count,
            capacity,
        });
    }
    // u32 * u32 always fits u64; the comparison with the bytes present comes before any allocation,
    // so a huge count cannot make us allocate more than the input holds.
    let needed = u64::from(count) * u64::from(size);
    let remaining = r.remaining() as u64;
    let records_offset = r.pos as u64;
    let overrun = || DecodeError::SectionOverrun {
        table,
        count,
        record_size: size,
        offset: records_offset,
        needed,
        remaining,
    };
    if needed > remaining {
        return Err(overrun());
    }
    let needed = usize::try_from(needed).map_err(|_| overrun())?;
    let bytes = r.take(needed, || format!("{table} records"))?;
    r.padding(|| format!("{table} section"))?;
    Ok(bytes)
}
