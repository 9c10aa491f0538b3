use std::net::IpAddr;

use kmesh_common::authz::{ANY_CLASS, ANY_PORT, authz_action, authz_policy_kind, authz_reason};
use kmesh_common::{ip16, lb_policy, mode, source_hash};

use super::*;
use crate::builder::{Endpoint, SnapshotBuilder};
use crate::view::NoNames;

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

const CLIENT: &str = "10.244.1.20";
const VIP: &str = "10.96.0.10";

/// Node 1: the client, a 80/20 route over a random set of two endpoints (one on node 2) and a
/// source-hash set of three; a VIP without endpoints. Node 2: the endpoint 10.244.2.11, bound by a
/// policy that denies the client's class on port 9080 and allows everything else.
fn nodes() -> (Snapshot, Snapshot) {
    let mut b = SnapshotBuilder::new("node-1", 4, mode::KERNEL_NATIVE);
    let random = b.backend_set(
        lb_policy::RANDOM,
        &[
            Endpoint::new(ip("10.244.1.11"), 9080, 1),
            Endpoint::new(ip("10.244.2.11"), 9080, 1),
        ],
    );
    let hashed = b.backend_set(
        lb_policy::SOURCE_IP_HASH,
        &[
            Endpoint::new(ip("10.244.1.31"), 9080, 1),
            Endpoint::new(ip("10.244.1.32"), 9080, 1),
            Endpoint::new(ip("10.244.1.33"), 9080, 1),
        ],
    );
    let empty = b.backend_set(lb_policy::RANDOM, &[]);
    b.service(ip(VIP), 80, &[(80, random), (20, hashed)]);
    b.service(ip("10.96.0.99"), 80, &[(1, empty)]);
    b.workload(ip(CLIENT), 7);
    b.workload(ip("10.244.1.11"), 1);
    b.authz_source(ip(CLIENT), 32, 5);
    let node1 = b.build();

    let mut b = SnapshotBuilder::new("node-2", 9, mode::KERNEL_NATIVE);
    b.workload(ip("10.244.2.11"), 1);
    b.authz_policy(
        3,
        authz_policy_kind::AUTHORIZATION_POLICY,
        "default/deny-client",
    );
    b.authz_workload(ip("10.244.2.11"), 1);
    b.authz_source(ip(CLIENT), 32, 5);
    b.authz_verdict(
        1,
        ANY_CLASS,
        ANY_PORT,
        authz_action::ALLOW,
        authz_reason::NO_ALLOW_POLICY,
        0,
    );
    b.authz_verdict(
        1,
        5,
        9080,
        authz_action::DENY,
        authz_reason::DENY_MATCHED,
        3,
    );
    (node1, b.build())
}

fn run(to: &str, source: &Snapshot, destinations: &[&Snapshot], every_node: bool) -> Explanation {
    let query = Query {
        from: ip(CLIENT),
        to: to.parse().unwrap(),
    };
    let snapshots = Snapshots {
        source,
        destinations,
        every_node,
    };
    explain(query, &snapshots, &NoNames)
}

#[test]
fn a_weighted_route_gives_each_destination_and_endpoint_its_share() {
    let (n1, n2) = nodes();
    let e = run("10.96.0.10:80", &n1, &[&n1, &n2], true);
    assert_eq!(e.steering, Steering::Service);
    assert_eq!(e.service.as_ref().unwrap().service_id, 1);
    let shares: Vec<(u32, f64)> = e
        .destinations
        .iter()
        .map(|d| (d.weight, d.percent))
        .collect();
    assert_eq!(shares, [(80, 80.0), (20, 20.0)]);
    let random = &e.destinations[0];
    assert_eq!(random.lb_policy, LbPolicy::Random);
    assert_eq!(random.source_hash_index, None);
    let per_endpoint: Vec<f64> = random.endpoints.iter().map(|ep| ep.percent).collect();
    assert_eq!(per_endpoint, [40.0, 40.0]);
    assert!(e.direct.is_none());
}

#[test]
fn a_source_hash_set_names_the_one_endpoint_this_client_gets() {
    let (n1, n2) = nodes();
    let e = run("10.96.0.10:80", &n1, &[&n1, &n2], true);
    let hashed = &e.destinations[1];
    let expected = source_hash(&ip16(ip(CLIENT))) % 3;
    assert_eq!(hashed.source_hash_index, Some(expected));
    for ep in &hashed.endpoints {
        let share = if ep.index == expected { 20.0 } else { 0.0 };
        assert_eq!(ep.percent, share, "endpoint {}", ep.index);
    }
}

#[test]
fn the_verdict_is_the_destination_nodes() {
    let (n1, n2) = nodes();
    let e = run("10.96.0.10:80", &n1, &[&n1, &n2], true);
    let [local, remote] = [
        &e.destinations[0].endpoints[0],
        &e.destinations[0].endpoints[1],
    ];
    assert_eq!(
        local.verdict,
        Judgement::NotBound {
            node: "node-1".into()
        }
    );
    assert_eq!(
        remote.verdict,
        Judgement::Decided {
            node: "node-2".into(),
            action: Action::Deny,
            reason: Reason::DenyMatched,
            policy_id: 3,
            policy: Some("default/deny-client".into()),
            source_class: 5,
        }
    );
    // Another port of the same pod falls to the set's default.
    let other_port = run("10.244.2.11:22", &n1, &[&n1, &n2], true);
    assert_eq!(other_port.steering, Steering::NoService);
    assert!(matches!(
        other_port.direct,
        Some(Judgement::Decided {
            action: Action::Allow,
            reason: Reason::NoAllowPolicy,
            ..
        })
    ));
}

#[test]
fn without_the_destination_nodes_snapshot_the_verdict_is_left_to_it() {
    let (n1, _) = nodes();
    let e = run("10.96.0.10:80", &n1, &[&n1], false);
    assert_eq!(
        e.destinations[0].endpoints[1].verdict,
        Judgement::DecidedOnItsNode
    );
    assert_eq!(e.destinations[0].endpoints[1].verdict.allowed(), None);
    let outside = run("192.0.2.1:443", &n1, &[&n1], true);
    assert_eq!(outside.direct, Some(Judgement::NotInMesh));
}

#[test]
fn what_the_program_does_not_steer_is_said_with_the_verdict() {
    let (n1, n2) = nodes();
    let mut disabled = n1.clone();
    disabled.config.mode = mode::DISABLED;
    let e = run("10.96.0.10:80", &disabled, &[&disabled, &n2], true);
    assert_eq!(e.steering, Steering::ModeDisabled);
    assert!(e.destinations.is_empty());
    assert_eq!(
        e.direct,
        Some(Judgement::NotInMesh),
        "the VIP itself is no workload"
    );

    let stranger = Query {
        from: ip("10.244.9.9"),
        to: "10.244.2.11:9080".parse().unwrap(),
    };
    let snapshots = Snapshots {
        source: &n1,
        destinations: &[&n1, &n2],
        every_node: true,
    };
    let e = explain(stranger, &snapshots, &NoNames);
    assert_eq!(e.steering, Steering::SourceNotEnrolled);
    assert!(!e.source.enrolled);
    assert_eq!(e.direct.as_ref().and_then(Judgement::allowed), Some(true));
}

#[test]
fn a_service_without_endpoints_is_refused() {
    let (n1, n2) = nodes();
    let e = run("10.96.0.99:80", &n1, &[&n1, &n2], true);
    assert_eq!(e.steering, Steering::ServiceWithoutEndpoints);
    assert!(text(&e).contains("connect() is refused"), "{}", text(&e));
}

#[test]
fn the_text_shows_shares_endpoints_and_verdicts() {
    let (n1, n2) = nodes();
    let e = run("10.96.0.10:80", &n1, &[&n1, &n2], true);
    let text = text(&e);
    for expected in [
        "from 10.244.1.20 on node node-1, generation 4, mode KernelNative",
        "to 10.96.0.10:80: service #1, route #1",
        " 80.0%  backend set #1, Random, 2 endpoint(s)",
        " 40.0%  10.244.2.11:9080  -  deny (DenyMatched by default/deny-client; decided on node node-2)",
        "this client always gets endpoint",
    ] {
        assert!(
            text.contains(expected),
            "{expected:?} missing from:\n{text}"
        );
    }
}

#[test]
fn the_json_names_the_steering_and_verdicts() {
    let (n1, n2) = nodes();
    let json = serde_json::to_value(run("10.96.0.10:80", &n1, &[&n1, &n2], true)).unwrap();
    assert_eq!(json["steering"], "service");
    assert_eq!(
        json["destinations"][0]["endpoints"][1]["verdict"]["verdict"],
        "decided"
    );
    assert_eq!(
        json["destinations"][0]["endpoints"][1]["verdict"]["action"],
        "deny"
    );
    assert_eq!(json["destinations"][1]["lb_policy"], "source_ip_hash");
}
