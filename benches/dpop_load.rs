//! DPoP-bound requests beside unbound ones, in one run, over HTTPS: what binding a
//! device's tokens to its key costs where they are used.
//!
//! One `gatehouse serve` (a child process, on a data file) in front of a trivial app
//! (every request 200, in this process). Two devices pair: one without a proof (bearer
//! tokens), one with a proof by its Ed25519 key (bound tokens, `cnf.jkt`). Then
//! `DPOP_ROUNDS` rounds (default 10) of four blocks of `DPOP_SECS` seconds each (default
//! 1), `DPOP_CLIENTS` clients (default 32, one keep-alive connection each) sending
//! `DPOP_RATE` requests a second in all (default 4 000, on a fixed beat), the kinds in
//! turn so that the machine's slow and fast phases fall on each alike:
//!
//! - **front door**: `GET /notes` through gatehouse to the app, as `Authorization:
//!   Bearer` with the unbound token, then as `Authorization: DPoP` with the bound token
//!   and a fresh proof per request (`htm`, `htu`, `ath`, its own `jti`: each is checked
//!   and remembered by the server). Proofs are signed before each round, outside the
//!   timed blocks, so the clients' signing is not counted;
//! - **introspection**: `POST /v1/introspect` (an admin token) of the unbound token, then
//!   of the bound one (whose answer adds `cnf`; the proof is the app's to check).
//!
//! Every answer must be 200. For each block it reads the server process's CPU time
//! (`/proc/<pid>/stat`) before and after, and prints each kind's rate and server CPU per
//! request, and the ratio bound / unbound of the CPU per request: how many times a bound
//! request costs the server (goal ≤ 1.6). All kinds run at the same rate because the
//! CPU a request costs falls as the rate rises (more requests per wake-up): at full
//! speed the unbound kind, answered faster, would look cheaper than it is.
//! Run: `cargo bench --bench dpop_load`.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
// A bench reads its sizes from the environment and may time against the real clock.
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair as _};
use serde_json::{Value, json};

// The shared bench helpers; this bench uses a few of them.
#[allow(dead_code)]
mod support;
use support::{Server, cpu_seconds, env_or, loopback_client, start_server};

fn b64(bytes: &[u8]) -> String {
    data_encoding::BASE64URL_NOPAD.encode(bytes)
}

fn sha256_b64(bytes: &[u8]) -> String {
    b64(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

/// A device's key, and proofs made with it.
struct DeviceKey(Ed25519KeyPair);

impl DeviceKey {
    fn new() -> Self {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        Self(Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap())
    }

    fn proof(&self, method: &str, url: &str, access_token: Option<&str>, jti: u64) -> String {
        let header = json!({"typ": "dpop+jwt", "alg": "EdDSA",
            "jwk": {"kty": "OKP", "crv": "Ed25519", "x": b64(self.0.public_key().as_ref())}});
        let iat = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let mut claims =
            json!({"jti": format!("bench-{jti}"), "htm": method, "htu": url, "iat": iat});
        if let Some(token) = access_token {
            claims["ath"] = json!(sha256_b64(token.as_bytes()));
        }
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let signature = self.0.sign(input.as_bytes());
        format!("{input}.{}", b64(signature.as_ref()))
    }
}

/// The trivial app: every request is 200 `app`.
async fn start_app() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = axum::Router::new().fallback(|| async { "app" });
    tokio::spawn(async move { axum::serve(listener, router).await });
    format!("http://{addr}")
}

/// The settings of the server under test: no per-address limits (every request comes
/// from 127.0.0.1), tokens that outlive the run.
fn server_env() -> Vec<(&'static str, String)> {
    [
        ("GATEHOUSE_RATELIMIT_PER_IP", "off"),
        ("GATEHOUSE_RATELIMIT_PAIRING", "off"),
        ("GATEHOUSE_RATELIMIT_INTROSPECTION", "off"),
        ("GATEHOUSE_ACCESS_TTL", "1h"),
        ("GATEHOUSE_JOBS_BACKUP", "off"),
    ]
    .into_iter()
    .map(|(k, v)| (k, v.to_string()))
    .collect()
}

/// Pairs a device, with a proof by `key` when there is one: its access token.
async fn pair(c: &reqwest::Client, base: &str, admin: &str, key: Option<&DeviceKey>) -> String {
    let session: Value = c
        .post(format!("{base}/v1/pairing/sessions"))
        .bearer_auth(admin)
        .json(&json!({}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut request = c.post(format!("{base}/v1/pair")).json(&json!({
        "session_id": session["session_id"], "secret": session["secret"],
        "device": {"name": "bench", "platform": "linux", "app_version": "1"},
    }));
    if let Some(key) = key {
        request = request.header(
            "DPoP",
            key.proof("POST", &format!("{base}/v1/pair"), None, 0),
        );
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 200);
    let pair: Value = response.json().await.unwrap();
    assert_eq!(
        pair["token_type"],
        if key.is_some() { "DPoP" } else { "Bearer" }
    );
    pair["access_token"].as_str().unwrap().to_string()
}

/// One way of sending a request, for `load`.
#[derive(Clone)]
enum Ask {
    /// `GET /notes` with `Authorization: Bearer`.
    FrontBearer(String),
    /// `GET /notes` with `Authorization: DPoP` and the next of these proofs.
    FrontDpop(String, Arc<Vec<String>>),
    /// `POST /v1/introspect` of this token, as this admin.
    Introspect { token: String, admin: String },
}

/// One block of load: requests answered, and the server's CPU seconds meanwhile.
struct Block {
    requests: u64,
    seconds: f64,
    server_cpu: f64,
}

/// `ask` sent by each of `clients` (one keep-alive connection each) for `secs`, at
/// `rate` requests a second in all (each client its share, on a fixed beat); every
/// answer must be 200.
async fn load(
    server: &Server,
    clients: &[reqwest::Client],
    ask: Ask,
    secs: f64,
    rate: f64,
) -> Block {
    let beat = Duration::from_secs_f64(clients.len() as f64 / rate);
    let base = format!("https://{}", server.addr);
    let next = Arc::new(AtomicUsize::new(0));
    let pid = server.child.id();
    let cpu_before = cpu_seconds(pid);
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut tasks = tokio::task::JoinSet::new();
    let started = Instant::now();
    for c in clients {
        let (c, base, ask, next) = (c.clone(), base.clone(), ask.clone(), next.clone());
        tasks.spawn(async move {
            let mut done = 0u64;
            let mut ticks = tokio::time::interval(beat);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while Instant::now() < deadline {
                ticks.tick().await;
                let request = match &ask {
                    Ask::FrontBearer(token) => c.get(format!("{base}/notes")).bearer_auth(token),
                    Ask::FrontDpop(token, proofs) => {
                        let Some(proof) = proofs.get(next.fetch_add(1, Ordering::Relaxed)) else {
                            break;
                        };
                        c.get(format!("{base}/notes"))
                            .header("Authorization", format!("DPoP {token}"))
                            .header("DPoP", proof)
                    }
                    Ask::Introspect { token, admin } => c
                        .post(format!("{base}/v1/introspect"))
                        .bearer_auth(admin)
                        .form(&[("token", token.as_str())]),
                };
                let response = request.send().await.unwrap();
                assert_eq!(response.status(), 200);
                response.bytes().await.unwrap();
                done += 1;
            }
            done
        });
    }
    let requests: u64 = tasks.join_all().await.into_iter().sum();
    Block {
        requests,
        seconds: started.elapsed().as_secs_f64(),
        server_cpu: cpu_seconds(pid) - cpu_before,
    }
}

/// Blocks of one kind, added up.
#[derive(Default)]
struct Totals {
    requests: u64,
    seconds: f64,
    server_cpu: f64,
}

impl Totals {
    fn add(&mut self, block: &Block) {
        self.requests += block.requests;
        self.seconds += block.seconds;
        self.server_cpu += block.server_cpu;
    }

    fn rate(&self) -> f64 {
        self.requests as f64 / self.seconds
    }

    /// The server's CPU per request, in µs.
    fn cpu_us(&self) -> f64 {
        self.server_cpu * 1e6 / self.requests as f64
    }
}

fn main() {
    let secs: f64 = env_or("DPOP_SECS", 1.0);
    let clients_n: usize = env_or("DPOP_CLIENTS", 32);
    let rounds: usize = env_or("DPOP_ROUNDS", 10);
    // The same rate for every kind, well within what the server answers of the slowest
    // (bound requests through the front door), so that each kind's CPU per request is
    // measured at one load: a server answering more requests a second batches more of
    // them per wake-up and spends less on each.
    let rate: f64 = env_or("DPOP_RATE", 4000.0);
    gatehouse::tls::install_default_provider();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let upstream = start_app().await;
        let server = start_server(&["--upstream".into(), upstream], &server_env());
        let base = format!("https://{}", server.addr);
        let clients: Vec<reqwest::Client> = (0..clients_n).map(|_| loopback_client()).collect();
        let key = DeviceKey::new();
        let unbound = pair(&clients[0], &base, &server.admin_token, None).await;
        let bound = pair(&clients[0], &base, &server.admin_token, Some(&key)).await;
        let admin = server.admin_token.clone();
        let notes = format!("{base}/notes");
        // Enough proofs that no block runs out (a DPoP block stops early if it does).
        let pool = (secs * rate * 1.2) as u64 + 1000;
        let mut jti = 1u64;
        let mut totals: BTreeMap<&str, Totals> = BTreeMap::new();
        // Short blocks of each kind in turn, so that the machine's slow and fast phases
        // fall on both kinds alike.
        for round in 0..rounds {
            let proofs: Vec<String> = (0..pool)
                .map(|_| {
                    jti += 1;
                    key.proof("GET", &notes, Some(&bound), jti)
                })
                .collect();
            let blocks = [
                (
                    "front_bearer",
                    load(
                        &server,
                        &clients,
                        Ask::FrontBearer(unbound.clone()),
                        secs,
                        rate,
                    )
                    .await,
                ),
                (
                    "front_dpop",
                    load(
                        &server,
                        &clients,
                        Ask::FrontDpop(bound.clone(), Arc::new(proofs)),
                        secs,
                        rate,
                    )
                    .await,
                ),
                (
                    "introspect_unbound",
                    load(
                        &server,
                        &clients,
                        Ask::Introspect {
                            token: unbound.clone(),
                            admin: admin.clone(),
                        },
                        secs,
                        rate,
                    )
                    .await,
                ),
                (
                    "introspect_bound",
                    load(
                        &server,
                        &clients,
                        Ask::Introspect {
                            token: bound.clone(),
                            admin: admin.clone(),
                        },
                        secs,
                        rate,
                    )
                    .await,
                ),
            ];
            let line: Vec<String> = blocks
                .iter()
                .map(|(name, b)| {
                    format!(
                        "{name} {:.0}/s {:.1} µs",
                        b.requests as f64 / b.seconds,
                        b.server_cpu * 1e6 / b.requests as f64
                    )
                })
                .collect();
            println!("dpop_load: round {}: {}", round + 1, line.join(", "));
            for (name, block) in &blocks {
                totals.entry(name).or_default().add(block);
            }
        }
        for name in [
            "front_bearer",
            "front_dpop",
            "introspect_unbound",
            "introspect_bound",
        ] {
            let t = &totals[name];
            println!(
                "dpop_load: {name:20} {:>8.0} req/s, {:>6.1} µs of server CPU per request",
                t.rate(),
                t.cpu_us()
            );
        }
        let ratio = |unbound: &str, bound: &str| {
            (
                totals[bound].cpu_us() / totals[unbound].cpu_us(),
                totals[unbound].rate() / totals[bound].rate(),
            )
        };
        let (front_cpu, front_rate) = ratio("front_bearer", "front_dpop");
        let (intro_cpu, intro_rate) = ratio("introspect_unbound", "introspect_bound");
        println!(
            "dpop_load: a bound request costs the server {front_cpu:.2}x the CPU of an unbound \
             one through the front door (goal <= 1.6x; {front_rate:.2}x in throughput), \
             {intro_cpu:.2}x at introspection ({intro_rate:.2}x in throughput); {clients_n} \
             clients, {rate} requests/s, {rounds} rounds of {secs} s blocks"
        );
    });
}
