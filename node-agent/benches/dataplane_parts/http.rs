//! HTTP through three paths, in one run (the data plane benchmark's third part): `wrk` in the client
//! pod against the tiny HTTP server of the server pod,
//!
//! - direct to the server pod's IP, no programs (the baseline);
//! - to the Service VIP, from the mesh cgroup (the agent's programs rewrite the connect);
//! - through a userspace L4 proxy pair, the sidecars' shape: haproxy (TCP mode) in the client pod,
//!   which wrk dials on loopback, forwards to haproxy in the server pod, which forwards to the
//!   server on the pod's loopback.
//!
//! for HTTP keep-alive and for a new connection per request (`Connection: close`). Rounds alternate
//! the paths in a rotating order; each round's figures are divided by the same round's baseline,
//! and every ratio is printed as the min, median and max over the rounds. A wrk run that counted a
//! failure is printed and left out.
use std::{
    io::{self, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use kmesh_tests::{Pod, TestCgroup};

use super::http_server::HttpServer;
use super::wrk::{self, Connections, WrkResult};

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

#[derive(Clone, Copy, PartialEq, Eq)]
enum Path3 {
    Direct,
    Mesh,
    ProxyPair,
}

impl Path3 {
    const ALL: [Path3; 3] = [Path3::Direct, Path3::Mesh, Path3::ProxyPair];

    fn short(self) -> &'static str {
        match self {
            Path3::Direct => "direct",
            Path3::Mesh => "mesh (VIP)",
            Path3::ProxyPair => "haproxy pair",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Path3::Direct => "baseline: pod IP, no programs",
            Path3::Mesh => "mesh: service VIP, cgroup/connect4",
            Path3::ProxyPair => "proxy pair: haproxy in both pods",
        }
    }
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
    let url = |path: Path3| match path {
        Path3::Direct => format!("http://{}:{HTTP_PORT}/", server.ipv4()),
        Path3::Mesh => format!("http://{vip}:{HTTP_PORT}/"),
        Path3::ProxyPair => format!("http://127.0.0.1:{CLIENT_PROXY_PORT}/"),
    };
    println!();
    println!(
        "HTTP with wrk ({} rounds x {} s per path and mode, {WRK_CONNECTIONS} connections): \
         each round's figure over the same round's baseline, min / median / max of the rounds",
        plan.rounds, plan.seconds
    );
    let mut figures = Vec::new();
    for mode in [Connections::KeepAlive, Connections::PerRequest] {
        let mut rounds: Vec<[Option<WrkResult>; 3]> = Vec::new();
        for round in 0..plan.rounds {
            let mut results = [None; 3];
            // Rotate the order, so that no path always runs first or last in a round.
            for k in 0..Path3::ALL.len() {
                let index = (round + k) % Path3::ALL.len();
                let path = Path3::ALL[index];
                let (netns, url) = (client.netns_name(), url(path));
                let run = match path {
                    // In the mesh cgroup, where connect4 rewrites the VIP.
                    Path3::Mesh => wrk::run_in(
                        netns,
                        Some(mesh.path()),
                        &url,
                        mode,
                        plan.seconds,
                        WRK_CONNECTIONS,
                    ),
                    _ => wrk::run(netns, &url, mode, plan.seconds, WRK_CONNECTIONS),
                };
                if run.errors.any() {
                    println!(
                        "  round {round}, {}: left out, wrk counted failures: {}",
                        path.label(),
                        run.errors
                    );
                } else {
                    results[index] = Some(run.result);
                }
            }
            rounds.push(results);
        }
        figures.push(print_mode(mode, &rounds));
    }
    figures
}

/// Prints one mode's table; returns its medians.
fn print_mode(mode: Connections, rounds: &[[Option<WrkResult>; 3]]) -> HttpFigures {
    let label = match mode {
        Connections::KeepAlive => "keep-alive",
        Connections::PerRequest => "a new connection per request",
    };
    println!("  {label}:");
    let mut medians = Vec::new();
    println!(
        "    {:<36} {:>9} {:>9} {:>9} {:>9}   {:>20} {:>20} {:>20} {:>20}",
        "path",
        "req/s",
        "p50 us",
        "p90 us",
        "p99 us",
        "req/s ratio",
        "p50 ratio",
        "p90 ratio",
        "p99 ratio"
    );
    let figures = |r: &WrkResult| [r.requests_per_s, r.p50_us, r.p90_us, r.p99_us];
    for (index, path) in Path3::ALL.iter().enumerate() {
        let own: Vec<[f64; 4]> = rounds
            .iter()
            .filter_map(|r| r[index].as_ref().map(figures))
            .collect();
        let ratios: Vec<[f64; 4]> = rounds
            .iter()
            .filter_map(|r| {
                let (this, base) = (r[index].as_ref()?, r[0].as_ref()?);
                let (this, base) = (figures(this), figures(base));
                Some(std::array::from_fn(|i| this[i] / base[i]))
            })
            .collect();
        let median_of = |i: usize| median(own.iter().map(|f| f[i]).collect());
        let spread = |i: usize| {
            let v: Vec<f64> = ratios.iter().map(|f| f[i]).collect();
            match (min(&v), max(&v)) {
                (Some(lo), Some(hi)) => format!("{lo:.2} / {:.2} / {hi:.2}", median(v.clone())),
                _ => "-".to_string(),
            }
        };
        println!(
            "    {:<36} {:>9.0} {:>9.1} {:>9.1} {:>9.1}   {:>20} {:>20} {:>20} {:>20}",
            path.label(),
            median_of(0),
            median_of(1),
            median_of(2),
            median_of(3),
            spread(0),
            spread(1),
            spread(2),
            spread(3)
        );
        medians.push((path.short(), [median_of(1), median_of(2), median_of(3)]));
    }
    HttpFigures {
        mode: label,
        paths: medians,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn min(v: &[f64]) -> Option<f64> {
    v.iter().copied().min_by(f64::total_cmp)
}

fn max(v: &[f64]) -> Option<f64> {
    v.iter().copied().max_by(f64::total_cmp)
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
        wait_listening(server, server_addr)?;
        wait_listening(
            client,
            SocketAddr::from((Ipv4Addr::LOCALHOST, CLIENT_PROXY_PORT)),
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

/// Waits until `addr` accepts a connection in `pod`'s namespace (at most 10 s).
fn wait_listening(pod: &Pod, addr: SocketAddr) -> io::Result<()> {
    let started = Instant::now();
    loop {
        let connected =
            pod.run_in(move || TcpStream::connect_timeout(&addr, Duration::from_millis(200)));
        match connected {
            Ok(_) => return Ok(()),
            Err(e) if started.elapsed() > Duration::from_secs(10) => {
                return Err(io::Error::other(format!(
                    "haproxy in pod {} does not listen on {addr}: {e}",
                    pod.name()
                )));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}
