//! Istio policies end to end (issue #8): real `security.istio.io/v1` AuthorizationPolicy and
//! PeerAuthentication YAML (`tests/fixtures/authz/`), written next to a small cluster's YAML and
//! compiled by `kmeshctl compile -o binary`; the snapshot fed to the real agent (snapshot file);
//! the real `sk_lookup` program judging each SYN in the pods' network namespaces.
//!
//! One cluster, one node, five scenarios applied one after another as generations 1..=5. In each,
//! every client (mesh pods of two namespaces with distinct service accounts, a pod of a namespace
//! outside the mesh, two addresses with no pod at all, and the node itself) connects [`N`] times
//! to the scenario's server on each of its ports. Checked per scenario: the exact verdict matrix
//! (all allowed, or all refused at once with ECONNREFUSED), the server's accepts (none for a
//! refused connection), every `/debug/authz` counter of the server (under the deciding policy's
//! name, kind, action and reason), and the node's exemptions. Each scenario has its own server (and
//! ports), so a verdict leaking between workloads or ports shows. All scenarios run, then the
//! failures of all of them are reported together.
//!
//! Run as root after `cargo build --workspace --bins` (kmeshctl, kmesh-agent and kmesh-probe).
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    time::Duration,
};

use kmesh_tests::{
    Agent, AgentDir, AgentOptions, AgentSource, Pod, ProbeHandle, ProbeReport, TcpServer, TempPath,
    TestCgroup, TestNetwork,
    probe::spawn_in_cgroup_dir,
    write_atomically,
    yaml_cluster::{ClusterNamespace, ClusterPod, YamlCluster},
};

const NODE: &str = "node-1";
/// Connections per client and port.
const N: u64 = 20;

/// `shop` holds the servers, `secure` the STRICT one; `front` and `back` are mesh clients'
/// namespaces; `legacy` is outside the mesh (no enrolment label).
const NAMESPACES: [ClusterNamespace; 5] = [
    ns("shop", true),
    ns("secure", true),
    ns("front", true),
    ns("back", true),
    ns("legacy", false),
];

/// Addresses: 10.244.144.0/24 and 10.244.145.0/24 (back-api alone there), 10.244.146.0/24 for the
/// addresses with no pod; no other test uses them (agents enrol namespaces by address,
/// machine-wide).
const PODS: [ClusterPod; 9] = [
    pod("orders", "shop", "orders", [10, 244, 144, 101]),
    pod("payments", "shop", "payments", [10, 244, 144, 102]),
    pod("catalog", "shop", "catalog", [10, 244, 144, 103]),
    pod("vault", "secure", "vault", [10, 244, 144, 104]),
    pod("ledger", "shop", "ledger", [10, 244, 144, 105]),
    pod("front-web", "front", "web", [10, 244, 144, 11]),
    pod("front-batch", "front", "batch", [10, 244, 144, 12]),
    pod("back-api", "back", "api", [10, 244, 145, 21]),
    pod("legacy-app", "legacy", "default", [10, 244, 144, 31]),
];

/// Clients that are no pod of the cluster at all (no Pod object): name and address.
const NO_POD_CLIENTS: [(&str, Ipv4Addr); 2] = [
    ("stranger", Ipv4Addr::new(10, 244, 146, 5)),
    ("outsider", Ipv4Addr::new(10, 244, 146, 77)),
];

/// Every client, in the order of the printed matrix; [`NODE_CLIENT`] is the node's own namespace.
const CLIENTS: [&str; 7] = [
    "front-web",
    "front-batch",
    "back-api",
    "legacy-app",
    "stranger",
    "outsider",
    NODE_CLIENT,
];
const NODE_CLIENT: &str = "node";

/// Mesh pods on the node: the agent attaches the authorization program to each one's namespace.
const ENROLLED_PODS: u64 = 8;

const fn ns(name: &'static str, enrolled: bool) -> ClusterNamespace {
    ClusterNamespace { name, enrolled }
}

const fn pod(
    name: &'static str,
    namespace: &'static str,
    service_account: &'static str,
    ip: [u8; 4],
) -> ClusterPod {
    ClusterPod {
        name,
        namespace,
        service_account,
        app: name,
        ip: Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]),
    }
}

/// Why a connection gets its verdict: action, reason and deciding policy (`namespace/name`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Why {
    AllowMatched(&'static str),
    NoAllowPolicy,
    DenyMatched(&'static str),
    NoAllowMatched,
    StrictMtls(&'static str),
    /// From the node's own address: allowed before any table, counted apart.
    NodeExempt,
}

/// A `/debug/authz` counter's key: policy name and kind (none for policy 0), action, reason.
type CounterKey = (Option<(String, String)>, String, String);

impl Why {
    fn allowed(self) -> bool {
        matches!(
            self,
            Why::AllowMatched(_) | Why::NoAllowPolicy | Why::NodeExempt
        )
    }

    /// The counter this verdict is counted under; `None` for the node's exemption.
    fn counter(self) -> Option<CounterKey> {
        let policy = |name: &str, kind: &str| Some((name.to_string(), kind.to_string()));
        let (policy, action, reason) = match self {
            Why::AllowMatched(p) => (policy(p, "authorization_policy"), "allow", "allow_matched"),
            Why::NoAllowPolicy => (None, "allow", "no_allow_policy"),
            Why::DenyMatched(p) => (policy(p, "authorization_policy"), "deny", "deny_matched"),
            Why::NoAllowMatched => (None, "deny", "no_allow_matched"),
            Why::StrictMtls(p) => (policy(p, "peer_authentication"), "deny", "strict_mtls"),
            Why::NodeExempt => return None,
        };
        Some((policy, action.to_string(), reason.to_string()))
    }
}

/// One generation: a policy file, the server it is about, and what each client must get.
struct Scenario {
    title: &'static str,
    /// The file under `tests/fixtures/authz/`.
    policies: &'static str,
    server: &'static str,
    ports: &'static [u16],
    /// The verdict of every pod client not in `except` (the node is always exempt).
    otherwise: Why,
    /// (client, port or `None` for every port, verdict).
    except: &'static [(&'static str, Option<u16>, Why)],
    /// What kmeshctl's diagnostics say: each line must contain one of these and each must be in
    /// a line (none: kmeshctl prints nothing).
    diagnostics: &'static [&'static str],
}

const SCENARIOS: [Scenario; 5] = [
    Scenario {
        title: "1: ALLOW by namespace, DENY by principal for one of its service accounts",
        policies: "1-namespace-allow-principal-deny.yaml",
        server: "orders",
        ports: &[8001],
        otherwise: Why::NoAllowMatched,
        except: &[
            ("front-web", None, Why::AllowMatched("shop/allow-front")),
            ("front-batch", None, Why::DenyMatched("shop/deny-batch")),
        ],
        diagnostics: &[],
    },
    Scenario {
        title: "2: ipBlocks (/24 and /32) with ports and notPorts",
        policies: "2-ip-blocks-and-ports.yaml",
        server: "payments",
        ports: &[8002, 8003],
        otherwise: Why::NoAllowMatched,
        except: &[
            (
                "back-api",
                Some(8002),
                Why::AllowMatched("shop/allow-back-subnet-on-8002"),
            ),
            (
                "front-web",
                Some(8003),
                Why::AllowMatched("shop/allow-web-but-not-8002"),
            ),
        ],
        diagnostics: &[],
    },
    Scenario {
        title: "3: an ALLOW whose rules are all L7 allows nothing",
        policies: "3-l7-only-allow.yaml",
        server: "catalog",
        ports: &[8004],
        otherwise: Why::NoAllowMatched,
        except: &[],
        diagnostics: &[
            "not enforced: AuthorizationPolicy shop/allow-get-catalog spec.rules: every rule needs L7",
            "shop/allow-get-catalog spec.rules[0]: uses L7 attributes (to[0].operation.methods, \
             to[0].operation.paths): an ALLOW rule with any L7 attribute is dropped whole",
            "shop/allow-get-catalog spec.rules[1]: uses L7 attributes (to[0].operation.methods): \
             an ALLOW rule with any L7 attribute is dropped whole",
        ],
    },
    Scenario {
        title: "4: PeerAuthentication STRICT refuses sources without a mesh identity",
        policies: "4-strict-peer-authentication.yaml",
        server: "vault",
        ports: &[8005],
        otherwise: Why::NoAllowPolicy,
        except: &[
            ("legacy-app", None, Why::StrictMtls("secure/strict")),
            ("stranger", None, Why::StrictMtls("secure/strict")),
            ("outsider", None, Why::StrictMtls("secure/strict")),
        ],
        diagnostics: &[],
    },
    Scenario {
        title: "5: an ipBlock admits an address outside the mesh",
        policies: "5-ip-block-outside-the-mesh.yaml",
        server: "ledger",
        ports: &[8006],
        otherwise: Why::NoAllowMatched,
        except: &[(
            "stranger",
            None,
            Why::AllowMatched("shop/allow-partner-block"),
        )],
        diagnostics: &[],
    },
];

impl Scenario {
    /// (client, port) → the verdict it must get.
    fn expected(&self) -> BTreeMap<(&'static str, u16), Why> {
        let mut matrix = BTreeMap::new();
        for client in CLIENTS {
            for &port in self.ports {
                let why = if client == NODE_CLIENT {
                    Why::NodeExempt
                } else {
                    self.except
                        .iter()
                        .find(|(c, p, _)| *c == client && p.is_none_or(|p| p == port))
                        .map_or(self.otherwise, |(_, _, why)| *why)
                };
                matrix.insert((client, port), why);
            }
        }
        matrix
    }
}

/// The node: its network with every pod, the scenarios' servers, the cluster's YAML, a test
/// cgroup, a private pin directory and the agent's snapshot file.
struct World {
    cluster: YamlCluster,
    net: TestNetwork,
    cgroup: TestCgroup,
    dir: AgentDir,
    pods: BTreeMap<&'static str, Pod>,
    /// (server pod, port) → its listener (which counts its accepts).
    servers: BTreeMap<(&'static str, u16), TcpServer>,
    snapshot_file: TempPath,
}

impl World {
    fn new() -> World {
        let cluster = YamlCluster::new("authz-e2e-yaml", NODE, &NAMESPACES, &PODS).expect("yaml");
        let net = TestNetwork::new("authz-e2e").expect("test network");
        let cgroup = TestCgroup::new("authz-e2e").expect("test cgroup");
        let dir = AgentDir::new("authz-e2e").expect("pin directory");
        let mut pods = cluster.add_pods_to(&net).expect("the cluster's pods");
        for (name, ip) in NO_POD_CLIENTS {
            pods.insert(name, net.add_pod(name, ip, None).expect("client"));
        }
        let servers = SCENARIOS
            .iter()
            .flat_map(|s| s.ports.iter().map(move |p| (s.server, *p)))
            .map(|(server, port)| {
                let listener = pods[server].serve_tcp(port).expect("listener");
                ((server, port), listener)
            })
            .collect();
        World {
            cluster,
            net,
            cgroup,
            dir,
            pods,
            servers,
            snapshot_file: TempPath::new("authz-e2e.snap"),
        }
    }

    /// Compiles `scenario`'s policies with the cluster and writes the snapshot for the agent;
    /// returns kmeshctl's diagnostics.
    fn load(&self, scenario: &Scenario, generation: u64) -> String {
        let yaml = std::fs::read_to_string(fixture(scenario.policies)).expect("policy fixture");
        let compiled = self
            .cluster
            .compile(generation, scenario.policies, &yaml)
            .unwrap_or_else(|e| panic!("scenario {}: {e}", scenario.title));
        write_atomically(self.snapshot_file.path(), &compiled.snapshot).expect("write snapshot");
        compiled.diagnostics
    }

    /// Starts the agent with the test's node namespace as the host (its addresses are exempt) and
    /// waits until every mesh pod's namespace has the authorization program.
    fn start_agent(&self) -> Agent {
        let host_netns = self.net.node_netns_path();
        let mut agent = Agent::start(&AgentOptions {
            node_name: NODE,
            source: AgentSource::File(self.snapshot_file.path()),
            dir: &self.dir,
            cgroup: &self.cgroup,
            extra_args: vec!["--host-netns".to_string(), host_netns.display().to_string()],
        })
        .expect("start kmesh-agent");
        agent
            .wait_ready(Duration::from_secs(20))
            .expect("agent ready");
        agent
            .wait_for(
                Duration::from_secs(10),
                "the authorization program in every mesh pod's namespace",
                |a| {
                    let s = a.debug_snapshot()?;
                    Ok(s["authz_links"].as_u64() == Some(ENROLLED_PODS)
                        && s["host_addrs"].as_u64() > Some(0))
                },
            )
            .expect("authorization links");
        agent
    }

    /// [`N`] connects from `client` to `server`:`port`.
    fn probe(&self, client: &str, server: &str, port: u16) -> ProbeReport {
        let target = format!("{}:{port}", self.cluster.pod(server).ip);
        let count = N.to_string();
        let args = [
            "--target",
            &target,
            "--count",
            &count,
            "--timeout-ms",
            "2000",
        ];
        let report = if client == NODE_CLIENT {
            spawn_in_cgroup_dir(self.net.node_netns_name(), self.cgroup.path(), &args)
                .and_then(ProbeHandle::wait)
        } else {
            self.pods[client].run_probe(&self.cgroup, &args)
        };
        report.unwrap_or_else(|e| panic!("probe {client} → {target}: {e}"))
    }

    fn accepted(&self, server: &str, port: u16) -> u64 {
        self.servers[&(server, port)].accepted()
    }
}

fn fixture(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/authz")
        .join(file)
}

/// What a client's [`N`] connects got.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Observed {
    Allowed,
    Refused,
    /// Anything else: some of each, other errors, another replier.
    Mixed(String),
}

impl Observed {
    fn of(report: &ProbeReport, server: &str) -> Observed {
        if report.attempts == N && report.ok == N && report.replies(server) == N {
            Observed::Allowed
        } else if report.attempts == N && report.errors_of("ECONNREFUSED") == N {
            Observed::Refused
        } else {
            Observed::Mixed(format!(
                "{} of {} ok, replies {:?}, errors {:?}",
                report.ok, report.attempts, report.by_reply, report.errors
            ))
        }
    }

    fn expected(why: Why) -> Observed {
        if why.allowed() {
            Observed::Allowed
        } else {
            Observed::Refused
        }
    }
}

/// The `/debug/authz` counters of the workload `ip`, by key.
fn counters_of(agent: &Agent, ip: Ipv4Addr) -> BTreeMap<CounterKey, u64> {
    let authz = debug_authz(agent);
    let entries = authz["by_policy"].as_array().expect("by_policy");
    let ip = IpAddr::V4(ip).to_string();
    entries
        .iter()
        .filter(|e| e["workload_ip"].as_str() == Some(ip.as_str()))
        .map(|e| {
            let name = &e["policy_name"];
            let policy = (!name.is_null()).then(|| {
                let field = |k: &str| name[k].as_str().unwrap_or("?").to_string();
                (field("name"), field("kind"))
            });
            let field = |k: &str| e[k].as_str().unwrap_or("?").to_string();
            let key = (policy, field("action"), field("reason"));
            (key, e["connections"].as_u64().expect("connections"))
        })
        .collect()
}

fn debug_authz(agent: &Agent) -> serde_json::Value {
    let (code, body) = agent.http_get("/debug/authz").expect("/debug/authz");
    assert_eq!(code, 200, "/debug/authz: {body}");
    serde_json::from_str(&body).expect("/debug/authz JSON")
}

fn node_exemptions(agent: &Agent) -> u64 {
    debug_authz(agent)["counters"]["authz_node_exempt"]
        .as_u64()
        .expect("authz_node_exempt")
}

fn wait_generation(agent: &mut Agent, generation: u64) {
    agent
        .wait_for(
            Duration::from_secs(10),
            &format!("generation {generation} live"),
            |a| Ok(a.debug_snapshot()?["live"]["generation"].as_u64() == Some(generation)),
        )
        .expect("generation applied");
}

/// Runs one scenario's probes and checks; returns what went wrong (empty: nothing).
fn check_scenario(w: &World, agent: &Agent, s: &Scenario, diagnostics: &str) -> Vec<String> {
    let mut failures = check_diagnostics(s, diagnostics);
    let expected = s.expected();
    let exempt_before = node_exemptions(agent);
    let metrics_before = authz_metrics(agent);
    let mut observed = BTreeMap::new();
    for &(client, port) in expected.keys() {
        let report = w.probe(client, s.server, port);
        observed.insert((client, port), Observed::of(&report, s.server));
    }
    println!("{}", matrix_table(s, &expected, &observed));
    for (key, why) in &expected {
        let got = &observed[key];
        if *got != Observed::expected(*why) {
            failures.push(format!(
                "{} → {}:{}: expected {why:?}, got {got:?}",
                key.0, s.server, key.1
            ));
        }
    }
    failures.extend(check_accepts(w, s, &expected));
    failures.extend(check_counters(agent, w, s, &expected, exempt_before));
    failures.extend(check_metrics(agent, &expected, &metrics_before));
    failures
}

/// The agent's own metrics agree with its `/debug/snapshot` after `generations` applies.
fn check_agent_metrics(agent: &Agent, generations: u64) {
    let snapshot = agent.debug_snapshot().expect("/debug/snapshot");
    println!(
        "the agent's metrics:\n{}",
        agent.metrics().unwrap_or_default()
    );
    let metric = |series: &str| {
        agent
            .metric(series)
            .expect("the agent's /metrics")
            .unwrap_or_else(|| panic!("no {series} in\n{}", agent.metrics().unwrap_or_default()))
    };
    assert_eq!(metric("kmesh_live_generation"), generations as f64);
    assert_eq!(metric("kmesh_snapshots_applied_total"), generations as f64);
    assert_eq!(
        metric("kmesh_snapshot_apply_duration_seconds_count"),
        generations as f64
    );
    assert_eq!(metric("kmesh_ready"), 1.0);
    let counts = &snapshot["live"]["counts"];
    for table in [
        "services",
        "workloads",
        "authz_workloads",
        "authz_verdicts",
        "authz_policies",
    ] {
        let want = counts[table].as_u64().expect(table) as f64;
        assert_eq!(
            metric(&format!("kmesh_map_entries{{table=\"{table}\"}}")),
            want,
            "{table}"
        );
    }
    let enrolled = snapshot["enrolled_netns"].as_u64().expect("enrolled_netns") as f64;
    assert!(enrolled > 0.0);
    assert_eq!(metric("kmesh_enrolled_netns"), enrolled);
    assert_eq!(
        metric("kmesh_datapath_events_total{event=\"inconsistent\"}"),
        0.0
    );
    // Earlier generations' policies keep their names (ids are stable across generations).
    let metrics = agent.metrics().expect("/metrics");
    let unnamed: Vec<&str> = metrics
        .lines()
        .filter(|l| {
            l.starts_with("kmesh_authz_connections_total") && l.contains("policy=\"unknown\"")
        })
        .collect();
    assert!(unnamed.is_empty(), "policies without a name: {unnamed:#?}");
}

/// The agent's Prometheus series `kmesh_authz_connections_total`, by their labels as rendered.
fn authz_metrics(agent: &Agent) -> BTreeMap<String, u64> {
    let text = agent.metrics().expect("the agent's /metrics");
    text.lines()
        .filter_map(|line| line.strip_prefix("kmesh_authz_connections_total"))
        .filter_map(|rest| {
            let (labels, value) = rest.rsplit_once(' ')?;
            Some((labels.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// The metrics agree with the scenario: each series of `kmesh_authz_connections_total` grew by
/// the connections of its (policy, kind, action, reason), summed over workloads, and no other.
fn check_metrics(
    agent: &Agent,
    expected: &BTreeMap<(&str, u16), Why>,
    before: &BTreeMap<String, u64>,
) -> Vec<String> {
    let mut want: BTreeMap<String, u64> = BTreeMap::new();
    for key in expected.values().filter_map(|why| why.counter()) {
        let (policy, action, reason) = key;
        let (name, kind) = match policy {
            Some((name, kind)) => {
                let kind = match kind.as_str() {
                    "authorization_policy" => "AuthorizationPolicy",
                    "peer_authentication" => "PeerAuthentication",
                    other => panic!("policy kind {other}"),
                };
                (name, kind.to_string())
            }
            None => ("none".to_string(), "none".to_string()),
        };
        let labels = format!(
            "{{policy=\"{name}\",policy_kind=\"{kind}\",action=\"{action}\",reason=\"{reason}\"}}"
        );
        *want.entry(labels).or_default() += N;
    }
    let after = authz_metrics(agent);
    let grown: BTreeMap<String, u64> = after
        .iter()
        .map(|(labels, v)| (labels.clone(), v - before.get(labels).copied().unwrap_or(0)))
        .filter(|(_, grew)| *grew > 0)
        .collect();
    if grown == want {
        return Vec::new();
    }
    vec![format!(
        "kmesh_authz_connections_total grew by\n{grown:#?}\nexpected\n{want:#?}"
    )]
}

/// kmeshctl reported exactly what the scenario expects (what is not enforced, and nothing else).
fn check_diagnostics(s: &Scenario, diagnostics: &str) -> Vec<String> {
    let lines: Vec<&str> = diagnostics
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    let mut failures = Vec::new();
    for line in &lines {
        if !s.diagnostics.iter().any(|d| line.contains(d)) {
            failures.push(format!("kmeshctl: unexpected diagnostic {line:?}"));
        }
    }
    for d in s.diagnostics {
        if !lines.iter().any(|l| l.contains(d)) {
            failures.push(format!("kmeshctl did not say {d:?}; it said {lines:#?}"));
        }
    }
    failures
}

/// The server accepted exactly the allowed connections, port by port.
fn check_accepts(w: &World, s: &Scenario, expected: &BTreeMap<(&str, u16), Why>) -> Vec<String> {
    let mut failures = Vec::new();
    for &port in s.ports {
        let allowed = expected
            .iter()
            .filter(|((_, p), why)| *p == port && why.allowed())
            .count() as u64;
        let accepted = w.accepted(s.server, port);
        if accepted != allowed * N {
            failures.push(format!(
                "{}:{port} accepted {accepted} connections, {} allowed",
                s.server,
                allowed * N
            ));
        }
    }
    failures
}

/// Every counter of the server is the sum of its clients' verdicts, under the deciding policy's
/// name; the node's connections are counted as exemptions only.
fn check_counters(
    agent: &Agent,
    w: &World,
    s: &Scenario,
    expected: &BTreeMap<(&str, u16), Why>,
    exempt_before: u64,
) -> Vec<String> {
    let mut want: BTreeMap<CounterKey, u64> = BTreeMap::new();
    let mut exempt = 0;
    for why in expected.values() {
        match why.counter() {
            Some(key) => *want.entry(key).or_default() += N,
            None => exempt += N,
        }
    }
    let mut failures = Vec::new();
    let got = counters_of(agent, w.cluster.pod(s.server).ip);
    if got != want {
        failures.push(format!(
            "/debug/authz counters of {}: expected\n{}got\n{}",
            s.server,
            show_counters(&want),
            show_counters(&got)
        ));
    }
    let exempt_got = node_exemptions(agent) - exempt_before;
    if exempt_got != exempt {
        failures.push(format!(
            "node exemptions: expected {exempt}, counted {exempt_got}"
        ));
    }
    failures
}

/// One line per counter: `policy (kind) action reason: connections`.
fn show_counters(counters: &BTreeMap<CounterKey, u64>) -> String {
    let mut out = String::new();
    for ((policy, action, reason), n) in counters {
        let policy = policy
            .as_ref()
            .map_or("(no policy)".to_string(), |(name, kind)| {
                format!("{name} ({kind})")
            });
        let _ = writeln!(out, "    {policy} {action} {reason}: {n}");
    }
    out
}

/// The matrix, one line per client: what each port must get and what it got.
fn matrix_table(
    s: &Scenario,
    expected: &BTreeMap<(&str, u16), Why>,
    observed: &BTreeMap<(&str, u16), Observed>,
) -> String {
    let mut out = format!("scenario {} ({}):\n", s.title, s.server);
    for client in CLIENTS {
        let _ = write!(out, "  {client:<12}");
        for &port in s.ports {
            let why = expected[&(client, port)];
            let got = &observed[&(client, port)];
            let mark = if *got == Observed::expected(why) {
                "ok"
            } else {
                "WRONG"
            };
            let _ = write!(out, " {port}: {got:?} [{mark}, {why:?}]");
        }
        out.push('\n');
    }
    out
}

/// The five scenarios, in order, as generations 1..=5 of one agent.
#[test]
fn istio_policies_compiled_by_kmeshctl_are_enforced_in_the_kernel() {
    let w = World::new();
    let mut agent: Option<Agent> = None;
    let mut failures = Vec::new();
    for (i, s) in SCENARIOS.iter().enumerate() {
        let generation = i as u64 + 1;
        let diagnostics = w.load(s, generation);
        if !diagnostics.is_empty() {
            println!("kmeshctl, generation {generation}:\n{diagnostics}");
        }
        let agent = match &mut agent {
            Some(a) => {
                wait_generation(a, generation);
                a
            }
            None => {
                let a = agent.insert(w.start_agent());
                wait_generation(a, generation);
                a
            }
        };
        for f in check_scenario(&w, agent, s, &diagnostics) {
            failures.push(format!("scenario {}: {f}", s.title));
        }
    }
    let agent = agent.as_ref().expect("agent");
    let authz = debug_authz(agent);
    assert_eq!(
        authz["counters"]["inconsistent"].as_u64(),
        Some(0),
        "{authz:#}"
    );
    check_agent_metrics(agent, SCENARIOS.len() as u64);
    assert!(
        failures.is_empty(),
        "{} failure(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}
