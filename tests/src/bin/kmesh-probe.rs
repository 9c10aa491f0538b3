//! `kmesh-probe`: connects repeatedly to a TCP target, reads the one-line reply of
//! each connection, and prints one JSON report line (`kmesh_tests::ProbeReport`).
//!
//! Run by the kernel tests inside a pod netns and a test cgroup, so that its connects
//! go through the eBPF programs attached to that cgroup.

use std::io::{self, Read};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6, TcpStream};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use kmesh_tests::ProbeReport;
use kmesh_tests::probe::{Outcome, TimedAttempt, monotonic_ns};

const USAGE: &str = "\
usage: kmesh-probe --target ADDR:PORT [--count N] [--duration-ms MS] [--until-file PATH]
                   [--timeout-ms T] [--interval-us U] [--socket v4|v6|auto]
                   [--ready-file PATH] [--connect-only] [--timeline] [--send-file PATH]

  --target       IPv4 `a.b.c.d:port` or IPv6 `[v6]:port`
  --count        stop after N attempts
  --duration-ms  stop after MS milliseconds
  --until-file   stop once PATH exists (checked before every attempt)
                 (stops at the first condition met; with none of the three: --count 1)
  --timeout-ms   connect timeout, and read timeout of the reply (default 1000)
  --interval-us  pause between attempts (default 0)
  --socket       socket family (alias --family); `v6` with an IPv4 target dials the
                 IPv4-mapped address ::ffff:a.b.c.d on an AF_INET6 socket (default auto)
  --ready-file   create PATH once the first attempt is done
  --connect-only connect() then close() with no read, closing with RST (SO_LINGER 0) so that
                 no TIME_WAIT state piles up; successes count under the reply \"connected\".
                 For benchmarks of the connect path.
  --send-file    a byte-exact exchange instead of reading a line: write PATH's bytes, half-close,
                 read to the end; the reply is \"echoed\" when the bytes read are exactly those
                 sent, else \"altered: <n> bytes: <the first ones, escaped>\" (an echo server's test)
  --timeline     also report every attempt in order: CLOCK_MONOTONIC ns just before connect()
                 and just after it returned, and the reply or error (\"timeline\" in the report)

Prints one JSON line: {\"attempts\":N,\"ok\":N,\"failed\":N,\"by_reply\":{..},\"errors\":{..},\"elapsed_ms\":N}
Error keys: errno names (ECONNREFUSED, ENETUNREACH, EPERM, ...), connect_timeout,
read_timeout, no_reply.";

#[derive(Debug)]
struct Opts {
    target: SocketAddr,
    count: Option<u64>,
    duration: Option<Duration>,
    until_file: Option<PathBuf>,
    ready_file: Option<PathBuf>,
    timeout: Duration,
    interval: Duration,
    connect_only: bool,
    timeline: bool,
    /// `--send-file`'s content.
    send: Option<Vec<u8>>,
}

fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Opts, String> {
    let mut target: Option<SocketAddr> = None;
    let mut socket = String::from("auto");
    let mut count = None;
    let mut duration = None;
    let mut until_file = None;
    let mut ready_file = None;
    let mut timeout = Duration::from_millis(1000);
    let mut interval = Duration::ZERO;
    let mut connect_only = false;
    let mut timeline = false;
    let mut send = None;

    let mut it = args.into_iter();
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            return Err(String::new());
        }
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let num = |v: String| v.parse::<u64>().map_err(|e| format!("{flag} {v:?}: {e}"));
        match flag.as_str() {
            "--target" => {
                let v = value()?;
                target = Some(v.parse().map_err(|e| format!("--target {v:?}: {e}"))?);
            }
            "--count" => count = Some(num(value()?)?),
            "--duration-ms" => duration = Some(Duration::from_millis(num(value()?)?)),
            "--until-file" => until_file = Some(PathBuf::from(value()?)),
            "--ready-file" => ready_file = Some(PathBuf::from(value()?)),
            "--timeout-ms" => timeout = Duration::from_millis(num(value()?)?),
            "--interval-us" => interval = Duration::from_micros(num(value()?)?),
            "--socket" | "--family" => socket = value()?,
            "--connect-only" => connect_only = true,
            "--timeline" => timeline = true,
            "--send-file" => {
                let path = value()?;
                send = Some(std::fs::read(&path).map_err(|e| format!("--send-file {path}: {e}"))?);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let target = target.ok_or("--target is required")?;
    let target = match (socket.as_str(), target) {
        ("auto", t) | ("v4", t @ SocketAddr::V4(_)) | ("v6", t @ SocketAddr::V6(_)) => t,
        ("v6", SocketAddr::V4(t)) => {
            SocketAddr::V6(SocketAddrV6::new(t.ip().to_ipv6_mapped(), t.port(), 0, 0))
        }
        ("v4", SocketAddr::V6(t)) => match t.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, t.port())),
            None => return Err(format!("--socket v4 cannot dial IPv6 address {t}")),
        },
        (f, _) => return Err(format!("--socket {f:?}: expected v4, v6 or auto")),
    };
    if timeout.is_zero() {
        return Err("--timeout-ms must be > 0".into());
    }
    if count.is_none() && duration.is_none() && until_file.is_none() {
        count = Some(1);
    }
    Ok(Opts {
        target,
        count,
        duration,
        until_file,
        ready_file,
        timeout,
        interval,
        connect_only,
        timeline,
        send,
    })
}

fn errno_name(n: i32) -> String {
    let name = match n {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EINTR => "EINTR",
        libc::EIO => "EIO",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EFAULT => "EFAULT",
        libc::EBUSY => "EBUSY",
        libc::EINVAL => "EINVAL",
        libc::ENFILE => "ENFILE",
        libc::EMFILE => "EMFILE",
        libc::EPIPE => "EPIPE",
        libc::ENOTSOCK => "ENOTSOCK",
        libc::EPROTOTYPE => "EPROTOTYPE",
        libc::ENOPROTOOPT => "ENOPROTOOPT",
        libc::EPROTONOSUPPORT => "EPROTONOSUPPORT",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::EAFNOSUPPORT => "EAFNOSUPPORT",
        libc::EADDRINUSE => "EADDRINUSE",
        libc::EADDRNOTAVAIL => "EADDRNOTAVAIL",
        libc::ENETDOWN => "ENETDOWN",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::ENETRESET => "ENETRESET",
        libc::ECONNABORTED => "ECONNABORTED",
        libc::ECONNRESET => "ECONNRESET",
        libc::ENOBUFS => "ENOBUFS",
        libc::EISCONN => "EISCONN",
        libc::ENOTCONN => "ENOTCONN",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::EHOSTDOWN => "EHOSTDOWN",
        libc::EHOSTUNREACH => "EHOSTUNREACH",
        libc::EALREADY => "EALREADY",
        libc::EINPROGRESS => "EINPROGRESS",
        _ => return format!("errno{n}"),
    };
    name.to_string()
}

/// The report key of an error; `timeout_key` for a timeout of this phase.
fn error_key(e: &io::Error, timeout_key: &str) -> String {
    match e.raw_os_error() {
        Some(n) if n == libc::EAGAIN || n == libc::EWOULDBLOCK => timeout_key.to_string(),
        Some(n) => errno_name(n),
        None if e.kind() == io::ErrorKind::TimedOut => timeout_key.to_string(),
        None => format!("{:?}", e.kind()),
    }
}

/// One connect with `timeout` for it and for reads; `connect_ns` gets the monotonic times just
/// before connect() and just after it returned.
fn connect(
    target: &SocketAddr,
    timeout: Duration,
    connect_ns: &mut [u64; 2],
) -> Result<TcpStream, String> {
    connect_ns[0] = monotonic_ns();
    let connected = TcpStream::connect_timeout(target, timeout);
    connect_ns[1] = monotonic_ns();
    let s = connected.map_err(|e| error_key(&e, "connect_timeout"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| error_key(&e, "read_timeout"))?;
    Ok(s)
}

/// One connect + read of the reply line. Ok(reply) or Err(error key); `connect_ns` gets the
/// monotonic times just before connect() and just after it returned.
fn attempt(
    target: &SocketAddr,
    timeout: Duration,
    connect_ns: &mut [u64; 2],
) -> Result<String, String> {
    let mut s = connect(target, timeout, connect_ns)?;
    let mut buf = Vec::with_capacity(64);
    let mut chunk = [0u8; 256];
    let deadline = Instant::now() + timeout;
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.contains(&b'\n') || buf.len() > 4096 {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err("read_timeout".into());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(error_key(&e, "read_timeout")),
        }
    }
    let line = buf.split(|&b| b == b'\n').next().unwrap_or(&[]);
    let line = String::from_utf8_lossy(line).trim().to_string();
    if line.is_empty() {
        return Err("no_reply".into());
    }
    Ok(line)
}

/// One connect, `bytes` written and the write side shut down, then everything read until the
/// server closes: `echoed` when it sent back exactly `bytes`.
fn exchange(
    target: &SocketAddr,
    timeout: Duration,
    bytes: &[u8],
    connect_ns: &mut [u64; 2],
) -> Result<String, String> {
    use std::io::Write as _;
    let mut s = connect(target, timeout, connect_ns)?;
    s.write_all(bytes)
        .map_err(|e| error_key(&e, "write_timeout"))?;
    s.shutdown(std::net::Shutdown::Write)
        .map_err(|e| error_key(&e, "write_timeout"))?;
    let mut got = Vec::with_capacity(bytes.len());
    s.read_to_end(&mut got)
        .map_err(|e| error_key(&e, "read_timeout"))?;
    if got == bytes {
        return Ok("echoed".into());
    }
    let start: String = got
        .iter()
        .take(40)
        .flat_map(|b| b.escape_ascii())
        .map(char::from)
        .collect();
    Ok(format!("altered: {} bytes: {start}", got.len()))
}

/// A blocking connect() and an immediate close() that sends RST (no TIME_WAIT left behind).
fn connect_close(target: &SocketAddr, connect_ns: &mut [u64; 2]) -> Result<String, String> {
    use std::os::fd::AsRawFd as _;
    connect_ns[0] = monotonic_ns();
    let connected = TcpStream::connect(target);
    connect_ns[1] = monotonic_ns();
    let s = connected.map_err(|e| error_key(&e, "connect_timeout"))?;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket we own, with a correctly sized option value.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    Ok("connected".to_string())
}

fn create_ready_file(f: &std::path::Path) {
    if let Err(e) = std::fs::write(f, b"") {
        eprintln!("kmesh-probe: cannot create ready file {}: {e}", f.display());
    }
}

fn run(o: &Opts) -> ProbeReport {
    let mut r = ProbeReport::default();
    let start = Instant::now();
    loop {
        if o.count.is_some_and(|c| r.attempts >= c)
            || o.duration.is_some_and(|d| start.elapsed() >= d)
            || o.until_file.as_ref().is_some_and(|f| f.exists())
        {
            break;
        }
        r.attempts += 1;
        let mut connect_ns = [0u64; 2];
        let result = if o.connect_only {
            connect_close(&o.target, &mut connect_ns)
        } else if let Some(bytes) = &o.send {
            exchange(&o.target, o.timeout, bytes, &mut connect_ns)
        } else {
            attempt(&o.target, o.timeout, &mut connect_ns)
        };
        match &result {
            Ok(reply) => {
                r.ok += 1;
                *r.by_reply.entry(reply.clone()).or_default() += 1;
            }
            Err(key) => {
                r.failed += 1;
                *r.errors.entry(key.clone()).or_default() += 1;
            }
        }
        if o.timeline {
            let outcome = match result {
                Ok(reply) => Outcome::Reply(reply),
                Err(key) => Outcome::Error(key),
            };
            r.timeline.push(TimedAttempt {
                connect_ns,
                outcome,
            });
        }
        if let (1, Some(f)) = (r.attempts, &o.ready_file) {
            create_ready_file(f);
        }
        if !o.interval.is_zero() {
            std::thread::sleep(o.interval);
        }
    }
    r.elapsed_ms = start.elapsed().as_millis() as u64;
    r.elapsed_us = start.elapsed().as_micros() as u64;
    r
}

fn main() -> ExitCode {
    let opts = match parse_args(std::env::args().skip(1)) {
        Ok(o) => o,
        Err(msg) => {
            if msg.is_empty() {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            eprintln!("kmesh-probe: {msg}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let report = run(&opts);
    match serde_json::to_string(&report) {
        Ok(s) => {
            println!("{s}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("kmesh-probe: cannot serialize report: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Opts, String> {
        parse_args(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn parses_targets_and_families() {
        let o = p(&["--target", "10.0.0.1:80"]).unwrap();
        assert_eq!(o.target, "10.0.0.1:80".parse().unwrap());
        assert_eq!(o.count, Some(1));
        let o = p(&["--target", "10.0.0.1:80", "--socket", "v6", "--count", "3"]).unwrap();
        assert_eq!(o.target, "[::ffff:10.0.0.1]:80".parse().unwrap());
        assert_eq!(o.count, Some(3));
        let o = p(&["--target", "[fd00::1]:8080", "--until-file", "/x"]).unwrap();
        assert_eq!(
            o.target.ip(),
            "fd00::1".parse::<std::net::IpAddr>().unwrap()
        );
        assert_eq!(o.count, None);
        assert!(!o.timeline);
        assert!(
            p(&["--target", "10.0.0.1:80", "--timeline"])
                .unwrap()
                .timeline
        );
        assert!(p(&["--target", "[fd00::1]:80", "--socket", "v4"]).is_err());
        assert!(p(&["--count", "3"]).is_err());
        assert!(p(&["--target", "1.2.3.4"]).is_err());
        assert!(p(&["--target", "1.2.3.4:1", "--bogus"]).is_err());
    }

    #[test]
    fn send_file_is_read_once_at_parse() {
        let file = std::env::temp_dir().join(format!("kmt-probe-send-{}", std::process::id()));
        std::fs::write(&file, b"\x00GET\xff").unwrap();
        let path = file.to_string_lossy().into_owned();
        let o = p(&["--target", "10.0.0.1:80", "--send-file", &path]);
        let _ = std::fs::remove_file(&file);
        assert_eq!(o.unwrap().send.as_deref(), Some(&b"\x00GET\xff"[..]));
        assert!(p(&["--target", "10.0.0.1:80", "--send-file", &path]).is_err());
    }

    #[test]
    fn error_keys() {
        let e = io::Error::from_raw_os_error(libc::ENETUNREACH);
        assert_eq!(error_key(&e, "t"), "ENETUNREACH");
        let e = io::Error::from_raw_os_error(libc::EAGAIN);
        assert_eq!(error_key(&e, "read_timeout"), "read_timeout");
        let e = io::Error::new(io::ErrorKind::TimedOut, "x");
        assert_eq!(error_key(&e, "connect_timeout"), "connect_timeout");
    }
}
