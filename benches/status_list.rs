//! What a token status list costs with a million issued tokens: handing the indices out,
//! the size of the list on the wire, and the time to build it again after a revocation.
//!
//! 1. `StatusLists::allocate` hands out 2^20 indices (a full list), reserving blocks of
//!    1 024 durably as a server does: the rate, and the reservations it took.
//! 2. For 0, 0.1 %, 1 % and 10 % of them revoked (rows in `status_revoked.v1`, spread
//!    over the list as a permutation of the indices): the signed list's size (the JWS as
//!    served, and its compressed bits), the time `StatusLists::serve` takes to build
//!    it (read the list's rows, set the bits, zlib, sign; median and p99 over rounds, each
//!    after the cached list has aged out), and a cached answer's time.
//! 3. One more revocation, then the list fetched until its bit shows: how late a
//!    revocation appears in the served list (on the node that made it: after
//!    `REBUILD_GAP` at most, plus one build).
//!
//! Run: `cargo bench --bench status_list`. Under `cargo test` it runs with 65 536 tokens
//! and 3 rounds, as a smoke test.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
// A bench reads its sizes from the environment and may time against the real clock.
#![allow(clippy::disallowed_methods)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use gatehouse::clock::{FixedClock, SharedClock};
use gatehouse::config::KeyAlgorithm;
use gatehouse::keys::KeyRing;
use gatehouse::live::Changes;
use gatehouse::status_list::{
    LIST_LEN, REBUILD_AFTER, REBUILD_GAP, StatusListSettings, StatusLists,
};
use gatehouse::store::records::StatusRevoked;
use gatehouse::store::seal::MasterKey;
use gatehouse::store::{STATUS_REVOKED, Store, StoreError, status_index_key};

/// 2026-11-23T00:00:00Z, the bench's "now".
const NOW_MS: u64 = 1_795_392_000_000;
const BATCH: usize = 10_000;

fn measuring() -> bool {
    std::env::args().any(|a| a == "--bench")
}

/// The `n`th index of a permutation of one list: revoked tokens spread over it as
/// tokens issued over a quarter of an hour would be.
fn spread(n: u64) -> u64 {
    // Each step is a bijection of 0..2^20 (an odd multiplier, an xor with a right shift),
    // so no index comes twice, and the result looks random to zlib.
    let mask = LIST_LEN - 1;
    let mut x = n.wrapping_mul(0x9e37_79b9) & mask;
    x ^= x >> 11;
    x = x.wrapping_mul(0x85eb_ca6b) & mask;
    x ^= x >> 7;
    x.wrapping_mul(0xc2b2_ae35) & mask
}

async fn revoke(store: &Store, indices: Vec<u64>) {
    for chunk in indices.chunks(BATCH) {
        let chunk = chunk.to_vec();
        store
            .write(move |tx| {
                for index in &chunk {
                    tx.put(
                        &STATUS_REVOKED,
                        &status_index_key(*index),
                        &StatusRevoked {
                            expires_at_ms: NOW_MS + 900_000,
                            revoked_at_ms: NOW_MS,
                        },
                    )?;
                }
                Ok::<_, StoreError>(())
            })
            .await
            .unwrap();
    }
}

fn quantile(samples: &mut [Duration], q: f64) -> Duration {
    samples.sort_unstable();
    samples[((samples.len() - 1) as f64 * q).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The bits of list 0 as the served token carries them (base64url of zlib).
fn lst_of(token: &str) -> Vec<u8> {
    let payload = token.split('.').nth(1).unwrap();
    let claims: serde_json::Value = serde_json::from_slice(
        &data_encoding::BASE64URL_NOPAD
            .decode(payload.as_bytes())
            .unwrap(),
    )
    .unwrap();
    let lst = claims["status_list"]["lst"].as_str().unwrap();
    data_encoding::BASE64URL_NOPAD
        .decode(lst.as_bytes())
        .unwrap()
}

fn bit(token: &str, idx: u64) -> bool {
    use std::io::Read;
    let mut bytes = Vec::new();
    flate2::read::ZlibDecoder::new(lst_of(token).as_slice())
        .read_to_end(&mut bytes)
        .unwrap();
    bytes[(idx / 8) as usize] >> (idx % 8) & 1 == 1
}

fn main() {
    let (tokens, rounds) = if measuring() {
        (LIST_LEN, 20)
    } else {
        (65_536, 3)
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key = MasterKey::create_file(&dir.path().join("key")).unwrap();
    let clock: SharedClock = Arc::new(FixedClock::new(NOW_MS));
    let (store, _) = Store::open(&dir.path().join("bench.redb"), &key, clock.as_ref()).unwrap();
    runtime.block_on(async {
        let keys = Arc::new(
            KeyRing::open(
                store.clone(),
                clock.clone(),
                KeyAlgorithm::Ed25519,
                Duration::from_secs(930),
                Changes::default(),
            )
            .await
            .unwrap(),
        );
        let lists = Arc::new(StatusLists::new(
            store.clone(),
            clock.clone(),
            keys,
            StatusListSettings {
                uri_base: "https://auth.example.com/v1/statuslists/".into(),
                ttl: Duration::from_secs(60),
                valid_for: Duration::from_secs(930),
                leeway: Duration::from_secs(30),
            },
        ));

        let started = Instant::now();
        for _ in 0..tokens {
            lists.allocate().await.unwrap();
        }
        let took = started.elapsed();
        println!(
            "allocated {tokens} indices in {:.2} s ({:.2} M/s), {} durable block reservations",
            took.as_secs_f64(),
            tokens as f64 / took.as_secs_f64() / 1e6,
            tokens / 1024
        );

        let mut revoked = 0u64;
        for per_mille in [0u64, 1, 10, 100] {
            let want = tokens * per_mille / 1000;
            revoke(&store, (revoked..want).map(spread).collect()).await;
            revoked = want;
            let mut builds = Vec::with_capacity(rounds);
            let mut token = String::new();
            for _ in 0..rounds {
                tokio::time::sleep(REBUILD_AFTER + Duration::from_millis(10)).await;
                let t = Instant::now();
                let served = lists.serve(0).await.unwrap();
                builds.push(t.elapsed());
                token = served.token.to_string();
            }
            let mut cached = Vec::with_capacity(1000);
            for _ in 0..1000 {
                let t = Instant::now();
                std::hint::black_box(lists.serve(0).await.unwrap());
                cached.push(t.elapsed());
            }
            println!(
                "{:>5.1} % revoked ({want:>7} of {tokens}): list {:>7} bytes (bits {:>7} bytes compressed), \
                 build median {:>6.2} ms p99 {:>6.2} ms, cached {:>5.2} µs",
                per_mille as f64 / 10.0,
                token.len(),
                lst_of(&token).len(),
                ms(quantile(&mut builds, 0.5)),
                ms(quantile(&mut builds, 0.99)),
                quantile(&mut cached, 0.5).as_secs_f64() * 1e6,
            );
        }

        // One more revocation: how long until the served list shows it.
        let index = spread(revoked);
        lists.serve(0).await.unwrap();
        let t = Instant::now();
        revoke(&store, vec![index]).await;
        let written = t.elapsed();
        loop {
            let served = lists.serve(0).await.unwrap();
            if bit(&served.token, index) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        println!(
            "a revocation (durable in {:.2} ms) showed in the served list after {:.1} ms \
             (bound: {} ms of caching plus one build)",
            ms(written),
            ms(t.elapsed()),
            REBUILD_GAP.as_millis()
        );
    });
    store.close();
}
