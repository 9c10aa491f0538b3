//! The configuration the waypoint serves, and where it comes from. It owns the current route
//! table, swapped whole, and promises:
//! - a request takes the table once ([`ConfigStore::current`], an `Arc`) at its start and keeps
//!   it to its end: it sees the old routes or the new ones, never a mix, and a swap drops no
//!   request in flight (the old table lives while a request holds it);
//! - a configuration that is refused (not JSON of this format, refused by its validation, or by
//!   the route table: a regex that does not compile) changes nothing: the last good table stays,
//!   the refusal is logged with its specific error and counted
//!   (`kmesh_waypoint_configs_refused_total{reason}`).
//!
//! Sources: a [`ConfigSource`] yields a configuration's bytes whenever there may be a new one;
//! [`follow`] offers each to the store. The sources are a file ([`FileSource`]) and the
//! operator's long poll (`crate::operator_source::OperatorSource`).
use std::{
    future::Future,
    path::PathBuf,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use kmesh_snapshot::waypoint::{WaypointConfig, WaypointConfigError};

use crate::{
    choice::stable_hash,
    metrics::{Metrics, RefusedReason},
    table::{RouteTable, TableError},
};

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Config(#[from] WaypointConfigError),
    #[error(transparent)]
    Table(#[from] TableError),
}

impl ConfigError {
    fn reason(&self) -> RefusedReason {
        match self {
            ConfigError::Config(WaypointConfigError::Invalid { .. })
            | ConfigError::Table(TableError::Invalid(WaypointConfigError::Invalid { .. })) => {
                RefusedReason::invalid
            }
            ConfigError::Config(_) | ConfigError::Table(TableError::Invalid(_)) => {
                RefusedReason::parse
            }
            ConfigError::Table(_) => RefusedReason::table,
        }
    }
}

/// The current route table.
pub struct ConfigStore {
    current: RwLock<Option<Arc<RouteTable>>>,
    /// Tables adopted so far (0: none yet).
    generation: AtomicU64,
    metrics: Metrics,
}

impl ConfigStore {
    pub fn new(metrics: Metrics) -> ConfigStore {
        ConfigStore {
            current: RwLock::new(None),
            generation: AtomicU64::new(0),
            metrics,
        }
    }

    /// The table to use, until the end of the request or connection that takes it; `None`
    /// before the first configuration.
    pub fn current(&self) -> Option<Arc<RouteTable>> {
        // A poisoned lock only means a writer panicked between two statements that cannot
        // panic; the value is whole either way.
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// How many tables were adopted so far.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Reads, validates and compiles `bytes`, and swaps the table in; on any error, the current
    /// table stays and the refusal is counted.
    pub fn offer(&self, bytes: &[u8]) -> Result<(), ConfigError> {
        let result = WaypointConfig::from_json(bytes)
            .map_err(ConfigError::from)
            .and_then(|config| RouteTable::new(config).map_err(ConfigError::from));
        match result {
            Ok(table) => {
                self.install(table);
                Ok(())
            }
            Err(error) => {
                self.metrics.config_refused(error.reason());
                Err(error)
            }
        }
    }

    /// Swaps `table` in.
    pub fn install(&self, table: RouteTable) {
        let table = Arc::new(table);
        *self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(table);
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.metrics.config_adopted();
    }
}

/// Where configurations come from: each call yields the bytes of one that may be new (the store
/// adopts the same configuration again harmlessly, but a source should yield only changes).
pub trait ConfigSource: Send {
    fn next(&mut self) -> impl Future<Output = Vec<u8>> + Send;
}

/// A configuration file, read again whenever its content changes: read every `interval` and
/// compared by a hash of its content (simple, and blind to no change that keeps the size and the
/// modification time). A file that cannot be read is logged once per distinct error and retried.
/// Write a new configuration to a temporary file and rename it over the old one: a reader of a
/// half-written file refuses it (and keeps the last good one), then reads the whole one.
pub struct FileSource {
    path: PathBuf,
    interval: Duration,
    last_hash: Option<u64>,
    last_error: Option<String>,
    first: bool,
}

/// How often [`FileSource`] reads its file by default.
pub const FILE_POLL_INTERVAL: Duration = Duration::from_millis(200);

impl FileSource {
    pub fn new(path: impl Into<PathBuf>, interval: Duration) -> FileSource {
        FileSource {
            path: path.into(),
            interval,
            last_hash: None,
            last_error: None,
            first: true,
        }
    }
}

impl ConfigSource for FileSource {
    async fn next(&mut self) -> Vec<u8> {
        loop {
            if !std::mem::take(&mut self.first) {
                tokio::time::sleep(self.interval).await;
            }
            match tokio::fs::read(&self.path).await {
                Ok(bytes) => {
                    self.last_error = None;
                    let hash = stable_hash(&bytes);
                    if self.last_hash != Some(hash) {
                        self.last_hash = Some(hash);
                        return bytes;
                    }
                }
                Err(error) => {
                    let error = error.to_string();
                    if self.last_error.as_ref() != Some(&error) {
                        tracing::warn!(path = %self.path.display(), %error, "cannot read the configuration file");
                        self.last_error = Some(error);
                    }
                }
            }
        }
    }
}

/// Offers every configuration `source` yields to `store`, for ever.
pub async fn follow(mut source: impl ConfigSource, store: Arc<ConfigStore>) {
    loop {
        let bytes = source.next().await;
        match store.offer(&bytes) {
            Ok(()) => tracing::info!(
                generation = store.generation(),
                bytes = bytes.len(),
                "configuration adopted"
            ),
            Err(error) => tracing::warn!(
                %error,
                "configuration refused; the last good one stays"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::{PortKey, tests::config};

    const REVIEWS: PortKey = PortKey {
        service_id: 7,
        port: 9080,
    };

    #[test]
    fn a_refused_configuration_keeps_the_last_good_one() {
        let metrics = Metrics::new();
        let store = ConfigStore::new(metrics.clone());
        assert!(store.current().is_none());
        store.offer(&config().to_json()).unwrap();
        assert_eq!(store.generation(), 1);
        let held = store.current().unwrap();

        let error = store.offer(b"{ not json").unwrap_err();
        assert!(
            matches!(error, ConfigError::Config(WaypointConfigError::Json(_))),
            "{error}"
        );
        assert_eq!(error.reason(), RefusedReason::parse);
        let mut bad = config();
        bad.services[0].ports[0].http = vec![crate::table::tests::route(
            vec![kmesh_snapshot::waypoint::RequestMatch {
                path: Some(kmesh_snapshot::waypoint::PathMatch::Regex("(".into())),
                ..Default::default()
            }],
            0,
        )];
        let error = store.offer(&bad.to_json()).unwrap_err();
        assert_eq!(error.reason(), RefusedReason::table, "{error}");
        bad.services[0].ports[0].http = vec![crate::table::tests::route(vec![], 9)];
        let error = store.offer(&bad.to_json()).unwrap_err();
        assert_eq!(error.reason(), RefusedReason::invalid, "{error}");
        assert_eq!(store.generation(), 1);
        assert_eq!(metrics.configs_refused_total(), 3);
        assert!(Arc::ptr_eq(&held, &store.current().unwrap()));
    }

    #[test]
    fn a_swap_leaves_the_table_a_request_holds_whole() {
        let store = ConfigStore::new(Metrics::new());
        store.offer(&config().to_json()).unwrap();
        let held = store.current().unwrap();
        let mut next = config();
        next.services[0].ports[0].port = 9081;
        store.offer(&next.to_json()).unwrap();
        assert!(held.port(REVIEWS).is_some(), "the old table, whole");
        assert!(store.current().unwrap().port(REVIEWS).is_none());
        assert_eq!(store.generation(), 2);
    }

    #[tokio::test]
    async fn a_file_source_yields_each_new_content_once() {
        let dir = std::env::temp_dir().join(format!("kmesh-config-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.json");
        std::fs::write(&path, b"one").unwrap();
        let mut source = FileSource::new(&path, Duration::from_millis(5));
        assert_eq!(source.next().await, b"one");
        let again = tokio::time::timeout(Duration::from_millis(50), source.next()).await;
        assert!(again.is_err(), "the same content is not yielded again");
        std::fs::write(&path, b"two").unwrap();
        assert_eq!(source.next().await, b"two");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
