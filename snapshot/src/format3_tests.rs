//! The framing of formats 3 and 4: the two parts, `cluster_offset` and the hash of the parts. The
//! rules every format shares are tested in `tests` (on format 2's framing, and every content rule
//! on the formats' bytes); format 4's hash of the cluster part in `format4_tests`.

use crate::error::Table;
use crate::tests::{decode, fix, sample, v2};
use crate::{
    ClusterTables, DecodeError, EncodeError, Format, Limits, NodeTables, Snapshot, ValidationError,
    computed_content_hash, content_hash, peek_header, set_generation,
};

fn cluster_offset(bytes: &[u8]) -> usize {
    u64::from_le_bytes(bytes[40..48].try_into().unwrap()) as usize
}

fn set_cluster_offset(bytes: &mut [u8], offset: u64) {
    bytes[40..48].copy_from_slice(&offset.to_le_bytes());
}

/// Another node of the sample's cluster: its own name, generation, workloads and authorization.
fn other_node() -> Snapshot {
    let mut s = sample();
    s.node_name = "node-b2".to_string();
    s.generation = 12;
    s.workloads.truncate(1);
    s.authz = Default::default();
    s
}

#[test]
fn the_parts_encoded_apart_are_the_snapshot() {
    let s = sample();
    let (node, cluster) = s.clone().into_parts();
    let part = cluster.encode().unwrap();
    let mut joined = node.encode(s.generation, part.summary()).unwrap();
    let node_len = joined.len();
    joined.extend_from_slice(part.bytes());
    assert_eq!(joined, s.encode().unwrap());
    assert_eq!(cluster_offset(&joined), node_len);
    assert_eq!(part.cluster_hash(Format::V3), content_hash(part.bytes()));
    assert_eq!(part.cluster_hash(Format::V4), part.hashes().cluster_hash());
    let mut v3 = node
        .encode_as(Format::V3, s.generation, part.summary())
        .unwrap();
    v3.extend_from_slice(part.bytes());
    assert_eq!(
        v3,
        s.encode_as(Format::V3).unwrap(),
        "the same part in format 3"
    );
    assert_eq!(
        node.encode_as(Format::V2, s.generation, part.summary()),
        Err(EncodeError::NoParts { format: 2 })
    );
    assert_eq!(
        Snapshot::from_parts(node, cluster, s.generation),
        s,
        "from_parts undoes into_parts"
    );
}

#[test]
fn every_node_of_a_cluster_ends_with_the_same_bytes() {
    let (a, b) = (sample().encode().unwrap(), other_node().encode().unwrap());
    let (ca, cb) = (cluster_offset(&a), cluster_offset(&b));
    assert_ne!(ca, cb, "the node parts differ in size");
    assert_eq!(a[ca..], b[cb..]);
    let (_, cluster) = sample().into_parts();
    assert_eq!(&a[ca..], cluster.encode().unwrap().bytes());
}

#[test]
fn every_format_holds_the_same_snapshot() {
    let s = sample();
    let encoded: Vec<(Format, Vec<u8>)> = Format::ALL
        .into_iter()
        .map(|f| (f, s.encode_as(f).unwrap()))
        .collect();
    assert_eq!(
        encoded.last().unwrap().1,
        s.encode().unwrap(),
        "encode writes the newest"
    );
    let (v3, v4) = (&encoded[1].1, &encoded[2].1);
    assert_eq!(
        v3[10..24],
        v4[10..24],
        "only the format version and hash differ"
    );
    assert_eq!(
        v3[32..],
        v4[32..],
        "only the format version and hash differ"
    );
    let mut hashes = Vec::new();
    for (format, bytes) in &encoded {
        let decoded = Snapshot::decode(bytes, &Limits::default()).unwrap();
        assert_eq!(decoded.format, *format);
        assert_eq!(decoded.snapshot, s);
        assert_eq!(
            decoded.cluster_hashes.is_some(),
            *format == Format::V4,
            "section hashes come with format 4"
        );
        let header = peek_header(bytes).unwrap();
        assert_eq!(header.format_version, format.number());
        assert_eq!(header.node_name, "node-a1");
        assert_eq!(header.generation, 7);
        assert_eq!(Ok(header.content_hash), computed_content_hash(bytes));
        assert_eq!(header.content_hash, decoded.content_hash);
        hashes.push(decoded.content_hash);
    }
    hashes.dedup();
    assert_eq!(hashes.len(), 3, "each format has its hash");
}

#[test]
fn set_generation_works_on_a_node_part() {
    let s = sample();
    let (node, cluster) = s.clone().into_parts();
    let part = cluster.encode().unwrap();
    let mut bytes = node.encode(1, part.summary()).unwrap();
    set_generation(&mut bytes, s.generation).unwrap();
    bytes.extend_from_slice(part.bytes());
    assert_eq!(bytes, s.encode().unwrap());
}

#[test]
fn every_flipped_byte_after_the_fixed_header_is_refused() {
    for format in [Format::V3, Format::V4] {
        let bytes = sample().encode_as(format).unwrap();
        let header_hash = peek_header(&bytes).unwrap().content_hash;
        let cluster = cluster_offset(&bytes);
        let mut framing = 0;
        for i in 40..bytes.len() {
            let mut corrupt = bytes.clone();
            corrupt[i] ^= 0x01;
            match (i, decode(&corrupt)) {
                // cluster_offset: odd, or past the end (a move within the snapshot moves the
                // parts' boundary, and so their hashes).
                (40..48, Err(DecodeError::ClusterOffset { .. })) => {}
                (_, Err(DecodeError::HashMismatch { header, computed })) => {
                    assert_eq!(header, header_hash);
                    assert_eq!(Ok(computed), computed_content_hash(&corrupt));
                }
                // Format 4 reads the cluster sections' framing to hash their records, so a
                // flipped section header or padding byte there, or a cluster_offset moved to
                // where no section starts, is refused as what it breaks.
                (
                    _,
                    Err(
                        DecodeError::SectionKind { .. }
                        | DecodeError::RecordSize { .. }
                        | DecodeError::SectionReserved { .. }
                        | DecodeError::SectionOverrun { .. }
                        | DecodeError::NonZeroPadding { .. }
                        | DecodeError::Overrun { .. },
                    ),
                ) if format == Format::V4 && (i >= cluster || (40..48).contains(&i)) => {
                    framing += 1
                }
                (_, other) => panic!("format {format:?}, byte {i}: {other:?}"),
            }
        }
        if format == Format::V4 {
            assert!(framing > 0, "some bytes of format 4 are framing");
        }
    }
}

#[test]
fn cluster_offset_must_be_a_multiple_of_8_within_the_snapshot() {
    let bytes = sample().encode().unwrap();
    let len = bytes.len() as u64;
    for offset in [0, 8, 40, 47, 60, 61, len + 8, u64::MAX] {
        let mut b = bytes.clone();
        set_cluster_offset(&mut b, offset);
        fix(&mut b);
        assert_eq!(
            decode(&b),
            Err(DecodeError::ClusterOffset { offset, len }),
            "{offset}"
        );
    }
    let mut b = bytes.clone();
    set_cluster_offset(&mut b, 61);
    assert_eq!(
        decode(&b).unwrap_err().to_string(),
        format!(
            "the cluster part's offset 61 is not a multiple of 8 between 48 and the snapshot's length {len}"
        )
    );
}

#[test]
fn the_node_part_must_end_where_the_cluster_part_starts() {
    // Format 3: format 4 reads the cluster sections from cluster_offset to hash them, so an offset
    // moved to where no section starts is refused by that reading first.
    let bytes = sample().encode_as(Format::V3).unwrap();
    let offset = cluster_offset(&bytes) as u64;
    for moved in [offset - 8, offset + 8, bytes.len() as u64] {
        let mut b = bytes.clone();
        set_cluster_offset(&mut b, moved);
        fix(&mut b);
        assert_eq!(
            decode(&b),
            Err(DecodeError::NodePartEnd {
                end: offset,
                cluster_offset: moved
            }),
            "{moved}"
        );
    }
}

#[test]
fn sections_in_format_2_order_are_refused_in_format_3() {
    // Format 2's bytes relabelled as format 3, with an offset at the end of the names (as if the
    // node part held everything): the second section is Services, not Workloads.
    let mut b = v2(&sample());
    b[8..10].copy_from_slice(&Format::V3.number().to_le_bytes());
    let mut with_offset = b[..40].to_vec();
    with_offset.extend_from_slice(&0u64.to_le_bytes());
    with_offset.extend_from_slice(&b[40..]);
    let len = with_offset.len() as u64;
    set_cluster_offset(&mut with_offset, len);
    fix(&mut with_offset);
    assert!(matches!(
        decode(&with_offset),
        Err(DecodeError::SectionKind {
            found: 2,
            expected: 6,
            table: Table::Workloads,
            ..
        })
    ));
}

#[test]
fn each_part_is_validated_on_its_own() {
    let mut s = sample();
    s.services[0].value.route_id = 42;
    let (node, cluster) = s.into_parts();
    assert!(matches!(
        cluster.encode(),
        Err(EncodeError::Invalid(ValidationError::ServiceRouteMissing {
            route_id: 42,
            ..
        }))
    ));
    assert_eq!(node.validate(), Ok(()));

    let mut s = sample();
    s.workloads.reverse();
    let (node, cluster) = s.into_parts();
    let part = cluster.encode().unwrap();
    assert!(matches!(
        node.encode(7, part.summary()),
        Err(EncodeError::Invalid(ValidationError::OutOfOrder {
            table: Table::Workloads,
            ..
        }))
    ));
    let NodeTables { node_name, .. } = node;
    assert_eq!(node_name, "node-a1");
}

#[test]
fn sorting_the_parts_sorts_the_snapshot() {
    let s = sample();
    let mut shuffled = s.clone();
    shuffled.services.reverse();
    shuffled.endpoints.reverse();
    shuffled.workloads.reverse();
    shuffled.authz.verdicts.reverse();
    let (mut node, mut cluster): (NodeTables, ClusterTables) = shuffled.into_parts();
    node.sort();
    cluster.sort();
    assert_eq!(Snapshot::from_parts(node, cluster, s.generation), s);
}
