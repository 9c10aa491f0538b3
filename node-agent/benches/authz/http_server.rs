//! A tiny HTTP/1.1 server for the wrk runs, listening inside a pod's network namespace (so the
//! pod's sk_lookup program judges its connections) and served by threads of the benchmark. Every
//! request gets `200` and a 2-byte body (`ok`, or the tag it is started with, e.g. a version); a
//! request with `Connection: close` gets its answer and then the connection is closed, any other
//! keeps it open for the next request. It counts the requests it answered.
use std::{
    io::{self, Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use kmesh_tests::Pod;

/// Serving threads: each handles one connection at a time, so this bounds the wrk connections.
pub const WORKERS: usize = 8;

pub struct HttpServer {
    listener: Arc<TcpListener>,
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
    workers: Vec<JoinHandle<()>>,
}

/// The two answers, with the server's body.
struct Responses {
    keep_alive: Vec<u8>,
    close: Vec<u8>,
}

impl HttpServer {
    /// Listens on 0.0.0.0:`port` in `pod`'s namespace, [`WORKERS`] threads, body `ok`.
    pub fn start(pod: &Pod, port: u16) -> io::Result<HttpServer> {
        HttpServer::start_tagged(pod, port, WORKERS, *b"ok")
    }

    /// Listens on 0.0.0.0:`port` in `pod`'s namespace with `workers` threads (one connection
    /// each: proxies that keep idle connections to it need more than wrk's), answering `tag`.
    pub fn start_tagged(
        pod: &Pod,
        port: u16,
        workers: usize,
        tag: [u8; 2],
    ) -> io::Result<HttpServer> {
        let listener = Arc::new(
            pod.run_in(|| TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))))?,
        );
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicU64::new(0));
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n";
        let responses = Arc::new(Responses {
            keep_alive: [&head[..], b"\r\n", &tag].concat(),
            close: [&head[..], b"Connection: close\r\n\r\n", &tag].concat(),
        });
        let workers = (0..workers)
            .map(|i| {
                let (listener, stop) = (listener.clone(), stop.clone());
                let (answered, responses) = (answered.clone(), responses.clone());
                thread::Builder::new()
                    .name(format!("kmt-http-{i}"))
                    .spawn(move || serve(&listener, &stop, &answered, &responses))
            })
            .collect::<io::Result<_>>()?;
        Ok(HttpServer {
            listener,
            stop,
            answered,
            workers,
        })
    }

    /// The requests answered so far.
    #[allow(
        dead_code,
        reason = "read by the waypoint benchmark; the other benchmarks include this file too"
    )]
    pub fn answered(&self) -> u64 {
        self.answered.load(Ordering::SeqCst)
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // shutdown() of a listening socket wakes every thread blocked in accept() (EINVAL).
        // SAFETY: shutdown on a socket this server owns.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn serve(listener: &TcpListener, stop: &AtomicBool, answered: &AtomicU64, responses: &Responses) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((conn, _)) => {
                let _ = handle(conn, stop, answered, responses);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) if stop.load(Ordering::SeqCst) => return,
            // ECONNABORTED and the like: keep serving.
            Err(_) => {}
        }
    }
}

/// Answers the requests of one connection until the client closes it or asks to.
fn handle(
    mut conn: TcpStream,
    stop: &AtomicBool,
    answered: &AtomicU64,
    responses: &Responses,
) -> io::Result<()> {
    // The timeout only lets an idle keep-alive connection notice the stop flag.
    conn.set_read_timeout(Some(Duration::from_millis(500)))?;
    let mut buf = [0u8; 4096];
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let n = match conn.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) && !stop.load(Ordering::SeqCst) =>
            {
                continue;
            }
            Err(e) => return Err(e),
        };
        pending.extend_from_slice(&buf[..n]);
        while let Some(end) = find(&pending, b"\r\n\r\n") {
            let request = pending.drain(..end + 4).collect::<Vec<u8>>();
            answered.fetch_add(1, Ordering::Relaxed);
            if asks_to_close(&request) {
                conn.write_all(&responses.close)?;
                let _ = conn.shutdown(Shutdown::Write);
                return Ok(());
            }
            conn.write_all(&responses.keep_alive)?;
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn asks_to_close(request: &[u8]) -> bool {
    String::from_utf8_lossy(request)
        .to_ascii_lowercase()
        .contains("\r\nconnection: close")
}
