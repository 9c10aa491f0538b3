//! The kmesh-rs operator as a library: the `KmeshConfig` CRD ([`crd`]) and the pure compiler from
//! Kubernetes and Istio objects to per-node snapshots. Kinds of objects are [`kinds::Kind`]; what
//! stops the operator is an [`Error`].

/// mimalloc for every binary of the crate (the operator, `kmeshctl`, its tests and benchmarks):
/// in the static (musl) image, musl's malloc made the compiler about twice as slow (BENCHMARKS.md).
/// Not in the fuzz targets (cargo-fuzz's `--cfg fuzzing`), where AddressSanitizer must see the
/// heap.
#[cfg(not(fuzzing))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod certs;
pub mod compile;
pub mod crd;
pub mod diagnostics;
pub mod dir_source;
pub mod durations;
pub mod error;
pub mod gateway_api;
pub mod inputs;
pub mod istio;
pub mod kinds;
pub mod kube_source;
pub mod leader;
pub mod log_level;
pub mod metrics;
pub mod publish;
pub mod reconcile;
pub mod render;
pub mod replicas;
pub mod server;
pub mod snapshot_body;
pub mod tokenreview;
pub mod uninstall;
pub mod validate;
pub mod watch_backoff;
pub mod waypoint_server;
pub mod waypoints;

pub use error::{Error, Result};
