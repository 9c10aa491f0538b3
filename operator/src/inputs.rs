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
    /// Kinds that are read but not compiled yet (authorization policies, GRPCRoute, TLSRoute), so
    /// that they are reported rather than dropped silently.
    pub not_yet_supported: Vec<ObjectRef>,
}

/// Kinds a GitOps directory commonly holds that have no bearing on the data plane.
const IRRELEVANT_KINDS: &[&str] = &[
    "Deployment",
    "StatefulSet",
    "DaemonSet",
    "ReplicaSet",
    "Job",
    "CronJob",
    "ServiceAccount",
    "ConfigMap",
    "Secret",
    "Role",
    "RoleBinding",
    "ClusterRole",
    "ClusterRoleBinding",
    "PersistentVolumeClaim",
    "Ingress",
    "CustomResourceDefinition",
    "Gateway",
    "GatewayClass",
    "Certificate",
];

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
        let api_version = value
            .get("apiVersion")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string();
        let kind = value
            .get("kind")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string();
        let group = api_version.split_once('/').map(|(g, _)| g).unwrap_or("");
        let cluster_scoped = matches!(kind.as_str(), "Namespace" | "Node" | "KmeshConfig");
        if !cluster_scoped
            && let Some(meta) = value.get_mut("metadata").and_then(|m| m.as_object_mut())
        {
            meta.entry("namespace")
                .or_insert_with(|| serde_json::Value::String(default_namespace.to_string()));
        }
        let object = ObjectRef::from_value(&value, origin, index);
        let result = match (group, kind.as_str()) {
            ("", "Service") => parse(value).map(|o| self.services.push(o)),
            ("", "Pod") => parse(value).map(|o| self.pods.push(o)),
            ("", "Namespace") => parse(value).map(|o| self.namespaces.push(o)),
            ("", "Node") => parse(value).map(|o| self.nodes.push(o)),
            ("discovery.k8s.io", "EndpointSlice") => {
                parse(value).map(|o| self.endpoint_slices.push(o))
            }
            ("networking.istio.io", "VirtualService") => {
                parse(value).map(|o| self.virtual_services.push(o))
            }
            ("networking.istio.io", "DestinationRule") => {
                parse(value).map(|o| self.destination_rules.push(o))
            }
            ("networking.istio.io", "ServiceEntry") => {
                parse(value).map(|o| self.service_entries.push(o))
            }
            ("kmesh.net", "KmeshConfig") => parse(value).map(|o| self.config = Some(o)),
            ("gateway.networking.k8s.io", "HTTPRoute") => {
                parse(value).map(|o| self.http_routes.push(o))
            }
            ("gateway.networking.k8s.io", "TCPRoute") => {
                parse(value).map(|o| self.tcp_routes.push(o))
            }
            ("gateway.networking.k8s.io", "ReferenceGrant") => {
                parse(value).map(|o| self.reference_grants.push(o))
            }
            ("gateway.networking.k8s.io", "GRPCRoute" | "TLSRoute")
            | ("security.istio.io", _)
            | ("networking.istio.io", _) => {
                self.not_yet_supported.push(object.clone());
                Ok(())
            }
            (_, k) if IRRELEVANT_KINDS.contains(&k) => Ok(()),
            _ if kind.is_empty() => Err("no kind".to_string()),
            // Any other kind has no bearing on the data plane.
            _ => Ok(()),
        };
        result
            .err()
            .map(|reason| Diagnostic::rejected(object, "", reason))
    }
}

fn parse<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, String> {
    serde_json::from_value(value).map_err(|e| format!("does not match its schema: {e}"))
}
