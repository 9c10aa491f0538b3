//! The agent's Prometheus metrics, on their own listener (`--metrics-addr`, default `0.0.0.0:15020`,
//! the port Istio and ztunnel serve merged metrics on): a cluster's Prometheus cannot scrape the
//! localhost admin port.
//!
//! Everything is read at scrape time from what the agent already keeps (its [`Status`], the
//! programs' counters and the authorization counters in their pinned maps) and rendered by
//! [`render`], a pure function; only the apply-duration histogram accumulates here
//! ([`ApplyDurations`]). Labels come from the snapshot and from fixed enums (tables, refusal kinds,
//! actions, reasons, policy names of the live snapshot), never from addresses seen in traffic, so the
//! number of series is bounded by the snapshot.
//!
//! The Istio TCP metrics (`istio_tcp_*`) are counted per finished connection by
//! [`crate::telemetry`] and rendered in the same scrape.
use std::{collections::BTreeMap, convert::Infallible, sync::Arc};

use http_body_util::Full;
use hyper::{Response, StatusCode, body::Bytes, header, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use kmesh_snapshot::{Limits, Table};
use prometheus_client::{
    encoding::{
        EncodeLabelSet,
        text::{encode_eof, encode_registry},
    },
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::{
    admin::Maps,
    agent::{SharedStatus, Status},
    authz_counters::{Action, AuthzCount, PolicyKind, Reason},
    events::{Dropped, EventCounts, EventMetrics},
    kernel_maps::Counters,
    refusal::RefusalKind,
};

/// Bucket bounds of the apply duration (fill and flip of one generation), in seconds.
const APPLY_BUCKETS: [f64; 10] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5,
];

/// The durations of applied generations, as a histogram that survives between scrapes. A clone
/// shares the counts (the data plane records, the metrics server reads).
#[derive(Clone, Debug)]
pub struct ApplyDurations(Histogram);

impl Default for ApplyDurations {
    fn default() -> Self {
        ApplyDurations(Histogram::new(APPLY_BUCKETS))
    }
}

impl ApplyDurations {
    pub fn observe_micros(&self, micros: u64) {
        self.0.observe(micros as f64 / 1e6);
    }
}

/// What the kernel maps held at scrape time; `None` when a map could not be read (the scrape
/// still answers, without those series, and the failure is logged).
#[derive(Default)]
pub struct KernelCounts {
    pub counters: Option<Counters>,
    pub authz: Option<Vec<AuthzCount>>,
    /// Connection events read by this agent (`None` when it does not read the ring).
    pub events: Option<EventCounts>,
    /// Connection events the kernel dropped.
    pub events_dropped: Option<Dropped>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TableLabel {
    table: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabel {
    event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
struct AuthzLabels {
    /// `namespace/name` of the deciding policy (named by the snapshots applied since the agent
    /// started); `none` when no single policy decided (no ALLOW policy bound, none matched);
    /// `unknown` for a policy id no snapshot since the agent (re)started named.
    policy: String,
    policy_kind: &'static str,
    action: &'static str,
    reason: &'static str,
}

/// The metrics text for one scrape.
pub fn render(status: &Status, limits: &Limits, kernel: &KernelCounts) -> String {
    let mut registry = Registry::with_prefix("kmesh");
    register_snapshot(&mut registry, status);
    register_tables(&mut registry, status, limits);
    register_enrolment(&mut registry, status);
    if let Some(counters) = &kernel.counters {
        register_counters(&mut registry, counters);
    }
    if let Some(authz) = &kernel.authz {
        register_authz(&mut registry, authz);
    }
    register_events(&mut registry, kernel);
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = encode_registry(&mut out, &registry);
    status.telemetry.encode(&mut out);
    let _ = encode_eof(&mut out);
    out
}

fn gauge(value: i64) -> Gauge {
    let gauge = Gauge::default();
    gauge.set(value);
    gauge
}

fn counter(value: u64) -> Counter {
    let counter = Counter::default();
    counter.inc_by(value);
    counter
}

/// The live generation and what happened to the snapshots received.
fn register_snapshot(registry: &mut Registry, status: &Status) {
    registry.register(
        "ready",
        "1 while /readyz answers OK: a snapshot is live, the links run this agent's programs",
        gauge(i64::from(status.is_ready())),
    );
    if let Some(live) = &status.live {
        registry.register(
            "live_generation",
            "The snapshot generation the kernel programs use",
            gauge(live.generation as i64),
        );
    }
    registry.register(
        "snapshots_applied",
        "Snapshots made live (filled into the idle slot and flipped)",
        counter(status.applied),
    );
    registry.register(
        "snapshots_unchanged",
        "Snapshots received that were already live",
        counter(status.unchanged),
    );
    let refused = Family::<ReasonLabel, Counter>::default();
    for kind in RefusalKind::ALL {
        let count = status.refused_by_kind.get(&kind).copied().unwrap_or(0);
        refused
            .get_or_create(&ReasonLabel {
                reason: kind.as_str(),
            })
            .inc_by(count);
    }
    registry.register(
        "snapshots_refused",
        "Snapshots refused whole, by reason; the live generation stayed in force",
        refused,
    );
    registry.register(
        "snapshot_apply_duration_seconds",
        "Time to fill a generation into the idle slot and flip to it",
        status.apply_durations.0.clone(),
    );
}

/// Map fill per table: the live snapshot's entries against this agent's capacity (`--max-*`).
fn register_tables(registry: &mut Registry, status: &Status, limits: &Limits) {
    let entries = Family::<TableLabel, Gauge>::default();
    let capacity = Family::<TableLabel, Gauge>::default();
    let counts = status.live.as_ref().and_then(|l| l.counts.as_ref());
    // The names tables are user space only (no map to fill).
    for table in Table::ALL.into_iter().filter(|t| t.is_map()) {
        let Some(max) = limits.max_of(table) else {
            continue;
        };
        let label = TableLabel {
            table: table.label(),
        };
        capacity.get_or_create(&label).set(i64::from(max));
        // Unknown after a restart until the source delivers the live snapshot again.
        if let Some(count) = counts.and_then(|c| c.of(table)) {
            entries.get_or_create(&label).set(count as i64);
        }
    }
    registry.register(
        "map_entries",
        "Entries of the live snapshot per table (unknown after a restart until it is delivered again)",
        entries,
    );
    registry.register(
        "map_capacity",
        "Entries this agent accepts per table (--max-*); a snapshot over them is refused whole",
        capacity,
    );
}

fn register_enrolment(registry: &mut Registry, status: &Status) {
    registry.register(
        "enrolled_netns",
        "Network namespaces of this node's mesh workloads, enrolled in the programs",
        gauge(status.enrolled_netns as i64),
    );
    registry.register(
        "authz_links",
        "Enrolled network namespaces with the authorization program attached",
        gauge(status.authz_links as i64),
    );
    registry.register(
        "authz_closed_connections",
        "Established connections closed because a new generation denies them",
        counter(status.closed_connections),
    );
}

/// The programs' global counters (`KM_COUNTERS`).
fn register_counters(registry: &mut Registry, c: &Counters) {
    let events = Family::<EventLabel, Counter>::default();
    for (event, value) in [
        ("rewritten", c.rewritten),
        ("refused_no_endpoint", c.refused_no_endpoint),
        ("refused_family", c.refused_family),
        ("inconsistent", c.inconsistent),
        ("authz_allowed", c.authz_allowed),
        ("authz_denied", c.authz_denied),
        ("authz_node_exempt", c.authz_node_exempt),
        ("authz_counters_full", c.authz_counters_full),
        ("waypoint_origin_failed", c.waypoint_origin_failed),
    ] {
        events.get_or_create(&EventLabel { event }).inc_by(value);
    }
    registry.register(
        "datapath_events",
        "Connections the kernel programs handled, by outcome: connect()s rewritten to an endpoint, \
         refused (no endpoint, address family), read across generations (inconsistent), and \
         inbound connections allowed, denied or exempt (from the node itself) by authorization, \
         and SYNs to a waypoint that left without their origin option",
        events,
    );
}

/// The connection events: read per outcome, and dropped by the kernel per reason.
fn register_events(registry: &mut Registry, kernel: &KernelCounts) {
    if let Some(counts) = &kernel.events {
        let read = Family::<OutcomeLabel, Counter>::default();
        for (outcome, value) in counts.labelled() {
            read.get_or_create(&OutcomeLabel { outcome }).inc_by(value);
        }
        registry.register(
            "events",
            "Connection events read from the kernel, by outcome (closed, reset, connect_failed, \
             no_endpoint, denied; invalid: a record that did not decode)",
            read,
        );
    }
    if let Some(dropped) = &kernel.events_dropped {
        let lost = Family::<ReasonLabel, Counter>::default();
        for (reason, value) in [
            ("ring_full", dropped.ring_full),
            ("no_storage", dropped.no_storage),
        ] {
            lost.get_or_create(&ReasonLabel { reason }).inc_by(value);
        }
        registry.register(
            "events_dropped",
            "Connection events the kernel could not report: the ring buffer was full (the reader \
             fell behind), or a connection's socket storage could not be allocated",
            lost,
        );
    }
}

/// Authorization decisions per deciding policy, action and reason (summed over workloads).
fn register_authz(registry: &mut Registry, counts: &[AuthzCount]) {
    let mut sums: BTreeMap<AuthzLabels, u64> = BTreeMap::new();
    for count in counts {
        *sums.entry(authz_labels(count)).or_default() += count.connections;
    }
    let family = Family::<AuthzLabels, Counter>::default();
    for (labels, value) in sums {
        family.get_or_create(&labels).inc_by(value);
    }
    registry.register(
        "authz_connections",
        "Inbound connections judged by authorization, by deciding policy, action and reason",
        family,
    );
}

fn authz_labels(count: &AuthzCount) -> AuthzLabels {
    let (policy, policy_kind) = match (&count.policy_name, count.policy) {
        (Some(name), _) => (name.name.clone(), policy_kind(name.kind)),
        (None, 0) => ("none".to_string(), "none"),
        (None, _) => ("unknown".to_string(), "unknown"),
    };
    AuthzLabels {
        policy,
        policy_kind,
        action: match count.action {
            Action::Allow => "allow",
            Action::Deny => "deny",
            Action::Unknown(_) => "unknown",
        },
        reason: match count.reason {
            Reason::NoAllowPolicy => "no_allow_policy",
            Reason::AllowMatched => "allow_matched",
            Reason::DenyMatched => "deny_matched",
            Reason::NoAllowMatched => "no_allow_matched",
            Reason::StrictMtls => "strict_mtls",
            Reason::Uncompilable => "uncompilable",
            Reason::NoVerdict => "no_verdict",
            Reason::Unknown(_) => "unknown",
        },
    }
}

fn policy_kind(kind: PolicyKind) -> &'static str {
    match kind {
        PolicyKind::AuthorizationPolicy => "AuthorizationPolicy",
        PolicyKind::PeerAuthentication => "PeerAuthentication",
        PolicyKind::Unknown(_) => "unknown",
    }
}

/// Reads the kernel maps for a scrape; a map that cannot be read is logged and left out.
fn read_kernel(status: &SharedStatus, maps: &Maps, events: Option<&EventMetrics>) -> KernelCounts {
    let names = status
        .lock()
        .map(|s| s.authz_policies.clone())
        .unwrap_or_default();
    let counters = maps
        .counters
        .read()
        .inspect_err(|e| warn!(error = %e, "metrics: reading the counters"))
        .ok();
    let authz = maps
        .authz_counters
        .read(&names)
        .inspect_err(|e| warn!(error = %e, "metrics: reading the authorization counters"))
        .ok();
    let events_dropped = events.and_then(|e| {
        e.dropped
            .read()
            .inspect_err(|e| warn!(error = %e, "metrics: reading the events drop counters"))
            .ok()
    });
    KernelCounts {
        counters,
        authz,
        events: events.and_then(|e| e.stats.as_ref()).map(|s| s.counts()),
        events_dropped,
    }
}

/// Serves the metrics on every path until the process exits.
pub async fn serve(
    listener: TcpListener,
    status: SharedStatus,
    maps: Maps,
    limits: Limits,
    events: Option<EventMetrics>,
) {
    info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "metrics server listening");
    let limits = Arc::new(limits);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                warn!(error = %e, "metrics accept failed");
                continue;
            }
        };
        let (status, maps, limits) = (status.clone(), maps.clone(), limits.clone());
        let events = events.clone();
        tokio::spawn(async move {
            let service = service_fn(move |_req| {
                let kernel = read_kernel(&status, &maps, events.as_ref());
                let body = match status.lock() {
                    Ok(s) => render(&s, &limits, &kernel),
                    Err(p) => render(&p.into_inner(), &limits, &kernel),
                };
                let response = Response::builder()
                    .status(StatusCode::OK)
                    .header(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )
                    .body(Full::new(Bytes::from(body)))
                    .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())));
                async move { Ok::<_, Infallible>(response) }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                warn!(error = %e, "metrics connection failed");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        agent::{Counts, LiveSnapshot},
        authz_counters::PolicyName,
    };

    fn lines_of<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
        text.lines().filter(|l| l.starts_with(name)).collect()
    }

    #[test]
    fn a_live_snapshot_its_tables_and_refusals() {
        let mut status = Status {
            applied: 3,
            unchanged: 1,
            enrolled_netns: 2,
            ..Status::default()
        };
        status.live = Some(LiveSnapshot {
            generation: 42,
            counts: Some(Counts {
                services: 5,
                endpoints: 9,
                ..Counts::default()
            }),
            ..LiveSnapshot::default()
        });
        status.refused_by_kind.insert(RefusalKind::OverCapacity, 2);
        status.apply_durations.observe_micros(700);
        let limits = Limits {
            max_services: 100,
            ..Limits::default()
        };
        let text = render(&status, &limits, &KernelCounts::default());
        assert_eq!(
            lines_of(&text, "kmesh_live_generation "),
            ["kmesh_live_generation 42"]
        );
        assert_eq!(
            lines_of(&text, "kmesh_snapshots_applied_total"),
            ["kmesh_snapshots_applied_total 3"]
        );
        assert!(
            text.contains("kmesh_map_entries{table=\"services\"} 5\n"),
            "{text}"
        );
        assert!(
            text.contains("kmesh_map_capacity{table=\"services\"} 100\n"),
            "{text}"
        );
        assert!(
            text.contains("kmesh_map_entries{table=\"endpoints\"} 9\n"),
            "{text}"
        );
        assert!(text.contains("kmesh_snapshots_refused_total{reason=\"over_capacity\"} 2\n"));
        // Every reason is present, zero or not, so a rate() has a series before the first refusal.
        assert_eq!(
            lines_of(&text, "kmesh_snapshots_refused_total{").len(),
            RefusalKind::ALL.len()
        );
        assert!(
            text.contains("kmesh_snapshot_apply_duration_seconds_bucket{le=\"0.001\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("kmesh_snapshot_apply_duration_seconds_bucket{le=\"0.0005\"} 0\n"),
            "{text}"
        );
        assert_eq!(
            lines_of(&text, "kmesh_enrolled_netns "),
            ["kmesh_enrolled_netns 2"]
        );
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn authorization_counts_are_summed_per_policy_not_per_workload() {
        let named = |name: &str| {
            Some(PolicyName {
                name: name.to_string(),
                kind: PolicyKind::AuthorizationPolicy,
            })
        };
        let count = |ip: [u8; 4], policy, name, action, reason, connections| AuthzCount {
            workload_ip: ip.into(),
            policy,
            policy_name: name,
            action,
            reason,
            connections,
        };
        let kernel = KernelCounts {
            counters: None,
            authz: Some(vec![
                count(
                    [10, 0, 0, 1],
                    7,
                    named("web/deny-bob"),
                    Action::Deny,
                    Reason::DenyMatched,
                    3,
                ),
                count(
                    [10, 0, 0, 2],
                    7,
                    named("web/deny-bob"),
                    Action::Deny,
                    Reason::DenyMatched,
                    4,
                ),
                count(
                    [10, 0, 0, 1],
                    0,
                    None,
                    Action::Allow,
                    Reason::NoAllowPolicy,
                    5,
                ),
                count(
                    [10, 0, 0, 1],
                    9,
                    None,
                    Action::Allow,
                    Reason::AllowMatched,
                    1,
                ),
            ]),
            ..KernelCounts::default()
        };
        let text = render(&Status::default(), &Limits::default(), &kernel);
        let mut series = lines_of(&text, "kmesh_authz_connections_total{");
        series.sort_unstable();
        assert_eq!(
            series,
            [
                "kmesh_authz_connections_total{policy=\"none\",policy_kind=\"none\",action=\"allow\",reason=\"no_allow_policy\"} 5",
                "kmesh_authz_connections_total{policy=\"unknown\",policy_kind=\"unknown\",action=\"allow\",reason=\"allow_matched\"} 1",
                "kmesh_authz_connections_total{policy=\"web/deny-bob\",policy_kind=\"AuthorizationPolicy\",action=\"deny\",reason=\"deny_matched\"} 7",
            ],
            "{text}"
        );
        assert!(!text.contains("10.0.0."), "no address becomes a label");
    }

    #[test]
    fn connection_events_per_outcome_and_drops_per_reason() {
        let kernel = KernelCounts {
            events: Some(EventCounts {
                closed: 1,
                reset: 2,
                connect_failed: 3,
                no_endpoint: 4,
                denied: 5,
                invalid: 6,
            }),
            events_dropped: Some(Dropped {
                ring_full: 7,
                no_storage: 8,
            }),
            ..KernelCounts::default()
        };
        let text = render(&Status::default(), &Limits::default(), &kernel);
        let mut series = lines_of(&text, "kmesh_events_total{");
        series.extend(lines_of(&text, "kmesh_events_dropped_total{"));
        series.sort_unstable();
        assert_eq!(
            series,
            [
                "kmesh_events_dropped_total{reason=\"no_storage\"} 8",
                "kmesh_events_dropped_total{reason=\"ring_full\"} 7",
                "kmesh_events_total{outcome=\"closed\"} 1",
                "kmesh_events_total{outcome=\"connect_failed\"} 3",
                "kmesh_events_total{outcome=\"denied\"} 5",
                "kmesh_events_total{outcome=\"invalid\"} 6",
                "kmesh_events_total{outcome=\"no_endpoint\"} 4",
                "kmesh_events_total{outcome=\"reset\"} 2",
            ],
            "{text}"
        );
        // An agent that does not read the ring shows no read counts, but still the drops.
        let text = render(
            &Status::default(),
            &Limits::default(),
            &KernelCounts {
                events: None,
                ..kernel
            },
        );
        assert!(lines_of(&text, "kmesh_events_total").is_empty(), "{text}");
        assert_eq!(lines_of(&text, "kmesh_events_dropped_total{").len(), 2);
    }
}
