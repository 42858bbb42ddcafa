//! Admin users, admin UI sessions, CSRF and CORS, seen from a browser's side: the
//! cookie's attributes, sign-in with a password or a token, what ends a session, and
//! which requests carrying the cookie are refused.

use gatehouse::audit::{Origin, Query};
use reqwest::header::{HeaderMap, HeaderValue};

use crate::helpers::{self, TestApp};

const PASSWORD: &str = "correct horse battery staple";

async fn add_user(app: &TestApp, name: &str) {
    app.running
        .services
        .admin_users
        .add(name, PASSWORD, &Origin::system())
        .await
        .unwrap();
}

/// Signs in with `body`; the response and the session cookie pair (`name=value`).
async fn sign_in(app: &TestApp, body: serde_json::Value) -> (reqwest::Response, Option<String>) {
    let response = app
        .client()
        .post(app.url("/v1/session"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let cookie = response
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(str::to_string);
    (response, cookie)
}

/// Headers a page of the admin UI sends: the cookie, our own origin, and (for changes)
/// the CSRF token.
fn page_headers(app: &TestApp, cookie: &str, csrf: Option<&str>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("cookie", HeaderValue::from_str(cookie).unwrap());
    headers.insert("sec-fetch-site", HeaderValue::from_static("same-origin"));
    headers.insert(
        "origin",
        HeaderValue::from_str(&format!("https://{}", app.running.local_addr)).unwrap(),
    );
    if let Some(csrf) = csrf {
        headers.insert("x-csrf-token", HeaderValue::from_str(csrf).unwrap());
    }
    headers
}

fn events(app: &TestApp, kind: &str) -> Vec<gatehouse::audit::EventView> {
    app.running
        .services
        .audit
        .query(&Query {
            kind: Some(kind.into()),
            limit: 100,
            ..Default::default()
        })
        .unwrap()
        .events
}

#[tokio::test]
async fn a_password_sign_in_gives_a_hardened_cookie_and_a_csrf_token() {
    let app = helpers::spawn_app().await;
    add_user(&app, "alice").await;
    let (response, cookie) = sign_in(
        &app,
        serde_json::json!({"username": "alice", "password": PASSWORD}),
    )
    .await;
    assert_eq!(response.status(), 201);
    let set_cookie = response.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .to_string();
    for part in [
        "__Host-gatehouse_session=",
        "Path=/",
        "Secure",
        "HttpOnly",
        "SameSite=Strict",
        "Max-Age=43200",
    ] {
        assert!(set_cookie.contains(part), "{set_cookie}");
    }
    assert!(!set_cookie.contains("Domain"), "{set_cookie}");
    assert_eq!(response.headers()["cache-control"], "no-store");
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["admin"]["method"], "password");
    assert_eq!(body["admin"]["user"], "alice");
    assert_eq!(body["idle_timeout_seconds"], 1800);
    let csrf = body["csrf_token"].as_str().unwrap().to_string();
    let cookie = cookie.unwrap();

    // Reading needs only the cookie; the session tells the page its CSRF token again.
    let session: serde_json::Value = app
        .client()
        .get(app.url("/v1/session"))
        .headers(page_headers(&app, &cookie, None))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(session["csrf_token"], csrf.as_str());
    let devices = app
        .client()
        .get(app.url("/v1/devices"))
        .headers(page_headers(&app, &cookie, None))
        .send()
        .await
        .unwrap();
    assert_eq!(devices.status(), 200);

    // A change with the cookie and the token, from our own origin, goes through and is
    // audited under the user.
    let rotated = app
        .client()
        .post(app.url("/v1/keys/rotate"))
        .headers(page_headers(&app, &cookie, Some(&csrf)))
        .json(&serde_json::json!({"now": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(rotated.status(), 200, "{:?}", rotated.text().await);
    let rotation = events(&app, "key.rotated");
    assert_eq!(rotation.last().unwrap().actor, "admin:user:alice");
    assert!(
        events(&app, "login.succeeded")
            .iter()
            .any(|e| e.actor == "admin:user:alice")
    );

    // Sign-out ends it.
    let out = app
        .client()
        .delete(app.url("/v1/session"))
        .headers(page_headers(&app, &cookie, Some(&csrf)))
        .send()
        .await
        .unwrap();
    assert_eq!(out.status(), 204);
    assert!(
        out.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
    let after = app
        .client()
        .get(app.url("/v1/devices"))
        .headers(page_headers(&app, &cookie, None))
        .send()
        .await
        .unwrap();
    assert_eq!(after.status(), 401);
    app.stop().await;
}

#[tokio::test]
async fn changes_with_the_cookie_but_no_token_or_from_another_site_are_refused_and_audited() {
    let app = helpers::spawn_app().await;
    add_user(&app, "alice").await;
    let (response, cookie) = sign_in(
        &app,
        serde_json::json!({"username": "alice", "password": PASSWORD}),
    )
    .await;
    let csrf = response.json::<serde_json::Value>().await.unwrap()["csrf_token"]
        .as_str()
        .unwrap()
        .to_string();
    let cookie = cookie.unwrap();
    let keys_before = app.running.services.keys.list();
    let attempts: Vec<(&str, HeaderMap)> = vec![
        ("no token", page_headers(&app, &cookie, None)),
        (
            "a wrong token",
            page_headers(&app, &cookie, Some("not-the-token")),
        ),
        ("another site", {
            let mut h = page_headers(&app, &cookie, Some(&csrf));
            h.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
            h
        }),
        ("another origin", {
            let mut h = page_headers(&app, &cookie, Some(&csrf));
            h.remove("sec-fetch-site");
            h.insert("origin", HeaderValue::from_static("https://evil.example"));
            h
        }),
    ];
    let n = attempts.len();
    for (what, headers) in attempts {
        let response = app
            .client()
            .post(app.url("/v1/keys/rotate"))
            .headers(headers)
            .json(&serde_json::json!({}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 403, "{what}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["error"], "csrf", "{what}");
    }
    assert_eq!(
        app.running.services.keys.list(),
        keys_before,
        "nothing changed"
    );
    let refused = events(&app, "csrf.refused");
    assert_eq!(refused.len(), n);
    assert!(refused.iter().all(|e| e.actor == "admin:user:alice"));

    // A sign-in posted from another site is refused too (login CSRF).
    let mut cross = HeaderMap::new();
    cross.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
    let response = app
        .client()
        .post(app.url("/v1/session"))
        .headers(cross)
        .json(&serde_json::json!({"username": "alice", "password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    app.stop().await;
}

#[tokio::test]
async fn wrong_passwords_are_refused_alike_counted_and_locked_out() {
    let app = helpers::spawn_app_with(&[("GATEHOUSE_LOCKOUT_MAX_FAILURES", "3")]).await;
    add_user(&app, "alice").await;
    for body in [
        serde_json::json!({"username": "alice", "password": "wrong password!!"}),
        serde_json::json!({"username": "nobody", "password": PASSWORD}),
        serde_json::json!({"username": "alice", "password": ""}),
        serde_json::json!({"username": "Not A Name", "password": PASSWORD}),
    ] {
        let (response, cookie) = sign_in(&app, body).await;
        assert_eq!(response.status(), 401);
        assert!(cookie.is_none());
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["error"], "unauthorized");
    }
    let failed = events(&app, "login.failed");
    assert_eq!(failed.len(), 4);
    assert!(
        failed
            .iter()
            .all(|e| e.details["method"] == "admin_password")
    );
    // With lockout.max_failures 3 the fourth failure earned a ban: even the right
    // password now waits.
    let (response, _) = sign_in(
        &app,
        serde_json::json!({"username": "alice", "password": PASSWORD}),
    )
    .await;
    assert_eq!(response.status(), 429);
    let (response, _) = sign_in(&app, serde_json::json!({"username": "alice"})).await;
    assert!(matches!(response.status().as_u16(), 400 | 429));
    app.stop().await;
}

#[tokio::test]
async fn a_revoked_token_a_removed_user_or_a_new_password_ends_the_session() {
    let app = helpers::spawn_app().await;
    add_user(&app, "alice").await;
    add_user(&app, "bob").await;
    let token = app
        .running
        .services
        .admin_tokens
        .create("ui", &Origin::system())
        .await
        .unwrap();
    let (_, by_token) = sign_in(&app, serde_json::json!({"token": token.token})).await;
    let (_, alice) = sign_in(
        &app,
        serde_json::json!({"username": "alice", "password": PASSWORD}),
    )
    .await;
    let (_, bob) = sign_in(
        &app,
        serde_json::json!({"username": "bob", "password": PASSWORD}),
    )
    .await;
    let status = |cookie: String| {
        let app = &app;
        async move {
            app.client()
                .get(app.url("/v1/session"))
                .headers(page_headers(app, &cookie, None))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    for cookie in [&by_token, &alice, &bob] {
        assert_eq!(status(cookie.clone().unwrap()).await, 200);
    }
    let services = &app.running.services;
    services
        .admin_tokens
        .revoke(&token.id, &Origin::system())
        .await
        .unwrap();
    services
        .admin_users
        .set_password("alice", "another long password", &Origin::system())
        .await
        .unwrap();
    services
        .admin_users
        .remove("bob", &Origin::system())
        .await
        .unwrap();
    for cookie in [by_token, alice, bob] {
        assert_eq!(status(cookie.unwrap()).await, 401);
    }
    app.stop().await;
}

#[tokio::test]
async fn cors_answers_only_the_listed_origins() {
    // Default: no CORS headers for anyone.
    let app = helpers::spawn_app().await;
    let response = app
        .client()
        .get(app.url("/healthz"))
        .header("origin", "https://app.example.com")
        .send()
        .await
        .unwrap();
    assert!(
        response
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );
    app.stop().await;

    let app = helpers::spawn_app_with(&[
        ("GATEHOUSE_CORS_ALLOWED_ORIGINS", "https://app.example.com"),
        ("GATEHOUSE_CORS_ALLOW_CREDENTIALS", "true"),
    ])
    .await;
    let allowed = app
        .client()
        .get(app.url("/healthz"))
        .header("origin", "https://app.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    assert_eq!(
        allowed.headers()["access-control-allow-credentials"],
        "true"
    );
    let other = app
        .client()
        .get(app.url("/healthz"))
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());
    let preflight = app
        .client()
        .request(reqwest::Method::OPTIONS, app.url("/v1/devices"))
        .header("origin", "https://app.example.com")
        .header("access-control-request-method", "DELETE")
        .header(
            "access-control-request-headers",
            "authorization, x-csrf-token",
        )
        .send()
        .await
        .unwrap();
    assert!(preflight.status().is_success(), "{}", preflight.status());
    let methods = preflight.headers()["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(methods.contains("DELETE"), "{methods}");
    let headers = preflight.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(
        headers.contains("x-csrf-token") && headers.contains("authorization"),
        "{headers}"
    );
    let refused = app
        .client()
        .request(reqwest::Method::OPTIONS, app.url("/v1/devices"))
        .header("origin", "https://evil.example")
        .header("access-control-request-method", "DELETE")
        .send()
        .await
        .unwrap();
    assert!(
        refused
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );
    app.stop().await;
}

/// `gatehouse admin-user add|passwd|list|remove` through the real binary, on the data
/// file directly and through a running server's admin socket; the password comes as one
/// line on standard input.
#[test]
fn the_admin_user_commands_work_offline_and_online() {
    use std::io::Write;
    use std::process::Stdio;

    use crate::binary::{Server, create_instance, gatehouse, serve_cmd};

    let dir = tempfile::tempdir().unwrap();
    let data = create_instance(dir.path());
    let run = |args: &[&str], stdin: &str| {
        let mut cmd = gatehouse(&data);
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, out, err) = run(&["admin-user", "add", "alice"], &format!("{PASSWORD}\n"));
    assert!(ok, "{out}{err}");
    assert!(out.contains("added admin user alice"));
    let (ok, _, err) = run(&["admin-user", "add", "alice"], &format!("{PASSWORD}\n"));
    assert!(
        !ok && err.contains("already an admin user named alice"),
        "{err}"
    );
    let (ok, _, err) = run(&["admin-user", "add", "bob"], "short\n");
    assert!(!ok && err.contains("at least 12 characters"), "{err}");

    let server = Server::start_ok(serve_cmd(&data));
    let (ok, out, err) = run(&["admin-user", "passwd", "alice"], "a brand new password\n");
    assert!(ok, "{out}{err}");
    let (ok, out, _) = run(&["admin-user", "list", "--json"], "");
    assert!(ok);
    let users: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(users[0]["name"], "alice");
    assert!(!out.contains("argon2"), "no hash is ever shown: {out}");
    let (ok, out, err) = run(&["admin-user", "remove", "alice"], "");
    assert!(ok && out.contains("removed admin user alice"), "{out}{err}");
    let (ok, _, err) = run(&["admin-user", "remove", "alice"], "");
    assert!(!ok && err.contains("no admin user is named alice"), "{err}");
    server.stop_ok();
}
