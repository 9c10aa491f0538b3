//! The node of the DualEngine end-to-end tests (issue #11), shared by `tests/waypoint_origin.rs`,
//! `tests/waypoint_l7.rs`, `tests/waypoint_l7_features.rs` and `tests/waypoint_mode_switch.rs`: pods on the test bridge, the test
//! cgroup the real `kmesh-agent` attaches its programs to (with its pins and snapshot file), and
//! the real `kmesh-waypoint` and `kmesh-echo` started in pods.
//!
//! Pods are 10.244.`subnet`.`host` (and fd00:244::`subnet`:`host`); service VIPs are
//! 10.96.`subnet`.`n` (and fd00:96::`subnet`:`n`), outside every on-link prefix, so a connect to a
//! VIP that the kernel programs do not steer fails in the client's pod (no route out). Each test
//! takes its own `subnet`.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use kmesh_snapshot::{Snapshot, waypoint::WaypointConfig};

use crate::{
    Agent, AgentDir, AgentOptions, AgentSource, Pod, TempPath, TestCgroup, TestNetwork,
    http_probe::{Daemon, HttpReport, run_http},
    write_atomically,
};

/// The node name of the snapshots.
pub const NODE: &str = "node-1";
/// How long the agent and the waypoint get to become ready.
pub const READY: Duration = Duration::from_secs(20);
/// The waypoint's listener port (the kernel sends bound services' connections there).
pub const WAYPOINT_PORT: u16 = 15008;
/// The waypoint's admin port (`/readyz`), on its pod's loopback.
pub const WAYPOINT_ADMIN_PORT: u16 = 15021;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// fd00:`prefix`::`subnet`:`host`.
pub fn v6(prefix: u16, subnet: u8, host: u8) -> Ipv6Addr {
    Ipv6Addr::new(
        0xfd00,
        prefix,
        0,
        0,
        0,
        0,
        u16::from(subnet),
        u16::from(host),
    )
}

/// One node of a test: its network, cgroup, pin directory and snapshot file, removed when dropped
/// (drop the processes started on it first).
pub struct WaypointNode {
    pub family: Family,
    subnet: u8,
    // Owns the pods' namespaces.
    net: TestNetwork,
    pub cgroup: TestCgroup,
    dir: AgentDir,
    snapshot_file: TempPath,
}

impl WaypointNode {
    pub fn new(name: &str, family: Family, subnet: u8) -> WaypointNode {
        WaypointNode {
            family,
            subnet,
            net: TestNetwork::new(name).expect("test network"),
            cgroup: TestCgroup::new(name).expect("test cgroup"),
            dir: AgentDir::new(name).expect("pin directory"),
            snapshot_file: TempPath::new(&format!("{name}.snap")),
        }
    }

    /// A pod at host number `host` of this node's subnet, in both families.
    pub fn pod(&self, name: &str, host: u8) -> Pod {
        self.net
            .add_pod(
                name,
                Ipv4Addr::new(10, 244, self.subnet, host),
                Some(v6(0x244, self.subnet, host)),
            )
            .expect("pod")
    }

    /// The pod's address in this node's family.
    pub fn addr(&self, pod: &Pod) -> IpAddr {
        match self.family {
            Family::V4 => pod.ipv4().into(),
            Family::V6 => pod.ipv6().expect("pods have IPv6").into(),
        }
    }

    /// Service `n`'s VIP: outside every on-link prefix.
    pub fn vip(&self, n: u8) -> IpAddr {
        match self.family {
            Family::V4 => Ipv4Addr::new(10, 96, self.subnet, n).into(),
            Family::V6 => v6(0x96, self.subnet, n).into(),
        }
    }

    /// Writes the snapshot file (atomically: the agent follows it).
    pub fn write_snapshot(&self, snapshot: &Snapshot) {
        write_atomically(
            self.snapshot_file.path(),
            &snapshot.encode().expect("encode"),
        )
        .expect("write snapshot");
    }

    /// The real agent on this node's cgroup, following `snapshot`, ready.
    pub fn start_agent(&self, snapshot: &Snapshot) -> Agent {
        self.write_snapshot(snapshot);
        self.start_agent_from(AgentSource::File(self.snapshot_file.path()))
    }

    /// The real agent on this node's cgroup, following `source`, ready.
    pub fn start_agent_from(&self, source: AgentSource<'_>) -> Agent {
        let mut agent = Agent::start(&AgentOptions {
            node_name: NODE,
            source,
            dir: &self.dir,
            cgroup: &self.cgroup,
            extra_args: Vec::new(),
        })
        .expect("start kmesh-agent");
        agent.wait_ready(READY).expect("agent ready");
        agent
    }

    /// `kmesh-http ARGS` in `pod` and the test cgroup: its connects go through the kernel programs.
    pub fn http_in(&self, pod: &Pod, args: &[&str]) -> HttpReport {
        run_http(pod.netns_name(), &self.cgroup, args).expect("kmesh-http")
    }

    /// `kmesh-echo --version VERSION` on the pod's address and `port`, with `extra` flags.
    pub fn echo(&self, pod: &Pod, port: u16, version: &str, extra: &[&str]) -> Daemon {
        let listen = SocketAddr::new(self.addr(pod), port).to_string();
        let mut args = vec!["--listen", listen.as_str(), "--version", version];
        args.extend(extra);
        Daemon::spawn(pod.netns_name(), None, "kmesh-echo", &args).expect("kmesh-echo")
    }

    /// The real `kmesh-waypoint` in `pod` (not enrolled: outside the test cgroup), listening on
    /// [`WAYPOINT_PORT`] and following `config`; returned once `/readyz` answers 200.
    pub fn waypoint(&self, pod: &Pod, config: &WaypointConfigFile) -> Daemon {
        let file = config.path().to_string_lossy().into_owned();
        self.waypoint_following(pod, &["--config-file", &file])
    }

    /// As [`Self::waypoint`], following the configuration source `source` (`--config-file F`, or
    /// `--operator URL --waypoint NS/NAME ...`).
    pub fn waypoint_following(&self, pod: &Pod, source: &[&str]) -> Daemon {
        let listen = format!("[::]:{WAYPOINT_PORT}");
        let admin = format!("127.0.0.1:{WAYPOINT_ADMIN_PORT}");
        let mut args = vec!["--listen", listen.as_str(), "--admin", admin.as_str()];
        args.extend(source);
        let mut waypoint =
            Daemon::spawn(pod.netns_name(), None, "kmesh-waypoint", &args).expect("kmesh-waypoint");
        let target = format!("127.0.0.1:{WAYPOINT_ADMIN_PORT}");
        let deadline = Instant::now() + READY;
        loop {
            waypoint.assert_running();
            let report = self.http_in(
                pod,
                &[
                    "--target",
                    &target,
                    "--path",
                    "/readyz",
                    "--timeout-ms",
                    "500",
                ],
            );
            if report.status(200) == 1 {
                return waypoint;
            }
            assert!(
                Instant::now() < deadline,
                "the waypoint is not ready after {READY:?}: {report:?}\n{}",
                waypoint.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The waypoint's configuration file (`--config-file`): rewritten whole and atomically, the way
/// the waypoint expects to see a change; removed when dropped.
pub struct WaypointConfigFile(TempPath);

impl WaypointConfigFile {
    pub fn new(name: &str) -> WaypointConfigFile {
        WaypointConfigFile(TempPath::new(&format!("{name}.json")))
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }

    pub fn write(&self, config: &WaypointConfig) {
        write_atomically(self.path(), &config.to_json()).expect("write waypoint config");
    }
}
