//! The kmesh-rs node agent as a library: the `kmesh-agent` binary is a thin CLI over it, and the
//! benchmarks drive the same loader and maps directly.
//!
//! One module per concern: [`loader`] (load, attach, pin, adopt), [`maps`] (generations and the
//! atomic swap), [`enrol`] (network namespaces to enrolment), [`source`] (snapshot file or
//! operator), [`admin`] (health and debug endpoints), and [`agent`] (the loop tying them together).
pub mod admin;
pub mod agent;
pub mod enrol;
pub mod loader;
pub mod maps;
pub mod source;
