//! The compiler: Kubernetes and Istio objects in, one snapshot per node out. Pure: no I/O, no
//! clock, no randomness; the same inputs give byte-identical snapshots.
//!
//! Semantics follow `../shared/docs/istio-semantics.md`. In short:
//! - a mesh service is a Kubernetes Service with a cluster IP (headless and ExternalName services
//!   have no VIP) or a STATIC ServiceEntry with addresses; a Service beats a ServiceEntry of the
//!   same host;
//! - endpoints of a Service with a selector are its ready Pods (as istiod's ambient controller builds
//!   workloads from Pods), with named target ports resolved per pod; a Service without selector
//!   uses its EndpointSlices (ready endpoints, or serving+terminating ones when none is ready);
//! - a VirtualService bound to the mesh chooses, per VIP port, a weighted list of destinations
//!   (host, subset, port); only what is decidable at connect() is compiled, every other feature is
//!   reported with the resource and field;
//! - a DestinationRule gives subsets (label selectors over the endpoints) and the load balancer.
//!
//! IDs are stable: each is a hash of the name of what it identifies, with collisions resolved in
//! sorted order, so a small change in the cluster is a small change in the snapshot.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use k8s_openapi::{
    api::core::v1::{Pod, Service},
    apimachinery::pkg::util::intstr::IntOrString,
};
use kmesh_common::{
    BackendSetRecord, BackendSetValue, EndpointKey, EndpointRecord, EndpointValue, IPPROTO_TCP,
    MAX_ROUTE_DESTINATIONS, NodeConfig, RouteRecord, RouteValue, ServiceKey, ServiceRecord,
    ServiceValue, WorkloadRecord, ip16, lb_policy, mode,
};
use kmesh_snapshot::Snapshot;

use crate::{
    diagnostics::{Diagnostic, ObjectRef},
    inputs::Inputs,
    istio::{DestinationRule, HttpRoute, RouteDestination, TrafficPolicy, VirtualService},
};

/// Settings that are not objects.
#[derive(Clone, Debug)]
pub struct CompileOptions {
    /// Istio's root namespace: mesh-wide DestinationRules live here.
    pub root_namespace: String,
    /// The cluster's DNS domain, for expanding short host names.
    pub cluster_domain: String,
}

impl Default for CompileOptions {
    fn default() -> Self {
        CompileOptions {
            root_namespace: "istio-system".to_string(),
            cluster_domain: "cluster.local".to_string(),
        }
    }
}

/// The compiler's result.
#[derive(Clone, Debug, Default)]
pub struct Compiled {
    /// One snapshot per requested node.
    pub snapshots: BTreeMap<String, Snapshot>,
    /// Sorted, de-duplicated.
    pub diagnostics: Vec<Diagnostic>,
    /// Human names of the IDs in the snapshots, for summaries and logs.
    pub names: Names,
}

/// What the IDs in a snapshot stand for.
#[derive(Clone, Debug, Default)]
pub struct Names {
    pub services: BTreeMap<u32, String>,
    pub routes: BTreeMap<u32, String>,
    pub backend_sets: BTreeMap<u32, String>,
    pub identities: BTreeMap<u32, String>,
}

/// Compiles `inputs` into a snapshot for each of `nodes`, all stamped `generation`.
pub fn compile(
    inputs: &Inputs,
    nodes: &[String],
    generation: u64,
    options: &CompileOptions,
) -> Compiled {
    let mut c = Compiler {
        inputs,
        options,
        diagnostics: Vec::new(),
    };
    let catalog = c.catalog();
    let identities = c.identity_ids(&catalog);
    let tables = c.tables(&catalog, &identities);
    let node_mode = inputs
        .config
        .as_ref()
        .map(|cfg| cfg.spec.mode_value())
        .unwrap_or(mode::KERNEL_NATIVE);
    let workloads = c.workloads(&identities);

    let mut snapshots = BTreeMap::new();
    for node in nodes {
        let mut snapshot = Snapshot {
            node_name: node.clone(),
            generation,
            config: NodeConfig {
                mode: node_mode,
                flags: 0,
            },
            services: tables.services.clone(),
            routes: tables.routes.clone(),
            backend_sets: tables.backend_sets.clone(),
            endpoints: tables.endpoints.clone(),
            workloads: workloads.get(node).cloned().unwrap_or_default(),
        };
        snapshot.sort();
        snapshots.insert(node.clone(), snapshot);
    }
    let mut diagnostics = c.diagnostics;
    for object in &inputs.not_yet_supported {
        diagnostics.push(Diagnostic::unenforced(
            object.clone(),
            "",
            "this kind is not compiled yet (it comes in a later issue: authorization policies, Gateway API mesh routes)",
        ));
    }
    diagnostics.sort();
    diagnostics.dedup();
    Compiled {
        snapshots,
        diagnostics,
        names: tables.names,
    }
}

/// A port of a mesh service.
#[derive(Clone, Debug)]
struct CatalogPort {
    port: u16,
    name: Option<String>,
    /// Where the port goes on an endpoint: a number, or a name resolved per endpoint.
    target: TargetPort,
}

#[derive(Clone, Debug)]
enum TargetPort {
    Number(u16),
    Named(String),
}

/// An endpoint before a port is chosen.
#[derive(Clone, Debug)]
struct CatalogEndpoint {
    ips: Vec<IpAddr>,
    labels: BTreeMap<String, String>,
    /// "namespace/serviceaccount".
    identity: String,
    /// Container (or ServiceEntry endpoint) ports by name.
    named_ports: BTreeMap<String, u16>,
}

/// A service the data plane can steer.
#[derive(Clone, Debug)]
struct CatalogService {
    object: ObjectRef,
    namespace: String,
    fqdn: String,
    vips: Vec<IpAddr>,
    ports: Vec<CatalogPort>,
    endpoints: Vec<CatalogEndpoint>,
}

/// The cluster-wide tables, the same for every node.
#[derive(Default)]
struct Tables {
    services: Vec<ServiceRecord>,
    routes: Vec<RouteRecord>,
    backend_sets: Vec<BackendSetRecord>,
    endpoints: Vec<EndpointRecord>,
    names: Names,
}

/// A destination after resolution: which service, port, subset.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct BackendSetKey {
    fqdn: String,
    port: u16,
    subset: Option<String>,
    v6: bool,
}

impl BackendSetKey {
    fn name(&self) -> String {
        let family = if self.v6 { "v6" } else { "v4" };
        match &self.subset {
            Some(s) => format!("{}:{} subset {s} ({family})", self.fqdn, self.port),
            None => format!("{}:{} ({family})", self.fqdn, self.port),
        }
    }
}

struct Compiler<'a> {
    inputs: &'a Inputs,
    options: &'a CompileOptions,
    diagnostics: Vec<Diagnostic>,
}

fn name_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> &str {
    meta.name.as_deref().unwrap_or("")
}

fn namespace_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> &str {
    meta.namespace.as_deref().unwrap_or("default")
}

impl<'a> Compiler<'a> {
    fn report(&mut self, d: Diagnostic) {
        self.diagnostics.push(d);
    }

    /// Expands a short host name as Istio does: a name without dots lives in `namespace`.
    fn fqdn(&self, host: &str, namespace: &str) -> String {
        if host.contains('.') || host == "*" || host.parse::<IpAddr>().is_ok() {
            host.to_string()
        } else {
            format!("{host}.{namespace}.svc.{}", self.options.cluster_domain)
        }
    }

    // ---- services and endpoints ----

    fn catalog(&mut self) -> BTreeMap<String, CatalogService> {
        let mut catalog = BTreeMap::new();
        let mut services: Vec<&Service> = self.inputs.services.iter().collect();
        services.sort_by_key(|s| (namespace_of(&s.metadata), name_of(&s.metadata)));
        for svc in services {
            if let Some(entry) = self.kubernetes_service(svc) {
                catalog.insert(entry.fqdn.clone(), entry);
            }
        }
        let mut entries: Vec<_> = self.inputs.service_entries.iter().collect();
        entries.sort_by_key(|e| (e.namespace().to_string(), e.name().to_string()));
        for se in entries {
            for entry in self.service_entry(se) {
                if catalog.contains_key(&entry.fqdn) {
                    let fqdn = entry.fqdn.clone();
                    self.report(Diagnostic::note(
                        entry.object,
                        "spec.hosts",
                        format!("host {fqdn} is a Kubernetes Service, which takes precedence"),
                    ));
                    continue;
                }
                catalog.insert(entry.fqdn.clone(), entry);
            }
        }
        catalog
    }

    fn kubernetes_service(&mut self, svc: &Service) -> Option<CatalogService> {
        let ns = namespace_of(&svc.metadata).to_string();
        let name = name_of(&svc.metadata).to_string();
        let object = ObjectRef::new("Service", Some(&ns), &name);
        let spec = svc.spec.as_ref()?;
        if spec.type_.as_deref() == Some("ExternalName") {
            return None; // no VIP, no endpoints; out of scope as in ambient
        }
        let mut ips: Vec<String> = spec.cluster_ips.clone().unwrap_or_default();
        if ips.is_empty() {
            ips.extend(spec.cluster_ip.clone());
        }
        if ips.iter().any(|ip| ip == "None") {
            // Headless: clients dial pod IPs directly; nothing to rewrite.
            return None;
        }
        if ips.is_empty() {
            self.report(Diagnostic::note(
                object,
                "spec.clusterIP",
                "no cluster IP assigned yet (the API server assigns one); not steered",
            ));
            return None;
        }
        let mut vips = Vec::new();
        for ip in &ips {
            match ip.parse::<IpAddr>() {
                Ok(ip) => vips.push(ip),
                Err(_) => {
                    self.report(Diagnostic::rejected(
                        object.clone(),
                        "spec.clusterIPs",
                        format!("{ip:?} is not an IP address"),
                    ));
                    return None;
                }
            }
        }
        let mut ports = Vec::new();
        for (i, p) in spec.ports.iter().flatten().enumerate() {
            let protocol = p.protocol.as_deref().unwrap_or("TCP");
            if protocol != "TCP" {
                self.report(Diagnostic::unenforced(
                    object.clone(),
                    &format!("spec.ports[{i}]"),
                    format!("{protocol} port {} is not steered (only TCP is; kube-proxy still serves it)", p.port),
                ));
                continue;
            }
            let Ok(port) = u16::try_from(p.port) else {
                self.report(Diagnostic::rejected(
                    object.clone(),
                    &format!("spec.ports[{i}].port"),
                    "port out of range",
                ));
                continue;
            };
            let target = match &p.target_port {
                None => TargetPort::Number(port),
                Some(IntOrString::Int(n)) => match u16::try_from(*n) {
                    Ok(n) if n > 0 => TargetPort::Number(n),
                    _ => {
                        self.report(Diagnostic::rejected(
                            object.clone(),
                            &format!("spec.ports[{i}].targetPort"),
                            "port out of range",
                        ));
                        continue;
                    }
                },
                Some(IntOrString::String(s)) => TargetPort::Named(s.clone()),
            };
            ports.push(CatalogPort {
                port,
                name: p.name.clone(),
                target,
            });
        }
        let endpoints = match &spec.selector {
            Some(selector) if !selector.is_empty() => self.pod_endpoints(&ns, selector),
            _ => self.slice_endpoints(&ns, &name),
        };
        Some(CatalogService {
            fqdn: format!("{name}.{ns}.svc.{}", self.options.cluster_domain),
            object,
            namespace: ns,
            vips,
            ports,
            endpoints,
        })
    }

    fn pod_endpoints(&self, ns: &str, selector: &BTreeMap<String, String>) -> Vec<CatalogEndpoint> {
        let mut out = Vec::new();
        for pod in &self.inputs.pods {
            if namespace_of(&pod.metadata) != ns || !healthy(pod) {
                continue;
            }
            let labels = pod.metadata.labels.clone().unwrap_or_default();
            if !selector.iter().all(|(k, v)| labels.get(k) == Some(v)) {
                continue;
            }
            let ips = pod_ips(pod);
            if ips.is_empty() {
                continue;
            }
            let spec = pod.spec.as_ref();
            let named_ports = spec
                .into_iter()
                .flat_map(|s| s.containers.iter())
                .flat_map(|c| c.ports.iter().flatten())
                .filter_map(|p| Some((p.name.clone()?, u16::try_from(p.container_port).ok()?)))
                .collect();
            let sa = spec
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_else(|| "default".to_string());
            out.push(CatalogEndpoint {
                ips,
                labels,
                identity: format!("{ns}/{sa}"),
                named_ports,
            });
        }
        out
    }

    fn slice_endpoints(&self, ns: &str, service: &str) -> Vec<CatalogEndpoint> {
        let slices = self.inputs.endpoint_slices.iter().filter(|s| {
            namespace_of(&s.metadata) == ns
                && s.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get("kubernetes.io/service-name"))
                    .is_some_and(|n| n == service)
                && s.address_type != "FQDN"
        });
        let mut ready = Vec::new();
        let mut serving_terminating = Vec::new();
        let mut seen = BTreeSet::new();
        for slice in slices {
            let named_ports: BTreeMap<String, u16> = slice
                .ports
                .iter()
                .flatten()
                .filter_map(|p| {
                    Some((
                        p.name.clone().unwrap_or_default(),
                        u16::try_from(p.port?).ok()?,
                    ))
                })
                .collect();
            for ep in &slice.endpoints {
                let conditions = ep.conditions.as_ref();
                let is_ready = conditions.and_then(|c| c.ready).unwrap_or(true);
                let serving = conditions.and_then(|c| c.serving).unwrap_or(is_ready);
                let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
                let ips: Vec<IpAddr> = ep.addresses.iter().filter_map(|a| a.parse().ok()).collect();
                if ips.is_empty() || !seen.insert(ips.clone()) {
                    continue; // de-duplicate addresses across slices
                }
                let endpoint = CatalogEndpoint {
                    ips,
                    labels: BTreeMap::new(),
                    identity: format!("{ns}/default"),
                    named_ports: named_ports.clone(),
                };
                if is_ready {
                    ready.push(endpoint);
                } else if serving && terminating {
                    serving_terminating.push(endpoint);
                }
            }
        }
        // As kube-proxy: terminating-but-serving endpoints only when nothing is ready.
        if ready.is_empty() {
            serving_terminating
        } else {
            ready
        }
    }

    fn service_entry(&mut self, se: &crate::istio::ServiceEntry) -> Vec<CatalogService> {
        let ns = se.namespace().to_string();
        let object = ObjectRef::new("ServiceEntry", Some(&ns), se.name());
        let resolution = se.spec.resolution.as_deref().unwrap_or("NONE");
        match resolution {
            "STATIC" => {}
            "NONE" => {
                self.report(Diagnostic::note(
                    object,
                    "spec.resolution",
                    "resolution NONE passes connections to their original destination: nothing to steer",
                ));
                return Vec::new();
            }
            other => {
                self.report(Diagnostic::unenforced(
                    object,
                    "spec.resolution",
                    format!("resolution {other} is not supported yet; only STATIC"),
                ));
                return Vec::new();
            }
        }
        let mut vips = Vec::new();
        for (i, address) in se.spec.addresses.iter().enumerate() {
            match address.parse::<IpAddr>() {
                Ok(ip) => vips.push(ip),
                Err(_) => self.report(Diagnostic::unenforced(
                    object.clone(),
                    &format!("spec.addresses[{i}]"),
                    format!(
                        "{address:?} is not a single IP address (CIDR addresses are not steered)"
                    ),
                )),
            }
        }
        if vips.is_empty() {
            self.report(Diagnostic::unenforced(
                object,
                "spec.addresses",
                "no IP address to steer (address auto-allocation is not supported)",
            ));
            return Vec::new();
        }
        let mut ports = Vec::new();
        for (i, p) in se.spec.ports.iter().enumerate() {
            let protocol = p.protocol.as_deref().unwrap_or("TCP");
            if matches!(protocol, "UDP") {
                self.report(Diagnostic::unenforced(
                    object.clone(),
                    &format!("spec.ports[{i}]"),
                    "UDP is not steered",
                ));
                continue;
            }
            let (Ok(port), Ok(target)) = (
                u16::try_from(p.number),
                u16::try_from(p.target_port.unwrap_or(p.number)),
            ) else {
                self.report(Diagnostic::rejected(
                    object.clone(),
                    &format!("spec.ports[{i}]"),
                    "port out of range",
                ));
                continue;
            };
            // The endpoint's port of the same name wins, then targetPort, then the number.
            ports.push(CatalogPort {
                port,
                name: p.name.clone(),
                target: TargetPort::Number(target),
            });
        }
        let mut endpoints = Vec::new();
        for (i, we) in se.spec.endpoints.iter().enumerate() {
            let Some(ip) = we.address.as_deref().and_then(|a| a.parse::<IpAddr>().ok()) else {
                self.report(Diagnostic::unenforced(
                    object.clone(),
                    &format!("spec.endpoints[{i}].address"),
                    "not an IP address; STATIC endpoints must be IPs",
                ));
                continue;
            };
            endpoints.push(CatalogEndpoint {
                ips: vec![ip],
                labels: we.labels.clone(),
                identity: format!(
                    "{ns}/{}",
                    we.service_account.as_deref().unwrap_or("default")
                ),
                named_ports: we
                    .ports
                    .iter()
                    .filter_map(|(n, p)| Some((n.clone(), u16::try_from(*p).ok()?)))
                    .collect(),
            });
        }
        se.spec
            .hosts
            .iter()
            .map(|host| CatalogService {
                object: object.clone(),
                namespace: ns.clone(),
                fqdn: host.clone(),
                vips: vips.clone(),
                ports: ports.clone(),
                endpoints: endpoints.clone(),
            })
            .collect()
    }

    // ---- routes ----

    fn tables(
        &mut self,
        catalog: &BTreeMap<String, CatalogService>,
        identity_ids: &BTreeMap<String, u32>,
    ) -> Tables {
        let mut services: Vec<(ServiceKey, String, String)> = Vec::new(); // key, service name, route name
        let mut routes: BTreeMap<String, Vec<(u32, BackendSetKey)>> = BTreeMap::new();
        let mut sets: BTreeMap<BackendSetKey, Vec<EndpointValueDraft>> = BTreeMap::new();
        let mut set_lb: BTreeMap<BackendSetKey, u32> = BTreeMap::new();
        let vs_by_host = self.virtual_services_by_host(catalog);

        for service in catalog.values() {
            for port in &service.ports {
                for v6 in [false, true] {
                    let vips: Vec<IpAddr> = service
                        .vips
                        .iter()
                        .copied()
                        .filter(|ip| ip.is_ipv6() == v6)
                        .collect();
                    if vips.is_empty() {
                        continue;
                    }
                    let route_name = format!(
                        "{}:{} ({})",
                        service.fqdn,
                        port.port,
                        if v6 { "v6" } else { "v4" }
                    );
                    // Without a (valid) VirtualService: the service's own endpoints.
                    let default = || {
                        vec![(
                            1,
                            BackendSetKey {
                                fqdn: service.fqdn.clone(),
                                port: port.port,
                                subset: None,
                                v6,
                            },
                        )]
                    };
                    let destinations = vs_by_host
                        .get(&service.fqdn)
                        .and_then(|vs| {
                            self.route_from_virtual_service(vs, service, port.port, v6, catalog)
                        })
                        .unwrap_or_else(default);
                    for (_, key) in &destinations {
                        if !sets.contains_key(key) {
                            let (endpoints, lb) = self.backend_set(key, catalog);
                            sets.insert(key.clone(), endpoints);
                            set_lb.insert(key.clone(), lb);
                        }
                    }
                    for vip in vips {
                        services.push((
                            ServiceKey {
                                ip: ip16(vip),
                                port: port.port,
                                protocol: IPPROTO_TCP,
                                pad: 0,
                            },
                            service.fqdn.clone(),
                            route_name.clone(),
                        ));
                    }
                    routes.insert(route_name, destinations);
                }
            }
        }

        // Stable IDs from names.
        let service_ids = assign_ids(services.iter().map(|(_, s, _)| s.clone()));
        let route_ids = assign_ids(routes.keys().cloned());
        let set_ids = assign_ids(sets.keys().map(BackendSetKey::name));

        let mut t = Tables::default();
        let mut seen_keys = BTreeSet::new();
        for (key, service, route) in &services {
            if !seen_keys.insert(*key) {
                // Two services claim one VIP:port; the first (sorted by host) keeps it.
                self.report(Diagnostic::rejected(
                    catalog[service].object.clone(),
                    "spec",
                    format!(
                        "VIP {}:{} is already used by another service",
                        IpAddr::from(key.ip).to_canonical(),
                        key.port
                    ),
                ));
                continue;
            }
            t.services.push(ServiceRecord {
                key: *key,
                value: ServiceValue {
                    service_id: service_ids[service],
                    route_id: route_ids[route],
                },
            });
            t.names
                .services
                .insert(service_ids[service], service.clone());
        }
        for (name, destinations) in &routes {
            let mut value = RouteValue {
                destination_count: 0,
                total_weight: 0,
                cumulative_weight: [0; MAX_ROUTE_DESTINATIONS],
                backend_set: [0; MAX_ROUTE_DESTINATIONS],
            };
            for (i, (weight, key)) in destinations.iter().enumerate() {
                value.total_weight += weight;
                value.cumulative_weight[i] = value.total_weight;
                value.backend_set[i] = set_ids[&key.name()];
                value.destination_count += 1;
            }
            t.routes.push(RouteRecord {
                route_id: route_ids[name],
                value,
            });
            t.names.routes.insert(route_ids[name], name.clone());
        }
        for (key, endpoints) in &sets {
            let set_id = set_ids[&key.name()];
            t.backend_sets.push(BackendSetRecord {
                set_id,
                value: BackendSetValue {
                    endpoint_count: endpoints.len() as u32,
                    lb_policy: set_lb[key],
                },
            });
            t.names.backend_sets.insert(set_id, key.name());
            for (index, ep) in endpoints.iter().enumerate() {
                t.endpoints.push(EndpointRecord {
                    key: EndpointKey {
                        set_id,
                        index: index as u32,
                    },
                    value: EndpointValue {
                        ip: ip16(ep.ip),
                        port: ep.port,
                        pad: 0,
                        identity: identity_ids.get(&ep.identity).copied().unwrap_or(0),
                    },
                });
            }
        }
        for (name, id) in identity_ids {
            t.names.identities.insert(*id, name.clone());
        }
        t
    }

    /// The VirtualService that applies to each host: mesh-bound, most recent conflicts resolved to
    /// the oldest (then by namespace/name), as a deterministic stand-in for Istio's IST0109 conflict.
    fn virtual_services_by_host(
        &mut self,
        catalog: &BTreeMap<String, CatalogService>,
    ) -> BTreeMap<String, &'a VirtualService> {
        let inputs: &'a Inputs = self.inputs;
        let mut candidates: Vec<&'a VirtualService> = inputs
            .virtual_services
            .iter()
            .filter(|vs| {
                vs.spec.gateways.is_empty() || vs.spec.gateways.iter().any(|g| g == "mesh")
            })
            .collect();
        candidates.sort_by_key(|vs| {
            (
                vs.metadata.creation_timestamp.as_ref().map(|t| t.0),
                vs.namespace().to_string(),
                vs.name().to_string(),
            )
        });
        let mut by_host: BTreeMap<String, &'a VirtualService> = BTreeMap::new();
        for vs in candidates {
            for host in &vs.spec.hosts {
                let fqdn = self.fqdn(host, vs.namespace());
                let matching: Vec<String> = if let Some(suffix) = fqdn.strip_prefix('*') {
                    catalog
                        .keys()
                        .filter(|h| h.ends_with(suffix))
                        .cloned()
                        .collect()
                } else {
                    vec![fqdn]
                };
                for h in matching {
                    match by_host.get(&h) {
                        Some(winner) => {
                            let w = ObjectRef::new(
                                "VirtualService",
                                Some(winner.namespace()),
                                winner.name(),
                            );
                            self.report(Diagnostic::note(
                                ObjectRef::new("VirtualService", Some(vs.namespace()), vs.name()),
                                "spec.hosts",
                                format!("host {h} is also routed by {w}, which wins (older); mesh VirtualServices do not merge"),
                            ));
                        }
                        None => {
                            by_host.insert(h, vs);
                        }
                    }
                }
            }
        }
        by_host
    }

    /// The weighted destinations a VirtualService gives connections to `port`, or `None` when the
    /// service keeps its default routing (the VirtualService is rejected, or routes by nothing the
    /// kernel can see).
    fn route_from_virtual_service(
        &mut self,
        vs: &VirtualService,
        service: &CatalogService,
        port: u16,
        v6: bool,
        catalog: &BTreeMap<String, CatalogService>,
    ) -> Option<Vec<(u32, BackendSetKey)>> {
        let object = ObjectRef::new("VirtualService", Some(vs.namespace()), vs.name());
        for (i, _) in vs.spec.tls.iter().enumerate() {
            self.report(Diagnostic::unenforced(
                object.clone(),
                &format!("spec.tls[{i}]"),
                "TLS routes match on SNI, which needs the first payload bytes",
            ));
        }
        // tcp routes first: fully decidable at connect().
        for (i, route) in vs.spec.tcp.iter().enumerate() {
            let applies = route.matches.is_empty()
                || route.matches.iter().any(|m| {
                    m.port.is_none_or(|p| p == u32::from(port))
                        && m.destination_subnets.is_empty()
                        && m.source_labels.is_empty()
                        && m.source_namespace.is_none()
                });
            let client_selective = route.matches.iter().any(|m| {
                !m.source_labels.is_empty()
                    || m.source_namespace.is_some()
                    || !m.destination_subnets.is_empty()
            });
            if client_selective {
                self.report(Diagnostic::unenforced(
                    object.clone(),
                    &format!("spec.tcp[{i}].match"),
                    "sourceLabels, sourceNamespace and destinationSubnets matches are not compiled yet; the route is skipped",
                ));
            }
            if applies {
                let field = format!("spec.tcp[{i}].route");
                return self.destinations(
                    &object,
                    &field,
                    &route.route,
                    vs.namespace(),
                    port,
                    v6,
                    catalog,
                );
            }
        }
        if vs.spec.http.is_empty() {
            return None;
        }
        for (i, route) in vs.spec.http.iter().enumerate() {
            self.report_l7(&object, i, route);
        }
        // http: the first catch-all route is what every connection gets; earlier routes match on
        // request content, which connect() cannot see.
        let Some((index, route)) = vs
            .spec
            .http
            .iter()
            .enumerate()
            .find(|(_, r)| r.is_catch_all())
        else {
            self.report(Diagnostic::unenforced(
                object,
                "spec.http",
                "every http route matches on request content, which needs L7; connections use the service's default routing",
            ));
            return None;
        };
        for i in 0..index {
            self.report(Diagnostic::unenforced(
                object.clone(),
                &format!("spec.http[{i}].match"),
                format!("request matching needs L7; in the kernel all connections follow spec.http[{index}]"),
            ));
        }
        if route.route.is_empty() {
            self.report(Diagnostic::unenforced(
                object,
                &format!("spec.http[{index}]"),
                "the route has no destinations (redirect, direct response or delegation needs L7); default routing",
            ));
            return None;
        }
        let field = format!("spec.http[{index}].route");
        self.destinations(
            &object,
            &field,
            &route.route,
            vs.namespace(),
            port,
            v6,
            catalog,
        )
    }

    fn report_l7(&mut self, object: &ObjectRef, index: usize, route: &HttpRoute) {
        for field in route.l7_fields() {
            self.report(Diagnostic::unenforced(
                object.clone(),
                &format!("spec.http[{index}].{field}"),
                "needs L7 (an HTTP proxy); not enforced in KernelNative",
            ));
        }
        for (i, d) in route.route.iter().enumerate() {
            if d.headers.is_some() {
                self.report(Diagnostic::unenforced(
                    object.clone(),
                    &format!("spec.http[{index}].route[{i}].headers"),
                    "header manipulation needs L7; not enforced in KernelNative",
                ));
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn destinations(
        &mut self,
        object: &ObjectRef,
        field: &str,
        route: &[RouteDestination],
        vs_namespace: &str,
        port: u16,
        v6: bool,
        catalog: &BTreeMap<String, CatalogService>,
    ) -> Option<Vec<(u32, BackendSetKey)>> {
        if route.len() > MAX_ROUTE_DESTINATIONS {
            self.report(Diagnostic::rejected(
                object.clone(),
                field,
                format!(
                    "{} destinations; the kernel route holds at most {MAX_ROUTE_DESTINATIONS}",
                    route.len()
                ),
            ));
            return None;
        }
        let mut out = Vec::new();
        for (i, d) in route.iter().enumerate() {
            let weight = d.weight.unwrap_or(0);
            let Ok(mut weight) = u32::try_from(weight) else {
                self.report(Diagnostic::rejected(
                    object.clone(),
                    &format!("{field}[{i}].weight"),
                    "weight must be between 0 and 2^32-1",
                ));
                return None;
            };
            if route.len() == 1 {
                weight = 1; // a single destination gets everything, whatever its weight
            }
            let fqdn = self.fqdn(&d.destination.host, vs_namespace);
            let Some(target) = catalog.get(&fqdn) else {
                self.report(Diagnostic::rejected(
                    object.clone(),
                    &format!("{field}[{i}].destination.host"),
                    format!("{fqdn} is not a known service with a VIP"),
                ));
                return None;
            };
            let dest_port = match d.destination.port.as_ref().and_then(|p| p.number) {
                Some(n) => u16::try_from(n).ok(),
                None if target.ports.len() == 1 => Some(target.ports[0].port),
                None => Some(port),
            };
            let Some(dest_port) = dest_port.filter(|p| target.ports.iter().any(|tp| tp.port == *p))
            else {
                self.report(Diagnostic::rejected(
                    object.clone(),
                    &format!("{field}[{i}].destination.port"),
                    format!("{fqdn} has no TCP port {}", dest_port.unwrap_or(0)),
                ));
                return None;
            };
            if let Some(subset) = &d.destination.subset {
                if self
                    .subset_labels(&fqdn, &target.namespace, subset)
                    .is_none()
                {
                    self.report(Diagnostic::rejected(
                        object.clone(),
                        &format!("{field}[{i}].destination.subset"),
                        format!("no DestinationRule for {fqdn} defines subset {subset:?}"),
                    ));
                    return None;
                }
            }
            if weight == 0 {
                continue; // weight 0 gets no traffic
            }
            out.push((
                weight,
                BackendSetKey {
                    fqdn,
                    port: dest_port,
                    subset: d.destination.subset.clone(),
                    v6,
                },
            ));
        }
        if out.is_empty() {
            self.report(Diagnostic::rejected(
                object.clone(),
                field,
                "the weights add up to 0: no destination would get traffic",
            ));
            return None;
        }
        if out.iter().map(|(w, _)| u64::from(*w)).sum::<u64>() > u64::from(u32::MAX) {
            self.report(Diagnostic::rejected(
                object.clone(),
                field,
                "the weights add up to more than 2^32-1",
            ));
            return None;
        }
        Some(out)
    }

    // ---- destination rules and backend sets ----

    /// The DestinationRule for `fqdn`: the service's namespace first, then the root namespace;
    /// within one, exact hosts before wildcards, then the oldest.
    fn destination_rule(&self, fqdn: &str, service_namespace: &str) -> Option<&'a DestinationRule> {
        let inputs: &'a Inputs = self.inputs;
        for ns in [service_namespace, self.options.root_namespace.as_str()] {
            let mut matching: Vec<(&'a DestinationRule, bool)> = inputs
                .destination_rules
                .iter()
                .filter(|dr| dr.namespace() == ns)
                .filter_map(|dr| {
                    let host = self.fqdn(&dr.spec.host, dr.namespace());
                    if host == fqdn {
                        Some((dr, false))
                    } else if host
                        .strip_prefix('*')
                        .is_some_and(|suffix| fqdn.ends_with(suffix))
                    {
                        Some((dr, true))
                    } else {
                        None
                    }
                })
                .collect();
            matching.sort_by_key(|(dr, wildcard)| {
                (
                    *wildcard,
                    dr.metadata.creation_timestamp.as_ref().map(|t| t.0),
                    dr.name().to_string(),
                )
            });
            if let Some((dr, _)) = matching.first() {
                return Some(dr);
            }
        }
        None
    }

    fn subset_labels(
        &self,
        fqdn: &str,
        service_namespace: &str,
        subset: &str,
    ) -> Option<BTreeMap<String, String>> {
        let dr = self.destination_rule(fqdn, service_namespace)?;
        dr.spec
            .subsets
            .iter()
            .find(|s| s.name == subset)
            .map(|s| s.labels.clone())
    }

    /// The endpoints of a backend set and its load-balancing policy.
    fn backend_set(
        &mut self,
        key: &BackendSetKey,
        catalog: &BTreeMap<String, CatalogService>,
    ) -> (Vec<EndpointValueDraft>, u32) {
        let service = &catalog[&key.fqdn];
        let port = service
            .ports
            .iter()
            .find(|p| p.port == key.port)
            .expect("port checked by the caller");
        let dr = self.destination_rule(&key.fqdn, &service.namespace);
        let subset = key
            .subset
            .as_ref()
            .and_then(|name| dr.and_then(|dr| dr.spec.subsets.iter().find(|s| &s.name == name)));
        let labels = subset.map(|s| s.labels.clone()).unwrap_or_default();
        let policy = subset
            .and_then(|s| s.traffic_policy.as_ref())
            .or_else(|| dr.and_then(|dr| dr.spec.traffic_policy.as_ref()));
        let lb = match (dr, policy) {
            (Some(dr), Some(policy)) => {
                let object = ObjectRef::new("DestinationRule", Some(dr.namespace()), dr.name());
                self.load_balancer(&object, policy)
            }
            _ => lb_policy::RANDOM,
        };
        let mut endpoints = Vec::new();
        for ep in &service.endpoints {
            if !labels.iter().all(|(k, v)| ep.labels.get(k) == Some(v)) {
                continue;
            }
            let target = match &port.target {
                TargetPort::Number(n) => port
                    .name
                    .as_ref()
                    .and_then(|name| ep.named_ports.get(name))
                    .copied()
                    .unwrap_or(*n),
                TargetPort::Named(name) => match ep.named_ports.get(name) {
                    Some(n) => *n,
                    None => continue, // this pod does not expose the named port
                },
            };
            for ip in ep.ips.iter().filter(|ip| ip.is_ipv6() == key.v6) {
                endpoints.push(EndpointValueDraft {
                    ip: *ip,
                    port: target,
                    identity: ep.identity.clone(),
                });
            }
        }
        endpoints.sort();
        endpoints.dedup();
        (endpoints, lb)
    }

    fn load_balancer(&mut self, object: &ObjectRef, policy: &TrafficPolicy) -> u32 {
        for (field, present) in [
            ("connectionPool", policy.connection_pool.is_some()),
            ("outlierDetection", policy.outlier_detection.is_some()),
            ("tls", policy.tls.is_some()),
            ("portLevelSettings", !policy.port_level_settings.is_empty()),
        ] {
            if present {
                self.report(Diagnostic::unenforced(
                    object.clone(),
                    &format!("spec.trafficPolicy.{field}"),
                    "not enforced by the kernel data plane yet",
                ));
            }
        }
        let Some(lb) = &policy.load_balancer else {
            return lb_policy::RANDOM;
        };
        if lb.locality_lb_setting.is_some() {
            self.report(Diagnostic::unenforced(
                object.clone(),
                "spec.trafficPolicy.loadBalancer.localityLbSetting",
                "locality load balancing is not enforced yet",
            ));
        }
        if let Some(hash) = &lb.consistent_hash {
            if hash.use_source_ip == Some(true) {
                return lb_policy::SOURCE_IP_HASH;
            }
            self.report(Diagnostic::unenforced(
                object.clone(),
                "spec.trafficPolicy.loadBalancer.consistentHash",
                "only useSourceIp hashing is possible at connect(); header, cookie and query hashing need L7 (random is used)",
            ));
            return lb_policy::RANDOM;
        }
        match lb.simple.as_deref() {
            None | Some("UNSPECIFIED" | "RANDOM") => lb_policy::RANDOM,
            Some(other) => {
                self.report(Diagnostic::note(
                    object.clone(),
                    "spec.trafficPolicy.loadBalancer.simple",
                    format!("{other} is approximated by uniform random choice at connect()"),
                ));
                lb_policy::RANDOM
            }
        }
    }

    fn identity_ids(&self, catalog: &BTreeMap<String, CatalogService>) -> BTreeMap<String, u32> {
        let names: BTreeSet<String> = catalog
            .values()
            .flat_map(|s| s.endpoints.iter().map(|e| e.identity.clone()))
            .chain(self.inputs.pods.iter().map(pod_identity))
            .collect();
        assign_ids(names.into_iter())
    }

    // ---- enrolment ----

    /// Enrolled workloads, by node.
    fn workloads(
        &self,
        identities: &BTreeMap<String, u32>,
    ) -> BTreeMap<String, Vec<WorkloadRecord>> {
        let (label, value) = self
            .inputs
            .config
            .as_ref()
            .map(|c| {
                (
                    c.spec.enrollment.label.clone(),
                    c.spec.enrollment.value.clone(),
                )
            })
            .unwrap_or_else(|| ("istio.io/dataplane-mode".to_string(), "Kmesh".to_string()));
        let namespace_enrolled: BTreeSet<&str> = self
            .inputs
            .namespaces
            .iter()
            .filter(|ns| {
                ns.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(&label))
                    .is_some_and(|v| v.eq_ignore_ascii_case(&value))
            })
            .map(|ns| name_of(&ns.metadata))
            .collect();
        let mut by_node: BTreeMap<String, Vec<WorkloadRecord>> = BTreeMap::new();
        for pod in &self.inputs.pods {
            let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else {
                continue;
            };
            if !enrolled(pod, &label, &value, &namespace_enrolled) {
                continue;
            }
            let identity = identities.get(&pod_identity(pod)).copied().unwrap_or(0);
            for ip in pod_ips(pod) {
                by_node
                    .entry(node.clone())
                    .or_default()
                    .push(WorkloadRecord {
                        ip: ip16(ip),
                        identity,
                        pad: 0,
                    });
            }
        }
        for workloads in by_node.values_mut() {
            workloads.sort();
            workloads.dedup_by_key(|w| w.ip);
        }
        by_node
    }
}

/// An endpoint with its port chosen, before IDs.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct EndpointValueDraft {
    ip: IpAddr,
    port: u16,
    identity: String,
}

/// Healthy as istiod's ambient controller sees it: Ready, not being deleted, not finished.
fn healthy(pod: &Pod) -> bool {
    let status = pod.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) || pod.metadata.deletion_timestamp.is_some() {
        return false;
    }
    status
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let status = pod.status.as_ref();
    let mut ips: Vec<IpAddr> = status
        .and_then(|s| s.pod_ips.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|p| p.ip.parse().ok())
        .collect();
    if ips.is_empty() {
        ips.extend(
            status
                .and_then(|s| s.pod_ip.as_ref())
                .and_then(|ip| ip.parse::<IpAddr>().ok()),
        );
    }
    ips
}

fn pod_identity(pod: &Pod) -> String {
    let sa = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".to_string());
    format!("{}/{sa}", namespace_of(&pod.metadata))
}

/// Whether a pod is in the mesh (Kmesh's rules): its own label, else its namespace's; the pod value
/// `none` opts out; host-network pods, pods with a sidecar and Istio waypoints are never enrolled.
fn enrolled(pod: &Pod, label: &str, value: &str, namespace_enrolled: &BTreeSet<&str>) -> bool {
    let labels = pod.metadata.labels.as_ref();
    let annotations = pod.metadata.annotations.as_ref();
    if pod.spec.as_ref().and_then(|s| s.host_network) == Some(true)
        || annotations.is_some_and(|a| a.contains_key("sidecar.istio.io/status"))
        || labels
            .and_then(|l| l.get("gateway.istio.io/managed"))
            .is_some_and(|v| v == "istio.io-mesh-controller")
    {
        return false;
    }
    match labels.and_then(|l| l.get(label)) {
        Some(v) if v.eq_ignore_ascii_case("none") => false,
        Some(v) if v.eq_ignore_ascii_case(value) => true,
        Some(_) => false,
        None => namespace_enrolled.contains(namespace_of(&pod.metadata)),
    }
}

/// Stable IDs for `names`: the low 32 bits of the name's FNV-1a 64 hash, 0 avoided, collisions resolved by probing in
/// sorted name order, so an ID changes only when a colliding name comes or goes.
fn assign_ids(names: impl Iterator<Item = String>) -> BTreeMap<String, u32> {
    let names: BTreeSet<String> = names.collect();
    let mut taken = BTreeSet::new();
    let mut ids = BTreeMap::new();
    for name in names {
        let mut id = kmesh_snapshot::content_hash(name.as_bytes()) as u32;
        while id == 0 || !taken.insert(id) {
            id = id.wrapping_add(1);
        }
        ids.insert(name, id);
    }
    ids
}
