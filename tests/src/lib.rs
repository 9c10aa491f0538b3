//! Real-kernel test harness of kmesh-rs.
//!
//! Everything here runs on the real machine, as root, against the real kernel:
//!
//! * [`TestNetwork`] / [`Pod`]: a "node" network namespace holding a bridge `br0`
//!   (10.244.0.1/16, fd00:244::1/64) and one namespace per pod, wired to the bridge
//!   with a veth pair. Pods have only their on-link routes (no default route), so a
//!   connect to a service VIP that is *not* rewritten fails locally with
//!   `ENETUNREACH` and never leaves the machine.
//! * [`TestCgroup`]: a cgroup v2 directory under the cgroup2 mount found in
//!   `/proc/mounts`; eBPF programs are attached there, never to the root cgroup.
//! * [`TcpServer`]: a dual-stack listener inside a pod namespace that answers every
//!   connection with one line, the pod's name.
//! * The `kmesh-probe` binary and [`ProbeHandle`] / [`ProbeReport`]: a client that
//!   runs inside a pod namespace *and* inside a test cgroup and reports, as JSON, how
//!   many connects succeeded and which pod answered.
//!
//! Every object removes what it created on drop (also when a test panics), and
//! [`sweep_leftovers`] removes what crashed earlier runs left behind. All names
//! start with `kmt-` and carry the pid of the test process that owns them.
//!
//! Tests must fail, never skip, when a real part is missing: see [`require_root`].
//!
//! [`cluster`] builds on all of this: a real Kubernetes control plane with fake kubelets that run
//! pods in network namespaces and the project's own pods as host processes.

pub mod agent;
pub mod authz;
pub mod bookinfo;
pub mod cgroup;
pub mod cluster;
pub mod cmd;
pub mod events_world;
pub mod http_probe;
pub mod names;
pub mod netns;
pub mod peer;
pub mod ports;
pub mod probe;
pub mod snapshot_server;
pub mod sweep;
pub mod temp;
pub mod tls;
pub mod waypoint_world;
pub mod yaml_cluster;

pub use agent::{Agent, AgentDir, AgentOptions, AgentSource, write_atomically};
pub use cgroup::{TestCgroup, cgroup2_root};
pub use cluster::{Cluster, NodeSpec};
pub use cmd::{ip, ip_in};
pub use netns::{Pod, TcpServer, TestNetwork, netns_path, run_in_netns};
pub use probe::{ProbeHandle, ProbeReport, StopFile, workspace_bin};
pub use snapshot_server::SnapshotServer;
pub use sweep::sweep_leftovers;
pub use temp::TempPath;
pub use tls::TestTls;

/// Panics with a clear message unless the process runs as root (euid 0).
///
/// The kernel tests create network namespaces, veth pairs and cgroups and load eBPF
/// programs; without root they cannot test anything, and they must fail rather than
/// silently pass.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        panic!(
            "kmesh-rs kernel tests need root: they create network namespaces, veth pairs and \
             cgroups and load eBPF programs (running as euid {euid}). Run them as root, e.g. \
             `sudo -E env PATH=\"$PATH\" CARGO_TARGET_DIR=... cargo test -p kmesh-tests`."
        );
    }
}

/// Called by every constructor: checks root, and the first time in this process
/// sweeps leftovers of earlier crashed runs.
pub(crate) fn init() {
    static SWEEP: std::sync::Once = std::sync::Once::new();
    require_root();
    SWEEP.call_once(|| {
        sweep_leftovers();
    });
}
