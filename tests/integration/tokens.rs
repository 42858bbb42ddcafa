//! The token authority over real HTTP (in-process server, fixed clock): pairing sessions
//! and their one-time claim, the refresh grant with rotation and reuse detection, signing
//! key rotation and revocation, RFC 7009 revocation, device revocation, RFC 7662
//! introspection and who may call it, the RFC 8414 metadata, state that survives a
//! restart, and pruning of rows that can no longer matter.
//!
//! Time never passes by itself here: every expiry is reached by moving the test clock.

use std::collections::BTreeSet;

use gatehouse::keys::Rotation;
use reqwest::{Response, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{self, PairedDevice, TEST_NOW_MS, TestApp};
use gatehouse::clock::Clock as _;
use gatehouse::ids::FamilyId;
use gatehouse::revocation::Folded;
use gatehouse::store::records::{FamilyRevocation, TokenFamily};
use gatehouse::store::{FAMILY_REVOCATIONS, TOKEN_FAMILIES};

const MINUTE_MS: u64 = 60 * 1000;
/// Access-token lifetime plus leeway (15 min + 30 s): how long a retiring key verifies.
const ACCESS_WINDOW_MS: u64 = 15 * MINUTE_MS + 30 * 1000;
const REFRESH_TTL_MS: u64 = 7 * 24 * 60 * MINUTE_MS;

// ---------------------------------------------------------------------------------------
// Small helpers of this file

fn device_json(name: &str) -> Value {
    json!({"name": name, "platform": "android", "app_version": "1.0.0"})
}

/// `POST /v1/pair` with exactly this session, secret and device.
async fn post_pair(app: &TestApp, session_id: &str, secret: &str, device: Value) -> Response {
    app.client()
        .post(app.url("/v1/pair"))
        .json(&json!({"session_id": session_id, "secret": secret, "device": device}))
        .send()
        .await
        .expect("request")
}

/// `POST /v1/pairing/sessions` as `admin` with a JSON body.
async fn open_session_as(app: &TestApp, admin: &str, body: Value) -> Response {
    app.client()
        .post(app.url("/v1/pairing/sessions"))
        .bearer_auth(admin)
        .json(&body)
        .send()
        .await
        .expect("request")
}

/// Opens a session of `ttl_seconds` as `admin`: `(session_id, secret)`.
async fn open_session_with_ttl(app: &TestApp, admin: &str, ttl_seconds: u64) -> (String, String) {
    let response = open_session_as(app, admin, json!({"ttl_seconds": ttl_seconds})).await;
    assert_eq!(response.status(), 201);
    let session: Value = response.json().await.unwrap();
    (
        session["session_id"].as_str().unwrap().to_string(),
        session["secret"].as_str().unwrap().to_string(),
    )
}

/// `POST /v1/token` with the refresh grant.
async fn refresh(app: &TestApp, refresh_token: &str) -> Response {
    app.refresh(refresh_token).await
}

/// `POST /v1/token` with a raw form body.
async fn token_raw(app: &TestApp, body: &str) -> Response {
    app.client()
        .post(app.url("/v1/token"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body.to_string())
        .send()
        .await
        .expect("request")
}

async fn revoke(app: &TestApp, token: &str) -> Response {
    app.revoke(token).await
}

/// `/v1/introspect` with an explicit admin token (a restarted instance has no bootstrap).
async fn introspect_as(app: &TestApp, admin: &str, token: &str) -> Value {
    let response = app
        .client()
        .post(app.url("/v1/introspect"))
        .bearer_auth(admin)
        .form(&[("token", token)])
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

async fn active(app: &TestApp, token: &str) -> bool {
    let answer = app.introspect(token).await;
    answer["active"].as_bool().expect("active is a boolean")
}

/// Sends `request` as an introspection of `token`.
async fn introspect_request(request: reqwest::RequestBuilder, token: &str) -> Response {
    request
        .form(&[("token", token)])
        .send()
        .await
        .expect("request")
}

/// An error answer: its status, then its JSON body without the request id (which must
/// be present and differs per request).
async fn error_of(response: Response) -> (StatusCode, Value) {
    let status = response.status();
    assert_eq!(
        response.headers()["content-type"],
        "application/json",
        "error bodies are JSON"
    );
    let mut body: Value = response.json().await.unwrap();
    let request_id = body
        .as_object_mut()
        .and_then(|o| o.remove("request_id"))
        .expect("a request_id member");
    assert!(!request_id.as_str().unwrap_or("").is_empty(), "{body}");
    (status, body)
}

/// The JOSE header of a compact JWS.
fn jwt_header(token: &str) -> Value {
    let header = token.split('.').next().expect("a header segment");
    let bytes = data_encoding::BASE64URL_NOPAD
        .decode(header.as_bytes())
        .expect("base64url header");
    serde_json::from_slice(&bytes).expect("JSON header")
}

fn kid_of(token: &str) -> String {
    jwt_header(token)["kid"]
        .as_str()
        .expect("a kid header")
        .to_string()
}

async fn jwks_kids(app: &TestApp) -> BTreeSet<String> {
    let jwks: Value = app
        .client()
        .get(app.url("/.well-known/jwks.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    jwks["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .map(|k| k["kid"].as_str().expect("kid").to_string())
        .collect()
}

/// `GET /v1/keys` as `admin`: the keys array.
async fn key_list(app: &TestApp, admin: &str) -> Vec<Value> {
    let response = app
        .client()
        .get(app.url("/v1/keys"))
        .bearer_auth(admin)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    body["keys"].as_array().expect("keys").clone()
}

fn kid_in_state(keys: &[Value], state: &str) -> Vec<String> {
    keys.iter()
        .filter(|k| k["state"] == state)
        .map(|k| k["kid"].as_str().unwrap().to_string())
        .collect()
}

async fn rotate_http(app: &TestApp, body: Option<&str>) -> Response {
    let mut request = app
        .client()
        .post(app.url("/v1/keys/rotate"))
        .bearer_auth(app.admin_token());
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body.to_string());
    }
    request.send().await.unwrap()
}

fn all_counts(app: &TestApp) -> Vec<(&'static str, u64)> {
    app.running
        .services
        .store
        .read(|tx| tx.table_counts())
        .unwrap()
}

// ---------------------------------------------------------------------------------------
// Pairing

#[tokio::test]
async fn opening_a_pairing_session_needs_an_admin_token() {
    let app = helpers::spawn_app().await;
    let doomed = app
        .running
        .services
        .admin_tokens
        .create("doomed", &gatehouse::audit::Origin::operator())
        .await
        .unwrap();
    // It works while it lives...
    let response = open_session_as(&app, &doomed.token, json!({})).await;
    assert_eq!(response.status(), 201);
    app.running
        .services
        .admin_tokens
        .revoke(&doomed.id, &gatehouse::audit::Origin::operator())
        .await
        .unwrap();
    let sessions_before = app.table_count("pairing_sessions.v1");

    let no_token = app
        .client()
        .post(app.url("/v1/pairing/sessions"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    let garbage = open_session_as(&app, "gha_not_a_real_token", json!({})).await;
    let forged = open_session_as(
        &app,
        "gha_0011223344556677_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        json!({}),
    )
    .await;
    let revoked = open_session_as(&app, &doomed.token, json!({})).await;
    for (what, response) in [
        ("no token", no_token),
        ("garbage", garbage),
        ("forged", forged),
        ("revoked", revoked),
    ] {
        assert_eq!(response.status(), 401, "{what}");
        let challenge = response
            .headers()
            .get("www-authenticate")
            .unwrap_or_else(|| panic!("{what}: a 401 without WWW-Authenticate"))
            .to_str()
            .unwrap()
            .to_string();
        assert!(challenge.starts_with("Bearer"), "{what}: {challenge}");
        let (_, body) = error_of(response).await;
        assert_eq!(body["error"], "unauthorized", "{what}: {body}");
    }
    // A refused caller opened nothing.
    assert_eq!(app.table_count("pairing_sessions.v1"), sessions_before);
    app.stop().await;
}

#[tokio::test]
async fn a_pairing_session_answers_its_secret_and_uri_and_validates_its_body() {
    let app = helpers::spawn_app().await;
    let response = open_session_as(
        &app,
        &app.admin_token(),
        json!({"name": "Ada's phone", "ttl_seconds": 120}),
    )
    .await;
    assert_eq!(response.status(), 201);
    let session: Value = response.json().await.unwrap();
    let session_id = session["session_id"].as_str().expect("session_id");
    let secret = session["secret"].as_str().expect("secret");
    let uri = session["pairing_uri"].as_str().expect("pairing_uri");
    assert!(secret.len() >= 43, "a 256-bit secret: {secret}");
    assert!(uri.starts_with("gatehouse://pair?"), "{uri}");
    assert!(uri.contains(&format!("session={session_id}")), "{uri}");
    assert!(uri.contains(&format!("secret={secret}")), "{uri}");
    assert_eq!(session["expires_at"], "2026-11-23T00:02:00Z", "now + ttl");

    // The accepted ttl range is 30..=3600 seconds, both ends included.
    for ttl in [30, 3600] {
        let response = open_session_as(&app, &app.admin_token(), json!({"ttl_seconds": ttl})).await;
        assert_eq!(response.status(), 201, "ttl {ttl}");
    }
    let sessions = app.table_count("pairing_sessions.v1");
    for ttl in [0, 29, 3601, 86_400] {
        let response = open_session_as(&app, &app.admin_token(), json!({"ttl_seconds": ttl})).await;
        let (status, body) = error_of(response).await;
        assert_eq!(status, 400, "ttl {ttl}: {body}");
        assert_eq!(body["error"], "invalid_request");
    }
    let response = open_session_as(&app, &app.admin_token(), json!({"ttl_seconds": -5})).await;
    assert_eq!(response.status(), 400);
    let response = open_session_as(&app, &app.admin_token(), json!({"name": "x", "ttl": 60})).await;
    let (status, body) = error_of(response).await;
    assert_eq!(status, 400, "an unknown field: {body}");
    let response = open_session_as(&app, &app.admin_token(), json!({"name": "a\u{7}b"})).await;
    assert_eq!(response.status(), 400, "a control character in the name");
    let response = app
        .client()
        .post(app.url("/v1/pairing/sessions"))
        .bearer_auth(app.admin_token())
        .header("content-type", "text/plain")
        .body(r#"{"name": "x"}"#)
        .send()
        .await
        .unwrap();
    let (status, body) = error_of(response).await;
    assert_eq!(status, 415, "{body}");
    let response = app
        .client()
        .post(app.url("/v1/pairing/sessions"))
        .bearer_auth(app.admin_token())
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(
        app.table_count("pairing_sessions.v1"),
        sessions,
        "refused requests open no session"
    );
    app.stop().await;
}

#[tokio::test]
async fn pairing_answers_a_token_pair_and_the_device_is_listed() {
    let app = helpers::spawn_app().await;
    let (session_id, secret) = app.open_pairing_session().await;
    let response = post_pair(&app, &session_id, &secret, device_json("Pixel 9")).await;
    assert_eq!(response.status(), 200);
    let pair: Value = response.json().await.unwrap();
    let device_id = pair["device_id"].as_str().expect("device_id");
    assert!(device_id.starts_with("dev_"), "{device_id}");
    assert_eq!(pair["token_type"], "Bearer");
    assert_eq!(pair["expires_in"], 900);
    let access = pair["access_token"].as_str().expect("access_token");
    let refresh_token = pair["refresh_token"].as_str().expect("refresh_token");
    assert_eq!(access.split('.').count(), 3, "a compact JWS: {access}");
    assert!(refresh_token.starts_with("ghr_"), "{refresh_token}");
    assert!(active(&app, access).await);
    assert!(active(&app, refresh_token).await);

    let response = app
        .client()
        .get(app.url("/v1/devices"))
        .bearer_auth(app.admin_token())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let listed: Value = response.json().await.unwrap();
    let devices = listed["devices"].as_array().expect("devices");
    assert_eq!(devices.len(), 1, "{listed}");
    let device = &devices[0];
    assert_eq!(device["id"], device_id);
    assert_eq!(device["name"], "Pixel 9");
    assert_eq!(device["platform"], "android");
    assert_eq!(device["app_version"], "1.0.0");
    assert_eq!(device["status"], "active");
    assert_eq!(device["paired_from"], "127.0.0.1");
    assert_eq!(device["created_at"], "2026-11-23T00:00:00Z");
    assert!(device.get("last_seen").is_some(), "{device}");

    let response = app
        .client()
        .get(app.url(&format!("/v1/devices/{device_id}")))
        .bearer_auth(app.admin_token())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let shown: Value = response.json().await.unwrap();
    assert_eq!(&shown, device);

    // The device list is admin only.
    let response = app
        .client()
        .get(app.url("/v1/devices"))
        .bearer_auth(access)
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        401,
        "a device token is not an admin token"
    );
    app.stop().await;
}

#[tokio::test]
async fn every_pairing_refusal_is_the_same_401() {
    let app = helpers::spawn_app().await;
    let admin = app.admin_token();

    // A session claimed with a wrong secret first: the refusal costs it nothing.
    let (wrong_id, wrong_secret) = app.open_pairing_session().await;
    let mut flipped = wrong_secret.clone().into_bytes();
    flipped[0] = if flipped[0] == b'A' { b'B' } else { b'A' };
    let flipped = String::from_utf8(flipped).unwrap();
    let wrong = post_pair(&app, &wrong_id, &flipped, device_json("a")).await;

    let (_, some_secret) = app.open_pairing_session().await;
    let unknown = post_pair(
        &app,
        &format!("ps_{}", "0".repeat(32)),
        &some_secret,
        device_json("b"),
    )
    .await;
    let malformed = post_pair(&app, "not-a-session", &some_secret, device_json("c")).await;
    let overlong = post_pair(&app, &wrong_id, &"x".repeat(5000), device_json("c")).await;

    // Expired: two sessions of 30 s; one is still usable a millisecond before its end.
    let (early_id, early_secret) = open_session_with_ttl(&app, &admin, 30).await;
    let (late_id, late_secret) = open_session_with_ttl(&app, &admin, 30).await;
    app.clock.advance_ms(30 * 1000 - 1);
    let response = post_pair(&app, &early_id, &early_secret, device_json("in time")).await;
    assert_eq!(
        response.status(),
        200,
        "a session is valid for its whole ttl"
    );
    app.clock.advance_ms(2);
    let expired = post_pair(&app, &late_id, &late_secret, device_json("d")).await;
    app.clock.set(TEST_NOW_MS);

    // Used: the wrong-secret session still pairs with its right secret, once.
    let response = post_pair(&app, &wrong_id, &wrong_secret, device_json("right")).await;
    assert_eq!(
        response.status(),
        200,
        "a wrong secret must not burn the session"
    );
    let used = post_pair(&app, &wrong_id, &wrong_secret, device_json("e")).await;

    let mut bodies = Vec::new();
    for (what, response) in [
        ("wrong secret", wrong),
        ("unknown session", unknown),
        ("malformed session id", malformed),
        ("overlong secret", overlong),
        ("expired session", expired),
        ("used session", used),
    ] {
        let (status, body) = error_of(response).await;
        assert_eq!(status, 401, "{what}: {body}");
        assert_eq!(body["error"], "pairing_failed", "{what}: {body}");
        bodies.push((what, body));
    }
    let (_, first) = &bodies[0];
    for (what, body) in &bodies {
        assert_eq!(
            body, first,
            "{what} answers differently from a wrong secret"
        );
    }
    assert_eq!(
        app.running.services.devices.list().unwrap().len(),
        2,
        "only the two good claims made devices"
    );
    app.stop().await;
}

#[tokio::test]
async fn device_fields_are_validated_and_a_refusal_keeps_the_session() {
    let app = helpers::spawn_app().await;
    let (session_id, secret) = app.open_pairing_session().await;
    let device = |name: &str| json!({"name": name, "platform": "ios", "app_version": "2.0"});
    for (what, bad) in [
        ("empty name", device("")),
        ("blank name", device("   ")),
        ("65 characters", device(&"n".repeat(65))),
        ("newline", device("Ada\nphone")),
        ("escape", device("Ada\u{1b}[31m")),
        ("NUL", device("a\u{0}b")),
        (
            "control in platform",
            json!({"name": "ok", "platform": "i\tos", "app_version": "2.0"}),
        ),
        (
            "long app_version",
            json!({"name": "ok", "platform": "ios", "app_version": "9".repeat(33)}),
        ),
        ("missing field", json!({"name": "ok", "platform": "ios"})),
    ] {
        let response = post_pair(&app, &session_id, &secret, bad).await;
        let (status, body) = error_of(response).await;
        assert_eq!(status, 400, "{what}: {body}");
        assert_eq!(body["error"], "invalid_request", "{what}: {body}");
    }
    assert_eq!(app.table_count("devices.v1"), 0);
    // 64 characters (multi-byte ones, counted as characters) are fine, and the session
    // survived every refusal above.
    let name = "é".repeat(64);
    let response = post_pair(&app, &session_id, &secret, device(&name)).await;
    assert_eq!(response.status(), 200);
    let devices = app.running.services.devices.list().unwrap();
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0].name, name);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_concurrent_claims_of_one_session_pair_exactly_one_device() {
    // More attempts from one address than the default pairing limit allows at once.
    let app = helpers::spawn_app_with(&[("GATEHOUSE_RATELIMIT_PAIRING", "100/1m")]).await;
    let (session_id, secret) = app.open_pairing_session().await;
    let client = app.client();
    let url = app.url("/v1/pair");
    let mut tasks = Vec::new();
    for i in 0..16 {
        let client = client.clone();
        let url = url.clone();
        let body = json!({
            "session_id": session_id,
            "secret": secret,
            "device": device_json(&format!("racer {i}")),
        });
        tasks.push(tokio::spawn(async move {
            let response = client.post(url).json(&body).send().await.unwrap();
            let status = response.status();
            let body: Value = response.json().await.unwrap();
            (status, body)
        }));
    }
    let mut winners = Vec::new();
    let mut losers = 0;
    for task in tasks {
        let (status, body) = task.await.unwrap();
        match status.as_u16() {
            200 => winners.push(body),
            401 => {
                assert_eq!(body["error"], "pairing_failed", "{body}");
                losers += 1;
            }
            other => panic!("unexpected status {other}: {body}"),
        }
    }
    assert_eq!((winners.len(), losers), (1, 15));
    let devices = app.running.services.devices.list().unwrap();
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0].id.to_string(), winners[0]["device_id"]);
    assert_eq!(app.table_count("devices.v1"), 1);
    assert_eq!(app.table_count("token_families.v1"), 1);
    assert_eq!(app.table_count("refresh_tokens.v1"), 1);
    assert!(active(&app, winners[0]["access_token"].as_str().unwrap()).await);
    app.stop().await;
}

// ---------------------------------------------------------------------------------------
// The refresh grant

#[tokio::test]
async fn refresh_rotates_and_a_replayed_token_revokes_the_whole_family() {
    let app = helpers::spawn_app().await;
    let first = app.pair_device().await;
    let bystander = app.pair_device().await;

    let response = refresh(&app, &first.refresh_token).await;
    assert_eq!(response.status(), 200);
    let second: PairedDevice = response.json().await.unwrap();
    assert_eq!(second.device_id, first.device_id);
    assert_eq!(second.token_type, "Bearer");
    assert_eq!(second.expires_in, 900);
    assert_ne!(second.refresh_token, first.refresh_token);
    assert_ne!(second.access_token, first.access_token);
    assert!(
        active(&app, &first.access_token).await,
        "refresh does not end the old access token"
    );
    assert!(active(&app, &second.access_token).await);
    assert!(!active(&app, &first.refresh_token).await, "spent");
    assert!(active(&app, &second.refresh_token).await);

    let response = refresh(&app, &second.refresh_token).await;
    assert_eq!(response.status(), 200);
    let third: PairedDevice = response.json().await.unwrap();

    // The first (spent) refresh token comes back: someone holds a copy.
    let (status, body) = error_of(refresh(&app, &first.refresh_token).await).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "invalid_grant", "{body}");
    let (status, body) = error_of(refresh(&app, &third.refresh_token).await).await;
    assert_eq!(status, 400, "the newest refresh token dies with its family");
    assert_eq!(body["error"], "invalid_grant", "{body}");
    for (what, token) in [
        ("first access", &first.access_token),
        ("second access", &second.access_token),
        ("third access", &third.access_token),
        ("third refresh", &third.refresh_token),
    ] {
        assert!(!active(&app, token).await, "{what} still active");
    }
    // Another device's family is untouched.
    assert!(active(&app, &bystander.access_token).await);
    let response = refresh(&app, &bystander.refresh_token).await;
    assert_eq!(response.status(), 200);
    app.stop().await;
}

#[tokio::test]
async fn a_refresh_token_expires_after_seven_days() {
    let app = helpers::spawn_app().await;
    let device = app.pair_device().await;
    app.clock.advance_ms(REFRESH_TTL_MS - 1000);
    let answer = app.introspect(&device.refresh_token).await;
    assert_eq!(
        answer["active"], true,
        "still valid a second before: {answer}"
    );
    assert_eq!(answer["exp"], (TEST_NOW_MS + REFRESH_TTL_MS) / 1000);
    app.clock.advance_ms(1000);
    let (status, body) = error_of(refresh(&app, &device.refresh_token).await).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "invalid_grant", "{body}");
    assert!(!active(&app, &device.refresh_token).await);
    app.stop().await;
}

#[tokio::test]
async fn the_token_endpoint_refuses_malformed_requests_without_spending_anything() {
    let app = helpers::spawn_app().await;
    let device = app.pair_device().await;
    let good = device.refresh_token.as_str();
    let cases: Vec<(&str, String, u16, Option<&str>)> = vec![
        (
            "another grant",
            "grant_type=client_credentials".to_string(),
            400,
            Some("unsupported_grant_type"),
        ),
        (
            "a password grant spelled with a refresh token",
            format!("grant_type=password&refresh_token={good}"),
            400,
            Some("unsupported_grant_type"),
        ),
        (
            "no refresh_token",
            "grant_type=refresh_token".to_string(),
            400,
            Some("invalid_request"),
        ),
        (
            "garbage refresh token",
            "grant_type=refresh_token&refresh_token=ghr_nope".to_string(),
            400,
            Some("invalid_grant"),
        ),
        (
            "an access token as refresh token",
            format!(
                "grant_type=refresh_token&refresh_token={}",
                device.access_token
            ),
            400,
            Some("invalid_grant"),
        ),
    ];
    for (what, body, status, code) in cases {
        let (got, answer) = error_of(token_raw(&app, &body).await).await;
        assert_eq!(got.as_u16(), status, "{what}: {answer}");
        if let Some(code) = code {
            assert_eq!(answer["error"], code, "{what}: {answer}");
        }
    }
    let response = app
        .client()
        .post(app.url("/v1/token"))
        .json(&json!({"grant_type": "refresh_token", "refresh_token": good}))
        .send()
        .await
        .unwrap();
    let (status, body) = error_of(response).await;
    assert_eq!(status, 415, "JSON instead of a form: {body}");

    // None of the refusals spent the token or revoked its family.
    assert!(active(&app, good).await);
    let response = refresh(&app, good).await;
    assert_eq!(response.status(), 200);
    assert!(active(&app, &device.access_token).await);
    app.stop().await;
}

/// A form body that does not deserialize (a required parameter missing, one repeated,
/// which RFC 6749 section 3.1 forbids) is an RFC 6749 section 5.2 `invalid_request`: a
/// 400, like every other malformed request, and it spends nothing.
#[tokio::test]
async fn an_undeserializable_form_is_a_400_invalid_request() {
    let app = helpers::spawn_app().await;
    let device = app.pair_device().await;
    let good = device.refresh_token.as_str();
    for (what, body) in [
        ("no grant_type", format!("refresh_token={good}")),
        (
            "duplicated refresh_token",
            format!("grant_type=refresh_token&refresh_token={good}&refresh_token={good}"),
        ),
        (
            "duplicated grant_type",
            format!("grant_type=refresh_token&grant_type=refresh_token&refresh_token={good}"),
        ),
    ] {
        let (status, answer) = error_of(token_raw(&app, &body).await).await;
        assert_eq!(status, 400, "{what}: {answer}");
        assert_eq!(answer["error"], "invalid_request", "{what}: {answer}");
    }
    for path in ["/v1/revoke", "/v1/introspect"] {
        let response = app
            .client()
            .post(app.url(path))
            .bearer_auth(app.admin_token())
            .form(&[("token_type_hint", "access_token")])
            .send()
            .await
            .unwrap();
        let (status, answer) = error_of(response).await;
        assert_eq!(status, 400, "{path} without a token: {answer}");
        assert_eq!(answer["error"], "invalid_request", "{path}: {answer}");
    }
    assert_eq!(refresh(&app, good).await.status(), 200, "nothing was spent");
    app.stop().await;
}

/// RFC 6749 section 3.2: "The authorization server MUST ignore unrecognized request
/// parameters." Clients (AppAuth and the like) add parameters of their own.
#[tokio::test]
async fn the_token_endpoint_ignores_unrecognized_parameters() {
    let app = helpers::spawn_app().await;
    let device = app.pair_device().await;
    let body = format!(
        "grant_type=refresh_token&refresh_token={}&app_build=42",
        device.refresh_token
    );
    let response = token_raw(&app, &body).await;
    assert_eq!(response.status(), 200);
    app.stop().await;
}

// ---------------------------------------------------------------------------------------
// Signing keys

#[tokio::test]
async fn a_rotated_out_key_verifies_until_its_window_closes_then_is_retired() {
    let app = helpers::spawn_app().await;
    let admin = app.admin_token();
    let device = app.pair_device().await;
    let old_kid = kid_of(&device.access_token);
    assert_eq!(
        kid_in_state(&key_list(&app, &admin).await, "active"),
        [old_kid.as_str()]
    );

    app.clock.advance_ms(5 * MINUTE_MS);
    let report = app
        .running
        .services
        .keys
        .rotate(Rotation::Now, &gatehouse::audit::Origin::operator())
        .await
        .unwrap();
    assert_eq!(report.retiring.as_deref(), Some(old_kid.as_str()));
    assert_ne!(report.activated, old_kid);
    assert!(report.retired.is_empty());
    assert!(
        active(&app, &device.access_token).await,
        "signed before the rotation"
    );
    let kids = jwks_kids(&app).await;
    let expected: BTreeSet<String> = [&old_kid, &report.activated, &report.next]
        .into_iter()
        .cloned()
        .collect();
    assert_eq!(kids, expected);
    let keys = key_list(&app, &admin).await;
    assert_eq!(kid_in_state(&keys, "retiring"), [old_kid.as_str()]);
    assert_eq!(kid_in_state(&keys, "active"), [report.activated.as_str()]);
    assert_eq!(kid_in_state(&keys, "next"), [report.next.as_str()]);

    let fresh = app.pair_device().await;
    assert_eq!(kid_of(&fresh.access_token), report.activated);

    // Inside the window nothing is retired.
    app.clock.advance_ms(ACCESS_WINDOW_MS - 1);
    assert!(
        app.running
            .services
            .keys
            .retire_expired()
            .await
            .unwrap()
            .is_empty()
    );
    assert!(jwks_kids(&app).await.contains(&old_kid));
    app.clock.advance_ms(1);
    let retired = app.running.services.keys.retire_expired().await.unwrap();
    assert_eq!(retired, [old_kid.as_str()]);
    assert!(!jwks_kids(&app).await.contains(&old_kid));
    let keys = key_list(&app, &admin).await;
    assert!(
        keys.iter().all(|k| k["kid"] != old_kid.as_str()),
        "{keys:?}"
    );
    assert_eq!(keys.len(), 2, "active and next remain: {keys:?}");
    assert!(!active(&app, &device.access_token).await);
    app.stop().await;
}

#[tokio::test]
async fn a_scheduled_rotation_waits_until_the_next_key_has_been_published_ten_minutes() {
    let app = helpers::spawn_app().await;
    let admin = app.admin_token();
    let before = key_list(&app, &admin).await;

    let (status, body) = error_of(rotate_http(&app, None).await).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"], "conflict");
    assert!(
        body["message"].as_str().unwrap().contains("--now"),
        "{body}"
    );
    assert_eq!(
        key_list(&app, &admin).await,
        before,
        "a refusal changes nothing"
    );

    app.clock.advance_ms(10 * MINUTE_MS - 1);
    assert_eq!(rotate_http(&app, Some("{}")).await.status(), 409);
    app.clock.advance_ms(1);
    let response = rotate_http(&app, None).await;
    assert_eq!(response.status(), 200);
    let report: Value = response.json().await.unwrap();
    assert_eq!(
        report["activated"],
        kid_in_state(&before, "next")[0].as_str()
    );
    assert_eq!(
        report["retiring"],
        kid_in_state(&before, "active")[0].as_str()
    );
    // The next key just published is too new again, unless asked for `now`.
    assert_eq!(rotate_http(&app, None).await.status(), 409);
    let response = rotate_http(&app, Some(r#"{"now": true}"#)).await;
    assert_eq!(response.status(), 200);
    let forced: Value = response.json().await.unwrap();
    assert_eq!(forced["activated"], report["next"]);

    let keys = key_list(&app, &admin).await;
    for bad in [
        r#"{"now": "yes"}"#,
        r#"{"later": true}"#,
        r#"{"now": 1}"#,
        "not json",
    ] {
        let (status, body) = error_of(rotate_http(&app, Some(bad)).await).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(body["error"], "invalid_request");
    }
    let response = app
        .client()
        .post(app.url("/v1/keys/rotate"))
        .json(&json!({"now": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401, "rotation is admin only");
    assert_eq!(key_list(&app, &admin).await, keys);
    app.stop().await;
}

#[tokio::test]
async fn the_jwks_is_public_cacheable_and_carries_no_private_members() {
    let app = helpers::spawn_app().await;
    let device = app.pair_device().await;
    let response = app
        .client()
        .get(app.url("/.well-known/jwks.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "application/jwk-set+json"
    );
    let cache = response.headers()["cache-control"].to_str().unwrap();
    assert!(cache.contains("max-age=300"), "{cache}");
    assert!(!cache.contains("no-store"), "{cache}");
    let jwks: Value = response.json().await.unwrap();
    let keys = jwks["keys"].as_array().expect("keys");
    assert_eq!(keys.len(), 2, "the active and the next key: {jwks}");
    let private_members = ["d", "p", "q", "dp", "dq", "qi", "k", "oth"];
    for key in keys {
        for member in ["kty", "kid", "alg"] {
            assert!(key[member].is_string(), "{member} missing: {key}");
        }
        assert_eq!(key["use"], "sig", "{key}");
        for member in private_members {
            assert!(key.get(member).is_none(), "private member {member}: {key}");
        }
    }
    let kid = kid_of(&device.access_token);
    assert!(keys.iter().any(|k| k["kid"] == kid.as_str()));
    assert_eq!(jwt_header(&device.access_token)["alg"], "EdDSA");
    app.stop().await;
}

#[tokio::test]
async fn revoking_the_active_key_ends_its_tokens_at_once_and_a_new_key_signs() {
    let app = helpers::spawn_app().await;
    let admin = app.admin_token();
    let device = app.pair_device().await;
    let before = key_list(&app, &admin).await;
    let kid = kid_in_state(&before, "active").remove(0);
    let next = kid_in_state(&before, "next").remove(0);
    assert_eq!(kid_of(&device.access_token), kid);
    assert!(active(&app, &device.access_token).await);

    let url = app.url(&format!("/v1/keys/{kid}/revoke"));
    let response = app.client().post(&url).send().await.unwrap();
    assert_eq!(response.status(), 401, "key revocation is admin only");
    let response = app
        .client()
        .post(&url)
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let info: Value = response.json().await.unwrap();
    assert_eq!(info["kid"], kid.as_str());
    assert_eq!(info["state"], "revoked");

    assert!(
        !active(&app, &device.access_token).await,
        "a token of a revoked key is refused at once"
    );
    assert!(!jwks_kids(&app).await.contains(&kid));
    let keys = key_list(&app, &admin).await;
    assert_eq!(
        kid_in_state(&keys, "active"),
        [next.as_str()],
        "the next key took over"
    );
    assert_eq!(kid_in_state(&keys, "next").len(), 1);

    let fresh = app.pair_device().await;
    assert_eq!(kid_of(&fresh.access_token), next);
    assert!(active(&app, &fresh.access_token).await);
    // The device of the dead token refreshes into a token of the new key.
    let response = refresh(&app, &device.refresh_token).await;
    assert_eq!(response.status(), 200);
    let renewed: PairedDevice = response.json().await.unwrap();
    assert_eq!(kid_of(&renewed.access_token), next);
    assert!(active(&app, &renewed.access_token).await);

    let (status, body) = error_of(
        app.client()
            .post(&url)
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    let unknown = app.url("/v1/keys/kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k/revoke");
    let (status, body) = error_of(
        app.client()
            .post(&unknown)
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"], "not_found");
    app.stop().await;
}

// ---------------------------------------------------------------------------------------
// RFC 7009 revocation

#[tokio::test]
async fn revoking_an_access_token_spares_its_refresh_family() {
    let app = helpers::spawn_app().await;
    let device = app.pair_device().await;
    let sibling = app.pair_device().await;
    let response = revoke(&app, &device.access_token).await;
    assert_eq!(response.status(), 200);
    assert!(!active(&app, &device.access_token).await);
    assert!(active(&app, &sibling.access_token).await);
    // Again: still 200, nothing to do.
    assert_eq!(revoke(&app, &device.access_token).await.status(), 200);

    let response = refresh(&app, &device.refresh_token).await;
    assert_eq!(response.status(), 200, "the family lives on");
    let renewed: PairedDevice = response.json().await.unwrap();
    assert!(active(&app, &renewed.access_token).await);
    assert!(
        !active(&app, &device.access_token).await,
        "and the revoked one stays dead"
    );
    assert_eq!(app.table_count("revoked_tokens.v1"), 1);
    app.stop().await;
}

#[tokio::test]
async fn revoking_a_refresh_token_revokes_its_family() {
    let app = helpers::spawn_app().await;
    let device = app.pair_device().await;
    let response = refresh(&app, &device.refresh_token).await;
    assert_eq!(response.status(), 200);
    let current: PairedDevice = response.json().await.unwrap();
    let sibling = app.pair_device().await;

    let response = revoke(&app, &current.refresh_token).await;
    assert_eq!(response.status(), 200);
    let (status, body) = error_of(refresh(&app, &current.refresh_token).await).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "invalid_grant");
    assert!(!active(&app, &current.refresh_token).await);
    assert!(!active(&app, &current.access_token).await);
    assert!(
        !active(&app, &device.access_token).await,
        "every access token of the family"
    );
    assert!(active(&app, &sibling.access_token).await);
    assert_eq!(refresh(&app, &sibling.refresh_token).await.status(), 200);
    app.stop().await;
}

#[tokio::test]
async fn revoking_unknown_or_garbage_tokens_answers_200_and_changes_nothing() {
    let app = helpers::spawn_app().await;
    let device = app.pair_device().await;
    let before = all_counts(&app);
    let mirror = app.running.services.revocations.counts();

    let mut forged = device.access_token.clone().into_bytes();
    let last = forged.len() - 3;
    forged[last] = if forged[last] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged).unwrap();
    let unknown_refresh = format!("ghr_{}", "A".repeat(43));
    let overlong = "a".repeat(9000);
    for token in [
        "",
        "garbage",
        "a.b.c",
        unknown_refresh.as_str(),
        "ghr_short",
        forged.as_str(),
        overlong.as_str(),
    ] {
        let response = revoke(&app, token).await;
        assert_eq!(response.status(), 200, "{token:.40}");
    }
    assert_eq!(all_counts(&app), before);
    assert_eq!(app.running.services.revocations.counts(), mirror);
    assert!(active(&app, &device.access_token).await);
    assert!(active(&app, &device.refresh_token).await);

    // Still no credentials needed, but the body must be a form with a token.
    let response = app
        .client()
        .post(app.url("/v1/revoke"))
        .json(&json!({"token": device.access_token}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 415);
    assert!(active(&app, &device.access_token).await);
    app.stop().await;
}

// ---------------------------------------------------------------------------------------
// Devices

#[tokio::test]
async fn deleting_a_device_revokes_it_and_every_token_it_holds() {
    let app = helpers::spawn_app().await;
    let admin = app.admin_token();
    let device = app.pair_device().await;
    let other = app.pair_device().await;
    let url = app.url(&format!("/v1/devices/{}", device.device_id));

    let response = app.client().delete(&url).send().await.unwrap();
    assert_eq!(response.status(), 401, "admin only");
    assert!(active(&app, &device.access_token).await);

    app.clock.advance_ms(MINUTE_MS);
    let response = app
        .client()
        .delete(&url)
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let view: Value = response.json().await.unwrap();
    assert_eq!(view["id"], device.device_id.as_str());
    assert_eq!(view["status"], "revoked");
    assert_eq!(view["revoked_at"], "2026-11-23T00:01:00Z");
    let shown: Value = app
        .client()
        .get(&url)
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(shown["status"], "revoked");

    assert!(!active(&app, &device.access_token).await);
    assert!(!active(&app, &device.refresh_token).await);
    let (status, body) = error_of(refresh(&app, &device.refresh_token).await).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "invalid_grant");
    assert!(
        active(&app, &other.access_token).await,
        "other devices are untouched"
    );

    // Deleting again answers the same record.
    let response = app
        .client()
        .delete(&url)
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    let unknown = format!("dev_{}", "0".repeat(32));
    for id in [unknown.as_str(), "nope", "dev_XYZ", "DEV_0000"] {
        let (status, body) = error_of(
            app.client()
                .delete(app.url(&format!("/v1/devices/{id}")))
                .bearer_auth(&admin)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 404, "{id}: {body}");
        assert_eq!(body["error"], "not_found");
    }
    assert_eq!(app.running.services.devices.list().unwrap().len(), 2);
    assert_eq!(
        app.running.services.revocations.counts().2,
        1,
        "an unknown device id leaves no entry in the revocation mirror"
    );
    app.stop().await;
}

// ---------------------------------------------------------------------------------------
// Restart

#[tokio::test]
async fn revocations_and_the_key_ring_survive_a_restart() {
    // A fixed issuer: the restarted server listens on another port.
    let env = [("GATEHOUSE_ISSUER", "https://auth.example.test")];
    let app = helpers::spawn_app_with(&env).await;
    let admin = app.admin_token();
    let token_revoked = app.pair_device().await;
    let device_revoked = app.pair_device().await;
    let family_revoked = app.pair_device().await;
    let untouched = app.pair_device().await;

    assert_eq!(
        revoke(&app, &token_revoked.access_token).await.status(),
        200
    );
    assert_eq!(
        revoke(&app, &family_revoked.refresh_token).await.status(),
        200
    );
    let response = app
        .client()
        .delete(app.url(&format!("/v1/devices/{}", device_revoked.device_id)))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // The untouched token's key is retiring when the server stops.
    let report = app
        .running
        .services
        .keys
        .rotate(Rotation::Now, &gatehouse::audit::Origin::operator())
        .await
        .unwrap();
    assert_eq!(
        report.retiring.as_deref(),
        Some(kid_of(&untouched.access_token).as_str())
    );
    let keys_before = app.running.services.keys.list();
    let jwks_before = jwks_kids(&app).await;

    let dir = app.stop().await;
    let app = helpers::spawn_app_in(dir, &env).await;
    assert!(app.running.bootstrap_token.is_none());
    let admin = app
        .running
        .services
        .admin_tokens
        .create("after restart", &gatehouse::audit::Origin::operator())
        .await
        .unwrap()
        .token;

    assert_eq!(app.running.services.keys.list(), keys_before);
    assert_eq!(jwks_kids(&app).await, jwks_before);
    // The revoked family is still only in the journal: the set is rebuilt from it.
    assert_eq!(app.running.services.revocations.journaled().len(), 1);
    let answer = introspect_as(&app, &admin, &untouched.access_token).await;
    assert_eq!(answer["active"], true, "keys and issuer survived: {answer}");
    assert_eq!(answer["iss"], "https://auth.example.test");

    for (what, token) in [
        ("revoked access token", &token_revoked.access_token),
        (
            "revoked device's access token",
            &device_revoked.access_token,
        ),
        (
            "revoked device's refresh token",
            &device_revoked.refresh_token,
        ),
        (
            "revoked family's access token",
            &family_revoked.access_token,
        ),
        (
            "revoked family's refresh token",
            &family_revoked.refresh_token,
        ),
    ] {
        let answer = introspect_as(&app, &admin, token).await;
        assert_eq!(answer, json!({"active": false}), "{what}");
    }
    for refused in [&device_revoked.refresh_token, &family_revoked.refresh_token] {
        let (status, body) = error_of(refresh(&app, refused).await).await;
        assert_eq!(status, 400);
        assert_eq!(body["error"], "invalid_grant");
    }
    let shown: Value = app
        .client()
        .get(app.url(&format!("/v1/devices/{}", device_revoked.device_id)))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(shown["status"], "revoked");
    // A revoked access token does not take its family along, across a restart too.
    let response = refresh(&app, &token_revoked.refresh_token).await;
    assert_eq!(response.status(), 200);
    let renewed: PairedDevice = response.json().await.unwrap();
    assert_eq!(kid_of(&renewed.access_token), report.activated);
    assert_eq!(
        introspect_as(&app, &admin, &renewed.access_token).await["active"],
        true
    );
    app.stop().await;
}

// ---------------------------------------------------------------------------------------
// Introspection

#[tokio::test]
async fn introspection_needs_an_admin_token_or_registered_client_credentials() {
    let app = helpers::spawn_app().await;
    let device = app.pair_device().await;
    let client = app
        .running
        .services
        .clients
        .create("api", &gatehouse::audit::Origin::operator())
        .await
        .unwrap();
    let other = app
        .running
        .services
        .clients
        .create("other api", &gatehouse::audit::Origin::operator())
        .await
        .unwrap();
    let client_id = client.client_id.to_string();
    let call = |request: reqwest::RequestBuilder| introspect_request(request, &device.access_token);
    let post = || app.client().post(app.url("/v1/introspect"));

    let response = call(post()).await;
    assert_eq!(response.status(), 401);
    let challenge = response.headers()["www-authenticate"].to_str().unwrap();
    assert!(challenge.contains("Basic"), "{challenge}");

    let response = call(post().basic_auth(&client_id, Some(&client.client_secret))).await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["active"], true, "{answer}");
    assert_eq!(answer["sub"], device.device_id.as_str());

    let response = call(post().bearer_auth(app.admin_token())).await;
    assert_eq!(response.status(), 200);

    let refused = [
        (
            "wrong secret",
            post().basic_auth(&client_id, Some(&other.client_secret)),
        ),
        (
            "another client's id",
            post().basic_auth(other.client_id.to_string(), Some(&client.client_secret)),
        ),
        ("no secret", post().basic_auth(&client_id, None::<&str>)),
        (
            "unknown client",
            post().basic_auth(
                format!("cli_{}", "0".repeat(32)),
                Some(&client.client_secret),
            ),
        ),
        ("not base64", post().header("authorization", "Basic !!!")),
        ("garbage bearer", post().bearer_auth("gha_nope")),
        (
            "a device's access token",
            post().bearer_auth(&device.access_token),
        ),
        (
            "unknown scheme",
            post().header("authorization", "Digest abc"),
        ),
    ];
    for (what, request) in refused {
        let response = call(request).await;
        assert_eq!(response.status(), 401, "{what}");
        assert!(
            response.headers().contains_key("www-authenticate"),
            "{what}: a 401 without a challenge"
        );
        let (_, body) = error_of(response).await;
        assert_eq!(body["error"], "unauthorized", "{what}");
    }

    app.running
        .services
        .clients
        .revoke(&client_id, &gatehouse::audit::Origin::operator())
        .await
        .unwrap();
    let response = call(post().basic_auth(&client_id, Some(&client.client_secret))).await;
    assert_eq!(response.status(), 401, "a revoked client");
    let response =
        call(post().basic_auth(other.client_id.to_string(), Some(&other.client_secret))).await;
    assert_eq!(response.status(), 200, "other clients still work");
    app.stop().await;
}

#[tokio::test]
async fn introspection_describes_access_and_refresh_tokens() {
    let app = helpers::spawn_app().await;
    let device = app.pair_device().await;

    let answer = app.introspect(&device.access_token).await;
    assert_eq!(answer["active"], true);
    assert_eq!(answer["token_type"], "access_token");
    assert_eq!(answer["iss"], app.base_url.as_str());
    assert_eq!(answer["aud"], app.base_url.as_str());
    assert_eq!(answer["sub"], device.device_id.as_str());
    let now_s = TEST_NOW_MS / 1000;
    assert_eq!(answer["iat"], now_s);
    assert_eq!(answer["nbf"], now_s);
    assert_eq!(answer["exp"], now_s + 900);
    assert!(
        answer["jti"].as_str().is_some_and(|j| !j.is_empty()),
        "{answer}"
    );

    let answer = app.introspect(&device.refresh_token).await;
    assert_eq!(answer["active"], true, "{answer}");
    assert_eq!(answer["token_type"], "refresh_token");
    assert_eq!(answer["sub"], device.device_id.as_str());
    assert_eq!(answer["exp"], (TEST_NOW_MS + REFRESH_TTL_MS) / 1000);

    // Access tokens end at exp plus the 30 s leeway.
    app.clock.advance_ms(ACCESS_WINDOW_MS - 1);
    assert!(active(&app, &device.access_token).await);
    app.clock.advance_ms(1);
    assert_eq!(
        app.introspect(&device.access_token).await,
        json!({"active": false})
    );

    let response = refresh(&app, &device.refresh_token).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        app.introspect(&device.refresh_token).await,
        json!({"active": false}),
        "a spent refresh token is inactive and says nothing more"
    );
    for garbage in ["", "x", "a.b.c", "ghr_x"] {
        assert_eq!(app.introspect(garbage).await, json!({"active": false}));
    }
    app.stop().await;
}

// ---------------------------------------------------------------------------------------
// Metadata

#[tokio::test]
async fn authorization_server_metadata_names_endpoints_under_the_issuer() {
    let app = helpers::spawn_app().await;
    let response = app
        .client()
        .get(app.url("/.well-known/oauth-authorization-server"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let metadata: Value = response.json().await.unwrap();
    assert_eq!(metadata["issuer"], app.base_url.as_str());
    for (member, path) in [
        ("token_endpoint", "/v1/token"),
        ("revocation_endpoint", "/v1/revoke"),
        ("introspection_endpoint", "/v1/introspect"),
        ("jwks_uri", "/.well-known/jwks.json"),
    ] {
        assert_eq!(metadata[member], app.url(path).as_str(), "{member}");
    }
    assert!(
        metadata["grant_types_supported"]
            .as_array()
            .unwrap()
            .contains(&json!("refresh_token"))
    );
    // The endpoints it names are the ones that answer.
    let jwks = app
        .client()
        .get(metadata["jwks_uri"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(jwks.status(), 200);
    let response = app
        .client()
        .post(metadata["revocation_endpoint"].as_str().unwrap())
        .form(&[("token", "x")])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    app.stop().await;
}

// ---------------------------------------------------------------------------------------
// Pruning

#[tokio::test]
async fn prune_expired_removes_dead_rows_and_the_tokens_stay_refused() {
    let app = helpers::spawn_app().await;
    let tokens = &app.running.services.tokens;
    let device = app.pair_device().await;
    let response = refresh(&app, &device.refresh_token).await;
    assert_eq!(response.status(), 200);
    let current: PairedDevice = response.json().await.unwrap();
    assert_eq!(revoke(&app, &current.access_token).await.status(), 200);
    let replayed = app.pair_device().await;
    assert_eq!(refresh(&app, &replayed.refresh_token).await.status(), 200);
    assert_eq!(refresh(&app, &replayed.refresh_token).await.status(), 400);

    let counted = |app: &TestApp| {
        [
            app.table_count("refresh_tokens.v1"),
            app.table_count("token_families.v1"),
            app.table_count("revoked_tokens.v1"),
            app.table_count("status_revoked.v1"),
        ]
    };
    // Three revoked status-list bits: the revoked access token and the replayed family's
    // two tokens.
    assert_eq!(counted(&app), [4, 2, 1, 3]);
    // Nothing is dead yet: spent tokens are kept to catch their replay.
    assert_eq!(tokens.prune_expired().await.unwrap(), 0);
    assert_eq!(counted(&app), [4, 2, 1, 3]);
    assert_eq!(
        refresh(&app, &device.refresh_token).await.status(),
        400,
        "still a replay"
    );

    // The replay above revoked the first family too. Past every refresh token's life plus
    // an access token's window, every row can go.
    app.clock.advance_ms(REFRESH_TTL_MS + ACCESS_WINDOW_MS + 1);
    let removed = tokens.prune_expired().await.unwrap();
    assert_eq!(
        removed, 11,
        "4 refresh tokens, 2 families, 1 revoked token, 4 status-list bits"
    );
    assert_eq!(counted(&app), [0, 0, 0, 0]);
    assert_eq!(app.table_count("devices.v1"), 2, "devices are not pruned");
    let (tokens_mirror, families_mirror, _) = app.running.services.revocations.counts();
    assert_eq!((tokens_mirror, families_mirror), (0, 0));

    for token in [
        &device.refresh_token,
        &current.refresh_token,
        &replayed.refresh_token,
    ] {
        let (status, body) = error_of(refresh(&app, token).await).await;
        assert_eq!(status, 400);
        assert_eq!(body["error"], "invalid_grant");
        assert!(!active(&app, token).await);
    }
    for token in [
        &device.access_token,
        &current.access_token,
        &replayed.access_token,
    ] {
        assert!(!active(&app, token).await);
    }
    assert_eq!(tokens.prune_expired().await.unwrap(), 0, "nothing left");
    app.stop().await;
}

// ---------------------------------------------------------------------------------------
// The revocation journal

/// The family (`sid`) behind a device's tokens, read from an introspection.
async fn family_of(app: &TestApp, device: &PairedDevice) -> String {
    let answer = app.introspect(&device.access_token).await;
    answer["sid"].as_str().expect("sid").to_string()
}

/// The device's refresh token does not refresh, and neither token introspects as active.
async fn assert_refused(app: &TestApp, device: &PairedDevice) {
    let (status, body) = error_of(refresh(app, &device.refresh_token).await).await;
    assert_eq!(
        (status.as_u16(), body["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    assert!(!active(app, &device.refresh_token).await);
    assert!(!active(app, &device.access_token).await);
}

/// The value of `gatehouse_revocation_journal_families` in `/metrics`.
async fn journal_metric(app: &TestApp) -> String {
    let text = app.metrics().await;
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("gatehouse_revocation_journal_families "))
        .unwrap_or_else(|| panic!("no journal gauge in:\n{text}"));
    line.to_string()
}

fn journal(app: &TestApp) -> Vec<(String, FamilyRevocation)> {
    app.running
        .services
        .store
        .read(|tx| tx.all(&FAMILY_REVOCATIONS))
        .unwrap()
}

fn family_row(app: &TestApp, family: &str) -> Option<TokenFamily> {
    app.running
        .services
        .store
        .read(|tx| tx.get(&TOKEN_FAMILIES, family))
        .unwrap()
}

#[tokio::test]
async fn a_family_revocation_is_journaled_then_folded_into_its_row_and_stays_refused() {
    let app = helpers::spawn_app().await;
    let device = app.pair_device().await;
    let other = app.pair_device().await;
    let family = family_of(&app, &device).await;
    let revocations = &app.running.services.revocations;

    let revoked_at = app.clock.now_ms();
    assert_eq!(revoke(&app, &device.refresh_token).await.status(), 200);

    // Durable in the journal, in time order; the family's row is not rewritten yet.
    let entries = journal(&app);
    let key = gatehouse::revocation::journal_key(revoked_at, &FamilyId::parse(&family).unwrap());
    assert_eq!(
        entries,
        vec![(
            key,
            FamilyRevocation {
                family_id: family.clone(),
                revoked_at_ms: revoked_at,
                reason: "revoked".into(),
            }
        )]
    );
    assert_eq!(family_row(&app, &family).unwrap().revoked_at_ms, None);
    assert_eq!(revocations.journaled().len(), 1);
    assert_eq!(journal_metric(&app).await, "1");

    // Refused all the same: refresh, and both tokens by introspection.
    assert_refused(&app, &device).await;

    // Not due yet: one entry, and no minute since the server started.
    assert_eq!(revocations.fold_journal_if_due().await.unwrap(), None);
    assert_eq!(journal(&app).len(), 1);

    // A minute later the server folds it by itself (its maintenance task asks every
    // second).
    app.clock
        .advance_ms(gatehouse::revocation::FOLD_EVERY.as_millis() as u64);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !journal(&app).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the journal was not folded"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(journal(&app).is_empty());
    assert!(revocations.journaled().is_empty());
    let row = family_row(&app, &family).unwrap();
    assert_eq!(row.revoked_at_ms, Some(revoked_at));
    assert_eq!(row.revoke_reason.as_deref(), Some("revoked"));
    assert_eq!(
        revocations.fold_journal_if_due().await.unwrap(),
        None,
        "empty"
    );
    assert_eq!(journal_metric(&app).await, "0");
    assert_refused(&app, &device).await;

    // Revoking it again journals nothing (the row says revoked); the other family lives.
    assert_eq!(revoke(&app, &device.refresh_token).await.status(), 200);
    assert!(journal(&app).is_empty());
    assert_eq!(refresh(&app, &other.refresh_token).await.status(), 200);
    app.stop().await;
}

#[tokio::test]
async fn a_fold_keeps_the_first_revocation_and_skips_rows_revoked_or_gone() {
    let app = helpers::spawn_app().await;
    let twice = app.pair_device().await;
    let already = app.pair_device().await;
    let twice_family = family_of(&app, &twice).await;
    let already_family = family_of(&app, &already).await;
    let gone_family = "fam_0123456789abcdef0123456789abcdef".to_string();
    let services = &app.running.services;

    // A family revoked twice; a family whose row already says revoked (as after a crash
    // between a fold's two steps); and one whose row has been pruned.
    let at = app.clock.now_ms();
    assert_eq!(revoke(&app, &twice.refresh_token).await.status(), 200);
    app.clock.advance_ms(1);
    let entry = |family: &str, at: u64, reason: &str| {
        (
            gatehouse::revocation::journal_key(at, &FamilyId::parse(family).unwrap()),
            FamilyRevocation {
                family_id: family.to_string(),
                revoked_at_ms: at,
                reason: reason.into(),
            },
        )
    };
    let extra = [
        entry(&twice_family, at + 1, "later"),
        entry(&already_family, at + 1, "revoked"),
        entry(&gone_family, at + 1, "revoked"),
    ];
    let rows = extra.clone();
    let already_id = already_family.clone();
    services
        .store
        .write(move |tx| {
            for (key, value) in &rows {
                tx.put(&FAMILY_REVOCATIONS, key, value)?;
            }
            let mut row = tx.get(&TOKEN_FAMILIES, &already_id)?.unwrap();
            row.revoked_at_ms = Some(at - 1);
            row.revoke_reason = Some("device revoked".into());
            tx.put(&TOKEN_FAMILIES, &already_id, &row)
        })
        .await
        .unwrap();
    assert_eq!(journal(&app).len(), 4);

    // The daily prune folds first.
    services.tokens.prune_expired().await.unwrap();
    assert!(journal(&app).is_empty());
    let row = family_row(&app, &twice_family).unwrap();
    assert_eq!(
        (row.revoked_at_ms, row.revoke_reason.as_deref()),
        (Some(at), Some("revoked")),
        "the first revocation is kept"
    );
    let row = family_row(&app, &already_family).unwrap();
    assert_eq!(
        (row.revoked_at_ms, row.revoke_reason.as_deref()),
        (Some(at - 1), Some("device revoked")),
        "a row that says revoked is left alone"
    );
    assert!(family_row(&app, &gone_family).is_none());
    assert_eq!(
        services.revocations.fold_journal().await.unwrap(),
        Folded::default()
    );
    app.stop().await;
}

#[tokio::test]
async fn revoking_a_device_does_not_count_a_family_already_journaled() {
    let app = helpers::spawn_app().await;
    let admin = app.admin_token();
    let device = app.pair_device().await;
    assert_eq!(revoke(&app, &device.refresh_token).await.status(), 200);
    let response = app
        .client()
        .delete(app.url(&format!("/v1/devices/{}", device.device_id)))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let page: Value = app
        .client()
        .get(app.url("/v1/audit?type=device.revoked"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let events = page["events"].as_array().expect("events");
    assert_eq!(events.len(), 1, "{page}");
    assert_eq!(events[0]["details"]["families_revoked"], 0, "{page}");
    app.stop().await;
}

/// The claims of an access token, read without verifying it.
fn claims_of(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("payload");
    let bytes = data_encoding::BASE64URL_NOPAD
        .decode(payload.as_bytes())
        .expect("base64url");
    serde_json::from_slice(&bytes).expect("json")
}

/// Moving a server to another port changes its default issuer: the change is recorded in
/// the data file, announced and audited; the app's refresh token keeps working, and its
/// access token issued before the move stays valid until it expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moving_to_another_port_strands_no_device() {
    let first = format!("127.0.0.1:{}", helpers::free_port());
    let app = helpers::spawn_app_with(&[("GATEHOUSE_LISTEN", first.as_str())]).await;
    assert_eq!(
        app.running.issuer_changed_from, None,
        "a new file has no past"
    );
    let device = app.pair_device().await;
    let old_issuer = format!("https://{first}");
    assert_eq!(claims_of(&device.access_token)["iss"], old_issuer.as_str());
    let dir = app.stop().await;

    let second = format!("127.0.0.1:{}", helpers::free_port());
    let app = helpers::spawn_app_in(dir, &[("GATEHOUSE_LISTEN", second.as_str())]).await;
    let new_issuer = format!("https://{second}");
    assert_eq!(
        app.running.issuer_changed_from.as_deref(),
        Some(old_issuer.as_str())
    );
    let admin = app.create_admin_token().await;
    let old = app.introspect_as(&admin, &device.access_token).await;
    assert_eq!(old["active"], true, "issued before the move: {old}");
    let response = refresh(&app, &device.refresh_token).await;
    assert_eq!(response.status(), StatusCode::OK);
    let pair: Value = response.json().await.unwrap();
    let fresh = pair["access_token"].as_str().unwrap();
    assert_eq!(claims_of(fresh)["iss"], new_issuer.as_str());
    assert_eq!(claims_of(fresh)["aud"], new_issuer.as_str());
    assert_eq!(app.introspect_as(&admin, fresh).await["active"], true);
    let changed = app.audit_events("tokens.issuer_changed");
    assert_eq!(changed.len(), 1);
    assert_eq!(changed[0].details["from"], old_issuer.as_str());
    assert_eq!(changed[0].details["to"], new_issuer.as_str());

    // Once the old token's life is over, only the new issuer is accepted.
    app.clock.advance_ms(20 * 60 * 1000);
    assert_eq!(
        app.introspect_as(&admin, &device.access_token).await["active"],
        false
    );
    let dir = app.stop().await;

    // The same address again: nothing changed, nothing announced.
    let app = helpers::spawn_app_in(dir, &[("GATEHOUSE_LISTEN", second.as_str())]).await;
    assert_eq!(app.running.issuer_changed_from, None);
    app.stop().await;
}

/// RFC 6749 section 2.3.1: a client form-encodes its id and secret before HTTP Basic;
/// gatehouse decodes them, so a client that encodes every character is still known.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn introspection_client_credentials_are_form_decoded() {
    let app = helpers::spawn_app().await;
    let device = app.pair_device().await;
    let client = app
        .running
        .services
        .clients
        .create("encoded", &gatehouse::audit::Origin::operator())
        .await
        .unwrap();
    let encode_all = |text: &str| -> String { text.bytes().map(|b| format!("%{b:02X}")).collect() };
    for (id, secret) in [
        (client.client_id.to_string(), client.client_secret.clone()),
        (
            encode_all(&client.client_id.to_string()),
            encode_all(&client.client_secret),
        ),
    ] {
        let response = app
            .client()
            .post(app.url("/v1/introspect"))
            .basic_auth(&id, Some(&secret))
            .form(&[("token", device.access_token.as_str())])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{id}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["active"], true);
    }
    app.stop().await;
}
