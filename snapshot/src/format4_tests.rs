//! Format 4's hash of the cluster part: by sections, each a count and a sum of record hashes.

use kmesh_common::EndpointRecord;
use proptest::prelude::*;

use crate::format::records_as_bytes;
use crate::tests::{decode, sample};
use crate::{
    ClusterHashes, DecodeError, Format, Limits, Snapshot, TableHash, ValidationError,
    computed_content_hash, content_hash, peek_header, record_hash,
};

fn cluster_offset(bytes: &[u8]) -> usize {
    u64::from_le_bytes(bytes[40..48].try_into().unwrap()) as usize
}

/// The format's definition written out again, apart from the code that implements it.
fn spelled_out_record_hash(kind: u32, record: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in kind.to_le_bytes().iter().chain(record) {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[test]
fn the_content_hash_spelled_out() {
    let s = sample();
    let bytes = s.encode().unwrap();
    let offset = cluster_offset(&bytes);
    let node_hash = content_hash(&bytes[40..offset]);
    // (kind, record size, record bytes) of the seven cluster sections, in order.
    let n = &s.names;
    let sections: [(u32, usize, &[u8]); 7] = [
        (2, 32, records_as_bytes(&s.services)),
        (3, 140, records_as_bytes(&s.routes)),
        (4, 12, records_as_bytes(&s.backend_sets)),
        (5, 32, records_as_bytes(&s.endpoints)),
        (11, 0, &n.strings),
        (12, 36, records_as_bytes(&n.workloads)),
        (13, 16, records_as_bytes(&n.services)),
    ];
    let mut listed = Vec::new();
    for (kind, size, bytes) in sections {
        let (count, hash) = if size == 0 {
            (bytes.len() as u64 / 8, content_hash(bytes))
        } else {
            let sum = bytes.chunks(size).fold(0u64, |sum, r| {
                sum.wrapping_add(spelled_out_record_hash(kind, r))
            });
            ((bytes.len() / size) as u64, sum)
        };
        assert!(count > 0, "the sample has records in section {kind}");
        listed.extend_from_slice(&kind.to_le_bytes());
        listed.extend_from_slice(&count.to_le_bytes());
        listed.extend_from_slice(&hash.to_le_bytes());
    }
    let cluster_hash = content_hash(&listed);
    let both = [node_hash.to_le_bytes(), cluster_hash.to_le_bytes()].concat();
    assert_eq!(
        peek_header(&bytes).unwrap().content_hash,
        content_hash(&both)
    );
    let decoded = Snapshot::decode(&bytes, &Limits::default()).unwrap();
    assert_eq!(decoded.cluster_hashes.unwrap().cluster_hash(), cluster_hash);
    let (_, cluster) = s.into_parts();
    assert_eq!(
        cluster.encode().unwrap().hashes(),
        decoded.cluster_hashes.unwrap()
    );
}

#[test]
fn every_bit_of_every_cluster_record_is_in_the_hash() {
    let bytes = sample().encode().unwrap();
    let before = Snapshot::decode(&bytes, &Limits::default()).unwrap();
    let hashes = before.cluster_hashes.unwrap();
    let s = &before.snapshot;
    let mut seen = std::collections::HashSet::new();
    seen.insert(hashes.cluster_hash());
    let mut check = |changed: ClusterHashes| {
        assert!(
            seen.insert(changed.cluster_hash()),
            "a change left the cluster hash as it was, or as another change made it"
        );
    };
    for (i, e) in s.endpoints.iter().enumerate() {
        for bit in 0..(32 * 8) {
            let mut changed = *e;
            flip_bit(&mut changed, bit);
            let mut h = hashes;
            h.endpoints.remove(e);
            h.endpoints.add(&changed);
            let mut endpoints = s.endpoints.clone();
            endpoints[i] = changed;
            assert_eq!(
                h.endpoints,
                TableHash::of(&endpoints),
                "update = recomputation"
            );
            check(h);
        }
    }
}

/// Flips bit `bit` of an endpoint record's wire bytes, through its fields.
fn flip_bit(e: &mut EndpointRecord, bit: usize) {
    let byte = bit / 8;
    let mask = 1u8 << (bit % 8);
    match byte {
        0..4 => e.key.set_id ^= u32::from(mask) << (8 * byte),
        4..8 => e.key.index ^= u32::from(mask) << (8 * (byte - 4)),
        8..24 => e.value.ip[byte - 8] ^= mask,
        24..26 => e.value.port ^= u16::from(mask) << (8 * (byte - 24)),
        26..28 => e.value.pad ^= u16::from(mask) << (8 * (byte - 26)),
        _ => e.value.identity ^= u32::from(mask) << (8 * (byte - 28)),
    }
}

#[test]
fn records_out_of_order_keep_the_hash_and_are_refused_by_the_rules() {
    // The sum does not see order: the content rules do (sections are sorted by key).
    let bytes = sample().encode().unwrap();
    let offset = cluster_offset(&bytes);
    let first = offset + 16; // the services section's first record
    let mut swapped = bytes.clone();
    swapped.copy_within(first + 32..first + 64, first);
    swapped[first + 32..first + 64].copy_from_slice(&bytes[first..first + 32]);
    assert_ne!(swapped, bytes);
    assert_eq!(
        computed_content_hash(&swapped),
        Ok(peek_header(&bytes).unwrap().content_hash)
    );
    assert!(matches!(
        decode(&swapped),
        Err(DecodeError::Invalid(ValidationError::OutOfOrder { .. }))
    ));
}

#[test]
fn the_same_record_in_another_table_hashes_differently() {
    // Backend sets and endpoints are of different sizes, so compare the kind's part directly: the
    // hash of the same bytes under two kinds.
    let s = sample();
    let e = s.endpoints[0];
    assert_eq!(
        record_hash(&e),
        spelled_out_record_hash(5, records_as_bytes(&[e]))
    );
    assert_ne!(
        spelled_out_record_hash(5, records_as_bytes(&[e])),
        spelled_out_record_hash(4, records_as_bytes(&[e]))
    );
}

#[test]
fn formats_3_and_4_share_the_cluster_part() {
    let s = sample();
    let (v3, v4) = (s.encode_as(Format::V3).unwrap(), s.encode().unwrap());
    let offset = cluster_offset(&v4);
    assert_eq!(v3[offset..], v4[offset..]);
}

fn arb_endpoint() -> impl Strategy<Value = EndpointRecord> {
    (
        any::<u32>(),
        any::<u32>(),
        any::<[u8; 16]>(),
        any::<u16>(),
        any::<u32>(),
    )
        .prop_map(|(set_id, index, ip, port, identity)| EndpointRecord {
            key: kmesh_common::EndpointKey { set_id, index },
            value: kmesh_common::EndpointValue {
                ip,
                port,
                pad: 0,
                identity,
            },
        })
}

proptest! {
    /// Counting records in and out in any order gives the hash of what remains.
    #[test]
    fn updates_give_the_hash_of_the_result(
        records in proptest::collection::vec(arb_endpoint(), 0..40),
        removed in proptest::collection::vec(any::<prop::sample::Index>(), 0..10),
    ) {
        let mut hash = TableHash::default();
        for r in records.iter().rev() {
            hash.add(r);
        }
        prop_assert_eq!(hash, TableHash::of(&records));
        let mut left = records.clone();
        for i in removed {
            if left.is_empty() {
                break;
            }
            let r = left.remove(i.index(left.len()));
            hash.remove(&r);
            prop_assert_eq!(hash, TableHash::of(&left));
        }
    }
}
