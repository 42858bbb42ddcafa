//! The group-commit writer: one thread owns every write transaction.
//!
//! Callers hand in a job (a closure over a `WriteTx`) and wait for its answer. The
//! thread opens a transaction when a job arrives, runs that job and every job that
//! follows while the batch gathers, and commits once (one durable commit for the
//! batch); each caller is answered only after that commit. If one job of a batch fails,
//! the transaction is aborted and the jobs are retried one per transaction, so a bad
//! job never takes others down with it and never leaves a partial write. A job that
//! panics is turned into an error rather than killing the writer.
//!
//! A batch gathers only when the previous one held more than one job: it waits for as
//! many jobs as the previous batch answered plus those that queued during its commit,
//! for at most `GATHER`, and never longer than `GATHER_IDLE` after the last arrival. A
//! lone writer never waits. While it waits the thread sleeps, so the callers it has
//! just answered have both cores to build their next jobs.
//!
//! A rekey is a job of its own kind: it runs alone, and the sealer is swapped while the
//! sealer lock is held across its commit, so no reader ever pairs new bytes with an
//! old key or the reverse.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, oneshot};

use super::audit_chain::ChainKey;
use super::pg::Postgres;
use super::redb_rows::RedbWrite;
use super::rows::RowsMut;
use super::seal::Sealer;
use super::tx::WriteTx;
use super::{StoreError, begin_durable_write, rekey_in};

/// Jobs waiting beyond this many are taken in the next batch.
const MAX_BATCH: usize = 512;
/// The longest a batch gathers jobs before committing, and how long it waits for the
/// next one (see the module docs). Without gathering, 64 writers that loop split into
/// two half-size batches that alternate; with it, one commit (about 500 µs for 64
/// events with two-phase commit and quick repair) serves them all.
const GATHER: Duration = Duration::from_micros(300);
const GATHER_IDLE: Duration = Duration::from_micros(60);
/// Bound on queued jobs: callers wait (asynchronously) rather than grow memory.
pub(super) const QUEUE_DEPTH: usize = 8192;
/// How often a batch that lost a race with another node's transaction is run again
/// before its callers are told the write failed.
const CONFLICT_RETRIES: u32 = 32;

/// Where the writer commits.
pub(super) enum Target {
    Redb(Arc<redb::Database>),
    Postgres(Arc<Postgres>),
}

impl Target {
    /// Runs `f` in one durable write transaction; commits when it answers true, rolls
    /// back when it answers false. `StoreError::Conflict` means the transaction lost a
    /// race with another node's and was rolled back: run it again.
    fn transact(&self, f: &mut dyn FnMut(&dyn RowsMut) -> bool) -> Result<bool, StoreError> {
        match self {
            Self::Redb(db) => {
                let tx = begin_durable_write(db)?;
                let keep = {
                    let rows = RedbWrite::new(&tx);
                    f(&rows)
                };
                if keep {
                    tx.commit()?;
                } else {
                    tx.abort()?;
                }
                Ok(keep)
            }
            Self::Postgres(db) => db.transact(f),
        }
    }
}

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
    pub target: Target,
    pub sealer: Arc<RwLock<Arc<Sealer>>>,
    /// Cleared when the engine fails a commit (redb refuses further writes after an I/O
    /// error), set again by the next commit: `/readyz` says so.
    pub healthy: Arc<AtomicBool>,
    pub chain: Arc<ChainKey>,
    /// Write transactions committed since the store opened (`Store::commits`).
    pub commits: Arc<AtomicU64>,
}

pub(super) fn run(ctx: WriterContext, mut jobs: mpsc::Receiver<Job>) {
    // How many jobs the next batch waits for: the size of the last batch (its callers
    // come back once answered) and the jobs that queued up while it committed.
    let mut expected = 0;
    let mut next = None;
    loop {
        let Some(job) = next.take().or_else(|| jobs.blocking_recv()) else {
            break;
        };
        match job {
            Job::Rekey { new_sealer, reply } => {
                let _ = reply.send(run_rekey(&ctx, new_sealer));
                expected = 0;
            }
            Job::Write(first) => {
                let (size, waiting, rekey) = run_batch(&ctx, &mut jobs, first, expected);
                expected = size + waiting;
                next = rekey;
            }
        }
    }
}

/// Runs `first` and the jobs that follow it in one transaction, applying each as it
/// arrives, and commits once. Returns the number of jobs committed, the number waiting
/// when the commit was done, and a rekey that ended the gathering (to run next).
fn run_batch(
    ctx: &WriterContext,
    jobs: &mut mpsc::Receiver<Job>,
    first: Box<dyn PendingWrite>,
    expected: usize,
) -> (usize, usize, Option<Job>) {
    let mut batch = vec![first];
    let mut rekey = None;
    let sealer = current_sealer(ctx);
    let attempt = ctx.target.transact(&mut |rows| {
        let wtx = WriteTx::new(rows, &sealer, &ctx.chain);
        let mut all_ok = batch[0].apply(&wtx);
        let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
        let mut cx = Context::from_waker(&waker);
        let started = Instant::now();
        let mut last_arrival = started;
        while all_ok && batch.len() < MAX_BATCH {
            let job = match jobs.try_recv() {
                Ok(job) => job,
                Err(TryRecvError::Disconnected) => break,
                Err(TryRecvError::Empty) => {
                    let now = Instant::now();
                    let deadline = (started + GATHER).min(last_arrival + GATHER_IDLE);
                    if batch.len() >= expected || now >= deadline {
                        break;
                    }
                    // Sleep until a job is sent or the deadline passes, leaving the
                    // core to the callers that are about to send theirs.
                    match jobs.poll_recv(&mut cx) {
                        Poll::Ready(Some(job)) => job,
                        Poll::Ready(None) => break,
                        Poll::Pending => {
                            std::thread::park_timeout(deadline - now);
                            continue;
                        }
                    }
                }
            };
            match job {
                Job::Write(mut write) => {
                    all_ok = write.apply(&wtx);
                    batch.push(write);
                    last_arrival = Instant::now();
                }
                Job::Rekey { .. } => {
                    rekey = Some(job);
                    break;
                }
            }
        }
        all_ok
    });
    let waiting = jobs.len();
    let size = batch.len();
    finish_batch(ctx, batch, attempt);
    (size, waiting, rekey)
}

/// Wakes the writer thread when a job is sent while it waits in `park_timeout`.
struct Unpark(std::thread::Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
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

fn commit_batch(ctx: &WriterContext, mut batch: Vec<Box<dyn PendingWrite>>, conflicts: u32) {
    let sealer = current_sealer(ctx);
    let attempt = ctx.target.transact(&mut |rows| {
        let wtx = WriteTx::new(rows, &sealer, &ctx.chain);
        batch.iter_mut().all(|job| job.apply(&wtx))
    });
    finish_batch_after(ctx, batch, attempt, conflicts);
}

/// Answers every job of a batch after its transaction ended with `attempt`: each its
/// own result after a commit; after an abort (a job failed), each retried alone.
fn finish_batch(
    ctx: &WriterContext,
    batch: Vec<Box<dyn PendingWrite>>,
    attempt: Result<bool, StoreError>,
) {
    finish_batch_after(ctx, batch, attempt, 0);
}

/// `finish_batch` for a batch that has already lost `conflicts` races: one that loses
/// again runs again whole, after a pause that grows with each loss, so that the nodes
/// racing for the same rows take turns.
fn finish_batch_after(
    ctx: &WriterContext,
    batch: Vec<Box<dyn PendingWrite>>,
    attempt: Result<bool, StoreError>,
    conflicts: u32,
) {
    match attempt {
        Err(StoreError::Conflict) if conflicts < CONFLICT_RETRIES => {
            let pause = 50u64 << conflicts.min(8);
            std::thread::sleep(Duration::from_micros(pause + ring_jitter(pause)));
            // Halved each time it loses: a long batch that overlaps every other node's
            // commits would lose again, its halves are shorter and lose less often.
            let mut batch = batch;
            if batch.len() > 1 {
                let second = batch.split_off(batch.len() / 2);
                commit_batch(ctx, batch, conflicts + 1);
                commit_batch(ctx, second, conflicts + 1);
            } else {
                commit_batch(ctx, batch, conflicts + 1);
            }
        }
        Ok(true) => {
            ctx.healthy.store(true, Ordering::SeqCst);
            ctx.commits.fetch_add(1, Ordering::SeqCst);
            batch.into_iter().for_each(|job| job.finish(None));
        }
        Ok(false) if batch.len() == 1 => batch.into_iter().for_each(|job| job.finish(None)),
        Ok(false) => {
            for job in batch {
                commit_batch(ctx, vec![job], conflicts);
            }
        }
        Err(err) => {
            tracing::error!(error = %err, jobs = batch.len(), "write transaction failed");
            // An engine failure leaves the store unwritable (redb refuses writes after an
            // I/O error). A database out of reach is not marked: readiness reads it each
            // time, and a node must be ready again as soon as the database is back, not
            // only after its next write.
            if matches!(err, StoreError::Database(_)) {
                ctx.healthy.store(false, Ordering::SeqCst);
            }
            let message = err.to_string();
            for job in batch {
                // An unreachable database keeps its kind: callers answer 503, not 500.
                let answer = match &err {
                    StoreError::Unreachable { location, reason } => StoreError::Unreachable {
                        location: location.clone(),
                        reason: reason.clone(),
                    },
                    // Lost every race: the caller may try again (503), nothing was written.
                    StoreError::Conflict => StoreError::Conflict,
                    _ => StoreError::WriteFailed(message.clone()),
                };
                job.finish(Some(answer));
            }
        }
    }
}

fn run_rekey(ctx: &WriterContext, new_sealer: Arc<Sealer>) -> Result<u64, StoreError> {
    let old = current_sealer(ctx);
    // Readers wait while the rekey runs, and see old bytes with the old key or new
    // bytes with the new key, never a mix.
    let mut guard = match ctx.sealer.write() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    };
    let mut outcome = Ok(0);
    let mut conflicts = 0;
    loop {
        let committed = ctx.target.transact(&mut |rows| {
            outcome = rekey_in(rows, &old, &new_sealer);
            outcome.is_ok()
        });
        match committed {
            Err(StoreError::Conflict) if conflicts < CONFLICT_RETRIES => conflicts += 1,
            Err(err) => return Err(err),
            Ok(false) => return outcome,
            Ok(true) => break,
        }
    }
    ctx.commits.fetch_add(1, Ordering::SeqCst);
    *guard = new_sealer;
    outcome
}

/// A pseudo-random part of `pause` (up to half of it), so that racing nodes do not
/// retry in step.
fn ring_jitter(pause: u64) -> u64 {
    let mut byte = [0u8; 2];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut byte);
    u64::from(u16::from_le_bytes(byte)) % (pause / 2 + 1)
}
