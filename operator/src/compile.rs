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
//! - a DestinationRule gives subsets (label selectors over the endpoints) and the load balancer;
//! - a Gateway API mesh route (GAMMA: an `HTTPRoute` or `TCPRoute` whose `parentRefs` name a core
//!   Service, `group: ""`, `kind: Service`, optionally one of its ports) chooses the weighted
//!   backends of that Service's ports, as below.
//!
//! Gateway API mesh routes, decided here:
//! - **Gateway API beats VirtualService.** When an HTTPRoute or TCPRoute is attached to a service
//!   port, it routes that port and a VirtualService for the same host is ignored there (reported
//!   with a Note). Istio defines no order between the two (both become routes for the host); ambient
//!   waypoints honour only Gateway API routes, so the explicit, newer API wins.
//! - **Which HTTPRoute rule the kernel follows.** HTTPRoute precedence is not first-match
//!   (semantics §6: exact path, longest prefix, method, headers, query params, then the oldest
//!   route, `namespace/name`, rule order). connect() sees no request, so only a rule that matches
//!   every request can be compiled: no `matches`, or a match that is `PathPrefix /` alone. All such
//!   matches tie on the first five criteria, so the one the kernel follows is the catch-all of the
//!   oldest route, then by `namespace/name`, then the first in rule order; it is the one Istio
//!   gives every request no other rule claims. Other catch-all rules never get traffic (Note); the
//!   matches of the other rules, filters, timeouts and retries need L7 (Unenforced). Several
//!   HTTPRoutes on one Service port are merged this way, so the oldest route with a catch-all wins.
//!   A TCPRoute has nothing to match on: the oldest TCPRoute on a port wins (the others get a
//!   Note), and its first (in v1 its only) rule.
//! - **HTTP or TCP.** An HTTPRoute applies to Service ports not declared opaque (port name prefix
//!   or `appProtocol` `tcp`, `tls`, `https`, …), a TCPRoute to ports not declared HTTP; on a port
//!   declaring neither, Istio tells HTTP from other traffic by sniffing, which connect() cannot, so
//!   the HTTPRoute wins there and the TCPRoute is reported.
//! - **Weights.** An omitted backendRef weight is 1 and weight 0 gets no connection (unlike
//!   VirtualService, a single destination of weight 0 gets nothing either). When every weight is 0
//!   the rule is Rejected and, as Gateway API requires (Istio answers HTTP 500), connections to the
//!   port are refused. A backendRef without `port` rejects the rule; the port keeps its default
//!   routing.
//! - **Invalid backends.** A backendRef to a Service that does not exist (or lacks the port)
//!   keeps its weight and gets a backend set with no endpoints: its share of connections is
//!   refused, the kernel's closest match to Istio's HTTP 500 for that share (and exactly what
//!   Gateway API asks of a TCPRoute). Reported as a Note. A rule without backendRefs likewise
//!   refuses every connection.
//! - **Cross-namespace backendRefs** need a ReferenceGrant in the backend's namespace, as in Istio.
//!   Without one the reference is Rejected and, like an invalid backend, its share is refused.
//! - **Not compiled:** consumer routes (a route in another namespace than its parent Service,
//!   which Istio applies only to clients in the route's namespace: Unenforced), non-Service
//!   parents (Gateways: a Note, a proxy serves them), `hostnames` (ignored for mesh routes, as
//!   Istio does: Note).
//!
//! Unenforced L7 features are worded after the mode (one helper, `Compiler::l7_unenforced`):
//! "not enforced in KernelNative", "marked for the waypoint" in DualEngine, and in Disabled mode
//! that the mesh is disabled.
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
    ServiceValue, WorkloadRecord, ip16, lb_policy,
};
use kmesh_snapshot::Snapshot;

use crate::{
    crd::Mode,
    diagnostics::{Diagnostic, ObjectRef},
    gateway_api::{self, BackendRef, ParentReference, filter_type},
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
    let node_mode = inputs
        .config
        .as_ref()
        .map(|cfg| cfg.spec.mode)
        .unwrap_or_default();
    let mut pods_by_label: BTreeMap<(&str, &str, &str), Vec<&Pod>> = BTreeMap::new();
    for pod in inputs.pods.iter().filter(|p| healthy(p)) {
        for (k, v) in pod.metadata.labels.iter().flatten() {
            pods_by_label
                .entry((namespace_of(&pod.metadata), k.as_str(), v.as_str()))
                .or_default()
                .push(pod);
        }
    }
    let mut c = Compiler {
        inputs,
        options,
        pods_by_label,
        mode: node_mode,
        diagnostics: Vec::new(),
    };
    for dr in &inputs.destination_rules {
        if let Err((field, reason)) = crate::validate::destination_rule(&dr.spec) {
            c.report(Diagnostic::rejected(
                ObjectRef::new("DestinationRule", Some(dr.namespace()), dr.name()),
                &field,
                reason,
            ));
        }
    }
    if node_mode == Mode::Disabled {
        let name = inputs
            .config
            .as_ref()
            .and_then(|cfg| cfg.metadata.name.as_deref())
            .unwrap_or("default");
        c.report(Diagnostic::note(
            ObjectRef::new("KmeshConfig", None, name),
            "spec.mode",
            "the mesh is disabled: the node programs pass all traffic through; routes are compiled but not applied",
        ));
    }
    let catalog = c.catalog();
    c.report_client_namespace_destination_rules(&catalog);
    let identities = c.identity_ids(&catalog);
    let tables = c.tables(&catalog, &identities);
    let workloads = c.workloads(&identities);

    let limits = inputs
        .config
        .as_ref()
        .and_then(|cfg| cfg.spec.capacity.as_ref())
        .map(|cap| cap.limits())
        .unwrap_or_default();
    let config_ref = ObjectRef::new("KmeshConfig", None, crate::crd::SINGLETON_NAME);
    let mut snapshots = BTreeMap::new();
    for node in nodes {
        let mut snapshot = Snapshot {
            node_name: node.clone(),
            generation,
            config: NodeConfig {
                mode: node_mode.kernel_value(),
                flags: 0,
            },
            services: tables.services.clone(),
            routes: tables.routes.clone(),
            backend_sets: tables.backend_sets.clone(),
            endpoints: tables.endpoints.clone(),
            workloads: workloads.get(node).cloned().unwrap_or_default(),
        };
        snapshot.sort();
        // A snapshot over the configured capacity is not produced: the node keeps the one it has.
        if let Some(reason) = over_capacity(&snapshot, &limits) {
            c.report(Diagnostic::rejected(
                config_ref.clone(),
                "spec.capacity",
                format!("node {node}'s snapshot {reason}; the node keeps its current snapshot"),
            ));
            continue;
        }
        snapshots.insert(node.clone(), snapshot);
    }
    c.report_unimplemented_settings();
    let mut diagnostics = c.diagnostics;
    for object in &inputs.not_yet_supported {
        let reason = match object.kind.as_str() {
            "GRPCRoute" => "GRPCRoute is not compiled yet (HTTPRoute and TCPRoute are)",
            "TLSRoute" => {
                "TLSRoute is not compiled: it matches on SNI, which needs the first payload bytes"
            }
            _ => "this kind is not compiled yet (authorization policies come in a later issue)",
        };
        diagnostics.push(Diagnostic::unenforced(object.clone(), "", reason));
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
    /// The declared application protocol, which decides whether HTTPRoutes or TCPRoutes apply.
    protocol: PortProtocol,
}

/// A port's application protocol as Istio reads it: `appProtocol` (or a ServiceEntry port's
/// `protocol`), else the port name's prefix (`http-web` is HTTP).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PortProtocol {
    /// HTTP, HTTP/2, gRPC: HTTPRoutes apply, TCPRoutes do not.
    Http,
    /// TCP, TLS, HTTPS and other opaque protocols: TCPRoutes apply, HTTPRoutes do not.
    Opaque,
    /// Not declared: Istio sniffs; both kinds of route apply.
    Unknown,
}

impl PortProtocol {
    fn named(protocol: &str) -> PortProtocol {
        match protocol.to_ascii_lowercase().as_str() {
            "http" | "http2" | "http_proxy" | "grpc" | "grpc-web" | "kubernetes.io/h2c"
            | "kubernetes.io/ws" => PortProtocol::Http,
            "tcp" | "tls" | "https" | "mongo" | "mysql" | "redis" | "kubernetes.io/wss" => {
                PortProtocol::Opaque
            }
            _ => PortProtocol::Unknown,
        }
    }

    fn of_service_port(name: Option<&str>, app_protocol: Option<&str>) -> PortProtocol {
        match app_protocol.map(PortProtocol::named) {
            Some(p) if p != PortProtocol::Unknown => p,
            _ => name
                .map(|n| PortProtocol::named(n.split('-').next().unwrap_or(n)))
                .unwrap_or(PortProtocol::Unknown),
        }
    }

    fn describe(self) -> &'static str {
        match self {
            PortProtocol::Http => "HTTP",
            PortProtocol::Opaque => "opaque (TCP, TLS, …)",
            PortProtocol::Unknown => "without protocol",
        }
    }
}

/// The two kinds of Gateway API mesh route the compiler reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RouteKind {
    Http,
    Tcp,
}

impl RouteKind {
    fn name(self) -> &'static str {
        match self {
            RouteKind::Http => "HTTPRoute",
            RouteKind::Tcp => "TCPRoute",
        }
    }

    /// Whether a route of this kind applies to a port of `protocol`.
    fn accepts(self, protocol: PortProtocol) -> bool {
        match self {
            RouteKind::Http => protocol != PortProtocol::Opaque,
            RouteKind::Tcp => protocol != PortProtocol::Http,
        }
    }
}

/// The Gateway API mesh routes attached to one service port, oldest first (then by
/// namespace/name).
#[derive(Default)]
struct Attached<'a> {
    http: Vec<&'a gateway_api::HttpRoute>,
    tcp: Vec<&'a gateway_api::TcpRoute>,
}

impl Attached<'_> {
    /// The route that decides (the oldest HTTPRoute, else the oldest TCPRoute), for diagnostics.
    fn describe(&self) -> String {
        match (self.http.first(), self.tcp.first()) {
            (Some(r), _) => format!("HTTPRoute {}/{}", r.namespace(), r.name()),
            (None, Some(r)) => format!("TCPRoute {}/{}", r.namespace(), r.name()),
            (None, None) => "no route".to_string(),
        }
    }
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
    origin: SetOrigin,
}

/// What a backend set stands for. Only `Service` sets have endpoints: the others exist so that a
/// share of connections is refused, as Istio fails the corresponding requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum SetOrigin {
    /// The endpoints of a known service port (and subset).
    Service,
    /// A Gateway API backendRef that resolves to nothing usable (unknown service or port, a
    /// cross-namespace reference no ReferenceGrant permits): no endpoints.
    Unresolved,
    /// A Gateway API rule that sends nothing anywhere (no backendRefs, every weight 0), keyed by
    /// the routed service port: no endpoints.
    NoBackends,
}

impl BackendSetKey {
    /// The endpoints of `fqdn:port` (no subset).
    fn service(fqdn: &str, port: u16, v6: bool) -> Self {
        BackendSetKey {
            fqdn: fqdn.to_string(),
            port,
            subset: None,
            v6,
            origin: SetOrigin::Service,
        }
    }

    fn name(&self) -> String {
        let family = if self.v6 { "v6" } else { "v4" };
        match (&self.subset, self.origin) {
            (_, SetOrigin::Unresolved) => {
                format!("{}:{} unresolved ({family})", self.fqdn, self.port)
            }
            (_, SetOrigin::NoBackends) => {
                format!("{}:{} no backends ({family})", self.fqdn, self.port)
            }
            (Some(s), SetOrigin::Service) => {
                format!("{}:{} subset {s} ({family})", self.fqdn, self.port)
            }
            (None, SetOrigin::Service) => format!("{}:{} ({family})", self.fqdn, self.port),
        }
    }
}

struct Compiler<'a> {
    inputs: &'a Inputs,
    options: &'a CompileOptions,
    /// Healthy pods by (namespace, label key, label value): selector matching looks up the first
    /// selector label instead of scanning every pod for every service (which is quadratic).
    pods_by_label: BTreeMap<(&'a str, &'a str, &'a str), Vec<&'a Pod>>,
    /// The node mode, for the wording of unenforced features.
    mode: Mode,
    diagnostics: Vec<Diagnostic>,
}

fn name_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> &str {
    meta.name.as_deref().unwrap_or("")
}

fn namespace_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> &str {
    meta.namespace.as_deref().unwrap_or("default")
}

/// Oldest first, then by namespace and name: how Istio breaks ties between routes.
fn age_order(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> impl Ord + use<> {
    (
        meta.creation_timestamp.as_ref().map(|t| t.0),
        namespace_of(meta).to_string(),
        name_of(meta).to_string(),
    )
}

impl<'a> Compiler<'a> {
    fn report(&mut self, d: Diagnostic) {
        self.diagnostics.push(d);
    }

    /// The one wording for a feature that needs L7 (an HTTP or TLS proxy), by mode. `feature`
    /// says what needs L7; `in_kernel`, what connections get instead (left out when the mesh is
    /// disabled, since then nothing is steered at all).
    fn l7_unenforced(&self, feature: &str, in_kernel: Option<&str>) -> String {
        match (self.mode, in_kernel) {
            (Mode::KernelNative, None) => format!("{feature}; not enforced in KernelNative"),
            (Mode::KernelNative, Some(k)) => {
                format!("{feature}; not enforced in KernelNative; {k}")
            }
            (Mode::DualEngine, None) => format!(
                "{feature}; marked for the waypoint (L7 waypoint support comes in a later release)"
            ),
            (Mode::DualEngine, Some(k)) => format!(
                "{feature}; marked for the waypoint (L7 waypoint support comes in a later release); until then {k}"
            ),
            (Mode::Disabled, _) => format!("{feature}; the mesh is disabled (mode Disabled): nothing is enforced"),
        }
    }

    /// Expands a short host name as Istio does: a name without dots lives in `namespace`.
    fn fqdn(&self, host: &str, namespace: &str) -> String {
        if host.contains('.') || host == "*" || host.parse::<IpAddr>().is_ok() {
            host.to_string()
        } else {
            format!("{host}.{namespace}.svc.{}", self.options.cluster_domain)
        }
    }

    /// KmeshConfig settings the system does not act on yet are reported, never silently ignored.
    fn report_unimplemented_settings(&mut self) {
        let Some(config) = self.inputs.config.as_ref() else {
            return;
        };
        let object = ObjectRef::new("KmeshConfig", None, crate::crd::SINGLETON_NAME);
        let spec = &config.spec;
        if spec.access_log {
            self.report(Diagnostic::unenforced(
                object.clone(),
                "spec.accessLog",
                "access logs are not produced yet (they come with the observability work)",
            ));
        }
        if spec.log_level != crate::crd::LogLevel::default() {
            self.report(Diagnostic::unenforced(
                object,
                "spec.logLevel",
                "not propagated to the agents yet; set their --log-level",
            ));
        }
    }

    /// A DestinationRule outside its service's namespace and the root namespace applies, in Istio,
    /// only to clients in its own namespace. The kernel's tables are per service, not per client, so
    /// such a rule is not compiled; say so rather than drop it.
    fn report_client_namespace_destination_rules(
        &mut self,
        catalog: &BTreeMap<String, CatalogService>,
    ) {
        let inputs: &'a Inputs = self.inputs;
        for dr in &inputs.destination_rules {
            let host = self.fqdn(&dr.spec.host, dr.namespace());
            let Some(service) = catalog.get(&host) else {
                continue;
            };
            if dr.namespace() != service.namespace && dr.namespace() != self.options.root_namespace
            {
                self.report(Diagnostic::unenforced(
                    ObjectRef::new("DestinationRule", Some(dr.namespace()), dr.name()),
                    "spec.host",
                    format!(
                        "applies only to clients in namespace {}; per-client rules are not compiled (the rule of {host}'s own namespace, or the root namespace's, is used)",
                        dr.namespace()
                    ),
                ));
            }
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
                protocol: PortProtocol::of_service_port(
                    p.name.as_deref(),
                    p.app_protocol.as_deref(),
                ),
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
        let Some((key, value)) = selector.iter().next() else {
            return out;
        };
        let candidates = self
            .pods_by_label
            .get(&(ns, key.as_str(), value.as_str()))
            .map(Vec::as_slice)
            .unwrap_or_default();
        for &pod in candidates {
            let pod_labels = pod.metadata.labels.as_ref();
            if !selector
                .iter()
                .all(|(k, v)| pod_labels.and_then(|l| l.get(k)) == Some(v))
            {
                continue;
            }
            let labels = pod.metadata.labels.clone().unwrap_or_default();
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
        if let Err((field, reason)) = crate::validate::service_entry(&se.spec) {
            self.report(Diagnostic::rejected(object, &field, reason));
            return Vec::new();
        }
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
                protocol: match &p.protocol {
                    Some(protocol) => PortProtocol::named(protocol),
                    None => PortProtocol::Unknown,
                },
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
        let mesh_routes = self.mesh_routes(catalog);

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
                    // Without a (valid) route: the service's own endpoints.
                    let default =
                        || vec![(1, BackendSetKey::service(&service.fqdn, port.port, v6))];
                    let vs = vs_by_host.get(&service.fqdn).copied();
                    let destinations = match mesh_routes.get(&(service.fqdn.clone(), port.port)) {
                        Some(attached) => {
                            if let Some(vs) = vs {
                                let route = attached.describe();
                                self.report(Diagnostic::note(
                                    ObjectRef::new("VirtualService", Some(vs.namespace()), vs.name()),
                                    "spec.hosts",
                                    format!(
                                        "{}:{} is routed by {route}: Gateway API routes take precedence over VirtualServices",
                                        service.fqdn, port.port
                                    ),
                                ));
                            }
                            self.route_from_gateway_api(attached, service, port, v6, catalog)
                        }
                        None => vs.and_then(|vs| {
                            self.route_from_virtual_service(vs, port.port, v6, catalog)
                        }),
                    }
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
            let weighted = destinations
                .iter()
                .map(|(weight, key)| (*weight, set_ids[&key.name()]));
            // The destinations were built with positive weights, at most MAX_ROUTE_DESTINATIONS
            // of them, adding up to a u32 (see `destinations`).
            let value = RouteValue::from_weights(weighted)
                .expect("routes are built with 1..=16 positive weights");
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
        port: u16,
        v6: bool,
        catalog: &BTreeMap<String, CatalogService>,
    ) -> Option<Vec<(u32, BackendSetKey)>> {
        let object = ObjectRef::new("VirtualService", Some(vs.namespace()), vs.name());
        for (i, _) in vs.spec.tls.iter().enumerate() {
            let reason = self.l7_unenforced(
                "TLS routes match on SNI, which needs the first payload bytes",
                None,
            );
            self.report(Diagnostic::unenforced(
                object.clone(),
                &format!("spec.tls[{i}]"),
                reason,
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
            let reason = self.l7_unenforced(
                "every http route matches on request content, which needs L7",
                Some("connections use the service's default routing"),
            );
            self.report(Diagnostic::unenforced(object, "spec.http", reason));
            return None;
        };
        for i in 0..index {
            let reason = self.l7_unenforced(
                "request matching needs L7",
                Some(&format!("all connections follow spec.http[{index}]")),
            );
            self.report(Diagnostic::unenforced(
                object.clone(),
                &format!("spec.http[{i}].match"),
                reason,
            ));
        }
        if route.route.is_empty() {
            let reason = self.l7_unenforced(
                "the route has no destinations (redirect, direct response or delegation needs L7)",
                Some("connections use the service's default routing"),
            );
            self.report(Diagnostic::unenforced(
                object,
                &format!("spec.http[{index}]"),
                reason,
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
            let reason = self.l7_unenforced("needs L7 (an HTTP proxy)", None);
            self.report(Diagnostic::unenforced(
                object.clone(),
                &format!("spec.http[{index}].{field}"),
                reason,
            ));
        }
        for (i, d) in route.route.iter().enumerate() {
            if d.headers.is_some() {
                let reason = self.l7_unenforced("header manipulation needs L7", None);
                self.report(Diagnostic::unenforced(
                    object.clone(),
                    &format!("spec.http[{index}].route[{i}].headers"),
                    reason,
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
            if let Some(subset) = &d.destination.subset
                && self
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
                    origin: SetOrigin::Service,
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

    // ---- Gateway API mesh routes ----

    /// The Gateway API mesh routes attached to each service port `(fqdn, port)`. Reports parents
    /// that are not compiled (Gateways, consumer routes, unknown Services and ports).
    fn mesh_routes(
        &mut self,
        catalog: &BTreeMap<String, CatalogService>,
    ) -> BTreeMap<(String, u16), Attached<'a>> {
        let inputs: &'a Inputs = self.inputs;
        let mut out: BTreeMap<(String, u16), Attached<'a>> = BTreeMap::new();
        let mut http: Vec<&'a gateway_api::HttpRoute> = inputs.http_routes.iter().collect();
        http.sort_by_key(|r| age_order(&r.metadata));
        for route in http {
            let object = ObjectRef::new("HTTPRoute", Some(route.namespace()), route.name());
            let ports = self.parent_ports(
                &object,
                route.namespace(),
                &route.spec.parent_refs,
                RouteKind::Http,
                catalog,
            );
            if !ports.is_empty() && !route.spec.hostnames.is_empty() {
                self.report(Diagnostic::note(
                    object.clone(),
                    "spec.hostnames",
                    "ignored for Service parents: a mesh route applies to the Service it is attached to, whatever the Host header (as in Istio)",
                ));
            }
            for key in ports {
                out.entry(key).or_default().http.push(route);
            }
        }
        let mut tcp: Vec<&'a gateway_api::TcpRoute> = inputs.tcp_routes.iter().collect();
        tcp.sort_by_key(|r| age_order(&r.metadata));
        for route in tcp {
            let object = ObjectRef::new("TCPRoute", Some(route.namespace()), route.name());
            let ports = self.parent_ports(
                &object,
                route.namespace(),
                &route.spec.parent_refs,
                RouteKind::Tcp,
                catalog,
            );
            for key in ports {
                out.entry(key).or_default().tcp.push(route);
            }
        }
        out
    }

    /// The service ports `(fqdn, port)` a route of `kind` in `route_namespace` is attached to.
    fn parent_ports(
        &mut self,
        object: &ObjectRef,
        route_namespace: &str,
        parents: &[ParentReference],
        kind: RouteKind,
        catalog: &BTreeMap<String, CatalogService>,
    ) -> BTreeSet<(String, u16)> {
        let mut out = BTreeSet::new();
        if parents.is_empty() {
            self.report(Diagnostic::note(
                object.clone(),
                "spec.parentRefs",
                "no parentRefs: the route is attached to nothing",
            ));
        }
        for (i, parent) in parents.iter().enumerate() {
            let field = format!("spec.parentRefs[{i}]");
            let ns = parent.namespace.as_deref().unwrap_or(route_namespace);
            if !parent.is_service() {
                if parent.kind() == "Service" {
                    self.report(Diagnostic::rejected(
                        object.clone(),
                        &format!("{field}.group"),
                        format!(
                            "kind Service in group {:?} is not a core Service; a mesh route's parent needs group \"\" (an omitted group means {})",
                            parent.group(),
                            gateway_api::GROUP
                        ),
                    ));
                } else {
                    self.report(Diagnostic::note(
                        object.clone(),
                        &field,
                        format!(
                            "{} {ns}/{} is not a Service: that attachment is served by a gateway proxy, not by the node data plane",
                            parent.kind(),
                            parent.name
                        ),
                    ));
                }
                continue;
            }
            let service_ref = format!("Service {ns}/{}", parent.name);
            if ns != route_namespace {
                self.report(Diagnostic::unenforced(
                    object.clone(),
                    &field,
                    format!(
                        "a consumer route: for {service_ref} it applies only to clients in namespace {route_namespace}; per-client routes are not compiled yet (connections keep the Service's own routing)"
                    ),
                ));
                continue;
            }
            let fqdn = format!("{}.{ns}.svc.{}", parent.name, self.options.cluster_domain);
            let Some(service) = catalog.get(&fqdn) else {
                let exists = self.inputs.services.iter().any(|s| {
                    namespace_of(&s.metadata) == ns && name_of(&s.metadata) == parent.name
                });
                if exists {
                    self.report(Diagnostic::note(
                        object.clone(),
                        &field,
                        format!("{service_ref} has no cluster IP (headless, ExternalName or not assigned yet): there is no VIP to route"),
                    ));
                } else {
                    self.report(Diagnostic::rejected(
                        object.clone(),
                        &field,
                        format!("no {service_ref}"),
                    ));
                }
                continue;
            };
            let selected: Vec<&CatalogPort> = service
                .ports
                .iter()
                .filter(|p| parent.port.is_none_or(|n| i32::from(p.port) == n))
                .filter(|p| {
                    parent
                        .section_name
                        .as_ref()
                        .is_none_or(|s| p.name.as_ref() == Some(s))
                })
                .collect();
            let explicit = parent.port.is_some() || parent.section_name.is_some();
            if selected.is_empty() {
                let which = match (&parent.port, &parent.section_name) {
                    (Some(n), Some(s)) => format!("TCP port {n} named {s:?}"),
                    (Some(n), None) => format!("TCP port {n}"),
                    (None, Some(s)) => format!("TCP port named {s:?}"),
                    (None, None) => "TCP port".to_string(),
                };
                self.report(Diagnostic::rejected(
                    object.clone(),
                    &field,
                    format!("{service_ref} has no {which}"),
                ));
                continue;
            }
            let mut accepted = 0;
            for port in &selected {
                if kind.accepts(port.protocol) {
                    out.insert((fqdn.clone(), port.port));
                    accepted += 1;
                } else if explicit {
                    self.report(Diagnostic::note(
                        object.clone(),
                        &field,
                        format!(
                            "port {} of {service_ref} is declared {}: {}s do not apply to it",
                            port.port,
                            port.protocol.describe(),
                            kind.name()
                        ),
                    ));
                }
            }
            if accepted == 0 && !explicit {
                self.report(Diagnostic::note(
                    object.clone(),
                    &field,
                    format!(
                        "every port of {service_ref} is declared for another protocol: {}s apply to none of them",
                        kind.name()
                    ),
                ));
            }
        }
        out
    }

    /// The weighted destinations the Gateway API routes attached to `port` give its connections,
    /// or `None` when the port keeps its default routing.
    fn route_from_gateway_api(
        &mut self,
        attached: &Attached<'a>,
        service: &CatalogService,
        port: &CatalogPort,
        v6: bool,
        catalog: &BTreeMap<String, CatalogService>,
    ) -> Option<Vec<(u32, BackendSetKey)>> {
        if attached.http.is_empty() {
            return self.route_from_tcp_routes(&attached.tcp, service, port.port, v6, catalog);
        }
        // Both kinds only meet on a port without declared protocol.
        let http = attached.describe();
        for route in &attached.tcp {
            let reason = self.l7_unenforced(
                &format!(
                    "port {} of {} declares no protocol and {http} routes it too: Istio sends HTTP there and other traffic here, telling them apart by the first payload bytes",
                    port.port, service.fqdn
                ),
                Some(&format!("all connections follow {http}")),
            );
            self.report(Diagnostic::unenforced(
                ObjectRef::new("TCPRoute", Some(route.namespace()), route.name()),
                "spec.parentRefs",
                reason,
            ));
        }
        self.route_from_http_routes(&attached.http, service, port.port, v6, catalog)
    }

    /// HTTPRoutes merged as Istio merges them for one service port: the kernel follows the
    /// catch-all rule with the highest precedence (see the module doc).
    fn route_from_http_routes(
        &mut self,
        routes: &[&'a gateway_api::HttpRoute],
        service: &CatalogService,
        port: u16,
        v6: bool,
        catalog: &BTreeMap<String, CatalogService>,
    ) -> Option<Vec<(u32, BackendSetKey)>> {
        let target = format!("{}:{port}", service.fqdn);
        // `routes` is sorted oldest first, then by namespace/name; then rule order.
        let winner: Option<(usize, usize)> = routes.iter().enumerate().find_map(|(r, route)| {
            route
                .spec
                .rules
                .iter()
                .position(|rule| rule.has_catch_all())
                .map(|i| (r, i))
        });
        let winner_name = winner.map(|(r, i)| {
            format!(
                "HTTPRoute {}/{} spec.rules[{i}]",
                routes[r].namespace(),
                routes[r].name()
            )
        });
        for (r, route) in routes.iter().enumerate() {
            let object = ObjectRef::new("HTTPRoute", Some(route.namespace()), route.name());
            for (i, rule) in route.spec.rules.iter().enumerate() {
                self.report_gateway_l7(&object, i, rule);
                if winner == Some((r, i)) {
                    continue;
                }
                if rule.has_request_match() {
                    let in_kernel = match &winner_name {
                        Some(w) => format!("connections to {target} follow {w}"),
                        None => format!(
                            "no rule matches every request: connections to {target} keep the service's default routing"
                        ),
                    };
                    let reason = self.l7_unenforced("request matching needs L7", Some(&in_kernel));
                    self.report(Diagnostic::unenforced(
                        object.clone(),
                        &format!("spec.rules[{i}].matches"),
                        reason,
                    ));
                }
                if let (true, Some(w)) = (rule.has_catch_all(), &winner_name) {
                    self.report(Diagnostic::note(
                        object.clone(),
                        &format!("spec.rules[{i}]"),
                        format!(
                            "also matches every request to {target}, but {w} takes precedence (oldest route, then namespace/name, then rule order): this rule gets no traffic, in Istio as in the kernel"
                        ),
                    ));
                }
            }
        }
        let (r, i) = winner?;
        let route = routes[r];
        let rule = &route.spec.rules[i];
        let object = ObjectRef::new("HTTPRoute", Some(route.namespace()), route.name());
        if rule.backend_refs.is_empty() {
            if rule
                .filters
                .iter()
                .any(|f| filter_type(f) == "RequestRedirect")
            {
                let reason = self.l7_unenforced(
                    "the rule only redirects, which needs L7",
                    Some(&format!(
                        "connections to {target} keep the service's default routing"
                    )),
                );
                self.report(Diagnostic::unenforced(
                    object,
                    &format!("spec.rules[{i}]"),
                    reason,
                ));
                return None;
            }
            self.report(Diagnostic::note(
                object,
                &format!("spec.rules[{i}].backendRefs"),
                format!(
                    "no backendRefs: Istio answers every request with HTTP 500; connections to {target} are refused"
                ),
            ));
            return Some(vec![(1, self.no_backends(service, port, v6))]);
        }
        self.gateway_backends(
            &object,
            RouteKind::Http,
            &format!("spec.rules[{i}].backendRefs"),
            &rule.backend_refs,
            route.namespace(),
            (service, port, v6),
            catalog,
        )
    }

    /// TCPRoutes for one service port: nothing to match on, so the oldest route's first rule.
    fn route_from_tcp_routes(
        &mut self,
        routes: &[&'a gateway_api::TcpRoute],
        service: &CatalogService,
        port: u16,
        v6: bool,
        catalog: &BTreeMap<String, CatalogService>,
    ) -> Option<Vec<(u32, BackendSetKey)>> {
        let target = format!("{}:{port}", service.fqdn);
        let route = *routes.first()?;
        let object = ObjectRef::new("TCPRoute", Some(route.namespace()), route.name());
        for other in &routes[1..] {
            self.report(Diagnostic::note(
                ObjectRef::new("TCPRoute", Some(other.namespace()), other.name()),
                "spec.parentRefs",
                format!(
                    "{target} is also routed by {object}, which takes precedence (oldest, then namespace/name): this route gets no connections"
                ),
            ));
        }
        let Some(rule) = route.spec.rules.first() else {
            self.report(Diagnostic::rejected(
                object,
                "spec.rules",
                "no rules (a TCPRoute needs one)",
            ));
            return None;
        };
        for i in 1..route.spec.rules.len() {
            self.report(Diagnostic::note(
                object.clone(),
                &format!("spec.rules[{i}]"),
                format!(
                    "a TCPRoute rule has nothing to match on: connections to {target} follow spec.rules[0]"
                ),
            ));
        }
        if rule.backend_refs.is_empty() {
            self.report(Diagnostic::note(
                object,
                "spec.rules[0].backendRefs",
                format!(
                    "no backendRefs: connections to {target} are refused, as Gateway API requires"
                ),
            ));
            return Some(vec![(1, self.no_backends(service, port, v6))]);
        }
        self.gateway_backends(
            &object,
            RouteKind::Tcp,
            "spec.rules[0].backendRefs",
            &rule.backend_refs,
            route.namespace(),
            (service, port, v6),
            catalog,
        )
    }

    /// The set that refuses every connection to a service port whose rule sends nothing anywhere.
    fn no_backends(&self, service: &CatalogService, port: u16, v6: bool) -> BackendSetKey {
        BackendSetKey {
            origin: SetOrigin::NoBackends,
            ..BackendSetKey::service(&service.fqdn, port, v6)
        }
    }

    /// The L7 parts of an HTTPRoute rule: filters (its own and its backendRefs'), timeouts, retry,
    /// session persistence.
    fn report_gateway_l7(
        &mut self,
        object: &ObjectRef,
        index: usize,
        rule: &gateway_api::HttpRouteRule,
    ) {
        for (j, filter) in rule.filters.iter().enumerate() {
            let reason = self.l7_unenforced(
                &format!("filter {} needs L7 (an HTTP proxy)", filter_type(filter)),
                None,
            );
            self.report(Diagnostic::unenforced(
                object.clone(),
                &format!("spec.rules[{index}].filters[{j}]"),
                reason,
            ));
        }
        for field in rule.l7_fields() {
            let reason = self.l7_unenforced("needs L7 (an HTTP proxy)", None);
            self.report(Diagnostic::unenforced(
                object.clone(),
                &format!("spec.rules[{index}].{field}"),
                reason,
            ));
        }
        for (j, backend) in rule.backend_refs.iter().enumerate() {
            for (k, filter) in backend.filters.iter().enumerate() {
                let reason = self.l7_unenforced(
                    &format!("filter {} needs L7 (an HTTP proxy)", filter_type(filter)),
                    None,
                );
                self.report(Diagnostic::unenforced(
                    object.clone(),
                    &format!("spec.rules[{index}].backendRefs[{j}].filters[{k}]"),
                    reason,
                ));
            }
        }
    }

    /// Whether a ReferenceGrant lets `kind`s in `from_namespace` refer to Service `namespace/name`.
    fn reference_granted(
        &self,
        kind: RouteKind,
        from_namespace: &str,
        namespace: &str,
        name: &str,
    ) -> bool {
        self.inputs.reference_grants.iter().any(|g| {
            g.namespace() == namespace && g.permits_service(kind.name(), from_namespace, name)
        })
    }

    /// The weighted backend sets of a rule's `backendRefs`, or `None` when the rule is rejected.
    #[allow(clippy::too_many_arguments)]
    fn gateway_backends(
        &mut self,
        object: &ObjectRef,
        kind: RouteKind,
        field: &str,
        refs: &[BackendRef],
        route_namespace: &str,
        (service, port, v6): (&CatalogService, u16, bool),
        catalog: &BTreeMap<String, CatalogService>,
    ) -> Option<Vec<(u32, BackendSetKey)>> {
        let target = format!("{}:{port}", service.fqdn);
        if refs.len() > MAX_ROUTE_DESTINATIONS {
            self.report(Diagnostic::rejected(
                object.clone(),
                field,
                format!(
                    "{} backendRefs; the kernel route holds at most {MAX_ROUTE_DESTINATIONS}",
                    refs.len()
                ),
            ));
            return None;
        }
        let refused_share = match kind {
            RouteKind::Http => {
                "Istio answers its share of requests with HTTP 500; the kernel refuses its share of connections (a backend set with no endpoints)"
            }
            RouteKind::Tcp => {
                "its share of connections is refused, as Gateway API requires (a backend set with no endpoints)"
            }
        };
        let mut out = Vec::new();
        for (j, backend) in refs.iter().enumerate() {
            let f = format!("{field}[{j}]");
            let Some(weight) = u32::try_from(backend.weight())
                .ok()
                .filter(|w| *w <= 1_000_000)
            else {
                self.report(Diagnostic::rejected(
                    object.clone(),
                    &format!("{f}.weight"),
                    "weight must be between 0 and 1000000",
                ));
                return None;
            };
            let namespace = backend.namespace.as_deref().unwrap_or(route_namespace);
            let is_service = match (backend.group(), backend.kind()) {
                ("", "Service") => true,
                ("networking.istio.io", "Hostname") => false,
                (group, kind) => {
                    self.report(Diagnostic::rejected(
                        object.clone(),
                        &format!("{f}.kind"),
                        format!(
                            "backend kind {kind} (group {group:?}) is not compiled (core Services and Istio Hostnames are); connections to {target} keep the service's default routing"
                        ),
                    ));
                    return None;
                }
            };
            let Some(backend_port) = backend
                .port
                .and_then(|p| u16::try_from(p).ok())
                .filter(|p| *p > 0)
            else {
                self.report(Diagnostic::rejected(
                    object.clone(),
                    &format!("{f}.port"),
                    format!(
                        "a Service backend needs its port (1-65535); connections to {target} keep the service's default routing"
                    ),
                ));
                return None;
            };
            if weight == 0 {
                continue; // weight 0 gets no connection
            }
            let fqdn = if is_service {
                format!(
                    "{}.{namespace}.svc.{}",
                    backend.name, self.options.cluster_domain
                )
            } else {
                backend.name.clone()
            };
            let unresolved = BackendSetKey {
                origin: SetOrigin::Unresolved,
                ..BackendSetKey::service(&fqdn, backend_port, v6)
            };
            let backend_ref = if is_service {
                format!("Service {namespace}/{}", backend.name)
            } else {
                format!("host {}", backend.name)
            };
            if is_service
                && namespace != route_namespace
                && !self.reference_granted(kind, route_namespace, namespace, &backend.name)
            {
                self.report(Diagnostic::rejected(
                    object.clone(),
                    &format!("{f}.namespace"),
                    format!(
                        "no ReferenceGrant in namespace {namespace} permits {}s in {route_namespace} to refer to {backend_ref}; as in Istio, {refused_share}",
                        kind.name()
                    ),
                ));
                out.push((weight, unresolved));
                continue;
            }
            match catalog.get(&fqdn) {
                Some(t) if t.ports.iter().any(|p| p.port == backend_port) => {
                    out.push((weight, BackendSetKey::service(&fqdn, backend_port, v6)));
                }
                Some(_) => {
                    self.report(Diagnostic::note(
                        object.clone(),
                        &f,
                        format!(
                            "{backend_ref} has no TCP port {backend_port}, an invalid backend: {refused_share}"
                        ),
                    ));
                    out.push((weight, unresolved));
                }
                None => {
                    let exists = is_service
                        && self.inputs.services.iter().any(|s| {
                            namespace_of(&s.metadata) == namespace
                                && name_of(&s.metadata) == backend.name
                        });
                    if exists {
                        self.report(Diagnostic::unenforced(
                            object.clone(),
                            &f,
                            format!(
                                "{backend_ref} has no cluster IP (headless or ExternalName): such backends are not compiled yet, and {refused_share}"
                            ),
                        ));
                    } else {
                        self.report(Diagnostic::note(
                            object.clone(),
                            &f,
                            format!(
                                "no {backend_ref} with a VIP, an invalid backend: {refused_share}"
                            ),
                        ));
                    }
                    out.push((weight, unresolved));
                }
            }
        }
        if out.is_empty() {
            let istio = match kind {
                RouteKind::Http => "as Gateway API requires (Istio answers HTTP 500)",
                RouteKind::Tcp => "as Gateway API requires",
            };
            self.report(Diagnostic::rejected(
                object.clone(),
                field,
                format!(
                    "every backendRef has weight 0: no backend may get traffic, so connections to {target} are refused, {istio}"
                ),
            ));
            return Some(vec![(1, self.no_backends(service, port, v6))]);
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
                .filter(|dr| {
                    dr.namespace() == ns && crate::validate::destination_rule(&dr.spec).is_ok()
                })
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
        if key.origin != SetOrigin::Service {
            return (Vec::new(), lb_policy::RANDOM); // refuses its share of connections
        }
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
            let reason = self.l7_unenforced(
                "only useSourceIp hashing is possible at connect(); header, cookie and query hashing need L7",
                Some("connections are spread at random"),
            );
            self.report(Diagnostic::unenforced(
                object.clone(),
                "spec.trafficPolicy.loadBalancer.consistentHash",
                reason,
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

/// Why `snapshot` does not fit `limits`, if it does not.
fn over_capacity(snapshot: &Snapshot, limits: &kmesh_snapshot::Limits) -> Option<String> {
    let tables = [
        ("services", snapshot.services.len(), limits.max_services),
        ("routes", snapshot.routes.len(), limits.max_routes),
        (
            "backend sets",
            snapshot.backend_sets.len(),
            limits.max_backend_sets,
        ),
        ("endpoints", snapshot.endpoints.len(), limits.max_endpoints),
        ("workloads", snapshot.workloads.len(), limits.max_workloads),
    ];
    tables
        .into_iter()
        .find(|(_, count, capacity)| *count as u64 > u64::from(*capacity))
        .map(|(table, count, capacity)| format!("holds {count} {table}, capacity is {capacity}"))
}
