//! Connection events on the real kernel: the real `kmesh-agent` loads the real programs (the
//! `sock_ops` program beside connect4/6 on a test cgroup, `sk_lookup` on the enrolled pods);
//! `kmesh-peer` runs both ends of connections with exact byte counts inside pod network
//! namespaces and that cgroup; the test reads the pinned ring buffer itself with the agent's own
//! reader (`kmesh_agent::events::EventReader`, the agent started with `--no-events-reader`) and
//! checks each event field by field. One test lets the agent read, and checks its metrics.
//!
//! Run as root after `cargo build --workspace --bins` (scripts/test.sh does both).
use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicU8, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use kmesh_agent::{
    connection::{Connection, Direction, Outcome},
    events::{DroppedCounter, EventReader},
};
use kmesh_tests::{
    events_world::{
        CLOSED_PORT, DENIED_PORT, DENY_POLICY, EventsWorld, PORT, PeerExchange, REPLY, SENT,
    },
    peer::{Close, PeerConnection, PeerHandle},
};

/// The world of one test, its pods in a subnet of their own from 150 up (apart from the other
/// kernel tests').
fn world(name: &str) -> EventsWorld {
    static NEXT_SUBNET: AtomicU8 = AtomicU8::new(150);
    EventsWorld::new(name, NEXT_SUBNET.fetch_add(1, Ordering::Relaxed))
}

/// The agent on the world's generation 1, ready with both pods enrolled.
fn start_agent(w: &EventsWorld, extra_args: &[&str]) -> kmesh_tests::Agent {
    w.start_agent(w.snapshot(1).builder.build(), extra_args)
}

fn open_ring(w: &EventsWorld) -> EventReader {
    EventReader::open_pinned(&w.layout_dir()).expect("the pinned events ring")
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
    w: &EventsWorld,
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
    let w = world("evsvc");
    let _agent = start_agent(&w, &["--no-events-reader"]);
    let mut reader = open_ring(&w);

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
    let w = world("evrefuse");
    let _agent = start_agent(&w, &["--no-events-reader"]);
    let mut reader = open_ring(&w);
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
    let w = world("evfull");
    let _agent = start_agent(&w, &["--no-events-reader", "--events-ring-bytes", "4096"]);
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
    let mut reader = open_ring(&w);
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
    let w = world("evagent");
    let mut agent = start_agent(&w, &[]);
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
