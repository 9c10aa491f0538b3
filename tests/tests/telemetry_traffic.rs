//! Istio's TCP metrics and the access log after real traffic between netns pods: the real
//! `kmesh-agent` reads its own events ring (the kernel's `sock_ops`, connect4 and `sk_lookup`
//! events), names both ends from the live snapshot's names section, counts every connection in
//! `istio_tcp_*` and writes one access-log line per connection on its standard output. The test
//! checks every series with its full label set and exact values, and every line field by field,
//! then switches the access log off through a snapshot: a further connection is still counted, and
//! writes no line.
//!
//! The data makes mistakes visible: each kind of connection has its own byte counts both ways
//! (sent/received swapped, or one connection counted under another's labels, changes a figure),
//! the client, server and services have distinct names, and a pod the snapshot does not name (the
//! outsider) must count under `unknown`, never its address.
//!
//! Run as root after `cargo build --workspace --bins` (scripts/test.sh does both).
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use kmesh_common::{access_log, log_level};
use kmesh_snapshot::{ServiceName, Snapshot, WorkloadName};
use kmesh_tests::{
    Agent,
    events_world::{DENIED_PORT, DENY_POLICY_NAME, EventsWorld, PORT, WorldSnapshot},
    peer::{Close, PeerHandle},
};
use serde_json::{Value, json};

/// The client, the server and the two services, each with names of its own.
const SLEEP: WorkloadName<'static> = WorkloadName {
    workload: "sleep",
    namespace: "shop",
    service_account: "sleeper",
    app: "sleep-app",
    version: "v1",
};
const SLEEP_PRINCIPAL: &str = "spiffe://cluster.local/ns/shop/sa/sleeper";
const RATINGS: WorkloadName<'static> = WorkloadName {
    workload: "ratings-v2",
    namespace: "books",
    service_account: "bookinfo-ratings",
    app: "ratings",
    version: "v2",
};
const RATINGS_PRINCIPAL: &str = "spiffe://cluster.local/ns/books/sa/bookinfo-ratings";
const RATINGS_SERVICE: ServiceName<'static> = ServiceName {
    host: "ratings.books.svc.cluster.local",
    name: "ratings",
    namespace: "books",
};
/// The service without endpoints.
const STOCK_SERVICE: ServiceName<'static> = ServiceName {
    host: "stock.books.svc.cluster.local",
    name: "stock",
    namespace: "books",
};

/// Bytes (client to server, server to client) of each kind of connection: no two alike.
const CLOSED: (u64, u64) = (12_345, 3_210);
/// A reset connection: the client resets once its bytes are acknowledged, before any answer.
const RESET: (u64, u64) = (4_321, 0);
const RESET_ASKED_REPLY: u64 = 999;
/// Each of the outsider's two connections.
const OUTSIDER: (u64, u64) = (1_111, 2_222);
/// The connection made once the access log is off.
const AFTER_SWITCH: (u64, u64) = (555, 666);

/// The world's generation with names for the client, the server and both services, and the
/// access log `setting`. The outsider is not named.
fn named_snapshot(w: &EventsWorld, generation: u64, setting: u8) -> Snapshot {
    let WorldSnapshot {
        mut builder,
        service,
        empty_service,
    } = w.snapshot(generation);
    builder.workload_names(IpAddr::V4(w.client.ipv4()), &SLEEP);
    builder.workload_names(IpAddr::V4(w.server.ipv4()), &RATINGS);
    builder.service_names(service, &RATINGS_SERVICE);
    builder.service_names(empty_service, &STOCK_SERVICE);
    builder.agent_settings(setting, log_level::INFO);
    builder.build()
}

// --- Istio's metrics, as the test expects them --------------------------------------------------

/// A sample of the scrape: (metric name, its labels).
type SeriesKey = (String, BTreeMap<String, String>);

/// The `source_*` or `destination_*` labels of a workload (`None`: one the snapshot does not
/// name), written out as Istio's dashboards read them.
fn workload_labels(side: &str, names: Option<(&WorkloadName<'_>, &str)>) -> Vec<(String, String)> {
    let (workload, service, revision, namespace, principal, app, version) = match names {
        Some((n, principal)) => (
            n.workload,
            n.app,
            n.version,
            n.namespace,
            principal,
            n.app,
            n.version,
        ),
        None => (
            "unknown", "unknown", "unknown", "unknown", "unknown", "unknown", "unknown",
        ),
    };
    [
        ("workload", workload),
        ("canonical_service", service),
        ("canonical_revision", revision),
        ("workload_namespace", namespace),
        ("principal", principal),
        ("app", app),
        ("version", version),
        ("cluster", "unknown"),
    ]
    .into_iter()
    .map(|(k, v)| (format!("{side}_{k}"), v.to_string()))
    .collect()
}

/// One label set of the `istio_tcp_*` families.
struct Labels<'a> {
    reporter: &'a str,
    source: Option<(&'a WorkloadName<'a>, &'a str)>,
    service: Option<&'a ServiceName<'a>>,
    destination: Option<(&'a WorkloadName<'a>, &'a str)>,
    response_flags: &'a str,
}

impl Labels<'_> {
    fn map(&self) -> BTreeMap<String, String> {
        let mut labels: BTreeMap<String, String> = BTreeMap::new();
        labels.insert("reporter".into(), self.reporter.into());
        labels.extend(workload_labels("source", self.source));
        labels.extend(workload_labels("destination", self.destination));
        let (host, name, namespace) = self.service.map_or(("unknown", "unknown", "unknown"), |s| {
            (s.host, s.name, s.namespace)
        });
        labels.insert("destination_service".into(), host.into());
        labels.insert("destination_service_name".into(), name.into());
        labels.insert("destination_service_namespace".into(), namespace.into());
        labels.insert("request_protocol".into(), "tcp".into());
        labels.insert("response_flags".into(), self.response_flags.into());
        labels.insert("connection_security_policy".into(), "unknown".into());
        labels
    }
}

/// The four families' samples of one label set: `count` connections, with `bytes` (client to
/// server, server to client) in all. Istio's sense whoever reports: `received_bytes` is what the
/// client sent, `sent_bytes` what the server sent back.
fn series(labels: &Labels<'_>, count: u64, bytes: (u64, u64)) -> Vec<(SeriesKey, f64)> {
    let labels = labels.map();
    [
        ("istio_tcp_connections_opened_total", count),
        ("istio_tcp_connections_closed_total", count),
        ("istio_tcp_received_bytes_total", bytes.0),
        ("istio_tcp_sent_bytes_total", bytes.1),
    ]
    .into_iter()
    .map(|(name, value)| ((name.to_string(), labels.clone()), value as f64))
    .collect()
}

/// Every `istio_tcp_*` sample of a scrape, by name and labels.
fn istio_samples(scrape: &str) -> BTreeMap<SeriesKey, f64> {
    scrape
        .lines()
        .filter(|line| line.starts_with("istio_tcp_"))
        .map(|line| parse_sample(line).unwrap_or_else(|| panic!("unreadable sample {line:?}")))
        .collect()
}

/// `name{k="v",...} value` (label values here never hold quotes or commas).
fn parse_sample(line: &str) -> Option<(SeriesKey, f64)> {
    let (name, rest) = line.split_once('{')?;
    let (labels, value) = rest.rsplit_once("} ")?;
    let labels = labels
        .split(',')
        .map(|pair| {
            let (k, v) = pair.split_once('=')?;
            Some((
                k.to_string(),
                v.strip_prefix('"')?.strip_suffix('"')?.to_string(),
            ))
        })
        .collect::<Option<BTreeMap<_, _>>>()?;
    Some(((name.to_string(), labels), value.trim().parse().ok()?))
}

/// Waits until the agent has counted `connections` closed connections in all, then half a second
/// more (to catch one too many), and returns its `istio_tcp_*` samples.
fn settled_samples(agent: &mut Agent, connections: f64) -> BTreeMap<SeriesKey, f64> {
    let closed_total = |a: &Agent| -> f64 {
        let scrape = a.metrics().unwrap_or_default();
        istio_samples(&scrape)
            .iter()
            .filter(|((name, _), _)| name == "istio_tcp_connections_closed_total")
            .map(|(_, v)| v)
            .sum()
    };
    let waited = agent.wait_for(Duration::from_secs(10), "connections counted", |a| {
        Ok(closed_total(a) >= connections)
    });
    if let Err(e) = waited {
        panic!(
            "{e}\nscrape:\n{}",
            agent.metrics().unwrap_or_else(|e| e.to_string())
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    istio_samples(&agent.metrics().expect("metrics"))
}

/// The whole expected set against the scrape's, with what is missing, wrong and extra spelled out.
fn assert_samples(got: &BTreeMap<SeriesKey, f64>, expected: &[(SeriesKey, f64)]) {
    let expected: BTreeMap<SeriesKey, f64> = expected.iter().cloned().collect();
    if *got == expected {
        return;
    }
    let mut report = String::new();
    for (key, value) in &expected {
        match got.get(key) {
            None => report.push_str(&format!("missing {key:?} = {value}\n")),
            Some(v) if v != value => {
                report.push_str(&format!("wrong {key:?}: {v}, expected {value}\n"))
            }
            Some(_) => {}
        }
    }
    for (key, value) in got {
        if !expected.contains_key(key) {
            report.push_str(&format!("extra {key:?} = {value}\n"));
        }
    }
    panic!("istio_tcp_* samples differ:\n{report}");
}

// --- The access log -----------------------------------------------------------------------------

/// The fields of a line, in their fixed order.
const FIELDS: [&str; 16] = [
    "start_time",
    "direction",
    "src_addr",
    "src_workload",
    "src_namespace",
    "dst_addr",
    "dst_service_addr",
    "dst_service",
    "dst_workload",
    "dst_namespace",
    "bytes_sent",
    "bytes_received",
    "duration_ms",
    "response_flags",
    "verdict",
    "policy",
];

/// The access-log lines in the agent's output so far (JSON lines; its own log is text).
fn access_lines(agent: &Agent) -> Vec<(String, Value)> {
    agent
        .log()
        .lines()
        .filter(|line| line.starts_with("{\"start_time\""))
        .map(|line| {
            let value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("access-log line {line:?} is not JSON: {e}"));
            (line.to_string(), value)
        })
        .collect()
}

fn wait_for_access_lines(agent: &Agent, n: usize) -> Vec<(String, Value)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while access_lines(agent).len() < n && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    access_lines(agent)
}

/// One expected line: every field but `start_time` and `duration_ms`, which are checked by shape
/// (and the duration is more than zero when the kernel `timed` a socket: not for a connection
/// refused by connect4 or denied in `sk_lookup`, which never had one and last 0 ms).
struct Line {
    fields: Value,
    timed: bool,
}

/// The line whose direction, source and destination addresses and response flags are those of
/// `expected`, checked field by field.
fn check_line(lines: &[(String, Value)], expected: &Line) {
    let key = |v: &Value| {
        (
            v["direction"].clone(),
            v["src_addr"].clone(),
            v["dst_addr"].clone(),
            v["response_flags"].clone(),
        )
    };
    let matching: Vec<_> = lines
        .iter()
        .filter(|(_, v)| key(v) == key(&expected.fields))
        .collect();
    let all: Vec<&str> = lines.iter().map(|(l, _)| l.as_str()).collect();
    assert_eq!(
        matching.len(),
        1,
        "one line like {}; lines:\n{}",
        expected.fields,
        all.join("\n")
    );
    let (raw, got) = matching[0];
    let object = got.as_object().expect("a JSON object");
    // All sixteen fields, in the fixed order.
    let positions: Vec<usize> = FIELDS
        .iter()
        .map(|f| {
            raw.find(&format!("\"{f}\":"))
                .unwrap_or_else(|| panic!("no {f} in {raw}"))
        })
        .collect();
    assert!(positions.is_sorted(), "field order: {raw}");
    assert_eq!(object.len(), FIELDS.len(), "{raw}");
    for (field, value) in expected.fields.as_object().expect("expected fields") {
        assert_eq!(&object[field], value, "{field} of {raw}");
    }
    let start = got["start_time"].as_str().expect("start_time");
    assert!(
        start.len() == 24 && start.ends_with('Z') && &start[10..11] == "T",
        "start_time {start:?} of {raw}"
    );
    let duration = got["duration_ms"].as_f64().expect("duration_ms");
    assert!((0.0..10_000.0).contains(&duration), "duration of {raw}");
    if expected.timed {
        assert!(
            duration > 0.0,
            "duration of a connection with a socket: {raw}"
        );
    }
}

/// Waits for a line of the agent's own log holding every one of `parts`.
fn wait_for_log(agent: &Agent, parts: &[&str]) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if agent
            .log()
            .lines()
            .any(|line| parts.iter().all(|p| line.contains(p)))
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("no log line with {parts:?}:\n{}", agent.log());
}

// --- The test -----------------------------------------------------------------------------------

/// The addresses the kernel reported for the traffic of phase one.
struct Traffic {
    closed_client: SocketAddr,
    reset_client: SocketAddr,
    outsider_clients: [SocketAddr; 2],
}

/// The connections of phase one: through the service (closed, then reset), to the service
/// without endpoints (refused before binding: source port 0), to the denied port (whose client
/// port only the kernel's events name: see [`check_denied_lines`]), and two from the outsider
/// straight to the server.
fn run_traffic(w: &EventsWorld) -> Traffic {
    let vip = w.service_addr(w.vip);
    let x = w.exchange_bytes(&w.client, vip, Close::Fin, CLOSED.0, CLOSED.1);
    assert_eq!((x.client.sent, x.client.received), CLOSED, "{:?}", x.client);
    assert_eq!(x.client.error, None);
    let closed_client = x.client.local_addr();

    let x = w.exchange_bytes(&w.client, vip, Close::Rst, RESET.0, RESET_ASKED_REPLY);
    assert_eq!(
        x.server.error.as_deref(),
        Some("ECONNRESET"),
        "{:?}",
        x.server
    );
    assert_eq!((x.client.sent, x.server.sent), (RESET.0, RESET.1));
    let reset_client = x.client.local_addr();

    let report = PeerHandle::connect(
        &w.client,
        &w.cgroup,
        w.service_addr(w.vip_empty),
        CLOSED.0,
        1,
        Close::Fin,
    )
    .expect("client");
    assert_eq!(report.connections[0].error.as_deref(), Some("ECONNREFUSED"));

    let server = PeerHandle::serve(&w.server, &w.cgroup, DENIED_PORT, CLOSED.1, 1).expect("serve");
    let report = PeerHandle::connect(
        &w.client,
        &w.cgroup,
        w.server_addr(DENIED_PORT),
        CLOSED.0,
        1,
        Close::Fin,
    )
    .expect("client");
    drop(server);
    assert_eq!(report.connections[0].error.as_deref(), Some("ECONNREFUSED"));

    let outsider_clients = [0, 1].map(|_| {
        let x = w.exchange_bytes(
            &w.outsider,
            w.server_addr(PORT),
            Close::Fin,
            OUTSIDER.0,
            OUTSIDER.1,
        );
        assert_eq!((x.client.sent, x.client.received), OUTSIDER);
        x.client.local_addr()
    });
    Traffic {
        closed_client,
        reset_client,
        outsider_clients,
    }
}

/// Every series of phase one, with `after_switch` more connections of the closed kind.
fn expected_series(after_switch: u64) -> Vec<(SeriesKey, f64)> {
    let sleep = Some((&SLEEP, SLEEP_PRINCIPAL));
    let ratings = Some((&RATINGS, RATINGS_PRINCIPAL));
    let closed_bytes = (
        CLOSED.0 + after_switch * AFTER_SWITCH.0,
        CLOSED.1 + after_switch * AFTER_SWITCH.1,
    );
    let label = |reporter, source, service, destination, response_flags| Labels {
        reporter,
        source,
        service,
        destination,
        response_flags,
    };
    let service = Some(&RATINGS_SERVICE);
    let stock = Some(&STOCK_SERVICE);
    [
        // Through the service, closed in order: both ends; the server's end, which never sees
        // the address dialed, names the service its address and port are an endpoint of.
        series(
            &label("source", sleep, service, ratings, "-"),
            1 + after_switch,
            closed_bytes,
        ),
        series(
            &label("destination", sleep, service, ratings, "-"),
            1 + after_switch,
            closed_bytes,
        ),
        // Reset by the client.
        series(&label("source", sleep, service, ratings, "UR"), 1, RESET),
        series(
            &label("destination", sleep, service, ratings, "UR"),
            1,
            RESET,
        ),
        // No endpoint: only the client's end, refused before any packet; the destination is the
        // service address, which names no workload.
        series(&label("source", sleep, stock, None, "UH"), 1, (0, 0)),
        // Denied by the server's policy: the server's end says why, the client's end saw a
        // refused connection to an address that is no service (the denied port is no service's
        // endpoint either).
        series(&label("source", sleep, None, ratings, "UF"), 1, (0, 0)),
        series(
            &label("destination", sleep, None, ratings, "DENY"),
            1,
            (0, 0),
        ),
        // The outsider is not enrolled (only the server reports) and not named: unknown.
        series(
            &label("destination", None, service, ratings, "-"),
            2,
            (2 * OUTSIDER.0, 2 * OUTSIDER.1),
        ),
    ]
    .concat()
}

fn expected_lines(w: &EventsWorld, t: &Traffic) -> Vec<Line> {
    let server = w.server_addr(PORT).to_string();
    let vip = w.service_addr(w.vip).to_string();
    let line = |fields: Value, timed| Line { fields, timed };
    let both_ends = |client: SocketAddr, bytes: (u64, u64), flags: &str| {
        [
            line(
                json!({
                    "direction": "outbound", "src_addr": client.to_string(),
                    "src_workload": "sleep", "src_namespace": "shop",
                    "dst_addr": server, "dst_service_addr": vip,
                    "dst_service": "ratings.books.svc.cluster.local",
                    "dst_workload": "ratings-v2", "dst_namespace": "books",
                    "bytes_sent": bytes.0, "bytes_received": bytes.1,
                    "response_flags": flags, "verdict": "-", "policy": "-",
                }),
                true,
            ),
            line(
                json!({
                    "direction": "inbound", "src_addr": client.to_string(),
                    "src_workload": "sleep", "src_namespace": "shop",
                    "dst_addr": server, "dst_service_addr": null,
                    "dst_service": "ratings.books.svc.cluster.local",
                    "dst_workload": "ratings-v2", "dst_namespace": "books",
                    "bytes_sent": bytes.1, "bytes_received": bytes.0,
                    "response_flags": flags, "verdict": "-", "policy": "-",
                }),
                true,
            ),
        ]
    };
    let empty = w.service_addr(w.vip_empty).to_string();
    let mut lines: Vec<Line> = both_ends(t.closed_client, CLOSED, "-").into();
    lines.extend(both_ends(t.reset_client, RESET, "UR"));
    lines.push(line(
        json!({
            "direction": "outbound", "src_addr": format!("{}:0", w.client.ipv4()),
            "src_workload": "sleep", "src_namespace": "shop",
            "dst_addr": empty, "dst_service_addr": empty,
            "dst_service": "stock.books.svc.cluster.local",
            "dst_workload": null, "dst_namespace": null,
            "bytes_sent": 0, "bytes_received": 0,
            "response_flags": "UH", "verdict": "-", "policy": "-",
        }),
        false,
    ));
    for client in t.outsider_clients {
        lines.push(line(
            json!({
                "direction": "inbound", "src_addr": client.to_string(),
                "src_workload": null, "src_namespace": null,
                "dst_addr": server, "dst_service_addr": null,
                "dst_service": "ratings.books.svc.cluster.local",
                "dst_workload": "ratings-v2", "dst_namespace": "books",
                "bytes_sent": OUTSIDER.1, "bytes_received": OUTSIDER.0,
                "response_flags": "-", "verdict": "-", "policy": "-",
            }),
            true,
        ));
    }
    lines
}

/// The denied connection's two lines: the client's end saw a refused connect (`UF`), the
/// server's end the denial with its policy; both name the same client port, which only the
/// kernel knows (the client's connect failed).
fn check_denied_lines(w: &EventsWorld, lines: &[(String, Value)]) {
    let denied_server = w.server_addr(DENIED_PORT).to_string();
    let of_flag = |flag: &str| -> &Value {
        let matching: Vec<_> = lines
            .iter()
            .filter(|(_, v)| v["response_flags"] == flag)
            .collect();
        assert_eq!(matching.len(), 1, "one {flag} line: {lines:#?}");
        &matching[0].1
    };
    let client_port = of_flag("UF")["src_addr"]
        .as_str()
        .expect("src_addr")
        .to_string();
    let client_ip = w.client.ipv4().to_string();
    assert!(
        client_port.starts_with(&format!("{client_ip}:")) && !client_port.ends_with(":0"),
        "{client_port}"
    );
    let denied = [
        Line {
            fields: json!({
                "direction": "outbound", "src_addr": client_port,
                "src_workload": "sleep", "src_namespace": "shop",
                "dst_addr": denied_server, "dst_service_addr": null, "dst_service": null,
                "dst_workload": "ratings-v2", "dst_namespace": "books",
                "bytes_sent": 0, "bytes_received": 0,
                "response_flags": "UF", "verdict": "-", "policy": "-",
            }),
            timed: true,
        },
        Line {
            fields: json!({
                "direction": "inbound", "src_addr": client_port,
                "src_workload": "sleep", "src_namespace": "shop",
                "dst_addr": denied_server, "dst_service_addr": null, "dst_service": null,
                "dst_workload": "ratings-v2", "dst_namespace": "books",
                "bytes_sent": 0, "bytes_received": 0,
                "response_flags": "DENY", "verdict": "deny", "policy": DENY_POLICY_NAME,
            }),
            timed: false,
        },
    ];
    for line in &denied {
        check_line(lines, line);
    }
}

/// No `istio_tcp_*` label holds an address of the test (the outsider's least of all): labels come
/// from names only. And the agent keeps exactly the label sets expected.
fn check_cardinality(w: &EventsWorld, agent: &Agent, label_sets: usize) {
    let scrape = agent.metrics().expect("metrics");
    let addresses = [
        w.outsider.ipv4().to_string(),
        w.client.ipv4().to_string(),
        w.server.ipv4().to_string(),
        w.vip.to_string(),
        w.vip_empty.to_string(),
    ];
    for line in scrape.lines().filter(|l| l.starts_with("istio_tcp_")) {
        for address in &addresses {
            assert!(!line.contains(address.as_str()), "{address} in {line}");
        }
    }
    // The connections closed cleanly, as both ends count them (README's excerpt is this).
    for line in scrape.lines().filter(|l| {
        l.starts_with("istio_tcp_connections_opened_total{") && l.contains("response_flags=\"-\"")
    }) {
        println!("scrape: {line}");
    }
    let kept = format!("kmesh_telemetry_series {label_sets}\n");
    assert!(scrape.contains(&kept), "{kept:?} in\n{scrape}");
    assert!(
        scrape.contains("kmesh_telemetry_series_dropped_total 0\n"),
        "{scrape}"
    );
}

#[test]
fn istio_metrics_and_access_log_lines_after_real_traffic() {
    const LABEL_SETS: usize = 8;
    const CONNECTIONS: f64 = 9.0;
    let w = EventsWorld::new("telemetry", 170);
    let mut agent = w.start_agent(named_snapshot(&w, 1, access_log::ON), &[]);
    wait_for_log(
        &agent,
        &[
            "access log switched by the live snapshot",
            "generation=1",
            "access_log=On",
        ],
    );

    let traffic = run_traffic(&w);
    let samples = settled_samples(&mut agent, CONNECTIONS);
    assert_samples(&samples, &expected_series(0));
    check_cardinality(&w, &agent, LABEL_SETS);

    let lines = wait_for_access_lines(&agent, CONNECTIONS as usize);
    assert_eq!(
        lines.len(),
        CONNECTIONS as usize,
        "one line per connection end:\n{}",
        agent.log()
    );
    for (line, _) in &lines {
        eprintln!("access log: {line}");
    }
    for line in expected_lines(&w, &traffic) {
        check_line(&lines, &line);
    }
    check_denied_lines(&w, &lines);

    // The access log off through a snapshot: a further connection is counted, and writes no line.
    w.write_snapshot(named_snapshot(&w, 2, access_log::OFF));
    wait_for_log(
        &agent,
        &[
            "access log switched by the live snapshot",
            "generation=2",
            "access_log=Off",
        ],
    );
    let x = w.exchange_bytes(
        &w.client,
        w.service_addr(w.vip),
        Close::Fin,
        AFTER_SWITCH.0,
        AFTER_SWITCH.1,
    );
    assert_eq!((x.client.sent, x.client.received), AFTER_SWITCH);
    let samples = settled_samples(&mut agent, CONNECTIONS + 2.0);
    assert_samples(&samples, &expected_series(1));
    assert_eq!(
        access_lines(&agent).len(),
        CONNECTIONS as usize,
        "no line once the access log is off:\n{}",
        agent.log()
    );
    check_cardinality(&w, &agent, LABEL_SETS);
}
