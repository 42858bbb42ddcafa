//! `POST /v1/admin-users` and `GET /v1/admin-users`: the first admin user made with the
//! bootstrap token (what the admin UI's setup link does), then signing in with it; the
//! refusals (no credentials, a taken name, bad input) and the audit record.

use serde_json::{Value, json};

use crate::audit::events_with;
use crate::helpers::{self, TestApp};

const PASSWORD: &str = "correct horse battery staple";

/// The names `GET /v1/admin-users` lists.
async fn names(app: &TestApp) -> Vec<String> {
    let listed: Value = app
        .client()
        .get(app.url("/v1/admin-users"))
        .bearer_auth(app.admin_token())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    listed["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["username"].as_str().unwrap().to_string())
        .collect()
}

async fn create(app: &TestApp, token: Option<&str>, body: Value) -> (u16, Value) {
    let mut request = app.client().post(app.url("/v1/admin-users")).json(&body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

#[tokio::test]
async fn the_bootstrap_token_makes_the_first_user_who_then_signs_in() {
    let app = helpers::spawn_app().await;
    let token = app.admin_token();
    let (status, user) = create(
        &app,
        Some(&token),
        json!({"username": "ada", "password": PASSWORD}),
    )
    .await;
    assert_eq!(status, 201, "{user}");
    assert_eq!(user["username"], "ada");
    assert_eq!(user["created_at"], "2026-11-23T00:00:00Z");
    assert_eq!(user["password_changed_at"], user["created_at"]);
    let keys: Vec<&str> = user
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        ["created_at", "password_changed_at", "username"],
        "no password, no hash"
    );

    // Listed, without secrets.
    let listed: Value = app
        .client()
        .get(app.url("/v1/admin-users"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed, json!({"users": [user]}));
    assert!(!listed.to_string().contains("argon2"));

    // The new credentials open a session.
    let response = app
        .client()
        .post(app.url("/v1/session"))
        .json(&json!({"username": "ada", "password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let session: Value = response.json().await.unwrap();
    assert_eq!(session["admin"]["method"], "password");
    assert_eq!(session["admin"]["user"], "ada");

    // Audited as the CLI's path is, with the token that made it as the actor.
    let created = events_with(&app, "admin_user.created", "name", "ada");
    assert_eq!(created.len(), 1, "{created:?}");
    let token_id = token.split('_').nth(1).unwrap();
    assert_eq!(created[0].actor, format!("admin:{token_id}"));
    assert_eq!(created[0].severity, "notice");
    assert_eq!(created[0].source.as_deref(), Some("127.0.0.1"));
    app.stop().await;
}

#[tokio::test]
async fn a_session_with_its_csrf_token_may_make_a_user_too() {
    let app = helpers::spawn_app().await;
    let signed_in = app
        .client()
        .post(app.url("/v1/session"))
        .json(&json!({"token": app.admin_token()}))
        .send()
        .await
        .unwrap();
    let cookie = signed_in.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let csrf = signed_in.json::<Value>().await.unwrap()["csrf_token"]
        .as_str()
        .unwrap()
        .to_string();
    let post = |csrf: Option<&str>| {
        let mut request = app
            .client()
            .post(app.url("/v1/admin-users"))
            .header("cookie", &cookie)
            .header("sec-fetch-site", "same-origin")
            .json(&json!({"username": "grace", "password": PASSWORD}));
        if let Some(csrf) = csrf {
            request = request.header("x-csrf-token", csrf);
        }
        request.send()
    };
    assert_eq!(post(None).await.unwrap().status(), 403, "no CSRF token");
    assert_eq!(post(Some(&csrf)).await.unwrap().status(), 201);
    app.stop().await;
}

#[tokio::test]
async fn refusals_no_credentials_a_taken_name_and_bad_input() {
    let app = helpers::spawn_app().await;
    let token = app.admin_token();
    let good = json!({"username": "ada", "password": PASSWORD});

    // No credentials, or a wrong token: 401 with the admin challenge, nothing made.
    let (status, body) = create(&app, None, good.clone()).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"], "unauthorized");
    let (status, _) = create(&app, Some("gha_0000000000000000_wrong"), good.clone()).await;
    assert_eq!(status, 401);
    let response = app
        .client()
        .get(app.url("/v1/admin-users"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert!(response.headers().contains_key("www-authenticate"));
    assert!(names(&app).await.is_empty());

    // A taken name: 409, the first user unchanged.
    assert_eq!(create(&app, Some(&token), good.clone()).await.0, 201);
    let (status, body) = create(
        &app,
        Some(&token),
        json!({"username": "ada", "password": "another long password"}),
    )
    .await;
    assert_eq!(status, 409);
    assert_eq!(body["error"], "conflict");
    assert_eq!(body["message"], "there is already an admin user named ada");

    // Bad input: 400 with a message that says what is wrong.
    for (bad, says) in [
        (
            json!({"username": "Ada Lovelace", "password": PASSWORD}),
            "a user name is 1 to 64 characters",
        ),
        (
            json!({"username": "", "password": PASSWORD}),
            "a user name is 1 to 64 characters",
        ),
        (
            json!({"username": "bob", "password": "short"}),
            "a password is at least 12 characters",
        ),
        (
            json!({"username": "bob", "password": "x".repeat(257)}),
            "at most 256 characters",
        ),
        (json!({"username": "bob"}), "missing field `password`"),
        (
            json!({"username": "bob", "password": PASSWORD, "admin": true}),
            "unknown field `admin`",
        ),
        (json!(["bob", PASSWORD]), "JSON object"),
    ] {
        let (status, body) = create(&app, Some(&token), bad.clone()).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(body["error"], "invalid_request", "{bad}");
        let message = body["message"].as_str().unwrap();
        assert!(message.contains(says), "{bad}: {message}");
    }
    // A member given twice is refused, not resolved to the last.
    let response = app
        .client()
        .post(app.url("/v1/admin-users"))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body(format!(
            r#"{{"username": "bob", "username": "root", "password": "{PASSWORD}"}}"#
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["message"].as_str().unwrap().contains("appears twice"),
        "{body}"
    );
    // Not JSON: 415.
    let response = app
        .client()
        .post(app.url("/v1/admin-users"))
        .bearer_auth(&token)
        .body("username=bob")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 415);

    assert_eq!(names(&app).await, ["ada"], "no refused request made a user");
    app.stop().await;
}
