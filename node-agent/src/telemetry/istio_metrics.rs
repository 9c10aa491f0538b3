//! Istio's four TCP counters per label set (`istio_tcp_connections_opened_total`,
//! `..._closed_total`, `istio_tcp_sent_bytes_total`, `istio_tcp_received_bytes_total`), kept
//! between scrapes, bounded in the number of label sets.
//!
//! Semantics, as Istio's (and where the kernel makes them differ, said here):
//! - The kernel reports a connection once, when it ends: a connection counts as opened and closed
//!   together, at its end. A long connection shows in the counters only when it closes (Istio 1.29
//!   does the same; earlier sidecars counted the open at once and the bytes as they flowed).
//! - A connection never established (`UF`, `UH`, `DENY`) counts as opened and closed with its
//!   flag, as ztunnel counts a denied one.
//! - Bytes follow Istio's definitions, which are the server's point of view whoever reports
//!   (istio/istio#32399, ztunnel's "Istio flips the metric for source"):
//!   `istio_tcp_received_bytes_total` counts the bytes the client sent to the server (the
//!   request), `istio_tcp_sent_bytes_total` the bytes the server sent back (the response). So on
//!   `reporter="source"` the client's own sent bytes are `received_bytes`.
//!
//! Memory is bounded: at most `max_series` label sets; a connection whose label set would be a
//! new one past that is not counted, and counted in `kmesh_telemetry_series_dropped_total`.
use std::{
    collections::HashMap,
    hash::{Hash, Hasher},
    sync::{Arc, Mutex},
};

use prometheus_client::{
    encoding::{EncodeLabelSet, LabelSetEncoder},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use super::labels::TrafficLabels;
use crate::connection::{Connection, Direction};

/// Label sets kept by default (`--max-telemetry-series`): each is four Prometheus series.
pub const DEFAULT_MAX_SERIES: usize = 10_000;

/// The four counters of one label set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpTotals {
    pub opened: u64,
    pub closed: u64,
    /// Istio's `sent_bytes`: server to client.
    pub sent_bytes: u64,
    /// Istio's `received_bytes`: client to server.
    pub received_bytes: u64,
}

impl TcpTotals {
    fn add(&mut self, connection: &Connection) {
        self.opened += 1;
        self.closed += 1;
        let (to_server, to_client) = request_and_response_bytes(connection);
        self.received_bytes += to_server;
        self.sent_bytes += to_client;
    }
}

/// The bytes the client sent to the server and the bytes the server sent back, from the
/// reporting workload's own counts (it is the client when outbound, the server when inbound).
pub fn request_and_response_bytes(connection: &Connection) -> (u64, u64) {
    match connection.direction {
        Direction::Outbound => (connection.bytes_sent, connection.bytes_received),
        Direction::Inbound => (connection.bytes_received, connection.bytes_sent),
    }
}

/// A label set shared by the four families of a scrape (one copy of the strings).
#[derive(Clone, Debug)]
struct SharedLabels(Arc<TrafficLabels>);

impl PartialEq for SharedLabels {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}
impl Eq for SharedLabels {}
impl Hash for SharedLabels {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}
impl EncodeLabelSet for SharedLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        self.0.encode(encoder)
    }
}

#[derive(Debug, Default)]
struct Series {
    totals: HashMap<Arc<TrafficLabels>, TcpTotals>,
    /// Connections not counted: their label set would have been one past the cap.
    dropped: u64,
}

/// The counters, shared by the thread that records and the server that renders.
#[derive(Debug)]
pub struct TcpMetrics {
    max_series: usize,
    series: Mutex<Series>,
}

impl TcpMetrics {
    pub fn new(max_series: usize) -> TcpMetrics {
        TcpMetrics {
            max_series,
            series: Mutex::default(),
        }
    }

    /// Counts `connection` under `labels`; `false` when it was dropped (a new label set over the
    /// cap).
    pub fn record(&self, labels: TrafficLabels, connection: &Connection) -> bool {
        let mut series = self.lock();
        if let Some(totals) = series.totals.get_mut(&labels) {
            totals.add(connection);
            return true;
        }
        if series.totals.len() >= self.max_series {
            series.dropped += 1;
            return false;
        }
        series
            .totals
            .entry(Arc::new(labels))
            .or_default()
            .add(connection);
        true
    }

    /// The totals of one label set (for tests).
    pub fn totals(&self, labels: &TrafficLabels) -> Option<TcpTotals> {
        self.lock().totals.get(labels).copied()
    }

    /// Label sets kept.
    pub fn series_count(&self) -> usize {
        self.lock().totals.len()
    }

    pub fn dropped(&self) -> u64 {
        self.lock().dropped
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Series> {
        // A panic while counting leaves counts that are still the best there are.
        self.series.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers Istio's counters (no prefix: their names are Istio's) in `istio`, and the cap's
    /// own metrics in `kmesh` (prefixed `kmesh_`).
    pub fn register(&self, istio: &mut Registry, kmesh: &mut Registry) {
        let opened = Family::<SharedLabels, Counter>::default();
        let closed = Family::<SharedLabels, Counter>::default();
        let sent = Family::<SharedLabels, Counter>::default();
        let received = Family::<SharedLabels, Counter>::default();
        let series = self.lock();
        for (labels, totals) in &series.totals {
            let labels = SharedLabels(labels.clone());
            opened.get_or_create(&labels).inc_by(totals.opened);
            closed.get_or_create(&labels).inc_by(totals.closed);
            sent.get_or_create(&labels).inc_by(totals.sent_bytes);
            received
                .get_or_create(&labels)
                .inc_by(totals.received_bytes);
        }
        istio.register(
            "istio_tcp_connections_opened",
            "TCP connections opened (counted when the kernel reports them, at their close)",
            opened,
        );
        istio.register(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            closed,
        );
        istio.register(
            "istio_tcp_sent_bytes",
            "Bytes the server sent to the client (the response), as Istio counts them",
            sent,
        );
        istio.register(
            "istio_tcp_received_bytes",
            "Bytes the client sent to the server (the request), as Istio counts them",
            received,
        );
        let kept = Gauge::<i64>::default();
        kept.set(series.totals.len() as i64);
        kmesh.register(
            "telemetry_series",
            "Label sets of the istio_tcp_* metrics kept (at most --max-telemetry-series)",
            kept,
        );
        let dropped = Counter::<u64>::default();
        dropped.inc_by(series.dropped);
        kmesh.register(
            "telemetry_series_dropped",
            "Connections left out of the istio_tcp_* metrics: their label set would have been \
             one past --max-telemetry-series",
            dropped,
        );
    }
}
