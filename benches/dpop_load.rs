//! DPoP-bound requests beside unbound ones, in one run, over HTTPS: what binding a
//! device's tokens to its key costs where they are used.
//!
//! One gatehouse (a data file) in front of a trivial app (every request 200, in this
//! process). Two devices pair: one without a proof (bearer tokens), one with a proof by
//! its Ed25519 key (bound tokens, `cnf.jkt`). Then, in alternating phases of
//! `DPOP_SECS` seconds (default 5), `DPOP_ROUNDS` times (default 2), `DPOP_CLIENTS`
//! clients (default 32, one keep-alive connection each):
//!
//! - **front door**: `GET /notes` through gatehouse to the app, as `Authorization:
//!   Bearer` with the unbound token, then as `Authorization: DPoP` with the bound token
//!   and a fresh proof per request (`htm`, `htu`, `ath`, its own `jti`: each is checked
//!   and remembered by the server). Proofs are signed before each DPoP phase, outside
//!   the timed region, so the clients' signing is not counted;
//! - **introspection**: `POST /v1/introspect` (an admin token) of the unbound token, then
//!   of the bound one (whose answer adds `cnf`; the proof is the app's to check).
//!
//! Every answer must be 200. It prints each phase's rate and, per kind, the ratio of the
//! unbound rate to the bound one: how many times a bound request costs (goal ≤ 1.6).
//! Run: `cargo bench --bench dpop_load`.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
// A bench reads its sizes from the environment and may time against the real clock.
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gatehouse::app::{self, Running};
use gatehouse::clock::{SharedClock, SystemClock};
use gatehouse::config::{Config, Env, Flags};
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair as _};
use serde_json::{Value, json};

// The shared bench helpers; this bench uses a few of them.
#[allow(dead_code)]
mod support;
use support::{client, env_or};

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

fn config(dir: &std::path::Path, upstream: &str) -> Config {
    let env: BTreeMap<String, String> = [
        ("GATEHOUSE_LOG", "warn"),
        ("GATEHOUSE_UPSTREAM", upstream),
        // Every request comes from 127.0.0.1.
        ("GATEHOUSE_RATELIMIT_PER_IP", "off"),
        ("GATEHOUSE_RATELIMIT_PAIRING", "off"),
        ("GATEHOUSE_RATELIMIT_INTROSPECTION", "off"),
        ("GATEHOUSE_ACCESS_TTL", "1h"),
        ("GATEHOUSE_JOBS_BACKUP", "off"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let flags = Flags::default()
        .with("--data", dir.join("gatehouse.redb").display().to_string())
        .with("--listen", "127.0.0.1:0");
    Config::load(&flags, &Env(env)).unwrap()
}

/// Pairs a device, with a proof by `key` when there is one: its access token.
async fn pair(c: &reqwest::Client, running: &Running, key: Option<&DeviceKey>) -> String {
    let base = format!("https://{}", running.local_addr);
    let admin = &running.bootstrap_token.as_ref().unwrap().token;
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

/// Requests per second over `secs` with `clients_n` clients, each answer 200.
async fn load(running: &Running, ask: Ask, clients_n: usize, secs: f64) -> f64 {
    let cert = running.tls.as_ref().unwrap().cert_der();
    let base = format!("https://{}", running.local_addr);
    let next = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut tasks = tokio::task::JoinSet::new();
    let started = Instant::now();
    for _ in 0..clients_n {
        let (c, base, ask, next) = (client(&cert), base.clone(), ask.clone(), next.clone());
        tasks.spawn(async move {
            let mut done = 0u64;
            while Instant::now() < deadline {
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
    let total: u64 = tasks.join_all().await.into_iter().sum();
    total as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let secs: f64 = env_or("DPOP_SECS", 5.0);
    let clients_n: usize = env_or("DPOP_CLIENTS", 32);
    let rounds: usize = env_or("DPOP_ROUNDS", 2);
    gatehouse::tls::install_default_provider();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let upstream = start_app().await;
        let dir = tempfile::tempdir().unwrap();
        let clock: SharedClock = Arc::new(SystemClock);
        let running = app::start(&config(dir.path(), &upstream), clock)
            .await
            .unwrap();
        let c = client(&running.tls.as_ref().unwrap().cert_der());
        let key = DeviceKey::new();
        let unbound = pair(&c, &running, None).await;
        let bound = pair(&c, &running, Some(&key)).await;
        let admin = running.bootstrap_token.as_ref().unwrap().token.clone();
        let notes = format!("https://{}/notes", running.local_addr);
        // Enough proofs that no phase runs out (a DPoP phase stops early if it does).
        let pool = (secs * 25_000.0) as u64;
        let mut jti = 1u64;
        let mut rates: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        for round in 0..rounds {
            let bearer = load(&running, Ask::FrontBearer(unbound.clone()), clients_n, secs).await;
            let proofs: Vec<String> = (0..pool)
                .map(|_| {
                    jti += 1;
                    key.proof("GET", &notes, Some(&bound), jti)
                })
                .collect();
            let dpop = load(
                &running,
                Ask::FrontDpop(bound.clone(), Arc::new(proofs)),
                clients_n,
                secs,
            )
            .await;
            let plain = load(
                &running,
                Ask::Introspect {
                    token: unbound.clone(),
                    admin: admin.clone(),
                },
                clients_n,
                secs,
            )
            .await;
            let with_cnf = load(
                &running,
                Ask::Introspect {
                    token: bound.clone(),
                    admin: admin.clone(),
                },
                clients_n,
                secs,
            )
            .await;
            println!(
                "dpop_load: round {}: front door {bearer:.0} req/s as Bearer, {dpop:.0} as DPoP \
                 with a proof each; introspection {plain:.0}/s unbound, {with_cnf:.0}/s bound",
                round + 1
            );
            rates.entry("front_bearer").or_default().push(bearer);
            rates.entry("front_dpop").or_default().push(dpop);
            rates.entry("introspect_unbound").or_default().push(plain);
            rates.entry("introspect_bound").or_default().push(with_cnf);
        }
        let total = |name: &str| rates[name].iter().sum::<f64>();
        println!(
            "dpop_load: a bound request costs {:.2}x an unbound one through the front door \
             (goal <= 1.6x), {:.2}x at introspection ({clients_n} clients, {rounds} rounds of \
             {secs} s)",
            total("front_bearer") / total("front_dpop"),
            total("introspect_unbound") / total("introspect_bound"),
        );
        running.stop().await.unwrap();
    });
}
