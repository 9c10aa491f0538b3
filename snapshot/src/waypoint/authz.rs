//! AuthorizationPolicies the waypoint enforces (issue #11): the policies whose `targetRefs` name
//! the waypoint's Gateway or a service bound to it, as Istio's proto spells them, restricted to
//! the attributes the waypoint evaluates. The compiler reports what it cannot express and never
//! writes it here; CUSTOM and AUDIT policies are not compiled.
//!
//! Evaluation (Istio's order): a request any DENY policy's rule matches is denied; else, when an
//! ALLOW policy applies to the request's service, it is allowed only if one of their rules
//! matches; else it is allowed. A rule matches when every non-empty field of its `from`, `to` and
//! `when` matches (any entry of a list, every field of an entry; a `not_*` field excludes).
//!
//! Strings match as Istio's do: exact, `abc*` (prefix), `*abc` (suffix), `*` (present).
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// One AuthorizationPolicy, compiled for this waypoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicy {
    /// Where it came from: `namespace/name`.
    pub name: String,
    pub action: PolicyAction,
    pub applies_to: PolicyTarget,
    /// Any of these matches (none: the policy matches no request).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<Rule>,
}

/// The actions the waypoint enforces (CUSTOM and AUDIT are reported by the compiler).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum PolicyAction {
    Allow,
    Deny,
}

/// The requests a policy applies to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum PolicyTarget {
    /// Every service of the waypoint (`targetRefs` naming its Gateway).
    Waypoint,
    /// These services, by id (`targetRefs` naming Services bound to the waypoint); not empty.
    Services(Vec<u32>),
}

/// A rule: every non-empty part holds. A rule with every part empty matches every request.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    /// Any of these matches the client.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<Source>,
    /// Any of these matches the request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<Operation>,
    /// Every one holds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<Condition>,
}

/// Who the client is: every non-empty field holds. Principals are spelled without `spiffe://`
/// (`cluster.local/ns/default/sa/productpage`); a client that is not a workload of the mesh has
/// no principal and no namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<String>,
    /// Addresses or CIDR blocks (`10.0.0.0/8`, `fd00::1`) of the client.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_blocks: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ip_blocks: Vec<String>,
}

/// What the request is: every non-empty field holds. `hosts`, `methods` and `paths` are L7: they
/// never match a connection that is not HTTP (see [`Rule`] and the waypoint's `authz`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    /// The `Host`/`:authority`, compared without case.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_hosts: Vec<String>,
    /// The service port the client dialled.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ports: Vec<u16>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_methods: Vec<String>,
    /// The path without the query string.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<String>,
}

/// A `when` condition: the attribute is one of `values` (when set) and none of `not_values`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    pub key: ConditionKey,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_values: Vec<String>,
}

/// The `when` keys the waypoint evaluates.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ConditionKey {
    /// `request.headers[name]` (lowercase name; L7).
    RequestHeader(String),
    /// `source.ip`: values are addresses or CIDR blocks.
    SourceIp,
    /// `source.namespace`.
    SourceNamespace,
    /// `source.principal`.
    SourcePrincipal,
    /// `destination.port`: values are port numbers.
    DestinationPort,
}

/// An address or CIDR block (`10.0.0.0/8`, `10.0.0.1`, `fd00::/8`): the address and the prefix
/// length (the whole address when no `/len` is written). `None` when it is neither.
pub fn parse_cidr(text: &str) -> Option<(IpAddr, u8)> {
    let (address, len) = match text.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (text, None),
    };
    let address: IpAddr = address.parse().ok()?;
    let max = if address.is_ipv4() { 32 } else { 128 };
    let len = match len {
        Some(l) if !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()) => l.parse().ok()?,
        Some(_) => return None,
        None => max,
    };
    (len <= max).then_some((address, len))
}

/// Whether `address` is in the block `(network, len)` (both of one family; an IPv4-mapped
/// address is not an IPv4 one here: callers pass canonical addresses).
pub fn cidr_contains((network, len): (IpAddr, u8), address: IpAddr) -> bool {
    match (network, address) {
        (IpAddr::V4(n), IpAddr::V4(a)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            u32::from(n) & mask == u32::from(a) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(a)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            u128::from(n) & mask == u128::from(a) & mask
        }
        _ => false,
    }
}

/// Istio's string match of `pattern` against `value`: `*` (any value), `abc*` (prefix), `*abc`
/// (suffix), else exact.
pub fn istio_string_match(pattern: &str, value: &str) -> bool {
    if pattern == "*" {
        true
    } else if let Some(prefix) = pattern.strip_suffix('*') {
        value.starts_with(prefix)
    } else if let Some(suffix) = pattern.strip_prefix('*') {
        value.ends_with(suffix)
    } else {
        pattern == value
    }
}
