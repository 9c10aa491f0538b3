//! Who a client is. The waypoint takes the client's identity from its source address, through the
//! workloads of its configuration (docs/dual-engine.md: nothing in the connection carries it), as
//! the kernel's authorization does at the destination. This module owns that lookup's two rules:
//! an IPv4-mapped IPv6 address is the IPv4 address it maps (a dual-stack socket reports IPv4
//! clients so), and a principal is spelled `{trust_domain}/ns/{namespace}/sa/{service_account}`.
use std::{fmt, net::IpAddr};

use kmesh_snapshot::waypoint::Workload;

use crate::table::RouteTable;

/// `::ffff:10.0.0.1` is `10.0.0.1`; every other address is itself.
pub fn canonical_address(address: IpAddr) -> IpAddr {
    address.to_canonical()
}

/// The client of a request: its source address, and the workload that address belongs to
/// (`None`: not a workload of the mesh, which matches no source condition).
#[derive(Clone, Copy, Debug)]
pub struct Client<'t> {
    /// Canonical (see [`canonical_address`]).
    pub address: IpAddr,
    pub workload: Option<&'t Workload>,
}

impl<'t> Client<'t> {
    /// The client connecting from `address`, as `table` knows it.
    pub fn identify(table: &'t RouteTable, address: IpAddr) -> Client<'t> {
        Client {
            address: canonical_address(address),
            workload: table.workload(address),
        }
    }

    /// The client's principal; `None` for a client that is not a workload.
    pub fn principal(&self, trust_domain: &str) -> Option<Principal> {
        self.workload.map(|w| Principal::of(trust_domain, w))
    }
}

/// A workload's identity as AuthorizationPolicy `principals` spell it:
/// `{trust_domain}/ns/{namespace}/sa/{service_account}`, without `spiffe://` (ztunnel compares
/// principals after stripping it). [`Principal::spiffe_id`] is the URI form certificates carry.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Principal(String);

impl Principal {
    pub fn of(trust_domain: &str, workload: &Workload) -> Principal {
        Principal(format!(
            "{trust_domain}/ns/{}/sa/{}",
            workload.namespace, workload.service_account
        ))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}`.
    pub fn spiffe_id(&self) -> String {
        format!("spiffe://{}", self.0)
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::tests::{config, workload};

    #[test]
    fn an_ipv4_mapped_address_is_the_ipv4_client() {
        let mut config = config();
        config.workloads = vec![
            workload("productpage", &["10.0.0.9"]),
            workload("ratings", &["fd00::9"]),
        ];
        let table = RouteTable::new(config).unwrap();
        let mapped: IpAddr = "::ffff:10.0.0.9".parse().unwrap();
        let client = Client::identify(&table, mapped);
        assert_eq!(client.address, "10.0.0.9".parse::<IpAddr>().unwrap());
        assert_eq!(
            client.workload.map(|w| w.name.as_str()),
            Some("productpage")
        );
        let v6 = Client::identify(&table, "fd00::9".parse().unwrap());
        assert_eq!(v6.workload.map(|w| w.name.as_str()), Some("ratings"));
        // A mapped address is not an IPv6 workload's, and an unknown one is nobody's.
        assert!(
            Client::identify(&table, "10.0.0.10".parse().unwrap())
                .workload
                .is_none()
        );
    }

    #[test]
    fn a_principal_is_the_authorization_policy_spelling() {
        let mut config = config();
        config.workloads = vec![workload("productpage", &["10.0.0.9"])];
        let table = RouteTable::new(config).unwrap();
        let client = Client::identify(&table, "10.0.0.9".parse().unwrap());
        let principal = client.principal(table.trust_domain()).unwrap();
        assert_eq!(
            principal.as_str(),
            "cluster.local/ns/default/sa/bookinfo-productpage"
        );
        assert_eq!(
            principal.spiffe_id(),
            "spiffe://cluster.local/ns/default/sa/bookinfo-productpage"
        );
        let stranger = Client::identify(&table, "10.9.9.9".parse().unwrap());
        assert_eq!(stranger.principal(table.trust_domain()), None);
    }
}
