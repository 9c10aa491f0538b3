//! Agent upgrades across a change of the map layout, on the real kernel, under continuous load.
//!
//! The real `kmesh-agent` binary plays both versions: with the hidden flag `--test-layout-variant`
//! it loads the test variant of the eBPF object (`kmesh-ebpf/src/test_layout.rs`: the same
//! programs, but an enrolled map twice as large — a map the kernel cannot resize in place). What is
//! simulated is only that the "new version" is the same binary with another object; everything the
//! kernel does is real: new maps pinned in the new layout's directory and filled with the current
//! snapshot, the programs of the pinned links replaced with `BPF_LINK_UPDATE`, the old layout's
//! pins removed. A client connects to a service VIP without pause throughout; its namespace has no
//! route out, so a connect that is not steered fails (ENETUNREACH) and counts.
//!
//! Run as root after `cargo build --workspace --bins` (scripts/test.sh does both).
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    time::Duration,
};

use kmesh_common::{lb_policy, mode};
use kmesh_snapshot::builder::{Endpoint, SnapshotBuilder};
use kmesh_tests::{
    Agent, AgentDir, AgentOptions, AgentSource, Pod, ProbeHandle, ProbeReport, StopFile,
    TcpServer, TestCgroup, TestNetwork, write_atomically,
};
use serde_json::Value;

const NODE: &str = "node-1";
const PORT: u16 = 8080;
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const READY: Duration = Duration::from_secs(20);

/// A node: a client pod (enrolled), backends serving PORT, a test cgroup, a pin directory.
struct Node {
    net: TestNetwork,
    cgroup: TestCgroup,
    dir: AgentDir,
    client: Pod,
    backends: Vec<(Pod, TcpServer)>,
    files: Vec<PathBuf>,
}

impl Node {
    /// Pod addresses are `10.244.<subnet>.x`: unique per test, as every agent scans every
    /// namespace of the machine.
    fn new(name: &str, subnet: u8, backends: &[&str]) -> Node {
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
    fn file(&mut self, tag: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!(
            "kmt-{}-{tag}-{}.snap",
            self.net.id(),
            std::process::id()
        ));
        self.files.push(path.clone());
        path
    }

    /// Generation `generation`: the VIP over `pods`, the client enrolled.
    fn write(&self, file: &Path, generation: u64, pods: &[&str]) {
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
        write_atomically(file, &b.build().encode().expect("encode")).expect("write snapshot");
    }

    /// Starts an agent on `file`; does not wait for it.
    fn start_agent(&self, file: &Path, extra: &[&str]) -> Agent {
        Agent::start(&AgentOptions {
            node_name: NODE,
            source: AgentSource::File(file),
            dir: &self.dir,
            cgroup: &self.cgroup,
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
        })
        .expect("start kmesh-agent")
    }

    /// `count` connects from the client to the VIP.
    fn probe(&self, count: u32) -> ProbeReport {
        let target = format!("{VIP}:80");
        let count = count.to_string();
        let args = ["--target", &target, "--count", &count, "--timeout-ms", "2000"];
        self.client.run_probe(&self.cgroup, &args).expect("probe")
    }

    /// Connects from the client to the VIP without pause until `stop` is signalled.
    fn continuous_probe(&self, stop: &StopFile) -> ProbeHandle {
        let target = format!("{VIP}:80");
        let args = ["--target", &target, "--until-file", stop.arg(), "--timeout-ms", "2000"];
        self.client
            .spawn_probe(&self.cgroup, &args)
            .expect("continuous probe")
    }

    /// The entries at the top of the pin directory.
    fn pins(&self) -> BTreeSet<String> {
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

fn wait_generation(agent: &mut Agent, generation: u64) {
    agent
        .wait_for(READY, &format!("generation {generation} live"), |a| {
            Ok(a.debug_snapshot()?["live"]["generation"].as_u64() == Some(generation))
        })
        .expect("generation live");
}

fn wait_enrolled(agent: &mut Agent) {
    agent
        .wait_for(READY, "the client enrolled", |a| {
            Ok(a.debug_snapshot()?["enrolled_netns"].as_u64() >= Some(1))
        })
        .expect("client enrolled");
}

/// (link name, link id, program id) of every link in an agent's status.
fn links(status: &Value) -> Vec<(String, u64, u64)> {
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

fn layout(status: &Value) -> String {
    status["layout"].as_str().expect("layout").to_string()
}

/// Checks what an upgrade to `after`'s layout left: the same links (ids) running new programs,
/// the switch recorded, and only the links and the new layout pinned.
fn assert_switched(node: &Node, before: &Value, after: &Value) {
    let (old, new) = (links(before), links(after));
    assert_eq!(old.len(), 2, "{before}");
    assert_eq!(new.len(), 2, "{after}");
    for ((name, old_link, old_program), (new_name, new_link, new_program)) in old.iter().zip(&new)
    {
        assert_eq!(name, new_name);
        assert_eq!(old_link, new_link, "{name}: BPF_LINK_UPDATE keeps the link");
        assert_ne!(old_program, new_program, "{name}: the program was not replaced");
    }
    assert_eq!(after["adopted_pins"], false, "{after}");
    assert_eq!(after["upgrade"]["state"], "switched", "{after}");
    let expected: BTreeSet<String> = ["link_connect4", "link_connect6"]
        .iter()
        .map(|s| s.to_string())
        .chain([layout(after)])
        .collect();
    assert_eq!(node.pins(), expected, "the old layout's pins remain");
}

/// Shipped layout → test layout → shipped layout, each time SIGTERM (a restart keeps the pins)
/// and a new agent, while the client connects without pause: not one connect fails, the links
/// keep their ids, their programs change, and each new layout's maps are the ones steering.
#[test]
fn upgrades_across_a_layout_change_under_load_fail_no_connection() {
    let mut node = Node::new("upgrade", 171, &["a", "b", "c"]);
    let file = node.file("snapshot");
    node.write(&file, 1, &["a", "b"]);
    let mut shipped = node.start_agent(&file, &[]);
    shipped.wait_ready(READY).expect("shipped agent ready");
    wait_enrolled(&mut shipped);
    let installed = shipped.debug_snapshot().unwrap();
    let stop = StopFile::new("upgrade");
    let load = node.continuous_probe(&stop);
    std::thread::sleep(Duration::from_millis(300));

    // Upgrade to the test layout.
    assert!(shipped.terminate().expect("SIGTERM").success());
    let mut variant = node.start_agent(&file, &["--test-layout-variant"]);
    variant.wait_ready(READY).expect("upgraded agent ready");
    let upgraded = variant.debug_snapshot().unwrap();
    assert_ne!(layout(&upgraded), layout(&installed), "{upgraded}");
    assert_switched(&node, &installed, &upgraded);
    // The new programs read the maps the new agent writes.
    node.write(&file, 2, &["c"]);
    wait_generation(&mut variant, 2);
    let on_new = node.probe(50);
    assert_eq!(on_new.replies("c"), 50, "{on_new:?}");

    // And back: another layout change, to the shipped layout.
    assert!(variant.terminate().expect("SIGTERM").success());
    let mut back = node.start_agent(&file, &[]);
    back.wait_ready(READY).expect("downgraded agent ready");
    let downgraded = back.debug_snapshot().unwrap();
    assert_eq!(layout(&downgraded), layout(&installed));
    assert_switched(&node, &upgraded, &downgraded);
    node.write(&file, 3, &["a"]);
    wait_generation(&mut back, 3);
    let on_back = node.probe(50);
    assert_eq!(on_back.replies("a"), 50, "{on_back:?}");

    stop.signal().expect("stop probe");
    let report = load
        .wait_timeout(Duration::from_secs(30))
        .expect("probe report");
    println!(
        "upgrade under load: layouts {} -> {} -> {}; links {:?} -> {:?} -> {:?}; \
         connections {} ok {} failed {} by endpoint {:?} errors {:?}",
        layout(&installed),
        layout(&upgraded),
        layout(&downgraded),
        links(&installed),
        links(&upgraded),
        links(&downgraded),
        report.attempts,
        report.ok,
        report.failed,
        report.by_reply,
        report.errors
    );
    assert_eq!(report.failed, 0, "{report:?}");
    assert!(report.ok >= 500, "too few connections to mean anything: {report:?}");
    for pod in ["a", "b", "c"] {
        assert!(report.replies(pod) > 0, "no reply from {pod}: {report:?}");
    }
}

/// An agent of a new layout that has no snapshot yet leaves the old programs steering with the
/// old maps (it is not ready meanwhile), and switches the links once its own maps hold one.
#[test]
fn the_old_layout_steers_until_the_new_maps_hold_a_snapshot() {
    let mut node = Node::new("upgwait", 172, &["a", "b"]);
    let old_file = node.file("old");
    let new_file = node.file("new");
    node.write(&old_file, 1, &["a"]);
    let mut shipped = node.start_agent(&old_file, &[]);
    shipped.wait_ready(READY).expect("shipped agent ready");
    wait_enrolled(&mut shipped);
    let installed = shipped.debug_snapshot().unwrap();
    let stop = StopFile::new("upgwait");
    let load = node.continuous_probe(&stop);
    assert!(shipped.terminate().expect("SIGTERM").success());

    // The new agent's snapshot file does not exist yet.
    let mut variant = node.start_agent(&new_file, &["--test-layout-variant"]);
    variant
        .wait_for(READY, "the upgrade to wait", |a| {
            Ok(a.debug_snapshot()?["upgrade"]["state"] == "waiting_for_snapshot")
        })
        .expect("upgrade waiting");
    std::thread::sleep(Duration::from_secs(2));
    let meanwhile = node.probe(50);
    assert_eq!(meanwhile.replies("a"), 50, "the old layout stopped steering: {meanwhile:?}");
    let waiting = variant.debug_snapshot().unwrap();
    let (code, body) = variant.http_get("/readyz").unwrap();
    assert_eq!(code, 503, "ready before the switch: {body}");
    assert!(body.contains("upgrading"), "{body}");
    assert_eq!(links(&waiting), links(&installed), "switched before a snapshot was live");
    let pins = node.pins();
    assert!(
        pins.contains(&layout(&installed)) && pins.contains(&layout(&waiting)),
        "both layouts are pinned while the upgrade waits: {pins:?}"
    );

    node.write(&new_file, 2, &["b"]);
    variant.wait_ready(READY).expect("upgraded agent ready");
    let switched = variant.debug_snapshot().unwrap();
    assert_switched(&node, &installed, &switched);
    let after = node.probe(50);
    assert_eq!(after.replies("b"), 50, "{after:?}");

    stop.signal().expect("stop probe");
    let report = load
        .wait_timeout(Duration::from_secs(30))
        .expect("probe report");
    println!(
        "upgrade waiting for a snapshot: connections {} ok {} failed {} by endpoint {:?} errors {:?}",
        report.attempts, report.ok, report.failed, report.by_reply, report.errors
    );
    assert_eq!(report.failed, 0, "{report:?}");
    assert!(report.replies("a") > 0 && report.replies("b") > 0, "{report:?}");
}
