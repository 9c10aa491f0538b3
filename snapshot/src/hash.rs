//! The content hash of a snapshot.

const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a 64 of `section_bytes`: start from the offset basis `0xcbf29ce484222325`; for each byte,
/// xor it into the state, then multiply by the prime `0x100000001b3` (wrapping).
///
/// A snapshot's `content_hash` is this function over every byte from offset
/// [`crate::FIXED_HEADER_LEN`] (40) to the end: the node name and all sections. It detects
/// corruption and lets the agent tell snapshots apart cheaply; it is not a cryptographic digest and
/// does not authenticate the producer.
pub fn content_hash(section_bytes: &[u8]) -> u64 {
    section_bytes.iter().fold(FNV_OFFSET_BASIS, |state, &byte| {
        (state ^ u64::from(byte)).wrapping_mul(FNV_PRIME)
    })
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
