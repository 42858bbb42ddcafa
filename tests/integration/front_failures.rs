//! The front door (`upstream.url`) against an app that misbehaves: one that stalls, resets
//! its connections or is not there at all, one that sends or receives 100 MiB bodies (which
//! must stream through, not be buffered), one that stops in the middle of its answer, and
//! a relayed WebSocket whose client stops reading.
//!
//! Every wait is bounded, generously (a loaded two-core machine), so that a front door that
//! misbehaves fails a test with a message instead of hanging it; no sleep stands in for an
//! assertion.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::response::Response;
use http::StatusCode;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc};

use crate::helpers::{self, TestApp};

/// The longest any single step may take before the test gives up on it.
const BOUND: Duration = Duration::from_secs(30);
/// The size of the large bodies: 100 MiB.
const LARGE: usize = 100 * 1024 * 1024;
/// The first piece of a large body, sent alone before the rest is held back.
const FIRST: usize = 64 * 1024;
/// The rest of a large body goes in pieces of this size.
const PIECE: usize = 1024 * 1024;
/// The large bodies are the bytes `offset % PERIOD`, so that order and content are checked
/// as well as the length.
const PERIOD: usize = 251;
/// `upstream.response_timeout` in the tests of an app that does not answer in time (the
/// others keep the default, 60 s, so that a loaded machine cannot make them time out).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// The relay's per-frame send timeout (`SEND_TIMEOUT` in src/front/relay.rs).
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// gatehouse in front of `upstream`.
async fn front(upstream: &str) -> TestApp {
    helpers::spawn_app_with(&[("GATEHOUSE_UPSTREAM", upstream)]).await
}

/// gatehouse in front of `upstream`, with `upstream.response_timeout` `RESPONSE_TIMEOUT`.
async fn impatient_front(upstream: &str) -> TestApp {
    let timeout = format!("{}s", RESPONSE_TIMEOUT.as_secs());
    helpers::spawn_app_with(&[
        ("GATEHOUSE_UPSTREAM", upstream),
        ("GATEHOUSE_UPSTREAM_RESPONSE_TIMEOUT", timeout.as_str()),
    ])
    .await
}

/// `GET path` through the front door with `token`, bounded.
async fn get_with(gatehouse: &TestApp, path: &str, token: &str) -> reqwest::Response {
    tokio::time::timeout(
        BOUND,
        gatehouse
            .client()
            .get(gatehouse.url(path))
            .bearer_auth(token)
            .send(),
    )
    .await
    .unwrap_or_else(|_| panic!("GET {path}: no answer head within {BOUND:?}"))
    .unwrap()
}

/// The request id of `response`, which must be there and not empty.
fn request_id(response: &reqwest::Response) -> String {
    let id = response
        .headers()
        .get("x-request-id")
        .expect("the answer carries x-request-id")
        .to_str()
        .unwrap()
        .to_string();
    assert!(!id.is_empty(), "an empty x-request-id");
    id
}

/// Checks that `response` is gatehouse's JSON error `code` with `status`, and that it
/// carries the request id (in the header and the body).
async fn assert_error(response: reqwest::Response, status: StatusCode, code: &str) {
    assert_eq!(response.status(), status);
    let id = request_id(&response);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], code, "{body}");
    assert_eq!(body["request_id"], id.as_str(), "{body}");
}

/// Checks that `/metrics` counted `count` front door requests with `outcome`.
async fn assert_counted(gatehouse: &TestApp, outcome: &str, count: u32) {
    let metrics = gatehouse.metrics().await;
    let line = format!("gatehouse_front_requests_total{{outcome=\"{outcome}\"}} {count}");
    assert!(metrics.contains(&line), "{line} in {metrics}");
}

/// What a misbehaving app does with each connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Misbehaviour {
    /// Reads the request and never answers a path under `/stall`; any other path gets a
    /// plain `200 ok`.
    Stall,
    /// Resets the connection (`SO_LINGER` 0, then close) as soon as it is accepted.
    ResetOnAccept,
    /// Reads the request head, then resets the connection.
    ResetAfterRequest,
    /// Answers with a head announcing `STALLED_LENGTH` bytes, sends `STALLED_SENT` of them,
    /// then nothing more (the connection stays open).
    StallMidBody,
}

/// The body length a `StallMidBody` app announces, and how much of it it sends.
const STALLED_LENGTH: usize = 1_000_000;
const STALLED_SENT: usize = 1000;

/// What a misbehaving app reports to the test.
#[derive(Debug, PartialEq, Eq)]
enum AppEvent {
    /// A request arrived: its request line.
    Request(String),
    /// The peer (gatehouse) closed a connection the app was holding.
    Closed,
}

/// An app on raw TCP that misbehaves as told; its events come through the receiver.
async fn raw_app(how: Misbehaviour) -> (String, mpsc::UnboundedReceiver<AppEvent>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (events, received) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(misbehave(stream, how, events.clone()));
        }
    });
    (format!("http://{addr}"), received)
}

async fn misbehave(
    mut stream: TcpStream,
    how: Misbehaviour,
    events: mpsc::UnboundedSender<AppEvent>,
) {
    if how == Misbehaviour::ResetOnAccept {
        stream.set_zero_linger().unwrap();
        return;
    }
    let Some(line) = read_head(&mut stream).await else {
        return;
    };
    let _ = events.send(AppEvent::Request(line.clone()));
    match how {
        Misbehaviour::ResetOnAccept => {}
        Misbehaviour::ResetAfterRequest => stream.set_zero_linger().unwrap(),
        Misbehaviour::Stall if !line.contains(" /stall") => {
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
                .await;
            let _ = stream.shutdown().await;
        }
        Misbehaviour::Stall => hold(stream, events).await,
        Misbehaviour::StallMidBody => {
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\
                 Content-Length: {STALLED_LENGTH}\r\n\r\n"
            );
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(&[b'x'; STALLED_SENT]).await;
            hold(stream, events).await;
        }
    }
}

/// Keeps `stream` open without a word until the peer closes it, then says so.
async fn hold(mut stream: TcpStream, events: mpsc::UnboundedSender<AppEvent>) {
    let mut sink = [0u8; 4096];
    loop {
        match stream.read(&mut sink).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    let _ = events.send(AppEvent::Closed);
}

/// Reads one request head from `stream`: its request line, or `None` when the peer went
/// away first.
async fn read_head(stream: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&head);
    text.lines().next().map(str::to_string)
}

/// The next event of a raw app, bounded.
async fn next_event(events: &mut mpsc::UnboundedReceiver<AppEvent>, what: &str) -> AppEvent {
    tokio::time::timeout(BOUND, events.recv())
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {BOUND:?}"))
        .expect("the app is still running")
}

/// An app that accepts the connection and the request, then never answers: 504 once
/// `upstream.response_timeout` has passed (not before), and gatehouse lets go of the
/// stalled connection and goes on serving, the app included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_that_never_answers_is_504_after_the_response_timeout() {
    let (upstream, mut events) = raw_app(Misbehaviour::Stall).await;
    let gatehouse = impatient_front(&upstream).await;
    let device = gatehouse.pair_device().await;

    let started = Instant::now();
    let response = get_with(&gatehouse, "/stall/1", &device.access_token).await;
    let waited = started.elapsed();
    assert_error(response, StatusCode::GATEWAY_TIMEOUT, "gateway_timeout").await;
    assert!(
        waited >= RESPONSE_TIMEOUT,
        "answered after {waited:?}, before upstream.response_timeout"
    );
    assert_eq!(
        next_event(&mut events, "the stalled request").await,
        AppEvent::Request("GET /stall/1 HTTP/1.1".into()),
        "the request reached the app: the 504 is its silence, not a failed connect"
    );
    // gatehouse gives the stalled connection up rather than keeping it open for ever.
    assert_eq!(
        next_event(&mut events, "the stalled connection's close").await,
        AppEvent::Closed
    );

    // Still healthy: its own paths answer, and the next request reaches the app.
    let health = gatehouse
        .client()
        .get(gatehouse.url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let response = get_with(&gatehouse, "/fine", &device.access_token).await;
    assert_eq!(response.status(), StatusCode::OK);
    request_id(&response);
    assert_eq!(response.text().await.unwrap(), "ok");
    assert_eq!(
        next_event(&mut events, "the next request").await,
        AppEvent::Request("GET /fine HTTP/1.1".into())
    );
    assert_counted(&gatehouse, "gateway_timeout", 1).await;
    assert_counted(&gatehouse, "forwarded", 1).await;
    gatehouse.stop().await;
}

/// An app that resets the connection, at once or after reading the request: 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_that_resets_the_connection_is_502() {
    for how in [Misbehaviour::ResetOnAccept, Misbehaviour::ResetAfterRequest] {
        let (upstream, mut events) = raw_app(how).await;
        let gatehouse = front(&upstream).await;
        let device = gatehouse.pair_device().await;
        let response = get_with(&gatehouse, "/reset", &device.access_token).await;
        assert_error(response, StatusCode::BAD_GATEWAY, "bad_gateway").await;
        if how == Misbehaviour::ResetAfterRequest {
            assert_eq!(
                next_event(&mut events, "the request").await,
                AppEvent::Request("GET /reset HTTP/1.1".into()),
                "{how:?}"
            );
        }
        assert_counted(&gatehouse, "bad_gateway", 1).await;
        gatehouse.stop().await;
    }
}

/// Nothing listening on the app's port: 502, and `/readyz` answers 503 until the app is
/// there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_that_is_not_listening_is_502_and_not_ready() {
    let port = helpers::free_port();
    let gatehouse = front(&format!("http://127.0.0.1:{port}")).await;
    let device = gatehouse.pair_device().await;
    let response = get_with(&gatehouse, "/anything", &device.access_token).await;
    assert_error(response, StatusCode::BAD_GATEWAY, "bad_gateway").await;
    let ready = gatehouse
        .client()
        .get(gatehouse.url("/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_counted(&gatehouse, "bad_gateway", 1).await;

    // The 503 was the app's absence: once something listens there, gatehouse is ready.
    let _listening = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    let ready = gatehouse
        .client()
        .get(gatehouse.url("/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
    gatehouse.stop().await;
}

/// The large body's bytes from `offset`, `len` of them, sliced out of `pattern` (which is
/// `PERIOD + PIECE` bytes long) without copying.
fn pattern_piece(pattern: &Bytes, offset: usize, len: usize) -> Bytes {
    let start = offset % PERIOD;
    pattern.slice(start..start + len)
}

fn pattern() -> Bytes {
    (0..PERIOD + PIECE).map(|i| (i % PERIOD) as u8).collect()
}

/// Whether `data`, found at `offset` of a large body, is what the pattern has there.
fn matches_pattern(pattern: &Bytes, offset: usize, data: &[u8]) -> bool {
    data.chunks(PIECE)
        .enumerate()
        .all(|(n, piece)| *piece == pattern_piece(pattern, offset + n * PIECE, piece.len()))
}

/// How a body held back after its first piece goes on.
#[derive(Debug, Clone)]
struct HeldBack {
    /// The body's length.
    total: usize,
    /// Notified when the first piece has reached the other side.
    go: Arc<Notify>,
    /// How long the sender then pauses before the rest (a slow client).
    pause: Duration,
    /// Set when `go` never came within `BOUND`.
    gave_up: Arc<AtomicBool>,
}

impl HeldBack {
    fn new(total: usize) -> Self {
        Self {
            total,
            go: Arc::new(Notify::new()),
            pause: Duration::ZERO,
            gave_up: Arc::new(AtomicBool::new(false)),
        }
    }

    fn gave_up(&self) -> bool {
        self.gave_up.load(Ordering::SeqCst)
    }

    /// The body as a stream: `FIRST` bytes, then (once `go` is notified, within `BOUND`,
    /// and after `pause`) the rest in pieces of `PIECE`. When `go` never comes the stream
    /// fails, and says so in `gave_up`.
    fn body(self) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send {
        let pattern = pattern();
        futures_util::stream::unfold(0usize, move |sent| {
            let (held, pattern) = (self.clone(), pattern.clone());
            async move {
                if sent == held.total {
                    return None;
                }
                if sent == FIRST {
                    if tokio::time::timeout(BOUND, held.go.notified())
                        .await
                        .is_err()
                    {
                        held.gave_up.store(true, Ordering::SeqCst);
                        let err =
                            std::io::Error::other("the first piece never reached the other side");
                        return Some((Err(err), held.total));
                    }
                    tokio::time::sleep(held.pause).await;
                }
                let len = if sent == 0 {
                    FIRST
                } else {
                    PIECE.min(held.total - sent)
                };
                Some((Ok(pattern_piece(&pattern, sent, len)), sent + len))
            }
        })
    }
}

/// An app that answers `GET /large` with a 100 MiB body, the first 64 KiB of it alone,
/// the rest only once the test says the client has received those: a front door that
/// buffered the answer would never pass the first bytes on.
async fn large_answer_app(held: HeldBack) -> String {
    let router = axum::Router::new().fallback(move || {
        let held = held.clone();
        async move {
            Response::builder()
                .status(200)
                .header("content-type", "application/octet-stream")
                .body(Body::from_stream(held.body()))
                .unwrap()
        }
    });
    serve(router).await
}

async fn serve(router: axum::Router) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    format!("http://{addr}")
}

/// A 100 MiB answer streams through to the client, byte for byte, and is not buffered:
/// the app sends its first piece and holds the rest back until the client has that
/// piece.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mib_answer_streams_to_the_client_unbuffered() {
    let held = HeldBack::new(LARGE);
    let upstream = large_answer_app(held.clone()).await;
    let gatehouse = front(&upstream).await;
    let device = gatehouse.pair_device().await;

    let mut response = get_with(&gatehouse, "/large", &device.access_token).await;
    assert_eq!(response.status(), StatusCode::OK);
    request_id(&response);
    let pattern = pattern();
    let first = tokio::time::timeout(BOUND, response.chunk())
        .await
        .unwrap_or_else(|_| {
            panic!("no byte of the answer within {BOUND:?}: the front door holds it back")
        })
        .unwrap()
        .expect("the answer has a body");
    assert!(!first.is_empty() && first.len() <= FIRST, "{}", first.len());
    assert!(matches_pattern(&pattern, 0, &first));
    // Only now does the app send the rest.
    held.go.notify_one();
    let mut received = first.len();
    let started = Instant::now();
    loop {
        let chunk = tokio::time::timeout(BOUND, response.chunk())
            .await
            .unwrap_or_else(|_| panic!("the answer stalled at {received} bytes"))
            .unwrap_or_else(|err| panic!("the answer broke off at {received} bytes: {err}"));
        let Some(chunk) = chunk else { break };
        assert!(
            matches_pattern(&pattern, received, &chunk),
            "the bytes at {received} differ"
        );
        received += chunk.len();
        assert!(received <= LARGE, "more than was sent: {received}");
    }
    assert_eq!(received, LARGE);
    assert!(!held.gave_up());
    print_elapsed("100 MiB answer", started);
    gatehouse.stop().await;
}

/// What the upload app found in a request body.
#[derive(Debug, Default)]
struct Upload {
    bytes: usize,
    intact: bool,
}

/// An app that reads a request body piece by piece, says when its first bytes arrived
/// (`first_seen`), and answers with how many bytes it got and whether they were the
/// pattern.
async fn upload_app(first_seen: Arc<Notify>) -> String {
    let router = axum::Router::new().fallback(move |request: Request| {
        let first_seen = first_seen.clone();
        async move {
            let pattern = pattern();
            let mut body = request.into_body();
            let mut upload = Upload {
                intact: true,
                ..Upload::default()
            };
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else {
                    return Response::builder()
                        .status(400)
                        .body(Body::from("the body broke off"))
                        .unwrap();
                };
                if let Ok(data) = frame.into_data() {
                    if upload.bytes == 0 && !data.is_empty() {
                        first_seen.notify_one();
                    }
                    upload.intact &= upload.bytes + data.len() <= LARGE
                        && matches_pattern(&pattern, upload.bytes, &data);
                    upload.bytes += data.len();
                }
            }
            Response::builder()
                .status(200)
                .header("content-type", "application/json")
                .body(Body::from(
                    json!({"bytes": upload.bytes, "intact": upload.intact}).to_string(),
                ))
                .unwrap()
        }
    });
    serve(router).await
}

/// Uploads `held`'s body to `/upload` through `gatehouse` (HTTP/1.1 over TLS by hand,
/// hyper's client connection, so that the body is a stream the test controls): the
/// answer's status, whether it carried a request id, and its body.
async fn upload(gatehouse: &TestApp, token: &str, held: HeldBack) -> (StatusCode, bool, Bytes) {
    let tls = crate::ws::tls_stream(gatehouse).await;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(connection);
    let request = http::Request::post("/upload")
        .header(http::header::HOST, gatehouse.running.local_addr.to_string())
        .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
        .header(http::header::CONTENT_TYPE, "application/octet-stream")
        .header(http::header::CONTENT_LENGTH, held.total)
        .body(Body::from_stream(held.clone().body()))
        .unwrap();
    // The whole upload happens before the answer: bound it by the time each step may take.
    let response = tokio::time::timeout(BOUND * 4, sender.send_request(request))
        .await
        .expect("the upload ends in time");
    assert!(
        !held.gave_up(),
        "the app saw nothing of the body while the client held the rest back: the front \
         door buffers request bodies"
    );
    let response = response.unwrap();
    let status = response.status();
    let has_id = response.headers().contains_key("x-request-id");
    let body = tokio::time::timeout(BOUND, response.into_body().collect())
        .await
        .expect("the answer's body in time")
        .unwrap()
        .to_bytes();
    (status, has_id, body)
}

/// A 100 MiB request body streams through to the app, byte for byte, and is not
/// buffered: the client sends its first piece and holds the rest back until the app has
/// seen that piece.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mib_request_body_streams_to_the_app_unbuffered() {
    let held = HeldBack::new(LARGE);
    let upstream = upload_app(held.go.clone()).await;
    // The app answers once it has the whole body: with the default response timeout, as
    // the upload must not race a short one (see the test below).
    let gatehouse = front(&upstream).await;
    let device = gatehouse.pair_device().await;
    let started = Instant::now();
    let (status, has_id, body) = upload(&gatehouse, &device.access_token, held).await;
    assert_eq!(status, StatusCode::OK, "{body:?}");
    assert!(has_id, "the answer carries x-request-id");
    let got: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(got, json!({"bytes": LARGE, "intact": true}));
    print_elapsed("100 MiB request body", started);
    gatehouse.stop().await;
}

/// A client that uploads slowly (its body takes longer than `upstream.response_timeout`
/// to arrive, while the app reads every byte as it comes) gets the app's answer: the
/// response timeout runs from the request's last byte, so a long upload to a healthy app
/// (100 MB over a 10 Mbit/s link) is no `gateway_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upload_is_not_cut_by_the_response_timeout() {
    let mut held = HeldBack::new(FIRST + PIECE);
    held.pause = RESPONSE_TIMEOUT * 3;
    let upstream = upload_app(held.go.clone()).await;
    let gatehouse = impatient_front(&upstream).await;
    let device = gatehouse.pair_device().await;
    let (status, has_id, body) = upload(&gatehouse, &device.access_token, held).await;
    assert!(has_id, "the answer carries x-request-id");
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let got: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(got, json!({"bytes": FIRST + PIECE, "intact": true}));
    gatehouse.stop().await;
}

/// How long a large transfer took, in the test's output (`--nocapture`), to see how far
/// the bounds are from the real durations.
fn print_elapsed(what: &str, started: Instant) {
    println!("{what}: {:?}", started.elapsed());
}

/// `server.idle_timeout` in the tests of an answer that stalls mid-body.
const IDLE_TIMEOUT: Duration = Duration::from_secs(2);

/// gatehouse in front of an app that stalls mid-body, with a short `server.idle_timeout`.
async fn front_of_a_stalling_app() -> (TestApp, mpsc::UnboundedReceiver<AppEvent>) {
    let (upstream, events) = raw_app(Misbehaviour::StallMidBody).await;
    let gatehouse = helpers::spawn_app_with(&[
        ("GATEHOUSE_UPSTREAM", upstream.as_str()),
        ("GATEHOUSE_IDLE_TIMEOUT", "2s"),
        ("GATEHOUSE_UPSTREAM_IDLE_TIMEOUT", "2s"),
    ])
    .await;
    (gatehouse, events)
}

/// Reads the body of an answer the app stopped sending, within `BOUND`: the bytes that
/// came, and how the read ended (`Ok` when the body looked complete).
async fn read_stalled_body(mut response: reqwest::Response) -> (usize, Result<(), String>) {
    let mut received = 0;
    let ended = tokio::time::timeout(BOUND, async {
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => received += chunk.len(),
                Ok(None) => return Ok(()),
                Err(err) => return Err(err.to_string()),
            }
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "the body read still hangs after {BOUND:?}, {received} of {STALLED_LENGTH} \
             bytes in"
        )
    });
    (received, ended)
}

/// An app that sends its answer's head and a part of the body, then stalls with the
/// connection open: `upstream.response_timeout` covers only the head, but the answer is
/// cut after `upstream.idle_timeout` without a byte (and the client's connection, on
/// which nothing moves any more, after `server.idle_timeout`), so the client's body read
/// ends with an error instead of hanging, and gatehouse lets go of the app's connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_that_stalls_mid_body_is_cut_by_the_idle_timeout() {
    let (gatehouse, mut events) = front_of_a_stalling_app().await;
    let device = gatehouse.pair_device().await;
    let started = Instant::now();
    let response = get_with(&gatehouse, "/stall-mid-body", &device.access_token).await;
    assert_eq!(response.status(), StatusCode::OK);
    request_id(&response);
    assert_eq!(
        next_event(&mut events, "the request").await,
        AppEvent::Request("GET /stall-mid-body HTTP/1.1".into())
    );
    let (received, ended) = read_stalled_body(response).await;
    assert!(
        ended.is_err(),
        "an answer the app never finished must not look complete"
    );
    assert_eq!(received, STALLED_SENT, "what the app sent came through");
    assert!(
        started.elapsed() >= IDLE_TIMEOUT,
        "cut after {:?}, before server.idle_timeout",
        started.elapsed()
    );
    assert_eq!(
        next_event(&mut events, "the stalled connection's close").await,
        AppEvent::Closed,
        "gatehouse lets go of the app's connection"
    );
    gatehouse.stop().await;
}

/// A client that trusts only `gatehouse`'s certificate and speaks HTTP/2 only (ALPN h2),
/// so that its requests share one connection.
fn http2_client(gatehouse: &TestApp) -> reqwest::Client {
    gatehouse::tls::install_default_provider();
    let cert = gatehouse.running.tls.as_ref().unwrap().cert_der().clone();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(cert.to_vec()))
        .unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(gatehouse::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .http2_prior_knowledge()
        .build()
        .unwrap()
}

/// The same stalled answer on an HTTP/2 connection that carries other requests: other
/// streams keep the connection active, so `server.idle_timeout` never fires, but the
/// stalled stream is cut all the same after `upstream.idle_timeout` without a byte from
/// the app, and the connection to the app is let go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_that_stalls_mid_body_is_cut_on_a_busy_http2_connection() {
    let (gatehouse, mut events) = front_of_a_stalling_app().await;
    let device = gatehouse.pair_device().await;
    let client = http2_client(&gatehouse);
    let response = tokio::time::timeout(
        BOUND,
        client
            .get(gatehouse.url("/stall-mid-body"))
            .bearer_auth(&device.access_token)
            .send(),
    )
    .await
    .expect("the answer head in time")
    .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.version(), http::Version::HTTP_2);
    request_id(&response);
    assert_eq!(
        next_event(&mut events, "the request").await,
        AppEvent::Request("GET /stall-mid-body HTTP/1.1".into())
    );
    // Other requests on the same connection, more often than the idle timeout.
    let busy = {
        let (client, url) = (client.clone(), gatehouse.url("/healthz"));
        tokio::spawn(async move {
            loop {
                let answered = client.get(&url).send().await;
                assert_eq!(answered.unwrap().version(), http::Version::HTTP_2);
                tokio::time::sleep(IDLE_TIMEOUT / 4).await;
            }
        })
    };
    let (received, ended) = read_stalled_body(response).await;
    busy.abort();
    assert!(
        ended.is_err(),
        "an answer the app never finished must not look complete"
    );
    assert_eq!(received, STALLED_SENT, "what the app sent came through");
    assert_eq!(
        next_event(&mut events, "the stalled connection's close").await,
        AppEvent::Closed,
        "gatehouse lets go of the app's connection"
    );
    gatehouse.stop().await;
}

/// A WebSocket app that sends 64 KiB binary messages as fast as it can until its socket
/// fails; it says how many it sent when it stops.
async fn flooding_ws_app(stopped: mpsc::UnboundedSender<usize>) -> String {
    use axum::extract::ws::{Message, WebSocketUpgrade};
    let router = axum::Router::new().fallback(move |upgrade: WebSocketUpgrade| {
        let stopped = stopped.clone();
        async move {
            upgrade.on_upgrade(move |mut socket| async move {
                let message = Bytes::from(vec![7u8; 64 * 1024]);
                let mut sent = 0;
                while socket.send(Message::Binary(message.clone())).await.is_ok() {
                    sent += 1;
                }
                let _ = stopped.send(sent);
            })
        }
    });
    serve(router).await
}

/// A relayed WebSocket whose client stops reading while the app keeps sending: the
/// relay gives the client up (a frame not taken within the relay's send timeout), ends,
/// lets go of the app's socket, and writes `front.socket_closed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_whose_client_stops_reading_ends() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::http::HeaderValue;

    let (stopped, mut app_stopped) = mpsc::unbounded_channel();
    let upstream = flooding_ws_app(stopped).await;
    let gatehouse = front(&upstream).await;
    let device = gatehouse.pair_device().await;
    let mut request = format!("wss://{}/flood", gatehouse.running.local_addr)
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {}", device.access_token)).unwrap(),
    );
    let tls = crate::ws::tls_stream(&gatehouse).await;
    let started = Instant::now();
    // The client never reads from this socket again.
    let (_socket, response) =
        tokio::time::timeout(BOUND, tokio_tungstenite::client_async(request, tls))
            .await
            .expect("the WebSocket opens in time")
            .unwrap();
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);

    // The relay's give-up is the send timeout (once the buffers between the relay and
    // the client are full); the stuck client gets no close frame to wait for a second
    // time, so the relay ends well before two send timeouts.
    let limit = SEND_TIMEOUT + Duration::from_secs(8);
    let closed = loop {
        let records = gatehouse.audit_events("front.socket_closed");
        if !records.is_empty() {
            break records;
        }
        assert!(
            started.elapsed() < limit,
            "the relay still runs after {:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let ended_after = started.elapsed();
    assert!(
        ended_after >= SEND_TIMEOUT,
        "ended after {ended_after:?}: sooner than a stuck client can explain"
    );
    assert_eq!(closed.len(), 1);
    assert_eq!(closed[0].details["reason"], "client_closed", "{closed:?}");
    assert_eq!(closed[0].device.as_deref(), Some(device.device_id.as_str()));
    assert_eq!(closed[0].details["path"], "/flood");
    assert_eq!(gatehouse.audit_events("front.socket_opened").len(), 1);
    // The app's socket was let go too: its sending fails.
    let sent = tokio::time::timeout(BOUND, app_stopped.recv())
        .await
        .expect("the app's socket is closed once the relay ends")
        .unwrap();
    assert!(sent > 0, "the app sent nothing");
    println!("relay ended after {ended_after:?}; the app sent {sent} messages of 64 KiB");
    gatehouse.stop().await;
}
