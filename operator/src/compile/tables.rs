//! The snapshot's tables: stable IDs, the cluster-wide tables (the same for every node) and each
//! node's snapshot. Decided here:
//! - IDs are stable: each is a hash of the name of what it identifies, with collisions resolved in
//!   sorted order, so a small change in the cluster is a small change in the snapshot. Each owner
//!   (a service, a route, a backend set) gets its ID with its entry; references (a service's route,
//!   a route's backend sets) are looked up by name, and a missing one, impossible as every ID is
//!   assigned from the very entries referred to, is contained to its object (Rejected);
//! - two services claiming one VIP:port: the first (sorted by host) keeps it;
//! - a snapshot over the configured capacity is not produced: the node keeps the one it has.
use crate::kinds::Kind;
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use kmesh_common::{
    BackendSetRecord, BackendSetValue, EndpointKey, EndpointRecord, EndpointValue, IPPROTO_TCP,
    NodeConfig, RouteRecord, ServiceKey, ServiceRecord, ServiceValue, WorkloadRecord, access_log,
    ip16, service_flags,
};
use kmesh_snapshot::{ClusterTables, NodeTables};

use super::{
    Compiler, Names,
    backend_sets::{BackendSet, BackendSetKey},
    catalog::{Catalog, identity},
    name_tables::ServiceNames,
    namespace_of,
    routes::RoutedPort,
    workloads::pod_service_account,
};
use crate::diagnostics::ObjectRef;

/// The cluster-wide tables, the same for every node.
#[derive(Default)]
pub(super) struct Tables {
    services: Vec<ServiceRecord>,
    routes: Vec<RouteRecord>,
    backend_sets: Vec<BackendSetRecord>,
    endpoints: Vec<EndpointRecord>,
    pub(super) names: Names,
    /// The names of each service id, for the names section.
    pub(super) service_names: BTreeMap<u32, ServiceNames>,
}

/// Each entry of `named` with its stable ID: the low 32 bits of the name's FNV-1a 64 hash, 0
/// avoided, collisions resolved by probing in sorted name order, so an ID changes only when a
/// colliding name comes or goes.
pub(super) fn with_ids<V>(named: BTreeMap<String, V>) -> impl Iterator<Item = (u32, String, V)> {
    let mut taken = BTreeSet::new();
    named.into_iter().map(move |(name, value)| {
        let mut id = kmesh_snapshot::content_hash(name.as_bytes()) as u32;
        while id == 0 || !taken.insert(id) {
            id = id.wrapping_add(1);
        }
        (id, name, value)
    })
}

impl Compiler<'_> {
    /// The IDs of the identities of every endpoint and pod.
    pub(super) fn identity_ids(&self, catalog: &Catalog<'_>) -> BTreeMap<String, u32> {
        // There are far fewer identities (service accounts) than endpoints and pods: each is
        // copied once, not once per endpoint and pod.
        let mut names: BTreeMap<String, ()> = BTreeMap::new();
        for endpoint in catalog.values().flat_map(|s| &s.endpoints) {
            if !names.contains_key(&endpoint.identity) {
                names.insert(endpoint.identity.clone(), ());
            }
        }
        // Inserted one by one into the small set, rather than collected, which would sort a
        // list of every pod first.
        let mut pod_accounts: BTreeSet<(&str, Option<&str>)> = BTreeSet::new();
        for pod in &self.inputs.pods {
            pod_accounts.insert((namespace_of(&pod.metadata), pod_service_account(pod)));
        }
        for (namespace, service_account) in pod_accounts {
            names.insert(identity(namespace, service_account), ());
        }
        with_ids(names).map(|(id, name, ())| (name, id)).collect()
    }

    /// The cluster-wide tables of the routed ports and their backend sets.
    pub(super) fn tables(
        &mut self,
        routed: &[RoutedPort<'_>],
        sets: &BTreeMap<BackendSetKey, BackendSet<'_>>,
        identities: &BTreeMap<String, u32>,
    ) -> Tables {
        let mut t = Tables::default();
        let set_ids = backend_set_records(&mut t, sets, identities);
        let route_ids = self.route_records(&mut t, routed, &set_ids);
        self.service_records(&mut t, routed, &route_ids);
        for (name, id) in identities {
            t.names.identities.insert(*id, name.clone());
        }
        t
    }

    /// A route record for each route name (a name routed twice, by a port declared twice, keeps
    /// its last route); returns the route IDs by name.
    fn route_records(
        &mut self,
        t: &mut Tables,
        routed: &[RoutedPort<'_>],
        set_ids: &BTreeMap<&BackendSetKey, u32>,
    ) -> BTreeMap<String, u32> {
        let by_name: BTreeMap<String, &RoutedPort<'_>> =
            routed.iter().map(|r| (r.target.route_name(), r)).collect();
        let mut route_ids = BTreeMap::new();
        for (route_id, name, routed) in with_ids(by_name) {
            let Some(value) = routed
                .route
                .with_set_ids(|set| set_ids.get(&set.key).copied())
            else {
                let object = &routed.target.service.object;
                self.missing_id(object, &format!("a backend set of route {name}"));
                continue;
            };
            t.routes.push(RouteRecord { route_id, value });
            t.names.routes.insert(route_id, name.clone());
            route_ids.insert(name, route_id);
        }
        route_ids
    }

    /// A service record for each VIP of each routed port, in host order: of two services claiming
    /// one VIP:port, the first keeps it and the other is rejected.
    fn service_records(
        &mut self,
        t: &mut Tables,
        routed: &[RoutedPort<'_>],
        route_ids: &BTreeMap<String, u32>,
    ) {
        let mut by_host: BTreeMap<String, Vec<&RoutedPort<'_>>> = BTreeMap::new();
        for r in routed {
            by_host
                .entry(r.target.service.fqdn.clone())
                .or_default()
                .push(r);
        }
        let mut claimed = BTreeSet::new();
        for (service_id, fqdn, ports) in with_ids(by_host) {
            for routed in ports {
                let object = &routed.target.service.object;
                let route_name = routed.target.route_name();
                let Some(route_id) = route_ids.get(&route_name).copied() else {
                    self.missing_id(object, &format!("route {route_name}"));
                    continue;
                };
                for vip in &routed.vips {
                    let key = ServiceKey {
                        ip: ip16(*vip),
                        port: routed.target.port.port,
                        protocol: IPPROTO_TCP,
                        pad: 0,
                    };
                    if !claimed.insert(key) {
                        let vip = IpAddr::from(key.ip).to_canonical();
                        let reason =
                            format!("VIP {vip}:{} is already used by another service", key.port);
                        self.reject(object, "spec", reason);
                        continue;
                    }
                    let flags = if routed.via_waypoint {
                        service_flags::WAYPOINT
                    } else {
                        0
                    };
                    let value = ServiceValue {
                        service_id,
                        route_id,
                        flags,
                    };
                    t.services.push(ServiceRecord { key, value });
                    t.names.services.insert(service_id, fqdn.clone());
                    let service = routed.target.service;
                    t.service_names.insert(
                        service_id,
                        ServiceNames {
                            host: fqdn.clone(),
                            name: service.object.name.clone(),
                            namespace: service.namespace.clone(),
                        },
                    );
                }
            }
        }
    }

    /// An ID missing for a name the compiler itself listed cannot happen (see the module doc);
    /// were it to, the entry is left out and its object says why, rather than the compile
    /// stopping for every node.
    fn missing_id(&mut self, object: &ObjectRef, what: &str) {
        let reason = format!("internal error: {what} has no ID; left out of the snapshot");
        self.reject(object, "", reason);
    }

    /// The node settings of every snapshot: the mode, and the agents' access log and log level,
    /// from the KmeshConfig (its defaults without one).
    fn node_config(&self) -> NodeConfig {
        let spec = self.inputs.config.as_ref().map(|cfg| &cfg.spec);
        let access_log = spec.is_some_and(|spec| spec.access_log);
        let log_level = spec.map(|spec| spec.log_level).unwrap_or_default();
        NodeConfig {
            mode: self.mode.value(),
            access_log: if access_log {
                access_log::ON
            } else {
                access_log::OFF
            },
            log_level: log_level.value(),
            reserved: [0; 2],
        }
    }

    /// The tables every node's snapshot shares (the services, routes, backend sets, endpoints
    /// and names), once, and each node's own: its workloads, its authorization and the node
    /// settings. A node whose snapshot would be over the configured capacity gets none
    /// (reported): it keeps the one it has.
    pub(super) fn snapshot_parts(
        &mut self,
        tables: Tables,
        mut workloads: BTreeMap<String, Vec<WorkloadRecord>>,
        mut authz: BTreeMap<String, kmesh_snapshot::AuthzTables>,
        names: kmesh_snapshot::NameTables,
        nodes: &[String],
    ) -> (ClusterTables, BTreeMap<String, NodeTables>) {
        let config = self.inputs.config.as_ref();
        let limits = config
            .and_then(|cfg| cfg.spec.capacity.as_ref())
            .map(|cap| cap.limits())
            .unwrap_or_default();
        let config_ref = ObjectRef::new(Kind::KmeshConfig, None, crate::crd::SINGLETON_NAME);
        let mut cluster = ClusterTables {
            services: tables.services,
            routes: tables.routes,
            backend_sets: tables.backend_sets,
            endpoints: tables.endpoints,
            names,
        };
        cluster.sort();
        let node_config = self.node_config();
        let mut parts = BTreeMap::new();
        for node in nodes {
            let mut own = NodeTables {
                node_name: node.clone(),
                config: node_config,
                workloads: workloads.remove(node).unwrap_or_default(),
                authz: authz.remove(node).unwrap_or_default(),
            };
            own.sort();
            if let Some(reason) = over_capacity(&own, &cluster, &limits) {
                self.reject(
                    &config_ref,
                    "spec.capacity",
                    format!("node {node}'s snapshot {reason}; the node keeps its current snapshot"),
                );
                continue;
            }
            parts.insert(node.clone(), own);
        }
        (cluster, parts)
    }
}

/// A backend set record and its endpoints for each backend set; returns the set IDs by key.
fn backend_set_records<'s>(
    t: &mut Tables,
    sets: &'s BTreeMap<BackendSetKey, BackendSet<'_>>,
    identities: &BTreeMap<String, u32>,
) -> BTreeMap<&'s BackendSetKey, u32> {
    let mut by_name: BTreeMap<String, Vec<(&BackendSetKey, &BackendSet<'_>)>> = BTreeMap::new();
    for (key, set) in sets {
        by_name.entry(key.name()).or_default().push((key, set));
    }
    let mut set_ids = BTreeMap::new();
    for (set_id, name, named) in with_ids(by_name) {
        for (key, set) in named {
            set_ids.insert(key, set_id);
            t.backend_sets.push(BackendSetRecord {
                set_id,
                value: BackendSetValue {
                    endpoint_count: set.endpoints.len() as u32,
                    lb_policy: set.load_balancing.kernel_value(),
                },
            });
            t.names.backend_sets.insert(set_id, name.clone());
            for (index, ep) in set.endpoints.iter().enumerate() {
                t.endpoints.push(EndpointRecord {
                    key: EndpointKey {
                        set_id,
                        index: index as u32,
                    },
                    value: EndpointValue {
                        ip: ip16(ep.ip),
                        port: ep.port,
                        pad: 0,
                        identity: identities.get(ep.identity).copied().unwrap_or(0),
                    },
                });
            }
        }
    }
    set_ids
}

/// Why `snapshot` does not fit `limits`, if it does not.
fn over_capacity(
    node: &NodeTables,
    cluster: &ClusterTables,
    limits: &kmesh_snapshot::Limits,
) -> Option<String> {
    let tables = [
        ("services", cluster.services.len(), limits.max_services),
        ("routes", cluster.routes.len(), limits.max_routes),
        (
            "backend sets",
            cluster.backend_sets.len(),
            limits.max_backend_sets,
        ),
        ("endpoints", cluster.endpoints.len(), limits.max_endpoints),
        ("workloads", node.workloads.len(), limits.max_workloads),
        (
            "authorization workloads",
            node.authz.workloads.len(),
            limits.max_authz_workloads,
        ),
        (
            "authorization sources",
            node.authz.sources.len(),
            limits.max_authz_sources,
        ),
        (
            "authorization verdicts",
            node.authz.verdicts.len(),
            limits.max_authz_verdicts,
        ),
        (
            "authorization policies",
            node.authz.policies.len(),
            limits.max_authz_policies,
        ),
    ];
    let names = [
        (
            "workload names",
            cluster.names.workloads.len(),
            limits.max_workload_names,
        ),
        (
            "service names",
            cluster.names.services.len(),
            limits.max_service_names,
        ),
        (
            "bytes of name strings",
            cluster.names.strings.len(),
            limits.max_name_bytes,
        ),
    ];
    tables
        .into_iter()
        .chain(names)
        .find(|(_, count, capacity)| *count as u64 > u64::from(*capacity))
        .map(|(table, count, capacity)| format!("holds {count} {table}, capacity is {capacity}"))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::super::testing::{compile_yaml, diagnostics, summary};
    use super::with_ids;

    #[test]
    fn ids_are_the_low_bits_of_the_name_hash_with_collisions_probed_in_name_order() {
        // Both names hash to 0x4a38f97f in the low 32 bits of FNV-1a 64.
        let first = "svc-224191.default.svc.cluster.local";
        let second = "svc-816080.default.svc.cluster.local";
        let named = BTreeMap::from([(second.to_string(), ()), (first.to_string(), ())]);
        let ids: Vec<(u32, String)> = with_ids(named).map(|(id, name, ())| (id, name)).collect();
        assert_eq!(
            ids,
            [
                (0x4a38_f97f, first.to_string()),
                (0x4a38_f980, second.to_string())
            ]
        );
    }

    #[test]
    fn of_two_services_on_one_vip_port_the_first_by_host_keeps_it() {
        let service = |name: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec: {{clusterIP: 10.96.0.50, ports: [{{port: 80}}]}}\n"
            )
        };
        let compiled = compile_yaml(&format!("{}---\n{}", service("b"), service("a")));
        assert!(
            summary(&compiled).contains("10.96.0.50:80  a.default.svc.cluster.local\n"),
            "{}",
            summary(&compiled)
        );
        assert_eq!(
            diagnostics(&compiled),
            [
                "rejected: Service default/b spec: VIP 10.96.0.50:80 is already used by another service"
            ]
        );
    }
}
