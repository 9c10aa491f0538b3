//! The container runtime of the fake kubelet: how one container of a kmesh-system pod becomes a
//! host process that sees exactly what its pod spec gives it.
//!
//! The kubelet writes a [`ContainerPlan`] (JSON) and starts the `kmesh-container` helper with it.
//! The helper turns the plan into [`Step`]s ([`steps`], pure) and runs them ([`execute`]) through
//! the [`Sys`] trait, whose only real implementation is [`crate::cluster::sys::RealSys`]; a fake
//! records the calls in the unit tests. Then it execs the container's entrypoint.
//!
//! What a container sees, as under a real container runtime:
//! * its cgroup: the pod's cgroup under its node's cgroup (so the node's programs see it);
//! * its network namespace: the pod's (shared by the pod's containers);
//! * its own mount namespace (`/` made a recursive slave first, so nothing it mounts reaches the
//!   host while host mounts under `HostToContainer` volumes still reach it), whose root is an
//!   overlay over the host's root filesystem (the "image": this machine is Debian 12, as the
//!   images' `debian:bookworm-slim` base) with a tmpfs upper layer that vanishes with the
//!   container; the workspace binary bind-mounted at the image's entrypoint path; `/proc` and `/dev`
//!   of the host (there are no PID namespaces: every pod is `hostPID`), a fresh sysfs of the pod's
//!   network namespace; and every volume bind-mounted at its `mountPath`. `readOnlyRootFilesystem`
//!   makes the overlay read-only. The helper enters the new root first (`pivot_root`, the old root
//!   kept at [`OLD_ROOT`] as the source of the binds, then detached), so every mount point resolves
//!   inside the container — an image symlink such as `/var/run -> /run` never leads to the host —
//!   and `/proc/mounts` lists only the container's mounts, as in a container;
//! * its user: the image's `USER` or `runAsUser`, with `no_new_privs` for
//!   `allowPrivilegeEscalation: false`.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where the host's root stays reachable, inside the new root, until the binds are made.
pub const OLD_ROOT: &str = "/.kmesh-old-root";

/// Everything the helper needs to start one container. Paths named `host` are in the host's mount
/// namespace; `target`s are paths inside the container.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerPlan {
    /// The cgroup directory the container joins (the pod's cgroup).
    pub cgroup: PathBuf,
    /// The pod's network namespace (`/run/netns/...`).
    pub netns: PathBuf,
    /// An empty host directory; in the container's mount namespace a tmpfs is mounted on it to
    /// hold the overlay's upper layer and the merged root.
    pub scratch: PathBuf,
    /// Mounts, in order, after the root overlay.
    pub mounts: Vec<Mount>,
    /// `readOnlyRootFilesystem`.
    pub read_only_root: bool,
    /// The program, as a path inside the container.
    pub program: PathBuf,
    /// argv, including argv\[0\].
    pub argv: Vec<String>,
    /// The whole environment (nothing is inherited).
    pub env: Vec<(String, String)>,
    /// The working directory inside the container.
    pub working_dir: PathBuf,
    /// The user and group to run as (none: stay root).
    pub user: Option<User>,
    /// `allowPrivilegeEscalation: false`.
    pub no_new_privs: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
}

/// One mount inside the container.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    pub target: PathBuf,
    pub source: MountSource,
    pub read_only: bool,
    pub propagation: Propagation,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MountSource {
    /// A bind mount of a host path (with its submounts when `recursive`).
    Bind {
        host: PathBuf,
        recursive: bool,
        kind: NodeKind,
    },
    /// An empty tmpfs.
    Tmpfs,
    /// A fresh sysfs, of the container's network namespace.
    Sysfs,
}

/// What a bind mount's source (and so its mount point) is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeKind {
    Directory,
    File,
}

/// `mountPropagation` of a volume mount.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Propagation {
    /// `None`: nothing propagates either way.
    Private,
    /// `HostToContainer`: host mounts below the source appear in the container.
    HostToContainer,
}

/// One thing the helper does, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    JoinCgroup(PathBuf),
    EnterNetns(PathBuf),
    UnshareMounts,
    /// `mount --make-rslave /`.
    MakeRootSlave,
    MountTmpfs(PathBuf),
    MakeDir(PathBuf),
    MakeFile(PathBuf),
    MountOverlay {
        lower: PathBuf,
        upper: PathBuf,
        work: PathBuf,
        target: PathBuf,
    },
    MountSysfs(PathBuf),
    Bind {
        source: PathBuf,
        target: PathBuf,
        recursive: bool,
    },
    RemountReadOnly(PathBuf),
    SetPropagation(PathBuf, Propagation),
    /// `pivot_root` into `new_root`, keeping the old root at `put_old` (a path inside it).
    PivotRoot {
        new_root: PathBuf,
        put_old: PathBuf,
    },
    /// Detach the old root (lazily: it is busy until the last reference goes).
    DetachOldRoot(PathBuf),
    ChangeDir(PathBuf),
    SetUser(User),
    NoNewPrivs,
}

/// The steps that set up the container described by `plan`, before its exec.
pub fn steps(plan: &ContainerPlan) -> Vec<Step> {
    let upper = plan.scratch.join("upper");
    let work = plan.scratch.join("work");
    let root = plan.scratch.join("root");
    let old_root = PathBuf::from(OLD_ROOT);
    let mut v = vec![
        Step::JoinCgroup(plan.cgroup.clone()),
        Step::EnterNetns(plan.netns.clone()),
        Step::UnshareMounts,
        Step::MakeRootSlave,
        Step::MountTmpfs(plan.scratch.clone()),
        Step::MakeDir(upper.clone()),
        Step::MakeDir(work.clone()),
        Step::MakeDir(root.clone()),
        Step::MountOverlay {
            lower: PathBuf::from("/"),
            upper,
            work,
            target: root.clone(),
        },
        Step::MakeDir(inside(&root, &old_root)),
        Step::PivotRoot {
            new_root: root,
            put_old: old_root.clone(),
        },
    ];
    // From here on paths are the container's; host paths are below the old root.
    for m in &plan.mounts {
        let target = m.target.clone();
        match &m.source {
            MountSource::Bind {
                host,
                recursive,
                kind,
            } => {
                v.push(match kind {
                    NodeKind::Directory => Step::MakeDir(target.clone()),
                    NodeKind::File => Step::MakeFile(target.clone()),
                });
                v.push(Step::Bind {
                    source: inside(&old_root, host),
                    target: target.clone(),
                    recursive: *recursive,
                });
            }
            MountSource::Tmpfs => {
                v.push(Step::MakeDir(target.clone()));
                v.push(Step::MountTmpfs(target.clone()));
            }
            MountSource::Sysfs => {
                v.push(Step::MakeDir(target.clone()));
                v.push(Step::MountSysfs(target.clone()));
            }
        }
        if m.read_only {
            v.push(Step::RemountReadOnly(target.clone()));
        }
        v.push(Step::SetPropagation(target, m.propagation));
    }
    v.push(Step::DetachOldRoot(old_root));
    if plan.read_only_root {
        v.push(Step::RemountReadOnly(PathBuf::from("/")));
    }
    v.push(Step::ChangeDir(plan.working_dir.clone()));
    if let Some(user) = plan.user {
        v.push(Step::SetUser(user));
    }
    if plan.no_new_privs {
        v.push(Step::NoNewPrivs);
    }
    v
}

/// Absolute path `target` below the directory `root`.
fn inside(root: &Path, target: &Path) -> PathBuf {
    root.join(target.strip_prefix("/").unwrap_or(target))
}

/// The system calls the steps need. [`crate::cluster::sys::RealSys`] makes them for real.
pub trait Sys {
    fn join_cgroup(&mut self, cgroup: &Path) -> std::io::Result<()>;
    fn enter_netns(&mut self, netns: &Path) -> std::io::Result<()>;
    fn unshare_mounts(&mut self) -> std::io::Result<()>;
    fn make_root_slave(&mut self) -> std::io::Result<()>;
    fn mount_tmpfs(&mut self, target: &Path) -> std::io::Result<()>;
    fn make_dir(&mut self, path: &Path) -> std::io::Result<()>;
    fn make_file(&mut self, path: &Path) -> std::io::Result<()>;
    fn mount_overlay(
        &mut self,
        lower: &Path,
        upper: &Path,
        work: &Path,
        target: &Path,
    ) -> std::io::Result<()>;
    fn mount_sysfs(&mut self, target: &Path) -> std::io::Result<()>;
    fn bind(&mut self, source: &Path, target: &Path, recursive: bool) -> std::io::Result<()>;
    fn remount_read_only(&mut self, target: &Path) -> std::io::Result<()>;
    fn set_propagation(&mut self, target: &Path, propagation: Propagation) -> std::io::Result<()>;
    fn pivot_root(&mut self, new_root: &Path, put_old: &Path) -> std::io::Result<()>;
    fn detach(&mut self, path: &Path) -> std::io::Result<()>;
    fn change_dir(&mut self, path: &Path) -> std::io::Result<()>;
    fn set_user(&mut self, user: User) -> std::io::Result<()>;
    fn no_new_privs(&mut self) -> std::io::Result<()>;
}

/// Runs `steps` in order; the first failure stops them and names its step.
pub fn execute(steps: &[Step], sys: &mut impl Sys) -> Result<(), String> {
    for (i, step) in steps.iter().enumerate() {
        let r = match step {
            Step::JoinCgroup(p) => sys.join_cgroup(p),
            Step::EnterNetns(p) => sys.enter_netns(p),
            Step::UnshareMounts => sys.unshare_mounts(),
            Step::MakeRootSlave => sys.make_root_slave(),
            Step::MountTmpfs(p) => sys.mount_tmpfs(p),
            Step::MakeDir(p) => sys.make_dir(p),
            Step::MakeFile(p) => sys.make_file(p),
            Step::MountOverlay {
                lower,
                upper,
                work,
                target,
            } => sys.mount_overlay(lower, upper, work, target),
            Step::MountSysfs(p) => sys.mount_sysfs(p),
            Step::Bind {
                source,
                target,
                recursive,
            } => sys.bind(source, target, *recursive),
            Step::RemountReadOnly(p) => sys.remount_read_only(p),
            Step::SetPropagation(p, prop) => sys.set_propagation(p, *prop),
            Step::PivotRoot { new_root, put_old } => sys.pivot_root(new_root, put_old),
            Step::DetachOldRoot(p) => sys.detach(p),
            Step::ChangeDir(p) => sys.change_dir(p),
            Step::SetUser(u) => sys.set_user(*u),
            Step::NoNewPrivs => sys.no_new_privs(),
        };
        r.map_err(|e| format!("step {} of {} ({step:?}): {e}", i + 1, steps.len()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> ContainerPlan {
        ContainerPlan {
            cgroup: "/cg/node/podX".into(),
            netns: "/run/netns/kmt-x".into(),
            scratch: "/tmp/s".into(),
            mounts: vec![
                Mount {
                    target: "/etc/kmesh/tls".into(),
                    source: MountSource::Bind {
                        host: "/tmp/vol/tls".into(),
                        recursive: false,
                        kind: NodeKind::Directory,
                    },
                    read_only: true,
                    propagation: Propagation::Private,
                },
                Mount {
                    target: "/etc/hosts".into(),
                    source: MountSource::Bind {
                        host: "/tmp/hosts".into(),
                        recursive: false,
                        kind: NodeKind::File,
                    },
                    read_only: false,
                    propagation: Propagation::Private,
                },
            ],
            read_only_root: true,
            program: "/usr/local/bin/x".into(),
            argv: vec!["/usr/local/bin/x".into()],
            env: vec![],
            working_dir: "/".into(),
            user: Some(User {
                uid: 65532,
                gid: 65532,
            }),
            no_new_privs: true,
        }
    }

    #[test]
    fn steps_mount_volumes_inside_the_root_then_pivot_then_drop_privileges() {
        let s = steps(&plan());
        let pos = |want: &Step| {
            s.iter()
                .position(|x| x == want)
                .unwrap_or_else(|| panic!("{want:?} missing from {s:#?}"))
        };
        assert_eq!(s[0], Step::JoinCgroup("/cg/node/podX".into()));
        assert_eq!(s[1], Step::EnterNetns("/run/netns/kmt-x".into()));
        let tls = PathBuf::from("/etc/kmesh/tls");
        let pivot = pos(&Step::PivotRoot {
            new_root: "/tmp/s/root".into(),
            put_old: OLD_ROOT.into(),
        });
        assert!(pos(&Step::MakeDir("/tmp/s/root/.kmesh-old-root".into())) < pivot);
        // Mount points are made after the pivot, so they resolve inside the container; the
        // sources are the host's, below the old root.
        let bind = pos(&Step::Bind {
            source: "/.kmesh-old-root/tmp/vol/tls".into(),
            target: tls.clone(),
            recursive: false,
        });
        assert!(pivot < pos(&Step::MakeDir(tls.clone())));
        assert!(pos(&Step::MakeDir(tls.clone())) < bind);
        assert!(bind < pos(&Step::RemountReadOnly(tls)));
        assert!(pos(&Step::MakeFile("/etc/hosts".into())) < pos(&Step::NoNewPrivs));
        let detach = pos(&Step::DetachOldRoot(OLD_ROOT.into()));
        let ro_root = pos(&Step::RemountReadOnly("/".into()));
        assert!(bind < detach && detach < ro_root);
        assert!(
            ro_root
                < pos(&Step::SetUser(User {
                    uid: 65532,
                    gid: 65532
                }))
        );
        // A writable root is left writable; a writable volume is not remounted.
        let mut p = plan();
        p.read_only_root = false;
        p.user = None;
        let s = steps(&p);
        assert!(!s.contains(&Step::RemountReadOnly("/".into())));
        assert!(!s.contains(&Step::RemountReadOnly("/etc/hosts".into())));
        assert!(!s.iter().any(|x| matches!(x, Step::SetUser(_))));
    }

    /// Records calls; fails the call whose index is `fail_at`.
    struct FakeSys {
        calls: Vec<String>,
        fail_at: Option<usize>,
    }

    impl FakeSys {
        fn call(&mut self, what: String) -> std::io::Result<()> {
            self.calls.push(what);
            if Some(self.calls.len() - 1) == self.fail_at {
                return Err(std::io::Error::from_raw_os_error(libc::EPERM));
            }
            Ok(())
        }
    }

    impl Sys for FakeSys {
        fn join_cgroup(&mut self, p: &Path) -> std::io::Result<()> {
            self.call(format!("cgroup {}", p.display()))
        }
        fn enter_netns(&mut self, p: &Path) -> std::io::Result<()> {
            self.call(format!("netns {}", p.display()))
        }
        fn unshare_mounts(&mut self) -> std::io::Result<()> {
            self.call("unshare".into())
        }
        fn make_root_slave(&mut self) -> std::io::Result<()> {
            self.call("rslave".into())
        }
        fn mount_tmpfs(&mut self, p: &Path) -> std::io::Result<()> {
            self.call(format!("tmpfs {}", p.display()))
        }
        fn make_dir(&mut self, p: &Path) -> std::io::Result<()> {
            self.call(format!("mkdir {}", p.display()))
        }
        fn make_file(&mut self, p: &Path) -> std::io::Result<()> {
            self.call(format!("touch {}", p.display()))
        }
        fn mount_overlay(&mut self, _: &Path, _: &Path, _: &Path, t: &Path) -> std::io::Result<()> {
            self.call(format!("overlay {}", t.display()))
        }
        fn mount_sysfs(&mut self, p: &Path) -> std::io::Result<()> {
            self.call(format!("sysfs {}", p.display()))
        }
        fn bind(&mut self, s: &Path, t: &Path, _: bool) -> std::io::Result<()> {
            self.call(format!("bind {} {}", s.display(), t.display()))
        }
        fn remount_read_only(&mut self, p: &Path) -> std::io::Result<()> {
            self.call(format!("ro {}", p.display()))
        }
        fn set_propagation(&mut self, p: &Path, _: Propagation) -> std::io::Result<()> {
            self.call(format!("propagation {}", p.display()))
        }
        fn pivot_root(&mut self, p: &Path, _: &Path) -> std::io::Result<()> {
            self.call(format!("pivot {}", p.display()))
        }
        fn detach(&mut self, p: &Path) -> std::io::Result<()> {
            self.call(format!("detach {}", p.display()))
        }
        fn change_dir(&mut self, p: &Path) -> std::io::Result<()> {
            self.call(format!("cd {}", p.display()))
        }
        fn set_user(&mut self, u: User) -> std::io::Result<()> {
            self.call(format!("user {}", u.uid))
        }
        fn no_new_privs(&mut self) -> std::io::Result<()> {
            self.call("nnp".into())
        }
    }

    #[test]
    fn execute_runs_every_step_and_names_the_one_that_fails() {
        let s = steps(&plan());
        let mut sys = FakeSys {
            calls: vec![],
            fail_at: None,
        };
        execute(&s, &mut sys).unwrap();
        assert_eq!(sys.calls.len(), s.len());
        assert_eq!(sys.calls.last().unwrap(), "nnp");

        let mut sys = FakeSys {
            calls: vec![],
            fail_at: Some(2),
        };
        let err = execute(&s, &mut sys).unwrap_err();
        assert!(err.starts_with("step 3 of"), "{err}");
        assert!(err.contains("UnshareMounts"), "{err}");
        assert_eq!(sys.calls.len(), 3, "nothing runs after a failed step");
    }
}
