//! `kmesh-operator`: compiles the cluster's Kubernetes and Istio objects into one snapshot per node
//! and serves each node agent its own.
//!
//! Sources: `--source dir:PATH` reads YAML (re-read when a file changes) — for running without a
//! cluster, and for GitOps previews; `--source kube` watches the API server.
use std::{
    net::SocketAddr, path::PathBuf, process::ExitCode, str::FromStr, sync::Arc, time::Duration,
};

use clap::Parser;
use kmesh_operator::{
    Error, Result,
    certs::{self, CertSource, CurrentCert, Lifetimes},
    compile::{CompileOptions, Compiled, compile},
    diagnostics::{Diagnostic, ObjectRef, Severity},
    dir_source,
    inputs::Inputs,
    kube_source::{DebounceConfig, GateReport, KubeSource},
    leader::{self, ElectionConfig, Leadership},
    log_level::LogLevelFollower,
    metrics::{self, Metrics},
    publish::{Publisher, RolloutPolicy},
    reconcile::{NodeRollout, ReconcileInput, Reconciler, RolloutFacts},
    replicas::{self, DecisionStore, DecisionWriteError},
    server::{self, Authenticator, NoAuth, SnapshotStore, StaticTokens},
    tokenreview::TokenReviewAuth,
    uninstall::{self, AgentDaemonSet},
    waypoints::{apply::WaypointApplier, objects::WaypointSettings},
};
use kube::runtime::events::Reporter;
use tracing::{debug, error, info, warn};

#[derive(Parser, Debug)]
#[command(
    name = "kmesh-operator",
    version,
    about = "kmesh-rs operator: Istio to per-node eBPF snapshots"
)]
struct Cli {
    /// Where objects come from: `dir:PATH` (YAML files) or `kube` (the API server).
    #[arg(long, default_value = "kube")]
    source: Source,
    /// Nodes to compile for, besides the Node objects found (useful with dir:).
    #[arg(long = "node")]
    nodes: Vec<String>,
    /// Address of the snapshot server.
    #[arg(long, default_value = "0.0.0.0:15300")]
    listen: SocketAddr,
    /// PEM certificate chain of the snapshot server (cert-manager, say); with --tls-key, the
    /// server speaks TLS with it, re-read when it changes. Without it, `--source kube` makes and
    /// rotates its own CA and certificate in the Secret `kmesh-operator-tls`.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// With --tls-cert: the CA that signs it, published for the agents in the ConfigMap
    /// `kmesh-ca-root-cert`.
    #[arg(long, requires = "tls_cert")]
    tls_ca_file: Option<PathBuf>,
    /// Lifetime of the operator's own serving certificate, in seconds (renewed at 2/3).
    #[arg(long, default_value_t = 30 * 24 * 3600)]
    tls_serving_seconds: u64,
    /// Lifetime of the operator's own CA, in seconds (a next CA is trusted from 2/3, and signs
    /// after --tls-ca-overlap-seconds).
    #[arg(long, default_value_t = 365 * 24 * 3600)]
    tls_ca_seconds: u64,
    #[arg(long, default_value_t = 24 * 3600)]
    tls_ca_overlap_seconds: u64,
    /// The operator's namespace (its Lease, Secret and ConfigMaps).
    #[arg(long, env = "POD_NAMESPACE", default_value = "kmesh-system")]
    namespace: String,
    /// The operator's Service (the names of its serving certificate).
    #[arg(long, default_value = "kmesh-operator")]
    service_name: String,
    /// This replica's identity in the leader election.
    #[arg(long, env = "POD_NAME")]
    pod_name: Option<String>,
    /// Elect a leader among replicas on the Lease `kmesh-operator-leader` (`--source kube`).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// Seconds a leader's Lease holds without renewal.
    #[arg(long, default_value_t = 15)]
    leader_lease_seconds: u64,
    /// Seconds a leader keeps leading without a successful renewal.
    #[arg(long, default_value_t = 10)]
    leader_renew_deadline_seconds: u64,
    /// Seconds between election attempts and renewals.
    #[arg(long, default_value_t = 2)]
    leader_retry_seconds: u64,
    /// How agents and waypoints authenticate: `tokenreview` (service-account tokens checked with
    /// the API server: the agents' account bound to a node fetches that node's snapshot, a
    /// waypoint's account, named like its Gateway, that waypoint's configuration), `static:FILE`
    /// (lines of `<token> <node>`, or `<token> waypoint:<namespace>/<name>` for a waypoint; `#`
    /// starts a comment line), or `none` (anyone may fetch anything; local use).
    #[arg(long, default_value = "tokenreview")]
    auth: Auth,
    /// The agents' service account, `namespace/name` (tokenreview).
    #[arg(long, default_value = "kmesh-system/kmesh-agent")]
    agent_service_account: ServiceAccount,
    /// The audience of the agents' projected tokens (tokenreview).
    #[arg(long, default_value = "kmesh-operator")]
    token_audience: String,
    /// The agents' DaemonSet, `namespace/name` (kube): when it or its namespace is deleted, every
    /// agent is told to remove its programs and pins (`410 Gone`).
    #[arg(long, default_value = "kmesh-system/kmesh-agent")]
    agent_daemonset: AgentDaemonSet,
    /// Address of /metrics.
    #[arg(long, default_value = "0.0.0.0:15301")]
    metrics_addr: SocketAddr,
    /// Namespace of YAML objects that name none (dir:).
    #[arg(long, default_value = "default")]
    default_namespace: String,
    /// Istio's root namespace.
    #[arg(long, default_value = "istio-system")]
    root_namespace: String,
    /// The image of the waypoints the operator runs for Gateways of class `istio-waypoint`
    /// (kube); without it, the operator runs none and waypoints are deployed by other means.
    #[arg(long)]
    waypoint_image: Option<String>,
    /// Replicas of each waypoint.
    #[arg(long, default_value_t = 2)]
    waypoint_replicas: i32,
    /// The snapshot server as waypoints reach it; default
    /// `https://kmesh-operator.<namespace>.svc:<--listen port>`.
    #[arg(long)]
    waypoint_operator_url: Option<String>,
}

/// `--source`: where objects come from.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Source {
    /// `kube`: the API server.
    Kube,
    /// `dir:PATH`: YAML files under PATH, re-read when one changes.
    Dir(PathBuf),
}

/// `--auth`: how agents authenticate.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Auth {
    /// `tokenreview`: service-account tokens, checked with the API server.
    TokenReview,
    /// `static:FILE`: fixed tokens, a `<token> <node>` or `<token> waypoint:<namespace>/<name>`
    /// per line (`server::StaticTokens`).
    Static(PathBuf),
    /// `none`: anyone may fetch any node's snapshot.
    None,
}

/// `--agent-service-account`: `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ServiceAccount {
    namespace: String,
    name: String,
}

/// Why a flag's value was refused; clap names the flag and the value beside it.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
enum FlagError {
    #[error("expected `kube` or `dir:PATH`")]
    Source,
    #[error("expected `tokenreview`, `static:FILE` or `none`")]
    Auth,
    #[error("`{0}` needs a path after the colon")]
    NoPath(&'static str),
    #[error("expected `namespace/name`")]
    ServiceAccount,
}

/// The path after `prefix` (`dir:`, `static:`), if `value` starts with it.
fn path_after(value: &str, prefix: &'static str) -> Option<Result<PathBuf, FlagError>> {
    let path = value.strip_prefix(prefix)?;
    Some(match path {
        "" => Err(FlagError::NoPath(prefix)),
        path => Ok(PathBuf::from(path)),
    })
}

impl FromStr for Source {
    type Err = FlagError;
    fn from_str(value: &str) -> Result<Self, FlagError> {
        match value {
            "kube" => Ok(Source::Kube),
            _ => path_after(value, "dir:")
                .ok_or(FlagError::Source)?
                .map(Source::Dir),
        }
    }
}

impl FromStr for Auth {
    type Err = FlagError;
    fn from_str(value: &str) -> Result<Self, FlagError> {
        match value {
            "tokenreview" => Ok(Auth::TokenReview),
            "none" => Ok(Auth::None),
            _ => path_after(value, "static:")
                .ok_or(FlagError::Auth)?
                .map(Auth::Static),
        }
    }
}

impl FromStr for ServiceAccount {
    type Err = FlagError;
    fn from_str(value: &str) -> Result<Self, FlagError> {
        match value.split_once('/') {
            Some((namespace, name))
                if !namespace.is_empty() && !name.is_empty() && !name.contains('/') =>
            {
                Ok(ServiceAccount {
                    namespace: namespace.to_string(),
                    name: name.to_string(),
                })
            }
            _ => Err(FlagError::ServiceAccount),
        }
    }
}

fn main() -> ExitCode {
    let log_level = init_tracing();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(Error::Runtime);
    match runtime.and_then(|runtime| runtime.block_on(run(cli, log_level))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            eprintln!("kmesh-operator: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The process's subscriber, its filter reloadable: `RUST_LOG` when set, else `info`; from then on
/// `KmeshConfig.spec.logLevel` (see `log_level.rs`).
fn init_tracing() -> LogLevelFollower {
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::{EnvFilter, fmt, layer::SubscriberExt as _, reload};
    let from_env = EnvFilter::try_from_default_env().ok();
    let explicit = from_env.is_some();
    let (filter, handle) = reload::Layer::new(from_env.unwrap_or_else(|| EnvFilter::new("info")));
    // Colour codes only on a terminal: a container log or a file keeps plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt::layer().with_ansi(ansi))
        .init();
    LogLevelFollower::new(Some(handle), explicit)
}

async fn run(cli: Cli, log_level: LogLevelFollower) -> Result<()> {
    let store = SnapshotStore::default();
    let metrics = Arc::new(Metrics::default());
    let cert = Arc::new(CurrentCert::default());
    let tls = tls_acceptor(&cli, &cert)?;
    let server = Server {
        listener: bind(cli.listen).await?,
        tls,
        store: store.clone(),
        metrics: metrics.clone(),
    };
    let ready_store = store.clone();
    tokio::spawn(metrics::serve(
        bind(cli.metrics_addr).await?,
        metrics.clone(),
        Arc::new(move || ready_store.is_ready()),
    ));
    start_server(&cli, server).await?;
    let first_generation = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(1);
    let publisher = Publisher::new(store.clone(), metrics.clone(), first_generation);
    let options = CompileOptions {
        root_namespace: cli.root_namespace.clone(),
        ..Default::default()
    };
    let operator = Operator {
        cli: &cli,
        options,
        publisher,
        store,
        metrics,
        cert,
        log_level,
    };
    match &cli.source {
        Source::Dir(path) => {
            let shutdown = uninstall::shutdown_signal(operator.store.clone());
            tokio::select! {
                result = run_dir(path.clone(), operator) => result,
                () = shutdown => Ok(()),
            }
        }
        // Stops by itself on a signal, after the leader released its Lease (and, during an
        // uninstall, after answering stopping agents a little longer).
        Source::Kube => {
            let client = api_client("--source kube").await?;
            let agents = cli.agent_daemonset.clone();
            uninstall::watch(client.clone(), agents, operator.store.clone());
            run_kube(client, operator).await
        }
    }
}

/// The TLS acceptor: over the given files, or (`--source kube` without them) over the operator's
/// own certificate, loaded once the Secret holds it. `None`: plain HTTP (`dir:` without files).
fn tls_acceptor(cli: &Cli, cert: &Arc<CurrentCert>) -> Result<Option<tokio_rustls::TlsAcceptor>> {
    match (&cli.tls_cert, &cli.tls_key, &cli.source) {
        (Some(c), Some(k), _) => certs::load_files(cert, c, k)?,
        (_, _, Source::Kube) => {}
        _ => return Ok(None),
    }
    certs::acceptor(cert.clone()).map(Some)
}

/// Where `--source kube` takes its certificate from.
fn cert_source(cli: &Cli) -> CertSource {
    match (&cli.tls_cert, &cli.tls_key) {
        (Some(cert), Some(key)) => CertSource::Files {
            cert: cert.clone(),
            key: key.clone(),
            ca: cli.tls_ca_file.clone(),
            namespace: cli.namespace.clone(),
        },
        _ => CertSource::SelfManaged {
            namespace: cli.namespace.clone(),
            service: cli.service_name.clone(),
            lifetimes: Lifetimes {
                serving: Duration::from_secs(cli.tls_serving_seconds),
                ca: Duration::from_secs(cli.tls_ca_seconds),
                ca_overlap: Duration::from_secs(cli.tls_ca_overlap_seconds),
            },
        },
    }
}

/// The election, as the flags say: on the Lease, or (`--leader-elect=false`) always leading.
fn election(
    cli: &Cli,
    client: &kube::Client,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<Leadership> {
    if !cli.leader_elect {
        return Ok(Leadership::always());
    }
    let identity = cli.pod_name.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    });
    let config = ElectionConfig {
        namespace: cli.namespace.clone(),
        lease_name: "kmesh-operator-leader".into(),
        identity,
        lease_duration: Duration::from_secs(cli.leader_lease_seconds),
        renew_deadline: Duration::from_secs(cli.leader_renew_deadline_seconds),
        retry_period: Duration::from_secs(cli.leader_retry_seconds),
    };
    config.check().map_err(Error::Election)?;
    Ok(leader::start(client.clone(), config, shutdown).0)
}

/// The end of `run_kube` after a stop signal: the election (which saw the same signal) gets a
/// moment to release the Lease, and an uninstall's stopping agents get their `410`s.
async fn stop(store: &SnapshotStore) -> Result<()> {
    let release = tokio::time::sleep(Duration::from_millis(500));
    tokio::join!(release, uninstall::drain(store));
    Ok(())
}

/// A receiver that turns true on SIGTERM or SIGINT (the leader then releases its Lease).
fn shutdown_signal() -> tokio::sync::watch::Receiver<bool> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        info!("shutting down");
        tx.send_replace(true);
    });
    rx
}

async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener> {
    let listener = tokio::net::TcpListener::bind(addr).await;
    listener.map_err(|source| Error::Listen { addr, source })
}

async fn api_client(needed_by: &'static str) -> Result<kube::Client> {
    let client = kube::Client::try_default().await;
    client.map_err(|source| Error::ApiServer { needed_by, source })
}

/// The snapshot server, before its authenticator is chosen.
struct Server {
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    store: SnapshotStore,
    metrics: Arc<Metrics>,
}

impl Server {
    fn spawn<A: Authenticator>(self, auth: A) {
        let Server {
            listener,
            tls,
            store,
            metrics,
        } = self;
        tokio::spawn(server::serve(listener, tls, store, Arc::new(auth), metrics));
    }
}

/// Starts the snapshot server with the authenticator `--auth` asks for.
async fn start_server(cli: &Cli, server: Server) -> Result<()> {
    match &cli.auth {
        Auth::None => {
            warn!("agent authentication is off: any caller may fetch any node's snapshot");
            server.spawn(NoAuth);
        }
        Auth::TokenReview => {
            let client = api_client("--auth tokenreview").await?;
            let account = &cli.agent_service_account;
            let audiences = vec![cli.token_audience.clone()];
            server.spawn(TokenReviewAuth::new(
                client,
                &account.namespace,
                &account.name,
                audiences,
            ));
        }
        Auth::Static(path) => {
            let text = std::fs::read_to_string(path).map_err(Error::read(path))?;
            let tokens = StaticTokens::parse(&text).map_err(|source| Error::StaticTokens {
                path: path.clone(),
                source,
            })?;
            server.spawn(tokens);
        }
    }
    Ok(())
}

/// The compile loop's state, whichever the source.
struct Operator<'a> {
    cli: &'a Cli,
    options: CompileOptions,
    publisher: Publisher,
    store: SnapshotStore,
    metrics: Arc<Metrics>,
    /// The serving certificate (TLS is ready once it is loaded).
    cert: Arc<CurrentCert>,
    /// The operator's log filter, following `KmeshConfig.spec.logLevel`.
    log_level: LogLevelFollower,
}

impl Operator<'_> {
    /// Compiles `inputs` for its nodes (the Node objects and `--node`), reports the diagnostics,
    /// and publishes what changed.
    fn compile_and_publish(
        &mut self,
        inputs: &Inputs,
        parse_diagnostics: Vec<Diagnostic>,
    ) -> Compiled {
        let compiled = self.compile(inputs, parse_diagnostics);
        self.publish(inputs, &compiled);
        compiled
    }

    /// Compiles `inputs` for its nodes (the Node objects and `--node`) and reports the
    /// diagnostics; publishes nothing.
    fn compile(&mut self, inputs: &Inputs, parse_diagnostics: Vec<Diagnostic>) -> Compiled {
        let level = inputs.config.as_ref().map(|cfg| cfg.spec.log_level);
        self.log_level.observe(level);
        let nodes = node_names(inputs, &self.cli.nodes);
        let started = std::time::Instant::now();
        let mut compiled = compile(inputs, &nodes, 1, &self.options);
        compiled.diagnostics.extend(parse_diagnostics);
        compiled.diagnostics.sort();
        let count = |severity| {
            let diagnostics = compiled.diagnostics.iter();
            diagnostics.filter(|d| d.severity == severity).count()
        };
        let (rejected, unenforced) = (count(Severity::Rejected), count(Severity::Unenforced));
        let seconds = started.elapsed().as_secs_f64();
        self.metrics.compiled(seconds, rejected, unenforced);
        for d in &compiled.diagnostics {
            match d.severity {
                Severity::Rejected => warn!("{d}"),
                _ => info!("{d}"),
            }
        }
        info!(
            nodes = nodes.len(),
            compile_ms = started.elapsed().as_millis() as u64,
            rejected,
            unenforced,
            "compiled"
        );
        compiled
    }

    /// Takes `compiled` as the content to roll out, under the rollout policy `inputs` set; serves
    /// its waypoint configurations at once (no decision or rollout applies to them: every replica
    /// serves its own compile's, which agree since compiles are deterministic; see
    /// `waypoint_server`).
    fn publish(&mut self, inputs: &Inputs, compiled: &Compiled) {
        let policy = RolloutPolicy::from_config(inputs.config.as_ref(), &node_labels(inputs));
        self.publisher.set_policy(policy);
        self.publisher.publish(compiled);
        let waypoints = self
            .store
            .waypoint_configs()
            .publish_all(&compiled.waypoints);
        self.metrics
            .waypoint_configs_published(waypoints.changed, waypoints.served);
    }

    /// Publishes the pending snapshots the rollout allows now, given what agents report live (a
    /// replica that decides alone).
    fn advance(&mut self) {
        let store = &self.store;
        self.publisher.advance(&|node| store.live_generation(node));
        self.mark_ready();
    }

    /// Serves the stored decisions; while leading, first stores the decisions the rollout allows
    /// now. A decision is served only once stored, so every replica serves the same.
    async fn decide(&mut self, decisions: &DecisionStore, leadership: &Leadership) {
        self.publisher.adopt(&decisions.current());
        if leadership.is_leader() {
            let store = &self.store;
            let proposed = self.publisher.propose(&|node| store.live_generation(node));
            if !proposed.is_empty() {
                match decisions.write(leadership, &proposed).await {
                    Ok(stored) => {
                        self.publisher.adopt(&stored);
                    }
                    Err(DecisionWriteError::NotLeader) => {}
                    Err(e) => warn!(error = %e, "decisions not stored; retrying"),
                }
            }
        }
        self.mark_ready();
    }

    /// Ready once it has compiled and can speak TLS (if it does).
    fn mark_ready(&self) {
        let tls_ready = self.cli.tls_cert.is_some()
            || matches!(self.cli.source, Source::Dir(_))
            || self.cert.is_loaded();
        self.store.set_ready(tls_ready);
    }

    /// Which node runs which snapshot: published generations against what the agents report
    /// live.
    fn rollout_facts(&self) -> RolloutFacts {
        let nodes = self.publisher.nodes();
        RolloutFacts {
            snapshot_generation: nodes.iter().map(|n| n.generation).max().unwrap_or(0),
            nodes: nodes
                .into_iter()
                .map(|n| NodeRollout {
                    ready: !n.pending && self.store.live_generation(&n.node) == Some(n.generation),
                    name: n.node,
                    generation: n.generation,
                })
                .collect(),
        }
    }
}

/// The nodes to compile for: every Node object and every `--node`, sorted, once each.
fn node_names(inputs: &Inputs, extra: &[String]) -> Vec<String> {
    let mut nodes: Vec<String> = inputs
        .nodes
        .iter()
        .filter_map(|n| n.metadata.name.clone())
        .chain(extra.iter().cloned())
        .collect();
    nodes.sort();
    nodes.dedup();
    nodes
}

/// Every Node's name and labels, for the rollout's canary selector.
fn node_labels(inputs: &Inputs) -> Vec<(String, std::collections::BTreeMap<String, String>)> {
    let nodes = inputs.nodes.iter();
    let labelled = nodes.filter_map(|n| {
        let labels = n.metadata.labels.clone().unwrap_or_default();
        Some((n.metadata.name.clone()?, labels))
    });
    labelled.collect()
}

/// Compiles the directory now and whenever a file in it changes. A directory that cannot be
/// read keeps the published snapshots.
async fn run_dir(path: PathBuf, mut operator: Operator<'_>) -> Result<()> {
    let paths = vec![path];
    let mut last_fingerprint = None;
    loop {
        let fingerprint = dir_source::fingerprint(&paths);
        if fingerprint.as_ref().ok() != last_fingerprint.as_ref() {
            match dir_source::load(&paths, &operator.cli.default_namespace) {
                Ok((inputs, parse_diagnostics)) => {
                    operator.compile_and_publish(&inputs, parse_diagnostics);
                }
                Err(e) => {
                    error!(error = %e, "reading the source directory; keeping the published snapshots")
                }
            }
            last_fingerprint = fingerprint.ok();
        }
        operator.advance();
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The applier of waypoint objects, when `--waypoint-image` names the image to run.
fn waypoint_applier(cli: &Cli, client: &kube::Client) -> Option<WaypointApplier> {
    let image = cli.waypoint_image.clone()?;
    let operator_url = cli.waypoint_operator_url.clone().unwrap_or_else(|| {
        format!(
            "https://kmesh-operator.{}.svc:{}",
            cli.namespace,
            cli.listen.port()
        )
    });
    let settings = WaypointSettings {
        image,
        operator_url,
        token_audience: cli.token_audience.clone(),
        ca_pem: None,
        replicas: cli.waypoint_replicas,
    };
    Some(WaypointApplier::new(
        client.clone(),
        settings,
        Some(cli.namespace.clone()),
    ))
}

/// Watches the API server, recompiles on (debounced) changes, serves the leader's decisions, and
/// (leader only) decides, keeps the certificates and the KmeshConfig status current, also while
/// agents report their rollout progress.
async fn run_kube(client: kube::Client, mut operator: Operator<'_>) -> Result<()> {
    let cli = operator.cli;
    let shutdown = shutdown_signal();
    let mut leadership = election(cli, &client, shutdown.clone())?;
    certs::start(
        client.clone(),
        cert_source(cli),
        operator.cert.clone(),
        leadership.clone(),
    );
    let mut decisions = DecisionStore::start(&client, &cli.namespace);
    replicas::record_live_reports(&client, &cli.namespace, operator.store.clone());
    let mut live = operator.store.live_changes();
    let source = KubeSource::start(client.clone());
    let mut stopping = shutdown.clone();
    tokio::select! {
        settled = source.wait_settled(Duration::from_secs(60)) => if !settled {
            warn!(
                "not every watched kind listed within 60 s; compiling with what is there \
                 (publishing nothing while an authorization kind is not listed)"
            );
        },
        _ = stopping.wait_for(|stop| *stop) => return stop(&operator.store).await,
    }
    let mut changes = source.changes(DebounceConfig::default());
    let reporter = Reporter {
        controller: "kmesh-operator".into(),
        instance: cli.pod_name.clone(),
    };
    let mut waypoints = waypoint_applier(cli, &client);
    let mut reconciler = Reconciler::new(client, reporter).gated_by(leadership.clone());
    let mut gate_report = GateReport::default();
    loop {
        let snapshot = source.snapshot();
        // Held while an authorization kind was never read: compiled (for the status), not
        // published, so every node keeps the snapshot it runs (see `kube_source::gate`).
        let publishing = snapshot.publishing();
        gate_report.observe(&publishing, &operator.metrics);
        let compiled = operator.compile(&snapshot.inputs, snapshot.diagnostics.clone());
        if !publishing.is_held() {
            operator.publish(&snapshot.inputs, &compiled);
        }
        loop {
            operator.decide(&decisions, &leadership).await;
            if leadership.is_leader() {
                let rollout = operator.rollout_facts();
                let stores = source.stores();
                let uid_of = |o: &ObjectRef| stores.uid_of(o);
                let input = ReconcileInput {
                    config: snapshot.inputs.config.as_ref(),
                    diagnostics: &compiled.diagnostics,
                    rollout: &rollout,
                    unwatched: &snapshot.unwatched,
                    publishing: &publishing,
                    uid_of: &uid_of,
                };
                match tokio::time::timeout(Duration::from_secs(10), reconciler.reconcile(&input))
                    .await
                {
                    Ok(Ok(_)) => {}
                    // Logged by the reconciler, once per condition.
                    Ok(Err(e)) => debug!(error = %e, "KmeshConfig status not written"),
                    Err(_) => warn!("updating the KmeshConfig status: no answer within 10 s"),
                }
                if let Some(applier) = waypoints.as_mut() {
                    let apply = applier.apply(&snapshot.inputs.gateways, compiled.waypoints.keys());
                    if tokio::time::timeout(Duration::from_secs(10), apply)
                        .await
                        .is_err()
                    {
                        warn!("applying the waypoints' objects: no answer within 10 s");
                    }
                }
            }
            // Recompile on a change; meanwhile follow decisions, leadership and agents' progress
            // (the status follows an agent's report at once, and every 2 s regardless).
            tokio::select! {
                more = changes.next() => {
                    if !more {
                        return Err(Error::SourceStopped);
                    }
                    break;
                }
                _ = decisions.changed() => {}
                _ = leadership.changed() => {}
                _ = live.changed() => {}
                _ = stopping.wait_for(|stop| *stop) => return stop(&operator.store).await,
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::error::ErrorKind;

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("kmesh-operator").chain(args.iter().copied()))
    }

    /// The message of a refused command line, checked to name the flag and the bad value.
    fn refusal(args: &[&str], flag: &str, value: &str) -> String {
        let error = parse(args).expect_err("refused");
        assert_eq!(error.kind(), ErrorKind::ValueValidation, "{error}");
        let message = error.to_string();
        assert!(message.contains(flag), "{message}");
        assert!(message.contains(&format!("'{value}'")), "{message}");
        message
    }

    #[test]
    fn sources() {
        assert_eq!(parse(&[]).unwrap().source, Source::Kube);
        let dir = parse(&["--source", "dir:/etc/mesh"]).unwrap().source;
        assert_eq!(dir, Source::Dir("/etc/mesh".into()));
        let cli = parse(&["--source=dir:a:b"]).unwrap();
        assert_eq!(
            cli.source,
            Source::Dir("a:b".into()),
            "only the first colon splits"
        );
    }

    #[test]
    fn a_bad_source_is_named() {
        let message = refusal(&["--source", "cluster"], "--source", "cluster");
        assert!(
            message.contains("expected `kube` or `dir:PATH`"),
            "{message}"
        );
        let message = refusal(&["--source", "dir:"], "--source", "dir:");
        assert!(message.contains("`dir:` needs a path"), "{message}");
        // Not a prefix match: `kubernetes` is not `kube`.
        refusal(&["--source=kubernetes"], "--source", "kubernetes");
    }

    #[test]
    fn auths() {
        assert_eq!(parse(&[]).unwrap().auth, Auth::TokenReview);
        assert_eq!(parse(&["--auth", "none"]).unwrap().auth, Auth::None);
        let auth = parse(&["--auth", "static:/run/tokens"]).unwrap().auth;
        assert_eq!(auth, Auth::Static("/run/tokens".into()));
    }

    #[test]
    fn a_bad_auth_is_named() {
        let message = refusal(&["--auth", "mtls"], "--auth", "mtls");
        assert!(
            message.contains("expected `tokenreview`, `static:FILE` or `none`"),
            "{message}"
        );
        let message = refusal(&["--auth=static:"], "--auth", "static:");
        assert!(message.contains("`static:` needs a path"), "{message}");
        refusal(&["--auth", "None"], "--auth", "None");
    }

    #[test]
    fn service_accounts() {
        let account = parse(&[]).unwrap().agent_service_account;
        let expected = ServiceAccount {
            namespace: "kmesh-system".into(),
            name: "kmesh-agent".into(),
        };
        assert_eq!(account, expected);
        for bad in ["kmesh-agent", "/kmesh-agent", "kmesh-system/", "a/b/c"] {
            let message = refusal(
                &["--agent-service-account", bad],
                "--agent-service-account",
                bad,
            );
            assert!(message.contains("expected `namespace/name`"), "{message}");
        }
    }

    #[tokio::test]
    async fn a_bad_token_file_names_the_file_and_line() {
        let path = std::env::temp_dir().join(format!("kmt-tokens-{}", std::process::id()));
        std::fs::write(&path, "t1 node-1\nt2\n").unwrap();
        let arg = format!("--auth=static:{}", path.display());
        let cli = parse(&[arg.as_str(), "--listen=127.0.0.1:0"]).unwrap();
        let server = Server {
            listener: bind(cli.listen).await.unwrap(),
            tls: None,
            store: SnapshotStore::default(),
            metrics: Arc::new(Metrics::default()),
        };
        let error = start_server(&cli, server).await.expect_err("refused");
        std::fs::remove_file(&path).unwrap();
        let message = error.to_string();
        assert!(matches!(error, Error::StaticTokens { .. }), "{error:?}");
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(
            message.contains("line 2: expected `<token> <node>`"),
            "{message}"
        );
    }
}
