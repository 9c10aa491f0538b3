//! Starting a process inside a cgroup: the child joins it between fork and exec, so it never runs
//! outside it, and killing the cgroup kills it and anything it started.
use std::{
    ffi::CString,
    io,
    os::unix::{ffi::OsStrExt as _, process::CommandExt as _},
    path::Path,
    process::{Child, Command},
};

use crate::cmd::describe;

/// Spawns `cmd` as a member of the cgroup directory `cgroup`.
pub fn spawn_in_cgroup(cmd: &mut Command, cgroup: &Path) -> io::Result<Child> {
    join_cgroup_before_exec(cmd, cgroup)?;
    cmd.spawn().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "spawn `{}` in cgroup {}: {e}",
                describe(cmd),
                cgroup.display()
            ),
        )
    })
}

/// Makes `cmd`'s child join the cgroup directory `cgroup` between fork and exec (it writes "0",
/// itself in cgroup v2 terms, to `cgroup.procs`), so it never runs outside it.
pub fn join_cgroup_before_exec(cmd: &mut Command, cgroup: &Path) -> io::Result<()> {
    let procs = cgroup.join("cgroup.procs");
    let procs_c = CString::new(procs.as_os_str().as_bytes())
        .map_err(|_| io::Error::other("cgroup path contains NUL"))?;
    // SAFETY: the closure makes only async-signal-safe syscalls (open/write/close) on memory
    // prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs_c.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let r = libc::write(fd, b"0".as_ptr().cast(), 1);
            let e = io::Error::last_os_error();
            libc::close(fd);
            if r != 1 {
                return Err(e);
            }
            Ok(())
        });
    }
    Ok(())
}
