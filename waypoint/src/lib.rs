//! The waypoint of DualEngine mode (issue #11, design in docs/dual-engine.md).
//!
//! The kernel steers connections to services bound to a waypoint to one of its replicas, and marks
//! each connection's SYN with the service the client dialled. The waypoint reads that mark from the
//! accepted socket ([`origin`]), finds the service's routes in the configuration the operator
//! compiled for it (`kmesh_snapshot::waypoint`, made ready for requests by [`table`]), and proxies
//! the connection: HTTP/1.1 and h2c request by request, anything else as TCP.
//!
//! - [`origin`]: the original destination of an accepted connection, from its saved SYN.
//! - [`sys`]: the raw syscalls, nothing else.
//! - [`table`], [`matching`], [`choice`], [`filters`], [`retry`], [`identity`], [`authz`]: the L7
//!   engine,
//!   pure: configuration and request in, decisions out.
//! - [`sniff`]: protocol detection of a connection's first bytes.
//! - [`config_store`]: the current route table, swapped whole, and where configurations come
//!   from (a file); [`operator_source`]: the operator's long poll, the other source;
//!   [`metrics`]: Istio's request and TCP metrics, and the waypoint's own.
//! - [`listener`]: accept, origin, protocol; [`tcp_proxy`]: TCP pass-through; [`http_proxy`]
//!   and `forward`: HTTP request by request; [`upstream`]: the connection pools to endpoints;
//!   [`proxy`]: what connections share.
//! - [`admin`]: `/healthz`, `/readyz` and `/metrics`. The binary (`src/main.rs`) wires them up.

pub mod admin;
pub mod authz;
pub mod choice;
pub mod config_store;
pub mod filters;
mod forward;
pub mod http_proxy;
pub mod identity;
pub mod listener;
pub mod matching;
pub mod metrics;
pub mod operator_source;
pub mod origin;
pub mod proxy;
pub mod retry;
pub mod sniff;
pub mod sys;
pub mod table;
pub mod tcp_proxy;
pub mod upstream;
