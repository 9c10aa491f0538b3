//! A test node for the lifecycle tests (`upgrade.rs`, `uninstall.rs`): a client pod that is
//! enrolled, backend pods, a test cgroup and a pin directory, snapshots of one service VIP over
//! chosen backends, agents of either source, and probes from the client to the VIP. The client's
//! namespace has no route out, so a connect to the VIP that is not steered fails (ENETUNREACH).
#![allow(dead_code)] // each test file uses its part

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    time::Duration,
};

use kmesh_common::{lb_policy, mode};
use kmesh_snapshot::builder::{Endpoint, SnapshotBuilder};
use kmesh_tests::{
    Agent, AgentDir, AgentOptions, AgentSource, Pod, ProbeHandle, ProbeReport, StopFile, TcpServer,
    TestCgroup, TestNetwork, write_atomically,
};
use serde_json::Value;

pub const NODE: &str = "node-1";
pub const PORT: u16 = 8080;
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
pub const READY: Duration = Duration::from_secs(20);

/// A node: a client pod (enrolled), backends serving PORT, a test cgroup, a pin directory.
pub struct Node {
    pub net: TestNetwork,
    pub cgroup: TestCgroup,
    pub dir: AgentDir,
    pub client: Pod,
    pub backends: Vec<(Pod, TcpServer)>,
    files: Vec<PathBuf>,
}

impl Node {
    /// Pod addresses are `10.244.<subnet>.x`: unique per test, as every agent scans every
    /// namespace of the machine.
    pub fn new(name: &str, subnet: u8, backends: &[&str]) -> Node {
        let net = TestNetwork::new(name).expect("test network");
        let cgroup = TestCgroup::new(name).expect("test cgroup");
        let dir = AgentDir::new(name).expect("pin directory");
        let client = net
            .add_pod("client", Ipv4Addr::new(10, 244, subnet, 10), None)
            .expect("client pod");
        let backends = backends
            .iter()
            .enumerate()
            .map(|(i, pod)| {
                let ip = Ipv4Addr::new(10, 244, subnet, 100 + i as u8);
                let p = net.add_pod(pod, ip, None).expect("backend pod");
                let server = p.serve_tcp(PORT).expect("backend server");
                (p, server)
            })
            .collect();
        Node {
            net,
            cgroup,
            dir,
            client,
            backends,
            files: Vec::new(),
        }
    }

    /// A snapshot file path of this test (removed when the node is dropped).
    pub fn file(&mut self, tag: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!(
            "kmt-{}-{tag}-{}.snap",
            self.net.id(),
            std::process::id()
        ));
        self.files.push(path.clone());
        path
    }

    /// Writes [`Node::snapshot`] to `file`.
    pub fn write(&self, file: &Path, generation: u64, pods: &[&str]) {
        write_atomically(file, &self.snapshot(generation, pods)).expect("write snapshot");
    }

    /// Starts an agent on `file`; does not wait for it.
    pub fn start_agent(&self, file: &Path, extra: &[&str]) -> Agent {
        self.start_agent_from(AgentSource::File(file), extra)
    }

    /// Starts an agent on `source`; does not wait for it.
    pub fn start_agent_from(&self, source: AgentSource<'_>, extra: &[&str]) -> Agent {
        Agent::start(&AgentOptions {
            node_name: NODE,
            source,
            dir: &self.dir,
            cgroup: &self.cgroup,
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
        })
        .expect("start kmesh-agent")
    }

    /// The snapshot bytes of generation `generation`: the VIP over `pods`, the client enrolled.
    pub fn snapshot(&self, generation: u64, pods: &[&str]) -> Vec<u8> {
        let mut b = SnapshotBuilder::new(NODE, generation, mode::KERNEL_NATIVE);
        b.workload(IpAddr::V4(self.client.ipv4()), 7);
        let endpoints: Vec<Endpoint> = pods
            .iter()
            .map(|name| {
                let (pod, _) = self
                    .backends
                    .iter()
                    .find(|(p, _)| p.name() == *name)
                    .unwrap_or_else(|| panic!("no backend {name}"));
                Endpoint::new(IpAddr::V4(pod.ipv4()), PORT, 1)
            })
            .collect();
        let set = b.backend_set(lb_policy::RANDOM, &endpoints);
        b.service(VIP.into(), 80, &[(1, set)]);
        b.build().encode().expect("encode")
    }

    /// `count` connects from the client to the VIP.
    pub fn probe(&self, count: u32) -> ProbeReport {
        let target = format!("{VIP}:80");
        let count = count.to_string();
        let args = [
            "--target",
            &target,
            "--count",
            &count,
            "--timeout-ms",
            "2000",
        ];
        self.client.run_probe(&self.cgroup, &args).expect("probe")
    }

    /// Connects from the client to the VIP without pause until `stop` is signalled.
    pub fn continuous_probe(&self, stop: &StopFile) -> ProbeHandle {
        let target = format!("{VIP}:80");
        let args = [
            "--target",
            &target,
            "--until-file",
            stop.arg(),
            "--timeout-ms",
            "2000",
        ];
        self.client
            .spawn_probe(&self.cgroup, &args)
            .expect("continuous probe")
    }

    /// The entries at the top of the pin directory.
    pub fn pins(&self) -> BTreeSet<String> {
        self.dir.pins().into_iter().collect()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
    }
}

pub fn wait_generation(agent: &mut Agent, generation: u64) {
    agent
        .wait_for(READY, &format!("generation {generation} live"), |a| {
            Ok(a.debug_snapshot()?["live"]["generation"].as_u64() == Some(generation))
        })
        .expect("generation live");
}

pub fn wait_enrolled(agent: &mut Agent) {
    agent
        .wait_for(READY, "the client enrolled", |a| {
            Ok(a.debug_snapshot()?["enrolled_netns"].as_u64() >= Some(1))
        })
        .expect("client enrolled");
}

/// (link name, link id, program id) of every link in an agent's status.
pub fn links(status: &Value) -> Vec<(String, u64, u64)> {
    status["links"]
        .as_array()
        .unwrap_or_else(|| panic!("no links in {status}"))
        .iter()
        .map(|l| {
            (
                l["name"].as_str().unwrap_or_default().to_string(),
                l["link_id"].as_u64().unwrap_or_default(),
                l["program_id"].as_u64().unwrap_or_default(),
            )
        })
        .collect()
}

pub fn layout(status: &Value) -> String {
    status["layout"].as_str().expect("layout").to_string()
}
