//! Connections to endpoints. It owns the connection pools and promises that a request goes to
//! the endpoint address it is given (a pod address: never a service address, so nothing the
//! waypoint sends is steered back into it by the kernel), and that every failure is one of the
//! kinds retries and statuses are decided by ([`UpstreamError`]).
//!
//! HTTP/1.1: hyper-util's pooled client, which keeps idle connections per authority; requests
//! carry the endpoint as their URI's authority, so the pool is per endpoint, and their `Host`
//! header names the service (the client keeps a `Host` that is set). HTTP/2 (h2c with prior
//! knowledge): one multiplexed connection per endpoint, made on first use and made again once it
//! closes; requests carry the service as their `:authority`.
use std::{collections::HashMap, net::SocketAddr, sync::Mutex, time::Duration};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use hyper::{body::Incoming, client::conn::http2};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
};
use kmesh_operator_client::error_chain::chain as error_chain;
use tokio::net::TcpStream;

/// The error of a body the proxy relays.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Every body the proxy sends or answers with.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// How an upstream request failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream connect error: {0}")]
    Connect(String),
    #[error("upstream reset before answering: {0}")]
    Reset(String),
    #[error("upstream refused the stream: {0}")]
    RefusedStream(String),
}

/// The protocol spoken to an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wire {
    Http1,
    Http2,
}

/// The pools of every endpoint.
pub struct Upstreams {
    http1: Client<HttpConnector, ProxyBody>,
    http2: Mutex<HashMap<SocketAddr, http2::SendRequest<ProxyBody>>>,
    connect_timeout: Duration,
}

impl Upstreams {
    pub fn new(connect_timeout: Duration) -> Upstreams {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        let http1 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        Upstreams {
            http1,
            http2: Mutex::new(HashMap::new()),
            connect_timeout,
        }
    }

    /// Sends `request` to `endpoint` over `wire`, until the response's head.
    pub async fn send(
        &self,
        wire: Wire,
        endpoint: SocketAddr,
        request: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        match wire {
            Wire::Http1 => self.http1.request(request).await.map_err(|e| {
                if e.is_connect() {
                    UpstreamError::Connect(error_chain(&e))
                } else {
                    classify_reset(&e)
                }
            }),
            Wire::Http2 => {
                let mut sender = self.http2_sender(endpoint).await?;
                sender
                    .ready()
                    .await
                    .map_err(|e| UpstreamError::Reset(error_chain(&e)))?;
                sender
                    .send_request(request)
                    .await
                    .map_err(|e| classify_reset(&e))
            }
        }
    }

    /// The endpoint's HTTP/2 connection, made if there is none open.
    async fn http2_sender(
        &self,
        endpoint: SocketAddr,
    ) -> Result<http2::SendRequest<ProxyBody>, UpstreamError> {
        if let Some(sender) = self.lock_http2().get(&endpoint)
            && !sender.is_closed()
        {
            return Ok(sender.clone());
        }
        let connect = |e: &dyn std::error::Error| UpstreamError::Connect(error_chain(e));
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(endpoint))
            .await
            .map_err(|e| connect(&e))?
            .map_err(|e| connect(&e))?;
        let _ = stream.set_nodelay(true);
        let (sender, connection) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .map_err(|e| connect(&e))?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%endpoint, error = %error_chain(&error), "upstream HTTP/2 connection ended");
            }
        });
        // Two first requests may race to connect: the later connection replaces the earlier one
        // in the pool, which closes once its streams end.
        self.lock_http2().insert(endpoint, sender.clone());
        Ok(sender)
    }

    fn lock_http2(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, http2::SendRequest<ProxyBody>>> {
        self.http2
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A failure after connecting: a refused HTTP/2 stream, or a reset.
fn classify_reset(error: &(dyn std::error::Error + 'static)) -> UpstreamError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(h2) = e.downcast_ref::<h2::Error>()
            && h2.reason() == Some(h2::Reason::REFUSED_STREAM)
        {
            return UpstreamError::RefusedStream(error_chain(error));
        }
        source = e.source();
    }
    UpstreamError::Reset(error_chain(error))
}
