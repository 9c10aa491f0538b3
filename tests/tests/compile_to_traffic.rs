//! YAML to traffic: the bookinfo cluster fixture plus Istio's own reviews VirtualServices, compiled
//! by `kmeshctl compile -o binary`, loaded by the real agent, and the kernel splits connections
//! from the productpage pod's namespace to the reviews VIP as the VirtualService says.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use kmesh_tests::{
    Agent, AgentDir, AgentOptions, AgentSource, TempPath, TestCgroup, TestNetwork,
    bookinfo::BookinfoPods, workspace_bin, write_atomically,
};

const NODE: &str = "node-1";

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

#[test]
fn reviews_virtual_services_split_traffic_in_the_kernel() {
    let net = TestNetwork::new("bookinfo").expect("network");
    let cgroup = TestCgroup::new("bookinfo").expect("cgroup");
    let dir = AgentDir::new("bookinfo").expect("pins");
    let pods = BookinfoPods::new(&net).expect("bookinfo pods");
    let snapshot_file = TempPath::new("bookinfo.snap");
    write_atomically(
        snapshot_file.path(),
        &kmeshctl_compile("virtual-service-reviews-90-10.yaml", 1),
    )
    .unwrap();
    let mut agent = Agent::start(&AgentOptions {
        node_name: NODE,
        source: AgentSource::File(snapshot_file.path()),
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

    let report = pods.probe_reviews(&cgroup, 2000).unwrap();
    assert_eq!(report.ok, 2000, "{report:?}");
    report.assert_share("reviewsv1", 0.9);
    report.assert_share("reviewsv2", 0.1);

    write_atomically(
        snapshot_file.path(),
        &kmeshctl_compile("virtual-service-reviews-50-v3.yaml", 2),
    )
    .unwrap();
    agent
        .wait_for(Duration::from_secs(10), "generation 2", |a| {
            Ok(a.debug_snapshot()?["live"]["generation"] == 2)
        })
        .unwrap();
    let report = pods.probe_reviews(&cgroup, 2000).unwrap();
    assert_eq!(report.ok, 2000, "{report:?}");
    report.assert_share("reviewsv1", 0.5);
    report.assert_share("reviewsv3", 0.5);
    assert_eq!(report.replies("reviewsv2"), 0);
}
