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

/// The service each endpoint of this node's workloads is a backend of: what names the
/// `destination_service` of an inbound connection, whose server never sees the address the
/// client dialed (the client's node rewrote it). Built once per snapshot ([`EndpointServices::of`]),
/// looked up per connection (a binary search).
///
/// An endpoint several services select (two Services over one pod port) is named after the one
/// with the smallest host, then the smallest id: a rule of the snapshot alone, the same on every
/// node; a service without names comes after every named one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointServices {
    /// (address, port) to service id, sorted by (address, port), unique.
    by_endpoint: Vec<((Ip16, u16), u32)>,
}

impl EndpointServices {
    /// The index of `snapshot`: every endpoint, reached from a service through its route and
    /// backend sets, whose address is a workload of the node (`snapshot.workloads`).
    pub fn of(snapshot: &Snapshot) -> EndpointServices {
        let names = snapshot.names();
        let rank = |service_id: u32| {
            let host = names
                .service_by_id(service_id)
                .map(|n| n.host)
                .unwrap_or("");
            (host.is_empty(), host, service_id)
        };
        let local = |ip: &Ip16| {
            snapshot
                .workloads
                .binary_search_by(|w| w.ip.cmp(ip))
                .is_ok()
        };
        let mut best: std::collections::BTreeMap<(Ip16, u16), u32> = Default::default();
        for service in &snapshot.services {
            let service_id = service.value.service_id;
            let Ok(route) = snapshot
                .routes
                .binary_search_by_key(&service.value.route_id, |r| r.route_id)
            else {
                continue;
            };
            let route = &snapshot.routes[route].value;
            let count = (route.destination_count as usize).min(route.backend_set.len());
            for &set_id in &route.backend_set[..count] {
                let start = snapshot
                    .endpoints
                    .partition_point(|e| e.key.set_id < set_id);
                let set = snapshot.endpoints[start..]
                    .iter()
                    .take_while(|e| e.key.set_id == set_id);
                for endpoint in set.filter(|e| local(&e.value.ip)) {
                    let key = (endpoint.value.ip, endpoint.value.port);
                    best.entry(key)
                        .and_modify(|held| {
                            if rank(service_id) < rank(*held) {
                                *held = service_id;
                            }
                        })
                        .or_insert(service_id);
                }
            }
        }
        EndpointServices {
            by_endpoint: best.into_iter().collect(),
        }
    }

    /// The id of the service `ip`:`port` is named after, if it is an endpoint of one.
    pub fn service_id(&self, ip: &Ip16, port: u16) -> Option<u32> {
        let key = (*ip, port);
        let index = self
            .by_endpoint
            .binary_search_by(|(k, _)| k.cmp(&key))
            .ok()?;
        self.by_endpoint.get(index).map(|(_, id)| *id)
    }

    /// How many endpoints the index holds.
    pub fn len(&self) -> usize {
        self.by_endpoint.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_endpoint.is_empty()
    }
}
