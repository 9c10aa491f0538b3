//! A VirtualService's `http` routes, all of them in order (first match wins), as the waypoint's
//! routes. Decided here:
//! - the action: `redirect`, else `directResponse`, else the weighted `route` destinations
//!   (an omitted weight is 0, a single destination gets everything, as the kernel's routes);
//!   `delegate` is not supported (the route is left out, reported);
//! - a route with `fault` gets no timeout and no retries: Istio's API says "timeouts or retries
//!   will not be enabled when faults are enabled on the client side" (`HTTPRoute.fault`);
//! - `mirror` (with `mirrorPercentage`, default 100 %) and `mirrors[]` (each `percentage`,
//!   default 100 %); `corsPolicy` is reported and the rest of the route compiled.
use kmesh_snapshot::waypoint::{HttpRoute, Mirror, RequestMatch, RouteAction, WeightedCluster};

use super::{
    super::{Compiler, catalog::Catalog},
    ClusterKey, ClusterSet, RoutedPort,
    istio_actions::{RouteAt, header_ops},
    matches::{NoMatch, istio_match},
};
use crate::{
    diagnostics::ObjectRef,
    durations::millis_ceil,
    istio::{self, Destination, RouteDestination, VirtualService},
    kinds::Kind,
};

/// What every part of one VirtualService's routes is compiled against: the object (for
/// diagnostics), its namespace (short host names are relative to it), the service port being
/// routed, and the services known.
#[derive(Clone, Copy)]
struct Scope<'s, 'c> {
    object: &'s ObjectRef,
    namespace: &'s str,
    target: RoutedPort<'s>,
    catalog: &'s Catalog<'c>,
}

impl Compiler<'_> {
    /// Every `http` route of `vs` the waypoint can follow, in order.
    pub(super) fn virtual_service_routes(
        &mut self,
        vs: &VirtualService,
        target: RoutedPort<'_>,
        catalog: &Catalog<'_>,
        clusters: &mut ClusterSet,
    ) -> Vec<HttpRoute> {
        let object = ObjectRef::new(Kind::VirtualService, Some(vs.namespace()), vs.name());
        let scope = Scope {
            object: &object,
            namespace: vs.namespace(),
            target,
            catalog,
        };
        let mut routes = Vec::new();
        for (i, route) in vs.spec.http.iter().enumerate() {
            let at = RouteAt {
                object: &object,
                field: format!("spec.http[{i}]"),
            };
            let compiled = self.istio_route(&at, scope, route, clusters);
            if let Some(compiled) = compiled
                && let Some(accepted) = self.accepted(&object, &at.field, compiled, clusters)
            {
                routes.push(accepted);
            }
        }
        routes
    }

    /// One `http` route; `None` (reported) when the waypoint cannot follow it.
    fn istio_route(
        &mut self,
        at: &RouteAt<'_>,
        scope: Scope<'_, '_>,
        route: &istio::HttpRoute,
        clusters: &mut ClusterSet,
    ) -> Option<HttpRoute> {
        if route.delegate.is_some() {
            let reason = "delegation is not supported by the waypoint; the route is left out";
            self.unenforced(at.object, &at.at("delegate"), reason);
            return None;
        }
        if route.cors_policy.is_some() {
            let reason = "CORS is not supported by the waypoint; the rest of the route is compiled";
            self.unenforced(at.object, &at.at("corsPolicy"), reason);
        }
        let matches = self.istio_matches(at, route)?;
        let action = self.istio_action(at, scope, route, clusters)?;
        let forwards = matches!(action, RouteAction::Forward(_));
        let fault = match &route.fault {
            Some(fault) => self.fault(at, fault),
            None => None,
        };
        let (timeout_ms, retries) = match (&fault, forwards) {
            (None, true) => (
                route.timeout.map(|t| millis_ceil(t.0)).filter(|t| *t > 0),
                self.retry_policy(at, route.retries.as_ref()),
            ),
            _ => (None, None),
        };
        let headers = route.headers.as_ref();
        Some(HttpRoute {
            origin: format!("{} {}", at.object, at.field),
            matches,
            action,
            request_headers: header_ops(headers.and_then(|h| h.request.as_ref())),
            response_headers: header_ops(headers.and_then(|h| h.response.as_ref())),
            rewrite: match &route.rewrite {
                Some(rewrite) => Some(self.rewrite(at, rewrite)?),
                None => None,
            },
            timeout_ms,
            retries,
            fault,
            mirrors: self.istio_mirrors(at, scope, route, clusters)?,
        })
    }

    /// The route's match entries; `None` when it has some but none can match (the route would
    /// otherwise match every request).
    fn istio_matches(
        &mut self,
        at: &RouteAt<'_>,
        route: &istio::HttpRoute,
    ) -> Option<Vec<RequestMatch>> {
        let entries = route.matches.as_deref().unwrap_or_default();
        let mut matches = Vec::new();
        for (j, entry) in entries.iter().enumerate() {
            let field = at.at(&format!("match[{j}]"));
            match istio_match(entry) {
                Ok(m) => matches.push(m),
                Err(NoMatch::Never(reason)) => self.note(at.object, &field, reason),
                Err(NoMatch::Invalid(below, reason)) => {
                    let reason = format!("{reason}; the match entry is left out");
                    self.reject(at.object, &format!("{field}.{below}"), reason);
                }
            }
        }
        if !entries.is_empty() && matches.is_empty() {
            let reason = "no match entry can match: the route is left out";
            self.note(at.object, &at.at("match"), reason);
            return None;
        }
        Some(matches)
    }

    /// `redirect`, else `directResponse`, else the weighted destinations.
    fn istio_action(
        &mut self,
        at: &RouteAt<'_>,
        scope: Scope<'_, '_>,
        route: &istio::HttpRoute,
        clusters: &mut ClusterSet,
    ) -> Option<RouteAction> {
        if let Some(redirect) = &route.redirect {
            return self.redirect(at, redirect).map(RouteAction::Redirect);
        }
        if let Some(response) = &route.direct_response {
            return self
                .direct_response(at, response)
                .map(RouteAction::DirectResponse);
        }
        if route.route.is_empty() {
            let reason = "no route, redirect or directResponse; the route is left out";
            self.reject(at.object, &at.field, reason);
            return None;
        }
        let single = route.route.len() == 1;
        let mut destinations = Vec::new();
        for (k, d) in route.route.iter().enumerate() {
            let field = at.at(&format!("route[{k}]"));
            destinations.push(self.istio_destination(scope, &field, d, single, clusters)?);
        }
        if destinations.iter().all(|d| d.weight == 0) {
            let reason =
                "the weights add up to 0: no destination would get requests; the route is left out";
            self.reject(at.object, &at.at("route"), reason);
            return None;
        }
        Some(RouteAction::Forward(destinations))
    }

    /// One weighted destination, with its own header operations.
    fn istio_destination(
        &mut self,
        scope: Scope<'_, '_>,
        field: &str,
        d: &RouteDestination,
        single: bool,
        clusters: &mut ClusterSet,
    ) -> Option<WeightedCluster> {
        let Ok(weight) = u32::try_from(d.weight.unwrap_or(0)) else {
            self.reject(
                scope.object,
                &format!("{field}.weight"),
                "weight must be between 0 and 2^32-1",
            );
            return None;
        };
        let headers = d.headers.as_ref();
        Some(WeightedCluster {
            cluster: self.istio_cluster(
                scope,
                &format!("{field}.destination"),
                &d.destination,
                clusters,
            ),
            // A single destination gets everything, whatever its weight.
            weight: if single { 1 } else { weight },
            request_headers: header_ops(headers.and_then(|h| h.request.as_ref())),
            response_headers: header_ops(headers.and_then(|h| h.response.as_ref())),
        })
    }

    /// The cluster of a `Destination`: its host (short names relative to the VirtualService's
    /// namespace), its port (the one given, the service's only one, or the routed port) and its
    /// subset. One that names nothing known is reported and gets a cluster with no endpoints.
    fn istio_cluster(
        &mut self,
        scope: Scope<'_, '_>,
        field: &str,
        destination: &Destination,
        clusters: &mut ClusterSet,
    ) -> u32 {
        let fqdn = self.options.fqdn(&destination.host, scope.namespace);
        let service = scope.catalog.get(&fqdn);
        let given = destination.port.as_ref().and_then(|p| p.number);
        let port = match (given, service.map(|s| s.ports.as_slice())) {
            (Some(n), _) => u16::try_from(n).unwrap_or(0),
            (None, Some([only])) => only.port,
            (None, _) => scope.target.port.port,
        };
        let subset = destination.subset.clone();
        let problem = match service {
            None => Some(("host", format!("{fqdn} is not a known service with a VIP"))),
            Some(s) if s.port(port).is_none() => {
                Some(("port", format!("{fqdn} has no TCP port {port}")))
            }
            Some(s) => subset
                .as_ref()
                .filter(|name| !self.has_subset(s, name))
                .map(|name| {
                    (
                        "subset",
                        format!("no DestinationRule for {fqdn} defines subset {name:?}"),
                    )
                }),
        };
        if let Some((below, reason)) = problem {
            let reason = format!(
                "{reason}: its requests get a 503 from the waypoint (a cluster with no endpoints)"
            );
            self.reject(scope.object, &format!("{field}.{below}"), reason);
        }
        clusters.index(self, scope.catalog, ClusterKey { fqdn, port, subset })
    }

    /// `mirror` with `mirrorPercentage`, or `mirrors`; `None` when both are set (Istio refuses
    /// that).
    fn istio_mirrors(
        &mut self,
        at: &RouteAt<'_>,
        scope: Scope<'_, '_>,
        route: &istio::HttpRoute,
        clusters: &mut ClusterSet,
    ) -> Option<Vec<Mirror>> {
        let mut listed: Vec<(String, &Destination, f64)> = Vec::new();
        match (&route.mirror, &route.mirrors) {
            (Some(_), Some(_)) => {
                self.reject(
                    at.object,
                    &at.at("mirrors"),
                    "mirror and mirrors cannot both be set; the route is left out",
                );
                return None;
            }
            (Some(mirror), None) => {
                let share = route.mirror_percentage.map_or(100.0, |p| p.value);
                listed.push((at.at("mirror"), mirror, share));
            }
            (None, Some(mirrors)) => {
                for (m, mirror) in mirrors.iter().enumerate() {
                    let share = mirror.percentage.map_or(100.0, |p| p.value);
                    listed.push((
                        at.at(&format!("mirrors[{m}].destination")),
                        &mirror.destination,
                        share,
                    ));
                }
            }
            (None, None) => {}
        }
        let mut mirrors = Vec::new();
        for (field, destination, share) in listed {
            if !(0.0..=100.0).contains(&share) {
                self.reject(
                    at.object,
                    &field,
                    format!("{share} is not a percentage from 0 to 100; the route is left out"),
                );
                return None;
            }
            let cluster = self.istio_cluster(scope, &field, destination, clusters);
            mirrors.push(Mirror {
                cluster,
                percent: share,
            });
        }
        Some(mirrors)
    }
}
