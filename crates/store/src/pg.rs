//! PostgreSQL: the engine for nodes that share one database.
//!
//! Every table of the data file is a table of the schema `gatehouse`, named after it
//! (`secrets.v1` is `gatehouse.secrets_v1`): a text key compared byte by byte (collation
//! "C", as redb compares keys) and the same bytes as value, sealed values included, so a
//! row means the same in both engines and a database dump alone opens no secret. The
//! audit log is keyed by a `bigint` sequence number.
//!
//! The client is tokio-postgres. Its connections run on a runtime of their own (one
//! thread, `gatehouse-pg`), and the store's synchronous callers — the writer thread, and
//! readers on whatever thread they run — wait on the client's futures with
//! `futures_executor::block_on`, which needs no runtime of its own and so works from a
//! tokio worker too. Write transactions are serializable: a job that re-checks a claim
//! inside its transaction sees a final answer even when another node writes the same
//! rows, and a transaction that loses such a race fails with a serialization error,
//! which the writer answers by running its batch again (`StoreError::Conflict`). Reads
//! run in a repeatable-read, read-only transaction: one snapshot for the closure's run.
//!
//! Nodes learn which mirrored rows another node changed through a change feed written
//! in the same transactions (`publish`, read by a `Follower`), and the follower's
//! connection holds the lock that makes its node the leader of the scheduled jobs
//! (docs/cluster.md says what each node mirrors and why).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_executor::block_on;
use tokio::sync::mpsc;
use tokio_postgres::config::SslMode;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Statement};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::StoreError;
use super::audit_chain;
use super::backup::Chunk;
use super::records::{self, ChainHead};
use super::rows::{NodeHead, Rows, RowsMut, Scan};
use super::tables::{ALL_TABLES, AUDIT_CHECKPOINT_NAME, AUDIT_EVENTS_NAME};

/// The schema that holds gatehouse's tables.
const SCHEMA: &str = "gatehouse";

/// Connections kept open for readers between reads.
const IDLE_READERS: usize = 8;

/// A PostgreSQL database: where it is, how to connect, and open connections.
pub(crate) struct Postgres {
    config: tokio_postgres::Config,
    /// TLS for every connection the server accepts it on (rustls on ring; the server's
    /// certificate and name are always checked).
    tls: MakeRustlsConnect,
    /// The URL without any password, for messages.
    location: String,
    /// Owns the connections' tasks; `None` only while dropping.
    runtime: Option<tokio::runtime::Runtime>,
    /// Connections for reads, taken by one reader at a time.
    idle: Mutex<Vec<Conn>>,
    /// The writer's connection, reopened after it is lost.
    writer: Mutex<Option<Conn>>,
    /// This process among the nodes: its changes carry it, so it skips its own.
    node: String,
    /// The change feed's position when the store opened: a follower starts there, so
    /// nothing committed after the caches were loaded is missed.
    mark: AtomicI64,
    /// Whether this process's follower holds the leader lock.
    leading: Arc<AtomicBool>,
    /// This process's own audit chain as of its last commit; `None` until its first
    /// record, and again after a commit whose outcome is unknown (the next record then
    /// starts a new chain rather than guess whether the last one is there).
    chain: Mutex<Option<NodeHead>>,
}

impl std::fmt::Debug for Postgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Postgres({})", self.location)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // A runtime may not be dropped where blocking is forbidden (a tokio worker):
        // its connection tasks are stopped without waiting.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// What `gatehouse doctor` reports of a database, read without changing anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseProbe {
    /// The server's version (`server_version`).
    pub server_version: String,
    /// Whether this connection is encrypted.
    pub tls: bool,
    /// Whether a node has set the database up (or a copy filled it).
    pub initialised: bool,
    /// Gatehouse processes connected now (not counting the probe).
    pub processes: u64,
    /// Whether one of them holds the leader lock (runs the scheduled jobs).
    pub led: bool,
}

/// Connects to the database as a node would (the same URL, password and TLS) and
/// reads what `DatabaseProbe` holds; writes nothing.
pub fn probe(target: &PostgresTarget) -> Result<DatabaseProbe, StoreError> {
    let db = Postgres::connect(target)?;
    let initialised = db.initialised()?;
    let conn = db.take_conn()?;
    let probe = (|| {
        let server_version = conn.query_one_value::<String>("SHOW server_version", &[])?;
        let tls = conn.query_one_value::<bool>(
            "SELECT coalesce((SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()), false)",
            &[],
        )?;
        let processes = conn.query_one_value::<i64>(
            "SELECT count(DISTINCT application_name) FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name LIKE 'gatehouse %' \
             AND application_name <> $1",
            &[&format!("gatehouse {}", db.node)],
        )?;
        let led = conn.query_one_value::<bool>(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' \
             AND granted AND database = (SELECT oid FROM pg_database \
             WHERE datname = current_database()) \
             AND objsubid = 1 AND ((classid::bigint << 32) | objid::bigint) = $1)",
            &[&LEADER_LOCK],
        )?;
        Ok(DatabaseProbe {
            server_version,
            tls,
            initialised,
            processes: u64::try_from(processes).unwrap_or(0),
            led,
        })
    })();
    db.give_back(conn);
    probe
}

/// The `PGPASSFILE`-style password file format, for `storage.password_file` and
/// libpq's own file (`~/.pgpass`): `host:port:database:user:password` lines, `*`
/// matching anything, `\` escaping `:` and `\`. Returns the first line that matches.
pub fn pgpass_lookup(text: &str, host: &str, port: u16, db: &str, user: &str) -> Option<String> {
    let port = port.to_string();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let mut fields = Vec::with_capacity(5);
        let mut field = String::new();
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => field.extend(chars.next()),
                ':' if fields.len() < 4 => fields.push(std::mem::take(&mut field)),
                c => field.push(c),
            }
        }
        fields.push(field);
        if fields.len() != 5 {
            continue;
        }
        let wanted = [host, port.as_str(), db, user];
        if fields[..4]
            .iter()
            .zip(wanted)
            .all(|(pattern, value)| pattern == "*" || pattern == value)
        {
            return fields.pop();
        }
    }
    None
}

/// What connecting needs: the `postgres://` URL (no password in it) and the password,
/// if the server asks for one.
#[derive(Clone)]
pub struct PostgresTarget {
    pub url: String,
    pub password: Option<String>,
    /// The certificates (DER) trusted to sign the server's, from `storage.ca_file`;
    /// `None`: Mozilla's roots.
    pub ca_roots: Option<Vec<Vec<u8>>>,
}

impl std::fmt::Debug for PostgresTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PostgresTarget({})", self.url)
    }
}

impl PostgresTarget {
    /// The parts of the URL a password file is matched against: host, port, database,
    /// user (libpq's defaults for those the URL leaves out).
    pub fn identity(&self) -> Result<(String, u16, String, String), StoreError> {
        let config = parse_url(&self.url)?;
        let host = match config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
            Some(tokio_postgres::config::Host::Unix(path)) => path.display().to_string(),
            None => "localhost".to_string(),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let user = config.get_user().unwrap_or_default().to_string();
        let db = config.get_dbname().unwrap_or(&user).to_string();
        Ok((host, port, db, user))
    }
}

/// The TLS client for the database: rustls on ring, trusting `target.ca_roots` (else
/// Mozilla's roots).
fn tls_connector(target: &PostgresTarget) -> Result<MakeRustlsConnect, StoreError> {
    let bad = |reason: String| StoreError::BadStorageUrl {
        url: redact(&target.url),
        reason,
    };
    let mut roots = rustls::RootCertStore::empty();
    match &target.ca_roots {
        Some(certificates) => {
            for der in certificates {
                roots
                    .add(rustls::pki_types::CertificateDer::from(der.clone()))
                    .map_err(|err| bad(format!("a certificate of storage.ca_file: {err}")))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|err| bad(format!("TLS: {err}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// Whether every host `url` names is this machine (false for a URL that does not
/// parse), for reports.
pub fn probe_is_local(url: &str) -> bool {
    parse_url(url).is_ok_and(|config| local_only(&config))
}

/// Whether every host the URL names is this machine (a Unix socket or a loopback
/// address), where an unencrypted connection crosses no network.
fn local_only(config: &tokio_postgres::Config) -> bool {
    config.get_hosts().iter().all(|host| match host {
        tokio_postgres::config::Host::Unix(_) => true,
        tokio_postgres::config::Host::Tcp(name) => {
            name == "localhost"
                || name
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
    })
}

fn parse_url(url: &str) -> Result<tokio_postgres::Config, StoreError> {
    if !url.starts_with("postgres://") && !url.starts_with("postgresql://") {
        return Err(StoreError::BadStorageUrl {
            url: url.to_string(),
            reason: "it must start with postgres://".into(),
        });
    }
    let config: tokio_postgres::Config = url.parse().map_err(|err| StoreError::BadStorageUrl {
        url: redact(url),
        reason: format!("{err}"),
    })?;
    if config.get_password().is_some() {
        return Err(StoreError::BadStorageUrl {
            url: redact(url),
            reason: "it holds a password, which would show in process lists and logs; \
                     put it in storage.password_file or the PostgreSQL password file \
                     (~/.pgpass) instead"
                .into(),
        });
    }
    if config.get_user().is_none() {
        return Err(StoreError::BadStorageUrl {
            url: url.to_string(),
            reason: "it names no user (postgres://USER@HOST/DB)".into(),
        });
    }
    Ok(config)
}

/// The URL with the password part of its user info, if any, replaced.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, tail) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((info, host)) if info.contains(':') => {
            let user = info.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}{tail}")
        }
        _ => url.to_string(),
    }
}

/// One connection and the statements prepared on it.
struct Conn {
    client: Client,
    /// The database's URL, for errors.
    location: std::sync::Arc<str>,
    statements: RefCell<HashMap<String, Statement>>,
}

impl Postgres {
    /// Connects once (so a wrong URL, an unreachable server or a refused password is
    /// an error now rather than at the first request).
    pub(crate) fn connect(target: &PostgresTarget) -> Result<Self, StoreError> {
        let mut config = parse_url(&target.url)?;
        if let Some(password) = &target.password {
            config.password(password.as_bytes());
        }
        let tls = tls_connector(target)?;
        if !target.url.contains("sslmode=") && !local_only(&config) {
            // libpq's default, `prefer`, goes on in the clear when a server offers no
            // TLS: to a database on another machine that would send the password's
            // proof and every sealed row over the network unencrypted.
            config.ssl_mode(SslMode::Require);
        }
        if config.get_ssl_mode() == SslMode::Disable && !local_only(&config) {
            tracing::warn!(location = %target.url, "sslmode=disable: the connection to the database is not encrypted");
        }
        let node = random_node_id()?;
        // Each process's connections carry its node id, so a rekey can tell the other
        // processes on the database from its own.
        config.application_name(format!("gatehouse {node}"));
        config.connect_timeout(std::time::Duration::from_secs(10));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("gatehouse-pg")
            .enable_all()
            .build()
            .map_err(|err| {
                StoreError::Database(format!("cannot start PostgreSQL's runtime: {err}"))
            })?;
        let db = Self {
            config,
            tls,
            location: target.url.clone(),
            runtime: Some(runtime),
            idle: Mutex::new(Vec::new()),
            writer: Mutex::new(None),
            node,
            mark: AtomicI64::new(0),
            leading: Arc::new(AtomicBool::new(false)),
            chain: Mutex::new(None),
        };
        let first = db.open_conn()?;
        db.give_back(first);
        Ok(db)
    }

    pub(crate) fn location(&self) -> &str {
        &self.location
    }

    fn open_conn(&self) -> Result<Conn, StoreError> {
        let runtime = self
            .runtime
            .as_ref()
            .ok_or_else(|| StoreError::Database("PostgreSQL's runtime has stopped".into()))?;
        let config = self.config.clone();
        let tls = self.tls.clone();
        let location = self.location.clone();
        let connecting = runtime.spawn(async move {
            let (client, connection) = config.connect(tls).await?;
            tokio::spawn(async move {
                if let Err(err) = connection.await {
                    tracing::warn!(error = %err, "PostgreSQL connection ended");
                }
            });
            Ok::<_, tokio_postgres::Error>(client)
        });
        let client = block_on(connecting)
            .map_err(|err| StoreError::Database(format!("connecting to {location}: {err}")))?
            .map_err(|err| StoreError::Unreachable {
                location: location.clone(),
                reason: describe(&err),
            })?;
        Ok(Conn {
            client,
            location: location.as_str().into(),
            statements: RefCell::new(HashMap::new()),
        })
    }

    fn take_conn(&self) -> Result<Conn, StoreError> {
        let idle = match self.idle.lock() {
            Ok(mut idle) => idle.pop(),
            Err(poisoned) => poisoned.into_inner().pop(),
        };
        match idle {
            Some(conn) if !conn.client.is_closed() => Ok(conn),
            _ => self.open_conn(),
        }
    }

    fn give_back(&self, conn: Conn) {
        if conn.client.is_closed() {
            return;
        }
        let mut idle = match self.idle.lock() {
            Ok(idle) => idle,
            Err(poisoned) => poisoned.into_inner(),
        };
        if idle.len() < IDLE_READERS {
            idle.push(conn);
        }
    }

    /// Runs `f` in a read-only snapshot.
    pub(crate) fn read<R>(
        &self,
        f: impl FnOnce(&dyn Rows) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let conn = self.take_conn()?;
        let result = (|| {
            conn.batch("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")?;
            let rows = PgRows::new(&conn);
            let result = f(&rows);
            let end = if rows.failed.get() || result.is_err() {
                "ROLLBACK"
            } else {
                "COMMIT"
            };
            conn.batch(end)?;
            result
        })();
        self.give_back(conn);
        result
    }

    /// Runs `f` in a serializable write transaction on the writer's connection and
    /// commits when it answers true (rolls back when false). A lost race with another
    /// transaction is `StoreError::Conflict`, after a rollback: run it again.
    pub(crate) fn transact(
        &self,
        f: &mut dyn FnMut(&dyn RowsMut) -> bool,
    ) -> Result<bool, StoreError> {
        let mut slot = match self.writer.lock() {
            Ok(slot) => slot,
            Err(poisoned) => poisoned.into_inner(),
        };
        if slot.as_ref().is_none_or(|conn| conn.client.is_closed()) {
            *slot = None;
            *slot = Some(self.open_conn()?);
        }
        let Some(conn) = slot.as_ref() else {
            return Err(StoreError::Database("no PostgreSQL connection".into()));
        };
        conn.batch("BEGIN ISOLATION LEVEL SERIALIZABLE")?;
        let committed = *lock(&self.chain);
        let rows = PgRows::new(conn);
        rows.head.set(committed);
        let keep = f(&rows);
        if rows.conflict.get() {
            conn.batch("ROLLBACK")?;
            return Err(StoreError::Conflict);
        }
        if !keep || rows.failed.get() {
            conn.batch("ROLLBACK")?;
            return Ok(false);
        }
        match self.commit(&rows) {
            Ok(()) => {
                *lock(&self.chain) = rows.head.get();
                Ok(true)
            }
            Err(err) => {
                if !matches!(err, StoreError::Conflict) {
                    // The commit may have happened: a record after the chain's head as
                    // we know it could repeat a place, so the next one starts anew.
                    *lock(&self.chain) = None;
                }
                // The transaction may still be open on a live connection.
                let _ = conn.batch("ROLLBACK");
                Err(err)
            }
        }
    }

    /// Sends what the transaction still holds back and commits it, in one round trip:
    /// the held-back writes (one that fails fails the commit, never a job that was
    /// already answered as done), then — when the transaction appended audit records or
    /// changed followed tables — the feed's lock, the audit records numbered from the
    /// database's sequence, this node's chain head, the change feed's rows and its
    /// notification, then `COMMIT`. The lock is held to the commit, so that sequence
    /// order is commit order for both the audit log and the feed: a follower that has
    /// read up to `n` has missed nothing below it. Nothing waits for the client while
    /// the lock is held.
    fn commit(&self, rows: &PgRows<'_>) -> Result<(), StoreError> {
        let touched = rows.touched.take();
        let appended = rows.appended.take();
        if !touched.is_empty() || !appended.is_empty() {
            rows.push(
                format!("SELECT pg_advisory_xact_lock({FEED_LOCK})"),
                WriteParams::None,
            );
        }
        if let (false, Some(head)) = (appended.is_empty(), rows.head.get()) {
            rows.push(
                format!(
                    "INSERT INTO {} (seq, value) SELECT nextval('{SCHEMA}.audit_seq'), v \
                     FROM unnest($1::bytea[]) WITH ORDINALITY AS u(v, i) ORDER BY i",
                    table(AUDIT_EVENTS_NAME)
                ),
                WriteParams::Values(appended),
            );
            let value = records::encode_chain_head(&ChainHead {
                n: head.n,
                time_ms: head.time_ms,
            });
            rows.push(
                upsert_sql(AUDIT_CHECKPOINT_NAME),
                WriteParams::KeyValue(audit_chain::head_key(head.chain), value),
            );
        }
        if !touched.is_empty() {
            let mut tables = Vec::with_capacity(touched.len());
            let mut keys = Vec::with_capacity(touched.len());
            let mut values = Vec::with_capacity(touched.len());
            for Touched { table, key, value } in touched {
                tables.push(table.to_string());
                keys.push(key);
                values.push(value);
            }
            rows.push(
                format!(
                    "INSERT INTO {SCHEMA}.changes (node, tbl, key, value) \
                     SELECT $1, * FROM unnest($2::text[], $3::text[], $4::bytea[])"
                ),
                WriteParams::Feed(self.node.clone(), tables, keys, values),
            );
            rows.push(
                format!("SELECT pg_notify('{CHANNEL}', '')"),
                WriteParams::None,
            );
        }
        rows.after_pending(rows.conn.client.batch_execute("COMMIT"))
    }

    /// Notes where the change feed is now: `follow` starts after it.
    pub(crate) fn set_mark(&self) -> Result<(), StoreError> {
        let conn = self.take_conn()?;
        let result = conn.query_one_value::<i64>(
            &format!("SELECT coalesce(max(seq), 0) FROM {SCHEMA}.changes"),
            &[],
        );
        self.give_back(conn);
        self.mark.store(result?, Ordering::SeqCst);
        Ok(())
    }

    /// Starts following the change feed from the mark: other nodes' changes to followed
    /// tables arrive on the receiver in commit order, and `Followed::Resync` after a
    /// break in the feed (a lost connection), when the caller must reload what it
    /// mirrors. The follower's connection also holds the leader lock when it can get it
    /// (`is_leader`). It stops when the receiver is dropped.
    pub(crate) fn follow(&self) -> Result<mpsc::Receiver<Followed>, StoreError> {
        let runtime = self
            .runtime
            .as_ref()
            .ok_or_else(|| StoreError::Database("PostgreSQL's runtime has stopped".into()))?;
        let (sender, receiver) = mpsc::channel(FOLLOW_QUEUE);
        let follower = Follower {
            config: self.config.clone(),
            tls: self.tls.clone(),
            location: self.location.clone(),
            node: self.node.clone(),
            leading: self.leading.clone(),
            last: self.mark.load(Ordering::SeqCst),
            sender,
        };
        runtime.spawn(follower.run());
        Ok(receiver)
    }

    /// Whether a node has set the database up: its `meta` table holds the format.
    pub(crate) fn initialised(&self) -> Result<bool, StoreError> {
        let conn = self.take_conn()?;
        let meta = table("meta");
        let result = conn
            .query_one_value::<bool>(&format!("SELECT to_regclass('{meta}') IS NOT NULL"), &[])
            .and_then(|exists| {
                if !exists {
                    return Ok(false);
                }
                conn.query_one_value::<bool>(
                    &format!("SELECT EXISTS (SELECT 1 FROM {meta} WHERE key = 'format_version')"),
                    &[],
                )
            });
        self.give_back(conn);
        result
    }

    /// How many connections of other gatehouse processes the database has now.
    pub(crate) fn other_processes(&self) -> Result<u64, StoreError> {
        let conn = self.take_conn()?;
        let count = conn.query_one_value::<i64>(
            "SELECT count(DISTINCT application_name) FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name LIKE 'gatehouse %' \
             AND application_name <> $1",
            &[&format!("gatehouse {}", self.node)],
        );
        self.give_back(conn);
        Ok(u64::try_from(count?).unwrap_or(0))
    }

    /// This process's audit chain, once it has appended to one.
    pub(crate) fn own_chain(&self) -> Option<u64> {
        lock(&self.chain).map(|head| head.chain)
    }

    /// Whether this process holds the leader lock (through its follower).
    pub(crate) fn is_leader(&self) -> bool {
        self.leading.load(Ordering::SeqCst)
    }

    /// Creates the schema and every table that does not exist yet, in one transaction
    /// (concurrent nodes starting at once wait for each other on the advisory lock).
    pub(crate) fn create_tables(&self) -> Result<(), StoreError> {
        let conn = self.take_conn()?;
        let mut ddl = format!(
            "BEGIN; SELECT pg_advisory_xact_lock({CREATE_LOCK}); \
             CREATE SCHEMA IF NOT EXISTS {SCHEMA};"
        );
        for name in ALL_TABLES {
            if *name == AUDIT_EVENTS_NAME {
                ddl.push_str(&format!(
                    "CREATE TABLE IF NOT EXISTS {} (seq bigint PRIMARY KEY, value bytea NOT NULL);",
                    table(name)
                ));
            } else {
                ddl.push_str(&format!(
                    "CREATE TABLE IF NOT EXISTS {} (key text COLLATE \"C\" PRIMARY KEY, \
                     value bytea NOT NULL);",
                    table(name)
                ));
            }
        }
        ddl.push_str(&format!(
            "CREATE TABLE IF NOT EXISTS {SCHEMA}.changes (seq bigserial PRIMARY KEY, \
             node text NOT NULL, tbl text NOT NULL, key text NOT NULL, \
             at timestamptz NOT NULL DEFAULT now(), value bytea);\
             ALTER TABLE {SCHEMA}.changes ADD COLUMN IF NOT EXISTS value bytea;\
             CREATE SEQUENCE IF NOT EXISTS {SCHEMA}.audit_seq;"
        ));
        ddl.push_str(&advance_audit_seq());
        ddl.push_str("COMMIT;");
        let result = conn.batch(&ddl);
        self.give_back(conn);
        result
    }
}

impl Postgres {
    /// Fills gatehouse's empty tables with the chunks `fill` hands to its sink, in one
    /// transaction: all of it or nothing. Refuses (`StoreError::NotEmpty`) a database
    /// that holds any row, checked inside that transaction under the creation lock, so
    /// two copies cannot mix and a starting node cannot write between check and copy.
    pub(crate) fn load<R>(
        &self,
        fill: impl FnOnce(&mut dyn FnMut(Chunk) -> Result<(), StoreError>) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        self.create_tables()?;
        let conn = self.take_conn()?;
        let result = (|| {
            conn.batch(&format!(
                "BEGIN ISOLATION LEVEL SERIALIZABLE; SELECT pg_advisory_xact_lock({CREATE_LOCK})"
            ))?;
            let loaded = (|| {
                let mut rows = 0u64;
                for name in ALL_TABLES {
                    let n: i64 = conn
                        .query_one_value(&format!("SELECT count(*) FROM {}", table(name)), &[])?;
                    rows += n as u64;
                }
                if rows > 0 {
                    return Err(StoreError::NotEmpty {
                        location: self.location.clone(),
                        rows,
                    });
                }
                fill(&mut |chunk| match chunk {
                    Chunk::Rows(name, rows) => {
                        let (keys, values): (Vec<String>, Vec<Vec<u8>>) = rows.into_iter().unzip();
                        let sql = format!(
                            "INSERT INTO {} (key, value) SELECT * FROM unnest($1::text[], $2::bytea[])",
                            table(name)
                        );
                        conn.execute(&sql, &[&keys, &values]).map(drop)
                    }
                    Chunk::Log(rows) => {
                        let mut seqs = Vec::with_capacity(rows.len());
                        let mut values = Vec::with_capacity(rows.len());
                        for (seq, value) in rows {
                            seqs.push(PgRows::seq(seq)?);
                            values.push(value);
                        }
                        let sql = format!(
                            "INSERT INTO {} (seq, value) SELECT * FROM unnest($1::bigint[], $2::bytea[])",
                            table(AUDIT_EVENTS_NAME)
                        );
                        conn.execute(&sql, &[&seqs, &values]).map(drop)
                    }
                })
            })();
            match loaded.and_then(|value| conn.batch(&advance_audit_seq()).map(|()| value)) {
                Ok(value) => {
                    conn.batch("COMMIT")?;
                    Ok(value)
                }
                Err(err) => {
                    let _ = conn.batch("ROLLBACK");
                    Err(err)
                }
            }
        })();
        self.give_back(conn);
        result
    }
}

/// Moves the audit log's sequence past the log's last row, only ever forward, and only
/// when rows were put there without it (a copy): in normal running every row's number
/// came from the sequence, so nothing here races with a node appending.
fn advance_audit_seq() -> String {
    format!(
        "SELECT setval('{SCHEMA}.audit_seq', m) FROM \
         (SELECT max(seq) AS m FROM {log}) AS rows, {SCHEMA}.audit_seq AS s \
         WHERE m > s.last_value OR (NOT s.is_called AND m >= s.last_value);",
        log = table(AUDIT_EVENTS_NAME)
    )
}

/// The advisory lock that serialises creating the tables.
const CREATE_LOCK: i64 = 0x6761_7465_0001;
/// The advisory lock a change-feed append holds to its commit (`publish`).
const FEED_LOCK: i64 = 0x6761_7465_0002;
/// The advisory lock of the node that runs scheduled jobs (`Follower`).
const LEADER_LOCK: i64 = 0x6761_7465_0003;
/// The channel followers listen on.
const CHANNEL: &str = "gatehouse_changes";
/// Batches of changes waiting for the follower's reader.
const FOLLOW_QUEUE: usize = 256;
/// How long the feed keeps a change. A follower that loses its connection resyncs,
/// and one that reads less often than this would miss changes, so it resyncs too.
const FEED_KEEP: Duration = Duration::from_secs(600);
/// A follower reads the feed at least this often, notified or not: a notification
/// lost with a connection delays a change by no more than this.
const FOLLOW_POLL: Duration = Duration::from_secs(1);

/// Which tables' changes the feed carries: those a node mirrors in memory (the
/// revocation list, the key ring, bans, admin tokens and API clients). Other tables are read in the request.
pub const FOLLOWED_TABLES: &[&str] = &[
    "admin_tokens.v1",
    "clients.v1",
    "revoked_tokens.v1",
    "token_families.v1",
    "family_revocations.v1",
    "devices.v1",
    "signing_keys.v1",
    "bans.v1",
];

/// A row another process changed (written or removed) in a followed table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The table's name, one of `FOLLOWED_TABLES`.
    pub table: String,
    pub key: String,
    /// What the row holds after the change (`None`: removed), so a follower applies it
    /// without reading the row again.
    pub value: Option<Vec<u8>>,
}

/// What a follower hands on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Followed {
    /// Changes, in commit order.
    Changes(Vec<Change>),
    /// The feed was broken (a lost connection): reload everything mirrored, then go on.
    Resync,
}

fn random_node_id() -> Result<String, StoreError> {
    let mut raw = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw)
        .map_err(|_| StoreError::Database("no randomness for a node id".into()))?;
    Ok(data_encoding::HEXLOWER.encode(&raw))
}

/// The change feed's reader, on the store's runtime (see `Postgres::follow`).
struct Follower {
    config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    location: String,
    node: String,
    leading: Arc<AtomicBool>,
    /// The last sequence number read.
    last: i64,
    sender: mpsc::Sender<Followed>,
}

impl Follower {
    async fn run(mut self) {
        let mut broken = false;
        while !self.sender.is_closed() {
            let outcome = self.connected(broken).await;
            self.leading.store(false, Ordering::SeqCst);
            match outcome {
                Ok(()) => return,
                Err(reason) => {
                    tracing::warn!(database = %self.location, %reason, "the change feed was interrupted; reconnecting");
                    broken = true;
                    tokio::time::sleep(FOLLOW_POLL).await;
                }
            }
        }
    }

    /// Follows on one connection until it fails (`Err`) or the receiver is dropped.
    async fn connected(&mut self, resync: bool) -> Result<(), String> {
        let (client, mut connection) = self
            .config
            .connect(self.tls.clone())
            .await
            .map_err(|err| describe(&err))?;
        // Notifications coalesce: however many commits notified since the last read,
        // one read of the feed answers them all.
        let notified = Arc::new(tokio::sync::Notify::new());
        let notifier = notified.clone();
        let driver = tokio::spawn(async move {
            loop {
                match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                    Some(Ok(tokio_postgres::AsyncMessage::Notification(_))) => {
                        notifier.notify_one();
                    }
                    Some(Ok(_)) => {}
                    Some(Err(err)) => return describe(&err),
                    None => return "the connection was closed".to_string(),
                }
            }
        });
        let result = self.follow_on(&client, &notified, &driver, resync).await;
        driver.abort();
        result
    }

    async fn follow_on(
        &mut self,
        client: &Client,
        notified: &tokio::sync::Notify,
        driver: &tokio::task::JoinHandle<String>,
        resync: bool,
    ) -> Result<(), String> {
        let sql_error = |err: tokio_postgres::Error| describe(&err);
        client
            .batch_execute(&format!("LISTEN {CHANNEL}"))
            .await
            .map_err(sql_error)?;
        let read = client
            .prepare(&format!(
                "SELECT seq, node, tbl, key, value FROM {SCHEMA}.changes WHERE seq > $1 \
                 ORDER BY seq LIMIT 1000"
            ))
            .await
            .map_err(sql_error)?;
        if resync {
            // Everything up to here is in what the reader reloads; go on from here.
            let row = client
                .query_one(
                    &format!("SELECT coalesce(max(seq), 0) FROM {SCHEMA}.changes"),
                    &[],
                )
                .await
                .map_err(sql_error)?;
            self.last = row.try_get(0).map_err(sql_error)?;
            if self.sender.send(Followed::Resync).await.is_err() {
                return Ok(());
            }
        }
        let mut pruned_at = tokio::time::Instant::now();
        let mut read_at = tokio::time::Instant::now();
        loop {
            if !self.leading.load(Ordering::SeqCst) {
                let row = client
                    .query_one("SELECT pg_try_advisory_lock($1)", &[&LEADER_LOCK])
                    .await
                    .map_err(sql_error)?;
                let taken: bool = row.try_get(0).map_err(sql_error)?;
                if taken {
                    tracing::info!(node = %self.node, "this node leads: it runs the scheduled jobs");
                }
                self.leading.store(taken, Ordering::SeqCst);
            }
            if read_at.elapsed() > FEED_KEEP / 2 {
                return Err("the change feed was not read for too long".into());
            }
            let rows = client
                .query(&read, &[&self.last])
                .await
                .map_err(sql_error)?;
            read_at = tokio::time::Instant::now();
            let full = rows.len() == 1000;
            let mut changes = Vec::new();
            for row in rows {
                let seq: i64 = row.try_get(0).map_err(sql_error)?;
                let node: String = row.try_get(1).map_err(sql_error)?;
                self.last = self.last.max(seq);
                if node != self.node {
                    changes.push(Change {
                        table: row.try_get(2).map_err(sql_error)?,
                        key: row.try_get(3).map_err(sql_error)?,
                        value: row.try_get(4).map_err(sql_error)?,
                    });
                }
            }
            if !changes.is_empty() && self.sender.send(Followed::Changes(changes)).await.is_err() {
                return Ok(());
            }
            if full {
                continue;
            }
            if pruned_at.elapsed() > FOLLOW_POLL * 10 {
                client
                    .execute(
                        &format!(
                            "DELETE FROM {SCHEMA}.changes WHERE at < now() - make_interval(secs => $1)"
                        ),
                        &[&(FEED_KEEP.as_secs_f64())],
                    )
                    .await
                    .map_err(sql_error)?;
                pruned_at = tokio::time::Instant::now();
            }
            let _ = tokio::time::timeout(FOLLOW_POLL, notified.notified()).await;
            if driver.is_finished() {
                return Err("the connection was closed".into());
            }
            if self.sender.is_closed() {
                return Ok(());
            }
        }
    }
}

/// The qualified name of a table of `tables.rs`.
fn table(name: &str) -> String {
    format!("{SCHEMA}.{}", name.replace('.', "_"))
}

fn describe(err: &tokio_postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => {
            let mut text = err.to_string();
            let mut source = std::error::Error::source(err);
            while let Some(cause) = source {
                text.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            text
        }
    }
}

/// A lost race: a serialization failure, a deadlock, or two transactions inserting the
/// same key at once (the loser runs again and finds the row there).
fn is_conflict(err: &tokio_postgres::Error) -> bool {
    matches!(
        err.code(),
        Some(code) if *code == SqlState::T_R_SERIALIZATION_FAILURE
            || *code == SqlState::T_R_DEADLOCK_DETECTED
            || *code == SqlState::UNIQUE_VIOLATION
    )
}

/// A statement's failure as the store reports it: a lost race is `Conflict`; a lost
/// connection, a server shutting down or starting, or one that cannot write (a
/// standby not yet promoted) is `Unreachable`, which callers answer as "try again";
/// anything else is `Database`.
fn db_error(location: &str, err: &tokio_postgres::Error) -> StoreError {
    if is_conflict(err) {
        return StoreError::Conflict;
    }
    let unreachable = match err.code() {
        // Class 08: connection exceptions; class 57: operator intervention (shutdown,
        // "the database system is starting up"); 25006: read-only transaction.
        Some(code) => {
            code.code().starts_with("08")
                || code.code().starts_with("57")
                || *code == SqlState::READ_ONLY_SQL_TRANSACTION
        }
        // No SQL state: the connection itself failed or was closed.
        None => true,
    };
    if unreachable {
        StoreError::Unreachable {
            location: location.to_string(),
            reason: describe(err),
        }
    } else {
        StoreError::Database(format!("PostgreSQL: {}", describe(err)))
    }
}

impl Conn {
    fn error(&self, err: &tokio_postgres::Error) -> StoreError {
        db_error(&self.location, err)
    }

    fn batch(&self, sql: &str) -> Result<(), StoreError> {
        block_on(self.client.batch_execute(sql)).map_err(|err| self.error(&err))
    }

    fn statement(&self, sql: &str) -> Result<Statement, StoreError> {
        if let Some(statement) = self.statements.borrow().get(sql) {
            return Ok(statement.clone());
        }
        let statement = block_on(self.client.prepare(sql)).map_err(|err| self.error(&err))?;
        self.statements
            .borrow_mut()
            .insert(sql.to_string(), statement.clone());
        Ok(statement)
    }

    fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        let statement = self.statement(sql)?;
        block_on(self.client.query(&statement, params)).map_err(|err| self.error(&err))
    }

    fn execute(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, StoreError> {
        let statement = self.statement(sql)?;
        block_on(self.client.execute(&statement, params)).map_err(|err| self.error(&err))
    }

    fn query_one_value<T>(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<T, StoreError>
    where
        T: for<'a> tokio_postgres::types::FromSql<'a>,
    {
        let rows = self.query(sql, params)?;
        let row = rows
            .first()
            .ok_or_else(|| StoreError::Database(format!("no row from {sql}")))?;
        row.try_get(0).map_err(|err| self.error(&err))
    }
}

/// `Rows` and `RowsMut` on the statements of one open transaction. The first failed
/// statement ends the transaction on the server, so it is remembered: the transaction
/// is then rolled back whatever the caller decides.
///
/// Writes whose answer nobody reads (a put, an audit append, a range delete) are not
/// sent one round trip at a time: they wait in `pending` and go out together, ahead of
/// the next statement that needs an answer (a read, a delete that says whether the row
/// was there) or the commit, all in one round trip. PostgreSQL runs them in the order
/// sent, so every read still sees the writes before it; a write that failed fails the
/// statement that carried it, and so the transaction (`flush` before a commit).
struct PgRows<'a> {
    conn: &'a Conn,
    failed: Cell<bool>,
    conflict: Cell<bool>,
    /// Rows written (with their new value) or removed in followed tables, for the
    /// change feed.
    touched: RefCell<Vec<Touched>>,
    /// Writes not sent yet (see above).
    pending: RefCell<Vec<Write>>,
    /// This node's audit chain as the transaction leaves it (`RowsMut::node_chain`).
    head: Cell<Option<NodeHead>>,
    /// Audit records appended, numbered and inserted at the commit.
    appended: RefCell<Vec<Vec<u8>>>,
}

/// A row of a followed table a transaction wrote or removed, for the change feed.
struct Touched {
    table: &'static str,
    key: String,
    /// The row's new value; `None` when removed.
    value: Option<Vec<u8>>,
}

/// A write waiting in `PgRows::pending`: its statement and its own parameters.
struct Write {
    sql: String,
    params: WriteParams,
}

enum WriteParams {
    None,
    KeyValue(String, Vec<u8>),
    SeqValue(i64, Vec<u8>),
    Seq(i64),
    Values(Vec<Vec<u8>>),
    /// The change feed's rows: this node, then the tables, keys and values.
    Feed(String, Vec<String>, Vec<String>, Vec<Option<Vec<u8>>>),
}

/// Writes kept back at most: past this many they go out at once (a long `retain`).
const MAX_PENDING: usize = 256;

impl<'a> PgRows<'a> {
    fn new(conn: &'a Conn) -> Self {
        Self {
            conn,
            failed: Cell::new(false),
            conflict: Cell::new(false),
            touched: RefCell::new(Vec::new()),
            pending: RefCell::new(Vec::new()),
            head: Cell::new(None),
            appended: RefCell::new(Vec::new()),
        }
    }

    /// Sends the pending writes, then the statement `last` makes, without waiting in
    /// between; answers `last`'s result, or the first failed write's error.
    fn after_pending<T, F>(&self, last: F) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = Result<T, tokio_postgres::Error>>,
    {
        let pending = self.pending.take();
        let statements = pending
            .iter()
            .map(|write| self.conn.statement(&write.sql))
            .collect::<Result<Vec<_>, _>>()?;
        let client = &self.conn.client;
        let writes = pending
            .iter()
            .zip(&statements)
            .map(|(write, statement)| async move {
                match &write.params {
                    WriteParams::None => client.execute(statement, &[]).await,
                    WriteParams::Values(values) => client.execute(statement, &[values]).await,
                    WriteParams::Feed(node, tables, keys, values) => {
                        client
                            .execute(statement, &[node, tables, keys, values])
                            .await
                    }
                    WriteParams::KeyValue(key, value) => {
                        client.execute(statement, &[key, value]).await
                    }
                    WriteParams::SeqValue(seq, value) => {
                        client.execute(statement, &[seq, value]).await
                    }
                    WriteParams::Seq(seq) => client.execute(statement, &[seq]).await,
                }
            });
        let (written, answer) = block_on(futures_util::future::join(
            futures_util::future::join_all(writes),
            last,
        ));
        for result in written {
            result.map_err(|err| self.conn.error(&err))?;
        }
        answer.map_err(|err| self.conn.error(&err))
    }

    /// A statement that needs its answer, sent behind the pending writes.
    fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        let statement = self.conn.statement(sql)?;
        self.after_pending(self.conn.client.query(&statement, params))
    }

    /// Sends every pending write and waits for their answers (before a commit).
    fn flush(&self) -> Result<(), StoreError> {
        if self.pending.borrow().is_empty() {
            return Ok(());
        }
        self.noted(self.after_pending(async { Ok(()) }))
    }

    /// Adds a write to those held back, however many there are (the commit's own).
    fn push(&self, sql: String, params: WriteParams) {
        self.pending.borrow_mut().push(Write { sql, params });
    }

    /// Keeps a write back (see `PgRows`).
    fn defer(&self, sql: String, params: WriteParams) -> Result<(), StoreError> {
        let full = {
            let mut pending = self.pending.borrow_mut();
            pending.push(Write { sql, params });
            pending.len() >= MAX_PENDING
        };
        if full { self.flush() } else { Ok(()) }
    }

    fn noted<T>(&self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        if let Err(err) = &result {
            self.failed.set(true);
            if matches!(err, StoreError::Conflict) {
                self.conflict.set(true);
            }
        }
        result
    }

    fn touch(&self, table: &'static str, key: &str, value: Option<&[u8]>) {
        if FOLLOWED_TABLES.contains(&table) {
            self.touched.borrow_mut().push(Touched {
                table,
                key: key.to_string(),
                value: value.map(<[u8]>::to_vec),
            });
        }
    }

    fn seq(seq: u64) -> Result<i64, StoreError> {
        i64::try_from(seq)
            .map_err(|_| StoreError::Database(format!("audit sequence {seq} is out of range")))
    }

    fn log_rows(&self, rows: Vec<tokio_postgres::Row>) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        rows.into_iter()
            .map(|row| {
                let seq: i64 = row.try_get(0).map_err(|err| self.conn.error(&err))?;
                let value: Vec<u8> = row.try_get(1).map_err(|err| self.conn.error(&err))?;
                Ok((seq as u64, value))
            })
            .collect()
    }
}

fn limit(max: usize) -> i64 {
    i64::try_from(max).unwrap_or(i64::MAX)
}

impl Rows for PgRows<'_> {
    fn get(&self, name: &'static str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let sql = format!("SELECT value FROM {} WHERE key = $1", table(name));
        self.noted((|| {
            let rows = self.query(&sql, &[&key])?;
            rows.first()
                .map(|row| row.try_get(0).map_err(|err| self.conn.error(&err)))
                .transpose()
        })())
    }

    fn get_many(
        &self,
        name: &'static str,
        keys: &[String],
    ) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let sql = format!(
            "SELECT key, value FROM {} WHERE key = ANY($1::text[])",
            table(name)
        );
        self.noted((|| {
            let mut found = HashMap::with_capacity(keys.len());
            for row in self.query(&sql, &[&keys])? {
                let key: String = row.try_get(0).map_err(|err| self.conn.error(&err))?;
                let value: Vec<u8> = row.try_get(1).map_err(|err| self.conn.error(&err))?;
                found.insert(key, value);
            }
            Ok(keys.iter().map(|key| found.get(key).cloned()).collect())
        })())
    }

    fn scan(
        &self,
        name: &'static str,
        scan: Scan<'_>,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        if scan.max == 0 {
            return Ok(Vec::new());
        }
        // Keys are text without U+10FFFF, so every key that starts with the prefix sorts
        // below the prefix followed by it (collation "C" compares UTF-8 bytes).
        let upper = format!("{}\u{10FFFF}", scan.prefix);
        let (lower, op) = match scan.start {
            Bound::Included(key) => (key, ">="),
            Bound::Excluded(key) => (key, ">"),
            Bound::Unbounded => ("", ">="),
        };
        let max = limit(scan.max);
        self.noted((|| {
            let rows = if scan.prefix.is_empty() {
                let sql = format!(
                    "SELECT key, value FROM {} WHERE key {op} $1 ORDER BY key LIMIT $2",
                    table(name)
                );
                self.query(&sql, &[&lower, &max])?
            } else {
                let sql = format!(
                    "SELECT key, value FROM {} WHERE key {op} $1 AND key < $2 ORDER BY key LIMIT $3",
                    table(name)
                );
                self.query(&sql, &[&lower, &upper, &max])?
            };
            rows.into_iter()
                .map(|row| {
                    let key: String = row.try_get(0).map_err(|err| self.conn.error(&err))?;
                    let value: Vec<u8> = row.try_get(1).map_err(|err| self.conn.error(&err))?;
                    Ok((key, value))
                })
                .collect()
        })())
    }

    fn count(&self, name: &'static str) -> Result<u64, StoreError> {
        let sql = format!("SELECT count(*) FROM {}", table(name));
        let n: i64 = self.noted((|| {
            let rows = self.query(&sql, &[])?;
            let row = rows
                .first()
                .ok_or_else(|| StoreError::Database(format!("no row from {sql}")))?;
            row.try_get(0).map_err(|err| self.conn.error(&err))
        })())?;
        Ok(n as u64)
    }

    fn log_from(&self, from: u64, max: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let sql = format!(
            "SELECT seq, value FROM {} WHERE seq >= $1 ORDER BY seq LIMIT $2",
            table(AUDIT_EVENTS_NAME)
        );
        self.noted((|| {
            let from = Self::seq(from).unwrap_or(i64::MAX);
            self.log_rows(self.query(&sql, &[&from, &limit(max)])?)
        })())
    }

    fn log_newest(&self, max: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let sql = format!(
            "SELECT seq, value FROM {} ORDER BY seq DESC LIMIT $1",
            table(AUDIT_EVENTS_NAME)
        );
        self.noted((|| self.log_rows(self.query(&sql, &[&limit(max)])?))())
    }
}

impl RowsMut for PgRows<'_> {
    fn put(&self, name: &'static str, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let sql = upsert_sql(name);
        self.touch(name, key, Some(value));
        self.defer(sql, WriteParams::KeyValue(key.to_string(), value.to_vec()))
    }

    fn remove(&self, name: &'static str, key: &str) -> Result<bool, StoreError> {
        let sql = format!("DELETE FROM {} WHERE key = $1", table(name));
        self.touch(name, key, None);
        let statement = self.noted(self.conn.statement(&sql))?;
        let removed = self.after_pending(self.conn.client.execute(&statement, &[&key]));
        self.noted(removed.map(|n| n > 0))
    }

    fn log_put(&self, seq: u64, value: &[u8]) -> Result<(), StoreError> {
        let sql = format!(
            "INSERT INTO {} (seq, value) VALUES ($1, $2)",
            table(AUDIT_EVENTS_NAME)
        );
        let seq = self.noted(Self::seq(seq))?;
        self.defer(sql, WriteParams::SeqValue(seq, value.to_vec()))
    }

    fn log_remove_through(&self, last: u64) -> Result<(), StoreError> {
        let sql = format!("DELETE FROM {} WHERE seq <= $1", table(AUDIT_EVENTS_NAME));
        let last = Self::seq(last).unwrap_or(i64::MAX);
        self.defer(sql, WriteParams::Seq(last))
    }

    fn node_chain(&self) -> Result<Option<NodeHead>, StoreError> {
        if let Some(head) = self.head.get() {
            return Ok(Some(head));
        }
        // A chain per process run, numbered at random: two processes never share one,
        // even a node restarted while its old process still commits, and starting one
        // asks the database nothing.
        let mut raw = [0u8; 8];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw)
            .map_err(|_| StoreError::Database("no randomness for an audit chain".into()))?;
        let head = NodeHead {
            chain: u64::from_be_bytes(raw),
            n: 0,
            tag: [0; 32],
            time_ms: 0,
        };
        self.head.set(Some(head));
        Ok(Some(head))
    }

    fn node_append(&self, head: NodeHead, row: &[u8]) -> Result<(), StoreError> {
        self.appended.borrow_mut().push(row.to_vec());
        self.head.set(Some(head));
        Ok(())
    }
}

/// Inserts or replaces one row of a key-value table.
fn upsert_sql(name: &str) -> String {
    format!(
        "INSERT INTO {} (key, value) VALUES ($1, $2) \
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        table(name)
    )
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_file_lines_match_field_by_field() {
        let text = "# comment\n\
                    db.example:5432:app:alice:first\n\
                    *:*:gatehouse:gatehouse:se\\:cret\\\\x\n\
                    *:*:*:*:fallback\n";
        assert_eq!(
            pgpass_lookup(text, "db.example", 5432, "app", "alice").as_deref(),
            Some("first")
        );
        assert_eq!(
            pgpass_lookup(text, "127.0.0.1", 5433, "gatehouse", "gatehouse").as_deref(),
            Some("se:cret\\x")
        );
        assert_eq!(
            pgpass_lookup(text, "db.example", 5433, "app", "alice").as_deref(),
            Some("fallback")
        );
        assert_eq!(pgpass_lookup("a:b:c\n", "a", 1, "c", "d"), None);
    }

    #[test]
    fn only_connections_that_stay_on_this_machine_may_go_without_tls() {
        let local = |url: &str| parse_url(url).is_ok_and(|config| local_only(&config));
        assert!(local("postgres://u@127.0.0.1/db"));
        assert!(local("postgres://u@localhost:5433/db"));
        assert!(local("postgres://u@[::1]/db"));
        assert!(local("postgres://u@%2Frun%2Fpostgresql/db"));
        for remote in [
            "postgres://u@db.internal/db",
            "postgres://u@10.0.0.5/db",
            "postgres://u@127.0.0.1,db.internal/db",
        ] {
            assert!(parse_url(remote).is_ok(), "{remote}");
            assert!(!local(remote), "{remote}");
        }
    }

    #[test]
    fn urls_with_passwords_are_refused_and_redacted() {
        let Err(err) = parse_url("postgres://u:hunter2@db/x") else {
            panic!("a password in the URL must be refused");
        };
        let err = err.to_string();
        assert!(!err.contains("hunter2"), "{err}");
        assert!(err.contains("password"), "{err}");
        assert!(parse_url("mysql://u@db/x").is_err());
        assert!(parse_url("postgres://db/x").is_err());
        assert!(parse_url("postgres://u@db/x").is_ok());
    }

    #[test]
    fn table_names_follow_the_data_file() {
        assert_eq!(table("secrets.v1"), "gatehouse.secrets_v1");
        assert_eq!(table("meta"), "gatehouse.meta");
    }
}
