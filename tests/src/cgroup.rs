//! Test cgroups under the cgroup v2 mount.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::names::{self, NameClaim, PREFIX};

/// How long cleanup waits for killed processes to leave a cgroup.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);

/// The mount point of the cgroup v2 hierarchy, from `/proc/mounts` (fstype `cgroup2`).
pub fn cgroup2_root() -> io::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    mounts
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let (_dev, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_path(dir)))
        })
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                "no cgroup2 filesystem in /proc/mounts: kmesh-rs needs cgroup v2 \
                 (mount -t cgroup2 none /sys/fs/cgroup/unified)",
            )
        })
}

/// `/proc/mounts` escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mount_path(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = b[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A cgroup `kmt-<name>-<pid>` directly under the cgroup v2 root. Dropping it kills
/// every process still in it (and in any child cgroup), then removes it.
#[derive(Debug)]
pub struct TestCgroup {
    path: PathBuf,
    _claim: NameClaim,
}

impl TestCgroup {
    /// Creates the cgroup. `name` must be unique among the live cgroups of this
    /// process; letters, digits, `_` and `-`, no all-digit part.
    pub fn new(name: &str) -> io::Result<TestCgroup> {
        crate::init();
        names::validate_test_name(name)?;
        let dir = format!("{PREFIX}{name}-{}", names::my_pid());
        let claim = NameClaim::new(format!("cgroup {dir}"))?;
        let path = cgroup2_root()?.join(&dir);
        if path.exists() {
            // A leftover of an earlier process that had our pid.
            remove_cgroup_tree(&path)?;
        }
        std::fs::create_dir(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("mkdir {}: {e}", path.display())))?;
        Ok(TestCgroup {
            path,
            _claim: claim,
        })
    }

    /// The cgroup's directory (e.g. to open it and attach eBPF programs).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Pids of the processes in this cgroup (not in its children).
    pub fn procs(&self) -> io::Result<Vec<i32>> {
        read_procs(&self.path)
    }

    /// Moves process `pid` into this cgroup.
    pub fn add_pid(&self, pid: u32) -> io::Result<()> {
        let p = self.path.join("cgroup.procs");
        std::fs::write(&p, pid.to_string())
            .map_err(|e| io::Error::new(e.kind(), format!("write {pid} to {}: {e}", p.display())))
    }

    /// SIGKILLs every process in this cgroup and its children, and waits until they
    /// are gone.
    pub fn kill_all(&self) -> io::Result<()> {
        kill_and_wait(&self.path)
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if let Err(e) = remove_cgroup_tree(&self.path) {
            eprintln!(
                "kmesh-tests: cleanup of cgroup {} failed: {e}",
                self.path.display()
            );
        }
    }
}

fn read_procs(dir: &Path) -> io::Result<Vec<i32>> {
    let p = dir.join("cgroup.procs");
    let s = std::fs::read_to_string(&p)
        .map_err(|e| io::Error::new(e.kind(), format!("read {}: {e}", p.display())))?;
    Ok(s.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// Whether the cgroup or any descendant still has processes (`cgroup.events`).
fn populated(dir: &Path) -> io::Result<bool> {
    let s = std::fs::read_to_string(dir.join("cgroup.events"))?;
    Ok(s.lines().any(|l| l.trim() == "populated 1"))
}

fn kill_and_wait(dir: &Path) -> io::Result<()> {
    let kill_file = dir.join("cgroup.kill"); // Linux 5.14+: kills the whole subtree
    let deadline = Instant::now() + KILL_TIMEOUT;
    loop {
        if !populated(dir)? {
            return Ok(());
        }
        if kill_file.exists() {
            std::fs::write(&kill_file, "1")?;
        }
        // Also by pid, for kernels without cgroup.kill and for children cgroups.
        kill_tree_procs(dir)?;
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "processes {:?} still in {} {KILL_TIMEOUT:?} after SIGKILL",
                    read_procs(dir).unwrap_or_default(),
                    dir.display()
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn kill_tree_procs(dir: &Path) -> io::Result<()> {
    for pid in read_procs(dir)? {
        // SAFETY: plain syscall; ESRCH (already gone) is fine.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    for sub in child_cgroups(dir)? {
        kill_tree_procs(&sub)?;
    }
    Ok(())
}

fn child_cgroups(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            v.push(e.path());
        }
    }
    Ok(v)
}

/// Kills everything in the cgroup at `dir` and its descendants, then removes them all
/// (deepest first). A missing `dir` is not an error.
pub(crate) fn remove_cgroup_tree(dir: &Path) -> io::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    kill_and_wait(dir)?;
    rmdir_tree(dir)
}

fn rmdir_tree(dir: &Path) -> io::Result<()> {
    for sub in child_cgroups(dir)? {
        rmdir_tree(&sub)?;
    }
    // rmdir can briefly fail with EBUSY right after the last process left.
    let deadline = Instant::now() + KILL_TIMEOUT;
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() < deadline && e.raw_os_error() == Some(libc::EBUSY) => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("rmdir {}: {e}", dir.display()),
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn unescape() {
        assert_eq!(super::unescape_mount_path("/a\\040b"), "/a b");
        assert_eq!(
            super::unescape_mount_path("/sys/fs/cgroup"),
            "/sys/fs/cgroup"
        );
        assert_eq!(super::unescape_mount_path("/x\\"), "/x\\");
    }
}
