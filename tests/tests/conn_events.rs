//! Connection events on the real kernel: the real `kmesh-agent` loads the real programs (the
//! `sock_ops` program beside connect4/6 on a test cgroup, `sk_lookup` on the enrolled pods);
//! `kmesh-peer` runs both ends of connections with exact byte counts inside pod network
//! namespaces and that cgroup; the test reads the pinned ring buffer itself with the agent's own
//! reader (`kmesh_agent::events::EventReader`, the agent started with `--no-events-reader`) and
//! checks each event field by field. One test lets the agent read, and checks its metrics.
//!
//! Run as root after `cargo build --workspace --bins` (scripts/test.sh does both).
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::{
        atomic::{AtomicU8, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use kmesh_agent::{
    connection::{Connection, Direction, Outcome},
    events::{DroppedCounter, EventReader},
    loader::BpfObject,
};
use kmesh_common::{
    authz::{ANY_CLASS, ANY_PORT, authz_action, authz_policy_kind, authz_reason},
    lb_policy, mode,
};
use kmesh_snapshot::builder::{Endpoint, SnapshotBuilder};
use kmesh_tests::{
    Agent, AgentDir, AgentOptions, AgentSource, Pod, TestCgroup, TestNetwork,
    peer::{Close, PeerConnection, PeerHandle},
    write_atomically,
};

const NODE: &str = "node-1";
const READY: Duration = Duration::from_secs(20);
/// The server's port, and a port nothing listens on, and the port policy denies the client.
const PORT: u16 = 8080;
const CLOSED_PORT: u16 = 7070;
const DENIED_PORT: u16 = 9090;
/// The policy id that denies the client on DENIED_PORT.
const DENY_POLICY: u32 = 42;
const SERVICE_PORT: u16 = 80;
/// Byte counts that cannot be mistaken for one another.
const SENT: u64 = 12_345;
const REPLY: u64 = 3_210;

/// One test's node: an enrolled client and server, a pod that is not enrolled, a service to the
/// server and one without endpoints, a deny policy on DENIED_PORT. Pod addresses are
/// 10.244.<subnet>.x with subnets from 150 up (apart from the other kernel tests').
struct World {
    net: TestNetwork,
    cgroup: TestCgroup,
    dir: AgentDir,
    client: Pod,
    server: Pod,
    outsider: Pod,
    vip: Ipv4Addr,
    vip_empty: Ipv4Addr,
    snapshot_file: PathBuf,
}

impl World {
    fn new(name: &str) -> World {
        static NEXT_SUBNET: AtomicU8 = AtomicU8::new(150);
        let subnet = NEXT_SUBNET.fetch_add(1, Ordering::Relaxed);
        let net = TestNetwork::new(name).expect("test network");
        let cgroup = TestCgroup::new(name).expect("test cgroup");
        let dir = AgentDir::new(name).expect("pin directory");
        let pod = |pod: &str, host: u8| {
            net.add_pod(pod, Ipv4Addr::new(10, 244, subnet, host), None)
                .expect("pod")
        };
        let (client, server, outsider) = (pod("client", 10), pod("server", 100), pod("out", 20));
        let snapshot_file =
            std::env::temp_dir().join(format!("kmt-{name}-{}.snap", std::process::id()));
        World {
            vip: Ipv4Addr::new(10, 96, subnet, 1),
            vip_empty: Ipv4Addr::new(10, 96, subnet, 2),
            net,
            cgroup,
            dir,
            client,
            server,
            outsider,
            snapshot_file,
        }
    }

    fn write_snapshot(&self) {
        let mut b = SnapshotBuilder::new(NODE, 1, mode::KERNEL_NATIVE);
        b.workload(IpAddr::V4(self.client.ipv4()), 1);
        b.workload(IpAddr::V4(self.server.ipv4()), 2);
        let set = b.backend_set(
            lb_policy::RANDOM,
            &[Endpoint::new(IpAddr::V4(self.server.ipv4()), PORT, 2)],
        );
        b.service(self.vip.into(), SERVICE_PORT, &[(1, set)]);
        let empty = b.backend_set(lb_policy::RANDOM, &[]);
        b.service(self.vip_empty.into(), SERVICE_PORT, &[(1, empty)]);
        // The server's policy: the client is denied on DENIED_PORT, everything else allowed.
        b.authz_workload(IpAddr::V4(self.server.ipv4()), 1);
        b.authz_source(IpAddr::V4(self.client.ipv4()), 32, 1);
        b.authz_verdict(
            1,
            1,
            DENIED_PORT,
            authz_action::DENY,
            authz_reason::DENY_MATCHED,
            DENY_POLICY,
        );
        b.authz_verdict(
            1,
            ANY_CLASS,
            ANY_PORT,
            authz_action::ALLOW,
            authz_reason::NO_ALLOW_POLICY,
            0,
        );
        b.authz_policy(
            DENY_POLICY,
            authz_policy_kind::AUTHORIZATION_POLICY,
            "default/deny-client",
        );
        let snapshot = b.build();
        write_atomically(&self.snapshot_file, &snapshot.encode().expect("encode"))
            .expect("write snapshot");
    }

    /// The agent, ready with both pods enrolled and the server's authorization link attached.
    fn start_agent(&self, extra_args: &[&str]) -> Agent {
        self.write_snapshot();
        let mut agent = Agent::start(&AgentOptions {
            node_name: NODE,
            source: AgentSource::File(&self.snapshot_file),
            dir: &self.dir,
            cgroup: &self.cgroup,
            extra_args: [
                "--host-netns",
                &self.net.node_netns_path().display().to_string(),
            ]
            .iter()
            .chain(extra_args)
            .map(|s| s.to_string())
            .collect(),
        })
        .expect("start kmesh-agent");
        agent.wait_ready(READY).expect("agent ready");
        agent
            .wait_for(Duration::from_secs(10), "2 pods enrolled", |a| {
                let s = a.debug_snapshot()?;
                Ok(s["enrolled_netns"].as_u64() == Some(2)
                    && s["authz_links"].as_u64() == Some(2)
                    && s["host_addrs"].as_u64() > Some(0))
            })
            .expect("enrolment");
        agent
    }

    fn layout_dir(&self) -> PathBuf {
        self.dir.path().join(BpfObject::Shipped.layout().dir_name())
    }

    fn reader(&self) -> EventReader {
        EventReader::open_pinned(&self.layout_dir()).expect("the pinned events ring")
    }

    fn server_addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.server.ipv4().into(), port)
    }

    fn service_addr(&self, vip: Ipv4Addr) -> SocketAddr {
        SocketAddr::new(vip.into(), SERVICE_PORT)
    }

    /// One connection from `from` to `target` with a server on the server pod's PORT.
    fn exchange(&self, from: &Pod, target: SocketAddr, close: Close) -> PeerExchange {
        let server = PeerHandle::serve(&self.server, &self.cgroup, PORT, REPLY, 1).expect("serve");
        let client = PeerHandle::connect(from, &self.cgroup, target, SENT, 1, close)
            .expect("client")
            .connections;
        let server = server
            .wait(Duration::from_secs(10))
            .expect("server")
            .connections;
        PeerExchange {
            client: client[0].clone(),
            server: server[0].clone(),
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.snapshot_file);
    }
}

struct PeerExchange {
    client: PeerConnection,
    server: PeerConnection,
}

/// Drains `reader` until `n` events came (or 5 s passed), then half a second more to catch any
/// event too many.
fn read_events(reader: &mut EventReader, n: usize) -> Vec<Connection> {
    let (tx, rx) = mpsc::channel();
    let mut sink = tx;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut got = Vec::new();
    while got.len() < n && Instant::now() < deadline {
        reader.drain(&mut sink);
        got.extend(rx.try_iter());
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(500));
    reader.drain(&mut sink);
    got.extend(rx.try_iter());
    got
}

fn one(events: &[Connection], direction: Direction) -> &Connection {
    let matching: Vec<_> = events.iter().filter(|e| e.direction == direction).collect();
    assert_eq!(matching.len(), 1, "{direction:?} events: {events:#?}");
    matching[0]
}

/// The events of a clean close and of a reset must describe both ends exactly.
fn check_both_ends(
    w: &World,
    x: &PeerExchange,
    events: &[Connection],
    service: Option<SocketAddr>,
    outcome: Outcome,
) {
    assert_eq!(events.len(), 2, "{events:#?}");
    let client_addr = x.client.local_addr();
    let server_addr = w.server_addr(PORT);
    let reply = if outcome == Outcome::Closed { REPLY } else { 0 };
    let out = one(events, Direction::Outbound);
    assert_eq!(out.source, client_addr, "{out:#?}");
    assert_eq!(out.destination, server_addr, "{out:#?}");
    assert_eq!(out.service, service, "{out:#?}");
    assert_eq!(
        (out.bytes_sent, out.bytes_received),
        (SENT, reply),
        "{out:#?}"
    );
    assert_eq!(out.outcome, outcome, "{out:#?}");
    let inbound = one(events, Direction::Inbound);
    assert_eq!(inbound.source, client_addr, "{inbound:#?}");
    assert_eq!(inbound.destination, server_addr, "{inbound:#?}");
    assert_eq!(inbound.service, None, "{inbound:#?}");
    assert_eq!(
        (inbound.bytes_sent, inbound.bytes_received),
        (reply, SENT),
        "{inbound:#?}"
    );
    assert_eq!(inbound.outcome, outcome, "{inbound:#?}");
    for e in [out, inbound] {
        assert!(
            e.duration > Duration::ZERO && e.duration < Duration::from_secs(10),
            "{e:#?}"
        );
    }
}

#[test]
fn a_connection_through_a_service_is_reported_by_both_ends() {
    let w = World::new("evsvc");
    let _agent = w.start_agent(&["--no-events-reader"]);
    let mut reader = w.reader();

    let x = w.exchange(&w.client, w.service_addr(w.vip), Close::Fin);
    assert_eq!(
        (x.client.sent, x.client.received),
        (SENT, REPLY),
        "{:?}",
        x.client
    );
    assert_eq!(x.client.error, None);
    let events = read_events(&mut reader, 2);
    check_both_ends(
        &w,
        &x,
        &events,
        Some(w.service_addr(w.vip)),
        Outcome::Closed,
    );

    // Straight to the server's address: no service.
    let x = w.exchange(&w.client, w.server_addr(PORT), Close::Fin);
    let events = read_events(&mut reader, 2);
    check_both_ends(&w, &x, &events, None, Outcome::Closed);

    // SO_LINGER 0: both ends see a reset, after every byte was acknowledged.
    let x = w.exchange(&w.client, w.service_addr(w.vip), Close::Rst);
    assert_eq!(
        x.server.error.as_deref(),
        Some("ECONNRESET"),
        "{:?}",
        x.server
    );
    let events = read_events(&mut reader, 2);
    check_both_ends(&w, &x, &events, Some(w.service_addr(w.vip)), Outcome::Reset);
    let dropped = DroppedCounter::open_pinned(&w.layout_dir())
        .expect("drop counters")
        .read()
        .expect("read drop counters");
    assert_eq!((dropped.ring_full, dropped.no_storage), (0, 0));
}

#[test]
fn refusals_are_reported_by_the_side_that_saw_them() {
    let w = World::new("evrefuse");
    let _agent = w.start_agent(&["--no-events-reader"]);
    let mut reader = w.reader();
    let client_ip: IpAddr = w.client.ipv4().into();

    // Nothing listens: the client's connect fails (SYN answered by a RST).
    let report = PeerHandle::connect(
        &w.client,
        &w.cgroup,
        w.server_addr(CLOSED_PORT),
        SENT,
        1,
        Close::Fin,
    )
    .expect("client");
    assert_eq!(report.connections[0].error.as_deref(), Some("ECONNREFUSED"));
    let events = read_events(&mut reader, 1);
    assert_eq!(events.len(), 1, "{events:#?}");
    let e = &events[0];
    assert_eq!(e.direction, Direction::Outbound);
    assert_eq!(e.outcome, Outcome::ConnectFailed, "{e:#?}");
    assert_eq!(e.source.ip(), client_ip);
    assert_ne!(e.source.port(), 0, "{e:#?}");
    assert_eq!(e.destination, w.server_addr(CLOSED_PORT));
    assert_eq!((e.service, e.bytes_sent, e.bytes_received), (None, 0, 0));

    // A service without endpoints: connect4 refuses before any packet.
    let report = PeerHandle::connect(
        &w.client,
        &w.cgroup,
        w.service_addr(w.vip_empty),
        SENT,
        1,
        Close::Fin,
    )
    .expect("client");
    assert_eq!(report.connections[0].error.as_deref(), Some("ECONNREFUSED"));
    let events = read_events(&mut reader, 1);
    assert_eq!(events.len(), 1, "{events:#?}");
    let e = &events[0];
    assert_eq!(
        (e.direction, e.outcome),
        (Direction::Outbound, Outcome::NoEndpoint),
        "{e:#?}"
    );
    assert_eq!(e.source, SocketAddr::new(client_ip, 0));
    assert_eq!(e.destination, w.service_addr(w.vip_empty));
    assert_eq!(e.service, Some(w.service_addr(w.vip_empty)));

    // Denied by the server's policy: the server side reports the denial and the deciding policy,
    // the client side a failed connect.
    let server = PeerHandle::serve(&w.server, &w.cgroup, DENIED_PORT, REPLY, 1).expect("serve");
    let report = PeerHandle::connect(
        &w.client,
        &w.cgroup,
        w.server_addr(DENIED_PORT),
        SENT,
        1,
        Close::Fin,
    )
    .expect("client");
    drop(server);
    let client_conn = &report.connections[0];
    assert_eq!(client_conn.error.as_deref(), Some("ECONNREFUSED"));
    let events = read_events(&mut reader, 2);
    assert_eq!(events.len(), 2, "{events:#?}");
    let denied = one(&events, Direction::Inbound);
    assert_eq!(
        denied.outcome,
        Outcome::Denied {
            policy: DENY_POLICY
        },
        "{denied:#?}"
    );
    assert_eq!(denied.destination, w.server_addr(DENIED_PORT));
    assert_eq!(denied.source.ip(), client_ip);
    let failed = one(&events, Direction::Outbound);
    assert_eq!(failed.outcome, Outcome::ConnectFailed, "{failed:#?}");
    assert_eq!(
        denied.source, failed.source,
        "both ends name the same client port"
    );

    // A pod that is not enrolled reports nothing of its own; the enrolled server still reports
    // the connection it accepted.
    let x = w.exchange(&w.outsider, w.server_addr(PORT), Close::Fin);
    let events = read_events(&mut reader, 1);
    assert_eq!(events.len(), 1, "{events:#?}");
    let e = &events[0];
    assert_eq!(e.direction, Direction::Inbound, "{e:#?}");
    assert_eq!(e.source, x.client.local_addr());
    assert_eq!((e.bytes_sent, e.bytes_received), (REPLY, SENT));
}

/// A ring too small for the events of a burst, never read while it runs: every connection still
/// succeeds, and every event is either in the ring or counted as dropped.
#[test]
fn a_full_ring_drops_events_counts_them_and_holds_up_no_connection() {
    const CONNECTIONS: u64 = 150;
    let w = World::new("evfull");
    let _agent = w.start_agent(&["--no-events-reader", "--events-ring-bytes", "4096"]);
    let server = PeerHandle::serve(&w.server, &w.cgroup, PORT, REPLY, CONNECTIONS).expect("serve");
    let report = PeerHandle::connect(
        &w.client,
        &w.cgroup,
        w.service_addr(w.vip),
        SENT,
        CONNECTIONS,
        Close::Fin,
    )
    .expect("client");
    let served = server.wait(Duration::from_secs(30)).expect("server");
    let ok = |c: &PeerConnection| c.error.is_none() && c.received == REPLY;
    assert_eq!(
        report.connections.iter().filter(|c| ok(c)).count() as u64,
        CONNECTIONS,
        "{report:?}"
    );
    assert_eq!(served.connections.len() as u64, CONNECTIONS);

    // Every connection has two enrolled ends: 2 events each, in the ring or dropped.
    let expected = 2 * CONNECTIONS;
    let dropped_counter = DroppedCounter::open_pinned(&w.layout_dir()).expect("drop counters");
    let mut reader = w.reader();
    let (tx, rx) = mpsc::channel();
    let mut sink = tx;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut delivered = 0u64;
    while Instant::now() < deadline {
        delivered += reader.drain(&mut sink);
        let dropped = dropped_counter.read().expect("read drops").ring_full;
        if delivered + dropped >= expected {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    delivered += reader.drain(&mut sink);
    let dropped = dropped_counter.read().expect("read drops").ring_full;
    eprintln!("{expected} events: {delivered} delivered, {dropped} dropped");
    let events: Vec<Connection> = rx.try_iter().collect();
    assert_eq!(events.len() as u64, delivered);
    assert_eq!(
        delivered + dropped,
        expected,
        "delivered {delivered} + dropped {dropped}"
    );
    assert!(dropped > 0, "a 4 KiB ring cannot hold {expected} events");
    // 4 KiB holds 36 records of 104 + 8 bytes.
    assert!(
        (30..=36).contains(&delivered),
        "delivered {delivered}: the ring's capacity"
    );
    assert!(events.iter().all(|e| e.outcome == Outcome::Closed));
}

/// The agent reading the ring itself: its metrics count the events per outcome.
#[test]
fn the_agent_reads_the_ring_and_counts_events() {
    let w = World::new("evagent");
    let mut agent = w.start_agent(&[]);
    w.exchange(&w.client, w.service_addr(w.vip), Close::Fin);
    w.exchange(&w.client, w.service_addr(w.vip), Close::Rst);
    let _ = PeerHandle::connect(
        &w.client,
        &w.cgroup,
        w.service_addr(w.vip_empty),
        SENT,
        3,
        Close::Fin,
    )
    .expect("client");
    agent
        .wait_for(Duration::from_secs(10), "events counted", |a| {
            Ok(a.metric("kmesh_events_total{outcome=\"no_endpoint\"}")? == Some(3.0))
        })
        .expect("events counted");
    for (series, value) in [
        ("kmesh_events_total{outcome=\"closed\"}", 2.0),
        ("kmesh_events_total{outcome=\"reset\"}", 2.0),
        ("kmesh_events_total{outcome=\"no_endpoint\"}", 3.0),
        ("kmesh_events_total{outcome=\"invalid\"}", 0.0),
        ("kmesh_events_dropped_total{reason=\"ring_full\"}", 0.0),
        ("kmesh_events_dropped_total{reason=\"no_storage\"}", 0.0),
    ] {
        assert_eq!(
            agent.metric(series).expect("metrics"),
            Some(value),
            "{series}"
        );
    }
}
