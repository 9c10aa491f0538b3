//! HTTP on a downstream connection: HTTP/1.1 and h2c (prior knowledge) with hyper, request by
//! request. It owns what happens to a request before it is forwarded (the route, fault
//! injection, redirects and direct responses, the local answers) and the request's metrics, and
//! hands forwarding to [`crate::forward`].
//!
//! It promises, per request: one route table from start to end (taken once, when the request
//! arrives); its AuthorizationPolicies judged before any route (`authz`); a route or a local
//! answer, never a panic, whatever the request; Envoy's answers for what the waypoint decides
//! itself (403 `RBAC: access denied` with no flag, as Envoy's RBAC filter, 404 `route not found`
//! with `NR`, the fault's status with `FI`, a redirect's status and `Location`). It adds no header of its own to requests or answers
//! (no `x-forwarded-for`, `x-request-id` or `x-envoy-*`): Istio's waypoint adds some of them,
//! but nothing here reads them, and the headers a route sets are the route's.
//!
//! When the waypoint drains, each connection is shut down gracefully: HTTP/1.1 closes after the
//! request in flight, HTTP/2 sends GOAWAY and finishes its open streams.
use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Instant,
};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header, request::Parts};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use kmesh_snapshot::waypoint::RouteAction;
use tokio::net::TcpStream;

use crate::{
    authz,
    filters::{self, RewriteError},
    forward,
    identity::Client,
    matching::{RequestHead, RouteMatch, first_match},
    metrics::{Peer, RequestProtocol, RequestReport, RequestSeries, ResponseFlags, ServiceLabels},
    proxy::Proxy,
    table::{PortKey, RouteTable},
    upstream::ProxyBody,
};

/// Envoy's body of a 403 its RBAC filter answers.
pub const RBAC_DENIED: &str = "RBAC: access denied";

/// One downstream connection: where it was going and where it comes from, and the series its
/// last request was counted in.
pub struct Connection {
    pub proxy: Arc<Proxy>,
    pub key: PortKey,
    pub peer: SocketAddr,
    pub last_series: Mutex<Option<CountedIn>>,
}

impl Connection {
    pub fn new(proxy: Arc<Proxy>, key: PortKey, peer: SocketAddr) -> Connection {
        Connection {
            proxy,
            key,
            peer,
            last_series: Mutex::new(None),
        }
    }
}

/// What decides a request's metric labels on its connection (the client and the service are the
/// connection's): the route table that named the workloads, the answering endpoint, the status,
/// the flags and the protocol; and the series those labels name.
pub struct CountedIn {
    table: Arc<RouteTable>,
    endpoint: Option<SocketAddr>,
    status: StatusCode,
    flags: ResponseFlags,
    protocol: RequestProtocol,
    series: RequestSeries,
}

impl CountedIn {
    fn matches(
        &self,
        table: &Arc<RouteTable>,
        endpoint: Option<SocketAddr>,
        status: StatusCode,
        flags: ResponseFlags,
        protocol: RequestProtocol,
    ) -> bool {
        // The table is held, so its address cannot be reused by another one meanwhile.
        Arc::ptr_eq(&self.table, table)
            && self.endpoint == endpoint
            && self.status == status
            && self.flags == flags
            && self.protocol == protocol
    }
}

/// Serves HTTP on `stream` until the client closes it or the waypoint drains. `http2_only`: a
/// `Http2` port, where HTTP/1.1 is refused.
pub async fn serve(stream: TcpStream, connection: Arc<Connection>, http2_only: bool) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // With a timer, hyper bounds the wait for a request's head (30 s, its default): a client
    // that opens a connection and trickles its headers does not hold it for ever.
    builder.http1().timer(TokioTimer::new());
    builder.http2().timer(TokioTimer::new());
    if http2_only {
        builder = builder.http2_only();
    }
    let proxy = Arc::clone(&connection.proxy);
    let service = hyper::service::service_fn(move |request| {
        let connection = Arc::clone(&connection);
        async move { Ok::<_, Infallible>(handle(connection, request).await) }
    });
    let served = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(served);
    let result = tokio::select! {
        result = served.as_mut() => result,
        () = proxy.drained() => {
            served.as_mut().graceful_shutdown();
            served.await
        }
    };
    if let Err(error) = result {
        tracing::debug!(error = %kmesh_operator_client::error_chain::chain(&*error), "downstream HTTP connection ended");
    }
}

/// What the waypoint answered, for the metrics.
pub(crate) struct Answer {
    pub response: Response<ProxyBody>,
    pub flags: ResponseFlags,
    /// The endpoint that answered (`None`: the waypoint answered itself).
    pub endpoint: Option<SocketAddr>,
}

impl Answer {
    /// An answer of the waypoint's own, with `flags`.
    pub fn local(status: StatusCode, body: impl Into<Bytes>, flags: ResponseFlags) -> Answer {
        Answer {
            response: local_response(status, body),
            flags,
            endpoint: None,
        }
    }
}

/// A plain-text answer.
pub(crate) fn local_response(status: StatusCode, body: impl Into<Bytes>) -> Response<ProxyBody> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

pub(crate) fn full(body: impl Into<Bytes>) -> ProxyBody {
    Full::new(body.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

/// What a request's handling reads: its route table, head, client and route.
pub(crate) struct RequestContext<'a> {
    pub connection: &'a Connection,
    pub table: &'a RouteTable,
    pub parts: &'a Parts,
    pub head: RequestHead<'a>,
    pub client: Client<'a>,
    pub matched: RouteMatch<'a>,
}

impl RequestContext<'_> {
    pub fn draw(&self) -> u32 {
        self.connection.proxy.draws.next()
    }
}

async fn handle(connection: Arc<Connection>, request: Request<Incoming>) -> Response<ProxyBody> {
    let start = Instant::now();
    let Some(table) = connection.proxy.store.current() else {
        return local_response(StatusCode::SERVICE_UNAVAILABLE, "no configuration");
    };
    let (parts, body) = request.into_parts();
    let protocol = request_protocol(&parts);
    let answer = route_request(&connection, &table, &parts, body).await;
    let Some(port) = table.port(connection.key) else {
        return answer.response;
    };
    let (endpoint, status, flags) = (answer.endpoint, answer.response.status(), answer.flags);
    let mut last = connection
        .last_series
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    match last.as_ref() {
        Some(counted) if counted.matches(&table, endpoint, status, flags, protocol) => {
            counted.series.observe(start.elapsed());
        }
        _ => {
            let report = RequestReport {
                source: Peer::at(&table, connection.peer.ip()),
                destination: endpoint.map_or_else(Peer::unknown, |e| Peer::at(&table, e.ip())),
                service: ServiceLabels::of(&port.service),
                protocol,
                status: status.as_u16(),
                flags,
            };
            let series = RequestSeries::of(&connection.proxy.metrics, report);
            series.observe(start.elapsed());
            *last = Some(CountedIn {
                table: Arc::clone(&table),
                endpoint,
                status,
                flags,
                protocol,
                series,
            });
        }
    }
    drop(last);
    answer.response
}

fn request_protocol(parts: &Parts) -> RequestProtocol {
    let grpc = parts
        .headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if grpc {
        RequestProtocol::grpc
    } else {
        RequestProtocol::http
    }
}

/// The route's answer to one request.
async fn route_request(
    connection: &Connection,
    table: &RouteTable,
    parts: &Parts,
    body: Incoming,
) -> Answer {
    let Some(port) = table.port(connection.key) else {
        // The service port left the configuration after the connection came.
        return Answer::local(
            StatusCode::NOT_FOUND,
            "route not found",
            ResponseFlags::NO_ROUTE,
        );
    };
    let head = RequestHead::from_parts(parts);
    let client = Client::identify(table, connection.peer.ip());
    let decision = authz::authorize_in(table, port.service.id, port.port, &client, Some(&head));
    if !decision.allowed() {
        tracing::debug!(peer = %connection.peer, service = %port.service.hostname, ?decision, "request denied by AuthorizationPolicy");
        return Answer::local(StatusCode::FORBIDDEN, RBAC_DENIED, ResponseFlags::default());
    }
    let Some(matched) = first_match(port, &head, &client) else {
        return Answer::local(
            StatusCode::NOT_FOUND,
            "route not found",
            ResponseFlags::NO_ROUTE,
        );
    };
    let context = RequestContext {
        connection,
        table,
        parts,
        head,
        client,
        matched,
    };
    let route = matched.route;
    let mut flags = ResponseFlags::default();
    if let Some(fault) = &route.spec.fault {
        let decision = filters::decide_fault(fault, &mut || context.draw());
        if let Some(delay) = decision.delay {
            tokio::time::sleep(delay).await;
            flags.insert(ResponseFlags::DELAY_INJECTED);
        }
        if let Some(status) = decision.abort {
            return Answer::local(
                status,
                "fault filter abort",
                flags | ResponseFlags::FAULT_INJECTED,
            );
        }
    }
    match &route.spec.action {
        RouteAction::Redirect(redirect) => {
            match filters::redirect(route, redirect, &context.head, matched.matched_prefix) {
                Ok(answer) => {
                    let mut response = local_response(answer.status, Bytes::new());
                    response
                        .headers_mut()
                        .insert(header::LOCATION, answer.location);
                    Answer {
                        response,
                        flags,
                        endpoint: None,
                    }
                }
                Err(error) => rewrite_failed(&error, flags),
            }
        }
        RouteAction::DirectResponse(direct) => {
            // Validation keeps the status within 200..=599.
            let status =
                StatusCode::from_u16(direct.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let body = direct.body.clone().unwrap_or_default();
            Answer::local(status, body, flags)
        }
        RouteAction::Forward(destinations) => {
            forward::forward(&context, destinations, body, flags).await
        }
    }
}

/// The answer when a rewrite cannot be made for this request.
pub(crate) fn rewrite_failed(error: &RewriteError, flags: ResponseFlags) -> Answer {
    let status = match error {
        RewriteError::NoAuthority => StatusCode::BAD_REQUEST,
        RewriteError::InvalidPath(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    Answer::local(status, error.to_string(), flags)
}
