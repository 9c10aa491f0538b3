//! `kmesh-demo`: the local demo. Builds a one-node "cluster" out of network namespaces, runs the
//! real `kmesh-agent` on it, and shows the kernel steering connections to a service VIP as a
//! sequence of snapshots changes the routing — the canary rollout of the Istio bookinfo `reviews`
//! service, in the kernel, with no proxy.
//!
//! Needs root and the workspace binaries (`scripts/demo.sh` does both). Everything it creates is
//! removed when it ends; traffic never leaves the namespaces it makes.
use std::{
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use kmesh_common::{lb_policy, mode};
use kmesh_snapshot::{
    Snapshot,
    builder::{Endpoint, SnapshotBuilder},
};
use kmesh_tests::{
    Agent, AgentDir, AgentOptions, AgentSource, Pod, ProbeReport, TestCgroup, TestNetwork,
    write_atomically,
};

const NODE: &str = "demo-node";
const REVIEWS_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const PORT: u16 = 9080;
const CONNECTIONS: u32 = 1000;

struct Demo {
    _net: TestNetwork,
    cgroup: TestCgroup,
    client: Pod,
    versions: Vec<Pod>,
    snapshot_file: PathBuf,
}

impl Demo {
    fn snapshot(&self, generation: u64, node_mode: u32, weights: &[(u32, usize)]) -> Snapshot {
        let mut b = SnapshotBuilder::new(NODE, generation, node_mode);
        b.workload(IpAddr::V4(self.client.ipv4()), 1);
        let destinations: Vec<(u32, u32)> = weights
            .iter()
            .map(|&(weight, version)| {
                let pod = &self.versions[version];
                let set = b.backend_set(
                    lb_policy::RANDOM,
                    &[Endpoint::new(IpAddr::V4(pod.ipv4()), PORT, 2)],
                );
                (weight, set)
            })
            .collect();
        b.service(REVIEWS_VIP.into(), PORT, &destinations);
        b.build()
    }

    fn publish(&self, snapshot: &Snapshot) -> Result<(), String> {
        let bytes = snapshot.encode().map_err(|e| e.to_string())?;
        write_atomically(&self.snapshot_file, &bytes).map_err(|e| e.to_string())
    }

    fn probe(&self) -> Result<ProbeReport, String> {
        self.client
            .run_probe(
                &self.cgroup,
                &[
                    "--target",
                    &format!("{REVIEWS_VIP}:{PORT}"),
                    "--count",
                    &CONNECTIONS.to_string(),
                ],
            )
            .map_err(|e| e.to_string())
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kmesh-demo: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let e = |what: &str| {
        let what = what.to_string();
        move |err: std::io::Error| format!("{what}: {err}")
    };
    println!("== kmesh-rs demo: in-kernel traffic splitting, no sidecar ==\n");
    let net = TestNetwork::new("demo").map_err(e("creating the node network"))?;
    let cgroup = TestCgroup::new("demo").map_err(e("creating the test cgroup"))?;
    let dir = AgentDir::new("demo").map_err(e("pin directory"))?;
    let client = net
        .add_pod("productpage", Ipv4Addr::new(10, 244, 1, 10), None)
        .map_err(e("client pod"))?;
    let mut versions = Vec::new();
    let mut servers = Vec::new();
    for (i, name) in ["reviewsv1", "reviewsv2", "reviewsv3"].iter().enumerate() {
        let pod = net
            .add_pod(name, Ipv4Addr::new(10, 244, 2, i as u8 + 1), None)
            .map_err(e("reviews pod"))?;
        servers.push(pod.serve_tcp(PORT).map_err(e("reviews server"))?);
        versions.push(pod);
    }
    println!("pods (network namespaces on a bridge, no route out):");
    println!(
        "  productpage  {}  enrolled in the mesh (client)",
        client.ipv4()
    );
    for pod in &versions {
        println!("  {:<12} {}:{PORT}", pod.name(), pod.ipv4());
    }
    println!(
        "  service reviews  VIP {REVIEWS_VIP}:{PORT}  (no route to it exists: only the kernel program can deliver)\n"
    );

    let demo = Demo {
        _net: net,
        cgroup,
        client,
        versions,
        snapshot_file: std::env::temp_dir().join(format!("kmesh-demo-{}.snap", std::process::id())),
    };
    // (title, mode, [(weight, index of the reviews version)]) per generation.
    type Step = (&'static str, u32, &'static [(u32, usize)]);
    let steps: [Step; 4] = [
        ("all traffic to v1", mode::KERNEL_NATIVE, &[(100, 0)]),
        (
            "canary: 90% v1, 10% v2",
            mode::KERNEL_NATIVE,
            &[(90, 0), (10, 1)],
        ),
        ("50% v2, 50% v3", mode::KERNEL_NATIVE, &[(50, 1), (50, 2)]),
        (
            "mode Disabled: programs stay, traffic untouched",
            mode::DISABLED,
            &[(50, 1), (50, 2)],
        ),
    ];
    demo.publish(&demo.snapshot(1, steps[0].1, steps[0].2))?;
    let mut agent = Agent::start(&AgentOptions {
        node_name: NODE,
        source: AgentSource::File(&demo.snapshot_file),
        dir: &dir,
        cgroup: &demo.cgroup,
        extra_args: vec![],
    })
    .map_err(e("starting kmesh-agent"))?;
    agent
        .wait_ready(Duration::from_secs(20))
        .map_err(e("agent ready"))?;
    agent
        .wait_for(Duration::from_secs(5), "client enrolled", |a| {
            Ok(a.debug_snapshot()?["enrolled_netns"].as_u64() == Some(1))
        })
        .map_err(e("enrolment"))?;
    println!(
        "kmesh-agent running: programs attached to cgroup {}, admin on {}\n",
        demo.cgroup.path().display(),
        agent.admin_addr()
    );

    for (i, (title, node_mode, weights)) in steps.iter().enumerate() {
        let generation = i as u64 + 1;
        if generation > 1 {
            demo.publish(&demo.snapshot(generation, *node_mode, weights))?;
            agent
                .wait_for(Duration::from_secs(10), "generation applied", |a| {
                    Ok(a.debug_snapshot()?["live"]["generation"].as_u64() == Some(generation))
                })
                .map_err(e("applying the snapshot"))?;
        }
        let report = demo.probe()?;
        println!("generation {generation}: {title}");
        for pod in &demo.versions {
            let n = report.replies(pod.name());
            println!(
                "  {:<12} {:>5} connections  {:>5.1}%",
                pod.name(),
                n,
                100.0 * n as f64 / f64::from(CONNECTIONS)
            );
        }
        if report.failed > 0 {
            println!("  not delivered {:>4}  {:?}", report.failed, report.errors);
        }
        println!();
    }
    let status = agent.debug_snapshot().map_err(e("/debug/snapshot"))?;
    println!(
        "agent: {} snapshots applied, live generation {}, {} connects rewritten in the kernel",
        status["applied"], status["live"]["generation"], status["counters"]["rewritten"]
    );
    let _ = agent.terminate();
    let _ = std::fs::remove_file(&demo.snapshot_file);
    drop(servers);
    println!("done; namespaces, cgroup and pins removed.");
    Ok(())
}
