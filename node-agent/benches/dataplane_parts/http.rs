//! HTTP through three paths, in one run (the data plane benchmark's third part): `wrk` in the client
//! pod against the tiny HTTP server of the server pod,
//!
//! - direct to the server pod's IP, no programs (the baseline);
//! - to the Service VIP, from the mesh cgroup (the agent's programs rewrite the connect);
//! - through a userspace L4 proxy pair, the sidecars' shape: haproxy (TCP mode) in the client pod,
//!   which wrk dials on loopback, forwards to haproxy in the server pod, which forwards to the
//!   server on the pod's loopback.
//!
//! for HTTP keep-alive and for a new connection per request (`Connection: close`), in rounds
//! (`shared/wrk_rounds.rs`: rotating order, each round over its own baseline, min / median / max of
//! the ratios, runs with failures printed and left out).
use std::{
    io::{self, Write as _},
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::{Child, Command, Stdio},
};

use kmesh_tests::{Pod, TestCgroup};

use super::http_server::HttpServer;
use super::listening::wait_listening;
use super::wrk::{self, Connections};
use super::wrk_rounds::{self, WrkPath};

/// The server's HTTP port, in the server pod.
pub const HTTP_PORT: u16 = 8081;
/// The client-side proxy's port, on the client pod's loopback.
const CLIENT_PROXY_PORT: u16 = 15001;
/// The server-side proxy's port, on the server pod's address.
const SERVER_PROXY_PORT: u16 = 15006;
/// wrk's connections (one thread): fewer than the server's workers, so none waits for one.
const WRK_CONNECTIONS: usize = 4;

/// How much to measure.
pub struct HttpPlan {
    pub rounds: usize,
    pub seconds: u32,
}

/// One mode's medians (p50, p90, p99 in µs) per path, for the charts.
pub struct HttpFigures {
    pub mode: &'static str,
    pub paths: Vec<(&'static str, [f64; 3])>,
}

/// Measures the three paths; `vip` is a Service VIP whose port [`HTTP_PORT`] the mesh routes to
/// the server pod's [`HTTP_PORT`].
pub fn run(
    plan: &HttpPlan,
    client: &Pod,
    server: &Pod,
    vip: Ipv4Addr,
    plain: &TestCgroup,
    mesh: &TestCgroup,
) -> Vec<HttpFigures> {
    wrk::require_wrk();
    require_haproxy();
    wrk::reuse_time_wait_ports(client);
    wrk::reuse_time_wait_ports(server);
    let _server = HttpServer::start(server, HTTP_PORT).expect("HTTP server in the server pod");
    let _proxies = ProxyPair::start(client, server, plain).expect("the haproxy pair");
    let netns = client.netns_name();
    let seconds = plan.seconds;
    let direct = format!("http://{}:{HTTP_PORT}/", server.ipv4());
    let through_vip = format!("http://{vip}:{HTTP_PORT}/");
    let proxy_pair = format!("http://127.0.0.1:{CLIENT_PROXY_PORT}/");
    let paths = [
        WrkPath {
            label: "baseline: pod IP, no programs",
            short: "direct",
            run: Box::new(|mode| wrk::run(netns, &direct, mode, seconds, WRK_CONNECTIONS)),
        },
        WrkPath {
            label: "mesh: service VIP, cgroup/connect4",
            short: "mesh (VIP)",
            // In the mesh cgroup, where connect4 rewrites the VIP.
            run: Box::new(|mode| {
                wrk::run_in(
                    netns,
                    Some(mesh.path()),
                    &through_vip,
                    mode,
                    seconds,
                    WRK_CONNECTIONS,
                )
            }),
        },
        WrkPath {
            label: "proxy pair: haproxy in both pods",
            short: "haproxy pair",
            run: Box::new(|mode| wrk::run(netns, &proxy_pair, mode, seconds, WRK_CONNECTIONS)),
        },
    ];
    println!();
    println!(
        "HTTP with wrk ({} rounds x {} s per path and mode, {WRK_CONNECTIONS} connections): \
         each round's figure over the same round's baseline, min / median / max of the rounds",
        plan.rounds, plan.seconds
    );
    let mut figures = Vec::new();
    for mode in [Connections::KeepAlive, Connections::PerRequest] {
        let results = wrk_rounds::measure(&paths, mode, plan.rounds);
        figures.push(HttpFigures {
            mode: wrk_rounds::label(mode),
            paths: wrk_rounds::print_table(&paths, &results),
        });
    }
    figures
}

/// Panics with a clear message when haproxy is not installed (never skips).
fn require_haproxy() {
    if Command::new("haproxy").arg("-v").output().is_err() {
        panic!(
            "the data plane benchmark needs `haproxy` (Debian package `haproxy`, installed by \
             scripts/setup.sh): it is not on PATH"
        );
    }
}

/// The two haproxy processes, killed on drop, and their configuration files.
struct ProxyPair {
    children: Vec<Child>,
    files: Vec<PathBuf>,
}

impl ProxyPair {
    fn start(client: &Pod, server: &Pod, cgroup: &TestCgroup) -> io::Result<ProxyPair> {
        let mut pair = ProxyPair {
            children: Vec::new(),
            files: Vec::new(),
        };
        let server_addr = SocketAddr::from((server.ipv4(), SERVER_PROXY_PORT));
        pair.spawn(
            server,
            cgroup,
            "server",
            &format!("{server_addr}"),
            &format!("127.0.0.1:{HTTP_PORT}"),
        )?;
        pair.spawn(
            client,
            cgroup,
            "client",
            &format!("127.0.0.1:{CLIENT_PROXY_PORT}"),
            &format!("{server_addr}"),
        )?;
        wait_listening(server, server_addr, "haproxy")?;
        wait_listening(
            client,
            SocketAddr::from((Ipv4Addr::LOCALHOST, CLIENT_PROXY_PORT)),
            "haproxy",
        )?;
        Ok(pair)
    }

    /// haproxy in `pod`: TCP mode, `bind` forwarded to `to`, one thread (a sidecar's share).
    fn spawn(
        &mut self,
        pod: &Pod,
        cgroup: &TestCgroup,
        side: &str,
        bind: &str,
        to: &str,
    ) -> io::Result<()> {
        let file =
            std::env::temp_dir().join(format!("kmb-haproxy-{side}-{}.cfg", std::process::id()));
        let mut f = std::fs::File::create(&file)?;
        write!(
            f,
            "global\n  nbthread 1\n  maxconn 4096\n\
             defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
             frontend in\n  bind {bind}\n  default_backend out\n\
             backend out\n  server upstream {to}\n"
        )?;
        self.files.push(file.clone());
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", pod.netns_name(), "haproxy", "-db", "-f"])
            .arg(&file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        kmesh_tests::cluster::process::join_cgroup_before_exec(&mut cmd, cgroup.path())?;
        self.children.push(cmd.spawn()?);
        Ok(())
    }
}

impl Drop for ProxyPair {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for file in &self.files {
            let _ = std::fs::remove_file(file);
        }
    }
}
