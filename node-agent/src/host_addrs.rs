//! The host addresses map (`KM_HOST_ADDRS`): the node's own addresses, from which connections are
//! exempt from authorization (as in Istio ambient), so that kubelet probes keep a STRICT workload
//! ready. Kept equal to the addresses of the host network namespace by every enrolment sync:
//! [`plan`] (pure) says what to insert and remove, [`HostAddrMap::sync`] writes it.
use std::{
    collections::BTreeSet,
    fs::File,
    io,
    net::IpAddr,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use aya::maps::{HashMap, Map, MapData, MapError};
use kmesh_common::{HostAddrValue, Ip16, ip16, map_names};

use crate::{loader::Installation, maps::MapsError, sys};

/// Where the node's addresses are read.
#[derive(Clone, Debug, Default)]
pub enum HostNetns {
    /// The agent's own network namespace (a node agent runs with the host's network).
    #[default]
    Own,
    /// The namespace at this path (`--host-netns`, PID 1's by default).
    Path(PathBuf),
}

impl HostNetns {
    /// The addresses of the host namespace's interfaces.
    pub fn addresses(&self) -> io::Result<Vec<IpAddr>> {
        match self {
            HostNetns::Own => sys::interface_addresses(),
            HostNetns::Path(path) => addresses_in(path),
        }
    }
}

/// The addresses of the namespace at `path`, read on a thread that enters it and then exits.
fn addresses_in(path: &Path) -> io::Result<Vec<IpAddr>> {
    let ns = File::open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    std::thread::spawn(move || {
        sys::enter_netns(ns.as_fd())?;
        sys::interface_addresses()
    })
    .join()
    .map_err(|_| io::Error::other("host address thread panicked"))?
}

/// What to write so that the map holds exactly `wanted`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostAddrPlan {
    pub inserts: Vec<Ip16>,
    pub removals: Vec<Ip16>,
}

/// Pure: the map's changes from `current` to `wanted`.
pub fn plan(wanted: &[IpAddr], current: &BTreeSet<Ip16>) -> HostAddrPlan {
    let wanted: BTreeSet<Ip16> = wanted.iter().map(|a| ip16(*a)).collect();
    HostAddrPlan {
        inserts: wanted.difference(current).copied().collect(),
        removals: current.difference(&wanted).copied().collect(),
    }
}

fn map_err(e: MapError) -> MapsError {
    MapsError::Map {
        map: map_names::HOST_ADDRS,
        source: Box::new(e),
    }
}

/// The pinned `KM_HOST_ADDRS`.
pub struct HostAddrMap {
    map: HashMap<MapData, Ip16, HostAddrValue>,
}

impl HostAddrMap {
    pub fn open(installation: &Installation) -> Result<Self, MapsError> {
        let map = Map::from_map_data(installation.open_map(map_names::HOST_ADDRS)?)
            .and_then(HashMap::try_from)
            .map_err(map_err)?;
        Ok(Self { map })
    }

    /// Makes the map hold exactly `addrs`; returns how many entries it holds afterwards.
    pub fn sync(&mut self, addrs: &[IpAddr]) -> Result<usize, MapsError> {
        let current: BTreeSet<Ip16> = self.map.keys().collect::<Result<_, _>>().map_err(map_err)?;
        let plan = plan(addrs, &current);
        for ip in &plan.removals {
            match self.map.remove(ip) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(e)),
            }
        }
        for ip in &plan.inserts {
            self.map
                .insert(ip, HostAddrValue { flags: 0 }, 0)
                .map_err(map_err)?;
        }
        // What the map holds now, read back (not what the plan says it should).
        let now: Result<Vec<Ip16>, _> = self.map.keys().collect();
        Ok(now.map_err(map_err)?.len())
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    #[test]
    fn new_addresses_are_added_and_vanished_ones_removed() {
        let kept = IpAddr::V4(Ipv4Addr::new(192, 168, 1, 5));
        let new = IpAddr::V6(Ipv6Addr::LOCALHOST);
        let gone = ip16(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 9)));
        let current = BTreeSet::from([ip16(kept), gone]);
        let plan = plan(&[kept, new, kept], &current);
        assert_eq!(plan.inserts, vec![ip16(new)]);
        assert_eq!(plan.removals, vec![gone]);
    }
}
