//! Durable refreshes through the HTTPS API under load.
//!
//! Starts the real `gatehouse` binary (self-signed TLS, a temporary data file, the
//! per-address, pairing and refresh limits off so that one address and a few devices
//! may send this much), pairs one device per client over HTTPS (the bootstrap admin token
//! opens a pairing session, `POST /v1/pair` claims it), then C clients (64, or
//! `REFRESH_CLIENTS`), each a reqwest client with one keep-alive HTTP/1.1 connection over
//! TLS, opened before the clock starts, each with its own device, `POST /v1/token` with
//! `grant_type=refresh_token` and their current refresh token, in a loop, and take the new
//! refresh token from each answer for the next request: a client never sends a token twice
//! (a spent token presented again would revoke the device's family). Every refresh marks
//! the presented token spent, stores the new one and appends `token.refreshed` in one
//! durable write before the server answers.
//!
//! 1 s of warm-up, then S seconds (10, or `REFRESH_SECONDS`) counted: refreshes per second,
//! the latency of each request (p50, p90, p99, max) and the server's CPU time per refresh
//! (user + system from `/proc`, which does not depend on how the two cores were shared
//! with the clients). Checks that every answer was 200 with a refresh token never seen
//! before, that every client's last token still refreshes (no family was revoked), and
//! then that presenting a spent token is refused and revokes that family, as it should.
//!
//! Before the load it waits (at most 90 s) for the 1-minute load average to fall under 1.
//! Run: `cargo bench --bench refresh_load`. Under `cargo test` it runs 4 clients for
//! 0.3 s.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
// A bench reads its sizes from the environment and times against the real clock.
#![allow(clippy::disallowed_methods)]

mod support;

use support::{cpu_seconds, env_or, load_average, loopback_client, settle};

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The phases of the load: warming up, counted, stopping.
const WARMING: u8 = 0;
const COUNTING: u8 = 1;
const STOPPING: u8 = 2;

/// Cores this process may run on.
fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let at = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    f64::from(sorted[at]) / 1000.0
}

/// One refresh: the status and, on a 200, the new refresh token.
async fn refresh(client: &reqwest::Client, url: &str, token: &str) -> (u16, Option<String>) {
    let response = client
        .post(url)
        .form(&[("grant_type", "refresh_token"), ("refresh_token", token)])
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body = response.bytes().await.unwrap();
    if status != 200 {
        return (status, None);
    }
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let next = body["refresh_token"].as_str().map(str::to_string);
    (status, next)
}

/// What one client saw.
struct Outcome {
    /// Latency of each request started while counting, in µs.
    latencies: Vec<u32>,
    statuses: BTreeMap<u16, u64>,
    /// Every refresh token it was given, in order (the paired one first).
    tokens: Vec<String>,
}

fn main() {
    let benching = std::env::args().any(|a| a == "--bench");
    let (clients_n, seconds, warmup) = if benching {
        (
            env_or("REFRESH_CLIENTS", 64usize),
            env_or("REFRESH_SECONDS", 10.0f64),
            1.0,
        )
    } else {
        (4, 0.3, 0.1)
    };
    gatehouse::tls::install_default_provider();
    let server = support::start_server(
        &[],
        &[
            // Every request comes from 127.0.0.1: the per-address budget (6000/1m) would
            // answer 429 within the first second.
            ("GATEHOUSE_RATELIMIT_PER_IP", "off".into()),
            // The pairings come from one address too.
            ("GATEHOUSE_RATELIMIT_PAIRING", "off".into()),
            // Each device refreshes thousands of times a minute here (60/1m by default).
            ("GATEHOUSE_RATELIMIT_REFRESH", "off".into()),
            (
                "GATEHOUSE_MAX_CONNECTIONS_PER_IP",
                (clients_n + 16).to_string(),
            ),
        ],
    );
    let pid = server.child.id();
    let base = format!("https://{}", server.addr);
    let url = format!("{base}/v1/token");
    // The clients' runtime: one worker per core, as the server has.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("client")
        .build()
        .unwrap();

    let clients: Vec<reqwest::Client> = (0..clients_n).map(|_| loopback_client()).collect();
    let first: Vec<String> = runtime.block_on(async {
        let paired =
            support::pair_devices(&clients[0], &base, &server.admin_token, clients_n).await;
        // Every client's connection is open (TLS done) before the clock starts.
        for c in &clients {
            let r = c.get(format!("{base}/healthz")).send().await.unwrap();
            assert!(r.status().is_success());
            r.bytes().await.unwrap();
        }
        paired
            .iter()
            .map(|device| device["refresh_token"].as_str().unwrap().to_string())
            .collect()
    });
    let load = if benching { settle() } else { load_average() };
    println!("refresh_load: {clients_n} devices paired over HTTPS; load average {load}");

    let phase = Arc::new(AtomicU8::new(WARMING));
    let answered = Arc::new(AtomicU64::new(0));
    let (outcomes, counted, elapsed, cpu, clients_cpu, writer_cpu) = runtime.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for (c, token) in clients.iter().zip(&first) {
            let (c, url, phase, answered) =
                (c.clone(), url.clone(), phase.clone(), answered.clone());
            let mut current = token.clone();
            tasks.spawn(async move {
                let mut out = Outcome {
                    latencies: Vec::new(),
                    statuses: BTreeMap::new(),
                    tokens: vec![current.clone()],
                };
                loop {
                    let now = phase.load(Ordering::Relaxed);
                    if now == STOPPING {
                        break;
                    }
                    let t = Instant::now();
                    let (status, next) = refresh(&c, &url, &current).await;
                    if now == COUNTING {
                        out.latencies
                            .push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
                    }
                    *out.statuses.entry(status).or_default() += 1;
                    match next {
                        Some(next) => {
                            answered.fetch_add(1, Ordering::Relaxed);
                            out.tokens.push(next.clone());
                            current = next;
                        }
                        // Without a new token this client cannot go on without reusing one.
                        None => break,
                    }
                }
                out
            });
        }
        tokio::time::sleep(Duration::from_secs_f64(warmup)).await;
        let cpu_before = cpu_seconds(pid);
        let clients_cpu_before = cpu_seconds(std::process::id());
        let writer_cpu_before = support::thread_cpu_seconds(pid, "gatehouse-write");
        let answered_before = answered.load(Ordering::Relaxed);
        let started = Instant::now();
        phase.store(COUNTING, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
        let counted = answered.load(Ordering::Relaxed) - answered_before;
        let elapsed = started.elapsed();
        let cpu = cpu_seconds(pid) - cpu_before;
        let clients_cpu = cpu_seconds(std::process::id()) - clients_cpu_before;
        let writer_cpu = support::thread_cpu_seconds(pid, "gatehouse-write") - writer_cpu_before;
        phase.store(STOPPING, Ordering::Relaxed);
        let mut outcomes = Vec::new();
        while let Some(done) = tasks.join_next().await {
            outcomes.push(done.unwrap());
        }
        (outcomes, counted, elapsed, cpu, clients_cpu, writer_cpu)
    });

    // Checks: every answer a 200 with a refresh token never seen before.
    let mut statuses: BTreeMap<u16, u64> = BTreeMap::new();
    let mut latencies = Vec::new();
    let mut seen = HashSet::new();
    for out in &outcomes {
        for (status, n) in &out.statuses {
            *statuses.entry(*status).or_default() += n;
        }
        latencies.extend_from_slice(&out.latencies);
        for token in &out.tokens {
            assert!(seen.insert(token.as_str()), "a refresh token came twice");
        }
    }
    let total: u64 = statuses.values().sum();
    assert_eq!(statuses.get(&200).copied(), Some(total), "{statuses:?}");
    assert_eq!(seen.len() as u64, total + clients_n as u64);
    latencies.sort_unstable();

    // Every client's last token still refreshes: no family was revoked on the way.
    let (last_ok, reuse_refused, family_revoked) = runtime.block_on(async {
        let mut last_ok = 0;
        let mut lasts = Vec::new();
        for (c, out) in clients.iter().zip(&outcomes) {
            let (status, next) = refresh(c, &url, out.tokens.last().unwrap()).await;
            assert_eq!(status, 200, "a client's last refresh token was refused");
            lasts.push(next.unwrap());
            last_ok += 1;
        }
        // A spent token presented again is refused, and its family is revoked with it.
        let spent = &outcomes[0].tokens[outcomes[0].tokens.len() - 1];
        let (reuse, _) = refresh(&clients[0], &url, spent).await;
        let (after, _) = refresh(&clients[0], &url, &lasts[0]).await;
        (last_ok, reuse == 400, after == 400)
    });
    assert!(reuse_refused, "a spent refresh token was accepted");
    assert!(family_revoked, "the reused family still refreshes");

    let rate = counted as f64 / elapsed.as_secs_f64();
    println!(
        "refresh_load: {counted} refreshes by {clients_n} clients in {:.2} s: {rate:.0} \
         refreshes/s{}",
        elapsed.as_secs_f64(),
        if benching {
            " (goal >= 15000)"
        } else {
            " (test mode: not meaningful)"
        }
    );
    println!(
        "  latency per request: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.90),
        percentile(&latencies, 0.99),
        percentile(&latencies, 1.0),
    );
    println!(
        "  server CPU: {:.1} us per refresh ({:.2} cores); load average after {}",
        cpu * 1e6 / counted.max(1) as f64,
        cpu / elapsed.as_secs_f64(),
        load_average()
    );
    // Every refresh's write goes through one thread, one batch after another.
    println!(
        "  of which the writer thread: {:.1} us per refresh ({:.2} of a core; the rest of \
         its time it waits for the disk's fdatasync)",
        writer_cpu * 1e6 / counted.max(1) as f64,
        writer_cpu / elapsed.as_secs_f64(),
    );
    // The clients share the machine: what they spend bounds the rate as much as the
    // server does (two cores / (server + clients) CPU per refresh).
    println!(
        "  clients' CPU (this process): {:.1} us per refresh ({:.2} cores); the machine's \
         {} cores allow at most {:.0} refreshes/s at server + clients CPU, {:.0}/s were the \
         server alone on them",
        clients_cpu * 1e6 / counted.max(1) as f64,
        clients_cpu / elapsed.as_secs_f64(),
        cores(),
        cores() as f64 * counted as f64 / (cpu + clients_cpu).max(1e-9),
        cores() as f64 * counted as f64 / cpu.max(1e-9),
    );
    println!(
        "  checked: {total} answers 200, each with a refresh token never seen before; \
         {last_ok} clients' last tokens still refresh; a spent token presented again is \
         refused ({reuse_refused}) and revokes its family ({family_revoked})"
    );
}
