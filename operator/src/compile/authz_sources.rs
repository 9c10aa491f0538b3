//! Source classes: what a policy can ask about a connection's source (its mesh identity, the
//! address blocks holding it), reduced to small IDs, and the sources table mapping addresses to
//! them. Decided here:
//! - the identity of a source is the one of the mesh pod (enrolled, on any node) holding its
//!   address: (namespace, service account or `default`), principal
//!   `cluster.local/ns/<ns>/sa/<sa>`. Derived from the address: there is no mTLS to prove it;
//!   addresses of no mesh pod have no identity (principal and namespace "");
//! - an address held by two mesh pods (a finished pod's address reused) takes the identity of the
//!   running one; of two running ones, the smallest identity (deterministic);
//! - a class is a distinct (identity or none, blocks holding the address); IDs are dense from 1 in
//!   the order of the tuples; 0 is UNKNOWN_SOURCE (no identity, in no block), never in the table;
//! - entries: every mesh address at full length, every block at its own length (its class: no
//!   identity, the blocks holding the whole block); a block equal to a mesh address is that
//!   address's entry, whose class already lists the block;
//! - blocks hold addresses of their own family only (as in Istio), while the kernel's trie holds
//!   IPv4 as IPv4-mapped IPv6: when an IPv6 block spans the IPv4-mapped range (`::/0`), the range
//!   `::ffff:0:0/96` gets an entry of its own, whose class lists only IPv4 blocks.
use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Pod;
use kmesh_common::{
    Ip16,
    authz::{AuthzSourceKey, AuthzSourceRecord, AuthzSourceValue, UNKNOWN_SOURCE, prefix_contains},
};

use super::{
    authz_convert::TRUST_DOMAIN,
    authz_rules::{Block, block_holds, is_v4_block},
    namespace_of,
    workloads::address_owners,
};

/// A mesh identity: namespace and service account.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Identity {
    pub namespace: String,
    pub service_account: String,
}

impl Identity {
    pub(super) fn of(pod: &Pod) -> Identity {
        let service_account = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.as_deref())
            .filter(|s| !s.is_empty())
            .unwrap_or("default");
        Identity {
            namespace: namespace_of(&pod.metadata).to_string(),
            service_account: service_account.to_string(),
        }
    }

    pub(super) fn principal(&self) -> String {
        format!(
            "{TRUST_DOMAIN}/ns/{}/sa/{}",
            self.namespace, self.service_account
        )
    }
}

/// The identity of every mesh address of the cluster: its owner's ([`address_owners`]).
pub(super) fn mesh_identities(mesh_pods: &[&Pod]) -> BTreeMap<Ip16, Identity> {
    address_owners(mesh_pods.iter().copied())
        .into_iter()
        .map(|(ip, pod)| (ip, Identity::of(pod)))
        .collect()
}

/// What a policy can know about sources of one class.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct ClassFacts {
    pub identity: Option<Identity>,
    pub blocks: BTreeSet<Block>,
}

impl ClassFacts {
    pub(super) fn principal(&self) -> String {
        self.identity
            .as_ref()
            .map(Identity::principal)
            .unwrap_or_default()
    }

    pub(super) fn namespace(&self) -> &str {
        self.identity.as_ref().map_or("", |i| i.namespace.as_str())
    }
}

/// A node's source classes and its sources table.
#[derive(Clone, Debug, Default)]
pub(super) struct SourceClasses {
    /// Every class, UNKNOWN_SOURCE (0) first, by ID.
    pub classes: BTreeMap<u32, ClassFacts>,
    /// Sorted by key.
    pub records: Vec<AuthzSourceRecord>,
}

/// Whether block `outer` holds all of block `inner` (of the same family).
fn holds(outer: &Block, inner: &Block) -> bool {
    outer.prefix_len <= inner.prefix_len
        && is_v4_block(outer) == is_v4_block(inner)
        && prefix_contains(outer, &inner.ip)
}

/// `::ffff:0:0/96`, all of IPv4 in the trie's form.
const IPV4_MAPPED_RANGE: Block = AuthzSourceKey {
    prefix_len: 96,
    ip: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0, 0, 0],
};

/// The classes and the sources table for `blocks` (those the node's bound policies name).
pub(super) fn source_classes(
    identities: &BTreeMap<Ip16, Identity>,
    blocks: &BTreeSet<Block>,
) -> SourceClasses {
    let mut entries: BTreeMap<AuthzSourceKey, ClassFacts> = BTreeMap::new();
    let spans_ipv4 = blocks.iter().any(|b| {
        !is_v4_block(b) && prefix_contains(b, &IPV4_MAPPED_RANGE.ip) && b.prefix_len <= 96
    });
    if spans_ipv4 && !blocks.contains(&IPV4_MAPPED_RANGE) {
        let facts = ClassFacts {
            identity: None,
            blocks: blocks
                .iter()
                .filter(|b| holds(b, &IPV4_MAPPED_RANGE))
                .copied()
                .collect(),
        };
        entries.insert(IPV4_MAPPED_RANGE, facts);
    }
    for block in blocks {
        let facts = ClassFacts {
            identity: None,
            blocks: blocks.iter().filter(|b| holds(b, block)).copied().collect(),
        };
        entries.insert(*block, facts);
    }
    for (ip, identity) in identities {
        let key = AuthzSourceKey {
            prefix_len: 128,
            ip: *ip,
        };
        let facts = ClassFacts {
            identity: Some(identity.clone()),
            blocks: blocks
                .iter()
                .filter(|b| block_holds(b, ip))
                .copied()
                .collect(),
        };
        entries.insert(key, facts);
    }
    let distinct: BTreeSet<&ClassFacts> = entries.values().collect();
    let ids: BTreeMap<&ClassFacts, u32> = distinct.into_iter().zip(1u32..).collect();
    let mut classes = BTreeMap::new();
    classes.insert(
        UNKNOWN_SOURCE,
        ClassFacts {
            identity: None,
            blocks: BTreeSet::new(),
        },
    );
    let mut records = Vec::with_capacity(entries.len());
    for (key, facts) in &entries {
        let Some(id) = ids.get(facts).copied() else {
            continue;
        };
        classes.entry(id).or_insert_with(|| facts.clone());
        records.push(AuthzSourceRecord {
            key: *key,
            value: AuthzSourceValue { source_class: id },
        });
    }
    SourceClasses { classes, records }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::authz_convert::parse_block;
    use kmesh_common::{authz::source_class, ipv4_mapped};

    #[test]
    fn classes_follow_identity_and_blocks_and_the_table_gives_them_back() {
        let id = |ns: &str| Identity {
            namespace: ns.to_string(),
            service_account: "default".to_string(),
        };
        let identities = BTreeMap::from([
            (ipv4_mapped([10, 0, 0, 1]), id("a")),
            (ipv4_mapped([10, 0, 0, 2]), id("a")),
            (ipv4_mapped([10, 1, 0, 1]), id("a")),
            (ipv4_mapped([10, 0, 0, 3]), id("b")),
        ]);
        let blocks: BTreeSet<Block> = ["10.0.0.0/16", "10.0.0.0/8", "10.0.0.2"]
            .iter()
            .map(|b| parse_block(b).unwrap())
            .collect();
        let sc = source_classes(&identities, &blocks);
        let class = |ip| source_class(&sc.records, &ip);
        let c1 = class(ipv4_mapped([10, 0, 0, 1]));
        assert_eq!(sc.classes[&c1].identity, Some(id("a")));
        assert_eq!(sc.classes[&c1].blocks.len(), 2, "/16 and /8");
        assert_ne!(
            c1,
            class(ipv4_mapped([10, 0, 0, 2])),
            "also in the /32 block"
        );
        assert_ne!(c1, class(ipv4_mapped([10, 1, 0, 1])), "outside the /16");
        assert_ne!(c1, class(ipv4_mapped([10, 0, 0, 3])), "another identity");
        let stranger = class(ipv4_mapped([10, 0, 9, 9]));
        assert_eq!(sc.classes[&stranger].identity, None);
        assert_eq!(sc.classes[&stranger].blocks.len(), 2);
        assert_eq!(class(ipv4_mapped([192, 168, 0, 1])), UNKNOWN_SOURCE);
        assert!(
            sc.records
                .iter()
                .all(|r| r.value.source_class != UNKNOWN_SOURCE)
        );
        assert!(sc.records.windows(2).all(|w| w[0].key < w[1].key));
    }
}
