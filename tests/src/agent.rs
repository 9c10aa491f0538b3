//! Running the real `kmesh-agent` binary against a test cgroup and a private bpffs directory.
//!
//! [`AgentDir`] owns the bpffs directory (`/sys/fs/bpf/kmt-<name>-<pid>`) and removes every pin in
//! it on drop, which detaches the programs. [`Agent`] is one agent process; dropping it kills the
//! process but leaves the pins (as a real agent exit does).
use std::{
    fs,
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{TestCgroup, names, probe::workspace_bin};

/// Where bpffs is mounted on these machines (scripts/setup.sh mounts it).
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// A private pin directory for one test's agent; unpinned (programs detached) on drop.
pub struct AgentDir {
    path: PathBuf,
}

impl AgentDir {
    pub fn new(name: &str) -> io::Result<AgentDir> {
        crate::init();
        let path =
            Path::new(BPFFS_ROOT).join(format!("{}{}-{}", names::PREFIX, name, names::my_pid()));
        if path.exists() {
            remove_pins(&path)?;
        }
        Ok(AgentDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The names pinned in the directory.
    pub fn pins(&self) -> Vec<String> {
        fs::read_dir(&self.path)
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for AgentDir {
    fn drop(&mut self) {
        if let Err(e) = remove_pins(&self.path) {
            eprintln!("kmesh-tests: removing pins in {}: {e}", self.path.display());
        }
    }
}

/// Removes every pin under `dir`, then `dir` (what `kmesh-agent uninstall` does, without the binary).
/// Subdirectories are emptied and removed too (a cluster node's directory holds its agent's
/// `--bpffs-dir` below it).
pub(crate) fn remove_pins(dir: &Path) -> io::Result<()> {
    match fs::read_dir(dir) {
        Ok(rd) => {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    remove_pins(&e.path())?;
                } else {
                    fs::remove_file(e.path())?;
                }
            }
            fs::remove_dir(dir)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Where an agent gets its snapshots.
pub enum AgentSource<'a> {
    File(&'a Path),
    Operator {
        url: String,
        token_file: Option<&'a Path>,
        /// CA of the operator's certificate, for https URLs.
        ca_file: Option<&'a Path>,
    },
}

/// Options of one agent process.
pub struct AgentOptions<'a> {
    pub node_name: &'a str,
    pub source: AgentSource<'a>,
    pub dir: &'a AgentDir,
    pub cgroup: &'a TestCgroup,
    /// Extra flags (capacities, say).
    pub extra_args: Vec<String>,
}

/// A running `kmesh-agent`.
pub struct Agent {
    child: Child,
    admin: SocketAddr,
    metrics: SocketAddr,
    log: PathBuf,
}

impl Agent {
    pub fn start(opts: &AgentOptions<'_>) -> io::Result<Agent> {
        let bin = workspace_bin("kmesh-agent")?;
        let admin = free_local_addr()?;
        let metrics = free_local_addr()?;
        let log = std::env::temp_dir().join(format!(
            "kmt-agent-{}-{}-{}.log",
            opts.node_name,
            names::my_pid(),
            admin.port()
        ));
        let log_file = fs::File::create(&log)?;
        let mut cmd = Command::new(bin);
        match &opts.source {
            AgentSource::File(path) => {
                cmd.arg("--snapshot-file").arg(path);
            }
            AgentSource::Operator {
                url,
                token_file,
                ca_file,
            } => {
                cmd.arg("--operator-url").arg(url);
                if let Some(token) = token_file {
                    cmd.arg("--token-file").arg(token);
                }
                if let Some(ca) = ca_file {
                    cmd.arg("--operator-ca").arg(ca);
                }
            }
        }
        let child = cmd
            .arg("--node-name")
            .arg(opts.node_name)
            .arg("--bpffs-dir")
            .arg(opts.dir.path())
            .arg("--cgroup")
            .arg(opts.cgroup.path())
            .arg("--admin-addr")
            .arg(admin.to_string())
            .arg("--metrics-addr")
            .arg(metrics.to_string())
            .args(&opts.extra_args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()?;
        Ok(Agent {
            child,
            admin,
            metrics,
            log,
        })
    }

    /// The agent's process id (for `/proc/<pid>`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// Where the agent serves its Prometheus metrics (its `--metrics-addr`).
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics
    }

    /// The agent's log so far (for assertion messages).
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `/readyz` answers 200.
    pub fn wait_ready(&mut self, timeout: Duration) -> io::Result<()> {
        self.wait_for(timeout, "ready", |a| Ok(a.http_get("/readyz")?.0 == 200))
    }

    /// Polls `cond` every 50 ms until it holds, the agent exits, or `timeout` passes.
    pub fn wait_for(
        &mut self,
        timeout: Duration,
        what: &str,
        mut cond: impl FnMut(&mut Agent) -> io::Result<bool>,
    ) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Err(io::Error::other(format!(
                    "kmesh-agent exited ({status}) while waiting for {what}; log:\n{}",
                    self.log()
                )));
            }
            if cond(self).unwrap_or(false) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "kmesh-agent: {what} not reached in {timeout:?}; log:\n{}",
                        self.log()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the agent exits on its own (it must within `timeout`), and returns its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> io::Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "kmesh-agent still runs after {timeout:?}; log:\n{}",
                        self.log()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `/debug/snapshot` as JSON.
    pub fn debug_snapshot(&self) -> io::Result<serde_json::Value> {
        let (code, body) = self.http_get("/debug/snapshot")?;
        if code != 200 {
            return Err(io::Error::other(format!(
                "/debug/snapshot answered {code}: {body}"
            )));
        }
        serde_json::from_str(&body).map_err(io::Error::other)
    }

    /// A minimal HTTP/1.1 GET on the admin port: (status code, body).
    pub fn http_get(&self, path: &str) -> io::Result<(u16, String)> {
        http_get(self.admin, path)
    }

    /// The agent's Prometheus metrics (its `--metrics-addr`), as text.
    pub fn metrics(&self) -> io::Result<String> {
        match http_get(self.metrics, "/metrics")? {
            (200, body) => Ok(body),
            (code, body) => Err(io::Error::other(format!(
                "/metrics answered {code}: {body}"
            ))),
        }
    }

    /// The value of one metric series, `series` being its name and labels exactly as rendered
    /// (`kmesh_live_generation`, `kmesh_authz_connections_total{policy="ns/p",...}`).
    pub fn metric(&self, series: &str) -> io::Result<Option<f64>> {
        Ok(self.metrics()?.lines().find_map(|line| {
            let value = line.strip_prefix(series)?.strip_prefix(' ')?;
            value.trim().parse().ok()
        }))
    }

    /// SIGKILL: the agent gets no chance to clean up, like a crash or an OOM kill.
    pub fn kill(&mut self) -> io::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// SIGTERM, then wait for the exit status.
    pub fn terminate(&mut self) -> io::Result<std::process::ExitStatus> {
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_file(&self.log);
    }
}

/// Writes `bytes` to `path` atomically (temp file + rename), as a config-management tool would.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, bytes)?;
    fs::rename(&tmp, path)
}

/// A loopback address with a port that was free a moment ago.
/// `GET path` on `addr`: the status code and the body.
fn http_get(addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| io::Error::other(format!("bad HTTP response: {response:?}")))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

/// A loopback address the agent can bind a moment later (see `crate::ports`).
fn free_local_addr() -> io::Result<SocketAddr> {
    crate::ports::free_loopback_addr()
}
