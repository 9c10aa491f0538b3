//! Connection events benchmark, on the real kernel (root): what the `sock_ops` program and its
//! ring buffer add to each connection. Prints, in one run, connect()+close() latency and
//! connections per second through a service VIP
//!
//! - with connect4/6 only (the links of a second cgroup, made here from the pinned programs),
//! - with connect4/6 and `sock_ops` (the cgroup the programs were installed on: every connection
//!   writes its close event, which a reader thread drains as the agent's does),
//!
//! against the same loop straight to the pod IP in a cgroup without programs (the baseline), and
//! the ratios. The client closes with a RST (`kmesh-probe --connect-only`), so its close event is
//! written inside close(), within the measured time.
//!
//! `cargo bench -p kmesh-agent --bench events` for the full run, `-- --smoke` for the short run CI
//! does. Rounds rotate the variants' order so that machine noise hits all; medians are reported.
use std::{
    net::{IpAddr, Ipv4Addr},
    os::fd::{AsFd as _, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use kmesh_agent::{
    events::{DroppedCounter, EventReader},
    layout::Hook,
    loader::{self, Installation},
    maps::{EnrolledMap, GenerationMaps},
    sys,
};
use kmesh_common::{EnrolledNetns, ip16, lb_policy, mode};
use kmesh_snapshot::builder::{Endpoint, SnapshotBuilder};
use kmesh_tests::{AgentDir, Pod, TestCgroup, TestNetwork};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const POD_PORT: u16 = 8080;

struct Plan {
    rounds: usize,
    connections: u32,
}

fn main() {
    let smoke = std::env::args().any(|a| a == "--smoke");
    let plan = if smoke {
        Plan {
            rounds: 3,
            connections: 2_000,
        }
    } else {
        Plan {
            rounds: 7,
            connections: 20_000,
        }
    };
    println!(
        "kmesh-rs connection events benchmark ({}): {} rounds x {} connections per variant",
        if smoke { "smoke run" } else { "full run" },
        plan.rounds,
        plan.connections
    );

    let net = TestNetwork::new("evbench").expect("test network");
    let client = net
        .add_pod("client", Ipv4Addr::new(10, 244, 3, 10), None)
        .expect("client pod");
    let server = net
        .add_pod("server", Ipv4Addr::new(10, 244, 4, 1), None)
        .expect("server pod");
    let _listener = server.serve_tcp(POD_PORT).expect("server");
    let plain = TestCgroup::new("evbenchplain").expect("cgroup without programs");
    let events = TestCgroup::new("evbenchevents").expect("cgroup with all programs");
    let connect_only = TestCgroup::new("evbenchconnect").expect("cgroup with connect4/6");
    let dir = AgentDir::new("evbench").expect("pin directory");

    let installation =
        loader::install_or_adopt(dir.path(), events.path(), loader::BpfObject::Shipped)
            .expect("install programs");
    let _links = attach_connect_only(&installation, &connect_only);
    apply_service(&installation, &client, &server);

    let stop = Arc::new(AtomicBool::new(false));
    let reader = EventReader::open(&installation).expect("events ring");
    let stats = reader.stats();
    let thread = reader
        .spawn(kmesh_agent::events::Discard, stop.clone())
        .expect("reader thread");

    let costs = connect_cost(&plan, &client, &server, &plain, &connect_only, &events);
    stop.store(true, Ordering::Relaxed);
    thread.join().expect("reader thread");
    let dropped = DroppedCounter::open(&installation)
        .expect("drop counters")
        .read()
        .expect("read drop counters");
    print_costs(&plan, costs);
    println!(
        "  events read: {}, dropped (ring full): {}, dropped (no socket storage): {}",
        stats.counts().total(),
        dropped.ring_full,
        dropped.no_storage
    );
}

/// Links connect4/6 (not sock_ops) of `installation` to `cgroup`; they detach when dropped.
fn attach_connect_only(installation: &Installation, cgroup: &TestCgroup) -> Vec<OwnedFd> {
    let cgroup_dir = std::fs::File::open(cgroup.path()).expect("open cgroup");
    [Hook::Connect4, Hook::Connect6]
        .into_iter()
        .map(|hook| {
            let program = sys::obj_get(&installation.layout_dir.join(hook.program_pin()))
                .expect("pinned program");
            sys::link_create(program.as_fd(), cgroup_dir.as_fd(), hook.cgroup_hook()).expect("link")
        })
        .collect()
}

/// One service, VIP:80 → the server pod; the client enrolled.
fn apply_service(installation: &Installation, client: &Pod, server: &Pod) {
    let mut maps = GenerationMaps::open(installation).expect("generation maps");
    let mut enrolled = EnrolledMap::open(installation).expect("enrolled map");
    let mut b = SnapshotBuilder::new("bench-node", 1, mode::KERNEL_NATIVE);
    let set = b.backend_set(
        lb_policy::RANDOM,
        &[Endpoint::new(IpAddr::V4(server.ipv4()), POD_PORT, 1)],
    );
    b.service(VIP.into(), 80, &[(1, set)]);
    maps.apply(&b.build(), 1, None).expect("apply");
    enrolled
        .insert(
            client.netns_cookie().expect("client cookie"),
            EnrolledNetns {
                workload_ip: ip16(IpAddr::V4(client.ipv4())),
                identity: 1,
                pad: 0,
            },
        )
        .expect("enrol client");
}

/// Microseconds per connect()+close() of one probe run.
fn per_connection_us(client: &Pod, cgroup: &TestCgroup, target: &str, n: u32) -> f64 {
    let report = client
        .run_probe(
            cgroup,
            &[
                "--target",
                target,
                "--count",
                &n.to_string(),
                "--connect-only",
            ],
        )
        .expect("probe");
    assert_eq!(
        report.ok,
        u64::from(n),
        "benchmark connections failed: {report:?}"
    );
    report.elapsed_us as f64 / f64::from(n)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Every round's microseconds per connection: baseline, connect4/6 only, connect4/6 + sock_ops.
struct Costs {
    baseline: Vec<f64>,
    connect_only: Vec<f64>,
    events: Vec<f64>,
}

fn connect_cost(
    plan: &Plan,
    client: &Pod,
    server: &Pod,
    plain: &TestCgroup,
    connect_only: &TestCgroup,
    events: &TestCgroup,
) -> Costs {
    let pod = format!("{}:{POD_PORT}", server.ipv4());
    let vip = format!("{VIP}:80");
    // Warm up caches, ARP and the programs' map lookups.
    per_connection_us(client, plain, &pod, plan.connections / 10);
    per_connection_us(client, connect_only, &vip, plan.connections / 10);
    per_connection_us(client, events, &vip, plan.connections / 10);
    let (mut baseline, mut without, mut with) = (vec![], vec![], vec![]);
    for round in 0..plan.rounds {
        for variant in 0..3 {
            match (round + variant) % 3 {
                0 => baseline.push(per_connection_us(client, plain, &pod, plan.connections)),
                1 => without.push(per_connection_us(
                    client,
                    connect_only,
                    &vip,
                    plan.connections,
                )),
                _ => with.push(per_connection_us(client, events, &vip, plan.connections)),
            }
        }
    }
    Costs {
        baseline,
        connect_only: without,
        events: with,
    }
}

fn print_costs(plan: &Plan, c: Costs) {
    println!();
    println!(
        "connect()+close() (RST), median of {} rounds of {} connections (min..max of the rounds):",
        plan.rounds, plan.connections
    );
    let baseline = median(c.baseline.clone());
    let line = |name: &str, rounds: &[f64]| {
        let us = median(rounds.to_vec());
        let (min, max) = rounds
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
        println!(
            "  {name:<44} {us:>8.2} us ({min:.1}..{max:.1}) {:>8.0} conn/s   ratio to baseline {:.3}",
            1e6 / us,
            us / baseline
        );
        us
    };
    line("baseline: pod IP, no programs", &c.baseline);
    let without = line("service VIP, connect4/6 only", &c.connect_only);
    let with = line("service VIP, connect4/6 + sock_ops events", &c.events);
    println!(
        "  events cost: {:+.2} us per connection, ratio with/without events {:.3}",
        with - without,
        with / without
    );
}
