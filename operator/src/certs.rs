//! The snapshot server's certificate: the operator's own CA and serving certificate, or one given
//! as files (cert-manager).
//!
//! **Self-managed** (the default: no `--tls-cert`): the leader keeps the Secret
//! `kmesh-operator-tls` (`tls.crt`, `tls.key`, `ca.crt` the CAs agents trust, `ca-cert.pem` and
//! `ca-key.pem` the signing CA, during a CA change `next-ca-cert.pem`/`next-ca-key.pem`) and
//! publishes `ca.crt` in the ConfigMap `kmesh-ca-root-cert` that the agents mount (as Istio
//! publishes `istio-ca-root-cert`). Followers never write: they wait for the Secret. What is due
//! is decided by [`plan`] (pure, clock passed in):
//! - no Secret (or an unreadable one): create a CA and a serving certificate, with a create that
//!   fails if another replica made one first (then that one is used);
//! - the serving certificate past 2/3 of its life: a new one from the signing CA;
//! - the signing CA past 2/3 of its life: a next CA, trusted (in `ca.crt`) from then on but not
//!   signing; after `ca_overlap` (time for every agent to load the new bundle) it signs a new
//!   serving certificate and becomes the signing CA. A CA leaves `ca.crt` when it expires.
//!
//! Every replica serves the Secret's current `tls.crt` (reloaded on change, no restart).
//!
//! **Files** (`--tls-cert`/`--tls-key`, e.g. a cert-manager `Certificate`'s Secret mounted as a
//! volume): re-read when they change; with `--tls-ca-file` the leader publishes that CA in the
//! ConfigMap.
use std::{
    collections::BTreeMap,
    fmt,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use k8s_openapi::{
    ByteString,
    api::core::v1::{ConfigMap, Secret},
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use tokio::task::JoinHandle;
use tokio_rustls::rustls::{
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tracing::{info, warn};

use crate::{leader::Leadership, replicas::watch_object};

/// The Secret the operator keeps its certificates in.
pub const TLS_SECRET: &str = "kmesh-operator-tls";
/// The ConfigMap of the CA bundle the agents trust.
pub const CA_CONFIG_MAP: &str = "kmesh-ca-root-cert";
/// The ConfigMap's key (and the Secret's) holding the bundle.
pub const CA_KEY: &str = "ca.crt";

/// Lifetimes of what the operator issues.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lifetimes {
    pub serving: Duration,
    pub ca: Duration,
    /// How long a next CA is trusted before it signs.
    pub ca_overlap: Duration,
}

impl Default for Lifetimes {
    fn default() -> Self {
        const DAY: u64 = 24 * 3600;
        Lifetimes {
            serving: Duration::from_secs(30 * DAY),
            ca: Duration::from_secs(365 * DAY),
            ca_overlap: Duration::from_secs(DAY),
        }
    }
}

/// What went wrong with certificates.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("making a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{what}: not a readable PEM certificate")]
    Unreadable { what: &'static str },
    #[error("{what}: no private key")]
    NoKey { what: &'static str },
    #[error("the serving key does not fit rustls: {0}")]
    Key(String),
    #[error("Secret {TLS_SECRET}: {0}")]
    Api(#[source] kube::Error),
}

/// A certificate and its key, PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyedCert {
    pub cert_pem: String,
    pub key_pem: String,
}

impl fmt::Debug for KeyedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyedCert { .. }")
    }
}

/// What the Secret holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pki {
    pub signing: KeyedCert,
    pub next: Option<KeyedCert>,
    pub serving: KeyedCert,
    /// `ca.crt`: every CA certificate agents trust, PEM, concatenated.
    pub bundle: String,
}

/// A certificate's validity, in seconds since the epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    pub not_before: u64,
    pub not_after: u64,
}

impl Validity {
    /// Whether 2/3 of the lifetime have passed at `now`.
    fn renewal_due(&self, now: u64) -> bool {
        let life = self.not_after.saturating_sub(self.not_before);
        now >= self.not_before + life * 2 / 3
    }
}

/// The validity of the first certificate in `pem`.
pub fn validity(pem: &str) -> Option<Validity> {
    let der = CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()?
        .ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    let v = cert.validity();
    Some(Validity {
        not_before: u64::try_from(v.not_before.timestamp()).ok()?,
        not_after: u64::try_from(v.not_after.timestamp()).ok()?,
    })
}

/// What the leader does next with the Secret.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertAction {
    /// No usable Secret: a CA and a serving certificate.
    Create,
    /// The signing CA is 2/3 through its life: a next CA, trusted but not signing yet.
    IntroduceNextCa,
    /// The next CA has been trusted for the overlap: it signs from now on.
    PromoteNextCa,
    /// The serving certificate is 2/3 through its life.
    RenewServing,
    /// A CA in the bundle has expired: drop it.
    PruneBundle,
    Nothing,
}

/// What is due at `now` (seconds since the epoch) for the Secret's contents.
pub fn plan(pki: Option<&Pki>, now: u64, lifetimes: &Lifetimes) -> CertAction {
    let Some(pki) = pki else {
        return CertAction::Create;
    };
    let (Some(signing), Some(serving)) = (
        validity(&pki.signing.cert_pem),
        validity(&pki.serving.cert_pem),
    ) else {
        return CertAction::Create;
    };
    if now >= signing.not_after {
        return CertAction::Create;
    }
    match pki.next.as_ref().and_then(|n| validity(&n.cert_pem)) {
        Some(next) if now >= next.not_before + lifetimes.ca_overlap.as_secs() => {
            return CertAction::PromoteNextCa;
        }
        Some(_) => {}
        None if signing.renewal_due(now) => return CertAction::IntroduceNextCa,
        None => {}
    }
    if serving.renewal_due(now) || now >= serving.not_after {
        return CertAction::RenewServing;
    }
    if bundle_certs(&pki.bundle)
        .iter()
        .any(|c| validity(c).is_none_or(|v| now >= v.not_after))
    {
        return CertAction::PruneBundle;
    }
    CertAction::Nothing
}

/// The PEM certificates of a bundle, one string each.
fn bundle_certs(bundle: &str) -> Vec<String> {
    const END: &str = "-----END CERTIFICATE-----";
    bundle
        .split_inclusive(END)
        .map(str::trim)
        .filter(|c| c.starts_with("-----BEGIN CERTIFICATE-----") && c.ends_with(END))
        .map(|c| format!("{c}\n"))
        .collect()
}

/// The bundle after `action`: the signing and next CAs, and the others until they expire.
fn bundle_with(previous: &str, cas: &[&KeyedCert], now: u64) -> String {
    let mut certs: Vec<String> = cas.iter().map(|c| c.cert_pem.clone()).collect();
    for c in bundle_certs(previous) {
        if !certs.contains(&c) && validity(&c).is_some_and(|v| now < v.not_after) {
            certs.push(c);
        }
    }
    certs.concat()
}

/// Applies `action` at `now`: the new contents of the Secret (`None` for `Nothing`).
pub fn carry_out(
    action: CertAction,
    pki: Option<&Pki>,
    now: u64,
    lifetimes: &Lifetimes,
    names: &[String],
) -> Result<Option<Pki>, CertError> {
    let new = match (action, pki) {
        (CertAction::Nothing, _) => return Ok(None),
        (CertAction::Create, _) | (_, None) => {
            let signing = new_ca(now, lifetimes.ca)?;
            Pki {
                serving: new_serving(&signing, names, now, lifetimes.serving)?,
                bundle: signing.cert_pem.clone(),
                signing,
                next: None,
            }
        }
        (CertAction::IntroduceNextCa, Some(pki)) => {
            let next = new_ca(now, lifetimes.ca)?;
            Pki {
                bundle: bundle_with(&pki.bundle, &[&pki.signing, &next], now),
                next: Some(next),
                ..pki.clone()
            }
        }
        (CertAction::PromoteNextCa, Some(pki)) => {
            let signing = pki.next.clone().unwrap_or_else(|| pki.signing.clone());
            Pki {
                serving: new_serving(&signing, names, now, lifetimes.serving)?,
                bundle: bundle_with(&pki.bundle, &[&signing, &pki.signing], now),
                signing,
                next: None,
            }
        }
        (CertAction::RenewServing, Some(pki)) => Pki {
            serving: new_serving(&pki.signing, names, now, lifetimes.serving)?,
            ..pki.clone()
        },
        (CertAction::PruneBundle, Some(pki)) => {
            let cas: Vec<&KeyedCert> = std::iter::once(&pki.signing).chain(&pki.next).collect();
            Pki {
                bundle: bundle_with("", &cas, now),
                ..pki.clone()
            }
        }
    };
    Ok(Some(new))
}

/// Valid from a minute before `now` (clock skew between replicas and agents) for `life`.
fn set_validity(params: &mut CertificateParams, now: u64, life: Duration) {
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + Duration::from_secs(now.saturating_sub(60));
    params.not_after = epoch + Duration::from_secs(now) + life;
}

/// A new self-signed CA, named with its creation time so that successive CAs differ.
fn new_ca(now: u64, life: Duration) -> Result<KeyedCert, CertError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("kmesh-operator CA {now}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    set_validity(&mut params, now, life);
    let cert = params.self_signed(&key)?;
    Ok(KeyedCert {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// A serving certificate for `names`, signed by `ca`.
fn new_serving(
    ca: &KeyedCert,
    names: &[String],
    now: u64,
    life: Duration,
) -> Result<KeyedCert, CertError> {
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, KeyPair::from_pem(&ca.key_pem)?)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(names.to_vec())?;
    if let Some(name) = names.first() {
        params
            .distinguished_name
            .push(DnType::CommonName, name.clone());
    }
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    set_validity(&mut params, now, life);
    let cert = params.signed_by(&key, &issuer)?;
    Ok(KeyedCert {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// The DNS names of the Service `service` in `namespace`.
pub fn service_names(service: &str, namespace: &str) -> Vec<String> {
    vec![
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
        format!("{service}.{namespace}"),
        service.to_string(),
    ]
}

const SIGNING_CERT: &str = "ca-cert.pem";
const SIGNING_KEY: &str = "ca-key.pem";
const NEXT_CERT: &str = "next-ca-cert.pem";
const NEXT_KEY: &str = "next-ca-key.pem";

fn text(data: &BTreeMap<String, ByteString>, key: &str) -> Option<String> {
    data.get(key)
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
}

/// The Secret's contents; `None` when a key is missing.
pub fn pki_of(secret: &Secret) -> Option<Pki> {
    let data = secret.data.as_ref()?;
    let keyed = |cert: &str, key: &str| {
        Some(KeyedCert {
            cert_pem: text(data, cert)?,
            key_pem: text(data, key)?,
        })
    };
    Some(Pki {
        signing: keyed(SIGNING_CERT, SIGNING_KEY)?,
        next: keyed(NEXT_CERT, NEXT_KEY),
        serving: keyed("tls.crt", "tls.key")?,
        bundle: text(data, CA_KEY)?,
    })
}

/// The Secret (type `kubernetes.io/tls`) holding `pki`.
fn secret_of(pki: &Pki, namespace: &str, resource_version: Option<String>) -> Secret {
    let mut data = BTreeMap::from([
        ("tls.crt", &pki.serving.cert_pem),
        ("tls.key", &pki.serving.key_pem),
        (CA_KEY, &pki.bundle),
        (SIGNING_CERT, &pki.signing.cert_pem),
        (SIGNING_KEY, &pki.signing.key_pem),
    ]);
    if let Some(next) = &pki.next {
        data.insert(NEXT_CERT, &next.cert_pem);
        data.insert(NEXT_KEY, &next.key_pem);
    }
    Secret {
        metadata: ObjectMeta {
            name: Some(TLS_SECRET.into()),
            namespace: Some(namespace.into()),
            resource_version,
            labels: Some(BTreeMap::from([(
                MANAGED_BY.0.to_string(),
                MANAGED_BY.1.to_string(),
            )])),
            ..ObjectMeta::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(
            data.into_iter()
                .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                .collect(),
        ),
        ..Secret::default()
    }
}

/// The certificate the snapshot server presents, swapped in place when it changes.
#[derive(Debug, Default)]
pub struct CurrentCert(RwLock<Option<Arc<CertifiedKey>>>);

impl CurrentCert {
    /// Loads a PEM chain and key; returns whether it differs from what was served.
    pub fn load(&self, cert_pem: &[u8], key_pem: &[u8]) -> Result<(), CertError> {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<_, _>>()
            .map_err(|_| CertError::Unreadable { what: "tls.crt" })?;
        if certs.is_empty() {
            return Err(CertError::Unreadable { what: "tls.crt" });
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|_| CertError::NoKey { what: "tls.key" })?;
        let provider = tokio_rustls::rustls::crypto::ring::default_provider();
        let signing = provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| CertError::Key(e.to_string()))?;
        let certified = CertifiedKey::new(certs, signing);
        certified
            .keys_match()
            .map_err(|e| CertError::Key(e.to_string()))?;
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(certified));
        Ok(())
    }

    pub fn is_loaded(&self) -> bool {
        self.0.read().unwrap_or_else(|p| p.into_inner()).is_some()
    }
}

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// A TLS acceptor that presents whatever `cert` holds at each handshake.
pub fn acceptor(cert: Arc<CurrentCert>) -> crate::Result<tokio_rustls::TlsAcceptor> {
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(crate::Error::Tls)?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Where the serving certificate comes from.
#[derive(Clone, Debug)]
pub enum CertSource {
    /// The operator's own, in the Secret [`TLS_SECRET`] of `namespace`.
    SelfManaged {
        namespace: String,
        service: String,
        lifetimes: Lifetimes,
    },
    /// Files kept by someone else (cert-manager); `ca` is published for the agents if given.
    Files {
        cert: PathBuf,
        key: PathBuf,
        ca: Option<PathBuf>,
        namespace: String,
    },
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Keeps `cert` current until aborted: from the Secret (creating and rotating it while leading)
/// or from the files; and, while leading, the CA ConfigMap.
pub fn start(
    client: Client,
    source: CertSource,
    cert: Arc<CurrentCert>,
    leadership: Leadership,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        match source {
            CertSource::SelfManaged {
                namespace,
                service,
                lifetimes,
            } => {
                let names = service_names(&service, &namespace);
                self_managed(client, namespace, names, lifetimes, cert, leadership).await
            }
            CertSource::Files {
                cert: cert_path,
                key,
                ca,
                namespace,
            } => files(client, cert_path, key, ca, namespace, cert, leadership).await,
        }
    })
}

/// How often the leader looks at the Secret even when nothing wakes it (expiry comes with time).
const CHECK_EVERY: Duration = Duration::from_secs(60);

async fn self_managed(
    client: Client,
    namespace: String,
    names: Vec<String>,
    lifetimes: Lifetimes,
    cert: Arc<CurrentCert>,
    mut leadership: Leadership,
) {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    let (mut seen, _watch) = watch_object(secrets.clone(), TLS_SECRET);
    let mut served: Option<KeyedCert> = None;
    loop {
        let secret = seen.borrow_and_update().clone();
        let foreign = secret.as_ref().filter(|s| !is_managed(s));
        let pki = secret.as_ref().and_then(pki_of);
        let serving = match foreign {
            Some(s) => given_serving(s),
            None => pki.as_ref().map(|p| p.serving.clone()),
        };
        if let Some(serving) = serving
            && served.as_ref() != Some(&serving)
        {
            match cert.load(serving.cert_pem.as_bytes(), serving.key_pem.as_bytes()) {
                Ok(()) => {
                    info!(
                        secret = TLS_SECRET,
                        foreign = foreign.is_some(),
                        "serving certificate loaded"
                    );
                    served = Some(serving);
                }
                Err(e) => warn!(error = %e, "the serving certificate in {TLS_SECRET} is unusable"),
            }
        }
        if leadership.is_leader() {
            let round = async {
                match foreign {
                    // Someone else's (cert-manager): used as it is, never rewritten.
                    Some(s) => match s.data.as_ref().and_then(|d| text(d, CA_KEY)) {
                        Some(bundle) => publish_bundle(&config_maps, &namespace, &bundle).await,
                        None => Ok(()),
                    },
                    None => {
                        let rv = secret
                            .as_ref()
                            .and_then(|s| s.metadata.resource_version.clone());
                        lead(
                            &secrets,
                            &config_maps,
                            &namespace,
                            pki.as_ref(),
                            rv,
                            &names,
                            &lifetimes,
                        )
                        .await
                    }
                }
            };
            let result = tokio::time::timeout(crate::replicas::API_TIMEOUT, round).await;
            match result {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!(error = %e, "keeping the operator's certificates"),
                Err(_) => warn!(
                    "keeping the operator's certificates: the API server did not answer within 5 s"
                ),
            }
        }
        tokio::select! {
            _ = seen.changed() => {}
            _ = leadership.changed() => {}
            _ = tokio::time::sleep(CHECK_EVERY) => {}
        }
    }
}

/// The label the operator puts on the Secret it manages.
const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "kmesh-operator");

fn is_managed(secret: &Secret) -> bool {
    secret
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(MANAGED_BY.0))
        .is_some_and(|v| v == MANAGED_BY.1)
}

/// `tls.crt` and `tls.key` of a Secret made by someone else.
fn given_serving(secret: &Secret) -> Option<KeyedCert> {
    let data = secret.data.as_ref()?;
    Some(KeyedCert {
        cert_pem: text(data, "tls.crt")?,
        key_pem: text(data, "tls.key")?,
    })
}

/// The leader's round: what [`plan`] says is due, written with the resourceVersion read (a create
/// when there is no Secret), then the CA ConfigMap.
async fn lead(
    secrets: &Api<Secret>,
    config_maps: &Api<ConfigMap>,
    namespace: &str,
    pki: Option<&Pki>,
    resource_version: Option<String>,
    names: &[String],
    lifetimes: &Lifetimes,
) -> Result<(), CertError> {
    let now = unix_now();
    let action = plan(pki, now, lifetimes);
    if let Some(new) = carry_out(action, pki, now, lifetimes, names)? {
        let secret = secret_of(&new, namespace, resource_version.clone());
        let pp = PostParams::default();
        let written = match resource_version {
            None => secrets.create(&pp, &secret).await,
            Some(_) => secrets.replace(TLS_SECRET, &pp, &secret).await,
        };
        match written {
            Ok(_) => info!(?action, secret = TLS_SECRET, "certificates written"),
            // Another replica wrote first: the watch brings its Secret, used next round.
            Err(kube::Error::Api(s)) if s.code == 409 => {
                info!(?action, "another replica wrote {TLS_SECRET} first");
                return Ok(());
            }
            Err(e) => return Err(CertError::Api(e)),
        }
        return publish_bundle(config_maps, namespace, &new.bundle).await;
    }
    match pki {
        Some(pki) => publish_bundle(config_maps, namespace, &pki.bundle).await,
        None => Ok(()),
    }
}

/// Makes the CA ConfigMap hold `bundle` (written only when it differs).
async fn publish_bundle(
    config_maps: &Api<ConfigMap>,
    namespace: &str,
    bundle: &str,
) -> Result<(), CertError> {
    let current = config_maps
        .get_opt(CA_CONFIG_MAP)
        .await
        .map_err(CertError::Api)?;
    let stored = current
        .as_ref()
        .and_then(|c| c.data.as_ref())
        .and_then(|d| d.get(CA_KEY));
    if stored.map(String::as_str) == Some(bundle) {
        return Ok(());
    }
    let config_map = ConfigMap {
        metadata: ObjectMeta {
            name: Some(CA_CONFIG_MAP.into()),
            namespace: Some(namespace.into()),
            resource_version: current
                .as_ref()
                .and_then(|c| c.metadata.resource_version.clone()),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(CA_KEY.to_string(), bundle.to_string())])),
        ..ConfigMap::default()
    };
    let pp = PostParams::default();
    let written = match current {
        None => config_maps.create(&pp, &config_map).await,
        Some(_) => config_maps.replace(CA_CONFIG_MAP, &pp, &config_map).await,
    };
    written.map_err(CertError::Api)?;
    info!(config_map = CA_CONFIG_MAP, "CA bundle published");
    Ok(())
}

/// Files mode: reload the files when they change (checked every 10 s); while leading, publish
/// the CA file.
async fn files(
    client: Client,
    cert_path: PathBuf,
    key_path: PathBuf,
    ca_path: Option<PathBuf>,
    namespace: String,
    cert: Arc<CurrentCert>,
    leadership: Leadership,
) {
    let config_maps: Api<ConfigMap> = Api::namespaced(client, &namespace);
    let mut loaded: Option<(Vec<u8>, Vec<u8>)> = None;
    loop {
        match (std::fs::read(&cert_path), std::fs::read(&key_path)) {
            (Ok(c), Ok(k)) if loaded.as_ref() != Some(&(c.clone(), k.clone())) => {
                match cert.load(&c, &k) {
                    Ok(()) => {
                        info!(cert = %cert_path.display(), "serving certificate loaded");
                        loaded = Some((c, k));
                    }
                    Err(e) => {
                        warn!(cert = %cert_path.display(), error = %e, "unusable certificate")
                    }
                }
            }
            (Err(e), _) | (_, Err(e)) => warn!(error = %e, "reading the serving certificate"),
            _ => {}
        }
        if let Some(ca) = &ca_path
            && leadership.is_leader()
        {
            match std::fs::read_to_string(ca) {
                Ok(bundle) => {
                    if let Err(e) = publish_bundle(&config_maps, &namespace, &bundle).await {
                        warn!(error = %e, "publishing the CA bundle");
                    }
                }
                Err(e) => warn!(ca = %ca.display(), error = %e, "reading the CA file"),
            }
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
}

/// Reads the certificate and key files once, as the server starts (files mode only).
pub fn load_files(
    cert: &CurrentCert,
    cert_path: &PathBuf,
    key_path: &PathBuf,
) -> crate::Result<()> {
    let read = |p: &PathBuf| std::fs::read(p).map_err(crate::Error::read(p));
    // The same checks as the static acceptor, for the same clear errors at start-up.
    let (c, k) = (read(cert_path)?, read(key_path)?);
    crate::server::tls_acceptor(&c, &k)?;
    cert.load(&c, &k).map_err(crate::Error::Certificates)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 24 * 3600;

    fn lifetimes() -> Lifetimes {
        Lifetimes {
            serving: Duration::from_secs(30 * DAY),
            ca: Duration::from_secs(360 * DAY),
            ca_overlap: Duration::from_secs(DAY),
        }
    }

    fn names() -> Vec<String> {
        service_names("kmesh-operator", "kmesh-system")
    }

    /// Runs plan and carry_out once.
    fn step(pki: Option<&Pki>, now: u64) -> (CertAction, Option<Pki>) {
        let action = plan(pki, now, &lifetimes());
        let new = carry_out(action, pki, now, &lifetimes(), &names()).unwrap();
        (action, new)
    }

    /// Whether `leaf` verifies against the CAs of `bundle` for the Service name at `now`.
    fn trusted(bundle: &str, leaf: &str, now: u64) -> bool {
        use tokio_rustls::rustls::{
            RootCertStore, client::WebPkiServerVerifier, client::danger::ServerCertVerifier,
        };
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(bundle.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .unwrap();
        let leaf = CertificateDer::pem_slice_iter(leaf.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        let name =
            rustls_pki_types::ServerName::try_from("kmesh-operator.kmesh-system.svc").unwrap();
        let time = rustls_pki_types::UnixTime::since_unix_epoch(Duration::from_secs(now));
        verifier
            .verify_server_cert(&leaf, &[], &name, &[], time)
            .is_ok()
    }

    #[test]
    fn a_missing_secret_gets_a_ca_and_a_serving_certificate_it_signs() {
        let t0 = 1_700_000_000;
        let (action, pki) = step(None, t0);
        assert_eq!(action, CertAction::Create);
        let pki = pki.unwrap();
        assert!(trusted(&pki.bundle, &pki.serving.cert_pem, t0));
        assert_eq!(
            plan(Some(&pki), t0 + DAY, &lifetimes()),
            CertAction::Nothing
        );
        let v = validity(&pki.serving.cert_pem).unwrap();
        assert_eq!(v.not_after, t0 + 30 * DAY);
        // Round trip through the Secret.
        assert_eq!(pki_of(&secret_of(&pki, "kmesh-system", None)), Some(pki));
    }

    #[test]
    fn the_serving_certificate_is_renewed_at_two_thirds_of_its_life() {
        let t0 = 1_700_000_000;
        let pki = step(None, t0).1.unwrap();
        assert_eq!(
            plan(Some(&pki), t0 + 19 * DAY, &lifetimes()),
            CertAction::Nothing
        );
        let (action, renewed) = step(Some(&pki), t0 + 21 * DAY);
        assert_eq!(action, CertAction::RenewServing);
        let renewed = renewed.unwrap();
        assert_ne!(renewed.serving, pki.serving);
        assert_eq!(renewed.signing, pki.signing);
        assert!(trusted(
            &renewed.bundle,
            &renewed.serving.cert_pem,
            t0 + 40 * DAY
        ));
        assert!(
            !trusted(&pki.bundle, &pki.serving.cert_pem, t0 + 31 * DAY),
            "the old one expired"
        );
    }

    /// The CA changes with an overlap: the next CA is trusted before it signs, so an agent that
    /// loaded the bundle at any point of the change trusts the certificate served then.
    #[test]
    fn the_ca_is_rotated_with_an_overlap() {
        let t0 = 1_700_000_000;
        let mut pki = step(None, t0).1.unwrap();
        let mut now = t0;
        // Renew the serving certificate as time passes, until the CA is 2/3 through its life.
        while plan(Some(&pki), now, &lifetimes()) != CertAction::IntroduceNextCa {
            if let (_, Some(new)) = step(Some(&pki), now) {
                pki = new;
            }
            now += DAY;
            assert!(now < t0 + 300 * DAY, "no CA rotation planned");
        }
        let old_bundle = pki.bundle.clone();
        let (_, introduced) = step(Some(&pki), now);
        let introduced = introduced.unwrap();
        let next = introduced.next.clone().unwrap();
        assert_eq!(
            introduced.signing, pki.signing,
            "the next CA does not sign yet"
        );
        assert_eq!(
            bundle_certs(&introduced.bundle).len(),
            2,
            "both CAs are trusted"
        );
        assert!(trusted(
            &introduced.bundle,
            &introduced.serving.cert_pem,
            now
        ));
        assert!(
            !matches!(
                plan(Some(&introduced), now + 3600, &lifetimes()),
                CertAction::PromoteNextCa | CertAction::IntroduceNextCa
            ),
            "the next CA waits for the overlap"
        );
        // After the overlap, the next CA signs.
        let later = now + DAY + 60;
        let (action, promoted) = step(Some(&introduced), later);
        assert_eq!(action, CertAction::PromoteNextCa);
        let promoted = promoted.unwrap();
        assert_eq!(promoted.signing, next);
        assert!(promoted.next.is_none());
        assert!(
            trusted(&introduced.bundle, &promoted.serving.cert_pem, later),
            "an agent holding the bundle of the overlap trusts the new certificate"
        );
        assert!(
            !trusted(&old_bundle, &promoted.serving.cert_pem, later),
            "(the overlap is needed: the bundle before it does not)"
        );
        // The old CA leaves the bundle once it has expired.
        let expired = t0 + 361 * DAY;
        let mut p = promoted;
        let mut pruned = false;
        for _ in 0..4 {
            match step(Some(&p), expired) {
                (CertAction::PruneBundle, Some(new)) => {
                    pruned = true;
                    p = new;
                }
                (_, Some(new)) => p = new,
                (_, None) => break,
            }
        }
        assert!(pruned);
        assert_eq!(bundle_certs(&p.bundle), vec![p.signing.cert_pem.clone()]);
    }

    #[test]
    fn unreadable_contents_are_replaced() {
        let t0 = 1_700_000_000;
        let mut pki = step(None, t0).1.unwrap();
        pki.serving.cert_pem = "garbage".into();
        assert_eq!(plan(Some(&pki), t0, &lifetimes()), CertAction::Create);
        assert!(pki_of(&Secret::default()).is_none());
    }
}
