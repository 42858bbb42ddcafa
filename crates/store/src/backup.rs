//! Online backups: a consistent copy of every table into a new data file, and the
//! checks a backup must pass before it is trusted (after writing, and before a restore).
//!
//! The copy reads one read transaction, so it is a snapshot of one instant however many
//! writes land meanwhile; writers are never blocked. Rows are written into a new file
//! beside the destination (`<dest>.partial`, mode 0600) in chunks of
//! `ROWS_PER_COMMIT` (non-durable commits, then one durable commit at the end: the
//! partial file means nothing until it is renamed), fsynced, renamed into place and the
//! directory fsynced. Sealed values are copied as they are, so a backup opens with the
//! master key of the file it was taken from.

use std::fs;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use super::seal::{Sealer, sync_parent_dir};
use super::tables::{self, AUDIT_EVENTS};
use super::{Store, StoreError, builder, check_meta, corrupt, map_open_error, sibling};

/// The one table keyed by `u64`.
const AUDIT_TABLE: &str = "audit_events.v1";

/// Rows per intermediate commit of the copy: bounds the memory a large table needs.
const ROWS_PER_COMMIT: u64 = 50_000;

/// What a backup holds, as checked after writing it (or before restoring it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupInfo {
    pub path: PathBuf,
    pub bytes: u64,
    pub format_version: u32,
    /// Rows per table.
    pub counts: Vec<(String, u64)>,
}

impl BackupInfo {
    pub fn rows(&self) -> u64 {
        self.counts.iter().map(|(_, n)| n).sum()
    }
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io {
        action,
        path,
        source,
    }
}

fn str_table(name: &str) -> TableDefinition<'_, &'static str, &'static [u8]> {
    TableDefinition::new(name)
}

impl Store {
    /// Writes a consistent backup of the whole file to `dest` (which must not exist)
    /// and checks it. `progress` gets rows copied so far and the total.
    pub fn backup_to(
        &self,
        dest: &Path,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<BackupInfo, StoreError> {
        if dest.exists() {
            return Err(StoreError::Io {
                action: "refusing to overwrite",
                path: dest.to_path_buf(),
                source: std::io::Error::from(std::io::ErrorKind::AlreadyExists),
            });
        }
        let partial = sibling(dest, ".partial");
        let _ = fs::remove_file(&partial);
        let result = self.copy_into(&partial, progress);
        let counts = match result {
            Ok(counts) => counts,
            Err(err) => {
                let _ = fs::remove_file(&partial);
                return Err(err);
            }
        };
        fs::rename(&partial, dest).map_err(io("cannot move the backup into place at", dest))?;
        sync_parent_dir(dest).map_err(io("cannot sync the directory of", dest))?;
        let info = self.with_sealer(|sealer| inspect(dest, sealer))?;
        if info.counts != counts {
            return Err(StoreError::Corrupt {
                path: dest.to_path_buf(),
                reason: format!(
                    "the backup's row counts {:?} differ from the snapshot's {counts:?}",
                    info.counts
                ),
            });
        }
        Ok(info)
    }

    fn copy_into(
        &self,
        partial: &Path,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Vec<(String, u64)>, StoreError> {
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(partial)
            .map_err(io("cannot create", partial))?;
        file.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(io("cannot set permissions on", partial))?;
        let backend =
            redb::backends::FileBackend::new(file).map_err(|e| map_open_error(partial, e))?;
        let target = builder()
            .create_with_backend(backend)
            .map_err(|e| map_open_error(partial, e))?;
        let source = self.shared.db.begin_read()?;
        let mut counts = Vec::new();
        let mut total = 0u64;
        for name in tables::ALL_TABLES {
            let len = if *name == AUDIT_TABLE {
                source.open_table(AUDIT_EVENTS)?.len()?
            } else {
                source.open_table(str_table(name))?.len()?
            };
            counts.push(((*name).to_string(), len));
            total += len;
        }
        let mut done = 0u64;
        let mut tx = target.begin_write()?;
        tx.set_durability(redb::Durability::None)?;
        let mut in_tx = 0u64;
        // One body for both key types: rows go over in chunks, each chunk committed
        // (non-durably) so that a large table never sits whole in memory.
        macro_rules! copy_table {
            ($def:expr) => {{
                let from = source.open_table($def)?;
                tx.open_table($def)?;
                let mut rows = from.iter()?;
                loop {
                    let mut to = tx.open_table($def)?;
                    let mut moved = false;
                    for row in rows.by_ref() {
                        let (k, v) = row?;
                        to.insert(k.value(), v.value())?;
                        moved = true;
                        done += 1;
                        in_tx += 1;
                        if in_tx == ROWS_PER_COMMIT {
                            break;
                        }
                    }
                    drop(to);
                    if in_tx == ROWS_PER_COMMIT {
                        tx.commit()?;
                        progress(done, total);
                        tx = target.begin_write()?;
                        tx.set_durability(redb::Durability::None)?;
                        in_tx = 0;
                    }
                    if !moved {
                        break;
                    }
                }
            }};
        }
        for name in tables::ALL_TABLES {
            if *name == AUDIT_TABLE {
                copy_table!(AUDIT_EVENTS);
            } else {
                copy_table!(str_table(name));
            }
        }
        tx.set_durability(redb::Durability::Immediate)?;
        tx.commit()?;
        progress(done, total);
        drop(target);
        // The durable commit synced the file's contents; this syncs its length and
        // metadata before the rename makes it the backup.
        fs::File::open(partial)
            .and_then(|f| f.sync_all())
            .map_err(io("cannot sync", partial))?;
        Ok(counts)
    }
}

/// True when another process has the data file at `path` open (a running server):
/// redb's own lock decides, through a read-only open that never writes.
pub fn in_use(path: &Path) -> Result<bool, StoreError> {
    if !path.exists() {
        return Ok(false);
    }
    crate::contain::contain(path, || match builder().open_read_only(path) {
        Ok(_) | Err(redb::DatabaseError::RepairAborted) => Ok(false),
        Err(redb::DatabaseError::DatabaseAlreadyOpen) => Ok(true),
        Err(err) => Err(map_open_error(path, err)),
    })
}

/// Opens a backup read-only and checks it: a redb file gatehouse wrote, a format this
/// build reads, sealed under `sealer`'s key; returns its row counts. Never writes.
pub fn inspect(path: &Path, sealer: &Sealer) -> Result<BackupInfo, StoreError> {
    let meta = fs::metadata(path).map_err(io("cannot read", path))?;
    if !meta.is_file() {
        return Err(StoreError::NotADataFile {
            path: path.to_path_buf(),
            reason: "it is not a regular file".into(),
        });
    }
    let (format_version, counts) = crate::contain::contain(path, || {
        let db = builder()
            .open_read_only(path)
            .map_err(|e| map_open_error(path, e))?;
        let tx = db.begin_read().map_err(|e| corrupt(path, e))?;
        let format_version = check_meta(&tx, path, sealer)?;
        let mut counts = Vec::new();
        for name in tables::ALL_TABLES {
            let def = str_table(name);
            match tx.open_untyped_table(def) {
                Ok(table) => counts.push((
                    (*name).to_string(),
                    table.len().map_err(|e| corrupt(path, e))?,
                )),
                // An older format lacks the newer tables; restore migrates it.
                Err(redb::TableError::TableDoesNotExist(_)) => {}
                Err(err) => return Err(corrupt(path, err)),
            }
        }
        Ok((format_version, counts))
    })?;
    Ok(BackupInfo {
        path: path.to_path_buf(),
        bytes: meta.len(),
        format_version,
        counts,
    })
}
