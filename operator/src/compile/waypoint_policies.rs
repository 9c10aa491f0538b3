//! AuthorizationPolicies a waypoint enforces (DualEngine, issue #11): those whose `targetRefs`
//! name a waypoint's Gateway (they apply to every service of the waypoint) or a Service bound to
//! a waypoint (they apply to that service), compiled into `WaypointConfig::policies`. Decided here:
//! - the spec is checked as for the node (`authz_convert::convert`); an invalid policy is rejected
//!   and fails closed: its waypoint gets an ALLOW policy without rules for its services, which
//!   denies every request;
//! - CUSTOM, AUDIT and dry-run policies are not enforced (reported); a `targetRefs` entry naming
//!   no waypoint Gateway and no bound Service is reported and binds nothing;
//! - what the waypoint cannot evaluate (`requestPrincipals`, `remoteIpBlocks`, `trustDomains` and
//!   their `not` forms; `when` keys other than `request.headers[...]`, `source.ip`,
//!   `source.namespace`, `source.principal` and `destination.port`) is reported at its field and
//!   handled as the node does with L7: an ALLOW rule using it is dropped whole (a policy left
//!   without rules allows nothing), a DENY rule loses the field and keeps the rest (it denies more),
//!   and a DENY rule whose `from`/`to` entry or `when` condition had nothing else is dropped (it
//!   could never match);
//! - `serviceAccounts` become exact principals in the waypoint's trust domain.
//!
//! Selector-bound policies stay the node's. One that names client identities and selects the
//! pods of a waypoint-bound Service is noted: behind a waypoint the node sees the waypoint as the
//! source, so those identities never match there.
use std::collections::BTreeMap;

use kmesh_snapshot::waypoint::{
    AuthorizationPolicy as WaypointPolicy, Condition, ConditionKey, Operation, PolicyAction,
    PolicyTarget, Rule, Source, WaypointName,
};

use super::{
    Compiler,
    authz_convert::{Action, Binding, convert, from_spec, read_binding},
    catalog::Catalog,
    waypoint_bindings::WaypointBindings,
};
use crate::{
    diagnostics::ObjectRef,
    gateway_api::WAYPOINT_CLASS,
    istio::{AuthorizationPolicySpec, AuthorizationRule, PolicyBinding},
    kinds::Kind,
};

/// What one `targetRefs` entry names.
enum Target {
    Waypoint(WaypointName),
    Service(WaypointName, u32),
}

impl<'a> Compiler<'a> {
    /// Each waypoint's policies; `service_ids` are the services table's ids by host.
    pub(super) fn waypoint_policies(
        &mut self,
        catalog: &Catalog<'_>,
        bindings: &WaypointBindings,
        service_ids: &BTreeMap<&str, u32>,
    ) -> BTreeMap<WaypointName, Vec<WaypointPolicy>> {
        let inputs: &'a crate::inputs::Inputs = self.inputs;
        let mut out: BTreeMap<WaypointName, Vec<WaypointPolicy>> = BTreeMap::new();
        for p in &inputs.authorization_policies {
            let object = ObjectRef::new(Kind::AuthorizationPolicy, Some(p.namespace()), p.name());
            let Ok(b) = from_spec::<PolicyBinding>(&p.spec) else {
                continue; // the node's reading rejects it
            };
            if p.unreadable.is_some() {
                continue;
            }
            let refs: Vec<_> = b
                .target_ref
                .iter()
                .chain(b.target_refs.iter().flatten())
                .collect();
            if refs.is_empty() {
                self.note_selector_behind_waypoint(&object, p, catalog, bindings);
                continue;
            }
            if b.selector.is_some() {
                continue; // rejected by the node's reading (both set)
            }
            let mut targets: BTreeMap<WaypointName, PolicyTarget> = BTreeMap::new();
            for (i, r) in refs.iter().enumerate() {
                let field = format!("spec.targetRefs[{i}]");
                match resolve(r, p.namespace(), catalog, bindings, service_ids) {
                    Some(Target::Waypoint(w)) => {
                        targets.insert(w, PolicyTarget::Waypoint);
                    }
                    Some(Target::Service(w, id)) => {
                        let entry = targets
                            .entry(w)
                            .or_insert_with(|| PolicyTarget::Services(Vec::new()));
                        if let PolicyTarget::Services(ids) = entry
                            && !ids.contains(&id)
                        {
                            ids.push(id);
                        }
                    }
                    None => self.unenforced(
                        &object,
                        &field,
                        format!(
                            "names no Gateway of class {WAYPOINT_CLASS} and no Service bound to \
                             one: not enforced by any waypoint"
                        ),
                    ),
                }
            }
            if targets.is_empty() {
                continue;
            }
            let Some((action, rules)) = self.waypoint_policy_rules(&object, p) else {
                continue;
            };
            for (waypoint, applies_to) in targets {
                out.entry(waypoint).or_default().push(WaypointPolicy {
                    name: format!("{}/{}", p.namespace(), p.name()),
                    action,
                    applies_to,
                    rules: rules.clone(),
                });
            }
        }
        out
    }

    /// The action and rules of a `targetRefs` policy; `None`: not enforced (reported).
    fn waypoint_policy_rules(
        &mut self,
        object: &ObjectRef,
        p: &crate::istio::AuthorizationPolicy,
    ) -> Option<(PolicyAction, Vec<Rule>)> {
        let fail_closed = |this: &mut Self, field: &str, why: String| {
            this.reject(
                object,
                field,
                format!(
                    "{why}; fails closed: the waypoint denies every request to the services it \
                     targets until it is fixed"
                ),
            );
            Some((PolicyAction::Allow, Vec::new()))
        };
        let spec: AuthorizationPolicySpec = match from_spec(&p.spec) {
            Ok(s) => s,
            Err(i) => return fail_closed(self, &i.field, i.reason),
        };
        let action = match spec.action.as_deref() {
            None | Some("ALLOW") => Action::Allow,
            Some("DENY") => Action::Deny,
            Some(a @ ("AUDIT" | "CUSTOM")) => {
                let reason = format!("action {a} is not enforced by the waypoint");
                self.unenforced(object, "spec.action", reason);
                return None;
            }
            Some(other) => {
                let why = format!("unknown action {other:?} (ALLOW, DENY, AUDIT or CUSTOM)");
                return fail_closed(self, "spec.action", why);
            }
        };
        if p.dry_run() {
            self.unenforced(
                object,
                "metadata.annotations[istio.io/dry-run]",
                "a dry-run policy is not enforced by the waypoint",
            );
            return None;
        }
        if let Err(i) = convert(&spec, action, p.namespace()) {
            return fail_closed(self, &i.field, i.reason);
        }
        let trust_domain = self.options.cluster_domain.clone();
        let mut rules = Vec::new();
        for (i, rule) in spec.rules.iter().flatten().enumerate() {
            let field = format!("spec.rules[{i}]");
            let converted = convert_rule(rule, p.namespace(), &trust_domain);
            if converted.unsupported.is_empty() {
                rules.push(converted.rule);
                continue;
            }
            let list = converted.unsupported.join(", ");
            if action == Action::Allow {
                self.unenforced(
                    object,
                    &field,
                    format!(
                        "uses attributes the waypoint does not evaluate ({list}): the ALLOW rule \
                         is dropped whole, so it allows nothing"
                    ),
                );
            } else if converted.emptied {
                self.unenforced(
                    object,
                    &field,
                    format!(
                        "uses attributes the waypoint does not evaluate ({list}); an entry had \
                         nothing else, so the DENY rule can never match and is dropped"
                    ),
                );
            } else {
                self.unenforced(
                    object,
                    &field,
                    format!(
                        "attributes the waypoint does not evaluate are ignored ({list}): the DENY \
                         rule keeps the rest, so it denies more"
                    ),
                );
                rules.push(converted.rule);
            }
        }
        let action = match action {
            Action::Allow => PolicyAction::Allow,
            Action::Deny => PolicyAction::Deny,
        };
        if action == PolicyAction::Allow
            && rules.is_empty()
            && spec.rules.iter().flatten().next().is_some()
        {
            self.unenforced(
                object,
                "spec.rules",
                "no rule is left: the policy allows nothing, so the services it targets deny \
                 what no other ALLOW policy allows",
            );
        }
        Some((action, rules))
    }

    /// Notes a selector-bound policy naming client identities that selects pods of a
    /// waypoint-bound Service: at the destination the source is the waypoint.
    fn note_selector_behind_waypoint(
        &mut self,
        object: &ObjectRef,
        p: &crate::istio::AuthorizationPolicy,
        catalog: &Catalog<'_>,
        bindings: &WaypointBindings,
    ) {
        let Ok(spec) = from_spec::<AuthorizationPolicySpec>(&p.spec) else {
            return;
        };
        let names_clients = spec.rules.iter().flatten().any(|r| {
            r.from
                .iter()
                .flatten()
                .filter_map(|f| f.source.as_ref())
                .any(|s| {
                    [
                        &s.principals,
                        &s.not_principals,
                        &s.namespaces,
                        &s.not_namespaces,
                        &s.service_accounts,
                        &s.not_service_accounts,
                    ]
                    .iter()
                    .any(|l| !l.is_empty())
                })
                || r.when
                    .iter()
                    .any(|c| c.key == "source.principal" || c.key == "source.namespace")
        });
        if !names_clients {
            return;
        }
        let Ok((binding, _)) = read_binding(&p.spec) else {
            return;
        };
        let namespace = p.namespace();
        let pods = self.inputs.pods.iter().filter(|pod| {
            pod.metadata.namespace.as_deref().unwrap_or("default") == namespace
                && match &binding {
                    Binding::Selector(labels) => {
                        let pod_labels = pod.metadata.labels.as_ref();
                        labels
                            .iter()
                            .all(|(k, v)| pod_labels.and_then(|l| l.get(k)) == Some(v))
                    }
                    _ => true,
                }
        });
        let mut waypoints: Vec<&WaypointName> = Vec::new();
        for pod in pods {
            for service in catalog.values() {
                let key = (service.namespace.clone(), service.object.name.clone());
                if service.object.kind != Kind::Service || service.namespace != namespace {
                    continue;
                }
                let Some(w) = bindings.services.get(&key) else {
                    continue;
                };
                let selects = self.inputs.services.iter().any(|s| {
                    s.metadata.namespace.as_deref().unwrap_or("default") == namespace
                        && s.metadata.name.as_deref() == Some(service.object.name.as_str())
                        && s.spec
                            .as_ref()
                            .and_then(|spec| spec.selector.as_ref())
                            .is_some_and(|sel| {
                                !sel.is_empty()
                                    && sel.iter().all(|(k, v)| {
                                        pod.metadata.labels.as_ref().and_then(|l| l.get(k))
                                            == Some(v)
                                    })
                            })
                });
                if selects && !waypoints.contains(&w) {
                    waypoints.push(w);
                }
            }
        }
        for w in waypoints {
            self.note(
                object,
                "spec.rules",
                format!(
                    "names client identities, but the workloads it selects are behind waypoint \
                     {}/{}: their connections come from the waypoint, so these never match at \
                     the destination; target the waypoint or the Service (targetRefs) instead",
                    w.namespace, w.name
                ),
            );
        }
    }
}

/// The waypoint named by a `targetRefs` entry, if it names one or a Service bound to one.
fn resolve(
    r: &serde_json::Value,
    namespace: &str,
    catalog: &Catalog<'_>,
    bindings: &WaypointBindings,
    service_ids: &BTreeMap<&str, u32>,
) -> Option<Target> {
    let text = |k: &str| r.get(k).and_then(serde_json::Value::as_str).unwrap_or("");
    let name = text("name").to_string();
    let ns = match text("namespace") {
        "" => namespace,
        other => other,
    };
    match (text("group"), text("kind")) {
        ("gateway.networking.k8s.io", "Gateway") => {
            let w = WaypointName {
                namespace: ns.to_string(),
                name,
            };
            bindings
                .waypoints
                .contains_key(&w)
                .then_some(Target::Waypoint(w))
        }
        ("" | "core", "Service") => {
            let w = bindings.services.get(&(ns.to_string(), name.clone()))?;
            let service = catalog.values().find(|s| {
                s.object.kind == Kind::Service && s.namespace == ns && s.object.name == name
            })?;
            let id = *service_ids.get(service.fqdn.as_str())?;
            Some(Target::Service(w.clone(), id))
        }
        _ => None,
    }
}

/// A rule in the waypoint's terms, with what it could not carry.
struct ConvertedRule {
    rule: Rule,
    /// Unsupported fields, relative to the rule.
    unsupported: Vec<String>,
    /// A `from`/`to` entry or `when` condition had only unsupported fields.
    emptied: bool,
}

fn strip_spiffe(values: &[String]) -> Vec<String> {
    values
        .iter()
        .map(|v| v.strip_prefix("spiffe://").unwrap_or(v).to_string())
        .collect()
}

/// `ns/sa` or `sa` as the exact principal (validated by `convert` already).
fn account_principals(values: &[String], namespace: &str, trust_domain: &str) -> Vec<String> {
    values
        .iter()
        .map(|v| {
            let (ns, sa) = v.split_once('/').unwrap_or((namespace, v));
            format!("{trust_domain}/ns/{ns}/sa/{sa}")
        })
        .collect()
}

/// A rule of a valid spec.
fn convert_rule(rule: &AuthorizationRule, namespace: &str, trust_domain: &str) -> ConvertedRule {
    let mut out = ConvertedRule {
        rule: Rule::default(),
        unsupported: Vec::new(),
        emptied: false,
    };
    for (j, f) in rule.from.iter().flatten().enumerate() {
        let Some(s) = &f.source else { continue };
        let unsupported = [
            ("requestPrincipals", &s.request_principals),
            ("notRequestPrincipals", &s.not_request_principals),
            ("remoteIpBlocks", &s.remote_ip_blocks),
            ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
            ("trustDomains", &s.trust_domains),
            ("notTrustDomains", &s.not_trust_domains),
        ];
        for (name, values) in unsupported {
            if !values.is_empty() {
                out.unsupported.push(format!("from[{j}].source.{name}"));
            }
        }
        let mut principals = strip_spiffe(&s.principals);
        principals.extend(account_principals(
            &s.service_accounts,
            namespace,
            trust_domain,
        ));
        let mut not_principals = strip_spiffe(&s.not_principals);
        not_principals.extend(account_principals(
            &s.not_service_accounts,
            namespace,
            trust_domain,
        ));
        let source = Source {
            principals,
            not_principals,
            namespaces: s.namespaces.clone(),
            not_namespaces: s.not_namespaces.clone(),
            ip_blocks: s.ip_blocks.clone(),
            not_ip_blocks: s.not_ip_blocks.clone(),
        };
        if source == Source::default() {
            out.emptied = true;
        } else {
            out.rule.from.push(source);
        }
    }
    for o in rule
        .to
        .iter()
        .flatten()
        .filter_map(|t| t.operation.as_ref())
    {
        let ports = |v: &[String]| v.iter().filter_map(|p| p.trim().parse().ok()).collect();
        out.rule.to.push(Operation {
            hosts: o.hosts.clone(),
            not_hosts: o.not_hosts.clone(),
            ports: ports(&o.ports),
            not_ports: ports(&o.not_ports),
            methods: o.methods.clone(),
            not_methods: o.not_methods.clone(),
            paths: o.paths.clone(),
            not_paths: o.not_paths.clone(),
        });
    }
    for (j, c) in rule.when.iter().enumerate() {
        let key = match c.key.as_str() {
            "source.ip" => Some(ConditionKey::SourceIp),
            "source.namespace" => Some(ConditionKey::SourceNamespace),
            "source.principal" => Some(ConditionKey::SourcePrincipal),
            "destination.port" => Some(ConditionKey::DestinationPort),
            key => key
                .strip_prefix("request.headers[")
                .and_then(|k| k.strip_suffix(']'))
                .filter(|k| !k.is_empty())
                .map(|k| ConditionKey::RequestHeader(k.to_ascii_lowercase())),
        };
        let Some(key) = key else {
            out.unsupported.push(format!("when[{j}] {}", c.key));
            out.emptied = true;
            continue;
        };
        let principal = matches!(key, ConditionKey::SourcePrincipal);
        let values = |v: &[String]| {
            if principal {
                strip_spiffe(v)
            } else {
                v.to_vec()
            }
        };
        out.rule.when.push(Condition {
            key,
            values: values(&c.values),
            not_values: values(&c.not_values),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use kmesh_snapshot::waypoint::{
        Condition, ConditionKey, Operation, PolicyAction, PolicyTarget, Rule, Source,
        WaypointConfig, WaypointName,
    };

    use crate::compile::{
        Compiled,
        testing::{REVIEWS, bound_to_waypoint, compile_yaml},
    };

    /// ALLOW productpage's GETs on `/reviews*` with `x-user`, for the whole waypoint.
    const ALLOW_GATEWAY: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-productpage, namespace: default}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]
  rules:
  - from: [{source: {principals: ["spiffe://cluster.local/ns/default/sa/bookinfo-productpage"]}}]
    to: [{operation: {methods: [GET], paths: ["/reviews*"], ports: ["9080"]}}]
    when: [{key: "request.headers[X-User]", values: ["*"]}]
"#;

    fn compile(mode: &str, policies: &str) -> Compiled {
        compile_yaml(&format!(
            "{}---{REVIEWS}---{policies}",
            bound_to_waypoint(mode)
        ))
    }

    fn config(compiled: &Compiled) -> &WaypointConfig {
        let config = &compiled.waypoints[&WaypointName {
            namespace: "default".into(),
            name: "waypoint".into(),
        }];
        assert_eq!(
            WaypointConfig::from_json(&config.to_json()).as_ref(),
            Ok(config),
            "the waypoint accepts what it is given"
        );
        config
    }

    fn diagnostics(compiled: &Compiled) -> Vec<String> {
        compiled
            .diagnostics
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn a_policy_targeting_the_waypoint_is_compiled_into_its_configuration() {
        let compiled = compile("DualEngine", ALLOW_GATEWAY);
        let config = config(&compiled);
        assert_eq!(config.policies.len(), 1);
        let policy = &config.policies[0];
        assert_eq!(policy.name, "default/allow-productpage");
        assert_eq!(policy.action, PolicyAction::Allow);
        assert_eq!(policy.applies_to, PolicyTarget::Waypoint);
        assert_eq!(
            policy.rules,
            [Rule {
                from: vec![Source {
                    principals: vec!["cluster.local/ns/default/sa/bookinfo-productpage".into()],
                    ..Source::default()
                }],
                to: vec![Operation {
                    methods: vec!["GET".into()],
                    paths: vec!["/reviews*".into()],
                    ports: vec![9080],
                    ..Operation::default()
                }],
                when: vec![Condition {
                    key: ConditionKey::RequestHeader("x-user".into()),
                    values: vec!["*".into()],
                    not_values: vec![],
                }],
            }]
        );
        let reports = diagnostics(&compiled);
        assert!(
            !reports.iter().any(|d| d.contains("allow-productpage")),
            "{reports:#?}"
        );
    }

    #[test]
    fn outside_dual_engine_it_stays_reported_and_the_waypoint_keeps_it_warm() {
        let compiled = compile("KernelNative", ALLOW_GATEWAY);
        // The waypoint holds it as in DualEngine (a switch needs only the nodes' steering) ...
        assert_eq!(
            config(&compiled).policies,
            config(&compile("DualEngine", ALLOW_GATEWAY)).policies
        );
        assert!(!config(&compiled).policies.is_empty());
        // ... while no node steers there: the kernel path's wording stands.
        let reports = diagnostics(&compiled);
        assert!(
            reports.iter().any(|d| d.contains("allow-productpage")
                && d.contains("spec.targetRefs")
                && d.contains("not node-enforced")),
            "{reports:#?}"
        );
    }

    /// A Service target applies to that service's id; what the waypoint cannot evaluate is
    /// reported: the ALLOW rule using it is dropped (fail closed), the DENY rule loses it.
    #[test]
    fn a_service_target_and_unsupported_attributes() {
        let policies = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-jwt, namespace: default}
spec:
  targetRefs: [{kind: Service, group: "", name: reviews}]
  action: DENY
  rules:
  - from: [{source: {requestPrincipals: ["*"], namespaces: [other]}}]
    to: [{operation: {paths: ["/admin*"]}}]
  - when: [{key: connection.sni, values: [x]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-xff, namespace: default}
spec:
  targetRefs: [{kind: Service, group: "", name: reviews}, {kind: Service, group: "", name: nope}]
  rules:
  - from: [{source: {remoteIpBlocks: ["10.0.0.0/8"]}}]
"#;
        let compiled = compile("DualEngine", policies);
        let config = config(&compiled);
        let id = config.services[0].id;
        let by_name = |n: &str| {
            config
                .policies
                .iter()
                .find(|p| p.name == n)
                .unwrap_or_else(|| panic!("{n} in {:#?}", config.policies))
        };
        let deny = by_name("default/deny-jwt");
        assert_eq!(deny.applies_to, PolicyTarget::Services(vec![id]));
        assert_eq!(
            deny.rules,
            [Rule {
                from: vec![Source {
                    namespaces: vec!["other".into()],
                    ..Source::default()
                }],
                to: vec![Operation {
                    paths: vec!["/admin*".into()],
                    ..Operation::default()
                }],
                when: vec![],
            }],
            "the stripped rule keeps the rest; the SNI-only rule is dropped"
        );
        let allow = by_name("default/allow-xff");
        assert_eq!(allow.action, PolicyAction::Allow);
        assert!(allow.rules.is_empty(), "allows nothing: {allow:?}");
        let reports = diagnostics(&compiled);
        for expected in [
            "AuthorizationPolicy default/deny-jwt spec.rules[0]: attributes the waypoint does not evaluate are ignored (from[0].source.requestPrincipals)",
            "AuthorizationPolicy default/deny-jwt spec.rules[1]: uses attributes the waypoint does not evaluate (when[0] connection.sni); an entry had nothing else",
            "AuthorizationPolicy default/allow-xff spec.rules[0]: uses attributes the waypoint does not evaluate (from[0].source.remoteIpBlocks): the ALLOW rule is dropped whole",
            "AuthorizationPolicy default/allow-xff spec.rules: no rule is left: the policy allows nothing",
            "AuthorizationPolicy default/allow-xff spec.targetRefs[1]: names no Gateway of class istio-waypoint",
        ] {
            assert!(
                reports.iter().any(|d| d.contains(expected)),
                "{expected}\n{reports:#?}"
            );
        }
    }

    #[test]
    fn an_invalid_policy_fails_closed_and_custom_is_not_compiled() {
        let policies = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: bad-port, namespace: default}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]
  action: DENY
  rules: [{to: [{operation: {ports: ["http"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext, namespace: default}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]
  action: CUSTOM
  provider: {name: ext-authz}
  rules: [{}]
"#;
        let compiled = compile("DualEngine", policies);
        let config = config(&compiled);
        assert_eq!(config.policies.len(), 1, "{:#?}", config.policies);
        let bad = &config.policies[0];
        assert_eq!(
            (bad.name.as_str(), bad.action, bad.rules.len()),
            ("default/bad-port", PolicyAction::Allow, 0),
            "an ALLOW without rules: every request denied"
        );
        let reports = diagnostics(&compiled);
        for expected in [
            "rejected: AuthorizationPolicy default/bad-port spec.rules[0].to[0].operation.ports[0]",
            "not enforced: AuthorizationPolicy default/ext spec.action: action CUSTOM is not enforced by the waypoint",
        ] {
            assert!(
                reports.iter().any(|d| d.contains(expected)),
                "{expected}\n{reports:#?}"
            );
        }
    }

    #[test]
    fn a_selector_policy_naming_clients_behind_a_waypoint_is_noted() {
        let policies = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-from-productpage, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  rules: [{from: [{source: {principals: ["cluster.local/ns/default/sa/bookinfo-productpage"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-ports, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  rules: [{to: [{operation: {ports: ["9080"]}}]}]
"#;
        let compiled = compile("DualEngine", policies);
        let reports = diagnostics(&compiled);
        let noted: Vec<_> = reports
            .iter()
            .filter(|d| d.starts_with("note:") && d.contains("behind waypoint default/waypoint"))
            .collect();
        assert_eq!(noted.len(), 1, "{reports:#?}");
        assert!(noted[0].contains("reviews-from-productpage"), "{noted:?}");
        assert!(config(&compiled).policies.is_empty());
    }
}
