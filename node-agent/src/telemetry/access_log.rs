//! The access log: one line per finished connection on the agent's standard output, JSON lines
//! (the default) or a readable `key=value` text (`--access-log-format text`). Switched on and off
//! cluster-wide by `KmeshConfig.spec.accessLog` through the live snapshot's node config
//! ([`AccessLog`]), with no restart.
//!
//! The fields and their order are one definition ([`AccessLogEntry::fields`]), written by both
//! formats:
//!
//! | field | value |
//! |---|---|
//! | `start_time` | when the connection started, RFC 3339 UTC with milliseconds (its close minus its duration) |
//! | `direction` | `outbound` (this node's workload dialed) or `inbound` (it accepted) |
//! | `src_addr` | client address and port |
//! | `src_workload`, `src_namespace` | the client's workload (its owner, as Istio's `workload`) and namespace |
//! | `dst_addr` | server address and port (the endpoint actually connected to) |
//! | `dst_service_addr` | the service address the client dialed, when connect4 rewrote it |
//! | `dst_service` | that service's host (`name.ns.svc.cluster.local`) |
//! | `dst_workload`, `dst_namespace` | the server's workload and namespace |
//! | `bytes_sent`, `bytes_received` | bytes this node's workload sent and received (not Istio's flipped metric sense) |
//! | `duration_ms` | connect (or accept) to close, in milliseconds with microsecond precision |
//! | `response_flags` | Istio's flag: `-`, `UR`, `UF`, `UH`, `DENY` |
//! | `verdict` | `deny` when the destination's authorization refused it, else `-` |
//! | `policy` | for a denial, the deciding policy `namespace/name`; `none` when no ALLOW policy matched; else `-` |
//!
//! A value the snapshot does not name is `null` in JSON and `-` in text. Text values with spaces,
//! quotes, `=` or control characters are written as JSON strings, so a line always parses.
use std::{
    fmt::Write as _,
    net::SocketAddr,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use super::labels::{ResponseFlags, destination_service};
use crate::connection::{Connection, Direction, NameLookup, Outcome};

/// Whether access-log lines are written: the live snapshot's `NodeConfig.access_log`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AccessLog {
    #[default]
    Off,
    On,
}

/// How a line is written (`--access-log-format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum AccessLogFormat {
    /// One JSON object per line.
    #[default]
    Json,
    /// `key=value` pairs, space separated.
    Text,
}

/// A field's value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum FieldValue<'a> {
    Text(Option<&'a str>),
    Address(Option<SocketAddr>),
    Count(u64),
    Millis(Duration),
}

/// One access-log line before it is written.
#[derive(Clone, Debug, PartialEq)]
pub struct AccessLogEntry<'a> {
    pub start_time: String,
    pub direction: Direction,
    pub src_addr: SocketAddr,
    pub src_workload: Option<&'a str>,
    pub src_namespace: Option<&'a str>,
    pub dst_addr: SocketAddr,
    pub dst_service_addr: Option<SocketAddr>,
    pub dst_service: Option<&'a str>,
    pub dst_workload: Option<&'a str>,
    pub dst_namespace: Option<&'a str>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub duration: Duration,
    pub response_flags: ResponseFlags,
    /// For a denial: the deciding policy's name, `none`, or `unknown`.
    pub denied_by: Option<&'a str>,
}

/// The number of fields of a line.
pub const FIELDS: usize = 16;

impl<'a> AccessLogEntry<'a> {
    /// The entry of `connection`, which ended at `closed_at`.
    pub fn new(
        connection: &Connection,
        names: &'a dyn NameLookup,
        closed_at: SystemTime,
    ) -> AccessLogEntry<'a> {
        let source = names.workload(connection.source.ip()).unwrap_or_default();
        let destination = names
            .workload(connection.destination.ip())
            .unwrap_or_default();
        let service = destination_service(connection, names);
        let start = closed_at
            .checked_sub(connection.duration)
            .unwrap_or(UNIX_EPOCH);
        AccessLogEntry {
            start_time: rfc3339_millis(start),
            direction: connection.direction,
            src_addr: connection.source,
            src_workload: non_empty(source.workload),
            src_namespace: non_empty(source.namespace),
            dst_addr: connection.destination,
            dst_service_addr: connection.service,
            dst_service: service.and_then(|s| non_empty(s.host)),
            dst_workload: non_empty(destination.workload),
            dst_namespace: non_empty(destination.namespace),
            bytes_sent: connection.bytes_sent,
            bytes_received: connection.bytes_received,
            duration: connection.duration,
            response_flags: ResponseFlags::of(connection.outcome),
            denied_by: match connection.outcome {
                Outcome::Denied { policy: 0 } => Some("none"),
                Outcome::Denied { policy } => Some(names.policy(policy).unwrap_or("unknown")),
                _ => None,
            },
        }
    }

    /// The fields, in their fixed order (the one definition both formats write).
    pub fn fields(&self) -> [(&'static str, FieldValue<'_>); FIELDS] {
        use FieldValue::{Address, Count, Millis, Text};
        let denied = self.denied_by.is_some();
        [
            ("start_time", Text(Some(&self.start_time))),
            ("direction", Text(Some(direction(self.direction)))),
            ("src_addr", Address(Some(self.src_addr))),
            ("src_workload", Text(self.src_workload)),
            ("src_namespace", Text(self.src_namespace)),
            ("dst_addr", Address(Some(self.dst_addr))),
            ("dst_service_addr", Address(self.dst_service_addr)),
            ("dst_service", Text(self.dst_service)),
            ("dst_workload", Text(self.dst_workload)),
            ("dst_namespace", Text(self.dst_namespace)),
            ("bytes_sent", Count(self.bytes_sent)),
            ("bytes_received", Count(self.bytes_received)),
            ("duration_ms", Millis(self.duration)),
            ("response_flags", Text(Some(self.response_flags.as_str()))),
            ("verdict", Text(Some(if denied { "deny" } else { "-" }))),
            ("policy", Text(Some(self.denied_by.unwrap_or("-")))),
        ]
    }

    /// The line in `format`, without its newline.
    pub fn line(&self, format: AccessLogFormat) -> String {
        match format {
            AccessLogFormat::Json => self.json(),
            AccessLogFormat::Text => self.text(),
        }
    }

    fn json(&self) -> String {
        let mut line = String::with_capacity(512);
        line.push('{');
        for (i, (key, value)) in self.fields().into_iter().enumerate() {
            if i > 0 {
                line.push(',');
            }
            let _ = write!(line, "\"{key}\":");
            match value {
                FieldValue::Text(Some(text)) => line.push_str(&json_string(text)),
                FieldValue::Address(Some(address)) => {
                    line.push_str(&json_string(&address.to_string()))
                }
                FieldValue::Text(None) | FieldValue::Address(None) => line.push_str("null"),
                FieldValue::Count(count) => {
                    let _ = write!(line, "{count}");
                }
                FieldValue::Millis(duration) => line.push_str(&millis(duration)),
            }
        }
        line.push('}');
        line
    }

    fn text(&self) -> String {
        let mut line = String::with_capacity(384);
        for (i, (key, value)) in self.fields().into_iter().enumerate() {
            if i > 0 {
                line.push(' ');
            }
            let _ = write!(line, "{key}=");
            match value {
                FieldValue::Text(Some(text)) => line.push_str(&text_value(text)),
                FieldValue::Address(Some(address)) => {
                    let _ = write!(line, "{address}");
                }
                FieldValue::Text(None) | FieldValue::Address(None) => line.push('-'),
                FieldValue::Count(count) => {
                    let _ = write!(line, "{count}");
                }
                FieldValue::Millis(duration) => line.push_str(&millis(duration)),
            }
        }
        line
    }
}

fn direction(direction: Direction) -> &'static str {
    match direction {
        Direction::Outbound => "outbound",
        Direction::Inbound => "inbound",
    }
}

fn non_empty(name: &str) -> Option<&str> {
    (!name.is_empty()).then_some(name)
}

fn json_string(text: &str) -> String {
    // Serialising a str cannot fail.
    serde_json::to_string(text).unwrap_or_default()
}

/// A text value as is when it is plain (no space, quote, `=` or control character), else quoted
/// as a JSON string: a name can never break a line into other fields.
fn text_value(text: &str) -> String {
    let plain = !text.is_empty()
        && text
            .chars()
            .all(|c| !c.is_whitespace() && !c.is_control() && c != '"' && c != '=');
    if plain {
        text.to_string()
    } else {
        json_string(text)
    }
}

/// Milliseconds with microsecond precision: `1.234`, `0.05`, `12`.
fn millis(duration: Duration) -> String {
    let micros = duration.as_micros();
    let (whole, fraction) = (micros / 1000, micros % 1000);
    if fraction == 0 {
        return whole.to_string();
    }
    let fraction = format!("{fraction:03}");
    format!("{whole}.{}", fraction.trim_end_matches('0'))
}

/// `2026-11-27T00:58:01.123Z`.
pub fn rfc3339_millis(time: SystemTime) -> String {
    let since_epoch = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since_epoch.as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60,
        since_epoch.subsec_millis()
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::fake_names::{
        FakeNames, addr, bookshop, inbound_to_reviews, outbound_to_reviews,
    };

    /// 2026-11-27T01:00:00Z.
    fn closed_at() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_795_741_200)
    }

    /// The JSON line, field by field and in order (golden).
    #[test]
    fn json_line_of_an_outbound_connection() {
        let names = bookshop();
        let line = AccessLogEntry::new(&outbound_to_reviews(), &names, closed_at())
            .line(AccessLogFormat::Json);
        assert_eq!(
            line,
            concat!(
                r#"{"start_time":"2026-11-27T00:59:59.998Z","direction":"outbound","#,
                r#""src_addr":"10.0.0.1:40000","src_workload":"sleep","src_namespace":"shop","#,
                r#""dst_addr":"10.0.1.2:9080","dst_service_addr":"10.96.0.10:9080","#,
                r#""dst_service":"reviews.books.svc.cluster.local","dst_workload":"reviews-v2","#,
                r#""dst_namespace":"books","bytes_sent":120,"bytes_received":4500,"#,
                r#""duration_ms":1.5,"response_flags":"-","verdict":"-","policy":"-"}"#
            )
        );
        let parsed: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(parsed.as_object().unwrap().len(), FIELDS);
    }

    /// The text line of a denied inbound connection (golden): the deciding policy is named, and
    /// the service the destination is an endpoint of (the dialed address is the client's node's).
    #[test]
    fn text_line_of_a_denied_inbound_connection() {
        let names = bookshop();
        let denied = Connection {
            bytes_sent: 0,
            bytes_received: 0,
            duration: Duration::from_micros(42),
            outcome: Outcome::Denied { policy: 7 },
            ..inbound_to_reviews()
        };
        let line = AccessLogEntry::new(&denied, &names, closed_at()).line(AccessLogFormat::Text);
        assert_eq!(
            line,
            "start_time=2026-11-27T00:59:59.999Z direction=inbound src_addr=10.0.0.1:40000 \
             src_workload=sleep src_namespace=shop dst_addr=10.0.1.2:9080 dst_service_addr=- \
             dst_service=reviews.books.svc.cluster.local dst_workload=reviews-v2 dst_namespace=books bytes_sent=0 \
             bytes_received=0 duration_ms=0.042 response_flags=DENY verdict=deny \
             policy=books/deny-sleep"
        );
    }

    /// Both formats write the same fields in the same order.
    #[test]
    fn both_formats_write_the_same_fields_in_order() {
        let names = bookshop();
        let entry = AccessLogEntry::new(&outbound_to_reviews(), &names, closed_at());
        let keys: Vec<&str> = entry.fields().iter().map(|(k, _)| *k).collect();
        let text_keys: Vec<String> = entry
            .line(AccessLogFormat::Text)
            .split(' ')
            .map(|pair| pair.split('=').next().unwrap().to_string())
            .collect();
        assert_eq!(text_keys, keys);
        let json = entry.line(AccessLogFormat::Json);
        let mut at = 0;
        for key in &keys {
            let found = json[at..]
                .find(&format!("\"{key}\":"))
                .unwrap_or_else(|| panic!("{key} out of order in {json}"));
            at += found;
        }
    }

    /// Unknown peers: `null` in JSON, `-` in text; a denial by no policy says `none`, by a policy
    /// the snapshot does not name `unknown`.
    #[test]
    fn unknown_names_and_policies() {
        let names = FakeNames::default();
        let mut connection = Connection {
            outcome: Outcome::Denied { policy: 0 },
            ..inbound_to_reviews()
        };
        let entry = AccessLogEntry::new(&connection, &names, closed_at());
        let json: serde_json::Value =
            serde_json::from_str(&entry.line(AccessLogFormat::Json)).unwrap();
        assert_eq!(json["src_workload"], serde_json::Value::Null);
        assert_eq!(json["dst_service"], serde_json::Value::Null);
        assert_eq!(json["policy"], "none");
        assert!(
            entry
                .line(AccessLogFormat::Text)
                .contains(" src_workload=- src_namespace=- ")
        );
        connection.outcome = Outcome::Denied { policy: 99 };
        let entry = AccessLogEntry::new(&connection, &names, closed_at());
        assert!(
            entry
                .line(AccessLogFormat::Text)
                .ends_with("verdict=deny policy=unknown")
        );
    }

    /// A name with a space, a quote or an `=` cannot forge fields in the text form.
    #[test]
    fn text_values_that_could_break_a_line_are_quoted() {
        let mut names = bookshop();
        names
            .workloads
            .get_mut(&addr("10.0.0.1:0").ip())
            .unwrap()
            .workload = "a b=\"c\"\nverdict=allow".into();
        let line = AccessLogEntry::new(&outbound_to_reviews(), &names, closed_at())
            .line(AccessLogFormat::Text);
        assert!(
            line.contains(r#" src_workload="a b=\"c\"\nverdict=allow" src_namespace=shop "#),
            "{line}"
        );
        assert_eq!(line.lines().count(), 1);
    }

    #[test]
    fn timestamps_and_durations() {
        let at = |secs: u64, millis: u64| {
            rfc3339_millis(UNIX_EPOCH + Duration::from_millis(secs * 1000 + millis))
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(at(1_709_251_199, 999), "2024-02-29T23:59:59.999Z");
        assert_eq!(at(1_795_741_200, 0), "2026-11-27T01:00:00.000Z");
        assert_eq!(at(4_102_444_800, 0), "2100-01-01T00:00:00.000Z");
        assert_eq!(millis(Duration::from_micros(1500)), "1.5");
        assert_eq!(millis(Duration::from_micros(42)), "0.042");
        assert_eq!(millis(Duration::from_secs(12)), "12000");
        assert_eq!(millis(Duration::from_nanos(999)), "0");
    }
}
