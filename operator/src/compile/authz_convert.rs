//! AuthorizationPolicy specs into their L4 form (`authz_rules.rs`), as istiod's ambient
//! conversion does (`convertAuthorizationPolicy`, `handleRule`), with the checks of the CRD
//! schema and of Istio's validation. Decided here:
//! - `targetRefs`, CUSTOM, AUDIT and dry-run policies are not node-enforced: reported, not bound
//!   (in DualEngine, `targetRefs` policies are the waypoint's: `waypoint_policies.rs` reports them);
//! - an invalid policy is rejected and still binds (by its selector, or, when even that cannot be
//!   read, every mesh workload of its namespace, all namespaces for the root namespace): its
//!   workloads fail closed;
//! - ALLOW: a rule with any L7 attribute is dropped whole (reported); the policy keeps binding
//!   even with no rule left, and then allows nothing;
//! - DENY: L7 fields are stripped (reported); an entry left empty never matches.
use std::collections::BTreeMap;

use kmesh_common::{authz::AuthzSourceKey, ip16};

use super::{
    Compiler,
    authz_rules::{Block, Clause, Match, Rule, StringMatch},
};
use crate::{
    diagnostics::ObjectRef,
    istio::{
        AuthorizationPolicy, AuthorizationPolicySpec, AuthorizationRule, Condition, Operation,
        PolicyBinding, Source,
    },
    kinds::Kind,
    validate::Invalid,
};

/// ALLOW or DENY: the actions a node enforces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Action {
    Allow,
    Deny,
}

/// Which workloads a policy binds, as its object says (the root namespace widens both in
/// `authorization.rs`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Binding {
    /// No selector: its namespace.
    Namespace,
    /// `selector.matchLabels`: the pods carrying all these labels.
    Selector(BTreeMap<String, String>),
    /// Even the selector could not be read: every mesh workload of its namespace.
    Unreadable,
}

/// The L4 form of a policy the node enforces.
#[derive(Clone, Debug)]
pub(super) struct L4Policy {
    pub action: Action,
    pub rules: Vec<Rule>,
    /// How many rules the object has (`rules.len()` of them kept).
    pub rules_total: usize,
    /// What was dropped or stripped, and why: for `kmeshctl`.
    pub dropped: Vec<String>,
}

/// An AuthorizationPolicy, as the node sees it.
#[derive(Clone, Debug)]
pub(super) enum ReadPolicy {
    Enforced(L4Policy),
    /// Invalid: the workloads it binds deny every connection.
    Uncompilable(String),
    /// Not node-enforced (reported): binds nothing.
    NotEnforced,
}

/// A policy and what the node does with it.
#[derive(Clone, Debug)]
pub(super) struct AuthzPolicy<'a> {
    pub object: ObjectRef,
    pub namespace: &'a str,
    pub binding: Binding,
    pub read: ReadPolicy,
}

/// L4 `when` keys (ztunnel's); every other known key needs L7.
const L4_WHEN_KEYS: [&str; 5] = [
    "source.ip",
    "source.namespace",
    "source.principal",
    "destination.ip",
    "destination.port",
];

/// Known `when` keys beyond ztunnel's L4 ones (L7, and the extended-channel trust domain): exact
/// names, and prefixes (`request.headers[...]`).
const L7_WHEN_KEYS: [&str; 7] = [
    "source.trustDomain",
    "remote.ip",
    "remote.port",
    "request.auth.principal",
    "request.auth.audiences",
    "request.auth.presenter",
    "connection.sni",
];
const L7_WHEN_PREFIXES: [&str; 3] = [
    "request.headers[",
    "request.auth.claims[",
    "experimental.envoy.filters.",
];

/// The trust domain of every mesh identity.
pub(super) const TRUST_DOMAIN: &str = "cluster.local";

fn invalid<T>(field: String, reason: impl Into<String>) -> Result<T, Invalid> {
    Err(Invalid {
        field,
        reason: reason.into(),
    })
}

impl<'a> Compiler<'a> {
    /// Every AuthorizationPolicy, read and reported once for all nodes.
    pub(super) fn authorization_policies(&mut self) -> Vec<AuthzPolicy<'a>> {
        let inputs: &'a crate::inputs::Inputs = self.inputs;
        inputs
            .authorization_policies
            .iter()
            .map(|p| self.read_authorization_policy(p))
            .collect()
    }

    fn read_authorization_policy(&mut self, p: &'a AuthorizationPolicy) -> AuthzPolicy<'a> {
        let object = ObjectRef::new(Kind::AuthorizationPolicy, Some(p.namespace()), p.name());
        let (binding, read) = self.classify(&object, p);
        if let ReadPolicy::Uncompilable(reason) = &read {
            let whom = binding_words(&binding, p.namespace(), &self.options.root_namespace);
            let field = reason.split_once(": ").map_or("", |(f, _)| f).to_string();
            let why = reason.split_once(": ").map_or(reason.as_str(), |(_, r)| r);
            self.reject(
                &object,
                &field,
                format!(
                    "{why}; fails closed: {whom} deny every inbound connection until it is fixed"
                ),
            );
        }
        AuthzPolicy {
            object,
            namespace: p.namespace(),
            binding,
            read,
        }
    }

    /// The binding and the L4 form of `p`, with the reports of what is not enforced.
    fn classify(&mut self, object: &ObjectRef, p: &AuthorizationPolicy) -> (Binding, ReadPolicy) {
        let uncompilable =
            |i: Invalid| ReadPolicy::Uncompilable(format!("{}: {}", i.field, i.reason));
        if let Some(reason) = &p.unreadable {
            let i = Invalid {
                field: "metadata".to_string(),
                reason: reason.clone(),
            };
            return (Binding::Unreadable, uncompilable(i));
        }
        let binding = match read_binding(&p.spec) {
            Ok(b) => b,
            Err(i) => return (Binding::Unreadable, uncompilable(i)),
        };
        let (binding, targets) = binding;
        if targets && !matches!(binding, Binding::Namespace) {
            let i = Invalid {
                field: "spec".to_string(),
                reason: "only one of targetRefs or selector can be set".to_string(),
            };
            return (binding, uncompilable(i));
        }
        if targets && self.mode == crate::crd::Mode::DualEngine {
            // The waypoint enforces it (`waypoint_policies.rs`, which reports what it cannot).
            return (binding, ReadPolicy::NotEnforced);
        }
        if targets {
            self.unenforced(
                object,
                "spec.targetRefs",
                "applies to waypoints (targetRefs), not node-enforced yet: binds no workload",
            );
            return (binding, ReadPolicy::NotEnforced);
        }
        let spec: AuthorizationPolicySpec = match from_spec(&p.spec) {
            Ok(s) => s,
            Err(i) => return (binding, uncompilable(i)),
        };
        let action = match spec.action.as_deref() {
            None | Some("ALLOW") => Action::Allow,
            Some("DENY") => Action::Deny,
            Some(a @ ("AUDIT" | "CUSTOM")) => {
                let reason = format!(
                    "action {a} is not enforced by the node (as in ztunnel): binds no workload"
                );
                self.unenforced(object, "spec.action", reason);
                return (binding, ReadPolicy::NotEnforced);
            }
            Some(other) => {
                let i = Invalid {
                    field: "spec.action".to_string(),
                    reason: format!("unknown action {other:?} (ALLOW, DENY, AUDIT or CUSTOM)"),
                };
                return (binding, uncompilable(i));
            }
        };
        if p.dry_run() {
            self.unenforced(
                object,
                "metadata.annotations[istio.io/dry-run]",
                "a dry-run policy is not enforced: binds no workload",
            );
            return (binding, ReadPolicy::NotEnforced);
        }
        match convert(&spec, action, p.namespace()) {
            Ok(policy) => {
                self.report_authz_l7(object, &policy);
                (binding, ReadPolicy::Enforced(policy))
            }
            Err(i) => (binding, uncompilable(i)),
        }
    }

    /// Reports what the L4 form left out of a policy.
    fn report_authz_l7(&mut self, object: &ObjectRef, policy: &L4Policy) {
        for dropped in &policy.dropped {
            let (field, reason) = dropped.split_once(": ").unwrap_or(("spec.rules", dropped));
            self.unenforced(object, field, reason.to_string());
        }
        if policy.action == Action::Allow && policy.rules.is_empty() && policy.rules_total > 0 {
            self.unenforced(
                object,
                "spec.rules",
                "every rule needs L7 and was dropped: the policy still binds and allows nothing, \
                 so its workloads deny what no other ALLOW policy allows",
            );
        }
    }
}

/// Whom a policy binds, in words, for the fail-closed message.
fn binding_words(binding: &Binding, namespace: &str, root: &str) -> String {
    let scope = if namespace == root {
        "all namespaces".to_string()
    } else {
        format!("namespace {namespace}")
    };
    match binding {
        Binding::Namespace => format!("all mesh workloads of {scope}"),
        Binding::Selector(_) => format!("the mesh workloads of {scope} its selector matches"),
        Binding::Unreadable => {
            format!("all mesh workloads of {scope} (its selector cannot be read)")
        }
    }
}

/// Deserializes a spec (`Null` is an empty spec), naming the field `spec`.
pub(super) fn from_spec<T: serde::de::DeserializeOwned + Default>(
    spec: &serde_json::Value,
) -> Result<T, Invalid> {
    if spec.is_null() {
        return Ok(T::default());
    }
    serde_json::from_value(spec.clone()).or_else(|e| {
        invalid(
            "spec".to_string(),
            format!("does not match its schema: {e}"),
        )
    })
}

/// The binding of a spec and whether it has targetRefs; an error when it cannot be read.
pub(super) fn read_binding(spec: &serde_json::Value) -> Result<(Binding, bool), Invalid> {
    let b: PolicyBinding = from_spec(spec)?;
    let targets = b.target_ref.is_some() || b.target_refs.as_ref().is_some_and(|t| !t.is_empty());
    let Some(selector) = b.selector else {
        return Ok((Binding::Namespace, targets));
    };
    for (k, v) in &selector.match_labels {
        let field = format!("spec.selector.matchLabels[{k}]");
        if k.is_empty() {
            return invalid(field, "key must not be empty");
        }
        if k.contains('*') {
            return invalid(field, "wildcard not allowed in label key match");
        }
        if v.contains('*') {
            return invalid(field, "wildcard not allowed in label value match");
        }
    }
    Ok((Binding::Selector(selector.match_labels), targets))
}

/// The L4 form of a valid spec, or the first invalid field.
pub(super) fn convert(
    spec: &AuthorizationPolicySpec,
    action: Action,
    namespace: &str,
) -> Result<L4Policy, Invalid> {
    let rules = spec.rules.as_deref().unwrap_or_default();
    let mut policy = L4Policy {
        action,
        rules: Vec::new(),
        rules_total: rules.len(),
        dropped: Vec::new(),
    };
    for (i, rule) in rules.iter().enumerate() {
        let field = format!("spec.rules[{i}]");
        let l7 = l7_fields(rule);
        let converted = convert_rule(&field, rule, namespace)?;
        if l7.is_empty() {
            policy.rules.push(converted.rule);
        } else if action == Action::Allow {
            policy.dropped.push(format!(
                "{field}: uses L7 attributes ({}): an ALLOW rule with any L7 attribute is dropped \
                 whole (as in ztunnel), so it allows nothing here",
                l7.join(", ")
            ));
        } else {
            let mut note = format!(
                "{field}: L7 attributes stripped ({}): the DENY rule keeps its L4 part, so it denies \
                 more (whatever the L7 values)",
                l7.join(", ")
            );
            if !converted.emptied.is_empty() {
                note.push_str(&format!(
                    "; {} left empty, so the rule can never match",
                    converted.emptied.join(", ")
                ));
            }
            policy.dropped.push(note);
            policy.rules.push(converted.rule);
        }
    }
    Ok(policy)
}

/// The L7 fields a rule uses, as paths relative to the rule.
fn l7_fields(rule: &AuthorizationRule) -> Vec<String> {
    let mut out = Vec::new();
    for (j, from) in rule.from.iter().flatten().enumerate() {
        if let Some(s) = &from.source {
            for (name, values) in source_l7(s) {
                if !values.is_empty() {
                    out.push(format!("from[{j}].source.{name}"));
                }
            }
        }
    }
    for (j, to) in rule.to.iter().flatten().enumerate() {
        if let Some(o) = &to.operation {
            for (name, values) in operation_l7(o) {
                if !values.is_empty() {
                    out.push(format!("to[{j}].operation.{name}"));
                }
            }
        }
    }
    for (j, c) in rule.when.iter().enumerate() {
        if !L4_WHEN_KEYS.contains(&c.key.as_str()) {
            out.push(format!("when[{j}] {}", c.key));
        }
    }
    out
}

/// Source fields beyond ztunnel's L4 attributes: L7 (request principals from a JWT, remote
/// addresses from forwarded headers) and trust domains (extended channel).
fn source_l7(s: &Source) -> [(&'static str, &Vec<String>); 6] {
    [
        ("requestPrincipals", &s.request_principals),
        ("notRequestPrincipals", &s.not_request_principals),
        ("remoteIpBlocks", &s.remote_ip_blocks),
        ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
        ("trustDomains", &s.trust_domains),
        ("notTrustDomains", &s.not_trust_domains),
    ]
}

fn operation_l7(o: &Operation) -> [(&'static str, &Vec<String>); 6] {
    [
        ("hosts", &o.hosts),
        ("notHosts", &o.not_hosts),
        ("methods", &o.methods),
        ("notMethods", &o.not_methods),
        ("paths", &o.paths),
        ("notPaths", &o.not_paths),
    ]
}

/// A converted rule, and the entries stripping left empty (paths relative to the rule).
struct ConvertedRule {
    rule: Rule,
    emptied: Vec<String>,
}

fn convert_rule(
    field: &str,
    rule: &AuthorizationRule,
    namespace: &str,
) -> Result<ConvertedRule, Invalid> {
    let mut clauses = Vec::new();
    let mut emptied = Vec::new();
    if let Some(from) = &rule.from {
        if from.is_empty() {
            return invalid(format!("{field}.from"), "`from` must not be empty");
        }
        let mut matches = Vec::new();
        for (j, f) in from.iter().enumerate() {
            let path = format!("{field}.from[{j}].source");
            let Some(source) = &f.source else {
                return invalid(path, "`from.source` must not be nil");
            };
            let m = source_match(&path, source, namespace)?;
            if m.is_empty() {
                emptied.push(format!("from[{j}]"));
            }
            matches.push(m);
        }
        clauses.push(Clause(matches));
    }
    if let Some(to) = &rule.to {
        if to.is_empty() {
            return invalid(format!("{field}.to"), "`to` must not be empty");
        }
        let mut matches = Vec::new();
        for (j, t) in to.iter().enumerate() {
            let path = format!("{field}.to[{j}].operation");
            let Some(operation) = &t.operation else {
                return invalid(path, "`to.operation` must not be nil");
            };
            let m = operation_match(&path, operation)?;
            if m.is_empty() {
                emptied.push(format!("to[{j}]"));
            }
            matches.push(m);
        }
        clauses.push(Clause(matches));
    }
    for (j, c) in rule.when.iter().enumerate() {
        let m = condition_match(&format!("{field}.when[{j}]"), c)?;
        if m.is_empty() {
            emptied.push(format!("when[{j}]"));
        }
        clauses.push(Clause(vec![m]));
    }
    Ok(ConvertedRule {
        rule: Rule(clauses),
        emptied,
    })
}

fn strings(values: &[String]) -> Vec<StringMatch> {
    values.iter().map(|v| StringMatch::parse(v)).collect()
}

/// Principals are compared without `spiffe://`.
fn principals(values: &[String]) -> Vec<StringMatch> {
    values
        .iter()
        .map(|v| StringMatch::parse(v.strip_prefix("spiffe://").unwrap_or(v)))
        .collect()
}

fn source_match(path: &str, s: &Source, namespace: &str) -> Result<Match, Invalid> {
    let all_empty = [
        &s.principals,
        &s.not_principals,
        &s.namespaces,
        &s.not_namespaces,
        &s.service_accounts,
        &s.not_service_accounts,
        &s.ip_blocks,
        &s.not_ip_blocks,
    ]
    .iter()
    .all(|v| v.is_empty())
        && source_l7(s).iter().all(|(_, v)| v.is_empty());
    if all_empty {
        return invalid(path.to_string(), "`from.source` must not be empty");
    }
    for (name, values) in source_l7(s) {
        if name.ends_with("IpBlocks") {
            blocks(&format!("{path}.{name}"), values)?;
        }
    }
    let accounts = !s.service_accounts.is_empty() || !s.not_service_accounts.is_empty();
    let identities = [
        &s.principals,
        &s.not_principals,
        &s.namespaces,
        &s.not_namespaces,
    ];
    if accounts && identities.iter().any(|v| !v.is_empty()) {
        return invalid(
            path.to_string(),
            "Cannot set serviceAccounts with namespaces or principals",
        );
    }
    let mut m = Match {
        namespaces: strings(&s.namespaces),
        not_namespaces: strings(&s.not_namespaces),
        principals: principals(&s.principals),
        not_principals: principals(&s.not_principals),
        source_ips: blocks(&format!("{path}.ipBlocks"), &s.ip_blocks)?,
        not_source_ips: blocks(&format!("{path}.notIpBlocks"), &s.not_ip_blocks)?,
        ..Default::default()
    };
    m.principals.extend(service_accounts(
        &format!("{path}.serviceAccounts"),
        &s.service_accounts,
        namespace,
    )?);
    m.not_principals.extend(service_accounts(
        &format!("{path}.notServiceAccounts"),
        &s.not_service_accounts,
        namespace,
    )?);
    Ok(m)
}

/// `ns/sa` or `sa` (the policy's namespace): the principal, matched exactly.
fn service_accounts(
    path: &str,
    values: &[String],
    namespace: &str,
) -> Result<Vec<StringMatch>, Invalid> {
    if values.len() > 16 {
        return invalid(
            path.to_string(),
            format!("at most 16 service accounts, found {}", values.len()),
        );
    }
    let mut out = Vec::new();
    for (k, v) in values.iter().enumerate() {
        let field = format!("{path}[{k}]");
        if v.contains('*') {
            return invalid(field, "wildcard is not supported in serviceAccounts");
        }
        let (ns, sa) = match v.split_once('/') {
            Some((ns, sa)) => (ns, sa),
            None => (namespace, v.as_str()),
        };
        if ns.is_empty() || sa.is_empty() || sa.contains('/') {
            return invalid(field, format!("{v:?} is not `namespace/name` or `name`"));
        }
        out.push(StringMatch::Exact(format!(
            "{TRUST_DOMAIN}/ns/{ns}/sa/{sa}"
        )));
    }
    Ok(out)
}

fn operation_match(path: &str, o: &Operation) -> Result<Match, Invalid> {
    let all_empty = o.ports.is_empty()
        && o.not_ports.is_empty()
        && operation_l7(o).iter().all(|(_, v)| v.is_empty());
    if all_empty {
        return invalid(path.to_string(), "`to.operation` must not be empty");
    }
    Ok(Match {
        destination_ports: ports(&format!("{path}.ports"), &o.ports)?,
        not_destination_ports: ports(&format!("{path}.notPorts"), &o.not_ports)?,
        ..Default::default()
    })
}

fn condition_match(path: &str, c: &Condition) -> Result<Match, Invalid> {
    let key_path = format!("{path}.key");
    if c.key.is_empty() {
        return invalid(key_path, "`key` must not be empty");
    }
    if c.values.is_empty() && c.not_values.is_empty() {
        return invalid(
            path.to_string(),
            format!(
                "at least one of values or notValues must be set for key {}",
                c.key
            ),
        );
    }
    let values = format!("{path}.values");
    let not_values = format!("{path}.notValues");
    let mut m = Match::default();
    match c.key.as_str() {
        "source.ip" => {
            m.source_ips = blocks(&values, &c.values)?;
            m.not_source_ips = blocks(&not_values, &c.not_values)?;
        }
        "destination.ip" => {
            m.destination_ips = blocks(&values, &c.values)?;
            m.not_destination_ips = blocks(&not_values, &c.not_values)?;
        }
        "destination.port" => {
            m.destination_ports = ports(&values, &c.values)?;
            m.not_destination_ports = ports(&not_values, &c.not_values)?;
        }
        "source.namespace" => {
            m.namespaces = strings(&c.values);
            m.not_namespaces = strings(&c.not_values);
        }
        "source.principal" => {
            m.principals = principals(&c.values);
            m.not_principals = principals(&c.not_values);
        }
        key if L7_WHEN_KEYS.contains(&key)
            || L7_WHEN_PREFIXES.iter().any(|p| key.starts_with(p)) =>
        {
            if key == "remote.ip" {
                blocks(&values, &c.values)?;
                blocks(&not_values, &c.not_values)?;
            }
        }
        key => return invalid(key_path, format!("unknown attribute {key:?}")),
    }
    Ok(m)
}

/// Ports `1..=65535`, written as strings.
fn ports(path: &str, values: &[String]) -> Result<Vec<u16>, Invalid> {
    values
        .iter()
        .enumerate()
        .map(|(k, v)| match v.trim().parse::<u16>() {
            Ok(p) if p != 0 => Ok(p),
            _ => invalid(
                format!("{path}[{k}]"),
                format!("port {v:?} must be between 1-65535"),
            ),
        })
        .collect()
}

fn blocks(path: &str, values: &[String]) -> Result<Vec<Block>, Invalid> {
    values
        .iter()
        .enumerate()
        .map(|(k, v)| {
            parse_block(v).ok_or_else(|| Invalid {
                field: format!("{path}[{k}]"),
                reason: format!("{v:?} is not an IP address or CIDR block"),
            })
        })
        .collect()
}

/// An address or CIDR block in the sources table's form, masked to its prefix.
pub(super) fn parse_block(text: &str) -> Option<Block> {
    let (addr, len) = match text.split_once('/') {
        Some((a, l)) => (a, Some(l.parse::<u32>().ok()?)),
        None => (text, None),
    };
    let ip: std::net::IpAddr = addr.parse().ok()?;
    let (max, offset) = if ip.is_ipv4() { (32, 96) } else { (128, 0) };
    let len = len.unwrap_or(max);
    if len > max {
        return None;
    }
    let prefix_len = len + offset;
    let mut bytes = ip16(ip);
    for (i, byte) in bytes.iter_mut().enumerate() {
        let bit = i as u32 * 8;
        if bit >= prefix_len {
            *byte = 0;
        } else if bit + 8 > prefix_len {
            *byte &= 0xffu8 << (8 - (prefix_len - bit));
        }
    }
    Some(AuthzSourceKey {
        prefix_len,
        ip: bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kmesh_common::ipv4_mapped;

    #[test]
    fn blocks_are_masked_and_v4_is_mapped() {
        let b = parse_block("10.1.2.3/24").unwrap();
        assert_eq!((b.prefix_len, b.ip), (120, ipv4_mapped([10, 1, 2, 0])));
        assert_eq!(parse_block("10.1.2.3").unwrap().prefix_len, 128);
        assert_eq!(parse_block("fd00::1/64").unwrap().prefix_len, 64);
        assert!(parse_block("10.1.2.3/33").is_none());
        assert!(parse_block("10.1.2/24").is_none());
        assert!(parse_block("x").is_none());
    }
}
