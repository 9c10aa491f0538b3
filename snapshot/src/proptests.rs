//! Property tests: the decoder never panics, whatever the input, and whatever it accepts is canonical
//! (re-encoding gives the same bytes). Inputs range from random bytes to near-valid snapshots, so
//! that every stage of the decoder is reached: header, section framing and content validation.

use std::collections::HashSet;
use std::net::IpAddr;

use kmesh_common::{
    BackendSetRecord, BackendSetValue, EndpointKey, EndpointRecord, EndpointValue, LAYOUT_VERSION,
    MAX_ROUTE_DESTINATIONS, NodeConfig, RouteRecord, RouteValue, ServiceKey, ServiceRecord,
    ServiceValue, WorkloadRecord, ipv4_mapped,
};
use proptest::collection::vec;
use proptest::prelude::*;

use crate::builder::{Endpoint, SnapshotBuilder};
use crate::encode::encode_unchecked;
use crate::tests::{fix, sample};
use crate::{FORMAT_VERSION, Limits, MAGIC, Snapshot, peek_header};

/// Decodes with both limit sets and checks the canonical-encoding property. Panics only on a real
/// failure of the property (an input that the decoder accepts but would not have produced).
fn check(bytes: &[u8]) -> Result<(), TestCaseError> {
    let _ = peek_header(bytes);
    let _ = Snapshot::decode(bytes, &Limits::default());
    if let Ok(decoded) = Snapshot::decode(bytes, &Limits::UNLIMITED) {
        let again = decoded.snapshot.encode();
        prop_assert_eq!(
            again.as_deref(),
            Ok(bytes),
            "accepted input is not canonical"
        );
    }
    Ok(())
}

/// A valid fixed header and node name, ready for sections to be appended; `fix` sets length and
/// hash afterwards.
fn header_prefix() -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&LAYOUT_VERSION.to_le_bytes());
    out.extend_from_slice(&[0; 4 + 8 + 8 + 8]);
    out.extend_from_slice(&7u16.to_le_bytes());
    out.extend_from_slice(b"node-a1");
    out.resize(56, 0);
    out
}

/// Random records of `size` bytes.
fn random_records(size: u32) -> impl Strategy<Value = Vec<Vec<u8>>> {
    vec(vec(any::<u8>(), size as usize), 0..4)
}

/// A NodeConfig section body: usually one valid record, so that the later sections are reached.
fn config_records() -> impl Strategy<Value = Vec<Vec<u8>>> {
    prop_oneof![
        8 => (0u8..3).prop_map(|mode| vec![vec![mode, 0, 0, 0, 0, 0, 0, 0]]),
        1 => random_records(8),
    ]
}

/// One section: header fields usually right and sometimes wrong, the records (count usually
/// matching), padding usually zero.
fn arb_section(
    kind: u32,
    size: u32,
    records: impl Strategy<Value = Vec<Vec<u8>>>,
) -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![8 => Just(kind), 1 => 0u32..8],
        prop_oneof![8 => Just(size), 1 => 0u32..200],
        prop_oneof![8 => Just(None), 1 => any::<u32>().prop_map(Some)],
        prop_oneof![8 => Just(0u32), 1 => any::<u32>()],
        records,
        prop_oneof![8 => Just(0u8), 1 => any::<u8>()],
    )
        .prop_map(move |(kind, size, count, reserved, records, pad)| {
            let count = count.unwrap_or(records.len() as u32);
            let mut out = Vec::new();
            for v in [kind, size, count, reserved] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            out.extend(records.into_iter().flatten());
            let padded = out.len().next_multiple_of(8);
            out.resize(padded, pad);
            out
        })
}

fn arb_ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<[u8; 4]>().prop_map(IpAddr::from),
        any::<[u8; 16]>().prop_map(IpAddr::from),
    ]
}

/// Valid snapshots of random shape, made with the builder.
fn arb_valid_snapshot() -> impl Strategy<Value = Snapshot> {
    let sets = vec((0u32..2, vec((arb_ip(), 1u16.., any::<u32>()), 0..4)), 0..5);
    let services = vec(
        (arb_ip(), 1u16.., vec((1u32..100, any::<usize>()), 1..4)),
        0..5,
    );
    let workloads = vec((arb_ip(), any::<u32>()), 0..4);
    (
        "[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?(\\.[a-z0-9]{1,4}){0,2}",
        any::<u64>(),
        0u32..3,
        sets,
        services,
        workloads,
    )
        .prop_map(|(name, generation, mode, sets, services, workloads)| {
            let mut b = SnapshotBuilder::new(&name, generation, mode);
            let mut set_ids = Vec::new();
            for (policy, endpoints) in sets {
                let endpoints: Vec<_> = endpoints
                    .into_iter()
                    .map(|(ip, port, id)| Endpoint::new(ip, port, id))
                    .collect();
                set_ids.push(b.backend_set(policy, &endpoints));
            }
            let mut seen = HashSet::new();
            for (ip, port, destinations) in services {
                if set_ids.is_empty() || !seen.insert((ip, port)) {
                    continue;
                }
                let destinations: Vec<_> = destinations
                    .into_iter()
                    .map(|(weight, pick)| (weight, set_ids[pick % set_ids.len()]))
                    .collect();
                b.service(ip, port, &destinations);
            }
            let mut seen = HashSet::new();
            for (ip, identity) in workloads {
                if seen.insert(ip) {
                    b.workload(ip, identity);
                }
            }
            b.build()
        })
}

/// Snapshots with fields from small ranges and each field occasionally wrong, so that references
/// sometimes resolve, keys sometimes collide and each rule sometimes holds and sometimes not. With
/// `link`, references are pointed at existing records and endpoints generated to match their sets,
/// which makes about a third of the snapshots valid.
fn arb_raw_snapshot() -> impl Strategy<Value = Snapshot> {
    let small_ip = (0u8..4).prop_map(|x| ipv4_mapped([10, 96, 0, x]));
    let service = (
        small_ip,
        prop_oneof![30 => 1u16..4, 1 => Just(0u16)],
        prop_oneof![30 => Just(6u8), 1 => Just(17u8)],
        prop_oneof![30 => Just(0u8), 1 => Just(1u8)],
        0u32..4,
    )
        .prop_map(|(ip, port, protocol, pad, route_id)| ServiceRecord {
            key: ServiceKey {
                ip,
                port,
                protocol,
                pad,
            },
            value: ServiceValue {
                service_id: 1,
                route_id,
            },
        });
    let route = (
        0u32..4,
        prop_oneof![20 => 1u32..4, 1 => 0u32..20],
        vec(
            prop_oneof![30 => 1u32..3, 1 => Just(0u32)],
            MAX_ROUTE_DESTINATIONS,
        ),
        vec(0u32..4, MAX_ROUTE_DESTINATIONS),
        prop_oneof![30 => Just(None), 1 => Just(Some(1u32))],
        prop_oneof![30 => Just(None), 1 => (0..MAX_ROUTE_DESTINATIONS, 1u32..3).prop_map(Some)],
    )
        .prop_map(|(route_id, count, weights, sets, total, stray)| {
            // Cumulative weights over the used slots; unused slots clear unless `stray` sets one.
            let mut value = RouteValue {
                destination_count: count,
                total_weight: 0,
                cumulative_weight: [0; MAX_ROUTE_DESTINATIONS],
                backend_set: [0; MAX_ROUTE_DESTINATIONS],
            };
            let mut sum = 0u32;
            for (slot, (w, s)) in weights.iter().zip(&sets).enumerate() {
                if (slot as u32) < count {
                    sum += w;
                    value.cumulative_weight[slot] = sum;
                    value.backend_set[slot] = *s;
                }
            }
            value.total_weight = total.map_or(sum, |t| sum.wrapping_add(t));
            if let Some((slot, v)) = stray {
                value.backend_set[slot] = v;
            }
            RouteRecord { route_id, value }
        });
    let set = (
        0u32..4,
        0u32..3,
        prop_oneof![30 => 0u32..2, 1 => Just(2u32)],
    )
        .prop_map(|(set_id, endpoint_count, lb_policy)| BackendSetRecord {
            set_id,
            value: BackendSetValue {
                endpoint_count,
                lb_policy,
            },
        });
    let endpoint = (
        0u32..4,
        0u32..3,
        prop_oneof![30 => Just(8080u16), 1 => Just(0u16)],
        prop_oneof![30 => Just(0u16), 1 => Just(1u16)],
    )
        .prop_map(|(set_id, index, port, pad)| EndpointRecord {
            key: EndpointKey { set_id, index },
            value: EndpointValue {
                ip: ipv4_mapped([10, 244, 0, 1]),
                port,
                pad,
                identity: 1,
            },
        });
    let workload = (
        (0u8..3).prop_map(|x| ipv4_mapped([10, 244, 1, x])),
        prop_oneof![30 => Just(0u32), 1 => Just(1u32)],
    )
        .prop_map(|(ip, pad)| WorkloadRecord {
            ip,
            identity: 1,
            pad,
        });
    (
        prop_oneof![30 => 0u32..3, 1 => 3u32..5],
        vec(service, 0..4),
        vec(route, 0..4),
        vec(set, 0..4),
        vec(endpoint, 0..6),
        vec(workload, 0..3),
        prop_oneof![6 => Just(true), 1 => Just(false)],
        prop_oneof![3 => Just(true), 1 => Just(false)],
    )
        .prop_map(
            |(mode, services, routes, backend_sets, endpoints, workloads, sorted, link)| {
                let mut s = Snapshot {
                    node_name: "node-a1".into(),
                    generation: 1,
                    config: NodeConfig { mode, flags: 0 },
                    services,
                    routes,
                    backend_sets,
                    endpoints,
                    workloads,
                    authz: Default::default(),
                };
                if sorted {
                    s.sort();
                    s.services.dedup_by_key(|r| r.key);
                    s.routes.dedup_by_key(|r| r.route_id);
                    s.backend_sets.dedup_by_key(|r| r.set_id);
                    s.endpoints.dedup_by_key(|r| r.key);
                    s.workloads.dedup_by_key(|r| r.ip);
                }
                if link {
                    link_references(&mut s);
                }
                s
            },
        )
}

/// Points services at existing routes and routes at existing sets (by position modulo the table
/// length, so the choice stays random), and gives every set exactly its endpoints, keeping the
/// field values of the generated endpoints (ports, pads) where there are some.
fn link_references(s: &mut Snapshot) {
    let route_ids: Vec<u32> = s.routes.iter().map(|r| r.route_id).collect();
    let set_ids: Vec<u32> = s.backend_sets.iter().map(|r| r.set_id).collect();
    for service in &mut s.services {
        if let Some(&id) = route_ids.get(service.value.route_id as usize % route_ids.len().max(1)) {
            service.value.route_id = id;
        }
    }
    for route in &mut s.routes {
        let count = (route.value.destination_count as usize).min(MAX_ROUTE_DESTINATIONS);
        for slot in &mut route.value.backend_set[..count] {
            if let Some(&id) = set_ids.get(*slot as usize % set_ids.len().max(1)) {
                *slot = id;
            }
        }
    }
    let templates = std::mem::take(&mut s.endpoints);
    let mut templates = templates.iter().cycle();
    for set in &s.backend_sets {
        for index in 0..set.value.endpoint_count {
            let value = templates.next().map_or(
                EndpointValue {
                    ip: ipv4_mapped([10, 244, 0, 2]),
                    port: 8080,
                    pad: 0,
                    identity: 2,
                },
                |e| e.value,
            );
            s.endpoints.push(EndpointRecord {
                key: EndpointKey {
                    set_id: set.set_id,
                    index,
                },
                value,
            });
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..512)) {
        check(&bytes)?;
    }

    #[test]
    fn arbitrary_bytes_behind_a_valid_header_never_panic(tail in vec(any::<u8>(), 0..512)) {
        let mut bytes = header_prefix();
        bytes.extend_from_slice(&tail);
        fix(&mut bytes);
        check(&bytes)?;
    }

    #[test]
    fn arbitrary_sections_never_panic(
        sections in (
            arb_section(1, 8, config_records()),
            arb_section(2, 28, random_records(28)),
            arb_section(3, 140, random_records(140)),
            arb_section(4, 12, random_records(12)),
            arb_section(5, 32, random_records(32)),
            arb_section(6, 24, random_records(24)),
        ),
        trailing in vec(any::<u8>(), 0..3),
    ) {
        let mut bytes = header_prefix();
        let (a, b, c, d, e, f) = sections;
        for s in [a, b, c, d, e, f] {
            bytes.extend_from_slice(&s);
        }
        bytes.extend_from_slice(&trailing);
        fix(&mut bytes);
        check(&bytes)?;
    }

    #[test]
    fn mutations_of_a_valid_encoding_never_panic(
        writes in vec((any::<usize>(), any::<u8>()), 1..6),
        cut in prop_oneof![4 => Just(None), 1 => any::<usize>().prop_map(Some)],
        refix in prop_oneof![3 => Just(true), 1 => Just(false)],
    ) {
        let mut bytes = sample().encode().unwrap();
        for (at, value) in writes {
            let len = bytes.len();
            bytes[at % len] = value;
        }
        if let Some(cut) = cut {
            bytes.truncate(cut % (bytes.len() + 1));
        }
        if refix && bytes.len() >= 40 {
            fix(&mut bytes);
        }
        check(&bytes)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    /// The builder's snapshots are valid, and survive the round trip exactly.
    #[test]
    fn built_snapshots_round_trip(s in arb_valid_snapshot()) {
        let bytes = s.encode().map_err(|e| TestCaseError::fail(e.to_string()))?;
        let decoded = Snapshot::decode(&bytes, &Limits::default())
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&decoded.snapshot, &s);
        prop_assert_eq!(decoded.snapshot.encode().unwrap(), bytes);
    }

    /// Mutations of random valid snapshots, with the hash recomputed so that the mutated record
    /// reaches validation.
    #[test]
    fn mutations_of_built_snapshots_never_panic(
        s in arb_valid_snapshot(),
        writes in vec((any::<usize>(), any::<u8>()), 1..4),
    ) {
        let mut bytes = s.encode().unwrap();
        for (at, value) in writes {
            // Leave the fixed header alone: its fields are covered by the other tests.
            let len = bytes.len() - 40;
            bytes[40 + at % len] = value;
        }
        fix(&mut bytes);
        check(&bytes)?;
    }

    /// The encoder and the decoder agree on validity: the encoder accepts exactly what the decoder
    /// accepts, with the same error, and what they accept round-trips.
    #[test]
    fn encoder_and_decoder_agree(s in arb_raw_snapshot()) {
        let raw = encode_unchecked(&s).unwrap();
        let decoded = Snapshot::decode(&raw, &Limits::UNLIMITED);
        match s.encode() {
            Ok(bytes) => {
                prop_assert_eq!(&bytes, &raw);
                prop_assert_eq!(decoded.map(|d| d.snapshot), Ok(s));
            }
            Err(crate::EncodeError::Invalid(e)) => {
                prop_assert_eq!(decoded, Err(crate::DecodeError::Invalid(e)));
            }
            Err(e) => return Err(TestCaseError::fail(e.to_string())),
        }
    }
}
