//! A rate-limit decision in the hot path: `RateTable::check` for a subject already
//! tracked (the common case), on one thread and on two threads at once with different
//! subjects. Target: 50 ns or less uncontended. Run: `cargo bench --bench ratelimit`.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
// A bench reads its sizes from the environment and may time against the real clock.
#![allow(clippy::disallowed_methods)]

use std::hint::black_box;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use gatehouse::ratelimit::{Policy, RateTable, Subject};

fn decisions(c: &mut Criterion) {
    // A generous policy, so that every decision admits and updates the entry.
    let policy = Policy::new("bench", 1_000_000_000, Duration::from_secs(60));
    let table = Arc::new(RateTable::new(100_000));
    let subjects: Vec<Subject> = (0..1024u32)
        .map(|i| Subject::ip(IpAddr::from((0x0a00_0000 + i).to_be_bytes())))
        .collect();
    for s in &subjects {
        table.check(0, &policy, s, 0);
    }
    let mut group = c.benchmark_group("ratelimit");
    group.throughput(Throughput::Elements(1));
    let mut i = 0usize;
    let mut now = 1u64;
    group.bench_function("check/one_thread", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            now += 1;
            black_box(table.check(0, &policy, &subjects[i], now))
        });
    });
    // Two threads, each on its own subjects, deciding as fast as they can: the time per
    // decision as each thread sees it.
    group.bench_function("check/two_threads", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            std::thread::scope(|scope| {
                for t in 0..2usize {
                    let (table, policy, subjects) = (&table, &policy, &subjects);
                    scope.spawn(move || {
                        for n in 0..iters {
                            let k = (t * 512 + (n as usize & 511)) & 1023;
                            black_box(table.check(0, policy, &subjects[k], n + 1));
                        }
                    });
                }
            });
            start.elapsed()
        });
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(4)).sample_size(30);
    targets = decisions
}
criterion_main!(benches);
