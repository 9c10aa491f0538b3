//! Routes: for every service port in each address family with a VIP, the weighted backend sets its
//! connections go to. Decided here:
//! - which kind of route applies to a port: the Gateway API mesh routes attached to it, else the
//!   mesh VirtualService of its host, else the service's own endpoints (why Gateway API wins:
//!   `mesh_routes.rs`);
//! - how weighted destinations become a route, once for VirtualService routes and Gateway API rules
//!   alike (`Compiler::weighted_route`): at most `MAX_ROUTE_DESTINATIONS` of them, weight 0 gets no
//!   connection, and the weights are made a route by `RouteValue::from_weights` (the kernel's own
//!   definition) as soon as they are read, so a route that exists is valid.
use std::{net::IpAddr, num::NonZeroU32};

use kmesh_common::{MAX_ROUTE_DESTINATIONS, RouteValue, RouteWeightError};

use super::{
    Compiler,
    backend_sets::SetRef,
    catalog::{Catalog, CatalogPort, CatalogService},
    mesh_routes::Attached,
};
use crate::{crd::Mode, diagnostics::ObjectRef, istio::VirtualService, kinds::Kind};
use kmesh_snapshot::waypoint::WaypointName;

use super::waypoint_bindings::{Waypoint, WaypointBindings};

/// A service port in one address family: what a route is compiled for.
#[derive(Clone, Copy, Debug)]
pub(super) struct PortTarget<'c> {
    pub(super) service: &'c CatalogService<'c>,
    pub(super) port: &'c CatalogPort,
    pub(super) v6: bool,
}

impl<'c> PortTarget<'c> {
    /// `fqdn:port`, as diagnostics name it.
    pub(super) fn describe(&self) -> String {
        format!("{}:{}", self.service.fqdn, self.port.port)
    }

    /// The route's name: `fqdn:port (v4)`; its id is a hash of it.
    pub(super) fn route_name(&self) -> String {
        let family = if self.v6 { "v6" } else { "v4" };
        format!("{} ({family})", self.describe())
    }

    /// The service's own endpoints on this port: where connections go without a route.
    fn own_endpoints(&self) -> SetRef<'c> {
        SetRef::endpoints(self.service, self.port, None, self.v6)
    }

    /// The set that refuses every connection to this port, for a rule that sends nothing anywhere.
    pub(super) fn no_backends(&self) -> SetRef<'c> {
        SetRef::no_backends(&self.service.fqdn, self.port.port, self.v6)
    }
}

/// A route: weights, checked by `RouteValue::from_weights`, and the backend set of each weight.
#[derive(Clone, Debug)]
pub(super) struct Route<'c> {
    /// The kernel's route; its backend set ids are 0 until `tables` gives every set its id.
    value: RouteValue,
    /// The backend set of each destination of `value`, in order (every weight is positive, so
    /// `from_weights` keeps them all, in this order).
    sets: Vec<SetRef<'c>>,
}

impl<'c> Route<'c> {
    fn new(destinations: Vec<(NonZeroU32, SetRef<'c>)>) -> Result<Self, RouteWeightError> {
        let value = RouteValue::from_weights(destinations.iter().map(|(w, _)| (w.get(), 0)))?;
        let sets = destinations.into_iter().map(|(_, set)| set).collect();
        Ok(Route { value, sets })
    }

    pub(super) fn sets(&self) -> &[SetRef<'c>] {
        &self.sets
    }

    /// The kernel's route, with the backend set id `set_id` gives each set; `None` when a set has
    /// no id.
    pub(super) fn with_set_ids(
        &self,
        set_id: impl Fn(&SetRef<'c>) -> Option<u32>,
    ) -> Option<RouteValue> {
        let mut value = self.value;
        for (slot, set) in value.backend_set.iter_mut().zip(&self.sets) {
            *slot = set_id(set)?;
        }
        Some(value)
    }
}

/// A service port in one family, its VIPs and its route.
pub(super) struct RoutedPort<'c> {
    pub(super) target: PortTarget<'c>,
    pub(super) vips: Vec<IpAddr>,
    pub(super) route: Route<'c>,
    /// The route goes to the service's waypoint (DualEngine): its connections carry their
    /// original destination (`kmesh_common::service_flags::WAYPOINT`).
    pub(super) via_waypoint: bool,
}

/// Where a list of weighted destinations is written: the object, the list's field, and the
/// namespace that short hosts and backendRefs are relative to.
pub(super) struct RuleAt<'r> {
    pub(super) object: &'r ObjectRef,
    pub(super) field: String,
    pub(super) namespace: &'r str,
}

/// What one entry of a destination list comes to.
pub(super) enum Weighted<'c> {
    /// A backend set with a positive weight.
    To(NonZeroU32, SetRef<'c>),
    /// Weight 0: no connection.
    Zero,
    /// The entry is invalid and rejects the whole list (already reported).
    Rejected,
}

/// Why a list of weighted destinations gives no route.
pub(super) enum NoRoute {
    /// Rejected (already reported).
    Rejected,
    /// No destination has a positive weight; what follows is the caller's rule.
    NoWeight,
}

impl<'a> Compiler<'a> {
    /// A route for every service port and family with a VIP.
    pub(super) fn routes<'c>(
        &mut self,
        catalog: &'c Catalog<'_>,
        waypoints: &WaypointBindings,
    ) -> Vec<RoutedPort<'c>> {
        let vs_by_host = self.virtual_services_by_host(catalog);
        let mesh_routes = self.mesh_routes(catalog);
        let mut routed = Vec::new();
        for service in catalog.values() {
            for port in &service.ports {
                let attached = mesh_routes.get(&(service.fqdn.clone(), port.port));
                let vs = vs_by_host.get(&service.fqdn).copied();
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
                    let target = PortTarget { service, port, v6 };
                    let waypoint = self.steered_waypoint(service, waypoints);
                    let route = match waypoint {
                        Some((name, at)) => self.route_to_waypoint(target, name, at, catalog),
                        None => self.route_for(target, attached, vs, catalog),
                    };
                    if let Some(route) = route {
                        routed.push(RoutedPort {
                            target,
                            vips,
                            route,
                            via_waypoint: waypoint.is_some(),
                        });
                    }
                }
            }
        }
        routed
    }

    /// The waypoint `service`'s connections are steered to: only in DualEngine, and only for a
    /// Kubernetes Service bound to a waypoint (`waypoint_bindings.rs`).
    fn steered_waypoint<'w>(
        &self,
        service: &CatalogService<'_>,
        waypoints: &'w WaypointBindings,
    ) -> Option<(&'w WaypointName, &'w Waypoint)> {
        if self.mode != Mode::DualEngine || service.object.kind != Kind::Service {
            return None;
        }
        let key = (service.namespace.clone(), service.object.name.clone());
        let name = waypoints.services.get(&key)?;
        Some((name, waypoints.waypoints.get(name)?))
    }

    /// Every connection to `target` goes to a ready replica of its waypoint: the endpoints of the
    /// waypoint's Service (the Gateway's name and namespace) at the waypoint's port. Without that
    /// Service or port, or without ready replicas, connections are refused: they never go around
    /// the waypoint's routes and policies.
    fn route_to_waypoint<'c>(
        &mut self,
        target: PortTarget<'c>,
        name: &WaypointName,
        waypoint: &Waypoint,
        catalog: &'c Catalog<'_>,
    ) -> Option<Route<'c>> {
        let fqdn = self.options.service_fqdn(&name.name, &name.namespace);
        let port = catalog
            .get(&fqdn)
            .and_then(|s| Some((s, s.port(waypoint.port)?)));
        let set = match port {
            Some((service, port)) => SetRef::endpoints(service, port, None, target.v6),
            None => {
                let reason = format!(
                    "uses waypoint {}/{}, which has no Service {fqdn} with port {}: connections to {} are refused until it has",
                    name.namespace,
                    name.name,
                    waypoint.port,
                    target.describe()
                );
                self.reject(
                    &target.service.object,
                    "metadata.labels[istio.io/use-waypoint]",
                    reason,
                );
                SetRef::no_waypoint(&fqdn, waypoint.port, target.v6)
            }
        };
        self.single_route(&target.service.object, set)
    }

    /// The Gateway API routes attached to the port, else the host's VirtualService, else (also
    /// when those are rejected) the service's own endpoints.
    fn route_for<'c>(
        &mut self,
        target: PortTarget<'c>,
        attached: Option<&Attached<'a>>,
        vs: Option<&'a VirtualService>,
        catalog: &'c Catalog<'_>,
    ) -> Option<Route<'c>> {
        let routed = match attached {
            Some(attached) => {
                if let Some(vs) = vs {
                    self.note(
                        &ObjectRef::new(Kind::VirtualService, Some(vs.namespace()), vs.name()),
                        "spec.hosts",
                        format!(
                            "{} is routed by {}: Gateway API routes take precedence over VirtualServices",
                            target.describe(),
                            attached.describe()
                        ),
                    );
                }
                self.route_from_gateway_api(attached, target, catalog)
            }
            None => vs.and_then(|vs| self.route_from_virtual_service(vs, target, catalog)),
        };
        routed.or_else(|| self.single_route(&target.service.object, target.own_endpoints()))
    }

    /// Every connection to one backend set. `from_weights` accepts one weight of 1, so this
    /// cannot fail; were it ever to, the port is left out and `object` says why, rather than the
    /// compile stopping for every node.
    pub(super) fn single_route<'c>(
        &mut self,
        object: &ObjectRef,
        set: SetRef<'c>,
    ) -> Option<Route<'c>> {
        match Route::new(vec![(NonZeroU32::MIN, set)]) {
            Ok(route) => Some(route),
            Err(e) => {
                self.reject(
                    object,
                    "",
                    format!("internal error: {e}; the port is not steered"),
                );
                None
            }
        }
    }

    /// The one place weighted destinations become a route, for VirtualService routes and Gateway
    /// API rules alike: at most `MAX_ROUTE_DESTINATIONS` `entries` (called `noun` in
    /// diagnostics), each read by `resolve`; weights that add up past `u32::MAX` reject the list.
    pub(super) fn weighted_route<'c, T>(
        &mut self,
        rule: &RuleAt<'_>,
        noun: &str,
        entries: &[T],
        mut resolve: impl FnMut(&mut Self, usize, &T) -> Weighted<'c>,
    ) -> Result<Route<'c>, NoRoute> {
        if entries.len() > MAX_ROUTE_DESTINATIONS {
            self.reject(
                rule.object,
                &rule.field,
                format!(
                    "{} {noun}; the kernel route holds at most {MAX_ROUTE_DESTINATIONS}",
                    entries.len()
                ),
            );
            return Err(NoRoute::Rejected);
        }
        let mut destinations = Vec::new();
        for (i, entry) in entries.iter().enumerate() {
            match resolve(self, i, entry) {
                Weighted::To(weight, set) => destinations.push((weight, set)),
                Weighted::Zero => {}
                Weighted::Rejected => return Err(NoRoute::Rejected),
            }
        }
        match Route::new(destinations) {
            Ok(route) => Ok(route),
            Err(RouteWeightError::NoPositiveWeight) => Err(NoRoute::NoWeight),
            Err(RouteWeightError::WeightOverflow) => {
                let reason = "the weights add up to more than 2^32-1";
                self.reject(rule.object, &rule.field, reason);
                Err(NoRoute::Rejected)
            }
            // Not reached: the count is checked above. Reported all the same.
            Err(e @ RouteWeightError::TooManyDestinations { .. }) => {
                self.reject(rule.object, &rule.field, e.to_string());
                Err(NoRoute::Rejected)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{REVIEWS, compile_yaml, diagnostics, summary};

    /// A route of reviews as YAML whose destinations are ENTRIES, and one entry, whose weight is
    /// WEIGHT: a mesh VirtualService, and an HTTPRoute on Service reviews.
    type RouteYaml = (&'static str, &'static str);
    const VIRTUAL_SERVICE: RouteYaml = (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: default}\nspec: {hosts: [reviews], http: [{route: [ENTRIES]}]}\n",
        "{destination: {host: reviews}, weight: WEIGHT}",
    );
    const HTTP_ROUTE: RouteYaml = (
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: reviews, namespace: default}\nspec: {parentRefs: [{group: \"\", kind: Service, name: reviews}], rules: [{backendRefs: [ENTRIES]}]}\n",
        "{name: reviews, port: 9080, weight: WEIGHT}",
    );

    /// REVIEWS and the route, sending reviews to reviews once per weight.
    fn yaml((route, entry): RouteYaml, weights: &[u64]) -> String {
        let entries: Vec<String> = weights
            .iter()
            .map(|w| entry.replace("WEIGHT", &w.to_string()))
            .collect();
        format!(
            "{REVIEWS}\n---\n{}",
            route.replace("ENTRIES", &entries.join(", "))
        )
    }

    /// How many destinations the route of reviews has, and the rejections.
    fn compiled(yaml: &str) -> (usize, Vec<String>) {
        let compiled = compile_yaml(yaml);
        let destinations = summary(&compiled)
            .lines()
            .filter(|l| l.contains("%  reviews.default.svc.cluster.local:9080 (v4)"))
            .count();
        let rejected = diagnostics(&compiled)
            .into_iter()
            .filter(|d| d.starts_with("rejected"))
            .collect();
        (destinations, rejected)
    }

    #[test]
    fn a_route_holds_at_most_sixteen_destinations_of_either_kind() {
        let kinds = [
            (
                VIRTUAL_SERVICE,
                "rejected: VirtualService default/reviews spec.http[0].route: 17 destinations",
            ),
            (
                HTTP_ROUTE,
                "rejected: HTTPRoute default/reviews spec.rules[0].backendRefs: 17 backendRefs",
            ),
        ];
        for (route, rejection) in kinds {
            assert_eq!(compiled(&yaml(route, &[1; 16])), (16, Vec::new()));
            let (destinations, rejected) = compiled(&yaml(route, &[1; 17]));
            assert_eq!(destinations, 1, "the default route");
            assert_eq!(
                rejected,
                [format!("{rejection}; the kernel route holds at most 16")]
            );
        }
    }

    #[test]
    fn weights_add_up_to_at_most_u32_max() {
        let max = u64::from(u32::MAX);
        assert_eq!(
            compiled(&yaml(VIRTUAL_SERVICE, &[max - 1, 1])),
            (2, Vec::new())
        );
        let (destinations, rejected) = compiled(&yaml(VIRTUAL_SERVICE, &[max, 1]));
        assert_eq!(destinations, 1, "the default route");
        assert_eq!(
            rejected,
            [
                "rejected: VirtualService default/reviews spec.http[0].route: the weights add up to more than 2^32-1"
            ]
        );
    }
}
