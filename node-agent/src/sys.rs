//! Every raw system call of the agent, and nothing else: bpf(2) map commands that aya 0.14 does not
//! offer (deleting an `ARRAY_OF_MAPS` slot, reading an inner map's id, batch updates), the link and
//! object commands of upgrades and uninstalls (opening a pin, pinning, creating a cgroup link or a
//! network-namespace `sk_lookup` link, replacing a link's program with `BPF_LINK_UPDATE`,
//! `BPF_LINK_DETACH`, the ids and state of links and programs), the network-namespace calls
//! enrolment needs (entering a namespace, its cookie, its addresses), and sock_diag (listing a
//! namespace's TCP sockets, `SOCK_DESTROY`); and one C library call, glibc's `mallopt`.
//!
//! Everything above this module is safe code; the swap protocol above the bpf(2) calls is tested
//! with a fake (`SlotMaps` in `slots.rs`). The network-namespace cookie is defined here once: the
//! test harness uses [`netns_cookie`] too.
use std::{
    ffi::CString,
    io,
    net::IpAddr,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    path::Path,
};

use aya::Pod;

/// `BPF_MAP_TYPE_HASH`, for creating inner maps.
pub const BPF_MAP_TYPE_HASH: u32 = 1;
/// `BPF_MAP_TYPE_ARRAY`, for creating the endpoints' inner arrays.
pub const BPF_MAP_TYPE_ARRAY: u32 = 2;
/// `BPF_MAP_TYPE_LPM_TRIE`, for creating the inner maps of the authorization sources.
pub const BPF_MAP_TYPE_LPM_TRIE: u32 = 11;

/// The bpf(2) commands used here (`BPF_MAP_LOOKUP_ELEM`, ...).
#[derive(Clone, Copy, Debug)]
#[repr(i64)]
enum BpfCommand {
    LookupElem = 1,
    UpdateElem = 2,
    DeleteElem = 3,
    ObjPin = 6,
    ObjGet = 7,
    ProgGetFdById = 13,
    ObjGetInfoByFd = 15,
    UpdateBatch = 26,
    LinkCreate = 28,
    LinkUpdate = 29,
    LinkDetach = 34,
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
    sys_bpf(BpfCommand::UpdateElem, &mut elem_attr(fd, key, value))
}

/// Deletes `map[key]` (`BPF_MAP_DELETE_ELEM`); `ENOENT` when there is nothing to delete.
pub fn map_delete_elem<K: Pod>(fd: BorrowedFd<'_>, key: &K) -> io::Result<()> {
    sys_bpf(
        BpfCommand::DeleteElem,
        &mut elem_attr::<K, u8>(fd, key, std::ptr::null()),
    )
}

/// Reads `map[key]` into `out` (`BPF_MAP_LOOKUP_ELEM`); `ENOENT` when absent. For an
/// `ARRAY_OF_MAPS`, the value read is the inner map's id.
pub fn map_lookup_elem<K: Pod, V: Pod>(fd: BorrowedFd<'_>, key: &K, out: &mut V) -> io::Result<()> {
    sys_bpf(
        BpfCommand::LookupElem,
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
    sys_bpf(BpfCommand::UpdateBatch, &mut attr)?;
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

/// The cgroup hooks a link attaches to (`enum bpf_attach_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum CgroupHook {
    /// `BPF_CGROUP_INET4_CONNECT`.
    Connect4 = 10,
    /// `BPF_CGROUP_INET6_CONNECT`.
    Connect6 = 11,
    /// `BPF_CGROUP_SOCK_OPS`.
    SockOps = 3,
}

/// `BPF_SK_LOOKUP` (`enum bpf_attach_type`): the network-namespace hook of `sk_lookup` programs.
const BPF_SK_LOOKUP: u32 = 36;

/// `BPF_F_REPLACE`: `BPF_LINK_UPDATE` replaces the program only if it is still `old_prog_fd`.
const BPF_F_REPLACE: u32 = 1 << 2;

/// `union bpf_attr` as used by `BPF_OBJ_PIN` and `BPF_OBJ_GET`.
#[repr(C)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// `union bpf_attr` as used by `BPF_OBJ_GET_INFO_BY_FD`.
#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// `union bpf_attr` as used by `BPF_LINK_CREATE` (the fields a cgroup link needs).
#[repr(C)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

/// `union bpf_attr` as used by `BPF_LINK_UPDATE`.
#[repr(C)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// `union bpf_attr` as used by `BPF_LINK_DETACH` and `BPF_PROG_GET_FD_BY_ID`: one `u32`, then
/// (for the latter) `next_id` and `open_flags`, zero here.
#[repr(C)]
struct OneFdAttr {
    value: u32,
    next_id: u32,
    open_flags: u32,
}

/// The head of `struct bpf_link_info` for a cgroup link: its type, its id, the program it runs and
/// the cgroup it is attached to (0 once detached).
#[repr(C)]
#[derive(Default)]
struct CgroupLinkInfo {
    link_type: u32,
    id: u32,
    prog_id: u32,
    pad: u32,
    cgroup_id: u64,
    attach_type: u32,
    pad2: u32,
}

/// The head of `struct bpf_link_info` for a network-namespace link: the namespace's inode, 0 once
/// the link is detached (its namespace gone).
#[repr(C)]
#[derive(Default)]
struct NetnsLinkInfo {
    link_type: u32,
    id: u32,
    prog_id: u32,
    pad: u32,
    netns_ino: u32,
    attach_type: u32,
}

/// The head of `struct bpf_prog_info`: its type and its id.
#[repr(C)]
#[derive(Default)]
struct ProgInfoHead {
    prog_type: u32,
    id: u32,
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// Opens the object pinned at `path` (`BPF_OBJ_GET`): a map, a program or a link.
/// Makes glibc's malloc use one arena for every thread (`M_ARENA_MAX`), before any thread starts.
/// The agent's large allocations (a snapshot's bytes, its decoded tables, the records of a fill)
/// happen on whichever runtime thread applies it; with glibc's default of eight arenas per core,
/// each such thread's arena keeps pages it freed: measured at 10,000 services, 24.6 MB of steady
/// RSS against 20.1 MB with one arena. The agent applies one snapshot at a time, so the threads
/// hardly contend for the one arena. musl's malloc (the shipped static binary) has no arenas.
pub fn single_malloc_arena() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets a malloc parameter; called first thing in main, no thread yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// The `memlock:` of a BPF map's fdinfo: the bytes the kernel charges for the map.
pub fn map_memlock(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let path = format!("/proc/self/fdinfo/{}", fd.as_raw_fd());
    let info = std::fs::read_to_string(path)?;
    info.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| io::Error::other("no memlock in the map's fdinfo"))
}

pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let name = c_path(path)?;
    let mut attr = ObjAttr {
        pathname: name.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    sys_bpf_fd(BpfCommand::ObjGet, &mut attr)
}

/// Pins the object `fd` at `path` (`BPF_OBJ_PIN`); `EEXIST` when something is pinned there.
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let name = c_path(path)?;
    let mut attr = ObjAttr {
        pathname: name.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        file_flags: 0,
    };
    sys_bpf(BpfCommand::ObjPin, &mut attr)
}

/// Attaches `prog` to the cgroup `cgroup` at `hook` with a new link (`BPF_LINK_CREATE`, no flags:
/// the kernel refuses flags on cgroup links, which always coexist with other programs).
pub fn link_create(
    prog: BorrowedFd<'_>,
    cgroup: BorrowedFd<'_>,
    hook: CgroupHook,
) -> io::Result<OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type: hook as u32,
        flags: 0,
    };
    sys_bpf_fd(BpfCommand::LinkCreate, &mut attr)
}

/// Attaches the `sk_lookup` program `prog` to the network namespace `netns` with a new link
/// (`BPF_LINK_CREATE`, `BPF_SK_LOOKUP`). The link does not keep the namespace alive: when the
/// namespace goes, the kernel detaches it (see [`netns_link_state`]).
pub fn sk_lookup_link_create(prog: BorrowedFd<'_>, netns: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: netns.as_raw_fd() as u32,
        attach_type: BPF_SK_LOOKUP,
        flags: 0,
    };
    sys_bpf_fd(BpfCommand::LinkCreate, &mut attr)
}

/// A network-namespace link as the kernel reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetnsLinkState {
    pub link_id: u32,
    /// The program the link runs (still reported once detached).
    pub program_id: u32,
    /// Whether the link is still attached: false once its namespace is gone or it was detached.
    pub attached: bool,
}

/// The state of a network-namespace link (`struct bpf_link_info`, its `netns` member).
pub fn netns_link_state(link: BorrowedFd<'_>) -> io::Result<NetnsLinkState> {
    let mut info = NetnsLinkInfo::default();
    obj_info(link, &mut info)?;
    Ok(NetnsLinkState {
        link_id: info.id,
        program_id: info.prog_id,
        attached: info.netns_ino != 0,
    })
}

/// Makes `link` run `new_prog` instead of `old_prog`, in one step for the programs' callers
/// (`BPF_LINK_UPDATE` with `BPF_F_REPLACE`: `EPERM` if the link no longer runs `old_prog`). The
/// link, its id and its pin stay.
pub fn link_update(
    link: BorrowedFd<'_>,
    new_prog: BorrowedFd<'_>,
    old_prog: BorrowedFd<'_>,
) -> io::Result<()> {
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: new_prog.as_raw_fd() as u32,
        flags: BPF_F_REPLACE,
        old_prog_fd: old_prog.as_raw_fd() as u32,
    };
    sys_bpf(BpfCommand::LinkUpdate, &mut attr)
}

/// Detaches `link`'s program now, whoever else holds the link open (`BPF_LINK_DETACH`).
pub fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = OneFdAttr {
        value: link.as_raw_fd() as u32,
        next_id: 0,
        open_flags: 0,
    };
    sys_bpf(BpfCommand::LinkDetach, &mut attr)
}

/// A cgroup link's id, and the id of the program it runs — 0 once the link is detached (the kernel
/// keeps reporting the program of a detached link, and a zero cgroup).
pub fn link_ids(link: BorrowedFd<'_>) -> io::Result<(u32, u32)> {
    let mut info = CgroupLinkInfo::default();
    obj_info(link, &mut info)?;
    let program = if info.cgroup_id == 0 { 0 } else { info.prog_id };
    Ok((info.id, program))
}

/// A program's id.
pub fn prog_id(prog: BorrowedFd<'_>) -> io::Result<u32> {
    let mut info = ProgInfoHead::default();
    obj_info(prog, &mut info)?;
    Ok(info.id)
}

/// Opens the program with id `id` (`BPF_PROG_GET_FD_BY_ID`).
pub fn prog_by_id(id: u32) -> io::Result<OwnedFd> {
    let mut attr = OneFdAttr {
        value: id,
        next_id: 0,
        open_flags: 0,
    };
    sys_bpf_fd(BpfCommand::ProgGetFdById, &mut attr)
}

/// `BPF_OBJ_GET_INFO_BY_FD` into the head of an info struct: the kernel copies at most
/// `size_of::<I>()` bytes, so a prefix of its struct is enough.
fn obj_info<I>(fd: BorrowedFd<'_>, info: &mut I) -> io::Result<()> {
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: size_of::<I>() as u32,
        info: info as *mut I as u64,
    };
    sys_bpf(BpfCommand::ObjGetInfoByFd, &mut attr)
}

/// bpf(2) for a command that returns a new file descriptor.
fn sys_bpf_fd<A>(cmd: BpfCommand, attr: &mut A) -> io::Result<OwnedFd> {
    let fd = sys_bpf_raw(cmd, attr)?;
    // SAFETY: on success these commands return a fresh descriptor that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// bpf(2) with one of the attr structs above; the kernel may write results back into `attr`.
fn sys_bpf<A>(cmd: BpfCommand, attr: &mut A) -> io::Result<()> {
    sys_bpf_raw(cmd, attr).map(|_| ())
}

/// bpf(2), returning the syscall's non-negative result.
fn sys_bpf_raw<A>(cmd: BpfCommand, attr: &mut A) -> io::Result<libc::c_long> {
    // SAFETY: attr is a live, fully initialized repr(C) prefix of `union bpf_attr` of the size we
    // pass (the kernel zero-extends the rest); the pointers in it point to live buffers: keys and
    // values of the sizes the map was created with (the callers take typed `Pod` keys and values),
    // NUL-terminated paths, or info structs whose size the attr states.
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
        Ok(rc)
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

// sock_diag (NETLINK_SOCK_DIAG): the TCP sockets of the calling thread's network namespace, and
// destroying one of them (SOCK_DESTROY, CONFIG_INET_DIAG_DESTROY; what `ss -K` does). Closing
// the connections a generation denies (`established.rs`) is the only user. Messages are built
// and parsed byte by byte at the kernel's offsets, so nothing here depends on struct alignment,
// and a malformed answer is an error, never a panic. A destroy names the socket by its cookie
// too: it reaches only the very socket that was listed, never a newer one with its addresses.

/// The TCP states of `include/net/tcp_states.h` a socket can be reported in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[repr(u8)]
pub enum TcpState {
    Established = 1,
    SynSent = 2,
    SynRecv = 3,
    FinWait1 = 4,
    FinWait2 = 5,
    TimeWait = 6,
    Close = 7,
    CloseWait = 8,
    LastAck = 9,
    Listen = 10,
    Closing = 11,
}

impl TcpState {
    const ALL: [TcpState; 11] = [
        TcpState::Established,
        TcpState::SynSent,
        TcpState::SynRecv,
        TcpState::FinWait1,
        TcpState::FinWait2,
        TcpState::TimeWait,
        TcpState::Close,
        TcpState::CloseWait,
        TcpState::LastAck,
        TcpState::Listen,
        TcpState::Closing,
    ];

    fn from_raw(raw: u8) -> Option<TcpState> {
        Self::ALL.into_iter().find(|s| *s as u8 == raw)
    }
}

/// The address family of a socket: an `AF_INET6` socket may carry IPv4-mapped addresses (a
/// dual-stack listener's connections from IPv4 clients).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SocketFamily {
    Inet,
    Inet6,
}

impl SocketFamily {
    fn raw(self) -> u8 {
        match self {
            SocketFamily::Inet => libc::AF_INET as u8,
            SocketFamily::Inet6 => libc::AF_INET6 as u8,
        }
    }
}

/// A TCP socket as sock_diag reports it; also what a destroy request names it by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpSocket {
    pub family: SocketFamily,
    pub state: TcpState,
    /// IPv4 addresses are IPv4-mapped, whatever the family, as everywhere in the maps.
    pub local_ip: kmesh_common::Ip16,
    pub local_port: u16,
    pub remote_ip: kmesh_common::Ip16,
    pub remote_port: u16,
    /// The interface the socket is bound to (`idiag_if`), part of the kernel's lookup key.
    pub interface: u32,
    /// The kernel's cookie of the socket: a destroy request matches only the very socket that
    /// was dumped, never a later one with the same addresses.
    pub cookie: [u32; 2],
}

/// `SOCK_DIAG_BY_FAMILY` and `SOCK_DESTROY` (`include/uapi/linux/sock_diag.h`).
#[derive(Clone, Copy, Debug)]
#[repr(u16)]
enum SockDiagRequest {
    ByFamily = 20,
    Destroy = 21,
}

const NLMSG_HEADER_LEN: usize = 16;
/// `struct inet_diag_req_v2`.
const INET_DIAG_REQ_LEN: usize = 56;
/// `struct inet_diag_msg`.
const INET_DIAG_MSG_LEN: usize = 72;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
/// The largest datagram the kernel sends a dump in is 32 KiB; twice that leaves room.
const SOCK_DIAG_RECV_BUFFER: usize = 64 * 1024;
/// How long an answer may take before the call fails instead of hanging the agent.
const SOCK_DIAG_TIMEOUT: libc::timeval = libc::timeval {
    tv_sec: 5,
    tv_usec: 0,
};

/// A `NETLINK_SOCK_DIAG` socket of the network namespace of the thread that opened it (it stays
/// in that namespace whichever thread uses it later).
pub struct SockDiag {
    socket: OwnedFd,
    seq: u32,
    buffer: Vec<u8>,
}

impl SockDiag {
    /// Opens the socket in the calling thread's network namespace.
    pub fn open() -> io::Result<SockDiag> {
        // SAFETY: socket(2) with constant arguments; the descriptor is owned by OwnedFd at once.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("socket(NETLINK_SOCK_DIAG): {e}"),
            ));
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        let timeout = SOCK_DIAG_TIMEOUT;
        // SAFETY: setsockopt with an in-buffer of the size we pass.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(SockDiag {
            socket,
            seq: 0,
            buffer: vec![0; SOCK_DIAG_RECV_BUFFER],
        })
    }

    /// Every TCP socket of both families in one of `states` (one dump per family).
    pub fn tcp_sockets(&mut self, states: &[TcpState]) -> io::Result<Vec<TcpSocket>> {
        let mask = states.iter().fold(0u32, |m, s| m | 1 << (*s as u32));
        let mut sockets = Vec::new();
        for family in [SocketFamily::Inet, SocketFamily::Inet6] {
            let request = inet_diag_request(family, mask, &[0; 48]);
            let seq = self.send(SockDiagRequest::ByFamily, NLM_F_DUMP, &request)?;
            self.receive_dump(seq, &mut sockets)
                .map_err(|e| io::Error::new(e.kind(), format!("sock_diag dump: {e}")))?;
        }
        Ok(sockets)
    }

    /// Destroys `socket` (`SOCK_DESTROY`): the kernel aborts it (`tcp_abort`), sending the peer a
    /// RST. `ENOENT` when it no longer exists (closed meanwhile, or another socket now has its
    /// addresses).
    pub fn destroy(&mut self, socket: &TcpSocket) -> io::Result<()> {
        let request = inet_diag_request(socket.family, 0, &encode_socket_id(socket));
        let seq = self.send(SockDiagRequest::Destroy, NLM_F_ACK, &request)?;
        loop {
            let len = self.receive()?;
            for (header, payload) in netlink_messages(&self.buffer[..len])? {
                if header.seq == seq && header.kind == NLMSG_ERROR {
                    return errno_payload(payload);
                }
            }
        }
    }

    /// Sends one request to the kernel; returns its sequence number.
    fn send(&mut self, request: SockDiagRequest, flags: u16, payload: &[u8]) -> io::Result<u32> {
        self.seq = self.seq.wrapping_add(1);
        let len = NLMSG_HEADER_LEN + payload.len();
        let mut message = Vec::with_capacity(len);
        message.extend_from_slice(&(len as u32).to_ne_bytes());
        message.extend_from_slice(&(request as u16).to_ne_bytes());
        message.extend_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
        message.extend_from_slice(&self.seq.to_ne_bytes());
        message.extend_from_slice(&0u32.to_ne_bytes());
        message.extend_from_slice(payload);
        // SAFETY: sockaddr_nl is plain data; all zero but the family addresses the kernel.
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: sendto with a live buffer and address of the sizes we pass.
        let rc = unsafe {
            libc::sendto(
                self.socket.as_raw_fd(),
                message.as_ptr().cast(),
                message.len(),
                0,
                (&raw const kernel).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(self.seq)
    }

    /// Receives one datagram into the buffer; returns its length.
    fn receive(&mut self) -> io::Result<usize> {
        loop {
            // SAFETY: recv into our buffer of the length we pass. MSG_TRUNC makes a netlink
            // socket return the datagram's full length, so truncation is seen.
            let rc = unsafe {
                libc::recv(
                    self.socket.as_raw_fd(),
                    self.buffer.as_mut_ptr().cast(),
                    self.buffer.len(),
                    libc::MSG_TRUNC,
                )
            };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let len = rc as usize;
            if len > self.buffer.len() {
                return Err(io::Error::other(format!(
                    "a {len}-byte netlink answer exceeds the {}-byte buffer",
                    self.buffer.len()
                )));
            }
            return Ok(len);
        }
    }

    /// Reads the answers to the dump `seq` until its end, appending its sockets.
    fn receive_dump(&mut self, seq: u32, sockets: &mut Vec<TcpSocket>) -> io::Result<()> {
        loop {
            let len = self.receive()?;
            for (header, payload) in netlink_messages(&self.buffer[..len])? {
                if header.seq != seq {
                    continue;
                }
                match header.kind {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => {
                        errno_payload(payload)?;
                        return Ok(());
                    }
                    k if k == SockDiagRequest::ByFamily as u16 => {
                        if let Some(socket) = decode_inet_diag_msg(payload)? {
                            sockets.push(socket);
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}

/// The head of a netlink message.
#[derive(Clone, Copy, Debug)]
struct NetlinkHeader {
    kind: u16,
    seq: u32,
}

fn read_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// Splits a datagram into its messages, checking every length against the datagram.
fn netlink_messages(datagram: &[u8]) -> io::Result<Vec<(NetlinkHeader, &[u8])>> {
    let mut messages = Vec::new();
    let mut rest = datagram;
    while !rest.is_empty() {
        if rest.len() < NLMSG_HEADER_LEN {
            return Err(io::Error::other(format!(
                "a {}-byte netlink message is shorter than its header",
                rest.len()
            )));
        }
        let len = read_u32(rest, 0) as usize;
        if len < NLMSG_HEADER_LEN || len > rest.len() {
            return Err(io::Error::other(format!(
                "netlink message length {len} outside {NLMSG_HEADER_LEN}..={}",
                rest.len()
            )));
        }
        let header = NetlinkHeader {
            kind: u16::from_ne_bytes([rest[4], rest[5]]),
            seq: read_u32(rest, 8),
        };
        messages.push((header, &rest[NLMSG_HEADER_LEN..len]));
        // Messages are 4-byte aligned.
        rest = &rest[len.next_multiple_of(4).min(rest.len())..];
    }
    Ok(messages)
}

/// The result an `NLMSG_ERROR` message carries: 0 (an acknowledgement) or a negative errno.
fn errno_payload(payload: &[u8]) -> io::Result<()> {
    if payload.len() < 4 {
        return Err(io::Error::other("netlink error message without its code"));
    }
    match read_u32(payload, 0) as i32 {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(-e)),
    }
}

/// `struct inet_diag_req_v2` for TCP sockets of `family` in the states of `mask`, naming the
/// socket `id` (all zero for a dump).
fn inet_diag_request(family: SocketFamily, mask: u32, id: &[u8; 48]) -> [u8; INET_DIAG_REQ_LEN] {
    let mut req = [0u8; INET_DIAG_REQ_LEN];
    req[0] = family.raw();
    req[1] = libc::IPPROTO_TCP as u8;
    req[4..8].copy_from_slice(&mask.to_ne_bytes());
    req[8..].copy_from_slice(id);
    req
}

/// An address as `struct inet_diag_sockid` holds it: IPv4 in the first 4 bytes for `AF_INET`.
fn encode_address(family: SocketFamily, ip: &kmesh_common::Ip16) -> [u8; 16] {
    match family {
        SocketFamily::Inet6 => *ip,
        SocketFamily::Inet => {
            let mut raw = [0u8; 16];
            raw[..4].copy_from_slice(&ip[12..]);
            raw
        }
    }
}

fn decode_address(family: SocketFamily, raw: &[u8]) -> kmesh_common::Ip16 {
    match family {
        SocketFamily::Inet6 => raw[..16].try_into().unwrap_or([0; 16]),
        SocketFamily::Inet => kmesh_common::ipv4_mapped([raw[0], raw[1], raw[2], raw[3]]),
    }
}

/// `struct inet_diag_sockid` of `socket`.
fn encode_socket_id(socket: &TcpSocket) -> [u8; 48] {
    let mut id = [0u8; 48];
    id[0..2].copy_from_slice(&socket.local_port.to_be_bytes());
    id[2..4].copy_from_slice(&socket.remote_port.to_be_bytes());
    id[4..20].copy_from_slice(&encode_address(socket.family, &socket.local_ip));
    id[20..36].copy_from_slice(&encode_address(socket.family, &socket.remote_ip));
    id[36..40].copy_from_slice(&socket.interface.to_ne_bytes());
    id[40..44].copy_from_slice(&socket.cookie[0].to_ne_bytes());
    id[44..48].copy_from_slice(&socket.cookie[1].to_ne_bytes());
    id
}

/// A socket from `struct inet_diag_msg`; `None` for a family or state this module does not know.
fn decode_inet_diag_msg(payload: &[u8]) -> io::Result<Option<TcpSocket>> {
    if payload.len() < INET_DIAG_MSG_LEN {
        return Err(io::Error::other(format!(
            "a {}-byte inet_diag_msg is shorter than {INET_DIAG_MSG_LEN} bytes",
            payload.len()
        )));
    }
    let family = match i32::from(payload[0]) {
        libc::AF_INET => SocketFamily::Inet,
        libc::AF_INET6 => SocketFamily::Inet6,
        _ => return Ok(None),
    };
    let Some(state) = TcpState::from_raw(payload[1]) else {
        return Ok(None);
    };
    let id = &payload[4..52];
    Ok(Some(TcpSocket {
        family,
        state,
        local_port: u16::from_be_bytes([id[0], id[1]]),
        remote_port: u16::from_be_bytes([id[2], id[3]]),
        local_ip: decode_address(family, &id[4..20]),
        remote_ip: decode_address(family, &id[20..36]),
        interface: read_u32(id, 36),
        cookie: [read_u32(id, 40), read_u32(id, 44)],
    }))
}

#[cfg(test)]
mod sock_diag_tests {
    use super::*;

    fn socket(family: SocketFamily, local_ip: kmesh_common::Ip16) -> TcpSocket {
        TcpSocket {
            family,
            state: TcpState::Established,
            local_ip,
            local_port: 8080,
            remote_ip: kmesh_common::ipv4_mapped([10, 244, 7, 4]),
            remote_port: 40001,
            interface: 3,
            cookie: [0xdead, 0xbeef],
        }
    }

    /// An `inet_diag_msg` as the kernel answers a dump with, from the id a request would carry.
    fn message(socket: &TcpSocket) -> Vec<u8> {
        let mut msg = vec![socket.family.raw(), socket.state as u8, 0, 0];
        msg.extend_from_slice(&encode_socket_id(socket));
        msg.extend_from_slice(&[0; 20]);
        msg
    }

    #[test]
    fn a_socket_id_reads_back_as_written() {
        let mapped = kmesh_common::ipv4_mapped([10, 244, 7, 2]);
        let v6 = kmesh_common::ip16("fd00:244::2".parse().unwrap());
        for s in [
            socket(SocketFamily::Inet, mapped),
            socket(SocketFamily::Inet6, mapped),
            TcpSocket {
                remote_ip: v6,
                ..socket(SocketFamily::Inet6, v6)
            },
        ] {
            assert_eq!(decode_inet_diag_msg(&message(&s)).unwrap(), Some(s));
        }
    }

    #[test]
    fn an_ipv4_socket_id_holds_the_address_in_its_first_bytes() {
        let id = encode_socket_id(&socket(
            SocketFamily::Inet,
            kmesh_common::ipv4_mapped([10, 244, 7, 2]),
        ));
        assert_eq!(&id[0..2], &8080u16.to_be_bytes());
        assert_eq!(
            &id[4..20],
            &[10, 244, 7, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
    }

    #[test]
    fn malformed_answers_are_errors_not_panics() {
        assert!(decode_inet_diag_msg(&[0; INET_DIAG_MSG_LEN - 1]).is_err());
        let mut unknown_family = message(&socket(SocketFamily::Inet, [0; 16]));
        unknown_family[0] = 99;
        assert_eq!(decode_inet_diag_msg(&unknown_family).unwrap(), None);
        assert!(netlink_messages(&[0; 8]).is_err());
        let mut header = [0u8; NLMSG_HEADER_LEN];
        for len in [0u32, 15, 17, u32::MAX] {
            header[..4].copy_from_slice(&len.to_ne_bytes());
            assert!(netlink_messages(&header).is_err(), "length {len}");
        }
        assert!(errno_payload(&[1, 2]).is_err());
    }

    #[test]
    fn a_datagram_splits_into_aligned_messages() {
        let mut datagram = Vec::new();
        for (kind, payload) in [(NLMSG_DONE, &[7u8, 0, 0, 0][..]), (NLMSG_ERROR, &[1u8][..])] {
            let len = (NLMSG_HEADER_LEN + payload.len()) as u32;
            datagram.extend_from_slice(&len.to_ne_bytes());
            datagram.extend_from_slice(&kind.to_ne_bytes());
            datagram.extend_from_slice(&[0; 2]);
            datagram.extend_from_slice(&5u32.to_ne_bytes());
            datagram.extend_from_slice(&[0; 4]);
            datagram.extend_from_slice(payload);
            datagram.resize(datagram.len().next_multiple_of(4), 0);
        }
        let messages = netlink_messages(&datagram).unwrap();
        let kinds: Vec<(u16, u32, usize)> = messages
            .iter()
            .map(|(h, p)| (h.kind, h.seq, p.len()))
            .collect();
        assert_eq!(kinds, [(NLMSG_DONE, 5, 4), (NLMSG_ERROR, 5, 1)]);
    }

    #[test]
    fn an_error_message_carries_a_negative_errno() {
        assert!(errno_payload(&0i32.to_ne_bytes()).is_ok());
        let e = errno_payload(&(-libc::ENOENT).to_ne_bytes()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
    }
}
