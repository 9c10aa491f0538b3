//! The real `kmesh-waypoint` follows the real `kmesh-operator` (`--source dir:`, static tokens,
//! plain HTTP): it becomes ready (`/readyz` 200) once it has adopted the configuration the
//! operator compiled for it, adopts the next one when the YAML changes (`/metrics`), and a
//! waypoint with another waypoint's token stays unready, its requests refused (403).
//!
//! Needs both binaries: run `cargo build --workspace --bins` first (`kmesh-waypoint` is looked
//! for beside `kmesh-operator`, or at `KMESH_WAYPOINT_BIN`); a missing one fails the test.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

mod waypoint_world;
use waypoint_world::{TOKENS, free_addr, write_mesh};

/// A child process, killed when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `kmesh-waypoint`, beside `kmesh-operator` in the target directory, or `KMESH_WAYPOINT_BIN`.
fn waypoint_binary() -> PathBuf {
    let path = match std::env::var_os("KMESH_WAYPOINT_BIN") {
        Some(path) => PathBuf::from(path),
        None => Path::new(env!("CARGO_BIN_EXE_kmesh-operator")).with_file_name("kmesh-waypoint"),
    };
    assert!(
        path.is_file(),
        "kmesh-waypoint not found at {}: run `cargo build --workspace --bins` first (same \
         CARGO_TARGET_DIR and profile as the tests), or set KMESH_WAYPOINT_BIN to its path",
        path.display()
    );
    path
}

fn start_waypoint(operator: SocketAddr, token_file: &Path) -> (Running, SocketAddr) {
    let admin = free_addr();
    let child = Command::new(waypoint_binary())
        .arg(format!("--listen={}", free_addr()))
        .arg(format!("--admin={admin}"))
        .arg(format!("--operator=http://{operator}"))
        .arg("--waypoint=default/waypoint")
        .arg(format!("--token-file={}", token_file.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start kmesh-waypoint");
    (Running(child), admin)
}

/// `GET path` on `addr`: status and body.
fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw).ok()?;
    let status = raw.split_whitespace().nth(1)?.parse().ok()?;
    let body = raw.split_once("\r\n\r\n")?.1.to_string();
    Some((status, body))
}

/// Asks until `done` holds, at most 20 s.
fn eventually(
    what: &str,
    ask: impl Fn() -> Option<(u16, String)>,
    done: impl Fn(u16, &str) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let answer = ask();
        match &answer {
            Some((status, body)) if done(*status, body) => return,
            _ if Instant::now() > deadline => panic!("{what}: last answer {answer:?}"),
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

#[test]
fn the_waypoint_adopts_the_operators_configuration() {
    let dir = std::env::temp_dir().join(format!("kmt-wpfollow-{}", std::process::id()));
    let source = dir.join("source");
    std::fs::create_dir_all(&source).unwrap();
    write_mesh(&source, "jason", true);
    let tokens = dir.join("tokens");
    std::fs::write(&tokens, TOKENS).unwrap();
    let (token, other_token) = (dir.join("token"), dir.join("other-token"));
    std::fs::write(&token, "wp\n").unwrap();
    std::fs::write(&other_token, "other\n").unwrap();
    let waypoint = waypoint_binary();
    println!("waypoint binary: {}", waypoint.display());

    let addr = free_addr();
    let _operator = Running(
        Command::new(env!("CARGO_BIN_EXE_kmesh-operator"))
            .arg(format!("--source=dir:{}", source.display()))
            .arg(format!("--listen={addr}"))
            .arg(format!("--metrics-addr={}", free_addr()))
            .arg("--node=node-1")
            .arg(format!("--auth=static:{}", tokens.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start kmesh-operator"),
    );
    let (_waypoint, admin) = start_waypoint(addr, &token);
    let (_intruder, intruder_admin) = start_waypoint(addr, &other_token);

    eventually(
        "ready once configured",
        || get(admin, "/readyz"),
        |status, _| status == 200,
    );
    let metrics = || get(admin, "/metrics");
    eventually(
        "one configuration adopted, from a 200",
        metrics,
        |_, text| {
            text.contains("kmesh_waypoint_configs_adopted_total 1\n")
                && text.contains("kmesh_waypoint_operator_requests_total{code=\"200\"} 1\n")
        },
    );

    // The YAML changes: the held poll returns with the new configuration, adopted.
    write_mesh(&source, "alice", true);
    eventually("the changed configuration adopted", metrics, |_, text| {
        text.contains("kmesh_waypoint_configs_adopted_total 2\n")
            && text.contains("kmesh_waypoint_operator_requests_total{code=\"200\"} 2\n")
    });
    assert!(
        !metrics()
            .unwrap()
            .1
            .contains("kmesh_waypoint_configs_refused_total{")
    );

    // Another waypoint's token: refused (403), retried, never configured.
    eventually(
        "the intruder refused",
        || get(intruder_admin, "/metrics"),
        |_, text| text.contains("kmesh_waypoint_operator_requests_total{code=\"other\"}"),
    );
    let (status, why) = get(intruder_admin, "/readyz").unwrap();
    assert_eq!((status, why.as_str()), (503, "no configuration loaded\n"));
    let _ = std::fs::remove_dir_all(&dir);
}
