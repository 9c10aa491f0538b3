//! Backend sets: the endpoints a route's destination sends connections to, and how one is chosen.
//! Decided here:
//! - a DestinationRule gives subsets (label selectors over the endpoints) and the load balancer;
//!   the rule for a host is the one in the service's namespace, else the root namespace's; within
//!   one namespace, exact hosts before wildcards, then the oldest. The valid rules are indexed by
//!   namespace and host once per compile ([`DestinationRules`]);
//! - a DestinationRule in a client's namespace applies, in Istio, only to that namespace's clients:
//!   the tables are per service, so it is reported, not compiled;
//! - of a load balancer, only random choice and `consistentHash.useSourceIp` are decidable at
//!   connect(); the rest is approximated or reported;
//! - a backend set that stands for nothing usable (a Gateway API backendRef that resolves to
//!   nothing, a rule with no backends) has no endpoints: its share of connections is refused.
use std::{collections::BTreeMap, net::IpAddr};

use kmesh_common::lb_policy;

use super::{
    Compiler,
    catalog::{CatalogPort, CatalogService, TargetPort},
    routes::RoutedPort,
};
use crate::{
    diagnostics::ObjectRef,
    inputs::Inputs,
    istio::{DestinationRule, Subset, TrafficPolicy},
    kinds::Kind,
};

/// What a backend set stands for: its name, its id (a hash of the name) and its order.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct BackendSetKey {
    pub(super) fqdn: String,
    pub(super) port: u16,
    pub(super) subset: Option<String>,
    pub(super) v6: bool,
    origin: SetOrigin,
}

/// What a backend set stands for. Only `Service` sets have endpoints: the others exist so that a
/// share of connections is refused, as Istio fails the corresponding requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum SetOrigin {
    /// The endpoints of a known service port (and subset).
    Service,
    /// A Gateway API backendRef that resolves to nothing usable (unknown service or port, a
    /// cross-namespace reference no ReferenceGrant permits): no endpoints.
    Unresolved,
    /// A Gateway API rule that sends nothing anywhere (no backendRefs, every weight 0), keyed by
    /// the routed service port: no endpoints.
    NoBackends,
    /// A service port bound to a waypoint whose Service (or its port) does not exist, keyed by
    /// the waypoint's host and port: no endpoints, so its connections are refused, never sent
    /// around the waypoint.
    NoWaypoint,
}

impl BackendSetKey {
    pub(super) fn name(&self) -> String {
        let family = if self.v6 { "v6" } else { "v4" };
        match (&self.subset, self.origin) {
            (_, SetOrigin::Unresolved) => {
                format!("{}:{} unresolved ({family})", self.fqdn, self.port)
            }
            (_, SetOrigin::NoBackends) => {
                format!("{}:{} no backends ({family})", self.fqdn, self.port)
            }
            (_, SetOrigin::NoWaypoint) => {
                format!(
                    "{}:{} waypoint without a Service ({family})",
                    self.fqdn, self.port
                )
            }
            (Some(s), SetOrigin::Service) => {
                format!("{}:{} subset {s} ({family})", self.fqdn, self.port)
            }
            (None, SetOrigin::Service) => format!("{}:{} ({family})", self.fqdn, self.port),
        }
    }
}

/// A destination's backend set: its key, and for a set of endpoints the service port they come
/// from, carried so that nothing has to be looked up again.
#[derive(Clone, Debug)]
pub(super) struct SetRef<'c> {
    pub(super) key: BackendSetKey,
    /// `Some` exactly for `SetOrigin::Service` keys (the constructors keep them together).
    endpoints_of: Option<(&'c CatalogService<'c>, &'c CatalogPort)>,
}

impl<'c> SetRef<'c> {
    /// The endpoints of `port` of `service` (of its `subset`, when given).
    pub(super) fn endpoints(
        service: &'c CatalogService<'c>,
        port: &'c CatalogPort,
        subset: Option<String>,
        v6: bool,
    ) -> Self {
        SetRef {
            key: BackendSetKey {
                fqdn: service.fqdn.clone(),
                port: port.port,
                subset,
                v6,
                origin: SetOrigin::Service,
            },
            endpoints_of: Some((service, port)),
        }
    }

    /// A backendRef to `fqdn:port` that resolves to nothing usable: no endpoints.
    pub(super) fn unresolved(fqdn: &str, port: u16, v6: bool) -> Self {
        SetRef::refusing(fqdn, port, v6, SetOrigin::Unresolved)
    }

    /// The set of a service port whose rule sends nothing anywhere: no endpoints.
    pub(super) fn no_backends(fqdn: &str, port: u16, v6: bool) -> Self {
        SetRef::refusing(fqdn, port, v6, SetOrigin::NoBackends)
    }

    /// The set of a waypoint (host `fqdn`, listening on `port`) that has no Service with that
    /// port: no endpoints.
    pub(super) fn no_waypoint(fqdn: &str, port: u16, v6: bool) -> Self {
        SetRef::refusing(fqdn, port, v6, SetOrigin::NoWaypoint)
    }

    fn refusing(fqdn: &str, port: u16, v6: bool, origin: SetOrigin) -> Self {
        SetRef {
            key: BackendSetKey {
                fqdn: fqdn.to_string(),
                port,
                subset: None,
                v6,
                origin,
            },
            endpoints_of: None,
        }
    }
}

/// A backend set's endpoints and how one is chosen, before IDs.
pub(super) struct BackendSet<'c> {
    pub(super) endpoints: Vec<EndpointValueDraft<'c>>,
    pub(super) load_balancing: LoadBalancing,
}

/// How an endpoint is chosen inside a backend set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum LoadBalancing {
    /// Uniform random choice (also what other simple policies are approximated by).
    Random,
    /// `consistentHash.useSourceIp`: a hash of the client's address.
    SourceIpHash,
}

impl LoadBalancing {
    /// The policy as the node programs know it: one of `kmesh_common::lb_policy`.
    pub(super) fn kernel_value(self) -> u32 {
        match self {
            LoadBalancing::Random => lb_policy::RANDOM,
            LoadBalancing::SourceIpHash => lb_policy::SOURCE_IP_HASH,
        }
    }
}

/// An endpoint with its port chosen, before IDs.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct EndpointValueDraft<'c> {
    pub(super) ip: IpAddr,
    pub(super) port: u16,
    /// Borrowed from the catalog's endpoint: a copy per endpoint of every set would be made
    /// only to be looked up and freed.
    pub(super) identity: &'c str,
}

/// The valid DestinationRules by namespace, then host.
#[derive(Default)]
pub(super) struct DestinationRules<'a> {
    by_namespace: BTreeMap<&'a str, NamespaceRules<'a>>,
}

/// The DestinationRules of one namespace, each list oldest first (then by name).
#[derive(Default)]
struct NamespaceRules<'a> {
    /// By host, expanded to a FQDN (a wildcard host is listed here too, for itself).
    exact: BTreeMap<String, Vec<&'a DestinationRule>>,
    /// Wildcard hosts `*suffix`, as (suffix, rule).
    wildcard: Vec<(String, &'a DestinationRule)>,
}

impl<'a> DestinationRules<'a> {
    /// The rule for `fqdn` in the first of `namespaces` that has one.
    fn find(&self, fqdn: &str, namespaces: [&str; 2]) -> Option<&'a DestinationRule> {
        namespaces.into_iter().find_map(|ns| {
            let rules = self.by_namespace.get(ns)?;
            let exact = rules.exact.get(fqdn).and_then(|r| r.first().copied());
            exact.or_else(|| {
                rules
                    .wildcard
                    .iter()
                    .find(|(suffix, _)| fqdn.ends_with(suffix.as_str()))
                    .map(|(_, dr)| *dr)
            })
        })
    }
}

/// The subset of `dr` named `name`.
pub(super) fn subset<'d>(dr: &'d DestinationRule, name: &str) -> Option<&'d Subset> {
    dr.spec.subsets.iter().find(|s| s.name == name)
}

pub(super) fn object_of(dr: &DestinationRule) -> ObjectRef {
    ObjectRef::new(Kind::DestinationRule, Some(dr.namespace()), dr.name())
}

impl<'a> Compiler<'a> {
    /// Indexes the DestinationRules by namespace and host; invalid ones are rejected and left out.
    pub(super) fn index_destination_rules(&mut self) -> DestinationRules<'a> {
        let inputs: &'a Inputs = self.inputs;
        let mut index = DestinationRules::default();
        for dr in &inputs.destination_rules {
            if let Err(crate::validate::Invalid { field, reason }) =
                crate::validate::destination_rule(&dr.spec)
            {
                self.reject(&object_of(dr), &field, reason);
                continue;
            }
            let host = self.options.fqdn(&dr.spec.host, dr.namespace());
            let rules = index.by_namespace.entry(dr.namespace()).or_default();
            if let Some(suffix) = host.strip_prefix('*') {
                rules.wildcard.push((suffix.to_string(), dr));
            }
            rules.exact.entry(host).or_default().push(dr);
        }
        let age = |dr: &&'a DestinationRule| {
            (
                dr.metadata.creation_timestamp.as_ref().map(|t| t.0),
                dr.name().to_string(),
            )
        };
        for rules in index.by_namespace.values_mut() {
            for list in rules.exact.values_mut() {
                list.sort_by_key(age);
            }
            rules.wildcard.sort_by_key(|(_, dr)| age(dr));
        }
        index
    }

    /// The DestinationRule for `fqdn`: the service's namespace first, then the root namespace;
    /// within one, exact hosts before wildcards, then the oldest.
    pub(super) fn destination_rule(
        &self,
        fqdn: &str,
        service_namespace: &str,
    ) -> Option<&'a DestinationRule> {
        let root = self.options.root_namespace.as_str();
        self.destination_rules.find(fqdn, [service_namespace, root])
    }

    /// Whether the DestinationRule for `service` defines subset `name`.
    pub(super) fn has_subset(&self, service: &CatalogService<'_>, name: &str) -> bool {
        self.destination_rule(&service.fqdn, &service.namespace)
            .and_then(|dr| subset(dr, name))
            .is_some()
    }

    /// A DestinationRule outside its service's namespace and the root namespace applies, in Istio,
    /// only to clients in its own namespace. The kernel's tables are per service, not per client, so
    /// such a rule is not compiled; say so rather than drop it.
    pub(super) fn report_client_namespace_destination_rules(
        &mut self,
        catalog: &BTreeMap<String, CatalogService<'_>>,
    ) {
        let inputs: &'a Inputs = self.inputs;
        for dr in &inputs.destination_rules {
            let host = self.options.fqdn(&dr.spec.host, dr.namespace());
            let Some(service) = catalog.get(&host) else {
                continue;
            };
            if dr.namespace() != service.namespace && dr.namespace() != self.options.root_namespace
            {
                self.unenforced(
                    &object_of(dr),
                    "spec.host",
                    format!(
                        "applies only to clients in namespace {}; per-client rules are not compiled (the rule of {host}'s own namespace, or the root namespace's, is used)",
                        dr.namespace()
                    ),
                );
            }
        }
    }

    /// Every backend set the routes send connections to, by key, each computed once.
    pub(super) fn backend_sets<'c>(
        &mut self,
        routed: &[RoutedPort<'c>],
    ) -> BTreeMap<BackendSetKey, BackendSet<'c>> {
        let mut sets = BTreeMap::new();
        for set in routed.iter().flat_map(|r| r.route.sets()) {
            if !sets.contains_key(&set.key) {
                let computed = self.backend_set(set);
                sets.insert(set.key.clone(), computed);
            }
        }
        sets
    }

    /// The endpoints of a backend set and its load-balancing policy.
    fn backend_set<'c>(&mut self, set: &SetRef<'c>) -> BackendSet<'c> {
        let Some((service, port)) = set.endpoints_of else {
            // Refuses its share of connections.
            return BackendSet {
                endpoints: Vec::new(),
                load_balancing: LoadBalancing::Random,
            };
        };
        let dr = self.destination_rule(&service.fqdn, &service.namespace);
        let subset = set
            .key
            .subset
            .as_ref()
            .and_then(|name| dr.and_then(|dr| subset(dr, name)));
        let policy = subset
            .and_then(|s| s.traffic_policy.as_ref())
            .or_else(|| dr.and_then(|dr| dr.spec.traffic_policy.as_ref()));
        let load_balancing = match (dr, policy) {
            (Some(dr), Some(policy)) => self.load_balancer(&object_of(dr), policy),
            _ => LoadBalancing::Random,
        };
        let no_labels = BTreeMap::new();
        let labels = subset.map_or(&no_labels, |s| &s.labels);
        BackendSet {
            endpoints: endpoints(service, port, labels, set.key.v6),
            load_balancing,
        }
    }

    fn load_balancer(&mut self, object: &ObjectRef, policy: &TrafficPolicy) -> LoadBalancing {
        self.report_unenforced_traffic_policy(object, policy);
        let Some(lb) = &policy.load_balancer else {
            return LoadBalancing::Random;
        };
        if lb.locality_lb_setting.is_some() {
            self.unenforced(
                object,
                "spec.trafficPolicy.loadBalancer.localityLbSetting",
                "locality load balancing is not enforced yet",
            );
        }
        if let Some(hash) = &lb.consistent_hash {
            if hash.use_source_ip == Some(true) {
                return LoadBalancing::SourceIpHash;
            }
            self.needs_l7(
                object,
                "spec.trafficPolicy.loadBalancer.consistentHash",
                "only useSourceIp hashing is possible at connect(); header, cookie and query hashing need L7",
                Some("connections are spread at random"),
            );
            return LoadBalancing::Random;
        }
        if let Some(other) = lb.simple.as_deref()
            && !matches!(other, "UNSPECIFIED" | "RANDOM")
        {
            self.note(
                object,
                "spec.trafficPolicy.loadBalancer.simple",
                format!("{other} is approximated by uniform random choice at connect()"),
            );
        }
        LoadBalancing::Random
    }

    fn report_unenforced_traffic_policy(&mut self, object: &ObjectRef, policy: &TrafficPolicy) {
        for (field, present) in [
            ("connectionPool", policy.connection_pool.is_some()),
            ("outlierDetection", policy.outlier_detection.is_some()),
            ("tls", policy.tls.is_some()),
            ("portLevelSettings", !policy.port_level_settings.is_empty()),
        ] {
            if present {
                self.unenforced(
                    object,
                    &format!("spec.trafficPolicy.{field}"),
                    "not enforced by the kernel data plane yet",
                );
            }
        }
    }
}

/// The endpoints of `service` carrying `labels`, in family `v6`, each with `port`'s target on it
/// (a named target port is resolved per endpoint; one that does not expose it is left out).
pub(super) fn endpoints<'c>(
    service: &'c CatalogService<'_>,
    port: &CatalogPort,
    labels: &BTreeMap<String, String>,
    v6: bool,
) -> Vec<EndpointValueDraft<'c>> {
    let mut endpoints = Vec::new();
    for ep in &service.endpoints {
        if !labels.iter().all(|(k, v)| ep.labels.get(k) == Some(v)) {
            continue;
        }
        let target = match &port.target {
            TargetPort::Number(n) => port
                .name
                .as_ref()
                .and_then(|name| ep.named_ports.get(name))
                .copied()
                .unwrap_or(*n),
            TargetPort::Named(name) => match ep.named_ports.get(name) {
                Some(n) => *n,
                None => continue, // this pod does not expose the named port
            },
        };
        for ip in ep.ips.iter().filter(|ip| ip.is_ipv6() == v6) {
            endpoints.push(EndpointValueDraft {
                ip: *ip,
                port: target,
                identity: &ep.identity,
            });
        }
    }
    endpoints.sort();
    endpoints.dedup();
    endpoints
}

#[cfg(test)]
mod tests {
    use super::super::testing::{REVIEWS, compile_yaml, summary};

    /// A DestinationRule for `host`; `hash` gives it `consistentHash.useSourceIp`, which shows in
    /// the summary as the reviews set's `[source-ip hash]`, so the test sees which rule applied.
    fn rule(namespace: &str, name: &str, host: &str, created: &str, hash: bool) -> String {
        let lb = if hash {
            "{consistentHash: {useSourceIp: true}}"
        } else {
            "{simple: RANDOM}"
        };
        format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {name}, namespace: {namespace}, creationTimestamp: \"{created}\"}}\nspec: {{host: \"{host}\", trafficPolicy: {{loadBalancer: {lb}}}}}\n"
        )
    }

    /// Whether the rule that applies to reviews is one with source-ip hashing.
    fn hashed(rules: &[String]) -> bool {
        let yaml = format!("{REVIEWS}\n---\n{}", rules.join("---\n"));
        let text = summary(&compile_yaml(&yaml));
        let line = "reviews.default.svc.cluster.local:9080 (v4) [";
        assert!(text.contains(line), "{text}");
        text.contains(&format!("{line}source-ip hash]"))
    }

    const OLD: &str = "2020-01-01T00:00:00Z";
    const NEW: &str = "2024-01-01T00:00:00Z";

    #[test]
    fn an_exact_host_beats_an_older_wildcard() {
        let wildcard = rule("default", "all", "*.default.svc.cluster.local", OLD, true);
        assert!(
            hashed(std::slice::from_ref(&wildcard)),
            "a wildcard applies"
        );
        let exact = rule("default", "reviews", "reviews", NEW, false);
        assert!(!hashed(&[wildcard, exact]));
    }

    #[test]
    fn the_service_namespace_beats_the_root_namespace() {
        let host = "reviews.default.svc.cluster.local";
        let root = rule("istio-system", "mesh", host, OLD, true);
        assert!(
            hashed(std::slice::from_ref(&root)),
            "the root namespace's rule applies"
        );
        let own = rule("default", "reviews", host, NEW, false);
        assert!(!hashed(&[root, own]));
    }

    #[test]
    fn the_oldest_rule_wins_then_the_first_by_name() {
        let newer = rule("default", "a-newer", "reviews", NEW, false);
        let older = rule("default", "b-older", "reviews", OLD, true);
        assert!(hashed(&[newer, older]));
        let first = rule("default", "a", "reviews", OLD, true);
        let second = rule("default", "b", "reviews", OLD, false);
        assert!(hashed(&[second, first]));
    }

    #[test]
    fn an_invalid_rule_is_rejected_and_not_used() {
        let invalid = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
  trafficPolicy: {loadBalancer: {consistentHash: {useSourceIp: true}}}
  subsets: [{name: v1}, {name: v1}]
"#;
        assert!(!hashed(&[invalid.to_string()]));
        let text = summary(&compile_yaml(&format!("{REVIEWS}\n---\n{invalid}")));
        assert!(
            text.contains("rejected: DestinationRule default/reviews spec.subsets[1].name"),
            "{text}"
        );
    }
}
