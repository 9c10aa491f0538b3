//! `kmesh-demo --cluster`: the story on a real Kubernetes control plane, the test harness's
//! (`kmesh_tests::cluster`: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, two
//! nodes with fake kubelets running pods in network namespaces and the project's own pods from
//! the shipped manifests). Everything is done as a user does it, with kubectl, each command
//! printed as it runs (the harness's progress lines, on stderr): Istio's and the Gateway API's
//! CRDs, the install of kmesh-rs in one command as the README says, Istio's unmodified bookinfo and its
//! DestinationRules, Istio's `sleep` pod as the client, then the story's VirtualServices with
//! `kubectl apply` and the mode with `kubectl patch kmeshconfig default`. After each step the demo
//! waits until every node's agent runs the new snapshot, and prints where 1,000 connections from
//! the sleep pod to the reviews VIP landed.
//!
//! The cluster is removed when the story ends, fails or is interrupted (the harness removes it on
//! drop), and the demo then checks that nothing of it is left.
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kmesh_tests::{
    Cluster, NodeSpec, ProbeReport,
    cluster::{
        leftovers,
        observe::{self, AgentPod},
        repository,
        scenario::{GATEWAY_API_CRDS, ISTIO, TIMEOUT, two_nodes},
    },
};
use kube::{Api, api::ListParams};

use crate::{
    interrupt,
    story::{
        CONNECTIONS, Change, MODE_DISABLED_PATCH, STEPS, Step, VERSIONS, context, istio_sample,
        print_distribution, print_document, print_meaning, print_step,
    },
};

/// Names everything the cluster makes (`kmt-demo-...-<pid>`).
const NAME: &str = "demo";

/// Pod CIDRs 10.244.191.0/24 and .192.0/24: no test uses them, so the demo can run beside the
/// tests (agents enrol namespaces by IP, machine-wide).
fn nodes() -> Vec<NodeSpec> {
    two_nodes(191, 192)
}
pub fn run() -> Result<(), String> {
    println!("== kmesh-rs demo on a real Kubernetes control plane ==");
    println!(
        "(kubectl commands and their output, and the cluster's progress, are printed on stderr as \
         `[cluster <seconds>] ...` lines)\n"
    );
    let result = start_and_tell();
    let left = leftovers(NAME);
    if !left.is_empty() {
        return Err(format!(
            "{}the cluster left behind: {left:?}",
            result.err().map(|e| format!("{e}; ")).unwrap_or_default()
        ));
    }
    result?;
    println!("done; the control plane, the nodes, their pods and the pins are removed.");
    Ok(())
}

/// Starts the cluster, tells the story on it, and removes it.
fn start_and_tell() -> Result<(), String> {
    let cluster = Cluster::start(NAME, &nodes()).map_err(context("starting the cluster"))?;
    let result = tell(&cluster);
    if result.is_err() && !interrupt::requested() {
        eprintln!("{}", cluster.diagnostics());
    }
    drop(cluster);
    result
}

fn tell(cluster: &Cluster) -> Result<(), String> {
    interrupt::check()?;
    install_crds(cluster)?;
    install_kmesh(cluster)?;
    deploy_bookinfo(cluster)?;
    let client = client_pod(cluster)?;
    let target = reviews_target(cluster)?;
    let agents = agent_pods(cluster)?;
    wait_until_steered(cluster, &client, &target)?;
    println!();
    let mut timings = Vec::new();
    for (index, step) in STEPS.iter().enumerate() {
        interrupt::check()?;
        timings.push(apply_step(cluster, &agents, index, step)?);
        let report = probe(cluster, &client, &target, CONNECTIONS)?;
        print_distribution(&report);
        print_meaning(step, &report);
        println!();
    }
    let timings: Vec<String> = timings.iter().map(|t| format!("{t:.2?}")).collect();
    println!(
        "from kubectl to the kernel of every node: {} (steps 1 to {})",
        timings.join(", "),
        STEPS.len()
    );
    Ok(())
}

/// `kubectl ARGS...` (printed by the harness), unless a stop was asked for.
fn kubectl(cluster: &Cluster, args: &[&str]) -> Result<String, String> {
    interrupt::check()?;
    cluster.kubectl().run(args).map_err(|e| e.to_string())
}

/// A file of the reference material, relative to the repository root (where kubectl runs).
fn reference(path: &str) -> Result<String, String> {
    if repository().join(path).exists() {
        Ok(path.to_string())
    } else {
        Err(format!(
            "{} is missing: the demo uses ../shared/reference next to the checkout",
            repository().join(path).display()
        ))
    }
}

/// Istio's and the Gateway API's CRDs (server-side: some of Istio's are too big for the
/// last-applied annotation of a client-side apply).
fn install_crds(cluster: &Cluster) -> Result<(), String> {
    let istio = reference(&format!(
        "{ISTIO}/manifests/charts/base/files/crd-all.gen.yaml"
    ))?;
    kubectl(cluster, &["apply", "--server-side", "-f", &istio])?;
    let gateway_api = reference(GATEWAY_API_CRDS)?;
    kubectl(cluster, &["apply", "--server-side", "-f", &gateway_api])?;
    Ok(())
}

/// The install, as the README says (one command; the operator makes its certificate and the
/// KmeshConfig `default`), until every agent is ready.
fn install_kmesh(cluster: &Cluster) -> Result<(), String> {
    kubectl(cluster, &["apply", "-k", "config/default"])?;
    for workload in ["deployment/kmesh-operator", "daemonset/kmesh-agent"] {
        let args = ["rollout", "status", "-n", "kmesh-system", workload, TIMEOUT];
        kubectl(cluster, &args)?;
    }
    let created = ["wait", "--for=create", "kmeshconfig/default", TIMEOUT];
    kubectl(cluster, &created)?;
    kubectl(
        cluster,
        &["get", "pods", "-n", "kmesh-system", "-o", "wide"],
    )?;
    Ok(())
}

/// The enrolled namespace, bookinfo, its DestinationRules, the sleep client; all available.
fn deploy_bookinfo(cluster: &Cluster) -> Result<(), String> {
    let enrol = "istio.io/dataplane-mode=Kmesh";
    kubectl(cluster, &["label", "namespace", "default", enrol])?;
    for file in [
        "samples/bookinfo/platform/kube/bookinfo.yaml",
        "samples/bookinfo/networking/destination-rule-all.yaml",
        "samples/sleep/sleep.yaml",
    ] {
        let path = reference(&format!("{ISTIO}/{file}"))?;
        kubectl(cluster, &["apply", "-f", &path])?;
    }
    let available = "--for=condition=Available";
    let args = ["wait", available, "deployment", "--all", "-n", "default"];
    kubectl(cluster, &[&args[..], &[TIMEOUT]].concat())?;
    kubectl(cluster, &["get", "pods", "-n", "default", "-o", "wide"])?;
    Ok(())
}

/// Pods of `namespace` whose name starts with `prefix`: (name, node).
fn pods(cluster: &Cluster, namespace: &str, prefix: &str) -> Result<Vec<(String, String)>, String> {
    let api: Api<Pod> = Api::namespaced(cluster.client(), namespace);
    let list = cluster
        .block_on(api.list(&ListParams::default()))
        .map_err(context(format!("listing the pods of {namespace}")))?;
    let named = list.items.into_iter().filter_map(|p| {
        let name = p.metadata.name?;
        let node = p.spec.and_then(|s| s.node_name).unwrap_or_default();
        name.starts_with(prefix).then_some((name, node))
    });
    Ok(named.collect())
}

/// The sleep pod, the demo's client.
fn client_pod(cluster: &Cluster) -> Result<String, String> {
    match pods(cluster, "default", "sleep-")?.as_slice() {
        [(name, node)] => {
            println!("client: pod default/{name} (Istio's sleep sample) on {node}");
            Ok(name.clone())
        }
        other => Err(format!("expected one sleep pod, found {other:?}")),
    }
}

/// The agent pods (one per node).
fn agent_pods(cluster: &Cluster) -> Result<Vec<AgentPod>, String> {
    let agents = observe::agents(cluster).map_err(context("listing the agent pods"))?;
    if agents.len() != nodes().len() {
        return Err(format!("expected an agent per node, found {agents:?}"));
    }
    Ok(agents)
}

/// The reviews Service's VIP:port.
fn reviews_target(cluster: &Cluster) -> Result<String, String> {
    let jsonpath = "jsonpath={.spec.clusterIP}";
    let args = ["get", "service", "reviews", "-n", "default", "-o", jsonpath];
    let vip = kubectl(cluster, &args)?;
    let target = format!("{}:9080", vip.trim());
    println!("service reviews: VIP {target} (the client pod has no route to it)");
    Ok(target)
}

/// `count` connections from pod `client` to `target`.
fn probe(cluster: &Cluster, client: &str, target: &str, count: u32) -> Result<ProbeReport, String> {
    let count = count.to_string();
    let args = [
        "--target",
        target,
        "--count",
        &count,
        "--timeout-ms",
        "2000",
    ];
    cluster
        .run_probe("default", client, &args)
        .map_err(context(format!("kmesh-probe in pod {client}")))
}

/// Waits until the client's node steers its connections: with the DestinationRules alone,
/// reviews is one Service over its three versions, so every version answers once the client is
/// enrolled and every endpoint is in its node's snapshot.
fn wait_until_steered(cluster: &Cluster, client: &str, target: &str) -> Result<(), String> {
    let every_version = |report: &ProbeReport| {
        let answered = |v: &str| {
            report
                .by_reply
                .keys()
                .any(|r| r.contains(&format!("-{v}-")))
        };
        report.ok == 30 && VERSIONS.iter().all(|v| answered(v))
    };
    interrupt::wait_until(
        Duration::from_secs(90),
        "the client's connections to reviews steered to every version",
        || probe(cluster, client, target, 30),
        every_version,
        String::new,
    )?;
    println!(
        "the client's connections to reviews are steered in the kernel (no VirtualService yet: \
         every version answers)"
    );
    Ok(())
}

/// The live snapshot generation of each agent (0 before the first), from its `/debug/snapshot`;
/// `Err` with what it answered when an agent does not answer (its admin port, reached from the
/// cluster network, can miss a 2 s deadline on a loaded machine: the waits ask again).
fn generations(cluster: &Cluster, agents: &[AgentPod]) -> Result<Vec<u64>, String> {
    let states = observe::agent_states(cluster, agents).map_err(|e| e.to_string())?;
    Ok(states.iter().map(|s| s.generation()).collect())
}

/// [`generations`], asked again until every agent answers (as long as a step may take to land);
/// on a timeout, the last error and the end of each agent's log. A wait of more than one try is
/// told on stderr with the errors seen (one CI run saw no answer for 20 s: the bridge MAC change
/// that `TestNetwork::BRIDGE_MAC` now prevents).
fn wait_generations(cluster: &Cluster, agents: &[AgentPod]) -> Result<Vec<u64>, String> {
    let started = Instant::now();
    let errors = std::cell::RefCell::new(Vec::<String>::new());
    let seen = interrupt::wait_until(
        Duration::from_secs(60),
        "every agent's /debug/snapshot",
        || {
            let now = generations(cluster, agents);
            if let Err(e) = &now {
                errors.borrow_mut().push(e.clone());
            }
            Ok(now.ok())
        },
        Option::is_some,
        || {
            let errors = errors.borrow();
            format!(
                "{} errors; the last:\n{}\n{}",
                errors.len(),
                errors.last().map(String::as_str).unwrap_or_default(),
                agent_log_tails(cluster, 15)
            )
        },
    )?;
    let errors = errors.into_inner();
    if let Some(last) = errors.last() {
        eprintln!(
            "kmesh-demo note: the agents' /debug/snapshot answered after {:.1?} and {} errors; \
             the last: {last}",
            started.elapsed(),
            errors.len()
        );
    }
    seen.ok_or_else(|| "every agent's /debug/snapshot: no answer".to_string())
}

/// The last `lines` lines of each agent's log.
fn agent_log_tails(cluster: &Cluster, lines: usize) -> String {
    let mut out = String::new();
    for (pod, log) in cluster.pod_logs() {
        if pod.contains("kmesh-agent") {
            let all: Vec<&str> = log.lines().collect();
            let tail = &all[all.len().saturating_sub(lines)..];
            out.push_str(&format!(
                "--- {pod} (last {lines} lines)\n{}\n",
                tail.join("\n")
            ));
        }
    }
    out
}

/// Applies a step with kubectl and waits until every node runs it; returns how long that took
/// from the start of the kubectl command.
fn apply_step(
    cluster: &Cluster,
    agents: &[AgentPod],
    index: usize,
    step: &Step,
) -> Result<Duration, String> {
    print_step(index, step);
    let before = wait_generations(cluster, agents)?;
    let started = Instant::now();
    match step.change {
        Change::VirtualService(sample) => {
            let path = istio_sample(sample)?;
            let content = std::fs::read_to_string(repository().join(&path))
                .map_err(context(format!("reading {path}")))?;
            println!("  kubectl apply -f {path}:");
            print_document(&content, "reviews");
            kubectl(cluster, &["apply", "-f", &path])?;
        }
        Change::ModeDisabled => {
            println!("  kubectl patch kmeshconfig default --type merge -p '{MODE_DISABLED_PATCH}'");
            let args = ["patch", "kmeshconfig", "default", "--type", "merge", "-p"];
            kubectl(cluster, &[&args[..], &[MODE_DISABLED_PATCH]].concat())?;
        }
    }
    interrupt::wait_until(
        Duration::from_secs(60),
        "every node running the change",
        || Ok(generations(cluster, agents)),
        |now| {
            now.as_ref()
                .is_ok_and(|now| now.iter().zip(&before).all(|(now, before)| now > before))
        },
        || format!("agents {agents:?}, at generations {before:?} before the change"),
    )??;
    let took = started.elapsed();
    println!("  live in the kernel of every node {took:.2?} after kubectl started");
    Ok(took)
}
