//! Scheduled jobs, with the injected clock: a job missed while stopped runs at the next
//! start (or not, if it does not catch up), a job never runs twice at once, and a failing
//! job is retried with backoff and audited.

use std::sync::Arc;

use gatehouse::backup::BackupPolicy;
use gatehouse::config::{JobName, JobsConfig};
use gatehouse::schedule::{JobError, Scheduler};
use gatehouse::store::JOBS;

use crate::helpers::{self, TEST_NOW_MS, TestApp};

const HOUR_MS: u64 = 3_600_000;

fn state(app: &TestApp, job: JobName) -> gatehouse::store::records::JobState {
    app.running
        .services
        .store
        .read(|tx| tx.get(&JOBS, job.as_str()))
        .unwrap()
        .unwrap_or_default()
}

fn events(app: &TestApp, kind: &str) -> Vec<gatehouse::audit::EventView> {
    app.running
        .services
        .audit
        .query(&gatehouse::audit::Query {
            kind: Some(kind.into()),
            limit: 100,
            ..Default::default()
        })
        .unwrap()
        .events
}

/// The backup job, daily at 04:00; every other job off. The background loop also runs
/// due jobs every second, which the tests allow for by checking stored state.
const DAILY_BACKUP: &[(&str, &str)] = &[("GATEHOUSE_JOBS_BACKUP", "0 4 * * *")];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_missed_while_stopped_runs_once_at_the_next_start() {
    let app = helpers::spawn_app_with(DAILY_BACKUP).await;
    let first = state(&app, JobName::Backup);
    // Started at 00:00: first due at 04:00 the same day, never run.
    assert_eq!(first.next_run_ms, Some(TEST_NOW_MS + 4 * HOUR_MS));
    assert_eq!(first.last_started_ms, None);
    let dir = app.stop().await;

    // Down for a day: the 04:00 run was missed.
    let app = helpers::spawn_app_in_at(dir, DAILY_BACKUP, TEST_NOW_MS + 24 * HOUR_MS).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let ran = loop {
        let s = state(&app, JobName::Backup);
        if s.last_outcome.is_some() || std::time::Instant::now() > deadline {
            break s;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(ran.last_outcome.as_deref(), Some("success"), "{ran:?}");
    assert_eq!(ran.last_started_ms, Some(TEST_NOW_MS + 24 * HOUR_MS));
    // Next: 04:00 on the day after, not once per missed day.
    assert_eq!(ran.next_run_ms, Some(TEST_NOW_MS + 28 * HOUR_MS));
    assert_eq!(events(&app, "job.succeeded").len(), 1);
    let dir = app.stop().await;
    let backups: Vec<_> = std::fs::read_dir(dir.path().join("backups"))
        .unwrap()
        .collect();
    assert_eq!(backups.len(), 1, "one backup for the missed run");

    // A job that does not catch up waits for its next time instead.
    let later = TEST_NOW_MS + 3 * 24 * HOUR_MS;
    let mut env = DAILY_BACKUP.to_vec();
    env.push(("GATEHOUSE_JOBS_CATCH_UP", "none"));
    let app = helpers::spawn_app_in_at(dir, &env, later).await;
    let skipped = state(&app, JobName::Backup);
    assert_eq!(
        skipped.last_started_ms, ran.last_started_ms,
        "it did not run"
    );
    assert_eq!(skipped.next_run_ms, Some(later + 4 * HOUR_MS));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_never_runs_twice_at_once() {
    let app = helpers::spawn_app_with(&[("GATEHOUSE_RATELIMIT_PAIRING", "off")]).await;
    // A scheduler of our own over the app's services, so the background loop (whose
    // jobs are off) cannot interfere.
    let scheduler = Arc::new(own_scheduler(
        &app,
        JobsConfig::default(),
        BackupPolicy {
            dir: app.data_path().with_file_name("own-backups"),
            keep: 7,
        },
    ));
    // Enough rows that a backup takes a moment.
    for _ in 0..20 {
        app.pair_device().await;
    }
    let mut runs = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let scheduler = scheduler.clone();
        runs.spawn(async move { scheduler.run(JobName::Backup).await });
    }
    let outcomes = runs.join_all().await;
    let ran = outcomes.iter().filter(|o| o.is_ok()).count();
    let refused = outcomes
        .iter()
        .filter(|o| matches!(o, Err(JobError::AlreadyRunning(JobName::Backup))))
        .count();
    assert_eq!(ran + refused, 8, "{outcomes:?}");
    assert!(ran >= 1);
    // Runs that were refused left no trace; each run that went ahead wrote one backup
    // and one record, one after the other, never overlapping.
    let written = std::fs::read_dir(app.data_path().with_file_name("own-backups"))
        .unwrap()
        .count();
    assert_eq!(written, ran, "{written} backups for {ran} runs");
    assert_eq!(events(&app, "job.succeeded").len(), ran);
    assert!(
        refused >= 1,
        "eight concurrent runs of one job overlapped: {outcomes:?}"
    );
    app.stop().await;
}

/// Two backups asked for in the same second (the clock stands still) both succeed: the
/// second is named `-2`, and pruning counts it as the newer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_backups_in_one_second_are_both_kept() {
    let app = helpers::spawn_app().await;
    let dir = app.data_path().with_file_name("own-backups");
    let scheduler = own_scheduler(
        &app,
        JobsConfig::default(),
        BackupPolicy {
            dir: dir.clone(),
            keep: 2,
        },
    );
    for _ in 0..3 {
        let view = scheduler.run(JobName::Backup).await.unwrap();
        assert_eq!(view.last_outcome.as_deref(), Some("success"), "{view:?}");
    }
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let stamp = gatehouse::clock::format_rfc3339(TEST_NOW_MS).replace([':', '-'], "");
    assert_eq!(
        names,
        [
            format!("gatehouse-{stamp}-2.redb"),
            format!("gatehouse-{stamp}-3.redb")
        ],
        "the first of the three is the oldest, so it went"
    );
    assert_eq!(events(&app, "job.succeeded").len(), 3);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_job_is_retried_with_backoff_and_audited() {
    let app = helpers::spawn_app().await;
    // The backup directory cannot be made: a regular file stands in its way.
    let blocker = app.data_path().with_file_name("blocker");
    std::fs::write(&blocker, b"x").unwrap();
    let mut config = JobsConfig::default();
    config.catch_up.clear();
    // The backup job alone.
    for (job, schedule) in &mut config.schedules {
        if *job != JobName::Backup {
            *schedule = None;
        }
    }
    let scheduler = own_scheduler(
        &app,
        config,
        BackupPolicy {
            dir: blocker.join("backups"),
            keep: 7,
        },
    );
    scheduler.start().await.unwrap();
    let first = scheduler.run(JobName::Backup).await.unwrap();
    assert_eq!(first.last_outcome.as_deref(), Some("failure"));
    assert_eq!(first.failures, 1);
    // Retried in a minute, then two, not at 04:00.
    let retry = state(&app, JobName::Backup).next_run_ms.unwrap();
    assert_eq!(retry, TEST_NOW_MS + 60_000);
    app.clock.set(retry);
    assert_eq!(scheduler.tick().await.unwrap(), vec![JobName::Backup]);
    let second = state(&app, JobName::Backup);
    assert_eq!(second.failures, 2);
    assert_eq!(second.next_run_ms, Some(retry + 120_000));
    let failed = events(&app, "job.failed");
    assert_eq!(failed.len(), 2);
    assert_eq!(failed[0].severity, "high");
    assert_eq!(failed[1].details["failures_in_a_row"], 2);
    // Nothing is due in between.
    app.clock.set(retry + 60_000);
    assert!(scheduler.tick().await.unwrap().is_empty());

    // Once the way is clear, the retry succeeds and the count resets.
    std::fs::remove_file(&blocker).unwrap();
    app.clock.set(retry + 120_000);
    assert_eq!(scheduler.tick().await.unwrap(), vec![JobName::Backup]);
    let fixed = state(&app, JobName::Backup);
    assert_eq!(fixed.failures, 0);
    assert_eq!(fixed.last_outcome.as_deref(), Some("success"));
    assert_eq!(fixed.next_run_ms, Some(TEST_NOW_MS + 4 * HOUR_MS));
    app.stop().await;
}

#[tokio::test]
async fn jobs_are_listed_and_run_over_http() {
    let app = helpers::spawn_app_with(&[("GATEHOUSE_JOBS_PRUNE_EXPIRED", "*/5 * * * *")]).await;
    let admin = app.admin_token();
    let list: serde_json::Value = app
        .client()
        .get(app.url("/v1/jobs"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let jobs = list["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 5);
    let prune = jobs.iter().find(|j| j["name"] == "prune_expired").unwrap();
    assert_eq!(prune["schedule"], "*/5 * * * *");
    assert_eq!(prune["next_run"], "2026-11-23T00:05:00Z");
    assert!(
        jobs.iter()
            .any(|j| j["name"] == "backup" && j["schedule"] == "off")
    );

    let ran = app
        .client()
        .post(app.url("/v1/jobs/prune_expired/run"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(ran.status(), 200);
    let ran: serde_json::Value = ran.json().await.unwrap();
    assert_eq!(ran["last_outcome"], "success");
    for (path, status) in [("/v1/jobs/nope/run", 404), ("/v1/jobs", 401)] {
        let request = if path.ends_with("run") {
            app.client().post(app.url(path)).bearer_auth(&admin)
        } else {
            app.client().get(app.url(path))
        };
        assert_eq!(request.send().await.unwrap().status(), status, "{path}");
    }
    app.stop().await;
}

#[tokio::test]
async fn job_runs_and_failures_show_in_metrics() {
    let app = helpers::spawn_app().await;
    let services = app.running.services.clone();
    services.jobs.run(JobName::PruneExpired).await.unwrap();
    // A loopback scraper needs no token.
    let response = app.client().get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let text = response.text().await.unwrap();
    for line in [
        "gatehouse_job_runs_total{job=\"prune_expired\",outcome=\"success\"} 1",
        "gatehouse_job_runs_total{job=\"backup\",outcome=\"failure\"} 0",
        "gatehouse_job_failures_in_a_row{job=\"prune_expired\"} 0",
        "gatehouse_job_running{job=\"backup\"} 0",
        "gatehouse_bans_active 0",
        "# TYPE gatehouse_ratelimit_refused_total counter",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "{line} missing from:\n{text}"
        );
    }
    assert!(
        text.lines().any(|l| l
            .starts_with("gatehouse_job_last_success_timestamp_seconds{job=\"prune_expired\"} ")),
        "{text}"
    );
    app.stop().await;
}

/// A scheduler of a test's own over the app's services, with its own jobs and backup
/// directory.
fn own_scheduler(app: &helpers::TestApp, config: JobsConfig, policy: BackupPolicy) -> Scheduler {
    let services = &app.running.services;
    let mut work = services.jobs.context().clone();
    work.backups = services.backups.with_policy(policy);
    Scheduler::new(config, work, app.clock.clone())
}
