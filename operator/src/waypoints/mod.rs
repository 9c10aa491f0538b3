//! Running waypoints (DualEngine, issue #11): the objects each waypoint Gateway needs
//! ([`objects`]).
pub mod objects;
