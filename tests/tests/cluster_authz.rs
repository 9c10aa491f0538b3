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
//! Last, the operator restarts while its RBAC forbids AuthorizationPolicies: it publishes nothing
//! (every agent keeps its generation, a DENY stays enforced, a routing change made meanwhile waits)
//! and says why in the KmeshConfig status, an Event and a metric; with the RBAC restored, it
//! publishes within seconds.
//!
//! Needs root and the control-plane binaries (`scripts/control-plane-bins.sh`).
use std::time::{Duration, Instant};

use kmesh_tests::{
    Cluster,
    cluster::{
        observe::{self, AgentPod, AgentState, agent_status, condition},
        scenario::{
            REVIEWS_VERSIONS, enrol, install_istio_crds, istio, only_pod, pod_name, pod_node, pods,
            probe, run_cluster, service_target, two_nodes, wait_available, wait_rolled_out,
            wait_until_steered,
        },
    },
    progress,
};
use serde_json::Value;

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

/// `productpage` may not connect to `ratings` (bookinfo never does: reviews calls ratings).
const DENY_RATINGS_FROM_PRODUCTPAGE: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: ratings-not-from-productpage
  namespace: default
spec:
  selector:
    matchLabels:
      app: ratings
  action: DENY
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/bookinfo-productpage"]
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
    let productpage = only_pod(cluster, "default", "productpage-");
    let reviews = only_pod(cluster, "default", "reviews-v1-");
    let outsider = only_pod(cluster, "outside", "sleep-");
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
    publishing_held_while_policies_cannot_be_read(cluster, &productpage, &ratings_vip);
}

/// The README's install, and Istio's CRDs.
fn install(cluster: &Cluster) {
    install_istio_crds(cluster);
    cluster
        .kubectl()
        .run(&["apply", "-k", "config/default"])
        .unwrap();
    wait_rolled_out(cluster);
}

/// Bookinfo in the enrolled `default`, and a sleep pod in `outside`, which is not enrolled.
fn deploy(cluster: &Cluster) {
    let k = cluster.kubectl();
    enrol(cluster, "default");
    k.run(&["create", "namespace", "outside"]).unwrap();
    let bookinfo = istio("samples/bookinfo/platform/kube/bookinfo.yaml");
    let sleep = istio("samples/sleep/sleep.yaml");
    k.run(&["apply", "-f", &bookinfo]).unwrap();
    k.run(&["apply", "-n", "outside", "-f", &sleep]).unwrap();
    k.run_full(&["apply", "-f", "-"], Some(PROBED)).unwrap();
    for namespace in ["default", "outside"] {
        wait_available(cluster, namespace);
    }
    k.run(&["get", "pods", "-A", "-o", "wide"]).unwrap();
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

    let ratings = only_pod(cluster, "default", "ratings-");
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
    let details = only_pod(cluster, "default", "details-");
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

// ---- the operator restarted without the right to read AuthorizationPolicies ----

/// The status reason while publishing is held (the operator's `condition::HELD_REASON`).
const HELD_REASON: &str = "AuthorizationUnreadable";

/// A DENY policy is enforced; the operator restarts with RBAC that forbids AuthorizationPolicies,
/// and a routing change is made meanwhile (reviews to v3 only). Held: the status is Degraded
/// (`AuthorizationUnreadable`, naming the kind and the API server's 403) and not Ready, an Event and
/// the metric say so, no agent's live generation changes, the DENY (and STRICT) still refuse every
/// connection, the routing change is not live. With the RBAC restored: within seconds every node
/// runs a new generation with the routing change, the DENY still holds, the condition clears.
fn publishing_held_while_policies_cannot_be_read(
    cluster: &Cluster,
    productpage: &str,
    ratings_vip: &str,
) {
    apply(cluster, DENY_RATINGS_FROM_PRODUCTPAGE);
    wait_until_refused(cluster, "default", productpage, ratings_vip);
    let reviews_vip = service_target(cluster, "reviews", 9080);
    let agents = observe::agents(cluster).unwrap();
    let before = quiet_states(cluster, &agents);
    progress!("before the restart: {:?}", lives(&before));

    let role = cluster_role(cluster);
    replace(cluster, &without_authorization_policies(&role));
    restart_operator(cluster);
    // The routing change, made while no operator can read AuthorizationPolicies.
    let k = cluster.kubectl();
    for file in [
        "destination-rule-reviews.yaml",
        "virtual-service-reviews-v3.yaml",
    ] {
        let path = istio(&format!("samples/bookinfo/networking/{file}"));
        k.run(&["apply", "-f", &path]).unwrap();
    }
    let held = Instant::now();
    let config = observe::wait_kmeshconfig(cluster, Duration::from_secs(60), |c| {
        condition(c, "Degraded").is_some_and(|(_, reason, _)| reason == HELD_REASON)
    })
    .expect("the restarted operator says it holds publishing");
    progress!(
        "held, said in the status {:.1?} after the restart",
        held.elapsed()
    );
    assert_held_status(&config);
    assert_held_event_and_metric(cluster);
    nothing_published_while_held(
        cluster,
        &agents,
        &before,
        productpage,
        ratings_vip,
        &reviews_vip,
    );

    replace(cluster, &role);
    let restored = Instant::now();
    let after = published_once_readable(cluster, &agents, &before, productpage, &reviews_vip);
    progress!(
        "figure: RBAC restored -> every node runs a new generation with the routing change \
         {:.1?}: {:?}",
        restored.elapsed(),
        lives(&after)
    );
    let denied = probe(cluster, productpage, ratings_vip, 100);
    assert_all_refused("productpage -> ratings after the hold (DENY)", &denied, 100);
    observe::wait_kmeshconfig(cluster, Duration::from_secs(15), |c| {
        let reason = |t| condition(c, t).map(|(status, reason, _)| (status, reason));
        reason("Degraded").is_some_and(|(_, r)| r != HELD_REASON)
            && reason("Ready").is_some_and(|(s, _)| s == "True")
    })
    .expect("the condition clears once the policies are read");
    assert_held_logged_once(cluster);
}

/// The agents' states once no live generation has changed for a second.
fn quiet_states(cluster: &Cluster, agents: &[AgentPod]) -> Vec<AgentState> {
    let started = Instant::now();
    let mut last = observe::agent_states(cluster, agents).unwrap();
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let now = observe::agent_states(cluster, agents).unwrap();
        if now.iter().zip(&last).all(|(n, l)| n.live == l.live) {
            return now;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the agents never settle: {now:?}"
        );
        last = now;
    }
}

fn lives(states: &[AgentState]) -> Vec<Option<(u64, String)>> {
    states.iter().map(|s| s.live.clone()).collect()
}

fn cluster_role(cluster: &Cluster) -> Value {
    let k = cluster.kubectl();
    let role = k
        .run(&["get", "clusterrole", "kmesh-operator", "-o", "json"])
        .unwrap();
    let mut role: Value = serde_json::from_str(&role).unwrap();
    // Replaced unconditionally later: no resourceVersion to conflict on.
    let metadata = role["metadata"].as_object_mut().expect("metadata");
    metadata.remove("resourceVersion");
    metadata.remove("managedFields");
    role
}

/// `role` without `authorizationpolicies` (PeerAuthentications stay readable).
fn without_authorization_policies(role: &Value) -> Value {
    let mut role = role.clone();
    let rules = role["rules"].as_array_mut().expect("rules");
    let mut removed = 0;
    for rule in rules.iter_mut() {
        if let Some(resources) = rule["resources"].as_array_mut() {
            let count = resources.len();
            resources.retain(|r| r != "authorizationpolicies");
            removed += count - resources.len();
        }
    }
    assert_eq!(
        removed, 1,
        "the ClusterRole names authorizationpolicies once"
    );
    role
}

fn replace(cluster: &Cluster, role: &Value) {
    cluster
        .kubectl()
        .run_stdin(&["replace", "-f", "-"], &role.to_string())
        .unwrap();
}

/// Deletes every operator pod; their Deployment starts new ones.
fn restart_operator(cluster: &Cluster) {
    cluster
        .restart_operators()
        .expect("delete the operator pods");
}

/// Degraded names the kind and the API server's refusal and says nothing is published; Ready is
/// False.
fn assert_held_status(config: &Value) {
    let (status, _, message) = condition(config, "Degraded").unwrap();
    assert_eq!(status, "True", "{message}");
    for needed in [
        "AuthorizationPolicy.security.istio.io",
        "forbidden",
        "no snapshot is published until",
    ] {
        assert!(
            message.contains(needed),
            "Degraded says {needed:?}: {message}"
        );
    }
    assert!(
        !message.contains("PeerAuthentication"),
        "PeerAuthentications are readable: {message}"
    );
    let (ready, reason, message) = condition(config, "Ready").unwrap();
    assert_eq!(
        (ready.as_str(), reason.as_str()),
        ("False", "PublishingHeld"),
        "{message}"
    );
}

/// A Warning Event `AuthorizationUnreadable` on the KmeshConfig, and every operator's gauge at 1.
fn assert_held_event_and_metric(cluster: &Cluster) {
    let selector = format!("reason={HELD_REASON}");
    let started = Instant::now();
    loop {
        let args = [
            "get",
            "events",
            "-A",
            "--field-selector",
            &selector,
            "-o",
            "json",
        ];
        let out = cluster.kubectl().run(&args).unwrap();
        let events: Value = serde_json::from_str(&out).unwrap();
        let items = events["items"].as_array().cloned().unwrap_or_default();
        if let Some(event) = items.first() {
            assert_eq!(event["type"], "Warning", "{event}");
            assert_eq!(event["involvedObject"]["kind"], "KmeshConfig", "{event}");
            let message = event["message"].as_str().unwrap_or_default();
            assert!(message.contains("forbidden"), "{event}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no {HELD_REASON} Event"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let operators = pods(cluster, "kmesh-system", "kmesh-operator-");
    assert!(!operators.is_empty(), "no operator pod");
    for operator in operators {
        let name = pod_name(&operator);
        let (code, body) = cluster
            .pod_get("kmesh-system", &name, 15301, "/metrics")
            .unwrap();
        assert_eq!(code, 200, "{name} /metrics");
        assert!(
            body.contains("kmesh_operator_publishing_held 1\n"),
            "{name} holds: {}",
            body.lines()
                .filter(|l| l.contains("held"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

/// For 5 s: no agent's live generation changes; then the DENY and STRICT refuse every connection
/// and reviews is still spread over its versions (the routing change is not live); and still no
/// generation changed.
fn nothing_published_while_held(
    cluster: &Cluster,
    agents: &[AgentPod],
    before: &[AgentState],
    productpage: &str,
    ratings_vip: &str,
    reviews_vip: &str,
) {
    let unchanged = |what: &str| {
        let now = observe::agent_states(cluster, agents).unwrap();
        assert_eq!(
            lives(&now),
            lives(before),
            "{what}: an agent's live generation changed while publishing is held"
        );
    };
    let watched = Instant::now();
    while watched.elapsed() < Duration::from_secs(5) {
        unchanged("held");
        std::thread::sleep(Duration::from_millis(200));
    }
    let denied = probe(cluster, productpage, ratings_vip, 100);
    assert_all_refused("productpage -> ratings while held (DENY)", &denied, 100);
    let spread = probe(cluster, productpage, reviews_vip, 100);
    assert_eq!(
        spread.ok, 100,
        "productpage -> reviews while held: {spread:?}"
    );
    let versions = REVIEWS_VERSIONS
        .iter()
        .filter(|v| spread.replies_from(v) > 0);
    assert!(
        versions.count() > 1,
        "the routing change made while held is not live: {spread:?}"
    );
    unchanged("after the probes");
}

/// Polls (up to 20 s) until every agent runs a generation newer than `before`'s and every
/// connection from productpage to reviews reaches v3: the operator published at once.
fn published_once_readable(
    cluster: &Cluster,
    agents: &[AgentPod],
    before: &[AgentState],
    productpage: &str,
    reviews_vip: &str,
) -> Vec<AgentState> {
    let deadline = Duration::from_secs(20);
    let newer = observe::wait_agents(cluster, agents, deadline, |i, s| {
        s.generation() > before[i].generation()
    })
    .expect("every node gets a new generation once the policies are readable");
    let started = Instant::now();
    loop {
        let r = probe(cluster, productpage, reviews_vip, 50);
        if r.ok == 50 && r.replies_from("reviews-v3-") == 50 {
            return newer;
        }
        assert!(
            started.elapsed() < deadline,
            "the routing change is not live after the hold: {r:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Each new operator logged the hold once, at error level.
fn assert_held_logged_once(cluster: &Cluster) {
    cluster
        .assert_operators_logged_once(&["Objects authorization is compiled from cannot be read"]);
}
