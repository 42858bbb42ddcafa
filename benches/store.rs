//! Durable writes through the group-commit writer.
//!
//! `single` is one caller writing one record at a time: every write pays a full durable
//! commit. `concurrent/N` is N callers writing at once: the writer folds them into one
//! transaction per batch, so throughput should grow with N while each write stays durable
//! before its caller is answered. Run: `cargo bench --bench store`.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
// A bench reads its sizes from the environment and may time against the real clock.
#![allow(clippy::disallowed_methods)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use gatehouse::clock::FixedClock;
use gatehouse::store::Store;
use gatehouse::store::records::AdminToken;
use gatehouse::store::seal::MasterKey;

fn token() -> AdminToken {
    AdminToken {
        name: "bench".into(),
        secret_hash: [3; 32],
        created_at_ms: 1,
        last_used_at_ms: None,
        revoked_at_ms: None,
    }
}

fn writes(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let key = MasterKey::generate().unwrap();
    let (store, _) =
        Store::open(&dir.path().join("bench.redb"), &key, &FixedClock::new(1)).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let next = Arc::new(AtomicU64::new(0));

    let mut group = c.benchmark_group("durable_write");
    group.sample_size(20);
    group.throughput(Throughput::Elements(1));
    group.bench_function("single", |b| {
        b.to_async(&runtime).iter(|| {
            let store = store.clone();
            let id = format!("{:016x}", next.fetch_add(1, Ordering::Relaxed));
            async move {
                store
                    .write(move |tx| tx.put_admin_token(&id, &token()))
                    .await
                    .unwrap();
            }
        });
    });
    for callers in [8u64, 64] {
        group.throughput(Throughput::Elements(callers));
        group.bench_function(format!("concurrent/{callers}"), |b| {
            b.to_async(&runtime).iter(|| {
                let store = store.clone();
                let next = next.clone();
                async move {
                    let mut tasks = Vec::new();
                    for _ in 0..callers {
                        let store = store.clone();
                        let id = format!("{:016x}", next.fetch_add(1, Ordering::Relaxed));
                        tasks.push(tokio::spawn(async move {
                            store
                                .write(move |tx| tx.put_admin_token(&id, &token()))
                                .await
                                .unwrap();
                        }));
                    }
                    for task in tasks {
                        task.await.unwrap();
                    }
                }
            });
        });
    }
    group.finish();
    store.close();
}

criterion_group!(benches, writes);
criterion_main!(benches);
