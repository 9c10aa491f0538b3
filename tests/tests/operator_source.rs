//! The agent's operator source, end to end: the real agent long-polls a loopback server that speaks
//! the snapshot contract (`kmesh_tests::SnapshotServer`), with ETags, 304s, a bearer token and
//! failures it must ride out, and the kernel steers traffic by what it fetched, in every snapshot
//! format (an operator from before format 3 sends format 2, one from before format 4 format 3),
//! and from deltas (and a corrupt one refused).
use std::{
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use kmesh_common::{lb_policy, mode};
use kmesh_snapshot::Format;
use kmesh_snapshot::builder::{Endpoint, SnapshotBuilder};
use kmesh_tests::{
    Agent, AgentDir, AgentOptions, AgentSource, SnapshotServer, TestCgroup, TestNetwork,
};

const NODE: &str = "node-op";
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const PORT: u16 = 8080;

#[test]
fn agent_follows_the_operator_with_etags_long_polls_and_retries() {
    let net = TestNetwork::new("opsrc").expect("network");
    let cgroup = TestCgroup::new("opsrc").expect("cgroup");
    let dir = AgentDir::new("opsrc").expect("pins");
    let client = net
        .add_pod("client", Ipv4Addr::new(10, 244, 200, 10), None)
        .expect("client");
    let a = net
        .add_pod("a", Ipv4Addr::new(10, 244, 200, 101), None)
        .expect("a");
    let b = net
        .add_pod("b", Ipv4Addr::new(10, 244, 200, 102), None)
        .expect("b");
    let _servers = (a.serve_tcp(PORT).unwrap(), b.serve_tcp(PORT).unwrap());
    // In `format`: an operator from before format 3 sends format 2 whatever the agent asks, one
    // from before format 4 sends format 3.
    let snapshot_of = |generation: u64, pod: &kmesh_tests::Pod| {
        let mut s = SnapshotBuilder::new(NODE, generation, mode::KERNEL_NATIVE);
        s.workload(IpAddr::V4(client.ipv4()), 1);
        let set = s.backend_set(
            lb_policy::RANDOM,
            &[Endpoint::new(IpAddr::V4(pod.ipv4()), PORT, 1)],
        );
        s.service(VIP.into(), 80, &[(1, set)]);
        s.build()
    };
    let snapshot_in = |format: Format, generation: u64, pod: &kmesh_tests::Pod| {
        snapshot_of(generation, pod).encode_as(format).unwrap()
    };
    let snapshot_to =
        |generation: u64, pod: &kmesh_tests::Pod| snapshot_in(Format::V4, generation, pod);
    let token =
        TokenFile(std::env::temp_dir().join(format!("kmt-opsrc-{}.token", std::process::id())));
    let token_file = token.0.as_path();
    std::fs::write(token_file, "agent-token\n").unwrap();

    let server = SnapshotServer::start(Duration::from_millis(500)).expect("snapshot server");
    server.require_token("agent-token");
    server.publish(NODE, "g1", snapshot_to(1, &a));
    let mut agent = Agent::start(&AgentOptions {
        node_name: NODE,
        source: AgentSource::Operator {
            url: server.url(),
            token_file: Some(token_file),
            ca_file: None,
        },
        dir: &dir,
        cgroup: &cgroup,
        extra_args: vec![],
    })
    .expect("agent");
    agent.wait_ready(Duration::from_secs(20)).expect("ready");
    agent
        .wait_for(Duration::from_secs(5), "enrolled", |a| {
            Ok(a.debug_snapshot()?["enrolled_netns"].as_u64() == Some(1))
        })
        .unwrap();
    let probe = |n: u32| {
        client
            .run_probe(
                &cgroup,
                &["--target", &format!("{VIP}:80"), "--count", &n.to_string()],
            )
            .unwrap()
    };
    assert_eq!(probe(10).replies("a"), 10);

    // The first request carried no ETag and the token; later ones present the ETag and get 304s
    // while nothing changes (held by the server: a long poll, not a busy loop).
    std::thread::sleep(Duration::from_millis(1500));
    let seen = server.seen();
    assert_eq!(seen[0].if_none_match, None, "{seen:?}");
    assert_eq!(seen[0].authorization.as_deref(), Some("Bearer agent-token"));
    assert!(
        seen[0].query.split('&').any(|kv| kv == "format=4"),
        "the agent names the newest format it reads: {seen:?}"
    );
    assert!(
        seen.iter()
            .any(|r| r.status == 304 && r.if_none_match.as_deref() == Some("\"g1\"")),
        "{seen:?}"
    );
    assert!(
        seen.len() < 10,
        "the agent polls too often: {} requests in ~2 s",
        seen.len()
    );
    assert_eq!(agent.debug_snapshot().unwrap()["applied"], 1);

    // A new snapshot wakes the held request: applied well within a second. It comes in format
    // 2, as from an operator that predates format 3: the agent reads it too.
    let published = Instant::now();
    server.publish(NODE, "g2", snapshot_in(Format::V2, 2, &b));
    agent
        .wait_for(Duration::from_secs(5), "generation 2", |a| {
            Ok(a.debug_snapshot()?["live"]["generation"] == 2)
        })
        .unwrap();
    println!(
        "generation 2 live {:?} after publishing",
        published.elapsed()
    );
    assert!(published.elapsed() < Duration::from_secs(2));
    assert_eq!(probe(10).replies("b"), 10);

    // The server fails for a while: the agent keeps generation 2 and retries with backoff; once the
    // server is back it fetches generation 3.
    server.fail_next(3);
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.seen().iter().filter(|r| r.status == 503).count() < 3 {
        assert!(
            Instant::now() < deadline,
            "the agent stopped retrying: {:?}",
            server.seen()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        agent.log().contains("fetching snapshot failed"),
        "{}",
        agent.log()
    );
    assert_eq!(agent.debug_snapshot().unwrap()["live"]["generation"], 2);
    assert_eq!(
        probe(10).replies("b"),
        10,
        "an outage of the server changed routing"
    );
    // Generation 3 comes in format 3, as from an operator that predates format 4.
    server.publish(NODE, "g3", snapshot_in(Format::V3, 3, &a));
    agent
        .wait_for(
            Duration::from_secs(20),
            "generation 3 after failures",
            |a| Ok(a.debug_snapshot()?["live"]["generation"] == 3),
        )
        .unwrap();
    assert_eq!(probe(10).replies("a"), 10);

    // A wrong token is refused by the server; the agent keeps what it has.
    server.require_token("rotated-token");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !server.seen().iter().any(|r| r.status == 401) {
        assert!(
            Instant::now() < deadline,
            "no request after the token change: {:?}",
            server.seen()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    server.publish(NODE, "g4", snapshot_to(4, &b));
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(agent.debug_snapshot().unwrap()["live"]["generation"], 3);
    // The token file is re-read per request: rotating it lets the agent through.
    std::fs::write(token_file, "rotated-token\n").unwrap();
    agent
        .wait_for(
            Duration::from_secs(40),
            "generation 4 after token rotation",
            |a| Ok(a.debug_snapshot()?["live"]["generation"] == 4),
        )
        .unwrap();
    assert_eq!(probe(10).replies("b"), 10);

    // Generation 5 comes as a delta from generation 4, which the agent holds and names in
    // `since` (the format 4 cluster hash); applied, it steers to a again.
    let cluster_hash = |s: &kmesh_snapshot::Snapshot| {
        kmesh_snapshot::ClusterTables::from(s)
            .encode()
            .unwrap()
            .cluster_hash(Format::V4)
    };
    let (g4, g5) = (snapshot_of(4, &b), snapshot_of(5, &a));
    let delta = kmesh_snapshot::delta_format::delta_between(&g4, &g5).unwrap();
    let full = g5.encode().unwrap();
    assert!(delta.len() < full.len());
    let since = format!("since={:016x}", cluster_hash(&g4));
    server.publish_with_delta(NODE, "g5", full, cluster_hash(&g4), delta);
    agent
        .wait_for(Duration::from_secs(10), "generation 5 from a delta", |a| {
            Ok(a.debug_snapshot()?["live"]["generation"] == 5)
        })
        .unwrap();
    assert!(
        server
            .seen()
            .iter()
            .any(|r| r.delta && r.status == 200 && r.query.split('&').any(|kv| kv == since)),
        "the agent took generation 5 as a delta from generation 4: {:?}",
        server.seen()
    );
    assert_eq!(probe(10).replies("a"), 10);

    // Generation 6's delta is corrupt (a changed endpoint port: its framing is right, its hash
    // is not): the agent refuses it, keeps generation 5, and asks for the whole snapshot, with
    // neither `since` nor an ETag, which it applies.
    let g6 = snapshot_of(6, &b);
    let mut corrupt = kmesh_snapshot::delta_format::delta_between(&g5, &g6).unwrap();
    let port = PORT.to_le_bytes();
    let at = corrupt
        .windows(2)
        .rposition(|w| w == port)
        .expect("the upserted endpoint's port");
    corrupt[at] ^= 1;
    let before = server.seen().len();
    server.publish_with_delta(NODE, "g6", g6.encode().unwrap(), cluster_hash(&g5), corrupt);
    agent
        .wait_for(
            Duration::from_secs(10),
            "generation 6 after a refused delta",
            |a| Ok(a.debug_snapshot()?["live"]["generation"] == 6),
        )
        .unwrap();
    let debug = agent.debug_snapshot().unwrap();
    assert_eq!(debug["refused_by_kind"]["delta"], 1, "{debug}");
    let seen = server.seen()[before..].to_vec();
    let refused_at = seen
        .iter()
        .position(|r| r.delta)
        .expect("the corrupt delta was served");
    assert!(
        seen[refused_at + 1..].iter().any(|r| r.status == 200
            && !r.delta
            && r.if_none_match.is_none()
            && !r.query.contains("since=")),
        "after the refusal the agent asks for the whole snapshot: {seen:?}"
    );
    assert_eq!(probe(10).replies("b"), 10);
}

/// The agent's token file, removed even when the test fails.
struct TokenFile(std::path::PathBuf);

impl Drop for TokenFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
