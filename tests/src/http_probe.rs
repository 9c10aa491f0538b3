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
            p50: at(0.50),
            p99: at(0.99),
            max: at(1.0),
        }
    }
}
