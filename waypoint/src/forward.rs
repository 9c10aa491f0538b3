//! Forwarding a routed request: the destination by weight, the endpoint by the cluster's load
//! balancer, the request as the route edits it, tries and retries within the deadlines, mirrors,
//! and the response as the route edits it. It owns the request body's replay and the mapping of
//! failures to Envoy's answers, and promises:
//! - statuses as Envoy's: no endpoint → 503 `no healthy upstream` (`UH`); a failed connect →
//!   503 (`UF`); a reset before the answer → 503 (`UR`); a try's deadline → 504 `upstream request
//!   timeout` (`UT`); the request's deadline → 504 at once, retries or not; every retry spent → the
//!   last try's answer with `URX`;
//! - retries as `decide_retry` decides them, each try to an endpoint chosen anew, after a jittered
//!   backoff (Envoy's: 25 ms doubling, at most 250 ms, a uniform draw below it);
//! - mirrors sent and never awaited: their answers are dropped, and a slow mirror delays nothing;
//!   as Envoy's shadows, they carry the request as the route edits it (not a destination's
//!   operations), with `-shadow` appended to the host;
//! - a request body is sent again only if it was kept: a body (and its trailers) up to
//!   `max_replay_body` bytes is read whole before the first try when the route retries or
//!   mirrors; a larger body is streamed, once, so its request is neither retried nor mirrored (as
//!   Envoy disables retries and shadows when its buffer overflows). A route that neither retries
//!   nor mirrors streams every body.
//!
//! The deadlines bound each try until the response's head; the body then streams as the client
//! reads it.
use std::{
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use http::{
    HeaderMap, HeaderValue, Request, Response, StatusCode, Uri, Version, header, uri::PathAndQuery,
};
use http_body_util::BodyExt as _;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use kmesh_snapshot::waypoint::{Protocol, WeightedCluster};
use tokio::time::Instant;

use crate::{
    choice::{ClusterTable, InFlight, choose_destination},
    filters::{self, RewriteError},
    http_proxy::{Answer, RequestContext, rewrite_failed},
    metrics::ResponseFlags,
    retry::{self, Outcome, RetryDecision, decide_retry},
    table::Route,
    upstream::{BoxError, ProxyBody, UpstreamError, Wire},
};

/// Envoy's retry backoff: the base interval, doubled per retry up to the maximum.
const RETRY_BACKOFF_BASE: Duration = Duration::from_millis(25);
const RETRY_BACKOFF_MAX: Duration = Duration::from_millis(250);

/// How long a mirror may take when its route has no timeout.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(30);

/// Forwards the request of `context` to one of `destinations`.
pub(crate) async fn forward(
    context: &RequestContext<'_>,
    destinations: &[WeightedCluster],
    body: Incoming,
    flags: ResponseFlags,
) -> Answer {
    let route = context.matched.route;
    let no_upstream = || {
        Answer::local(
            StatusCode::SERVICE_UNAVAILABLE,
            "no healthy upstream",
            flags | ResponseFlags::NO_HEALTHY_UPSTREAM,
        )
    };
    let Some(destination) = choose_destination(destinations, &mut || context.draw()) else {
        return no_upstream();
    };
    let Some(cluster) = destinations
        .get(destination)
        .and_then(|d| context.table.cluster(d.cluster))
    else {
        return no_upstream();
    };
    let mirrors = filters::decide_mirrors(&route.spec.mirrors, &mut || context.draw());
    let wants_replay =
        route.spec.retries.as_ref().is_some_and(|r| r.attempts > 0) || !mirrors.is_empty();
    let max = context.connection.proxy.settings.max_replay_body;
    let mut body = match RequestBody::read(body, wants_replay, max).await {
        Ok(body) => body,
        Err(error) => {
            tracing::debug!(%error, "request body failed");
            return Answer::local(StatusCode::BAD_REQUEST, "invalid request body", flags);
        }
    };
    if let RequestBody::Kept { .. } = &body {
        for mirror in mirrors {
            send_mirror(context, mirror, &body);
        }
    }
    let deadlines = retry::deadlines(&route.spec);
    let request_deadline = deadlines.request.map(|d| Instant::now() + d);
    let policy = route.spec.retries.as_ref();
    let mut retries_done = 0;
    loop {
        let Some((endpoint, set_cookie, in_flight)) = choose_endpoint(context, cluster) else {
            return no_upstream();
        };
        let Some(try_body) = body.take_for_a_try() else {
            // Unreachable: a streamed body is never retried. Answer as a reset would.
            return failure_answer(&Outcome::Reset, flags);
        };
        let wire = wire_for(cluster.spec.protocol, context.parts.version);
        let request =
            match upstream_request(context, Some(destination), endpoint, wire, false, try_body) {
                Ok(request) => request,
                Err(error) => return rewrite_failed(&error, flags),
            };
        let try_deadline = earliest(
            deadlines.per_try.map(|d| Instant::now() + d),
            request_deadline,
        );
        let sent = context
            .connection
            .proxy
            .upstreams
            .send(wire, endpoint, request);
        let result = match try_deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, sent).await.ok(),
            None => Some(sent.await),
        };
        let outcome = outcome_of(&result);
        if result.is_none() && request_deadline.is_some_and(|d| Instant::now() >= d) {
            return failure_answer(&Outcome::Timeout, flags);
        }
        let decision = match decide_retry(policy, retries_done, outcome) {
            RetryDecision::Retry if !body.is_kept() => RetryDecision::Final,
            decision => decision,
        };
        let flags = match decision {
            RetryDecision::Retry => {
                retries_done += 1;
                backoff(context, retries_done, request_deadline).await;
                continue;
            }
            RetryDecision::Final => flags,
            RetryDecision::Exhausted => flags | ResponseFlags::RETRIES_EXHAUSTED,
        };
        return match result {
            Some(Ok(response)) => {
                let response = downstream_response(
                    route,
                    destination,
                    response,
                    set_cookie.as_deref(),
                    in_flight,
                );
                Answer {
                    response,
                    flags,
                    endpoint: Some(endpoint),
                }
            }
            _ => {
                let mut answer = failure_answer(&outcome, flags);
                answer.endpoint = Some(endpoint);
                answer
            }
        };
    }
}

/// The endpoint for one try: its address, the `Set-Cookie` value to answer with, and its
/// in-flight count (held until the response's body ends).
fn choose_endpoint(
    context: &RequestContext<'_>,
    cluster: &ClusterTable,
) -> Option<(SocketAddr, Option<String>, Option<InFlight>)> {
    let choice = cluster.choose_endpoint(&context.head, &context.client, &mut || context.draw())?;
    let endpoint = cluster.spec.endpoints.get(choice.index)?.address;
    let in_flight = cluster.loads.get(choice.index).map(|load| load.start());
    let set_cookie = choice.set_cookie.map(|c| c.header_value());
    Some((endpoint, set_cookie, in_flight))
}

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// How a try ended (`None`: its deadline passed).
fn outcome_of(result: &Option<Result<Response<Incoming>, UpstreamError>>) -> Outcome {
    match result {
        None => Outcome::Timeout,
        Some(Ok(response)) => Outcome::Status {
            status: response.status().as_u16(),
            grpc_status: response
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok()),
        },
        Some(Err(UpstreamError::Connect(_))) => Outcome::ConnectFailure,
        Some(Err(UpstreamError::Reset(_))) => Outcome::Reset,
        Some(Err(UpstreamError::RefusedStream(_))) => Outcome::RefusedStream,
    }
}

/// Envoy's local answer for a try that got no answer.
fn failure_answer(outcome: &Outcome, flags: ResponseFlags) -> Answer {
    let (status, body, flag) = match outcome {
        Outcome::Timeout => (
            StatusCode::GATEWAY_TIMEOUT,
            "upstream request timeout",
            ResponseFlags::UPSTREAM_TIMEOUT,
        ),
        Outcome::ConnectFailure => (
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream connect error or disconnect/reset before headers. reset reason: connection failure",
            ResponseFlags::UPSTREAM_CONNECT_FAILURE,
        ),
        Outcome::RefusedStream => (
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream connect error or disconnect/reset before headers. reset reason: remote refused stream reset",
            ResponseFlags::UPSTREAM_RESET,
        ),
        Outcome::Reset | Outcome::Status { .. } => (
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream connect error or disconnect/reset before headers. reset reason: connection termination",
            ResponseFlags::UPSTREAM_RESET,
        ),
    };
    Answer::local(status, body, flags | flag)
}

/// Sleeps before retry number `retry` (from 1), never past the request's deadline.
async fn backoff(context: &RequestContext<'_>, retry: u32, request_deadline: Option<Instant>) {
    let ceiling = RETRY_BACKOFF_BASE
        .saturating_mul(1 << retry.saturating_sub(1).min(16))
        .min(RETRY_BACKOFF_MAX);
    let millis = (u64::from(context.draw()) * ceiling.as_millis() as u64) >> 32;
    let wake = Instant::now() + Duration::from_millis(millis);
    tokio::time::sleep_until(earliest(Some(wake), request_deadline).unwrap_or(wake)).await;
}

/// HTTP/2 to an `Http2` cluster; else the client's protocol.
fn wire_for(protocol: Protocol, downstream: Version) -> Wire {
    if protocol == Protocol::Http2 || downstream == Version::HTTP_2 {
        Wire::Http2
    } else {
        Wire::Http1
    }
}

/// Headers that describe one connection, not the request (RFC 9110 §7.6.1), removed before a
/// request or an answer goes on: `connection` and what it names, and the hop-by-hop headers of
/// HTTP/1.1 (`te` stays when it is `trailers`, which gRPC needs).
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|name| name.trim().to_ascii_lowercase())
        .filter(|name| !name.is_empty())
        .collect();
    for name in named {
        headers.remove(name.as_str());
    }
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
    ] {
        headers.remove(name);
    }
    let te_trailers = headers
        .get(header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    if !te_trailers {
        headers.remove(header::TE);
    }
}

/// The request as sent to `endpoint`: the route's path and authority rewrites, its header
/// operations then the destination's (`destination` `None`: a mirror, the route's only, and
/// `-shadow` on the host).
fn upstream_request(
    context: &RequestContext<'_>,
    destination: Option<usize>,
    endpoint: SocketAddr,
    wire: Wire,
    shadow: bool,
    body: ProxyBody,
) -> Result<Request<ProxyBody>, RewriteError> {
    let route = context.matched.route;
    let parts = context.parts;
    let path_and_query =
        match filters::rewrite_request_path(route, &context.head, context.matched.matched_prefix) {
            Some(rewritten) => rewritten?,
            None => parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
        };
    let mut headers = parts.headers.clone();
    strip_hop_by_hop(&mut headers);
    filters::edit_request_headers(route, destination, &mut headers);
    let mut authority: Option<String> = filters::rewrite_authority(route)
        .and_then(|a| a.to_str().ok())
        .or(context.head.authority)
        .map(str::to_owned);
    if shadow && let Some(authority) = &mut authority {
        *authority = shadow_host(authority);
    }
    let uri_authority = match wire {
        Wire::Http1 => {
            if let Some(value) = authority
                .as_deref()
                .and_then(|a| HeaderValue::from_str(a).ok())
            {
                headers.insert(header::HOST, value);
            }
            endpoint.to_string()
        }
        Wire::Http2 => {
            headers.remove(header::HOST);
            authority
                .filter(|a| a.parse::<http::uri::Authority>().is_ok())
                .unwrap_or_else(|| endpoint.to_string())
        }
    };
    let uri = Uri::builder()
        .scheme("http")
        .authority(uri_authority.as_str())
        .path_and_query(path_and_query.clone())
        .build()
        .map_err(|_| RewriteError::InvalidPath(path_and_query.to_string()))?;
    let mut request = Request::new(body);
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = uri;
    *request.version_mut() = match wire {
        Wire::Http1 => Version::HTTP_11,
        Wire::Http2 => Version::HTTP_2,
    };
    *request.headers_mut() = headers;
    Ok(request)
}

/// `host-shadow` for `host` or `host:port` (Envoy's shadow host).
fn shadow_host(authority: &str) -> String {
    match authority.parse::<http::uri::Authority>() {
        Ok(parsed) => match parsed.port() {
            Some(port) => format!("{}-shadow:{port}", parsed.host()),
            None => format!("{}-shadow", parsed.host()),
        },
        Err(_) => format!("{authority}-shadow"),
    }
}

/// Sends a copy of the request to an endpoint of cluster `mirror`, in the background.
fn send_mirror(context: &RequestContext<'_>, mirror: u32, body: &RequestBody) {
    let Some(cluster) = context.table.cluster(mirror) else {
        return;
    };
    let Some((endpoint, _, in_flight)) = choose_endpoint(context, cluster) else {
        return;
    };
    let Some(body) = body.for_a_try() else {
        return;
    };
    let wire = wire_for(cluster.spec.protocol, context.parts.version);
    let Ok(request) = upstream_request(context, None, endpoint, wire, true, body) else {
        return;
    };
    let proxy = Arc::clone(&context.connection.proxy);
    let timeout = retry::deadlines(&context.matched.route.spec)
        .request
        .unwrap_or(MIRROR_TIMEOUT);
    tokio::spawn(async move {
        let _in_flight = in_flight;
        let sent = proxy.upstreams.send(wire, endpoint, request);
        match tokio::time::timeout(timeout, sent).await {
            Ok(Ok(response)) => {
                // Read to the end, so that the connection goes back to its pool.
                let _ = tokio::time::timeout(timeout, response.into_body().collect()).await;
            }
            Ok(Err(error)) => tracing::debug!(%endpoint, %error, "mirror failed"),
            Err(_) => tracing::debug!(%endpoint, "mirror timed out"),
        }
    });
}

/// The upstream's answer as returned: hop-by-hop headers removed, the route's then the
/// destination's response header operations, the hash cookie set.
fn downstream_response(
    route: &Route,
    destination: usize,
    response: Response<Incoming>,
    set_cookie: Option<&str>,
    in_flight: Option<InFlight>,
) -> Response<ProxyBody> {
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    filters::edit_response_headers(route, Some(destination), &mut parts.headers);
    if let Some(cookie) = set_cookie.and_then(|c| HeaderValue::from_str(c).ok()) {
        parts.headers.append(header::SET_COOKIE, cookie);
    }
    let body = RelayedBody {
        data: None,
        trailers: None,
        rest: Some(body),
        _in_flight: in_flight,
    };
    Response::from_parts(parts, body.boxed())
}

/// A request body: kept whole (to be sent again), or streamed once.
enum RequestBody {
    Kept {
        data: Bytes,
        trailers: Option<HeaderMap>,
    },
    Streamed(Option<RelayedBody>),
}

impl RequestBody {
    /// Keeps `body` if `wants_replay` and it fits in `max` bytes, else streams it (with what was
    /// read of it first).
    async fn read(
        mut body: Incoming,
        wants_replay: bool,
        max: usize,
    ) -> Result<RequestBody, BoxError> {
        if body.is_end_stream() {
            return Ok(RequestBody::Kept {
                data: Bytes::new(),
                trailers: None,
            });
        }
        let too_large = body.size_hint().lower() > max as u64;
        if !wants_replay || too_large {
            return Ok(RequestBody::Streamed(Some(RelayedBody::streamed(body))));
        }
        let mut data = BytesMut::new();
        loop {
            let Some(frame) = body.frame().await else {
                return Ok(RequestBody::Kept {
                    data: data.freeze(),
                    trailers: None,
                });
            };
            let frame = frame?;
            match frame.into_data() {
                Ok(chunk) => {
                    data.extend_from_slice(&chunk);
                    if data.len() > max {
                        return Ok(RequestBody::Streamed(Some(RelayedBody {
                            data: Some(data.freeze()),
                            trailers: None,
                            rest: Some(body),
                            _in_flight: None,
                        })));
                    }
                }
                Err(frame) => {
                    // Trailers end the body.
                    return Ok(RequestBody::Kept {
                        data: data.freeze(),
                        trailers: frame.into_trailers().ok(),
                    });
                }
            }
        }
    }

    fn is_kept(&self) -> bool {
        matches!(self, RequestBody::Kept { .. })
    }

    /// A copy of a kept body; `None` for a streamed one.
    fn for_a_try(&self) -> Option<ProxyBody> {
        match self {
            RequestBody::Kept { data, trailers } => Some(
                RelayedBody {
                    data: Some(data.clone()),
                    trailers: trailers.clone(),
                    rest: None,
                    _in_flight: None,
                }
                .boxed(),
            ),
            RequestBody::Streamed(_) => None,
        }
    }
}

impl RequestBody {
    /// Takes the streamed body (once), or copies the kept one.
    fn take_for_a_try(&mut self) -> Option<ProxyBody> {
        match self {
            RequestBody::Streamed(body) => body.take().map(|b| b.boxed()),
            kept => kept.for_a_try(),
        }
    }
}

/// A body relayed: bytes read already, then the rest of a body, then trailers; with, for a
/// response, the in-flight count of its endpoint, which ends when the body is dropped.
struct RelayedBody {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
    rest: Option<Incoming>,
    _in_flight: Option<InFlight>,
}

impl RelayedBody {
    fn streamed(body: Incoming) -> RelayedBody {
        RelayedBody {
            data: None,
            trailers: None,
            rest: Some(body),
            _in_flight: None,
        }
    }
}

impl Body for RelayedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(data) = self.data.take()
            && !data.is_empty()
        {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if let Some(rest) = self.rest.as_mut() {
            match Pin::new(rest).poll_frame(cx) {
                Poll::Ready(None) => self.rest = None,
                Poll::Ready(Some(frame)) => return Poll::Ready(Some(frame.map_err(Into::into))),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.as_ref().is_none_or(Bytes::is_empty)
            && self.rest.as_ref().is_none_or(Body::is_end_stream)
            && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        let data = self.data.as_ref().map_or(0, |d| d.len() as u64);
        match &self.rest {
            None => SizeHint::with_exact(data),
            Some(rest) => {
                let rest = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(rest.lower() + data);
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper + data);
                }
                hint
            }
        }
    }
}
