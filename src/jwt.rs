//! JSON Web Tokens on the wire: the ring-backed `CryptoProvider` for jsonwebtoken, and the
//! strict parser every presented access token goes through before any signature work.
//!
//! jsonwebtoken 11 does no cryptography itself; `RING_PROVIDER` gives it ring for EdDSA
//! (Ed25519), ES256 and HS256 and refuses every other algorithm, so no second crypto
//! library enters the process. It is called directly (`verify_signature`), never through
//! jsonwebtoken's process-wide default, so there is nothing to install and no panic when
//! nothing was.
//!
//! The
//! rest of RFC 8725 is done here, not by `jsonwebtoken::decode`, on purpose: `decode`
//! reads the system clock for `exp`/`nbf` (ours is injected), ignores header parameters it
//! does not know (`crit` must never be ignored), accepts arrays for `iss`, and parses each
//! part twice. `parse` bounds sizes before decoding, accepts exactly three segments of
//! canonical base64url, a header of exactly `alg`, `typ` and `kid`, and a payload of
//! exactly our claims, with duplicate JSON keys refused in both.

use std::fmt;

use jsonwebtoken::crypto::{CryptoProvider, JwtSigner, JwtVerifier, KeyUtils};
use jsonwebtoken::errors::{ErrorKind, Result as JwtResult};
use jsonwebtoken::jwk::{EllipticCurve, ThumbprintHash};
use jsonwebtoken::signature::{Error as SignatureError, Signer, Verifier};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, EncodingKey};
use ring::rand::SystemRandom;
use ring::signature::{self as sig, KeyPair as _};
use serde::{Deserialize, Serialize};

use crate::dpop::Jkt;
use crate::ids::{DeviceId, FamilyId, TokenId};

/// The longest token accepted anywhere; longer input is refused before it is decoded.
pub(crate) const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Our header is about 120 base64url characters; this leaves room and bounds the work.
const MAX_HEADER_B64: usize = 512;
/// Our claims are about 400 base64url characters.
const MAX_PAYLOAD_B64: usize = 2048;
/// Ed25519 and ES256 (r ‖ s) signatures are both 64 bytes: 86 base64url characters.
const SIGNATURE_B64: usize = 86;

/// The `typ` of our access tokens (RFC 9068).
pub const ACCESS_TOKEN_TYP: &str = "at+jwt";

// ---------------------------------------------------------------------------------------
// The provider

/// jsonwebtoken's cryptography, backed by ring: EdDSA, ES256 and HS256 only.
pub(crate) static RING_PROVIDER: CryptoProvider = CryptoProvider {
    signer_factory: new_signer,
    verifier_factory: new_verifier,
    key_utils: KeyUtils {
        rsa_pub_components_from_private_key: |_| Err(ErrorKind::UnsupportedAlgorithm.into()),
        rsa_pub_components_from_public_key: |_| Err(ErrorKind::UnsupportedAlgorithm.into()),
        ec_pub_components_from_private_key: ec_components_from_private_key,
        ed_pub_components_from_private_key: ed_component_from_private_key,
        compute_digest,
    },
};

/// Checks a JWS signature (base64url) over `message` with `key` and `algorithm`, through
/// `RING_PROVIDER` itself. jsonwebtoken's own `crypto::verify` looks up a process-wide
/// provider and panics when none was installed; going to ours directly leaves no such
/// state to forget.
pub(crate) fn verify_signature(
    signature: &str,
    message: &[u8],
    key: &DecodingKey,
    algorithm: Algorithm,
) -> bool {
    let Ok(signature) = data_encoding::BASE64URL_NOPAD.decode(signature.as_bytes()) else {
        return false;
    };
    (RING_PROVIDER.verifier_factory)(&algorithm, key)
        .is_ok_and(|verifier| verifier.verify(message, &signature).is_ok())
}

enum RingSigner {
    Ed25519(sig::Ed25519KeyPair),
    Es256(sig::EcdsaKeyPair),
    Hs256(ring::hmac::Key),
}

impl Signer<Vec<u8>> for RingSigner {
    fn try_sign(&self, msg: &[u8]) -> Result<Vec<u8>, SignatureError> {
        match self {
            Self::Ed25519(pair) => Ok(pair.sign(msg).as_ref().to_vec()),
            Self::Es256(pair) => pair
                .sign(&SystemRandom::new(), msg)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| SignatureError::new()),
            Self::Hs256(key) => Ok(ring::hmac::sign(key, msg).as_ref().to_vec()),
        }
    }
}

impl JwtSigner for RingSigner {
    fn algorithm(&self) -> Algorithm {
        match self {
            Self::Ed25519(_) => Algorithm::EdDSA,
            Self::Es256(_) => Algorithm::ES256,
            Self::Hs256(_) => Algorithm::HS256,
        }
    }
}

fn new_signer(alg: &Algorithm, key: &EncodingKey) -> JwtResult<Box<dyn JwtSigner>> {
    let signer = match (alg, key.family()) {
        (Algorithm::EdDSA, AlgorithmFamily::Ed) => RingSigner::Ed25519(
            sig::Ed25519KeyPair::from_pkcs8_maybe_unchecked(key.as_bytes())
                .map_err(|_| ErrorKind::InvalidEddsaKey)?,
        ),
        (Algorithm::ES256, AlgorithmFamily::Ec) => RingSigner::Es256(
            sig::EcdsaKeyPair::from_pkcs8(
                &sig::ECDSA_P256_SHA256_FIXED_SIGNING,
                key.as_bytes(),
                &SystemRandom::new(),
            )
            .map_err(|_| ErrorKind::InvalidEcdsaKey)?,
        ),
        (Algorithm::HS256, AlgorithmFamily::Hmac) => RingSigner::Hs256(ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            key.as_bytes(),
        )),
        (Algorithm::EdDSA | Algorithm::ES256 | Algorithm::HS256, _) => {
            return Err(ErrorKind::InvalidKeyFormat.into());
        }
        _ => return Err(ErrorKind::UnsupportedAlgorithm.into()),
    };
    Ok(Box::new(signer))
}

struct RingVerifier {
    alg: Algorithm,
    key: Vec<u8>,
}

impl Verifier<Vec<u8>> for RingVerifier {
    fn verify(&self, msg: &[u8], signature: &Vec<u8>) -> Result<(), SignatureError> {
        let ok = match self.alg {
            Algorithm::EdDSA => sig::UnparsedPublicKey::new(&sig::ED25519, &self.key)
                .verify(msg, signature)
                .is_ok(),
            Algorithm::ES256 => {
                sig::UnparsedPublicKey::new(&sig::ECDSA_P256_SHA256_FIXED, &self.key)
                    .verify(msg, signature)
                    .is_ok()
            }
            Algorithm::HS256 => ring::hmac::verify(
                &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.key),
                msg,
                signature,
            )
            .is_ok(),
            _ => false,
        };
        if ok {
            Ok(())
        } else {
            Err(SignatureError::new())
        }
    }
}

impl JwtVerifier for RingVerifier {
    fn algorithm(&self) -> Algorithm {
        self.alg
    }
}

fn new_verifier(alg: &Algorithm, key: &DecodingKey) -> JwtResult<Box<dyn JwtVerifier>> {
    // The key's family must match the algorithm: an HS256 token can never be checked
    // against a public key used as an HMAC secret (the classic confusion attack).
    let expected = match alg {
        Algorithm::EdDSA => AlgorithmFamily::Ed,
        Algorithm::ES256 => AlgorithmFamily::Ec,
        Algorithm::HS256 => AlgorithmFamily::Hmac,
        _ => return Err(ErrorKind::UnsupportedAlgorithm.into()),
    };
    if key.family() != expected {
        return Err(ErrorKind::InvalidAlgorithm.into());
    }
    Ok(Box::new(RingVerifier {
        alg: *alg,
        key: key.try_get_as_bytes()?.to_vec(),
    }))
}

fn ec_components_from_private_key(
    pkcs8: &[u8],
    alg: Algorithm,
) -> JwtResult<(EllipticCurve, Vec<u8>, Vec<u8>)> {
    if alg != Algorithm::ES256 {
        return Err(ErrorKind::UnsupportedAlgorithm.into());
    }
    let pair = sig::EcdsaKeyPair::from_pkcs8(
        &sig::ECDSA_P256_SHA256_FIXED_SIGNING,
        pkcs8,
        &SystemRandom::new(),
    )
    .map_err(|_| ErrorKind::InvalidEcdsaKey)?;
    let point = pair.public_key().as_ref();
    let (x, y) = point
        .get(1..)
        .filter(|xy| xy.len() == 64)
        .map(|xy| xy.split_at(32))
        .ok_or(ErrorKind::InvalidEcdsaKey)?;
    Ok((EllipticCurve::P256, x.to_vec(), y.to_vec()))
}

fn ed_component_from_private_key(pkcs8: &[u8], curve: &EllipticCurve) -> JwtResult<Vec<u8>> {
    if *curve != EllipticCurve::Ed25519 {
        return Err(ErrorKind::UnsupportedAlgorithm.into());
    }
    let pair = sig::Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8)
        .map_err(|_| ErrorKind::InvalidEddsaKey)?;
    Ok(pair.public_key().as_ref().to_vec())
}

fn compute_digest(data: &[u8], hash: ThumbprintHash) -> JwtResult<Vec<u8>> {
    let algorithm = match hash {
        ThumbprintHash::SHA256 => &ring::digest::SHA256,
        ThumbprintHash::SHA384 => &ring::digest::SHA384,
        ThumbprintHash::SHA512 => &ring::digest::SHA512,
        _ => return Err(ErrorKind::UnsupportedAlgorithm.into()),
    };
    Ok(ring::digest::digest(algorithm, data).as_ref().to_vec())
}

// ---------------------------------------------------------------------------------------
// The wire format

/// The JOSE header of our access tokens: these three parameters and nothing else.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    pub alg: String,
    pub typ: String,
    pub kid: String,
}

/// The claims of our access tokens: exactly these (RFC 9068 profile, plus `sid`, the
/// refresh-token family, so that revoking a family reaches its access tokens).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessClaims {
    pub iss: String,
    pub aud: String,
    pub sub: DeviceId,
    pub exp: u64,
    pub nbf: u64,
    pub iat: u64,
    pub jti: TokenId,
    pub sid: FamilyId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// The key the token is bound to (DPoP, RFC 9449 section 6): only a request with a
    /// proof signed by it may use the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cnf: Option<Confirmation>,
    /// Where the token's revocation bit is published (draft-ietf-oauth-status-list):
    /// absent from tokens issued before status lists were.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<TokenStatus>,
}

/// The `status` claim: the token's place in a status list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenStatus {
    pub status_list: StatusListRef,
}

/// `status_list` inside `status`: the bit's index and the list's URI.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusListRef {
    pub idx: u64,
    pub uri: String,
}

/// RFC 7800's confirmation claim, as DPoP uses it: the bound key's thumbprint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Confirmation {
    pub jkt: Jkt,
}

/// The `typ` of the assertions the front door adds to requests for an app
/// (`upstream.assertion`): never an access token, nor taken for one.
pub const ASSERTION_TYP: &str = "gatehouse-assertion+jwt";

/// The claims of a front-door assertion: who passed (`sub`: a device id,
/// `admin:<id>`, or none on a public route), for which app (`aud`: the upstream as
/// configured), which request (`htm`, `htu`: its method and path with query, `jti`: its
/// request id), valid for a few seconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssertionClaims {
    pub iss: String,
    pub aud: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    pub iat: u64,
    pub exp: u64,
    pub jti: String,
    pub htm: String,
    pub htu: String,
}

/// Why a presented token was refused before or at parsing. Never shown to a client
/// (which sees one "invalid token"); logged at debug and counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    TooLong,
    Segments,
    Base64,
    HeaderTooLong,
    PayloadTooLong,
    SignatureLength,
    Header,
    Claims,
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::TooLong => "longer than 8 KiB",
            Self::Segments => "not three non-empty dot-separated segments",
            Self::Base64 => "not canonical unpadded base64url",
            Self::HeaderTooLong => "header too long",
            Self::PayloadTooLong => "payload too long",
            Self::SignatureLength => "signature of the wrong length",
            Self::Header => {
                "header is not exactly {alg, typ, kid} (unknown, missing or duplicate parameter)"
            }
            Self::Claims => {
                "claims are not exactly ours (unknown, missing, mistyped or duplicate claim)"
            }
        })
    }
}

/// A token split and decoded, signature not yet checked.
#[derive(Debug)]
pub struct Parsed<'t> {
    pub header: Header,
    pub claims: AccessClaims,
    /// `header.payload`, the bytes the signature covers.
    pub signing_input: &'t str,
    /// The third segment, still base64url.
    pub signature: &'t str,
}

fn b64(segment: &str) -> Result<Vec<u8>, Malformed> {
    data_encoding::BASE64URL_NOPAD
        .decode(segment.as_bytes())
        .map_err(|_| Malformed::Base64)
}

/// Splits and decodes a compact JWS, bounding every size first.
pub fn parse(token: &str) -> Result<Parsed<'_>, Malformed> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(Malformed::TooLong);
    }
    let mut parts = token.split('.');
    let (Some(header_b64), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Malformed::Segments);
    };
    if header_b64.is_empty() || payload.is_empty() || signature.is_empty() {
        return Err(Malformed::Segments);
    }
    if header_b64.len() > MAX_HEADER_B64 {
        return Err(Malformed::HeaderTooLong);
    }
    if payload.len() > MAX_PAYLOAD_B64 {
        return Err(Malformed::PayloadTooLong);
    }
    if signature.len() != SIGNATURE_B64 {
        return Err(Malformed::SignatureLength);
    }
    // Decoded (and thereby checked canonical) before use; never handed on raw.
    let _ = b64(signature)?;
    let header: Header =
        serde_json::from_slice(&b64(header_b64)?).map_err(|_| Malformed::Header)?;
    let claims: AccessClaims =
        serde_json::from_slice(&b64(payload)?).map_err(|_| Malformed::Claims)?;
    let signing_input = &token[..header_b64.len() + 1 + payload.len()];
    Ok(Parsed {
        header,
        claims,
        signing_input,
        signature,
    })
}

/// The base64url header of access tokens signed by one key, computed once per key.
pub fn encoded_header(alg: &str, kid: &str) -> String {
    encoded_header_of(alg, kid, ACCESS_TOKEN_TYP)
}

/// The base64url header of JWSs of type `typ` signed by one key.
pub fn encoded_header_of(alg: &str, kid: &str, typ: &str) -> String {
    let header = Header {
        alg: alg.to_string(),
        typ: typ.to_string(),
        kid: kid.to_string(),
    };
    // Serialising three strings cannot fail.
    let json = serde_json::to_vec(&header).unwrap_or_default();
    data_encoding::BASE64URL_NOPAD.encode(&json)
}

/// `header.payload` for `claims` under a pre-encoded header; the caller signs it.
pub fn signing_input(encoded_header: &str, claims: &impl Serialize) -> String {
    let json = serde_json::to_vec(claims).unwrap_or_default();
    let mut out = String::with_capacity(encoded_header.len() + 1 + json.len() * 4 / 3 + 4);
    out.push_str(encoded_header);
    out.push('.');
    data_encoding::BASE64URL_NOPAD.encode_append(&json, &mut out);
    out
}

/// Appends the signature to a signing input: the finished compact token.
pub fn finish(mut signing_input: String, signature: &[u8]) -> String {
    signing_input.push('.');
    data_encoding::BASE64URL_NOPAD.encode_append(signature, &mut signing_input);
    signing_input
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn claims() -> AccessClaims {
        AccessClaims {
            iss: "https://a".into(),
            aud: "https://a".into(),
            sub: DeviceId::from_bytes([1; 16]),
            exp: 20,
            nbf: 10,
            iat: 10,
            jti: TokenId::from_bytes([2; 16]),
            sid: FamilyId::from_bytes([3; 16]),
            scope: None,
            cnf: None,
            status: None,
        }
    }

    fn token_with(header: &str, payload: &str) -> String {
        format!(
            "{}.{}.{}",
            data_encoding::BASE64URL_NOPAD.encode(header.as_bytes()),
            data_encoding::BASE64URL_NOPAD.encode(payload.as_bytes()),
            data_encoding::BASE64URL_NOPAD.encode(&[0u8; 64])
        )
    }

    #[test]
    fn our_own_shape_parses() {
        let input = signing_input(&encoded_header("EdDSA", "k1"), &claims());
        let token = finish(input.clone(), &[0u8; 64]);
        let parsed = parse(&token).unwrap();
        assert_eq!(parsed.signing_input, input);
        assert_eq!(parsed.claims, claims());
        assert_eq!(parsed.header.typ, "at+jwt");
    }

    #[test]
    fn header_parameters_beyond_ours_are_refused() {
        let payload = serde_json::to_string(&claims()).unwrap();
        for header in [
            r#"{"alg":"EdDSA","typ":"at+jwt","kid":"k","crit":["exp"]}"#,
            r#"{"alg":"EdDSA","typ":"at+jwt","kid":"k","jku":"https://evil"}"#,
            r#"{"alg":"EdDSA","typ":"at+jwt","kid":"k","x5u":"https://evil"}"#,
            r#"{"alg":"EdDSA","typ":"at+jwt","kid":"k","jwk":{"kty":"OKP"}}"#,
            r#"{"alg":"EdDSA","typ":"at+jwt","kid":"k","alg":"none"}"#,
            r#"{"alg":"EdDSA","typ":"at+jwt"}"#,
            r#"["alg"]"#,
        ] {
            assert_eq!(
                parse(&token_with(header, &payload)).unwrap_err(),
                Malformed::Header,
                "{header}"
            );
        }
    }

    #[test]
    fn claims_beyond_ours_or_duplicated_are_refused() {
        let header = r#"{"alg":"EdDSA","typ":"at+jwt","kid":"k"}"#;
        let good = serde_json::to_string(&claims()).unwrap();
        let duplicated = good.replacen("{", r#"{"sub":"dev_00000000000000000000000000000000","#, 1);
        let extra = good.replacen("{", r#"{"admin":true,"#, 1);
        let float = good.replace(r#""exp":20"#, r#""exp":20.5"#);
        let array_aud = good.replace(r#""aud":"https://a""#, r#""aud":["https://a"]"#);
        for payload in [duplicated, extra, float, array_aud] {
            assert_eq!(
                parse(&token_with(header, &payload)).unwrap_err(),
                Malformed::Claims,
                "{payload}"
            );
        }
        assert!(parse(&token_with(header, &good)).is_ok());
    }

    #[test]
    fn shapes_are_checked_before_decoding() {
        let good = finish(
            signing_input(&encoded_header("EdDSA", "k"), &claims()),
            &[0; 64],
        );
        assert_eq!(
            parse(&"a".repeat(MAX_TOKEN_BYTES + 1)).unwrap_err(),
            Malformed::TooLong
        );
        assert_eq!(parse("a.b").unwrap_err(), Malformed::Segments);
        assert_eq!(
            parse(&format!("{good}.x")).unwrap_err(),
            Malformed::Segments
        );
        assert_eq!(parse("..").unwrap_err(), Malformed::Segments);
        assert_eq!(
            parse(&format!("{}=", good)).unwrap_err(),
            Malformed::SignatureLength
        );
        let padded = good.replacen('.', "=.", 1);
        assert_eq!(parse(&padded).unwrap_err(), Malformed::Base64);
        let (input, _) = good.rsplit_once('.').unwrap();
        assert_eq!(
            parse(&format!("{input}.{}", "-".repeat(86))).unwrap_err(),
            Malformed::Base64,
            "non-canonical trailing bits"
        );
    }

    #[test]
    fn provider_refuses_algorithm_confusion_and_unknown_algorithms() {
        let ed = DecodingKey::from_ed_der(&[0u8; 32]);
        assert!(new_verifier(&Algorithm::HS256, &ed).is_err());
        assert!(new_verifier(&Algorithm::RS256, &ed).is_err());
        assert!(new_verifier(&Algorithm::EdDSA, &DecodingKey::from_secret(b"k")).is_err());
        assert!(new_verifier(&Algorithm::EdDSA, &ed).is_ok());
        assert!(new_signer(&Algorithm::PS256, &EncodingKey::from_secret(b"k")).is_err());
    }

    #[test]
    fn provider_round_trips_every_supported_algorithm() {
        let rng = SystemRandom::new();
        let ed = sig::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let ed_pub = sig::Ed25519KeyPair::from_pkcs8(ed.as_ref())
            .unwrap()
            .public_key()
            .as_ref()
            .to_vec();
        let ec =
            sig::EcdsaKeyPair::generate_pkcs8(&sig::ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let ec_pub =
            sig::EcdsaKeyPair::from_pkcs8(&sig::ECDSA_P256_SHA256_FIXED_SIGNING, ec.as_ref(), &rng)
                .unwrap()
                .public_key()
                .as_ref()
                .to_vec();
        let cases = [
            (
                Algorithm::EdDSA,
                EncodingKey::from_ed_der(ed.as_ref()),
                DecodingKey::from_ed_der(&ed_pub),
            ),
            (
                Algorithm::ES256,
                EncodingKey::from_ec_der(ec.as_ref()),
                DecodingKey::from_ec_der(&ec_pub),
            ),
            (
                Algorithm::HS256,
                EncodingKey::from_secret(b"secret"),
                DecodingKey::from_secret(b"secret"),
            ),
        ];
        for (alg, enc, dec) in cases {
            let signature = new_signer(&alg, &enc).unwrap().try_sign(b"msg").unwrap();
            let verifier = new_verifier(&alg, &dec).unwrap();
            assert!(verifier.verify(b"msg", &signature).is_ok(), "{alg:?}");
            assert!(verifier.verify(b"msh", &signature).is_err(), "{alg:?}");
        }
        let (curve, x, y) = ec_components_from_private_key(ec.as_ref(), Algorithm::ES256).unwrap();
        assert_eq!(curve, EllipticCurve::P256);
        assert_eq!([&[4u8][..], &x, &y].concat(), ec_pub);
        assert_eq!(
            ed_component_from_private_key(ed.as_ref(), &EllipticCurve::Ed25519).unwrap(),
            ed_pub
        );
    }
}
