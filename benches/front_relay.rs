//! The front door's WebSocket relay: messages per second through it, and the server's
//! memory per relayed socket.
//!
//! Starts a WebSocket echo server (in this process, on a runtime of its own with one
//! thread, plain `ws://` on loopback) and the real `gatehouse` binary with `--upstream`
//! pointing at it, pairs one device per client, then:
//!
//! 1. **throughput**: C clients (64, or `FRONT_RELAY_CLIENTS`), each on its own relayed
//!    socket over TLS with its own device's token (`Authorization: Bearer`), send a
//!    32-byte text message and wait for its echo, again and again; 1 s of warm-up, then
//!    S seconds (10, or `FRONT_RELAY_SECONDS`) counted. The same clients straight to the
//!    echo server (plain `ws://`, no gatehouse) run the same way first, as the floor.
//!    Prints messages per second, the round-trip p50 and p99, and gatehouse's CPU time
//!    per relayed message (user + system from `/proc`).
//! 2. **memory**: those sockets closed, one warm-up relayed socket, then N more (10 000,
//!    or `FRONT_RELAY_SOCKETS`) opened 64 at a time, each echoing one message; two seconds
//!    later the growth of the server's `VmRSS` divided by N, and its open descriptors.
//!
//! Every relayed socket holds two descriptors in gatehouse (the client's and the app's)
//! and two in this process (the client's and the echo server's): with N = 10 000 both
//! processes need more than 20 000. When `ulimit -n` is lower the bench raises its own
//! limit with `prlimit` (which needs the hard limit to allow it, or root) before starting
//! gatehouse, which inherits it; otherwise it measures as many sockets as fit and says
//! so (or stops, when `FRONT_RELAY_SOCKETS` asked for the count). The caps the
//! relay counts toward (`server.max_connections` and `_per_ip`, `ws.max_connections` and
//! `_per_ip`, and `upstream.ws_max_connections_per_device`) are raised to N + 200, the per-address request limit is off (every socket
//! comes from 127.0.0.1), `upstream.ws_messages_per_second` is 100 000 per device and
//! access tokens live an hour.
//!
//! Run: `cargo bench --bench front_relay`. Under `cargo test` it runs 4 clients for
//! 0.3 s and 20 sockets, and checks every echo.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
// A bench reads its sizes from the environment and times against the real clock.
#![allow(clippy::disallowed_methods)]

mod support;

use support::{Server, cpu_seconds, env_or, nofile_limits, open_files, proc_status};

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// This process's own WebSocket buffers (clients and echo server): small, so that
/// 10 000 sockets on each side stay cheap here. gatehouse's are its own.
fn small_buffers() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
}

/// Descriptors each process needs besides two per relayed socket.
const SPARE_FILES: u64 = 200;

/// How many relayed sockets this process (and gatehouse, started after, which inherits
/// its limit) can hold: `wanted` when the open-file limit allows it, after raising the
/// limit with `prlimit` if needed. When it cannot be raised, fewer: as many as fit when
/// the count is the default (`explicit` false), said on the output; otherwise it stops.
fn sockets_that_fit(wanted: usize, explicit: bool) -> usize {
    let needed = 2 * wanted as u64 + SPARE_FILES;
    let (soft, hard) = nofile_limits();
    if soft >= needed {
        return wanted;
    }
    let limit = format!("--nofile={needed}:{}", hard.max(needed));
    let raised = Command::new("prlimit")
        .args(["--pid", &std::process::id().to_string(), &limit])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if raised && nofile_limits().0 >= needed {
        println!("front_relay: raised the open-file limit from {soft} to {needed}");
        return wanted;
    }
    let fit = (soft.saturating_sub(SPARE_FILES) / 2) as usize;
    assert!(
        !explicit,
        "front_relay: {wanted} relayed sockets need {needed} open files in gatehouse and \
         here (ulimit -n is {soft}, hard {hard}) and prlimit could not raise it: raise \
         `ulimit -n` (as root, or with a higher hard limit), or set FRONT_RELAY_SOCKETS \
         to {fit} or fewer"
    );
    println!(
        "front_relay: {wanted} relayed sockets need {needed} open files (ulimit -n is {soft}, \
         hard {hard}, and prlimit could not raise it): measuring {fit} instead"
    );
    fit
}

/// The echo server: every text or binary message comes back as it was.
fn start_echo() -> (SocketAddr, tokio::runtime::Runtime) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("echo")
        .enable_all()
        .build()
        .unwrap();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    runtime.spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            stream.set_nodelay(true).unwrap();
            tokio::spawn(async move {
                let Ok(mut socket) =
                    tokio_tungstenite::accept_async_with_config(stream, Some(small_buffers()))
                        .await
                else {
                    return;
                };
                while let Some(Ok(message)) = socket.next().await {
                    if message.is_close() {
                        return;
                    }
                    let data = message.is_text() || message.is_binary();
                    if data && socket.send(message).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, runtime)
}

fn start_server(upstream: SocketAddr, sockets: usize) -> Server {
    let cap = (sockets + 200).to_string();
    support::start_server(
        &["--upstream".into(), format!("http://{upstream}")],
        &[
            ("GATEHOUSE_MAX_CONNECTIONS", cap.clone()),
            ("GATEHOUSE_MAX_CONNECTIONS_PER_IP", cap.clone()),
            ("GATEHOUSE_WS_MAX_CONNECTIONS", cap.clone()),
            ("GATEHOUSE_WS_MAX_CONNECTIONS_PER_IP", cap.clone()),
            // The memory part opens every socket with one device's token.
            ("GATEHOUSE_UPSTREAM_WS_MAX_CONNECTIONS_PER_DEVICE", cap),
            ("GATEHOUSE_UPSTREAM_WS_MESSAGES_PER_SECOND", "100000".into()),
            ("GATEHOUSE_RATELIMIT_PER_IP", "off".into()),
            ("GATEHOUSE_RATELIMIT_PAIRING", "off".into()),
            ("GATEHOUSE_ACCESS_TTL", "1h".into()),
        ],
    )
}

/// Pairs `count` devices; returns their access tokens.
async fn pair(server: &Server, count: usize) -> Vec<Arc<str>> {
    let client = reqwest::Client::builder()
        .tls_backend_preconfigured((*support::tls_config(&[b"http/1.1"])).clone())
        .build()
        .unwrap();
    let base = format!("https://{}", server.addr);
    support::pair_devices(&client, &base, &server.admin_token, count)
        .await
        .iter()
        .map(|pair| pair["access_token"].as_str().unwrap().into())
        .collect()
}

/// A relayed socket: TLS to gatehouse, the token in `Authorization`.
async fn connect_relayed(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    token: &str,
) -> WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .unwrap();
    let mut request = format!("wss://{addr}/echo").into_client_request().unwrap();
    request.headers_mut().insert(
        http::header::AUTHORIZATION,
        format!("Bearer {token}").parse().unwrap(),
    );
    let (socket, _) =
        tokio_tungstenite::client_async_with_config(request, stream, Some(small_buffers()))
            .await
            .unwrap();
    socket
}

/// A socket straight to the echo server (no gatehouse, no TLS).
async fn connect_direct(addr: SocketAddr) -> WebSocketStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let (socket, _) = tokio_tungstenite::client_async_with_config(
        format!("ws://{addr}/echo"),
        tcp,
        Some(small_buffers()),
    )
    .await
    .unwrap();
    socket
}

/// Sends one message and waits for the same message back.
async fn echo<S: AsyncRead + AsyncWrite + Unpin>(socket: &mut WebSocketStream<S>, text: &str) {
    socket.send(Message::text(text)).await.unwrap();
    match socket.next().await {
        Some(Ok(Message::Text(back))) => assert_eq!(back.as_str(), text),
        other => panic!("no echo: {other:?}"),
    }
}

struct Rate {
    messages: u64,
    seconds: f64,
    p50_us: u64,
    p99_us: u64,
    /// CPU time of the server (`pid`) in the counted window, in seconds.
    cpu: f64,
}

/// Runs `sockets` in ping-pong loops: `warm_up`, then `measure` counted, with the CPU
/// time of `server` over the same window.
async fn ping_pong<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    sockets: Vec<WebSocketStream<S>>,
    warm_up: Duration,
    measure: Duration,
    server: Option<u32>,
) -> (Rate, Vec<WebSocketStream<S>>) {
    let counting = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, mut socket) in sockets.into_iter().enumerate() {
        let (counting, stop, count) = (counting.clone(), stop.clone(), count.clone());
        tasks.spawn(async move {
            // 32 bytes, different for each client.
            let text = format!("{i:>8}-relay-benchmark-message-");
            let mut latencies = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let sent = Instant::now();
                echo(&mut socket, &text).await;
                if counting.load(Ordering::Relaxed) {
                    latencies.push(sent.elapsed().as_micros() as u64);
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
            (socket, latencies)
        });
    }
    tokio::time::sleep(warm_up).await;
    let cpu_before = server.map_or(0.0, cpu_seconds);
    counting.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(measure).await;
    let messages = count.load(Ordering::Relaxed);
    let seconds = started.elapsed().as_secs_f64();
    let cpu = server.map_or(0.0, cpu_seconds) - cpu_before;
    counting.store(false, Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    let mut sockets = Vec::new();
    let mut latencies = Vec::new();
    while let Some(done) = tasks.join_next().await {
        let (socket, mut of_one) = done.unwrap();
        sockets.push(socket);
        latencies.append(&mut of_one);
    }
    latencies.sort_unstable();
    let at = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    let rate = Rate {
        messages,
        seconds,
        p50_us: at(0.50),
        p99_us: at(0.99),
        cpu,
    };
    (rate, sockets)
}

fn main() {
    let benching = std::env::args().any(|a| a == "--bench");
    let (clients, seconds, sockets, warm_up) = if benching {
        (
            env_or("FRONT_RELAY_CLIENTS", 64usize),
            env_or("FRONT_RELAY_SECONDS", 10.0f64),
            env_or("FRONT_RELAY_SOCKETS", 10_000usize),
            Duration::from_secs(1),
        )
    } else {
        (4, 0.3, 20, Duration::from_millis(100))
    };
    let measure = Duration::from_secs_f64(seconds);
    // How long the server is left to settle before its memory is read (shorter in tests).
    let pause = if benching {
        Duration::from_secs(2)
    } else {
        Duration::from_millis(200)
    };
    // Each relayed socket: two descriptors here (client, echo server), two in gatehouse.
    let explicit = std::env::var_os("FRONT_RELAY_SOCKETS").is_some();
    let sockets = sockets_that_fit(sockets.max(clients), explicit);
    gatehouse::tls::install_default_provider();
    let (echo_addr, _echo_runtime) = start_echo();
    let server = start_server(echo_addr, sockets.max(clients));
    let pid = server.child.id();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .thread_name("client")
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let tokens = pair(&server, clients).await;
        let tls = support::tls_config(&[b"http/1.1"]);

        // 1. Throughput: straight to the echo server, then through the relay.
        let mut direct = Vec::new();
        for _ in 0..clients {
            direct.push(connect_direct(echo_addr).await);
        }
        let (floor, direct) = ping_pong(direct, warm_up, measure, None).await;
        for mut socket in direct {
            socket.close(None).await.unwrap();
        }
        let mut relayed = Vec::new();
        for token in &tokens {
            relayed.push(connect_relayed(server.addr, tls.clone(), token).await);
        }
        let (rate, relayed) = ping_pong(relayed, warm_up, measure, Some(pid)).await;
        let per_second = |r: &Rate| r.messages as f64 / r.seconds;
        println!(
            "front_relay: direct to the echo server (ws://, no gatehouse), {clients} clients: \
             {:.0} messages/s, round trip p50 {} us, p99 {} us",
            per_second(&floor),
            floor.p50_us,
            floor.p99_us
        );
        println!(
            "front_relay: through gatehouse's relay (wss:// to gatehouse, ws:// to the app), \
             {clients} clients: {:.0} messages/s, round trip p50 {} us, p99 {} us; \
             gatehouse CPU {:.1} us per echoed message ({:.2} cores)",
            per_second(&rate),
            rate.p50_us,
            rate.p99_us,
            rate.cpu * 1e6 / rate.messages.max(1) as f64,
            rate.cpu / rate.seconds
        );
        assert!(rate.messages > 0, "no message went through the relay");
        for mut socket in relayed {
            socket.close(None).await.unwrap();
        }
        tokio::time::sleep(pause / 2).await;

        // 2. Memory: N relayed sockets, each having echoed one message.
        let mut warm = connect_relayed(server.addr, tls.clone(), &tokens[0]).await;
        echo(&mut warm, "warm-up").await;
        tokio::time::sleep(pause / 4).await;
        let before = proc_status(pid, "VmRSS:");
        let files_before = open_files(pid);
        let started = Instant::now();
        let limit = Arc::new(tokio::sync::Semaphore::new(64));
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..sockets {
            let permit = limit.clone().acquire_owned().await.unwrap();
            let (tls, token) = (tls.clone(), tokens[i % tokens.len()].clone());
            let addr = server.addr;
            tasks.spawn(async move {
                let mut socket = connect_relayed(addr, tls, &token).await;
                echo(&mut socket, "open").await;
                drop(permit);
                socket
            });
        }
        let mut open = Vec::with_capacity(sockets);
        while let Some(socket) = tasks.join_next().await {
            open.push(socket.unwrap());
        }
        let opened = started.elapsed();
        tokio::time::sleep(pause).await;
        let after = proc_status(pid, "VmRSS:");
        let files_after = open_files(pid);
        let per = after.saturating_sub(before) as f64 / sockets as f64;
        println!(
            "front_relay: {sockets} relayed sockets opened in {:.1} s (each echoed one \
             message); server RSS {before} KiB -> {after} KiB; {per:.1} KiB per relayed \
             socket; server descriptors {files_before} -> {files_after}",
            opened.as_secs_f64()
        );
        // Every socket is still relayed: one more echo on a few of them.
        for socket in open.iter_mut().step_by((sockets / 10).max(1)) {
            echo(socket, "still there").await;
        }
        assert_eq!(open.len(), sockets);
        drop((open, warm));
    });
}
