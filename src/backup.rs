//! Backups and restores of the data file.
//!
//! A backup is a consistent snapshot taken while serving (`Store::backup_to`), checked
//! after writing (it opens, its format, master-key check value and row counts), and
//! recorded in the audit log. Scheduled backups go to `backup.dir` under time-stamped
//! names, keeping the newest `backup.keep`. A restore runs only while no server holds
//! the data file: it checks the backup first (it opens, a format this build reads,
//! sealed under the current master key or the one given for the backup), prepares the
//! new file beside the data file (migrated, re-sealed under the current key, with a
//! `backup.restored` record), keeps the replaced file beside it, and changes nothing at
//! all when any check fails.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::audit::{self, AuditLog, Event, Origin, Severity};
use crate::clock::{Clock, SharedClock, format_rfc3339};
use crate::error_kind::{Classify, ErrorKind};
use crate::store::seal::{MasterKey, Sealer, sync_parent_dir};
use crate::store::{BackupInfo, inspect};
use crate::store::{Store, StoreError};

/// Where scheduled backups go and how many are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupPolicy {
    pub dir: PathBuf,
    pub keep: usize,
}

/// What a backup wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupReport {
    pub(crate) path: PathBuf,
    pub(crate) bytes: u64,
    pub rows: u64,
    pub(crate) format_version: u32,
    /// Old scheduled backups removed to keep `backup.keep`.
    pub(crate) removed_old: u64,
}

/// What a restore did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreReport {
    pub(crate) restored_from: PathBuf,
    pub(crate) rows: u64,
    pub(crate) format_version: u32,
    /// Where the replaced data file was kept (none when there was no data file).
    pub replaced_kept_at: Option<PathBuf>,
    /// True when the backup was sealed under another key and is now under the current.
    pub resealed: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the data file {0} is in use by a running gatehouse: stop the service before a restore"
    )]
    InUse(PathBuf),
    #[error("the backup {path} is not usable, nothing was changed: {reason}")]
    BadBackup { path: PathBuf, reason: String },
    #[error("the background task failed: {0}")]
    Task(String),
}

impl Classify for BackupError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::BadBackup { .. } => ErrorKind::Invalid,
            Self::InUse(_) => ErrorKind::Conflict,
            Self::Store(err) => err.kind(),
            Self::Io { .. } | Self::Task(_) => ErrorKind::Internal,
        }
    }
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> BackupError {
    let path = path.to_path_buf();
    move |source| BackupError::Io {
        action,
        path,
        source,
    }
}

fn report(info: &BackupInfo, removed_old: u64) -> BackupReport {
    BackupReport {
        path: info.path.clone(),
        bytes: info.bytes,
        rows: info.rows(),
        format_version: info.format_version,
        removed_old,
    }
}

/// Online backups of one instance: on demand (`gatehouse backup`), as a download
/// (`POST /v1/backup`) and scheduled (the `backup` job).
#[derive(Debug, Clone)]
pub struct Backups {
    store: Store,
    audit: AuditLog,
    clock: SharedClock,
    policy: BackupPolicy,
}

/// A backup ready to stream: the open file (already unlinked, so an interrupted
/// download leaves nothing behind) and its length.
#[derive(Debug)]
pub(crate) struct Download {
    pub(crate) file: tokio::fs::File,
    pub(crate) bytes: u64,
}

impl Backups {
    pub(crate) fn new(
        store: Store,
        audit: AuditLog,
        clock: SharedClock,
        policy: BackupPolicy,
    ) -> Self {
        Self {
            store,
            audit,
            clock,
            policy,
        }
    }

    /// The same backups with another policy (a scheduler of a test's own).
    #[must_use]
    pub fn with_policy(&self, policy: BackupPolicy) -> Self {
        Self {
            policy,
            ..self.clone()
        }
    }

    /// Writes a checked backup of the running instance to `dest` (which must not
    /// exist) and records `backup.created` (not when the data file is open read-only). `progress` gets rows copied and the total.
    pub async fn create(
        &self,
        dest: &Path,
        origin: &Origin,
        progress: Box<dyn FnMut(u64, u64) + Send>,
    ) -> Result<BackupReport, BackupError> {
        let store = self.store.clone();
        let target = dest.to_path_buf();
        let mut progress = progress;
        let info = tokio::task::spawn_blocking(move || store.backup_to(&target, &mut *progress))
            .await
            .map_err(|e| BackupError::Task(e.to_string()))??;
        let done = report(&info, 0);
        if self.store.is_read_only() {
            // A copy of a file that cannot be written (a backup on read-only media): its
            // log cannot take the record, and the copy is all that was asked for.
            return Ok(done);
        }
        self.audit
            .record(
                origin,
                Event::new("backup.created")
                    .severity(Severity::Notice)
                    .detail("file", info.path.display().to_string())
                    .detail("bytes", info.bytes)
                    .detail("rows", info.rows()),
            )
            .await?;
        Ok(done)
    }

    /// A fresh, checked backup to stream to a client: written under a random name in
    /// the backup directory, opened, and unlinked before it is returned.
    pub(crate) async fn download(&self, origin: &Origin) -> Result<Download, BackupError> {
        let dir = &self.policy.dir;
        tokio::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .await
            .map_err(io("cannot create the backup directory", dir))?;
        let id: [u8; 12] =
            crate::ids::random_bytes().map_err(|e| BackupError::Task(e.to_string()))?;
        let path = dir.join(format!(
            ".download-{}.redb",
            data_encoding::HEXLOWER.encode(&id)
        ));
        let report = match self.create(&path, origin, Box::new(|_, _| {})).await {
            Ok(report) => report,
            Err(err) => {
                let _ = tokio::fs::remove_file(&path).await;
                return Err(err);
            }
        };
        let file = tokio::fs::File::open(&path).await;
        // Unlinked at once: the open file stays readable until the stream ends.
        let _ = tokio::fs::remove_file(&path).await;
        Ok(Download {
            file: file.map_err(io("cannot open the backup", &path))?,
            bytes: report.bytes,
        })
    }

    /// A scheduled backup: `backup.dir/gatehouse-<UTC time>.redb` (`-2`, `-3`, … added
    /// when a backup of the same second exists, as when a run is asked for twice in a
    /// second), then the oldest scheduled backups beyond `backup.keep` are removed.
    pub(crate) async fn scheduled(&self) -> Result<BackupReport, BackupError> {
        let policy = &self.policy;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&policy.dir)
            .map_err(io("cannot create the backup directory", &policy.dir))?;
        let stamp = format_rfc3339(self.clock.now_ms()).replace([':', '-'], "");
        let dest = (1..=MAX_SAME_SECOND)
            .map(|n| {
                let count = if n == 1 {
                    String::new()
                } else {
                    format!("-{n}")
                };
                let name = format!("{SCHEDULED_PREFIX}{stamp}{count}{SCHEDULED_SUFFIX}");
                policy.dir.join(name)
            })
            .find(|path| !path.exists())
            .unwrap_or_else(|| {
                policy
                    .dir
                    .join(format!("{SCHEDULED_PREFIX}{stamp}{SCHEDULED_SUFFIX}"))
            });
        let mut done = self
            .create(&dest, &Origin::system(), Box::new(|_, _| {}))
            .await?;
        done.removed_old = prune_old(&policy.dir, policy.keep)?;
        Ok(done)
    }
}

/// The prefix and suffix of scheduled backups' names; only such files are ever removed.
const SCHEDULED_PREFIX: &str = "gatehouse-";
const SCHEDULED_SUFFIX: &str = ".redb";
/// Backups made in one second at the most; one more is refused as the file exists.
const MAX_SAME_SECOND: u32 = 100;

/// Where a scheduled backup's name sorts: its time, then its count within that second
/// (`-2` after none). `None` for any other name.
fn scheduled_order(name: &str) -> Option<(&str, u32)> {
    let middle = name
        .strip_prefix(SCHEDULED_PREFIX)?
        .strip_suffix(SCHEDULED_SUFFIX)?;
    match middle.split_once("Z-") {
        Some((stamp, count)) => Some((stamp, count.parse().ok()?)),
        None => Some((middle.strip_suffix('Z')?, 1)),
    }
}

/// Removes the oldest scheduled backups so that `keep` remain, by time and count.
fn prune_old(dir: &Path, keep: usize) -> Result<u64, BackupError> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map_err(io("cannot list", dir))?
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| scheduled_order(n).is_some())
        .collect();
    names.sort_by(|a, b| scheduled_order(a).cmp(&scheduled_order(b)));
    let excess = names.len().saturating_sub(keep);
    let mut removed = 0;
    for name in names.into_iter().take(excess) {
        let path = dir.join(&name);
        fs::remove_file(&path).map_err(io("cannot remove the old backup", &path))?;
        removed += 1;
    }
    if removed > 0 {
        sync_parent_dir(&dir.join("x")).map_err(io("cannot sync", dir))?;
    }
    Ok(removed)
}

/// Checks a backup without changing anything: it opens, its format is one this build
/// reads, and it is sealed under `key`.
pub fn check(path: &Path, key: &MasterKey) -> Result<BackupInfo, BackupError> {
    inspect(path, &Sealer::new(key)).map_err(|err| BackupError::BadBackup {
        path: path.to_path_buf(),
        reason: err.to_string(),
    })
}

/// True when another process holds the data file (a running server).
fn held_by_another_process(data: &Path) -> Result<bool, BackupError> {
    Ok(crate::store::in_use(data)?)
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Restores `backup` over the data file at `data`, which must not be in use. The
/// result is sealed under `current`; `backup_key` opens a backup sealed under another
/// key. Blocking: call from `spawn_blocking` or a plain thread.
pub fn restore(
    data: &Path,
    current: &MasterKey,
    backup: &Path,
    backup_key: Option<&MasterKey>,
    clock: &dyn Clock,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<RestoreReport, BackupError> {
    if held_by_another_process(data)? {
        return Err(BackupError::InUse(data.to_path_buf()));
    }
    let key = backup_key.unwrap_or(current);
    let info = check(backup, key)?;
    let total = info.rows();
    progress(0, total);
    // Prepared beside the data file, so the final rename stays on one file system.
    let staging = sibling(data, ".restoring");
    let _ = fs::remove_file(&staging);
    let prepared = prepare(backup, &staging, key, current, clock, &info);
    if let Err(err) = prepared {
        let _ = fs::remove_file(&staging);
        return Err(err);
    }
    progress(total / 2, total);
    if held_by_another_process(data)? {
        let _ = fs::remove_file(&staging);
        return Err(BackupError::InUse(data.to_path_buf()));
    }
    let kept = if data.exists() {
        let stamp = format_rfc3339(clock.now_ms()).replace([':', '-'], "");
        let kept = sibling(data, &format!(".replaced-{stamp}"));
        fs::rename(data, &kept).map_err(io("cannot move the current data file aside to", &kept))?;
        Some(kept)
    } else {
        None
    };
    if let Err(err) = fs::rename(&staging, data) {
        // Put the original back: the data file must never be missing.
        if let Some(kept) = &kept {
            let _ = fs::rename(kept, data);
        }
        let _ = fs::remove_file(&staging);
        return Err(io("cannot move the restored file into place at", data)(err));
    }
    sync_parent_dir(data).map_err(io("cannot sync the directory of", data))?;
    progress(total, total);
    Ok(RestoreReport {
        restored_from: backup.to_path_buf(),
        rows: total,
        format_version: info.format_version,
        replaced_kept_at: kept,
        resealed: backup_key.is_some_and(|k| k.fingerprint() != current.fingerprint()),
    })
}

/// Copies the backup to `staging` and opens it as a data file: migrated to this
/// build's format, re-sealed under `current` if needed, with a `backup.restored`
/// record, closed cleanly.
fn prepare(
    backup: &Path,
    staging: &Path,
    key: &MasterKey,
    current: &MasterKey,
    clock: &dyn Clock,
    info: &BackupInfo,
) -> Result<(), BackupError> {
    {
        let mut from = fs::File::open(backup).map_err(io("cannot read", backup))?;
        let mut to = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(staging)
            .map_err(io("cannot create", staging))?;
        std::io::copy(&mut from, &mut to).map_err(io("cannot copy the backup to", staging))?;
        to.sync_all().map_err(io("cannot sync", staging))?;
    }
    let (store, _) = Store::open(staging, key, clock)?;
    let resealed = key.fingerprint() != current.fingerprint();
    // On a thread of its own, so that a restore called from async code (a test, a
    // future caller) never blocks a runtime's thread with another runtime.
    let run = || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .map_err(|e| StoreError::WriteFailed(format!("cannot start a runtime: {e}")))?;
        runtime.block_on(async {
            if resealed {
                store.rekey(current).await?;
            }
            let event = Event::new("backup.restored")
                .severity(Severity::High)
                .detail("from", backup.display().to_string())
                .detail("rows", info.rows())
                .detail("format_version", info.format_version)
                .detail("resealed", resealed);
            let now = clock.now_ms();
            store
                .write(move |tx| audit::append(tx, &Origin::operator(), &event, now))
                .await?;
            Ok::<_, StoreError>(())
        })
    };
    let outcome = std::thread::scope(|scope| scope.spawn(run).join())
        .map_err(|_| BackupError::Task("the restore thread panicked".into()))?;
    store.close();
    drop(store);
    outcome?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn only_the_oldest_scheduled_backups_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "gatehouse-20261101T040000Z.redb",
            "gatehouse-20261101T040000Z-2.redb",
            "gatehouse-20261102T040000Z.redb",
            "gatehouse-20261103T040000Z.redb",
            "manual.redb",
            "gatehouse-20261101T040000Z.redb.partial",
            "gatehouse-20261101T040000Z-x.redb",
        ] {
            fs::write(dir.path().join(name), b"x").unwrap();
        }
        assert_eq!(prune_old(dir.path(), 2).unwrap(), 2);
        let mut left: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "gatehouse-20261101T040000Z-x.redb",
                "gatehouse-20261101T040000Z.redb.partial",
                "gatehouse-20261102T040000Z.redb",
                "gatehouse-20261103T040000Z.redb",
                "manual.redb"
            ]
        );
    }

    #[test]
    fn backups_of_one_second_sort_by_their_count() {
        let mut names = [
            "gatehouse-20261101T040000Z-10.redb",
            "gatehouse-20261101T040001Z.redb",
            "gatehouse-20261101T040000Z-2.redb",
            "gatehouse-20261101T040000Z.redb",
        ];
        names.sort_by(|a, b| scheduled_order(a).cmp(&scheduled_order(b)));
        assert_eq!(
            names,
            [
                "gatehouse-20261101T040000Z.redb",
                "gatehouse-20261101T040000Z-2.redb",
                "gatehouse-20261101T040000Z-10.redb",
                "gatehouse-20261101T040001Z.redb",
            ]
        );
        for other in [
            "manual.redb",
            "gatehouse-x.redb.partial",
            "gatehouse-1Z-.redb",
        ] {
            assert_eq!(scheduled_order(other), None, "{other}");
        }
    }
}
