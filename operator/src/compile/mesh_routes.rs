//! Gateway API mesh routes (GAMMA): an `HTTPRoute` or `TCPRoute` whose `parentRefs` name a core
//! Service (`group: ""`, `kind: Service`, optionally one of its ports) chooses the weighted
//! backends of that Service's ports. This file attaches routes to service ports; `mesh_rules.rs`
//! decides which rule of the attached routes the kernel follows, `backend_refs.rs` what its
//! backendRefs come to. Decided here:
//! - **Gateway API beats VirtualService.** When an HTTPRoute or TCPRoute is attached to a service
//!   port, it routes that port and a VirtualService for the same host is ignored there (reported
//!   with a Note). Istio defines no order between the two (both become routes for the host); ambient
//!   waypoints honour only Gateway API routes, so the explicit, newer API wins.
//! - **HTTP or TCP.** An HTTPRoute applies to Service ports not declared opaque (port name prefix
//!   or `appProtocol` `tcp`, `tls`, `https`, …), a TCPRoute to ports not declared HTTP; on a port
//!   declaring neither, Istio tells HTTP from other traffic by sniffing, which connect() cannot, so
//!   the HTTPRoute wins there and the TCPRoute is reported.
//! - **Not compiled:** consumer routes (a route in another namespace than its parent Service,
//!   which Istio applies only to clients in the route's namespace: Unenforced), non-Service
//!   parents (Gateways: a Note, a proxy serves them), `hostnames` (ignored for mesh routes, as
//!   Istio does: Note).
use std::collections::{BTreeMap, BTreeSet};

use super::{
    Compiler, age_order,
    catalog::{Catalog, CatalogService, PortProtocol},
    name_of, namespace_of,
};
use crate::{
    diagnostics::ObjectRef,
    gateway_api::{self, HttpRoute, HttpRouteSpec, ParentReference, TcpRoute, TcpRouteSpec},
    inputs::Inputs,
    kinds::Kind,
};

/// The two kinds of Gateway API mesh route the compiler reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum RouteKind {
    Http,
    Tcp,
}

impl RouteKind {
    /// The Gateway API kind of routes of this kind.
    pub(super) fn kind(self) -> Kind {
        match self {
            RouteKind::Http => Kind::HttpRoute,
            RouteKind::Tcp => Kind::TcpRoute,
        }
    }

    /// The kind's name, as in an object's `kind` field.
    pub(super) fn name(self) -> &'static str {
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
pub(super) struct Attached<'a> {
    pub(super) http: Vec<&'a HttpRoute>,
    pub(super) tcp: Vec<&'a TcpRoute>,
}

impl Attached<'_> {
    /// The route that decides (the oldest HTTPRoute, else the oldest TCPRoute), for diagnostics.
    pub(super) fn describe(&self) -> String {
        match (self.http.first(), self.tcp.first()) {
            (Some(r), _) => format!("HTTPRoute {}/{}", r.namespace(), r.name()),
            (None, Some(r)) => format!("TCPRoute {}/{}", r.namespace(), r.name()),
            (None, None) => "no route".to_string(),
        }
    }
}

/// A service port: its host (FQDN) and number.
pub(super) type PortKey = (String, u16);

/// The spec of a mesh route kind: where its parents are.
trait MeshRouteSpec {
    fn parent_refs(&self) -> &[ParentReference];
}

impl MeshRouteSpec for HttpRouteSpec {
    fn parent_refs(&self) -> &[ParentReference] {
        &self.parent_refs
    }
}

impl MeshRouteSpec for TcpRouteSpec {
    fn parent_refs(&self) -> &[ParentReference] {
        &self.parent_refs
    }
}

/// A route being attached to its parents: its object, namespace and kind.
struct Attaching<'r> {
    object: &'r ObjectRef,
    namespace: &'r str,
    kind: RouteKind,
}

impl Attaching<'_> {
    /// The namespace of `parent` (the route's, when omitted).
    fn namespace_of<'p>(&'p self, parent: &'p ParentReference) -> &'p str {
        parent.namespace.as_deref().unwrap_or(self.namespace)
    }

    /// `Service namespace/name`, as diagnostics name a Service parent.
    fn service_ref(&self, parent: &ParentReference) -> String {
        format!("Service {}/{}", self.namespace_of(parent), parent.name)
    }
}

pub(super) fn object_of<S>(route: &gateway_api::Object<S>, kind: RouteKind) -> ObjectRef {
    ObjectRef::new(kind.kind(), Some(route.namespace()), route.name())
}

impl<'a> Compiler<'a> {
    /// The Gateway API mesh routes attached to each service port `(fqdn, port)`. Reports parents
    /// that are not compiled (Gateways, consumer routes, unknown Services and ports).
    pub(super) fn mesh_routes(&mut self, catalog: &Catalog<'_>) -> BTreeMap<PortKey, Attached<'a>> {
        let inputs: &'a Inputs = self.inputs;
        let mut out: BTreeMap<PortKey, Attached<'a>> = BTreeMap::new();
        for (route, ports) in self.attach(&inputs.http_routes, RouteKind::Http, catalog) {
            if !ports.is_empty() && !route.spec.hostnames.is_empty() {
                self.note(
                    &object_of(route, RouteKind::Http),
                    "spec.hostnames",
                    "ignored for Service parents: a mesh route applies to the Service it is attached to, whatever the Host header (as in Istio)",
                );
            }
            for key in ports {
                out.entry(key).or_default().http.push(route);
            }
        }
        for (route, ports) in self.attach(&inputs.tcp_routes, RouteKind::Tcp, catalog) {
            for key in ports {
                out.entry(key).or_default().tcp.push(route);
            }
        }
        out
    }

    /// The routes of one kind, oldest first (then by namespace/name), each with the service ports
    /// it is attached to.
    fn attach<S: MeshRouteSpec>(
        &mut self,
        routes: &'a [gateway_api::Object<S>],
        kind: RouteKind,
        catalog: &Catalog<'_>,
    ) -> Vec<(&'a gateway_api::Object<S>, BTreeSet<PortKey>)> {
        let mut sorted: Vec<&'a gateway_api::Object<S>> = routes.iter().collect();
        sorted.sort_by_key(|r| age_order(&r.metadata));
        sorted
            .into_iter()
            .map(|route| {
                let object = object_of(route, kind);
                let attaching = Attaching {
                    object: &object,
                    namespace: route.namespace(),
                    kind,
                };
                let ports = self.parent_ports(&attaching, route.spec.parent_refs(), catalog);
                (route, ports)
            })
            .collect()
    }

    /// The service ports `(fqdn, port)` a route is attached to.
    fn parent_ports(
        &mut self,
        route: &Attaching<'_>,
        parents: &[ParentReference],
        catalog: &Catalog<'_>,
    ) -> BTreeSet<PortKey> {
        if parents.is_empty() {
            self.note(
                route.object,
                "spec.parentRefs",
                "no parentRefs: the route is attached to nothing",
            );
        }
        let mut out = BTreeSet::new();
        for (i, parent) in parents.iter().enumerate() {
            let field = format!("spec.parentRefs[{i}]");
            if let Some(service) = self.parent_service(route, &field, parent, catalog) {
                for port in self.attached_ports(route, &field, parent, service) {
                    out.insert((service.fqdn.clone(), port));
                }
            }
        }
        out
    }

    /// The mesh service a parentRef names; `None` (reported) for other parents, consumer routes
    /// and Services without a VIP.
    fn parent_service<'c>(
        &mut self,
        route: &Attaching<'_>,
        field: &str,
        parent: &ParentReference,
        catalog: &'c Catalog<'_>,
    ) -> Option<&'c CatalogService<'c>> {
        let ns = route.namespace_of(parent);
        if !parent.is_service() {
            if parent.kind() == "Service" {
                self.reject(
                    route.object,
                    &format!("{field}.group"),
                    format!(
                        "kind Service in group {:?} is not a core Service; a mesh route's parent needs group \"\" (an omitted group means {})",
                        parent.group(),
                        gateway_api::GROUP
                    ),
                );
            } else {
                self.note(
                    route.object,
                    field,
                    format!(
                        "{} {ns}/{} is not a Service: that attachment is served by a gateway proxy, not by the node data plane",
                        parent.kind(),
                        parent.name
                    ),
                );
            }
            return None;
        }
        let service_ref = route.service_ref(parent);
        if ns != route.namespace {
            self.unenforced(
                route.object,
                field,
                format!(
                    "a consumer route: for {service_ref} it applies only to clients in namespace {}; per-client routes are not compiled yet (connections keep the Service's own routing)",
                    route.namespace
                ),
            );
            return None;
        }
        let service = catalog.get(&self.options.service_fqdn(&parent.name, ns));
        if service.is_none() {
            if self.service_exists(ns, &parent.name) {
                self.note(
                    route.object,
                    field,
                    format!("{service_ref} has no cluster IP (headless, ExternalName or not assigned yet): there is no VIP to route"),
                );
            } else {
                self.reject(route.object, field, format!("no {service_ref}"));
            }
        }
        service
    }

    /// Whether a Kubernetes Service `namespace/name` exists (with or without a VIP).
    pub(super) fn service_exists(&self, namespace: &str, name: &str) -> bool {
        self.inputs
            .services
            .iter()
            .any(|s| namespace_of(&s.metadata) == namespace && name_of(&s.metadata) == name)
    }

    /// The ports of `service` a parentRef selects (by `port`, `sectionName`, or all) that accept
    /// the route's kind; the others are reported.
    fn attached_ports(
        &mut self,
        route: &Attaching<'_>,
        field: &str,
        parent: &ParentReference,
        service: &CatalogService<'_>,
    ) -> Vec<u16> {
        let service_ref = route.service_ref(parent);
        let selected: Vec<_> = service
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
            self.reject(route.object, field, format!("{service_ref} has no {which}"));
            return Vec::new();
        }
        let kind = route.kind.name();
        let (accepted, declined): (Vec<_>, Vec<_>) = selected
            .into_iter()
            .partition(|p| route.kind.accepts(p.protocol));
        if explicit {
            for port in &declined {
                self.note(
                    route.object,
                    field,
                    format!(
                        "port {} of {service_ref} is declared {}: {kind}s do not apply to it",
                        port.port,
                        port.protocol.describe(),
                    ),
                );
            }
        } else if accepted.is_empty() {
            self.note(
                route.object,
                field,
                format!(
                    "every port of {service_ref} is declared for another protocol: {kind}s apply to none of them"
                ),
            );
        }
        accepted.into_iter().map(|p| p.port).collect()
    }
}
