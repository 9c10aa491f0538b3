//! The content rules of the names sections (11 NameStrings, 12 WorkloadNames, 13 ServiceNames;
//! see [`crate::format`] and `kmesh_common::names`). Run by the decoder on every input and by the
//! encoder on every snapshot it writes, after the other tables (a service name refers to the
//! services table).
//!
//! The string table is walked once (linear), collecting the offset of every entry; a record's
//! reference is a bit lookup in a bitmap of those offsets (one bit per byte of the table: the
//! references of 100,000 workloads were 11% of an operator's per-change CPU as binary searches).
//! Uniqueness of the strings is a sort of a copy of the offsets by content (compared as bytes: the
//! walk checked UTF-8 once). With the bitmap that is one `u32` and one bit per entry of at least 3
//! bytes, so the decoder's promise of allocating about the size of its input holds (a hash set of
//! slices would cost ten times more).

use kmesh_common::names::{MAX_NAME_LEN, NAME_LEN_BYTES, NO_NAME};

use crate::error::{Table, ValidationError, ip_to_addr};
use crate::parts::ClusterView;
use crate::validate::check_order;

/// The table is a whole number of these (the section's record size).
const CHUNK: usize = 8;

impl ClusterView<'_> {
    pub(crate) fn validate_names(&self) -> Result<(), ValidationError> {
        let offsets = string_offsets(&self.names.strings)?;
        let entries = EntryStarts::new(self.names.strings.len(), &offsets);
        drop(offsets);
        self.validate_workload_names(&entries)?;
        self.validate_service_names(&entries)
    }

    fn validate_workload_names(&self, entries: &EntryStarts) -> Result<(), ValidationError> {
        const T: Table = Table::WorkloadNames;
        let describe = |ip: &kmesh_common::Ip16| ip_to_addr(ip).to_string();
        let records = &self.names.workloads;
        for (index, w) in records.iter().enumerate() {
            if let Some(p) = index.checked_sub(1).and_then(|i| records.get(i)) {
                check_order(T, index, &p.ip, &w.ip, describe)?;
            }
            let fields = [
                ("workload", w.workload),
                ("namespace", w.namespace),
                ("service_account", w.service_account),
                ("app", w.app),
                ("version", w.version),
            ];
            check_references(T, index, || describe(&w.ip), &fields, entries)?;
        }
        Ok(())
    }

    fn validate_service_names(&self, entries: &EntryStarts) -> Result<(), ValidationError> {
        const T: Table = Table::ServiceNames;
        let describe = |id: &u32| format!("service_id {id}");
        let mut service_ids: Vec<u32> = self.services.iter().map(|s| s.value.service_id).collect();
        service_ids.sort_unstable();
        service_ids.dedup();
        let records = &self.names.services;
        for (index, s) in records.iter().enumerate() {
            if let Some(p) = index.checked_sub(1).and_then(|i| records.get(i)) {
                check_order(T, index, &p.service_id, &s.service_id, describe)?;
            }
            if service_ids.binary_search(&s.service_id).is_err() {
                return Err(ValidationError::ServiceNameWithoutService {
                    index,
                    service_id: s.service_id,
                });
            }
            if s.host == NO_NAME {
                return Err(ValidationError::NameMissing {
                    table: T,
                    index,
                    record: describe(&s.service_id),
                    field: "host",
                });
            }
            let fields = [
                ("host", s.host),
                ("name", s.name),
                ("namespace", s.namespace),
            ];
            check_references(T, index, || describe(&s.service_id), &fields, entries)?;
        }
        Ok(())
    }
}

/// The offsets at which the string table's entries start, as one bit per byte of the table.
struct EntryStarts {
    bits: Vec<u64>,
}

impl EntryStarts {
    /// `offsets` are entries of a table of `len` bytes (from [`string_offsets`]).
    fn new(len: usize, offsets: &[u32]) -> Self {
        let mut bits = vec![0u64; len.div_ceil(64)];
        for &offset in offsets {
            // In range: `string_offsets` returns offsets inside the table only.
            if let Some(word) = bits.get_mut(offset as usize / 64) {
                *word |= 1 << (offset % 64);
            }
        }
        EntryStarts { bits }
    }

    /// Whether an entry starts at `offset` (false past the table's end).
    fn contains(&self, offset: u32) -> bool {
        self.bits
            .get(offset as usize / 64)
            .is_some_and(|word| word & (1 << (offset % 64)) != 0)
    }
}

/// Every `(field, offset)` is [`NO_NAME`] or the offset of an entry of the table.
fn check_references(
    table: Table,
    index: usize,
    describe: impl Fn() -> String,
    fields: &[(&'static str, u32)],
    entries: &EntryStarts,
) -> Result<(), ValidationError> {
    for &(field, offset) in fields {
        if offset != NO_NAME && !entries.contains(offset) {
            return Err(ValidationError::NameOffset {
                table,
                index,
                record: describe(),
                field,
                offset,
            });
        }
    }
    Ok(())
}

/// Walks the string table: the offsets of its entries, in increasing order, once every entry is
/// checked (length 1..=MAX_NAME_LEN within the table, UTF-8, unique) and the tail after the last
/// one is fewer than 8 zero bytes.
pub(crate) fn string_offsets(strings: &[u8]) -> Result<Vec<u32>, ValidationError> {
    if !strings.len().is_multiple_of(CHUNK) || u32::try_from(strings.len()).is_err() {
        return Err(ValidationError::NameTableLength { len: strings.len() });
    }
    let mut offsets = Vec::new();
    let mut pos = 0usize;
    while let Some(rest) = strings.get(pos..) {
        if rest.len() < CHUNK && rest.iter().all(|&b| b == 0) {
            break;
        }
        // The table length fits u32 (checked above), so every position in it does.
        let offset = pos as u32;
        let string = entry(rest, offset)?;
        offsets.push(offset);
        pos += NAME_LEN_BYTES + string.len();
    }
    check_unique(strings, &offsets)?;
    Ok(offsets)
}

/// No string of the table is stored twice. Of several repeats, the one reported is the smallest
/// string's, at its second offset (deterministic).
fn check_unique(strings: &[u8], offsets: &[u32]) -> Result<(), ValidationError> {
    // Offsets come from the walk, so each starts a checked entry (UTF-8 already: compared as
    // bytes, which orders as the strings do, without checking UTF-8 in every comparison); a miss
    // reads as "".
    let text = |offset: u32| bytes_at(strings, offset).unwrap_or_default();
    let mut by_content = offsets.to_vec();
    by_content.sort_unstable_by(|&a, &b| text(a).cmp(text(b)).then(a.cmp(&b)));
    for pair in by_content.windows(2) {
        if let [first, offset] = *pair
            && text(first) == text(offset)
        {
            return Err(ValidationError::NameDuplicate { offset, first });
        }
    }
    Ok(())
}

/// The string of the entry at the start of `rest` (at `offset` in the table), checked.
fn entry(rest: &[u8], offset: u32) -> Result<&[u8], ValidationError> {
    let Some((len, body)) = rest.split_first_chunk::<NAME_LEN_BYTES>() else {
        return Err(ValidationError::NameOverrun {
            offset,
            len: 0,
            remaining: rest.len(),
        });
    };
    let len = usize::from(u16::from_le_bytes(*len));
    if len == 0 || len > MAX_NAME_LEN {
        return Err(ValidationError::NameLength { offset, len });
    }
    let Some(string) = body.get(..len) else {
        return Err(ValidationError::NameOverrun {
            offset,
            len,
            remaining: body.len(),
        });
    };
    if core::str::from_utf8(string).is_err() {
        return Err(ValidationError::NameNotUtf8 { offset });
    }
    Ok(string)
}

/// The string at `offset` of a validated table; `None` for [`NO_NAME`] or an offset that is not an
/// entry's start in a table that was not validated (never a panic).
pub(crate) fn string_at(strings: &[u8], offset: u32) -> Option<&str> {
    core::str::from_utf8(bytes_at(strings, offset)?).ok()
}

/// The bytes of the string at `offset`, as [`string_at`] but without the UTF-8 check.
fn bytes_at(strings: &[u8], offset: u32) -> Option<&[u8]> {
    if offset == NO_NAME {
        return None;
    }
    let rest = strings.get(usize::try_from(offset).ok()?..)?;
    let (len, body) = rest.split_first_chunk::<NAME_LEN_BYTES>()?;
    body.get(..usize::from(u16::from_le_bytes(*len)))
}
