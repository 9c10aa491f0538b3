//! `kmeshctl` against a real agent (issue #9): `dump snapshot|authz|metrics`, `version --agent` and
//! `log-level`, run as the real binary against the real `kmesh-agent` on a snapshot file, with its
//! programs loaded into this kernel and attached to a test cgroup.
//!
//! The snapshots are empty (no service): what is checked is what kmeshctl reads and changes. Each
//! generation is new, so a dump that answered stale data, or a level change that did not take,
//! shows as a wrong number or a missing log line. `log-level debug` is checked by its effect: the
//! agent's debug line `snapshot file changed` is absent for generation 2 (at `info`) and present
//! for generation 3 (after `log-level debug`).
//!
//! Run as root after `cargo build --workspace --bins` (kmeshctl and kmesh-agent).
use std::{
    process::{Command, Output},
    time::Duration,
};

use kmesh_common::{access_log, log_level, mode};
use kmesh_snapshot::builder::SnapshotBuilder;
use kmesh_tests::{
    Agent, AgentDir, AgentOptions, AgentSource, TempPath, TestCgroup, workspace_bin,
    write_atomically,
};

const NODE: &str = "node-1";
/// The agent's debug line on every change of its snapshot file (`node-agent/src/source.rs`).
const DEBUG_LINE: &str = "snapshot file changed";

fn kmeshctl(args: &[&str]) -> Output {
    Command::new(workspace_bin("kmeshctl").expect("the kmeshctl binary (cargo build --bins)"))
        .args(args)
        .output()
        .expect("run kmeshctl")
}

/// Standard output of a run that must succeed.
fn stdout_of(args: &[&str]) -> String {
    let out = kmeshctl(args);
    assert!(
        out.status.success(),
        "kmeshctl {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// Standard error of a run that must fail.
fn stderr_of_failed(args: &[&str]) -> String {
    let out = kmeshctl(args);
    assert!(
        !out.status.success(),
        "kmeshctl {args:?} succeeded; stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stderr).expect("UTF-8 errors")
}

/// An agent on a snapshot file, with generation 1 live.
struct World {
    snapshot_file: TempPath,
    agent: Agent,
    _dir: AgentDir,
    _cgroup: TestCgroup,
}

impl World {
    /// `name` is unique per test (pins, cgroup and file are named after it).
    fn new(name: &str) -> World {
        let dir = AgentDir::new(name).expect("pin dir");
        let cgroup = TestCgroup::new(name).expect("test cgroup");
        let snapshot_file = TempPath::new(&format!("{name}-snapshot.bin"));
        write_generation(&snapshot_file, 1);
        let mut agent = Agent::start(&AgentOptions {
            node_name: NODE,
            source: AgentSource::File(snapshot_file.path()),
            dir: &dir,
            cgroup: &cgroup,
            extra_args: vec![],
        })
        .expect("start kmesh-agent");
        agent
            .wait_ready(Duration::from_secs(20))
            .expect("agent ready");
        let mut world = World {
            snapshot_file,
            agent,
            _dir: dir,
            _cgroup: cgroup,
        };
        world.wait_live(1);
        world
    }

    fn admin(&self) -> String {
        self.agent.admin_addr().to_string()
    }

    /// Writes generation `n` and waits until the agent reports it live.
    fn apply(&mut self, n: u64) {
        write_generation(&self.snapshot_file, n);
        self.wait_live(n);
    }

    fn wait_live(&mut self, n: u64) {
        self.agent
            .wait_for(
                Duration::from_secs(20),
                &format!("generation {n} live"),
                |a| Ok(a.debug_snapshot()?["live"]["generation"] == n),
            )
            .expect("generation live");
    }

    fn debug_lines(&self) -> usize {
        self.agent.log().matches(DEBUG_LINE).count()
    }
}

fn write_generation(file: &TempPath, n: u64) {
    write_generation_at(file, n, log_level::INFO);
}

/// Generation `n` with the snapshot's log level `level` (`kmesh_common::log_level`).
fn write_generation_at(file: &TempPath, n: u64, level: u8) {
    let mut b = SnapshotBuilder::new(NODE, n, mode::KERNEL_NATIVE);
    b.agent_settings(access_log::OFF, level);
    let snapshot = b.build();
    write_atomically(file.path(), &snapshot.encode().expect("encode")).expect("write snapshot");
}

/// The dumps show what the agent holds now: its live generation as a number, its authorization
/// report, its metrics; and `version --agent` names its version and layout.
#[test]
fn dumps_and_version_read_the_live_agent() {
    let mut w = World::new("ctl-dump");
    w.apply(2);
    let admin = w.admin();

    let snapshot: serde_json::Value =
        serde_json::from_str(&stdout_of(&["dump", "snapshot", "--agent", &admin]))
            .expect("dump snapshot is JSON");
    assert_eq!(snapshot["live"]["generation"], 2, "{snapshot:#}");
    assert_eq!(snapshot["node_name"], NODE);

    let authz: serde_json::Value =
        serde_json::from_str(&stdout_of(&["dump", "authz", "--agent", &admin]))
            .expect("dump authz is JSON");
    assert!(
        authz["by_policy"].is_array() && authz["counters"].is_object(),
        "{authz:#}"
    );

    let metrics_addr = w.agent.metrics_addr().to_string();
    let metrics = stdout_of(&["dump", "metrics", "--metrics", &metrics_addr]);
    assert!(
        metrics.lines().any(|l| l == "kmesh_live_generation 2"),
        "no `kmesh_live_generation 2` in:\n{metrics}"
    );

    let version = stdout_of(&["version", "--agent", &admin]);
    let layout = snapshot["layout"].as_str().expect("a layout");
    let v = env!("CARGO_PKG_VERSION");
    assert_eq!(
        version,
        format!("kmeshctl {v}\nkmesh-agent {v} (layout {layout}) at {admin}\n")
    );
}

/// `log-level debug` takes effect at once (a debug line appears for the next snapshot, none did
/// before), is shown back, and a bad level is refused with the parser's words and changes nothing.
#[test]
fn log_level_changes_the_live_agent() {
    let mut w = World::new("ctl-log");
    let admin = w.admin();
    assert_eq!(stdout_of(&["log-level", "--agent", &admin]), "info\n");
    w.apply(2);
    assert_eq!(
        w.debug_lines(),
        0,
        "a debug line at level info:\n{}",
        w.agent.log()
    );

    assert_eq!(
        stdout_of(&["log-level", "debug", "--agent", &admin]),
        "debug\n"
    );
    assert_eq!(stdout_of(&["log-level", "--agent", &admin]), "debug\n");
    w.apply(3);
    assert!(
        w.debug_lines() >= 1,
        "no {DEBUG_LINE:?} after log-level debug:\n{}",
        w.agent.log()
    );

    for (bad, says) in [
        (
            "kmesh_agent=loud",
            "invalid log filter \"kmesh_agent=loud\"",
        ),
        ("verbose", "\"verbose\" is not a log level"),
    ] {
        let stderr = stderr_of_failed(&["log-level", bad, "--agent", &admin]);
        let expected = format!("kmeshctl: the agent at {admin} refused the log filter: ");
        assert!(
            stderr.starts_with(&expected) && stderr.contains(says),
            "{bad}: {stderr}"
        );
        assert_eq!(
            stdout_of(&["log-level", "--agent", &admin]),
            "debug\n",
            "{bad} changed the level"
        );
    }

    assert_eq!(
        stdout_of(&["log-level", "kmesh_agent=info,warn", "--agent", &admin]),
        "kmesh_agent=info,warn\n"
    );
}

/// The snapshot's log level (KmeshConfig `logLevel`) sets the agent's filter when it changes; an
/// override through `log-level` holds while generations keep the same level and ends when the
/// level changes. (The harness starts the agent with `RUST_LOG=info`, which holds until the level
/// first changes: generation 1's `info` changes nothing.)
#[test]
fn the_snapshots_log_level_applies_and_an_override_holds_until_it_changes() {
    let mut w = World::new("ctl-snaplog");
    let admin = w.admin();
    let level = || stdout_of(&["log-level", "--agent", &admin]);
    assert_eq!(level(), "info\n");

    let mut apply = |n: u64, level: u8| {
        write_generation_at(&w.snapshot_file, n, level);
        w.wait_live(n);
    };
    apply(2, log_level::DEBUG);
    assert_eq!(level(), "debug\n", "generation 2's level did not apply");

    assert_eq!(
        stdout_of(&["log-level", "warn", "--agent", &admin]),
        "warn\n"
    );
    apply(3, log_level::DEBUG);
    assert_eq!(level(), "warn\n", "the same level again ended the override");

    apply(4, log_level::TRACE);
    assert_eq!(level(), "trace\n", "a new level did not end the override");
    apply(5, log_level::TRACE);
    assert_eq!(level(), "trace\n");
    let log = w.agent.log();
    assert_eq!(
        log.matches("log filter set from the snapshot's log level")
            .count(),
        2,
        "one line per change (generations 2 and 4):\n{log}"
    );
}

/// Nothing listens: the exact error, naming the address, and a non-zero exit.
#[test]
fn an_unreachable_agent_is_named() {
    // Outside the ephemeral range: no connection of this machine takes it meanwhile.
    let port = kmesh_tests::ports::free_loopback_port().expect("a free port");
    let addr = format!("127.0.0.1:{port}");
    let refused = format!("kmeshctl: cannot reach the agent at {addr}: connection refused\n");
    assert_eq!(
        stderr_of_failed(&["dump", "snapshot", "--agent", &addr]),
        refused
    );
    assert_eq!(stderr_of_failed(&["log-level", "--agent", &addr]), refused);
    assert_eq!(
        stderr_of_failed(&["log-level", "debug", "--agent", &addr]),
        refused
    );
    let out = kmeshctl(&["version", "--agent", &addr]);
    assert!(!out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stderr), refused);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("kmeshctl {}\n", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(
        stderr_of_failed(&["dump", "metrics", "--metrics", &addr]),
        format!(
            "kmeshctl: cannot reach the agent's metrics listener at {addr}: connection refused\n"
        )
    );
}

#[test]
fn completion_prints_a_script() {
    let bash = stdout_of(&["completion", "bash"]);
    assert!(
        bash.contains("kmeshctl") && bash.contains("complete"),
        "{bash}"
    );
    for sub in [
        "compile",
        "dump",
        "explain",
        "log-level",
        "version",
        "completion",
    ] {
        assert!(bash.contains(sub), "bash completion lacks {sub}");
    }
}
