//! Running external commands (mostly iproute2 `ip`) with errors that say what failed.

use std::io;
use std::process::{Command, Stdio};

/// Runs `cmd` to completion and returns its stdout.
///
/// A failure to start it, or a non-zero exit, is an error naming the command line,
/// the exit status and the command's stderr.
pub fn run(cmd: &mut Command) -> io::Result<String> {
    let line = describe(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("failed to run `{line}`: {e}")))?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "`{line}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `ip ARGS...` in the current (root) network namespace and returns its stdout.
pub fn ip(args: &[&str]) -> io::Result<String> {
    run(Command::new("ip").args(args))
}

/// Runs `ip -n NETNS ARGS...` and returns its stdout.
pub fn ip_in(netns: &str, args: &[&str]) -> io::Result<String> {
    run(Command::new("ip").arg("-n").arg(netns).args(args))
}

/// A shell-like rendering of a command line, for error messages.
pub(crate) fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}
