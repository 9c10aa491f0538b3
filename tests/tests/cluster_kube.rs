//! The kube source on a real API server, the one-command install, and changes of traffic and
//! configuration driven the way a user drives them (kubectl), on one cluster of two nodes with
//! scenarios in sequence (see the scenario functions, each says what it checks):
//!
//! 1. the install is `kubectl apply -k config/default` alone: no warning (no `unrecognized
//!    format`), the operator creates the KmeshConfig `default`, `--dry-run=server` of
//!    `config/default` passes, and the example in `config/kmeshconfig` applies over it;
//! 2. the Gateway API's TCPRoute CRD, installed after the operator started, is found by
//!    discovery and a TCPRoute (served at `v1` only by Gateway API v1.6.1) steers traffic;
//! 3. an invalid VirtualService: a status entry and an Event, and nothing else changes;
//! 4. the operator restarted with RBAC lacking a rule: the forbidden kinds are in the status
//!    within seconds (not after a minute), logged once at error level, and changes still reach
//!    the kernel;
//! 5. a Deployment scaled up and down, and a pod deleted: the endpoints follow in the kernel;
//! 6. `kubectl patch` of the mode to Disabled and back, with the time until every node applies
//!    it and `kubectl wait --for=condition=Ready` returning within 2 s of the last node;
//! 7. `kubectl patch` of `logLevel` and `accessLog`: in force on every node within 2 s (each
//!    agent's `/debug/log-level`, its live snapshot's header; the operators' own log follows
//!    `logLevel` too), and while the access log is on a
//!    client's connections are logged by its node's agent, field by field; off, none are;
//! 8. a Rolling rollout with a canary node: only the canary changes first, in the agents' flips
//!    and in the traffic of a client on each node;
//! 9. the time from `kubectl apply` to every node's kernel over 22 changes (p50, p99).
//!
//! Timings are printed as `figure:` lines. Needs root and the control-plane binaries
//! (`scripts/control-plane-bins.sh`); `KMESH_TEST_CLUSTER_HOLD_SECS=N` keeps the cluster N
//! seconds after the scenarios.
use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Pod;
use kmesh_common::mode;
use kmesh_tests::{
    Cluster, ProbeReport, StopFile,
    cluster::{
        self,
        access_log::{self, AccessLogLine},
        observe::{self, AgentPod, AgentState, Flip, condition, unwatched, wait_agents},
        scenario::{
            GATEWAY_API_CRDS, ISTIO, REVIEWS_VERSIONS, TIMEOUT, enrol, probe, reference,
            run_cluster, service_target, two_nodes, wait_available, wait_rolled_out,
            wait_until_steered,
        },
    },
    probe::{Outcome, monotonic_ns},
    progress,
};
use kube::{Api, api::ListParams};
use serde_json::Value;

const NAME: &str = "kube";
const TCP_ROUTE_CRD: &str = "gateway.networking.k8s.io_tcproutes.yaml";
const NETWORKING: &str = "samples/bookinfo/networking";
/// How long an agent may take to follow a change before the scenario fails.
const FOLLOW: Duration = Duration::from_secs(30);
/// How long a KmeshConfig setting of the agents (`logLevel`, `accessLog`) may take, from the start
/// of `kubectl patch`, to be in force on a node (issue #9).
const SETTING_IN_FORCE: Duration = Duration::from_secs(2);
/// Connections a client makes to check the access log.
const LOGGED_CONNECTIONS: u32 = 5;

/// The mesh the scenarios act on: the agents (by node), a client pod on each node, and the VIPs.
struct Mesh<'a> {
    cluster: &'a Cluster,
    agents: Vec<AgentPod>,
    /// `client-a` on node-a, `client-b` on node-b: the order of `agents`.
    clients: Vec<String>,
    /// `reviews` VIP:port.
    reviews: String,
    /// `reviews-tcp` VIP:port: every reviews pod, on a port declared TCP (TCPRoutes attach).
    reviews_tcp: String,
}

/// The figures the closing note asks for, printed at the end.
#[derive(Default)]
struct Figures(Vec<String>);

impl Figures {
    fn add(&mut self, line: String) {
        progress!("figure: {line}");
        self.0.push(line);
    }
}

#[test]
fn kube_source_install_and_changes_on_a_real_control_plane() {
    run_cluster(NAME, &two_nodes(173, 174), |cluster| {
        let mut figures = Figures::default();
        figures.add(format!("cluster start {:.1?}", cluster.start_time));
        run_scenarios(cluster, &mut figures);
        progress!("figures:\n    {}", figures.0.join("\n    "));
    });
}

fn run_scenarios(cluster: &Cluster, figures: &mut Figures) {
    install_crds_but_tcp_route(cluster);
    let agents = install_in_one_command(cluster, figures);
    let mesh = deploy_bookinfo_and_clients(cluster, agents);
    crd_installed_after_the_operator(&mesh, figures);
    invalid_virtual_service(&mesh);
    let restored = forbidden_kinds(&mesh, figures);
    scale_and_delete(&mesh, figures);
    mode_switch(&mesh, figures);
    log_level_and_access_log(&mesh, figures);
    rolling_with_a_canary(&mesh, figures);
    apply_to_kernel_latency(&mesh, figures);
    forbidden_kinds_recover(&mesh, restored);
}

// ---- install ----

/// Istio's CRDs and the Gateway API's, all but TCPRoute's (scenario 2 installs it later).
fn install_crds_but_tcp_route(cluster: &Cluster) {
    let k = cluster.kubectl();
    let istio = reference(&format!(
        "{ISTIO}/manifests/charts/base/files/crd-all.gen.yaml"
    ));
    k.run(&["apply", "--server-side", "-f", &istio]).unwrap();
    let dir = cluster::repository().join(GATEWAY_API_CRDS);
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|f| f.ends_with(".yaml") && f != TCP_ROUTE_CRD)
        .map(|f| format!("{GATEWAY_API_CRDS}/{f}"))
        .collect();
    files.sort();
    let mut args = vec!["apply", "--server-side"];
    for f in &files {
        args.extend(["-f", f.as_str()]);
    }
    k.run(&args).unwrap();
}

/// `kubectl apply -k config/default` and nothing else (the harness stands in for cert-manager
/// with the operator's TLS Secret): no warning, the operator creates the KmeshConfig `default`,
/// and Ready follows. Then the manifests pass a server-side dry run, and the example
/// KmeshConfig applies (server-side) over the created one without a conflict. Returns the agents.
fn install_in_one_command(cluster: &Cluster, figures: &mut Figures) -> Vec<AgentPod> {
    let k = cluster.kubectl();
    let install = Instant::now();
    let applied = k
        .run_full(&["apply", "-k", "config/default"], None)
        .unwrap();
    assert!(
        !applied.stderr.contains("unrecognized format") && !applied.stderr.contains("Warning"),
        "the install warns: {}",
        applied.stderr
    );
    wait_rolled_out(cluster);
    figures.add(format!("install to agents ready {:.1?}", install.elapsed()));
    let created = "--for=create";
    k.run(&["wait", created, "kmeshconfig/default", "--timeout=60s"])
        .unwrap();
    figures.add(format!(
        "install to the KmeshConfig default created by the operator {:.1?}",
        install.elapsed()
    ));
    let ready = "--for=condition=Ready";
    k.run(&["wait", ready, "kmeshconfig/default", "--timeout=60s"])
        .unwrap();
    let config = observe::kmeshconfig(cluster).unwrap().expect("created");
    assert_eq!(
        config["metadata"]["annotations"]["kmesh.net/created-by"], "kmesh-operator",
        "{config}"
    );
    assert_eq!(config["spec"]["mode"], "KernelNative", "defaults filled in");
    assert_eq!(
        unwatched(&config),
        [("TCPRoute".to_string(), "NotInstalled".to_string())],
        "only TCPRoute's CRD is missing"
    );
    check_manifests(cluster);
    let agents = observe::agents(cluster).unwrap();
    let nodes: Vec<&str> = agents.iter().map(|a| a.node.as_str()).collect();
    assert_eq!(nodes, ["node-a", "node-b"], "one agent per node");
    agents
}

/// `kubectl apply --dry-run=server -k config/default` against the API server (what CI checks
/// of the manifests), and the example KmeshConfig, then other values (as a GitOps tool would),
/// applied server-side over the operator's without a conflict.
fn check_manifests(cluster: &Cluster) {
    let k = cluster.kubectl();
    let dry = k
        .run_full(&["apply", "--dry-run=server", "-k", "config/default"], None)
        .unwrap();
    assert!(
        dry.stderr.trim().is_empty(),
        "dry run warns: {}",
        dry.stderr
    );
    assert!(dry.stdout.contains("(server dry run)"), "{}", dry.stdout);
    let generation = |c: &Value| c["metadata"]["generation"].as_i64();
    let before = observe::kmeshconfig(cluster).unwrap().unwrap();
    let example = k
        .run_full(
            &["apply", "--server-side", "-k", "config/kmeshconfig"],
            None,
        )
        .unwrap();
    assert!(
        example.stderr.trim().is_empty(),
        "the example applies over the created object without a conflict or warning: {}",
        example.stderr
    );
    let after = observe::kmeshconfig(cluster).unwrap().unwrap();
    assert_eq!(
        generation(&after),
        generation(&before),
        "the example's values are the defaults: the spec does not change"
    );
    // A GitOps tool applying other values server-side does not conflict with the operator,
    // which owns none of the fields the API server defaulted when it created the object.
    for level in ["debug", "info"] {
        let config = format!(
            "apiVersion: kmesh.net/v1alpha1\nkind: KmeshConfig\nmetadata:\n  name: default\n\
             spec:\n  logLevel: {level}\n"
        );
        let args = [
            "apply",
            "--server-side",
            "--field-manager=gitops",
            "-f",
            "-",
        ];
        k.run_stdin(&args, &config)
            .unwrap_or_else(|e| panic!("a GitOps apply conflicts: {e}"));
        let applied = observe::kmeshconfig(cluster).unwrap().unwrap();
        assert_eq!(applied["spec"]["logLevel"], level);
    }
}

/// Bookinfo (its Services per version too), the DestinationRules, `reviews-tcp` (the reviews
/// pods on a port named as TCP), and a client pod pinned to each node, in the enrolled
/// `default` namespace; returns once both clients' connections to reviews are steered.
fn deploy_bookinfo_and_clients(cluster: &Cluster, agents: Vec<AgentPod>) -> Mesh<'_> {
    let k = cluster.kubectl();
    enrol(cluster, "default");
    for file in [
        "samples/bookinfo/platform/kube/bookinfo.yaml",
        "samples/bookinfo/platform/kube/bookinfo-versions.yaml",
        "samples/bookinfo/networking/destination-rule-all.yaml",
    ] {
        k.run(&["apply", "-f", &reference(&format!("{ISTIO}/{file}"))])
            .unwrap();
    }
    k.run_stdin(&["apply", "-f", "-"], &clients_and_tcp_service())
        .unwrap();
    wait_available(cluster, "default");
    let ready = "--for=condition=Ready";
    k.run(&[
        "wait",
        ready,
        "pod/client-a",
        "pod/client-b",
        "-n",
        "default",
        TIMEOUT,
    ])
    .unwrap();
    let mesh = Mesh {
        cluster,
        agents,
        clients: vec!["client-a".into(), "client-b".into()],
        reviews: service_target(cluster, "reviews", 9080),
        reviews_tcp: service_target(cluster, "reviews-tcp", 9080),
    };
    for client in &mesh.clients {
        wait_until_steered(cluster, client, &mesh.reviews, &REVIEWS_VERSIONS, 60);
    }
    mesh
}

fn clients_and_tcp_service() -> String {
    let client = |name: &str, node: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n  \
             labels:\n    app: client\nspec:\n  nodeName: {node}\n  \
             terminationGracePeriodSeconds: 0\n  containers:\n  - name: client\n    \
             image: curlimages/curl\n    command: [sleep, infinity]\n"
        )
    };
    let service = "apiVersion: v1\nkind: Service\nmetadata:\n  name: reviews-tcp\n  \
                   namespace: default\nspec:\n  selector:\n    app: reviews\n  ports:\n  \
                   - name: tcp-reviews\n    port: 9080\n";
    [
        client("client-a", "node-a"),
        client("client-b", "node-b"),
        service.into(),
    ]
    .join("---\n")
}

// ---- probes and changes ----

/// A change and when it reached each node's kernel.
struct Applied {
    /// CLOCK_MONOTONIC ns when the change started (kubectl spawned) and when kubectl returned.
    started_ns: u64,
    returned_ns: u64,
    /// Per agent, the flip of the first generation newer than before the change.
    flips: Vec<Flip>,
}

impl Applied {
    /// When the last node's flip ended.
    fn last_ns(&self) -> u64 {
        self.flips
            .iter()
            .map(|f| f.between_ns[1])
            .max()
            .unwrap_or(0)
    }

    fn since_start(&self) -> Duration {
        Duration::from_nanos(self.last_ns().saturating_sub(self.started_ns))
    }

    fn since_return(&self) -> Duration {
        Duration::from_nanos(self.last_ns().saturating_sub(self.returned_ns))
    }
}

/// Runs `change` (kubectl), then waits until every agent runs a newer generation that `done`
/// accepts; returns when each went live.
fn change_until_live(
    mesh: &Mesh<'_>,
    what: &str,
    change: impl FnOnce(),
    done: impl Fn(&AgentState) -> bool,
) -> Applied {
    let before = observe::agent_states(mesh.cluster, &mesh.agents).unwrap();
    let started_ns = monotonic_ns();
    change();
    let returned_ns = monotonic_ns();
    let states = wait_agents(mesh.cluster, &mesh.agents, FOLLOW, |i, s| {
        s.generation() > before[i].generation() && done(s)
    })
    .unwrap_or_else(|e| panic!("{what}: {e}"));
    let flips = states.iter().zip(&before).map(|(s, b)| {
        let newer = s.flips.iter().find(|f| f.generation > b.generation());
        *newer
            .unwrap_or_else(|| panic!("{what}: no flip after generation {}: {s:?}", b.generation()))
    });
    let applied = Applied {
        started_ns,
        returned_ns,
        flips: flips.collect(),
    };
    progress!(
        "{what}: live in every node's kernel {:.0?} after the change started ({:.0?} after \
         kubectl returned)",
        applied.since_start(),
        applied.since_return()
    );
    applied
}

/// `kubectl apply -f FILE` (an Istio sample) until every node runs it.
fn apply_sample(mesh: &Mesh<'_>, file: &str) -> Applied {
    let path = reference(&format!("{ISTIO}/{NETWORKING}/{file}"));
    let k = mesh.cluster.kubectl();
    let apply = || {
        k.run(&["apply", "-f", &path]).unwrap();
    };
    change_until_live(mesh, &format!("kubectl apply -f {file}"), apply, |_| true)
}

// ---- scenarios ----

/// Scenario 2: the TCPRoute CRD is installed after the operator started. Discovery finds it
/// (the CRD watch triggers it) without a restart; a TCPRoute at `v1` is compiled and sends the
/// `reviews-tcp` VIP to `reviews-v2` only.
fn crd_installed_after_the_operator(mesh: &Mesh<'_>, figures: &mut Figures) {
    let k = mesh.cluster.kubectl();
    let crd = reference(&format!("{GATEWAY_API_CRDS}/{TCP_ROUTE_CRD}"));
    let installed = Instant::now();
    k.run(&["apply", "--server-side", "-f", &crd]).unwrap();
    observe::wait_kmeshconfig(mesh.cluster, Duration::from_secs(20), |c| {
        !unwatched(c).iter().any(|(kind, _)| kind == "TCPRoute")
    })
    .expect("the TCPRoute CRD is picked up without a restart");
    figures.add(format!(
        "TCPRoute CRD applied -> watched by the running operator {:.1?}",
        installed.elapsed()
    ));
    let route = "apiVersion: gateway.networking.k8s.io/v1\nkind: TCPRoute\nmetadata:\n  \
                 name: reviews-v2\n  namespace: default\nspec:\n  parentRefs:\n  - group: \"\"\n    \
                 kind: Service\n    name: reviews-tcp\n    port: 9080\n  rules:\n  - backendRefs:\n    \
                 - name: reviews-v2\n      port: 9080\n";
    let apply = || {
        k.run_stdin(&["apply", "-f", "-"], route).unwrap();
    };
    let applied = change_until_live(mesh, "TCPRoute v1 applied", apply, |_| true);
    figures.add(format!(
        "TCPRoute applied -> every node's kernel {:.0?} ({:.0?} after kubectl returned; kubectl \
         refreshes its discovery cache for the new kind first)",
        applied.since_start(),
        applied.since_return()
    ));
    let report = probe(mesh.cluster, "client-a", &mesh.reviews_tcp, 200);
    assert_eq!(report.ok, 200, "{report:?}");
    assert_eq!(report.replies_from("reviews-v2-"), 200, "{report:?}");
    let log = mesh.cluster.pod_log("kmesh-system_kmesh-operator-");
    assert!(
        log.lines()
            .any(|l| l.contains("TCPRoute (gateway.networking.k8s.io/v1)")
                && l.contains("now served; watching it")),
        "the operator says it watches TCPRoute at v1:\n{log}"
    );
}

/// Scenario 3: an invalid VirtualService (a subset no DestinationRule defines) is listed in
/// `status.rejected`, gets a `Rejected` Event, and changes nothing else: every node keeps its
/// generation and content hash, and reviews is still split over its three versions.
fn invalid_virtual_service(mesh: &Mesh<'_>) {
    let k = mesh.cluster.kubectl();
    let before = quiet_states(mesh);
    let broken = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  \
                  name: ratings-broken\n  namespace: default\nspec:\n  hosts:\n  - ratings\n  \
                  http:\n  - route:\n    - destination:\n        host: ratings\n        \
                  subset: v9\n";
    let applied = Instant::now();
    k.run_stdin(&["apply", "-f", "-"], broken).unwrap();
    let rejected = |c: &Value| {
        let entries = c["status"]["rejected"].as_array().into_iter().flatten();
        entries
            .filter(|r| r["name"] == "ratings-broken")
            .map(|r| r["field"].as_str().unwrap_or_default().to_string())
            .collect::<Vec<_>>()
    };
    let config = observe::wait_kmeshconfig(mesh.cluster, Duration::from_secs(15), |c| {
        !rejected(c).is_empty()
    })
    .expect("the rejection is in the status");
    assert_eq!(
        rejected(&config),
        ["spec.http[0].route[0].destination.subset"]
    );
    let degraded = condition(&config, "Degraded").unwrap();
    assert_eq!(
        (degraded.0.as_str(), degraded.1.as_str()),
        ("True", "ResourcesRejected")
    );
    progress!(
        "rejected in the status {:.1?} after kubectl apply",
        applied.elapsed()
    );
    let event = wait_event(mesh.cluster, "ratings-broken");
    assert!(event.contains("subset"), "{event}");
    std::thread::sleep(Duration::from_secs(1));
    let after = observe::agent_states(mesh.cluster, &mesh.agents).unwrap();
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(
            (&b.live, b.applied),
            (&a.live, a.applied),
            "nothing else changes"
        );
    }
    let report = probe(mesh.cluster, "client-a", &mesh.reviews, 300);
    assert_eq!(report.ok, 300, "{report:?}");
    for version in ["reviews-v1-", "reviews-v2-", "reviews-v3-"] {
        assert!(report.replies_from(version) > 0, "{version}: {report:?}");
    }
    let delete = [
        "delete",
        "virtualservice",
        "ratings-broken",
        "-n",
        "default",
    ];
    k.run(&delete).unwrap();
    observe::wait_kmeshconfig(mesh.cluster, Duration::from_secs(15), |c| {
        rejected(c).is_empty()
    })
    .expect("the rejection leaves the status with the object");
}

/// The agents' states once no generation has changed for a second.
fn quiet_states(mesh: &Mesh<'_>) -> Vec<AgentState> {
    let started = Instant::now();
    let mut last = observe::agent_states(mesh.cluster, &mesh.agents).unwrap();
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let now = observe::agent_states(mesh.cluster, &mesh.agents).unwrap();
        if now.iter().zip(&last).all(|(n, l)| n.live == l.live) {
            return now;
        }
        assert!(
            started.elapsed() < FOLLOW,
            "the agents never settle: {now:?}"
        );
        last = now;
    }
}

/// The note of the `Rejected` Event about `name` (polled for 10 s).
fn wait_event(cluster: &Cluster, name: &str) -> String {
    let selector = format!("involvedObject.name={name},reason=Rejected");
    let started = Instant::now();
    loop {
        let args = [
            "get",
            "events",
            "-n",
            "default",
            "--field-selector",
            &selector,
            "-o",
            "json",
        ];
        let out = cluster.kubectl().run(&args).unwrap();
        let events: Value = serde_json::from_str(&out).unwrap();
        if let Some(event) = events["items"].as_array().and_then(|i| i.first()) {
            assert_eq!(event["type"], "Warning", "{event}");
            assert_eq!(event["involvedObject"]["kind"], "VirtualService", "{event}");
            return event["message"].as_str().unwrap_or_default().to_string();
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no Rejected Event about {name}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Scenario 4: the operator restarts with RBAC lacking the `gateway.networking.k8s.io` rule
/// (HTTPRoute, TCPRoute, ReferenceGrant: routing kinds; an authorization kind forbidden holds
/// publishing instead, see `cluster_authz.rs`). The status lists them as Forbidden within seconds
/// (the first compile does not wait for them), each is logged once at error level, and a
/// VirtualService change still reaches the kernel (90/10 measured). The rule is then restored;
/// returns when, for [`forbidden_kinds_recover`].
fn forbidden_kinds(mesh: &Mesh<'_>, figures: &mut Figures) -> Instant {
    let k = mesh.cluster.kubectl();
    let role = k
        .run(&["get", "clusterrole", "kmesh-operator", "-o", "json"])
        .unwrap();
    let mut role: Value = serde_json::from_str(&role).unwrap();
    let rules = role["rules"].as_array_mut().expect("rules");
    let count = rules.len();
    rules.retain(|r| {
        let groups = r["apiGroups"].as_array().into_iter().flatten();
        !groups.into_iter().any(|g| g == "gateway.networking.k8s.io")
    });
    assert_eq!(rules.len(), count - 1, "one rule removed");
    let before_restart = quiet_states(mesh);
    k.run_stdin(&["replace", "-f", "-"], &role.to_string())
        .unwrap();
    let restarted = Instant::now();
    mesh.cluster
        .restart_operators()
        .expect("delete the operator pods");
    let forbidden = |c: &Value| {
        let entries = unwatched(c);
        let of = |kind: &str| entries.contains(&(kind.to_string(), "Forbidden".to_string()));
        of("HTTPRoute") && of("TCPRoute") && of("ReferenceGrant")
    };
    let config = observe::wait_kmeshconfig(mesh.cluster, Duration::from_secs(30), forbidden)
        .expect("the forbidden kinds are in the status");
    figures.add(format!(
        "operator restarted with a kind forbidden -> status lists it {:.1?} (the first compile \
         used to wait 60 s for it)",
        restarted.elapsed()
    ));
    let degraded = condition(&config, "Degraded").unwrap();
    assert_eq!(
        (degraded.0.as_str(), degraded.1.as_str()),
        ("True", "KindsNotReadable")
    );
    k.run(&[
        "wait",
        "--for=condition=Ready",
        "kmeshconfig/default",
        TIMEOUT,
    ])
    .unwrap();
    // Ready may still be the old leader's status. The restart itself changes every node's
    // content: the `kmesh-operator` Service is in the mesh's catalog, and its endpoints are the
    // operator pods, new ones not ready at first (seen: 3,272 bytes, then 3,144 while the new
    // pods were not ready, then 3,272 with their addresses). A run once took that change for the
    // VirtualService below; so the change is measured once the agents are quiet.
    let settled = quiet_states(mesh);
    let hashes = |states: &[AgentState]| -> Vec<Option<String>> {
        states
            .iter()
            .map(|s| s.live.as_ref().map(|l| l.1.clone()))
            .collect()
    };
    if hashes(&settled) != hashes(&before_restart) {
        progress!(
            "the restarted operator's own endpoints changed the nodes' content: {:?} -> {:?}",
            before_restart.iter().map(|s| &s.live).collect::<Vec<_>>(),
            settled.iter().map(|s| &s.live).collect::<Vec<_>>()
        );
    }
    apply_sample(mesh, "virtual-service-reviews-90-10.yaml");
    let report = probe(mesh.cluster, "client-a", &mesh.reviews, 2000);
    assert_eq!(report.ok, 2000, "{report:?}");
    report.assert_share_from("reviews-v1-", 0.9);
    report.assert_share_from("reviews-v2-", 0.1);
    assert_logged_once_per_pod(mesh.cluster, "forbidden: the operator's RBAC");
    // Restore the shipped RBAC (the whole install again: unchanged but for the rule).
    k.run(&["apply", "-k", "config/default"]).unwrap();
    Instant::now()
}

/// Each operator pod logged `line` at most once per forbidden kind, and some pod did.
fn assert_logged_once_per_pod(cluster: &Cluster, line: &str) {
    for kind in ["HTTPRoute", "TCPRoute", "ReferenceGrant"] {
        cluster.assert_operators_logged_once(&[line, kind]);
    }
}

/// The end of scenario 4: with the rule back, the kinds are read again (the watches retry with
/// backoff, at most 30 s apart).
fn forbidden_kinds_recover(mesh: &Mesh<'_>, restored: Instant) {
    observe::wait_kmeshconfig(mesh.cluster, Duration::from_secs(45), |c| {
        !unwatched(c).iter().any(|(_, reason)| reason == "Forbidden")
    })
    .expect("the kinds are read again once the RBAC rule is back");
    progress!(
        "forbidden kinds read again {:.1?} after the RBAC rule came back",
        restored.elapsed()
    );
}

/// The reviews-v1 pods.
fn reviews_v1_pods(cluster: &Cluster) -> BTreeSet<String> {
    let api: Api<Pod> = Api::namespaced(cluster.client(), "default");
    let params = ListParams::default().labels("app=reviews,version=v1");
    let pods = cluster.block_on(api.list(&params)).expect("list pods");
    let live = pods
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none());
    live.filter_map(|p| p.metadata.name).collect()
}

/// Probes client-a -> reviews (`count` connections) until every connection succeeds and the
/// reviews-v1 pods replying are exactly `expected` (and none other); returns how long it took.
fn until_v1_replies_are(mesh: &Mesh<'_>, expected: &BTreeSet<String>, what: &str) -> Duration {
    let started = Instant::now();
    loop {
        // A short timeout: a connection to a pod that is gone fails fast (everything here is
        // on one machine), so the loop measures the kernel, not the probe's timeouts.
        let args = [
            "--target",
            &mesh.reviews,
            "--count",
            "300",
            "--timeout-ms",
            "300",
        ];
        let report = mesh
            .cluster
            .run_probe("default", "client-a", &args)
            .unwrap();
        let replying = report.pods_replying("reviews-");
        if report.ok == 300 && &replying == expected {
            progress!(
                "{what}: {replying:?} reached, 0 failed, after {:.1?}",
                started.elapsed()
            );
            return started.elapsed();
        }
        assert!(
            started.elapsed() < FOLLOW,
            "{what}: expected replies from exactly {expected:?}: {report:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The endpoints in each node's live tables.
fn endpoints(mesh: &Mesh<'_>) -> Vec<Option<u64>> {
    let states = observe::agent_states(mesh.cluster, &mesh.agents).unwrap();
    states.iter().map(|s| s.endpoints).collect()
}

/// When the kernels changed after `started_ns`, as durations from it: (the latest, across nodes,
/// of each node's first flip since; the latest of each node's flip of the generation it runs
/// now). Called once the change is known complete (nothing else changes meanwhile), so the
/// second is when the kernels reached the final state.
fn kernel_changes_since(mesh: &Mesh<'_>, started_ns: u64, what: &str) -> (Duration, Duration) {
    let states = observe::agent_states(mesh.cluster, &mesh.agents).unwrap();
    let since = |ns: u64| Duration::from_nanos(ns.saturating_sub(started_ns));
    let mut first = Duration::ZERO;
    let mut last = Duration::ZERO;
    for (agent, state) in mesh.agents.iter().zip(&states) {
        let flips = state.flips.iter().filter(|f| f.between_ns[0] >= started_ns);
        let Some(earliest) = flips.map(|f| f.between_ns[1]).min() else {
            panic!(
                "{what}: no flip on {} since the change: {state:?}",
                agent.node
            );
        };
        let live = state
            .flip_of(state.generation())
            .expect("the live generation's flip");
        first = first.max(since(earliest));
        last = last.max(since(live.between_ns[1]));
    }
    (first, last)
}

/// Scenario 5: with all reviews traffic on v1 (Istio's `virtual-service-all-v1`), reviews-v1
/// scaled to 3: each new pod is reached; one of them deleted: it leaves the kernel (300
/// connections, none to it, none failed) and its replacement is reached; scaled back to 1: the
/// removed pods no longer get connections. The nodes' endpoint counts follow. Times are from the
/// kubectl command to the agents' flips.
fn scale_and_delete(mesh: &Mesh<'_>, figures: &mut Figures) {
    apply_sample(mesh, "virtual-service-all-v1.yaml");
    let one = reviews_v1_pods(mesh.cluster);
    until_v1_replies_are(mesh, &one, "all-v1");
    let endpoints_one = endpoints(mesh);
    let three = scale_reviews_v1(mesh, 3, figures);
    let endpoints_three = endpoints(mesh);
    for (one, three) in endpoints_one.iter().zip(&endpoints_three) {
        assert!(
            three > one,
            "endpoints grow: {endpoints_one:?} -> {endpoints_three:?}"
        );
    }
    let deleted = three.iter().find(|p| !one.contains(*p)).unwrap().clone();
    delete_reviews_v1_pod(mesh, &deleted, figures);
    scale_reviews_v1(mesh, 1, figures);
    assert_eq!(
        endpoints(mesh),
        endpoints_one,
        "endpoints back to one pod's"
    );
}

/// `kubectl scale deployment/reviews-v1 --replicas=N`: until exactly its pods are reached;
/// returns them.
fn scale_reviews_v1(mesh: &Mesh<'_>, replicas: usize, figures: &mut Figures) -> BTreeSet<String> {
    let k = mesh.cluster.kubectl();
    let deployment = "deployment/reviews-v1";
    let before = reviews_v1_pods(mesh.cluster).len();
    let started_ns = monotonic_ns();
    let replicas_arg = format!("--replicas={replicas}");
    k.run(&["scale", deployment, "-n", "default", &replicas_arg])
        .unwrap();
    k.run(&["rollout", "status", deployment, "-n", "default", TIMEOUT])
        .unwrap();
    let started = Instant::now();
    while reviews_v1_pods(mesh.cluster).len() != replicas {
        assert!(
            started.elapsed() < FOLLOW,
            "reviews-v1 does not scale to {replicas}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let pods = reviews_v1_pods(mesh.cluster);
    let what = format!("scaled to {replicas}");
    until_v1_replies_are(mesh, &pods, &what);
    let (_, reached) = kernel_changes_since(mesh, started_ns, &what);
    let outcome = if replicas > before {
        "each new pod in every node's kernel"
    } else {
        "the removed pods out of every node's kernel"
    };
    figures.add(format!(
        "kubectl scale reviews-v1 {before} -> {replicas}: {outcome} after {reached:.0?}"
    ));
    pods
}

/// `kubectl delete pod`: the pod leaves the kernel, its replacement is reached.
fn delete_reviews_v1_pod(mesh: &Mesh<'_>, pod: &str, figures: &mut Figures) {
    let k = mesh.cluster.kubectl();
    let started_ns = monotonic_ns();
    k.run(&["delete", "pod", pod, "-n", "default", TIMEOUT])
        .unwrap();
    let deployment = "deployment/reviews-v1";
    k.run(&["rollout", "status", deployment, "-n", "default", TIMEOUT])
        .unwrap();
    let replaced = reviews_v1_pods(mesh.cluster);
    assert!(
        !replaced.contains(pod) && replaced.len() == 3,
        "{replaced:?}"
    );
    let what = format!("{pod} deleted");
    until_v1_replies_are(mesh, &replaced, &what);
    let (gone, replacement) = kernel_changes_since(mesh, started_ns, &what);
    figures.add(format!(
        "kubectl delete pod: out of every node's kernel after {gone:.0?}, its replacement in \
         after {replacement:.0?}"
    ));
}

/// `kubectl patch kmeshconfig default` to `mode`: until every node runs it, with `kubectl wait
/// --for=condition=Ready` started right after the patch; asserts Ready came within 2 s of the
/// last node (and not before it), and returns the change.
fn patch_mode(mesh: &Mesh<'_>, mode_name: &str, value: u32, figures: &mut Figures) -> Applied {
    let k = mesh.cluster.kubectl();
    let patch = format!("{{\"spec\":{{\"mode\":\"{mode_name}\"}}}}");
    let waiter = k.clone();
    let mut wait = None;
    let change = || {
        k.run(&[
            "patch",
            "kmeshconfig",
            "default",
            "--type",
            "merge",
            "-p",
            &patch,
        ])
        .unwrap();
        wait = Some(std::thread::spawn(move || {
            let ready = "--for=condition=Ready";
            waiter
                .run(&["wait", ready, "kmeshconfig/default", "--timeout=30s"])
                .unwrap();
            monotonic_ns()
        }));
    };
    let applied = change_until_live(mesh, &format!("mode {mode_name}"), change, |s| {
        s.mode == Some(value)
    });
    let ready_ns = wait.unwrap().join().expect("kubectl wait");
    let last = applied.last_ns();
    let last_start = applied
        .flips
        .iter()
        .map(|f| f.between_ns[0])
        .max()
        .unwrap_or(0);
    assert!(
        ready_ns >= last_start,
        "Ready before the last node applied: stale"
    );
    let after = Duration::from_nanos(ready_ns.saturating_sub(last));
    figures.add(format!(
        "kubectl patch mode {mode_name} -> every node applied {:.0?}; kubectl wait \
         --for=condition=Ready returned {after:.0?} after the last node",
        applied.since_start()
    ));
    assert!(
        after <= Duration::from_secs(2),
        "Ready {after:?} after the last node applied"
    );
    applied
}

/// Scenario 6: mode Disabled: every node passes traffic through (a client on each node dialing
/// the VIP from its no-route namespace gets ENETUNREACH); back to KernelNative: steered again.
fn mode_switch(mesh: &Mesh<'_>, figures: &mut Figures) {
    patch_mode(mesh, "Disabled", mode::DISABLED, figures);
    for client in &mesh.clients {
        let report = probe(mesh.cluster, client, &mesh.reviews, 20);
        assert_eq!(
            report.errors_of("ENETUNREACH"),
            20,
            "{client} passes through: {report:?}"
        );
    }
    patch_mode(mesh, "KernelNative", mode::KERNEL_NATIVE, figures);
    for client in &mesh.clients {
        let report = probe(mesh.cluster, client, &mesh.reviews, 50);
        assert_eq!(report.ok, 50, "{client} steered again: {report:?}");
        assert_eq!(report.replies_from("reviews-v1-"), 50, "all-v1: {report:?}");
    }
}

/// `kubectl patch kmeshconfig default --type merge` of `spec` (the `spec` object's JSON).
fn patch_spec(mesh: &Mesh<'_>, spec: &str) {
    let patch = format!("{{\"spec\":{spec}}}");
    let args = ["patch", "kmeshconfig", "default", "--type", "merge", "-p"];
    mesh.cluster
        .kubectl()
        .run(&[&args[..], &[patch.as_str()]].concat())
        .unwrap();
}

/// `kubectl patch` of `spec`, then polls every agent with `read` until `done` holds for each:
/// prints when each node had it in force, from the start of kubectl, and asserts each within
/// [`SETTING_IN_FORCE`].
fn patch_until_in_force<T: std::fmt::Debug>(
    mesh: &Mesh<'_>,
    spec: &str,
    read: impl Fn(&Cluster, &AgentPod) -> std::io::Result<T>,
    done: impl Fn(&T) -> bool,
    figures: &mut Figures,
) {
    let started = Instant::now();
    patch_spec(mesh, spec);
    let reached = observe::wait_each_agent(mesh.cluster, &mesh.agents, FOLLOW, read, done)
        .unwrap_or_else(|e| panic!("kubectl patch {spec}: {e}"));
    let took: Vec<(&str, Duration)> = mesh
        .agents
        .iter()
        .zip(&reached)
        .map(|(a, (_, at))| (a.node.as_str(), at.duration_since(started)))
        .collect();
    let per_node: Vec<String> = took.iter().map(|(n, t)| format!("{n} {t:.0?}")).collect();
    figures.add(format!(
        "kubectl patch {spec} -> in force, from the start of kubectl: {}",
        per_node.join(", ")
    ));
    for (node, took) in took {
        assert!(
            took <= SETTING_IN_FORCE,
            "kubectl patch {spec}: in force on {node} after {took:?}, more than \
             {SETTING_IN_FORCE:?}"
        );
    }
}

/// The operators' own filter follows `logLevel` too: the replicas that log the change to `level`
/// (every one that compiled it) write debug lines after it when `level` is debug (the leader's
/// "recorded live generations", as the agents report the new snapshot live), and none after it
/// when it is info. The log lines are the operators' standard output (`<time> LEVEL target: ...`).
fn operators_follow_log_level(cluster: &Cluster, level: &str) {
    let change = "log level changed by KmeshConfig spec.logLevel from=";
    let to = format!("to=\"{level}\"");
    // Each operator log's lines after its last change to `level`, for the logs that have one.
    let after_change = || -> Vec<(String, Vec<String>)> {
        cluster
            .pod_logs()
            .into_iter()
            .filter(|(key, _)| key.starts_with("kmesh-system_kmesh-operator-"))
            .filter_map(|(key, log)| {
                let lines: Vec<&str> = log.lines().collect();
                let last = lines
                    .iter()
                    .rposition(|l| l.contains(change) && l.contains(&to))?;
                // Back to info: only the replicas that went to debug (not those whose one change
                // to info was at their start, before they died in an earlier scenario).
                let went_to_debug = |l: &&str| l.contains(change) && l.contains("to=\"debug\"");
                if level != "debug" && !lines[..last].iter().any(went_to_debug) {
                    return None;
                }
                let rest = lines[last + 1..].iter().map(|l| l.to_string()).collect();
                Some((key, rest))
            })
            .collect()
    };
    let is_debug = |line: &String| line.split_whitespace().nth(1) == Some("DEBUG");
    let started = Instant::now();
    loop {
        let logs = after_change();
        let debug_lines: usize = logs
            .iter()
            .map(|(_, l)| l.iter().filter(|l| is_debug(l)).count())
            .sum();
        let done = match level {
            // Some replica logged the change and then wrote debug lines.
            "debug" => !logs.is_empty() && debug_lines > 0,
            // Given the agents time to report the snapshot live (logged at debug if the filter
            // had not changed), no replica wrote a debug line after the change.
            _ => started.elapsed() >= Duration::from_secs(3),
        };
        if done {
            assert!(!logs.is_empty(), "no operator logged its change to {level}");
            if level != "debug" {
                for (pod, lines) in &logs {
                    let debug: Vec<&String> = lines.iter().filter(|l| is_debug(l)).collect();
                    assert!(
                        debug.is_empty(),
                        "{pod} at {level} still logs debug: {debug:?}"
                    );
                }
            }
            progress!(
                "operators follow logLevel {level}: {} replica(s) logged the change, {debug_lines} \
                 debug line(s) after it",
                logs.len()
            );
            return;
        }
        assert!(
            started.elapsed() < SETTING_IN_FORCE * 5,
            "logLevel {level}: no operator wrote debug lines after its change: {logs:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Whether the snapshot live in `agent` has the access log on (its `/debug/config_dump` header).
fn live_access_log(cluster: &Cluster, agent: &AgentPod) -> std::io::Result<Option<bool>> {
    observe::config_header(cluster, agent).map(|h| h["access_log"].as_bool())
}

/// Scenario 7: `kubectl patch` of `logLevel` to debug and back to info: every agent's filter in
/// force (`/debug/log-level`) follows within 2 s, and the operators' own filter follows. `accessLog` on: every node's live snapshot has it
/// within 2 s, and connections from a client on each node are logged by that node's agent, one
/// line per connection with the client's address; off again: connections the agent did see (its
/// kernel events counter grows) write no line.
fn log_level_and_access_log(mesh: &Mesh<'_>, figures: &mut Figures) {
    for agent in &mesh.agents {
        let level = observe::log_level(mesh.cluster, agent).unwrap();
        assert_eq!(level, "info", "{} before the patch", agent.pod);
    }
    for level in ["debug", "info"] {
        let spec = format!("{{\"logLevel\":\"{level}\"}}");
        let read = observe::log_level;
        patch_until_in_force(mesh, &spec, read, |l| l == level, figures);
        operators_follow_log_level(mesh.cluster, level);
    }
    for agent in &mesh.agents {
        assert_eq!(
            live_access_log(mesh.cluster, agent).unwrap(),
            Some(false),
            "{}: off by default",
            agent.pod
        );
        let lines = access_log::agent_lines(mesh.cluster, &agent.pod).unwrap();
        assert!(
            lines.is_empty(),
            "{}: logged while off: {lines:?}",
            agent.pod
        );
    }
    let on = r#"{"accessLog":true}"#;
    patch_until_in_force(mesh, on, live_access_log, |v| *v == Some(true), figures);
    for (agent, client) in mesh.agents.iter().zip(&mesh.clients) {
        connections_logged(mesh, agent, client);
    }
    let off = r#"{"accessLog":false}"#;
    patch_until_in_force(mesh, off, live_access_log, |v| *v == Some(false), figures);
    for (agent, client) in mesh.agents.iter().zip(&mesh.clients) {
        connections_not_logged(mesh, agent, client);
    }
}

/// The IP of pod `default/<name>`.
fn pod_ip(mesh: &Mesh<'_>, name: &str) -> std::net::IpAddr {
    let (_, _, ip) = mesh.cluster.sandbox("default", name).unwrap();
    ip.into()
}

/// [`LOGGED_CONNECTIONS`] connections from `client` to reviews (all-v1): `agent` (its node's)
/// writes one outbound line for each (its own source port), naming the client's address, the
/// reviews VIP it dialed and the reviews-v1 pod it reached, the bytes of that pod's reply (its
/// name and a newline; the client sends nothing), no response flag and no denial. The names
/// (workload, namespace, service) come with the snapshot's names section: while the agent has
/// none they are null, and a name it gives must be the right one.
fn connections_logged(mesh: &Mesh<'_>, agent: &AgentPod, client: &str) {
    let client_ip = pod_ip(mesh, client);
    let vip: std::net::SocketAddr = mesh.reviews.parse().unwrap();
    let v1: BTreeMap<std::net::IpAddr, String> = reviews_v1_pods(mesh.cluster)
        .into_iter()
        .map(|p| (pod_ip(mesh, &p), p))
        .collect();
    let before = access_log::agent_lines(mesh.cluster, &agent.pod)
        .unwrap()
        .len();
    let report = probe(mesh.cluster, client, &mesh.reviews, LOGGED_CONNECTIONS);
    assert_eq!(
        report.ok,
        u64::from(LOGGED_CONNECTIONS),
        "{client}: {report:?}"
    );
    let logged = wait_for_lines(mesh, agent, before, client_ip);
    let mut ports = BTreeSet::new();
    for line in &logged {
        let shown = &line.line;
        assert_eq!(line.dst_service_addr, Some(vip), "the VIP dialed: {shown}");
        let Some(pod) = v1.get(&line.dst_addr.ip()) else {
            panic!("not a reviews-v1 pod {v1:?}: {shown}");
        };
        assert_eq!(line.dst_addr.port(), vip.port(), "{shown}");
        assert_eq!(line.response_flags, "-", "{shown}");
        assert_eq!(line.verdict, "-", "{shown}");
        assert_eq!(line.bytes_sent, 0, "the client sends nothing: {shown}");
        let reply = pod.len() as u64 + 1;
        assert_eq!(line.bytes_received, reply, "{pod} and a newline: {shown}");
        // The snapshot's names section names the client's workload and the service.
        let named = |field: &Option<String>, name: &str| field.as_deref() == Some(name);
        assert!(named(&line.src_namespace, "default"), "{shown}");
        assert!(named(&line.src_workload, client), "{shown}");
        let host = "reviews.default.svc.cluster.local";
        assert!(named(&line.dst_service, host), "{shown}");
        ports.insert(line.src_addr.port());
    }
    assert_eq!(
        ports.len(),
        logged.len(),
        "each line its own connection: {logged:?}"
    );
    let names = logged[0].src_workload.is_some() && logged[0].dst_service.is_some();
    progress!(
        "{}: {client}'s connections logged ({}): {}",
        agent.pod,
        if names {
            "named"
        } else {
            "no names: the snapshot has no names section"
        },
        logged[0].line
    );
}

/// Waits (up to 5 s: the agent reads the kernel's events every 100 ms) for [`LOGGED_CONNECTIONS`]
/// outbound lines from `client_ip` after the first `before` lines of `agent`'s access log; asserts
/// no more come, and returns them.
fn wait_for_lines(
    mesh: &Mesh<'_>,
    agent: &AgentPod,
    before: usize,
    client_ip: std::net::IpAddr,
) -> Vec<AccessLogLine> {
    let of_client = |l: &AccessLogLine| l.direction == "outbound" && l.src_addr.ip() == client_ip;
    let new_lines = || {
        let lines = access_log::agent_lines(mesh.cluster, &agent.pod).unwrap();
        let new = lines[before..].iter().filter(|l| of_client(l));
        new.cloned().collect::<Vec<_>>()
    };
    let started = Instant::now();
    loop {
        let new = new_lines();
        if new.len() >= LOGGED_CONNECTIONS as usize {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{}: {} of {LOGGED_CONNECTIONS} connections from {client_ip} logged: {new:?}\n{}",
            agent.pod,
            new.len(),
            mesh.cluster
                .pod_log(&format!("kmesh-system_{}_", agent.pod))
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // A line written twice would come right after the first.
    std::thread::sleep(Duration::from_millis(300));
    let logged = new_lines();
    assert_eq!(
        logged.len(),
        LOGGED_CONNECTIONS as usize,
        "one line per connection: {logged:?}"
    );
    logged
}

/// With the access log off: [`LOGGED_CONNECTIONS`] connections from `client`, which `agent`'s
/// kernel events counter shows it read, write no access-log line.
fn connections_not_logged(mesh: &Mesh<'_>, agent: &AgentPod, client: &str) {
    let closed = r#"kmesh_events_total{outcome="closed"}"#;
    let events = || {
        observe::metric(mesh.cluster, agent, closed)
            .unwrap()
            .unwrap_or(0.0)
    };
    let events_before = events();
    let before = access_log::agent_lines(mesh.cluster, &agent.pod)
        .unwrap()
        .len();
    let report = probe(mesh.cluster, client, &mesh.reviews, LOGGED_CONNECTIONS);
    assert_eq!(
        report.ok,
        u64::from(LOGGED_CONNECTIONS),
        "{client}: {report:?}"
    );
    let started = Instant::now();
    while events() < events_before + f64::from(LOGGED_CONNECTIONS) {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{}: its kernel events do not count {client}'s {LOGGED_CONNECTIONS} connections \
             ({closed} {events_before} -> {}): no line would prove nothing",
            agent.pod,
            events()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The counter is bumped just before a line would be written: let a late line show.
    std::thread::sleep(Duration::from_millis(300));
    let lines = access_log::agent_lines(mesh.cluster, &agent.pod).unwrap();
    assert!(
        lines.len() == before,
        "{}: access log off, yet: {:?}",
        agent.pod,
        &lines[before..]
    );
}

/// Scenario 8: Rolling with node-b as the canary. Reviews moves from v1 to v3 while a client on
/// each node connects every millisecond: node-b's agent flips first, node-a's only after it;
/// node-a's client still reaches v1 between the two flips while node-b's reaches v3.
fn rolling_with_a_canary(mesh: &Mesh<'_>, figures: &mut Figures) {
    let k = mesh.cluster.kubectl();
    k.run(&["label", "node", "node-b", "kmesh.net/canary=true"])
        .unwrap();
    let rolling = r#"{"spec":{"rollout":{"strategy":"Rolling","maxUnavailable":1,
        "canary":{"nodeSelector":{"matchLabels":{"kmesh.net/canary":"true"}}}}}}"#;
    k.run(&[
        "patch",
        "kmeshconfig",
        "default",
        "--type",
        "merge",
        "-p",
        rolling,
    ])
    .unwrap();
    k.run(&[
        "wait",
        "--for=condition=Ready",
        "kmeshconfig/default",
        TIMEOUT,
    ])
    .unwrap();
    let stop = StopFile::new("canary");
    let probes: Vec<_> = mesh
        .clients
        .iter()
        .map(|client| {
            let args = [
                "--target",
                &mesh.reviews,
                "--until-file",
                stop.arg(),
                "--interval-us",
                "1000",
                "--timeout-ms",
                "2000",
                "--timeline",
            ];
            mesh.cluster.spawn_probe("default", client, &args).unwrap()
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let applied = apply_sample(mesh, "virtual-service-reviews-v3.yaml");
    std::thread::sleep(Duration::from_millis(300));
    stop.signal().unwrap();
    let reports: Vec<ProbeReport> = probes.into_iter().map(|p| p.wait().unwrap()).collect();
    let (a, b) = (applied.flips[0], applied.flips[1]);
    assert!(
        b.between_ns[1] < a.between_ns[0],
        "the canary node-b flips before node-a: {b:?} vs {a:?}"
    );
    let window = (b.between_ns[1], a.between_ns[0]);
    check_canary_traffic(
        &reports[0],
        "client-a",
        window,
        a,
        "reviews-v1-",
        "reviews-v3-",
    );
    check_canary_traffic(
        &reports[1],
        "client-b",
        window,
        b,
        "reviews-v3-",
        "reviews-v3-",
    );
    figures.add(format!(
        "Rolling with a canary: node-b live, node-a {:.0?} later",
        Duration::from_nanos(window.1 - window.0)
    ));
    let all_at_once = r#"{"spec":{"rollout":{"strategy":"AllAtOnce","canary":null}}}"#;
    k.run(&[
        "patch",
        "kmeshconfig",
        "default",
        "--type",
        "merge",
        "-p",
        all_at_once,
    ])
    .unwrap();
    k.run(&["label", "node", "node-b", "kmesh.net/canary-"])
        .unwrap();
}

/// A client's timeline around a rollout: every connection succeeded; those made before its
/// node's flip reached v1, those after it `after`; in the window between the canary's flip and
/// node-a's, at least one connection was made and each reached `in_window`.
fn check_canary_traffic(
    report: &ProbeReport,
    client: &str,
    window: (u64, u64),
    own_flip: Flip,
    in_window: &str,
    after: &str,
) {
    assert_eq!(report.failed, 0, "{client}: {report:?}");
    let mut in_window_count = 0;
    for attempt in &report.timeline {
        let Outcome::Reply(pod) = &attempt.outcome else {
            panic!("{client}: {attempt:?}");
        };
        let [start, end] = attempt.connect_ns;
        if end < own_flip.between_ns[0] && end < window.0 {
            assert!(
                pod.starts_with("reviews-v1-"),
                "{client} before the rollout: {attempt:?}"
            );
        } else if start > window.0 && end < window.1 {
            assert!(
                pod.starts_with(in_window),
                "{client} between the flips: {attempt:?}"
            );
            in_window_count += 1;
        } else if start > own_flip.between_ns[1] {
            assert!(
                pod.starts_with(after),
                "{client} after its node's flip: {attempt:?}"
            );
        }
    }
    progress!(
        "{client}: {} connections, {in_window_count} between the canary's flip and node-a's",
        report.timeline.len()
    );
    assert!(
        in_window_count > 0,
        "{client}: no connection between the two flips"
    );
}

/// Scenario 9: 22 changes alternating Istio's 90/10 and v3 reviews VirtualServices; the time from
/// the start of `kubectl apply` (and from its return) to the last node's flip, p50 and p99.
fn apply_to_kernel_latency(mesh: &Mesh<'_>, figures: &mut Figures) {
    let mut from_start = Vec::new();
    let mut from_return = Vec::new();
    for i in 0..22 {
        let file = if i % 2 == 0 {
            "virtual-service-reviews-90-10.yaml"
        } else {
            "virtual-service-reviews-v3.yaml"
        };
        let applied = apply_sample(mesh, file);
        from_start.push(applied.since_start());
        from_return.push(applied.since_return());
    }
    let (p50, p99) = percentiles(&mut from_start);
    let (r50, r99) = percentiles(&mut from_return);
    figures.add(format!(
        "kubectl apply -> every node's kernel over {} changes: p50 {p50:.0?}, p99 {p99:.0?} from \
         the start of kubectl apply; p50 {r50:.0?}, p99 {r99:.0?} from its return",
        from_start.len()
    ));
}

/// p50 and p99 (nearest rank).
fn percentiles(values: &mut [Duration]) -> (Duration, Duration) {
    values.sort();
    let rank =
        |p: f64| values[((p * values.len() as f64).ceil() as usize).clamp(1, values.len()) - 1];
    (rank(0.50), rank(0.99))
}
