//! Token status lists (draft-ietf-oauth-status-list) seen from outside: every access
//! token names its bit, `GET /v1/statuslists/{n}` serves a signed, zlib-compressed list
//! that an app verifies from the JWKS alone (here with jwt-compact, not our code), and a
//! revocation of the token, its family or its device shows in it within a second. Indices
//! survive restarts and are never handed out twice; bits outlive a restart and go once
//! their tokens have expired. (Decoded by a second implementation of the format, npm's
//! @sd-jwt/jwt-status-list, in `tests/e2e/device_grant.mjs`.)

use std::io::Read;
use std::time::{Duration, Instant};

use jwt_compact::alg::Ed25519;
use jwt_compact::jwk::JsonWebKey;
use jwt_compact::{AlgorithmExt, UntrustedToken};
use serde_json::Value;

use crate::helpers::{self, PairedDevice, TestApp};

/// What a token says about its status-list place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Place {
    pub(crate) idx: u64,
    pub(crate) uri: String,
}

/// The `status.status_list` claim of an access token.
pub(crate) fn place_of(access_token: &str) -> Place {
    let payload = access_token.split('.').nth(1).expect("a JWS");
    let claims: Value = serde_json::from_slice(
        &data_encoding::BASE64URL_NOPAD
            .decode(payload.as_bytes())
            .unwrap(),
    )
    .unwrap();
    let list = &claims["status"]["status_list"];
    Place {
        idx: list["idx"].as_u64().unwrap_or_else(|| panic!("{claims}")),
        uri: list["uri"]
            .as_str()
            .unwrap_or_else(|| panic!("{claims}"))
            .into(),
    }
}

/// A fetched list: its claims and its bits, inflated.
#[derive(Debug)]
pub(crate) struct FetchedList {
    pub(crate) claims: Value,
    pub(crate) bytes: Vec<u8>,
    pub(crate) cache_control: String,
}

impl FetchedList {
    pub(crate) fn bit(&self, idx: u64) -> bool {
        let byte = self.bytes[usize::try_from(idx / 8).unwrap()];
        byte >> (idx % 8) & 1 == 1
    }
}

/// Fetches `uri` with `client`, checks the answer's type and the token's signature
/// against the published JWKS with jwt-compact (not ring), and inflates its bits with
/// flate2's zlib decoder.
pub(crate) async fn fetch(client: &reqwest::Client, base_url: &str, uri: &str) -> FetchedList {
    let response = client.get(uri).send().await.unwrap();
    assert_eq!(response.status(), 200, "{uri}");
    assert_eq!(
        response.headers()["content-type"],
        "application/statuslist+jwt"
    );
    let cache_control = response.headers()["cache-control"]
        .to_str()
        .unwrap()
        .to_string();
    let token = response.text().await.unwrap();
    let jwks: Value = client
        .get(format!("{base_url}/.well-known/jwks.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let untrusted = UntrustedToken::<Value>::try_from(token.as_str()).expect("a JWS");
    assert_eq!(
        untrusted.header().token_type.as_deref(),
        Some("statuslist+jwt")
    );
    let kid = untrusted.header().key_id.clone().expect("a kid");
    let published = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == kid.as_str())
        .unwrap_or_else(|| panic!("kid {kid} in {jwks}"))
        .clone();
    let jwk: JsonWebKey<'static> = serde_json::from_value(published).unwrap();
    let key = <Ed25519 as jwt_compact::Algorithm>::VerifyingKey::try_from(&jwk).unwrap();
    let verified = Ed25519
        .validator::<Value>(&key)
        .validate(&untrusted)
        .expect("the list verifies with the published key");
    assert!(verified.claims().expiration.is_some() && verified.claims().issued_at.is_some());
    let payload = token.split('.').nth(1).unwrap();
    let claims: Value = serde_json::from_slice(
        &data_encoding::BASE64URL_NOPAD
            .decode(payload.as_bytes())
            .unwrap(),
    )
    .unwrap();
    let path = &uri[uri.find("/v1/").expect("a list URI")..];
    let sub = claims["sub"].as_str().expect("sub");
    assert!(sub.ends_with(path), "sub {sub} is the list's own URI");
    assert_eq!(claims["status_list"]["bits"], 1);
    let lst = claims["status_list"]["lst"].as_str().unwrap();
    let packed = data_encoding::BASE64URL_NOPAD
        .decode(lst.as_bytes())
        .unwrap();
    let mut bytes = Vec::new();
    flate2::read::ZlibDecoder::new(packed.as_slice())
        .read_to_end(&mut bytes)
        .expect("zlib");
    assert_eq!(bytes.len(), 1 << 17, "2^20 bits");
    FetchedList {
        claims,
        bytes,
        cache_control,
    }
}

/// The list `place` names, from `app` (which may listen on another port than the server
/// that issued the token: the path is what counts).
async fn list_of(app: &TestApp, place: &Place) -> FetchedList {
    let path = &place.uri[place.uri.find("/v1/").unwrap()..];
    fetch(&app.client(), &app.base_url, &app.url(path)).await
}

/// Fetches the list again until the bit of `place` reads `set`; how long that took.
pub(crate) async fn wait_for_bit(
    client: &reqwest::Client,
    base_url: &str,
    place: &Place,
    set: bool,
) -> Duration {
    let started = Instant::now();
    loop {
        if fetch(client, base_url, &place.uri).await.bit(place.idx) == set {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "bit {} of {} still reads {}",
            place.idx,
            place.uri,
            !set
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn refreshed(app: &TestApp, device: &PairedDevice) -> PairedDevice {
    let response = app.refresh(&device.refresh_token).await;
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

async fn revoke(app: &TestApp, token: &str) {
    assert_eq!(app.revoke(token).await.status(), 200);
}

#[tokio::test]
async fn a_revoked_access_token_flips_its_bit_within_a_second_and_no_other() {
    let app = helpers::spawn_app().await;
    let device = app.pair_device().await;
    let first = place_of(&device.access_token);
    assert_eq!(first.uri, app.url("/v1/statuslists/0"));
    let next = refreshed(&app, &device).await;
    let second = place_of(&next.access_token);
    assert_eq!(second.uri, first.uri, "both in the first list");
    assert_ne!(second.idx, first.idx, "one index per token");

    let list = list_of(&app, &first).await;
    assert_eq!(list.claims["sub"], first.uri.as_str());
    assert!(!list.bit(first.idx) && !list.bit(second.idx));
    assert_eq!(list.cache_control, "private, max-age=60");
    assert_eq!(list.claims["ttl"], 60);
    let (iat, exp) = (
        list.claims["iat"].as_u64().unwrap(),
        list.claims["exp"].as_u64().unwrap(),
    );
    assert_eq!(iat, helpers::TEST_NOW_MS / 1000);
    assert_eq!(
        exp - iat,
        900 + 30,
        "valid as long as a token it speaks for"
    );

    revoke(&app, &device.access_token).await;
    let took = wait_for_bit(&app.client(), &app.base_url, &first, true).await;
    assert!(
        took < Duration::from_secs(1),
        "the bit showed after {took:?}"
    );
    let list = list_of(&app, &first).await;
    assert!(!list.bit(second.idx), "the family's newer token stands");
    assert_eq!(
        list.bytes.iter().map(|b| b.count_ones()).sum::<u32>(),
        1,
        "exactly one bit set"
    );
    app.stop().await;
}

#[tokio::test]
async fn revoking_a_family_or_a_device_or_reusing_a_refresh_token_sets_every_live_bit() {
    let app = helpers::spawn_app().await;
    let admin = app.admin_token();
    let bystander = app.pair_device().await;

    // A family revoked through its refresh token (the revocation journal).
    let journaled = app.pair_device().await;
    let second = refreshed(&app, &journaled).await;
    let third = refreshed(&app, &second).await;
    revoke(&app, &third.refresh_token).await;
    // A device revoked by an operator.
    let device = app.pair_device().await;
    let device_next = refreshed(&app, &device).await;
    let response = app
        .client()
        .delete(app.url(&format!("/v1/devices/{}", device.device_id)))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // A spent refresh token presented again.
    let reused = app.pair_device().await;
    let reused_next = refreshed(&app, &reused).await;
    assert_eq!(app.refresh(&reused.refresh_token).await.status(), 400);

    let revoked: Vec<Place> = [
        &journaled.access_token,
        &second.access_token,
        &third.access_token,
        &device.access_token,
        &device_next.access_token,
        &reused.access_token,
        &reused_next.access_token,
    ]
    .into_iter()
    .map(|t| place_of(t))
    .collect();
    for place in &revoked {
        wait_for_bit(&app.client(), &app.base_url, place, true).await;
    }
    let list = list_of(&app, &revoked[0]).await;
    assert!(!list.bit(place_of(&bystander.access_token).idx));
    assert_eq!(
        list.bytes.iter().map(|b| b.count_ones()).sum::<u32>(),
        7,
        "the seven revoked tokens and no other"
    );
    // gatehouse itself agrees with its list.
    for token in [&third.access_token, &device_next.access_token] {
        assert_eq!(app.introspect(token).await["active"], false);
    }
    assert_eq!(
        app.introspect(&bystander.access_token).await["active"],
        true
    );
    app.stop().await;
}

#[tokio::test]
async fn indices_survive_restarts_and_bits_go_once_their_tokens_have_expired() {
    let app = helpers::spawn_app().await;
    let device = app.pair_device().await;
    let before = place_of(&device.access_token);
    revoke(&app, &device.access_token).await;
    wait_for_bit(&app.client(), &app.base_url, &before, true).await;
    let dir = app.stop().await;

    let app = helpers::spawn_app_in(dir, &[]).await;
    let admin = app.create_admin_token().await;
    let again = app.pair_device_as(&admin).await;
    let after = place_of(&again.access_token);
    assert!(
        after.idx >= before.idx + 1024,
        "a restart starts a new block: {before:?} then {after:?}"
    );
    let list = list_of(&app, &before).await;
    assert!(list.bit(before.idx), "the bit is durable");
    assert!(!list.bit(after.idx));

    // Past the token's expiry but within the leeway a verifier allows, the bit stands.
    app.clock.advance_ms(905 * 1000);
    tokio::time::sleep(gatehouse::status_list::REBUILD_AFTER).await;
    assert!(list_of(&app, &before).await.bit(before.idx));
    // Past the token's expiry and leeway the row is pruned and the bit reads 0 again.
    app.clock.advance_ms(16 * 60 * 1000 - 905 * 1000);
    let pruned = app.running.services.tokens.prune_expired().await.unwrap();
    assert!(pruned >= 1);
    assert_eq!(app.table_count("status_revoked.v1"), 0);
    tokio::time::sleep(gatehouse::status_list::REBUILD_AFTER).await;
    assert!(!list_of(&app, &before).await.bit(before.idx));
    app.stop().await;
}

#[tokio::test]
async fn unknown_and_misspelt_lists_are_refused() {
    let app = helpers::spawn_app().await;
    let client = app.client();
    // No token has been issued yet: not even list 0 exists.
    let none = client
        .get(app.url("/v1/statuslists/0"))
        .send()
        .await
        .unwrap();
    assert_eq!(none.status(), 404);
    app.pair_device().await;
    for (path, status, code) in [
        ("/v1/statuslists/1", 404, "not_found"),
        ("/v1/statuslists/18446744073709551615", 404, "not_found"),
        ("/v1/statuslists/01", 400, "invalid_request"),
        ("/v1/statuslists/-1", 400, "invalid_request"),
        ("/v1/statuslists/0x0", 400, "invalid_request"),
        ("/v1/statuslists/99999999999999999999", 404, "not_found"),
        (
            "/v1/statuslists/100000000000000000000",
            400,
            "invalid_request",
        ),
    ] {
        let response = client.get(app.url(path)).send().await.unwrap();
        assert_eq!(response.status(), status, "{path}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"], code, "{path}: {body}");
    }
    let ok = client
        .get(app.url("/v1/statuslists/0"))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    app.stop().await;
}

#[test]
fn a_status_list_ttl_longer_than_the_access_ttl_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let env = gatehouse::config::Env(
        [
            ("GATEHOUSE_STATUS_LIST_TTL", "20m"),
            ("GATEHOUSE_ACCESS_TTL", "15m"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect(),
    );
    let flags = gatehouse::config::Flags::default().with(
        "--data",
        dir.path().join("gatehouse.redb").display().to_string(),
    );
    let err = gatehouse::config::Config::load(&flags, &env)
        .expect_err("refused")
        .to_string();
    assert!(err.contains("tokens.status_list_ttl"), "{err}");
}

/// A family holds at most 1 024 access tokens that may still be presented (each has a
/// place in its row): the next refresh is refused with 429 and `Retry-After` until the
/// oldest expires, and spends nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_family_refreshed_too_often_waits_for_its_oldest_token_to_expire() {
    let app = helpers::spawn_app_with(&[("GATEHOUSE_RATELIMIT_REFRESH", "off")]).await;
    let mut device = app.pair_device().await;
    let cap = gatehouse::tokens::MAX_LIVE_ACCESS_TOKENS;
    for _ in 1..cap {
        device = refreshed(&app, &device).await;
    }
    let refused = app.refresh(&device.refresh_token).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["retry-after"], (900 + 30).to_string());
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"], "rate_limited");
    // The first token leaves the window: one more refresh goes through, with the same
    // refresh token (nothing was spent).
    app.clock.advance_ms((900 + 30) * 1000);
    let again = refreshed(&app, &device).await;
    assert!(!again.access_token.is_empty());
    app.stop().await;
}
