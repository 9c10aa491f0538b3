//! Readiness probes as the test kubelet runs them: `httpGet` and `tcpSocket`, from the node's
//! network namespace to the pod IP, with the spec's period, timeout and thresholds. Used for the
//! project's containers (`container.rs`) and for application pods (`app_pod.rs`), whose servers
//! are the harness's: a probe that a kernel policy refuses makes the pod not ready, as it would in
//! a real cluster.
use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::Path,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::core::v1::{Container, Probe},
    apimachinery::pkg::util::intstr::IntOrString,
};

use super::container_spec::ConfigError;

/// What a readiness probe does, from the node, at the pod IP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeAction {
    /// `httpGet`: ready when the status is 200..400.
    HttpGet { path: String },
    /// `tcpSocket`: ready when the connection is accepted.
    TcpSocket,
}

/// A readiness probe as the test kubelet runs it.
#[derive(Clone, Debug)]
pub struct ReadinessProbe {
    pub action: ProbeAction,
    pub port: u16,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: i32,
    pub failure_threshold: i32,
    pub initial_delay: Duration,
}

impl ReadinessProbe {
    /// Runs the probe once from the network namespace `netns` (the node's) against `ip`.
    pub fn run(&self, netns: &Path, ip: Ipv4Addr) -> bool {
        let addr = SocketAddr::V4(SocketAddrV4::new(ip, self.port));
        match &self.action {
            ProbeAction::HttpGet { path } => {
                super::http::get_in_netns(netns, addr, path, self.timeout)
                    .is_ok_and(|(code, _)| (200..400).contains(&code))
            }
            ProbeAction::TcpSocket => {
                let timeout = self.timeout;
                crate::run_in_netns(netns, move || {
                    std::net::TcpStream::connect_timeout(&addr, timeout).map(drop)
                })
                .is_ok()
            }
        }
    }

    /// What the probe does, for logs: `GET 10.0.0.1:80/ready`, `TCP 10.0.0.1:80`.
    pub fn describe(&self, ip: Ipv4Addr) -> String {
        match &self.action {
            ProbeAction::HttpGet { path } => format!("GET {ip}:{}{path}", self.port),
            ProbeAction::TcpSocket => format!("TCP {ip}:{}", self.port),
        }
    }
}

/// A container's named or numbered port.
fn probe_port(c: &Container, port: &IntOrString) -> Result<u16, ConfigError> {
    match port {
        IntOrString::Int(p) => Ok(*p as u16),
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name))
            .map(|p| p.container_port as u16)
            .ok_or_else(|| ConfigError(format!("readinessProbe: no container port {name:?}"))),
    }
}

/// The readiness probe `probe` of container `c`: `httpGet` (HTTP to the pod IP) or `tcpSocket`;
/// anything else is a [`ConfigError`].
pub fn readiness_probe(c: &Container, probe: &Probe) -> Result<ReadinessProbe, ConfigError> {
    let (action, port) = match (&probe.http_get, &probe.tcp_socket) {
        (Some(get), _) => {
            if get.scheme.as_deref().is_some_and(|s| s != "HTTP") || get.host.is_some() {
                return Err(ConfigError(
                    "readinessProbe: only HTTP to the pod IP is run by the test kubelet".into(),
                ));
            }
            let path = get.path.clone().unwrap_or_else(|| "/".into());
            (ProbeAction::HttpGet { path }, probe_port(c, &get.port)?)
        }
        (None, Some(tcp)) => {
            if tcp.host.is_some() {
                return Err(ConfigError(
                    "readinessProbe: only TCP to the pod IP is run by the test kubelet".into(),
                ));
            }
            (ProbeAction::TcpSocket, probe_port(c, &tcp.port)?)
        }
        (None, None) => {
            return Err(ConfigError(
                "readinessProbe: only httpGet and tcpSocket probes are run by the test kubelet"
                    .into(),
            ));
        }
    };
    let secs = |v: Option<i32>, d: u64| Duration::from_secs(v.map_or(d, |s| s.max(0) as u64));
    Ok(ReadinessProbe {
        action,
        port,
        period: secs(probe.period_seconds, 10),
        timeout: secs(probe.timeout_seconds, 1),
        success_threshold: probe.success_threshold.unwrap_or(1),
        failure_threshold: probe.failure_threshold.unwrap_or(3),
        initial_delay: secs(probe.initial_delay_seconds, 0),
    })
}

/// A readiness probe's schedule, counters and the container's readiness.
pub struct Readiness {
    pub probe: Option<ReadinessProbe>,
    next: Instant,
    successes: i32,
    failures: i32,
    /// Ready: no probe, or the probe passed `success_threshold` times in a row and has not failed
    /// `failure_threshold` times in a row since.
    pub ready: bool,
}

impl Readiness {
    pub fn new(probe: Option<ReadinessProbe>) -> Readiness {
        let mut r = Readiness {
            ready: false,
            probe,
            next: Instant::now(),
            successes: 0,
            failures: 0,
        };
        r.restart();
        r
    }

    /// The container (re)started: counters reset, first probe after the initial delay.
    pub fn restart(&mut self) {
        self.ready = self.probe.is_none();
        self.successes = 0;
        self.failures = 0;
        self.next = Instant::now()
            + self
                .probe
                .as_ref()
                .map_or(Duration::ZERO, |p| p.initial_delay);
    }

    /// The probe to run now, if one is due (and schedules the next one).
    pub fn due(&mut self) -> Option<ReadinessProbe> {
        let p = self.probe.clone()?;
        if Instant::now() < self.next {
            return None;
        }
        self.next = Instant::now() + p.period;
        Some(p)
    }

    /// Counts one probe result; returns whether `ready` changed.
    pub fn record(&mut self, ok: bool) -> bool {
        let Some(p) = &self.probe else {
            return false;
        };
        if ok {
            self.successes += 1;
            self.failures = 0;
        } else {
            self.failures += 1;
            self.successes = 0;
        }
        let ready = if self.ready {
            self.failures < p.failure_threshold
        } else {
            self.successes >= p.success_threshold
        };
        let changed = ready != self.ready;
        self.ready = ready;
        changed
    }
}
