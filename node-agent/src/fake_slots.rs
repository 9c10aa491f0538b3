//! Test doubles of [`SlotMaps`]: [`FakeSlots`] keeps the slots in memory and records every
//! operation in order; [`FaultySlots`] wraps any implementation and fails its Nth operation. With
//! them the swap protocol and the agent's decisions are unit tested without a kernel (as cilium's
//! `NewFakeLBMaps` and `FaultyLBMaps` do for its load-balancer maps).
use std::{
    collections::BTreeMap,
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use kmesh_common::{GenerationValue, NodeConfig, SnapshotMeta, mode};
use kmesh_snapshot::Snapshot;

use crate::slots::{Changes, MapsError, Slot, SlotMaps, SlotTable, TableRecords};

/// One operation on the slots, as recorded by [`FakeSlots`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    ReadActive,
    ReadGeneration {
        slot: Slot,
    },
    Fill {
        generation: u64,
    },
    Install {
        table: SlotTable,
        slot: Slot,
        generation: u64,
        /// The shards written (bit `s`: shard `s`).
        shards: u64,
    },
    Flip {
        slot: Slot,
    },
    Barrier,
}

impl Op {
    /// Whether the operation changes what the kernel holds.
    pub fn is_write(&self) -> bool {
        matches!(self, Op::Install { .. } | Op::Flip { .. })
    }
}

#[derive(Default)]
struct State {
    active: Option<Slot>,
    /// What each (slot, table, shard) holds: the generation header of the inner map installed
    /// there (a shard a swap leaves alone keeps the map of the generation that last changed it).
    installed: BTreeMap<(Slot, SlotTable, u32), GenerationValue>,
    /// The records of every filled generation, by (generation, content hash), for [`SlotMaps::read`].
    filled: BTreeMap<(u64, u64), Snapshot>,
    log: Vec<Op>,
}

/// The slots in memory. A filled generation is its header: enough to tell generations apart.
#[derive(Default)]
pub struct FakeSlots {
    state: Mutex<State>,
}

impl FakeSlots {
    /// Slots as a fresh installation has them: slot 0 active, nothing installed.
    pub fn empty() -> FakeSlots {
        FakeSlots {
            state: Mutex::new(State {
                active: Some(Slot::Zero),
                ..State::default()
            }),
        }
    }

    /// Slots with `generation` (content hash `hash`) live in `slot` in every shard of every
    /// table, and nothing in the other.
    pub fn with_live(slot: Slot, generation: u64, hash: u64) -> FakeSlots {
        let fake = FakeSlots::empty();
        {
            let mut state = fake.lock();
            state.active = Some(slot);
            for table in SlotTable::ALL {
                for shard in 0..table.shards() {
                    state
                        .installed
                        .insert((slot, table, shard), header(generation, hash));
                }
            }
        }
        fake
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every operation so far, in order.
    pub fn log(&self) -> Vec<Op> {
        self.lock().log.clone()
    }

    /// Forgets the operations recorded so far.
    pub fn clear_log(&self) {
        self.lock().log.clear();
    }

    pub fn active(&self) -> Slot {
        self.lock().active.unwrap_or(Slot::Zero)
    }

    /// The generation of the map each shard of each table of `slot` holds (absent: empty).
    pub fn contents(&self, slot: Slot) -> BTreeMap<(SlotTable, u32), u64> {
        self.lock()
            .installed
            .iter()
            .filter(|((s, _, _), _)| *s == slot)
            .map(|((_, table, shard), value)| ((*table, *shard), value.meta.generation))
            .collect()
    }
}

/// The header the fake stores for a generation.
pub fn header(generation: u64, content_hash: u64) -> GenerationValue {
    GenerationValue {
        meta: SnapshotMeta {
            generation,
            content_hash,
        },
        config: NodeConfig::with_mode(mode::KERNEL_NATIVE),
    }
}

impl SlotMaps for FakeSlots {
    /// The generation filled, and which shards of it.
    type Filled = (GenerationValue, Changes);

    fn active_slot(&self) -> Result<Slot, MapsError> {
        let mut state = self.lock();
        state.log.push(Op::ReadActive);
        Ok(state.active.unwrap_or(Slot::Zero))
    }

    fn generation_in(&self, slot: Slot) -> Result<Option<GenerationValue>, MapsError> {
        let mut state = self.lock();
        state.log.push(Op::ReadGeneration { slot });
        Ok(state
            .installed
            .get(&(slot, SlotTable::Generation, 0))
            .copied())
    }

    fn fill(
        &self,
        header: GenerationValue,
        snapshot: &Snapshot,
        changes: &Changes,
    ) -> Result<(GenerationValue, Changes), MapsError> {
        let mut state = self.lock();
        state.log.push(Op::Fill {
            generation: header.meta.generation,
        });
        let key = (header.meta.generation, header.meta.content_hash);
        state.filled.insert(key, snapshot.clone());
        Ok((header, *changes))
    }

    fn install(
        &self,
        table: SlotTable,
        slot: Slot,
        (header, changes): &(GenerationValue, Changes),
    ) -> Result<(), MapsError> {
        let mut state = self.lock();
        state.log.push(Op::Install {
            table,
            slot,
            generation: header.meta.generation,
            shards: changes.mask(table),
        });
        for shard in changes.shards(table) {
            state.installed.insert((slot, table, shard), *header);
        }
        Ok(())
    }

    fn flip(&self, slot: Slot) -> Result<(), MapsError> {
        let mut state = self.lock();
        state.log.push(Op::Flip { slot });
        state.active = Some(slot);
        Ok(())
    }

    fn grace_period_barrier(&self) -> Result<(), MapsError> {
        self.lock().log.push(Op::Barrier);
        Ok(())
    }

    /// The records of the generation whose map each shard holds, of that shard (empty tables
    /// for a generation placed by [`FakeSlots::with_live`], which has no records).
    fn read(&self, table: SlotTable, slot: Slot) -> Result<Option<TableRecords>, MapsError> {
        let state = self.lock();
        let empty = kmesh_snapshot::builder::SnapshotBuilder::new("", 0, 0).build();
        let mut records: Option<TableRecords> = None;
        for shard in 0..table.shards() {
            let Some(header) = state.installed.get(&(slot, table, shard)).copied() else {
                continue;
            };
            let key = (header.meta.generation, header.meta.content_hash);
            let snapshot = state.filled.get(&key).unwrap_or(&empty);
            let of_shard = TableRecords::of(table, header, snapshot).of_shard(table, shard);
            records = Some(match records {
                None => of_shard,
                Some(so_far) => so_far.joined(of_shard),
            });
        }
        Ok(records)
    }
}

/// Wraps `M` and fails its `fail_at`th operation (counting from 1, over all operations) with
/// `EIO`, as a kernel refusing a map write would. 0: fail nothing.
pub struct FaultySlots<M> {
    pub inner: M,
    fail_at: AtomicUsize,
    calls: AtomicUsize,
}

impl<M> FaultySlots<M> {
    pub fn new(inner: M) -> FaultySlots<M> {
        FaultySlots {
            inner,
            fail_at: AtomicUsize::new(0),
            calls: AtomicUsize::new(0),
        }
    }

    /// Fails the `n`th operation from now on (1: the next one); 0 disarms.
    pub fn fail_at(&self, n: usize) {
        self.calls.store(0, Ordering::SeqCst);
        self.fail_at.store(n, Ordering::SeqCst);
    }

    /// Operations since the last [`FaultySlots::fail_at`].
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn tick(&self, map: &'static str, op: &'static str) -> Result<(), MapsError> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        if call == self.fail_at.load(Ordering::SeqCst) {
            return Err(MapsError::Syscall {
                map,
                op,
                source: std::io::Error::from_raw_os_error(libc::EIO),
            });
        }
        Ok(())
    }
}

impl<M: SlotMaps> SlotMaps for FaultySlots<M> {
    type Filled = M::Filled;

    fn active_slot(&self) -> Result<Slot, MapsError> {
        self.tick("KM_ACTIVE", "lookup")?;
        self.inner.active_slot()
    }

    fn generation_in(&self, slot: Slot) -> Result<Option<GenerationValue>, MapsError> {
        self.tick(SlotTable::Generation.map_name(), "lookup")?;
        self.inner.generation_in(slot)
    }

    fn fill(
        &self,
        header: GenerationValue,
        snapshot: &Snapshot,
        changes: &Changes,
    ) -> Result<M::Filled, MapsError> {
        self.tick("inner maps", "create")?;
        self.inner.fill(header, snapshot, changes)
    }

    fn install(&self, table: SlotTable, slot: Slot, filled: &M::Filled) -> Result<(), MapsError> {
        self.tick(table.map_name(), "update")?;
        self.inner.install(table, slot, filled)
    }

    fn flip(&self, slot: Slot) -> Result<(), MapsError> {
        self.tick("KM_ACTIVE", "update")?;
        self.inner.flip(slot)
    }

    fn grace_period_barrier(&self) -> Result<(), MapsError> {
        self.tick(SlotTable::Generation.map_name(), "barrier update")?;
        self.inner.grace_period_barrier()
    }

    fn read(&self, table: SlotTable, slot: Slot) -> Result<Option<TableRecords>, MapsError> {
        self.tick(table.map_name(), "read")?;
        self.inner.read(table, slot)
    }
}
