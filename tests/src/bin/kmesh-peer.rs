//! `kmesh-peer`: both ends of TCP connections with exact byte counts, for the connection-event
//! tests. Run inside a pod netns and a test cgroup (like `kmesh-probe`), so that its sockets, the
//! server's accepted ones too, are seen by the programs attached there.
//!
//! The exchange of one connection: the client sends `--send-bytes` bytes; in `--close fin` mode it
//! then shuts its side down, the server reads to the end, answers `--reply-bytes` bytes and closes,
//! and the client reads to the end and closes (an orderly close both ways). In `--close rst` mode
//! the client waits until the server has read everything, then closes with SO_LINGER 0 (a RST); the
//! server sees the reset and closes without answering.
//!
//! Prints one JSON line (`kmesh_tests::peer::PeerReport`): per connection, the client's or the
//! server's view (local and peer address, bytes sent and received, the error if any).
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use kmesh_tests::peer::{PeerConnection, PeerReport};

const USAGE: &str = "\
usage: kmesh-peer serve --port P [--reply-bytes M] --count K [--ready-file PATH]
       kmesh-peer connect --target ADDR:PORT [--send-bytes N] [--count K] [--close fin|rst]";

struct Opts {
    serve: bool,
    port: u16,
    target: Option<SocketAddr>,
    send: usize,
    reply: usize,
    count: u64,
    rst: bool,
    ready_file: Option<PathBuf>,
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<Opts, String> {
    let serve = match args.next().as_deref() {
        Some("serve") => true,
        Some("connect") => false,
        _ => return Err(String::new()),
    };
    let mut o = Opts {
        serve,
        port: 0,
        target: None,
        send: 0,
        reply: 0,
        count: 1,
        rst: false,
        ready_file: None,
    };
    while let Some(flag) = args.next() {
        let v = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {v:?}: {e}");
        match flag.as_str() {
            "--port" => o.port = v.parse().map_err(|e| bad(&e))?,
            "--target" => o.target = Some(v.parse().map_err(|e| bad(&e))?),
            "--send-bytes" => o.send = v.parse().map_err(|e| bad(&e))?,
            "--reply-bytes" => o.reply = v.parse().map_err(|e| bad(&e))?,
            "--count" => o.count = v.parse().map_err(|e| bad(&e))?,
            "--close" => {
                o.rst = match v.as_str() {
                    "fin" => false,
                    "rst" => true,
                    _ => return Err(bad(&"fin or rst")),
                }
            }
            "--ready-file" => o.ready_file = Some(PathBuf::from(v)),
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    Ok(o)
}

fn main() -> ExitCode {
    let opts = match parse(std::env::args().skip(1)) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let result = if opts.serve {
        serve(&opts)
    } else {
        connect_all(&opts)
    };
    match result {
        Ok(report) => {
            println!(
                "{}",
                serde_json::to_string(&report).expect("a report serializes")
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("kmesh-peer: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(o: &Opts) -> io::Result<PeerReport> {
    let listener = TcpListener::bind(("0.0.0.0", o.port))?;
    if let Some(ready) = &o.ready_file {
        std::fs::write(ready, b"")?;
    }
    let mut connections = Vec::new();
    for _ in 0..o.count {
        let (mut stream, peer) = listener.accept()?;
        let mut c = PeerConnection {
            local: stream.local_addr()?.to_string(),
            peer: peer.to_string(),
            ..PeerConnection::default()
        };
        match read_to_end(&mut stream, &mut c.received) {
            Ok(()) => {
                stream.write_all(&vec![b's'; o.reply])?;
                c.sent = o.reply as u64;
            }
            Err(e) => c.error = Some(errno_name(&e)),
        }
        drop(stream);
        connections.push(c);
    }
    Ok(PeerReport { connections })
}

fn connect_all(o: &Opts) -> io::Result<PeerReport> {
    let target = o
        .target
        .ok_or_else(|| io::Error::other("connect needs --target"))?;
    let connections = (0..o.count).map(|_| connect(target, o)).collect();
    Ok(PeerReport { connections })
}

fn connect(target: SocketAddr, o: &Opts) -> PeerConnection {
    let mut c = PeerConnection::default();
    let mut stream = match TcpStream::connect_timeout(&target, Duration::from_secs(2)) {
        Ok(s) => s,
        Err(e) => {
            c.error = Some(errno_name(&e));
            return c;
        }
    };
    c.local = stream
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    c.peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    if let Err(e) = exchange(&mut stream, o, &mut c) {
        c.error = Some(errno_name(&e));
    }
    c
}

fn exchange(stream: &mut TcpStream, o: &Opts, c: &mut PeerConnection) -> io::Result<()> {
    stream.write_all(&vec![b'c'; o.send])?;
    c.sent = o.send as u64;
    if o.rst {
        // Every byte acknowledged before the RST (so the counts are exact): wait until the send
        // queue is empty (SIOCOUTQ), then close with SO_LINGER 0.
        wait_acked(stream)?;
        set_linger_zero(stream)?;
        return Ok(());
    }
    stream.shutdown(Shutdown::Write)?;
    read_to_end(stream, &mut c.received)
}

fn read_to_end(stream: &mut TcpStream, received: &mut u64) -> io::Result<()> {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut buf)? {
            0 => return Ok(()),
            n => *received += n as u64,
        }
    }
}

/// Waits until every byte written was acknowledged (the unacknowledged count, SIOCOUTQ, is 0).
fn wait_acked(stream: &TcpStream) -> io::Result<()> {
    for _ in 0..2000 {
        let mut unacked: libc::c_int = 0;
        // SAFETY: SIOCOUTQ (= TIOCOUTQ) writes one int into the pointer we own.
        if unsafe { libc::ioctl(stream.as_raw_fd(), libc::TIOCOUTQ, &mut unacked) } != 0 {
            return Err(io::Error::last_os_error());
        }
        if unacked == 0 {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Err(io::Error::other("data still unacknowledged after 2 s"))
}

fn set_linger_zero(stream: &TcpStream) -> io::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid fd, pointer and length of a struct linger.
    let r = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn errno_name(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => "ECONNREFUSED".into(),
        Some(libc::ECONNRESET) => "ECONNRESET".into(),
        Some(libc::ENETUNREACH) => "ENETUNREACH".into(),
        Some(libc::ETIMEDOUT) => "ETIMEDOUT".into(),
        _ => e.to_string(),
    }
}
