//! The operator as a configuration source (`--operator`): the waypoint long-polls its
//! configuration through the waypoint–operator contract (`kmesh_snapshot::waypoint_contract`, its
//! one definition), as the node agent long-polls its snapshot (node-agent/src/source.rs, whose
//! small pieces this copies rather than depending on the agent).
//!
//! Each request is `GET waypoint_config_url(base, waypoint, wait)` with `Accept:
//! WAYPOINT_CONFIG_MEDIA_TYPE`, `If-None-Match` with the ETag last received (none at first) and
//! `Authorization: Bearer <token>` read from `--token-file` for every request (projected tokens
//! rotate; without the flag, no header, for local use). TLS is verified against `--operator-ca`
//! for an https URL (an https URL without a CA file is refused at start-up, as the agent does);
//! the CA file is re-read before each request and the client rebuilt when it changed. An http URL
//! is plain HTTP.
//!
//! What each answer does ([`Outcome`]):
//! - `200`: the body is yielded to the store (which validates it and may refuse it, keeping the
//!   last good one) and its ETag remembered, adopted or not: a refused configuration is not
//!   fetched again in a loop but stays refused until the operator publishes another (the refusal
//!   is logged and counted in `kmesh_waypoint_configs_refused_total`);
//! - `304`: nothing changed within the wait: ask again at once;
//! - `404`: the operator has no configuration for this waypoint (not yet, or no more): the
//!   current one stays, logged, retried with backoff;
//! - any other status (`401`, `403`, `503`, ...) or no answer: the current one stays, logged with
//!   the status and the body's start (or the error with its causes), retried with backoff.
//!
//! The backoff ([`Backoff`]) doubles from 200 ms to 5 s, with full jitter below that ceiling, and
//! is reset by a `200` or a `304`.
//! Every answer is counted in `kmesh_waypoint_operator_requests_total{code}`.
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::{Request, StatusCode, body::Bytes, header};
use hyper_util::client::legacy::Client;
use kmesh_operator_client::{
    Connector, TrustedCa, client_of, error_chain, full_jitter, https_connector,
};
use kmesh_snapshot::{
    waypoint::{MAX_WAYPOINT_CONFIG_BYTES, WaypointName},
    waypoint_contract::{
        WAYPOINT_CONFIG_MEDIA_TYPE, waypoint_config_path, waypoint_config_url,
        waypoint_of_config_path,
    },
};

use crate::{
    config_store::ConfigSource,
    metrics::{Metrics, OperatorOutcome},
};

/// How long the operator may hold a long poll (the contract caps it at `MAX_WAIT`).
pub const LONG_POLL: Duration = Duration::from_secs(30);
/// A request that has no answer this long after the wait is abandoned (and retried).
const ANSWER_GRACE: Duration = Duration::from_secs(15);
pub const BACKOFF_MIN: Duration = Duration::from_millis(200);
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How much of an error answer's body is logged.
const LOGGED_BODY_BYTES: usize = 512;

/// `--waypoint NAMESPACE/NAME`: the waypoint whose configuration is asked for. Each part must be
/// a Kubernetes object name, as the contract's paths require.
pub fn parse_waypoint(value: &str) -> Result<WaypointName, String> {
    let Some((namespace, name)) = value.split_once('/') else {
        return Err(format!(
            "{value:?} is not NAMESPACE/NAME (the waypoint's Gateway)"
        ));
    };
    waypoint_of_config_path(&waypoint_config_path(namespace, name)).ok_or_else(|| {
        format!(
            "{value:?} is not NAMESPACE/NAME: each must be a Kubernetes object name (lowercase \
             letters, digits, '-' and '.')"
        )
    })
}

/// Where and how to ask the operator.
#[derive(Clone, Debug)]
pub struct OperatorSettings {
    /// `http://...` or `https://...`, without the contract's path.
    pub url: String,
    pub waypoint: WaypointName,
    /// PEM CA certificates of the operator's serving certificate (required for https).
    pub ca_file: Option<PathBuf>,
    /// A bearer token, read for every request.
    pub token_file: Option<PathBuf>,
    /// The long poll's wait ([`LONG_POLL`]; tests shorten it).
    pub wait: Duration,
}

/// Why the operator source cannot start.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("--operator {0:?} must start with http:// or https://")]
    Scheme(String),
    #[error(
        "an https --operator needs --operator-ca (the CA of the operator's serving certificate)"
    )]
    NoCa,
    #[error("--operator-ca {path}: {error}")]
    Ca { path: PathBuf, error: String },
}

/// Why one request got no configuration.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("reading the token file {path}: {source}")]
    Token {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("building the request: {0}")]
    Request(#[from] http::Error),
    #[error("no answer: {0}")]
    Transport(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("reading the body: {0}")]
    Body(String),
}

/// What one request came to.
#[derive(Debug)]
pub enum Outcome {
    /// `200`: a configuration and its ETag.
    Config {
        bytes: Vec<u8>,
        etag: Option<String>,
    },
    /// `304`: the ETag held is current.
    NotModified,
    /// `404`: no configuration for this waypoint.
    NotFound,
    /// Any other status, with the start of its body.
    Status { status: StatusCode, body: String },
}

impl Outcome {
    fn metric(&self) -> OperatorOutcome {
        match self {
            Outcome::Config { .. } => OperatorOutcome::Ok,
            Outcome::NotModified => OperatorOutcome::NotModified,
            Outcome::NotFound => OperatorOutcome::NotFound,
            Outcome::Status { .. } => OperatorOutcome::Other,
        }
    }
}

/// Capped exponential backoff with full jitter, as the node agents': the ceiling starts at
/// [`BACKOFF_MIN`] and doubles to [`BACKOFF_MAX`]; each delay is uniform below it, so that the
/// replicas of every waypoint do not all ask again at once when the operator comes back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: BACKOFF_MIN }
    }
}

impl Backoff {
    /// The delay before the next retry (jittered below the ceiling); the next ceiling is twice
    /// this one, up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        full_jitter(self.next_ceiling())
    }

    /// The current ceiling, doubling the next one.
    fn next_ceiling(&mut self) -> Duration {
        let ceiling = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        ceiling
    }

    /// An answer that worked: the next failure waits [`BACKOFF_MIN`] again.
    pub fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }
}

/// The request for the configuration: `url`, with the ETag held and the token, if any.
pub fn build_request(
    url: &str,
    etag: Option<&str>,
    token: Option<&str>,
) -> Result<Request<Empty<Bytes>>, http::Error> {
    let mut request = Request::get(url).header(header::ACCEPT, WAYPOINT_CONFIG_MEDIA_TYPE);
    if let Some(etag) = etag {
        request = request.header(header::IF_NONE_MATCH, etag);
    }
    if let Some(token) = token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {}", token.trim()));
    }
    request.body(Empty::new())
}

/// The operator's configuration for one waypoint, long-polled.
pub struct OperatorSource {
    settings: OperatorSettings,
    url: String,
    client: Client<Connector, Empty<Bytes>>,
    /// The CA file, and what the client was built with.
    ca: TrustedCa,
    /// The ETag of the last configuration received (adopted or refused).
    etag: Option<String>,
    backoff: Backoff,
    metrics: Metrics,
}

impl OperatorSource {
    /// Checks the settings (scheme, a CA for https, a CA file that parses) and builds the client.
    pub fn new(settings: OperatorSettings, metrics: Metrics) -> Result<OperatorSource, SetupError> {
        let https = settings.url.starts_with("https://");
        if !https && !settings.url.starts_with("http://") {
            return Err(SetupError::Scheme(settings.url));
        }
        if https && settings.ca_file.is_none() {
            return Err(SetupError::NoCa);
        }
        let ca_error = |path: &Path, error| SetupError::Ca {
            path: path.to_path_buf(),
            error,
        };
        let connector = https_connector(settings.ca_file.as_deref())
            .map_err(|e| ca_error(settings.ca_file.as_deref().unwrap_or(Path::new("")), e))?;
        let ca = TrustedCa::new(settings.ca_file.clone());
        Ok(OperatorSource {
            url: waypoint_config_url(&settings.url, &settings.waypoint, settings.wait),
            settings,
            client: client_of(connector),
            ca,
            etag: None,
            backoff: Backoff::default(),
            metrics,
        })
    }

    /// The URL asked.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Rebuilds the client when the CA file's contents changed and still parse (the kubelet
    /// updates the mounted copy in place when the operator changes its CA).
    fn reload_ca(&mut self) {
        if let Some(connector) = self.ca.reloaded() {
            self.client = client_of(connector);
        }
    }

    /// One request, answered or not.
    async fn fetch(&self) -> Result<Outcome, FetchError> {
        let token =
            match &self.settings.token_file {
                Some(path) => Some(tokio::fs::read_to_string(path).await.map_err(|source| {
                    FetchError::Token {
                        path: path.clone(),
                        source,
                    }
                })?),
                None => None,
            };
        let request = build_request(&self.url, self.etag.as_deref(), token.as_deref())?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| FetchError::Transport(error_chain::chain(&e)))?;
        let status = response.status();
        let etag = response
            .headers()
            .get(header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let limit = if status == StatusCode::OK {
            MAX_WAYPOINT_CONFIG_BYTES
        } else {
            LOGGED_BODY_BYTES
        };
        let body = read_body(response.into_body(), limit).await;
        Ok(match status {
            StatusCode::OK => Outcome::Config { bytes: body?, etag },
            StatusCode::NOT_MODIFIED => Outcome::NotModified,
            StatusCode::NOT_FOUND => Outcome::NotFound,
            status => Outcome::Status {
                status,
                body: String::from_utf8_lossy(&body.unwrap_or_default())
                    .trim()
                    .to_string(),
            },
        })
    }
}

/// The body, up to `limit` bytes (a larger one is an error).
async fn read_body(body: hyper::body::Incoming, limit: usize) -> Result<Vec<u8>, FetchError> {
    let collected = Limited::new(body, limit)
        .collect()
        .await
        .map_err(|e| FetchError::Body(e.to_string()))?;
    Ok(Vec::from(collected.to_bytes()))
}

impl ConfigSource for OperatorSource {
    async fn next(&mut self) -> Vec<u8> {
        loop {
            self.reload_ca();
            let deadline = self.settings.wait + ANSWER_GRACE;
            let fetched = match tokio::time::timeout(deadline, self.fetch()).await {
                Ok(fetched) => fetched,
                Err(_) => Err(FetchError::Timeout(deadline)),
            };
            let url = self.url.as_str();
            let outcome = match fetched {
                Ok(outcome) => outcome,
                Err(error) => {
                    self.metrics.operator_request(OperatorOutcome::Error);
                    let delay = self.backoff.next_delay();
                    tracing::warn!(url, %error, retry_in_ms = delay.as_millis() as u64, "fetching the configuration failed; the current one stays");
                    tokio::time::sleep(delay).await;
                    continue;
                }
            };
            self.metrics.operator_request(outcome.metric());
            match outcome {
                Outcome::Config { bytes, etag } => {
                    self.backoff.reset();
                    tracing::info!(
                        etag = etag.as_deref().unwrap_or(""),
                        bytes = bytes.len(),
                        "configuration received"
                    );
                    self.etag = etag;
                    return bytes;
                }
                Outcome::NotModified => self.backoff.reset(),
                Outcome::NotFound => {
                    let delay = self.backoff.next_delay();
                    tracing::warn!(
                        url,
                        retry_in_ms = delay.as_millis() as u64,
                        "the operator has no configuration for this waypoint (404); the current one stays"
                    );
                    tokio::time::sleep(delay).await;
                }
                Outcome::Status { status, body } => {
                    let delay = self.backoff.next_delay();
                    tracing::warn!(
                        url,
                        status = status.as_u16(),
                        body,
                        retry_in_ms = delay.as_millis() as u64,
                        "the operator refused the request; the current configuration stays"
                    );
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(url: &str) -> OperatorSettings {
        OperatorSettings {
            url: url.into(),
            waypoint: parse_waypoint("bookinfo/waypoint").unwrap(),
            ca_file: None,
            token_file: None,
            wait: LONG_POLL,
        }
    }

    #[test]
    fn waypoints_are_namespace_slash_name() {
        assert_eq!(
            parse_waypoint("bookinfo/reviews-waypoint"),
            Ok(WaypointName {
                namespace: "bookinfo".into(),
                name: "reviews-waypoint".into()
            })
        );
        for bad in [
            "bookinfo", "/wp", "ns/", "ns/a/b", "NS/wp", "ns/w p", "ns/..", "",
        ] {
            let error = parse_waypoint(bad).unwrap_err();
            assert!(error.contains("NAMESPACE/NAME"), "{bad}: {error}");
        }
    }

    #[test]
    fn the_backoff_doubles_to_its_cap_and_resets() {
        let mut backoff = Backoff::default();
        let ceilings: Vec<u64> = (0..7)
            .map(|_| backoff.next_ceiling().as_millis() as u64)
            .collect();
        assert_eq!(ceilings, [200, 400, 800, 1600, 3200, 5000, 5000]);
        assert!(backoff.next_delay() <= BACKOFF_MAX);
        backoff.reset();
        assert_eq!(backoff.next_ceiling(), BACKOFF_MIN);
        assert!(backoff.next_delay() <= BACKOFF_MIN * 2);
    }

    #[test]
    fn the_request_carries_the_etag_and_the_token() {
        let url = "http://op:15300/v1/waypoints/bookinfo/waypoint/config?wait=30s";
        let request = build_request(url, Some("\"wp-00000000000000ab\""), Some("t0k\n")).unwrap();
        assert_eq!(request.uri(), url);
        assert_eq!(request.method(), http::Method::GET);
        let headers = request.headers();
        assert_eq!(headers[header::ACCEPT], WAYPOINT_CONFIG_MEDIA_TYPE);
        assert_eq!(headers[header::IF_NONE_MATCH], "\"wp-00000000000000ab\"");
        assert_eq!(headers[header::AUTHORIZATION], "Bearer t0k", "trimmed");

        let first = build_request(url, None, None).unwrap();
        assert!(first.headers().get(header::IF_NONE_MATCH).is_none());
        assert!(first.headers().get(header::AUTHORIZATION).is_none());
    }

    #[test]
    fn the_url_is_the_contracts() {
        let source = OperatorSource::new(settings("http://op:15300/"), Metrics::new()).unwrap();
        assert_eq!(
            source.url(),
            "http://op:15300/v1/waypoints/bookinfo/waypoint/config?wait=30s"
        );
    }

    #[test]
    fn bad_settings_refuse_to_start() {
        let error = |s: OperatorSettings| {
            OperatorSource::new(s, Metrics::new())
                .err()
                .expect("refused")
                .to_string()
        };
        assert!(error(settings("https://op:15300")).contains("needs --operator-ca"));
        assert!(error(settings("op:15300")).contains("http:// or https://"));
        let missing = OperatorSettings {
            ca_file: Some("/nonexistent/ca.crt".into()),
            ..settings("https://op:15300")
        };
        assert!(error(missing).contains("/nonexistent/ca.crt"));
        let dir = std::env::temp_dir().join(format!("kmesh-wp-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let not_pem = dir.join("ca.crt");
        std::fs::write(&not_pem, "not a certificate").unwrap();
        let text = error(OperatorSettings {
            ca_file: Some(not_pem),
            ..settings("https://op:15300")
        });
        assert!(text.contains("no CA certificate"), "{text}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
