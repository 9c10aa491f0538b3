//! Telemetry end to end in user space: connections recorded through a fake [`NameLookup`], the
//! metrics read back from the agent's real scrape text (`metrics::render`), the access log from a
//! buffer.
use std::{
    io::Write,
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use kmesh_snapshot::Limits;

use super::{
    AccessLog, AccessLogFormat, Telemetry, TelemetrySettings,
    fake_names::{FakeNames, addr, bookshop, inbound_to_reviews, outbound_to_reviews},
};
use crate::{
    agent::Status,
    connection::{Connection, Direction, NameLookup, Outcome},
    metrics::{KernelCounts, render},
};

/// Where a test's access log goes.
#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Write for Buffer {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Buffer {
    fn lines(&self) -> Vec<String> {
        String::from_utf8(self.0.lock().unwrap().clone())
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

/// 2026-11-27T01:00:00Z.
fn fixed_clock() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_795_741_200)
}

fn telemetry(settings: TelemetrySettings) -> (Telemetry, Buffer) {
    let buffer = Buffer::default();
    let telemetry = Telemetry::with_output(settings, Box::new(buffer.clone()), fixed_clock);
    (telemetry, buffer)
}

/// The agent's whole scrape text with `telemetry` in its status.
fn scrape(telemetry: &Telemetry) -> String {
    let status = Status {
        telemetry: telemetry.clone(),
        ..Status::default()
    };
    render(&status, &Limits::default(), &KernelCounts::default())
}

fn series<'a>(text: &'a str, metric: &str) -> Vec<&'a str> {
    let prefix = format!("{metric}{{");
    text.lines().filter(|l| l.starts_with(&prefix)).collect()
}

const SLEEP: &str = "source_workload=\"sleep\",source_canonical_service=\"sleep\",\
source_canonical_revision=\"latest\",source_workload_namespace=\"shop\",\
source_principal=\"spiffe://cluster.local/ns/shop/sa/sleeper\",source_app=\"sleep\",\
source_version=\"latest\",source_cluster=\"unknown\"";
const REVIEWS_V2: &str = "destination_workload=\"reviews-v2\",\
destination_canonical_service=\"reviews\",destination_canonical_revision=\"v2\",\
destination_workload_namespace=\"books\",\
destination_principal=\"spiffe://cluster.local/ns/books/sa/bookinfo-reviews\",\
destination_app=\"reviews\",destination_version=\"v2\",destination_cluster=\"unknown\"";
const REVIEWS_SERVICE: &str = "destination_service=\"reviews.books.svc.cluster.local\",\
destination_service_namespace=\"books\",destination_service_name=\"reviews\"";
const UNKNOWN_SERVICE: &str = "destination_service=\"unknown\",\
destination_service_namespace=\"unknown\",destination_service_name=\"unknown\"";

#[test]
fn an_outbound_connection_is_counted_with_istios_labels() {
    let (telemetry, _) = telemetry(TelemetrySettings::default());
    telemetry.record(&outbound_to_reviews(), &bookshop());
    telemetry.record(&outbound_to_reviews(), &bookshop());
    let text = scrape(&telemetry);
    let labels = format!(
        "reporter=\"source\",{SLEEP},{REVIEWS_SERVICE},{REVIEWS_V2},request_protocol=\"tcp\",\
         response_flags=\"-\",connection_security_policy=\"unknown\""
    );
    for (metric, value) in [
        ("istio_tcp_connections_opened_total", 2),
        ("istio_tcp_connections_closed_total", 2),
        // The client sent 120 bytes twice: Istio's received_bytes (the request).
        ("istio_tcp_received_bytes_total", 240),
        ("istio_tcp_sent_bytes_total", 9000),
    ] {
        assert_eq!(
            series(&text, metric),
            [format!("{metric}{{{labels}}} {value}")],
            "{text}"
        );
    }
    assert!(text.contains("kmesh_telemetry_series 1\n"), "{text}");
    assert!(
        text.contains("kmesh_telemetry_series_dropped_total 0\n"),
        "{text}"
    );
    // One scrape, one end: the Istio metrics come before the EOF the agent's text ends with.
    assert!(text.ends_with("# EOF\n") && text.matches("# EOF").count() == 1);
}

/// Both ends report the same connection: each under its reporter, with the same byte counts in
/// Istio's sense (received = client to server), though each workload's own sent/received differ.
#[test]
fn both_reporters_count_bytes_in_istios_sense() {
    let (telemetry, _) = telemetry(TelemetrySettings::default());
    telemetry.record(&outbound_to_reviews(), &bookshop());
    telemetry.record(&inbound_to_reviews(), &bookshop());
    let text = scrape(&telemetry);
    let received = series(&text, "istio_tcp_received_bytes_total");
    let sent = series(&text, "istio_tcp_sent_bytes_total");
    assert_eq!(received.len(), 2, "{text}");
    for line in &received {
        assert!(line.ends_with("} 120"), "{line}");
    }
    for line in &sent {
        assert!(line.ends_with("} 4500"), "{line}");
    }
    // The server's node never sees the dialed service: it names the service the destination is
    // an endpoint of.
    let inbound = format!(
        "istio_tcp_sent_bytes_total{{reporter=\"destination\",{SLEEP},{REVIEWS_SERVICE},{REVIEWS_V2},"
    );
    assert!(sent.iter().any(|l| l.starts_with(&inbound)), "{text}");
}

/// An inbound connection to a port of the workload that no service routes to has an unknown
/// destination service (the workload is still named).
#[test]
fn an_inbound_connection_to_no_services_endpoint_names_no_service() {
    let (telemetry, _) = telemetry(TelemetrySettings::default());
    let direct = Connection {
        destination: addr("10.0.1.2:15000"),
        ..inbound_to_reviews()
    };
    telemetry.record(&direct, &bookshop());
    let text = scrape(&telemetry);
    let inbound = format!(
        "istio_tcp_connections_opened_total{{reporter=\"destination\",{SLEEP},{UNKNOWN_SERVICE},{REVIEWS_V2},"
    );
    assert!(
        series(&text, "istio_tcp_connections_opened_total")
            .iter()
            .any(|l| l.starts_with(&inbound)),
        "{text}"
    );
}

#[test]
fn each_outcome_has_its_response_flag() {
    let (telemetry, _) = telemetry(TelemetrySettings::default());
    let outcomes = [
        (Outcome::Closed, "-"),
        (Outcome::Reset, "UR"),
        (Outcome::ConnectFailed, "UF"),
        (Outcome::NoEndpoint, "UH"),
        (Outcome::Denied { policy: 7 }, "DENY"),
    ];
    for (i, (outcome, _)) in outcomes.iter().enumerate() {
        // A distinct count per outcome, so that a flag given to the wrong outcome shows.
        for _ in 0..=i {
            telemetry.record(
                &Connection {
                    outcome: *outcome,
                    ..outbound_to_reviews()
                },
                &bookshop(),
            );
        }
    }
    let text = scrape(&telemetry);
    let opened = series(&text, "istio_tcp_connections_opened_total");
    assert_eq!(opened.len(), outcomes.len(), "{text}");
    for (i, (_, flag)) in outcomes.iter().enumerate() {
        let with_flag = format!("response_flags=\"{flag}\",");
        let line = opened
            .iter()
            .find(|l| l.contains(&with_flag))
            .unwrap_or_else(|| panic!("no series with {with_flag}: {text}"));
        assert!(line.ends_with(&format!("}} {}", i + 1)), "{line}");
    }
}

/// A connection refused for want of an endpoint was never rewritten: the address it dialed (the
/// service's) still names the destination service.
#[test]
fn a_connection_without_endpoint_names_the_service_it_dialed() {
    let (telemetry, _) = telemetry(TelemetrySettings::default());
    let refused = Connection {
        destination: addr("10.96.0.10:9080"),
        service: None,
        bytes_sent: 0,
        bytes_received: 0,
        outcome: Outcome::NoEndpoint,
        ..outbound_to_reviews()
    };
    telemetry.record(&refused, &bookshop());
    let text = scrape(&telemetry);
    let opened = series(&text, "istio_tcp_connections_opened_total");
    assert_eq!(opened.len(), 1, "{text}");
    assert!(opened[0].contains(REVIEWS_SERVICE), "{text}");
    assert!(
        opened[0].contains("destination_workload=\"unknown\""),
        "{text}"
    );
    assert!(opened[0].contains("response_flags=\"UH\""), "{text}");
}

/// The cardinality bound: 10,000 connections between 10,000 distinct addresses and ports the
/// snapshot does not name make one label set per (reporter, response flag), and no address or
/// port appears in the scrape.
#[test]
fn unknown_addresses_never_make_new_series() {
    let (telemetry, _) = telemetry(TelemetrySettings::default());
    let names = FakeNames::default();
    let outcomes = [
        Outcome::Closed,
        Outcome::Reset,
        Outcome::ConnectFailed,
        Outcome::NoEndpoint,
        Outcome::Denied { policy: 3 },
    ];
    for i in 0..10_000u32 {
        let direction = if i % 2 == 0 {
            Direction::Outbound
        } else {
            Direction::Inbound
        };
        let port = 1024 + (i % 60_000) as u16;
        let source = SocketAddr::from((Ipv4Addr::from(0x0b00_0000 + i), port));
        let destination = SocketAddr::from((Ipv4Addr::from(0x0c00_0000 + i), port));
        let connection = Connection {
            direction,
            source,
            destination,
            service: Some(SocketAddr::from((Ipv4Addr::from(0x0d00_0000 + i), port))),
            bytes_sent: u64::from(i),
            bytes_received: 1,
            duration: Duration::from_millis(1),
            outcome: outcomes[(i / 2) as usize % outcomes.len()],
        };
        telemetry.record(&connection, &names);
    }
    assert_eq!(telemetry.metrics().series_count(), 2 * outcomes.len());
    let text = scrape(&telemetry);
    for metric in [
        "istio_tcp_connections_opened_total",
        "istio_tcp_connections_closed_total",
        "istio_tcp_sent_bytes_total",
        "istio_tcp_received_bytes_total",
    ] {
        assert_eq!(series(&text, metric).len(), 2 * outcomes.len(), "{text}");
    }
    let opened: u64 = series(&text, "istio_tcp_connections_opened_total")
        .iter()
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(opened, 10_000);
    for prefix in ["11.", "12.", "13.", "1024", "\"3\""] {
        assert!(
            !text.contains(prefix),
            "{prefix} leaked into a label: {text}"
        );
    }
}

/// Past `max_series` label sets, a connection with a new label set is not counted, and counted as
/// dropped; the label sets already kept go on counting.
#[test]
fn label_sets_past_the_cap_are_dropped_and_counted() {
    let (telemetry, _) = telemetry(TelemetrySettings {
        max_series: 2,
        ..TelemetrySettings::default()
    });
    let names = bookshop();
    let flagged = |outcome| Connection {
        outcome,
        ..outbound_to_reviews()
    };
    telemetry.record(&flagged(Outcome::Closed), &names);
    telemetry.record(&flagged(Outcome::Reset), &names);
    telemetry.record(&flagged(Outcome::ConnectFailed), &names);
    telemetry.record(&flagged(Outcome::NoEndpoint), &names);
    telemetry.record(&flagged(Outcome::Closed), &names);
    let text = scrape(&telemetry);
    assert_eq!(
        series(&text, "istio_tcp_connections_opened_total").len(),
        2,
        "{text}"
    );
    assert!(text.contains("kmesh_telemetry_series 2\n"), "{text}");
    assert!(
        text.contains("kmesh_telemetry_series_dropped_total 2\n"),
        "{text}"
    );
    assert!(
        series(&text, "istio_tcp_connections_opened_total")
            .iter()
            .any(|l| l.contains("response_flags=\"-\"") && l.ends_with("} 2")),
        "{text}"
    );
}

#[test]
fn the_access_log_writes_a_line_per_connection_only_while_on() {
    let (telemetry, buffer) = telemetry(TelemetrySettings::default());
    let names = bookshop();
    telemetry.record(&outbound_to_reviews(), &names);
    assert!(buffer.lines().is_empty(), "off by default");
    assert_eq!(telemetry.set_access_log(AccessLog::On), AccessLog::Off);
    telemetry.record(&outbound_to_reviews(), &names);
    telemetry.record(&inbound_to_reviews(), &names);
    telemetry.set_access_log(AccessLog::Off);
    telemetry.record(&outbound_to_reviews(), &names);
    let lines = buffer.lines();
    assert_eq!(lines.len(), 2, "{lines:?}");
    let first: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(first["direction"], "outbound");
    assert_eq!(first["dst_service"], "reviews.books.svc.cluster.local");
    let second: serde_json::Value = serde_json::from_str(&lines[1]).unwrap();
    assert_eq!(second["direction"], "inbound");
    assert_eq!(second["dst_service"], "reviews.books.svc.cluster.local");
    assert_eq!(second["bytes_sent"], 4500);
    // Metrics count whether the log is on or off.
    let text = scrape(&telemetry);
    assert!(
        series(&text, "istio_tcp_connections_opened_total")
            .iter()
            .any(
                |l| l.starts_with("istio_tcp_connections_opened_total{reporter=\"source\"")
                    && l.ends_with("} 3")
            ),
        "{text}"
    );
}

#[test]
fn the_text_format_is_chosen_by_the_setting() {
    let (telemetry, buffer) = telemetry(TelemetrySettings {
        access_log_format: AccessLogFormat::Text,
        ..TelemetrySettings::default()
    });
    telemetry.set_access_log(AccessLog::On);
    telemetry.record(&outbound_to_reviews(), &bookshop());
    let lines = buffer.lines();
    assert_eq!(lines.len(), 1);
    assert!(
        lines[0].starts_with("start_time=2026-11-27T00:59:59.998Z direction=outbound "),
        "{lines:?}"
    );
}

/// An output that fails: the line is lost, counted, and the metrics still count.
#[test]
fn an_access_log_that_cannot_be_written_is_counted() {
    struct Broken;
    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::other("closed"))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let telemetry =
        Telemetry::with_output(TelemetrySettings::default(), Box::new(Broken), fixed_clock);
    telemetry.set_access_log(AccessLog::On);
    telemetry.record(&outbound_to_reviews(), &bookshop());
    let text = scrape(&telemetry);
    assert!(
        text.contains("kmesh_telemetry_access_log_errors_total 1\n"),
        "{text}"
    );
    assert_eq!(telemetry.metrics().series_count(), 1);
}

/// `record` is the entry point of another thread: it must be shareable.
#[test]
fn telemetry_is_shared_between_threads() {
    fn shareable<T: Send + Sync + Clone + 'static>() {}
    shareable::<Telemetry>();
    let (telemetry, _) = telemetry(TelemetrySettings::default());
    let names: Arc<dyn NameLookup + Send + Sync> = Arc::new(bookshop());
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (telemetry, names) = (telemetry.clone(), names.clone());
            std::thread::spawn(move || {
                for _ in 0..250 {
                    telemetry.record(&outbound_to_reviews(), names.as_ref());
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    let labels = super::TrafficLabels::of(&outbound_to_reviews(), names.as_ref());
    let totals = telemetry.metrics().totals(&labels).unwrap();
    assert_eq!((totals.opened, totals.received_bytes), (1000, 120_000));
}
