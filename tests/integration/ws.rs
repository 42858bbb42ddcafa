//! The WebSocket channel (`GET /v1/ws`, `src/http/ws.rs`, `schema/websocket.md`) seen from
//! a real client: TCP, rustls (ALPN http/1.1) and tokio-tungstenite against an in-process
//! server. Pairing, authentication and refresh over the socket; the 10 s authentication
//! deadline; sockets closed at once by revocation and expiry; frame limits, strikes and
//! the message budget; the connection caps; shutdown; and a plain GET of the endpoint.
//!
//! Every wait is bounded (`BOUND`) so a test that misbehaves fails instead of hanging.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::helpers::{self, PairedDevice, TestApp};

/// The longest any single wait for the server may take.
const BOUND: Duration = Duration::from_secs(5);
/// How fast a revocation must reach a live socket.
const CLOSE_WITHIN: Duration = Duration::from_secs(1);
/// Close codes of RFC 6455 section 7.4.1.
const GOING_AWAY: u16 = 1001;
const UNSUPPORTED: u16 = 1003;
const POLICY: u16 = 1008;
const TOO_BIG: u16 = 1009;

/// A client configuration that trusts only the app's certificate and offers HTTP/1.1
/// only (a WebSocket here is an HTTP/1.1 Upgrade).
fn connector(app: &TestApp) -> TlsConnector {
    gatehouse::tls::install_default_provider();
    let cert = app
        .running
        .tls
        .as_ref()
        .expect("TLS is on")
        .cert_der()
        .clone();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(cert))
        .expect("the server certificate parses");
    let mut config = rustls::ClientConfig::builder_with_provider(gatehouse::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    TlsConnector::from(Arc::new(config))
}

/// A TLS connection to the app, handshake done, server name "localhost".
pub(crate) async fn tls_stream(app: &TestApp) -> TlsStream<TcpStream> {
    let tcp = tokio::time::timeout(BOUND, TcpStream::connect(app.running.local_addr))
        .await
        .expect("TCP connect in time")
        .expect("TCP connect");
    let name = rustls::pki_types::ServerName::try_from("localhost")
        .expect("valid name")
        .to_owned();
    tokio::time::timeout(BOUND, connector(app).connect(name, tcp))
        .await
        .expect("TLS handshake in time")
        .expect("TLS handshake succeeds")
}

/// An open WebSocket to the app.
pub(crate) struct Ws {
    stream: WebSocketStream<TlsStream<TcpStream>>,
}

/// What arrived when a test waited for the server. The payloads are read through
/// `Debug`, in failure messages.
#[derive(Debug)]
#[allow(dead_code)]
enum Event {
    Text(String),
    Close(Option<(u16, String)>),
    /// The stream ended or failed without a close frame.
    Ended(String),
    Other(Message),
}

impl Ws {
    /// Opens `/v1/ws`; the handshake error (such as `Error::Http` for a refusal) if any.
    async fn try_connect(app: &TestApp) -> Result<Self, tungstenite::Error> {
        let tls = tls_stream(app).await;
        // The client's own limits are high so it can send more than the server accepts.
        let config = WebSocketConfig::default()
            .max_message_size(Some(1 << 20))
            .max_frame_size(Some(1 << 20));
        let url = format!("wss://{}/v1/ws", app.running.local_addr);
        let (stream, response) = tokio::time::timeout(
            BOUND,
            tokio_tungstenite::client_async_with_config(url, tls, Some(config)),
        )
        .await
        .expect("WebSocket handshake in time")?;
        assert_eq!(response.status(), 101, "switching protocols");
        Ok(Self { stream })
    }

    async fn connect(app: &TestApp) -> Self {
        match Self::try_connect(app).await {
            Ok(ws) => ws,
            Err(err) => panic!("WebSocket handshake failed: {err:?}"),
        }
    }

    async fn send(&mut self, message: Message) {
        tokio::time::timeout(BOUND, self.stream.send(message))
            .await
            .expect("send in time")
            .expect("send succeeds");
    }

    /// Sends, tolerating a failed write (the server may close while a large message is
    /// still being written); what the server said is read next.
    async fn send_may_fail(&mut self, message: Message) {
        let sent = tokio::time::timeout(BOUND, self.stream.send(message))
            .await
            .expect("send in time");
        if let Err(err) = sent {
            eprintln!("send failed: {err:?}");
        }
    }

    async fn send_text(&mut self, text: impl Into<String>) {
        self.send(Message::text(text.into())).await;
    }

    async fn send_json(&mut self, value: &Value) {
        self.send_text(value.to_string()).await;
    }

    /// The next event within `limit`; WebSocket pings and pongs are skipped (tungstenite
    /// answers the server's pings itself).
    async fn next_event(&mut self, limit: Duration) -> Event {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let next = tokio::time::timeout_at(deadline, self.stream.next())
                .await
                .unwrap_or_else(|_| panic!("nothing from the server within {limit:?}"));
            return match next {
                None => Event::Ended("stream ended".into()),
                Some(Err(err)) => Event::Ended(format!("{err:?}")),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(Message::Text(text))) => Event::Text(text.to_string()),
                Some(Ok(Message::Close(frame))) => {
                    Event::Close(frame.map(|f| (u16::from(f.code), f.reason.to_string())))
                }
                Some(Ok(other)) => Event::Other(other),
            };
        }
    }

    /// The next message, which must be a JSON text message.
    async fn recv_json(&mut self) -> Value {
        match self.next_event(BOUND).await {
            Event::Text(text) => serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("the server sent non-JSON text {text:?}: {e}")),
            other => panic!("expected a JSON message, got {other:?}"),
        }
    }

    /// The next message must be `{"type":"error","code":code,"message":…}`.
    async fn expect_error(&mut self, code: &str) {
        let answer = self.recv_json().await;
        assert_eq!(answer["type"], "error", "an error answer: {answer}");
        assert_eq!(answer["code"], code, "error code: {answer}");
        assert!(
            answer["message"].as_str().is_some_and(|m| !m.is_empty()),
            "an error carries a message: {answer}"
        );
        assert_eq!(
            answer.as_object().map(|o| o.len()),
            Some(3),
            "type, code, message and nothing else: {answer}"
        );
    }

    /// The next event must be a close frame with `code` and `reason`, within `limit`.
    async fn expect_close_within(&mut self, code: u16, reason: &str, limit: Duration) {
        match self.next_event(limit).await {
            Event::Close(Some((got_code, got_reason))) => {
                assert_eq!(got_code, code, "close code (reason {got_reason:?})");
                assert_eq!(got_reason, reason, "close reason");
            }
            other => panic!("expected close {code} {reason:?}, got {other:?}"),
        }
    }

    async fn expect_close(&mut self, code: u16, reason: &str) {
        self.expect_close_within(code, reason, BOUND).await;
    }

    /// `{"type":"ping"}` is answered with exactly `{"type":"pong"}`.
    pub(crate) async fn ping(&mut self) {
        self.send_json(&json!({"type": "ping"})).await;
        assert_eq!(self.recv_json().await, json!({"type": "pong"}));
    }

    /// `auth` with `token` must succeed for `device`: the seconds the token has left.
    async fn auth(&mut self, token: &str, device: &str) -> u64 {
        self.send_json(&json!({"type": "auth", "access_token": token}))
            .await;
        let answer = self.recv_json().await;
        assert_eq!(answer["type"], "auth_success", "{answer}");
        assert_eq!(answer["device_id"], device, "{answer}");
        assert_eq!(
            answer.as_object().map(|o| o.len()),
            Some(3),
            "auth answers the device and the token's remaining seconds only: {answer}"
        );
        let left = answer["expires_in"].as_u64().expect("expires_in");
        assert!((1..=900).contains(&left), "{answer}");
        left
    }

    /// An authenticated socket for `device`.
    pub(crate) async fn authenticated(app: &TestApp, device: &PairedDevice) -> Self {
        let mut ws = Self::connect(app).await;
        ws.auth(&device.access_token, &device.device_id).await;
        ws
    }

    /// Closes from the client side and waits until the server has let go.
    async fn close(mut self) {
        let _ = tokio::time::timeout(BOUND, self.stream.close(None)).await;
        let deadline = tokio::time::Instant::now() + BOUND;
        while let Ok(Some(Ok(_))) = tokio::time::timeout_at(deadline, self.stream.next()).await {}
    }
}

fn device_json() -> Value {
    json!({"name": "Ada's phone", "platform": "ios", "app_version": "2.1.0"})
}

/// The `kid` in an access token's header.
fn kid_of(token: &str) -> String {
    let header = token.split('.').next().expect("a JWS has a header");
    let bytes = data_encoding::BASE64URL_NOPAD
        .decode(header.as_bytes())
        .expect("base64url header");
    let header: Value = serde_json::from_slice(&bytes).expect("JSON header");
    header["kid"].as_str().expect("kid").to_string()
}

fn loopback() -> IpAddr {
    IpAddr::from([127, 0, 0, 1])
}

/// Waits until the app counts `expected` live sockets from 127.0.0.1.
async fn wait_open_from_loopback(app: &TestApp, expected: usize) {
    let deadline = Instant::now() + BOUND;
    loop {
        let (_, here) = app.running.services.live.open(loopback());
        if here == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{here} live sockets from 127.0.0.1, expected {expected}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn delete_device(app: &TestApp, device_id: &str) {
    let response = app
        .client()
        .delete(app.url(&format!("/v1/devices/{device_id}")))
        .bearer_auth(app.admin_token())
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200, "device revoked");
}

async fn revoke_token(app: &TestApp, token: &str) {
    let response = app
        .client()
        .post(app.url("/v1/revoke"))
        .form(&[("token", token)])
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200, "RFC 7009 revocation answers 200");
}

/// Reads one HTTP/1.1 response with a Content-Length body: (status, head, body).
async fn read_http_response(stream: &mut TlsStream<TcpStream>) -> (u16, String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + BOUND;
    let read_more = |buf: &mut Vec<u8>, n: usize, chunk: &[u8]| buf.extend_from_slice(&chunk[..n]);
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = tokio::time::timeout_at(deadline, stream.read(&mut chunk))
            .await
            .expect("response in time")
            .expect("read");
        assert!(n > 0, "connection closed before a whole response head");
        read_more(&mut buf, n, &chunk);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {head:?}"));
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())
                .flatten()
        })
        .unwrap_or_else(|| panic!("no content-length in {head:?}"));
    while buf.len() < head_end + length {
        let n = tokio::time::timeout_at(deadline, stream.read(&mut chunk))
            .await
            .expect("body in time")
            .expect("read");
        assert!(n > 0, "connection closed before the whole body");
        read_more(&mut buf, n, &chunk);
    }
    (status, head, buf[head_end..head_end + length].to_vec())
}

// ---------------------------------------------------------------------------------------
// 1. Pairing, refresh and authentication over the socket.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pair_refresh_and_auth_over_the_socket() {
    let app = helpers::spawn_app().await;
    let (session_id, secret) = app.open_pairing_session().await;

    let mut ws = Ws::connect(&app).await;
    ws.ping().await;
    ws.send_json(&json!({
        "type": "pair", "session_id": session_id, "secret": secret, "device": device_json(),
    }))
    .await;
    let paired = ws.recv_json().await;
    assert_eq!(paired["type"], "auth_success", "{paired}");
    assert_eq!(paired["token_type"], "Bearer");
    assert_eq!(paired["expires_in"], 900);
    let device_id = paired["device_id"].as_str().expect("device_id").to_string();
    let access = paired["access_token"].as_str().expect("access").to_string();
    let refresh = paired["refresh_token"]
        .as_str()
        .expect("refresh")
        .to_string();
    assert!(device_id.starts_with("dev_") && device_id.len() == 36);
    assert!(refresh.starts_with("ghr_"), "{refresh}");
    assert_eq!(access.split('.').count(), 3, "a compact JWS");
    assert_eq!(
        paired.as_object().map(|o| o.len()),
        Some(6),
        "type, device_id, access_token, refresh_token, token_type, expires_in: {paired}"
    );
    ws.ping().await;

    // Both tokens are live and name the device; the device is listed as paired.
    let introspected = app.introspect(&access).await;
    assert_eq!(introspected["active"], true);
    assert_eq!(introspected["sub"], device_id.as_str());
    let introspected = app.introspect(&refresh).await;
    assert_eq!(introspected["active"], true);
    assert_eq!(introspected["token_type"], "refresh_token");
    assert_eq!(introspected["sub"], device_id.as_str());
    let list: Value = app
        .client()
        .get(app.url("/v1/devices"))
        .bearer_auth(app.admin_token())
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    let devices = list["devices"].as_array().expect("devices");
    assert_eq!(devices.len(), 1, "{list}");
    assert_eq!(devices[0]["id"], device_id.as_str());
    assert_eq!(devices[0]["name"], "Ada's phone");
    assert_eq!(devices[0]["platform"], "ios");
    assert_eq!(devices[0]["app_version"], "2.1.0");
    assert_eq!(devices[0]["status"], "active");
    assert_eq!(devices[0]["paired_from"], "127.0.0.1");

    // The same session cannot be claimed again, over REST either.
    let again = app
        .client()
        .post(app.url("/v1/pair"))
        .json(&json!({"session_id": session_id, "secret": secret, "device": device_json()}))
        .send()
        .await
        .expect("request");
    assert_eq!(again.status(), 401, "a session is claimed once");

    // Refresh on the same socket: a whole new pair, the old refresh token spent.
    ws.send_json(&json!({"type": "refresh", "refresh_token": refresh}))
        .await;
    let refreshed = ws.recv_json().await;
    assert_eq!(refreshed["type"], "auth_success", "{refreshed}");
    assert_eq!(refreshed["device_id"], device_id.as_str());
    assert_eq!(refreshed["token_type"], "Bearer");
    assert_eq!(refreshed["expires_in"], 900);
    let access2 = refreshed["access_token"]
        .as_str()
        .expect("access")
        .to_string();
    let refresh2 = refreshed["refresh_token"]
        .as_str()
        .expect("refresh")
        .to_string();
    assert_ne!(access2, access);
    assert_ne!(refresh2, refresh);
    assert_eq!(app.introspect(&refresh).await["active"], false, "spent");
    assert_eq!(app.introspect(&refresh2).await["active"], true);
    assert_eq!(app.introspect(&access2).await["active"], true);
    ws.ping().await;

    // A new socket authenticates with the new access token.
    let mut other = Ws::connect(&app).await;
    other.ping().await;
    assert_eq!(other.auth(&access2, &device_id).await, 900);
    other.ping().await;

    // A socket speaks for one device only.
    let stranger = app.pair_device().await;
    other
        .send_json(&json!({"type": "auth", "access_token": stranger.access_token}))
        .await;
    other.expect_error("device_mismatch").await;
    other.ping().await;
    // A refresh over a fresh socket authenticates it too.
    let mut third = Ws::connect(&app).await;
    third
        .send_json(&json!({"type": "refresh", "refresh_token": stranger.refresh_token}))
        .await;
    let answer = third.recv_json().await;
    assert_eq!(answer["type"], "auth_success", "{answer}");
    assert_eq!(answer["device_id"], stranger.device_id.as_str());
    third.ping().await;
}

// ---------------------------------------------------------------------------------------
// 2. The authentication deadline.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_that_never_authenticates_is_closed_after_10_seconds() {
    let app = helpers::spawn_app().await;
    let mut ws = Ws::connect(&app).await;
    let opened = Instant::now();
    // Pings are answered but do not count as authentication.
    for _ in 0..4 {
        ws.ping().await;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    ws.expect_close_within(POLICY, "authentication timeout", Duration::from_secs(7))
        .await;
    let elapsed = opened.elapsed();
    assert!(
        elapsed >= Duration::from_secs(9) && elapsed <= Duration::from_secs(13),
        "closed after {elapsed:?}, expected about 10 s"
    );
    wait_open_from_loopback(&app, 0).await;
}

// ---------------------------------------------------------------------------------------
// 3. Revocation closes live sockets at once, and only the affected ones.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_the_device_closes_its_socket_at_once() {
    let app = helpers::spawn_app().await;
    let target = app.pair_device().await;
    let bystander = app.pair_device().await;
    let mut ws = Ws::authenticated(&app, &target).await;
    let mut other = Ws::authenticated(&app, &bystander).await;
    // Unauthenticated sockets have nothing to lose either.
    let mut anonymous = Ws::connect(&app).await;

    delete_device(&app, &target.device_id).await;
    let revoked_at = Instant::now();
    ws.expect_close_within(POLICY, "token revoked", CLOSE_WITHIN)
        .await;
    assert!(revoked_at.elapsed() <= CLOSE_WITHIN);
    other.ping().await;
    anonymous.ping().await;
    // The revoked device cannot come back on a new socket.
    let mut again = Ws::connect(&app).await;
    again
        .send_json(&json!({"type": "auth", "access_token": target.access_token}))
        .await;
    again.expect_error("invalid_token").await;
    again
        .send_json(&json!({"type": "refresh", "refresh_token": target.refresh_token}))
        .await;
    again.expect_error("invalid_grant").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_the_access_token_closes_only_the_socket_that_used_it() {
    let app = helpers::spawn_app().await;
    let target = app.pair_device().await;
    let bystander = app.pair_device().await;
    let mut ws = Ws::authenticated(&app, &target).await;
    let mut other = Ws::authenticated(&app, &bystander).await;
    // A second socket of the same device, on a newer access token of the same family.
    let refreshed: PairedDevice = app
        .client()
        .post(app.url("/v1/token"))
        .form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", &target.refresh_token),
        ])
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("token pair");
    let mut sibling = Ws::authenticated(&app, &refreshed).await;

    revoke_token(&app, &target.access_token).await;
    let revoked_at = Instant::now();
    ws.expect_close_within(POLICY, "token revoked", CLOSE_WITHIN)
        .await;
    assert!(revoked_at.elapsed() <= CLOSE_WITHIN);
    other.ping().await;
    sibling.ping().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_the_refresh_family_closes_the_socket() {
    let app = helpers::spawn_app().await;
    let target = app.pair_device().await;
    let bystander = app.pair_device().await;
    let mut ws = Ws::authenticated(&app, &target).await;
    let mut other = Ws::authenticated(&app, &bystander).await;

    revoke_token(&app, &target.refresh_token).await;
    let revoked_at = Instant::now();
    ws.expect_close_within(POLICY, "token revoked", CLOSE_WITHIN)
        .await;
    assert!(revoked_at.elapsed() <= CLOSE_WITHIN);
    other.ping().await;
    assert_eq!(app.introspect(&target.access_token).await["active"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_the_signing_key_closes_the_sockets_it_signed_for() {
    let app = helpers::spawn_app().await;
    let old = app.pair_device().await;
    let old_kid = kid_of(&old.access_token);
    // An emergency rotation: the next key signs from now on, the old one still verifies.
    let rotated = app
        .client()
        .post(app.url("/v1/keys/rotate"))
        .bearer_auth(app.admin_token())
        .json(&json!({"now": true}))
        .send()
        .await
        .expect("request");
    assert_eq!(rotated.status(), 200, "rotation");
    let new = app.pair_device().await;
    assert_ne!(kid_of(&new.access_token), old_kid, "signed by the new key");

    let mut ws = Ws::authenticated(&app, &old).await;
    let mut other = Ws::authenticated(&app, &new).await;
    let response = app
        .client()
        .post(app.url(&format!("/v1/keys/{old_kid}/revoke")))
        .bearer_auth(app.admin_token())
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200, "key revoked");
    let revoked_at = Instant::now();
    ws.expect_close_within(POLICY, "token revoked", CLOSE_WITHIN)
        .await;
    assert!(revoked_at.elapsed() <= CLOSE_WITHIN);
    other.ping().await;
}

// ---------------------------------------------------------------------------------------
// 4. Expiry.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_closes_the_socket_when_tokens_are_rechecked() {
    let app = helpers::spawn_app().await;
    let device = app.pair_device().await;
    let mut ws = Ws::authenticated(&app, &device).await;
    // One second before exp + leeway the token still holds.
    app.clock.advance_ms((15 * 60 + 30 - 1) * 1000);
    app.running.services.changes.bump();
    ws.ping().await;
    // At exp + leeway it does not.
    app.clock.advance_ms(1000);
    app.running.services.changes.bump();
    ws.expect_close(POLICY, "token expired").await;
}

/// Runs `scenario` on its own runtime whose threads are named `thread_name`, so the CPU
/// time those threads use can be told apart from the rest of the test process.
fn on_named_runtime<F: std::future::Future<Output = ()>>(thread_name: &str, scenario: F) {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(thread_name)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(scenario);
}

/// CPU clock ticks used so far by this process's threads named `name`.
fn cpu_ticks_of_threads(name: &str) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir("/proc/self/task").expect("/proc/self/task") {
        let dir = entry.expect("task entry").path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.trim_end() != name {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("stat")).unwrap_or_default();
        let Some((_, after_comm)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = after_comm.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of stat(5): 11 and 12 after the name.
        let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
        total += ticks(11).unwrap_or(0) + ticks(12).unwrap_or(0);
    }
    total
}

/// Renewing the socket's token (`refresh` on the socket, as the protocol allows) must not
/// leave the first token's expiry timer behind: once that timer has fired and the new
/// token still verifies, the connection must go back to waiting, not spin.
#[test]
fn renewing_the_token_on_the_socket_does_not_spin_at_the_old_expiry() {
    const NAME: &str = "gh-ws-spin";
    on_named_runtime(NAME, async {
        let app = helpers::spawn_app_with(&[("GATEHOUSE_TOKEN_LEEWAY", "0s")]).await;
        let device = app.pair_device().await;
        // The first token has one second left when the socket authenticates with it.
        app.clock.advance_ms((15 * 60 - 1) * 1000);
        let mut ws = Ws::connect(&app).await;
        ws.send_json(&json!({"type": "auth", "access_token": device.access_token}))
            .await;
        let answer = ws.recv_json().await;
        assert_eq!(answer["expires_in"], 1, "{answer}");
        ws.send_json(&json!({"type": "refresh", "refresh_token": device.refresh_token}))
            .await;
        let answer = ws.recv_json().await;
        assert_eq!(answer["type"], "auth_success", "{answer}");
        assert_eq!(answer["expires_in"], 900);
        // Let the first token's timer fire (after 1 s), then measure 2 s of idleness.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let before = cpu_ticks_of_threads(NAME);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let used = cpu_ticks_of_threads(NAME) - before;
        // The socket is alive and well (the new token is valid)...
        ws.ping().await;
        // ...and an idle socket costs next to no CPU (ticks are 10 ms on Linux).
        assert!(
            used < 50,
            "the server's threads used {used} CPU ticks in 2 s with one idle socket"
        );
    });
}

// ---------------------------------------------------------------------------------------
// 5. Frame limits.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_64_kib_closes_with_1009() {
    let app = helpers::spawn_app().await;
    // Exactly 64 KiB is accepted (and refused as a message: unknown field).
    let mut ws = Ws::connect(&app).await;
    let prefix = r#"{"type":"ping","pad":""#;
    let pad = "x".repeat(64 * 1024 - prefix.len() - 2);
    let at_limit = format!(r#"{prefix}{pad}"}}"#);
    assert_eq!(at_limit.len(), 64 * 1024);
    ws.send_text(at_limit).await;
    ws.expect_error("invalid_request").await;
    ws.ping().await;

    // 70 000 bytes are not.
    let pad = "x".repeat(70_000 - prefix.len() - 2);
    let too_big = format!(r#"{prefix}{pad}"}}"#);
    assert_eq!(too_big.len(), 70_000);
    ws.send_may_fail(Message::text(too_big)).await;
    ws.expect_close(TOO_BIG, "message too big (64 KiB at most)")
        .await;

    // Nor is one byte over the limit.
    let mut ws = Ws::connect(&app).await;
    ws.send_may_fail(Message::text("y".repeat(64 * 1024 + 1)))
        .await;
    ws.expect_close(TOO_BIG, "message too big (64 KiB at most)")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binary_frame_closes_with_1003() {
    let app = helpers::spawn_app().await;
    let device = app.pair_device().await;
    let mut ws = Ws::authenticated(&app, &device).await;
    ws.send(Message::binary(br#"{"type":"ping"}"#.to_vec()))
        .await;
    ws.expect_close(UNSUPPORTED, "text frames only").await;
    // Before authentication too.
    let mut ws = Ws::connect(&app).await;
    ws.send(Message::binary(vec![0u8; 3])).await;
    ws.expect_close(UNSUPPORTED, "text frames only").await;
}

// ---------------------------------------------------------------------------------------
// 6. Bad messages and strikes.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_kind_of_bad_message_gets_its_code_and_five_strikes_close() {
    let app = helpers::spawn_app().await;
    let device = app.pair_device().await;
    let (session_id, _secret) = app.open_pairing_session().await;
    let mut ws = Ws::connect(&app).await;

    ws.send_text("this is not JSON").await;
    ws.expect_error("bad_message").await;
    ws.send_json(&json!({"type": "subscribe", "topic": "x"}))
        .await;
    ws.expect_error("unknown_type").await;
    ws.send_json(&json!({"type": "auth"})).await;
    ws.expect_error("invalid_request").await;
    // A real token with its signature altered.
    let mut forged: Vec<char> = device.access_token.chars().collect();
    let i = forged.len() - 20;
    forged[i] = if forged[i] == 'A' { 'B' } else { 'A' };
    let forged: String = forged.into_iter().collect();
    ws.send_json(&json!({"type": "auth", "access_token": forged}))
        .await;
    ws.expect_error("invalid_token").await;
    ws.send_json(&json!({
        "type": "pair", "session_id": session_id,
        "secret": "gsEMUca-q6hysekF3h9mKRlBSzeZ9QSpVfd0KD5kLI0", "device": device_json(),
    }))
    .await;
    ws.expect_error("pairing_failed").await;
    ws.expect_close(POLICY, "too many bad messages").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_bad_message_shapes_are_classified() {
    let app = helpers::spawn_app().await;
    let cases: &[(&str, &str)] = &[
        ("{", "bad_message"),
        ("", "bad_message"),
        ("[1,2,3]", "unknown_type"),
        (r#"{"kind":"ping"}"#, "unknown_type"),
        (r#"{"type":7}"#, "unknown_type"),
        (r#"{"type":"PING"}"#, "unknown_type"),
        (r#"{"type":"ping","extra":1}"#, "invalid_request"),
        (r#"{"type":"auth","access_token":5}"#, "invalid_request"),
        (r#"{"type":"refresh"}"#, "invalid_request"),
        (
            r#"{"type":"pair","session_id":"ps_x","secret":"s"}"#,
            "invalid_request",
        ),
        (
            r#"{"type":"pair","session_id":"ps_x","secret":"s","device":{"name":"","platform":"ios","app_version":"1"}}"#,
            "invalid_request",
        ),
        (
            r#"{"type":"refresh","refresh_token":"ghr_nope"}"#,
            "invalid_grant",
        ),
        (r#"{"type":"auth","access_token":"a.b.c"}"#, "invalid_token"),
    ];
    for (text, code) in cases {
        // A fresh socket per case, so the strikes of one do not close the next.
        let mut ws = Ws::connect(&app).await;
        ws.send_text(*text).await;
        let answer = ws.recv_json().await;
        assert_eq!(answer["type"], "error", "{text}: {answer}");
        assert_eq!(answer["code"], *code, "{text}: {answer}");
        ws.ping().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_with_fewer_than_five_strikes_stays_usable() {
    let app = helpers::spawn_app().await;
    let device = app.pair_device().await;
    let mut ws = Ws::connect(&app).await;
    for _ in 0..4 {
        ws.send_text("nope").await;
        ws.expect_error("bad_message").await;
    }
    ws.ping().await;
    assert_eq!(ws.auth(&device.access_token, &device.device_id).await, 900);
    ws.ping().await;
    // Strikes are not forgiven by a success: the fifth bad message still closes.
    ws.send_json(&json!({"type": "nope"})).await;
    ws.expect_error("unknown_type").await;
    ws.expect_close(POLICY, "too many bad messages").await;
}

/// A `pair` refused on a socket that already speaks for another device must not use up
/// the pairing session (nothing is lost on bad input: DESIGN.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_pair_on_an_authenticated_socket_does_not_spend_the_session() {
    let app = helpers::spawn_app().await;
    let device = app.pair_device().await;
    let (session_id, secret) = app.open_pairing_session().await;
    let mut ws = Ws::authenticated(&app, &device).await;
    ws.send_json(&json!({
        "type": "pair", "session_id": session_id, "secret": secret, "device": device_json(),
    }))
    .await;
    ws.expect_error("device_mismatch").await;
    // No device was made that nobody holds tokens for.
    let list: Value = app
        .client()
        .get(app.url("/v1/devices"))
        .bearer_auth(app.admin_token())
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    assert_eq!(
        list["devices"].as_array().map(Vec::len),
        Some(1),
        "only the socket's own device exists: {list}"
    );
    // The session must still be open for the app that was meant to claim it.
    let claimed = app
        .client()
        .post(app.url("/v1/pair"))
        .json(&json!({"session_id": session_id, "secret": secret, "device": device_json()}))
        .send()
        .await
        .expect("request");
    assert_eq!(
        claimed.status(),
        200,
        "the session survives a refused pair on the socket"
    );
}

/// A `refresh` refused on a socket that speaks for another device must not spend the
/// other device's refresh token (whose later use would then look like reuse).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_refresh_on_an_authenticated_socket_does_not_spend_the_token() {
    let app = helpers::spawn_app().await;
    let device = app.pair_device().await;
    let other = app.pair_device().await;
    let mut ws = Ws::authenticated(&app, &device).await;
    ws.send_json(&json!({"type": "refresh", "refresh_token": other.refresh_token}))
        .await;
    ws.expect_error("device_mismatch").await;
    assert_eq!(
        app.introspect(&other.refresh_token).await["active"],
        true,
        "the other device's refresh token is untouched"
    );
    assert_eq!(app.introspect(&other.access_token).await["active"], true);
    // Its owner can still refresh (no reuse detected, family intact).
    let response = app
        .client()
        .post(app.url("/v1/token"))
        .form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", &other.refresh_token),
        ])
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200, "the owner's refresh still works");
}

// ---------------------------------------------------------------------------------------
// 7. The message budget.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_over_the_budget_is_refused_then_closed() {
    let app = helpers::spawn_app_with(&[("GATEHOUSE_WS_MESSAGES_PER_SECOND", "1")]).await;
    let mut ws = Ws::connect(&app).await;
    // Eight pings in one write: a burst of two is allowed at one message a second.
    for _ in 0..8 {
        tokio::time::timeout(
            BOUND,
            ws.stream
                .feed(Message::text(json!({"type": "ping"}).to_string())),
        )
        .await
        .expect("feed in time")
        .expect("feed");
    }
    tokio::time::timeout(BOUND, ws.stream.flush())
        .await
        .expect("flush in time")
        .expect("flush");
    assert_eq!(ws.recv_json().await, json!({"type": "pong"}));
    assert_eq!(ws.recv_json().await, json!({"type": "pong"}));
    for _ in 0..5 {
        ws.expect_error("rate_limited").await;
    }
    ws.expect_close(POLICY, "too many bad messages").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_budget_refills_and_is_shared_by_a_devices_sockets() {
    let app = helpers::spawn_app_with(&[("GATEHOUSE_WS_MESSAGES_PER_SECOND", "1")]).await;
    let device = app.pair_device().await;
    // Each socket's own budget pays for its `auth`; after that the device's is spent.
    let mut first = Ws::authenticated(&app, &device).await;
    let mut second = Ws::authenticated(&app, &device).await;
    first.ping().await;
    second.ping().await;
    first.send_json(&json!({"type": "ping"})).await;
    first.expect_error("rate_limited").await;
    second.send_json(&json!({"type": "ping"})).await;
    second.expect_error("rate_limited").await;
    // One message a second comes back.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    first.ping().await;
    second.send_json(&json!({"type": "ping"})).await;
    second.expect_error("rate_limited").await;
}

// ---------------------------------------------------------------------------------------
// 8. Connection caps.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_address_cap_answers_429_before_the_upgrade() {
    let app = helpers::spawn_app_with(&[("GATEHOUSE_WS_MAX_CONNECTIONS_PER_IP", "2")]).await;
    let first = Ws::connect(&app).await;
    let mut second = Ws::connect(&app).await;
    wait_open_from_loopback(&app, 2).await;

    match Ws::try_connect(&app).await {
        Err(tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 429);
            assert_eq!(
                response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok()),
                Some("10")
            );
            if let Some(body) = response.body() {
                let body: Value = serde_json::from_slice(body).expect("JSON error body");
                assert_eq!(body["error"], "rate_limited", "{body}");
            }
        }
        Err(other) => panic!("expected an HTTP 429 refusal, got {other:?}"),
        Ok(_) => panic!("a third socket from one address was accepted"),
    }
    // The refusal took no slot, and the open sockets still work.
    assert_eq!(app.running.services.live.open(loopback()), (2, 2));
    second.ping().await;

    // Closing one frees its slot.
    first.close().await;
    wait_open_from_loopback(&app, 1).await;
    let mut third = Ws::connect(&app).await;
    third.ping().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_total_cap_answers_503() {
    let app = helpers::spawn_app_with(&[("GATEHOUSE_WS_MAX_CONNECTIONS", "1")]).await;
    let mut first = Ws::connect(&app).await;
    match Ws::try_connect(&app).await {
        Err(tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 503);
            if let Some(body) = response.body() {
                let body: Value = serde_json::from_slice(body).expect("JSON error body");
                assert_eq!(body["error"], "unavailable", "{body}");
            }
        }
        Err(other) => panic!("expected an HTTP 503 refusal, got {other:?}"),
        Ok(_) => panic!("a second socket was accepted over a total cap of 1"),
    }
    first.ping().await;
    first.close().await;
    wait_open_from_loopback(&app, 0).await;
    let mut again = Ws::connect(&app).await;
    again.ping().await;
}

// ---------------------------------------------------------------------------------------
// 9. Shutdown.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_server_closes_live_sockets_with_1001() {
    let app = helpers::spawn_app().await;
    let device = app.pair_device().await;
    let mut authenticated = Ws::authenticated(&app, &device).await;
    let mut anonymous = Ws::connect(&app).await;
    let addr: SocketAddr = app.running.local_addr;

    let stopped = tokio::time::timeout(Duration::from_secs(15), app.stop())
        .await
        .expect("the server stops in time with live sockets open");
    authenticated
        .expect_close(GOING_AWAY, "server shutting down")
        .await;
    anonymous
        .expect_close(GOING_AWAY, "server shutting down")
        .await;
    drop(stopped);
    // Nothing listens any more.
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "the port is closed"
    );
}

// ---------------------------------------------------------------------------------------
// 10. Not a WebSocket request.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_get_of_the_endpoint_is_a_4xx_json_error() {
    let app = helpers::spawn_app().await;
    let response = app
        .client()
        .get(app.url("/v1/ws"))
        .send()
        .await
        .expect("request");
    let status = response.status();
    assert!(status.is_client_error(), "status {status}");
    assert_eq!(
        response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/json")
    );
    let body: Value = response.json().await.expect("JSON body");
    assert!(
        body["error"].is_string() && body["message"].is_string(),
        "{body}"
    );

    // An HTTP/1.1 upgrade request missing its Sec-WebSocket-Key: 4xx JSON too.
    let mut tls = tls_stream(&app).await;
    let request = format!(
        "GET /v1/ws HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n",
        app.running.local_addr
    );
    tls.write_all(request.as_bytes()).await.expect("write");
    let (status, head, body) = read_http_response(&mut tls).await;
    assert!((400..500).contains(&status), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{head}"
    );
    let body: Value =
        serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{head}\n{body:?}: {e}"));
    assert!(body["error"].is_string(), "{body}");
    // Neither request took a slot.
    assert_eq!(app.running.services.live.open(loopback()), (0, 0));
}

/// A message with a member named twice is refused as invalid, not read as its last copy.
#[tokio::test]
async fn a_message_with_a_member_named_twice_is_refused() {
    let app = helpers::spawn_app().await;
    let device = app.pair_device().await;
    let mut ws = Ws::connect(&app).await;
    ws.send_text(format!(
        r#"{{"type":"auth","access_token":"not a token","access_token":"{}"}}"#,
        device.access_token
    ))
    .await;
    ws.expect_error("invalid_request").await;
    ws.send_text(r#"{"type":"ping","type":"ping"}"#).await;
    ws.expect_error("invalid_request").await;
    app.stop().await;
}

/// A close from the client is answered with a close frame echoing its code (RFC 6455
/// section 5.5.1), so the client sees its own code and not 1006.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_from_the_client_is_answered() {
    let app = helpers::spawn_app().await;
    let mut ws = Ws::connect(&app).await;
    ws.send(Message::Close(Some(tungstenite::protocol::CloseFrame {
        code: tungstenite::protocol::frame::coding::CloseCode::Normal,
        reason: "bye".into(),
    })))
    .await;
    match ws.next_event(BOUND).await {
        Event::Close(Some((code, _))) => assert_eq!(code, 1000),
        other => panic!("expected the close answered with 1000, got {other:?}"),
    }
    app.stop().await;
}

#[tokio::test]
async fn a_bound_device_pairs_refreshes_and_authenticates_over_the_socket_with_proofs() {
    use crate::dpop::DeviceKey;
    let app = helpers::spawn_app().await;
    let issuer = app.running.services.tokens.settings().issuer.clone();
    let now = || {
        use gatehouse::clock::Clock as _;
        app.clock.now_ms() / 1000
    };
    let key = DeviceKey::ed25519();
    let (session_id, secret) = app.open_pairing_session().await;
    let mut ws = Ws::connect(&app).await;
    ws.send_json(&json!({
        "type": "pair", "session_id": session_id, "secret": secret, "device": device_json(),
        "dpop": key.proof_at("POST", &format!("{issuer}/v1/pair"), now(), None),
    }))
    .await;
    let paired = ws.recv_json().await;
    assert_eq!(paired["token_type"], "DPoP", "{paired}");
    let access = paired["access_token"].as_str().unwrap().to_string();
    let refresh = paired["refresh_token"].as_str().unwrap().to_string();

    // A refresh without a proof is refused and spends nothing; with one it rotates.
    ws.send_json(&json!({"type": "refresh", "refresh_token": refresh}))
        .await;
    let refused = ws.recv_json().await;
    assert_eq!(refused["code"], "invalid_dpop_proof", "{refused}");
    ws.send_json(&json!({
        "type": "refresh", "refresh_token": refresh,
        "dpop": key.proof_at("POST", &format!("{issuer}/v1/token"), now(), None),
    }))
    .await;
    let refreshed = ws.recv_json().await;
    assert_eq!(refreshed["type"], "auth_success", "{refreshed}");
    assert_eq!(refreshed["token_type"], "DPoP");

    // On another socket, the bound access token authenticates only with a proof.
    let mut other = Ws::connect(&app).await;
    other
        .send_json(&json!({"type": "auth", "access_token": access}))
        .await;
    let refused = other.recv_json().await;
    assert_eq!(refused["code"], "invalid_dpop_proof", "{refused}");
    other
        .send_json(&json!({
            "type": "auth", "access_token": access,
            "dpop": DeviceKey::ed25519().proof_at("GET", &format!("{issuer}/v1/ws"), now(), Some(&access)),
        }))
        .await;
    let refused = other.recv_json().await;
    assert_eq!(
        refused["code"], "invalid_dpop_proof",
        "another key: {refused}"
    );
    other
        .send_json(&json!({
            "type": "auth", "access_token": access,
            "dpop": key.proof_at("GET", &format!("{issuer}/v1/ws"), now(), Some(&access)),
        }))
        .await;
    let accepted = other.recv_json().await;
    assert_eq!(accepted["type"], "auth_success", "{accepted}");
}
