//! Running `wrk` inside a pod's network namespace (`ip netns exec`) and reading its report:
//! requests per second, the latency percentiles of `--latency`, and every failure wrk counts
//! (socket errors: connect, read, write, timeout; non-2xx/3xx answers). A run with failures is
//! returned as such, with its figures, so that the benchmark prints it and keeps it out of the
//! medians: a figure never hides failed requests.
use std::{fmt, path::Path, process::Command};

use kmesh_tests::Pod;

/// What the benchmark keeps of one wrk run.
#[derive(Clone, Copy, Debug)]
pub struct WrkResult {
    pub requests_per_s: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
}

/// The failures wrk counted in one run (all zero: none).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WrkErrors {
    pub connect: u64,
    pub read: u64,
    pub write: u64,
    pub timeout: u64,
    /// Answers that were not 2xx or 3xx.
    pub bad_status: u64,
}

impl WrkErrors {
    pub fn any(&self) -> bool {
        *self != WrkErrors::default()
    }
}

impl fmt::Display for WrkErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "connect {}, read {}, write {}, timeout {}, non-2xx/3xx {}",
            self.connect, self.read, self.write, self.timeout, self.bad_status
        )
    }
}

/// One wrk run: its figures and its failures.
#[derive(Clone, Copy, Debug)]
pub struct WrkRun {
    pub result: WrkResult,
    pub errors: WrkErrors,
}

/// Whether every request opens its own connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Connections {
    /// `Connection: close` on every request: one connection (one sk_lookup) per request.
    PerRequest,
    /// HTTP keep-alive: the connections are opened once.
    KeepAlive,
}

/// Panics with a clear message when wrk is not installed (never skips).
pub fn require_wrk() {
    let found = Command::new("wrk").arg("--version").output();
    if found.is_err() {
        panic!(
            "the authorization benchmark needs `wrk` (Debian package `wrk`, installed by \
             scripts/setup.sh): it is not on PATH"
        );
    }
}

/// `wrk` against `url` from the namespace `netns`, for `seconds` seconds over `connections`
/// connections of one thread. Panics if wrk does not run or its report cannot be read.
pub fn run(netns: &str, url: &str, mode: Connections, seconds: u32, connections: usize) -> WrkRun {
    run_in(netns, None, url, mode, seconds, connections)
}

/// [`run`], in the cgroup directory `cgroup` when given (where cgroup programs see wrk's
/// connections).
pub fn run_in(
    netns: &str,
    cgroup: Option<&Path>,
    url: &str,
    mode: Connections,
    seconds: u32,
    connections: usize,
) -> WrkRun {
    run_with_headers(netns, cgroup, url, mode, seconds, connections, &[])
}

/// [`run_in`], every request carrying `headers` (`name: value`).
pub fn run_with_headers(
    netns: &str,
    cgroup: Option<&Path>,
    url: &str,
    mode: Connections,
    seconds: u32,
    connections: usize,
    headers: &[&str],
) -> WrkRun {
    let mut cmd = Command::new("ip");
    if let Some(cgroup) = cgroup {
        kmesh_tests::cluster::process::join_cgroup_before_exec(&mut cmd, cgroup)
            .expect("wrk joins its cgroup");
    }
    cmd.args(["netns", "exec", netns, "wrk", "--latency", "-t1"])
        .arg(format!("-c{connections}"))
        .arg(format!("-d{seconds}s"));
    if mode == Connections::PerRequest {
        cmd.args(["-H", "Connection: close"]);
    }
    for header in headers {
        cmd.args(["-H", header]);
    }
    let out = cmd.arg(url).output().expect("run wrk in the client netns");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "wrk failed ({}): {text}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    parse(&text).unwrap_or_else(|e| panic!("wrk report: {e}:\n{text}"))
}

fn parse(text: &str) -> Result<WrkRun, String> {
    let requests_per_s = field(text, "Requests/sec:")
        .and_then(|v| v.parse::<f64>().ok())
        .ok_or("no Requests/sec")?;
    let p50_us = field(text, "50%").and_then(duration_us).ok_or("no p50")?;
    let p90_us = field(text, "90%").and_then(duration_us).ok_or("no p90")?;
    let p99_us = field(text, "99%").and_then(duration_us).ok_or("no p99")?;
    let mut errors = socket_errors(text)?;
    if let Some(n) = field(text, "Non-2xx or 3xx responses:") {
        errors.bad_status = n.parse().map_err(|_| "bad Non-2xx count")?;
    }
    if requests_per_s <= 0.0 && !errors.any() {
        return Err("no request completed and no error counted".to_string());
    }
    Ok(WrkRun {
        result: WrkResult {
            requests_per_s,
            p50_us,
            p90_us,
            p99_us,
        },
        errors,
    })
}

/// `Socket errors: connect 0, read 0, write 0, timeout 0` (wrk prints it only when one is not 0).
fn socket_errors(text: &str) -> Result<WrkErrors, String> {
    let Some(line) = text
        .lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix("Socket errors:"))
    else {
        return Ok(WrkErrors::default());
    };
    let mut errors = WrkErrors::default();
    for part in line.split(',') {
        let mut words = part.split_whitespace();
        let (Some(kind), Some(n)) = (words.next(), words.next()) else {
            return Err(format!("unreadable socket errors: {line}"));
        };
        let n: u64 = n
            .parse()
            .map_err(|_| format!("unreadable socket errors: {line}"))?;
        match kind {
            "connect" => errors.connect = n,
            "read" => errors.read = n,
            "write" => errors.write = n,
            "timeout" => errors.timeout = n,
            _ => return Err(format!("unknown socket error kind {kind:?}: {line}")),
        }
    }
    Ok(errors)
}

/// The first word after `label` on the line that starts (trimmed) with it.
fn field<'a>(text: &'a str, label: &str) -> Option<&'a str> {
    text.lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix(label))
        .and_then(|rest| rest.split_whitespace().next())
}

/// wrk's durations: `123.45us`, `1.23ms`, `1.00s`, `2.00m`.
fn duration_us(v: &str) -> Option<f64> {
    let split = v.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = v.split_at(split);
    let number: f64 = number.parse().ok()?;
    let scale = match unit {
        "us" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        "m" => 60e6,
        _ => return None,
    };
    Some(number * scale)
}

/// Lets the client's connect() take over a port whose TIME_WAIT (to the same server) is older
/// than a second (`net.ipv4.tcp_tw_reuse = 1` in the client's namespace; the default, 2, allows
/// it on loopback only). Why: a wrk client often closes at the same time as the server, so both
/// ends keep a TIME_WAIT for 60 s; once a client holds TIME_WAITs to its server on more than
/// half of its 28,232 ephemeral ports, every connect() scans all the even ports in vain before
/// an odd one (measured: +2 ms per connect() on this machine), and with all of them taken
/// connect() fails with EADDRNOTAVAIL. Requests/s then collapse for whichever variants' client
/// crossed that line, whatever sk_lookup does. With reuse, the first port tried is free.
pub fn reuse_time_wait_ports(client: &Pod) {
    const SYSCTL: &str = "/proc/sys/net/ipv4/tcp_tw_reuse";
    let set = client.run_in(|| {
        std::fs::write(SYSCTL, "1")?;
        std::fs::read_to_string(SYSCTL)
    });
    match set {
        Ok(v) if v.trim() == "1" => {}
        other => panic!("{SYSCTL} = 1 in pod {}: {other:?}", client.name()),
    }
}
