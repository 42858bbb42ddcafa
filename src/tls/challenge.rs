//! TLS-ALPN-01 (RFC 8737): the challenge certificates of an open order, and the
//! responder that answers a CA's validation connection with one.
//!
//! The node that orders makes each challenge certificate, keeps it in memory and seals it
//! in the store (`acme/challenge/<name>`) before it asks the CA to validate, then removes
//! both once the validation ends. A validation connection reaches whichever node the CA's
//! address for the name leads to; that node answers from its own memory or, failing that,
//! from the store, so any node of a cluster can answer for the one that orders. What a
//! validation connection can obtain is fenced: only a ClientHello that offers ALPN
//! `acme-tls/1` and nothing else gets here, only for a configured name, only the
//! challenge certificate stored for that very name, and the connection is closed after
//! the handshake without reaching HTTP.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use rcgen::{CertificateParams, CustomExtension, KeyPair, PKCS_ECDSA_P256_SHA256};
use ring::digest::{SHA256, digest};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::{TlsError, provider};
use crate::clock::SharedClock;
use crate::store::Store;
use crate::store::records::AcmeChallenge;

/// The ALPN protocol of TLS-ALPN-01 validation connections.
const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// The key authorization's SHA-256 (RFC 8555 section 8.1, RFC 8737 section 3): what the
/// acmeIdentifier extension of the challenge certificate carries. `account_public` is the
/// account key's uncompressed P-256 point (0x04 ‖ x ‖ y).
pub(super) fn key_authorization_sha256(
    account_public: &[u8],
    token: &str,
) -> Result<[u8; 32], String> {
    let b64 = |bytes: &[u8]| data_encoding::BASE64URL_NOPAD.encode(bytes);
    let point = match account_public {
        [0x04, point @ ..] if point.len() == 64 => point,
        _ => return Err("the account key is not an uncompressed P-256 point".into()),
    };
    let (x, y) = point.split_at(32);
    // RFC 7638: the required members only, in lexicographic order, no white space.
    let jwk = format!(
        r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
        b64(x),
        b64(y)
    );
    let thumbprint = b64(digest(&SHA256, jwk.as_bytes()).as_ref());
    let key_authorization = format!("{token}.{thumbprint}");
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, key_authorization.as_bytes()).as_ref());
    Ok(out)
}

/// A challenge certificate for `name`: self-signed, a key of its own, the name as its
/// only subject alternative name and the critical acmeIdentifier extension holding
/// `key_authorization_sha256`.
pub(super) fn challenge_certificate(
    directory: &str,
    name: &str,
    key_authorization_sha256: &[u8; 32],
    now_ms: u64,
    lifetime: std::time::Duration,
) -> Result<AcmeChallenge, TlsError> {
    let mut params = CertificateParams::new(vec![name.to_string()])?;
    params.custom_extensions = vec![CustomExtension::new_acme_identifier(
        key_authorization_sha256,
    )];
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let cert = params.self_signed(&key)?;
    Ok(AcmeChallenge {
        directory: directory.to_string(),
        name: name.to_string(),
        cert_der: cert.der().to_vec(),
        key_pkcs8: key.serialize_der(),
        created_at_ms: now_ms,
        expires_at_ms: now_ms.saturating_add(crate::clock::millis(lifetime)),
    })
}

/// Presents one challenge certificate whatever the ClientHello says (the name was
/// checked before this configuration was chosen).
#[derive(Debug)]
struct ChallengeCert(Arc<CertifiedKey>);

impl ResolvesServerCert for ChallengeCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// The rustls configuration that presents `challenge` and speaks only `acme-tls/1`.
///
/// The certificate is handed to rustls as it is, not through `with_single_cert` (nor
/// checked with `keys_match`): both parse it with webpki, which refuses the critical
/// acmeIdentifier extension it does not know (RFC 8737 section 3 makes it critical). The
/// key and the certificate were made together and sealed together.
fn responder_config(challenge: &AcmeChallenge) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = provider();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(challenge.key_pkcs8.clone()));
    let signing = provider.key_provider.load_private_key(key)?;
    let certified = CertifiedKey::new(
        vec![CertificateDer::from(challenge.cert_der.clone())],
        signing,
    );
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(ChallengeCert(Arc::new(certified))));
    config.alpn_protocols = vec![ACME_TLS_ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// The challenges this node can answer: its own open ones, and those in the store.
#[derive(Debug)]
pub(crate) struct Challenges {
    /// The configured names, lowercase: no other name is ever looked up.
    names: Vec<String>,
    open: RwLock<HashMap<String, Arc<rustls::ServerConfig>>>,
    store: Store,
    clock: SharedClock,
}

impl Challenges {
    pub(super) fn new(names: &[String], store: Store, clock: SharedClock) -> Self {
        Self {
            names: names.iter().map(|n| n.to_ascii_lowercase()).collect(),
            open: RwLock::new(HashMap::new()),
            store,
            clock,
        }
    }

    /// Answers validations for `challenge.name` from memory until [`Self::close`].
    pub(super) fn open(&self, challenge: &AcmeChallenge) -> Result<(), TlsError> {
        let config = responder_config(challenge)?;
        self.with_open(|open| open.insert(challenge.name.clone(), config));
        Ok(())
    }

    pub(super) fn close(&self, name: &str) {
        self.with_open(|open| open.remove(name));
    }

    pub(super) fn close_all(&self) {
        self.with_open(HashMap::clear);
    }

    fn with_open<R>(
        &self,
        f: impl FnOnce(&mut HashMap<String, Arc<rustls::ServerConfig>>) -> R,
    ) -> R {
        match self.open.write() {
            Ok(mut guard) => f(&mut guard),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }

    fn opened(&self, name: &str) -> Option<Arc<rustls::ServerConfig>> {
        match self.open.read() {
            Ok(guard) => guard.get(name).cloned(),
            Err(poisoned) => poisoned.into_inner().get(name).cloned(),
        }
    }

    /// The configuration answering a validation connection that asked for `sni`, or why
    /// there is none. A store read per validation connection: they are rare, and a
    /// name outside the configuration never reaches the store.
    pub(crate) async fn responder(
        &self,
        sni: Option<&str>,
    ) -> Result<Arc<rustls::ServerConfig>, String> {
        let Some(sni) = sni else {
            return Err("an ACME validation arrived without a server name".into());
        };
        let Some(name) = self
            .names
            .iter()
            .find(|name| name.eq_ignore_ascii_case(sni))
            .cloned()
        else {
            return Err("an ACME validation asked for a name this server does not serve".into());
        };
        if let Some(config) = self.opened(&name) {
            return Ok(config);
        }
        let store = self.store.clone();
        let key = name.clone();
        let stored = tokio::task::spawn_blocking(move || store.read(|tx| tx.acme_challenge(&key)))
            .await
            .map_err(|err| format!("reading the stored ACME challenge failed: {err}"))?
            .map_err(|err| format!("cannot read the stored ACME challenge: {err}"))?;
        match stored {
            Some(challenge) if challenge.expires_at_ms > self.clock.now_ms() => {
                responder_config(&challenge).map_err(|err| {
                    format!("the stored ACME challenge for {name} is unusable: {err}")
                })
            }
            _ => Err(format!(
                "an ACME validation for {name} arrived with no order in progress"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use ring::signature::KeyPair as _;

    /// The same digest as rustls-acme's own key authorization (its HTTP-01 text, hashed),
    /// so that the challenge gatehouse makes is the one the CA expects.
    #[test]
    fn the_key_authorization_matches_rustls_acme() {
        use rustls_acme::acme::{Account, Challenge, ChallengeType, Directory};
        let pkcs8 = Account::generate_key_pair();
        let key_pair = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &pkcs8,
            &ring::rand::SystemRandom::new(),
        )
        .unwrap();
        let public = key_pair.public_key().as_ref().to_vec();
        let account = Account {
            key_pair,
            directory: Directory {
                new_nonce: String::new(),
                new_account: String::new(),
                new_order: String::new(),
            },
            kid: String::new(),
        };
        let token = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA";
        let challenges = [Challenge {
            typ: ChallengeType::Http01,
            url: String::new(),
            token: token.into(),
            error: None,
        }];
        let (_, key_authorization) = account.http_01(&challenges).unwrap();
        let expected = digest(&SHA256, key_authorization.as_bytes());
        assert_eq!(
            key_authorization_sha256(&public, token).unwrap().as_slice(),
            expected.as_ref()
        );
        assert!(key_authorization_sha256(&public[1..], token).is_err());
    }

    #[test]
    fn the_challenge_certificate_carries_the_critical_acme_identifier() {
        use x509_parser::prelude::{FromDer, X509Certificate};
        let digest = [7u8; 32];
        let challenge = challenge_certificate(
            "https://ca.test/dir",
            "gatehouse.test",
            &digest,
            1_000,
            std::time::Duration::from_secs(600),
        )
        .unwrap();
        assert_eq!(challenge.expires_at_ms, 601_000);
        let (_, cert) = X509Certificate::from_der(&challenge.cert_der).unwrap();
        let acme_identifier = cert
            .extensions()
            .iter()
            .find(|ext| ext.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
            .unwrap();
        assert!(acme_identifier.critical);
        // An OCTET STRING of the 32-byte digest.
        let mut expected = vec![0x04, 0x20];
        expected.extend_from_slice(&digest);
        assert_eq!(acme_identifier.value, expected.as_slice());
        let san = cert.subject_alternative_name().unwrap().unwrap();
        assert_eq!(san.value.general_names.len(), 1);
        assert!(responder_config(&challenge).is_ok());
    }
}
