//! The waypoint's metrics, in Prometheus text through `prometheus-client` (the node agent's
//! library and version). It owns their names, labels and buckets and promises Istio's own names
//! and standard labels for requests and TCP connections, so that Istio's dashboards read a
//! waypoint of kmesh-rs as they read Istio's (`reporter="waypoint"`, as ambient's waypoint
//! reports):
//! - `istio_requests_total` and `istio_request_duration_milliseconds` (Istio's buckets), one
//!   observation per request, taken when the response's head is sent (the body's time is not in
//!   the duration: a streamed body may last as long as the client reads it);
//! - `istio_tcp_connections_opened_total` when the upstream connection is made,
//!   `istio_tcp_connections_closed_total` and the bytes when it ends (`received`: client to
//!   server, `sent`: server to client, as Istio's definitions);
//! - the waypoint's own: configurations adopted and refused (by reason), and connections closed
//!   before any proxying (by reason: no origin, an unknown service port, ...).
//!
//! Every label value comes from the configuration's names or a fixed set (a status code, a flag):
//! no address, path or header value becomes a label, so the series are bounded by the
//! configuration, not by the traffic. A name the configuration lacks is `unknown`, as Istio writes.
use std::fmt::Write as _;

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::{
    identity::Principal,
    table::{RouteTable, ServiceInfo},
};

/// Istio's value for a name it does not know.
pub const UNKNOWN: &str = "unknown";

/// Istio's default buckets of `istio_request_duration_milliseconds`.
pub const DURATION_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// Envoy's response flags that the waypoint sets, as a set (a request may have several:
/// `DI,UF,URX`).
#[derive(Clone, Copy, Debug, Default, Hash, PartialEq, Eq)]
pub struct ResponseFlags(u16);

impl ResponseFlags {
    /// `NR`: no route matched.
    pub const NO_ROUTE: ResponseFlags = ResponseFlags(1);
    /// `UH`: no healthy upstream (a cluster without endpoints).
    pub const NO_HEALTHY_UPSTREAM: ResponseFlags = ResponseFlags(1 << 1);
    /// `UF`: the upstream connection failed.
    pub const UPSTREAM_CONNECT_FAILURE: ResponseFlags = ResponseFlags(1 << 2);
    /// `UR`: the upstream reset the connection or stream before answering.
    pub const UPSTREAM_RESET: ResponseFlags = ResponseFlags(1 << 3);
    /// `UT`: the upstream did not answer in time.
    pub const UPSTREAM_TIMEOUT: ResponseFlags = ResponseFlags(1 << 4);
    /// `DI`: fault injection delayed the request.
    pub const DELAY_INJECTED: ResponseFlags = ResponseFlags(1 << 5);
    /// `FI`: fault injection answered it.
    pub const FAULT_INJECTED: ResponseFlags = ResponseFlags(1 << 6);
    /// `URX`: the answer is the last try's, every retry spent.
    pub const RETRIES_EXHAUSTED: ResponseFlags = ResponseFlags(1 << 7);

    const NAMES: [(ResponseFlags, &'static str); 8] = [
        (ResponseFlags::NO_ROUTE, "NR"),
        (ResponseFlags::NO_HEALTHY_UPSTREAM, "UH"),
        (ResponseFlags::UPSTREAM_CONNECT_FAILURE, "UF"),
        (ResponseFlags::UPSTREAM_RESET, "UR"),
        (ResponseFlags::UPSTREAM_TIMEOUT, "UT"),
        (ResponseFlags::DELAY_INJECTED, "DI"),
        (ResponseFlags::FAULT_INJECTED, "FI"),
        (ResponseFlags::RETRIES_EXHAUSTED, "URX"),
    ];

    pub fn contains(self, other: ResponseFlags) -> bool {
        self.0 & other.0 == other.0 && other.0 != 0
    }

    pub fn insert(&mut self, other: ResponseFlags) {
        self.0 |= other.0;
    }

    /// `-` for none, else the flags joined with `,` in Envoy's order.
    pub fn as_string(self) -> String {
        let mut out = String::new();
        for (flag, name) in ResponseFlags::NAMES {
            if self.contains(flag) {
                if !out.is_empty() {
                    out.push(',');
                }
                out.push_str(name);
            }
        }
        if out.is_empty() {
            out.push('-');
        }
        out
    }
}

impl std::ops::BitOr for ResponseFlags {
    type Output = ResponseFlags;
    fn bitor(self, other: ResponseFlags) -> ResponseFlags {
        ResponseFlags(self.0 | other.0)
    }
}

impl EncodeLabelValue for ResponseFlags {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(&self.as_string())
    }
}

/// Istio's `request_protocol`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum RequestProtocol {
    http,
    grpc,
}

/// The `source_*` labels: the client's workload, as the configuration names it.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Peer {
    pub workload: String,
    pub namespace: String,
    pub principal: String,
}

impl Peer {
    pub fn unknown() -> Peer {
        Peer {
            workload: UNKNOWN.into(),
            namespace: UNKNOWN.into(),
            principal: UNKNOWN.into(),
        }
    }

    /// The workload at `address` (a client or an endpoint), as `table` knows it: Istio's
    /// `source_workload` is the pod's controller (a Deployment's name), as the operator names it.
    pub fn at(table: &RouteTable, address: std::net::IpAddr) -> Peer {
        match table.workload(address) {
            Some(w) => Peer {
                workload: w.workload_name().to_string(),
                namespace: w.namespace.clone(),
                principal: Principal::of(table.trust_domain(), w).spiffe_id(),
            },
            None => Peer::unknown(),
        }
    }
}

/// The `destination_service*` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct ServiceLabels {
    pub host: String,
    pub name: String,
    pub namespace: String,
}

impl ServiceLabels {
    pub fn of(service: &ServiceInfo) -> ServiceLabels {
        ServiceLabels {
            host: service.hostname.clone(),
            name: service.name.clone(),
            namespace: service.namespace.clone(),
        }
    }
}

/// Istio's standard request labels (those this waypoint knows; the canonical service and
/// revision, app, version and cluster labels are not in its configuration).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    pub request_protocol: RequestProtocol,
    pub response_code: u16,
    pub response_flags: ResponseFlags,
    pub connection_security_policy: &'static str,
}

/// Istio's standard TCP labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    pub response_flags: ResponseFlags,
    pub connection_security_policy: &'static str,
}

/// The request counter and duration histogram of one label set: what a request adds to, held so
/// that the next request with the same labels adds to them without building and hashing the
/// labels again (a connection's requests mostly share them: [`crate::http_proxy`] keeps the last
/// one per connection).
#[derive(Clone, Debug)]
pub struct RequestSeries {
    count: Counter,
    duration: Histogram,
}

impl RequestSeries {
    /// The series of `report`'s labels, made if new.
    pub fn of(metrics: &Metrics, report: RequestReport) -> RequestSeries {
        let labels = Metrics::request_labels(report);
        RequestSeries {
            count: metrics.requests.get_or_create(&labels).clone(),
            duration: metrics.durations.get_or_create(&labels).clone(),
        }
    }

    /// Counts a request and observes its duration.
    pub fn observe(&self, duration: std::time::Duration) {
        self.count.inc();
        self.duration.observe(duration.as_secs_f64() * 1000.0);
    }
}

/// One request's labels, before they become [`RequestLabels`].
#[derive(Clone, Debug)]
pub struct RequestReport {
    pub source: Peer,
    pub destination: Peer,
    pub service: ServiceLabels,
    pub protocol: RequestProtocol,
    pub status: u16,
    pub flags: ResponseFlags,
}

/// Why a configuration was refused (`reason` of `kmesh_waypoint_configs_refused_total`).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum RefusedReason {
    /// Not JSON of this format, too large, or another version.
    parse,
    /// The configuration's validation refused it.
    invalid,
    /// The route table refused it (a regex that does not compile, an unusable value).
    table,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabel {
    reason: RefusedReason,
}

/// Why a connection was closed before it was proxied.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum ConnectionRefusal {
    /// Its SYN carried no origin: the kernel did not steer it.
    no_origin,
    /// Its origin could not be read.
    origin_error,
    /// No configuration is loaded yet.
    no_configuration,
    /// The service port it was going to is not served here.
    unknown_service_port,
    /// A TCP connection on a port without TCP destinations, or to a cluster without endpoints.
    no_tcp_destination,
    /// A TCP connection an AuthorizationPolicy denies (`authz`).
    authz_denied,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabel {
    reason: ConnectionRefusal,
}

/// What a request to the operator came to (`code` of `kmesh_waypoint_operator_requests_total`).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum OperatorOutcome {
    /// `200`: a configuration.
    Ok,
    /// `304`: unchanged within the wait.
    NotModified,
    /// `404`: no configuration for this waypoint.
    NotFound,
    /// Another status (401, 403, 503, ...).
    Other,
    /// No answer (connection, TLS, timeout, token file, body).
    Error,
}

impl OperatorOutcome {
    pub fn label(self) -> &'static str {
        match self {
            OperatorOutcome::Ok => "200",
            OperatorOutcome::NotModified => "304",
            OperatorOutcome::NotFound => "404",
            OperatorOutcome::Other => "other",
            OperatorOutcome::Error => "error",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperatorLabel {
    code: &'static str,
}

/// The metrics, cheap to clone (every family is shared).
#[derive(Clone)]
pub struct Metrics {
    requests: Family<RequestLabels, Counter>,
    durations: Family<RequestLabels, Histogram, fn() -> Histogram>,
    tcp_opened: Family<TcpLabels, Counter>,
    tcp_closed: Family<TcpLabels, Counter>,
    tcp_sent: Family<TcpLabels, Counter>,
    tcp_received: Family<TcpLabels, Counter>,
    configs_adopted: Counter,
    configs_refused: Family<RefusedLabel, Counter>,
    connections_refused: Family<RefusalLabel, Counter>,
    config_loaded: Gauge,
    config_adopted_at: Gauge,
    operator_requests: Family<OperatorLabel, Counter>,
    registry: std::sync::Arc<Registry>,
}

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS_MS)
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let durations = Family::<RequestLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            duration_histogram,
        );
        let tcp_opened = Family::<TcpLabels, Counter>::default();
        let tcp_closed = Family::<TcpLabels, Counter>::default();
        let tcp_sent = Family::<TcpLabels, Counter>::default();
        let tcp_received = Family::<TcpLabels, Counter>::default();
        let configs_adopted = Counter::default();
        let configs_refused = Family::default();
        let connections_refused = Family::default();
        let config_loaded = Gauge::default();
        let config_adopted_at = Gauge::default();
        let operator_requests = Family::default();
        registry.register("istio_requests", "Requests", requests.clone());
        registry.register(
            "istio_request_duration_milliseconds",
            "Request duration, to the response's head",
            durations.clone(),
        );
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened",
            tcp_opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            tcp_closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes the server sent to the client",
            tcp_sent.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes the client sent to the server",
            tcp_received.clone(),
        );
        registry.register(
            "kmesh_waypoint_configs_adopted",
            "Configurations adopted",
            configs_adopted.clone(),
        );
        registry.register(
            "kmesh_waypoint_configs_refused",
            "Configurations refused (the last good one kept)",
            configs_refused.clone(),
        );
        registry.register(
            "kmesh_waypoint_connections_refused",
            "Connections closed before proxying",
            connections_refused.clone(),
        );
        registry.register(
            "kmesh_waypoint_config_loaded",
            "1 once a configuration is loaded",
            config_loaded.clone(),
        );
        registry.register(
            "kmesh_waypoint_config_adopted_timestamp_seconds",
            "When the current configuration was adopted (Unix time)",
            config_adopted_at.clone(),
        );
        registry.register(
            "kmesh_waypoint_operator_requests",
            "Requests to the operator for the configuration, by answer",
            operator_requests.clone(),
        );
        Metrics {
            requests,
            durations,
            tcp_opened,
            tcp_closed,
            tcp_sent,
            tcp_received,
            configs_adopted,
            configs_refused,
            connections_refused,
            config_loaded,
            config_adopted_at,
            operator_requests,
            registry: std::sync::Arc::new(registry),
        }
    }

    /// Counts a request and observes its duration.
    pub fn request(&self, report: RequestReport, duration: std::time::Duration) {
        RequestSeries::of(self, report).observe(duration);
    }

    fn request_labels(report: RequestReport) -> RequestLabels {
        RequestLabels {
            reporter: "waypoint",
            source_workload: report.source.workload,
            source_workload_namespace: report.source.namespace,
            source_principal: report.source.principal,
            destination_workload: report.destination.workload,
            destination_workload_namespace: report.destination.namespace,
            destination_principal: report.destination.principal,
            destination_service: report.service.host,
            destination_service_name: report.service.name,
            destination_service_namespace: report.service.namespace,
            request_protocol: report.protocol,
            response_code: report.status,
            response_flags: report.flags,
            connection_security_policy: "none",
        }
    }

    pub fn tcp_labels(
        source: Peer,
        destination: Peer,
        service: ServiceLabels,
        flags: ResponseFlags,
    ) -> TcpLabels {
        TcpLabels {
            reporter: "waypoint",
            source_workload: source.workload,
            source_workload_namespace: source.namespace,
            source_principal: source.principal,
            destination_workload: destination.workload,
            destination_workload_namespace: destination.namespace,
            destination_principal: destination.principal,
            destination_service: service.host,
            destination_service_name: service.name,
            destination_service_namespace: service.namespace,
            response_flags: flags,
            connection_security_policy: "none",
        }
    }

    pub fn tcp_opened(&self, labels: &TcpLabels) {
        self.tcp_opened.get_or_create(labels).inc();
    }

    /// A TCP connection ended, with the bytes each way.
    pub fn tcp_closed(&self, labels: &TcpLabels, client_to_server: u64, server_to_client: u64) {
        self.tcp_closed.get_or_create(labels).inc();
        self.tcp_received
            .get_or_create(labels)
            .inc_by(client_to_server);
        self.tcp_sent.get_or_create(labels).inc_by(server_to_client);
    }

    pub fn config_adopted(&self) {
        self.configs_adopted.inc();
        self.config_loaded.set(1);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.config_adopted_at
            .set(i64::try_from(now).unwrap_or(i64::MAX));
    }

    pub fn operator_request(&self, outcome: OperatorOutcome) {
        self.operator_requests
            .get_or_create(&OperatorLabel {
                code: outcome.label(),
            })
            .inc();
    }

    /// Requests to the operator so far that came to `outcome`.
    pub fn operator_requests(&self, outcome: OperatorOutcome) -> u64 {
        self.operator_requests
            .get_or_create(&OperatorLabel {
                code: outcome.label(),
            })
            .get()
    }

    pub fn config_refused(&self, reason: RefusedReason) {
        self.configs_refused
            .get_or_create(&RefusedLabel { reason })
            .inc();
    }

    pub fn connection_refused(&self, reason: ConnectionRefusal) {
        self.connections_refused
            .get_or_create(&RefusalLabel { reason })
            .inc();
    }

    /// Configurations refused so far, every reason.
    pub fn configs_refused_total(&self) -> u64 {
        [
            RefusedReason::parse,
            RefusedReason::invalid,
            RefusedReason::table,
        ]
        .into_iter()
        .map(|reason| {
            self.configs_refused
                .get_or_create(&RefusedLabel { reason })
                .get()
        })
        .sum()
    }

    /// Connections refused so far for `reason`.
    pub fn connections_refused_total(&self, reason: ConnectionRefusal) -> u64 {
        self.connections_refused
            .get_or_create(&RefusalLabel { reason })
            .get()
    }

    /// Everything, in Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail; an encoder error would leave a partial page.
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            let _ = writeln!(out, "# encoding failed");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_are_envoys_spelling() {
        assert_eq!(ResponseFlags::default().as_string(), "-");
        assert_eq!(ResponseFlags::NO_ROUTE.as_string(), "NR");
        let flags = ResponseFlags::DELAY_INJECTED
            | ResponseFlags::UPSTREAM_CONNECT_FAILURE
            | ResponseFlags::RETRIES_EXHAUSTED;
        assert_eq!(flags.as_string(), "UF,DI,URX");
    }

    #[test]
    fn metrics_render_with_istio_names() {
        let metrics = Metrics::new();
        let report = RequestReport {
            source: Peer::unknown(),
            destination: Peer::unknown(),
            service: ServiceLabels {
                host: "reviews.default.svc.cluster.local".into(),
                name: "reviews".into(),
                namespace: "default".into(),
            },
            protocol: RequestProtocol::http,
            status: 404,
            flags: ResponseFlags::NO_ROUTE,
        };
        metrics.request(report, std::time::Duration::from_millis(3));
        metrics.config_refused(RefusedReason::table);
        let text = metrics.render();
        assert!(
            text.contains("istio_requests_total{reporter=\"waypoint\""),
            "{text}"
        );
        assert!(
            text.contains("response_code=\"404\",response_flags=\"NR\""),
            "{text}"
        );
        assert!(
            text.contains("istio_request_duration_milliseconds_bucket{"),
            "{text}"
        );
        assert!(
            text.contains("kmesh_waypoint_configs_refused_total{reason=\"table\"} 1"),
            "{text}"
        );
        assert_eq!(metrics.configs_refused_total(), 1);
    }
}
