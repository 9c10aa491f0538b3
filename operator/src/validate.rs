//! The checks the API server's CRD schemas and Istio's validation make on the kinds the compiler
//! reads. With `--source kube` invalid objects never get this far; YAML read from files (`dir:`,
//! `kmeshctl`) has had no check, so the compiler rejects here what the API server would have.
use std::collections::BTreeSet;

use serde_json::Value;

use crate::istio::{DestinationRuleSpec, ServiceEntrySpec, TrafficPolicy};

/// Why an object is invalid: the first field that fails a check, and the reason, in the words the
/// API server or Istio's validation would use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalid {
    /// The field's path in the object, e.g. `spec.ports[1].number`.
    pub field: String,
    pub reason: String,
}

fn invalid(field: &str, reason: impl Into<String>) -> Result<(), Invalid> {
    Err(Invalid {
        field: field.to_string(),
        reason: reason.into(),
    })
}

pub fn service_entry(spec: &ServiceEntrySpec) -> Result<(), Invalid> {
    if spec.hosts.is_empty() {
        return invalid("spec.hosts", "at least one host is required");
    }
    for (i, host) in spec.hosts.iter().enumerate() {
        let field = format!("spec.hosts[{i}]");
        if host == "*" {
            return invalid(&field, "hostname cannot be wildcard");
        }
        if let Err(reason) = partial_wildcard_domain(host) {
            return invalid(&field, reason);
        }
    }
    let resolution = spec.resolution.as_deref().unwrap_or("NONE");
    if let Some(i) = spec.addresses.iter().position(|a| a.contains('/'))
        && !matches!(resolution, "NONE" | "STATIC")
    {
        return invalid(
            &format!("spec.addresses[{i}]"),
            "CIDR addresses are allowed only for NONE/STATIC resolution types",
        );
    }
    let mut names = BTreeSet::new();
    let mut numbers = BTreeSet::new();
    for (i, port) in spec.ports.iter().enumerate() {
        if !(1..=65535).contains(&port.number) {
            return invalid(
                &format!("spec.ports[{i}].number"),
                "port must be between 1-65535",
            );
        }
        if port.target_port.is_some_and(|t| !(1..=65535).contains(&t)) {
            return invalid(
                &format!("spec.ports[{i}].targetPort"),
                "port must be between 1-65535",
            );
        }
        if !numbers.insert(port.number) {
            return invalid(
                &format!("spec.ports[{i}].number"),
                "port number cannot be duplicated",
            );
        }
        if let Some(name) = &port.name
            && !names.insert(name.clone())
        {
            return invalid(
                &format!("spec.ports[{i}].name"),
                format!("Duplicate value: {name:?}"),
            );
        }
    }
    if let Some(selector) = &spec.workload_selector {
        if !spec.endpoints.is_empty() {
            return invalid(
                "spec",
                "only one of WorkloadSelector or Endpoints can be set",
            );
        }
        let labels = selector.get("labels").and_then(Value::as_object);
        if labels.is_some_and(|l| {
            l.iter()
                .any(|(k, v)| k.contains('*') || v.as_str().is_some_and(|v| v.contains('*')))
        }) {
            return invalid(
                "spec.workloadSelector.labels",
                "wildcard is not supported in selector",
            );
        }
    }
    match resolution {
        "NONE" if !spec.endpoints.is_empty() => {
            invalid("spec.endpoints", "NONE mode cannot set endpoints")
        }
        "DNS_ROUND_ROBIN" if spec.endpoints.len() > 1 => invalid(
            "spec.endpoints",
            "DNS_ROUND_ROBIN mode cannot have multiple endpoints",
        ),
        "NONE" | "STATIC" | "DNS" | "DNS_ROUND_ROBIN" | "DYNAMIC_DNS" => Ok(()),
        other => invalid("spec.resolution", format!("unknown resolution {other:?}")),
    }
}

/// Istio's `ValidatePartialWildcardDomain`: an FQDN whose first label may be `*`, or a DNS-1123
/// label prefixed by `*` or `*-`; at most 255 bytes; the last label may be empty (`istio.io.`)
/// and the top-level one is not all digits. The reasons are Istio's words.
fn partial_wildcard_domain(domain: &str) -> Result<(), String> {
    if domain.len() > 255 {
        return Err(format!("domain name {domain:?} too long (max 255)"));
    }
    if domain.is_empty() {
        return Err("empty domain name not allowed".to_string());
    }
    let (first, rest) = match domain.split_once('.') {
        Some((first, rest)) => (first, Some(rest)),
        None => (domain, None),
    };
    let unprefixed = first
        .strip_prefix("*-")
        .or_else(|| first.strip_prefix('*'))
        .unwrap_or(first);
    let wildcard_label = first.len() <= 63 && (first == "*" || dns1123_label(unprefixed));
    if !wildcard_label {
        return Err(format!(
            "domain name {domain:?} invalid (label {first:?} invalid)"
        ));
    }
    match rest {
        Some(rest) => dns1123_labels(rest),
        None => Ok(()),
    }
}

/// Istio's `ValidateDNS1123Labels`.
fn dns1123_labels(domain: &str) -> Result<(), String> {
    let labels: Vec<&str> = domain.split('.').collect();
    let top_level = labels.last().copied().unwrap_or_default();
    if top_level.parse::<i64>().is_ok() {
        return Err(format!(
            "domain name {domain:?} invalid (top level domain {top_level:?} cannot be all-numeric)"
        ));
    }
    for (i, label) in labels.iter().enumerate() {
        // The last label may be empty: `istio.io.` is unambiguous.
        if i == labels.len() - 1 && label.is_empty() {
            return Ok(());
        }
        if !dns1123_label(label) {
            return Err(format!(
                "domain name {domain:?} invalid (label {label:?} invalid)"
            ));
        }
    }
    Ok(())
}

/// A DNS-1123 label as Istio checks it: 1 to 63 ASCII letters, digits and `-`, starting and
/// ending with a letter or digit (either case).
fn dns1123_label(label: &str) -> bool {
    let bytes = label.as_bytes();
    let edge = |b: Option<&u8>| b.is_some_and(u8::is_ascii_alphanumeric);
    (1..=63).contains(&bytes.len())
        && edge(bytes.first())
        && edge(bytes.last())
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-')
}

pub fn destination_rule(spec: &DestinationRuleSpec) -> Result<(), Invalid> {
    if spec.host.is_empty() {
        return invalid("spec.host", "a host is required");
    }
    if let Some(policy) = &spec.traffic_policy {
        traffic_policy("spec.trafficPolicy", policy)?;
    }
    let mut names = BTreeSet::new();
    for (i, subset) in spec.subsets.iter().enumerate() {
        if subset.name.is_empty() || !names.insert(subset.name.as_str()) {
            return invalid(
                &format!("spec.subsets[{i}].name"),
                "subset names must be non-empty and unique",
            );
        }
        if let Some(policy) = &subset.traffic_policy {
            traffic_policy(&format!("spec.subsets[{i}].trafficPolicy"), policy)?;
        }
    }
    Ok(())
}

fn traffic_policy(field: &str, policy: &TrafficPolicy) -> Result<(), Invalid> {
    let Some(warmup) = policy
        .load_balancer
        .as_ref()
        .and_then(|lb| lb.warmup.as_ref())
    else {
        return Ok(());
    };
    let field = format!("{field}.loadBalancer.warmup");
    if warmup.get("duration").is_none() {
        return invalid(&format!("{field}.duration"), "Required value");
    }
    if let Some(p) = warmup.get("minimumPercent").and_then(Value::as_f64)
        && !(0.0..=100.0).contains(&p)
    {
        return invalid(
            &format!("{field}.minimumPercent"),
            "Invalid value: must be between 0 and 100",
        );
    }
    if let Some(a) = warmup.get("aggression").and_then(Value::as_f64)
        && a < 1.0
    {
        return invalid(
            &format!("{field}.aggression"),
            "Invalid value: must be at least 1",
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_entry_hosts_are_checked_as_istio_does() {
        for host in [
            "reviews.default.svc.cluster.local",
            "*.example.com",
            "*-foo.example.com",
            "*foo.example.com",
            "istio.io.",
            "api.Example.COM",
            "localhost",
            &format!("{}.com", "a".repeat(63)),
        ] {
            assert_eq!(partial_wildcard_domain(host), Ok(()), "{host}");
        }
        let long = format!("{}.com", vec!["a".repeat(60); 5].join("."));
        let cases: [(&str, String); 9] = [
            ("", "empty domain name not allowed".into()),
            (
                &long,
                format!("domain name {long:?} too long (max 255)"),
            ),
            (
                "bad_host.com",
                r#"domain name "bad_host.com" invalid (label "bad_host" invalid)"#.into(),
            ),
            (
                "a..b",
                r#"domain name ".b" invalid (label "" invalid)"#.into(),
            ),
            (
                "-a.com",
                r#"domain name "-a.com" invalid (label "-a" invalid)"#.into(),
            ),
            (
                "www.example.123",
                r#"domain name "example.123" invalid (top level domain "123" cannot be all-numeric)"#
                    .into(),
            ),
            (
                "db.legacy.internal\u{FFFD}",
                "domain name \"legacy.internal\u{FFFD}\" invalid (label \"internal\u{FFFD}\" invalid)"
                    .into(),
            ),
            (
                "foo.*.com",
                r#"domain name "*.com" invalid (label "*" invalid)"#.into(),
            ),
            (
                &format!("{}.com", "a".repeat(64)),
                format!(
                    "domain name {:?} invalid (label {:?} invalid)",
                    format!("{}.com", "a".repeat(64)),
                    "a".repeat(64)
                ),
            ),
        ];
        for (host, reason) in cases {
            assert_eq!(partial_wildcard_domain(host), Err(reason), "{host:?}");
        }
    }

    #[test]
    fn a_service_entry_names_its_first_invalid_host() {
        let spec: ServiceEntrySpec = serde_json::from_value(serde_json::json!({
            "hosts": ["db.example.com", "bad_host.example.com", "*"],
        }))
        .unwrap();
        assert_eq!(
            service_entry(&spec),
            Err(Invalid {
                field: "spec.hosts[1]".into(),
                reason: r#"domain name "bad_host.example.com" invalid (label "bad_host" invalid)"#
                    .into(),
            })
        );
    }
}
