//! VirtualService routes. Decided here:
//! - a VirtualService bound to the mesh (no `gateways`, or `mesh` among them) routes its hosts;
//!   when several claim one host, the oldest wins (then by namespace/name), a deterministic
//!   stand-in for Istio's IST0109 conflict, and the others are reported;
//! - it chooses, per VIP port, a weighted list of destinations (host, subset, port): the first
//!   `tcp` route that applies to the port, else the first catch-all `http` route. Only what is
//!   decidable at connect() is compiled; every other feature is reported with the resource and
//!   field;
//! - an omitted weight is 0, but a single destination gets everything whatever its weight.
use std::{collections::BTreeMap, num::NonZeroU32};

use super::{
    Compiler,
    backend_sets::SetRef,
    catalog::Catalog,
    routes::{NoRoute, PortTarget, Route, RuleAt, Weighted},
};
use crate::{
    diagnostics::ObjectRef,
    inputs::Inputs,
    istio::{HttpRoute, RouteDestination, TcpRoute, VirtualService},
    kinds::Kind,
};

fn object_of(vs: &VirtualService) -> ObjectRef {
    ObjectRef::new(Kind::VirtualService, Some(vs.namespace()), vs.name())
}

impl<'a> Compiler<'a> {
    /// The VirtualService that applies to each host: mesh-bound, most recent conflicts resolved to
    /// the oldest (then by namespace/name), as a deterministic stand-in for Istio's IST0109 conflict.
    pub(super) fn virtual_services_by_host(
        &mut self,
        catalog: &Catalog<'_>,
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
                for h in self.hosts_matching(host, vs.namespace(), catalog) {
                    match by_host.get(&h) {
                        Some(winner) => {
                            let reason = format!(
                                "host {h} is also routed by {}, which wins (older); mesh VirtualServices do not merge",
                                object_of(winner)
                            );
                            self.note(&object_of(vs), "spec.hosts", reason);
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

    /// The hosts a VirtualService `host` names: itself, expanded, or the catalog's hosts a
    /// wildcard matches.
    fn hosts_matching(&self, host: &str, namespace: &str, catalog: &Catalog<'_>) -> Vec<String> {
        let fqdn = self.options.fqdn(host, namespace);
        match fqdn.strip_prefix('*') {
            Some(suffix) => catalog
                .keys()
                .filter(|h| h.ends_with(suffix))
                .cloned()
                .collect(),
            None => vec![fqdn],
        }
    }

    /// The weighted destinations a VirtualService gives connections to `target`, or `None` when
    /// the port keeps its default routing (the VirtualService is rejected, or routes by nothing
    /// the kernel can see).
    pub(super) fn route_from_virtual_service<'c>(
        &mut self,
        vs: &VirtualService,
        target: PortTarget<'c>,
        catalog: &'c Catalog<'_>,
    ) -> Option<Route<'c>> {
        let object = object_of(vs);
        for (i, _) in vs.spec.tls.iter().enumerate() {
            self.needs_l7(
                &object,
                &format!("spec.tls[{i}]"),
                "TLS routes match on SNI, which needs the first payload bytes",
                None,
            );
        }
        // tcp routes first: fully decidable at connect().
        if let Some((i, route)) = self.tcp_route_for(&object, &vs.spec.tcp, target.port.port) {
            let rule = RuleAt {
                object: &object,
                field: format!("spec.tcp[{i}].route"),
                namespace: vs.namespace(),
            };
            return self.destinations(&rule, &route.route, target, catalog);
        }
        if vs.spec.http.is_empty() {
            return None;
        }
        let (index, route) = self.http_catch_all(&object, &vs.spec.http)?;
        let rule = RuleAt {
            object: &object,
            field: format!("spec.http[{index}].route"),
            namespace: vs.namespace(),
        };
        self.destinations(&rule, &route.route, target, catalog)
    }

    /// The first `tcp` route that applies to `port`, with its index; routes that select clients
    /// (not compiled yet) are reported.
    fn tcp_route_for<'r>(
        &mut self,
        object: &ObjectRef,
        routes: &'r [TcpRoute],
        port: u16,
    ) -> Option<(usize, &'r TcpRoute)> {
        for (i, route) in routes.iter().enumerate() {
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
                self.unenforced(
                    object,
                    &format!("spec.tcp[{i}].match"),
                    "sourceLabels, sourceNamespace and destinationSubnets matches are not compiled yet; the route is skipped",
                );
            }
            if applies {
                return Some((i, route));
            }
        }
        None
    }

    /// The `http` route every connection gets: the first catch-all, since earlier routes match on
    /// request content, which connect() cannot see. Every L7 feature is reported; `None` when no
    /// route applies to every connection or the catch-all has no destinations.
    fn http_catch_all<'r>(
        &mut self,
        object: &ObjectRef,
        routes: &'r [HttpRoute],
    ) -> Option<(usize, &'r HttpRoute)> {
        for (i, route) in routes.iter().enumerate() {
            self.report_l7(object, i, route);
        }
        let default_routing = Some("connections use the service's default routing");
        let Some((index, route)) = routes.iter().enumerate().find(|(_, r)| r.is_catch_all()) else {
            self.needs_l7(
                object,
                "spec.http",
                "every http route matches on request content, which needs L7",
                default_routing,
            );
            return None;
        };
        let follow = format!("all connections follow spec.http[{index}]");
        for i in 0..index {
            let field = format!("spec.http[{i}].match");
            self.needs_l7(object, &field, "request matching needs L7", Some(&follow));
        }
        if route.route.is_empty() {
            self.needs_l7(
                object,
                &format!("spec.http[{index}]"),
                "the route has no destinations (redirect, direct response or delegation needs L7)",
                default_routing,
            );
            return None;
        }
        Some((index, route))
    }

    fn report_l7(&mut self, object: &ObjectRef, index: usize, route: &HttpRoute) {
        for field in route.l7_fields() {
            let field = format!("spec.http[{index}].{field}");
            self.needs_l7(object, &field, "needs L7 (an HTTP proxy)", None);
        }
        for (i, d) in route.route.iter().enumerate() {
            if d.headers.is_some() {
                let field = format!("spec.http[{index}].route[{i}].headers");
                self.needs_l7(object, &field, "header manipulation needs L7", None);
            }
        }
    }

    /// A route's destinations as a route; `None` (reported) when any is invalid or every weight
    /// is 0.
    fn destinations<'c>(
        &mut self,
        rule: &RuleAt<'_>,
        destinations: &[RouteDestination],
        target: PortTarget<'c>,
        catalog: &'c Catalog<'_>,
    ) -> Option<Route<'c>> {
        let single = destinations.len() == 1;
        let resolved = self.weighted_route(rule, "destinations", destinations, |c, i, d| {
            c.destination(rule, i, d, single, target, catalog)
        });
        match resolved {
            Ok(route) => Some(route),
            Err(NoRoute::Rejected) => None,
            Err(NoRoute::NoWeight) => {
                self.reject(
                    rule.object,
                    &rule.field,
                    "the weights add up to 0: no destination would get traffic",
                );
                None
            }
        }
    }

    /// One destination: a known host, one of its ports (the one given, its only one, or the
    /// routed port) and a subset its DestinationRule defines.
    fn destination<'c>(
        &mut self,
        rule: &RuleAt<'_>,
        i: usize,
        d: &RouteDestination,
        single: bool,
        target: PortTarget<'c>,
        catalog: &'c Catalog<'_>,
    ) -> Weighted<'c> {
        let field = format!("{}[{i}]", rule.field);
        let Ok(weight) = u32::try_from(d.weight.unwrap_or(0)) else {
            self.reject(
                rule.object,
                &format!("{field}.weight"),
                "weight must be between 0 and 2^32-1",
            );
            return Weighted::Rejected;
        };
        // A single destination gets everything, whatever its weight.
        let weight = if single {
            NonZeroU32::MIN.get()
        } else {
            weight
        };
        let fqdn = self.options.fqdn(&d.destination.host, rule.namespace);
        let Some(service) = catalog.get(&fqdn) else {
            let reason = format!("{fqdn} is not a known service with a VIP");
            self.reject(rule.object, &format!("{field}.destination.host"), reason);
            return Weighted::Rejected;
        };
        let number = match d.destination.port.as_ref().and_then(|p| p.number) {
            Some(n) => u16::try_from(n).ok(),
            None => match service.ports.as_slice() {
                [only] => Some(only.port),
                _ => Some(target.port.port),
            },
        };
        let Some(port) = number.and_then(|n| service.port(n)) else {
            let reason = format!("{fqdn} has no TCP port {}", number.unwrap_or(0));
            self.reject(rule.object, &format!("{field}.destination.port"), reason);
            return Weighted::Rejected;
        };
        let subset = d.destination.subset.clone();
        if let Some(name) = &subset
            && !self.has_subset(service, name)
        {
            let reason = format!("no DestinationRule for {fqdn} defines subset {name:?}");
            self.reject(rule.object, &format!("{field}.destination.subset"), reason);
            return Weighted::Rejected;
        }
        match NonZeroU32::new(weight) {
            Some(weight) => {
                Weighted::To(weight, SetRef::endpoints(service, port, subset, target.v6))
            }
            None => Weighted::Zero,
        }
    }
}
