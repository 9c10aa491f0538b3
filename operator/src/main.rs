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
    compile::{CompileOptions, Compiled, compile},
    diagnostics::{Diagnostic, ObjectRef, Severity},
    dir_source,
    inputs::Inputs,
    kube_source::{DebounceConfig, KubeSource},
    metrics::{self, Metrics},
    publish::{Publisher, RolloutPolicy},
    reconcile::{NodeRollout, ReconcileInput, Reconciler, RolloutFacts},
    server::{self, Authenticator, NoAuth, SnapshotStore, StaticTokens},
    tokenreview::TokenReviewAuth,
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
    /// PEM certificate chain of the snapshot server; with --tls-key, the server speaks TLS.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// How agents authenticate: `tokenreview` (service-account tokens checked with the API server),
    /// `static:FILE` (lines of `<token> <node>`), or `none` (anyone may fetch any node; local use).
    #[arg(long, default_value = "tokenreview")]
    auth: Auth,
    /// The agents' service account, `namespace/name` (tokenreview).
    #[arg(long, default_value = "kmesh-system/kmesh-agent")]
    agent_service_account: ServiceAccount,
    /// The audience of the agents' projected tokens (tokenreview).
    #[arg(long, default_value = "kmesh-operator")]
    token_audience: String,
    /// Address of /metrics.
    #[arg(long, default_value = "0.0.0.0:15301")]
    metrics_addr: SocketAddr,
    /// Namespace of YAML objects that name none (dir:).
    #[arg(long, default_value = "default")]
    default_namespace: String,
    /// Istio's root namespace.
    #[arg(long, default_value = "istio-system")]
    root_namespace: String,
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
    /// `static:FILE`: fixed tokens, a `<token> <node>` per line.
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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(Error::Runtime);
    match runtime.and_then(|runtime| runtime.block_on(run(cli))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            eprintln!("kmesh-operator: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let store = SnapshotStore::default();
    let metrics = Arc::new(Metrics::default());
    let tls = tls_acceptor(&cli)?;
    let server = Server {
        listener: bind(cli.listen).await?,
        tls,
        store: store.clone(),
        metrics: metrics.clone(),
    };
    tokio::spawn(metrics::serve(
        bind(cli.metrics_addr).await?,
        metrics.clone(),
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
    };
    match &cli.source {
        Source::Dir(path) => run_dir(path.clone(), operator).await,
        Source::Kube => run_kube(api_client("--source kube").await?, operator).await,
    }
}

/// The TLS acceptor of `--tls-cert` and `--tls-key`, if given.
fn tls_acceptor(cli: &Cli) -> Result<Option<tokio_rustls::TlsAcceptor>> {
    let (Some(cert), Some(key)) = (&cli.tls_cert, &cli.tls_key) else {
        return Ok(None);
    };
    let read = |p: &PathBuf| std::fs::read(p).map_err(Error::read(p));
    server::tls_acceptor(&read(cert)?, &read(key)?).map(Some)
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
}

impl Operator<'_> {
    /// Compiles `inputs` for its nodes (the Node objects and `--node`), reports the diagnostics,
    /// and publishes what changed.
    fn compile_and_publish(
        &mut self,
        inputs: &Inputs,
        parse_diagnostics: Vec<Diagnostic>,
    ) -> Compiled {
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
        let policy = RolloutPolicy::from_config(inputs.config.as_ref(), &node_labels(inputs));
        self.publisher.set_policy(policy);
        self.publisher.publish(&compiled);
        info!(
            nodes = nodes.len(),
            compile_ms = started.elapsed().as_millis() as u64,
            rejected,
            unenforced,
            "compiled"
        );
        compiled
    }

    /// Publishes the pending snapshots the rollout allows now, given what agents report live.
    fn advance(&mut self) {
        let store = &self.store;
        self.publisher.advance(&|node| store.live_generation(node));
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

/// Watches the API server, recompiles on (debounced) changes, and keeps the KmeshConfig status
/// current, also while agents report their rollout progress.
async fn run_kube(client: kube::Client, mut operator: Operator<'_>) -> Result<()> {
    let source = KubeSource::start(client.clone());
    if !source.wait_settled(Duration::from_secs(60)).await {
        warn!("not every watched kind listed within 60 s; compiling with what is there");
    }
    let mut changes = source.changes(DebounceConfig::default());
    let reporter = Reporter {
        controller: "kmesh-operator".into(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let mut reconciler = Reconciler::new(client, reporter);
    let mut live_changes = operator.store.live_changes();
    loop {
        let snapshot = source.snapshot();
        let compiled = operator.compile_and_publish(&snapshot.inputs, snapshot.diagnostics.clone());
        loop {
            operator.advance();
            let rollout = operator.rollout_facts();
            let stores = source.stores();
            let uid_of = |o: &ObjectRef| stores.uid_of(o);
            let input = ReconcileInput {
                config: snapshot.inputs.config.as_ref(),
                diagnostics: &compiled.diagnostics,
                rollout: &rollout,
                unwatched: &snapshot.unwatched,
                uid_of: &uid_of,
            };
            if let Err(e) = reconciler.reconcile(&input).await {
                // Logged by the reconciler, once per condition.
                debug!(error = %e, "KmeshConfig status not written");
            }
            // Recompile on a change; meanwhile advance the rollout and refresh the status as
            // soon as an agent reports progress (and every 2 s regardless).
            tokio::select! {
                more = changes.next() => {
                    if !more {
                        return Err(Error::SourceStopped);
                    }
                    break;
                }
                _ = live_changes.changed() => {}
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
