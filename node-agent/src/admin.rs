//! The admin server: `/healthz`, `/readyz`, `/version`, `/debug/snapshot`, `/debug/authz` (the
//! authorization counters per workload and policy, see `authz_counters.rs`), `/debug/log-level`
//! (the log filter, read and changed at runtime, see `admin/log_level.rs`), `/debug/config_dump`
//! and `/debug/config_dump.bin` (the live snapshot, `admin/config_dump.rs`) and
//! `/debug/bpf/<table>` (a map's active slot as the kernel holds it, `admin/bpf_dump.rs`). The
//! paths `kmeshctl` reads are defined once, in `kmesh_snapshot::admin_contract`.
//!
//! `/readyz` answers 200 only while a snapshot is live, the links run this agent's programs (no
//! upgrade pending), the agent has not uninstalled, and the data-plane thread runs; the agent exits
//! soon after the data plane stops (see `supervise.rs`), and until then it is not ready.
pub mod bpf_dump;
pub mod config_dump;
pub mod log_level;

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use http_body_util::{BodyExt as _, Full, LengthLimitError, Limited};
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Body, Bytes},
    header,
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use kmesh_snapshot::admin_contract::{
    AUTHZ_PATH, BPF_PATH_PREFIX, BPF_TABLES, CONFIG_DUMP_BINARY_PATH, CONFIG_DUMP_PATH,
    LOG_LEVEL_PATH, MAX_LOG_LEVEL_BODY, SNAPSHOT_PATH, VERSION_PATH,
};
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::{
    agent::{DataPlaneState, SharedStatus, Status},
    authz_counters::{AuthzCount, AuthzCounterMap},
    maps::{CounterMap, Counters, KernelSlots},
};

/// What a request body's error must convert into (for [`Limited`]).
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The maps the admin server reads.
#[derive(Clone)]
pub struct Maps {
    pub counters: Arc<CounterMap>,
    pub authz_counters: Arc<AuthzCounterMap>,
    /// The per-generation maps, read only (`/debug/bpf/<table>`); the data plane writes them
    /// through its own handles.
    pub slots: Arc<KernelSlots>,
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
                let (status, maps) = (status.clone(), maps.clone());
                async move { Ok::<_, Infallible>(route(req, &status, &maps, peer).await) }
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

async fn route<B>(
    req: Request<B>,
    status: &SharedStatus,
    maps: &Maps,
    _peer: SocketAddr,
) -> Response<Full<Bytes>>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => readyz(&status.lock().unwrap_or_else(|p| p.into_inner())),
        VERSION_PATH => version(&status.lock().unwrap_or_else(|p| p.into_inner())),
        LOG_LEVEL_PATH => match log_level::process() {
            Some(level) => log_level_endpoint(req, level).await,
            None => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "this process's log filter cannot be changed at runtime\n",
            ),
        },
        SNAPSHOT_PATH => {
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
        AUTHZ_PATH => authz(status, maps),
        CONFIG_DUMP_PATH => match live_snapshot(status) {
            Ok(decoded) => json(&config_dump::view(&decoded)),
            Err(e) => no_snapshot(e),
        },
        CONFIG_DUMP_BINARY_PATH => match live_snapshot(status) {
            Ok(decoded) => match config_dump::binary(&decoded) {
                Ok(bytes) => Response::builder()
                    .header(header::CONTENT_TYPE, "application/octet-stream")
                    .body(Full::new(Bytes::from(bytes)))
                    .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "response\n")),
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e}\n")),
            },
            Err(e) => no_snapshot(e),
        },
        path if path.starts_with(BPF_PATH_PREFIX) => {
            bpf_table(&path[BPF_PATH_PREFIX.len()..], status, &*maps.slots)
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// The live snapshot, or why there is none.
fn live_snapshot(
    status: &SharedStatus,
) -> Result<Arc<kmesh_snapshot::Decoded>, config_dump::ConfigDumpError> {
    config_dump::live(&status.lock().unwrap_or_else(|p| p.into_inner()))
}

/// `503` with the reason there is no snapshot to show.
fn no_snapshot(e: config_dump::ConfigDumpError) -> Response<Full<Bytes>> {
    text(StatusCode::SERVICE_UNAVAILABLE, &format!("{e}\n"))
}

/// `/debug/bpf/<table>`: `404` with the table names for an unknown table.
fn bpf_table<M: crate::slots::SlotMaps>(
    name: &str,
    status: &SharedStatus,
    slots: &M,
) -> Response<Full<Bytes>> {
    let Some(table) = bpf_dump::table(name) else {
        return text(
            StatusCode::NOT_FOUND,
            &format!(
                "no table {name:?}; the tables are: {}\n",
                BPF_TABLES.join(", ")
            ),
        );
    };
    // The kernel holds no policy names; the live snapshot's policy table names the verdicts.
    let live = status
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .live_snapshot
        .clone();
    let policies = live
        .as_ref()
        .map_or(&[][..], |d| &d.snapshot.authz.policies);
    match bpf_dump::dump(slots, table, policies) {
        Ok(dump) => json(&dump),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e}\n")),
    }
}

/// `/version`: this binary's version and the layout of its maps (see `admin_contract`).
fn version(status: &Status) -> Response<Full<Bytes>> {
    let version = env!("CARGO_PKG_VERSION");
    text(
        StatusCode::OK,
        &format!("kmesh-agent {version} (layout {})\n", status.layout),
    )
}

/// `/debug/log-level`: `GET` answers the filter in force; `PUT` or `POST` replaces it with the body
/// (`400` with the parser's message, and nothing changed, when it does not parse). The new filter
/// is an override: it holds until a generation changes the snapshot's log level (the next change of
/// `KmeshConfig.spec.logLevel`, see `log_level::on_generation`) or the agent restarts.
async fn log_level_endpoint<B>(
    req: Request<B>,
    level: &log_level::LogLevel,
) -> Response<Full<Bytes>>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    let answer = |result: Result<String, log_level::LogLevelError>| match result {
        Ok(filter) => text(StatusCode::OK, &format!("{filter}\n")),
        Err(e @ log_level::LogLevelError::Unavailable(_)) => {
            text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e}\n"))
        }
        Err(e) => text(StatusCode::BAD_REQUEST, &format!("{e}\n")),
    };
    match *req.method() {
        Method::GET | Method::HEAD => answer(level.current()),
        Method::PUT | Method::POST => {
            let body = match Limited::new(req.into_body(), MAX_LOG_LEVEL_BODY)
                .collect()
                .await
            {
                Ok(body) => body.to_bytes(),
                Err(e) if e.is::<LengthLimitError>() => {
                    return text(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        &format!("a log filter has at most {MAX_LOG_LEVEL_BODY} bytes\n"),
                    );
                }
                Err(e) => {
                    return text(
                        StatusCode::BAD_REQUEST,
                        &format!("reading the log filter: {e}\n"),
                    );
                }
            };
            let Ok(body) = std::str::from_utf8(&body) else {
                return text(StatusCode::BAD_REQUEST, "the log filter is not UTF-8\n");
            };
            let previous = level.current().unwrap_or_default();
            let result = level.set(body);
            if let Ok(now) = &result {
                info!(%previous, %now, "log filter changed through the admin server");
            }
            answer(result)
        }
        _ => {
            let mut response = text(
                StatusCode::METHOD_NOT_ALLOWED,
                "GET the log filter, or PUT or POST a new one\n",
            );
            response.headers_mut().insert(
                header::ALLOW,
                header::HeaderValue::from_static("GET, HEAD, PUT, POST"),
            );
            response
        }
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

    /// The endpoint over a filter of the test's own subscriber (kept alive by the caller).
    fn log_level(initial: &str) -> (log_level::LogLevel, impl tracing::Subscriber) {
        use tracing_subscriber::{EnvFilter, layer::SubscriberExt as _, registry, reload};
        let (layer, handle) = reload::Layer::new(EnvFilter::new(initial));
        (log_level::LogLevel::new(handle), registry().with(layer))
    }

    async fn call(level: &log_level::LogLevel, method: Method, body: &str) -> (u16, String) {
        let req = Request::builder()
            .method(method)
            .uri(LOG_LEVEL_PATH)
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        let response = log_level_endpoint(req, level).await;
        let code = response.status().as_u16();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (code, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn the_log_level_endpoint_sets_from_the_body_and_refuses_bad_input() {
        let (level, _subscriber) = log_level("info");
        assert_eq!(call(&level, Method::GET, "").await, (200, "info\n".into()));
        assert_eq!(
            call(&level, Method::PUT, "debug").await,
            (200, "debug\n".into())
        );
        assert_eq!(
            call(&level, Method::POST, "warn\n").await,
            (200, "warn\n".into())
        );
        let (code, message) = call(&level, Method::PUT, "kmesh_agent=loud").await;
        assert_eq!(code, 400);
        assert!(message.starts_with("invalid log filter"), "{message}");
        let too_long = "a".repeat(MAX_LOG_LEVEL_BODY + 1);
        assert_eq!(call(&level, Method::PUT, &too_long).await.0, 413);
        assert_eq!(call(&level, Method::DELETE, "").await.0, 405);
        assert_eq!(call(&level, Method::GET, "").await, (200, "warn\n".into()));
    }

    #[tokio::test]
    async fn an_unknown_bpf_table_lists_the_tables() {
        let status: SharedStatus = Default::default();
        let slots = crate::fake_slots::FakeSlots::empty();
        let response = bpf_table("nat", &status, &slots);
        assert_eq!(response.status().as_u16(), 404);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let body = String::from_utf8(body.to_vec()).unwrap();
        assert!(
            body.contains("no table \"nat\"; the tables are: generation, services, routes"),
            "{body}"
        );
        assert_eq!(bpf_table("routes", &status, &slots).status().as_u16(), 200);
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
