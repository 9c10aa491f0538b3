//! Running waypoints (DualEngine, issue #11): the objects each waypoint Gateway needs
//! ([`objects`], pure) and the leader's server-side apply of them ([`apply`]).
pub mod apply;
pub mod objects;
