//! `kmesh-http`: sends HTTP requests (HTTP/1.1, or h2c with prior knowledge) to a target and prints
//! one JSON line (`kmesh_tests::http_probe::HttpReport`): the answers by status and by the
//! answering echo server's version, the failures, and latency percentiles. Run inside a pod netns
//! (and a test cgroup) like `kmesh-probe`, so that its connects go through the kernel programs.
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;
use hyper::client::conn::{http1, http2};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use kmesh_tests::http_probe::{HttpReport, Latency, VERSION_HEADER};
use tokio::net::TcpStream;

const USAGE: &str = "\
usage: kmesh-http --target ADDR:PORT [--count N] [--duration-ms MS] [--until-file PATH]
                  [--concurrency C] [--h2c] [--new-connections] [--header 'name: value' ...]
                  [--path /p?q] [--method GET] [--authority HOST] [--timeout-ms T]
                  [--ready-file PATH] [--keep-body]

  --count            requests in all (default 1 unless --duration-ms or --until-file)
  --concurrency      workers sending at once (default 1); with --h2c they share one connection
                     (concurrent streams) unless --new-connections
  --new-connections  a new connection per request (default: keep-alive)
  --authority        the Host / :authority (default: the target)
  --timeout-ms       per request, connect included (default 5000)
  --keep-body        report the first answer's body and headers";

#[derive(Clone)]
struct Opts {
    target: SocketAddr,
    count: Option<u64>,
    duration: Option<Duration>,
    until_file: Option<PathBuf>,
    concurrency: usize,
    h2c: bool,
    new_connections: bool,
    headers: Vec<(String, String)>,
    path: String,
    method: String,
    authority: Option<String>,
    timeout: Duration,
    ready_file: Option<PathBuf>,
    keep_body: bool,
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<Opts, String> {
    let mut target = None;
    let mut o = Opts {
        target: SocketAddr::from(([0, 0, 0, 0], 0)),
        count: None,
        duration: None,
        until_file: None,
        concurrency: 1,
        h2c: false,
        new_connections: false,
        headers: vec![],
        path: "/".into(),
        method: "GET".into(),
        authority: None,
        timeout: Duration::from_millis(5000),
        ready_file: None,
        keep_body: false,
    };
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--h2c" => o.h2c = true,
            "--new-connections" => o.new_connections = true,
            "--keep-body" => o.keep_body = true,
            _ => {
                let v = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
                let num = |v: &str| v.parse::<u64>().map_err(|e| format!("{flag} {v:?}: {e}"));
                match flag.as_str() {
                    "--target" => {
                        target = Some(v.parse().map_err(|e| format!("--target {v:?}: {e}"))?)
                    }
                    "--count" => o.count = Some(num(&v)?),
                    "--duration-ms" => o.duration = Some(Duration::from_millis(num(&v)?)),
                    "--until-file" => o.until_file = Some(v.into()),
                    "--concurrency" => o.concurrency = num(&v)?.max(1) as usize,
                    "--header" => {
                        let (name, value) = v
                            .split_once(':')
                            .ok_or_else(|| format!("--header {v:?}: not `name: value`"))?;
                        o.headers.push((name.trim().into(), value.trim().into()));
                    }
                    "--path" => o.path = v,
                    "--method" => o.method = v,
                    "--authority" => o.authority = Some(v),
                    "--timeout-ms" => o.timeout = Duration::from_millis(num(&v)?),
                    "--ready-file" => o.ready_file = Some(v.into()),
                    _ => return Err(format!("unknown flag {flag}")),
                }
            }
        }
    }
    o.target = target.ok_or("--target is required")?;
    if o.count.is_none() && o.duration.is_none() && o.until_file.is_none() {
        o.count = Some(1);
    }
    Ok(o)
}

fn main() -> ExitCode {
    let opts = match parse(std::env::args().skip(1)) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("kmesh-http: {e}\n{USAGE}");
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
            eprintln!("kmesh-http: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let report = runtime.block_on(run(opts));
    println!("{}", serde_json::to_string(&report).unwrap_or_default());
    ExitCode::SUCCESS
}

/// What the workers record, merged into the report at the end.
#[derive(Default)]
struct Tally {
    report: HttpReport,
    latencies_us: Vec<u64>,
}

impl Tally {
    fn answered(&mut self, response: &Response<Bytes>, took: Duration, keep_body: bool) {
        self.report.requests += 1;
        *self
            .report
            .by_status
            .entry(response.status().as_u16())
            .or_default() += 1;
        let version = response
            .headers()
            .get(VERSION_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-");
        *self
            .report
            .by_version
            .entry(version.to_string())
            .or_default() += 1;
        self.latencies_us.push(took.as_micros() as u64);
        if keep_body && self.report.first_body.is_none() {
            self.report.first_body = Some(String::from_utf8_lossy(response.body()).into_owned());
            let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for (name, value) in response.headers() {
                headers
                    .entry(name.as_str().into())
                    .or_default()
                    .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
            }
            self.report.first_headers = headers;
        }
    }

    fn failed(&mut self, error: String) {
        self.report.requests += 1;
        *self.report.errors.entry(error).or_default() += 1;
    }
}

/// Connections opened by this process, for [`HttpReport::connections`].
static CONNECTIONS: AtomicU64 = AtomicU64::new(0);

async fn run(opts: Opts) -> HttpReport {
    let started = Instant::now();
    let tally = Arc::new(Mutex::new(Tally::default()));
    let remaining = Arc::new(AtomicU64::new(opts.count.unwrap_or(u64::MAX)));
    let shared_h2 = if opts.h2c && !opts.new_connections {
        connect_h2(&opts).await.ok()
    } else {
        None
    };
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..opts.concurrency {
        let (opts, tally, remaining) = (opts.clone(), tally.clone(), remaining.clone());
        let shared_h2 = shared_h2.clone();
        workers.spawn(async move { worker(opts, tally, remaining, started, shared_h2).await });
    }
    if let Some(path) = &opts.ready_file {
        let _ = std::fs::write(path, b"ready");
    }
    while workers.join_next().await.is_some() {}
    let mut tally = std::mem::take(&mut *tally.lock().unwrap_or_else(|e| e.into_inner()));
    tally.report.latency_ms = Latency::of(std::mem::take(&mut tally.latencies_us));
    tally.report.elapsed_ms = started.elapsed().as_millis() as u64;
    tally.report.connections = CONNECTIONS.load(Ordering::SeqCst);
    tally.report
}

/// A connection a worker keeps between requests.
enum Conn {
    Http1(http1::SendRequest<Empty<Bytes>>),
    Http2(http2::SendRequest<Empty<Bytes>>),
}

fn more(opts: &Opts, remaining: &AtomicU64, started: Instant) -> bool {
    if opts.duration.is_some_and(|d| started.elapsed() >= d) {
        return false;
    }
    if opts.until_file.as_ref().is_some_and(|p| p.exists()) {
        return false;
    }
    remaining
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

async fn worker(
    opts: Opts,
    tally: Arc<Mutex<Tally>>,
    remaining: Arc<AtomicU64>,
    started: Instant,
    shared_h2: Option<http2::SendRequest<Empty<Bytes>>>,
) {
    let mut kept: Option<Conn> = shared_h2.map(Conn::Http2);
    while more(&opts, &remaining, started) {
        let t0 = Instant::now();
        let outcome = tokio::time::timeout(opts.timeout, one_request(&opts, &mut kept)).await;
        let mut tally = tally.lock().unwrap_or_else(|e| e.into_inner());
        match outcome {
            Ok(Ok(response)) => tally.answered(&response, t0.elapsed(), opts.keep_body),
            Ok(Err(e)) => {
                tally.failed(e);
                kept = None;
            }
            Err(_) => {
                tally.failed("timeout".into());
                kept = None;
            }
        }
        if opts.new_connections {
            kept = None;
        }
    }
}

async fn one_request(opts: &Opts, kept: &mut Option<Conn>) -> Result<Response<Bytes>, String> {
    if kept.is_none() {
        *kept = Some(if opts.h2c {
            Conn::Http2(connect_h2(opts).await?)
        } else {
            Conn::Http1(connect_h1(opts).await?)
        });
    }
    let authority = opts
        .authority
        .clone()
        .unwrap_or_else(|| opts.target.to_string());
    let response = match kept.as_mut() {
        Some(Conn::Http1(send)) => {
            let request = build(opts, &opts.path, &authority)?;
            send.ready().await.map_err(|e| format!("request: {e}"))?;
            send.send_request(request).await
        }
        Some(Conn::Http2(send)) => {
            let uri = format!("http://{authority}{}", opts.path);
            let request = build(opts, &uri, &authority)?;
            send.ready().await.map_err(|e| format!("request: {e}"))?;
            send.send_request(request).await
        }
        None => return Err("request: no connection".into()),
    }
    .map_err(|e| format!("request: {e}"))?;
    let (parts, body) = response.into_parts();
    let body = body
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    Ok(Response::from_parts(parts, body))
}

fn build(opts: &Opts, uri: &str, authority: &str) -> Result<Request<Empty<Bytes>>, String> {
    let mut builder = Request::builder().method(opts.method.as_str()).uri(uri);
    if !opts.h2c {
        builder = builder.header(hyper::header::HOST, authority);
    }
    for (name, value) in &opts.headers {
        builder = builder.header(name, value);
    }
    builder
        .body(Empty::new())
        .map_err(|e| format!("request: {e}"))
}

async fn connect_h1(opts: &Opts) -> Result<http1::SendRequest<Empty<Bytes>>, String> {
    let stream = TcpStream::connect(opts.target)
        .await
        .map_err(|e| format!("connect: {}", e.kind()))?;
    CONNECTIONS.fetch_add(1, Ordering::SeqCst);
    let _ = stream.set_nodelay(true);
    let (send, conn) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    tokio::spawn(conn);
    Ok(send)
}

async fn connect_h2(opts: &Opts) -> Result<http2::SendRequest<Empty<Bytes>>, String> {
    let stream = TcpStream::connect(opts.target)
        .await
        .map_err(|e| format!("connect: {}", e.kind()))?;
    CONNECTIONS.fetch_add(1, Ordering::SeqCst);
    let _ = stream.set_nodelay(true);
    let (send, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    tokio::spawn(conn);
    Ok(send)
}
