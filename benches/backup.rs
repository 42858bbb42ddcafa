//! An online backup of a large data file while durable writes go on.
//!
//! 1. Fills a new data file with 1 000 000 audit events and 100 000 devices (1 000 rows
//!    per write job) and records its size.
//! 2. Measures a small durable write alone: `AuditLog::record` every 2 ms for 3 s.
//! 3. Takes a backup (`backup::create`: one snapshot, copied, fsynced, renamed and
//!    checked) while the same probe keeps writing; reports the backup's time, its size,
//!    MB/s, and the probe's latency (p50, p99, max) beside step 2's.
//!
//! About a minute. Run: `cargo bench --bench backup` (`BACKUP_EVENTS=N`,
//! `BACKUP_DEVICES=N` for other sizes). Under `cargo test` it runs with 10 000 events
//! and 1 000 devices and short probes, as a smoke test.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
// A bench reads its sizes from the environment and may time against the real clock.
#![allow(clippy::disallowed_methods)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use gatehouse::audit::{self, AuditLog, Event, Origin};
use gatehouse::clock::{FixedClock, SharedClock};
use gatehouse::store::records::Device;
use gatehouse::store::seal::MasterKey;
use gatehouse::store::{DEVICES, Store, StoreError};

/// 2026-11-23T00:00:00Z, the bench's "now".
const NOW_MS: u64 = 1_795_392_000_000;
const BATCH: u64 = 1_000;
const PROBE_EVERY: Duration = Duration::from_millis(2);

fn measuring() -> bool {
    std::env::args().any(|a| a == "--bench")
}

fn count(var: &str, full: u64, smoke: u64) -> u64 {
    if !measuring() {
        return smoke;
    }
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(full)
}

fn device_id(n: u64) -> String {
    format!(
        "dev_{:032x}",
        u128::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15)
    )
}

/// Writes `count` rows, `BATCH` per write job, four jobs in flight; `row(tx, n)` writes
/// the n-th.
async fn fill(
    store: &Store,
    count: u64,
    row: fn(&gatehouse::store::WriteTx<'_>, u64) -> Result<(), StoreError>,
) {
    let mut jobs = tokio::task::JoinSet::new();
    let mut at = 0;
    while at < count {
        let end = (at + BATCH).min(count);
        let range = at..end;
        at = end;
        let store = store.clone();
        jobs.spawn(async move {
            store
                .write(move |tx| {
                    for n in range.clone() {
                        row(tx, n)?;
                    }
                    Ok::<_, StoreError>(())
                })
                .await
                .unwrap();
        });
        if jobs.len() >= 4 {
            jobs.join_next().await.unwrap().unwrap();
        }
    }
    jobs.join_all().await;
}

fn audit_row(tx: &gatehouse::store::WriteTx<'_>, n: u64) -> Result<(), StoreError> {
    let device = device_id(n % 100_000);
    let event = Event::new("token.refreshed")
        .device(&device)
        .detail("family", format!("fam_{n:032x}"))
        .detail("generation", n % 100);
    let origin = Origin::system().as_actor(audit::Actor::Device(device));
    audit::append(tx, &origin, &event, NOW_MS + n).map(|_| ())
}

fn device_row(tx: &gatehouse::store::WriteTx<'_>, n: u64) -> Result<(), StoreError> {
    let device = Device {
        name: format!("phone {n}"),
        platform: "ios".into(),
        app_version: "1.4.2".into(),
        created_at_ms: NOW_MS,
        last_seen_ms: NOW_MS,
        paired_from: "203.0.113.7".into(),
        pairing_session: format!("ps_{n:032x}"),
        revoked_at_ms: None,
    };
    tx.put(&DEVICES, &device_id(n), &device)
}

/// Latencies (µs) of `record` every `PROBE_EVERY` until `stop` is set.
async fn probe(audit: AuditLog, stop: Arc<AtomicBool>) -> Vec<u32> {
    let mut ticks = tokio::time::interval(PROBE_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut latencies = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        ticks.tick().await;
        let t = Instant::now();
        audit
            .record(&Origin::system(), Event::new("bench.probe"))
            .await
            .unwrap();
        latencies.push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
    }
    latencies
}

fn summary(mut latencies: Vec<u32>) -> String {
    latencies.sort_unstable();
    let at = |p: f64| {
        let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        f64::from(latencies[i]) / 1000.0
    };
    if latencies.is_empty() {
        return "no samples".into();
    }
    format!(
        "{} writes, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        latencies.len(),
        at(0.5),
        at(0.99),
        at(1.0)
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let events = count("BACKUP_EVENTS", 1_000_000, 10_000);
    let devices = count("BACKUP_DEVICES", 100_000, 1_000);
    let probe_for = if measuring() {
        Duration::from_secs(3)
    } else {
        Duration::from_millis(100)
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gatehouse.redb");
    let key = MasterKey::generate().unwrap();
    let clock: SharedClock = Arc::new(FixedClock::new(NOW_MS));
    let (store, _) = Store::open(&path, &key, clock.as_ref()).unwrap();
    let audit = AuditLog::new(
        store.clone(),
        clock.clone(),
        Duration::from_secs(90 * 86_400),
    );

    let t = Instant::now();
    fill(&store, events, audit_row).await;
    fill(&store, devices, device_row).await;
    let size = std::fs::metadata(&path).unwrap().len();
    println!(
        "filled {events} audit events and {devices} devices in {:.1} s; data file {:.1} MB",
        t.elapsed().as_secs_f64(),
        size as f64 / 1e6
    );

    let stop = Arc::new(AtomicBool::new(false));
    let alone = tokio::spawn(probe(audit.clone(), stop.clone()));
    tokio::time::sleep(probe_for).await;
    stop.store(true, Ordering::Relaxed);
    let alone = alone.await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let during = tokio::spawn(probe(audit.clone(), stop.clone()));
    let dest = dir.path().join("backup.redb");
    let store_for_backup = store.clone();
    let target = dest.clone();
    let t = Instant::now();
    let info =
        tokio::task::spawn_blocking(move || store_for_backup.backup_to(&target, &mut |_, _| {}))
            .await
            .unwrap()
            .unwrap();
    let took = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    let during = during.await.unwrap();
    println!(
        "backup: {} rows, {:.1} MB in {:.2} s ({:.1} MB/s), checked",
        info.rows(),
        info.bytes as f64 / 1e6,
        took.as_secs_f64(),
        info.bytes as f64 / 1e6 / took.as_secs_f64()
    );
    println!("durable write alone:        {}", summary(alone));
    println!("durable write during backup: {}", summary(during));
    assert_eq!(
        info.counts
            .iter()
            .find(|(t, _)| t == "devices.v1")
            .map(|(_, n)| *n),
        Some(devices)
    );
    store.close();
}
