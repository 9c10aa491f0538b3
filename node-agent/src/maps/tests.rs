//! The swap protocol driven through the fake slots: the order of its writes, and what a failure at
//! each step leaves behind.
use std::collections::BTreeMap;

use kmesh_common::mode;
use kmesh_snapshot::{Snapshot, builder::SnapshotBuilder};

use super::*;
use crate::fake_slots::{FakeSlots, FaultySlots, Op};

fn snapshot(generation: u64) -> Snapshot {
    SnapshotBuilder::new("node-1", generation, mode::KERNEL_NATIVE).build()
}

/// A content hash per generation, so that a mix-up between generations shows.
fn hash_of(generation: u64) -> u64 {
    0x1000 + generation
}

/// Replays `log` from `start` (what each slot of each table held, and the active slot) and returns
/// the first rule of the swap protocol it breaks:
/// - no write to the active slot;
/// - no write to a slot before a barrier has passed since it was last active (at start, the idle
///   slot counts as just left: an earlier agent may have died after a flip);
/// - a generation is filled before it is installed;
/// - a flip goes to a slot whose every table holds the one generation filled last.
fn check_rules(
    start: &BTreeMap<(Slot, SlotTable), u64>,
    active: Slot,
    log: &[Op],
) -> Result<(), String> {
    let mut contents = start.clone();
    let mut active = active;
    let mut idle_safe = false;
    let mut last_filled = None;
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
            Op::Fill { generation } => last_filled = Some(generation),
            Op::Install {
                table,
                slot,
                generation,
            } => {
                write_to(slot)?;
                if last_filled != Some(generation) {
                    return Err(format!(
                        "op {i} {op:?}: installs a generation that was not just filled ({last_filled:?})"
                    ));
                }
                contents.insert((slot, table), generation);
            }
            Op::Clear { table, slot } => {
                write_to(slot)?;
                contents.remove(&(slot, table));
            }
            Op::Flip { slot } => {
                let held: Vec<Option<u64>> = SlotTable::ALL
                    .iter()
                    .map(|t| contents.get(&(slot, *t)).copied())
                    .collect();
                if slot == active || held.iter().any(|g| *g != last_filled || g.is_none()) {
                    return Err(format!(
                        "op {i} {op:?}: flips to slot {slot} (active {active}) holding {held:?}, \
                         not the generation just filled ({last_filled:?}) in every table"
                    ));
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
fn contents_of(fake: &FakeSlots) -> BTreeMap<(Slot, SlotTable), u64> {
    [Slot::Zero, Slot::One]
        .into_iter()
        .flat_map(|slot| {
            fake.contents(slot)
                .into_iter()
                .map(move |(table, generation)| ((slot, table), generation))
        })
        .collect()
}

fn all_tables(generation: u64) -> BTreeMap<SlotTable, u64> {
    SlotTable::ALL.iter().map(|t| (*t, generation)).collect()
}

/// The log with each run of per-table operations (done on parallel threads, so in any order)
/// sorted, so that it can be compared exactly.
fn normalized(log: &[Op]) -> Vec<Op> {
    let key = |op: &Op| match op {
        Op::Install { table, .. } | Op::Clear { table, .. } => Some(*table),
        _ => None,
    };
    let mut out: Vec<Op> = Vec::new();
    let mut run: Vec<Op> = Vec::new();
    for op in log {
        let same_kind = run
            .last()
            .is_some_and(|last| std::mem::discriminant(last) == std::mem::discriminant(op));
        if key(op).is_none() || !same_kind {
            run.sort_by_key(key);
            out.append(&mut run);
        }
        if key(op).is_some() {
            run.push(*op);
        } else {
            out.push(*op);
        }
    }
    run.sort_by_key(key);
    out.append(&mut run);
    out
}

fn installs(slot: Slot, generation: u64) -> Vec<Op> {
    SlotTable::ALL
        .iter()
        .map(|&table| Op::Install {
            table,
            slot,
            generation,
        })
        .collect()
}

fn clears(slot: Slot) -> Vec<Op> {
    SlotTable::ALL
        .iter()
        .map(|&table| Op::Clear { table, slot })
        .collect()
}

#[test]
fn a_starting_agent_passes_a_barrier_before_anything_else() {
    let maps = GenerationMaps::new(FakeSlots::with_live(Slot::One, 1, hash_of(1))).unwrap();
    assert_eq!(maps.slots().log(), vec![Op::Barrier]);
}

#[test]
fn a_swap_fills_installs_in_the_idle_slot_flips_waits_then_clears_the_old_slot() {
    let fake = FakeSlots::with_live(Slot::Zero, 1, hash_of(1));
    let start = contents_of(&fake);
    let mut maps = GenerationMaps::new(fake).unwrap();
    maps.slots().clear_log();

    let stats = maps.apply(&snapshot(2), hash_of(2)).unwrap();

    let log = maps.slots().log();
    let expected: Vec<Op> = [vec![Op::ReadActive, Op::Fill { generation: 2 }]]
        .into_iter()
        .chain([installs(Slot::One, 2)])
        .chain([vec![Op::Flip { slot: Slot::One }, Op::Barrier]])
        .chain([clears(Slot::Zero)])
        .flatten()
        .collect();
    assert_eq!(normalized(&log), expected, "raw log: {log:?}");
    // The start counts as just after a flip, but `new` passed the barrier.
    check_rules(&start, Slot::Zero, &[&[Op::Barrier], &log[..]].concat()).unwrap();
    assert_eq!(stats.slot, Slot::One);
    assert_eq!(stats.old_slot_kept, None);
    let fake = maps.slots();
    assert_eq!(fake.active(), Slot::One);
    assert_eq!(fake.contents(Slot::One), all_tables(2));
    assert!(fake.contents(Slot::Zero).is_empty(), "old slot not emptied");
    let live = maps.live().unwrap().unwrap();
    assert_eq!((live.slot, live.value.meta.generation), (Slot::One, 2));
    assert_eq!(live.value.meta.content_hash, hash_of(2));
}

#[test]
fn swaps_alternate_slots_and_every_write_keeps_the_rules() {
    for start in [Slot::Zero, Slot::One] {
        let fake = FakeSlots::with_live(start, 1, hash_of(1));
        let contents = contents_of(&fake);
        let mut maps = GenerationMaps::new(fake).unwrap();
        for generation in 2..=7 {
            let stats = maps
                .apply(&snapshot(generation), hash_of(generation))
                .unwrap();
            let live = maps.live().unwrap().unwrap();
            assert_eq!(live.value.meta.generation, generation);
            assert_eq!(stats.slot, live.slot);
        }
        check_rules(&contents, start, &maps.slots().log()).unwrap();
    }
}

#[test]
fn the_first_swap_of_a_fresh_installation_keeps_the_rules() {
    let fake = FakeSlots::empty();
    let mut maps = GenerationMaps::new(fake).unwrap();
    assert_eq!(maps.live().unwrap(), None);
    maps.apply(&snapshot(1), hash_of(1)).unwrap();
    maps.apply(&snapshot(2), hash_of(2)).unwrap();
    check_rules(&BTreeMap::new(), Slot::Zero, &maps.slots().log()).unwrap();
    assert_eq!(maps.live().unwrap().unwrap().value.meta.generation, 2);
}

#[test]
fn the_checker_catches_each_broken_order() {
    // The checker itself must see what it names, or the tests above prove nothing.
    let start = contents_of(&FakeSlots::with_live(Slot::Zero, 1, 1));
    let good: Vec<Op> = [vec![Op::Barrier, Op::Fill { generation: 2 }]]
        .into_iter()
        .chain([installs(Slot::One, 2)])
        .chain([vec![Op::Flip { slot: Slot::One }, Op::Barrier]])
        .chain([clears(Slot::Zero)])
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
    let clear_first: Vec<Op> = [Op::Barrier]
        .into_iter()
        .chain(clears(Slot::Zero))
        .chain(good[1..].iter().copied())
        .collect();
    let into_active: Vec<Op> = [vec![Op::Barrier, Op::Fill { generation: 2 }]]
        .into_iter()
        .chain([installs(Slot::Zero, 2)])
        .flatten()
        .collect();
    let partial_install: Vec<Op> = good
        .iter()
        .copied()
        .filter(|op| {
            *op != Op::Install {
                table: SlotTable::Endpoints,
                slot: Slot::One,
                generation: 2,
            }
        })
        .collect();
    for (name, log) in [
        ("flip before fill", flip_before_fill),
        ("no barrier", no_barrier),
        ("clear first", clear_first),
        ("install into the active slot", into_active),
        ("flip with a table missing", partial_install),
    ] {
        assert!(
            check_rules(&start, Slot::Zero, &log).is_err(),
            "{name} passed"
        );
    }
}

/// The operation of a clean swap from a live generation that flips (1-based): after reading the
/// active slot, filling, and one install per table.
const FLIP_OPERATION: usize = 3 + SlotTable::ALL.len();

/// The step a clean swap from a live generation performs as its `n`th operation (1-based).
fn step_of_operation(n: usize) -> SwapStep {
    match n {
        1 => SwapStep::ReadActive,
        2 => SwapStep::Fill,
        n if n < FLIP_OPERATION => SwapStep::Install,
        FLIP_OPERATION => SwapStep::Flip,
        n if n == FLIP_OPERATION + 1 => SwapStep::Barrier,
        _ => SwapStep::Clear,
    }
}

#[test]
fn a_failure_at_any_step_keeps_or_completes_the_swap_and_the_next_apply_succeeds() {
    // A clean swap, to count its operations.
    let faulty = FaultySlots::new(FakeSlots::with_live(Slot::Zero, 1, hash_of(1)));
    let mut maps = GenerationMaps::new(faulty).unwrap();
    maps.slots().fail_at(0);
    maps.apply(&snapshot(2), hash_of(2)).unwrap();
    let operations = maps.slots().calls();
    // Read, fill, an install per table, flip, barrier, a clear per table.
    let tables = SlotTable::ALL.len();
    assert_eq!(operations, 4 + 2 * tables, "{:?}", maps.slots().inner.log());

    for n in 1..=operations {
        let step = step_of_operation(n);
        let fake = FakeSlots::with_live(Slot::Zero, 1, hash_of(1));
        let start = contents_of(&fake);
        let mut maps = GenerationMaps::new(FaultySlots::new(fake)).unwrap();
        maps.slots().fail_at(n);
        let result = maps.apply(&snapshot(2), hash_of(2));
        let fake = &maps.slots().inner;
        let flipped = fake.log().contains(&Op::Flip { slot: Slot::One });
        if n <= FLIP_OPERATION {
            let e = result.expect_err("a failed swap must report it");
            assert_eq!(e.step, step, "operation {n}: {e}");
            assert!(e.to_string().contains("Input/output error"), "{e}");
            assert!(!flipped, "operation {n}: flipped after a failure");
            assert_eq!(fake.active(), Slot::Zero, "operation {n}");
            assert_eq!(fake.contents(Slot::Zero), all_tables(1), "operation {n}");
            assert!(
                fake.contents(Slot::One).is_empty(),
                "operation {n}: the idle slot keeps a half-installed generation: {:?}",
                fake.contents(Slot::One)
            );
            let live = maps.live().unwrap().unwrap();
            assert_eq!((live.slot, live.value.meta.generation), (Slot::Zero, 1));
        } else {
            // After the flip the new generation is live; the failure is reported with it.
            let stats = result.unwrap_or_else(|e| panic!("operation {n}: {e}"));
            let kept = stats.old_slot_kept.expect("the failure must be reported");
            assert!(kept.starts_with(&step.to_string()), "operation {n}: {kept}");
            assert_eq!(maps.live().unwrap().unwrap().value.meta.generation, 2);
        }

        maps.slots().fail_at(0);
        let stats = maps
            .apply(&snapshot(3), hash_of(3))
            .unwrap_or_else(|e| panic!("operation {n}: the next apply failed: {e}"));
        assert_eq!(stats.old_slot_kept, None, "operation {n}");
        let live = maps.live().unwrap().unwrap();
        assert_eq!(live.value.meta.generation, 3, "operation {n}");
        let fake = &maps.slots().inner;
        assert_eq!(fake.contents(live.slot), all_tables(3), "operation {n}");
        assert!(fake.contents(live.slot.other()).is_empty(), "operation {n}");
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
