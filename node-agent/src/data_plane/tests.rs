//! The data plane's decision on each snapshot, driven through the fake slots: refused (nothing
//! written), unchanged (nothing written), applied; and the status and live generation it records.
use std::{
    net::{IpAddr, Ipv4Addr},
    sync::{Arc, Mutex},
};

use kmesh_common::{lb_policy, mode};
use kmesh_snapshot::{
    Snapshot,
    builder::{Endpoint, SnapshotBuilder},
};

use super::*;
use crate::{
    agent::Status,
    fake_slots::{FakeSlots, FaultySlots, Op},
};

const NODE: &str = "node-1";

/// A snapshot of `node` with `services` services, and its bytes and content hash.
fn snapshot(node: &str, generation: u64, services: u8) -> (Vec<u8>, u64) {
    let mut b = SnapshotBuilder::new(node, generation, mode::KERNEL_NATIVE);
    b.workload(IpAddr::V4(Ipv4Addr::new(10, 244, 0, 5)), 1);
    let set = b.backend_set(
        lb_policy::RANDOM,
        &[Endpoint::new(
            IpAddr::V4(Ipv4Addr::new(10, 244, 0, 9)),
            8080,
            1,
        )],
    );
    for i in 0..services {
        b.service(IpAddr::V4(Ipv4Addr::new(10, 96, 0, i)), 80, &[(1, set)]);
    }
    let bytes = b.build().encode().unwrap();
    let hash = Snapshot::decode(&bytes, &Limits::UNLIMITED)
        .unwrap()
        .content_hash;
    (bytes, hash)
}

struct Harness<M: SlotMaps> {
    applier: Applier<M>,
    status: SharedStatus,
    live: watch::Receiver<u64>,
}

fn harness<M: SlotMaps>(slots: M, limits: Limits) -> Harness<M> {
    let maps = GenerationMaps::new(slots).unwrap();
    let status: SharedStatus = Arc::new(Mutex::new(Status::default()));
    let initial = maps.live().unwrap().map_or(0, |l| l.value.meta.generation);
    let (tx, rx) = watch::channel(initial);
    Harness {
        applier: Applier::new(NODE.into(), limits, maps, status.clone(), tx),
        status,
        live: rx,
    }
}

fn status<M: SlotMaps>(h: &Harness<M>) -> Status {
    h.status.lock().unwrap().clone()
}

/// The fake's writes since `new` (whose barrier is not a write anyway).
fn writes(fake: &FakeSlots) -> Vec<Op> {
    fake.log().into_iter().filter(Op::is_write).collect()
}

#[test]
fn a_new_snapshot_is_applied_and_recorded() {
    let mut h = harness(FakeSlots::with_live(Slot::Zero, 1, 0x1), Limits::default());
    let (bytes, hash) = snapshot(NODE, 2, 3);

    assert_eq!(
        h.applier.on_snapshot(&bytes),
        Outcome::Applied { slot: Slot::One }
    );

    let s = status(&h);
    assert!(s.ready && s.is_ready());
    assert_eq!((s.applied, s.unchanged, s.rejected), (1, 0, 0));
    let live = s.live.unwrap();
    assert_eq!((live.generation, live.slot), (2, 1));
    assert_eq!(live.content_hash, format!("{hash:016x}"));
    assert_eq!(live.counts.unwrap().services, 3);
    assert_eq!(s.last_apply.unwrap().slot, Slot::One);
    assert_eq!(*h.live.borrow(), 2);
    assert!(h.live.has_changed().unwrap(), "the source is not woken");
    assert_eq!(h.applier.workloads().map(<[_]>::len), Some(1));
}

#[test]
fn the_live_snapshot_again_writes_nothing() {
    let (bytes, hash) = snapshot(NODE, 5, 2);
    let mut h = harness(FakeSlots::with_live(Slot::One, 5, hash), Limits::default());
    h.live.mark_unchanged();
    h.applier.maps.slots().clear_log();

    assert_eq!(h.applier.on_snapshot(&bytes), Outcome::Unchanged);

    assert_eq!(writes(h.applier.maps.slots()), vec![]);
    let s = status(&h);
    assert!(s.ready, "an agent confirming the live snapshot is ready");
    assert_eq!((s.applied, s.unchanged, s.rejected), (0, 1, 0));
    assert_eq!(s.live.unwrap().slot, 1);
    assert!(
        !h.live.has_changed().unwrap(),
        "the same generation must not wake the source"
    );
    // Enrolment can start: the workloads are known now.
    assert!(h.applier.workloads().is_some());
}

#[test]
fn the_same_generation_with_other_content_is_applied() {
    let (bytes, hash) = snapshot(NODE, 5, 2);
    let mut h = harness(
        FakeSlots::with_live(Slot::Zero, 5, hash ^ 1),
        Limits::default(),
    );
    assert_eq!(
        h.applier.on_snapshot(&bytes),
        Outcome::Applied { slot: Slot::One }
    );
}

/// Every refusal: the outcome, the status, and no write at all.
fn assert_refused(bytes: &[u8], limits: Limits, kind: RefusalKind, words: &str) {
    let mut h = harness(FakeSlots::with_live(Slot::Zero, 1, 0x1), limits);
    h.applier.maps.slots().clear_log();
    h.live.mark_unchanged();

    assert_eq!(h.applier.on_snapshot(bytes), Outcome::Refused(kind));

    assert_eq!(writes(h.applier.maps.slots()), vec![], "{kind:?}");
    let s = status(&h);
    assert!(!s.ready, "{kind:?}: ready without a snapshot");
    assert_eq!((s.applied, s.rejected), (0, 1), "{kind:?}");
    assert_eq!(
        s.refused_by_kind,
        std::collections::BTreeMap::from([(kind, 1)]),
        "counted under its kind (the metrics' reason label)"
    );
    assert!(s.live.is_none(), "{kind:?}");
    let rejection = s.last_rejection.unwrap();
    assert_eq!(rejection.kind, kind);
    assert_eq!(rejection.over_capacity, kind == RefusalKind::OverCapacity);
    assert!(
        rejection.reason.contains(words),
        "{kind:?}: {:?} should mention {words:?}",
        rejection.reason
    );
    assert!(!h.live.has_changed().unwrap(), "{kind:?}");
    assert!(h.applier.workloads().is_none(), "{kind:?}");
    let live = h.applier.maps.live().unwrap().unwrap();
    assert_eq!(live.value.meta.generation, 1, "{kind:?}");
}

#[test]
fn garbage_is_refused_as_undecodable() {
    assert_refused(
        b"not a snapshot",
        Limits::default(),
        RefusalKind::Undecodable,
        "magic",
    );
}

#[test]
fn a_corrupt_snapshot_is_refused_with_its_generation() {
    let (mut bytes, _) = snapshot(NODE, 2, 1);
    // A byte of the first service record (after the cluster part's first section header): a
    // record byte, which only the content hash covers.
    let cluster = u64::from_le_bytes(bytes[40..48].try_into().unwrap()) as usize;
    bytes[cluster + 16 + 4] ^= 0xff;
    assert_refused(&bytes, Limits::default(), RefusalKind::Undecodable, "hash");
    let mut h = harness(FakeSlots::with_live(Slot::Zero, 1, 0x1), Limits::default());
    h.applier.on_snapshot(&bytes);
    assert_eq!(status(&h).last_rejection.unwrap().generation, Some(2));
}

#[test]
fn an_over_capacity_snapshot_is_refused() {
    let (bytes, _) = snapshot(NODE, 2, 3);
    let limits = Limits {
        max_services: 2,
        ..Limits::default()
    };
    assert_refused(&bytes, limits, RefusalKind::OverCapacity, "capacity");
}

#[test]
fn another_nodes_snapshot_is_refused() {
    let (bytes, _) = snapshot("node-2", 2, 1);
    assert_refused(&bytes, Limits::default(), RefusalKind::OtherNode, "node-2");
}

#[test]
fn a_failed_swap_is_refused_and_keeps_the_live_generation() {
    let (bytes, _) = snapshot(NODE, 2, 1);
    let mut h = harness(
        FaultySlots::new(FakeSlots::with_live(Slot::Zero, 1, 0x1)),
        Limits::default(),
    );
    h.live.mark_unchanged();
    // live(): active + generation (2 reads); apply: active, fill, then the first install fails.
    h.applier.maps.slots().fail_at(5);

    assert_eq!(
        h.applier.on_snapshot(&bytes),
        Outcome::Refused(RefusalKind::ApplyFailed)
    );

    let s = status(&h);
    let rejection = s.last_rejection.unwrap();
    assert!(rejection.reason.contains("installing"), "{rejection:?}");
    assert!(!h.live.has_changed().unwrap());
    let fake = &h.applier.maps.slots().inner;
    assert_eq!(fake.active(), Slot::Zero);
    // The next snapshot goes through.
    h.applier.maps.slots().fail_at(0);
    assert_eq!(
        h.applier.on_snapshot(&bytes),
        Outcome::Applied { slot: Slot::One }
    );
    assert_eq!(*h.live.borrow(), 2);
}

#[test]
fn an_unreadable_live_generation_refuses_without_writing() {
    let (bytes, _) = snapshot(NODE, 2, 1);
    let mut h = harness(
        FaultySlots::new(FakeSlots::with_live(Slot::Zero, 1, 0x1)),
        Limits::default(),
    );
    h.applier.maps.slots().inner.clear_log();
    h.applier.maps.slots().fail_at(1);

    assert_eq!(
        h.applier.on_snapshot(&bytes),
        Outcome::Refused(RefusalKind::LiveUnreadable)
    );
    assert_eq!(writes(&h.applier.maps.slots().inner), vec![]);
}

/// The status keeps the snapshot that is live (for `/debug/config_dump`): set by an applied or an
/// unchanged snapshot, kept by a refused one, with the generation `/debug/snapshot` reports.
#[test]
fn the_live_snapshot_is_kept_for_the_admin_server() {
    let mut h = harness(FakeSlots::empty(), Limits::default());
    assert!(status(&h).live_snapshot.is_none());
    let (bytes, hash) = snapshot(NODE, 4, 2);
    h.applier.on_snapshot(&bytes);
    let kept = status(&h).live_snapshot.expect("the applied snapshot");
    assert_eq!((kept.snapshot.generation, kept.content_hash), (4, hash));
    assert_eq!(kept.snapshot.encode().unwrap(), bytes);

    let (other, _) = snapshot("node-2", 5, 1);
    assert!(matches!(h.applier.on_snapshot(&other), Outcome::Refused(_)));
    let s = status(&h);
    assert_eq!(s.live_snapshot.map(|d| d.snapshot.generation), Some(4));
    assert_eq!(s.live.map(|l| l.generation), Some(4));

    let (next, _) = snapshot(NODE, 6, 1);
    h.applier.on_snapshot(&next);
    let s = status(&h);
    assert_eq!(s.live_snapshot.map(|d| d.snapshot.services.len()), Some(1));
    assert_eq!(h.applier.workloads().map(<[_]>::len), Some(1));
}

/// The delta the operator serves a node that holds `base` when `next` is compiled.
fn delta(base: &Snapshot, next: &Snapshot) -> Vec<u8> {
    kmesh_snapshot::delta_format::delta_between(base, next).unwrap()
}

/// `snapshot`'s tables, decoded.
fn tables(bytes: &[u8]) -> Snapshot {
    Snapshot::decode(bytes, &Limits::UNLIMITED)
        .unwrap()
        .snapshot
}

/// A delta from the live snapshot is applied as the snapshot it makes; the source learns the new
/// base; a delta from another base is refused, changes nothing, and makes the source ask for the
/// whole snapshot.
#[test]
fn deltas_apply_to_the_live_snapshot_only() {
    let mut h = harness(FakeSlots::with_live(Slot::Zero, 1, 0x1), Limits::default());
    let (held_tx, held_rx) = watch::channel(Held::default());
    h.applier = h.applier.with_held(held_tx);
    let (first, _) = snapshot(NODE, 2, 3);
    assert_eq!(
        h.applier.on_snapshot(&first),
        Outcome::Applied { slot: Slot::One }
    );
    let base = tables(&first);
    let base_hash = held_rx.borrow().cluster_hash.expect("a format 4 base");

    let (next_bytes, next_hash) = snapshot(NODE, 3, 5);
    let next = tables(&next_bytes);
    let bytes = delta(&base, &next);
    assert!(bytes.len() < next_bytes.len());
    assert_eq!(
        h.applier.on_snapshot(&bytes),
        Outcome::Applied { slot: Slot::Zero }
    );
    let s = status(&h);
    let live = s.live.unwrap();
    assert_eq!(live.generation, 3);
    assert_eq!(live.content_hash, format!("{next_hash:016x}"));
    assert_eq!(live.counts.unwrap().services, 5);
    let held = *held_rx.borrow();
    assert_ne!(held.cluster_hash, Some(base_hash), "the base moved on");
    assert_eq!(held.deltas_refused, 0);

    // The same delta again: its base is gone.
    h.applier.maps.slots().clear_log();
    assert_eq!(
        h.applier.on_snapshot(&bytes),
        Outcome::Refused(RefusalKind::Delta)
    );
    assert_eq!(writes(h.applier.maps.slots()), vec![]);
    assert_eq!(held_rx.borrow().deltas_refused, 1);
    let s = status(&h);
    assert_eq!(s.live.unwrap().generation, 3);
    assert!(
        s.last_rejection
            .unwrap()
            .reason
            .starts_with("delta: the delta applies to the cluster part"),
    );
}

#[test]
fn a_delta_before_any_snapshot_is_refused() {
    let mut h = harness(FakeSlots::with_live(Slot::Zero, 1, 0x1), Limits::default());
    let (a, _) = snapshot(NODE, 2, 3);
    let (b, _) = snapshot(NODE, 3, 4);
    assert_eq!(
        h.applier.on_snapshot(&delta(&tables(&a), &tables(&b))),
        Outcome::Refused(RefusalKind::Delta)
    );
    assert_eq!(
        status(&h).last_rejection.unwrap().reason,
        "delta: no snapshot is live to apply it to"
    );
}
