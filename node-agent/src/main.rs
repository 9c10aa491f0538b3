//! `kmesh-agent`: the kmesh-rs node agent.
//!
//! With no subcommand it runs the agent; `kmesh-agent uninstall` detaches the programs and removes
//! every pin.
use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::{Args, Parser, Subcommand};
use kmesh_agent::{
    admin, agent,
    error_chain::chain,
    loader, source,
    telemetry::{AccessLogFormat, DEFAULT_MAX_SERIES, TelemetrySettings},
};
use kmesh_snapshot::Limits;
use tracing::error;

#[derive(Parser, Debug)]
#[command(
    name = "kmesh-agent",
    version,
    about = "kmesh-rs node agent: in-kernel service load balancing from per-node snapshots"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Detach the programs and remove everything pinned under --bpffs-dir.
    Uninstall {
        #[arg(long, default_value = DEFAULT_BPFFS_DIR)]
        bpffs_dir: PathBuf,
    },
}

const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/kmesh";

#[derive(Args, Debug)]
struct RunArgs {
    /// This node's name; snapshots for other nodes are refused.
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// A local snapshot file, re-applied whenever it changes.
    #[arg(long, conflicts_with = "operator_url")]
    snapshot_file: Option<PathBuf>,
    /// The operator's snapshot server, long-polled for this node's snapshot.
    #[arg(long)]
    operator_url: Option<String>,
    /// Bearer token for the operator (a projected service-account token file; re-read per request).
    #[arg(long, requires = "operator_url")]
    token_file: Option<PathBuf>,
    /// PEM CA certificates of the operator's serving certificate (for an https --operator-url).
    #[arg(long, requires = "operator_url")]
    operator_ca: Option<PathBuf>,
    /// Where programs, links and maps are pinned (must be on bpffs).
    #[arg(long, default_value = DEFAULT_BPFFS_DIR)]
    bpffs_dir: PathBuf,
    /// The cgroup v2 directory to attach to (default: the root of the cgroup v2 hierarchy).
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// Address of /healthz, /readyz and /debug/snapshot.
    #[arg(long, default_value = "127.0.0.1:15200")]
    admin_addr: SocketAddr,
    /// Address of the Prometheus metrics (every path). Not localhost by default: a cluster's
    /// Prometheus scrapes it (15020 is the port Istio and ztunnel serve their metrics on).
    #[arg(long, default_value = "0.0.0.0:15020")]
    metrics_addr: SocketAddr,
    /// Largest snapshot accepted, in bytes.
    #[arg(long, default_value_t = Limits::default().max_bytes)]
    max_snapshot_bytes: u64,
    /// Capacity: services (VIP:port pairs).
    #[arg(long, default_value_t = Limits::default().max_services)]
    max_services: u32,
    /// Capacity: routes.
    #[arg(long, default_value_t = Limits::default().max_routes)]
    max_routes: u32,
    /// Capacity: backend sets.
    #[arg(long, default_value_t = Limits::default().max_backend_sets)]
    max_backend_sets: u32,
    /// Capacity: endpoints.
    #[arg(long, default_value_t = Limits::default().max_endpoints)]
    max_endpoints: u32,
    /// Capacity: workloads of this node.
    #[arg(long, default_value_t = Limits::default().max_workloads)]
    max_workloads: u32,
    /// Capacity: authorization workload addresses (pod IPs a policy binds).
    #[arg(long, default_value_t = Limits::default().max_authz_workloads)]
    max_authz_workloads: u32,
    /// Capacity: authorization source prefixes (mesh workload addresses and policy address blocks).
    #[arg(long, default_value_t = Limits::default().max_authz_sources)]
    max_authz_sources: u32,
    /// Capacity: authorization verdicts.
    #[arg(long, default_value_t = Limits::default().max_authz_verdicts)]
    max_authz_verdicts: u32,
    /// Capacity: authorization policy names.
    #[arg(long, default_value_t = Limits::default().max_authz_policies)]
    max_authz_policies: u32,
    /// Format of the access log (one line per finished connection on standard output, written
    /// while the live snapshot's KmeshConfig `accessLog` is on).
    #[arg(long, value_enum, default_value_t = AccessLogFormat::Json)]
    access_log_format: AccessLogFormat,
    /// Label sets of the istio_tcp_* metrics kept; connections with a new label set past it are
    /// counted in kmesh_telemetry_series_dropped_total instead.
    #[arg(long, default_value_t = DEFAULT_MAX_SERIES)]
    max_telemetry_series: usize,
    /// Capacity: bytes of name strings (telemetry's workload and service names).
    #[arg(long, default_value_t = Limits::default().max_name_bytes)]
    max_name_bytes: u32,
    /// Capacity: named pod addresses (every pod of the cluster with an address).
    #[arg(long, default_value_t = Limits::default().max_workload_names)]
    max_workload_names: u32,
    /// Capacity: named services.
    #[arg(long, default_value_t = Limits::default().max_service_names)]
    max_service_names: u32,
    /// Log filter (tracing EnvFilter syntax) until the first snapshot, whose log level
    /// (KmeshConfig logLevel) then applies; RUST_LOG wins when set, until that level changes.
    #[arg(long, default_value = "info")]
    log_level: String,
    /// Test hook: the data-plane thread panics on receiving its Nth snapshot, so that a test can
    /// check that the agent then stops being ready and exits non-zero. Not for production use.
    #[arg(long, hide = true)]
    test_panic_at_snapshot: Option<u64>,
    /// Test hook: load the test variant of the eBPF object, the same programs over another map
    /// layout (a larger enrolled map), so that a test can upgrade across a layout change with one
    /// binary. Not for production use.
    #[arg(long, hide = true)]
    test_layout_variant: bool,
    /// The node's network namespace: connections from its addresses (kubelet probes) are exempt
    /// from authorization. PID 1's, which the DaemonSet's `hostPID` makes the host's init; the
    /// test kubelet, whose nodes are network namespaces, points it at its node's.
    #[arg(long, env = "KMESH_HOST_NETNS", default_value = "/proc/1/ns/net")]
    host_netns: PathBuf,
    /// Size of the connection events ring buffer in bytes (a power of two, at least a page). Set
    /// when the programs' maps are created: a ring already pinned keeps its size until an
    /// uninstall or a new layout.
    #[arg(long, default_value_t = kmesh_common::events::DEFAULT_EVENTS_RING_BYTES)]
    events_ring_bytes: u32,
    /// Test hook: leave the connection events ring to another reader (a test reading it itself).
    /// Drops are still counted. Not for production use.
    #[arg(long, hide = true)]
    no_events_reader: bool,
}

fn main() -> ExitCode {
    kmesh_agent::sys::single_malloc_arena();
    let cli = Cli::parse();
    init_tracing(&cli.run.log_level);

    let result = match cli.command {
        Some(Command::Uninstall { bpffs_dir }) => {
            loader::uninstall(&bpffs_dir).map_err(|e| chain(&e))
        }
        None => run(cli.run),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            eprintln!("kmesh-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to standard output through a filter the admin server (`/debug/log-level`) and the
/// snapshot's log level replace at runtime (see `admin/log_level.rs`): `RUST_LOG` when set (then it
/// holds until the snapshot's level first changes), else `--log-level` until the first snapshot.
fn init_tracing(log_level: &str) {
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::{EnvFilter, fmt, layer::SubscriberExt as _, reload};
    let from_env = EnvFilter::try_from_default_env().ok();
    let explicit_start = from_env.is_some();
    let filter = from_env.unwrap_or_else(|| EnvFilter::new(log_level));
    let (filter, handle) = reload::Layer::new(filter);
    // Colour codes only on a terminal: a container log or a file keeps plain text.
    let output = fmt::layer().with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    tracing_subscriber::registry()
        .with(filter)
        .with(output)
        .init();
    admin::log_level::install(handle, explicit_start);
}

fn run(args: RunArgs) -> Result<(), String> {
    let limits = limits(&args);
    let node_name = args
        .node_name
        .ok_or("--node-name (or NODE_NAME) is required")?;
    let source = match (args.snapshot_file, args.operator_url) {
        (Some(path), None) => source::Source::File(path),
        (None, Some(url)) => source::Source::Operator {
            url,
            token_file: args.token_file,
            ca_file: args.operator_ca,
        },
        _ => return Err("exactly one of --snapshot-file and --operator-url is required".into()),
    };
    source::check(&source)?;
    let cgroup = match args.cgroup {
        Some(c) => c,
        None => cgroup2_root().map_err(|e| format!("finding the cgroup v2 root: {e}"))?,
    };
    let config = agent::Config {
        node_name,
        source,
        bpffs_dir: args.bpffs_dir,
        cgroup,
        admin_addr: args.admin_addr,
        metrics_addr: args.metrics_addr,
        limits,
        object: if args.test_layout_variant {
            loader::BpfObject::TestLayout
        } else {
            loader::BpfObject::Shipped
        },
        test_panic_at_snapshot: args.test_panic_at_snapshot,
        host_netns: kmesh_agent::host_addrs::HostNetns::Path(args.host_netns),
        telemetry: TelemetrySettings {
            access_log_format: args.access_log_format,
            max_series: args.max_telemetry_series,
        },
        load: loader::LoadOptions {
            events_ring_bytes: args.events_ring_bytes,
        },
        events_reader: !args.no_events_reader,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))?;
    runtime.block_on(agent::run(config)).map_err(|e| chain(&e))
}

/// The snapshot limits of the capacity flags.
fn limits(args: &RunArgs) -> Limits {
    Limits {
        max_bytes: args.max_snapshot_bytes,
        max_services: args.max_services,
        max_routes: args.max_routes,
        max_backend_sets: args.max_backend_sets,
        max_endpoints: args.max_endpoints,
        max_workloads: args.max_workloads,
        max_authz_workloads: args.max_authz_workloads,
        max_authz_sources: args.max_authz_sources,
        max_authz_verdicts: args.max_authz_verdicts,
        max_authz_policies: args.max_authz_policies,
        max_name_bytes: args.max_name_bytes,
        max_workload_names: args.max_workload_names,
        max_service_names: args.max_service_names,
    }
}

/// The mount point of the cgroup v2 hierarchy, from /proc/mounts (it is not always /sys/fs/cgroup).
fn cgroup2_root() -> std::io::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    mounts
        .lines()
        .find_map(|line| {
            let mut fields = line.split_whitespace();
            let (_dev, path, fstype) = (fields.next()?, fields.next()?, fields.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(path))
        })
        .ok_or_else(|| std::io::Error::other("no cgroup2 filesystem in /proc/mounts"))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::{Cli, limits};
    use kmesh_snapshot::Limits;

    /// Every capacity flag sets its own limit (distinct values, so a flag wired to the wrong limit
    /// shows), and with no flag the limits are the snapshot defaults.
    #[test]
    fn capacity_flags_set_the_limits() {
        let cli = Cli::try_parse_from([
            "kmesh-agent",
            "--max-snapshot-bytes=10",
            "--max-services=1",
            "--max-routes=2",
            "--max-backend-sets=3",
            "--max-endpoints=4",
            "--max-workloads=5",
            "--max-authz-workloads=6",
            "--max-authz-sources=7",
            "--max-authz-verdicts=8",
            "--max-authz-policies=9",
            "--max-name-bytes=11",
            "--max-workload-names=12",
            "--max-service-names=13",
        ])
        .unwrap();
        let expected = Limits {
            max_bytes: 10,
            max_services: 1,
            max_routes: 2,
            max_backend_sets: 3,
            max_endpoints: 4,
            max_workloads: 5,
            max_authz_workloads: 6,
            max_authz_sources: 7,
            max_authz_verdicts: 8,
            max_authz_policies: 9,
            max_name_bytes: 11,
            max_workload_names: 12,
            max_service_names: 13,
        };
        assert_eq!(limits(&cli.run), expected);
        let defaults = Cli::try_parse_from(["kmesh-agent"]).unwrap();
        assert_eq!(limits(&defaults.run), Limits::default());
    }

    /// The telemetry flags reach their settings; by default JSON lines and the default cap.
    #[test]
    fn telemetry_flags_set_the_telemetry_settings() {
        use kmesh_agent::telemetry::{AccessLogFormat, DEFAULT_MAX_SERIES};
        let cli = Cli::try_parse_from([
            "kmesh-agent",
            "--access-log-format=text",
            "--max-telemetry-series=7",
        ])
        .unwrap();
        assert_eq!(cli.run.access_log_format, AccessLogFormat::Text);
        assert_eq!(cli.run.max_telemetry_series, 7);
        let defaults = Cli::try_parse_from(["kmesh-agent"]).unwrap();
        assert_eq!(defaults.run.access_log_format, AccessLogFormat::Json);
        assert_eq!(defaults.run.max_telemetry_series, DEFAULT_MAX_SERIES);
        assert!(Cli::try_parse_from(["kmesh-agent", "--access-log-format=xml"]).is_err());
    }

    /// The events flags reach the run arguments; by default the ring has its default size and the
    /// agent reads it.
    #[test]
    fn events_flags() {
        let cli = Cli::try_parse_from([
            "kmesh-agent",
            "--events-ring-bytes=4096",
            "--no-events-reader",
        ])
        .unwrap();
        assert_eq!(cli.run.events_ring_bytes, 4096);
        assert!(cli.run.no_events_reader);
        let defaults = Cli::try_parse_from(["kmesh-agent"]).unwrap();
        assert_eq!(
            defaults.run.events_ring_bytes,
            kmesh_common::events::DEFAULT_EVENTS_RING_BYTES
        );
        assert!(!defaults.run.no_events_reader);
    }
}
