//! Round trips, one test per format rule, limits and the large generated snapshot.
//!
//! Rule tests either change a field of a valid [`Snapshot`] and write it with the unchecked encoder
//! (so framing and hash are right and the targeted content rule is what fires, in both the encoder
//! and the decoder), or change bytes of a valid encoding and recompute `total_len` and the hash.

use std::net::IpAddr;

use kmesh_common::{
    EndpointKey, EndpointRecord, EndpointValue, LAYOUT_VERSION, MAX_ROUTE_DESTINATIONS, lb_policy,
    mode,
};

use crate::builder::{Endpoint, SnapshotBuilder, generate};
use crate::encode::encode_unchecked;
use crate::format::{FIXED_HEADER_LEN, OFF_CONTENT_HASH, OFF_TOTAL_LEN};
use crate::{
    DecodeError, EncodeError, Limits, Snapshot, Table, ValidationError, content_hash, peek_header,
};

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

fn ep(addr: &str, port: u16, identity: u32) -> Endpoint {
    Endpoint::new(ip(addr), port, identity)
}

/// A small snapshot using every table, both address families, both policies and an empty set.
///
/// After sorting: services 0 = 10.96.0.10:80 (route 1), 1 = 10.96.0.30:8080 (route 3),
/// 2 = [fd00:10:96::20]:443 (route 2); routes 1..=3 and sets 1..=3 at indexes 0..=2; endpoints
/// (1,0), (1,1), (2,0); set 3 is empty; two workloads.
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
    b.build()
}

fn decode(bytes: &[u8]) -> Result<Snapshot, DecodeError> {
    Snapshot::decode(bytes, &Limits::default()).map(|d| d.snapshot)
}

fn raw(s: &Snapshot) -> Vec<u8> {
    encode_unchecked(s).expect("unchecked encoding")
}

/// Recomputes `total_len` and the content hash after a test changed the bytes.
pub(crate) fn fix(bytes: &mut [u8]) {
    let len = bytes.len() as u64;
    bytes[OFF_TOTAL_LEN..OFF_TOTAL_LEN + 8].copy_from_slice(&len.to_le_bytes());
    let hash = content_hash(&bytes[FIXED_HEADER_LEN..]);
    bytes[OFF_CONTENT_HASH..OFF_CONTENT_HASH + 8].copy_from_slice(&hash.to_le_bytes());
}

/// Offsets of the six section headers of a valid encoding, in wire order.
fn section_offsets(bytes: &[u8]) -> [usize; 6] {
    let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap()) as usize;
    let name_len = u16::from_le_bytes([bytes[40], bytes[41]]) as usize;
    let mut pos = (42 + name_len).next_multiple_of(8);
    let mut offsets = [0; 6];
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
fn assert_invalid(s: Snapshot, expected: ValidationError) {
    assert_eq!(s.encode(), Err(EncodeError::Invalid(expected.clone())));
    assert_eq!(decode(&raw(&s)), Err(DecodeError::Invalid(expected)));
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
    assert_eq!(
        decoded.content_hash,
        content_hash(&bytes[FIXED_HEADER_LEN..])
    );
    assert_eq!(decoded.snapshot.encode().unwrap(), bytes);
    assert_eq!(bytes.len() % 8, 0);

    let header = peek_header(&bytes).unwrap();
    assert_eq!(header.format_version, 1);
    assert_eq!(header.layout_version, LAYOUT_VERSION);
    assert_eq!(header.generation, 7);
    assert_eq!(header.content_hash, decoded.content_hash);
    assert_eq!(header.total_len, bytes.len() as u64);
    assert_eq!(header.node_name, "node-a1");
}

#[test]
fn round_trip_of_an_empty_snapshot() {
    let s = SnapshotBuilder::new("n", 0, mode::DISABLED).build();
    let bytes = s.encode().unwrap();
    // 40 fixed + 2 + 1 name + 5 padding, NodeConfig section 16 + 8, five empty sections of 16.
    assert_eq!(bytes.len(), 48 + 24 + 5 * 16);
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
    assert_ne!(shuffled, s);
    shuffled.sort();
    assert_eq!(shuffled.encode().unwrap(), bytes);
}

#[test]
fn hash_is_stable() {
    // Guards against accidental format changes: update deliberately with a format or layout bump.
    let bytes = sample().encode().unwrap();
    assert_eq!(bytes.len(), 856);
    assert_eq!(
        peek_header(&bytes).unwrap().content_hash,
        content_hash(&bytes[40..])
    );
    assert_eq!(content_hash(&bytes[40..]), 0xa44f_5562_f179_05d9);
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
    let bytes = sample().encode().unwrap();
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
    assert_eq!(err.to_string(), "truncated: header says 856 bytes, got 100");
}

#[test]
fn trailing_bytes() {
    let mut bytes = sample().encode().unwrap();
    bytes.push(0);
    assert_eq!(
        decode(&bytes),
        Err(DecodeError::TrailingBytes {
            expected: 856,
            got: 857
        })
    );
}

#[test]
fn every_flipped_content_byte_is_a_hash_mismatch() {
    let bytes = sample().encode().unwrap();
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
    let bytes = sample().encode().unwrap();
    for i in 0..FIXED_HEADER_LEN {
        let mut corrupt = bytes.clone();
        corrupt[i] ^= 0x01;
        let result = decode(&corrupt);
        match i {
            0..8 => assert!(matches!(result, Err(DecodeError::BadMagic { .. }))),
            8..10 => assert!(matches!(
                result,
                Err(DecodeError::UnsupportedFormatVersion { supported: 1, .. })
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
    let bytes = sample().encode().unwrap();
    let mut v = bytes.clone();
    v[8..10].copy_from_slice(&2u16.to_le_bytes());
    assert_eq!(
        decode(&v),
        Err(DecodeError::UnsupportedFormatVersion {
            found: 2,
            supported: 1
        })
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
    let mut bytes = sample().encode().unwrap();
    let limits = Limits {
        max_bytes: 815,
        ..Limits::default()
    };
    let expected = Err(DecodeError::TooLarge { len: 856, max: 815 });
    assert_eq!(Snapshot::decode(&bytes, &limits).map(|_| ()), expected);
    // Even with a wrong hash and a wrong magic: no other check runs first.
    bytes[0] ^= 1;
    bytes[500] ^= 1;
    assert_eq!(Snapshot::decode(&bytes, &limits).map(|_| ()), expected);
    let exact = Limits {
        max_bytes: 856,
        ..Limits::default()
    };
    assert!(Snapshot::decode(&sample().encode().unwrap(), &exact).is_ok());
}

#[test]
fn peek_header_reads_only_the_header() {
    let bytes = sample().encode().unwrap();
    // The header and name end at offset 56; sections are not needed, nor checked.
    let header = peek_header(&bytes[..56]).unwrap();
    assert_eq!(header.total_len, 856);
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
        decode(&raw(&s)),
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
    let mut bytes = sample().encode().unwrap();
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
    let mut bytes = sample().encode().unwrap();
    bytes[40..42].copy_from_slice(&60_000u16.to_le_bytes());
    fix(&mut bytes);
    assert_eq!(
        decode(&bytes),
        Err(DecodeError::Overrun {
            what: "node name".into(),
            offset: 42,
            needed: 60_000,
            remaining: 856 - 42
        })
    );
}

#[test]
fn node_name_padding_must_be_zero() {
    let mut bytes = sample().encode().unwrap();
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
    let bytes = sample().encode().unwrap();
    let offsets = section_offsets(&bytes);
    for (i, table) in Table::ALL.iter().enumerate() {
        let mut b = bytes.clone();
        put_u32(&mut b, offsets[i], 9);
        fix(&mut b);
        assert_eq!(
            decode(&b),
            Err(DecodeError::SectionKind {
                offset: offsets[i] as u64,
                found: 9,
                expected: table.kind(),
                table: *table
            })
        );
    }
}

#[test]
fn record_size_must_match() {
    let bytes = sample().encode().unwrap();
    let offsets = section_offsets(&bytes);
    let sizes = [8, 28, 140, 12, 32, 24];
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
    let mut bytes = sample().encode().unwrap();
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
    let mut bytes = sample().encode().unwrap();
    let offsets = section_offsets(&bytes);
    // Services: 16 + 3 * 28 = 100 bytes, then 4 bytes of padding.
    let padding = offsets[1] + 100;
    assert_eq!(offsets[2], padding + 4);
    bytes[padding + 3] = 0xaa;
    fix(&mut bytes);
    assert_eq!(
        decode(&bytes),
        Err(DecodeError::NonZeroPadding {
            what: "services section".into(),
            offset: padding as u64
        })
    );
}

#[test]
fn record_count_beyond_the_input_does_not_allocate() {
    let mut bytes = sample().encode().unwrap();
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
    let bytes = sample().encode().unwrap();
    let offsets = section_offsets(&bytes);
    let mut b = bytes[..offsets[5]].to_vec();
    fix(&mut b);
    assert_eq!(
        decode(&b),
        Err(DecodeError::Overrun {
            what: "workloads section header".into(),
            offset: offsets[5] as u64,
            needed: 16,
            remaining: 0
        })
    );
}

#[test]
fn data_after_the_last_section() {
    let bytes = sample().encode().unwrap();
    let offsets = section_offsets(&bytes);
    // A repeated workloads section is data after the last section.
    let mut b = bytes.clone();
    b.extend_from_slice(&bytes[offsets[5]..]);
    fix(&mut b);
    assert_eq!(
        decode(&b),
        Err(DecodeError::TrailingData {
            offset: 856,
            len: (856 - offsets[5]) as u64
        })
    );
}

#[test]
fn node_config_needs_exactly_one_record() {
    let bytes = sample().encode().unwrap();
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
                Table::NodeConfig => unreachable!(),
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
fn node_config_flags() {
    invalid_with(
        |s| s.config.flags = 2,
        ValidationError::NodeConfigFlags { flags: 2 },
    );
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
