//! The Grafana dashboard (config/grafana/kmesh-workload-dashboard.json) queries only metrics the
//! agent serves: every metric name in every panel's and every variable's PromQL is looked up among
//! the sample names of a real scrape text (`metrics::render`), rendered from a status with a live
//! snapshot, kernel counters, authorization counts and recorded connections, so that every family
//! has a series.
use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use kmesh_agent::{
    agent::{Counts, LiveSnapshot, Status},
    authz_counters::{Action, AuthzCount, Reason},
    connection::{Connection, Direction, NameLookup, Outcome, ServiceNames, WorkloadNames},
    events::{Dropped, EventCounts},
    maps::Counters,
    metrics::{KernelCounts, render},
    refusal::RefusalKind,
    telemetry::Telemetry,
};
use kmesh_snapshot::Limits;

fn dashboard_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../config/grafana/kmesh-workload-dashboard.json")
}

/// Names one client and one server.
struct Names;

impl NameLookup for Names {
    fn workload(&self, ip: IpAddr) -> Option<WorkloadNames<'_>> {
        Some(WorkloadNames {
            workload: if ip.is_loopback() { "client" } else { "server" },
            namespace: "default",
            service_account: "default",
            app: "app",
            version: "v1",
        })
    }
    fn service(&self, _: SocketAddr) -> Option<ServiceNames<'_>> {
        Some(ServiceNames {
            host: "server.default.svc.cluster.local",
            name: "server",
            namespace: "default",
        })
    }
    fn service_of_endpoint(&self, endpoint: SocketAddr) -> Option<ServiceNames<'_>> {
        self.service(endpoint)
    }
    fn policy(&self, _: u32) -> Option<&str> {
        Some("default/deny")
    }
}

/// A scrape with a series in every family the agent has.
fn agent_metrics() -> String {
    let telemetry = Telemetry::default();
    for (direction, outcome) in [
        (Direction::Outbound, Outcome::Closed),
        (Direction::Inbound, Outcome::Denied { policy: 1 }),
    ] {
        let connection = Connection {
            direction,
            source: "127.0.0.1:40000".parse().unwrap(),
            destination: "10.0.0.2:80".parse().unwrap(),
            service: None,
            bytes_sent: 1,
            bytes_received: 2,
            duration: Duration::from_millis(1),
            outcome,
        };
        telemetry.record(&connection, &Names);
    }
    let mut status = Status {
        ready: true,
        telemetry,
        live: Some(LiveSnapshot {
            generation: 1,
            counts: Some(Counts::default()),
            ..LiveSnapshot::default()
        }),
        ..Status::default()
    };
    status.refused_by_kind.insert(RefusalKind::OverCapacity, 1);
    status.apply_durations.observe_micros(100);
    let kernel = KernelCounts {
        counters: Some(Counters::default()),
        authz: Some(vec![AuthzCount {
            workload_ip: [10, 0, 0, 2].into(),
            policy: 0,
            policy_name: None,
            action: Action::Allow,
            reason: Reason::NoAllowPolicy,
            connections: 1,
        }]),
        events: Some(EventCounts {
            closed: 1,
            ..EventCounts::default()
        }),
        events_dropped: Some(Dropped::default()),
    };
    render(&status, &Limits::default(), &kernel)
}

/// The sample names of a scrape text (`name_total`, `name_bucket`, a gauge's `name`).
fn sample_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| line.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

/// Every PromQL expression of the dashboard: panels' targets and the variables' queries.
fn expressions(dashboard: &serde_json::Value) -> Vec<String> {
    let mut exprs = Vec::new();
    let mut panels: Vec<&serde_json::Value> = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        panels.push(panel);
        if let Some(nested) = panel["panels"].as_array() {
            panels.extend(nested);
        }
    }
    for panel in panels {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("every target has an expr");
            exprs.push(expr.to_string());
        }
    }
    for variable in dashboard["templating"]["list"]
        .as_array()
        .expect("variables")
    {
        if variable["type"] != "query" {
            continue;
        }
        let query = variable["query"]["query"]
            .as_str()
            .or(variable["query"].as_str())
            .expect("a query variable has a query");
        exprs.push(label_values_metric(query).to_string());
    }
    exprs
}

/// `label_values(metric{...}, label)` → `metric{...}` (the label is not a metric).
fn label_values_metric(query: &str) -> &str {
    let Some(inner) = query
        .strip_prefix("label_values(")
        .and_then(|q| q.strip_suffix(')'))
    else {
        return query;
    };
    inner
        .rsplit_once(',')
        .map_or(inner, |(selector, _)| selector)
}

/// Removes everything between `open` and its matching `close` (keeping neither).
fn strip_between(text: &str, open: char, close: char) -> String {
    let mut out = String::new();
    let mut depth = 0;
    for c in text.chars() {
        if c == open {
            depth += 1;
        } else if c == close && depth > 0 {
            depth -= 1;
        } else if depth == 0 {
            out.push(c);
        }
    }
    out
}

/// The metric names a PromQL expression reads: identifiers left once strings, label matchers,
/// ranges, grouping clauses and Grafana variables are removed, that are not a function call or
/// a keyword.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let no_strings = strip_quoted(expr);
    let no_matchers = strip_between(&no_strings, '{', '}');
    let no_ranges = strip_between(&no_matchers, '[', ']');
    let no_grouping = strip_grouping(&no_ranges);
    let mut names = BTreeSet::new();
    let chars: Vec<char> = no_grouping.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '$' {
            i += 1;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            continue;
        }
        if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || "_:".contains(chars[i])) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let next = chars[i..].iter().find(|c| !c.is_whitespace());
            let keyword = ["and", "or", "unless", "bool", "offset", "inf", "nan"];
            if next != Some(&'(') && !keyword.contains(&word.as_str()) {
                names.insert(word);
            }
            continue;
        }
        if c.is_ascii_digit() {
            // A number (and its exponent or unit letters) is not a name.
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
            continue;
        }
        i += 1;
    }
    names
}

fn strip_quoted(expr: &str) -> String {
    let mut out = String::new();
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for c in expr.chars() {
        match quote {
            Some(_) if escaped => escaped = false,
            Some(_) if c == '\\' => escaped = true,
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '"' || c == '\'' || c == '`' => quote = Some(c),
            None => out.push(c),
        }
    }
    out
}

/// Removes `by (...)`, `without (...)`, `on (...)`, `ignoring (...)`, `group_left (...)` and
/// `group_right (...)`: label lists, not metrics.
fn strip_grouping(expr: &str) -> String {
    let mut out = expr.to_string();
    for keyword in [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ] {
        while let Some(at) = find_word(&out, keyword) {
            let after = &out[at + keyword.len()..];
            let trimmed = after.trim_start();
            if !trimmed.starts_with('(') {
                // `group_left` without a label list.
                out.replace_range(at..at + keyword.len(), "");
                continue;
            }
            let open = at + keyword.len() + (after.len() - trimmed.len());
            let close = open + out[open..].find(')').expect("a closed label list");
            out.replace_range(at..=close, " ");
        }
    }
    out
}

fn find_word(text: &str, word: &str) -> Option<usize> {
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    text.match_indices(word).map(|(at, _)| at).find(|&at| {
        let before = text[..at].chars().next_back();
        let after = text[at + word.len()..].chars().next();
        !before.is_some_and(is_ident) && !after.is_some_and(is_ident)
    })
}

#[test]
fn the_extractor_finds_metric_names_and_nothing_else() {
    let expr = r#"histogram_quantile(0.99, sum by (le) (rate(kmesh_x_bucket{a="b", c=~"$d"}[$__rate_interval]))) / on (instance, table) group_left kmesh_y + sum without (z) (kmesh_z offset 5m) > bool 1e3"#;
    assert_eq!(
        metric_names(expr),
        ["kmesh_x_bucket", "kmesh_y", "kmesh_z"]
            .map(String::from)
            .into()
    );
    assert_eq!(
        label_values_metric(r#"label_values(istio_a{x=~"$y"}, destination_workload)"#),
        r#"istio_a{x=~"$y"}"#
    );
}

#[test]
fn every_metric_the_dashboard_queries_is_served_by_the_agent() {
    let text = std::fs::read_to_string(dashboard_path()).expect("reading the dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let served = sample_names(&agent_metrics());
    let exprs = expressions(&dashboard);
    assert!(exprs.len() >= 20, "the dashboard has its panels: {exprs:?}");
    let mut queried = BTreeSet::new();
    let mut missing = Vec::new();
    for expr in &exprs {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "no metric found in {expr}");
        for name in names {
            if !served.contains(&name) {
                missing.push(format!("{name} (in {expr})"));
            }
            queried.insert(name);
        }
    }
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics the agent does not serve:\n{}\nserved: {served:?}",
        missing.join("\n")
    );
    // The panels the issue asks for are there.
    for name in [
        "istio_tcp_connections_opened_total",
        "istio_tcp_connections_closed_total",
        "istio_tcp_sent_bytes_total",
        "istio_tcp_received_bytes_total",
        "kmesh_live_generation",
        "kmesh_snapshot_apply_duration_seconds_bucket",
        "kmesh_snapshots_refused_total",
        "kmesh_map_entries",
        "kmesh_map_capacity",
        "kmesh_authz_connections_total",
    ] {
        assert!(queried.contains(name), "no panel queries {name}");
    }
}

/// Every panel has a unique id and a title, and targets use the dashboard's data source variable.
#[test]
fn panels_are_well_formed() {
    let text = std::fs::read_to_string(dashboard_path()).expect("reading the dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut ids = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        let id = panel["id"].as_u64().expect("a panel id");
        assert!(ids.insert(id), "duplicate panel id {id}");
        assert!(panel["title"].as_str().is_some_and(|t| !t.is_empty()));
        if panel["type"] != "row" {
            assert_eq!(panel["datasource"]["uid"], "${datasource}", "{panel}");
        }
    }
}
