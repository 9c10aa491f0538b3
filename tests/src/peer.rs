//! `kmesh-peer` (both ends of TCP connections with exact byte counts) from a test: started inside
//! a pod's network namespace and a test cgroup, so that the programs attached there see the
//! sockets of both its client and its server.
use std::{
    io,
    net::SocketAddr,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::{Pod, TestCgroup, probe::workspace_bin, temp::TempPath};

/// One connection as one end saw it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerConnection {
    /// This end's address (empty when the connect failed).
    pub local: String,
    pub peer: String,
    pub sent: u64,
    pub received: u64,
    /// `ECONNREFUSED`, `ECONNRESET`, ... when the connection failed or was reset.
    pub error: Option<String>,
}

impl PeerConnection {
    pub fn local_addr(&self) -> SocketAddr {
        self.local
            .parse()
            .unwrap_or_else(|e| panic!("local address {:?}: {e}", self.local))
    }
}

/// What `kmesh-peer` prints: every connection, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerReport {
    pub connections: Vec<PeerConnection>,
}

/// A running `kmesh-peer`; killed when dropped unwaited.
pub struct PeerHandle {
    child: Option<Child>,
    desc: String,
}

/// How the client ends each connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Close {
    /// Shut down writing, read the reply to its end, close.
    Fin,
    /// Wait until everything sent is acknowledged, then close with SO_LINGER 0 (a RST).
    Rst,
}

impl PeerHandle {
    /// A server on `port` of `pod` that answers `reply_bytes` to each of `count` connections,
    /// returned once it listens.
    pub fn serve(
        pod: &Pod,
        cgroup: &TestCgroup,
        port: u16,
        reply_bytes: u64,
        count: u64,
    ) -> io::Result<PeerHandle> {
        // Unique per server: the tests of one binary run in parallel threads of one process, and
        // a path unique only to the process let one server's ready file stand for another's.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ready = TempPath::new(&format!("peer-ready-{n}"));
        let handle = spawn(
            pod,
            cgroup,
            &[
                "serve",
                "--port",
                &port.to_string(),
                "--reply-bytes",
                &reply_bytes.to_string(),
                "--count",
                &count.to_string(),
                "--ready-file",
                &ready.path().display().to_string(),
            ],
        )?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while !ready.path().exists() {
            if Instant::now() > deadline {
                return Err(io::Error::other(format!("{} never listened", handle.desc)));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(handle)
    }

    /// `count` connections from `pod` to `target`, each sending `send_bytes`, run to the end.
    pub fn connect(
        pod: &Pod,
        cgroup: &TestCgroup,
        target: SocketAddr,
        send_bytes: u64,
        count: u64,
        close: Close,
    ) -> io::Result<PeerReport> {
        let close = match close {
            Close::Fin => "fin",
            Close::Rst => "rst",
        };
        spawn(
            pod,
            cgroup,
            &[
                "connect",
                "--target",
                &target.to_string(),
                "--send-bytes",
                &send_bytes.to_string(),
                "--count",
                &count.to_string(),
                "--close",
                close,
            ],
        )?
        .wait(Duration::from_secs(60))
    }

    /// Waits for the peer to finish (killing it after `timeout`) and parses its report.
    pub fn wait(mut self, timeout: Duration) -> io::Result<PeerReport> {
        let mut child = self.child.take().expect("present until waited");
        let deadline = Instant::now() + timeout;
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(io::Error::other(format!(
                    "{} still running after {timeout:?}",
                    self.desc
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let out = child.wait_with_output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "{} failed ({}): {}",
                self.desc,
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        serde_json::from_str(stdout.trim()).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: no report ({e}): {stdout}", self.desc),
            )
        })
    }
}

impl Drop for PeerHandle {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn(pod: &Pod, cgroup: &TestCgroup, args: &[&str]) -> io::Result<PeerHandle> {
    let bin = workspace_bin("kmesh-peer")?;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", pod.netns_name()])
        .arg(&bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    crate::cluster::process::join_cgroup_before_exec(&mut cmd, cgroup.path())?;
    let desc = format!("kmesh-peer {} in {}", args.join(" "), pod.name());
    let child = cmd
        .spawn()
        .map_err(|e| io::Error::new(e.kind(), format!("spawn {desc}: {e}")))?;
    Ok(PeerHandle {
        child: Some(child),
        desc,
    })
}
