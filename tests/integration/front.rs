//! The front door (`upstream.url`): gatehouse in front of a real app started by the test,
//! an HTTP server on TCP or a Unix socket that reports what it received.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use http::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{self, TestApp};

/// What the app saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path_and_query: String,
    headers: BTreeMap<String, String>,
    body_len: usize,
}

/// The app: records every request; `/slow` answers after 3 s, `/missing` is the app's
/// own 404, anything else 200 with a JSON summary.
#[derive(Clone, Default)]
struct App {
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl App {
    fn router(&self) -> axum::Router {
        let seen = self.seen.clone();
        axum::Router::new().fallback(move |request: Request| {
            let seen = seen.clone();
            async move {
                let (parts, body) = request.into_parts();
                let bytes = axum::body::to_bytes(body, usize::MAX)
                    .await
                    .unwrap_or_default();
                let headers = parts
                    .headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("?").to_string()))
                    .collect();
                let path = parts
                    .uri
                    .path_and_query()
                    .map_or("/", |p| p.as_str())
                    .to_string();
                seen.lock().unwrap().push(Seen {
                    method: parts.method.to_string(),
                    path_and_query: path.clone(),
                    headers,
                    body_len: bytes.len(),
                });
                if path == "/slow" {
                    tokio::time::sleep(Duration::from_secs(3)).await;
                }
                if path == "/missing" {
                    return Response::builder()
                        .status(404)
                        .header("content-type", "text/plain")
                        .body(Body::from("the app's own not found"))
                        .unwrap();
                }
                Response::builder()
                    .status(200)
                    .header("content-type", "application/json")
                    .header("x-app", "yes")
                    .body(Body::from(
                        json!({"app": true, "bytes": bytes.len()}).to_string(),
                    ))
                    .unwrap()
            }
        })
    }

    async fn listen_tcp(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = self.router();
        tokio::spawn(async move { axum::serve(listener, router).await });
        format!("http://{addr}")
    }

    async fn listen_unix(&self, path: &std::path::Path) -> String {
        let listener = tokio::net::UnixListener::bind(path).unwrap();
        let router = self.router();
        tokio::spawn(async move { axum::serve(listener, router).await });
        format!("unix:{}", path.display())
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// `GET path` through the front door with `token`.
async fn get_with(gatehouse: &TestApp, path: &str, token: &str) -> reqwest::Response {
    gatehouse
        .client()
        .get(gatehouse.url(path))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

async fn front(upstream: &str) -> TestApp {
    helpers::spawn_app_with(&[
        ("GATEHOUSE_UPSTREAM", upstream),
        ("GATEHOUSE_UPSTREAM_RESPONSE_TIMEOUT", "1s"),
    ])
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_reach_the_app_only_with_a_valid_device_token() {
    let app = App::default();
    let gatehouse = front(&app.listen_tcp().await).await;
    let client = gatehouse.client();

    // No token, a made-up one: 401 from gatehouse, nothing reaches the app.
    for token in [None, Some("not.a.token")] {
        let mut request = client.get(gatehouse.url("/api/things?x=1"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        let challenge = response.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .to_string();
        assert!(challenge.starts_with("Bearer"), "{challenge}");
        assert_eq!(challenge.contains("invalid_token"), token.is_some());
        let body: Value = response.json().await.unwrap();
        let code = if token.is_some() {
            "invalid_token"
        } else {
            "unauthorized"
        };
        assert_eq!(body["error"], code, "{body}");
    }
    assert!(app.seen().is_empty(), "the app saw nothing");

    // A paired device's token: through, with gatehouse's headers and none forged.
    let device = gatehouse.pair_device().await;
    let response = client
        .post(gatehouse.url("/api/things?x=1&y=%2F"))
        .bearer_auth(&device.access_token)
        .header("X-Gatehouse-Device-Id", "dev_forged")
        .header("X-Gatehouse-Admin", "yes")
        .header("Connection", "x-hop")
        .header("X-Hop", "dropped")
        .header("X-App-Header", "kept")
        .body(vec![7u8; 1_000_000])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-app"], "yes");
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        response.headers().get("content-security-policy").is_none(),
        "the app's answers keep the app's own policies"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body,
        json!({"app": true, "bytes": 1_000_000}),
        "a body over the API limit streams through"
    );
    let seen = app.seen();
    assert_eq!(seen.len(), 1);
    let got = &seen[0];
    assert_eq!(got.method, "POST");
    assert_eq!(got.path_and_query, "/api/things?x=1&y=%2F");
    assert_eq!(got.body_len, 1_000_000);
    let h = &got.headers;
    assert_eq!(h["x-gatehouse-device-id"], device.device_id);
    assert!(!h.contains_key("x-gatehouse-admin"), "{h:?}");
    assert!(
        !h.contains_key("x-hop") && !h.contains_key("connection"),
        "{h:?}"
    );
    assert_eq!(h["x-app-header"], "kept");
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "https");
    assert_eq!(
        h["x-forwarded-host"],
        gatehouse.running.local_addr.to_string()
    );
    assert_eq!(h["host"], gatehouse.running.local_addr.to_string());
    assert_eq!(h["x-request-id"], request_id);

    // The app's own errors are its own, not rewritten.
    let response = client
        .get(gatehouse.url("/missing"))
        .bearer_auth(&device.access_token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(response.text().await.unwrap(), "the app's own not found");

    // gatehouse's own paths stay gatehouse's.
    let health = client.get(gatehouse.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let before = app.seen().len();
    let devices = client
        .get(gatehouse.url("/v1/devices"))
        .bearer_auth(&device.access_token)
        .send()
        .await
        .unwrap();
    assert_eq!(
        devices.status(),
        StatusCode::UNAUTHORIZED,
        "a device is no admin"
    );
    assert_eq!(app.seen().len(), before);

    // What happened, counted for /metrics.
    let metrics = gatehouse.metrics().await;
    for line in [
        "gatehouse_front_requests_total{outcome=\"no_token\"} 1",
        "gatehouse_front_requests_total{outcome=\"invalid_token\"} 1",
        "gatehouse_front_requests_total{outcome=\"forwarded\"} 2",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }

    // Revoked: refused on the very next request.
    let revoked = client
        .delete(gatehouse.url(&format!("/v1/devices/{}", device.device_id)))
        .bearer_auth(gatehouse.admin_token())
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), StatusCode::OK);
    let response = client
        .get(gatehouse.url("/api/things"))
        .bearer_auth(&device.access_token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(app.seen().len(), before);
    gatehouse.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_that_is_down_is_502_and_one_that_stalls_504() {
    // A port nothing listens on.
    let closed = format!("http://127.0.0.1:{}", helpers::free_port());
    let gatehouse = front(&closed).await;
    let device = gatehouse.pair_device().await;
    let response = get_with(&gatehouse, "/anything", &device.access_token).await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    let id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "bad_gateway", "{body}");
    assert_eq!(body["request_id"], id.as_str());
    let ready = gatehouse
        .client()
        .get(gatehouse.url("/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        ready.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "/readyz knows the app is down"
    );
    gatehouse.stop().await;

    let app = App::default();
    let gatehouse = front(&app.listen_tcp().await).await;
    let ready = gatehouse
        .client()
        .get(gatehouse.url("/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
    let device = gatehouse.pair_device().await;
    let response = get_with(&gatehouse, "/slow", &device.access_token).await;
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "gateway_timeout", "{body}");
    gatehouse.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_can_listen_on_a_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let app = App::default();
    let upstream = app.listen_unix(&dir.path().join("app.sock")).await;
    let gatehouse = front(&upstream).await;
    let device = gatehouse.pair_device().await;
    let response = get_with(&gatehouse, "/over/unix", &device.access_token).await;
    assert_eq!(response.status(), StatusCode::OK);
    let seen = app.seen();
    assert_eq!(seen[0].path_and_query, "/over/unix");
    assert_eq!(seen[0].headers["x-gatehouse-device-id"], device.device_id);
    gatehouse.stop().await;
}

/// Sends `raw` on a plain connection and returns the status code of the answer.
async fn raw_status(addr: std::net::SocketAddr, raw: &str) -> u16 {
    let text = raw_answer(addr, raw).await;
    text.split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"))
}

/// Everything the server sends back for `raw` on a plain connection, until it closes it
/// (or 5 s pass).
async fn raw_answer(addr: std::net::SocketAddr, raw: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(raw.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

/// Request-smuggling shapes are refused before anything reaches the app, and the path
/// the app receives is exactly the one that was matched (no normalisation on the way).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_shapes_never_reach_the_app_and_paths_arrive_unchanged() {
    let app = App::default();
    let upstream = app.listen_tcp().await;
    let gatehouse = helpers::spawn_app_with(&[
        ("GATEHOUSE_UPSTREAM", upstream.as_str()),
        ("GATEHOUSE_TLS", "off"),
    ])
    .await;
    let token = {
        // Pairing over plain HTTP on loopback, as an app behind a local proxy would.
        let admin = gatehouse.admin_token();
        let client = reqwest::Client::new();
        let session: Value = client
            .post(gatehouse.url("/v1/pairing/sessions"))
            .bearer_auth(&admin)
            .json(&json!({}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let pair: Value = client
            .post(gatehouse.url("/v1/pair"))
            .json(
                &json!({"session_id": session["session_id"], "secret": session["secret"],
                "device": {"name": "p", "platform": "android", "app_version": "1"}}),
            )
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        pair["access_token"].as_str().unwrap().to_string()
    };
    let addr = gatehouse.running.local_addr;
    let auth = format!("Authorization: Bearer {token}\r\n");
    // Both framings: the body is read by its transfer coding alone (RFC 9112 section
    // 6.3), the app receives gatehouse's own framing, and the bytes after it are a new
    // request that must authenticate on its own (this one does not: 401).
    let both = format!(
        "POST /x HTTP/1.1\r\nHost: a\r\n{auth}Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    );
    // Answered once, and the connection closed at once: the bytes after the chunked body
    // are never read as a request.
    let started = std::time::Instant::now();
    let answer = raw_answer(addr, &both).await;
    assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{answer}");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the server closed the connection"
    );
    let framed = app.seen();
    let last = framed.last().expect("the first request reached the app");
    assert_eq!(last.path_and_query, "/x");
    assert_eq!(last.body_len, 0, "read by its transfer coding");
    assert!(
        !(last.headers.contains_key("transfer-encoding")
            && last.headers.contains_key("content-length")),
        "the app sees one framing: {:?}",
        last.headers
    );
    for (what, raw) in [
        (
            "two different Content-Lengths",
            format!(
                "POST /x HTTP/1.1\r\nHost: a\r\n{auth}Content-Length: 4\r\nContent-Length: 40\r\n\r\nabcd"
            ),
        ),
        (
            "an obsolete line folding",
            format!("GET /x HTTP/1.1\r\nHost: a\r\n{auth}X-Folded: a\r\n b\r\n\r\n"),
        ),
        (
            "a chunked body with a bad chunk size",
            format!(
                "POST /x HTTP/1.1\r\nHost: a\r\n{auth}Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"
            ),
        ),
    ] {
        let status = raw_status(addr, &raw).await;
        assert!((400..500).contains(&status), "{what}: answered {status}");
    }
    let paths: Vec<String> = app
        .seen()
        .iter()
        .map(|s| s.path_and_query.clone())
        .collect();
    assert!(
        !paths.iter().any(|p| p.contains("smuggled")),
        "nothing was smuggled: {paths:?}"
    );
    let before = app.seen().len();

    // A path the app could read otherwise than gatehouse routed it is refused; one
    // with a single reading arrives exactly as sent.
    for path in [
        "/a/../v1/devices",
        "/%2e%2e/admin/",
        "//v1/keys",
        "/a%2Fb",
        "/a/..;/admin",
        "/a\\b",
    ] {
        let status = raw_status(
            addr,
            &format!("GET {path} HTTP/1.1\r\nHost: a\r\n{auth}Connection: close\r\n\r\n"),
        )
        .await;
        assert_eq!(status, 400, "{path}");
    }
    assert_eq!(app.seen().len(), before, "none of them reached the app");
    for path in ["/a%20b/c", "/files/x..y", "/q?next=/../admin"] {
        let status = raw_status(
            addr,
            &format!("GET {path} HTTP/1.1\r\nHost: a\r\n{auth}Connection: close\r\n\r\n"),
        )
        .await;
        assert_eq!(status, 200, "{path}");
        assert_eq!(app.seen().last().unwrap().path_and_query, path, "unchanged");
    }
    gatehouse.stop().await;
}

/// A WebSocket app: echoes every text message prefixed with the device id it was told,
/// and chooses the `chat` subprotocol when offered.
pub(crate) async fn ws_app(seen_protocols: Arc<Mutex<Vec<String>>>) -> String {
    use axum::extract::ws::{Message, WebSocketUpgrade};
    let router =
        axum::Router::new().fallback(move |headers: http::HeaderMap, upgrade: WebSocketUpgrade| {
            let seen = seen_protocols.clone();
            async move {
                let offered = headers
                    .get("sec-websocket-protocol")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                seen.lock().unwrap().push(offered);
                let device = headers
                    .get("x-gatehouse-device-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("none")
                    .to_string();
                upgrade
                    .protocols(["chat"])
                    .on_upgrade(move |mut socket| async move {
                        while let Some(Ok(message)) = socket.recv().await {
                            if let Message::Text(text) = message {
                                let answer = format!("{device}: {}", text.as_str());
                                if socket.send(Message::Text(answer.into())).await.is_err() {
                                    break;
                                }
                            }
                        }
                    })
            }
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    format!("http://{addr}")
}

/// A WebSocket through the front door reaches the app with the device's identity, the
/// browser's bearer subprotocol is taken off the list (and never echoed), and revoking the
/// device closes the relayed socket with 1008 at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_is_relayed_to_the_app_and_cut_when_the_device_is_revoked() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::{Message, http::HeaderValue};

    let protocols = Arc::new(Mutex::new(Vec::new()));
    let upstream = ws_app(protocols.clone()).await;
    let gatehouse = front(&upstream).await;
    let device = gatehouse.pair_device().await;
    let url = format!("wss://{}/live", gatehouse.running.local_addr);

    // Without a token: refused before any upgrade.
    let tls = crate::ws::tls_stream(&gatehouse).await;
    let refused = tokio_tungstenite::client_async(url.as_str(), tls).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 401);
        }
        other => panic!("expected a 401, got {other:?}"),
    }
    assert!(protocols.lock().unwrap().is_empty(), "the app saw nothing");

    // A page from an origin not in cors.allowed_origins: refused.
    let mut request = url.as_str().into_client_request().unwrap();
    request.headers_mut().insert(
        "sec-websocket-protocol",
        HeaderValue::from_str(&format!("gatehouse.bearer.{}", device.access_token)).unwrap(),
    );
    request
        .headers_mut()
        .insert("origin", HeaderValue::from_static("https://evil.example"));
    let tls = crate::ws::tls_stream(&gatehouse).await;
    match tokio_tungstenite::client_async(request, tls).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 403);
        }
        other => panic!("expected a 403, got {other:?}"),
    }

    // As a browser does: the token in the subprotocol list.
    let mut request = url.as_str().into_client_request().unwrap();
    request.headers_mut().insert(
        "sec-websocket-protocol",
        HeaderValue::from_str(&format!("gatehouse.bearer.{}, chat", device.access_token)).unwrap(),
    );
    let tls = crate::ws::tls_stream(&gatehouse).await;
    let (mut socket, response) = tokio_tungstenite::client_async(request, tls).await.unwrap();
    assert_eq!(response.headers()["sec-websocket-protocol"], "chat");
    assert_eq!(
        protocols.lock().unwrap().as_slice(),
        ["chat"],
        "no token reaches the app"
    );
    socket.send(Message::text("hello")).await.unwrap();
    let echoed = tokio::time::timeout(Duration::from_secs(5), socket.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        echoed.into_text().unwrap().as_str(),
        format!("{}: hello", device.device_id)
    );

    // Revoked: the relayed socket is closed with 1008 within a second.
    let started = std::time::Instant::now();
    let revoked = gatehouse
        .client()
        .delete(gatehouse.url(&format!("/v1/devices/{}", device.device_id)))
        .bearer_auth(gatehouse.admin_token())
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), StatusCode::OK);
    assert_eq!(
        close_code(&mut socket, Duration::from_secs(2)).await,
        Some(1008)
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    // Both ends of the socket's life are in the audit log, with why it ended.
    let closed_records = socket_closed_records(&gatehouse).await;
    assert_eq!(closed_records.len(), 1);
    assert_eq!(closed_records[0].details["reason"], "revoked");
    assert_eq!(
        closed_records[0].device.as_deref(),
        Some(device.device_id.as_str())
    );
    let opened = gatehouse.audit_events("front.socket_opened");
    assert_eq!(opened.len(), 1);
    assert_eq!(opened[0].details["path"], "/live");
    gatehouse.stop().await;
}

/// A WebSocket to `/live` through the front door, with `token` in `Authorization`.
async fn open_relayed(
    gatehouse: &TestApp,
    token: &str,
) -> Result<
    (
        tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
        tokio_tungstenite::tungstenite::handshake::client::Response,
    ),
    tokio_tungstenite::tungstenite::Error,
> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::http::HeaderValue;
    let mut request = format!("wss://{}/live", gatehouse.running.local_addr)
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
    );
    let tls = crate::ws::tls_stream(gatehouse).await;
    tokio_tungstenite::client_async(request, tls).await
}

/// The `front.socket_closed` records, once the first is written (the relay writes it
/// after its close frame has gone out).
async fn socket_closed_records(gatehouse: &TestApp) -> Vec<gatehouse::audit::EventView> {
    for _ in 0..50 {
        let records = gatehouse.audit_events("front.socket_closed");
        if !records.is_empty() {
            return records;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gatehouse.audit_events("front.socket_closed")
}

/// The code of the close frame `socket` receives within `within`, skipping other
/// messages.
pub(crate) async fn close_code<S>(
    socket: &mut tokio_tungstenite::WebSocketStream<S>,
    within: Duration,
) -> Option<u16>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        match tokio::time::timeout(within, socket.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => return frame.map(|f| u16::from(f.code)),
            Ok(Some(Ok(_))) => {}
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

/// The next text message `socket` receives within 5 s, skipping others.
pub(crate) async fn next_text<S>(socket: &mut tokio_tungstenite::WebSocketStream<S>) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        match tokio::time::timeout(Duration::from_secs(5), socket.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => return text.to_string(),
            Ok(Some(Ok(_))) => {}
            other => panic!("expected a text message, got {other:?}"),
        }
    }
}

/// Asserts that opening a socket was refused before the upgrade with `status`.
fn assert_refused<T: std::fmt::Debug>(
    opened: Result<T, tokio_tungstenite::tungstenite::Error>,
    status: u16,
) -> tokio_tungstenite::tungstenite::http::Response<Option<Vec<u8>>> {
    match opened {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), status);
            *response
        }
        other => panic!("expected a {status}, got {other:?}"),
    }
}

/// Relayed sockets count toward the per-address cap of live connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relayed_websockets_count_toward_the_per_address_cap() {
    let upstream = ws_app(Arc::default()).await;
    let gatehouse = helpers::spawn_app_with(&[
        ("GATEHOUSE_UPSTREAM", upstream.as_str()),
        ("GATEHOUSE_WS_MAX_CONNECTIONS_PER_IP", "1"),
    ])
    .await;
    let device = gatehouse.pair_device().await;
    let (_first, _) = open_relayed(&gatehouse, &device.access_token)
        .await
        .expect("the first socket opens");
    assert_refused(open_relayed(&gatehouse, &device.access_token).await, 429);
    // Audited, coalesced: one record for the refusals of this address on this route.
    gatehouse
        .running
        .services
        .audit
        .write_refusals(0)
        .await
        .unwrap();
    let refused = gatehouse.audit_events("front.refused");
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0].details["reason"], "too_many_connections");
    assert_eq!(refused[0].details["refused"], 1);
    gatehouse.stop().await;
}

/// A device that floods its relayed socket is cut off with 1008, and the audit log says
/// why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_over_its_message_budget_is_closed_with_1008() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let upstream = ws_app(Arc::default()).await;
    let gatehouse = helpers::spawn_app_with(&[
        ("GATEHOUSE_UPSTREAM", upstream.as_str()),
        ("GATEHOUSE_UPSTREAM_WS_MESSAGES_PER_SECOND", "1"),
    ])
    .await;
    let device = gatehouse.pair_device().await;
    let (mut socket, _) = open_relayed(&gatehouse, &device.access_token)
        .await
        .unwrap();
    // A burst of two passes; the rest is refused.
    for n in 0..10 {
        if socket.send(Message::text(format!("m{n}"))).await.is_err() {
            break;
        }
    }
    let mut echoes = 0;
    let code = loop {
        match tokio::time::timeout(Duration::from_secs(5), socket.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => break frame.map(|f| u16::from(f.code)),
            Ok(Some(Ok(Message::Text(_)))) => echoes += 1,
            Ok(Some(Ok(_))) => {}
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(code, Some(1008));
    assert!(echoes <= 2, "{echoes} messages passed a budget of 2");
    let closed = socket_closed_records(&gatehouse).await;
    assert_eq!(closed[0].details["reason"], "rate_limited");
    gatehouse.stop().await;
}

/// One device holds at most `upstream.ws_max_connections_per_device` relayed sockets; one
/// more is refused before the upgrade and audited, and a place freed is a place again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_holds_at_most_its_share_of_relayed_sockets() {
    let upstream = ws_app(Arc::default()).await;
    let gatehouse = helpers::spawn_app_with(&[
        ("GATEHOUSE_UPSTREAM", upstream.as_str()),
        ("GATEHOUSE_UPSTREAM_WS_MAX_CONNECTIONS_PER_DEVICE", "2"),
    ])
    .await;
    let device = gatehouse.pair_device().await;
    let other = gatehouse.pair_device().await;
    let (first, _) = open_relayed(&gatehouse, &device.access_token)
        .await
        .expect("the first socket opens");
    let (_second, _) = open_relayed(&gatehouse, &device.access_token)
        .await
        .expect("the second socket opens");
    let refused = assert_refused(open_relayed(&gatehouse, &device.access_token).await, 429);
    assert!(refused.headers().contains_key("retry-after"));
    // Another device has its own share.
    let (_others, _) = open_relayed(&gatehouse, &other.access_token)
        .await
        .expect("another device's socket opens");
    let refused = gatehouse.audit_events("front.socket_refused");
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0].details["reason"], "too_many_sockets");
    // The admin's view lists who holds sockets.
    let view: Value = gatehouse
        .client()
        .get(gatehouse.url("/v1/front"))
        .bearer_auth(gatehouse.admin_token())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(view["enabled"], true);
    let holding: Vec<(String, u64)> = view["sockets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["device_id"].as_str().unwrap().to_string(),
                s["open"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        holding,
        [(device.device_id.clone(), 2), (other.device_id.clone(), 1)]
    );
    assert_eq!(view["routes"][0]["sockets"], 3);
    drop(first);
    let mut reopened = None;
    for _ in 0..50 {
        if let Ok(socket) = open_relayed(&gatehouse, &device.access_token).await {
            reopened = Some(socket);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(reopened.is_some(), "a closed socket frees its place");
    gatehouse.stop().await;
}

/// A relayed socket outlives the access token it opened with while the device refreshes
/// its family (re-authenticates); one whose device does not is closed with 1008 at its
/// token's expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_socket_stays_open_past_expiry_only_if_the_device_refreshed() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let upstream = ws_app(Arc::default()).await;
    let gatehouse = helpers::spawn_app_with(&[
        ("GATEHOUSE_UPSTREAM", upstream.as_str()),
        ("GATEHOUSE_ACCESS_TTL", "1m"),
    ])
    .await;
    let refreshing = gatehouse.pair_device().await;
    let idle = gatehouse.pair_device().await;
    // Both tokens have two seconds left.
    gatehouse.clock.advance_ms(58_000);
    let (mut kept, _) = open_relayed(&gatehouse, &refreshing.access_token)
        .await
        .unwrap();
    let (mut cut, _) = open_relayed(&gatehouse, &idle.access_token).await.unwrap();
    let started = std::time::Instant::now();
    let refreshed = gatehouse
        .client()
        .post(gatehouse.url("/v1/token"))
        .form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", refreshing.refresh_token.as_str()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(refreshed.status(), 200);
    assert_eq!(
        close_code(&mut cut, Duration::from_secs(10)).await,
        Some(1008)
    );
    assert!(started.elapsed() >= Duration::from_millis(1500));
    // Past its first token's expiry, the refreshed device's socket still relays.
    tokio::time::sleep(Duration::from_millis(800)).await;
    kept.send(Message::text("still here")).await.unwrap();
    let echo = next_text(&mut kept).await;
    assert_eq!(echo, format!("{}: still here", refreshing.device_id));
    let records = socket_closed_records(&gatehouse).await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].details["reason"], "expired");
    assert_eq!(records[0].device.as_deref(), Some(idle.device_id.as_str()));
    gatehouse.stop().await;
}

/// With `upstream.assertion`, the app receives a JWT that says who passed and binds the
/// request, signed by the active key: OpenSSL, an independent implementation, verifies
/// it with the public key from the JWKS, and refuses it once a byte is changed. It is no
/// access token either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_can_verify_a_signed_assertion_of_each_request() {
    use data_encoding::BASE64URL_NOPAD;
    let test = "the_app_can_verify_a_signed_assertion_of_each_request";
    if !helpers::tool_available(test, "openssl", &["version"], "apt-get install openssl") {
        return;
    }
    let app = App::default();
    let upstream = app.listen_tcp().await;
    let gatehouse = helpers::spawn_app_with(&[
        ("GATEHOUSE_UPSTREAM", upstream.as_str()),
        ("GATEHOUSE_UPSTREAM_ASSERTION", "true"),
    ])
    .await;
    let device = gatehouse.pair_device().await;
    let response = gatehouse
        .client()
        .post(gatehouse.url("/things?x=1"))
        .bearer_auth(&device.access_token)
        .header("x-gatehouse-assertion", "forged")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    let seen = app.seen().pop().unwrap();
    let assertion = seen.headers["x-gatehouse-assertion"].clone();
    assert_ne!(assertion, "forged");
    let parts: Vec<&str> = assertion.split('.').collect();
    assert_eq!(parts.len(), 3);
    let decode = |part: &str| -> Value {
        serde_json::from_slice(&BASE64URL_NOPAD.decode(part.as_bytes()).unwrap()).unwrap()
    };
    let (header, claims) = (decode(parts[0]), decode(parts[1]));
    assert_eq!(header["typ"], "gatehouse-assertion+jwt");
    assert_eq!(header["alg"], "EdDSA");
    assert_eq!(claims["aud"], upstream);
    assert_eq!(claims["sub"], device.device_id);
    assert_eq!(claims["htm"], "POST");
    assert_eq!(claims["htu"], "/things?x=1");
    assert_eq!(claims["jti"], request_id);
    assert_eq!(
        claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
        30
    );
    let issuer: Value = gatehouse
        .client()
        .get(gatehouse.url("/.well-known/oauth-authorization-server"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(claims["iss"], issuer["issuer"]);

    // The signature, checked by OpenSSL with the JWKS key named by `kid`.
    let jwks: Value = gatehouse
        .client()
        .get(gatehouse.url("/.well-known/jwks.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == header["kid"])
        .expect("the kid is in the JWKS");
    let x = BASE64URL_NOPAD
        .decode(key["x"].as_str().unwrap().as_bytes())
        .unwrap();
    // SubjectPublicKeyInfo of an Ed25519 key (RFC 8410): a fixed prefix, then the key.
    let mut spki = vec![
        0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
    ];
    spki.extend_from_slice(&x);
    let dir = tempfile::tempdir().unwrap();
    let pem = format!(
        "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
        data_encoding::BASE64.encode(&spki)
    );
    std::fs::write(dir.path().join("key.pem"), pem).unwrap();
    std::fs::write(
        dir.path().join("sig"),
        BASE64URL_NOPAD.decode(parts[2].as_bytes()).unwrap(),
    )
    .unwrap();
    let verify = |input: &str| {
        std::fs::write(dir.path().join("input"), input).unwrap();
        std::process::Command::new("openssl")
            .args([
                "pkeyutl", "-verify", "-pubin", "-inkey", "key.pem", "-rawin",
            ])
            .args(["-in", "input", "-sigfile", "sig"])
            .current_dir(dir.path())
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(
        verify(&format!("{}.{}", parts[0], parts[1])),
        "OpenSSL verifies it"
    );
    let mut changed = claims.clone();
    changed["htu"] = json!("/admin");
    let forged_claims = BASE64URL_NOPAD.encode(changed.to_string().as_bytes());
    assert!(
        !verify(&format!("{}.{forged_claims}", parts[0])),
        "a changed claim fails"
    );

    // An assertion is no access token.
    let introspected = gatehouse.introspect(&assertion).await;
    assert_eq!(introspected, json!({"active": false}));
    assert_eq!(
        get_with(&gatehouse, "/things", &assertion).await.status(),
        401
    );
    gatehouse.stop().await;
}

/// A client message over `upstream.ws_max_message` closes the relayed socket with 1009,
/// and the audit log says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_size_limit_closes_the_relay_with_1009() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let upstream = ws_app(Arc::default()).await;
    let gatehouse = helpers::spawn_app_with(&[
        ("GATEHOUSE_UPSTREAM", upstream.as_str()),
        ("GATEHOUSE_UPSTREAM_WS_MAX_MESSAGE", "1024"),
    ])
    .await;
    let device = gatehouse.pair_device().await;
    let (mut socket, _) = open_relayed(&gatehouse, &device.access_token)
        .await
        .unwrap();
    socket.send(Message::text("x".repeat(1000))).await.unwrap();
    assert_eq!(
        next_text(&mut socket).await.len(),
        1000 + device.device_id.len() + 2
    );
    socket.send(Message::text("x".repeat(2000))).await.unwrap();
    assert_eq!(
        close_code(&mut socket, Duration::from_secs(5)).await,
        Some(1009)
    );
    let closed = socket_closed_records(&gatehouse).await;
    assert_eq!(closed[0].details["reason"], "message_too_big");
    gatehouse.stop().await;
}
