//! The self-signed certificate: made with rcgen, kept sealed in the data file so it stays
//! the same across restarts and backups (a pairing app pins its public key), and replaced
//! a month before it expires or when the listen address needs a name it lacks.

use std::net::SocketAddr;
use std::time::Duration;

use rcgen::{
    CertificateParams, DistinguishedName, DnType, KeyPair, PKCS_ECDSA_P256_SHA256, PublicKeyData,
};
use ring::digest::{SHA256, digest};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::{ServedCert, TlsError};
use crate::clock::Clock;
use crate::store::Store;
use crate::store::records::SelfSignedCert;

/// A self-signed certificate lives this long...
const SELF_SIGNED_VALIDITY: Duration = Duration::from_secs(397 * 24 * 3600);
/// ...and is replaced this long before it expires.
const SELF_SIGNED_RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);

/// The names a self-signed certificate for `listen` must carry.
pub fn self_signed_names(listen: SocketAddr) -> Vec<String> {
    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    let ip = listen.ip();
    if !ip.is_unspecified() && !ip.is_loopback() {
        names.push(ip.to_string());
    }
    names
}

/// Makes a self-signed ECDSA P-256 certificate for `names`, valid from `now_ms`.
pub fn generate_self_signed(names: &[String], now_ms: u64) -> Result<SelfSignedCert, TlsError> {
    certify(
        &KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?,
        names,
        now_ms,
    )
}

/// A self-signed certificate for `names` over an existing key: a renewal keeps the key,
/// so the SPKI pin that apps hold stays valid.
fn certify(key: &KeyPair, names: &[String], now_ms: u64) -> Result<SelfSignedCert, TlsError> {
    let mut params = CertificateParams::new(names.to_vec())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "gatehouse self-signed");
    params.distinguished_name = dn;
    let now = time::OffsetDateTime::UNIX_EPOCH + Duration::from_millis(now_ms);
    // Backdated an hour so a client whose clock runs a little behind still accepts it.
    params.not_before = now - Duration::from_secs(3600);
    params.not_after = now + SELF_SIGNED_VALIDITY;
    let cert = params.self_signed(key)?;
    Ok(SelfSignedCert {
        cert_der: cert.der().to_vec(),
        key_der: key.serialize_der(),
        names: names.to_vec(),
        created_at_ms: now_ms,
        not_after_ms: now_ms + SELF_SIGNED_VALIDITY.as_millis() as u64,
    })
}

/// When a self-signed certificate expiring at `not_after_ms` is renewed.
pub(super) fn renew_at_ms(not_after_ms: u64) -> u64 {
    not_after_ms.saturating_sub(SELF_SIGNED_RENEW_BEFORE.as_millis() as u64)
}

fn needs_new(cert: &SelfSignedCert, names: &[String], now_ms: u64) -> bool {
    now_ms >= renew_at_ms(cert.not_after_ms) || names.iter().any(|n| !cert.names.contains(n))
}

fn spki_pin(key_der: &[u8]) -> Result<String, TlsError> {
    let key = KeyPair::try_from(key_der)?;
    let spki = key.subject_public_key_info();
    Ok(data_encoding::BASE64.encode(digest(&SHA256, &spki).as_ref()))
}

/// The SPKI pin (`sha256/<base64>`) of the stored self-signed certificate, for
/// commands that run without the server (a pairing URI must carry it).
pub fn stored_pin(store: &Store) -> Result<Option<String>, TlsError> {
    match store.read(|tx| tx.self_signed_cert())? {
        Some(cert) => Ok(Some(format!("sha256/{}", spki_pin(&cert.key_der)?))),
        None => Ok(None),
    }
}

/// The self-signed certificate for `listen`: the stored one while it is valid and
/// covers the listen address, else a new one, stored (sealed) before it is served.
/// Returns it with its pin (`sha256/<base64>` of the public key).
pub async fn self_signed(
    store: &Store,
    clock: &dyn Clock,
    listen: SocketAddr,
) -> Result<(ServedCert, String), TlsError> {
    let names = self_signed_names(listen);
    let now = clock.now_ms();
    let cert = match store.read(|tx| tx.self_signed_cert())? {
        Some(cert) if !needs_new(&cert, &names, now) => cert,
        previous => {
            // A renewal keeps the key: the pin apps hold stays valid.
            let cert = match previous.and_then(|p| KeyPair::try_from(p.key_der.as_slice()).ok()) {
                Some(key) => {
                    tracing::info!(
                        "renewing the self-signed certificate (expiring, or new names); the \
                         key and its pin stay the same"
                    );
                    certify(&key, &names, now)?
                }
                None => generate_self_signed(&names, now)?,
            };
            let stored = cert.clone();
            store
                .write(move |tx| tx.put_self_signed_cert(&stored))
                .await?;
            cert
        }
    };
    let pin = format!("sha256/{}", spki_pin(&cert.key_der)?);
    let served = ServedCert::new(
        vec![CertificateDer::from(cert.cert_der)],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key_der)),
    )?;
    Ok((served, pin))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn names_cover_listen_address() {
        let names = self_signed_names("192.0.2.7:8443".parse().unwrap());
        assert!(names.contains(&"192.0.2.7".to_string()));
        assert_eq!(self_signed_names("0.0.0.0:8443".parse().unwrap()).len(), 3);
    }

    #[test]
    fn the_pin_is_a_sha256_in_base64() {
        let cert = generate_self_signed(
            &self_signed_names("127.0.0.1:1".parse().unwrap()),
            1_700_000_000_000,
        )
        .unwrap();
        assert_eq!(spki_pin(&cert.key_der).unwrap().len(), 44);
    }

    #[test]
    fn a_renewal_keeps_the_key_and_so_the_pin() {
        let names = self_signed_names("127.0.0.1:1".parse().unwrap());
        let first = generate_self_signed(&names, 0).unwrap();
        let key = KeyPair::try_from(first.key_der.as_slice()).unwrap();
        let renewed = certify(&key, &names, 1_000_000).unwrap();
        assert_ne!(renewed.cert_der, first.cert_der);
        assert_eq!(
            spki_pin(&renewed.key_der).unwrap(),
            spki_pin(&first.key_der).unwrap()
        );
    }

    #[test]
    fn renewal_rules() {
        let names = self_signed_names("127.0.0.1:1".parse().unwrap());
        let cert = generate_self_signed(&names, 0).unwrap();
        assert!(!needs_new(&cert, &names, 1000));
        assert!(needs_new(&cert, &names, cert.not_after_ms - 1000));
        let more = self_signed_names("192.0.2.1:1".parse().unwrap());
        assert!(needs_new(&cert, &more, 1000));
    }
}
