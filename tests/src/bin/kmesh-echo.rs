//! `kmesh-echo`: an HTTP server for the L7 tests, HTTP/1.1 and h2c (prior knowledge) on the same
//! port. Every answer carries the server's `--version` in `x-echo-version` and, as a JSON body
//! (`kmesh_tests::http_probe::EchoBody`), the method, path, authority and headers it received, so
//! that a test sees where a request went and what reached it. Request headers steer it: see the
//! constants of `kmesh_tests::http_probe`. `--delay-ms` makes every answer wait (a slow server, e.g.
//! a mirror target whose slowness a client must never see). `--tcp-echo` also listens for raw TCP
//! and sends back every byte it reads, unaltered, until the client half-closes (a TCP service
//! behind the waypoint). Run inside a pod netns.
use std::collections::{BTreeMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt as _, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use kmesh_tests::http_probe::{
    COUNT_PATH, DELAY_HEADER, EchoBody, EchoCount, FAIL_FIRST_HEADER, STATUS_HEADER, VERSION_HEADER,
};
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpListener;

const USAGE: &str = "\
usage: kmesh-echo --listen ADDR:PORT [--listen ADDR:PORT ...] --version NAME [--ready-file PATH]
                  [--delay-ms MS] [--tcp-echo ADDR:PORT ...]";

struct Opts {
    listen: Vec<SocketAddr>,
    version: String,
    ready_file: Option<PathBuf>,
    /// Every HTTP answer waits this long (after being counted).
    delay: Duration,
    /// Raw TCP echo listeners.
    tcp_echo: Vec<SocketAddr>,
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<Opts, String> {
    let mut o = Opts {
        listen: vec![],
        version: String::new(),
        ready_file: None,
        delay: Duration::ZERO,
        tcp_echo: vec![],
    };
    while let Some(flag) = args.next() {
        let v = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--listen" => o
                .listen
                .push(v.parse().map_err(|e| format!("--listen {v:?}: {e}"))?),
            "--version" => o.version = v,
            "--ready-file" => o.ready_file = Some(v.into()),
            "--delay-ms" => {
                o.delay =
                    Duration::from_millis(v.parse().map_err(|e| format!("--delay-ms {v:?}: {e}"))?)
            }
            "--tcp-echo" => o
                .tcp_echo
                .push(v.parse().map_err(|e| format!("--tcp-echo {v:?}: {e}"))?),
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if o.listen.is_empty() || o.version.is_empty() {
        return Err("--listen and --version are required".into());
    }
    Ok(o)
}

/// What every connection of the server shares.
struct Server {
    version: String,
    delay: Duration,
    answered: AtomicU64,
    failed_once: Mutex<HashSet<String>>,
}

fn main() -> ExitCode {
    let opts = match parse(std::env::args().skip(1)) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("kmesh-echo: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kmesh-echo: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kmesh-echo: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(opts: Opts) -> Result<(), String> {
    let server = Arc::new(Server {
        version: opts.version,
        delay: opts.delay,
        answered: AtomicU64::new(0),
        failed_once: Mutex::new(HashSet::new()),
    });
    let mut listeners = vec![];
    for addr in &opts.listen {
        listeners.push(
            TcpListener::bind(addr)
                .await
                .map_err(|e| format!("bind {addr}: {e}"))?,
        );
    }
    let mut tcp_listeners = vec![];
    for addr in &opts.tcp_echo {
        tcp_listeners.push(
            TcpListener::bind(addr)
                .await
                .map_err(|e| format!("bind {addr}: {e}"))?,
        );
    }
    if let Some(path) = &opts.ready_file {
        std::fs::write(path, b"ready").map_err(|e| format!("{}: {e}", path.display()))?;
    }
    let mut tasks = tokio::task::JoinSet::new();
    for listener in listeners {
        tasks.spawn(accept_loop(listener, server.clone()));
    }
    for listener in tcp_listeners {
        tasks.spawn(tcp_echo_loop(listener));
    }
    while let Some(done) = tasks.join_next().await {
        done.map_err(|e| e.to_string())??;
    }
    Ok(())
}

async fn accept_loop(listener: TcpListener, server: Arc<Server>) -> Result<(), String> {
    loop {
        let (stream, peer) = listener
            .accept()
            .await
            .map_err(|e| format!("accept: {e}"))?;
        let server = server.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let server = server.clone();
                async move { Ok::<_, Infallible>(answer(&server, request, peer).await) }
            });
            // Errors of one connection (a client that went away) end that connection only.
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Raw TCP: every byte read is written back, until the client half-closes; then this side closes.
async fn tcp_echo_loop(listener: TcpListener) -> Result<(), String> {
    loop {
        let (stream, _) = listener
            .accept()
            .await
            .map_err(|e| format!("accept: {e}"))?;
        tokio::spawn(async move {
            let (mut read, mut write) = stream.into_split();
            if tokio::io::copy(&mut read, &mut write).await.is_ok() {
                let _ = write.shutdown().await;
            }
        });
    }
}

async fn answer(
    server: &Server,
    request: Request<Incoming>,
    peer: SocketAddr,
) -> Response<Full<Bytes>> {
    let (parts, body) = request.into_parts();
    // Read the whole request body so that the client's send completes.
    let _ = body.collect().await;
    if parts.uri.path() == COUNT_PATH {
        let count = EchoCount {
            requests: server.answered.load(Ordering::SeqCst),
        };
        return respond(
            server,
            StatusCode::OK,
            serde_json::to_vec(&count).unwrap_or_default(),
        );
    }
    server.answered.fetch_add(1, Ordering::SeqCst);
    if !server.delay.is_zero() {
        tokio::time::sleep(server.delay).await;
    }
    let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(ms) = header(DELAY_HEADER).and_then(|v| v.parse::<u64>().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let mut status = header(STATUS_HEADER)
        .and_then(|v| v.parse::<u16>().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK);
    if let Some(key) = header(FAIL_FIRST_HEADER) {
        let first = server
            .failed_once
            .lock()
            .map(|mut seen| seen.insert(key.to_string()))
            .unwrap_or(false);
        if first {
            status = StatusCode::SERVICE_UNAVAILABLE;
        }
    }
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in &parts.headers {
        headers
            .entry(name.as_str().to_string())
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    let authority = parts
        .uri
        .authority()
        .map(|a| a.to_string())
        .or_else(|| header("host").map(str::to_string))
        .unwrap_or_default();
    let echo = EchoBody {
        version: server.version.clone(),
        protocol: format!("{:?}", parts.version),
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default(),
        authority,
        headers,
        peer: peer.to_string(),
    };
    respond(
        server,
        status,
        serde_json::to_vec(&echo).unwrap_or_default(),
    )
}

fn respond(server: &Server, status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(&server.version) {
        response.headers_mut().insert(VERSION_HEADER, v);
    }
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}
