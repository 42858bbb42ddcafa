//! Devices as operators see them (`/v1/devices`, `src/devices.rs`): listing with filters
//! and cursor paging, renaming, `last_seen` kept in memory and written in batches; and
//! the QR codes of pairing sessions (`/v1/pairing/sessions/{id}/qr.png|svg`), read back
//! with `zbarimg`.

use std::path::Path;
use std::process::Command;

use gatehouse::clock::{Clock, format_rfc3339};
use gatehouse::store::DEVICES;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{self, PairedDevice, TEST_NOW_MS, TestApp};
use crate::ws::Ws;

/// `GET path` as the admin: status and JSON body.
async fn admin_get(app: &TestApp, path: &str) -> (StatusCode, Value) {
    let response = app
        .client()
        .get(app.url(path))
        .bearer_auth(app.admin_token())
        .send()
        .await
        .expect("request");
    let status = response.status();
    let body = response.json().await.expect("a JSON body");
    (status, body)
}

/// `GET /v1/devices?query` as the admin, which must answer 200: the page.
async fn page(app: &TestApp, query: &str) -> Value {
    let (status, body) = admin_get(app, &format!("/v1/devices{query}")).await;
    assert_eq!(status, 200, "GET /v1/devices{query}: {body}");
    body
}

/// The ids of a page, in order.
fn ids(page: &Value) -> Vec<String> {
    page["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .map(|d| d["id"].as_str().expect("id").to_string())
        .collect()
}

/// A 400 `invalid_request` in the JSON error shape.
fn assert_invalid(status: StatusCode, body: &Value, what: &str) {
    assert_eq!(status, 400, "{what}: {body}");
    assert_eq!(body["error"], "invalid_request", "{what}: {body}");
    assert!(body["message"].is_string(), "{what}: {body}");
}

/// Pairs a device named `name` over REST.
async fn pair_named(app: &TestApp, name: &str) -> PairedDevice {
    let (session_id, secret) = app.open_pairing_session().await;
    let response = app
        .client()
        .post(app.url("/v1/pair"))
        .json(&json!({
            "session_id": session_id,
            "secret": secret,
            "device": {"name": name, "platform": "android", "app_version": "3.0"},
        }))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200, "paired");
    response.json().await.expect("token pair")
}

async fn patch_name(app: &TestApp, id: &str, body: &Value) -> (StatusCode, Value) {
    let response = app
        .client()
        .patch(app.url(&format!("/v1/devices/{id}")))
        .bearer_auth(app.admin_token())
        .json(body)
        .send()
        .await
        .expect("request");
    let status = response.status();
    (status, response.json().await.expect("a JSON body"))
}

// ---------------------------------------------------------------------------------------
// Listing.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_are_listed_oldest_first_filtered_and_paged() {
    let app = helpers::spawn_app().await;
    let names = [
        "Ada's Phone",
        "kitchen tablet",
        "Pixel",
        "Bob's laptop",
        "garage sensor",
    ];
    let mut devices = Vec::new();
    for name in names {
        devices.push(pair_named(&app, name).await.device_id);
        app.clock.advance_ms(1000);
    }
    // Renamed after pairing (the domain call; PATCH has its own test below).
    let services = &app.running.services;
    let rename = |i: usize, name: &'static str| {
        let id = gatehouse::ids::DeviceId::parse(&devices[i]).expect("device id");
        async move {
            services
                .devices
                .rename(&id, name, &gatehouse::audit::Origin::operator())
                .await
                .expect("renamed")
        }
    };
    rename(2, "ADA's watch").await;
    rename(4, "Garage door (ada)").await;

    // Everything, oldest first, in one default page.
    let all = page(&app, "").await;
    assert_eq!(ids(&all), devices);
    assert!(all["next"].is_null(), "{all}");
    let created: Vec<&str> = all["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .map(|d| d["created_at"].as_str().expect("created_at"))
        .collect();
    let expected: Vec<String> = (0..5u64)
        .map(|i| format_rfc3339(TEST_NOW_MS + i * 1000))
        .collect();
    assert_eq!(created, expected);
    for device in all["devices"].as_array().expect("devices") {
        for field in [
            "id",
            "name",
            "platform",
            "status",
            "created_at",
            "last_seen",
        ] {
            assert!(device[field].is_string(), "{field} in {device}");
        }
    }
    assert_eq!(all["devices"][2]["name"], "ADA's watch");

    // Pages of two, following `next`.
    let first = page(&app, "?limit=2").await;
    assert_eq!(ids(&first), devices[0..2]);
    assert_eq!(first["next"], devices[1].as_str());
    let second = page(&app, &format!("?limit=2&after={}", devices[1])).await;
    assert_eq!(ids(&second), devices[2..4]);
    assert_eq!(second["next"], devices[3].as_str());
    let third = page(&app, &format!("?limit=2&after={}", devices[3])).await;
    assert_eq!(ids(&third), devices[4..5]);
    assert!(
        third["next"].is_null(),
        "the last page has no next: {third}"
    );
    // A page that ends exactly at the last device has no `next` either.
    let exact = page(&app, &format!("?limit=4&after={}", devices[0])).await;
    assert_eq!(ids(&exact), devices[1..5]);
    assert!(exact["next"].is_null(), "{exact}");
    assert_eq!(ids(&page(&app, "?limit=200").await), devices);

    // Status filters after a revocation, and paging within a filter.
    let response = app
        .client()
        .delete(app.url(&format!("/v1/devices/{}", devices[1])))
        .bearer_auth(app.admin_token())
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    let revoked = page(&app, "?status=revoked").await;
    assert_eq!(ids(&revoked), devices[1..2]);
    assert_eq!(revoked["devices"][0]["status"], "revoked");
    assert!(revoked["devices"][0]["revoked_at"].is_string(), "{revoked}");
    let active = page(&app, "?status=active").await;
    let mut expected_active = devices.clone();
    expected_active.remove(1);
    assert_eq!(ids(&active), expected_active);
    let active_first = page(&app, "?status=active&limit=3").await;
    assert_eq!(ids(&active_first), expected_active[0..3]);
    assert_eq!(active_first["next"], expected_active[2].as_str());
    let active_rest = page(
        &app,
        &format!("?status=active&limit=3&after={}", expected_active[2]),
    )
    .await;
    assert_eq!(ids(&active_rest), expected_active[3..4]);
    assert!(active_rest["next"].is_null());

    // Name: a case-insensitive substring, combinable with the rest.
    let ada = page(&app, "?name=aDA").await;
    assert_eq!(
        ids(&ada),
        vec![devices[0].clone(), devices[2].clone(), devices[4].clone()]
    );
    let ada_paged = page(&app, &format!("?name=ada&limit=2&after={}", devices[0])).await;
    assert_eq!(
        ids(&ada_paged),
        vec![devices[2].clone(), devices[4].clone()]
    );
    assert!(ada_paged["next"].is_null());
    let laptop = page(&app, "?name=LAPTOP&status=active").await;
    assert_eq!(ids(&laptop), devices[3..4]);
    let none = page(&app, "?name=nothing-like-this").await;
    assert!(ids(&none).is_empty() && none["next"].is_null(), "{none}");
    // Percent-encoded text is decoded before matching.
    let apostrophe = page(&app, "?name=Bob%27S%20lap").await;
    assert_eq!(ids(&apostrophe), devices[3..4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_listing_queries_are_400_and_listing_needs_an_admin() {
    let app = helpers::spawn_app().await;
    let device = app.pair_device().await;
    let unknown_device = format!("dev_{}", "0".repeat(32));
    for query in [
        "?limit=0".to_string(),
        "?limit=201".to_string(),
        "?limit=-1".to_string(),
        "?limit=ten".to_string(),
        "?status=gone".to_string(),
        "?status=ACTIVE".to_string(),
        "?after=dev_nothex".to_string(),
        format!("?after={}", device.device_id.to_uppercase()),
        "?sort=name".to_string(),
        "?limit=2&offset=4".to_string(),
    ] {
        let (status, body) = admin_get(&app, &format!("/v1/devices{query}")).await;
        assert_invalid(status, &body, &query);
    }
    // A well-formed cursor that names no device is an unknown resource, not a bad query.
    let (status, body) = admin_get(&app, &format!("/v1/devices?after={unknown_device}")).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"], "not_found", "{body}");
    // The edges of the accepted range.
    assert_eq!(
        ids(&page(&app, "?limit=1").await),
        vec![device.device_id.clone()]
    );
    assert_eq!(
        ids(&page(&app, "?limit=200").await),
        vec![device.device_id.clone()]
    );

    // No credentials, a wrong admin token, or a device's token: 401.
    let anonymous = app
        .client()
        .get(app.url("/v1/devices"))
        .send()
        .await
        .expect("request");
    assert_eq!(anonymous.status(), 401);
    assert!(anonymous.headers().contains_key("www-authenticate"));
    let body: Value = anonymous.json().await.expect("json");
    assert_eq!(body["error"], "unauthorized");
    let mut forged = app.admin_token();
    forged.pop();
    forged.push('x');
    for token in [forged.as_str(), device.access_token.as_str()] {
        let response = app
            .client()
            .get(app.url("/v1/devices"))
            .bearer_auth(token)
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 401, "token {token:.12}…");
    }
    let one = app
        .client()
        .get(app.url(&format!("/v1/devices/{}", device.device_id)))
        .send()
        .await
        .expect("request");
    assert_eq!(one.status(), 401, "GET one device needs an admin too");
    let (status, shown) = admin_get(&app, &format!("/v1/devices/{}", device.device_id)).await;
    assert_eq!(status, 200);
    assert_eq!(shown["id"], device.device_id.as_str());
    let (status, _) = admin_get(&app, &format!("/v1/devices/{unknown_device}")).await;
    assert_eq!(status, 404);
    let (status, _) = admin_get(&app, "/v1/devices/not-a-device").await;
    assert_eq!(status, 404);
}

// ---------------------------------------------------------------------------------------
// Renaming.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patch_renames_a_device_within_the_name_rules() {
    let app = helpers::spawn_app().await;
    let device = app.pair_device().await;
    let id = device.device_id.as_str();

    let (status, body) = patch_name(&app, id, &json!({"name": "Ada's new phone"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["id"], id);
    assert_eq!(body["name"], "Ada's new phone");
    assert_eq!(body["status"], "active");
    let (_, shown) = admin_get(&app, &format!("/v1/devices/{id}")).await;
    assert_eq!(shown["name"], "Ada's new phone", "the rename is stored");

    // Surrounding spaces are trimmed; 64 characters (not bytes) are the most.
    let (status, body) = patch_name(&app, id, &json!({"name": "  Tablet  "})).await;
    assert_eq!((status.as_u16(), &body["name"]), (200, &json!("Tablet")));
    let longest = "é".repeat(64);
    let (status, body) = patch_name(&app, id, &json!({"name": longest})).await;
    assert_eq!((status.as_u16(), &body["name"]), (200, &json!(longest)));

    for (bad, what) in [
        (json!({"name": ""}), "empty"),
        (json!({"name": "   "}), "blank"),
        (json!({"name": "x".repeat(65)}), "65 characters"),
        (json!({"name": "two\nlines"}), "a newline"),
        (json!({"name": "bell\u{7}"}), "a control character"),
        (json!({"name": "nul\u{0}"}), "NUL"),
        (
            json!({"name": "Tablet", "colour": "red"}),
            "an unknown field",
        ),
        (json!({}), "no name"),
        (json!({"name": 42}), "a number"),
    ] {
        let (status, body) = patch_name(&app, id, &bad).await;
        assert_invalid(status, &body, what);
    }
    let (_, shown) = admin_get(&app, &format!("/v1/devices/{id}")).await;
    assert_eq!(
        shown["name"],
        json!(longest),
        "refused renames change nothing"
    );

    let unknown = format!("dev_{}", "a".repeat(32));
    let (status, body) = patch_name(&app, &unknown, &json!({"name": "Ghost"})).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"], "not_found");
    let (status, _) = patch_name(&app, "dev_bad", &json!({"name": "Ghost"})).await;
    assert_eq!(status, 404);

    let anonymous = app
        .client()
        .patch(app.url(&format!("/v1/devices/{id}")))
        .json(&json!({"name": "Mallory"}))
        .send()
        .await
        .expect("request");
    assert_eq!(anonymous.status(), 401);
}

// ---------------------------------------------------------------------------------------
// last_seen.

/// The stored (written) last-seen time of a device, read from the data file itself.
fn stored_last_seen(app: &TestApp, device_id: &str) -> u64 {
    app.running
        .store
        .read(|tx| tx.get(&DEVICES, device_id))
        .expect("read")
        .expect("the device exists")
        .last_seen_ms
}

async fn shown_last_seen(app: &TestApp, device_id: &str) -> (String, String) {
    let (status, body) = admin_get(app, &format!("/v1/devices/{device_id}")).await;
    assert_eq!(status, 200, "{body}");
    (
        body["last_seen"].as_str().expect("last_seen").to_string(),
        body["created_at"].as_str().expect("created_at").to_string(),
    )
}

/// How a device gets seen in a round of `last_seen_is_written_in_batches`.
#[derive(Debug, Clone, Copy)]
enum Sighting {
    /// `n` introspections of each device's access token, by the admin.
    Introspections(usize),
    /// A WebSocket `auth` (and a ping) per device.
    WebSocket,
}

/// Sees `devices` at the clock's current time; checks nothing is written until
/// `flush_last_seen`, which writes one row per device seen. `false` if the server's own
/// periodic flush (every 5 s) ran in between, so the round proves nothing.
async fn sighting_round(app: &TestApp, devices: &[&PairedDevice], how: Sighting) -> bool {
    let now = app.clock.now_ms();
    let before: Vec<u64> = devices
        .iter()
        .map(|d| stored_last_seen(app, &d.device_id))
        .collect();
    let mut sockets = Vec::new();
    for device in devices {
        match how {
            Sighting::Introspections(n) => {
                for _ in 0..n {
                    assert_eq!(app.introspect(&device.access_token).await["active"], true);
                }
            }
            Sighting::WebSocket => {
                let mut ws = Ws::authenticated(app, device).await;
                ws.ping().await;
                sockets.push(ws);
            }
        }
    }
    // Seen, and shown as seen, but not written yet.
    for (device, before) in devices.iter().zip(&before) {
        if stored_last_seen(app, &device.device_id) != *before {
            return false;
        }
        let (last_seen, _) = shown_last_seen(app, &device.device_id).await;
        assert_eq!(
            last_seen,
            format_rfc3339(now),
            "GET shows the pending sighting"
        );
    }
    let written = app
        .running
        .services
        .devices
        .flush_last_seen()
        .await
        .expect("flush");
    if written < devices.len() {
        return false;
    }
    assert_eq!(
        written,
        devices.len(),
        "one pending row per device, however many sightings"
    );
    for device in devices {
        assert_eq!(stored_last_seen(app, &device.device_id), now, "written");
        let (last_seen, created_at) = shown_last_seen(app, &device.device_id).await;
        assert_eq!(last_seen, format_rfc3339(now));
        assert_ne!(last_seen, created_at);
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_seen_is_written_in_batches_not_per_request() {
    let app = helpers::spawn_app().await;
    let a = app.pair_device().await;
    let b = app.pair_device().await;
    // Whatever pairing left pending is written now.
    app.running
        .services
        .devices
        .flush_last_seen()
        .await
        .expect("flush");
    assert_eq!(stored_last_seen(&app, &a.device_id), TEST_NOW_MS);
    let (last_seen, created_at) = shown_last_seen(&app, &a.device_id).await;
    assert_eq!(
        last_seen, created_at,
        "a new device was last seen when it paired"
    );

    let rounds: [(&[&PairedDevice], Sighting); 3] = [
        (&[&a], Sighting::Introspections(10)),
        (&[&a, &b], Sighting::Introspections(3)),
        (&[&b], Sighting::WebSocket),
    ];
    for (devices, how) in rounds {
        let mut proven = false;
        for _ in 0..3 {
            app.clock.advance_ms(60_000);
            if sighting_round(&app, devices, how).await {
                proven = true;
                break;
            }
        }
        assert!(
            proven,
            "{how:?}: a sighting was written before flush_last_seen, 3 times"
        );
    }
    // Nothing pending, nothing written.
    let written = app
        .running
        .services
        .devices
        .flush_last_seen()
        .await
        .expect("flush");
    assert_eq!(written, 0);
    // An inactive token is no sighting.
    let response = app
        .client()
        .delete(app.url(&format!("/v1/devices/{}", a.device_id)))
        .bearer_auth(app.admin_token())
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    app.clock.advance_ms(60_000);
    assert_eq!(app.introspect(&a.access_token).await["active"], false);
    let written = app
        .running
        .services
        .devices
        .flush_last_seen()
        .await
        .expect("flush");
    assert_eq!(
        written, 0,
        "a revoked device's token does not count as a sighting"
    );
}

// ---------------------------------------------------------------------------------------
// QR codes of pairing sessions.

/// Whether `zbarimg` can run; when it cannot, CI fails and a local run skips.
fn zbarimg_available(test: &str) -> bool {
    match Command::new("zbarimg").arg("--version").output() {
        Ok(_) => true,
        Err(err) => {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!(
                    "{test}: zbarimg cannot run ({err}); CI must have it: apt-get install zbar-tools"
                );
            }
            eprintln!("{test}: skipped, zbarimg cannot run ({err}); install zbar-tools");
            false
        }
    }
}

/// The text of the one QR code in the PNG at `path`.
fn decode_qr(path: &Path) -> String {
    let output = Command::new("zbarimg")
        .args(["-q", "--raw"])
        .arg(path)
        .output()
        .expect("zbarimg runs");
    assert!(
        output.status.success(),
        "zbarimg found no code: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).expect("UTF-8");
    text.strip_suffix('\n').unwrap_or(&text).to_string()
}

async fn create_session(app: &TestApp, admin: &str) -> Value {
    let response = app
        .client()
        .post(app.url("/v1/pairing/sessions"))
        .bearer_auth(admin)
        .json(&json!({"name": "QR phone"}))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 201);
    response.json().await.expect("json")
}

async fn get_qr(app: &TestApp, admin: Option<&str>, id: &str, ext: &str) -> reqwest::Response {
    let mut request = app
        .client()
        .get(app.url(&format!("/v1/pairing/sessions/{id}/qr.{ext}")));
    if let Some(admin) = admin {
        request = request.bearer_auth(admin);
    }
    request.send().await.expect("request")
}

/// Both QR endpoints answer `status` with the JSON error `code`.
async fn assert_qr_refused(app: &TestApp, admin: Option<&str>, id: &str, status: u16, code: &str) {
    for ext in ["png", "svg"] {
        let response = get_qr(app, admin, id, ext).await;
        assert_eq!(response.status(), status, "qr.{ext} of {id}");
        let body: Value = response.json().await.expect("a JSON error");
        assert_eq!(body["error"], code, "qr.{ext} of {id}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qr_codes_read_back_as_the_pairing_uri() {
    const TEST: &str = "devices::qr_codes_read_back_as_the_pairing_uri";
    if !zbarimg_available(TEST) {
        return;
    }
    let app = helpers::spawn_app().await;
    let admin = app.admin_token();
    let session = create_session(&app, &admin).await;
    let id = session["session_id"].as_str().expect("session_id");
    let uri = session["pairing_uri"].as_str().expect("pairing_uri");
    assert!(uri.starts_with("gatehouse://pair?v=1&"), "{uri}");

    let svg = get_qr(&app, Some(&admin), id, "svg").await;
    assert_eq!(svg.status(), 200);
    assert_eq!(svg.headers()["content-type"], "image/svg+xml");
    let svg = svg.text().await.expect("body");
    assert!(
        svg.starts_with("<?xml") && svg.contains("<svg"),
        "{svg:.80}"
    );
    assert!(svg.contains("#000000") && svg.contains("#ffffff"));

    let png = get_qr(&app, Some(&admin), id, "png").await;
    assert_eq!(png.status(), 200);
    assert_eq!(png.headers()["content-type"], "image/png");
    let png = png.bytes().await.expect("body");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "a PNG file");
    let file = app.dir.path().join("qr.png");
    std::fs::write(&file, &png).expect("write the PNG");
    let decoded = decode_qr(&file);
    assert_eq!(decoded, uri, "the QR code reads back as the pairing URI");
    // What an app reads from the code is enough to pair.
    let param = |name: &str| {
        decoded
            .split_once('?')
            .map(|(_, query)| query)
            .unwrap_or_default()
            .split('&')
            .find_map(|pair| pair.strip_prefix(&format!("{name}=")[..]))
            .unwrap_or_else(|| panic!("no {name} in {decoded}"))
            .to_string()
    };
    assert_eq!(param("session"), id);
    let response = app
        .client()
        .post(app.url("/v1/pair"))
        .json(&json!({
            "session_id": param("session"),
            "secret": param("secret"),
            "device": {"name": "Scanned", "platform": "ios", "app_version": "1.0"},
        }))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200, "the scanned secret pairs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qr_codes_need_an_admin_and_an_open_session() {
    let app = helpers::spawn_app().await;
    let admin = app.admin_token();
    let session = create_session(&app, &admin).await;
    let id = session["session_id"].as_str().expect("session_id");
    for ext in ["png", "svg"] {
        assert_eq!(get_qr(&app, Some(&admin), id, ext).await.status(), 200);
    }

    // Admin only.
    assert_qr_refused(&app, None, id, 401, "unauthorized").await;
    assert_qr_refused(
        &app,
        Some("gha_0000000000000000_nope"),
        id,
        401,
        "unauthorized",
    )
    .await;
    // Unknown and malformed sessions.
    let unknown = format!("ps_{}", "0".repeat(32));
    assert_qr_refused(&app, Some(&admin), &unknown, 404, "not_found").await;
    assert_qr_refused(&app, Some(&admin), "not-a-session", 404, "not_found").await;
    assert_qr_refused(&app, Some(&admin), &format!("{id}0"), 404, "not_found").await;

    // Claimed: gone.
    let response = app
        .client()
        .post(app.url("/v1/pair"))
        .json(&json!({
            "session_id": id,
            "secret": session["secret"],
            "device": {"name": "Pixel", "platform": "android", "app_version": "1.0"},
        }))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    assert_qr_refused(&app, Some(&admin), id, 410, "gone").await;

    // Expired: gone too.
    let later = create_session(&app, &admin).await;
    let later_id = later["session_id"].as_str().expect("session_id");
    assert_eq!(
        get_qr(&app, Some(&admin), later_id, "svg").await.status(),
        200
    );
    app.clock.advance_ms(5 * 60 * 1000);
    assert_qr_refused(&app, Some(&admin), later_id, 410, "gone").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_an_open_sessions_qr_code_is_gone_but_the_session_still_pairs() {
    let app = helpers::spawn_app().await;
    let session = create_session(&app, &app.admin_token()).await;
    let id = session["session_id"]
        .as_str()
        .expect("session_id")
        .to_string();
    assert_eq!(
        get_qr(&app, Some(&app.admin_token()), &id, "png")
            .await
            .status(),
        200
    );

    let dir = app.stop().await;
    let app = helpers::spawn_app_in(dir, &[]).await;
    assert!(
        app.running.bootstrap_token.is_none(),
        "not a fresh instance"
    );
    let admin = app
        .running
        .services
        .admin_tokens
        .create("after restart", &gatehouse::audit::Origin::operator())
        .await
        .expect("admin token")
        .token;
    // The secret was held in memory only: no QR code can be drawn again.
    assert_qr_refused(&app, Some(&admin), &id, 410, "gone").await;
    // The session itself is durable: its secret still pairs.
    let response = app
        .client()
        .post(app.url("/v1/pair"))
        .json(&json!({
            "session_id": id,
            "secret": session["secret"],
            "device": {"name": "Pixel", "platform": "android", "app_version": "1.0"},
        }))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
}

/// Names with bidirectional controls (which make a name show something other than what
/// it holds) are refused: a pairing session's, a device's at pairing, and at rename.
#[tokio::test]
async fn names_with_bidirectional_controls_are_refused() {
    let app = helpers::spawn_app().await;
    let client = app.client();
    for name in ["phone\u{202E}gnp.exe", "a\u{2066}b\u{2069}"] {
        let response = client
            .post(app.url("/v1/pairing/sessions"))
            .bearer_auth(app.admin_token())
            .json(&json!({ "name": name }))
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        assert_invalid(status, &body, "session name");

        let (session_id, secret) = app.open_pairing_session().await;
        let response = client
            .post(app.url("/v1/pair"))
            .json(&json!({
                "session_id": session_id, "secret": secret,
                "device": {"name": name, "platform": "ios", "app_version": "1"},
            }))
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        assert_invalid(status, &body, "device name at pairing");
    }
    let device = app.pair_device().await;
    let response = client
        .patch(app.url(&format!("/v1/devices/{}", device.device_id)))
        .bearer_auth(app.admin_token())
        .json(&json!({ "name": "x\u{202D}y" }))
        .send()
        .await
        .unwrap();
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    assert_invalid(status, &body, "rename");
    app.stop().await;
}

async fn refresh(app: &TestApp, token: &str) -> StatusCode {
    app.refresh(token).await.status()
}

/// A device that can never refresh again says so: `needs_pairing` with the reason, in the
/// API (one device, the list, the status filter) and in the CLI's table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_whose_family_ended_shows_needs_pairing_and_why() {
    let app = helpers::spawn_app().await;
    let healthy = pair_named(&app, "healthy").await;
    let reused = pair_named(&app, "reused").await;
    let signed_out = pair_named(&app, "signed out").await;
    let expired = pair_named(&app, "expired").await;

    // Reuse: refresh once, then present the spent token again.
    assert_eq!(refresh(&app, &reused.refresh_token).await, StatusCode::OK);
    assert_eq!(
        refresh(&app, &reused.refresh_token).await,
        StatusCode::BAD_REQUEST
    );
    // The app signs out: RFC 7009 revocation of its refresh token.
    let response = app
        .client()
        .post(app.url("/v1/revoke"))
        .form(&[("token", signed_out.refresh_token.as_str())])
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::OK);

    let standing = |body: &Value| {
        (
            body["status"].as_str().unwrap_or("?").to_string(),
            body["status_reason"].clone(),
        )
    };
    for (device, status, reason) in [
        (&healthy, "active", Value::Null),
        (
            &reused,
            "needs_pairing",
            Value::from("refresh_token_reused"),
        ),
        (&signed_out, "needs_pairing", Value::from("signed_out")),
        (&expired, "active", Value::Null),
    ] {
        let (code, body) = admin_get(&app, &format!("/v1/devices/{}", device.device_id)).await;
        assert_eq!(code, StatusCode::OK);
        assert_eq!(standing(&body), (status.to_string(), reason), "{body}");
    }
    // Paired at the same instant: listed by id, so compare as sets.
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    let needs = page(&app, "?status=needs_pairing").await;
    assert_eq!(
        sorted(ids(&needs)),
        sorted(vec![reused.device_id.clone(), signed_out.device_id.clone()])
    );
    let active = page(&app, "?status=active").await;
    assert_eq!(
        sorted(ids(&active)),
        sorted(vec![healthy.device_id.clone(), expired.device_id.clone()])
    );

    // Past the refresh lifetime (30 days by default) no family is usable.
    app.clock.advance_ms(31 * 24 * 3600 * 1000);
    let (_, body) = admin_get(&app, &format!("/v1/devices/{}", expired.device_id)).await;
    assert_eq!(
        standing(&body),
        ("needs_pairing".to_string(), Value::from("refresh_expired"))
    );
    app.stop().await;
}

/// Listening on every address with no issuer set, the default issuer names `0.0.0.0`:
/// no pairing URI is made (409, nothing stored), and the status warnings say what to set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_pairing_uri_names_the_any_address() {
    let port = helpers::free_port();
    let listen = format!("0.0.0.0:{port}");
    let app = helpers::spawn_app_with(&[("GATEHOUSE_LISTEN", listen.as_str())]).await;
    let url = |path: &str| format!("https://127.0.0.1:{port}{path}");
    let response = app
        .client()
        .post(url("/v1/pairing/sessions"))
        .bearer_auth(app.admin_token())
        .json(&json!({"name": "phone"}))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::CONFLICT);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"], "server_unreachable", "{body}");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("0.0.0.0") && message.contains("GATEHOUSE_ISSUER"),
        "{message}"
    );
    let sessions = app
        .running
        .store
        .read(|tx| tx.all(&gatehouse::store::PAIRING_SESSIONS))
        .expect("read");
    assert!(sessions.is_empty(), "nothing was stored");
    let status: Value = app
        .client()
        .get(url("/v1/status"))
        .bearer_auth(app.admin_token())
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    assert!(
        status["warnings"]
            .as_array()
            .expect("warnings")
            .iter()
            .any(|w| w["code"] == "pairing_uri_unreachable"),
        "{status}"
    );
    app.stop().await;
}

async fn pair_again_session(app: &TestApp, body: Value) -> (StatusCode, Value) {
    let response = app
        .client()
        .post(app.url("/v1/pairing/sessions"))
        .bearer_auth(app.admin_token())
        .json(&body)
        .send()
        .await
        .expect("request");
    let status = response.status();
    (status, response.json().await.expect("json"))
}

async fn claim(app: &TestApp, session: &Value, platform: &str) -> (StatusCode, Value) {
    let response = app
        .client()
        .post(app.url("/v1/pair"))
        .json(&json!({
            "session_id": session["session_id"],
            "secret": session["secret"],
            "device": {"name": "ignored", "platform": platform, "app_version": "2.0.0"},
        }))
        .send()
        .await
        .expect("request");
    let status = response.status();
    (status, response.json().await.expect("json"))
}

/// A device that needs pairing is paired again as itself: same id and name, no
/// duplicate, a new family that works, and the families it held revoked in the same
/// commit (a replaced phone's tokens stop working).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_is_paired_again_as_itself_not_duplicated() {
    let app = helpers::spawn_app().await;
    let stranded = pair_named(&app, "Ada's phone").await;
    assert_eq!(refresh(&app, &stranded.refresh_token).await, StatusCode::OK);
    assert_eq!(
        refresh(&app, &stranded.refresh_token).await,
        StatusCode::BAD_REQUEST
    );
    let (_, before) = admin_get(&app, &format!("/v1/devices/{}", stranded.device_id)).await;
    assert_eq!(before["status"], "needs_pairing");

    let (status, session) =
        pair_again_session(&app, json!({"device_id": stranded.device_id})).await;
    assert_eq!(status, StatusCode::CREATED, "{session}");
    let (status, pair) = claim(&app, &session, "ios").await;
    assert_eq!(status, StatusCode::OK, "{pair}");
    assert_eq!(pair["device_id"], stranded.device_id.as_str());
    let (_, after) = admin_get(&app, &format!("/v1/devices/{}", stranded.device_id)).await;
    assert_eq!(after["status"], "active", "{after}");
    assert_eq!(after["name"], "Ada's phone", "the operator's name stays");
    assert_eq!(after["platform"], "ios");
    assert_eq!(ids(&page(&app, "").await).len(), 1, "no duplicate device");
    let access = pair["access_token"].as_str().unwrap();
    assert_eq!(app.introspect(access).await["active"], true);
    let refresh_token = pair["refresh_token"].as_str().unwrap();
    assert_eq!(refresh(&app, refresh_token).await, StatusCode::OK);

    // A healthy device paired again (a new phone): the old one's tokens end.
    let old = pair_named(&app, "old phone").await;
    let (_, session) = pair_again_session(&app, json!({"device_id": old.device_id})).await;
    let (status, new) = claim(&app, &session, "android").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(new["device_id"], old.device_id.as_str());
    assert_eq!(app.introspect(&old.access_token).await["active"], false);
    assert_eq!(
        refresh(&app, &old.refresh_token).await,
        StatusCode::BAD_REQUEST
    );
    let new_access = new["access_token"].as_str().unwrap();
    assert_eq!(app.introspect(new_access).await["active"], true);
    let claimed = app.audit_events("pairing.claimed");
    let last = claimed.last().unwrap();
    assert_eq!(last.details["again"], true);
    assert_eq!(last.details["families_revoked"], 1);

    // Not for a revoked device, nor one that does not exist.
    let response = app
        .client()
        .delete(app.url(&format!("/v1/devices/{}", old.device_id)))
        .bearer_auth(app.admin_token())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let (status, body) = pair_again_session(&app, json!({"device_id": old.device_id})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("revoked"),
        "{body}"
    );
    for unknown in ["dev_00000000000000000000000000000000", "nonsense"] {
        let (status, _) = pair_again_session(&app, json!({"device_id": unknown})).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{unknown}");
    }
    app.stop().await;
}
