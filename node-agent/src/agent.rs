//! The agent: install or adopt the programs, then apply every snapshot the source delivers and
//! keep enrolment in step with the node's namespaces.
//!
//! Map writes happen on one thread (the data plane thread), so there is no locking around them:
//! sources hand it bytes over a channel, and it reports what it did in [`Status`].
use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    time::{Duration, SystemTime},
};

use kmesh_common::WorkloadRecord;
use kmesh_snapshot::{DecodeError, Limits, Snapshot};
use tracing::{error, info, warn};

use crate::{
    admin,
    enrol::{EnrolError, Enroller},
    loader::{self, AttachedLink, LoaderError},
    maps::{ApplyStats, CounterMap, Counters, EnrolledMap, GenerationMaps, MapsError},
    source::{self, Source},
};

/// How often namespaces are rescanned (the issue allows 2 s to pick up a change).
const ENROL_INTERVAL: Duration = Duration::from_secs(1);

pub struct Config {
    pub node_name: String,
    pub source: Source,
    pub bpffs_dir: PathBuf,
    pub cgroup: PathBuf,
    pub admin_addr: SocketAddr,
    pub limits: Limits,
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
    #[error("starting the data plane thread: {0}")]
    Thread(std::io::Error),
}

/// Counts of a snapshot's tables.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Counts {
    pub services: usize,
    pub routes: usize,
    pub backend_sets: usize,
    pub endpoints: usize,
    pub workloads: usize,
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
    /// True when the snapshot did not fit this node's capacity.
    pub over_capacity: bool,
    pub reason: String,
}

/// What `/debug/snapshot` shows.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Status {
    pub node_name: String,
    pub ready: bool,
    /// The programs were found attached and pinned at start; nothing was re-attached.
    pub adopted_pins: bool,
    pub links: Vec<AttachedLink>,
    pub live: Option<LiveSnapshot>,
    pub applied: u64,
    pub unchanged: u64,
    pub rejected: u64,
    pub last_apply: Option<ApplyStats>,
    pub last_rejection: Option<Rejection>,
    pub enrolled_netns: usize,
    pub counters: Option<Counters>,
    /// The last [`RECENT_FLIPS`] flips, oldest first: which generation went live when.
    pub recent_flips: std::collections::VecDeque<Flip>,
}

/// How many flips `Status::recent_flips` keeps.
pub const RECENT_FLIPS: usize = 256;

/// One flip of `KM_ACTIVE`: `generation` went live between the two CLOCK_MONOTONIC times (ns).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Flip {
    pub generation: u64,
    pub between_ns: [u64; 2],
}

pub type SharedStatus = Arc<Mutex<Status>>;

fn update(status: &SharedStatus, f: impl FnOnce(&mut Status)) {
    // A poisoned lock means a panic elsewhere; the status is still the best we have.
    let mut guard = status.lock().unwrap_or_else(|p| p.into_inner());
    f(&mut guard);
}

/// Runs the agent until SIGINT or SIGTERM. Pins stay in place on exit: traffic keeps flowing.
pub async fn run(config: Config) -> Result<(), AgentError> {
    let installation = loader::install_or_adopt(&config.bpffs_dir, &config.cgroup)?;
    info!(
        dir = %installation.dir.display(),
        adopted = installation.adopted,
        links = ?installation.links,
        "programs ready"
    );
    let maps = GenerationMaps::open(&installation)?;
    let enroller = Enroller::new(EnrolledMap::open(&installation)?);
    let counters = Arc::new(CounterMap::open(&installation)?);

    let status: SharedStatus = Arc::new(Mutex::new(Status {
        node_name: config.node_name.clone(),
        adopted_pins: installation.adopted,
        links: installation.links.clone(),
        ..Default::default()
    }));
    if let Some(live) = maps.live()? {
        info!(
            generation = live.value.meta.generation,
            slot = live.slot,
            "found a live generation in the pins"
        );
        update(&status, |s| {
            s.live = Some(LiveSnapshot {
                generation: live.value.meta.generation,
                content_hash: format!("{:016x}", live.value.meta.content_hash),
                slot: live.slot,
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
    tokio::spawn(admin::serve(listener, status.clone(), counters));

    let live_generation = Arc::new(AtomicU64::new(
        maps.live()?.map_or(0, |l| l.value.meta.generation),
    ));
    let (tx, rx) = mpsc::channel();
    tokio::spawn(source::run(
        config.source.clone(),
        config.node_name.clone(),
        config.limits.max_bytes,
        live_generation.clone(),
        tx,
    ));
    let data_plane = DataPlane {
        node_name: config.node_name,
        limits: config.limits,
        maps,
        enroller,
        workloads: None,
        status,
        live_generation,
    };
    std::thread::Builder::new()
        .name("data-plane".into())
        .spawn(move || data_plane.run(rx))
        .map_err(AgentError::Thread)?;

    shutdown_signal().await;
    info!("shutting down; programs stay attached through their pinned links");
    Ok(())
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

/// Owns the maps; the only writer.
struct DataPlane {
    node_name: String,
    limits: Limits,
    maps: GenerationMaps,
    enroller: Enroller,
    /// The live snapshot's workloads; `None` until a snapshot arrives, so that a restarted agent
    /// does not empty the enrolled map before it knows what should be in it.
    workloads: Option<Vec<WorkloadRecord>>,
    status: SharedStatus,
    /// The live generation, reported to the operator by the source.
    live_generation: Arc<AtomicU64>,
}

impl DataPlane {
    fn run(mut self, rx: mpsc::Receiver<Vec<u8>>) {
        loop {
            match rx.recv_timeout(ENROL_INTERVAL) {
                Ok(bytes) => self.on_snapshot(&bytes),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
            self.enrol();
        }
    }

    fn on_snapshot(&mut self, bytes: &[u8]) {
        let decoded = match Snapshot::decode(bytes, &self.limits) {
            Ok(d) => d,
            Err(e) => {
                return self.reject(
                    kmesh_snapshot::peek_header(bytes)
                        .ok()
                        .map(|h| h.generation),
                    &e,
                );
            }
        };
        let snapshot = decoded.snapshot;
        if snapshot.node_name != self.node_name {
            let reason = format!(
                "snapshot is for node {:?}, this agent serves node {:?}",
                snapshot.node_name, self.node_name
            );
            return self.reject_reason(Some(snapshot.generation), false, reason);
        }
        let counts = Counts {
            services: snapshot.services.len(),
            routes: snapshot.routes.len(),
            backend_sets: snapshot.backend_sets.len(),
            endpoints: snapshot.endpoints.len(),
            workloads: snapshot.workloads.len(),
        };
        let live = match self.maps.live() {
            Ok(live) => live,
            Err(e) => return self.reject_reason(Some(snapshot.generation), false, e.to_string()),
        };
        let unchanged = live.is_some_and(|l| {
            l.value.meta.generation == snapshot.generation
                && l.value.meta.content_hash == decoded.content_hash
        });
        let hash = format!("{:016x}", decoded.content_hash);
        let slot = if unchanged {
            info!(
                generation = snapshot.generation,
                hash, "live generation already matches; nothing to change"
            );
            update(&self.status, |s| s.unchanged += 1);
            live.map(|l| l.slot).unwrap_or(0)
        } else {
            match self.maps.apply(&snapshot, decoded.content_hash) {
                Ok(stats) => {
                    info!(
                        generation = snapshot.generation,
                        hash,
                        slot = stats.slot,
                        services = counts.services,
                        endpoints = counts.endpoints,
                        fill_us = stats.fill_micros,
                        flip_us = stats.flip_micros,
                        "snapshot applied"
                    );
                    let slot = stats.slot;
                    update(&self.status, |s| {
                        s.applied += 1;
                        if s.recent_flips.len() == RECENT_FLIPS {
                            s.recent_flips.pop_front();
                        }
                        s.recent_flips.push_back(Flip {
                            generation: snapshot.generation,
                            between_ns: stats.flipped_between_ns,
                        });
                        s.last_apply = Some(stats);
                    });
                    slot
                }
                // Nothing was flipped: the live generation is untouched.
                Err(e) => {
                    return self.reject_reason(Some(snapshot.generation), false, e.to_string());
                }
            }
        };
        self.live_generation
            .store(snapshot.generation, Ordering::Relaxed);
        update(&self.status, |s| {
            s.ready = true;
            s.live = Some(LiveSnapshot {
                generation: snapshot.generation,
                content_hash: hash,
                slot,
                mode: snapshot.config.mode,
                counts: Some(counts),
            });
        });
        self.workloads = Some(snapshot.workloads);
    }

    fn reject(&mut self, generation: Option<u64>, e: &DecodeError) {
        let over_capacity = matches!(e, DecodeError::OverCapacity { .. });
        self.reject_reason(generation, over_capacity, e.to_string());
    }

    fn reject_reason(&mut self, generation: Option<u64>, over_capacity: bool, reason: String) {
        error!(
            generation,
            over_capacity, reason, "snapshot refused; the live generation stays in force"
        );
        let at_unix_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        update(&self.status, |s| {
            s.rejected += 1;
            s.last_rejection = Some(Rejection {
                at_unix_ms,
                generation,
                over_capacity,
                reason,
            });
        });
    }

    fn enrol(&mut self) {
        let Some(workloads) = &self.workloads else {
            return;
        };
        match self.enroller.sync(workloads) {
            Ok(stats) => update(&self.status, |s| s.enrolled_netns = stats.enrolled),
            Err(EnrolError::Scan(e)) => warn!(error = %e, "namespace scan failed; will retry"),
            Err(e) => error!(error = %e, "updating the enrolled map failed; will retry"),
        }
    }
}
