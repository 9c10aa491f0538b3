//! The real maps: [`KernelSlots`], the generation slots over the pinned maps (aya where it has the
//! operation, `sys` where it does not), and the maps that are not per generation — the enrolled
//! namespaces and the programs' counters.
//!
//! `KernelSlots` only performs operations; when each may run is the swap protocol's business
//! (`maps.rs`).
use std::{
    collections::BTreeMap,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
};

use aya::{
    Pod,
    maps::{Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray},
};
use kmesh_common::{
    AuthzSourceKey, AuthzSourceRecord, AuthzVerdictRecord, AuthzWorkloadRecord, BackendSetEntry,
    BackendSetRecord, EndpointKey, EndpointRecord, EndpointValue, EnrolledNetns, GenerationValue,
    INNER_ARRAY_FLAGS, INNER_MAP_FLAGS, Ip16, RouteRecord, ServiceRecord, counter, map_names,
    shard::{
        CLUSTER_SHARDS, shard_of_backend_set, shard_of_endpoint, shard_of_route, shard_of_service,
    },
};
use kmesh_snapshot::Snapshot;

use crate::{
    loader::Installation,
    slots::{Changes, MapsError, Slot, SlotMaps, SlotTable, TableRecords},
    sys,
};

fn map_err(map: &'static str) -> impl FnOnce(MapError) -> MapsError {
    move |e| MapsError::Map {
        map,
        source: Box::new(e),
    }
}

fn syscall_err(map: &'static str, op: &'static str) -> impl FnOnce(std::io::Error) -> MapsError {
    move |source| MapsError::Syscall { map, op, source }
}

/// One outer `ARRAY_OF_MAPS` of a table.
struct OuterMap {
    name: &'static str,
    map: MapData,
}

impl OuterMap {
    /// Points `entry` at `inner`. Returns after an RCU grace period (kernel behaviour for
    /// map-in-map updates), which the reuse rule relies on.
    fn set(&self, entry: u32, inner: BorrowedFd<'_>) -> Result<(), MapsError> {
        let value: u32 = inner.as_raw_fd() as u32;
        sys::map_update_elem(self.map.fd().as_fd(), &entry, &value)
            .map_err(syscall_err(self.name, "update"))
    }

    /// Points each of `entries` at the inner map of the same position in `inner`, in one
    /// `BPF_MAP_UPDATE_BATCH`: the kernel waits for one grace period after the batch, not one per
    /// entry.
    fn set_all(&self, entries: &[u32], inner: &[BorrowedFd<'_>]) -> Result<(), MapsError> {
        let values: Vec<u32> = inner.iter().map(|fd| fd.as_raw_fd() as u32).collect();
        sys::map_update_batch(self.map.fd().as_fd(), entries, &values)
            .map_err(syscall_err(self.name, "batch update"))
    }

    /// The id of the inner map at `entry`, if any.
    fn inner_id(&self, entry: u32) -> Result<Option<u32>, MapsError> {
        let mut id: u32 = 0;
        match sys::map_lookup_elem(self.map.fd().as_fd(), &entry, &mut id) {
            Ok(()) => Ok(Some(id)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(syscall_err(self.name, "lookup")(e)),
        }
    }

    /// The ids of the inner maps of every shard of `slot` of `table` that has one.
    fn inner_ids(&self, table: SlotTable, slot: Slot) -> Result<Vec<u32>, MapsError> {
        let mut ids = Vec::new();
        for shard in 0..table.shards() {
            if let Some(id) = self.inner_id(table.entry(slot, shard))? {
                ids.push(id);
            }
        }
        Ok(ids)
    }
}

/// The generation slots of an installation.
pub struct KernelSlots {
    active: MapData,
    /// Indexed by [`SlotTable::position`].
    outer: [OuterMap; SlotTable::ALL.len()],
}

/// One generation's rebuilt inner maps: per table (indexed by [`SlotTable::position`]), the shard
/// and map of each.
pub struct KernelGeneration {
    inner: [Vec<(u32, MapData)>; SlotTable::ALL.len()],
}

impl KernelSlots {
    /// The endpoints of `slot` as records: each shard's array read with the backend sets of the
    /// same shard, which say where each set's endpoints are (see [`BackendSetEntry`]).
    fn read_endpoints(&self, slot: Slot) -> Result<Option<TableRecords>, MapsError> {
        let name = map_names::ENDPOINTS;
        let (endpoints, sets) = (SlotTable::Endpoints, SlotTable::BackendSets);
        let mut records = Vec::new();
        let mut any = false;
        for shard in 0..endpoints.shards() {
            let Some(id) = self
                .outer(endpoints)
                .inner_id(endpoints.entry(slot, shard))?
            else {
                continue;
            };
            any = true;
            let array = MapData::from_id(id)
                .and_then(Map::from_map_data)
                .and_then(Array::<MapData, EndpointValue>::try_from)
                .map_err(map_err(name))?;
            let values = (0..array.len())
                .map(|i| array.get(&i, 0))
                .collect::<Result<Vec<_>, _>>()
                .map_err(map_err(name))?;
            let entries = match self.outer(sets).inner_id(sets.entry(slot, shard))? {
                Some(id) => read_backend_set_entries(id)?,
                None => Vec::new(),
            };
            for (set_id, entry) in entries {
                for index in 0..entry.endpoint_count {
                    let at = entry.first_endpoint.checked_add(index);
                    let value = at.and_then(|at| values.get(at as usize)).ok_or_else(|| {
                        MapsError::Map {
                            map: name,
                            source: Box::new(MapError::OutOfBounds {
                                index: at.unwrap_or(u32::MAX),
                                max_entries: array.len(),
                            }),
                        }
                    })?;
                    records.push(EndpointRecord {
                        key: EndpointKey { set_id, index },
                        value: *value,
                    });
                }
            }
        }
        records.sort_unstable();
        Ok(any.then_some(TableRecords::Endpoints(records)))
    }

    pub fn open(installation: &Installation) -> Result<Self, MapsError> {
        let outer = |table: SlotTable| -> Result<OuterMap, MapsError> {
            Ok(OuterMap {
                name: table.map_name(),
                map: installation.open_map(table.map_name())?,
            })
        };
        let [g, s, r, b, e, aw, asrc, av] = SlotTable::ALL;
        Ok(Self {
            active: installation.open_map(map_names::ACTIVE)?,
            outer: [
                outer(g)?,
                outer(s)?,
                outer(r)?,
                outer(b)?,
                outer(e)?,
                outer(aw)?,
                outer(asrc)?,
                outer(av)?,
            ],
        })
    }

    fn outer(&self, table: SlotTable) -> &OuterMap {
        &self.outer[table.position()]
    }

    /// The kernel memory of each table's inner map in `slot` (tables with none left out): the
    /// `memlock` the kernel reports for the map in its fdinfo, which is what the map's memory
    /// accounting charges (since Linux 6.6 a hash map's actual use, not its capacity).
    pub fn memory_in(&self, slot: Slot) -> Result<Vec<TableMemory>, MapsError> {
        let mut out = Vec::new();
        for table in SlotTable::ALL {
            let name = table.map_name();
            let ids = self.outer(table).inner_ids(table, slot)?;
            if ids.is_empty() {
                continue;
            }
            let mut bytes = 0;
            for id in ids {
                let inner = MapData::from_id(id).map_err(map_err(name))?;
                bytes +=
                    sys::map_memlock(inner.fd().as_fd()).map_err(syscall_err(name, "fdinfo"))?;
            }
            out.push(TableMemory { table, bytes });
        }
        Ok(out)
    }
}

/// The kernel memory of one table's inner map (see [`KernelSlots::memory_in`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableMemory {
    pub table: SlotTable,
    pub bytes: u64,
}

impl SlotMaps for KernelSlots {
    type Filled = KernelGeneration;

    fn active_slot(&self) -> Result<Slot, MapsError> {
        let mut index: u32 = 0;
        sys::map_lookup_elem(self.active.fd().as_fd(), &0u32, &mut index)
            .map_err(syscall_err(map_names::ACTIVE, "lookup"))?;
        Slot::from_index(index)
    }

    fn generation_in(&self, slot: Slot) -> Result<Option<GenerationValue>, MapsError> {
        let entry = SlotTable::Generation.entry(slot, 0);
        let Some(id) = self.outer(SlotTable::Generation).inner_id(entry)? else {
            return Ok(None);
        };
        let inner: HashMap<MapData, u32, GenerationValue> = MapData::from_id(id)
            .and_then(Map::from_map_data)
            .and_then(HashMap::try_from)
            .map_err(map_err(map_names::GENERATION))?;
        match inner.get(&0, 0) {
            Ok(value) => Ok(Some(value)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(map_names::GENERATION)(e)),
        }
    }

    fn fill(
        &self,
        header: GenerationValue,
        snapshot: &Snapshot,
        changes: &Changes,
    ) -> Result<KernelGeneration, MapsError> {
        let mut inner: [Vec<(u32, MapData)>; SlotTable::ALL.len()] = Default::default();
        for table in changes.tables() {
            let name = table.map_name();
            let a = &snapshot.authz;
            inner[table.position()] = match table {
                SlotTable::Generation => vec![(0, fill(name, [(0u32, header)].into_iter())?)],
                SlotTable::Services => fill_shards(
                    name,
                    table,
                    changes,
                    snapshot
                        .services
                        .iter()
                        .map(|r| (shard_of_service(&r.key), (r.key, r.value))),
                )?,
                SlotTable::Routes => fill_shards(
                    name,
                    table,
                    changes,
                    snapshot
                        .routes
                        .iter()
                        .map(|r| (shard_of_route(r.route_id), (r.route_id, r.value))),
                )?,
                SlotTable::BackendSets => {
                    fill_shards(name, table, changes, backend_set_entries(snapshot))?
                }
                SlotTable::Endpoints => fill_array_shards(
                    name,
                    table,
                    changes,
                    snapshot
                        .endpoints
                        .iter()
                        .map(|r| (shard_of_endpoint(&r.key), r.value)),
                )?,
                SlotTable::AuthzWorkloads => {
                    vec![(0, fill(name, a.workloads.iter().map(|r| (r.ip, r.value)))?)]
                }
                SlotTable::AuthzSources => {
                    vec![(
                        0,
                        fill_trie(name, a.sources.iter().map(|r| (r.key, r.value)))?,
                    )]
                }
                SlotTable::AuthzVerdicts => {
                    vec![(0, fill(name, a.verdicts.iter().map(|r| (r.key, r.value)))?)]
                }
            };
        }
        Ok(KernelGeneration { inner })
    }

    fn install(
        &self,
        table: SlotTable,
        slot: Slot,
        filled: &KernelGeneration,
    ) -> Result<(), MapsError> {
        let maps = &filled.inner[table.position()];
        if maps.is_empty() {
            return Ok(());
        }
        let entries: Vec<u32> = maps
            .iter()
            .map(|(shard, _)| table.entry(slot, *shard))
            .collect();
        let fds: Vec<BorrowedFd<'_>> = maps.iter().map(|(_, map)| map.fd().as_fd()).collect();
        self.outer(table).set_all(&entries, &fds)
    }

    fn flip(&self, slot: Slot) -> Result<(), MapsError> {
        sys::map_update_elem(self.active.fd().as_fd(), &0u32, &slot.index())
            .map_err(syscall_err(map_names::ACTIVE, "update"))
    }

    /// Re-installs the live slot's generation map: an update of an `ARRAY_OF_MAPS` entry returns
    /// only after `synchronize_rcu()` (the kernel's `maybe_wait_bpf_programs`).
    fn grace_period_barrier(&self) -> Result<(), MapsError> {
        let slot = self.active_slot()?;
        let generation = self.outer(SlotTable::Generation);
        let entry = SlotTable::Generation.entry(slot, 0);
        let Some(id) = generation.inner_id(entry)? else {
            return Ok(()); // nothing was ever installed: no program can be using a slot
        };
        let inner = MapData::from_id(id).map_err(map_err(map_names::GENERATION))?;
        generation.set(entry, inner.fd().as_fd())
    }

    fn read(&self, table: SlotTable, slot: Slot) -> Result<Option<TableRecords>, MapsError> {
        if table == SlotTable::Endpoints {
            return self.read_endpoints(slot);
        }
        let ids = self.outer(table).inner_ids(table, slot)?;
        if ids.is_empty() {
            return Ok(None);
        }
        let mut records: Option<TableRecords> = None;
        for id in ids {
            let shard = read_inner(table, id)?;
            records = Some(match records {
                None => shard,
                Some(so_far) => so_far.joined(shard),
            });
        }
        Ok(records)
    }
}

/// The records of one inner map of `table`, sorted.
fn read_inner(table: SlotTable, id: u32) -> Result<TableRecords, MapsError> {
    let name = table.map_name();
    let inner = MapData::from_id(id)
        .and_then(Map::from_map_data)
        .map_err(map_err(name))?;
    Ok(match table {
        SlotTable::Generation => {
            TableRecords::Generation(read_hash::<u32, GenerationValue, _>(name, inner, |_, v| v)?)
        }
        SlotTable::Services => TableRecords::Services(read_hash(name, inner, |key, value| {
            ServiceRecord { key, value }
        })?),
        SlotTable::Routes => TableRecords::Routes(read_hash(name, inner, |route_id, value| {
            RouteRecord { route_id, value }
        })?),
        SlotTable::BackendSets => {
            TableRecords::BackendSets(read_hash(name, inner, |set_id, entry: BackendSetEntry| {
                BackendSetRecord {
                    set_id,
                    value: entry.value(),
                }
            })?)
        }
        // Read with their backend sets ([`KernelSlots::read_endpoints`]).
        SlotTable::Endpoints => unreachable!("the endpoints are read by read_endpoints"),
        SlotTable::AuthzWorkloads => {
            TableRecords::AuthzWorkloads(read_hash(name, inner, |ip, value| AuthzWorkloadRecord {
                ip,
                value,
            })?)
        }
        SlotTable::AuthzSources => TableRecords::AuthzSources(read_trie(name, inner)?),
        SlotTable::AuthzVerdicts => {
            TableRecords::AuthzVerdicts(read_hash(name, inner, |key, value| AuthzVerdictRecord {
                key,
                value,
            })?)
        }
    })
}

/// Every entry of an inner hash map as records, sorted.
fn read_hash<K: Pod, V: Pod, R: Ord>(
    name: &'static str,
    inner: Map,
    record: impl Fn(K, V) -> R,
) -> Result<Vec<R>, MapsError> {
    let map: HashMap<MapData, K, V> = HashMap::try_from(inner).map_err(map_err(name))?;
    let mut records = map
        .iter()
        .map(|entry| entry.map(|(k, v)| record(k, v)))
        .collect::<Result<Vec<R>, _>>()
        .map_err(map_err(name))?;
    records.sort_unstable();
    Ok(records)
}

/// Every entry of the sources LPM trie as records, sorted.
fn read_trie(name: &'static str, inner: Map) -> Result<Vec<AuthzSourceRecord>, MapsError> {
    let map: LpmTrie<MapData, Ip16, kmesh_common::AuthzSourceValue> =
        LpmTrie::try_from(inner).map_err(map_err(name))?;
    let mut records = map
        .iter()
        .map(|entry| {
            entry.map(|(key, value)| AuthzSourceRecord {
                key: AuthzSourceKey {
                    prefix_len: key.prefix_len(),
                    ip: key.data(),
                },
                value,
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(map_err(name))?;
    records.sort_unstable();
    Ok(records)
}

/// The backend sets' map entries, each with its shard: a set's endpoints start in its shard's
/// endpoints array where those of the sets before it in the shard end (the array holds the shard's
/// endpoints in the snapshot's order, by set id then index, and a valid snapshot's sets, sorted by
/// id, have exactly the endpoints `0..endpoint_count`).
fn backend_set_entries(
    snapshot: &Snapshot,
) -> impl Iterator<Item = (u32, (u32, BackendSetEntry))> + '_ {
    let mut next_endpoint = [0u32; CLUSTER_SHARDS as usize];
    snapshot.backend_sets.iter().map(move |r| {
        let shard = shard_of_backend_set(r.set_id);
        let next = &mut next_endpoint[shard as usize];
        let first = *next;
        *next = first.saturating_add(r.value.endpoint_count);
        (shard, (r.set_id, BackendSetEntry::new(r.value, first)))
    })
}

/// The backend sets map's entries of one inner map, by set id.
fn read_backend_set_entries(id: u32) -> Result<Vec<(u32, BackendSetEntry)>, MapsError> {
    let name = map_names::BACKEND_SETS;
    let inner = MapData::from_id(id)
        .and_then(Map::from_map_data)
        .map_err(map_err(name))?;
    read_hash(name, inner, |set_id, entry| (set_id, entry))
}

/// A fresh inner hash map per shard of `table` that `changes` names, holding the entries of
/// `records` (each with its shard) of that shard; an emptied shard gets an empty map.
fn fill_shards<K: Pod, V: Pod>(
    name: &'static str,
    table: SlotTable,
    changes: &Changes,
    records: impl Iterator<Item = (u32, (K, V))>,
) -> Result<Vec<(u32, MapData)>, MapsError> {
    shard_buckets(table, changes, records)
        .into_iter()
        .map(|(shard, bucket)| Ok((shard, fill(name, bucket.into_iter())?)))
        .collect()
}

/// A fresh inner array per shard of `table` that `changes` names, holding the values of `values`
/// (each with its shard) of that shard, in order.
fn fill_array_shards<V: Pod>(
    name: &'static str,
    table: SlotTable,
    changes: &Changes,
    values: impl Iterator<Item = (u32, V)>,
) -> Result<Vec<(u32, MapData)>, MapsError> {
    shard_buckets(table, changes, values)
        .into_iter()
        .map(|(shard, bucket)| {
            let map = create_inner::<u32, V>(
                name,
                sys::BPF_MAP_TYPE_ARRAY,
                bucket.len(),
                INNER_ARRAY_FLAGS,
            )?;
            // A shard holds at most the snapshot's endpoints, far fewer than 2^32.
            let indexed = bucket.into_iter().enumerate().map(|(i, v)| (i as u32, v));
            Ok((shard, fill_batches(name, map, indexed)?))
        })
        .collect()
}

/// The items of the shards of `table` that `changes` names, by shard, in order; an emptied shard
/// gets no items.
fn shard_buckets<T>(
    table: SlotTable,
    changes: &Changes,
    items: impl Iterator<Item = (u32, T)>,
) -> Vec<(u32, Vec<T>)> {
    let mut buckets: Vec<Vec<T>> = (0..table.shards()).map(|_| Vec::new()).collect();
    for (shard, item) in items {
        if changes.contains(table, shard)
            && let Some(bucket) = buckets.get_mut(shard as usize)
        {
            bucket.push(item);
        }
    }
    changes
        .shards(table)
        .map(|shard| (shard, std::mem::take(&mut buckets[shard as usize])))
        .collect()
}

/// A fresh inner hash map holding `entries`, sized to fit them exactly.
fn fill<K: Pod, V: Pod>(
    name: &'static str,
    entries: impl ExactSizeIterator<Item = (K, V)>,
) -> Result<MapData, MapsError> {
    let map = create_inner::<K, V>(name, sys::BPF_MAP_TYPE_HASH, entries.len(), INNER_MAP_FLAGS)?;
    fill_batches(name, map, entries)
}

/// A fresh inner LPM trie holding `entries` (keys in the kernel's `bpf_lpm_trie_key_u8` layout),
/// sized to fit them exactly. The kernel only creates tries with `BPF_F_NO_PREALLOC`, the flag
/// of every inner map here.
fn fill_trie<K: Pod, V: Pod>(
    name: &'static str,
    entries: impl ExactSizeIterator<Item = (K, V)>,
) -> Result<MapData, MapsError> {
    let map = create_inner::<K, V>(
        name,
        sys::BPF_MAP_TYPE_LPM_TRIE,
        entries.len(),
        INNER_MAP_FLAGS,
    )?;
    fill_batches(name, map, entries)
}

/// A fresh, empty inner map of `map_type` for `len` entries (the kernel wants at least one), with
/// `flags` (its template's).
fn create_inner<K: Pod, V: Pod>(
    name: &'static str,
    map_type: u32,
    len: usize,
    flags: u32,
) -> Result<MapData, MapsError> {
    let definition = aya_obj::Map::new_from_params(
        map_type,
        size_of::<K>() as u32,
        size_of::<V>() as u32,
        len.max(1) as u32,
        flags,
    );
    MapData::create(definition, name, None).map_err(map_err(name))
}

/// Writes `entries` into `map` (not yet visible to any program).
fn fill_batches<K: Pod, V: Pod>(
    name: &'static str,
    map: MapData,
    entries: impl ExactSizeIterator<Item = (K, V)>,
) -> Result<MapData, MapsError> {
    let (keys, values): (Vec<K>, Vec<V>) = entries.unzip();
    // One syscall per chunk rather than one per entry: filling is most of a large swap's cost.
    for (k, v) in keys.chunks(FILL_BATCH).zip(values.chunks(FILL_BATCH)) {
        sys::map_update_batch(map.fd().as_fd(), k, v).map_err(syscall_err(name, "batch update"))?;
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

    pub fn entries(&self) -> Result<BTreeMap<u64, EnrolledNetns>, MapsError> {
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
    pub authz_allowed: u64,
    pub authz_denied: u64,
    pub authz_node_exempt: u64,
    pub authz_counters_full: u64,
    pub waypoint_origin_failed: u64,
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
            authz_allowed: sum(counter::AUTHZ_ALLOWED)?,
            authz_denied: sum(counter::AUTHZ_DENIED)?,
            authz_node_exempt: sum(counter::AUTHZ_NODE_EXEMPT)?,
            authz_counters_full: sum(counter::AUTHZ_COUNTERS_FULL)?,
            waypoint_origin_failed: sum(counter::WAYPOINT_ORIGIN_FAILED)?,
        })
    }
}
