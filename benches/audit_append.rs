//! Durable audit appends through the group-commit writer.
//!
//! `AuditLog::record` appends one event in a write job of its own and answers once the
//! transaction holding it is durable. Two ways of calling it, measured in the same run on
//! the same data file:
//!
//! - `one_per_commit`: a single task awaits each `record` before the next, so every
//!   commit holds exactly one event (what a log without group commit would do);
//! - `concurrent/64`: 64 tokio tasks, each awaiting `record` in a loop; the writer folds
//!   whatever is waiting into one transaction and one durable commit.
//!
//! The two alternate for `ROUNDS` rounds (so background load on this 2-core machine hits
//! both alike) and the run prints durable events per second for each round with the bytes
//! the process wrote to the disk per event (`/proc/self/io`), the medians and their ratio,
//! and the latency of one `record` as a concurrent writer sees it. At the end it checks
//! that the log holds exactly the events that were answered and that the whole chain
//! verifies. About 25 s. Run: `cargo bench --bench audit_append`
//! (`AUDIT_APPEND_WRITERS=N` for another number of concurrent writers). Under `cargo test`
//! (no `--bench` argument) each phase runs for a few milliseconds.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
// A bench reads its sizes from the environment and may time against the real clock.
#![allow(clippy::disallowed_methods)]

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use gatehouse::audit::{Actor, AuditLog, Event, Origin};
use gatehouse::clock::{FixedClock, SharedClock};
use gatehouse::store::Store;
use gatehouse::store::seal::MasterKey;

/// Concurrent writers in the group-commit phase (`AUDIT_APPEND_WRITERS` overrides).
const WRITERS: usize = 64;
/// Alternations of the two phases.
const ROUNDS: usize = 3;

fn measuring() -> bool {
    std::env::args().any(|a| a == "--bench")
}

/// A realistic event: what a refresh writes (device actor, source address, request id,
/// two details), about 270 bytes stored with its tag.
fn event(writer: usize, n: u64) -> (Origin, Event) {
    let device = format!("dev_{:032x}", (writer as u128) << 64 | u128::from(n));
    let origin = Origin::request(
        IpAddr::from([10, 0, (writer >> 8) as u8, writer as u8]),
        Some(format!("{:016x}", n)),
    )
    .as_actor(Actor::Device(device.clone()));
    let event = Event::new("token.refreshed")
        .device(&device)
        .detail("family", format!("fam_{:032x}", n))
        .detail("generation", n);
    (origin, event)
}

/// What one phase measured.
struct Phase {
    /// Events answered before the clock stopped (the rate's numerator).
    events: u64,
    elapsed: Duration,
    /// Every event answered, including the writes in flight when the clock stopped.
    answered: u64,
    /// Latency of each `record`, in microseconds (concurrent phase only).
    latencies_us: Vec<u32>,
    /// Bytes written to the disk during the phase.
    written: u64,
}

impl Phase {
    fn per_second(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64()
    }

    /// KiB written to the disk per event answered.
    fn kib_per_event(&self) -> f64 {
        self.written as f64 / 1024.0 / self.answered.max(1) as f64
    }
}

/// `writers` tasks, each awaiting `record` in a loop for `duration`.
async fn run(audit: &AuditLog, writers: usize, duration: Duration, keep_latency: bool) -> Phase {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    let written_before = written_bytes();
    let start = Instant::now();
    for w in 0..writers {
        let (audit, stop, done) = (audit.clone(), stop.clone(), done.clone());
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let (origin, event) = event(w, n);
                let t = Instant::now();
                audit.record(&origin, event).await.unwrap();
                if keep_latency {
                    latencies.push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
                }
                n += 1;
                done.fetch_add(1, Ordering::Relaxed);
            }
            (n, latencies)
        });
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    // Events answered until now count; the writes still in flight finish (and are in the
    // log) but are left out of the rate, which slightly understates it.
    let events = done.load(Ordering::Relaxed);
    let elapsed = start.elapsed();
    let mut latencies_us = Vec::new();
    let mut answered = 0;
    while let Some(finished) = tasks.join_next().await {
        let (n, latencies) = finished.unwrap();
        answered += n;
        latencies_us.extend(latencies);
    }
    Phase {
        events,
        elapsed,
        answered,
        latencies_us,
        written: written_bytes() - written_before,
    }
}

/// Bytes this process has caused to be written to the disk so far (`/proc/self/io`).
fn written_bytes() -> u64 {
    let io = std::fs::read_to_string("/proc/self/io").unwrap_or_default();
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let at = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[at]
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let benching = measuring();
    let writers: usize = std::env::var("AUDIT_APPEND_WRITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(WRITERS);
    let (single_for, concurrent_for, warm_up) = if benching {
        (
            Duration::from_secs(3),
            Duration::from_secs(4),
            Duration::from_secs(1),
        )
    } else {
        (
            Duration::from_millis(20),
            Duration::from_millis(20),
            Duration::from_millis(5),
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.redb");
    let key = MasterKey::generate().unwrap();
    let clock = Arc::new(FixedClock::new(1_795_392_000_000));
    let (store, _) = Store::open(&path, &key, &*clock).unwrap();
    let shared: SharedClock = clock;
    let audit = AuditLog::new(store.clone(), shared, Duration::from_secs(90 * 86_400));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    println!(
        "audit_append: {} worker threads, data file in {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        dir.path().display()
    );

    let mut answered = 0u64;
    let mut single_rates = Vec::new();
    let mut concurrent_rates = Vec::new();
    let mut latencies = Vec::new();
    runtime.block_on(async {
        answered += run(&audit, writers, warm_up, false).await.answered;
        for round in 1..=ROUNDS {
            let single = run(&audit, 1, single_for, false).await;
            let concurrent = run(&audit, writers, concurrent_for, true).await;
            println!(
                "round {round}: one_per_commit {:>7.0} events/s ({} in {:.2} s, {:.0} µs and \
                 {:.1} KiB written each); concurrent/{writers} {:>7.0} events/s ({} in {:.2} s, \
                 {:.1} KiB written each)",
                single.per_second(),
                single.events,
                single.elapsed.as_secs_f64(),
                1e6 / single.per_second(),
                single.kib_per_event(),
                concurrent.per_second(),
                concurrent.events,
                concurrent.elapsed.as_secs_f64(),
                concurrent.kib_per_event(),
            );
            single_rates.push(single.per_second());
            concurrent_rates.push(concurrent.per_second());
            latencies.extend(concurrent.latencies_us.iter().copied());
            answered += single.answered + concurrent.answered;
        }
    });

    // Every answered write is in the log, and nothing else is (a new file has no events).
    let stored = store.read(|tx| tx.audit_len()).unwrap();
    assert_eq!(stored, answered, "events in the log vs events answered");
    let report = audit.verify(&mut |_, _| {}).unwrap();
    assert!(report.broken.is_none(), "chain broken: {:?}", report.broken);
    assert_eq!(report.records, stored);
    store.close();

    latencies.sort_unstable();
    let single = median(single_rates);
    let concurrent = median(concurrent_rates);
    println!();
    if !benching {
        println!(
            "audit_append: test mode, {stored} events written and verified; figures not meaningful"
        );
        return;
    }
    println!("medians over {ROUNDS} rounds:");
    println!(
        "  one_per_commit   {single:>9.0} durable events/s ({:.0} µs per event)",
        1e6 / single
    );
    println!("  concurrent/{writers}    {concurrent:>9.0} durable events/s (target >= 100000)");
    println!("  ratio            {:>9.1}x", concurrent / single);
    println!(
        "  record() latency under concurrent/{writers}: p50 {} µs, p99 {} µs, max {} µs ({} samples)",
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or(0),
        latencies.len()
    );
    println!("  {stored} events in the log, every one answered; the chain verifies");
}
