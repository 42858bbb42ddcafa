//! Builds everything from a validated `Config`, runs it, and stops it in order.
//!
//! Start order: bind the TCP listener (a port in use fails here, before the data file is
//! created or touched), load the master key, open the data file (checks and migrations
//! run before any connection is accepted), prepare TLS, make the bootstrap admin token on
//! a fresh instance, bind the admin socket, then accept. Stop order: `/readyz` turns 503,
//! accepting stops, open connections drain within the grace period, the admin socket
//! closes, the writer commits what is queued and the file is released.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin_socket::{AdminSocket, SocketError};
use crate::admin_tokens::{AdminTokenError, IssuedToken};
use crate::audit::{Event, Origin, Severity};
use crate::clock::{Clock, SharedClock};
use crate::config::{Config, KeyOrigin, Layer, TlsMode};
use crate::http::{self, AppState};
use crate::pairing::ServerIdentity;
use crate::schedule::Background;
use crate::services::{self, Services, ServicesError};
use crate::store::seal::{MasterKey, SealError};
use crate::store::{OpenReport, PostgresTarget, Store, StoreError};
use crate::tls::{self, Tls, TlsError};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(
        "cannot listen on {addr}: the address is already in use (another gatehouse, or another program, holds it); choose another with --listen"
    )]
    PortInUse { addr: SocketAddr },
    #[error(
        "cannot listen on {addr}: permission denied (ports below 1024 need CAP_NET_BIND_SERVICE; the systemd unit grants it)"
    )]
    PortDenied { addr: SocketAddr },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "the master key file {key} is missing but the data file {data} exists: a new key \
         cannot open it. Restore the key file, or {hint}"
    )]
    KeyMissingForExistingData {
        key: PathBuf,
        data: PathBuf,
        hint: String,
    },
    #[error(
        "{source}. Use the key this file was created with (after an interrupted rekey, the \
         file given to --new-key-file): {hint}"
    )]
    WrongMasterKey { source: StoreError, hint: String },
    #[error("no data file at {0}: start the server once (gatehouse serve), or pass --data")]
    NoDataFile(PathBuf),
    #[error("cannot read the database password from {path}: {source}")]
    PasswordFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("storage.ca_file {path}: {reason}")]
    CaFile { path: PathBuf, reason: String },
    #[error(transparent)]
    MasterKey(#[from] SealError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Socket(#[from] SocketError),
    #[error(transparent)]
    Services(#[from] ServicesError),
    #[error("cannot create the bootstrap admin token: {0}")]
    Bootstrap(#[from] AdminTokenError),
    #[error("cannot install the SIGTERM/SIGINT handlers: {0}")]
    Signals(std::io::Error),
    #[error("a start-up task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// How to give gatehouse another master key, said in the terms the operator used.
fn key_hint(config: &Config) -> String {
    match config.origin_of("master_key_file") {
        Layer::Flag(flag) => format!("pass the right file to {flag}"),
        Layer::Env(var) => format!("point {var} at the right file"),
        Layer::File(file) => format!(
            "point master_key_file in {} at the right file",
            file.display()
        ),
        Layer::Default => match config.master_key.origin {
            KeyOrigin::SystemdCredential => format!(
                "replace the systemd credential it was read from ({}), or pass \
                 --master-key-file",
                config.master_key.path.display()
            ),
            KeyOrigin::Configured | KeyOrigin::BesideDataFile => format!(
                "it was read from {} (beside the data file); pass --master-key-file or set \
                 GATEHOUSE_MASTER_KEY_FILE",
                config.master_key.path.display()
            ),
        },
    }
}

/// Loads the master key; creates `<data>.key` only for a brand-new instance.
pub(crate) fn load_master_key(config: &Config) -> Result<MasterKey, AppError> {
    let source = &config.master_key;
    let data = config.data_path.as_path();
    match MasterKey::load(&source.path) {
        Ok(key) => Ok(key),
        Err(SealError::KeyFileMissing { .. }) if source.origin == KeyOrigin::BesideDataFile => {
            if data.exists() {
                return Err(AppError::KeyMissingForExistingData {
                    key: source.path.clone(),
                    data: data.to_path_buf(),
                    hint: key_hint(config),
                });
            }
            let key = MasterKey::create_file(&source.path)?;
            tracing::warn!(
                key_file = %source.path.display(),
                "CREATED A NEW MASTER KEY beside the data file. Without this key the data file \
                 cannot be opened: copy it somewhere safe now, away from the data file and its \
                 backups, and in production hand it to gatehouse as a systemd credential or \
                 through GATEHOUSE_MASTER_KEY_FILE (see HARDENING.md)"
            );
            Ok(key)
        }
        Err(err) => Err(err.into()),
    }
}

/// The PostgreSQL database `storage.url` names, with its password: the first line of
/// `storage.password_file`, else the line of PostgreSQL's own password file that
/// matches (as libpq reads it), else none (the server may trust the connection).
pub(crate) fn storage_target(config: &Config) -> Result<Option<PostgresTarget>, AppError> {
    let Some(url) = &config.storage.url else {
        return Ok(None);
    };
    postgres_target(url, &config.storage).map(Some)
}

/// The certificates of `storage.ca_file`, as DER.
fn read_ca_file(path: &Path) -> Result<Vec<Vec<u8>>, AppError> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let bad = |reason: String| AppError::CaFile {
        path: path.to_path_buf(),
        reason,
    };
    let pem = std::fs::read(path).map_err(|err| bad(err.to_string()))?;
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .map(|cert| cert.map(|cert| cert.to_vec()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| bad(format!("not a PEM certificate file: {err}")))?;
    if certificates.is_empty() {
        return Err(bad("it holds no certificate".into()));
    }
    Ok(certificates)
}

/// `storage_target` for a URL given on its own (`storage copy --to`).
pub(crate) fn postgres_target(
    url: &str,
    storage: &crate::config::StorageConfig,
) -> Result<PostgresTarget, AppError> {
    let mut target = PostgresTarget {
        url: url.to_string(),
        password: None,
        ca_roots: storage.ca_file.as_deref().map(read_ca_file).transpose()?,
    };
    if let Some(path) = &storage.password_file {
        let text = std::fs::read_to_string(path).map_err(|source| AppError::PasswordFile {
            path: path.to_path_buf(),
            source,
        })?;
        let first = text.lines().next().unwrap_or_default().to_string();
        target.password = (!first.is_empty()).then_some(first);
        return Ok(target);
    }
    let Some(pgpass) = &storage.pgpass else {
        return Ok(target);
    };
    let Ok(meta) = std::fs::metadata(pgpass) else {
        return Ok(target);
    };
    // libpq ignores a password file that others may read; so does gatehouse.
    use std::os::unix::fs::PermissionsExt;
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(file = %pgpass.display(), "the PostgreSQL password file can be read by group or others; it is ignored (chmod 600 it)");
        return Ok(target);
    }
    let text = std::fs::read_to_string(pgpass).map_err(|source| AppError::PasswordFile {
        path: pgpass.clone(),
        source,
    })?;
    let (host, port, db, user) = target.identity()?;
    target.password = crate::store::pgpass_lookup(&text, &host, port, &db, &user);
    Ok(target)
}

/// Opens (or creates) the data file for `config`, logging what happened.
pub(crate) async fn open_store(config: &Config, clock: SharedClock) -> Result<Store, AppError> {
    open_store_with_report(config, clock)
        .await
        .map(|(store, _)| store)
}

async fn open_store_with_report(
    config: &Config,
    clock: SharedClock,
) -> Result<(Store, OpenReport), AppError> {
    let key = load_master_key(config)?;
    if config.master_key.origin == KeyOrigin::BesideDataFile {
        tracing::warn!(
            key_file = %config.master_key.path.display(),
            "the master key sits beside the data file: whoever copies that directory has both"
        );
    }
    let opened = match storage_target(config)? {
        Some(target) => {
            tokio::task::spawn_blocking(move || Store::open_postgres(&target, &key, clock.as_ref()))
                .await?
        }
        None => {
            let path = config.data_path.clone();
            tokio::task::spawn_blocking(move || Store::open(&path, &key, clock.as_ref())).await?
        }
    };
    let (store, report) = opened.map_err(|err| match err {
        StoreError::WrongMasterKey { .. } => AppError::WrongMasterKey {
            source: err,
            hint: key_hint(config),
        },
        other => AppError::Store(other),
    })?;
    log_open_report(&store, &report);
    Ok((store, report))
}

/// Opens an existing data file (management commands never create one).
pub(crate) async fn open_existing_store(
    config: &Config,
    clock: SharedClock,
) -> Result<Store, AppError> {
    if let Some(target) = storage_target(config)? {
        // A command neither makes a master key nor sets an empty database up under one:
        // that is the first node's to do.
        let key = MasterKey::load(&config.master_key.path)?;
        let opened = tokio::task::spawn_blocking(move || {
            Store::open_postgres_existing(&target, &key, clock.as_ref())
        })
        .await?;
        return opened.map_err(|err| match err {
            StoreError::WrongMasterKey { .. } => AppError::WrongMasterKey {
                source: err,
                hint: key_hint(config),
            },
            other => AppError::Store(other),
        });
    }
    if !config.data_path.exists() {
        return Err(AppError::NoDataFile(config.data_path.clone()));
    }
    match open_store(config, clock).await {
        // A file that cannot be written here (a backup on read-only media, a file of
        // another user) still serves the commands that only read it.
        Err(AppError::Store(StoreError::Io { source, .. }))
            if matches!(
                source.kind(),
                std::io::ErrorKind::ReadOnlyFilesystem | std::io::ErrorKind::PermissionDenied
            ) =>
        {
            let key = load_master_key(config)?;
            let path = config.data_path.clone();
            let store =
                tokio::task::spawn_blocking(move || Store::open_read_only(&path, &key)).await?;
            let store = store.map_err(|err| match err {
                StoreError::WrongMasterKey { .. } => AppError::WrongMasterKey {
                    source: err,
                    hint: key_hint(config),
                },
                other => AppError::Store(other),
            })?;
            tracing::info!(path = %config.data_path.display(), "the data file cannot be written here; opened it read-only");
            Ok(store)
        }
        other => other,
    }
}

fn log_open_report(store: &Store, report: &OpenReport) {
    let info = store.info();
    if report.created {
        tracing::info!(path = %store.path().display(), instance = %info.instance_id, "created a new data file");
    } else {
        tracing::info!(path = %store.path().display(), instance = %info.instance_id, format = info.format_version, "opened the data file");
    }
    if let Some(m) = &report.migrated {
        tracing::info!(from = m.from, to = m.to, steps = ?m.steps, "migrated the data file");
    }
    if let Some(kept) = &report.recovered_original {
        tracing::warn!(original = %kept.display(), "the data file was repaired after an unclean stop");
    }
    for warning in &report.warnings {
        tracing::warn!("{warning}");
    }
}

fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, AppError> {
    let map = |source: std::io::Error| match source.kind() {
        std::io::ErrorKind::AddrInUse => AppError::PortInUse { addr },
        std::io::ErrorKind::PermissionDenied => AppError::PortDenied { addr },
        _ => AppError::Bind { addr, source },
    };
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(map)?;
    socket.set_reuseaddr(true).map_err(map)?;
    socket.bind(addr).map_err(map)?;
    socket.listen(1024).map_err(map)
}

/// A started server.
#[derive(Debug)]
pub struct Running {
    pub local_addr: SocketAddr,
    pub(crate) admin_socket: PathBuf,
    /// Set on the first start of an instance: shown once, never stored.
    pub bootstrap_token: Option<IssuedToken>,
    /// The issuer of the previous start, when this start changed it.
    pub issuer_changed_from: Option<String>,
    pub tls: Option<Arc<Tls>>,
    /// The plain-HTTP listener that redirects to HTTPS, if any.
    pub http_addr: Option<SocketAddr>,
    pub store: Store,
    /// The domain services the server runs (tests sign, rotate and revoke through them).
    pub services: Services,
    state: AppState,
    stop: watch::Sender<bool>,
    http_task: JoinHandle<http::serve::Drained>,
    redirect_task: Option<JoinHandle<http::serve::Drained>>,
    tls_task: Option<JoinHandle<()>>,
    socket_task: JoinHandle<()>,
    maintenance_task: JoinHandle<()>,
}

/// Starts the server described by `config`.
pub async fn start(config: &Config, clock: SharedClock) -> Result<Running, AppError> {
    tls::install_default_provider();
    let listener = bind(config.server.listen)?;
    let local_addr = listener.local_addr().map_err(|source| AppError::Bind {
        addr: config.server.listen,
        source,
    })?;
    let redirect_listener = match config.server.http_listen {
        Some(addr) => Some(bind(addr)?),
        None => None,
    };
    let http_addr = match &redirect_listener {
        Some(listener) => Some(listener.local_addr().map_err(|source| AppError::Bind {
            addr: local_addr,
            source,
        })?),
        None => None,
    };
    let (store, report) = open_store_with_report(config, clock.clone()).await?;
    let (server_tls, acme_driver) = prepare_tls(config, &store, &clock, local_addr).await?;
    let server = ServerIdentity {
        url: services::issuer(config, local_addr),
        pin: server_tls.as_ref().and_then(|tls| tls.pin.clone()),
    };
    if config.tokens.issuer.is_none() && local_addr.ip().is_unspecified() {
        tracing::warn!(
            issuer = %server.url,
            "tokens.issuer is not set and the server listens on all addresses: tokens and \
             pairing URIs name {}, which apps cannot reach. Set tokens.issuer \
             (GATEHOUSE_ISSUER) to the URL apps use",
            server.url
        );
    }
    let previous = crate::tokens::record_issuer(
        &store,
        &clock,
        &server.url,
        config.tokens.audience.is_none(),
    )
    .await?;
    if let Some(previous) = &previous {
        tracing::warn!(
            from = %previous.issuer,
            to = %server.url,
            "the issuer changed since the last start: new tokens name {}. Refresh tokens keep \
             working and access tokens issued before now are accepted until they expire; \
             apps that verify tokens offline must expect the new issuer. Set tokens.issuer \
             (GATEHOUSE_ISSUER) to keep one issuer across moves",
            server.url
        );
    }
    let issuer_change = previous.as_ref().map(|p| p.issuer.clone());
    let mut services =
        Services::start(store.clone(), clock.clone(), config, server, previous).await?;
    services.tls = server_tls.clone();
    record_start(&services, config, local_addr, &report).await?;
    let bootstrap_token = bootstrap(&services).await?;
    let socket = AdminSocket::bind(&config.admin_socket)?;
    let admin_socket = socket.path().to_path_buf();

    let front = (config.front.upstream.is_some() || !config.front.routes.is_empty()).then(|| {
        crate::front::FrontDoor::new(crate::front::UpstreamConfig {
            upstream: config.front.upstream.clone(),
            routes: config.front.routes.clone(),
            connect_timeout: config.front.connect_timeout,
            response_timeout: config.front.response_timeout,
            idle_timeout: config.front.idle_timeout,
            assertion: config.front.assertion,
            allowed_origins: config.cors.allowed_origins.clone(),
            ws_max_message: config.front.ws_max_message,
            ws_max_duration: config.front.ws_max_duration,
            ws_messages_per_second: config.front.ws_messages_per_second,
            ws_max_connections_per_device: config.front.ws_max_connections_per_device,
        })
    });
    let state = AppState::serving(services.clone(), config.tls_mode, front);
    let router = http::router(state.clone(), &config.server, &config.cors);
    let (stop, stopped) = watch::channel(false);
    let until_stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let http_task = tokio::spawn(http::serve::serve(
        listener,
        server_tls.as_ref().map(|t| t.acceptor()),
        router,
        config.server.clone(),
        state.http_counters.clone(),
        until_stopped(stopped.clone()),
    ));
    let redirect_task = redirect_listener.map(|listener| {
        tokio::spawn(http::serve::serve(
            listener,
            None,
            http::redirect::router(config, local_addr),
            config.server.clone(),
            // The redirect listener's connections are not the API's: counted apart.
            Arc::default(),
            until_stopped(stopped.clone()),
        ))
    });
    let tls_task = match (acme_driver, &server_tls) {
        (Some(driver), _) => Some(tokio::spawn(driver.run(until_stopped(stopped.clone())))),
        (None, Some(tls)) if tls.files.is_some() => Some(tokio::spawn(reload_on_hangup(
            tls.clone(),
            services.clone(),
            until_stopped(stopped.clone()),
        ))),
        _ => None,
    };
    let missed = services.jobs.start().await?;
    let maintenance_task = tokio::spawn(crate::schedule::run_background(
        Background {
            jobs: services.jobs.clone(),
            devices: services.devices.clone(),
            limits: services.limits.clone(),
            audit: services.audit.clone(),
            revocations: services.revocations.clone(),
            store: services.store.clone(),
            clock: services.clock.clone(),
            tls: services.tls.clone(),
            checkpoint_every: config.audit.checkpoint_every,
        },
        missed,
        until_stopped(stopped.clone()),
    ));
    // Nodes sharing a database: other nodes' revocations, keys and bans, as they commit.
    if let Some(feed) = services.store.follow()? {
        tokio::spawn(crate::schedule::follow_changes(
            crate::schedule::Mirrors {
                revocations: services.revocations.clone(),
                keys: services.keys.clone(),
                lockout: services.lockout.clone(),
                admin_tokens: services.admin_tokens.clone(),
                clients: services.clients.clone(),
            },
            feed,
            until_stopped(stopped.clone()),
        ));
    }
    let socket_task = tokio::spawn(socket.serve(services, until_stopped(stopped)));
    Ok(Running {
        local_addr,
        admin_socket,
        bootstrap_token,
        issuer_changed_from: issuer_change,
        tls: server_tls,
        http_addr,
        store,
        services: Services::clone(&state.services),
        state,
        stop,
        http_task,
        redirect_task,
        tls_task,
        socket_task,
        maintenance_task,
    })
}

/// The certificate to serve, per mode, and in `acme` mode the driver that orders and
/// renews it (started once the server accepts, since the CA connects back to validate).
async fn prepare_tls(
    config: &Config,
    store: &Store,
    clock: &SharedClock,
    local_addr: SocketAddr,
) -> Result<(Option<Arc<Tls>>, Option<tls::acme::AcmeDriver>), AppError> {
    match config.tls_mode {
        TlsMode::SelfSigned => {
            let (cert, pin) = tls::self_signed(store, clock.as_ref(), local_addr).await?;
            let mut tls = Tls::new(TlsMode::SelfSigned, cert)?;
            tls.pin = Some(pin);
            tls.self_signed_for = Some(local_addr);
            Ok((Some(Arc::new(tls)), None))
        }
        TlsMode::Files => {
            let (Some(cert), Some(key)) = (&config.tls.cert_file, &config.tls.key_file) else {
                return Err(AppError::Tls(TlsError::Certificate(
                    "tls.mode \"files\" needs tls.cert_file and tls.key_file".into(),
                )));
            };
            let files = tls::files::CertFiles {
                cert: cert.clone(),
                key: key.clone(),
            };
            let mut tls = Tls::new(TlsMode::Files, files.load()?)?;
            tls.files = Some(files);
            Ok((Some(Arc::new(tls)), None))
        }
        TlsMode::Acme => {
            let settings = tls::acme::AcmeSettings::from_config(config)?;
            let stored = tls::acme::stored_certificate(store, &settings, clock.now_ms())?;
            let issued = stored.is_some();
            let cert = match stored {
                Some(cert) => cert,
                // Until the CA's certificate arrives the server is reachable (for
                // diagnosis) with the self-signed one, and /readyz says it is not ready.
                None => tls::self_signed(store, clock.as_ref(), local_addr).await?.0,
            };
            let mut tls = Tls::new(TlsMode::Acme, cert)?;
            let status = Arc::new(tls::acme::AcmeStatus::new(
                &settings,
                issued,
                store.clone(),
                clock.clone(),
            ));
            tls.acme = Some(status.clone());
            let tls = Arc::new(tls);
            let driver = tls::acme::AcmeDriver::new(
                settings,
                status,
                tls.slot.clone(),
                store.clone(),
                clock.clone(),
            );
            Ok((Some(tls), Some(driver)))
        }
        TlsMode::Off => {
            tracing::warn!(%local_addr, "TLS is off: plain HTTP on a loopback address");
            Ok((None, None))
        }
    }
}

/// `files` mode: SIGHUP reads the certificate and key again. A bad pair changes nothing
/// (the old certificate stays) and is logged and audited; open connections are never
/// touched either way.
async fn reload_on_hangup(
    tls: Arc<Tls>,
    services: Services,
    stopped: impl std::future::Future<Output = ()>,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(hangups) => hangups,
        Err(err) => {
            tracing::error!(error = %err, "cannot listen for SIGHUP: certificate files will not be reloaded");
            return;
        }
    };
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            () = &mut stopped => return,
            _ = hangups.recv() => {
                tracing::info!("SIGHUP: reloading the certificate files");
                reload_files(&tls, &services).await;
            }
        }
    }
}

async fn reload_files(tls: &Tls, services: &Services) {
    let Some(files) = &tls.files else { return };
    crate::systemd::reloading();
    let loaded = files.load();
    crate::systemd::reloaded();
    let event = match loaded {
        Ok(cert) => {
            let info = cert.info.clone();
            tls.slot.replace(cert);
            tracing::info!(names = ?info.names, not_after = %crate::clock::format_rfc3339(info.not_after_ms), "serving the reloaded certificate");
            Event::new("tls.certificate_loaded")
                .severity(Severity::Notice)
                .detail("names", info.names)
                .detail("issuer", info.issuer)
                .detail("not_after", crate::clock::format_rfc3339(info.not_after_ms))
                .detail("sha256", info.sha256)
        }
        Err(err) => {
            tracing::error!(error = %err, "the certificate files were not reloaded; the previous certificate is still served");
            Event::failure("tls.reload_failed").detail("error", err.to_string())
        }
    };
    services.audit.record_or_log(&Origin::system(), event).await;
}

/// `service.started`, `config.loaded` and (after a migration or a repair) `store.migrated`
/// or `store.repaired`, in one durable write before any request is served.
async fn record_start(
    services: &Services,
    config: &Config,
    local_addr: SocketAddr,
    report: &OpenReport,
) -> Result<(), AppError> {
    let system = Origin::system();
    let mut events = vec![
        (
            system.clone(),
            Event::new("service.started")
                .severity(Severity::Notice)
                .detail("version", env!("CARGO_PKG_VERSION"))
                .detail("listen", local_addr.to_string())
                .detail("data_file_created", report.created),
        ),
        (
            system.clone(),
            Event::new("config.loaded").detail("sources", config.sources.clone()),
        ),
    ];
    if let Some(m) = &report.migrated {
        events.push((
            system.clone(),
            Event::new("store.migrated")
                .severity(Severity::Notice)
                .detail("from", m.from)
                .detail("to", m.to)
                .detail("steps", m.steps.clone()),
        ));
    }
    if let Some(kept) = &report.recovered_original {
        events.push((
            system,
            Event::new("store.repaired")
                .severity(Severity::Warning)
                .detail("original_kept_at", kept.display().to_string()),
        ));
    }
    services.audit.record_many(events).await?;
    Ok(())
}

/// A fresh instance (no admin token was ever made) gets one, shown once.
async fn bootstrap(services: &Services) -> Result<Option<IssuedToken>, AppError> {
    if !services.admin_tokens.list()?.is_empty() {
        return Ok(None);
    }
    Ok(Some(
        services
            .admin_tokens
            .create("bootstrap", &Origin::system())
            .await?,
    ))
}

impl Running {
    /// Drains and stops everything; returns once the data file is released.
    pub async fn stop(self) -> Result<(), AppError> {
        self.state.start_draining();
        self.services.live.close_all();
        let _ = self.stop.send(true);
        let drained = self.http_task.await?;
        if let Some(task) = self.redirect_task {
            task.await?;
        }
        if let Some(task) = self.tls_task {
            task.await?;
        }
        if drained.cut > 0 {
            tracing::warn!(
                connections = drained.cut,
                "connections closed at the end of the grace period"
            );
        }
        self.socket_task.await?;
        self.maintenance_task.await?;
        self.services
            .audit
            .record_or_log(
                &Origin::system(),
                Event::new("service.stopped").severity(Severity::Notice),
            )
            .await;
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.close()).await?;
        Ok(())
    }
}

/// SIGTERM and SIGINT handlers, installed before anything is announced: a signal that
/// arrives at any point after the "listening" line is a clean stop, never a kill.
#[derive(Debug)]
pub(crate) struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    pub(crate) fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Waits for SIGTERM or SIGINT.
    pub(crate) async fn wait(mut self) {
        tokio::select! {
            _ = self.term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = self.int.recv() => tracing::info!("SIGINT: shutting down"),
        }
    }
}

/// `gatehouse serve`: start, announce, run until a signal, stop.
pub(crate) async fn serve(config: Config) -> Result<(), AppError> {
    let clock: SharedClock = Arc::new(crate::clock::SystemClock);
    for source in &config.sources {
        tracing::info!(%source, "configuration loaded");
    }
    let signals = StopSignals::install().map_err(AppError::Signals)?;
    let running = start(&config, clock.clone()).await?;
    announce(&running, &config, clock.as_ref());
    crate::systemd::ready(&format!("serving on {}", running.local_addr));
    let watchdog = crate::systemd::watchdog(running.store.clone());
    signals.wait().await;
    crate::systemd::stopping();
    if let Some(watchdog) = watchdog {
        watchdog.abort();
    }
    running.stop().await?;
    tracing::info!("stopped");
    Ok(())
}

fn announce(running: &Running, config: &Config, clock: &dyn Clock) {
    let scheme = if running.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let url = format!("{scheme}://{}", running.local_addr);
    if let Some(token) = &running.bootstrap_token {
        println!(
            "\nFirst start: a bootstrap admin token was created. It is shown only now; store it \
             somewhere safe:\n\n    {token}\n\nNext: create the first admin user in the \
             browser (the link carries the token; a self-signed certificate needs a one-time \
             exception):\n\n    {url}/admin/#setup={token}\n\nor with gatehouse admin-user \
             add NAME; then revoke this token (gatehouse admin-token revoke {id}).\n",
            token = token.token,
            id = token.id
        );
    }
    println!("gatehouse listening on {url}");
    println!("admin UI: {url}/admin/");
    for route in &config.front.routes {
        let upstream = route.upstream.as_ref().or(config.front.upstream.as_ref());
        if let Some(upstream) = upstream {
            println!(
                "route {} ({}): {upstream}",
                route.label(),
                route.auth.as_str()
            );
        }
    }
    if let Some(upstream) = &config.front.upstream {
        println!("front door: other requests with a device token go to {upstream}");
    }
    if let Some(from) = &running.issuer_changed_from {
        println!(
            "issuer changed: {from} -> {issuer} (refresh tokens keep working; apps that verify \
             offline must expect the new issuer; set tokens.issuer to keep one issuer)",
            issuer = running.services.tokens.settings().issuer
        );
    }
    println!("admin socket: {}", running.admin_socket.display());
    if let Some(addr) = running.http_addr {
        println!("redirecting http://{addr} to HTTPS");
    }
    if let Some(tls) = &running.tls {
        let cert = tls.slot.current().info.clone();
        let until = crate::clock::format_rfc3339(cert.not_after_ms);
        match (&tls.pin, &tls.acme) {
            (Some(pin), _) => println!(
                "TLS: self-signed certificate for {} (valid until {until}); SPKI pin {pin}",
                cert.names.join(", ")
            ),
            (None, Some(acme)) if !acme.snapshot().issued => println!(
                "TLS: ordering a certificate for {} from {}; a self-signed one is served until \
                 it arrives",
                config.tls.domains.join(", "),
                config.tls.acme.directory
            ),
            _ => println!(
                "TLS: certificate for {} from {} (valid until {until})",
                cert.names.join(", "),
                cert.issuer
            ),
        }
    }
    tracing::info!(
        %url,
        tls = config.tls_mode.as_str(),
        admin_socket = %running.admin_socket.display(),
        started_at = %crate::clock::format_rfc3339(clock.now_ms()),
        "serving"
    );
}
