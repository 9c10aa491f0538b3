//! Writes the builder-made seeds of the `snapshot_decode` fuzz target into a directory: snapshots
//! with authorization tables (every verdict reason, both policy kinds, both address families,
//! wildcard and exact verdict keys, blocks of several lengths, the longest policy name), which the
//! compiler's output for the fixtures does not have yet; and one with names sections. `scripts/fuzz.sh --seed` runs it; each seed
//! is under the target's 8 KB input limit.
//!
//! `cargo run -p kmesh-snapshot --example fuzz_seeds -- DIR`

use std::net::IpAddr;
use std::path::Path;

use kmesh_common::authz::{
    ANY_CLASS, ANY_PORT, authz_action::*, authz_policy_kind::*, authz_reason::*,
};
use kmesh_common::{lb_policy, mode};
use kmesh_snapshot::builder::{Endpoint, SnapshotBuilder};
use kmesh_snapshot::{Format, ServiceName, Snapshot, WorkloadName};

fn ip(s: &str) -> IpAddr {
    s.parse().expect("seed address")
}

/// Services and workloads as in the codec's tests, with a workload bound by an ALLOW policy and a
/// STRICT port, one by a DENY policy and an uncompilable one.
fn services_and_authz() -> Snapshot {
    let mut b = SnapshotBuilder::new("node-1", 3, mode::KERNEL_NATIVE);
    let set = b.backend_set(
        lb_policy::RANDOM,
        &[Endpoint::new(ip("10.244.1.20"), 8080, 1)],
    );
    b.service(ip("10.96.0.10"), 80, &[(1, set)]);
    b.workload(ip("10.244.1.20"), 1);
    b.workload(ip("10.244.1.21"), 2);
    b.authz_policy(5, AUTHORIZATION_POLICY, "default/allow-frontend");
    b.authz_policy(7, PEER_AUTHENTICATION, "istio-system/default");
    b.authz_policy(9, AUTHORIZATION_POLICY, "default/deny-legacy");
    b.authz_policy(11, AUTHORIZATION_POLICY, "legacy/broken");
    b.authz_workload(ip("10.244.1.20"), 1);
    b.authz_workload(ip("10.244.1.21"), 2);
    b.authz_source(ip("10.244.1.20"), 32, 1);
    b.authz_source(ip("10.244.1.21"), 32, 1);
    b.authz_source(ip("10.0.0.0"), 8, 2);
    b.authz_source(ip("fd00:10:244::7"), 128, 3);
    b.authz_verdict(1, ANY_CLASS, ANY_PORT, DENY, NO_ALLOW_MATCHED, 0);
    b.authz_verdict(1, 1, ANY_PORT, ALLOW, ALLOW_MATCHED, 5);
    b.authz_verdict(1, ANY_CLASS, 8080, DENY, STRICT_MTLS, 7);
    b.authz_verdict(1, 1, 8080, ALLOW, ALLOW_MATCHED, 5);
    b.authz_verdict(1, 3, 9090, DENY, DENY_MATCHED, 9);
    b.authz_verdict(2, ANY_CLASS, ANY_PORT, ALLOW, NO_ALLOW_POLICY, 0);
    b.authz_verdict(2, 2, ANY_PORT, DENY, UNCOMPILABLE, 11);
    b.build()
}

/// Authorization only, IPv6: nested blocks, a host route, several sets sharing classes.
fn ipv6_authz() -> Snapshot {
    let mut b = SnapshotBuilder::new("node-2.example", 9, mode::DUAL_ENGINE);
    b.workload(ip("fd00:10:244::1"), 1);
    b.authz_policy(1, PEER_AUTHENTICATION, "shop/strict");
    b.authz_policy(2, AUTHORIZATION_POLICY, "shop/allow-web");
    for (i, workload) in ["fd00:10:244::1", "fd00:10:244::2", "fd00:10:244::3"]
        .into_iter()
        .enumerate()
    {
        b.authz_workload(ip(workload), 1 + (i as u32 % 2));
    }
    b.authz_source(ip("fd00::"), 8, 4);
    b.authz_source(ip("fd00:10::"), 32, 5);
    b.authz_source(ip("fd00:10:244::9"), 128, 6);
    b.authz_source(ip("0.0.0.0"), 0, 7);
    for set in [1, 2] {
        b.authz_verdict(set, ANY_CLASS, ANY_PORT, DENY, NO_ALLOW_MATCHED, 0);
        b.authz_verdict(set, ANY_CLASS, 443, DENY, STRICT_MTLS, 1);
        for class in [4, 5, 6] {
            b.authz_verdict(set, class, 443, ALLOW, ALLOW_MATCHED, 2);
        }
    }
    b.build()
}

/// The longest policy names the format holds, and a single-workload, single-verdict table.
fn long_names() -> Snapshot {
    let mut b = SnapshotBuilder::new("n", 1, mode::KERNEL_NATIVE);
    let namespace = "n".repeat(63);
    let name = [
        "o".repeat(61),
        "p".repeat(63),
        "q".repeat(63),
        "r".repeat(63),
    ]
    .join(".");
    b.authz_policy(
        u32::MAX,
        AUTHORIZATION_POLICY,
        &format!("{namespace}/{name}"),
    );
    b.authz_policy(1, AUTHORIZATION_POLICY, "a/b");
    b.authz_workload(ip("10.0.0.1"), 7);
    b.authz_verdict(7, ANY_CLASS, ANY_PORT, DENY, UNCOMPILABLE, u32::MAX);
    b.build()
}

/// The names sections: pods of both families, one without version, a service named by a Service
/// (bound to a waypoint) and one by a ServiceEntry host, strings of 1 and of 253 bytes, multi-byte
/// UTF-8.
fn names() -> Snapshot {
    let mut b = SnapshotBuilder::new("node-3", 4, mode::KERNEL_NATIVE);
    let set = b.backend_set(
        lb_policy::RANDOM,
        &[Endpoint::new(ip("10.244.1.20"), 9080, 1)],
    );
    let route = b.route(&[(1, set)]);
    let reviews = b.waypoint_service(ip("10.96.0.13"), 9080, route);
    let external = b.service_with_route(ip("240.240.0.1"), 443, route);
    b.workload(ip("10.244.1.20"), 1);
    let long = "w".repeat(253);
    let pod = WorkloadName {
        workload: "reviews-v1",
        namespace: "bookinfo",
        service_account: "bookinfo-reviews",
        app: "reviews",
        version: "v1",
    };
    b.workload_names(ip("10.244.1.20"), &pod);
    b.workload_names(
        ip("fd00:10:244::20"),
        &WorkloadName {
            version: "",
            app: "é",
            ..pod
        },
    );
    b.workload_names(
        ip("10.244.9.9"),
        &WorkloadName {
            workload: &long,
            namespace: "x",
            ..pod
        },
    );
    let service = ServiceName {
        host: "reviews.bookinfo.svc.cluster.local",
        name: "reviews",
        namespace: "bookinfo",
    };
    b.service_names(reviews, &service);
    let host = ServiceName {
        host: "api.example.com",
        name: "",
        namespace: "",
    };
    b.service_names(external, &host);
    b.build()
}

fn main() {
    let dir = std::env::args().nth(1).expect("usage: fuzz_seeds DIR");
    let seeds = [
        ("names", names()),
        ("authz-services", services_and_authz()),
        ("authz-ipv6", ipv6_authz()),
        ("authz-long-names", long_names()),
    ];
    // Each in both formats the decoder reads.
    for (name, snapshot) in seeds {
        for (format, suffix) in [(Format::V3, ""), (Format::V2, "-v2")] {
            let bytes = snapshot
                .encode_as(format)
                .unwrap_or_else(|e| panic!("seed {name} is invalid: {e}"));
            assert!(bytes.len() <= 8192, "seed {name} is {} bytes", bytes.len());
            let path = Path::new(&dir).join(format!("{name}{suffix}.bin"));
            std::fs::write(&path, bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        }
    }
}
