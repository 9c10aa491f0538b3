//! The agents' access logs as a test reads them: an agent writes one JSON line per finished
//! connection on its standard output (`node-agent/src/telemetry/access_log.rs`), between its own
//! log lines, into its pod's container log. [`agent_lines`] returns those lines of one agent pod,
//! parsed, in the order written; [`AccessLogLine`] holds the fields that identify a connection.
//!
//! A line that is a JSON object with `start_time` and `direction` is an access-log line; one of
//! those without a field this module reads is an error (a changed format fails the test, it is
//! not skipped). Every other line (the agent's own log) is not an access-log line.
use std::{io, net::SocketAddr};

use serde_json::Value;

use super::Cluster;

/// The fields of one access-log line a test checks, and the whole line.
#[derive(Clone, Debug, PartialEq)]
pub struct AccessLogLine {
    /// `outbound` or `inbound`.
    pub direction: String,
    pub src_addr: SocketAddr,
    pub src_workload: Option<String>,
    pub src_namespace: Option<String>,
    pub dst_addr: SocketAddr,
    /// The service address the client dialed, when connect4 rewrote it.
    pub dst_service_addr: Option<SocketAddr>,
    pub dst_service: Option<String>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Istio's response flag (`-` for a connection that closed normally).
    pub response_flags: String,
    /// `deny` or `-`.
    pub verdict: String,
    pub line: Value,
}

/// The access-log lines agent pod `kmesh-system/<pod>` wrote so far, oldest first.
pub fn agent_lines(cluster: &Cluster, pod: &str) -> io::Result<Vec<AccessLogLine>> {
    let log = cluster.pod_log(&format!("kmesh-system_{pod}_"));
    lines(&log).map_err(|e| io::Error::other(format!("{pod}'s access log: {e}")))
}

/// The access-log lines of a container log.
pub fn lines(log: &str) -> Result<Vec<AccessLogLine>, String> {
    log.lines()
        .filter_map(|line| {
            let value: Value = serde_json::from_str(line).ok()?;
            let is_access_log =
                value.get("start_time").is_some() && value.get("direction").is_some();
            is_access_log.then(|| AccessLogLine::parse(value))
        })
        .collect()
}

impl AccessLogLine {
    fn parse(line: Value) -> Result<AccessLogLine, String> {
        let text = |key: &str| match &line[key] {
            Value::String(s) => Ok(Some(s.clone())),
            Value::Null => Ok(None),
            other => Err(format!("{key} is not a string or null: {other} in {line}")),
        };
        let required =
            |key: &str| text(key)?.ok_or_else(|| format!("{key} is missing or null in {line}"));
        let address = |key: &str| -> Result<Option<SocketAddr>, String> {
            text(key)?
                .map(|a| a.parse().map_err(|e| format!("{key} {a:?}: {e} in {line}")))
                .transpose()
        };
        let required_address =
            |key: &str| address(key)?.ok_or_else(|| format!("{key} is missing or null in {line}"));
        let count = |key: &str| {
            line[key]
                .as_u64()
                .ok_or_else(|| format!("{key} is not a count in {line}"))
        };
        Ok(AccessLogLine {
            direction: required("direction")?,
            src_addr: required_address("src_addr")?,
            src_workload: text("src_workload")?,
            src_namespace: text("src_namespace")?,
            dst_addr: required_address("dst_addr")?,
            dst_service_addr: address("dst_service_addr")?,
            dst_service: text("dst_service")?,
            bytes_sent: count("bytes_sent")?,
            bytes_received: count("bytes_received")?,
            response_flags: required("response_flags")?,
            verdict: required("verdict")?,
            line: line.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The agent's golden JSON line (`access_log.rs`), between two of its own log lines.
    const LOG: &str = concat!(
        "2026-11-27T01:00:00.000001Z  INFO kmesh_agent: access log switched by the live snapshot\n",
        r#"{"start_time":"2026-11-27T00:59:59.998Z","direction":"outbound","#,
        r#""src_addr":"10.0.0.1:40000","src_workload":"sleep","src_namespace":"shop","#,
        r#""dst_addr":"10.0.1.2:9080","dst_service_addr":"10.96.0.10:9080","#,
        r#""dst_service":"reviews.books.svc.cluster.local","dst_workload":"reviews-v2","#,
        r#""dst_namespace":"books","bytes_sent":120,"bytes_received":4500,"#,
        r#""duration_ms":1.5,"response_flags":"-","verdict":"-","policy":"-"}"#,
        "\n{\"level\":\"info\",\"message\":\"not an access-log line\"}\n",
    );

    #[test]
    fn access_log_lines_are_parsed_and_other_lines_ignored() {
        let parsed = lines(LOG).unwrap();
        assert_eq!(parsed.len(), 1, "{parsed:?}");
        let line = &parsed[0];
        assert_eq!(line.direction, "outbound");
        assert_eq!(line.src_addr, "10.0.0.1:40000".parse().unwrap());
        assert_eq!(line.src_workload.as_deref(), Some("sleep"));
        assert_eq!(line.dst_addr, "10.0.1.2:9080".parse().unwrap());
        assert_eq!(
            line.dst_service_addr,
            Some("10.96.0.10:9080".parse().unwrap())
        );
        assert_eq!(
            line.dst_service.as_deref(),
            Some("reviews.books.svc.cluster.local")
        );
        assert_eq!((line.bytes_sent, line.bytes_received), (120, 4500));
        assert_eq!(
            (line.response_flags.as_str(), line.verdict.as_str()),
            ("-", "-")
        );
    }

    #[test]
    fn an_access_log_line_without_a_field_is_an_error() {
        let unnamed = r#"{"start_time":"t","direction":"inbound","src_addr":"10.0.0.1:1","#;
        let missing = format!("{unnamed}\"bytes_sent\":1}}");
        let e = lines(&missing).unwrap_err();
        assert!(e.contains("dst_addr is missing"), "{e}");
        let bad_address = format!(
            "{unnamed}\"dst_addr\":\"nowhere\",\"bytes_sent\":1,\"bytes_received\":2,\
             \"response_flags\":\"-\",\"verdict\":\"-\"}}"
        );
        let e = lines(&bad_address).unwrap_err();
        assert!(e.contains("dst_addr \"nowhere\""), "{e}");
    }
}
