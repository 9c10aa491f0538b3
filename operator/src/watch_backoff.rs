//! The retry delays of every watch the operator runs: 0.5 s doubling to at most 4 s, back to 0.5 s
//! after any item the watch delivers.
//!
//! kube-runtime's default (client-go's: 0.8 s doubling to 30 s, reset after 120 s) is kind to an
//! API server that thousands of clients share. This operator runs one or two replicas with about a
//! dozen watches, and the cap is what a change waits after an API-server outage: with the default,
//! a change applied as the API server came back reached the kernels 23–31 s later.
use std::time::Duration;

use kube::runtime::utils::Backoff;

/// The first delay, and the one after any success.
pub const FIRST: Duration = Duration::from_millis(500);
/// The longest delay.
pub const MAX: Duration = Duration::from_secs(4);

/// A watch's [`Backoff`]: see the module doc.
#[derive(Clone, Debug)]
pub struct WatchBackoff {
    next: Duration,
}

impl Default for WatchBackoff {
    fn default() -> Self {
        Self { next: FIRST }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let delay = self.next;
        self.next = (self.next * 2).min(MAX);
        Some(delay)
    }
}

impl Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = FIRST;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_the_cap_and_resets() {
        let mut backoff = WatchBackoff::default();
        let delays: Vec<u64> = backoff
            .by_ref()
            .take(6)
            .map(|d| d.as_millis() as u64)
            .collect();
        assert_eq!(delays, [500, 1000, 2000, 4000, 4000, 4000]);
        backoff.reset();
        assert_eq!(backoff.next(), Some(FIRST));
    }
}
