//! The input of the `snapshot_roundtrip` fuzz target: a plan that [`SnapshotPlan::build`] turns
//! into a snapshot that is valid by construction (through `kmesh_snapshot::builder`; the
//! authorization tables through [`crate::authz_plan`]), and an optional [`Edit`] that changes one
//! field or record afterwards, which may make it invalid.
//!
//! The oracle ([`check_plan`]): a valid snapshot is accepted by the encoder and
//! `decode(encode(s)) == s`, under the node's default limits too; an edited one is either refused by
//! the encoder or round-trips the same way, in both formats (2 and 3); the format 3 encoding is the
//! snapshot's node and cluster parts encoded apart. Every encoding is also put through the decoder
//! oracle of [`crate::decode_check`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use arbitrary::Arbitrary;
use kmesh_common::{RouteValue, ip16, lb_policy};
use kmesh_snapshot::builder::{Endpoint, SnapshotBuilder};
use kmesh_snapshot::delta_format::{Delta, delta_between};
use kmesh_snapshot::{Format, Limits, ServiceName, Snapshot, WorkloadName};

use crate::authz_plan::{self, AuthzEdit, AuthzPlan};
use crate::decode_check;

/// A snapshot to build, then perhaps break.
#[derive(Arbitrary, Debug)]
pub struct SnapshotPlan {
    /// Labels of the node name; mapped onto `a-z0-9-` and trimmed to a valid DNS subdomain.
    node_labels: Vec<Vec<u8>>,
    generation: u64,
    /// Taken modulo the three modes.
    mode: u8,
    access_log: bool,
    /// Taken modulo the five levels.
    log_level: u8,
    sets: Vec<SetPlan>,
    services: Vec<ServicePlan>,
    workloads: Vec<(Addr, u32)>,
    authz: Option<AuthzPlan>,
    names: NamesPlan,
    edit: Option<Edit>,
}

/// The names sections: strings (each mapped to a label; an empty one is no name) and which of
/// them each named address and service takes.
#[derive(Arbitrary, Debug)]
struct NamesPlan {
    strings: Vec<Vec<u8>>,
    /// An address and the indexes (into `strings`) of its five names.
    workloads: Vec<(Addr, [u8; 5])>,
    /// For the service at this index (modulo the services built): its three names.
    services: Vec<(u8, [u8; 3])>,
}

#[derive(Arbitrary, Debug)]
struct SetPlan {
    source_ip_hash: bool,
    endpoints: Vec<(Addr, u16, u32)>,
}

#[derive(Arbitrary, Debug)]
struct ServicePlan {
    addr: Addr,
    port: u16,
    /// `(weight, index into the sets)`; weights are scaled down so sixteen cannot overflow.
    destinations: Vec<(u32, u8)>,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
pub(crate) enum Addr {
    V4([u8; 4]),
    V6([u8; 16]),
}

impl Addr {
    pub(crate) fn ip(self) -> IpAddr {
        match self {
            Addr::V4(o) => IpAddr::V4(Ipv4Addr::from(o)),
            Addr::V6(o) => IpAddr::V6(Ipv6Addr::from(o)),
        }
    }
}

/// One change to a built snapshot; `index` picks a record modulo the table's length.
#[derive(Arbitrary, Debug, Clone)]
enum Edit {
    Mode(u32),
    AgentSettings {
        access_log: u8,
        log_level: u8,
        reserved: [u8; 2],
    },
    NodeName(Vec<u8>),
    ServicePort {
        index: usize,
        port: u16,
    },
    ServiceProtocol {
        index: usize,
        protocol: u8,
    },
    ServicePad {
        index: usize,
        pad: u8,
    },
    ServiceRoute {
        index: usize,
        route_id: u32,
    },
    RouteCount {
        index: usize,
        count: u32,
    },
    RouteTotal {
        index: usize,
        total: u32,
    },
    RouteWeight {
        index: usize,
        slot: u8,
        weight: u32,
    },
    RouteSet {
        index: usize,
        slot: u8,
        set_id: u32,
    },
    SetPolicy {
        index: usize,
        policy: u32,
    },
    SetEndpointCount {
        index: usize,
        count: u32,
    },
    SetId {
        index: usize,
        set_id: u32,
    },
    EndpointKey {
        index: usize,
        set_id: u32,
        endpoint: u32,
    },
    EndpointPort {
        index: usize,
        port: u16,
    },
    EndpointPad {
        index: usize,
        pad: u16,
    },
    WorkloadPad {
        index: usize,
        pad: u32,
    },
    Duplicate {
        table: u8,
        index: usize,
    },
    Remove {
        table: u8,
        index: usize,
    },
    Swap {
        table: u8,
        a: usize,
        b: usize,
    },
    Authz(AuthzEdit),
    /// Overwrites a byte of the string table.
    NameByte {
        index: usize,
        value: u8,
    },
    /// Points a field (modulo the five) of a workload name at any offset.
    WorkloadNameField {
        index: usize,
        field: u8,
        offset: u32,
    },
    ServiceNameId {
        index: usize,
        service_id: u32,
    },
}

impl SnapshotPlan {
    /// The valid snapshot the plan describes (before its edit).
    pub fn build(&self) -> Snapshot {
        let mode = u32::from(self.mode % 3);
        let mut b = SnapshotBuilder::new(&self.node_name(), self.generation, mode);
        b.agent_settings(
            u8::from(self.access_log),
            self.log_level % 5 + kmesh_common::log_level::ERROR,
        );
        let mut set_ids = Vec::new();
        for set in &self.sets {
            let endpoints: Vec<Endpoint> = set
                .endpoints
                .iter()
                .map(|&(addr, port, identity)| Endpoint::new(addr.ip(), port.max(1), identity))
                .collect();
            let policy = if set.source_ip_hash {
                lb_policy::SOURCE_IP_HASH
            } else {
                lb_policy::RANDOM
            };
            set_ids.push(b.backend_set(policy, &endpoints));
        }
        let mut keys = std::collections::BTreeSet::new();
        let mut service_ids = Vec::new();
        for service in &self.services {
            let port = service.port.max(1);
            let destinations: Vec<(u32, u32)> = service
                .destinations
                .iter()
                .filter_map(|&(weight, set)| {
                    let set_id = *set_ids.get(usize::from(set) % set_ids.len().max(1))?;
                    Some((weight >> 4, set_id))
                })
                .collect();
            // The builder panics on a route with no representation (documented): leave those out,
            // and services whose VIP:port is taken.
            if RouteValue::from_weights(destinations.iter().copied()).is_err()
                || !keys.insert((ip16(service.addr.ip()), port))
            {
                continue;
            }
            let route = b.route(&destinations);
            service_ids.push(b.service_with_route(service.addr.ip(), port, route));
        }
        let mut workload_ips = std::collections::BTreeSet::new();
        for &(addr, identity) in &self.workloads {
            if workload_ips.insert(ip16(addr.ip())) {
                b.workload(addr.ip(), identity);
            }
        }
        if let Some(authz) = &self.authz {
            authz.add_to(&mut b);
        }
        self.names.add_to(&mut b, &service_ids);
        b.build()
    }

    /// A valid node name made of the plan's labels: at most 4 labels of at most 20 characters.
    fn node_name(&self) -> String {
        let labels: Vec<String> = self
            .node_labels
            .iter()
            .take(4)
            .map(|l| label(l, 20))
            .collect();
        if labels.is_empty() {
            "node".to_string()
        } else {
            labels.join(".")
        }
    }
}

impl NamesPlan {
    fn add_to(&self, b: &mut SnapshotBuilder, service_ids: &[u32]) {
        let strings: Vec<String> = self
            .strings
            .iter()
            .take(16)
            .map(|s| {
                if s.is_empty() {
                    String::new()
                } else {
                    label(s, 40)
                }
            })
            .collect();
        let pick = |i: u8| {
            strings
                .get(usize::from(i) % strings.len().max(1))
                .map_or("", String::as_str)
        };
        let mut seen = std::collections::BTreeSet::new();
        for &(addr, [w, n, sa, app, v]) in self.workloads.iter().take(16) {
            if !seen.insert(ip16(addr.ip())) {
                continue;
            }
            let names = WorkloadName {
                workload: pick(w),
                namespace: pick(n),
                service_account: pick(sa),
                app: pick(app),
                version: pick(v),
            };
            b.workload_names(addr.ip(), &names);
        }
        let mut named = std::collections::BTreeSet::new();
        for &(service, [host, name, namespace]) in &self.services {
            let Some(&id) = service_ids.get(usize::from(service) % service_ids.len().max(1)) else {
                continue;
            };
            if !named.insert(id) {
                continue;
            }
            let host = match pick(host) {
                "" => "host",
                host => host,
            };
            let names = ServiceName {
                host,
                name: pick(name),
                namespace: pick(namespace),
            };
            b.service_names(id, &names);
        }
    }
}

/// A DNS label made of `bytes`: mapped onto `a-z0-9-`, at most `max` characters, no `-` at either
/// end, `n` when empty.
pub(crate) fn label(bytes: &[u8], max: usize) -> String {
    const ALPHABET: &[u8; 37] = b"abcdefghijklmnopqrstuvwxyz0123456789-";
    let mut chars: Vec<u8> = bytes
        .iter()
        .take(max)
        .map(|&c| ALPHABET[usize::from(c) % ALPHABET.len()])
        .collect();
    for end in [0, chars.len().saturating_sub(1)] {
        if chars.get(end) == Some(&b'-') {
            chars[end] = b'x';
        }
    }
    if chars.is_empty() {
        chars.push(b'n');
    }
    String::from_utf8(chars).expect("ASCII")
}

/// The property of the module documentation, for one plan.
pub fn check_plan(plan: &SnapshotPlan) {
    let valid = plan.build();
    let bytes = valid
        .encode()
        .unwrap_or_else(|e| panic!("the encoder refuses a valid snapshot: {e}\n{valid:?}"));
    check_round_trip(&valid, &bytes);
    check_parts(&valid, &bytes);
    for format in [Format::V2, Format::V3] {
        let older = valid
            .encode_as(format)
            .unwrap_or_else(|e| panic!("the {format:?} encoder refuses a valid snapshot: {e}"));
        check_round_trip(&valid, &older);
    }

    let Some(edit) = &plan.edit else { return };
    let mut edited = valid.clone();
    apply(&mut edited, edit);
    match edited.encode() {
        Ok(edited_bytes) => {
            check_round_trip(&edited, &edited_bytes);
            check_delta(&valid, &bytes, &edited, &edited_bytes);
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

/// The delta from `base` (encoded as `base_bytes`) to `next` (as `next_bytes`), applied to `base`
/// decoded, is `next` decoded: tables, content hash and section hashes.
fn check_delta(base: &Snapshot, base_bytes: &[u8], next: &Snapshot, next_bytes: &[u8]) {
    let delta = delta_between(base, next)
        .unwrap_or_else(|e| panic!("the delta between two valid snapshots is refused: {e}"));
    let held = Snapshot::decode(base_bytes, &Limits::UNLIMITED).expect("checked above");
    let result = Delta::decode(&delta, &Limits::UNLIMITED)
        .unwrap_or_else(|e| panic!("a delta as encoded does not decode: {e}"))
        .apply(&held, &Limits::UNLIMITED)
        .unwrap_or_else(|e| panic!("a delta does not apply to its base: {e}"));
    let expected = Snapshot::decode(next_bytes, &Limits::UNLIMITED).expect("checked above");
    assert_eq!(result, expected, "base + delta(base, next) != next");
}

fn check_round_trip(snapshot: &Snapshot, bytes: &[u8]) {
    let decoded = Snapshot::decode(bytes, &Limits::UNLIMITED)
        .unwrap_or_else(|e| panic!("the decoder refuses what the encoder wrote: {e}"));
    assert_eq!(&decoded.snapshot, snapshot, "decode(encode(s)) != s");
    // Plans are small: far below the node's default limits, so those must accept it too.
    let under_defaults = Snapshot::decode(bytes, &Limits::default())
        .unwrap_or_else(|e| panic!("the default limits refuse a small snapshot: {e}"));
    assert_eq!(under_defaults, decoded);
    decode_check::check_one(bytes);
}

/// The snapshot's two parts encoded apart, as the operator serves them, are `bytes`.
fn check_parts(snapshot: &Snapshot, bytes: &[u8]) {
    let (node, cluster) = snapshot.clone().into_parts();
    let cluster = cluster
        .encode()
        .unwrap_or_else(|e| panic!("the cluster part of a valid snapshot is refused: {e}"));
    let mut joined = node
        .encode(snapshot.generation, cluster.summary())
        .unwrap_or_else(|e| panic!("the node part of a valid snapshot is refused: {e}"));
    joined.extend_from_slice(cluster.bytes());
    assert!(
        joined == bytes,
        "the parts encoded apart differ from the snapshot"
    );
}

/// Index `index` of a table of `len` records, or `None` for an empty table.
fn pick(index: usize, len: usize) -> Option<usize> {
    index.checked_rem(len)
}

fn apply(s: &mut Snapshot, edit: &Edit) {
    let slot16 = |slot: u8| usize::from(slot) % kmesh_common::MAX_ROUTE_DESTINATIONS;
    match *edit {
        Edit::Mode(mode) => s.config.mode = mode,
        Edit::AgentSettings {
            access_log,
            log_level,
            reserved,
        } => {
            s.config.access_log = access_log;
            s.config.log_level = log_level;
            s.config.reserved = reserved;
        }
        Edit::NodeName(ref name) => s.node_name = String::from_utf8_lossy(name).into_owned(),
        Edit::ServicePort { index, port } => {
            if let Some(i) = pick(index, s.services.len()) {
                s.services[i].key.port = port;
            }
        }
        Edit::ServiceProtocol { index, protocol } => {
            if let Some(i) = pick(index, s.services.len()) {
                s.services[i].key.protocol = protocol;
            }
        }
        Edit::ServicePad { index, pad } => {
            if let Some(i) = pick(index, s.services.len()) {
                s.services[i].key.pad = pad;
            }
        }
        Edit::ServiceRoute { index, route_id } => {
            if let Some(i) = pick(index, s.services.len()) {
                s.services[i].value.route_id = route_id;
            }
        }
        Edit::RouteCount { index, count } => {
            if let Some(i) = pick(index, s.routes.len()) {
                s.routes[i].value.destination_count = count;
            }
        }
        Edit::RouteTotal { index, total } => {
            if let Some(i) = pick(index, s.routes.len()) {
                s.routes[i].value.total_weight = total;
            }
        }
        Edit::RouteWeight {
            index,
            slot,
            weight,
        } => {
            if let Some(i) = pick(index, s.routes.len()) {
                s.routes[i].value.cumulative_weight[slot16(slot)] = weight;
            }
        }
        Edit::RouteSet {
            index,
            slot,
            set_id,
        } => {
            if let Some(i) = pick(index, s.routes.len()) {
                s.routes[i].value.backend_set[slot16(slot)] = set_id;
            }
        }
        Edit::SetPolicy { index, policy } => {
            if let Some(i) = pick(index, s.backend_sets.len()) {
                s.backend_sets[i].value.lb_policy = policy;
            }
        }
        Edit::SetEndpointCount { index, count } => {
            if let Some(i) = pick(index, s.backend_sets.len()) {
                s.backend_sets[i].value.endpoint_count = count;
            }
        }
        Edit::SetId { index, set_id } => {
            if let Some(i) = pick(index, s.backend_sets.len()) {
                s.backend_sets[i].set_id = set_id;
            }
        }
        Edit::EndpointKey {
            index,
            set_id,
            endpoint,
        } => {
            if let Some(i) = pick(index, s.endpoints.len()) {
                s.endpoints[i].key.set_id = set_id;
                s.endpoints[i].key.index = endpoint;
            }
        }
        Edit::EndpointPort { index, port } => {
            if let Some(i) = pick(index, s.endpoints.len()) {
                s.endpoints[i].value.port = port;
            }
        }
        Edit::EndpointPad { index, pad } => {
            if let Some(i) = pick(index, s.endpoints.len()) {
                s.endpoints[i].value.pad = pad;
            }
        }
        Edit::WorkloadPad { index, pad } => {
            if let Some(i) = pick(index, s.workloads.len()) {
                s.workloads[i].pad = pad;
            }
        }
        Edit::Duplicate { table, index } => table_op(s, table, |v| {
            if let Some(i) = pick(index, v.len()) {
                v.insert(i, i);
            }
        }),
        Edit::Remove { table, index } => table_op(s, table, |v| {
            if let Some(i) = pick(index, v.len()) {
                v.remove(i);
            }
        }),
        Edit::Swap { table, a, b } => table_op(s, table, |v| {
            if let (Some(a), Some(b)) = (pick(a, v.len()), pick(b, v.len())) {
                v.swap(a, b);
            }
        }),
        Edit::Authz(ref edit) => authz_plan::apply(s, edit),
        Edit::NameByte { index, value } => {
            if let Some(i) = pick(index, s.names.strings.len()) {
                s.names.strings[i] = value;
            }
        }
        Edit::WorkloadNameField {
            index,
            field,
            offset,
        } => {
            if let Some(i) = pick(index, s.names.workloads.len()) {
                let w = &mut s.names.workloads[i];
                *[
                    &mut w.workload,
                    &mut w.namespace,
                    &mut w.service_account,
                    &mut w.app,
                    &mut w.version,
                ][usize::from(field) % 5] = offset;
            }
        }
        Edit::ServiceNameId { index, service_id } => {
            if let Some(i) = pick(index, s.names.services.len()) {
                s.names.services[i].service_id = service_id;
            }
        }
    }
}

/// Reorders one table (`table` modulo the eleven record tables) by an operation on the list of its
/// record positions: `op` may duplicate, remove or swap positions.
fn table_op(s: &mut Snapshot, table: u8, op: impl FnOnce(&mut Vec<usize>)) {
    fn permute<T: Copy>(records: &mut Vec<T>, op: impl FnOnce(&mut Vec<usize>)) {
        let mut order: Vec<usize> = (0..records.len()).collect();
        op(&mut order);
        *records = order.into_iter().map(|i| records[i]).collect();
    }
    match table % 11 {
        0 => permute(&mut s.services, op),
        1 => permute(&mut s.routes, op),
        2 => permute(&mut s.backend_sets, op),
        3 => permute(&mut s.endpoints, op),
        4 => permute(&mut s.workloads, op),
        5 => permute(&mut s.authz.workloads, op),
        6 => permute(&mut s.authz.sources, op),
        7 => permute(&mut s.authz.verdicts, op),
        8 => permute(&mut s.authz.policies, op),
        9 => permute(&mut s.names.workloads, op),
        _ => permute(&mut s.names.services, op),
    }
}
