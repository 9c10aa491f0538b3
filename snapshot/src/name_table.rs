//! Writing the names sections: [`StringTable`] interns strings into the string table's format
//! (`kmesh_common::names`), each once, and hands back their offsets for the records (used by the
//! [`builder`](crate::builder)); [`StringSet`] gathers the strings first and writes them in an
//! order of their own (used by the operator's compiler).

use std::collections::HashMap;

use kmesh_common::names::{MAX_NAME_LEN, NAME_LEN_BYTES, NO_NAME};

/// A string table being written. The same strings interned in the same order give the same bytes.
#[derive(Clone, Debug, Default)]
pub struct StringTable {
    bytes: Vec<u8>,
    /// Only looked up, never iterated: the hash order cannot reach the bytes.
    offsets: HashMap<String, u32, foldhash::fast::RandomState>,
}

impl StringTable {
    /// The offset of `string` in the table, added if new. An empty string is no name
    /// ([`NO_NAME`]), and so is one the format cannot hold: longer than [`MAX_NAME_LEN`] bytes
    /// (no Kubernetes name or label value is), or past 4 GiB of table.
    pub fn intern(&mut self, string: &str) -> u32 {
        if !Self::can_hold(string) {
            return NO_NAME;
        }
        if let Some(&offset) = self.offsets.get(string) {
            return offset;
        }
        let offset = write_entry(&mut self.bytes, string);
        if offset != NO_NAME {
            self.offsets.insert(string.to_owned(), offset);
        }
        offset
    }

    /// Whether a string can have an entry: a name of 1 to [`MAX_NAME_LEN`] bytes.
    pub fn can_hold(string: &str) -> bool {
        !string.is_empty() && string.len() <= MAX_NAME_LEN
    }

    /// Bytes written so far, before the final padding.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The table, zero-padded to a whole number of 8-byte chunks.
    pub fn finish(self) -> Vec<u8> {
        let mut bytes = self.bytes;
        bytes.resize(bytes.len().next_multiple_of(8), 0);
        bytes
    }
}

/// Appends `string`'s entry (`u16` length, then its bytes) to `bytes`; its offset, or [`NO_NAME`]
/// (nothing written) past 4 GiB of table. `string` is one the table can hold.
fn write_entry(bytes: &mut Vec<u8>, string: &str) -> u32 {
    let Ok(offset) = u32::try_from(bytes.len()) else {
        return NO_NAME;
    };
    if offset == NO_NAME {
        return NO_NAME;
    }
    // len <= MAX_NAME_LEN, so it fits the u16 length field.
    bytes.extend_from_slice(&(string.len() as u16).to_le_bytes());
    bytes.extend_from_slice(string.as_bytes());
    offset
}

/// A string table's strings, gathered before it is written: each string gets a provisional id
/// ([`Self::id`]), and [`Self::finish`] writes the table in an order that depends on the set of
/// strings alone (by FNV-1a 64 of each string's bytes, then the bytes), not on the order they were
/// gathered in. So a change that adds or removes no string (a pod moving to another address) keeps
/// every offset, and a delta carries no record for them.
#[derive(Debug, Default)]
pub struct StringSet<'s> {
    /// Only looked up, never iterated.
    ids: HashMap<&'s str, u32, foldhash::fast::RandomState>,
    /// By provisional id.
    strings: Vec<&'s str>,
}

impl<'s> StringSet<'s> {
    /// The provisional id of `string`, added if new; [`NO_NAME`] for a string no table can hold
    /// ([`StringTable::can_hold`]).
    pub fn id(&mut self, string: &'s str) -> u32 {
        if !StringTable::can_hold(string) {
            return NO_NAME;
        }
        let Self { ids, strings } = self;
        *ids.entry(string).or_insert_with(|| {
            // Fewer strings than addresses and services, far below NO_NAME.
            let id = strings.len() as u32;
            strings.push(string);
            id
        })
    }

    /// The table, and the offset of every provisional id.
    pub fn finish(self) -> FinishedStrings {
        let mut order: Vec<(u64, &str, u32)> = (0u32..)
            .zip(&self.strings)
            .map(|(id, s)| (crate::content_hash(s.as_bytes()), *s, id))
            .collect();
        order.sort_unstable();
        let mut bytes = Vec::new();
        let mut offsets = vec![NO_NAME; self.strings.len()];
        for (_, string, id) in order {
            offsets[id as usize] = write_entry(&mut bytes, string);
        }
        bytes.resize(bytes.len().next_multiple_of(8), 0);
        FinishedStrings { bytes, offsets }
    }
}

/// A string table written by [`StringSet::finish`].
#[derive(Debug)]
pub struct FinishedStrings {
    /// Zero-padded to a whole number of 8-byte chunks.
    pub bytes: Vec<u8>,
    offsets: Vec<u32>,
}

impl FinishedStrings {
    /// The offset of the string with provisional id `id`: [`NO_NAME`] for [`NO_NAME`] (and for a
    /// string past 4 GiB of table).
    pub fn offset(&self, id: u32) -> u32 {
        self.offsets.get(id as usize).copied().unwrap_or(NO_NAME)
    }
}

/// Bytes one entry of `string` takes in the table.
pub const fn entry_len(string: &str) -> usize {
    NAME_LEN_BYTES + string.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_stored_once_and_the_table_is_padded_to_chunks() {
        let mut t = StringTable::default();
        assert_eq!(t.intern("reviews"), 0);
        assert_eq!(t.intern("default"), 9);
        assert_eq!(t.intern("reviews"), 0, "interned once");
        assert_eq!(t.intern(""), NO_NAME);
        assert_eq!(t.intern(&"x".repeat(MAX_NAME_LEN + 1)), NO_NAME);
        assert_eq!(t.len(), 18);
        let bytes = t.finish();
        assert_eq!(bytes.len(), 24);
        assert_eq!(&bytes[..9], b"\x07\x00reviews");
        assert!(bytes[18..].iter().all(|&b| b == 0));
    }

    #[test]
    fn a_gathered_table_depends_on_the_set_of_strings_alone() {
        let mut a = StringSet::default();
        let ids_a = ["reviews", "default", "", "reviews", "bookinfo"].map(|s| a.id(s));
        assert_eq!(
            ids_a,
            [0, 1, NO_NAME, 0, 2],
            "provisional ids, each string once"
        );
        let mut b = StringSet::default();
        let ids_b = ["bookinfo", "reviews", "default"].map(|s| b.id(s));
        let (a, b) = (a.finish(), b.finish());
        assert_eq!(a.bytes, b.bytes, "the same set, the same table");
        assert_eq!(a.bytes.len(), 32, "28 bytes of entries, padded");
        for (i, s) in ["reviews", "default", "bookinfo"].iter().enumerate() {
            let at = a.offset(ids_a[[0, 1, 4][i]]) as usize;
            assert_eq!(at, b.offset(ids_b[[1, 2, 0][i]]) as usize);
            let len = u16::from_le_bytes([a.bytes[at], a.bytes[at + 1]]) as usize;
            assert_eq!(&a.bytes[at + 2..at + 2 + len], s.as_bytes());
        }
        assert_eq!(a.offset(NO_NAME), NO_NAME);
    }
}
