//! What the operator's clients share: the node agent long-polls its node's snapshot and the
//! waypoint its configuration, both from the operator, over plain HTTP or HTTPS verified against
//! the operator's CA (`--operator-ca`, a ConfigMap the operator publishes and the kubelet updates
//! in place when the operator changes its CA).
//!
//! - [`https_connector`]: the connector, over the CA file's certificates;
//! - [`TrustedCa`]: the CA file, re-read before each request and the connector rebuilt when its
//!   contents change (a file that does not parse is logged, and the previous CAs kept);
//! - [`full_jitter`]: the delay before a retry, so that clients that failed together (an operator
//!   restarting) do not all ask again at once;
//! - [`error_chain::chain`]: an error with its causes on one line, for logs.
//!
//! The contracts themselves (URLs, headers, statuses) are `kmesh_snapshot::contract` and
//! `kmesh_snapshot::waypoint_contract`.
use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use tracing::{info, warn};

pub mod error_chain;

/// The operator clients' connector: plain HTTP, or HTTPS verified by rustls.
pub type Connector =
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>;

/// Plain HTTP always; HTTPS verified against the CA certificates in `ca_file` when given (without
/// one no root is trusted, so https fails: the clients refuse an https URL without a CA file
/// beforehand). Errors name the file.
pub fn https_connector(ca_file: Option<&Path>) -> Result<Connector, String> {
    use rustls_pki_types::{CertificateDer, pem::PemObject as _};
    let mut roots = rustls::RootCertStore::empty();
    if let Some(path) = ca_file {
        let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| format!("{}: {e}", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
        if roots.is_empty() {
            return Err(format!("{}: no CA certificate in it", path.display()));
        }
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_or_http()
        .enable_http1()
        .build())
}

/// A client of the operator over `connector`, for GETs (no request body).
pub fn client_of(connector: Connector) -> Client<Connector, Empty<Bytes>> {
    Client::builder(TokioExecutor::new()).build::<_, Empty<Bytes>>(connector)
}

/// The operator's CA file and the contents the client was last built with.
pub struct TrustedCa {
    file: Option<PathBuf>,
    loaded: Option<Vec<u8>>,
}

impl TrustedCa {
    /// The file as it is now (what the first connector was built from).
    pub fn new(file: Option<PathBuf>) -> TrustedCa {
        let loaded = file.as_ref().and_then(|f| std::fs::read(f).ok());
        TrustedCa { file, loaded }
    }

    /// A connector over the file's CAs if its contents changed since the last call and parse.
    pub fn reloaded(&mut self) -> Option<Connector> {
        let file = self.file.as_ref()?;
        let now = std::fs::read(file).ok()?;
        if self.loaded.as_ref() == Some(&now) {
            return None;
        }
        self.loaded = Some(now);
        match https_connector(Some(file)) {
            Ok(connector) => {
                info!(ca = %file.display(), "operator CA file changed; reloaded");
                Some(connector)
            }
            Err(e) => {
                warn!(ca = %file.display(), error = %e, "operator CA file changed but is unusable; keeping the previous CAs");
                None
            }
        }
    }
}

/// Full jitter: a uniform delay in [100 ms, `ceiling`]; spreads the retries of many clients after
/// an outage.
pub fn full_jitter(ceiling: Duration) -> Duration {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    // Mix the clock's low bits with the pid, so that clients started together still spread out.
    let mixed =
        (u64::from(nanos) ^ u64::from(std::process::id())).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let fraction = (mixed >> 11) as f64 / (1u64 << 53) as f64;
    ceiling.mul_f64(fraction).max(Duration::from_millis(100))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_its_bounds_and_spreads() {
        let ceiling = Duration::from_secs(2);
        let delays: Vec<Duration> = (0..200)
            .map(|_| {
                std::thread::sleep(Duration::from_micros(37));
                full_jitter(ceiling)
            })
            .collect();
        assert!(
            delays
                .iter()
                .all(|d| *d >= Duration::from_millis(100) && *d <= ceiling),
            "{delays:?}"
        );
        let distinct: std::collections::BTreeSet<_> = delays.iter().collect();
        assert!(distinct.len() > 100, "{} distinct of 200", distinct.len());
    }
}
