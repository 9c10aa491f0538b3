//! Property tests: the decoder never panics, whatever the input, and whatever it accepts is canonical
//! (re-encoding gives the same bytes). Inputs range from random bytes to near-valid snapshots, so
//! that every stage of the decoder is reached: header, section framing and content validation.

use std::collections::HashSet;
use std::net::IpAddr;

use kmesh_common::authz::{
    ANY_CLASS, ANY_PORT, AuthzPolicyRecord, AuthzSourceKey, AuthzSourceRecord, AuthzSourceValue,
    AuthzVerdict, AuthzVerdictKey, AuthzVerdictRecord, AuthzWorkloadRecord, AuthzWorkloadValue,
    MAX_POLICY_NAME_LEN, UNKNOWN_SOURCE, authz_action, authz_policy_kind, authz_reason,
    resolve_verdict,
};
use kmesh_common::{
    BackendSetRecord, BackendSetValue, EndpointKey, EndpointRecord, EndpointValue, LAYOUT_VERSION,
    MAX_ROUTE_DESTINATIONS, NodeConfig, RouteRecord, RouteValue, ServiceKey, ServiceRecord,
    ServiceValue, WorkloadRecord, ip16, ipv4_mapped, service_flags,
};
use proptest::collection::vec;
use proptest::prelude::*;

use crate::builder::{Endpoint, SnapshotBuilder};
use crate::encode::encode_unchecked;
use crate::tests::{fix, sample};
use crate::{
    AuthzTables, FORMAT_VERSION, Format, Limits, MAGIC, NameTables, ServiceName, Snapshot,
    WorkloadName, peek_header,
};
use kmesh_common::names::{NO_NAME, ServiceNameRecord, WorkloadNameRecord};

/// Decodes with both limit sets and checks the canonical-encoding property. Panics only on a real
/// failure of the property (an input that the decoder accepts but would not have produced).
fn check(bytes: &[u8]) -> Result<(), TestCaseError> {
    let _ = peek_header(bytes);
    let _ = Snapshot::decode(bytes, &Limits::default());
    if let Ok(decoded) = Snapshot::decode(bytes, &Limits::UNLIMITED) {
        let again = decoded.snapshot.encode_as(decoded.format);
        prop_assert_eq!(
            again.as_deref(),
            Ok(bytes),
            "accepted input is not canonical"
        );
    }
    Ok(())
}

/// A valid format 2 fixed header and node name, ready for sections to be appended; `fix` sets
/// length and hash afterwards.
fn header_prefix() -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&Format::V2.number().to_le_bytes());
    out.extend_from_slice(&LAYOUT_VERSION.to_le_bytes());
    out.extend_from_slice(&[0; 4 + 8 + 8 + 8]);
    out.extend_from_slice(&7u16.to_le_bytes());
    out.extend_from_slice(b"node-a1");
    out.resize(56, 0);
    out
}

/// A valid format 3 header and node name; the caller appends the node part's sections, sets
/// `cluster_offset` with [`set_cluster_offset`], appends the cluster part's, and `fix`es.
fn header_prefix_v3() -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&LAYOUT_VERSION.to_le_bytes());
    out.extend_from_slice(&[0; 4 + 8 + 8 + 8 + 8]);
    out.extend_from_slice(&7u16.to_le_bytes());
    out.extend_from_slice(b"node-a1");
    out.resize(64, 0);
    out
}

/// Sets format 3's `cluster_offset` to where `bytes` ends now.
fn set_cluster_offset(bytes: &mut [u8]) {
    let offset = bytes.len() as u64;
    bytes[40..48].copy_from_slice(&offset.to_le_bytes());
}

/// Random records of `size` bytes.
fn random_records(size: u32) -> impl Strategy<Value = Vec<Vec<u8>>> {
    vec(vec(any::<u8>(), size as usize), 0..4)
}

/// A NodeConfig section body: usually one valid record, so that the later sections are reached.
fn config_records() -> impl Strategy<Value = Vec<Vec<u8>>> {
    prop_oneof![
        8 => (0u8..3, 0u8..2, 1u8..6).prop_map(|(mode, access_log, log_level)| {
            vec![vec![mode, 0, 0, 0, access_log, log_level, 0, 0]]
        }),
        1 => random_records(8),
    ]
}

/// A string table's chunks: usually one entry `\x03\x00abc` and padding, sometimes random.
fn string_chunks() -> impl Strategy<Value = Vec<Vec<u8>>> {
    prop_oneof![
        4 => Just(vec![vec![3, 0, b'a', b'b', b'c', 0, 0, 0]]),
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
    let workloads = vec((arb_ip(), any::<u32>(), any::<bool>()), 0..4);
    let names = vec(
        prop_oneof![4 => "[a-z][a-z0-9-]{0,12}", 1 => Just(String::new()), 1 => "\\PC{1,20}"],
        5,
    );
    (
        names,
        (
            "[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?(\\.[a-z0-9]{1,4}){0,2}",
            any::<u64>(),
            (0u32..3, 0u8..2, 1u8..6),
            sets,
            services,
            workloads,
            prop_oneof![1 => Just(None), 3 => arb_authz_plan().prop_map(Some)],
        ),
    )
        .prop_map(
            |(
                strings,
                (name, generation, (mode, access_log, log_level), sets, services, workloads, authz),
            )| {
                let pick = |i: usize| strings[i % strings.len()].as_str();
                let mut b = SnapshotBuilder::new(&name, generation, mode);
                b.agent_settings(access_log, log_level);
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
                    let route = b.route(&destinations);
                    let service_id = if port % 3 == 0 {
                        b.waypoint_service(ip, port, route)
                    } else {
                        b.service_with_route(ip, port, route)
                    };
                    if port % 2 == 0 {
                        let host = pick(port as usize);
                        let host = if host.is_empty() { "host" } else { host };
                        let names = ServiceName {
                            host,
                            name: pick(port as usize + 1),
                            namespace: pick(port as usize + 2),
                        };
                        b.service_names(service_id, &names);
                    }
                }
                let mut seen = HashSet::new();
                for (ip, identity, named) in workloads {
                    if seen.insert(ip) {
                        b.workload(ip, identity);
                        if named {
                            let i = identity as usize;
                            let names = WorkloadName {
                                workload: pick(i),
                                namespace: pick(i + 1),
                                service_account: pick(i + 2),
                                app: pick(i + 3),
                                version: pick(i + 4),
                            };
                            b.workload_names(ip, &names);
                        }
                    }
                }
                if let Some(authz) = authz {
                    authz.add_to(&mut b);
                }
                b.build()
            },
        )
}

/// What the workload default rule promises the kernel: a connection to any authorization
/// workload, from a source of any class (those of the sources, the unknown source, a class no
/// source has), to any port, finds a verdict in the chain.
fn every_connection_finds_a_verdict(s: &Snapshot) -> Result<(), TestCaseError> {
    let lookup = |k: &AuthzVerdictKey| {
        let i = s.authz.verdicts.binary_search_by_key(k, |v| v.key).ok()?;
        Some(s.authz.verdicts[i].value)
    };
    let classes = s.authz.sources.iter().map(|r| r.value.source_class);
    let classes: Vec<u32> = classes.chain([0, 1, 7, 1000]).collect();
    for w in &s.authz.workloads {
        for &class in &classes {
            for port in [1, 80, 443, 8080, 9090, u16::MAX] {
                let found = resolve_verdict(w.value.policy_set, class, port, lookup);
                prop_assert!(
                    found.is_some(),
                    "set {} class {class} port {port}",
                    w.value.policy_set
                );
            }
        }
    }
    Ok(())
}

/// Valid authorization tables, before the builder sorts them: what [`arb_authz_plan`] makes.
#[derive(Clone, Debug)]
struct AuthzPlan {
    /// `(id, is a PeerAuthentication, name)`.
    policies: Vec<(u32, bool, String)>,
    /// Per verdict set: its default and its other entries, each `(class, port, reason, pick)`:
    /// `pick` chooses the deciding policy among those of the kind the reason needs.
    sets: Vec<Vec<(u32, u16, u8, usize)>>,
    /// `(address, pick of the set)`.
    workloads: Vec<(IpAddr, usize)>,
    /// `(address, CIDR prefix length, class)`, made canonical and single-family by `add_to`.
    sources: Vec<(IpAddr, u32, u32)>,
}

/// Valid authorization tables of random shape: 1-4 verdict sets of random entries (every reason,
/// the wildcards), workloads of both families, source blocks of every length.
fn arb_authz_plan() -> impl Strategy<Value = AuthzPlan> {
    let name = "[a-z0-9]{1,5}(-[a-z0-9]{1,3})?/[a-z0-9]{1,5}([.-][a-z0-9]{1,4}){0,3}";
    let policies = vec((1u32..40, any::<bool>(), name), 0..5);
    let class = prop_oneof![3 => 1u32..6, 1 => Just(ANY_CLASS)];
    let port = prop_oneof![2 => Just(ANY_PORT), 1 => Just(80u16), 1 => Just(8080u16), 1 => 1u16..];
    let entry = (class, port, 1..authz_reason::COUNT, any::<usize>());
    let sets = vec(
        (1..authz_reason::COUNT, any::<usize>(), vec(entry, 0..6)),
        1..4,
    )
    .prop_map(|sets| {
        sets.into_iter()
            .map(|(reason, pick, mut entries)| {
                entries.insert(0, (ANY_CLASS, ANY_PORT, reason, pick));
                entries
            })
            .collect()
    });
    let workloads = vec((arb_ip(), any::<usize>()), 1..5);
    let sources = vec((arb_ip(), 0u32..=128, 1u32..20), 0..6);
    (policies, sets, workloads, sources).prop_map(|(policies, sets, workloads, sources)| {
        AuthzPlan {
            policies,
            sets,
            workloads,
            sources,
        }
    })
}

impl AuthzPlan {
    /// Adds the plan's tables through the builder, leaving out what would break a rule: repeated
    /// keys, and reasons that need a policy of a kind the plan has none of (those become the
    /// no-policy reason of the same action).
    fn add_to(&self, b: &mut SnapshotBuilder) {
        let mut ids = HashSet::new();
        let mut authorization = Vec::new();
        let mut peer = Vec::new();
        for (id, is_peer, name) in &self.policies {
            if !ids.insert(*id) {
                continue;
            }
            let kind = if *is_peer {
                peer.push(*id);
                authz_policy_kind::PEER_AUTHENTICATION
            } else {
                authorization.push(*id);
                authz_policy_kind::AUTHORIZATION_POLICY
            };
            b.authz_policy(*id, kind, name);
        }
        let mut keys = HashSet::new();
        for (set, entries) in (1u32..).zip(&self.sets) {
            for &(class, port, reason, pick) in entries {
                if !keys.insert((set, class, port)) {
                    continue;
                }
                let (action, reason, policy) = valid_verdict(reason, pick, &authorization, &peer);
                b.authz_verdict(set, class, port, action, reason, policy);
            }
        }
        let mut seen = HashSet::new();
        for &(ip, pick) in &self.workloads {
            if seen.insert(ip16(ip)) {
                b.authz_workload(ip, 1 + (pick % self.sets.len()) as u32);
            }
        }
        let mut seen = HashSet::new();
        for &(ip, prefix_len, class) in &self.sources {
            let (ip, prefix_len) = canonical_block(ip, prefix_len);
            // The stored key: an IPv4 block and its IPv4-mapped IPv6 form are one.
            let stored = prefix_len + if ip.is_ipv4() { 96 } else { 0 };
            if seen.insert((ip16(ip), stored)) {
                b.authz_source(ip, prefix_len, class);
            }
        }
    }
}

/// The verdict `reason` gives, with its action and a deciding policy of the kind it needs (picked
/// with `pick`); the no-policy reason of the same action when there is no such policy.
fn valid_verdict(reason: u8, pick: usize, authorization: &[u32], peer: &[u32]) -> (u8, u8, u32) {
    use authz_reason::*;
    let allow = matches!(reason, NO_ALLOW_POLICY | ALLOW_MATCHED);
    let action = if allow {
        authz_action::ALLOW
    } else {
        authz_action::DENY
    };
    let candidates = match reason {
        NO_ALLOW_POLICY | NO_ALLOW_MATCHED => return (action, reason, 0),
        STRICT_MTLS => peer,
        _ => authorization,
    };
    match candidates.get(pick % candidates.len().max(1)) {
        Some(&policy) => (action, reason, policy),
        None if allow => (action, NO_ALLOW_POLICY, 0),
        None => (action, NO_ALLOW_MATCHED, 0),
    }
}

/// `ip/prefix_len` (CIDR terms; at most 32 for IPv4) as a valid source block: the address masked
/// to its network address. An IPv6 block shorter than 96 bits that would hold the IPv4-mapped
/// range becomes the host route of the address instead.
fn canonical_block(ip: IpAddr, prefix_len: u32) -> (IpAddr, u32) {
    match ip {
        IpAddr::V4(v4) => {
            let len = prefix_len.min(32);
            let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
            (IpAddr::from((u32::from(v4) & mask).to_be_bytes()), len)
        }
        IpAddr::V6(v6) => {
            let mask = |len: u32| u128::MAX.checked_shl(128 - len).unwrap_or(0);
            let mapped = u128::from_be_bytes(ipv4_mapped([0, 0, 0, 0]));
            let net = u128::from(v6) & mask(prefix_len);
            if prefix_len < 96 && net == mapped & mask(prefix_len) {
                return (ip, 128);
            }
            (IpAddr::from(net.to_be_bytes()), prefix_len)
        }
    }
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
        prop_oneof![20 => Just(0u32), 10 => Just(service_flags::WAYPOINT), 1 => 2u32..8],
    )
        .prop_map(|(ip, port, protocol, pad, route_id, flags)| ServiceRecord {
            key: ServiceKey {
                ip,
                port,
                protocol,
                pad,
            },
            value: ServiceValue {
                service_id: 1,
                route_id,
                flags,
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
    let config = (
        prop_oneof![30 => 0u32..3, 1 => 3u32..5],
        prop_oneof![30 => 0u8..2, 1 => 2u8..4],
        prop_oneof![30 => 1u8..6, 1 => Just(0u8), 1 => 6u8..8],
        prop_oneof![30 => Just([0u8; 2]), 1 => Just([0u8, 1])],
    )
        .prop_map(|(mode, access_log, log_level, reserved)| NodeConfig {
            mode,
            access_log,
            log_level,
            reserved,
        });
    (
        config,
        vec(service, 0..4),
        vec(route, 0..4),
        vec(set, 0..4),
        vec(endpoint, 0..6),
        vec(workload, 0..3),
        prop_oneof![6 => Just(true), 1 => Just(false)],
        prop_oneof![3 => Just(true), 1 => Just(false)],
        prop_oneof![1 => Just(AuthzTables::default()), 3 => arb_raw_authz()],
        prop_oneof![1 => Just(NameTables::default()), 3 => arb_raw_names()],
    )
        .prop_map(
            |(
                config,
                services,
                routes,
                backend_sets,
                endpoints,
                workloads,
                sorted,
                link,
                authz,
                names,
            )| {
                let mut s = Snapshot {
                    node_name: "node-a1".into(),
                    generation: 1,
                    config,
                    services,
                    routes,
                    backend_sets,
                    endpoints,
                    workloads,
                    authz,
                    names,
                };
                if sorted {
                    s.sort();
                    s.services.dedup_by_key(|r| r.key);
                    s.routes.dedup_by_key(|r| r.route_id);
                    s.backend_sets.dedup_by_key(|r| r.set_id);
                    s.endpoints.dedup_by_key(|r| r.key);
                    s.workloads.dedup_by_key(|r| r.ip);
                    s.authz.workloads.dedup_by_key(|r| r.ip);
                    s.authz.sources.dedup_by_key(|r| r.key);
                    s.authz.verdicts.dedup_by_key(|r| r.key);
                    s.authz.policies.dedup_by_key(|r| r.policy);
                    s.names.workloads.dedup_by_key(|r| r.ip);
                    s.names.services.dedup_by_key(|r| r.service_id);
                }
                if link {
                    link_references(&mut s);
                    link_authz(&mut s);
                }
                s
            },
        )
}

/// Names sections whose string table usually is well formed (occasionally an empty, too long,
/// non-UTF-8, repeated or overrunning entry, or non-zero padding) and whose records usually refer to
/// its entries (occasionally to no entry, or to a service that does not exist).
fn arb_raw_names() -> impl Strategy<Value = NameTables> {
    let entry = prop_oneof![
        20 => "[a-z]{1,6}".prop_map(String::into_bytes),
        1 => Just(Vec::new()),
        1 => Just(vec![0xff, 0xfe]),
        1 => Just(vec![b'x'; 254]),
    ];
    let reference = prop_oneof![
        20 => any::<usize>().prop_map(Some),
        2 => Just(None),
        1 => (0u32..64).prop_map(|o| Some(usize::MAX - o as usize)),
    ];
    let workload = (0u8..3, vec(reference.clone(), 5));
    let service = (
        prop_oneof![20 => Just(1u32), 1 => Just(2u32)],
        vec(reference, 3),
    );
    (
        vec(entry, 0..5),
        prop_oneof![20 => Just(None), 1 => Just(Some(0usize)), 1 => Just(Some(1usize))],
        prop_oneof![20 => Just(0u8), 1 => 1u8..],
        vec(workload, 0..3),
        vec(service, 0..2),
    )
        .prop_map(|(entries, flaw, tail, workloads, services)| {
            let mut strings = Vec::new();
            let mut offsets = Vec::new();
            for entry in &entries {
                offsets.push(strings.len() as u32);
                strings.extend_from_slice(&(entry.len() as u16).to_le_bytes());
                strings.extend_from_slice(entry);
            }
            match (flaw, entries.first()) {
                // The first entry again.
                (Some(0), Some(first)) => {
                    strings.extend_from_slice(&(first.len() as u16).to_le_bytes());
                    strings.extend_from_slice(first);
                }
                // An entry claiming more bytes than the table has.
                (Some(1), _) => strings.extend_from_slice(&200u16.to_le_bytes()),
                _ => {}
            }
            let unpadded = strings.len();
            strings.resize(unpadded.next_multiple_of(8), 0);
            if let Some(pad) = strings.get_mut(unpadded) {
                *pad = tail;
            }
            // Some(i): the i-th entry (or, past them, a made-up offset); None: no name.
            let offset = |r: &Option<usize>| match r {
                None => NO_NAME,
                Some(i) if *i > usize::MAX - 64 => (usize::MAX - i) as u32,
                Some(i) => offsets.get(i % offsets.len().max(1)).copied().unwrap_or(3),
            };
            let workloads = workloads
                .iter()
                .map(|(ip, r)| WorkloadNameRecord {
                    ip: ipv4_mapped([10, 244, 1, *ip]),
                    workload: offset(&r[0]),
                    namespace: offset(&r[1]),
                    service_account: offset(&r[2]),
                    app: offset(&r[3]),
                    version: offset(&r[4]),
                })
                .collect();
            let services = services
                .iter()
                .map(|(service_id, r)| ServiceNameRecord {
                    service_id: *service_id,
                    host: offset(&r[0]),
                    name: offset(&r[1]),
                    namespace: offset(&r[2]),
                })
                .collect();
            NameTables {
                strings,
                workloads,
                services,
            }
        })
}

/// Authorization tables with fields from small ranges, each occasionally wrong (pads, unknown
/// actions, reasons and kinds, the reserved classes, prefixes too long, of mixed families or not
/// canonical, bad names), so that every rule of sections 7-10 sometimes holds and sometimes not.
fn arb_raw_authz() -> impl Strategy<Value = AuthzTables> {
    let workload = (
        (0u8..3).prop_map(|x| ipv4_mapped([10, 244, 1, x])),
        1u32..4,
        prop_oneof![30 => Just(0u32), 1 => Just(1u32)],
    )
        .prop_map(|(ip, policy_set, pad)| AuthzWorkloadRecord {
            ip,
            value: AuthzWorkloadValue { policy_set, pad },
        });
    let source = (
        prop_oneof![
            20 => Just(96 + 24),
            20 => Just(128),
            1 => Just(129),
            1 => Just(80),
            1 => Just(0),
        ],
        (0u8..3, prop_oneof![20 => Just(0u8), 1 => Just(1u8)]),
        prop_oneof![20 => 1u32..4, 1 => Just(UNKNOWN_SOURCE), 1 => Just(ANY_CLASS)],
    )
        .prop_map(
            |(prefix_len, (net, host), source_class)| AuthzSourceRecord {
                key: AuthzSourceKey {
                    prefix_len,
                    ip: ipv4_mapped([10, net, 0, host]),
                },
                value: AuthzSourceValue { source_class },
            },
        );
    let verdict = (
        (
            1u32..4,
            prop_oneof![3 => 1u32..3, 1 => Just(ANY_CLASS)],
            prop_oneof![1 => Just(ANY_PORT), 1 => Just(80u16)],
            prop_oneof![30 => Just(0u16), 1 => Just(1u16)],
        ),
        (
            // None: the action the reason goes with.
            prop_oneof![20 => Just(None), 1 => (0u8..4).prop_map(Some)],
            prop_oneof![30 => 1..authz_reason::COUNT, 1 => Just(0u8), 1 => Just(authz_reason::COUNT)],
            prop_oneof![3 => Just(0u32), 3 => 1u32..4, 1 => Just(9u32)],
            prop_oneof![30 => Just(0u16), 1 => Just(1u16)],
        ),
    )
        .prop_map(|((policy_set, source_class, port, key_pad), (action, reason, policy, pad))| {
            let allowing = matches!(
                reason,
                authz_reason::NO_ALLOW_POLICY | authz_reason::ALLOW_MATCHED
            );
            let action = action.unwrap_or(if allowing {
                authz_action::ALLOW
            } else {
                authz_action::DENY
            });
            AuthzVerdictRecord {
                key: AuthzVerdictKey {
                    policy_set,
                    source_class,
                    port,
                    pad: key_pad,
                },
                value: AuthzVerdict {
                    policy,
                    action,
                    reason,
                    pad,
                },
            }
        });
    let policy = (
        prop_oneof![20 => 1u32..4, 1 => Just(0u32)],
        prop_oneof![20 => 1u8..3, 1 => Just(3u8)],
        prop_oneof![30 => Just(0u8), 1 => Just(1u8)],
        prop_oneof![
            20 => Just("default/allow"),
            20 => Just("istio-system/default"),
            1 => Just(""),
            1 => Just("no-slash"),
            1 => Just("Ns/x"),
            1 => Just("ns/x."),
        ],
        prop_oneof![30 => Just(None), 1 => (0..MAX_POLICY_NAME_LEN, 1u8..).prop_map(Some)],
    )
        .prop_map(|(policy, kind, pad, name, stray)| {
            let mut record = AuthzPolicyRecord {
                policy,
                name_len: name.len() as u16,
                kind,
                pad,
                name: [0; MAX_POLICY_NAME_LEN],
            };
            record.name[..name.len()].copy_from_slice(name.as_bytes());
            if let Some((at, value)) = stray {
                record.name[at] = value;
            }
            record
        });
    (
        vec(workload, 0..3),
        vec(source, 0..4),
        vec(verdict, 0..6),
        vec(policy, 0..4),
    )
        .prop_map(|(workloads, sources, verdicts, policies)| AuthzTables {
            workloads,
            sources,
            verdicts,
            policies,
        })
}

/// Makes the references of the authorization tables mostly hold: every workload's set gets a
/// default verdict when it has none (so that the other rules decide), and a verdict whose policy
/// is missing points at an existing one.
fn link_authz(s: &mut Snapshot) {
    let a = &mut s.authz;
    let ids: Vec<u32> = a.policies.iter().map(|p| p.policy).collect();
    for v in &mut a.verdicts {
        if v.value.policy != 0 && !ids.contains(&v.value.policy) {
            v.value.policy = ids
                .get(v.value.policy as usize % ids.len().max(1))
                .copied()
                .unwrap_or(0);
        }
    }
    for set in a
        .workloads
        .iter()
        .map(|w| w.value.policy_set)
        .collect::<Vec<_>>()
    {
        let key = AuthzVerdictKey {
            policy_set: set,
            source_class: ANY_CLASS,
            port: ANY_PORT,
            pad: 0,
        };
        if let Err(at) = a.verdicts.binary_search_by_key(&key, |v| v.key) {
            let value = AuthzVerdict {
                policy: 0,
                action: authz_action::ALLOW,
                reason: authz_reason::NO_ALLOW_POLICY,
                pad: 0,
            };
            a.verdicts.insert(at, AuthzVerdictRecord { key, value });
        }
    }
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
            arb_section(7, 24, random_records(24)),
            arb_section(8, 24, random_records(24)),
            arb_section(9, 20, random_records(20)),
            arb_section(10, 328, random_records(328)),
        ),
        names in (
            arb_section(11, 8, string_chunks()),
            arb_section(12, 36, random_records(36)),
            arb_section(13, 16, random_records(16)),
        ),
        trailing in vec(any::<u8>(), 0..3),
    ) {
        let mut bytes = header_prefix();
        let (a, b, c, d, e, f, g, h, i, j) = sections;
        let (k, l, m) = names;
        for s in [a, b, c, d, e, f, g, h, i, j, k, l, m] {
            bytes.extend_from_slice(&s);
        }
        bytes.extend_from_slice(&trailing);
        fix(&mut bytes);
        check(&bytes)?;
    }

    /// Format 3's framing: the node part's six sections, then the cluster part's seven.
    #[test]
    fn arbitrary_sections_of_format_3_never_panic(
        node in (
            arb_section(1, 8, config_records()),
            arb_section(6, 24, random_records(24)),
            arb_section(7, 24, random_records(24)),
            arb_section(8, 24, random_records(24)),
            arb_section(9, 20, random_records(20)),
            arb_section(10, 328, random_records(328)),
        ),
        cluster in (
            arb_section(2, 28, random_records(28)),
            arb_section(3, 140, random_records(140)),
            arb_section(4, 12, random_records(12)),
            arb_section(5, 32, random_records(32)),
            arb_section(11, 8, string_chunks()),
            arb_section(12, 36, random_records(36)),
            arb_section(13, 16, random_records(16)),
        ),
        trailing in vec(any::<u8>(), 0..3),
    ) {
        let mut bytes = header_prefix_v3();
        let (a, b, c, d, e, f) = node;
        for s in [a, b, c, d, e, f] {
            bytes.extend_from_slice(&s);
        }
        set_cluster_offset(&mut bytes);
        let (g, h, i, j, k, l, m) = cluster;
        for s in [g, h, i, j, k, l, m] {
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
        prop_assert_eq!(&decoded.snapshot.encode().unwrap(), &bytes);
        every_connection_finds_a_verdict(&s)?;
        // The parts, encoded apart, are the same bytes; format 2 holds the same snapshot.
        let (node, cluster) = s.clone().into_parts();
        let cluster = cluster.encode().map_err(|e| TestCaseError::fail(e.to_string()))?;
        let mut joined = node
            .encode(s.generation, cluster.summary())
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        joined.extend_from_slice(cluster.bytes());
        prop_assert_eq!(&joined, &bytes);
        let v2 = s.encode_as(Format::V2).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let decoded = Snapshot::decode(&v2, &Limits::default())
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(decoded.snapshot, s);
        prop_assert_eq!(decoded.format, Format::V2);
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
        let raw = encode_unchecked(&s, crate::Format::V4).unwrap();
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
