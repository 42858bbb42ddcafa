//! The types of the `jobs.*` settings: job names, cron schedules and the time zone they
//! are read in. They live with the settings so that `config` names nothing of the
//! scheduler that reads them.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, FixedOffset, Offset as _, TimeZone as _};
use serde::{Deserialize, Serialize};

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
    pub(crate) const ALL: [Self; 5] = [
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
    pub(crate) const fn default_schedule(self) -> &'static str {
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
    pub(crate) fn always_audited(self) -> bool {
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
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
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

    pub(crate) fn as_str(&self) -> &str {
        &self.text
    }

    /// The first time strictly after `after_ms`, in `zone`.
    pub(crate) fn next_after(&self, after_ms: u64, zone: FixedOffset) -> Option<u64> {
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
    pub(crate) timezone: FixedOffset,
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

/// A job's schedule: a cron expression, or `off`.
pub(super) fn job_schedule(v: &str) -> Result<Option<CronSchedule>, String> {
    if v.trim() == "off" {
        return Ok(None);
    }
    CronSchedule::parse(v).map(Some)
}

/// `all`, `none`, or job names separated by commas.
pub(super) fn job_list(v: &str) -> Result<Vec<JobName>, String> {
    match v.trim() {
        "all" => Ok(JobName::ALL.to_vec()),
        "none" | "" => Ok(Vec::new()),
        list => list.split(',').map(str::parse).collect(),
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
    fn job_names_round_trip() {
        for job in JobName::ALL {
            assert_eq!(job.as_str().parse::<JobName>().unwrap(), job);
            assert!(CronSchedule::parse(job.default_schedule()).is_ok());
        }
        assert!("nope".parse::<JobName>().is_err());
    }
}
