//! TLS for the listener: the policy, the certificate served right now, and where it
//! comes from.
//!
//! Modes (`config::TlsMode`):
//! - `self-signed` ([`self_signed`]): made with rcgen, kept sealed in the data file, the
//!   same across restarts and backups;
//! - `acme` ([`acme`]): ordered from an ACME CA through TLS-ALPN-01 on the HTTPS port
//!   ([`order`], [`challenge`]), account and certificate kept sealed in the store,
//!   renewed well before expiry, by one node at a time when several share a database;
//! - `files` ([`files`]): a PEM chain and key read at start and again on SIGHUP;
//! - `off`: plain HTTP on loopback (checked by `config`).
//!
//! Whatever the mode, every handshake asks one [`CertSlot`] for its certificate, so a
//! renewal or a reload swaps it for new connections while open ones keep theirs. The
//! policy is the same in every mode: TLS 1.3 and 1.2 only, rustls' ring provider and its
//! safe cipher suites in the server's order, ALPN h2 and http/1.1, resumption through
//! stateless tickets and a session cache.

pub mod acme;
pub(crate) mod challenge;
pub(crate) mod eab;
pub(crate) mod files;
mod order;
mod self_signed;

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use ring::digest::{SHA256, digest};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_rustls::server::TlsStream;

use crate::config::TlsMode;
use crate::store::StoreError;

pub use self_signed::{generate_self_signed, self_signed, self_signed_names, stored_pin};

/// `self-signed` mode: replaces the served certificate once it is due (a month before
/// it expires), keeping its key so the pin apps hold stays valid. Called every second by
/// the server's housekeeping; cheap when nothing is due. Returns the new certificate's
/// facts when it renewed.
pub(crate) async fn renew_self_signed_if_due(
    tls: &Tls,
    store: &crate::store::Store,
    clock: &dyn crate::clock::Clock,
) -> Result<Option<CertInfo>, TlsError> {
    let Some(listen) = tls.self_signed_for else {
        return Ok(None);
    };
    let current = tls.slot.current();
    if clock.now_ms() < self_signed::renew_at_ms(current.info.not_after_ms) {
        return Ok(None);
    }
    let (cert, _pin) = self_signed(store, clock, listen).await?;
    let info = cert.info.clone();
    tls.slot.replace(cert);
    Ok(Some(info))
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot make a self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("the certificate or key is unusable: {0}")]
    Rustls(#[from] rustls::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot read {}: {source}", path.display())]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {reason}", path.display())]
    BadFile { path: PathBuf, reason: String },
    #[error("the certificate cannot be parsed: {0}")]
    Certificate(String),
}

/// The ring crypto provider: the only one gatehouse uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Makes ring the process-wide default provider (for any library that asks for the
/// default rather than taking ours). Idempotent.
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Facts about a served certificate, for `/readyz`, metrics, `doctor` and the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertInfo {
    /// DNS names and IP addresses of the subject alternative names.
    pub(crate) names: Vec<String>,
    pub(crate) subject: String,
    pub(crate) issuer: String,
    pub(crate) not_before_ms: u64,
    pub not_after_ms: u64,
    /// SHA-256 of the leaf certificate (DER), lower-case hex.
    pub(crate) sha256: String,
}

impl CertInfo {
    /// Reads the facts out of a DER certificate.
    pub(crate) fn parse(der: &[u8]) -> Result<Self, TlsError> {
        use x509_parser::extensions::GeneralName;
        use x509_parser::prelude::{FromDer, X509Certificate};
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| TlsError::Certificate(e.to_string()))?;
        let mut names = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(dns) => names.push((*dns).to_string()),
                    GeneralName::IPAddress(bytes) => {
                        if let Ok(v4) = <[u8; 4]>::try_from(*bytes) {
                            names.push(std::net::Ipv4Addr::from(v4).to_string());
                        } else if let Ok(v6) = <[u8; 16]>::try_from(*bytes) {
                            names.push(std::net::Ipv6Addr::from(v6).to_string());
                        }
                    }
                    _ => {}
                }
            }
        }
        let ms = |t: i64| u64::try_from(t).unwrap_or(0).saturating_mul(1000);
        let validity = cert.validity();
        Ok(Self {
            names,
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            not_before_ms: ms(validity.not_before.timestamp()),
            not_after_ms: ms(validity.not_after.timestamp()),
            sha256: data_encoding::HEXLOWER.encode(digest(&SHA256, der).as_ref()),
        })
    }

    /// When a renewal is due: a third of the lifetime before expiry, at most 30 days
    /// (Let's Encrypt's 90-day certificates renew with 30 days left, 6-day ones with 2).
    pub(crate) fn renew_at_ms(&self) -> u64 {
        let lifetime = self.not_after_ms.saturating_sub(self.not_before_ms);
        let before = (lifetime / 3).min(30 * 24 * 3600 * 1000);
        self.not_after_ms.saturating_sub(before)
    }

    pub fn is_self_signed(&self) -> bool {
        self.subject == self.issuer
    }
}

/// A certificate chain and key, ready to serve.
#[derive(Debug)]
pub struct ServedCert {
    pub(crate) key: Arc<CertifiedKey>,
    pub info: CertInfo,
}

impl ServedCert {
    /// Checks that the key belongs to the leaf and that the provider can sign with it.
    pub(crate) fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, TlsError> {
        let Some(leaf) = chain.first() else {
            return Err(TlsError::Certificate("no certificate".into()));
        };
        let info = CertInfo::parse(leaf)?;
        let certified = CertifiedKey::from_der(chain, key, &provider())?;
        certified.keys_match()?;
        Ok(Self {
            key: Arc::new(certified),
            info,
        })
    }

    /// From one PEM buffer holding the private key and the chain (leaf first), as ACME
    /// stores them.
    pub(crate) fn from_pem(pem: &[u8]) -> Result<Self, TlsError> {
        let chain = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Certificate(format!("bad PEM certificate: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(pem)
            .map_err(|e| TlsError::Certificate(format!("bad PEM private key: {e}")))?;
        Self::new(chain, key)
    }
}

/// The certificate every new handshake gets; swapped whole on renewal or reload, so
/// connections already open keep the one they started with.
#[derive(Debug)]
pub struct CertSlot {
    current: RwLock<Arc<ServedCert>>,
}

impl CertSlot {
    pub(crate) fn new(cert: ServedCert) -> Self {
        Self {
            current: RwLock::new(Arc::new(cert)),
        }
    }

    pub fn current(&self) -> Arc<ServedCert> {
        match self.current.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub(crate) fn replace(&self, cert: ServedCert) {
        let cert = Arc::new(cert);
        match self.current.write() {
            Ok(mut guard) => *guard = cert,
            Err(poisoned) => *poisoned.into_inner() = cert,
        }
    }
}

impl ResolvesServerCert for CertSlot {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current().key.clone())
    }
}

/// Sessions remembered for TLS 1.2 resumption by id (about 200 bytes each); TLS 1.3 and
/// TLS 1.2 clients that take tickets need no server memory at all.
const SESSION_CACHE: usize = 4096;

/// The rustls server configuration: TLS 1.3 and 1.2 only, the ring provider's cipher
/// suites (all AEAD, forward-secret) in the server's order, ALPN h2 then http/1.1, and
/// resumption by tickets (ring's ticketer: AEAD-sealed, keys rotated every 6 hours).
pub(crate) fn server_config(
    resolver: Arc<dyn ResolvesServerCert>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config.ignore_client_order = true;
    config.session_storage = rustls::server::ServerSessionMemoryCache::new(SESSION_CACHE);
    config.ticketer = rustls::crypto::ring::Ticketer::new()?;
    Ok(Arc::new(config))
}

/// The TLS side of a running server: what is served and how it is kept fresh.
#[derive(Debug)]
pub struct Tls {
    pub(crate) mode: TlsMode,
    pub slot: Arc<CertSlot>,
    pub(crate) config: Arc<rustls::ServerConfig>,
    /// `acme` mode: orders, failures and the challenge responder.
    pub acme: Option<Arc<acme::AcmeStatus>>,
    /// `files` mode: where to reload from.
    pub(crate) files: Option<files::CertFiles>,
    /// `self-signed` mode: the pin (`sha256/<base64>` of the SPKI) a pairing URI carries.
    pub pin: Option<String>,
    /// `self-signed` mode: the listen address the certificate must cover (for renewals).
    pub(crate) self_signed_for: Option<std::net::SocketAddr>,
}

impl Tls {
    pub(crate) fn new(mode: TlsMode, cert: ServedCert) -> Result<Self, TlsError> {
        let slot = Arc::new(CertSlot::new(cert));
        Ok(Self {
            mode,
            config: server_config(slot.clone())?,
            slot,
            acme: None,
            files: None,
            pin: None,
            self_signed_for: None,
        })
    }

    /// The DER of the leaf served now (tests trust it directly).
    pub fn cert_der(&self) -> Vec<u8> {
        self.slot
            .current()
            .key
            .cert
            .first()
            .map(|c| c.to_vec())
            .unwrap_or_default()
    }

    pub(crate) fn acceptor(&self) -> Acceptor {
        Acceptor {
            config: self.config.clone(),
            acme: self.acme.clone(),
        }
    }

    /// What is served and the state of renewals, for `/readyz`, metrics and `doctor`.
    pub(crate) fn status(&self) -> TlsStatus {
        TlsStatus {
            mode: self.mode.as_str().to_string(),
            certificate: Some(self.slot.current().info.clone()),
            acme: self.acme.as_ref().map(|acme| acme.snapshot()),
        }
    }
}

/// A snapshot of the TLS state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct TlsStatus {
    pub(crate) mode: String,
    /// The certificate served now (none with TLS off).
    pub(crate) certificate: Option<CertInfo>,
    pub(crate) acme: Option<acme::AcmeSnapshot>,
}

impl TlsStatus {
    pub(crate) fn off() -> Self {
        Self {
            mode: TlsMode::Off.as_str().to_string(),
            certificate: None,
            acme: None,
        }
    }

    /// Why the server should not take traffic, if it should not: an expired
    /// certificate, or in `acme` mode none issued yet.
    pub(crate) fn unready_reason(&self, now_ms: u64) -> Option<String> {
        if let Some(cert) = &self.certificate
            && cert.not_after_ms <= now_ms
        {
            return Some("the served certificate has expired".into());
        }
        match &self.acme {
            Some(acme) if !acme.issued => Some(match &acme.last_error {
                Some(err) => format!("no certificate from the ACME CA yet: {err}"),
                None => "no certificate from the ACME CA yet".into(),
            }),
            _ => None,
        }
    }
}

/// Does the TLS handshake of one connection. In `acme` mode it first looks at the
/// ClientHello: a TLS-ALPN-01 validation (ALPN `acme-tls/1` alone) is answered with the
/// challenge certificate for the name it asks, of the order in progress on this node or
/// on another (through the store), and closed, never reaching HTTP.
#[derive(Debug, Clone)]
pub(crate) struct Acceptor {
    config: Arc<rustls::ServerConfig>,
    acme: Option<Arc<acme::AcmeStatus>>,
}

impl Acceptor {
    /// `Ok(None)`: the connection was an ACME validation and is done.
    pub(crate) async fn accept<IO>(&self, io: IO) -> std::io::Result<Option<TlsStream<IO>>>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let Some(acme) = &self.acme else {
            return tokio_rustls::TlsAcceptor::from(self.config.clone())
                .accept(io)
                .await
                .map(Some);
        };
        let start =
            tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io).await?;
        let hello = start.client_hello();
        if !rustls_acme::is_tls_alpn_challenge(&hello) {
            return start.into_stream(self.config.clone()).await.map(Some);
        }
        let name = hello.server_name().map(str::to_string);
        let challenge = acme
            .challenges()
            .responder(name.as_deref())
            .await
            .map_err(std::io::Error::other)?;
        let mut stream = start.into_stream(challenge).await?;
        let _ = stream.shutdown().await;
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn renewal_is_a_third_of_the_lifetime_before_expiry_at_most_30_days() {
        let day = 24 * 3600 * 1000;
        let info = |lifetime_days: u64| CertInfo {
            names: vec![],
            subject: String::new(),
            issuer: String::new(),
            not_before_ms: 0,
            not_after_ms: lifetime_days * day,
            sha256: String::new(),
        };
        assert_eq!(info(90).renew_at_ms(), 60 * day);
        assert_eq!(info(6).renew_at_ms(), 4 * day);
        assert_eq!(info(365 * 5).renew_at_ms(), (365 * 5 - 30) * day);
    }

    #[test]
    fn a_generated_certificate_parses_and_serves() {
        let names = self_signed_names("127.0.0.1:1".parse().unwrap());
        let cert = generate_self_signed(&names, 1_700_000_000_000).unwrap();
        let served = ServedCert::new(
            vec![CertificateDer::from(cert.cert_der.clone())],
            PrivateKeyDer::try_from(cert.key_der.clone()).unwrap(),
        )
        .unwrap();
        assert!(served.info.names.contains(&"localhost".to_string()));
        assert!(served.info.names.contains(&"127.0.0.1".to_string()));
        assert!(served.info.is_self_signed());
        assert_eq!(served.info.not_after_ms, cert.not_after_ms / 1000 * 1000);
    }

    #[test]
    fn a_key_of_another_certificate_is_refused() {
        let names = self_signed_names("127.0.0.1:1".parse().unwrap());
        let a = generate_self_signed(&names, 1_700_000_000_000).unwrap();
        let b = generate_self_signed(&names, 1_700_000_000_000).unwrap();
        let mixed = ServedCert::new(
            vec![CertificateDer::from(a.cert_der)],
            PrivateKeyDer::try_from(b.key_der).unwrap(),
        );
        assert!(mixed.is_err());
    }

    #[test]
    fn garbage_pem_is_an_error_not_a_panic() {
        for input in [&b""[..], b"-----BEGIN CERTIFICATE-----\nzz\n", b"\xff\xfe"] {
            assert!(ServedCert::from_pem(input).is_err());
        }
    }
}
