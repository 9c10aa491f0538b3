//! Cluster deltas: the diff and its apply agree (`apply(base, between(base, new)) == new`) on
//! random tables, and a delta that does not fit is refused.

use proptest::collection::vec;
use proptest::prelude::*;

use kmesh_common::{EndpointKey, EndpointRecord, EndpointValue};

use crate::builder::generate;
use crate::delta::{ClusterDelta, DeltaError, TableDelta};
use crate::error::Table;
use crate::{ClusterTables, Snapshot, TableHash};

fn endpoint(set_id: u32, index: u32, port: u16) -> EndpointRecord {
    EndpointRecord {
        key: EndpointKey { set_id, index },
        value: EndpointValue {
            ip: [0; 16],
            port,
            pad: 0,
            identity: 0,
        },
    }
}

fn cluster(s: Snapshot) -> ClusterTables {
    s.into_parts().1
}

/// One endpoint's address changes in a generated cluster of 1,000 services (10,000 endpoints):
/// the delta is that one record.
#[test]
fn one_endpoint_changed_is_one_record() {
    let old = cluster(generate("n", 1, 1_000, 10));
    let mut new = old.clone();
    new.endpoints[4_321].value.ip[15] ^= 1;
    let delta = ClusterDelta::between(&old, &new);
    assert_eq!(delta.records(), 1);
    assert_eq!(delta.endpoints.upserted, [new.endpoints[4_321]]);
    assert_eq!(delta.name_strings, None);
    assert_eq!(delta.apply(&old).unwrap(), new);
    assert!(ClusterDelta::between(&new, &new).records() == 0);
}

#[test]
fn removals_additions_and_changes() {
    let old = [endpoint(1, 0, 80), endpoint(1, 1, 80), endpoint(2, 0, 80)];
    let new = [endpoint(1, 0, 81), endpoint(2, 0, 80), endpoint(3, 0, 80)];
    let delta = TableDelta::between(&old, &new);
    assert_eq!(delta.removed, [endpoint(1, 1, 80)]);
    assert_eq!(delta.upserted, [endpoint(1, 0, 81), endpoint(3, 0, 80)]);
    assert_eq!(delta.apply(&old).unwrap(), new);
}

#[test]
fn a_delta_that_does_not_fit_is_refused() {
    let base = [endpoint(1, 0, 80), endpoint(2, 0, 80)];
    let key = |set_id| EndpointKey { set_id, index: 0 };
    let gone = |set_id| endpoint(set_id, 0, 80);
    let refused = |removed: Vec<EndpointRecord>, upserted: Vec<EndpointRecord>| {
        TableDelta { removed, upserted }.apply(&base).unwrap_err()
    };
    assert_eq!(
        refused(vec![gone(3)], vec![]),
        DeltaError::RemovedMissing {
            table: Table::Endpoints,
            key: format!("{:?}", key(3)),
        }
    );
    assert!(matches!(
        refused(vec![gone(0)], vec![]),
        DeltaError::RemovedMissing { .. }
    ));
    assert_eq!(
        refused(vec![endpoint(2, 0, 81)], vec![]),
        DeltaError::RemovedDiffers {
            table: Table::Endpoints,
            key: format!("{:?}", key(2)),
        },
        "the base holds another record at the key"
    );
    assert!(matches!(
        refused(vec![gone(2), gone(1)], vec![]),
        DeltaError::Unsorted {
            list: "removed records",
            index: 1,
            ..
        }
    ));
    assert!(matches!(
        refused(vec![], vec![endpoint(3, 0, 80), endpoint(3, 0, 81)]),
        DeltaError::Unsorted {
            list: "upserted records",
            index: 1,
            ..
        }
    ));
    assert!(matches!(
        refused(vec![gone(1)], vec![endpoint(1, 0, 99)]),
        DeltaError::RemovedAndUpserted { .. }
    ));
    let unsorted_base = [endpoint(2, 0, 80), endpoint(1, 0, 80)];
    assert!(matches!(
        TableDelta::<EndpointRecord>::default().apply(&unsorted_base),
        Err(DeltaError::BaseUnsorted { index: 1, .. })
    ));
}

/// Sorted, unique endpoint tables drawn from a small key space, so that two of them overlap.
fn arb_endpoints() -> impl Strategy<Value = Vec<EndpointRecord>> {
    vec((0u32..8, 0u32..4, 1u16..4), 0..24).prop_map(|mut v| {
        v.sort_by_key(|&(s, i, _)| (s, i));
        v.dedup_by_key(|&mut (s, i, _)| (s, i));
        v.into_iter().map(|(s, i, p)| endpoint(s, i, p)).collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// The diff and the apply agree on any two tables, a delta names nothing unchanged, and the
    /// hash the apply updates is the hash of the result.
    #[test]
    fn apply_of_between_is_the_new_table(old in arb_endpoints(), new in arb_endpoints()) {
        let delta = TableDelta::between(&old, &new);
        let mut hash = TableHash::of(&old);
        prop_assert_eq!(delta.apply_hashed(&old, &mut hash).unwrap(), new.clone());
        prop_assert_eq!(hash, TableHash::of(&new));
        let unchanged = old.iter().filter(|r| new.contains(r)).count();
        prop_assert_eq!(delta.upserted.len() + unchanged, new.len());
    }

    /// The same over whole cluster tables of random snapshots, in a sequence of changes: applying
    /// each step's delta to the last result gives each step's tables.
    #[test]
    fn a_sequence_of_deltas_gives_each_step(
        steps in vec((1u32..40, 1u32..5, any::<u64>()), 1..5),
    ) {
        let mut held = ClusterTables::default();
        let mut held_hashes = held.encode().unwrap().hashes();
        for (services, endpoints, seed) in steps {
            let mut next = cluster(generate("n", 1, services, endpoints));
            // Vary the records beyond what generate makes, by the seed.
            for (i, e) in next.endpoints.iter_mut().enumerate() {
                if (seed >> (i % 64)) & 1 == 1 {
                    e.value.port = e.value.port.wrapping_add(1).max(1);
                }
            }
            let delta = ClusterDelta::between(&held, &next);
            let (applied, hashes) = delta.apply_hashed(&held, &held_hashes).unwrap();
            held = applied;
            held_hashes = hashes;
            prop_assert_eq!(&held, &next);
            prop_assert_eq!(held_hashes, next.encode().unwrap().hashes());
        }
    }
}
