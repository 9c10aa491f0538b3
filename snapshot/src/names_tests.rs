//! Tests of the names sections (11-13): the round trip and lookups, each validation rule (refused
//! by the encoder and the decoder with the same error), the capacity limits.

use kmesh_common::names::{NO_NAME, ServiceNameRecord, WorkloadNameRecord};
use kmesh_common::{ServiceKey, ip16};

use crate::error::Table;
use crate::tests::{assert_invalid, decode, ip, sample};
use crate::{DecodeError, Limits, ServiceName, Snapshot, ValidationError, WorkloadName};

/// The sample's names: two pods (10.244.1.20 "reviews-v1", fd00::20 no version) and the service
/// 10.96.0.10:80 (service_id 1).
fn names_of<'a>(s: &'a Snapshot, addr: &str) -> Option<WorkloadName<'a>> {
    s.names().workload(&ip16(ip(addr)))
}

#[test]
fn names_round_trip_and_are_found_by_address_and_service_key() {
    let s = decode(&sample().encode().unwrap()).unwrap();
    assert_eq!(
        names_of(&s, "10.244.1.20"),
        Some(WorkloadName {
            workload: "reviews-v1",
            namespace: "default",
            service_account: "bookinfo-reviews",
            app: "reviews",
            version: "v1",
        })
    );
    let v6 = names_of(&s, "fd00::20").unwrap();
    assert_eq!(
        (v6.workload, v6.version),
        ("reviews-v1", ""),
        "NO_NAME reads as empty"
    );
    assert_eq!(names_of(&s, "10.244.1.21"), None);
    let key = |addr: &str, port| ServiceKey {
        ip: ip16(ip(addr)),
        port,
        protocol: kmesh_common::IPPROTO_TCP,
        pad: 0,
    };
    assert_eq!(
        s.names().service(&key("10.96.0.10", 80)),
        Some(ServiceName {
            host: "reviews.default.svc.cluster.local",
            name: "reviews",
            namespace: "default",
        })
    );
    assert_eq!(s.names().service(&key("10.96.0.30", 8080)), None, "unnamed");
    // Strings are stored once: "reviews-v1" is shared by both pods, "default" by pod and service.
    let strings = &s.names.strings;
    let count = |needle: &[u8]| {
        strings
            .windows(needle.len())
            .filter(|w| *w == needle)
            .count()
    };
    assert_eq!(count(b"\x0a\x00reviews-v1"), 1);
    assert_eq!(count(b"\x07\x00default"), 1);
}

#[test]
fn the_string_table_is_whole_chunks_of_well_formed_unique_entries() {
    let with_strings = |strings: Vec<u8>| {
        move |s: &mut Snapshot| {
            s.names = Default::default();
            s.names.strings = strings;
        }
    };
    let check = |strings: Vec<u8>, expected: ValidationError| {
        let mut s = sample();
        with_strings(strings)(&mut s);
        assert_invalid(s, expected);
    };
    // Only a table in memory can be cut short of a chunk: the encoder refuses it (the wire holds
    // whole chunks, so the decoder never sees one).
    let mut s = sample();
    with_strings(b"\x01\x00a\x00\x00\x00\x00\x00\x00".to_vec())(&mut s);
    assert_eq!(
        s.encode(),
        Err(crate::EncodeError::Invalid(
            ValidationError::NameTableLength { len: 9 }
        ))
    );
    // Eight zero bytes are an empty entry, not padding.
    check(
        vec![0; 8],
        ValidationError::NameLength { offset: 0, len: 0 },
    );
    let mut long = vec![254, 0];
    long.resize(256, b'x');
    check(
        long,
        ValidationError::NameLength {
            offset: 0,
            len: 254,
        },
    );
    check(
        b"\x01\x00a\x09\x00abc".to_vec(),
        ValidationError::NameOverrun {
            offset: 3,
            len: 9,
            remaining: 3,
        },
    );
    check(
        b"\x02\x00\xff\xfe\x00\x00\x00\x00".to_vec(),
        ValidationError::NameNotUtf8 { offset: 0 },
    );
    check(
        b"\x01\x00a\x01\x00a\x00\x00".to_vec(),
        ValidationError::NameDuplicate {
            offset: 3,
            first: 0,
        },
    );
    // Of several repeats, the smallest string's, at its second offset.
    check(
        b"\x01\x00b\x01\x00a\x01\x00b\x01\x00a\x00\x00\x00\x00".to_vec(),
        ValidationError::NameDuplicate {
            offset: 9,
            first: 3,
        },
    );
    // Padding is fewer than eight zero bytes: a stray byte in it is an entry of its own.
    check(
        b"\x01\x00a\x00\x07\x00\x00\x00".to_vec(),
        ValidationError::NameLength {
            offset: 3,
            len: 0x700,
        },
    );
    // Accepted: an entry that fills its chunks exactly, and the empty table.
    for strings in [b"\x06\x00abcdef".to_vec(), Vec::new()] {
        let mut s = sample();
        with_strings(strings)(&mut s);
        assert_eq!(decode(&s.encode().unwrap()).unwrap(), s);
    }
}

fn first_workload(s: &mut Snapshot) -> &mut WorkloadNameRecord {
    &mut s.names.workloads[0]
}

fn service(s: &mut Snapshot) -> &mut ServiceNameRecord {
    &mut s.names.services[0]
}

#[test]
fn records_refer_to_entries_in_order_and_services_exist() {
    let record = ip16(ip("10.244.1.20"));
    let describe = crate::error::ip_to_addr(&record).to_string();
    let mut s = sample();
    first_workload(&mut s).app = 1;
    assert_invalid(
        s,
        ValidationError::NameOffset {
            table: Table::WorkloadNames,
            index: 0,
            record: describe.clone(),
            field: "app",
            offset: 1,
        },
    );
    let mut s = sample();
    let copy = s.names.workloads[0];
    s.names.workloads.insert(0, copy);
    assert_invalid(
        s,
        ValidationError::DuplicateKey {
            table: Table::WorkloadNames,
            index: 1,
            record: describe,
        },
    );
    let mut s = sample();
    service(&mut s).service_id = 99;
    assert_invalid(
        s,
        ValidationError::ServiceNameWithoutService {
            index: 0,
            service_id: 99,
        },
    );
    let mut s = sample();
    service(&mut s).host = NO_NAME;
    assert_invalid(
        s,
        ValidationError::NameMissing {
            table: Table::ServiceNames,
            index: 0,
            record: "service_id 1".into(),
            field: "host",
        },
    );
    let mut s = sample();
    service(&mut s).namespace = 1_000;
    assert_invalid(
        s,
        ValidationError::NameOffset {
            table: Table::ServiceNames,
            index: 0,
            record: "service_id 1".into(),
            field: "namespace",
            offset: 1_000,
        },
    );
}

#[test]
fn names_over_the_node_limits_are_refused_before_reading_them() {
    let s = sample();
    let bytes = s.encode().unwrap();
    let strings = s.names.strings.len() as u32;
    let with = |f: fn(&mut Limits, u32), n: u32| {
        let mut l = Limits::default();
        f(&mut l, n);
        Snapshot::decode(&bytes, &l).map(|_| ())
    };
    let name_bytes: fn(&mut Limits, u32) = |l, n| l.max_name_bytes = n;
    assert_eq!(with(name_bytes, strings), Ok(()));
    assert_eq!(
        with(name_bytes, strings - 1),
        Err(DecodeError::NameBytesOverCapacity {
            bytes: u64::from(strings),
            capacity: strings - 1,
        })
    );
    let workloads: fn(&mut Limits, u32) = |l, n| l.max_workload_names = n;
    assert_eq!(with(workloads, 2), Ok(()));
    assert_eq!(
        with(workloads, 1),
        Err(DecodeError::OverCapacity {
            table: Table::WorkloadNames,
            count: 2,
            capacity: 1,
        })
    );
    let services: fn(&mut Limits, u32) = |l, n| l.max_service_names = n;
    assert_eq!(
        with(services, 0),
        Err(DecodeError::OverCapacity {
            table: Table::ServiceNames,
            count: 1,
            capacity: 0,
        })
    );
}

#[test]
fn only_the_names_tables_stay_out_of_the_maps() {
    let user_space: Vec<Table> = Table::ALL.into_iter().filter(|t| !t.is_map()).collect();
    assert_eq!(
        user_space,
        [
            Table::NameStrings,
            Table::WorkloadNames,
            Table::ServiceNames
        ]
    );
}

#[test]
fn a_format_version_1_snapshot_is_refused_by_name() {
    let mut bytes = sample().encode().unwrap();
    bytes[8..10].copy_from_slice(&1u16.to_le_bytes());
    crate::tests::fix(&mut bytes);
    assert_eq!(
        decode(&bytes),
        Err(DecodeError::UnsupportedFormatVersion { found: 1 })
    );
}

/// The service of an inbound connection's destination: each endpoint of the node's workloads is
/// named after the service with the smallest host among those routing to it (a service without
/// names last); endpoints of other nodes, and other ports, are not in the index.
#[test]
fn endpoints_of_local_workloads_are_named_after_their_service() {
    use crate::EndpointServices;
    use crate::builder::{Endpoint, SnapshotBuilder};
    use kmesh_common::{lb_policy, mode};

    let mut b = SnapshotBuilder::new("node-1", 1, mode::KERNEL_NATIVE);
    let local = Endpoint::new(ip("10.244.1.7"), 9080, 1);
    let remote = Endpoint::new(ip("10.244.2.9"), 9080, 1);
    let both = b.backend_set(lb_policy::RANDOM, &[local, remote]);
    let only_local = b.backend_set(lb_policy::RANDOM, &[local]);
    let named = |host| ServiceName {
        host,
        name: "n",
        namespace: "ns",
    };
    // Three services route to the local endpoint: "reviews" (through a second destination of
    // its route), "a-reviews-alias" (smaller host) and one without names.
    let reviews = b.service(ip("10.96.0.20"), 9080, &[(1, only_local), (1, both)]);
    b.service_names(reviews, &named("reviews.ns.svc.cluster.local"));
    let unnamed = b.service(ip("10.96.0.21"), 9080, &[(1, only_local)]);
    let alias = b.service(ip("10.96.0.22"), 9080, &[(1, both)]);
    b.service_names(alias, &named("a-reviews-alias.ns.svc.cluster.local"));
    b.workload(ip("10.244.1.7"), 1);
    let s = decode(&b.build().encode().unwrap()).unwrap();

    let index = EndpointServices::of(&s);
    assert_eq!(index.len(), 1, "only the node's workload: {index:?}");
    assert_eq!(index.service_id(&ip16(ip("10.244.1.7")), 9080), Some(alias));
    assert_eq!(index.service_id(&ip16(ip("10.244.1.7")), 9081), None);
    assert_eq!(index.service_id(&ip16(ip("10.244.2.9")), 9080), None);
    assert_ne!(unnamed, alias);

    // Without the alias, the named service wins over the unnamed one, whatever their ids.
    let mut b = SnapshotBuilder::new("node-1", 1, mode::KERNEL_NATIVE);
    let set = b.backend_set(lb_policy::RANDOM, &[local]);
    let unnamed = b.service(ip("10.96.0.19"), 9080, &[(1, set)]);
    let reviews = b.service(ip("10.96.0.20"), 9080, &[(1, set)]);
    b.service_names(reviews, &named("reviews.ns.svc.cluster.local"));
    b.workload(ip("10.244.1.7"), 1);
    let s = decode(&b.build().encode().unwrap()).unwrap();
    let index = EndpointServices::of(&s);
    assert!(unnamed < reviews);
    assert_eq!(
        index.service_id(&ip16(ip("10.244.1.7")), 9080),
        Some(reviews)
    );
}
