//! The waypoint's L7 routes (DualEngine, issue #11): for one service port, the HTTP routes a
//! waypoint follows and the clusters they send to, in the waypoint's own types
//! (`kmesh_snapshot::waypoint`). Pure: objects in, routes out. Decided here:
//! - **Which routes.** The same precedence as the kernel's routes (`routes.rs`): the Gateway API
//!   HTTPRoutes attached to the port (`mesh_routes.rs` attaches them), else the host's mesh
//!   VirtualService (`virtual_services_by_host`), else one catch-all route to the service itself.
//!   A VirtualService or HTTPRoute that matches no request leaves it to the waypoint's 404, as
//!   Envoy's `NR` in Istio: no catch-all is added after them.
//! - **Every default is written.** Istio's default retry policy, the Gateway API's 302 and weight
//!   1, a mirror's 100 %: the waypoint never guesses.
//! - **What the waypoint cannot honour** is reported at its resource and field and left out
//!   (`Unenforced`): a route that would change meaning without it is left out whole, a match entry
//!   that cannot be expressed is left out (never widened into one that matches more). What is
//!   invalid is `Rejected` the same way. Each route is checked against the waypoint's own
//!   validation ([`WaypointConfig::validate`]) and its regular expressions compiled with the
//!   waypoint's engine before it is kept, so the compiler never emits what a waypoint refuses.
//!
//! Files: `virtual_service.rs` (VirtualService `http` routes), `istio_actions.rs` (their
//! redirect, rewrite, headers, retries, fault, mirrors), `http_route.rs` (HTTPRoute rules, their
//! precedence and filters), `matches.rs` (request matches of both APIs), `clusters.rs` (clusters,
//! their endpoints and the DestinationRule's load balancer).
mod clusters;
mod http_route;
mod istio_actions;
mod matches;
#[cfg(test)]
mod tests;
mod virtual_service;

use std::collections::BTreeMap;

use kmesh_snapshot::waypoint::{
    Cluster, HttpRoute, LoadBalancer, Protocol, RouteAction, Service, ServicePort,
    WAYPOINT_CONFIG_VERSION, WaypointConfig, WeightedCluster,
};

use super::{
    Compiler,
    catalog::{Catalog, CatalogPort, CatalogService},
    mesh_routes::{Attached, PortKey},
};
use crate::{diagnostics::ObjectRef, istio::VirtualService};

pub(super) use clusters::{ClusterKey, ClusterSet};

/// What routes service ports, resolved once per compile: the mesh VirtualService of each host and
/// the Gateway API routes attached to each service port.
pub(super) struct L7Sources<'a> {
    virtual_services: BTreeMap<String, &'a VirtualService>,
    mesh_routes: BTreeMap<PortKey, Attached<'a>>,
}

/// The service port whose routes are being compiled.
#[derive(Clone, Copy)]
struct RoutedPort<'c> {
    port: &'c CatalogPort,
}

impl<'a> Compiler<'a> {
    /// The VirtualServices and HTTPRoutes that route service ports, as the kernel's routes choose
    /// them. Their diagnostics are the kernel routes' own (the same objects, the same words), so
    /// calling this in the same compile as `routes` repeats none: diagnostics are de-duplicated.
    pub(super) fn l7_sources(&mut self, catalog: &Catalog<'_>) -> L7Sources<'a> {
        L7Sources {
            virtual_services: self.virtual_services_by_host(catalog),
            mesh_routes: self.mesh_routes(catalog),
        }
    }

    /// The HTTP routes a waypoint follows for `port` of `service`, in order (first match wins);
    /// the clusters they name are added to `clusters` (shared by every service of one waypoint).
    pub(super) fn waypoint_routes<'c>(
        &mut self,
        sources: &L7Sources<'a>,
        service: &'c CatalogService<'c>,
        port: &'c CatalogPort,
        catalog: &'c Catalog<'c>,
        clusters: &mut ClusterSet,
    ) -> Vec<HttpRoute> {
        let target = RoutedPort { port };
        let key = (service.fqdn.clone(), port.port);
        if let Some(attached) = sources.mesh_routes.get(&key)
            && !attached.http.is_empty()
        {
            return self.http_route_routes(&attached.http, target, catalog, clusters);
        }
        if let Some(vs) = sources.virtual_services.get(&service.fqdn) {
            return self.virtual_service_routes(vs, target, catalog, clusters);
        }
        let own = clusters.index(self, catalog, ClusterKey::of(service, port.port, None));
        vec![HttpRoute {
            origin: format!("{} (no VirtualService or HTTPRoute)", service.object),
            matches: Vec::new(),
            action: RouteAction::Forward(vec![WeightedCluster {
                cluster: own,
                weight: 1,
                ..Default::default()
            }]),
            request_headers: Default::default(),
            response_headers: Default::default(),
            rewrite: None,
            timeout_ms: None,
            retries: Some(istio_actions::default_retry_policy()),
            fault: None,
            mirrors: Vec::new(),
        }]
    }

    /// Keeps `route` if a waypoint accepts it; otherwise reports why at `field` of `object`.
    fn accepted(
        &mut self,
        object: &ObjectRef,
        field: &str,
        route: HttpRoute,
        clusters: &ClusterSet,
    ) -> Option<HttpRoute> {
        match refused_by_waypoint(&route, clusters.len()) {
            None => Some(route),
            Some(problem) => {
                let reason =
                    format!("a waypoint would refuse it ({problem}); the route is left out");
                self.reject(object, field, reason);
                None
            }
        }
    }
}

/// Why the waypoint's validation refuses `route` (with `clusters` clusters), if it does: the route
/// alone in a configuration, its field path relative to the route.
fn refused_by_waypoint(route: &HttpRoute, clusters: usize) -> Option<String> {
    // The validation reads only the clusters' count and load balancers: stand-ins will do.
    let stand_in = Cluster {
        name: String::new(),
        hostname: String::new(),
        port: 1,
        subset: None,
        protocol: Protocol::Http,
        load_balancer: LoadBalancer::LeastRequest,
        endpoints: Vec::new(),
    };
    let config = WaypointConfig {
        version: WAYPOINT_CONFIG_VERSION,
        services: vec![Service {
            ports: vec![ServicePort {
                port: 1,
                protocol: Protocol::Http,
                http: vec![route.clone()],
                tcp: Vec::new(),
            }],
            ..Default::default()
        }],
        clusters: vec![stand_in; clusters],
        ..Default::default()
    };
    let error = config.validate().err()?.to_string();
    let prefix = "services[0].ports[0].http[0].";
    Some(error.strip_prefix(prefix).unwrap_or(&error).to_string())
}

/// Whether the waypoint's engine (the `regex` crate) compiles `pattern`; the reason if not.
fn regex_problem(pattern: &str) -> Option<String> {
    regex::Regex::new(pattern)
        .err()
        .map(|e| format!("the regular expression {pattern:?} does not compile: {e}"))
}
