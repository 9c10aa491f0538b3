//! The real binary's supervision of its data-plane thread (real kernel, root): when the thread dies,
//! the agent stops being ready and exits non-zero with a clear log line, rather than serving
//! `/readyz` 200 while nothing applies snapshots any more.
//!
//! No input can make the data plane panic (that would be a bug), so the test uses the hidden
//! `--test-panic-at-snapshot N` hook, which panics the thread on its Nth snapshot. The logic behind
//! it (status, readiness, the exit report) is unit tested in `supervise.rs` and `admin.rs`; this
//! checks the wiring in the binary.
use std::time::Duration;

use kmesh_common::mode;
use kmesh_snapshot::builder::SnapshotBuilder;
use kmesh_tests::{
    Agent, AgentDir, AgentOptions, AgentSource, TempPath, TestCgroup, write_atomically,
};

const NODE: &str = "node-sup";

fn snapshot(generation: u64) -> Vec<u8> {
    SnapshotBuilder::new(NODE, generation, mode::KERNEL_NATIVE)
        .build()
        .encode()
        .unwrap()
}

#[test]
fn a_dead_data_plane_makes_the_agent_exit_non_zero() {
    let cgroup = TestCgroup::new("supervise").expect("cgroup");
    let dir = AgentDir::new("supervise").expect("pins");
    let file = TempPath::new("supervise.snap");
    write_atomically(file.path(), &snapshot(1)).unwrap();
    let mut agent = Agent::start(&AgentOptions {
        node_name: NODE,
        source: AgentSource::File(file.path()),
        dir: &dir,
        cgroup: &cgroup,
        extra_args: vec!["--test-panic-at-snapshot".into(), "2".into()],
    })
    .expect("agent");
    agent.wait_ready(Duration::from_secs(20)).expect("ready");

    // The second snapshot kills the data plane.
    write_atomically(file.path(), &snapshot(2)).unwrap();
    let status = agent.wait_exit(Duration::from_secs(10)).expect("exit");
    let log = agent.log();
    assert!(!status.success(), "exited with {status}; log:\n{log}");
    assert!(
        log.contains("the data plane thread stopped (panicked: test hook"),
        "no clear log line; log:\n{log}"
    );
    assert!(
        agent.http_get("/readyz").is_err(),
        "the admin server still answers after the exit"
    );
}
