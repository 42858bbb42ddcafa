//! Interop: the access tokens gatehouse issues verify with an independent JWT library
//! (jwt-compact, with its own Ed25519 and P-256 code, not jsonwebtoken and not ring),
//! given nothing but what the server publishes: the RFC 8414 metadata document, the JWKS
//! it points to, and the token. This is what an app verifying offline does.
//!
//! jwt-compact's time checks read a clock; the test server runs on a fixed clock in the
//! test epoch (`helpers::TEST_NOW_MS`), so the checks use a `TimeOptions` whose clock is
//! stopped at the token's `iat` (which must be that fixed "now").

use jwt_compact::alg::{Ed25519, Es256};
use jwt_compact::jwk::{JsonWebKey, JwkError};
use jwt_compact::{Algorithm, AlgorithmExt, Claims, TimeOptions, Token, UntrustedToken};
use jwt_compact::{Claim, ValidationError};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::helpers::{self, TestApp};

/// Our access-token claims besides `exp`, `nbf` and `iat` (which jwt-compact's `Claims`
/// reads itself). Anything else lands in `extra`, which must stay empty.
#[derive(Debug, Clone, Deserialize)]
struct AccessClaims {
    iss: String,
    aud: String,
    sub: String,
    jti: String,
    sid: String,
    /// Where its revocation bit is published (draft-ietf-oauth-status-list).
    status: Value,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

/// Header members other than `alg`, `cty`, `kid`, `typ` and the x5*/jku family.
type ExtraHeader = Map<String, Value>;

/// The JWKS, found the way an app finds it: through the metadata document's `jwks_uri`.
async fn published_jwks(app: &TestApp) -> Vec<Value> {
    let client = app.client();
    let metadata: Value = client
        .get(app.url("/.well-known/oauth-authorization-server"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(metadata["issuer"], app.base_url.as_str(), "{metadata}");
    let jwks_uri = metadata["jwks_uri"].as_str().expect("jwks_uri").to_string();
    assert_eq!(jwks_uri, app.url("/.well-known/jwks.json"));
    assert!(jwks_uri.starts_with("https://"), "{jwks_uri}");
    let response = client.get(&jwks_uri).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "application/jwk-set+json"
    );
    let jwks: Value = response.json().await.unwrap();
    let keys = jwks["keys"].as_array().expect("a keys array").clone();
    assert!(!keys.is_empty(), "{jwks}");
    for key in &keys {
        assert!(
            key.get("d").is_none(),
            "a private key member is published: {key}"
        );
    }
    keys
}

/// The JWK whose `kid` is `kid`; exactly one must match.
fn select_jwk<'a>(keys: &'a [Value], kid: &str) -> &'a Value {
    let matching: Vec<&Value> = keys.iter().filter(|k| k["kid"] == kid).collect();
    assert_eq!(matching.len(), 1, "kid {kid} in {keys:?}");
    matching[0]
}

/// The RFC 7638 thumbprint of a public JWK. jwt-compact renders the canonical member
/// set (`Display`); its own `thumbprint::<D>()` needs a `Digest` type from `sha2`, which
/// is not a dependency of ours, so the hash is taken with ring (hashing only).
fn thumbprint(jwk: &JsonWebKey<'_>) -> String {
    let canonical = jwk.to_string();
    let digest = ring::digest::digest(&ring::digest::SHA256, canonical.as_bytes());
    data_encoding::BASE64URL_NOPAD.encode(digest.as_ref())
}

/// Parses `published` with jwt-compact, builds the verifying key for `A` from it, and
/// checks the token's signature with that key.
fn verify_with<A>(
    algorithm: &A,
    token: &str,
    published: &Value,
) -> Result<Token<AccessClaims, ExtraHeader>, ValidationError>
where
    A: Algorithm,
    A::VerifyingKey: for<'a, 'b> TryFrom<&'a JsonWebKey<'b>, Error = JwkError>,
{
    let jwk: JsonWebKey<'static> =
        serde_json::from_value(published.clone()).expect("the JWK parses in jwt-compact");
    let key = A::VerifyingKey::try_from(&jwk)
        .unwrap_or_else(|e| panic!("jwt-compact refuses the published key {published}: {e}"));
    let untrusted =
        UntrustedToken::<ExtraHeader>::try_from(token).expect("jwt-compact parses the token");
    algorithm
        .validator::<AccessClaims>(&key)
        .validate(&untrusted)
}

/// Verifies `token` from `jwks` alone, as an app would, and checks every claim. Returns
/// the token's kid.
fn verify_from_jwks<A>(
    algorithm: &A,
    token: &str,
    jwks: &[Value],
    app: &TestApp,
    device_id: &str,
) -> String
where
    A: Algorithm,
    A::VerifyingKey: for<'a, 'b> TryFrom<&'a JsonWebKey<'b>, Error = JwkError>,
{
    let untrusted = UntrustedToken::<ExtraHeader>::try_from(token).expect("token parses");
    let alg = algorithm.name();
    assert_eq!(untrusted.algorithm(), alg);
    let header = untrusted.header();
    assert_eq!(header.token_type.as_deref(), Some("at+jwt"));
    assert!(
        header.other_fields.is_empty(),
        "unexpected header members: {:?}",
        header.other_fields
    );
    assert!(header.key_set_url.is_none() && header.certificate_url.is_none());
    let kid = header.key_id.clone().expect("a kid header");

    let published = select_jwk(jwks, &kid);
    assert_eq!(published["alg"], alg.as_ref(), "{published}");
    assert_eq!(published["use"], "sig", "{published}");
    let jwk: JsonWebKey<'static> = serde_json::from_value(published.clone()).unwrap();
    assert!(!jwk.is_signing_key(), "the JWKS holds a private key");
    assert_eq!(thumbprint(&jwk), kid, "kid is not the RFC 7638 thumbprint");

    let verified = verify_with(algorithm, token, published)
        .unwrap_or_else(|e| panic!("jwt-compact refused a token of ours: {e:?}"));
    let claims = verified.claims();
    assert_eq!(claims.custom.iss, app.base_url);
    assert_eq!(
        claims.custom.aud, app.base_url,
        "aud defaults to the issuer"
    );
    assert_eq!(claims.custom.sub, device_id);
    let hex32 = |s: &str| s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit());
    assert!(hex32(&claims.custom.jti), "jti {}", claims.custom.jti);
    let family = claims.custom.sid.strip_prefix("fam_").unwrap_or_default();
    assert!(hex32(family), "sid {}", claims.custom.sid);
    let list = &claims.custom.status["status_list"];
    assert!(list["idx"].is_u64(), "status {}", claims.custom.status);
    let uri = list["uri"].as_str().unwrap_or_default();
    assert!(
        uri.starts_with(&format!("{}/v1/statuslists/", app.base_url)),
        "status {}",
        claims.custom.status
    );
    assert!(
        claims.custom.extra.is_empty(),
        "unexpected claims: {:?}",
        claims.custom.extra
    );

    let iat = claims.issued_at.expect("iat");
    let exp = claims.expiration.expect("exp");
    let nbf = claims.not_before.expect("nbf");
    let now_secs = i64::try_from(helpers::TEST_NOW_MS / 1000).unwrap();
    assert_eq!(iat.timestamp(), now_secs, "iat is the server's (fixed) now");
    assert_eq!((exp - iat).num_seconds(), 900, "a 15-minute access token");
    assert!(nbf <= iat, "nbf {nbf} after iat {iat}");

    // jwt-compact's own time checks, on a clock stopped at iat, with no leeway.
    // chrono is not a dependency of ours; its `TimeDelta::default()` is zero.
    let no_leeway = Default::default();
    let at_iat = TimeOptions::new(no_leeway, move || iat);
    claims
        .validate_expiration(&at_iat)
        .and_then(|c| c.validate_maturity(&at_iat))
        .unwrap_or_else(|e| panic!("time checks at iat failed: {e:?}"));
    // The same checks do bite: one second after exp, and before nbf.
    let after = exp + (exp - iat) / 900;
    let late = TimeOptions::new(no_leeway, move || after);
    assert!(matches!(
        claims.validate_expiration(&late),
        Err(ValidationError::Expired)
    ));
    let before = nbf - (exp - iat) / 900;
    let early = TimeOptions::new(no_leeway, move || before);
    assert!(matches!(
        claims.validate_maturity(&early),
        Err(ValidationError::NotMature)
    ));
    // A token without the claim is refused by the same calls (sanity of the API use).
    let bare: Claims<jwt_compact::Empty> = Claims::empty();
    assert!(matches!(
        bare.validate_expiration(&at_iat),
        Err(ValidationError::NoClaim(Claim::Expiration))
    ));
    kid
}

/// One payload character changed, chosen so that the payload still decodes to a JSON
/// object with the same members: jwt-compact parses claims before it checks the
/// signature, so only such a change shows that the signature itself is what refuses it.
fn tamper_one_payload_char(token: &str) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3);
    let payload = parts[1];
    let original: Map<String, Value> = serde_json::from_slice(
        &data_encoding::BASE64URL_NOPAD
            .decode(payload.as_bytes())
            .unwrap(),
    )
    .unwrap();
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    // Not the last 4 characters: a change there may leave non-zero trailing bits.
    for position in 0..payload.len().saturating_sub(4) {
        for &c in alphabet {
            if payload.as_bytes()[position] == c {
                continue;
            }
            let mut changed = payload.as_bytes().to_vec();
            changed[position] = c;
            let Ok(bytes) = data_encoding::BASE64URL_NOPAD.decode(&changed) else {
                continue;
            };
            let Ok(decoded) = serde_json::from_slice::<Map<String, Value>>(&bytes) else {
                continue;
            };
            let same_members = decoded.keys().eq(original.keys())
                && decoded.iter().all(|(k, v)| {
                    std::mem::discriminant(v) == std::mem::discriminant(&original[k])
                });
            if same_members && decoded != original {
                let changed = String::from_utf8(changed).unwrap();
                return format!("{}.{changed}.{}", parts[0], parts[2]);
            }
        }
    }
    panic!("no single-character change keeps the payload a JSON object: {payload}");
}

async fn interop_round<A>(algorithm: A, env: &[(&str, &str)])
where
    A: Algorithm,
    A::VerifyingKey: for<'a, 'b> TryFrom<&'a JsonWebKey<'b>, Error = JwkError>,
{
    let app = helpers::spawn_app_with(env).await;
    // Several tokens: ECDSA signatures vary, and every one must verify (e.g. high-S ones).
    let mut devices = Vec::new();
    for _ in 0..4 {
        devices.push(app.pair_device().await);
    }
    let jwks = published_jwks(&app).await;
    let mut kids = Vec::new();
    for device in &devices {
        assert_eq!(device.token_type, "Bearer");
        assert_eq!(device.expires_in, 900);
        kids.push(verify_from_jwks(
            &algorithm,
            &device.access_token,
            &jwks,
            &app,
            &device.device_id,
        ));
    }
    kids.dedup();
    assert_eq!(kids.len(), 1, "one active key signs every token: {kids:?}");
    let kid = kids.remove(0);

    // The other published key (the next one) does not verify the token: the kid matters.
    let first = &devices[0].access_token;
    let others: Vec<&Value> = jwks.iter().filter(|k| k["kid"] != kid.as_str()).collect();
    assert!(!others.is_empty(), "a next key is published: {jwks:?}");
    for other in others {
        assert!(matches!(
            verify_with(&algorithm, first, other),
            Err(ValidationError::InvalidSignature)
        ));
    }

    // One payload character changed: jwt-compact refuses the signature, and so do we.
    let tampered = tamper_one_payload_char(first);
    assert_ne!(&tampered, first);
    assert!(
        matches!(
            verify_with(&algorithm, &tampered, select_jwk(&jwks, &kid)),
            Err(ValidationError::InvalidSignature)
        ),
        "a tampered token verified in jwt-compact"
    );
    assert_eq!(app.introspect(&tampered).await["active"], false);
    // A truncated signature is refused before any curve arithmetic.
    let truncated = &first[..first.len() - 2];
    assert!(verify_with(&algorithm, truncated, select_jwk(&jwks, &kid)).is_err());

    // After an emergency rotation the old token still verifies from the new JWKS (its key
    // is retiring, still published), and tokens signed from now on carry the new kid.
    let report = app
        .running
        .services
        .keys
        .rotate(
            gatehouse::keys::Rotation::Now,
            &gatehouse::audit::Origin::operator(),
        )
        .await
        .expect("rotate --now");
    assert_eq!(report.retiring.as_deref(), Some(kid.as_str()));
    let rotated_jwks = published_jwks(&app).await;
    assert!(
        rotated_jwks
            .iter()
            .any(|k| k["kid"] == report.activated.as_str())
            && rotated_jwks
                .iter()
                .any(|k| k["kid"] == report.next.as_str()),
        "{rotated_jwks:?}"
    );
    let old_kid = verify_from_jwks(
        &algorithm,
        first,
        &rotated_jwks,
        &app,
        &devices[0].device_id,
    );
    assert_eq!(old_kid, kid);
    assert_eq!(app.introspect(first).await["active"], true);
    let fresh = app.pair_device().await;
    let new_kid = verify_from_jwks(
        &algorithm,
        &fresh.access_token,
        &rotated_jwks,
        &app,
        &fresh.device_id,
    );
    assert_eq!(new_kid, report.activated);
    assert_ne!(new_kid, kid);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eddsa_tokens_verify_in_jwt_compact_from_the_published_jwks() {
    interop_round(Ed25519, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn es256_tokens_verify_in_jwt_compact_from_the_published_jwks() {
    interop_round(Es256, &[("GATEHOUSE_KEY_ALGORITHM", "ES256")]).await;
}

/// The algorithm is pinned by the verifier: an EdDSA token is not accepted by an ES256
/// verifier (nor the reverse), whatever key it is handed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_compact_refuses_a_token_under_the_other_algorithm() {
    let ed = helpers::spawn_app().await;
    let es = helpers::spawn_app_with(&[("GATEHOUSE_KEY_ALGORITHM", "ES256")]).await;
    let ed_token = ed.pair_device().await.access_token;
    let es_token = es.pair_device().await.access_token;
    let ed_jwks = published_jwks(&ed).await;
    let es_jwks = published_jwks(&es).await;
    for key in &es_jwks {
        assert!(matches!(
            verify_with(&Es256, &ed_token, key),
            Err(ValidationError::AlgorithmMismatch { .. })
        ));
    }
    for key in &ed_jwks {
        assert!(matches!(
            verify_with(&Ed25519, &es_token, key),
            Err(ValidationError::AlgorithmMismatch { .. })
        ));
    }
    ed.stop().await;
    es.stop().await;
}
