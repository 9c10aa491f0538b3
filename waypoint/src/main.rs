//! `kmesh-waypoint`: the L7 proxy of DualEngine mode. It takes its configuration from the
//! operator (`--operator`, long-polled) or from a file (`--config-file`, re-read when it changes),
//! listens for the connections the kernel steers to it, and proxies
//! them by the routes of the service each one was going to. SIGTERM or SIGINT drains it: it stops
//! accepting, answers `/readyz` 503, lets requests and connections in progress finish (up to
//! `--drain-timeout-ms`) and exits 0.
use std::{
    net::SocketAddr,
    num::NonZeroUsize,
    path::PathBuf,
    process::ExitCode,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use clap::{ArgGroup, Parser};
use kmesh_snapshot::waypoint::WaypointName;
use kmesh_waypoint::{
    admin::{self, Admin, Readiness},
    config_store::{self, ConfigStore, FileSource},
    listener::{self, Connections},
    metrics::Metrics,
    operator_source::{self, OperatorSettings, OperatorSource},
    proxy::{Proxy, Settings},
};
use tokio::{net::TcpListener, signal::unix::SignalKind, sync::watch};

/// mimalloc (Cargo.toml says why).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(name = "kmesh-waypoint", version, about)]
#[command(group(ArgGroup::new("source").required(true).args(["config_file", "operator"])))]
struct Args {
    /// Where the kernel's steered connections arrive (repeat for several; `[::]` takes IPv4
    /// too unless net.ipv6.bindv6only is set).
    #[arg(long = "listen", default_value = "[::]:15008")]
    listen: Vec<SocketAddr>,
    /// The admin endpoint: /healthz, /readyz, /metrics.
    #[arg(long, default_value = "[::]:15020")]
    admin: SocketAddr,
    /// The configuration (kmesh_snapshot::waypoint JSON), read again when its content changes.
    /// Exactly one of --config-file and --operator.
    #[arg(long)]
    config_file: Option<PathBuf>,
    /// The operator's base URL (http:// or https://), long-polled for this waypoint's
    /// configuration. Exactly one of --config-file and --operator.
    #[arg(long, requires = "waypoint")]
    operator: Option<String>,
    /// The waypoint this is, NAMESPACE/NAME of its Gateway (with --operator).
    #[arg(long, value_parser = operator_source::parse_waypoint, requires = "operator")]
    waypoint: Option<WaypointName>,
    /// PEM CA certificates of the operator's serving certificate (required for an https
    /// --operator); re-read before each request.
    #[arg(long, requires = "operator")]
    operator_ca: Option<PathBuf>,
    /// A bearer token for the operator, read for every request (projected tokens rotate).
    /// Without it, requests carry no token.
    #[arg(long, requires = "operator")]
    token_file: Option<PathBuf>,
    /// How often the configuration file is read, in milliseconds.
    #[arg(long, default_value_t = 200)]
    config_poll_ms: u64,
    /// How long a `Detect` port waits for the client's first bytes before it takes the
    /// connection as TCP (server-first protocols then work).
    #[arg(long, default_value_t = 100)]
    sniff_timeout_ms: u64,
    /// How long a connect to an endpoint may take (then 503, `UF`).
    #[arg(long, default_value_t = 10_000)]
    connect_timeout_ms: u64,
    /// The largest request body kept in memory to be retried or mirrored; larger bodies are
    /// streamed once.
    #[arg(long, default_value_t = 1 << 20)]
    max_replay_body_bytes: usize,
    /// How long the drain lets requests and connections in progress finish.
    #[arg(long, default_value_t = 5_000)]
    drain_timeout_ms: u64,
    /// The proxy's threads, each with its own listeners and upstream connections (default: one
    /// per CPU).
    #[arg(long, env = "TOKIO_WORKER_THREADS")]
    workers: Option<NonZeroUsize>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    // This thread runs what is not the proxy's (the admin endpoint, the configuration source, the
    // signals); the proxy runs on its workers (`serve_worker`).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "cannot start the runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let metrics = Metrics::new();
    let store = Arc::new(ConfigStore::new(metrics.clone()));
    let (drain_tx, drain_rx) = watch::channel(false);
    let settings = Settings {
        sniff_timeout: Duration::from_millis(args.sniff_timeout_ms),
        connect_timeout: Duration::from_millis(args.connect_timeout_ms),
        max_replay_body: args.max_replay_body_bytes,
        seed: None,
    };
    let readiness = Arc::new(Readiness::default());
    let metrics_for_source = metrics.clone();
    let metrics_for_workers = metrics.clone();
    let admin = Arc::new(Admin {
        store: Arc::clone(&store),
        metrics,
        readiness: Arc::clone(&readiness),
    });
    let admin_listener = TcpListener::bind(args.admin)
        .await
        .map_err(|e| anyhow::anyhow!("--admin {}: {e}", args.admin))?;
    tokio::spawn(admin::serve(admin_listener, admin));
    spawn_source(&args, metrics_for_source, Arc::clone(&store))?;

    // The proxy's workers, nginx's model: a thread each, with a single-threaded runtime, its own
    // listeners on the shared addresses and its own upstream pools (a `Proxy` each), so that a
    // connection, its requests and their upstream connections stay on one thread: no request
    // crosses threads, and no thread wakes another for it. The configuration, the metrics and the
    // drain are shared.
    let workers = args.workers.map_or_else(
        || std::thread::available_parallelism().map_or(1, NonZeroUsize::get),
        NonZeroUsize::get,
    );
    let connections = Arc::new(Connections::default());
    let mut bound = Vec::new();
    for worker in 0..workers {
        let proxy = Arc::new(Proxy::new(
            Arc::clone(&store),
            metrics_for_workers.clone(),
            settings.clone(),
            drain_rx.clone(),
        ));
        let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
        let addresses = args.listen.clone();
        let connections = Arc::clone(&connections);
        std::thread::Builder::new()
            .name(format!("waypoint-{worker}"))
            .spawn(move || serve_worker(&addresses, proxy, connections, bound_tx))?;
        bound.push(bound_rx);
    }
    for bound in bound {
        bound
            .await
            .map_err(|_| anyhow::anyhow!("a worker thread ended before listening"))?
            .map_err(|e| anyhow::anyhow!(e))?;
    }
    for address in &args.listen {
        tracing::info!(%address, workers, "listening");
    }
    readiness.listening.store(true, Ordering::SeqCst);

    let mut terminate = tokio::signal::unix::signal(SignalKind::terminate())?;
    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM: draining"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: draining"),
    }
    readiness.draining.store(true, Ordering::SeqCst);
    let _ = drain_tx.send(true);
    let drain_timeout = Duration::from_millis(args.drain_timeout_ms);
    match tokio::time::timeout(drain_timeout, connections.idle()).await {
        Ok(()) => tracing::info!("drained"),
        Err(_) => tracing::warn!(
            open = connections.active(),
            "drain timeout: closing the connections left"
        ),
    }
    Ok(())
}

/// One worker of the proxy, on this thread until the process exits: binds its listeners (their
/// outcome goes to `bound`), accepts until the waypoint drains, then serves the connections in
/// progress.
fn serve_worker(
    addresses: &[SocketAddr],
    proxy: Arc<Proxy>,
    connections: Arc<Connections>,
    bound: tokio::sync::oneshot::Sender<Result<(), String>>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            let _ = bound.send(Err(format!("cannot start a worker's runtime: {error}")));
            return;
        }
    };
    runtime.block_on(async move {
        let mut listeners = Vec::new();
        for address in addresses {
            match listener::bind_shared(*address) {
                Ok(listener) => listeners.push(listener),
                Err(error) => {
                    let _ = bound.send(Err(format!("--listen {address}: {error}")));
                    return;
                }
            }
        }
        let _ = bound.send(Ok(()));
        let loops: Vec<_> = listeners
            .into_iter()
            .map(|listener| {
                tokio::spawn(listener::accept_loop(
                    listener,
                    Arc::clone(&proxy),
                    Arc::clone(&connections),
                ))
            })
            .collect();
        for accept_loop in loops {
            let _ = accept_loop.await;
        }
        // Drained: the connections in progress go on until they end or the process exits.
        std::future::pending::<()>().await;
    });
}

/// Starts following the configuration source the flags name (clap lets exactly one through).
fn spawn_source(args: &Args, metrics: Metrics, store: Arc<ConfigStore>) -> anyhow::Result<()> {
    match (&args.config_file, &args.operator, &args.waypoint) {
        (Some(path), _, _) => {
            let interval = Duration::from_millis(args.config_poll_ms);
            tokio::spawn(config_store::follow(FileSource::new(path, interval), store));
        }
        (None, Some(url), Some(waypoint)) => {
            let settings = OperatorSettings {
                url: url.clone(),
                waypoint: waypoint.clone(),
                ca_file: args.operator_ca.clone(),
                token_file: args.token_file.clone(),
                wait: operator_source::LONG_POLL,
            };
            let source = OperatorSource::new(settings, metrics)?;
            tracing::info!(url = source.url(), "following the operator");
            tokio::spawn(config_store::follow(source, store));
        }
        _ => anyhow::bail!("--config-file or --operator with --waypoint"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::error::ErrorKind;

    use super::*;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("kmesh-waypoint").chain(args.iter().copied()))
    }

    #[test]
    fn the_operator_source_takes_its_flags() {
        let args = parse(&[
            "--operator=https://kmesh-operator.kmesh-system.svc:15300",
            "--waypoint=bookinfo/reviews-waypoint",
            "--token-file=/var/run/secrets/kmesh/token",
            "--operator-ca=/etc/kmesh/ca/ca.crt",
        ])
        .unwrap();
        assert_eq!(
            args.operator.as_deref(),
            Some("https://kmesh-operator.kmesh-system.svc:15300")
        );
        let waypoint = args.waypoint.unwrap();
        assert_eq!(
            (waypoint.namespace.as_str(), waypoint.name.as_str()),
            ("bookinfo", "reviews-waypoint")
        );
        assert_eq!(
            args.token_file.as_deref(),
            Some(std::path::Path::new("/var/run/secrets/kmesh/token"))
        );
        assert!(args.config_file.is_none());
        assert!(parse(&["--config-file=/etc/wp.json"]).is_ok());
    }

    #[test]
    fn exactly_one_source() {
        let none = parse(&[]).unwrap_err();
        assert_eq!(none.kind(), ErrorKind::MissingRequiredArgument, "{none}");
        assert!(none.to_string().contains("--config-file"), "{none}");
        let both = parse(&[
            "--config-file=/etc/wp.json",
            "--operator=http://op:15300",
            "--waypoint=ns/wp",
        ])
        .unwrap_err();
        assert_eq!(both.kind(), ErrorKind::ArgumentConflict, "{both}");
    }

    #[test]
    fn the_operator_needs_a_waypoint_and_a_good_one() {
        let missing = parse(&["--operator=http://op:15300"]).unwrap_err();
        assert_eq!(missing.kind(), ErrorKind::MissingRequiredArgument);
        assert!(missing.to_string().contains("--waypoint"), "{missing}");
        let bad = parse(&["--operator=http://op:15300", "--waypoint=reviews"]).unwrap_err();
        assert_eq!(bad.kind(), ErrorKind::ValueValidation);
        assert!(bad.to_string().contains("NAMESPACE/NAME"), "{bad}");
        let stray = parse(&["--config-file=/etc/wp.json", "--token-file=/t"]).unwrap_err();
        assert_eq!(stray.kind(), ErrorKind::MissingRequiredArgument, "{stray}");
    }
}
