//! The compiler's inputs: the objects it reads, however they were obtained (the API server's
//! reflectors, or YAML files for `kmeshctl compile` and `--source dir:`).
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use serde::{Deserialize as _, de::DeserializeOwned};

use crate::{
    crd::KmeshConfig,
    diagnostics::{Diagnostic, ObjectRef},
    gateway_api::{HttpRoute, ReferenceGrant, TcpRoute},
    istio::{DestinationRule, ServiceEntry, VirtualService},
    kinds::{Handling, Kind, Scope},
};

/// Everything the compiler looks at. Order does not matter: the compiler sorts what it needs.
#[derive(Clone, Debug, Default)]
pub struct Inputs {
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
    /// Objects of kinds that are read but not compiled yet ([`Handling::NotCompiled`]:
    /// authorization policies, GRPCRoute, TLSRoute, other Istio kinds), so that they are reported
    /// rather than dropped silently.
    pub not_yet_supported: Vec<ObjectRef>,
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
            Some(kind) => match kind.handling() {
                Handling::Compiled => self.add_compiled(&kind, value),
                Handling::NotCompiled => {
                    self.not_yet_supported.push(object.clone());
                    Ok(())
                }
                Handling::Irrelevant => Ok(()),
            },
        };
        result
            .err()
            .map(|reason| Diagnostic::rejected(object, "", reason.to_string()))
    }

    /// Reads an object of a compiled kind into its field.
    fn add_compiled(&mut self, kind: &Kind, value: serde_json::Value) -> Result<(), Unreadable> {
        match kind {
            Kind::Namespace => parse(value).map(|o| self.namespaces.push(o)),
            Kind::Node => parse(value).map(|o| self.nodes.push(o)),
            Kind::Pod => parse(value).map(|o| self.pods.push(o)),
            Kind::Service => parse(value).map(|o| self.services.push(o)),
            Kind::EndpointSlice => parse(value).map(|o| self.endpoint_slices.push(o)),
            Kind::KmeshConfig => parse(value).map(|o| self.config = Some(o)),
            Kind::VirtualService => parse(value).map(|o| self.virtual_services.push(o)),
            Kind::DestinationRule => parse(value).map(|o| self.destination_rules.push(o)),
            Kind::ServiceEntry => parse(value).map(|o| self.service_entries.push(o)),
            Kind::HttpRoute => parse(value).map(|o| self.http_routes.push(o)),
            Kind::TcpRoute => parse(value).map(|o| self.tcp_routes.push(o)),
            Kind::ReferenceGrant => parse(value).map(|o| self.reference_grants.push(o)),
            // A kind marked compiled in the table without a field here: said, not dropped.
            other => Err(Unreadable::NoReader(other.clone())),
        }
    }
}

/// Why an object could not be read; the reason of its rejection.
#[derive(Debug, thiserror::Error)]
enum Unreadable {
    #[error("no kind")]
    NoKind,
    #[error("does not match its schema: {0}")]
    Schema(#[source] serde_json::Error),
    #[error("{0} is marked compiled, but the compiler's inputs have no place for it")]
    NoReader(Kind),
}

fn parse<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, Unreadable> {
    serde_json::from_value(value).map_err(Unreadable::Schema)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// A small object of `kind` its schema accepts (a spec holding the fields some kinds
    /// require; the others ignore them).
    fn minimal(kind: &Kind) -> serde_json::Value {
        let info = kind.info().unwrap();
        json!({
            "apiVersion": info.api_version(info.preferred_version()),
            "kind": info.name,
            "metadata": {"name": "x"},
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
}
