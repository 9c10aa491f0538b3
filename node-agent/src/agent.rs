//! The agent: install, adopt or upgrade the programs, start the admin server, the snapshot source
//! and the data-plane thread, and run until a signal — or until the data plane stops, which is an
//! error. On SIGTERM it keeps the pins (a restart or an upgrade must not interrupt traffic) unless
//! the operator says the node's agents are being removed (`source::ask_on_shutdown`): then it
//! uninstalls before it exits.
//!
//! Map writes happen on one thread (the data plane, `data_plane.rs`), so there is no locking around
//! them: sources hand it bytes over a channel, it reports what it did in [`Status`] and the live
//! generation over a watch channel (which the operator source reports upstream at once).
use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use kmesh_common::NodeConfig;
use kmesh_snapshot::{Limits, Table};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::{
    admin,
    authz_counters::{AuthzCounterMap, PolicyNames},
    data_plane::{Applier, DataPlane},
    enrol::Enroller,
    events::{self, EventMetrics, EventReader},
    host_addrs::{HostAddrMap, HostNetns},
    kernel_maps::KernelSlots,
    lifecycle::{Lifecycle, Uninstalled, Upgrade, UpgradeState},
    loader::{self, AttachedLink, BpfObject, LoadOptions, LoaderError},
    maps::{ApplyStats, CounterMap, Counters, EnrolledMap, GenerationMaps, MapsError},
    metrics::{self, ApplyDurations},
    refusal::RefusalKind,
    slots::SlotMaps as _,
    source::{self, Delivery, ShutdownVerdict, Source},
    supervise::{self, ThreadExit},
    telemetry::{self, LiveNames, Recorder, Telemetry, TelemetrySettings},
};

pub struct Config {
    pub node_name: String,
    pub source: Source,
    pub bpffs_dir: PathBuf,
    pub cgroup: PathBuf,
    pub admin_addr: SocketAddr,
    /// Where the Prometheus metrics are served (`--metrics-addr`).
    pub metrics_addr: SocketAddr,
    pub limits: Limits,
    /// The eBPF object to load: the shipped one, or the upgrade tests' variant of another layout
    /// (hidden flag `--test-layout-variant`).
    pub object: BpfObject,
    /// Test hook: the data-plane thread panics on receiving this many snapshots, so that tests can
    /// check the supervision of the real binary (hidden flag `--test-panic-at-snapshot`).
    pub test_panic_at_snapshot: Option<u64>,
    /// Where the node's own addresses are read (`--host-netns`).
    pub host_netns: HostNetns,
    /// The access-log format and the cap on Istio metric label sets.
    pub telemetry: TelemetrySettings,
    /// What a load of the programs may set (`--events-ring-bytes`).
    pub load: LoadOptions,
    /// Whether this agent reads the connection events ring (`--no-events-reader` turns it off, for
    /// tests that read the ring themselves).
    pub events_reader: bool,
}

#[derive(thiserror::Error, Debug)]
pub enum AgentError {
    #[error(transparent)]
    Loader(#[from] LoaderError),
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error("admin server on {addr}: {source}")]
    Admin {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("metrics server on {addr}: {source}")]
    Metrics {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("starting the data plane thread: {0}")]
    Thread(std::io::Error),
    #[error(
        "the data plane thread stopped ({0}); exiting so that the agent is restarted (the programs stay attached)"
    )]
    DataPlaneStopped(ThreadExit),
}

/// Counts of a snapshot's tables (each field named as [`Table::label`] names its table).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Counts {
    pub services: usize,
    pub routes: usize,
    pub backend_sets: usize,
    pub endpoints: usize,
    pub workloads: usize,
    /// Workload addresses bound by authorization policy on this node.
    pub authz_workloads: usize,
    pub authz_sources: usize,
    pub authz_verdicts: usize,
    pub authz_policies: usize,
}

impl Counts {
    /// The records of `table`; `None` for the node config.
    pub fn of(&self, table: Table) -> Option<usize> {
        match table {
            Table::NodeConfig => None,
            Table::Services => Some(self.services),
            Table::Routes => Some(self.routes),
            Table::BackendSets => Some(self.backend_sets),
            Table::Endpoints => Some(self.endpoints),
            Table::Workloads => Some(self.workloads),
            Table::AuthzWorkloads => Some(self.authz_workloads),
            Table::AuthzSources => Some(self.authz_sources),
            Table::AuthzVerdicts => Some(self.authz_verdicts),
            Table::AuthzPolicies => Some(self.authz_policies),
            // The names sections are user space only: not in a map.
            Table::NameStrings | Table::WorkloadNames | Table::ServiceNames => None,
        }
    }
}

/// The generation the programs use.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct LiveSnapshot {
    pub generation: u64,
    /// Hex, as logged.
    pub content_hash: String,
    pub slot: u32,
    pub mode: u32,
    /// Unknown after a restart until the source delivers the same snapshot again.
    pub counts: Option<Counts>,
}

/// A snapshot the agent refused; the live one stayed in force.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Rejection {
    pub at_unix_ms: u64,
    pub generation: Option<u64>,
    pub kind: RefusalKind,
    /// `kind == over_capacity` (kept for readers of the earlier shape).
    pub over_capacity: bool,
    /// The refusal's message, with its cause.
    pub reason: String,
}

/// Whether the data-plane thread runs.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum DataPlaneState {
    #[default]
    Running,
    Stopped {
        reason: String,
    },
}

/// What `/debug/snapshot` shows.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Status {
    pub node_name: String,
    /// A snapshot has been applied or confirmed live.
    pub ready: bool,
    pub data_plane: DataPlaneState,
    /// The programs were found attached and pinned at start; nothing was re-attached.
    pub adopted_pins: bool,
    /// This agent's layout (its pin directory below `--bpffs-dir`).
    pub layout: String,
    pub links: Vec<AttachedLink>,
    /// An upgrade from another layout's pins, if this agent found some.
    pub upgrade: Option<Upgrade>,
    /// Set once the agent uninstalled (the operator said this node's agents are being removed).
    pub uninstalled: Option<Uninstalled>,
    pub live: Option<LiveSnapshot>,
    pub applied: u64,
    pub unchanged: u64,
    pub rejected: u64,
    /// `rejected` by kind.
    pub refused_by_kind: std::collections::BTreeMap<RefusalKind, u64>,
    /// Fill and flip time of every applied generation (for the metrics).
    #[serde(skip)]
    pub apply_durations: ApplyDurations,
    pub last_apply: Option<ApplyStats>,
    pub last_rejection: Option<Rejection>,
    pub enrolled_netns: usize,
    /// Enrolled namespaces with the authorization program attached (a pinned link each).
    pub authz_links: usize,
    /// Entries of the host addresses map (the node's own addresses, exempt from authorization).
    pub host_addrs: usize,
    /// Why the host addresses map could not be updated in the last enrolment sync.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_addrs_error: Option<String>,
    /// Established connections closed because a new generation denies them.
    pub closed_connections: u64,
    pub counters: Option<Counters>,
    /// The last [`RECENT_FLIPS`] flips, oldest first: which generation went live when.
    pub recent_flips: std::collections::VecDeque<Flip>,
    /// The names of the live snapshot's authorization policies (for `/debug/authz`).
    #[serde(skip)]
    pub authz_policies: Arc<PolicyNames>,
    /// Istio's TCP metrics and the access log, from finished connections (rendered with the
    /// metrics; recorded by the event reader through [`Telemetry::record`]).
    #[serde(skip)]
    pub telemetry: Telemetry,
    /// The live snapshot's names, which label those connections: set whole when a generation
    /// goes live. The event reader's sink is `telemetry::Recorder { telemetry, names }`.
    #[serde(skip)]
    pub live_names: LiveNames,
    /// The live snapshot as decoded (`/debug/config_dump`), set under the same lock as `live`;
    /// `None` until a snapshot is applied or confirmed live since the agent started.
    #[serde(skip)]
    pub live_snapshot: Option<Arc<kmesh_snapshot::Decoded>>,
}

/// How many flips `Status::recent_flips` keeps.
pub const RECENT_FLIPS: usize = 256;

/// One flip of `KM_ACTIVE`: `generation` went live between the two CLOCK_MONOTONIC times (ns).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Flip {
    pub generation: u64,
    pub between_ns: [u64; 2],
}

impl Status {
    /// What `/readyz` answers: a snapshot is live, the links run this agent's programs, and the
    /// data plane still runs to follow changes.
    pub fn is_ready(&self) -> bool {
        self.ready
            && self.data_plane == DataPlaneState::Running
            && !self.upgrade_pending()
            && self.uninstalled.is_none()
    }

    /// The links still run another layout's programs.
    pub fn upgrade_pending(&self) -> bool {
        self.upgrade
            .as_ref()
            .is_some_and(|u| matches!(u.state, UpgradeState::WaitingForSnapshot { .. }))
    }
}

pub type SharedStatus = Arc<Mutex<Status>>;

pub(crate) fn update(status: &SharedStatus, f: impl FnOnce(&mut Status)) {
    // A poisoned lock means a panic elsewhere; the status is still the best we have.
    let mut guard = status.lock().unwrap_or_else(|p| p.into_inner());
    f(&mut guard);
}

/// Runs the agent until SIGINT or SIGTERM. Pins stay in place on exit, so that traffic keeps
/// flowing, unless the operator says the node's agents are being removed.
pub async fn run(config: Config) -> Result<(), AgentError> {
    let mut installation = loader::install_or_adopt_with(
        &config.bpffs_dir,
        &config.cgroup,
        config.object,
        config.load,
    )?;
    info!(
        dir = %installation.dir.display(),
        layout = %installation.layout,
        adopted = installation.adopted,
        upgrading = installation.switch.is_some(),
        links = ?installation.links,
        "programs ready"
    );
    let maps = GenerationMaps::open(&installation)?;
    let enroller = Enroller::new(
        EnrolledMap::open(&installation)?,
        installation.netns_links(),
        HostAddrMap::open(&installation)?,
        config.host_netns.clone(),
    );
    let counters = Arc::new(CounterMap::open(&installation)?);
    let authz_counters = Arc::new(AuthzCounterMap::open(&installation)?);
    // Finished connections are reported here: `telemetry.record(&connection, &names)`.
    let telemetry = Telemetry::new(config.telemetry);
    let live_config = KernelSlots::open(&installation)?;
    // The names connections are labelled with: the data plane sets the live snapshot's.
    let live_names = LiveNames::default();
    let recorder = Recorder {
        telemetry: telemetry.clone(),
        names: live_names.clone(),
    };
    let stop_events = Arc::new(AtomicBool::new(false));
    let events = start_events(
        &installation,
        config.events_reader,
        stop_events.clone(),
        recorder,
    )?;

    let status: SharedStatus = Arc::new(Mutex::new(Status {
        node_name: config.node_name.clone(),
        adopted_pins: installation.adopted,
        layout: installation.layout.to_string(),
        links: installation.links.clone(),
        telemetry: telemetry.clone(),
        live_names,
        ..Default::default()
    }));
    let lifecycle = Lifecycle::new(
        installation.dir.clone(),
        installation.switch.take(),
        status.clone(),
    );
    let live = maps.live()?;
    if let Some(live) = live {
        info!(
            generation = live.value.meta.generation,
            slot = %live.slot,
            "found a live generation in the pins"
        );
        update(&status, |s| {
            s.live = Some(LiveSnapshot {
                generation: live.value.meta.generation,
                content_hash: format!("{:016x}", live.value.meta.content_hash),
                slot: live.slot.index(),
                mode: live.value.config.mode,
                counts: None,
            })
        });
    }

    let listener = tokio::net::TcpListener::bind(config.admin_addr)
        .await
        .map_err(|source| AgentError::Admin {
            addr: config.admin_addr,
            source,
        })?;
    let maps_read = admin::Maps {
        counters,
        authz_counters,
        slots: Arc::new(crate::maps::KernelSlots::open(&installation)?),
    };
    let metrics_listener = tokio::net::TcpListener::bind(config.metrics_addr)
        .await
        .map_err(|source| AgentError::Metrics {
            addr: config.metrics_addr,
            source,
        })?;
    tokio::spawn(admin::serve(listener, status.clone(), maps_read.clone()));
    tokio::spawn(metrics::serve(
        metrics_listener,
        status.clone(),
        maps_read,
        config.limits,
        Some(events),
    ));

    let (live_tx, live_rx) = watch::channel(live.map_or(0, |l| l.value.meta.generation));
    tokio::spawn(telemetry::follow_live_config(
        live_rx.clone(),
        move || read_live_config(&live_config),
        telemetry,
    ));
    let (held_tx, held_rx) = watch::channel(source::Held::default());
    let (tx, rx) = mpsc::channel();
    tokio::spawn(source::run(
        config.source.clone(),
        config.node_name.clone(),
        config.limits.max_bytes,
        live_rx,
        held_rx,
        tx.clone(),
    ));
    let applier = Applier::new(
        config.node_name.clone(),
        config.limits,
        maps,
        status.clone(),
        live_tx,
    )
    .with_held(held_tx);
    let data_plane = DataPlane::new(applier, enroller, lifecycle, status.clone())
        .with_test_panic_at_snapshot(config.test_panic_at_snapshot);
    let data_plane = supervise::spawn("data-plane", status.clone(), move || data_plane.run(rx))
        .map_err(AgentError::Thread)?;

    tokio::select! {
        () = shutdown_signal() => {
            stop_events.store(true, Ordering::Relaxed);
            shut_down(&config, &status, &tx).await;
            Ok(())
        }
        exit = data_plane.exited() => {
            error!(%exit, "the data plane thread stopped; exiting");
            Err(AgentError::DataPlaneStopped(exit))
        }
    }
}

/// The node config of the generation the kernel programs use (`None` before any is live).
fn read_live_config(slots: &KernelSlots) -> Result<Option<NodeConfig>, MapsError> {
    let slot = slots.active_slot()?;
    Ok(slots.generation_in(slot)?.map(|value| value.config))
}

/// Opens the connection events' counters and, when `read`, starts the ring-buffer reader thread,
/// which hands every finished connection to telemetry through `recorder` (they are counted
/// either way).
fn start_events(
    installation: &loader::Installation,
    read: bool,
    stop: Arc<AtomicBool>,
    recorder: Recorder,
) -> Result<EventMetrics, AgentError> {
    let dropped = Arc::new(events::DroppedCounter::open(installation)?);
    if !read {
        info!("not reading the connection events (--no-events-reader)");
        return Ok(EventMetrics {
            stats: None,
            dropped,
        });
    }
    let reader = EventReader::open(installation)?;
    let stats = reader.stats();
    reader.spawn(recorder, stop).map_err(AgentError::Thread)?;
    Ok(EventMetrics {
        stats: Some(stats),
        dropped,
    })
}

/// How long a stopping agent waits for the data plane to finish an uninstall.
const UNINSTALL_WAIT: Duration = Duration::from_secs(3);

/// On SIGTERM: keep the pins, unless the operator says this node's agents are being removed; then
/// have the data plane (the only writer of pins) uninstall, and wait for it.
async fn shut_down(config: &Config, status: &SharedStatus, tx: &mpsc::Sender<Delivery>) {
    let uninstalled = || {
        status
            .lock()
            .map(|s| s.uninstalled.is_some())
            .unwrap_or(false)
    };
    if uninstalled() {
        info!("shutting down; already uninstalled");
        return;
    }
    let verdict =
        source::ask_on_shutdown(&config.source, &config.node_name, config.limits.max_bytes).await;
    match verdict {
        ShutdownVerdict::Keep { why } => {
            info!(%why, "shutting down; programs stay attached through their pinned links");
        }
        ShutdownVerdict::Uninstall => {
            warn!(
                "shutting down: the operator says this node's agents are being removed; uninstalling"
            );
            let _ = tx.send(Delivery::Uninstall);
            let asked = Instant::now();
            while !uninstalled() && asked.elapsed() < UNINSTALL_WAIT {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if !uninstalled() {
                error!(waited = ?UNINSTALL_WAIT, "the data plane did not uninstall in time; pins may remain (kmesh-agent uninstall removes them)");
            }
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            warn!(error = %e, "cannot listen for SIGTERM; waiting for SIGINT only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
