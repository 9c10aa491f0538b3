//! A throwaway certificate authority and a serving certificate for 127.0.0.1 / localhost, written
//! to a private temporary directory that is removed on drop.
use std::{io, path::PathBuf};

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

impl Drop for TestTls {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
