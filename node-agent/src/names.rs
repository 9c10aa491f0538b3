//! The agent's [`NameLookup`]: telemetry's names, read from a decoded snapshot. Workloads and
//! services come from the snapshot's names sections (`kmesh_snapshot::SnapshotNames`), policies
//! from its AuthzPolicies section; the service an inbound connection's destination is an endpoint
//! of from [`EndpointServices`], indexed once per live generation. Every lookup is a binary search
//! in a sorted table and borrows the snapshot's strings; nothing is copied per connection.
//!
//! A name the snapshot does not have is `None` (telemetry writes Istio's `unknown`), so labels are
//! bounded by the snapshot: never made from a raw address.
use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use kmesh_common::{IPPROTO_TCP, ServiceKey, ip16};
use kmesh_snapshot::{Decoded, EndpointServices, Snapshot};

use crate::connection::{NameLookup, ServiceNames, WorkloadNames};

/// The live snapshot as telemetry reads it: the decoded snapshot and the index of the services
/// of its endpoints, built once when the generation goes live.
#[derive(Debug)]
pub struct SnapshotLookup {
    decoded: Arc<Decoded>,
    endpoint_services: EndpointServices,
}

impl SnapshotLookup {
    pub fn new(decoded: Arc<Decoded>) -> SnapshotLookup {
        let endpoint_services = EndpointServices::of(&decoded.snapshot);
        SnapshotLookup {
            decoded,
            endpoint_services,
        }
    }

    fn snapshot(&self) -> &Snapshot {
        &self.decoded.snapshot
    }
}

impl NameLookup for SnapshotLookup {
    fn workload(&self, ip: IpAddr) -> Option<WorkloadNames<'_>> {
        // ip16 maps IPv4 (and keeps IPv4-mapped IPv6) as the snapshot stores addresses.
        self.snapshot().names().workload(&ip16(ip))
    }

    fn service(&self, address: SocketAddr) -> Option<ServiceNames<'_>> {
        let key = ServiceKey {
            ip: ip16(address.ip()),
            port: address.port(),
            protocol: IPPROTO_TCP,
            pad: 0,
        };
        self.snapshot().names().service(&key)
    }

    fn service_of_endpoint(&self, endpoint: SocketAddr) -> Option<ServiceNames<'_>> {
        let id = self
            .endpoint_services
            .service_id(&ip16(endpoint.ip()), endpoint.port())?;
        self.snapshot().names().service_by_id(id)
    }

    fn policy(&self, id: u32) -> Option<&str> {
        let policies = &self.snapshot().authz.policies;
        let index = policies.binary_search_by_key(&id, |p| p.policy).ok()?;
        let record = policies.get(index)?;
        let name = record.name.get(..usize::from(record.name_len))?;
        std::str::from_utf8(name).ok()
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv6Addr, SocketAddr};

    use kmesh_common::{authz::authz_policy_kind, lb_policy, mode};
    use kmesh_snapshot::builder::{Endpoint, SnapshotBuilder};
    use kmesh_snapshot::{Limits, ServiceName, Snapshot, WorkloadName};

    use super::SnapshotLookup;
    use crate::connection::NameLookup;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// A decoded snapshot with two named pods, a named service and a policy.
    fn snapshot() -> SnapshotLookup {
        let mut b = SnapshotBuilder::new("node-1", 1, mode::KERNEL_NATIVE);
        let set = b.backend_set(
            lb_policy::RANDOM,
            &[Endpoint::new(ip("10.244.1.7"), 9080, 1)],
        );
        let route = b.route(&[(1, set)]);
        let service_id = b.service_with_route(ip("10.96.0.20"), 9080, route);
        b.service_names(
            service_id,
            &ServiceName {
                host: "reviews.bookinfo.svc.cluster.local",
                name: "reviews",
                namespace: "bookinfo",
            },
        );
        let reviews = WorkloadName {
            workload: "reviews-v2",
            namespace: "bookinfo",
            service_account: "bookinfo-reviews",
            app: "reviews",
            version: "v2",
        };
        b.workload_names(ip("10.244.1.7"), &reviews);
        b.workload_names(
            ip("fd00::7"),
            &WorkloadName {
                version: "v3",
                ..reviews
            },
        );
        b.workload(ip("10.244.1.7"), 1);
        b.authz_workload(ip("10.244.1.7"), 1);
        b.authz_policy(
            5,
            authz_policy_kind::AUTHORIZATION_POLICY,
            "bookinfo/allow-productpage",
        );
        b.authz_verdict(
            1,
            kmesh_common::authz::ANY_CLASS,
            kmesh_common::authz::ANY_PORT,
            kmesh_common::authz::authz_action::DENY,
            kmesh_common::authz::authz_reason::DENY_MATCHED,
            5,
        );
        let bytes = b.build().encode().unwrap();
        let decoded = Snapshot::decode(&bytes, &Limits::default()).unwrap();
        SnapshotLookup::new(std::sync::Arc::new(decoded))
    }

    #[test]
    fn names_come_from_the_snapshot_by_address_service_and_policy_id() {
        let s = snapshot();
        let w = s.workload(ip("10.244.1.7")).unwrap();
        assert_eq!(
            (w.workload, w.namespace, w.service_account, w.app, w.version),
            (
                "reviews-v2",
                "bookinfo",
                "bookinfo-reviews",
                "reviews",
                "v2"
            )
        );
        // An IPv4-mapped IPv6 address (a dual-stack socket's view) is the same workload.
        let mapped = IpAddr::V6(Ipv6Addr::from(kmesh_common::ip16(ip("10.244.1.7"))));
        assert_eq!(s.workload(mapped), Some(w));
        assert_eq!(s.workload(ip("fd00::7")).unwrap().version, "v3");
        assert_eq!(s.workload(ip("10.244.1.8")), None, "no names: unknown");

        let svc = s.service(SocketAddr::new(ip("10.96.0.20"), 9080)).unwrap();
        assert_eq!(
            (svc.host, svc.name, svc.namespace),
            ("reviews.bookinfo.svc.cluster.local", "reviews", "bookinfo")
        );
        assert_eq!(
            s.service(SocketAddr::new(ip("10.96.0.20"), 80)),
            None,
            "other port"
        );

        // The node's reviews-v2 pod, inbound on the service's target port, is its endpoint.
        let endpoint = s
            .service_of_endpoint(SocketAddr::new(ip("10.244.1.7"), 9080))
            .unwrap();
        assert_eq!(endpoint, svc);
        assert_eq!(
            s.service_of_endpoint(SocketAddr::new(ip("10.244.1.7"), 15000)),
            None,
            "a port no service routes to"
        );

        assert_eq!(s.policy(5), Some("bookinfo/allow-productpage"));
        assert_eq!(s.policy(6), None);
    }
}
