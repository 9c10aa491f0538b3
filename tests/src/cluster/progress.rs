//! Progress lines of the cluster harness, on stderr with the time since the cluster started.
//!
//! They are written to the process's stderr directly rather than with `eprintln!`, which the test
//! harness captures: a cluster test takes minutes, and its progress and timings should be visible
//! while it runs, also when it passes.
use std::{
    io::Write as _,
    sync::OnceLock,
    time::{Duration, Instant},
};

static START: OnceLock<Instant> = OnceLock::new();

/// Starts the clock (the first call wins).
pub fn start_clock() {
    START.get_or_init(Instant::now);
}

/// Time since [`start_clock`].
pub fn elapsed() -> Duration {
    START.get_or_init(Instant::now).elapsed()
}

/// Writes one progress line: `[cluster  12.3s] message`.
pub fn line(message: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "[cluster {:6.1}s] {message}", elapsed().as_secs_f64());
}

/// `format!`-style [`line`].
#[macro_export]
macro_rules! progress {
    ($($arg:tt)*) => {
        $crate::cluster::progress::line(&format!($($arg)*))
    };
}
