//! The TCP counters of a pod's network namespace that tell why a round was slow: SYN
//! retransmits and retransmission timeouts (a connect() that waited for the 1 s initial RTO),
//! listen drops (the server's accept queue overflowed), and the TIME_WAIT sockets the namespace
//! holds. Read from the namespace's own `/proc/thread-self/net/{netstat,sockstat}` on a thread
//! that joined it; counters are the kernel's per-namespace MIBs, so a pod's figures are its own.
use std::{fmt, io};

use kmesh_tests::Pod;

/// A reading of a namespace's counters (cumulative since it was created; `time_wait` is a gauge).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpCounters {
    /// `TcpExt: TCPSynRetrans`.
    pub syn_retransmits: u64,
    /// `TcpExt: TCPTimeouts` (retransmission timer expiries, SYNs included).
    pub timeouts: u64,
    /// `TcpExt: ListenDrops` (SYNs or handshakes a listener dropped, overflows included).
    pub listen_drops: u64,
    /// `sockstat: TCP ... tw`, now.
    pub time_wait: u64,
}

impl TcpCounters {
    /// Reads the counters of `pod`'s namespace.
    pub fn of(pod: &Pod) -> TcpCounters {
        pod.run_in(read_own_namespace)
            .unwrap_or_else(|e| panic!("TCP counters of pod {}: {e}", pod.name()))
    }

    /// What happened between `before` and `self` (the TIME_WAIT gauge is `self`'s).
    pub fn since(&self, before: &TcpCounters) -> TcpCounters {
        TcpCounters {
            syn_retransmits: self.syn_retransmits - before.syn_retransmits,
            timeouts: self.timeouts - before.timeouts,
            listen_drops: self.listen_drops - before.listen_drops,
            time_wait: self.time_wait,
        }
    }

    /// Whether a connection waited for a retransmission or was dropped.
    pub fn stalled(&self) -> bool {
        self.syn_retransmits + self.timeouts + self.listen_drops > 0
    }
}

impl fmt::Display for TcpCounters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} SYN retransmits, {} timeouts, {} listen drops, {} TIME_WAIT",
            self.syn_retransmits, self.timeouts, self.listen_drops, self.time_wait
        )
    }
}

fn read_own_namespace() -> io::Result<TcpCounters> {
    let netstat = std::fs::read_to_string("/proc/thread-self/net/netstat")?;
    let sockstat = std::fs::read_to_string("/proc/thread-self/net/sockstat")?;
    Ok(TcpCounters {
        syn_retransmits: mib(&netstat, "TcpExt:", "TCPSynRetrans")?,
        timeouts: mib(&netstat, "TcpExt:", "TCPTimeouts")?,
        listen_drops: mib(&netstat, "TcpExt:", "ListenDrops")?,
        time_wait: sockstat_tcp(&sockstat, "tw")?,
    })
}

/// A counter of a `/proc/net/netstat`-style file: a line of names, then a line of values,
/// both starting with `group`.
fn mib(text: &str, group: &str, name: &str) -> io::Result<u64> {
    let mut lines = text.lines().filter(|l| l.starts_with(group));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return Err(unreadable(format!("no {group} lines")));
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.parse().ok())
        .ok_or_else(|| unreadable(format!("no {group} {name}")))
}

/// A field of the `TCP:` line of `/proc/net/sockstat` (`TCP: inuse 3 orphan 0 tw 118 ...`).
fn sockstat_tcp(text: &str, name: &str) -> io::Result<u64> {
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("TCP:"))
        .ok_or_else(|| unreadable("no TCP line in sockstat".to_string()))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    words
        .chunks(2)
        .find(|pair| pair[0] == name)
        .and_then(|pair| pair.get(1)?.parse().ok())
        .ok_or_else(|| unreadable(format!("no TCP {name} in sockstat")))
}

fn unreadable(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// A measurement with what the TCP stacks of its client and server saw during it.
#[derive(Clone, Copy, Debug)]
pub struct Observed<T> {
    pub value: T,
    pub client: TcpCounters,
    pub server: TcpCounters,
}

/// Runs `measure` between two readings of `client`'s and `server`'s counters (outside the
/// measured time).
pub fn observe<T>(client: &Pod, server: &Pod, measure: impl FnOnce() -> T) -> Observed<T> {
    let (client_before, server_before) = (TcpCounters::of(client), TcpCounters::of(server));
    let value = measure();
    Observed {
        value,
        client: TcpCounters::of(client).since(&client_before),
        server: TcpCounters::of(server).since(&server_before),
    }
}

/// The stalls of several measurements added up, with the TIME_WAIT gauges of the last one.
pub fn total<T>(runs: &[Observed<T>]) -> (TcpCounters, TcpCounters) {
    let add = |a: TcpCounters, b: &TcpCounters| TcpCounters {
        syn_retransmits: a.syn_retransmits + b.syn_retransmits,
        timeouts: a.timeouts + b.timeouts,
        listen_drops: a.listen_drops + b.listen_drops,
        time_wait: b.time_wait,
    };
    runs.iter().fold(
        (TcpCounters::default(), TcpCounters::default()),
        |(c, s), r| (add(c, &r.client), add(s, &r.server)),
    )
}
