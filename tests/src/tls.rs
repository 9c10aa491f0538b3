//! A throwaway certificate authority and a serving certificate for 127.0.0.1 / localhost, written
//! to a private temporary directory that is removed on drop; and a blocking HTTPS GET that trusts
//! only that authority, for tests that assert a server's exact answer.
use std::{
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

pub struct TestTls {
    dir: PathBuf,
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl TestTls {
    pub fn new(tag: &str) -> io::Result<TestTls> {
        let err = |e: rcgen::Error| io::Error::other(e.to_string());
        let ca_key = KeyPair::generate().map_err(err)?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).map_err(err)?;
        let issuer = Issuer::new(ca_params, &ca_key);
        let key = KeyPair::generate().map_err(err)?;
        let cert = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .map_err(err)?
            .signed_by(&key, &issuer)
            .map_err(err)?;
        let dir = std::env::temp_dir().join(format!("kmt-tls-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let tls = TestTls {
            ca_file: dir.join("ca.pem"),
            cert_file: dir.join("tls.crt"),
            key_file: dir.join("tls.key"),
            dir,
        };
        std::fs::write(&tls.ca_file, ca.pem())?;
        std::fs::write(&tls.cert_file, cert.pem())?;
        std::fs::write(&tls.key_file, key.serialize_pem())?;
        Ok(tls)
    }

    /// A file in the same private directory (tokens, say).
    pub fn file(&self, name: &str, contents: &str) -> io::Result<PathBuf> {
        let path = self.dir.join(name);
        std::fs::write(&path, contents)?;
        Ok(path)
    }
}

impl TestTls {
    /// One `GET path` over TLS to `addr` (verified against this CA, for the address `addr`), with
    /// `Authorization: Bearer <token>` when given: the status code and the body.
    pub fn https_get(
        &self,
        addr: SocketAddr,
        path: &str,
        token: Option<&str>,
    ) -> io::Result<(u16, Vec<u8>)> {
        let server_name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
        let connection = rustls::ClientConnection::new(self.client_config()?, server_name)
            .map_err(io::Error::other)?;
        let socket = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        socket.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut stream = rustls::StreamOwned::new(connection, socket);
        let authorization = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{authorization}Connection: close\r\n\r\n"
        )?;
        let mut response = Vec::new();
        match stream.read_to_end(&mut response) {
            Ok(_) => {}
            // A server may close without a TLS close_notify once it has said everything.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && !response.is_empty() => {}
            Err(e) => return Err(e),
        }
        parse_response(&response)
    }

    fn client_config(&self) -> io::Result<Arc<rustls::ClientConfig>> {
        use rustls_pki_types::{CertificateDer, pem::PemObject as _};
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&self.ca_file).map_err(io::Error::other)? {
            roots
                .add(cert.map_err(io::Error::other)?)
                .map_err(io::Error::other)?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(io::Error::other)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Arc::new(config))
    }
}

/// The status code and body of an HTTP/1.1 response.
fn parse_response(response: &[u8]) -> io::Result<(u16, Vec<u8>)> {
    let bad = || {
        io::Error::other(format!(
            "bad HTTP response: {:?}",
            String::from_utf8_lossy(response)
        ))
    };
    let head_end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(bad)?;
    let head = std::str::from_utf8(&response[..head_end]).map_err(|_| bad())?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(bad)?;
    Ok((code, response[head_end + 4..].to_vec()))
}

impl Drop for TestTls {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
