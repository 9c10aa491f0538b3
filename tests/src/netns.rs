//! Network namespaces: a node namespace with a bridge, pods wired to it with veths.

use std::fs::File;
use std::io::{self, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::cgroup::TestCgroup;
use crate::cmd::{ip, ip_in};
use crate::names::{self, NameClaim, PREFIX};
use crate::probe::{self, ProbeHandle, ProbeReport};

/// Where iproute2 keeps named network namespaces.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// Path of a named network namespace (`/run/netns/NAME`).
pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_RUN_DIR).join(name)
}

/// Names of all named network namespaces (entries of `/run/netns`).
pub fn list_netns() -> io::Result<Vec<String>> {
    match std::fs::read_dir(NETNS_RUN_DIR) {
        Ok(rd) => Ok(rd
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// Runs `f` on a fresh thread that has joined the network namespace at `netns`.
///
/// Sockets created by `f` belong to that namespace for their whole life, whichever
/// thread uses them later. A panic in `f` is propagated.
pub fn run_in_netns<T, F>(netns: &Path, f: F) -> io::Result<T>
where
    F: FnOnce() -> io::Result<T> + Send,
    T: Send,
{
    let ns = File::open(netns)
        .map_err(|e| io::Error::new(e.kind(), format!("open netns {}: {e}", netns.display())))?;
    thread::scope(|s| {
        let h = s.spawn(move || {
            // SAFETY: plain syscall on a valid fd; only this thread changes netns.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                let e = io::Error::last_os_error();
                return Err(io::Error::new(
                    e.kind(),
                    format!("setns({}, CLONE_NEWNET): {e}", netns.display()),
                ));
            }
            drop(ns);
            f()
        });
        match h.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Creating the first named netns makes `/run/netns` a shared mount; concurrent
/// `ip netns add` can race on that and stack bind mounts. Serialize them.
static NETNS_ADD: Mutex<()> = Mutex::new(());

fn netns_add(name: &str) -> io::Result<()> {
    {
        let _g = NETNS_ADD.lock().unwrap_or_else(|e| e.into_inner());
        ip(&["netns", "add", name])?;
    }
    ip_in(name, &["link", "set", "lo", "up"])?;
    // Devices created in (or moved into) this netns copy `default`: no IPv6 DAD, so
    // addresses (link-local ones too) are usable at once.
    run_in_netns(&netns_path(name), || {
        for key in [
            "net/ipv6/conf/all/accept_dad",
            "net/ipv6/conf/default/accept_dad",
        ] {
            let p = Path::new("/proc/sys").join(key);
            std::fs::write(&p, "0").map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("write 0 to {} in {name}: {e}", p.display()),
                )
            })?;
        }
        Ok(())
    })
}

fn netns_del(name: &str) -> io::Result<()> {
    if netns_path(name).exists() {
        ip(&["netns", "del", name])?;
    }
    Ok(())
}

/// Polls `ip -n NETNS -d -o link show dev DEV` until its output has all of `wanted`.
fn wait_link(netns: &str, dev: &str, wanted: &[&str]) -> io::Result<()> {
    let deadline = Instant::now() + LINK_UP_TIMEOUT;
    loop {
        let out = ip_in(netns, &["-d", "-o", "link", "show", "dev", dev])?;
        if wanted.iter().all(|w| out.contains(w)) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "{dev} in netns {netns} not {wanted:?} after {LINK_UP_TIMEOUT:?}: {}",
                    out.trim()
                ),
            ));
        }
        thread::sleep(Duration::from_millis(2));
    }
}

/// How long [`TestNetwork::add_pod`] waits for the pod's links to come up.
const LINK_UP_TIMEOUT: Duration = Duration::from_secs(5);

/// A test network: a node netns `kmt-<name>-<pid>-node` with bridge `br0`
/// (10.244.0.1/16, fd00:244::1/64), plus one netns per pod. Dropping it deletes all
/// of its namespaces (pods first).
#[derive(Debug)]
pub struct TestNetwork {
    /// `<name>-<pid>`.
    id: String,
    node: String,
    pods: Mutex<Vec<String>>,
    next_if: AtomicUsize,
    _claim: NameClaim,
}

impl TestNetwork {
    /// Address of the node's bridge (the pods' on-link "gateway", though pods have no
    /// default route).
    pub const BRIDGE_V4: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
    /// IPv6 address of the node's bridge.
    pub const BRIDGE_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 0, 1);
    /// MAC of the node's bridge: fixed (locally administered), so that it never changes as pods
    /// come and go (see [`TestNetwork::new`]).
    pub const BRIDGE_MAC: &str = "02:00:0a:f4:00:01";

    /// Creates the node namespace and its bridge. `name` must be unique among the live
    /// networks of this process; it may contain letters, digits, `_` and `-` but no
    /// all-digit part.
    pub fn new(name: &str) -> io::Result<TestNetwork> {
        crate::init();
        names::validate_test_name(name)?;
        let id = format!("{name}-{}", names::my_pid());
        let claim = NameClaim::new(format!("netns {PREFIX}{id}"))?;
        // Anything with our prefix is a leftover of an earlier process with our pid.
        let prefix = format!("{PREFIX}{id}-");
        for ns in list_netns()? {
            if ns.starts_with(&prefix) {
                netns_del(&ns)?;
            }
        }
        let net = TestNetwork {
            node: format!("{prefix}node"),
            id,
            pods: Mutex::new(Vec::new()),
            next_if: AtomicUsize::new(0),
            _claim: claim,
        };
        // From here on, Drop cleans up whatever was created.
        let node = net.node.as_str();
        netns_add(node)?;
        // The bridge gets a MAC of its own, as CNI bridges do. Without one, it takes the lowest
        // MAC of its ports, so it changes when a pod with a lower one comes or the pod whose MAC
        // it took goes. Pods that learned the old MAC for 10.244.0.1 keep sending their answers
        // to it, which the bridge drops (another port's MAC) or nobody has (a deleted port's),
        // until their neighbour entry expires (up to about 50 s). Seen as SYN-ACKs to the node
        // lost after an agent rollout and after bookinfo was deployed: the node learns a pod's
        // address from the pod's own ARP requests (for the Service forwarders' addresses), so it
        // never asks the pod again and the pod never learns the new MAC.
        ip_in(
            node,
            &[
                "link",
                "add",
                "br0",
                "address",
                Self::BRIDGE_MAC,
                "type",
                "bridge",
                "stp_state",
                "0",
                "mcast_snooping",
                "0",
            ],
        )?;
        ip_in(node, &["addr", "add", "10.244.0.1/16", "dev", "br0"])?;
        ip_in(
            node,
            &["-6", "addr", "add", "fd00:244::1/64", "dev", "br0", "nodad"],
        )?;
        ip_in(node, &["link", "set", "br0", "up"])?;
        Ok(net)
    }

    /// `<name>-<pid>`: the part shared by all of this network's netns names.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Name of the node netns (`kmt-<name>-<pid>-node`).
    pub fn node_netns_name(&self) -> &str {
        &self.node
    }

    /// Path of the node netns.
    pub fn node_netns_path(&self) -> PathBuf {
        netns_path(&self.node)
    }

    /// Names of all netns of this network: the pods', then the node's.
    pub fn netns_names(&self) -> Vec<String> {
        let mut v = self.pods.lock().unwrap_or_else(|e| e.into_inner()).clone();
        v.push(self.node.clone());
        v
    }

    /// Runs `ip -n <node netns> ARGS...`.
    pub fn ip_node(&self, args: &[&str]) -> io::Result<String> {
        ip_in(&self.node, args)
    }

    /// Adds a pod: netns `kmt-<name>-<pid>-<pod>` whose `eth0` (veth, other end
    /// enslaved to `br0`) has `ipv4`/16 and optionally `ipv6`/64, lo up, and only the
    /// connected routes: no default route.
    /// Deletes a pod's namespace (as when a pod goes away); its veth pair goes with it.
    pub fn remove_pod(&self, pod: &str) -> io::Result<()> {
        let ns = format!("{PREFIX}{}-{pod}", self.id);
        let mut pods = self.pods.lock().unwrap_or_else(|e| e.into_inner());
        let Some(i) = pods.iter().position(|p| *p == ns) else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("pod {pod:?} is not in network {}", self.id),
            ));
        };
        netns_del(&ns)?;
        pods.remove(i);
        Ok(())
    }

    pub fn add_pod(&self, pod: &str, ipv4: Ipv4Addr, ipv6: Option<Ipv6Addr>) -> io::Result<Pod> {
        names::validate_pod_name(pod)?;
        let ns = format!("{PREFIX}{}-{pod}", self.id);
        {
            let mut pods = self.pods.lock().unwrap_or_else(|e| e.into_inner());
            if pods.contains(&ns) {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("pod {pod:?} already exists in network {}", self.id),
                ));
            }
            // Registered before it exists, so that Drop removes a half-made pod.
            pods.push(ns.clone());
        }
        netns_add(&ns)?;

        let idx = self.next_if.fetch_add(1, Ordering::Relaxed);
        let mut host_if = format!("v{idx}-{pod}");
        host_if.truncate(15); // IFNAMSIZ - 1; names are ASCII
        ip_in(
            &self.node,
            &[
                "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ],
        )?;
        ip_in(
            &self.node,
            &["link", "set", &host_if, "master", "br0", "up"],
        )?;
        ip_in(&ns, &["addr", "add", &format!("{ipv4}/16"), "dev", "eth0"])?;
        if let Some(v6) = ipv6 {
            ip_in(
                &ns,
                &[
                    "-6",
                    "addr",
                    "add",
                    &format!("{v6}/64"),
                    "dev",
                    "eth0",
                    "nodad",
                ],
            )?;
        }
        ip_in(&ns, &["link", "set", "eth0", "up"])?;
        // Carrier, qdisc activation and the bridge port's enabling happen later, in
        // the kernel's linkwatch work; packets sent before that are dropped (a lost
        // SYN costs a 1 s retransmit). Wait until the path is really up.
        wait_link(
            &self.node,
            &host_if,
            &["state UP", "bridge_slave state forwarding"],
        )?;
        wait_link(&self.node, "br0", &["state UP"])?;
        wait_link(&ns, "eth0", &["state UP"])?;
        Ok(Pod {
            name: pod.to_string(),
            netns: ns,
            ipv4,
            ipv6,
            host_if,
        })
    }
}

impl Drop for TestNetwork {
    fn drop(&mut self) {
        let pods = std::mem::take(&mut *self.pods.lock().unwrap_or_else(|e| e.into_inner()));
        for ns in pods.iter().rev().chain(std::iter::once(&self.node)) {
            if let Err(e) = netns_del(ns) {
                eprintln!("kmesh-tests: cleanup of netns {ns} failed: {e}");
            }
        }
    }
}

/// A pod of a [`TestNetwork`]: a handle (names and addresses); the network owns the
/// namespace and deletes it when dropped.
#[derive(Debug, Clone)]
pub struct Pod {
    name: String,
    netns: String,
    ipv4: Ipv4Addr,
    ipv6: Option<Ipv6Addr>,
    host_if: String,
}

impl Pod {
    /// The pod name given to [`TestNetwork::add_pod`] (also what its servers reply).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The netns name (`kmt-<name>-<pid>-<pod>`).
    pub fn netns_name(&self) -> &str {
        &self.netns
    }

    /// `/run/netns/<netns name>`.
    pub fn netns_path(&self) -> PathBuf {
        netns_path(&self.netns)
    }

    /// The pod's IPv4 address.
    pub fn ipv4(&self) -> Ipv4Addr {
        self.ipv4
    }

    /// The pod's IPv6 address, if it has one.
    pub fn ipv6(&self) -> Option<Ipv6Addr> {
        self.ipv6
    }

    /// Name of the node-side end of the pod's veth (in the node netns).
    pub fn host_veth(&self) -> &str {
        &self.host_if
    }

    /// Runs `ip -n <pod netns> ARGS...`.
    pub fn ip(&self, args: &[&str]) -> io::Result<String> {
        ip_in(&self.netns, args)
    }

    /// Runs `f` on a thread inside the pod's netns (see [`run_in_netns`]).
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
        run_in_netns(&self.netns_path(), f)
    }

    /// The kernel's cookie of the pod's netns (`SO_NETNS_COOKIE` of a socket created
    /// inside it): what eBPF programs see as `bpf_get_netns_cookie()`. The agent's own
    /// definition, run inside the pod's netns.
    pub fn netns_cookie(&self) -> io::Result<u64> {
        self.run_in(kmesh_agent::sys::netns_cookie)
    }

    /// A `TcpExt` counter of the pod's netns (`/proc/net/netstat`, e.g. `TCPSynRetrans`):
    /// what explains a connection the kernel looked up more than once.
    pub fn tcp_ext_counter(&self, name: &str) -> io::Result<u64> {
        let text = self.run_in(|| std::fs::read_to_string("/proc/thread-self/net/netstat"))?;
        let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
        let (names, values) = (lines.next(), lines.next());
        let (Some(names), Some(values)) = (names, values) else {
            return Err(io::Error::other("no TcpExt lines in /proc/net/netstat"));
        };
        names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(n, _)| *n == name)
            .and_then(|(_, v)| v.parse().ok())
            .ok_or_else(|| io::Error::other(format!("no TcpExt counter {name}")))
    }

    /// Listens on `[::]:port` (dual-stack) inside the pod's netns and answers every
    /// connection with one line, `<pod name>\n`, then closes it. Port 0 picks a free
    /// port (see [`TcpServer::port`]).
    pub fn serve_tcp(&self, port: u16) -> io::Result<TcpServer> {
        let listener = self.run_in(|| dual_stack_listener(port))?;
        TcpServer::start(listener, format!("{}\n", self.name), &self.name)
    }

    /// Starts `kmesh-probe ARGS...` inside the pod's netns (`ip netns exec`) and inside
    /// `cgroup` (the child joins it before exec, so all its sockets are subject to
    /// programs attached there).
    pub fn spawn_probe(&self, cgroup: &TestCgroup, args: &[&str]) -> io::Result<ProbeHandle> {
        probe::spawn(&self.netns, cgroup, args)
    }

    /// [`spawn_probe`](Self::spawn_probe) then [`ProbeHandle::wait`].
    pub fn run_probe(&self, cgroup: &TestCgroup, args: &[&str]) -> io::Result<ProbeReport> {
        self.spawn_probe(cgroup, args)?.wait()
    }
}

fn cvt(r: libc::c_int, what: &str) -> io::Result<libc::c_int> {
    if r < 0 {
        let e = io::Error::last_os_error();
        Err(io::Error::new(e.kind(), format!("{what}: {e}")))
    } else {
        Ok(r)
    }
}

fn set_int_opt(
    fd: &OwnedFd,
    level: libc::c_int,
    opt: libc::c_int,
    v: libc::c_int,
    what: &str,
) -> io::Result<()> {
    // SAFETY: valid fd, pointer and length of a c_int.
    cvt(
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                level,
                opt,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        },
        what,
    )
    .map(drop)
}

/// A listening TCP socket on `[::]:port` with `IPV6_V6ONLY` off, in the calling
/// thread's netns.
fn dual_stack_listener(port: u16) -> io::Result<TcpListener> {
    // SAFETY: plain syscalls on an fd owned by OwnedFd.
    let fd = cvt(
        unsafe { libc::socket(libc::AF_INET6, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) },
        "socket(AF_INET6, SOCK_STREAM)",
    )?;
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    set_int_opt(
        &fd,
        libc::IPPROTO_IPV6,
        libc::IPV6_V6ONLY,
        0,
        "setsockopt(IPV6_V6ONLY, 0)",
    )?;
    set_int_opt(
        &fd,
        libc::SOL_SOCKET,
        libc::SO_REUSEADDR,
        1,
        "setsockopt(SO_REUSEADDR)",
    )?;
    let mut sa: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
    sa.sin6_port = port.to_be();
    cvt(
        unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sa as *const libc::sockaddr_in6).cast(),
                std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
            )
        },
        &format!("bind([::]:{port})"),
    )?;
    cvt(unsafe { libc::listen(fd.as_raw_fd(), 1024) }, "listen")?;
    let l = TcpListener::from(fd);
    l.set_nonblocking(true)?;
    Ok(l)
}

/// A TCP server started by [`Pod::serve_tcp`]; counts accepted connections and stops
/// (closing the listener) when dropped.
#[derive(Debug)]
pub struct TcpServer {
    local: SocketAddr,
    accepted: Arc<AtomicU64>,
    stop: Option<OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

impl TcpServer {
    fn start(listener: TcpListener, reply: String, pod: &str) -> io::Result<TcpServer> {
        let local = listener.local_addr()?;
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: valid array of two fds, immediately owned.
        cvt(
            unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) },
            "pipe2",
        )?;
        let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let accepted = Arc::new(AtomicU64::new(0));
        let count = accepted.clone();
        let thread = thread::Builder::new()
            .name(format!("kmt-serve-{pod}"))
            .spawn(move || accept_loop(listener, rd, reply.as_bytes(), &count))?;
        Ok(TcpServer {
            local,
            accepted,
            stop: Some(wr),
            thread: Some(thread),
        })
    }

    /// The port listened on.
    pub fn port(&self) -> u16 {
        self.local.port()
    }

    /// Number of connections accepted so far. A connection is counted before its
    /// reply is written, so once a client has read its reply, it is counted.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        // Closing the pipe's write end wakes the accept loop (POLLHUP on the read end).
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: TcpListener, stop: OwnedFd, reply: &[u8], count: &AtomicU64) {
    loop {
        let mut pfd = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: valid array of two pollfds.
        let n = unsafe { libc::poll(pfd.as_mut_ptr(), 2, -1) };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        if pfd[1].revents != 0 {
            return;
        }
        loop {
            match listener.accept() {
                Ok((mut s, _)) => {
                    count.fetch_add(1, Ordering::SeqCst);
                    let _ = s.set_nonblocking(false);
                    let _ = s.write_all(reply);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // ECONNABORTED, EMFILE...: keep serving.
                Err(_) => break,
            }
        }
    }
}
