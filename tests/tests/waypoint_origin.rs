//! The original-destination transport of DualEngine (docs/dual-engine.md, slice 1 of #11) on the
//! real kernel: the real `kmesh-agent` loads the real programs on a test cgroup; connect4/6
//! rewrite connects to waypoint-bound services to a "waypoint" pod, and `sock_ops` writes the
//! origin option (`kmesh_common::waypoint_origin`) on each SYN; the waypoint reads it back with
//! `kmesh_waypoint::origin` (`TCP_SAVE_SYN` on its listener, `TCP_SAVED_SYN` after accept()), in
//! a thread that dropped every capability first, with no eBPF on its side.
//!
//! The protocol is server-first: the waypoint writes the origin it read (`origin <id>:<port>`, or
//! `none`) as the connection's first bytes, and the clients (`kmesh-probe`, inside client pods and
//! the test cgroup) never write, they read that line. Concurrent clients in two pods dial two
//! waypoint-bound services interleaved; every connection must see exactly its own service's id and
//! port. A third service to the same waypoint, not bound, and a plain connect to the waypoint's
//! address must see `none`. Once over IPv4 and once over IPv6 pods and services.
//!
//! Run as root after `cargo build --workspace --bins` (scripts/test.sh does both).
use std::{
    collections::BTreeMap,
    io::{self, Write},
    net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener},
    os::fd::AsRawFd,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use kmesh_common::{lb_policy, mode};
use kmesh_snapshot::builder::{Endpoint, SnapshotBuilder};
use kmesh_tests::{
    Agent, Pod, ProbeReport,
    waypoint_world::{Family, NODE, WAYPOINT_PORT, WaypointNode},
};

/// Service A (bound to the waypoint): id and port.
const A: (u32, u16) = (7001, 80);
/// Service B (bound to the same waypoint): another id, another port.
const B: (u32, u16) = (7002, 9080);
/// Service C: routed to the waypoint's address too, but not bound (no origin option).
const C: (u32, u16) = (7003, 8080);
/// Connections to A and B per client process; two client pods, each running one process per
/// service at the same time: 4 × 250 = 1,000 connections, interleaved.
const PER_PROBE: u32 = 250;
/// Connections to C, and plain ones to the waypoint's address.
const UNBOUND: u32 = 50;

/// The node of one test (`WaypointNode`): two enrolled client pods and the waypoint pod.
struct World {
    node: WaypointNode,
    clients: [Pod; 2],
    waypoint: Pod,
}

impl World {
    fn new(name: &str, family: Family, subnet: u8) -> World {
        let node = WaypointNode::new(name, family, subnet);
        World {
            clients: [node.pod("client-1", 10), node.pod("client-2", 11)],
            waypoint: node.pod("waypoint", 100),
            node,
        }
    }

    /// The pod's address in this world's family.
    fn addr(&self, pod: &Pod) -> IpAddr {
        self.node.addr(pod)
    }

    /// The VIP of service `n` (1 for A, 2 for B, 3 for C): outside every pod's on-link prefix, so
    /// a connect that is not rewritten fails in the client pod (ENETUNREACH).
    fn vip(&self, n: u8) -> IpAddr {
        self.node.vip(n)
    }

    fn target(&self, (id, port): (u32, u16)) -> String {
        let n = (id - 7000) as u8;
        SocketAddr::new(self.vip(n), port).to_string()
    }

    /// A and B bound to the waypoint, C not; all three routed to the waypoint's address and port.
    fn snapshot(&self) -> kmesh_snapshot::Snapshot {
        let mut b = SnapshotBuilder::new(NODE, 1, mode::DUAL_ENGINE);
        for client in &self.clients {
            b.workload(self.addr(client), 7);
        }
        let waypoint = Endpoint::new(self.addr(&self.waypoint), WAYPOINT_PORT, 9);
        let set = b.backend_set(lb_policy::RANDOM, &[waypoint]);
        let mut ids = BTreeMap::new();
        for (n, (id, port), bound) in [(1, A, true), (2, B, true), (3, C, false)] {
            let route = b.route(&[(1, set)]);
            let assigned = if bound {
                b.waypoint_service(self.vip(n), port, route)
            } else {
                b.service_with_route(self.vip(n), port, route)
            };
            ids.insert(assigned, id);
        }
        let mut snapshot = b.build();
        // Ids of several bytes (the builder counts from 1), so that the option's byte order shows.
        for s in &mut snapshot.services {
            s.value.service_id = ids[&s.value.service_id];
        }
        snapshot
    }

    fn start_agent(&self) -> Agent {
        let mut agent = self.node.start_agent(&self.snapshot());
        agent
            .wait_for(Duration::from_secs(5), "2 enrolled netns", |a| {
                Ok(a.debug_snapshot()?["enrolled_netns"].as_u64() == Some(2))
            })
            .expect("enrolment");
        agent
    }

    /// `kmesh-probe` in `pod` and the test cgroup, `count` connections to `target`, paced (200 µs
    /// apart) so that concurrent probes overlap whatever their start-up times.
    fn spawn_probe(&self, pod: &Pod, target: &str, count: u32) -> kmesh_tests::ProbeHandle {
        let count = count.to_string();
        let args = [
            "--target",
            target,
            "--count",
            &count,
            "--timeout-ms",
            "5000",
            "--interval-us",
            "200",
        ];
        pod.spawn_probe(&self.node.cgroup, &args).expect("probe")
    }
}

/// The reply line a connection to a bound service must get.
fn origin_line((id, port): (u32, u16)) -> String {
    format!("origin {id}:{port}")
}

/// The waypoint: a thread without capabilities serving the listener, server-first.
struct Waypoint {
    stop: Arc<AtomicBool>,
    /// What the waypoint answered, in order.
    seen: Arc<Mutex<Vec<String>>>,
    thread: Option<JoinHandle<()>>,
}

impl Waypoint {
    /// Listens on `[::]:WAYPOINT_PORT` (dual-stack) inside `pod`, then hands the listener to a
    /// thread that drops every capability, sets `TCP_SAVE_SYN` and serves: per accepted
    /// connection, the origin of its saved SYN as the first line, then close.
    fn start(pod: &Pod) -> Waypoint {
        let listener = pod
            .run_in(|| TcpListener::bind((Ipv6Addr::UNSPECIFIED, WAYPOINT_PORT)))
            .expect("waypoint listener");
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = {
            let (stop, seen) = (stop.clone(), seen.clone());
            thread::Builder::new()
                .name("kmt-waypoint".into())
                .spawn(move || {
                    let ready = drop_all_capabilities().and_then(|()| {
                        kmesh_waypoint::origin::enable_on_listener(&listener)
                            .map_err(io::Error::other)
                    });
                    let failed = ready.is_err();
                    let _ = ready_tx.send(ready);
                    if !failed {
                        serve(&listener, &stop, &seen);
                    }
                })
                .expect("waypoint thread")
        };
        ready_rx
            .recv()
            .expect("the waypoint thread answers")
            .expect("the waypoint drops its capabilities and sets TCP_SAVE_SYN");
        Waypoint {
            stop,
            seen,
            thread: Some(thread),
        }
    }

    /// What the waypoint answered, by reply line.
    fn seen(&self) -> BTreeMap<String, u64> {
        let mut counts = BTreeMap::new();
        for line in self.seen.lock().unwrap().iter() {
            *counts.entry(line.clone()).or_default() += 1;
        }
        counts
    }

    /// How often two consecutive connections the waypoint accepted carried different origins.
    fn alternations(&self) -> usize {
        let seen = self.seen.lock().unwrap();
        seen.windows(2).filter(|w| w[0] != w[1]).count()
    }
}

impl Drop for Waypoint {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Drops every capability of the calling thread (capabilities are per thread): what the waypoint
/// does next needs none. Checked in `/proc/thread-self/status`.
fn drop_all_capabilities() -> io::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let none = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capset(2) with a version-3 header and its two data words, all ours.
    if unsafe { libc::syscall(libc::SYS_capset, &raw const header, none.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let status = std::fs::read_to_string("/proc/thread-self/status")?;
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(str::trim);
    if effective != Some("0000000000000000") {
        return Err(io::Error::other(format!(
            "capabilities still effective: {effective:?}"
        )));
    }
    Ok(())
}

/// Accepts until `stop`; each connection gets its origin line first (the client writes nothing).
fn serve(listener: &TcpListener, stop: &AtomicBool, seen: &Mutex<Vec<String>>) {
    while !stop.load(Ordering::SeqCst) {
        let mut pfd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd of ours; a 100 ms wait so that `stop` is seen.
        if unsafe { libc::poll(&raw mut pfd, 1, 100) } <= 0 {
            continue;
        }
        let Ok((mut stream, _)) = listener.accept() else {
            continue;
        };
        let line = match kmesh_waypoint::origin::of_accepted(&stream) {
            Ok(Some(o)) => format!("origin {}:{}", o.service_id, o.port),
            Ok(None) => "none".to_string(),
            Err(e) => format!("error {e}"),
        };
        seen.lock().unwrap().push(line.clone());
        let _ = stream.write_all(format!("{line}\n").as_bytes());
    }
}

fn assert_only(report: &ProbeReport, expected: &str, count: u32, what: &str) {
    assert_eq!(
        (report.ok, report.replies(expected)),
        (u64::from(count), u64::from(count)),
        "{what}: every connection must read {expected:?}: {report:?}"
    );
}

fn origins_reach_the_waypoint(name: &str, family: Family, subnet: u8) {
    let w = World::new(name, family, subnet);
    let waypoint = Waypoint::start(&w.waypoint);
    let mut agent = w.start_agent();

    // Both client pods dial A and B at the same time: four processes, interleaved connections.
    let mut probes = Vec::new();
    for client in &w.clients {
        for service in [A, B] {
            let probe = w.spawn_probe(client, &w.target(service), PER_PROBE);
            probes.push((client.name().to_string(), service, probe));
        }
    }
    for (client, service, probe) in probes {
        let report = probe.wait().expect("probe report");
        println!("{family:?} {client} -> {service:?}: {:?}", report.by_reply);
        assert_only(
            &report,
            &origin_line(service),
            PER_PROBE,
            &format!("{family:?} {client} to {service:?}"),
        );
    }

    // The four clients' connections reached the waypoint interleaved, not one client after another
    // (which would alternate 3 times).
    let alternations = waypoint.alternations();
    println!("{family:?}: A and B alternated {alternations} times at the waypoint");
    assert!(
        alternations >= 20,
        "{family:?}: {alternations} alternations"
    );

    // C is routed to the same waypoint but not bound: no option. Nor on a plain connect.
    let c = w.spawn_probe(&w.clients[0], &w.target(C), UNBOUND);
    let report = c.wait().expect("probe report");
    assert_only(&report, "none", UNBOUND, &format!("{family:?} to C"));
    let direct = SocketAddr::new(w.addr(&w.waypoint), WAYPOINT_PORT).to_string();
    let plain = w.spawn_probe(&w.clients[1], &direct, UNBOUND);
    let report = plain.wait().expect("probe report");
    assert_only(&report, "none", UNBOUND, &format!("{family:?} plain"));

    // The waypoint's own count agrees, and no SYN left without its option.
    let bound = 2 * PER_PROBE;
    let expected = BTreeMap::from([
        (origin_line(A), u64::from(bound)),
        (origin_line(B), u64::from(bound)),
        ("none".to_string(), u64::from(2 * UNBOUND)),
    ]);
    assert_eq!(waypoint.seen(), expected, "{family:?}: the waypoint's view");
    let counters = &agent.debug_snapshot().expect("debug snapshot")["counters"];
    assert_eq!(
        counters["waypoint_origin_failed"].as_u64(),
        Some(0),
        "{counters}"
    );
    assert_eq!(
        counters["rewritten"].as_u64(),
        Some(u64::from(2 * bound + UNBOUND)),
        "{counters}"
    );
    agent.terminate().expect("agent stops");
}

#[test]
fn every_connection_carries_its_own_origin_ipv4() {
    origins_reach_the_waypoint("wpo4", Family::V4, 210);
}

#[test]
fn every_connection_carries_its_own_origin_ipv6() {
    origins_reach_the_waypoint("wpo6", Family::V6, 211);
}
