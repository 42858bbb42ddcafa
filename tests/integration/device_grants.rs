//! The device authorization grant (RFC 8628) seen from outside: a device asks
//! (`POST /v1/device_authorization`), polls `POST /v1/token`, an operator approves or
//! denies it through the admin API or the CLI, and the device takes its tokens once.
//! The answers of every state, `slow_down`'s growing interval, single use, a leaked
//! device code revoking what it issued, expiry, lockout for wrong codes, and the audit
//! trail. (The same flow with an independent OAuth client: `tests/e2e/device_grant.mjs`.)

use serde_json::{Value, json};

use crate::binary::{gatehouse, run, run_ok};
use crate::helpers::{self, TestApp};

const DEVICE_CODE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";

async fn ask(app: &TestApp, client_id: Option<&str>) -> Value {
    let mut form = vec![];
    if let Some(id) = client_id {
        form.push(("client_id", id));
    }
    let response = app
        .client()
        .post(app.url("/v1/device_authorization"))
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

/// One poll: the status and the body.
async fn poll(app: &TestApp, device_code: &str) -> (u16, Value) {
    let response = app
        .client()
        .post(app.url("/v1/token"))
        .form(&[
            ("grant_type", DEVICE_CODE_GRANT),
            ("device_code", device_code),
            ("client_id", "backup-bot"),
        ])
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

async fn poll_error(app: &TestApp, device_code: &str) -> String {
    let (status, body) = poll(app, device_code).await;
    assert_eq!(status, 400, "{body}");
    body["error"].as_str().unwrap().to_string()
}

async fn admin(app: &TestApp, action: &str, body: Value) -> (u16, Value) {
    let response = app
        .client()
        .post(app.url(&format!("/v1/device_grants/{action}")))
        .bearer_auth(app.admin_token())
        .json(&body)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

/// Moves the test clock past the device's interval.
fn wait(app: &TestApp, secs: u64) {
    app.clock.advance_ms(secs * 1000);
}

#[tokio::test]
async fn a_device_asks_an_operator_approves_and_the_device_takes_its_tokens_once() {
    let app = helpers::spawn_app().await;
    let grant = ask(&app, Some("backup-bot")).await;
    let user_code = grant["user_code"].as_str().unwrap();
    let device_code = grant["device_code"].as_str().unwrap();
    assert_eq!(user_code.len(), 9);
    assert!(
        user_code.chars().enumerate().all(|(i, c)| if i == 4 {
            c == '-'
        } else {
            "BCDFGHJKLMNPQRSTVWXZ".contains(c)
        }),
        "{user_code}"
    );
    assert!(device_code.starts_with("dg_"), "{device_code}");
    let issuer = &app.running.services.tokens.settings().issuer;
    assert_eq!(grant["verification_uri"], format!("{issuer}/admin/device"));
    assert_eq!(
        grant["verification_uri_complete"],
        format!("{issuer}/admin/device?user_code={user_code}")
    );
    assert_eq!(grant["expires_in"], 600);
    assert_eq!(grant["interval"], 5);

    // Before anyone decides: pending; sooner than the interval: slow_down, and the
    // interval is 5 s longer from then on.
    assert_eq!(poll_error(&app, device_code).await, "authorization_pending");
    let (_, slow) = poll(&app, device_code).await;
    assert_eq!(slow["error"], "slow_down");
    assert!(
        slow["message"].as_str().unwrap().contains("10 seconds"),
        "{slow}"
    );
    wait(&app, 6);
    assert_eq!(poll_error(&app, device_code).await, "slow_down");
    wait(&app, 15);
    assert_eq!(poll_error(&app, device_code).await, "authorization_pending");

    // The operator looks the code up as typed: any case, without the dash.
    let typed = user_code.replace('-', "").to_lowercase();
    let (status, found) = admin(&app, "lookup", json!({"user_code": typed})).await;
    assert_eq!(status, 200, "{found}");
    assert_eq!(found["status"], "pending");
    assert_eq!(found["client_id"], "backup-bot");
    assert_eq!(found["requested_from"], "127.0.0.1");
    assert_eq!(found["device_id"], Value::Null);

    let (status, approved) = admin(
        &app,
        "approve",
        json!({"user_code": user_code, "name": "Backup bot"}),
    )
    .await;
    assert_eq!(status, 200, "{approved}");
    assert_eq!(approved["status"], "approved");
    assert_eq!(approved["device_name"], "Backup bot");
    let device_id = approved["device_id"].as_str().unwrap().to_string();
    let (status, again) = admin(&app, "approve", json!({"user_code": user_code})).await;
    assert_eq!((status, again["error"].as_str()), (409, Some("conflict")));
    let (status, _) = admin(&app, "deny", json!({"user_code": user_code})).await;
    assert_eq!(status, 409, "a decided grant is not denied after all");

    // The next poll takes the device's first pair.
    wait(&app, 20);
    let (status, pair) = poll(&app, device_code).await;
    assert_eq!(status, 200, "{pair}");
    assert_eq!(pair["device_id"], device_id.as_str());
    assert_eq!(pair["token_type"], "Bearer");
    let access = pair["access_token"].as_str().unwrap();
    assert_eq!(app.introspect(access).await["sub"], device_id.as_str());
    let refreshed = app.refresh(pair["refresh_token"].as_str().unwrap()).await;
    assert_eq!(refreshed.status(), 200);
    let refreshed: Value = refreshed.json().await.unwrap();
    let devices = app.running.services.devices.list().unwrap();
    let device = devices
        .iter()
        .find(|d| d.id.to_string() == device_id)
        .unwrap();
    assert_eq!(device.name, "Backup bot");
    assert_eq!(device.platform, "device-grant");
    let (_, found) = admin(&app, "lookup", json!({"user_code": user_code})).await;
    assert_eq!(found["status"], "issued");

    // The spent code again: it has leaked, so what it issued is revoked everywhere.
    wait(&app, 20);
    assert_eq!(poll_error(&app, device_code).await, "invalid_grant");
    let newest = refreshed["access_token"].as_str().unwrap();
    assert_eq!(app.introspect(newest).await["active"], false);
    let refused = app
        .refresh(refreshed["refresh_token"].as_str().unwrap())
        .await;
    assert_eq!(refused.status(), 400);

    let requested = app.audit_events("pairing.device_requested");
    assert_eq!(requested.len(), 1);
    let approvals = app.audit_events("pairing.approved");
    assert_eq!(approvals.len(), 1);
    assert_eq!(approvals[0].device.as_deref(), Some(device_id.as_str()));
    let issued = app.audit_events("token.issued");
    assert!(
        issued.iter().any(|e| e.details["grant"] == "device_code"
            && e.device.as_deref() == Some(device_id.as_str())),
        "{issued:?}"
    );
    let reuse = app.audit_events("token.reused");
    assert!(
        reuse.iter().any(|e| e.details["grant"] == "device_code"),
        "{reuse:?}"
    );
}

#[tokio::test]
async fn a_denied_grant_is_access_denied_and_an_expired_one_expired_token() {
    let app = helpers::spawn_app().await;
    let denied = ask(&app, None).await;
    let expiring = ask(&app, Some("tv")).await;

    let (status, view) = admin(
        &app,
        "deny",
        json!({"user_code": denied["user_code"].as_str().unwrap()}),
    )
    .await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["status"], "denied");
    assert_eq!(view["client_id"], Value::Null);
    let denied_code = denied["device_code"].as_str().unwrap();
    assert_eq!(poll_error(&app, denied_code).await, "access_denied");
    assert_eq!(app.audit_events("pairing.denied").len(), 1);

    // Ten minutes later both codes are over.
    wait(&app, 601);
    let expiring_code = expiring["device_code"].as_str().unwrap();
    assert_eq!(poll_error(&app, expiring_code).await, "expired_token");
    let (status, body) = admin(
        &app,
        "approve",
        json!({"user_code": expiring["user_code"].as_str().unwrap()}),
    )
    .await;
    assert_eq!((status, body["error"].as_str()), (410, Some("gone")));
    let (_, view) = admin(
        &app,
        "lookup",
        json!({"user_code": expiring["user_code"].as_str().unwrap()}),
    )
    .await;
    assert_eq!(view["status"], "expired");
    assert!(
        app.running.services.devices.list().unwrap().is_empty(),
        "no device was made"
    );

    // A day after they expired, the pruning job removes both, codes and all.
    wait(&app, 24 * 3600);
    app.running
        .services
        .jobs
        .run(gatehouse::config::JobName::PruneExpired)
        .await
        .unwrap();
    let (status, _) = admin(
        &app,
        "lookup",
        json!({"user_code": expiring["user_code"].as_str().unwrap()}),
    )
    .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn wrong_codes_are_refused_alike_and_count_toward_lockout() {
    let app = helpers::spawn_app_with(&[("GATEHOUSE_LOCKOUT_MAX_FAILURES", "3")]).await;
    let grant = ask(&app, Some("bot")).await;
    let real = grant["device_code"].as_str().unwrap();
    let (id, _) = real.split_once('.').unwrap();

    // A wrong user code at the admin API: 404, audited with its check.
    let (status, body) = admin(&app, "lookup", json!({"user_code": "BBBB-BBBB"})).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (404, Some("unknown_user_code"))
    );
    let (status, _) = admin(&app, "approve", json!({"user_code": "not a code"})).await;
    assert_eq!(status, 404);
    let failed = app.audit_events("pairing.user_code_failed");
    assert_eq!(failed.len(), 2);
    assert_eq!(failed[0].details["check"], "user_code");

    // Wrong device codes: the grant's id with another secret, and garbage.
    for wrong in [format!("{id}.wrong"), "dg_x.y".to_string()] {
        assert_eq!(poll_error(&app, &wrong).await, "invalid_grant");
    }
    let failed = app.audit_events("pairing.device_poll_failed");
    assert_eq!(failed.len(), 2);
    assert_eq!(failed[0].details["check"], "device_code");
    // Four failures with `lockout.max_failures` 3: the address is banned.
    let (status, _) = poll(&app, real).await;
    assert_eq!(
        status, 429,
        "the address is banned now, right codes included"
    );
    assert_eq!(app.running.services.lockout.list().len(), 1);
}

#[tokio::test]
async fn bad_requests_get_clear_errors_and_store_nothing() {
    let app = helpers::spawn_app().await;
    let c = app.client();
    let form = |body: &'static [(&'static str, &'static str)]| {
        c.post(app.url("/v1/token")).form(body).send()
    };
    let cases: [(&[(&str, &str)], &str); 3] = [
        (&[("grant_type", DEVICE_CODE_GRANT)], "invalid_request"),
        (&[("grant_type", "password")], "unsupported_grant_type"),
        (&[("grant_type", "refresh_token")], "invalid_request"),
    ];
    for (body, error) in cases {
        let response = form(body).await.unwrap();
        assert_eq!(response.status(), 400);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"], error, "{body}");
    }
    let response = c
        .post(app.url("/v1/device_authorization"))
        .form(&[("client_id", "bad\u{7}id")])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "invalid_request");
    let response = c
        .post(app.url("/v1/device_authorization"))
        .json(&json!({"client_id": "bot"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 415);
    let response = c
        .post(app.url("/v1/device_grants/approve"))
        .json(&json!({"user_code": "BCDF-GHJK"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401, "approving needs an admin");
    let grant = ask(&app, None).await;
    let (status, body) = admin(
        &app,
        "approve",
        json!({"user_code": grant["user_code"], "name": "\u{202e}evil"}),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request"))
    );
    let (_, view) = admin(&app, "lookup", json!({"user_code": grant["user_code"]})).await;
    assert_eq!(
        view["status"], "pending",
        "a refused approval changes nothing"
    );
    assert!(app.running.services.devices.list().unwrap().is_empty());
}

#[tokio::test]
async fn the_metadata_names_the_endpoint_and_the_grant() {
    let app = helpers::spawn_app().await;
    let metadata: Value = app
        .client()
        .get(app.url("/.well-known/oauth-authorization-server"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let issuer = metadata["issuer"].as_str().unwrap();
    assert_eq!(
        metadata["device_authorization_endpoint"],
        format!("{issuer}/v1/device_authorization")
    );
    assert_eq!(
        metadata["grant_types_supported"],
        json!(["refresh_token", DEVICE_CODE_GRANT])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pair_approve_and_pair_deny_work_from_the_command_line() {
    let app = helpers::spawn_app().await;
    let data = app.data_path().to_path_buf();
    let approved = ask(&app, Some("nas")).await;
    let denied = ask(&app, None).await;
    let code = approved["user_code"].as_str().unwrap().to_lowercase();
    let done = tokio::task::block_in_place(|| {
        let mut cmd = gatehouse(&data);
        cmd.args(["pair", "approve", &code, "--name", "The NAS"]);
        run_ok(cmd)
    });
    assert!(
        done.stdout.starts_with("approved: device dev_") && done.stdout.contains("(The NAS)"),
        "{}",
        done.stdout
    );
    let code = denied["user_code"].as_str().unwrap().to_string();
    let done = tokio::task::block_in_place(|| {
        let mut cmd = gatehouse(&data);
        cmd.args(["pair", "deny", &code]);
        run_ok(cmd)
    });
    assert!(
        done.stdout.starts_with("denied the device"),
        "{}",
        done.stdout
    );
    // Used once: denying it again fails with the reason.
    let done = tokio::task::block_in_place(|| {
        let mut cmd = gatehouse(&data);
        cmd.args(["pair", "deny", &code]);
        run(cmd)
    });
    assert!(!done.status.success());
    assert!(done.stderr.contains("already denied"), "{}", done.stderr);

    wait(&app, 1);
    let (status, pair) = poll(&app, approved["device_code"].as_str().unwrap()).await;
    assert_eq!(status, 200, "{pair}");
    assert_eq!(
        poll_error(&app, denied["device_code"].as_str().unwrap()).await,
        "access_denied"
    );
    let approvals = app.audit_events("pairing.approved");
    assert_eq!(approvals[0].actor, "operator");
}

/// Pruning reads the grants a page at a time: more grants than a page, all expired a day
/// ago, go with their codes, and a grant asked for afterwards stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruning_takes_more_grants_than_a_page_and_spares_live_ones() {
    let app = helpers::spawn_app_with(&[
        ("GATEHOUSE_RATELIMIT_PAIRING", "off"),
        ("GATEHOUSE_RATELIMIT_PER_IP", "off"),
    ])
    .await;
    for _ in 0..11 {
        futures_util::future::join_all((0..100).map(|_| ask(&app, None))).await;
    }
    assert_eq!(app.table_count("device_grants.v1"), 1100);
    wait(&app, 600 + 24 * 3600);
    let live = ask(&app, None).await;
    app.running
        .services
        .jobs
        .run(gatehouse::config::JobName::PruneExpired)
        .await
        .unwrap();
    assert_eq!(app.table_count("device_grants.v1"), 1);
    assert_eq!(app.table_count("device_grant_codes.v1"), 1);
    let (status, _) = admin(
        &app,
        "lookup",
        json!({"user_code": live["user_code"].as_str().unwrap()}),
    )
    .await;
    assert_eq!(status, 200);
    app.stop().await;
}
