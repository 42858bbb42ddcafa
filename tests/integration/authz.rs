//! `GET /v1/authz`, forward authentication: its answers on their own (valid, missing,
//! malformed, expired, foreign and revoked tokens; what is never reflected; how refusals
//! count toward limits), then behind a real Caddy (`forward_auth`) and a real nginx
//! (`auth_request`) in front of a small app that records every request reaching it.
//!
//! The proxies run the configurations printed in `docs/forward-auth.md`, read from the
//! document itself, with only the addresses and ports substituted; gatehouse runs with
//! the document's settings file. So the document cannot drift from what is tested.

use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gatehouse::jwt::AccessClaims;
use reqwest::header::{AUTHORIZATION, HeaderValue};
use reqwest::{Method, RequestBuilder, StatusCode};
use serde_json::Value;

use crate::helpers::{self, TestApp};

const DEVICE_ID: &str = "x-gatehouse-device-id";
const CHALLENGE: &str = r#"Bearer realm="gatehouse""#;
const CHALLENGE_INVALID: &str = r#"Bearer realm="gatehouse", error="invalid_token""#;
/// A well-formed device id that is no paired device's.
const FORGED_ID: &str = "dev_00000000000000000000000000000bad";

// ---------------------------------------------------------------------------------------
// Small helpers of this file

async fn authz(app: &TestApp, authorization: Option<&str>) -> reqwest::Response {
    let mut request = app
        .client()
        .get(app.url("/v1/authz"))
        .header(DEVICE_ID, FORGED_ID);
    if let Some(value) = authorization {
        request = request.header(AUTHORIZATION, value);
    }
    request.send().await.unwrap()
}

/// Asserts a refusal: 401, the challenge, `no-store`, the JSON error `code`, no device
/// id, and nothing of `secret` (the presented token) anywhere in the answer.
async fn assert_refused(response: reqwest::Response, challenge: &str, code: &str, secret: &str) {
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let headers = response.headers().clone();
    assert_eq!(headers["www-authenticate"], challenge);
    assert_eq!(headers["cache-control"], "no-store");
    assert!(
        headers.get(DEVICE_ID).is_none(),
        "a refusal carries no device id: {headers:?}"
    );
    let body = response.text().await.unwrap();
    let json: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["error"], code, "{body}");
    if !secret.is_empty() {
        assert!(!body.contains(secret), "the token is echoed: {body}");
        for (name, value) in &headers {
            let value = value.to_str().unwrap_or_default();
            assert!(!value.contains(secret), "the token is echoed in {name}");
        }
    }
}

/// The claims of a token this server issued (its payload, decoded).
fn claims_of(token: &str) -> AccessClaims {
    let payload = token.split('.').nth(1).unwrap();
    let bytes = data_encoding::BASE64URL_NOPAD
        .decode(payload.as_bytes())
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

/// `claims` signed by the server's active key, with a new `jti`.
fn signed(app: &TestApp, mut claims: AccessClaims) -> String {
    claims.jti = gatehouse::ids::TokenId::generate().unwrap();
    app.running.services.keys.sign(&claims).unwrap()
}

/// A sample of `/metrics` (0 when absent).
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| v.parse().unwrap())
}

fn outcome(metrics: &str, outcome: &str) -> f64 {
    sample(
        metrics,
        &format!("gatehouse_authz_checks_total{{outcome=\"{outcome}\"}}"),
    )
}

fn by_method(metrics: &str, method: &str) -> f64 {
    sample(
        metrics,
        &format!("gatehouse_authz_checks_by_method_total{{method=\"{method}\"}}"),
    )
}

// ---------------------------------------------------------------------------------------
// The endpoint on its own

#[tokio::test]
async fn a_valid_device_token_is_200_with_its_device_id_and_nothing_reflected() {
    let app = helpers::spawn_app().await;
    let device = app.pair_device().await;
    let bearer = format!("Bearer {}", device.access_token);

    let response = authz(&app, Some(&bearer)).await;
    assert_eq!(response.status(), StatusCode::OK);
    let ids: Vec<&HeaderValue> = response.headers().get_all(DEVICE_ID).iter().collect();
    assert_eq!(
        ids,
        [device.device_id.as_str()],
        "only gatehouse's device id, never the client's"
    );
    assert_eq!(response.headers()["cache-control"], "no-store");
    assert!(response.headers().get(AUTHORIZATION).is_none());
    assert_eq!(
        response.text().await.unwrap(),
        "",
        "no body, no token echoed"
    );

    // The scheme name is case-insensitive; HEAD answers as GET does.
    let lower = format!("bearer {}", device.access_token);
    assert_eq!(authz(&app, Some(&lower)).await.status(), StatusCode::OK);
    let head = app
        .client()
        .head(app.url("/v1/authz"))
        .bearer_auth(&device.access_token)
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(head.headers()[DEVICE_ID], device.device_id.as_str());

    // Other methods are 405.
    for method in [Method::POST, Method::PUT, Method::DELETE, Method::PATCH] {
        let response = app
            .client()
            .request(method.clone(), app.url("/v1/authz"))
            .bearer_auth(&device.access_token)
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.status(),
            StatusCode::METHOD_NOT_ALLOWED,
            "{method}"
        );
        assert_eq!(response.headers()["allow"], "GET,HEAD");
        assert!(response.headers().get(DEVICE_ID).is_none());
    }
    app.stop().await;
}

#[tokio::test]
async fn every_refusal_is_a_401_with_a_bearer_challenge_and_no_device_id() {
    let app = helpers::spawn_app().await;
    let device = app.pair_device().await;
    let token = device.access_token.clone();

    // No credentials, or another scheme: a challenge without an error code (RFC 6750).
    assert_refused(authz(&app, None).await, CHALLENGE, "unauthorized", "").await;
    assert_refused(
        authz(&app, Some("Basic dXNlcjpwYXNz")).await,
        CHALLENGE,
        "unauthorized",
        "",
    )
    .await;

    // A token that is not a valid access token of this server: invalid_token.
    let claims = claims_of(&token);
    let foreign_issuer = signed(
        &app,
        AccessClaims {
            iss: "https://other.example".into(),
            ..claims.clone()
        },
    );
    let foreign_audience = signed(
        &app,
        AccessClaims {
            aud: "https://other.example".into(),
            ..claims.clone()
        },
    );
    let tampered = {
        let (head, signature) = token.rsplit_once('.').unwrap();
        let flipped = if signature.starts_with('A') { 'B' } else { 'A' };
        format!("{head}.{flipped}{}", &signature[1..])
    };
    let admin = app.admin_token();
    for (case, presented) in [
        ("empty", String::new()),
        ("garbage", "not-a-token".to_string()),
        ("wrong issuer", foreign_issuer),
        ("wrong audience", foreign_audience),
        ("bad signature", tampered),
        ("a refresh token", device.refresh_token.clone()),
        ("an admin token", admin),
    ] {
        eprintln!("authz refusal case: {case}");
        let response = authz(&app, Some(&format!("Bearer {presented}"))).await;
        assert_refused(response, CHALLENGE_INVALID, "invalid_token", &presented).await;
    }

    // Two Authorization headers: neither is taken, even when both are valid.
    let response = app
        .client()
        .get(app.url("/v1/authz"))
        .header(AUTHORIZATION, format!("Bearer {token}"))
        .header(AUTHORIZATION, format!("Bearer {token}"))
        .send()
        .await
        .unwrap();
    assert_refused(response, CHALLENGE_INVALID, "invalid_token", &token).await;

    // None of it was a credential failure: no lockout record, no ban; the token works.
    assert!(app.audit_events("login.failed").is_empty());
    assert!(
        app.running
            .services
            .lockout
            .banned("127.0.0.1".parse().unwrap())
            .is_none()
    );
    let metrics = app.metrics().await;
    assert_eq!(outcome(&metrics, "no_token"), 2.0, "{metrics}");
    assert_eq!(outcome(&metrics, "invalid_token"), 8.0, "{metrics}");
    assert_eq!(
        authz(&app, Some(&format!("Bearer {token}"))).await.status(),
        StatusCode::OK
    );
    app.stop().await;
}

#[tokio::test]
async fn a_token_is_refused_once_its_lifetime_has_passed() {
    let app = helpers::spawn_app().await;
    let device = app.pair_device().await;
    let bearer = format!("Bearer {}", device.access_token);
    assert_eq!(authz(&app, Some(&bearer)).await.status(), StatusCode::OK);

    let settings = app.running.services.tokens.settings().clone();
    let until_expiry = settings.access_ttl + settings.leeway;
    // Just before the end of its window it is still good...
    app.clock.advance_ms(until_expiry.as_millis() as u64 - 1000);
    assert_eq!(authz(&app, Some(&bearer)).await.status(), StatusCode::OK);
    // ...and refused from then on.
    app.clock.advance_ms(1000);
    assert_refused(
        authz(&app, Some(&bearer)).await,
        CHALLENGE_INVALID,
        "invalid_token",
        &device.access_token,
    )
    .await;
    let metrics = app.metrics().await;
    assert_eq!(outcome(&metrics, "expired"), 1.0, "{metrics}");
    assert_eq!(outcome(&metrics, "allowed"), 2.0, "{metrics}");
    app.stop().await;
}

#[tokio::test]
async fn a_revoked_device_is_refused_on_its_next_request() {
    let app = helpers::spawn_app().await;
    let device = app.pair_device().await;
    let other = app.pair_device().await;
    let bearer = format!("Bearer {}", device.access_token);
    assert_eq!(authz(&app, Some(&bearer)).await.status(), StatusCode::OK);

    let revoked = app
        .client()
        .delete(app.url(&format!("/v1/devices/{}", device.device_id)))
        .bearer_auth(app.admin_token())
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), StatusCode::OK);
    assert_refused(
        authz(&app, Some(&bearer)).await,
        CHALLENGE_INVALID,
        "invalid_token",
        &device.access_token,
    )
    .await;
    // Only that device.
    let response = authz(&app, Some(&format!("Bearer {}", other.access_token))).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()[DEVICE_ID], other.device_id.as_str());
    let metrics = app.metrics().await;
    assert_eq!(outcome(&metrics, "revoked"), 1.0, "{metrics}");
    app.stop().await;
}

/// A refusal spends the client's `per_ip` budget like any request, and nothing more: an
/// expired or garbage token is no failed login, so no number of them bans the address.
#[tokio::test]
async fn refusals_spend_the_address_budget_but_never_lock_the_address_out() {
    let app = helpers::spawn_app_with(&[
        ("GATEHOUSE_LOCKOUT_MAX_FAILURES", "3"),
        ("GATEHOUSE_RATELIMIT_PER_IP", "20/1m"),
    ])
    .await;
    // Two requests of the budget.
    let device = app.pair_device().await;
    for _ in 0..10 {
        let response = authz(&app, Some("Bearer not-a-token")).await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    }
    assert!(
        app.running
            .services
            .lockout
            .banned("127.0.0.1".parse().unwrap())
            .is_none(),
        "ten refusals with a lockout after three failures: no ban"
    );
    assert!(app.audit_events("login.failed").is_empty());
    let bearer = format!("Bearer {}", device.access_token);
    assert_eq!(authz(&app, Some(&bearer)).await.status(), StatusCode::OK);

    // The budget is spent by refusals and successes alike, then it is 429, not a ban.
    let mut limited = None;
    for _ in 0..20 {
        let response = authz(&app, Some("Bearer not-a-token")).await;
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            limited = Some(response);
            break;
        }
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    }
    let limited = limited.expect("the per-address budget runs out");
    assert!(limited.headers().contains_key("retry-after"));
    let body: Value = limited.json().await.unwrap();
    assert_eq!(body["error"], "rate_limited", "{body}");
    app.stop().await;
}

/// The original request's method is believed only from a trusted proxy: a client that
/// reaches the endpoint directly cannot write it.
#[tokio::test]
async fn forwarded_request_details_from_an_untrusted_peer_are_not_believed() {
    let app = helpers::spawn_app().await;
    let device = app.pair_device().await;
    let response = app
        .client()
        .get(app.url("/v1/authz"))
        .bearer_auth(&device.access_token)
        .header("X-Forwarded-Method", "DELETE")
        .header("X-Original-Method", "DELETE")
        .header("X-Forwarded-Uri", "/admin")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let metrics = app.metrics().await;
    assert_eq!(by_method(&metrics, "DELETE"), 0.0, "{metrics}");
    assert_eq!(by_method(&metrics, "unknown"), 1.0, "{metrics}");
    app.stop().await;
}

// ---------------------------------------------------------------------------------------
// Behind real proxies

/// The one fenced block of `docs/forward-auth.md` whose info string is `info`.
fn doc_block(info: &str) -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/forward-auth.md");
    let doc = std::fs::read_to_string(path).unwrap();
    let blocks: Vec<&str> = doc
        .split(&format!("```{info}\n"))
        .skip(1)
        .filter_map(|rest| rest.split("```").next())
        .collect();
    assert_eq!(
        blocks.len(),
        1,
        "one ```{info} block in docs/forward-auth.md"
    );
    blocks[0].to_string()
}

/// `text` with every `from` replaced by `to`; `from` must be there.
fn substitute(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "the configuration names {from}");
    text.replace(from, to)
}

/// A client whose connections come from `source`.
fn client_from(source: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(source.parse::<IpAddr>().unwrap())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// gatehouse as the document configures it (its settings file), on a free port.
async fn gatehouse_as_documented(dir: &Path) -> TestApp {
    let settings = dir.join("gatehouse.toml");
    std::fs::write(&settings, doc_block("toml")).unwrap();
    let app = helpers::spawn_app_with(&[
        ("GATEHOUSE_CONFIG", settings.to_str().unwrap()),
        ("GATEHOUSE_LOCKOUT_MAX_FAILURES", "3"),
    ])
    .await;
    assert!(
        app.base_url.starts_with("http://"),
        "the document's gatehouse serves plain HTTP on loopback"
    );
    app
}

/// One request as the app received it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
}

impl Seen {
    fn values(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// The app behind the proxy: answers `reached` to every request and records it.
struct Upstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let record = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(Self::answer(stream, record.clone()));
            }
        });
        Self { addr, seen, task }
    }

    /// One request per connection: read its head (and body), record it, answer, close.
    async fn answer(mut stream: tokio::net::TcpStream, record: Arc<Mutex<Vec<Seen>>>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at;
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            if buf.len() > 64 * 1024 {
                return;
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let mut lines = head.split("\r\n");
        let mut request_line = lines.next().unwrap_or_default().split(' ');
        let method = request_line.next().unwrap_or_default().to_string();
        let target = request_line.next().unwrap_or_default().to_string();
        let headers: Vec<(String, String)> = lines
            .filter_map(|line| line.split_once(':'))
            .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
            .collect();
        let length: usize = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        let mut body = buf.len() - head_end - 4;
        while body < length {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => body += n,
            }
        }
        record.lock().unwrap().push(Seen {
            method,
            target,
            headers,
        });
        let _ = stream
            .write_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 7\r\n\
                  connection: close\r\n\r\nreached",
            )
            .await;
        let _ = stream.shutdown().await;
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A proxy process started by a test, stopped when dropped; its output is kept in its
/// directory for the failure message.
struct Proxy {
    child: Child,
    dir: tempfile::TempDir,
}

impl Proxy {
    fn spawn(mut command: Command, dir: tempfile::TempDir, ports: &[u16]) -> Self {
        let log = std::fs::File::create(dir.path().join("proxy.log")).unwrap();
        let child = command
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("the proxy starts");
        let mut proxy = Self { child, dir };
        for port in ports {
            let mut up = false;
            for _ in 0..100 {
                if TcpStream::connect(("127.0.0.1", *port)).is_ok() {
                    up = true;
                    break;
                }
                if let Ok(Some(status)) = proxy.child.try_wait() {
                    panic!("the proxy exited ({status}):\n{}", proxy.log());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            assert!(up, "the proxy did not listen on {port}:\n{}", proxy.log());
        }
        proxy
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("proxy.log")).unwrap_or_default()
    }
}

impl Drop for Proxy {
    /// SIGTERM first: nginx's master stops its workers only when asked (killed, it leaves
    /// them running). SIGKILL if it has not exited within five seconds.
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..100 {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where a client reaches gatehouse's own API and the app through the proxy: base URLs,
/// and the `Host` to send when the proxy tells the two sites apart by name only.
struct Front {
    auth: String,
    app: String,
    auth_host: Option<&'static str>,
    app_host: Option<&'static str>,
}

impl Front {
    fn to_auth(&self, client: &reqwest::Client, method: Method, path: &str) -> RequestBuilder {
        let request = client.request(method, format!("{}{path}", self.auth));
        match self.auth_host {
            Some(host) => request.header("host", host),
            None => request,
        }
    }

    fn to_app(&self, client: &reqwest::Client, method: Method, path: &str) -> RequestBuilder {
        let request = client.request(method, format!("{}{path}", self.app));
        match self.app_host {
            Some(host) => request.header("host", host),
            None => request,
        }
    }
}

/// What the proxy must do, whichever it is. `json` says whether a refusal reaches the
/// client as gatehouse wrote it (Caddy) or as the proxy's own error page (nginx, which
/// passes only the status and the challenge).
async fn admits_valid_devices_only(app: &TestApp, front: &Front, upstream: &Upstream, json: bool) {
    let client = client_from("127.0.0.2");
    let admin = app.admin_token();

    // A phone pairs through the proxy.
    let session: Value = front
        .to_auth(&client, Method::POST, "/v1/pairing/sessions")
        .bearer_auth(&admin)
        .json(&serde_json::json!({"name": "phone"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let paired = front
        .to_auth(&client, Method::POST, "/v1/pair")
        .json(&serde_json::json!({
            "session_id": session["session_id"],
            "secret": session["secret"],
            "device": {"name": "Pixel", "platform": "android", "app_version": "1.0.0"},
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(paired.status(), StatusCode::OK, "paired through the proxy");
    let paired: Value = paired.json().await.unwrap();
    let device_id = paired["device_id"].as_str().unwrap().to_string();
    let access = paired["access_token"].as_str().unwrap().to_string();

    // A valid token reaches the app with gatehouse's device id, and only that one.
    let response = front
        .to_app(&client, Method::GET, "/hello?x=1")
        .bearer_auth(&access)
        .header(DEVICE_ID, FORGED_ID)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.text().await.unwrap(), "reached");
    let posted = front
        .to_app(&client, Method::POST, "/submit")
        .bearer_auth(&access)
        .body("payload")
        .send()
        .await
        .unwrap();
    assert_eq!(posted.status(), StatusCode::OK);
    let seen = upstream.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(
        (seen[0].method.as_str(), seen[0].target.as_str()),
        ("GET", "/hello?x=1")
    );
    assert_eq!(seen[1].method, "POST");
    for request in &seen {
        assert_eq!(
            request.values(DEVICE_ID),
            [device_id.as_str()],
            "the app sees gatehouse's device id only: {request:?}"
        );
    }

    // No token, or a bad one: 401 with the challenge, and the app sees nothing. More
    // refusals than the lockout allows failures: no ban of the client or the proxy.
    let refused = front
        .to_app(&client, Method::GET, "/hello")
        .header(DEVICE_ID, device_id.as_str())
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(refused.headers()["www-authenticate"], CHALLENGE);
    if json {
        let body: Value = refused.json().await.unwrap();
        assert_eq!(body["error"], "unauthorized", "{body}");
    }
    for _ in 0..5 {
        let refused = front
            .to_app(&client, Method::GET, "/hello")
            .bearer_auth("not-a-token")
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(refused.headers()["www-authenticate"], CHALLENGE_INVALID);
        assert!(refused.headers().get(DEVICE_ID).is_none());
    }
    assert_eq!(
        upstream.seen().len(),
        2,
        "refused requests never reach the app"
    );
    let lockout = &app.running.services.lockout;
    for address in ["127.0.0.1", "127.0.0.2"] {
        assert!(
            lockout.banned(address.parse().unwrap()).is_none(),
            "{address}"
        );
    }
    assert!(app.audit_events("login.failed").is_empty());

    // The original methods came through the trusted proxy.
    let metrics = reqwest::get(app.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(by_method(&metrics, "POST"), 1.0, "{metrics}");
    assert_eq!(by_method(&metrics, "GET"), 7.0, "{metrics}");
    assert_eq!(by_method(&metrics, "unknown"), 0.0, "{metrics}");

    // The admin revokes the device through the proxy: its very next request is refused.
    let revoked = front
        .to_auth(&client, Method::DELETE, &format!("/v1/devices/{device_id}"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), StatusCode::OK);
    let after = front
        .to_app(&client, Method::GET, "/hello")
        .bearer_auth(&access)
        .send()
        .await
        .unwrap();
    assert_eq!(after.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(after.headers()["www-authenticate"], CHALLENGE_INVALID);
    assert_eq!(
        upstream.seen().len(),
        2,
        "the revoked device reaches nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_caddy_forward_auth_admits_valid_devices_only() {
    let test = "behind_caddy_forward_auth_admits_valid_devices_only";
    if !helpers::tool_available(test, "caddy", &["version"], "the Debian package caddy") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let app = gatehouse_as_documented(dir.path()).await;
    let upstream = Upstream::start().await;
    let (auth_port, app_port) = (helpers::free_port(), helpers::free_port());
    let mut caddyfile = doc_block("caddyfile");
    for (from, to) in [
        ("auth.example.com", format!("http://127.0.0.1:{auth_port}")),
        ("app.example.com", format!("http://127.0.0.1:{app_port}")),
        ("127.0.0.1:8080", app.running.local_addr.to_string()),
        ("127.0.0.1:3000", upstream.addr.to_string()),
    ] {
        caddyfile = substitute(&caddyfile, from, &to);
    }
    // No admin endpoint and no certificates: several tests run at once.
    let caddyfile = format!("{{\n\tadmin off\n\tauto_https off\n}}\n\n{caddyfile}");
    let proxy_dir = tempfile::tempdir().unwrap();
    let path = proxy_dir.path().join("Caddyfile");
    std::fs::write(&path, caddyfile).unwrap();
    let mut command = Command::new("caddy");
    command
        .args(["run", "--adapter", "caddyfile", "--config"])
        .arg(&path)
        .env("HOME", proxy_dir.path())
        .env("XDG_DATA_HOME", proxy_dir.path())
        .env("XDG_CONFIG_HOME", proxy_dir.path());
    let caddy = Proxy::spawn(command, proxy_dir, &[auth_port, app_port]);
    let front = Front {
        auth: format!("http://127.0.0.1:{auth_port}"),
        app: format!("http://127.0.0.1:{app_port}"),
        auth_host: None,
        app_host: None,
    };
    admits_valid_devices_only(&app, &front, &upstream, true).await;
    drop(caddy);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_nginx_auth_request_admits_valid_devices_only() {
    let test = "behind_nginx_auth_request_admits_valid_devices_only";
    if !helpers::tool_available(test, "nginx", &["-v"], "the Debian package nginx") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let app = gatehouse_as_documented(dir.path()).await;
    let upstream = Upstream::start().await;
    let port = helpers::free_port();
    let mut site = doc_block("nginx");
    for (from, to) in [
        ("listen 80;", format!("listen 127.0.0.1:{port};")),
        ("127.0.0.1:8080", app.running.local_addr.to_string()),
        ("127.0.0.1:3000", upstream.addr.to_string()),
    ] {
        site = substitute(&site, from, &to);
    }
    // nginx as the current user, everything it writes inside its directory. Its workers
    // run as another user when started as root, and must reach their temporary paths.
    let proxy_dir = tempfile::tempdir().unwrap();
    let root = proxy_dir.path();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::write(root.join("site.conf"), site).unwrap();
    let d = root.display();
    std::fs::write(
        root.join("nginx.conf"),
        format!(
            "worker_processes 1;\nevents {{ worker_connections 64; }}\nhttp {{\n\
             access_log off;\n\
             client_body_temp_path {d}/body;\nproxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fastcgi;\nuwsgi_temp_path {d}/uwsgi;\n\
             scgi_temp_path {d}/scgi;\n\
             include {d}/site.conf;\n}}\n"
        ),
    )
    .unwrap();
    let mut command = Command::new("nginx");
    command
        .arg("-p")
        .arg(root)
        .arg("-c")
        .arg(root.join("nginx.conf"))
        .arg("-g")
        .arg(format!("daemon off; pid {d}/nginx.pid; error_log stderr;"));
    let nginx = Proxy::spawn(command, proxy_dir, &[port]);
    let base = format!("http://127.0.0.1:{port}");
    let front = Front {
        auth: base.clone(),
        app: base,
        auth_host: Some("auth.example.com"),
        app_host: Some("app.example.com"),
    };
    admits_valid_devices_only(&app, &front, &upstream, false).await;
    drop(nginx);
    app.stop().await;
}
