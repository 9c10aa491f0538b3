//! Every raw system call of the agent, and nothing else: bpf(2) map commands that aya 0.14 does not
//! offer (deleting an `ARRAY_OF_MAPS` slot, reading an inner map's id, batch updates), and the
//! network-namespace calls enrolment needs (entering a namespace, its cookie, its addresses).
//!
//! Everything above this module is safe code; the swap protocol above the bpf(2) calls is tested
//! with a fake (`SlotMaps` in `slots.rs`). The network-namespace cookie is defined here once: the
//! test harness uses [`netns_cookie`] too.
use std::{
    io,
    net::IpAddr,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
};

use aya::Pod;

/// `BPF_MAP_TYPE_HASH`, for creating inner maps.
pub const BPF_MAP_TYPE_HASH: u32 = 1;

/// The bpf(2) commands used here (`BPF_MAP_LOOKUP_ELEM`, ...).
#[derive(Clone, Copy, Debug)]
#[repr(i64)]
enum MapCommand {
    LookupElem = 1,
    UpdateElem = 2,
    DeleteElem = 3,
    UpdateBatch = 26,
}

/// `union bpf_attr` as used by the map element commands.
#[repr(C)]
struct MapElemAttr {
    map_fd: u32,
    pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `union bpf_attr` as used by the batch commands.
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

fn elem_attr<K, V>(fd: BorrowedFd<'_>, key: &K, value: *const V) -> MapElemAttr {
    MapElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        pad: 0,
        key: key as *const K as u64,
        value: value as u64,
        flags: 0, // BPF_ANY
    }
}

/// `map[key] = value` (`BPF_MAP_UPDATE_ELEM`, `BPF_ANY`). For an `ARRAY_OF_MAPS`, `value` is the
/// fd of the inner map, and the call returns only after an RCU grace period.
pub fn map_update_elem<K: Pod, V: Pod>(fd: BorrowedFd<'_>, key: &K, value: &V) -> io::Result<()> {
    sys_bpf(MapCommand::UpdateElem, &mut elem_attr(fd, key, value))
}

/// Deletes `map[key]` (`BPF_MAP_DELETE_ELEM`); `ENOENT` when there is nothing to delete.
pub fn map_delete_elem<K: Pod>(fd: BorrowedFd<'_>, key: &K) -> io::Result<()> {
    sys_bpf(
        MapCommand::DeleteElem,
        &mut elem_attr::<K, u8>(fd, key, std::ptr::null()),
    )
}

/// Reads `map[key]` into `out` (`BPF_MAP_LOOKUP_ELEM`); `ENOENT` when absent. For an
/// `ARRAY_OF_MAPS`, the value read is the inner map's id.
pub fn map_lookup_elem<K: Pod, V: Pod>(fd: BorrowedFd<'_>, key: &K, out: &mut V) -> io::Result<()> {
    sys_bpf(
        MapCommand::LookupElem,
        &mut elem_attr(fd, key, out as *mut V as *const V),
    )
}

/// Inserts `keys[i] -> values[i]` for every i in one syscall (`BPF_MAP_UPDATE_BATCH`, Linux 5.6+).
pub fn map_update_batch<K: Pod, V: Pod>(
    fd: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> io::Result<()> {
    if keys.len() != values.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} keys but {} values", keys.len(), values.len()),
        ));
    }
    let mut attr = BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: keys.len() as u32,
        map_fd: fd.as_raw_fd() as u32,
        elem_flags: 0,
        flags: 0,
    };
    sys_bpf(MapCommand::UpdateBatch, &mut attr)?;
    // On success the kernel reports how many it inserted; anything short is a failure.
    if attr.count as usize != keys.len() {
        return Err(io::Error::other(format!(
            "inserted {} of {} entries",
            attr.count,
            keys.len()
        )));
    }
    Ok(())
}

/// bpf(2) with one of the attr structs above; the kernel may write results back into `attr`.
fn sys_bpf<A>(cmd: MapCommand, attr: &mut A) -> io::Result<()> {
    // SAFETY: attr is a live, fully initialized repr(C) prefix of `union bpf_attr` of the size we
    // pass (the kernel zero-extends the rest); the pointers in it point to live buffers of the
    // sizes the map was created with (the callers take typed `Pod` keys and values).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr as *mut A,
            size_of::<A>(),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `SO_NETNS_COOKIE` (Linux 5.14+; not in every libc version).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// Moves the calling thread into the network namespace `ns` (setns(2)). Only this thread changes
/// namespace: callers do it on a thread of their own.
pub fn enter_netns(ns: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: a plain syscall on a descriptor the caller keeps open.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("setns(CLONE_NEWNET): {e}"),
        ));
    }
    Ok(())
}

/// The cookie of the calling thread's network namespace: `SO_NETNS_COOKIE` of a socket created
/// there, the same value `bpf_get_netns_cookie` returns to the programs. This is the one
/// definition; the test harness calls it inside a pod's namespace.
pub fn netns_cookie() -> io::Result<u64> {
    // SAFETY: socket(2) with constant arguments; the descriptor is owned by OwnedFd at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt on a live socket with an out-buffer of the size we pass.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("getsockopt(SO_NETNS_COOKIE): {e}"),
        ));
    }
    Ok(cookie)
}

/// The addresses of the calling thread's network namespace (getifaddrs uses netlink there).
pub fn interface_addresses() -> io::Result<Vec<IpAddr>> {
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

/// CLOCK_MONOTONIC in nanoseconds: the clock of `ApplyStats::flipped_between_ns`, which tests
/// compare with client-side connect times.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
