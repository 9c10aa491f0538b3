//! The names section of a snapshot: the strings Istio's telemetry labels need (workload,
//! namespace, service account, app, version; a service's host, name and namespace), for user space
//! only. The agent never loads these records into a map and the programs never see a string; the
//! agent joins the addresses and ids the kernel reports with these names.
//!
//! Three sections, like the map records (each record is the in-memory bytes of one of these
//! `#[repr(C)]` types):
//! - the string table, in [`NameBytes`] chunks of 8 bytes: the concatenation of entries, each a
//!   `u16` little-endian length (1..=[`MAX_NAME_LEN`]) followed by that many bytes of UTF-8, every
//!   string once, then zeros up to the next multiple of 8. A string is referred to by the byte
//!   offset of its entry (its length field) in the table; [`NO_NAME`] means none;
//! - [`WorkloadNameRecord`]: the names of the pod holding an address, sorted by address;
//! - [`ServiceNameRecord`]: the names of a service, by the `service_id` of the services table.

use crate::Ip16;

/// Offset meaning "no string".
pub const NO_NAME: u32 = u32::MAX;

/// Longest string of the table: a DNS subdomain, the longest Kubernetes object name.
pub const MAX_NAME_LEN: usize = 253;

/// Bytes of an entry's length field.
pub const NAME_LEN_BYTES: usize = 2;

/// One 8-byte chunk of the string table; the table is a whole number of chunks.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NameBytes {
    pub bytes: [u8; 8],
}

/// The names of the pod holding `ip` (every pod of the cluster with an address, in the mesh or
/// not). Each field is the offset of a string in the table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkloadNameRecord {
    pub ip: Ip16,
    /// Istio's `workload` label: the pod's owner (a Deployment's name, not its ReplicaSet's).
    pub workload: u32,
    pub namespace: u32,
    pub service_account: u32,
    /// Istio's canonical service (`app` label).
    pub app: u32,
    /// Istio's canonical revision (`version` label).
    pub version: u32,
}

/// The names of the service `service_id` (a `ServiceValue::service_id`). Each name field is the
/// offset of a string in the table; `name` and `namespace` are [`NO_NAME`] for a ServiceEntry
/// host, which has neither.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceNameRecord {
    pub service_id: u32,
    /// The fully qualified host: `name.namespace.svc.cluster.local`, or a ServiceEntry's host.
    pub host: u32,
    pub name: u32,
    pub namespace: u32,
}

const _: () = {
    assert!(size_of::<NameBytes>() == 8);
    assert!(size_of::<WorkloadNameRecord>() == 36);
    assert!(size_of::<ServiceNameRecord>() == 16);
};
