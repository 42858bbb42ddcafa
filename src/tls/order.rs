//! One certificate order with an ACME CA (RFC 8555), step by step, over rustls-acme's
//! protocol primitives (`acme::Account`: the directory, nonces, signed requests).
//!
//! gatehouse takes the steps itself rather than through rustls-acme's order stream, whose
//! challenge lives only in that stream's memory: here each TLS-ALPN-01 challenge is handed
//! back to the caller, which publishes it where every node can answer it before
//! [`Ca::validate`] tells the CA to connect.

use std::sync::Arc;
use std::time::Duration;

use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256};
use ring::signature::KeyPair as _;
use rustls_acme::acme::{
    Account, AuthStatus, ChallengeType, Directory, Identifier, Order, OrderStatus, Problem,
};

use super::challenge::key_authorization_sha256;

/// Waits between looks at an authorization or an order the CA is still working on
/// (about a minute in all); the whole order is bounded by the caller's timeout anyway.
const POLL: [Duration; 7] = [
    Duration::from_millis(250),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
    Duration::from_secs(16),
    Duration::from_secs(32),
];

/// The CA, reached with this node's account.
pub(super) struct Ca {
    account: Account,
    client: Arc<rustls::ClientConfig>,
}

/// An order the CA has opened.
pub(super) struct OpenOrder {
    url: String,
    order: Order,
}

impl OpenOrder {
    /// The authorizations to go through, one per name.
    pub(super) fn authorizations(&self) -> Vec<String> {
        self.order.authorizations.clone()
    }
}

/// A TLS-ALPN-01 challenge the CA waits on.
pub(super) struct Challenge {
    /// The name validated (lowercase): one of the names ordered.
    pub(super) name: String,
    pub(super) key_authorization_sha256: [u8; 32],
    url: String,
    authorization: String,
}

fn problem(problem: Option<&Problem>) -> String {
    match problem {
        Some(Problem {
            detail: Some(detail),
            ..
        }) => format!(": {detail}"),
        Some(Problem {
            typ: Some(typ),
            detail: None,
        }) => format!(": {typ}"),
        _ => String::new(),
    }
}

impl Ca {
    /// Reads the directory and finds (or, without External Account Binding, registers)
    /// the account of `key_pkcs8`.
    pub(super) async fn connect(
        client: &Arc<rustls::ClientConfig>,
        directory: &str,
        contact: &[String],
        key_pkcs8: &[u8],
    ) -> Result<Self, String> {
        let directory = Directory::discover(client, directory)
            .await
            .map_err(|err| format!("cannot read the ACME directory: {err}"))?;
        let account = Account::create_with_keypair(client, directory, contact, key_pkcs8)
            .await
            .map_err(|err| format!("the CA refused the account: {err}"))?;
        Ok(Self {
            account,
            client: client.clone(),
        })
    }

    pub(super) async fn new_order(&self, domains: &[String]) -> Result<OpenOrder, String> {
        let (url, order) = self
            .account
            .new_order(&self.client, domains.to_vec())
            .await
            .map_err(|err| format!("the CA refused the order: {err}"))?;
        Ok(OpenOrder { url, order })
    }

    /// The TLS-ALPN-01 challenge of one authorization; `None` when the CA already holds
    /// the name as validated (an earlier order's authorization is reused).
    pub(super) async fn challenge(
        &self,
        authorization: &str,
        domains: &[String],
    ) -> Result<Option<Challenge>, String> {
        let auth = self
            .account
            .auth(&self.client, authorization)
            .await
            .map_err(|err| format!("cannot read an authorization: {err}"))?;
        let Identifier::Dns(name) = &auth.identifier;
        let name = name.to_ascii_lowercase();
        if !domains.contains(&name) {
            return Err(format!(
                "the CA asked to validate {name:?}, a name that was not ordered"
            ));
        }
        match auth.status {
            AuthStatus::Valid => return Ok(None),
            AuthStatus::Pending => {}
            status => return Err(format!("the authorization for {name} is {status:?}")),
        }
        let Some(challenge) = auth
            .challenges
            .iter()
            .find(|c| c.typ == ChallengeType::TlsAlpn01)
        else {
            return Err(format!(
                "the CA offers no TLS-ALPN-01 challenge for {name}, the only kind gatehouse answers"
            ));
        };
        let key_authorization_sha256 = key_authorization_sha256(
            self.account.key_pair.public_key().as_ref(),
            &challenge.token,
        )?;
        Ok(Some(Challenge {
            name,
            key_authorization_sha256,
            url: challenge.url.clone(),
            authorization: authorization.to_string(),
        }))
    }

    /// Tells the CA the challenge is ready, then waits for its verdict.
    pub(super) async fn validate(&self, challenge: &Challenge) -> Result<(), String> {
        self.account
            .challenge(&self.client, &challenge.url)
            .await
            .map_err(|err| format!("the CA refused to validate {}: {err}", challenge.name))?;
        for wait in POLL {
            tokio::time::sleep(wait).await;
            let auth = self
                .account
                .auth(&self.client, &challenge.authorization)
                .await
                .map_err(|err| format!("cannot read an authorization: {err}"))?;
            match auth.status {
                AuthStatus::Pending => continue,
                AuthStatus::Valid => return Ok(()),
                status => {
                    let why = auth
                        .challenges
                        .iter()
                        .find(|c| c.typ == ChallengeType::TlsAlpn01)
                        .and_then(|c| c.error.as_ref());
                    return Err(format!(
                        "the CA could not validate {} ({status:?}){}",
                        challenge.name,
                        problem(why)
                    ));
                }
            }
        }
        Err(format!(
            "the CA did not validate {} in time",
            challenge.name
        ))
    }

    /// Once every name is validated: sends the request for a certificate over a new key,
    /// waits for it and downloads it. Returns the key (PKCS#8 PEM) then the chain, as the
    /// certificate is stored.
    pub(super) async fn finish(
        &self,
        open: OpenOrder,
        domains: &[String],
    ) -> Result<Vec<u8>, String> {
        let cert_error = |err: rcgen::Error| format!("cannot make the certificate request: {err}");
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(cert_error)?;
        let mut params = CertificateParams::new(domains.to_vec()).map_err(cert_error)?;
        params.distinguished_name = DistinguishedName::new();
        let csr = params.serialize_request(&key).map_err(cert_error)?;
        let read = |err| format!("cannot read the order: {err}");
        let mut order = self
            .account
            .order(&self.client, &open.url)
            .await
            .map_err(read)?;
        let mut waits = POLL.iter();
        loop {
            match &order.status {
                OrderStatus::Ready => {
                    order = self
                        .account
                        .finalize(&self.client, &order.finalize, csr.der())
                        .await
                        .map_err(|err| format!("the CA refused the certificate request: {err}"))?;
                }
                OrderStatus::Pending | OrderStatus::Processing => {
                    let Some(wait) = waits.next() else {
                        return Err("the CA did not issue the certificate in time".into());
                    };
                    tokio::time::sleep(*wait).await;
                    order = self
                        .account
                        .order(&self.client, &open.url)
                        .await
                        .map_err(read)?;
                }
                OrderStatus::Valid { certificate } => {
                    let chain = self
                        .account
                        .certificate(&self.client, certificate)
                        .await
                        .map_err(|err| format!("cannot download the certificate: {err}"))?;
                    let mut pem = pem("PRIVATE KEY", &key.serialize_der());
                    pem.push_str(&chain);
                    return Ok(pem.into_bytes());
                }
                OrderStatus::Invalid => {
                    return Err(format!(
                        "the CA declared the order invalid{}",
                        problem(order.error.as_ref())
                    ));
                }
            }
        }
    }
}

/// One PEM block (RFC 7468): base64 in lines of 64 characters.
fn pem(label: &str, der: &[u8]) -> String {
    let text = data_encoding::BASE64.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in text.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use rustls::pki_types::{PrivateKeyDer, pem::PemObject};

    #[test]
    fn a_pem_key_reads_back() {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let der = key.serialize_der();
        let text = pem("PRIVATE KEY", &der);
        assert!(text.lines().all(|line| line.len() <= 64));
        let back = PrivateKeyDer::from_pem_slice(text.as_bytes()).unwrap();
        assert_eq!(back.secret_der(), der.as_slice());
    }
}
