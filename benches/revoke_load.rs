//! Durable revocations through the HTTPS API under load.
//!
//! Starts the real server in this process (`gatehouse::app::start`: self-signed TLS, the
//! data file in a temporary directory, the per-address and pairing limits off so that one
//! address may send this much), on a tokio runtime of its own. Then:
//!
//! 1. pairs `CLIENTS` devices over HTTPS (a pairing session opened through the services,
//!    claimed with `POST /v1/pair`), so every client starts with a refresh token from the
//!    real path;
//! 2. creates the other token families directly through the services, 1 000 per write
//!    job, with the rows pairing writes (device, family, refresh token, `token.issued`);
//! 3. `CLIENTS` reqwest clients, one keep-alive HTTP/1.1 connection each that trusts
//!    exactly the server's certificate (as the integration tests do), already connected,
//!    take distinct refresh tokens from a shared list and `POST /v1/revoke` them as fast
//!    as the answers come. Each revocation appends the token's family to the revocation
//!    journal and writes a `token.revoked` audit record in the same durable transaction
//!    before the 200 is sent.
//!
//! It reports revocations per second and the latency of each request (p50, p99, max), and
//! then checks that every answer was 200, that every revocation is in the revocation
//! journal, that the log gained exactly one audit record per revocation, and that a
//! revoked refresh token no longer refreshes; then it folds the journal into the families'
//! rows as the server would later (timed, with the bytes written) and checks that every
//! family's row says revoked and that another revoked refresh token is still refused. Clients and server share the machine's two cores.
//! Run: `cargo bench --bench revoke_load` (`REVOKE_TOKENS=N` for another count; 200 000 by
//! default; `REVOKE_CLIENTS=N` for another number of clients). Under `cargo test` it
//! revokes 300 tokens.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
// A bench reads its sizes from the environment and may time against the real clock.
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use gatehouse::app::{self, Running};
use gatehouse::audit::Origin;
use gatehouse::clock::{SharedClock, SystemClock};
use gatehouse::config::{Config, Env, Flags};
use gatehouse::store::{FAMILY_REVOCATIONS, TOKEN_FAMILIES};

// The shared bench helpers; this bench uses two of them.
#[allow(dead_code)]
mod support;
use support::{client, create_families, percentile};

/// Concurrent clients, each with its own connection (`REVOKE_CLIENTS` overrides).
const CLIENTS: usize = 50;

fn measuring() -> bool {
    std::env::args().any(|a| a == "--bench")
}

fn config(dir: &std::path::Path) -> Config {
    let env: BTreeMap<String, String> = [
        ("GATEHOUSE_LOG", "warn"),
        // Every request comes from 127.0.0.1: without this the per-address budget
        // (6000/1m) would answer 429 within the first second.
        ("GATEHOUSE_RATELIMIT_PER_IP", "off"),
        // The 50 pairings of step 1 come from one address too.
        ("GATEHOUSE_RATELIMIT_PAIRING", "off"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let flags = Flags::default()
        .with("--data", dir.join("gatehouse.redb").display().to_string())
        .with("--listen", "127.0.0.1:0");
    Config::load(&flags, &Env(env)).unwrap()
}

/// Pairs one device over HTTPS; returns its refresh token.
async fn pair(running: &Running, client: &reqwest::Client, base: &str) -> String {
    let session = running
        .services
        .pairing
        .create(Some("bench"), None, None, &Origin::operator())
        .await
        .unwrap();
    let response = client
        .post(format!("{base}/v1/pair"))
        .json(&serde_json::json!({
            "session_id": session.session_id.to_string(),
            "secret": session.secret,
            "device": {"name": "bench", "platform": "linux", "app_version": "1"},
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "paired");
    let body: serde_json::Value = response.json().await.unwrap();
    body["refresh_token"].as_str().unwrap().to_string()
}

/// A multi-threaded runtime (one worker per core) whose threads are called `name`.
fn runtime(name: &str) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name(name)
        .build()
        .unwrap()
}

/// Bytes this process has caused to be written to the disk so far (`/proc/self/io`).
fn written_bytes() -> u64 {
    let io = std::fs::read_to_string("/proc/self/io").unwrap_or_default();
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// The file's length and the space it occupies on disk, in MiB.
fn size(path: &std::path::Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).unwrap();
    format!(
        "{:.1} MiB (on disk {:.1} MiB)",
        meta.len() as f64 / 1048576.0,
        (meta.blocks() * 512) as f64 / 1048576.0
    )
}

fn audit_len(running: &Running) -> u64 {
    running.services.store.read(|tx| tx.audit_len()).unwrap()
}

fn main() {
    let benching = measuring();
    let total: usize = if benching {
        std::env::var("REVOKE_TOKENS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(200_000)
    } else {
        300
    };
    let clients_n: usize = std::env::var("REVOKE_CLIENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CLIENTS);
    assert!(
        total >= clients_n,
        "REVOKE_TOKENS must be at least {clients_n}"
    );
    gatehouse::tls::install_default_provider();
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    // The server's runtime: its workers (one per core) run every connection. Threads are
    // named so that a profile tells server, clients and the writer apart.
    let server_rt = runtime("server");
    let clock: SharedClock = Arc::new(SystemClock);
    let running = server_rt.block_on(app::start(&config, clock)).unwrap();
    let base = format!("https://{}", running.local_addr);
    let cert = running.tls.as_ref().unwrap().cert_der();
    // The clients' runtime, separate so that neither starves the other's scheduler.
    let client_rt = runtime("client");

    // 1 and 2: the tokens. Paired tokens first, so each client's first revocation is one
    // from the real pairing path.
    let started = Instant::now();
    let clients: Vec<reqwest::Client> = (0..clients_n).map(|_| client(&cert)).collect();
    let mut tokens: Vec<String> = client_rt.block_on(async {
        let mut paired = Vec::new();
        for c in &clients {
            paired.push(pair(&running, c, &base).await);
        }
        paired
    });
    let paired = tokens.len();
    tokens.extend(
        server_rt
            .block_on(create_families(&running, total - paired))
            .into_iter()
            .map(|(_, _, token)| token),
    );
    let tokens: Arc<Vec<String>> = Arc::new(tokens);
    println!(
        "revoke_load: {paired} devices paired over HTTPS and {} families written through the \
         services in {:.1} s; data file {}",
        total - paired,
        started.elapsed().as_secs_f64(),
        size(&config.data_path)
    );
    let audit_before = audit_len(&running);

    // 3: the load.
    let (elapsed, mut latencies, statuses, written) = client_rt.block_on(async {
        // Every client's connection is open (TLS done) before the clock starts.
        for c in &clients {
            let r = c.get(format!("{base}/healthz")).send().await.unwrap();
            assert!(r.status().is_success());
            r.bytes().await.unwrap();
        }
        let next = Arc::new(AtomicUsize::new(0));
        let written_before = written_bytes();
        let start = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for (i, c) in clients.iter().enumerate() {
            let (c, next, tokens) = (c.clone(), next.clone(), tokens.clone());
            let url = format!("{base}/v1/revoke");
            tasks.spawn(async move {
                let mut latencies = Vec::new();
                let mut statuses: BTreeMap<u16, u64> = BTreeMap::new();
                // Its own paired token first, then whatever is next in the shared list.
                let mut index = Some(i);
                while let Some(at) = index {
                    let t = Instant::now();
                    let response = c
                        .post(&url)
                        .form(&[("token", tokens[at].as_str())])
                        .send()
                        .await
                        .unwrap();
                    let status = response.status().as_u16();
                    response.bytes().await.unwrap();
                    latencies.push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
                    *statuses.entry(status).or_default() += 1;
                    let n = clients_n + next.fetch_add(1, Ordering::Relaxed);
                    index = (n < tokens.len()).then_some(n);
                }
                (latencies, statuses)
            });
        }
        let mut latencies = Vec::with_capacity(tokens.len());
        let mut statuses: BTreeMap<u16, u64> = BTreeMap::new();
        while let Some(done) = tasks.join_next().await {
            let (l, s) = done.unwrap();
            latencies.extend(l);
            for (status, n) in s {
                *statuses.entry(status).or_default() += n;
            }
        }
        let elapsed = start.elapsed();
        (
            elapsed,
            latencies,
            statuses,
            written_bytes() - written_before,
        )
    });
    latencies.sort_unstable();
    let rate = total as f64 / elapsed.as_secs_f64();

    // Checks: every answer 200, every family revoked durably (in the journal), one audit
    // record each.
    assert_eq!(
        statuses.get(&200).copied(),
        Some(total as u64),
        "{statuses:?}"
    );
    let journaled = running
        .services
        .store
        .read(|tx| tx.all(&FAMILY_REVOCATIONS))
        .unwrap()
        .len();
    assert_eq!(journaled, total, "journaled revocations");
    let audit_after = audit_len(&running);
    assert_eq!(
        audit_after - audit_before,
        total as u64,
        "token.revoked records"
    );
    let refused = |token: &str| {
        let response = client_rt.block_on(
            clients[0]
                .post(format!("{base}/v1/token"))
                .form(&[("grant_type", "refresh_token"), ("refresh_token", token)])
                .send(),
        );
        response.unwrap().status() == 400
    };
    assert!(
        refused(&tokens[1]),
        "a journaled family's refresh token is refused"
    );

    // Then the fold that the server would run later: every revocation moved into its
    // family's row, timed, with the bytes it wrote.
    let fold_written_before = written_bytes();
    let fold_started = Instant::now();
    let folded = server_rt
        .block_on(running.services.revocations.fold_journal())
        .unwrap();
    let fold_elapsed = fold_started.elapsed();
    let fold_written = written_bytes() - fold_written_before;
    assert_eq!(folded.entries, total as u64, "{folded:?}");
    let (families, revoked) = running
        .services
        .store
        .read(|tx| {
            let all = tx.all(&TOKEN_FAMILIES)?;
            let revoked = all
                .iter()
                .filter(|(_, f)| f.revoked_at_ms.is_some())
                .count();
            Ok((all.len(), revoked))
        })
        .unwrap();
    assert_eq!((families, revoked), (total, total), "families, revoked");
    assert!(
        refused(&tokens[0]),
        "a folded family's refresh token is refused"
    );
    let size = size(&config.data_path);
    drop(clients);
    server_rt.block_on(running.stop()).unwrap();

    println!(
        "revoke_load: {total} revocations by {clients_n} clients in {:.2} s: {rate:.0} \
         revocations/s{}",
        elapsed.as_secs_f64(),
        if benching {
            " (target >= 20000)"
        } else {
            " (test mode: not meaningful)"
        }
    );
    println!(
        "  latency per request: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        f64::from(percentile(&latencies, 0.50)) / 1000.0,
        f64::from(percentile(&latencies, 0.90)) / 1000.0,
        f64::from(percentile(&latencies, 0.99)) / 1000.0,
        f64::from(latencies.last().copied().unwrap_or(0)) / 1000.0,
    );
    println!(
        "  {:.1} KiB written to the disk per revocation; data file after: {size}",
        written as f64 / 1024.0 / total as f64
    );
    println!(
        "  then folding the {total} journaled revocations into their families' rows: {:.2} s, \
         {:.1} MiB written ({:.1} KiB per revocation)",
        fold_elapsed.as_secs_f64(),
        fold_written as f64 / 1024.0 / 1024.0,
        fold_written as f64 / 1024.0 / total as f64,
    );
    println!(
        "  checked: {total} answers 200, {total} journaled, then {revoked} of {families} families \
         revoked in their rows, {} token.revoked records, revoked refresh tokens refused before and after the fold",
        audit_after - audit_before,
    );
}
