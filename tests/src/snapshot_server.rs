//! A loopback HTTP server that speaks the agent–operator snapshot contract
//! (`kmesh_snapshot::contract`): `GET /v1/nodes/{node}/snapshot?wait=Ns` with `If-None-Match`,
//! answering `200` with an `ETag` or, after holding the request, `304`.
//!
//! The operator's real server (`kmesh-operator`, tested end to end in `operator_end_to_end.rs`)
//! serves the same contract. This stand-in is small and controllable: it can fail requests on
//! purpose, to test the agent's retries, answer `410 Gone` (the contract's uninstall) with or
//! without waking the requests it holds, answer an agent that names the snapshot it holds in
//! `since` with a delta a test publishes, and it records what each request carried (ETag, token,
//! live generation, `since`) and whether it was answered with a delta. Its ETags are whatever a test publishes, which also checks that the agent
//! treats them as opaque (the operator's are `contract::etag`).
use std::{
    io::{self, BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{Arc, Condvar, Mutex},
    thread,
    time::Duration,
};

use kmesh_snapshot::contract;

/// What the server saw of one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeenRequest {
    pub path: String,
    /// What follows the `?` (empty without one).
    pub query: String,
    pub if_none_match: Option<String>,
    pub authorization: Option<String>,
    /// The `Kmesh-Live-Generation` the agent reported.
    pub live_generation: Option<u64>,
    pub status: u16,
    /// Answered with a delta rather than the snapshot.
    pub delta: bool,
}

#[derive(Default)]
struct State {
    /// (etag, body) per node.
    snapshots: std::collections::BTreeMap<String, (String, Vec<u8>)>,
    /// Per node: the cluster hash a delta applies to, and the delta, sent for the snapshot of
    /// `snapshots` to an agent whose `since` names that hash.
    deltas: std::collections::BTreeMap<String, (u64, Vec<u8>)>,
    /// Requests to answer with 503 before serving again.
    fail_next: u32,
    /// When set, requests must carry `Authorization: Bearer <token>`.
    token: Option<String>,
    seen: Vec<SeenRequest>,
    stopped: bool,
    /// Answer `410 Gone` (`contract::UNINSTALL_STATUS`) to every snapshot request.
    gone: bool,
    /// Held requests end at once when `gone` is set (otherwise when their hold ends).
    gone_wakes: bool,
}

/// The server; stops accepting when dropped.
pub struct SnapshotServer {
    addr: SocketAddr,
    state: Arc<(Mutex<State>, Condvar)>,
}

impl SnapshotServer {
    /// `hold`: how long a request whose ETag is current is held before `304` (at most the
    /// client's `wait`, as the contract says; tests keep it short).
    pub fn start(hold: Duration) -> io::Result<SnapshotServer> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let state: Arc<(Mutex<State>, Condvar)> = Arc::default();
        let accept_state = state.clone();
        thread::spawn(move || {
            for stream in listener.incoming() {
                if accept_state.0.lock().map(|s| s.stopped).unwrap_or(true) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                let state = accept_state.clone();
                thread::spawn(move || {
                    let _ = serve(stream, &state, hold);
                });
            }
        });
        Ok(SnapshotServer { addr, state })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Publishes `bytes` for `node` under `etag`, waking held requests.
    pub fn publish(&self, node: &str, etag: &str, bytes: Vec<u8>) {
        let (lock, cv) = &*self.state;
        let mut st = lock.lock().unwrap_or_else(|p| p.into_inner());
        st.snapshots
            .insert(node.to_string(), (format!("\"{etag}\""), bytes));
        st.deltas.remove(node);
        cv.notify_all();
    }

    /// Publishes `bytes` as [`publish`](Self::publish) does, and `delta` (from the snapshot whose
    /// format 4 cluster hash is `since`) for the agents that name that hash.
    pub fn publish_with_delta(
        &self,
        node: &str,
        etag: &str,
        bytes: Vec<u8>,
        since: u64,
        delta: Vec<u8>,
    ) {
        let (lock, cv) = &*self.state;
        let mut st = lock.lock().unwrap_or_else(|p| p.into_inner());
        st.snapshots
            .insert(node.to_string(), (format!("\"{etag}\""), bytes));
        st.deltas.insert(node.to_string(), (since, delta));
        cv.notify_all();
    }

    pub fn fail_next(&self, n: u32) {
        self.state
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .fail_next = n;
    }

    /// From now on, answers every snapshot request `410 Gone`: the node's agents are being removed.
    /// `wake`: held long polls answer at once too; otherwise they answer when their hold ends (so
    /// that only a new request, such as a stopping agent's, hears it soon).
    pub fn uninstall(&self, wake: bool) {
        let (lock, cv) = &*self.state;
        let mut st = lock.lock().unwrap_or_else(|p| p.into_inner());
        st.gone = true;
        st.gone_wakes = wake;
        cv.notify_all();
    }

    pub fn require_token(&self, token: &str) {
        self.state.0.lock().unwrap_or_else(|p| p.into_inner()).token = Some(token.to_string());
    }

    pub fn seen(&self) -> Vec<SeenRequest> {
        self.state
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .seen
            .clone()
    }
}

impl Drop for SnapshotServer {
    fn drop(&mut self) {
        let (lock, cv) = &*self.state;
        lock.lock().unwrap_or_else(|p| p.into_inner()).stopped = true;
        cv.notify_all();
        // Wake the accept loop so it sees `stopped`.
        let _ = TcpStream::connect(self.addr);
    }
}

/// What the server reads of a request.
struct Incoming {
    path: String,
    query: String,
    if_none_match: Option<String>,
    authorization: Option<String>,
    live_generation: Option<u64>,
}

/// A response: status, ETag, body, and whether the body is a delta.
type Answer = (u16, Option<String>, Vec<u8>, bool);

fn serve(stream: TcpStream, state: &(Mutex<State>, Condvar), hold: Duration) -> io::Result<()> {
    let request = read_request(&stream)?;
    let hold = hold.min(contract::parse_wait(&request.query).unwrap_or(Duration::ZERO));
    let (status, etag, body, delta) = answer(&request, state, hold);
    write_response(stream, status, etag, &body, delta)
}

fn read_request(stream: &TcpStream) -> io::Result<Incoming> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let target = request_line.split_whitespace().nth(1).unwrap_or("");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut request = Incoming {
        path: path.to_string(),
        query: query.to_string(),
        if_none_match: None,
        authorization: None,
        live_generation: None,
    };
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.trim_end().split_once(':') {
            let value = value.trim();
            match name.to_ascii_lowercase().as_str() {
                "if-none-match" => request.if_none_match = Some(value.to_string()),
                "authorization" => request.authorization = Some(value.to_string()),
                name if name == contract::LIVE_GENERATION_HEADER => {
                    request.live_generation = value.parse().ok()
                }
                _ => {}
            }
        }
    }
    Ok(request)
}

/// Decides the answer (holding a long poll while the client's ETag is current) and records it.
fn answer(request: &Incoming, state: &(Mutex<State>, Condvar), hold: Duration) -> Answer {
    let (lock, cv) = state;
    let if_none_match = request.if_none_match.as_ref();
    let mut st = lock.lock().unwrap_or_else(|p| p.into_inner());
    let answer: Answer = if st.fail_next > 0 {
        st.fail_next -= 1;
        (503, None, b"failing on purpose\n".to_vec(), false)
    } else if st
        .token
        .as_ref()
        .is_some_and(|t| request.authorization.as_deref() != Some(&format!("Bearer {t}")))
    {
        (401, None, b"bad token\n".to_vec(), false)
    } else if let Some(node) = contract::node_of_snapshot_path(&request.path) {
        let current = |st: &State| st.snapshots.get(node).cloned();
        if !st.gone {
            let (guard, _) = cv
                .wait_timeout_while(st, hold, |st| {
                    let ends = st.stopped || (st.gone && st.gone_wakes);
                    !ends && current(st).is_some_and(|(etag, _)| Some(&etag) == if_none_match)
                })
                .unwrap_or_else(|p| p.into_inner());
            st = guard;
        }
        let since = contract::parse_since(&request.query);
        let delta = st
            .deltas
            .get(node)
            .filter(|(base, _)| Some(*base) == since)
            .map(|(_, delta)| delta.clone());
        match current(&st) {
            _ if st.gone => (
                contract::UNINSTALL_STATUS,
                None,
                b"uninstalling\n".to_vec(),
                false,
            ),
            Some((etag, _)) if Some(&etag) == if_none_match => (304, Some(etag), vec![], false),
            Some((etag, _)) if delta.is_some() => {
                (200, Some(etag), delta.unwrap_or_default(), true)
            }
            Some((etag, bytes)) => (200, Some(etag), bytes, false),
            None => (404, None, b"unknown node\n".to_vec(), false),
        }
    } else {
        (404, None, b"not found\n".to_vec(), false)
    };
    st.seen.push(SeenRequest {
        path: request.path.clone(),
        query: request.query.clone(),
        if_none_match: request.if_none_match.clone(),
        authorization: request.authorization.clone(),
        live_generation: request.live_generation,
        status: answer.0,
        delta: answer.3,
    });
    answer
}

fn write_response(
    mut out: TcpStream,
    status: u16,
    etag: Option<String>,
    body: &[u8],
    delta: bool,
) -> io::Result<()> {
    let reason = match status {
        200 => "OK",
        304 => "Not Modified",
        401 => "Unauthorized",
        404 => "Not Found",
        410 => "Gone",
        _ => "Service Unavailable",
    };
    write!(
        out,
        "HTTP/1.1 {status} {reason}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    )?;
    if let Some(etag) = etag {
        write!(out, "ETag: {etag}\r\n")?;
    }
    let media = if delta {
        contract::DELTA_MEDIA_TYPE
    } else {
        contract::MEDIA_TYPE
    };
    write!(out, "Content-Type: {media}\r\n\r\n")?;
    out.write_all(body)?;
    out.flush()
}
