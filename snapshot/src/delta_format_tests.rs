//! Deltas on the wire: a node's delta, applied to the snapshot it was made from, is exactly the
//! snapshot the operator compiled (tables, content hash and section hashes); a delta that does not
//! fit, is corrupt, or breaks a limit is refused.

use proptest::collection::vec;
use proptest::prelude::*;

use kmesh_common::mode;

use crate::builder::{SnapshotBuilder, generate};
use crate::delta::{ClusterDelta, DeltaError};
use crate::delta_format::{
    ClusterDeltaPart, DELTA_HEADER_LEN, Delta, STRINGS_REPLACED, delta_between, delta_head,
    is_delta, set_delta_generation,
};
use crate::error::Table;
use crate::tests::sample;
use crate::{
    DecodeError, Decoded, EncodeError, Format, Limits, Snapshot, WorkloadName, set_generation,
};

/// What the operator serves a node holding `base` when `next` is compiled: the node's delta, at
/// `next`'s generation.
fn delta_bytes(base: &Snapshot, next: &Snapshot) -> Vec<u8> {
    let bytes = delta_between(base, next).unwrap();
    // The operator's path: the node part encoded at another generation, then set.
    let (_, base_cluster) = base.clone().into_parts();
    let (node, next_cluster) = next.clone().into_parts();
    let base_part = base_cluster.encode().unwrap();
    let next_part = next_cluster.encode().unwrap();
    let changes = ClusterDelta::between(&base_cluster, &next_cluster);
    let part =
        ClusterDeltaPart::encode(&changes, &base_part.summary(), &next_part.summary()).unwrap();
    let mut node_part = node.encode(1, next_part.summary()).unwrap();
    set_generation(&mut node_part, next.generation).unwrap();
    let mut served = delta_head(&node_part, &part).unwrap();
    served.extend_from_slice(part.bytes());
    assert_eq!(served, bytes, "delta_between is what the operator serves");
    bytes
}

fn decoded(s: &Snapshot) -> Decoded {
    Snapshot::decode(&s.encode().unwrap(), &Limits::UNLIMITED).unwrap()
}

fn apply(bytes: &[u8], base: &Decoded) -> Result<Decoded, String> {
    let delta = Delta::decode(bytes, &Limits::default()).map_err(|e| format!("decode: {e}"))?;
    delta
        .apply(base, &Limits::default())
        .map_err(|e| format!("apply: {e}"))
}

/// `s` whose names hold one workload more, of a new Deployment: new strings.
fn with_new_names(s: &Snapshot) -> Snapshot {
    let mut b = SnapshotBuilder::new(&s.node_name, s.generation, mode::KERNEL_NATIVE);
    crate::tests::add_sample_names(&mut b);
    let ratings = WorkloadName {
        workload: "ratings-v1",
        namespace: "default",
        service_account: "bookinfo-ratings",
        app: "ratings",
        version: "v1",
    };
    b.workload_names("10.244.1.99".parse().unwrap(), &ratings);
    let mut next = s.clone();
    next.names = b.build().names;
    next.sort();
    assert_ne!(next.names.strings, s.names.strings);
    next
}

/// The sample with one endpoint moved, a service added and the generation advanced.
fn changed(s: &Snapshot) -> Snapshot {
    let mut next = s.clone();
    next.generation += 1;
    next.endpoints[1].value.ip[15] ^= 0x40;
    let mut added = next.services[0];
    added.key.port = 8443;
    next.services.push(added);
    next.sort();
    next
}

#[test]
fn a_delta_applied_to_its_base_is_the_compiled_snapshot() {
    let base = sample();
    let next = changed(&base);
    let bytes = delta_bytes(&base, &next);
    assert!(is_delta(&bytes));
    assert!(!is_delta(&next.encode().unwrap()));
    let result = apply(&bytes, &decoded(&base)).unwrap();
    assert_eq!(
        result,
        decoded(&next),
        "tables, content hash, format and section hashes"
    );
    // The same delta read back: two records changed, no strings.
    let delta = Delta::decode(&bytes, &Limits::default()).unwrap();
    assert_eq!(delta.cluster.records(), 2);
    assert_eq!(delta.cluster.name_strings, None);
    assert_eq!(delta.generation, next.generation);
}

#[test]
fn a_changed_string_table_is_carried_whole() {
    let base = sample();
    let next = with_new_names(&changed(&base));
    let bytes = delta_bytes(&base, &next);
    let delta = Delta::decode(&bytes, &Limits::default()).unwrap();
    assert_eq!(
        delta.cluster.name_strings.as_ref(),
        Some(&next.names.strings)
    );
    assert_eq!(
        u32::from_le_bytes(bytes[12..16].try_into().unwrap()),
        STRINGS_REPLACED
    );
    assert_eq!(apply(&bytes, &decoded(&base)).unwrap(), decoded(&next));
}

#[test]
fn a_delta_applies_only_to_its_base() {
    let base = sample();
    let next = changed(&base);
    let bytes = delta_bytes(&base, &next);
    let mut other = next.clone();
    other.endpoints[0].value.port += 1;
    let other = decoded(&other);
    assert!(matches!(
        Delta::decode(&bytes, &Limits::default())
            .unwrap()
            .apply(&other, &Limits::default()),
        Err(DeltaError::OtherBase { .. })
    ));
    let v3 = Snapshot::decode(&base.encode_as(Format::V3).unwrap(), &Limits::default()).unwrap();
    assert_eq!(
        Delta::decode(&bytes, &Limits::default())
            .unwrap()
            .apply(&v3, &Limits::default()),
        Err(DeltaError::BaseWithoutHashes { format: 3 })
    );
}

/// A delta whose framing is right but whose changes are not the difference (as a bug in the
/// operator would make) is refused by the hash: here one upserted endpoint is altered.
#[test]
fn changes_that_are_not_the_difference_are_refused_by_the_hash() {
    let base = sample();
    let next = changed(&base);
    let (_, base_cluster) = base.clone().into_parts();
    let (node, next_cluster) = next.clone().into_parts();
    let mut changes = ClusterDelta::between(&base_cluster, &next_cluster);
    changes.endpoints.upserted[0].value.port += 1;
    let part = ClusterDeltaPart::encode(
        &changes,
        &base_cluster.encode().unwrap().summary(),
        &next_cluster.encode().unwrap().summary(),
    )
    .unwrap();
    let node_part = node
        .encode(next.generation, next_cluster.encode().unwrap().summary())
        .unwrap();
    let mut bytes = delta_head(&node_part, &part).unwrap();
    bytes.extend_from_slice(part.bytes());
    assert!(
        apply(&bytes, &decoded(&base))
            .unwrap_err()
            .starts_with("apply: content hash mismatch")
    );
}

#[test]
fn every_flipped_byte_is_refused_except_the_generation() {
    let base = sample();
    let held = decoded(&base);
    let next = changed(&base);
    let bytes = delta_bytes(&base, &next);
    for i in 0..bytes.len() {
        let mut corrupt = bytes.clone();
        corrupt[i] ^= 0x01;
        match (i, apply(&corrupt, &held)) {
            (16..24, Ok(result)) => {
                assert_eq!(
                    result.snapshot.generation,
                    next.generation ^ (1 << (8 * (i - 16)))
                );
            }
            (_, Ok(_)) => panic!("byte {i} flipped and the delta was accepted"),
            (_, Err(_)) => {}
        }
    }
}

#[test]
fn the_header_is_checked() {
    let base = sample();
    let bytes = delta_bytes(&base, &changed(&base));
    let decode = |b: &[u8]| Delta::decode(b, &Limits::default()).map(|_| ());
    assert_eq!(
        decode(&base.encode().unwrap()),
        Err(DecodeError::DeltaMagic {
            found: b"KMSNAP\r\n".to_vec()
        }),
        "a snapshot is not a delta"
    );
    assert!(matches!(
        decode(&bytes[..40]),
        Err(DecodeError::TooShort { min: 56, .. })
    ));
    assert!(matches!(
        decode(&bytes[..bytes.len() - 8]),
        Err(DecodeError::Truncated { .. })
    ));
    let mut b = bytes.clone();
    b[8] = 3;
    assert_eq!(
        decode(&b),
        Err(DecodeError::UnsupportedFormatVersion { found: 3 })
    );
    let mut b = bytes.clone();
    b[12] |= 2;
    assert_eq!(decode(&b), Err(DecodeError::HeaderFlags { flags: 2 }));
    for len in [0u64, 8, 12, 1 << 40] {
        let mut b = bytes.clone();
        b[48..56].copy_from_slice(&len.to_le_bytes());
        assert!(
            matches!(decode(&b), Err(DecodeError::DeltaNodePartLen { .. })),
            "node_part_len {len}"
        );
    }
    // Strings in the section without the flag.
    let next = with_new_names(&changed(&base));
    let mut b = delta_bytes(&base, &next);
    b[12..16].copy_from_slice(&0u32.to_le_bytes());
    let refused = decode(&b);
    assert!(
        matches!(refused, Err(DecodeError::DeltaStrings { .. })),
        "{refused:?}"
    );
}

#[test]
fn limits_are_checked_on_the_delta_and_on_its_result() {
    let base = sample();
    let next = changed(&base);
    let bytes = delta_bytes(&base, &next);
    let tight = Limits {
        max_bytes: bytes.len() as u64 - 1,
        ..Limits::default()
    };
    assert!(matches!(
        Delta::decode(&bytes, &tight),
        Err(DecodeError::TooLarge { .. })
    ));
    // Each changes section is within the limit; the result is not.
    let tight = Limits {
        max_services: base.services.len() as u32,
        ..Limits::default()
    };
    let delta = Delta::decode(&bytes, &tight).unwrap();
    assert_eq!(
        delta.apply(&decoded(&base), &tight),
        Err(DeltaError::OverCapacity {
            table: Table::Services,
            count: next.services.len() as u64,
            capacity: base.services.len() as u32,
        })
    );
}

#[test]
fn a_node_part_of_another_compile_is_refused_by_the_encoder() {
    let base = sample();
    let next = changed(&base);
    let (_, base_cluster) = base.clone().into_parts();
    let (node, next_cluster) = next.into_parts();
    let part = ClusterDeltaPart::encode(
        &ClusterDelta::between(&base_cluster, &next_cluster),
        &base_cluster.encode().unwrap().summary(),
        &next_cluster.encode().unwrap().summary(),
    )
    .unwrap();
    let stale = node
        .encode(1, base_cluster.encode().unwrap().summary())
        .unwrap();
    assert!(matches!(
        delta_head(&stale, &part),
        Err(EncodeError::NodePartOfAnotherCluster { .. })
    ));
    let v3 = node
        .encode_as(Format::V3, 1, next_cluster.encode().unwrap().summary())
        .unwrap();
    assert!(matches!(
        delta_head(&v3, &part),
        Err(EncodeError::NotANodePart(_))
    ));
}

#[test]
fn the_generation_is_set_without_touching_the_rest() {
    let base = sample();
    let next = changed(&base);
    let mut bytes = delta_bytes(&base, &next);
    set_delta_generation(&mut bytes, 99).unwrap();
    let result = apply(&bytes, &decoded(&base)).unwrap();
    assert_eq!(result.snapshot.generation, 99);
    assert_eq!(result.content_hash, decoded(&next).content_hash);
    assert!(set_delta_generation(&mut base.encode().unwrap(), 1).is_err());
}

/// One endpoint moved in a generated cluster of 1,000 services and 10,000 endpoints: the delta is
/// the node part and one record, far below 1 % of the snapshot.
#[test]
fn a_one_endpoint_delta_is_small() {
    let base = generate("node-1", 1, 1_000, 10);
    let mut next = base.clone();
    next.generation = 2;
    next.endpoints[4_321].value.ip[15] ^= 1;
    let bytes = delta_bytes(&base, &next);
    let full = next.encode().unwrap().len();
    assert!(
        bytes.len() * 100 < full,
        "delta {} bytes, snapshot {full}",
        bytes.len()
    );
    assert_eq!(apply(&bytes, &decoded(&base)).unwrap(), decoded(&next));
    assert!(DELTA_HEADER_LEN < bytes.len());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// A sequence of compiles, each served as a delta from the last: every result is the compiled
    /// snapshot, to the content hash and the section hashes.
    #[test]
    fn a_sequence_of_deltas_gives_each_compile(
        steps in vec((1u32..30, 1u32..5, any::<u64>()), 1..6),
    ) {
        let mut compiled = generate("node-1", 1, 1, 1);
        let mut held = decoded(&compiled);
        for (generation, (services, endpoints, seed)) in (2..).zip(steps) {
            let mut next = generate("node-1", generation, services, endpoints);
            for (i, e) in next.endpoints.iter_mut().enumerate() {
                if (seed >> (i % 64)) & 1 == 1 {
                    e.value.port = e.value.port.wrapping_add(1).max(1);
                }
            }
            if seed & 1 == 1 {
                next.names = compiled.names.clone();
            }
            let bytes = delta_bytes(&compiled, &next);
            held = apply(&bytes, &held).map_err(TestCaseError::fail)?;
            prop_assert_eq!(&held, &decoded(&next));
            compiled = next;
        }
    }
}
