//! What the cluster scenarios (`tests/tests/cluster_*.rs`) share: the reference files they apply,
//! their two nodes, the install steps they have in common (Istio's CRDs, waiting for kmesh-rs to
//! roll out, enrolling a namespace, bookinfo), pods found by name prefix, and connections from a
//! client pod (the agents' data planes are read with [`super::observe`]). Scenario-specific steps
//! (how each installs kmesh-rs, what it measures) stay in each test file.
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::{Api, api::ListParams};

use super::{Cluster, NodeSpec, leftovers, repository};
use crate::{ProbeReport, progress};

/// The timeout of the scenarios' `kubectl wait` and `rollout status`.
pub const TIMEOUT: &str = "--timeout=120s";
/// Istio's sources (samples, CRDs) in `../shared/reference`, relative to the repository.
pub const ISTIO: &str = "../shared/reference/istio";
/// The Gateway API's standard CRDs (v1.6.1).
pub const GATEWAY_API_CRDS: &str = "../shared/reference/gateway-api/config/crd/standard";
/// The name prefixes of the pods of bookinfo's three reviews versions.
pub const REVIEWS_VERSIONS: [&str; 3] = ["reviews-v1-", "reviews-v2-", "reviews-v3-"];

/// The namespace kmesh-rs is installed in.
pub const KMESH_NAMESPACE: &str = "kmesh-system";
/// The label that enrols a namespace's pods.
pub const ENROL_LABEL: &str = "istio.io/dataplane-mode=Kmesh";

/// `node-a` and `node-b` with the pod subnets `10.244.<a>.0/24` and `10.244.<b>.0/24` (each test
/// file uses its own, so that their clusters never share addresses).
pub fn two_nodes(a: u8, b: u8) -> Vec<NodeSpec> {
    [("node-a", a), ("node-b", b)]
        .into_iter()
        .map(|(name, subnet)| NodeSpec {
            name: name.into(),
            subnet,
        })
        .collect()
}

/// Starts cluster `name` on `nodes`, runs `scenario` on it, keeps it `KMESH_TEST_CLUSTER_HOLD_SECS`
/// seconds if that is set (to look at it with kubectl), removes it, and fails if anything of it is
/// left behind (processes, namespaces, cgroups, pins, directories).
pub fn run_cluster(name: &str, nodes: &[NodeSpec], scenario: impl FnOnce(&mut Cluster)) {
    let started = Instant::now();
    {
        let mut cluster = Cluster::start(name, nodes).expect("test cluster");
        scenario(&mut cluster);
        if let Some(secs) = std::env::var("KMESH_TEST_CLUSTER_HOLD_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
        {
            progress!("holding the cluster for {secs} s (KMESH_TEST_CLUSTER_HOLD_SECS)");
            std::thread::sleep(Duration::from_secs(secs));
        }
    }
    let left = leftovers(name);
    assert!(left.is_empty(), "the cluster left behind: {left:?}");
    progress!("cluster test {name} done in {:.1?}", started.elapsed());
}

/// `path` (relative to the repository) as kubectl is given it, once checked to exist: a missing
/// `../shared` fails here with a clear message, not in kubectl.
pub fn reference(path: &str) -> String {
    let p = repository().join(path);
    assert!(
        p.exists(),
        "{} is missing (../shared next to the checkout)",
        p.display()
    );
    path.to_string()
}

/// [`reference`] of a file below Istio's sources (`samples/bookinfo/...`).
pub fn istio(path: &str) -> String {
    reference(&format!("{ISTIO}/{path}"))
}

/// Istio's CRDs (every kind of `crd-all.gen.yaml`), applied server-side as the README says.
pub fn install_istio_crds(cluster: &Cluster) {
    let crds = istio("manifests/charts/base/files/crd-all.gen.yaml");
    cluster
        .kubectl()
        .run(&["apply", "--server-side", "-f", &crds])
        .unwrap();
}

/// Waits until the operator Deployment and the agent DaemonSet have rolled out.
pub fn wait_rolled_out(cluster: &Cluster) {
    for workload in ["deployment/kmesh-operator", "daemonset/kmesh-agent"] {
        cluster
            .kubectl()
            .run(&[
                "rollout",
                "status",
                "-n",
                KMESH_NAMESPACE,
                workload,
                TIMEOUT,
            ])
            .unwrap();
    }
}

/// Labels `namespace` for enrolment.
pub fn enrol(cluster: &Cluster, namespace: &str) {
    cluster
        .kubectl()
        .run(&["label", "namespace", namespace, ENROL_LABEL])
        .unwrap();
}

/// Waits until every Deployment of `namespace` is Available.
pub fn wait_available(cluster: &Cluster, namespace: &str) {
    let available = "--for=condition=Available";
    cluster
        .kubectl()
        .run(&[
            "wait",
            available,
            "deployment",
            "--all",
            "-n",
            namespace,
            TIMEOUT,
        ])
        .unwrap();
}

/// Istio's bookinfo with its DestinationRules and the `sleep` client in the enrolled `default`
/// namespace, every Deployment available.
pub fn deploy_bookinfo(cluster: &Cluster) {
    enrol(cluster, "default");
    for file in [
        "samples/bookinfo/platform/kube/bookinfo.yaml",
        "samples/bookinfo/networking/destination-rule-all.yaml",
        "samples/sleep/sleep.yaml",
    ] {
        cluster
            .kubectl()
            .run(&["apply", "-f", &istio(file)])
            .unwrap();
    }
    wait_available(cluster, "default");
}

/// The name of the one pod of `namespace` whose name starts with `prefix` (fails if there is
/// none or more than one).
pub fn only_pod(cluster: &Cluster, namespace: &str, prefix: &str) -> String {
    let found = pods(cluster, namespace, prefix);
    assert_eq!(found.len(), 1, "one {namespace}/{prefix}* pod: {found:?}");
    progress!(
        "{namespace}/{} on {}",
        pod_name(&found[0]),
        pod_node(&found[0])
    );
    pod_name(&found[0])
}

/// The pods of `namespace` whose name starts with `prefix`, except those being deleted.
pub fn pods(cluster: &Cluster, namespace: &str, prefix: &str) -> Vec<Pod> {
    let api: Api<Pod> = Api::namespaced(cluster.client(), namespace);
    let list = cluster
        .block_on(api.list(&ListParams::default()))
        .expect("list pods");
    list.items
        .into_iter()
        .filter(|p| pod_name(p).starts_with(prefix))
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect()
}

pub fn pod_name(p: &Pod) -> String {
    p.metadata.name.clone().unwrap_or_default()
}

/// The node a pod is bound to (empty while unscheduled).
pub fn pod_node(p: &Pod) -> String {
    p.spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_default()
}

/// `VIP:port` of Service `default/<service>`.
pub fn service_target(cluster: &Cluster, service: &str, port: u16) -> String {
    let jsonpath = "jsonpath={.spec.clusterIP}";
    let ip = cluster
        .kubectl()
        .run(&["get", "service", service, "-n", "default", "-o", jsonpath])
        .unwrap();
    format!("{}:{port}", ip.trim())
}

/// `count` connections from pod `default/<client>` to `target`, each given 2 s.
pub fn probe(cluster: &Cluster, client: &str, target: &str, count: u32) -> ProbeReport {
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

/// Waits (up to 90 s) until every one of `count` connections from `client` to `target` succeeds
/// and every group of pods in `prefixes` replies: the client is enrolled and every endpoint ready.
pub fn wait_until_steered(
    cluster: &Cluster,
    client: &str,
    target: &str,
    prefixes: &[&str],
    count: u32,
) {
    let started = Instant::now();
    loop {
        let r = probe(cluster, client, target, count);
        if r.ok == u64::from(count) && prefixes.iter().all(|p| r.replies_from(p) > 0) {
            progress!("{client} -> {target}: steered to every one of {prefixes:?}: {r:?}");
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "{client}'s connections to {target} do not reach every one of {prefixes:?}: {r:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}
