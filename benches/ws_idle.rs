//! Memory of idle authenticated WebSocket connections.
//!
//! Starts the real `gatehouse` binary, pairs one device, then opens N WebSocket
//! connections over TLS, authenticates each with the device's access token and leaves
//! them idle. It reads the server's resident memory (`VmRSS`) before and after and
//! reports the growth per connection. Run: `ulimit -n 65536; cargo bench --bench
//! ws_idle` (N = 10 000, or `WS_IDLE_CONNECTIONS`). Under `cargo test` it opens 20
//! connections and checks that each one authenticates.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
// A bench reads its sizes from the environment and may time against the real clock.
#![allow(clippy::disallowed_methods)]

mod support;

use support::{Server, proc_status};

use std::net::SocketAddr;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

fn start_server(connections: usize) -> Server {
    let cap = (connections + 100).to_string();
    support::start_server(
        &[],
        &[
            ("GATEHOUSE_MAX_CONNECTIONS", cap.clone()),
            ("GATEHOUSE_WS_MAX_CONNECTIONS", cap.clone()),
            ("GATEHOUSE_WS_MAX_CONNECTIONS_PER_IP", cap),
            ("GATEHOUSE_WS_MESSAGES_PER_SECOND", "1000".into()),
        ],
    )
}

async fn pair(server: &Server) -> String {
    let client = reqwest::Client::builder()
        .tls_backend_preconfigured((*support::tls_config(&[b"http/1.1"])).clone())
        .build()
        .unwrap();
    let base = format!("https://{}", server.addr);
    let session: serde_json::Value = client
        .post(format!("{base}/v1/pairing/sessions"))
        .bearer_auth(&server.admin_token)
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let pair: serde_json::Value = client
        .post(format!("{base}/v1/pair"))
        .json(&serde_json::json!({
            "session_id": session["session_id"],
            "secret": session["secret"],
            "device": {"name": "bench", "platform": "linux", "app_version": "1"},
        }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    pair["access_token"].as_str().unwrap().to_string()
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

async fn connect(addr: SocketAddr, tls: Arc<rustls::ClientConfig>, token: Arc<str>) -> Socket {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .unwrap();
    let (mut socket, _) = tokio_tungstenite::client_async(format!("wss://{addr}/v1/ws"), stream)
        .await
        .unwrap();
    let auth = serde_json::json!({"type": "auth", "access_token": &*token}).to_string();
    socket.send(Message::Text(auth.into())).await.unwrap();
    match socket.next().await {
        Some(Ok(Message::Text(text))) => {
            assert!(text.contains("auth_success"), "{text}");
        }
        other => panic!("no auth_success: {other:?}"),
    }
    socket
}

fn main() {
    let benching = std::env::args().any(|a| a == "--bench");
    let connections: usize = if benching {
        std::env::var("WS_IDLE_CONNECTIONS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(10_000)
    } else {
        20
    };
    gatehouse::tls::install_default_provider();
    let server = start_server(connections);
    let pid = server.child.id();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let token: Arc<str> = pair(&server).await.into();
        let tls = support::tls_config(&[b"http/1.1"]);
        // One connection first, so that lazily built state is not counted per socket.
        let warm = connect(server.addr, tls.clone(), token.clone()).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = proc_status(pid, "VmRSS:");
        let started = Instant::now();
        let limit = Arc::new(tokio::sync::Semaphore::new(64));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..connections {
            let permit = limit.clone().acquire_owned().await.unwrap();
            let (tls, token) = (tls.clone(), token.clone());
            let addr = server.addr;
            tasks.spawn(async move {
                let socket = connect(addr, tls, token).await;
                drop(permit);
                socket
            });
        }
        let mut sockets = Vec::with_capacity(connections);
        while let Some(socket) = tasks.join_next().await {
            sockets.push(socket.unwrap());
        }
        let opened = started.elapsed();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = proc_status(pid, "VmRSS:");
        let per = (after.saturating_sub(before)) as f64 / connections as f64;
        println!(
            "ws_idle: {connections} authenticated idle connections opened in {:.1} s; \
             server RSS {before} KiB -> {after} KiB; {per:.1} KiB per connection",
            opened.as_secs_f64()
        );
        assert_eq!(sockets.len(), connections);
        drop((sockets, warm));
    });
}
