//! What the operator's waypoint tests share: a mesh with a waypoint-bound reviews Service and its
//! jason route (`USER` is the header value), the waypoint Gateway, static tokens, and the file and
//! port helpers.
#![allow(dead_code)] // each test binary uses its own part

use std::{
    net::{SocketAddr, TcpListener},
    path::Path,
};

pub const MESH: &str = r#"
apiVersion: kmesh.net/v1alpha1
kind: KmeshConfig
metadata: {name: default}
spec: {mode: DualEngine}
---
apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {istio.io/use-waypoint: waypoint}}
---
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
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - match: [{headers: {end-user: {exact: USER}}}]
    route: [{destination: {host: reviews}}]
  - route: [{destination: {host: reviews}}]
"#;

pub const GATEWAY: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: default}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
"#;

/// Two waypoints' tokens and a node's.
pub const TOKENS: &str =
    "wp waypoint:default/waypoint\nother waypoint:default/other\nnode node-1\n";

pub fn free_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().unwrap()
}

/// Writes the mesh (with `user` in the jason route, and the Gateway when `with_gateway`) into the
/// operator's source directory `dir`, whole: staged, then renamed.
pub fn write_mesh(dir: &Path, user: &str, with_gateway: bool) {
    let gateway = if with_gateway { GATEWAY } else { "" };
    let yaml = format!("{}---{gateway}", MESH.replace("USER", user));
    let staged = dir.join("../mesh.yaml.new");
    std::fs::write(&staged, yaml).unwrap();
    std::fs::rename(&staged, dir.join("mesh.yaml")).unwrap();
}
