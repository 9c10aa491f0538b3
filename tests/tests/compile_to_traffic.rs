//! YAML to traffic: the bookinfo cluster fixture plus Istio's own reviews VirtualServices, compiled
//! by `kmeshctl compile -o binary`, loaded by the real agent, and the kernel splits connections
//! from the productpage pod's namespace to the reviews VIP as the VirtualService says.
use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use kmesh_tests::{
    Agent, AgentDir, AgentOptions, AgentSource, Pod, ProbeReport, TestCgroup, TestNetwork,
    workspace_bin, write_atomically,
};

const NODE: &str = "node-1";
const REVIEWS_VIP: &str = "10.96.77.13:9080";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `kmeshctl compile ... -o binary`, as a GitOps pipeline would run it.
fn kmeshctl_compile(virtual_service: &str, generation: u64) -> Vec<u8> {
    let networking = repo().join("../shared/reference/istio/samples/bookinfo/networking");
    assert!(
        networking.exists(),
        "{} is missing (../shared next to the checkout)",
        networking.display()
    );
    let out = Command::new(workspace_bin("kmeshctl").expect("kmeshctl binary"))
        .args([
            "compile",
            "--node",
            NODE,
            "-o",
            "binary",
            "--generation",
            &generation.to_string(),
            "-f",
        ])
        .arg(repo().join("tests/fixtures/bookinfo"))
        .arg("-f")
        .arg(networking.join("destination-rule-all.yaml"))
        .arg("-f")
        .arg(networking.join(virtual_service))
        .output()
        .expect("run kmeshctl");
    assert!(
        out.status.success(),
        "kmeshctl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn assert_share(report: &ProbeReport, pod: &str, expected: f64) {
    let n = report.ok as f64;
    let observed = report.replies(pod) as f64 / n;
    let tolerance = 5.0 * (expected * (1.0 - expected) / n).sqrt();
    println!("{pod}: {observed:.4} (expected {expected} ± {tolerance:.4})");
    assert!(
        (observed - expected).abs() <= tolerance,
        "{pod}: {observed} vs {expected}: {report:?}"
    );
}

#[test]
fn reviews_virtual_services_split_traffic_in_the_kernel() {
    let net = TestNetwork::new("bookinfo").expect("network");
    let cgroup = TestCgroup::new("bookinfo").expect("cgroup");
    let dir = AgentDir::new("bookinfo").expect("pins");
    // The fixture's pod addresses.
    let productpage: Pod = net
        .add_pod("productpage", Ipv4Addr::new(10, 244, 77, 10), None)
        .unwrap();
    let mut servers = Vec::new();
    for (name, host) in [("reviewsv1", 21), ("reviewsv2", 22), ("reviewsv3", 23)] {
        let pod = net
            .add_pod(name, Ipv4Addr::new(10, 244, 77, host), None)
            .unwrap();
        servers.push(pod.serve_tcp(9080).unwrap());
    }
    let snapshot_file =
        std::env::temp_dir().join(format!("kmt-bookinfo-{}.snap", std::process::id()));
    let _cleanup = RemoveOnDrop(snapshot_file.clone());
    write_atomically(
        &snapshot_file,
        &kmeshctl_compile("virtual-service-reviews-90-10.yaml", 1),
    )
    .unwrap();
    let mut agent = Agent::start(&AgentOptions {
        node_name: NODE,
        source: AgentSource::File(&snapshot_file),
        dir: &dir,
        cgroup: &cgroup,
        extra_args: vec![],
    })
    .expect("agent");
    agent.wait_ready(Duration::from_secs(20)).expect("ready");
    // productpage and the three reviews pods are enrolled workloads with a namespace here.
    agent
        .wait_for(Duration::from_secs(5), "4 enrolled", |a| {
            Ok(a.debug_snapshot()?["enrolled_netns"] == 4)
        })
        .unwrap();
    let probe = || {
        productpage
            .run_probe(
                &cgroup,
                &[
                    "--target",
                    REVIEWS_VIP,
                    "--count",
                    "2000",
                    "--timeout-ms",
                    "2000",
                ],
            )
            .unwrap()
    };

    let report = probe();
    assert_eq!(report.ok, 2000, "{report:?}");
    assert_share(&report, "reviewsv1", 0.9);
    assert_share(&report, "reviewsv2", 0.1);

    write_atomically(
        &snapshot_file,
        &kmeshctl_compile("virtual-service-reviews-50-v3.yaml", 2),
    )
    .unwrap();
    agent
        .wait_for(Duration::from_secs(10), "generation 2", |a| {
            Ok(a.debug_snapshot()?["live"]["generation"] == 2)
        })
        .unwrap();
    let report = probe();
    assert_eq!(report.ok, 2000, "{report:?}");
    assert_share(&report, "reviewsv1", 0.5);
    assert_share(&report, "reviewsv3", 0.5);
    assert_eq!(report.replies("reviewsv2"), 0);
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
