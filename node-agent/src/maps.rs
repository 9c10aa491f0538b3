//! The per-generation maps and the atomic swap.
//!
//! # Layout
//! Each table (generation header, services, routes, backend sets, endpoints) is an outer
//! `ARRAY_OF_MAPS` with two slots; each slot holds an inner hash map with one generation's entries.
//! `KM_ACTIVE[0]` names the slot the programs use. A program reads `KM_ACTIVE` once and then looks
//! up every table in that slot.
//!
//! # Swap
//! 1. Create fresh inner maps sized for the new snapshot and fill them (nothing reads them yet).
//! 2. Install them in the idle slot of each outer map.
//! 3. Flip `KM_ACTIVE[0]` to the idle slot: one 4-byte array write, the only step programs see.
//! 4. Wait for an RCU grace period (see the reuse rule), then empty the old slot to free its memory.
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
//! (`maybe_wait_bpf_programs` in the kernel), so re-writing the new slot's generation entry with
//! the same inner map is our barrier. Only then is the old slot emptied, and the next swap fills it.
//! On startup we do the same barrier once, since an earlier agent may have died right after a flip.
use std::os::fd::{AsFd, AsRawFd as _, BorrowedFd};

use aya::{
    Pod,
    maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray},
};
use kmesh_common::{
    EnrolledNetns, GENERATION_SLOTS, GenerationValue, INNER_MAP_FLAGS, SnapshotMeta, counter,
    map_names,
};
use kmesh_snapshot::Snapshot;

use crate::loader::{Installation, LoaderError};

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

fn map_err(map: &'static str) -> impl FnOnce(MapError) -> MapsError {
    move |e| MapsError::Map {
        map,
        source: Box::new(e),
    }
}

/// One outer `ARRAY_OF_MAPS` of a table.
struct OuterMap {
    name: &'static str,
    map: MapData,
}

impl OuterMap {
    fn open(installation: &Installation, name: &'static str) -> Result<Self, MapsError> {
        Ok(Self {
            name,
            map: installation.open_map(name)?,
        })
    }

    /// Points `slot` at `inner`. Returns after an RCU grace period (kernel behaviour for
    /// map-in-map updates), which the reuse rule relies on.
    fn set(&self, slot: u32, inner: BorrowedFd<'_>) -> Result<(), MapsError> {
        let value: u32 = inner.as_raw_fd() as u32;
        bpf_map_op(
            BPF_MAP_UPDATE_ELEM,
            self.map.fd().as_fd(),
            &slot,
            Some(&value),
        )
        .map_err(|source| MapsError::Syscall {
            map: self.name,
            op: "update",
            source,
        })
    }

    /// Empties `slot` (frees the inner map once nothing references it).
    fn clear(&self, slot: u32) -> Result<(), MapsError> {
        match bpf_map_op::<u32>(BPF_MAP_DELETE_ELEM, self.map.fd().as_fd(), &slot, None) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            Err(source) => Err(MapsError::Syscall {
                map: self.name,
                op: "delete",
                source,
            }),
        }
    }

    /// The id of the inner map in `slot`, if any.
    fn inner_id(&self, slot: u32) -> Result<Option<u32>, MapsError> {
        let mut id: u32 = 0;
        match bpf_map_lookup(self.map.fd().as_fd(), &slot, &mut id) {
            Ok(()) => Ok(Some(id)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(source) => Err(MapsError::Syscall {
                map: self.name,
                op: "lookup",
                source,
            }),
        }
    }
}

/// Sizes and timing of one applied snapshot.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ApplyStats {
    pub slot: u32,
    pub fill_micros: u64,
    pub flip_micros: u64,
    /// CLOCK_MONOTONIC in ns just before and just after the `KM_ACTIVE` write: the flip happened
    /// in between (tests compare it with client-side connect times on the same clock).
    pub flipped_between_ns: [u64; 2],
}

/// The generation that is live in the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Live {
    pub slot: u32,
    pub value: GenerationValue,
}

/// Handles on the per-generation maps.
pub struct GenerationMaps {
    active: Array<MapData, u32>,
    generation: OuterMap,
    services: OuterMap,
    routes: OuterMap,
    backend_sets: OuterMap,
    endpoints: OuterMap,
}

impl GenerationMaps {
    pub fn open(installation: &Installation) -> Result<Self, MapsError> {
        let active = Map::from_map_data(installation.open_map(map_names::ACTIVE)?)
            .and_then(Array::try_from)
            .map_err(map_err(map_names::ACTIVE))?;
        let maps = Self {
            active,
            generation: OuterMap::open(installation, map_names::GENERATION)?,
            services: OuterMap::open(installation, map_names::SERVICES)?,
            routes: OuterMap::open(installation, map_names::ROUTES)?,
            backend_sets: OuterMap::open(installation, map_names::BACKEND_SETS)?,
            endpoints: OuterMap::open(installation, map_names::ENDPOINTS)?,
        };
        // An earlier agent may have died between a flip and its barrier.
        maps.grace_period_barrier()?;
        Ok(maps)
    }

    fn outer_maps(&self) -> [&OuterMap; 5] {
        [
            &self.generation,
            &self.services,
            &self.routes,
            &self.backend_sets,
            &self.endpoints,
        ]
    }

    fn active_slot(&self) -> Result<u32, MapsError> {
        let slot = self.active.get(&0, 0).map_err(map_err(map_names::ACTIVE))?;
        if slot >= GENERATION_SLOTS {
            return Err(MapsError::BadSlot(slot));
        }
        Ok(slot)
    }

    /// The generation the programs currently use, if any.
    pub fn live(&self) -> Result<Option<Live>, MapsError> {
        let slot = self.active_slot()?;
        let Some(id) = self.generation.inner_id(slot)? else {
            return Ok(None);
        };
        let inner: HashMap<MapData, u32, GenerationValue> = MapData::from_id(id)
            .and_then(Map::from_map_data)
            .and_then(HashMap::try_from)
            .map_err(map_err(map_names::GENERATION))?;
        match inner.get(&0, 0) {
            Ok(value) => Ok(Some(Live { slot, value })),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(map_names::GENERATION)(e)),
        }
    }

    /// Makes `snapshot` the live generation in one step (see the module docs).
    pub fn apply(
        &mut self,
        snapshot: &Snapshot,
        content_hash: u64,
    ) -> Result<ApplyStats, MapsError> {
        let active = self.active_slot()?;
        let idle = (active + 1) % GENERATION_SLOTS;
        let started = std::time::Instant::now();

        // 1. Fresh inner maps, filled while nothing can see them.
        let generation = fill(
            map_names::GENERATION,
            [(
                0u32,
                GenerationValue {
                    meta: SnapshotMeta {
                        generation: snapshot.generation,
                        content_hash,
                    },
                    config: snapshot.config,
                },
            )]
            .into_iter(),
        )?;
        let services = fill(
            map_names::SERVICES,
            snapshot.services.iter().map(|r| (r.key, r.value)),
        )?;
        let routes = fill(
            map_names::ROUTES,
            snapshot.routes.iter().map(|r| (r.route_id, r.value)),
        )?;
        let backend_sets = fill(
            map_names::BACKEND_SETS,
            snapshot.backend_sets.iter().map(|r| (r.set_id, r.value)),
        )?;
        let endpoints = fill(
            map_names::ENDPOINTS,
            snapshot.endpoints.iter().map(|r| (r.key, r.value)),
        )?;
        let filled = started.elapsed();

        // 2. Install them in the idle slot. Each write waits for a grace period; done on parallel
        // threads, the waits overlap (concurrent synchronize_rcu callers share grace periods).
        let inner = [&generation, &services, &routes, &backend_sets, &endpoints];
        in_parallel(self.outer_maps().into_iter().zip(inner), |(outer, map)| {
            outer.set(idle, map.fd().as_fd())
        })?;

        // 3. The flip: from here on new connects see the new generation.
        let flip_started_ns = monotonic_ns();
        self.active
            .set(0, idle, 0)
            .map_err(map_err(map_names::ACTIVE))?;
        let flipped_between_ns = [flip_started_ns, monotonic_ns()];

        // 4. Barrier, then free the old slot (reuse rule).
        self.grace_period_barrier()?;
        in_parallel(self.outer_maps(), |outer| outer.clear(active))?;
        Ok(ApplyStats {
            slot: idle,
            fill_micros: filled.as_micros() as u64,
            flip_micros: (started.elapsed() - filled).as_micros() as u64,
            flipped_between_ns,
        })
    }

    /// Returns once every program that started before the call has finished: re-installs the live
    /// slot's generation map, an update that waits for an RCU grace period.
    fn grace_period_barrier(&self) -> Result<(), MapsError> {
        let slot = self.active_slot()?;
        let Some(id) = self.generation.inner_id(slot)? else {
            return Ok(()); // nothing was ever installed: no program can be using a slot
        };
        let inner = MapData::from_id(id).map_err(map_err(map_names::GENERATION))?;
        self.generation.set(slot, inner.fd().as_fd())
    }
}

/// CLOCK_MONOTONIC in nanoseconds (the clock of [`ApplyStats::flipped_between_ns`]).
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
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
        running.into_iter().try_for_each(|t| {
            t.join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    })
}

/// A fresh inner hash map holding `entries`, sized to fit them exactly.
fn fill<K: Pod, V: Pod>(
    name: &'static str,
    entries: impl ExactSizeIterator<Item = (K, V)>,
) -> Result<MapData, MapsError> {
    let capacity = entries.len().max(1) as u32;
    let definition = aya_obj::Map::new_from_params(
        BPF_MAP_TYPE_HASH,
        size_of::<K>() as u32,
        size_of::<V>() as u32,
        capacity,
        INNER_MAP_FLAGS,
    );
    let map = MapData::create(definition, name, None).map_err(map_err(name))?;
    let (keys, values): (Vec<K>, Vec<V>) = entries.unzip();
    // One syscall per chunk rather than one per entry: filling is most of a large swap's cost.
    for (k, v) in keys.chunks(FILL_BATCH).zip(values.chunks(FILL_BATCH)) {
        bpf_map_update_batch(map.fd().as_fd(), k, v).map_err(|source| MapsError::Syscall {
            map: name,
            op: "batch update",
            source,
        })?;
    }
    Ok(map)
}

/// Entries per BPF_MAP_UPDATE_BATCH call; bounds the time one syscall holds the CPU.
const FILL_BATCH: usize = 16_384;

/// The enrolled network namespaces (not per generation).
pub struct EnrolledMap {
    map: HashMap<MapData, u64, EnrolledNetns>,
}

impl EnrolledMap {
    pub fn open(installation: &Installation) -> Result<Self, MapsError> {
        let map = Map::from_map_data(installation.open_map(map_names::ENROLLED)?)
            .and_then(HashMap::try_from)
            .map_err(map_err(map_names::ENROLLED))?;
        Ok(Self { map })
    }

    pub fn entries(&self) -> Result<std::collections::BTreeMap<u64, EnrolledNetns>, MapsError> {
        self.map
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err(map_names::ENROLLED))
    }

    pub fn insert(&mut self, cookie: u64, value: EnrolledNetns) -> Result<(), MapsError> {
        self.map
            .insert(cookie, value, 0)
            .map_err(map_err(map_names::ENROLLED))
    }

    pub fn remove(&mut self, cookie: u64) -> Result<(), MapsError> {
        match self.map.remove(&cookie) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(map_names::ENROLLED)(e)),
        }
    }
}

/// The programs' per-CPU counters, summed.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Counters {
    pub rewritten: u64,
    pub refused_no_endpoint: u64,
    pub refused_family: u64,
    pub inconsistent: u64,
}

pub struct CounterMap {
    map: PerCpuArray<MapData, u64>,
}

impl CounterMap {
    pub fn open(installation: &Installation) -> Result<Self, MapsError> {
        let map = Map::from_map_data(installation.open_map(map_names::COUNTERS)?)
            .and_then(PerCpuArray::try_from)
            .map_err(map_err(map_names::COUNTERS))?;
        Ok(Self { map })
    }

    pub fn read(&self) -> Result<Counters, MapsError> {
        let sum = |index: u32| -> Result<u64, MapsError> {
            let values = self
                .map
                .get(&index, 0)
                .map_err(map_err(map_names::COUNTERS))?;
            Ok(values.iter().sum())
        };
        Ok(Counters {
            rewritten: sum(counter::REWRITTEN)?,
            refused_no_endpoint: sum(counter::REFUSED_NO_ENDPOINT)?,
            refused_family: sum(counter::REFUSED_FAMILY)?,
            inconsistent: sum(counter::INCONSISTENT)?,
        })
    }
}

// aya 0.14 has no delete for ARRAY_OF_MAPS, cannot look up an inner map's id without opening it,
// and has no batch update, so these use the bpf(2) syscall directly.
const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// `union bpf_attr` as used by the map element commands.
#[repr(C)]
struct MapElemAttr {
    map_fd: u32,
    pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `union bpf_attr` as used by the batch commands.
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Inserts `keys[i] -> values[i]` for every i in one syscall (Linux 5.6+).
fn bpf_map_update_batch<K: Pod, V: Pod>(
    fd: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> std::io::Result<()> {
    debug_assert_eq!(keys.len(), values.len());
    let mut attr = BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: keys.len() as u32,
        map_fd: fd.as_raw_fd() as u32,
        elem_flags: 0,
        flags: 0,
    };
    sys_bpf(BPF_MAP_UPDATE_BATCH, &mut attr)?;
    // On success the kernel reports how many it inserted; anything short is a failure.
    if attr.count as usize != keys.len() {
        return Err(std::io::Error::other(format!(
            "inserted {} of {} entries",
            attr.count,
            keys.len()
        )));
    }
    Ok(())
}

fn bpf_map_op<V>(
    cmd: libc::c_long,
    fd: BorrowedFd<'_>,
    key: &u32,
    value: Option<&V>,
) -> std::io::Result<()> {
    let mut attr = MapElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        pad: 0,
        key: key as *const u32 as u64,
        value: value.map_or(0, |v| v as *const V as u64),
        flags: 0,
    };
    sys_bpf(cmd, &mut attr)
}

fn bpf_map_lookup(fd: BorrowedFd<'_>, key: &u32, out: &mut u32) -> std::io::Result<()> {
    let mut attr = MapElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        pad: 0,
        key: key as *const u32 as u64,
        value: out as *mut u32 as u64,
        flags: 0,
    };
    sys_bpf(BPF_MAP_LOOKUP_ELEM, &mut attr)
}

/// bpf(2) with one of the attr structs above; the kernel may write results back into `attr`.
fn sys_bpf<A>(cmd: libc::c_long, attr: &mut A) -> std::io::Result<()> {
    // SAFETY: attr is a live, fully initialized repr(C) prefix of `union bpf_attr` of the size we
    // pass (the kernel zero-extends the rest); the pointers in it point to live buffers of the
    // sizes the map was created with.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut A, std::mem::size_of::<A>()) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}
