//! gatehouse's storage: the only crate that names redb, defines tables and runs
//! transactions. The rest of gatehouse reaches the data file through `Store`,
//! `ReadTx`, `WriteTx` and the typed records; `docs/ARCHITECTURE.md` says what a second
//! backend must provide.
//!
//! Opening is careful about never changing a file it should refuse. An existing file is
//! first inspected through redb's read-only mode, which never writes: format version,
//! instance facts and the master-key check value are read there, and a file from a newer
//! build, a wrong master key or a damaged file is refused before anything is written. A
//! file that was not closed cleanly is repaired on a copy, which replaces the original
//! only once it has opened and passed the same checks; the original is kept beside it.
//! Migrations then run in one write transaction, before any socket accepts traffic.
//!
//! Writes go through the group-commit writer (`writer.rs`); reads run on the caller's
//! thread in a read transaction (`tx.rs`). `schema/data-file.md` documents the format.

mod audit_chain;
mod backup;
mod contain;
mod migrate;
mod pg;
pub mod records;
mod redb_rows;
mod rows;
pub mod seal;
mod tables;
mod tx;
mod writer;

use std::fs;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;

use redb::{ReadableDatabase, ReadableTable, TableHandle};
use tokio::sync::{mpsc, oneshot};

use audit_chain::ChainKey;
pub use audit_chain::{AuditFilter, AuditPage, ChainBreak, ChainReport, ChainTip, Pruned};
pub use backup::{BackupInfo, in_use, inspect};
use gatehouse_clock::Clock;
pub use migrate::Migrated;
use pg::Postgres;
pub use pg::{
    Change, DatabaseProbe, FOLLOWED_TABLES, Followed, PostgresTarget, pgpass_lookup, probe,
    probe_is_local,
};
use redb_rows::{RedbRead, RedbWrite};
use seal::{MasterKey, SealError, Sealer, sync_parent_dir};
pub use tables::{ALL_TABLES, FORMAT_VERSION, MASTER_KEY_CHECK_PLAINTEXT};
use tables::{META, META_CREATED_AT, META_FORMAT_VERSION, META_INSTANCE_ID, META_MASTER_KEY_CHECK};
pub use tx::{
    ADMIN_TOKENS, BANS, CLIENTS, DEVICE_FAMILIES, DEVICE_GRANT_CODES, DEVICE_GRANTS, DEVICES,
    DEVICES_BY_AGE, FAMILY_BINDINGS, FAMILY_REVOCATIONS, Index, JOBS, PAIRING_SESSIONS,
    RATE_WINDOWS, REFRESH_TOKENS, REVOKED_TOKENS, ReadTx, Records, SIGNING_KEYS, STATUS_ALLOCATION,
    STATUS_ALLOCATION_KEY, STATUS_LIST_INDEX_BITS, STATUS_REVOKED, TOKEN_FAMILIES, WriteTx,
    device_age_key, device_family_key, device_grant_code_key, status_index_key, status_list_prefix,
};
use writer::{Job, Pending, WriterContext};

/// redb's page cache is allocated as it fills; this caps it for small VPSes.
const CACHE_BYTES: usize = 128 * 1024 * 1024;

/// Everything that can go wrong with the data file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the data file {path} is in use by another process (a running `gatehouse serve`?); \
         stop it, or run the command while it runs so it goes through the admin socket"
    )]
    Locked { path: PathBuf },
    #[error("{path} is not a gatehouse data file: {reason}")]
    NotADataFile { path: PathBuf, reason: String },
    #[error(
        "the data file {path} is damaged ({reason}); it was left untouched. \
         Restore it from a backup (gatehouse restore FILE)"
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "the data file {path} was written by a newer gatehouse (format {found}; this build \
         reads up to {supported}); it was left untouched. Upgrade gatehouse to open it"
    )]
    NewerFormat {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error(
        "the master key (fingerprint {fingerprint}) does not open the data file {path}: it \
         was sealed under another key. Nothing was changed"
    )]
    WrongMasterKey { path: PathBuf, fingerprint: String },
    #[error(
        "the data file {path} is open read-only (its file system or its permissions allow no \
         writes), and {what}: run the command where the file can be written"
    )]
    ReadOnly { path: PathBuf, what: &'static str },
    #[error("no migration from data-file format {from}: this build cannot upgrade that file")]
    NoMigration { from: u32 },
    #[error("stored value {table}/{key} cannot be decoded: {reason}")]
    Decode {
        table: &'static str,
        key: String,
        reason: String,
    },
    #[error("sealed value {table}/{key}: {source}")]
    SealedValue {
        table: &'static str,
        key: String,
        source: SealError,
    },
    /// The storage engine failed. Its own error is kept as text, so that no engine's type
    /// reaches the rest of gatehouse.
    #[error("database error: {0}")]
    Database(String),
    #[error("the data-file writer has stopped")]
    WriterStopped,
    #[error("a write job panicked; its transaction was rolled back")]
    JobPanicked,
    #[error("the write was not committed: {0}")]
    WriteFailed(String),
    #[error("the storage URL {url} cannot be used: {reason}")]
    BadStorageUrl { url: String, reason: String },
    #[error("the database {location} cannot be reached: {reason}")]
    Unreachable { location: String, reason: String },
    /// A transaction lost a race with another node's; the writer runs it again, so
    /// callers see this only after many losses in a row.
    #[error("the write lost a race with another node's write too often; try again")]
    Conflict,
    #[error(
        "the database {location} already holds gatehouse data ({rows} rows); \
         copying refuses to mix two stores: use an empty database"
    )]
    NotEmpty { location: String, rows: u64 },
    #[error(
        "the database {location} holds no gatehouse data yet: start a node on it first, or \
         copy a data file into it (gatehouse storage copy)"
    )]
    EmptyDatabase { location: String },
    #[error(
        "{count} other gatehouse process(es) are connected to the database, and would go \
         on sealing with the old key: stop them, rekey, then start them with the new key"
    )]
    OtherNodes { count: u64 },
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(err: $t) -> Self {
                Self::Database(err.to_string())
            }
        }
    )*};
}
from_redb!(
    redb::Error,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

/// What opening the data file did, for the start-up log.
#[derive(Debug, Default)]
pub struct OpenReport {
    /// The file did not exist and was created.
    pub created: bool,
    pub migrated: Option<Migrated>,
    /// The file had not been closed cleanly; it was repaired and the original kept here.
    pub recovered_original: Option<PathBuf>,
    /// Things an operator should fix, such as file permissions.
    pub warnings: Vec<String>,
}

/// Facts about the instance stored in `meta`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceInfo {
    pub instance_id: String,
    pub created_at_ms: u64,
    pub format_version: u32,
}

/// A handle to the open data file. Cheap to clone; every clone shares the one writer.
#[derive(Clone, Debug)]
pub struct Store {
    shared: Arc<Shared>,
}

/// What holds a store's data: the data file open for writing, with the writer thread,
/// or read-only (a data file or backup on read-only media, or one this process may not
/// write); or a PostgreSQL database shared by several nodes.
enum Engine {
    Writable(Arc<redb::Database>),
    ReadOnly(redb::ReadOnlyDatabase),
    Postgres(Arc<Postgres>),
}

impl Engine {
    /// Runs `f` on one consistent snapshot.
    fn read<R>(
        &self,
        f: impl FnOnce(&dyn rows::Rows) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        match self {
            Self::Writable(db) => f(&RedbRead(&db.begin_read()?)),
            Self::ReadOnly(db) => f(&RedbRead(&db.begin_read()?)),
            Self::Postgres(db) => db.read(f),
        }
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Writable(_) => f.write_str("Engine::Writable"),
            Self::ReadOnly(_) => f.write_str("Engine::ReadOnly"),
            Self::Postgres(db) => write!(f, "Engine::{db:?}"),
        }
    }
}

#[derive(Debug)]
struct Shared {
    db: Engine,
    path: PathBuf,
    sealer: Arc<RwLock<Arc<Sealer>>>,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    healthy: Arc<AtomicBool>,
    chain: Arc<ChainKey>,
    info: InstanceInfo,
    commits: Arc<AtomicU64>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Job")
    }
}

impl Store {
    /// Opens the data file at `path`, creating it if it does not exist.
    pub fn open(
        path: &Path,
        master: &MasterKey,
        clock: &dyn Clock,
    ) -> Result<(Self, OpenReport), StoreError> {
        let sealer = Sealer::new(master);
        let mut report = OpenReport::default();
        let db = match fs::symlink_metadata(path) {
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                report.created = true;
                create_new(path, &sealer, clock)?
            }
            Err(source) => {
                return Err(StoreError::Io {
                    action: "cannot read",
                    path: path.to_path_buf(),
                    source,
                });
            }
            Ok(meta) => {
                if !meta.is_file() {
                    return Err(StoreError::NotADataFile {
                        path: path.to_path_buf(),
                        reason: "it is not a regular file".into(),
                    });
                }
                if meta.mode() & 0o077 != 0 {
                    report.warnings.push(format!(
                        "the data file {} can be read by group or others (mode {:o}); \
                         fix with: chmod 600 {}",
                        path.display(),
                        meta.mode() & 0o777,
                        path.display()
                    ));
                }
                match contain::contain(path, || Ok(inspect_read_only(path, &sealer))) {
                    Ok(Ok(())) => {}
                    Ok(Err(Inspect::NeedsRecovery)) => {
                        report.recovered_original = Some(recover_via_copy(path, &sealer)?);
                    }
                    Ok(Err(Inspect::Refused(err))) | Err(err) => return Err(err),
                }
                let (db, migrated) = contain::contain(path, || {
                    let db = builder()
                        .open(path)
                        .map_err(|err| map_open_error(path, err))?;
                    let migrated = migrate_db(&db)?;
                    Ok((db, migrated))
                })?;
                report.migrated = migrated;
                db
            }
        };
        let (info, chain) = contain::contain(path, || {
            Ok((read_instance_info(&db, path)?, chain_key(&db, &sealer)?))
        })?;
        let db = Engine::Writable(Arc::new(db));
        Ok((Self::start(db, path, sealer, chain, info)?, report))
    }

    /// Opens the store in a PostgreSQL database, creating its tables and instance facts
    /// if the database has none (a new cluster). A database made by a newer build, or
    /// sealed under another master key, is refused before anything is written.
    pub fn open_postgres(
        target: &PostgresTarget,
        master: &MasterKey,
        clock: &dyn Clock,
    ) -> Result<(Self, OpenReport), StoreError> {
        Self::open_postgres_as(target, master, clock, true)
    }

    /// `open_postgres` for a database a node has already started on (management
    /// commands): an empty one is refused, not set up under this command's key.
    pub fn open_postgres_existing(
        target: &PostgresTarget,
        master: &MasterKey,
        clock: &dyn Clock,
    ) -> Result<Self, StoreError> {
        Self::open_postgres_as(target, master, clock, false).map(|(store, _)| store)
    }

    fn open_postgres_as(
        target: &PostgresTarget,
        master: &MasterKey,
        clock: &dyn Clock,
        create: bool,
    ) -> Result<(Self, OpenReport), StoreError> {
        let sealer = Sealer::new(master);
        let db = Arc::new(Postgres::connect(target)?);
        let location = PathBuf::from(db.location());
        if !create && !db.initialised()? {
            return Err(StoreError::EmptyDatabase {
                location: db.location().to_string(),
            });
        }
        let mut report = OpenReport::default();
        // Also adds a table a newer build introduced (the change feed) to an older database.
        db.create_tables()?;
        // Before the caller loads its caches: the follower starts here.
        db.set_mark()?;
        // Every node that starts on an empty database races to write its facts; the
        // serializable transaction lets exactly one of them do it.
        let made = Self::postgres_initialise(&db, &sealer, clock)?;
        report.created = made;
        let mut version = db.read(|rows| check_meta_rows(rows, &location, &sealer))?;
        if (migrate::TABLES_ONLY_FROM..FORMAT_VERSION).contains(&version) {
            // The tables the newer format adds were made above; only the version is left.
            Self::postgres_upgrade(&db)?;
            report.migrated = Some(Migrated {
                from: version,
                to: FORMAT_VERSION,
                steps: migrate::descriptions(version),
            });
            version = FORMAT_VERSION;
        }
        if version != FORMAT_VERSION {
            return Err(StoreError::NoMigration { from: version });
        }
        let info = db.read(|rows| instance_info(rows, &location))?;
        let chain = db.read(|rows| ChainKey::load(rows, &sealer))?;
        let store = Self::start(Engine::Postgres(db), &location, sealer, chain, info)?;
        Ok((store, report))
    }

    /// Records the current format in a database whose older format differs from it only
    /// by tables `create_tables` has made. Nodes starting at once may all write it.
    fn postgres_upgrade(db: &Postgres) -> Result<(), StoreError> {
        for _ in 0..32 {
            let mut failed = None;
            let written = db.transact(&mut |rows| match rows.put(
                tables::META_NAME,
                META_FORMAT_VERSION,
                &FORMAT_VERSION.to_le_bytes(),
            ) {
                Ok(()) => true,
                Err(err) => {
                    failed = Some(err);
                    false
                }
            });
            match (written, failed) {
                (Err(StoreError::Conflict), _) | (_, Some(StoreError::Conflict)) => continue,
                (_, Some(err)) | (Err(err), None) => return Err(err),
                (Ok(_), None) => return Ok(()),
            }
        }
        Err(StoreError::Conflict)
    }

    /// Writes the instance facts and the audit chain key into an empty database;
    /// whether this call wrote them.
    fn postgres_initialise(
        db: &Postgres,
        sealer: &Sealer,
        clock: &dyn Clock,
    ) -> Result<bool, StoreError> {
        for _ in 0..32 {
            let mut failed = None;
            let made = db.transact(&mut |rows| {
                let step = (|| {
                    if rows.get(tables::META_NAME, META_FORMAT_VERSION)?.is_some() {
                        return Ok(false);
                    }
                    write_meta(rows, sealer, clock)?;
                    ChainKey::read_or_create(rows, sealer)?;
                    Ok(true)
                })();
                match step {
                    Ok(made) => made,
                    Err(err) => {
                        failed = Some(err);
                        false
                    }
                }
            });
            match (made, failed) {
                (Err(StoreError::Conflict), _) => continue,
                (_, Some(StoreError::Conflict)) => continue,
                (_, Some(err)) | (Err(err), None) => return Err(err),
                (Ok(made), None) => return Ok(made),
            }
        }
        Err(StoreError::Conflict)
    }

    fn start(
        db: Engine,
        path: &Path,
        sealer: Sealer,
        chain: ChainKey,
        info: InstanceInfo,
    ) -> Result<Self, StoreError> {
        let chain = Arc::new(chain);
        let target = match &db {
            Engine::Writable(db) => writer::Target::Redb(db.clone()),
            Engine::Postgres(db) => writer::Target::Postgres(db.clone()),
            Engine::ReadOnly(_) => {
                return Err(StoreError::ReadOnly {
                    path: path.to_path_buf(),
                    what: "a writer cannot start on it",
                });
            }
        };
        let sealer = Arc::new(RwLock::new(Arc::new(sealer)));
        let healthy = Arc::new(AtomicBool::new(true));
        let commits = Arc::new(AtomicU64::new(0));
        let (sender, receiver) = mpsc::channel(writer::QUEUE_DEPTH);
        let ctx = WriterContext {
            target,
            sealer: sealer.clone(),
            healthy: healthy.clone(),
            chain: chain.clone(),
            commits: commits.clone(),
        };
        let handle = std::thread::Builder::new()
            .name("gatehouse-writer".into())
            .spawn(move || writer::run(ctx, receiver))
            .map_err(|source| StoreError::Io {
                action: "cannot start the writer thread for",
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Self {
            shared: Arc::new(Shared {
                db,
                path: path.to_path_buf(),
                sealer,
                jobs: Mutex::new(Some(sender)),
                writer: Mutex::new(Some(handle)),
                healthy,
                chain,
                info,
                commits,
            }),
        })
    }

    /// Opens an existing data file for reading only, writing nothing to it: for a file
    /// on read-only media or one this process may not write (a backup on a mounted
    /// disk). The file must be at this build's format and closed cleanly, since a
    /// migration or a repair would write; every write answers `StoreError::ReadOnly`.
    pub fn open_read_only(path: &Path, master: &MasterKey) -> Result<Self, StoreError> {
        let sealer = Sealer::new(master);
        let (db, info, chain) = contain::contain(path, || {
            let db = match builder().open_read_only(path) {
                Ok(db) => db,
                Err(redb::DatabaseError::RepairAborted) => {
                    return Err(StoreError::Corrupt {
                        path: path.to_path_buf(),
                        reason: "it was not closed cleanly and needs a repair, which would \
                                 write to it; open it where it can be written"
                            .into(),
                    });
                }
                Err(err) => return Err(map_open_error(path, err)),
            };
            let tx = db.begin_read().map_err(|e| corrupt(path, e))?;
            let version = check_meta(&tx, path, &sealer)?;
            if version != FORMAT_VERSION {
                return Err(StoreError::ReadOnly {
                    path: path.to_path_buf(),
                    what: "it is at an older format, and upgrading it would write to it",
                });
            }
            drop(tx);
            let info = read_instance_info(&db, path)?;
            let chain = ChainKey::load(&RedbRead(&db.begin_read()?), &sealer)?;
            Ok((db, info, chain))
        })?;
        Ok(Self {
            shared: Arc::new(Shared {
                db: Engine::ReadOnly(db),
                path: path.to_path_buf(),
                sealer: Arc::new(RwLock::new(Arc::new(sealer))),
                jobs: Mutex::new(None),
                writer: Mutex::new(None),
                healthy: Arc::new(AtomicBool::new(true)),
                chain: Arc::new(chain),
                info,
                commits: Arc::new(AtomicU64::new(0)),
            }),
        })
    }

    /// Other nodes' changes to the tables this node mirrors (`FOLLOWED_TABLES`), from
    /// the moment the store opened: `None` on a data file, which no one else writes.
    pub fn follow(&self) -> Result<Option<mpsc::Receiver<Followed>>, StoreError> {
        match &self.shared.db {
            Engine::Postgres(db) => db.follow().map(Some),
            Engine::Writable(_) | Engine::ReadOnly(_) => Ok(None),
        }
    }

    /// Whether this node runs the scheduled jobs: always on a data file; on
    /// PostgreSQL, the one node whose change follower holds the leader lock.
    pub fn is_leader(&self) -> bool {
        match &self.shared.db {
            Engine::Postgres(db) => db.is_leader(),
            Engine::Writable(_) | Engine::ReadOnly(_) => true,
        }
    }

    /// The number of the audit chain this process appends to, once it has appended
    /// (PostgreSQL only: a data file keeps one chain).
    pub fn own_audit_chain(&self) -> Option<u64> {
        match &self.shared.db {
            Engine::Postgres(db) => db.own_chain(),
            Engine::Writable(_) | Engine::ReadOnly(_) => None,
        }
    }

    /// Whether this store lives in a PostgreSQL database.
    pub fn is_postgres(&self) -> bool {
        matches!(self.shared.db, Engine::Postgres(_))
    }

    /// Whether this store was opened with `open_read_only`.
    pub fn is_read_only(&self) -> bool {
        matches!(self.shared.db, Engine::ReadOnly(_))
    }

    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    pub fn info(&self) -> &InstanceInfo {
        &self.shared.info
    }

    /// The fingerprint of the master key in use.
    pub fn master_key_fingerprint(&self) -> String {
        self.with_sealer(|s| s.fingerprint().to_string())
    }

    /// The change counter: write transactions committed since the store opened. A
    /// reader that saw `n` has seen every write up to the n-th; it only grows.
    pub fn commits(&self) -> u64 {
        self.shared.commits.load(Ordering::SeqCst)
    }

    /// False once a commit has failed (redb refuses writes after an I/O error) or the
    /// writer has been closed.
    pub fn is_healthy(&self) -> bool {
        self.shared.healthy.load(Ordering::SeqCst) && self.sender().is_some()
    }

    fn with_sealer<R>(&self, f: impl FnOnce(&Sealer) -> R) -> R {
        match self.shared.sealer.read() {
            Ok(guard) => f(&guard),
            Err(poisoned) => f(&poisoned.into_inner()),
        }
    }

    fn sender(&self) -> Option<mpsc::Sender<Job>> {
        match self.shared.jobs.lock() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Runs `f` in a read transaction. Meant for short lookups; long scans belong in
    /// `spawn_blocking`.
    pub fn read<R>(
        &self,
        f: impl FnOnce(&ReadTx<'_>) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        // The sealer lock is held for the whole read so a concurrent rekey cannot swap
        // keys between this transaction's snapshot and its opening of sealed values.
        self.with_sealer(|sealer| {
            self.shared.db.read(|rows| {
                f(&ReadTx {
                    rows,
                    sealer,
                    chain: &self.shared.chain,
                })
            })
        })
    }

    /// Runs `job` in the group-commit writer and answers once its transaction is durable.
    ///
    /// The job may run more than once (a failing neighbour in its batch makes the writer
    /// retry each job alone), so it must not have effects outside the transaction.
    pub async fn write<R, E, F>(&self, job: F) -> Result<R, E>
    where
        F: FnMut(&WriteTx<'_>) -> Result<R, E> + Send + 'static,
        R: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        if self.is_read_only() {
            return Err(StoreError::ReadOnly {
                path: self.shared.path.clone(),
                what: "this changes it",
            }
            .into());
        }
        let sender = self.sender().ok_or(StoreError::WriterStopped)?;
        let (reply, answer) = oneshot::channel();
        sender
            .send(Job::Write(Box::new(Pending::new(job, reply))))
            .await
            .map_err(|_| StoreError::WriterStopped)?;
        answer.await.map_err(|_| StoreError::WriterStopped)?
    }

    /// Re-seals every sealed value and the master-key check under `new` in one
    /// transaction; from its commit on, this store uses `new`. Returns the number of
    /// secrets re-sealed.
    pub async fn rekey(&self, new: &MasterKey) -> Result<u64, StoreError> {
        // Nodes sharing a database each hold the master key; one that is not told would
        // seal with the old key what the others cannot open. (A node that starts after
        // this check fails the key check once the rekey has committed.)
        if let Engine::Postgres(db) = &self.shared.db {
            let count = db.other_processes()?;
            if count > 0 {
                return Err(StoreError::OtherNodes { count });
            }
        }
        let sender = self.sender().ok_or(StoreError::WriterStopped)?;
        let (reply, answer) = oneshot::channel();
        sender
            .send(Job::Rekey {
                new_sealer: Arc::new(Sealer::new(new)),
                reply,
            })
            .await
            .map_err(|_| StoreError::WriterStopped)?;
        answer.await.map_err(|_| StoreError::WriterStopped)?
    }

    /// Stops the writer after every queued job has been committed and answered. Blocks
    /// until then; call through `spawn_blocking` from async code. Later writes fail with
    /// `WriterStopped`. The file is released when the last clone is dropped.
    pub fn close(&self) {
        let sender = match self.shared.jobs.lock() {
            Ok(mut guard) => guard.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        drop(sender);
        let handle = match self.shared.writer.lock() {
            Ok(mut guard) => guard.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(handle) = handle
            && handle.join().is_err()
        {
            tracing::error!("the data-file writer thread panicked");
        }
    }
}

fn builder() -> redb::Builder {
    let mut builder = redb::Builder::new();
    builder.set_cache_size(CACHE_BYTES);
    builder
}

/// Every write transaction: durable on commit, two-phase commit (redb's advice when
/// attacker-influenced data is written and the process may be crashed) and quick repair
/// (allocator state saved per commit, so a crash needs no full scan and the read-only
/// inspection at the next start can open the file).
fn begin_durable_write(db: &redb::Database) -> Result<redb::WriteTransaction, StoreError> {
    let mut tx = db.begin_write()?;
    tx.set_durability(redb::Durability::Immediate)?;
    tx.set_two_phase_commit(true);
    tx.set_quick_repair(true);
    Ok(tx)
}

fn create_new(
    path: &Path,
    sealer: &Sealer,
    clock: &dyn Clock,
) -> Result<redb::Database, StoreError> {
    let io = |action: &'static str| {
        move |source| StoreError::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    };
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io("cannot create the data file"))?;
    let result = (|| {
        file.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(io("cannot set permissions on"))?;
        let backend =
            redb::backends::FileBackend::new(file).map_err(|err| map_open_error(path, err))?;
        let db = builder()
            .create_with_backend(backend)
            .map_err(|err| map_open_error(path, err))?;
        initialise(&db, sealer, clock)?;
        sync_parent_dir(path).map_err(io("cannot sync the directory of"))?;
        Ok(db)
    })();
    if result.is_err() {
        // Nothing of a half-created file is left behind.
        let _ = fs::remove_file(path);
    }
    result
}

fn initialise(db: &redb::Database, sealer: &Sealer, clock: &dyn Clock) -> Result<(), StoreError> {
    let tx = begin_durable_write(db)?;
    write_meta(&RedbWrite::new(&tx), sealer, clock)?;
    // Every table of the format exists in every file (counts and backups rely on it).
    tables::create_missing(&tx)?;
    tx.commit()?;
    Ok(())
}

/// The instance facts of a new store: format version, a random instance id, the
/// creation time and the master-key check value.
fn write_meta(
    rows: &dyn rows::RowsMut,
    sealer: &Sealer,
    clock: &dyn Clock,
) -> Result<(), StoreError> {
    use tables::META_NAME;
    let mut instance_id = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut instance_id).map_err(
        |_| StoreError::SealedValue {
            table: "meta",
            key: META_INSTANCE_ID.into(),
            source: SealError::Random,
        },
    )?;
    let check = seal_check(sealer)?;
    rows.put(
        META_NAME,
        META_FORMAT_VERSION,
        &FORMAT_VERSION.to_le_bytes(),
    )?;
    rows.put(META_NAME, META_INSTANCE_ID, &records::encode(&instance_id))?;
    rows.put(
        META_NAME,
        META_CREATED_AT,
        &records::encode(&clock.now_ms()),
    )?;
    rows.put(META_NAME, META_MASTER_KEY_CHECK, &check)?;
    Ok(())
}

fn seal_check(sealer: &Sealer) -> Result<Vec<u8>, StoreError> {
    sealer
        .seal(
            META.name(),
            META_MASTER_KEY_CHECK.as_bytes(),
            MASTER_KEY_CHECK_PLAINTEXT,
        )
        .map_err(|source| StoreError::SealedValue {
            table: "meta",
            key: META_MASTER_KEY_CHECK.into(),
            source,
        })
}

enum Inspect {
    NeedsRecovery,
    Refused(StoreError),
}

impl From<StoreError> for Inspect {
    fn from(err: StoreError) -> Self {
        Self::Refused(err)
    }
}

/// Checks an existing file without writing to it.
fn inspect_read_only(path: &Path, sealer: &Sealer) -> Result<(), Inspect> {
    let db = match builder().open_read_only(path) {
        Ok(db) => db,
        Err(redb::DatabaseError::RepairAborted) => return Err(Inspect::NeedsRecovery),
        Err(err) => return Err(Inspect::Refused(map_open_error(path, err))),
    };
    let tx = db.begin_read().map_err(|e| corrupt(path, e))?;
    check_meta(&tx, path, sealer)?;
    Ok(())
}

/// Format version and master key: the two reasons to refuse a well-formed file.
fn check_meta(tx: &redb::ReadTransaction, path: &Path, sealer: &Sealer) -> Result<u32, StoreError> {
    match tx.open_table(META) {
        Ok(_) => check_meta_rows(&RedbRead(tx), path, sealer),
        Err(redb::TableError::TableDoesNotExist(_)) => Err(StoreError::NotADataFile {
            path: path.to_path_buf(),
            reason: "it is a redb file without gatehouse's meta table".into(),
        }),
        Err(err) => Err(corrupt(path, err)),
    }
}

/// `check_meta` on any engine's rows; `path` names the store in errors.
fn check_meta_rows(rows: &dyn rows::Rows, path: &Path, sealer: &Sealer) -> Result<u32, StoreError> {
    let get = |key: &str| -> Result<Vec<u8>, StoreError> {
        rows.get(tables::META_NAME, key)
            .map_err(|e| corrupt(path, e))?
            .ok_or_else(|| StoreError::Corrupt {
                path: path.to_path_buf(),
                reason: format!("meta has no {key}"),
            })
    };
    let version_bytes = get(META_FORMAT_VERSION)?;
    let version = <[u8; 4]>::try_from(version_bytes.as_slice())
        .map(u32::from_le_bytes)
        .map_err(|_| StoreError::Corrupt {
            path: path.to_path_buf(),
            reason: "meta format_version is not 4 bytes".into(),
        })?;
    if version > FORMAT_VERSION {
        return Err(StoreError::NewerFormat {
            path: path.to_path_buf(),
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    if version == 0 {
        return Err(StoreError::Corrupt {
            path: path.to_path_buf(),
            reason: "format version 0".into(),
        });
    }
    let check = get(META_MASTER_KEY_CHECK)?;
    match sealer.open(META.name(), META_MASTER_KEY_CHECK.as_bytes(), &check) {
        Ok(plain) if plain == MASTER_KEY_CHECK_PLAINTEXT => Ok(version),
        _ => Err(StoreError::WrongMasterKey {
            path: path.to_path_buf(),
            fingerprint: sealer.fingerprint().to_string(),
        }),
    }
}

fn corrupt(path: &Path, err: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        path: path.to_path_buf(),
        reason: err.to_string(),
    }
}

fn map_open_error(path: &Path, err: redb::DatabaseError) -> StoreError {
    match err {
        redb::DatabaseError::DatabaseAlreadyOpen | redb::DatabaseError::LockProtocolMismatch => {
            StoreError::Locked {
                path: path.to_path_buf(),
            }
        }
        redb::DatabaseError::UpgradeRequired(v) => StoreError::NotADataFile {
            path: path.to_path_buf(),
            reason: format!("it uses an old redb file format ({v})"),
        },
        redb::DatabaseError::RepairAborted => StoreError::Corrupt {
            path: path.to_path_buf(),
            reason: "it needs a repair that could not run".into(),
        },
        // redb reports a missing magic number or an empty file as InvalidData.
        redb::DatabaseError::Storage(redb::StorageError::Io(source))
            if source.kind() == std::io::ErrorKind::InvalidData =>
        {
            StoreError::NotADataFile {
                path: path.to_path_buf(),
                reason: source.to_string(),
            }
        }
        redb::DatabaseError::Storage(redb::StorageError::Io(source))
            if source.kind() != std::io::ErrorKind::UnexpectedEof =>
        {
            StoreError::Io {
                action: "cannot open",
                path: path.to_path_buf(),
                source,
            }
        }
        other => StoreError::Corrupt {
            path: path.to_path_buf(),
            reason: other.to_string(),
        },
    }
}

/// Repairs a file that was not closed cleanly on a copy; the copy replaces the original
/// only after it opened and passed the meta checks. Returns where the original was kept.
fn recover_via_copy(path: &Path, sealer: &Sealer) -> Result<PathBuf, StoreError> {
    let work = sibling(path, ".recovering");
    let io = |action: &'static str, at: &Path| {
        let at = at.to_path_buf();
        move |source| StoreError::Io {
            action,
            path: at,
            source,
        }
    };
    tracing::warn!(path = %path.display(), "the data file was not closed cleanly; repairing a copy");
    let _ = fs::remove_file(&work);
    fs::copy(path, &work).map_err(io("cannot copy the data file to", &work))?;
    let checked = contain::contain(path, || {
        fs::set_permissions(&work, fs::Permissions::from_mode(0o600))
            .map_err(io("cannot set permissions on", &work))?;
        let db = builder()
            .open(&work)
            .map_err(|err| map_open_error(path, err))?;
        let tx = db.begin_read().map_err(|e| corrupt(path, e))?;
        check_meta(&tx, path, sealer)?;
        drop(tx);
        db.close().map_err(|e| corrupt(path, e))?;
        fs::File::open(&work)
            .and_then(|f| f.sync_all())
            .map_err(io("cannot sync", &work))
    });
    if let Err(err) = checked {
        let _ = fs::remove_file(&work);
        return Err(err);
    }
    let kept = sibling(path, ".before-recovery");
    let _ = fs::remove_file(&kept);
    fs::hard_link(path, &kept)
        .or_else(|_| fs::copy(path, &kept).map(|_| ()))
        .map_err(io("cannot keep the original data file as", &kept))?;
    fs::rename(&work, path).map_err(io("cannot replace the data file", path))?;
    sync_parent_dir(path).map_err(io("cannot sync the directory of", path))?;
    tracing::warn!(kept = %kept.display(), "data file repaired; the original is kept");
    Ok(kept)
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

fn read_version(tx: &redb::WriteTransaction) -> Result<u32, StoreError> {
    let meta = tx.open_table(META)?;
    let bytes = meta
        .get(META_FORMAT_VERSION)?
        .map(|v| v.value().to_vec())
        .unwrap_or_default();
    <[u8; 4]>::try_from(bytes.as_slice())
        .map(u32::from_le_bytes)
        .map_err(|_| StoreError::Decode {
            table: "meta",
            key: META_FORMAT_VERSION.into(),
            reason: "not 4 bytes".into(),
        })
}

fn migrate_db(db: &redb::Database) -> Result<Option<Migrated>, StoreError> {
    let tx = begin_durable_write(db)?;
    let found = read_version(&tx)?;
    match migrate::run(&tx, found) {
        Ok(Some(migrated)) => {
            tx.commit()?;
            Ok(Some(migrated))
        }
        Ok(None) => {
            tx.abort()?;
            Ok(None)
        }
        Err(err) => {
            tx.abort()?;
            Err(err)
        }
    }
}

fn read_instance_info(db: &impl ReadableDatabase, path: &Path) -> Result<InstanceInfo, StoreError> {
    instance_info(&RedbRead(&db.begin_read()?), path)
}

fn instance_info(rows: &dyn rows::Rows, path: &Path) -> Result<InstanceInfo, StoreError> {
    let get = |key: &'static str| -> Result<Vec<u8>, StoreError> {
        rows.get(tables::META_NAME, key)?
            .ok_or_else(|| corrupt(path, format!("meta has no {key}")))
    };
    let decode_err = |key: &'static str| {
        move |e: records::DecodeError| StoreError::Decode {
            table: "meta",
            key: key.into(),
            reason: e.to_string(),
        }
    };
    let id: [u8; 16] =
        records::decode(&get(META_INSTANCE_ID)?).map_err(decode_err(META_INSTANCE_ID))?;
    let created_at_ms: u64 =
        records::decode(&get(META_CREATED_AT)?).map_err(decode_err(META_CREATED_AT))?;
    let version = get(META_FORMAT_VERSION)?;
    let format_version = <[u8; 4]>::try_from(version.as_slice())
        .map(u32::from_le_bytes)
        .map_err(|_| corrupt(path, "meta format_version is not 4 bytes"))?;
    Ok(InstanceInfo {
        instance_id: data_encoding::HEXLOWER.encode(&id),
        created_at_ms,
        format_version,
    })
}

/// The audit chain key, made and stored (durably) at the first open of a file.
fn chain_key(db: &redb::Database, sealer: &Sealer) -> Result<ChainKey, StoreError> {
    if let Some(key) = ChainKey::read(&RedbRead(&db.begin_read()?), sealer)? {
        return Ok(key);
    }
    let tx = begin_durable_write(db)?;
    let key = ChainKey::read_or_create(&RedbWrite::new(&tx), sealer)?;
    tx.commit()?;
    Ok(key)
}

/// Re-seals every secret and the check value under `new` in `rows` (see `writer.rs`).
fn rekey_in(rows: &dyn rows::RowsMut, old: &Sealer, new: &Sealer) -> Result<u64, StoreError> {
    use tables::{META_NAME, SECRETS_NAME};
    let mut resealed = Vec::new();
    for (name, value) in rows.scan(SECRETS_NAME, rows::Scan::all())? {
        let sealed_err = |source| StoreError::SealedValue {
            table: SECRETS_NAME,
            key: name.clone(),
            source,
        };
        let plain = old
            .open(SECRETS_NAME, name.as_bytes(), &value)
            .map_err(sealed_err)?;
        let again = new
            .seal(SECRETS_NAME, name.as_bytes(), &plain)
            .map_err(sealed_err)?;
        resealed.push((name, again));
    }
    for (name, sealed) in &resealed {
        rows.put(SECRETS_NAME, name, sealed)?;
    }
    rows.put(META_NAME, META_MASTER_KEY_CHECK, &seal_check(new)?)?;
    Ok(resealed.len() as u64)
}
