//! Writing the names sections: [`StringTable`] interns strings into the string table's format
//! (`kmesh_common::names`), each once, and hands back their offsets for the records. Used by the
//! operator's compiler and by the [`builder`](crate::builder).

use std::collections::{HashMap, HashSet};

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
        let Ok(offset) = u32::try_from(self.bytes.len()) else {
            return NO_NAME;
        };
        if offset == NO_NAME {
            return NO_NAME;
        }
        // len <= MAX_NAME_LEN, so it fits the u16 length field.
        self.bytes
            .extend_from_slice(&(string.len() as u16).to_le_bytes());
        self.bytes.extend_from_slice(string.as_bytes());
        self.offsets.insert(string.to_owned(), offset);
        offset
    }

    /// A table of `strings`, each once, in sorted order: its bytes depend on the set of strings
    /// alone, not on the order they come in, so a change that adds or removes no string (a pod
    /// moving to another address) keeps every offset, and a delta carries no record for them.
    /// Those the table cannot hold ([`Self::intern`]) are left out.
    pub fn of_sorted<'a>(strings: impl IntoIterator<Item = &'a str>) -> StringTable {
        let mut unique: Vec<&str> = strings
            .into_iter()
            .filter(|s| Self::can_hold(s))
            .collect::<HashSet<_, foldhash::fast::RandomState>>()
            .into_iter()
            .collect();
        unique.sort_unstable();
        let mut table = StringTable::default();
        for string in unique {
            table.intern(string);
        }
        table
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
    fn a_sorted_table_depends_on_the_set_of_strings_alone() {
        let a = StringTable::of_sorted(["reviews", "default", "", "reviews", "bookinfo"]);
        let b = StringTable::of_sorted(["bookinfo", "reviews", "default"]);
        assert_eq!(a.clone().finish(), b.finish());
        let mut a = a;
        assert_eq!(a.intern("bookinfo"), 0, "sorted: bookinfo first");
        assert_eq!(a.intern("default"), 10);
        assert_eq!(a.intern("reviews"), 19);
        assert_eq!(a.len(), 28, "nothing added by interning what is there");
    }
}
