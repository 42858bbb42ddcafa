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
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, FixedOffset, Offset as _, TimeZone as _};
use serde::{Deserialize, Serialize};

use crate::audit::{Event, Origin, Severity};
use crate::clock::{SharedClock, format_rfc3339};
use crate::error_kind::{Classify, ErrorKind};
use crate::keys::Rotation;
use crate::services::Services;
use crate::store::records::JobState;
use crate::store::{JOBS, StoreError};

/// The jobs gatehouse runs. The names are stored and part of the interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobName {
    /// Promote the next signing key (monthly).
    RotateKeys,
    /// Remove audit records past `audit.retention` (daily).
    PruneAudit,
    /// Remove spent refresh tokens, expired revocations and retired keys (hourly).
    PruneRevocations,
    /// Remove expired pairing sessions, stale rate-limit windows and lapsed bans
    /// (every minute).
    PruneExpired,
    /// Write a verified backup into `backup.dir`, keeping `backup.keep` (daily).
    Backup,
}

impl JobName {
    pub const ALL: [Self; 5] = [
        Self::RotateKeys,
        Self::PruneAudit,
        Self::PruneRevocations,
        Self::PruneExpired,
        Self::Backup,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::RotateKeys => "rotate_keys",
            Self::PruneAudit => "prune_audit",
            Self::PruneRevocations => "prune_revocations",
            Self::PruneExpired => "prune_expired",
            Self::Backup => "backup",
        }
    }

    /// The default schedule (six fields: seconds first).
    pub fn default_schedule(self) -> &'static str {
        match self {
            Self::RotateKeys => "0 0 3 1 * *",
            Self::PruneAudit => "0 30 3 * * *",
            Self::PruneRevocations => "0 0 * * * *",
            Self::PruneExpired => "0 * * * * *",
            Self::Backup => "0 0 4 * * *",
        }
    }

    /// Whether a successful run is worth an audit record even when it changed nothing
    /// (the frequent cleanups are recorded only when they removed something).
    fn always_audited(self) -> bool {
        matches!(self, Self::RotateKeys | Self::PruneAudit | Self::Backup)
    }
}

impl fmt::Display for JobName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|job| job.as_str() == s.trim())
            .ok_or_else(|| {
                format!(
                    "no job named {s:?}; jobs: {}",
                    Self::ALL.map(JobName::as_str).join(", ")
                )
            })
    }
}

/// A parsed cron expression, with its text.
#[derive(Debug, Clone)]
pub struct CronSchedule {
    text: String,
    schedule: cron::Schedule,
}

impl CronSchedule {
    /// Parses five fields (minute first) or six or seven (second first, optional year).
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
        let fields = text.split(' ').count();
        let full = match fields {
            5 => format!("0 {text}"),
            6 | 7 => text.clone(),
            _ => {
                return Err(format!(
                    "expected a cron expression of 5 fields (minute hour day month weekday) \
                     or 6 (with seconds first), such as \"0 3 * * *\"; got {fields} fields"
                ));
            }
        };
        let schedule = cron::Schedule::from_str(&full)
            .map_err(|e| format!("not a valid cron expression ({e})"))?;
        // An expression that never fires (30 February) is a mistake, not a way to disable.
        let now = DateTime::from_timestamp_millis(0)
            .map(|t| t.fixed_offset())
            .ok_or("bad epoch")?;
        if schedule.after(&now).next().is_none() {
            return Err("this cron expression never fires".into());
        }
        Ok(Self { text, schedule })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The first time strictly after `after_ms`, in `zone`.
    pub fn next_after(&self, after_ms: u64, zone: FixedOffset) -> Option<u64> {
        let after = zone
            .timestamp_millis_opt(i64::try_from(after_ms).ok()?)
            .single()?;
        let next = self.schedule.after(&after).next()?;
        u64::try_from(next.timestamp_millis()).ok()
    }
}

/// Parses `UTC`, `Z` or a fixed offset `+02:00` / `-05:30`.
pub fn parse_timezone(text: &str) -> Result<FixedOffset, String> {
    let text = text.trim();
    let allowed = "expected \"UTC\" or a fixed offset such as \"+02:00\" (time-zone names \
                   are not supported: daylight-saving changes would move runs)";
    if text.eq_ignore_ascii_case("utc") || text == "Z" {
        return FixedOffset::east_opt(0).ok_or_else(|| allowed.to_string());
    }
    let (sign, rest) = match text.as_bytes().first() {
        Some(b'+') => (1, &text[1..]),
        Some(b'-') => (-1, &text[1..]),
        _ => return Err(allowed.into()),
    };
    let (h, m) = rest.split_once(':').ok_or_else(|| allowed.to_string())?;
    let (Ok(h), Ok(m)) = (h.parse::<i32>(), m.parse::<i32>()) else {
        return Err(allowed.into());
    };
    if !(0..=14).contains(&h) || !(0..60).contains(&m) {
        return Err(allowed.into());
    }
    FixedOffset::east_opt(sign * (h * 3600 + m * 60)).ok_or_else(|| allowed.to_string())
}

/// The configured jobs.
#[derive(Debug, Clone)]
pub struct JobsConfig {
    /// `None`: the job is off.
    pub schedules: BTreeMap<JobName, Option<CronSchedule>>,
    /// Jobs that run once at start when a scheduled run was missed while stopped.
    pub catch_up: Vec<JobName>,
    pub timezone: FixedOffset,
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            schedules: JobName::ALL
                .into_iter()
                .map(|job| (job, CronSchedule::parse(job.default_schedule()).ok()))
                .collect(),
            catch_up: JobName::ALL.to_vec(),
            timezone: chrono::Utc.fix(),
        }
    }
}

/// A job as `GET /v1/jobs` and `gatehouse jobs list` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobView {
    pub name: String,
    /// The cron expression, or `off`.
    pub schedule: String,
    pub running: bool,
    pub last_run: Option<String>,
    pub last_duration_ms: Option<u64>,
    pub last_outcome: Option<String>,
    pub last_error: Option<String>,
    pub last_success: Option<String>,
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
            Self::Store(_) => ErrorKind::Internal,
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

/// The scheduler of one instance. It holds no services of its own: each call is given
/// the instance's `Services` (which hold the scheduler).
#[derive(Debug)]
pub struct Scheduler {
    config: JobsConfig,
    clock: SharedClock,
    running: BTreeMap<JobName, Arc<AtomicBool>>,
    /// Runs since start, per job: (succeeded, failed), for `/metrics`.
    runs: BTreeMap<JobName, (AtomicU64, AtomicU64)>,
    /// The backup directory and how many scheduled backups to keep.
    backups: crate::backup::BackupPolicy,
}

/// Clears a job's running flag when its run ends, however it ends.
struct RunGuard(Arc<AtomicBool>);

impl Drop for RunGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

impl Scheduler {
    pub fn new(
        config: JobsConfig,
        backups: crate::backup::BackupPolicy,
        clock: SharedClock,
    ) -> Self {
        Self {
            config,
            clock,
            running: JobName::ALL
                .into_iter()
                .map(|job| (job, Arc::new(AtomicBool::new(false))))
                .collect(),
            runs: JobName::ALL
                .into_iter()
                .map(|job| (job, (AtomicU64::new(0), AtomicU64::new(0))))
                .collect(),
            backups,
        }
    }

    fn schedule_of(&self, job: JobName) -> Option<&CronSchedule> {
        self.config.schedules.get(&job).and_then(Option::as_ref)
    }

    fn states(services: &Services) -> Result<BTreeMap<JobName, JobState>, StoreError> {
        let rows = services.store.read(|tx| tx.all(&JOBS))?;
        Ok(rows
            .into_iter()
            .filter_map(|(name, state)| name.parse().ok().map(|job| (job, state)))
            .collect())
    }

    /// Prepares the stored state at start: a job never seen gets its first scheduled
    /// time; a job whose scheduled time passed while stopped is due now if it catches
    /// up, else moves to its next scheduled time. Returns the jobs due now.
    pub async fn start(&self, services: &Services) -> Result<Vec<JobName>, StoreError> {
        let now = self.clock.now_ms();
        let states = Self::states(services)?;
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
            services
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
    pub async fn tick(&self, services: &Services) -> Result<Vec<JobName>, StoreError> {
        let now = self.clock.now_ms();
        let states = Self::states(services)?;
        let mut ran = Vec::new();
        for job in JobName::ALL {
            if self.schedule_of(job).is_none() {
                continue;
            }
            let due = states
                .get(&job)
                .and_then(|s| s.next_run_ms)
                .is_some_and(|due| due <= now);
            if due && self.run_inner(services, job, true).await.is_ok() {
                ran.push(job);
            }
        }
        Ok(ran)
    }

    /// Runs `job` now (a manual run, or a due one). Refused while it runs already.
    pub async fn run(&self, services: &Services, job: JobName) -> Result<JobView, JobError> {
        self.run_inner(services, job, false).await
    }

    async fn run_inner(
        &self,
        services: &Services,
        job: JobName,
        only_if_due: bool,
    ) -> Result<JobView, JobError> {
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
            let state = Self::states(services)?.remove(&job).unwrap_or_default();
            if state
                .next_run_ms
                .is_none_or(|due| due > self.clock.now_ms())
            {
                return Err(JobError::NotDue(job));
            }
        }
        let started_ms = self.clock.now_ms();
        let started = Instant::now();
        let outcome = self.execute(services, job).await;
        if let Some((succeeded, failed)) = self.runs.get(&job) {
            match &outcome {
                Ok(_) => succeeded.fetch_add(1, Ordering::Relaxed),
                Err(_) => failed.fetch_add(1, Ordering::Relaxed),
            };
        }
        let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let finished_ms = self.clock.now_ms();
        let previous = Self::states(services)?.remove(&job).unwrap_or_default();
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
                tracing::info!(job = %job, duration_ms, details = ?report.details, "job ran");
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
        services
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

    async fn execute(&self, services: &Services, job: JobName) -> Result<RunReport, String> {
        let text = |e: &dyn fmt::Display| e.to_string();
        match job {
            JobName::RotateKeys => {
                let report = services
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
                let summary = services.audit.prune().await.map_err(|e| text(&e))?;
                Ok(RunReport::default().count("removed", summary.removed))
            }
            JobName::PruneRevocations => {
                let rows = services
                    .tokens
                    .prune_expired()
                    .await
                    .map_err(|e| text(&e))?;
                let retired = services.keys.retire_expired().await.map_err(|e| text(&e))?;
                Ok(RunReport::default()
                    .count("rows_removed", rows)
                    .count("keys_retired", retired.len() as u64))
            }
            JobName::PruneExpired => {
                let sessions = services
                    .pairing
                    .prune_expired()
                    .await
                    .map_err(|e| text(&e))?;
                let windows = services.limits.prune().await.map_err(|e| text(&e))?;
                let bans = services.lockout.prune().await.map_err(|e| text(&e))?;
                Ok(RunReport::default()
                    .count("pairing_sessions", sessions)
                    .count("rate_windows", windows)
                    .count("bans", bans))
            }
            JobName::Backup => {
                let report = crate::backup::scheduled(services, &self.backups)
                    .await
                    .map_err(|e| text(&e))?;
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
    pub fn run_counts(&self, job: JobName) -> (u64, u64) {
        self.runs.get(&job).map_or((0, 0), |(ok, failed)| {
            (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed))
        })
    }

    /// Where scheduled (and downloaded) backups are written.
    pub fn backup_dir(&self) -> &std::path::Path {
        &self.backups.dir
    }

    /// Every job, in a fixed order.
    pub fn list(&self, services: &Services) -> Result<Vec<JobView>, StoreError> {
        let states = Self::states(services)?;
        Ok(JobName::ALL
            .into_iter()
            .map(|job| self.view(job, &states.get(&job).cloned().unwrap_or_default()))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const HOUR: u64 = 3_600_000;

    #[test]
    fn five_fields_mean_second_zero() {
        let five = CronSchedule::parse("30 3 * * *").unwrap();
        let six = CronSchedule::parse("0 30 3 * * *").unwrap();
        let utc = parse_timezone("UTC").unwrap();
        assert_eq!(five.next_after(0, utc), six.next_after(0, utc));
        assert_eq!(five.next_after(0, utc), Some(3 * HOUR + HOUR / 2));
    }

    #[test]
    fn bad_expressions_are_refused_with_a_reason() {
        for bad in ["", "* *", "61 * * * *", "0 0 30 2 *", "a b c d e"] {
            assert!(CronSchedule::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_fixed_offset_moves_runs() {
        let daily = CronSchedule::parse("0 3 * * *").unwrap();
        let plus2 = parse_timezone("+02:00").unwrap();
        // 03:00 at +02:00 is 01:00 UTC.
        assert_eq!(daily.next_after(0, plus2), Some(HOUR));
        assert!(parse_timezone("Europe/Berlin").is_err());
        assert!(parse_timezone("+15:00").is_err());
        assert_eq!(
            parse_timezone("-05:30").unwrap().local_minus_utc(),
            -(5 * 3600 + 1800)
        );
    }

    #[test]
    fn retries_double_up_to_an_hour() {
        assert_eq!(retry_delay_ms(1), 60_000);
        assert_eq!(retry_delay_ms(2), 120_000);
        assert_eq!(retry_delay_ms(7), HOUR);
        assert_eq!(retry_delay_ms(40), HOUR);
    }

    #[test]
    fn job_names_round_trip() {
        for job in JobName::ALL {
            assert_eq!(job.as_str().parse::<JobName>().unwrap(), job);
            assert!(CronSchedule::parse(job.default_schedule()).is_ok());
        }
        assert!("nope".parse::<JobName>().is_err());
    }
}
