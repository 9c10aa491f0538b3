//! The agent's log filter, changed at runtime through the admin server (`/debug/log-level`) and by
//! the snapshot's log level (`KmeshConfig.spec.logLevel`, carried in the node config).
//!
//! `main.rs` builds the tracing subscriber with its filter inside a [`reload::Layer`] and hands the
//! handle to [`install`]; the admin server reads and replaces the filter through [`LogLevel`]. The
//! subscriber is process-wide, so the handle is too: one per process, set once. A filter that does
//! not parse changes nothing.
//!
//! Who wins ([`on_generation`], pure): a generation whose log level differs from the previous
//! generation's sets the filter to it (a level the snapshot leaves unset restores the filter the
//! agent started with). An admin override (`PUT /debug/log-level`) holds until that happens: a
//! generation with the same level as the one before leaves the filter alone, so the override
//! lasts until the next change of the KmeshConfig's `logLevel` (or a restart).
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
    /// The filter at start (`--log-level` or `RUST_LOG`), restored when the snapshot sets none.
    startup: String,
    /// An admin override is in force (set by [`LogLevel::set`], ended by [`LogLevel::apply`]).
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

/// The filter a generation's log level asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wanted {
    /// A level of the snapshot.
    Level(LevelFilter),
    /// The snapshot sets none: the filter the agent started with (`--log-level` or `RUST_LOG`).
    Startup,
}

/// What to do with the filter when a generation goes live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnGeneration {
    /// The level did not change: the filter in force stays (an admin override included).
    Keep,
    /// Set the filter; `ends_override` when an admin override was in force (it is logged).
    Set { wanted: Wanted, ends_override: bool },
}

/// The level a node config's raw `log_level` stands for (`kmesh_common::log_level`: 1 error … 5
/// trace; 0 none set). `None` for a value the format does not define (the decoder refuses it).
pub fn snapshot_level(raw: u8) -> Option<Wanted> {
    Some(match raw {
        0 => Wanted::Startup,
        1 => Wanted::Level(LevelFilter::ERROR),
        2 => Wanted::Level(LevelFilter::WARN),
        3 => Wanted::Level(LevelFilter::INFO),
        4 => Wanted::Level(LevelFilter::DEBUG),
        5 => Wanted::Level(LevelFilter::TRACE),
        _ => return None,
    })
}

/// The decision for a generation with log level `new` (raw), after the generation `previous`
/// (raw; `None`: the first since the agent started, which applies a set level and leaves the
/// startup filter otherwise). `overridden`: an admin override is in force.
pub fn on_generation(previous: Option<u8>, new: u8, overridden: bool) -> OnGeneration {
    let Some(wanted) = snapshot_level(new) else {
        return OnGeneration::Keep;
    };
    let changed = match previous {
        None => wanted != Wanted::Startup,
        Some(previous) => previous != new,
    };
    if changed {
        OnGeneration::Set {
            wanted,
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
        wanted,
        ends_override,
    } = on_generation(previous, new, level.overridden())
    else {
        return;
    };
    let shown_now = tracing::enabled!(tracing::Level::INFO);
    let log = || {
        tracing::info!(
            ?wanted,
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

/// Makes the process's filter changeable through the admin server; called once by `main.rs`. A
/// second call is ignored (the first subscriber stays the process's).
pub fn install(handle: ReloadHandle) {
    let _ = PROCESS_LOG_LEVEL.set(LogLevel::new(handle));
}

/// The process's filter, if [`install`] was called (the `kmesh-agent` binary always does).
pub fn process() -> Option<&'static LogLevel> {
    PROCESS_LOG_LEVEL.get()
}

impl LogLevel {
    pub fn new(handle: ReloadHandle) -> LogLevel {
        let startup = handle
            .with_current(|filter| filter.to_string())
            .unwrap_or_else(|_| "info".to_string());
        LogLevel {
            handle,
            startup,
            overridden: AtomicBool::new(false),
        }
    }

    /// Whether an admin override is in force.
    pub fn overridden(&self) -> bool {
        self.overridden.load(Ordering::SeqCst)
    }

    /// Sets the filter a generation asks for (see [`on_generation`]); ends an admin override.
    pub fn apply(&self, wanted: Wanted) -> Result<String, LogLevelError> {
        let text = match wanted {
            Wanted::Level(level) => level.to_string(),
            Wanted::Startup => self.startup.clone(),
        };
        let filter = EnvFilter::builder()
            .parse(&text)
            .map_err(|e| LogLevelError::Invalid {
                filter: text.clone(),
                message: e.to_string(),
            })?;
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
    fn a_generations_level_ends_an_override_and_unset_restores_the_startup_filter() {
        let (level, _subscriber) = log_level("kmesh_agent=debug,warn");
        level.set("trace").unwrap();
        assert!(level.overridden());
        assert_eq!(
            level.apply(Wanted::Level(LevelFilter::ERROR)).unwrap(),
            "error"
        );
        assert!(!level.overridden());
        let restored = level.apply(Wanted::Startup).unwrap();
        assert!(
            restored.contains("kmesh_agent=debug") && restored.contains("warn"),
            "{restored}"
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
        let set = |level, ends_override| Set {
            wanted: Wanted::Level(level),
            ends_override,
        };
        // The first generation since start: a set level applies, none keeps the startup filter.
        assert_eq!(
            on_generation(None, 4, false),
            set(LevelFilter::DEBUG, false)
        );
        assert_eq!(on_generation(None, 0, false), Keep);
        // The same level again keeps what is in force: an admin override holds.
        assert_eq!(on_generation(Some(4), 4, false), Keep);
        assert_eq!(on_generation(Some(4), 4, true), Keep);
        // A change of level ends the override.
        assert_eq!(
            on_generation(Some(4), 1, true),
            set(LevelFilter::ERROR, true)
        );
        assert_eq!(
            on_generation(Some(2), 5, false),
            set(LevelFilter::TRACE, false)
        );
        // A level unset again restores the startup filter.
        assert_eq!(
            on_generation(Some(3), 0, true),
            Set {
                wanted: Wanted::Startup,
                ends_override: true
            }
        );
        // A value the format does not define changes nothing.
        assert_eq!(on_generation(Some(3), 9, false), Keep);
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
