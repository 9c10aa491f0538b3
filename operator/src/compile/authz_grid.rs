//! A workload's verdict grid (every source class × every port its policies name, plus "any other
//! port") and its exact compression into verdict table entries, read back through
//! `kmesh_common::authz::resolve_verdict`.
//!
//! Compression (the design's, in this order):
//! 1. `(ANY, ANY)` = the majority over classes of the "other port" verdict (ties: the smallest);
//! 2. `(c, ANY)` = the class's "other port" verdict where it differs from the default;
//! 3. `(ANY, p)` = the majority of `f(c, p)` over the classes without a `(c, ANY)` entry, where it
//!    differs from the default;
//! 4. `(c, p)` wherever the chain so far gives something other than `f(c, p)`.
//!
//! Exact by construction: step 4 fixes every named cell; a port no policy names is decided by
//! `(c, ANY)` or, for classes without one, by the default, which then equals the class's
//! "other port" verdict.
use std::collections::BTreeMap;

use kmesh_common::authz::{ANY_CLASS, ANY_PORT, AuthzVerdict, AuthzVerdictKey, resolve_verdict};

/// Every verdict of one workload: `cells[i][j]` for class `classes[i]` and port `ports[j]`,
/// `other[i]` for class `classes[i]` and any port not in `ports`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Grid {
    /// Distinct; never ANY_CLASS.
    pub classes: Vec<u32>,
    /// Distinct; never ANY_PORT.
    pub ports: Vec<u16>,
    pub other: Vec<AuthzVerdict>,
    pub cells: Vec<Vec<AuthzVerdict>>,
}

/// Compressed entries of one grid, keyed by (class, port) with the wildcards; the set ID is
/// added when the entries are placed in a snapshot.
pub(super) type Entries = BTreeMap<(u32, u16), AuthzVerdict>;

/// The most frequent of `verdicts`, the smallest on a tie; `None` when empty.
fn majority<'v>(verdicts: impl Iterator<Item = &'v AuthzVerdict>) -> Option<AuthzVerdict> {
    let mut counts: BTreeMap<AuthzVerdict, usize> = BTreeMap::new();
    for v in verdicts {
        *counts.entry(*v).or_default() += 1;
    }
    let best = counts.values().copied().max()?;
    counts.into_iter().find(|(_, n)| *n == best).map(|(v, _)| v)
}

/// What the chain gives over `entries`.
pub(super) fn lookup(entries: &Entries, class: u32, port: u16) -> Option<AuthzVerdict> {
    resolve_verdict(0, class, port, |k: &AuthzVerdictKey| {
        entries.get(&(k.source_class, k.port)).copied()
    })
}

/// The grid's entries; see the module documentation. A grid without classes has only a
/// default (which no connection reaches: class 0 is always a class).
pub(super) fn compress(grid: &Grid) -> Entries {
    let mut entries = Entries::new();
    let Some(default) = majority(grid.other.iter()) else {
        return entries;
    };
    entries.insert((ANY_CLASS, ANY_PORT), default);
    for (class, other) in grid.classes.iter().zip(&grid.other) {
        if *other != default {
            entries.insert((*class, ANY_PORT), *other);
        }
    }
    for (j, port) in grid.ports.iter().enumerate() {
        let without_entry = grid
            .classes
            .iter()
            .zip(&grid.cells)
            .filter(|(class, _)| !entries.contains_key(&(**class, ANY_PORT)))
            .filter_map(|(_, row)| row.get(j));
        if let Some(common) = majority(without_entry)
            && common != default
        {
            entries.insert((ANY_CLASS, *port), common);
        }
    }
    for (class, row) in grid.classes.iter().zip(&grid.cells) {
        for (port, verdict) in grid.ports.iter().zip(row) {
            if lookup(&entries, *class, *port) != Some(*verdict) {
                entries.insert((*class, *port), *verdict);
            }
        }
    }
    entries
}

#[cfg(test)]
mod tests {
    use super::*;
    use kmesh_common::authz::{authz_action, authz_reason};
    use proptest::prelude::*;

    fn verdict(n: u8) -> AuthzVerdict {
        let (action, reason) = if n.is_multiple_of(2) {
            (authz_action::ALLOW, authz_reason::ALLOW_MATCHED)
        } else {
            (authz_action::DENY, authz_reason::DENY_MATCHED)
        };
        AuthzVerdict {
            policy: u32::from(n / 2),
            action,
            reason,
            pad: 0,
        }
    }

    /// Random grids: up to 12 classes (0 always among them), up to 6 ports, up to 4 verdicts.
    fn grids() -> impl Strategy<Value = Grid> {
        (
            1usize..12,
            prop::collection::btree_set(1u16..20, 0..6),
            1u8..5,
        )
            .prop_flat_map(|(n_classes, ports, n_verdicts)| {
                let ports: Vec<u16> = ports.into_iter().collect();
                let n_ports = ports.len();
                let v = (0..n_verdicts).prop_map(verdict);
                (
                    Just((0..n_classes as u32).collect::<Vec<u32>>()),
                    Just(ports),
                    prop::collection::vec(v.clone(), n_classes),
                    prop::collection::vec(prop::collection::vec(v, n_ports), n_classes),
                )
                    .prop_map(|(classes, ports, other, cells)| Grid {
                        classes,
                        ports,
                        other,
                        cells,
                    })
            })
    }

    /// The kernel's chain over `entries`, straight from `kmesh_common` (not the compressor's own
    /// helper, so that a compressor with a wrong model of the chain is caught).
    fn kernel(entries: &Entries, class: u32, port: u16) -> Option<AuthzVerdict> {
        resolve_verdict(7, class, port, |k: &AuthzVerdictKey| {
            assert_eq!(k.policy_set, 7);
            entries.get(&(k.source_class, k.port)).copied()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// The chain over the entries gives the grid's verdict for every class and every port,
        /// named or not.
        #[test]
        fn compression_is_exact(grid in grids()) {
            let entries = compress(&grid);
            for (i, class) in grid.classes.iter().enumerate() {
                for (j, port) in grid.ports.iter().enumerate() {
                    prop_assert_eq!(kernel(&entries, *class, *port), Some(grid.cells[i][j]));
                }
                for port in [1u16, 7, 19, 20, 443, 65535] {
                    if !grid.ports.contains(&port) {
                        prop_assert_eq!(kernel(&entries, *class, port), Some(grid.other[i]));
                    }
                }
            }
        }
    }

    #[test]
    fn a_uniform_grid_is_one_entry_and_exceptions_are_few() {
        let a = verdict(0);
        let d = verdict(1);
        let grid = Grid {
            classes: vec![0, 1, 2, 3],
            ports: vec![80, 443],
            other: vec![a, a, a, a],
            cells: vec![vec![a, a]; 4],
        };
        assert_eq!(compress(&grid).len(), 1);
        // Port 80 denied to all but class 3; class 2 denied everywhere.
        let grid = Grid {
            classes: vec![0, 1, 2, 3],
            ports: vec![80, 443],
            other: vec![a, a, d, a],
            cells: vec![vec![d, a], vec![d, a], vec![d, d], vec![a, a]],
        };
        let entries = compress(&grid);
        let keys: Vec<(u32, u16)> = entries.keys().copied().collect();
        assert_eq!(
            keys,
            [
                (2, ANY_PORT),
                (3, 80),
                (ANY_CLASS, ANY_PORT),
                (ANY_CLASS, 80)
            ]
        );
    }
}
