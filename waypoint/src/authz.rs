//! AuthorizationPolicy, as the waypoint enforces it: given the policies of its configuration, the
//! service and port a connection was going to, its client and (for HTTP) the request head,
//! [`authorize`] says allow or deny. Pure: nothing here does I/O, and nothing panics on a
//! configuration that passed validation.
//!
//! Istio's order (`authorization_policy.proto`): any DENY policy with a matching rule denies; else,
//! when any ALLOW policy applies to the service, the request is allowed only if one of their rules
//! matches; else it is allowed. A rule matches when each of its non-empty parts does: any entry of
//! `from` and of `to`, every entry of `when`; within an entry every non-empty field holds, a
//! `not_*` field holding when nothing in it matches.
//!
//! Who the client is comes from its source address (`identity`): a client that is no workload of
//! the mesh has no principal and no namespace, so `principals`, `namespaces` and the
//! `source.principal`/`source.namespace` `values` never match it, and their `not_*` forms always
//! do (nothing it has is in them).
//!
//! A connection that is not HTTP has no request: it is judged as Istio judges a TCP connection with
//! policies written for HTTP (istio-semantics.md §7, the same rules as ztunnel's and Envoy's
//! network RBAC filter): an ALLOW rule with any L7 attribute (`hosts`, `methods`, `paths`, their
//! `not_*` forms, a `request.headers` condition) never matches it, so an ALLOW policy with only
//! such rules denies TCP; a DENY rule has its L7 fields ignored and keeps its L4 remainder, except
//! that a `to` entry or `when` condition that had only L7 fields never matches (the rule is a
//! no-op for TCP rather than a deny of everything).
//!
//! Other choices, as Envoy's RBAC makes them for Istio:
//! - `hosts` compare the `:authority`/`Host` without case, with or without its `:port`;
//! - `paths` compare the path without its query string; `methods` compare exactly;
//! - a header sent several times is compared as its values joined with `,`; an absent header (or
//!   one that is not UTF-8) matches no value, presence (`*`) included;
//! - `ports` and `destination.port` are the service port the client dialled.
use std::net::IpAddr;

use kmesh_snapshot::waypoint::{
    AuthorizationPolicy, Condition, ConditionKey, Operation, PolicyAction, PolicyTarget, Rule,
    Source, cidr_contains, istio_string_match, parse_cidr,
};

use crate::{identity::Client, matching::RequestHead, table::RouteTable};

/// What a connection or request is, as policies read it.
#[derive(Clone, Copy, Debug)]
pub struct Subject<'a> {
    /// The service id the kernel marked the connection with.
    pub service_id: u32,
    /// The service port the client dialled.
    pub port: u16,
    pub client: &'a Client<'a>,
    /// The principal of the client (`None`: not a workload).
    pub principal: Option<&'a str>,
    /// `None`: a connection that is not HTTP.
    pub request: Option<&'a RequestHead<'a>>,
}

/// The verdict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Denied by this DENY policy (its name).
    DeniedBy(String),
    /// ALLOW policies apply to the service and none of their rules matches.
    NotAllowed,
}

impl Decision {
    pub fn allowed(&self) -> bool {
        matches!(self, Decision::Allow)
    }
}

/// The verdict of `table`'s policies on a connection from `client` to the service port
/// (`service_id`, `port`), with its request head when it is HTTP.
pub fn authorize_in(
    table: &RouteTable,
    service_id: u32,
    port: u16,
    client: &Client<'_>,
    request: Option<&RequestHead<'_>>,
) -> Decision {
    if table.policies().is_empty() {
        return Decision::Allow;
    }
    let principal = client.principal(table.trust_domain());
    let subject = Subject {
        service_id,
        port,
        client,
        principal: principal.as_ref().map(|p| p.as_str()),
        request,
    };
    authorize(table.policies(), &subject)
}

/// Istio's evaluation of `policies` for `subject`.
pub fn authorize(policies: &[AuthorizationPolicy], subject: &Subject<'_>) -> Decision {
    let applying = || {
        policies.iter().filter(|p| match &p.applies_to {
            PolicyTarget::Waypoint => true,
            PolicyTarget::Services(ids) => ids.contains(&subject.service_id),
        })
    };
    if let Some(deny) = applying()
        .filter(|p| p.action == PolicyAction::Deny)
        .find(|p| policy_matches(p, subject))
    {
        return Decision::DeniedBy(deny.name.clone());
    }
    let mut allows = applying()
        .filter(|p| p.action == PolicyAction::Allow)
        .peekable();
    if allows.peek().is_none() {
        return Decision::Allow;
    }
    if allows.any(|p| policy_matches(p, subject)) {
        Decision::Allow
    } else {
        Decision::NotAllowed
    }
}

fn policy_matches(policy: &AuthorizationPolicy, subject: &Subject<'_>) -> bool {
    policy.rules.iter().any(|rule| {
        if subject.request.is_none() && policy.action == PolicyAction::Allow && has_l7(rule) {
            return false;
        }
        rule_matches(rule, subject)
    })
}

/// Whether a rule names an attribute only a request has.
fn has_l7(rule: &Rule) -> bool {
    rule.to.iter().any(operation_has_l7)
        || rule
            .when
            .iter()
            .any(|c| matches!(c.key, ConditionKey::RequestHeader(_)))
}

fn operation_has_l7(o: &Operation) -> bool {
    [
        &o.hosts,
        &o.not_hosts,
        &o.methods,
        &o.not_methods,
        &o.paths,
        &o.not_paths,
    ]
    .iter()
    .any(|l| !l.is_empty())
}

fn rule_matches(rule: &Rule, subject: &Subject<'_>) -> bool {
    (rule.from.is_empty() || rule.from.iter().any(|s| source_matches(s, subject)))
        && (rule.to.is_empty() || rule.to.iter().any(|o| operation_matches(o, subject)))
        && rule.when.iter().all(|c| condition_matches(c, subject))
}

/// `values` empty, or the attribute matches one of them.
fn any_of(values: &[String], attribute: Option<&str>) -> bool {
    values.is_empty() || attribute.is_some_and(|a| values.iter().any(|v| istio_string_match(v, a)))
}

/// The attribute matches none of `values` (an absent attribute matches none).
fn none_of(values: &[String], attribute: Option<&str>) -> bool {
    !attribute.is_some_and(|a| values.iter().any(|v| istio_string_match(v, a)))
}

fn in_blocks(blocks: &[String], address: IpAddr) -> bool {
    blocks
        .iter()
        .filter_map(|b| parse_cidr(b))
        .any(|block| cidr_contains(block, address))
}

fn source_matches(source: &Source, subject: &Subject<'_>) -> bool {
    let namespace = subject.client.workload.map(|w| w.namespace.as_str());
    let address = subject.client.address;
    any_of(&source.principals, subject.principal)
        && none_of(&source.not_principals, subject.principal)
        && any_of(&source.namespaces, namespace)
        && none_of(&source.not_namespaces, namespace)
        && (source.ip_blocks.is_empty() || in_blocks(&source.ip_blocks, address))
        && !in_blocks(&source.not_ip_blocks, address)
}

fn operation_matches(operation: &Operation, subject: &Subject<'_>) -> bool {
    let ports = (operation.ports.is_empty() || operation.ports.contains(&subject.port))
        && !operation.not_ports.contains(&subject.port);
    let Some(request) = subject.request else {
        // Not HTTP: the L7 fields are ignored, and an entry with nothing else never matches.
        let l4 = !operation.ports.is_empty() || !operation.not_ports.is_empty();
        return l4 && ports;
    };
    let path = Some(request.path);
    let method = Some(request.method.as_str());
    ports
        && hosts_match(&operation.hosts, request.authority, true)
        && hosts_match(&operation.not_hosts, request.authority, false)
        && any_of(&operation.methods, method)
        && none_of(&operation.not_methods, method)
        && any_of(&operation.paths, path)
        && none_of(&operation.not_paths, path)
}

/// `positive`: the list is empty or the authority is in it; else: the authority is not in it.
/// Compared without case, with and without the `:port`.
fn hosts_match(hosts: &[String], authority: Option<&str>, positive: bool) -> bool {
    if hosts.is_empty() {
        return true;
    }
    let found = authority.is_some_and(|authority| {
        let authority = authority.to_ascii_lowercase();
        let bare = match authority.rsplit_once(':') {
            Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
            _ => authority.as_str(),
        };
        hosts.iter().any(|h| {
            let h = h.to_ascii_lowercase();
            istio_string_match(&h, &authority) || istio_string_match(&h, bare)
        })
    });
    found == positive
}

fn condition_matches(condition: &Condition, subject: &Subject<'_>) -> bool {
    let Condition {
        key,
        values,
        not_values,
    } = condition;
    match key {
        ConditionKey::RequestHeader(name) => {
            let Some(request) = subject.request else {
                return false; // an L7-only condition never holds for a TCP connection
            };
            let joined = header_value(request, name);
            any_of(values, joined.as_deref()) && none_of(not_values, joined.as_deref())
        }
        ConditionKey::SourceIp => {
            let address = subject.client.address;
            (values.is_empty() || in_blocks(values, address)) && !in_blocks(not_values, address)
        }
        ConditionKey::SourceNamespace => {
            let namespace = subject.client.workload.map(|w| w.namespace.as_str());
            any_of(values, namespace) && none_of(not_values, namespace)
        }
        ConditionKey::SourcePrincipal => {
            any_of(values, subject.principal) && none_of(not_values, subject.principal)
        }
        ConditionKey::DestinationPort => {
            let port = |v: &String| v.parse::<u16>().ok() == Some(subject.port);
            (values.is_empty() || values.iter().any(port)) && !not_values.iter().any(port)
        }
    }
}

/// A header's values joined with `,`; `None`: absent, or not UTF-8.
fn header_value(request: &RequestHead<'_>, name: &str) -> Option<String> {
    let mut values = request.headers.get_all(name).iter().peekable();
    values.peek()?;
    let texts: Option<Vec<&str>> = values.map(|v| v.to_str().ok()).collect();
    Some(texts?.join(","))
}

#[cfg(test)]
mod tests;
