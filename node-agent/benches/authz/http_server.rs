//! A tiny HTTP/1.1 server for the wrk runs, listening inside a pod's network namespace (so the
//! pod's sk_lookup program judges its connections) and served by threads of the benchmark. Every
//! request gets `200 ok`; a request with `Connection: close` gets its answer and then the
//! connection is closed, any other keeps it open for the next request.
use std::{
    io::{self, Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use kmesh_tests::Pod;

/// Serving threads: each handles one connection at a time, so this bounds the wrk connections.
pub const WORKERS: usize = 8;
const RESPONSE_KEEP_ALIVE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
const RESPONSE_CLOSE: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok";

pub struct HttpServer {
    listener: Arc<TcpListener>,
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<()>>,
}

impl HttpServer {
    /// Listens on 0.0.0.0:`port` in `pod`'s namespace.
    pub fn start(pod: &Pod, port: u16) -> io::Result<HttpServer> {
        let listener = Arc::new(
            pod.run_in(|| TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))))?,
        );
        let stop = Arc::new(AtomicBool::new(false));
        let workers = (0..WORKERS)
            .map(|i| {
                let (listener, stop) = (listener.clone(), stop.clone());
                thread::Builder::new()
                    .name(format!("kmt-http-{i}"))
                    .spawn(move || serve(&listener, &stop))
            })
            .collect::<io::Result<_>>()?;
        Ok(HttpServer {
            listener,
            stop,
            workers,
        })
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

fn serve(listener: &TcpListener, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((conn, _)) => {
                let _ = handle(conn, stop);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) if stop.load(Ordering::SeqCst) => return,
            // ECONNABORTED and the like: keep serving.
            Err(_) => {}
        }
    }
}

/// Answers the requests of one connection until the client closes it or asks to.
fn handle(mut conn: TcpStream, stop: &AtomicBool) -> io::Result<()> {
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
            if asks_to_close(&request) {
                conn.write_all(RESPONSE_CLOSE)?;
                let _ = conn.shutdown(Shutdown::Write);
                return Ok(());
            }
            conn.write_all(RESPONSE_KEEP_ALIVE)?;
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
