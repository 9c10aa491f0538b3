//! Tests of the real-kernel harness itself: namespaces, bridge, cgroups, the probe,
//! and cleanup. Run as root: `cargo test -p kmesh-tests`.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kmesh_tests::{
    StopFile, TestCgroup, TestNetwork, cgroup2_root, netns_path, require_root, sweep_leftovers,
    workspace_bin,
};

const A_V4: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
const B_V4: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const A_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 1, 1);
const B_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 1, 2);

fn netns_listed(name: &str) -> bool {
    let out = kmesh_tests::ip(&["netns", "list"]).expect("ip netns list");
    out.lines()
        .any(|l| l.split_whitespace().next() == Some(name))
        || netns_path(name).exists()
}

#[test]
fn two_pods_v4_connect() {
    require_root();
    let net = TestNetwork::new("v4pods").unwrap();
    let a = net.add_pod("a", A_V4, None).unwrap();
    let b = net.add_pod("b", B_V4, None).unwrap();
    let server = b.serve_tcp(8080).unwrap();
    let cg = TestCgroup::new("v4pods").unwrap();

    let target = format!("{B_V4}:8080");
    let r = a
        .run_probe(&cg, &["--target", &target, "--count", "20"])
        .unwrap();
    assert_eq!((r.attempts, r.ok, r.failed), (20, 20, 0), "{r:?}");
    assert_eq!(r.by_reply.len(), 1, "{r:?}");
    assert_eq!(r.replies("b"), 20, "{r:?}");
    assert!(r.errors.is_empty(), "{r:?}");
    assert_eq!(server.accepted(), 20);

    // Pods have only the on-link route: no default route.
    let routes = a.ip(&["-4", "route", "show"]).unwrap();
    assert!(
        !routes.contains("default"),
        "pod has a default route: {routes}"
    );
    assert!(routes.contains("10.244.0.0/16"), "{routes}");

    // The server stops on drop: later connects are refused.
    drop(server);
    let r = a
        .run_probe(&cg, &["--target", &target, "--count", "2"])
        .unwrap();
    assert_eq!(r.errors_of("ECONNREFUSED"), 2, "{r:?}");
}

/// The bridge keeps its own MAC while pods come and go. A bridge without one takes the lowest MAC
/// of its ports, changing it as pods come and go; pods that learned the old MAC for the bridge's
/// address then send their answers into the void until their neighbour entry expires (the lost
/// SYN-ACKs of the cluster tests after an agent rollout or a deployment).
#[test]
fn the_bridge_mac_survives_pods_coming_and_going() {
    let net = TestNetwork::new("brmac").unwrap();
    let bridge_mac = || {
        let link = net.ip_node(&["-br", "link", "show", "br0"]).unwrap();
        link.split_whitespace()
            .nth(2)
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(bridge_mac(), TestNetwork::BRIDGE_MAC);
    let pods = ["a", "b", "c", "d"];
    for (i, pod) in pods.iter().enumerate() {
        net.add_pod(pod, Ipv4Addr::new(10, 244, 9, 10 + i as u8), None)
            .unwrap();
        assert_eq!(bridge_mac(), TestNetwork::BRIDGE_MAC, "after adding {pod}");
    }
    for pod in pods {
        net.remove_pod(pod).unwrap();
        assert_eq!(
            bridge_mac(),
            TestNetwork::BRIDGE_MAC,
            "after removing {pod}"
        );
    }
}

#[test]
fn unroutable_vip_fails_fast_with_enetunreach() {
    require_root();
    let net = TestNetwork::new("novip").unwrap();
    let a = net.add_pod("a", A_V4, Some(A_V6)).unwrap();
    let cg = TestCgroup::new("novip").unwrap();

    let t0 = Instant::now();
    let r = a
        .run_probe(
            &cg,
            &[
                "--target",
                "10.96.0.10:80",
                "--count",
                "5",
                "--timeout-ms",
                "2000",
            ],
        )
        .unwrap();
    assert_eq!((r.attempts, r.ok, r.failed), (5, 0, 5), "{r:?}");
    assert_eq!(r.errors_of("ENETUNREACH"), 5, "{r:?}");
    // Failing locally is immediate, not a timeout.
    assert!(r.elapsed_ms < 500, "{r:?}");
    assert!(t0.elapsed() < Duration::from_secs(5));

    let r = a
        .run_probe(&cg, &["--target", "[fd00:10:96::a]:80", "--count", "3"])
        .unwrap();
    assert_eq!(r.errors_of("ENETUNREACH"), 3, "{r:?}");

    // The v4-mapped form of the VIP on an AF_INET6 socket also fails locally.
    let r = a
        .run_probe(&cg, &["--target", "10.96.0.10:80", "--socket", "v6"])
        .unwrap();
    assert_eq!(r.errors_of("ENETUNREACH"), 1, "{r:?}");
}

#[test]
fn ipv6_and_v4_mapped_pod_to_pod() {
    require_root();
    let net = TestNetwork::new("v6pods").unwrap();
    let a = net.add_pod("a", A_V4, Some(A_V6)).unwrap();
    let b = net.add_pod("b", B_V4, Some(B_V6)).unwrap();
    let server = b.serve_tcp(8080).unwrap();
    let cg = TestCgroup::new("v6pods").unwrap();

    let r = a
        .run_probe(
            &cg,
            &["--target", &format!("[{B_V6}]:8080"), "--count", "10"],
        )
        .unwrap();
    assert_eq!((r.ok, r.replies("b")), (10, 10), "{r:?}");

    // IPv4-mapped IPv6 on an AF_INET6 socket to b's IPv4.
    let r = a
        .run_probe(
            &cg,
            &[
                "--target",
                &format!("{B_V4}:8080"),
                "--socket",
                "v6",
                "--count",
                "10",
            ],
        )
        .unwrap();
    assert_eq!((r.ok, r.replies("b")), (10, 10), "{r:?}");
    // Explicit v4-mapped target, same thing.
    let r = a
        .run_probe(&cg, &["--target", &format!("[::ffff:{B_V4}]:8080")])
        .unwrap();
    assert_eq!(r.replies("b"), 1, "{r:?}");
    assert_eq!(server.accepted(), 21);

    let routes = a.ip(&["-6", "route", "show"]).unwrap();
    assert!(
        !routes.contains("default"),
        "pod has a default v6 route: {routes}"
    );
}

#[test]
fn netns_cookies_differ() {
    require_root();
    let net = TestNetwork::new("cookies").unwrap();
    let a = net.add_pod("a", A_V4, None).unwrap();
    let b = net.add_pod("b", B_V4, None).unwrap();
    let (ca, cb) = (a.netns_cookie().unwrap(), b.netns_cookie().unwrap());
    assert_ne!(ca, 0);
    assert_ne!(cb, 0);
    assert_ne!(ca, cb);
    assert_eq!(a.netns_cookie().unwrap(), ca, "cookie is stable");
}

#[test]
fn probe_runs_in_cgroup_until_file() {
    require_root();
    let net = TestNetwork::new("untilfile").unwrap();
    let a = net.add_pod("a", A_V4, None).unwrap();
    let b = net.add_pod("b", B_V4, None).unwrap();
    let server = b.serve_tcp(0).unwrap();
    let cg = TestCgroup::new("untilfile").unwrap();
    let stop = StopFile::new("untilfile-stop");
    let ready = StopFile::new("untilfile-ready");

    let target = format!("{B_V4}:{}", server.port());
    let h = a
        .spawn_probe(
            &cg,
            &[
                "--target",
                &target,
                "--until-file",
                stop.arg(),
                "--ready-file",
                ready.arg(),
                "--interval-us",
                "500",
            ],
        )
        .unwrap();
    // The child joined the cgroup before exec.
    let procs = cg.procs().unwrap();
    assert!(
        procs.contains(&(h.pid() as i32)),
        "{procs:?} lacks {}",
        h.pid()
    );
    ready.wait_exists(Duration::from_secs(5)).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    stop.signal().unwrap();
    let r = h.wait_timeout(Duration::from_secs(5)).unwrap();
    assert!(r.ok >= 1, "{r:?}");
    assert_eq!(r.ok, r.attempts, "{r:?}");
    assert_eq!(r.replies("b"), r.ok);
    assert_eq!(server.accepted(), r.ok);

    // --duration-ms
    let r = a
        .run_probe(&cg, &["--target", &target, "--duration-ms", "100"])
        .unwrap();
    assert!(r.ok >= 1 && r.failed == 0, "{r:?}");
    assert!(r.elapsed_ms >= 100, "{r:?}");
}

#[test]
fn cleanup_on_drop_kills_probes() {
    require_root();
    let net = TestNetwork::new("cleanup").unwrap();
    let a = net.add_pod("a", A_V4, None).unwrap();
    let cg = TestCgroup::new("cleanup").unwrap();
    let stop = StopFile::new("cleanup");
    let names = net.netns_names();
    assert_eq!(names.len(), 2);
    for n in &names {
        assert!(netns_listed(n), "{n} missing while alive");
    }
    let cg_path = cg.path().to_path_buf();
    assert!(cg_path.starts_with(cgroup2_root().unwrap()));

    // A probe that would run forever: dropping the cgroup must kill it.
    let h = a
        .spawn_probe(
            &cg,
            &[
                "--target",
                "10.96.0.10:80",
                "--until-file",
                stop.arg(),
                "--interval-us",
                "1000",
            ],
        )
        .unwrap();
    drop(cg);
    assert!(!cg_path.exists(), "{} still exists", cg_path.display());
    let err = h.wait_timeout(Duration::from_secs(5)).unwrap_err();
    assert!(err.to_string().contains("signal: 9"), "{err}");

    drop(a);
    drop(net);
    for n in &names {
        assert!(!netns_listed(n), "{n} still exists after drop");
    }
}

#[test]
fn cleanup_after_panic() {
    require_root();
    let created: Mutex<(Vec<String>, Option<PathBuf>)> = Mutex::new((Vec::new(), None));
    let res = catch_unwind(AssertUnwindSafe(|| {
        let net = TestNetwork::new("panicky").unwrap();
        let a = net.add_pod("a", A_V4, Some(A_V6)).unwrap();
        let _b = net.add_pod("b", B_V4, None).unwrap();
        let _server = a.serve_tcp(80).unwrap();
        let cg = TestCgroup::new("panicky").unwrap();
        let stop = StopFile::new("panicky");
        let _probe = a
            .spawn_probe(
                &cg,
                &[
                    "--target",
                    &format!("{B_V4}:80"),
                    "--until-file",
                    stop.arg(),
                ],
            )
            .unwrap();
        {
            let mut c = created.lock().unwrap();
            c.0 = net.netns_names();
            c.1 = Some(cg.path().to_path_buf());
        }
        panic!("deliberate panic mid-test");
    }));
    assert!(res.is_err());
    let (names, cg_path) = created.into_inner().unwrap();
    assert_eq!(names.len(), 3);
    for n in &names {
        assert!(!netns_listed(n), "{n} survived the panic");
    }
    let cg_path = cg_path.unwrap();
    assert!(
        !cg_path.exists(),
        "{} survived the panic",
        cg_path.display()
    );
}

#[test]
fn sweep_removes_leftovers_of_dead_pids() {
    require_root();
    // A pid that no longer exists: a child that has exited and been reaped.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    child.wait().unwrap();
    let dead = child.id();
    assert!(!PathBuf::from(format!("/proc/{dead}")).exists());

    let ns = format!("kmt-sweep-{dead}-node");
    let cg_path = cgroup2_root().unwrap().join(format!("kmt-sweep-{dead}"));
    kmesh_tests::ip(&["netns", "add", &ns]).unwrap();
    std::fs::create_dir(&cg_path).unwrap();
    std::fs::create_dir(cg_path.join("child")).unwrap();
    // A leftover process in the leftover (nested) cgroup.
    let mut sleeper = std::process::Command::new("sleep")
        .arg("600")
        .spawn()
        .unwrap();
    std::fs::write(cg_path.join("child/cgroup.procs"), sleeper.id().to_string()).unwrap();

    // Something of ours (live pid) must survive the sweep.
    let net = TestNetwork::new("sweepkeep").unwrap();

    let removed = sweep_leftovers();
    assert!(removed.iter().any(|r| r.ends_with(&ns)), "{removed:?}");
    assert!(!netns_path(&ns).exists());
    assert!(!cg_path.exists());
    let status = sleeper.wait().unwrap();
    assert!(!status.success(), "sleeper should have been killed");
    assert!(netns_path(net.node_netns_name()).exists());
}

#[test]
fn names_are_validated_and_unique() {
    require_root();
    assert!(TestNetwork::new("case-1").is_err(), "all-digit part");
    let net = TestNetwork::new("dupname").unwrap();
    let err = TestNetwork::new("dupname").unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists, "{err}");
    net.add_pod("a", A_V4, None).unwrap();
    assert!(net.add_pod("a", B_V4, None).is_err());
    assert!(net.add_pod("node", B_V4, None).is_err());
    let _cg = TestCgroup::new("dupname").unwrap();
    assert!(TestCgroup::new("dupname").is_err());
}

#[test]
fn workspace_bin_finds_probe_and_explains_missing() {
    assert!(workspace_bin("kmesh-probe").unwrap().is_file());
    let err = workspace_bin("kmesh-no-such-bin").unwrap_err().to_string();
    assert!(err.contains("cargo build --workspace --bins"), "{err}");
    assert!(err.contains("KMESH_NO_SUCH_BIN_BIN"), "{err}");
}
