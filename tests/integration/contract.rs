//! The API contract: every operation of `schema/openapi.yaml` called on a live server,
//! successes and refusals, and each answer checked against the document.
//!
//! For every answer: the status is one the operation lists (not merely `default`), the
//! `Content-Type` is one of that response's media types (no body when it has none), a
//! JSON body validates against the response's schema (JSON Schema 2020-12, `$ref`s
//! resolved inside the document, formats asserted), every required header is present
//! and every documented header that is present matches its schema, and an error body's
//! `request_id` is the `x-request-id` header. The tests also assert the status each case
//! expects, so a case that drifts into another documented answer is caught too.

use std::sync::OnceLock;

use reqwest::{Method, RequestBuilder};
use serde_json::{Value, json};

use crate::helpers::{self, TestApp};

/// The OpenAPI document as JSON.
fn spec() -> &'static Value {
    static SPEC: OnceLock<Value> = OnceLock::new();
    SPEC.get_or_init(|| {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/schema/openapi.yaml");
        let text = std::fs::read_to_string(path).expect("schema/openapi.yaml is readable");
        serde_norway::from_str(&text).expect("schema/openapi.yaml parses")
    })
}

/// Follows `$ref`s that point inside the document (`#/…`).
fn resolve(mut value: &Value) -> &Value {
    while let Some(reference) = value.get("$ref").and_then(Value::as_str) {
        let pointer = reference
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("only local $refs are used: {reference}"));
        value = spec()
            .pointer(pointer)
            .unwrap_or_else(|| panic!("$ref {reference} names nothing"));
    }
    value
}

/// Validates `instance` against `schema` (a schema inside the document, whose `$ref`s
/// are resolved against the document's `components`).
fn validate(schema: &Value, instance: &Value, what: &str) {
    let root = json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "components": spec()["components"],
        "allOf": [schema],
    });
    let validator = jsonschema::draft202012::options()
        .should_validate_formats(true)
        .with_format("int32", |text: &str| text.parse::<i32>().is_ok())
        .build(&root)
        .unwrap_or_else(|err| panic!("{what}: the schema does not compile: {err}"));
    let errors: Vec<String> = validator
        .iter_errors(instance)
        .map(|err| format!("{err} (at {})", err.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{what}: the answer breaks its schema:\n  {}\nanswer: {instance}",
        errors.join("\n  ")
    );
}

/// A checked answer.
#[derive(Debug)]
struct Answer {
    headers: reqwest::header::HeaderMap,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
}

/// Sends `request`, asserts that it answers `status`, and checks the answer against the
/// operation `op` ("METHOD /path/{template}") of the document. A case that sends a
/// method the path does not take (405) names the path's documented operation.
async fn expect(op: &str, status: u16, request: RequestBuilder) -> Answer {
    let (method, template) = op.split_once(' ').expect("op is METHOD PATH");
    let operation = &spec()["paths"][template][method.to_ascii_lowercase()];
    assert!(operation.is_object(), "{op} is not in the document");
    let responses = &operation["responses"];
    let documented = responses.get(status.to_string());
    let (answer, got) = send(request).await;
    assert_eq!(
        got,
        status,
        "{op}: expected {status}, got {got}: {}",
        String::from_utf8_lossy(&answer.body)
    );
    let response = documented.unwrap_or_else(|| {
        panic!(
            "{op}: status {status} is not one the document lists for it (it lists {:?})",
            responses.as_object().map(|m| m.keys().collect::<Vec<_>>())
        )
    });
    check_response(&format!("{op} → {status}"), resolve(response), &answer);
    answer
}

/// For a path the document does not have: the generic `Error` response.
async fn expect_unlisted_path(status: u16, request: RequestBuilder) -> Answer {
    let (answer, got) = send(request).await;
    assert_eq!(got, status, "{}", String::from_utf8_lossy(&answer.body));
    let response = resolve(&spec()["components"]["responses"]["Error"]);
    check_response(&format!("unlisted path → {status}"), response, &answer);
    answer
}

async fn send(request: RequestBuilder) -> (Answer, u16) {
    let response = request.send().await.expect("the request is answered");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.bytes().await.expect("the body is read").to_vec();
    (Answer { headers, body }, status)
}

fn media_type(answer: &Answer) -> Option<String> {
    answer
        .headers
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
        })
}

fn is_json(media: &str) -> bool {
    media == "application/json" || media.ends_with("+json")
}

fn check_response(what: &str, response: &Value, answer: &Answer) {
    // Headers: the required ones are there, and those present match their schema.
    if let Some(headers) = response.get("headers").and_then(Value::as_object) {
        for (name, header) in headers {
            let header = resolve(header);
            let value = answer.headers.get(name.as_str());
            let required = header["required"].as_bool().unwrap_or(false);
            let Some(value) = value else {
                assert!(!required, "{what}: the required header {name} is missing");
                continue;
            };
            let text = value
                .to_str()
                .unwrap_or_else(|_| panic!("{what}: header {name} is not text"));
            if let Some(schema) = header.get("schema") {
                let wants_integer = resolve(schema)["type"] == "integer";
                let instance = match text.parse::<i64>() {
                    Ok(n) if wants_integer => json!(n),
                    _ => json!(text),
                };
                validate(schema, &instance, &format!("{what}, header {name}"));
            }
        }
    }
    // The body: one of the documented media types, and its schema.
    let Some(content) = response.get("content").and_then(Value::as_object) else {
        assert!(
            answer.body.is_empty(),
            "{what}: the document gives this answer no body, but it has {} bytes",
            answer.body.len()
        );
        return;
    };
    let media = media_type(answer).unwrap_or_else(|| panic!("{what}: no Content-Type"));
    let Some(entry) = content.get(&media) else {
        panic!(
            "{what}: Content-Type {media} is not one the document lists ({:?})",
            content.keys().collect::<Vec<_>>()
        );
    };
    let schema = entry.get("schema").unwrap_or(&Value::Bool(true));
    if is_json(&media) {
        let body: Value = serde_json::from_slice(&answer.body)
            .unwrap_or_else(|err| panic!("{what}: the {media} body is not JSON: {err}"));
        validate(schema, &body, what);
        if let Some(id) = body.get("request_id").and_then(Value::as_str) {
            let header = answer
                .headers
                .get("x-request-id")
                .and_then(|v| v.to_str().ok());
            assert_eq!(Some(id), header, "{what}: request_id is the x-request-id");
        }
    } else if media.starts_with("text/") || media.ends_with("+xml") || media.ends_with("+jwt") {
        let text = std::str::from_utf8(&answer.body)
            .unwrap_or_else(|_| panic!("{what}: the {media} body is not UTF-8"));
        assert!(!text.is_empty(), "{what}: an empty {media} body");
        validate(schema, &json!(text), what);
    } else {
        assert!(!answer.body.is_empty(), "{what}: an empty {media} body");
    }
}

/// Requests to one test server, as anyone or as its admin.
struct Api<'a> {
    app: &'a TestApp,
    client: reqwest::Client,
    admin: String,
}

impl<'a> Api<'a> {
    fn new(app: &'a TestApp) -> Self {
        Self {
            app,
            client: app.client(),
            admin: app.admin_token(),
        }
    }

    fn anyone(&self, method: Method, path: &str) -> RequestBuilder {
        self.client.request(method, self.app.url(path))
    }

    fn admin(&self, method: Method, path: &str) -> RequestBuilder {
        self.anyone(method, path).bearer_auth(&self.admin)
    }

    /// Opens a pairing session: `(session_id, secret)`.
    async fn session(&self) -> (String, String) {
        let body = expect(
            "POST /v1/pairing/sessions",
            201,
            self.admin(Method::POST, "/v1/pairing/sessions")
                .json(&json!({"name": "contract", "ttl_seconds": 300})),
        )
        .await
        .json();
        (
            body["session_id"].as_str().expect("session_id").into(),
            body["secret"].as_str().expect("secret").into(),
        )
    }

    /// Pairs a device: the token pair.
    async fn pair(&self) -> Value {
        let (session_id, secret) = self.session().await;
        expect(
            "POST /v1/pair",
            200,
            self.anyone(Method::POST, "/v1/pair")
                .json(&pair_body(&session_id, &secret)),
        )
        .await
        .json()
    }
}

fn pair_body(session_id: &str, secret: &str) -> Value {
    json!({
        "session_id": session_id,
        "secret": secret,
        "device": {"name": "Contract phone", "platform": "android", "app_version": "1.0.0"},
    })
}

/// A body one byte over the default limit (64 KiB), sent with its `Content-Length`.
/// What every body-taking POST answers alike: 405 to a GET, and 413 to a body of
/// `content_type` over the limit. `call` builds a request as the operation's caller.
async fn expect_405_and_413(
    op: &str,
    path: &str,
    content_type: &str,
    call: impl Fn(Method, &str) -> RequestBuilder,
) {
    expect(op, 405, call(Method::GET, path)).await;
    expect(
        op,
        413,
        call(Method::POST, path)
            .header("content-type", content_type)
            .body(oversized()),
    )
    .await;
}

fn oversized() -> Vec<u8> {
    vec![b'a'; 65_537]
}

const NO_SUCH_DEVICE: &str = "/v1/devices/dev_00000000000000000000000000000000";
const NO_SUCH_SESSION: &str = "ps_00000000000000000000000000000000";

#[tokio::test]
async fn probes_and_discovery_answer_as_documented() {
    let app = helpers::spawn_app().await;
    let api = Api::new(&app);
    for (op, path) in [
        ("GET /healthz", "/healthz"),
        ("GET /readyz", "/readyz"),
        ("GET /.well-known/jwks.json", "/.well-known/jwks.json"),
        (
            "GET /.well-known/oauth-authorization-server",
            "/.well-known/oauth-authorization-server",
        ),
    ] {
        expect(op, 200, api.anyone(Method::GET, path)).await;
        expect(op, 405, api.anyone(Method::POST, path)).await;
        expect(
            op,
            413,
            api.anyone(Method::GET, path)
                .header("content-type", "application/json")
                .body(oversized()),
        )
        .await;
    }
    // A loopback caller needs no credentials.
    let metrics = expect("GET /metrics", 200, api.anyone(Method::GET, "/metrics")).await;
    assert!(String::from_utf8_lossy(&metrics.body).contains("gatehouse_build_info"));
    expect("GET /metrics", 405, api.anyone(Method::POST, "/metrics")).await;
    // Every other path is a 404 with the error body.
    expect_unlisted_path(404, api.anyone(Method::GET, "/v1/nothing-here")).await;
    expect_unlisted_path(404, api.admin(Method::GET, "/admin/nothing-here")).await;
    app.stop().await;
}

#[tokio::test]
async fn status_lists_answer_as_documented() {
    let app = helpers::spawn_app().await;
    let api = Api::new(&app);
    let op = "GET /v1/statuslists/{list}";
    // No token names a list yet.
    expect(op, 404, api.anyone(Method::GET, "/v1/statuslists/0")).await;
    api.pair().await;
    let list = expect(op, 200, api.anyone(Method::GET, "/v1/statuslists/0")).await;
    assert_eq!(list.headers["cache-control"], "private, max-age=60");
    expect(op, 404, api.anyone(Method::GET, "/v1/statuslists/9")).await;
    expect(op, 400, api.anyone(Method::GET, "/v1/statuslists/007")).await;
    expect(op, 400, api.anyone(Method::GET, "/v1/statuslists/x")).await;
    expect(op, 405, api.anyone(Method::POST, "/v1/statuslists/0")).await;
    expect(
        op,
        413,
        api.anyone(Method::GET, "/v1/statuslists/0")
            .header("content-type", "application/json")
            .body(oversized()),
    )
    .await;
    app.stop().await;
}

#[tokio::test]
async fn an_es256_jwks_matches_its_schema() {
    let app = helpers::spawn_app_with(&[("GATEHOUSE_KEY_ALGORITHM", "ES256")]).await;
    let api = Api::new(&app);
    let jwks = expect(
        "GET /.well-known/jwks.json",
        200,
        api.anyone(Method::GET, "/.well-known/jwks.json"),
    )
    .await
    .json();
    assert_eq!(jwks["keys"][0]["kty"], "EC");
    let pair = api.pair().await;
    expect(
        "POST /v1/introspect",
        200,
        api.admin(Method::POST, "/v1/introspect")
            .form(&[("token", pair["access_token"].as_str().unwrap())]),
    )
    .await;
    app.stop().await;
}

#[tokio::test]
async fn pairing_and_tokens_answer_as_documented() {
    let app = helpers::spawn_app().await;
    let api = Api::new(&app);

    // Pairing sessions.
    let op = "POST /v1/pairing/sessions";
    let path = "/v1/pairing/sessions";
    let (session_id, secret) = api.session().await;
    expect(op, 201, api.admin(Method::POST, path).json(&json!({}))).await;
    // A number that is exactly an integer is one, however it is written (JSON Schema
    // counts it so).
    for ttl in ["300.0", "3e2", "3.0E2"] {
        expect(
            op,
            201,
            api.admin(Method::POST, path)
                .header("content-type", "application/json")
                .body(format!(r#"{{"ttl_seconds": {ttl}}}"#)),
        )
        .await;
    }
    for bad in [
        json!({"name": "x", "colour": "red"}),
        json!({"ttl_seconds": 5}),
        json!({"ttl_seconds": 300.5}),
        json!({"ttl_seconds": 1e300}),
        json!({"name": ""}),
        json!({"ttl_seconds": "long"}),
    ] {
        expect(op, 400, api.admin(Method::POST, path).json(&bad)).await;
    }
    expect(
        op,
        400,
        api.admin(Method::POST, path)
            .header("content-type", "application/json")
            .body("{not json"),
    )
    .await;
    expect(op, 401, api.anyone(Method::POST, path).json(&json!({}))).await;
    expect(
        op,
        401,
        api.anyone(Method::POST, path)
            .bearer_auth("gha_0000000000000000_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")
            .json(&json!({})),
    )
    .await;
    expect(
        op,
        415,
        api.admin(Method::POST, path)
            .header("content-type", "text/plain")
            .body("{}"),
    )
    .await;
    expect_405_and_413(op, path, "application/json", |m, p| api.admin(m, p)).await;

    // The QR codes of the open session, and of unknown ones.
    for (op, suffix) in [
        ("GET /v1/pairing/sessions/{id}/qr.svg", "qr.svg"),
        ("GET /v1/pairing/sessions/{id}/qr.png", "qr.png"),
    ] {
        let qr = |id: &str| format!("/v1/pairing/sessions/{id}/{suffix}");
        expect(op, 200, api.admin(Method::GET, &qr(&session_id))).await;
        expect(op, 404, api.admin(Method::GET, &qr(NO_SUCH_SESSION))).await;
        expect(op, 404, api.admin(Method::GET, &qr("not-a-session"))).await;
        expect(op, 401, api.anyone(Method::GET, &qr(&session_id))).await;
        expect(op, 405, api.admin(Method::POST, &qr(&session_id))).await;
    }

    // Pairing.
    let op = "POST /v1/pair";
    let path = "/v1/pair";
    expect(
        op,
        400,
        api.anyone(Method::POST, path)
            .json(&json!({"session_id": session_id, "secret": secret})),
    )
    .await;
    let mut blank_name = pair_body(&session_id, &secret);
    blank_name["device"]["name"] = json!("  ");
    expect(op, 400, api.anyone(Method::POST, path).json(&blank_name)).await;
    expect(
        op,
        401,
        api.anyone(Method::POST, path)
            .json(&pair_body(NO_SUCH_SESSION, &secret)),
    )
    .await;
    expect(
        op,
        415,
        api.anyone(Method::POST, path)
            .form(&[("session_id", session_id.as_str())]),
    )
    .await;
    expect_405_and_413(op, path, "application/json", |m, p| api.anyone(m, p)).await;
    let pair = expect(
        op,
        200,
        api.anyone(Method::POST, path)
            .json(&pair_body(&session_id, &secret)),
    )
    .await
    .json();
    // A claimed session: pairing again fails, its QR code is gone.
    expect(
        op,
        401,
        api.anyone(Method::POST, path)
            .json(&pair_body(&session_id, &secret)),
    )
    .await;
    for (op, suffix) in [
        ("GET /v1/pairing/sessions/{id}/qr.svg", "qr.svg"),
        ("GET /v1/pairing/sessions/{id}/qr.png", "qr.png"),
    ] {
        let qr = format!("/v1/pairing/sessions/{session_id}/{suffix}");
        expect(op, 410, api.admin(Method::GET, &qr)).await;
    }

    // The refresh grant.
    let op = "POST /v1/token";
    let path = "/v1/token";
    let refresh = pair["refresh_token"].as_str().unwrap().to_string();
    let next = expect(
        op,
        200,
        api.anyone(Method::POST, path)
            .form(&[("grant_type", "refresh_token"), ("refresh_token", &refresh)]),
    )
    .await
    .json();
    for form in [
        vec![("grant_type", "password"), ("refresh_token", "x")],
        vec![("grant_type", "refresh_token")],
        vec![("refresh_token", refresh.as_str())],
        vec![
            ("grant_type", "refresh_token"),
            ("refresh_token", "ghr_nope"),
        ],
        vec![
            ("grant_type", "refresh_token"),
            ("grant_type", "refresh_token"),
            ("refresh_token", "x"),
        ],
    ] {
        expect(op, 400, api.anyone(Method::POST, path).form(&form)).await;
    }
    expect(
        op,
        415,
        api.anyone(Method::POST, path)
            .json(&json!({"grant_type": "refresh_token"})),
    )
    .await;
    expect_405_and_413(op, path, "application/x-www-form-urlencoded", |m, p| {
        api.anyone(m, p)
    })
    .await;

    // Introspection: an admin, a registered client, and refusals.
    let op = "POST /v1/introspect";
    let path = "/v1/introspect";
    let access = next["access_token"].as_str().unwrap().to_string();
    let refresh = next["refresh_token"].as_str().unwrap().to_string();
    for token in [access.as_str(), refresh.as_str(), "not-a-token"] {
        expect(
            op,
            200,
            api.admin(Method::POST, path).form(&[("token", token)]),
        )
        .await;
    }
    let client = app
        .running
        .services
        .clients
        .create("contract", &gatehouse::audit::Origin::operator())
        .await
        .unwrap();
    expect(
        op,
        200,
        api.anyone(Method::POST, path)
            .basic_auth(client.client_id.to_string(), Some(&client.client_secret))
            .form(&[("token", access.as_str())]),
    )
    .await;
    expect(
        op,
        401,
        api.anyone(Method::POST, path)
            .form(&[("token", access.as_str())]),
    )
    .await;
    expect(
        op,
        401,
        api.anyone(Method::POST, path)
            .basic_auth("cli_00000000000000000000000000000000", Some("ghc_wrong"))
            .form(&[("token", access.as_str())]),
    )
    .await;
    expect(
        op,
        400,
        api.admin(Method::POST, path)
            .form(&[("token_type_hint", "x")]),
    )
    .await;
    expect(
        op,
        415,
        api.admin(Method::POST, path)
            .json(&json!({"token": access})),
    )
    .await;
    expect_405_and_413(op, path, "application/x-www-form-urlencoded", |m, p| {
        api.admin(m, p)
    })
    .await;

    // Revocation.
    let op = "POST /v1/revoke";
    let path = "/v1/revoke";
    for token in [access.as_str(), refresh.as_str(), "not-a-token"] {
        expect(
            op,
            200,
            api.anyone(Method::POST, path).form(&[("token", token)]),
        )
        .await;
    }
    expect(
        op,
        400,
        api.anyone(Method::POST, path)
            .form(&[("token_type_hint", "x")]),
    )
    .await;
    expect(
        op,
        415,
        api.anyone(Method::POST, path)
            .json(&json!({"token": access})),
    )
    .await;
    expect_405_and_413(op, path, "application/x-www-form-urlencoded", |m, p| {
        api.anyone(m, p)
    })
    .await;
    // The revoked tokens are inactive now.
    let inactive = expect(
        "POST /v1/introspect",
        200,
        api.admin(Method::POST, "/v1/introspect")
            .form(&[("token", access.as_str())]),
    )
    .await
    .json();
    assert_eq!(inactive, json!({"active": false}));

    // The WebSocket path refuses what is not an upgrade.
    expect("GET /v1/ws", 405, api.anyone(Method::POST, "/v1/ws")).await;
    expect("GET /v1/ws", 400, api.anyone(Method::GET, "/v1/ws")).await;
    app.stop().await;
}

#[tokio::test]
async fn forward_auth_answers_as_documented() {
    let app = helpers::spawn_app().await;
    let api = Api::new(&app);
    let op = "GET /v1/authz";
    let path = "/v1/authz";
    let pair = api.pair().await;
    let access = pair["access_token"].as_str().unwrap();
    let allowed = expect(op, 200, api.anyone(Method::GET, path).bearer_auth(access)).await;
    assert_eq!(
        allowed.headers["x-gatehouse-device-id"].to_str().unwrap(),
        pair["device_id"].as_str().unwrap()
    );
    expect(op, 200, api.anyone(Method::HEAD, path).bearer_auth(access)).await;
    let none = expect(op, 401, api.anyone(Method::GET, path)).await;
    assert_eq!(none.json()["error"], "unauthorized");
    // An admin token is no device token.
    let invalid = expect(op, 401, api.admin(Method::GET, path)).await;
    assert_eq!(invalid.json()["error"], "invalid_token");
    expect(op, 405, api.anyone(Method::POST, path).bearer_auth(access)).await;
    expect(
        op,
        413,
        api.anyone(Method::GET, path)
            .bearer_auth(access)
            .header("content-type", "application/json")
            .body(oversized()),
    )
    .await;
    app.stop().await;
}

/// The front door's view, with a route whose app answers and one whose app is down.
#[tokio::test]
async fn the_front_door_view_answers_as_documented() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = format!("http://{}", listener.local_addr().unwrap());
    let down = format!("http://127.0.0.1:{}", helpers::free_port());
    let app = helpers::spawn_app_with(&[("GATEHOUSE_UPSTREAM", up.as_str())]).await;
    let api = Api::new(&app);
    let view = expect("GET /v1/front", 200, api.admin(Method::GET, "/v1/front"))
        .await
        .json();
    assert_eq!(view["routes"][0]["reachable"], true, "{view}");
    drop(listener);
    let app2 = helpers::spawn_app_with(&[("GATEHOUSE_UPSTREAM", down.as_str())]).await;
    let api2 = Api::new(&app2);
    let view = expect("GET /v1/front", 200, api2.admin(Method::GET, "/v1/front"))
        .await
        .json();
    assert_eq!(view["routes"][0]["reachable"], false, "{view}");
    assert!(view["routes"][0]["error"].is_string(), "{view}");
    app.stop().await;
    app2.stop().await;
}

#[tokio::test]
async fn device_grants_answer_as_documented() {
    let app = helpers::spawn_app().await;
    let api = Api::new(&app);
    let grant_type = "urn:ietf:params:oauth:grant-type:device_code";

    // The device's request.
    let op = "POST /v1/device_authorization";
    let path = "/v1/device_authorization";
    let ask = || async {
        expect(
            op,
            200,
            api.anyone(Method::POST, path)
                .form(&[("client_id", "contract-tv"), ("scope", "x")]),
        )
        .await
        .json()
    };
    let first = ask().await;
    let second = ask().await;
    let third = ask().await;
    expect(op, 200, api.anyone(Method::POST, path).form(&[("x", "y")])).await;
    expect(
        op,
        400,
        api.anyone(Method::POST, path)
            .form(&[("client_id", " leading space")]),
    )
    .await;
    expect(
        op,
        400,
        api.anyone(Method::POST, path)
            .form(&[("client_id", "a"), ("client_id", "b")]),
    )
    .await;
    expect(
        op,
        415,
        api.anyone(Method::POST, path)
            .json(&json!({"client_id": "x"})),
    )
    .await;
    expect_405_and_413(op, path, "application/x-www-form-urlencoded", |m, p| {
        api.anyone(m, p)
    })
    .await;

    // Polling: pending, too fast, no such code, then the pair once approved.
    let op = "POST /v1/token";
    let poll = |code: &serde_json::Value| {
        api.anyone(Method::POST, "/v1/token").form(&[
            ("grant_type", grant_type),
            ("device_code", code.as_str().unwrap()),
        ])
    };
    let code = &first["device_code"];
    assert_eq!(
        expect(op, 400, poll(code)).await.json()["error"],
        "authorization_pending"
    );
    assert_eq!(
        expect(op, 400, poll(code)).await.json()["error"],
        "slow_down"
    );
    expect(op, 400, poll(&json!("dg_x.y"))).await;
    expect(
        op,
        400,
        api.anyone(Method::POST, "/v1/token")
            .form(&[("grant_type", grant_type)]),
    )
    .await;

    // The operator's side.
    for (op, path) in [
        ("POST /v1/device_grants/lookup", "/v1/device_grants/lookup"),
        (
            "POST /v1/device_grants/approve",
            "/v1/device_grants/approve",
        ),
        ("POST /v1/device_grants/deny", "/v1/device_grants/deny"),
    ] {
        expect(
            op,
            404,
            api.admin(Method::POST, path)
                .json(&json!({"user_code": "BBBB-BBBB"})),
        )
        .await;
        expect(
            op,
            401,
            api.anyone(Method::POST, path)
                .json(&json!({"user_code": first["user_code"]})),
        )
        .await;
        expect(op, 400, api.admin(Method::POST, path).json(&json!({}))).await;
        expect(
            op,
            400,
            api.admin(Method::POST, path)
                .json(&json!({"user_code": first["user_code"], "extra": 1})),
        )
        .await;
        expect(
            op,
            415,
            api.admin(Method::POST, path)
                .form(&[("user_code", "BCDF-GHJK")]),
        )
        .await;
        expect_405_and_413(op, path, "application/json", |m, p| api.admin(m, p)).await;
    }
    let op = "POST /v1/device_grants/lookup";
    expect(
        op,
        200,
        api.admin(Method::POST, "/v1/device_grants/lookup")
            .json(&json!({"user_code": first["user_code"]})),
    )
    .await;
    let op = "POST /v1/device_grants/approve";
    let path = "/v1/device_grants/approve";
    expect(
        op,
        400,
        api.admin(Method::POST, path)
            .json(&json!({"user_code": first["user_code"], "name": ""})),
    )
    .await;
    expect(
        op,
        200,
        api.admin(Method::POST, path)
            .json(&json!({"user_code": first["user_code"], "name": "TV"})),
    )
    .await;
    expect(
        op,
        409,
        api.admin(Method::POST, path)
            .json(&json!({"user_code": first["user_code"]})),
    )
    .await;
    let op = "POST /v1/device_grants/deny";
    expect(
        op,
        200,
        api.admin(Method::POST, "/v1/device_grants/deny")
            .json(&json!({"user_code": second["user_code"]})),
    )
    .await;
    expect(
        op,
        409,
        api.admin(Method::POST, "/v1/device_grants/deny")
            .json(&json!({"user_code": second["user_code"]})),
    )
    .await;
    app.clock.advance_ms(10_000);
    expect("POST /v1/token", 200, poll(code)).await;
    assert_eq!(
        expect("POST /v1/token", 400, poll(&second["device_code"]))
            .await
            .json()["error"],
        "access_denied"
    );
    // Past its lifetime, undecided.
    app.clock.advance_ms(600_000);
    assert_eq!(
        expect("POST /v1/token", 400, poll(&third["device_code"]))
            .await
            .json()["error"],
        "expired_token"
    );
    for (op, path) in [
        (
            "POST /v1/device_grants/approve",
            "/v1/device_grants/approve",
        ),
        ("POST /v1/device_grants/deny", "/v1/device_grants/deny"),
    ] {
        expect(
            op,
            410,
            api.admin(Method::POST, path)
                .json(&json!({"user_code": third["user_code"]})),
        )
        .await;
    }
}

#[tokio::test]
async fn dpop_answers_as_documented() {
    use crate::dpop::DeviceKey;
    let app = helpers::spawn_app_with(&[("GATEHOUSE_TRUSTED_PROXIES", "127.0.0.1/32")]).await;
    let api = Api::new(&app);
    let issuer = app.running.services.tokens.settings().issuer.clone();
    let now = {
        use gatehouse::clock::Clock as _;
        app.clock.now_ms() / 1000
    };
    let key = DeviceKey::ed25519();
    let (session_id, secret) = api.session().await;
    let op = "POST /v1/pair";
    expect(
        op,
        400,
        api.anyone(Method::POST, "/v1/pair")
            .header("DPoP", "not a proof")
            .json(&pair_body(&session_id, &secret)),
    )
    .await;
    let pair = expect(
        op,
        200,
        api.anyone(Method::POST, "/v1/pair")
            .header(
                "DPoP",
                key.proof_at("POST", &format!("{issuer}/v1/pair"), now, None),
            )
            .json(&pair_body(&session_id, &secret)),
    )
    .await
    .json();
    assert_eq!(pair["token_type"], "DPoP");
    let access = pair["access_token"].as_str().unwrap().to_string();
    let refresh = pair["refresh_token"].as_str().unwrap().to_string();

    let op = "POST /v1/token";
    let form = [
        ("grant_type", "refresh_token"),
        ("refresh_token", refresh.as_str()),
    ];
    expect(op, 400, api.anyone(Method::POST, "/v1/token").form(&form)).await;
    expect(
        op,
        200,
        api.anyone(Method::POST, "/v1/token")
            .header(
                "DPoP",
                key.proof_at("POST", &format!("{issuer}/v1/token"), now, None),
            )
            .form(&form),
    )
    .await;

    let op = "POST /v1/introspect";
    let answer = expect(
        op,
        200,
        api.admin(Method::POST, "/v1/introspect")
            .form(&[("token", access.as_str())]),
    )
    .await
    .json();
    assert_eq!(answer["cnf"]["jkt"], key.jkt());

    let op = "GET /v1/authz";
    let forwarded = |request: RequestBuilder| {
        request
            .header("X-Forwarded-Method", "GET")
            .header("X-Forwarded-Host", "app.example")
            .header("X-Forwarded-Uri", "/notes")
    };
    expect(
        op,
        401,
        forwarded(api.anyone(Method::GET, "/v1/authz")).bearer_auth(&access),
    )
    .await;
    expect(
        op,
        200,
        forwarded(api.anyone(Method::GET, "/v1/authz"))
            .header("Authorization", format!("DPoP {access}"))
            .header(
                "DPoP",
                key.proof_at("GET", "https://app.example/notes", now, Some(&access)),
            ),
    )
    .await;
}

#[tokio::test]
async fn administration_answers_as_documented() {
    let app = helpers::spawn_app().await;
    let api = Api::new(&app);
    let pair = api.pair().await;
    let device = pair["device_id"].as_str().unwrap().to_string();
    let device_path = format!("/v1/devices/{device}");

    // Devices.
    let op = "GET /v1/devices";
    for query in [
        "",
        "?status=active",
        "?status=revoked&name=contract&limit=1",
        "?limit=200",
    ] {
        expect(
            op,
            200,
            api.admin(Method::GET, &format!("/v1/devices{query}")),
        )
        .await;
    }
    let page = expect(op, 200, api.admin(Method::GET, "/v1/devices?limit=1"))
        .await
        .json();
    assert_eq!(page["devices"][0]["id"], device.as_str());
    for query in [
        "?colour=red",
        "?status=lost",
        "?limit=0",
        "?limit=201",
        "?limit=x",
        "?after=dev_x",
        "?status=active&status=revoked",
    ] {
        expect(
            op,
            400,
            api.admin(Method::GET, &format!("/v1/devices{query}")),
        )
        .await;
    }
    expect(
        op,
        404,
        api.admin(
            Method::GET,
            "/v1/devices?after=dev_00000000000000000000000000000000",
        ),
    )
    .await;
    expect(op, 401, api.anyone(Method::GET, "/v1/devices")).await;
    expect(op, 405, api.admin(Method::POST, "/v1/devices")).await;

    let op = "GET /v1/devices/{id}";
    expect(op, 200, api.admin(Method::GET, &device_path)).await;
    expect(op, 404, api.admin(Method::GET, NO_SUCH_DEVICE)).await;
    expect(op, 404, api.admin(Method::GET, "/v1/devices/phone")).await;
    expect(op, 401, api.anyone(Method::GET, &device_path)).await;
    expect(op, 405, api.admin(Method::POST, &device_path)).await;

    let op = "PATCH /v1/devices/{id}";
    let renamed = expect(
        op,
        200,
        api.admin(Method::PATCH, &device_path)
            .json(&json!({"name": "Renamed"})),
    )
    .await
    .json();
    assert_eq!(renamed["name"], "Renamed");
    for bad in [
        json!({}),
        json!({"name": ""}),
        json!({"name": "x", "platform": "y"}),
    ] {
        expect(op, 400, api.admin(Method::PATCH, &device_path).json(&bad)).await;
    }
    expect(
        op,
        404,
        api.admin(Method::PATCH, NO_SUCH_DEVICE)
            .json(&json!({"name": "x"})),
    )
    .await;
    expect(
        op,
        401,
        api.anyone(Method::PATCH, &device_path)
            .json(&json!({"name": "x"})),
    )
    .await;
    expect(
        op,
        415,
        api.admin(Method::PATCH, &device_path)
            .form(&[("name", "x")]),
    )
    .await;
    expect(
        op,
        413,
        api.admin(Method::PATCH, &device_path)
            .header("content-type", "application/json")
            .body(oversized()),
    )
    .await;

    let op = "DELETE /v1/devices/{id}";
    let revoked = expect(op, 200, api.admin(Method::DELETE, &device_path))
        .await
        .json();
    assert_eq!(revoked["status"], "revoked");
    expect(op, 200, api.admin(Method::DELETE, &device_path)).await;
    expect(op, 404, api.admin(Method::DELETE, NO_SUCH_DEVICE)).await;
    expect(op, 401, api.anyone(Method::DELETE, &device_path)).await;

    // Signing keys.
    let op = "GET /v1/keys";
    let keys = expect(op, 200, api.admin(Method::GET, "/v1/keys"))
        .await
        .json();
    expect(op, 401, api.anyone(Method::GET, "/v1/keys")).await;
    expect(op, 405, api.admin(Method::DELETE, "/v1/keys")).await;

    let op = "POST /v1/keys/rotate";
    let path = "/v1/keys/rotate";
    expect(op, 409, api.admin(Method::POST, path)).await;
    expect(op, 409, api.admin(Method::POST, path).json(&json!({}))).await;
    expect(
        op,
        400,
        api.admin(Method::POST, path).json(&json!({"now": "yes"})),
    )
    .await;
    expect(op, 400, api.admin(Method::POST, path).body("[]")).await;
    let rotation = expect(
        op,
        200,
        api.admin(Method::POST, path).json(&json!({"now": true})),
    )
    .await
    .json();
    expect(op, 401, api.anyone(Method::POST, path)).await;
    expect_405_and_413(op, path, "application/json", |m, p| api.admin(m, p)).await;

    let op = "POST /v1/keys/{kid}/revoke";
    let retiring = rotation["retiring"].as_str().unwrap();
    assert_eq!(retiring, keys["keys"][0]["kid"].as_str().unwrap());
    let revoke = format!("/v1/keys/{retiring}/revoke");
    expect(op, 200, api.admin(Method::POST, &revoke)).await;
    expect(op, 409, api.admin(Method::POST, &revoke)).await;
    expect(
        op,
        404,
        api.admin(
            Method::POST,
            "/v1/keys/AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA/revoke",
        ),
    )
    .await;
    expect(op, 404, api.admin(Method::POST, "/v1/keys/short/revoke")).await;
    expect(op, 401, api.anyone(Method::POST, &revoke)).await;
    expect(op, 405, api.admin(Method::GET, &revoke)).await;
    // A ring after an emergency rotation and a revocation still matches the JWKS schema.
    expect(
        "GET /.well-known/jwks.json",
        200,
        api.anyone(Method::GET, "/.well-known/jwks.json"),
    )
    .await;
    let keys = expect("GET /v1/keys", 200, api.admin(Method::GET, "/v1/keys"))
        .await
        .json();
    assert_eq!(keys["keys"].as_array().unwrap().len(), 3);

    // The audit log.
    let op = "GET /v1/audit";
    for query in [
        "",
        "?limit=1",
        "?type=device.*",
        "?type=device.revoked&limit=1000",
        &format!("?device={device}&after=1"),
    ] {
        let page = expect(
            op,
            200,
            api.admin(Method::GET, &format!("/v1/audit{query}")),
        )
        .await
        .json();
        assert!(!page["events"].as_array().unwrap().is_empty(), "{query}");
    }
    for query in [
        "?limit=0",
        "?limit=1001",
        "?type=Device",
        "?device=dev_x",
        "?after=x",
        "?colour=red",
        "?limit=1&limit=2",
    ] {
        expect(
            op,
            400,
            api.admin(Method::GET, &format!("/v1/audit{query}")),
        )
        .await;
    }
    expect(op, 401, api.anyone(Method::GET, "/v1/audit")).await;
    expect(op, 405, api.admin(Method::POST, "/v1/audit")).await;

    // Bans (none here; see the lockout case for a real one).
    let op = "GET /v1/ratelimit/bans";
    expect(op, 200, api.admin(Method::GET, "/v1/ratelimit/bans")).await;
    expect(op, 401, api.anyone(Method::GET, "/v1/ratelimit/bans")).await;
    expect(op, 405, api.admin(Method::POST, "/v1/ratelimit/bans")).await;
    let op = "DELETE /v1/ratelimit/bans/{key}";
    expect(
        op,
        404,
        api.admin(Method::DELETE, "/v1/ratelimit/bans/ip:203.0.113.7"),
    )
    .await;
    // Only `ip:` keys name bans; any other is malformed, even one the limiter reads.
    for key in [
        "somebody",
        "ip:203.0.113.7/64",
        "device:dev_00000000000000000000000000000000",
        "client:cli_00000000000000000000000000000000",
    ] {
        expect(
            op,
            400,
            api.admin(
                Method::DELETE,
                &format!("/v1/ratelimit/bans/{}", key.replace('/', "%2F")),
            ),
        )
        .await;
    }
    for key in [
        "ip:2001:db8:1:2::5",
        "ip:2001:db8:1:2::%2F64",
        "ip:::ffff:1.2.3.4",
    ] {
        expect(
            op,
            404,
            api.admin(Method::DELETE, &format!("/v1/ratelimit/bans/{key}")),
        )
        .await;
    }
    expect(
        op,
        401,
        api.anyone(Method::DELETE, "/v1/ratelimit/bans/ip:203.0.113.7"),
    )
    .await;
    expect(
        op,
        405,
        api.admin(Method::GET, "/v1/ratelimit/bans/ip:203.0.113.7"),
    )
    .await;

    let op = "GET /v1/front";
    let view = expect(op, 200, api.admin(Method::GET, "/v1/front"))
        .await
        .json();
    assert_eq!(view["enabled"], false, "{view}");
    expect(op, 401, api.anyone(Method::GET, "/v1/front")).await;
    expect(op, 405, api.admin(Method::POST, "/v1/front")).await;

    // Jobs and backups.
    let op = "GET /v1/status";
    expect(op, 200, api.admin(Method::GET, "/v1/status")).await;
    expect(op, 401, api.anyone(Method::GET, "/v1/status")).await;
    expect(op, 405, api.admin(Method::POST, "/v1/status")).await;

    let op = "GET /v1/jobs";
    expect(op, 200, api.admin(Method::GET, "/v1/jobs")).await;
    expect(op, 401, api.anyone(Method::GET, "/v1/jobs")).await;
    expect(op, 405, api.admin(Method::POST, "/v1/jobs")).await;
    let op = "POST /v1/jobs/{name}/run";
    for job in ["prune_expired", "prune_revocations", "prune_audit"] {
        let run = expect(
            op,
            200,
            api.admin(Method::POST, &format!("/v1/jobs/{job}/run")),
        )
        .await
        .json();
        assert_eq!(run["last_outcome"], "success", "{run}");
    }
    expect(op, 404, api.admin(Method::POST, "/v1/jobs/coffee/run")).await;
    expect(op, 401, api.anyone(Method::POST, "/v1/jobs/backup/run")).await;
    expect(op, 405, api.admin(Method::GET, "/v1/jobs/backup/run")).await;
    // The job list again, now with runs recorded.
    expect("GET /v1/jobs", 200, api.admin(Method::GET, "/v1/jobs")).await;
    let op = "POST /v1/backup";
    let backup = expect(op, 200, api.admin(Method::POST, "/v1/backup")).await;
    assert!(backup.body.len() > 4096, "a backup is a data file");
    expect(op, 401, api.anyone(Method::POST, "/v1/backup")).await;
    expect(op, 405, api.admin(Method::GET, "/v1/backup")).await;
    app.stop().await;
}

#[tokio::test]
async fn admin_sessions_answer_as_documented() {
    let app = helpers::spawn_app().await;
    let api = Api::new(&app);
    let path = "/v1/session";
    let op = "POST /v1/session";
    let signed_in = expect(
        op,
        201,
        api.anyone(Method::POST, path)
            .json(&json!({"token": api.admin})),
    )
    .await;
    let cookie = signed_in
        .headers
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .expect("a session cookie")
        .to_string();
    expect(
        op,
        401,
        api.anyone(Method::POST, path).json(
            &json!({"token": "gha_0000000000000000_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"}),
        ),
    )
    .await;
    // Either a token or a name and password: nothing else, nothing less, not both.
    for bad in [
        json!({"colour": "red"}),
        json!({}),
        json!({"username": "ada"}),
        json!({"token": "x", "username": "ada", "password": "y"}),
    ] {
        expect(op, 400, api.anyone(Method::POST, path).json(&bad)).await;
    }
    expect(
        op,
        415,
        api.anyone(Method::POST, path)
            .header("content-type", "text/plain")
            .body("{}"),
    )
    .await;
    expect(
        op,
        413,
        api.anyone(Method::POST, path)
            .header("content-type", "application/json")
            .body(oversized()),
    )
    .await;
    expect(op, 405, api.anyone(Method::PUT, path)).await;
    let op = "GET /v1/session";
    expect(
        op,
        200,
        api.anyone(Method::GET, path).header("cookie", &cookie),
    )
    .await;
    expect(op, 401, api.anyone(Method::GET, path)).await;
    let op = "DELETE /v1/session";
    expect(op, 401, api.anyone(Method::DELETE, path)).await;
    expect(op, 204, api.admin(Method::DELETE, path)).await;
    app.stop().await;
}

#[tokio::test]
async fn admin_users_answer_as_documented() {
    let app = helpers::spawn_app().await;
    let api = Api::new(&app);
    let path = "/v1/admin-users";
    let op = "POST /v1/admin-users";
    let ada = json!({"username": "ada", "password": "correct horse battery staple"});
    expect(op, 201, api.admin(Method::POST, path).json(&ada)).await;
    expect(op, 409, api.admin(Method::POST, path).json(&ada)).await;
    for bad in [
        json!({"username": "Ada", "password": "correct horse battery staple"}),
        json!({"username": "bob", "password": "short"}),
        json!({"username": "bob"}),
        json!({"username": "bob", "password": "correct horse battery staple", "x": 1}),
    ] {
        expect(op, 400, api.admin(Method::POST, path).json(&bad)).await;
    }
    expect(op, 401, api.anyone(Method::POST, path).json(&ada)).await;
    expect(
        op,
        415,
        api.admin(Method::POST, path)
            .body("username=bob&password=x"),
    )
    .await;
    expect(
        op,
        413,
        api.admin(Method::POST, path)
            .header("content-type", "application/json")
            .body(oversized()),
    )
    .await;
    let op = "GET /v1/admin-users";
    let listed = expect(op, 200, api.admin(Method::GET, path)).await.json();
    assert_eq!(listed["users"][0]["username"], "ada");
    expect(op, 401, api.anyone(Method::GET, path)).await;
    expect(op, 405, api.admin(Method::DELETE, path)).await;
    app.stop().await;
}

#[tokio::test]
async fn rate_limits_and_lockout_answer_as_documented() {
    let app = helpers::spawn_app_with(&[
        ("GATEHOUSE_RATELIMIT_PAIRING", "1/1m"),
        ("GATEHOUSE_RATELIMIT_REFRESH", "1/1m"),
        ("GATEHOUSE_RATELIMIT_INTROSPECTION", "2/1m"),
        ("GATEHOUSE_LOCKOUT_MAX_FAILURES", "2"),
    ])
    .await;
    let api = Api::new(&app);
    let pair = api.pair().await;

    // `ratelimit.pairing`: the second attempt within the minute.
    let (session_id, secret) = api.session().await;
    expect(
        "POST /v1/pair",
        429,
        api.anyone(Method::POST, "/v1/pair")
            .json(&pair_body(&session_id, &secret)),
    )
    .await;

    // `ratelimit.refresh`: the device's second refresh within the minute.
    let next = expect(
        "POST /v1/token",
        200,
        api.anyone(Method::POST, "/v1/token").form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", pair["refresh_token"].as_str().unwrap()),
        ]),
    )
    .await
    .json();
    expect(
        "POST /v1/token",
        429,
        api.anyone(Method::POST, "/v1/token").form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", next["refresh_token"].as_str().unwrap()),
        ]),
    )
    .await;

    // `ratelimit.introspection`: the admin's address, after two.
    for status in [200, 200, 429] {
        expect(
            "POST /v1/introspect",
            status,
            api.admin(Method::POST, "/v1/introspect")
                .form(&[("token", "x")]),
        )
        .await;
    }

    // Lockout: a third failed admin token bans the address (`max_failures` 2); every
    // request from it is then refused.
    for _ in 0..3 {
        expect(
            "GET /v1/keys",
            401,
            api.anyone(Method::GET, "/v1/keys").bearer_auth("gha_wrong"),
        )
        .await;
    }
    expect("GET /v1/audit", 429, api.admin(Method::GET, "/v1/audit")).await;
    let bans = app.running.services.lockout.list();
    assert_eq!(bans.len(), 1);
    let key = bans[0].key.clone();
    let ban_path = format!("/v1/ratelimit/bans/{key}");
    // Advance past the ban and check the answers about it.
    app.clock.advance_ms(16 * 60 * 1000);
    let listed = expect(
        "GET /v1/ratelimit/bans",
        200,
        api.admin(Method::GET, "/v1/ratelimit/bans"),
    )
    .await
    .json();
    assert_eq!(listed["bans"][0]["key"], key.as_str());
    expect(
        "DELETE /v1/ratelimit/bans/{key}",
        200,
        api.admin(Method::DELETE, &ban_path),
    )
    .await;

    // `ratelimit.per_ip` answers before routing.
    drop(api);
    app.stop().await;
    let app = helpers::spawn_app_with(&[("GATEHOUSE_RATELIMIT_PER_IP", "2/1m")]).await;
    let api = Api::new(&app);
    let jwks = "GET /.well-known/jwks.json";
    expect(jwks, 200, api.anyone(Method::GET, "/.well-known/jwks.json")).await;
    expect(jwks, 200, api.anyone(Method::GET, "/.well-known/jwks.json")).await;
    expect("GET /v1/audit", 429, api.admin(Method::GET, "/v1/audit")).await;
    expect("GET /healthz", 200, api.anyone(Method::GET, "/healthz")).await;
    app.stop().await;
}

#[test]
fn every_operation_of_the_document_is_named_by_a_case() {
    // The cases above name their operations by literal; this keeps them in step with
    // the document: an operation added to it without a case fails here.
    let source = include_str!("contract.rs");
    let mut missing = Vec::new();
    for (path, item) in spec()["paths"].as_object().expect("paths") {
        for method in ["get", "put", "post", "delete", "patch"] {
            if item.get(method).is_some() {
                let op = format!("\"{} {path}\"", method.to_ascii_uppercase());
                if !source.contains(&op) {
                    missing.push(op);
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "operations without a contract case: {missing:?}"
    );
}
