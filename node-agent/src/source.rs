//! Where snapshots come from: a local file, or the operator's snapshot server.
//!
//! Sources only fetch bytes; the data plane thread decodes and verifies them (nothing a source
//! delivers is trusted).
//!
//! # The operator
//! The HTTP contract is defined once, in `kmesh_snapshot::contract`. The agent long-polls its node's
//! snapshot with the ETag of the one it holds and the generation live in its kernel; a `200`
//! delivers a snapshot, a `304` means nothing changed within the wait, and anything else — or a
//! transport error, logged with its whole cause — is retried with exponential backoff (0.5 s
//! doubling to 30 s; to 2 s when no operator answered at all, so that agents are back within a
//! couple of seconds of an operator's restart) and full jitter, keeping the snapshot it has.
//!
//! The operator's CA file (`--operator-ca`, a ConfigMap the operator publishes, updated in place by
//! the kubelet when the operator changes its CA) is re-read before every request; when its
//! contents change, the client is rebuilt with the new CAs (a file that does not parse is logged and
//! the previous CAs kept).
//!
//! The operator learns which generation runs on the node from the live generation the agent
//! reports. So that this is prompt rather than up to a long poll later, the poller watches the live
//! generation: when it changes while a request is held, the request is abandoned and a new one
//! carries the new generation at once.
//!
//! A `410 Gone` means the node's agents are being removed for good (the contract's uninstall): the
//! poller hands the data plane [`Delivery::Uninstall`] once, and keeps asking, slowly. When the
//! agent is stopped, [`ask_on_shutdown`] asks once more, without waiting, so that an agent stopped
//! by an uninstall before its long poll heard of it still removes its pins.
use std::{fmt, path::PathBuf, sync::mpsc::Sender, time::Duration};

use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::{Request, StatusCode, body::Bytes, header};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use kmesh_snapshot::contract;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use kmesh_operator_client::{
    Connector, TrustedCa, client_of, error_chain, full_jitter as jitter, https_connector,
};

/// How the agent gets its snapshot.
#[derive(Clone, Debug)]
pub enum Source {
    File(PathBuf),
    Operator {
        url: String,
        token_file: Option<PathBuf>,
        /// PEM CA certificates that sign the operator's serving certificate (required for https).
        ca_file: Option<PathBuf>,
    },
}

/// What a source hands the data plane.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// A snapshot's bytes, not yet verified.
    Snapshot(Vec<u8>),
    /// The operator answered `410 Gone`: the agents of this node are being removed, so the
    /// programs must be detached and every pin removed.
    Uninstall,
}

/// What the data plane holds, for the source's next request: the format 4 cluster hash of the live
/// snapshot (the base a delta is asked from; `None`: none live, or not from format 4), and how many
/// deltas it has refused (after a refusal the source asks for the whole snapshot once).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Held {
    pub cluster_hash: Option<u64>,
    pub deltas_refused: u64,
}

/// How long the server may hold a long-poll request.
const LONG_POLL: Duration = Duration::from_secs(30);
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
const BACKOFF_MAX_TRANSPORT: Duration = Duration::from_secs(2);
const FILE_POLL: Duration = Duration::from_millis(100);

/// Delivers snapshot bytes (or deltas) to `tx` until the receiver is gone. `live` is the
/// generation the data plane has live (0: none), reported to the operator as soon as it changes;
/// `held` what it holds, to ask for deltas from.
pub async fn run(
    source: Source,
    node: String,
    max_bytes: u64,
    live: watch::Receiver<u64>,
    held: watch::Receiver<Held>,
    tx: Sender<Delivery>,
) {
    match source {
        Source::File(path) => watch_file(path, tx).await,
        Source::Operator {
            url,
            token_file,
            ca_file,
        } => match https_connector(ca_file.as_deref()) {
            Ok(connector) => {
                let ca = TrustedCa::new(ca_file);
                let watched = (live, held);
                poll_operator(
                    url,
                    node,
                    token_file,
                    (ca, connector),
                    max_bytes,
                    watched,
                    tx,
                )
                .await
            }
            // Checked at start-up (see `check`); reaching here means the file changed since.
            Err(e) => tracing::error!(error = %e, "cannot set up TLS to the operator"),
        },
    }
}

/// Sends the file's contents now and whenever it changes (size, mtime or inode: an atomic
/// rename-into-place counts as a change).
async fn watch_file(path: PathBuf, tx: Sender<Delivery>) {
    use std::os::unix::fs::MetadataExt as _;
    let mut last: Option<(u64, i64, i64, u64)> = None;
    let mut reported_missing = false;
    loop {
        match tokio::fs::metadata(&path).await {
            Ok(m) => {
                reported_missing = false;
                let stamp = (m.ino(), m.mtime(), m.mtime_nsec(), m.len());
                if last != Some(stamp) {
                    match tokio::fs::read(&path).await {
                        Ok(bytes) => {
                            debug!(path = %path.display(), bytes = bytes.len(), "snapshot file changed");
                            last = Some(stamp);
                            if tx.send(Delivery::Snapshot(bytes)).is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            warn!(path = %path.display(), error = %e, "reading snapshot file")
                        }
                    }
                }
            }
            Err(e) if !reported_missing => {
                warn!(path = %path.display(), error = %e, "snapshot file not readable; waiting for it");
                reported_missing = true;
            }
            Err(_) => {}
        }
        tokio::time::sleep(FILE_POLL).await;
    }
}

/// Why fetching a snapshot failed.
#[derive(thiserror::Error, Debug)]
pub enum FetchError {
    #[error("building request: {0}")]
    Request(#[from] hyper::http::Error),
    /// No HTTP answer: `chain` is the client error with every cause ("... tcp connect error:
    /// Connection refused (os error 111)"), not just the client's own "client error (Connect)".
    #[error("{failure}: {chain}")]
    Transport {
        failure: TransportFailure,
        chain: String,
    },
    #[error("reading body: {0}")]
    Body(String),
    #[error("server answered {0}")]
    Status(StatusCode),
    #[error("reading token file {path}: {source}")]
    Token {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl From<hyper_util::client::legacy::Error> for FetchError {
    fn from(e: hyper_util::client::legacy::Error) -> Self {
        FetchError::Transport {
            failure: TransportFailure::of(&e),
            chain: error_chain::chain(&e),
        }
    }
}

/// What kind of transport failure, found among an error's causes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportFailure {
    /// Nothing listens at the operator's address (or a firewall rejects).
    ConnectionRefused,
    /// The server's certificate is not signed by `--operator-ca`, or not for this host, or expired.
    CertificateRejected,
    /// Another TLS failure.
    Tls,
    Other,
}

impl TransportFailure {
    fn of(e: &(dyn std::error::Error + 'static)) -> TransportFailure {
        let tls = |tls: &rustls::Error| match tls {
            rustls::Error::InvalidCertificate(_) => TransportFailure::CertificateRejected,
            _ => TransportFailure::Tls,
        };
        let mut cause = Some(e);
        while let Some(c) = cause {
            if let Some(t) = c.downcast_ref::<rustls::Error>() {
                return tls(t);
            }
            let io = c.downcast_ref::<std::io::Error>();
            if io.is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused) {
                return TransportFailure::ConnectionRefused;
            }
            // An io::Error's `source` skips the error it wraps (TLS errors arrive wrapped in two).
            cause = match io.and_then(std::io::Error::get_ref) {
                Some(wrapped) => Some(wrapped),
                None => c.source(),
            };
        }
        TransportFailure::Other
    }
}

impl fmt::Display for TransportFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TransportFailure::ConnectionRefused => "connection refused",
            TransportFailure::CertificateRejected => "server certificate rejected",
            TransportFailure::Tls => "TLS failed",
            TransportFailure::Other => "transport failed",
        })
    }
}

enum Fetched {
    Snapshot {
        bytes: Vec<u8>,
        etag: Option<String>,
    },
    NotModified,
    /// `410 Gone`: uninstall.
    Gone,
}

/// Start-up checks of a source, so that a bad flag fails the agent at once with a clear error.
pub fn check(source: &Source) -> Result<(), String> {
    if let Source::Operator { url, ca_file, .. } = source {
        if url.starts_with("https://") && ca_file.is_none() {
            return Err("an https --operator-url needs --operator-ca (the CA of the operator's certificate)".into());
        }
        if !url.starts_with("https://") && !url.starts_with("http://") {
            return Err(format!(
                "--operator-url {url:?} must start with http:// or https://"
            ));
        }
        https_connector(ca_file.as_deref())?;
    }
    Ok(())
}

async fn poll_operator(
    base: String,
    node: String,
    token_file: Option<PathBuf>,
    (mut ca, connector): (TrustedCa, Connector),
    max_bytes: u64,
    (mut live, mut held): (watch::Receiver<u64>, watch::Receiver<Held>),
    tx: Sender<Delivery>,
) {
    let mut client = client_of(connector);
    let mut etag: Option<String> = None;
    let mut backoff = BACKOFF_MIN;
    let mut gone = false;
    let mut deltas_refused = held.borrow().deltas_refused;
    loop {
        if let Some(connector) = ca.reloaded() {
            client = client_of(connector);
        }
        let live_generation = *live.borrow_and_update();
        let holding = *held.borrow_and_update();
        let since = if holding.deltas_refused != deltas_refused {
            // The last delta did not apply: ask for the whole snapshot, as a first request does.
            deltas_refused = holding.deltas_refused;
            etag = None;
            None
        } else {
            holding.cluster_hash
        };
        let url = contract::snapshot_url_since(&base, &node, LONG_POLL, since);
        let request = tokio::time::timeout(
            LONG_POLL + Duration::from_secs(15),
            fetch(
                &client,
                &url,
                etag.as_deref(),
                token_file.as_ref(),
                live_generation,
                max_bytes,
            ),
        );
        let fetched = tokio::select! {
            fetched = request => fetched,
            changed = live.changed() => {
                if changed.is_err() {
                    return; // the data plane is gone
                }
                debug!(live = *live.borrow(), "live generation changed; asking again to report it");
                continue;
            }
            changed = held.wait_for(|h| h.deltas_refused != deltas_refused) => {
                if changed.is_err() {
                    return;
                }
                debug!("a delta was refused; asking for the whole snapshot");
                continue;
            }
        };
        match fetched {
            Ok(Ok(Fetched::Snapshot { bytes, etag: new })) => {
                backoff = BACKOFF_MIN;
                info!(
                    bytes = bytes.len(),
                    etag = new.as_deref().unwrap_or(""),
                    "snapshot received"
                );
                etag = new;
                gone = false;
                if tx.send(Delivery::Snapshot(bytes)).is_err() {
                    return;
                }
            }
            Ok(Ok(Fetched::NotModified)) => backoff = BACKOFF_MIN,
            Ok(Ok(Fetched::Gone)) => {
                if !gone {
                    warn!(
                        url,
                        "the operator answered 410 Gone: this node's agents are being removed; uninstalling"
                    );
                    gone = true;
                    if tx.send(Delivery::Uninstall).is_err() {
                        return;
                    }
                }
                // Nothing to follow any more; ask now and then in case the removal is undone.
                tokio::time::sleep(jitter(BACKOFF_MAX)).await;
            }
            Ok(Err(e)) => {
                let delay = jitter(backoff);
                warn!(url, error = %e, retry_in_ms = delay.as_millis() as u64, "fetching snapshot failed");
                tokio::time::sleep(delay).await;
                backoff = next_backoff(backoff, &e);
            }
            Err(_) => {
                warn!(url, "snapshot request timed out");
                tokio::time::sleep(jitter(backoff)).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

async fn fetch(
    client: &Client<Connector, Empty<Bytes>>,
    url: &str,
    etag: Option<&str>,
    token_file: Option<&PathBuf>,
    live_generation: u64,
    max_bytes: u64,
) -> Result<Fetched, FetchError> {
    let mut req = Request::get(url).header(header::ACCEPT, contract::MEDIA_TYPE);
    if let Some(etag) = etag {
        req = req.header(header::IF_NONE_MATCH, etag);
    }
    if live_generation > 0 {
        req = req.header(contract::LIVE_GENERATION_HEADER, live_generation);
    }
    if let Some(path) = token_file {
        // Projected tokens rotate: read the file for every request.
        let token = tokio::fs::read_to_string(path)
            .await
            .map_err(|source| FetchError::Token {
                path: path.clone(),
                source,
            })?;
        req = req.header(header::AUTHORIZATION, format!("Bearer {}", token.trim()));
    }
    let resp = client.request(req.body(Empty::new())?).await?;
    match resp.status() {
        StatusCode::OK => {
            let etag = resp
                .headers()
                .get(header::ETAG)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            // Never buffer more than a snapshot may be: the decoder would refuse it anyway.
            let limit = usize::try_from(max_bytes).unwrap_or(usize::MAX);
            let body = Limited::new(resp.into_body(), limit)
                .collect()
                .await
                .map_err(|e| FetchError::Body(e.to_string()))?;
            // One copy at most (of a body in several frames), none more: a snapshot may be 50 MB.
            Ok(Fetched::Snapshot {
                bytes: Vec::from(body.to_bytes()),
                etag,
            })
        }
        StatusCode::NOT_MODIFIED => Ok(Fetched::NotModified),
        status if status.as_u16() == contract::UNINSTALL_STATUS => Ok(Fetched::Gone),
        other => Err(FetchError::Status(other)),
    }
}

/// The ceiling of the next retry after `error`: doubling to [`BACKOFF_MAX`]; to
/// [`BACKOFF_MAX_TRANSPORT`] when no operator answered at all (the operator restarting: a refused or
/// reset connection costs the operator nothing, and the agent should be back as soon as it is).
fn next_backoff(backoff: Duration, error: &FetchError) -> Duration {
    let ceiling = match error {
        FetchError::Transport { .. } => BACKOFF_MAX_TRANSPORT,
        _ => BACKOFF_MAX,
    };
    (backoff * 2).min(ceiling)
}

/// What an agent that is being stopped does with its pins.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShutdownVerdict {
    /// The operator says the node's agents are being removed: uninstall.
    Uninstall,
    /// A restart or an upgrade: keep the pins, so that traffic keeps flowing. `why` says how
    /// this was decided.
    Keep { why: String },
}

/// How long a stopping agent waits for the operator's answer.
pub const SHUTDOWN_ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// Asks the operator once, without a long poll, whether this node's agents are being removed.
/// Anything but a `410 Gone` — another answer, no answer, a file source — keeps the pins.
pub async fn ask_on_shutdown(source: &Source, node: &str, max_bytes: u64) -> ShutdownVerdict {
    let Source::Operator {
        url,
        token_file,
        ca_file,
    } = source
    else {
        return ShutdownVerdict::Keep {
            why: "the snapshot file source never uninstalls".into(),
        };
    };
    let connector = match https_connector(ca_file.as_deref()) {
        Ok(c) => c,
        Err(e) => return ShutdownVerdict::Keep { why: e },
    };
    let client = Client::builder(TokioExecutor::new()).build::<_, Empty<Bytes>>(connector);
    let url = contract::snapshot_url(url, node, Duration::ZERO);
    let asked = fetch(&client, &url, None, token_file.as_ref(), 0, max_bytes);
    match tokio::time::timeout(SHUTDOWN_ASK_TIMEOUT, asked).await {
        Ok(Ok(Fetched::Gone)) => ShutdownVerdict::Uninstall,
        Ok(Ok(_)) => ShutdownVerdict::Keep {
            why: "the operator serves this node: a restart or an upgrade".into(),
        },
        Ok(Err(e)) => ShutdownVerdict::Keep {
            why: format!("the operator could not be asked ({e})"),
        },
        Err(_) => ShutdownVerdict::Keep {
            why: format!("the operator did not answer within {SHUTDOWN_ASK_TIMEOUT:?}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::{net::TcpListener, sync::Arc};

    use kmesh_tests::TestTls;

    use super::*;

    fn client(ca_file: Option<&std::path::Path>) -> Client<Connector, Empty<Bytes>> {
        Client::builder(TokioExecutor::new())
            .build::<_, Empty<Bytes>>(https_connector(ca_file).unwrap())
    }

    async fn fetch_from(url: &str, ca_file: Option<&std::path::Path>) -> FetchError {
        match fetch(&client(ca_file), url, None, None, 0, 1 << 20).await {
            Ok(_) => panic!("fetching {url} succeeded"),
            Err(e) => e,
        }
    }

    #[test]
    fn retries_after_transport_failures_stay_quick() {
        let refused = FetchError::Transport {
            failure: TransportFailure::ConnectionRefused,
            chain: String::new(),
        };
        let forbidden = FetchError::Status(StatusCode::FORBIDDEN);
        let mut b = BACKOFF_MIN;
        for _ in 0..10 {
            b = next_backoff(b, &refused);
        }
        assert_eq!(b, BACKOFF_MAX_TRANSPORT);
        for _ in 0..10 {
            b = next_backoff(b, &forbidden);
        }
        assert_eq!(b, BACKOFF_MAX);
    }

    /// A changed CA file rebuilds the client (the operator changed its CA); the same contents or
    /// an unusable file do not.
    #[test]
    fn the_ca_file_is_reloaded_when_its_contents_change() {
        let first = TestTls::new("agent-unit-ca-1").unwrap();
        let second = TestTls::new("agent-unit-ca-2").unwrap();
        let file = first.file("operator-ca.crt", "").unwrap();
        std::fs::copy(&first.ca_file, &file).unwrap();
        let mut ca = TrustedCa::new(Some(file.clone()));
        assert!(ca.reloaded().is_none(), "unchanged since start-up");
        std::fs::copy(&second.ca_file, &file).unwrap();
        assert!(ca.reloaded().is_some(), "a new CA is loaded");
        assert!(ca.reloaded().is_none(), "and only once");
        std::fs::write(&file, "not a certificate").unwrap();
        assert!(
            ca.reloaded().is_none(),
            "an unusable file keeps the previous CAs"
        );
    }

    #[tokio::test]
    async fn a_closed_port_is_reported_as_a_refused_connection() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port(); // the listener is closed again here
        let e = fetch_from(
            &contract::snapshot_url(&format!("http://127.0.0.1:{port}"), "n", LONG_POLL),
            None,
        )
        .await;
        let text = e.to_string();
        println!("logged as: {text}");
        assert!(
            matches!(
                e,
                FetchError::Transport {
                    failure: TransportFailure::ConnectionRefused,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(text.contains("Connection refused"), "{text}");
    }

    /// Serves TLS with `tls`'s certificate on a loopback port, for one handshake.
    fn tls_server(tls: &TestTls) -> u16 {
        use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&tls.cert_file)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(&tls.key_file).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (mut socket, _) = listener.accept().unwrap();
            let mut conn = rustls::ServerConnection::new(Arc::new(config)).unwrap();
            while conn.is_handshaking() && conn.complete_io(&mut socket).is_ok() {}
        });
        port
    }

    #[tokio::test]
    async fn a_certificate_the_ca_does_not_sign_is_reported_as_rejected() {
        let server_tls = TestTls::new("agent-unit-server").unwrap();
        let other_ca = TestTls::new("agent-unit-other").unwrap();
        let port = tls_server(&server_tls);
        let e = fetch_from(
            &contract::snapshot_url(&format!("https://127.0.0.1:{port}"), "n", LONG_POLL),
            Some(&other_ca.ca_file),
        )
        .await;
        let text = e.to_string();
        println!("logged as: {text}");
        assert!(
            matches!(
                e,
                FetchError::Transport {
                    failure: TransportFailure::CertificateRejected,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(text.contains("invalid peer certificate"), "{text}");
    }
}
