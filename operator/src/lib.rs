//! The kmesh-rs operator as a library: the `KmeshConfig` CRD ([`crd`]) and the pure compiler from
//! Kubernetes and Istio objects to per-node snapshots.
pub mod compile;
pub mod crd;
pub mod diagnostics;
pub mod inputs;
pub mod istio;
pub mod render;
