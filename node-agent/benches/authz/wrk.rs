//! Running `wrk` inside a pod's network namespace (`ip netns exec`) and reading its report:
//! requests per second and the latency percentiles of `--latency`. A run with any socket error or
//! non-2xx answer is refused, so a figure never hides failed requests.
use std::process::Command;

/// What the benchmark keeps of one wrk run.
#[derive(Clone, Copy, Debug)]
pub struct WrkResult {
    pub requests_per_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
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
/// connections of one thread.
pub fn run(
    netns: &str,
    url: &str,
    mode: Connections,
    seconds: u32,
    connections: usize,
) -> WrkResult {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns, "wrk", "--latency", "-t1"])
        .arg(format!("-c{connections}"))
        .arg(format!("-d{seconds}s"));
    if mode == Connections::PerRequest {
        cmd.args(["-H", "Connection: close"]);
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

fn parse(text: &str) -> Result<WrkResult, String> {
    for bad in ["Socket errors", "Non-2xx"] {
        if text.contains(bad) {
            return Err(format!("failed requests ({bad})"));
        }
    }
    let requests_per_s = field(text, "Requests/sec:")
        .and_then(|v| v.parse::<f64>().ok())
        .ok_or("no Requests/sec")?;
    let p50_us = field(text, "50%").and_then(duration_us).ok_or("no p50")?;
    let p99_us = field(text, "99%").and_then(duration_us).ok_or("no p99")?;
    if requests_per_s <= 0.0 {
        return Err("no request completed".to_string());
    }
    Ok(WrkResult {
        requests_per_s,
        p50_us,
        p99_us,
    })
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
