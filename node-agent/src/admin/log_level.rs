//! The agent's log filter, changed at runtime through the admin server (`/debug/log-level`).
//!
//! `main.rs` builds the tracing subscriber with its filter inside a [`reload::Layer`] and hands the
//! handle to [`install`]; the admin server reads and replaces the filter through [`LogLevel`]. The
//! subscriber is process-wide, so the handle is too: one per process, set once. A change lasts
//! until the agent restarts. A filter that does not parse changes nothing.
//!
//! Accepted: a level (`debug`), or an EnvFilter directive list (`kmesh_agent=debug,info`). Stricter
//! than EnvFilter in one way: a bare word that is not a level (`verbose`) is refused, where EnvFilter
//! would read it as "everything of target `verbose`" and quietly change nothing useful.
use std::sync::OnceLock;

use tracing_subscriber::{EnvFilter, Registry, filter::LevelFilter, reload};

/// The handle of the filter layer `main.rs` installs directly over the registry.
pub type ReloadHandle = reload::Handle<EnvFilter, Registry>;

/// The process's log filter, readable and replaceable.
pub struct LogLevel {
    handle: ReloadHandle,
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

static PROCESS_LOG_LEVEL: OnceLock<LogLevel> = OnceLock::new();

/// Makes the process's filter changeable through the admin server; called once by `main.rs`. A
/// second call is ignored (the first subscriber stays the process's).
pub fn install(handle: ReloadHandle) {
    let _ = PROCESS_LOG_LEVEL.set(LogLevel { handle });
}

/// The process's filter, if [`install`] was called (the `kmesh-agent` binary always does).
pub fn process() -> Option<&'static LogLevel> {
    PROCESS_LOG_LEVEL.get()
}

impl LogLevel {
    pub fn new(handle: ReloadHandle) -> LogLevel {
        LogLevel { handle }
    }

    /// The filter in force, as EnvFilter writes it (`info`, `kmesh_agent=debug,info`).
    pub fn current(&self) -> Result<String, LogLevelError> {
        self.handle
            .with_current(|filter| filter.to_string())
            .map_err(|e| LogLevelError::Unavailable(e.to_string()))
    }

    /// Replaces the filter with `text` (see [`parse`]); returns the new filter. On an error the
    /// filter is unchanged.
    pub fn set(&self, text: &str) -> Result<String, LogLevelError> {
        let filter = parse(text)?;
        self.handle
            .reload(filter)
            .map_err(|e| LogLevelError::Unavailable(e.to_string()))?;
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
