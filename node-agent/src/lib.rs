//! The kmesh-rs node agent as a library: the `kmesh-agent` binary is a thin CLI over it, and the
//! benchmarks and the test harness drive the same loader, maps and syscalls directly.
//!
//! One module per concern:
//! - [`sys`]: every raw system call (bpf(2) map, object and link commands, network-namespace calls);
//! - [`slots`]: the generation-slot operations as a trait; [`kernel_maps`]: the real maps;
//! - [`maps`]: the atomic swap protocol, written once over [`slots::SlotMaps`];
//! - [`layout`]: where things are pinned, per layout of the eBPF object, and what a starting agent
//!   does with the pins it finds (a pure plan); [`loader`]: load, pin, adopt, uninstall;
//!   [`link_switch`]: point the pinned links at a layout's programs (`BPF_LINK_UPDATE`);
//! - [`enrol`]: network namespaces to enrolment (scan, then a pure plan); [`netns_links`]: the
//!   authorization program's link on every enrolled namespace; [`host_addrs`]: the node's own
//!   addresses, exempt from authorization; [`established`]: closing the established connections a
//!   new generation denies;
//! - [`source`]: snapshot file or operator (the contract is `kmesh_snapshot::contract`);
//! - [`data_plane`]: what each snapshot does (refused, unchanged, applied), and the thread that
//!   owns the maps and pins; [`lifecycle`]: an upgrade's link switch and the uninstall on it;
//!   [`refusal`]: why a snapshot was refused; [`supervise`]: that thread's end;
//! - [`connection`]: a finished connection and the names it is labelled with (kernel events to
//!   telemetry); [`events`]: the kernel's connection events ring buffer, read and decoded into
//!   connections for a [`events::ConnectionSink`], and its drop counters; [`telemetry`]: Istio's
//!   TCP metrics and the access log from those connections; [`names`]: those names, looked up in
//!   the decoded snapshot;
//! - [`admin`]: health and debug endpoints; [`authz_counters`]: what `/debug/authz` shows; [`agent`]: the status and the wiring of it all.
pub mod admin;
pub mod agent;
pub mod authz_counters;
pub mod connection;
pub mod data_plane;
pub mod enrol;
pub use kmesh_operator_client::error_chain; // shared with the waypoint
pub mod established;
pub mod events;
#[cfg(test)]
mod fake_slots;
pub mod host_addrs;
pub mod kernel_maps;
pub mod layout;
pub mod lifecycle;
pub mod link_switch;
pub mod loader;
pub mod maps;
pub mod metrics;
pub mod names;
pub mod netns_links;
pub mod refusal;
pub mod slots;
pub mod source;
pub mod supervise;
pub mod sys;
pub mod telemetry;
