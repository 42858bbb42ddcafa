//! `gatehouse backup FILE`, `gatehouse restore FILE` and `gatehouse jobs list|run`.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use indicatif::{ProgressBar, ProgressStyle};

use super::{JobsCommand, Session, print_json};
use crate::audit::Origin;
use crate::backup::BackupReport;
use crate::clock::{SharedClock, SystemClock};
use crate::config::Config;
use crate::manage::{Command, Outcome};
use crate::schedule::JobView;

/// A bar on stderr when it is a terminal; indicatif hides it otherwise (pipes, CI,
/// the journal), so scripts see only the result.
pub(super) fn progress_bar(what: &str) -> ProgressBar {
    let bar = ProgressBar::new(0);
    if let Ok(style) =
        ProgressStyle::with_template("{msg} {wide_bar} {pos}/{len} rows ({eta} left)")
    {
        bar.set_style(style);
    }
    bar.set_message(what.to_string());
    bar
}

/// A callback for the store's `(done, total)` progress that moves `bar`.
pub(super) fn follow(bar: &ProgressBar) -> impl FnMut(u64, u64) + Send + 'static {
    let bar = bar.clone();
    move |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    }
}

fn print_backup(report: &BackupReport) {
    println!(
        "wrote {} ({} bytes, {} rows, format {}); it opens with the current master key",
        report.path.display(),
        report.bytes,
        report.rows,
        report.format_version
    );
}

pub(super) async fn backup(file: &Path, config: &Config) -> anyhow::Result<()> {
    let path =
        std::path::absolute(file).with_context(|| format!("cannot resolve {}", file.display()))?;
    let mut session = Session::new(config);
    let result = async {
        if let Some(services) = session.local_services().await? {
            let bar = progress_bar("backup");
            let report = services
                .backups
                .create(&path, &Origin::operator(), Box::new(follow(&bar)))
                .await;
            bar.finish_and_clear();
            print_backup(&report?);
            return Ok(());
        }
        match session.run(Command::Backup { path: path.clone() }).await? {
            Outcome::BackupWritten(report) => {
                print_backup(&report);
                Ok(())
            }
            other => anyhow::bail!("unexpected answer {other:?}"),
        }
    }
    .await;
    session.close().await?;
    result
}

pub(super) async fn restore(
    file: &Path,
    backup_key_file: Option<&Path>,
    config: &Config,
) -> anyhow::Result<()> {
    if let Some(url) = &config.storage.url {
        anyhow::bail!(
            "restore replaces the data file, and this node's store is the database {url}: \
             restore a backup into an empty database with \
             `gatehouse storage copy --from {} --to URL`",
            file.display()
        );
    }
    // Never created here: the restored file must open with a key that already exists.
    let current =
        crate::store::seal::MasterKey::load(&config.master_key.path).with_context(|| {
            format!(
                "restore needs the master key the data file will use ({}); on a new host, \
             give the backup's key with --master-key-file",
                config.master_key.path.display()
            )
        })?;
    let backup_key = backup_key_file
        .map(crate::store::seal::MasterKey::load)
        .transpose()
        .context("cannot read --backup-key-file")?;
    let data = config.data_path.clone();
    let backup = file.to_path_buf();
    let bar = progress_bar("restore");
    let mut progress = follow(&bar);
    let report = tokio::task::spawn_blocking(move || {
        let clock: SharedClock = Arc::new(SystemClock);
        crate::backup::restore(
            &data,
            &current,
            &backup,
            backup_key.as_ref(),
            clock.as_ref(),
            &mut progress,
        )
    })
    .await?;
    bar.finish_and_clear();
    let report = report?;
    println!(
        "restored {} ({} rows, format {}) into {}",
        report.restored_from.display(),
        report.rows,
        report.format_version,
        config.data_path.display()
    );
    if report.resealed {
        println!("the restored file is re-sealed under the current master key");
    }
    if let Some(kept) = report.replaced_kept_at {
        println!("the replaced data file is kept at {}", kept.display());
    }
    Ok(())
}

fn print_jobs(jobs: &[JobView]) {
    println!(
        "{:<18}  {:<14}  {:<20}  {:<8}  {:<20}  FAILURES",
        "NAME", "SCHEDULE", "LAST RUN", "OUTCOME", "NEXT RUN"
    );
    for j in jobs {
        println!(
            "{:<18}  {:<14}  {:<20}  {:<8}  {:<20}  {}",
            j.name,
            j.schedule,
            j.last_run.as_deref().unwrap_or("never"),
            j.last_outcome.as_deref().unwrap_or("-"),
            j.next_run.as_deref().unwrap_or("-"),
            j.failures
        );
    }
}

pub(super) async fn jobs(command: JobsCommand, config: &Config) -> anyhow::Result<()> {
    let mut session = Session::new(config);
    let result = async {
        match command {
            JobsCommand::List { json } => match session.run(Command::JobsList).await? {
                Outcome::JobList { jobs } if json => print_json(&jobs),
                Outcome::JobList { jobs } => {
                    print_jobs(&jobs);
                    Ok(())
                }
                other => anyhow::bail!("unexpected answer {other:?}"),
            },
            JobsCommand::Run { name } => match session.run(Command::JobsRun { name }).await? {
                Outcome::JobRan(job) => {
                    let failed = job.last_outcome.as_deref() == Some("failure");
                    print_jobs(std::slice::from_ref(&job));
                    if failed {
                        anyhow::bail!(
                            "job {} failed: {}",
                            job.name,
                            job.last_error.as_deref().unwrap_or("unknown error")
                        );
                    }
                    Ok(())
                }
                other => anyhow::bail!("unexpected answer {other:?}"),
            },
        }
    }
    .await;
    session.close().await?;
    result
}
