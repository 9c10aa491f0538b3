//! The per-generation maps and the atomic swap: the protocol, written once over [`SlotMaps`].
//!
//! # Layout
//! Each table (generation header, services, routes, backend sets, endpoints, the authorization
//! tables) is an outer `ARRAY_OF_MAPS` holding, per slot, one inner map per shard: the cluster
//! tables are split by key into `CLUSTER_SHARDS` (`kmesh_common::shard`), the others are one.
//! `KM_ACTIVE[0]` names the slot the programs use. A program reads `KM_ACTIVE` once and then looks
//! up every table in that slot.
//!
//! # Swap
//! Between swaps both slots reference the same inner map in every shard: the kernel holds one copy
//! of the live generation. A swap replaces only the shards whose records change ([`Changes`]):
//! 1. Create fresh inner maps for the changed shards and fill them (nothing reads them yet).
//! 2. Point the idle slot's entries of those shards at them: one batch write per table, the tables
//!    on parallel threads.
//! 3. Flip `KM_ACTIVE[0]` to the idle slot: one 4-byte array write, the only step programs see.
//! 4. Wait for an RCU grace period (see the reuse rule), then point the old slot's entries of the
//!    changed shards at the same new maps: both slots agree again, and the replaced maps are freed.
//!
//! # Invariant
//! A program sees the old generation or the new one, never a mix: every lookup it makes goes
//! through the slot it read in one step, and a slot's maps never change while a program may still
//! be using that slot.
//!
//! # Reuse rule
//! A slot may be written only when no running program can still be using it. After the flip, a
//! program that read the old slot number just before it may still be running (programs run inside
//! an RCU read-side section). So before touching the old slot we wait for a grace period: every
//! update or delete of an `ARRAY_OF_MAPS` entry returns only after `synchronize_rcu()`
//! (`maybe_wait_bpf_programs` in the kernel), so re-writing the live slot's generation entry with
//! the same inner map is our barrier. On startup we do the same barrier once, since an earlier
//! agent may have died right after a flip.
//!
//! # Failures
//! The idle slot equals the live one only after a completed swap. At start (an earlier agent may
//! have died between steps 3 and 4) and after any failed step, it is not known to, and the next
//! swap rebuilds every shard, which makes the slots agree again: correctness never rests on what a
//! failed step or an earlier process left behind. A step that fails before the flip leaves the live
//! generation and the active slot as they were. Once the flip is done the new generation is live
//! whatever follows: a failed barrier or mirror write is reported with the applied generation.
use std::time::Instant;

use kmesh_common::{GenerationValue, SnapshotMeta};
use kmesh_snapshot::Snapshot;
use tracing::warn;

use crate::loader::Installation;
pub use crate::{
    kernel_maps::{CounterMap, Counters, EnrolledMap, KernelSlots},
    slots::{Changes, MapsError, Slot, SlotMaps, SlotTable},
};

/// Sizes and timing of one applied snapshot.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ApplyStats {
    /// The slot now active.
    pub slot: Slot,
    /// Inner maps rebuilt (changed shards, over every table).
    pub maps_rebuilt: usize,
    pub fill_micros: u64,
    pub flip_micros: u64,
    /// Why the old slot was not brought to the new maps after the flip (the new generation is live
    /// all the same); the next apply rebuilds every shard.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub old_slot_kept: Option<String>,
    /// CLOCK_MONOTONIC in ns just before and just after the `KM_ACTIVE` write: the flip happened
    /// in between (tests compare it with client-side connect times on the same clock).
    pub flipped_between_ns: [u64; 2],
}

/// The generation that is live in the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Live {
    pub slot: Slot,
    pub value: GenerationValue,
}

/// The steps of a swap, in order, as named in errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SwapStep {
    ReadActive,
    Barrier,
    Fill,
    Install,
    Flip,
    Mirror,
}

impl std::fmt::Display for SwapStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SwapStep::ReadActive => "reading the active slot",
            SwapStep::Barrier => "waiting for a grace period",
            SwapStep::Fill => "filling the new generation's maps",
            SwapStep::Install => "installing the new generation in the idle slot",
            SwapStep::Flip => "flipping the active slot",
            SwapStep::Mirror => "installing the new maps in the old slot too",
        })
    }
}

/// A step of a swap failed.
#[derive(thiserror::Error, Debug)]
#[error("{step}: {source}")]
pub struct SwapError {
    pub step: SwapStep,
    pub source: MapsError,
}

fn at(step: SwapStep) -> impl FnOnce(MapsError) -> SwapError {
    move |source| SwapError { step, source }
}

/// The per-generation maps and the swap protocol over them.
pub struct GenerationMaps<M: SlotMaps = KernelSlots> {
    maps: M,
    /// The idle slot may still be read by a program that loaded `KM_ACTIVE` before the last flip:
    /// a barrier must pass before anything writes to it (the reuse rule).
    barrier_pending: bool,
    /// The idle slot references the same inner maps as the live one (after every completed swap;
    /// not at start nor after a failed step, when the next swap rebuilds every shard).
    idle_mirrors_live: bool,
}

impl GenerationMaps<KernelSlots> {
    /// Opens the pinned maps of `installation`.
    pub fn open(installation: &Installation) -> Result<Self, MapsError> {
        Self::new(KernelSlots::open(installation)?)
    }

    /// The kernel memory of the live generation's maps, table by table.
    pub fn live_memory(&self) -> Result<Vec<crate::kernel_maps::TableMemory>, MapsError> {
        let slot = self.maps.active_slot()?;
        self.maps.memory_in(slot)
    }
}

impl<M: SlotMaps> GenerationMaps<M> {
    /// Takes over `maps`, passing the barrier a starting agent owes: an earlier agent may have died
    /// between a flip and its barrier.
    pub fn new(maps: M) -> Result<Self, MapsError> {
        maps.grace_period_barrier()?;
        Ok(Self {
            maps,
            barrier_pending: false,
            idle_mirrors_live: false,
        })
    }

    /// The slot operations (for tests that inspect a fake).
    pub fn slots(&self) -> &M {
        &self.maps
    }

    /// The generation the programs currently use, if any.
    pub fn live(&self) -> Result<Option<Live>, MapsError> {
        let slot = self.maps.active_slot()?;
        Ok(self
            .maps
            .generation_in(slot)?
            .map(|value| Live { slot, value }))
    }

    /// Makes `snapshot` the live generation in one step (see the module docs), rebuilding the
    /// shards where it differs from `base`, the snapshot live now (every shard without one). On an
    /// error nothing was flipped: the live generation and the active slot are the ones before.
    pub fn apply(
        &mut self,
        snapshot: &Snapshot,
        content_hash: u64,
        base: Option<&Snapshot>,
    ) -> Result<ApplyStats, SwapError> {
        let active = self.maps.active_slot().map_err(at(SwapStep::ReadActive))?;
        let idle = active.other();
        if self.barrier_pending {
            self.maps
                .grace_period_barrier()
                .map_err(at(SwapStep::Barrier))?;
            self.barrier_pending = false;
        }
        let started = Instant::now();
        let changes = match base {
            Some(base) if self.idle_mirrors_live => Changes::between(base, snapshot),
            _ => Changes::all(),
        };

        // 1. Fresh inner maps for the changed shards, filled while nothing can see them.
        let header = GenerationValue {
            meta: SnapshotMeta {
                generation: snapshot.generation,
                content_hash,
            },
            config: snapshot.config,
        };
        let filled = self
            .maps
            .fill(header, snapshot, &changes)
            .map_err(at(SwapStep::Fill))?;
        let fill_time = started.elapsed();

        // 2. Install them in the idle slot, which differs from the live one from here until the
        // mirror writes. Each write waits for a grace period; done on parallel threads, the waits
        // overlap (concurrent synchronize_rcu callers share grace periods).
        self.idle_mirrors_live = false;
        let maps = &self.maps;
        in_parallel(changes.tables(), |table| maps.install(table, idle, &filled))
            .map_err(at(SwapStep::Install))?;

        // 3. The flip: from here on new connects see the new generation.
        let flip_started_ns = crate::sys::monotonic_ns();
        self.maps.flip(idle).map_err(at(SwapStep::Flip))?;
        let flipped_between_ns = [flip_started_ns, crate::sys::monotonic_ns()];
        self.barrier_pending = true;

        // 4. Barrier, then the same maps in the old slot (reuse rule). The swap is done whatever
        // happens here.
        let old_slot_kept = self.mirror(active, &changes, &filled).err().map(|e| {
            warn!(error = %e, slot = %active, "the old slot keeps the previous maps; the next apply rebuilds every shard");
            e.to_string()
        });
        Ok(ApplyStats {
            slot: idle,
            maps_rebuilt: changes.len(),
            fill_micros: fill_time.as_micros() as u64,
            flip_micros: (started.elapsed() - fill_time).as_micros() as u64,
            old_slot_kept,
            flipped_between_ns,
        })
    }

    /// Waits until no program can still use `old` (no longer active), then points its changed
    /// shards at `filled`'s maps, as the live slot's are.
    fn mirror(
        &mut self,
        old: Slot,
        changes: &Changes,
        filled: &M::Filled,
    ) -> Result<(), SwapError> {
        self.maps
            .grace_period_barrier()
            .map_err(at(SwapStep::Barrier))?;
        self.barrier_pending = false;
        let maps = &self.maps;
        in_parallel(changes.tables(), |table| maps.install(table, old, filled))
            .map_err(at(SwapStep::Mirror))?;
        self.idle_mirrors_live = true;
        Ok(())
    }
}

/// Runs `op` on every item, each on its own thread, and returns the first error.
fn in_parallel<T: Send>(
    items: impl IntoIterator<Item = T>,
    op: impl Fn(T) -> Result<(), MapsError> + Sync,
) -> Result<(), MapsError> {
    std::thread::scope(|scope| {
        let op = &op;
        let running: Vec<_> = items
            .into_iter()
            .map(|item| scope.spawn(move || op(item)))
            .collect();
        // Join every thread before returning, so that no write is still running after an error.
        let results: Vec<_> = running
            .into_iter()
            .map(|t| {
                t.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect();
        results.into_iter().collect()
    })
}

#[cfg(test)]
mod tests;
