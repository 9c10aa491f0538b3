//! kubectl, the cached v1.36.3 one (not whatever `/usr/bin/kubectl` is), with the admin
//! kubeconfig: how the tests drive the cluster, as a user would. Each call is printed as a
//! progress line with its output, and warnings (stderr of a successful call) are kept: they are
//! part of what a user sees.
use std::{
    io::{self, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use crate::progress;

#[derive(Clone, Debug)]
pub struct Kubectl {
    bin: PathBuf,
    kubeconfig: PathBuf,
    /// Where relative paths in arguments resolve (the repository root).
    cwd: PathBuf,
}

/// What one kubectl call printed.
#[derive(Clone, Debug, Default)]
pub struct Output {
    pub stdout: String,
    pub stderr: String,
}

impl Kubectl {
    pub fn new(bin: PathBuf, kubeconfig: PathBuf, cwd: PathBuf) -> Kubectl {
        Kubectl {
            bin,
            kubeconfig,
            cwd,
        }
    }

    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// `kubectl ARGS...`: its stdout, or an error with the command line and its stderr.
    pub fn run(&self, args: &[&str]) -> io::Result<String> {
        self.run_full(args, None).map(|o| o.stdout)
    }

    /// `kubectl ARGS...` with `stdin` fed to it (`-f -`).
    pub fn run_stdin(&self, args: &[&str], stdin: &str) -> io::Result<String> {
        self.run_full(args, Some(stdin)).map(|o| o.stdout)
    }

    /// Like [`run`](Self::run), returning stderr (warnings) too.
    pub fn run_full(&self, args: &[&str], stdin: Option<&str>) -> io::Result<Output> {
        let line = format!("kubectl {}", args.join(" "));
        let started = Instant::now();
        let mut child = Command::new(&self.bin)
            .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .args(args)
            .current_dir(&self.cwd)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("run `{line}` ({}): {e}", self.bin.display()),
                )
            })?;
        if let Some(input) = stdin {
            child
                .stdin
                .take()
                .expect("stdin is piped")
                .write_all(input.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        let output = Output {
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        let shown = |s: &str| {
            let lines: Vec<&str> = s.lines().collect();
            if lines.len() > 12 {
                format!(
                    "{}\n    ... ({} more lines)",
                    lines[..12].join("\n    "),
                    lines.len() - 12
                )
            } else {
                lines.join("\n    ")
            }
        };
        progress!(
            "$ {line}  ({:.1?})\n    {}{}",
            started.elapsed(),
            shown(output.stdout.trim()),
            if output.stderr.trim().is_empty() {
                String::new()
            } else {
                format!("\n    stderr: {}", shown(output.stderr.trim()))
            }
        );
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "`{line}` failed ({}): {}{}",
                out.status,
                output.stderr.trim(),
                output.stdout.trim()
            )));
        }
        Ok(output)
    }
}
