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

use redb::{ReadableDatabase, ReadableTableMetadata, TableDefinition};

use super::rows::{CHUNK, Rows, Scan};
use super::seal::{Sealer, sync_parent_dir};
use super::tables::{self, AUDIT_EVENTS, AUDIT_EVENTS_NAME};
use super::{Store, StoreError, builder, check_meta, corrupt, map_open_error, sibling};

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

    /// Copies every row of this store into an empty PostgreSQL database (creating
    /// gatehouse's tables there), in one transaction, and checks the copy's row counts.
    /// Sealed values go over as they are: the database opens with this store's master
    /// key. Returns the rows per table.
    pub fn copy_to_postgres(
        &self,
        target: &super::PostgresTarget,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Vec<(String, u64)>, StoreError> {
        let db = super::Postgres::connect(target)?;
        let counts = db.load(|sink| {
            self.shared
                .db
                .read(|source| copy_all(source, progress, sink))
        })?;
        let copied = db.read(|rows| {
            tables::ALL_TABLES
                .iter()
                .map(|name| Ok(((*name).to_string(), rows.count(name)?)))
                .collect::<Result<Vec<_>, StoreError>>()
        })?;
        if copied != counts {
            return Err(StoreError::WriteFailed(format!(
                "the copy's row counts {copied:?} differ from the source's {counts:?}"
            )));
        }
        Ok(counts)
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
        let begin = || -> Result<redb::WriteTransaction, StoreError> {
            let mut tx = target.begin_write()?;
            tx.set_durability(redb::Durability::None)?;
            Ok(tx)
        };
        let first = begin()?;
        tables::create_missing(&first)?;
        let mut tx = Some(first);
        let mut in_tx = 0u64;
        let counts = self.shared.db.read(|source| {
            copy_all(source, progress, &mut |chunk| {
                let Some(open) = tx.as_ref() else {
                    return Err(StoreError::WriteFailed(
                        "the backup's transaction ended".into(),
                    ));
                };
                match chunk {
                    Chunk::Rows(name, rows) => {
                        let mut to = open.open_table(str_table(name))?;
                        for (key, value) in &rows {
                            to.insert(key.as_str(), value.as_slice())?;
                        }
                        in_tx += rows.len() as u64;
                    }
                    Chunk::Log(rows) => {
                        let mut to = open.open_table(AUDIT_EVENTS)?;
                        for (seq, value) in &rows {
                            to.insert(*seq, value.as_slice())?;
                        }
                        in_tx += rows.len() as u64;
                    }
                }
                // Committed (non-durably) in chunks, so that a large table never sits
                // whole in memory.
                if in_tx >= ROWS_PER_COMMIT
                    && let Some(full) = tx.take()
                {
                    // redb has one write transaction at a time: commit, then begin.
                    full.commit()?;
                    tx = Some(begin()?);
                    in_tx = 0;
                }
                Ok(())
            })
        })?;
        let mut last = match tx {
            Some(last) => last,
            None => begin()?,
        };
        last.set_durability(redb::Durability::Immediate)?;
        last.commit()?;
        drop(target);
        // The durable commit synced the file's contents; this syncs its length and
        // metadata before the rename makes it the backup.
        fs::File::open(partial)
            .and_then(|f| f.sync_all())
            .map_err(io("cannot sync", partial))?;
        Ok(counts)
    }
}

/// A piece of a copy: rows of one key-value table, or of the audit log.
pub(crate) enum Chunk {
    Rows(&'static str, Vec<(String, Vec<u8>)>),
    Log(Vec<(u64, Vec<u8>)>),
}

/// Reads every row of every table from `source` in chunks and hands each to `sink`, in
/// table order; returns the rows per table. `progress` gets rows copied so far and
/// the total.
pub(crate) fn copy_all(
    source: &dyn Rows,
    progress: &mut dyn FnMut(u64, u64),
    sink: &mut dyn FnMut(Chunk) -> Result<(), StoreError>,
) -> Result<Vec<(String, u64)>, StoreError> {
    let mut counts = Vec::new();
    let mut total = 0u64;
    for name in tables::ALL_TABLES {
        let len = source.count(name)?;
        counts.push(((*name).to_string(), len));
        total += len;
    }
    let mut done = 0u64;
    for name in tables::ALL_TABLES {
        if *name == AUDIT_EVENTS_NAME {
            let mut from = 0;
            loop {
                let rows = source.log_from(from, CHUNK)?;
                let Some((last, _)) = rows.last() else { break };
                from = last.saturating_add(1);
                let moved = rows.len();
                done += moved as u64;
                sink(Chunk::Log(rows))?;
                progress(done, total);
                if moved < CHUNK {
                    break;
                }
            }
        } else {
            let mut after: Option<String> = None;
            loop {
                let scan = match &after {
                    Some(key) => Scan::first(CHUNK).after(key),
                    None => Scan::first(CHUNK),
                };
                let rows = source.scan(name, scan)?;
                let Some((last, _)) = rows.last() else { break };
                after = Some(last.clone());
                let moved = rows.len();
                done += moved as u64;
                sink(Chunk::Rows(name, rows))?;
                progress(done, total);
                if moved < CHUNK {
                    break;
                }
            }
        }
    }
    progress(done, total);
    Ok(counts)
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
