//! Versioned records stored in the data file, encoded with postcard.
//!
//! Every stored value is an enum whose variants are the record's versions. Variants are
//! only ever appended (postcard encodes the variant index), never reordered or removed
//! while a released format may hold them. Only this module knows the old versions: it
//! decodes any of them and upgrades to the current struct, which is what the rest of the
//! crate sees.

use serde::{Deserialize, Serialize};

/// Why a stored value could not be decoded.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(String);

/// Encodes any record with postcard (used by migrations and by fixture builders).
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Invariant: postcard serialisation into a Vec fails only for types serde cannot
    // represent (e.g. maps with non-string keys in some formats); our records have none.
    #[allow(clippy::expect_used)]
    postcard::to_stdvec(value).expect("records are always serialisable")
}

/// Decodes one whole record; trailing bytes are an error.
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, DecodeError> {
    let (value, rest) =
        postcard::take_from_bytes(bytes).map_err(|err| DecodeError(err.to_string()))?;
    if !rest.is_empty() {
        return Err(DecodeError(format!("{} trailing bytes", rest.len())));
    }
    Ok(value)
}

// ---------------------------------------------------------------------------------------
// Admin tokens (`admin_tokens.v1`)

/// An admin token as the rest of the crate sees it (current version: 2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminToken {
    pub name: String,
    /// SHA-256 of the token's secret part; the secret itself is never stored.
    pub secret_hash: [u8; 32],
    pub created_at_ms: u64,
    pub last_used_at_ms: Option<u64>,
    /// Revoked tokens are kept so that `admin-token list` and the audit trail can name them.
    pub revoked_at_ms: Option<u64>,
}

/// Format 1 stored no use or revocation times (revocation deleted the row).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminTokenV1 {
    pub name: String,
    pub secret_hash: [u8; 32],
    pub created_at_ms: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum AdminTokenRecord {
    V1(AdminTokenV1),
    V2(AdminToken),
}

impl AdminTokenRecord {
    pub fn into_current(self) -> AdminToken {
        match self {
            Self::V1(v1) => AdminToken {
                name: v1.name,
                secret_hash: v1.secret_hash,
                created_at_ms: v1.created_at_ms,
                last_used_at_ms: None,
                revoked_at_ms: None,
            },
            Self::V2(current) => current,
        }
    }
}

pub(crate) fn encode_admin_token(token: &AdminToken) -> Vec<u8> {
    // Serialise the current variant without cloning the struct.
    #[derive(Serialize)]
    enum Borrowed<'a> {
        #[allow(dead_code)]
        V1(()),
        V2(&'a AdminToken),
    }
    encode(&Borrowed::V2(token))
}

pub(crate) fn decode_admin_token(bytes: &[u8]) -> Result<AdminToken, DecodeError> {
    decode::<AdminTokenRecord>(bytes).map(AdminTokenRecord::into_current)
}

// ---------------------------------------------------------------------------------------
// Sealed secrets (`secrets.v1`): the plaintext inside each seal is one of these.

/// The self-signed certificate served when no domain is configured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelfSignedCert {
    pub cert_der: Vec<u8>,
    /// PKCS#8 DER of the certificate's private key.
    pub key_der: Vec<u8>,
    /// The DNS names and IP addresses in the certificate, as text.
    pub names: Vec<String>,
    pub created_at_ms: u64,
    pub not_after_ms: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum SelfSignedCertRecord {
    V1(SelfSignedCert),
}

pub(crate) fn encode_self_signed(cert: &SelfSignedCert) -> Vec<u8> {
    #[derive(Serialize)]
    enum Borrowed<'a> {
        V1(&'a SelfSignedCert),
    }
    encode(&Borrowed::V1(cert))
}

pub(crate) fn decode_self_signed(bytes: &[u8]) -> Result<SelfSignedCert, DecodeError> {
    decode::<SelfSignedCertRecord>(bytes).map(|SelfSignedCertRecord::V1(c)| c)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn admin_token_round_trip(name in ".{0,80}", hash in any::<[u8; 32]>(), created in any::<u64>(),
                                  used in any::<Option<u64>>(), revoked in any::<Option<u64>>()) {
            let token = AdminToken { name, secret_hash: hash, created_at_ms: created,
                                     last_used_at_ms: used, revoked_at_ms: revoked };
            prop_assert_eq!(decode_admin_token(&encode_admin_token(&token)).unwrap(), token);
        }

        #[test]
        fn self_signed_round_trip(cert in proptest::collection::vec(any::<u8>(), 0..300),
                                  key in proptest::collection::vec(any::<u8>(), 0..100),
                                  names in proptest::collection::vec(".{0,20}", 0..4),
                                  created in any::<u64>(), after in any::<u64>()) {
            let c = SelfSignedCert { cert_der: cert, key_der: key, names,
                                     created_at_ms: created, not_after_ms: after };
            prop_assert_eq!(decode_self_signed(&encode_self_signed(&c)).unwrap(), c);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_admin_token(&bytes);
            let _ = decode_self_signed(&bytes);
        }
    }

    #[test]
    fn v1_admin_token_upgrades() {
        let v1 = AdminTokenV1 {
            name: "ops".into(),
            secret_hash: [7; 32],
            created_at_ms: 5,
        };
        let bytes = encode(&AdminTokenRecord::V1(v1));
        let current = decode_admin_token(&bytes).unwrap();
        assert_eq!(current.name, "ops");
        assert_eq!(current.revoked_at_ms, None);
    }

    #[test]
    fn borrowed_encoding_matches_owned_enum() {
        let token = AdminToken {
            name: "a".into(),
            secret_hash: [1; 32],
            created_at_ms: 1,
            last_used_at_ms: None,
            revoked_at_ms: Some(3),
        };
        assert_eq!(
            encode_admin_token(&token),
            encode(&AdminTokenRecord::V2(token.clone()))
        );
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let token = AdminToken {
            name: "a".into(),
            secret_hash: [1; 32],
            created_at_ms: 1,
            last_used_at_ms: None,
            revoked_at_ms: None,
        };
        let mut bytes = encode_admin_token(&token);
        bytes.push(0);
        assert!(decode_admin_token(&bytes).is_err());
    }
}
