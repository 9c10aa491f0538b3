//! Authorization on a real control plane, driven as a user drives it: Istio AuthorizationPolicy and
//! PeerAuthentication objects applied with kubectl are enforced in the kernel of the node that runs
//! the selected workload, and only there.
//!
//! The install is the README's (`kubectl apply -k config/default`), the mesh is Istio's bookinfo
//! in the enrolled `default` namespace, each workload with its own service account (its identity),
//! and a `sleep` pod in the namespace `outside`, which is not enrolled (a client without a mesh
//! identity). Every check counts exact outcomes per connection: the errno of each failure, the pod
//! that answered each success.
//!
//! Needs root and the control-plane binaries (`scripts/control-plane-bins.sh`).
use std::time::{Duration, Instant};

use kmesh_tests::{
    Cluster,
    cluster::{
        observe::agent_status,
        scenario::{
            ISTIO, TIMEOUT, pod_name, pod_node, pods, probe, reference, run_cluster,
            service_target, two_nodes, wait_until_steered,
        },
    },
    progress,
};

const NAME: &str = "authz";

/// Only the `reviews` workloads (service account `bookinfo-reviews`) may connect to `ratings`:
/// bookinfo's own call graph.
const RATINGS_FROM_REVIEWS: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: ratings-from-reviews
  namespace: default
spec:
  selector:
    matchLabels:
      app: ratings
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/bookinfo-reviews"]
"#;

/// A workload whose readiness the kubelet probes from the node every second, and which turns not
/// ready at the first refused probe.
const PROBED: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: probed
  namespace: default
spec:
  replicas: 1
  selector:
    matchLabels:
      app: probed
  template:
    metadata:
      labels:
        app: probed
    spec:
      containers:
      - name: server
        image: docker.io/library/probed:test
        ports:
        - containerPort: 8080
        readinessProbe:
          tcpSocket:
            port: 8080
          periodSeconds: 1
          failureThreshold: 1
"#;

/// Every workload of `default` accepts mesh peers only.
const STRICT_DEFAULT: &str = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: strict
  namespace: default
spec:
  mtls:
    mode: STRICT
"#;

#[test]
fn authorization_policies_applied_with_kubectl_are_enforced_on_the_right_node() {
    run_cluster(NAME, &two_nodes(165, 166), |cluster| run_scenario(cluster));
}

fn run_scenario(cluster: &Cluster) {
    install(cluster);
    deploy(cluster);
    let productpage = first_pod(cluster, "default", "productpage-");
    let reviews = first_pod(cluster, "default", "reviews-v1-");
    let outsider = first_pod(cluster, "outside", "sleep-");
    let ratings_vip = service_target(cluster, "ratings", 9080);
    let details_vip = service_target(cluster, "details", 9080);
    wait_until_steered(cluster, &productpage, &ratings_vip, &["ratings-"], 20);
    wait_until_steered(cluster, &reviews, &ratings_vip, &["ratings-"], 20);

    allow_ratings_from_reviews_only(
        cluster,
        &productpage,
        &reviews,
        &outsider,
        &ratings_vip,
        &details_vip,
    );
    strict_peer_authentication(cluster, &productpage, &outsider, &details_vip);
}

/// The README's install, and Istio's CRDs.
fn install(cluster: &Cluster) {
    let k = cluster.kubectl();
    let istio = reference(&format!(
        "{ISTIO}/manifests/charts/base/files/crd-all.gen.yaml"
    ));
    k.run(&["apply", "--server-side", "-f", &istio]).unwrap();
    k.run(&["apply", "-k", "config/default"]).unwrap();
    for workload in ["deployment/kmesh-operator", "daemonset/kmesh-agent"] {
        k.run(&["rollout", "status", "-n", "kmesh-system", workload, TIMEOUT])
            .unwrap();
    }
}

/// Bookinfo in the enrolled `default`, and a sleep pod in `outside`, which is not enrolled.
fn deploy(cluster: &Cluster) {
    let k = cluster.kubectl();
    k.run(&[
        "label",
        "namespace",
        "default",
        "istio.io/dataplane-mode=Kmesh",
    ])
    .unwrap();
    k.run(&["create", "namespace", "outside"]).unwrap();
    let bookinfo = reference(&format!(
        "{ISTIO}/samples/bookinfo/platform/kube/bookinfo.yaml"
    ));
    let sleep = reference(&format!("{ISTIO}/samples/sleep/sleep.yaml"));
    k.run(&["apply", "-f", &bookinfo]).unwrap();
    k.run(&["apply", "-n", "outside", "-f", &sleep]).unwrap();
    k.run_full(&["apply", "-f", "-"], Some(PROBED)).unwrap();
    for namespace in ["default", "outside"] {
        let available = "--for=condition=Available";
        k.run(&[
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
    k.run(&["get", "pods", "-A", "-o", "wide"]).unwrap();
}

fn first_pod(cluster: &Cluster, namespace: &str, prefix: &str) -> String {
    let found = pods(cluster, namespace, prefix);
    let pod = found
        .first()
        .unwrap_or_else(|| panic!("no {namespace}/{prefix}* pod"));
    progress!("{namespace}/{} on {}", pod_name(pod), pod_node(pod));
    pod_name(pod)
}

fn apply(cluster: &Cluster, yaml: &str) -> Instant {
    let applied = Instant::now();
    cluster
        .kubectl()
        .run_full(&["apply", "-f", "-"], Some(yaml))
        .unwrap();
    applied
}

/// `pod:port` of pod `namespace/name`, dialled directly (a client outside the mesh has no
/// service VIP steering, and the test network has no kube-proxy).
fn pod_target(cluster: &Cluster, namespace: &str, name: &str, port: u16) -> String {
    let (_, _, ip) = cluster.sandbox(namespace, name).unwrap();
    format!("{ip}:{port}")
}

/// Waits (up to 30 s) until every one of 20 connections from `client` to `target` is refused:
/// the new policy is live in the destination's kernel. Returns how long that took.
fn wait_until_refused(cluster: &Cluster, namespace: &str, client: &str, target: &str) -> Duration {
    let started = Instant::now();
    loop {
        let r = cluster
            .run_probe(
                namespace,
                client,
                &["--target", target, "--count", "20", "--timeout-ms", "2000"],
            )
            .unwrap();
        if r.errors.get("ECONNREFUSED") == Some(&20) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{client} -> {target} still not refused 30 s after the policy: {r:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Asserts that all `count` connections of `report` were refused at once: ECONNREFUSED for
/// every one (a RST in answer to the SYN), never a timeout, and fast.
fn assert_all_refused(what: &str, report: &kmesh_tests::ProbeReport, count: u64) {
    assert_eq!(report.failed, count, "{what}: {report:?}");
    assert_eq!(
        report.errors.get("ECONNREFUSED"),
        Some(&count),
        "{what}: every connection refused: {report:?}"
    );
    let per_connection_us = report.elapsed_us / count.max(1);
    assert!(
        per_connection_us < 100_000,
        "{what}: a refusal takes {per_connection_us} us on average: {report:?}"
    );
}

fn allow_ratings_from_reviews_only(
    cluster: &Cluster,
    productpage: &str,
    reviews: &str,
    outsider: &str,
    ratings_vip: &str,
    details_vip: &str,
) {
    let applied = apply(cluster, RATINGS_FROM_REVIEWS);
    let took = wait_until_refused(cluster, "default", productpage, ratings_vip);
    progress!(
        "ALLOW ratings from reviews: enforced {took:.2?} after the probe loop started, {:.2?} \
         after kubectl apply",
        applied.elapsed()
    );

    let allowed = probe(cluster, reviews, ratings_vip, 200);
    assert_eq!(
        allowed.ok, 200,
        "reviews -> ratings is allowed: {allowed:?}"
    );
    assert_eq!(allowed.replies_from("ratings-"), 200, "{allowed:?}");

    let denied = probe(cluster, productpage, ratings_vip, 200);
    assert_all_refused("productpage -> ratings", &denied, 200);

    let ratings = first_pod(cluster, "default", "ratings-");
    let ratings_pod = pod_target(cluster, "default", &ratings, 9080);
    let outside = cluster
        .run_probe(
            "outside",
            outsider,
            &[
                "--target",
                &ratings_pod,
                "--count",
                "50",
                "--timeout-ms",
                "2000",
            ],
        )
        .unwrap();
    assert_all_refused("outside/sleep (no mesh identity) -> ratings", &outside, 50);

    // Workloads the policy does not select are untouched.
    let details = probe(cluster, productpage, details_vip, 100);
    assert_eq!(details.ok, 100, "productpage -> details: {details:?}");

    // The node itself (the kubelet's probes) is exempt.
    let reply = cluster.pod_reply("default", &ratings, 9080).unwrap();
    assert_eq!(reply, ratings, "a connection from the node to ratings");

    enforced_on_the_ratings_node_only(cluster, &ratings);
}

/// The agent of the node running `ratings` holds its authorization entry and counted its
/// connections under the policy; the other node's agent holds no entry and counted nothing: a
/// node gets only the policies that bind its own workloads.
fn enforced_on_the_ratings_node_only(cluster: &Cluster, ratings: &str) {
    let ratings_node = pod_node(&pods(cluster, "default", ratings)[0]);
    let (_, _, ratings_ip) = cluster.sandbox("default", ratings).unwrap();
    for agent in pods(cluster, "kmesh-system", "kmesh-agent-") {
        let name = pod_name(&agent);
        let status = agent_status(cluster, &name).unwrap();
        let entries = status
            .pointer("/live/counts/authz_workloads")
            .and_then(|v| v.as_u64());
        let (code, body) = cluster
            .pod_get("kmesh-system", &name, 15200, "/debug/authz")
            .unwrap();
        assert_eq!(code, 200, "{name} /debug/authz: {body}");
        let report: serde_json::Value = serde_json::from_str(&body).unwrap();
        let counted = |policy: Option<&str>, action: &str, reason: &str| -> u64 {
            report["by_policy"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|c| c["workload_ip"] == ratings_ip.to_string())
                .filter(|c| c["policy_name"]["name"].as_str() == policy)
                .filter(|c| c["action"] == action && c["reason"] == reason)
                .filter_map(|c| c["connections"].as_u64())
                .sum()
        };
        if pod_node(&agent) == ratings_node {
            assert_eq!(
                entries,
                Some(1),
                "{name}: the ratings node has one authz entry"
            );
            let allowed = counted(
                Some("default/ratings-from-reviews"),
                "allow",
                "allow_matched",
            );
            let denied = counted(None, "deny", "no_allow_matched");
            progress!("{name}: ratings allowed {allowed}, denied {denied}: {body}");
            assert!(allowed >= 200, "{name}: allowed by the policy: {body}");
            assert!(denied >= 250, "{name}: denied, no ALLOW matched: {body}");
        } else {
            assert_eq!(entries, Some(0), "{name} (no ratings pod): authz entries");
            let by_policy = report["by_policy"].as_array().map_or(0, Vec::len);
            assert_eq!(by_policy, 0, "{name} (no ratings pod) counted: {body}");
        }
    }
}

fn strict_peer_authentication(
    cluster: &Cluster,
    productpage: &str,
    outsider: &str,
    details_vip: &str,
) {
    cluster
        .kubectl()
        .run(&[
            "delete",
            "authorizationpolicy",
            "-n",
            "default",
            "ratings-from-reviews",
        ])
        .unwrap();
    let applied = apply(cluster, STRICT_DEFAULT);
    let details = first_pod(cluster, "default", "details-");
    let details_pod = pod_target(cluster, "default", &details, 9080);
    let took = wait_until_refused(cluster, "outside", outsider, &details_pod);
    progress!(
        "STRICT in default: enforced {took:.2?} after the probe loop started, {:.2?} after \
         kubectl apply",
        applied.elapsed()
    );
    let outside = cluster
        .run_probe(
            "outside",
            outsider,
            &[
                "--target",
                &details_pod,
                "--count",
                "50",
                "--timeout-ms",
                "2000",
            ],
        )
        .unwrap();
    assert_all_refused("outside/sleep -> details under STRICT", &outside, 50);

    // Mesh peers keep their access; the node's probes keep the pod ready.
    let mesh = probe(cluster, productpage, details_vip, 200);
    assert_eq!(
        mesh.ok, 200,
        "productpage -> details under STRICT: {mesh:?}"
    );
    for _ in 0..20 {
        let reply = cluster.pod_reply("default", &details, 9080).unwrap();
        assert_eq!(reply, details, "the node's probe of details under STRICT");
    }
    stays_ready(cluster, "probed", Duration::from_secs(5));
}

/// The pod of Deployment `app` stays Ready for `time` while the kubelet probes it every second
/// (a refused probe would make it not ready at once: failureThreshold 1).
fn stays_ready(cluster: &Cluster, app: &str, time: Duration) {
    let selector = format!("app={app}");
    let jsonpath = r#"jsonpath={.items[0].status.conditions[?(@.type=="Ready")].status}"#;
    let started = Instant::now();
    while started.elapsed() < time {
        let ready = cluster
            .kubectl()
            .run(&[
                "get", "pods", "-n", "default", "-l", &selector, "-o", jsonpath,
            ])
            .unwrap();
        assert_eq!(
            ready.trim(),
            "True",
            "{app} under STRICT, probed from the node"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}
