//! The operator binary (`--source dir:`, static tokens, plain HTTP) serves a waypoint its compiled
//! configuration through the contract: the compile loop publishes it, a held long poll returns
//! when the YAML changes, other callers are refused, and removing the Gateway answers `404`.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

mod waypoint_world;
use waypoint_world::{TOKENS, free_addr, write_mesh};

use kmesh_snapshot::{
    contract,
    waypoint::{WaypointConfig, WaypointName},
};

struct Operator {
    child: Child,
    dir: PathBuf,
    addr: SocketAddr,
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start() -> Operator {
    let dir = std::env::temp_dir().join(format!("kmt-wpserve-{}", std::process::id()));
    let source = dir.join("source");
    std::fs::create_dir_all(&source).unwrap();
    write_mesh(&source, "jason", true);
    let tokens = dir.join("tokens");
    std::fs::write(&tokens, TOKENS).unwrap();
    let addr = free_addr();
    let child = Command::new(env!("CARGO_BIN_EXE_kmesh-operator"))
        .arg(format!("--source=dir:{}", source.display()))
        .arg(format!("--listen={addr}"))
        .arg(format!("--metrics-addr={}", free_addr()))
        .arg("--node=node-1")
        .arg(format!("--auth=static:{}", tokens.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start kmesh-operator");
    Operator { child, dir, addr }
}

/// An HTTP/1.1 answer: status, ETag, body.
#[derive(Debug)]
struct Answer {
    status: u16,
    etag: Option<String>,
    body: Vec<u8>,
}

fn get(addr: SocketAddr, path: &str, token: &str, held: Option<&str>) -> Option<Answer> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream
        .set_read_timeout(Some(contract::MAX_WAIT + Duration::from_secs(5)))
        .unwrap();
    let if_none_match = held.map_or(String::new(), |t| format!("If-None-Match: {t}\r\n"));
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: op\r\nAuthorization: Bearer {token}\r\n{if_none_match}\
         Connection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).ok()?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).ok()?;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let etag = head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("etag")
            .then(|| value.trim().to_string())
    });
    Some(Answer {
        status,
        etag,
        body: raw[split + 4..].to_vec(),
    })
}

/// Asks until `done` holds (the operator starts, the source re-reads), at most 20 s.
fn eventually(
    what: &str,
    mut ask: impl FnMut() -> Option<Answer>,
    done: impl Fn(&Answer) -> bool,
) -> Answer {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let answer = ask();
        match answer {
            Some(answer) if done(&answer) => return answer,
            other if Instant::now() > deadline => panic!("{what}: last answer {other:?}"),
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

#[test]
fn the_operator_serves_a_waypoint_its_configuration() {
    let operator = start();
    let addr = operator.addr;
    let waypoint = WaypointName {
        namespace: "default".into(),
        name: "waypoint".into(),
    };
    let path = contract::waypoint_config_path(&waypoint.namespace, &waypoint.name);
    let first = eventually(
        "the first configuration",
        || get(addr, &path, "wp", None),
        |a| a.status == 200,
    );
    let config = WaypointConfig::from_json(&first.body).expect("a valid configuration");
    assert_eq!(config.waypoint, waypoint);
    assert!(!config.services.is_empty(), "reviews is bound: {config:?}");
    let etag = first.etag.expect("an ETag");
    assert_eq!(
        contract::parse_waypoint_config_etag(&etag),
        Some(kmesh_snapshot::content_hash(&first.body))
    );

    // Refused: another waypoint's token, a node's; a waypoint's token fetches no snapshot.
    assert_eq!(get(addr, &path, "other", None).unwrap().status, 403);
    assert_eq!(get(addr, &path, "node", None).unwrap().status, 403);
    assert_eq!(get(addr, &path, "nobody", None).unwrap().status, 401);
    let snapshot = contract::snapshot_path("node-1");
    assert_eq!(get(addr, &snapshot, "wp", None).unwrap().status, 403);
    assert_eq!(get(addr, &snapshot, "node", None).unwrap().status, 200);

    // A held long poll returns when the YAML changes, with the new configuration.
    let dir = operator.dir.join("source");
    let polling = {
        let (path, etag) = (path.clone(), etag.clone());
        let url = format!("{path}?{}", contract::wait_query(Duration::from_secs(30)));
        std::thread::spawn(move || {
            let started = Instant::now();
            (get(addr, &url, "wp", Some(&etag)), started.elapsed())
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    write_mesh(&dir, "alice", true);
    let (changed, held) = polling.join().unwrap();
    let changed = changed.expect("an answer");
    assert_eq!(changed.status, 200, "{changed:?}");
    assert!(held < Duration::from_secs(15), "held {held:?}");
    assert_ne!(changed.etag.as_deref(), Some(etag.as_str()));
    let config = WaypointConfig::from_json(&changed.body).unwrap();
    assert!(format!("{config:?}").contains("alice"), "{config:?}");

    // Without its Gateway, the waypoint has no configuration.
    write_mesh(&dir, "alice", false);
    eventually(
        "404 once the Gateway is gone",
        || get(addr, &path, "wp", None),
        |a| a.status == 404,
    );
}
