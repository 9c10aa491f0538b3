//! Removing what crashed earlier runs left behind.

use crate::cgroup::{cgroup2_root, remove_cgroup_tree};
use crate::names::{PREFIX, owner_pid, pid_alive};
use crate::netns::list_netns;

/// Removes `kmt-*` cgroups (killing their processes), pin directories, temporary files and
/// network namespaces whose owning pid (encoded in the name) no longer exists. Returns what it removed;
/// failures are reported on stderr. Objects of live processes (including this one)
/// are never touched, so this is safe while other tests run.
///
/// Called automatically, once per process, by the first [`crate::TestNetwork::new`]
/// or [`crate::TestCgroup::new`].
pub fn sweep_leftovers() -> Vec<String> {
    let mut removed = Vec::new();
    let stale =
        |name: &str| name.starts_with(PREFIX) && owner_pid(name).is_some_and(|p| !pid_alive(p));

    // Cgroups first: killing leftover probes also releases the netns they were in.
    match cgroup2_root().and_then(std::fs::read_dir) {
        Ok(rd) => {
            for e in rd.filter_map(|e| e.ok()) {
                let Ok(name) = e.file_name().into_string() else {
                    continue;
                };
                if !stale(&name) {
                    continue;
                }
                match remove_cgroup_tree(&e.path()) {
                    Ok(()) => removed.push(format!("cgroup {}", e.path().display())),
                    Err(err) => eprintln!("kmesh-tests: sweep of cgroup {name} failed: {err}"),
                }
            }
        }
        Err(err) => eprintln!("kmesh-tests: sweep: cannot list cgroups: {err}"),
    }

    // Pins of agents whose test died: removing the link pins detaches their programs.
    if let Ok(rd) = std::fs::read_dir(crate::agent::BPFFS_ROOT) {
        for e in rd.filter_map(|e| e.ok()) {
            let Ok(name) = e.file_name().into_string() else {
                continue;
            };
            if !stale(&name) {
                continue;
            }
            match crate::agent::remove_pins(&e.path()) {
                Ok(()) => removed.push(format!("bpffs {}", e.path().display())),
                Err(err) => eprintln!("kmesh-tests: sweep of pins {name} failed: {err}"),
            }
        }
    }

    // Temporary files and directories (a cluster's holds its etcd data and pod logs).
    if let Ok(rd) = std::fs::read_dir(std::env::temp_dir()) {
        for e in rd.filter_map(|e| e.ok()) {
            let Ok(name) = e.file_name().into_string() else {
                continue;
            };
            if !stale(&name) {
                continue;
            }
            let path = e.path();
            let r = if e.file_type().is_ok_and(|t| t.is_dir()) {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            match r {
                Ok(()) => removed.push(format!("temp {}", path.display())),
                Err(err) => eprintln!("kmesh-tests: sweep of {} failed: {err}", path.display()),
            }
        }
    }

    match list_netns() {
        Ok(all) => {
            for name in all.into_iter().filter(|n| stale(n)) {
                match crate::cmd::ip(&["netns", "del", &name]) {
                    Ok(_) => removed.push(format!("netns {name}")),
                    Err(err) => eprintln!("kmesh-tests: sweep of netns {name} failed: {err}"),
                }
            }
        }
        Err(err) => eprintln!("kmesh-tests: sweep: cannot list netns: {err}"),
    }
    removed
}
