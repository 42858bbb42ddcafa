//! The HTTPS listener seen from outside, in-process (`helpers::spawn_app_with`): the error
//! body, the body limit, readiness, and the connection-level defences of `http/serve.rs`
//! (handshake, header-read and idle timeouts, header caps, the connection cap), ALPN and
//! graceful stop. Raw connections are real TCP + rustls (tokio-rustls), so a test can
//! misbehave exactly as a hostile client would.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::helpers::{self, TestApp};

/// How long any single wait for the server may take before the test fails.
const BOUND: Duration = Duration::from_secs(5);

fn cert_of(app: &TestApp) -> Vec<u8> {
    app.running
        .tls
        .as_ref()
        .expect("TLS is on")
        .cert_der()
        .clone()
}

/// A rustls client configuration whose only trust anchor is the app's certificate.
fn tls_config(app: &TestApp, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    gatehouse::tls::install_default_provider();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(cert_of(app)))
        .unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(gatehouse::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// A TLS connection to the app, handshake completed.
async fn tls_connect(app: &TestApp, alpn: &[&[u8]]) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(app.running.local_addr).await.unwrap();
    let name = rustls::pki_types::ServerName::from(app.running.local_addr.ip());
    tokio::time::timeout(
        BOUND,
        TlsConnector::from(tls_config(app, alpn)).connect(name, tcp),
    )
    .await
    .expect("handshake in time")
    .expect("handshake succeeds")
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// One HTTP/1.1 response: status, head text, body.
#[derive(Debug)]
struct RawResponse {
    status: u16,
    head: String,
    body: Vec<u8>,
}

/// Reads one HTTP/1.1 response (Content-Length bodies only); `None` if the server closed
/// the connection (or failed it) before a whole response arrived.
async fn read_response<S: AsyncRead + Unpin>(stream: &mut S) -> Option<RawResponse> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            break end;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let status = head.split(' ').nth(1)?.parse().ok()?;
    let length = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    let start = end + 4;
    while buf.len() < start + length {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    Some(RawResponse {
        status,
        head,
        body: buf[start..start + length].to_vec(),
    })
}

async fn send<S: AsyncWrite + Unpin>(stream: &mut S, text: &str) {
    stream.write_all(text.as_bytes()).await.unwrap();
    stream.flush().await.unwrap();
}

/// Reads (and keeps) whatever arrives until the server closes the connection: EOF or an
/// error. Returns how long that took, or `None` if it was still open after `limit`.
async fn closed_within<S: AsyncRead + Unpin>(
    stream: &mut S,
    limit: Duration,
) -> (Option<Duration>, Vec<u8>) {
    let start = Instant::now();
    let mut received = Vec::new();
    let mut chunk = [0u8; 4096];
    let outcome = tokio::time::timeout(limit, async {
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    (outcome.ok().map(|()| start.elapsed()), received)
}

const HEALTHZ: &str = "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";

/// Asserts a JSON error body whose request id is the `x-request-id` header.
async fn assert_error_body(response: reqwest::Response, status: u16, code: &str) {
    assert_eq!(response.status(), status);
    assert_eq!(response.headers()["content-type"], "application/json");
    assert_eq!(response.headers()["x-content-type-options"], "nosniff");
    let header_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    let body: serde_json::Value = response.json().await.unwrap();
    let object = body.as_object().expect("a JSON object");
    let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["error", "message", "request_id"], "{body}");
    assert_eq!(body["error"], code, "{body}");
    assert!(
        !body["message"].as_str().unwrap_or_default().is_empty(),
        "{body}"
    );
    assert_eq!(body["request_id"], header_id.as_str(), "{body}");
    assert_eq!(header_id.len(), 24, "{header_id}");
}

// ---------------------------------------------------------------------------------------
// Responses

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_json_with_the_request_id_of_the_response() {
    let app = helpers::spawn_app().await;
    let client = app.client();
    let response = client
        .get(format!("{}/no/such/thing", app.base_url))
        .send()
        .await
        .unwrap();
    assert_error_body(response, 404, "not_found").await;

    let response = client
        .post(format!("{}/healthz", app.base_url))
        .send()
        .await
        .unwrap();
    assert_error_body(response, 405, "method_not_allowed").await;

    let response = client
        .delete(format!("{}/readyz", app.base_url))
        .send()
        .await
        .unwrap();
    assert_error_body(response, 405, "method_not_allowed").await;
    app.stop().await;
}

/// The value of header `name` in a raw response head.
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then_some(v.trim())
    })
}

/// The raw-response version of `assert_error_body`.
fn assert_raw_error(response: &RawResponse, status: u16, code: &str) {
    assert_eq!(response.status, status, "{}", response.head);
    assert_eq!(
        header(&response.head, "content-type"),
        Some("application/json")
    );
    let body: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
    assert_eq!(body["error"], code, "{body}");
    assert_eq!(
        Some(body["request_id"].as_str().unwrap_or_default()),
        header(&response.head, "x-request-id"),
        "{body}"
    );
    assert_eq!(body.as_object().map(|o| o.len()), Some(3), "{body}");
}

/// Sends a request head announcing `length` body bytes, then `body`, on a new connection.
async fn post_raw(app: &TestApp, path: &str, length: usize, body: &[u8]) -> RawResponse {
    let mut conn = tls_connect(app, &[b"http/1.1"]).await;
    send(
        &mut conn,
        &format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n"),
    )
    .await;
    // The server may answer and close before it reads all of the body.
    let _ = conn.write_all(body).await;
    let _ = conn.flush().await;
    tokio::time::timeout(BOUND, read_response(&mut conn))
        .await
        .expect("answered in time")
        .expect("answered before closing")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_limit_is_413_json() {
    let app = helpers::spawn_app().await;
    // Refused on the announced length alone, before any body byte is read.
    for path in ["/healthz", "/no/such/thing"] {
        let response = post_raw(&app, path, 70_000, b"").await;
        assert_raw_error(&response, 413, "payload_too_large");
    }
    // At the limit the same request reaches routing (405: /healthz is GET only).
    let response = post_raw(&app, "/healthz", 65_536, &[b'a'; 65_536]).await;
    assert_raw_error(&response, 405, "method_not_allowed");

    // Over HTTP/2, with the body actually sent.
    let config = Arc::unwrap_or_clone(tls_config(&app, &[b"h2"]));
    let client = reqwest::Client::builder()
        .tls_backend_preconfigured(config)
        .no_proxy()
        .build()
        .unwrap();
    let response = client
        .post(format!("{}/healthz", app.base_url))
        .body(vec![b'a'; 70_000])
        .send()
        .await
        .unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_error_body(response, 413, "payload_too_large").await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lower_configured_body_limit_applies() {
    let app = helpers::spawn_app_with(&[("GATEHOUSE_MAX_BODY_BYTES", "2048")]).await;
    let response = post_raw(&app, "/healthz", 2049, &[b'a'; 2049]).await;
    assert_raw_error(&response, 413, "payload_too_large");
    let response = post_raw(&app, "/healthz", 2048, &[b'a'; 2048]).await;
    assert_raw_error(&response, 405, "method_not_allowed");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_ready_json() {
    let app = helpers::spawn_app().await;
    let response = app
        .client()
        .get(format!("{}/readyz", app.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["status"], "ready", "{body}");
    assert_eq!(body["tls"], "self-signed", "{body}");
    assert_eq!(
        body["format_version"],
        app.running.store.info().format_version,
        "{body}"
    );
    app.stop().await;
}

// ---------------------------------------------------------------------------------------
// Connection-level defences

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_headers_are_cut_off_after_the_header_read_timeout() {
    let app = helpers::spawn_app_with(&[("GATEHOUSE_HEADER_READ_TIMEOUT", "1s")]).await;
    // Control: the same request, finished, is answered on a connection opened as early.
    let mut control = tls_connect(&app, &[b"http/1.1"]).await;
    let mut slow = tls_connect(&app, &[b"http/1.1"]).await;
    send(&mut slow, "GET /healthz HTTP/1.1\r\nHost: x\r\n").await;
    send(&mut control, HEALTHZ).await;
    let answered = tokio::time::timeout(BOUND, read_response(&mut control))
        .await
        .expect("control answered in time")
        .expect("control answered");
    assert_eq!(answered.status, 200);

    assert_half_request_cut(&mut slow).await;
    app.stop().await;
}

/// Asserts that the server closes `conn`, which has sent half a request head, within
/// `BOUND` but not before half a second (a 1 s header-read timeout), and unanswered.
async fn assert_half_request_cut<S: AsyncRead + Unpin>(conn: &mut S) {
    let (closed, received) = closed_within(conn, BOUND).await;
    let elapsed = closed.expect("a half-sent request held its connection for 5 s");
    assert!(
        elapsed >= Duration::from_millis(500),
        "closed after {elapsed:?}: too early for a 1 s header-read timeout"
    );
    let text = String::from_utf8_lossy(&received);
    assert!(
        !text.contains(" 200 "),
        "a half request was answered: {text}"
    );
}

/// How a test connection gets to the state in which it then stays silent.
enum Opening {
    /// A TCP connection that sends these bytes (maybe none) and no TLS handshake.
    Tcp(&'static [u8]),
    /// A completed TLS handshake (ALPN http/1.1), then nothing.
    Tls,
}

/// Starts a server with the timeout `setting` at 1 s, opens a connection as `opening`
/// says, and asserts that the server closes it: within `BOUND`, and not before half a
/// second. Returns what the server sent before closing.
async fn assert_silent_connection_closed(setting: &str, opening: Opening) -> Vec<u8> {
    let app = helpers::spawn_app_with(&[(setting, "1s")]).await;
    let (closed, received) = match opening {
        Opening::Tcp(bytes) => {
            let mut tcp = TcpStream::connect(app.running.local_addr).await.unwrap();
            tcp.write_all(bytes).await.unwrap();
            closed_within(&mut tcp, BOUND).await
        }
        Opening::Tls => {
            let mut conn = tls_connect(&app, &[b"http/1.1"]).await;
            closed_within(&mut conn, BOUND).await
        }
    };
    let elapsed = closed.unwrap_or_else(|| panic!("still open after {BOUND:?} ({setting} 1 s)"));
    assert!(
        elapsed >= Duration::from_millis(500),
        "closed after {elapsed:?}: too early for {setting} 1 s"
    );
    app.stop().await;
    received
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_starts_tls_is_closed_after_the_handshake_timeout() {
    let received =
        assert_silent_connection_closed("GATEHOUSE_TLS_HANDSHAKE_TIMEOUT", Opening::Tcp(b"")).await;
    assert!(received.is_empty(), "{received:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_sent_tls_handshake_is_closed_after_the_handshake_timeout() {
    // The first five bytes of a TLS record header (handshake, TLS 1.0, 512 bytes), then
    // nothing: the server waits for the rest of the ClientHello.
    let header = Opening::Tcp(&[0x16, 0x03, 0x01, 0x02, 0x00]);
    assert_silent_connection_closed("GATEHOUSE_TLS_HANDSHAKE_TIMEOUT", header).await;
}

/// The wait for a kept-alive connection's next request is the idle timeout's, not the
/// header-read timeout's: a client may come back after longer than the latter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_kept_alive_connection_outlives_the_header_read_timeout() {
    let app = helpers::spawn_app_with(&[
        ("GATEHOUSE_HEADER_READ_TIMEOUT", "1s"),
        ("GATEHOUSE_IDLE_TIMEOUT", "4s"),
    ])
    .await;
    let mut conn = tls_connect(&app, &[b"http/1.1"]).await;
    for round in 0..2 {
        send(&mut conn, HEALTHZ).await;
        let answer = tokio::time::timeout(BOUND, read_response(&mut conn))
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("request {round} not answered"));
        assert_eq!(answer.status, 200);
        assert!(
            !answer
                .head
                .to_ascii_lowercase()
                .contains("connection: close"),
            "{}",
            answer.head
        );
        // Twice the header-read timeout without a byte.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    // Then the idle timeout closes it: 4 s of silence, 2 s of which have passed.
    let (closed, _) = closed_within(&mut conn, BOUND).await;
    let elapsed = closed.expect("an idle connection was still open after the idle timeout");
    assert!(elapsed >= Duration::from_millis(1500), "{elapsed:?}");
    app.stop().await;
}

/// The next request on a kept-alive connection gets the same header-read timeout as the
/// first, counted from its first byte: a slow head is cut, however long the wait before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_sent_second_request_is_cut_off_after_the_header_read_timeout() {
    let app = helpers::spawn_app_with(&[("GATEHOUSE_HEADER_READ_TIMEOUT", "1s")]).await;
    let mut conn = tls_connect(&app, &[b"http/1.1"]).await;
    send(&mut conn, HEALTHZ).await;
    let first = tokio::time::timeout(BOUND, read_response(&mut conn))
        .await
        .unwrap()
        .expect("answered");
    assert_eq!(first.status, 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    send(&mut conn, "GET /healthz HTTP/1.1\r\nHost: x\r\n").await;
    assert_half_request_cut(&mut conn).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_kept_alive_connection_is_closed_by_the_idle_timeout() {
    // Header-read timeout at its 10 s default: only the idle timeout can close it in 5 s.
    let app = helpers::spawn_app_with(&[("GATEHOUSE_IDLE_TIMEOUT", "1s")]).await;
    let mut conn = tls_connect(&app, &[b"http/1.1"]).await;
    send(&mut conn, HEALTHZ).await;
    let first = tokio::time::timeout(BOUND, read_response(&mut conn))
        .await
        .unwrap()
        .expect("answered");
    assert_eq!(first.status, 200);
    // A second request on the same connection still works before the timeout.
    send(&mut conn, HEALTHZ).await;
    let second = tokio::time::timeout(BOUND, read_response(&mut conn))
        .await
        .unwrap()
        .expect("answered on the kept-alive connection");
    assert_eq!(second.status, 200);
    let (closed, _) = closed_within(&mut conn, BOUND).await;
    let elapsed = closed.expect("an idle connection was still open after 5 s");
    assert!(elapsed >= Duration::from_millis(500), "{elapsed:?}");
    app.stop().await;
}

/// A gauge of `/metrics`, read over a connection of its own that closes (so that it is
/// never counted as resting itself).
async fn gauge(app: &TestApp, name: &str) -> f64 {
    let mut conn = tls_connect(app, &[b"http/1.1"]).await;
    send(
        &mut conn,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    let answer = read_response(&mut conn).await.expect("metrics answered");
    assert_eq!(answer.status, 200);
    let text = String::from_utf8(answer.body).unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

/// Waits (at most 5 s) until the gauge `name` reads `value`.
async fn gauge_reaches(app: &TestApp, name: &str, value: f64) {
    let start = Instant::now();
    loop {
        let now = gauge(app, name).await;
        if now == value {
            return;
        }
        assert!(
            start.elapsed() < BOUND,
            "{name} still {now} after {BOUND:?}, not {value}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A kept-alive connection that waits for its next request rests (hyper's state is
/// dropped, the TLS stream kept) and answers its next requests as before: one, then two
/// pipelined in one write. A server that stops closes a resting connection at once, and
/// one that has sent nothing yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resting_connection_answers_its_next_requests() {
    const RESTING: &str = "gatehouse_http_connections_resting";
    let app = helpers::spawn_app().await;
    let mut conn = tls_connect(&app, &[b"http/1.1"]).await;
    send(&mut conn, HEALTHZ).await;
    assert_eq!(
        read_response(&mut conn).await.expect("answered").status,
        200
    );
    gauge_reaches(&app, RESTING, 1.0).await;
    // The metrics connection itself is open while it asks.
    assert_eq!(gauge(&app, "gatehouse_http_connections_open").await, 2.0);

    send(&mut conn, HEALTHZ).await;
    let again = read_response(&mut conn)
        .await
        .expect("answered after resting");
    assert_eq!(again.status, 200);
    assert!(
        !again
            .head
            .to_ascii_lowercase()
            .contains("connection: close"),
        "{}",
        again.head
    );
    assert_eq!(gauge(&app, RESTING).await, 0.0, "busy again, not resting");

    gauge_reaches(&app, RESTING, 1.0).await;
    send(
        &mut conn,
        "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    let (closed, received) = closed_within(&mut conn, BOUND).await;
    closed.expect("the connection stayed open after Connection: close");
    let text = String::from_utf8_lossy(&received);
    assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 2, "{text}");

    // Stopping does not wait the grace period (10 s) for a resting connection.
    let mut conn = tls_connect(&app, &[b"http/1.1"]).await;
    send(&mut conn, HEALTHZ).await;
    assert_eq!(
        read_response(&mut conn).await.expect("answered").status,
        200
    );
    gauge_reaches(&app, RESTING, 1.0).await;
    // Nor for one that has not sent its first request yet.
    let mut silent = tls_connect(&app, &[b"http/1.1"]).await;
    let started = Instant::now();
    app.stop().await;
    assert!(
        started.elapsed() < BOUND,
        "stop took {:?}",
        started.elapsed()
    );
    let (closed, _) = closed_within(&mut conn, BOUND).await;
    closed.expect("a resting connection outlived the server");
    let (closed, _) = closed_within(&mut silent, BOUND).await;
    closed.expect("a silent connection outlived the server");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_tls_connection_is_closed_by_the_idle_timeout() {
    assert_silent_connection_closed("GATEHOUSE_IDLE_TIMEOUT", Opening::Tls).await;
}

/// hyper-util's `auto` builder first reads up to 24 bytes to tell HTTP/1 from the HTTP/2
/// preface, with no timer, and hyper's header-read timeout starts only after that; the
/// server bounds that first wait itself, so a client that completes the TLS handshake
/// and then sends nothing is closed after the header-read timeout, not the idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_tls_connection_is_closed_by_the_header_read_timeout() {
    assert_silent_connection_closed("GATEHOUSE_HEADER_READ_TIMEOUT", Opening::Tls).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_headers_are_refused() {
    let app = helpers::spawn_app_with(&[("GATEHOUSE_MAX_HEADERS", "16")]).await;
    let request = |count: usize| {
        let mut text = String::from("GET /healthz HTTP/1.1\r\nHost: x\r\n");
        for i in 0..count {
            text.push_str(&format!("x-filler-{i}: {i}\r\n"));
        }
        text.push_str("\r\n");
        text
    };
    // Control: 1 + 10 headers fit.
    let mut conn = tls_connect(&app, &[b"http/1.1"]).await;
    send(&mut conn, &request(10)).await;
    let fine = tokio::time::timeout(BOUND, read_response(&mut conn))
        .await
        .unwrap()
        .expect("answered");
    assert_eq!(fine.status, 200);

    let mut conn = tls_connect(&app, &[b"http/1.1"]).await;
    send(&mut conn, &request(30)).await;
    let (closed, received) = closed_within(&mut conn, BOUND).await;
    closed.expect("the connection stayed open after too many headers");
    let text = String::from_utf8_lossy(&received);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 431"),
        "expected 431 or a closed connection, got: {text}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_are_refused() {
    let app = helpers::spawn_app_with(&[("GATEHOUSE_MAX_HEADER_BYTES", "1024")]).await;
    let mut conn = tls_connect(&app, &[b"http/1.1"]).await;
    // hyper's buffer is at least 8 KiB; 32 KiB of one header exceeds any setting here.
    let big = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(32 * 1024)
    );
    // The server may close while we are still writing.
    let _ = conn.write_all(big.as_bytes()).await;
    let _ = conn.flush().await;
    let (closed, received) = closed_within(&mut conn, BOUND).await;
    closed.expect("the connection stayed open after oversized headers");
    let text = String::from_utf8_lossy(&received);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 431"),
        "expected 431 or a closed connection, got: {text}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_cap_holds_new_connections_until_a_slot_frees() {
    let app = helpers::spawn_app_with(&[("GATEHOUSE_MAX_CONNECTIONS", "2")]).await;
    // Two connections hold both slots (their handshakes completed, so both were accepted).
    let first = tls_connect(&app, &[b"http/1.1"]).await;
    let mut second = tls_connect(&app, &[b"http/1.1"]).await;
    let client = app.client();
    let url = format!("{}/healthz", app.base_url);
    let mut third = tokio::spawn(async move { client.get(url).send().await.map(|r| r.status()) });
    let waited = tokio::time::timeout(Duration::from_secs(1), &mut third).await;
    assert!(
        waited.is_err(),
        "a third connection was served while two held the cap: {waited:?}"
    );
    // The second connection still works: the cap does not starve connections it admitted.
    send(&mut second, HEALTHZ).await;
    let answered = tokio::time::timeout(BOUND, read_response(&mut second))
        .await
        .unwrap()
        .expect("an admitted connection is served");
    assert_eq!(answered.status, 200);

    drop(first);
    let status = tokio::time::timeout(BOUND, third)
        .await
        .expect("the third request completes once a slot frees")
        .unwrap()
        .expect("the third request succeeds");
    assert_eq!(status, 200);
    drop(second);
    app.stop().await;
}

// ---------------------------------------------------------------------------------------
// Protocols

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_negotiates_http2_and_http1_still_works() {
    let app = helpers::spawn_app().await;
    let url = format!("{}/healthz", app.base_url);
    let client = |alpn: &[&[u8]]| {
        let config = Arc::unwrap_or_clone(tls_config(&app, alpn));
        reqwest::Client::builder()
            .tls_backend_preconfigured(config)
            .no_proxy()
            .build()
            .unwrap()
    };
    let h2 = client(&[b"h2", b"http/1.1"])
        .get(&url)
        .send()
        .await
        .unwrap();
    assert_eq!(h2.version(), reqwest::Version::HTTP_2);
    assert_eq!(h2.status(), 200);
    assert_eq!(
        h2.headers()["strict-transport-security"],
        "max-age=63072000; includeSubDomains"
    );
    assert_eq!(
        h2.json::<serde_json::Value>().await.unwrap(),
        serde_json::json!({"status": "ok"})
    );

    let h1 = client(&[b"http/1.1"]).get(&url).send().await.unwrap();
    assert_eq!(h1.version(), reqwest::Version::HTTP_11);
    assert_eq!(h1.status(), 200);

    // The server's preference wins: a client listing http/1.1 first still gets h2.
    let conn = tls_connect(&app, &[b"http/1.1", b"h2"]).await;
    assert_eq!(conn.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    drop(conn);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_request_that_is_no_upgrade_is_a_400_whatever_the_protocol() {
    // `/v1/ws` takes GET: a GET without the upgrade headers, a GET over HTTP/2 (no
    // extended CONNECT is offered) and a HEAD are all requests that cannot upgrade, and
    // answer the same documented 400, never a 405 without `Allow`.
    let app = helpers::spawn_app().await;
    let url = format!("{}/v1/ws", app.base_url);
    let client = |alpn: &[&[u8]]| {
        let config = Arc::unwrap_or_clone(tls_config(&app, alpn));
        reqwest::Client::builder()
            .tls_backend_preconfigured(config)
            .no_proxy()
            .build()
            .unwrap()
    };
    let h2 = client(&[b"h2"]).get(&url).send().await.unwrap();
    assert_eq!(h2.version(), reqwest::Version::HTTP_2);
    assert_error_body(h2, 400, "invalid_request").await;
    let h1 = client(&[b"http/1.1"]);
    let get = h1.get(&url).send().await.unwrap();
    assert_eq!(get.version(), reqwest::Version::HTTP_11);
    assert_error_body(get, 400, "invalid_request").await;
    let head = h1.head(&url).send().await.unwrap();
    assert_eq!(head.status(), 400);
    assert_eq!(head.headers()["content-type"], "application/json");
    assert!(head.headers().get("allow").is_none());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_on_the_tls_port_gets_no_answer() {
    let app = helpers::spawn_app_with(&[("GATEHOUSE_TLS_HANDSHAKE_TIMEOUT", "1s")]).await;
    let mut tcp = TcpStream::connect(app.running.local_addr).await.unwrap();
    send(&mut tcp, HEALTHZ).await;
    let (closed, received) = closed_within(&mut tcp, BOUND).await;
    closed.expect("closed");
    let text = String::from_utf8_lossy(&received);
    assert!(!text.contains("200"), "plain HTTP was served: {text}");
    app.stop().await;
}

// ---------------------------------------------------------------------------------------
// Graceful stop
//
// No route holds a request open (no handler reads a body or waits), so "a request in
// flight when stop() is called finishes" cannot be staged without a slow endpoint; these
// tests cover what can be: idle connections are closed at once, not after the grace
// period, and nothing is accepted afterwards.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_closes_idle_connections_promptly_and_stops_accepting() {
    let app = helpers::spawn_app().await; // shutdown_grace 10 s, idle timeout 120 s
    let addr = app.running.local_addr;
    let mut conn = tls_connect(&app, &[b"http/1.1"]).await;
    send(&mut conn, HEALTHZ).await;
    let answered = tokio::time::timeout(BOUND, read_response(&mut conn))
        .await
        .unwrap()
        .expect("answered");
    assert_eq!(answered.status, 200);
    assert_eq!(answered.body, br#"{"status":"ok"}"#);

    let started = Instant::now();
    let dir = tokio::time::timeout(BOUND, app.stop())
        .await
        .expect("stop() waited for an idle connection instead of closing it");
    assert!(started.elapsed() < BOUND);
    let (closed, _) = closed_within(&mut conn, BOUND).await;
    closed.expect("the idle connection survived stop()");
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "the listener still accepts after stop()"
    );
    // The data file was released: it opens again.
    let again = helpers::spawn_app_in(dir, &[]).await;
    assert!(again.running.bootstrap_token.is_none());
    again.stop().await;
}

/// Every JSON body is an object: an array that serde could map onto the same fields is
/// refused, not taken as positional fields.
#[tokio::test]
async fn a_json_array_in_place_of_an_object_is_refused() {
    let app = crate::helpers::spawn_app().await;
    for (path, body) in [
        ("/v1/pairing/sessions", r#"["phone", 300]"#),
        (
            "/v1/pair",
            r#"["ps_00000000000000000000000000000000", "x", {}]"#,
        ),
    ] {
        let response = app
            .client()
            .post(app.url(path))
            .bearer_auth(app.admin_token())
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{path}");
        let error: serde_json::Value = response.json().await.unwrap();
        assert_eq!(error["error"], "invalid_request", "{path}");
    }
    app.stop().await;
}

#[tokio::test]
async fn responses_are_counted_by_class_and_timed_in_metrics() {
    let app = helpers::spawn_app().await;
    let client = app.client();
    for (path, status) in [
        ("/healthz", 200),
        ("/healthz", 200),
        ("/v1/devices", 401),
        ("/no/such/path", 404),
    ] {
        let response = client.get(app.url(path)).send().await.unwrap();
        assert_eq!(response.status(), status, "{path}");
    }
    let text = app.metrics().await;
    // The scrape itself is counted once its answer is out, so not in this text.
    for line in [
        "gatehouse_http_responses_total{class=\"2xx\"} 2",
        "gatehouse_http_responses_total{class=\"4xx\"} 2",
        "gatehouse_http_responses_total{class=\"5xx\"} 0",
        "gatehouse_http_request_duration_seconds_bucket{le=\"+Inf\"} 4",
        "gatehouse_http_request_duration_seconds_count 4",
        "# TYPE gatehouse_http_request_duration_seconds histogram",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "{line} missing from:\n{text}"
        );
    }
    // Buckets are cumulative: never fewer requests under a higher bound.
    let buckets: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with("gatehouse_http_request_duration_seconds_bucket"))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(buckets.len(), 13);
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{buckets:?}");
    app.stop().await;
}

/// The router refuses a request that carries no peer address (the ban check and the
/// per-address limit need it) instead of letting it skip them.
#[tokio::test]
async fn a_request_without_a_peer_address_is_refused_not_waved_through() {
    use tower::ServiceExt;
    let app = helpers::spawn_app().await;
    let state = gatehouse::http::AppState::new(
        app.running.services.clone(),
        gatehouse::config::TlsMode::SelfSigned,
    );
    let router = gatehouse::http::router(state, &app.config.server, &app.config.cors);
    let request = http::Request::get("/healthz")
        .body(axum::body::Body::empty())
        .unwrap();
    let response = router.oneshot(request).await.unwrap();
    assert_eq!(response.status(), 500);
    let body = axum::body::to_bytes(response.into_body(), 4096)
        .await
        .unwrap();
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["error"], "internal_error");
    app.stop().await;
}

/// A JSON body with a member named twice is a 400, wherever JSON is read: the key rotation
/// `{"now": false, "now": true}` rotates nothing, a pairing claim claims nothing.
#[tokio::test]
async fn a_json_body_with_a_member_named_twice_is_refused() {
    let app = helpers::spawn_app().await;
    let client = app.client();
    let keys_before = app.running.services.keys.list();
    let response = client
        .post(app.url("/v1/keys/rotate"))
        .bearer_auth(app.admin_token())
        .header("content-type", "application/json")
        .body(r#"{"now": false, "now": true}"#)
        .send()
        .await
        .unwrap();
    assert_error_body(response, 400, "invalid_request").await;
    assert_eq!(app.running.services.keys.list(), keys_before);

    let (session, secret) = app.open_pairing_session().await;
    let body = format!(
        r#"{{"session_id":"{session}","secret":"{secret}","device":{{"name":"a","name":"b","platform":"ios","app_version":"1"}}}}"#
    );
    let response = client
        .post(app.url("/v1/pair"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_error_body(response, 400, "invalid_request").await;
    let devices = app.running.services.devices.list().unwrap();
    assert!(devices.is_empty(), "{devices:?}");
    app.stop().await;
}

/// A client that writes its whole body before reading (python `requests`, curl) gets the
/// 413, over HTTP/1.1 (the socket lingers until the body is read and thrown away, instead
/// of a reset destroying the answer) and over HTTP/2 (the stream ends cleanly: curl
/// exits 0, not 92).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sends_its_whole_body_first_reads_the_413() {
    let app = helpers::spawn_app().await;
    let body = vec![b'a'; 2_000_000];

    // HTTP/1.1 by hand: the whole body is written before one byte is read.
    let mut conn = tls_connect(&app, &[b"http/1.1"]).await;
    let head = format!(
        "POST /v1/session HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(&body)
        .await
        .expect("the server reads the rest instead of resetting");
    conn.flush().await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut answer)).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 413"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    assert!(find(&answer, b"payload_too_large").is_some());

    if !helpers::tool_available(
        "a_client_that_sends_its_whole_body_first_reads_the_413",
        "curl",
        &["--version"],
        "the Debian package curl",
    ) {
        app.stop().await;
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let upload = dir.path().join("body");
    std::fs::write(&upload, &body).unwrap();
    let ca = dir.path().join("ca.pem");
    let der = cert_of(&app);
    let pem = format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        data_encoding::BASE64.encode(&der)
    );
    std::fs::write(&ca, pem).unwrap();
    for version in ["--http2", "--http1.1"] {
        let mut curl = std::process::Command::new("curl");
        curl.args(["-sS", version, "--cacert"])
            .arg(&ca)
            .args(["-w", "\n%{http_code} %{http_version}", "-X", "POST"])
            .args(["-H", "Content-Type: application/json", "--data-binary"])
            .arg(format!("@{}", upload.display()))
            .arg(format!("{}/v1/session", app.base_url));
        let out = tokio::task::spawn_blocking(move || curl.output())
            .await
            .unwrap()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{version}: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("payload_too_large"), "{version}: {stdout}");
        let expected = if version == "--http2" {
            "413 2"
        } else {
            "413 1.1"
        };
        assert!(stdout.trim_end().ends_with(expected), "{stdout}");
    }
    app.stop().await;
}
