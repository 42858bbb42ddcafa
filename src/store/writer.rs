//! The group-commit writer: one thread owns every write transaction.
//!
//! Callers hand in a job (a closure over a `WriteTx`) and wait for its answer. The
//! thread takes every job that is waiting, runs them in one transaction and commits
//! once (one fsync for the batch); each caller is answered only after that commit. If
//! one job of a batch fails, the transaction is aborted and the jobs are retried one per
//! transaction, so a bad job never takes others down with it and never leaves a partial
//! write. A job that panics is turned into an error rather than killing the writer.
//!
//! A rekey is a job of its own kind: it runs alone, and the sealer is swapped while the
//! sealer lock is held across its commit, so no reader ever pairs new bytes with an
//! old key or the reverse.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::audit_chain::ChainKey;
use super::seal::Sealer;
use super::tx::WriteTx;
use super::{StoreError, begin_durable_write, rekey_in};

/// Jobs waiting beyond this many are taken in the next batch.
const MAX_BATCH: usize = 512;
/// The longest a batch gathers jobs before committing, and how long it waits for the
/// next one: only when the previous batch held more than one job, so a lone writer
/// never waits. Without it, 64 writers that loop split into two half-size batches that
/// alternate; with it, one commit (about 300 µs with two-phase commit) serves them all.
const GATHER: Duration = Duration::from_micros(300);
const GATHER_IDLE: Duration = Duration::from_micros(60);
/// Bound on queued jobs: callers wait (asynchronously) rather than grow memory.
pub(super) const QUEUE_DEPTH: usize = 8192;

/// One caller's write, type-erased so jobs of different result types share a batch.
pub(super) trait PendingWrite: Send {
    /// Runs the job inside `tx`; false when the job failed (its error is kept).
    fn apply(&mut self, tx: &WriteTx<'_>) -> bool;
    /// Answers the caller: the job's own result, or `commit_error` if the commit failed.
    fn finish(self: Box<Self>, commit_error: Option<StoreError>);
}

pub(super) struct Pending<F, R, E> {
    job: F,
    outcome: Option<Result<R, E>>,
    reply: oneshot::Sender<Result<R, E>>,
}

impl<F, R, E> Pending<F, R, E> {
    pub(super) fn new(job: F, reply: oneshot::Sender<Result<R, E>>) -> Self {
        Self {
            job,
            outcome: None,
            reply,
        }
    }
}

impl<F, R, E> PendingWrite for Pending<F, R, E>
where
    F: FnMut(&WriteTx<'_>) -> Result<R, E> + Send,
    R: Send,
    E: From<StoreError> + Send,
{
    fn apply(&mut self, tx: &WriteTx<'_>) -> bool {
        let outcome = match catch_unwind(AssertUnwindSafe(|| (self.job)(tx))) {
            Ok(outcome) => outcome,
            Err(_) => Err(E::from(StoreError::JobPanicked)),
        };
        let ok = outcome.is_ok();
        self.outcome = Some(outcome);
        ok
    }

    fn finish(self: Box<Self>, commit_error: Option<StoreError>) {
        let answer = match (commit_error, self.outcome) {
            (Some(err), _) => Err(E::from(err)),
            (None, Some(outcome)) => outcome,
            (None, None) => Err(E::from(StoreError::WriterStopped)),
        };
        // The caller may have given up waiting (its future dropped); nothing to do then.
        let _ = self.reply.send(answer);
    }
}

pub(super) enum Job {
    Write(Box<dyn PendingWrite>),
    Rekey {
        new_sealer: Arc<Sealer>,
        reply: oneshot::Sender<Result<u64, StoreError>>,
    },
}

pub(super) struct WriterContext {
    pub db: Arc<redb::Database>,
    pub sealer: Arc<RwLock<Arc<Sealer>>>,
    /// Cleared when a commit fails: redb refuses further writes after an I/O error, and
    /// `/readyz` must say so.
    pub healthy: Arc<AtomicBool>,
    pub chain: Arc<ChainKey>,
}

pub(super) fn run(ctx: WriterContext, mut jobs: mpsc::Receiver<Job>) {
    let mut batch: Vec<Box<dyn PendingWrite>> = Vec::new();
    // Whether the last batch held more than one job: under concurrent load the callers
    // it answered come back at once, so the next batch gathers them before committing.
    let mut concurrent = false;
    while let Some(first) = jobs.blocking_recv() {
        let mut next = Some(first);
        let started = Instant::now();
        let mut last_arrival = started;
        loop {
            while let Some(job) = next.take() {
                last_arrival = Instant::now();
                match job {
                    Job::Write(write) => batch.push(write),
                    Job::Rekey { new_sealer, reply } => {
                        // Everything queued before the rekey commits under the old key first.
                        commit_batch(&ctx, std::mem::take(&mut batch));
                        let _ = reply.send(run_rekey(&ctx, new_sealer));
                    }
                }
                if batch.len() < MAX_BATCH {
                    next = jobs.try_recv().ok();
                }
            }
            let now = Instant::now();
            let gathering = concurrent
                && batch.len() < MAX_BATCH
                && now.duration_since(started) < GATHER
                && now.duration_since(last_arrival) < GATHER_IDLE;
            if !gathering {
                break;
            }
            std::thread::yield_now();
            next = jobs.try_recv().ok();
        }
        concurrent = batch.len() > 1;
        commit_batch(&ctx, std::mem::take(&mut batch));
    }
}

fn current_sealer(ctx: &WriterContext) -> Arc<Sealer> {
    // A poisoned lock only means a reader panicked while holding it; the Arc inside is
    // still whole, so keep going with it.
    match ctx.sealer.read() {
        Ok(guard) => guard.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    }
}

fn commit_batch(ctx: &WriterContext, mut batch: Vec<Box<dyn PendingWrite>>) {
    if batch.is_empty() {
        return;
    }
    let sealer = current_sealer(ctx);
    let attempt = (|| -> Result<bool, StoreError> {
        let tx = begin_durable_write(&ctx.db)?;
        let all_ok = {
            let wtx = WriteTx::new(&tx, &sealer, &ctx.chain);
            batch.iter_mut().all(|job| job.apply(&wtx))
        };
        if !all_ok {
            tx.abort()?;
            return Ok(false);
        }
        tx.commit()?;
        Ok(true)
    })();
    match attempt {
        Ok(true) => batch.into_iter().for_each(|job| job.finish(None)),
        Ok(false) if batch.len() == 1 => batch.into_iter().for_each(|job| job.finish(None)),
        Ok(false) => {
            for job in batch {
                commit_batch(ctx, vec![job]);
            }
        }
        Err(err) => {
            tracing::error!(error = %err, jobs = batch.len(), "write transaction failed");
            if matches!(err, StoreError::Database(_)) {
                ctx.healthy.store(false, Ordering::SeqCst);
            }
            let message = err.to_string();
            for job in batch {
                job.finish(Some(StoreError::WriteFailed(message.clone())));
            }
        }
    }
}

fn run_rekey(ctx: &WriterContext, new_sealer: Arc<Sealer>) -> Result<u64, StoreError> {
    let old = current_sealer(ctx);
    let tx = begin_durable_write(&ctx.db)?;
    let count = match rekey_in(&tx, &old, &new_sealer) {
        Ok(count) => count,
        Err(err) => {
            tx.abort()?;
            return Err(err);
        }
    };
    // Hold the sealer lock across the commit: readers see old bytes with the old key or
    // new bytes with the new key, never a mix.
    let mut guard = match ctx.sealer.write() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    };
    tx.commit()?;
    *guard = new_sealer;
    Ok(count)
}
