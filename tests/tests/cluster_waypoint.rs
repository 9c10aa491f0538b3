//! DualEngine's waypoint on a real control plane, driven as a user drives it (issue #11):
//! `kubectl apply` of a Gateway of class `istio-waypoint` makes the operator create the waypoint's
//! ServiceAccount, Service and Deployment, whose two pods run the real `kmesh-waypoint` and turn
//! ready once they fetched their configuration from the operator with their own service-account
//! token; `kubectl label namespace shop istio.io/use-waypoint=waypoint` then moves the namespace's
//! services behind it; deleting the Gateway removes its objects (owner references, the garbage
//! collector of kube-controller-manager) and the services' label is reported; another waypoint of
//! the namespace, there before, stays whole (its CA ConfigMap, its pods' restart).
//!
//! The evidence that traffic goes through the waypoint: bookinfo's jason route (`end-user: jason`
//! to v2, every other request to v1), which only the waypoint can honour (the kernel sees no
//! headers), answered by real HTTP servers (`kmesh-echo` in the harness's test image
//! `kmesh-tests/kmesh-echo`) that report their version; and the waypoint's own
//! `istio_requests_total`, which counts every request it proxied.
//!
//! The install is the README's (`kubectl apply -k config/default`), then `mode: DualEngine`.
//! Needs root and the control-plane binaries (`scripts/control-plane-bins.sh`).
use std::{
    os::unix::fs::MetadataExt as _,
    time::{Duration, Instant},
};

use kmesh_tests::{
    Cluster,
    cluster::scenario::{
        GATEWAY_API_CRDS, TIMEOUT, enrol, install_istio_crds, pod_name, pod_node, pods, reference,
        run_cluster, two_nodes, wait_available, wait_rolled_out,
    },
    http_probe::HttpReport,
    progress, workspace_bin,
};

const NAME: &str = "waypoint";
/// The application namespace, enrolled; the waypoint lives there too (as `istioctl waypoint
/// apply -n shop` puts it).
const NS: &str = "shop";
/// The waypoint's admin port (`/readyz`, `/metrics`).
const WAYPOINT_ADMIN: u16 = 15021;
/// Requests per check: every one is counted by version.
const REQUESTS: u64 = 200;

/// reviews (its Deployments: [`reviews_deployment`]), its DestinationRule subsets v1 and v2,
/// bookinfo's jason route over them, and a client pod.
const APP: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: reviews
  namespace: shop
spec:
  selector:
    app: reviews
  ports:
  - name: http
    port: 9080
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: client
  namespace: shop
spec:
  replicas: 1
  selector:
    matchLabels: {app: client}
  template:
    metadata:
      labels: {app: client}
    spec:
      containers:
      - name: sleep
        image: docker.io/curlimages/curl:8.16.0
        command: ["/bin/sleep", "infinity"]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
  namespace: shop
spec:
  host: reviews
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
  namespace: shop
spec:
  hosts: [reviews]
  http:
  - match:
    - headers:
        end-user:
          exact: jason
    route:
    - destination: {host: reviews, subset: v2}
  - route:
    - destination: {host: reviews, subset: v1}
"#;

/// reviews `version`: a real HTTP server (`kmesh-echo`) answering with its version.
fn reviews_deployment(version: &str) -> String {
    format!(
        r#"---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: reviews-{version}
  namespace: shop
spec:
  replicas: 1
  selector:
    matchLabels: {{app: reviews, version: {version}}}
  template:
    metadata:
      labels: {{app: reviews, version: {version}}}
    spec:
      containers:
      - name: reviews
        image: docker.io/kmesh-tests/kmesh-echo:test
        args: ["--listen", "0.0.0.0:9080", "--version", "{version}"]
        ports:
        - containerPort: 9080
        readinessProbe:
          httpGet: {{path: /ready, port: 9080}}
          periodSeconds: 1
"#
    )
}

/// A waypoint in the same namespace before `waypoint` comes, bound to nothing: deleting
/// `waypoint` must leave it whole (its CA ConfigMap included).
const SPARE: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: spare
  namespace: shop
spec:
  gatewayClassName: istio-waypoint
  listeners:
  - name: mesh
    port: 15008
    protocol: HBONE
"#;

/// The waypoint, as `istioctl waypoint generate -n shop` writes it.
const GATEWAY: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: waypoint
  namespace: shop
  labels:
    istio.io/waypoint-for: service
spec:
  gatewayClassName: istio-waypoint
  listeners:
  - name: mesh
    port: 15008
    protocol: HBONE
"#;

#[test]
fn a_gateway_brings_up_the_waypoint_and_use_waypoint_moves_a_namespace_behind_it() {
    // Checked before anything starts: a missing one would otherwise show as a pod never ready.
    for bin in ["kmesh-waypoint", "kmesh-echo", "kmesh-http"] {
        if let Err(e) = workspace_bin(bin) {
            panic!("{e} (build it: cargo build --workspace --bins)");
        }
    }
    run_cluster(NAME, &two_nodes(187, 188), |cluster| run_scenario(cluster));
}

fn run_scenario(cluster: &Cluster) {
    let k = cluster.kubectl();
    install_istio_crds(cluster);
    k.run(&["apply", "--server-side", "-f", &reference(GATEWAY_API_CRDS)])
        .unwrap();
    k.run(&["apply", "-k", "config/default"]).unwrap();
    wait_rolled_out(cluster);
    let dual_engine = r#"{"spec":{"mode":"DualEngine"}}"#;
    k.run(&[
        "patch",
        "kmeshconfig",
        "default",
        "--type",
        "merge",
        "-p",
        dual_engine,
    ])
    .unwrap();

    k.run(&["create", "namespace", NS]).unwrap();
    enrol(cluster, NS);
    let app = format!(
        "{APP}{}{}",
        reviews_deployment("v1"),
        reviews_deployment("v2")
    );
    k.run_stdin(&["apply", "-f", "-"], &app).unwrap();
    wait_available(cluster, NS);
    let client = only(cluster, "client-");

    // A waypoint already there, bound to nothing.
    k.run_stdin(&["apply", "-f", "-"], SPARE).unwrap();
    waypoint_up(cluster, "spare");

    // 2. The Gateway brings up the waypoint.
    let applied = Instant::now();
    k.run_stdin(&["apply", "-f", "-"], GATEWAY).unwrap();
    let waypoints = waypoint_up(cluster, "waypoint");
    progress!(
        "kubectl apply of the Gateway -> 2 waypoint pods ready after {:.1?}",
        applied.elapsed()
    );

    // 3. Before the label, reviews is on the kernel path: no waypoint sees its requests, so the
    //    jason route (a header match) is not honoured.
    //    The kernel follows the VirtualService's route without a match (the operator reports
    //    the header match as enforced only by a waypoint): every request reaches v1.
    let before = requests(cluster, &client, Some("end-user: jason"));
    assert_eq!(
        (before.status(200), before.version("v1")),
        (REQUESTS, REQUESTS),
        "without the waypoint, jason's requests follow the route without a match: {before:?}"
    );
    progress!("before the label, jason's requests on the kernel path: {before:?}");
    let proxied_before = proxied_requests(cluster, &waypoints);
    assert_eq!(
        proxied_before, 0,
        "the waypoint proxied requests before the label"
    );

    let labelled = Instant::now();
    k.run(&["label", "namespace", NS, "istio.io/use-waypoint=waypoint"])
        .unwrap();
    wait_for(Duration::from_secs(30), "the jason route honoured", || {
        let r = requests(cluster, &client, Some("end-user: jason"));
        (r.version("v2") == REQUESTS)
            .then_some(())
            .ok_or_else(|| format!("{r:?}"))
    });
    progress!(
        "kubectl label namespace {NS} istio.io/use-waypoint -> behind the waypoint after {:.1?}",
        labelled.elapsed()
    );
    let jason = requests(cluster, &client, Some("end-user: jason"));
    assert_eq!(
        (jason.status(200), jason.version("v2")),
        (REQUESTS, REQUESTS),
        "{jason:?}"
    );
    let others = requests(cluster, &client, None);
    assert_eq!(
        (others.status(200), others.version("v1")),
        (REQUESTS, REQUESTS),
        "{others:?}"
    );
    let proxied = proxied_requests(cluster, &waypoints);
    assert!(
        proxied >= 2 * REQUESTS,
        "the waypoints counted {proxied} requests to reviews, {} were sent through them",
        2 * REQUESTS
    );
    progress!(
        "through the waypoint: jason {jason:?}, others {others:?}; istio_requests_total {proxied}"
    );

    // 4. Deleting the Gateway removes its objects; the label then names no waypoint.
    let deleted = Instant::now();
    k.run(&["delete", "gateway", "waypoint", "-n", NS, TIMEOUT])
        .unwrap();
    wait_for(
        Duration::from_secs(60),
        "the waypoint's objects gone",
        || {
            let left = k
                .run(&[
                    "get",
                    "deployment,service,serviceaccount,configmap",
                    "-n",
                    NS,
                    "-l",
                    "gateway.networking.k8s.io/gateway-name=waypoint",
                    "-o",
                    "name",
                ])
                .unwrap();
            left.trim().is_empty().then_some(()).ok_or(left)
        },
    );
    progress!(
        "kubectl delete gateway -> its Deployment, Service, ServiceAccount gone after {:.1?}",
        deleted.elapsed()
    );
    spare_stays_whole(cluster);
    let reported = "waypoint shop/waypoint is not a Gateway of class istio-waypoint";
    wait_for(
        Duration::from_secs(30),
        "the dangling label reported",
        || {
            let status = k
                .run(&["get", "kmeshconfig", "default", "-o", "jsonpath={.status}"])
                .unwrap();
            status.contains(reported).then_some(()).ok_or(status)
        },
    );
    // Back on the kernel path (ambient's rule for a label naming no waypoint), not refused.
    wait_for(
        Duration::from_secs(30),
        "reviews on the kernel path",
        || {
            let r = requests(cluster, &client, Some("end-user: jason"));
            (r.status(200) == REQUESTS && r.version("v1") == REQUESTS)
                .then_some(())
                .ok_or_else(|| format!("{r:?}"))
        },
    );
    // The operator, as its own service account with the shipped RBAC, was never refused; and the
    // deleted waypoint's own Service, left for the garbage collector, was never taken for a
    // Service the namespace's label is meant for.
    let operator_log = cluster.pod_log("kmesh-system_kmesh-operator-");
    assert!(
        !operator_log.contains("forbidden"),
        "the operator's RBAC refused something:\n{operator_log}"
    );
    let own_service = format!("Service {NS}/waypoint stays on the kernel path");
    assert!(
        !operator_log.contains(&own_service),
        "the waypoint's own Service was reported as bound to its deleted waypoint:\n{operator_log}"
    );
}

/// Once `waypoint`'s objects are gone, `spare` keeps the CA ConfigMap its pods mount, and a
/// replacement of its pods (a rescheduling, a node's restart) starts and turns ready.
fn spare_stays_whole(cluster: &Cluster) {
    let k = cluster.kubectl();
    let ca = k
        .run(&[
            "get",
            "deployment",
            "spare",
            "-n",
            NS,
            "-o",
            "jsonpath={.spec.template.spec.volumes[?(@.name==\"ca\")].configMap.name}",
        ])
        .unwrap();
    let ca = ca.trim();
    assert!(!ca.is_empty(), "spare's pods mount no CA ConfigMap");
    let exists = k.run(&["get", "configmap", ca, "-n", NS, "-o", "name"]);
    assert!(
        exists.is_ok(),
        "deleting Gateway waypoint removed ConfigMap {ca}, which Gateway spare's pods mount: {exists:?}"
    );
    let spare = "gateway.networking.k8s.io/gateway-name=spare";
    k.run(&["delete", "pod", "-n", NS, "-l", spare, "--wait=true"])
        .unwrap();
    k.run(&[
        "rollout",
        "status",
        "deployment/spare",
        "-n",
        NS,
        "--timeout=30s",
    ])
    .unwrap();
    progress!("Gateway spare kept its CA ConfigMap {ca}; its new pods are ready");
}

/// The one pod of namespace [`NS`] whose name starts with `prefix`.
fn only(cluster: &Cluster, prefix: &str) -> String {
    let found = pods(cluster, NS, prefix);
    assert_eq!(found.len(), 1, "one {NS}/{prefix}* pod: {found:?}");
    progress!("{NS}/{} on {}", pod_name(&found[0]), pod_node(&found[0]));
    pod_name(&found[0])
}

/// Waits for the operator's objects of waypoint `gateway` and its two pods: each runs the
/// workspace's `kmesh-waypoint` for `shop/<gateway>`, and its `/readyz` says 200 after it adopted a
/// configuration it fetched from the operator (`kmesh_waypoint_operator_requests_total{code="200"}`).
/// Returns the pods' names.
fn waypoint_up(cluster: &Cluster, gateway: &str) -> Vec<String> {
    let k = cluster.kubectl();
    let deployment = format!("deployment/{gateway}");
    wait_for(Duration::from_secs(60), "the waypoint's Deployment", || {
        k.run(&["get", &deployment, "-n", NS, "-o", "name"])
            .map(drop)
            .map_err(|e| e.to_string())
    });
    k.run(&["rollout", "status", &deployment, "-n", NS, TIMEOUT])
        .unwrap();
    let owned_by = format!("Gateway/{gateway}");
    for kind in ["serviceaccount", "service", "deployment"] {
        let owner = k
            .run(&[
                "get",
                kind,
                gateway,
                "-n",
                NS,
                "-o",
                "jsonpath={.metadata.ownerReferences[0].kind}/{.metadata.ownerReferences[0].name}",
            ])
            .unwrap();
        assert_eq!(owner.trim(), owned_by, "{kind} {gateway}'s owner");
    }
    let replicas = pods(cluster, NS, &format!("{gateway}-"));
    assert_eq!(replicas.len(), 2, "two {gateway} replicas: {replicas:?}");
    let binary = std::fs::metadata(workspace_bin("kmesh-waypoint").unwrap()).unwrap();
    let flag = format!("--waypoint={NS}/{gateway}");
    let names: Vec<String> = replicas.iter().map(pod_name).collect();
    for pod in &names {
        let runs_waypoint = cluster.pod_pids(NS, pod).unwrap().into_iter().any(|pid| {
            let exe = std::fs::metadata(format!("/proc/{pid}/exe"));
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            exe.is_ok_and(|m| (m.dev(), m.ino()) == (binary.dev(), binary.ino()))
                && String::from_utf8_lossy(&cmdline).contains(&flag)
        });
        assert!(runs_waypoint, "pod {pod} runs no kmesh-waypoint {flag}");
        let (code, body) = cluster.pod_get(NS, pod, WAYPOINT_ADMIN, "/readyz").unwrap();
        assert_eq!(code, 200, "{pod} /readyz: {body}");
        let fetched = metric(
            cluster,
            pod,
            "kmesh_waypoint_operator_requests_total{code=\"200\"}",
        );
        assert!(
            fetched >= 1,
            "{pod} is ready but never fetched its configuration from the operator"
        );
    }
    progress!(
        "{gateway} pods {names:?} run kmesh-waypoint, ready with the operator's configuration"
    );
    names
}

/// [`REQUESTS`] keep-alive requests from `client` to reviews (through its VIP, as the client's
/// node's kernel steers them), with `header` if given.
fn requests(cluster: &Cluster, client: &str, header: Option<&str>) -> HttpReport {
    let target = service_vip(cluster);
    let count = REQUESTS.to_string();
    let mut args = vec![
        "--target",
        &target,
        "--count",
        &count,
        "--timeout-ms",
        "2000",
    ];
    if let Some(h) = header {
        args.extend(["--header", h]);
    }
    cluster.run_http(NS, client, &args).unwrap()
}

fn service_vip(cluster: &Cluster) -> String {
    let ip = cluster
        .kubectl()
        .run(&[
            "get",
            "service",
            "reviews",
            "-n",
            NS,
            "-o",
            "jsonpath={.spec.clusterIP}",
        ])
        .unwrap();
    format!("{}:9080", ip.trim())
}

/// The requests to reviews both waypoint replicas counted (`istio_requests_total`).
fn proxied_requests(cluster: &Cluster, waypoints: &[String]) -> u64 {
    waypoints
        .iter()
        .map(|pod| {
            let (code, text) = cluster
                .pod_get(NS, pod, WAYPOINT_ADMIN, "/metrics")
                .unwrap();
            assert_eq!(code, 200, "{pod} /metrics");
            text.lines()
                .filter(|l| {
                    l.starts_with("istio_requests_total{")
                        && l.contains("destination_service_name=\"reviews\"")
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>() as u64
        })
        .sum()
}

/// The value of the metric line starting with `series` on waypoint pod `pod` (0 if absent).
fn metric(cluster: &Cluster, pod: &str, series: &str) -> u64 {
    let (_, text) = cluster
        .pod_get(NS, pod, WAYPOINT_ADMIN, "/metrics")
        .unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix(series))
        .filter_map(|v| v.trim().parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Polls `check` every 200 ms until it holds; fails after `limit` with what it last said.
fn wait_for(limit: Duration, what: &str, mut check: impl FnMut() -> Result<(), String>) {
    let started = Instant::now();
    loop {
        match check() {
            Ok(()) => return,
            Err(e) if started.elapsed() > limit => {
                panic!("{what}: not after {limit:?}; last: {e}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}
