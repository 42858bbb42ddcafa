//! Hostile access tokens: every crafted token here must be refused, and refused the same
//! way on every path that reads a token.
//!
//! Each case is a named token built by the helpers below: forged algorithms (`none`,
//! HS256 keyed with our own public key, a header naming another algorithm than the key's),
//! hostile or foreign `kid`s, claims outside policy (expired, not yet valid, wrong `iss` or
//! `aud`, mistyped, duplicated or unknown claims), tampering with a real token, broken
//! shapes (segments, base64, sizes), forbidden header parameters (`crit`, `jku`, `x5u`,
//! `jwk`...), and tokens that were valid until their key was retired or revoked, their
//! device revoked, or the clock passed their expiry. For every case, `run` checks that
//! `TokenAuthority::verify` refuses it (with the expected `Rejection` where exactly one
//! reason is possible), that `/v1/introspect` answers exactly `{"active": false}` with a
//! 200 (a live refresh token is instead described as a refresh token, never as an access
//! token), that `/v1/revoke` answers 200 and revokes nothing it should not (each group's
//! positive control, a properly signed token, is accepted before and after the run; the
//! tampered tokens share its `jti` and `sub`), and that the token presented as the
//! introspection caller's bearer credential gets a 401, never a 5xx (the admin token
//! case is, rightly, an admin), and that forward authentication (`/v1/authz`) answers it
//! 401 with no device id. A failure names every case that failed.

use std::collections::HashSet;

use data_encoding::BASE64URL_NOPAD as B64;
use gatehouse::clock::Clock as _;
use gatehouse::ids::{DeviceId, FamilyId, TokenId};
use gatehouse::jwt::{AccessClaims, Malformed};
use gatehouse::keys::{KeyState, Rotation};
use gatehouse::tokens::Rejection;
use reqwest::header::{AUTHORIZATION, HeaderValue};
use ring::signature::{Ed25519KeyPair, KeyPair as _};
use serde_json::{Map, Value, json};

use crate::helpers::{self, TEST_NOW_MS, TestApp};

// ---------------------------------------------------------------------------------------
// Cases and the runner

/// What `/v1/introspect` must answer for a case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Introspected {
    /// Exactly `{"active": false}`.
    Inactive,
    /// A live refresh token: RFC 7662 describes it as a refresh token (never as an access
    /// token); after `/v1/revoke` it must be inactive.
    RefreshToken,
}

/// One crafted token and what every path must do with it.
#[derive(Debug)]
struct Case {
    name: String,
    token: String,
    /// The reasons `verify` may give; empty when any rejection will do.
    reasons: Vec<Rejection>,
    introspected: Introspected,
    /// The status of `/v1/introspect` when the token is the caller's bearer credential.
    as_bearer: u16,
}

impl Case {
    fn introspected(&mut self, introspected: Introspected) -> &mut Self {
        self.introspected = introspected;
        self
    }
}

#[derive(Debug, Default)]
struct Cases(Vec<Case>);

impl Cases {
    /// A case refused for exactly one reason.
    fn push(&mut self, name: &str, token: impl Into<String>, reason: Rejection) -> &mut Case {
        self.push_one_of(name, token, &[reason])
    }

    /// A case whose reason depends on state outside the test's control (listed).
    fn push_one_of(
        &mut self,
        name: &str,
        token: impl Into<String>,
        reasons: &[Rejection],
    ) -> &mut Case {
        self.0.push(Case {
            name: name.to_string(),
            token: token.into(),
            reasons: reasons.to_vec(),
            introspected: Introspected::Inactive,
            as_bearer: 401,
        });
        let last = self.0.len() - 1;
        &mut self.0[last]
    }

    fn len(&self) -> usize {
        self.0.len()
    }
}

fn malformed(why: Malformed) -> Rejection {
    Rejection::Malformed(why)
}

/// A server that neither bans nor throttles the suite's hundreds of refused admin
/// credentials (each crafted token is also presented as a Bearer admin token), with one
/// paired device whose family crafted tokens name (see `valid_claims`).
async fn spawn_app() -> TestApp {
    let app = helpers::spawn_app_with(&[
        ("GATEHOUSE_LOCKOUT_MAX_FAILURES", "10000"),
        ("GATEHOUSE_RATELIMIT_ADMIN_LOGIN", "off"),
    ])
    .await;
    app.pair_device().await;
    app
}

/// Runs every case against `app` and fails once, listing each case that misbehaved.
async fn run(app: &TestApp, cases: &Cases) {
    assert!(!cases.0.is_empty(), "a group without cases proves nothing");
    let mut names = HashSet::new();
    for case in &cases.0 {
        assert!(
            names.insert(&case.name),
            "duplicate case name {}",
            case.name
        );
    }
    let client = app.client();
    let mut failures = Vec::new();
    for case in &cases.0 {
        if let Err(why) = check(app, &client, case).await {
            failures.push(format!("{}: {why}", case.name));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} crafted tokens were not handled as expected:\n  {}",
        failures.len(),
        cases.len(),
        failures.join("\n  ")
    );
}

async fn check(app: &TestApp, client: &reqwest::Client, case: &Case) -> Result<(), String> {
    let tokens = &app.running.services.tokens;

    // (a) The one check of a presented access token refuses it, for the expected reason.
    match tokens.verify(&case.token) {
        Ok(verified) => {
            return Err(format!(
                "verify ACCEPTED it (sub {}, kid {})",
                verified.claims.sub, verified.kid
            ));
        }
        Err(reason) if case.reasons.is_empty() || case.reasons.contains(&reason) => {}
        Err(reason) => {
            return Err(format!(
                "verify refused it as {reason:?}, expected one of {:?}",
                case.reasons
            ));
        }
    }

    // (b) Introspection says nothing but "inactive". The helper asserts the 200; should
    // it panic, this line names the case in the captured output.
    eprintln!("jwt_negative: introspecting case {}", case.name);
    let answer = app.introspect(&case.token).await;
    match case.introspected {
        Introspected::Inactive => {
            if answer != json!({"active": false}) {
                return Err(format!("introspection answered {answer}"));
            }
        }
        Introspected::RefreshToken => {
            if answer["active"] != true
                || answer["token_type"] != "refresh_token"
                || answer.get("aud").is_some()
            {
                return Err(format!(
                    "introspection of a live refresh token answered {answer}"
                ));
            }
        }
    }

    // (c) Revocation answers 200 whatever it is given.
    let status = client
        .post(app.url("/v1/revoke"))
        .form(&[("token", case.token.as_str())])
        .send()
        .await
        .map_err(|e| format!("/v1/revoke request failed: {e}"))?
        .status();
    if status != 200 {
        return Err(format!("/v1/revoke answered {status}"));
    }
    if case.introspected == Introspected::RefreshToken {
        let after = app.introspect(&case.token).await;
        if after != json!({"active": false}) {
            return Err(format!(
                "refresh token still active after /v1/revoke: {after}"
            ));
        }
    }

    // (d) As the introspection caller's credential it is refused, never a server error.
    // A token that is not a legal header value (control or non-ASCII characters) cannot
    // be sent this way at all; the client refuses to build the request.
    if let Ok(value) = HeaderValue::from_str(&format!("Bearer {}", case.token)) {
        let status = client
            .post(app.url("/v1/introspect"))
            .header(AUTHORIZATION, value)
            .form(&[("token", "bogus")])
            .send()
            .await
            .map_err(|e| format!("/v1/introspect (as bearer) request failed: {e}"))?
            .status();
        if status.is_server_error() || status.as_u16() != case.as_bearer {
            return Err(format!(
                "/v1/introspect with it as bearer answered {status}, expected {}",
                case.as_bearer
            ));
        }
    }

    // (e) Forward authentication refuses it, and names no device. Whitespace around a
    // token cannot be sent in a header: HTTP strips it from the value's end, and RFC 6750
    // allows several spaces after `Bearer`, so the header would carry the bare token.
    let framed = case.token.trim() == case.token;
    if let Some(value) = framed
        .then(|| HeaderValue::from_str(&format!("Bearer {}", case.token)).ok())
        .flatten()
    {
        let response = client
            .get(app.url("/v1/authz"))
            .header(AUTHORIZATION, value)
            .send()
            .await
            .map_err(|e| format!("/v1/authz request failed: {e}"))?;
        let status = response.status();
        if status != 401 || response.headers().contains_key("x-gatehouse-device-id") {
            return Err(format!(
                "/v1/authz answered {status} {:?}, expected a 401 without a device id",
                response.headers()
            ));
        }
    }

    // (f) Still refused afterwards: nothing above turned it into a valid token.
    if tokens.verify(&case.token).is_ok() {
        return Err("verify accepts it after revoke/introspection".into());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Building tokens

/// The access-token lifetime and leeway of a default instance.
const ACCESS_TTL_S: u64 = 15 * 60;
const NOW_S: u64 = TEST_NOW_MS / 1000;

fn b64(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

/// `header.payload.signature` from raw JSON texts and signature bytes.
fn assemble(header: &str, payload: &str, signature: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        b64(header.as_bytes()),
        b64(payload.as_bytes()),
        b64(signature)
    )
}

/// The three segments of a compact token, still encoded.
fn segments(token: &str) -> (&str, &str, &str) {
    let mut parts = token.split('.');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(h), Some(p), Some(s), None) => (h, p, s),
        _ => panic!("not a three-segment token: {token}"),
    }
}

fn decode(segment: &str) -> Vec<u8> {
    B64.decode(segment.as_bytes()).expect("base64url segment")
}

fn decode_json(segment: &str) -> Map<String, Value> {
    match serde_json::from_slice(&decode(segment)).expect("JSON segment") {
        Value::Object(map) => map,
        other => panic!("not a JSON object: {other}"),
    }
}

/// Claims the app would accept right now (its fixed clock), naming the first paired
/// device's family (a token is valid only for a family in the data file): pair a device
/// first.
fn valid_claims(app: &TestApp) -> AccessClaims {
    let settings = app.running.services.tokens.settings();
    let now_s = app.clock.now_ms() / 1000;
    let families = app
        .running
        .store
        .read(|tx| tx.all(&gatehouse::store::TOKEN_FAMILIES))
        .unwrap();
    let (family, row) = families
        .into_iter()
        .next()
        .expect("valid claims name a paired device's family: pair one first");
    AccessClaims {
        iss: settings.issuer.clone(),
        aud: settings.audience.clone(),
        sub: DeviceId::parse(&row.device_id).unwrap(),
        exp: now_s + settings.access_ttl.as_secs(),
        nbf: now_s,
        iat: now_s,
        jti: TokenId::generate().unwrap(),
        sid: FamilyId::parse(&family).unwrap(),
        scope: None,
        cnf: None,
        status: None,
    }
}

/// `claims` signed by the app's active key, with the server's own header.
fn sign(app: &TestApp, claims: &AccessClaims) -> String {
    app.running
        .services
        .keys
        .sign(claims)
        .expect("the key ring signs")
}

fn kid_in_state(app: &TestApp, state: KeyState) -> String {
    app.running
        .services
        .keys
        .list()
        .into_iter()
        .find(|k| k.state == state)
        .unwrap_or_else(|| panic!("a key in state {state:?}"))
        .kid
}

async fn jwks(app: &TestApp) -> Value {
    let response = app
        .client()
        .get(app.url("/.well-known/jwks.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

fn published(jwks: &Value, kid: &str) -> Option<Value> {
    jwks["keys"]
        .as_array()
        .expect("keys array")
        .iter()
        .find(|k| k["kid"] == kid)
        .cloned()
}

/// What a forger knows about one instance: its active key as the JWKS publishes it, and a
/// key pair of its own.
struct Kit {
    alg: String,
    kid: String,
    /// The active key's published JWK.
    jwk: Value,
    /// The forger's own Ed25519 key.
    local: Ed25519KeyPair,
    /// Valid claims (fixed clock), as JSON.
    claims: Map<String, Value>,
}

impl Kit {
    async fn new(app: &TestApp) -> Self {
        let families = app
            .running
            .store
            .read(|tx| tx.all(&gatehouse::store::TOKEN_FAMILIES))
            .unwrap();
        if families.is_empty() {
            app.pair_device().await;
        }
        let kid = kid_in_state(app, KeyState::Active);
        let jwk = published(&jwks(app).await, &kid).expect("the active key is in the JWKS");
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let claims = match serde_json::to_value(valid_claims(app)).unwrap() {
            Value::Object(map) => map,
            other => panic!("claims serialise to an object, not {other}"),
        };
        Self {
            alg: jwk["alg"].as_str().expect("alg").to_string(),
            kid,
            jwk,
            local: Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap(),
            claims,
        }
    }

    /// The raw public key bytes as the JWKS gives them (`x`, then `y` for P-256).
    fn public_key_bytes(&self) -> Vec<u8> {
        let mut out = decode(self.jwk["x"].as_str().expect("x"));
        if let Some(y) = self.jwk["y"].as_str() {
            out.extend(decode(y));
        }
        out
    }

    /// A header exactly like the server's, as JSON.
    fn header(&self) -> Map<String, Value> {
        let mut map = Map::new();
        map.insert("alg".into(), json!(self.alg));
        map.insert("typ".into(), json!("at+jwt"));
        map.insert("kid".into(), json!(self.kid));
        map
    }

    /// Our header with `edit` applied, as JSON text.
    fn header_with(&self, edit: impl FnOnce(&mut Map<String, Value>)) -> String {
        let mut map = self.header();
        edit(&mut map);
        Value::Object(map).to_string()
    }

    /// Valid claims with `edit` applied, as JSON text.
    fn payload_with(&self, edit: impl FnOnce(&mut Map<String, Value>)) -> String {
        let mut map = self.claims.clone();
        edit(&mut map);
        Value::Object(map).to_string()
    }

    fn payload(&self) -> String {
        self.payload_with(|_| {})
    }

    /// `header.payload` signed by the forger's own key: a correct signature by a key the
    /// server does not hold.
    fn forge(&self, header: &str, payload: &str) -> String {
        let input = format!("{}.{}", b64(header.as_bytes()), b64(payload.as_bytes()));
        let signature = self.local.sign(input.as_bytes());
        format!("{input}.{}", b64(signature.as_ref()))
    }

    /// Our exact header over valid claims with `edit` applied, signed by the forger.
    fn forge_claims(&self, edit: impl FnOnce(&mut Map<String, Value>)) -> String {
        self.forge(&self.header_with(|_| {}), &self.payload_with(edit))
    }

    /// A header with `edit` applied over valid claims, signed by the forger.
    fn forge_header(&self, edit: impl FnOnce(&mut Map<String, Value>)) -> String {
        self.forge(&self.header_with(edit), &self.payload())
    }

    /// The RFC 7638 thumbprint of the forger's key: a plausible kid of the form we use.
    fn local_thumbprint(&self) -> String {
        let canonical = format!(
            r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#,
            b64(self.local.public_key().as_ref())
        );
        b64(ring::digest::digest(&ring::digest::SHA256, canonical.as_bytes()).as_ref())
    }
}

/// HMAC over `header.payload` keyed with `secret`.
fn hmac_token(header: &str, payload: &str, alg: ring::hmac::Algorithm, secret: &[u8]) -> String {
    let input = format!("{}.{}", b64(header.as_bytes()), b64(payload.as_bytes()));
    let tag = ring::hmac::sign(&ring::hmac::Key::new(alg, secret), input.as_bytes());
    format!("{input}.{}", b64(tag.as_ref()))
}

/// A properly signed token that must be accepted: the suite cannot pass by refusing all.
struct Control {
    token: String,
    claims: AccessClaims,
}

impl Control {
    fn issue(app: &TestApp) -> Self {
        let claims = valid_claims(app);
        Self {
            token: sign(app, &claims),
            claims,
        }
    }

    async fn assert_accepted(&self, app: &TestApp) {
        let verified = app
            .running
            .services
            .tokens
            .verify(&self.token)
            .unwrap_or_else(|r| panic!("the positive control was refused as {r:?}"));
        assert_eq!(verified.claims, self.claims);
        let answer = app.introspect(&self.token).await;
        assert_eq!(answer["active"], true, "control introspection: {answer}");
        assert_eq!(answer["token_type"], "access_token");
        assert_eq!(answer["sub"], self.claims.sub.to_string());
        assert_eq!(answer["jti"], self.claims.jti.to_string());
    }
}

// ---------------------------------------------------------------------------------------
// Forged algorithms

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_algorithms_are_refused() {
    let app = spawn_app().await;
    let kit = Kit::new(&app).await;
    let control = Control::issue(&app);
    control.assert_accepted(&app).await;
    let payload = kit.payload();
    let alg =
        |name: &'static str| kit.header_with(move |h| _ = h.insert("alg".into(), json!(name)));
    let mut cases = Cases::default();

    let none = alg("none");
    cases.push(
        "alg_none_empty_signature",
        format!("{}.{}.", b64(none.as_bytes()), b64(payload.as_bytes())),
        malformed(Malformed::Segments),
    );
    cases.push(
        "alg_none_zero_signature",
        assemble(&none, &payload, &[0; 64]),
        Rejection::AlgorithmMismatch,
    );
    let (_, control_payload, real_signature) = segments(&control.token);
    cases.push(
        "alg_none_with_a_real_signature",
        format!(
            "{}.{control_payload}.{real_signature}",
            b64(none.as_bytes())
        ),
        Rejection::AlgorithmMismatch,
    );
    cases.push(
        "alg_None_capitalised",
        assemble(&alg("None"), &payload, &[0; 64]),
        Rejection::AlgorithmMismatch,
    );
    cases.push(
        "alg_nOnE_mixed_case",
        assemble(&alg("nOnE"), &payload, &[1; 64]),
        Rejection::AlgorithmMismatch,
    );

    // The classic key confusion: HMAC keyed with the published public key.
    let hs256 = alg("HS256");
    let public = kit.public_key_bytes();
    let x_text = kit.jwk["x"].as_str().unwrap().to_string();
    cases.push(
        "hs256_public_key_bytes_as_secret",
        hmac_token(&hs256, &payload, ring::hmac::HMAC_SHA256, &public),
        malformed(Malformed::SignatureLength),
    );
    cases.push(
        "hs256_public_key_base64_text_as_secret",
        hmac_token(&hs256, &payload, ring::hmac::HMAC_SHA256, x_text.as_bytes()),
        malformed(Malformed::SignatureLength),
    );
    cases.push(
        "hs256_public_jwk_json_as_secret",
        hmac_token(
            &hs256,
            &payload,
            ring::hmac::HMAC_SHA256,
            kit.jwk.to_string().as_bytes(),
        ),
        malformed(Malformed::SignatureLength),
    );
    // Padded to the length of our signatures, so that only the algorithm can refuse it.
    let short = hmac_token(&hs256, &payload, ring::hmac::HMAC_SHA256, &public);
    let (h, p, s) = segments(&short);
    let tag = decode(s);
    cases.push(
        "hs256_public_key_secret_tag_doubled_to_64_bytes",
        format!("{h}.{p}.{}", b64(&[tag.clone(), tag].concat())),
        Rejection::AlgorithmMismatch,
    );
    cases.push(
        "hs512_public_key_bytes_as_secret",
        hmac_token(&alg("HS512"), &payload, ring::hmac::HMAC_SHA512, &public),
        Rejection::AlgorithmMismatch,
    );
    cases.push(
        "hs256_header_hs512_tag",
        hmac_token(&hs256, &payload, ring::hmac::HMAC_SHA512, &public),
        Rejection::AlgorithmMismatch,
    );

    // Another algorithm than the key's, with a correct Ed25519 signature by the forger.
    for (name, value) in [
        ("alg_es256_on_an_eddsa_key", "ES256"),
        ("alg_rs256", "RS256"),
        ("alg_ps256", "PS256"),
        ("alg_eddsa_lowercase", "eddsa"),
        ("alg_ed25519_fully_specified", "Ed25519"),
        ("alg_empty_string", ""),
    ] {
        cases.push(
            name,
            kit.forge(&alg(value), &payload),
            Rejection::AlgorithmMismatch,
        );
    }
    cases.push(
        "alg_missing",
        kit.forge_header(|h| _ = h.remove("alg")),
        malformed(Malformed::Header),
    );
    cases.push(
        "alg_null",
        kit.forge_header(|h| _ = h.insert("alg".into(), Value::Null)),
        malformed(Malformed::Header),
    );
    cases.push(
        "alg_as_array",
        kit.forge_header(|h| _ = h.insert("alg".into(), json!(["EdDSA"]))),
        malformed(Malformed::Header),
    );

    run(&app, &cases).await;
    control.assert_accepted(&app).await;
    app.stop().await;
}

// ---------------------------------------------------------------------------------------
// Key identifiers

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_and_hostile_kids_are_refused() {
    let app = spawn_app().await;
    let kit = Kit::new(&app).await;
    let control = Control::issue(&app);
    control.assert_accepted(&app).await;
    let kid = |value: String| kit.forge_header(move |h| _ = h.insert("kid".into(), json!(value)));
    let mut cases = Cases::default();

    for (name, value) in [
        ("kid_unknown", "k-unknown-0001".to_string()),
        ("kid_path_traversal", "../../etc/passwd".to_string()),
        ("kid_absolute_path", "/dev/null".to_string()),
        ("kid_sql_injection", "' OR 1=1 --".to_string()),
        ("kid_url", "https://attacker.example/jwks.json".to_string()),
        ("kid_empty", String::new()),
        ("kid_with_nul", format!("{}\u{0}", kit.kid)),
        ("kid_with_trailing_space", format!("{} ", kit.kid)),
        ("kid_uppercased", kit.kid.to_uppercase()),
        ("kid_thumbprint_of_the_forgers_key", kit.local_thumbprint()),
    ] {
        assert_ne!(value, kit.kid, "{name} must differ from the real kid");
        cases.push(name, kid(value), Rejection::UnknownKey);
    }
    cases.push(
        "kid_real_but_signed_by_another_key",
        kit.forge_claims(|_| {}),
        Rejection::BadSignature,
    );
    // Published in the JWKS ahead of time, but it does not sign (or verify) yet.
    let next = kid_in_state(&app, KeyState::Next);
    cases.push("kid_of_the_next_key", kid(next), Rejection::KeyNotUsable);
    cases.push(
        "kid_as_number",
        kit.forge_header(|h| _ = h.insert("kid".into(), json!(1))),
        malformed(Malformed::Header),
    );
    cases.push(
        "kid_as_object",
        kit.forge_header(|h| _ = h.insert("kid".into(), json!({"$ne": ""}))),
        malformed(Malformed::Header),
    );
    cases.push(
        "kid_missing",
        kit.forge_header(|h| _ = h.remove("kid")),
        malformed(Malformed::Header),
    );

    run(&app, &cases).await;
    control.assert_accepted(&app).await;
    app.stop().await;
}

// ---------------------------------------------------------------------------------------
// Claims

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_outside_policy_are_refused() {
    let app = spawn_app().await;
    let kit = Kit::new(&app).await;
    let control = Control::issue(&app);
    control.assert_accepted(&app).await;
    let settings = app.running.services.tokens.settings().clone();
    assert_eq!(settings.leeway.as_secs(), 30, "default leeway");
    // Signed by the real key: only the claim is wrong.
    let signed = |edit: &dyn Fn(&mut AccessClaims)| {
        let mut claims = valid_claims(&app);
        edit(&mut claims);
        sign(&app, &claims)
    };
    let mut cases = Cases::default();

    cases.push(
        "family_not_in_the_data_file",
        signed(&|c| c.sid = FamilyId::generate().unwrap()),
        Rejection::UnknownFamily,
    );
    cases.push(
        "expired_beyond_leeway",
        signed(&|c| {
            c.exp = NOW_S - 31;
            c.iat = c.exp - ACCESS_TTL_S;
            c.nbf = c.iat;
        }),
        Rejection::Expired,
    );
    cases.push(
        "expired_exactly_at_exp_plus_leeway",
        signed(&|c| {
            c.exp = NOW_S - 30;
            c.iat = c.exp - ACCESS_TTL_S;
            c.nbf = c.iat;
        }),
        Rejection::Expired,
    );
    cases.push(
        "exp_zero",
        signed(&|c| {
            c.exp = 0;
            c.iat = 0;
            c.nbf = 0;
        }),
        Rejection::Expired,
    );
    cases.push(
        "nbf_far_in_the_future",
        signed(&|c| {
            c.nbf = NOW_S + 30 * 86_400;
            c.exp = c.nbf + ACCESS_TTL_S;
        }),
        Rejection::NotYetValid,
    );
    cases.push(
        "lifetime_longer_than_the_access_ttl",
        signed(&|c| c.exp = c.iat + settings.access_ttl.as_secs() + 31),
        Rejection::LifetimeTooLong,
    );
    cases.push(
        "exp_at_the_end_of_time",
        signed(&|c| c.exp = u64::MAX),
        Rejection::LifetimeTooLong,
    );
    cases.push(
        "nbf_just_beyond_leeway",
        signed(&|c| c.nbf = NOW_S + 31),
        Rejection::NotYetValid,
    );
    cases.push(
        "iat_in_the_future",
        signed(&|c| c.iat = NOW_S + 3600),
        Rejection::IssuedInFuture,
    );
    let issuer = settings.issuer.clone();
    for (name, value) in [
        ("iss_foreign", "https://attacker.example".to_string()),
        ("iss_with_trailing_slash", format!("{issuer}/")),
        ("iss_uppercased", issuer.to_uppercase()),
        ("iss_empty", String::new()),
    ] {
        assert_ne!(value, issuer);
        cases.push(
            name,
            signed(&|c| c.iss = value.clone()),
            Rejection::WrongIssuer,
        );
    }
    let audience = settings.audience.clone();
    for (name, value) in [
        ("aud_foreign", "https://other-api.example".to_string()),
        ("aud_with_suffix", format!("{audience}.attacker.example")),
        ("aud_empty", String::new()),
    ] {
        assert_ne!(value, audience);
        cases.push(
            name,
            signed(&|c| c.aud = value.clone()),
            Rejection::WrongAudience,
        );
    }

    // Not representable in our claims: forged (our header, the forger's signature), and
    // refused while parsing, before any key is consulted.
    for (name, claim, value) in [
        ("aud_as_array", "aud", Some(json!([audience]))),
        ("iss_as_array", "iss", Some(json!([issuer]))),
        ("exp_as_float", "exp", Some(json!(NOW_S as f64 + 60.5))),
        (
            "exp_as_string",
            "exp",
            Some(json!((NOW_S + 60).to_string())),
        ),
        ("exp_negative", "exp", Some(json!(-1))),
        ("exp_null", "exp", Some(Value::Null)),
        ("exp_missing", "exp", None),
        ("nbf_as_string", "nbf", Some(json!("0"))),
        ("extra_unknown_claim", "admin", Some(json!(true))),
        ("cnf_with_a_bad_jkt", "cnf", Some(json!({"jkt": "x"}))),
        (
            "cnf_with_another_member",
            "cnf",
            Some(json!({"jkt": "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I", "x5t#S256": "y"})),
        ),
        ("cnf_as_a_string", "cnf", Some(json!("jkt"))),
        ("sub_not_a_device_id", "sub", Some(json!("admin"))),
        ("jti_missing", "jti", None),
        ("scope_as_array", "scope", Some(json!(["admin"]))),
    ] {
        let token = kit.forge_claims(|c| match value {
            Some(value) => _ = c.insert(claim.into(), value),
            None => _ = c.remove(claim),
        });
        cases.push(name, token, malformed(Malformed::Claims));
    }
    // exp beyond u64 is written by hand: serde_json cannot build the number.
    let huge = kit.payload().replacen(
        &format!(r#""exp":{}"#, kit.claims["exp"]),
        r#""exp":100000000000000000000000"#,
        1,
    );
    assert!(huge.contains("100000000000000000000000"));
    cases.push(
        "exp_beyond_u64",
        kit.forge(&kit.header_with(|_| {}), &huge),
        malformed(Malformed::Claims),
    );
    // Duplicate keys: the second `sub` names another device; a lenient parser would take
    // either one.
    let payload = kit.payload();
    let other = DeviceId::generate().unwrap();
    let duplicate_sub = payload.replacen('{', &format!(r#"{{"sub":"{other}","#), 1);
    let duplicate_exp = payload.replacen('{', &format!(r#"{{"exp":{},"#, NOW_S + 86_400), 1);
    for (name, text) in [
        ("payload_duplicate_sub", duplicate_sub),
        ("payload_duplicate_exp", duplicate_exp),
        ("payload_not_json", "not json".to_string()),
        ("payload_json_array", "[1,2,3]".to_string()),
        ("payload_json_string", r#""eyJ""#.to_string()),
        ("payload_empty_object", "{}".to_string()),
        (
            "payload_duplicate_sub_escaped",
            payload.replacen('{', &format!(r#"{{"s\u0075b":"{other}","#), 1),
        ),
        ("payload_deeply_nested", "[".repeat(1500)),
    ] {
        cases.push(
            name,
            kit.forge(&kit.header_with(|_| {}), &text),
            malformed(Malformed::Claims),
        );
    }
    // Not UTF-8 at all (a lone continuation byte inside a string).
    let mut invalid_utf8 = kit.payload().into_bytes();
    let at = invalid_utf8.len() - 3;
    invalid_utf8[at] = 0x80;
    let input = format!(
        "{}.{}",
        b64(kit.header_with(|_| {}).as_bytes()),
        b64(&invalid_utf8)
    );
    cases.push(
        "payload_invalid_utf8",
        format!("{input}.{}", b64(kit.local.sign(input.as_bytes()).as_ref())),
        malformed(Malformed::Claims),
    );

    run(&app, &cases).await;
    control.assert_accepted(&app).await;
    app.stop().await;
}

// ---------------------------------------------------------------------------------------
// Tampering with real tokens

/// The order L of the Ed25519 group, little-endian (RFC 8032 section 5.1).
const ED25519_ORDER: [u8; 32] = [
    0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9, 0xde, 0x14,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
];

/// `a + b` for 256-bit little-endian numbers (no overflow here: S < L < 2^253).
fn add_le(a: &[u8], b: &[u8; 32]) -> Vec<u8> {
    let mut carry = 0u16;
    let mut out = Vec::with_capacity(32);
    for (x, y) in a.iter().zip(b) {
        let sum = u16::from(*x) + u16::from(*y) + carry;
        out.push(sum.to_le_bytes()[0]);
        carry = sum >> 8;
    }
    assert_eq!(carry, 0, "no overflow");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_tokens_are_refused() {
    let app = spawn_app().await;
    let control = Control::issue(&app);
    control.assert_accepted(&app).await;
    // A second real token, verified once so that its signature sits in the cache.
    let other = Control::issue(&app);
    other.assert_accepted(&app).await;
    let (header, payload, signature) = segments(&control.token);
    let claims = decode_json(payload);
    let with_claims = |edit: &dyn Fn(&mut Map<String, Value>)| {
        let mut map = claims.clone();
        edit(&mut map);
        format!(
            "{header}.{}.{signature}",
            b64(Value::Object(map).to_string().as_bytes())
        )
    };
    let with_signature = |bytes: &[u8]| format!("{header}.{payload}.{}", b64(bytes));
    let real = decode(signature);
    let flipped = |index: usize, bit: u8| {
        let mut bytes = real.clone();
        bytes[index] ^= bit;
        with_signature(&bytes)
    };
    let mut cases = Cases::default();

    // Every tampered token keeps the control's jti and sub: if `/v1/revoke` took one for
    // valid, the control would be refused at the end.
    let stranger = DeviceId::generate().unwrap();
    cases.push(
        "payload_sub_changed",
        with_claims(&|c| _ = c.insert("sub".into(), json!(stranger))),
        Rejection::BadSignature,
    );
    cases.push(
        "payload_exp_extended",
        with_claims(&|c| _ = c.insert("exp".into(), json!(control.claims.exp + 86_400))),
        Rejection::BadSignature,
    );
    cases.push(
        "payload_scope_added",
        with_claims(&|c| _ = c.insert("scope".into(), json!("admin"))),
        Rejection::BadSignature,
    );
    // Same claims, other bytes (sorted keys instead of ours): the signature covers bytes.
    let reversed: Map<String, Value> = claims.clone().into_iter().rev().collect();
    let reordered = format!(
        "{header}.{}.{signature}",
        b64(Value::Object(reversed).to_string().as_bytes())
    );
    assert_ne!(reordered, control.token, "same claims, other bytes");
    cases.push(
        "payload_same_claims_reordered",
        reordered,
        Rejection::BadSignature,
    );
    let spaced_header = String::from_utf8(decode(header))
        .unwrap()
        .replace(':', ": ")
        .replace(',', ", ");
    cases.push(
        "header_same_parameters_with_whitespace",
        format!("{}.{payload}.{signature}", b64(spaced_header.as_bytes())),
        Rejection::BadSignature,
    );
    cases.push(
        "signature_first_bit_flipped",
        flipped(0, 0x01),
        Rejection::BadSignature,
    );
    cases.push(
        "signature_bit_flipped_in_r",
        flipped(17, 0x80),
        Rejection::BadSignature,
    );
    cases.push(
        "signature_last_bit_flipped",
        flipped(63, 0x01),
        Rejection::BadSignature,
    );
    cases.push(
        "signature_zeroed",
        with_signature(&[0; 64]),
        Rejection::BadSignature,
    );
    cases.push(
        "signature_halves_swapped",
        with_signature(&[&real[32..], &real[..32]].concat()),
        Rejection::BadSignature,
    );
    // Ed25519 malleability: S + L is the same scalar modulo the group order L, so a
    // verifier that does not insist on S < L would accept a second encoding.
    cases.push(
        "signature_s_plus_group_order",
        with_signature(&[&real[..32], &add_le(&real[32..], &ED25519_ORDER)].concat()),
        Rejection::BadSignature,
    );
    let (_, _, other_signature) = segments(&other.token);
    cases.push(
        "signature_grafted_from_a_cached_token",
        format!("{header}.{payload}.{other_signature}"),
        Rejection::BadSignature,
    );
    let (_, other_payload, _) = segments(&other.token);
    cases.push(
        "payload_grafted_from_another_token",
        format!("{header}.{other_payload}.{signature}"),
        Rejection::BadSignature,
    );
    cases.push(
        "signature_truncated_to_63_bytes",
        with_signature(&real[..63]),
        malformed(Malformed::SignatureLength),
    );
    cases.push(
        "signature_extended_to_65_bytes",
        with_signature(&[&real[..], &[0]].concat()),
        malformed(Malformed::SignatureLength),
    );
    // The same signature bytes in a non-canonical encoding (trailing bits set): a parser
    // that accepted it would let anyone mint new token strings from a real one.
    let last = signature.chars().last().unwrap();
    let alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let index = alphabet.find(last).unwrap();
    assert_eq!(
        index & 0b11,
        0,
        "a canonical last character has zero trailing bits"
    );
    let noncanonical = alphabet.as_bytes()[index | 0b01] as char;
    cases.push(
        "signature_non_canonical_base64",
        format!(
            "{header}.{payload}.{}{noncanonical}",
            &signature[..signature.len() - 1]
        ),
        malformed(Malformed::Base64),
    );
    cases.push(
        "typ_changed_to_jwt",
        format!(
            "{}.{payload}.{signature}",
            b64(String::from_utf8(decode(header))
                .unwrap()
                .replace("at+jwt", "JWT")
                .as_bytes())
        ),
        Rejection::WrongType,
    );

    run(&app, &cases).await;
    control.assert_accepted(&app).await;
    other.assert_accepted(&app).await;
    app.stop().await;
}

// ---------------------------------------------------------------------------------------
// Shapes

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_shapes_are_refused() {
    let app = spawn_app().await;
    let kit = Kit::new(&app).await;
    let control = Control::issue(&app);
    control.assert_accepted(&app).await;
    let good = control.token.clone();
    let (header, payload, signature) = segments(&good);
    let mut cases = Cases::default();

    cases.push("empty", "", malformed(Malformed::Segments));
    cases.push("only_dots", "..", malformed(Malformed::Segments));
    cases.push(
        "two_segments",
        format!("{header}.{payload}"),
        malformed(Malformed::Segments),
    );
    cases.push(
        "empty_payload_segment",
        format!("{header}..{signature}"),
        malformed(Malformed::Segments),
    );
    cases.push(
        "four_segments_trailing_dot",
        format!("{good}."),
        malformed(Malformed::Segments),
    );
    cases.push(
        "four_segments",
        format!("{good}.{signature}"),
        malformed(Malformed::Segments),
    );
    let jwe_header = b64(json!({"alg": "dir", "enc": "A256GCM", "kid": kit.kid})
        .to_string()
        .as_bytes());
    cases.push(
        "jwe_five_segments_direct",
        format!(
            "{jwe_header}..{}.{}.{}",
            b64(&[7; 12]),
            b64(b"ciphertext"),
            b64(&[9; 16])
        ),
        malformed(Malformed::Segments),
    );
    cases.push(
        "jwe_five_segments_all_present",
        format!(
            "{jwe_header}.{}.{}.{}.{}",
            b64(&[1; 32]),
            b64(&[7; 12]),
            b64(b"ciphertext"),
            b64(&[9; 16])
        ),
        malformed(Malformed::Segments),
    );
    let json_serialisation =
        json!({"payload": payload, "protected": header, "signature": signature});
    cases.push(
        "jws_json_serialisation",
        json_serialisation.to_string(),
        malformed(Malformed::Segments),
    );
    cases.push(
        "whitespace_leading",
        format!(" {good}"),
        malformed(Malformed::Base64),
    );
    cases.push(
        "whitespace_trailing",
        format!("{good} "),
        malformed(Malformed::SignatureLength),
    );
    cases.push(
        "whitespace_both_sides",
        format!(" {good} "),
        malformed(Malformed::SignatureLength),
    );
    cases.push(
        "trailing_newline",
        format!("{good}\n"),
        malformed(Malformed::SignatureLength),
    );
    cases.push(
        "bearer_prefix_inside_the_token",
        format!("Bearer {good}"),
        malformed(Malformed::Base64),
    );
    cases.push(
        "header_padded_with_equals",
        format!("{header}=.{payload}.{signature}"),
        malformed(Malformed::Base64),
    );
    cases.push(
        "payload_padded_with_equals",
        format!("{header}.{payload}==.{signature}"),
        malformed(Malformed::Base64),
    );
    cases.push(
        "signature_padded_with_equals",
        format!("{good}=="),
        malformed(Malformed::SignatureLength),
    );
    cases.push(
        "payload_standard_base64_plus",
        format!("{header}.+{}.{signature}", &payload[1..]),
        malformed(Malformed::Base64),
    );
    cases.push(
        "signature_standard_base64_slash",
        format!("{header}.{payload}./{}", &signature[1..]),
        malformed(Malformed::Base64),
    );
    cases.push(
        "header_char_outside_base64",
        format!("*{}.{payload}.{signature}", &header[1..]),
        malformed(Malformed::Base64),
    );
    cases.push(
        "header_non_ascii",
        format!("é{}.{payload}.{signature}", &header[2..]),
        malformed(Malformed::Base64),
    );
    cases.push(
        "header_oversized",
        kit.forge_header(|h| _ = h.insert("kid".into(), json!("k".repeat(400)))),
        malformed(Malformed::HeaderTooLong),
    );
    cases.push(
        "payload_oversized_but_signed_by_us",
        sign(
            &app,
            &AccessClaims {
                scope: Some("s".repeat(1600)),
                ..valid_claims(&app)
            },
        ),
        malformed(Malformed::PayloadTooLong),
    );
    cases.push(
        "over_8_kib_filler",
        "a".repeat(8 * 1024 + 1),
        malformed(Malformed::TooLong),
    );
    cases.push(
        "over_8_kib_three_segments",
        format!("{header}.{}.{signature}", "A".repeat(8 * 1024)),
        malformed(Malformed::TooLong),
    );
    cases.push(
        "header_not_json",
        assemble("alg=EdDSA", &kit.payload(), &[0; 64]),
        malformed(Malformed::Header),
    );
    cases.push(
        "header_json_array",
        assemble(r#"["EdDSA","at+jwt"]"#, &kit.payload(), &[0; 64]),
        malformed(Malformed::Header),
    );
    cases.push(
        "header_empty_object",
        kit.forge("{}", &kit.payload()),
        malformed(Malformed::Header),
    );

    // Other secrets of ours, presented as access tokens.
    let paired = app.pair_device().await;
    cases
        .push(
            "refresh_token_live",
            paired.refresh_token.clone(),
            malformed(Malformed::Segments),
        )
        .introspected(Introspected::RefreshToken);
    cases.push(
        "refresh_token_unknown",
        format!("ghr_{}", b64(&[0x5a; 32])),
        malformed(Malformed::Segments),
    );
    // "ghr_" is itself base64url: it decodes to three stray bytes before our header.
    cases.push(
        "refresh_prefix_on_an_access_token",
        format!("ghr_{good}"),
        malformed(Malformed::Header),
    );
    let (_, pairing_secret) = app.open_pairing_session().await;
    cases.push(
        "pairing_secret",
        pairing_secret,
        malformed(Malformed::Segments),
    );
    // The admin token is refused as an access token, and as a bearer it is an admin.
    cases
        .push(
            "admin_token",
            app.admin_token(),
            malformed(Malformed::Segments),
        )
        .as_bearer = 200;
    cases.push(
        "device_id",
        paired.device_id.clone(),
        malformed(Malformed::Segments),
    );

    run(&app, &cases).await;
    control.assert_accepted(&app).await;
    app.stop().await;
}

// ---------------------------------------------------------------------------------------
// Header parameters

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_parameters_beyond_ours_are_refused() {
    let app = spawn_app().await;
    let kit = Kit::new(&app).await;
    let control = Control::issue(&app);
    control.assert_accepted(&app).await;
    let payload = kit.payload();
    let forger_jwk = json!({
        "kty": "OKP", "crv": "Ed25519", "x": b64(kit.local.public_key().as_ref()),
    });
    let mut cases = Cases::default();

    // Signed by the forger under the real kid: the header is the only thing a lenient
    // verifier would need to get wrong (a `jwk` or `jku` it trusted would name the
    // forger's key).
    for (name, parameter, value) in [
        ("crit_exp", "crit", json!(["exp"])),
        (
            "crit_unknown_extension",
            "crit",
            json!(["urn:example:must-understand"]),
        ),
        (
            "jku_attacker_url",
            "jku",
            json!("https://attacker.example/jwks.json"),
        ),
        (
            "x5u_attacker_url",
            "x5u",
            json!("https://attacker.example/cert.pem"),
        ),
        ("jwk_embedded_forger_key", "jwk", forger_jwk.clone()),
        ("x5c_chain", "x5c", json!(["MIIB"])),
        ("x5t_thumbprint", "x5t", json!("abc")),
        ("cty_nested_jwt", "cty", json!("JWT")),
        ("zip_deflate", "zip", json!("DEF")),
        ("enc_jwe_parameter", "enc", json!("A256GCM")),
        ("b64_false", "b64", json!(false)),
    ] {
        cases.push(
            name,
            kit.forge_header(|h| _ = h.insert(parameter.into(), value)),
            malformed(Malformed::Header),
        );
    }
    cases.push(
        "crit_with_b64_false",
        kit.forge_header(|h| {
            h.insert("crit".into(), json!(["b64"]));
            h.insert("b64".into(), json!(false));
        }),
        malformed(Malformed::Header),
    );
    // Duplicate parameters: the second one is what a last-wins parser would use.
    let ours = kit.header_with(|_| {});
    for (name, text) in [
        (
            "header_duplicate_alg",
            ours.replacen('{', r#"{"alg":"none","#, 1),
        ),
        (
            "header_duplicate_kid",
            ours.replacen('{', r#"{"kid":"../../etc/passwd","#, 1),
        ),
        (
            "header_duplicate_typ",
            ours.replacen('{', r#"{"typ":"JWT","#, 1),
        ),
        // The same name spelt with a JSON escape is the same parameter.
        (
            "header_duplicate_alg_escaped",
            ours.replacen('{', r#"{"\u0061lg":"none","#, 1),
        ),
        ("header_utf8_bom", format!("\u{feff}{ours}")),
        ("header_trailing_garbage", format!("{ours}x")),
        ("header_two_objects", format!("{ours}{{}}")),
    ] {
        cases.push(
            name,
            kit.forge(&text, &payload),
            malformed(Malformed::Header),
        );
    }
    for (name, value) in [
        ("typ_jwt", "JWT"),
        ("typ_jose", "JOSE"),
        ("typ_empty", ""),
        ("typ_refresh_like", "rt+jwt"),
    ] {
        cases.push(
            name,
            kit.forge_header(|h| _ = h.insert("typ".into(), json!(value))),
            Rejection::WrongType,
        );
    }
    cases.push(
        "typ_missing",
        kit.forge_header(|h| _ = h.remove("typ")),
        malformed(Malformed::Header),
    );
    cases.push(
        "typ_null",
        kit.forge_header(|h| _ = h.insert("typ".into(), Value::Null)),
        malformed(Malformed::Header),
    );

    run(&app, &cases).await;
    control.assert_accepted(&app).await;
    app.stop().await;
}

// ---------------------------------------------------------------------------------------
// Tokens that were valid: time, keys, devices

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_token_is_refused_once_exp_plus_leeway_has_passed() {
    let app = spawn_app().await;
    let paired = app.pair_device().await;
    let tokens = &app.running.services.tokens;
    let verified = tokens.verify(&paired.access_token).expect("fresh token");
    assert_eq!(verified.claims.exp, NOW_S + ACCESS_TTL_S);
    let leeway_ms = u64::try_from(tokens.settings().leeway.as_millis()).unwrap();
    assert_eq!(leeway_ms, 30_000, "default leeway");
    let deadline_ms = verified.claims.exp * 1000 + leeway_ms;

    // The last millisecond of the leeway: still accepted.
    app.clock.advance_ms(deadline_ms - 1 - TEST_NOW_MS);
    tokens
        .verify(&paired.access_token)
        .expect("accepted inside the leeway");
    assert_eq!(app.introspect(&paired.access_token).await["active"], true);

    app.clock.advance_ms(1);
    let mut cases = Cases::default();
    cases.push(
        "expired_real_token",
        paired.access_token.clone(),
        Rejection::Expired,
    );
    run(&app, &cases).await;
    // Fresh tokens at the new time are fine: the clock moved, not the rules.
    Control::issue(&app).assert_accepted(&app).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_of_a_retired_key_are_refused() {
    let app = spawn_app().await;
    let keys = &app.running.services.keys;
    let tokens = &app.running.services.tokens;
    let old_kid = kid_in_state(&app, KeyState::Active);
    // The longest lifetime the server accepts (the access TTL plus the leeway), so that
    // only the key can be the reason once the window closes.
    let settings = tokens.settings().clone();
    let long_lived = || AccessClaims {
        exp: NOW_S + settings.access_ttl.as_secs() + settings.leeway.as_secs(),
        ..valid_claims(&app)
    };
    let seen = sign(&app, &long_lived());
    let unseen = sign(&app, &long_lived());
    let ordinary = sign(&app, &valid_claims(&app));
    tokens
        .verify(&seen)
        .expect("accepted while its key is active");

    let first = keys
        .rotate(Rotation::Now, &gatehouse::audit::Origin::operator())
        .await
        .unwrap();
    assert_eq!(first.retiring.as_deref(), Some(old_kid.as_str()));
    let second = keys
        .rotate(Rotation::Now, &gatehouse::audit::Origin::operator())
        .await
        .unwrap();
    assert_ne!(second.activated, old_kid);
    assert!(
        keys.list()
            .iter()
            .any(|k| k.kid == old_kid && k.state == KeyState::Retiring)
    );
    tokens
        .verify(&seen)
        .expect("a retiring key still verifies inside its window");

    // The window is the access lifetime plus the leeway; at its last millisecond the
    // old key still verifies, one millisecond later it does not.
    let window_ms = u64::try_from(tokens.settings().access_window().as_millis()).unwrap();
    app.clock.advance_ms(window_ms - 1);
    tokens
        .verify(&seen)
        .expect("still inside the retiring window");
    app.clock.advance_ms(1);

    let control = Control::issue(&app);
    control.assert_accepted(&app).await;
    // The maintenance task may already have deleted the key (then it is unknown).
    let gone = [Rejection::KeyNotUsable, Rejection::UnknownKey];
    let mut cases = Cases::default();
    cases.push_one_of("retired_key_token_seen_before", seen.clone(), &gone);
    cases.push_one_of("retired_key_token_never_seen", unseen, &gone);
    cases.push_one_of("retired_key_ordinary_token", ordinary, &gone);
    run(&app, &cases).await;

    // A third rotation deletes it for good: unknown, and gone from the JWKS.
    let third = keys
        .rotate(Rotation::Now, &gatehouse::audit::Origin::operator())
        .await
        .unwrap();
    assert!(keys.list().iter().all(|k| k.kid != old_kid), "{third:?}");
    assert!(published(&jwks(&app).await, &old_kid).is_none());
    let mut cases = Cases::default();
    cases.push("deleted_key_token", seen, Rejection::UnknownKey);
    run(&app, &cases).await;
    control.assert_accepted(&app).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_of_a_revoked_key_are_refused() {
    let app = spawn_app().await;
    let keys = &app.running.services.keys;
    let tokens = &app.running.services.tokens;
    let kid = kid_in_state(&app, KeyState::Active);
    let seen = sign(&app, &valid_claims(&app));
    let unseen = sign(&app, &valid_claims(&app));
    tokens
        .verify(&seen)
        .expect("accepted before the revocation");
    assert!(published(&jwks(&app).await, &kid).is_some());

    let info = keys
        .revoke(&kid, &gatehouse::audit::Origin::operator())
        .await
        .unwrap();
    assert_eq!(info.state, KeyState::Revoked);
    assert!(published(&jwks(&app).await, &kid).is_none());
    assert_ne!(
        kid_in_state(&app, KeyState::Active),
        kid,
        "a replacement is active"
    );

    let control = Control::issue(&app);
    control.assert_accepted(&app).await;
    let mut cases = Cases::default();
    cases.push(
        "revoked_key_token_seen_before",
        seen,
        Rejection::KeyNotUsable,
    );
    cases.push(
        "revoked_key_token_never_seen",
        unseen,
        Rejection::KeyNotUsable,
    );
    run(&app, &cases).await;
    control.assert_accepted(&app).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_of_a_revoked_device_are_refused() {
    let app = spawn_app().await;
    let tokens = &app.running.services.tokens;
    let by_http = app.pair_device().await;
    let by_service = app.pair_device().await;
    let bystander = app.pair_device().await;
    for paired in [&by_http, &by_service, &bystander] {
        tokens.verify(&paired.access_token).expect("fresh token");
    }
    let http_device = DeviceId::parse(&by_http.device_id).unwrap();
    // A token the device never held, signed after the revocation: the device, not the
    // token, is what is revoked.
    let later_claims = |sub: DeviceId| AccessClaims {
        sub,
        ..valid_claims(&app)
    };

    let response = app
        .client()
        .delete(app.url(&format!("/v1/devices/{}", by_http.device_id)))
        .bearer_auth(app.admin_token())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let service_device = DeviceId::parse(&by_service.device_id).unwrap();
    app.running
        .services
        .devices
        .revoke(&service_device, &gatehouse::audit::Origin::operator())
        .await
        .unwrap();

    let mut cases = Cases::default();
    cases.push(
        "revoked_device_via_http",
        by_http.access_token.clone(),
        Rejection::Revoked,
    );
    cases.push(
        "revoked_device_via_service",
        by_service.access_token.clone(),
        Rejection::Revoked,
    );
    cases.push(
        "revoked_device_token_signed_afterwards",
        sign(&app, &later_claims(http_device)),
        Rejection::Revoked,
    );
    cases.push(
        "revoked_device_refresh_token",
        by_http.refresh_token.clone(),
        malformed(Malformed::Segments),
    );
    run(&app, &cases).await;

    // Another device is untouched.
    tokens
        .verify(&bystander.access_token)
        .expect("a bystander device keeps working");
    assert_eq!(
        app.introspect(&bystander.access_token).await["active"],
        true
    );
    app.stop().await;
}

// ---------------------------------------------------------------------------------------
// ES256

/// The order n of the P-256 group: (r, s) = (n, n) is (0, 0) modulo n.
const P256_ORDER: [u8; 32] = [
    0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    0xbc, 0xe6, 0xfa, 0xad, 0xa7, 0x17, 0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2, 0xfc, 0x63, 0x25, 0x51,
];

/// A fixed-size (r ‖ s) ECDSA signature in ASN.1 DER, as some libraries emit it.
fn der_signature(fixed: &[u8]) -> Vec<u8> {
    let integer = |bytes: &[u8]| {
        let start = bytes
            .iter()
            .position(|b| *b != 0)
            .unwrap_or(bytes.len() - 1);
        let mut value = bytes[start..].to_vec();
        if value[0] & 0x80 != 0 {
            value.insert(0, 0);
        }
        [vec![0x02, u8::try_from(value.len()).unwrap()], value].concat()
    };
    let (r, s) = fixed.split_at(32);
    let body = [integer(r), integer(s)].concat();
    [vec![0x30, u8::try_from(body.len()).unwrap()], body].concat()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn es256_signature_forgeries_are_refused() {
    let app = helpers::spawn_app_with(&[
        ("GATEHOUSE_KEY_ALGORITHM", "ES256"),
        ("GATEHOUSE_LOCKOUT_MAX_FAILURES", "10000"),
        ("GATEHOUSE_RATELIMIT_ADMIN_LOGIN", "off"),
    ])
    .await;
    let eddsa_app = spawn_app().await;
    let kit = Kit::new(&app).await;
    assert_eq!(kit.alg, "ES256");
    assert_eq!(kit.jwk["crv"], "P-256");
    let control = Control::issue(&app);
    control.assert_accepted(&app).await;
    let (header, payload, signature) = segments(&control.token);
    let real = decode(signature);
    let with_signature = |bytes: &[u8]| format!("{header}.{payload}.{}", b64(bytes));
    let mut cases = Cases::default();

    cases.push(
        "es256_r_s_zero",
        with_signature(&[0; 64]),
        Rejection::BadSignature,
    );
    cases.push(
        "es256_r_s_equal_to_the_group_order",
        with_signature(&[P256_ORDER, P256_ORDER].concat()),
        Rejection::BadSignature,
    );
    cases.push(
        "es256_r_zero_real_s",
        with_signature(&[&[0; 32], &real[32..]].concat()),
        Rejection::BadSignature,
    );
    cases.push(
        "es256_real_r_s_zero",
        with_signature(&[&real[..32], &[0; 32]].concat()),
        Rejection::BadSignature,
    );
    cases.push(
        "es256_r_s_all_ones",
        with_signature(&[0xff; 64]),
        Rejection::BadSignature,
    );
    cases.push(
        "es256_signature_in_der",
        with_signature(&der_signature(&real)),
        malformed(Malformed::SignatureLength),
    );
    let ours = kit.header_with(|_| {});
    let claims = kit.payload();
    cases.push(
        "es256_zero_signature_over_fresh_claims",
        assemble(&ours, &claims, &[0; 64]),
        Rejection::BadSignature,
    );
    cases.push(
        "alg_eddsa_on_an_es256_key",
        kit.forge_header(|h| _ = h.insert("alg".into(), json!("EdDSA"))),
        Rejection::AlgorithmMismatch,
    );
    let point = kit.public_key_bytes();
    let uncompressed = [&[4u8][..], &point].concat();
    cases.push(
        "hs256_ec_point_as_secret",
        hmac_token(
            &kit.header_with(|h| _ = h.insert("alg".into(), json!("HS256"))),
            &claims,
            ring::hmac::HMAC_SHA256,
            &uncompressed,
        ),
        malformed(Malformed::SignatureLength),
    );
    cases.push(
        "hs512_ec_point_as_secret",
        hmac_token(
            &kit.header_with(|h| _ = h.insert("alg".into(), json!("HS512"))),
            &claims,
            ring::hmac::HMAC_SHA512,
            &uncompressed,
        ),
        Rejection::AlgorithmMismatch,
    );
    // Real tokens of another instance: a key it does not hold.
    cases.push(
        "token_of_another_instance",
        sign(&eddsa_app, &valid_claims(&eddsa_app)),
        Rejection::UnknownKey,
    );

    run(&app, &cases).await;
    control.assert_accepted(&app).await;

    // And the other way round.
    let mut cases = Cases::default();
    cases.push(
        "es256_token_at_an_eddsa_instance",
        control.token.clone(),
        Rejection::UnknownKey,
    );
    run(&eddsa_app, &cases).await;
    app.stop().await;
    eddsa_app.stop().await;
}

/// A claim this server never issues (`scope`) is not repeated by introspection, even on
/// a token its own key signed.
#[tokio::test]
async fn introspection_repeats_no_claim_the_server_never_issues() {
    let app = spawn_app().await;
    let claims = AccessClaims {
        scope: Some("admin".into()),
        ..valid_claims(&app)
    };
    let token = sign(&app, &claims);
    let answer = app.introspect(&token).await;
    assert_eq!(answer["active"], true, "{answer}");
    assert!(answer.get("scope").is_none(), "{answer}");
    app.stop().await;
}
