//! The snapshot server: each node agent long-polls `GET /v1/nodes/{node}/snapshot` for its node's
//! snapshot (the contract is defined once, in `kmesh_snapshot::contract`); DualEngine's waypoints
//! long-poll `GET /v1/waypoints/{namespace}/{name}/config` for their configuration on the same
//! listener, with the same authenticator (`waypoint_server.rs`).
//!
//! - `200` with the snapshot bytes and an `ETag` naming generation and content hash; `304` when the
//!   agent's `If-None-Match` is still current after holding the request up to `?wait=` (at most
//!   60 s), or names a newer generation than this replica's (it lags behind another replica: it
//!   never sends an agent back); `404` for a node the operator has no snapshot for (yet); `503`
//!   when this replica has not compiled the node's decided content (see [`Published`]), after
//!   holding the request at most [`CATCH_UP`] for it, with `Connection: close` so that the agent
//!   asks again on a new connection, which may reach another replica;
//!   `410 Gone` to every agent while the agents are being removed (`uninstall.rs`), held requests
//!   at once.
//! - Every replica serves the leader's decisions ([`crate::publish`]), so the ETag of a node's
//!   snapshot is the same at every replica: an agent that reaches another replica gets `304`.
//! - Agents authenticate with a bearer token. With TokenReview, the token must be a service-account
//!   token of the agent's service account bound to a pod on the node it asks for (the API server
//!   puts the node name in the review's `authentication.kubernetes.io/node-name` extra): a token of
//!   node A asking for node B gets `403`.
//! - TLS when a certificate is given; the agent checks it against `--operator-ca`.
use std::{
    collections::{BTreeMap, VecDeque},
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use hyper::{
    Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{self, HeaderValue},
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use kmesh_snapshot::{Format, contract};
use tokio::{net::TcpListener, sync::watch};
use tracing::{debug, info, warn};

use crate::metrics::Metrics;
use crate::snapshot_body::{Chunks, SharedCluster, SnapshotBody};
use crate::waypoint_server::{self, WaypointConfigStore};

/// One node's current snapshot: the leader's decision, and its bytes when this replica has
/// compiled that content (`None`: not yet; an agent holding the decision gets `304`, others wait).
#[derive(Clone, Debug)]
pub struct Published {
    pub generation: u64,
    pub content_hash: u64,
    pub body: Option<SnapshotBody>,
}

impl Published {
    pub fn etag(&self) -> String {
        contract::etag(self.generation, self.content_hash)
    }
}

/// What the server serves: the latest snapshot of every node, with change notification; and what
/// each node's agent last reported live, to this replica or (merged in by
/// [`replicas`](crate::replicas)) to another.
#[derive(Clone)]
pub struct SnapshotStore {
    nodes: Arc<Mutex<BTreeMap<String, watch::Sender<Option<Published>>>>>,
    live: Arc<Mutex<BTreeMap<String, u64>>>,
    /// Bumped on every change of `live`.
    live_changed: Arc<watch::Sender<u64>>,
    /// Reports that reached this replica, not yet recorded for the other replicas.
    reported_here: Arc<Mutex<BTreeMap<String, u64>>>,
    /// Whether this replica answers snapshot requests (first compile done, TLS ready).
    ready: Arc<std::sync::atomic::AtomicBool>,
    /// The agents are being removed: every request is answered `410 Gone` (see `uninstall.rs`).
    uninstalling: Arc<watch::Sender<bool>>,
    /// Recent compiles' cluster parts: the bases of deltas.
    clusters: Arc<Mutex<ClusterHistory>>,
    /// The waypoints' configurations (DualEngine), served on their own paths.
    waypoint_configs: WaypointConfigStore,
}

/// How many of the latest compiles' cluster parts are kept for deltas beyond those that published
/// snapshots still hold: an agent asks for a delta from the part it runs, which the compile after
/// it no longer publishes.
const RECENT_CLUSTERS: usize = 3;

/// Cluster parts by their format 4 cluster hash: the last [`RECENT_CLUSTERS`] compiles' held here,
/// any other while something else holds it.
#[derive(Debug, Default)]
struct ClusterHistory {
    recent: VecDeque<Arc<SharedCluster>>,
    any: BTreeMap<u64, Weak<SharedCluster>>,
}

impl Default for SnapshotStore {
    fn default() -> Self {
        SnapshotStore {
            nodes: Arc::default(),
            live: Arc::default(),
            live_changed: Arc::new(watch::channel(0).0),
            reported_here: Arc::default(),
            ready: Arc::default(),
            uninstalling: Arc::new(watch::channel(false).0),
            clusters: Arc::default(),
            waypoint_configs: WaypointConfigStore::default(),
        }
    }
}

impl SnapshotStore {
    /// Starts (`true`) or ends answering every snapshot request `410 Gone`; wakes held requests.
    pub fn set_uninstalling(&self, uninstalling: bool) {
        self.uninstalling.send_replace(uninstalling);
    }

    pub fn uninstalling(&self) -> bool {
        *self.uninstalling.borrow()
    }

    /// The waypoints' configurations: unlike node snapshots, each replica serves its own latest
    /// compile's (see `waypoint_server`).
    pub fn waypoint_configs(&self) -> &WaypointConfigStore {
        &self.waypoint_configs
    }

    fn channel(&self, node: &str) -> watch::Sender<Option<Published>> {
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        nodes
            .entry(node.to_string())
            .or_insert_with(|| watch::channel(None).0)
            .clone()
    }

    /// Keeps `cluster` (a compile's cluster part) as a base agents may take deltas from.
    pub fn remember_cluster(&self, cluster: &Arc<SharedCluster>) {
        let mut history = self.clusters.lock().unwrap_or_else(|p| p.into_inner());
        let hash = cluster.cluster_hash();
        if history
            .recent
            .back()
            .is_some_and(|c| c.cluster_hash() == hash)
        {
            return;
        }
        history.recent.push_back(cluster.clone());
        if history.recent.len() > RECENT_CLUSTERS {
            history.recent.pop_front();
        }
        history.any.retain(|_, c| c.strong_count() > 0);
        history.any.insert(hash, Arc::downgrade(cluster));
    }

    /// The format 4 cluster hash of the newest compile's cluster part.
    pub fn newest_cluster_hash(&self) -> Option<u64> {
        let history = self.clusters.lock().unwrap_or_else(|p| p.into_inner());
        history.recent.back().map(|c| c.cluster_hash())
    }

    /// The cluster part whose format 4 cluster hash is `hash`, if still kept.
    pub fn cluster(&self, hash: u64) -> Option<Arc<SharedCluster>> {
        let history = self.clusters.lock().unwrap_or_else(|p| p.into_inner());
        history.any.get(&hash).and_then(Weak::upgrade)
    }

    /// Makes `published` the node's snapshot and wakes its waiting requests.
    pub fn publish(&self, node: &str, published: Published) {
        self.channel(node).send_replace(Some(published));
    }

    /// Whether a snapshot (or a decision) is published for `node`. Unlike [`Self::get`], asking
    /// does not make the store track the node.
    pub fn publishes(&self, node: &str) -> bool {
        let nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        nodes.get(node).is_some_and(|tx| tx.borrow().is_some())
    }

    pub fn get(&self, node: &str) -> Option<Published> {
        self.channel(node).borrow().clone()
    }

    fn subscribe(&self, node: &str) -> watch::Receiver<Option<Published>> {
        self.channel(node).subscribe()
    }

    /// The generation a node's agent last reported live in its kernel.
    pub fn live_generation(&self, node: &str) -> Option<u64> {
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(node)
            .copied()
    }

    /// Every node's live generation.
    pub fn live_generations(&self) -> BTreeMap<String, u64> {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Records a live generation: reported here by an agent, or by another replica through the
    /// API server. Generations only grow (the leader decides increasing ones), so the highest
    /// report wins, whatever order reports arrive in. Returns whether it changed anything.
    pub fn merge_live(&self, node: &str, generation: u64) -> bool {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let entry = live.entry(node.to_string()).or_insert(0);
        if generation <= *entry {
            return false;
        }
        *entry = generation;
        drop(live);
        self.live_changed.send_modify(|n| *n += 1);
        true
    }

    fn report_live(&self, node: &str, generation: u64) {
        self.reported_here
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(node.to_string(), generation);
        self.merge_live(node, generation);
    }

    /// The reports agents made to this replica (cleared by the call): what
    /// [`replicas`](crate::replicas) records for the others.
    pub fn take_reported_here(&self) -> BTreeMap<String, u64> {
        std::mem::take(&mut *self.reported_here.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// A receiver that changes whenever a live generation does.
    pub fn live_changes(&self) -> watch::Receiver<u64> {
        self.live_changed.subscribe()
    }

    /// Marks this replica ready (or not) to serve.
    pub fn set_ready(&self, ready: bool) {
        self.ready
            .store(ready, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Who a token belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// An agent allowed to fetch this node's snapshot only.
    Node(String),
    /// A service account other than the agents'. A waypoint's is named like its Gateway, in its
    /// namespace: it may read that waypoint's configuration only, and no node's snapshot.
    ServiceAccount { namespace: String, name: String },
    /// Anyone (authentication is off: local use only).
    Anyone,
}

#[derive(thiserror::Error, Debug)]
pub enum AuthError {
    #[error("no bearer token")]
    Missing,
    #[error("token rejected: {0}")]
    Rejected(String),
    #[error("cannot check the token: {0}")]
    Unavailable(String),
}

/// Turns a bearer token into a caller.
pub trait Authenticator: Send + Sync + 'static {
    fn authenticate(
        &self,
        token: Option<&str>,
    ) -> impl std::future::Future<Output = Result<Caller, AuthError>> + Send;
}

/// No authentication: every caller may fetch every node (local demos, `--source dir:`).
pub struct NoAuth;

impl Authenticator for NoAuth {
    async fn authenticate(&self, _token: Option<&str>) -> Result<Caller, AuthError> {
        Ok(Caller::Anyone)
    }
}

/// Fixed tokens, for running without a cluster: a line `<token> <node>` gives an agent of that
/// node; a line `<token> waypoint:<namespace>/<name>` gives that waypoint
/// ([`Caller::ServiceAccount`], which is how a waypoint's token is known with TokenReview). Blank
/// lines and lines starting with `#` are skipped. Only the `waypoint:` prefix makes a
/// service-account caller: every other second field is a node, as in files from before waypoints.
pub struct StaticTokens(pub BTreeMap<String, Caller>);

/// A line of a static token file that is neither `<token> <node>` nor
/// `<token> waypoint:<namespace>/<name>`.
#[derive(thiserror::Error, Debug, PartialEq, Eq)]
#[error(
    "line {line}: expected `<token> <node>` or `<token> {WAYPOINT_TOKEN_PREFIX}<namespace>/<name>`"
)]
pub struct BadTokenLine {
    pub line: usize,
}

/// What marks a static token as a waypoint's: `waypoint:<namespace>/<name>`.
pub const WAYPOINT_TOKEN_PREFIX: &str = "waypoint:";

impl StaticTokens {
    pub fn parse(text: &str) -> Result<Self, BadTokenLine> {
        let mut tokens = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut fields = line.split_whitespace();
            let caller = match (fields.next(), fields.next(), fields.next()) {
                (Some(token), Some(holder), None) => static_caller(holder).map(|c| (token, c)),
                _ => None,
            };
            let (token, caller) = caller.ok_or(BadTokenLine { line: i + 1 })?;
            tokens.insert(token.to_string(), caller);
        }
        Ok(StaticTokens(tokens))
    }
}

/// The caller a static token line's second field names; `None` for a `waypoint:` field that is
/// not `waypoint:<namespace>/<name>`.
fn static_caller(holder: &str) -> Option<Caller> {
    let Some(waypoint) = holder.strip_prefix(WAYPOINT_TOKEN_PREFIX) else {
        return Some(Caller::Node(holder.to_string()));
    };
    let (namespace, name) = waypoint.split_once('/')?;
    if namespace.is_empty() || name.is_empty() || name.contains('/') {
        return None;
    }
    Some(Caller::ServiceAccount {
        namespace: namespace.to_string(),
        name: name.to_string(),
    })
}

impl Authenticator for StaticTokens {
    async fn authenticate(&self, token: Option<&str>) -> Result<Caller, AuthError> {
        let token = token.ok_or(AuthError::Missing)?;
        self.0
            .get(token)
            .cloned()
            .ok_or_else(|| AuthError::Rejected("unknown token".into()))
    }
}

/// Serves snapshots on `listener` until the process exits; TLS when `tls` is given.
pub async fn serve<A: Authenticator>(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    store: SnapshotStore,
    auth: Arc<A>,
    metrics: Arc<Metrics>,
) {
    info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), tls = tls.is_some(), "snapshot server listening");
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "accept failed");
                continue;
            }
        };
        let (store, auth, metrics, tls) =
            (store.clone(), auth.clone(), metrics.clone(), tls.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let (store, auth, metrics) = (store.clone(), auth.clone(), metrics.clone());
                async move { Ok::<_, Infallible>(handle(req, &store, &*auth, &metrics, peer).await) }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let result = match tls {
                Some(acceptor) => match acceptor.accept(stream).await {
                    Ok(tls_stream) => {
                        builder
                            .serve_connection(TokioIo::new(tls_stream), service)
                            .await
                    }
                    Err(e) => {
                        debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                },
                None => {
                    builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await
                }
            };
            if let Err(e) = result {
                debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}

async fn handle<A: Authenticator>(
    req: Request<Incoming>,
    store: &SnapshotStore,
    auth: &A,
    metrics: &Metrics,
    peer: SocketAddr,
) -> Response<Chunks> {
    let (request, _body) = req.into_parts();
    respond(&request, store, auth, metrics, peer).await
}

/// Answers one request (its head: snapshot and waypoint configuration requests have no body) and
/// counts it.
pub(crate) async fn respond<A: Authenticator>(
    request: &hyper::http::request::Parts,
    store: &SnapshotStore,
    auth: &A,
    metrics: &Metrics,
    peer: SocketAddr,
) -> Response<Chunks> {
    let path = request.uri.path();
    if let Some(waypoint) = contract::waypoint_of_config_path(path) {
        let configs = &store.waypoint_configs;
        return waypoint_server::respond(request, &waypoint, configs, auth, metrics, peer).await;
    }
    let Some(node) = contract::node_of_snapshot_path(path).map(str::to_string) else {
        return text(StatusCode::NOT_FOUND, "not found\n");
    };
    let (response, caller) = serve_snapshot(request, &node, store, auth, metrics, peer).await;
    metrics.served(
        counted_node(caller, &node, store),
        response.status().as_u16(),
    );
    response
}

/// The node a request is counted under: the node it asked for, once the caller is authenticated
/// for that node and the operator publishes a snapshot for it. Any other request (no token, a
/// rejected one, another node's token, a node nobody publishes) is counted without a node:
/// labelling it with the name it asked for would let any client add a series per name it makes up.
fn counted_node<'a>(
    caller: Option<Caller>,
    node: &'a str,
    store: &SnapshotStore,
) -> Option<&'a str> {
    let authenticated = match caller {
        Some(Caller::Anyone) => true,
        Some(Caller::Node(allowed)) => allowed == node,
        Some(Caller::ServiceAccount { .. }) | None => false,
    };
    (authenticated && store.publishes(node)).then_some(node)
}

/// The answer to a snapshot request for `node`, and the caller it authenticated (`None`: none).
async fn serve_snapshot<A: Authenticator>(
    req: &hyper::http::request::Parts,
    node: &str,
    store: &SnapshotStore,
    auth: &A,
    metrics: &Metrics,
    peer: SocketAddr,
) -> (Response<Chunks>, Option<Caller>) {
    if req.method != hyper::Method::GET {
        return (text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n"), None);
    }
    let caller = match authenticate(req, auth, peer).await {
        Ok(caller) => caller,
        Err(refusal) => return (refusal, None),
    };
    if let Some(refusal) = snapshot_refusal(&caller, node) {
        warn!(%peer, ?caller, requested = node, "{}", refusal.trim_end());
        return (text(StatusCode::FORBIDDEN, &refusal), None);
    }
    (
        serve_authenticated(req, node, store, metrics).await,
        Some(caller),
    )
}

/// The caller of a request, from its bearer token; or the answer refusing it: `401` without a
/// token or with one the authenticator rejects, `503` when it cannot check tokens right now.
pub(crate) async fn authenticate<A: Authenticator>(
    req: &hyper::http::request::Parts,
    auth: &A,
    peer: SocketAddr,
) -> Result<Caller, Response<Chunks>> {
    let token = req
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match auth.authenticate(token).await {
        Ok(caller) => Ok(caller),
        Err(e @ AuthError::Unavailable(_)) => {
            warn!(%peer, error = %e, "authentication unavailable");
            Err(text(StatusCode::SERVICE_UNAVAILABLE, &format!("{e}\n")))
        }
        Err(e) => Err(text(StatusCode::UNAUTHORIZED, &format!("{e}\n"))),
    }
}

/// Why `caller` may not fetch `node`'s snapshot (the body of a `403`); `None` when it may: only
/// that node's agents, or anyone when authentication is off. A service account's token (a
/// waypoint's) never may: snapshots are the agents'.
fn snapshot_refusal(caller: &Caller, node: &str) -> Option<String> {
    match caller {
        Caller::Anyone => None,
        Caller::Node(allowed) if allowed == node => None,
        Caller::Node(allowed) => Some(format!(
            "this token is bound to node {allowed:?}, not {node:?}\n"
        )),
        Caller::ServiceAccount { namespace, name } => Some(format!(
            "this token is service account {namespace}/{name}'s; only the node agents' service \
             account may fetch node snapshots\n"
        )),
    }
}

/// How long a long poll is held, after a decision this replica has no bytes for, for its own
/// compile to catch up; then the agent is told to ask again (`503`). Replicas compile the same
/// inputs within a debounce of each other, so content the leader decided is normally here well
/// within this; when it is not, the inputs changed again and only the leader still has it.
const CATCH_UP: Duration = Duration::from_secs(2);

/// The answer to a request whose caller may fetch `node`'s snapshot.
async fn serve_authenticated(
    req: &hyper::http::request::Parts,
    node: &str,
    store: &SnapshotStore,
    metrics: &Metrics,
) -> Response<Chunks> {
    // Only an authenticated agent of this node may say what runs there. Reported now, not when
    // the long poll ends: agents re-poll as soon as their live generation changes.
    if let Some(live) = req
        .headers
        .get(contract::LIVE_GENERATION_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        store.report_live(node, live);
        metrics.live(node, live);
    }
    let wait = wait_param(req.uri.query());
    let if_none_match = req
        .headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if store.uninstalling() {
        return gone();
    }
    let mut updates = store.subscribe(node);
    let mut uninstalling = store.uninstalling.subscribe();
    let current = |rx: &watch::Receiver<Option<Published>>| rx.borrow().clone();
    let changed = |p: &Option<Published>| is_news(p.as_ref(), if_none_match.as_deref());
    // What ends a long poll: a snapshot other than the agent's, with its bytes here.
    let deliverable =
        |p: &Option<Published>| changed(p) && p.as_ref().is_some_and(|p| p.body.is_some());
    if !deliverable(&current(&updates)) && !wait.is_zero() {
        // Long poll: hold until the snapshot changes, an uninstall starts, or the wait runs out.
        // A decision this replica has no bytes for is held only [`CATCH_UP`] longer: its own
        // compile may never produce that content (the inputs moved on meanwhile), and the agent
        // must then ask another replica rather than wait out the poll here.
        let held = async {
            let news = async {
                let _ = updates.wait_for(|p| changed(p)).await;
                let _ = tokio::time::timeout(CATCH_UP, updates.wait_for(|p| deliverable(p))).await;
            };
            tokio::select! {
                _ = news => {}
                _ = uninstalling.wait_for(|u| *u) => {}
            }
        };
        let _ = tokio::time::timeout(wait, held).await;
    }
    if store.uninstalling() {
        return gone();
    }
    match current(&updates) {
        None => text(
            StatusCode::NOT_FOUND,
            &format!("no snapshot for node {node:?} yet\n"),
        ),
        Some(p) if !changed(&Some(p.clone())) => {
            let mut resp = text(StatusCode::NOT_MODIFIED, "");
            if let Ok(v) = p.etag().parse() {
                resp.headers_mut().insert(header::ETAG, v);
            }
            resp
        }
        Some(Published { body: None, .. }) => {
            let mut resp = text(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!(
                    "this replica has not compiled node {node:?}'s decided snapshot; ask again\n"
                ),
            );
            // Closed, so that the agent's next request opens a new connection, which the
            // Service may send to another replica (a kept-alive one would come back here).
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            resp
        }
        Some(p) => {
            let format = contract::served_format(req.uri.query());
            if let Some(delta) = delta_response(req, store, &p, format).await {
                return delta;
            }
            let chunks = match p.body.as_ref().map(|b| b.chunks(format)) {
                Some(Ok(chunks)) => chunks,
                other => {
                    let error = other.and_then(Result::err);
                    warn!(
                        node,
                        ?format,
                        ?error,
                        "the snapshot does not encode in the asked format"
                    );
                    return text(StatusCode::INTERNAL_SERVER_ERROR, "snapshot encoding\n");
                }
            };
            Response::builder()
                .header(header::ETAG, p.etag())
                .header(header::CONTENT_TYPE, contract::MEDIA_TYPE)
                .body(chunks)
                .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "response\n"))
        }
    }
}

/// The answer to an agent that names in `since` the cluster part it holds, when a delta from it
/// can be made and is smaller than the snapshot: the node's delta. `None`: the whole snapshot is
/// sent (the agent reads an older format, names no base or one no longer kept).
async fn delta_response(
    req: &hyper::http::request::Parts,
    store: &SnapshotStore,
    published: &Published,
    format: Format,
) -> Option<Response<Chunks>> {
    let since = req.uri.query().and_then(contract::parse_since)?;
    let body = published.body.as_ref()?;
    if format != Format::V4 {
        return None;
    }
    let base = store.cluster(since)?;
    let delta = body.cluster.delta_from(base).await?;
    let chunks = match body.delta_chunks(&delta) {
        Ok(chunks) => chunks?,
        Err(e) => {
            warn!(error = %e, "a node's delta does not encode; the snapshot is sent");
            return None;
        }
    };
    Response::builder()
        .header(header::ETAG, published.etag())
        .header(header::CONTENT_TYPE, contract::DELTA_MEDIA_TYPE)
        .body(chunks)
        .ok()
}

/// Whether `published` is news to an agent holding `if_none_match`: a snapshot other than the one
/// it holds, and not older. An agent holding a newer generation than this replica's decision got it
/// from a replica that saw a later decision: this one lags (its API view is behind) and must not
/// send it back.
fn is_news(published: Option<&Published>, if_none_match: Option<&str>) -> bool {
    match (published, if_none_match) {
        (Some(p), Some(tag)) => {
            let held = contract::parse_etag(tag).map(|(generation, _)| generation);
            p.etag() != tag && held.is_none_or(|g| g < p.generation)
        }
        (Some(_), None) => true,
        (None, _) => false,
    }
}

/// The contract's `wait`, capped at `contract::MAX_WAIT`; zero when absent or malformed.
pub(crate) fn wait_param(query: Option<&str>) -> Duration {
    query
        .and_then(contract::parse_wait)
        .unwrap_or(Duration::ZERO)
        .min(contract::MAX_WAIT)
}

/// The contract's uninstall.
fn gone() -> Response<Chunks> {
    text(
        StatusCode::from_u16(contract::UNINSTALL_STATUS).unwrap_or(StatusCode::GONE),
        "the node agents are being removed: detach the programs and remove every pin\n",
    )
}

pub(crate) fn text(status: StatusCode, body: &str) -> Response<Chunks> {
    let mut resp = Response::new(Chunks::from(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp
}

/// A TLS acceptor from PEM files (certificate chain and private key).
pub fn tls_acceptor(cert_pem: &[u8], key_pem: &[u8]) -> crate::Result<tokio_rustls::TlsAcceptor> {
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};

    use crate::Error;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(Error::Certificate)?;
    if certs.is_empty() {
        return Err(Error::NoCertificate);
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(Error::PrivateKey)?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(Error::Tls)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(Error::CertificateKey)?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_live_generation_is_announced_once() {
        let store = SnapshotStore::default();
        let mut changes = store.live_changes();
        assert!(!changes.has_changed().unwrap());
        store.report_live("node-a", 5);
        assert!(changes.has_changed().unwrap());
        changes.mark_unchanged();
        store.report_live("node-a", 5);
        assert!(
            !changes.has_changed().unwrap(),
            "the same generation again: no news"
        );
        store.report_live("node-b", 5);
        assert!(changes.has_changed().unwrap());
        assert_eq!(store.live_generation("node-b"), Some(5));
    }

    #[test]
    fn wait_parameter() {
        assert_eq!(wait_param(Some("wait=30s")), Duration::from_secs(30));
        assert_eq!(wait_param(Some("x=1&wait=5")), Duration::from_secs(5));
        assert_eq!(wait_param(Some("wait=999s")), contract::MAX_WAIT);
        assert_eq!(wait_param(Some("wait=soon")), Duration::ZERO);
        assert_eq!(wait_param(None), Duration::ZERO);
    }

    #[test]
    fn a_lagging_replica_never_sends_an_agent_back() {
        let at = |generation| Published {
            generation,
            content_hash: 0xab,
            body: None,
        };
        let held = contract::etag(7, 0xab);
        assert!(!is_news(Some(&at(7)), Some(&held)), "the same snapshot");
        assert!(is_news(Some(&at(8)), Some(&held)), "a newer one");
        assert!(
            !is_news(Some(&at(6)), Some(&held)),
            "an older one: this replica lags"
        );
        assert!(
            is_news(Some(&at(6)), Some("\"something else\"")),
            "an ETag it did not make"
        );
        assert!(is_news(Some(&at(6)), None), "a first request");
        assert!(!is_news(None, None), "nothing to send");
    }

    /// A request's head, as `respond` gets it.
    fn request(node: &str, token: Option<&str>) -> hyper::http::request::Parts {
        let mut builder = Request::get(format!("/v1/nodes/{node}/snapshot"));
        if let Some(token) = token {
            builder = builder.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        builder.body(()).expect("request").into_parts().0
    }

    /// The `node` labels of the metric `name`'s series.
    fn node_labels(metrics: &Metrics, name: &str) -> Vec<String> {
        metrics
            .render()
            .lines()
            .filter_map(|line| line.strip_prefix(name)?.strip_prefix("{node=\""))
            .map(|rest| rest.split('"').next().unwrap_or_default().to_string())
            .collect()
    }

    /// Requests for made-up nodes, without a token, with another node's token, or (without
    /// authentication) for a node nothing is published for, add no series: only the published
    /// node's own requests are counted under its name.
    #[tokio::test]
    async fn made_up_node_names_add_no_metric_series() {
        let store = SnapshotStore::default();
        let published = Published {
            generation: 1,
            content_hash: 7,
            body: Some(crate::snapshot_body::for_tests("node-a", 1)),
        };
        store.publish("node-a", published);
        let tokens = StaticTokens::parse("token-a node-a\n").unwrap();
        let metrics = Metrics::default();
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let mut codes = BTreeMap::new();
        for i in 0..500 {
            let name = format!("made-up-{i}");
            for token in [None, Some("token-a"), Some("not-a-token")] {
                let response =
                    respond(&request(&name, token), &store, &tokens, &metrics, peer).await;
                *codes.entry(response.status().as_u16()).or_insert(0) += 1;
            }
            let response = respond(&request(&name, None), &store, &NoAuth, &metrics, peer).await;
            *codes.entry(response.status().as_u16()).or_insert(0) += 1;
        }
        let own = respond(
            &request("node-a", Some("token-a")),
            &store,
            &tokens,
            &metrics,
            peer,
        )
        .await;
        assert_eq!(own.status(), StatusCode::OK);
        assert_eq!(codes, BTreeMap::from([(401, 1000), (403, 500), (404, 500)]));
        let labelled = node_labels(&metrics, "kmesh_operator_snapshots_served_total");
        assert_eq!(
            labelled.len(),
            1,
            "series labelled with a node: {:?}...",
            &labelled[..labelled.len().min(5)]
        );
        assert_eq!(labelled, ["node-a"]);
        assert!(store.publishes("node-a"));
        assert!(!store.publishes("made-up-1"));
        let rendered = metrics.render();
        for (code, count) in [(401, 1000), (403, 500), (404, 500)] {
            let line = format!(
                "kmesh_operator_snapshot_requests_unattributed_total{{code=\"{code}\"}} {count}"
            );
            assert!(rendered.lines().any(|l| l == line), "{line} in\n{rendered}");
        }
    }

    /// A long poll of `node-a` for an agent that runs `held` (generation, content hash).
    fn long_poll(held: (u64, u64)) -> hyper::http::request::Parts {
        Request::get(contract::snapshot_url(
            "",
            "node-a",
            Duration::from_secs(30),
        ))
        .header(header::IF_NONE_MATCH, contract::etag(held.0, held.1))
        .body(())
        .expect("request")
        .into_parts()
        .0
    }

    /// An agent from before format 3 (it names no format) gets format 2, one that names format 3
    /// gets format 3, and today's agent, whose URL names format 4, gets format 4: the same
    /// snapshot, under the same ETag, so a rolling upgrade of the agents changes what they run in
    /// nothing.
    #[tokio::test]
    async fn each_agent_gets_the_newest_format_it_reads() {
        use http_body_util::BodyExt;
        use kmesh_snapshot::{Format, Limits, Snapshot};
        let store = SnapshotStore::default();
        store.publish("node-a", decided(3, true));
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let old = Request::get("/v1/nodes/node-a/snapshot?wait=0s");
        let format_3 = Request::get("/v1/nodes/node-a/snapshot?wait=0s&format=3");
        let new = Request::get(contract::snapshot_url("", "node-a", Duration::ZERO));
        let mut seen = Vec::new();
        for (request, format) in [(old, Format::V2), (format_3, Format::V3), (new, Format::V4)] {
            let request = request.body(()).expect("request").into_parts().0;
            let response = respond(&request, &store, &NoAuth, &Metrics::default(), peer).await;
            assert_eq!(response.status(), StatusCode::OK);
            let etag = response.headers().get(header::ETAG).cloned();
            let length = response.headers().get(header::CONTENT_LENGTH).cloned();
            let bytes = response.into_body().collect().await.unwrap().to_bytes();
            let decoded = Snapshot::decode(&bytes, &Limits::default()).unwrap();
            assert_eq!(decoded.format, format);
            assert_eq!(decoded.snapshot.generation, 3);
            assert_eq!(etag, Some(contract::etag(3, 300).parse().unwrap()));
            assert_eq!(length, None, "set by hyper from the exact size hint");
            seen.push(decoded.snapshot);
        }
        assert_eq!(seen[0], seen[1]);
        assert_eq!(seen[1], seen[2]);
    }

    /// An agent that names the cluster part it holds gets a delta from it, which applied to what
    /// it holds is the published snapshot; one that names a part the server no longer keeps, or
    /// reads only format 3, gets the whole snapshot.
    #[tokio::test]
    async fn an_agent_naming_the_part_it_holds_gets_a_delta() {
        use http_body_util::BodyExt;
        use kmesh_snapshot::builder::generate;
        use kmesh_snapshot::delta_format::Delta;
        use kmesh_snapshot::{Limits, Snapshot};
        let held = generate("node-a", 3, 200, 4);
        let mut next = held.clone();
        next.generation = 4;
        next.endpoints[17].value.ip[15] ^= 1;
        let (held_body, body) = (
            crate::snapshot_body::body_of(held.clone()),
            crate::snapshot_body::body_of(next.clone()),
        );
        let store = SnapshotStore::default();
        store.remember_cluster(&held_body.cluster);
        store.remember_cluster(&body.cluster);
        store.publish(
            "node-a",
            Published {
                generation: 4,
                content_hash: 400,
                body: Some(body.clone()),
            },
        );
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let since = held_body.cluster.cluster_hash();
        let ask = |query: String| {
            let store = &store;
            async move {
                let request = Request::get(format!("/v1/nodes/node-a/snapshot?{query}"))
                    .body(())
                    .unwrap()
                    .into_parts()
                    .0;
                let response = respond(&request, store, &NoAuth, &Metrics::default(), peer).await;
                assert_eq!(response.status(), StatusCode::OK);
                assert_eq!(
                    response.headers().get(header::ETAG),
                    Some(&contract::etag(4, 400).parse().unwrap())
                );
                let media = response
                    .headers()
                    .get(header::CONTENT_TYPE)
                    .cloned()
                    .unwrap();
                let bytes = response.into_body().collect().await.unwrap().to_bytes();
                (media, bytes)
            }
        };
        let held_decoded = Snapshot::decode(&held.encode().unwrap(), &Limits::default()).unwrap();
        let next_decoded = Snapshot::decode(&next.encode().unwrap(), &Limits::default()).unwrap();

        let (media, bytes) = ask(format!("wait=0s&format=4&since={since:016x}")).await;
        assert_eq!(media, contract::DELTA_MEDIA_TYPE);
        assert!(
            bytes.len() * 20 < body.len(),
            "{} of {}",
            bytes.len(),
            body.len()
        );
        let delta = Delta::decode(&bytes, &Limits::default()).unwrap();
        assert_eq!(
            delta.apply(&held_decoded, &Limits::default()),
            Ok(next_decoded.clone())
        );

        for (query, format) in [
            (
                format!("wait=0s&format=4&since={:016x}", since ^ 1),
                Format::V4,
            ),
            (format!("wait=0s&format=3&since={since:016x}"), Format::V3),
            ("wait=0s&format=4".to_string(), Format::V4),
        ] {
            let (media, bytes) = ask(query.clone()).await;
            assert_eq!(media, contract::MEDIA_TYPE, "{query}");
            let decoded = Snapshot::decode(&bytes, &Limits::default()).unwrap();
            assert_eq!(decoded.format, format, "{query}");
            assert_eq!(decoded.snapshot, next, "{query}");
        }
    }

    /// The answer to `long_poll(held)` and the (virtual) time it was held.
    async fn answer(store: &SnapshotStore, held: (u64, u64)) -> (Response<Chunks>, Duration) {
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let started = tokio::time::Instant::now();
        let response = respond(&long_poll(held), store, &NoAuth, &Metrics::default(), peer).await;
        (response, started.elapsed())
    }

    /// The decision of `generation`, with a body when this replica compiled it.
    fn decided(generation: u64, compiled: bool) -> Published {
        Published {
            generation,
            content_hash: generation * 100,
            body: compiled.then(|| crate::snapshot_body::for_tests("node-a", generation)),
        }
    }

    /// A replica that knows a decision it has no bytes for (its compile never made that
    /// content: the inputs moved on) answers `503` after `CATCH_UP`, not after the agent's
    /// whole wait, and closes the connection so that the agent's next request may reach
    /// another replica.
    #[tokio::test(start_paused = true)]
    async fn a_decision_without_bytes_is_answered_after_the_catch_up_on_a_closed_connection() {
        let store = SnapshotStore::default();
        store.publish("node-a", decided(2, false));
        let (response, held) = answer(&store, (1, 100)).await;
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(held, CATCH_UP);
        assert_eq!(
            response
                .headers()
                .get(header::CONNECTION)
                .map(|v| v.as_bytes()),
            Some(&b"close"[..])
        );

        // The same when the decision arrives during the long poll: 10 s in, answered 2 s later.
        let store = Arc::new(SnapshotStore::default());
        store.publish("node-a", decided(1, true));
        let later = store.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(10)).await;
            later.publish("node-a", decided(2, false));
        });
        let (response, held) = answer(&store, (1, 100)).await;
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(held, Duration::from_secs(10) + CATCH_UP);
    }

    /// Bytes that arrive within the catch-up (this replica's compile lagged the leader's a
    /// little) are delivered on the held request.
    #[tokio::test(start_paused = true)]
    async fn bytes_compiled_within_the_catch_up_are_delivered() {
        let store = Arc::new(SnapshotStore::default());
        store.publish("node-a", decided(2, false));
        let later = store.clone();
        tokio::spawn(async move {
            tokio::time::sleep(CATCH_UP / 2).await;
            later.publish("node-a", decided(2, true));
        });
        let (response, held) = answer(&store, (1, 100)).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(held, CATCH_UP / 2);
        assert_eq!(
            response
                .headers()
                .get(header::ETAG)
                .map(|v| v.to_str().unwrap().to_string()),
            Some(contract::etag(2, 200))
        );
        assert_eq!(response.headers().get(header::CONNECTION), None);

        // Nothing new: held the whole wait, then 304.
        let (response, held) = answer(&store, (2, 200)).await;
        assert_eq!(response.status(), StatusCode::NOT_MODIFIED);
        assert_eq!(held, Duration::from_secs(30));
    }

    #[test]
    fn static_tokens() {
        let t = StaticTokens::parse("# comment\nabc node-1\n\nxyz node-2\n").unwrap();
        assert_eq!(t.0.get("abc"), Some(&Caller::Node("node-1".into())));
        assert_eq!(
            StaticTokens::parse("a n\nonly-one-field").err(),
            Some(BadTokenLine { line: 2 })
        );
    }

    /// Only a `waypoint:` line makes a service-account caller; a node's line, whatever its name,
    /// stays a node's; a malformed waypoint line is refused, not taken for a node.
    #[test]
    fn static_tokens_of_waypoints() {
        let t = StaticTokens::parse(
            "wp waypoint:bookinfo/waypoint\nn1 node-1\nslash bookinfo/waypoint\n",
        )
        .unwrap();
        assert_eq!(
            t.0.get("wp"),
            Some(&Caller::ServiceAccount {
                namespace: "bookinfo".into(),
                name: "waypoint".into()
            })
        );
        assert_eq!(t.0.get("n1"), Some(&Caller::Node("node-1".into())));
        assert_eq!(
            t.0.get("slash"),
            Some(&Caller::Node("bookinfo/waypoint".into())),
            "without the prefix, a node (which no node is named, so it fetches nothing)"
        );
        for bad in [
            "waypoint:bookinfo",
            "waypoint:/waypoint",
            "waypoint:bookinfo/",
            "waypoint:a/b/c",
            "waypoint:",
        ] {
            assert_eq!(
                StaticTokens::parse(&format!("n1 node-1\nt {bad}\n")).err(),
                Some(BadTokenLine { line: 2 }),
                "{bad}"
            );
        }
    }

    /// A waypoint's token fetches no node's snapshot, and is counted under no node.
    #[tokio::test]
    async fn a_service_account_token_fetches_no_snapshot() {
        let store = SnapshotStore::default();
        store.publish("node-a", decided(1, true));
        let tokens = StaticTokens::parse("wp waypoint:bookinfo/waypoint\n").unwrap();
        let metrics = Metrics::default();
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let response = respond(
            &request("node-a", Some("wp")),
            &store,
            &tokens,
            &metrics,
            peer,
        )
        .await;
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        assert!(node_labels(&metrics, "kmesh_operator_snapshots_served_total").is_empty());
    }
}
