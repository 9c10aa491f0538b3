//! Certificates and keys of the test cluster, made with rcgen:
//! * the cluster CA and kube-apiserver's serving certificate (for 127.0.0.1, where the harness
//!   and kubectl reach it, and the `kubernetes` Service's ClusterIP and DNS names, where pods reach
//!   it); the CA is what kube-controller-manager publishes to every namespace as
//!   `kube-root-ca.crt`, so in-cluster clients verify the API server with it;
//! * the service-account signing key pair (ECDSA P-256; kube-apiserver signs and verifies
//!   service-account tokens with it);
//! * a random admin token (kube-apiserver's `--token-auth-file`, group `system:masters`);
//! * [`ServingCert`]: a CA and a leaf for a Service's DNS names, as cert-manager issues them
//!   (`tls.crt`, `tls.key`, `ca.crt`); rustls refuses a self-signed CA used as a leaf.
use std::{io, net::IpAddr};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

fn err(e: rcgen::Error) -> io::Error {
    io::Error::other(format!("rcgen: {e}"))
}

fn named(params: &mut CertificateParams, cn: &str) {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
}

/// A certificate authority: its certificate (PEM) and what signs with it.
pub struct Ca {
    pub cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    pub fn new(cn: &str) -> io::Result<Ca> {
        let key = KeyPair::generate().map_err(err)?;
        let mut params = CertificateParams::default();
        named(&mut params, cn);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).map_err(err)?;
        Ok(Ca {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// A serving certificate for `dns_names` and `ips`: (certificate PEM, key PEM).
    pub fn issue_server(
        &self,
        cn: &str,
        dns_names: &[&str],
        ips: &[IpAddr],
    ) -> io::Result<(String, String)> {
        let key = KeyPair::generate().map_err(err)?;
        let mut params = CertificateParams::default();
        named(&mut params, cn);
        for name in dns_names {
            params
                .subject_alt_names
                .push(SanType::DnsName((*name).try_into().map_err(err)?));
        }
        params
            .subject_alt_names
            .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &self.issuer).map_err(err)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// What the control plane needs.
pub struct ClusterPki {
    pub ca: Ca,
    pub apiserver_cert_pem: String,
    pub apiserver_key_pem: String,
    /// PKCS#8 PEM private key signing service-account tokens.
    pub service_account_key_pem: String,
    /// Its public key (PEM), verifying them.
    pub service_account_pub_pem: String,
    pub admin_token: String,
}

impl ClusterPki {
    /// `service_ip` is the `kubernetes` Service's ClusterIP (the first address of the service range).
    pub fn new(service_ip: IpAddr) -> io::Result<ClusterPki> {
        let ca = Ca::new("kmesh-rs test cluster CA")?;
        let (apiserver_cert_pem, apiserver_key_pem) = ca.issue_server(
            "kube-apiserver",
            &[
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ],
            &[IpAddr::from([127, 0, 0, 1]), service_ip],
        )?;
        let sa = KeyPair::generate().map_err(err)?;
        Ok(ClusterPki {
            ca,
            apiserver_cert_pem,
            apiserver_key_pem,
            service_account_key_pem: sa.serialize_pem(),
            service_account_pub_pem: sa.public_key_pem(),
            admin_token: random_token()?,
        })
    }
}

/// A Service's serving certificate as cert-manager issues it: `tls.crt`, `tls.key`, `ca.crt`.
pub struct ServingCert {
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}

impl ServingCert {
    /// For Service `name` in `namespace`: `name.namespace.svc` and `.svc.cluster.local`, signed by
    /// a fresh CA.
    pub fn for_service(namespace: &str, name: &str) -> io::Result<ServingCert> {
        let ca = Ca::new(&format!("{name} CA"))?;
        let svc = format!("{name}.{namespace}.svc");
        let fqdn = format!("{svc}.cluster.local");
        let (cert_pem, key_pem) = ca.issue_server(&svc, &[&svc, &fqdn], &[])?;
        Ok(ServingCert {
            cert_pem,
            key_pem,
            ca_pem: ca.cert_pem,
        })
    }
}

/// 32 hex digits from the kernel's random source.
pub fn random_token() -> io::Result<String> {
    let mut bytes = [0u8; 16];
    // SAFETY: valid buffer and length; getrandom fills it or fails.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        return Err(io::Error::last_os_error());
    }
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}
