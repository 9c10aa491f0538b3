//! `kmesh-operator`: compiles the cluster's Kubernetes and Istio objects into one snapshot per node
//! and serves each node agent its own.
//!
//! Sources: `--source dir:PATH` reads YAML (re-read when a file changes) — for running without a
//! cluster, and for GitOps previews; `--source kube` watches the API server.
use std::{net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use clap::Parser;
use kmesh_operator::{
    compile::{CompileOptions, Compiled, compile},
    diagnostics::{Diagnostic, Severity},
    dir_source,
    inputs::Inputs,
    kube_source::{DebounceConfig, KubeSource},
    metrics::{self, Metrics},
    publish::{Publisher, RolloutPolicy},
    reconcile::{NodeRollout, ReconcileInput, Reconciler, RolloutFacts},
    server::{self, Authenticator, NoAuth, SnapshotStore, StaticTokens},
};
use kube::runtime::events::Reporter;
use tracing::{error, info, warn};

#[derive(Parser, Debug)]
#[command(
    name = "kmesh-operator",
    version,
    about = "kmesh-rs operator: Istio to per-node eBPF snapshots"
)]
struct Cli {
    /// Where objects come from: `dir:PATH` (YAML files) or `kube` (the API server).
    #[arg(long, default_value = "kube")]
    source: String,
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
    auth: String,
    /// The agents' service account, `namespace/name` (tokenreview).
    #[arg(long, default_value = "kmesh-system/kmesh-agent")]
    agent_service_account: String,
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

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kmesh-operator: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            eprintln!("kmesh-operator: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), String> {
    let store = SnapshotStore::default();
    let metrics = Arc::new(Metrics::default());
    let tls = match (&cli.tls_cert, &cli.tls_key) {
        (Some(cert), Some(key)) => {
            let read = |p: &PathBuf| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
            Some(server::tls_acceptor(&read(cert)?, &read(key)?)?)
        }
        _ => None,
    };
    let listener = tokio::net::TcpListener::bind(cli.listen)
        .await
        .map_err(|e| format!("listening on {}: {e}", cli.listen))?;
    let metrics_listener = tokio::net::TcpListener::bind(cli.metrics_addr)
        .await
        .map_err(|e| format!("listening on {}: {e}", cli.metrics_addr))?;
    tokio::spawn(metrics::serve(metrics_listener, metrics.clone()));
    match cli.auth.as_str() {
        "none" => {
            warn!("agent authentication is off: any caller may fetch any node's snapshot");
            spawn_server(listener, tls, store.clone(), NoAuth, metrics.clone());
        }
        "tokenreview" => {
            let client = kube::Client::try_default()
                .await
                .map_err(|e| format!("--auth tokenreview needs the API server: {e}"))?;
            let (ns, sa) = cli
                .agent_service_account
                .split_once('/')
                .ok_or("--agent-service-account must be namespace/name")?;
            let auth = kmesh_operator::tokenreview::TokenReviewAuth::new(
                client,
                ns,
                sa,
                vec![cli.token_audience.clone()],
            );
            spawn_server(listener, tls, store.clone(), auth, metrics.clone());
        }
        other => match other.strip_prefix("static:") {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
                spawn_server(
                    listener,
                    tls,
                    store.clone(),
                    StaticTokens::parse(&text)?,
                    metrics.clone(),
                );
            }
            None => {
                return Err(format!(
                    "--auth {other:?}: expected tokenreview, static:FILE or none"
                ));
            }
        },
    }
    let first_generation = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(1);
    let publisher = Publisher::new(store.clone(), metrics.clone(), first_generation);
    let options = CompileOptions {
        root_namespace: cli.root_namespace.clone(),
        ..Default::default()
    };
    match cli.source.strip_prefix("dir:") {
        Some(path) => {
            run_dir(
                PathBuf::from(path),
                &cli,
                options,
                publisher,
                store,
                metrics,
            )
            .await
        }
        None if cli.source == "kube" => {
            let client = kube::Client::try_default()
                .await
                .map_err(|e| format!("--source kube needs the API server: {e}"))?;
            run_kube(client, &cli, options, publisher, store, metrics).await
        }
        None => Err(format!(
            "--source {:?}: expected dir:PATH or kube",
            cli.source
        )),
    }
}

fn spawn_server<A: Authenticator>(
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    store: SnapshotStore,
    auth: A,
    metrics: Arc<Metrics>,
) {
    tokio::spawn(server::serve(listener, tls, store, Arc::new(auth), metrics));
}

/// Compiles `inputs` for `nodes`, reports the diagnostics, and publishes what changed.
fn compile_and_publish(
    inputs: &Inputs,
    parse_diagnostics: Vec<Diagnostic>,
    mut nodes: Vec<String>,
    options: &CompileOptions,
    publisher: &mut Publisher,
    metrics: &Metrics,
) -> Compiled {
    nodes.sort();
    nodes.dedup();
    let started = std::time::Instant::now();
    let mut compiled = compile(inputs, &nodes, 1, options);
    compiled.diagnostics.extend(parse_diagnostics);
    compiled.diagnostics.sort();
    let count = |severity| {
        compiled
            .diagnostics
            .iter()
            .filter(|d| d.severity == severity)
            .count()
    };
    let (rejected, unenforced) = (count(Severity::Rejected), count(Severity::Unenforced));
    metrics.compiled(started.elapsed().as_secs_f64(), rejected, unenforced);
    for d in &compiled.diagnostics {
        match d.severity {
            Severity::Rejected => warn!("{d}"),
            _ => info!("{d}"),
        }
    }
    let node_labels: Vec<(String, std::collections::BTreeMap<String, String>)> = inputs
        .nodes
        .iter()
        .filter_map(|n| {
            Some((
                n.metadata.name.clone()?,
                n.metadata.labels.clone().unwrap_or_default(),
            ))
        })
        .collect();
    publisher.set_policy(RolloutPolicy::from_config(
        inputs.config.as_ref(),
        &node_labels,
    ));
    publisher.publish(&compiled);
    info!(
        nodes = nodes.len(),
        compile_ms = started.elapsed().as_millis() as u64,
        rejected,
        unenforced,
        "compiled"
    );
    compiled
}

/// Which node runs which snapshot: published generations against what the agents report live.
fn rollout_facts(publisher: &Publisher, store: &SnapshotStore) -> RolloutFacts {
    let nodes = publisher.nodes();
    RolloutFacts {
        snapshot_generation: nodes.iter().map(|n| n.generation).max().unwrap_or(0),
        nodes: nodes
            .into_iter()
            .map(|n| NodeRollout {
                ready: !n.pending && store.live_generation(&n.node) == Some(n.generation),
                name: n.node,
                generation: n.generation,
            })
            .collect(),
    }
}

/// Compiles the directory now and whenever a file in it changes.
async fn run_dir(
    path: PathBuf,
    cli: &Cli,
    options: CompileOptions,
    mut publisher: Publisher,
    store: SnapshotStore,
    metrics: Arc<Metrics>,
) -> Result<(), String> {
    let paths = vec![path];
    let mut last_fingerprint = None;
    loop {
        let fingerprint = dir_source::fingerprint(&paths).map_err(|e| e.to_string());
        if fingerprint.as_ref().ok() != last_fingerprint.as_ref() {
            match dir_source::load(&paths, &cli.default_namespace) {
                Ok((inputs, parse_diagnostics)) => {
                    let nodes = node_names(&inputs, &cli.nodes);
                    compile_and_publish(
                        &inputs,
                        parse_diagnostics,
                        nodes,
                        &options,
                        &mut publisher,
                        &metrics,
                    );
                }
                Err(e) => {
                    error!(error = %e, "reading the source directory; keeping the published snapshots")
                }
            }
            last_fingerprint = fingerprint.ok();
        }
        publisher.advance(&|node| store.live_generation(node));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn node_names(inputs: &Inputs, extra: &[String]) -> Vec<String> {
    inputs
        .nodes
        .iter()
        .filter_map(|n| n.metadata.name.clone())
        .chain(extra.iter().cloned())
        .collect()
}

/// Watches the API server, recompiles on (debounced) changes, and keeps the KmeshConfig status
/// current, also while agents report their rollout progress.
async fn run_kube(
    client: kube::Client,
    cli: &Cli,
    options: CompileOptions,
    mut publisher: Publisher,
    store: SnapshotStore,
    metrics: Arc<Metrics>,
) -> Result<(), String> {
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
    loop {
        let snapshot = source.snapshot();
        let nodes = node_names(&snapshot.inputs, &cli.nodes);
        let compiled = compile_and_publish(
            &snapshot.inputs,
            snapshot.diagnostics.clone(),
            nodes,
            &options,
            &mut publisher,
            &metrics,
        );
        let not_installed = snapshot.not_installed_names();
        loop {
            publisher.advance(&|node| store.live_generation(node));
            let rollout = rollout_facts(&publisher, &store);
            let stores = source.stores();
            let uid_of = |o: &kmesh_operator::diagnostics::ObjectRef| stores.uid_of(o);
            let input = ReconcileInput {
                config: snapshot.inputs.config.as_ref(),
                diagnostics: &compiled.diagnostics,
                rollout: &rollout,
                not_installed: &not_installed,
                uid_of: &uid_of,
            };
            if let Err(e) = reconciler.reconcile(&input).await {
                warn!(error = %e, "updating the KmeshConfig status");
            }
            // Recompile on a change; meanwhile refresh the status as agents report progress.
            tokio::select! {
                more = changes.next() => {
                    if !more {
                        return Err("the Kubernetes source stopped".into());
                    }
                    break;
                }
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
        }
    }
}
