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
    pub fn index(self) -> u32 {
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

/// A per-generation table: an outer `ARRAY_OF_MAPS` with one inner map per slot (a hash map; an
/// LPM trie for [`SlotTable::AuthzSources`]).
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

    /// Creates fresh inner maps for every table and fills them with `header` and `snapshot`'s
    /// records. Nothing can see them until they are installed.
    fn fill(&self, header: GenerationValue, snapshot: &Snapshot)
    -> Result<Self::Filled, MapsError>;

    /// Points `slot` of `table` at `filled`'s inner map of that table.
    fn install(&self, table: SlotTable, slot: Slot, filled: &Self::Filled)
    -> Result<(), MapsError>;

    /// Writes `slot` to `KM_ACTIVE`: the one write the programs observe.
    fn flip(&self, slot: Slot) -> Result<(), MapsError>;

    /// Returns once every program that started before the call has finished (an RCU grace period).
    fn grace_period_barrier(&self) -> Result<(), MapsError>;

    /// Empties `slot` of `table` (its inner map is freed once nothing references it).
    fn clear(&self, table: SlotTable, slot: Slot) -> Result<(), MapsError>;

    /// Every record `slot` of `table` holds, sorted by key; `None` when the slot is empty. Reads
    /// only: the admin server calls it beside the data plane's writes.
    fn read(&self, table: SlotTable, slot: Slot) -> Result<Option<TableRecords>, MapsError>;
}
