//! nginx as the waypoint benchmark's baseline proxy: an L7 reverse proxy in its own pod with the
//! waypoint's route (`end-user: jason` to v2, every other request to v3), tuned as one would tune
//! it for this: as many worker processes as the waypoint has runtime threads, `reuseport` so the
//! kernel spreads connections over them, keep-alive to the upstreams (HTTP/1.1, no `Connection`
//! header passed on) with no cap on requests per connection on either side, no access log.
//!
//! It runs as root in the pod's namespace with its own configuration, pid file, logs and temp
//! directories in a temporary directory (`-p`, `-c`, `-g 'daemon off;'`), never the system's.
use std::{
    io,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::{Child, Command, Stdio},
};

use kmesh_tests::Pod;

use super::listening::wait_listening;

/// The nginx binary Debian's package installs (scripts/setup.sh).
const NGINX: &str = "/usr/sbin/nginx";

/// Where nginx listens and where its route sends requests.
pub struct NginxRoute {
    pub listen: SocketAddr,
    /// Requests with `end-user: jason`.
    pub jason: SocketAddr,
    /// Every other request.
    pub others: SocketAddr,
    /// Worker processes.
    pub workers: usize,
}

/// A running nginx, stopped (and its directory removed) when dropped.
pub struct Nginx {
    child: Child,
    dir: PathBuf,
}

/// Panics with a clear message when nginx is not installed (never skips).
pub fn require_nginx() {
    if Command::new(NGINX).arg("-v").output().is_err() {
        panic!(
            "the waypoint benchmark needs nginx at {NGINX} (Debian package `nginx-light`, \
             installed by scripts/setup.sh without its system service)"
        );
    }
}

impl Nginx {
    pub fn start(pod: &Pod, route: &NginxRoute) -> io::Result<Nginx> {
        let dir = std::env::temp_dir().join(format!("kmb-nginx-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, config(route, &dir))?;
        let stderr = std::fs::File::create(dir.join("stderr.log"))?;
        let child = Command::new("ip")
            .args(["netns", "exec", pod.netns_name(), NGINX, "-p"])
            .arg(&dir)
            .arg("-c")
            .arg(&conf)
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()?;
        let nginx = Nginx { child, dir };
        if let Err(e) = wait_listening(pod, route.listen, "nginx") {
            return Err(io::Error::other(format!("{e}\n{}", nginx.log())));
        }
        Ok(nginx)
    }

    /// What nginx wrote to stderr and its error log.
    pub fn log(&self) -> String {
        let read = |name: &str| std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
        format!("{}{}", read("stderr.log"), read("error.log"))
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM to the master: it stops its workers and exits (SIGKILL would leave them).
        // SAFETY: a signal to our own child's pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The configuration: `map` on the header chooses the upstream group, as the waypoint's route
/// does. The map's key is a regular expression, `~^jason$`, because nginx compares a map's plain
/// strings without case and the route's exact match (Istio's) is case-sensitive.
fn config(route: &NginxRoute, dir: &std::path::Path) -> String {
    let dir = dir.display();
    let NginxRoute {
        listen,
        jason,
        others,
        workers,
    } = route;
    assert!(
        listen.ip() != std::net::IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        "nginx listens on its pod's address"
    );
    format!(
        "user root;
worker_processes {workers};
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{
  worker_connections 4096;
}}
http {{
  access_log off;
  client_body_temp_path {dir}/client_body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  keepalive_requests 1000000;
  keepalive_timeout 60s;
  map $http_end_user $reviews {{
    \"~^jason$\" reviews_v2;
    default reviews_v3;
  }}
  upstream reviews_v2 {{
    server {jason};
    keepalive 32;
    keepalive_requests 1000000;
  }}
  upstream reviews_v3 {{
    server {others};
    keepalive 32;
    keepalive_requests 1000000;
  }}
  server {{
    listen {listen} reuseport;
    location / {{
      proxy_pass http://$reviews;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
    }}
  }}
}}
"
    )
}
