//! The debouncer that turns a burst of changes into one compile, and the debounced change signal
//! the main loop waits on. The debouncer is pure (the caller passes the time) and capped, so a
//! stream of changes that never pauses is still compiled.
use std::time::Duration;

use tokio::{
    sync::watch,
    time::{Instant, sleep_until},
};

/// How long to wait for more changes before compiling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DebounceConfig {
    /// Compile this long after the last change...
    pub quiet: Duration,
    /// ...but no later than this after the first change of a burst.
    pub max_delay: Duration,
}

impl Default for DebounceConfig {
    fn default() -> Self {
        DebounceConfig {
            quiet: Duration::from_millis(200),
            max_delay: Duration::from_secs(2),
        }
    }
}

/// Turns a stream of change instants into compile instants: due `quiet` after the last change,
/// or `max_delay` after the first change of the burst, whichever comes first. Pure: the caller
/// passes the time.
#[derive(Clone, Debug)]
pub struct Debouncer {
    config: DebounceConfig,
    /// First and last change of the pending burst.
    pending: Option<(Instant, Instant)>,
}

impl Debouncer {
    pub fn new(config: DebounceConfig) -> Self {
        Debouncer {
            config,
            pending: None,
        }
    }

    /// Records a change at `now`.
    pub fn record(&mut self, now: Instant) {
        self.pending = Some(match self.pending {
            Some((first, _)) => (first, now),
            None => (now, now),
        });
    }

    /// Whether a change is waiting to be acted on.
    pub fn is_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// When the pending burst is due; `None` when nothing is pending.
    pub fn deadline(&self) -> Option<Instant> {
        self.pending
            .map(|(first, last)| (last + self.config.quiet).min(first + self.config.max_delay))
    }

    /// Whether the pending burst is due at `now`; if so, it is consumed.
    pub fn fire(&mut self, now: Instant) -> bool {
        match self.deadline() {
            Some(deadline) if deadline <= now => {
                self.pending = None;
                true
            }
            _ => false,
        }
    }
}

/// The debounced "something changed" signal the main loop waits on.
pub struct Changes {
    rx: watch::Receiver<u64>,
    debouncer: Debouncer,
    closed: bool,
}

impl Changes {
    /// Debounces the changes of a counter that is bumped on every change.
    pub fn new(rx: watch::Receiver<u64>, config: DebounceConfig) -> Self {
        Changes {
            rx,
            debouncer: Debouncer::new(config),
            closed: false,
        }
    }

    /// Waits for a change and for its burst to end (see [`Debouncer`]). Returns `false` once the
    /// source is gone and nothing is pending.
    pub async fn next(&mut self) -> bool {
        loop {
            let deadline = self.debouncer.deadline();
            tokio::select! {
                changed = self.rx.changed(), if !self.closed => match changed {
                    Ok(()) => self.debouncer.record(Instant::now()),
                    Err(_) => self.closed = true,
                },
                () = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    if self.debouncer.fire(Instant::now()) {
                        return true;
                    }
                }
                else => return false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn debouncer_waits_for_quiet() {
        let t0 = Instant::now();
        let mut d = Debouncer::new(DebounceConfig {
            quiet: ms(200),
            max_delay: ms(2000),
        });
        assert_eq!(d.deadline(), None);
        assert!(!d.fire(t0 + ms(10_000)), "nothing pending");
        d.record(t0);
        assert_eq!(d.deadline(), Some(t0 + ms(200)));
        assert!(!d.fire(t0 + ms(199)));
        d.record(t0 + ms(150));
        assert_eq!(d.deadline(), Some(t0 + ms(350)));
        assert!(!d.fire(t0 + ms(300)));
        assert!(d.fire(t0 + ms(350)));
        assert!(!d.is_pending());
        assert!(!d.fire(t0 + ms(400)), "fires once per burst");
    }

    #[test]
    fn debouncer_caps_the_delay() {
        let t0 = Instant::now();
        let mut d = Debouncer::new(DebounceConfig {
            quiet: ms(200),
            max_delay: ms(2000),
        });
        // A change every 100 ms never leaves 200 ms of quiet...
        let mut t = t0;
        let mut fired_at = None;
        while t < t0 + ms(5000) {
            if d.fire(t) {
                fired_at = Some(t);
                break;
            }
            d.record(t);
            t += ms(100);
        }
        // ...but the burst is compiled 2 s after its first change.
        assert_eq!(fired_at, Some(t0 + ms(2000)));
        // The next burst starts afresh.
        d.record(t0 + ms(2100));
        assert_eq!(d.deadline(), Some(t0 + ms(2300)));
    }

    #[tokio::test]
    async fn changes_coalesce_a_burst() {
        let (tx, rx) = watch::channel(0u64);
        let mut changes = Changes::new(
            rx,
            DebounceConfig {
                quiet: ms(50),
                max_delay: ms(1000),
            },
        );
        let producer = tokio::spawn(async move {
            for _ in 0..5 {
                tx.send_modify(|n| *n += 1);
                tokio::time::sleep(ms(10)).await;
            }
            tokio::time::sleep(ms(300)).await;
            tx.send_modify(|n| *n += 1);
            // tx dropped here: the source is gone.
        });
        let start = Instant::now();
        assert!(changes.next().await);
        let first = start.elapsed();
        assert!(first >= ms(90) && first < ms(300), "{first:?}");
        // The burst was one signal: the next one is the lone change 300 ms later.
        assert!(changes.next().await);
        assert!(start.elapsed() >= ms(340), "{:?}", start.elapsed());
        producer.await.unwrap();
        assert!(!changes.next().await, "closed, nothing pending");
    }
}
