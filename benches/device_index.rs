//! What the device indexes buy: a page of `/v1/devices` and the revocation of one device,
//! on a data file with many devices.
//!
//! 1. Fills a new data file with 100 000 devices, each with one token family (both
//!    indexes written, as pairing writes them), 1 000 rows per write job.
//! 2. `Devices::page`: 200 pages of 50 devices after a cursor in the middle of the list,
//!    and 200 filtered pages (`name` matching one device in a hundred); the median and
//!    p99 of each.
//! 3. `RevocationList::revoke_device`: 200 devices revoked one after another (each a
//!    durable write with its audit record); median and p99.
//!
//! Run: `cargo bench --bench device_index` (`DEVICES=N` for another size). Under
//! `cargo test` it runs with 1 000 devices and 20 rounds, as a smoke test.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
// A bench reads its sizes from the environment and may time against the real clock.
#![allow(clippy::disallowed_methods)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use gatehouse::audit::Origin;
use gatehouse::clock::{FixedClock, SharedClock};
use gatehouse::devices::{DeviceFilter, Devices};
use gatehouse::ids::DeviceId;
use gatehouse::live::Changes;
use gatehouse::revocation::RevocationList;
use gatehouse::store::records::{Device, TokenFamily};
use gatehouse::store::seal::MasterKey;
use gatehouse::store::{
    DEVICE_FAMILIES, DEVICES, DEVICES_BY_AGE, Store, StoreError, TOKEN_FAMILIES, WriteTx,
    device_age_key, device_family_key,
};

/// 2026-11-23T00:00:00Z, the bench's "now".
const NOW_MS: u64 = 1_795_392_000_000;
const BATCH: u64 = 1_000;

fn measuring() -> bool {
    std::env::args().any(|a| a == "--bench")
}

fn device_id(n: u64) -> String {
    format!(
        "dev_{:032x}",
        u128::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15)
    )
}

/// Device `n`, paired `n` ms after the bench's "now", with its one family.
fn device_row(tx: &WriteTx<'_>, n: u64) -> Result<(), StoreError> {
    let id = device_id(n);
    let created = NOW_MS + n;
    let device = Device {
        name: format!("phone {n}"),
        platform: "ios".into(),
        app_version: "1.4.2".into(),
        created_at_ms: created,
        last_seen_ms: created,
        paired_from: "203.0.113.7".into(),
        pairing_session: format!("ps_{n:032x}"),
        revoked_at_ms: None,
    };
    tx.put(&DEVICES, &id, &device)?;
    tx.index_insert(&DEVICES_BY_AGE, &device_age_key(created, &id))?;
    let family = format!("fam_{n:032x}");
    tx.put(
        &TOKEN_FAMILIES,
        &family,
        &TokenFamily {
            device_id: id.clone(),
            created_at_ms: created,
            generation: 1,
            refresh_expires_at_ms: created + 7 * 86_400_000,
            revoked_at_ms: None,
            revoke_reason: None,
            status: Vec::new(),
        },
    )?;
    tx.index_insert(&DEVICE_FAMILIES, &device_family_key(&id, &family))
}

async fn fill(store: &Store, count: u64) {
    let mut at = 0;
    while at < count {
        let end = (at + BATCH).min(count);
        let range = at..end;
        at = end;
        store
            .write(move |tx| {
                for n in range.clone() {
                    device_row(tx, n)?;
                }
                Ok::<_, StoreError>(())
            })
            .await
            .unwrap();
    }
}

fn summary(what: &str, mut samples: Vec<Duration>) {
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    println!(
        "{what:48} median {:>9.1} µs   p99 {:>9.1} µs   ({} runs)",
        at(0.5).as_secs_f64() * 1e6,
        at(0.99).as_secs_f64() * 1e6,
        samples.len()
    );
}

fn main() {
    let (count, rounds) = if measuring() {
        let count = std::env::var("DEVICES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(100_000);
        (count, 200)
    } else {
        (1_000, 20)
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key = MasterKey::create_file(&dir.path().join("key")).unwrap();
    let clock: SharedClock = Arc::new(FixedClock::new(NOW_MS + count + 1));
    let (store, _) = Store::open(&dir.path().join("bench.redb"), &key, clock.as_ref()).unwrap();
    runtime.block_on(async {
        let started = Instant::now();
        fill(&store, count).await;
        println!(
            "filled {count} devices and families in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        let revocations = Arc::new(
            RevocationList::load(
                store.clone(),
                clock.clone(),
                Duration::from_secs(15 * 60),
                Changes::default(),
            )
            .unwrap(),
        );
        let devices = Devices::new(store.clone(), clock.clone(), revocations.clone());

        let middle = DeviceId::parse(&device_id(count / 2)).unwrap();
        let mut plain = Vec::new();
        let mut filtered = Vec::new();
        for _ in 0..rounds {
            let t = Instant::now();
            let page = devices
                .page(&DeviceFilter {
                    status: None,
                    name: None,
                    after: Some(middle),
                    limit: Some(50),
                })
                .unwrap();
            plain.push(t.elapsed());
            assert_eq!(page.devices.len(), 50);
            let t = Instant::now();
            devices
                .page(&DeviceFilter {
                    status: None,
                    name: Some("99".into()),
                    after: Some(middle),
                    limit: Some(50),
                })
                .unwrap();
            filtered.push(t.elapsed());
        }
        summary("page of 50 after a cursor mid-list", plain);
        summary("filtered page (name contains \"99\")", filtered);

        let mut revoking = Vec::new();
        for n in 0..rounds {
            let id = DeviceId::parse(&device_id(n)).unwrap();
            let t = Instant::now();
            assert!(
                revocations
                    .revoke_device(id, &Origin::operator())
                    .await
                    .unwrap()
            );
            revoking.push(t.elapsed());
        }
        summary("revoke one device (durable, audited)", revoking);
    });
    store.close();
}
