//! The agents' lifecycle on a real control plane, driven as a user drives it, under continuous load
//! from a client pod on each node: a rolling restart of the agent DaemonSet (same layout: the new
//! agents adopt the pins as they are), a rolling update that changes the map layout (the new agents
//! fill maps of their own and switch the pinned links to their programs with `BPF_LINK_UPDATE`),
//! and the uninstall with `kubectl delete -k config/default` (no pins left, no connection steered).
//!
//! The layout change is the one thing simulated: the DaemonSet gets the agent's hidden test flag
//! `--test-layout-variant`, so the same binary loads the test variant of the eBPF object (the same
//! programs, a larger enrolled map); the rollout, the pods, the kernel side are real.
//!
//! Timings printed (progress lines): install to agents ready, each rollout, the uninstall (until
//! `kubectl delete` returned and until each node's pins were gone), and the agents' peak RSS.
//!
//! Needs root, `cargo build --workspace --bins` and the control-plane binaries
//! (`scripts/control-plane-bins.sh`); `KMESH_TEST_CLUSTER_HOLD_SECS=N` keeps the cluster N seconds.
use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Pod;
use kmesh_tests::{
    Cluster, ProbeHandle, ProbeReport, StopFile,
    cluster::{
        observe,
        scenario::{
            ISTIO, TIMEOUT, enrol, probe, run_cluster, two_nodes, wait_available, wait_rolled_out,
            wait_until_steered,
        },
    },
    progress,
};
use kube::{Api, api::ListParams};
use serde_json::Value;

const NAME: &str = "life";
// Pod CIDRs 10.244.181.0/24 and .182.0/24: no other test uses them.
const NODES: [(&str, u8); 2] = [("node-a", 181), ("node-b", 182)];
const AGENTS: &str = "daemonset/kmesh-agent";

#[test]
fn agents_roll_across_a_layout_change_under_load_and_uninstall_cleanly() {
    let nodes = two_nodes(NODES[0].1, NODES[1].1);
    run_cluster(NAME, &nodes, |cluster| run_scenario(cluster));
}

fn run_scenario(cluster: &Cluster) {
    install(cluster);
    let target = deploy_app(cluster);
    let load = Load::start(cluster, &target);

    let installed = agent_statuses(cluster);
    let restart = ["rollout", "restart", "-n", "kmesh-system", AGENTS];
    let restarted = roll(cluster, "rolling restart (same layout)", &restart);
    for (node, after) in &restarted {
        let before = &installed[node];
        assert_eq!(after["adopted_pins"], true, "{node}: {after}");
        assert_eq!(after["layout"], before["layout"], "{node}");
        assert_eq!(after["links"], before["links"], "{node}: links re-attached");
    }

    let variant = r#"[{"op":"add","path":"/spec/template/spec/containers/0/args/-","value":"--test-layout-variant"}]"#;
    let patch = [
        "patch",
        "-n",
        "kmesh-system",
        AGENTS,
        "--type",
        "json",
        "-p",
        variant,
    ];
    let upgraded = roll(cluster, "rolling update to another map layout", &patch);
    for (node, after) in &upgraded {
        assert_switched(cluster, node, &restarted[node], after);
    }
    print_peak_rss(cluster);

    let reports = load.stop();
    for (client, report) in &reports {
        progress!(
            "load from {client} through both rollouts: connections {} ok {} failed {} by endpoint {:?} errors {:?}",
            report.attempts,
            report.ok,
            report.failed,
            report.by_reply,
            report.errors
        );
        assert_eq!(report.failed, 0, "{client}: {report:?}");
        assert!(
            report.ok >= 200,
            "{client}: too few connections: {report:?}"
        );
    }
    // Before the uninstall: `kubectl delete -k` removes the operator's RBAC while it still runs.
    let operator_log = cluster.pod_log("kmesh-system_kmesh-operator-");
    assert!(
        !operator_log.contains("forbidden"),
        "the operator's RBAC refused something:\n{operator_log}"
    );
    uninstall(cluster, &target);
    let operator_log = cluster.pod_log("kmesh-system_kmesh-operator-");
    if let Some(line) = operator_log.lines().find(|l| l.contains("forbidden")) {
        progress!(
            "during the uninstall the operator lost its RBAC while still running (why no finalizer \
             waits on it): {}",
            line.chars().take(200).collect::<String>()
        );
    }
}

/// The install as the README says, with the operator's TLS Secret made beforehand as cert-manager
/// would make it (the operator then uses it as it is: the README's cert-manager option).
fn install(cluster: &Cluster) {
    let k = cluster.kubectl();
    let started = Instant::now();
    k.run(&["create", "namespace", "kmesh-system"]).unwrap();
    cluster
        .create_tls_secret("kmesh-system", "kmesh-operator-tls", "kmesh-operator")
        .unwrap();
    k.run(&["apply", "-k", "config/default"]).unwrap();
    wait_rolled_out(cluster);
    progress!("install to agents ready: {:.1?}", started.elapsed());
}

/// Istio's helloworld (a Service over v1 and v2) in the enrolled `default` namespace, and a client
/// pod on each node; returns the Service's VIP:port once every client's connections to it are
/// steered to both versions.
fn deploy_app(cluster: &Cluster) -> String {
    let k = cluster.kubectl();
    enrol(cluster, "default");
    let helloworld = format!("{ISTIO}/samples/helloworld/helloworld.yaml");
    k.run(&["apply", "-f", &helloworld]).unwrap();
    let clients: String = NODES
        .iter()
        .map(|(node, _)| client_pod(node))
        .collect::<Vec<_>>()
        .join("---\n");
    k.run_stdin(&["apply", "-f", "-"], &clients).unwrap();
    wait_available(cluster, "default");
    let ready = "--for=condition=Ready";
    k.run(&[
        "wait",
        ready,
        "pod",
        "-l",
        "app=life-client",
        "-n",
        "default",
        TIMEOUT,
    ])
    .unwrap();
    let jsonpath = "jsonpath={.spec.clusterIP}";
    let vip = k
        .run(&[
            "get",
            "service",
            "helloworld",
            "-n",
            "default",
            "-o",
            jsonpath,
        ])
        .unwrap();
    let target = format!("{}:5000", vip.trim());
    for (node, _) in NODES {
        let versions = ["helloworld-v1-", "helloworld-v2-"];
        wait_until_steered(cluster, &client_name(node), &target, &versions, 40);
    }
    target
}

fn client_name(node: &str) -> String {
    format!("client-{node}")
}

/// A client pod bound to `node` (the curl image of Istio's sleep sample, sleeping).
fn client_pod(node: &str) -> String {
    format!(
        "apiVersion: v1
kind: Pod
metadata:
  name: {}
  namespace: default
  labels:
    app: life-client
spec:
  nodeName: {node}
  terminationGracePeriodSeconds: 0
  containers:
    - name: sleep
      image: docker.io/curlimages/curl:8.16.0
      command: [/bin/sleep, infinity]
",
        client_name(node)
    )
}

/// Connections without pause from every client to the target, until stopped.
struct Load {
    stop: StopFile,
    probes: Vec<(String, ProbeHandle)>,
}

impl Load {
    fn start(cluster: &Cluster, target: &str) -> Load {
        let stop = StopFile::new("life-load");
        let probes = NODES
            .iter()
            .map(|(node, _)| {
                let client = client_name(node);
                let args = [
                    "--target",
                    target,
                    "--until-file",
                    stop.arg(),
                    "--timeout-ms",
                    "2000",
                    "--interval-us",
                    "2000",
                ];
                let handle = cluster
                    .spawn_probe("default", &client, &args)
                    .expect("continuous probe");
                (client, handle)
            })
            .collect();
        progress!("continuous load started from every client to {target}");
        Load { stop, probes }
    }

    fn stop(self) -> Vec<(String, ProbeReport)> {
        self.stop.signal().expect("stop the load");
        let wait = |(client, handle): (String, ProbeHandle)| {
            let report = handle
                .wait_timeout(Duration::from_secs(30))
                .expect("probe report");
            (client, report)
        };
        self.probes.into_iter().map(wait).collect()
    }
}

/// The agent pods, by node.
fn agent_pods(cluster: &Cluster) -> BTreeMap<String, String> {
    let api: Api<Pod> = Api::namespaced(cluster.client(), "kmesh-system");
    let list = cluster
        .block_on(api.list(&ListParams::default().labels("app.kubernetes.io/name=kmesh-agent")))
        .expect("list agent pods");
    list.items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| {
            let node = p.spec.as_ref()?.node_name.clone()?;
            Some((node, p.metadata.name?))
        })
        .collect()
}

/// Every agent's `/debug/snapshot`, by node.
fn agent_statuses(cluster: &Cluster) -> BTreeMap<String, Value> {
    let pods = agent_pods(cluster);
    assert_eq!(pods.len(), NODES.len(), "one agent per node: {pods:?}");
    pods.into_iter()
        .map(|(node, pod)| {
            let status = observe::agent_status(cluster, &pod);
            (node, status.unwrap_or_else(|e| panic!("{e}")))
        })
        .collect()
}

/// Runs `kubectl ARGS` (a change of the agent DaemonSet), waits for its rollout, and returns the
/// new agents' statuses.
fn roll(cluster: &Cluster, what: &str, args: &[&str]) -> BTreeMap<String, Value> {
    let k = cluster.kubectl();
    let started = Instant::now();
    k.run(args).unwrap();
    k.run(&["rollout", "status", "-n", "kmesh-system", AGENTS, TIMEOUT])
        .unwrap();
    let statuses = agent_statuses(cluster);
    let summary: Vec<String> = statuses
        .iter()
        .map(|(node, s)| {
            format!(
                "{node}: layout {} adopted {} links {}",
                s["layout"], s["adopted_pins"], s["links"]
            )
        })
        .collect();
    progress!(
        "{what}: rolled out in {:.1?}; {}",
        started.elapsed(),
        summary.join("; ")
    );
    statuses
}

/// The node's pin directory, as its agent's `--bpffs-dir=/sys/fs/bpf/kmesh` lands on this machine.
fn pin_dir(cluster: &Cluster, node: &str) -> PathBuf {
    let resources = cluster.node(node).expect("node");
    resources.bpffs.path().join("kmesh")
}

fn pins(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// After a layout change: the same links (ids) run new programs, the old layout's pins are gone.
fn assert_switched(cluster: &Cluster, node: &str, before: &Value, after: &Value) {
    assert_ne!(after["layout"], before["layout"], "{node}: {after}");
    assert_eq!(after["upgrade"]["state"], "switched", "{node}: {after}");
    let ids = |s: &Value, field: &str| -> Vec<u64> {
        let links = s["links"].as_array().cloned().unwrap_or_default();
        links.iter().filter_map(|l| l[field].as_u64()).collect()
    };
    assert_eq!(
        ids(after, "link_id").len(),
        3,
        "{node}: connect4, connect6, sockops: {after}"
    );
    assert_eq!(
        ids(after, "link_id"),
        ids(before, "link_id"),
        "{node}: BPF_LINK_UPDATE keeps the links"
    );
    for (old, new) in ids(before, "program_id")
        .iter()
        .zip(ids(after, "program_id"))
    {
        assert_ne!(*old, new, "{node}: a link still runs the old program");
    }
    let layout = after["layout"].as_str().unwrap_or_default().to_string();
    // `authz`: the per-namespace authorization links of the node's enrolled pods (they outlive
    // layouts like the cgroup links).
    let expected = vec![
        "link_connect4".to_string(),
        "link_connect6".into(),
        "link_sockops".into(),
        "authz".into(),
        layout,
    ];
    let mut expected_sorted = expected.clone();
    expected_sorted.sort();
    assert_eq!(
        pins(&pin_dir(cluster, node)),
        expected_sorted,
        "{node}: the old layout's pins remain"
    );
}

/// Peak RSS (VmHWM) of every agent process, found in the nodes' cgroups.
fn print_peak_rss(cluster: &Cluster) {
    for (node, _) in NODES {
        let cgroup = cluster
            .node(node)
            .expect("node")
            .cgroup
            .path()
            .to_path_buf();
        let pids = std::fs::read_dir(&cgroup)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|pod| std::fs::read_to_string(pod.path().join("cgroup.procs")).ok())
            .flat_map(|procs| {
                procs
                    .lines()
                    .filter_map(|l| l.parse::<u32>().ok())
                    .collect::<Vec<_>>()
            });
        for pid in pids {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() != "kmesh-agent" {
                continue;
            }
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let hwm = status
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .unwrap_or("VmHWM: ?");
            progress!(
                "{node}: agent pid {pid} peak RSS {}",
                hwm.trim_start_matches("VmHWM:").trim()
            );
        }
    }
}

/// `kubectl delete -k config/default`; then the namespace is gone, no node has a pin left, and
/// no client's connection to `target` is steered.
fn uninstall(cluster: &Cluster, target: &str) {
    let dirs: Vec<(String, PathBuf)> = NODES
        .iter()
        .map(|(node, _)| (node.to_string(), pin_dir(cluster, node)))
        .collect();
    for (node, dir) in &dirs {
        assert!(
            !pins(dir).is_empty(),
            "{node}: no pins before the uninstall"
        );
    }
    let watch = PinWatch::start(dirs.clone());
    let started = Instant::now();
    cluster
        .kubectl()
        .run(&["delete", "-k", "config/default", TIMEOUT])
        .expect("kubectl delete -k config/default");
    let took = started.elapsed();
    let gone_at = watch.stop();
    progress!(
        "kubectl delete -k config/default returned after {took:.1?}; pins gone {}",
        gone_at
            .iter()
            .map(|(node, at)| format!("on {node} after {at:.2?}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    match cluster.kubectl().run(&["get", "namespace", "kmesh-system"]) {
        Err(e) if e.to_string().contains("NotFound") => {}
        other => panic!("the namespace is still there: {other:?}"),
    }
    for (node, dir) in &dirs {
        assert_eq!(
            pins(dir),
            Vec::<String>::new(),
            "{node}: pins left in {}",
            dir.display()
        );
    }
    for (node, _) in NODES {
        let r = probe(cluster, &client_name(node), target, 20);
        assert_eq!(
            r.errors_of("ENETUNREACH"),
            20,
            "{node}: connections to {target} are still steered after the uninstall: {r:?}"
        );
    }
    report_uninstall_paths(cluster);
}

/// Which way each agent heard of the uninstall, from its log.
fn report_uninstall_paths(cluster: &Cluster) {
    let logs = cluster.pod_logs();
    let agents = logs
        .iter()
        .filter(|(k, _)| k.starts_with("kmesh-system_kmesh-agent-"));
    for (key, log) in agents {
        let heard = if log.contains("answered 410 Gone") {
            "on its long poll"
        } else if log.contains("the operator says this node's agents are being removed") {
            "when stopped"
        } else {
            continue; // an agent replaced by a rollout
        };
        let removed = log.contains("every pin removed");
        progress!("{key}: heard of the uninstall {heard}; every pin removed: {removed}");
        assert!(removed, "{key} did not remove its pins:\n{log}");
    }
}

/// Polls the nodes' pin directories and records when each has no pin left.
struct PinWatch {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(String, Duration)>>,
}

impl PinWatch {
    fn start(dirs: Vec<(String, PathBuf)>) -> PinWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let started = Instant::now();
            let mut gone: BTreeMap<String, Duration> = BTreeMap::new();
            while !flag.load(Ordering::Relaxed) && gone.len() < dirs.len() {
                for (node, dir) in &dirs {
                    if !gone.contains_key(node) && pins(dir).is_empty() {
                        gone.insert(node.clone(), started.elapsed());
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            gone.into_iter().collect()
        });
        PinWatch { stop, thread }
    }

    fn stop(self) -> Vec<(String, Duration)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}
