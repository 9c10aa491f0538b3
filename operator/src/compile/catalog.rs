//! The catalog: the mesh services the data plane can steer, by host, with their ports and
//! endpoints. Decided here:
//! - a mesh service is a Kubernetes Service with a cluster IP (headless and ExternalName services
//!   have no VIP) or a STATIC ServiceEntry with addresses; a Service beats a ServiceEntry of the
//!   same host;
//! - endpoints of a Service with a selector are its ready Pods (as istiod's ambient controller builds
//!   workloads from Pods), with named target ports resolved per pod; a Service without selector
//!   uses its EndpointSlices (ready endpoints, or serving+terminating ones when none is ready);
//! - only TCP ports are steered; a port is read the same way for both kinds (`catalog_ports`), each
//!   kind saying only how its own port declaration reads;
//! - a port number is 1 to 65535 wherever it is read ([`port_number`]): services' ports and target
//!   ports, and the named ports of endpoints (container ports, EndpointSlice ports, WorkloadEntry
//!   ports). Any other is rejected at its field and left out, the rest compiled: a port of 0 in
//!   a snapshot would make the encoder refuse the whole snapshot, for every node.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use k8s_openapi::{
    api::core::v1::{Pod, Service, ServicePort, ServiceSpec},
    apimachinery::pkg::util::intstr::IntOrString,
};

use super::{Compiler, name_of, namespace_of, workloads};
use crate::{
    diagnostics::ObjectRef,
    istio::{ServiceEntry, ServiceEntryPort, WorkloadEntry},
    kinds::Kind,
};

/// The mesh services by host (FQDN), borrowing from the inputs (`'a`).
pub(super) type Catalog<'a> = BTreeMap<String, CatalogService<'a>>;

/// A service the data plane can steer.
#[derive(Clone, Debug)]
pub(super) struct CatalogService<'a> {
    pub(super) object: ObjectRef,
    pub(super) namespace: String,
    pub(super) fqdn: String,
    pub(super) vips: Vec<IpAddr>,
    pub(super) ports: Vec<CatalogPort>,
    pub(super) endpoints: Vec<CatalogEndpoint<'a>>,
}

impl CatalogService<'_> {
    /// The port numbered `number` (the first, should two share it).
    pub(super) fn port(&self, number: u16) -> Option<&CatalogPort> {
        self.ports.iter().find(|p| p.port == number)
    }
}

/// A port of a mesh service.
#[derive(Clone, Debug)]
pub(super) struct CatalogPort {
    pub(super) port: u16,
    pub(super) name: Option<String>,
    /// Where the port goes on an endpoint: a number, or a name resolved per endpoint.
    pub(super) target: TargetPort,
    /// The declared application protocol, which decides whether HTTPRoutes or TCPRoutes apply.
    pub(super) protocol: PortProtocol,
    /// Declared HTTP/2 only (`http2`, `grpc`, `h2c`): how a waypoint speaks to its endpoints.
    pub(super) http2: bool,
}

/// Whether a declared protocol (`appProtocol`, a port name's prefix, a ServiceEntry `protocol`)
/// is HTTP/2 only, as Istio reads it.
fn is_http2(protocol: &str) -> bool {
    matches!(
        protocol.to_ascii_lowercase().as_str(),
        "http2" | "grpc" | "h2c" | "kubernetes.io/h2c"
    )
}

#[derive(Clone, Debug)]
pub(super) enum TargetPort {
    Number(u16),
    Named(String),
}

/// A port's application protocol as Istio reads it: `appProtocol` (or a ServiceEntry port's
/// `protocol`), else the port name's prefix (`http-web` is HTTP).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum PortProtocol {
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

    pub(super) fn describe(self) -> &'static str {
        match self {
            PortProtocol::Http => "HTTP",
            PortProtocol::Opaque => "opaque (TCP, TLS, …)",
            PortProtocol::Unknown => "without protocol",
        }
    }
}

/// An endpoint before a port is chosen.
#[derive(Clone, Debug)]
pub(super) struct CatalogEndpoint<'a> {
    pub(super) ips: Vec<IpAddr>,
    /// The labels of its pod or WorkloadEntry, borrowed: a copy per pod would be 100,000 maps in
    /// a large cluster, made and freed in every compile.
    pub(super) labels: &'a BTreeMap<String, String>,
    /// "namespace/serviceaccount".
    pub(super) identity: String,
    /// Container (or ServiceEntry endpoint) ports by name.
    pub(super) named_ports: BTreeMap<String, u16>,
}

/// Why a declared port is left out of a mesh service.
enum PortLeftOut {
    /// A protocol the kernel does not steer (reported as unenforced, with this reason).
    NotSteered(String),
    /// A number outside the port range, at this field below the port (`""`, `.port`, …).
    OutOfRange(&'static str),
}

/// A port number as the snapshot holds it: 1 to 65535, else `None` (0 is no port).
pub(super) fn port_number<N: TryInto<u16>>(number: N) -> Option<u16> {
    number.try_into().ok().filter(|port| *port != 0)
}

/// The reason given for a named port of an endpoint outside 1 to 65535.
const ENDPOINT_PORT_OUT_OF_RANGE: &str =
    "port out of range: left out, so a target port naming it does not resolve to it";

/// The labels of an endpoint that has none (an EndpointSlice's).
static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();

/// The identity of a workload: "namespace/serviceaccount".
pub(super) fn identity(namespace: &str, service_account: Option<&str>) -> String {
    format!("{namespace}/{}", service_account.unwrap_or("default"))
}

impl<'a> Compiler<'a> {
    /// Services first (sorted by namespace/name), then ServiceEntries, whose hosts a Service
    /// already has are reported and left out.
    pub(super) fn catalog(&mut self) -> Catalog<'a> {
        let inputs: &'a crate::inputs::Inputs = self.inputs;
        self.report_endpoint_ports();
        let mut catalog = Catalog::new();
        let mut services: Vec<&Service> = inputs.services.iter().collect();
        services.sort_by_key(|s| (namespace_of(&s.metadata), name_of(&s.metadata)));
        for svc in services {
            if let Some(entry) = self.kubernetes_service(svc) {
                catalog.insert(entry.fqdn.clone(), entry);
            }
        }
        let mut entries: Vec<&ServiceEntry> = inputs.service_entries.iter().collect();
        entries.sort_by_key(|e| (e.namespace(), e.name()));
        for se in entries {
            for entry in self.service_entry(se) {
                if catalog.contains_key(&entry.fqdn) {
                    let reason = format!(
                        "host {} is a Kubernetes Service, which takes precedence",
                        entry.fqdn
                    );
                    self.note(&entry.object, "spec.hosts", reason);
                    continue;
                }
                catalog.insert(entry.fqdn.clone(), entry);
            }
        }
        catalog
    }

    /// The ports of a mesh service: each declared port as `read` reads it; the ones left out are
    /// reported on `object` at `spec.ports[i]`.
    fn catalog_ports<P>(
        &mut self,
        object: &ObjectRef,
        declared: &[P],
        read: impl Fn(&P) -> Result<CatalogPort, PortLeftOut>,
    ) -> Vec<CatalogPort> {
        let mut ports = Vec::new();
        for (i, declared) in declared.iter().enumerate() {
            match read(declared) {
                Ok(port) => ports.push(port),
                Err(PortLeftOut::NotSteered(reason)) => {
                    self.unenforced(object, &format!("spec.ports[{i}]"), reason);
                }
                Err(PortLeftOut::OutOfRange(field)) => {
                    self.reject(
                        object,
                        &format!("spec.ports[{i}]{field}"),
                        "port out of range",
                    );
                }
            }
        }
        ports
    }

    /// Reports the named ports of pods and EndpointSlices that are not port numbers; the
    /// endpoints leave them out ([`pod_endpoint`], [`Compiler::slice_endpoints`]). Once per
    /// object, not once per service selecting it.
    fn report_endpoint_ports(&mut self) {
        let inputs: &'a crate::inputs::Inputs = self.inputs;
        for pod in &inputs.pods {
            // Named only when there is something to report: most pods have nothing, and naming
            // each copies two strings.
            let object = || {
                ObjectRef::new(
                    Kind::Pod,
                    Some(namespace_of(&pod.metadata)),
                    name_of(&pod.metadata),
                )
            };
            let containers = pod.spec.iter().flat_map(|s| s.containers.iter());
            for (c, container) in containers.enumerate() {
                for (i, p) in container.ports.iter().flatten().enumerate() {
                    if p.name.is_some() && port_number(p.container_port).is_none() {
                        let field = format!("spec.containers[{c}].ports[{i}].containerPort");
                        self.reject(&object(), &field, ENDPOINT_PORT_OUT_OF_RANGE);
                    }
                }
            }
        }
        for slice in &inputs.endpoint_slices {
            let object = ObjectRef::new(
                Kind::EndpointSlice,
                Some(namespace_of(&slice.metadata)),
                name_of(&slice.metadata),
            );
            for (i, p) in slice.ports.iter().flatten().enumerate() {
                if p.port.is_some_and(|n| port_number(n).is_none()) {
                    self.reject(
                        &object,
                        &format!("ports[{i}].port"),
                        ENDPOINT_PORT_OUT_OF_RANGE,
                    );
                }
            }
        }
    }

    // ---- Kubernetes Services ----

    fn kubernetes_service(&mut self, svc: &Service) -> Option<CatalogService<'a>> {
        let ns = namespace_of(&svc.metadata).to_string();
        let name = name_of(&svc.metadata).to_string();
        let object = ObjectRef::new(Kind::Service, Some(&ns), &name);
        let spec = svc.spec.as_ref()?;
        if spec.type_.as_deref() == Some("ExternalName") {
            return None; // no VIP, no endpoints; out of scope as in ambient
        }
        let vips = self.service_vips(&object, spec)?;
        let ports = self.catalog_ports(
            &object,
            spec.ports.as_deref().unwrap_or_default(),
            service_port,
        );
        let endpoints = match &spec.selector {
            Some(selector) if !selector.is_empty() => self.pod_endpoints(&ns, selector),
            _ => self.slice_endpoints(&ns, &name),
        };
        Some(CatalogService {
            fqdn: self.options.service_fqdn(&name, &ns),
            object,
            namespace: ns,
            vips,
            ports,
            endpoints,
        })
    }

    /// The cluster IPs of a Service; `None` when it has none to steer (headless, not assigned yet,
    /// or not an IP: rejected).
    fn service_vips(&mut self, object: &ObjectRef, spec: &ServiceSpec) -> Option<Vec<IpAddr>> {
        let mut ips: Vec<String> = spec.cluster_ips.clone().unwrap_or_default();
        if ips.is_empty() {
            ips.extend(spec.cluster_ip.clone());
        }
        if ips.iter().any(|ip| ip == "None") {
            // Headless: clients dial pod IPs directly; nothing to rewrite.
            return None;
        }
        if ips.is_empty() {
            self.note(
                object,
                "spec.clusterIP",
                "no cluster IP assigned yet (the API server assigns one); not steered",
            );
            return None;
        }
        let mut vips = Vec::new();
        for ip in &ips {
            let Ok(vip) = ip.parse::<IpAddr>() else {
                self.reject(
                    object,
                    "spec.clusterIPs",
                    format!("{ip:?} is not an IP address"),
                );
                return None;
            };
            vips.push(vip);
        }
        Some(vips)
    }

    fn pod_endpoints(
        &self,
        ns: &str,
        selector: &BTreeMap<String, String>,
    ) -> Vec<CatalogEndpoint<'a>> {
        let Some((key, value)) = selector.iter().next() else {
            return Vec::new();
        };
        let candidates = self
            .pods_by_label
            .get(&(ns, key.as_str(), value.as_str()))
            .map(Vec::as_slice)
            .unwrap_or_default();
        candidates
            .iter()
            .filter(|pod| {
                let labels = pod.metadata.labels.as_ref();
                selector
                    .iter()
                    .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
            })
            .filter_map(|pod| pod_endpoint(pod))
            .collect()
    }

    fn slice_endpoints(&self, ns: &str, service: &str) -> Vec<CatalogEndpoint<'a>> {
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
                .filter_map(|p| Some((p.name.clone().unwrap_or_default(), port_number(p.port?)?)))
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
                    labels: &NO_LABELS,
                    identity: identity(ns, None),
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

    // ---- ServiceEntries ----

    /// One mesh service per host of a valid STATIC ServiceEntry with addresses.
    fn service_entry(&mut self, se: &'a ServiceEntry) -> Vec<CatalogService<'a>> {
        let ns = se.namespace().to_string();
        let object = ObjectRef::new(Kind::ServiceEntry, Some(&ns), se.name());
        if let Err(crate::validate::Invalid { field, reason }) =
            crate::validate::service_entry(&se.spec)
        {
            self.reject(&object, &field, reason);
            return Vec::new();
        }
        if !self.static_resolution(&object, se) {
            return Vec::new();
        }
        let vips = self.entry_vips(&object, se);
        if vips.is_empty() {
            self.unenforced(
                &object,
                "spec.addresses",
                "no IP address to steer (address auto-allocation is not supported)",
            );
            return Vec::new();
        }
        let ports = self.catalog_ports(&object, &se.spec.ports, entry_port);
        let endpoints = self.entry_endpoints(&object, &ns, &se.spec.endpoints);
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

    /// Whether the entry's resolution is STATIC, the only one steered; the others are reported.
    fn static_resolution(&mut self, object: &ObjectRef, se: &ServiceEntry) -> bool {
        match se.spec.resolution.as_deref().unwrap_or("NONE") {
            "STATIC" => true,
            "NONE" => {
                self.note(
                    object,
                    "spec.resolution",
                    "resolution NONE passes connections to their original destination: nothing to steer",
                );
                false
            }
            other => {
                let reason = format!("resolution {other} is not supported yet; only STATIC");
                self.unenforced(object, "spec.resolution", reason);
                false
            }
        }
    }

    /// The entry's single-IP addresses; the others (CIDRs) are reported.
    fn entry_vips(&mut self, object: &ObjectRef, se: &ServiceEntry) -> Vec<IpAddr> {
        let mut vips = Vec::new();
        for (i, address) in se.spec.addresses.iter().enumerate() {
            match address.parse::<IpAddr>() {
                Ok(ip) => vips.push(ip),
                Err(_) => self.unenforced(
                    object,
                    &format!("spec.addresses[{i}]"),
                    format!(
                        "{address:?} is not a single IP address (CIDR addresses are not steered)"
                    ),
                ),
            }
        }
        vips
    }

    /// The entry's endpoints with an IP address; the others are reported.
    fn entry_endpoints(
        &mut self,
        object: &ObjectRef,
        ns: &str,
        declared: &'a [WorkloadEntry],
    ) -> Vec<CatalogEndpoint<'a>> {
        let mut endpoints = Vec::new();
        for (i, we) in declared.iter().enumerate() {
            for (name, _) in we.ports.iter().filter(|(_, p)| port_number(**p).is_none()) {
                let field = format!("spec.endpoints[{i}].ports.{name}");
                self.reject(object, &field, ENDPOINT_PORT_OUT_OF_RANGE);
            }
            let Some(ip) = we.address.as_deref().and_then(|a| a.parse::<IpAddr>().ok()) else {
                self.unenforced(
                    object,
                    &format!("spec.endpoints[{i}].address"),
                    "not an IP address; STATIC endpoints must be IPs",
                );
                continue;
            };
            endpoints.push(CatalogEndpoint {
                ips: vec![ip],
                labels: &we.labels,
                identity: identity(ns, we.service_account.as_deref()),
                named_ports: we
                    .ports
                    .iter()
                    .filter_map(|(n, p)| Some((n.clone(), port_number(*p)?)))
                    .collect(),
            });
        }
        endpoints
    }
}

/// A Kubernetes Service port: TCP only; `targetPort` a number, a name resolved per pod, or
/// omitted (the port itself).
fn service_port(p: &ServicePort) -> Result<CatalogPort, PortLeftOut> {
    let protocol = p.protocol.as_deref().unwrap_or("TCP");
    if protocol != "TCP" {
        return Err(PortLeftOut::NotSteered(format!(
            "{protocol} port {} is not steered (only TCP is; kube-proxy still serves it)",
            p.port
        )));
    }
    // A missing `port` reads as 0 (k8s-openapi's default): out of range too.
    let port = port_number(p.port).ok_or(PortLeftOut::OutOfRange(".port"))?;
    let target = match &p.target_port {
        None => TargetPort::Number(port),
        Some(IntOrString::Int(n)) => port_number(*n)
            .map(TargetPort::Number)
            .ok_or(PortLeftOut::OutOfRange(".targetPort"))?,
        Some(IntOrString::String(s)) => TargetPort::Named(s.clone()),
    };
    Ok(CatalogPort {
        port,
        name: p.name.clone(),
        target,
        protocol: PortProtocol::of_service_port(p.name.as_deref(), p.app_protocol.as_deref()),
        http2: match p.app_protocol.as_deref() {
            Some(app_protocol) => is_http2(app_protocol),
            None => p
                .name
                .as_deref()
                .is_some_and(|n| is_http2(n.split('-').next().unwrap_or(n))),
        },
    })
}

/// A ServiceEntry port: anything but UDP. The endpoint's port of the same name wins, then
/// `targetPort`, then the number.
fn entry_port(p: &ServiceEntryPort) -> Result<CatalogPort, PortLeftOut> {
    if p.protocol.as_deref() == Some("UDP") {
        return Err(PortLeftOut::NotSteered("UDP is not steered".to_string()));
    }
    let (Some(port), Some(target)) = (
        port_number(p.number),
        port_number(p.target_port.unwrap_or(p.number)),
    ) else {
        return Err(PortLeftOut::OutOfRange(""));
    };
    Ok(CatalogPort {
        port,
        name: p.name.clone(),
        target: TargetPort::Number(target),
        protocol: p
            .protocol
            .as_deref()
            .map_or(PortProtocol::Unknown, PortProtocol::named),
        http2: p.protocol.as_deref().is_some_and(is_http2),
    })
}

/// A selected pod as an endpoint: its IPs, labels, identity and named container ports; `None`
/// when it has no IP yet.
fn pod_endpoint(pod: &Pod) -> Option<CatalogEndpoint<'_>> {
    let ips = workloads::pod_ips(pod);
    if ips.is_empty() {
        return None;
    }
    let named_ports = pod
        .spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| Some((p.name.clone()?, port_number(p.container_port)?)))
        .collect();
    Some(CatalogEndpoint {
        ips,
        labels: pod.metadata.labels.as_ref().unwrap_or(&NO_LABELS),
        identity: workloads::pod_identity(pod),
        named_ports,
    })
}

#[cfg(test)]
mod tests {
    use super::super::testing::{compile_yaml, diagnostics, summary};

    #[test]
    fn ports_left_out_are_reported_at_their_field_for_both_kinds() {
        let compiled = compile_yaml(
            r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.60
  ports:
  - {port: 80, name: http}
  - {port: 53, name: dns, protocol: UDP}
  - {port: 70000, name: big}
  - {port: 81, name: zero-target, targetPort: 0}
  - {port: 0, name: zero}
  - {name: missing}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext, namespace: default}
spec:
  hosts: [ext.example.com]
  addresses: [240.0.0.1]
  resolution: STATIC
  ports:
  - {number: 443, name: https, protocol: HTTPS}
  - {number: 53, name: dns, protocol: UDP}
  endpoints: [{address: 10.1.1.1}]
"#,
        );
        assert_eq!(
            diagnostics(&compiled),
            [
                "rejected: Service default/web spec.ports[2].port: port out of range",
                "rejected: Service default/web spec.ports[3].targetPort: port out of range",
                "rejected: Service default/web spec.ports[4].port: port out of range",
                "rejected: Service default/web spec.ports[5].port: port out of range",
                "not enforced: Service default/web spec.ports[1]: UDP port 53 is not steered (only TCP is; kube-proxy still serves it)",
                "not enforced: ServiceEntry default/ext spec.ports[1]: UDP is not steered",
            ]
        );
        let text = summary(&compiled);
        assert!(text.contains("services (2 VIP:port)"), "{text}");
        assert!(
            text.contains("10.96.0.60:80  web.default.svc.cluster.local"),
            "{text}"
        );
        assert!(text.contains("240.0.0.1:443  ext.example.com"), "{text}");
    }

    /// Named ports of endpoints outside 1-65535 (a pod's container port, an EndpointSlice port, a
    /// ServiceEntry endpoint's port) are rejected at their field and resolve no target port;
    /// the services still compile, and the snapshot encodes (a port of 0 would make the encoder
    /// refuse it).
    #[test]
    fn endpoint_ports_out_of_range_are_rejected_at_their_field() {
        let compiled = compile_yaml(
            r#"
apiVersion: v1
kind: Service
metadata: {name: app, namespace: default}
spec:
  clusterIP: 10.96.9.50
  ports: [{port: 80, targetPort: web}]
  selector: {app: app}
---
apiVersion: v1
kind: Pod
metadata: {name: app-1, namespace: default, labels: {app: app}}
spec:
  nodeName: node-1
  containers:
  - {name: a, ports: [{containerPort: 0}]}
  - {name: b, ports: [{name: metrics, containerPort: 9090}, {name: web, containerPort: 0}]}
status:
  podIP: 10.244.9.50
  conditions: [{type: Ready, status: "True"}]
---
apiVersion: v1
kind: Service
metadata: {name: manual, namespace: default}
spec:
  clusterIP: 10.96.9.51
  ports: [{port: 80, name: http}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: manual-1, namespace: default, labels: {kubernetes.io/service-name: manual}}
addressType: IPv4
ports: [{name: http, port: 0}]
endpoints: [{addresses: [10.244.9.51]}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext, namespace: default}
spec:
  hosts: [ext.example.com]
  addresses: [240.0.0.1]
  resolution: STATIC
  ports: [{number: 443, name: https, protocol: HTTPS}]
  endpoints: [{address: 10.1.1.1, ports: {https: 0}}]
"#,
        );
        assert_eq!(
            diagnostics(&compiled),
            [
                "rejected: EndpointSlice default/manual-1 ports[0].port: port out of range: left out, so a target port naming it does not resolve to it",
                "rejected: Pod default/app-1 spec.containers[1].ports[1].containerPort: port out of range: left out, so a target port naming it does not resolve to it",
                "rejected: ServiceEntry default/ext spec.endpoints[0].ports.https: port out of range: left out, so a target port naming it does not resolve to it",
            ]
        );
        let snapshots = compiled.snapshots();
        let snapshot = snapshots.values().next().expect("a snapshot");
        snapshot.encode().expect("the snapshot encodes");
        let text = summary(&compiled);
        assert!(text.contains("services (3 VIP:port)"), "{text}");
        // The pod exposes no valid `web`: no endpoint. The slice's and the entry's endpoints
        // fall back to the port's number.
        assert!(!text.contains("10.244.9.50:"), "{text}");
        assert!(text.contains("10.244.9.51:80"), "{text}");
        assert!(text.contains("10.1.1.1:443"), "{text}");
    }
}
