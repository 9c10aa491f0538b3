//! The content hash of a snapshot.

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
pub(crate) fn parts_hash(node_hash: u64, cluster_hash: u64) -> u64 {
    let mut both = [0u8; 16];
    both[..8].copy_from_slice(&node_hash.to_le_bytes());
    both[8..].copy_from_slice(&cluster_hash.to_le_bytes());
    content_hash(&both)
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
