//! Management operations: what every management command of the CLI does.
//!
//! A `Command` runs the same way wherever it runs: inside the server (sent over the
//! admin socket) or in the CLI process with the data file opened directly when no server
//! holds it. `execute` is that one code path; the CLI only chooses where and renders the
//! `Outcome`.

use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::admin_tokens::{AdminTokenInfo, IssuedToken};
use crate::admin_users::AdminUserInfo;
use crate::audit::{Event, EventPage, Origin, Query, Severity, VerifyReport};
use crate::backup::BackupReport;
use crate::clients::{ClientInfo, NewClient};
use crate::config::JobName;
use crate::config::KeyOrigin;
use crate::device_grants::GrantView;
use crate::devices::{DeviceError, DeviceView};
use crate::error_kind::{Classify, ErrorKind};
use crate::ids::DeviceId;
use crate::keys::{KeyInfo, Rotation, RotationReport};
use crate::pairing::{NewSession, PairingError};
use crate::ratelimit::Ban;
use crate::schedule::{JobError, JobView};
pub(crate) use crate::services::Services;
use crate::store::seal::{MasterKey, sync_parent_dir};

/// The master key text, kept out of `Debug` output and logs.
#[derive(Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub(crate) struct KeyText(pub String);

impl fmt::Debug for KeyText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyText(..)")
    }
}

/// A management request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub(crate) enum Command {
    AdminTokenCreate {
        name: Option<String>,
    },
    AdminTokenList,
    AdminTokenRevoke {
        id: String,
    },
    AdminUserAdd {
        name: String,
        password: KeyText,
    },
    AdminUserPasswd {
        name: String,
        password: KeyText,
    },
    AdminUserRemove {
        name: String,
    },
    AdminUserList,
    Rekey {
        new_key: KeyText,
    },
    KeysList,
    KeysRotate {
        now: bool,
    },
    KeysRevoke {
        kid: String,
    },
    ClientCreate {
        name: String,
    },
    ClientList,
    ClientRevoke {
        id: String,
    },
    DevicesList,
    DevicesShow {
        id: String,
    },
    DevicesRevoke {
        id: String,
    },
    PairNew {
        name: Option<String>,
        ttl_seconds: Option<u64>,
        /// Pair this existing device again instead of a new one.
        #[serde(default)]
        device: Option<String>,
    },
    PairApprove {
        user_code: String,
        name: Option<String>,
    },
    PairDeny {
        user_code: String,
    },
    AuditSearch {
        after: u64,
        kind: Option<String>,
        device: Option<String>,
        limit: usize,
    },
    AuditTail {
        count: usize,
    },
    AuditVerify,
    BansList,
    BansLift {
        key: String,
    },
    /// A backup written by the process that holds the data file, to this absolute path.
    Backup {
        path: PathBuf,
    },
    JobsList,
    JobsRun {
        name: String,
    },
    /// Whether a server answers (the CLI asks before working on the file itself).
    Ping,
    /// What the running server's listener serves (`doctor`).
    TlsStatus,
    /// What an operator should fix (`doctor`); `tls_off` as configured.
    Status {
        tls_off: bool,
    },
}

/// What a command did.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub(crate) enum Outcome {
    TokenCreated(IssuedToken),
    TokenList {
        tokens: Vec<AdminTokenInfo>,
    },
    TokenRevoked(AdminTokenInfo),
    AdminUser(AdminUserInfo),
    AdminUserRemoved {
        name: String,
    },
    AdminUserList {
        users: Vec<AdminUserInfo>,
    },
    Rekeyed {
        secrets: u64,
        fingerprint: String,
        /// Set when gatehouse replaced the key file itself (the `<data>.key` default).
        key_file_replaced: Option<PathBuf>,
        /// The key file the server reads at start, when it must be replaced by hand.
        key_file_to_replace: Option<PathBuf>,
    },
    KeyList {
        keys: Vec<KeyInfo>,
    },
    KeyRotated(RotationReport),
    KeyRevoked(KeyInfo),
    ClientCreated(NewClient),
    ClientList {
        clients: Vec<ClientInfo>,
    },
    ClientRevoked(ClientInfo),
    DeviceList {
        devices: Vec<DeviceView>,
    },
    DeviceRevoked(DeviceView),
    DeviceShown(DeviceView),
    PairingOpened(NewSession),
    DeviceGrant(GrantView),
    AuditPage(EventPage),
    AuditVerified(VerifyReport),
    BanList {
        bans: Vec<Ban>,
    },
    BanLifted(Ban),
    BackupWritten(BackupReport),
    JobList {
        jobs: Vec<JobView>,
    },
    JobRan(JobView),
    Pong,
    Warnings {
        warnings: Vec<crate::status::Warning>,
    },
    /// `None` when no server runs (the offline CLI has no listener).
    Tls {
        status: Option<Box<crate::tls::TlsStatus>>,
    },
}

/// A refused or failed command: a stable code and a message for a person.
#[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub(crate) struct CommandError {
    pub(crate) code: String,
    pub(crate) message: String,
}

impl CommandError {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self::with_code(kind.code(), message)
    }

    fn with_code(code: &str, message: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            message: message.into(),
        }
    }
}

/// Every domain error becomes a command error by its kind, with the code HTTP gives it.
impl<E: Classify> From<E> for CommandError {
    fn from(err: E) -> Self {
        Self::with_code(err.code(), err.to_string())
    }
}

/// Runs one command.
pub(crate) async fn execute(
    command: Command,
    services: &Services,
) -> Result<Outcome, CommandError> {
    let operator = Origin::operator();
    match command {
        Command::AdminTokenCreate { name } => {
            let name = name.unwrap_or_else(|| {
                format!(
                    "admin-{}",
                    crate::clock::format_rfc3339(services.clock.now_ms())
                )
            });
            Ok(Outcome::TokenCreated(
                services.admin_tokens.create(&name, &operator).await?,
            ))
        }
        Command::AdminTokenList => Ok(Outcome::TokenList {
            tokens: services.admin_tokens.list()?,
        }),
        Command::AdminTokenRevoke { id } => Ok(Outcome::TokenRevoked(
            services.admin_tokens.revoke(&id, &operator).await?,
        )),
        Command::AdminUserAdd { name, password } => Ok(Outcome::AdminUser(
            services
                .admin_users
                .add(&name, &password.0, &operator)
                .await?,
        )),
        Command::AdminUserPasswd { name, password } => Ok(Outcome::AdminUser(
            services
                .admin_users
                .set_password(&name, &password.0, &operator)
                .await?,
        )),
        Command::AdminUserRemove { name } => {
            services.admin_users.remove(&name, &operator).await?;
            Ok(Outcome::AdminUserRemoved { name })
        }
        Command::AdminUserList => Ok(Outcome::AdminUserList {
            users: services.admin_users.list()?,
        }),
        Command::Rekey { new_key } => rekey(&new_key, services).await,
        Command::KeysList => Ok(Outcome::KeyList {
            keys: services.keys.list(),
        }),
        Command::KeysRotate { now } => {
            let mode = if now {
                Rotation::Now
            } else {
                Rotation::Scheduled
            };
            Ok(Outcome::KeyRotated(
                services.keys.rotate(mode, &operator).await?,
            ))
        }
        Command::KeysRevoke { kid } => Ok(Outcome::KeyRevoked(
            services.keys.revoke(&kid, &operator).await?,
        )),
        Command::ClientCreate { name } => Ok(Outcome::ClientCreated(
            services.clients.create(&name, &operator).await?,
        )),
        Command::ClientList => Ok(Outcome::ClientList {
            clients: services.clients.list()?,
        }),
        Command::ClientRevoke { id } => Ok(Outcome::ClientRevoked(
            services.clients.revoke(&id, &operator).await?,
        )),
        Command::DevicesList => Ok(Outcome::DeviceList {
            devices: services.devices.list()?,
        }),
        Command::DevicesShow { id } => {
            let device = DeviceId::parse(&id)
                .ok_or_else(|| CommandError::from(DeviceError::NotFound(id.clone())))?;
            let view = services
                .devices
                .get(&device)?
                .ok_or_else(|| CommandError::from(DeviceError::NotFound(id.clone())))?;
            Ok(Outcome::DeviceShown(view))
        }
        Command::DevicesRevoke { id } => {
            let device = DeviceId::parse(&id)
                .ok_or_else(|| CommandError::from(DeviceError::NotFound(id.clone())))?;
            Ok(Outcome::DeviceRevoked(
                services.devices.revoke(&device, &operator).await?,
            ))
        }
        Command::PairNew {
            name,
            ttl_seconds,
            device,
        } => {
            let again = match device {
                None => None,
                Some(id) => Some(
                    DeviceId::parse(&id)
                        .ok_or_else(|| CommandError::from(PairingError::UnknownDevice(id)))?,
                ),
            };
            Ok(Outcome::PairingOpened(
                services
                    .pairing
                    .create(
                        name.as_deref(),
                        ttl_seconds.map(std::time::Duration::from_secs),
                        again,
                        &operator,
                    )
                    .await?,
            ))
        }
        Command::PairApprove { user_code, name } => Ok(Outcome::DeviceGrant(
            services
                .device_grants
                .approve(&user_code, name.as_deref(), &operator)
                .await?,
        )),
        Command::PairDeny { user_code } => Ok(Outcome::DeviceGrant(
            services.device_grants.deny(&user_code, &operator).await?,
        )),
        Command::AuditSearch {
            after,
            kind,
            device,
            limit,
        } => {
            let query = Query::parse(Some(after), kind, device, Some(limit))?;
            Ok(Outcome::AuditPage(services.audit.query(&query)?))
        }
        Command::AuditTail { count } => Ok(Outcome::AuditPage(EventPage {
            events: services.audit.tail(count)?,
            next: None,
        })),
        Command::AuditVerify => {
            let audit = services.audit.clone();
            let report = tokio::task::spawn_blocking(move || audit.verify_report(&mut |_, _| {}))
                .await
                .map_err(|err| CommandError::new(ErrorKind::Internal, err.to_string()))??;
            Ok(Outcome::AuditVerified(report))
        }
        Command::BansList => Ok(Outcome::BanList {
            bans: services.lockout.list(),
        }),
        Command::BansLift { key } => Ok(Outcome::BanLifted(
            services.lockout.lift(&key, &operator).await?,
        )),
        Command::Backup { path } => {
            if !path.is_absolute() {
                return Err(CommandError::new(
                    ErrorKind::Invalid,
                    "the backup path must be absolute",
                ));
            }
            Ok(Outcome::BackupWritten(
                services
                    .backups
                    .create(&path, &operator, Box::new(|_, _| {}))
                    .await?,
            ))
        }
        Command::Ping => Ok(Outcome::Pong),
        Command::Status { tls_off } => Ok(Outcome::Warnings {
            warnings: crate::status::warnings(services, tls_off)?,
        }),
        Command::TlsStatus => Ok(Outcome::Tls {
            status: services.tls.as_ref().map(|tls| Box::new(tls.status())),
        }),
        Command::JobsList => Ok(Outcome::JobList {
            jobs: services.jobs.list()?,
        }),
        Command::JobsRun { name } => {
            let job: JobName = name.parse().map_err(JobError::UnknownJob)?;
            Ok(Outcome::JobRan(services.jobs.run(job).await?))
        }
    }
}

async fn rekey(new_key: &KeyText, services: &Services) -> Result<Outcome, CommandError> {
    let new = MasterKey::from_text(&new_key.0).map_err(|reason| {
        CommandError::new(
            ErrorKind::Invalid,
            format!("the new key is not a gatehouse master key: {reason}"),
        )
    })?;
    if new.fingerprint() == services.store.master_key_fingerprint() {
        return Err(CommandError::new(
            ErrorKind::Conflict,
            "the new key is the key already in use",
        ));
    }
    let source = &services.master_key;
    // The default key file is ours to replace. The new key goes to disk before the data
    // file changes, so a crash at any point leaves a key that opens the file on disk.
    let staged = match source.origin {
        KeyOrigin::BesideDataFile => Some(stage_key_file(&source.path, &new)?),
        KeyOrigin::Configured | KeyOrigin::SystemdCredential => None,
    };
    let resealed = match services.store.rekey(&new).await {
        Ok(count) => count,
        Err(err) => {
            if let Some(staged) = &staged {
                let _ = fs::remove_file(staged);
            }
            return Err(CommandError::new(
                ErrorKind::Internal,
                format!("rekey failed, nothing changed: {err}"),
            ));
        }
    };
    services
        .audit
        .record_or_log(
            &Origin::operator(),
            Event::new("master_key.rotated")
                .severity(Severity::High)
                .detail("secrets_resealed", resealed)
                .detail("fingerprint", new.fingerprint()),
        )
        .await;
    let mut replaced = None;
    if let Some(staged) = staged {
        fs::rename(&staged, &source.path)
            .and_then(|()| sync_parent_dir(&source.path))
            .map_err(|err| {
                CommandError::new(
                    ErrorKind::Internal,
                    format!(
                        "the data file is now sealed with the new key, but {} could not be \
                         replaced ({err}); the new key is in {}: move it there by hand",
                        source.path.display(),
                        staged.display()
                    ),
                )
            })?;
        replaced = Some(source.path.clone());
    }
    Ok(Outcome::Rekeyed {
        secrets: resealed,
        fingerprint: new.fingerprint(),
        key_file_to_replace: replaced.is_none().then(|| source.path.clone()),
        key_file_replaced: replaced,
    })
}

/// Writes `key` to `<path>.new` (0600, fsynced) and returns that path.
fn stage_key_file(path: &Path, key: &MasterKey) -> Result<PathBuf, CommandError> {
    let mut staged = path.as_os_str().to_owned();
    staged.push(".new");
    let staged = PathBuf::from(staged);
    let write = || -> std::io::Result<()> {
        let _ = fs::remove_file(&staged);
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&staged)?;
        file.set_permissions(fs::Permissions::from_mode(0o600))?;
        file.write_all(key.to_text().as_bytes())?;
        file.sync_all()
    };
    write().map_err(|err| {
        CommandError::new(
            ErrorKind::Internal,
            format!("cannot write {}: {err}; nothing changed", staged.display()),
        )
    })?;
    Ok(staged)
}
