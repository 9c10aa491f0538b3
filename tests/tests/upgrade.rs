//! Agent upgrades across a change of the map layout, on the real kernel, under continuous load.
//!
//! The real `kmesh-agent` binary plays both versions: with the hidden flag `--test-layout-variant`
//! it loads the test variant of the eBPF object (`kmesh-ebpf/src/test_layout.rs`: the same
//! programs, but an enrolled map twice as large — a map the kernel cannot resize in place). What is
//! simulated is only that the "new version" is the same binary with another object; everything the
//! kernel does is real: new maps pinned in the new layout's directory and filled with the current
//! snapshot, the programs of the pinned links replaced with `BPF_LINK_UPDATE`, the old layout's
//! pins removed. A client connects to a service VIP without pause throughout; its namespace has no
//! route out, so a connect that is not steered fails (ENETUNREACH) and counts.
//!
//! Run as root after `cargo build --workspace --bins` (scripts/test.sh does both).
mod life_node;

use std::{collections::BTreeSet, time::Duration};

use kmesh_tests::StopFile;
use life_node::{Node, READY, layout, links, wait_enrolled, wait_generation};
use serde_json::Value;

/// Checks what an upgrade to `after`'s layout left: the same links (ids) running new programs,
/// the switch recorded, and only the links and the new layout pinned.
fn assert_switched(node: &Node, before: &Value, after: &Value) {
    let (old, new) = (links(before), links(after));
    assert_eq!(old.len(), 3, "{before}");
    assert_eq!(new.len(), 3, "{after}");
    for ((name, old_link, old_program), (new_name, new_link, new_program)) in old.iter().zip(&new) {
        assert_eq!(name, new_name);
        assert_eq!(old_link, new_link, "{name}: BPF_LINK_UPDATE keeps the link");
        assert_ne!(
            old_program, new_program,
            "{name}: the program was not replaced"
        );
    }
    assert_eq!(after["adopted_pins"], false, "{after}");
    assert_eq!(after["upgrade"]["state"], "switched", "{after}");
    let expected: BTreeSet<String> = ["link_connect4", "link_connect6", "link_sockops", "authz"]
        .iter()
        .map(|s| s.to_string())
        .chain([layout(after)])
        .collect();
    assert_eq!(node.pins(), expected, "the old layout's pins remain");
    assert_authz_links_run(node, &layout(after));
}

/// Every per-namespace authorization link (`<dir>/authz/<cookie>`) is attached and runs the
/// `sk_lookup` program pinned in `layout`'s directory (re-pointed by the switch, not re-made: the
/// enrolled client's link keeps its pin).
fn assert_authz_links_run(node: &Node, layout: &str) {
    use std::os::fd::AsFd as _;
    let program = kmesh_agent::sys::obj_get(&node.dir.path().join(layout).join("prog_authz"))
        .expect("the layout's authorization program");
    let program = kmesh_agent::sys::prog_id(program.as_fd()).expect("program id");
    let pins: Vec<_> = std::fs::read_dir(node.dir.path().join("authz"))
        .expect("authz links")
        .flatten()
        .collect();
    assert!(!pins.is_empty(), "no authorization link pinned");
    for pin in pins {
        let link = kmesh_agent::sys::obj_get(&pin.path()).expect("open link");
        let state = kmesh_agent::sys::netns_link_state(link.as_fd()).expect("link state");
        assert!(state.attached, "{}: detached", pin.path().display());
        assert_eq!(
            state.program_id,
            program,
            "{}: runs another layout's program",
            pin.path().display()
        );
    }
}

/// Shipped layout → test layout → shipped layout, each time SIGTERM (a restart keeps the pins)
/// and a new agent, while the client connects without pause: not one connect fails, the links
/// keep their ids, their programs change, and each new layout's maps are the ones steering.
#[test]
fn upgrades_across_a_layout_change_under_load_fail_no_connection() {
    let mut node = Node::new("upgrade", 171, &["a", "b", "c"]);
    let file = node.file("snapshot");
    node.write(&file, 1, &["a", "b"]);
    let mut shipped = node.start_agent(&file, &[]);
    shipped.wait_ready(READY).expect("shipped agent ready");
    wait_enrolled(&mut shipped);
    let installed = shipped.debug_snapshot().unwrap();
    let stop = StopFile::new("upgrade");
    let load = node.continuous_probe(&stop);
    std::thread::sleep(Duration::from_millis(300));

    // Upgrade to the test layout.
    assert!(shipped.terminate().expect("SIGTERM").success());
    let mut variant = node.start_agent(&file, &["--test-layout-variant"]);
    variant.wait_ready(READY).expect("upgraded agent ready");
    let upgraded = variant.debug_snapshot().unwrap();
    assert_ne!(layout(&upgraded), layout(&installed), "{upgraded}");
    assert_switched(&node, &installed, &upgraded);
    // The new programs read the maps the new agent writes.
    node.write(&file, 2, &["c"]);
    wait_generation(&mut variant, 2);
    let on_new = node.probe(50);
    assert_eq!(on_new.replies("c"), 50, "{on_new:?}");

    // And back: another layout change, to the shipped layout.
    assert!(variant.terminate().expect("SIGTERM").success());
    let mut back = node.start_agent(&file, &[]);
    back.wait_ready(READY).expect("downgraded agent ready");
    let downgraded = back.debug_snapshot().unwrap();
    assert_eq!(layout(&downgraded), layout(&installed));
    assert_switched(&node, &upgraded, &downgraded);
    node.write(&file, 3, &["a"]);
    wait_generation(&mut back, 3);
    let on_back = node.probe(50);
    assert_eq!(on_back.replies("a"), 50, "{on_back:?}");

    stop.signal().expect("stop probe");
    let report = load
        .wait_timeout(Duration::from_secs(30))
        .expect("probe report");
    println!(
        "upgrade under load: layouts {} -> {} -> {}; links {:?} -> {:?} -> {:?}; \
         connections {} ok {} failed {} by endpoint {:?} errors {:?}",
        layout(&installed),
        layout(&upgraded),
        layout(&downgraded),
        links(&installed),
        links(&upgraded),
        links(&downgraded),
        report.attempts,
        report.ok,
        report.failed,
        report.by_reply,
        report.errors
    );
    assert_eq!(report.failed, 0, "{report:?}");
    assert!(
        report.ok >= 500,
        "too few connections to mean anything: {report:?}"
    );
    for pod in ["a", "b", "c"] {
        assert!(report.replies(pod) > 0, "no reply from {pod}: {report:?}");
    }
}

/// An agent of a new layout that has no snapshot yet leaves the old programs steering with the
/// old maps (it is not ready meanwhile), and switches the links once its own maps hold one.
#[test]
fn the_old_layout_steers_until_the_new_maps_hold_a_snapshot() {
    let mut node = Node::new("upgwait", 172, &["a", "b"]);
    let old_file = node.file("old");
    let new_file = node.file("new");
    node.write(&old_file, 1, &["a"]);
    let mut shipped = node.start_agent(&old_file, &[]);
    shipped.wait_ready(READY).expect("shipped agent ready");
    wait_enrolled(&mut shipped);
    let installed = shipped.debug_snapshot().unwrap();
    let stop = StopFile::new("upgwait");
    let load = node.continuous_probe(&stop);
    assert!(shipped.terminate().expect("SIGTERM").success());

    // The new agent's snapshot file does not exist yet.
    let mut variant = node.start_agent(&new_file, &["--test-layout-variant"]);
    variant
        .wait_for(READY, "the upgrade to wait", |a| {
            Ok(a.debug_snapshot()?["upgrade"]["state"] == "waiting_for_snapshot")
        })
        .expect("upgrade waiting");
    std::thread::sleep(Duration::from_secs(2));
    let meanwhile = node.probe(50);
    assert_eq!(
        meanwhile.replies("a"),
        50,
        "the old layout stopped steering: {meanwhile:?}"
    );
    let waiting = variant.debug_snapshot().unwrap();
    let (code, body) = variant.http_get("/readyz").unwrap();
    assert_eq!(code, 503, "ready before the switch: {body}");
    assert!(body.contains("upgrading"), "{body}");
    assert_eq!(
        links(&waiting),
        links(&installed),
        "switched before a snapshot was live"
    );
    let pins = node.pins();
    assert!(
        pins.contains(&layout(&installed)) && pins.contains(&layout(&waiting)),
        "both layouts are pinned while the upgrade waits: {pins:?}"
    );

    node.write(&new_file, 2, &["b"]);
    variant.wait_ready(READY).expect("upgraded agent ready");
    let switched = variant.debug_snapshot().unwrap();
    assert_switched(&node, &installed, &switched);
    let after = node.probe(50);
    assert_eq!(after.replies("b"), 50, "{after:?}");

    stop.signal().expect("stop probe");
    let report = load
        .wait_timeout(Duration::from_secs(30))
        .expect("probe report");
    println!(
        "upgrade waiting for a snapshot: connections {} ok {} failed {} by endpoint {:?} errors {:?}",
        report.attempts, report.ok, report.failed, report.by_reply, report.errors
    );
    assert_eq!(report.failed, 0, "{report:?}");
    assert!(
        report.replies("a") > 0 && report.replies("b") > 0,
        "{report:?}"
    );
}

/// The pins of an agent from before layout directories — maps and programs at the top of
/// `--bpffs-dir`, beside the links, as the previous release pinned them — count as another layout:
/// the agent fills maps of its own, switches the links and removes the loose pins, under load.
/// The flat layout is made by renaming a fresh install's pins to the top (bpffs renames pins
/// within one file system; they stay the same kernel objects).
#[test]
fn the_flat_layout_before_versioning_is_upgraded_under_load() {
    let mut node = Node::new("upgflat", 175, &["a", "b"]);
    let file = node.file("snapshot");
    node.write(&file, 1, &["a"]);
    let mut first = node.start_agent(&file, &[]);
    first.wait_ready(READY).expect("agent ready");
    wait_enrolled(&mut first);
    let installed = first.debug_snapshot().unwrap();
    assert!(first.terminate().expect("SIGTERM").success());
    let layout_dir = node.dir.path().join(layout(&installed));
    for entry in std::fs::read_dir(&layout_dir).expect("layout directory") {
        let entry = entry.expect("pin");
        std::fs::rename(entry.path(), node.dir.path().join(entry.file_name()))
            .expect("rename a pin to the top");
    }
    std::fs::remove_dir(&layout_dir).expect("remove the emptied layout directory");
    let flat = node.pins();
    assert!(
        flat.contains("KM_ACTIVE") && flat.contains("prog_connect4"),
        "{flat:?}"
    );

    let stop = StopFile::new("upgflat");
    let load = node.continuous_probe(&stop);
    std::thread::sleep(Duration::from_millis(300));
    let mut agent = node.start_agent(&file, &[]);
    agent.wait_ready(READY).expect("upgraded agent ready");
    let upgraded = agent.debug_snapshot().unwrap();
    assert_eq!(layout(&upgraded), layout(&installed), "{upgraded}");
    assert_switched(&node, &installed, &upgraded);
    node.write(&file, 2, &["b"]);
    wait_generation(&mut agent, 2);
    let after = node.probe(50);
    assert_eq!(after.replies("b"), 50, "{after:?}");

    stop.signal().expect("stop probe");
    let report = load
        .wait_timeout(Duration::from_secs(30))
        .expect("probe report");
    println!(
        "upgrade from the flat layout: pins {flat:?} -> {:?}; connections {} ok {} failed {} by endpoint {:?} errors {:?}",
        node.pins(),
        report.attempts,
        report.ok,
        report.failed,
        report.by_reply,
        report.errors
    );
    assert_eq!(report.failed, 0, "{report:?}");
    assert!(
        report.replies("a") > 0 && report.replies("b") > 0,
        "{report:?}"
    );
}

/// A link that is still pinned but detached (an uninstall that stopped half-way) steers nothing: a
/// starting agent replaces it with a new link rather than waiting on it forever.
#[test]
fn a_detached_pinned_link_is_replaced() {
    use std::os::fd::AsFd as _;
    let mut node = Node::new("upgdetached", 176, &["a"]);
    let file = node.file("snapshot");
    node.write(&file, 1, &["a"]);
    let mut first = node.start_agent(&file, &[]);
    first.wait_ready(READY).expect("agent ready");
    wait_enrolled(&mut first);
    let installed = first.debug_snapshot().unwrap();
    assert!(first.terminate().expect("SIGTERM").success());
    for link in ["link_connect4", "link_connect6", "link_sockops"] {
        let pin = kmesh_agent::sys::obj_get(&node.dir.path().join(link)).expect("open link pin");
        kmesh_agent::sys::link_detach(pin.as_fd()).expect("BPF_LINK_DETACH");
    }
    let detached = node.probe(10);
    assert_eq!(detached.errors_of("ENETUNREACH"), 10, "{detached:?}");

    let mut agent = node.start_agent(&file, &[]);
    agent.wait_ready(READY).expect("agent ready again");
    let replaced = agent.debug_snapshot().unwrap();
    let after = node.probe(20);
    assert_eq!(after.replies("a"), 20, "{after:?}");
    for ((name, old_link, _), (_, new_link, new_program)) in
        links(&installed).iter().zip(links(&replaced))
    {
        assert_ne!(*old_link, new_link, "{name}: the detached link was kept");
        assert_ne!(new_program, 0, "{name}: {replaced}");
    }
}

/// The pins of a layout from before connection events: the two connect links and no
/// `link_sockops` (made by unpinning a fresh install's sock_ops link, which detaches it). An
/// upgrade switches the two links it finds, keeping their ids, and attaches the third.
#[test]
fn a_layout_without_the_sockops_link_gains_it_in_the_upgrade() {
    use std::os::fd::AsFd as _;
    let mut node = Node::new("upgsockops", 177, &["a"]);
    let file = node.file("snapshot");
    node.write(&file, 1, &["a"]);
    let mut first = node.start_agent(&file, &[]);
    first.wait_ready(READY).expect("agent ready");
    wait_enrolled(&mut first);
    let installed = first.debug_snapshot().unwrap();
    assert!(first.terminate().expect("SIGTERM").success());
    let pin = node.dir.path().join("link_sockops");
    let link = kmesh_agent::sys::obj_get(&pin).expect("open the sock_ops link");
    kmesh_agent::sys::link_detach(link.as_fd()).expect("BPF_LINK_DETACH");
    std::fs::remove_file(&pin).expect("unpin the sock_ops link");

    let mut variant = node.start_agent(&file, &["--test-layout-variant"]);
    variant.wait_ready(READY).expect("upgraded agent ready");
    let upgraded = variant.debug_snapshot().unwrap();
    let new_layout = layout(&upgraded);
    assert_ne!(new_layout, layout(&installed));
    let (old, new) = (links(&installed), links(&upgraded));
    assert_eq!(new.len(), 3, "{upgraded}");
    for i in 0..2 {
        assert_eq!(old[i].1, new[i].1, "{}: the link was kept", old[i].0);
        assert_ne!(old[i].2, new[i].2, "{}: the program was replaced", old[i].0);
    }
    let program =
        kmesh_agent::sys::obj_get(&node.dir.path().join(&new_layout).join("prog_sockops"))
            .expect("the new layout's sock_ops program");
    let program = kmesh_agent::sys::prog_id(program.as_fd()).expect("program id");
    assert_eq!(
        new[2],
        ("link_sockops".to_string(), new[2].1, u64::from(program)),
        "{upgraded}"
    );
    let after = node.probe(20);
    assert_eq!(after.replies("a"), 20, "{after:?}");
}
