//! The waypoint of DualEngine mode (issue #11, design in docs/dual-engine.md).
//!
//! The kernel steers connections to services bound to a waypoint to one of its replicas, and marks
//! each connection's SYN with the service the client dialled. The waypoint reads that mark from the
//! accepted socket, finds the service's routes in the configuration the operator compiled for it
//! (`kmesh_snapshot::waypoint`), and proxies the connection: HTTP/1.1 and h2c request by request,
//! anything else as TCP.

pub mod choice;
pub mod filters;
pub mod identity;
pub mod matching;
pub mod retry;
pub mod table;
