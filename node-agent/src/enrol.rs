//! Enrolment: matching this node's mesh workloads to their network namespaces.
//!
//! The snapshot lists the node's enrolled workloads by pod IP. The programs key enrolment by
//! network namespace cookie, so the agent finds the namespace that holds each pod IP — among the
//! named namespaces in /run/netns and every process's /proc/PID/ns/net — and writes its cookie to
//! the enrolled map. Namespaces come and go with pods; `Enroller::sync` runs every second.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs::{self, File},
    io,
    net::IpAddr,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::PathBuf,
};

use kmesh_common::{EnrolledNetns, Ip16, WorkloadRecord, ip16};
use tracing::{debug, info};

use crate::maps::{EnrolledMap, MapsError};

/// A network namespace as seen from inside.
#[derive(Clone, Debug)]
pub struct Netns {
    pub cookie: u64,
    pub addrs: Vec<IpAddr>,
}

/// Finds every network namespace reachable through /run/netns and /proc, once each.
pub fn discover() -> io::Result<Vec<Netns>> {
    let mut candidates = Vec::new();
    if let Ok(dir) = fs::read_dir("/run/netns") {
        candidates.extend(dir.flatten().map(|e| e.path()));
    }
    for entry in fs::read_dir("/proc")?.flatten() {
        if entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        {
            candidates.push(entry.path().join("ns/net"));
        }
    }
    // The same namespace is reachable through many paths; (device, inode) identifies it.
    let mut seen = HashSet::new();
    let unique: Vec<PathBuf> = candidates
        .into_iter()
        .filter(|p| {
            fs::metadata(p)
                .map(|m| seen.insert((m.dev(), m.ino())))
                .unwrap_or(false)
        })
        .collect();
    // setns() changes the calling thread's namespace: do it on a thread that then exits.
    std::thread::spawn(move || {
        unique
            .into_iter()
            .filter_map(|path| match inspect(&path) {
                Ok((cookie, addrs)) => Some(Netns { cookie, addrs }),
                // A process that exited, or a namespace removed meanwhile: not an error.
                Err(e) => {
                    debug!(path = %path.display(), error = %e, "skipping namespace");
                    None
                }
            })
            .collect()
    })
    .join()
    .map_err(|_| io::Error::other("namespace scan thread panicked"))
}

/// Enters the namespace at `path` (on the current thread) and reads its cookie and addresses.
fn inspect(path: &PathBuf) -> io::Result<(u64, Vec<IpAddr>)> {
    let ns = File::open(path)?;
    // SAFETY: plain syscalls on descriptors we own.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((current_netns_cookie()?, current_addresses()?))
}

/// The cookie of the calling thread's network namespace (SO_NETNS_COOKIE, Linux 5.14+), the same
/// value `bpf_get_netns_cookie` returns to the programs.
pub fn current_netns_cookie() -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    // SAFETY: socket/getsockopt/close on a descriptor we own, with a correctly sized out-buffer.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut cookie: u64 = 0;
        let mut len = size_of::<u64>() as libc::socklen_t;
        let rc = libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        );
        let err = io::Error::last_os_error();
        libc::close(fd);
        if rc != 0 {
            return Err(err);
        }
        Ok(cookie)
    }
}

/// The addresses of the calling thread's network namespace (getifaddrs uses netlink there).
fn current_addresses() -> io::Result<Vec<IpAddr>> {
    let mut addrs = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates a list we walk read-only and free once.
    unsafe {
        if libc::getifaddrs(&mut head) != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut cur = head;
        while !cur.is_null() {
            let sa = (*cur).ifa_addr;
            if !sa.is_null() {
                match i32::from((*sa).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(sa as *const libc::sockaddr_in);
                        addrs.push(IpAddr::from(
                            u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                        ));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(sa as *const libc::sockaddr_in6);
                        addrs.push(IpAddr::from(sin6.sin6_addr.s6_addr));
                    }
                    _ => {}
                }
            }
            cur = (*cur).ifa_next;
        }
        libc::freeifaddrs(head);
    }
    Ok(addrs)
}

/// What one sync changed.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct EnrolStats {
    pub enrolled: usize,
    pub added: usize,
    pub removed: usize,
}

#[derive(thiserror::Error, Debug)]
pub enum EnrolError {
    #[error("scanning network namespaces: {0}")]
    Scan(#[from] io::Error),
    #[error(transparent)]
    Map(#[from] MapsError),
}

/// Keeps the enrolled map equal to "namespaces holding a workload IP of this node".
pub struct Enroller {
    map: EnrolledMap,
}

impl Enroller {
    pub fn new(map: EnrolledMap) -> Self {
        Self { map }
    }

    pub fn sync(&mut self, workloads: &[WorkloadRecord]) -> Result<EnrolStats, EnrolError> {
        let by_ip: HashMap<Ip16, &WorkloadRecord> = workloads.iter().map(|w| (w.ip, w)).collect();
        let mut desired = BTreeMap::new();
        for ns in discover()? {
            let workload = ns.addrs.iter().find_map(|a| by_ip.get(&ip16(*a)));
            if let Some(w) = workload {
                desired.insert(
                    ns.cookie,
                    EnrolledNetns {
                        workload_ip: w.ip,
                        identity: w.identity,
                        pad: 0,
                    },
                );
            }
        }
        let current = self.map.entries()?;
        let mut stats = EnrolStats {
            enrolled: desired.len(),
            ..Default::default()
        };
        for cookie in current.keys().filter(|c| !desired.contains_key(c)) {
            self.map.remove(*cookie)?;
            info!(cookie, "network namespace left the mesh");
            stats.removed += 1;
        }
        for (cookie, value) in &desired {
            if current.get(cookie) != Some(value) {
                self.map.insert(*cookie, *value)?;
                info!(cookie, ip = %IpAddr::from(value.workload_ip).to_canonical(), "network namespace enrolled");
                stats.added += 1;
            }
        }
        Ok(stats)
    }
}
