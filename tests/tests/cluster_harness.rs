//! Tests of the cluster harness's own parts that need root but no control plane: the container
//! runtime (`kmesh-container`) gives a process exactly its pod's view and leaves the host alone,
//! and the sweep removes what a killed cluster test left behind.
use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
};

use kmesh_tests::{
    TempPath, TestCgroup, TestNetwork, cgroup2_root,
    cluster::runtime::{ContainerPlan, Mount, MountSource, NodeKind, Propagation, User},
    require_root, sweep_leftovers, workspace_bin,
};

fn bind(host: &Path, target: &str, kind: NodeKind, read_only: bool) -> Mount {
    Mount {
        target: PathBuf::from(target),
        source: MountSource::Bind {
            host: host.to_path_buf(),
            recursive: kind == NodeKind::Directory,
            kind,
        },
        read_only,
        propagation: Propagation::Private,
    }
}

/// Runs `script` with `/bin/sh` in a container of `plan` and returns its output.
fn run(plan: &ContainerPlan, dir: &Path, script: &str) -> String {
    let mut plan = plan.clone();
    plan.argv = vec!["sh".into(), "-c".into(), script.into()];
    let file = dir.join("plan.json");
    std::fs::write(&file, serde_json::to_vec(&plan).unwrap()).unwrap();
    let out = Command::new(workspace_bin("kmesh-container").unwrap())
        .arg(&file)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{}: {text}", out.status);
    text
}

#[test]
fn a_container_sees_its_pod_and_volumes_and_leaves_the_host_alone() {
    require_root();
    let net = TestNetwork::new("rt").unwrap();
    let pod = net
        .add_pod("rtpod", Ipv4Addr::new(10, 244, 163, 2), None)
        .unwrap();
    let cgroup = TestCgroup::new("rt").unwrap();
    let tmp = TempPath::new("rt");
    let dir = tmp.path();
    let volume = dir.join("volume");
    std::fs::create_dir_all(&volume).unwrap();
    std::fs::write(volume.join("token"), "secret-token").unwrap();
    // World-writable, so that only a read-only mount can refuse a write.
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&volume, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::write(dir.join("hosts"), "10.244.163.9\tsome.service\n").unwrap();
    std::fs::create_dir_all(dir.join("scratch")).unwrap();
    // /var/run is a symlink to /run on Debian: the mount point must be made inside the
    // container, never through the symlink on the host.
    let host_view = Path::new("/run/secrets/kmt-rt");
    assert!(
        !host_view.exists(),
        "{} exists before the test",
        host_view.display()
    );

    let plan = ContainerPlan {
        cgroup: cgroup.path().to_path_buf(),
        netns: pod.netns_path(),
        scratch: dir.join("scratch"),
        mounts: vec![
            bind(Path::new("/proc"), "/proc", NodeKind::Directory, false),
            bind(Path::new("/dev"), "/dev", NodeKind::Directory, false),
            Mount {
                target: "/sys".into(),
                source: MountSource::Sysfs,
                read_only: false,
                propagation: Propagation::Private,
            },
            bind(
                &volume,
                "/var/run/secrets/kmt-rt",
                NodeKind::Directory,
                true,
            ),
            bind(&dir.join("hosts"), "/etc/hosts", NodeKind::File, false),
        ],
        read_only_root: true,
        program: "/bin/sh".into(),
        argv: vec![],
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        working_dir: "/".into(),
        user: None,
        no_new_privs: false,
    };
    let out = run(
        &plan,
        dir,
        "cat /var/run/secrets/kmt-rt/token; echo; head -1 /etc/hosts; \
         touch /var/run/secrets/kmt-rt/new 2>&1; touch /new-in-root 2>&1; \
         echo net: $(ls /sys/class/net); cat /proc/self/cgroup; \
         echo mounts: $(awk '{print $2}' /proc/self/mounts | sort | tr '\\n' ' ')",
    );
    assert!(out.contains("secret-token"), "{out}");
    assert!(out.contains("10.244.163.9\tsome.service"), "{out}");
    assert_eq!(
        out.matches("Read-only file system").count(),
        2,
        "the volume and the root are read-only: {out}"
    );
    assert!(
        out.contains("net: eth0 lo"),
        "the pod's network namespace: {out}"
    );
    let cg_name = cgroup.path().file_name().unwrap().to_str().unwrap();
    assert!(out.contains(&format!("0::/{cg_name}")), "{out}");
    let mounts = out.lines().find(|l| l.starts_with("mounts:")).unwrap();
    assert!(
        !mounts.contains("/sys/fs/cgroup") && !mounts.contains("/work"),
        "only the container's mounts are listed: {mounts}"
    );
    assert!(mounts.contains("/run/secrets/kmt-rt"), "{mounts}");
    assert!(!host_view.exists(), "the mount point leaked to the host");
    assert!(!volume.join("new").exists());

    // A user of the image: no root, no new privileges.
    let mut as_user = plan.clone();
    as_user.user = Some(User {
        uid: 65532,
        gid: 65532,
    });
    as_user.no_new_privs = true;
    let out = run(
        &as_user,
        dir,
        "id -u; id -g; grep NoNewPrivs /proc/self/status",
    );
    assert!(out.starts_with("65532\n65532\n"), "{out}");
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");

    // A failing step names itself and nothing runs.
    let mut broken = plan.clone();
    broken.netns = PathBuf::from("/run/netns/kmt-no-such-netns");
    let file = dir.join("broken.json");
    std::fs::write(&file, serde_json::to_vec(&broken).unwrap()).unwrap();
    let out = Command::new(workspace_bin("kmesh-container").unwrap())
        .arg(&file)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("EnterNetns") && err.contains("kmt-no-such-netns"),
        "{err}"
    );
}

#[test]
fn the_sweep_removes_what_a_killed_cluster_test_left() {
    require_root();
    // The process's own first sweep (run once, by the first harness object of any test) must not
    // race with the leftovers made below.
    drop(TestCgroup::new("sweepcl").unwrap());
    let mut child = Command::new("true").spawn().unwrap();
    child.wait().unwrap();
    let dead = child.id();
    // A node's pin directory with the agent's directory below it, a node cgroup with a pod
    // cgroup and a process in it, the cluster's temporary directory.
    let pins = PathBuf::from(format!("/sys/fs/bpf/kmt-sweepcl-node-a-{dead}"));
    std::fs::create_dir_all(pins.join("kmesh")).unwrap();
    let node_cg = cgroup2_root()
        .unwrap()
        .join(format!("kmt-sweepcl-node-a-{dead}"));
    std::fs::create_dir_all(node_cg.join("pod1234")).unwrap();
    let mut sleeper = Command::new("sleep").arg("600").spawn().unwrap();
    std::fs::write(
        node_cg.join("pod1234/cgroup.procs"),
        sleeper.id().to_string(),
    )
    .unwrap();
    let tmp = std::env::temp_dir().join(format!("kmt-sweepcl-{dead}"));
    std::fs::create_dir_all(tmp.join("pods/x")).unwrap();
    std::fs::write(tmp.join("pods/x/agent.log"), "log").unwrap();

    let removed = sweep_leftovers();
    for path in [&pins, &node_cg, &tmp] {
        assert!(!path.exists(), "{} survived: {removed:?}", path.display());
    }
    assert!(
        !sleeper.wait().unwrap().success(),
        "the pod's process was killed"
    );
}
