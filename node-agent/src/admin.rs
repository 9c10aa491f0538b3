//! The admin server: `/healthz`, `/readyz`, `/debug/snapshot`, `/debug/authz` (the authorization
//! counters per workload and policy, see `authz_counters.rs`).
//!
//! `/readyz` answers 200 only while a snapshot is live, the links run this agent's programs (no
//! upgrade pending), the agent has not uninstalled, and the data-plane thread runs; the agent exits
//! soon after the data plane stops (see `supervise.rs`), and until then it is not ready.
use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use http_body_util::Full;
use hyper::{
    Request, Response, StatusCode, body::Bytes, header, server::conn::http1, service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::{
    agent::{DataPlaneState, SharedStatus, Status},
    authz_counters::{AuthzCount, AuthzCounterMap},
    maps::{CounterMap, Counters},
};

/// The maps the admin server reads.
#[derive(Clone)]
pub struct Maps {
    pub counters: Arc<CounterMap>,
    pub authz_counters: Arc<AuthzCounterMap>,
}

/// What `/debug/authz` answers.
#[derive(serde::Serialize)]
struct AuthzReport {
    /// The programs' global counters (`authz_*` and `inconsistent` are authorization's).
    counters: Counters,
    /// Connections per (workload, policy, action, reason).
    by_policy: Vec<AuthzCount>,
    /// Enrolled namespaces with the authorization program attached.
    attached_netns: usize,
}

/// Serves until the process exits.
pub async fn serve(listener: TcpListener, status: SharedStatus, maps: Maps) {
    info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "admin server listening");
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                warn!(error = %e, "admin accept failed");
                continue;
            }
        };
        let status = status.clone();
        let maps = maps.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let response = route(&req, &status, &maps, peer);
                async move { Ok::<_, Infallible>(response) }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                warn!(error = %e, "admin connection failed");
            }
        });
    }
}

fn route<B>(
    req: &Request<B>,
    status: &SharedStatus,
    maps: &Maps,
    _peer: SocketAddr,
) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => readyz(&status.lock().unwrap_or_else(|p| p.into_inner())),
        "/debug/snapshot" => {
            let mut snapshot = match status.lock() {
                Ok(s) => s.clone(),
                Err(_) => return text(StatusCode::INTERNAL_SERVER_ERROR, "status lock poisoned\n"),
            };
            match maps.counters.read() {
                Ok(c) => snapshot.counters = Some(c),
                Err(e) => warn!(error = %e, "reading counters"),
            }
            json(&snapshot)
        }
        "/debug/authz" => authz(status, maps),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// `/debug/authz`: the counters, named from the live snapshot.
fn authz(status: &SharedStatus, maps: &Maps) -> Response<Full<Bytes>> {
    let (names, attached_netns) = match status.lock() {
        Ok(s) => (s.authz_policies.clone(), s.authz_links),
        Err(_) => return text(StatusCode::INTERNAL_SERVER_ERROR, "status lock poisoned\n"),
    };
    let report = maps.counters.read().and_then(|counters| {
        Ok(AuthzReport {
            counters,
            by_policy: maps.authz_counters.read(&names)?,
            attached_netns,
        })
    });
    match report {
        Ok(report) => json(&report),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("reading the counters: {e}\n"),
        ),
    }
}

fn json<T: serde::Serialize>(value: &T) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => Response::builder()
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "response\n")),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e}\n")),
    }
}

/// 200 while ready (see [`Status::is_ready`]); 503 with the reason otherwise.
fn readyz(status: &Status) -> Response<Full<Bytes>> {
    let unavailable = |reason: &str| text(StatusCode::SERVICE_UNAVAILABLE, &format!("{reason}\n"));
    match &status.data_plane {
        _ if status.is_ready() => text(StatusCode::OK, "ready\n"),
        DataPlaneState::Stopped { reason } => unavailable(&format!("data plane stopped: {reason}")),
        DataPlaneState::Running => match &status.uninstalled {
            Some(u) => unavailable(&format!("uninstalled: {}", u.outcome)),
            None if status.upgrade_pending() => unavailable(
                "upgrading: the links run another layout's programs until a snapshot is live in this layout's maps",
            ),
            None => unavailable("no snapshot applied yet"),
        },
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(status: &Status) -> u16 {
        readyz(status).status().as_u16()
    }

    #[test]
    fn ready_only_with_a_live_snapshot_and_a_running_data_plane() {
        let mut status = Status::default();
        assert_eq!(code(&status), 503, "ready before any snapshot");
        status.ready = true;
        assert_eq!(code(&status), 200);
        status.data_plane = DataPlaneState::Stopped {
            reason: "panicked: boom".into(),
        };
        assert_eq!(code(&status), 503, "ready after the data plane stopped");
    }

    #[test]
    fn not_ready_while_an_upgrade_waits_or_after_an_uninstall() {
        use crate::lifecycle::{Uninstalled, Upgrade, UpgradeState};
        let mut status = Status {
            ready: true,
            upgrade: Some(Upgrade {
                retiring: vec!["/sys/fs/bpf/kmesh/v1-0000000000000000".into()],
                state: UpgradeState::WaitingForSnapshot { last_error: None },
            }),
            ..Status::default()
        };
        assert_eq!(
            code(&status),
            503,
            "ready while the links run the old layout"
        );
        status.upgrade.as_mut().unwrap().state = UpgradeState::Switched { at_unix_ms: 1 };
        assert_eq!(code(&status), 200);
        status.uninstalled = Some(Uninstalled {
            at_unix_ms: 2,
            outcome: "every pin removed".into(),
        });
        let response = readyz(&status);
        assert_eq!(response.status().as_u16(), 503, "ready after uninstalling");
    }
}
