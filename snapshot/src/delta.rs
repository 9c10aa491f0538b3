//! What changed between two compiles' cluster tables, record by record: the content of the
//! incremental snapshots of the scale issue (`docs/incremental-snapshots.md`). A one-endpoint
//! change in a cluster of 10,000 services is one endpoint record here, where a snapshot is 10.8 MB.
//!
//! [`ClusterDelta::between`] diffs two [`ClusterTables`] (a merge walk of each sorted table, linear
//! in their sizes); [`ClusterDelta::apply`] turns the older tables into the newer ones, and
//! refuses a delta that does not fit them. A removal carries the whole record the base holds, so
//! that applying it checks the base as well as the key, and so that format 4's section hashes
//! ([`crate::ClusterHashes`]) can be updated by the records removed and added alone
//! ([`ClusterDelta::apply_hashed`]). [`crate::delta_format`] puts a delta on the wire.
//!
//! The names' string table is a whole: records refer to its strings by offset, so it is carried
//! whole when it changed.

use kmesh_common::names::{ServiceNameRecord, WorkloadNameRecord};
use kmesh_common::{
    BackendSetRecord, EndpointKey, EndpointRecord, Ip16, RouteRecord, ServiceKey, ServiceRecord,
};

use crate::error::{Table, ValidationError};
use crate::format::WireRecord;
use crate::parts::ClusterView;
use crate::{ClusterHashes, ClusterTables, NameTables, TableHash};

/// A record of a table sorted by a key, unique per key.
pub trait Keyed: WireRecord + Eq {
    type Key: Ord + Copy + core::fmt::Debug;
    fn key(&self) -> Self::Key;
}

impl Keyed for ServiceRecord {
    type Key = ServiceKey;
    fn key(&self) -> ServiceKey {
        self.key
    }
}

impl Keyed for RouteRecord {
    type Key = u32;
    fn key(&self) -> u32 {
        self.route_id
    }
}

impl Keyed for BackendSetRecord {
    type Key = u32;
    fn key(&self) -> u32 {
        self.set_id
    }
}

impl Keyed for EndpointRecord {
    type Key = EndpointKey;
    fn key(&self) -> EndpointKey {
        self.key
    }
}

impl Keyed for WorkloadNameRecord {
    type Key = Ip16;
    fn key(&self) -> Ip16 {
        self.ip
    }
}

impl Keyed for ServiceNameRecord {
    type Key = u32;
    fn key(&self) -> u32 {
        self.service_id
    }
}

/// The changes to one table: the records removed (as the base holds them), and the records added
/// or changed (as the result holds them), each sorted by key with no key twice, and no key in both.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableDelta<R: Keyed> {
    pub removed: Vec<R>,
    pub upserted: Vec<R>,
}

impl<R: Keyed> Default for TableDelta<R> {
    fn default() -> Self {
        TableDelta {
            removed: Vec::new(),
            upserted: Vec::new(),
        }
    }
}

/// A delta that does not fit the tables it is applied to, or is not well formed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DeltaError {
    #[error("{table}: the delta removes {key}, which the tables do not hold")]
    RemovedMissing { table: Table, key: String },

    #[error("{table}: the delta removes {key} as a record other than the one the tables hold")]
    RemovedDiffers { table: Table, key: String },

    #[error(
        "{table}: the delta's {list} are not sorted by key, or name a key twice, at index {index}"
    )]
    Unsorted {
        table: Table,
        list: &'static str,
        index: usize,
    },

    #[error("{table}: the delta both removes and changes {key}")]
    RemovedAndUpserted { table: Table, key: String },

    #[error("{table}: the tables the delta is applied to are not sorted by key at index {index}")]
    BaseUnsorted { table: Table, index: usize },

    /// The snapshot held was not read from format 4, so it has no section hashes to update.
    #[error("the snapshot held is in format {format}; a delta applies only to a format 4 snapshot")]
    BaseWithoutHashes { format: u16 },

    #[error(
        "the delta applies to the cluster part {delta:016x}, the snapshot held has {held:016x}"
    )]
    OtherBase { delta: u64, held: u64 },

    /// The result is not the snapshot the delta's header names.
    #[error("content hash mismatch: the delta names {header:016x}, its result has {computed:016x}")]
    HashMismatch { header: u64, computed: u64 },

    #[error("{table} table would hold {count} records, this node's limit is {capacity}")]
    OverCapacity {
        table: Table,
        count: u64,
        capacity: u32,
    },

    #[error("the names' string table would be {bytes} bytes, this node's limit is {capacity}")]
    NameBytesOverCapacity { bytes: u64, capacity: u32 },

    /// The result breaks a content rule.
    #[error(transparent)]
    Invalid(ValidationError),
}

impl<R: Keyed> TableDelta<R> {
    /// The changes from `old` to `new`, both sorted by key with unique keys (as a valid snapshot's
    /// tables are): a merge walk.
    pub fn between(old: &[R], new: &[R]) -> Self {
        let mut delta = TableDelta::default();
        let (mut o, mut n) = (old.iter().peekable(), new.iter().peekable());
        loop {
            match (o.peek(), n.peek()) {
                (Some(a), Some(b)) => match a.key().cmp(&b.key()) {
                    core::cmp::Ordering::Less => {
                        delta.removed.push(**a);
                        o.next();
                    }
                    core::cmp::Ordering::Greater => {
                        delta.upserted.push(**b);
                        n.next();
                    }
                    core::cmp::Ordering::Equal => {
                        if a != b {
                            delta.upserted.push(**b);
                        }
                        o.next();
                        n.next();
                    }
                },
                (Some(a), None) => {
                    delta.removed.push(**a);
                    o.next();
                }
                (None, Some(b)) => {
                    delta.upserted.push(**b);
                    n.next();
                }
                (None, None) => return delta,
            }
        }
    }

    /// Records removed or upserted.
    pub fn len(&self) -> usize {
        self.removed.len() + self.upserted.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `base` (sorted by key, unique) with the changes: a merge walk. Refuses, changing nothing, a
    /// delta whose lists are not sorted or overlap, or that removes a record `base` does not hold.
    /// An upsert of a key `base` lacks is an addition.
    pub fn apply(&self, base: &[R]) -> Result<Vec<R>, DeltaError> {
        self.apply_hashed(base, &mut TableHash::default())
    }

    /// [`apply`](Self::apply), which also counts the records it drops from `base` (removed or
    /// replaced) out of `hash` and the records it adds in: given the hash of `base`, `hash` ends
    /// as the hash of the result, at a cost in the size of the delta. Left as it was when the
    /// delta is refused.
    pub fn apply_hashed(&self, base: &[R], hash: &mut TableHash) -> Result<Vec<R>, DeltaError> {
        let table = R::TABLE;
        strictly_increasing(table, "removed records", self.removed.iter().map(R::key))?;
        strictly_increasing(table, "upserted records", self.upserted.iter().map(R::key))?;
        strictly_increasing(table, "base", base.iter().map(R::key)).map_err(|e| match e {
            DeltaError::Unsorted { index, .. } => DeltaError::BaseUnsorted { table, index },
            other => other,
        })?;
        let mut updated = *hash;
        let mut out = Vec::with_capacity(base.len() + self.upserted.len());
        let mut removed = self.removed.iter().peekable();
        let mut upserted = self.upserted.iter().peekable();
        let described = |key: R::Key| format!("{key:?}");
        for record in base {
            let key = record.key();
            while let Some(up) = upserted.next_if(|u| u.key() < key) {
                updated.add(up);
                out.push(*up);
            }
            if let Some(&gone) = removed.peek() {
                if gone.key() < key {
                    return Err(DeltaError::RemovedMissing {
                        table,
                        key: described(gone.key()),
                    });
                }
                if gone.key() == key {
                    removed.next();
                    if gone != record {
                        return Err(DeltaError::RemovedDiffers {
                            table,
                            key: described(key),
                        });
                    }
                    if upserted.peek().is_some_and(|u| u.key() == key) {
                        return Err(DeltaError::RemovedAndUpserted {
                            table,
                            key: described(key),
                        });
                    }
                    updated.remove(record);
                    continue;
                }
            }
            match upserted.next_if(|u| u.key() == key) {
                Some(changed) => {
                    updated.remove(record);
                    updated.add(changed);
                    out.push(*changed);
                }
                None => out.push(*record),
            }
        }
        if let Some(gone) = removed.next() {
            return Err(DeltaError::RemovedMissing {
                table,
                key: described(gone.key()),
            });
        }
        for up in upserted {
            updated.add(up);
            out.push(*up);
        }
        *hash = updated;
        Ok(out)
    }
}

/// Whether `keys` increase strictly; the index of the first that does not.
fn strictly_increasing<K: Ord>(
    table: Table,
    list: &'static str,
    keys: impl Iterator<Item = K>,
) -> Result<(), DeltaError> {
    let mut previous = None;
    for (index, key) in keys.enumerate() {
        if previous.as_ref().is_some_and(|p| *p >= key) {
            return Err(DeltaError::Unsorted { table, list, index });
        }
        previous = Some(key);
    }
    Ok(())
}

/// The changes from one compile's cluster tables to another's.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterDelta {
    pub services: TableDelta<ServiceRecord>,
    pub routes: TableDelta<RouteRecord>,
    pub backend_sets: TableDelta<BackendSetRecord>,
    pub endpoints: TableDelta<EndpointRecord>,
    /// The new string table, when it changed.
    pub name_strings: Option<Vec<u8>>,
    pub workload_names: TableDelta<WorkloadNameRecord>,
    pub service_names: TableDelta<ServiceNameRecord>,
}

impl ClusterDelta {
    /// The changes from `old` to `new`.
    pub fn between(old: &ClusterTables, new: &ClusterTables) -> Self {
        ClusterDelta {
            services: TableDelta::between(&old.services, &new.services),
            routes: TableDelta::between(&old.routes, &new.routes),
            backend_sets: TableDelta::between(&old.backend_sets, &new.backend_sets),
            endpoints: TableDelta::between(&old.endpoints, &new.endpoints),
            name_strings: (old.names.strings != new.names.strings)
                .then(|| new.names.strings.clone()),
            workload_names: TableDelta::between(&old.names.workloads, &new.names.workloads),
            service_names: TableDelta::between(&old.names.services, &new.names.services),
        }
    }

    /// `base` with the changes; refuses a delta that does not fit it (see [`TableDelta::apply`]).
    pub fn apply(&self, base: &ClusterTables) -> Result<ClusterTables, DeltaError> {
        let mut hashes = ClusterHashes::default();
        self.apply_view(base.view(), &mut hashes)
    }

    /// `base` with the changes, and the format 4 section hashes of the result given `base`'s
    /// (`hashes`), updated by the changed records alone; refuses a delta that does not fit `base`.
    pub fn apply_hashed(
        &self,
        base: &ClusterTables,
        hashes: &ClusterHashes,
    ) -> Result<(ClusterTables, ClusterHashes), DeltaError> {
        let mut hashes = *hashes;
        let tables = self.apply_view(base.view(), &mut hashes)?;
        Ok((tables, hashes))
    }

    /// See [`apply_hashed`](Self::apply_hashed); `hashes` is changed only on success.
    pub(crate) fn apply_view(
        &self,
        base: ClusterView<'_>,
        hashes: &mut ClusterHashes,
    ) -> Result<ClusterTables, DeltaError> {
        let mut h = *hashes;
        let tables = ClusterTables {
            services: self.services.apply_hashed(base.services, &mut h.services)?,
            routes: self.routes.apply_hashed(base.routes, &mut h.routes)?,
            backend_sets: self
                .backend_sets
                .apply_hashed(base.backend_sets, &mut h.backend_sets)?,
            endpoints: self
                .endpoints
                .apply_hashed(base.endpoints, &mut h.endpoints)?,
            names: NameTables {
                strings: match &self.name_strings {
                    Some(strings) => {
                        h.name_strings = TableHash::of_strings(strings);
                        strings.clone()
                    }
                    None => base.names.strings.clone(),
                },
                workloads: self
                    .workload_names
                    .apply_hashed(&base.names.workloads, &mut h.workload_names)?,
                services: self
                    .service_names
                    .apply_hashed(&base.names.services, &mut h.service_names)?,
            },
        };
        *hashes = h;
        Ok(tables)
    }

    /// Records removed or upserted, over every table (the string table not counted).
    pub fn records(&self) -> usize {
        self.services.len()
            + self.routes.len()
            + self.backend_sets.len()
            + self.endpoints.len()
            + self.workload_names.len()
            + self.service_names.len()
    }
}
