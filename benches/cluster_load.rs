//! Durable revocations through the HTTPS API on one redb node and on several nodes
//! sharing one PostgreSQL database, in the same run; then how long a revocation on one
//! node takes to be refused by the others.
//!
//! Needs a PostgreSQL database: `bench/cluster.sh` starts one (Debian's PostgreSQL 15, as
//! the unprivileged user `postgres` when run as root) and runs this with
//! `CLUSTER_STORAGE=postgres://…` and `CLUSTER_PASSWORD_FILE`. Without them it says so
//! and does nothing.
//!
//! Each phase starts its nodes in this process (self-signed TLS, the per-address and
//! pairing limits off, one issuer), writes `CLUSTER_TOKENS` token families through the
//! first node's services (the rows pairing writes), and then `CLUSTER_CLIENTS` clients,
//! spread over the nodes, each with one keep-alive HTTP/1.1 connection, `POST
//! /v1/revoke` distinct refresh tokens as fast as the answers come; each answer comes
//! after the revocation and its audit record are committed. A 503 (not written: the
//! write lost every race with other nodes' writes) is tried again at once and counted.
//! It reports revocations per second, latency percentiles and the 503s, and checks
//! that every token ends with a 200 and every family is revoked in the store: in the
//! revocation journal on a data file, in its own row on PostgreSQL (where a refresh
//! racing the revocation on another node must conflict with it).
//! With several nodes it then revokes `CLUSTER_SAMPLES` families one at a time on the
//! first node and times, on each other node, how long until its in-memory revocation
//! list refuses the family (p50, p99, max). After the revocations each phase also
//! measures introspection: the same clients, spread over the nodes, `POST
//! /v1/introspect` (an admin token) of the access tokens of 200 devices paired over
//! HTTPS, for `CLUSTER_INTROSPECT_SECS` (5), every answer 200 and active; it reports
//! each node's rate.
//!
//! Run: `bash bench/cluster.sh` (`CLUSTER_NODES`, `CLUSTER_TOKENS`, `CLUSTER_CLIENTS`,
//! `CLUSTER_SAMPLES`, `CLUSTER_INTROSPECT_SECS` override 3, 20 000, 48, 200, 5).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
// A bench reads its sizes from the environment and may time against the real clock.
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use gatehouse::app::{self, Running};
use gatehouse::clock::{SharedClock, SystemClock};
use gatehouse::config::{Config, Env, Flags};
use gatehouse::ids::TokenId;
use gatehouse::store::{FAMILY_REVOCATIONS, TOKEN_FAMILIES};

// The shared bench helpers; this bench uses a few of them.
#[allow(dead_code)]
mod support;
use support::{client, create_families, env_or, percentile};

/// Where the nodes of a phase keep their data.
enum Storage<'a> {
    DataFile,
    Postgres {
        url: &'a str,
        password_file: &'a str,
    },
}

fn config(dir: &Path, storage: &Storage<'_>, key_file: Option<&Path>) -> Config {
    let mut env: BTreeMap<String, String> = [
        ("GATEHOUSE_LOG", "warn"),
        // Every request comes from 127.0.0.1.
        ("GATEHOUSE_RATELIMIT_PER_IP", "off"),
        ("GATEHOUSE_RATELIMIT_PAIRING", "off"),
        ("GATEHOUSE_RATELIMIT_INTROSPECTION", "off"),
        // Nodes behind one name sign as one issuer.
        ("GATEHOUSE_ISSUER", "https://gatehouse.bench"),
        ("GATEHOUSE_JOBS_BACKUP", "off"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    if let Storage::Postgres { url, password_file } = storage {
        env.insert("GATEHOUSE_STORAGE".into(), (*url).to_string());
        env.insert(
            "GATEHOUSE_STORAGE_PASSWORD_FILE".into(),
            (*password_file).to_string(),
        );
    }
    if let Some(key) = key_file {
        env.insert(
            "GATEHOUSE_MASTER_KEY_FILE".into(),
            key.display().to_string(),
        );
    }
    let flags = Flags::default()
        .with("--data", dir.join("gatehouse.redb").display().to_string())
        .with("--listen", "127.0.0.1:0");
    Config::load(&flags, &Env(env)).unwrap()
}

struct Phase {
    nodes: Vec<Running>,
    _dirs: Vec<tempfile::TempDir>,
}

async fn start(count: usize, storage: &Storage<'_>) -> Phase {
    let mut nodes = Vec::new();
    let mut dirs = Vec::new();
    let mut key: Option<std::path::PathBuf> = None;
    for _ in 0..count {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path(), storage, key.as_deref());
        let clock: SharedClock = Arc::new(SystemClock);
        let running = app::start(&config, clock).await.unwrap();
        key.get_or_insert(config.master_key.path.clone());
        nodes.push(running);
        dirs.push(dir);
    }
    Phase { nodes, _dirs: dirs }
}

struct Outcome {
    rate: f64,
    latencies: Vec<u32>,
    /// Answers 503 that were tried again.
    retried: u64,
}

/// Revokes every token through the phase's nodes, clients spread over them.
async fn revoke_all(phase: &Phase, tokens: Arc<Vec<String>>, clients_n: usize) -> Outcome {
    let clients: Vec<(reqwest::Client, String)> = (0..clients_n)
        .map(|i| {
            let node = &phase.nodes[i % phase.nodes.len()];
            let cert = node.tls.as_ref().unwrap().cert_der();
            (client(&cert), format!("https://{}", node.local_addr))
        })
        .collect();
    for (c, base) in &clients {
        let r = c.get(format!("{base}/healthz")).send().await.unwrap();
        assert!(r.status().is_success());
        r.bytes().await.unwrap();
    }
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (c, base) in clients {
        let (next, tokens) = (next.clone(), tokens.clone());
        tasks.spawn(async move {
            let url = format!("{base}/v1/revoke");
            let mut latencies = Vec::new();
            let mut statuses: BTreeMap<u16, u64> = BTreeMap::new();
            loop {
                let at = next.fetch_add(1, Ordering::Relaxed);
                if at >= tokens.len() {
                    break;
                }
                let t = Instant::now();
                // A 503 says "not written, try again" (a write that lost every race
                // with other nodes' writes): retried at once, as a client would; the
                // latency counts from the first try.
                let status = loop {
                    let response = c
                        .post(&url)
                        .form(&[("token", tokens[at].as_str())])
                        .send()
                        .await
                        .unwrap();
                    let status = response.status().as_u16();
                    response.bytes().await.unwrap();
                    *statuses.entry(status).or_default() += 1;
                    if status != 503 {
                        break status;
                    }
                };
                let _ = status;
                latencies.push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
            }
            (latencies, statuses)
        });
    }
    let mut latencies = Vec::new();
    let mut statuses: BTreeMap<u16, u64> = BTreeMap::new();
    while let Some(done) = tasks.join_next().await {
        let (l, s) = done.unwrap();
        latencies.extend(l);
        for (status, n) in s {
            *statuses.entry(status).or_default() += n;
        }
    }
    let elapsed = start.elapsed();
    let retried = statuses.remove(&503).unwrap_or(0);
    assert_eq!(
        statuses,
        BTreeMap::from([(200, tokens.len() as u64)]),
        "every revocation answered 200 (after {retried} retries of a 503)"
    );
    latencies.sort_unstable();
    Outcome {
        rate: tokens.len() as f64 / elapsed.as_secs_f64(),
        latencies,
        retried,
    }
}

/// Introspections per second on each node of `phase`: `clients_n` clients spread over
/// the nodes, each with one keep-alive connection, `POST /v1/introspect` (the bootstrap
/// admin token) of `access` tokens in turn for `seconds`; every answer must be 200 and
/// active. The rate of each node, in node order.
async fn introspect_load(
    phase: &Phase,
    access: Arc<Vec<String>>,
    clients_n: usize,
    seconds: f64,
) -> Vec<f64> {
    let admin = phase.nodes[0]
        .bootstrap_token
        .as_ref()
        .expect("the first node made the bootstrap token")
        .token
        .clone();
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..clients_n {
        let node = &phase.nodes[i % phase.nodes.len()];
        let c = client(&node.tls.as_ref().unwrap().cert_der());
        let url = format!("https://{}/v1/introspect", node.local_addr);
        let (access, admin) = (access.clone(), admin.clone());
        tasks.spawn(async move {
            let mut done = 0u64;
            while Instant::now() < deadline {
                let token = &access[(i + done as usize) % access.len()];
                let response = c
                    .post(&url)
                    .bearer_auth(&admin)
                    .form(&[("token", token.as_str())])
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 200);
                let body = response.bytes().await.unwrap();
                assert!(body.starts_with(b"{\"active\":true,"), "{body:?}");
                done += 1;
            }
            (i, done)
        });
    }
    let mut per_node = vec![0u64; phase.nodes.len()];
    while let Some(done) = tasks.join_next().await {
        let (i, n) = done.unwrap();
        per_node[i % phase.nodes.len()] += n;
    }
    per_node.into_iter().map(|n| n as f64 / seconds).collect()
}

/// Access tokens of `count` devices paired on `running` over HTTPS (as devices pair:
/// an admin opens a session, the device claims it), for introspection on every node.
async fn access_tokens(running: &Running, count: usize) -> Arc<Vec<String>> {
    let c = client(&running.tls.as_ref().unwrap().cert_der());
    let base = format!("https://{}", running.local_addr);
    let admin = &running.bootstrap_token.as_ref().unwrap().token;
    let paired = support::pair_devices(&c, &base, admin, count).await;
    Arc::new(
        paired
            .iter()
            .map(|pair| pair["access_token"].as_str().unwrap().to_string())
            .collect(),
    )
}

fn report_introspection(what: &str, rates: &[f64]) {
    let each: Vec<String> = rates.iter().map(|r| format!("{r:.0}")).collect();
    println!(
        "cluster_load: {what}: {:.0} introspections/s in all; per node {}",
        rates.iter().sum::<f64>(),
        each.join(", ")
    );
}

fn report(what: &str, outcome: &Outcome) {
    let ms = |p: f64| f64::from(percentile(&outcome.latencies, p)) / 1000.0;
    println!(
        "cluster_load: {what}: {:.0} revocations/s; latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; \
         {} answers 503 tried again",
        outcome.rate,
        ms(0.50),
        ms(0.99),
        f64::from(outcome.latencies.last().copied().unwrap_or(0)) / 1000.0,
        outcome.retried
    );
}

fn journaled(running: &Running) -> usize {
    running
        .services
        .store
        .read(|tx| tx.all(&FAMILY_REVOCATIONS))
        .unwrap()
        .len()
}

/// Families whose row says revoked.
fn revoked_in_rows(running: &Running) -> usize {
    running
        .services
        .store
        .read(|tx| tx.all(&TOKEN_FAMILIES))
        .unwrap()
        .into_iter()
        .filter(|(_, family)| family.revoked_at_ms.is_some())
        .count()
}

/// Revokes `samples` families one at a time on the first node and times how long each
/// other node takes to refuse them (its in-memory list, as every verification asks).
async fn propagation(phase: &Phase, samples: usize) -> Vec<u32> {
    let first = &phase.nodes[0];
    let families = create_families(first, samples).await;
    let client = client(&first.tls.as_ref().unwrap().cert_der());
    let url = format!("https://{}/v1/revoke", first.local_addr);
    let unrelated = TokenId::generate().unwrap();
    let mut out = Vec::new();
    for (device, family, token) in families {
        let response = client
            .post(&url)
            .form(&[("token", token.as_str())])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        // Timed from the answer: what one node acknowledged, how long before another
        // node refuses it.
        let answered = Instant::now();
        for node in &phase.nodes[1..] {
            loop {
                if node
                    .services
                    .revocations
                    .is_revoked(&unrelated, &family, &device)
                {
                    break;
                }
                assert!(
                    answered.elapsed() < Duration::from_secs(5),
                    "a revocation did not reach another node"
                );
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            out.push(u32::try_from(answered.elapsed().as_micros()).unwrap_or(u32::MAX));
        }
    }
    out.sort_unstable();
    out
}

fn main() {
    let (Ok(url), Ok(password_file)) = (
        std::env::var("CLUSTER_STORAGE"),
        std::env::var("CLUSTER_PASSWORD_FILE"),
    ) else {
        println!(
            "cluster_load: needs a PostgreSQL database (CLUSTER_STORAGE, CLUSTER_PASSWORD_FILE); \
             run it through bench/cluster.sh"
        );
        return;
    };
    let nodes_n: usize = env_or("CLUSTER_NODES", 3);
    let total: usize = env_or("CLUSTER_TOKENS", 20_000);
    let clients_n: usize = env_or("CLUSTER_CLIENTS", 48);
    let samples: usize = env_or("CLUSTER_SAMPLES", 200);
    let introspect_secs: f64 = env_or("CLUSTER_INTROSPECT_SECS", 5.0);
    gatehouse::tls::install_default_provider();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        // One node on a data file.
        let single = start(1, &Storage::DataFile).await;
        let tokens: Vec<String> = create_families(&single.nodes[0], total)
            .await
            .into_iter()
            .map(|(_, _, token)| token)
            .collect();
        let outcome = revoke_all(&single, Arc::new(tokens), clients_n).await;
        assert_eq!(journaled(&single.nodes[0]), total);
        report("1 node on a data file", &outcome);
        let single_rate = outcome.rate;
        let access = access_tokens(&single.nodes[0], 200).await;
        let rates = introspect_load(&single, access, clients_n, introspect_secs).await;
        report_introspection("1 node on a data file", &rates);
        for node in single.nodes {
            node.stop().await.unwrap();
        }

        // Several nodes on the database.
        let storage = Storage::Postgres {
            url: &url,
            password_file: &password_file,
        };
        let cluster = start(nodes_n, &storage).await;
        let tokens: Vec<String> = create_families(&cluster.nodes[0], total)
            .await
            .into_iter()
            .map(|(_, _, token)| token)
            .collect();
        let outcome = revoke_all(&cluster, Arc::new(tokens), clients_n).await;
        assert_eq!(revoked_in_rows(cluster.nodes.last().unwrap()), total);
        report(&format!("{nodes_n} nodes on PostgreSQL"), &outcome);
        println!(
            "cluster_load: {nodes_n} nodes on PostgreSQL / 1 node on a data file: {:.2}x \
             (goal: at least 20 000 revocations/s on the cluster)",
            outcome.rate / single_rate
        );
        let access = access_tokens(&cluster.nodes[0], 200).await;
        let rates = introspect_load(&cluster, access, clients_n, introspect_secs).await;
        report_introspection(&format!("{nodes_n} nodes on PostgreSQL"), &rates);
        if nodes_n > 1 {
            let seen = propagation(&cluster, samples).await;
            println!(
                "cluster_load: a revocation on one node refused by another after p50 {:.2} ms, \
                 p99 {:.2} ms, max {:.2} ms ({} samples; goal p99 <= 100 ms)",
                f64::from(percentile(&seen, 0.50)) / 1000.0,
                f64::from(percentile(&seen, 0.99)) / 1000.0,
                f64::from(seen.last().copied().unwrap_or(0)) / 1000.0,
                seen.len()
            );
        }
        for node in cluster.nodes {
            node.stop().await.unwrap();
        }
    });
}
