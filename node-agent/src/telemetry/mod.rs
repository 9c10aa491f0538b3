//! Telemetry from finished connections: Istio's TCP metrics (`istio_tcp_*`, with Istio's standard
//! labels) and the access log.
//!
//! The entry point is [`Telemetry::record`]: whoever turns the kernel's events into
//! [`Connection`]s (the event reader) calls it once per connection, with the live snapshot's
//! names. It is cheap (a label lookup and four additions under a mutex, plus one line written when
//! the access log is on), never blocks on the network, and is safe from any thread. The metrics
//! server renders the counters on each scrape ([`Telemetry::encode`], called from
//! `metrics::render`); the access log is switched by the live snapshot (`live_config.rs`).
//!
//! One file per concern: [`labels`] (Istio's label set and response flags), [`istio_metrics`]
//! (the counters and their cap), [`access_log`] (the line and its two formats), [`live_config`]
//! (the switch following the live generation), [`live_names`] (the live snapshot's names for the
//! reader thread, and [`Recorder`], what the reader's sink calls: `recorder.record(&connection)`).
pub mod access_log;
pub mod istio_metrics;
pub mod labels;
pub mod live_config;
pub mod live_names;

use std::{
    io::Write,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::SystemTime,
};

use prometheus_client::{
    encoding::text::encode_registry, metrics::counter::Counter, registry::Registry,
};

use crate::connection::{Connection, NameLookup};
pub use access_log::{AccessLog, AccessLogEntry, AccessLogFormat};
pub use istio_metrics::{DEFAULT_MAX_SERIES, TcpMetrics, TcpTotals};
pub use labels::{Reporter, ResponseFlags, TrafficLabels};
pub use live_config::follow_live_config;
pub use live_names::{LiveNames, NoNames, Recorder, SharedNames};

/// The agent's telemetry settings (its flags).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TelemetrySettings {
    /// `--access-log-format`.
    pub access_log_format: AccessLogFormat,
    /// `--max-telemetry-series`: label sets of the `istio_tcp_*` metrics kept.
    pub max_series: usize,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        TelemetrySettings {
            access_log_format: AccessLogFormat::Json,
            max_series: DEFAULT_MAX_SERIES,
        }
    }
}

/// Where access-log lines go: the agent's standard output, or a test's buffer.
pub type AccessLogOutput = Box<dyn Write + Send>;

struct Inner {
    metrics: TcpMetrics,
    format: AccessLogFormat,
    access_log: AtomicBool,
    output: Mutex<AccessLogOutput>,
    /// Lines that could not be written (the output failed).
    access_log_errors: AtomicU64,
    clock: fn() -> SystemTime,
}

/// The counters and the access-log switch. A clone shares them (the event reader records, the
/// metrics server renders, the live-config follower switches).
#[derive(Clone)]
pub struct Telemetry(Arc<Inner>);

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry::new(TelemetrySettings::default())
    }
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("format", &self.0.format)
            .field("access_log", &self.access_log())
            .field("series", &self.0.metrics.series_count())
            .finish_non_exhaustive()
    }
}

impl Telemetry {
    /// Telemetry writing its access log to standard output; the access log starts off (the live
    /// snapshot switches it on).
    pub fn new(settings: TelemetrySettings) -> Telemetry {
        Telemetry::with_output(settings, Box::new(std::io::stdout()), SystemTime::now)
    }

    /// Telemetry writing its access log to `output`, with `clock` telling when a connection
    /// closed (tests pass a buffer and a fixed clock).
    pub fn with_output(
        settings: TelemetrySettings,
        output: AccessLogOutput,
        clock: fn() -> SystemTime,
    ) -> Telemetry {
        Telemetry(Arc::new(Inner {
            metrics: TcpMetrics::new(settings.max_series),
            format: settings.access_log_format,
            access_log: AtomicBool::new(false),
            output: Mutex::new(output),
            access_log_errors: AtomicU64::new(0),
            clock,
        }))
    }

    /// Reports one finished connection: counts it in Istio's TCP metrics and, when the access log
    /// is on, writes its line. `names` are the live snapshot's.
    pub fn record(&self, connection: &Connection, names: &dyn NameLookup) {
        let closed_at = (self.0.clock)();
        self.0
            .metrics
            .record(TrafficLabels::of(connection, names), connection);
        if self.access_log() == AccessLog::On {
            let entry = AccessLogEntry::new(connection, names, closed_at);
            self.write_line(&entry.line(self.0.format));
        }
    }

    fn write_line(&self, line: &str) {
        let mut output = self.0.output.lock().unwrap_or_else(|p| p.into_inner());
        let written = output
            .write_all(line.as_bytes())
            .and_then(|()| output.write_all(b"\n"))
            .and_then(|()| output.flush());
        if written.is_err() {
            self.0.access_log_errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Switches the access log; returns the setting before.
    pub fn set_access_log(&self, setting: AccessLog) -> AccessLog {
        let before = self
            .0
            .access_log
            .swap(setting == AccessLog::On, Ordering::Relaxed);
        if before {
            AccessLog::On
        } else {
            AccessLog::Off
        }
    }

    pub fn access_log(&self) -> AccessLog {
        if self.0.access_log.load(Ordering::Relaxed) {
            AccessLog::On
        } else {
            AccessLog::Off
        }
    }

    /// The counters (for tests and the debug endpoints).
    pub fn metrics(&self) -> &TcpMetrics {
        &self.0.metrics
    }

    /// Appends the telemetry metrics to a scrape's text (before its `# EOF`): Istio's
    /// `istio_tcp_*` under their own names, `kmesh_telemetry_*` for the cap and the access log.
    pub fn encode(&self, out: &mut String) {
        let mut istio = Registry::default();
        let mut kmesh = Registry::with_prefix("kmesh");
        self.0.metrics.register(&mut istio, &mut kmesh);
        let errors = Counter::<u64>::default();
        errors.inc_by(self.0.access_log_errors.load(Ordering::Relaxed));
        kmesh.register(
            "telemetry_access_log_errors",
            "Access-log lines that could not be written to standard output",
            errors,
        );
        // Writing to a String cannot fail.
        let _ = encode_registry(out, &istio);
        let _ = encode_registry(out, &kmesh);
    }
}

#[cfg(test)]
mod fake_names;
#[cfg(test)]
mod tests;
