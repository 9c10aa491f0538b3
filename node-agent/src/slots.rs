//! The generation slots as operations: what the swap protocol (`maps.rs`) may do to the kernel's
//! per-generation maps, behind one trait so that the protocol is written once and tested without a
//! kernel.
//!
//! [`SlotMaps`] has one implementation over the real maps (`kernel_maps::KernelSlots`) and, in the
//! unit tests, an in-memory fake that records every operation and a wrapper that fails the Nth
//! (`fake_slots.rs`), as cilium does with `LBMaps`, `NewFakeLBMaps` and `FaultyLBMaps`.
use std::fmt;

use aya::maps::MapError;
use kmesh_common::{
    AuthzSourceRecord, AuthzVerdictRecord, AuthzWorkloadRecord, BackendSetRecord, EndpointRecord,
    GENERATION_SLOTS, GenerationValue, RouteRecord, ServiceRecord, map_names,
    shard::{
        CLUSTER_SHARDS, outer_index, shard_of_backend_set, shard_of_endpoint, shard_of_route,
        shard_of_service,
    },
};
use kmesh_snapshot::Snapshot;

use crate::loader::LoaderError;

#[derive(thiserror::Error, Debug)]
pub enum MapsError {
    #[error(transparent)]
    Open(#[from] LoaderError),
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        source: Box<MapError>,
    },
    #[error("map {map}: {op} failed: {source}")]
    Syscall {
        map: &'static str,
        op: &'static str,
        source: std::io::Error,
    },
    #[error("KM_ACTIVE holds slot {0}, outside 0..{GENERATION_SLOTS}")]
    BadSlot(u32),
}

/// One of the two generation slots of every per-generation table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Slot {
    Zero,
    One,
}

// The programs and the maps have exactly two slots; `Slot` is that fact as a type.
const _: () = assert!(GENERATION_SLOTS == 2);

impl Slot {
    /// The slot a `KM_ACTIVE` value names.
    pub fn from_index(index: u32) -> Result<Slot, MapsError> {
        match index {
            0 => Ok(Slot::Zero),
            1 => Ok(Slot::One),
            other => Err(MapsError::BadSlot(other)),
        }
    }

    /// The value `KM_ACTIVE` holds for this slot, and the key of this slot in an outer map.
    pub const fn index(self) -> u32 {
        match self {
            Slot::Zero => 0,
            Slot::One => 1,
        }
    }

    /// The other slot: the idle one when `self` is active.
    pub fn other(self) -> Slot {
        match self {
            Slot::Zero => Slot::One,
            Slot::One => Slot::Zero,
        }
    }
}

/// As its index: the JSON of the status shows `"slot": 1`.
impl serde::Serialize for Slot {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u32(self.index())
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.index())
    }
}

/// A per-generation table: an outer `ARRAY_OF_MAPS` with [`SlotTable::shards`] inner maps per slot
/// (hash maps; an LPM trie for [`SlotTable::AuthzSources`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SlotTable {
    Generation,
    Services,
    Routes,
    BackendSets,
    Endpoints,
    AuthzWorkloads,
    AuthzSources,
    AuthzVerdicts,
}

impl SlotTable {
    pub const ALL: [SlotTable; 8] = [
        SlotTable::Generation,
        SlotTable::Services,
        SlotTable::Routes,
        SlotTable::BackendSets,
        SlotTable::Endpoints,
        SlotTable::AuthzWorkloads,
        SlotTable::AuthzSources,
        SlotTable::AuthzVerdicts,
    ];

    /// The pinned name of the outer map.
    pub const fn map_name(self) -> &'static str {
        match self {
            SlotTable::Generation => map_names::GENERATION,
            SlotTable::Services => map_names::SERVICES,
            SlotTable::Routes => map_names::ROUTES,
            SlotTable::BackendSets => map_names::BACKEND_SETS,
            SlotTable::Endpoints => map_names::ENDPOINTS,
            SlotTable::AuthzWorkloads => map_names::AUTHZ_WORKLOADS,
            SlotTable::AuthzSources => map_names::AUTHZ_SOURCES,
            SlotTable::AuthzVerdicts => map_names::AUTHZ_VERDICTS,
        }
    }

    /// Position in [`SlotTable::ALL`] (for arrays indexed by table).
    pub const fn position(self) -> usize {
        self as usize
    }

    /// Inner maps per slot: the cluster tables are split into `CLUSTER_SHARDS` by key
    /// (`kmesh_common::shard`); the node's own tables are one map each.
    pub const fn shards(self) -> u32 {
        match self {
            SlotTable::Services
            | SlotTable::Routes
            | SlotTable::BackendSets
            | SlotTable::Endpoints => CLUSTER_SHARDS,
            SlotTable::Generation
            | SlotTable::AuthzWorkloads
            | SlotTable::AuthzSources
            | SlotTable::AuthzVerdicts => 1,
        }
    }

    /// The outer map's entry that holds `shard` of `slot` (the programs' `outer_index` for the
    /// cluster tables, the slot itself for the others).
    pub const fn entry(self, slot: Slot, shard: u32) -> u32 {
        if self.shards() == 1 {
            slot.index()
        } else {
            outer_index(slot.index(), shard)
        }
    }
}

/// The shards of each table a swap rebuilds: bit `s` of a table's word is its shard `s` (a table
/// has at most 64 shards).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Changes([u64; SlotTable::ALL.len()]);

const _: () = assert!(CLUSTER_SHARDS <= 64);

impl Changes {
    /// Every shard of every table: a full fill.
    pub fn all() -> Changes {
        let mut changes = Changes::default();
        for table in SlotTable::ALL {
            for shard in 0..table.shards() {
                changes.mark(table, shard);
            }
        }
        changes
    }

    /// Marks `shard` of `table` rebuilt; a shard of the backend sets and the same shard of the
    /// endpoints go together: the sets' entries say where their endpoints are in the shard's
    /// array (`kmesh_common::BackendSetEntry`), so neither is rebuilt without the other.
    pub fn mark(&mut self, table: SlotTable, shard: u32) {
        self.0[table.position()] |= 1 << shard;
        let partner = match table {
            SlotTable::BackendSets => Some(SlotTable::Endpoints),
            SlotTable::Endpoints => Some(SlotTable::BackendSets),
            _ => None,
        };
        if let Some(partner) = partner {
            self.0[partner.position()] |= 1 << shard;
        }
    }

    pub fn contains(&self, table: SlotTable, shard: u32) -> bool {
        self.0[table.position()] & (1 << shard) != 0
    }

    /// The rebuilt shards of `table` as a bit set (bit `s`: shard `s`).
    pub fn mask(&self, table: SlotTable) -> u64 {
        self.0[table.position()]
    }

    /// Whether any shard of `table` is rebuilt.
    pub fn touches(&self, table: SlotTable) -> bool {
        self.0[table.position()] != 0
    }

    /// The rebuilt shards of `table`, in order.
    pub fn shards(&self, table: SlotTable) -> impl Iterator<Item = u32> + '_ {
        (0..table.shards()).filter(move |&s| self.contains(table, s))
    }

    /// The tables with a rebuilt shard.
    pub fn tables(&self) -> impl Iterator<Item = SlotTable> + '_ {
        SlotTable::ALL.into_iter().filter(|&t| self.touches(t))
    }

    /// Inner maps rebuilt, over every table.
    pub fn len(&self) -> usize {
        self.0.iter().map(|w| w.count_ones() as usize).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What a swap from `base` (the snapshot live in the kernel) to `next` rebuilds: the shard of
    /// every cluster table key removed, changed or added (a merge walk of the sorted tables), each
    /// node table that differs, and the generation header, which every swap changes.
    pub fn between(base: &Snapshot, next: &Snapshot) -> Changes {
        let mut changes = Changes::default();
        changes.mark(SlotTable::Generation, 0);
        let mut marks: Vec<(SlotTable, u32)> = Vec::new();
        differing(
            &base.services,
            &next.services,
            |r| r.key,
            |r| shard_of_service(&r.key),
            |s| marks.push((SlotTable::Services, s)),
        );
        differing(
            &base.routes,
            &next.routes,
            |r| r.route_id,
            |r| shard_of_route(r.route_id),
            |s| marks.push((SlotTable::Routes, s)),
        );
        differing(
            &base.backend_sets,
            &next.backend_sets,
            |r| r.set_id,
            |r| shard_of_backend_set(r.set_id),
            |s| marks.push((SlotTable::BackendSets, s)),
        );
        differing(
            &base.endpoints,
            &next.endpoints,
            |r| r.key,
            |r| shard_of_endpoint(&r.key),
            |s| marks.push((SlotTable::Endpoints, s)),
        );
        for (table, shard) in marks {
            changes.mark(table, shard);
        }
        if base.authz.workloads != next.authz.workloads {
            changes.mark(SlotTable::AuthzWorkloads, 0);
        }
        if base.authz.sources != next.authz.sources {
            changes.mark(SlotTable::AuthzSources, 0);
        }
        if base.authz.verdicts != next.authz.verdicts {
            changes.mark(SlotTable::AuthzVerdicts, 0);
        }
        changes
    }
}

/// Calls `mark` with the shard of every key that `base` and `next` (both sorted by `key`, unique)
/// do not hold alike: removed, changed or added.
fn differing<R: PartialEq, K: Ord>(
    base: &[R],
    next: &[R],
    key: impl Fn(&R) -> K,
    shard: impl Fn(&R) -> u32,
    mut mark: impl FnMut(u32),
) {
    let (mut b, mut n) = (base.iter().peekable(), next.iter().peekable());
    loop {
        match (b.peek(), n.peek()) {
            (Some(x), Some(y)) => match key(x).cmp(&key(y)) {
                std::cmp::Ordering::Less => {
                    mark(shard(x));
                    b.next();
                }
                std::cmp::Ordering::Greater => {
                    mark(shard(y));
                    n.next();
                }
                std::cmp::Ordering::Equal => {
                    if x != y {
                        mark(shard(y));
                    }
                    b.next();
                    n.next();
                }
            },
            (Some(x), None) => {
                mark(shard(x));
                b.next();
            }
            (None, Some(y)) => {
                mark(shard(y));
                n.next();
            }
            (None, None) => return,
        }
    }
}

/// What one slot of one table holds, read back from the kernel (for `/debug/bpf/<table>`), in
/// key order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TableRecords {
    Generation(Vec<GenerationValue>),
    Services(Vec<ServiceRecord>),
    Routes(Vec<RouteRecord>),
    BackendSets(Vec<BackendSetRecord>),
    Endpoints(Vec<EndpointRecord>),
    AuthzWorkloads(Vec<AuthzWorkloadRecord>),
    AuthzSources(Vec<AuthzSourceRecord>),
    AuthzVerdicts(Vec<AuthzVerdictRecord>),
}

impl TableRecords {
    /// The records of `shard` alone (all of them for a table of one shard).
    pub fn of_shard(self, table: SlotTable, shard: u32) -> TableRecords {
        fn keep<R>(records: Vec<R>, shard_of: impl Fn(&R) -> u32, shard: u32) -> Vec<R> {
            records
                .into_iter()
                .filter(|r| shard_of(r) == shard)
                .collect()
        }
        if table.shards() == 1 {
            return self;
        }
        use TableRecords as T;
        match self {
            T::Services(r) => T::Services(keep(r, |r| shard_of_service(&r.key), shard)),
            T::Routes(r) => T::Routes(keep(r, |r| shard_of_route(r.route_id), shard)),
            T::BackendSets(r) => T::BackendSets(keep(r, |r| shard_of_backend_set(r.set_id), shard)),
            T::Endpoints(r) => T::Endpoints(keep(r, |r| shard_of_endpoint(&r.key), shard)),
            other => other,
        }
    }

    /// The records of both, sorted: the shards of one table read apart, joined. Records of
    /// different tables are not joined: `other` is dropped (a caller's bug, not input).
    pub fn joined(self, other: TableRecords) -> TableRecords {
        fn join<R: Ord>(mut a: Vec<R>, b: Vec<R>) -> Vec<R> {
            a.extend(b);
            a.sort_unstable();
            a
        }
        use TableRecords as T;
        match (self, other) {
            (T::Generation(a), T::Generation(b)) => T::Generation(join(a, b)),
            (T::Services(a), T::Services(b)) => T::Services(join(a, b)),
            (T::Routes(a), T::Routes(b)) => T::Routes(join(a, b)),
            (T::BackendSets(a), T::BackendSets(b)) => T::BackendSets(join(a, b)),
            (T::Endpoints(a), T::Endpoints(b)) => T::Endpoints(join(a, b)),
            (T::AuthzWorkloads(a), T::AuthzWorkloads(b)) => T::AuthzWorkloads(join(a, b)),
            (T::AuthzSources(a), T::AuthzSources(b)) => T::AuthzSources(join(a, b)),
            (T::AuthzVerdicts(a), T::AuthzVerdicts(b)) => T::AuthzVerdicts(join(a, b)),
            (a, _) => a,
        }
    }

    /// What [`SlotMaps::fill`] writes into `table` for `header` and `snapshot`.
    pub fn of(table: SlotTable, header: GenerationValue, snapshot: &Snapshot) -> TableRecords {
        match table {
            SlotTable::Generation => TableRecords::Generation(vec![header]),
            SlotTable::Services => TableRecords::Services(snapshot.services.clone()),
            SlotTable::Routes => TableRecords::Routes(snapshot.routes.clone()),
            SlotTable::BackendSets => TableRecords::BackendSets(snapshot.backend_sets.clone()),
            SlotTable::Endpoints => TableRecords::Endpoints(snapshot.endpoints.clone()),
            SlotTable::AuthzWorkloads => {
                TableRecords::AuthzWorkloads(snapshot.authz.workloads.clone())
            }
            SlotTable::AuthzSources => TableRecords::AuthzSources(snapshot.authz.sources.clone()),
            SlotTable::AuthzVerdicts => {
                TableRecords::AuthzVerdicts(snapshot.authz.verdicts.clone())
            }
        }
    }
}

/// The operations of the swap protocol on the per-generation maps. Every write the agent makes to
/// them goes through here; the rules of when each may be called are the protocol's (`maps.rs`).
///
/// `Sync` because the protocol runs the per-table writes of one step on parallel threads.
pub trait SlotMaps: Sync {
    /// One generation's inner maps, created and filled, not yet installed in any slot.
    type Filled: Sync;

    /// The slot `KM_ACTIVE` names.
    fn active_slot(&self) -> Result<Slot, MapsError>;

    /// The generation header installed in `slot`, if any.
    fn generation_in(&self, slot: Slot) -> Result<Option<GenerationValue>, MapsError>;

    /// Creates a fresh inner map for every shard `changes` names and fills it with `header` and
    /// `snapshot`'s records of that shard. Nothing can see them until they are installed.
    fn fill(
        &self,
        header: GenerationValue,
        snapshot: &Snapshot,
        changes: &Changes,
    ) -> Result<Self::Filled, MapsError>;

    /// Points the entries of `slot` of `table` whose shards `filled` holds at those inner maps,
    /// in one write of the outer map (the kernel waits for one grace period per write).
    fn install(&self, table: SlotTable, slot: Slot, filled: &Self::Filled)
    -> Result<(), MapsError>;

    /// Writes `slot` to `KM_ACTIVE`: the one write the programs observe.
    fn flip(&self, slot: Slot) -> Result<(), MapsError>;

    /// Returns once every program that started before the call has finished (an RCU grace period).
    fn grace_period_barrier(&self) -> Result<(), MapsError>;

    /// Every record `slot` of `table` holds (over its shards), sorted by key; `None` when the slot
    /// is empty. Reads only: the admin server calls it beside the data plane's writes.
    fn read(&self, table: SlotTable, slot: Slot) -> Result<Option<TableRecords>, MapsError>;
}
