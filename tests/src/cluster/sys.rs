//! The raw system calls of the container runtime ([`super::runtime::Sys`]), and nothing else.
//!
//! Only the `kmesh-container` helper process calls these, after it has left the host's mount
//! namespace ([`RealSys::unshare_mounts`] and [`RealSys::make_root_slave`] come before any mount),
//! so no mount made here is visible to the host. Every error names the call and its paths.
use std::{
    ffi::CString,
    fs::File,
    io,
    os::{fd::AsRawFd as _, unix::ffi::OsStrExt as _},
    path::Path,
};

use super::runtime::{Propagation, Sys, User};

pub struct RealSys;

fn c_path(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} contains NUL", p.display()),
        )
    })
}

fn check(r: libc::c_int, what: impl FnOnce() -> String) -> io::Result<()> {
    if r == 0 {
        Ok(())
    } else {
        let e = io::Error::last_os_error();
        Err(io::Error::new(e.kind(), format!("{}: {e}", what())))
    }
}

/// `mount(2)`; `source`, `fstype` and `data` may be absent.
fn mount(
    source: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let cs = |s: &str| CString::new(s).map_err(|_| io::Error::other("NUL in mount argument"));
    let source_c = source.map(cs).transpose()?;
    let fstype_c = fstype.map(cs).transpose()?;
    let data_c = data.map(cs).transpose()?;
    let target_c = c_path(target)?;
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string that outlives the call.
    let r = unsafe {
        libc::mount(
            ptr(&source_c),
            target_c.as_ptr(),
            ptr(&fstype_c),
            flags,
            ptr(&data_c).cast(),
        )
    };
    check(r, || {
        format!(
            "mount(source {source:?}, target {}, type {fstype:?}, flags {flags:#x}, data {data:?})",
            target.display()
        )
    })
}

impl Sys for RealSys {
    fn join_cgroup(&mut self, cgroup: &Path) -> io::Result<()> {
        let procs = cgroup.join("cgroup.procs");
        // "0" moves the writing process itself (cgroup v2).
        std::fs::write(&procs, "0")
            .map_err(|e| io::Error::new(e.kind(), format!("write 0 to {}: {e}", procs.display())))
    }

    fn enter_netns(&mut self, netns: &Path) -> io::Result<()> {
        let f = File::open(netns)
            .map_err(|e| io::Error::new(e.kind(), format!("open {}: {e}", netns.display())))?;
        // SAFETY: plain syscall on an fd we own; the helper is single-threaded.
        check(
            unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) },
            || format!("setns({}, CLONE_NEWNET)", netns.display()),
        )
    }

    fn unshare_mounts(&mut self) -> io::Result<()> {
        // SAFETY: plain syscall.
        check(unsafe { libc::unshare(libc::CLONE_NEWNS) }, || {
            "unshare(CLONE_NEWNS)".into()
        })
    }

    fn make_root_slave(&mut self) -> io::Result<()> {
        mount(
            None,
            Path::new("/"),
            None,
            libc::MS_REC | libc::MS_SLAVE,
            None,
        )
    }

    fn mount_tmpfs(&mut self, target: &Path) -> io::Result<()> {
        mount(Some("tmpfs"), target, Some("tmpfs"), 0, Some("mode=755"))
    }

    fn make_dir(&mut self, path: &Path) -> io::Result<()> {
        std::fs::create_dir_all(path)
            .map_err(|e| io::Error::new(e.kind(), format!("mkdir -p {}: {e}", path.display())))
    }

    fn make_file(&mut self, path: &Path) -> io::Result<()> {
        if let Some(parent) = path.parent() {
            self.make_dir(parent)?;
        }
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map(drop)
            .map_err(|e| io::Error::new(e.kind(), format!("create {}: {e}", path.display())))
    }

    fn mount_overlay(
        &mut self,
        lower: &Path,
        upper: &Path,
        work: &Path,
        target: &Path,
    ) -> io::Result<()> {
        let data = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.display(),
            work.display()
        );
        mount(Some("overlay"), target, Some("overlay"), 0, Some(&data))
    }

    fn mount_sysfs(&mut self, target: &Path) -> io::Result<()> {
        mount(Some("sysfs"), target, Some("sysfs"), 0, None)
    }

    fn bind(&mut self, source: &Path, target: &Path, recursive: bool) -> io::Result<()> {
        let flags = libc::MS_BIND | if recursive { libc::MS_REC } else { 0 };
        let source = source.to_str().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not UTF-8", source.display()),
            )
        })?;
        mount(Some(source), target, None, flags, None)
    }

    fn remount_read_only(&mut self, target: &Path) -> io::Result<()> {
        // On a bind remount only the per-mount flags change: the host's view stays writable.
        mount(
            None,
            target,
            None,
            libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
            None,
        )
    }

    fn set_propagation(&mut self, target: &Path, propagation: Propagation) -> io::Result<()> {
        let flags = match propagation {
            Propagation::Private => libc::MS_REC | libc::MS_PRIVATE,
            Propagation::HostToContainer => libc::MS_REC | libc::MS_SLAVE,
        };
        mount(None, target, None, flags, None)
    }

    fn pivot_root(&mut self, new_root: &Path, put_old: &Path) -> io::Result<()> {
        let new_c = c_path(new_root)?;
        // put_old is a path inside the new root: relative to it for the call.
        let put_old_c = c_path(&new_root.join(put_old.strip_prefix("/").unwrap_or(put_old)))?;
        // SAFETY: plain syscall with valid NUL-terminated strings.
        check(
            unsafe {
                libc::syscall(libc::SYS_pivot_root, new_c.as_ptr(), put_old_c.as_ptr()) as i32
            },
            || format!("pivot_root({}, {})", new_root.display(), put_old.display()),
        )?;
        self.change_dir(Path::new("/"))
    }

    fn detach(&mut self, path: &Path) -> io::Result<()> {
        let c = c_path(path)?;
        // SAFETY: plain syscall with a valid NUL-terminated string.
        check(
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) },
            || format!("umount2({}, MNT_DETACH)", path.display()),
        )
    }

    fn change_dir(&mut self, path: &Path) -> io::Result<()> {
        std::env::set_current_dir(path)
            .map_err(|e| io::Error::new(e.kind(), format!("chdir {}: {e}", path.display())))
    }

    fn set_user(&mut self, user: User) -> io::Result<()> {
        // SAFETY: plain syscalls; groups first, then gid, then uid (after which we could not).
        check(unsafe { libc::setgroups(0, std::ptr::null()) }, || {
            "setgroups([])".into()
        })?;
        check(unsafe { libc::setgid(user.gid) }, || {
            format!("setgid({})", user.gid)
        })?;
        check(unsafe { libc::setuid(user.uid) }, || {
            format!("setuid({})", user.uid)
        })
    }

    fn no_new_privs(&mut self) -> io::Result<()> {
        // SAFETY: plain syscall.
        check(
            unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) },
            || "prctl(PR_SET_NO_NEW_PRIVS)".into(),
        )
    }
}
