//! The agent's command line and start-up errors: each bad input gets a clear, specific message and a
//! non-zero exit, and leaves nothing attached or pinned.
use std::process::{Command, Output};

use kmesh_tests::{AgentDir, workspace_bin};

fn agent(args: &[&str]) -> Output {
    kmesh_tests::require_root();
    Command::new(workspace_bin("kmesh-agent").expect("kmesh-agent binary"))
        .args(args)
        .env_remove("NODE_NAME")
        .output()
        .expect("run kmesh-agent")
}

fn assert_fails_with(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got {:?}; stderr: {stderr}",
        out.status
    );
    assert!(
        stderr.contains(needle),
        "stderr should mention {needle:?}: {stderr}"
    );
}

#[test]
fn node_name_is_required() {
    assert_fails_with(&agent(&["--snapshot-file", "/nonexistent"]), "--node-name");
}

#[test]
fn exactly_one_source_is_required() {
    assert_fails_with(&agent(&["--node-name", "n1"]), "--snapshot-file");
    assert_fails_with(
        &agent(&[
            "--node-name",
            "n1",
            "--snapshot-file",
            "/x",
            "--operator-url",
            "http://127.0.0.1:1",
        ]),
        "cannot be used with",
    );
}

#[test]
fn a_pin_directory_off_bpffs_is_refused() {
    let dir = std::env::temp_dir().join(format!("kmt-notbpffs-{}", std::process::id()));
    let out = agent(&[
        "--node-name",
        "n1",
        "--snapshot-file",
        "/nonexistent",
        "--bpffs-dir",
        dir.to_str().unwrap(),
    ]);
    let _ = std::fs::remove_dir(&dir);
    assert_fails_with(&out, "is not on a bpf filesystem");
}

#[test]
fn a_missing_cgroup_is_refused_and_nothing_is_pinned() {
    let dir = AgentDir::new("cgmissing").expect("pin dir");
    let out = agent(&[
        "--node-name",
        "n1",
        "--snapshot-file",
        "/nonexistent",
        "--bpffs-dir",
        dir.path().to_str().unwrap(),
        "--cgroup",
        "/sys/fs/cgroup/does-not-exist-kmesh",
    ]);
    assert_fails_with(&out, "/sys/fs/cgroup/does-not-exist-kmesh");
    assert!(
        dir.pins().is_empty(),
        "a failed start left pins: {:?}",
        dir.pins()
    );
}

#[test]
fn uninstall_of_a_missing_directory_is_a_no_op() {
    let out = agent(&[
        "uninstall",
        "--bpffs-dir",
        "/sys/fs/bpf/kmt-never-installed",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
