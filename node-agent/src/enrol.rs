//! Enrolment: matching this node's mesh workloads to their network namespaces.
//!
//! The snapshot lists the node's enrolled workloads by pod IP. The programs key enrolment by
//! network namespace cookie, so the agent finds the namespace that holds each pod IP — among the
//! named namespaces in /run/netns and every process's /proc/PID/ns/net — and writes its cookie to
//! the enrolled map. Namespaces come and go with pods; `Enroller::sync` runs every second.
//!
//! A sync is three steps: [`discover`] the namespaces (I/O), [`plan`] the changes (pure: desired
//! workloads × discovered namespaces × the current map → inserts and removals), and write them.
//! The same sync keeps the authorization links in step with the enrolled namespaces
//! (`netns_links.rs`) and the host addresses map with the node's own addresses (`host_addrs.rs`).
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    fs::{self, File},
    io,
    net::IpAddr,
    os::{fd::AsFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
    sync::Arc,
};

use kmesh_common::{EnrolledNetns, Ip16, WorkloadRecord, ip16};
use kmesh_snapshot::AuthzTables;
use tracing::{debug, info, warn};

use crate::{
    established::{self, Closed},
    host_addrs::{HostAddrMap, HostNetns},
    loader::LoaderError,
    maps::{EnrolledMap, MapsError},
    netns_links::{LinkStats, NetnsLinks},
    sys,
};

/// A network namespace as seen from inside.
#[derive(Clone, Debug)]
pub struct Netns {
    pub cookie: u64,
    pub addrs: Vec<IpAddr>,
    /// The namespace, held open since it was inspected (to attach a link to exactly this
    /// namespace, whatever happened to the path it was found by). `None` in unit tests.
    pub file: Option<Arc<File>>,
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
                Ok(ns) => Some(ns),
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
fn inspect(path: &Path) -> io::Result<Netns> {
    let ns = File::open(path)?;
    sys::enter_netns(ns.as_fd())?;
    Ok(Netns {
        cookie: sys::netns_cookie()?,
        addrs: sys::interface_addresses()?,
        file: Some(Arc::new(ns)),
    })
}

/// What one sync changed.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct EnrolStats {
    pub enrolled: usize,
    pub added: usize,
    pub removed: usize,
    /// The authorization links (one per enrolled namespace).
    pub authz_links: LinkStats,
    /// Entries of the host addresses map.
    pub host_addrs: usize,
    /// Why the host addresses map could not be updated, if it could not.
    pub host_addrs_error: Option<String>,
}

/// The changes that make the enrolled map equal to "namespaces holding a workload IP".
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EnrolPlan {
    /// Entries to write: new namespaces, and namespaces whose workload changed.
    pub inserts: BTreeMap<u64, EnrolledNetns>,
    /// Cookies to delete: namespaces gone, or holding no workload IP any more.
    pub removals: Vec<u64>,
    /// Namespaces enrolled once the plan is carried out.
    pub enrolled: BTreeSet<u64>,
}

/// Pure: which namespaces should be enrolled, given the workloads, the namespaces found and what
/// the map holds now. A namespace holding several workload IPs is enrolled as the first of its
/// addresses that is one.
pub fn plan(
    workloads: &[WorkloadRecord],
    namespaces: &[Netns],
    current: &BTreeMap<u64, EnrolledNetns>,
) -> EnrolPlan {
    let by_ip: HashMap<Ip16, &WorkloadRecord> = workloads.iter().map(|w| (w.ip, w)).collect();
    let desired: BTreeMap<u64, EnrolledNetns> = namespaces
        .iter()
        .filter_map(|ns| {
            let workload = ns.addrs.iter().find_map(|a| by_ip.get(&ip16(*a)))?;
            Some((
                ns.cookie,
                EnrolledNetns {
                    workload_ip: workload.ip,
                    identity: workload.identity,
                    pad: 0,
                },
            ))
        })
        .collect();
    EnrolPlan {
        removals: current
            .keys()
            .filter(|c| !desired.contains_key(c))
            .copied()
            .collect(),
        inserts: desired
            .iter()
            .filter(|(cookie, value)| current.get(cookie) != Some(value))
            .map(|(cookie, value)| (*cookie, *value))
            .collect(),
        enrolled: desired.keys().copied().collect(),
    }
}

#[derive(thiserror::Error, Debug)]
pub enum EnrolError {
    #[error("scanning network namespaces: {0}")]
    Scan(#[from] io::Error),
    #[error(transparent)]
    Map(#[from] MapsError),
    #[error("authorization links: {0}")]
    Links(#[from] LoaderError),
    #[error("reading the host's addresses: {0}")]
    HostAddrs(io::Error),
}

/// Keeps the enrolled map equal to "namespaces holding a workload IP of this node", an
/// authorization link on each of them, and the host addresses map equal to the node's addresses.
pub struct Enroller {
    map: EnrolledMap,
    links: NetnsLinks,
    host_addrs: HostAddrMap,
    host_netns: HostNetns,
    /// The enrolled namespaces of the last sync, held open (to close denied connections in them).
    enrolled: BTreeMap<u64, Arc<File>>,
    /// The last failure to read or write the host addresses, logged once until it changes (the
    /// sync runs every second; the status carries it every time).
    host_addrs_error: Option<String>,
}

impl Enroller {
    pub fn new(
        map: EnrolledMap,
        links: NetnsLinks,
        host_addrs: HostAddrMap,
        host_netns: HostNetns,
    ) -> Self {
        Self {
            map,
            links,
            host_addrs,
            host_netns,
            enrolled: BTreeMap::new(),
            host_addrs_error: None,
        }
    }

    /// Closes, in every enrolled namespace, the established connections `tables` deny (after a
    /// generation was applied; see `established.rs`). A namespace that cannot be swept is logged
    /// and counted; the others are swept still.
    pub fn close_denied(&self, node_mode: u32, tables: &AuthzTables) -> Result<Closed, EnrolError> {
        if !established::can_deny(node_mode, tables) {
            // Nothing can be denied: no namespace to look into (most nodes have no policy).
            return Ok(Closed::default());
        }
        let host: BTreeSet<Ip16> = self
            .host_netns
            .addresses()
            .map_err(EnrolError::HostAddrs)?
            .into_iter()
            .map(ip16)
            .collect();
        let namespaces: Vec<&File> = self.enrolled.values().map(|f| f.as_ref()).collect();
        Ok(established::close_denied(
            &namespaces,
            node_mode,
            tables,
            &host,
        ))
    }

    pub fn sync(&mut self, workloads: &[WorkloadRecord]) -> Result<EnrolStats, EnrolError> {
        let namespaces = discover()?;
        let mut stats = self.sync_enrolled(workloads, &namespaces)?;
        // The host addresses do not hold up enrolment (nor an upgrade's switch, which waits for an
        // enrolment in step): a failure is logged, reported, and retried next round.
        match self.sync_host_addrs() {
            Ok(n) => {
                if self.host_addrs_error.take().is_some() {
                    info!(addresses = n, "host addresses map updated again");
                }
                stats.host_addrs = n;
            }
            Err(e) => {
                let error = e.to_string();
                if self.host_addrs_error.as_ref() != Some(&error) {
                    warn!(%error, "updating the host addresses map; connections from the node may be judged");
                }
                self.host_addrs_error = Some(error.clone());
                stats.host_addrs_error = Some(error);
            }
        }
        Ok(stats)
    }

    fn sync_host_addrs(&mut self) -> Result<usize, EnrolError> {
        let host = self.host_netns.addresses().map_err(EnrolError::HostAddrs)?;
        Ok(self.host_addrs.sync(&host)?)
    }

    /// The enrolled map, then the authorization links of the enrolled namespaces.
    fn sync_enrolled(
        &mut self,
        workloads: &[WorkloadRecord],
        namespaces: &[Netns],
    ) -> Result<EnrolStats, EnrolError> {
        let current = self.map.entries()?;
        let plan = plan(workloads, namespaces, &current);
        for cookie in &plan.removals {
            self.map.remove(*cookie)?;
            info!(cookie, "network namespace left the mesh");
        }
        for (cookie, value) in &plan.inserts {
            self.map.insert(*cookie, *value)?;
            info!(cookie, ip = %IpAddr::from(value.workload_ip).to_canonical(), "network namespace enrolled");
        }
        let open: BTreeMap<u64, Arc<File>> = namespaces
            .iter()
            .filter(|ns| plan.enrolled.contains(&ns.cookie))
            .filter_map(|ns| Some((ns.cookie, ns.file.clone()?)))
            .collect();
        let authz_links = self.links.sync(&open)?;
        self.enrolled = open;
        Ok(EnrolStats {
            enrolled: plan.enrolled.len(),
            added: plan.inserts.len(),
            removed: plan.removals.len(),
            authz_links,
            host_addrs: 0,
            host_addrs_error: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    fn workload(ip: IpAddr, identity: u32) -> WorkloadRecord {
        WorkloadRecord {
            ip: ip16(ip),
            identity,
            pad: 0,
        }
    }

    fn enrolled(ip: IpAddr, identity: u32) -> EnrolledNetns {
        EnrolledNetns {
            workload_ip: ip16(ip),
            identity,
            pad: 0,
        }
    }

    fn ns(cookie: u64, addrs: &[IpAddr]) -> Netns {
        Netns {
            cookie,
            addrs: addrs.to_vec(),
            file: None,
        }
    }

    const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
    const POD_A: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 244, 1, 10));
    const POD_B: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 244, 1, 11));
    const POD_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 0, 0x12));

    #[test]
    fn a_namespace_holding_a_workload_ip_is_enrolled_with_its_identity() {
        let workloads = [workload(POD_A, 7), workload(POD_V6, 9)];
        let namespaces = [
            ns(100, &[LOOPBACK, POD_A]),
            ns(200, &[LOOPBACK]),
            ns(300, &[LOOPBACK, POD_V6]),
        ];
        let plan = plan(&workloads, &namespaces, &BTreeMap::new());
        assert_eq!(
            plan.inserts,
            BTreeMap::from([(100, enrolled(POD_A, 7)), (300, enrolled(POD_V6, 9))])
        );
        assert!(plan.removals.is_empty());
        assert_eq!(plan.enrolled, BTreeSet::from([100, 300]));
    }

    #[test]
    fn what_the_map_already_holds_is_not_written_again() {
        let workloads = [workload(POD_A, 7)];
        let current = BTreeMap::from([(100, enrolled(POD_A, 7))]);
        let plan = plan(&workloads, &[ns(100, &[POD_A])], &current);
        assert_eq!(
            plan,
            EnrolPlan {
                enrolled: BTreeSet::from([100]),
                ..EnrolPlan::default()
            }
        );
    }

    #[test]
    fn gone_namespaces_and_gone_workloads_are_removed() {
        let workloads = [workload(POD_A, 7)];
        let current = BTreeMap::from([
            (100, enrolled(POD_A, 7)), // namespace gone
            (200, enrolled(POD_B, 8)), // namespace still there, workload no longer listed
            (300, enrolled(POD_A, 7)), // stays: its namespace now holds pod A
        ]);
        let namespaces = [ns(200, &[POD_B]), ns(300, &[POD_A])];
        let plan = plan(&workloads, &namespaces, &current);
        assert_eq!(plan.removals, vec![100, 200]);
        assert!(plan.inserts.is_empty());
        assert_eq!(plan.enrolled, BTreeSet::from([300]));
    }

    #[test]
    fn a_changed_identity_or_address_is_rewritten() {
        let workloads = [workload(POD_A, 8), workload(POD_B, 9)];
        let current = BTreeMap::from([(100, enrolled(POD_A, 7)), (200, enrolled(POD_A, 7))]);
        let namespaces = [ns(100, &[POD_A]), ns(200, &[POD_B])];
        let plan = plan(&workloads, &namespaces, &current);
        assert_eq!(
            plan.inserts,
            BTreeMap::from([(100, enrolled(POD_A, 8)), (200, enrolled(POD_B, 9))])
        );
        assert!(plan.removals.is_empty());
    }

    #[test]
    fn no_workloads_empties_the_map() {
        let current = BTreeMap::from([(100, enrolled(POD_A, 7))]);
        let plan = plan(&[], &[ns(100, &[POD_A])], &current);
        assert_eq!(plan.removals, vec![100]);
        assert!(plan.enrolled.is_empty());
    }
}
