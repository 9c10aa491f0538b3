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
    net::TcpListener,
    process::{Command, Output},
    time::Duration,
};

use kmesh_common::mode;
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
    let snapshot = SnapshotBuilder::new(NODE, n, mode::KERNEL_NATIVE).build();
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

/// Nothing listens: the exact error, naming the address, and a non-zero exit.
#[test]
fn an_unreachable_agent_is_named() {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
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
    for sub in ["compile", "dump", "log-level", "version", "completion"] {
        assert!(bash.contains(sub), "bash completion lacks {sub}");
    }
}
