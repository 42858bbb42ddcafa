//! Configuration: a TOML file, `GATEHOUSE_*` environment variables and command-line
//! flags, applied in layers to one validated `Config`.
//!
//! This is the only module that reads the environment or the config file, and a leaf:
//! it names no other part of gatehouse. Every setting is declared once, in
//! `settings.rs`, with its key, environment variable, flag, default, doc line, parser
//! and field. The layers are applied in order to one `Config`: built-in defaults, the
//! file, the environment, the flags; each records where a value came from
//! (`Config::origin_of`). Defaults that depend on other settings (the admin socket
//! beside the data file, port 443 with ACME, …) are worked out once every layer is
//! applied, then the settings are checked against each other. An unknown key or
//! `GATEHOUSE_*` variable, or a bad value, is an error that names the setting, where it
//! came from and what is allowed.

mod jobs;
mod routes;
mod settings;
mod values;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use jobs::{CronSchedule, JobName, JobsConfig, parse_timezone};
#[cfg(test)]
pub(crate) use routes::{GATEHOUSE_PATHS, under};
pub use routes::{Route, RouteAuth};
pub use settings::{Builtin, SETTINGS, Setting};
pub(crate) use values::storage_url;
pub use values::{KeyAlgorithm, KeyOrigin, LogFormat, MasterKeySource, Rate, TlsMode, Upstream};

/// The longest a pairing session may stay open, by setting or by request.
pub(crate) const PAIRING_MAX_TTL: Duration = Duration::from_secs(3600);

/// The file read when neither `--config` nor `GATEHOUSE_CONFIG` names one.
const PACKAGED_CONFIG_FILE: &str = "/etc/gatehouse/gatehouse.toml";
const DATA_FILE_NAME: &str = "gatehouse.redb";
const LISTEN: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::LOCALHOST,
    8443,
));
const ACME_LISTEN: SocketAddr = SocketAddr::V6(std::net::SocketAddrV6::new(
    std::net::Ipv6Addr::UNSPECIFIED,
    443,
    0,
    0,
));
const ACME_HTTP_LISTEN: SocketAddr = SocketAddr::V6(std::net::SocketAddrV6::new(
    std::net::Ipv6Addr::UNSPECIFIED,
    80,
    0,
    0,
));

/// Environment variables that are read but are not settings.
const OTHER_ENV: &[&str] = &["GATEHOUSE_CONFIG"];

/// A configuration error: which setting, from where, and what is allowed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    FileUnreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    FileSyntax { path: PathBuf, message: String },
    #[error("{origin}: unknown setting `{key}`{}; known settings: {known}", did_you_mean(.nearest))]
    UnknownKey {
        origin: String,
        key: String,
        /// The known name closest to `key`, when one is close enough to be a typo.
        nearest: Option<&'static str>,
        known: String,
    },
    #[error("{origin}: bad value {value:?} for `{key}`: {allowed}")]
    BadValue {
        origin: String,
        key: &'static str,
        value: String,
        allowed: String,
    },
    #[error("{0}")]
    Invalid(String),
}

/// Limits and timeouts of the HTTPS listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    pub(crate) listen: SocketAddr,
    /// The plain-HTTP listener that redirects to HTTPS (`None`: off).
    pub(crate) http_listen: Option<SocketAddr>,
    pub(crate) max_body_bytes: usize,
    pub(crate) header_read_timeout: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) tls_handshake_timeout: Duration,
    pub(crate) idle_timeout: Duration,
    pub(crate) max_connections: usize,
    pub(crate) max_header_bytes: usize,
    pub(crate) max_headers: usize,
    pub(crate) shutdown_grace: Duration,
    pub(crate) h2_max_concurrent_streams: u32,
    /// Peers whose `X-Forwarded-For` / `Forwarded` headers are believed (empty: none).
    pub(crate) trusted_proxies: Vec<ipnet::IpNet>,
    /// Open connections from one address at most (trusted proxies are exempt).
    pub(crate) max_connections_per_ip: usize,
}

/// Placeholders only: every field is set by its setting's default, or worked out from
/// other settings, before a `Config` leaves `load`.
impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: LISTEN,
            http_listen: None,
            max_body_bytes: 0,
            header_read_timeout: Duration::ZERO,
            request_timeout: Duration::ZERO,
            tls_handshake_timeout: Duration::ZERO,
            idle_timeout: Duration::ZERO,
            max_connections: 0,
            max_header_bytes: 0,
            max_headers: 0,
            shutdown_grace: Duration::ZERO,
            h2_max_concurrent_streams: 0,
            trusted_proxies: Vec::new(),
            max_connections_per_ip: 0,
        }
    }
}

/// The token authority's settings.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct TokenConfig {
    /// `iss` of issued tokens; `None`: derived from the domain or listen address at
    /// start.
    pub(crate) issuer: Option<String>,
    /// `aud` of issued tokens; `None`: the issuer.
    pub(crate) audience: Option<String>,
    pub(crate) access_ttl: Duration,
    pub(crate) refresh_ttl: Duration,
    /// Clock skew allowed when checking `exp` and `nbf`.
    pub(crate) leeway: Duration,
    pub(crate) key_algorithm: KeyAlgorithm,
    /// How long a pairing session stays open when its creator names no TTL.
    pub(crate) pairing_ttl: Duration,
    /// How long a device code and its user code (RFC 8628) live.
    pub(crate) device_code_ttl: Duration,
    /// The polling interval a device grant starts with.
    pub(crate) device_poll_interval: Duration,
    /// Whether pairing and the device code grant need a DPoP proof (bound tokens only).
    pub(crate) require_dpop: bool,
    /// Whether DPoP proofs must carry a nonce this server made (`DPoP-Nonce`).
    pub(crate) dpop_nonce: bool,
    /// How long a verifier may keep a token status list before fetching it again.
    pub(crate) status_list_ttl: Duration,
}

/// Every rate-limit policy's rate, and the bound on the subjects tracked.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct RateLimitConfig {
    pub(crate) pairing: Rate,
    pub(crate) refresh: Rate,
    pub(crate) introspection: Rate,
    pub(crate) admin_login: Rate,
    pub(crate) ws_messages: Rate,
    pub(crate) per_ip: Rate,
    /// Windows held in memory at most (oldest forgotten first).
    pub(crate) max_keys: usize,
}

/// Brute-force lockout.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct LockoutConfig {
    pub(crate) max_failures: u32,
    pub(crate) window: Duration,
    pub(crate) ban: Duration,
    pub(crate) max_ban: Duration,
}

/// Where certificates come from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct TlsConfig {
    /// DNS names served (and ordered from the ACME CA).
    pub(crate) domains: Vec<String>,
    pub(crate) acme: AcmeConfig,
    /// `files` mode: the PEM chain and key.
    pub(crate) cert_file: Option<PathBuf>,
    pub(crate) key_file: Option<PathBuf>,
}

/// The ACME CA and account.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct AcmeConfig {
    /// The directory URL.
    pub(crate) directory: String,
    /// `mailto:` contacts of the account.
    pub(crate) contact: Vec<String>,
    /// Extra roots to trust for the directory's HTTPS (a private CA, or a test CA).
    pub(crate) ca_root: Option<PathBuf>,
    /// First wait after a failed order; doubles up to a day.
    pub(crate) retry: Duration,
    /// External Account Binding: the key id and the file with the MAC key.
    pub(crate) eab_kid: Option<String>,
    pub(crate) eab_key_file: Option<PathBuf>,
}

/// Admin UI sessions.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct SessionConfig {
    pub(crate) idle: Duration,
    pub(crate) max: Duration,
}

/// Cross-origin access to the API from browsers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CorsConfig {
    /// Origins (`https://app.example.com`) allowed to call the API; `*` for any (only
    /// without credentials). Empty: no CORS headers at all.
    pub(crate) allowed_origins: Vec<String>,
    /// Whether browsers may send cookies and `Authorization` cross-origin.
    pub(crate) allow_credentials: bool,
}

/// Backup settings.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct BackupConfig {
    /// Where scheduled backups go.
    pub(crate) dir: PathBuf,
    /// How many scheduled backups are kept.
    pub(crate) keep: usize,
}

/// Where the store lives when it is not the data file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct StorageConfig {
    /// `storage.url`: a PostgreSQL database shared by several nodes.
    pub(crate) url: Option<String>,
    /// `storage.password_file`: the database password, on its first line.
    pub(crate) password_file: Option<PathBuf>,
    /// `storage.ca_file`: the certificates trusted to sign the database server's (PEM);
    /// not set: Mozilla's roots.
    pub(crate) ca_file: Option<PathBuf>,
    /// PostgreSQL's own password file, read when `password_file` is not set:
    /// `PGPASSFILE`, else `~/.pgpass` (libpq's order).
    pub(crate) pgpass: Option<PathBuf>,
}

/// Audit-log settings.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct AuditConfig {
    pub(crate) retention: Duration,
    /// How often the leader writes a checkpoint binding the other nodes' audit chains
    /// (PostgreSQL only).
    pub(crate) checkpoint_every: Duration,
}

/// The front door (`upstream.*`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct FrontConfig {
    /// Where requests gatehouse does not answer go; `None`: no front door.
    pub(crate) upstream: Option<Upstream>,
    pub(crate) connect_timeout: Duration,
    pub(crate) response_timeout: Duration,
    /// The longest silence while a body streams between client and app, either way.
    pub(crate) idle_timeout: Duration,
    /// Whether requests for the app carry a signed assertion (`X-Gatehouse-Assertion`).
    pub(crate) assertion: bool,
    /// The largest message a client may send through a relayed WebSocket.
    pub(crate) ws_max_message: usize,
    /// The longest a relayed WebSocket stays open.
    pub(crate) ws_max_duration: Duration,
    /// Messages a device may send a second through its relayed WebSockets together.
    pub(crate) ws_messages_per_second: u32,
    /// Relayed WebSockets one device may hold open at once.
    pub(crate) ws_max_connections_per_device: usize,
    /// `[[routes]]`: where requests under a path (on a host) go, and who may send them.
    pub(crate) routes: Vec<Route>,
}

/// The WebSocket channel's limits.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct WsConfig {
    pub(crate) max_connections: usize,
    pub(crate) max_connections_per_ip: usize,
    pub(crate) messages_per_second: u32,
}

/// The validated configuration.
#[derive(Debug, Clone, Default)]
pub struct Config {
    pub data_path: PathBuf,
    pub(crate) storage: StorageConfig,
    pub master_key: MasterKeySource,
    pub(crate) admin_socket: PathBuf,
    pub server: ServerConfig,
    pub(crate) tls_mode: TlsMode,
    pub(crate) tls: TlsConfig,
    pub(crate) sessions: SessionConfig,
    pub cors: CorsConfig,
    pub(crate) log_format: LogFormat,
    pub(crate) log_filter: String,
    pub(crate) tokens: TokenConfig,
    pub(crate) ws: WsConfig,
    pub(crate) front: FrontConfig,
    pub(crate) ratelimit: RateLimitConfig,
    pub(crate) lockout: LockoutConfig,
    pub(crate) audit: AuditConfig,
    pub(crate) jobs: JobsConfig,
    pub(crate) backup: BackupConfig,
    /// Where settings came from, for the start-up log (`file /etc/...`, `env GATEHOUSE_...`).
    pub(crate) sources: Vec<String>,
    /// Where each setting's value came from, by key; a key not here has its built-in
    /// default.
    origins: BTreeMap<&'static str, (Layer, String)>,
}

/// A layer a setting's value can come from, lowest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Layer {
    /// The built-in default (or one worked out from other settings).
    Default,
    /// The config file.
    File(PathBuf),
    /// An environment variable.
    Env(&'static str),
    /// A command-line flag.
    Flag(&'static str),
}

impl std::fmt::Display for Layer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Default => f.write_str("default"),
            Self::File(path) => write!(f, "config file {}", path.display()),
            Self::Env(name) => write!(f, "environment variable {name}"),
            Self::Flag(flag) => write!(f, "flag {flag}"),
        }
    }
}

/// Values given on the command line.
#[derive(Debug, Clone, Default)]
pub struct Flags {
    /// `--config FILE`.
    pub(crate) config: Option<PathBuf>,
    /// Settings given as flags: the flag (`--listen`) and its text, in order.
    values: Vec<(String, String)>,
}

impl Flags {
    /// Flags with `--config FILE` (when given) and no setting yet.
    pub(crate) fn new(config: Option<PathBuf>) -> Self {
        Self {
            config,
            values: Vec::new(),
        }
    }

    /// Adds `flag VALUE` (a repeated flag is given once, its values joined by commas).
    #[must_use]
    pub fn with(mut self, flag: &str, value: impl Into<String>) -> Self {
        self.values.push((flag.to_string(), value.into()));
        self
    }

    /// Adds `flag VALUE` when there is a value.
    #[must_use]
    pub fn with_some(self, flag: &str, value: Option<impl Into<String>>) -> Self {
        match value {
            Some(value) => self.with(flag, value),
            None => self,
        }
    }
}

/// The process environment as the loader sees it (tests pass their own).
#[derive(Debug, Clone, Default)]
pub struct Env(pub BTreeMap<String, String>);

impl Env {
    // The one reader of the process environment (clippy.toml disallows it elsewhere).
    #[allow(clippy::disallowed_methods)]
    pub(crate) fn from_process() -> Self {
        // Names and values are converted lossily: a non-UTF-8 GATEHOUSE_ variable then
        // fails as an unknown setting or a bad value instead of being silently ignored.
        Self(
            std::env::vars_os()
                .map(|(k, v)| {
                    (
                        k.to_string_lossy().into_owned(),
                        v.to_string_lossy().into_owned(),
                    )
                })
                .collect(),
        )
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }
}

impl Config {
    /// Builds the configuration from flags, the environment and the config file.
    pub fn load(flags: &Flags, env: &Env) -> Result<Self, ConfigError> {
        refuse_unknown_env(env)?;
        let mut config = Self::default();
        for s in SETTINGS {
            if let Builtin::Value(text) = s.default {
                s.apply(&mut config, text).map_err(|allowed| {
                    ConfigError::Invalid(format!(
                        "the built-in default {text:?} of `{}` is refused: {allowed}",
                        s.key
                    ))
                })?;
            }
        }

        let config_path = flags
            .config
            .clone()
            .or_else(|| env.get("GATEHOUSE_CONFIG").map(PathBuf::from))
            .or_else(|| {
                let packaged = Path::new(PACKAGED_CONFIG_FILE);
                packaged.is_file().then(|| packaged.to_path_buf())
            });
        if let Some(file) = &config_path {
            let text =
                std::fs::read_to_string(file).map_err(|source| ConfigError::FileUnreadable {
                    path: file.clone(),
                    source,
                })?;
            config.apply_file(file, &text)?;
            config.sources.push(format!("file {}", file.display()));
        }

        for s in SETTINGS {
            if let Some(value) = env.get(s.env) {
                config.set(s, value, Layer::Env(s.env))?;
                config.sources.push(format!("env {}", s.env));
            }
        }

        for (flag, value) in &flags.values {
            let (s, name) = SETTINGS
                .iter()
                .find_map(|s| s.flag.filter(|f| f == flag).map(|f| (s, f)))
                .ok_or_else(|| ConfigError::Invalid(format!("{flag} is not a setting's flag")))?;
            config.set(s, value, Layer::Flag(name))?;
        }

        config.derive_defaults(env);
        config.check()?;
        Ok(config)
    }

    /// Where the value of the setting `key` came from.
    pub(crate) fn origin_of(&self, key: &str) -> &Layer {
        self.origins
            .get(key)
            .map_or(&Layer::Default, |(layer, _)| layer)
    }

    /// The effective value of every setting, as text, with where it came from: what
    /// `gatehouse config check` prints. `None` for a setting left unset.
    pub(crate) fn effective(&self) -> Vec<(&'static Setting, Option<String>, Layer)> {
        SETTINGS
            .iter()
            .map(|s| {
                if let Some((layer, text)) = self.origins.get(s.key) {
                    let text = match (s.key, &self.master_key.origin) {
                        // A systemd credential outranks a key file named in the file.
                        ("master_key_file", KeyOrigin::SystemdCredential) => {
                            return (
                                s,
                                Some(self.master_key.path.display().to_string()),
                                Layer::Default,
                            );
                        }
                        _ => text.clone(),
                    };
                    return (s, Some(text), layer.clone());
                }
                let value = match s.default {
                    Builtin::Value(text) => Some(text.to_string()),
                    Builtin::Unset => None,
                    Builtin::Derived(_) => self.derived(s.key),
                };
                (s, value, Layer::Default)
            })
            .collect()
    }

    /// The value worked out for a `Derived` setting that no layer set.
    fn derived(&self, key: &str) -> Option<String> {
        let path = |p: &Path| Some(p.display().to_string());
        match key {
            "data" => path(&self.data_path),
            "master_key_file" => path(&self.master_key.path),
            "admin.socket" => path(&self.admin_socket),
            "backup.dir" => path(&self.backup.dir),
            "server.listen" => Some(self.server.listen.to_string()),
            "server.http_listen" => Some(
                self.server
                    .http_listen
                    .map_or_else(|| "off".into(), |a| a.to_string()),
            ),
            "tls.mode" => Some(self.tls_mode.as_str().into()),
            // Worked out at start, from the domain or the address the listener got.
            "tokens.issuer" | "tokens.audience" => None,
            _ => None,
        }
    }

    fn given(&self, key: &str) -> bool {
        self.origins.contains_key(key)
    }

    fn set(&mut self, s: &'static Setting, value: &str, layer: Layer) -> Result<(), ConfigError> {
        s.apply(self, value)
            .map_err(|allowed| ConfigError::BadValue {
                origin: layer.to_string(),
                key: s.key,
                value: value.to_string(),
                allowed,
            })?;
        self.origins.insert(s.key, (layer, value.to_string()));
        Ok(())
    }

    /// Flattens a TOML document into `section.key = value-text` pairs and applies them.
    fn apply_file(&mut self, file: &Path, text: &str) -> Result<(), ConfigError> {
        let doc: toml::Table = toml::from_str(text).map_err(|e| ConfigError::FileSyntax {
            path: file.to_path_buf(),
            message: e.to_string(),
        })?;
        let layer = Layer::File(file.to_path_buf());
        let mut flat = Vec::new();
        for (name, value) in doc {
            match value {
                // The one setting that is a list of tables.
                list if name == "routes" => {
                    self.front.routes =
                        routes::parse(&list).map_err(|message| ConfigError::FileSyntax {
                            path: file.to_path_buf(),
                            message,
                        })?;
                }
                toml::Value::Table(section) => {
                    for (inner, v) in section {
                        flat.push((format!("{name}.{inner}"), v));
                    }
                }
                other => flat.push((name, other)),
            }
        }
        for (key, value) in flat {
            let s = settings::by_key(&key).ok_or_else(|| ConfigError::UnknownKey {
                origin: layer.to_string(),
                nearest: nearest(&key, SETTINGS.iter().map(|s| s.key)),
                key: key.clone(),
                known: known_keys(),
            })?;
            // Every value reaches the setting's parser as text: a TOML boolean, integer or
            // list of strings is read in its natural type, and the parser says whether
            // that type fits (`allow_credentials = false`, `max_headers = 20`,
            // `domains = ["a.example", "b.example"]`).
            let text = match &value {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                toml::Value::Array(items)
                    if items
                        .iter()
                        .all(|i| i.as_str().is_some_and(|s| !s.contains(','))) =>
                {
                    items
                        .iter()
                        .filter_map(toml::Value::as_str)
                        .collect::<Vec<_>>()
                        .join(",")
                }
                other => {
                    return Err(ConfigError::BadValue {
                        origin: layer.to_string(),
                        key: s.key,
                        value: match other {
                            toml::Value::Float(f) => f.to_string(),
                            toml::Value::Datetime(d) => d.to_string(),
                            toml::Value::Array(_) => "[…]".into(),
                            _ => "{…}".into(),
                        },
                        allowed: format!(
                            "a {} is not a value of this setting ({})",
                            other.type_str(),
                            s.describe()
                        ),
                    });
                }
            };
            self.set(s, &text, layer.clone())?;
        }
        Ok(())
    }

    /// Works out the defaults that depend on other settings or on systemd's environment.
    fn derive_defaults(&mut self, env: &Env) {
        if !self.given("data") {
            self.data_path = default_data_path(env);
        }
        // A data file named by flag or environment brings its own admin socket
        // (`<data>.sock`) unless the socket is named there too: a command must never
        // reach a server that holds another data file than the one it was pointed at.
        let above_file = |layer: &Layer| matches!(layer, Layer::Env(_) | Layer::Flag(_));
        let data_above_file = above_file(self.origin_of("data"));
        let socket_from_file = matches!(self.origin_of("admin.socket"), Layer::File(_));
        if !self.given("admin.socket") || (data_above_file && socket_from_file) {
            self.admin_socket = sibling(&self.data_path, ".sock");
        }
        // A key file named in the config file ranks below a systemd credential (so one
        // file serves both the service and an administrator's commands); named by flag
        // or environment it ranks above.
        let credential = env.get("CREDENTIALS_DIRECTORY").map(|dir| MasterKeySource {
            path: Path::new(dir).join("master-key"),
            origin: KeyOrigin::SystemdCredential,
        });
        match (self.origin_of("master_key_file"), credential) {
            (Layer::Env(_) | Layer::Flag(_), _) => {}
            (Layer::File(_) | Layer::Default, Some(credential)) => self.master_key = credential,
            (Layer::File(_), None) => {}
            (Layer::Default, None) => {
                self.master_key = MasterKeySource {
                    path: sibling(&self.data_path, ".key"),
                    origin: KeyOrigin::BesideDataFile,
                };
            }
        }
        self.storage.pgpass = env
            .get("PGPASSFILE")
            .map(PathBuf::from)
            .or_else(|| env.get("HOME").map(|home| Path::new(home).join(".pgpass")));
        if !self.given("backup.dir") {
            self.backup.dir = self
                .data_path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or_else(|| Path::new("."))
                .join("backups");
        }
        // A domain means ACME unless a mode says otherwise.
        if !self.given("tls.mode") {
            self.tls_mode = if self.tls.domains.is_empty() {
                TlsMode::SelfSigned
            } else {
                TlsMode::Acme
            };
        }
        if !self.given("server.listen") {
            self.server.listen = match self.tls_mode {
                TlsMode::Acme => ACME_LISTEN,
                TlsMode::SelfSigned | TlsMode::Files | TlsMode::Off => LISTEN,
            };
        }
        // The redirect to HTTPS on port 80 comes with a public HTTPS port.
        if !self.given("server.http_listen") {
            self.server.http_listen = (self.tls_mode == TlsMode::Acme
                && self.server.listen.port() == 443)
                .then_some(ACME_HTTP_LISTEN);
        }
    }

    /// The checks of settings against each other.
    fn check(&self) -> Result<(), ConfigError> {
        let invalid = |text: String| Err(ConfigError::Invalid(text));
        // sockaddr_un holds 108 bytes including the terminating NUL.
        if self.admin_socket.as_os_str().len() > 107 {
            return invalid(format!(
                "the admin socket path {} is longer than 107 bytes, the limit of a Unix socket \
                 address; set admin.socket (GATEHOUSE_ADMIN_SOCKET) to a shorter path",
                self.admin_socket.display()
            ));
        }
        let (mode, listen) = (self.tls_mode, self.server.listen);
        if mode == TlsMode::Off && !listen.ip().is_loopback() {
            return invalid(format!(
                "tls.mode \"off\" is refused on {listen}: plain HTTP is allowed only on a \
                 loopback address (127.0.0.1 or [::1]), behind a proxy on the same host"
            ));
        }
        if mode == TlsMode::Off && self.server.http_listen.is_some() {
            return invalid(
                "server.http_listen redirects to HTTPS, but tls.mode is \"off\"".into(),
            );
        }
        // Port 0 (any free port) twice is two different ports.
        if self.server.http_listen.is_some_and(|http| {
            http.port() != 0 && http.port() == listen.port() && http.ip() == listen.ip()
        }) {
            return invalid(format!(
                "server.http_listen and server.listen are both {listen}"
            ));
        }
        if mode == TlsMode::Acme && self.tls.domains.is_empty() {
            return invalid(
                "tls.mode \"acme\" needs a domain: set tls.domains (GATEHOUSE_DOMAIN, \
                 --domain) to the names this server answers for"
                    .into(),
            );
        }
        let (cert, key) = (&self.tls.cert_file, &self.tls.key_file);
        if mode == TlsMode::Files && (cert.is_none() || key.is_none()) {
            return invalid(
                "tls.mode \"files\" needs tls.cert_file and tls.key_file (--tls-cert, \
                 --tls-key): a PEM certificate chain and its private key"
                    .into(),
            );
        }
        if mode != TlsMode::Files && (cert.is_some() || key.is_some()) {
            return invalid(format!(
                "tls.cert_file and tls.key_file are used only with tls.mode \"files\" (the \
                 mode is \"{}\")",
                mode.as_str()
            ));
        }
        if self.tls.acme.eab_kid.is_some() != self.tls.acme.eab_key_file.is_some() {
            return invalid(
                "External Account Binding needs both tls.acme_eab_kid and \
                 tls.acme_eab_key_file (the key id and the file with the MAC key the CA gave)"
                    .into(),
            );
        }
        if self.cors.allow_credentials && self.cors.allowed_origins.iter().any(|o| o == "*") {
            return invalid(
                "cors.allowed_origins \"*\" is refused with cors.allow_credentials = true: \
                 any site could then act with a signed-in admin's cookies; list the origins"
                    .into(),
            );
        }
        if let Some(route) = self
            .front
            .routes
            .iter()
            .find(|r| r.upstream.is_none() && self.front.upstream.is_none())
        {
            return invalid(format!(
                "route {} names no upstream, and upstream.url is not set: give the route \
                 upstream = \"http://127.0.0.1:PORT\" or set upstream.url",
                route.label()
            ));
        }
        let (access, refresh) = (self.tokens.access_ttl, self.tokens.refresh_ttl);
        if refresh < access {
            return invalid(format!(
                "tokens.refresh_ttl ({}) is shorter than tokens.access_ttl ({}): a device \
                 could not refresh before its access token expired",
                humantime::format_duration(refresh),
                humantime::format_duration(access)
            ));
        }
        let status_ttl = self.tokens.status_list_ttl;
        if status_ttl > access {
            return invalid(format!(
                "tokens.status_list_ttl ({}) is longer than tokens.access_ttl ({}): an app                  keeping a status list that long would see a revocation only after the                  revoked token had expired anyway",
                humantime::format_duration(status_ttl),
                humantime::format_duration(access)
            ));
        }
        Ok(())
    }
}

/// Unknown `GATEHOUSE_*` variables are typos until proven otherwise.
fn refuse_unknown_env(env: &Env) -> Result<(), ConfigError> {
    for name in env.0.keys().filter(|k| k.starts_with("GATEHOUSE_")) {
        if !SETTINGS.iter().any(|s| s.env == name) && !OTHER_ENV.contains(&name.as_str()) {
            let mut known: Vec<&str> = SETTINGS.iter().map(|s| s.env).collect();
            known.extend(OTHER_ENV);
            return Err(ConfigError::UnknownKey {
                origin: "environment".into(),
                nearest: nearest(name, known.iter().copied()),
                key: name.clone(),
                known: known.join(", "),
            });
        }
    }
    Ok(())
}

/// The candidate closest to `typed`, when it is close enough to be a typo of it.
fn nearest(typed: &str, candidates: impl Iterator<Item = &'static str>) -> Option<&'static str> {
    candidates
        .map(|c| (strsim::damerau_levenshtein(typed, c), c))
        .filter(|(distance, c)| *distance <= 2.max(c.len() / 5))
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, c)| c)
}

fn did_you_mean(nearest: &Option<&'static str>) -> String {
    nearest.map_or_else(String::new, |n| format!(" (did you mean `{n}`?)"))
}

fn known_keys() -> String {
    SETTINGS
        .iter()
        .map(|s| s.key)
        .collect::<Vec<_>>()
        .join(", ")
}

/// `$STATE_DIRECTORY/gatehouse.redb` under systemd (the first of its paths), else
/// `./gatehouse.redb`.
fn default_data_path(env: &Env) -> PathBuf {
    match env
        .get("STATE_DIRECTORY")
        .and_then(|dirs| dirs.split(':').next())
    {
        Some(dir) if !dir.is_empty() => Path::new(dir).join(DATA_FILE_NAME),
        _ => PathBuf::from(DATA_FILE_NAME),
    }
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}
