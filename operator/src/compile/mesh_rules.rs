//! Which rule of the Gateway API mesh routes attached to a service port the kernel follows.
//! Decided here:
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
//! - When both kinds meet on a port (one that declares no protocol), the HTTPRoutes decide and
//!   the TCPRoutes are reported (see `mesh_routes.rs`).
use super::{
    Compiler,
    backend_refs::BackendRefs,
    catalog::Catalog,
    mesh_routes::{Attached, RouteKind, object_of},
    routes::{PortTarget, Route, RuleAt},
};
use crate::{
    diagnostics::ObjectRef,
    gateway_api::{FilterType, HttpRoute, HttpRouteFilter, HttpRouteRule, TcpRoute},
};

/// The catch-all rule the kernel follows among the HTTPRoutes of one port.
struct CatchAll<'r> {
    /// The route's position in the sorted list, and the rule's in the route.
    route_index: usize,
    rule_index: usize,
    route: &'r HttpRoute,
    rule: &'r HttpRouteRule,
}

impl CatchAll<'_> {
    fn describe(&self) -> String {
        format!(
            "HTTPRoute {}/{} spec.rules[{}]",
            self.route.namespace(),
            self.route.name(),
            self.rule_index
        )
    }
}

impl<'a> Compiler<'a> {
    /// The weighted destinations the Gateway API routes attached to a port give its connections,
    /// or `None` when the port keeps its default routing.
    pub(super) fn route_from_gateway_api<'c>(
        &mut self,
        attached: &Attached<'a>,
        target: PortTarget<'c>,
        catalog: &'c Catalog<'_>,
    ) -> Option<Route<'c>> {
        if attached.http.is_empty() {
            return self.route_from_tcp_routes(&attached.tcp, target, catalog);
        }
        // Both kinds only meet on a port without declared protocol.
        let http = attached.describe();
        for route in &attached.tcp {
            self.needs_l7(
                &object_of(*route, RouteKind::Tcp),
                "spec.parentRefs",
                &format!(
                    "port {} of {} declares no protocol and {http} routes it too: Istio sends HTTP there and other traffic here, telling them apart by the first payload bytes",
                    target.port.port, target.service.fqdn
                ),
                Some(&format!("all connections follow {http}")),
            );
        }
        self.route_from_http_routes(&attached.http, target, catalog)
    }

    /// HTTPRoutes merged as Istio merges them for one service port: the kernel follows the
    /// catch-all rule with the highest precedence (see the module doc).
    fn route_from_http_routes<'c>(
        &mut self,
        routes: &[&'a HttpRoute],
        target: PortTarget<'c>,
        catalog: &'c Catalog<'_>,
    ) -> Option<Route<'c>> {
        // `routes` is sorted oldest first, then by namespace/name; then rule order.
        let winner = routes.iter().enumerate().find_map(|(route_index, route)| {
            let (rule_index, rule) = route
                .spec
                .rules
                .iter()
                .enumerate()
                .find(|(_, rule)| rule.has_catch_all())?;
            Some(CatchAll {
                route_index,
                rule_index,
                route,
                rule,
            })
        });
        self.report_http_rules(routes, winner.as_ref(), target);
        self.route_from_catch_all(&winner?, target, catalog)
    }

    /// What the kernel does not follow of the HTTPRoutes of one port: every L7 feature, every
    /// request match, and the catch-all rules that lose to `winner`.
    fn report_http_rules(
        &mut self,
        routes: &[&'a HttpRoute],
        winner: Option<&CatchAll<'_>>,
        target: PortTarget<'_>,
    ) {
        let target = target.describe();
        let winner_name = winner.map(CatchAll::describe);
        let in_kernel = match &winner_name {
            Some(w) => format!("connections to {target} follow {w}"),
            None => format!(
                "no rule matches every request: connections to {target} keep the service's default routing"
            ),
        };
        for (r, route) in routes.iter().enumerate() {
            let object = object_of(*route, RouteKind::Http);
            for (i, rule) in route.spec.rules.iter().enumerate() {
                self.report_gateway_l7(&object, i, rule);
                if winner.is_some_and(|w| (w.route_index, w.rule_index) == (r, i)) {
                    continue;
                }
                if rule.has_request_match() {
                    let field = format!("spec.rules[{i}].matches");
                    self.needs_l7(
                        &object,
                        &field,
                        "request matching needs L7",
                        Some(&in_kernel),
                    );
                }
                if let (true, Some(w)) = (rule.has_catch_all(), &winner_name) {
                    self.note(
                        &object,
                        &format!("spec.rules[{i}]"),
                        format!(
                            "also matches every request to {target}, but {w} takes precedence (oldest route, then namespace/name, then rule order): this rule gets no traffic, in Istio as in the kernel"
                        ),
                    );
                }
            }
        }
    }

    /// The route of the winning catch-all rule: its backendRefs, or, without any, refused
    /// connections (a redirect keeps the port's default routing: it needs L7).
    fn route_from_catch_all<'c>(
        &mut self,
        winner: &CatchAll<'a>,
        target: PortTarget<'c>,
        catalog: &'c Catalog<'_>,
    ) -> Option<Route<'c>> {
        let object = object_of(winner.route, RouteKind::Http);
        let i = winner.rule_index;
        let rule = winner.rule;
        if rule.backend_refs.is_empty() {
            let to = target.describe();
            if rule
                .filters
                .iter()
                .any(|f| f.type_ == FilterType::RequestRedirect)
            {
                self.needs_l7(
                    &object,
                    &format!("spec.rules[{i}]"),
                    "the rule only redirects, which needs L7",
                    Some(&format!(
                        "connections to {to} keep the service's default routing"
                    )),
                );
                return None;
            }
            self.note(
                &object,
                &format!("spec.rules[{i}].backendRefs"),
                format!(
                    "no backendRefs: Istio answers every request with HTTP 500; connections to {to} are refused"
                ),
            );
            return self.single_route(&object, target.no_backends());
        }
        let refs = BackendRefs {
            at: RuleAt {
                object: &object,
                field: format!("spec.rules[{i}].backendRefs"),
                namespace: winner.route.namespace(),
            },
            kind: RouteKind::Http,
            target,
        };
        self.gateway_backends(&refs, &rule.backend_refs, catalog)
    }

    /// TCPRoutes for one service port: nothing to match on, so the oldest route's first rule.
    fn route_from_tcp_routes<'c>(
        &mut self,
        routes: &[&'a TcpRoute],
        target: PortTarget<'c>,
        catalog: &'c Catalog<'_>,
    ) -> Option<Route<'c>> {
        let to = target.describe();
        let (route, others) = routes.split_first()?;
        let object = object_of(*route, RouteKind::Tcp);
        for other in others {
            self.note(
                &object_of(*other, RouteKind::Tcp),
                "spec.parentRefs",
                format!(
                    "{to} is also routed by {object}, which takes precedence (oldest, then namespace/name): this route gets no connections"
                ),
            );
        }
        let Some(rule) = route.spec.rules.first() else {
            self.reject(&object, "spec.rules", "no rules (a TCPRoute needs one)");
            return None;
        };
        for (i, _) in route.spec.rules.iter().enumerate().skip(1) {
            self.note(
                &object,
                &format!("spec.rules[{i}]"),
                format!(
                    "a TCPRoute rule has nothing to match on: connections to {to} follow spec.rules[0]"
                ),
            );
        }
        if rule.backend_refs.is_empty() {
            self.note(
                &object,
                "spec.rules[0].backendRefs",
                format!("no backendRefs: connections to {to} are refused, as Gateway API requires"),
            );
            return self.single_route(&object, target.no_backends());
        }
        let refs = BackendRefs {
            at: RuleAt {
                object: &object,
                field: "spec.rules[0].backendRefs".to_string(),
                namespace: route.namespace(),
            },
            kind: RouteKind::Tcp,
            target,
        };
        self.gateway_backends(&refs, &rule.backend_refs, catalog)
    }

    /// The L7 parts of an HTTPRoute rule: filters (its own and its backendRefs'), timeouts, retry,
    /// session persistence.
    fn report_gateway_l7(&mut self, object: &ObjectRef, index: usize, rule: &HttpRouteRule) {
        let filter_needs_l7 = |filter: &HttpRouteFilter| {
            format!("filter {} needs L7 (an HTTP proxy)", filter.type_.name())
        };
        for (j, filter) in rule.filters.iter().enumerate() {
            let field = format!("spec.rules[{index}].filters[{j}]");
            self.needs_l7(object, &field, &filter_needs_l7(filter), None);
        }
        for field in rule.l7_fields() {
            let field = format!("spec.rules[{index}].{field}");
            self.needs_l7(object, &field, "needs L7 (an HTTP proxy)", None);
        }
        for (j, backend) in rule.backend_refs.iter().enumerate() {
            for (k, filter) in backend.filters.iter().enumerate() {
                let field = format!("spec.rules[{index}].backendRefs[{j}].filters[{k}]");
                self.needs_l7(object, &field, &filter_needs_l7(filter), None);
            }
        }
    }
}
