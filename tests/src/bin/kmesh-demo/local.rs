//! The local demo: a one-node "cluster" of network namespaces on a bridge with no route out
//! (bookinfo's productpage pod, the client, and the three reviews pods, each answering with its
//! name), the real `kmesh-operator` compiling a directory of YAML (`--source dir:`) and serving the
//! node's snapshot over TLS, and the real `kmesh-agent` attached to a test cgroup. Each step writes
//! Istio YAML into the directory; the operator recompiles, the agent swaps the snapshot into its
//! eBPF maps, and the client's connections to the reviews VIP show where the kernel sends them.
use std::{
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant},
};

use kmesh_tests::{
    Agent, AgentDir, AgentOptions, AgentSource, Pod, ProbeReport, TcpServer, TestCgroup,
    TestNetwork, TestTls,
};

use crate::{
    interrupt,
    operator::Operator,
    story::{
        CONNECTIONS, Change, ISTIO_NETWORKING, STEPS, Step, context, print_distribution,
        print_document, print_meaning, print_step,
    },
    yaml_dir::YamlDir,
};

/// The node the operator compiles for and the agent runs as.
pub const NODE: &str = "demo-node";
/// The reviews Service's VIP and port, as the demo's YAML gives them.
const REVIEWS_VIP: &str = "10.96.190.13:9080";
const PORT: u16 = 9080;
/// The pods given a network namespace, at the fixture's host numbers in 10.244.190.0/24. The
/// fixture's details and ratings pods are compiled too, but nothing here calls them.
const CLIENT: (&str, u8) = ("productpage-v1", 10);
const REVIEWS: [(&str, u8); 3] = [("reviews-v1", 21), ("reviews-v2", 22), ("reviews-v3", 23)];
const TOKEN: &str = "demo-node-token";

/// Everything the demo runs; dropped in field order, which removes it all: the agent, the
/// operator, the servers, the pins (detaching the programs), the cgroup, the namespaces, the YAML
/// directory and the certificates.
struct LocalDemo {
    agent: Agent,
    operator: Operator,
    _servers: Vec<TcpServer>,
    _pins: AgentDir,
    cgroup: TestCgroup,
    client: Pod,
    _network: TestNetwork,
    yaml: YamlDir,
    _tls: TestTls,
}

pub fn run() -> Result<(), String> {
    println!("== kmesh-rs demo: Istio traffic splitting in the kernel, no sidecar ==\n");
    let mut demo = LocalDemo::start()?;
    for (index, step) in STEPS.iter().enumerate() {
        interrupt::check()?;
        demo.step(index, step)?;
    }
    demo.finish()?;
    drop(demo);
    println!("done; the operator, the namespaces, the cgroup, the pins and the YAML are removed.");
    Ok(())
}

impl LocalDemo {
    fn start() -> Result<LocalDemo, String> {
        let network = TestNetwork::new("demo").map_err(context("creating the node network"))?;
        let cgroup = TestCgroup::new("demo").map_err(context("creating the test cgroup"))?;
        let pins = AgentDir::new("demo").map_err(context("the agent's pin directory"))?;
        let (client, servers) = make_pods(&network)?;
        interrupt::check()?;
        let tls = TestTls::new("demo").map_err(context("certificates"))?;
        let tokens = tls
            .file("tokens", &format!("{TOKEN} {NODE}\n"))
            .map_err(context("token file"))?;
        let token = tls
            .file("token", &format!("{TOKEN}\n"))
            .map_err(context("token file"))?;
        let yaml = YamlDir::new()?;
        print_directory(&yaml)?;
        let operator = Operator::start(yaml.path(), &tls, &tokens)?;
        println!(
            "kmesh-operator --source dir:{} serves each node's snapshot at {} (TLS, a token per \
             node)",
            yaml.path().display(),
            operator.url
        );
        let agent = start_agent(&operator, &tls, &token, &pins, &cgroup)?;
        println!(
            "kmesh-agent --node-name {NODE}: programs attached to cgroup {}, admin on {}\n",
            cgroup.path().display(),
            agent.admin_addr()
        );
        Ok(LocalDemo {
            agent,
            operator,
            _servers: servers,
            _pins: pins,
            cgroup,
            client,
            _network: network,
            yaml,
            _tls: tls,
        })
    }

    /// Writes the step's YAML, waits until its snapshot is live in the kernel, and shows where
    /// the client's connections land.
    fn step(&self, index: usize, step: &Step) -> Result<(), String> {
        print_step(index, step);
        let before = self.live_generation()?;
        let written = self.yaml.apply(step.change)?;
        let written_at = Instant::now();
        println!(
            "  wrote {} ({}):",
            written.file.display(),
            origin(step.change)
        );
        print_document(&written.content, shown_name(step.change));
        let live = interrupt::wait_until(
            Duration::from_secs(15),
            "the operator's next snapshot live in the agent",
            || self.live_generation(),
            |live| *live != before,
            || self.logs(),
        )?;
        println!(
            "  live in the kernel {:.2?} after the write (generation {live}; the operator looks at \
             the directory every second)",
            written_at.elapsed()
        );
        let report = self.probe()?;
        print_distribution(&report);
        print_meaning(step, &report);
        println!();
        Ok(())
    }

    fn finish(&mut self) -> Result<(), String> {
        let status = self
            .agent
            .debug_snapshot()
            .map_err(context("the agent's /debug/snapshot"))?;
        println!(
            "agent: {} snapshots applied, live generation {}, {} connects rewritten in the kernel",
            status["applied"], status["live"]["generation"], status["counters"]["rewritten"]
        );
        self.agent
            .terminate()
            .map_err(context("stopping kmesh-agent"))?;
        Ok(())
    }

    fn live_generation(&self) -> Result<u64, String> {
        let status = self
            .agent
            .debug_snapshot()
            .map_err(context("the agent's /debug/snapshot"))?;
        Ok(status["live"]["generation"].as_u64().unwrap_or(0))
    }

    fn probe(&self) -> Result<ProbeReport, String> {
        let count = CONNECTIONS.to_string();
        let args = [
            "--target",
            REVIEWS_VIP,
            "--count",
            &count,
            "--timeout-ms",
            "2000",
        ];
        self.client
            .run_probe(&self.cgroup, &args)
            .map_err(context("kmesh-probe"))
    }

    fn logs(&self) -> String {
        format!(
            "operator log (last 20 lines):\n{}\nagent log (last 20 lines):\n{}",
            self.operator.log_tail(20),
            tail(&self.agent.log(), 20)
        )
    }
}

/// The client pod and the three reviews pods with their servers; prints them.
fn make_pods(network: &TestNetwork) -> Result<(Pod, Vec<TcpServer>), String> {
    let ip = |host| Ipv4Addr::new(10, 244, 190, host);
    let client = network
        .add_pod(CLIENT.0, ip(CLIENT.1), None)
        .map_err(context("the client pod"))?;
    println!("pods (network namespaces on a bridge, no route out), on node {NODE}:");
    println!("  {:<15} {}  the client", client.name(), client.ipv4());
    let mut servers = Vec::new();
    for (name, host) in REVIEWS {
        let pod = network
            .add_pod(name, ip(host), None)
            .map_err(context(format!("pod {name}")))?;
        let server = pod
            .serve_tcp(PORT)
            .map_err(context(format!("{name}'s server")))?;
        println!("  {name:<15} {}:{PORT}  answers with its name", pod.ipv4());
        servers.push(server);
    }
    println!(
        "  service reviews  VIP {REVIEWS_VIP}  (no route to it exists: only the kernel program \
         can deliver)\n"
    );
    Ok((client, servers))
}

fn print_directory(yaml: &YamlDir) -> Result<(), String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(yaml.path())
        .and_then(|rd| rd.map(|e| e.map(|e| e.path())).collect())
        .map_err(context("listing the YAML directory"))?;
    files.sort();
    println!("YAML directory {}:", yaml.path().display());
    for file in files {
        let name = file.file_name().unwrap_or_default().to_string_lossy();
        println!("  {name}");
    }
    println!();
    Ok(())
}

fn start_agent(
    operator: &Operator,
    tls: &TestTls,
    token: &std::path::Path,
    pins: &AgentDir,
    cgroup: &TestCgroup,
) -> Result<Agent, String> {
    let agent = Agent::start(&AgentOptions {
        node_name: NODE,
        source: AgentSource::Operator {
            url: operator.url.clone(),
            token_file: Some(token),
            ca_file: Some(&tls.ca_file),
        },
        dir: pins,
        cgroup,
        extra_args: vec![],
    })
    .map_err(context("starting kmesh-agent"))?;
    let diagnose = |agent: &Agent| {
        format!(
            "agent log:\n{}\noperator log:\n{}",
            tail(&agent.log(), 30),
            operator.log_tail(30)
        )
    };
    interrupt::wait_until(
        Duration::from_secs(30),
        "kmesh-agent ready (/readyz answering 200)",
        || Ok(agent.http_get("/readyz").ok().map(|(code, _)| code)),
        |code| *code == Some(200),
        || diagnose(&agent),
    )?;
    // The client and the three reviews pods: every namespace the demo made.
    let enrolled = || {
        let status = agent.debug_snapshot().ok();
        Ok(status.and_then(|s| s["enrolled_netns"].as_u64()))
    };
    interrupt::wait_until(
        Duration::from_secs(10),
        "the demo's pods enrolled (enrolled_netns in /debug/snapshot)",
        enrolled,
        |n| *n == Some(1 + REVIEWS.len() as u64),
        || diagnose(&agent),
    )?;
    Ok(agent)
}

/// Where a step's file comes from.
fn origin(change: Change) -> String {
    match change {
        Change::VirtualService(sample) => format!("Istio's {ISTIO_NETWORKING}/{sample}, as it is"),
        Change::ModeDisabled => format!(
            "the KmeshConfig with spec.mode Disabled, as `kubectl patch kmeshconfig default \
             --type merge -p '{}'` makes it",
            crate::story::MODE_DISABLED_PATCH
        ),
    }
}

/// The object of a step's file worth showing.
fn shown_name(change: Change) -> &'static str {
    match change {
        Change::VirtualService(_) => "reviews",
        Change::ModeDisabled => "default",
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
