//! The content hash of a snapshot, and format 4's hash of the cluster part, which can be updated
//! record by record (see [`crate::format`]).

use crate::error::Table;
use crate::format::{WireRecord, records_as_bytes};
use crate::parts::ClusterView;

const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a 64 of `section_bytes`: start from the offset basis `0xcbf29ce484222325`; for each byte,
/// xor it into the state, then multiply by the prime `0x100000001b3` (wrapping).
///
/// A format 2 snapshot's `content_hash` is this function over every byte from offset
/// [`crate::FIXED_HEADER_LEN`] (40) to the end: the node name and all sections; a format 3
/// snapshot's is this function over the hashes of its two parts (see [`crate::format`]). It detects
/// corruption and lets the agent tell snapshots apart cheaply; it is not a cryptographic digest and
/// does not authenticate the producer.
pub fn content_hash(section_bytes: &[u8]) -> u64 {
    section_bytes.iter().fold(FNV_OFFSET_BASIS, |state, &byte| {
        (state ^ u64::from(byte)).wrapping_mul(FNV_PRIME)
    })
}

/// A format 3 content hash: FNV-1a 64 of `le(node_hash) ++ le(cluster_hash)`, the hashes of the
/// node part (from offset 40) and of the cluster part (see [`crate::format`]).
pub fn parts_hash(node_hash: u64, cluster_hash: u64) -> u64 {
    let mut both = [0u8; 16];
    both[..8].copy_from_slice(&node_hash.to_le_bytes());
    both[8..].copy_from_slice(&cluster_hash.to_le_bytes());
    content_hash(&both)
}

/// murmur3's 64-bit finalizer: every input bit affects every output bit, so records that differ
/// in a few bits have unrelated hashes, and a sum of them stays a good hash of the set.
const fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// FNV-1a 64 continued from `state` over `bytes`.
fn fnv1a_from(state: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(state, |state, &byte| {
        (state ^ u64::from(byte)).wrapping_mul(FNV_PRIME)
    })
}

/// Format 4's hash of one record of section kind `kind` given as its wire bytes:
/// `fmix64(FNV-1a 64 of le(kind) ++ bytes)`.
fn record_bytes_hash(kind: u32, bytes: &[u8]) -> u64 {
    fmix64(fnv1a_from(
        fnv1a_from(FNV_OFFSET_BASIS, &kind.to_le_bytes()),
        bytes,
    ))
}

/// Format 4's hash of a record (see [`record_bytes_hash`]).
pub fn record_hash<R: WireRecord>(record: &R) -> u64 {
    record_bytes_hash(R::KIND, records_as_bytes(core::slice::from_ref(record)))
}

/// The hash of one section of a format 4 cluster part: its record count and, for a table of
/// records, the wrapping sum of the records' [`record_hash`]es, so that a record added, removed or
/// changed changes it by that record's hashes alone; for the names' string table, its number of
/// 8-byte chunks and the FNV-1a 64 of its bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TableHash {
    pub count: u64,
    pub hash: u64,
}

impl TableHash {
    /// The hash of a table holding `records`.
    pub fn of<R: WireRecord>(records: &[R]) -> TableHash {
        TableHash::of_record_bytes(R::KIND, size_of::<R>(), records_as_bytes(records))
    }

    /// The hash of a table of `kind` whose records, of `size` bytes each, are `bytes` on the wire
    /// (a trailing part shorter than a record is ignored: callers pass whole records).
    pub(crate) fn of_record_bytes(kind: u32, size: usize, bytes: &[u8]) -> TableHash {
        let mut table = TableHash::default();
        for record in bytes.chunks_exact(size.max(1)) {
            table.count += 1;
            table.hash = table.hash.wrapping_add(record_bytes_hash(kind, record));
        }
        table
    }

    /// The hash of the names' string table `strings` (a whole number of 8-byte chunks).
    pub fn of_strings(strings: &[u8]) -> TableHash {
        TableHash {
            count: strings.len().div_ceil(8) as u64,
            hash: content_hash(strings),
        }
    }

    /// Counts `record` in.
    pub fn add<R: WireRecord>(&mut self, record: &R) {
        self.count = self.count.wrapping_add(1);
        self.hash = self.hash.wrapping_add(record_hash(record));
    }

    /// Counts `record` out (it must have been counted in).
    pub fn remove<R: WireRecord>(&mut self, record: &R) {
        self.count = self.count.wrapping_sub(1);
        self.hash = self.hash.wrapping_sub(record_hash(record));
    }
}

/// The hashes of the seven sections of a format 4 cluster part, in their order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ClusterHashes {
    pub services: TableHash,
    pub routes: TableHash,
    pub backend_sets: TableHash,
    pub endpoints: TableHash,
    pub name_strings: TableHash,
    pub workload_names: TableHash,
    pub service_names: TableHash,
}

impl ClusterHashes {
    pub(crate) fn of(c: ClusterView<'_>) -> ClusterHashes {
        ClusterHashes {
            services: TableHash::of(c.services),
            routes: TableHash::of(c.routes),
            backend_sets: TableHash::of(c.backend_sets),
            endpoints: TableHash::of(c.endpoints),
            name_strings: TableHash::of_strings(&c.names.strings),
            workload_names: TableHash::of(&c.names.workloads),
            service_names: TableHash::of(&c.names.services),
        }
    }

    /// The sections with their tables, in wire order.
    fn sections(&self) -> [(Table, TableHash); 7] {
        [
            (Table::Services, self.services),
            (Table::Routes, self.routes),
            (Table::BackendSets, self.backend_sets),
            (Table::Endpoints, self.endpoints),
            (Table::NameStrings, self.name_strings),
            (Table::WorkloadNames, self.workload_names),
            (Table::ServiceNames, self.service_names),
        ]
    }

    /// Format 4's cluster hash: FNV-1a 64 of `le(kind) ++ le(count) ++ le(hash)` (4 + 8 + 8 bytes)
    /// for each section in wire order.
    pub fn cluster_hash(&self) -> u64 {
        self.sections()
            .iter()
            .fold(FNV_OFFSET_BASIS, |state, (table, section)| {
                let state = fnv1a_from(state, &table.kind().to_le_bytes());
                let state = fnv1a_from(state, &section.count.to_le_bytes());
                fnv1a_from(state, &section.hash.to_le_bytes())
            })
    }
}

#[cfg(test)]
mod tests {
    use super::content_hash;

    /// Reference values of FNV-1a 64 (from the FNV test suite).
    #[test]
    fn known_values() {
        assert_eq!(content_hash(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(content_hash(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(content_hash(b"foobar"), 0x8594_4171_f739_67e8);
    }
}
