//! The swap protocol driven through the fake slots: the order of its writes, which shards it
//! rebuilds, and what a failure at each step leaves behind.
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use kmesh_common::{lb_policy, mode};
use kmesh_snapshot::{
    Snapshot,
    builder::{Endpoint, SnapshotBuilder},
};

use super::*;
use crate::fake_slots::{FakeSlots, FaultySlots, Op};

/// A snapshot with a few services whose endpoints' ports carry `port_base`, so that two snapshots
/// with different bases differ in every endpoint and two with the same base only where a test
/// changes them.
fn snapshot_with(generation: u64, port_base: u16) -> Snapshot {
    let mut b = SnapshotBuilder::new("node-1", generation, mode::KERNEL_NATIVE);
    for i in 0..8u8 {
        let set = b.backend_set(
            lb_policy::RANDOM,
            &[
                Endpoint::new(IpAddr::V4(Ipv4Addr::new(10, 244, i, 1)), port_base, 1),
                Endpoint::new(IpAddr::V4(Ipv4Addr::new(10, 244, i, 2)), port_base, 1),
            ],
        );
        b.service(IpAddr::V4(Ipv4Addr::new(10, 96, 0, i)), 80, &[(1, set)]);
    }
    b.build()
}

fn snapshot(generation: u64) -> Snapshot {
    snapshot_with(generation, 8080)
}

/// A content hash per generation, so that a mix-up between generations shows.
fn hash_of(generation: u64) -> u64 {
    0x1000 + generation
}

/// What each (slot, table, shard) holds: the generation of its map.
type Contents = BTreeMap<(Slot, SlotTable, u32), u64>;

fn bits(mask: u64) -> impl Iterator<Item = u32> {
    (0..64).filter(move |s| mask & (1 << s) != 0)
}

/// Replays `log` from `start` (and the active slot) and returns the first rule of the swap
/// protocol it breaks:
/// - no write to the active slot;
/// - no write to a slot before a barrier has passed since it was last active (at start, the idle
///   slot counts as just left: an earlier agent may have died after a flip);
/// - a generation is filled before it is installed;
/// - a flip goes to a slot that holds the generation just filled in the shards installed since the
///   fill, the generation header among them, and the live slot's maps in every other shard.
fn check_rules(start: &Contents, active: Slot, log: &[Op]) -> Result<(), String> {
    let mut contents = start.clone();
    let mut active = active;
    let mut idle_safe = false;
    let mut last_filled = None;
    let mut installed_since_fill: BTreeMap<(SlotTable, u32), u64> = BTreeMap::new();
    for (i, op) in log.iter().enumerate() {
        let write_to = |slot: Slot| -> Result<(), String> {
            if slot == active {
                return Err(format!("op {i} {op:?}: writes the active slot"));
            }
            if !idle_safe {
                return Err(format!(
                    "op {i} {op:?}: writes slot {slot} before a grace period passed since it was active"
                ));
            }
            Ok(())
        };
        match *op {
            Op::ReadActive | Op::ReadGeneration { .. } => {}
            Op::Fill { generation } => {
                last_filled = Some(generation);
                installed_since_fill.clear();
            }
            Op::Install {
                table,
                slot,
                generation,
                shards,
            } => {
                write_to(slot)?;
                if last_filled != Some(generation) {
                    return Err(format!(
                        "op {i} {op:?}: installs a generation that was not just filled ({last_filled:?})"
                    ));
                }
                for shard in bits(shards) {
                    contents.insert((slot, table, shard), generation);
                    installed_since_fill.insert((table, shard), generation);
                }
            }
            Op::Flip { slot } => {
                if slot == active {
                    return Err(format!("op {i} {op:?}: flips to the active slot"));
                }
                if !installed_since_fill.contains_key(&(SlotTable::Generation, 0)) {
                    return Err(format!(
                        "op {i} {op:?}: flips without a new generation header"
                    ));
                }
                for table in SlotTable::ALL {
                    for shard in 0..table.shards() {
                        let want = installed_since_fill
                            .get(&(table, shard))
                            .or(contents.get(&(active, table, shard)));
                        let held = contents.get(&(slot, table, shard));
                        if held != want || held.is_none() {
                            return Err(format!(
                                "op {i} {op:?}: flips to slot {slot} whose {table:?} shard {shard} \
                                 holds {held:?}, not {want:?}"
                            ));
                        }
                    }
                }
                active = slot;
                idle_safe = false;
            }
            Op::Barrier => idle_safe = true,
        }
    }
    Ok(())
}

/// What a fake holds, in the form `check_rules` starts from.
fn contents_of(fake: &FakeSlots) -> Contents {
    [Slot::Zero, Slot::One]
        .into_iter()
        .flat_map(|slot| {
            fake.contents(slot)
                .into_iter()
                .map(move |((table, shard), generation)| ((slot, table, shard), generation))
        })
        .collect()
}

/// Every shard of every table at `generation`.
fn all_shards(generation: u64) -> BTreeMap<(SlotTable, u32), u64> {
    SlotTable::ALL
        .iter()
        .flat_map(|&t| (0..t.shards()).map(move |s| ((t, s), generation)))
        .collect()
}

fn total_shards() -> usize {
    SlotTable::ALL.iter().map(|t| t.shards() as usize).sum()
}

/// The log with each run of per-table installs (done on parallel threads, so in any order) sorted,
/// so that it can be compared exactly.
fn normalized(log: &[Op]) -> Vec<Op> {
    let key = |op: &Op| match op {
        Op::Install { table, .. } => Some(*table),
        _ => None,
    };
    let mut out: Vec<Op> = Vec::new();
    let mut run: Vec<Op> = Vec::new();
    for op in log {
        if key(op).is_none() {
            run.sort_by_key(key);
            out.append(&mut run);
            out.push(*op);
        } else {
            run.push(*op);
        }
    }
    run.sort_by_key(key);
    out.append(&mut run);
    out
}

/// An install of every shard of every table.
fn full_installs(slot: Slot, generation: u64) -> Vec<Op> {
    SlotTable::ALL
        .iter()
        .map(|&table| Op::Install {
            table,
            slot,
            generation,
            shards: Changes::all().mask(table),
        })
        .collect()
}

#[test]
fn a_starting_agent_passes_a_barrier_before_anything_else() {
    let maps = GenerationMaps::new(FakeSlots::with_live(Slot::One, 1, hash_of(1))).unwrap();
    assert_eq!(maps.slots().log(), vec![Op::Barrier]);
}

#[test]
fn the_first_swap_rebuilds_every_shard_and_leaves_both_slots_alike() {
    let fake = FakeSlots::with_live(Slot::Zero, 1, hash_of(1));
    let start = contents_of(&fake);
    let mut maps = GenerationMaps::new(fake).unwrap();
    maps.slots().clear_log();

    let stats = maps.apply(&snapshot(2), hash_of(2), None).unwrap();

    let log = maps.slots().log();
    let expected: Vec<Op> = [vec![Op::ReadActive, Op::Fill { generation: 2 }]]
        .into_iter()
        .chain([full_installs(Slot::One, 2)])
        .chain([vec![Op::Flip { slot: Slot::One }, Op::Barrier]])
        .chain([full_installs(Slot::Zero, 2)])
        .flatten()
        .collect();
    assert_eq!(normalized(&log), expected, "raw log: {log:?}");
    // The start counts as just after a flip, but `new` passed the barrier.
    check_rules(&start, Slot::Zero, &[&[Op::Barrier], &log[..]].concat()).unwrap();
    assert_eq!(
        (stats.slot, stats.maps_rebuilt),
        (Slot::One, total_shards())
    );
    assert_eq!(stats.old_slot_kept, None);
    let fake = maps.slots();
    assert_eq!(fake.active(), Slot::One);
    assert_eq!(fake.contents(Slot::One), all_shards(2));
    assert_eq!(
        fake.contents(Slot::Zero),
        all_shards(2),
        "the old slot mirrors the new maps"
    );
    let live = maps.live().unwrap().unwrap();
    assert_eq!((live.slot, live.value.meta.generation), (Slot::One, 2));
    assert_eq!(live.value.meta.content_hash, hash_of(2));
}

/// Even with a base, a starting agent rebuilds everything: it cannot know the idle slot.
#[test]
fn the_first_swap_after_a_start_is_whole_even_with_a_base() {
    let mut maps = GenerationMaps::new(FakeSlots::with_live(Slot::Zero, 1, hash_of(1))).unwrap();
    let stats = maps
        .apply(&snapshot(2), hash_of(2), Some(&snapshot(1)))
        .unwrap();
    assert_eq!(stats.maps_rebuilt, total_shards());
}

#[test]
fn a_change_rebuilds_only_its_shards_in_both_slots() {
    let mut maps = GenerationMaps::new(FakeSlots::empty()).unwrap();
    let two = snapshot(2);
    maps.apply(&two, hash_of(2), None).unwrap();
    let mut three = two.clone();
    three.generation = 3;
    three.endpoints[5].value.port += 1;
    let shard = kmesh_common::shard::shard_of_endpoint(&three.endpoints[5].key);
    maps.slots().clear_log();

    let stats = maps.apply(&three, hash_of(3), Some(&two)).unwrap();

    assert_eq!(
        stats.maps_rebuilt, 3,
        "the generation header, one endpoint shard and its backend sets"
    );
    let mut expected = all_shards(2);
    expected.insert((SlotTable::Generation, 0), 3);
    expected.insert((SlotTable::Endpoints, shard), 3);
    expected.insert((SlotTable::BackendSets, shard), 3);
    let fake = maps.slots();
    assert_eq!(fake.contents(Slot::Zero), expected);
    assert_eq!(fake.contents(Slot::One), expected);
    let installs: Vec<Op> = fake
        .log()
        .into_iter()
        .filter(|op| matches!(op, Op::Install { .. }))
        .collect();
    assert_eq!(installs.len(), 6, "three tables, each slot: {installs:?}");
    // What the live slot serves is the new snapshot's, shard by shard.
    assert_eq!(
        fake.read(SlotTable::Endpoints, fake.active()).unwrap(),
        Some(TableRecordsOf::endpoints(&three))
    );
}

/// Shorthand for what `read` returns.
struct TableRecordsOf;

impl TableRecordsOf {
    fn endpoints(s: &Snapshot) -> crate::slots::TableRecords {
        crate::slots::TableRecords::Endpoints(s.endpoints.clone())
    }
}

#[test]
fn swaps_alternate_slots_and_every_write_keeps_the_rules() {
    for start in [Slot::Zero, Slot::One] {
        let fake = FakeSlots::with_live(start, 1, hash_of(1));
        let contents = contents_of(&fake);
        let mut maps = GenerationMaps::new(fake).unwrap();
        let mut base: Option<Snapshot> = None;
        for generation in 2..=9 {
            // Every other generation moves every endpoint; the rest one endpoint.
            let mut next = snapshot_with(generation, 8000 + (generation as u16 / 2) * 10);
            let moved = (generation as usize) % next.endpoints.len();
            next.endpoints[moved].value.port += 1;
            let stats = maps
                .apply(&next, hash_of(generation), base.as_ref())
                .unwrap();
            let live = maps.live().unwrap().unwrap();
            assert_eq!(live.value.meta.generation, generation);
            assert_eq!(stats.slot, live.slot);
            assert_eq!(
                maps.slots().read(SlotTable::Endpoints, live.slot).unwrap(),
                Some(TableRecordsOf::endpoints(&next)),
                "generation {generation}"
            );
            base = Some(next);
        }
        check_rules(&contents, start, &maps.slots().log()).unwrap();
    }
}

#[test]
fn the_first_swap_of_a_fresh_installation_keeps_the_rules() {
    let fake = FakeSlots::empty();
    let mut maps = GenerationMaps::new(fake).unwrap();
    assert_eq!(maps.live().unwrap(), None);
    maps.apply(&snapshot(1), hash_of(1), None).unwrap();
    maps.apply(&snapshot(2), hash_of(2), Some(&snapshot(1)))
        .unwrap();
    check_rules(&BTreeMap::new(), Slot::Zero, &maps.slots().log()).unwrap();
    assert_eq!(maps.live().unwrap().unwrap().value.meta.generation, 2);
}

#[test]
fn the_checker_catches_each_broken_order() {
    // The checker itself must see what it names, or the tests above prove nothing.
    let start = contents_of(&FakeSlots::with_live(Slot::Zero, 1, 1));
    let good: Vec<Op> = [vec![Op::Barrier, Op::Fill { generation: 2 }]]
        .into_iter()
        .chain([full_installs(Slot::One, 2)])
        .chain([vec![Op::Flip { slot: Slot::One }, Op::Barrier]])
        .chain([full_installs(Slot::Zero, 2)])
        .flatten()
        .collect();
    check_rules(&start, Slot::Zero, &good).unwrap();
    let flip_before_fill: Vec<Op> = [Op::Barrier, Op::Flip { slot: Slot::One }]
        .into_iter()
        .chain(good[1..].iter().copied())
        .collect();
    let no_barrier: Vec<Op> = good
        .iter()
        .copied()
        .filter(|op| *op != Op::Barrier)
        .collect();
    let into_active: Vec<Op> = [vec![Op::Barrier, Op::Fill { generation: 2 }]]
        .into_iter()
        .chain([full_installs(Slot::Zero, 2)])
        .flatten()
        .collect();
    let without = |table: SlotTable| -> Vec<Op> {
        good.iter()
            .copied()
            .filter(
                |op| !matches!(op, Op::Install { table: t, slot: Slot::One, .. } if *t == table),
            )
            .collect()
    };
    // The idle slot was empty at start: installing only some shards leaves others unfilled.
    let partial_shards: Vec<Op> = good
        .iter()
        .map(|op| match *op {
            Op::Install {
                table: SlotTable::Endpoints,
                slot: Slot::One,
                generation,
                ..
            } => Op::Install {
                table: SlotTable::Endpoints,
                slot: Slot::One,
                generation,
                shards: 1,
            },
            other => other,
        })
        .collect();
    for (name, log) in [
        ("flip before fill", flip_before_fill),
        ("no barrier", no_barrier),
        ("install into the active slot", into_active),
        ("flip with a table missing", without(SlotTable::Endpoints)),
        (
            "flip without a generation header",
            without(SlotTable::Generation),
        ),
        ("flip with shards missing", partial_shards),
    ] {
        assert!(
            check_rules(&start, Slot::Zero, &log).is_err(),
            "{name} passed"
        );
    }
}

/// The operation of a clean first swap from a live generation that flips (1-based): after
/// reading the active slot, filling, and one install per table.
const FLIP_OPERATION: usize = 3 + SlotTable::ALL.len();

/// The step a clean first swap performs as its `n`th operation (1-based).
fn step_of_operation(n: usize) -> SwapStep {
    match n {
        1 => SwapStep::ReadActive,
        2 => SwapStep::Fill,
        n if n < FLIP_OPERATION => SwapStep::Install,
        FLIP_OPERATION => SwapStep::Flip,
        n if n == FLIP_OPERATION + 1 => SwapStep::Barrier,
        _ => SwapStep::Mirror,
    }
}

#[test]
fn a_failure_at_any_step_keeps_or_completes_the_swap_and_the_next_apply_rebuilds_everything() {
    // A clean swap, to count its operations.
    let faulty = FaultySlots::new(FakeSlots::with_live(Slot::Zero, 1, hash_of(1)));
    let mut maps = GenerationMaps::new(faulty).unwrap();
    maps.slots().fail_at(0);
    maps.apply(&snapshot(2), hash_of(2), None).unwrap();
    let operations = maps.slots().calls();
    // Read, fill, an install per table, flip, barrier, an install per table.
    let tables = SlotTable::ALL.len();
    assert_eq!(operations, 4 + 2 * tables, "{:?}", maps.slots().inner.log());

    for n in 1..=operations {
        let step = step_of_operation(n);
        let fake = FakeSlots::with_live(Slot::Zero, 1, hash_of(1));
        let start = contents_of(&fake);
        let mut maps = GenerationMaps::new(FaultySlots::new(fake)).unwrap();
        maps.slots().fail_at(n);
        let two = snapshot(2);
        let result = maps.apply(&two, hash_of(2), None);
        let fake = &maps.slots().inner;
        let flipped = fake.log().contains(&Op::Flip { slot: Slot::One });
        let live_snapshot = if n <= FLIP_OPERATION {
            let e = result.expect_err("a failed swap must report it");
            assert_eq!(e.step, step, "operation {n}: {e}");
            assert!(e.to_string().contains("Input/output error"), "{e}");
            assert!(!flipped, "operation {n}: flipped after a failure");
            assert_eq!(fake.active(), Slot::Zero, "operation {n}");
            assert_eq!(
                fake.contents(Slot::Zero),
                all_shards(1),
                "operation {n}: the live slot was written"
            );
            let live = maps.live().unwrap().unwrap();
            assert_eq!((live.slot, live.value.meta.generation), (Slot::Zero, 1));
            snapshot(1)
        } else {
            // After the flip the new generation is live; the failure is reported with it.
            let stats = result.unwrap_or_else(|e| panic!("operation {n}: {e}"));
            let kept = stats.old_slot_kept.expect("the failure must be reported");
            assert!(kept.starts_with(&step.to_string()), "operation {n}: {kept}");
            assert_eq!(maps.live().unwrap().unwrap().value.meta.generation, 2);
            two
        };

        // The idle slot is not known to equal the live one: the next apply rebuilds every shard,
        // whatever its base says, and keeps every rule.
        maps.slots().fail_at(0);
        let mut three = live_snapshot.clone();
        three.generation = 3;
        let stats = maps
            .apply(&three, hash_of(3), Some(&live_snapshot))
            .unwrap_or_else(|e| panic!("operation {n}: the next apply failed: {e}"));
        assert_eq!(stats.old_slot_kept, None, "operation {n}");
        assert_eq!(stats.maps_rebuilt, total_shards(), "operation {n}");
        let live = maps.live().unwrap().unwrap();
        assert_eq!(live.value.meta.generation, 3, "operation {n}");
        let fake = &maps.slots().inner;
        assert_eq!(fake.contents(live.slot), all_shards(3), "operation {n}");
        assert_eq!(
            fake.contents(live.slot.other()),
            all_shards(3),
            "operation {n}"
        );
        // The log starts with the barrier of `new`.
        check_rules(&start, Slot::Zero, &fake.log())
            .unwrap_or_else(|e| panic!("operation {n}: {e}"));
    }
}

#[test]
fn a_failed_barrier_at_start_is_an_error() {
    let faulty = FaultySlots::new(FakeSlots::with_live(Slot::Zero, 1, 1));
    faulty.fail_at(1);
    let e = GenerationMaps::new(faulty).err().expect("must fail");
    assert!(e.to_string().contains("barrier"), "{e}");
}
