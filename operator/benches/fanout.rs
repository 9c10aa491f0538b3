//! Control-plane fan-out: simulated agents long-poll one operator's snapshot server, as the real
//! agents do (HTTP/1.1 over TLS, a static token per node, `If-None-Match`, `?wait=30s&format=4`),
//! without a kernel; a client reads each snapshot's bytes as they arrive and checks its header (it
//! does not decode it: the agents' decode is the agent benchmark's). The operator is the real
//! publisher and server (`kmesh_operator::{publish, server}`) on a runtime of its own, whose threads
//! are named `operator*`: the CPU it spends is read from those threads alone (the clients run in the
//! same process, on other threads).
//!
//! Per scenario (services, nodes = agents): every agent is served its first snapshot, then one pod's
//! address changes (every node's snapshot carries it) and the operator compiles all nodes,
//! publishes and serves. Printed: the time from the change to each agent holding the new snapshot
//! (p50, p99, max: the last node served), the bytes sent, the operator's CPU for the change, and the
//! process's RSS and peak over what it held before the operator started (the generated inputs; the
//! clients keep no snapshot, they count its bytes, so the rest is the operator's and the
//! connections' buffers).
//!
//! The baseline, in the same run, is the compile and publish alone (what the operator does before
//! the first byte goes out): the rest is the fan-out.
//!
//! `cargo bench -p kmesh-operator --bench fanout` (`-- --smoke`: 200 services, 20 agents). Writes a
//! chart of the times against the bytes sent to `kmesh_bench_plots::plots_dir()`.
use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use http_body_util::{BodyExt, Empty};
use hyper::{
    Request, StatusCode,
    body::Bytes,
    header::{AUTHORIZATION, ETAG, HOST, IF_NONE_MATCH},
};
use hyper_util::rt::TokioIo;
use kmesh_operator::{
    compile::{CompileOptions, compile},
    inputs::Inputs,
    metrics::Metrics,
    publish::Publisher,
    server::{self, SnapshotStore, StaticTokens},
};
use kmesh_snapshot::{FIXED_HEADER_LEN, MAGIC, contract};
use tokio::{net::TcpStream, sync::watch};

#[path = "compile_parts/generated.rs"]
mod generated_cluster;
// Only its rss_mb: the compile benchmark's scenarios also check the memory available.
#[allow(dead_code)]
#[path = "compile_parts/process.rs"]
mod process;

use process::rss_mb;

const FULL: &[(u32, u32)] = &[(1_000, 1_000), (10_000, 100), (10_000, 1_000)];
const SMOKE: &[(u32, u32)] = &[(200, 20)];
const PODS_PER_SERVICE: u32 = 10;
/// How long a scenario may take to serve every agent once.
const SERVE_TIMEOUT: Duration = Duration::from_secs(300);

fn main() {
    let smoke = std::env::args().any(|a| a == "--smoke");
    println!(
        "kmesh-rs control-plane fan-out ({}): agents over TLS long-poll one operator; one pod's \
         address changes",
        if smoke { "smoke run" } else { "full run" }
    );
    println!(
        "  {:>8} {:>6} {:>10} {:>11} {:>12} {:>9} {:>9} {:>9} {:>9} {:>10} {:>7} {:>8}",
        "services",
        "agents",
        "snapshot B",
        "first sync",
        "compile+pub",
        "p50 ms",
        "p99 ms",
        "last ms",
        "sent MB",
        "op CPU ms",
        "RSS MB",
        "peak MB"
    );
    println!("  (RSS: the process's over what it held before the operator started, the inputs)");
    let rows: Vec<Row> = (if smoke { SMOKE } else { FULL })
        .iter()
        .map(|&(services, agents)| scenario(services, agents))
        .collect();
    chart(&rows);
}

/// A scenario's result: MB sent for the change, then p50, p99 and the last agent's ms.
type Row = (f64, [f64; 3]);

/// The times against the bytes a change sends (every scenario on one axis: the bytes are the
/// floor).
fn chart(rows: &[Row]) {
    use kmesh_bench_plots::{Series, log_log_lines, plots_dir};
    let mut rows = rows.to_vec();
    rows.sort_by(|a, b| a.0.total_cmp(&b.0));
    let series = ["p50", "p99", "last agent"]
        .iter()
        .enumerate()
        .map(|(i, name)| Series {
            name: name.to_string(),
            points: rows.iter().map(|r| (r.0, r.1[i])).collect(),
        })
        .collect::<Vec<_>>();
    let path = plots_dir().join("fanout.png");
    log_log_lines(
        &path,
        "Fan-out: from a change to the agents holding it",
        "MB sent per change (snapshot bytes x agents)",
        "ms",
        &series,
    )
    .expect("chart");
    println!("chart: {}", path.display());
}

fn scenario(services: u32, agents: u32) -> Row {
    let inputs = generated_cluster::generated(services, PODS_PER_SERVICE, agents);
    let changed = generated_cluster::one_pod_moved(&inputs);
    let nodes: Vec<String> = (1..=agents).map(|n| format!("node-{n}")).collect();
    // What the process holds before the operator starts: the two sets of inputs.
    let (inputs_rss, _) = rss_mb();
    let operator = Operator::start(&nodes);
    let clients = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("agent")
        .enable_all()
        .build()
        .expect("the agents' runtime");
    let received = Arc::new(Received::new(agents as usize));
    for node in &nodes {
        let agent = SimulatedAgent {
            node: node.clone(),
            addr: operator.addr,
            tls: operator.client_tls.clone(),
            received: received.clone(),
        };
        clients.spawn(agent.run());
    }

    let started = Instant::now();
    operator.compile_and_publish(&inputs, &nodes);
    received.wait_all(1, started, SERVE_TIMEOUT);
    let first_sync = started.elapsed();

    let cpu_before = operator_cpu();
    let sent_before = received.bytes();
    let changed_at = Instant::now();
    let compile_cpu = operator.compile_and_publish(&changed, &nodes);
    let published = changed_at.elapsed();
    let mut delays = received.wait_all(2, changed_at, SERVE_TIMEOUT);
    let cpu = operator_cpu().saturating_sub(cpu_before) + compile_cpu;
    let sent = received.bytes() - sent_before;
    delays.sort();
    let snapshot_bytes = sent / u64::from(agents);
    let (rss, peak) = rss_mb();
    let (rss, peak) = (
        rss.saturating_sub(inputs_rss),
        peak.saturating_sub(inputs_rss),
    );
    println!(
        "  {services:>8} {agents:>6} {snapshot_bytes:>10} {:>10.2}s {:>10.1}ms {:>9.1} {:>9.1} \
         {:>9.1} {:>9.1} {:>10.1} {rss:>7} {peak:>8}",
        first_sync.as_secs_f64(),
        ms(published),
        ms(percentile(&delays, 0.50)),
        ms(percentile(&delays, 0.99)),
        ms(*delays.last().unwrap_or(&Duration::ZERO)),
        sent as f64 / 1e6,
        cpu.as_secs_f64() * 1e3,
    );
    clients.shutdown_background();
    drop(operator);
    (
        sent as f64 / 1e6,
        [
            ms(percentile(&delays, 0.50)),
            ms(percentile(&delays, 0.99)),
            ms(*delays.last().unwrap_or(&Duration::ZERO)),
        ],
    )
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The `p` quantile of sorted `values` (nearest rank).
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// The operator: its publisher and snapshot server, on a runtime whose threads are `operator*`.
struct Operator {
    runtime: tokio::runtime::Runtime,
    publisher: Mutex<Publisher>,
    addr: SocketAddr,
    client_tls: tokio_rustls::TlsConnector,
}

impl Operator {
    fn start(nodes: &[String]) -> Operator {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("operator")
            .enable_all()
            .build()
            .expect("the operator's runtime");
        let (acceptor, client_tls) = tls();
        let tokens: String = nodes.iter().map(|n| format!("token-{n} {n}\n")).collect();
        let tokens = StaticTokens::parse(&tokens).expect("tokens");
        let store = SnapshotStore::default();
        store.set_ready(true);
        let metrics = Arc::new(Metrics::default());
        let publisher = Publisher::new(store.clone(), metrics.clone(), 1);
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("a loopback port");
        let addr = listener.local_addr().expect("its address");
        runtime.spawn(server::serve(
            listener,
            Some(acceptor),
            store,
            Arc::new(tokens),
            metrics,
        ));
        Operator {
            runtime,
            publisher: Mutex::new(publisher),
            addr,
            client_tls,
        }
    }

    /// What the operator does after a change: compile every node, publish, serve. Runs on a
    /// thread of its own; returns the CPU time that thread spent (it is gone before the runtime's
    /// threads are read).
    fn compile_and_publish(&self, inputs: &Inputs, nodes: &[String]) -> Duration {
        let publisher = &self.publisher;
        std::thread::scope(|scope| {
            std::thread::Builder::new()
                .name("operator-compile".into())
                .spawn_scoped(scope, move || {
                    let compiled = compile(inputs, nodes, 1, &CompileOptions::default());
                    let mut publisher = publisher.lock().unwrap_or_else(|p| p.into_inner());
                    publisher.publish(&compiled);
                    publisher.advance(&|_| None);
                    drop(publisher);
                    drop(compiled);
                    thread_cpu(std::path::Path::new("/proc/thread-self"))
                })
                .expect("the compile thread")
                .join()
                .expect("the compile thread panicked")
        })
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        // The server's tasks never end by themselves.
        let runtime = std::mem::replace(
            &mut self.runtime,
            tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("a runtime"),
        );
        runtime.shutdown_background();
    }
}

/// A serving certificate for `localhost` from a CA of its own; the server's acceptor, and a client
/// connector that trusts that CA.
fn tls() -> (tokio_rustls::TlsAcceptor, tokio_rustls::TlsConnector) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().expect("a key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("the CA");
    let issuer = Issuer::new(ca_params, &ca_key);
    let key = KeyPair::generate().expect("a key");
    let cert = CertificateParams::new(vec!["localhost".to_string()])
        .expect("parameters")
        .signed_by(&key, &issuer)
        .expect("the serving certificate");
    let acceptor = server::tls_acceptor(cert.pem().as_bytes(), key.serialize_pem().as_bytes())
        .expect("the acceptor");
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).expect("the CA as a root");
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = tokio_rustls::rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    (acceptor, tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// What the agents have received: each node's latest generation and when it arrived, and the
/// bytes of every snapshot.
struct Received {
    state: Mutex<ReceivedState>,
    changed: watch::Sender<()>,
}

struct ReceivedState {
    /// (node, generation, when) of every snapshot received.
    snapshots: Vec<(String, u64, Instant)>,
    bytes: u64,
    agents: usize,
}

impl Received {
    fn new(agents: usize) -> Received {
        Received {
            state: Mutex::new(ReceivedState {
                snapshots: Vec::new(),
                bytes: 0,
                agents,
            }),
            changed: watch::channel(()).0,
        }
    }

    fn record(&self, node: &str, generation: u64, bytes: u64) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.snapshots
            .push((node.to_string(), generation, Instant::now()));
        st.bytes += bytes;
        drop(st);
        self.changed.send_replace(());
    }

    fn bytes(&self) -> u64 {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).bytes
    }

    /// Waits until every agent holds `generation`; returns how long after `since` each got it.
    fn wait_all(&self, generation: u64, since: Instant, timeout: Duration) -> Vec<Duration> {
        let began = since;
        loop {
            {
                let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                let arrived: Vec<Duration> = st
                    .snapshots
                    .iter()
                    .filter(|(_, g, _)| *g == generation)
                    .map(|(_, _, at)| at.saturating_duration_since(began))
                    .collect();
                if arrived.len() >= st.agents {
                    return arrived;
                }
                assert!(
                    began.elapsed() < timeout,
                    "{} of {} agents got generation {generation} within {timeout:?}",
                    arrived.len(),
                    st.agents
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// One node's agent, without a kernel: it long-polls its snapshot and counts its bytes.
struct SimulatedAgent {
    node: String,
    addr: SocketAddr,
    tls: tokio_rustls::TlsConnector,
    received: Arc<Received>,
}

impl SimulatedAgent {
    async fn run(self) {
        loop {
            if let Err(e) = self.poll_on_one_connection().await {
                eprintln!("agent {}: {e}; connecting again", self.node);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }

    /// Long polls on one kept-alive connection until it fails.
    async fn poll_on_one_connection(&self) -> Result<(), String> {
        let tcp = TcpStream::connect(self.addr)
            .await
            .map_err(|e| e.to_string())?;
        let name =
            rustls_pki_types::ServerName::try_from("localhost").map_err(|e| e.to_string())?;
        let stream = self
            .tls
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        let url = contract::snapshot_url("", &self.node, Duration::from_secs(30));
        let mut etag: Option<String> = None;
        loop {
            let mut request = Request::get(url.as_str())
                .header(HOST, "localhost")
                .header(AUTHORIZATION, format!("Bearer token-{}", self.node));
            if let Some(tag) = &etag {
                request = request.header(IF_NONE_MATCH, tag.as_str());
            }
            let request = request
                .body(Empty::<Bytes>::new())
                .map_err(|e| e.to_string())?;
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| e.to_string())?;
            match response.status() {
                StatusCode::OK => {
                    etag = response
                        .headers()
                        .get(ETAG)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    let (generation, bytes) = read_snapshot(response.into_body()).await?;
                    self.received.record(&self.node, generation, bytes);
                }
                StatusCode::NOT_MODIFIED => {}
                other => return Err(format!("status {other}")),
            }
        }
    }
}

/// Reads a snapshot body frame by frame, keeping only its header: checks the magic and that the
/// body is as long as the header says; returns the generation and the length.
async fn read_snapshot(mut body: hyper::body::Incoming) -> Result<(u64, u64), String> {
    let mut header = Vec::with_capacity(FIXED_HEADER_LEN);
    let mut len = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        if let Some(data) = frame.data_ref() {
            let wanted = FIXED_HEADER_LEN
                .saturating_sub(header.len())
                .min(data.len());
            header.extend_from_slice(&data[..wanted]);
            len += data.len() as u64;
        }
    }
    let field = |at: usize| {
        header
            .get(at..at + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    if header.get(..MAGIC.len()) != Some(&MAGIC[..]) {
        return Err("the body is not a snapshot".into());
    }
    match (field(16), field(32)) {
        (Some(generation), Some(total)) if total == len => Ok((generation, len)),
        _ => Err(format!(
            "the snapshot's header does not match its {len} bytes"
        )),
    }
}

/// CPU time of the operator runtime's threads (named `operator`).
fn operator_cpu() -> Duration {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Duration::ZERO;
    };
    tasks
        .flatten()
        .map(|task| task.path())
        .filter(|path| {
            std::fs::read_to_string(path.join("comm")).is_ok_and(|c| c.trim_end() == "operator")
        })
        .map(|path| thread_cpu(&path))
        .sum()
}

/// CPU time of the thread whose `/proc` directory is `path`: the first field of its `schedstat`,
/// nanoseconds on a CPU (`stat`'s ticks are 10 ms, too coarse for a small change).
fn thread_cpu(path: &std::path::Path) -> Duration {
    let schedstat = std::fs::read_to_string(path.join("schedstat")).unwrap_or_default();
    let nanos = schedstat
        .split_whitespace()
        .next()
        .and_then(|f| f.parse::<u64>().ok())
        .unwrap_or(0);
    Duration::from_nanos(nanos)
}
