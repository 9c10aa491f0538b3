//! The first real-cluster scenario, driven as a user drives it: a real control plane
//! (etcd, kube-apiserver, kube-controller-manager, kube-scheduler), two nodes with fake kubelets,
//! the project installed with `kubectl apply -k` exactly as the README says (the operator and the
//! agents run from the shipped manifests, the operator as its own service account with the shipped
//! RBAC, the agents with tokens bound to their pods, over TLS), Istio's and the Gateway API's
//! CRDs, and Istio's unmodified bookinfo sample with its DestinationRules. A `sleep` pod (Istio's
//! sample) in the enrolled `default` namespace connects to the `reviews` VIP from a namespace with
//! no route out: Istio's 90/10 VirtualService splits the connections 90/10, then the v3
//! VirtualService sends all of them to v3. Timings are printed (start, install to agents ready,
//! `kubectl apply` to the kernel).
//!
//! Known product defects the run observes are printed, not asserted (`known defect` lines): the
//! lead fixes the product; the test then tightens.
//!
//! Needs root and the control-plane binaries (`scripts/control-plane-bins.sh`). Set
//! `KMESH_TEST_CLUSTER_HOLD_SECS=N` to keep the cluster N seconds after the scenario, to look at it
//! (`kubectl --kubeconfig /tmp/kmt-cluster-<pid>/admin.kubeconfig ...`).
use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Pod;
use kmesh_tests::{
    Cluster, NodeSpec, ProbeReport,
    cluster::{self, leftovers},
    progress,
};
use kube::{Api, api::ListParams};

const NAME: &str = "cluster";
const ISTIO: &str = "../shared/reference/istio";
const GATEWAY_API_CRDS: &str = "../shared/reference/gateway-api/config/crd/standard";
const TIMEOUT: &str = "--timeout=120s";

fn nodes() -> Vec<NodeSpec> {
    // Pod CIDRs 10.244.161.0/24 and .162.0/24: no other test uses them.
    [("node-a", 161), ("node-b", 162)]
        .into_iter()
        .map(|(name, subnet)| NodeSpec {
            name: name.into(),
            subnet,
        })
        .collect()
}

fn reference(path: &str) -> String {
    let p = cluster::repository().join(path);
    assert!(
        p.exists(),
        "{} is missing (../shared next to the checkout)",
        p.display()
    );
    path.to_string()
}

/// Pods of a namespace whose name starts with `prefix`.
fn pods(cluster: &Cluster, namespace: &str, prefix: &str) -> Vec<Pod> {
    let api: Api<Pod> = Api::namespaced(cluster.client(), namespace);
    let list = cluster
        .block_on(api.list(&ListParams::default()))
        .expect("list pods");
    list.items
        .into_iter()
        .filter(|p| {
            p.metadata
                .name
                .as_deref()
                .is_some_and(|n| n.starts_with(prefix))
        })
        .collect()
}

fn name(p: &Pod) -> &str {
    p.metadata.name.as_deref().unwrap_or_default()
}

fn node_of(p: &Pod) -> &str {
    p.spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .unwrap_or_default()
}

/// The live snapshot generation of an agent pod (its `/debug/snapshot`).
fn live_generation(cluster: &Cluster, agent: &str) -> Option<u64> {
    let (code, body) = cluster
        .pod_get("kmesh-system", agent, 15200, "/debug/snapshot")
        .ok()?;
    if code != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    v["live"]["generation"].as_u64()
}

/// The live generation of an agent that is ready: asked again for up to 10 s (a slow answer on a
/// loaded machine is not a failure), then a failure naming what the endpoint said.
fn live_generation_now(cluster: &Cluster, agent: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(generation) = live_generation(cluster, agent) {
            return generation;
        }
        assert!(
            Instant::now() < deadline,
            "{agent}: no live generation on /debug/snapshot for 10 s: {:?}",
            cluster.pod_get("kmesh-system", agent, 15200, "/debug/snapshot")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Replies from pods whose name starts with `prefix`.
fn replies_from(report: &ProbeReport, prefix: &str) -> u64 {
    report
        .by_reply
        .iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(_, n)| n)
        .sum()
}

/// `prefix`'s share of the successful connections is `expected` within 5 standard deviations.
fn assert_share(report: &ProbeReport, prefix: &str, expected: f64) {
    let n = report.ok as f64;
    let observed = replies_from(report, prefix) as f64 / n;
    let tolerance = 5.0 * (expected * (1.0 - expected) / n).sqrt();
    progress!(
        "share of {prefix}*: observed {observed:.4}, expected {expected:.2} ± {tolerance:.4} (n = {n})"
    );
    assert!(
        (observed - expected).abs() <= tolerance,
        "share of {prefix}* is {observed:.4}, expected {expected} ± {tolerance:.4}: {report:?}"
    );
}

/// Applies `file` and returns how long until every agent runs a newer snapshot generation.
fn apply_until_live(cluster: &Cluster, file: &str, agents: &[String]) -> Duration {
    let before: Vec<u64> = agents
        .iter()
        .map(|a| live_generation_now(cluster, a))
        .collect();
    let applied = Instant::now();
    cluster
        .kubectl()
        .run(&["apply", "-f", &reference(file)])
        .unwrap();
    let accepted = applied.elapsed();
    let mut pending: BTreeSet<usize> = (0..agents.len()).collect();
    while !pending.is_empty() {
        assert!(
            applied.elapsed() < Duration::from_secs(60),
            "{file}: agents {:?} still at generations {before:?} after 60 s",
            pending.iter().map(|i| &agents[*i]).collect::<Vec<_>>()
        );
        pending.retain(|&i| live_generation(cluster, &agents[i]).is_none_or(|g| g <= before[i]));
        if !pending.is_empty() {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let took = applied.elapsed();
    progress!(
        "kubectl apply -f {file} -> live in the kernel of every node after {took:.2?} \
         ({:.2?} after kubectl returned)",
        took - accepted
    );
    took
}

#[test]
fn bookinfo_on_a_real_control_plane_follows_istio_virtual_services() {
    let started = Instant::now();
    {
        let cluster = Cluster::start(NAME, &nodes()).expect("test cluster");
        run_scenario(&cluster);
        if let Some(secs) = std::env::var("KMESH_TEST_CLUSTER_HOLD_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
        {
            progress!("holding the cluster for {secs} s (KMESH_TEST_CLUSTER_HOLD_SECS)");
            std::thread::sleep(Duration::from_secs(secs));
        }
    }
    let left = leftovers(NAME);
    assert!(left.is_empty(), "the cluster left behind: {left:?}");
    progress!("cluster test done in {:.1?}", started.elapsed());
}

fn run_scenario(cluster: &Cluster) {
    install_crds(cluster);
    let (agents, install_time) = install_kmesh(cluster);
    deploy_bookinfo(cluster);
    check_bookinfo_pods(cluster);
    let client = replace_client(cluster);
    let target = reviews_target(cluster);
    wait_until_steered(cluster, &client, &target);

    let canary = apply_until_live(
        cluster,
        &format!("{ISTIO}/samples/bookinfo/networking/virtual-service-reviews-90-10.yaml"),
        &agents,
    );
    let report = probe(cluster, &client, &target, 2000);
    assert_eq!(report.ok, 2000, "{report:?}");
    assert_share(&report, "reviews-v1-", 0.9);
    assert_share(&report, "reviews-v2-", 0.1);

    let all_v3 = apply_until_live(
        cluster,
        &format!("{ISTIO}/samples/bookinfo/networking/virtual-service-reviews-v3.yaml"),
        &agents,
    );
    let report = probe(cluster, &client, &target, 2000);
    assert_eq!(report.ok, 2000, "{report:?}");
    assert_eq!(replies_from(&report, "reviews-v3-"), 2000, "{report:?}");

    // The operator, as its own service account with the shipped RBAC, was never refused.
    let operator_log = cluster.pod_log("kmesh-system_kmesh-operator-");
    assert!(!operator_log.is_empty(), "no operator log");
    assert!(
        !operator_log.contains("forbidden"),
        "the operator's RBAC refused something:\n{operator_log}"
    );
    report_known_defects(cluster, &operator_log);
    progress!(
        "timings: cluster start {:.1?}, install to agents ready {install_time:.1?}, apply to \
         kernel {canary:.2?} (90/10) and {all_v3:.2?} (v3)",
        cluster.start_time
    );
}

/// Istio's and the Gateway API's CRDs (server-side: some of Istio's are too big for the
/// last-applied annotation of a client-side apply).
fn install_crds(cluster: &Cluster) {
    let k = cluster.kubectl();
    let istio = reference(&format!(
        "{ISTIO}/manifests/charts/base/files/crd-all.gen.yaml"
    ));
    k.run(&["apply", "--server-side", "-f", &istio]).unwrap();
    k.run(&["apply", "--server-side", "-f", &reference(GATEWAY_API_CRDS)])
        .unwrap();
}

/// The install, as the README says; returns the agents' pod names once every agent is ready, and how long that took.
fn install_kmesh(cluster: &Cluster) -> (Vec<String>, Duration) {
    let k = cluster.kubectl();
    let install = Instant::now();
    let applied = k
        .run_full(&["apply", "-k", "config/default"], None)
        .unwrap();
    if applied.stderr.contains("unrecognized format") {
        progress!(
            "known defect (6): creating the KmeshConfig CRD warns: {}",
            applied.stderr.trim().replace('\n', "; ")
        );
    }
    // One command: the operator creates the KmeshConfig `default`, its own CA and certificate.
    for workload in ["deployment/kmesh-operator", "daemonset/kmesh-agent"] {
        k.run(&["rollout", "status", "-n", "kmesh-system", workload, TIMEOUT])
            .unwrap();
    }
    let install_time = install.elapsed();
    progress!("install to agents ready: {install_time:.1?}");
    let agents = pods(cluster, "kmesh-system", "kmesh-agent-");
    let agent_nodes: BTreeSet<&str> = agents.iter().map(node_of).collect();
    assert_eq!(
        agent_nodes,
        BTreeSet::from(["node-a", "node-b"]),
        "one agent per node"
    );
    k.run(&["get", "pods", "-n", "kmesh-system", "-o", "wide"])
        .unwrap();
    (
        agents.iter().map(|p| name(p).to_string()).collect(),
        install_time,
    )
}

/// The enrolled namespace, bookinfo, its DestinationRules, a client; all available.
fn deploy_bookinfo(cluster: &Cluster) {
    let k = cluster.kubectl();
    let enrol = "istio.io/dataplane-mode=Kmesh";
    k.run(&["label", "namespace", "default", enrol]).unwrap();
    for file in [
        "samples/bookinfo/platform/kube/bookinfo.yaml",
        "samples/bookinfo/networking/destination-rule-all.yaml",
        "samples/sleep/sleep.yaml",
    ] {
        k.run(&["apply", "-f", &reference(&format!("{ISTIO}/{file}"))])
            .unwrap();
    }
    let available = "--for=condition=Available";
    k.run(&[
        "wait",
        available,
        "deployment",
        "--all",
        "-n",
        "default",
        TIMEOUT,
    ])
    .unwrap();
    k.run(&["get", "pods", "-n", "default", "-o", "wide"])
        .unwrap();
}

/// Every bookinfo pod runs on one of the two nodes, both nodes are used, and each pod's server
/// answers with its name.
fn check_bookinfo_pods(cluster: &Cluster) {
    let mut used_nodes = BTreeSet::new();
    for prefix in [
        "details-",
        "ratings-",
        "reviews-v1-",
        "reviews-v2-",
        "reviews-v3-",
        "productpage-",
    ] {
        let found = pods(cluster, "default", prefix);
        assert_eq!(found.len(), 1, "one {prefix}* pod: {found:?}");
        let pod = &found[0];
        assert_eq!(
            pod.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Running"),
            "{pod:?}"
        );
        used_nodes.insert(node_of(pod).to_string());
        let reply = cluster.pod_reply("default", name(pod), 9080).unwrap();
        assert_eq!(reply, name(pod), "pod {} answers with its name", name(pod));
    }
    assert_eq!(
        used_nodes,
        BTreeSet::from(["node-a".to_string(), "node-b".to_string()]),
        "bookinfo is spread over both nodes"
    );
}

/// Deletes the first sleep pod: the kubelet stops it and finalises the deletion (kubectl waits
/// for that), the Deployment replaces it. Returns the replacement, the client of the scenario.
fn replace_client(cluster: &Cluster) -> String {
    let k = cluster.kubectl();
    let first = pods(cluster, "default", "sleep-");
    assert_eq!(first.len(), 1, "{first:?}");
    let first = name(&first[0]).to_string();
    // A graceful deletion (sleep.yaml's own grace period is 0, which the API server honours by
    // removing the pod at once): the pod stays Terminating until its kubelet finalises it.
    let graceful = "--grace-period=30";
    k.run(&["delete", "pod", "-n", "default", &first, graceful, TIMEOUT])
        .unwrap();
    let deleted = Instant::now();
    while cluster
        .network()
        .netns_names()
        .iter()
        .any(|n| n.ends_with(&format!("-{first}")))
    {
        assert!(
            deleted.elapsed() < Duration::from_secs(10),
            "the deleted pod's network namespace is still there"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let available = "--for=condition=Available";
    k.run(&[
        "wait",
        available,
        "deployment/sleep",
        "-n",
        "default",
        TIMEOUT,
    ])
    .unwrap();
    let sleep: Vec<Pod> = pods(cluster, "default", "sleep-")
        .into_iter()
        .filter(|p| name(p) != first)
        .collect();
    assert_eq!(sleep.len(), 1, "one replacement sleep pod: {sleep:?}");
    progress!("client pod {} on {}", name(&sleep[0]), node_of(&sleep[0]));
    name(&sleep[0]).to_string()
}

/// The reviews Service's VIP:port.
fn reviews_target(cluster: &Cluster) -> String {
    let jsonpath = "jsonpath={.spec.clusterIP}";
    let vip = cluster
        .kubectl()
        .run(&["get", "service", "reviews", "-n", "default", "-o", jsonpath])
        .unwrap();
    format!("{}:9080", vip.trim())
}

/// `count` connections from pod `client` to `target`.
fn probe(cluster: &Cluster, client: &str, target: &str, count: u32) -> ProbeReport {
    let count = count.to_string();
    let args = [
        "--target",
        target,
        "--count",
        &count,
        "--timeout-ms",
        "2000",
    ];
    cluster.run_probe("default", client, &args).unwrap()
}

/// With the DestinationRules alone, reviews is one Service over its three versions: waits until
/// the client's node steers it (the client enrolled, every endpoint ready).
fn wait_until_steered(cluster: &Cluster, client: &str, target: &str) {
    let steady = Instant::now();
    loop {
        let r = probe(cluster, client, target, 60);
        let versions = ["reviews-v1-", "reviews-v2-", "reviews-v3-"]
            .iter()
            .filter(|p| replies_from(&r, p) > 0)
            .count();
        if r.ok == 60 && versions == 3 {
            progress!("reviews VIP {target} steered to all three versions: {r:?}");
            return;
        }
        assert!(
            steady.elapsed() < Duration::from_secs(90),
            "the client's connections to {target} are not steered to every reviews pod: {r:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Prints what the run shows of the product defects the lead is to fix (see the report of the
/// cluster harness): observed here, not asserted.
fn report_known_defects(cluster: &Cluster, operator_log: &str) {
    let k = cluster.kubectl();
    if let Some(line) = operator_log
        .lines()
        .find(|l| l.contains("not served by the API server") && l.contains("TCPRoute"))
    {
        progress!(
            "known defect (3): the operator watches TCPRoute at a version not served: {line}"
        );
    }
    // (5) Ready lags the data plane: every node runs the snapshot now; how long until Ready?
    let since_live = Instant::now();
    match k.run(&[
        "wait",
        "--for=condition=Ready",
        "kmeshconfig/default",
        "--timeout=45s",
    ]) {
        Ok(_) => progress!(
            "KmeshConfig Ready {:.1?} after every node ran the snapshot{}",
            since_live.elapsed(),
            if since_live.elapsed() > Duration::from_secs(2) {
                " (known defect (5): agents report their live generation on the next long poll)"
            } else {
                ""
            }
        ),
        Err(e) => {
            progress!("known defect (5): KmeshConfig not Ready 45 s after the data plane: {e}")
        }
    }
    let _ = k.run(&[
        "get",
        "kmeshconfig",
        "default",
        "-o",
        "jsonpath={range .status.conditions[*]}{.type}={.status} ({.reason}): {.message}{\"\\n\"}{end}",
    ]);
}
