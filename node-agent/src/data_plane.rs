//! The data plane thread: the only writer of the maps. [`Applier`] decides what a snapshot's bytes
//! do — refused, unchanged, or applied — and records it in the status and the live-generation
//! channel; it is generic over the slot operations so that this decision is unit tested with the
//! fake slots. [`DataPlane`] runs it on every snapshot the source delivers, keeps enrolment in
//! step with the node's namespaces between snapshots, and drives the pins' lifecycle
//! (`lifecycle.rs`: an upgrade's link switch, the uninstall).
use std::{
    sync::{Arc, mpsc},
    time::{Duration, SystemTime},
};

use kmesh_common::WorkloadRecord;
use kmesh_snapshot::delta_format::{Delta, is_delta};
use kmesh_snapshot::{AuthzTables, Decoded, Limits, Snapshot};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::{
    agent::{Counts, Flip, LiveSnapshot, RECENT_FLIPS, Rejection, SharedStatus, update},
    authz_counters::policy_names,
    enrol::{EnrolError, Enroller},
    lifecycle::Lifecycle,
    maps::{ApplyStats, GenerationMaps, KernelSlots, Slot, SlotMaps},
    refusal::{DeltaRefusal, Refusal, RefusalKind},
    source::{Delivery, Held},
};

/// How often namespaces are rescanned (the issue allows 2 s to pick up a change).
const ENROL_INTERVAL: Duration = Duration::from_secs(1);

/// What became of one snapshot.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Not made live; the live generation stays. The reason is in the status and the log.
    Refused(RefusalKind),
    /// Generation and content hash already live: nothing written.
    Unchanged,
    /// Swapped in; now live in `slot`.
    Applied { slot: Slot },
}

/// A snapshot that passed every check, and what making it live took.
struct Accepted {
    snapshot: Snapshot,
    content_hash: u64,
    format: kmesh_snapshot::Format,
    cluster_hashes: Option<kmesh_snapshot::ClusterHashes>,
    change: Change,
}

enum Change {
    Unchanged { slot: Slot },
    Applied(ApplyStats),
}

/// A refused snapshot, with its generation when the header could be read.
struct Refused {
    generation: Option<u64>,
    refusal: Refusal,
}

/// Turns snapshot bytes into the live generation, or a refusal.
pub struct Applier<M: SlotMaps = KernelSlots> {
    node_name: String,
    limits: Limits,
    maps: GenerationMaps<M>,
    status: SharedStatus,
    /// The live generation, reported to the operator by the source.
    live: watch::Sender<u64>,
    /// The live snapshot (shared with the admin server through the status); `None` until a
    /// snapshot arrives, so that a restarted agent does not empty the enrolled map before it knows
    /// what should be in it. Its mode and authorization tables judge established connections, and
    /// deltas apply to it.
    live_snapshot: Option<Arc<Decoded>>,
    /// What the source asks deltas from (see [`Held`]); `None`: nobody asks.
    held: Option<watch::Sender<Held>>,
}

impl<M: SlotMaps> Applier<M> {
    pub fn new(
        node_name: String,
        limits: Limits,
        maps: GenerationMaps<M>,
        status: SharedStatus,
        live: watch::Sender<u64>,
    ) -> Self {
        Self {
            node_name,
            limits,
            maps,
            status,
            live,
            live_snapshot: None,
            held: None,
        }
    }

    /// Reports what the live snapshot is to `held`, for the operator source's deltas.
    pub fn with_held(mut self, held: watch::Sender<Held>) -> Self {
        self.held = Some(held);
        self
    }

    /// The mode and authorization tables of the snapshot last made or confirmed live.
    pub fn authz(&self) -> Option<(u32, &AuthzTables)> {
        self.live_snapshot
            .as_ref()
            .map(|d| (d.snapshot.config.mode, &d.snapshot.authz))
    }

    /// The workloads of the snapshot last made or confirmed live.
    pub fn workloads(&self) -> Option<&[WorkloadRecord]> {
        self.live_snapshot
            .as_ref()
            .map(|d| d.snapshot.workloads.as_slice())
    }

    /// Decodes, checks and applies `bytes` (a snapshot, or a delta from the live one), and
    /// records the outcome.
    pub fn on_snapshot(&mut self, bytes: &[u8]) -> Outcome {
        let decoded = self.decode(bytes);
        self.on_decoded(decoded)
    }

    /// [`on_snapshot`](Self::on_snapshot), freeing `bytes` once decoded: the apply needs only the
    /// decoded tables, and at 100,000 services the bytes are another 50 MB at the agent's peak.
    pub fn on_snapshot_owned(&mut self, bytes: Vec<u8>) -> Outcome {
        let decoded = self.decode(&bytes);
        drop(bytes);
        self.on_decoded(decoded)
    }

    fn on_decoded(&mut self, decoded: Result<Decoded, Box<Refused>>) -> Outcome {
        match decoded.and_then(|decoded| self.accept(decoded)) {
            Ok(accepted) => self.record(accepted),
            Err(refused) => self.refuse(*refused),
        }
    }

    fn decode(&self, bytes: &[u8]) -> Result<Decoded, Box<Refused>> {
        if is_delta(bytes) {
            return self.apply_delta(bytes);
        }
        Snapshot::decode(bytes, &self.limits).map_err(|e| {
            Box::new(Refused {
                generation: kmesh_snapshot::peek_header(bytes)
                    .ok()
                    .map(|h| h.generation),
                refusal: e.into(),
            })
        })
    }

    /// The snapshot a delta makes of the live one: read, applied and checked as a snapshot is
    /// (`kmesh_snapshot::delta_format`), before anything reaches the kernel.
    fn apply_delta(&self, bytes: &[u8]) -> Result<Decoded, Box<Refused>> {
        let refused = |generation, refusal| {
            Box::new(Refused {
                generation,
                refusal: Refusal::Delta(refusal),
            })
        };
        let delta = Delta::decode(bytes, &self.limits)
            .map_err(|e| refused(None, DeltaRefusal::Undecodable(e)))?;
        let generation = Some(delta.generation);
        let Some(base) = &self.live_snapshot else {
            return Err(refused(generation, DeltaRefusal::NoBase));
        };
        delta
            .apply(base, &self.limits)
            .map_err(|e| refused(generation, DeltaRefusal::DoesNotApply(e)))
    }

    fn accept(&mut self, decoded: Decoded) -> Result<Accepted, Box<Refused>> {
        let snapshot = decoded.snapshot;
        let refused = |refusal| {
            Box::new(Refused {
                generation: Some(snapshot.generation),
                refusal,
            })
        };
        if snapshot.node_name != self.node_name {
            return Err(refused(Refusal::OtherNode {
                snapshot_node: snapshot.node_name.clone(),
                agent_node: self.node_name.clone(),
            }));
        }
        let live = self
            .maps
            .live()
            .map_err(|e| refused(Refusal::LiveUnreadable(e)))?;
        let change = match live {
            Some(live)
                if live.value.meta.generation == snapshot.generation
                    && live.value.meta.content_hash == decoded.content_hash =>
            {
                Change::Unchanged { slot: live.slot }
            }
            _ => Change::Applied(
                self.maps
                    .apply(
                        &snapshot,
                        decoded.content_hash,
                        self.live_snapshot.as_deref().map(|d| &d.snapshot),
                    )
                    .map_err(|e| refused(Refusal::ApplyFailed(e)))?,
            ),
        };
        Ok(Accepted {
            snapshot,
            content_hash: decoded.content_hash,
            format: decoded.format,
            cluster_hashes: decoded.cluster_hashes,
            change,
        })
    }

    fn record(&mut self, accepted: Accepted) -> Outcome {
        let Accepted {
            snapshot,
            content_hash,
            format,
            cluster_hashes,
            change,
        } = accepted;
        let counts = Counts {
            services: snapshot.services.len(),
            routes: snapshot.routes.len(),
            backend_sets: snapshot.backend_sets.len(),
            endpoints: snapshot.endpoints.len(),
            workloads: snapshot.workloads.len(),
            authz_workloads: snapshot.authz.workloads.len(),
            authz_sources: snapshot.authz.sources.len(),
            authz_verdicts: snapshot.authz.verdicts.len(),
            authz_policies: snapshot.authz.policies.len(),
        };
        let hash = format!("{content_hash:016x}");
        let (slot, outcome) = match change {
            Change::Unchanged { slot } => {
                info!(
                    generation = snapshot.generation,
                    hash, "live generation already matches; nothing to change"
                );
                update(&self.status, |s| s.unchanged += 1);
                (slot, Outcome::Unchanged)
            }
            Change::Applied(stats) => {
                info!(
                    generation = snapshot.generation,
                    hash,
                    slot = %stats.slot,
                    services = counts.services,
                    endpoints = counts.endpoints,
                    fill_us = stats.fill_micros,
                    flip_us = stats.flip_micros,
                    "snapshot applied"
                );
                let slot = stats.slot;
                update(&self.status, |s| {
                    s.applied += 1;
                    s.apply_durations
                        .observe_micros(stats.fill_micros + stats.flip_micros);
                    if s.recent_flips.len() == RECENT_FLIPS {
                        s.recent_flips.pop_front();
                    }
                    s.recent_flips.push_back(Flip {
                        generation: snapshot.generation,
                        between_ns: stats.flipped_between_ns,
                    });
                    s.last_apply = Some(stats);
                });
                (slot, Outcome::Applied { slot })
            }
        };
        let generation = snapshot.generation;
        let decoded = Arc::new(Decoded {
            snapshot,
            content_hash,
            format,
            cluster_hashes,
        });
        let snapshot = &decoded.snapshot;
        // Indexed before the status lock is taken: readers never wait for it.
        let lookup = Arc::new(crate::names::SnapshotLookup::new(decoded.clone()));
        update(&self.status, |s| {
            s.ready = true;
            s.live_snapshot = Some(decoded.clone());
            // Connections finished from now on are labelled with this generation's names.
            s.live_names.set(lookup);
            // Names are kept from every generation seen since start: a policy's id is the hash of
            // its kind, namespace and name (the same in every generation), and the kernel's
            // counters of a policy that left the snapshot stay, so they keep their name.
            let mut policies = (*s.authz_policies).clone();
            policies.extend(policy_names(&snapshot.authz.policies));
            s.authz_policies = std::sync::Arc::new(policies);
            s.live = Some(LiveSnapshot {
                generation: snapshot.generation,
                content_hash: hash,
                slot: slot.index(),
                mode: snapshot.config.mode,
                counts: Some(counts),
            });
        });
        // What the source asks deltas from, set before the live generation wakes it: it reads
        // this when it asks again.
        if let Some(held) = &self.held {
            let cluster_hash = decoded.cluster_hashes.map(|h| h.cluster_hash());
            held.send_if_modified(|h| {
                let changed = h.cluster_hash != cluster_hash;
                h.cluster_hash = cluster_hash;
                changed
            });
        }
        // Wakes the operator source only when the generation changed (it re-polls to report it).
        self.live.send_if_modified(|live| {
            let changed = *live != generation;
            *live = generation;
            changed
        });
        let previous_level = self
            .live_snapshot
            .as_ref()
            .map(|d| d.snapshot.config.log_level);
        crate::admin::log_level::on_live_generation(
            previous_level,
            decoded.snapshot.config.log_level,
        );
        self.live_snapshot = Some(decoded);
        outcome
    }

    fn refuse(&mut self, refused: Refused) -> Outcome {
        let Refused {
            generation,
            refusal,
        } = refused;
        let kind = refusal.kind();
        let reason = refusal.to_string();
        if kind == RefusalKind::Delta
            && let Some(held) = &self.held
        {
            // The source asks for the whole snapshot next.
            held.send_modify(|h| h.deltas_refused += 1);
        }
        error!(
            generation,
            ?kind,
            reason,
            "snapshot refused; the live generation stays in force"
        );
        let at_unix_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        update(&self.status, |s| {
            s.rejected += 1;
            *s.refused_by_kind.entry(kind).or_default() += 1;
            s.last_rejection = Some(Rejection {
                at_unix_ms,
                generation,
                kind,
                over_capacity: kind == RefusalKind::OverCapacity,
                reason,
            });
        });
        Outcome::Refused(kind)
    }
}

/// The data-plane thread's state: the applier, the enroller and the pins' lifecycle.
pub struct DataPlane {
    applier: Applier<KernelSlots>,
    enroller: Enroller,
    lifecycle: Lifecycle,
    status: SharedStatus,
    snapshots_received: u64,
    test_panic_at_snapshot: Option<u64>,
    /// A generation was applied: its denied established connections are closed after the next
    /// enrolment sync (which knows the namespaces).
    sweep_pending: bool,
}

impl DataPlane {
    pub fn new(
        applier: Applier<KernelSlots>,
        enroller: Enroller,
        lifecycle: Lifecycle,
        status: SharedStatus,
    ) -> Self {
        Self {
            applier,
            enroller,
            lifecycle,
            status,
            snapshots_received: 0,
            test_panic_at_snapshot: None,
            sweep_pending: false,
        }
    }

    /// Test hook (see `agent::Config::test_panic_at_snapshot`).
    pub fn with_test_panic_at_snapshot(mut self, n: Option<u64>) -> Self {
        self.test_panic_at_snapshot = n;
        self
    }

    /// Applies every snapshot from `rx`, and rescans namespaces every [`ENROL_INTERVAL`]; after a
    /// round with a live snapshot and the namespaces synced, finishes a pending upgrade. Returns
    /// when the source is gone (which the supervisor reports as the data plane stopping).
    pub fn run(mut self, rx: mpsc::Receiver<Delivery>) {
        loop {
            match rx.recv_timeout(ENROL_INTERVAL) {
                Ok(Delivery::Snapshot(bytes)) => self.on_snapshot(bytes),
                Ok(Delivery::Uninstall) => self.lifecycle.uninstall(),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    error!("the snapshot source ended");
                    return;
                }
            }
            if !self.lifecycle.uninstalled() && self.enrol() {
                self.lifecycle.on_synced();
                self.close_denied();
            }
        }
    }

    fn on_snapshot(&mut self, bytes: Vec<u8>) {
        self.snapshots_received += 1;
        if self.test_panic_at_snapshot == Some(self.snapshots_received) {
            panic!(
                "test hook: --test-panic-at-snapshot {}",
                self.snapshots_received
            );
        }
        if self.lifecycle.uninstalled() {
            warn!("snapshot ignored: this agent uninstalled; restart it to install again");
            return;
        }
        if let Outcome::Applied { .. } = self.applier.on_snapshot_owned(bytes) {
            self.sweep_pending = true;
        }
    }

    /// After an applied generation: closes the established connections it denies.
    fn close_denied(&mut self) {
        if !std::mem::take(&mut self.sweep_pending) {
            return;
        }
        let Some((node_mode, tables)) = self.applier.authz() else {
            return;
        };
        match self.enroller.close_denied(node_mode, tables) {
            Ok(closed) => {
                if closed.closed > 0 {
                    info!(
                        ?closed,
                        "established connections the new generation denies closed"
                    );
                }
                update(&self.status, |s| {
                    s.closed_connections += closed.closed as u64;
                });
            }
            Err(e) => warn!(error = %e, "closing the connections the new generation denies"),
        }
    }

    /// Syncs the enrolled map with the live snapshot's workloads; true when it is in step.
    fn enrol(&mut self) -> bool {
        let Some(workloads) = self.applier.workloads() else {
            return false;
        };
        match self.enroller.sync(workloads) {
            Ok(stats) => {
                update(&self.status, |s| {
                    s.enrolled_netns = stats.enrolled;
                    s.authz_links = stats.authz_links.attached;
                    s.host_addrs = stats.host_addrs;
                    s.host_addrs_error = stats.host_addrs_error;
                });
                true
            }
            Err(EnrolError::Scan(e)) => {
                warn!(error = %e, "namespace scan failed; will retry");
                false
            }
            Err(e) => {
                error!(error = %e, "updating the enrolled map failed; will retry");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests;
