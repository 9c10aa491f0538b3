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
    if let Some(i) = spec.hosts.iter().position(|h| h == "*") {
        return invalid(&format!("spec.hosts[{i}]"), "hostname cannot be wildcard");
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
