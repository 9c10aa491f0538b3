//! The default demo (`kmesh-demo`, what `scripts/demo.sh` runs), end to end: the binary runs the
//! real operator over its YAML directory and the real agent, and this test reads what it prints.
//! Each step's distribution must be the one its Istio YAML asks for ([`demo_output`]). Then the demo is interrupted (SIGINT) in the middle, and must exit 130 and leave
//! nothing behind.
//!
//! Needs root and the workspace binaries (`cargo build --workspace --bins`). The two runs use the
//! same addresses, so they take turns.
mod demo_output;

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::Mutex,
    time::Instant,
};

use demo_output::{assert_no_leftovers, check_story, run_demo};
use kmesh_tests::require_root;

/// The demo's pods have fixed addresses: one run at a time.
static ONE_DEMO: Mutex<()> = Mutex::new(());

const DEMO: &str = env!("CARGO_BIN_EXE_kmesh-demo");

#[test]
fn the_demo_shows_each_istio_step_in_the_kernel() {
    require_root();
    let _turn = ONE_DEMO.lock().unwrap_or_else(|e| e.into_inner());
    let (pid, stdout) = run_demo(&[]);
    check_story(&stdout);
    assert_no_leftovers(pid);
}

/// Sends SIGINT while the story runs (once step 2 is printed): the demo stops, exits 130 (128 +
/// SIGINT) and removes everything it made.
#[test]
fn an_interrupted_demo_exits_130_and_removes_everything() {
    require_root();
    let _turn = ONE_DEMO.lock().unwrap_or_else(|e| e.into_inner());
    let mut child = Command::new(DEMO)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running kmesh-demo");
    let pid = child.id() as i32;
    let stdout = child.stdout.take().expect("piped stdout");
    let mut seen = String::new();
    let mut interrupted = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("reading the demo's output");
        seen.push_str(&line);
        seen.push('\n');
        if line.starts_with("step 2/4") {
            // SAFETY: signalling our own child by pid.
            unsafe { libc::kill(pid, libc::SIGINT) };
            interrupted = Some(Instant::now());
        }
    }
    let output = child.wait_with_output().expect("waiting for kmesh-demo");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        seen.contains("step 2/4"),
        "the demo never reached step 2:\n{seen}\n{stderr}"
    );
    assert!(
        !seen.contains("step 3/4"),
        "the demo went on after SIGINT:\n{seen}\n{stderr}"
    );
    assert_eq!(
        output.status.code(),
        Some(130),
        "exit status after SIGINT:\n{seen}\n{stderr}"
    );
    assert!(stderr.contains("interrupted"), "{stderr}");
    if let Some(at) = interrupted {
        println!("stopped and cleaned up {:.2?} after SIGINT", at.elapsed());
    }
    assert_no_leftovers(pid);
}
