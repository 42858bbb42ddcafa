//! Background work of a running server, in one loop: writing what is kept in memory
//! (rate-limit windows, devices' last-seen times, coalesced refusals), folding the
//! revocation journal, renewing the self-signed certificate, binding the other nodes'
//! audit chains, and running the scheduled jobs. Each piece of work calls one domain service; this module only decides when.

use std::sync::Arc;

use crate::audit::{AuditLog, Event, Origin, Severity};
use crate::clock::SharedClock;
use crate::config::JobName;
use crate::devices::Devices;
use crate::ratelimit::RateLimits;
use crate::revocation::RevocationList;
use crate::store::Store;
use crate::tls::{self, Tls};

use super::Scheduler;

/// What the background loop works on.
#[derive(Debug, Clone)]
pub(crate) struct Background {
    pub(crate) jobs: Arc<Scheduler>,
    pub(crate) devices: Devices,
    pub(crate) limits: Arc<RateLimits>,
    pub(crate) audit: AuditLog,
    pub(crate) revocations: Arc<RevocationList>,
    pub(crate) store: Store,
    pub(crate) clock: SharedClock,
    /// What the listener serves (none with TLS off).
    pub(crate) tls: Option<Arc<Tls>>,
    /// `audit.checkpoint_every`.
    pub(crate) checkpoint_every: std::time::Duration,
}

/// How often the scheduler looks for due jobs.
const JOBS_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
/// How often devices' last-seen times are written.
const LAST_SEEN_EVERY: std::time::Duration = std::time::Duration::from_secs(5);
/// How often changed rate-limit windows are written.
const LIMITS_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
/// How often refused requests are written to the audit log, one record per policy and
/// subject.
const REFUSALS_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Background work: writes changed rate-limit windows every second and devices'
/// last-seen times every few seconds (both once more at stop), writes coalesced
/// rate-limit refusals every minute, folds the revocation journal when it is due, and
/// runs the scheduled jobs (first those missed while stopped). Jobs and folds run in
/// their own tasks, so a long backup never delays a flush.
pub(crate) async fn run_background(
    work: Background,
    missed: Vec<JobName>,
    stopped: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stopped);
    let mut jobs = tokio::time::interval(JOBS_EVERY);
    jobs.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pending = Some(missed);
    let mut running_jobs = tokio::task::JoinSet::new();
    let mut last_seen = tokio::time::interval(LAST_SEEN_EVERY);
    last_seen.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut limits = tokio::time::interval(LIMITS_EVERY);
    limits.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut refusals = tokio::time::interval(REFUSALS_EVERY);
    refusals.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut refusals_since = work.clock.now_ms();
    // The leader of nodes sharing a database binds the other nodes' audit chains with a
    // checkpoint record (when any moved): a chain cut short before it fails verification.
    let mut checkpoints = tokio::time::interval(work.checkpoint_every);
    checkpoints.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut bound = std::collections::HashMap::new();
    loop {
        tokio::select! {
            biased;
            () = &mut stopped => {
                // A running job finishes (its write is durable) before the store closes.
                while running_jobs.join_next().await.is_some() {}
                flush_last_seen(&work).await;
                flush_limits(&work).await;
                audit_refusals(&work, refusals_since).await;
                return;
            }
            _ = limits.tick() => flush_limits(&work).await,
            _ = refusals.tick() => {
                audit_refusals(&work, refusals_since).await;
                refusals_since = work.clock.now_ms();
            }
            _ = last_seen.tick() => flush_last_seen(&work).await,
            _ = checkpoints.tick() => {
                if work.store.is_postgres() && work.store.is_leader() {
                    bind_audit_chains(&work, &mut bound).await;
                }
            }
            _ = jobs.tick() => {
                renew_self_signed(&work).await;
                while running_jobs.try_join_next().is_some() {}
                // Nodes sharing a database run the jobs and the journal's folds on one
                // of them, the leader; the others keep theirs for when they lead.
                if !work.store.is_leader() {
                    continue;
                }
                let work = work.clone();
                let missed = pending.take();
                let folding = work.clone();
                running_jobs.spawn(async move {
                    run_jobs(&work, missed).await;
                });
                running_jobs.spawn(async move { fold_revocations(&folding).await });
            }
        }
    }
}

/// Binds the other nodes' audit chains where they stand (`AuditLog::bind_chains`).
async fn bind_audit_chains(work: &Background, bound: &mut std::collections::HashMap<u64, u64>) {
    match work.audit.bind_chains(bound).await {
        Ok(0) => {}
        Ok(chains) => tracing::debug!(chains, "audit chains bound by a checkpoint"),
        Err(err) => tracing::warn!(error = %err, "cannot write an audit checkpoint"),
    }
}

/// `self-signed` mode: a certificate a month from expiry is renewed while serving (same
/// key, so the pin holds), stored, served to new connections, and audited.
async fn renew_self_signed(work: &Background) {
    let Some(tls) = &work.tls else { return };
    match tls::renew_self_signed_if_due(tls, &work.store, work.clock.as_ref()).await {
        Ok(None) => {}
        Ok(Some(info)) => {
            let until = crate::clock::format_rfc3339(info.not_after_ms);
            tracing::info!(not_after = %until, "renewed the self-signed certificate");
            work.audit
                .record_or_log(
                    &Origin::system(),
                    Event::new("tls.self_signed_renewed")
                        .severity(Severity::Notice)
                        .detail("names", info.names)
                        .detail("not_after", until)
                        .detail("sha256", info.sha256),
                )
                .await;
        }
        Err(err) => {
            tracing::warn!(error = %err, "renewing the self-signed certificate failed; retrying in a second")
        }
    }
}

/// Folds the revocation journal into the families' rows when it is due (see
/// `revocation`); a fold already running makes this a no-op.
async fn fold_revocations(work: &Background) {
    match work.revocations.fold_journal_if_due().await {
        Ok(None) => {}
        Ok(Some(folded)) => tracing::debug!(
            entries = folded.entries,
            families_marked = folded.families_marked,
            "folded the revocation journal"
        ),
        Err(err) => {
            tracing::warn!(error = %err, "folding the revocation journal failed; retrying in a second")
        }
    }
}

async fn flush_last_seen(work: &Background) {
    if let Err(err) = work.devices.flush_last_seen().await {
        tracing::warn!(error = %err, "writing devices' last-seen times failed");
    }
}

async fn flush_limits(work: &Background) {
    if let Err(err) = work.limits.flush().await {
        tracing::warn!(error = %err, "writing rate-limit windows failed");
    }
}

async fn audit_refusals(work: &Background, since_ms: u64) {
    if let Err(err) = work.limits.audit_refusals(&work.audit, since_ms).await {
        tracing::warn!(error = %err, "writing rate-limit refusals to the audit log failed");
    }
    if let Err(err) = work.audit.write_refusals(since_ms).await {
        tracing::warn!(error = %err, "writing refused requests to the audit log failed");
    }
}

/// Runs the jobs missed while stopped (once, at the first tick), then whatever is due.
/// A job already running is skipped by the scheduler, never run twice at once.
async fn run_jobs(work: &Background, missed: Option<Vec<JobName>>) {
    for job in missed.into_iter().flatten() {
        if let Err(err) = work.jobs.run(job).await {
            tracing::warn!(job = %job, error = %err, "a missed job could not run");
        }
    }
    if let Err(err) = work.jobs.tick().await {
        tracing::warn!(error = %err, "the scheduler could not read its jobs");
    }
}
