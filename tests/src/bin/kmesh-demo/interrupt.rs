//! Ctrl-C (SIGINT), SIGTERM and SIGHUP: the demo stops at its next check and returns, so that
//! everything it made is dropped and removed (namespaces, cgroups, pins, processes, the cluster).
//! A second signal exits at once; the next run of any kmesh-rs test or demo sweeps what is left
//! (every name carries the pid, and the sweep takes those of dead pids).
//!
//! How: [`install`] sets a handler for the three signals (`sigaction`, `SA_RESTART`) that only
//! records the request, or exits at once on the second. No signal is blocked: a blocked mask is
//! inherited by every process the demo starts (the operator, the agent, the cluster's processes),
//! which then could not be stopped with SIGTERM; handlers, unlike the mask, are reset by `exec`.
//! The raw calls are all here.
use std::{
    io,
    sync::atomic::{AtomicBool, Ordering},
};

static REQUESTED: AtomicBool = AtomicBool::new(false);

/// The exit status after an interruption (128 + SIGINT, as shells report it).
pub const EXIT_STATUS: u8 = 130;

/// The message of the error a check returns once a stop was asked for.
pub const INTERRUPTED: &str = "interrupted";

const FIRST: &str = "\nkmesh-demo: stopping after the current operation and removing everything \
                     the demo made (again to exit at once)\n";
const SECOND: &str = "\nkmesh-demo: second signal: exiting now; the next run of the demo or of the \
                      tests removes what is left\n";

/// Takes over SIGINT, SIGTERM and SIGHUP. Call it first in `main`.
pub fn install() -> io::Result<()> {
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: a zeroed sigaction with an empty mask and a handler that only makes
        // async-signal-safe calls (an atomic swap, write(2), _exit(2)).
        let r = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut())
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Whether a stop was asked for.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// `Err("interrupted")` once a stop was asked for: the demo's steps call it between operations.
pub fn check() -> Result<(), String> {
    if requested() {
        Err(INTERRUPTED.into())
    } else {
        Ok(())
    }
}

extern "C" fn on_signal(_signal: libc::c_int) {
    let second = REQUESTED.swap(true, Ordering::SeqCst);
    let message = if second { SECOND } else { FIRST };
    // SAFETY: write(2) and _exit(2) are async-signal-safe; the message is a static string.
    unsafe {
        libc::write(libc::STDERR_FILENO, message.as_ptr().cast(), message.len());
        if second {
            libc::_exit(i32::from(EXIT_STATUS));
        }
    }
}

/// Observes with `observe` every 20 ms until `done` holds for what it saw (returned), `observe`
/// fails, a stop is asked for, or `timeout` passes: the error then says what was awaited, what
/// was seen last, and `diagnose()`.
pub fn wait_until<T: std::fmt::Debug>(
    timeout: std::time::Duration,
    what: &str,
    mut observe: impl FnMut() -> Result<T, String>,
    done: impl Fn(&T) -> bool,
    diagnose: impl FnOnce() -> String,
) -> Result<T, String> {
    let started = std::time::Instant::now();
    loop {
        check()?;
        let seen = observe()?;
        if done(&seen) {
            return Ok(seen);
        }
        if started.elapsed() > timeout {
            return Err(format!(
                "{what}: not after {timeout:?}; last seen: {seen:?}\n{}",
                diagnose()
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
