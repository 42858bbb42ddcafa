//! Pruning a large audit log while other writes go on.
//!
//! 1. Fills a new data file with 1 000 000 audit events dated 120 to 100 days ago (older
//!    than the 90-day retention), 1 000 per write job through `audit::append`, then 10 000
//!    recent ones that must survive. Records the file's size.
//! 2. Measures small durable writes alone: `AuditLog::record` every 2 ms for 3 s.
//! 3. Runs `AuditLog::prune()` (`PRUNE_CHUNK` events per transaction) while the same probe
//!    keeps writing, and reports the prune's total time and the probe's latency (p50, p99,
//!    max) beside step 2's.
//! 4. Records the file's size after pruning, after 500 000 new events are appended (the
//!    pages pruning freed are reused), after the store is closed, and after an offline
//!    `redb::Database::compact()` of the closed file (which gatehouse never runs itself);
//!    then reopens the compacted file as a store and verifies the audit chain.
//!
//! About 45 s. Run: `cargo bench --bench audit_prune` (`PRUNE_EVENTS=N` for another
//! count). Under `cargo test` it runs with 12 000 old events and short probes.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
// A bench reads its sizes from the environment and may time against the real clock.
#![allow(clippy::disallowed_methods)]

use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use gatehouse::audit::{self, Actor, AuditLog, Event, Origin, PRUNE_CHUNK};
use gatehouse::clock::{FixedClock, SharedClock};
use gatehouse::store::seal::MasterKey;
use gatehouse::store::{Store, StoreError};

/// 2026-11-23T00:00:00Z, the bench's "now".
const NOW_MS: u64 = 1_795_392_000_000;
const DAY_MS: u64 = 86_400_000;
const RETENTION_DAYS: u64 = 90;
/// Events per write job while filling.
const FILL_BATCH: u64 = 1_000;
/// Recent events written after the old ones: pruning must keep them.
const RECENT: u64 = 10_000;
/// How often the probe writes.
const PROBE_EVERY: Duration = Duration::from_millis(2);

fn measuring() -> bool {
    std::env::args().any(|a| a == "--bench")
}

/// The same event shape as `benches/audit_append.rs`: a refresh by a device.
fn event(n: u64) -> (Origin, Event) {
    let device = format!(
        "dev_{:032x}",
        u128::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15)
    );
    let origin = Origin::request(
        IpAddr::from([10, 0, (n >> 8) as u8, n as u8]),
        Some(format!("{n:016x}")),
    )
    .as_actor(Actor::Device(device.clone()));
    let event = Event::new("token.refreshed")
        .device(&device)
        .detail("family", format!("fam_{n:032x}"))
        .detail("generation", n % 100);
    (origin, event)
}

/// Appends events `first..first + count`, the n-th dated `time(n)`, `FILL_BATCH` per write
/// job with up to four jobs in flight.
async fn fill(store: &Store, first: u64, count: u64, time: impl Fn(u64) -> u64) {
    let mut jobs = tokio::task::JoinSet::new();
    let mut at = first;
    while at < first + count {
        let end = (at + FILL_BATCH).min(first + count);
        let batch: Vec<(Origin, Event, u64)> = (at..end)
            .map(|n| {
                let (origin, event) = event(n);
                (origin, event, time(n))
            })
            .collect();
        at = end;
        let store = store.clone();
        jobs.spawn(async move {
            store
                .write(move |tx| {
                    for (origin, event, time_ms) in &batch {
                        audit::append(tx, origin, event, *time_ms)?;
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

/// Latencies (µs) of `record` every `PROBE_EVERY` until `stop` is set.
async fn probe(audit: AuditLog, stop: Arc<AtomicBool>) -> Vec<u32> {
    let mut ticks = tokio::time::interval(PROBE_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut latencies = Vec::new();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        ticks.tick().await;
        let (origin, event) = event(u64::MAX / 2 + n);
        let t = Instant::now();
        audit.record(&origin, event).await.unwrap();
        latencies.push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
        n += 1;
    }
    latencies
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let at = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[at]
}

fn latency_line(label: &str, mut latencies: Vec<u32>) -> String {
    latencies.sort_unstable();
    let ms = |us: u32| f64::from(us) / 1000.0;
    format!(
        "{label}: {} writes, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        latencies.len(),
        ms(percentile(&latencies, 0.50)),
        ms(percentile(&latencies, 0.99)),
        ms(latencies.last().copied().unwrap_or(0)),
    )
}

/// The file's length and the space it occupies on disk, in MiB.
fn size(path: &Path) -> String {
    let meta = std::fs::metadata(path).unwrap();
    format!(
        "{:.1} MiB (on disk {:.1} MiB)",
        meta.len() as f64 / 1048576.0,
        (meta.blocks() * 512) as f64 / 1048576.0
    )
}

fn main() {
    let benching = measuring();
    let old: u64 = if benching {
        std::env::var("PRUNE_EVENTS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1_000_000)
    } else {
        12_000
    };
    let (recent, refill, baseline_for) = if benching {
        (RECENT, 500_000, Duration::from_secs(3))
    } else {
        (100, 2_000, Duration::from_millis(50))
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.redb");
    let key = MasterKey::generate().unwrap();
    let clock = Arc::new(FixedClock::new(NOW_MS));
    let (store, _) = Store::open(&path, &key, &*clock).unwrap();
    let shared: SharedClock = clock.clone();
    let audit = AuditLog::new(
        store.clone(),
        shared,
        Duration::from_secs(RETENTION_DAYS * 86_400),
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    println!("audit_prune: data file {}", path.display());

    // 1. The old events, spread over 20 days ending 100 days ago, then recent ones.
    let started = Instant::now();
    let oldest = NOW_MS - 120 * DAY_MS;
    let step = (20 * DAY_MS) / old.max(1);
    runtime.block_on(fill(&store, 0, old, |n| oldest + n * step));
    runtime.block_on(fill(&store, old, recent, |_| NOW_MS - DAY_MS));
    let filled = started.elapsed();
    println!(
        "filled: {old} old + {recent} recent events in {:.1} s ({:.0} events/s); file {}",
        filled.as_secs_f64(),
        (old + recent) as f64 / filled.as_secs_f64(),
        size(&path)
    );

    // 2. The probe alone.
    let baseline = runtime.block_on(async {
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(probe(audit.clone(), stop.clone()));
        tokio::time::sleep(baseline_for).await;
        stop.store(true, Ordering::Relaxed);
        task.await.unwrap()
    });

    // 3. Prune with the probe running.
    let (summary, prune_time, during) = runtime.block_on(async {
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(probe(audit.clone(), stop.clone()));
        // Let the probe start before the prune does.
        tokio::time::sleep(PROBE_EVERY * 2).await;
        let t = Instant::now();
        let summary = audit.prune().await.unwrap();
        let prune_time = t.elapsed();
        stop.store(true, Ordering::Relaxed);
        (summary, prune_time, task.await.unwrap())
    });
    assert_eq!(summary.removed, old, "every old event pruned");
    println!(
        "prune: removed {} events in {} transactions of at most {PRUNE_CHUNK} in {:.2} s \
         ({:.0} events/s, {:.1} ms per transaction)",
        summary.removed,
        summary.chunks,
        prune_time.as_secs_f64(),
        summary.removed as f64 / prune_time.as_secs_f64(),
        prune_time.as_secs_f64() * 1000.0 / summary.chunks as f64,
    );
    println!("  {}", latency_line("probe before pruning", baseline));
    println!("  {}", latency_line("probe during pruning", during));
    println!("file after pruning (still open): {}", size(&path));

    // 4. Reuse of the freed pages, then close and compact.
    let t = Instant::now();
    runtime.block_on(fill(&store, old + recent, refill, |_| NOW_MS));
    println!(
        "after appending {refill} new events ({:.1} s): file {}",
        t.elapsed().as_secs_f64(),
        size(&path)
    );
    let kept = store.read(|tx| tx.audit_len()).unwrap();
    store.close();
    drop((audit, store));
    println!("after closing the store: file {}", size(&path));
    let t = Instant::now();
    {
        let mut db = redb::Database::open(&path).unwrap();
        db.compact().unwrap();
    }
    println!(
        "after redb::Database::compact() of the closed file ({:.1} s): file {}",
        t.elapsed().as_secs_f64(),
        size(&path)
    );

    // The compacted file is still a valid data file and the chain still verifies.
    let (store, _) = Store::open(&path, &key, &*clock).unwrap();
    let report = store.read(|tx| tx.audit_verify(&mut |_, _| {})).unwrap();
    assert!(report.broken.is_none(), "chain broken: {:?}", report.broken);
    assert_eq!(report.records, kept);
    store.close();
    println!(
        "reopened after compaction: {} events, chain verified (checkpoint: {} pruned)",
        report.records,
        report.checkpoint.map_or(0, |cp| cp.pruned)
    );
    if !benching {
        println!("audit_prune: test mode, figures not meaningful");
    }
}
