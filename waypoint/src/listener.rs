//! The waypoint's listeners: accept, find where each connection was going, and hand it to the
//! proxy its service port's protocol names. It owns the accept loops and the connection's first
//! decisions, and promises:
//! - a connection goes only where its origin (the service id and port the kernel wrote in its SYN,
//!   [`crate::origin`]) says: one without an origin, or whose origin names a service port this
//!   waypoint does not serve, is closed at once (counted, logged at debug), never proxied to a
//!   guess;
//! - `Tcp` ports are passed through, `Http` ports served as HTTP/1.1 or h2c, `Http2` ports as h2c
//!   only, `Detect` ports sniffed ([`crate::sniff`]: HTTP if the first bytes are, else TCP);
//! - when the waypoint drains, the loops stop accepting; [`Connections`] tells when the
//!   connections in progress have ended.
//!
//! [`serve_connection`] is the seam between the SYN reader and the rest: tests call it with the
//! origin they choose.
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::Notify,
};

use kmesh_snapshot::waypoint::Protocol;

use crate::{
    http_proxy,
    metrics::ConnectionRefusal,
    origin::{self, Origin},
    proxy::Proxy,
    sniff::{self, Sniffed},
    table::PortKey,
    tcp_proxy,
};

/// Binds a listener at `address` that keeps the SYN of each connection (for its origin). `[::]`
/// takes IPv4 clients too where the host's `net.ipv6.bindv6only` is 0 (Linux's default).
pub fn bind(address: SocketAddr) -> std::io::Result<TcpListener> {
    let listener = std::net::TcpListener::bind(address)?;
    // A connection whose SYN came between bind and this call has no saved SYN: it is closed as
    // one without origin. The waypoint is not ready (`/readyz`) before this returns.
    origin::enable_on_listener(&listener).map_err(std::io::Error::other)?;
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
}

/// Binds one of the listeners that share `address` (`SO_REUSEPORT`: the kernel spreads new
/// connections over them), keeping SYNs as [`bind`]'s do: each of the waypoint's threads has its
/// own. Within a tokio runtime (the listener registers with it). The address is shared only with
/// sockets of the same user that also ask to share it: another program on the port still fails
/// this with `EADDRINUSE`.
pub fn bind_shared(address: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if address.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    origin::enable_on_listener(&socket).map_err(std::io::Error::other)?;
    socket.bind(address)?;
    socket.listen(1024)
}

/// Connections in progress, for the drain.
#[derive(Default)]
pub struct Connections {
    active: AtomicUsize,
    idle: Notify,
}

/// One connection in progress; dropping it ends it.
pub struct Active(Arc<Connections>);

impl Connections {
    pub fn start(self: &Arc<Self>) -> Active {
        self.active.fetch_add(1, Ordering::SeqCst);
        Active(Arc::clone(self))
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// Waits until no connection is in progress.
    pub async fn idle(&self) {
        loop {
            let idle = self.idle.notified();
            if self.active() == 0 {
                return;
            }
            idle.await;
        }
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Accepts connections on `listener` until the waypoint drains.
pub async fn accept_loop(listener: TcpListener, proxy: Arc<Proxy>, connections: Arc<Connections>) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = proxy.drained() => return,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of descriptors or memory, or a connection reset before accept: go on.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let active = connections.start();
        let proxy = Arc::clone(&proxy);
        tokio::spawn(async move {
            let _active = active;
            // The saved SYN is read on the socket as tokio holds it: taking it out of the
            // reactor and back would cost two epoll_ctl calls per connection.
            let origin = origin::of_accepted(&stream);
            let origin = match origin {
                Ok(origin) => origin,
                Err(error) => {
                    proxy
                        .metrics
                        .connection_refused(ConnectionRefusal::origin_error);
                    tracing::debug!(%peer, %error, "origin unreadable: closed");
                    return;
                }
            };
            serve_connection(stream, peer, origin, proxy).await;
        });
    }
}

/// Serves one accepted connection from `peer` whose SYN carried `origin`.
pub async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    origin: Option<Origin>,
    proxy: Arc<Proxy>,
) {
    let refuse = |reason: ConnectionRefusal| {
        proxy.metrics.connection_refused(reason);
        tracing::debug!(%peer, ?origin, ?reason, "connection closed before proxying");
    };
    let Some(origin) = origin else {
        return refuse(ConnectionRefusal::no_origin);
    };
    let key = PortKey {
        service_id: origin.service_id,
        port: origin.port,
    };
    let Some(table) = proxy.store.current() else {
        return refuse(ConnectionRefusal::no_configuration);
    };
    let Some(port) = table.port(key) else {
        return refuse(ConnectionRefusal::unknown_service_port);
    };
    let _ = stream.set_nodelay(true);
    let http = match port.protocol {
        Protocol::Tcp => None,
        Protocol::Http => Some(false),
        Protocol::Http2 => Some(true),
        Protocol::Detect => match sniff::sniff(&stream, proxy.settings.sniff_timeout).await {
            Ok(Sniffed::Http1 | Sniffed::Http2) => Some(false),
            Ok(Sniffed::Tcp | Sniffed::NeedMore) => None,
            Err(error) => {
                tracing::debug!(%peer, %error, "connection failed while sniffed");
                return;
            }
        },
    };
    match http {
        None => tcp_proxy::serve(stream, peer, &table, port, &proxy).await,
        Some(http2_only) => {
            // Each request takes the table anew.
            drop(table);
            let connection = Arc::new(http_proxy::Connection::new(Arc::clone(&proxy), key, peer));
            http_proxy::serve(stream, connection, http2_only).await;
        }
    }
}
