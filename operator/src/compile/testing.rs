//! Helpers for the compiler's unit tests: a small cluster as YAML, compiled for one node, read
//! back as the human summary and the diagnostics.
use super::{CompileOptions, Compiled, compile};
use crate::inputs::Inputs;

pub(super) const NODE: &str = "node-1";

/// Service `reviews` (10.96.0.13:9080, HTTP) in `default`, with one ready pod on `NODE`.
pub(super) const REVIEWS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default}
spec:
  clusterIP: 10.96.0.13
  ports: [{port: 9080, name: http}]
  selector: {app: reviews}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v1, namespace: default, labels: {app: reviews, version: v1}}
spec:
  nodeName: node-1
  containers: [{name: reviews, ports: [{containerPort: 9080}]}]
status:
  podIP: 10.244.0.21
  conditions: [{type: Ready, status: "True"}]
"#;

/// Compiles `yaml` (which must read cleanly) for `NODE`.
pub(super) fn compile_yaml(yaml: &str) -> Compiled {
    let mut inputs = Inputs::default();
    let read = inputs.add_yaml(yaml, "test.yaml", "default");
    assert!(read.is_empty(), "{read:?}");
    compile(&inputs, &[NODE.to_string()], 1, &CompileOptions::default())
}

/// The node's snapshot in human terms, diagnostics included.
pub(super) fn summary(compiled: &Compiled) -> String {
    let snapshot = compiled.snapshot(NODE).expect("the node has a snapshot");
    crate::render::summary(&snapshot, compiled)
}

/// The diagnostics, as the operator prints them.
pub(super) fn diagnostics(compiled: &Compiled) -> Vec<String> {
    compiled
        .diagnostics
        .iter()
        .map(ToString::to_string)
        .collect()
}

/// The KmeshConfig `default` in `mode`.
pub(super) fn mode_config(mode: &str) -> String {
    format!(
        "apiVersion: kmesh.net/v1alpha1\nkind: KmeshConfig\nmetadata: {{name: default}}\nspec: {{mode: {mode}}}\n"
    )
}

/// Waypoint `default/waypoint` (a Gateway of class istio-waypoint, port 15008), and namespace
/// `default` bound to it.
pub(super) const BOUND_TO_WAYPOINT: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: default}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {istio.io/use-waypoint: waypoint}}
"#;

/// `mode_config(mode)` and [`BOUND_TO_WAYPOINT`].
pub(super) fn bound_to_waypoint(mode: &str) -> String {
    format!("{}---{BOUND_TO_WAYPOINT}", mode_config(mode))
}
