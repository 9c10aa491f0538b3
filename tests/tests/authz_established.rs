//! Established connections a new generation denies are destroyed (issue #8): real TCP connections
//! between test network namespaces, and the agent's closing of denied connections
//! (`kmesh_agent::established::close_denied`) run on the server pod's namespace with hand-built
//! generations. A destroyed connection's client reads ECONNRESET at once; every connection the
//! generation allows, exempts or does not judge still echoes.
//!
//! Run as root: `cargo test -p kmesh-tests --test authz_established`.
use std::{
    collections::BTreeSet,
    io::{self, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::{AsRawFd as _, FromRawFd as _},
    path::Path,
    thread::{self, JoinHandle},
    time::Duration,
};

use kmesh_agent::{
    established::{Closed, ClosedByPolicy, DenyCause, close_denied},
    sys::{SockDiag, TcpSocket, TcpState},
};
use kmesh_common::{
    Ip16,
    authz::{
        ANY_CLASS, ANY_PORT, AuthzPolicyRecord, AuthzSourceKey, AuthzSourceRecord,
        AuthzSourceValue, AuthzVerdict, AuthzVerdictKey, AuthzVerdictRecord, AuthzWorkloadRecord,
        AuthzWorkloadValue, authz_action, authz_reason,
    },
    ip16, mode,
};
use kmesh_snapshot::{AuthzTables, Snapshot, builder::SnapshotBuilder};
use kmesh_tests::{Pod, TestNetwork, authz::AuthzTablesBuilder, require_root, run_in_netns};

const SERVER_V4: Ipv4Addr = Ipv4Addr::new(10, 244, 7, 2);
const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 7, 2);
/// In the block 10.244.7.0/24 the policy denies, but with an identity of its own that it allows.
const ALLOWED_V4: Ipv4Addr = Ipv4Addr::new(10, 244, 7, 3);
const ALLOWED_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 7, 3);
/// In the block only: allowed on DUAL_PORT, denied on V4_PORT.
const BLOCK_V4: Ipv4Addr = Ipv4Addr::new(10, 244, 7, 5);
/// In no source entry at all: denied everywhere.
const DENIED_V4: Ipv4Addr = Ipv4Addr::new(10, 244, 8, 4);
const DENIED_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 8, 4);
/// A dual-stack listener: its IPv4 connections are AF_INET6 sockets with IPv4-mapped addresses.
const DUAL_PORT: u16 = 8080;
/// An IPv4-only listener: its connections are AF_INET sockets.
const V4_PORT: u16 = 8081;
/// The denied pod's own server, which the server pod connects out to.
const OUT_PORT: u16 = 9000;
/// The DENY policy that names the block on V4_PORT, the ALLOW policy that names it on DUAL_PORT,
/// and the ALLOW policy of the allowed pod.
const DENY_POLICY: u32 = 9;
const BLOCK_ALLOW_POLICY: u32 = 8;
const ALLOW_POLICY: u32 = 7;
const BLOCK_CLASS: u32 = 1;
const ALLOWED_CLASS: u32 = 2;
/// How soon a destroyed connection's client must see the reset.
const RESET_WITHIN: Duration = Duration::from_secs(1);

/// A listener in a pod's namespace echoing every connection; stops on drop.
struct EchoServer {
    listener: TcpListener,
    thread: Option<JoinHandle<()>>,
}

impl EchoServer {
    fn start(pod: &Pod, addr: SocketAddr) -> EchoServer {
        let listener = pod
            .run_in(|| TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("listen on {addr} in {}: {e}", pod.name()));
        let accepting = listener.try_clone().expect("clone listener");
        let thread = thread::spawn(move || {
            for conn in accepting.incoming() {
                let Ok(conn) = conn else { return };
                thread::spawn(move || {
                    let mut reader = conn.try_clone().expect("clone connection");
                    let mut writer = conn;
                    // Ends when the client closes or the connection is destroyed.
                    let _ = io::copy(&mut reader, &mut writer);
                });
            }
        });
        EchoServer {
            listener,
            thread: Some(thread),
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        // shutdown(2) on a listening socket wakes its accept() with EINVAL: the loop ends.
        // SAFETY: a plain syscall on a descriptor we own.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A client connection, made from inside a namespace (it stays there).
struct Conn {
    name: &'static str,
    stream: TcpStream,
}

fn connect(netns: &Path, name: &'static str, to: SocketAddr) -> Conn {
    let stream = run_in_netns(netns, || TcpStream::connect_timeout(&to, RESET_WITHIN))
        .unwrap_or_else(|e| panic!("{name}: connect to {to}: {e}"));
    stream
        .set_read_timeout(Some(RESET_WITHIN))
        .expect("read timeout");
    Conn { name, stream }
}

impl Conn {
    /// Writes a line and reads it back.
    fn echoes(&mut self, round: u32) -> Result<(), String> {
        let line = format!("{} {round}\n", self.name);
        self.stream
            .write_all(line.as_bytes())
            .map_err(|e| format!("{}: write: {e}", self.name))?;
        let mut back = vec![0; line.len()];
        self.stream
            .read_exact(&mut back)
            .map_err(|e| format!("{}: read back: {e}", self.name))?;
        if back != line.as_bytes() {
            return Err(format!("{}: echoed {back:?}", self.name));
        }
        Ok(())
    }

    /// Whether the connection was reset: a read fails with ECONNRESET within RESET_WITHIN.
    fn was_reset(&mut self) -> Result<(), String> {
        let mut buf = [0; 64];
        match self.stream.read(&mut buf) {
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Ok(()),
            Err(e) => Err(format!("{}: read: {e} (not a reset)", self.name)),
            Ok(n) => Err(format!("{}: read {n} bytes instead of a reset", self.name)),
        }
    }
}

/// What the clients see, checked before the agent's own counts: every `echoing` connection still
/// echoes, every `reset` one reads ECONNRESET within RESET_WITHIN. Returns what went otherwise.
fn surprises(echoing: Vec<&mut Conn>, reset: Vec<&mut Conn>, round: u32) -> Vec<String> {
    let echoes = echoing.into_iter().map(|c| c.echoes(round));
    let resets = reset.into_iter().map(|c| c.was_reset());
    echoes.chain(resets).filter_map(Result::err).collect()
}

fn verdict(
    policy_set: u32,
    class: u32,
    port: u16,
    policy: u32,
    action: u8,
    reason: u8,
) -> AuthzVerdictRecord {
    AuthzVerdictRecord {
        key: AuthzVerdictKey {
            policy_set,
            source_class: class,
            port,
            pad: 0,
        },
        value: AuthzVerdict {
            policy,
            action,
            reason,
            pad: 0,
        },
    }
}

fn source(prefix_len: u32, ip: IpAddr, class: u32) -> AuthzSourceRecord {
    AuthzSourceRecord {
        key: AuthzSourceKey {
            prefix_len,
            ip: ip16(ip),
        },
        value: AuthzSourceValue {
            source_class: class,
        },
    }
}

/// The names of the policies the verdicts name (a valid snapshot names each).
fn policy_names() -> Vec<AuthzPolicyRecord> {
    let mut names = AuthzTablesBuilder::default();
    names
        .policy(ALLOW_POLICY, "test/allow-allowed")
        .policy(BLOCK_ALLOW_POLICY, "test/allow-block-dual")
        .policy(DENY_POLICY, "test/deny-block-v4-only");
    names.into_tables().policies
}

/// A generation binding set 1 to both server addresses, with `verdicts`.
fn generation(number: u64, verdicts: Vec<AuthzVerdictRecord>) -> Snapshot {
    let mut s = SnapshotBuilder::new("node-1", number, mode::KERNEL_NATIVE).build();
    let workload = |ip: IpAddr| AuthzWorkloadRecord {
        ip: ip16(ip),
        value: AuthzWorkloadValue {
            policy_set: 1,
            pad: 0,
        },
    };
    s.authz = AuthzTables {
        workloads: vec![workload(SERVER_V4.into()), workload(SERVER_V6.into())],
        sources: vec![
            source(96 + 24, Ipv4Addr::new(10, 244, 7, 0).into(), BLOCK_CLASS),
            source(128, ALLOWED_V4.into(), ALLOWED_CLASS),
            source(128, ALLOWED_V6.into(), ALLOWED_CLASS),
        ],
        verdicts,
        policies: policy_names(),
    };
    s.sort();
    // The agent judges decoded snapshots: this one must be one the decoder would accept.
    s.encode().expect("a valid snapshot");
    s
}

/// Generation 1: no ALLOW policy, nothing denied.
fn allow_all() -> Snapshot {
    let allow = authz_action::ALLOW;
    generation(
        1,
        vec![verdict(
            1,
            ANY_CLASS,
            ANY_PORT,
            0,
            allow,
            authz_reason::NO_ALLOW_POLICY,
        )],
    )
}

/// Generation 2: ALLOW policies for the allowed pod (everywhere) and the block (on DUAL_PORT), and
/// a DENY policy naming the block on V4_PORT.
fn deny_all_but_allowed() -> Snapshot {
    let (allow, deny) = (authz_action::ALLOW, authz_action::DENY);
    generation(
        2,
        vec![
            verdict(
                1,
                ANY_CLASS,
                ANY_PORT,
                0,
                deny,
                authz_reason::NO_ALLOW_MATCHED,
            ),
            verdict(
                1,
                BLOCK_CLASS,
                V4_PORT,
                DENY_POLICY,
                deny,
                authz_reason::DENY_MATCHED,
            ),
            verdict(
                1,
                BLOCK_CLASS,
                DUAL_PORT,
                BLOCK_ALLOW_POLICY,
                allow,
                authz_reason::ALLOW_MATCHED,
            ),
            verdict(
                1,
                ALLOWED_CLASS,
                ANY_PORT,
                ALLOW_POLICY,
                allow,
                authz_reason::ALLOW_MATCHED,
            ),
        ],
    )
}

fn dual(ip: IpAddr) -> SocketAddr {
    SocketAddr::new(ip, DUAL_PORT)
}

#[test]
fn a_generation_destroys_the_connections_it_denies_and_only_those() {
    require_root();
    let net = TestNetwork::new("authz-est").expect("test network");
    let server = net
        .add_pod("server", SERVER_V4, Some(SERVER_V6))
        .expect("server pod");
    let allowed = net
        .add_pod("allowed", ALLOWED_V4, Some(ALLOWED_V6))
        .expect("allowed pod");
    let block = net.add_pod("block", BLOCK_V4, None).expect("block pod");
    let denied = net
        .add_pod("denied", DENIED_V4, Some(DENIED_V6))
        .expect("denied pod");
    let _dual = EchoServer::start(
        &server,
        SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), DUAL_PORT),
    );
    let _v4 = EchoServer::start(
        &server,
        SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), V4_PORT),
    );
    let _out = EchoServer::start(
        &denied,
        SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), OUT_PORT),
    );

    let (a, b, d) = (
        allowed.netns_path(),
        block.netns_path(),
        denied.netns_path(),
    );
    let v4_only = SocketAddr::new(SERVER_V4.into(), V4_PORT);
    let mut kept = [
        // In the block, but its own /128 entry (the longest prefix) makes it the allowed class.
        connect(&a, "allowed v4", dual(SERVER_V4.into())),
        connect(&a, "allowed v6", dual(SERVER_V6.into())),
        connect(&a, "allowed v4-only", v4_only),
        connect(&b, "block", dual(SERVER_V4.into())),
        // From the node's bridge address: in no block, so denied, but the node is exempt.
        connect(&net.node_netns_path(), "node", dual(SERVER_V4.into())),
        // The server's own outbound connection to the denied pod: no inbound policy judges it.
        connect(
            &server.netns_path(),
            "outbound",
            SocketAddr::new(DENIED_V4.into(), OUT_PORT),
        ),
    ];
    let mut doomed = [
        connect(&d, "denied v4 #1", dual(SERVER_V4.into())),
        connect(&d, "denied v4 #2", dual(SERVER_V4.into())),
        connect(&d, "denied v6", dual(SERVER_V6.into())),
        connect(&b, "block v4-only", v4_only),
    ];
    for c in kept.iter_mut().chain(doomed.iter_mut()) {
        c.echoes(0).unwrap();
    }
    // The server's namespace twice, as /run/netns and /proc paths give one namespace many times:
    // it is visited once.
    let open = || std::fs::File::open(server.netns_path()).expect("the server's namespace");
    let (ns_a, ns_b) = (open(), open());
    let namespaces = [&ns_a, &ns_b];
    let host: BTreeSet<Ip16> = [
        IpAddr::from(TestNetwork::BRIDGE_V4),
        IpAddr::from(TestNetwork::BRIDGE_V6),
    ]
    .into_iter()
    .map(ip16)
    .collect();
    let close = |s: &Snapshot| close_denied(&namespaces, s.config.mode, &s.authz, &host);
    // Connections to the server: allowed 3, block 2, node 1, denied 3 (not the outbound one).
    let examined = 3 + 2 + 1 + 3;

    // Generation 1 denies nothing; generation 2 denies the four `doomed` connections; a second
    // pass of generation 2 finds nothing left to destroy. What the clients see is checked after
    // each pass and asserted first; the agent's own counts after.
    let first = close(&allow_all());
    let all: Vec<&mut Conn> = kept.iter_mut().chain(doomed.iter_mut()).collect();
    let first_seen = surprises(all, vec![], 1);
    let second = close(&deny_all_but_allowed());
    let second_seen = surprises(kept.iter_mut().collect(), doomed.iter_mut().collect(), 2);
    let third = close(&deny_all_but_allowed());
    let third_seen = surprises(kept.iter_mut().collect(), vec![], 3);
    assert_eq!(
        [first_seen, second_seen, third_seen],
        [vec![], vec![], vec![]] as [Vec<String>; 3]
    );

    let by = |workload: IpAddr, policy, reason, closed| ClosedByPolicy {
        workload,
        cause: DenyCause::Verdict { policy, reason },
        closed,
    };
    let examined_only = |examined| Closed {
        namespaces: 1,
        examined,
        node_exempt: 1,
        ..Closed::default()
    };
    assert_eq!(first, examined_only(examined));
    assert_eq!(
        second,
        Closed {
            closed: 4,
            by_policy: vec![
                by(SERVER_V4.into(), 0, authz_reason::NO_ALLOW_MATCHED, 2),
                by(SERVER_V4.into(), DENY_POLICY, authz_reason::DENY_MATCHED, 1),
                by(SERVER_V6.into(), 0, authz_reason::NO_ALLOW_MATCHED, 1),
            ],
            ..examined_only(examined)
        }
    );
    assert_eq!(third, examined_only(examined - 4));
    for c in &kept {
        let _ = c.stream.shutdown(Shutdown::Both);
    }
}

/// `setsockopt(fd, SOL_SOCKET, option, value)`.
fn set_option<T>(fd: libc::c_int, option: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: an in-buffer of the size we pass, on a descriptor the caller owns.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn sockaddr(addr: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr.ip().octets()),
        },
        sin_zero: [0; 8],
    }
}

/// A client connection from the fixed port `port` of the namespace `netns`, which aborts (a RST,
/// no TIME_WAIT on either side: SO_LINGER 0) when dropped, so that the next one can take the very
/// same addresses at once.
fn connect_from_port(netns: &Path, name: &'static str, port: u16, to: SocketAddrV4) -> Conn {
    let stream = run_in_netns(netns, || {
        // SAFETY: socket(2) with constant arguments.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is fresh; the stream owns (and closes) it from here on.
        let stream = unsafe { TcpStream::from_raw_fd(fd) };
        set_option(fd, libc::SO_REUSEADDR, &1 as &libc::c_int)?;
        let abort = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        set_option(fd, libc::SO_LINGER, &abort)?;
        let (local, remote) = (
            sockaddr(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)),
            sockaddr(to),
        );
        let len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: bind and connect with an address of the size we pass.
        if unsafe { libc::bind(fd, (&raw const local).cast(), len) } != 0
            || unsafe { libc::connect(fd, (&raw const remote).cast(), len) } != 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(stream)
    })
    .unwrap_or_else(|e| panic!("{name}: connect from port {port} to {to}: {e}"));
    stream
        .set_read_timeout(Some(RESET_WITHIN))
        .expect("read timeout");
    Conn { name, stream }
}

/// The server's established connections from the client port `port`, as sock_diag lists them.
fn from_port(server: &Pod, port: u16) -> Vec<TcpSocket> {
    let sockets = server
        .run_in(|| SockDiag::open()?.tcp_sockets(&[TcpState::Established]))
        .expect("list the server's sockets");
    sockets
        .into_iter()
        .filter(|s| s.remote_port == port)
        .collect()
}

/// The server's one established connection from the client port `port`.
fn listed(server: &Pod, port: u16) -> TcpSocket {
    let mut from_port = from_port(server, port).into_iter();
    let socket = from_port.next().expect("the connection is listed");
    assert_eq!(from_port.next(), None, "one connection from port {port}");
    socket
}

/// A destroy reaches only the very socket that was listed (its cookie): once that connection is
/// gone and a newer one holds its exact addresses, destroying the old listing reaches nothing
/// (ENOENT, counted as vanished by the agent) and the newer connection lives on.
#[test]
fn a_destroy_reaches_only_the_socket_listed() {
    require_root();
    const CLIENT_PORT: u16 = 41_000;
    let net = TestNetwork::new("authz-cookie").expect("test network");
    let server = net.add_pod("server", SERVER_V4, None).expect("server pod");
    let client = net.add_pod("client", DENIED_V4, None).expect("client pod");
    let to = SocketAddrV4::new(SERVER_V4, V4_PORT);
    let _echo = EchoServer::start(
        &server,
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, V4_PORT)),
    );

    let mut first = connect_from_port(&client.netns_path(), "first", CLIENT_PORT, to);
    first.echoes(0).unwrap();
    let old = listed(&server, CLIENT_PORT);
    drop(first);
    // The client's RST and its next SYN may take different CPUs' queues: the next connection waits
    // until the server has dropped the old one, so that it cannot meet it.
    let gone = (0..100).any(|_| {
        thread::sleep(Duration::from_millis(10));
        from_port(&server, CLIENT_PORT).is_empty()
    });
    assert!(
        gone,
        "the server still holds the aborted connection after 1 s"
    );
    let mut second = connect_from_port(&client.netns_path(), "second", CLIENT_PORT, to);
    second.echoes(1).unwrap();
    let new = listed(&server, CLIENT_PORT);
    // The data shows what is tested: the same addresses, another socket.
    let addresses = |s: &TcpSocket| (s.local_ip, s.local_port, s.remote_ip, s.remote_port);
    assert_eq!(addresses(&old), addresses(&new));
    assert_ne!(old.cookie, new.cookie, "a new connection, a new cookie");

    let stale = server.run_in(|| Ok(SockDiag::open()?.destroy(&old)));
    let stale = stale.expect("the sock_diag socket");
    assert_eq!(
        stale.map_err(|e| e.raw_os_error()),
        Err(Some(libc::ENOENT)),
        "destroying the old listing"
    );
    second
        .echoes(2)
        .expect("the newer connection survives the old listing's destroy");
    server
        .run_in(|| SockDiag::open()?.destroy(&new))
        .expect("destroying the current listing");
    second.was_reset().expect("the current listing reaches it");
}
