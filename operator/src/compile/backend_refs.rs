//! The backendRefs of a Gateway API mesh route rule, as a route: weighted backend sets. Decided
//! here:
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
use std::num::NonZeroU32;

use super::{
    Compiler,
    backend_sets::SetRef,
    catalog::Catalog,
    mesh_routes::RouteKind,
    routes::{NoRoute, PortTarget, Route, RuleAt, Weighted},
};
use crate::gateway_api::BackendRef;

/// The backendRefs of one rule being read: where they are written, the route's kind and the
/// service port it routes.
pub(super) struct BackendRefs<'r, 'c> {
    pub(super) at: RuleAt<'r>,
    pub(super) kind: RouteKind,
    pub(super) target: PortTarget<'c>,
}

/// A backendRef that passed its own checks: a core Service or an Istio Hostname, and its port.
struct Backend<'b> {
    name: &'b str,
    namespace: &'b str,
    port: u16,
    is_service: bool,
}

impl Backend<'_> {
    fn describe(&self) -> String {
        if self.is_service {
            format!("Service {}/{}", self.namespace, self.name)
        } else {
            format!("host {}", self.name)
        }
    }
}

/// What becomes of the share of an invalid backend, as diagnostics say it.
fn refused_share(kind: RouteKind) -> &'static str {
    match kind {
        RouteKind::Http => {
            "Istio answers its share of requests with HTTP 500; the kernel refuses its share of connections (a backend set with no endpoints)"
        }
        RouteKind::Tcp => {
            "its share of connections is refused, as Gateway API requires (a backend set with no endpoints)"
        }
    }
}

impl Compiler<'_> {
    /// A rule's backendRefs as a route; `None` when the rule is rejected. When every weight is 0,
    /// the rule is rejected and connections to the port are refused.
    pub(super) fn gateway_backends<'c>(
        &mut self,
        refs: &BackendRefs<'_, 'c>,
        backend_refs: &[BackendRef],
        catalog: &'c Catalog<'_>,
    ) -> Option<Route<'c>> {
        let resolved =
            self.weighted_route(&refs.at, "backendRefs", backend_refs, |c, j, backend| {
                c.gateway_backend(refs, j, backend, catalog)
            });
        match resolved {
            Ok(route) => Some(route),
            Err(NoRoute::Rejected) => None,
            Err(NoRoute::NoWeight) => {
                let istio = match refs.kind {
                    RouteKind::Http => "as Gateway API requires (Istio answers HTTP 500)",
                    RouteKind::Tcp => "as Gateway API requires",
                };
                self.reject(
                    refs.at.object,
                    &refs.at.field,
                    format!(
                        "every backendRef has weight 0: no backend may get traffic, so connections to {} are refused, {istio}",
                        refs.target.describe()
                    ),
                );
                self.single_route(refs.at.object, refs.target.no_backends())
            }
        }
    }

    /// One backendRef: its weight and backend set; `Rejected` (reported) when the reference
    /// itself is invalid.
    fn gateway_backend<'c>(
        &mut self,
        refs: &BackendRefs<'_, 'c>,
        j: usize,
        backend: &BackendRef,
        catalog: &'c Catalog<'_>,
    ) -> Weighted<'c> {
        let field = format!("{}[{j}]", refs.at.field);
        let Some(weight) = u32::try_from(backend.weight())
            .ok()
            .filter(|w| *w <= 1_000_000)
        else {
            self.reject(
                refs.at.object,
                &format!("{field}.weight"),
                "weight must be between 0 and 1000000",
            );
            return Weighted::Rejected;
        };
        let Some(checked) = self.checked_backend(refs, &field, backend) else {
            return Weighted::Rejected;
        };
        match NonZeroU32::new(weight) {
            Some(weight) => {
                Weighted::To(weight, self.backend_set_of(refs, &field, &checked, catalog))
            }
            None => Weighted::Zero,
        }
    }

    /// The backend a backendRef names: a core Service or an Istio Hostname, with a port; `None`
    /// (rejected) otherwise.
    fn checked_backend<'b>(
        &mut self,
        refs: &BackendRefs<'b, '_>,
        field: &str,
        backend: &'b BackendRef,
    ) -> Option<Backend<'b>> {
        let to = refs.target.describe();
        let is_service = match (backend.group(), backend.kind()) {
            ("", "Service") => true,
            ("networking.istio.io", "Hostname") => false,
            (group, kind) => {
                self.reject(
                    refs.at.object,
                    &format!("{field}.kind"),
                    format!(
                        "backend kind {kind} (group {group:?}) is not compiled (core Services and Istio Hostnames are); connections to {to} keep the service's default routing"
                    ),
                );
                return None;
            }
        };
        let Some(port) = backend
            .port
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p > 0)
        else {
            self.reject(
                refs.at.object,
                &format!("{field}.port"),
                format!(
                    "a Service backend needs its port (1-65535); connections to {to} keep the service's default routing"
                ),
            );
            return None;
        };
        Some(Backend {
            name: &backend.name,
            namespace: backend.namespace.as_deref().unwrap_or(refs.at.namespace),
            port,
            is_service,
        })
    }

    /// The backend set of a valid backendRef: the endpoints of its service port, or, when that is
    /// not permitted or does not exist, a set with no endpoints (its share is refused).
    fn backend_set_of<'c>(
        &mut self,
        refs: &BackendRefs<'_, 'c>,
        field: &str,
        backend: &Backend<'_>,
        catalog: &'c Catalog<'_>,
    ) -> SetRef<'c> {
        let v6 = refs.target.v6;
        let fqdn = if backend.is_service {
            self.options.service_fqdn(backend.name, backend.namespace)
        } else {
            backend.name.to_string()
        };
        let unresolved = SetRef::unresolved(&fqdn, backend.port, v6);
        let backend_ref = backend.describe();
        let refused_share = refused_share(refs.kind);
        let route_namespace = refs.at.namespace;
        if backend.is_service
            && backend.namespace != route_namespace
            && !self.reference_granted(refs.kind, route_namespace, backend)
        {
            self.reject(
                refs.at.object,
                &format!("{field}.namespace"),
                format!(
                    "no ReferenceGrant in namespace {} permits {}s in {route_namespace} to refer to {backend_ref}; as in Istio, {refused_share}",
                    backend.namespace,
                    refs.kind.name()
                ),
            );
            return unresolved;
        }
        let Some(service) = catalog.get(&fqdn) else {
            if backend.is_service && self.service_exists(backend.namespace, backend.name) {
                self.unenforced(
                    refs.at.object,
                    field,
                    format!(
                        "{backend_ref} has no cluster IP (headless or ExternalName): such backends are not compiled yet, and {refused_share}"
                    ),
                );
            } else {
                self.note(
                    refs.at.object,
                    field,
                    format!("no {backend_ref} with a VIP, an invalid backend: {refused_share}"),
                );
            }
            return unresolved;
        };
        match service.port(backend.port) {
            Some(port) => SetRef::endpoints(service, port, None, v6),
            None => {
                self.note(
                    refs.at.object,
                    field,
                    format!(
                        "{backend_ref} has no TCP port {}, an invalid backend: {refused_share}",
                        backend.port
                    ),
                );
                unresolved
            }
        }
    }

    /// Whether a ReferenceGrant lets `kind`s in `from_namespace` refer to `backend`'s Service.
    fn reference_granted(
        &self,
        kind: RouteKind,
        from_namespace: &str,
        backend: &Backend<'_>,
    ) -> bool {
        self.service_reference_granted(kind, from_namespace, backend.namespace, backend.name)
    }

    /// Whether a ReferenceGrant lets `kind`s in `from_namespace` refer to Service
    /// `namespace/name`.
    pub(super) fn service_reference_granted(
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
}
