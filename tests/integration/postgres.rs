//! A real PostgreSQL for the tests: a fresh cluster in a temporary directory, on a port of
//! its own, gone when the test ends.
//!
//! `Postgres::start` runs `initdb` in a new temporary directory, appends the harness's
//! settings to `postgresql.conf`, starts `postgres` as a child process and waits until
//! `postmaster.pid` says the server is ready. It then creates the role `gatehouse` with a
//! random password and the database `gatehouse` owned by it. The server listens on
//! 127.0.0.1 and on a Unix socket inside its directory. Over TCP every role must give its
//! password (scram-sha-256): that is how gatehouse connects, with the password from
//! `password_file()`. Over the socket the harness is the superuser `postgres` without a
//! password (`psql()`, the standby's replication connection).
//!
//! The server is small and quiet for a CI machine with two cores (16 MB of shared
//! buffers, 50 connections, its log in `postgres.log` beside the data), but `fsync` stays
//! on: durability is what the tests check. A failed start panics with the log's tail.
//!
//! PostgreSQL refuses to run as root, and the tests and CI run as root. When the test
//! process is root, every PostgreSQL program (`initdb`, `postgres`, `pg_ctl`,
//! `pg_basebackup`, the harness's `psql`) runs as the unprivileged user `postgres` (which
//! Debian's package creates) through `setpriv --reuid --regid --init-groups`. setpriv
//! executes the program in place, so the child the harness holds is the postmaster
//! itself. The temporary directory is made under a directory everyone may traverse
//! (`$TMPDIR`, else `/tmp`) and handed to `postgres` with mode 0700; root still reads the
//! log and writes the configuration there. As any other user, the programs run as that
//! user and the directory stays theirs.
//!
//! `stop` (also on drop) asks for a fast shutdown (SIGINT) and waits for the postmaster,
//! which exits only after all its children. `kill` is a crash: SIGKILL to the postmaster,
//! then to every process whose working directory is the data directory (the cluster's
//! other processes), until none is left, so that `restart` recovers the same data on the
//! same port as after a power cut. Those children, orphaned, are reaped by init, which
//! may take a moment: drop waits for that (up to ten seconds), so that not even a zombie
//! outlives the test. Signals go through `kill` (procps): the tests have no `unsafe`.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use crate::helpers::{free_port, tool_available};

/// The role and the database gatehouse uses.
const ROLE: &str = "gatehouse";
/// The cluster's superuser, and the account PostgreSQL runs as when the tests are root.
const SUPERUSER: &str = "postgres";
const INSTALL: &str = "install the Debian package postgresql (PostgreSQL 15)";
/// How long a start, a stop, a promotion or a standby may take before the test fails.
const PATIENCE: Duration = Duration::from_secs(60);

/// A running PostgreSQL cluster in its own temporary directory, stopped when dropped.
#[derive(Debug)]
pub struct Postgres {
    test: String,
    bin: PathBuf,
    /// `(uid, gid)` of the account the programs run as, when the tests run as root.
    run_as: Option<(u32, u32)>,
    port: u16,
    password: String,
    /// The postmaster, when it runs.
    postmaster: Mutex<Option<Child>>,
    /// The processes `kill` orphaned: zombies until init reaps them.
    orphans: Mutex<Vec<u32>>,
    /// The data directory, without symlinks (it is compared with `/proc/PID/cwd`).
    data: PathBuf,
    /// Dropped last: removed once no process uses it.
    dir: tempfile::TempDir,
}

impl Postgres {
    /// Starts a fresh cluster on 127.0.0.1:`free_port()`: scram-sha-256 password login over
    /// TCP for the role `gatehouse`, which owns the database `gatehouse`. `None`, with a
    /// printed reason, when PostgreSQL is missing outside CI; a panic under `CI=true`.
    pub fn start(test: &str) -> Option<Postgres> {
        let bin = bindir();
        let initdb = bin.join("initdb");
        if !tool_available(test, &initdb.to_string_lossy(), &["--version"], INSTALL) {
            return None;
        }
        let dir = temp_dir(test);
        let run_as = if fs::metadata(dir.path()).unwrap().uid() == 0 {
            if !tool_available(
                test,
                "setpriv",
                &["--version"],
                "the Debian package util-linux",
            ) {
                return None;
            }
            Some(unprivileged(test)?)
        } else {
            None
        };
        let password = random_password();
        let pg = Postgres::in_dir(test, bin, run_as, dir, password);
        pg.run(pg.command("initdb").args([
            "--pgdata=data",
            "--username",
            SUPERUSER,
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C",
            // The server syncs everything it writes; the files initdb leaves need not
            // survive an operating-system crash.
            "--no-sync",
            "--no-instructions",
        ]));
        pg.configure(&format!(
            "listen_addresses = '127.0.0.1'\n\
             max_connections = 50\n\
             shared_buffers = 16MB\n\
             huge_pages = off\n\
             fsync = on\n\
             synchronous_commit = on\n\
             full_page_writes = on\n\
             wal_level = replica\n\
             max_wal_senders = 8\n\
             hot_standby = on\n\
             log_checkpoints = off\n\
             {}",
            pg.own_settings()
        ));
        pg.start_postmaster();
        pg.psql(
            "postgres",
            &format!(
                "create role {ROLE} login password '{}';\n\
                 create database {ROLE} owner {ROLE};",
                pg.password
            ),
        );
        Some(pg)
    }

    /// `postgres://gatehouse@127.0.0.1:PORT/gatehouse`, without the password.
    pub fn url(&self) -> String {
        self.url_of(ROLE)
    }

    /// A file holding just the password of the role `gatehouse`, mode 0600.
    pub fn password_file(&self) -> PathBuf {
        self.dir.path().join("password")
    }

    /// A new empty database owned by `gatehouse`: its URL.
    pub fn create_database(&self, name: &str) -> String {
        assert!(
            !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
            "{}: a database name of lowercase letters, digits and _ please: {name:?}",
            self.test
        );
        self.psql("postgres", &format!("create database {name} owner {ROLE}"));
        self.url_of(name)
    }

    /// Runs `sql` in database `db` as the superuser over the Unix socket (`psql -At`,
    /// stopping at the first error): its output without the last newline. Panics with
    /// psql's errors when it fails.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let mut psql = self.command("psql");
        psql.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(self.dir.path())
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                SUPERUSER,
                "-d",
                db,
                "-f",
                "-",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = psql.spawn().expect("psql starts");
        // A write error (psql gone early) shows as psql's own failure below.
        let _ = child.stdin.take().unwrap().write_all(sql.as_bytes());
        let output = child.wait_with_output().expect("psql runs");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{}: psql on port {} ({}) failed for\n{sql}\n{}{stdout}",
            self.test,
            self.port,
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        stdout.strip_suffix('\n').unwrap_or(&stdout).to_string()
    }

    /// Fast shutdown: the postmaster ends the sessions, writes a checkpoint and exits.
    /// Nothing happens if it is not running.
    pub fn stop(&self) {
        if let Err(error) = self.shut_down() {
            panic!("{}: {error}\n{}", self.test, self.log_tail());
        }
    }

    /// A crash: SIGKILL to the postmaster, then to its other processes; returns when none
    /// runs any more.
    pub fn kill(&self) {
        let mut postmaster = self.postmaster();
        self.kill_cluster(postmaster.as_mut());
        *postmaster = None;
        let left = self.cluster_processes();
        assert!(
            left.is_empty(),
            "{}: still running after SIGKILL: {left:?}",
            self.test
        );
    }

    /// Turns TLS on (a certificate for 127.0.0.1 and localhost from a test CA of its own)
    /// and restarts; returns the CA's certificate (PEM) to trust. Connections without
    /// TLS are still accepted, as `sslmode=prefer` clients expect.
    pub fn enable_tls(&self) -> PathBuf {
        let ca = crate::test_ca::TestCa::new("database test CA");
        let leaf = ca.issue(&self.data, "server", &["127.0.0.1", "localhost"], 30);
        // The server refuses a key that others may read, and must be able to read it.
        fs::set_permissions(&leaf.key, fs::Permissions::from_mode(0o600)).unwrap();
        if let Some((uid, gid)) = self.run_as {
            for file in [&leaf.cert, &leaf.key] {
                std::os::unix::fs::chown(file, Some(uid), Some(gid)).unwrap();
            }
        }
        self.configure(&format!(
            "ssl = on
ssl_cert_file = '{}'
ssl_key_file = '{}'
",
            leaf.cert.display(),
            leaf.key.display()
        ));
        self.restart();
        ca.write_root(&self.dir.path().join("database-ca.pem"))
    }

    /// Starts the server again on the same data and port (stopping it first if it runs).
    pub fn restart(&self) {
        self.stop();
        self.start_postmaster();
    }

    /// A streaming-replication standby of this server, made with `pg_basebackup -R`, on a
    /// port of its own, and this server's synchronous standby: returns once
    /// `pg_stat_replication` says so. It has the same roles and password.
    pub fn synchronous_standby(&self, test: &str) -> Postgres {
        let dir = temp_dir(test);
        let standby = Postgres::in_dir(
            test,
            self.bin.clone(),
            self.run_as,
            dir,
            self.password.clone(),
        );
        let name = format!("standby_{}", standby.port);
        standby.run(
            standby
                .command("pg_basebackup")
                .args(["--pgdata=data", "--write-recovery-conf"])
                .args(["--wal-method=stream", "--checkpoint=fast", "--no-sync"])
                .arg(format!(
                    "--dbname=host={} port={} user={SUPERUSER} application_name={name}",
                    self.dir.path().display(),
                    self.port
                )),
        );
        // After the copied settings, so these win. The copy may name a synchronous standby
        // of the primary (when it has had one before): promoted, this one waits for none.
        standby.configure(&format!(
            "{}synchronous_standby_names = ''\n",
            standby.own_settings()
        ));
        standby.start_postmaster();
        self.configure(&format!("synchronous_standby_names = '\"{name}\"'\n"));
        self.psql("postgres", "select pg_reload_conf()");
        let query =
            format!("select sync_state from pg_stat_replication where application_name = '{name}'");
        let started = Instant::now();
        loop {
            let state = self.psql("postgres", &query);
            if state == "sync" {
                return standby;
            }
            assert!(
                started.elapsed() < PATIENCE,
                "{test}: the standby on port {} is {state:?}, not a synchronous standby\n\
                 primary:\n{}\nstandby:\n{}",
                standby.port,
                self.log_tail(),
                standby.log_tail()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Promotes a standby (`pg_ctl promote`): returns once it accepts writes.
    pub fn promote(&self) {
        self.run(
            self.command("pg_ctl")
                .args(["promote", "--pgdata=data", "--wait"]),
        );
        let started = Instant::now();
        while self.psql("postgres", "select pg_is_in_recovery()") != "f" {
            assert!(
                started.elapsed() < PATIENCE,
                "{}: still in recovery after promotion\n{}",
                self.test,
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A cluster's directory with its password file, before initdb or pg_basebackup.
    fn in_dir(
        test: &str,
        bin: PathBuf,
        run_as: Option<(u32, u32)>,
        dir: tempfile::TempDir,
        password: String,
    ) -> Postgres {
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        }
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dir.path().join("password"))
            .and_then(|mut file| file.write_all(password.as_bytes()))
            .unwrap();
        // The temporary directory's own path may go through a symlink; the processes'
        // working directory does not.
        let data = fs::canonicalize(dir.path()).unwrap().join("data");
        Postgres {
            test: test.to_string(),
            bin,
            run_as,
            port: free_port(),
            password,
            postmaster: Mutex::new(None),
            orphans: Mutex::new(Vec::new()),
            data,
            dir,
        }
    }

    /// The settings that tell two clusters apart: the port and the socket's directory.
    fn own_settings(&self) -> String {
        format!(
            "port = {}\nunix_socket_directories = '{}'\n",
            self.port,
            self.dir.path().display()
        )
    }

    fn url_of(&self, db: &str) -> String {
        format!("postgres://{ROLE}@127.0.0.1:{}/{db}", self.port)
    }

    /// Appends to `postgresql.conf` (later lines win).
    fn configure(&self, settings: &str) {
        fs::OpenOptions::new()
            .append(true)
            .open(self.data.join("postgresql.conf"))
            .and_then(|mut file| file.write_all(format!("\n# test harness\n{settings}").as_bytes()))
            .unwrap();
    }

    /// A PostgreSQL program, as the unprivileged account when the tests are root, in the
    /// cluster's directory.
    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        let mut command = match self.run_as {
            Some((uid, gid)) => {
                let mut setpriv = Command::new("setpriv");
                setpriv
                    .args(["--reuid", &uid.to_string(), "--regid", &gid.to_string()])
                    .args(["--init-groups", "--"])
                    .arg(path);
                setpriv
            }
            None => Command::new(path),
        };
        command
            .current_dir(self.dir.path())
            .env("HOME", self.dir.path())
            .stdin(Stdio::null());
        command
    }

    /// Runs a program to its end; panics with its output when it fails.
    fn run(&self, command: &mut Command) {
        let output = command.output().expect("a PostgreSQL program starts");
        assert!(
            output.status.success(),
            "{}: {command:?} failed ({}):\n{}{}",
            self.test,
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Starts the postmaster and waits until it accepts connections (a primary) or
    /// read-only ones (a standby).
    fn start_postmaster(&self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("postgres.log"))
            .unwrap();
        let child = self
            .command("postgres")
            .arg("-D")
            .arg(&self.data)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("postgres starts");
        let pid = child.id().to_string();
        let mut postmaster = self.postmaster();
        let child = postmaster.insert(child);
        let started = Instant::now();
        loop {
            // postmaster.pid: PID, data directory, start time, port, socket directory,
            // listen address, shared memory key, status.
            let lock = fs::read_to_string(self.data.join("postmaster.pid")).unwrap_or_default();
            let lines: Vec<&str> = lock.lines().collect();
            if lines.first() == Some(&pid.as_str())
                && matches!(lines.get(7).map(|s| s.trim()), Some("ready" | "standby"))
            {
                return;
            }
            if let Ok(Some(status)) = child.try_wait() {
                *postmaster = None;
                panic!(
                    "{}: postgres exited ({status})\n{}",
                    self.test,
                    self.log_tail()
                );
            }
            if started.elapsed() > PATIENCE {
                self.kill_cluster(Some(child));
                *postmaster = None;
                panic!(
                    "{}: postgres did not get ready\n{}",
                    self.test,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// `stop` without panicking: an error when the postmaster does not exit in time.
    fn shut_down(&self) -> Result<(), String> {
        let mut postmaster = self.postmaster();
        let Some(child) = postmaster.as_mut() else {
            return Ok(());
        };
        let _ = signal("INT", &[child.id()]);
        let started = Instant::now();
        loop {
            match child.try_wait() {
                Ok(None) if started.elapsed() < PATIENCE => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Ok(None) => return Err("postgres did not stop".into()),
                Ok(Some(_)) => break,
                Err(error) => return Err(format!("postgres cannot be waited for: {error}")),
            }
        }
        *postmaster = None;
        Ok(())
    }

    /// SIGKILL to the postmaster first (so that it starts nothing more), then to every
    /// other process of the cluster, until none is left or the patience runs out. The
    /// others, orphaned, are left for init to reap: they are remembered for `drop`.
    fn kill_cluster(&self, postmaster: Option<&mut Child>) {
        let mut others = self.cluster_processes();
        if let Some(child) = postmaster {
            others.retain(|&pid| pid != child.id());
            let _ = child.kill();
            let _ = child.wait();
        }
        let started = Instant::now();
        while !others.is_empty() && started.elapsed() < PATIENCE {
            let _ = signal("KILL", &others);
            self.orphans().extend(&others);
            std::thread::sleep(Duration::from_millis(5));
            others = self.cluster_processes();
        }
    }

    /// The processes working in the data directory: the postmaster and its children.
    fn cluster_processes(&self) -> Vec<u32> {
        let Ok(entries) = fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd == self.data)
            })
            .collect()
    }

    fn postmaster(&self) -> MutexGuard<'_, Option<Child>> {
        self.postmaster
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn orphans(&self) -> MutexGuard<'_, Vec<u32>> {
        self.orphans.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The last lines of the server's log, for a failure message.
    fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        format!(
            "--- {}/postgres.log (end) ---\n{tail}",
            self.dir.path().display()
        )
    }
}

impl Drop for Postgres {
    /// A fast shutdown; a crash if that fails; never a panic, never a process left behind.
    fn drop(&mut self) {
        let stopped = self.shut_down();
        let mut postmaster = self.postmaster();
        if stopped.is_err() {
            self.kill_cluster(postmaster.as_mut());
        } else {
            self.kill_cluster(None);
        }
        *postmaster = None;
        drop(postmaster);
        // Killed children of a killed postmaster are init's to reap, which may take it a
        // moment: wait (a little) so that not even a zombie outlives the test.
        let started = Instant::now();
        while self.orphans().iter().any(|&pid| is_zombie(pid))
            && started.elapsed() < Duration::from_secs(10)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Whether `pid` is a process that has exited and is not reaped yet.
fn is_zombie(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z'))
    })
}

/// Where PostgreSQL's programs are: `pg_config --bindir`, else Debian's PostgreSQL 15.
fn bindir() -> PathBuf {
    static BINDIR: OnceLock<PathBuf> = OnceLock::new();
    BINDIR
        .get_or_init(|| {
            Command::new("pg_config")
                .arg("--bindir")
                .output()
                .ok()
                .filter(|output| output.status.success())
                .map(|output| PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()))
                .filter(|dir| dir.join("initdb").is_file())
                .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"))
        })
        .clone()
}

/// `(uid, gid)` of the account `postgres`; when it is missing, `None` outside CI (with a
/// printed reason) and a panic under `CI=true`, as for a missing tool.
fn unprivileged(test: &str) -> Option<(u32, u32)> {
    let id = |flag: &str| -> Option<u32> {
        let output = Command::new("id").args([flag, SUPERUSER]).output().ok()?;
        String::from_utf8_lossy(&output.stdout).trim().parse().ok()
    };
    if let (Some(uid), Some(gid)) = (id("-u"), id("-g")) {
        return Some((uid, gid));
    }
    let reason = format!("running as root and there is no user {SUPERUSER} to run PostgreSQL as");
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: {reason}; CI must have it: {INSTALL}");
    }
    eprintln!("{test}: skipped, {reason}; {INSTALL}");
    None
}

/// A new temporary directory under one that every user may traverse, so that the
/// account PostgreSQL runs as can reach it.
fn temp_dir(test: &str) -> tempfile::TempDir {
    let traversable = |dir: &Path| {
        dir.ancestors()
            .all(|d| fs::metadata(d).is_ok_and(|m| m.mode() & 0o001 != 0))
    };
    let tmp = std::env::temp_dir();
    let base = if traversable(&tmp) {
        tmp
    } else {
        PathBuf::from("/tmp")
    };
    tempfile::Builder::new()
        .prefix(&format!("pg-{}-", &test[..test.len().min(20)]))
        .tempdir_in(base)
        .expect("temporary directory")
}

fn random_password() -> String {
    let mut bytes = [0u8; 18];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).unwrap();
    data_encoding::HEXLOWER.encode(&bytes)
}

/// Sends a signal to processes with `kill` (procps).
fn signal(name: &str, pids: &[u32]) -> std::io::Result<std::process::ExitStatus> {
    Command::new("kill")
        .args(["-s", name])
        .args(pids.iter().map(u32::to_string))
        .stderr(Stdio::null())
        .status()
}

/// `psql` as a client would run it: the test process's own user, TCP, the URL and
/// `PGPASSWORD` (or no password at all). `Ok(stdout)` or `Err(stderr)`.
fn client_psql(url: &str, password: Option<&str>, sql: &str) -> Result<String, String> {
    let mut psql = Command::new(bindir().join("psql"));
    psql.args([
        "-X",
        "-q",
        "-A",
        "-t",
        "-v",
        "ON_ERROR_STOP=1",
        "-d",
        url,
        "-c",
        sql,
    ])
    .env_remove("PGPASSWORD")
    .env("PGPASSFILE", "/nonexistent/pgpass")
    .env("PGCONNECT_TIMEOUT", "10");
    if let Some(password) = password {
        psql.env("PGPASSWORD", password);
    }
    let output = psql.output().expect("psql runs");
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout)
            .trim_end()
            .to_string())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

#[test]
fn gatehouse_logs_in_over_tcp_with_its_password_only() {
    let test = "gatehouse_logs_in_over_tcp_with_its_password_only";
    let Some(pg) = Postgres::start(test) else {
        return;
    };
    let file = pg.password_file();
    assert_eq!(fs::metadata(&file).unwrap().mode() & 0o777, 0o600);
    let password = fs::read_to_string(&file).unwrap();
    assert!(
        password.len() >= 16 && !pg.url().contains(&password),
        "{}",
        pg.url()
    );

    assert_eq!(
        client_psql(
            &pg.url(),
            Some(&password),
            "select current_user, current_database(), 1"
        ),
        Ok("gatehouse|gatehouse|1".to_string())
    );
    let wrong = client_psql(&pg.url(), Some("not the password"), "select 1").unwrap_err();
    assert!(
        wrong.contains("password authentication failed for user \"gatehouse\""),
        "{wrong}"
    );
    let none = client_psql(&pg.url(), None, "select 1").unwrap_err();
    assert!(none.contains("no password supplied"), "{none}");
    // The superuser has no password: over TCP it cannot log in at all.
    let superuser = pg.url().replace("gatehouse@", "postgres@");
    assert!(client_psql(&superuser, Some(&password), "select 1").is_err());

    let other = pg.create_database("second");
    assert_eq!(
        client_psql(
            &other,
            Some(&password),
            "create table t (n int); select current_database()"
        ),
        Ok("second".to_string())
    );
    assert_eq!(
        pg.psql(
            "postgres",
            "select pg_get_userbyid(datdba) from pg_database where datname = 'second'"
        ),
        "gatehouse"
    );
    assert_eq!(pg.psql(ROLE, "show fsync"), "on");
}

#[test]
fn a_commit_survives_a_crash_and_a_restart_on_the_same_port() {
    let test = "a_commit_survives_a_crash_and_a_restart_on_the_same_port";
    let Some(pg) = Postgres::start(test) else {
        return;
    };
    let password = fs::read_to_string(pg.password_file()).unwrap();
    client_psql(
        &pg.url(),
        Some(&password),
        "create table t (n int); insert into t values (7)",
    )
    .unwrap();
    pg.kill();
    assert!(pg.cluster_processes().is_empty());
    assert!(
        client_psql(&pg.url(), Some(&password), "select 1").is_err(),
        "a killed server answers"
    );
    pg.restart();
    assert!(
        fs::read_to_string(pg.dir.path().join("postgres.log"))
            .unwrap()
            .contains("database system was interrupted"),
        "the restart recovered from a crash:\n{}",
        pg.log_tail()
    );
    assert_eq!(
        client_psql(&pg.url(), Some(&password), "select n from t"),
        Ok("7".to_string())
    );
    pg.stop();
    assert!(pg.cluster_processes().is_empty());
    pg.restart();
    assert_eq!(pg.psql(ROLE, "select n from t"), "7");
}

#[test]
fn a_synchronous_standby_has_every_commit_and_takes_over_when_promoted() {
    let test = "a_synchronous_standby_has_every_commit_and_takes_over_when_promoted";
    let Some(primary) = Postgres::start(test) else {
        return;
    };
    let standby = primary.synchronous_standby(test);
    assert_ne!(standby.port, primary.port);
    assert_eq!(
        primary.psql(
            "postgres",
            "select count(*) from pg_stat_replication where sync_state = 'sync'"
        ),
        "1"
    );
    assert_eq!(standby.psql("postgres", "select pg_is_in_recovery()"), "t");

    // remote_apply: the commit returns once the standby has applied it.
    primary.psql(
        ROLE,
        "create table notes (n int);\n\
         set synchronous_commit = remote_apply;\n\
         insert into notes values (42);",
    );
    assert_eq!(standby.psql(ROLE, "select n from notes"), "42");

    standby.promote();
    standby.psql(ROLE, "insert into notes values (43)");
    assert_eq!(
        standby.psql(
            ROLE,
            "select string_agg(n::text, ',' order by n) from notes"
        ),
        "42,43"
    );
    let password = fs::read_to_string(standby.password_file()).unwrap();
    assert_eq!(
        client_psql(&standby.url(), Some(&password), "select current_user"),
        Ok("gatehouse".to_string())
    );
}
