//! The whole path with real parts: `kmesh-operator --source dir:` compiles the bookinfo fixture and
//! Istio's reviews VirtualService, serves node-1's snapshot over TLS to the real agent (bearer token,
//! CA-verified), and the kernel splits the productpage pod's connections as the VirtualService says.
//! Changing the YAML reaches the kernel through the long poll; a token of another node gets 403.
use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use kmesh_tests::{
    Agent, AgentDir, AgentOptions, AgentSource, TempPath, TestCgroup, TestNetwork, TestTls,
    bookinfo::BookinfoPods, workspace_bin,
};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn networking(file: &str) -> PathBuf {
    let p = repo()
        .join("../shared/reference/istio/samples/bookinfo/networking")
        .join(file);
    assert!(
        p.exists(),
        "{} is missing (../shared next to the checkout)",
        p.display()
    );
    p
}

fn free_port() -> u16 {
    kmesh_tests::ports::free_loopback_port().expect("a free loopback port")
}

struct Operator {
    child: Child,
    log: PathBuf,
}

impl Operator {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// The value of the sample `series` (name and labels, exactly) in a Prometheus text exposition.
fn metric_value(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample {series} in:\n{metrics}"))
}

#[test]
fn operator_serves_snapshots_over_tls_and_the_kernel_follows_the_yaml() {
    let tls = TestTls::new("operator").expect("certificates");
    let tokens = tls
        .file("tokens", "token-node-1 node-1\ntoken-node-2 node-2\n")
        .unwrap();
    let token_1 = tls.file("token-1", "token-node-1\n").unwrap();
    let token_2 = tls.file("token-2", "token-node-2\n").unwrap();

    // The GitOps directory the operator watches.
    let source = TempPath::new("opdir");
    let source_dir = source.path();
    std::fs::create_dir_all(source_dir).unwrap();
    std::fs::copy(
        repo().join("tests/fixtures/bookinfo/cluster.yaml"),
        source_dir.join("cluster.yaml"),
    )
    .unwrap();
    std::fs::copy(
        networking("destination-rule-all.yaml"),
        source_dir.join("destination-rules.yaml"),
    )
    .unwrap();
    std::fs::copy(
        networking("virtual-service-reviews-90-10.yaml"),
        source_dir.join("reviews.yaml"),
    )
    .unwrap();

    let port = free_port();
    let metrics_port = free_port();
    let log = std::env::temp_dir().join(format!("kmt-operator-{}.log", std::process::id()));
    let log_file = std::fs::File::create(&log).unwrap();
    let child = Command::new(workspace_bin("kmesh-operator").expect("kmesh-operator binary"))
        .arg(format!("--source=dir:{}", source_dir.display()))
        .arg(format!("--listen=127.0.0.1:{port}"))
        .arg(format!("--metrics-addr=127.0.0.1:{metrics_port}"))
        .arg("--tls-cert")
        .arg(&tls.cert_file)
        .arg("--tls-key")
        .arg(&tls.key_file)
        .arg(format!("--auth=static:{}", tokens.display()))
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .spawn()
        .expect("start kmesh-operator");
    let operator = Operator { child, log };

    let net = TestNetwork::new("opend").expect("network");
    let cgroup = TestCgroup::new("opend").expect("cgroup");
    let dir = AgentDir::new("opend").expect("pins");
    let pods = BookinfoPods::new(&net).expect("bookinfo pods");
    let url = format!("https://127.0.0.1:{port}");
    let start_agent = |node: &'static str, token: &Path, dir: &AgentDir| {
        Agent::start(&AgentOptions {
            node_name: node,
            source: AgentSource::Operator {
                url: url.clone(),
                token_file: Some(token),
                ca_file: Some(&tls.ca_file),
            },
            dir,
            cgroup: &cgroup,
            extra_args: vec![],
        })
        .expect("agent")
    };
    let mut agent = start_agent("node-1", &token_1, &dir);
    agent
        .wait_ready(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log()));
    agent
        .wait_for(Duration::from_secs(5), "4 enrolled", |a| {
            Ok(a.debug_snapshot()?["enrolled_netns"] == 4)
        })
        .unwrap();
    let probe = || pods.probe_reviews(&cgroup, 2000).unwrap();
    let report = probe();
    assert_eq!(report.ok, 2000, "{report:?}");
    report.assert_share("reviewsv1", 0.9);
    report.assert_share("reviewsv2", 0.1);
    let first_generation = agent.debug_snapshot().unwrap()["live"]["generation"]
        .as_u64()
        .unwrap();

    // A GitOps change: the 50/50 v1/v3 VirtualService replaces the canary.
    let changed = Instant::now();
    let vs = std::fs::read(networking("virtual-service-reviews-50-v3.yaml")).unwrap();
    std::fs::write(source_dir.join("reviews.yaml.tmp"), vs).unwrap();
    std::fs::rename(
        source_dir.join("reviews.yaml.tmp"),
        source_dir.join("reviews.yaml"),
    )
    .unwrap();
    agent
        .wait_for(Duration::from_secs(15), "the next generation", |a| {
            Ok(a.debug_snapshot()?["live"]["generation"].as_u64() == Some(first_generation + 1))
        })
        .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log()));
    println!(
        "YAML change live in the kernel after {:?}",
        changed.elapsed()
    );
    let report = probe();
    report.assert_share("reviewsv1", 0.5);
    report.assert_share("reviewsv3", 0.5);

    // A token bound to node-2 cannot fetch node-1's snapshot: asked directly, the server answers
    // exactly 403 and says why, while node-1's own token gets the snapshot, node-2's token passes
    // for node-2, and no token or an unknown one gets 401.
    let server = ([127, 0, 0, 1], port).into();
    let snapshot_of = |node: &str, token: Option<&str>| {
        let (code, body) = tls
            .https_get(server, &format!("/v1/nodes/{node}/snapshot"), token)
            .expect("request to the snapshot server");
        let text = String::from_utf8(body)
            .unwrap_or_else(|e| format!("<{} bytes, not text>", e.as_bytes().len()));
        (code, text)
    };
    let (code, _) = snapshot_of("node-1", Some("token-node-1"));
    assert_eq!(code, 200, "node-1's own token");
    let (code, body) = snapshot_of("node-1", Some("token-node-2"));
    assert_eq!(code, 403, "node-2's token asking for node-1: {body}");
    assert!(body.contains(r#"bound to node "node-2""#), "{body}");
    // The same token is good for its own node (which has no snapshot: no pod runs there).
    let (code, body) = snapshot_of("node-2", Some("token-node-2"));
    assert_eq!(code, 404, "node-2's own token: {body}");
    for token in [None, Some("no-such-token")] {
        let (code, body) = snapshot_of("node-1", token);
        assert_eq!(code, 401, "token {token:?}: {body}");
    }

    // An agent holding that token gets the same 403 (its log names the status), and never
    // becomes ready.
    let other_dir = AgentDir::new("opendother").expect("pins");
    let mut intruder = start_agent("node-1", &token_2, &other_dir);
    intruder
        .wait_for(Duration::from_secs(10), "a 403 from the operator", |a| {
            Ok(a.log().lines().any(|line| {
                line.contains("fetching snapshot failed")
                    && line.contains("server answered 403 Forbidden")
            }))
        })
        .unwrap();
    assert_eq!(
        intruder.http_get("/readyz").unwrap().0,
        503,
        "an agent with another node's token became ready"
    );
    assert!(
        intruder.debug_snapshot().unwrap()["live"].is_null(),
        "an agent with another node's token has a live snapshot"
    );
    drop(intruder);

    // Metrics name what was served.
    let mut stream = TcpStream::connect(("127.0.0.1", metrics_port)).unwrap();
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut metrics = String::new();
    stream.read_to_string(&mut metrics).unwrap();
    assert!(
        metrics.contains(r#"kmesh_operator_snapshots_served_total{node="node-1",code="200"}"#),
        "{metrics}"
    );
    // A refused request is not counted under the node it named (a client could make up any
    // name): the 403s are in the unattributed series, and node-1's series has none.
    let forbidden = metric_value(
        &metrics,
        r#"kmesh_operator_snapshot_requests_unattributed_total{code="403"}"#,
    );
    assert!(
        forbidden >= 2.0,
        "403s (one direct, at least one to the agent): {forbidden}\n{metrics}"
    );
    assert!(
        !metrics.contains(r#"node="node-1",code="403""#),
        "a 403 counted under the node it asked for:\n{metrics}"
    );
    assert!(
        metrics.contains("kmesh_operator_compile_duration_seconds"),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"kmesh_operator_snapshot_bytes{node="node-1"}"#),
        "{metrics}"
    );
}
