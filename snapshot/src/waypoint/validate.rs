//! What a waypoint configuration must satisfy before a waypoint uses it (its AuthorizationPolicies
//! included: their services exist, their address blocks and ports parse). Each error names the
//! field (`services[2].ports[0].http[1].action.forward[0].cluster`) and what is wrong with it.
//! Regular expressions are not compiled here (this crate has no regex engine): the waypoint compiles
//! them when it adopts a configuration and refuses it whole if one does not compile.
use std::collections::BTreeSet;

use super::{
    AuthorizationPolicy, Condition, ConditionKey, Operation, PolicyTarget, Source,
    authz::parse_cidr,
};
use super::{
    DirectResponse, Fault, HashKey, Header, HeaderMatch, HeaderOps, HttpRoute, LoadBalancer,
    Mirror, PathRewrite, Redirect, RouteAction, Service, ServicePort, WAYPOINT_CONFIG_VERSION,
    WaypointConfig, WeightedCluster,
};

#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum WaypointConfigError {
    #[error("waypoint configuration of {len} bytes is larger than the {max} bytes accepted")]
    TooLarge { len: usize, max: usize },
    #[error("waypoint configuration is not valid JSON for this version: {0}")]
    Json(String),
    #[error("waypoint configuration version {found}, this waypoint reads {expected}")]
    Version { found: u32, expected: u32 },
    #[error("{field}: {problem}")]
    Invalid { field: String, problem: String },
}

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> WaypointConfigError {
    WaypointConfigError::Invalid {
        field: field.into(),
        problem: problem.into(),
    }
}

impl WaypointConfig {
    /// Checks every reference and value range. The first problem found is returned.
    pub fn validate(&self) -> Result<(), WaypointConfigError> {
        if self.version != WAYPOINT_CONFIG_VERSION {
            return Err(WaypointConfigError::Version {
                found: self.version,
                expected: WAYPOINT_CONFIG_VERSION,
            });
        }
        let clusters = self.clusters.len();
        let mut ids = BTreeSet::new();
        for (i, service) in self.services.iter().enumerate() {
            let field = format!("services[{i}]");
            if !ids.insert(service.id) {
                return Err(invalid(
                    format!("{field}.id"),
                    format!("service id {} appears twice", service.id),
                ));
            }
            check_service(&field, service, clusters)?;
        }
        for (i, cluster) in self.clusters.iter().enumerate() {
            let field = format!("clusters[{i}]");
            if let LoadBalancer::ConsistentHash(key) = &cluster.load_balancer {
                let name = match key {
                    HashKey::Header(name) => Some(name),
                    HashKey::Cookie(cookie) => Some(&cookie.name),
                    HashKey::QueryParameter(name) => Some(name),
                    HashKey::SourceIp => None,
                };
                if name.is_some_and(|n| n.is_empty()) {
                    return Err(invalid(
                        format!("{field}.loadBalancer.consistentHash"),
                        "the hash key's name is empty",
                    ));
                }
                if let HashKey::Header(name) = key {
                    check_header_name(&format!("{field}.loadBalancer.consistentHash"), name)?;
                }
            }
        }
        for (i, policy) in self.policies.iter().enumerate() {
            check_policy(&format!("policies[{i}]"), policy, &ids)?;
        }
        Ok(())
    }
}

fn check_policy(
    field: &str,
    policy: &AuthorizationPolicy,
    services: &BTreeSet<u32>,
) -> Result<(), WaypointConfigError> {
    if policy.name.is_empty() {
        return Err(invalid(format!("{field}.name"), "the name is empty"));
    }
    if let PolicyTarget::Services(ids) = &policy.applies_to {
        if ids.is_empty() {
            return Err(invalid(
                format!("{field}.appliesTo.services"),
                "no service: a policy for no service is not written",
            ));
        }
        for (j, id) in ids.iter().enumerate() {
            if !services.contains(id) {
                return Err(invalid(
                    format!("{field}.appliesTo.services[{j}]"),
                    format!("service id {id} is not a service of this waypoint"),
                ));
            }
        }
    }
    for (r, rule) in policy.rules.iter().enumerate() {
        let field = format!("{field}.rules[{r}]");
        for (f, source) in rule.from.iter().enumerate() {
            check_source(&format!("{field}.from[{f}]"), source)?;
        }
        for (t, operation) in rule.to.iter().enumerate() {
            check_operation(&format!("{field}.to[{t}]"), operation)?;
        }
        for (w, condition) in rule.when.iter().enumerate() {
            check_condition(&format!("{field}.when[{w}]"), condition)?;
        }
    }
    Ok(())
}

fn check_source(field: &str, source: &Source) -> Result<(), WaypointConfigError> {
    let Source {
        principals,
        not_principals,
        namespaces,
        not_namespaces,
        ip_blocks,
        not_ip_blocks,
    } = source;
    let lists = [
        principals,
        not_principals,
        namespaces,
        not_namespaces,
        ip_blocks,
        not_ip_blocks,
    ];
    if lists.iter().all(|l| l.is_empty()) {
        return Err(invalid(field, "a source sets no field"));
    }
    check_cidrs(&format!("{field}.ipBlocks"), ip_blocks)?;
    check_cidrs(&format!("{field}.notIpBlocks"), not_ip_blocks)
}

fn check_operation(field: &str, operation: &Operation) -> Result<(), WaypointConfigError> {
    let Operation {
        hosts,
        not_hosts,
        ports,
        not_ports,
        methods,
        not_methods,
        paths,
        not_paths,
    } = operation;
    let strings = [hosts, not_hosts, methods, not_methods, paths, not_paths];
    if strings.iter().all(|l| l.is_empty()) && ports.is_empty() && not_ports.is_empty() {
        return Err(invalid(field, "an operation sets no field"));
    }
    for (list, ports) in [("ports", ports), ("notPorts", not_ports)] {
        if let Some(k) = ports.iter().position(|p| *p == 0) {
            return Err(invalid(format!("{field}.{list}[{k}]"), "port 0"));
        }
    }
    Ok(())
}

fn check_condition(field: &str, condition: &Condition) -> Result<(), WaypointConfigError> {
    if condition.values.is_empty() && condition.not_values.is_empty() {
        return Err(invalid(field, "neither values nor notValues is set"));
    }
    let lists = [
        ("values", &condition.values),
        ("notValues", &condition.not_values),
    ];
    match &condition.key {
        ConditionKey::RequestHeader(name) => {
            check_header_name(&format!("{field}.key.requestHeader"), name)?
        }
        ConditionKey::SourceIp => {
            for (list, values) in lists {
                check_cidrs(&format!("{field}.{list}"), values)?;
            }
        }
        ConditionKey::DestinationPort => {
            for (list, values) in lists {
                for (k, v) in values.iter().enumerate() {
                    if !v.parse::<u16>().is_ok_and(|p| p != 0) {
                        return Err(invalid(
                            format!("{field}.{list}[{k}]"),
                            format!("{v:?} is not a port from 1 to 65535"),
                        ));
                    }
                }
            }
        }
        ConditionKey::SourceNamespace | ConditionKey::SourcePrincipal => {}
    }
    Ok(())
}

fn check_cidrs(field: &str, values: &[String]) -> Result<(), WaypointConfigError> {
    for (k, v) in values.iter().enumerate() {
        if parse_cidr(v).is_none() {
            return Err(invalid(
                format!("{field}[{k}]"),
                format!("{v:?} is not an IP address or CIDR block"),
            ));
        }
    }
    Ok(())
}

fn check_service(
    field: &str,
    service: &Service,
    clusters: usize,
) -> Result<(), WaypointConfigError> {
    let mut ports = BTreeSet::new();
    for (j, port) in service.ports.iter().enumerate() {
        let field = format!("{field}.ports[{j}]");
        if !ports.insert(port.port) {
            return Err(invalid(
                format!("{field}.port"),
                format!("port {} appears twice", port.port),
            ));
        }
        check_port(&field, port, clusters)?;
    }
    Ok(())
}

fn check_port(field: &str, port: &ServicePort, clusters: usize) -> Result<(), WaypointConfigError> {
    for (k, route) in port.http.iter().enumerate() {
        check_route(&format!("{field}.http[{k}]"), route, clusters)?;
    }
    check_weighted(&format!("{field}.tcp"), &port.tcp, clusters, true)
}

fn check_route(field: &str, route: &HttpRoute, clusters: usize) -> Result<(), WaypointConfigError> {
    for (m, request_match) in route.matches.iter().enumerate() {
        for (h, header) in request_match.headers.iter().enumerate() {
            check_header_match(&format!("{field}.matches[{m}].headers[{h}]"), header)?;
        }
    }
    match &route.action {
        RouteAction::Forward(destinations) => check_weighted(
            &format!("{field}.action.forward"),
            destinations,
            clusters,
            false,
        )?,
        RouteAction::Redirect(redirect) => {
            check_redirect(&format!("{field}.action.redirect"), redirect)?
        }
        RouteAction::DirectResponse(DirectResponse { status, .. }) => {
            check_status(&format!("{field}.action.directResponse.status"), *status)?
        }
    }
    check_header_ops(&format!("{field}.requestHeaders"), &route.request_headers)?;
    check_header_ops(&format!("{field}.responseHeaders"), &route.response_headers)?;
    if let Some(rewrite) = &route.rewrite
        && let Some(path) = &rewrite.path
    {
        check_path_rewrite(&format!("{field}.rewrite.path"), path)?;
    }
    if let Some(retries) = &route.retries {
        for (r, code) in retries.retriable_status_codes.iter().enumerate() {
            check_status(&format!("{field}.retries.retriableStatusCodes[{r}]"), *code)?;
        }
    }
    if let Some(fault) = &route.fault {
        check_fault(&format!("{field}.fault"), fault)?;
    }
    for (i, Mirror { cluster, percent }) in route.mirrors.iter().enumerate() {
        let field = format!("{field}.mirrors[{i}]");
        check_cluster(&format!("{field}.cluster"), *cluster, clusters)?;
        check_percent(&format!("{field}.percent"), *percent)?;
    }
    Ok(())
}

/// Weighted destinations: every cluster exists and the total weight is positive and fits a u32
/// (an empty list is allowed only where it means "refuse": a port's `tcp`).
fn check_weighted(
    field: &str,
    destinations: &[WeightedCluster],
    clusters: usize,
    may_be_empty: bool,
) -> Result<(), WaypointConfigError> {
    if destinations.is_empty() {
        return if may_be_empty {
            Ok(())
        } else {
            Err(invalid(field, "no destination"))
        };
    }
    let mut total: u64 = 0;
    for (i, destination) in destinations.iter().enumerate() {
        let field = format!("{field}[{i}]");
        check_cluster(&format!("{field}.cluster"), destination.cluster, clusters)?;
        check_header_ops(
            &format!("{field}.requestHeaders"),
            &destination.request_headers,
        )?;
        check_header_ops(
            &format!("{field}.responseHeaders"),
            &destination.response_headers,
        )?;
        total += u64::from(destination.weight);
    }
    if total == 0 {
        return Err(invalid(field, "every weight is 0"));
    }
    if total > u64::from(u32::MAX) {
        return Err(invalid(
            field,
            format!("the weights add up to {total}, more than 2^32 - 1"),
        ));
    }
    Ok(())
}

fn check_cluster(field: &str, cluster: u32, clusters: usize) -> Result<(), WaypointConfigError> {
    if usize::try_from(cluster).is_ok_and(|c| c < clusters) {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("cluster {cluster} does not exist ({clusters} clusters)"),
        ))
    }
}

fn check_redirect(field: &str, redirect: &Redirect) -> Result<(), WaypointConfigError> {
    if ![301, 302, 303, 307, 308].contains(&redirect.status) {
        return Err(invalid(
            format!("{field}.status"),
            format!(
                "{} is not a redirect status (301, 302, 303, 307, 308)",
                redirect.status
            ),
        ));
    }
    if let Some(scheme) = &redirect.scheme
        && scheme != "http"
        && scheme != "https"
    {
        return Err(invalid(
            format!("{field}.scheme"),
            format!("{scheme:?} is not http or https"),
        ));
    }
    match &redirect.path {
        Some(path) => check_path_rewrite(&format!("{field}.path"), path),
        None => Ok(()),
    }
}

fn check_path_rewrite(field: &str, rewrite: &PathRewrite) -> Result<(), WaypointConfigError> {
    match rewrite {
        PathRewrite::Full(path) if !path.starts_with('/') => {
            Err(invalid(field, format!("{path:?} does not start with /")))
        }
        PathRewrite::Regex(regex) if regex.pattern.is_empty() => {
            Err(invalid(field, "the pattern is empty"))
        }
        _ => Ok(()),
    }
}

fn check_fault(field: &str, fault: &Fault) -> Result<(), WaypointConfigError> {
    if let Some(delay) = &fault.delay {
        check_percent(&format!("{field}.delay.percent"), delay.percent)?;
    }
    if let Some(abort) = &fault.abort {
        check_percent(&format!("{field}.abort.percent"), abort.percent)?;
        check_status(&format!("{field}.abort.status"), abort.status)?;
    }
    Ok(())
}

fn check_percent(field: &str, percent: f64) -> Result<(), WaypointConfigError> {
    if (0.0..=100.0).contains(&percent) {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("{percent} is not a percentage from 0 to 100"),
        ))
    }
}

fn check_status(field: &str, status: u16) -> Result<(), WaypointConfigError> {
    if (200..=599).contains(&status) {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("{status} is not an HTTP status from 200 to 599"),
        ))
    }
}

fn check_header_ops(field: &str, ops: &HeaderOps) -> Result<(), WaypointConfigError> {
    for (i, name) in ops.remove.iter().enumerate() {
        check_header_name(&format!("{field}.remove[{i}]"), name)?;
    }
    for (list, headers) in [("set", &ops.set), ("add", &ops.add)] {
        for (i, Header { name, value }) in headers.iter().enumerate() {
            check_header_name(&format!("{field}.{list}[{i}].name"), name)?;
            if value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
                return Err(invalid(
                    format!("{field}.{list}[{i}].value"),
                    "a header value may not hold CR, LF or NUL",
                ));
            }
        }
    }
    Ok(())
}

fn check_header_match(field: &str, header: &HeaderMatch) -> Result<(), WaypointConfigError> {
    check_header_name(&format!("{field}.name"), &header.name)
}

/// A header name is a non-empty lowercase HTTP token (RFC 9110 `tchar`s), or an HTTP/2
/// pseudo-header (`:authority`).
fn check_header_name(field: &str, name: &str) -> Result<(), WaypointConfigError> {
    let token = name.strip_prefix(':').unwrap_or(name);
    let tchar =
        |b: u8| b.is_ascii_digit() || b.is_ascii_lowercase() || b"!#$%&'*+-.^_`|~".contains(&b);
    if token.is_empty() || !token.bytes().all(tchar) {
        return Err(invalid(
            field,
            format!("{name:?} is not a lowercase HTTP header name"),
        ));
    }
    Ok(())
}
