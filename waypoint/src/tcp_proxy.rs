//! TCP pass-through: a connection that is not HTTP goes to an endpoint of the port's `tcp`
//! destinations, chosen by weight and by the cluster's load balancer, and its bytes are copied
//! both ways unaltered. It owns nothing but the copy and promises:
//! - the upstream connection is made at once, before the client writes anything, so protocols
//!   where the server speaks first (MySQL, SMTP) work;
//! - a half-close is passed on: when one side ends its writes, the other side's writes are shut
//!   down, and the other direction goes on until it ends too;
//! - a connection the AuthorizationPolicies deny (judged on their L4 attributes, `authz`) is
//!   closed at once, before any upstream connection (counted as `authz_denied`);
//! - a port without `tcp` destinations, or a cluster without endpoints, closes the connection
//!   (counted as `no_tcp_destination`); a failed connect closes it too (counted with `UF`).
//!
//! The connection keeps the route table it started with until it ends. Its bytes are counted
//! when it ends (a connection that ends in an error counts none).
use std::{net::SocketAddr, time::Duration};

use http::{HeaderMap, Method};
use tokio::net::TcpStream;

use crate::{
    authz,
    choice::choose_destination,
    identity::Client,
    matching::RequestHead,
    metrics::{ConnectionRefusal, Metrics, Peer, ResponseFlags, ServiceLabels},
    proxy::Proxy,
    table::{PortTable, RouteTable},
};

/// Proxies `client` (from `peer`, to the service port `port` of `table`) as TCP.
pub async fn serve(
    mut client: TcpStream,
    peer: SocketAddr,
    table: &RouteTable,
    port: &PortTable,
    proxy: &Proxy,
) {
    let client_identity = Client::identify(table, peer.ip());
    let decision = authz::authorize_in(table, port.service.id, port.port, &client_identity, None);
    if !decision.allowed() {
        proxy
            .metrics
            .connection_refused(ConnectionRefusal::authz_denied);
        tracing::debug!(%peer, service = %port.service.hostname, port = port.port, ?decision, "denied by AuthorizationPolicy: closed");
        return;
    }
    let mut draw = || proxy.draws.next();
    let Some((endpoint, in_flight)) = choose(table, port, peer, &mut draw) else {
        proxy
            .metrics
            .connection_refused(ConnectionRefusal::no_tcp_destination);
        tracing::debug!(%peer, service = %port.service.hostname, port = port.port, "no TCP destination: closed");
        return;
    };
    let labels = |flags| {
        Metrics::tcp_labels(
            Peer::at(table, peer.ip()),
            Peer::at(table, endpoint.ip()),
            ServiceLabels::of(&port.service),
            flags,
        )
    };
    let mut upstream = match connect(endpoint, proxy.settings.connect_timeout).await {
        Ok(upstream) => upstream,
        Err(error) => {
            let labels = labels(ResponseFlags::UPSTREAM_CONNECT_FAILURE);
            proxy.metrics.tcp_opened(&labels);
            proxy.metrics.tcp_closed(&labels, 0, 0);
            tracing::debug!(%peer, %endpoint, %error, "TCP upstream connect failed");
            return;
        }
    };
    let labels = labels(ResponseFlags::default());
    proxy.metrics.tcp_opened(&labels);
    let copied = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
    drop(in_flight);
    let (to_server, to_client) = match copied {
        Ok(counts) => counts,
        Err(error) => {
            tracing::debug!(%peer, %endpoint, %error, "TCP connection ended in an error");
            (0, 0)
        }
    };
    proxy.metrics.tcp_closed(&labels, to_server, to_client);
}

/// The endpoint by the port's `tcp` weights and the cluster's balancer (a TCP connection has no
/// request: a hash on a header, cookie or query parameter has no key and picks at random; a hash
/// on the source address works), and its in-flight count.
fn choose(
    table: &RouteTable,
    port: &PortTable,
    peer: SocketAddr,
    draw: &mut impl FnMut() -> u32,
) -> Option<(SocketAddr, crate::choice::InFlight)> {
    let destination = choose_destination(&port.tcp, draw)?;
    let cluster = table.cluster(port.tcp.get(destination)?.cluster)?;
    let method = Method::GET;
    let headers = HeaderMap::new();
    let head = RequestHead {
        method: &method,
        path: "",
        query: None,
        authority: None,
        scheme: None,
        headers: &headers,
    };
    let client = Client::identify(table, peer.ip());
    let choice = cluster.choose_endpoint(&head, &client, draw)?;
    let endpoint = cluster.spec.endpoints.get(choice.index)?.address;
    let load = cluster.loads.get(choice.index)?;
    Some((endpoint, load.start()))
}

async fn connect(endpoint: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(endpoint))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}
