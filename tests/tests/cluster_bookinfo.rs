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
//! The defects a first try met are asserted gone: no schema format warning at install, TCPRoute
//! watched at the version served, KmeshConfig Ready within seconds of the data plane.
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
    Cluster,
    cluster::{
        observe::live_generation,
        scenario::{
            GATEWAY_API_CRDS, ISTIO, REVIEWS_VERSIONS, TIMEOUT, deploy_bookinfo,
            install_istio_crds, pod_name, pod_node, pods, probe, reference, run_cluster,
            service_target, two_nodes, wait_rolled_out, wait_until_steered,
        },
    },
    progress,
};

const NAME: &str = "cluster";

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
    run_cluster(NAME, &two_nodes(161, 162), |cluster| run_scenario(cluster));
}

fn run_scenario(cluster: &Cluster) {
    install_crds(cluster);
    let (agents, install_time) = install_kmesh(cluster);
    deploy_bookinfo(cluster);
    cluster
        .kubectl()
        .run(&["get", "pods", "-n", "default", "-o", "wide"])
        .unwrap();
    check_bookinfo_pods(cluster);
    let client = replace_client(cluster);
    let target = service_target(cluster, "reviews", 9080);
    wait_until_steered(cluster, &client, &target, &REVIEWS_VERSIONS, 60);

    let canary = apply_until_live(
        cluster,
        &format!("{ISTIO}/samples/bookinfo/networking/virtual-service-reviews-90-10.yaml"),
        &agents,
    );
    let report = probe(cluster, &client, &target, 2000);
    assert_eq!(report.ok, 2000, "{report:?}");
    report.assert_share_from("reviews-v1-", 0.9);
    report.assert_share_from("reviews-v2-", 0.1);

    let all_v3 = apply_until_live(
        cluster,
        &format!("{ISTIO}/samples/bookinfo/networking/virtual-service-reviews-v3.yaml"),
        &agents,
    );
    let report = probe(cluster, &client, &target, 2000);
    assert_eq!(report.ok, 2000, "{report:?}");
    assert_eq!(report.replies_from("reviews-v3-"), 2000, "{report:?}");

    // The operator, as its own service account with the shipped RBAC, was never refused.
    let operator_log = cluster.pod_log("kmesh-system_kmesh-operator-");
    assert!(!operator_log.is_empty(), "no operator log");
    assert!(
        !operator_log.contains("forbidden"),
        "the operator's RBAC refused something:\n{operator_log}"
    );
    ready_follows_the_data_plane(cluster);
    progress!(
        "timings: cluster start {:.1?}, install to agents ready {install_time:.1?}, apply to \
         kernel {canary:.2?} (90/10) and {all_v3:.2?} (v3)",
        cluster.start_time
    );
}

/// Istio's and the Gateway API's CRDs (server-side: some of Istio's are too big for the
/// last-applied annotation of a client-side apply).
fn install_crds(cluster: &Cluster) {
    install_istio_crds(cluster);
    cluster
        .kubectl()
        .run(&["apply", "--server-side", "-f", &reference(GATEWAY_API_CRDS)])
        .unwrap();
}

/// The install, as the README says; returns the agents' pod names once every agent is ready, and
/// how long that took.
fn install_kmesh(cluster: &Cluster) -> (Vec<String>, Duration) {
    let k = cluster.kubectl();
    let install = Instant::now();
    let applied = k
        .run_full(&["apply", "-k", "config/default"], None)
        .unwrap();
    assert!(
        !applied.stderr.contains("unrecognized format"),
        "the CRDs carry formats Kubernetes does not know: {}",
        applied.stderr.trim()
    );
    // One command: the operator creates the KmeshConfig `default`, its own CA and certificate.
    wait_rolled_out(cluster);
    let install_time = install.elapsed();
    progress!("install to agents ready: {install_time:.1?}");
    let agents = pods(cluster, "kmesh-system", "kmesh-agent-");
    let agent_nodes: BTreeSet<String> = agents.iter().map(pod_node).collect();
    assert_eq!(
        agent_nodes,
        BTreeSet::from(["node-a".to_string(), "node-b".to_string()]),
        "one agent per node"
    );
    k.run(&["get", "pods", "-n", "kmesh-system", "-o", "wide"])
        .unwrap();
    (agents.iter().map(pod_name).collect(), install_time)
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
        used_nodes.insert(pod_node(pod).to_string());
        let reply = cluster.pod_reply("default", &pod_name(pod), 9080).unwrap();
        assert_eq!(
            reply,
            pod_name(pod),
            "pod {} answers with its name",
            pod_name(pod)
        );
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
    let first = pod_name(&first[0]);
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
        .filter(|p| pod_name(p) != first)
        .collect();
    assert_eq!(sleep.len(), 1, "one replacement sleep pod: {sleep:?}");
    progress!(
        "client pod {} on {}",
        pod_name(&sleep[0]),
        pod_node(&sleep[0])
    );
    pod_name(&sleep[0])
}

/// Every kind is watched at a version the API server serves (TCPRoute at `v1` in Gateway API
/// v1.6.1: `status.unwatched` is empty), and KmeshConfig `default` is Ready within 10 s of every
/// node running the snapshot (agents report their live generation at once; it used to wait for
/// their next long poll, 30 s).
fn ready_follows_the_data_plane(cluster: &Cluster) {
    let k = cluster.kubectl();
    let unwatched = k
        .run(&[
            "get",
            "kmeshconfig",
            "default",
            "-o",
            "jsonpath={.status.unwatched}",
        ])
        .unwrap();
    assert!(
        matches!(unwatched.trim(), "" | "[]"),
        "kinds the operator does not watch, with every CRD installed: {unwatched}"
    );
    let since_live = Instant::now();
    let ready = k.run(&[
        "wait",
        "--for=condition=Ready",
        "kmeshconfig/default",
        "--timeout=10s",
    ]);
    let _ = k.run(&[
        "get",
        "kmeshconfig",
        "default",
        "-o",
        "jsonpath={range .status.conditions[*]}{.type}={.status} ({.reason}): {.message}{\"\\n\"}{end}",
    ]);
    if let Err(e) = ready {
        panic!("KmeshConfig not Ready 10 s after every node ran the snapshot: {e}");
    }
    progress!(
        "KmeshConfig Ready {:.1?} after every node ran the snapshot",
        since_live.elapsed()
    );
}
