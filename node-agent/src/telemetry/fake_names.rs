//! A [`NameLookup`] over plain maps, for the telemetry unit tests (the real one reads the
//! snapshot's names section).
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
};

use crate::connection::{Connection, Direction, NameLookup, Outcome, ServiceNames, WorkloadNames};

#[derive(Clone, Debug, Default)]
pub struct OwnedWorkload {
    pub workload: String,
    pub namespace: String,
    pub service_account: String,
    pub app: String,
    pub version: String,
}

#[derive(Default)]
pub struct FakeNames {
    pub workloads: HashMap<IpAddr, OwnedWorkload>,
    pub services: HashMap<SocketAddr, [String; 3]>,
    /// Endpoint to service address (a key of `services`).
    pub endpoints: HashMap<SocketAddr, SocketAddr>,
    pub policies: HashMap<u32, String>,
}

impl NameLookup for FakeNames {
    fn workload(&self, ip: IpAddr) -> Option<WorkloadNames<'_>> {
        self.workloads.get(&ip).map(|w| WorkloadNames {
            workload: &w.workload,
            namespace: &w.namespace,
            service_account: &w.service_account,
            app: &w.app,
            version: &w.version,
        })
    }

    fn service(&self, address: SocketAddr) -> Option<ServiceNames<'_>> {
        self.services
            .get(&address)
            .map(|[host, name, namespace]| ServiceNames {
                host,
                name,
                namespace,
            })
    }

    fn service_of_endpoint(&self, endpoint: SocketAddr) -> Option<ServiceNames<'_>> {
        self.service(*self.endpoints.get(&endpoint)?)
    }

    fn policy(&self, id: u32) -> Option<&str> {
        self.policies.get(&id).map(String::as_str)
    }
}

pub fn addr(text: &str) -> SocketAddr {
    text.parse().expect("a test address")
}

/// `sleep` (10.0.0.1, namespace `shop`) calls the `reviews` service at 10.96.0.10:9080, served by
/// `reviews-v2` (10.0.1.2:9080, namespace `books`, an endpoint of `reviews`); policy 7 is
/// `books/deny-sleep`.
pub fn bookshop() -> FakeNames {
    let mut names = FakeNames::default();
    names.workloads.insert(
        addr("10.0.0.1:0").ip(),
        OwnedWorkload {
            workload: "sleep".into(),
            namespace: "shop".into(),
            service_account: "sleeper".into(),
            app: "sleep".into(),
            version: "latest".into(),
        },
    );
    names.workloads.insert(
        addr("10.0.1.2:0").ip(),
        OwnedWorkload {
            workload: "reviews-v2".into(),
            namespace: "books".into(),
            service_account: "bookinfo-reviews".into(),
            app: "reviews".into(),
            version: "v2".into(),
        },
    );
    names.services.insert(
        addr("10.96.0.10:9080"),
        [
            "reviews.books.svc.cluster.local".into(),
            "reviews".into(),
            "books".into(),
        ],
    );
    names
        .endpoints
        .insert(addr("10.0.1.2:9080"), addr("10.96.0.10:9080"));
    names.policies.insert(7, "books/deny-sleep".into());
    names
}

/// `sleep` → the `reviews` service, rewritten to `reviews-v2`: 120 bytes up, 4,500 down, 1.5 ms.
pub fn outbound_to_reviews() -> Connection {
    Connection {
        direction: Direction::Outbound,
        source: addr("10.0.0.1:40000"),
        destination: addr("10.0.1.2:9080"),
        service: Some(addr("10.96.0.10:9080")),
        bytes_sent: 120,
        bytes_received: 4500,
        duration: std::time::Duration::from_micros(1500),
        outcome: Outcome::Closed,
    }
}

/// The same connection as `reviews-v2`'s node sees it (no dialed service inbound).
pub fn inbound_to_reviews() -> Connection {
    Connection {
        direction: Direction::Inbound,
        service: None,
        bytes_sent: 4500,
        bytes_received: 120,
        ..outbound_to_reviews()
    }
}
