//! The operator's high availability on a real control plane, driven as a user drives it (kubectl,
//! signals to the pods' processes as a node would deliver them), on one cluster in sequence:
//!
//! 1. **Install without a certificate**: `kubectl apply -k config/default` alone; the operator
//!    (2 replicas) makes its CA and serving certificate (Secret `kmesh-operator-tls`), publishes
//!    the CA (ConfigMap `kmesh-ca-root-cert`), the agents trust it; one Lease holder.
//! 2. **Leader killed during a Rolling rollout**: Rolling with a canary node, the canary's agent
//!    frozen (SIGSTOP) so the rollout stalls after the canary's decision; the leader's pod is
//!    deleted; the other replica takes the Lease, and once the canary's agent runs again (SIGCONT)
//!    its live report reaches the new leader, which moves the second node: no change lost. A client
//!    probes the Service continuously: 0 failed connections. Agents that switched replicas applied
//!    each change once (`applied` +1, no reapply of identical content); both replicas serve the
//!    same generations.
//! 3. **kube-apiserver stopped**: traffic continues (0 failed); a change made after it returns
//!    reaches the kernel within 15 s (time printed).
//! 4. **Every operator replica killed** (SIGKILL): traffic continues; the restarted operator serves
//!    the next change within 5 s of its restart (time printed).
//! 5. **Another node's token**: node A's pod-bound token asking for node B's snapshot gets exactly
//!    403 (and node A's own: 200).
//! 6. **Peak RSS** of the operators and agents (VmHWM), printed.
//!
//! Needs root and the control-plane binaries (`scripts/control-plane-bins.sh`).
use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec},
    coordination::v1::Lease,
    core::v1::{ConfigMap, Pod, Secret, ServiceAccount},
};
use kmesh_tests::{
    Cluster, ProbeHandle, ProbeReport, StopFile,
    cluster::{
        observe,
        scenario::{
            REVIEWS_VERSIONS, TIMEOUT, deploy_bookinfo, install_istio_crds, istio, only_pod,
            pod_name, pod_node, pods, probe, run_cluster, service_target, two_nodes,
            wait_rolled_out, wait_until_steered,
        },
    },
    progress,
};
use kube::{Api, api::PostParams};

const NAME: &str = "ha";
const NS: &str = "kmesh-system";
const VS_90_10: &str = "samples/bookinfo/networking/virtual-service-reviews-90-10.yaml";
const VS_V3: &str = "samples/bookinfo/networking/virtual-service-reviews-v3.yaml";
const VS_50_50: &str = "samples/bookinfo/networking/virtual-service-reviews-v2-v3.yaml";

#[test]
fn operator_replicas_fail_over_and_outages_keep_traffic_flowing() {
    run_cluster(NAME, &two_nodes(171, 172), run_scenarios);
}

fn run_scenarios(cluster: &mut Cluster) {
    let installing = Instant::now();
    install(cluster);
    let agents = agents(cluster);
    check_own_certificates(cluster);
    progress!(
        "install (no TLS Secret given) to agents ready: {:.1?}",
        installing.elapsed()
    );
    deploy_bookinfo(cluster);
    let client = only_pod(cluster, "default", "sleep-");
    let target = service_target(cluster, "reviews", 9080);
    wait_until_steered(cluster, &client, &target, &REVIEWS_VERSIONS, 60);

    leader_killed_during_rolling_rollout(cluster, &agents, &client, &target);
    apiserver_outage(cluster, &agents, &client, &target);
    all_operators_killed(cluster, &agents, &client, &target);
    another_nodes_token(cluster, &agents);
    peak_rss(cluster, &agents);
}

/// `kubectl apply -k config/default`, then the KmeshConfig; no Secret made by the test.
fn install(cluster: &Cluster) {
    let k = cluster.kubectl();
    install_istio_crds(cluster);
    k.run(&["apply", "-k", "config/default"]).unwrap();
    k.run(&[
        "wait",
        "--for=condition=Established",
        "crd/kmeshconfigs.kmesh.net",
        TIMEOUT,
    ])
    .unwrap();
    // Server-side, as the README says: the operator may have created `default` already, and a
    // client-side apply racing it fails with AlreadyExists (seen here).
    k.run(&["apply", "--server-side", "-k", "config/kmeshconfig"])
        .unwrap();
    wait_rolled_out(cluster);
}

/// Agent pod per node.
fn agents(cluster: &Cluster) -> BTreeMap<String, String> {
    let agents: BTreeMap<String, String> = pods(cluster, NS, "kmesh-agent-")
        .iter()
        .map(|p| (pod_node(p), pod_name(p)))
        .collect();
    assert_eq!(agents.len(), 2, "one agent per node: {agents:?}");
    agents
}

fn operators(cluster: &Cluster) -> Vec<String> {
    pods(cluster, NS, "kmesh-operator-")
        .iter()
        .map(pod_name)
        .collect()
}

/// An agent's `/debug/snapshot` (the test fails if it cannot be read).
fn agent_status(cluster: &Cluster, agent: &str) -> serde_json::Value {
    observe::agent_status(cluster, agent).unwrap_or_else(|e| panic!("{e}"))
}

fn live_generation(cluster: &Cluster, agent: &str) -> u64 {
    agent_status(cluster, agent)["live"]["generation"]
        .as_u64()
        .unwrap_or(0)
}

fn applied(cluster: &Cluster, agent: &str) -> (u64, u64) {
    let s = agent_status(cluster, agent);
    (
        s["applied"].as_u64().unwrap_or(0),
        s["unchanged"].as_u64().unwrap_or(0),
    )
}

/// The operator made its own CA and certificate; the agents trust it (they run a snapshot).
fn check_own_certificates(cluster: &Cluster) {
    let secrets: Api<Secret> = Api::namespaced(cluster.client(), NS);
    let secret = cluster
        .block_on(secrets.get("kmesh-operator-tls"))
        .expect("the operator's Secret");
    let managed = secret
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("app.kubernetes.io/managed-by"));
    assert_eq!(managed.map(String::as_str), Some("kmesh-operator"));
    let data = secret.data.unwrap_or_default();
    for key in ["tls.crt", "tls.key", "ca.crt", "ca-cert.pem", "ca-key.pem"] {
        assert!(data.contains_key(key), "the Secret lacks {key}");
    }
    let config_maps: Api<ConfigMap> = Api::namespaced(cluster.client(), NS);
    let bundle = cluster
        .block_on(config_maps.get("kmesh-ca-root-cert"))
        .expect("CA ConfigMap");
    let bundle = bundle
        .data
        .unwrap_or_default()
        .get("ca.crt")
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        bundle.as_bytes(),
        data["ca.crt"].0.as_slice(),
        "the ConfigMap publishes the Secret's CAs"
    );
    progress!(
        "the operator made its CA and serving certificate; the CA is published in kmesh-ca-root-cert"
    );
}

fn lease_holder(cluster: &Cluster) -> Option<String> {
    let leases: Api<Lease> = Api::namespaced(cluster.client(), NS);
    let lease = cluster
        .block_on(leases.get_opt("kmesh-operator-leader"))
        .ok()??;
    lease.spec?.holder_identity.filter(|h| !h.is_empty())
}

/// Waits until `holds` holds for the Lease holder; returns it and how long that took.
fn wait_for_holder(
    cluster: &Cluster,
    what: &str,
    holds: impl Fn(&str) -> bool,
) -> (String, Duration) {
    let started = Instant::now();
    loop {
        if let Some(h) = lease_holder(cluster)
            && holds(&h)
        {
            return (h, started.elapsed());
        }
        assert!(
            started.elapsed() < Duration::from_secs(40),
            "no Lease holder {what} within 40 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A client connecting to `target` every 5 ms until stopped.
struct Traffic {
    handle: ProbeHandle,
    stop: StopFile,
}

impl Traffic {
    fn start(cluster: &Cluster, client: &str, target: &str) -> Traffic {
        let stop = StopFile::new("ha-traffic");
        let args = [
            "--target",
            target,
            "--until-file",
            stop.arg(),
            "--timeout-ms",
            "2000",
            "--interval-us",
            "5000",
        ];
        let handle = cluster.spawn_probe("default", client, &args).unwrap();
        Traffic { handle, stop }
    }

    /// Stops the client and asserts that no connection failed.
    fn finish(self, what: &str) -> ProbeReport {
        self.stop.signal().unwrap();
        let report = self.handle.wait_timeout(Duration::from_secs(20)).unwrap();
        progress!(
            "traffic during {what}: {} connections, {} failed",
            report.attempts,
            report.failed
        );
        assert!(
            report.attempts > 100,
            "{what}: too few connections: {report:?}"
        );
        assert_eq!(report.failed, 0, "{what}: connections failed: {report:?}");
        report
    }
}

/// Applies a VirtualService of Istio's samples.
fn apply(cluster: &Cluster, file: &str) -> Instant {
    let at = Instant::now();
    cluster
        .kubectl()
        .run(&["apply", "-f", &istio(file)])
        .unwrap();
    at
}

/// Waits until every agent runs a generation above `before`; returns when.
fn wait_live_above(
    cluster: &Cluster,
    agents: &BTreeMap<String, String>,
    before: &BTreeMap<String, u64>,
    limit: Duration,
) -> Instant {
    let started = Instant::now();
    loop {
        let behind: Vec<&String> = agents
            .iter()
            .filter(|(node, agent)| live_generation(cluster, agent) <= before[*node])
            .map(|(node, _)| node)
            .collect();
        if behind.is_empty() {
            return Instant::now();
        }
        assert!(
            started.elapsed() < limit,
            "nodes {behind:?} still run generations {before:?} after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn live_generations(cluster: &Cluster, agents: &BTreeMap<String, String>) -> BTreeMap<String, u64> {
    agents
        .iter()
        .map(|(node, a)| (node.clone(), live_generation(cluster, a)))
        .collect()
}

/// Waits until every node runs the generation stored as its decision, read the same way twice
/// (decisions, live generations, decisions again) so that a decision made between the reads is
/// not mistaken for a node running something undecided; returns the decisions.
fn wait_nodes_run_stored_decisions(
    cluster: &Cluster,
    agents: &BTreeMap<String, String>,
    limit: Duration,
) -> BTreeMap<String, String> {
    let started = Instant::now();
    loop {
        let stored = decisions(cluster);
        let live = live_generations(cluster, agents);
        let stored_again = decisions(cluster);
        let settled = stored == stored_again
            && live
                .iter()
                .all(|(node, g)| stored.get(node).map(|d| generation_of(d)) == Some(*g));
        if settled {
            return stored;
        }
        assert!(
            started.elapsed() < limit,
            "nodes do not run their stored decisions after {limit:?}: live {live:?}, stored {stored_again:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn decisions(cluster: &Cluster) -> BTreeMap<String, String> {
    let config_maps: Api<ConfigMap> = Api::namespaced(cluster.client(), NS);
    cluster
        .block_on(config_maps.get_opt("kmesh-snapshot-decisions"))
        .ok()
        .flatten()
        .and_then(|c| c.data)
        .unwrap_or_default()
}

fn generation_of(decision: &str) -> u64 {
    decision
        .split('-')
        .next()
        .and_then(|g| g.parse().ok())
        .unwrap_or(0)
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: signalling a process of this test's cluster by pid.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill({pid}, {sig})");
}

fn agent_pid(cluster: &Cluster, agent: &str) -> i32 {
    let pids = cluster.pod_pids(NS, agent).unwrap();
    assert_eq!(pids.len(), 1, "one process in {agent}: {pids:?}");
    pids[0]
}

fn patch_rollout(cluster: &Cluster, rollout: &str) {
    let patch = format!("{{\"spec\":{{\"rollout\":{rollout}}}}}");
    cluster
        .kubectl()
        .run(&[
            "patch",
            "kmeshconfig",
            "default",
            "--type",
            "merge",
            "-p",
            &patch,
        ])
        .unwrap();
}

/// Scenario 2: see the module doc.
fn leader_killed_during_rolling_rollout(
    cluster: &Cluster,
    agents: &BTreeMap<String, String>,
    client: &str,
    target: &str,
) {
    let k = cluster.kubectl();
    k.run(&["label", "node", "node-a", "kmesh.net/canary=true"])
        .unwrap();
    patch_rollout(
        cluster,
        r#"{"strategy":"Rolling","maxUnavailable":1,"canary":{"nodeSelector":{"matchLabels":{"kmesh.net/canary":"true"}}}}"#,
    );
    let (leader, _) = wait_for_holder(cluster, "at all", |_| true);
    let before = live_generations(cluster, agents);
    let counts: BTreeMap<String, (u64, u64)> = agents
        .iter()
        .map(|(n, a)| (n.clone(), applied(cluster, a)))
        .collect();
    let decided_before = decisions(cluster);
    let traffic = Traffic::start(cluster, client, target);

    // The canary's agent stops (frozen): it will not report its new snapshot live, so the rollout
    // waits after deciding the canary.
    let frozen = agent_pid(cluster, &agents["node-a"]);
    signal(frozen, libc::SIGSTOP);
    apply(cluster, VS_90_10);
    let started = Instant::now();
    let canary_decided = loop {
        let d = decisions(cluster);
        if d.get("node-a") != decided_before.get("node-a") {
            break d;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the canary was never decided: {d:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        decisions(cluster).get("node-b"),
        decided_before.get("node-b"),
        "node-b must wait for the canary"
    );
    progress!(
        "rolling rollout stalled after the canary: decisions {canary_decided:?}; leader {leader}"
    );

    // The leader goes away (its pod deleted: SIGTERM, it releases the Lease).
    k.run(&["delete", "pod", "-n", NS, &leader, "--wait=false"])
        .unwrap();
    let (new_leader, took) =
        wait_for_holder(cluster, "other than the deleted leader", |h| h != leader);
    progress!(
        "leadership moved from {leader} to {new_leader} in {took:.2?} after the leader's pod was deleted"
    );

    // The canary runs again, applies its snapshot, reports it (to whichever replica): the new
    // leader moves node-b.
    signal(frozen, libc::SIGCONT);
    let live = wait_live_above(cluster, agents, &before, Duration::from_secs(60));
    progress!(
        "rollout finished under the new leader {:.2?} after the canary's agent resumed",
        live.duration_since(started).saturating_sub(took)
    );
    // The deleted leader's pod leaves the operators' Service endpoints, a content change the new
    // leader rolls out too: wait for the nodes to settle on what is stored, rather than compare
    // two reads a decision can fall between.
    wait_nodes_run_stored_decisions(cluster, agents, Duration::from_secs(30));
    traffic.finish("the leader's failover in a rolling rollout");
    let report = probe(cluster, client, target, 400);
    assert!(
        report.replies_from("reviews-v2-") > 0,
        "90/10 in effect: {report:?}"
    );

    // A replacement operator starts; agents reconnect to either replica without reapplying.
    let replacing = Instant::now();
    k.run(&[
        "rollout",
        "status",
        "-n",
        NS,
        "deployment/kmesh-operator",
        TIMEOUT,
    ])
    .unwrap();
    progress!(
        "replacement operator ready {:.1?} later",
        replacing.elapsed()
    );
    std::thread::sleep(Duration::from_secs(3));
    // The operators' own Service endpoints are in the snapshots, so the pod replacement is a
    // content change too: each node applies once per decision, never identical content again
    // (an agent that reached a replica numbering its own generations would apply more often).
    let decided_after = wait_nodes_run_stored_decisions(cluster, agents, Duration::from_secs(30));
    for (node, agent) in agents {
        let (applied_now, unchanged_now) = applied(cluster, agent);
        let (applied_before, unchanged_before) = counts[node];
        let decided = generation_of(&decided_after[node]) - generation_of(&decided_before[node]);
        progress!(
            "agent on {node}: applied {applied_before} -> {applied_now}, unchanged {unchanged_before} -> {unchanged_now}, decisions made meanwhile {decided}"
        );
        assert!(applied_now > applied_before, "{node} applied the change");
        assert!(
            applied_now - applied_before <= decided,
            "{node} applied {} snapshots for {decided} decisions",
            applied_now - applied_before
        );
        assert_eq!(
            unchanged_now, unchanged_before,
            "{node} was sent content it runs"
        );
    }
    assert_replicas_agree(cluster);
    patch_rollout(cluster, r#"{"strategy":"AllAtOnce","canary":null}"#);
}

/// Every operator replica serves every node the same generation (their metrics say which).
fn assert_replicas_agree(cluster: &Cluster) {
    let mut served = BTreeMap::new();
    for operator in operators(cluster) {
        let (code, body) = cluster.pod_get(NS, &operator, 15301, "/metrics").unwrap();
        assert_eq!(code, 200);
        let mut generations: Vec<String> = body
            .lines()
            .filter(|l| l.starts_with("kmesh_operator_node_published_generation{"))
            .map(str::to_string)
            .collect();
        generations.sort();
        served.insert(operator, generations);
    }
    let distinct: std::collections::BTreeSet<&Vec<String>> = served.values().collect();
    progress!("generations served by each replica: {served:?}");
    assert_eq!(
        distinct.len(),
        1,
        "replicas serve different generations: {served:?}"
    );
}

/// Scenario 3: see the module doc.
fn apiserver_outage(
    cluster: &mut Cluster,
    agents: &BTreeMap<String, String>,
    client: &str,
    target: &str,
) {
    let traffic = Traffic::start(cluster, client, target);
    cluster.stop_apiserver().unwrap();
    // Longer than the leader's renew deadline (10 s): the leader stops leading meanwhile.
    std::thread::sleep(Duration::from_secs(12));
    let report = probe(cluster, client, target, 200);
    assert_eq!(report.ok, 200, "traffic without the API server: {report:?}");
    cluster.restart_apiserver().unwrap();
    let before = live_generations(cluster, agents);
    let applied_at = apply(cluster, VS_V3);
    let live = wait_live_above(cluster, agents, &before, Duration::from_secs(90));
    let took = live.duration_since(applied_at);
    progress!(
        "kube-apiserver back: a change applied at once reached every kernel after {took:.2?}"
    );
    // The watches retry within 4 s (`watch_backoff.rs`) and leadership is taken again within a
    // retry period; kube-runtime's default backoff (up to 30 s) took 20-31 s here.
    assert!(
        took < Duration::from_secs(15),
        "a change after the API server's return took {took:.2?} to reach the kernels"
    );
    traffic.finish("the API server outage");
    let report = probe(cluster, client, target, 200);
    assert_eq!(
        report.replies_from("reviews-v3-"),
        200,
        "all to v3 after the outage: {report:?}"
    );
}

/// Scenario 4: see the module doc.
fn all_operators_killed(
    cluster: &Cluster,
    agents: &BTreeMap<String, String>,
    client: &str,
    target: &str,
) {
    let traffic = Traffic::start(cluster, client, target);
    let operators = operators(cluster);
    let old: BTreeMap<String, i32> = operators
        .iter()
        .map(|o| {
            let pids = cluster.pod_pids(NS, o).unwrap();
            assert_eq!(pids.len(), 1, "{o}: {pids:?}");
            (o.clone(), pids[0])
        })
        .collect();
    let before = live_generations(cluster, agents);
    for pid in old.values() {
        signal(*pid, libc::SIGKILL);
    }
    let killed = Instant::now();
    // The next change, made while no operator runs.
    apply(cluster, VS_50_50);
    let restarted = loop {
        let back = old.iter().any(|(o, pid)| {
            cluster
                .pod_pids(NS, o)
                .is_ok_and(|p| !p.is_empty() && !p.contains(pid))
        });
        if back {
            break Instant::now();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "no operator restarted"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let live = wait_live_above(cluster, agents, &before, Duration::from_secs(30));
    let served_after = live.duration_since(restarted);
    progress!(
        "every operator killed: restarted {:.2?} after the kill; the next change live in every kernel {served_after:.2?} after the restart",
        restarted.duration_since(killed)
    );
    assert!(
        served_after < Duration::from_secs(5),
        "the restarted operator took {served_after:.2?}"
    );
    traffic.finish("the operators' restart");
}

/// Scenario 5: see the module doc.
fn another_nodes_token(cluster: &Cluster, agents: &BTreeMap<String, String>) {
    let agent_a = &agents["node-a"];
    let pod_api: Api<Pod> = Api::namespaced(cluster.client(), NS);
    let pod = cluster.block_on(pod_api.get(agent_a)).unwrap();
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec!["kmesh-operator".into()],
            expiration_seconds: Some(600),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
        },
        ..Default::default()
    };
    let accounts: Api<ServiceAccount> = Api::namespaced(cluster.client(), NS);
    let token = cluster
        .block_on(accounts.create_token_request("kmesh-agent", &PostParams::default(), &request))
        .unwrap()
        .status
        .unwrap()
        .token;
    let config_maps: Api<ConfigMap> = Api::namespaced(cluster.client(), NS);
    let ca = cluster
        .block_on(config_maps.get("kmesh-ca-root-cert"))
        .unwrap();
    let ca_file = std::env::temp_dir().join(format!("kmt-ha-ca-{}.crt", std::process::id()));
    std::fs::write(&ca_file, &ca.data.unwrap()["ca.crt"]).unwrap();
    let vip = cluster
        .kubectl()
        .run(&[
            "get",
            "service",
            "kmesh-operator",
            "-n",
            NS,
            "-o",
            "jsonpath={.spec.clusterIP}",
        ])
        .unwrap();
    let status = |node: &str| -> String {
        let host = "kmesh-operator.kmesh-system.svc";
        let args = [
            "-sS".to_string(),
            "-o".into(),
            "/dev/null".into(),
            "-w".into(),
            "%{http_code}".into(),
            "--cacert".into(),
            ca_file.display().to_string(),
            "--resolve".into(),
            format!("{host}:15300:{}", vip.trim()),
            "-H".into(),
            format!("Authorization: Bearer {token}"),
            format!("https://{host}:15300/v1/nodes/{node}/snapshot"),
        ];
        let out = kmesh_tests::run_in_netns(&cluster.cluster_netns(), move || {
            std::process::Command::new("curl").args(&args).output()
        })
        .expect("curl");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let own = status("node-a");
    let other = status("node-b");
    let _ = std::fs::remove_file(&ca_file);
    progress!("node-a's pod-bound token: node-a's snapshot -> {own}, node-b's -> {other}");
    assert_eq!(own, "200");
    assert_eq!(other, "403");
}

/// VmHWM of a process, in kB.
fn vm_hwm(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Scenario 6: see the module doc.
fn peak_rss(cluster: &Cluster, agents: &BTreeMap<String, String>) {
    let mut figures = Vec::new();
    for operator in operators(cluster) {
        for pid in cluster.pod_pids(NS, &operator).unwrap() {
            figures.push(format!("operator {operator}: {} MiB", vm_hwm(pid) / 1024));
        }
    }
    for (node, agent) in agents {
        figures.push(format!(
            "agent on {node}: {} MiB",
            vm_hwm(agent_pid(cluster, agent)) / 1024
        ));
    }
    progress!(
        "peak RSS (VmHWM from /proc/PID/status at the end of the scenario): {}",
        figures.join(", ")
    );
}
