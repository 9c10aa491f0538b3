//! The operator's errors: what stops `kmesh-operator` or `kmeshctl` (a file that cannot be read,
//! an address that cannot be bound, an API server that cannot be reached, a bad TLS key), each
//! naming what failed. One [`Error`] and a [`Result`] alias for the crate, as kube-rs's
//! controller-rs has.
//!
//! Not errors: the compiler's findings, which are data ([`Diagnostic`](crate::diagnostics::Diagnostic)s,
//! reported and compiled around); and the errors of layers whose callers act on the variant, which
//! stay beside their layer: [`ReconcileError`](crate::reconcile::ReconcileError) (retry or not) and
//! [`AuthError`](crate::server::AuthError) (which HTTP status).
use std::{io, net::SocketAddr, path::PathBuf};

use crate::server::BadTokenLine;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory could not be read (or listed).
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A static token file has a line that is not `<token> <node>`.
    #[error("{}: {source}", path.display())]
    StaticTokens {
        path: PathBuf,
        #[source]
        source: BadTokenLine,
    },
    /// The PEM certificate file could not be read.
    #[error("reading the certificate: {0}")]
    Certificate(#[source] rustls_pki_types::pem::Error),
    #[error("the certificate file holds no certificate")]
    NoCertificate,
    /// The PEM private key file could not be read.
    #[error("reading the private key: {0}")]
    PrivateKey(#[source] rustls_pki_types::pem::Error),
    /// rustls refused the TLS configuration.
    #[error("setting up TLS: {0}")]
    Tls(#[source] tokio_rustls::rustls::Error),
    /// The certificate does not belong to the private key (or rustls cannot use them).
    #[error("certificate and key do not fit: {0}")]
    CertificateKey(#[source] tokio_rustls::rustls::Error),
    /// The operator's own certificates could not be loaded.
    #[error("{0}")]
    Certificates(#[source] crate::certs::CertError),
    /// The leader election flags would allow two leaders.
    #[error("leader election: {0}")]
    Election(#[source] crate::leader::ElectionConfigError),
    /// A listening socket could not be bound.
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    /// No Kubernetes client could be made (no in-cluster config, no kubeconfig).
    #[error("{needed_by} needs the API server: {source}")]
    ApiServer {
        /// The flag that needs it, e.g. `--source kube`.
        needed_by: &'static str,
        #[source]
        source: kube::Error,
    },
    /// The kube source's watch tasks are gone.
    #[error("the Kubernetes source stopped")]
    SourceStopped,
    /// The Tokio runtime could not start.
    #[error("starting the runtime: {0}")]
    Runtime(#[source] io::Error),
    /// A compiled snapshot could not be encoded.
    #[error("encoding the snapshot: {0}")]
    Encode(#[from] kmesh_snapshot::EncodeError),
    /// The JSON rendering could not be serialized.
    #[error("rendering JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// Standard output could not be written.
    #[error("writing the output: {0}")]
    Output(#[source] io::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// [`Error::Read`] of `path`.
    pub fn read(path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Error {
        let path = path.into();
        move |source| Error::Read { path, source }
    }
}
