//! The route table: a [`WaypointConfig`] compiled into what requests use. It owns the indexes
//! (services by (service id, port), workloads by address) and every regular expression, compiled
//! once. It promises that a table exists only for a configuration that is valid whole: a regex
//! that does not compile, or an address two workloads claim, refuses the table with the field
//! path and the reason, and the waypoint keeps its last good one.
//!
//! The table is immutable. The proxy shares it as `Arc<RouteTable>` and a request takes the `Arc`
//! once, at its start, so it sees one configuration from its first byte to its last; a new
//! configuration is a new table swapped in whole.
use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use kmesh_snapshot::waypoint::{
    AuthorizationPolicy, HeaderMatch, HttpRoute, PathMatch, Protocol, QueryParamMatch,
    RequestMatch, RouteAction, StringMatch, WaypointConfig, WaypointConfigError, WaypointName,
    WeightedCluster, Workload,
};
use regex::Regex;

use crate::{
    choice::ClusterTable,
    filters::{HeaderEdits, PathRewriter, RouteEdits},
    identity::canonical_address,
};

/// Why a configuration cannot become a table. Each names the field, as the configuration's own
/// validation does.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TableError {
    #[error(transparent)]
    Invalid(#[from] WaypointConfigError),
    #[error("{field}: the regular expression {pattern:?} does not compile: {error}")]
    Regex {
        field: String,
        pattern: String,
        error: String,
    },
    #[error(
        "workloads[{second}].addresses: {address} is also an address of workloads[{first}] \
         ({first_name}); it would be {second_name} too"
    )]
    AddressClaimedTwice {
        address: IpAddr,
        first: usize,
        first_name: String,
        second: usize,
        second_name: String,
    },
    #[error("{field}: {problem}")]
    Unusable { field: String, problem: String },
}

/// Where a connection was going: the service id the kernel wrote in its SYN, and the service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortKey {
    pub service_id: u32,
    pub port: u16,
}

/// The service a port belongs to, for logs and metrics (Istio's `destination_service`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceInfo {
    pub id: u32,
    pub hostname: String,
    pub namespace: String,
    pub name: String,
}

/// The compiled configuration of one waypoint.
#[derive(Debug)]
pub struct RouteTable {
    waypoint: WaypointName,
    trust_domain: String,
    ports: HashMap<PortKey, PortTable>,
    clusters: Vec<ClusterTable>,
    workloads: Vec<Workload>,
    /// Canonical address (IPv4-mapped IPv6 as IPv4) → index into `workloads`.
    workload_by_address: HashMap<IpAddr, usize>,
    /// The AuthorizationPolicies the waypoint enforces (`authz`).
    policies: Vec<AuthorizationPolicy>,
}

/// One port of a bound service: its routes, compiled, in the configuration's order.
#[derive(Debug)]
pub struct PortTable {
    pub service: ServiceInfo,
    pub port: u16,
    pub protocol: Protocol,
    pub routes: Vec<Route>,
    /// Where a connection that is not HTTP goes; empty refuses it.
    pub tcp: Vec<WeightedCluster>,
}

/// One HTTP route: the configuration's, and its conditions compiled.
#[derive(Debug)]
pub struct Route {
    pub spec: HttpRoute,
    pub(crate) matches: Vec<Conditions>,
    pub(crate) edits: RouteEdits,
}

/// One [`RequestMatch`], compiled: every condition set must hold.
#[derive(Debug)]
pub(crate) struct Conditions {
    pub(crate) path: Option<PathCondition>,
    pub(crate) ignore_path_case: bool,
    pub(crate) method: Option<TextCondition>,
    pub(crate) authority: Option<TextCondition>,
    pub(crate) headers: Vec<HeaderCondition>,
    pub(crate) query_params: Vec<QueryCondition>,
    pub(crate) port: Option<u16>,
    pub(crate) source_namespace: Option<String>,
    pub(crate) source_labels: BTreeMap<String, String>,
}

#[derive(Debug)]
pub(crate) enum PathCondition {
    Exact(String),
    Prefix(String),
    /// The prefix without its trailing `/` (the Gateway API ignores it): `/foo/` is kept as
    /// `/foo`, and `/` as the empty string, which matches every path.
    SegmentPrefix(String),
    /// Anchored: matches the whole path.
    Regex(Regex),
}

/// A compiled [`StringMatch`]; a regex is anchored to the whole value.
#[derive(Debug)]
pub(crate) enum TextCondition {
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

#[derive(Debug)]
pub(crate) struct HeaderCondition {
    /// Lowercase; a pseudo-header (`:authority`, `:method`, `:path`, `:scheme`) names that part
    /// of the request.
    pub(crate) name: String,
    /// `None`: presence.
    pub(crate) value: Option<TextCondition>,
    pub(crate) invert: bool,
}

#[derive(Debug)]
pub(crate) struct QueryCondition {
    pub(crate) name: String,
    /// `None`: presence.
    pub(crate) value: Option<TextCondition>,
}

impl RouteTable {
    /// Validates `config` (again: it is cheap, and a table must never hold an invalid one) and
    /// compiles it. Any error refuses the configuration whole.
    pub fn new(config: WaypointConfig) -> Result<RouteTable, TableError> {
        config.validate()?;
        let WaypointConfig {
            waypoint,
            trust_domain,
            services,
            clusters,
            workloads,
            policies,
            ..
        } = config;
        let mut ports = HashMap::new();
        for (i, service) in services.into_iter().enumerate() {
            let info = ServiceInfo {
                id: service.id,
                hostname: service.hostname,
                namespace: service.namespace,
                name: service.name,
            };
            for (j, port) in service.ports.into_iter().enumerate() {
                let field = format!("services[{i}].ports[{j}]");
                let mut routes = Vec::with_capacity(port.http.len());
                for (k, route) in port.http.into_iter().enumerate() {
                    routes.push(Route::compile(&format!("{field}.http[{k}]"), route)?);
                }
                let key = PortKey {
                    service_id: info.id,
                    port: port.port,
                };
                let table = PortTable {
                    service: info.clone(),
                    port: port.port,
                    protocol: port.protocol,
                    routes,
                    tcp: port.tcp,
                };
                ports.insert(key, table);
            }
        }
        let workload_by_address = index_workloads(&workloads)?;
        Ok(RouteTable {
            waypoint,
            trust_domain,
            ports,
            clusters: clusters.into_iter().map(ClusterTable::new).collect(),
            workloads,
            workload_by_address,
            policies,
        })
    }

    /// The routes of the service port a connection was going to; `None`: not served here.
    pub fn port(&self, key: PortKey) -> Option<&PortTable> {
        self.ports.get(&key)
    }

    /// A cluster by the index routes name it by.
    pub fn cluster(&self, index: u32) -> Option<&ClusterTable> {
        self.clusters.get(usize::try_from(index).ok()?)
    }

    /// The workload a connection comes from, by its source address (an IPv4-mapped IPv6 address
    /// is looked up as the IPv4 address it maps).
    pub fn workload(&self, address: IpAddr) -> Option<&Workload> {
        let index = *self.workload_by_address.get(&canonical_address(address))?;
        self.workloads.get(index)
    }

    /// The AuthorizationPolicies of the configuration.
    pub fn policies(&self) -> &[AuthorizationPolicy] {
        &self.policies
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn waypoint(&self) -> &WaypointName {
        &self.waypoint
    }
}

fn index_workloads(workloads: &[Workload]) -> Result<HashMap<IpAddr, usize>, TableError> {
    let mut by_address = HashMap::new();
    for (index, workload) in workloads.iter().enumerate() {
        for &address in &workload.addresses {
            let address = canonical_address(address);
            match by_address.insert(address, index) {
                // A workload may list an address twice (or as IPv4 and IPv4-mapped): harmless.
                Some(first) if first != index => {
                    let name = |w: &Workload| format!("{}/{}", w.namespace, w.name);
                    return Err(TableError::AddressClaimedTwice {
                        address,
                        first,
                        first_name: name(&workloads[first]),
                        second: index,
                        second_name: name(workload),
                    });
                }
                _ => {}
            }
        }
    }
    Ok(by_address)
}

impl Route {
    fn compile(field: &str, spec: HttpRoute) -> Result<Route, TableError> {
        let mut matches = Vec::with_capacity(spec.matches.len());
        for (m, request_match) in spec.matches.iter().enumerate() {
            matches.push(Conditions::compile(
                &format!("{field}.matches[{m}]"),
                request_match,
            )?);
        }
        let edits = compile_edits(field, &spec)?;
        Ok(Route {
            spec,
            matches,
            edits,
        })
    }
}

/// The route's header operations, rewrites and redirect, compiled.
fn compile_edits(field: &str, spec: &HttpRoute) -> Result<RouteEdits, TableError> {
    let mut edits = RouteEdits {
        request_headers: HeaderEdits::compile(
            &format!("{field}.requestHeaders"),
            &spec.request_headers,
        )?,
        response_headers: HeaderEdits::compile(
            &format!("{field}.responseHeaders"),
            &spec.response_headers,
        )?,
        ..RouteEdits::default()
    };
    match &spec.action {
        RouteAction::Forward(destinations) => {
            for (i, d) in destinations.iter().enumerate() {
                let field = format!("{field}.action.forward[{i}]");
                edits.destinations.push((
                    HeaderEdits::compile(&format!("{field}.requestHeaders"), &d.request_headers)?,
                    HeaderEdits::compile(&format!("{field}.responseHeaders"), &d.response_headers)?,
                ));
            }
        }
        RouteAction::Redirect(redirect) => {
            let field = format!("{field}.action.redirect");
            if let Some(host) = &redirect.authority {
                check_host(&format!("{field}.authority"), host)?;
            }
            edits.redirect_path = redirect
                .path
                .as_ref()
                .map(|p| PathRewriter::compile(&format!("{field}.path"), p))
                .transpose()?;
        }
        RouteAction::DirectResponse(_) => {}
    }
    if let Some(rewrite) = &spec.rewrite {
        let field = format!("{field}.rewrite");
        edits.path_rewrite = rewrite
            .path
            .as_ref()
            .map(|p| PathRewriter::compile(&format!("{field}.path"), p))
            .transpose()?;
        edits.authority_rewrite = rewrite
            .authority
            .as_ref()
            .map(|a| authority_value(&format!("{field}.authority"), a))
            .transpose()?;
    }
    Ok(edits)
}

/// A host name without port, as a redirect's authority must be.
fn check_host(field: &str, host: &str) -> Result<(), TableError> {
    match host.parse::<http::uri::Authority>() {
        Ok(a) if a.port().is_none() && !host.contains('@') => Ok(()),
        _ => Err(TableError::Unusable {
            field: field.to_owned(),
            problem: format!("{host:?} is not a host name without port"),
        }),
    }
}

/// A `Host` value: an authority (`host` or `host:port`).
fn authority_value(field: &str, authority: &str) -> Result<http::HeaderValue, TableError> {
    let unusable = || TableError::Unusable {
        field: field.to_owned(),
        problem: format!("{authority:?} is not a URI authority"),
    };
    authority
        .parse::<http::uri::Authority>()
        .map_err(|_| unusable())?;
    http::HeaderValue::from_str(authority).map_err(|_| unusable())
}

impl Conditions {
    fn compile(field: &str, m: &RequestMatch) -> Result<Conditions, TableError> {
        let path = match &m.path {
            None => None,
            Some(PathMatch::Exact(p)) => Some(PathCondition::Exact(p.clone())),
            Some(PathMatch::Prefix(p)) => Some(PathCondition::Prefix(p.clone())),
            Some(PathMatch::SegmentPrefix(p)) => Some(PathCondition::SegmentPrefix(
                p.trim_end_matches('/').to_owned(),
            )),
            Some(PathMatch::Regex(r)) => Some(PathCondition::Regex(compile_anchored(
                &format!("{field}.path"),
                r,
            )?)),
        };
        let text = |name: &str, value: &Option<StringMatch>| {
            value
                .as_ref()
                .map(|v| TextCondition::compile(&format!("{field}.{name}"), v))
                .transpose()
        };
        let mut headers = Vec::with_capacity(m.headers.len());
        for (
            h,
            HeaderMatch {
                name,
                value,
                invert,
            },
        ) in m.headers.iter().enumerate()
        {
            headers.push(HeaderCondition {
                name: name.clone(),
                value: text(&format!("headers[{h}].value"), value)?,
                invert: *invert,
            });
        }
        let mut query_params = Vec::with_capacity(m.query_params.len());
        for (q, QueryParamMatch { name, value }) in m.query_params.iter().enumerate() {
            query_params.push(QueryCondition {
                name: name.clone(),
                value: text(&format!("queryParams[{q}].value"), value)?,
            });
        }
        Ok(Conditions {
            path,
            ignore_path_case: m.ignore_path_case,
            method: text("method", &m.method)?,
            authority: text("authority", &m.authority)?,
            headers,
            query_params,
            port: m.port,
            source_namespace: m.source_namespace.clone(),
            source_labels: m.source_labels.clone(),
        })
    }
}

impl TextCondition {
    fn compile(field: &str, m: &StringMatch) -> Result<TextCondition, TableError> {
        Ok(match m {
            StringMatch::Exact(s) => TextCondition::Exact(s.clone()),
            StringMatch::Prefix(s) => TextCondition::Prefix(s.clone()),
            StringMatch::Regex(r) => TextCondition::Regex(compile_anchored(field, r)?),
        })
    }
}

/// Compiles `pattern` to match a whole value, as Istio's and the Gateway API's regex matches do.
pub(crate) fn compile_anchored(field: &str, pattern: &str) -> Result<Regex, TableError> {
    // The pattern is compiled alone first: one that compiles alone has balanced groups, so it
    // cannot close the group it is wrapped in (`a)|(b` would otherwise become `^(?:a)|(b)$`,
    // anchored on neither side).
    compile_unanchored(field, pattern)?;
    Regex::new(&format!("^(?:{pattern})$")).map_err(|e| regex_error(field, pattern, e))
}

/// Compiles `pattern` as written: it matches anywhere in a value (a path rewrite's pattern).
pub(crate) fn compile_unanchored(field: &str, pattern: &str) -> Result<Regex, TableError> {
    Regex::new(pattern).map_err(|e| regex_error(field, pattern, e))
}

fn regex_error(field: &str, pattern: &str, error: regex::Error) -> TableError {
    TableError::Regex {
        field: field.to_owned(),
        pattern: pattern.to_owned(),
        error: error.to_string(),
    }
}

#[cfg(test)]
pub(crate) mod tests;
