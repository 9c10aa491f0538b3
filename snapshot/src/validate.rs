//! The content rules of a snapshot (see [`crate::format`]). The decoder runs them on every input and
//! the encoder on every snapshot it writes, so no invalid snapshot is ever produced or accepted.
//!
//! Every check is linear in the size of the snapshot, apart from the cross-table lookups which are
//! binary searches in sorted tables; the endpoint-to-set check is a merge walk.

use kmesh_common::{
    IPPROTO_TCP, MAX_ROUTE_DESTINATIONS, RouteRecord, access_log, lb_policy, log_level, mode,
    service_flags,
};

use crate::Snapshot;
use crate::error::{Table, ValidationError, describe_service, ip_to_addr};
use crate::format::MAX_NODE_NAME_LEN;
use crate::parts::{ClusterView, NodeView};

impl Snapshot {
    /// Checks every content rule of the format. The tables must already be sorted ([`Snapshot::sort`]).
    ///
    /// Rules are checked table by table in the order of their kinds (node name, node config,
    /// services, routes, backend sets, endpoints, workloads), then the references between tables,
    /// then the authorization tables the same way (`validate_authz`), then the names
    /// (`validate_names`), so the first error reported is deterministic. No rule relates a node's
    /// own tables to the cluster's (see [`crate::parts`]), so the rules are those of the two parts.
    pub fn validate(&self) -> Result<(), ValidationError> {
        let (node, cluster) = (self.node_view(), self.cluster_view());
        validate_node_name(node.node_name.as_bytes())?;
        node.validate_config()?;
        cluster.validate_tables()?;
        node.validate_workloads()?;
        cluster.validate_references()?;
        node.validate_authz()?;
        cluster.validate_names()
    }
}

impl NodeView<'_> {
    /// The rules of the node part, in the order of [`Snapshot::validate`].
    pub(crate) fn validate(&self) -> Result<(), ValidationError> {
        validate_node_name(self.node_name.as_bytes())?;
        self.validate_config()?;
        self.validate_workloads()?;
        self.validate_authz()
    }

    fn validate_config(&self) -> Result<(), ValidationError> {
        let c = self.config;
        if !matches!(
            c.mode,
            mode::DISABLED | mode::KERNEL_NATIVE | mode::DUAL_ENGINE
        ) {
            return Err(ValidationError::UnknownMode { mode: c.mode });
        }
        if !matches!(c.access_log, access_log::OFF | access_log::ON) {
            return Err(ValidationError::UnknownAccessLog {
                access_log: c.access_log,
            });
        }
        if log_level::name(c.log_level).is_none() {
            return Err(ValidationError::UnknownLogLevel {
                log_level: c.log_level,
            });
        }
        if c.reserved != [0; 2] {
            return Err(ValidationError::NodeConfigReserved {
                reserved: c.reserved,
            });
        }
        Ok(())
    }

    fn validate_workloads(&self) -> Result<(), ValidationError> {
        const T: Table = Table::Workloads;
        let describe = |ip: &kmesh_common::Ip16| ip_to_addr(ip).to_string();
        for (index, w) in self.workloads.iter().enumerate() {
            if let Some(p) = index.checked_sub(1).and_then(|i| self.workloads.get(i)) {
                check_order(T, index, &p.ip, &w.ip, describe)?;
            }
            if w.pad != 0 {
                return Err(ValidationError::NonZeroPad {
                    table: T,
                    index,
                    record: describe(&w.ip),
                    field: "pad",
                    value: w.pad,
                });
            }
        }
        Ok(())
    }
}

impl ClusterView<'_> {
    /// The rules of the cluster part, in the order of [`Snapshot::validate`].
    pub(crate) fn validate(&self) -> Result<(), ValidationError> {
        self.validate_tables()?;
        self.validate_references()?;
        self.validate_names()
    }

    /// Each table's own rules.
    fn validate_tables(&self) -> Result<(), ValidationError> {
        self.validate_services()?;
        self.validate_routes()?;
        self.validate_backend_sets()?;
        self.validate_endpoints()
    }

    /// The references between the tables; lookups rely on the tables being sorted, which
    /// [`validate_tables`](Self::validate_tables) established.
    fn validate_references(&self) -> Result<(), ValidationError> {
        self.validate_service_routes()?;
        self.validate_route_sets()?;
        self.validate_set_endpoints()
    }

    fn validate_services(&self) -> Result<(), ValidationError> {
        const T: Table = Table::Services;
        for (index, s) in self.services.iter().enumerate() {
            if let Some(p) = index.checked_sub(1).and_then(|i| self.services.get(i)) {
                check_order(T, index, &p.key, &s.key, describe_service)?;
            }
            if s.key.protocol != IPPROTO_TCP {
                return Err(ValidationError::ServiceProtocol {
                    index,
                    record: describe_service(&s.key),
                    protocol: s.key.protocol,
                });
            }
            if s.key.pad != 0 {
                return Err(ValidationError::NonZeroPad {
                    table: T,
                    index,
                    record: describe_service(&s.key),
                    field: "pad",
                    value: u32::from(s.key.pad),
                });
            }
            if s.key.port == 0 {
                return Err(ValidationError::ZeroPort {
                    table: T,
                    index,
                    record: describe_service(&s.key),
                });
            }
            if s.value.flags & !service_flags::ALL != 0 {
                return Err(ValidationError::UnknownServiceFlags {
                    index,
                    record: describe_service(&s.key),
                    flags: s.value.flags,
                });
            }
        }
        Ok(())
    }

    fn validate_routes(&self) -> Result<(), ValidationError> {
        for (index, r) in self.routes.iter().enumerate() {
            if let Some(p) = index.checked_sub(1).and_then(|i| self.routes.get(i)) {
                check_order(Table::Routes, index, &p.route_id, &r.route_id, |id| {
                    format!("route_id {id}")
                })?;
            }
            validate_route(index, r)?;
        }
        Ok(())
    }

    fn validate_backend_sets(&self) -> Result<(), ValidationError> {
        for (index, s) in self.backend_sets.iter().enumerate() {
            if let Some(p) = index.checked_sub(1).and_then(|i| self.backend_sets.get(i)) {
                check_order(Table::BackendSets, index, &p.set_id, &s.set_id, |id| {
                    format!("set_id {id}")
                })?;
            }
            if s.value.lb_policy >= lb_policy::COUNT {
                return Err(ValidationError::UnknownLbPolicy {
                    index,
                    set_id: s.set_id,
                    lb_policy: s.value.lb_policy,
                });
            }
        }
        Ok(())
    }

    fn validate_endpoints(&self) -> Result<(), ValidationError> {
        const T: Table = Table::Endpoints;
        let describe =
            |k: &kmesh_common::EndpointKey| format!("set {}, index {}", k.set_id, k.index);
        for (index, e) in self.endpoints.iter().enumerate() {
            if let Some(p) = index.checked_sub(1).and_then(|i| self.endpoints.get(i)) {
                check_order(T, index, &p.key, &e.key, describe)?;
            }
            if e.value.port == 0 {
                return Err(ValidationError::ZeroPort {
                    table: T,
                    index,
                    record: describe(&e.key),
                });
            }
            if e.value.pad != 0 {
                return Err(ValidationError::NonZeroPad {
                    table: T,
                    index,
                    record: describe(&e.key),
                    field: "pad",
                    value: u32::from(e.value.pad),
                });
            }
        }
        Ok(())
    }

    fn validate_service_routes(&self) -> Result<(), ValidationError> {
        for (index, s) in self.services.iter().enumerate() {
            let route_id = s.value.route_id;
            if self
                .routes
                .binary_search_by_key(&route_id, |r| r.route_id)
                .is_err()
            {
                return Err(ValidationError::ServiceRouteMissing {
                    index,
                    record: describe_service(&s.key),
                    route_id,
                });
            }
        }
        Ok(())
    }

    fn validate_route_sets(&self) -> Result<(), ValidationError> {
        for (index, r) in self.routes.iter().enumerate() {
            // destination_count <= MAX_ROUTE_DESTINATIONS was checked in validate_route.
            let count = r.value.destination_count as usize;
            for (destination, &set_id) in r.value.backend_set.iter().enumerate().take(count) {
                if self
                    .backend_sets
                    .binary_search_by_key(&set_id, |s| s.set_id)
                    .is_err()
                {
                    return Err(ValidationError::RouteBackendSetMissing {
                        index,
                        route_id: r.route_id,
                        destination,
                        set_id,
                    });
                }
            }
        }
        Ok(())
    }

    /// Merge walk over the sorted sets and the sorted endpoints: each set must own exactly the
    /// endpoints `(set_id, 0..endpoint_count)`, and every endpoint must belong to a set. Linear in
    /// the number of sets plus endpoints, whatever `endpoint_count` claims (the inner loop stops at
    /// the first missing endpoint).
    fn validate_set_endpoints(&self) -> Result<(), ValidationError> {
        let mut endpoints = self.endpoints.iter().enumerate().peekable();
        let set_missing =
            |index: usize, e: &kmesh_common::EndpointRecord| ValidationError::EndpointSetMissing {
                index,
                set_id: e.key.set_id,
                endpoint_index: e.key.index,
            };
        for (set_index, set) in self.backend_sets.iter().enumerate() {
            // An endpoint sorting before this set and not consumed by an earlier set names a set
            // that is not in the table.
            if let Some(&(index, e)) = endpoints.peek()
                && e.key.set_id < set.set_id
            {
                return Err(set_missing(index, e));
            }
            let count = set.value.endpoint_count;
            for expected in 0..count {
                let found = endpoints
                    .next_if(|(_, e)| e.key.set_id == set.set_id && e.key.index == expected);
                if found.is_none() {
                    return Err(ValidationError::EndpointMissing {
                        index: set_index,
                        set_id: set.set_id,
                        endpoint_count: count,
                        missing: expected,
                    });
                }
            }
            if let Some(&(index, e)) = endpoints.peek()
                && e.key.set_id == set.set_id
            {
                return Err(ValidationError::EndpointBeyondCount {
                    index,
                    set_id: e.key.set_id,
                    endpoint_index: e.key.index,
                    endpoint_count: count,
                });
            }
        }
        match endpoints.next() {
            Some((index, e)) => Err(set_missing(index, e)),
            None => Ok(()),
        }
    }
}

/// Checks that `key` is strictly greater than `previous`, the key of the record before it.
pub(crate) fn check_order<K: Ord>(
    table: Table,
    index: usize,
    previous: &K,
    key: &K,
    describe: impl Fn(&K) -> String,
) -> Result<(), ValidationError> {
    match previous.cmp(key) {
        core::cmp::Ordering::Less => Ok(()),
        core::cmp::Ordering::Equal => Err(ValidationError::DuplicateKey {
            table,
            index,
            record: describe(key),
        }),
        core::cmp::Ordering::Greater => Err(ValidationError::OutOfOrder {
            table,
            index,
            record: describe(key),
            previous: describe(previous),
        }),
    }
}

/// The rules of one route that need no other table.
fn validate_route(index: usize, r: &RouteRecord) -> Result<(), ValidationError> {
    let route_id = r.route_id;
    let v = &r.value;
    let count = v.destination_count;
    if count == 0 || count as usize > MAX_ROUTE_DESTINATIONS {
        return Err(ValidationError::RouteDestinationCount {
            index,
            route_id,
            count,
        });
    }
    let used = count as usize;
    // Cumulative weights strictly increase from 0: every destination's weight is positive.
    let mut previous = 0u32;
    for (destination, &weight) in v.cumulative_weight.iter().enumerate().take(used) {
        if weight <= previous {
            return Err(ValidationError::RouteWeightNotIncreasing {
                index,
                route_id,
                destination,
                weight,
                previous,
            });
        }
        previous = weight;
    }
    if v.total_weight != previous {
        return Err(ValidationError::RouteTotalWeight {
            index,
            route_id,
            total_weight: v.total_weight,
            last: previous,
        });
    }
    // Unused entries are zero so that the encoding of a route is unique.
    let unused = v
        .cumulative_weight
        .iter()
        .zip(&v.backend_set)
        .enumerate()
        .skip(used);
    for (slot, (&weight, &set)) in unused {
        for (field, value) in [("cumulative_weight", weight), ("backend_set", set)] {
            if value != 0 {
                return Err(ValidationError::RouteUnusedSlot {
                    index,
                    route_id,
                    field,
                    slot,
                    value,
                    count,
                });
            }
        }
    }
    Ok(())
}

/// A node name is a DNS subdomain as Kubernetes validates node names (RFC 1123): 1..=253 bytes of
/// dot-separated labels made of `a-z`, `0-9` and `-`, each label starting and ending with a letter
/// or digit. Takes bytes so the decoder can check a name before knowing it is UTF-8.
pub(crate) fn validate_node_name(name: &[u8]) -> Result<(), ValidationError> {
    let fail = |reason| ValidationError::InvalidNodeName {
        name: shown_name(name),
        reason,
    };
    if name.is_empty() {
        return Err(fail("is empty"));
    }
    if name.len() > MAX_NODE_NAME_LEN {
        return Err(fail("is longer than 253 bytes"));
    }
    let allowed = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-' || *b == b'.';
    if !name.iter().all(allowed) {
        return Err(fail(
            "contains a character other than a-z, 0-9, '-' and '.'",
        ));
    }
    for label in name.split(|&b| b == b'.') {
        let alnum = |b: &u8| b.is_ascii_alphanumeric();
        if label.is_empty() {
            return Err(fail(
                "has an empty label (leading, trailing or repeated '.')",
            ));
        }
        if !label.first().is_some_and(alnum) || !label.last().is_some_and(alnum) {
            return Err(fail("has a label that starts or ends with '-'"));
        }
    }
    Ok(())
}

/// The name as shown in an error message: lossy UTF-8, cut after 253 bytes so a 64 KiB name does
/// not become a 64 KiB log line.
pub(crate) fn shown_name(name: &[u8]) -> String {
    match name.get(..MAX_NODE_NAME_LEN) {
        Some(head) if name.len() > MAX_NODE_NAME_LEN => {
            format!("{}...", String::from_utf8_lossy(head))
        }
        _ => String::from_utf8_lossy(name).into_owned(),
    }
}
