//! External Account Binding (RFC 8555 section 7.3.4): CAs such as ZeroSSL, Google Trust
//! Services or a company's own ACME CA accept a new account only when it is bound to an
//! account they already know, by a key id and an HMAC key they hand out.
//!
//! rustls-acme has no EAB, so gatehouse registers the account itself, once per
//! directory: it makes the account key, sends `newAccount` with the binding, and keeps the
//! key (sealed, like any account key). rustls-acme then finds that key and its own
//! `newAccount` gets the existing account back, which RFC 8555 section 7.3.1 requires of
//! every CA ("the server MUST return ... the URL of that account"), binding or not.

use std::sync::Arc;

use data_encoding::BASE64URL_NOPAD;
use futures_util::AsyncReadExt;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use rustls_acme::acme::{Account, Directory};

/// The binding a CA handed out. The MAC key never appears in `Debug` output.
#[derive(Clone)]
pub(crate) struct EabCredentials {
    pub(crate) kid: String,
    pub(crate) hmac_key: Vec<u8>,
}

impl std::fmt::Debug for EabCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EabCredentials")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl EabCredentials {
    /// `key_text` as CAs give it: base64url (padding and surrounding space allowed).
    pub(crate) fn new(kid: &str, key_text: &str) -> Result<Self, String> {
        let cleaned: String = key_text
            .trim()
            .trim_end_matches('=')
            .chars()
            .map(|c| match c {
                '+' => '-',
                '/' => '_',
                c => c,
            })
            .collect();
        let hmac_key = BASE64URL_NOPAD
            .decode(cleaned.as_bytes())
            .map_err(|_| "the EAB key is not base64url text".to_string())?;
        if hmac_key.len() < 16 {
            return Err("the EAB key is shorter than 16 bytes".into());
        }
        if kid.is_empty() || kid.len() > 256 || kid.chars().any(char::is_control) {
            return Err("the EAB key id must be 1 to 256 printable characters".into());
        }
        Ok(Self {
            kid: kid.to_string(),
            hmac_key,
        })
    }
}

fn b64(bytes: &[u8]) -> String {
    BASE64URL_NOPAD.encode(bytes)
}

/// The account key's JWK (EC P-256), members in the order RFC 7638 sorts them.
fn jwk(key: &EcdsaKeyPair) -> serde_json::Value {
    let public = key.public_key().as_ref();
    // Uncompressed point: 0x04 ‖ x ‖ y.
    let (x, y) = public[1..].split_at(32);
    serde_json::json!({"crv": "P-256", "kty": "EC", "x": b64(x), "y": b64(y)})
}

/// The `newAccount` request body: an ES256 JWS by the account key whose payload carries
/// the HS256 binding JWS over that key.
fn new_account_body(
    key: &EcdsaKeyPair,
    eab: &EabCredentials,
    url: &str,
    nonce: &str,
    contact: &[String],
) -> Result<String, String> {
    let jwk = jwk(key);
    let binding_protected = b64(
        serde_json::json!({"alg": "HS256", "kid": eab.kid, "url": url})
            .to_string()
            .as_bytes(),
    );
    let binding_payload = b64(jwk.to_string().as_bytes());
    let mac_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &eab.hmac_key);
    let binding_signature = b64(ring::hmac::sign(
        &mac_key,
        format!("{binding_protected}.{binding_payload}").as_bytes(),
    )
    .as_ref());
    let payload = serde_json::json!({
        "termsOfServiceAgreed": true,
        "contact": contact,
        "externalAccountBinding": {
            "protected": binding_protected,
            "payload": binding_payload,
            "signature": binding_signature,
        },
    });
    let protected = b64(
        serde_json::json!({"alg": "ES256", "jwk": jwk, "nonce": nonce, "url": url})
            .to_string()
            .as_bytes(),
    );
    let payload = b64(payload.to_string().as_bytes());
    let signature = key
        .sign(
            &SystemRandom::new(),
            format!("{protected}.{payload}").as_bytes(),
        )
        .map_err(|_| "cannot sign with the account key".to_string())?;
    Ok(serde_json::json!({
        "protected": protected,
        "payload": payload,
        "signature": b64(signature.as_ref()),
    })
    .to_string())
}

/// Registers a new account at `directory` bound to `eab`; returns its key (PKCS#8).
pub(crate) async fn register(
    client: &Arc<rustls::ClientConfig>,
    directory: &str,
    contact: &[String],
    eab: &EabCredentials,
) -> Result<Vec<u8>, String> {
    let directory = Directory::discover(client, directory)
        .await
        .map_err(|e| format!("cannot read the ACME directory: {e}"))?;
    let pkcs8 = Account::generate_key_pair();
    let key = EcdsaKeyPair::from_pkcs8(
        &ECDSA_P256_SHA256_FIXED_SIGNING,
        &pkcs8,
        &SystemRandom::new(),
    )
    .map_err(|_| "cannot load the new account key".to_string())?;
    let nonce = directory
        .nonce(client)
        .await
        .map_err(|e| format!("cannot get a nonce: {e}"))?;
    let body = new_account_body(&key, eab, &directory.new_account, &nonce, contact)?;
    let request = http::Request::builder()
        .method(http::Method::POST)
        .uri(&directory.new_account)
        .header(http::header::CONTENT_TYPE, "application/jose+json")
        .header(
            http::header::USER_AGENT,
            concat!("gatehouse/", env!("CARGO_PKG_VERSION")),
        )
        .body(body)
        .map_err(|e| e.to_string())?;
    use async_web_client::RequestWithBodyExt;
    let mut response = request
        .send_with_client_config(client.clone())
        .await
        .map_err(|e| format!("newAccount with the external account binding: {e}"))?;
    let mut text = String::new();
    // A problem document is a few hundred bytes; more is not read.
    let _ = response
        .body_mut()
        .take(16 * 1024)
        .read_to_string(&mut text)
        .await;
    let status = response.status();
    if !status.is_success() {
        return Err(format!(
            "the CA refused the account with its external binding ({status}): {}",
            text.trim()
        ));
    }
    Ok(pkcs8)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn keys_are_read_as_base64url_and_checked() {
        let key = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W";
        assert_eq!(
            EabCredentials::new("kid-1", key).unwrap().hmac_key.len(),
            48
        );
        assert!(EabCredentials::new("kid-1", &format!(" {key}\n")).is_ok());
        assert!(
            EabCredentials::new("kid-1", "c2hvcnQ").is_err(),
            "too short"
        );
        assert!(EabCredentials::new("kid-1", "not base64 !").is_err());
        assert!(EabCredentials::new("", key).is_err());
        let debug = format!("{:?}", EabCredentials::new("kid-1", key).unwrap());
        assert!(
            !debug.contains("hmac") && debug.contains("kid-1"),
            "{debug}"
        );
    }

    #[test]
    fn the_binding_signs_the_account_key_with_the_mac_key() {
        let pkcs8 = Account::generate_key_pair();
        let key = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            &pkcs8,
            &SystemRandom::new(),
        )
        .unwrap();
        let eab = EabCredentials::new("kid-1", &b64(&[7u8; 32])).unwrap();
        let body = new_account_body(&key, &eab, "https://ca.test/new-acct", "n0nce", &[]).unwrap();
        let outer: serde_json::Value = serde_json::from_str(&body).unwrap();
        let payload: serde_json::Value = serde_json::from_slice(
            &BASE64URL_NOPAD
                .decode(outer["payload"].as_str().unwrap().as_bytes())
                .unwrap(),
        )
        .unwrap();
        let binding = &payload["externalAccountBinding"];
        let signed = format!(
            "{}.{}",
            binding["protected"].as_str().unwrap(),
            binding["payload"].as_str().unwrap()
        );
        let tag = BASE64URL_NOPAD
            .decode(binding["signature"].as_str().unwrap().as_bytes())
            .unwrap();
        let mac_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &[7u8; 32]);
        ring::hmac::verify(&mac_key, signed.as_bytes(), &tag).unwrap();
        let bound_jwk: serde_json::Value = serde_json::from_slice(
            &BASE64URL_NOPAD
                .decode(binding["payload"].as_str().unwrap().as_bytes())
                .unwrap(),
        )
        .unwrap();
        assert_eq!(bound_jwk, jwk(&key));
        // The outer JWS verifies under the account key.
        let signed = format!(
            "{}.{}",
            outer["protected"].as_str().unwrap(),
            outer["payload"].as_str().unwrap()
        );
        let signature = BASE64URL_NOPAD
            .decode(outer["signature"].as_str().unwrap().as_bytes())
            .unwrap();
        ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P256_SHA256_FIXED,
            key.public_key().as_ref(),
        )
        .verify(signed.as_bytes(), &signature)
        .unwrap();
    }
}
