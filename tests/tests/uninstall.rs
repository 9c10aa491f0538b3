//! The uninstall on the real kernel: an agent that hears `410 Gone` from its operator (the
//! contract's "this node's agents are being removed") detaches its programs and removes every pin,
//! whether it hears it on its long poll or, being stopped, on the one question it asks then; and a
//! stopped agent whose operator still serves its node keeps every pin (a restart, an upgrade).
//!
//! The operator here is the tests' stand-in snapshot server, which can answer `410` with or without
//! waking the long polls it holds (the real operator's side is tested in `cluster_life.rs`). Run
//! as root after `cargo build --workspace --bins`.
mod life_node;

use std::time::Duration;

use kmesh_tests::{Agent, AgentSource, SnapshotServer};
use life_node::{NODE, Node, READY, wait_enrolled};

/// A stand-in operator serving `node`'s generation 1 (the VIP over backend `a`), holding long
/// polls 20 s: long enough that an uninstall that does not wake them is only heard by a new
/// request.
fn operator(node: &Node) -> SnapshotServer {
    let server = SnapshotServer::start(Duration::from_secs(20)).expect("snapshot server");
    server.publish(NODE, "1", node.snapshot(1, &["a"]));
    server
}

fn start_agent(node: &Node, server: &SnapshotServer) -> Agent {
    let mut agent = node.start_agent_from(
        AgentSource::Operator {
            url: server.url(),
            token_file: None,
            ca_file: None,
        },
        &[],
    );
    agent.wait_ready(READY).expect("agent ready");
    wait_enrolled(&mut agent);
    agent
}

/// The VIP is steered to `a` (10 of 10 connects), or not steered at all (10 of 10 unreachable).
fn assert_steered(node: &Node, steered: bool, what: &str) {
    let report = node.probe(10);
    if steered {
        assert_eq!(report.replies("a"), 10, "{what}: {report:?}");
    } else {
        assert_eq!(
            report.errors_of("ENETUNREACH"),
            10,
            "{what}: still steered: {report:?}"
        );
    }
}

#[test]
fn a_410_on_the_long_poll_detaches_and_unpins_at_once() {
    let node = Node::new("uninstall", 173, &["a"]);
    let server = operator(&node);
    let mut agent = start_agent(&node, &server);
    assert_steered(&node, true, "installed");
    assert!(!node.pins().is_empty());

    server.uninstall(true);
    agent
        .wait_for(Duration::from_secs(10), "the uninstall", |a| {
            Ok(!a.debug_snapshot()?["uninstalled"].is_null())
        })
        .expect("agent uninstalled");
    let status = agent.debug_snapshot().unwrap();
    println!("after the 410: {}", status["uninstalled"]);
    assert_eq!(
        status["uninstalled"]["outcome"], "every pin removed",
        "{status}"
    );
    assert!(
        node.pins().is_empty(),
        "pins left: {:?} (in {})",
        node.pins(),
        node.dir.path().display()
    );
    assert_steered(&node, false, "after the uninstall");
    // The agent stays up (a restart would install again), not ready, until it is stopped.
    let (code, body) = agent.http_get("/readyz").unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("uninstalled"), "{body}");
    assert!(agent.terminate().expect("SIGTERM").success());
    assert!(node.pins().is_empty(), "pins came back: {:?}", node.pins());
}

#[test]
fn a_stopped_agent_keeps_its_pins_unless_its_operator_answers_410() {
    let node = Node::new("stopuninstall", 174, &["a"]);
    let server = operator(&node);

    // A restart: the operator serves the node, so the pins and the steering stay.
    let mut first = start_agent(&node, &server);
    assert!(first.terminate().expect("SIGTERM").success());
    assert!(
        first.log().contains("programs stay attached"),
        "{}",
        first.log()
    );
    assert!(!node.pins().is_empty(), "a restart removed the pins");
    assert_steered(&node, true, "after a plain stop");

    // An uninstall the long poll has not heard of (the held request is not woken): only the
    // stopping agent's own question learns it.
    let mut second = start_agent(&node, &server);
    assert_eq!(second.debug_snapshot().unwrap()["adopted_pins"], true);
    server.uninstall(false);
    std::thread::sleep(Duration::from_millis(500));
    assert!(!node.pins().is_empty(), "the held long poll heard the 410");
    assert!(second.terminate().expect("SIGTERM").success());
    println!(
        "stopping agent's log ends: {}",
        second
            .log()
            .lines()
            .rev()
            .take(4)
            .collect::<Vec<_>>()
            .join(" | ")
    );
    assert!(
        node.pins().is_empty(),
        "a stop during an uninstall left pins: {:?}",
        node.pins()
    );
    assert_steered(&node, false, "after the stop during an uninstall");
}
