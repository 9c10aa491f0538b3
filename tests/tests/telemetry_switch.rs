//! The access-log switch through a snapshot, on the real kernel: the agent reads
//! `NodeConfig.access_log` back from the live generation in its pinned maps each time a generation
//! goes live (`node-agent/src/telemetry/live_config.rs`), and switches without a restart. Its
//! metrics serve the telemetry families beside the `kmesh_*` ones.
use std::time::{Duration, Instant};

use kmesh_common::{access_log, log_level, mode};
use kmesh_snapshot::builder::SnapshotBuilder;
use kmesh_tests::{Agent, AgentDir, AgentOptions, AgentSource, TestCgroup, write_atomically};

const NODE: &str = "telemetry-node";

fn snapshot(generation: u64, setting: u8) -> Vec<u8> {
    let mut b = SnapshotBuilder::new(NODE, generation, mode::KERNEL_NATIVE);
    b.agent_settings(setting, log_level::INFO);
    b.build().encode().expect("encode")
}

/// Waits for a line of the agent's log holding every one of `parts`.
fn wait_for_log(agent: &Agent, parts: &[&str]) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if agent
            .log()
            .lines()
            .any(|line| parts.iter().all(|p| line.contains(p)))
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("no log line with {parts:?}:\n{}", agent.log());
}

/// Removes the snapshot file, also when the test fails.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn the_access_log_is_switched_by_the_live_snapshot() {
    let name = "telemetry-switch";
    let cgroup = TestCgroup::new(name).expect("test cgroup");
    let dir = AgentDir::new(name).expect("pin directory");
    let file = std::env::temp_dir().join(format!("kmt-{name}-{}.snap", std::process::id()));
    let _remove = RemoveOnDrop(file.clone());
    write_atomically(&file, &snapshot(1, access_log::ON)).expect("write snapshot");
    let mut agent = Agent::start(&AgentOptions {
        node_name: NODE,
        source: AgentSource::File(&file),
        dir: &dir,
        cgroup: &cgroup,
        extra_args: vec![],
    })
    .expect("start kmesh-agent");
    agent
        .wait_ready(Duration::from_secs(20))
        .expect("agent ready");
    wait_for_log(
        &agent,
        &[
            "access log switched by the live snapshot",
            "generation=1",
            "access_log=On",
        ],
    );

    write_atomically(&file, &snapshot(2, access_log::OFF)).expect("write snapshot");
    wait_for_log(
        &agent,
        &[
            "access log switched by the live snapshot",
            "generation=2",
            "access_log=Off",
        ],
    );

    let metrics = agent.metrics().expect("metrics");
    assert!(metrics.contains("kmesh_telemetry_series 0\n"), "{metrics}");
    assert!(
        metrics.contains("kmesh_telemetry_series_dropped_total 0\n"),
        "{metrics}"
    );
    assert!(metrics.ends_with("# EOF\n"), "{metrics}");
}
