//! The `kmesh-probe` client: its report, spawning it in a pod netns and a cgroup, and
//! locating workspace binaries.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::cgroup::TestCgroup;
use crate::cmd::describe;

/// What `kmesh-probe` prints (one JSON line) when it is done.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeReport {
    /// Connects tried.
    pub attempts: u64,
    /// Connects that got a reply line.
    pub ok: u64,
    /// Connects that failed (`attempts == ok + failed`).
    pub failed: u64,
    /// Reply line (the answering pod's name) -> count.
    #[serde(default)]
    pub by_reply: BTreeMap<String, u64>,
    /// Failure -> count. Keys are errno names (`ECONNREFUSED`, `ENETUNREACH`, `EPERM`,
    /// ...) or `connect_timeout`, `read_timeout`, `no_reply` (closed without a line).
    #[serde(default)]
    pub errors: BTreeMap<String, u64>,
    /// Wall time of the whole run.
    #[serde(default)]
    pub elapsed_ms: u64,
    /// The same, in microseconds (benchmarks divide it by the attempts).
    #[serde(default)]
    pub elapsed_us: u64,
    /// Every attempt in order, with the times of its connect() call (only with `--timeline`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub timeline: Vec<TimedAttempt>,
}

/// One attempt of a `--timeline` probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimedAttempt {
    /// [`monotonic_ns`] just before connect() and just after it returned: the kernel program
    /// that steered this connection ran in between.
    pub connect_ns: [u64; 2],
    pub outcome: Outcome,
}

/// How an attempt ended: the reply line, or the error key (as in [`ProbeReport::errors`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Reply(String),
    Error(String),
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of [`TimedAttempt::connect_ns`], the same clock the
/// agent stamps its flips with (`recent_flips` in `/debug/snapshot`), so the two can be compared.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl ProbeReport {
    /// How many replies came from `pod`.
    pub fn replies(&self, pod: &str) -> u64 {
        self.by_reply.get(pod).copied().unwrap_or(0)
    }

    /// Asserts that `pod`'s share of the successful connections is `expected` within 5 standard
    /// deviations of a binomial proportion (a false failure less than once in a million checks).
    pub fn assert_share(&self, pod: &str, expected: f64) {
        let (line, within) = self.share(pod, self.replies(pod), expected);
        println!("{line}");
        assert!(within, "{line}: {self:?}");
    }

    /// How many replies came from pods whose name starts with `prefix` (a Deployment's pods).
    pub fn replies_from(&self, prefix: &str) -> u64 {
        let matching = self.by_reply.iter().filter(|(k, _)| k.starts_with(prefix));
        matching.map(|(_, n)| n).sum()
    }

    /// The pods that replied, among those whose name starts with `prefix`.
    pub fn pods_replying(&self, prefix: &str) -> BTreeSet<String> {
        let keys = self.by_reply.keys().filter(|k| k.starts_with(prefix));
        keys.cloned().collect()
    }

    /// [`Self::assert_share`] of the pods whose name starts with `prefix`, printed as a cluster
    /// test's progress line.
    pub fn assert_share_from(&self, prefix: &str, expected: f64) {
        let (line, within) = self.share(&format!("{prefix}*"), self.replies_from(prefix), expected);
        crate::progress!("{line}");
        assert!(within, "{line}: {self:?}");
    }

    /// The observed share of `replies` against `expected` within 5 standard deviations: the line
    /// that says so, and whether it is within.
    fn share(&self, what: &str, replies: u64, expected: f64) -> (String, bool) {
        let n = self.ok as f64;
        let observed = replies as f64 / n;
        let tolerance = 5.0 * (expected * (1.0 - expected) / n).sqrt();
        let line = format!(
            "share of {what}: observed {observed:.4}, expected {expected:.2} ± {tolerance:.4} (n = {n})"
        );
        (line, (observed - expected).abs() <= tolerance)
    }

    /// How many failures had the key `err` (e.g. `"ENETUNREACH"`).
    pub fn errors_of(&self, err: &str) -> u64 {
        self.errors.get(err).copied().unwrap_or(0)
    }
}

/// Locates a binary of the workspace (`kmesh-probe`, `kmesh-agent`, ...) the way
/// assert_cmd does: in the target directory of the running test executable
/// (`target/<profile>/deps/<test>` -> `target/<profile>/<name>`).
///
/// The environment variable `<NAME>_BIN` (upper case, `-` -> `_`, e.g.
/// `KMESH_PROBE_BIN`, `KMESH_AGENT_BIN`) overrides it.
pub fn workspace_bin(name: &str) -> io::Result<PathBuf> {
    let var = format!("{}_BIN", name.to_ascii_uppercase().replace('-', "_"));
    if let Some(p) = std::env::var_os(&var) {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{var}={} does not name a file", p.display()),
        ));
    }
    let exe = std::env::current_exe()?;
    let mut dir = exe
        .parent()
        .ok_or_else(|| io::Error::other(format!("{} has no parent dir", exe.display())))?;
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().unwrap_or(dir);
    }
    let p = dir.join(name);
    if p.is_file() {
        Ok(p)
    } else {
        Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "kmesh-rs binary `{name}` not found at {}: run `cargo build --workspace --bins` \
                 first (same CARGO_TARGET_DIR and profile as the tests), or set {var} to its path",
                p.display()
            ),
        ))
    }
}

/// A running `kmesh-probe`. Dropping it without [`wait`](Self::wait) kills it.
#[derive(Debug)]
pub struct ProbeHandle {
    child: Option<Child>,
    desc: String,
}

pub(crate) fn spawn(netns: &str, cgroup: &TestCgroup, args: &[&str]) -> io::Result<ProbeHandle> {
    spawn_in_cgroup_dir(netns, cgroup.path(), args)
}

/// Starts `kmesh-probe ARGS...` inside the netns named `netns` and the cgroup directory `cgroup`
/// (any cgroup, e.g. a cluster pod's cgroup below its node's).
pub fn spawn_in_cgroup_dir(netns: &str, cgroup: &Path, args: &[&str]) -> io::Result<ProbeHandle> {
    let bin = workspace_bin("kmesh-probe")?;
    let procs = cgroup.join("cgroup.procs");
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns])
        .arg(&bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    crate::cluster::process::join_cgroup_before_exec(&mut cmd, cgroup)?;
    let desc = format!("{} (cgroup {})", describe(&cmd), cgroup.display());
    let child = cmd.spawn().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("spawn `{desc}` (joining {}): {e}", procs.display()),
        )
    })?;
    Ok(ProbeHandle {
        child: Some(child),
        desc,
    })
}

impl ProbeHandle {
    /// Pid of the probe process (`ip netns exec` execs the probe in place, so it is
    /// the probe's own pid once it runs).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// Whether the probe has exited.
    pub fn has_exited(&mut self) -> io::Result<bool> {
        match self.child.as_mut() {
            Some(c) => Ok(c.try_wait()?.is_some()),
            None => Ok(true),
        }
    }

    /// SIGKILLs the probe (its report is lost).
    pub fn kill(&mut self) -> io::Result<()> {
        match self.child.as_mut() {
            Some(c) => c.kill(),
            None => Ok(()),
        }
    }

    /// Waits for the probe to finish and parses its report. An unsuccessful exit (or
    /// a kill) is an error carrying the probe's stderr.
    pub fn wait(mut self) -> io::Result<ProbeReport> {
        let child = self.child.take().expect("probe child present until waited");
        let out = child.wait_with_output()?;
        parse_report(&self.desc, out)
    }

    /// Like [`wait`](Self::wait), but kills the probe and fails if it has not finished
    /// within `timeout`. The output is read while waiting: a large report (`--timeline`)
    /// would otherwise fill the pipe and block the probe forever.
    pub fn wait_timeout(mut self, timeout: Duration) -> io::Result<ProbeReport> {
        let mut child = self.child.take().expect("probe child present until waited");
        let stdout = read_in_background(child.stdout.take());
        let stderr = read_in_background(child.stderr.take());
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("`{}` still running after {timeout:?}; killed", self.desc),
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let joined = |t: std::thread::JoinHandle<Vec<u8>>| t.join().unwrap_or_default();
        let out = std::process::Output {
            status,
            stdout: joined(stdout),
            stderr: joined(stderr),
        };
        parse_report(&self.desc, out)
    }
}

/// The last 4,000 bytes of `text` (a `--timeline` report is megabytes), cut at a char boundary.
fn tail(text: &str) -> &str {
    let mut start = text.len().saturating_sub(4000);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// Reads a child's pipe to its end on a thread of its own.
fn read_in_background(
    pipe: Option<impl io::Read + Send + 'static>,
) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        bytes
    })
}

/// The report on the last non-empty line of a finished probe's stdout.
fn parse_report(desc: &str, out: std::process::Output) -> io::Result<ProbeReport> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "`{desc}` failed ({}); stderr: {}; stdout: {}",
            out.status,
            tail(stderr.trim()),
            tail(stdout.trim())
        )));
    }
    let line = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    serde_json::from_str(line).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "`{desc}` printed no valid report ({e}); stdout: {}; stderr: {}",
                tail(stdout.trim()),
                tail(stderr.trim())
            ),
        )
    })
}

impl Drop for ProbeHandle {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A path for `kmesh-probe --until-file` / `--ready-file`: unique, absent at first,
/// removed on drop.
#[derive(Debug)]
pub struct StopFile {
    path: PathBuf,
}

impl StopFile {
    /// A fresh path `<tmp>/kmt-<tag>-<pid>-<n>.flag` (not created).
    pub fn new(tag: &str) -> StopFile {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("kmt-{tag}-{}-{n}.flag", std::process::id()));
        let _ = std::fs::remove_file(&path);
        StopFile { path }
    }

    /// The path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path as a `&str`, to pass as a probe argument.
    pub fn arg(&self) -> &str {
        self.path.to_str().expect("temp dir path is UTF-8")
    }

    /// Creates the file (tells a `--until-file` probe to finish).
    pub fn signal(&self) -> io::Result<()> {
        std::fs::write(&self.path, b"")
    }

    /// Whether the file exists (e.g. a probe's `--ready-file`).
    pub fn exists(&self) -> bool {
        self.path.exists()
    }

    /// Waits until the file exists, up to `timeout`.
    pub fn wait_exists(&self, timeout: Duration) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        while !self.exists() {
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{} not created within {timeout:?}", self.path.display()),
                ));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    }
}

impl Drop for StopFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
