//! Every raw system call of the agent, and nothing else: bpf(2) map commands that aya 0.14 does not
//! offer (deleting an `ARRAY_OF_MAPS` slot, reading an inner map's id, batch updates), the link and
//! object commands of upgrades and uninstalls (opening a pin, pinning, creating a cgroup link or a
//! network-namespace `sk_lookup` link, replacing a link's program with `BPF_LINK_UPDATE`,
//! `BPF_LINK_DETACH`, the ids and state of links and programs), the network-namespace calls
//! enrolment needs (entering a namespace, its cookie, its addresses), and sock_diag (listing a
//! namespace's TCP sockets, `SOCK_DESTROY`).
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

/// `NETLINK_SOCK_DIAG`, and the message types of sock_diag and netlink used here.
const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;

/// `struct nlmsghdr`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct NlMsgHdr {
    len: u32,
    ty: u16,
    flags: u16,
    seq: u32,
    pid: u32,
}

/// `struct inet_diag_sockid`: ports and addresses in network byte order; an IPv4 address fills
/// the first 4 bytes of its field.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InetDiagSockId {
    sport: [u8; 2],
    dport: [u8; 2],
    src: [u8; 16],
    dst: [u8; 16],
    ifindex: u32,
    cookie: [u32; 2],
}

/// `struct inet_diag_req_v2`.
#[repr(C)]
#[derive(Clone, Copy)]
struct InetDiagReqV2 {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: InetDiagSockId,
}

/// `struct inet_diag_msg` (the head of each answer of a dump).
#[repr(C)]
#[derive(Clone, Copy)]
struct InetDiagMsg {
    family: u8,
    state: u8,
    timer: u8,
    retrans: u8,
    id: InetDiagSockId,
    expires: u32,
    rqueue: u32,
    wqueue: u32,
    uid: u32,
    inode: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct DiagRequest {
    hdr: NlMsgHdr,
    req: InetDiagReqV2,
}

/// TCP states as sock_diag numbers them (`TCP_ESTABLISHED`, ...), for [`tcp_sockets`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum TcpState {
    Established = 1,
    SynRecv = 3,
    Listen = 10,
}

/// A TCP socket of the calling thread's network namespace, as sock_diag reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpSocket {
    /// `AF_INET` or `AF_INET6`: the socket's family (an IPv4 peer of a dual-stack socket is an
    /// IPv4-mapped address of an `AF_INET6` socket).
    family: u8,
    pub state: u8,
    /// Addresses in the 16-byte form of the maps (IPv4 mapped).
    pub local: kmesh_common::Ip16,
    pub local_port: u16,
    pub remote: kmesh_common::Ip16,
    pub remote_port: u16,
    /// The kernel's identity of the socket (with its cookie), for [`destroy_tcp_socket`].
    id: InetDiagSockId,
}

#[cfg(test)]
impl TcpSocket {
    /// An IPv4 socket as a dump would report it (for unit tests of the decisions above this
    /// module).
    pub fn for_test(
        local: kmesh_common::Ip16,
        local_port: u16,
        remote: kmesh_common::Ip16,
    ) -> Self {
        TcpSocket {
            family: libc::AF_INET as u8,
            state: TcpState::Established as u8,
            local,
            local_port,
            remote,
            remote_port: 40_000,
            id: InetDiagSockId::default(),
        }
    }
}

/// The TCP sockets of the calling thread's network namespace in one of `states`, both families.
pub fn tcp_sockets(states: &[TcpState]) -> io::Result<Vec<TcpSocket>> {
    let mask = states.iter().fold(0u32, |m, s| m | 1 << (*s as u8));
    let netlink = netlink_socket()?;
    let mut sockets = Vec::new();
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        let request = diag_request(
            SOCK_DIAG_BY_FAMILY,
            NLM_F_REQUEST | NLM_F_DUMP,
            family,
            mask,
            InetDiagSockId::default(),
        );
        netlink_send(&netlink, &request)?;
        dump_answers(&netlink, &mut sockets)?;
    }
    Ok(sockets)
}

/// Closes `socket` at once (`SOCK_DESTROY`; the kernel aborts it and resets its peer). `ENOENT`
/// when it is gone already.
pub fn destroy_tcp_socket(socket: &TcpSocket) -> io::Result<()> {
    let netlink = netlink_socket()?;
    let request = diag_request(
        SOCK_DESTROY,
        NLM_F_REQUEST | NLM_F_ACK,
        socket.family,
        u32::MAX,
        socket.id,
    );
    netlink_send(&netlink, &request)?;
    let mut buf = vec![0u8; 4096];
    let n = netlink_recv(&netlink, &mut buf)?;
    match first_error(&buf[..n]) {
        Some(0) => Ok(()),
        Some(errno) => Err(io::Error::from_raw_os_error(-errno)),
        None => Err(io::Error::other("SOCK_DESTROY: no acknowledgement")),
    }
}

fn diag_request(ty: u16, flags: u16, family: u8, states: u32, id: InetDiagSockId) -> DiagRequest {
    DiagRequest {
        hdr: NlMsgHdr {
            len: size_of::<DiagRequest>() as u32,
            ty,
            flags,
            seq: 1,
            pid: 0,
        },
        req: InetDiagReqV2 {
            family,
            protocol: libc::IPPROTO_TCP as u8,
            ext: 0,
            pad: 0,
            states,
            id,
        },
    }
}

fn netlink_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the descriptor is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn netlink_send(netlink: &OwnedFd, request: &DiagRequest) -> io::Result<()> {
    // SAFETY: sends the bytes of a repr(C) request we own, of the size we pass; the kernel is
    // the default destination of a netlink socket.
    let rc = unsafe {
        libc::send(
            netlink.as_raw_fd(),
            (request as *const DiagRequest).cast(),
            size_of::<DiagRequest>(),
            0,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn netlink_recv(netlink: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: receives into a buffer we own, of the length we pass.
    let rc = unsafe { libc::recv(netlink.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc as usize)
}

/// Reads a whole dump's answers (until `NLMSG_DONE`) into `sockets`.
fn dump_answers(netlink: &OwnedFd, sockets: &mut Vec<TcpSocket>) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = netlink_recv(netlink, &mut buf)?;
        if n == 0 {
            return Err(io::Error::other(
                "sock_diag: the dump ended without NLMSG_DONE",
            ));
        }
        for (hdr, body) in netlink_messages(&buf[..n]) {
            match hdr.ty {
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR => {
                    let errno = read_struct::<i32>(body).unwrap_or(-libc::EIO);
                    return Err(io::Error::from_raw_os_error(-errno));
                }
                SOCK_DIAG_BY_FAMILY => {
                    if let Some(msg) = read_struct::<InetDiagMsg>(body) {
                        sockets.push(tcp_socket(&msg));
                    }
                }
                _ => {}
            }
        }
    }
}

/// The error code of the first `NLMSG_ERROR` message (0: an acknowledgement).
fn first_error(bytes: &[u8]) -> Option<i32> {
    netlink_messages(bytes)
        .find(|(hdr, _)| hdr.ty == NLMSG_ERROR)
        .and_then(|(_, body)| read_struct::<i32>(body))
}

/// The messages of a netlink datagram: each header and its body. Stops at a malformed length.
fn netlink_messages(bytes: &[u8]) -> impl Iterator<Item = (NlMsgHdr, &[u8])> {
    let mut offset = 0;
    std::iter::from_fn(move || {
        let hdr = read_struct::<NlMsgHdr>(bytes.get(offset..)?)?;
        let len = hdr.len as usize;
        if len < size_of::<NlMsgHdr>() || offset + len > bytes.len() {
            return None;
        }
        let body = &bytes[offset + size_of::<NlMsgHdr>()..offset + len];
        offset += (len + 3) & !3; // NLMSG_ALIGN
        Some((hdr, body))
    })
}

/// A copy of the `T` at the start of `bytes`, if they are long enough. `T` is one of the
/// integer-only repr(C) structs above, valid for any bit pattern.
fn read_struct<T: Copy>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < size_of::<T>() {
        return None;
    }
    // SAFETY: bounds checked above; read_unaligned copes with the buffer's alignment; every T
    // used here is made of integers only.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

fn tcp_socket(msg: &InetDiagMsg) -> TcpSocket {
    let addr = |raw: &[u8; 16]| -> kmesh_common::Ip16 {
        if i32::from(msg.family) == libc::AF_INET {
            kmesh_common::ipv4_mapped([raw[0], raw[1], raw[2], raw[3]])
        } else {
            *raw
        }
    };
    TcpSocket {
        family: msg.family,
        state: msg.state,
        local: addr(&msg.id.src),
        local_port: u16::from_be_bytes(msg.id.sport),
        remote: addr(&msg.id.dst),
        remote_port: u16::from_be_bytes(msg.id.dport),
        id: msg.id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(ty: u16, body: &[u8]) -> Vec<u8> {
        let hdr = NlMsgHdr {
            len: (size_of::<NlMsgHdr>() + body.len()) as u32,
            ty,
            flags: 0,
            seq: 1,
            pid: 0,
        };
        // SAFETY: NlMsgHdr is repr(C), integers only, no padding.
        let head: [u8; 16] = unsafe { std::mem::transmute(hdr) };
        let mut bytes = head.to_vec();
        bytes.extend_from_slice(body);
        while !bytes.len().is_multiple_of(4) {
            bytes.push(0);
        }
        bytes
    }

    #[test]
    fn netlink_messages_are_split_and_bad_lengths_stop_the_walk() {
        let mut bytes = message(NLMSG_ERROR, &(-2i32).to_ne_bytes());
        bytes.extend(message(NLMSG_DONE, &[0; 4]));
        let types: Vec<u16> = netlink_messages(&bytes).map(|(h, _)| h.ty).collect();
        assert_eq!(types, vec![NLMSG_ERROR, NLMSG_DONE]);
        assert_eq!(first_error(&bytes), Some(-2));
        // Truncated: the second message claims more than there is.
        let cut = &bytes[..bytes.len() - 2];
        assert_eq!(netlink_messages(cut).count(), 1);
        // A length shorter than a header, and garbage: no message, no panic.
        let mut bad = message(NLMSG_DONE, &[]);
        bad[0] = 3;
        assert_eq!(netlink_messages(&bad).count(), 0);
        assert_eq!(netlink_messages(&[0xff; 7]).count(), 0);
        assert_eq!(first_error(&[]), None);
    }
}
