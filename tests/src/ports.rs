//! Loopback ports for the servers the tests start as child processes (kube-apiserver, etcd, the
//! agent's admin and metrics ports, the operator).
//!
//! Such a port is chosen here, then bound by the child a moment (or, for a restarted
//! kube-apiserver, seconds) later. A port the kernel handed out with `bind(:0)` lies in the
//! ephemeral range, where any outgoing connection of this machine may take it in between: a CI run
//! and a local run each saw kube-apiserver exit with "bind: address already in use". The ports
//! here lie below the ephemeral range (`net.ipv4.ip_local_port_range`), which the kernel never
//! gives to a connection, and a process never hands out the same port twice.
use std::{
    io,
    net::{SocketAddr, TcpListener},
    ops::Range,
    sync::atomic::{AtomicU32, Ordering},
};

/// The lowest port handed out (well above the well-known and registered services of a test
/// machine, which would not be bound on loopback anyway; a bound one is skipped).
const LOWEST: u16 = 10_000;

/// How many ports of this process were handed out or found busy (the cursor).
static CURSOR: AtomicU32 = AtomicU32::new(0);

/// A loopback port that was free a moment ago, outside the ephemeral range, and not handed out
/// before by this process.
pub fn free_loopback_port() -> io::Result<u16> {
    // Processes start at different places (their pid), so that two test processes beside each
    // other rarely try the same ports.
    first_free(
        candidate_range()?,
        std::process::id().wrapping_mul(7_919),
        &CURSOR,
    )
}

/// The first port of `range` that binds, from `start` + `cursor` on (wrapping), advancing
/// `cursor` past it.
fn first_free(range: Range<u16>, start: u32, cursor: &AtomicU32) -> io::Result<u16> {
    let len = u32::from(range.end - range.start);
    for _ in 0..len {
        let step = cursor.fetch_add(1, Ordering::Relaxed);
        let port = range.start + (start.wrapping_add(step) % len) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(io::Error::other(format!(
        "no free loopback port in {range:?} (below the ephemeral range)"
    )))
}

/// `127.0.0.1:`[`free_loopback_port`].
pub fn free_loopback_addr() -> io::Result<SocketAddr> {
    Ok(SocketAddr::from(([127, 0, 0, 1], free_loopback_port()?)))
}

/// [`LOWEST`] up to the ephemeral range's start.
fn candidate_range() -> io::Result<Range<u16>> {
    let path = "/proc/sys/net/ipv4/ip_local_port_range";
    let text = std::fs::read_to_string(path)
        .map_err(|e| io::Error::new(e.kind(), format!("reading {path}: {e}")))?;
    let low: u16 = text
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| io::Error::other(format!("{path}: unexpected content {text:?}")))?;
    if low < LOWEST + 1_000 {
        return Err(io::Error::other(format!(
            "{path} starts at {low}: too few ports below it for the tests' servers \
             (they need {LOWEST}..{low} not to be ephemeral)"
        )));
    }
    Ok(LOWEST..low)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_and_below_the_ephemeral_range() {
        let range = candidate_range().unwrap();
        let ports: Vec<u16> = (0..200).map(|_| free_loopback_port().unwrap()).collect();
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(
            unique.len(),
            ports.len(),
            "a port handed out twice: {ports:?}"
        );
        assert!(
            ports.iter().all(|p| range.contains(p)),
            "{ports:?} not in {range:?}"
        );
    }

    #[test]
    fn a_bound_port_is_skipped() {
        let held = free_loopback_port().unwrap();
        let _listener = TcpListener::bind(("127.0.0.1", held)).unwrap();
        let range = held..held.saturating_add(100);
        let next = first_free(range, 0, &AtomicU32::new(0)).unwrap();
        assert!(next > held, "{next} handed out while {held} is bound");
    }
}
