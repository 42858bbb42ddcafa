//! DPoP proofs (RFC 9449): a device proves it holds the private key its tokens are
//! bound to, on every request that uses them.
//!
//! A proof is a compact JWS the device signs with its own key, whose public half rides in
//! the header (`jwk`). `Proofs::check` parses it strictly (bounded sizes, canonical
//! base64url, a header of exactly `typ`, `alg`, `jwk`), verifies its signature with ring
//! (EdDSA over Ed25519, or ES256), and checks that it was made for this request: `htm`
//! the method, `htu` the URL without query (one of the URLs the caller names), `iat`
//! within the last `WINDOW` (and at most the token leeway ahead), `ath` the SHA-256 of
//! the access token when one is presented, and a `jti` not seen before within the window
//! (a bounded replay cache in memory). What it gives back is the key's RFC 7638
//! thumbprint (`jkt`), the value a bound token carries as `cnf.jkt`.
//!
//! The replay cache is this process's: with several nodes, a proof replayed to another
//! node within the window is not caught there (docs/cluster.md, HARDENING.md).
//!
//! With nonces on (`tokens.dpop_nonce`), a proof must also carry a `nonce` this server
//! made (RFC 9449 section 8): the current or the previous five-minute period, with an
//! HMAC under a key every node shares (sealed in the store), so any node accepts any
//! node's nonce and none needs to remember one. A proof without a good nonce is refused
//! with `use_dpop_nonce`, and the answer carries a fresh one in `DPoP-Nonce`.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use ring::digest::{SHA256, digest};
use ring::signature::{ECDSA_P256_SHA256_FIXED, ED25519, UnparsedPublicKey};
use serde::Deserialize;

use crate::clock::{SharedClock, millis};
use crate::error_kind::{Classify, ErrorKind};

/// The algorithms a proof may be signed with (`dpop_signing_alg_values_supported`);
/// `Ed25519`, RFC 9864's name for EdDSA over Ed25519, is accepted too.
pub const DPOP_ALGORITHMS: [&str; 2] = ["EdDSA", "ES256"];
/// The `typ` of a proof.
const PROOF_TYP: &str = "dpop+jwt";
/// How old a proof may be (its `iat`), and how long its `jti` is remembered.
pub(crate) const WINDOW: Duration = Duration::from_secs(60);
/// A proof longer than this is refused before it is decoded (an EC key's header is about
/// 300 base64url characters; claims with a long `htu` under 1 KiB).
const MAX_PROOF_BYTES: usize = 4096;
/// Both algorithms sign with 64 bytes: 86 base64url characters.
const SIGNATURE_B64: usize = 86;
/// The longest `jti` remembered.
const MAX_JTI: usize = 256;
/// Proofs remembered at most. When full of proofs still inside the window, new proofs
/// are refused (fail closed) rather than forgetting one that could then be replayed.
const MAX_REMEMBERED: usize = 262_144;

/// Why a proof was refused. The client sees the message; the code is the RFC's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DpopError {
    #[error("invalid DPoP proof: {0}")]
    Malformed(&'static str),
    #[error("invalid DPoP proof: the signature does not verify with the key in its header")]
    Signature,
    #[error("invalid DPoP proof: htm is not this request's method")]
    Method,
    #[error("invalid DPoP proof: htu is not this request's URL")]
    Uri,
    #[error("invalid DPoP proof: iat is more than {} seconds old, or in the future", WINDOW.as_secs())]
    Stale,
    #[error("invalid DPoP proof: this proof (its jti) was already used")]
    Replayed,
    #[error("invalid DPoP proof: ath is not the SHA-256 of the access token presented")]
    AccessTokenHash,
    #[error("invalid DPoP proof: the proof is not signed by the key the token is bound to")]
    WrongKey,
    #[error("more than one DPoP header, or a DPoP header that is not text")]
    Header,
    #[error("too many DPoP proofs in flight; try again in a minute")]
    Busy,
    #[error("this server needs a nonce in DPoP proofs: use the one in the DPoP-Nonce header")]
    UseNonce,
}

impl Classify for DpopError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::Busy => ErrorKind::RateLimited,
            _ => ErrorKind::Invalid,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            Self::Busy => self.kind().code(),
            // RFC 9449 section 12.2 registers these codes.
            Self::UseNonce => "use_dpop_nonce",
            _ => "invalid_dpop_proof",
        }
    }
}

/// A key's RFC 7638 SHA-256 thumbprint, base64url: what `cnf.jkt` holds. Read from a
/// token's claims only if it has that shape.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(transparent)]
pub struct Jkt(String);

impl<'de> Deserialize<'de> for Jkt {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::parse(&text)
            .ok_or_else(|| serde::de::Error::custom("not a SHA-256 thumbprint in base64url"))
    }
}

impl Jkt {
    /// A stored or signed thumbprint, if it has the shape of one (43 base64url characters).
    pub fn parse(text: &str) -> Option<Self> {
        let decoded = data_encoding::BASE64URL_NOPAD
            .decode(text.as_bytes())
            .ok()?;
        (decoded.len() == 32).then(|| Self(text.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What a proof must match: the request's method, the URLs it may name (scheme, host and
/// path), and the access token it comes with, if any.
#[derive(Debug, Clone, Copy)]
pub struct Expected<'a> {
    pub method: &'a str,
    pub uris: &'a [&'a str],
    pub access_token: Option<&'a str>,
}

/// Checks proofs and remembers the ones it accepted.
#[derive(Debug)]
pub struct Proofs {
    clock: SharedClock,
    /// How far ahead of our clock a proof's `iat` may be.
    leeway: Duration,
    seen: Mutex<Seen>,
    /// With nonces on, the key they are made with.
    nonces: Option<NonceKey>,
}

/// The key of DPoP nonces.
struct NonceKey(ring::hmac::Key);

impl std::fmt::Debug for NonceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NonceKey(..)")
    }
}

/// How long one nonce is current; the previous one is still accepted.
const NONCE_PERIOD: Duration = Duration::from_secs(300);

impl Proofs {
    pub(crate) fn new(clock: SharedClock, leeway: Duration, nonce_key: Option<[u8; 32]>) -> Self {
        Self {
            clock,
            leeway,
            seen: Mutex::new(Seen::default()),
            nonces: nonce_key
                .map(|key| NonceKey(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key))),
        }
    }

    /// The nonce to hand out now (`DPoP-Nonce`), when nonces are on.
    pub fn nonce(&self) -> Option<String> {
        let key = self.nonces.as_ref()?;
        Some(nonce_for(key, self.clock.now_ms() / millis(NONCE_PERIOD)))
    }

    /// Whether `nonce` is one this server made in this period or the previous one.
    fn nonce_is_fresh(&self, key: &NonceKey, nonce: &str) -> bool {
        let period = self.clock.now_ms() / millis(NONCE_PERIOD);
        [period, period.saturating_sub(1)].iter().any(|p| {
            let expected = nonce_for(key, *p);
            use subtle::ConstantTimeEq;
            bool::from(expected.as_bytes().ct_eq(nonce.as_bytes()))
        })
    }

    /// Checks `proof` against `expected`; the thumbprint of the key that signed it.
    pub fn check(&self, proof: &str, expected: &Expected<'_>) -> Result<Jkt, DpopError> {
        let parsed = Proof::parse(proof)?;
        parsed.verify_signature()?;
        if parsed.claims.htm != expected.method {
            return Err(DpopError::Method);
        }
        let htu = normalize_uri(&parsed.claims.htu).ok_or(DpopError::Uri)?;
        if !expected
            .uris
            .iter()
            .any(|uri| normalize_uri(uri).as_deref() == Some(htu.as_str()))
        {
            return Err(DpopError::Uri);
        }
        let now_ms = self.clock.now_ms();
        let iat_ms = parsed.claims.iat.saturating_mul(1000);
        if iat_ms.saturating_add(millis(WINDOW)) < now_ms
            || iat_ms > now_ms.saturating_add(millis(self.leeway))
        {
            return Err(DpopError::Stale);
        }
        if let Some(key) = &self.nonces {
            let fresh = parsed
                .claims
                .nonce
                .as_deref()
                .is_some_and(|nonce| self.nonce_is_fresh(key, nonce));
            if !fresh {
                return Err(DpopError::UseNonce);
            }
        }
        match (expected.access_token, &parsed.claims.ath) {
            (Some(token), Some(ath)) if *ath == sha256_b64(token.as_bytes()) => {}
            (Some(_), _) => return Err(DpopError::AccessTokenHash),
            (None, _) => {}
        }
        let jkt = parsed.thumbprint();
        // Remembered until it could no longer pass the `iat` check anyway.
        let forget_at = iat_ms
            .max(now_ms)
            .saturating_add(millis(WINDOW) + millis(self.leeway));
        let key = digest(
            &SHA256,
            format!("{}\n{}", jkt.as_str(), parsed.claims.jti).as_bytes(),
        );
        let mut remembered = [0u8; 32];
        remembered.copy_from_slice(key.as_ref());
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remember(remembered, forget_at, now_ms)?;
        Ok(jkt)
    }
}

/// Parses `proof` and verifies its signature by the key in its header: that key's
/// thumbprint. What the request must match is `Proofs::check`'s; this is the part that
/// reads untrusted bytes, on its own for the fuzz target.
pub fn signed_by(proof: &str) -> Result<Jkt, DpopError> {
    let parsed = Proof::parse(proof)?;
    parsed.verify_signature()?;
    Ok(parsed.thumbprint())
}

/// The proofs accepted within the window: a set, and the order they leave it in.
#[derive(Debug, Default)]
struct Seen {
    until: HashMap<[u8; 32], u64>,
    order: VecDeque<([u8; 32], u64)>,
}

impl Seen {
    fn remember(&mut self, key: [u8; 32], forget_at: u64, now_ms: u64) -> Result<(), DpopError> {
        while let Some((old, at)) = self.order.front().copied() {
            if at > now_ms {
                break;
            }
            self.order.pop_front();
            if self.until.get(&old) == Some(&at) {
                self.until.remove(&old);
            }
        }
        if self.until.get(&key).is_some_and(|at| *at > now_ms) {
            return Err(DpopError::Replayed);
        }
        if self.until.len() >= MAX_REMEMBERED {
            return Err(DpopError::Busy);
        }
        self.until.insert(key, forget_at);
        // Entries leave in the order they were added; a later `forget_at` than the one
        // behind it only keeps an entry a little longer than it needs.
        self.order.push_back((key, forget_at));
        Ok(())
    }
}

/// A URL as a proof's `htu` is compared: scheme and host in lower case, no default port,
/// the path as it is (`/` when empty), no query or fragment. `None` if it is not an
/// absolute http(s) URL.
fn normalize_uri(text: &str) -> Option<String> {
    let text = text.split(['?', '#']).next().unwrap_or_default();
    let uri: http::Uri = text.parse().ok()?;
    let scheme = uri.scheme_str()?.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "https" => 443,
        "http" => 80,
        _ => return None,
    };
    let host = uri.host()?.to_ascii_lowercase();
    let port = uri
        .port_u16()
        .filter(|p| *p != default_port)
        .map(|p| format!(":{p}"))
        .unwrap_or_default();
    let path = match uri.path() {
        "" => "/",
        path => path,
    };
    Some(format!("{scheme}://{host}{port}{path}"))
}

/// The nonce of a period: the period number and the first 16 bytes of its HMAC, base64url.
fn nonce_for(key: &NonceKey, period: u64) -> String {
    let number = period.to_be_bytes();
    let tag = ring::hmac::sign(&key.0, &number);
    let mut bytes = Vec::with_capacity(24);
    bytes.extend_from_slice(&number);
    bytes.extend_from_slice(&tag.as_ref()[..16]);
    data_encoding::BASE64URL_NOPAD.encode(&bytes)
}

fn sha256_b64(bytes: &[u8]) -> String {
    data_encoding::BASE64URL_NOPAD.encode(digest(&SHA256, bytes).as_ref())
}

fn b64(segment: &str) -> Result<Vec<u8>, DpopError> {
    data_encoding::BASE64URL_NOPAD
        .decode(segment.as_bytes())
        .map_err(|_| DpopError::Malformed("not canonical unpadded base64url"))
}

/// The header of a proof: exactly these three parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    typ: String,
    alg: String,
    jwk: serde_json::Map<String, serde_json::Value>,
}

/// The claims a proof must have; others are allowed and ignored (RFC 9449 section 4.2).
#[derive(Debug, Deserialize)]
struct Claims {
    jti: String,
    htm: String,
    htu: String,
    iat: u64,
    ath: Option<String>,
    nonce: Option<String>,
}

/// The proof's public key, by algorithm.
#[derive(Debug)]
enum PublicKey {
    /// `x`, base64url as sent, and its 32 bytes.
    Ed25519(String, Vec<u8>),
    /// `x` and `y`, base64url as sent, and the uncompressed point `04 ‖ x ‖ y`.
    P256(String, String, Vec<u8>),
}

#[derive(Debug)]
struct Proof<'p> {
    key: PublicKey,
    claims: Claims,
    signing_input: &'p str,
    signature: Vec<u8>,
}

/// Members of a JWK that only a private key has.
const PRIVATE_MEMBERS: [&str; 7] = ["d", "p", "q", "dp", "dq", "qi", "k"];

impl<'p> Proof<'p> {
    fn parse(proof: &'p str) -> Result<Self, DpopError> {
        if proof.len() > MAX_PROOF_BYTES {
            return Err(DpopError::Malformed("longer than 4 KiB"));
        }
        let mut parts = proof.split('.');
        let (Some(header_b64), Some(payload_b64), Some(signature_b64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(DpopError::Malformed("not three dot-separated segments"));
        };
        if signature_b64.len() != SIGNATURE_B64 {
            return Err(DpopError::Malformed("a signature of the wrong length"));
        }
        let header: Header = serde_json::from_slice(&b64(header_b64)?)
            .map_err(|_| DpopError::Malformed("the header is not exactly {typ, alg, jwk}"))?;
        if header.typ != PROOF_TYP {
            return Err(DpopError::Malformed("typ is not dpop+jwt"));
        }
        if PRIVATE_MEMBERS.iter().any(|m| header.jwk.contains_key(*m)) {
            return Err(DpopError::Malformed("the jwk holds a private key"));
        }
        let member = |name: &str| header.jwk.get(name).and_then(serde_json::Value::as_str);
        let coordinate = |name: &str| -> Result<(String, Vec<u8>), DpopError> {
            let text = member(name).ok_or(DpopError::Malformed("the jwk lacks a coordinate"))?;
            let bytes = b64(text)?;
            if bytes.len() != 32 {
                return Err(DpopError::Malformed("a jwk coordinate is not 32 bytes"));
            }
            Ok((text.to_string(), bytes))
        };
        let key = match (header.alg.as_str(), member("kty"), member("crv")) {
            // `Ed25519` is the fully specified name of the same algorithm (RFC 9864),
            // which some clients send.
            ("EdDSA" | "Ed25519", Some("OKP"), Some("Ed25519")) => {
                let (x, bytes) = coordinate("x")?;
                PublicKey::Ed25519(x, bytes)
            }
            ("ES256", Some("EC"), Some("P-256")) => {
                let (x, x_bytes) = coordinate("x")?;
                let (y, y_bytes) = coordinate("y")?;
                let mut point = Vec::with_capacity(65);
                point.push(0x04);
                point.extend_from_slice(&x_bytes);
                point.extend_from_slice(&y_bytes);
                PublicKey::P256(x, y, point)
            }
            ("EdDSA" | "Ed25519" | "ES256", _, _) => {
                return Err(DpopError::Malformed("the jwk does not fit alg"));
            }
            _ => return Err(DpopError::Malformed("alg is not EdDSA (Ed25519) or ES256")),
        };
        let claims: Claims = serde_json::from_slice(&b64(payload_b64)?)
            .map_err(|_| DpopError::Malformed("claims lack jti, htm, htu or iat"))?;
        if claims.jti.is_empty() || claims.jti.len() > MAX_JTI {
            return Err(DpopError::Malformed(
                "jti is empty or longer than 256 bytes",
            ));
        }
        Ok(Self {
            key,
            claims,
            signing_input: &proof[..header_b64.len() + 1 + payload_b64.len()],
            signature: b64(signature_b64)?,
        })
    }

    fn verify_signature(&self) -> Result<(), DpopError> {
        let message = self.signing_input.as_bytes();
        let verified = match &self.key {
            PublicKey::Ed25519(_, x) => {
                UnparsedPublicKey::new(&ED25519, x).verify(message, &self.signature)
            }
            PublicKey::P256(_, _, point) => UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point)
                .verify(message, &self.signature),
        };
        verified.map_err(|_| DpopError::Signature)
    }

    /// RFC 7638: SHA-256 over the key's required members, in lexicographic order.
    fn thumbprint(&self) -> Jkt {
        let canonical = match &self.key {
            PublicKey::Ed25519(x, _) => format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}"#),
            PublicKey::P256(x, y, _) => {
                format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#)
            }
        };
        Jkt(sha256_b64(canonical.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_compare_without_case_default_ports_or_queries() {
        for (a, b) in [
            (
                "https://Gate.Example/v1/token",
                "https://gate.example:443/v1/token",
            ),
            (
                "HTTPS://gate.example/v1/token?x=1",
                "https://gate.example/v1/token",
            ),
            ("http://127.0.0.1:80/x#f", "http://127.0.0.1/x"),
            ("https://gate.example", "https://gate.example/"),
        ] {
            assert_eq!(normalize_uri(a), normalize_uri(b), "{a} {b}");
            assert!(normalize_uri(a).is_some());
        }
        for (a, b) in [
            (
                "https://gate.example/v1/token",
                "http://gate.example/v1/token",
            ),
            (
                "https://gate.example/v1/Token",
                "https://gate.example/v1/token",
            ),
            ("https://gate.example:8443/x", "https://gate.example/x"),
        ] {
            assert_ne!(normalize_uri(a), normalize_uri(b), "{a} {b}");
        }
        for bad in ["/v1/token", "ftp://gate.example/", "not a url", ""] {
            assert_eq!(normalize_uri(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_remembered_proof_is_refused_until_it_leaves_the_window() {
        let mut seen = Seen::default();
        let key = [7u8; 32];
        assert_eq!(seen.remember(key, 1_000, 0), Ok(()));
        assert_eq!(seen.remember(key, 1_500, 999), Err(DpopError::Replayed));
        assert_eq!(seen.remember([8u8; 32], 2_000, 999), Ok(()));
        // Past its time it is forgotten (and could no longer pass the iat check).
        assert_eq!(seen.remember(key, 3_000, 1_000), Ok(()));
        assert_eq!(seen.until.len(), 2);
    }
}
