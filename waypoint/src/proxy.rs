//! What every connection of the waypoint shares: the configuration store, the upstream pools,
//! the metrics, the settings, the random draws, and the drain signal. It owns nothing else and
//! promises that cloning a connection's view of it is cheap (an `Arc`).
use std::{sync::Mutex, time::Duration};

use tokio::sync::watch;

use crate::{config_store::ConfigStore, metrics::Metrics, upstream::Upstreams};

/// The settings of the proxy (from the command line).
#[derive(Clone, Debug)]
pub struct Settings {
    /// How long a `Detect` port waits for the client's first bytes (then: TCP).
    pub sniff_timeout: Duration,
    /// How long a connect to an endpoint may take (then: a connect failure, 503 `UF`).
    pub connect_timeout: Duration,
    /// The largest request body kept in memory to be sent again (retries, mirrors); a larger
    /// body, or one of unknown length, is streamed and sent once.
    pub max_replay_body: usize,
    /// Seeds the random draws (weights, faults, mirrors, balancers): tests only. `None`: a
    /// thread-local generator, seeded from the system.
    pub seed: Option<u64>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            sniff_timeout: Duration::from_millis(100),
            connect_timeout: Duration::from_secs(10),
            max_replay_body: 1 << 20,
            seed: None,
        }
    }
}

/// The source of the uniform `u32` draws the engine's choices take.
pub enum Draws {
    ThreadLocal,
    Seeded(Mutex<fastrand::Rng>),
}

impl Draws {
    pub fn next(&self) -> u32 {
        match self {
            Draws::ThreadLocal => fastrand::u32(..),
            Draws::Seeded(rng) => rng
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .u32(..),
        }
    }
}

/// The waypoint's shared state.
pub struct Proxy {
    pub store: std::sync::Arc<ConfigStore>,
    pub upstreams: Upstreams,
    pub metrics: Metrics,
    pub settings: Settings,
    pub draws: Draws,
    /// `true` once the waypoint drains: connections finish what they do and close.
    pub draining: watch::Receiver<bool>,
}

impl Proxy {
    pub fn new(
        store: std::sync::Arc<ConfigStore>,
        metrics: Metrics,
        settings: Settings,
        draining: watch::Receiver<bool>,
    ) -> Proxy {
        let draws = match settings.seed {
            Some(seed) => Draws::Seeded(Mutex::new(fastrand::Rng::with_seed(seed))),
            None => Draws::ThreadLocal,
        };
        Proxy {
            store,
            upstreams: Upstreams::new(settings.connect_timeout),
            metrics,
            settings,
            draws,
            draining,
        }
    }

    /// Waits until the waypoint drains (for ever if it never does, or its signal is gone).
    pub async fn drained(&self) {
        let mut draining = self.draining.clone();
        if draining.wait_for(|d| *d).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
