//! The HTTPRoutes attached to a service port (GAMMA) as the waypoint's routes. Decided here:
//! - **One route per (rule, match)**, ordered by the Gateway API's precedence as Istio sorts them
//!   (`sortHTTPRoutes`, stable): exact path before prefix before regular expression, then the
//!   longer path, then a method, then more headers, then more query parameters; ties keep the
//!   routes' order (oldest, then namespace/name, as `mesh_routes.rs` sorts them) and rule order.
//!   A rule without matches has the CRD's default, `PathPrefix /`.
//! - **Filters**: header modifiers, `RequestRedirect` (status 302 by default; a scheme without a
//!   port sets the scheme's well-known port, as the Gateway API requires), `URLRewrite`,
//!   `RequestMirror` (100 % by default). An `ExtensionRef` or a type this version does not know
//!   cannot be skipped: as the Gateway API requires, the rule answers 500 (reported).
//! - **Backends**: weight 1 by default; a rule with no backendRefs or only weight 0 answers 500.
//!   A backendRef that resolves to nothing (no such Service or port, a cross-namespace reference
//!   no ReferenceGrant permits) should get a 500 for its share; the waypoint's routes cannot mix a
//!   direct response into a weighted split, so its share goes to a cluster with no endpoints (a
//!   503), and when every backend is invalid the rule answers 500.
//! - **Timeouts and retries, as Istio converts them**: `retry` (experimental) gives
//!   connect-failure, refused-stream, unavailable, cancelled and its codes, 2 attempts by default;
//!   without it Istio's default retry policy applies. `request` is the route's timeout;
//!   `backendRequest` is the per-try timeout when `retry` is set, else the route's timeout (it
//!   replaces `request`), as Istio's `convertHTTPRoute` does. A zero timeout is none.
use std::cmp::Reverse;

use kmesh_snapshot::waypoint::{
    DirectResponse, HeaderOps, HttpRoute, Mirror, PathRewrite, Redirect, RetryOn, RetryPolicy,
    Rewrite, RouteAction, WeightedCluster,
};

use super::{
    super::{
        Compiler,
        catalog::Catalog,
        mesh_routes::{RouteKind, object_of},
    },
    ClusterKey, ClusterSet, RoutedPort,
    istio_actions::default_retry_policy,
    matches::{NoMatch, gateway_match, gateway_path},
};
use crate::{
    diagnostics::ObjectRef,
    durations::millis_ceil,
    gateway_api::{
        BackendRef, FilterType, HeaderModifier, HttpPathModifier, HttpRoute as GatewayHttpRoute,
        HttpRouteFilter, HttpRouteMatch, HttpRouteRule, PathMatchType, PathModifierType,
    },
};

/// The CRD's default match: `PathPrefix /`.
static DEFAULT_MATCH: std::sync::LazyLock<HttpRouteMatch> =
    std::sync::LazyLock::new(HttpRouteMatch::default);

/// One (rule, match) of one HTTPRoute, before it is compiled.
struct RuleMatch<'r> {
    route: &'r GatewayHttpRoute,
    rule_index: usize,
    rule: &'r HttpRouteRule,
    match_index: Option<usize>,
    matched: &'r HttpRouteMatch,
}

impl RuleMatch<'_> {
    /// Istio's precedence key (`sortHTTPRoutes`): smaller sorts first.
    fn precedence(&self) -> impl Ord + use<> {
        let (kind, path) = gateway_path(self.matched);
        let rank = match kind {
            PathMatchType::Exact => 3,
            PathMatchType::PathPrefix => 2,
            PathMatchType::RegularExpression => 1,
        };
        (
            Reverse(rank),
            Reverse(path.len()),
            self.matched.method.is_none(),
            Reverse(self.matched.headers.len()),
            Reverse(self.matched.query_params.len()),
        )
    }

    fn field(&self) -> String {
        match self.match_index {
            Some(j) => format!("spec.rules[{}].matches[{j}]", self.rule_index),
            None => format!("spec.rules[{}]", self.rule_index),
        }
    }
}

/// A rule being compiled: its object and field, its route's namespace.
struct RuleAt<'r> {
    object: &'r ObjectRef,
    field: String,
    namespace: &'r str,
}

impl<'a> Compiler<'a> {
    /// The routes of the HTTPRoutes attached to one port (`routes` oldest first).
    pub(super) fn http_route_routes(
        &mut self,
        routes: &[&'a GatewayHttpRoute],
        target: RoutedPort<'_>,
        catalog: &Catalog<'_>,
        clusters: &mut ClusterSet,
    ) -> Vec<HttpRoute> {
        let mut rule_matches: Vec<RuleMatch<'_>> = Vec::new();
        for route in routes {
            for (rule_index, rule) in route.spec.rules.iter().enumerate() {
                match rule.matches.as_deref() {
                    None | Some([]) => rule_matches.push(RuleMatch {
                        route,
                        rule_index,
                        rule,
                        match_index: None,
                        matched: &DEFAULT_MATCH,
                    }),
                    Some(matches) => {
                        rule_matches.extend(matches.iter().enumerate().map(|(j, matched)| {
                            RuleMatch {
                                route,
                                rule_index,
                                rule,
                                match_index: Some(j),
                                matched,
                            }
                        }))
                    }
                }
            }
        }
        rule_matches.sort_by_key(RuleMatch::precedence);
        let mut compiled = Vec::new();
        for rule_match in &rule_matches {
            let object = object_of(rule_match.route, RouteKind::Http);
            let field = rule_match.field();
            if let Some(route) = self.gateway_route(&object, rule_match, target, catalog, clusters)
                && let Some(route) = self.accepted(&object, &field, route, clusters)
            {
                compiled.push(route);
            }
        }
        compiled
    }

    /// One (rule, match); `None` (reported) when its match cannot be expressed.
    fn gateway_route(
        &mut self,
        object: &ObjectRef,
        rule_match: &RuleMatch<'_>,
        target: RoutedPort<'_>,
        catalog: &Catalog<'_>,
        clusters: &mut ClusterSet,
    ) -> Option<HttpRoute> {
        let field = rule_match.field();
        let request_match = match gateway_match(rule_match.matched) {
            Ok(m) => m,
            Err(NoMatch::Invalid(below, reason)) => {
                self.reject(
                    object,
                    &format!("{field}.{below}"),
                    format!("{reason}; left out"),
                );
                return None;
            }
            Err(NoMatch::Never(reason)) => {
                self.note(object, &field, format!("{reason}; left out"));
                return None;
            }
        };
        let rule = rule_match.rule;
        let at = RuleAt {
            object,
            field: format!("spec.rules[{}]", rule_match.rule_index),
            namespace: rule_match.route.namespace(),
        };
        let mut route = HttpRoute {
            origin: format!("{object} {field}"),
            matches: vec![request_match],
            action: RouteAction::DirectResponse(DirectResponse {
                status: 500,
                body: None,
            }),
            request_headers: HeaderOps::default(),
            response_headers: HeaderOps::default(),
            rewrite: None,
            timeout_ms: None,
            retries: None,
            fault: None,
            mirrors: Vec::new(),
        };
        let redirect =
            self.apply_filters(&at, &rule.filters, &mut route, target, catalog, clusters);
        route.action = match redirect {
            Some(FilterOutcome::Redirect(redirect)) => RouteAction::Redirect(redirect),
            Some(FilterOutcome::Fail) => RouteAction::DirectResponse(DirectResponse {
                status: 500,
                body: None,
            }),
            None => self.waypoint_backends(&at, &rule.backend_refs, target, catalog, clusters),
        };
        for (below, set) in [
            (
                "retry.backoff",
                rule.retry.as_ref().is_some_and(|r| r.backoff.is_some()),
            ),
            ("sessionPersistence", rule.session_persistence.is_some()),
        ] {
            if set {
                let reason = "not supported by the waypoint; left out";
                self.unenforced(object, &format!("{}.{below}", at.field), reason);
            }
        }
        if matches!(route.action, RouteAction::Forward(_)) {
            (route.timeout_ms, route.retries) = gateway_timeouts(rule);
        } else {
            route.mirrors.clear();
        }
        Some(route)
    }

    /// A rule's filters into `route`; a redirect, or a filter that must fail the rule, decides the
    /// action.
    fn apply_filters(
        &mut self,
        at: &RuleAt<'_>,
        filters: &[HttpRouteFilter],
        route: &mut HttpRoute,
        target: RoutedPort<'_>,
        catalog: &Catalog<'_>,
        clusters: &mut ClusterSet,
    ) -> Option<FilterOutcome> {
        let mut outcome = None;
        for (f, filter) in filters.iter().enumerate() {
            let field = format!("{}.filters[{f}]", at.field);
            match (&filter.type_, filter) {
                (
                    FilterType::RequestHeaderModifier,
                    HttpRouteFilter {
                        request_header_modifier: Some(m),
                        ..
                    },
                ) => route.request_headers = header_modifier(m),
                (
                    FilterType::ResponseHeaderModifier,
                    HttpRouteFilter {
                        response_header_modifier: Some(m),
                        ..
                    },
                ) => route.response_headers = header_modifier(m),
                (
                    FilterType::RequestRedirect,
                    HttpRouteFilter {
                        request_redirect: Some(r),
                        ..
                    },
                ) => {
                    outcome = Some(FilterOutcome::Redirect(Redirect {
                        scheme: r.scheme.clone(),
                        authority: r.hostname.clone(),
                        // Without a port, a new scheme's well-known port (Gateway API).
                        port: match (r.port, r.scheme.as_deref()) {
                            (Some(port), _) => u16::try_from(port).ok(),
                            (None, Some("https")) => Some(443),
                            (None, Some("http")) => Some(80),
                            (None, _) => None,
                        },
                        path: r.path.as_ref().and_then(path_modifier),
                        status: r
                            .status_code
                            .and_then(|s| u16::try_from(s).ok())
                            .unwrap_or(302),
                    }));
                }
                (
                    FilterType::UrlRewrite,
                    HttpRouteFilter {
                        url_rewrite: Some(r),
                        ..
                    },
                ) => {
                    route.rewrite = Some(Rewrite {
                        path: r.path.as_ref().and_then(path_modifier),
                        authority: r.hostname.clone(),
                    });
                }
                (
                    FilterType::RequestMirror,
                    HttpRouteFilter {
                        request_mirror: Some(m),
                        ..
                    },
                ) => {
                    let share = match (m.percent, &m.fraction) {
                        (Some(percent), _) => f64::from(percent),
                        (None, Some(fraction)) => {
                            f64::from(fraction.numerator) * 100.0
                                / f64::from(fraction.denominator.unwrap_or(100).max(1))
                        }
                        (None, None) => 100.0,
                    };
                    let cluster = self.gateway_cluster(
                        at,
                        &format!("{field}.requestMirror.backendRef"),
                        &m.backend_ref,
                        target,
                        catalog,
                        clusters,
                    );
                    route.mirrors.push(Mirror {
                        cluster: cluster.unwrap_or_else(|c| c),
                        percent: share.clamp(0.0, 100.0),
                    });
                }
                (other, _) => {
                    let reason = format!(
                        "filter {} is not supported by the waypoint; as the Gateway API requires, the rule answers HTTP 500",
                        other.name()
                    );
                    self.unenforced(at.object, &field, reason);
                    outcome = Some(FilterOutcome::Fail);
                }
            }
        }
        outcome
    }

    /// The rule's backendRefs as weighted clusters (see the module doc for invalid backends).
    fn waypoint_backends(
        &mut self,
        at: &RuleAt<'_>,
        backend_refs: &[BackendRef],
        target: RoutedPort<'_>,
        catalog: &Catalog<'_>,
        clusters: &mut ClusterSet,
    ) -> RouteAction {
        let mut destinations = Vec::new();
        let mut any_valid = false;
        for (j, backend) in backend_refs.iter().enumerate() {
            let field = format!("{}.backendRefs[{j}]", at.field);
            let weight = u32::try_from(backend.weight()).unwrap_or(0);
            if weight == 0 {
                continue;
            }
            let cluster = self.gateway_cluster(at, &field, backend, target, catalog, clusters);
            any_valid |= cluster.is_ok();
            let mut destination = WeightedCluster {
                cluster: cluster.unwrap_or_else(|c| c),
                weight,
                ..Default::default()
            };
            for (k, filter) in backend.filters.iter().enumerate() {
                match (
                    &filter.type_,
                    &filter.request_header_modifier,
                    &filter.response_header_modifier,
                ) {
                    (FilterType::RequestHeaderModifier, Some(m), _) => {
                        destination.request_headers = header_modifier(m)
                    }
                    (FilterType::ResponseHeaderModifier, _, Some(m)) => {
                        destination.response_headers = header_modifier(m)
                    }
                    (other, _, _) => {
                        let reason = format!(
                            "filter {} on a backendRef is not supported by the waypoint; left out",
                            other.name()
                        );
                        self.unenforced(at.object, &format!("{field}.filters[{k}]"), reason);
                    }
                }
            }
            destinations.push(destination);
        }
        if !any_valid {
            let reason = "no backendRef with a positive weight resolves to a service port: the rule answers HTTP 500, as the Gateway API requires";
            self.note(at.object, &format!("{}.backendRefs", at.field), reason);
            return RouteAction::DirectResponse(DirectResponse {
                status: 500,
                body: None,
            });
        }
        RouteAction::Forward(destinations)
    }

    /// The cluster of a backendRef: `Ok` when it resolves to a service port, `Err` with a cluster
    /// with no endpoints (reported) when it does not.
    fn gateway_cluster(
        &mut self,
        at: &RuleAt<'_>,
        field: &str,
        backend: &BackendRef,
        target: RoutedPort<'_>,
        catalog: &Catalog<'_>,
        clusters: &mut ClusterSet,
    ) -> Result<u32, u32> {
        let namespace = backend.namespace.as_deref().unwrap_or(at.namespace);
        let is_service = (backend.group(), backend.kind()) == ("", "Service");
        let fqdn = if is_service {
            self.options.service_fqdn(&backend.name, namespace)
        } else {
            backend.name.clone()
        };
        let port = backend
            .port
            .and_then(|p| u16::try_from(p).ok())
            .unwrap_or(target.port.port);
        let problem = if !is_service
            && (backend.group(), backend.kind()) != ("networking.istio.io", "Hostname")
        {
            Some(format!(
                "backend kind {} (group {:?}) is not supported",
                backend.kind(),
                backend.group()
            ))
        } else if is_service
            && namespace != at.namespace
            && !self.service_reference_granted(
                RouteKind::Http,
                at.namespace,
                namespace,
                &backend.name,
            )
        {
            Some(format!(
                "no ReferenceGrant in namespace {namespace} permits HTTPRoutes in {} to refer to it",
                at.namespace
            ))
        } else if catalog.get(&fqdn).is_none_or(|s| s.port(port).is_none()) {
            Some(format!(
                "{fqdn}:{port} is not a known service port with a VIP"
            ))
        } else {
            None
        };
        let cluster = clusters.index(
            self,
            catalog,
            ClusterKey {
                fqdn,
                port,
                subset: None,
            },
        );
        match problem {
            None => Ok(cluster),
            Some(problem) => {
                self.note(at.object, field, format!("an invalid backend: {problem}; its share gets a 503 from the waypoint (a cluster with no endpoints)"));
                Err(cluster)
            }
        }
    }
}

/// What a rule's filters decide about its action.
enum FilterOutcome {
    Redirect(Redirect),
    /// A filter the waypoint cannot apply: the rule answers 500.
    Fail,
}

fn header_modifier(m: &HeaderModifier) -> HeaderOps {
    let headers = |list: &[crate::gateway_api::HttpHeader]| {
        list.iter()
            .map(|h| kmesh_snapshot::waypoint::Header {
                name: h.name.to_ascii_lowercase(),
                value: h.value.clone(),
            })
            .collect()
    };
    HeaderOps {
        remove: m.remove.iter().map(|n| n.to_ascii_lowercase()).collect(),
        set: headers(&m.set),
        add: headers(&m.add),
    }
}

fn path_modifier(m: &HttpPathModifier) -> Option<PathRewrite> {
    match m.type_ {
        PathModifierType::ReplaceFullPath => m.replace_full_path.clone().map(PathRewrite::Full),
        PathModifierType::ReplacePrefixMatch => m
            .replace_prefix_match
            .clone()
            .map(PathRewrite::MatchedPrefix),
    }
}

/// The route's timeout and retries from `timeouts` and `retry`, as Istio converts them.
fn gateway_timeouts(rule: &HttpRouteRule) -> (Option<u64>, Option<RetryPolicy>) {
    let ms = |d: Option<crate::durations::GatewayDuration>| {
        d.map(|d| millis_ceil(d.0)).filter(|ms| *ms > 0)
    };
    let timeouts = rule.timeouts.clone().unwrap_or_default();
    let mut timeout = ms(timeouts.request);
    let backend = ms(timeouts.backend_request);
    let retries = match &rule.retry {
        None => {
            if backend.is_some() {
                timeout = backend;
            }
            Some(default_retry_policy())
        }
        Some(retry) => {
            let attempts = u32::try_from(retry.attempts.unwrap_or(2)).unwrap_or(0);
            let codes: Vec<u16> = retry
                .codes
                .iter()
                .filter_map(|c| u16::try_from(*c).ok())
                .collect();
            let mut retry_on = vec![
                RetryOn::ConnectFailure,
                RetryOn::RefusedStream,
                RetryOn::Unavailable,
                RetryOn::Cancelled,
            ];
            if !codes.is_empty() {
                retry_on.push(RetryOn::RetriableStatusCodes);
            }
            (attempts > 0).then_some(RetryPolicy {
                attempts,
                per_try_timeout_ms: backend,
                retry_on,
                retriable_status_codes: codes,
            })
        }
    };
    (timeout, retries)
}
