//! Round trips, one test per format rule, limits and the large generated snapshot.
//!
//! Rule tests either change a field of a valid [`Snapshot`] and write it with the unchecked encoder
//! (so framing and hash are right and the targeted content rule is what fires, in both the encoder
//! and the decoder), or change bytes of a valid encoding and recompute `total_len` and the hash.

use std::net::IpAddr;

use kmesh_common::{
    EndpointKey, EndpointRecord, EndpointValue, LAYOUT_VERSION, MAX_ROUTE_DESTINATIONS, access_log,
    lb_policy, log_level, mode,
};

use crate::builder::{Endpoint, SnapshotBuilder, generate};
use crate::encode::encode_unchecked;
use crate::format::{FIXED_HEADER_LEN, Format, OFF_CONTENT_HASH, OFF_TOTAL_LEN};
use crate::{
    DecodeError, EncodeError, Limits, Snapshot, Table, ValidationError, content_hash, peek_header,
    set_generation,
};

pub(crate) fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

fn ep(addr: &str, port: u16, identity: u32) -> Endpoint {
    Endpoint::new(ip(addr), port, identity)
}

/// A small snapshot using every table, both address families, both policies and an empty set.
///
/// After sorting: services 0 = 10.96.0.10:80 (route 1), 1 = 10.96.0.30:8080 (route 3),
/// 2 = [fd00:10:96::20]:443 (route 2); routes 1..=3 and sets 1..=3 at indexes 0..=2; endpoints
/// (1,0), (1,1), (2,0); set 3 is empty; two workloads; and the authorization tables of
/// [`add_sample_authz`].
pub(crate) fn sample() -> Snapshot {
    let mut b = SnapshotBuilder::new("node-a1", 7, mode::KERNEL_NATIVE);
    let v1 = b.backend_set(
        lb_policy::RANDOM,
        &[ep("10.244.1.11", 8080, 1), ep("10.244.1.12", 8080, 1)],
    );
    let v2 = b.backend_set(lb_policy::SOURCE_IP_HASH, &[ep("fd00:10:244::7", 9090, 2)]);
    let empty = b.backend_set(lb_policy::RANDOM, &[]);
    b.service(ip("10.96.0.10"), 80, &[(90, v1), (10, v2)]);
    b.service(ip("fd00:10:96::20"), 443, &[(1, v2)]);
    b.service(ip("10.96.0.30"), 8080, &[(5, empty)]);
    b.workload(ip("10.244.1.20"), 3);
    b.workload(ip("10.244.1.21"), 4);
    add_sample_authz(&mut b);
    add_sample_names(&mut b);
    b.build()
}

/// Names of two pods (10.244.1.20 and fd00::20, the second without a version) and of the service
/// 10.96.0.10:80 (service_id 1).
pub(crate) fn add_sample_names(b: &mut SnapshotBuilder) {
    let reviews = crate::WorkloadName {
        workload: "reviews-v1",
        namespace: "default",
        service_account: "bookinfo-reviews",
        app: "reviews",
        version: "v1",
    };
    b.workload_names(ip("10.244.1.20"), &reviews);
    let unversioned = crate::WorkloadName {
        version: "",
        ..reviews
    };
    b.workload_names(ip("fd00::20"), &unversioned);
    let service = crate::ServiceName {
        host: "reviews.default.svc.cluster.local",
        name: "reviews",
        namespace: "default",
    };
    b.service_names(1, &service);
}

/// The sample's authorization tables, every reason and both kinds of policy in them. After
/// sorting:
/// - workloads 0 = 10.244.1.20 (set 1), 1 = 10.244.1.21 (set 2), 2 = fd00:10:244::9 (set 1);
/// - sources 0 = 10.0.0.0/8 (class 2), 1 = 10.244.1.20/32 (class 1), 2 = fd00:10:244::7/128
///   (class 3);
/// - verdicts 0 = (1, 1, any) allow 5, 1 = (1, 1, 8080) allow 5, 2 = (1, 3, 9090) deny 9,
///   3 = (1, any, any) deny no-allow-matched, 4 = (1, any, 8080) deny strict 7,
///   5 = (2, 2, any) deny uncompilable 11, 6 = (2, any, any) allow no-allow-policy;
/// - policies 0 = 5 default/allow-frontend, 1 = 7 istio-system/default (PeerAuthentication),
///   2 = 9 default/deny-legacy, 3 = 11 legacy/broken.
pub(crate) fn add_sample_authz(b: &mut SnapshotBuilder) {
    use kmesh_common::authz::{
        ANY_CLASS as ANY, ANY_PORT, authz_action::*, authz_policy_kind::*, authz_reason::*,
    };
    b.authz_policy(9, AUTHORIZATION_POLICY, "default/deny-legacy");
    b.authz_policy(5, AUTHORIZATION_POLICY, "default/allow-frontend");
    b.authz_policy(7, PEER_AUTHENTICATION, "istio-system/default");
    b.authz_policy(11, AUTHORIZATION_POLICY, "legacy/broken");
    b.authz_workload(ip("fd00:10:244::9"), 1);
    b.authz_workload(ip("10.244.1.21"), 2);
    b.authz_workload(ip("10.244.1.20"), 1);
    b.authz_source(ip("10.244.1.20"), 32, 1);
    b.authz_source(ip("fd00:10:244::7"), 128, 3);
    b.authz_source(ip("10.0.0.0"), 8, 2);
    b.authz_verdict(1, ANY, ANY_PORT, DENY, NO_ALLOW_MATCHED, 0);
    b.authz_verdict(1, 1, ANY_PORT, ALLOW, ALLOW_MATCHED, 5);
    b.authz_verdict(1, ANY, 8080, DENY, STRICT_MTLS, 7);
    b.authz_verdict(1, 1, 8080, ALLOW, ALLOW_MATCHED, 5);
    b.authz_verdict(1, 3, 9090, DENY, DENY_MATCHED, 9);
    b.authz_verdict(2, ANY, ANY_PORT, ALLOW, NO_ALLOW_POLICY, 0);
    b.authz_verdict(2, 2, ANY_PORT, DENY, UNCOMPILABLE, 11);
}

/// Length of the sample's encoding.
const SAMPLE_LEN: usize = 2752;

pub(crate) fn decode(bytes: &[u8]) -> Result<Snapshot, DecodeError> {
    Snapshot::decode(bytes, &Limits::default()).map(|d| d.snapshot)
}

fn raw(s: &Snapshot, format: Format) -> Vec<u8> {
    encode_unchecked(s, format).expect("unchecked encoding")
}

/// The format 2 encoding of `s`: the framing tests below were written for it, and it is still read
/// (`format3_tests` has format 3's own).
pub(crate) fn v2(s: &Snapshot) -> Vec<u8> {
    s.encode_as(Format::V2).expect("format 2 encoding")
}

/// Recomputes `total_len` and the content hash after a test changed the bytes.
pub(crate) fn fix(bytes: &mut [u8]) {
    let len = bytes.len() as u64;
    bytes[OFF_TOTAL_LEN..OFF_TOTAL_LEN + 8].copy_from_slice(&len.to_le_bytes());
    // A header the decoder refuses before hashing (a test's point) keeps format 2's hash.
    let hash = crate::computed_content_hash(bytes)
        .unwrap_or_else(|_| content_hash(&bytes[FIXED_HEADER_LEN..]));
    bytes[OFF_CONTENT_HASH..OFF_CONTENT_HASH + 8].copy_from_slice(&hash.to_le_bytes());
}

/// Offsets of the thirteen section headers of a valid format 2 encoding, in wire order.
fn section_offsets(bytes: &[u8]) -> [usize; 13] {
    let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap()) as usize;
    let name_len = u16::from_le_bytes([bytes[40], bytes[41]]) as usize;
    let mut pos = (42 + name_len).next_multiple_of(8);
    let mut offsets = [0; 13];
    for offset in &mut offsets {
        *offset = pos;
        pos = (pos + 16 + u32_at(pos + 4) * u32_at(pos + 8)).next_multiple_of(8);
    }
    assert_eq!(pos, bytes.len());
    offsets
}

fn put_u32(bytes: &mut [u8], offset: usize, value: u32) {
    bytes[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
}

/// Asserts that both the encoder and the decoder refuse `s` with `expected`.
#[track_caller]
pub(crate) fn assert_invalid(s: Snapshot, expected: ValidationError) {
    assert_eq!(s.encode(), Err(EncodeError::Invalid(expected.clone())));
    assert_eq!(
        s.encode_as(Format::V2),
        Err(EncodeError::Invalid(expected.clone()))
    );
    for format in Format::ALL {
        assert_eq!(
            decode(&raw(&s, format)),
            Err(DecodeError::Invalid(expected.clone())),
            "{format:?}"
        );
    }
}

fn invalid_with(change: impl FnOnce(&mut Snapshot), expected: ValidationError) {
    let mut s = sample();
    change(&mut s);
    assert_invalid(s, expected);
}

// ---------------------------------------------------------------------------------------------
// Round trips and determinism

#[test]
fn round_trip() {
    let s = sample();
    let bytes = s.encode().unwrap();
    let decoded = Snapshot::decode(&bytes, &Limits::default()).unwrap();
    assert_eq!(decoded.snapshot, s);
    assert_eq!(decoded.format, Format::V4);
    // Format 4's hash: FNV-1a of the node part's FNV-1a hash and the cluster part's section
    // hashes (format4_tests spells those out).
    let cluster_offset = u64::from_le_bytes(bytes[40..48].try_into().unwrap()) as usize;
    let node_hash = content_hash(&bytes[FIXED_HEADER_LEN..cluster_offset]);
    let cluster_hash = decoded.cluster_hashes.unwrap().cluster_hash();
    let both = [node_hash.to_le_bytes(), cluster_hash.to_le_bytes()].concat();
    assert_eq!(decoded.content_hash, content_hash(&both));
    assert_eq!(decoded.snapshot.encode().unwrap(), bytes);
    assert_eq!(bytes.len() % 8, 0);
    // Format 3's, spelled out: FNV-1a of the two parts' FNV-1a hashes.
    let v3 = s.encode_as(Format::V3).unwrap();
    let cluster_hash = content_hash(&v3[cluster_offset..]);
    let both = [node_hash.to_le_bytes(), cluster_hash.to_le_bytes()].concat();
    assert_eq!(
        Snapshot::decode(&v3, &Limits::default())
            .unwrap()
            .content_hash,
        content_hash(&both)
    );
    assert_eq!(&v3[40..cluster_offset], &bytes[40..cluster_offset]);

    let header = peek_header(&bytes).unwrap();
    assert_eq!(header.format_version, 4);
    assert_eq!(header.layout_version, LAYOUT_VERSION);
    assert_eq!(header.generation, 7);
    assert_eq!(header.content_hash, decoded.content_hash);
    assert_eq!(header.total_len, bytes.len() as u64);
    assert_eq!(header.node_name, "node-a1");
}

#[test]
fn set_generation_gives_the_bytes_of_that_generation() {
    let s = sample();
    let mut bytes = s.encode().unwrap();
    let mut later = s.clone();
    later.generation = 1_795_760_368;
    set_generation(&mut bytes, later.generation).unwrap();
    assert_eq!(bytes, later.encode().unwrap());
    let decoded = Snapshot::decode(&bytes, &Limits::default()).unwrap();
    assert_eq!(decoded.snapshot, later);
}

#[test]
fn set_generation_refuses_what_is_not_a_snapshot_and_changes_nothing() {
    let mut short = sample().encode().unwrap()[..20].to_vec();
    let before = short.clone();
    assert!(matches!(
        set_generation(&mut short, 9),
        Err(DecodeError::TooShort { .. })
    ));
    assert_eq!(short, before);
    let mut other = b"GIF89a and then some more bytes than a header takes up".to_vec();
    let before = other.clone();
    assert!(matches!(
        set_generation(&mut other, 9),
        Err(DecodeError::BadMagic { .. })
    ));
    assert_eq!(other, before);
}

#[test]
fn round_trip_of_an_empty_snapshot() {
    let s = SnapshotBuilder::new("n", 0, mode::DISABLED).build();
    let bytes = s.encode().unwrap();
    // 40 fixed + 8 cluster_offset + 2 + 1 name + 5 padding, NodeConfig section 16 + 8, twelve
    // empty sections of 16 (format 2 has no cluster_offset).
    assert_eq!(bytes.len(), 56 + 24 + 12 * 16);
    assert_eq!(decode(&bytes).unwrap(), s);
    let bytes = v2(&s);
    assert_eq!(bytes.len(), 48 + 24 + 12 * 16);
    assert_eq!(decode(&bytes).unwrap(), s);
}

#[test]
fn encoding_is_deterministic_and_independent_of_insertion_order() {
    let s = sample();
    let bytes = s.encode().unwrap();
    assert_eq!(s.encode().unwrap(), bytes);
    assert_eq!(sample().encode().unwrap(), bytes);

    let mut shuffled = s.clone();
    shuffled.services.reverse();
    shuffled.routes.rotate_left(1);
    shuffled.backend_sets.reverse();
    shuffled.endpoints.reverse();
    shuffled.workloads.reverse();
    shuffled.authz.workloads.reverse();
    shuffled.authz.sources.rotate_left(1);
    shuffled.authz.verdicts.reverse();
    shuffled.authz.policies.rotate_left(2);
    assert_ne!(shuffled, s);
    shuffled.sort();
    assert_eq!(shuffled.encode().unwrap(), bytes);
}

#[test]
fn hash_is_stable() {
    // Guards against accidental format changes: update deliberately with a format or layout bump.
    let bytes = v2(&sample());
    assert_eq!(bytes.len(), SAMPLE_LEN);
    assert_eq!(
        peek_header(&bytes).unwrap().content_hash,
        content_hash(&bytes[40..])
    );
    assert_eq!(content_hash(&bytes[40..]), 0x3ae1_ae0f_7349_e55b);
    // Format 3: the same sections in two parts and 8 bytes more of header.
    let bytes = sample().encode_as(Format::V3).unwrap();
    assert_eq!(bytes.len(), SAMPLE_LEN + 8);
    assert_eq!(
        peek_header(&bytes).unwrap().content_hash,
        0x1e21_1c3b_6a29_3fca
    );
    // Format 4: format 3's bytes, the cluster part hashed by sections.
    let bytes = sample().encode().unwrap();
    assert_eq!(bytes.len(), SAMPLE_LEN + 8);
    assert_eq!(
        peek_header(&bytes).unwrap().content_hash,
        0x83c8_acd3_8d2d_7a60
    );
}

#[test]
fn encode_does_not_sort() {
    let mut s = sample();
    s.services.swap(0, 1);
    assert!(matches!(
        s.encode(),
        Err(EncodeError::Invalid(ValidationError::OutOfOrder {
            table: Table::Services,
            index: 1,
            ..
        }))
    ));
}

#[test]
fn builder_layout() {
    let s = sample();
    assert_eq!(s.node_name, "node-a1");
    assert_eq!(s.config.mode, mode::KERNEL_NATIVE);
    let route = &s.routes[0].value;
    assert_eq!(s.routes[0].route_id, 1);
    assert_eq!(route.destination_count, 2);
    assert_eq!(route.total_weight, 100);
    assert_eq!(&route.cumulative_weight[..3], &[90, 100, 0]);
    assert_eq!(&route.backend_set[..3], &[1, 2, 0]);
    assert_eq!(s.services[0].value.route_id, 1);
    assert_eq!(s.services[2].value.route_id, 2);
    assert_eq!(s.backend_sets[2].value.endpoint_count, 0);
    assert_eq!(
        s.endpoints[2].key,
        EndpointKey {
            set_id: 2,
            index: 0
        }
    );
    assert_eq!(
        kmesh_common::as_ipv4(&s.workloads[0].ip),
        Some([10, 244, 1, 20])
    );

    // Zero weights are left out, as the compiler does.
    let mut b = SnapshotBuilder::new("n", 1, mode::KERNEL_NATIVE);
    let a = b.backend_set(lb_policy::RANDOM, &[]);
    let c = b.backend_set(lb_policy::RANDOM, &[]);
    b.service(ip("10.96.0.1"), 80, &[(0, a), (3, c)]);
    let s = b.build();
    assert_eq!(s.routes[0].value.destination_count, 1);
    assert_eq!(s.routes[0].value.backend_set[0], c);
    s.encode().unwrap();
}

// ---------------------------------------------------------------------------------------------
// Header

#[test]
fn bad_magic() {
    let mut bytes = sample().encode().unwrap();
    bytes[0] = b'X';
    assert!(matches!(decode(&bytes), Err(DecodeError::BadMagic { found }) if found[0] == b'X'));
    assert!(matches!(
        peek_header(&bytes),
        Err(DecodeError::BadMagic { .. })
    ));
    // Short inputs of another kind are named as such too.
    assert_eq!(
        decode(b"{}"),
        Err(DecodeError::BadMagic {
            found: b"{}".to_vec()
        })
    );
}

#[test]
fn truncation_at_every_length() {
    let bytes = v2(&sample());
    for len in 0..bytes.len() {
        let expected = if len < FIXED_HEADER_LEN {
            DecodeError::TooShort {
                len: len as u64,
                min: 40,
            }
        } else {
            DecodeError::Truncated {
                expected: bytes.len() as u64,
                got: len as u64,
            }
        };
        assert_eq!(decode(&bytes[..len]), Err(expected), "length {len}");
    }
    let err = decode(&bytes[..100]).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("truncated: header says {SAMPLE_LEN} bytes, got 100")
    );
}

#[test]
fn trailing_bytes() {
    let mut bytes = v2(&sample());
    bytes.push(0);
    assert_eq!(
        decode(&bytes),
        Err(DecodeError::TrailingBytes {
            expected: SAMPLE_LEN as u64,
            got: SAMPLE_LEN as u64 + 1
        })
    );
}

#[test]
fn every_flipped_content_byte_is_a_hash_mismatch() {
    let bytes = v2(&sample());
    let header_hash = peek_header(&bytes).unwrap().content_hash;
    for i in FIXED_HEADER_LEN..bytes.len() {
        let mut corrupt = bytes.clone();
        corrupt[i] ^= 0x01;
        let computed = content_hash(&corrupt[FIXED_HEADER_LEN..]);
        assert_eq!(
            decode(&corrupt),
            Err(DecodeError::HashMismatch {
                header: header_hash,
                computed
            }),
            "byte {i}"
        );
    }
    let mut corrupt = bytes.clone();
    corrupt[100] ^= 0x80;
    let message = decode(&corrupt).unwrap_err().to_string();
    assert!(
        message.starts_with(&format!(
            "content hash mismatch: header {header_hash:#018x}, computed 0x"
        )),
        "{message}"
    );
}

#[test]
fn every_flipped_header_byte_is_refused_or_is_the_generation() {
    let bytes = v2(&sample());
    for i in 0..FIXED_HEADER_LEN {
        let mut corrupt = bytes.clone();
        corrupt[i] ^= 0x01;
        let result = decode(&corrupt);
        match i {
            0..8 => assert!(matches!(result, Err(DecodeError::BadMagic { .. }))),
            // Format 2's bit 0 flipped reads as format 3, whose cluster_offset (the node name
            // length and the name's first bytes here) is no offset of a part.
            8 => assert!(matches!(result, Err(DecodeError::ClusterOffset { .. }))),
            9 => assert!(matches!(
                result,
                Err(DecodeError::UnsupportedFormatVersion { .. })
            )),
            10..12 => assert!(matches!(
                result,
                Err(DecodeError::LayoutVersionMismatch { .. })
            )),
            12..16 => assert!(matches!(result, Err(DecodeError::HeaderFlags { .. }))),
            // The hash covers offset 40 onwards (it identifies content, not generation): a changed
            // generation decodes, as the wire format specifies.
            16..24 => assert_ne!(result.unwrap().generation, 7),
            24..32 => assert!(matches!(result, Err(DecodeError::HashMismatch { .. }))),
            _ => assert!(matches!(
                result,
                Err(DecodeError::Truncated { .. } | DecodeError::TrailingBytes { .. })
            )),
        }
    }
}

#[test]
fn versions_and_flags() {
    let bytes = v2(&sample());
    let mut v = bytes.clone();
    v[8..10].copy_from_slice(&5u16.to_le_bytes());
    assert_eq!(
        decode(&v),
        Err(DecodeError::UnsupportedFormatVersion { found: 5 })
    );
    assert!(peek_header(&v).is_err());

    let mut v = bytes.clone();
    v[10..12].copy_from_slice(&(LAYOUT_VERSION + 1).to_le_bytes());
    assert_eq!(
        decode(&v),
        Err(DecodeError::LayoutVersionMismatch {
            found: LAYOUT_VERSION + 1,
            expected: LAYOUT_VERSION
        })
    );
    // peek_header reports the layout version for the caller to judge.
    assert_eq!(peek_header(&v).unwrap().layout_version, LAYOUT_VERSION + 1);

    let mut v = bytes.clone();
    v[12..16].copy_from_slice(&4u32.to_le_bytes());
    assert_eq!(decode(&v), Err(DecodeError::HeaderFlags { flags: 4 }));
}

#[test]
fn max_bytes_is_checked_before_anything_else() {
    let mut bytes = v2(&sample());
    let limits = Limits {
        max_bytes: SAMPLE_LEN as u64 - 1,
        ..Limits::default()
    };
    let expected = Err(DecodeError::TooLarge {
        len: SAMPLE_LEN as u64,
        max: SAMPLE_LEN as u64 - 1,
    });
    assert_eq!(Snapshot::decode(&bytes, &limits).map(|_| ()), expected);
    // Even with a wrong hash and a wrong magic: no other check runs first.
    bytes[0] ^= 1;
    bytes[500] ^= 1;
    assert_eq!(Snapshot::decode(&bytes, &limits).map(|_| ()), expected);
    let exact = Limits {
        max_bytes: SAMPLE_LEN as u64,
        ..Limits::default()
    };
    assert!(Snapshot::decode(&v2(&sample()), &exact).is_ok());
}

#[test]
fn peek_header_reads_only_the_header() {
    let bytes = v2(&sample());
    // The header and name end at offset 56; sections are not needed, nor checked.
    let header = peek_header(&bytes[..56]).unwrap();
    assert_eq!(header.total_len, SAMPLE_LEN as u64);
    assert_eq!(header.node_name, "node-a1");
    assert!(matches!(
        peek_header(&bytes[..50]),
        Err(DecodeError::Overrun { .. })
    ));
    assert!(matches!(
        peek_header(&bytes[..20]),
        Err(DecodeError::TooShort { len: 20, min: 40 })
    ));
}

// ---------------------------------------------------------------------------------------------
// Node name

fn name_error(name: &str, reason: &'static str) {
    let mut s = sample();
    s.node_name = name.to_owned();
    assert_invalid(
        s,
        ValidationError::InvalidNodeName {
            name: name.to_owned(),
            reason,
        },
    );
}

#[test]
fn node_name_rules() {
    name_error("", "is empty");
    let long = "a".repeat(254);
    let mut s = sample();
    s.node_name = long.clone();
    assert!(matches!(
        s.encode(),
        Err(EncodeError::Invalid(ValidationError::InvalidNodeName {
            reason: "is longer than 253 bytes",
            ..
        }))
    ));
    assert!(matches!(
        decode(&raw(&s, Format::V3)),
        Err(DecodeError::Invalid(ValidationError::InvalidNodeName {
            reason: "is longer than 253 bytes",
            ..
        }))
    ));
    const CHARS: &str = "contains a character other than a-z, 0-9, '-' and '.'";
    name_error("Node-1", CHARS);
    name_error("node_1", CHARS);
    name_error("node 1", CHARS);
    name_error("nöde", CHARS);
    name_error("-node", "has a label that starts or ends with '-'");
    name_error("node-", "has a label that starts or ends with '-'");
    name_error("a.-b", "has a label that starts or ends with '-'");
    const EMPTY: &str = "has an empty label (leading, trailing or repeated '.')";
    name_error(".node", EMPTY);
    name_error("node.", EMPTY);
    name_error("a..b", EMPTY);

    for good in [
        "a",
        "0",
        "node-1",
        "ip-10-0-0-1.ec2.internal",
        &"a".repeat(253),
    ] {
        let mut s = sample();
        s.node_name = good.to_owned();
        let bytes = s.encode().unwrap();
        assert_eq!(decode(&bytes).unwrap().node_name, good);
    }
    let message = ValidationError::InvalidNodeName {
        name: "Node".into(),
        reason: CHARS,
    }
    .to_string();
    assert_eq!(
        message,
        "node name \"Node\" contains a character other than a-z, 0-9, '-' and '.'"
    );
}

#[test]
fn node_name_that_is_not_utf8() {
    let mut bytes = v2(&sample());
    bytes[43] = 0xff;
    fix(&mut bytes);
    assert!(matches!(
        decode(&bytes),
        Err(DecodeError::Invalid(ValidationError::InvalidNodeName { reason, .. }))
            if reason.starts_with("contains a character")
    ));
}

#[test]
fn node_name_longer_than_the_input() {
    let mut bytes = v2(&sample());
    bytes[40..42].copy_from_slice(&60_000u16.to_le_bytes());
    fix(&mut bytes);
    assert_eq!(
        decode(&bytes),
        Err(DecodeError::Overrun {
            what: "node name".into(),
            offset: 42,
            needed: 60_000,
            remaining: SAMPLE_LEN as u64 - 42
        })
    );
}

#[test]
fn node_name_padding_must_be_zero() {
    let mut bytes = v2(&sample());
    bytes[42 + 7] = 1; // "node-a1" ends at 49; 49..56 is padding
    fix(&mut bytes);
    assert_eq!(
        decode(&bytes),
        Err(DecodeError::NonZeroPadding {
            what: "node name".into(),
            offset: 49
        })
    );
}

// ---------------------------------------------------------------------------------------------
// Section framing

#[test]
fn sections_must_come_in_order() {
    let bytes = v2(&sample());
    let offsets = section_offsets(&bytes);
    for (i, table) in Table::ALL.iter().enumerate() {
        // The kind of the next section (of the first for the last): a section out of place.
        let found = table.kind() % 13 + 1;
        let mut b = bytes.clone();
        put_u32(&mut b, offsets[i], found);
        fix(&mut b);
        assert_eq!(
            decode(&b),
            Err(DecodeError::SectionKind {
                offset: offsets[i] as u64,
                found,
                expected: table.kind(),
                table: *table
            })
        );
    }
}

#[test]
fn record_size_must_match() {
    let bytes = v2(&sample());
    let offsets = section_offsets(&bytes);
    let sizes = [8, 32, 140, 12, 32, 24, 24, 24, 20, 328, 8, 36, 16];
    for (i, table) in Table::ALL.iter().enumerate() {
        let mut b = bytes.clone();
        put_u32(&mut b, offsets[i] + 4, sizes[i] + 1);
        fix(&mut b);
        assert_eq!(
            decode(&b),
            Err(DecodeError::RecordSize {
                table: *table,
                found: sizes[i] + 1,
                expected: sizes[i]
            })
        );
    }
}

#[test]
fn section_reserved_must_be_zero() {
    let mut bytes = v2(&sample());
    let offsets = section_offsets(&bytes);
    put_u32(&mut bytes, offsets[3] + 12, 0x10);
    fix(&mut bytes);
    assert_eq!(
        decode(&bytes),
        Err(DecodeError::SectionReserved {
            table: Table::BackendSets,
            value: 0x10
        })
    );
}

#[test]
fn section_padding_must_be_zero() {
    let mut bytes = v2(&sample());
    let offsets = section_offsets(&bytes);
    // Routes: 16 + 3 * 140 = 436 bytes, then 4 bytes of padding.
    let padding = offsets[2] + 436;
    assert_eq!(offsets[3], padding + 4);
    bytes[padding + 3] = 0xaa;
    fix(&mut bytes);
    assert_eq!(
        decode(&bytes),
        Err(DecodeError::NonZeroPadding {
            what: "routes section".into(),
            offset: padding as u64
        })
    );
}

#[test]
fn record_count_beyond_the_input_does_not_allocate() {
    let mut bytes = v2(&sample());
    let offsets = section_offsets(&bytes);
    put_u32(&mut bytes, offsets[4] + 8, u32::MAX);
    fix(&mut bytes);
    let records = offsets[4] + 16;
    // Unlimited: the count is checked against the bytes present before anything is allocated.
    assert_eq!(
        Snapshot::decode(&bytes, &Limits::UNLIMITED).map(|_| ()),
        Err(DecodeError::SectionOverrun {
            table: Table::Endpoints,
            count: u32::MAX,
            record_size: 32,
            offset: records as u64,
            needed: u64::from(u32::MAX) * 32,
            remaining: (bytes.len() - records) as u64
        })
    );
    // With node limits the capacity check fires first.
    assert_eq!(
        decode(&bytes),
        Err(DecodeError::OverCapacity {
            table: Table::Endpoints,
            count: u32::MAX,
            capacity: 1_000_000
        })
    );
}

#[test]
fn missing_section() {
    let bytes = v2(&sample());
    let offsets = section_offsets(&bytes);
    // Cut before a section of each group: the workloads, and the last (authorization policies).
    for (section, what) in [
        (5, "workloads section header"),
        (9, "authorization policies section header"),
    ] {
        let mut b = bytes[..offsets[section]].to_vec();
        fix(&mut b);
        assert_eq!(
            decode(&b),
            Err(DecodeError::Overrun {
                what: what.into(),
                offset: offsets[section] as u64,
                needed: 16,
                remaining: 0
            })
        );
    }
}

#[test]
fn data_after_the_last_section() {
    let bytes = v2(&sample());
    let offsets = section_offsets(&bytes);
    // A repeated service names section is data after the last section.
    let mut b = bytes.clone();
    b.extend_from_slice(&bytes[offsets[12]..]);
    fix(&mut b);
    assert_eq!(
        decode(&b),
        Err(DecodeError::TrailingData {
            offset: SAMPLE_LEN as u64,
            len: (SAMPLE_LEN - offsets[12]) as u64
        })
    );
}

#[test]
fn node_config_needs_exactly_one_record() {
    let bytes = v2(&sample());
    let offsets = section_offsets(&bytes);
    let config = offsets[0];
    // No record: count 0 and the 8 record bytes removed.
    let mut none = bytes[..config + 16].to_vec();
    none.extend_from_slice(&bytes[config + 24..]);
    put_u32(&mut none, config + 8, 0);
    fix(&mut none);
    assert_eq!(
        decode(&none),
        Err(DecodeError::NodeConfigCount { count: 0 })
    );
    // Two records.
    let mut two = bytes[..config + 24].to_vec();
    two.extend_from_slice(&bytes[config + 16..]);
    put_u32(&mut two, config + 8, 2);
    fix(&mut two);
    assert_eq!(decode(&two), Err(DecodeError::NodeConfigCount { count: 2 }));
    assert_eq!(
        DecodeError::NodeConfigCount { count: 2 }.to_string(),
        "node config section holds 2 records, exactly 1 is required"
    );
}

// ---------------------------------------------------------------------------------------------
// Limits

#[test]
fn over_capacity() {
    let s = sample();
    let bytes = s.encode().unwrap();
    let counts = [
        (Table::Services, 3u32),
        (Table::Routes, 3),
        (Table::BackendSets, 3),
        (Table::Endpoints, 3),
        (Table::Workloads, 2),
        (Table::AuthzWorkloads, 3),
        (Table::AuthzSources, 3),
        (Table::AuthzVerdicts, 7),
        (Table::AuthzPolicies, 4),
        (Table::WorkloadNames, 2),
        (Table::ServiceNames, 1),
    ];
    for (table, count) in counts {
        let limit = |n: u32| {
            let mut l = Limits::default();
            match table {
                Table::Services => l.max_services = n,
                Table::Routes => l.max_routes = n,
                Table::BackendSets => l.max_backend_sets = n,
                Table::Endpoints => l.max_endpoints = n,
                Table::Workloads => l.max_workloads = n,
                Table::AuthzWorkloads => l.max_authz_workloads = n,
                Table::AuthzSources => l.max_authz_sources = n,
                Table::AuthzVerdicts => l.max_authz_verdicts = n,
                Table::AuthzPolicies => l.max_authz_policies = n,
                Table::WorkloadNames => l.max_workload_names = n,
                Table::ServiceNames => l.max_service_names = n,
                Table::NodeConfig | Table::NameStrings => unreachable!(),
            }
            l
        };
        assert!(Snapshot::decode(&bytes, &limit(count)).is_ok());
        assert_eq!(
            Snapshot::decode(&bytes, &limit(count - 1)).map(|_| ()),
            Err(DecodeError::OverCapacity {
                table,
                count,
                capacity: count - 1
            })
        );
    }
    assert_eq!(
        DecodeError::OverCapacity {
            table: Table::Services,
            count: 120_000,
            capacity: 100_000
        }
        .to_string(),
        "services section holds 120000 records, capacity is 100000"
    );
}

#[test]
fn default_limits() {
    let l = Limits::default();
    assert_eq!(l.max_bytes, 256 << 20);
    assert_eq!(
        (
            l.max_services,
            l.max_routes,
            l.max_backend_sets,
            l.max_endpoints,
            l.max_workloads
        ),
        (100_000, 100_000, 200_000, 1_000_000, 16_384)
    );
    assert_eq!(
        (
            l.max_authz_workloads,
            l.max_authz_sources,
            l.max_authz_verdicts,
            l.max_authz_policies
        ),
        (65_536, 1_000_000, 4_000_000, 100_000)
    );
    assert_eq!(Limits::UNLIMITED.max_bytes, u64::MAX);
    assert_eq!(Limits::UNLIMITED.max_endpoints, u32::MAX);
}

// ---------------------------------------------------------------------------------------------
// Node config

#[test]
fn node_config_mode() {
    invalid_with(
        |s| s.config.mode = 3,
        ValidationError::UnknownMode { mode: 3 },
    );
    for m in [mode::DISABLED, mode::KERNEL_NATIVE, mode::DUAL_ENGINE] {
        let mut s = sample();
        s.config.mode = m;
        assert_eq!(decode(&s.encode().unwrap()).unwrap().config.mode, m);
    }
}

#[test]
fn node_config_agent_settings() {
    invalid_with(
        |s| s.config.access_log = 2,
        ValidationError::UnknownAccessLog { access_log: 2 },
    );
    for bad in [0, 6, u8::MAX] {
        invalid_with(
            |s| s.config.log_level = bad,
            ValidationError::UnknownLogLevel { log_level: bad },
        );
    }
    invalid_with(
        |s| s.config.reserved = [0, 1],
        ValidationError::NodeConfigReserved { reserved: [0, 1] },
    );
    // Every valid combination survives the round trip, field by field.
    for access_log in [access_log::OFF, access_log::ON] {
        for log_level in log_level::ERROR..=log_level::TRACE {
            let mut s = sample();
            s.config.access_log = access_log;
            s.config.log_level = log_level;
            let config = decode(&s.encode().unwrap()).unwrap().config;
            assert_eq!(
                (config.access_log, config.log_level),
                (access_log, log_level)
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Services

#[test]
fn services_unique() {
    invalid_with(
        |s| s.services[1].key = s.services[0].key,
        ValidationError::DuplicateKey {
            table: Table::Services,
            index: 1,
            record: "10.96.0.10:80/6".into(),
        },
    );
}

#[test]
fn services_sorted() {
    invalid_with(
        |s| s.services.swap(0, 1),
        ValidationError::OutOfOrder {
            table: Table::Services,
            index: 1,
            record: "10.96.0.10:80/6".into(),
            previous: "10.96.0.30:8080/6".into(),
        },
    );
}

#[test]
fn services_tcp_only() {
    invalid_with(
        |s| s.services[0].key.protocol = 17,
        ValidationError::ServiceProtocol {
            index: 0,
            record: "10.96.0.10:80/17".into(),
            protocol: 17,
        },
    );
}

#[test]
fn services_pad() {
    invalid_with(
        |s| s.services[0].key.pad = 1,
        ValidationError::NonZeroPad {
            table: Table::Services,
            index: 0,
            record: "10.96.0.10:80/6".into(),
            field: "pad",
            value: 1,
        },
    );
}

#[test]
fn services_flags_only_known_bits() {
    let expected = ValidationError::UnknownServiceFlags {
        index: 0,
        record: "10.96.0.10:80/6".into(),
        flags: 0x5,
    };
    assert_eq!(
        expected.to_string(),
        "service 0 (10.96.0.10:80/6): flags are 0x5, unknown bits 0x4 (known: 0x1 waypoint)"
    );
    invalid_with(|s| s.services[0].value.flags = 0x5, expected);
    invalid_with(
        |s| s.services[0].value.flags = 1 << 31,
        ValidationError::UnknownServiceFlags {
            index: 0,
            record: "10.96.0.10:80/6".into(),
            flags: 1 << 31,
        },
    );
}

#[test]
fn a_waypoint_service_round_trips() {
    let mut s = sample();
    s.services[0].value.flags = kmesh_common::service_flags::WAYPOINT;
    let decoded = Snapshot::decode(&s.encode().unwrap(), &Limits::default()).unwrap();
    assert_eq!(decoded.snapshot, s);
}

#[test]
fn services_port() {
    invalid_with(
        |s| s.services[0].key.port = 0,
        ValidationError::ZeroPort {
            table: Table::Services,
            index: 0,
            record: "10.96.0.10:0/6".into(),
        },
    );
}

#[test]
fn services_route_exists() {
    let expected = ValidationError::ServiceRouteMissing {
        index: 2,
        record: "[fd00:10:96::20]:443/6".into(),
        route_id: 42,
    };
    assert_eq!(
        expected.to_string(),
        "service 2 ([fd00:10:96::20]:443/6): route_id 42 references a route which does not exist"
    );
    invalid_with(|s| s.services[2].value.route_id = 42, expected);
}

// ---------------------------------------------------------------------------------------------
// Routes

#[test]
fn routes_unique_and_sorted() {
    invalid_with(
        |s| s.routes[1].route_id = 1,
        ValidationError::DuplicateKey {
            table: Table::Routes,
            index: 1,
            record: "route_id 1".into(),
        },
    );
    invalid_with(
        |s| s.routes.swap(0, 1),
        ValidationError::OutOfOrder {
            table: Table::Routes,
            index: 1,
            record: "route_id 1".into(),
            previous: "route_id 2".into(),
        },
    );
}

#[test]
fn routes_destination_count() {
    for count in [0, MAX_ROUTE_DESTINATIONS as u32 + 1, u32::MAX] {
        invalid_with(
            |s| s.routes[0].value.destination_count = count,
            ValidationError::RouteDestinationCount {
                index: 0,
                route_id: 1,
                count,
            },
        );
    }
    // The full 16 destinations are allowed.
    let mut b = SnapshotBuilder::new("n", 1, mode::KERNEL_NATIVE);
    let set = b.backend_set(lb_policy::RANDOM, &[]);
    b.service(ip("10.96.0.1"), 80, &[(1, set); MAX_ROUTE_DESTINATIONS]);
    let s = b.build();
    assert_eq!(decode(&s.encode().unwrap()).unwrap(), s);
}

#[test]
fn routes_weights_positive() {
    invalid_with(
        |s| s.routes[0].value.cumulative_weight[0] = 0,
        ValidationError::RouteWeightNotIncreasing {
            index: 0,
            route_id: 1,
            destination: 0,
            weight: 0,
            previous: 0,
        },
    );
    invalid_with(
        |s| s.routes[0].value.cumulative_weight[1] = 90,
        ValidationError::RouteWeightNotIncreasing {
            index: 0,
            route_id: 1,
            destination: 1,
            weight: 90,
            previous: 90,
        },
    );
}

#[test]
fn routes_total_weight() {
    invalid_with(
        |s| s.routes[0].value.total_weight = 99,
        ValidationError::RouteTotalWeight {
            index: 0,
            route_id: 1,
            total_weight: 99,
            last: 100,
        },
    );
}

#[test]
fn routes_unused_slots_zero() {
    invalid_with(
        |s| s.routes[0].value.cumulative_weight[5] = 3,
        ValidationError::RouteUnusedSlot {
            index: 0,
            route_id: 1,
            field: "cumulative_weight",
            slot: 5,
            value: 3,
            count: 2,
        },
    );
    invalid_with(
        |s| s.routes[1].value.backend_set[MAX_ROUTE_DESTINATIONS - 1] = 1,
        ValidationError::RouteUnusedSlot {
            index: 1,
            route_id: 2,
            field: "backend_set",
            slot: MAX_ROUTE_DESTINATIONS - 1,
            value: 1,
            count: 1,
        },
    );
}

#[test]
fn routes_backend_sets_exist() {
    let expected = ValidationError::RouteBackendSetMissing {
        index: 0,
        route_id: 1,
        destination: 1,
        set_id: 99,
    };
    assert_eq!(
        expected.to_string(),
        "route 0 (route_id 1): destination 1 references backend set 99 which does not exist"
    );
    invalid_with(|s| s.routes[0].value.backend_set[1] = 99, expected);
}

// ---------------------------------------------------------------------------------------------
// Backend sets

#[test]
fn backend_sets_unique_and_sorted() {
    invalid_with(
        |s| s.backend_sets[1].set_id = 1,
        ValidationError::DuplicateKey {
            table: Table::BackendSets,
            index: 1,
            record: "set_id 1".into(),
        },
    );
    invalid_with(
        |s| s.backend_sets.swap(1, 2),
        ValidationError::OutOfOrder {
            table: Table::BackendSets,
            index: 2,
            record: "set_id 2".into(),
            previous: "set_id 3".into(),
        },
    );
}

#[test]
fn backend_sets_lb_policy() {
    invalid_with(
        |s| s.backend_sets[1].value.lb_policy = lb_policy::COUNT,
        ValidationError::UnknownLbPolicy {
            index: 1,
            set_id: 2,
            lb_policy: lb_policy::COUNT,
        },
    );
}

// ---------------------------------------------------------------------------------------------
// Endpoints

fn endpoint(set_id: u32, index: u32) -> EndpointRecord {
    EndpointRecord {
        key: EndpointKey { set_id, index },
        value: EndpointValue {
            ip: kmesh_common::ipv4_mapped([10, 244, 9, 9]),
            port: 8080,
            pad: 0,
            identity: 1,
        },
    }
}

#[test]
fn endpoints_unique_and_sorted() {
    invalid_with(
        |s| s.endpoints[1].key = s.endpoints[0].key,
        ValidationError::DuplicateKey {
            table: Table::Endpoints,
            index: 1,
            record: "set 1, index 0".into(),
        },
    );
    invalid_with(
        |s| s.endpoints.swap(0, 1),
        ValidationError::OutOfOrder {
            table: Table::Endpoints,
            index: 1,
            record: "set 1, index 0".into(),
            previous: "set 1, index 1".into(),
        },
    );
}

#[test]
fn endpoints_port_and_pad() {
    invalid_with(
        |s| s.endpoints[2].value.port = 0,
        ValidationError::ZeroPort {
            table: Table::Endpoints,
            index: 2,
            record: "set 2, index 0".into(),
        },
    );
    invalid_with(
        |s| s.endpoints[2].value.pad = 7,
        ValidationError::NonZeroPad {
            table: Table::Endpoints,
            index: 2,
            record: "set 2, index 0".into(),
            field: "pad",
            value: 7,
        },
    );
}

#[test]
fn endpoints_set_exists() {
    // Before the first set, between sets and after the last set.
    invalid_with(
        |s| s.endpoints.insert(0, endpoint(0, 0)),
        ValidationError::EndpointSetMissing {
            index: 0,
            set_id: 0,
            endpoint_index: 0,
        },
    );
    invalid_with(
        |s| {
            s.backend_sets[2].set_id = 5;
            s.routes[2].value.backend_set[0] = 5;
            s.endpoints.push(endpoint(4, 0));
        },
        ValidationError::EndpointSetMissing {
            index: 3,
            set_id: 4,
            endpoint_index: 0,
        },
    );
    invalid_with(
        |s| s.endpoints.push(endpoint(9, 0)),
        ValidationError::EndpointSetMissing {
            index: 3,
            set_id: 9,
            endpoint_index: 0,
        },
    );
}

#[test]
fn endpoints_cover_the_set_exactly() {
    // Fewer endpoints than endpoint_count.
    invalid_with(
        |s| s.backend_sets[0].value.endpoint_count = 3,
        ValidationError::EndpointMissing {
            index: 0,
            set_id: 1,
            endpoint_count: 3,
            missing: 2,
        },
    );
    // A gap.
    invalid_with(
        |s| s.endpoints[1].key.index = 2,
        ValidationError::EndpointMissing {
            index: 0,
            set_id: 1,
            endpoint_count: 2,
            missing: 1,
        },
    );
    // Extras beyond endpoint_count.
    invalid_with(
        |s| s.backend_sets[0].value.endpoint_count = 1,
        ValidationError::EndpointBeyondCount {
            index: 1,
            set_id: 1,
            endpoint_index: 1,
            endpoint_count: 1,
        },
    );
    // An empty set has no endpoints.
    invalid_with(
        |s| s.endpoints.push(endpoint(3, 0)),
        ValidationError::EndpointBeyondCount {
            index: 3,
            set_id: 3,
            endpoint_index: 0,
            endpoint_count: 0,
        },
    );
    // A huge endpoint_count fails fast at the first missing index.
    invalid_with(
        |s| s.backend_sets[2].value.endpoint_count = u32::MAX,
        ValidationError::EndpointMissing {
            index: 2,
            set_id: 3,
            endpoint_count: u32::MAX,
            missing: 0,
        },
    );
}

// ---------------------------------------------------------------------------------------------
// Workloads

#[test]
fn workloads_unique_sorted_and_pad() {
    invalid_with(
        |s| s.workloads[1].ip = s.workloads[0].ip,
        ValidationError::DuplicateKey {
            table: Table::Workloads,
            index: 1,
            record: "10.244.1.20".into(),
        },
    );
    invalid_with(
        |s| s.workloads.swap(0, 1),
        ValidationError::OutOfOrder {
            table: Table::Workloads,
            index: 1,
            record: "10.244.1.20".into(),
            previous: "10.244.1.21".into(),
        },
    );
    invalid_with(
        |s| s.workloads[0].pad = 1,
        ValidationError::NonZeroPad {
            table: Table::Workloads,
            index: 0,
            record: "10.244.1.20".into(),
            field: "pad",
            value: 1,
        },
    );
}

// ---------------------------------------------------------------------------------------------
// Generated snapshots

#[test]
fn generated_snapshot_is_valid_and_deterministic() {
    let s = generate("node-1", 3, 1_000, 10);
    assert_eq!(s.services.len(), 1_000);
    assert_eq!(s.routes.len(), 1_000);
    assert_eq!(s.backend_sets.len(), 1_000);
    assert_eq!(s.endpoints.len(), 10_000);
    assert_eq!(s.workloads.len(), 100);
    assert_eq!(
        kmesh_common::as_ipv4(&s.services[0].key.ip),
        Some([10, 96, 0, 1])
    );
    assert_eq!(
        kmesh_common::as_ipv4(&s.endpoints[0].value.ip),
        Some([10, 244, 0, 1])
    );
    assert_eq!(s.endpoints[0].value.port, 8080);
    let bytes = s.encode().unwrap();
    assert_eq!(generate("node-1", 3, 1_000, 10).encode().unwrap(), bytes);
    assert_eq!(decode(&bytes).unwrap(), s);
    // Zero endpoints per service: every set is empty, still valid.
    generate("node-1", 3, 10, 0).encode().unwrap();
}

#[test]
fn generated_authz_tables_are_valid_and_deterministic() {
    use crate::builder::generate_authz;
    let s = generate_authz("node-1", 2, 10, 20, 30, 5);
    let a = &s.authz;
    // 10 workloads share 3 sets; each set gets its default and 9 class entries.
    assert_eq!(
        (
            a.workloads.len(),
            a.sources.len(),
            a.verdicts.len(),
            a.policies.len()
        ),
        (10, 20, 30, 5)
    );
    assert_eq!(a.workloads[9].value.policy_set, 3);
    let bytes = s.encode().unwrap();
    assert_eq!(
        generate_authz("node-1", 2, 10, 20, 30, 5).encode().unwrap(),
        bytes
    );
    assert_eq!(decode(&bytes).unwrap(), s);
    // No workload: no tables at all (which is what a valid snapshot needs).
    assert_eq!(
        generate_authz("node-1", 2, 0, 20, 30, 5).authz,
        Default::default()
    );
}

#[test]
fn generated_100k_services_decode() {
    // 100,000 services with 10 endpoints each is 1,000,000 endpoints, exactly the default limit.
    // Unoptimized hashing of its 50 MB takes seconds, so debug builds check 10,000 services;
    // `cargo test --release` checks the full size.
    let services = if cfg!(debug_assertions) {
        10_000
    } else {
        100_000
    };
    let s = generate("node-1", 1, services, 10);
    let bytes = s.encode().unwrap();
    let decoded = Snapshot::decode(&bytes, &Limits::default()).unwrap();
    assert_eq!(decoded.snapshot.endpoints.len(), services as usize * 10);
    assert!(decoded.snapshot == s);
}

// ---------------------------------------------------------------------------------------------
// Authorization tables (indexes as in `add_sample_authz`)

mod authz {
    use kmesh_common::authz::{
        ANY_CLASS, ANY_PORT, AuthzVerdictKey, MAX_POLICY_NAME_LEN, UNKNOWN_SOURCE, authz_action,
        authz_policy_kind, authz_reason, resolve_verdict, source_class,
    };
    use kmesh_common::ipv4_mapped;

    use super::*;

    /// The sample's verdict for a connection to `to` from `from`, port `port`, read as the kernel
    /// reads it: the workload's set, the source's class, the lookup chain.
    fn verdict_of(s: &Snapshot, to: &str, from: &str, port: u16) -> Option<(u8, u8, u32)> {
        let to = kmesh_common::ip16(ip(to));
        let w = s.authz.workloads.iter().find(|w| w.ip == to)?;
        let class = source_class(&s.authz.sources, &kmesh_common::ip16(ip(from)));
        let lookup = |k: &AuthzVerdictKey| {
            let i = s.authz.verdicts.binary_search_by_key(k, |v| v.key).ok()?;
            Some(s.authz.verdicts[i].value)
        };
        resolve_verdict(w.value.policy_set, class, port, lookup)
            .map(|v| (v.action, v.reason, v.policy))
    }

    #[test]
    fn the_sample_round_trips_and_reads_as_meant() {
        let s = sample();
        assert_eq!(decode(&s.encode().unwrap()).unwrap(), s);
        use authz_action::*;
        use authz_reason::*;
        let v = |to, from, port| verdict_of(&s, to, from, port);
        assert_eq!(
            v("10.244.1.20", "10.244.1.20", 80),
            Some((ALLOW, ALLOW_MATCHED, 5))
        );
        assert_eq!(
            v("10.244.1.20", "10.9.9.9", 80),
            Some((DENY, NO_ALLOW_MATCHED, 0))
        );
        assert_eq!(
            v("10.244.1.20", "10.9.9.9", 8080),
            Some((DENY, STRICT_MTLS, 7))
        );
        assert_eq!(
            v("fd00:10:244::9", "fd00:10:244::7", 9090),
            Some((DENY, DENY_MATCHED, 9))
        );
        assert_eq!(
            v("10.244.1.21", "10.1.1.1", 80),
            Some((DENY, UNCOMPILABLE, 11))
        );
        assert_eq!(
            v("10.244.1.21", "192.168.0.1", 80),
            Some((ALLOW, NO_ALLOW_POLICY, 0))
        );
        assert_eq!(
            v("10.244.1.99", "10.1.1.1", 80),
            None,
            "no entry: not bound"
        );
    }

    #[test]
    fn builder_stores_ipv4_blocks_mapped() {
        let s = sample();
        let key = s.authz.sources[0].key;
        assert_eq!((key.prefix_len, key.ip), (104, ipv4_mapped([10, 0, 0, 0])));
        assert_eq!(s.authz.sources[2].key.prefix_len, 128);
        let p = &s.authz.policies[1];
        assert_eq!(
            (p.policy, p.kind),
            (7, authz_policy_kind::PEER_AUTHENTICATION)
        );
        assert_eq!(&p.name[..usize::from(p.name_len)], b"istio-system/default");
        assert!(p.name[usize::from(p.name_len)..].iter().all(|&b| b == 0));
    }

    #[test]
    fn all_empty_or_workloads_present() {
        let no_workloads = |s: &mut Snapshot| s.authz.workloads.clear();
        invalid_with(
            no_workloads,
            ValidationError::AuthzWithoutWorkloads {
                table: Table::AuthzSources,
                count: 3,
            },
        );
        invalid_with(
            |s| {
                no_workloads(s);
                s.authz.sources.clear();
            },
            ValidationError::AuthzWithoutWorkloads {
                table: Table::AuthzVerdicts,
                count: 7,
            },
        );
        invalid_with(
            |s| {
                no_workloads(s);
                s.authz.sources.clear();
                s.authz.verdicts.clear();
            },
            ValidationError::AuthzWithoutWorkloads {
                table: Table::AuthzPolicies,
                count: 4,
            },
        );
        // All four empty is valid (a node no policy binds), and so are workloads with no sources.
        let mut s = sample();
        s.authz = Default::default();
        assert_eq!(decode(&s.encode().unwrap()).unwrap(), s);
        let mut s = sample();
        s.authz.sources.clear();
        assert_eq!(decode(&s.encode().unwrap()).unwrap(), s);
        assert_eq!(
            ValidationError::AuthzWithoutWorkloads {
                table: Table::AuthzVerdicts,
                count: 7
            }
            .to_string(),
            "the authorization workloads section is empty but the authorization verdicts section \
             holds 7 records; authorization tables are all empty or have a workload"
        );
    }

    #[test]
    fn workloads_unique_sorted_and_pad() {
        invalid_with(
            |s| s.authz.workloads[1].ip = s.authz.workloads[0].ip,
            ValidationError::DuplicateKey {
                table: Table::AuthzWorkloads,
                index: 1,
                record: "10.244.1.20".into(),
            },
        );
        invalid_with(
            |s| s.authz.workloads.swap(1, 2),
            ValidationError::OutOfOrder {
                table: Table::AuthzWorkloads,
                index: 2,
                record: "10.244.1.21".into(),
                previous: "fd00:10:244::9".into(),
            },
        );
        invalid_with(
            |s| s.authz.workloads[2].value.pad = 3,
            ValidationError::NonZeroPad {
                table: Table::AuthzWorkloads,
                index: 2,
                record: "fd00:10:244::9".into(),
                field: "value.pad",
                value: 3,
            },
        );
    }

    #[test]
    fn workloads_have_their_default_verdict() {
        let expected = ValidationError::AuthzWorkloadSetMissing {
            index: 1,
            record: "10.244.1.21".into(),
            policy_set: 2,
        };
        assert_eq!(
            expected.to_string(),
            "authorization workload 1 (10.244.1.21): policy_set 2 has no default verdict (set 2, \
             any class, any port) in the authorization verdicts section"
        );
        // The set's default removed: its other verdict stays, the chain would end in nothing.
        invalid_with(
            |s| {
                s.authz.verdicts.remove(6);
            },
            expected,
        );
        // A set with no verdicts at all.
        invalid_with(
            |s| s.authz.workloads[2].value.policy_set = 3,
            ValidationError::AuthzWorkloadSetMissing {
                index: 2,
                record: "fd00:10:244::9".into(),
                policy_set: 3,
            },
        );
    }

    #[test]
    fn sources_unique_and_sorted() {
        invalid_with(
            |s| s.authz.sources[2].key = s.authz.sources[1].key,
            ValidationError::DuplicateKey {
                table: Table::AuthzSources,
                index: 2,
                record: "10.244.1.20/32".into(),
            },
        );
        // Ordered by prefix length first: the /8 before the /32s.
        invalid_with(
            |s| s.authz.sources.swap(0, 1),
            ValidationError::OutOfOrder {
                table: Table::AuthzSources,
                index: 1,
                record: "10.0.0.0/8".into(),
                previous: "10.244.1.20/32".into(),
            },
        );
    }

    #[test]
    fn sources_prefix_len_at_most_128() {
        invalid_with(
            |s| s.authz.sources[1].key.prefix_len = 129,
            ValidationError::AuthzSourcePrefixLen {
                index: 1,
                record: "::ffff:10.244.1.20/129".into(),
                prefix_len: 129,
            },
        );
        invalid_with(
            |s| s.authz.sources[2].key.prefix_len = 129,
            ValidationError::AuthzSourcePrefixLen {
                index: 2,
                record: "fd00:10:244::7/129".into(),
                prefix_len: 129,
            },
        );
        invalid_with(
            |s| s.authz.sources[2].key.prefix_len = u32::MAX,
            ValidationError::AuthzSourcePrefixLen {
                index: 2,
                record: format!("fd00:10:244::7/{}", u32::MAX),
                prefix_len: u32::MAX,
            },
        );
    }

    #[test]
    fn sources_do_not_mix_address_families() {
        // An IPv4-mapped address with a prefix below 96 bits.
        invalid_with(
            |s| s.authz.sources[0].key.prefix_len = 80,
            ValidationError::AuthzSourceMixesFamilies {
                index: 0,
                record: "::ffff:10.0.0.0/80".into(),
                prefix_len: 80,
            },
        );
        // ::/0 holds every IPv4-mapped address too.
        invalid_with(
            |s| s.authz.sources[0].key = AuthzSourceKey::default_route(),
            ValidationError::AuthzSourceMixesFamilies {
                index: 0,
                record: "::/0".into(),
                prefix_len: 0,
            },
        );
        // 96 is all of IPv4 (0.0.0.0/0), allowed; so is an IPv6 block that does not hold it.
        let mut s = sample();
        s.authz.sources[0].key = AuthzSourceKey {
            prefix_len: 96,
            ip: ipv4_mapped([0, 0, 0, 0]),
        };
        s.encode().unwrap();
        let mut b = SnapshotBuilder::new("n", 1, mode::KERNEL_NATIVE);
        add_sample_authz(&mut b);
        b.authz_source(ip("fd00::"), 8, 4);
        b.authz_source(ip("8000::"), 1, 4);
        let s = b.build();
        assert_eq!(decode(&s.encode().unwrap()).unwrap(), s);
        // ::/0 with an entry for all of IPv4, which every IPv4 source matches first: allowed.
        let mut b = SnapshotBuilder::new("n", 1, mode::KERNEL_NATIVE);
        add_sample_authz(&mut b);
        b.authz_source(ip("::"), 0, 4);
        b.authz_source(ip("0.0.0.0"), 0, 5);
        let s = b.build();
        assert_eq!(decode(&s.encode().unwrap()).unwrap(), s);
    }

    /// The key of `::/0`.
    trait DefaultRoute {
        fn default_route() -> Self;
    }

    impl DefaultRoute for AuthzSourceKey {
        fn default_route() -> Self {
            AuthzSourceKey {
                prefix_len: 0,
                ip: [0; 16],
            }
        }
    }

    use kmesh_common::authz::AuthzSourceKey;

    #[test]
    fn sources_are_canonical() {
        // 10.0.0.0/8 holding a host bit.
        invalid_with(
            |s| s.authz.sources[0].key.ip[13] = 1,
            ValidationError::AuthzSourceNotCanonical {
                index: 0,
                record: "10.1.0.0/8".into(),
                prefix_len: 104,
            },
        );
        // 10.244.1.20/29: the network address is .16.
        invalid_with(
            |s| s.authz.sources[1].key.prefix_len = 96 + 29,
            ValidationError::AuthzSourceNotCanonical {
                index: 1,
                record: "10.244.1.20/29".into(),
                prefix_len: 125,
            },
        );
        // An IPv6 host address as a /64 (sorted first, being the shortest prefix).
        let expected = ValidationError::AuthzSourceNotCanonical {
            index: 0,
            record: "fd00:10:244::7/64".into(),
            prefix_len: 64,
        };
        assert_eq!(
            expected.to_string(),
            "authorization source 0 (fd00:10:244::7/64): address bits past prefix_len 64 are not \
             zero"
        );
        invalid_with(
            |s| {
                s.authz.sources[2].key.prefix_len = 64;
                s.sort();
            },
            expected,
        );
    }

    #[test]
    fn sources_have_a_real_class() {
        for class in [UNKNOWN_SOURCE, ANY_CLASS] {
            invalid_with(
                |s| s.authz.sources[1].value.source_class = class,
                ValidationError::AuthzSourceClass {
                    index: 1,
                    record: "10.244.1.20/32".into(),
                    source_class: class,
                },
            );
        }
    }

    #[test]
    fn verdicts_unique_sorted_and_pads() {
        invalid_with(
            |s| s.authz.verdicts[1].key = s.authz.verdicts[0].key,
            ValidationError::DuplicateKey {
                table: Table::AuthzVerdicts,
                index: 1,
                record: "set 1, class 1, any port".into(),
            },
        );
        invalid_with(
            |s| s.authz.verdicts.swap(4, 5),
            ValidationError::OutOfOrder {
                table: Table::AuthzVerdicts,
                index: 5,
                record: "set 1, any class, port 8080".into(),
                previous: "set 2, class 2, any port".into(),
            },
        );
        invalid_with(
            |s| s.authz.verdicts[3].key.pad = 1,
            ValidationError::NonZeroPad {
                table: Table::AuthzVerdicts,
                index: 3,
                record: "set 1, any class, any port".into(),
                field: "key.pad",
                value: 1,
            },
        );
        invalid_with(
            |s| s.authz.verdicts[2].value.pad = 2,
            ValidationError::NonZeroPad {
                table: Table::AuthzVerdicts,
                index: 2,
                record: "set 1, class 3, port 9090".into(),
                field: "value.pad",
                value: 2,
            },
        );
    }

    #[test]
    fn verdicts_action_and_reason_known() {
        for action in [0, 3, u8::MAX] {
            invalid_with(
                |s| s.authz.verdicts[0].value.action = action,
                ValidationError::AuthzUnknownAction {
                    index: 0,
                    record: "set 1, class 1, any port".into(),
                    action,
                },
            );
        }
        for reason in [0, authz_reason::COUNT, u8::MAX] {
            invalid_with(
                |s| s.authz.verdicts[0].value.reason = reason,
                ValidationError::AuthzUnknownReason {
                    index: 0,
                    record: "set 1, class 1, any port".into(),
                    reason,
                },
            );
        }
    }

    #[test]
    fn verdicts_action_fits_the_reason() {
        use authz_action::*;
        use authz_reason::*;
        // Allowing reasons with DENY, denying reasons with ALLOW.
        let cases = [
            (6, NO_ALLOW_POLICY, DENY),
            (0, ALLOW_MATCHED, DENY),
            (2, DENY_MATCHED, ALLOW),
            (3, NO_ALLOW_MATCHED, ALLOW),
            (4, STRICT_MTLS, ALLOW),
            (5, UNCOMPILABLE, ALLOW),
        ];
        for (index, reason, action) in cases {
            invalid_with(
                |s| s.authz.verdicts[index].value.action = action,
                ValidationError::AuthzReasonAction {
                    index,
                    record: describe_verdict(&sample(), index),
                    action,
                    reason,
                },
            );
        }
        assert_eq!(
            ValidationError::AuthzReasonAction {
                index: 4,
                record: "set 1, any class, port 8080".into(),
                action: ALLOW,
                reason: STRICT_MTLS
            }
            .to_string(),
            "authorization verdict 4 (set 1, any class, port 8080): action allow does not go \
             with reason STRICT_MTLS"
        );
    }

    fn describe_verdict(s: &Snapshot, index: usize) -> String {
        crate::validate_authz::describe_verdict_key(&s.authz.verdicts[index].key)
    }

    #[test]
    fn verdicts_policy_zero_exactly_when_no_policy_decided() {
        use authz_reason::*;
        for (index, reason) in [(6, NO_ALLOW_POLICY), (3, NO_ALLOW_MATCHED)] {
            invalid_with(
                |s| s.authz.verdicts[index].value.policy = 5,
                ValidationError::AuthzVerdictPolicyNotZero {
                    index,
                    record: describe_verdict(&sample(), index),
                    reason,
                    policy: 5,
                },
            );
        }
        let decided = [
            (0, ALLOW_MATCHED),
            (2, DENY_MATCHED),
            (4, STRICT_MTLS),
            (5, UNCOMPILABLE),
        ];
        for (index, reason) in decided {
            invalid_with(
                |s| s.authz.verdicts[index].value.policy = 0,
                ValidationError::AuthzVerdictPolicyZero {
                    index,
                    record: describe_verdict(&sample(), index),
                    reason,
                },
            );
        }
    }

    #[test]
    fn verdicts_name_an_existing_policy_of_the_right_kind() {
        let expected = ValidationError::AuthzVerdictPolicyMissing {
            index: 2,
            record: "set 1, class 3, port 9090".into(),
            policy: 8,
        };
        assert_eq!(
            expected.to_string(),
            "authorization verdict 2 (set 1, class 3, port 9090): policy 8 references an \
             authorization policy which does not exist"
        );
        invalid_with(|s| s.authz.verdicts[2].value.policy = 8, expected);
        // STRICT_MTLS naming an AuthorizationPolicy.
        invalid_with(
            |s| s.authz.verdicts[4].value.policy = 9,
            ValidationError::AuthzVerdictPolicyKind {
                index: 4,
                record: "set 1, any class, port 8080".into(),
                policy: 9,
                reason: authz_reason::STRICT_MTLS,
                kind: authz_policy_kind::AUTHORIZATION_POLICY,
                expected: authz_policy_kind::PEER_AUTHENTICATION,
            },
        );
        // ALLOW_MATCHED naming a PeerAuthentication.
        let expected = ValidationError::AuthzVerdictPolicyKind {
            index: 0,
            record: "set 1, class 1, any port".into(),
            policy: 7,
            reason: authz_reason::ALLOW_MATCHED,
            kind: authz_policy_kind::PEER_AUTHENTICATION,
            expected: authz_policy_kind::AUTHORIZATION_POLICY,
        };
        assert_eq!(
            expected.to_string(),
            "authorization verdict 0 (set 1, class 1, any port): policy 7 is of kind \
             PeerAuthentication, reason ALLOW_MATCHED needs kind AuthorizationPolicy"
        );
        invalid_with(|s| s.authz.verdicts[0].value.policy = 7, expected);
        // UNCOMPILABLE names either kind: a PeerAuthentication that cannot be compiled fails its
        // workloads closed too.
        let mut s = sample();
        let uncompilable = s
            .authz
            .verdicts
            .iter_mut()
            .find(|v| v.value.reason == authz_reason::UNCOMPILABLE)
            .unwrap();
        uncompilable.value.policy = 7;
        assert_eq!(s.validate(), Ok(()));
    }

    #[test]
    fn policies_unique_sorted_and_nonzero() {
        invalid_with(
            |s| s.authz.policies[1].policy = 5,
            ValidationError::DuplicateKey {
                table: Table::AuthzPolicies,
                index: 1,
                record: "policy 5".into(),
            },
        );
        invalid_with(
            |s| s.authz.policies.swap(2, 3),
            ValidationError::OutOfOrder {
                table: Table::AuthzPolicies,
                index: 3,
                record: "policy 9".into(),
                previous: "policy 11".into(),
            },
        );
        invalid_with(
            |s| s.authz.policies[0].policy = 0,
            ValidationError::AuthzPolicyIdZero { index: 0 },
        );
    }

    #[test]
    fn policies_kind_and_pad() {
        for kind in [0, 3, u8::MAX] {
            invalid_with(
                |s| s.authz.policies[2].kind = kind,
                ValidationError::AuthzPolicyKind {
                    index: 2,
                    policy: 9,
                    kind,
                },
            );
        }
        invalid_with(
            |s| s.authz.policies[3].pad = 1,
            ValidationError::NonZeroPad {
                table: Table::AuthzPolicies,
                index: 3,
                record: "policy 11".into(),
                field: "pad",
                value: 1,
            },
        );
    }

    #[test]
    fn policies_name_length_and_tail() {
        for name_len in [0, MAX_POLICY_NAME_LEN as u16 + 1, u16::MAX] {
            invalid_with(
                |s| s.authz.policies[1].name_len = name_len,
                ValidationError::AuthzPolicyNameLen {
                    index: 1,
                    policy: 7,
                    name_len,
                },
            );
        }
        // The longest valid name (a 63-byte namespace and a 253-byte name) is fine.
        let long = format!("{}/{}", "n".repeat(63), "o".repeat(253));
        let mut b = SnapshotBuilder::new("n", 1, mode::KERNEL_NATIVE);
        add_sample_authz(&mut b);
        b.authz_policy(12, authz_policy_kind::AUTHORIZATION_POLICY, &long);
        let s = b.build();
        assert_eq!(decode(&s.encode().unwrap()).unwrap(), s);
        // The builder keeps the real length of a name longer than the record holds: refused.
        let longer = "x".repeat(MAX_POLICY_NAME_LEN + 1);
        let mut b = SnapshotBuilder::new("n", 1, mode::KERNEL_NATIVE);
        add_sample_authz(&mut b);
        b.authz_policy(12, authz_policy_kind::AUTHORIZATION_POLICY, &longer);
        assert_invalid(
            b.build(),
            ValidationError::AuthzPolicyNameLen {
                index: 4,
                policy: 12,
                name_len: MAX_POLICY_NAME_LEN as u16 + 1,
            },
        );
        // A byte left past the end of the name ("default/allow-frontend" is 22 bytes).
        let expected = ValidationError::AuthzPolicyNameTail {
            index: 0,
            policy: 5,
            name_len: 22,
            offset: MAX_POLICY_NAME_LEN - 1,
            value: b'x',
        };
        assert_eq!(
            expected.to_string(),
            "authorization policy 0 (policy 5): name[319] is 120, must be zero beyond name_len 22"
        );
        invalid_with(
            |s| s.authz.policies[0].name[MAX_POLICY_NAME_LEN - 1] = b'x',
            expected,
        );
        invalid_with(
            |s| s.authz.policies[0].name_len = 21,
            ValidationError::AuthzPolicyNameTail {
                index: 0,
                policy: 5,
                name_len: 21,
                offset: 21,
                value: b'd',
            },
        );
    }

    /// Asserts the sample with policy 9's name replaced by `name` is refused for `reason`.
    #[track_caller]
    fn bad_name(name: &str, reason: &'static str) {
        let mut b = SnapshotBuilder::new("node-a1", 7, mode::KERNEL_NATIVE);
        add_sample_authz(&mut b);
        let mut s = b.build();
        let mut renamed = SnapshotBuilder::new("n", 1, mode::DISABLED);
        renamed.authz_policy(9, authz_policy_kind::AUTHORIZATION_POLICY, name);
        s.authz.policies[2] = renamed.build().authz.policies[0];
        assert_invalid(
            s,
            ValidationError::AuthzPolicyName {
                index: 2,
                policy: 9,
                name: name.into(),
                reason,
            },
        );
    }

    #[test]
    fn policies_name_is_namespace_slash_name() {
        const NO_SLASH: &str = "is not namespace/name (no '/')";
        const NS_LEN: &str = "has a namespace of 0 or more than 63 bytes";
        const NS: &str = "has a namespace that is not a DNS label (a-z, 0-9 and '-', starting and ending with a letter or digit)";
        const OBJ_LEN: &str = "has an object name of 0 or more than 253 bytes";
        const OBJ: &str = "has an object name that is not a DNS subdomain (dot-separated labels of a-z, 0-9 and '-', each starting and ending with a letter or digit)";
        bad_name("deny-legacy", NO_SLASH);
        bad_name("/deny-legacy", NS_LEN);
        bad_name(&format!("{}/p", "n".repeat(64)), NS_LEN);
        bad_name("Default/p", NS);
        bad_name("kube.system/p", NS);
        bad_name("-ns/p", NS);
        bad_name("ns-/p", NS);
        bad_name("ns/", OBJ_LEN);
        bad_name(&format!("ns/{}", "o".repeat(254)), OBJ_LEN);
        bad_name("ns/a/b", OBJ);
        bad_name("ns/Deny", OBJ);
        bad_name("ns/deny_legacy", OBJ);
        bad_name("ns/.deny", OBJ);
        bad_name("ns/deny.", OBJ);
        bad_name("ns/a..b", OBJ);
        bad_name("ns/-deny", OBJ);
        bad_name("ns/a.-b", OBJ);
        bad_name("ns/d\u{e9}ny", OBJ);
        let message = ValidationError::AuthzPolicyName {
            index: 2,
            policy: 9,
            name: "deny-legacy".into(),
            reason: NO_SLASH,
        }
        .to_string();
        assert_eq!(
            message,
            "authorization policy 2 (policy 9): name \"deny-legacy\" is not namespace/name (no '/')"
        );
        for good in [
            "a/b",
            "ns-1/allow.v1.x",
            "0/0",
            &format!("{}/{}", "n".repeat(63), "o".repeat(253)),
        ] {
            let mut b = SnapshotBuilder::new("node-a1", 7, mode::KERNEL_NATIVE);
            add_sample_authz(&mut b);
            let mut s = b.build();
            let mut renamed = SnapshotBuilder::new("n", 1, mode::DISABLED);
            renamed.authz_policy(9, authz_policy_kind::AUTHORIZATION_POLICY, good);
            s.authz.policies[2] = renamed.build().authz.policies[0];
            assert_eq!(decode(&s.encode().unwrap()).unwrap(), s, "{good}");
        }
    }

    #[test]
    fn the_first_error_is_the_first_table_in_wire_order() {
        // A broken verdict and a broken policy: the verdicts section comes first.
        invalid_with(
            |s| {
                s.authz.verdicts[0].value.action = 9;
                s.authz.policies[0].kind = 9;
            },
            ValidationError::AuthzUnknownAction {
                index: 0,
                record: "set 1, class 1, any port".into(),
                action: 9,
            },
        );
        // Rules within records come before references between tables.
        invalid_with(
            |s| {
                s.authz.workloads[0].value.policy_set = 99;
                s.authz.policies[0].pad = 1;
            },
            ValidationError::NonZeroPad {
                table: Table::AuthzPolicies,
                index: 0,
                record: "policy 5".into(),
                field: "pad",
                value: 1,
            },
        );
        let _ = ANY_PORT;
    }
}
