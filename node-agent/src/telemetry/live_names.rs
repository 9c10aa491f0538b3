//! The names the event reader labels connections with: the live snapshot's, swapped whole when a
//! generation goes live ([`LiveNames::set`]), read per connection ([`Recorder::record`]). Until a
//! snapshot's names are set, every name is unknown ([`NoNames`]) and connections are still counted.
use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, RwLock},
};

use super::Telemetry;
use crate::connection::{Connection, NameLookup, ServiceNames, WorkloadNames};

/// A name lookup that can be shared with the reader thread.
pub type SharedNames = Arc<dyn NameLookup + Send + Sync>;

/// Names nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoNames;

impl NameLookup for NoNames {
    fn workload(&self, _: IpAddr) -> Option<WorkloadNames<'_>> {
        None
    }
    fn service(&self, _: SocketAddr) -> Option<ServiceNames<'_>> {
        None
    }
    fn service_of_endpoint(&self, _: SocketAddr) -> Option<ServiceNames<'_>> {
        None
    }
    fn policy(&self, _: u32) -> Option<&str> {
        None
    }
}

/// The live snapshot's names; a clone shares them (the data plane sets, the reader reads).
#[derive(Clone)]
pub struct LiveNames(Arc<RwLock<SharedNames>>);

impl Default for LiveNames {
    fn default() -> Self {
        LiveNames(Arc::new(RwLock::new(Arc::new(NoNames))))
    }
}

impl std::fmt::Debug for LiveNames {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LiveNames")
    }
}

impl LiveNames {
    /// Makes `names` the ones connections are labelled with from now on.
    pub fn set(&self, names: SharedNames) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = names;
    }

    /// The names now (held by the caller for one connection; a `set` meanwhile does not wait).
    pub fn current(&self) -> SharedNames {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// What the event reader holds: telemetry and the live names. `record` is its one call per
/// finished connection (the body of the reader's sink).
#[derive(Clone, Debug, Default)]
pub struct Recorder {
    pub telemetry: Telemetry,
    pub names: LiveNames,
}

impl Recorder {
    pub fn record(&self, connection: &Connection) {
        let names = self.names.current();
        self.telemetry.record(connection, names.as_ref());
    }
}

/// The event reader's sink: each finished connection is recorded as it arrives.
impl crate::events::ConnectionSink for Recorder {
    fn connection(&mut self, connection: Connection) {
        self.record(&connection);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::{LiveNames, Recorder};
    use crate::telemetry::{
        TrafficLabels,
        fake_names::{bookshop, outbound_to_reviews},
        labels::UNKNOWN,
    };

    /// Before any names, a connection counts under unknown names; after `set`, under the
    /// snapshot's.
    #[test]
    fn connections_are_named_by_the_names_set_last() {
        let recorder = Recorder {
            names: LiveNames::default(),
            ..Recorder::default()
        };
        recorder.record(&outbound_to_reviews());
        recorder.names.set(Arc::new(bookshop()));
        recorder.record(&outbound_to_reviews());
        let metrics = recorder.telemetry.metrics();
        assert_eq!(metrics.series_count(), 2);
        let named = TrafficLabels::of(&outbound_to_reviews(), &bookshop());
        assert_eq!(named.source.workload, "sleep");
        assert_eq!(metrics.totals(&named).unwrap().opened, 1);
        let unnamed = TrafficLabels::of(&outbound_to_reviews(), &super::NoNames);
        assert_eq!(unnamed.source.workload, UNKNOWN);
        assert_eq!(metrics.totals(&unnamed).unwrap().opened, 1);
    }
}
