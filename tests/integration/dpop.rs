//! DPoP (RFC 9449) at the token endpoint and at pairing: a device that sends a proof gets
//! tokens bound to its key (`token_type: DPoP`, `cnf.jkt`), its family refreshes only with
//! a proof by that key, and every proof is checked: signature, method, URL, age, replay,
//! and a header that holds nothing else. Proofs are made here with ring, as a device
//! would (Ed25519 and P-256); `tests/e2e/device_grant.mjs` makes them with oauth4webapi.

use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _,
};
use serde_json::{Value, json};

use crate::helpers::{self, TestApp};

fn b64(bytes: &[u8]) -> String {
    data_encoding::BASE64URL_NOPAD.encode(bytes)
}

fn sha256_b64(bytes: &[u8]) -> String {
    b64(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

/// A device's own key pair, as a DPoP client holds it.
pub(crate) enum DeviceKey {
    Ed25519(Ed25519KeyPair),
    P256(EcdsaKeyPair),
}

impl DeviceKey {
    pub(crate) fn ed25519() -> Self {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        Self::Ed25519(Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap())
    }

    pub(crate) fn p256() -> Self {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        Self::P256(
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
                .unwrap(),
        )
    }

    fn alg(&self) -> &'static str {
        match self {
            Self::Ed25519(_) => "EdDSA",
            Self::P256(_) => "ES256",
        }
    }

    fn jwk(&self) -> Value {
        match self {
            Self::Ed25519(pair) => {
                json!({"kty": "OKP", "crv": "Ed25519", "x": b64(pair.public_key().as_ref())})
            }
            Self::P256(pair) => {
                let point = pair.public_key().as_ref();
                json!({"kty": "EC", "crv": "P-256", "x": b64(&point[1..33]), "y": b64(&point[33..65])})
            }
        }
    }

    /// RFC 7638's thumbprint, computed independently of the server's code.
    pub(crate) fn jkt(&self) -> String {
        let jwk = self.jwk();
        let canonical = match self {
            Self::Ed25519(_) => format!(r#"{{"crv":"Ed25519","kty":"OKP","x":{}}}"#, jwk["x"]),
            Self::P256(_) => format!(
                r#"{{"crv":"P-256","kty":"EC","x":{},"y":{}}}"#,
                jwk["x"], jwk["y"]
            ),
        };
        sha256_b64(canonical.as_bytes())
    }

    fn sign(&self, message: &[u8]) -> Vec<u8> {
        match self {
            Self::Ed25519(pair) => pair.sign(message).as_ref().to_vec(),
            Self::P256(pair) => pair
                .sign(&SystemRandom::new(), message)
                .unwrap()
                .as_ref()
                .to_vec(),
        }
    }

    /// A compact JWS of `header` and `claims`, signed by this key.
    pub(crate) fn jws(&self, header: &Value, claims: &Value) -> String {
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let signature = self.sign(input.as_bytes());
        format!("{input}.{}", b64(&signature))
    }

    /// A proof for `method` `url` made at `iat` (seconds), for `access_token` if any.
    pub(crate) fn proof_at(
        &self,
        method: &str,
        url: &str,
        iat: u64,
        access_token: Option<&str>,
    ) -> String {
        self.proof_with_nonce(method, url, iat, access_token, None)
    }

    /// The same, with the server's `nonce`.
    pub(crate) fn proof_with_nonce(
        &self,
        method: &str,
        url: &str,
        iat: u64,
        access_token: Option<&str>,
        nonce: Option<&str>,
    ) -> String {
        let header = json!({"typ": "dpop+jwt", "alg": self.alg(), "jwk": self.jwk()});
        let mut claims = json!({
            "jti": b64(&rand_bytes()),
            "htm": method,
            "htu": url,
            "iat": iat,
        });
        if let Some(token) = access_token {
            claims["ath"] = json!(sha256_b64(token.as_bytes()));
        }
        if let Some(nonce) = nonce {
            claims["nonce"] = json!(nonce);
        }
        self.jws(&header, &claims)
    }
}

fn rand_bytes() -> [u8; 16] {
    let mut out = [0u8; 16];
    ring::rand::SecureRandom::fill(&SystemRandom::new(), &mut out).unwrap();
    out
}

fn now_s(app: &TestApp) -> u64 {
    use gatehouse::clock::Clock as _;
    app.clock.now_ms() / 1000
}

fn issuer(app: &TestApp) -> String {
    app.running.services.tokens.settings().issuer.clone()
}

fn proof(app: &TestApp, key: &DeviceKey, path: &str) -> String {
    key.proof_at("POST", &format!("{}{path}", issuer(app)), now_s(app), None)
}

/// `POST /v1/pair` for a fresh session, with `proof` as the DPoP header if any.
async fn pair_with(app: &TestApp, proof: Option<String>) -> (u16, Value) {
    let (session_id, secret) = app.open_pairing_session().await;
    let mut request = app.client().post(app.url("/v1/pair")).json(&json!({
        "session_id": session_id,
        "secret": secret,
        "device": {"name": "Pixel", "platform": "android", "app_version": "1.0"},
    }));
    if let Some(proof) = proof {
        request = request.header("DPoP", proof);
    }
    let response = request.send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

async fn refresh_with(app: &TestApp, token: &str, proof: Option<String>) -> (u16, Value) {
    let mut request = app
        .client()
        .post(app.url("/v1/token"))
        .form(&[("grant_type", "refresh_token"), ("refresh_token", token)]);
    if let Some(proof) = proof {
        request = request.header("DPoP", proof);
    }
    let response = request.send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

fn claims_of(token: &str) -> Value {
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(
        &data_encoding::BASE64URL_NOPAD
            .decode(payload.as_bytes())
            .unwrap(),
    )
    .unwrap()
}

#[tokio::test]
async fn a_device_that_pairs_with_a_proof_gets_tokens_bound_to_its_key() {
    let app = helpers::spawn_app().await;
    for key in [DeviceKey::ed25519(), DeviceKey::p256()] {
        let (status, pair) = pair_with(&app, Some(proof(&app, &key, "/v1/pair"))).await;
        assert_eq!(status, 200, "{pair}");
        assert_eq!(pair["token_type"], "DPoP");
        let access = pair["access_token"].as_str().unwrap();
        assert_eq!(claims_of(access)["cnf"], json!({"jkt": key.jkt()}));
        let introspected = app.introspect(access).await;
        assert_eq!(introspected["active"], true);
        assert_eq!(introspected["cnf"], json!({"jkt": key.jkt()}));

        // The family refreshes only with a proof by the same key; a refusal spends
        // nothing.
        let refresh = pair["refresh_token"].as_str().unwrap();
        let (status, body) = refresh_with(&app, refresh, None).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("invalid_dpop_proof"))
        );
        let other = DeviceKey::ed25519();
        let (status, body) =
            refresh_with(&app, refresh, Some(proof(&app, &other, "/v1/token"))).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("invalid_dpop_proof"))
        );
        let (status, next) =
            refresh_with(&app, refresh, Some(proof(&app, &key, "/v1/token"))).await;
        assert_eq!(status, 200, "{next}");
        assert_eq!(next["token_type"], "DPoP");
        assert_eq!(
            claims_of(next["access_token"].as_str().unwrap())["cnf"]["jkt"],
            key.jkt()
        );
    }
    let failures = app.audit_events("token.refresh_failed");
    assert!(
        failures
            .iter()
            .any(|e| e.details["reason"] == "no proof by the bound key"),
        "{failures:?}"
    );

    // Without a proof, pairing is as before: a bearer pair without `cnf`.
    let (status, pair) = pair_with(&app, None).await;
    assert_eq!(status, 200);
    assert_eq!(pair["token_type"], "Bearer");
    assert_eq!(
        claims_of(pair["access_token"].as_str().unwrap()).get("cnf"),
        None
    );
}

#[tokio::test]
async fn every_proof_is_checked_for_this_request_and_used_once() {
    let app = helpers::spawn_app().await;
    let key = DeviceKey::ed25519();
    let url = format!("{}/v1/pair", issuer(&app));
    let now = now_s(&app);
    let bad_proofs: Vec<(&str, String)> = vec![
        ("another method", key.proof_at("PUT", &url, now, None)),
        (
            "another URL",
            key.proof_at("POST", &format!("{}/v1/token", issuer(&app)), now, None),
        ),
        ("made long ago", key.proof_at("POST", &url, now - 120, None)),
        (
            "made in the future",
            key.proof_at("POST", &url, now + 120, None),
        ),
        ("not a JWS", "not.a.proof".to_string()),
        (
            "a private key in the header",
            key.jws(
                &json!({"typ": "dpop+jwt", "alg": "EdDSA",
                        "jwk": {"kty": "OKP", "crv": "Ed25519", "x": key.jwk()["x"], "d": "AAAA"}}),
                &json!({"jti": "j1", "htm": "POST", "htu": url, "iat": now}),
            ),
        ),
        (
            "another typ",
            key.jws(
                &json!({"typ": "JWT", "alg": "EdDSA", "jwk": key.jwk()}),
                &json!({"jti": "j2", "htm": "POST", "htu": url, "iat": now}),
            ),
        ),
        (
            "alg none",
            key.jws(
                &json!({"typ": "dpop+jwt", "alg": "none", "jwk": key.jwk()}),
                &json!({"jti": "j3", "htm": "POST", "htu": url, "iat": now}),
            ),
        ),
        (
            "an extra header parameter",
            key.jws(
                &json!({"typ": "dpop+jwt", "alg": "EdDSA", "jwk": key.jwk(), "kid": "x"}),
                &json!({"jti": "j4", "htm": "POST", "htu": url, "iat": now}),
            ),
        ),
        (
            "no jti",
            key.jws(
                &json!({"typ": "dpop+jwt", "alg": "EdDSA", "jwk": key.jwk()}),
                &json!({"htm": "POST", "htu": url, "iat": now}),
            ),
        ),
        ("a signature by another key", {
            let other = DeviceKey::ed25519();
            let header = json!({"typ": "dpop+jwt", "alg": "EdDSA", "jwk": key.jwk()});
            other.jws(
                &header,
                &json!({"jti": "j5", "htm": "POST", "htu": url, "iat": now}),
            )
        }),
    ];
    for (what, bad) in bad_proofs {
        let (status, body) = pair_with(&app, Some(bad)).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("invalid_dpop_proof")),
            "{what}: {body}"
        );
    }
    // The same proof twice: the second is a replay.
    let once = key.proof_at("POST", &url, now, None);
    assert_eq!(pair_with(&app, Some(once.clone())).await.0, 200);
    let (status, body) = pair_with(&app, Some(once)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_dpop_proof"))
    );
    assert!(
        body["message"].as_str().unwrap().contains("already used"),
        "{body}"
    );
    // Two DPoP headers.
    let (session_id, secret) = app.open_pairing_session().await;
    let response = app
        .client()
        .post(app.url("/v1/pair"))
        .header("DPoP", key.proof_at("POST", &url, now, None))
        .header("DPoP", key.proof_at("POST", &url, now, None))
        .json(&json!({"session_id": session_id, "secret": secret,
                      "device": {"name": "x", "platform": "y", "app_version": "1"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    // The URL the request was sent to (its Host) works as well as the issuer's.
    let direct = format!("{}/v1/pair", app.base_url);
    assert_eq!(
        pair_with(&app, Some(key.proof_at("POST", &direct, now, None)))
            .await
            .0,
        200
    );
}

#[tokio::test]
async fn require_dpop_refuses_pairings_and_device_grants_without_a_proof() {
    let app = helpers::spawn_app_with(&[("GATEHOUSE_REQUIRE_DPOP", "true")]).await;
    let key = DeviceKey::ed25519();
    let (status, body) = pair_with(&app, None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_dpop_proof"))
    );
    assert!(app.running.services.devices.list().unwrap().is_empty());
    let (status, pair) = pair_with(&app, Some(proof(&app, &key, "/v1/pair"))).await;
    assert_eq!(status, 200, "{pair}");
    assert_eq!(pair["token_type"], "DPoP");

    // The device code grant: approved, then polled without and with a proof.
    let grant: Value = app
        .client()
        .post(app.url("/v1/device_authorization"))
        .form(&[("client_id", "tv")])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let approved = app
        .client()
        .post(app.url("/v1/device_grants/approve"))
        .bearer_auth(app.admin_token())
        .json(&json!({"user_code": grant["user_code"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(approved.status(), 200);
    let poll = |proof: Option<String>| {
        let mut request = app.client().post(app.url("/v1/token")).form(&[
            ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
            ("device_code", grant["device_code"].as_str().unwrap()),
        ]);
        if let Some(proof) = proof {
            request = request.header("DPoP", proof);
        }
        request.send()
    };
    let refused = poll(None).await.unwrap();
    assert_eq!(refused.status(), 400);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"], "invalid_dpop_proof");
    app.clock.advance_ms(5_000);
    let tokens = poll(Some(proof(&app, &key, "/v1/token"))).await.unwrap();
    assert_eq!(tokens.status(), 200);
    let tokens: Value = tokens.json().await.unwrap();
    assert_eq!(tokens["token_type"], "DPoP");
    assert_eq!(
        claims_of(tokens["access_token"].as_str().unwrap())["cnf"]["jkt"],
        key.jkt()
    );
    let metadata: Value = app
        .client()
        .get(app.url("/.well-known/oauth-authorization-server"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        metadata["dpop_signing_alg_values_supported"],
        json!(["EdDSA", "ES256"])
    );
}

/// A trivial app on a loopback port: every request is 200 `app`.
async fn trivial_app() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = axum::Router::new().fallback(|| async { "app" });
    tokio::spawn(async move { axum::serve(listener, router).await });
    format!("http://{addr}")
}

async fn front_get(app: &TestApp, path: &str, auth: &str, proof: Option<String>) -> (u16, String) {
    let mut request = app
        .client()
        .get(app.url(path))
        .header("Authorization", auth);
    if let Some(proof) = proof {
        request = request.header("DPoP", proof);
    }
    let response = request.send().await.unwrap();
    let challenge = response
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let status = response.status().as_u16();
    let body = response.text().await.unwrap();
    (status, if status == 200 { body } else { challenge })
}

#[tokio::test]
async fn the_front_door_takes_a_bound_token_only_with_a_proof_by_its_key() {
    let upstream = trivial_app().await;
    let app = helpers::spawn_app_with(&[("GATEHOUSE_UPSTREAM", upstream.as_str())]).await;
    let key = DeviceKey::p256();
    let (_, pair) = pair_with(&app, Some(proof(&app, &key, "/v1/pair"))).await;
    let token = pair["access_token"].as_str().unwrap();
    let url = format!("{}/notes", app.base_url);
    let now = now_s(&app);
    let good = || key.proof_at("GET", &url, now, Some(token));

    // As Bearer, as DPoP without a proof, or with a proof that is not for this request.
    let refused: Vec<(&str, String, Option<String>)> = vec![
        ("as Bearer", format!("Bearer {token}"), Some(good())),
        ("no proof", format!("DPoP {token}"), None),
        (
            "a proof for another URL",
            format!("DPoP {token}"),
            Some(key.proof_at("GET", &format!("{}/other", app.base_url), now, Some(token))),
        ),
        (
            "a proof without ath",
            format!("DPoP {token}"),
            Some(key.proof_at("GET", &url, now, None)),
        ),
        (
            "a proof for another token",
            format!("DPoP {token}"),
            Some(key.proof_at("GET", &url, now, Some("another token"))),
        ),
        (
            "a proof by another key",
            format!("DPoP {token}"),
            Some(DeviceKey::p256().proof_at("GET", &url, now, Some(token))),
        ),
        (
            "a POST proof",
            format!("DPoP {token}"),
            Some(key.proof_at("POST", &url, now, Some(token))),
        ),
    ];
    for (what, auth, proof) in refused {
        let (status, challenge) = front_get(&app, "/notes", &auth, proof).await;
        assert_eq!(status, 401, "{what}");
        assert!(
            challenge.starts_with("DPoP ") && challenge.contains("invalid_dpop_proof"),
            "{what}: {challenge}"
        );
    }
    let once = good();
    let (status, body) =
        front_get(&app, "/notes", &format!("DPoP {token}"), Some(once.clone())).await;
    assert_eq!((status, body.as_str()), (200, "app"));
    let (status, _) = front_get(&app, "/notes", &format!("DPoP {token}"), Some(once)).await;
    assert_eq!(status, 401, "a proof is used once");

    // An unbound token: as Bearer, as before; as DPoP, refused.
    let (_, bearer) = pair_with(&app, None).await;
    let unbound = bearer["access_token"].as_str().unwrap();
    let (status, _) = front_get(&app, "/notes", &format!("Bearer {unbound}"), None).await;
    assert_eq!(status, 200);
    let (status, _) = front_get(
        &app,
        "/notes",
        &format!("DPoP {unbound}"),
        Some(key.proof_at("GET", &url, now, Some(unbound))),
    )
    .await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn forward_auth_checks_a_bound_tokens_proof_against_the_original_request() {
    let trusted = helpers::spawn_app_with(&[("GATEHOUSE_TRUSTED_PROXIES", "127.0.0.1/32")]).await;
    let key = DeviceKey::ed25519();
    let (_, pair) = pair_with(&trusted, Some(proof(&trusted, &key, "/v1/pair"))).await;
    let token = pair["access_token"].as_str().unwrap().to_string();
    let device = pair["device_id"].as_str().unwrap().to_string();
    let now = now_s(&trusted);
    let original = "https://app.example/notes";
    let check = |app: &TestApp, auth: String, proof: Option<String>| {
        let mut request = app
            .client()
            .get(app.url("/v1/authz"))
            .header("Authorization", auth)
            .header("X-Forwarded-Method", "GET")
            .header("X-Forwarded-Proto", "https")
            .header("X-Forwarded-Host", "app.example")
            .header("X-Forwarded-Uri", "/notes?page=2");
        if let Some(proof) = proof {
            request = request.header("DPoP", proof);
        }
        request.send()
    };
    let allowed = check(
        &trusted,
        format!("DPoP {token}"),
        Some(key.proof_at("GET", original, now, Some(&token))),
    )
    .await
    .unwrap();
    assert_eq!(allowed.status(), 200);
    assert_eq!(
        allowed.headers()["x-gatehouse-device-id"].to_str().unwrap(),
        device
    );
    for (what, auth, proof) in [
        (
            "as Bearer",
            format!("Bearer {token}"),
            Some(key.proof_at("GET", original, now, Some(&token))),
        ),
        (
            "a proof for gatehouse's own URL",
            format!("DPoP {token}"),
            Some(key.proof_at("GET", &trusted.url("/v1/authz"), now, Some(&token))),
        ),
    ] {
        let refused = check(&trusted, auth, proof).await.unwrap();
        assert_eq!(refused.status(), 401, "{what}");
        let body: Value = refused.json().await.unwrap();
        assert_eq!(body["error"], "invalid_dpop_proof", "{what}");
    }
    let metrics = trusted.metrics().await;
    assert!(
        metrics.contains(r#"gatehouse_authz_checks_total{outcome="invalid_dpop_proof"} 2"#),
        "{metrics}"
    );

    // From a peer that is not a trusted proxy the original request is unknown: a bound
    // token cannot be checked, so it is refused.
    let untrusted = helpers::spawn_app().await;
    let (_, pair) = pair_with(&untrusted, Some(proof(&untrusted, &key, "/v1/pair"))).await;
    let token = pair["access_token"].as_str().unwrap().to_string();
    let refused = check(
        &untrusted,
        format!("DPoP {token}"),
        Some(key.proof_at("GET", original, now_s(&untrusted), Some(&token))),
    )
    .await
    .unwrap();
    assert_eq!(refused.status(), 401);
}

#[tokio::test]
async fn with_nonces_on_every_proof_carries_a_fresh_one_from_any_start() {
    let upstream = trivial_app().await;
    let env = [
        ("GATEHOUSE_DPOP_NONCE", "true"),
        ("GATEHOUSE_UPSTREAM", upstream.as_str()),
    ];
    let app = helpers::spawn_app_with(&env).await;
    let key = DeviceKey::ed25519();
    let pair_url = format!("{}/v1/pair", issuer(&app));
    let pair_once = |proof: String| {
        let app = &app;
        async move {
            let (session_id, secret) = app.open_pairing_session().await;
            app.client()
                .post(app.url("/v1/pair"))
                .header("DPoP", proof)
                .json(&json!({"session_id": session_id, "secret": secret,
                              "device": {"name": "x", "platform": "y", "app_version": "1"}}))
                .send()
                .await
                .unwrap()
        }
    };
    // Without a nonce: refused, with the one to use.
    let refused = pair_once(key.proof_at("POST", &pair_url, now_s(&app), None)).await;
    assert_eq!(refused.status(), 400);
    let nonce = refused.headers()["dpop-nonce"]
        .to_str()
        .unwrap()
        .to_string();
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"], "use_dpop_nonce");
    // A made-up nonce is no better.
    let forged = pair_once(key.proof_with_nonce(
        "POST",
        &pair_url,
        now_s(&app),
        None,
        Some("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"),
    ))
    .await;
    assert_eq!(forged.status(), 400);
    let paired =
        pair_once(key.proof_with_nonce("POST", &pair_url, now_s(&app), None, Some(&nonce))).await;
    assert_eq!(paired.status(), 200);
    assert!(paired.headers().contains_key("dpop-nonce"));
    let pair: Value = paired.json().await.unwrap();
    let token = pair["access_token"].as_str().unwrap().to_string();

    // The front door asks for one the same way, as a 401 challenge.
    let notes = format!("{}/notes", app.base_url);
    let (status, challenge) = front_get(
        &app,
        "/notes",
        &format!("DPoP {token}"),
        Some(key.proof_at("GET", &notes, now_s(&app), Some(&token))),
    )
    .await;
    assert_eq!(status, 401);
    assert!(
        challenge.contains(r#"error="use_dpop_nonce""#),
        "{challenge}"
    );
    let (status, body) = front_get(
        &app,
        "/notes",
        &format!("DPoP {token}"),
        Some(key.proof_with_nonce("GET", &notes, now_s(&app), Some(&token), Some(&nonce))),
    )
    .await;
    assert_eq!((status, body.as_str()), (200, "app"));

    // A nonce stays good through a restart (its key is in the store), for its period
    // and the next; two periods on, it is stale.
    let dir = app.stop().await;
    let app = helpers::spawn_app_in(dir, &env).await;
    let notes = format!("{}/notes", app.base_url);
    let (status, _) = front_get(
        &app,
        "/notes",
        &format!("DPoP {token}"),
        Some(key.proof_with_nonce("GET", &notes, now_s(&app), Some(&token), Some(&nonce))),
    )
    .await;
    assert_eq!(status, 200, "the nonce survives a restart");
    app.clock.advance_ms(600_001);
    let (status, challenge) = front_get(
        &app,
        "/notes",
        &format!("DPoP {token}"),
        Some(key.proof_with_nonce("GET", &notes, now_s(&app), Some(&token), Some(&nonce))),
    )
    .await;
    assert_eq!(status, 401, "ten minutes on, the nonce is stale");
    assert!(challenge.contains("use_dpop_nonce"), "{challenge}");
}
