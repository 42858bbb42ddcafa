//! Scheduled jobs: the cron loop, one function per job, and what is remembered of runs.
//!
//! Each job has a cron expression (`jobs.<name>`, seconds first; five fields mean "at
//! second 0"), evaluated in UTC or a fixed offset (`jobs.timezone`). What the scheduler
//! knows of a job (last run, duration, outcome, next run, failures in a row) is kept in
//! `jobs.v1`, so a run missed while the service was down is seen at the next start
//! and, for the jobs in `jobs.catch_up`, run once then. A job never overlaps itself: a
//! run that is due while the previous one still runs waits for the next tick, and a
//! manual run is refused. A failed run is retried with a doubling backoff (1 minute up
//! to an hour, never past the next scheduled time) and written to the audit log.
//!
//! Time comes from the injected clock only: `Scheduler::tick` runs what is due "now",
//! so tests advance a fixed clock and call it, without sleeping. `app` calls it every
//! second.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::audit::AuditLog;
use crate::audit::{Event, Origin, Severity};
use crate::backup::Backups;
use crate::clock::{SharedClock, format_rfc3339};
use crate::config::{CronSchedule, JobName, JobsConfig};
use crate::device_grants::DeviceGrants;
use crate::error_kind::{Classify, ErrorKind};
use crate::keys::{KeyRing, Rotation};
use crate::pairing::PairingSessions;
use crate::ratelimit::{Lockout, RateLimits};
use crate::store::records::JobState;
use crate::store::{JOBS, Store, StoreError};
use crate::tokens::TokenAuthority;

mod background;
mod follow;

pub(crate) use background::{Background, run_background};
pub(crate) use follow::{Mirrors, follow_changes};

/// What the jobs act on: the domain services they call, and nothing more.
#[derive(Debug, Clone)]
pub struct JobContext {
    /// Where each job's state is kept (`jobs.v1`).
    pub(crate) store: Store,
    pub(crate) keys: Arc<KeyRing>,
    pub(crate) audit: AuditLog,
    pub(crate) tokens: Arc<TokenAuthority>,
    pub(crate) pairing: Arc<PairingSessions>,
    pub(crate) device_grants: Arc<DeviceGrants>,
    pub(crate) limits: Arc<RateLimits>,
    pub(crate) lockout: Arc<Lockout>,
    pub backups: Backups,
}

/// A job as `GET /v1/jobs` and `gatehouse jobs list` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobView {
    pub name: String,
    /// The cron expression, or `off`.
    pub(crate) schedule: String,
    pub(crate) running: bool,
    pub(crate) last_run: Option<String>,
    pub(crate) last_duration_ms: Option<u64>,
    pub last_outcome: Option<String>,
    pub last_error: Option<String>,
    pub(crate) last_success: Option<String>,
    pub next_run: Option<String>,
    pub failures: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("{0}")]
    UnknownJob(String),
    #[error("job {0} is already running")]
    AlreadyRunning(JobName),
    #[error("job {0} is not due")]
    NotDue(JobName),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Classify for JobError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::UnknownJob(_) => ErrorKind::NotFound,
            Self::AlreadyRunning(_) | Self::NotDue(_) => ErrorKind::Conflict,
            Self::Store(err) => err.kind(),
        }
    }
}

/// First retry after a failure; doubles per failure in a row.
const FIRST_RETRY: Duration = Duration::from_secs(60);
/// Longest wait between retries.
const MAX_RETRY: Duration = Duration::from_secs(3600);

fn retry_delay_ms(failures: u32) -> u64 {
    let first = u64::try_from(FIRST_RETRY.as_millis()).unwrap_or(u64::MAX);
    let max = u64::try_from(MAX_RETRY.as_millis()).unwrap_or(u64::MAX);
    first
        .saturating_mul(1u64 << failures.saturating_sub(1).min(20))
        .min(max)
}

/// What a run did, for the audit record and the log.
#[derive(Debug, Default)]
struct RunReport {
    /// Whether anything changed (a cleanup that removed nothing is not audited).
    changed: bool,
    details: serde_json::Map<String, serde_json::Value>,
}

impl RunReport {
    fn count(mut self, key: &str, n: u64) -> Self {
        self.changed |= n > 0;
        self.details.insert(key.into(), n.into());
        self
    }
}

/// The scheduler of one instance, over the services its jobs call.
#[derive(Debug)]
pub struct Scheduler {
    config: JobsConfig,
    clock: SharedClock,
    work: JobContext,
    running: BTreeMap<JobName, Arc<AtomicBool>>,
    /// Runs since start, per job: (succeeded, failed), for `/metrics`.
    runs: BTreeMap<JobName, (AtomicU64, AtomicU64)>,
}

/// Clears a job's running flag when its run ends, however it ends.
struct RunGuard(Arc<AtomicBool>);

impl Drop for RunGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

impl Scheduler {
    pub fn new(config: JobsConfig, work: JobContext, clock: SharedClock) -> Self {
        Self {
            config,
            clock,
            work,
            running: JobName::ALL
                .into_iter()
                .map(|job| (job, Arc::new(AtomicBool::new(false))))
                .collect(),
            runs: JobName::ALL
                .into_iter()
                .map(|job| (job, (AtomicU64::new(0), AtomicU64::new(0))))
                .collect(),
        }
    }

    /// What the jobs act on.
    pub fn context(&self) -> &JobContext {
        &self.work
    }

    fn schedule_of(&self, job: JobName) -> Option<&CronSchedule> {
        self.config.schedules.get(&job).and_then(Option::as_ref)
    }

    fn states(&self) -> Result<BTreeMap<JobName, JobState>, StoreError> {
        let rows = self.work.store.read(|tx| tx.all(&JOBS))?;
        Ok(rows
            .into_iter()
            .filter_map(|(name, state)| name.parse().ok().map(|job| (job, state)))
            .collect())
    }

    /// Prepares the stored state at start: a job never seen gets its first scheduled
    /// time; a job whose scheduled time passed while stopped is due now if it catches
    /// up, else moves to its next scheduled time. Returns the jobs due now.
    pub async fn start(&self) -> Result<Vec<JobName>, StoreError> {
        let now = self.clock.now_ms();
        let states = self.states()?;
        let mut writes = Vec::new();
        let mut missed = Vec::new();
        for job in JobName::ALL {
            let Some(schedule) = self.schedule_of(job) else {
                continue;
            };
            let mut state = states.get(&job).cloned().unwrap_or_default();
            match state.next_run_ms {
                Some(due) if due <= now && self.config.catch_up.contains(&job) => {
                    missed.push(job);
                    continue;
                }
                Some(due) if due > now => continue,
                _ => {}
            }
            state.next_run_ms = schedule.next_after(now, self.config.timezone);
            writes.push((job, state));
        }
        if !writes.is_empty() {
            self.work
                .store
                .write(move |tx| {
                    for (job, state) in &writes {
                        tx.put(&JOBS, job.as_str(), state)?;
                    }
                    Ok::<_, StoreError>(())
                })
                .await?;
        }
        if !missed.is_empty() {
            tracing::info!(jobs = ?missed.iter().map(|j| j.as_str()).collect::<Vec<_>>(), "running jobs missed while stopped");
        }
        Ok(missed)
    }

    /// Runs every job that is due now and not running; returns the jobs it ran.
    pub async fn tick(&self) -> Result<Vec<JobName>, StoreError> {
        let now = self.clock.now_ms();
        let states = self.states()?;
        let mut ran = Vec::new();
        for job in JobName::ALL {
            if self.schedule_of(job).is_none() {
                continue;
            }
            let due = states
                .get(&job)
                .and_then(|s| s.next_run_ms)
                .is_some_and(|due| due <= now);
            if due && self.run_inner(job, true).await.is_ok() {
                ran.push(job);
            }
        }
        Ok(ran)
    }

    /// Runs `job` now (a manual run, or a due one). Refused while it runs already.
    pub async fn run(&self, job: JobName) -> Result<JobView, JobError> {
        self.run_inner(job, false).await
    }

    async fn run_inner(&self, job: JobName, only_if_due: bool) -> Result<JobView, JobError> {
        let flag = self
            .running
            .get(&job)
            .cloned()
            .ok_or_else(|| JobError::UnknownJob(job.to_string()))?;
        if flag.swap(true, Ordering::SeqCst) {
            return Err(JobError::AlreadyRunning(job));
        }
        let _guard = RunGuard(flag);
        if only_if_due {
            // Read again under the flag: a run that finished since the caller looked has
            // moved the job's next run, and the job must not run again back to back.
            let state = self.states()?.remove(&job).unwrap_or_default();
            if state
                .next_run_ms
                .is_none_or(|due| due > self.clock.now_ms())
            {
                return Err(JobError::NotDue(job));
            }
        }
        let started_ms = self.clock.now_ms();
        let started = Instant::now();
        let outcome = self.execute(job).await;
        if let Some((succeeded, failed)) = self.runs.get(&job) {
            match &outcome {
                Ok(_) => succeeded.fetch_add(1, Ordering::Relaxed),
                Err(_) => failed.fetch_add(1, Ordering::Relaxed),
            };
        }
        let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let finished_ms = self.clock.now_ms();
        let previous = self.states()?.remove(&job).unwrap_or_default();
        let scheduled_next = self
            .schedule_of(job)
            .and_then(|s| s.next_after(finished_ms, self.config.timezone));
        let mut state = JobState {
            last_started_ms: Some(started_ms),
            last_duration_ms: Some(duration_ms),
            ..previous
        };
        let event = match &outcome {
            Ok(report) => {
                state.last_outcome = Some("success".into());
                state.last_error = None;
                state.last_success_ms = Some(finished_ms);
                state.failures = 0;
                state.next_run_ms = scheduled_next;
                tracing::info!(job = %job, duration_ms, details = %details_text(&report.details), "job ran");
                (report.changed || job.always_audited()).then(|| {
                    let mut event = Event::new("job.succeeded")
                        .detail("job", job.as_str())
                        .detail("duration_ms", duration_ms);
                    for (k, v) in &report.details {
                        event = event.detail(k, v.clone());
                    }
                    event
                })
            }
            Err(err) => {
                state.last_outcome = Some("failure".into());
                state.last_error = Some(err.clone());
                state.failures = state.failures.saturating_add(1);
                let retry = finished_ms.saturating_add(retry_delay_ms(state.failures));
                state.next_run_ms = Some(scheduled_next.map_or(retry, |next| next.min(retry)));
                tracing::error!(job = %job, error = %err, failures = state.failures, "job failed; it will be retried");
                Some(
                    Event::failure("job.failed")
                        .severity(Severity::High)
                        .detail("job", job.as_str())
                        .detail("error", err.clone())
                        .detail("failures_in_a_row", state.failures)
                        .detail(
                            "retry_at",
                            state.next_run_ms.map(format_rfc3339).unwrap_or_default(),
                        ),
                )
            }
        };
        let stored = state.clone();
        self.work
            .store
            .write(move |tx| {
                tx.put(&JOBS, job.as_str(), &stored)?;
                if let Some(event) = &event {
                    crate::audit::append(tx, &Origin::system(), event, finished_ms)?;
                }
                Ok::<_, StoreError>(())
            })
            .await?;
        Ok(self.view(job, &state))
    }

    async fn execute(&self, job: JobName) -> Result<RunReport, String> {
        let text = |e: &dyn fmt::Display| e.to_string();
        let work = &self.work;
        match job {
            JobName::RotateKeys => {
                let report = work
                    .keys
                    .rotate(Rotation::Scheduled, &Origin::system())
                    .await
                    .map_err(|e| text(&e))?;
                let mut run = RunReport {
                    changed: true,
                    ..RunReport::default()
                };
                run.details
                    .insert("activated".into(), report.activated.into());
                Ok(run)
            }
            JobName::PruneAudit => {
                let summary = work.audit.prune().await.map_err(|e| text(&e))?;
                Ok(RunReport::default().count("removed", summary.removed))
            }
            JobName::PruneRevocations => {
                let rows = work.tokens.prune_expired().await.map_err(|e| text(&e))?;
                let retired = work.keys.retire_expired().await.map_err(|e| text(&e))?;
                Ok(RunReport::default()
                    .count("rows_removed", rows)
                    .count("keys_retired", retired.len() as u64))
            }
            JobName::PruneExpired => {
                let sessions = work.pairing.prune_expired().await.map_err(|e| text(&e))?;
                let grants = work
                    .device_grants
                    .prune_expired()
                    .await
                    .map_err(|e| text(&e))?;
                let windows = work.limits.prune().await.map_err(|e| text(&e))?;
                let bans = work.lockout.prune().await.map_err(|e| text(&e))?;
                Ok(RunReport::default()
                    .count("pairing_sessions", sessions)
                    .count("device_grants", grants)
                    .count("rate_windows", windows)
                    .count("bans", bans))
            }
            JobName::Backup => {
                let report = work.backups.scheduled().await.map_err(|e| text(&e))?;
                let mut run = RunReport {
                    changed: true,
                    ..RunReport::default()
                };
                run.details
                    .insert("file".into(), report.path.display().to_string().into());
                run.details.insert("bytes".into(), report.bytes.into());
                run.details
                    .insert("removed_old".into(), report.removed_old.into());
                Ok(run)
            }
        }
    }

    fn view(&self, job: JobName, state: &JobState) -> JobView {
        JobView {
            name: job.as_str().into(),
            schedule: self
                .schedule_of(job)
                .map_or_else(|| "off".into(), |s| s.as_str().to_string()),
            running: self
                .running
                .get(&job)
                .is_some_and(|f| f.load(Ordering::SeqCst)),
            last_run: state.last_started_ms.map(format_rfc3339),
            last_duration_ms: state.last_duration_ms,
            last_outcome: state.last_outcome.clone(),
            last_error: state.last_error.clone(),
            last_success: state.last_success_ms.map(format_rfc3339),
            next_run: self
                .schedule_of(job)
                .and(state.next_run_ms)
                .map(format_rfc3339),
            failures: state.failures,
        }
    }

    /// Runs since start of `job` that succeeded and that failed.
    pub(crate) fn run_counts(&self, job: JobName) -> (u64, u64) {
        self.runs.get(&job).map_or((0, 0), |(ok, failed)| {
            (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed))
        })
    }

    /// Every job, in a fixed order.
    pub fn list(&self) -> Result<Vec<JobView>, StoreError> {
        let states = self.states()?;
        Ok(JobName::ALL
            .into_iter()
            .map(|job| self.view(job, &states.get(&job).cloned().unwrap_or_default()))
            .collect())
    }
}

/// A job's details as JSON text for the log (`{"removed":0}`), never Rust debug text.
fn details_text(details: &serde_json::Map<String, serde_json::Value>) -> String {
    serde_json::to_string(details).unwrap_or_default()
}

#[cfg(test)]
mod tests {

    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn job_details_are_logged_as_json() {
        let mut details = serde_json::Map::new();
        details.insert("removed".into(), 0.into());
        details.insert("file".into(), "b.redb".into());
        assert_eq!(
            super::details_text(&details),
            r#"{"file":"b.redb","removed":0}"#
        );
    }

    const HOUR: u64 = 3_600_000;

    #[test]
    fn retries_double_up_to_an_hour() {
        assert_eq!(retry_delay_ms(1), 60_000);
        assert_eq!(retry_delay_ms(2), 120_000);
        assert_eq!(retry_delay_ms(7), HOUR);
        assert_eq!(retry_delay_ms(40), HOUR);
    }
}
