//! What `kmesh-demo` prints, read back and checked: shared by `demo.rs` (the local demo) and
//! `cluster_demo.rs` (`kmesh-demo --cluster`), which tell the same story. Each step's distribution
//! of the 1,000 connections must be the one its Istio YAML asks for: exactly (all to v1; all
//! refused with ENETUNREACH once the mode is Disabled), or within 5 standard deviations of the
//! weights (90/10 v1/v2, 50/50 v2/v3), so a step that applies the wrong file is caught.
use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use kmesh_tests::{agent, cgroup2_root, names, netns};

const CONNECTIONS: f64 = 1000.0;

/// Where a step's connections landed, as the demo prints it.
#[derive(Debug, Default, Clone, PartialEq)]
struct Landed {
    v1: u64,
    v2: u64,
    v3: u64,
    not_delivered: u64,
    /// The `not delivered` line, with its errors.
    not_delivered_line: String,
}

/// What a step must show: its title, each version's share of the connections, and whether every
/// connection is refused.
struct Expected {
    title_has: &'static str,
    shares: [(&'static str, f64); 3],
    /// Every connection refused, with this error.
    all_refused_with: Option<&'static str>,
}

const EXPECTED: [Expected; 4] = [
    Expected {
        title_has: "all traffic to reviews v1",
        shares: [("v1", 1.0), ("v2", 0.0), ("v3", 0.0)],
        all_refused_with: None,
    },
    Expected {
        title_has: "90% to v1, 10% to v2",
        shares: [("v1", 0.9), ("v2", 0.1), ("v3", 0.0)],
        all_refused_with: None,
    },
    Expected {
        title_has: "50% to v2, 50% to v3",
        shares: [("v1", 0.0), ("v2", 0.5), ("v3", 0.5)],
        all_refused_with: None,
    },
    Expected {
        title_has: "mode Disabled",
        shares: [("v1", 0.0), ("v2", 0.0), ("v3", 0.0)],
        all_refused_with: Some("ENETUNREACH 1000"),
    },
];

/// Runs `kmesh-demo ARGS` to its end and checks that it succeeded: (its pid, its stdout).
pub fn run_demo(args: &[&str]) -> (i32, String) {
    let started = Instant::now();
    let child = Command::new(env!("CARGO_BIN_EXE_kmesh-demo"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running kmesh-demo");
    let pid = child.id() as i32;
    let output = child.wait_with_output().expect("waiting for kmesh-demo");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        // The whole output first, the demo's error last: a CI log that keeps only the head and
        // the tail of a failure still shows what went wrong.
        println!("kmesh-demo {args:?} stdout:\n{stdout}\nkmesh-demo {args:?} stderr:\n{stderr}");
        panic!(
            "kmesh-demo {args:?} failed ({}) after {:.1?}; its error (the whole output is above):\n{}",
            output.status,
            started.elapsed(),
            demo_error(&stderr)
        );
    }
    println!("kmesh-demo {args:?} ran in {:.1?}", started.elapsed());
    for note in stderr.lines().filter(|l| l.starts_with("kmesh-demo note:")) {
        println!("{note}");
    }
    (pid, stdout)
}

/// The error `kmesh-demo` ended with (from its last `kmesh-demo: ` line on), at most 60 lines.
fn demo_error(stderr: &str) -> String {
    let from = stderr.rfind("kmesh-demo: ").unwrap_or(0);
    let lines: Vec<&str> = stderr[from..].lines().collect();
    let mut error = lines[..lines.len().min(60)].join("\n");
    if lines.len() > 60 {
        error.push_str(&format!(
            "\n... ({} more lines: the whole output is above)",
            lines.len() - 60
        ));
    }
    error
}

/// Checks the steps `stdout` prints, in order, against the story.
pub fn check_story(stdout: &str) {
    let steps = parse_steps(stdout);
    assert_eq!(steps.len(), EXPECTED.len(), "steps printed:\n{stdout}");
    for (index, ((title, landed), expected)) in steps.iter().zip(&EXPECTED).enumerate() {
        let step = index + 1;
        assert!(
            title.contains(expected.title_has),
            "step {step} is {title:?}, expected {:?}:\n{stdout}",
            expected.title_has
        );
        check_step(step, landed, expected, stdout);
    }
}

/// Checks one step's distribution against what its YAML asks for.
fn check_step(step: usize, landed: &Landed, expected: &Expected, stdout: &str) {
    let counts = [landed.v1, landed.v2, landed.v3];
    let delivered: u64 = counts.iter().sum();
    assert_eq!(
        delivered + landed.not_delivered,
        CONNECTIONS as u64,
        "step {step}: every connection is counted once: {landed:?}\n{stdout}"
    );
    match expected.all_refused_with {
        Some(error) => assert!(
            landed.not_delivered == CONNECTIONS as u64 && landed.not_delivered_line.contains(error),
            "step {step}: every connection refused with {error}: {landed:?}\n{stdout}"
        ),
        None => assert_eq!(
            landed.not_delivered, 0,
            "step {step}: every connection delivered: {landed:?}\n{stdout}"
        ),
    }
    for ((version, share), n) in expected.shares.iter().zip(counts) {
        let observed = n as f64 / CONNECTIONS;
        let tolerance = 5.0 * (share * (1.0 - share) / CONNECTIONS).sqrt();
        println!(
            "step {step}: reviews {version} {observed:.3}, expected {share:.2} ± {tolerance:.3}"
        );
        assert!(
            (observed - share).abs() <= tolerance,
            "step {step}: reviews {version} got {observed:.3} of the connections, expected \
             {share} ± {tolerance:.3}: {landed:?}\n{stdout}"
        );
    }
}

/// The steps as printed: (title, where the connections landed).
fn parse_steps(stdout: &str) -> Vec<(String, Landed)> {
    let mut steps: Vec<(String, Landed)> = Vec::new();
    for line in stdout.lines() {
        if let Some(rest) = line.strip_prefix("step ") {
            let title = rest.split_once(": ").map(|(_, t)| t).unwrap_or(rest);
            steps.push((title.to_string(), Landed::default()));
            continue;
        }
        let Some((_, landed)) = steps.last_mut() else {
            continue;
        };
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["reviews", version, n, "connections", ..] => {
                let n: u64 = n.parse().unwrap_or_else(|_| panic!("count in {line:?}"));
                match *version {
                    "v1" => landed.v1 = n,
                    "v2" => landed.v2 = n,
                    "v3" => landed.v3 = n,
                    other => panic!("unknown version {other} in {line:?}"),
                }
            }
            ["not", "delivered", n, "connections", ..] => {
                landed.not_delivered = n.parse().unwrap_or_else(|_| panic!("in {line:?}"));
                landed.not_delivered_line = line.to_string();
            }
            _ => {}
        }
    }
    steps
}

/// Nothing named for process `pid` is left: network namespaces, cgroups, pins, temporary files.
pub fn assert_no_leftovers(pid: i32) {
    let mut dirs = vec![
        Path::new(netns::NETNS_RUN_DIR).to_path_buf(),
        Path::new(agent::BPFFS_ROOT).to_path_buf(),
        std::env::temp_dir(),
    ];
    dirs.push(cgroup2_root().expect("the cgroup v2 mount"));
    // The agent and the operator are killed and waited for; give the kernel a moment to release
    // what their exit frees.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let left: Vec<String> = dirs.iter().flat_map(|dir| named_for(dir, pid)).collect();
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "kmesh-demo (pid {pid}) left behind: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn named_for(dir: &Path, pid: i32) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(names::PREFIX) && names::owner_pid(n) == Some(pid))
        .map(|n| dir.join(n).display().to_string())
        .collect()
}
