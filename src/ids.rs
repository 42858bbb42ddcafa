//! Identifiers and one-time secrets: random, typed, parsed once at the edge.
//!
//! Every identifier is 128 random bits written as a short prefix and 32 lowercase hex
//! characters (`dev_0f3a…`), so an id says what it names, and parsing one is a length
//! check and a hex decode with nothing to interpret (no paths, no escapes). Secrets are
//! 256 random bits in base64url, and are stored only as their SHA-256: a secret of that
//! strength needs no slow hash, and a stolen data file yields no usable secret.

use std::fmt;

use ring::digest::{SHA256, digest};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The system random number generator failed (the kernel refused `getrandom`).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the system random number generator failed")]
pub struct RandomError;

/// Fills an array with random bytes from the operating system.
pub(crate) fn random_bytes<const N: usize>() -> Result<[u8; N], RandomError> {
    let mut out = [0u8; N];
    SystemRandom::new()
        .fill(&mut out)
        .map_err(|_| RandomError)?;
    Ok(out)
}

/// Longest name of a credential (admin token, API client), in characters.
pub(crate) const MAX_CREDENTIAL_NAME: usize = 64;

/// A credential's name, trimmed, if it follows the rule: 1 to 64 characters; letters,
/// digits, spaces and `. _ - @ : /` only (no markup, no control characters).
pub(crate) fn credential_name(name: &str) -> Option<String> {
    let name = name.trim();
    let ok_char = |c: char| c.is_alphanumeric() || " ._-@:/".contains(c);
    (!name.is_empty() && name.chars().count() <= MAX_CREDENTIAL_NAME && name.chars().all(ok_char))
        .then(|| name.to_string())
}

/// Compares a presented secret's hash with the stored one in constant time. With no
/// stored hash (unknown id) it compares against a fixed dummy, so that both paths do the
/// same work, and answers false.
pub(crate) fn hash_matches(stored: Option<&[u8; 32]>, presented: &[u8; 32]) -> bool {
    use subtle::ConstantTimeEq;
    const DUMMY: [u8; 32] = [0xA5; 32];
    let equal: bool = stored.unwrap_or(&DUMMY).ct_eq(presented).into();
    equal && stored.is_some()
}

/// SHA-256 of a secret's bytes, as stored.
pub(crate) fn secret_hash(secret: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, secret).as_ref());
    out
}

macro_rules! define_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name([u8; 16]);

        impl $name {
            pub const PREFIX: &'static str = $prefix;
            /// Length of the text form.
            pub const TEXT_LEN: usize = $prefix.len() + 32;

            pub fn generate() -> Result<Self, RandomError> {
                random_bytes().map(Self)
            }

            pub fn from_bytes(bytes: [u8; 16]) -> Self {
                Self(bytes)
            }

            pub fn as_bytes(&self) -> &[u8; 16] {
                &self.0
            }

            /// Parses the text form; `None` for anything else.
            pub fn parse(text: &str) -> Option<Self> {
                if text.len() != Self::TEXT_LEN {
                    return None;
                }
                let hex = text.strip_prefix($prefix)?;
                let mut out = [0u8; 16];
                let n = data_encoding::HEXLOWER
                    .decode_mut(hex.as_bytes(), &mut out)
                    .ok()?;
                (n == 16).then_some(Self(out))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str($prefix)?;
                f.write_str(&data_encoding::HEXLOWER.encode(&self.0))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(self, f)
            }
        }

        impl std::str::FromStr for $name {
            type Err = BadId;
            fn from_str(text: &str) -> Result<Self, BadId> {
                Self::parse(text).ok_or(BadId {
                    kind: stringify!($name),
                    expected: $prefix,
                })
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = std::borrow::Cow::<str>::deserialize(d)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

/// A text that is not a well-formed identifier of the expected kind.
#[derive(Debug, Clone, thiserror::Error)]
#[error("not a valid {kind}: expected {expected} followed by 32 lowercase hex characters")]
pub struct BadId {
    pub(crate) kind: &'static str,
    pub(crate) expected: &'static str,
}

define_id!(
    /// A paired device; the `sub` of its access tokens.
    DeviceId,
    "dev_"
);
define_id!(
    /// A refresh-token family: every refresh token descended from one pairing.
    FamilyId,
    "fam_"
);
define_id!(
    /// A pairing session.
    SessionId,
    "ps_"
);
define_id!(
    /// A device authorization grant (RFC 8628): the first part of its device code.
    DeviceGrantId,
    "dg_"
);
define_id!(
    /// An access token's `jti`.
    TokenId,
    ""
);
define_id!(
    /// A registered API client (introspection callers).
    ClientId,
    "cli_"
);

/// A 256-bit secret in base64url (43 characters), with an optional fixed prefix.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub(crate) const BYTES: usize = 32;
    const B64_LEN: usize = 43;

    pub(crate) fn generate(prefix: &str) -> Result<Self, RandomError> {
        let bytes: [u8; Self::BYTES] = random_bytes()?;
        Ok(Self(format!(
            "{prefix}{}",
            data_encoding::BASE64URL_NOPAD.encode(&bytes)
        )))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub(crate) fn into_string(self) -> String {
        self.0
    }

    /// The stored form of this secret.
    pub(crate) fn hash(&self) -> [u8; 32] {
        secret_hash(self.0.as_bytes())
    }

    /// Whether `presented` has the shape of a secret with `prefix` (no decoding of
    /// anything longer than a secret can be).
    pub fn well_formed(presented: &str, prefix: &str) -> bool {
        presented.len() == prefix.len() + Self::B64_LEN
            && presented.starts_with(prefix)
            && presented[prefix.len()..]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn ids_round_trip_and_reject_other_shapes() {
        let id = DeviceId::generate().unwrap();
        let text = id.to_string();
        assert!(text.starts_with("dev_") && text.len() == 36);
        assert_eq!(DeviceId::parse(&text), Some(id));
        assert_eq!(text.parse::<DeviceId>().unwrap(), id);
        for bad in [
            "",
            "dev_",
            &text[..35],
            &format!("{text}0"),
            &text.to_uppercase(),
            &text.replace("dev_", "fam_"),
            "dev_../../../../etc/passwd00000000000",
            "dev_0000000000000000000000000000000g",
        ] {
            assert_eq!(DeviceId::parse(bad), None, "{bad:?}");
        }
        let jti = TokenId::generate().unwrap();
        assert_eq!(jti.to_string().len(), 32);
        assert_eq!(TokenId::parse(&jti.to_string()), Some(jti));
    }

    #[test]
    fn ids_serialise_as_text() {
        let id = FamilyId::from_bytes([0xab; 16]);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"fam_{}\"", "ab".repeat(16)));
        assert_eq!(serde_json::from_str::<FamilyId>(&json).unwrap(), id);
        assert!(serde_json::from_str::<FamilyId>("\"dev_00\"").is_err());
    }

    #[test]
    fn secrets_are_well_formed_and_hashed() {
        let s = Secret::generate("ghr_").unwrap();
        assert!(Secret::well_formed(s.as_str(), "ghr_"));
        assert!(!Secret::well_formed(s.as_str(), "ghp_"));
        assert!(!Secret::well_formed(&s.as_str()[1..], "ghr_"));
        assert!(!Secret::well_formed(&s.as_str().replace('_', "."), "ghr_"));
        assert_ne!(s.hash(), Secret::generate("ghr_").unwrap().hash());
        assert_eq!(s.hash(), secret_hash(s.as_str().as_bytes()));
    }
}
