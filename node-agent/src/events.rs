//! The kernel's connection events in user space: reading the `KM_EVENTS` ring buffer, decoding each
//! `kmesh_common::ConnEvent` into a [`Connection`], and handing it to a sink.
//!
//! The interface for consumers (telemetry) is [`ConnectionSink`]: one call per finished connection,
//! in ring order, on the reader's own thread ([`EventReader::spawn`]). A sink must not block for
//! long: while it runs the ring fills, and what does not fit is dropped by the kernel and counted
//! (traffic is never held up or changed by a slow reader). `std::sync::mpsc::Sender<Connection>`
//! is a sink, for a consumer on another thread.
//!
//! Counted here: events per outcome and records that did not decode ([`EventStats`]); counted by
//! the kernel: events lost to a full ring or a socket whose storage could not be allocated
//! ([`DroppedCounter`]). `metrics.rs` exposes both.
//!
//! The ring keeps events while no agent reads it (it is pinned with the layout's maps); what an
//! agent finds there at start is read like the rest.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsRawFd as _,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::Duration,
};

use aya::maps::{Map, MapData, PerCpuArray, RingBuf};
use kmesh_common::{
    ConnEvent,
    events::{direction, events_dropped, outcome},
    map_names,
};
use tracing::{info, warn};

use crate::{
    connection::{Connection, Direction, Outcome},
    loader::{Installation, LoaderError},
};

/// Where decoded connections go. Called on the reader thread, once per connection.
pub trait ConnectionSink: Send + 'static {
    fn connection(&mut self, connection: Connection);
}

impl ConnectionSink for mpsc::Sender<Connection> {
    fn connection(&mut self, connection: Connection) {
        // A receiver that went away wants no more; the reader keeps counting.
        let _ = self.send(connection);
    }
}

/// A sink that keeps nothing (the events are still counted).
pub struct Discard;

impl ConnectionSink for Discard {
    fn connection(&mut self, _connection: Connection) {}
}

/// Why a ring-buffer record is not a connection.
#[derive(thiserror::Error, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    #[error("a record of {0} bytes (a connection event has {size})", size = size_of::<ConnEvent>())]
    Size(usize),
    #[error("unknown outcome {0}")]
    Outcome(u8),
    #[error("unknown direction {0}")]
    Direction(u8),
}

/// The connection a ring-buffer record describes.
pub fn decode_bytes(bytes: &[u8]) -> Result<Connection, DecodeError> {
    if bytes.len() != size_of::<ConnEvent>() {
        return Err(DecodeError::Size(bytes.len()));
    }
    // SAFETY: the length is checked; ConnEvent is plain integers (any bit pattern is valid), read
    // unaligned because the item's bytes carry no alignment guarantee for us.
    let event = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<ConnEvent>()) };
    decode(&event)
}

/// The connection an event describes.
pub fn decode(event: &ConnEvent) -> Result<Connection, DecodeError> {
    let outcome = match event.outcome {
        outcome::CLOSED => Outcome::Closed,
        outcome::RESET => Outcome::Reset,
        outcome::CONNECT_FAILED => Outcome::ConnectFailed,
        outcome::NO_ENDPOINT => Outcome::NoEndpoint,
        outcome::DENIED => Outcome::Denied {
            policy: event.policy,
        },
        other => return Err(DecodeError::Outcome(other)),
    };
    let direction = match event.direction {
        direction::OUTBOUND => Direction::Outbound,
        direction::INBOUND => Direction::Inbound,
        other => return Err(DecodeError::Direction(other)),
    };
    Ok(Connection {
        direction,
        source: SocketAddr::new(ip(&event.source), event.source_port),
        destination: SocketAddr::new(ip(&event.destination), event.destination_port),
        service: (event.service_port != 0)
            .then(|| SocketAddr::new(ip(&event.service), event.service_port)),
        bytes_sent: event.bytes_sent,
        bytes_received: event.bytes_received,
        duration: Duration::from_nanos(event.duration_ns),
        outcome,
    })
}

/// An [`kmesh_common::Ip16`] as an address: IPv4-mapped ones as IPv4.
fn ip(ip16: &kmesh_common::Ip16) -> IpAddr {
    match kmesh_common::as_ipv4(ip16) {
        Some(v4) => IpAddr::V4(Ipv4Addr::from(v4)),
        None => IpAddr::V6(Ipv6Addr::from(*ip16)),
    }
}

/// Events read, per outcome, and records that did not decode. Shared with the metrics.
#[derive(Debug, Default)]
pub struct EventStats {
    per_outcome: [AtomicU64; OUTCOMES],
    invalid: AtomicU64,
}

const OUTCOMES: usize = 5;

/// A snapshot of [`EventStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventCounts {
    pub closed: u64,
    pub reset: u64,
    pub connect_failed: u64,
    pub no_endpoint: u64,
    pub denied: u64,
    /// Records that did not decode (a layout mismatch between programs and agent).
    pub invalid: u64,
}

impl EventCounts {
    /// Every count with its `outcome` label value.
    pub fn labelled(&self) -> [(&'static str, u64); OUTCOMES + 1] {
        [
            ("closed", self.closed),
            ("reset", self.reset),
            ("connect_failed", self.connect_failed),
            ("no_endpoint", self.no_endpoint),
            ("denied", self.denied),
            ("invalid", self.invalid),
        ]
    }

    /// Events read, valid or not.
    pub fn total(&self) -> u64 {
        self.labelled().iter().map(|(_, n)| n).sum()
    }
}

impl EventStats {
    fn record(&self, decoded: &Result<Connection, DecodeError>) {
        let counter = match decoded {
            Ok(c) => &self.per_outcome[outcome_index(c.outcome)],
            Err(_) => &self.invalid,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn counts(&self) -> EventCounts {
        let n = |i: usize| self.per_outcome[i].load(Ordering::Relaxed);
        EventCounts {
            closed: n(0),
            reset: n(1),
            connect_failed: n(2),
            no_endpoint: n(3),
            denied: n(4),
            invalid: self.invalid.load(Ordering::Relaxed),
        }
    }
}

fn outcome_index(outcome: Outcome) -> usize {
    match outcome {
        Outcome::Closed => 0,
        Outcome::Reset => 1,
        Outcome::ConnectFailed => 2,
        Outcome::NoEndpoint => 3,
        Outcome::Denied { .. } => 4,
    }
}

/// How long the reader sleeps in poll(2): the programs wake it only once the ring is a quarter full
/// (a wakeup per connection would cost more than the event), so this is how late an event of a
/// quiet node is read, and how often the reader checks whether it is to stop.
const POLL_INTERVAL_MS: i32 = 100;

/// The reader of one pinned ring buffer. One reader per ring: two would split the events.
pub struct EventReader {
    ring: RingBuf<MapData>,
    stats: Arc<EventStats>,
}

impl EventReader {
    /// The reader of `installation`'s ring.
    pub fn open(installation: &Installation) -> Result<Self, LoaderError> {
        Self::from_map(
            installation.open_map(map_names::EVENTS)?,
            &installation.layout_dir,
        )
    }

    /// The reader of the ring pinned in `layout_dir` (a layout's directory of pins).
    pub fn open_pinned(layout_dir: &Path) -> Result<Self, LoaderError> {
        let path = layout_dir.join(map_names::EVENTS);
        let map = MapData::from_pin(&path).map_err(|source| LoaderError::Map { path, source })?;
        Self::from_map(map, layout_dir)
    }

    fn from_map(map: MapData, layout_dir: &Path) -> Result<Self, LoaderError> {
        let path = layout_dir.join(map_names::EVENTS);
        let ring = RingBuf::try_from(Map::RingBuf(map))
            .map_err(|source| LoaderError::Map { path, source })?;
        Ok(EventReader {
            ring,
            stats: Arc::default(),
        })
    }

    /// The counts of what this reader read.
    pub fn stats(&self) -> Arc<EventStats> {
        self.stats.clone()
    }

    /// Reads every event in the ring now, hands each connection to `sink`, and returns how many
    /// records it read (valid or not).
    pub fn drain(&mut self, sink: &mut impl ConnectionSink) -> u64 {
        let mut read = 0;
        while let Some(item) = self.ring.next() {
            let decoded = decode_bytes(&item);
            drop(item);
            read += 1;
            self.stats.record(&decoded);
            match decoded {
                Ok(connection) => sink.connection(connection),
                Err(e) => warn!(error = %e, "a connection event that does not decode"),
            }
        }
        read
    }

    /// Waits up to `timeout_ms` for the kernel to signal new events (poll(2) on the ring).
    fn wait(&self, timeout_ms: i32) {
        let mut fds = libc::pollfd {
            fd: self.ring.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd we own, for the duration of the call. Errors (EINTR) just end
        // the wait early: the caller drains and waits again.
        unsafe { libc::poll(&mut fds, 1, timeout_ms) };
    }

    /// Reads events on a thread of its own until `stop` is set (checked at least every 100 ms).
    pub fn spawn(
        mut self,
        mut sink: impl ConnectionSink,
        stop: Arc<AtomicBool>,
    ) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name("events".into())
            .spawn(move || {
                info!("reading connection events");
                while !stop.load(Ordering::Relaxed) {
                    self.drain(&mut sink);
                    self.wait(POLL_INTERVAL_MS);
                }
                self.drain(&mut sink);
            })
    }
}

/// Events the kernel could not report, as counted in `KM_EVENTS_DROPPED`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Dropped {
    /// The ring was full.
    pub ring_full: u64,
    /// A connection could not be followed (no socket storage).
    pub no_storage: u64,
}

/// The kernel's per-CPU drop counters.
pub struct DroppedCounter {
    map: PerCpuArray<MapData, u64>,
}

impl DroppedCounter {
    pub fn open(installation: &Installation) -> Result<Self, LoaderError> {
        Self::from_map(
            installation.open_map(map_names::EVENTS_DROPPED)?,
            &installation.layout_dir,
        )
    }

    /// The counters pinned in `layout_dir`.
    pub fn open_pinned(layout_dir: &Path) -> Result<Self, LoaderError> {
        let path = layout_dir.join(map_names::EVENTS_DROPPED);
        let map = MapData::from_pin(&path).map_err(|source| LoaderError::Map { path, source })?;
        Self::from_map(map, layout_dir)
    }

    fn from_map(map: MapData, layout_dir: &Path) -> Result<Self, LoaderError> {
        let path = layout_dir.join(map_names::EVENTS_DROPPED);
        let map = PerCpuArray::try_from(Map::PerCpuArray(map))
            .map_err(|source| LoaderError::Map { path, source })?;
        Ok(DroppedCounter { map })
    }

    /// The counters summed over CPUs.
    pub fn read(&self) -> Result<Dropped, aya::maps::MapError> {
        let sum = |index: u32| -> Result<u64, aya::maps::MapError> {
            Ok(self.map.get(&index, 0)?.iter().sum())
        };
        Ok(Dropped {
            ring_full: sum(events_dropped::RING_FULL)?,
            no_storage: sum(events_dropped::NO_STORAGE)?,
        })
    }
}

/// What the metrics read of the events: the reader's counts (none when this agent does not read
/// the ring) and the kernel's drop counters.
#[derive(Clone)]
pub struct EventMetrics {
    pub stats: Option<Arc<EventStats>>,
    pub dropped: Arc<DroppedCounter>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use kmesh_common::ipv4_mapped;

    fn event() -> ConnEvent {
        ConnEvent {
            socket_cookie: 7,
            netns_cookie: 8,
            bytes_sent: 1234,
            bytes_received: 56,
            duration_ns: 1_500_000,
            source: ipv4_mapped([10, 0, 0, 1]),
            destination: ipv4_mapped([10, 0, 0, 2]),
            service: ipv4_mapped([10, 96, 0, 10]),
            source_port: 40000,
            destination_port: 8080,
            service_port: 80,
            outcome: outcome::CLOSED,
            direction: direction::OUTBOUND,
            policy: 0,
            pad: 0,
        }
    }

    fn bytes(e: &ConnEvent) -> Vec<u8> {
        // SAFETY: ConnEvent is repr(C) integers without padding (asserted in kmesh-common).
        unsafe {
            std::slice::from_raw_parts(std::ptr::from_ref(e).cast::<u8>(), size_of::<ConnEvent>())
        }
        .to_vec()
    }

    #[test]
    fn an_event_decodes_field_by_field() {
        let c = decode_bytes(&bytes(&event())).unwrap();
        assert_eq!(c.direction, Direction::Outbound);
        assert_eq!(c.source, "10.0.0.1:40000".parse().unwrap());
        assert_eq!(c.destination, "10.0.0.2:8080".parse().unwrap());
        assert_eq!(c.service, Some("10.96.0.10:80".parse().unwrap()));
        assert_eq!((c.bytes_sent, c.bytes_received), (1234, 56));
        assert_eq!(c.duration, Duration::from_micros(1500));
        assert_eq!(c.outcome, Outcome::Closed);
    }

    #[test]
    fn no_service_port_means_no_service_and_v6_stays_v6() {
        let mut e = event();
        e.service_port = 0;
        e.source = "fd00::1".parse::<Ipv6Addr>().unwrap().octets();
        e.direction = direction::INBOUND;
        e.outcome = outcome::DENIED;
        e.policy = 42;
        let c = decode(&e).unwrap();
        assert_eq!(c.service, None);
        assert_eq!(c.source, "[fd00::1]:40000".parse().unwrap());
        assert_eq!(c.direction, Direction::Inbound);
        assert_eq!(c.outcome, Outcome::Denied { policy: 42 });
    }

    #[test]
    fn bad_records_are_refused_with_the_reason() {
        let mut e = event();
        e.outcome = 0;
        assert_eq!(decode(&e), Err(DecodeError::Outcome(0)));
        e.outcome = outcome::END;
        assert_eq!(decode(&e), Err(DecodeError::Outcome(outcome::END)));
        let mut e = event();
        e.direction = 3;
        assert_eq!(decode(&e), Err(DecodeError::Direction(3)));
        assert_eq!(decode_bytes(&[0; 8]), Err(DecodeError::Size(8)));
        assert_eq!(
            decode_bytes(&vec![0; size_of::<ConnEvent>()]),
            Err(DecodeError::Outcome(0))
        );
    }

    #[test]
    fn stats_count_each_outcome_and_invalid_records() {
        let stats = EventStats::default();
        for outcome in [
            outcome::CLOSED,
            outcome::RESET,
            outcome::RESET,
            outcome::CONNECT_FAILED,
            outcome::NO_ENDPOINT,
            outcome::DENIED,
            0,
        ] {
            let mut e = event();
            e.outcome = outcome;
            stats.record(&decode(&e));
        }
        let counts = stats.counts();
        assert_eq!(
            counts,
            EventCounts {
                closed: 1,
                reset: 2,
                connect_failed: 1,
                no_endpoint: 1,
                denied: 1,
                invalid: 1
            }
        );
        assert_eq!(counts.total(), 7);
    }
}
