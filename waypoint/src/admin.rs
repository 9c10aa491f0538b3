//! The admin endpoint (`--admin`): `/healthz` (the process is up), `/readyz` (a configuration is
//! loaded and the listeners are bound, and the waypoint is not draining: else 503) and `/metrics`
//! (Prometheus text). It owns the readiness state and promises answers that never block on the
//! proxy's traffic.
use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use http::{Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::{
    config_store::ConfigStore,
    http_proxy::{full, local_response},
    metrics::Metrics,
    upstream::ProxyBody,
};

/// What readiness depends on besides the configuration.
#[derive(Default)]
pub struct Readiness {
    pub listening: AtomicBool,
    pub draining: AtomicBool,
}

/// What the admin endpoint reads.
pub struct Admin {
    pub store: Arc<ConfigStore>,
    pub metrics: Metrics,
    pub readiness: Arc<Readiness>,
}

impl Admin {
    /// Whether the waypoint takes traffic, and if not, why.
    pub fn ready(&self) -> Result<(), &'static str> {
        if self.readiness.draining.load(Ordering::SeqCst) {
            Err("draining")
        } else if self.store.current().is_none() {
            Err("no configuration loaded")
        } else if !self.readiness.listening.load(Ordering::SeqCst) {
            Err("not listening")
        } else {
            Ok(())
        }
    }

    fn answer(&self, request: &Request<Incoming>) -> Response<ProxyBody> {
        match request.uri().path() {
            "/healthz" => local_response(StatusCode::OK, "ok\n"),
            "/readyz" => match self.ready() {
                Ok(()) => local_response(StatusCode::OK, "ready\n"),
                Err(why) => local_response(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
            },
            "/metrics" => {
                let mut response = Response::new(full(self.metrics.render()));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    http::HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                response
            }
            _ => local_response(StatusCode::NOT_FOUND, "not found\n"),
        }
    }
}

/// Serves the admin endpoint on `listener`, HTTP/1.1, until the process ends (it answers
/// `/readyz` 503 while the waypoint drains).
pub async fn serve(listener: TcpListener, admin: Arc<Admin>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        };
        let admin = Arc::clone(&admin);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let admin = Arc::clone(&admin);
                async move { Ok::<_, Infallible>(admin.answer(&request)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
