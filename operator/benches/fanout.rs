//! Control-plane fan-out: simulated agents long-poll one operator's snapshot server, as the real
//! agents do (HTTP/1.1 over TLS, a static token per node, `If-None-Match`, `?wait=…&format=4`, and
//! `since=<cluster hash>` when they ask for deltas), without a kernel; a client reads each body's
//! bytes as they arrive, keeps its header and node part and checks them (it does not decode the
//! rest: the agents' decode is the agent benchmark's). The operator is the real publisher and
//! server (`kmesh_operator::{publish, server}`) on a runtime of its own, whose threads are named
//! `operator*`: the CPU it spends is read from those threads alone (the clients run in the same
//! process, on other threads).
//!
//! Per scenario (services, nodes = agents): every agent is served its first snapshot; then one
//! pod's address changes (every node's snapshot carries it), the operator compiles all nodes,
//! publishes and serves, and the agents, naming no base, get whole snapshots; then the agents name
//! the cluster part they hold and the pod moves back, which they get as deltas. Printed per change:
//! the time from the change to each agent holding the new generation (p50, p99, max: the last node
//! served), how many got a delta, the bytes sent, the operator's CPU for the change, and the
//! process's RSS and peak over what it held before the operator started (the generated inputs; the
//! clients keep no snapshot, they count its bytes, so the rest is the operator's and the
//! connections' buffers).
//!
//! The baseline, in the same run, is the compile and publish alone (what the operator does before
//! the first byte goes out): the rest is the fan-out. The whole snapshots are the deltas' baseline.
//!
//! `cargo bench -p kmesh-operator --bench fanout` (`-- --smoke`: 200 services, 20 agents). Writes a
//! chart of the times against the bytes sent to `kmesh_bench_plots::plots_dir()`.
use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
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
use kmesh_snapshot::{
    MAGIC, contract,
    delta_format::{DELTA_HEADER_LEN, DELTA_MAGIC},
    parts_hash,
};
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
/// The agents' long-poll wait: short, so that they all name their base soon after being told to
/// ask for deltas (a real agent waits 30 s; the wait does not delay a change).
const POLL_WAIT: Duration = Duration::from_secs(2);

fn main() {
    let smoke = std::env::args().any(|a| a == "--smoke");
    println!(
        "kmesh-rs control-plane fan-out ({}): agents over TLS long-poll one operator; one pod's \
         address changes",
        if smoke { "smoke run" } else { "full run" }
    );
    println!(
        "  {:>8} {:>6} {:>6} {:>14} {:>10} {:>11} {:>12} {:>9} {:>9} {:>9} {:>9} {:>10} {:>7} {:>8}",
        "services",
        "agents",
        "served",
        "deltas/agents",
        "B/agent",
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
        .flat_map(|&(services, agents)| scenario(services, agents))
        .collect();
    chart(&rows);
}

/// A change's result: MB sent, then p50, p99 and the last agent's ms.
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

fn scenario(services: u32, agents: u32) -> Vec<Row> {
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
    let ask_deltas = Arc::new(AtomicBool::new(false));
    for node in &nodes {
        let agent = SimulatedAgent {
            node: node.clone(),
            addr: operator.addr,
            tls: operator.client_tls.clone(),
            received: received.clone(),
            ask_deltas: ask_deltas.clone(),
            clusters: operator.clusters.clone(),
        };
        clients.spawn(agent.run());
    }

    let started = Instant::now();
    operator.compile_and_publish(&inputs, &nodes);
    received.wait_all(1, started, SERVE_TIMEOUT);
    let first_sync = started.elapsed();

    // The change served whole (the agents name no base), then the pod moving back served as
    // deltas, by the same operator to the same agents.
    let whole = change(&operator, &received, &changed, &nodes, 2);
    ask_deltas.store(true, Ordering::SeqCst);
    // Every agent's next poll names its base: the polls held now end within POLL_WAIT.
    std::thread::sleep(POLL_WAIT + Duration::from_millis(500));
    let delta = change(&operator, &received, &inputs, &nodes, 3);

    let (rss, peak) = rss_mb();
    let (rss, peak) = (
        rss.saturating_sub(inputs_rss),
        peak.saturating_sub(inputs_rss),
    );
    let mut rows = Vec::new();
    for (served, c) in [("whole", whole), ("delta", delta)] {
        let first_sync = if served == "whole" {
            format!("{:.2}s", first_sync.as_secs_f64())
        } else {
            "-".to_string()
        };
        let p50 = ms(percentile(&c.delays, 0.50));
        let p99 = ms(percentile(&c.delays, 0.99));
        let last = ms(*c.delays.last().unwrap_or(&Duration::ZERO));
        println!(
            "  {services:>8} {agents:>6} {served:>6} {:>8}/{agents:<5} {:>10} {first_sync:>11} \
             {:>10.1}ms {p50:>9.1} {p99:>9.1} {last:>9.1} {:>9.3} {:>10.1} {rss:>7} {peak:>8}",
            c.deltas,
            c.sent / u64::from(agents),
            ms(c.published),
            c.sent as f64 / 1e6,
            c.cpu.as_secs_f64() * 1e3,
        );
        rows.push((c.sent as f64 / 1e6, [p50, p99, last]));
    }
    clients.shutdown_background();
    drop(operator);
    rows
}

/// What one change cost: from the change to every agent holding `generation`.
struct Change {
    /// The compile and publish (until the first byte can go out).
    published: Duration,
    /// From the change to each agent holding the new generation, sorted.
    delays: Vec<Duration>,
    /// The operator's CPU: the compile thread's and the server's.
    cpu: Duration,
    /// Bytes sent to every agent.
    sent: u64,
    /// How many agents got the generation as a delta.
    deltas: usize,
}

fn change(
    operator: &Operator,
    received: &Received,
    inputs: &Inputs,
    nodes: &[String],
    generation: u64,
) -> Change {
    let cpu_before = operator_cpu();
    let sent_before = received.bytes();
    let changed_at = Instant::now();
    let compile_cpu = operator.compile_and_publish(inputs, nodes);
    let published = changed_at.elapsed();
    let mut delays = received.wait_all(generation, changed_at, SERVE_TIMEOUT);
    delays.sort();
    Change {
        published,
        delays,
        cpu: operator_cpu().saturating_sub(cpu_before) + compile_cpu,
        sent: received.bytes() - sent_before,
        deltas: received.deltas(generation),
    }
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
    store: SnapshotStore,
    addr: SocketAddr,
    client_tls: tokio_rustls::TlsConnector,
    /// The format 4 cluster hash of every compile's cluster part, told to the agents (see
    /// [`SimulatedAgent::clusters`]).
    clusters: Arc<Mutex<Vec<u64>>>,
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
            store.clone(),
            Arc::new(tokens),
            metrics,
        ));
        Operator {
            runtime,
            publisher: Mutex::new(publisher),
            store,
            addr,
            client_tls,
            clusters: Arc::default(),
        }
    }

    /// What the operator does after a change: compile every node, publish, serve. Runs on a
    /// thread of its own; returns the CPU time that thread spent (it is gone before the runtime's
    /// threads are read).
    fn compile_and_publish(&self, inputs: &Inputs, nodes: &[String]) -> Duration {
        let (publisher, store, clusters) = (&self.publisher, &self.store, &self.clusters);
        std::thread::scope(|scope| {
            std::thread::Builder::new()
                .name("operator-compile".into())
                .spawn_scoped(scope, move || {
                    let compiled = compile(inputs, nodes, 1, &CompileOptions::default());
                    let mut publisher = publisher.lock().unwrap_or_else(|p| p.into_inner());
                    publisher.publish(&compiled);
                    // Told before anything is served, so that an agent always finds its part.
                    if let Some(hash) = store.newest_cluster_hash() {
                        clusters
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(hash);
                    }
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
    /// Every snapshot or delta received.
    snapshots: Vec<Arrival>,
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

    fn record(&self, generation: u64, bytes: u64, delta: bool) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.snapshots.push(Arrival {
            generation,
            at: Instant::now(),
            delta,
        });
        st.bytes += bytes;
        drop(st);
        self.changed.send_replace(());
    }

    fn bytes(&self) -> u64 {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).bytes
    }

    /// How many agents got `generation` as a delta.
    fn deltas(&self, generation: u64) -> usize {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.snapshots
            .iter()
            .filter(|a| a.generation == generation && a.delta)
            .count()
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
                    .filter(|a| a.generation == generation)
                    .map(|a| a.at.saturating_duration_since(began))
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

/// A snapshot or a delta that reached an agent.
struct Arrival {
    generation: u64,
    at: Instant,
    delta: bool,
}

/// One node's agent, without a kernel: it long-polls its snapshot and counts its bytes.
struct SimulatedAgent {
    node: String,
    addr: SocketAddr,
    tls: tokio_rustls::TlsConnector,
    received: Arc<Received>,
    /// Whether to name the cluster part held (`since`), asking for deltas.
    ask_deltas: Arc<AtomicBool>,
    /// The cluster hashes of the operator's compiles. A real agent computes its cluster hash
    /// while decoding (the agent benchmark's cost); this one reads only a body's head and hashes
    /// its node part, and finds which of these completes the content hash in the header.
    clusters: Arc<Mutex<Vec<u64>>>,
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
        let mut etag: Option<String> = None;
        let mut held_cluster: Option<u64> = None;
        loop {
            let since = held_cluster.filter(|_| self.ask_deltas.load(Ordering::SeqCst));
            let url = contract::snapshot_url_since("", &self.node, POLL_WAIT, since);
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
                    let head = read_head(response.into_body()).await?;
                    held_cluster = self.cluster_of(&head);
                    if held_cluster.is_none() {
                        eprintln!("agent {}: no known cluster part matches", self.node);
                    }
                    self.received
                        .record(head.generation, head.len, head.is_delta);
                }
                StatusCode::NOT_MODIFIED => {}
                other => return Err(format!("status {other}")),
            }
        }
    }
}

impl SimulatedAgent {
    /// The cluster hash of what `head` makes the agent hold: the operator's compile whose cluster
    /// hash, with the node part's, gives the content hash in the header.
    fn cluster_of(&self, head: &Head) -> Option<u64> {
        let node_hash = kmesh_snapshot::content_hash(&head.node_part);
        let clusters = self.clusters.lock().unwrap_or_else(|p| p.into_inner());
        clusters
            .iter()
            .copied()
            .find(|&cluster| parts_hash(node_hash, cluster) == head.content_hash)
    }
}

/// What a simulated agent keeps of a format 4 snapshot or a delta: its header's fields and its
/// node part (the bytes from 40 to the cluster part of a snapshot; the delta carries the same bytes
/// after its 56-byte header).
struct Head {
    is_delta: bool,
    generation: u64,
    content_hash: u64,
    node_part: Vec<u8>,
    /// The whole body's length.
    len: u64,
}

/// A node part longer than this is refused (it is a node's workloads and authorization: kilobytes).
const MAX_NODE_PART: u64 = 1 << 24;

/// Reads a snapshot or delta body frame by frame, keeping only its header and node part; checks
/// the magic and that the body is as long as the header says.
async fn read_head(mut body: hyper::body::Incoming) -> Result<Head, String> {
    let mut head = Vec::with_capacity(DELTA_HEADER_LEN);
    // How much of the body to keep: the header, then (once the header is read) the node part.
    let mut keep = DELTA_HEADER_LEN;
    let mut len = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        let Some(mut data) = frame.data_ref().map(|d| &d[..]) else {
            continue;
        };
        len += data.len() as u64;
        while head.len() < keep && !data.is_empty() {
            let take = (keep - head.len()).min(data.len());
            head.extend_from_slice(&data[..take]);
            data = &data[take..];
            if head.len() == DELTA_HEADER_LEN {
                keep = node_part_end(&head)?;
            }
        }
    }
    let field = |at: usize| {
        head.get(at..at + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
            .unwrap_or(0)
    };
    if head.len() < keep || field(32) != len {
        return Err(format!("the body's header does not match its {len} bytes"));
    }
    let is_delta = head.starts_with(&DELTA_MAGIC);
    let node_part_start = if is_delta { DELTA_HEADER_LEN } else { 40 };
    Ok(Head {
        is_delta,
        generation: field(16),
        content_hash: field(24),
        node_part: head[node_part_start..].to_vec(),
        len,
    })
}

/// Where the node part of a body whose first 56 bytes are `header` ends.
fn node_part_end(header: &[u8]) -> Result<usize, String> {
    let field = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().unwrap_or([0; 8]));
    let end = if header.starts_with(&DELTA_MAGIC) {
        DELTA_HEADER_LEN as u64 + field(48)
    } else if header.starts_with(&MAGIC) {
        // A format 4 snapshot's cluster_offset.
        field(40)
    } else {
        return Err("the body is neither a snapshot nor a delta".into());
    };
    if end > MAX_NODE_PART || end < DELTA_HEADER_LEN as u64 {
        return Err(format!("a node part ending at {end}"));
    }
    Ok(end as usize)
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
