//! Building snapshots by hand for tests, demos and benchmarks.
//!
//! [`SnapshotBuilder`] assigns ids in call order (sets, routes and services each count from 1) and
//! [`SnapshotBuilder::build`] sorts the tables, so the same calls always give the same snapshot. It
//! does not validate: a snapshot built from bad input (a port of 0, a missing set, a duplicate
//! service) is refused by [`Snapshot::encode`], which is what tests of those rules want.
//!
//! ```
//! use std::net::IpAddr;
//! use kmesh_common::authz::{ANY_CLASS, ANY_PORT, authz_action, authz_policy_kind, authz_reason};
//! use kmesh_common::{lb_policy, mode};
//! use kmesh_snapshot::builder::{Endpoint, SnapshotBuilder};
//! use kmesh_snapshot::{Limits, Snapshot};
//!
//! let mut b = SnapshotBuilder::new("node-1", 7, mode::KERNEL_NATIVE);
//! let v1 = b.backend_set(lb_policy::RANDOM, &[Endpoint::new("10.244.1.11".parse().unwrap(), 8080, 1)]);
//! let v2 = b.backend_set(lb_policy::RANDOM, &[Endpoint::new("10.244.2.12".parse().unwrap(), 8080, 1)]);
//! b.service("10.96.0.10".parse::<IpAddr>().unwrap(), 80, &[(90, v1), (10, v2)]);
//! b.workload("10.244.1.20".parse().unwrap(), 3);
//! // Connections to 10.244.1.20 from 10.0.0.0/8 (class 1) are allowed, all others denied.
//! b.authz_policy(9, authz_policy_kind::AUTHORIZATION_POLICY, "default/allow-internal");
//! b.authz_workload("10.244.1.20".parse().unwrap(), 1);
//! b.authz_source("10.0.0.0".parse().unwrap(), 8, 1);
//! b.authz_verdict(1, ANY_CLASS, ANY_PORT, authz_action::DENY, authz_reason::NO_ALLOW_MATCHED, 0);
//! b.authz_verdict(1, 1, ANY_PORT, authz_action::ALLOW, authz_reason::ALLOW_MATCHED, 9);
//! let snapshot = b.build();
//! let bytes = snapshot.encode().unwrap();
//! assert_eq!(Snapshot::decode(&bytes, &Limits::default()).unwrap().snapshot, snapshot);
//! ```

use std::net::{IpAddr, Ipv4Addr};

use kmesh_common::authz::{
    AuthzPolicyRecord, AuthzSourceKey, AuthzSourceRecord, AuthzSourceValue, AuthzVerdict,
    AuthzVerdictKey, AuthzVerdictRecord, AuthzWorkloadRecord, AuthzWorkloadValue,
    MAX_POLICY_NAME_LEN,
};
use kmesh_common::{
    BackendSetRecord, BackendSetValue, EndpointKey, EndpointRecord, EndpointValue, IPPROTO_TCP,
    NodeConfig, RouteRecord, RouteValue, ServiceKey, ServiceRecord, ServiceValue, WorkloadRecord,
    ip16, lb_policy, service_flags,
};

use kmesh_common::names::{ServiceNameRecord, WorkloadNameRecord};

use crate::Snapshot;
use crate::name_table::StringTable;

/// An endpoint of a backend set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub port: u16,
    /// Stable identity (service account) id.
    pub identity: u32,
}

impl Endpoint {
    pub fn new(ip: IpAddr, port: u16, identity: u32) -> Self {
        Endpoint { ip, port, identity }
    }
}

/// Builds a [`Snapshot`] with deterministic ids. See the [module documentation](self).
#[derive(Clone, Debug)]
pub struct SnapshotBuilder {
    snapshot: Snapshot,
    /// The names' string table, written into the snapshot by [`SnapshotBuilder::build`].
    strings: StringTable,
    next_set_id: u32,
    next_route_id: u32,
    next_service_id: u32,
}

impl SnapshotBuilder {
    /// An empty snapshot for `node` with `mode` (one of `kmesh_common::mode`).
    pub fn new(node: &str, generation: u64, mode: u32) -> Self {
        SnapshotBuilder {
            snapshot: Snapshot {
                node_name: node.to_owned(),
                generation,
                config: NodeConfig::with_mode(mode),
                services: Vec::new(),
                routes: Vec::new(),
                backend_sets: Vec::new(),
                endpoints: Vec::new(),
                workloads: Vec::new(),
                authz: Default::default(),
                names: Default::default(),
            },
            strings: StringTable::default(),
            next_set_id: 1,
            next_route_id: 1,
            next_service_id: 1,
        }
    }

    /// Adds a backend set with `endpoints` (indexed in the given order) and returns its id.
    pub fn backend_set(&mut self, lb_policy: u32, endpoints: &[Endpoint]) -> u32 {
        let set_id = next(&mut self.next_set_id);
        let s = &mut self.snapshot;
        s.endpoints.reserve(endpoints.len());
        let mut count = 0u32;
        for e in endpoints {
            s.endpoints.push(EndpointRecord {
                key: EndpointKey {
                    set_id,
                    index: count,
                },
                value: EndpointValue {
                    ip: ip16(e.ip),
                    port: e.port,
                    pad: 0,
                    identity: e.identity,
                },
            });
            count = count.wrapping_add(1);
        }
        s.backend_sets.push(BackendSetRecord {
            set_id,
            value: BackendSetValue {
                endpoint_count: count,
                lb_policy,
            },
        });
        set_id
    }

    /// Adds a route over `(weight, set_id)` destinations and returns its id. Destinations of weight
    /// 0 are left out, as the operator's compiler does.
    ///
    /// # Panics
    ///
    /// If more than `MAX_ROUTE_DESTINATIONS` destinations have a positive weight, or the weights
    /// add up beyond `u32::MAX`: such a route has no representation.
    pub fn route(&mut self, destinations: &[(u32, u32)]) -> u32 {
        let route_id = next(&mut self.next_route_id);
        let value = RouteValue::from_weights(destinations.iter().copied())
            .unwrap_or_else(|e| panic!("a route of {destinations:?} has no representation: {e}"));
        self.snapshot.routes.push(RouteRecord { route_id, value });
        route_id
    }

    /// Adds a TCP service `ip:port` routed by `route_id` and returns its service id.
    pub fn service_with_route(&mut self, ip: IpAddr, port: u16, route_id: u32) -> u32 {
        self.service_with_flags(ip, port, route_id, 0)
    }

    /// Adds a TCP service `ip:port` routed by `route_id` to its waypoint
    /// (`kmesh_common::service_flags::WAYPOINT`: the route's backend sets are the waypoint's
    /// replicas, and the client's SYN names the service) and returns its service id.
    pub fn waypoint_service(&mut self, ip: IpAddr, port: u16, route_id: u32) -> u32 {
        self.service_with_flags(ip, port, route_id, service_flags::WAYPOINT)
    }

    /// Adds a TCP service `ip:port` routed by `route_id` with `flags` (bits of
    /// `kmesh_common::service_flags`; another bit makes a snapshot [`Snapshot::encode`] refuses)
    /// and returns its service id.
    pub fn service_with_flags(&mut self, ip: IpAddr, port: u16, route_id: u32, flags: u32) -> u32 {
        let service_id = next(&mut self.next_service_id);
        self.snapshot.services.push(ServiceRecord {
            key: ServiceKey {
                ip: ip16(ip),
                port,
                protocol: IPPROTO_TCP,
                pad: 0,
            },
            value: ServiceValue {
                service_id,
                route_id,
                flags,
            },
        });
        service_id
    }

    /// Adds a TCP service `ip:port` with a new route over `(weight, set_id)` destinations (see
    /// [`SnapshotBuilder::route`]) and returns the route id.
    pub fn service(&mut self, ip: IpAddr, port: u16, destinations: &[(u32, u32)]) -> u32 {
        let route_id = self.route(destinations);
        self.service_with_route(ip, port, route_id);
        route_id
    }

    /// Sets the agent's settings: `access_log` one of `kmesh_common::access_log`, `log_level` one
    /// of `kmesh_common::log_level` (values outside them make a snapshot [`Snapshot::encode`]
    /// refuses).
    pub fn agent_settings(&mut self, access_log: u8, log_level: u8) {
        self.snapshot.config.access_log = access_log;
        self.snapshot.config.log_level = log_level;
    }

    /// Adds a workload of this node.
    pub fn workload(&mut self, ip: IpAddr, identity: u32) {
        self.snapshot.workloads.push(WorkloadRecord {
            ip: ip16(ip),
            identity,
            pad: 0,
        });
    }

    /// Adds the name of an authorization policy: `kind` is one of `kmesh_common::authz_policy_kind`,
    /// `name` is `namespace/name`. A name longer than `MAX_POLICY_NAME_LEN` keeps its first bytes
    /// and its real length (up to `u16::MAX`), which [`Snapshot::encode`] refuses.
    pub fn authz_policy(&mut self, policy: u32, kind: u8, name: &str) {
        let mut record = AuthzPolicyRecord {
            policy,
            name_len: u16::try_from(name.len()).unwrap_or(u16::MAX),
            kind,
            pad: 0,
            name: [0; MAX_POLICY_NAME_LEN],
        };
        let kept = name.len().min(MAX_POLICY_NAME_LEN);
        record.name[..kept].copy_from_slice(&name.as_bytes()[..kept]);
        self.snapshot.authz.policies.push(record);
    }

    /// Adds an authorization workload: connections to `ip` get the verdicts of `policy_set`.
    pub fn authz_workload(&mut self, ip: IpAddr, policy_set: u32) {
        self.snapshot.authz.workloads.push(AuthzWorkloadRecord {
            ip: ip16(ip),
            value: AuthzWorkloadValue { policy_set, pad: 0 },
        });
    }

    /// Adds a source prefix `ip/prefix_len` of class `source_class`, with `prefix_len` in CIDR
    /// terms: an IPv4 block is stored IPv4-mapped with 96 added (`10.0.0.0/8` becomes
    /// `::ffff:10.0.0.0/104`), a single address is `/32` or `/128`. The address is stored as given,
    /// not masked: it must be the network address of the block.
    pub fn authz_source(&mut self, ip: IpAddr, prefix_len: u32, source_class: u32) {
        let prefix_len = match ip {
            IpAddr::V4(_) => prefix_len.saturating_add(96),
            IpAddr::V6(_) => prefix_len,
        };
        self.snapshot.authz.sources.push(AuthzSourceRecord {
            key: AuthzSourceKey {
                prefix_len,
                ip: ip16(ip),
            },
            value: AuthzSourceValue { source_class },
        });
    }

    /// Adds the verdict of `(policy_set, source_class, port)`: `source_class` may be `ANY_CLASS`
    /// and `port` `ANY_PORT`; `action`, `reason` are of `authz_action`, `authz_reason`; `policy` is
    /// the deciding policy's ID or 0.
    pub fn authz_verdict(
        &mut self,
        policy_set: u32,
        source_class: u32,
        port: u16,
        action: u8,
        reason: u8,
        policy: u32,
    ) {
        self.snapshot.authz.verdicts.push(AuthzVerdictRecord {
            key: AuthzVerdictKey {
                policy_set,
                source_class,
                port,
                pad: 0,
            },
            value: AuthzVerdict {
                policy,
                action,
                reason,
                pad: 0,
            },
        });
    }

    /// Adds the names of the pod holding `ip`; an empty string is no name.
    pub fn workload_names(&mut self, ip: IpAddr, names: &crate::WorkloadName<'_>) {
        let record = WorkloadNameRecord {
            ip: ip16(ip),
            workload: self.strings.intern(names.workload),
            namespace: self.strings.intern(names.namespace),
            service_account: self.strings.intern(names.service_account),
            app: self.strings.intern(names.app),
            version: self.strings.intern(names.version),
        };
        self.snapshot.names.workloads.push(record);
    }

    /// Adds the names of service `service_id` (as [`SnapshotBuilder::service_with_route`]
    /// returns it); an empty string is no name.
    pub fn service_names(&mut self, service_id: u32, names: &crate::ServiceName<'_>) {
        let record = ServiceNameRecord {
            service_id,
            host: self.strings.intern(names.host),
            name: self.strings.intern(names.name),
            namespace: self.strings.intern(names.namespace),
        };
        self.snapshot.names.services.push(record);
    }

    /// The snapshot, with every table sorted.
    pub fn build(self) -> Snapshot {
        let mut snapshot = self.snapshot;
        snapshot.names.strings = self.strings.finish();
        snapshot.sort();
        snapshot
    }
}

/// Names for `workloads` addresses from `base`, as [`generate_authz`] describes them.
fn generated_workload_names(b: &mut SnapshotBuilder, workloads: u32, base: u32) {
    let mut seen = std::collections::HashSet::new();
    for w in 0..workloads {
        let ip = Ipv4Addr::from(base + w % (1 << 23));
        if !seen.insert(ip) {
            continue;
        }
        let deployment = w / 10;
        let workload = format!("app-{deployment}-{}", deployment % 7);
        let namespace = format!("ns-{}", deployment % 100);
        let version = format!("v{}", w % 3 + 1);
        let names = crate::WorkloadName {
            workload: &workload,
            namespace: &namespace,
            service_account: &workload,
            app: &workload,
            version: &version,
        };
        b.workload_names(IpAddr::V4(ip), &names);
    }
}

/// Returns the counter's value and advances it.
fn next(counter: &mut u32) -> u32 {
    let id = *counter;
    *counter = counter.wrapping_add(1);
    id
}

/// A synthetic snapshot for benchmarks, the same for the same arguments: `services` services, each
/// with its own route (one destination, weight 1) to its own random-policy backend set of
/// `endpoints_per_service` endpoints on port 8080, plus up to 100 workloads.
///
/// Service `i` listens on the `i`-th address of 10.96.0.0/12 (skipping the network address), port
/// 80; past the 2^20 - 2 usable addresses the ports count up from 81. Endpoints cycle through
/// 10.244.0.0/16, so with more than 65,534 endpoints addresses repeat across sets (as pods can be
/// endpoints of several services).
pub fn generate(
    node: &str,
    generation: u64,
    services: u32,
    endpoints_per_service: u32,
) -> Snapshot {
    const VIP_BASE: u32 = u32::from_be_bytes([10, 96, 0, 0]);
    const VIP_HOSTS: u32 = (1 << 20) - 2;
    const POD_BASE: u32 = u32::from_be_bytes([10, 244, 0, 0]);
    const POD_HOSTS: u32 = (1 << 16) - 2;

    let mut b = SnapshotBuilder::new(node, generation, kmesh_common::mode::KERNEL_NATIVE);
    let total_endpoints = services as usize * endpoints_per_service as usize;
    b.snapshot.services.reserve(services as usize);
    b.snapshot.routes.reserve(services as usize);
    b.snapshot.backend_sets.reserve(services as usize);
    b.snapshot.endpoints.reserve(total_endpoints);

    let mut pod = 0u32;
    let mut endpoints = Vec::with_capacity(endpoints_per_service as usize);
    for i in 0..services {
        endpoints.clear();
        for _ in 0..endpoints_per_service {
            let ip = Ipv4Addr::from(POD_BASE + 1 + pod % POD_HOSTS);
            endpoints.push(Endpoint::new(IpAddr::V4(ip), 8080, i % 1000 + 1));
            pod = pod.wrapping_add(1);
        }
        let set = b.backend_set(lb_policy::RANDOM, &endpoints);
        let vip = Ipv4Addr::from(VIP_BASE + 1 + i % VIP_HOSTS);
        // i / VIP_HOSTS is at most 4096, so the port stays far below u16::MAX.
        let port = 80 + (i / VIP_HOSTS) as u16;
        b.service(IpAddr::V4(vip), port, &[(1, set)]);
    }
    for w in 0..services.min(100) {
        // Workloads of this node: the first addresses of its pod range.
        let ip = Ipv4Addr::from(POD_BASE + 1 + w);
        b.workload(IpAddr::V4(ip), w % 1000 + 1);
    }
    b.build()
}

/// A synthetic snapshot holding only authorization tables and names, for benchmarks, the same for
/// the same arguments: `policies` AuthorizationPolicies (at least one), `workloads` workload
/// addresses (10.0.0.0/8, from 10.0.0.1) sharing verdict sets four by four, about `verdicts`
/// verdicts spread evenly over the sets (each set's default, then class entries allowed by a
/// policy), and `sources` host routes in 10.128.0.0/9, whose classes cycle through 1..=1000.
///
/// Every workload address has names as a cluster's would: ten pods per Deployment
/// (`app-<n>-<k>`, its own service account and app), Deployments spread over 100 namespaces, three
/// versions.
pub fn generate_authz(
    node: &str,
    generation: u64,
    workloads: u32,
    sources: u32,
    verdicts: u32,
    policies: u32,
) -> Snapshot {
    use kmesh_common::authz::{ANY_CLASS, ANY_PORT, authz_action, authz_policy_kind, authz_reason};
    const WORKLOAD_BASE: u32 = u32::from_be_bytes([10, 0, 0, 1]);
    const SOURCE_BASE: u32 = u32::from_be_bytes([10, 128, 0, 0]);

    let mut b = SnapshotBuilder::new(node, generation, kmesh_common::mode::KERNEL_NATIVE);
    if workloads == 0 {
        // Tables without a workload are invalid: a benchmark of none gets none.
        return b.build();
    }
    let policies = policies.max(1);
    for id in 1..=policies {
        let name = format!("ns-{}/policy-{id}", id % 100);
        b.authz_policy(id, authz_policy_kind::AUTHORIZATION_POLICY, &name);
    }
    let sets = workloads.div_ceil(4);
    let per_set = (verdicts / sets).max(1);
    b.snapshot.authz.verdicts.reserve((sets * per_set) as usize);
    for set in 1..=sets {
        b.authz_verdict(
            set,
            ANY_CLASS,
            ANY_PORT,
            authz_action::DENY,
            authz_reason::NO_ALLOW_MATCHED,
            0,
        );
        for class in 1..per_set {
            let policy = 1 + class % policies;
            b.authz_verdict(
                set,
                class,
                ANY_PORT,
                authz_action::ALLOW,
                authz_reason::ALLOW_MATCHED,
                policy,
            );
        }
    }
    for w in 0..workloads {
        let ip = Ipv4Addr::from(WORKLOAD_BASE + w % (1 << 23));
        b.authz_workload(IpAddr::V4(ip), 1 + w / 4);
    }
    generated_workload_names(&mut b, workloads, WORKLOAD_BASE);
    for s in 0..sources {
        let ip = Ipv4Addr::from(SOURCE_BASE + s % (1 << 23));
        b.authz_source(IpAddr::V4(ip), 32, 1 + s % 1000);
    }
    b.build()
}
