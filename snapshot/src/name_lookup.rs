//! Reading the names sections of a snapshot: [`SnapshotNames`] borrows a snapshot and answers
//! "which workload holds this address" and "which service is this VIP:port" with the strings of
//! the table, without copying them. Lookups are binary searches in the sorted tables. Meant for a
//! validated snapshot (a decoded one); on one that is not, a broken reference reads as no name,
//! never a panic.

use kmesh_common::names::{ServiceNameRecord, WorkloadNameRecord};
use kmesh_common::{Ip16, ServiceKey};

use crate::Snapshot;
use crate::validate_names::string_at;

/// The names of the pod holding an address; `""` where the snapshot names none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkloadName<'a> {
    /// Istio's `workload` label (the Deployment's name for a Deployment's pod).
    pub workload: &'a str,
    pub namespace: &'a str,
    pub service_account: &'a str,
    /// Istio's canonical service.
    pub app: &'a str,
    /// Istio's canonical revision.
    pub version: &'a str,
}

/// The names of a service; `""` where the snapshot names none (a ServiceEntry has no name or
/// namespace).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceName<'a> {
    /// `reviews.default.svc.cluster.local`, or a ServiceEntry's host.
    pub host: &'a str,
    pub name: &'a str,
    pub namespace: &'a str,
}

/// The names of a snapshot, borrowed from it.
#[derive(Clone, Copy, Debug)]
pub struct SnapshotNames<'a> {
    snapshot: &'a Snapshot,
}

impl Snapshot {
    /// The names of this snapshot, for lookups.
    pub fn names(&self) -> SnapshotNames<'_> {
        SnapshotNames { snapshot: self }
    }
}

impl<'a> SnapshotNames<'a> {
    /// The names of the pod holding `ip`, if the snapshot has them.
    pub fn workload(&self, ip: &Ip16) -> Option<WorkloadName<'a>> {
        let records = &self.snapshot.names.workloads;
        let index = records.binary_search_by(|r| r.ip.cmp(ip)).ok()?;
        records.get(index).map(|r| self.workload_of(r))
    }

    /// The names of the service at `key` (a VIP, port and protocol of the services table), if the
    /// snapshot has them.
    pub fn service(&self, key: &ServiceKey) -> Option<ServiceName<'a>> {
        let services = &self.snapshot.services;
        let index = services.binary_search_by(|s| s.key.cmp(key)).ok()?;
        self.service_by_id(services.get(index)?.value.service_id)
    }

    /// The names of the service `service_id`, if the snapshot has them.
    pub fn service_by_id(&self, service_id: u32) -> Option<ServiceName<'a>> {
        let records = &self.snapshot.names.services;
        let index = records
            .binary_search_by_key(&service_id, |r| r.service_id)
            .ok()?;
        records.get(index).map(|r| self.service_of(r))
    }

    /// The string at `offset` of the table; `None` for `NO_NAME`.
    pub fn string(&self, offset: u32) -> Option<&'a str> {
        string_at(&self.snapshot.names.strings, offset)
    }

    fn text(&self, offset: u32) -> &'a str {
        self.string(offset).unwrap_or_default()
    }

    fn workload_of(&self, r: &WorkloadNameRecord) -> WorkloadName<'a> {
        WorkloadName {
            workload: self.text(r.workload),
            namespace: self.text(r.namespace),
            service_account: self.text(r.service_account),
            app: self.text(r.app),
            version: self.text(r.version),
        }
    }

    fn service_of(&self, r: &ServiceNameRecord) -> ServiceName<'a> {
        ServiceName {
            host: self.text(r.host),
            name: self.text(r.name),
            namespace: self.text(r.namespace),
        }
    }
}
