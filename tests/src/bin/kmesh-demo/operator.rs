//! The real `kmesh-operator` of the local demo: `--source dir:` over the demo's YAML directory,
//! serving snapshots over TLS (a throwaway CA) to agents holding a static token of their node. The
//! process is killed and its log removed when dropped.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use kmesh_tests::{TempPath, TestTls, workspace_bin};

use crate::{interrupt, story::context};

pub struct Operator {
    child: Child,
    log: TempPath,
    /// The snapshot server, `https://127.0.0.1:PORT`.
    pub url: String,
    metrics: SocketAddr,
}

impl Operator {
    /// Starts the operator and waits until it is ready (its first compile is published).
    pub fn start(dir: &Path, tls: &TestTls, tokens: &Path) -> Result<Operator, String> {
        let bin = workspace_bin("kmesh-operator").map_err(context("kmesh-operator"))?;
        let listen = free_local_addr()?;
        let metrics = free_local_addr()?;
        let log = TempPath::new("demo-operator-log");
        let log_file = std::fs::File::create(log.path()).map_err(context("operator log"))?;
        let stderr = log_file.try_clone().map_err(context("operator log"))?;
        let child = Command::new(bin)
            .arg(format!("--source=dir:{}", dir.display()))
            .arg(format!("--listen={listen}"))
            .arg(format!("--metrics-addr={metrics}"))
            .arg("--tls-cert")
            .arg(&tls.cert_file)
            .arg("--tls-key")
            .arg(&tls.key_file)
            .arg(format!("--auth=static:{}", tokens.display()))
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(stderr)
            .spawn()
            .map_err(context("starting kmesh-operator"))?;
        let mut operator = Operator {
            child,
            log,
            url: format!("https://{listen}"),
            metrics,
        };
        operator.wait_ready(Duration::from_secs(20))?;
        Ok(operator)
    }

    /// The last `lines` lines of the operator's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(self.log.path()).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let started = Instant::now();
        loop {
            interrupt::check()?;
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "kmesh-operator exited ({status}); its log:\n{}",
                    self.log_tail(40)
                ));
            }
            if self.readyz() == Some(200) {
                return Ok(());
            }
            if started.elapsed() > timeout {
                return Err(format!(
                    "kmesh-operator not ready after {timeout:?}; its log:\n{}",
                    self.log_tail(40)
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The status of `GET /readyz` on the metrics address, if it answers.
    fn readyz(&self) -> Option<u16> {
        let mut stream = TcpStream::connect_timeout(&self.metrics, Duration::from_secs(1)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let request = "GET /readyz HTTP/1.1\r\nHost: operator\r\nConnection: close\r\n\r\n";
        stream.write_all(request.as_bytes()).ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        response.split_whitespace().nth(1)?.parse().ok()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback address whose port was free a moment ago.
fn free_local_addr() -> Result<SocketAddr, String> {
    kmesh_tests::ports::free_loopback_addr().map_err(context("finding a free port"))
}
