//! Memory of idle keep-alive HTTPS connections.
//!
//! Starts the real `gatehouse` binary, opens one warm-up connection, reads the server's
//! resident memory (`VmRSS`), then opens N connections over TLS (64 at a time), each
//! sending one `GET /healthz` (HTTP/1.1, keep-alive) and reading its 200, and leaves them
//! open and idle. Two seconds later it reads `VmRSS` again; then it waits until the
//! server's `gatehouse_http_connections_resting` gauge counts all N (an idle connection
//! rests a second after its request), reads `VmRSS` once more and reports both, per
//! connection too, and the server's open descriptors; then it checks that connections
//! opened first and last still answer a second request (none was closed meanwhile).
//!
//! Each connection holds one descriptor in gatehouse and one here: N = 10 000 needs a
//! little over 10 000 open files in each process. When `ulimit -n` is lower the bench
//! raises its own limit with `prlimit` (up to the hard limit) before starting gatehouse,
//! which inherits it; otherwise it measures as many connections as fit and says so (or
//! stops, when `IDLE_CONNS` asked for the count). `server.max_connections` and
//! `server.max_connections_per_ip` are raised to N + 100 and the per-address request
//! limit is off (every connection comes from 127.0.0.1).
//!
//! Before opening them it waits (at most 90 s) for the 1-minute load average to fall
//! under 1. Run: `cargo bench --bench idle_conns` (N = 10 000, or `IDLE_CONNS`). Under `cargo test`
//! it opens 20 connections.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
// A bench reads its sizes from the environment and may time against the real clock.
#![allow(clippy::disallowed_methods)]

#[allow(dead_code)] // the admin token is not needed here
mod support;

use support::{Server, load_average, nofile_limits, open_files, proc_status, settle};

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

type Conn = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// Descriptors each process needs besides one per connection.
const SPARE_FILES: u64 = 200;

/// How many connections this process (and gatehouse, started after, which inherits its
/// limit) can hold: `wanted` when the open-file limit allows it, after raising the limit
/// with `prlimit` if needed. When it cannot be raised, fewer: as many as fit when the
/// count is the default (`explicit` false), said on the output; otherwise it stops.
fn connections_that_fit(wanted: usize, explicit: bool) -> usize {
    let needed = wanted as u64 + SPARE_FILES;
    let (soft, hard) = nofile_limits();
    if soft >= needed {
        return wanted;
    }
    let limit = format!("--nofile={}:{hard}", needed.min(hard));
    let raised = Command::new("prlimit")
        .args(["--pid", &std::process::id().to_string(), &limit])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let (soft_now, _) = nofile_limits();
    if raised && soft_now >= needed {
        println!("idle_conns: raised the open-file limit from {soft} to {needed}");
        return wanted;
    }
    let fit = soft_now.saturating_sub(SPARE_FILES) as usize;
    assert!(
        !explicit,
        "idle_conns: {wanted} connections need {needed} open files in gatehouse and here \
         (ulimit -n is {soft_now}, hard {hard}): raise `ulimit -n`, or set IDLE_CONNS to \
         {fit} or fewer"
    );
    println!(
        "idle_conns: {wanted} connections need {needed} open files (ulimit -n is {soft_now}, \
         hard {hard}): measuring {fit} instead"
    );
    fit
}

fn start_server(connections: usize) -> Server {
    let cap = (connections + 100).to_string();
    support::start_server(
        &[],
        &[
            ("GATEHOUSE_MAX_CONNECTIONS", cap.clone()),
            ("GATEHOUSE_MAX_CONNECTIONS_PER_IP", cap),
            ("GATEHOUSE_RATELIMIT_PER_IP", "off".into()),
        ],
    )
}

/// Sends `GET /healthz` on `conn` and reads the whole answer; panics unless it is a 200.
async fn healthz(conn: &mut Conn) {
    get(conn, "/healthz").await;
}

/// Sends `GET path` on `conn` and reads the whole answer; panics unless it is a 200.
async fn get(conn: &mut Conn, path: &str) -> String {
    conn.write_all(format!("GET {path} HTTP/1.1\r\nhost: localhost\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut answer = Vec::with_capacity(1024);
    let mut buf = [0u8; 2048];
    loop {
        let n = conn.read(&mut buf).await.unwrap();
        assert!(n > 0, "the server closed the connection");
        answer.extend_from_slice(&buf[..n]);
        let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = std::str::from_utf8(&answer[..end]).unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().unwrap())
            })
            .expect("content-length");
        if answer.len() >= end + 4 + length {
            return String::from_utf8_lossy(&answer[end + 4..end + 4 + length]).into_owned();
        }
    }
}

async fn connect(addr: SocketAddr, tls: Arc<rustls::ClientConfig>) -> Conn {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut conn = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .unwrap();
    healthz(&mut conn).await;
    conn
}

fn main() {
    let benching = std::env::args().any(|a| a == "--bench");
    let explicit = std::env::var("IDLE_CONNS")
        .ok()
        .and_then(|v| v.parse().ok());
    let wanted: usize = if benching {
        explicit.unwrap_or(10_000)
    } else {
        20
    };
    let connections = connections_that_fit(wanted, explicit.is_some());
    gatehouse::tls::install_default_provider();
    let server = start_server(connections);
    let pid = server.child.id();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let tls = support::tls_config(&[b"http/1.1"]);
        // One connection first, so that lazily built state is not counted per connection.
        let mut warm = connect(server.addr, tls.clone()).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let load = if benching { settle() } else { load_average() };
        let before = proc_status(pid, "VmRSS:");
        let files_before = open_files(pid);
        // In waves: each wave's connections are opened, then rest; the next wave's may
        // reuse what the resting ones gave back.
        let waves = std::env::var("IDLE_WAVES")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(1)
            .clamp(1, connections.max(1));
        let mut conns: Vec<(usize, Conn)> = Vec::with_capacity(connections);
        let mut readings = Vec::new();
        for wave in 0..waves {
            let first = wave * connections / waves;
            let last = (wave + 1) * connections / waves;
            let started = Instant::now();
            let limit = Arc::new(tokio::sync::Semaphore::new(64));
            let mut tasks = tokio::task::JoinSet::new();
            for i in first..last {
                let permit = limit.clone().acquire_owned().await.unwrap();
                let tls = tls.clone();
                let addr = server.addr;
                tasks.spawn(async move {
                    let conn = connect(addr, tls).await;
                    drop(permit);
                    (i, conn)
                });
            }
            while let Some(conn) = tasks.join_next().await {
                conns.push(conn.unwrap());
            }
            let opened = started.elapsed();
            let busy = proc_status(pid, "VmRSS:");
            // Then every connection rests (a second after its request, see the server's
            // src/http/serve.rs): wait for the gauge to count them all.
            let resting_since = Instant::now();
            let mut resting = 0;
            while resting < last && resting_since.elapsed() < Duration::from_secs(20) {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let metrics = get(&mut warm, "/metrics").await;
                resting = metrics
                    .lines()
                    .find_map(|l| l.strip_prefix("gatehouse_http_connections_resting "))
                    .and_then(|v| v.parse::<f64>().ok())
                    .expect("gatehouse_http_connections_resting")
                    as usize;
            }
            assert_eq!(resting, last, "not every idle connection rested");
            let rested = proc_status(pid, "VmRSS:");
            println!(
                "idle_conns: wave {}: {} connections opened in {:.1} s; server RSS {busy} KiB \
                 when the last was answered, {rested} KiB once all {resting} rested",
                wave + 1,
                last - first,
                opened.as_secs_f64(),
            );
            readings.push(rested);
        }
        let after = *readings.last().unwrap();
        let files_after = open_files(pid);
        let per = (after.saturating_sub(before)) as f64 / connections as f64;
        println!(
            "idle_conns: {connections} idle keep-alive HTTPS connections (one GET /healthz \
             each) in {waves} wave(s), all resting: server RSS {before} KiB -> {after} KiB \
             ({:.1} MB in all){}; {per:.1} KiB per connection; open descriptors \
             {files_before} -> {files_after}; load average before {load}",
            after as f64 * 1024.0 / 1e6,
            if benching && connections >= 10_000 {
                " (goal <= 60 MB)"
            } else {
                ""
            }
        );
        if waves > 1 {
            let last_wave = connections - (waves - 1) * connections / waves;
            let grew = after.saturating_sub(readings[readings.len() - 2]);
            println!(
                "idle_conns: the last wave added {:.1} KiB per connection",
                grew as f64 / last_wave as f64
            );
        }
        assert_eq!(conns.len(), connections);
        assert!(
            files_after >= files_before + connections,
            "the server holds {files_after} descriptors"
        );
        // The first and last opened are still served: nothing was closed meanwhile.
        conns.sort_unstable_by_key(|(i, _)| *i);
        let n = conns.len();
        for (_, conn) in conns.iter_mut().take(5) {
            healthz(conn).await;
        }
        for (_, conn) in conns.iter_mut().skip(n.saturating_sub(5)) {
            healthz(conn).await;
        }
        drop((conns, warm));
    });
}
