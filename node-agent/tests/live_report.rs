//! The agent reports a newly live generation to the operator at once, not on its next long poll
//! (real kernel, root; the real `kmesh-operator --source dir:` and `kmesh-agent` binaries).
//!
//! The operator learns which generation runs on a node from the `Kmesh-Live-Generation` header of
//! the agent's requests; its `Ready` and rolling rollouts follow it. An agent that only sends the
//! header with its next long poll lags up to 30 s behind its kernel. This test changes the YAML,
//! waits until the agent has the new generation live, and measures how long until the operator's
//! `kmesh_operator_node_live_generation` metric shows it.
use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use kmesh_tests::{
    Agent, AgentDir, AgentOptions, AgentSource, TempPath, TestCgroup, workspace_bin,
};

const NODE: &str = "live-node";

/// The longest the operator may lag behind the agent's kernel (the long poll is 30 s).
const PROMPT: Duration = Duration::from_secs(2);

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn service(name: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\n\
         spec:\n  clusterIP: {ip}\n  clusterIPs: [{ip}]\n  ports:\n  - port: 80\n    name: http\n---\n"
    )
}

/// Writes `services.yaml` in `dir` atomically (the operator re-reads a directory when it changes).
fn write_services(dir: &Path, yaml: &str) {
    let tmp = dir.join("services.yaml.tmp");
    std::fs::write(&tmp, yaml).unwrap();
    std::fs::rename(&tmp, dir.join("services.yaml")).unwrap();
}

struct Operator {
    child: Child,
    log: PathBuf,
    metrics_port: u16,
}

impl Operator {
    fn start(source: &Path, port: u16) -> Operator {
        let metrics_port = free_port();
        let log = std::env::temp_dir().join(format!("kmt-liveop-{}.log", std::process::id()));
        let log_file = std::fs::File::create(&log).unwrap();
        let child = Command::new(workspace_bin("kmesh-operator").expect("kmesh-operator binary"))
            .arg(format!("--source=dir:{}", source.display()))
            .arg(format!("--node={NODE}"))
            .arg(format!("--listen=127.0.0.1:{port}"))
            .arg(format!("--metrics-addr=127.0.0.1:{metrics_port}"))
            .arg("--auth=none")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .expect("start kmesh-operator");
        Operator {
            child,
            log,
            metrics_port,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The node's `kmesh_operator_node_live_generation`, if the operator has one.
    fn live_generation(&self) -> Option<u64> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.metrics_port)).ok()?;
        write!(
            stream,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut metrics = String::new();
        stream.read_to_string(&mut metrics).ok()?;
        let prefix = format!("kmesh_operator_node_live_generation{{node=\"{NODE}\"}} ");
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(&prefix)?.trim().parse().ok())
    }

    /// Polls the metric until it equals `generation`; returns how long that took.
    fn wait_live(&self, generation: u64, timeout: Duration) -> Result<Duration, String> {
        let started = Instant::now();
        loop {
            let seen = self.live_generation();
            if seen == Some(generation) {
                return Ok(started.elapsed());
            }
            if started.elapsed() > timeout {
                return Err(format!(
                    "the operator's live generation of {NODE} is {seen:?}, not {generation}, \
                     {timeout:?} after the agent applied it; operator log:\n{}",
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

fn live_generation(agent: &Agent) -> Option<u64> {
    agent.debug_snapshot().ok()?["live"]["generation"].as_u64()
}

#[test]
fn the_operator_sees_a_new_live_generation_at_once() {
    let cgroup = TestCgroup::new("livereport").expect("cgroup");
    let dir = AgentDir::new("livereport").expect("pins");
    let source = TempPath::new("livereport-dir");
    std::fs::create_dir_all(source.path()).unwrap();
    write_services(source.path(), &service("one", "10.96.88.1"));
    let port = free_port();
    let operator = Operator::start(source.path(), port);

    let mut agent = Agent::start(&AgentOptions {
        node_name: NODE,
        source: AgentSource::Operator {
            url: format!("http://127.0.0.1:{port}"),
            token_file: None,
            ca_file: None,
        },
        dir: &dir,
        cgroup: &cgroup,
        extra_args: vec![],
    })
    .expect("agent");
    agent
        .wait_ready(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log()));
    let first = live_generation(&agent).expect("a live generation");
    let lag = operator.wait_live(first, PROMPT).unwrap();
    println!("first generation {first}: the operator saw it live {lag:?} after the agent");

    // Two more changes, each measured from the moment the agent has it live.
    let mut previous = first;
    for (round, yaml) in [
        service("one", "10.96.88.1") + &service("two", "10.96.88.2"),
        service("two", "10.96.88.2"),
    ]
    .iter()
    .enumerate()
    {
        write_services(source.path(), yaml);
        agent
            .wait_for(Duration::from_secs(15), "the next generation", |a| {
                Ok(live_generation(a).is_some_and(|g| g != previous))
            })
            .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log()));
        let generation = live_generation(&agent).unwrap();
        let lag = operator.wait_live(generation, PROMPT).unwrap();
        println!(
            "change {}: generation {generation} live in the agent; the operator saw it {lag:?} later",
            round + 1
        );
        previous = generation;
    }
}
