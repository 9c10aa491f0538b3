//! The kmesh-rs operator as a library: the `KmeshConfig` CRD ([`crd`]) and the pure compiler from
//! Kubernetes and Istio objects to per-node snapshots.
pub mod compile;
pub mod crd;
pub mod diagnostics;
pub mod dir_source;
pub mod gateway_api;
pub mod inputs;
pub mod istio;
pub mod kube_source;
pub mod metrics;
pub mod publish;
pub mod reconcile;
pub mod render;
pub mod server;
pub mod tokenreview;
pub mod validate;
