//! The L7 test instruments: `kmesh-echo`, an HTTP/1.1 and h2c server that answers with its
//! version and what it received, and `kmesh-http`, a client that sends requests and counts the
//! answers by status and by the answering server's version. Both run inside pod netns like
//! `kmesh-probe`. This module holds what both sides and the tests share: the report, the echo
//! server's answer and its control headers.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The response header naming the echo server's version (`--version`).
pub const VERSION_HEADER: &str = "x-echo-version";
/// Request header: answer with this status instead of 200.
pub const STATUS_HEADER: &str = "x-echo-status";
/// Request header: wait this many milliseconds before answering.
pub const DELAY_HEADER: &str = "x-echo-delay-ms";
/// Request header: the first request carrying a given value gets a 503, the later ones a 200 (for
/// retries: the retry of a failed first attempt carries the same value).
pub const FAIL_FIRST_HEADER: &str = "x-echo-fail-first";
/// `GET` this path for the number of requests the server answered, this one excluded
/// ([`EchoCount`]).
pub const COUNT_PATH: &str = "/__echo/count";

/// The echo server's answer body: what it received.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EchoBody {
    pub version: String,
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub protocol: String,
    pub method: String,
    /// Path and query.
    pub path: String,
    /// `Host` (HTTP/1.1) or `:authority` (HTTP/2).
    pub authority: String,
    /// Header name → its values, in order.
    pub headers: BTreeMap<String, Vec<String>>,
    /// The address the request came from.
    pub peer: String,
}

/// The body of [`COUNT_PATH`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EchoCount {
    pub requests: u64,
}

/// What `kmesh-http` prints (one JSON line) when it is done.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HttpReport {
    pub requests: u64,
    /// Status code → count (requests that got an answer).
    pub by_status: BTreeMap<u16, u64>,
    /// The answer's [`VERSION_HEADER`] (`-` without one) → count.
    pub by_version: BTreeMap<String, u64>,
    /// Failures without an answer → count: `connect: <error>`, `timeout`, `request: <error>`.
    pub errors: BTreeMap<String, u64>,
    /// Connections opened (connects that succeeded): with `--h2c` and no `--new-connections`,
    /// every request is a stream of one connection.
    #[serde(default)]
    pub connections: u64,
    /// Latency of answered requests, milliseconds.
    pub latency_ms: Latency,
    pub elapsed_ms: u64,
    /// The first answer's body (with `--keep-body`), e.g. an [`EchoBody`] as JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_body: Option<String>,
    /// The first answer's headers (with `--keep-body`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub first_headers: BTreeMap<String, Vec<String>>,
}

impl HttpReport {
    /// Requests answered with `status`.
    pub fn status(&self, status: u16) -> u64 {
        self.by_status.get(&status).copied().unwrap_or(0)
    }

    /// Requests answered by the echo server of `version`.
    pub fn version(&self, version: &str) -> u64 {
        self.by_version.get(version).copied().unwrap_or(0)
    }

    /// The first answer's body as the echo server's [`EchoBody`].
    pub fn first_echo(&self) -> Option<EchoBody> {
        serde_json::from_str(self.first_body.as_deref()?).ok()
    }
}

/// Latency percentiles, milliseconds (fractions kept).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    #[serde(default)]
    pub min: f64,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Latency {
    /// From unsorted samples in microseconds.
    pub fn of(mut samples_us: Vec<u64>) -> Latency {
        if samples_us.is_empty() {
            return Latency::default();
        }
        samples_us.sort_unstable();
        let at = |q: f64| {
            let i = ((samples_us.len() as f64 - 1.0) * q).round() as usize;
            samples_us[i.min(samples_us.len() - 1)] as f64 / 1000.0
        };
        Latency {
            min: at(0.0),
            p50: at(0.50),
            p99: at(0.99),
            max: at(1.0),
        }
    }
}

/// A workspace binary running inside a pod's netns (and a cgroup, when given): a server such as
/// `kmesh-echo` or `kmesh-waypoint`. Killed when dropped; its stderr is kept in a file so that a
/// failing test can show it ([`Daemon::stderr`]).
pub struct Daemon {
    child: Option<std::process::Child>,
    desc: String,
    stderr_path: std::path::PathBuf,
}

impl Daemon {
    /// Starts workspace binary `bin` with `args` in the netns named `netns`.
    pub fn spawn(
        netns: &str,
        cgroup: Option<&crate::TestCgroup>,
        bin: &str,
        args: &[&str],
    ) -> std::io::Result<Daemon> {
        use std::process::{Command, Stdio};
        let path = crate::probe::workspace_bin(bin)?;
        let stderr_path = std::env::temp_dir().join(format!(
            "kmt-{bin}-{netns}-{}-{}.log",
            std::process::id(),
            args.len()
        ));
        let stderr = std::fs::File::create(&stderr_path)?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", netns])
            .arg(&path)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        if let Some(cgroup) = cgroup {
            crate::cluster::process::join_cgroup_before_exec(&mut cmd, cgroup.path())?;
        }
        let desc = format!("{bin} {} in {netns}", args.join(" "));
        let child = cmd
            .spawn()
            .map_err(|e| std::io::Error::new(e.kind(), format!("spawn {desc}: {e}")))?;
        Ok(Daemon {
            child: Some(child),
            desc,
            stderr_path,
        })
    }

    /// What it wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Fails if it has exited (with its stderr).
    pub fn assert_running(&mut self) {
        if let Some(child) = self.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            panic!("{} exited ({status}): {}", self.desc, self.stderr());
        }
    }

    /// Sends SIGTERM and waits up to `timeout` for it to exit; its exit status.
    pub fn terminate(&mut self, timeout: std::time::Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        // SAFETY: a signal to our own child's pid.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        None
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.stderr_path);
    }
}

/// Runs `kmesh-http ARGS...` in the netns named `netns` and the test cgroup (so that its connects
/// go through the kernel programs) and parses its report.
pub fn run_http(
    netns: &str,
    cgroup: &crate::TestCgroup,
    args: &[&str],
) -> std::io::Result<HttpReport> {
    run_http_in_cgroup_dir(netns, cgroup.path(), args)
}

/// [`run_http`] in the cgroup directory `cgroup` (a cluster pod's, below its node's).
pub fn run_http_in_cgroup_dir(
    netns: &str,
    cgroup: &std::path::Path,
    args: &[&str],
) -> std::io::Result<HttpReport> {
    use std::process::{Command, Stdio};
    let bin = crate::probe::workspace_bin("kmesh-http")?;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns])
        .arg(&bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    crate::cluster::process::join_cgroup_before_exec(&mut cmd, cgroup)?;
    let desc = format!("kmesh-http {} in {netns}", args.join(" "));
    let out = cmd
        .output()
        .map_err(|e| std::io::Error::new(e.kind(), format!("{desc}: {e}")))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).map_err(|e| {
        std::io::Error::other(format!(
            "{desc}: {e}; stdout {stdout:?}, stderr {:?}",
            String::from_utf8_lossy(&out.stderr)
        ))
    })
}
