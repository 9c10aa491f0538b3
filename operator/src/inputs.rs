//! The compiler's inputs: the objects it reads, however they were obtained (the API server's
//! reflectors, or YAML files for `kmeshctl compile` and `--source dir:`).
//!
//! Promise: reading does not depend on order. Every object is appended (and where it came from
//! recorded in [`Inputs::sources`]); the one exception, the `KmeshConfig`, is combined by a rule
//! that gives the same result in any order ([`Inputs::add_config`]). So reading files one after
//! the other and [`Inputs::extend`]ing the inputs of each file in any order give the same inputs,
//! up to the order of the lists, which the compiler does not depend on. Objects of one kind,
//! namespace and name are all kept: the compiler resolves them (`compile/duplicates.rs`). An
//! object without `metadata.name` is refused here: it could not be told apart from another.
use std::collections::BTreeMap;

use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kmesh_snapshot::names;
use serde::{Deserialize as _, de::DeserializeOwned};

use crate::{
    crd::{KmeshConfig, SINGLETON_NAME},
    diagnostics::{Diagnostic, ObjectRef},
    gateway_api::{Gateway, HttpRoute, ReferenceGrant, TcpRoute},
    istio::{
        AuthorizationPolicy, DestinationRule, PeerAuthentication, SecurityObject, ServiceEntry,
        VirtualService,
    },
    kinds::{Handling, Kind, Scope},
};

/// Everything the compiler looks at. Order does not matter: the compiler sorts what it needs.
#[derive(Clone, Debug, Default)]
pub struct Inputs {
    /// The `KmeshConfig` named `default`, the only one that configures the mesh. From YAML, when
    /// every definition of it read agrees; `None` when there is none, or when definitions differ
    /// (then [`Inputs::sources`] still names them, and the compiler reports the conflict).
    pub config: Option<KmeshConfig>,
    pub namespaces: Vec<Namespace>,
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
    pub services: Vec<Service>,
    pub endpoint_slices: Vec<EndpointSlice>,
    pub virtual_services: Vec<VirtualService>,
    pub destination_rules: Vec<DestinationRule>,
    pub service_entries: Vec<ServiceEntry>,
    /// Gateway API routes (`gateway.networking.k8s.io`); those with a Service parent are mesh
    /// routes (GAMMA).
    pub http_routes: Vec<HttpRoute>,
    pub tcp_routes: Vec<TcpRoute>,
    /// Gateway API ReferenceGrants: what permits a route's cross-namespace backendRef.
    pub reference_grants: Vec<ReferenceGrant>,
    /// Gateway API Gateways; those of class `istio-waypoint` are waypoints (DualEngine).
    pub gateways: Vec<Gateway>,
    /// Istio AuthorizationPolicies and PeerAuthentications, their specs typed by the compiler (an
    /// invalid one must still bind its workloads, which then fail closed).
    pub authorization_policies: Vec<AuthorizationPolicy>,
    pub peer_authentications: Vec<PeerAuthentication>,
    /// Objects of kinds that are read but not compiled yet ([`Handling::NotCompiled`]:
    /// authorization policies, GRPCRoute, TLSRoute, other Istio kinds), so that they are reported
    /// rather than dropped silently.
    pub not_yet_supported: Vec<ObjectRef>,
    /// Where each object read from text came from (`origin#document`, one entry per definition),
    /// by object: what names the definitions of an object given more than once. Empty for
    /// objects put in directly (the kube source's typed stores, which hold one per name).
    pub sources: BTreeMap<ObjectRef, Vec<String>>,
}

impl Inputs {
    /// Adds every object of a multi-document YAML text. Objects without a namespace are placed in
    /// `default_namespace` (as `kubectl apply` would). Documents that cannot be read are returned
    /// as diagnostics; the others are still added.
    pub fn add_yaml(
        &mut self,
        text: &str,
        origin: &str,
        default_namespace: &str,
    ) -> Vec<Diagnostic> {
        let mut diagnostics = Vec::new();
        for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let value = match serde_yaml::Value::deserialize(document) {
                Ok(v) => v,
                Err(e) => {
                    diagnostics.push(Diagnostic::rejected(
                        ObjectRef::document(origin, index),
                        "",
                        format!("not valid YAML: {e}"),
                    ));
                    // A YAML syntax error ends the stream: nothing after it can be read reliably.
                    break;
                }
            };
            if value.is_null() {
                continue;
            }
            let mut value: serde_json::Value = match serde_json::to_value(&value) {
                Ok(v) => v,
                Err(e) => {
                    diagnostics.push(Diagnostic::rejected(
                        ObjectRef::document(origin, index),
                        "",
                        format!("not a JSON-compatible object: {e}"),
                    ));
                    continue;
                }
            };
            if value.get("kind").and_then(|k| k.as_str()) == Some("List") {
                if let Some(items) = value.get_mut("items").and_then(|i| i.as_array_mut()) {
                    for item in std::mem::take(items) {
                        if let Some(d) = self.add_object(item, origin, index, default_namespace) {
                            diagnostics.push(d);
                        }
                    }
                }
                continue;
            }
            if let Some(d) = self.add_object(value, origin, index, default_namespace) {
                diagnostics.push(d);
            }
        }
        diagnostics
    }

    /// Adds one object read from the API server (a `kube::api::DynamicObject` or a typed object,
    /// serialized to JSON), dispatched by `apiVersion` and `kind` exactly as a YAML document is.
    /// `origin` names where it came from, for the diagnostic of an object without kind or name.
    /// Returns why the object could not be read, if it could not; it is then left out.
    pub fn add_json(&mut self, value: serde_json::Value, origin: &str) -> Option<Diagnostic> {
        // Objects from the API server always carry their namespace; the default is never used.
        self.add_object(value, origin, 0, "default")
    }

    fn add_object(
        &mut self,
        mut value: serde_json::Value,
        origin: &str,
        index: usize,
        default_namespace: &str,
    ) -> Option<Diagnostic> {
        let text = |key: &str| value.get(key).and_then(|v| v.as_str()).unwrap_or("");
        let (api_version, name) = (text("apiVersion"), text("kind"));
        let kind = (!name.is_empty()).then(|| Kind::of_api_version(api_version, name));
        if kind.as_ref().is_none_or(|k| k.scope() == Scope::Namespaced)
            && let Some(meta) = value.get_mut("metadata").and_then(|m| m.as_object_mut())
        {
            meta.entry("namespace")
                .or_insert_with(|| serde_json::Value::String(default_namespace.to_string()));
        }
        let object = ObjectRef::from_value(&value, origin, index);
        let result = match kind {
            None => Err(Unreadable::NoKind),
            Some(kind) if kind.handling() == Handling::Irrelevant => Ok(()),
            Some(kind) if !has_name(&value) => Err(Unreadable::NoName(kind)),
            Some(kind) if let Some(bad) = bad_name(&value, &kind) => Err(bad),
            Some(kind) => {
                let read = match kind.handling() {
                    Handling::NotCompiled => {
                        self.not_yet_supported.push(object.clone());
                        Ok(())
                    }
                    _ => self.add_compiled(&kind, value),
                };
                if read.is_ok() {
                    self.add_source(&kind, &object, origin, index);
                }
                read
            }
        };
        result
            .err()
            .map(|reason| Diagnostic::rejected(object, reason.field(), reason.to_string()))
    }

    /// Records where `object` was read: `origin#index`. Keyed as the compiler tells objects
    /// apart (`compile/duplicates.rs`): a cluster-scoped object by kind and name alone.
    fn add_source(&mut self, kind: &Kind, object: &ObjectRef, origin: &str, index: usize) {
        let mut key = object.clone();
        if kind.scope() == Scope::Cluster {
            key.namespace = None;
        }
        let source = ObjectRef::document(origin, index).name;
        self.sources.entry(key).or_default().push(source);
    }

    /// Reads an object of a compiled kind into its field.
    fn add_compiled(&mut self, kind: &Kind, value: serde_json::Value) -> Result<(), Unreadable> {
        match kind {
            Kind::Namespace => parse(value).map(|o| self.namespaces.push(o)),
            Kind::Node => parse(value).map(|o| self.nodes.push(o)),
            Kind::Pod => parse(value).map(|o| self.pods.push(o)),
            Kind::Service => parse(value).map(|o| self.services.push(o)),
            Kind::EndpointSlice => parse(value).map(|o| self.endpoint_slices.push(o)),
            Kind::KmeshConfig => parse(value).and_then(|o| self.add_config(o)),
            Kind::VirtualService => parse_locating::<_, crate::istio::HttpRoute>(&value, "http")
                .map(|o| self.virtual_services.push(o)),
            Kind::DestinationRule => parse(value).map(|o| self.destination_rules.push(o)),
            Kind::ServiceEntry => parse(value).map(|o| self.service_entries.push(o)),
            Kind::HttpRoute => {
                parse_locating::<_, crate::gateway_api::HttpRouteRule>(&value, "rules")
                    .map(|o| self.http_routes.push(o))
            }
            Kind::TcpRoute => parse(value).map(|o| self.tcp_routes.push(o)),
            Kind::ReferenceGrant => parse(value).map(|o| self.reference_grants.push(o)),
            Kind::Gateway => parse(value).map(|o| self.gateways.push(o)),
            Kind::AuthorizationPolicy => {
                self.authorization_policies
                    .push(SecurityObject::read(value));
                Ok(())
            }
            Kind::PeerAuthentication => {
                self.peer_authentications.push(SecurityObject::read(value));
                Ok(())
            }
            // A kind marked compiled in the table without a field here: said, not dropped.
            other => Err(Unreadable::NoReader(other.clone())),
        }
    }

    /// Reads a `KmeshConfig`. Only `default` configures the mesh, as in a cluster (where a CEL
    /// rule of the CRD refuses any other name, and the kube source reads only `default`). A
    /// second definition of `default` keeps it if it is identical, and otherwise leaves none:
    /// picking one would make the mode depend on which file is read last. The result is the
    /// same in any order; the compiler reports the conflict (`compile/duplicates.rs`).
    fn add_config(&mut self, config: KmeshConfig) -> Result<(), Unreadable> {
        let name = config.metadata.name.clone().unwrap_or_default();
        if name != SINGLETON_NAME {
            return Err(Unreadable::NotTheSingleton(name));
        }
        let read_before = self.has_config();
        self.config = combine_configs(read_before, self.config.take(), true, Some(config));
        Ok(())
    }

    /// Whether a `KmeshConfig` `default` has been read (or put in), whether or not it is held.
    fn has_config(&self) -> bool {
        self.config.is_some() || self.sources.contains_key(&config_ref())
    }

    /// Adds the objects of `other` (read from other files), as if they had been read after
    /// these; and equally, before: reading is order-independent (see the module documentation).
    pub fn extend(&mut self, other: Inputs) {
        // Exhaustive: a new field of Inputs must be combined here.
        let Inputs {
            config,
            namespaces,
            nodes,
            pods,
            services,
            endpoint_slices,
            virtual_services,
            destination_rules,
            service_entries,
            http_routes,
            tcp_routes,
            reference_grants,
            gateways,
            authorization_policies,
            peer_authentications,
            not_yet_supported,
            sources,
        } = other;
        let there = config.is_some() || sources.contains_key(&config_ref());
        self.config = combine_configs(self.has_config(), self.config.take(), there, config);
        self.namespaces.extend(namespaces);
        self.nodes.extend(nodes);
        self.pods.extend(pods);
        self.services.extend(services);
        self.endpoint_slices.extend(endpoint_slices);
        self.virtual_services.extend(virtual_services);
        self.destination_rules.extend(destination_rules);
        self.service_entries.extend(service_entries);
        self.http_routes.extend(http_routes);
        self.tcp_routes.extend(tcp_routes);
        self.reference_grants.extend(reference_grants);
        self.gateways.extend(gateways);
        self.authorization_policies.extend(authorization_policies);
        self.peer_authentications.extend(peer_authentications);
        self.not_yet_supported.extend(not_yet_supported);
        for (object, mut origins) in sources {
            self.sources.entry(object).or_default().append(&mut origins);
        }
    }
}

/// The `KmeshConfig` `default`, as diagnostics and [`Inputs::sources`] name it.
pub fn config_ref() -> ObjectRef {
    ObjectRef::new(Kind::KmeshConfig, None, SINGLETON_NAME)
}

/// The `KmeshConfig` of two sets of inputs together, each given as whether it has read one
/// (`a_read`, `b_read`) and the one it holds (`None` if its definitions differed). Commutative and
/// associative, so the result does not depend on the order of reading: the config is kept only
/// when every definition read is the same.
fn combine_configs(
    a_read: bool,
    a: Option<KmeshConfig>,
    b_read: bool,
    b: Option<KmeshConfig>,
) -> Option<KmeshConfig> {
    match (a_read, b_read) {
        (false, _) => b,
        (_, false) => a,
        (true, true) => a.filter(|a| b.as_ref() == Some(a)),
    }
}

/// Whether a raw object has a non-empty `metadata.name`.
fn has_name(value: &serde_json::Value) -> bool {
    value
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(|n| n.as_str())
        .is_some_and(|n| !n.is_empty())
}

/// What is wrong with the object's name, or its namespace (for a namespaced kind), if the API
/// server would refuse it ([`kmesh_snapshot::names`], the rule the snapshot's policy names are
/// held to as well): a name no cluster can hold is refused here, so it never reaches a snapshot.
fn bad_name(value: &serde_json::Value, kind: &Kind) -> Option<Unreadable> {
    let meta = value.get("metadata")?;
    let text = |key: &str| meta.get(key).and_then(|v| v.as_str());
    let name = text("name")?;
    // A Namespace's name becomes every object's namespace: it is a DNS label, as they are.
    let name_problem = match kind {
        Kind::Namespace => names::namespace_problem,
        _ => names::object_name_problem,
    };
    if let Some(reason) = name_problem(name.as_bytes()) {
        return Some(Unreadable::BadName {
            field: "metadata.name",
            value: name.to_string(),
            reason,
        });
    }
    let namespace = text("namespace").filter(|_| kind.scope() == Scope::Namespaced)?;
    let reason = names::namespace_problem(namespace.as_bytes())?;
    Some(Unreadable::BadName {
        field: "metadata.namespace",
        value: namespace.to_string(),
        reason,
    })
}

/// Why an object could not be read; the reason of its rejection.
#[derive(Debug, thiserror::Error)]
enum Unreadable {
    #[error("no kind")]
    NoKind,
    /// Objects are told apart by kind, namespace and name: one without a name cannot be (the
    /// API server refuses it too; `generateName` is for creating, which a file of objects is not).
    #[error("{0} without a name (missing or empty)")]
    NoName(Kind),
    /// A name or namespace the API server would refuse (so no cluster holds it).
    #[error("{value:?} {reason}")]
    BadName {
        field: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("does not match its schema: {0}")]
    Schema(#[source] serde_json::Error),
    /// A schema error located at `field` (see [`schema_error_field`]).
    #[error("does not match its schema: {error}")]
    SchemaAt {
        field: String,
        #[source]
        error: serde_json::Error,
    },
    #[error("{0} is marked compiled, but the compiler's inputs have no place for it")]
    NoReader(Kind),
    #[error(
        "KmeshConfig is a singleton named default (a cluster refuses any other name): \"{0}\" is ignored"
    )]
    NotTheSingleton(String),
}

impl Unreadable {
    /// The field the reason is about; empty for the whole object.
    fn field(&self) -> &str {
        match self {
            Unreadable::NoName(_) | Unreadable::NotTheSingleton(_) => "metadata.name",
            Unreadable::BadName { field, .. } => field,
            Unreadable::SchemaAt { field, .. } => field,
            Unreadable::NoKind | Unreadable::Schema(_) | Unreadable::NoReader(_) => "",
        }
    }
}

fn parse<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, Unreadable> {
    serde_json::from_value(value).map_err(Unreadable::Schema)
}

/// [`parse`] for a route object whose routes are `spec.{list}[]` of type `Entry`: an error is
/// placed at the route and field it comes from, when it comes from one ([`schema_error_field`]).
fn parse_locating<T: DeserializeOwned, Entry: DeserializeOwned>(
    value: &serde_json::Value,
    list: &str,
) -> Result<T, Unreadable> {
    T::deserialize(value).map_err(|error| match schema_error_field::<Entry>(value, list) {
        Some(field) => Unreadable::SchemaAt { field, error },
        None => Unreadable::Schema(error),
    })
}

/// Where a route object's schema error is, when it is in one of its routes (`spec.{list}[i]`,
/// read as `Entry`): the first entry that does not read on its own, and in it the first field
/// that does not (each read alone, which works because every field of `Entry` is optional). serde
/// reports what is wrong but not where; a user with a misspelt duration in the fortieth route
/// needs the where. Called only for an object that does not read.
fn schema_error_field<Entry: DeserializeOwned>(
    value: &serde_json::Value,
    list: &str,
) -> Option<String> {
    let reads = |v: &serde_json::Value| Entry::deserialize(v).is_ok();
    let entries = value.get("spec")?.get(list)?.as_array()?;
    let (i, entry) = entries.iter().enumerate().find(|(_, e)| !reads(e))?;
    let key = entry.as_object().and_then(|fields| {
        fields.iter().find_map(|(key, v)| {
            let alone = serde_json::Value::Object([(key.clone(), v.clone())].into_iter().collect());
            (!reads(&alone)).then_some(key)
        })
    });
    Some(match key {
        Some(key) => format!("spec.{list}[{i}].{key}"),
        None => format!("spec.{list}[{i}]"),
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// A small object of `kind` its schema accepts (a spec holding the fields some kinds
    /// require; the others ignore them), named `default` (the only name a KmeshConfig may have).
    fn minimal(kind: &Kind) -> serde_json::Value {
        let info = kind.info().unwrap();
        json!({
            "apiVersion": info.api_version(info.preferred_version()),
            "kind": info.name,
            "metadata": {"name": "default"},
            "spec": {"host": "x", "hosts": ["x"], "from": [], "to": []},
        })
    }

    #[test]
    fn every_compiled_kind_is_read() {
        for kind in Kind::KNOWN {
            let mut inputs = Inputs::default();
            let diagnostic = inputs.add_json(minimal(kind), "test");
            match kind.handling() {
                Handling::Compiled => assert!(diagnostic.is_none(), "{kind}: {diagnostic:?}"),
                Handling::NotCompiled => {
                    assert!(diagnostic.is_none(), "{kind}: {diagnostic:?}");
                    assert_eq!(inputs.not_yet_supported[0].kind, *kind);
                }
                Handling::Irrelevant => unreachable!("no irrelevant kind in the table"),
            }
        }
    }

    #[test]
    fn yaml_is_dispatched_by_group_and_kind() {
        let yaml = "
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: a}
spec: {hosts: [reviews]}
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: b}
---
apiVersion: serving.knative.dev/v1
kind: Service
metadata: {name: c}
---
apiVersion: v1
kind: Service
metadata: {name: d}
---
apiVersion: v1
kind: Namespace
metadata: {name: e}
---
apiVersion: apps/v1
metadata: {name: f}
";
        let mut inputs = Inputs::default();
        let diagnostics = inputs.add_yaml(yaml, "f.yaml", "bookinfo");
        assert_eq!(inputs.virtual_services.len(), 1, "any version of the group");
        assert_eq!(inputs.virtual_services[0].namespace(), "bookinfo");
        let sidecar = ObjectRef::new(
            Kind::of("networking.istio.io", "Sidecar"),
            Some("bookinfo"),
            "b",
        );
        assert_eq!(
            inputs.not_yet_supported,
            vec![sidecar],
            "unlisted Istio kinds are reported"
        );
        assert_eq!(
            inputs.services.len(),
            1,
            "a knative Service is not a Service"
        );
        assert_eq!(
            inputs.namespaces[0].metadata.namespace, None,
            "cluster-scoped"
        );
        assert_eq!(diagnostics.len(), 1, "{diagnostics:?}");
        assert_eq!(diagnostics[0].object, ObjectRef::document("f.yaml", 5));
        assert_eq!(diagnostics[0].reason, "no kind");
    }

    /// Names and namespaces the API server refuses are refused here, at their field, naming the
    /// value and the rule; a valid object beside them is read.
    #[test]
    fn a_name_or_namespace_no_cluster_can_hold_is_refused() {
        let yaml = "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: Allow, namespace: web}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: Web_1}
spec: {clusterIP: 10.96.0.1}
---
apiVersion: v1
kind: Namespace
metadata: {name: web.example}
---
apiVersion: v1
kind: Service
metadata: {name: ok, namespace: web}
spec: {clusterIP: 10.96.0.2, ports: [{port: 80}]}
";
        let mut inputs = Inputs::default();
        let diagnostics: Vec<String> = inputs
            .add_yaml(yaml, "f.yaml", "default")
            .iter()
            .map(ToString::to_string)
            .collect();
        let subdomain = "has an object name that is not a DNS subdomain (dot-separated labels of a-z, 0-9 and '-', each starting and ending with a letter or digit)";
        let label = "has a namespace that is not a DNS label (a-z, 0-9 and '-', starting and ending with a letter or digit)";
        assert_eq!(
            diagnostics,
            [
                format!(
                    "rejected: AuthorizationPolicy web/Allow metadata.name: \"Allow\" {subdomain}"
                ),
                format!("rejected: Service Web_1/web metadata.namespace: \"Web_1\" {label}"),
                format!("rejected: Namespace web.example metadata.name: \"web.example\" {label}"),
            ],
        );
        assert_eq!(inputs.services.len(), 1, "the valid Service is read");
        assert!(inputs.authorization_policies.is_empty());
    }

    #[test]
    fn a_malformed_l7_field_is_refused_at_its_route_and_field_and_the_rest_is_read() {
        let yaml = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - route: [{destination: {host: reviews}}]
    timeout: 10s
  - route: [{destination: {host: reviews}}]
    timeout: 10 seconds
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: default}
spec:
  rules:
  - matches: [{headers: [{name: end-user, value: jason, type: Regex}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings, namespace: default}
spec:
  hosts: [ratings]
  http: [{match: [{headers: {end-user: {exat: jason}}}], route: [{destination: {host: ratings}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: details, namespace: default}
spec: {hosts: [details], http: [{timeout: 0.5s, route: [{destination: {host: details}}]}]}
"#;
        let mut inputs = Inputs::default();
        let diagnostics: Vec<String> = inputs
            .add_yaml(yaml, "f.yaml", "default")
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            diagnostics,
            [
                "rejected: VirtualService default/reviews spec.http[1].timeout: does not match its schema: \"10 seconds\" is not a duration: Istio durations are seconds with an optional fraction and the unit s, e.g. \"10s\" or \"0.5s\"",
                "rejected: HTTPRoute default/reviews spec.rules[0].matches: does not match its schema: unknown variant `Regex`, expected `Exact` or `RegularExpression`",
                "rejected: VirtualService default/ratings spec.http[0].match: does not match its schema: unknown field `exat`, expected one of `exact`, `prefix`, `regex`",
            ],
        );
        let read: Vec<&str> = inputs.virtual_services.iter().map(|vs| vs.name()).collect();
        assert_eq!(read, ["details"], "the valid VirtualService is read");
    }

    #[test]
    fn an_object_without_a_name_is_refused_naming_its_document_and_field() {
        let yaml = "
apiVersion: v1
kind: Service
metadata: {namespace: web}
spec: {clusterIP: 10.96.0.1}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ''}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
---
apiVersion: apps/v1
kind: Deployment
metadata: {namespace: web}
";
        let mut inputs = Inputs::default();
        let diagnostics: Vec<String> = inputs
            .add_yaml(yaml, "f.yaml", "default")
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            diagnostics,
            [
                "rejected: Document f.yaml#0 metadata.name: Service without a name (missing or empty)",
                "rejected: Document f.yaml#1 metadata.name: VirtualService without a name (missing or empty)",
                "rejected: Document f.yaml#2 metadata.name: AuthorizationPolicy without a name (missing or empty)",
            ],
            "a Deployment is irrelevant, named or not"
        );
        assert!(inputs.services.is_empty() && inputs.virtual_services.is_empty());
        assert!(inputs.not_yet_supported.is_empty() && inputs.sources.is_empty());
    }

    fn config(name: &str, mode: &str) -> String {
        format!(
            "apiVersion: kmesh.net/v1alpha1\nkind: KmeshConfig\nmetadata: {{name: {name}}}\nspec: {{mode: {mode}}}\n"
        )
    }

    #[test]
    fn only_the_kmesh_config_named_default_is_read() {
        let yaml = format!(
            "{}---\n{}",
            config("default", "Disabled"),
            config("other", "DualEngine")
        );
        let mut inputs = Inputs::default();
        let diagnostics: Vec<String> = inputs
            .add_yaml(&yaml, "f.yaml", "default")
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            diagnostics,
            [
                "rejected: KmeshConfig other metadata.name: KmeshConfig is a singleton named default \
              (a cluster refuses any other name): \"other\" is ignored"
            ]
        );
        let config = inputs.config.expect("default is read");
        assert_eq!(config.spec.mode, crate::crd::Mode::Disabled);
    }

    /// The `KmeshConfig` held after reading `modes` as `default`s, one file each, in this order.
    fn configs_read(modes: &[&str]) -> Option<crate::crd::Mode> {
        let mut inputs = Inputs::default();
        for (i, mode) in modes.iter().enumerate() {
            let read = inputs.add_yaml(&config("default", mode), &format!("{i}.yaml"), "default");
            assert!(read.is_empty(), "{read:?}");
        }
        assert_eq!(inputs.sources[&config_ref()].len(), modes.len());
        inputs.config.map(|c| c.spec.mode)
    }

    #[test]
    fn differing_kmesh_configs_default_leave_none_in_any_order() {
        use crate::crd::Mode::{Disabled, DualEngine};
        assert_eq!(configs_read(&["Disabled"]), Some(Disabled));
        assert_eq!(configs_read(&["Disabled", "Disabled"]), Some(Disabled));
        for modes in [
            ["Disabled", "DualEngine", "DualEngine"],
            ["DualEngine", "Disabled", "DualEngine"],
            ["DualEngine", "DualEngine", "Disabled"],
        ] {
            assert_eq!(configs_read(&modes), None, "{modes:?}");
        }
        assert_eq!(
            configs_read(&["DualEngine", "DualEngine"]),
            Some(DualEngine)
        );
    }

    /// `extend` is reading the other inputs' files after these, or before: the same inputs.
    #[test]
    fn extending_equals_reading_in_sequence_in_either_order() {
        let files = [
            config("default", "Disabled"),
            config("default", "DualEngine"),
            config("default", "Disabled"),
        ];
        let read = |order: &[usize]| {
            let mut all = Inputs::default();
            for &i in order {
                let mut one = Inputs::default();
                one.add_yaml(&files[i], &format!("{i}.yaml"), "default");
                all.extend(one);
            }
            all
        };
        for order in [[0, 1, 2], [2, 1, 0], [0, 2, 1]] {
            let all = read(&order);
            assert_eq!(all.config, None, "{order:?}");
            assert_eq!(all.sources[&config_ref()].len(), 3);
        }
        let agreeing = read(&[0, 2]);
        assert_eq!(
            agreeing.config.map(|c| c.spec.mode),
            Some(crate::crd::Mode::Disabled)
        );
    }
}
