//! The operator's own log level, following `KmeshConfig.spec.logLevel` live.
//!
//! `main.rs` builds the tracing subscriber with its filter inside a [`reload::Layer`]: `RUST_LOG`
//! when set, else `info`. Each compile hands the KmeshConfig's level to [`LogLevelFollower::observe`],
//! which decides ([`decide`], pure) and swaps the filter when the level changed. An explicit
//! `RUST_LOG` holds until the KmeshConfig's level first changes after the start (an operator
//! started with `RUST_LOG=debug` to debug stays at debug); without it, the KmeshConfig's level
//! applies from the first compile. No KmeshConfig (the operator creates one with the defaults
//! shortly) changes nothing.
use tracing_subscriber::{EnvFilter, Registry, reload};

use crate::crd::LogLevel;

/// The handle of the filter layer `main.rs` installs directly over the registry.
pub type ReloadHandle = reload::Handle<EnvFilter, Registry>;

/// What to do with the filter when a compile sees the KmeshConfig's level `seen`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Keep the filter in force.
    Keep,
    /// Replace the filter with this level.
    Set(LogLevel),
}

/// The decision for `seen` (the KmeshConfig's level now, `None` without a KmeshConfig), given the
/// level seen at the previous compile (`None` before the first) and whether the start level was
/// set explicitly (`RUST_LOG`).
pub fn decide(
    previous: Option<LogLevel>,
    seen: Option<LogLevel>,
    explicit_start: bool,
) -> Decision {
    match (previous, seen) {
        (_, None) => Decision::Keep,
        (Some(previous), Some(seen)) if previous == seen => Decision::Keep,
        (None, Some(_)) if explicit_start => Decision::Keep,
        (_, Some(seen)) => Decision::Set(seen),
    }
}

/// The operator's filter and what it has seen of the KmeshConfig.
pub struct LogLevelFollower {
    handle: Option<ReloadHandle>,
    explicit_start: bool,
    previous: Option<LogLevel>,
}

impl LogLevelFollower {
    /// Follows the KmeshConfig with `handle` (`None`: a process without a reloadable filter, which
    /// then only logs what it would do). `explicit_start`: `RUST_LOG` set the start filter.
    pub fn new(handle: Option<ReloadHandle>, explicit_start: bool) -> LogLevelFollower {
        LogLevelFollower {
            handle,
            explicit_start,
            previous: None,
        }
    }

    /// Applies the decision for the KmeshConfig's level `seen`; returns it.
    pub fn observe(&mut self, seen: Option<LogLevel>) -> Decision {
        let decision = decide(self.previous, seen, self.explicit_start);
        if seen.is_some() {
            self.previous = seen;
        }
        if let Decision::Set(level) = decision {
            self.set(level);
        }
        decision
    }

    fn set(&self, level: LogLevel) {
        let Some(handle) = &self.handle else {
            return;
        };
        let before = handle
            .with_current(|filter| filter.to_string())
            .unwrap_or_default();
        match handle.reload(EnvFilter::new(level.name())) {
            // Logged at warn so that the line shows at every level, error aside.
            Ok(()) => tracing::warn!(
                from = %before,
                to = level.name(),
                "log level changed by KmeshConfig spec.logLevel"
            ),
            Err(e) => tracing::error!(error = %e, "log level not changed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use LogLevel::{Debug, Info, Warn};

    #[test]
    fn the_kmeshconfig_level_applies_when_it_changes_and_rust_log_holds_until_then() {
        // Without RUST_LOG: the first level seen applies, then each change, nothing else.
        assert_eq!(decide(None, Some(Info), false), Decision::Set(Info));
        assert_eq!(decide(Some(Info), Some(Info), false), Decision::Keep);
        assert_eq!(decide(Some(Info), Some(Debug), false), Decision::Set(Debug));
        // With RUST_LOG: the first level seen is the baseline, the first change applies.
        assert_eq!(decide(None, Some(Warn), true), Decision::Keep);
        assert_eq!(decide(Some(Warn), Some(Warn), true), Decision::Keep);
        assert_eq!(decide(Some(Warn), Some(Debug), true), Decision::Set(Debug));
        // No KmeshConfig: nothing changes, whatever came before.
        assert_eq!(decide(Some(Debug), None, false), Decision::Keep);
        assert_eq!(decide(None, None, false), Decision::Keep);
    }

    #[test]
    fn the_follower_swaps_the_filter_and_remembers_across_a_missing_config() {
        use tracing_subscriber::layer::SubscriberExt as _;
        let (layer, handle) = reload::Layer::new(EnvFilter::new("trace"));
        let _subscriber = tracing_subscriber::registry().with(layer);
        let current = || handle.with_current(|f| f.to_string()).unwrap();
        let mut follower = LogLevelFollower::new(Some(handle.clone()), true);
        assert_eq!(follower.observe(Some(Info)), Decision::Keep);
        assert_eq!(current(), "trace", "RUST_LOG holds");
        assert_eq!(follower.observe(None), Decision::Keep);
        assert_eq!(follower.observe(Some(Info)), Decision::Keep, "no change");
        assert_eq!(follower.observe(Some(Warn)), Decision::Set(Warn));
        assert_eq!(current(), "warn");
    }
}
