//! The agent's log filter, changed at runtime through the admin server (`/debug/log-level`) and by
//! the snapshot's log level (`KmeshConfig.spec.logLevel`, carried in the node config).
//!
//! `main.rs` builds the tracing subscriber with its filter inside a [`reload::Layer`] and hands the
//! handle to [`install`]; the admin server reads and replaces the filter through [`LogLevel`]. The
//! subscriber is process-wide, so the handle is too: one per process, set once. A filter that does
//! not parse changes nothing.
//!
//! Who wins ([`on_generation`], pure): a generation whose log level differs from the previous
//! generation's sets the filter to it, and the first generation since start sets its level. An
//! override holds until the level changes: a generation with the same level as the one before
//! leaves the filter alone. Overrides are `PUT /debug/log-level` (so one lasts until the next
//! change of the KmeshConfig's `logLevel`, or a restart) and `RUST_LOG` at start (as in the
//! operator: it holds past the first generation, until the level first changes).
//!
//! Accepted: a level (`debug`), or an EnvFilter directive list (`kmesh_agent=debug,info`). Stricter
//! than EnvFilter in one way: a bare word that is not a level (`verbose`) is refused, where EnvFilter
//! would read it as "everything of target `verbose`" and quietly change nothing useful.
use std::sync::{
    OnceLock,
    atomic::{AtomicBool, Ordering},
};

use tracing_subscriber::{EnvFilter, Registry, filter::LevelFilter, reload};

/// The handle of the filter layer `main.rs` installs directly over the registry.
pub type ReloadHandle = reload::Handle<EnvFilter, Registry>;

/// The process's log filter, readable and replaceable.
pub struct LogLevel {
    handle: ReloadHandle,
    /// An override is in force: set by [`LogLevel::set`] (or `RUST_LOG` at start, see
    /// [`install`]), ended by [`LogLevel::apply`].
    overridden: AtomicBool,
}

#[derive(thiserror::Error, Debug, PartialEq, Eq)]
pub enum LogLevelError {
    #[error(
        "an empty log filter; give a level (off, error, warn, info, debug, trace) or directives"
    )]
    Empty,
    #[error(
        "{word:?} is not a log level (off, error, warn, info, debug, trace); a target's level is \
         written target=level, e.g. kmesh_agent=debug"
    )]
    NotALevel { word: String },
    #[error("invalid log filter {filter:?}: {message}")]
    Invalid { filter: String, message: String },
    #[error("the log filter cannot be changed in this process: {0}")]
    Unavailable(String),
}

/// What to do with the filter when a generation goes live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnGeneration {
    /// The filter in force stays (an override included).
    Keep,
    /// Set the filter to `level`; `ends_override` when an override was in force (it is logged).
    Set {
        level: LevelFilter,
        ends_override: bool,
    },
}

/// The filter of a node config's `log_level` (`kmesh_common::log_level`); `None` for a value that
/// is no level (the decoder refuses those).
pub fn snapshot_level(raw: u8) -> Option<LevelFilter> {
    Some(match kmesh_common::log_level::name(raw)? {
        "error" => LevelFilter::ERROR,
        "warn" => LevelFilter::WARN,
        "info" => LevelFilter::INFO,
        "debug" => LevelFilter::DEBUG,
        "trace" => LevelFilter::TRACE,
        _ => return None,
    })
}

/// The decision for a generation with log level `new` (raw), after the generation `previous`
/// (raw; `None`: the first since the agent started). `overridden`: an override is in force — set
/// through the admin server, or `RUST_LOG` at start. A level that differs from the previous one
/// applies and ends an override; the same level keeps what is in force; the first generation
/// applies its level unless an override holds (as the operator does with `RUST_LOG`).
pub fn on_generation(previous: Option<u8>, new: u8, overridden: bool) -> OnGeneration {
    let Some(level) = snapshot_level(new) else {
        return OnGeneration::Keep;
    };
    let apply = match previous {
        Some(previous) => previous != new,
        None => !overridden,
    };
    if apply {
        OnGeneration::Set {
            level,
            ends_override: overridden,
        }
    } else {
        OnGeneration::Keep
    }
}

/// Applies the log level of a generation that went live (raw `new`, after `previous`; see
/// [`on_generation`]) to the process's filter, and logs a change once: before it when info lines
/// show now, else after it.
pub fn on_live_generation(previous: Option<u8>, new: u8) {
    let Some(level) = process() else {
        return;
    };
    let OnGeneration::Set {
        level: wanted,
        ends_override,
    } = on_generation(previous, new, level.overridden())
    else {
        return;
    };
    let shown_now = tracing::enabled!(tracing::Level::INFO);
    let log = || {
        tracing::info!(
            level = %wanted,
            ends_override,
            "log filter set from the snapshot's log level (KmeshConfig logLevel)"
        )
    };
    if shown_now {
        log();
    }
    match level.apply(wanted) {
        Ok(_) if !shown_now => log(),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "the snapshot's log level could not be applied"),
    }
}

static PROCESS_LOG_LEVEL: OnceLock<LogLevel> = OnceLock::new();

/// Makes the process's filter changeable through the admin server and the snapshot; called once
/// by `main.rs`, with `explicit_start` when `RUST_LOG` set the start filter (an override until the
/// snapshot's level first changes). A second call is ignored (the first subscriber stays the
/// process's).
pub fn install(handle: ReloadHandle, explicit_start: bool) {
    let level = LogLevel::new(handle);
    level.overridden.store(explicit_start, Ordering::SeqCst);
    let _ = PROCESS_LOG_LEVEL.set(level);
}

/// The process's filter, if [`install`] was called (the `kmesh-agent` binary always does).
pub fn process() -> Option<&'static LogLevel> {
    PROCESS_LOG_LEVEL.get()
}

impl LogLevel {
    pub fn new(handle: ReloadHandle) -> LogLevel {
        LogLevel {
            handle,
            overridden: AtomicBool::new(false),
        }
    }

    /// Whether an admin override is in force.
    pub fn overridden(&self) -> bool {
        self.overridden.load(Ordering::SeqCst)
    }

    /// Sets the level a generation asks for (see [`on_generation`]); ends an override.
    pub fn apply(&self, level: LevelFilter) -> Result<String, LogLevelError> {
        let filter = EnvFilter::builder().parse_lossy(level.to_string());
        self.handle
            .reload(filter)
            .map_err(|e| LogLevelError::Unavailable(e.to_string()))?;
        self.overridden.store(false, Ordering::SeqCst);
        self.current()
    }

    /// The filter in force, as EnvFilter writes it (`info`, `kmesh_agent=debug,info`).
    pub fn current(&self) -> Result<String, LogLevelError> {
        self.handle
            .with_current(|filter| filter.to_string())
            .map_err(|e| LogLevelError::Unavailable(e.to_string()))
    }

    /// Replaces the filter with `text` (see [`parse`]): an admin override, held until the
    /// snapshot's log level changes. Returns the new filter. On an error the filter is unchanged.
    pub fn set(&self, text: &str) -> Result<String, LogLevelError> {
        let filter = parse(text)?;
        self.handle
            .reload(filter)
            .map_err(|e| LogLevelError::Unavailable(e.to_string()))?;
        self.overridden.store(true, Ordering::SeqCst);
        self.current()
    }
}

/// Parses a level or directive list; surrounding whitespace (a trailing newline) is ignored.
pub fn parse(text: &str) -> Result<EnvFilter, LogLevelError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(LogLevelError::Empty);
    }
    for directive in text.split(',').map(str::trim) {
        let names_a_target_or_span = directive.contains(['=', '[']);
        if !names_a_target_or_span && directive.parse::<LevelFilter>().is_err() {
            return Err(LogLevelError::NotALevel {
                word: directive.to_string(),
            });
        }
    }
    EnvFilter::builder()
        .parse(text)
        .map_err(|e| LogLevelError::Invalid {
            filter: text.to_string(),
            message: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use tracing_subscriber::{layer::SubscriberExt as _, registry};

    use super::*;

    /// A filter over a subscriber of the test's own (not the process's), kept alive with it.
    fn log_level(initial: &str) -> (LogLevel, impl tracing::Subscriber) {
        let (layer, handle) = reload::Layer::new(EnvFilter::new(initial));
        (LogLevel::new(handle), registry().with(layer))
    }

    #[test]
    fn a_level_or_directives_replace_the_filter() {
        let (level, _subscriber) = log_level("info");
        assert_eq!(level.current().unwrap(), "info");
        assert_eq!(level.set("debug\n").unwrap(), "debug");
        assert_eq!(level.current().unwrap(), "debug");
        let set = level.set("kmesh_agent=trace,warn").unwrap();
        assert!(
            set.contains("kmesh_agent=trace") && set.contains("warn"),
            "{set}"
        );
    }

    #[test]
    fn a_bad_filter_is_refused_and_changes_nothing() {
        let (level, _subscriber) = log_level("info");
        let refused = [
            ("", "an empty log filter"),
            ("   \n", "an empty log filter"),
            ("verbose", "\"verbose\" is not a log level"),
            ("info,loud", "\"loud\" is not a log level"),
            (
                "kmesh_agent=loud",
                "invalid log filter \"kmesh_agent=loud\"",
            ),
        ];
        for (text, message) in refused {
            let e = level.set(text).unwrap_err();
            assert!(e.to_string().contains(message), "{text:?}: {e}");
            assert_eq!(level.current().unwrap(), "info", "{text:?} changed it");
        }
    }

    #[test]
    fn a_generation_sets_the_level_only_when_it_changes() {
        use OnGeneration::{Keep, Set};
        use kmesh_common::log_level::{DEBUG, ERROR, INFO, TRACE, WARN};
        let set = |level, ends_override| Set {
            level,
            ends_override,
        };
        // The first generation since start applies its level, unless RUST_LOG or an admin
        // override holds.
        assert_eq!(
            on_generation(None, DEBUG, false),
            set(LevelFilter::DEBUG, false)
        );
        assert_eq!(on_generation(None, DEBUG, true), Keep);
        // The same level again keeps what is in force: an override holds.
        assert_eq!(on_generation(Some(DEBUG), DEBUG, false), Keep);
        assert_eq!(on_generation(Some(DEBUG), DEBUG, true), Keep);
        // A change of level applies and ends the override.
        assert_eq!(
            on_generation(Some(DEBUG), ERROR, true),
            set(LevelFilter::ERROR, true)
        );
        assert_eq!(
            on_generation(Some(WARN), TRACE, false),
            set(LevelFilter::TRACE, false)
        );
        assert_eq!(
            on_generation(Some(TRACE), INFO, false),
            set(LevelFilter::INFO, false)
        );
        // A value that is no level (the decoder refuses it) changes nothing.
        assert_eq!(on_generation(Some(INFO), 0, false), Keep);
        assert_eq!(on_generation(Some(INFO), 9, true), Keep);
    }

    #[test]
    fn an_override_holds_until_a_generation_applies_a_level() {
        let (level, _subscriber) = log_level("kmesh_agent=debug,warn");
        assert!(!level.overridden());
        level.set("trace").unwrap();
        assert!(level.overridden());
        assert_eq!(level.apply(LevelFilter::ERROR).unwrap(), "error");
        assert!(!level.overridden());
    }

    #[test]
    fn off_and_upper_case_are_levels() {
        assert!(parse("off").is_ok());
        assert!(parse("TRACE").is_ok());
    }

    #[test]
    fn a_dropped_subscriber_is_reported() {
        let (level, subscriber) = log_level("info");
        drop(subscriber);
        assert!(matches!(
            level.set("debug"),
            Err(LogLevelError::Unavailable(_))
        ));
    }
}
