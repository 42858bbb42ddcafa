//! Configuration: a TOML file, `GATEHOUSE_*` environment variables and command-line
//! flags, merged into one validated `Config`.
//!
//! This is the only module that reads the environment or the config file. Precedence,
//! highest first: flags, environment, file, built-in defaults (`schema/config.md`).
//! Every setting is listed once in `SETTINGS` with its file key and environment name;
//! an unknown key or `GATEHOUSE_*` variable, or a bad value, is an error that names the
//! setting, where it came from and what is allowed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use crate::keys::KeyAlgorithm;
use crate::schedule::{CronSchedule, JobName, parse_timezone};

/// Defaults, in one place so `schema/config.md` can be checked against them.
pub mod defaults {
    use std::time::Duration;
    pub const LISTEN: &str = "127.0.0.1:8443";
    /// An admin UI session ends after this long unused...
    pub const SESSION_IDLE: Duration = Duration::from_secs(30 * 60);
    /// ...and this long after sign-in in any case.
    pub const SESSION_MAX: Duration = Duration::from_secs(12 * 3600);
    /// Read when no `--config` or `GATEHOUSE_CONFIG` is given and it exists: the file
    /// the package installs, so the service and the commands an administrator types
    /// share one configuration.
    pub const CONFIG_FILE: &str = "/etc/gatehouse/gatehouse.toml";
    /// With a domain (ACME): HTTPS on 443 and the redirect on 80, every address (IPv6
    /// sockets also take IPv4 unless the host turned that off).
    pub const ACME_LISTEN: &str = "[::]:443";
    pub const ACME_HTTP_LISTEN: &str = "[::]:80";
    pub const ACME_DIRECTORY: &str = "https://acme-v02.api.letsencrypt.org/directory";
    pub const ACME_STAGING_DIRECTORY: &str =
        "https://acme-staging-v02.api.letsencrypt.org/directory";
    /// The first retry after a failed order; it doubles up to `ACME_MAX_RETRY`. Five
    /// minutes keeps a misconfigured host under Let's Encrypt's limit of five failed
    /// validations per name and hour.
    pub const ACME_RETRY: Duration = Duration::from_secs(5 * 60);
    pub const MAX_BODY_BYTES: u64 = 64 * 1024;
    pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
    pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
    pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
    pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
    pub const MAX_CONNECTIONS: u64 = 4096;
    pub const MAX_HEADER_BYTES: u64 = 16 * 1024;
    pub const MAX_HEADERS: u64 = 64;
    pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
    pub const H2_MAX_CONCURRENT_STREAMS: u64 = 64;
    pub const DATA_FILE_NAME: &str = "gatehouse.redb";
    pub const ACCESS_TTL: Duration = Duration::from_secs(15 * 60);
    pub const REFRESH_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
    pub const TOKEN_LEEWAY: Duration = Duration::from_secs(30);
    pub const PAIRING_TTL: Duration = Duration::from_secs(5 * 60);
    /// The longest a pairing session may live, whatever is asked.
    pub const PAIRING_MAX_TTL: Duration = Duration::from_secs(3600);
    pub const WS_MAX_CONNECTIONS: u64 = 10_000;
    pub const WS_MAX_CONNECTIONS_PER_IP: u64 = 64;
    pub const WS_MESSAGES_PER_SECOND: u64 = 10;
    /// `POST /v1/pair` per client address.
    pub const RATELIMIT_PAIRING: (u32, Duration) = (10, Duration::from_secs(60));
    pub const RATELIMIT_MAX_KEYS: u64 = 100_000;
    /// Refresh-token grants per device.
    pub const RATELIMIT_REFRESH: (u32, Duration) = (60, Duration::from_secs(60));
    /// Introspection calls per client.
    pub const RATELIMIT_INTROSPECTION: (u32, Duration) = (6000, Duration::from_secs(60));
    /// Failed admin sign-ins per client address.
    pub const RATELIMIT_ADMIN_LOGIN: (u32, Duration) = (10, Duration::from_secs(60));
    /// WebSocket messages per device.
    pub const RATELIMIT_WS_MESSAGES: (u32, Duration) = (60, Duration::from_secs(60));
    /// Every HTTP request per client address.
    pub const RATELIMIT_PER_IP: (u32, Duration) = (6000, Duration::from_secs(60));
    pub const LOCKOUT_MAX_FAILURES: u64 = 10;
    pub const LOCKOUT_WINDOW: Duration = Duration::from_secs(10 * 60);
    pub const LOCKOUT_BAN: Duration = Duration::from_secs(15 * 60);
    pub const LOCKOUT_MAX_BAN: Duration = Duration::from_secs(24 * 3600);
    pub const AUDIT_RETENTION: Duration = Duration::from_secs(90 * 24 * 3600);
    pub const BACKUP_KEEP: u64 = 7;
}

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
    #[error("{origin}: unknown setting `{key}`; known settings: {known}")]
    UnknownKey {
        origin: String,
        key: String,
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

/// How the server gets its certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// A self-signed certificate kept (sealed) in the data file. The default without a
    /// domain.
    SelfSigned,
    /// Certificates from an ACME CA (TLS-ALPN-01), kept sealed in the data file. The
    /// default with a domain.
    Acme,
    /// A PEM certificate chain and key from files, reloaded on SIGHUP.
    Files,
    /// Plain HTTP; refused unless the listen address is loopback.
    Off,
}

impl TlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SelfSigned => "self-signed",
            Self::Acme => "acme",
            Self::Files => "files",
            Self::Off => "off",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Text on a terminal, JSON otherwise.
    Auto,
    Text,
    Json,
}

/// Where the master key comes from, which decides whether gatehouse may create it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyOrigin {
    /// `--master-key-file`, `GATEHOUSE_MASTER_KEY_FILE` or `master_key_file`: must exist.
    Configured,
    /// `$CREDENTIALS_DIRECTORY/master-key` (systemd): must exist.
    SystemdCredential,
    /// `<data>.key`: created on first start, with a warning.
    BesideDataFile,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasterKeySource {
    pub path: PathBuf,
    pub origin: KeyOrigin,
}

/// Limits and timeouts of the HTTPS listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// The plain-HTTP listener that redirects to HTTPS (port 80 with a domain), if any.
    pub http_listen: Option<SocketAddr>,
    pub max_body_bytes: usize,
    pub header_read_timeout: Duration,
    pub request_timeout: Duration,
    pub tls_handshake_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub shutdown_grace: Duration,
    pub h2_max_concurrent_streams: u32,
}

/// The token authority's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenConfig {
    /// `iss` of every access token; `None` means "derive it from the listen address at
    /// start" (fine on loopback, to be set in production: changing it invalidates tokens).
    pub issuer: Option<String>,
    /// `aud` of every access token; `None` means "the issuer".
    pub audience: Option<String>,
    pub access_ttl: Duration,
    pub refresh_ttl: Duration,
    /// Clock skew tolerated on `exp`, `nbf` and `iat`.
    pub leeway: Duration,
    /// The algorithm of newly generated signing keys.
    pub key_algorithm: KeyAlgorithm,
    /// Default lifetime of a pairing session.
    pub pairing_ttl: Duration,
}

impl Default for TokenConfig {
    fn default() -> Self {
        Self {
            issuer: None,
            audience: None,
            access_ttl: defaults::ACCESS_TTL,
            refresh_ttl: defaults::REFRESH_TTL,
            leeway: defaults::TOKEN_LEEWAY,
            key_algorithm: KeyAlgorithm::Ed25519,
            pairing_ttl: defaults::PAIRING_TTL,
        }
    }
}

/// A rate: (requests, window); `None` when the policy is off.
pub type Rate = Option<(u32, Duration)>;

/// Rate-limit settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitConfig {
    /// Pairing attempts per client address.
    pub pairing: Rate,
    pub refresh: Rate,
    pub introspection: Rate,
    pub admin_login: Rate,
    pub ws_messages: Rate,
    pub per_ip: Rate,
    /// Most subjects tracked at once (memory bound).
    pub max_keys: usize,
}

/// Brute-force lockout settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockoutConfig {
    pub max_failures: u32,
    pub window: Duration,
    pub ban: Duration,
    pub max_ban: Duration,
}

/// Where certificates come from, beside `Config::tls_mode`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsConfig {
    /// The names HTTPS is served for (ACME orders them; the default issuer uses the first).
    pub domains: Vec<String>,
    pub acme: AcmeConfig,
    /// `files` mode: the PEM certificate chain (leaf first) and its private key.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

/// How certificates are ordered in `acme` mode.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AcmeConfig {
    /// The RFC 8555 directory URL.
    pub directory: String,
    /// Account contacts (`mailto:` URLs).
    pub contact: Vec<String>,
    /// PEM file of CA certificates trusted for the directory's own HTTPS, beside the
    /// built-in Mozilla roots (a private CA, a test CA).
    pub ca_root: Option<PathBuf>,
    /// The first retry after a failed order (doubling up to 12 hours).
    pub retry: Duration,
    /// External Account Binding, for CAs that demand it: the key id, and the file
    /// holding the base64url MAC key.
    pub eab_kid: Option<String>,
    pub eab_key_file: Option<PathBuf>,
}

/// Admin UI sessions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionConfig {
    pub idle: Duration,
    pub max: Duration,
}

/// Cross-origin access to the API from browsers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CorsConfig {
    /// Origins (`https://app.example.com`) allowed to call the API; `*` for any (only
    /// without credentials). Empty: no CORS headers at all.
    pub allowed_origins: Vec<String>,
    /// Whether browsers may send cookies and `Authorization` cross-origin.
    pub allow_credentials: bool,
}

/// Backup settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupConfig {
    /// Where scheduled backups go.
    pub dir: PathBuf,
    /// How many scheduled backups are kept.
    pub keep: usize,
}

/// Audit-log settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditConfig {
    pub retention: Duration,
}

/// The WebSocket channel's limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsConfig {
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub messages_per_second: u32,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_path: PathBuf,
    pub master_key: MasterKeySource,
    pub admin_socket: PathBuf,
    pub server: ServerConfig,
    pub tls_mode: TlsMode,
    pub tls: TlsConfig,
    pub sessions: SessionConfig,
    pub cors: CorsConfig,
    pub log_format: LogFormat,
    pub log_filter: String,
    pub tokens: TokenConfig,
    pub ws: WsConfig,
    pub ratelimit: RateLimitConfig,
    pub lockout: LockoutConfig,
    pub audit: AuditConfig,
    pub jobs: crate::schedule::JobsConfig,
    pub backup: BackupConfig,
    /// Where settings came from, for the start-up log (`file /etc/...`, `env GATEHOUSE_...`).
    pub sources: Vec<String>,
}

/// Values given on the command line (all optional).
#[derive(Debug, Clone, Default)]
pub struct Flags {
    pub config: Option<PathBuf>,
    pub data: Option<PathBuf>,
    pub master_key_file: Option<PathBuf>,
    pub listen: Option<String>,
    pub tls: Option<String>,
    /// `--domain`, repeatable; joined with commas.
    pub domains: Vec<String>,
    pub acme_directory: Option<String>,
    pub acme_email: Option<String>,
    pub acme_ca_root: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
}

/// The process environment as the loader sees it (tests pass their own).
#[derive(Debug, Clone, Default)]
pub struct Env(pub BTreeMap<String, String>);

impl Env {
    pub fn from_process() -> Self {
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

/// Settings before defaults: each `None` means "not given at this level".
#[derive(Debug, Default, Clone)]
struct Raw {
    data: Option<PathBuf>,
    master_key_file: Option<PathBuf>,
    admin_socket: Option<PathBuf>,
    session_idle: Option<Duration>,
    session_max: Option<Duration>,
    cors_origins: Option<Vec<String>>,
    cors_credentials: Option<bool>,
    listen: Option<SocketAddr>,
    /// `Some(None)`: turned off.
    http_listen: Option<Option<SocketAddr>>,
    max_body_bytes: Option<u64>,
    header_read_timeout: Option<Duration>,
    request_timeout: Option<Duration>,
    tls_handshake_timeout: Option<Duration>,
    idle_timeout: Option<Duration>,
    max_connections: Option<u64>,
    max_header_bytes: Option<u64>,
    max_headers: Option<u64>,
    shutdown_grace: Option<Duration>,
    h2_max_concurrent_streams: Option<u64>,
    tls_mode: Option<TlsMode>,
    domains: Option<Vec<String>>,
    acme_directory: Option<String>,
    acme_email: Option<String>,
    acme_ca_root: Option<PathBuf>,
    acme_retry: Option<Duration>,
    acme_eab_kid: Option<String>,
    acme_eab_key_file: Option<PathBuf>,
    tls_cert_file: Option<PathBuf>,
    tls_key_file: Option<PathBuf>,
    log_format: Option<LogFormat>,
    log_level: Option<String>,
    issuer: Option<String>,
    audience: Option<String>,
    access_ttl: Option<Duration>,
    refresh_ttl: Option<Duration>,
    token_leeway: Option<Duration>,
    key_algorithm: Option<KeyAlgorithm>,
    pairing_ttl: Option<Duration>,
    ws_max_connections: Option<u64>,
    ws_max_connections_per_ip: Option<u64>,
    ws_messages_per_second: Option<u64>,
    ratelimit_pairing: Option<Rate>,
    ratelimit_refresh: Option<Rate>,
    ratelimit_introspection: Option<Rate>,
    ratelimit_admin_login: Option<Rate>,
    ratelimit_ws_messages: Option<Rate>,
    ratelimit_per_ip: Option<Rate>,
    ratelimit_max_keys: Option<u64>,
    lockout_max_failures: Option<u64>,
    lockout_window: Option<Duration>,
    lockout_ban: Option<Duration>,
    lockout_max_ban: Option<Duration>,
    audit_retention: Option<Duration>,
    job_schedules: BTreeMap<JobName, Option<CronSchedule>>,
    jobs_catch_up: Option<Vec<JobName>>,
    jobs_timezone: Option<chrono::FixedOffset>,
    backup_dir: Option<PathBuf>,
    backup_keep: Option<u64>,
}

type Apply = fn(&mut Raw, &str) -> Result<(), String>;

/// One setting: its key in the file (`section.name`), its environment variable, and how
/// to parse it. The single list from which file, env and docs are all checked.
#[derive(Debug)]
pub struct Setting {
    pub key: &'static str,
    pub env: &'static str,
    apply: Apply,
}

fn duration(v: &str, min: Duration, max: Duration) -> Result<Duration, String> {
    let d = humantime::parse_duration(v).map_err(|_| {
        format!(
            "expected a duration such as \"10s\" or \"5m\" between {} and {}",
            humantime::format_duration(min),
            humantime::format_duration(max)
        )
    })?;
    if d < min || d > max {
        return Err(format!(
            "must be between {} and {}",
            humantime::format_duration(min),
            humantime::format_duration(max)
        ));
    }
    Ok(d)
}

fn integer(v: &str, min: u64, max: u64) -> Result<u64, String> {
    let n: u64 = v
        .trim()
        .parse()
        .map_err(|_| format!("expected a whole number between {min} and {max}"))?;
    if !(min..=max).contains(&n) {
        return Err(format!("must be between {min} and {max}"));
    }
    Ok(n)
}

fn path(v: &str) -> Result<PathBuf, String> {
    if v.trim().is_empty() {
        return Err("expected a file path".into());
    }
    Ok(PathBuf::from(v))
}

macro_rules! setting {
    ($key:literal, $env:literal, |$raw:ident, $v:ident| $body:expr) => {
        Setting {
            key: $key,
            env: $env,
            apply: |$raw: &mut Raw, $v: &str| -> Result<(), String> {
                $body;
                Ok(())
            },
        }
    };
}

/// Every setting gatehouse has.
pub static SETTINGS: &[Setting] = &[
    setting!("data", "GATEHOUSE_DATA", |r, v| r.data = Some(path(v)?)),
    setting!("master_key_file", "GATEHOUSE_MASTER_KEY_FILE", |r, v| r
        .master_key_file =
        Some(path(v)?)),
    setting!("admin.socket", "GATEHOUSE_ADMIN_SOCKET", |r, v| r
        .admin_socket =
        Some(path(v)?)),
    setting!("admin.session_idle", "GATEHOUSE_SESSION_IDLE", |r, v| r
        .session_idle =
        Some(duration(
            v,
            Duration::from_secs(60),
            Duration::from_secs(24 * 3600)
        )?)),
    setting!("admin.session_max", "GATEHOUSE_SESSION_MAX", |r, v| r
        .session_max =
        Some(duration(
            v,
            Duration::from_secs(5 * 60),
            Duration::from_secs(7 * 24 * 3600)
        )?)),
    setting!(
        "cors.allowed_origins",
        "GATEHOUSE_CORS_ALLOWED_ORIGINS",
        |r, v| r.cors_origins = Some(origins(v)?)
    ),
    setting!(
        "cors.allow_credentials",
        "GATEHOUSE_CORS_ALLOW_CREDENTIALS",
        |r, v| r.cors_credentials = Some(match v.trim() {
            "true" => true,
            "false" => false,
            _ => return Err("allowed values: \"true\", \"false\"".into()),
        })
    ),
    setting!("server.listen", "GATEHOUSE_LISTEN", |r, v| r.listen =
        Some(v.trim().parse().map_err(|_| {
            "expected IP:PORT, such as 127.0.0.1:8443 or [::1]:8443".to_string()
        })?)),
    setting!(
        "server.max_body_bytes",
        "GATEHOUSE_MAX_BODY_BYTES",
        |r, v| r.max_body_bytes = Some(integer(v, 1024, 16 * 1024 * 1024)?)
    ),
    setting!(
        "server.header_read_timeout",
        "GATEHOUSE_HEADER_READ_TIMEOUT",
        |r, v| r.header_read_timeout = Some(duration(
            v,
            Duration::from_secs(1),
            Duration::from_secs(300)
        )?)
    ),
    setting!(
        "server.request_timeout",
        "GATEHOUSE_REQUEST_TIMEOUT",
        |r, v| r.request_timeout = Some(duration(
            v,
            Duration::from_secs(1),
            Duration::from_secs(600)
        )?)
    ),
    setting!(
        "server.tls_handshake_timeout",
        "GATEHOUSE_TLS_HANDSHAKE_TIMEOUT",
        |r, v| r.tls_handshake_timeout = Some(duration(
            v,
            Duration::from_secs(1),
            Duration::from_secs(120)
        )?)
    ),
    setting!("server.idle_timeout", "GATEHOUSE_IDLE_TIMEOUT", |r, v| r
        .idle_timeout =
        Some(duration(
            v,
            Duration::from_secs(1),
            Duration::from_secs(3600)
        )?)),
    setting!(
        "server.max_connections",
        "GATEHOUSE_MAX_CONNECTIONS",
        |r, v| r.max_connections = Some(integer(v, 1, 1_000_000)?)
    ),
    setting!(
        "server.max_header_bytes",
        "GATEHOUSE_MAX_HEADER_BYTES",
        |r, v| r.max_header_bytes = Some(integer(v, 1024, 1024 * 1024)?)
    ),
    setting!("server.max_headers", "GATEHOUSE_MAX_HEADERS", |r, v| r
        .max_headers =
        Some(integer(v, 8, 1000)?)),
    setting!(
        "server.shutdown_grace",
        "GATEHOUSE_SHUTDOWN_GRACE",
        |r, v| r.shutdown_grace = Some(duration(
            v,
            Duration::from_secs(0),
            Duration::from_secs(300)
        )?)
    ),
    setting!(
        "server.h2_max_concurrent_streams",
        "GATEHOUSE_H2_MAX_CONCURRENT_STREAMS",
        |r, v| r.h2_max_concurrent_streams = Some(integer(v, 1, 1000)?)
    ),
    setting!("server.http_listen", "GATEHOUSE_HTTP_LISTEN", |r, v| r
        .http_listen =
        Some(match v.trim() {
            "off" => None,
            v => Some(
                v.parse()
                    .map_err(|_| { "expected IP:PORT, such as [::]:80, or \"off\"".to_string() })?
            ),
        })),
    setting!("tls.mode", "GATEHOUSE_TLS", |r, v| r.tls_mode =
        Some(match v.trim() {
            "self-signed" => TlsMode::SelfSigned,
            "acme" => TlsMode::Acme,
            "files" => TlsMode::Files,
            "off" => TlsMode::Off,
            _ => {
                return Err("allowed values: \"self-signed\", \"acme\", \"files\", \"off\"".into());
            }
        })),
    setting!("tls.domains", "GATEHOUSE_DOMAIN", |r, v| r.domains =
        Some(domains(v)?)),
    setting!("tls.acme_directory", "GATEHOUSE_ACME_DIRECTORY", |r, v| r
        .acme_directory =
        Some(acme_directory(v)?)),
    setting!("tls.acme_email", "GATEHOUSE_ACME_EMAIL", |r, v| r
        .acme_email =
        Some(email(v)?)),
    setting!("tls.acme_ca_root", "GATEHOUSE_ACME_CA_ROOT", |r, v| r
        .acme_ca_root =
        Some(path(v)?)),
    setting!("tls.acme_retry", "GATEHOUSE_ACME_RETRY", |r, v| r
        .acme_retry =
        Some(duration(
            v,
            Duration::from_secs(1),
            Duration::from_secs(3600)
        )?)),
    setting!("tls.acme_eab_kid", "GATEHOUSE_ACME_EAB_KID", |r, v| r
        .acme_eab_kid =
        Some({
            let v = v.trim();
            if v.is_empty() || v.len() > 256 || v.chars().any(char::is_control) {
                return Err("expected the key id the CA gave, 1 to 256 characters".into());
            }
            v.to_string()
        })),
    setting!(
        "tls.acme_eab_key_file",
        "GATEHOUSE_ACME_EAB_KEY_FILE",
        |r, v| r.acme_eab_key_file = Some(path(v)?)
    ),
    setting!("tls.cert_file", "GATEHOUSE_TLS_CERT_FILE", |r, v| r
        .tls_cert_file =
        Some(path(v)?)),
    setting!("tls.key_file", "GATEHOUSE_TLS_KEY_FILE", |r, v| r
        .tls_key_file =
        Some(path(v)?)),
    setting!("log.format", "GATEHOUSE_LOG_FORMAT", |r, v| r.log_format =
        Some(match v.trim() {
            "auto" => LogFormat::Auto,
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            _ => return Err("allowed values: \"auto\", \"text\", \"json\"".into()),
        })),
    setting!("log.level", "GATEHOUSE_LOG", |r, v| r.log_level = Some({
        tracing_subscriber::EnvFilter::builder()
            .parse(v.trim())
            .map_err(|e| {
                format!(
                    "expected error, warn, info, debug, trace or a filter such as \
                 \"info,gatehouse=debug\" ({e})"
                )
            })?;
        v.trim().to_string()
    })),
    setting!("tokens.issuer", "GATEHOUSE_ISSUER", |r, v| r.issuer =
        Some(issuer(v)?)),
    setting!("tokens.audience", "GATEHOUSE_AUDIENCE", |r, v| r.audience =
        Some(audience(v)?)),
    setting!("tokens.access_ttl", "GATEHOUSE_ACCESS_TTL", |r, v| r
        .access_ttl =
        Some(duration(
            v,
            Duration::from_secs(60),
            Duration::from_secs(24 * 3600)
        )?)),
    setting!("tokens.refresh_ttl", "GATEHOUSE_REFRESH_TTL", |r, v| r
        .refresh_ttl =
        Some(duration(
            v,
            Duration::from_secs(300),
            Duration::from_secs(365 * 24 * 3600)
        )?)),
    setting!("tokens.leeway", "GATEHOUSE_TOKEN_LEEWAY", |r, v| r
        .token_leeway =
        Some(duration(
            v,
            Duration::from_secs(0),
            Duration::from_secs(300)
        )?)),
    setting!("keys.algorithm", "GATEHOUSE_KEY_ALGORITHM", |r, v| r
        .key_algorithm =
        Some(match v.trim() {
            "EdDSA" | "Ed25519" => KeyAlgorithm::Ed25519,
            "ES256" => KeyAlgorithm::EcdsaP256,
            _ => return Err("allowed values: \"EdDSA\" (Ed25519), \"ES256\"".into()),
        })),
    setting!("pairing.ttl", "GATEHOUSE_PAIRING_TTL", |r, v| r
        .pairing_ttl =
        Some(duration(
            v,
            Duration::from_secs(30),
            defaults::PAIRING_MAX_TTL
        )?)),
    setting!(
        "ratelimit.pairing",
        "GATEHOUSE_RATELIMIT_PAIRING",
        |r, v| r.ratelimit_pairing = Some(rate(v)?)
    ),
    setting!(
        "ratelimit.refresh",
        "GATEHOUSE_RATELIMIT_REFRESH",
        |r, v| r.ratelimit_refresh = Some(rate(v)?)
    ),
    setting!(
        "ratelimit.introspection",
        "GATEHOUSE_RATELIMIT_INTROSPECTION",
        |r, v| r.ratelimit_introspection = Some(rate(v)?)
    ),
    setting!(
        "ratelimit.admin_login",
        "GATEHOUSE_RATELIMIT_ADMIN_LOGIN",
        |r, v| r.ratelimit_admin_login = Some(rate(v)?)
    ),
    setting!(
        "ratelimit.ws_messages",
        "GATEHOUSE_RATELIMIT_WS_MESSAGES",
        |r, v| r.ratelimit_ws_messages = Some(rate(v)?)
    ),
    setting!("ratelimit.per_ip", "GATEHOUSE_RATELIMIT_PER_IP", |r, v| r
        .ratelimit_per_ip =
        Some(rate(v)?)),
    setting!(
        "lockout.max_failures",
        "GATEHOUSE_LOCKOUT_MAX_FAILURES",
        |r, v| r.lockout_max_failures = Some(integer(v, 1, 10_000)?)
    ),
    setting!("lockout.window", "GATEHOUSE_LOCKOUT_WINDOW", |r, v| r
        .lockout_window =
        Some(duration(
            v,
            Duration::from_secs(1),
            Duration::from_secs(24 * 3600)
        )?)),
    setting!("lockout.ban", "GATEHOUSE_LOCKOUT_BAN", |r, v| r
        .lockout_ban =
        Some(duration(
            v,
            Duration::from_secs(1),
            Duration::from_secs(30 * 24 * 3600)
        )?)),
    setting!("lockout.max_ban", "GATEHOUSE_LOCKOUT_MAX_BAN", |r, v| r
        .lockout_max_ban =
        Some(duration(
            v,
            Duration::from_secs(1),
            Duration::from_secs(365 * 24 * 3600)
        )?)),
    setting!("jobs.rotate_keys", "GATEHOUSE_JOBS_ROTATE_KEYS", |r, v| {
        r.job_schedules
            .insert(JobName::RotateKeys, job_schedule(v)?)
    }),
    setting!("jobs.prune_audit", "GATEHOUSE_JOBS_PRUNE_AUDIT", |r, v| {
        r.job_schedules
            .insert(JobName::PruneAudit, job_schedule(v)?)
    }),
    setting!(
        "jobs.prune_revocations",
        "GATEHOUSE_JOBS_PRUNE_REVOCATIONS",
        |r, v| r
            .job_schedules
            .insert(JobName::PruneRevocations, job_schedule(v)?)
    ),
    setting!(
        "jobs.prune_expired",
        "GATEHOUSE_JOBS_PRUNE_EXPIRED",
        |r, v| {
            r.job_schedules
                .insert(JobName::PruneExpired, job_schedule(v)?)
        }
    ),
    setting!("jobs.backup", "GATEHOUSE_JOBS_BACKUP", |r, v| {
        r.job_schedules.insert(JobName::Backup, job_schedule(v)?)
    }),
    setting!("jobs.catch_up", "GATEHOUSE_JOBS_CATCH_UP", |r, v| r
        .jobs_catch_up =
        Some(job_list(v)?)),
    setting!("jobs.timezone", "GATEHOUSE_JOBS_TIMEZONE", |r, v| r
        .jobs_timezone =
        Some(parse_timezone(v)?)),
    setting!("backup.dir", "GATEHOUSE_BACKUP_DIR", |r, v| r.backup_dir =
        Some(path(v)?)),
    setting!("backup.keep", "GATEHOUSE_BACKUP_KEEP", |r, v| r
        .backup_keep =
        Some(integer(v, 1, 1000)?)),
    setting!("audit.retention", "GATEHOUSE_AUDIT_RETENTION", |r, v| r
        .audit_retention =
        Some(duration(
            v,
            Duration::from_secs(24 * 3600),
            Duration::from_secs(10 * 366 * 24 * 3600)
        )?)),
    setting!(
        "ratelimit.max_keys",
        "GATEHOUSE_RATELIMIT_MAX_KEYS",
        |r, v| r.ratelimit_max_keys = Some(integer(v, 1000, 100_000_000)?)
    ),
    setting!(
        "ws.max_connections",
        "GATEHOUSE_WS_MAX_CONNECTIONS",
        |r, v| r.ws_max_connections = Some(integer(v, 1, 1_000_000)?)
    ),
    setting!(
        "ws.max_connections_per_ip",
        "GATEHOUSE_WS_MAX_CONNECTIONS_PER_IP",
        |r, v| r.ws_max_connections_per_ip = Some(integer(v, 1, 1_000_000)?)
    ),
    setting!(
        "ws.messages_per_second",
        "GATEHOUSE_WS_MESSAGES_PER_SECOND",
        |r, v| r.ws_messages_per_second = Some(integer(v, 1, 1000)?)
    ),
];

/// A job's schedule: a cron expression, or `off`.
fn job_schedule(v: &str) -> Result<Option<CronSchedule>, String> {
    if v.trim() == "off" {
        return Ok(None);
    }
    CronSchedule::parse(v).map(Some)
}

/// `all`, `none`, or job names separated by commas.
fn job_list(v: &str) -> Result<Vec<JobName>, String> {
    match v.trim() {
        "all" => Ok(JobName::ALL.to_vec()),
        "none" | "" => Ok(Vec::new()),
        list => list.split(',').map(str::parse).collect(),
    }
}

/// A rate as `N/DURATION`: at most N requests (1 to 1 000 000) per DURATION (1s to 24h);
/// or `off`.
fn rate(v: &str) -> Result<Rate, String> {
    let allowed = "expected REQUESTS/WINDOW such as \"10/1m\" (1 to 1000000 requests per 1s \
                   to 24h), or \"off\"";
    if v.trim() == "off" {
        return Ok(None);
    }
    let (n, window) = v
        .trim()
        .split_once('/')
        .ok_or_else(|| allowed.to_string())?;
    let n: u32 = n.trim().parse().map_err(|_| allowed.to_string())?;
    let window = humantime::parse_duration(window.trim()).map_err(|_| allowed.to_string())?;
    if !(1..=1_000_000).contains(&n)
        || window < Duration::from_secs(1)
        || window > Duration::from_secs(24 * 3600)
    {
        return Err(allowed.into());
    }
    Ok(Some((n, window)))
}

/// Origins allowed to call the API from a browser: `scheme://host[:port]` each (no path),
/// separated by commas, or `*`. An empty string allows none.
fn origins(v: &str) -> Result<Vec<String>, String> {
    let mut list = Vec::new();
    for origin in v.split(',').map(str::trim).filter(|o| !o.is_empty()) {
        if origin == "*" {
            list.push(origin.to_string());
            continue;
        }
        let rest = origin
            .strip_prefix("https://")
            .or_else(|| origin.strip_prefix("http://"));
        let ok = rest.is_some_and(|host| {
            !host.is_empty()
                && host.len() <= 253
                && host.bytes().all(|b| {
                    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']')
                })
        });
        if !ok {
            return Err(format!(
                "{origin:?} is not an origin: expected scheme://host[:port] such as \
                 \"https://app.example.com\" (no path, no trailing slash), or \"*\""
            ));
        }
        list.push(origin.to_ascii_lowercase());
    }
    Ok(list)
}

/// A comma-separated list of DNS names to serve (and order certificates for): lower-case
/// letters, digits and hyphens in dot-separated labels. No wildcards (TLS-ALPN-01 cannot
/// prove them) and no IP addresses (public CAs do not issue for them).
fn domains(v: &str) -> Result<Vec<String>, String> {
    let mut names = Vec::new();
    for name in v.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        };
        let labels: Vec<&str> = name.split('.').collect();
        let is_ip = name.parse::<std::net::IpAddr>().is_ok();
        if name.len() > 253 || labels.len() < 2 || is_ip || !labels.iter().all(|l| label_ok(l)) {
            return Err(format!(
                "{name:?} is not a domain name: expected names such as \"auth.example.com\" \
                 (letters, digits, hyphens; no wildcard, no IP address), separated by commas"
            ));
        }
        if !names.contains(&name) {
            names.push(name);
        }
    }
    if names.is_empty() {
        return Err("expected at least one domain name, such as \"auth.example.com\"".into());
    }
    if names.len() > 100 {
        return Err("at most 100 names fit in one certificate".into());
    }
    Ok(names)
}

/// An ACME directory: an https URL, or `letsencrypt` / `letsencrypt-staging`.
fn acme_directory(v: &str) -> Result<String, String> {
    let v = v.trim();
    match v {
        "letsencrypt" => return Ok(defaults::ACME_DIRECTORY.into()),
        "letsencrypt-staging" => return Ok(defaults::ACME_STAGING_DIRECTORY.into()),
        _ => {}
    }
    let rest = v.strip_prefix("https://").unwrap_or_default();
    if rest.is_empty()
        || v.len() > 1024
        || v.contains([' ', '#'])
        || v.chars().any(char::is_control)
    {
        return Err("expected an https URL of an ACME directory, such as \
             \"https://acme-v02.api.letsencrypt.org/directory\", or \"letsencrypt\" or \
             \"letsencrypt-staging\""
            .into());
    }
    Ok(v.to_string())
}

/// A contact address for the ACME account, as a `mailto:` URL.
fn email(v: &str) -> Result<String, String> {
    let v = v.trim();
    let address = v.strip_prefix("mailto:").unwrap_or(v);
    let ok = match address.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && domain.contains('.')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
                && address.len() <= 254
                && !address
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control() || matches!(c, ',' | '<' | '>'))
                && !domain.contains('@')
        }
        None => false,
    };
    if !ok {
        return Err("expected an email address, such as \"ops@example.com\"".into());
    }
    Ok(format!("mailto:{address}"))
}

/// An issuer is an https URL without query or fragment (RFC 8414 section 2).
fn issuer(v: &str) -> Result<String, String> {
    let v = v.trim();
    let allowed = "expected an https URL without query or fragment, such as \
                   \"https://auth.example.com\"";
    let rest = match (v.strip_prefix("https://"), v.strip_prefix("http://")) {
        (Some(rest), _) => rest,
        // Plain http only names a loopback server (with tls.mode = "off" behind a proxy).
        (None, Some(rest))
            if ["localhost", "127.0.0.1", "[::1]"].iter().any(|host| {
                rest == *host
                    || rest.starts_with(&format!("{host}:"))
                    || rest.starts_with(&format!("{host}/"))
            }) =>
        {
            rest
        }
        _ => {
            return Err(format!(
                "{allowed} (http:// only for localhost, 127.0.0.1 or [::1])"
            ));
        }
    };
    if rest.is_empty()
        || v.len() > 255
        || rest.contains(['?', '#', ' '])
        || v.chars().any(char::is_control)
    {
        return Err(allowed.into());
    }
    Ok(v.trim_end_matches('/').to_string())
}

fn audience(v: &str) -> Result<String, String> {
    let v = v.trim();
    if v.is_empty() || v.len() > 255 || v.chars().any(|c| c.is_control() || c == ' ') {
        return Err("expected 1 to 255 characters without spaces, such as \
                    \"https://api.example.com\""
            .into());
    }
    Ok(v.to_string())
}

/// Environment variables that are read but are not settings.
const OTHER_ENV: &[&str] = &["GATEHOUSE_CONFIG"];

fn setting(key: &str) -> Option<&'static Setting> {
    SETTINGS.iter().find(|s| s.key == key)
}

fn known_keys() -> String {
    SETTINGS
        .iter()
        .map(|s| s.key)
        .collect::<Vec<_>>()
        .join(", ")
}

fn apply(raw: &mut Raw, s: &Setting, value: &str, origin: &str) -> Result<(), ConfigError> {
    (s.apply)(raw, value).map_err(|allowed| ConfigError::BadValue {
        origin: origin.to_string(),
        key: s.key,
        value: value.to_string(),
        allowed,
    })
}

/// Flattens a TOML document into `section.key = value-text` pairs and applies them.
fn apply_file(raw: &mut Raw, file: &Path, text: &str) -> Result<(), ConfigError> {
    let doc: toml::Table = toml::from_str(text).map_err(|e| ConfigError::FileSyntax {
        path: file.to_path_buf(),
        message: e.to_string(),
    })?;
    let origin = format!("config file {}", file.display());
    let mut flat = Vec::new();
    for (name, value) in doc {
        match value {
            toml::Value::Table(section) => {
                for (inner, v) in section {
                    flat.push((format!("{name}.{inner}"), v));
                }
            }
            other => flat.push((name, other)),
        }
    }
    for (key, value) in flat {
        let s = setting(&key).ok_or_else(|| ConfigError::UnknownKey {
            origin: origin.clone(),
            key: key.clone(),
            known: known_keys(),
        })?;
        let text = match &value {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            // A list of names (`domains = ["a.example", "b.example"]`) is the same as
            // the names separated by commas.
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
                    origin,
                    key: s.key,
                    value: format!("{other:?}"),
                    allowed: "expected a string, a whole number or a list of strings".into(),
                });
            }
        };
        apply(raw, s, &text, &origin)?;
    }
    Ok(())
}

fn is_loopback(addr: &SocketAddr) -> bool {
    addr.ip().is_loopback()
}

impl Config {
    /// Builds the configuration from flags, the environment and the config file.
    pub fn load(flags: &Flags, env: &Env) -> Result<Self, ConfigError> {
        let mut sources = Vec::new();
        // Unknown GATEHOUSE_* variables are typos until proven otherwise.
        for name in env.0.keys().filter(|k| k.starts_with("GATEHOUSE_")) {
            if !SETTINGS.iter().any(|s| s.env == name) && !OTHER_ENV.contains(&name.as_str()) {
                let mut known: Vec<&str> = SETTINGS.iter().map(|s| s.env).collect();
                known.extend(OTHER_ENV);
                return Err(ConfigError::UnknownKey {
                    origin: "environment".into(),
                    key: name.clone(),
                    known: known.join(", "),
                });
            }
        }

        let mut file_raw = Raw::default();
        let config_path = flags
            .config
            .clone()
            .or_else(|| env.get("GATEHOUSE_CONFIG").map(PathBuf::from))
            .or_else(|| {
                let packaged = Path::new(defaults::CONFIG_FILE);
                packaged.is_file().then(|| packaged.to_path_buf())
            });
        if let Some(file) = &config_path {
            let text =
                std::fs::read_to_string(file).map_err(|source| ConfigError::FileUnreadable {
                    path: file.clone(),
                    source,
                })?;
            apply_file(&mut file_raw, file, &text)?;
            sources.push(format!("file {}", file.display()));
        }

        let mut env_raw = Raw::default();
        for s in SETTINGS {
            if let Some(value) = env.get(s.env) {
                apply(
                    &mut env_raw,
                    s,
                    value,
                    &format!("environment variable {}", s.env),
                )?;
                sources.push(format!("env {}", s.env));
            }
        }

        let mut flag_raw = Raw::default();
        let flag_values = [
            (
                "data",
                "--data",
                flags.data.as_ref().map(|p| p.display().to_string()),
            ),
            (
                "master_key_file",
                "--master-key-file",
                flags
                    .master_key_file
                    .as_ref()
                    .map(|p| p.display().to_string()),
            ),
            ("server.listen", "--listen", flags.listen.clone()),
            ("tls.mode", "--tls", flags.tls.clone()),
            (
                "tls.domains",
                "--domain",
                (!flags.domains.is_empty()).then(|| flags.domains.join(",")),
            ),
            (
                "tls.acme_directory",
                "--acme-directory",
                flags.acme_directory.clone(),
            ),
            ("tls.acme_email", "--acme-email", flags.acme_email.clone()),
            (
                "tls.acme_ca_root",
                "--acme-ca-root",
                flags.acme_ca_root.as_ref().map(|p| p.display().to_string()),
            ),
            (
                "tls.cert_file",
                "--tls-cert",
                flags.tls_cert.as_ref().map(|p| p.display().to_string()),
            ),
            (
                "tls.key_file",
                "--tls-key",
                flags.tls_key.as_ref().map(|p| p.display().to_string()),
            ),
        ];
        for (key, flag, value) in flag_values {
            if let (Some(value), Some(s)) = (value, setting(key)) {
                apply(&mut flag_raw, s, &value, &format!("flag {flag}"))?;
            }
        }

        let file_key = file_raw.master_key_file.take();
        // A data file named by flag or environment brings its own admin socket
        // (`<data>.sock`) unless the socket is named there too: the file's socket
        // belongs to the file's data path, and a command must never reach a server that
        // holds another data file than the one it was pointed at.
        let data_above_file = flag_raw.data.is_some() || env_raw.data.is_some();
        let socket_above_file = flag_raw.admin_socket.is_some() || env_raw.admin_socket.is_some();
        if data_above_file && !socket_above_file {
            file_raw.admin_socket = None;
        }
        let raw = merge(flag_raw, merge(env_raw, file_raw));
        // A key file named in the configuration file ranks below a systemd credential
        // (so one file serves both the service and an administrator's commands); named
        // by flag or environment it ranks above.
        Self::from_raw(raw, env, sources, file_key)
    }

    fn from_raw(
        raw: Raw,
        env: &Env,
        sources: Vec<String>,
        file_key: Option<PathBuf>,
    ) -> Result<Self, ConfigError> {
        let data_path = raw.data.unwrap_or_else(|| default_data_path(env));
        // Beside the data file by default: the state directory under systemd.
        let backup_dir = raw.backup_dir.clone().unwrap_or_else(|| {
            data_path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or_else(|| Path::new("."))
                .join("backups")
        });
        let master_key = match raw.master_key_file {
            Some(path) => MasterKeySource {
                path,
                origin: KeyOrigin::Configured,
            },
            None => match (env.get("CREDENTIALS_DIRECTORY"), file_key) {
                (Some(dir), _) => MasterKeySource {
                    path: Path::new(dir).join("master-key"),
                    origin: KeyOrigin::SystemdCredential,
                },
                (None, Some(path)) => MasterKeySource {
                    path,
                    origin: KeyOrigin::Configured,
                },
                (None, None) => MasterKeySource {
                    path: sibling(&data_path, ".key"),
                    origin: KeyOrigin::BesideDataFile,
                },
            },
        };
        let admin_socket = raw
            .admin_socket
            .unwrap_or_else(|| sibling(&data_path, ".sock"));
        // sockaddr_un holds 108 bytes including the terminating NUL.
        if admin_socket.as_os_str().len() > 107 {
            return Err(ConfigError::Invalid(format!(
                "the admin socket path {} is longer than 107 bytes, the limit of a Unix socket \
                 address; set admin.socket (GATEHOUSE_ADMIN_SOCKET) to a shorter path",
                admin_socket.display()
            )));
        }
        let domains = raw.domains.clone().unwrap_or_default();
        // A domain means ACME unless a mode says otherwise.
        let tls_mode = raw.tls_mode.unwrap_or(if domains.is_empty() {
            TlsMode::SelfSigned
        } else {
            TlsMode::Acme
        });
        let built_in = |addr: &str| {
            addr.parse::<SocketAddr>()
                .map_err(|_| ConfigError::Invalid("bad built-in listen address".into()))
        };
        let listen = match raw.listen {
            Some(addr) => addr,
            None if tls_mode == TlsMode::Acme => built_in(defaults::ACME_LISTEN)?,
            None => built_in(defaults::LISTEN)?,
        };
        let http_listen = match raw.http_listen {
            Some(choice) => choice,
            // The redirect to HTTPS on port 80 comes with a public HTTPS port.
            None if tls_mode == TlsMode::Acme && listen.port() == 443 => {
                Some(built_in(defaults::ACME_HTTP_LISTEN)?)
            }
            None => None,
        };
        if tls_mode == TlsMode::Off && !is_loopback(&listen) {
            return Err(ConfigError::Invalid(format!(
                "tls.mode \"off\" is refused on {listen}: plain HTTP is allowed only on a \
                 loopback address (127.0.0.1 or [::1]), behind a proxy on the same host"
            )));
        }
        if tls_mode == TlsMode::Off && http_listen.is_some() {
            return Err(ConfigError::Invalid(
                "server.http_listen redirects to HTTPS, but tls.mode is \"off\"".into(),
            ));
        }
        // Port 0 (any free port) twice is two different ports.
        if http_listen.is_some_and(|http| {
            http.port() != 0 && http.port() == listen.port() && http.ip() == listen.ip()
        }) {
            return Err(ConfigError::Invalid(format!(
                "server.http_listen and server.listen are both {listen}"
            )));
        }
        if tls_mode == TlsMode::Acme && domains.is_empty() {
            return Err(ConfigError::Invalid(
                "tls.mode \"acme\" needs a domain: set tls.domains (GATEHOUSE_DOMAIN, \
                 --domain) to the names this server answers for"
                    .into(),
            ));
        }
        let (cert_file, key_file) = (raw.tls_cert_file.clone(), raw.tls_key_file.clone());
        if tls_mode == TlsMode::Files && (cert_file.is_none() || key_file.is_none()) {
            return Err(ConfigError::Invalid(
                "tls.mode \"files\" needs tls.cert_file and tls.key_file (--tls-cert, \
                 --tls-key): a PEM certificate chain and its private key"
                    .into(),
            ));
        }
        if tls_mode != TlsMode::Files && (cert_file.is_some() || key_file.is_some()) {
            return Err(ConfigError::Invalid(format!(
                "tls.cert_file and tls.key_file are used only with tls.mode \"files\" (the \
                 mode is \"{}\")",
                tls_mode.as_str()
            )));
        }
        if raw.acme_eab_kid.is_some() != raw.acme_eab_key_file.is_some() {
            return Err(ConfigError::Invalid(
                "External Account Binding needs both tls.acme_eab_kid and \
                 tls.acme_eab_key_file (the key id and the file with the MAC key the CA gave)"
                    .into(),
            ));
        }
        let cors = CorsConfig {
            allowed_origins: raw.cors_origins.clone().unwrap_or_default(),
            allow_credentials: raw.cors_credentials.unwrap_or(false),
        };
        if cors.allow_credentials && cors.allowed_origins.iter().any(|o| o == "*") {
            return Err(ConfigError::Invalid(
                "cors.allowed_origins \"*\" is refused with cors.allow_credentials = true: \
                 any site could then act with a signed-in admin's cookies; list the origins"
                    .into(),
            ));
        }
        let sessions = SessionConfig {
            idle: raw.session_idle.unwrap_or(defaults::SESSION_IDLE),
            max: raw.session_max.unwrap_or(defaults::SESSION_MAX),
        };
        let tls = TlsConfig {
            domains,
            acme: AcmeConfig {
                directory: raw
                    .acme_directory
                    .clone()
                    .unwrap_or_else(|| defaults::ACME_DIRECTORY.into()),
                contact: raw.acme_email.clone().into_iter().collect(),
                ca_root: raw.acme_ca_root.clone(),
                retry: raw.acme_retry.unwrap_or(defaults::ACME_RETRY),
                eab_kid: raw.acme_eab_kid.clone(),
                eab_key_file: raw.acme_eab_key_file.clone(),
            },
            cert_file,
            key_file,
        };
        let access_ttl = raw.access_ttl.unwrap_or(defaults::ACCESS_TTL);
        let refresh_ttl = raw.refresh_ttl.unwrap_or(defaults::REFRESH_TTL);
        if refresh_ttl < access_ttl {
            return Err(ConfigError::Invalid(format!(
                "tokens.refresh_ttl ({}) is shorter than tokens.access_ttl ({}): a device \
                 could not refresh before its access token expired",
                humantime::format_duration(refresh_ttl),
                humantime::format_duration(access_ttl)
            )));
        }
        let to_usize = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        let server = ServerConfig {
            listen,
            http_listen,
            max_body_bytes: to_usize(raw.max_body_bytes.unwrap_or(defaults::MAX_BODY_BYTES)),
            header_read_timeout: raw
                .header_read_timeout
                .unwrap_or(defaults::HEADER_READ_TIMEOUT),
            request_timeout: raw.request_timeout.unwrap_or(defaults::REQUEST_TIMEOUT),
            tls_handshake_timeout: raw
                .tls_handshake_timeout
                .unwrap_or(defaults::TLS_HANDSHAKE_TIMEOUT),
            idle_timeout: raw.idle_timeout.unwrap_or(defaults::IDLE_TIMEOUT),
            max_connections: to_usize(raw.max_connections.unwrap_or(defaults::MAX_CONNECTIONS)),
            max_header_bytes: to_usize(raw.max_header_bytes.unwrap_or(defaults::MAX_HEADER_BYTES)),
            max_headers: to_usize(raw.max_headers.unwrap_or(defaults::MAX_HEADERS)),
            shutdown_grace: raw.shutdown_grace.unwrap_or(defaults::SHUTDOWN_GRACE),
            h2_max_concurrent_streams: u32::try_from(
                raw.h2_max_concurrent_streams
                    .unwrap_or(defaults::H2_MAX_CONCURRENT_STREAMS),
            )
            .unwrap_or(u32::MAX),
        };
        Ok(Self {
            data_path,
            master_key,
            admin_socket,
            server,
            tls_mode,
            tls,
            sessions,
            cors,
            log_format: raw.log_format.unwrap_or(LogFormat::Auto),
            log_filter: raw.log_level.unwrap_or_else(|| "info".into()),
            tokens: TokenConfig {
                issuer: raw.issuer,
                audience: raw.audience,
                access_ttl,
                refresh_ttl,
                leeway: raw.token_leeway.unwrap_or(defaults::TOKEN_LEEWAY),
                key_algorithm: raw.key_algorithm.unwrap_or(KeyAlgorithm::Ed25519),
                pairing_ttl: raw.pairing_ttl.unwrap_or(defaults::PAIRING_TTL),
            },
            lockout: LockoutConfig {
                max_failures: u32::try_from(
                    raw.lockout_max_failures
                        .unwrap_or(defaults::LOCKOUT_MAX_FAILURES),
                )
                .unwrap_or(u32::MAX),
                window: raw.lockout_window.unwrap_or(defaults::LOCKOUT_WINDOW),
                ban: raw.lockout_ban.unwrap_or(defaults::LOCKOUT_BAN),
                max_ban: raw.lockout_max_ban.unwrap_or(defaults::LOCKOUT_MAX_BAN),
            },
            audit: AuditConfig {
                retention: raw.audit_retention.unwrap_or(defaults::AUDIT_RETENTION),
            },
            jobs: {
                let mut jobs = crate::schedule::JobsConfig::default();
                for (job, schedule) in raw.job_schedules {
                    jobs.schedules.insert(job, schedule);
                }
                if let Some(catch_up) = raw.jobs_catch_up {
                    jobs.catch_up = catch_up;
                }
                if let Some(zone) = raw.jobs_timezone {
                    jobs.timezone = zone;
                }
                jobs
            },
            backup: BackupConfig {
                dir: backup_dir,
                keep: to_usize(raw.backup_keep.unwrap_or(defaults::BACKUP_KEEP)),
            },
            ratelimit: RateLimitConfig {
                pairing: raw
                    .ratelimit_pairing
                    .unwrap_or(Some(defaults::RATELIMIT_PAIRING)),
                refresh: raw
                    .ratelimit_refresh
                    .unwrap_or(Some(defaults::RATELIMIT_REFRESH)),
                introspection: raw
                    .ratelimit_introspection
                    .unwrap_or(Some(defaults::RATELIMIT_INTROSPECTION)),
                admin_login: raw
                    .ratelimit_admin_login
                    .unwrap_or(Some(defaults::RATELIMIT_ADMIN_LOGIN)),
                ws_messages: raw
                    .ratelimit_ws_messages
                    .unwrap_or(Some(defaults::RATELIMIT_WS_MESSAGES)),
                per_ip: raw
                    .ratelimit_per_ip
                    .unwrap_or(Some(defaults::RATELIMIT_PER_IP)),
                max_keys: to_usize(
                    raw.ratelimit_max_keys
                        .unwrap_or(defaults::RATELIMIT_MAX_KEYS),
                ),
            },
            ws: WsConfig {
                max_connections: to_usize(
                    raw.ws_max_connections
                        .unwrap_or(defaults::WS_MAX_CONNECTIONS),
                ),
                max_connections_per_ip: to_usize(
                    raw.ws_max_connections_per_ip
                        .unwrap_or(defaults::WS_MAX_CONNECTIONS_PER_IP),
                ),
                messages_per_second: u32::try_from(
                    raw.ws_messages_per_second
                        .unwrap_or(defaults::WS_MESSAGES_PER_SECOND),
                )
                .unwrap_or(u32::MAX),
            },
            sources,
        })
    }
}

/// `$STATE_DIRECTORY/gatehouse.redb` under systemd (the first of its paths), else
/// `./gatehouse.redb`.
fn default_data_path(env: &Env) -> PathBuf {
    match env
        .get("STATE_DIRECTORY")
        .and_then(|dirs| dirs.split(':').next())
    {
        Some(dir) if !dir.is_empty() => Path::new(dir).join(defaults::DATA_FILE_NAME),
        _ => PathBuf::from(defaults::DATA_FILE_NAME),
    }
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// `high` wins wherever it has a value.
fn merge(high: Raw, low: Raw) -> Raw {
    Raw {
        data: high.data.or(low.data),
        master_key_file: high.master_key_file.or(low.master_key_file),
        admin_socket: high.admin_socket.or(low.admin_socket),
        session_idle: high.session_idle.or(low.session_idle),
        session_max: high.session_max.or(low.session_max),
        cors_origins: high.cors_origins.or(low.cors_origins),
        cors_credentials: high.cors_credentials.or(low.cors_credentials),
        listen: high.listen.or(low.listen),
        http_listen: high.http_listen.or(low.http_listen),
        max_body_bytes: high.max_body_bytes.or(low.max_body_bytes),
        header_read_timeout: high.header_read_timeout.or(low.header_read_timeout),
        request_timeout: high.request_timeout.or(low.request_timeout),
        tls_handshake_timeout: high.tls_handshake_timeout.or(low.tls_handshake_timeout),
        idle_timeout: high.idle_timeout.or(low.idle_timeout),
        max_connections: high.max_connections.or(low.max_connections),
        max_header_bytes: high.max_header_bytes.or(low.max_header_bytes),
        max_headers: high.max_headers.or(low.max_headers),
        shutdown_grace: high.shutdown_grace.or(low.shutdown_grace),
        h2_max_concurrent_streams: high
            .h2_max_concurrent_streams
            .or(low.h2_max_concurrent_streams),
        tls_mode: high.tls_mode.or(low.tls_mode),
        domains: high.domains.or(low.domains),
        acme_directory: high.acme_directory.or(low.acme_directory),
        acme_email: high.acme_email.or(low.acme_email),
        acme_ca_root: high.acme_ca_root.or(low.acme_ca_root),
        acme_retry: high.acme_retry.or(low.acme_retry),
        acme_eab_kid: high.acme_eab_kid.or(low.acme_eab_kid),
        acme_eab_key_file: high.acme_eab_key_file.or(low.acme_eab_key_file),
        tls_cert_file: high.tls_cert_file.or(low.tls_cert_file),
        tls_key_file: high.tls_key_file.or(low.tls_key_file),
        log_format: high.log_format.or(low.log_format),
        log_level: high.log_level.or(low.log_level),
        issuer: high.issuer.or(low.issuer),
        audience: high.audience.or(low.audience),
        access_ttl: high.access_ttl.or(low.access_ttl),
        refresh_ttl: high.refresh_ttl.or(low.refresh_ttl),
        token_leeway: high.token_leeway.or(low.token_leeway),
        key_algorithm: high.key_algorithm.or(low.key_algorithm),
        pairing_ttl: high.pairing_ttl.or(low.pairing_ttl),
        ws_max_connections: high.ws_max_connections.or(low.ws_max_connections),
        ws_max_connections_per_ip: high
            .ws_max_connections_per_ip
            .or(low.ws_max_connections_per_ip),
        ws_messages_per_second: high.ws_messages_per_second.or(low.ws_messages_per_second),
        ratelimit_pairing: high.ratelimit_pairing.or(low.ratelimit_pairing),
        ratelimit_refresh: high.ratelimit_refresh.or(low.ratelimit_refresh),
        ratelimit_introspection: high.ratelimit_introspection.or(low.ratelimit_introspection),
        ratelimit_admin_login: high.ratelimit_admin_login.or(low.ratelimit_admin_login),
        ratelimit_ws_messages: high.ratelimit_ws_messages.or(low.ratelimit_ws_messages),
        ratelimit_per_ip: high.ratelimit_per_ip.or(low.ratelimit_per_ip),
        ratelimit_max_keys: high.ratelimit_max_keys.or(low.ratelimit_max_keys),
        lockout_max_failures: high.lockout_max_failures.or(low.lockout_max_failures),
        lockout_window: high.lockout_window.or(low.lockout_window),
        lockout_ban: high.lockout_ban.or(low.lockout_ban),
        lockout_max_ban: high.lockout_max_ban.or(low.lockout_max_ban),
        audit_retention: high.audit_retention.or(low.audit_retention),
        job_schedules: {
            let mut merged = low.job_schedules;
            merged.extend(high.job_schedules);
            merged
        },
        jobs_catch_up: high.jobs_catch_up.or(low.jobs_catch_up),
        jobs_timezone: high.jobs_timezone.or(low.jobs_timezone),
        backup_dir: high.backup_dir.or(low.backup_dir),
        backup_keep: high.backup_keep.or(low.backup_keep),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Env {
        Env(pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect())
    }

    fn with_file(text: &str) -> (tempfile::TempDir, Flags) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gatehouse.toml");
        std::fs::write(&path, text).unwrap();
        (
            dir,
            Flags {
                config: Some(path),
                ..Flags::default()
            },
        )
    }

    #[test]
    fn zero_config_defaults() {
        let c = Config::load(&Flags::default(), &Env::default()).unwrap();
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:8443");
        assert_eq!(c.tls_mode, TlsMode::SelfSigned);
        assert_eq!(c.data_path, PathBuf::from("gatehouse.redb"));
        assert_eq!(c.master_key.path, PathBuf::from("gatehouse.redb.key"));
        assert_eq!(c.master_key.origin, KeyOrigin::BesideDataFile);
        assert_eq!(c.admin_socket, PathBuf::from("gatehouse.redb.sock"));
        assert_eq!(c.server.max_body_bytes, 65536);
    }

    #[test]
    fn systemd_directories() {
        let e = env(&[
            ("STATE_DIRECTORY", "/var/lib/gatehouse"),
            (
                "CREDENTIALS_DIRECTORY",
                "/run/credentials/gatehouse.service",
            ),
        ]);
        let c = Config::load(&Flags::default(), &e).unwrap();
        assert_eq!(
            c.data_path,
            PathBuf::from("/var/lib/gatehouse/gatehouse.redb")
        );
        assert_eq!(
            c.master_key.path,
            PathBuf::from("/run/credentials/gatehouse.service/master-key")
        );
        assert_eq!(c.master_key.origin, KeyOrigin::SystemdCredential);
    }

    #[test]
    fn precedence_flag_over_env_over_file() {
        let (_dir, mut flags) =
            with_file("[server]\nlisten = \"127.0.0.1:1001\"\nmax_headers = 20\n");
        let e = env(&[
            ("GATEHOUSE_LISTEN", "127.0.0.1:1002"),
            ("GATEHOUSE_MAX_HEADERS", "30"),
        ]);
        let c = Config::load(&flags, &e).unwrap();
        assert_eq!(c.server.listen.port(), 1002);
        assert_eq!(c.server.max_headers, 30);
        flags.listen = Some("127.0.0.1:1003".into());
        let c = Config::load(&flags, &e).unwrap();
        assert_eq!(c.server.listen.port(), 1003);
        let c = Config::load(&flags, &Env::default()).unwrap();
        assert_eq!(c.server.max_headers, 20);
    }

    #[test]
    fn unknown_file_key_is_named() {
        let (_dir, flags) = with_file("[server]\nlisen = \"127.0.0.1:1\"\n");
        let err = Config::load(&flags, &Env::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("server.lisen"), "{err}");
        assert!(err.contains("server.listen"), "{err}");
    }

    #[test]
    fn unknown_section_and_top_level_key() {
        for text in ["[srever]\nlisten = \"x\"\n", "colour = \"blue\"\n"] {
            let (_dir, flags) = with_file(text);
            let err = Config::load(&flags, &Env::default()).unwrap_err();
            assert!(matches!(err, ConfigError::UnknownKey { .. }), "{err}");
        }
    }

    #[test]
    fn unknown_env_is_named() {
        let err = Config::load(&Flags::default(), &env(&[("GATEHOUSE_LISTN", "x")]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("GATEHOUSE_LISTN") && err.contains("GATEHOUSE_LISTEN"),
            "{err}"
        );
    }

    #[test]
    fn bad_values_name_key_and_allowed() {
        let cases = [
            ("[tls]\nmode = \"maybe\"\n", "tls.mode", "self-signed"),
            (
                "[server]\nmax_body_bytes = 10\n",
                "server.max_body_bytes",
                "between 1024",
            ),
            (
                "[server]\nheader_read_timeout = \"forever\"\n",
                "server.header_read_timeout",
                "duration",
            ),
            (
                "[server]\nlisten = \"localhost\"\n",
                "server.listen",
                "IP:PORT",
            ),
            ("[log]\nformat = \"xml\"\n", "log.format", "json"),
            (
                "[server]\nmax_headers = true\n",
                "server.max_headers",
                "whole number",
            ),
        ];
        for (text, key, allowed) in cases {
            let (_dir, flags) = with_file(text);
            let err = Config::load(&flags, &Env::default())
                .unwrap_err()
                .to_string();
            assert!(err.contains(key) && err.contains(allowed), "{text}: {err}");
        }
    }

    #[test]
    fn syntax_error_names_file() {
        let (_dir, flags) = with_file("[server\n");
        let err = Config::load(&flags, &Env::default()).unwrap_err();
        assert!(matches!(err, ConfigError::FileSyntax { .. }));
    }

    #[test]
    fn tls_off_only_on_loopback() {
        let flags = Flags {
            tls: Some("off".into()),
            ..Flags::default()
        };
        assert!(Config::load(&flags, &Env::default()).is_ok());
        let flags = Flags {
            tls: Some("off".into()),
            listen: Some("[::1]:8080".into()),
            ..Flags::default()
        };
        assert!(Config::load(&flags, &Env::default()).is_ok());
        let flags = Flags {
            tls: Some("off".into()),
            listen: Some("0.0.0.0:8080".into()),
            ..Flags::default()
        };
        let err = Config::load(&flags, &Env::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("loopback"), "{err}");
    }

    #[test]
    fn a_domain_means_acme_on_443_with_the_redirect_on_80() {
        let c = Config::load(
            &Flags::default(),
            &env(&[("GATEHOUSE_DOMAIN", "Auth.Example.com., b.example.com")]),
        )
        .unwrap();
        assert_eq!(c.tls_mode, TlsMode::Acme);
        assert_eq!(c.tls.domains, ["auth.example.com", "b.example.com"]);
        assert_eq!(c.server.listen, "[::]:443".parse().unwrap());
        assert_eq!(c.server.http_listen, Some("[::]:80".parse().unwrap()));
        assert_eq!(c.tls.acme.directory, defaults::ACME_DIRECTORY);
        assert_eq!(
            crate::services::issuer(&c, c.server.listen),
            "https://auth.example.com"
        );
        // Another port: no redirect by default, and the issuer names the port.
        let flags = Flags {
            listen: Some("127.0.0.1:5001".into()),
            domains: vec!["a.example".into()],
            acme_email: Some("ops@example.com".into()),
            acme_directory: Some("letsencrypt-staging".into()),
            ..Flags::default()
        };
        let c = Config::load(&flags, &Env::default()).unwrap();
        assert_eq!(c.server.http_listen, None);
        assert_eq!(c.tls.acme.contact, ["mailto:ops@example.com"]);
        assert_eq!(c.tls.acme.directory, defaults::ACME_STAGING_DIRECTORY);
        assert_eq!(
            crate::services::issuer(&c, c.server.listen),
            "https://a.example:5001"
        );
        // A file may list the names.
        let (_dir, flags) = with_file("[tls]\ndomains = [\"x.example\", \"y.example\"]\n");
        let c = Config::load(&flags, &Env::default()).unwrap();
        assert_eq!(c.tls.domains, ["x.example", "y.example"]);
    }

    #[test]
    fn bad_tls_settings_are_refused_with_a_reason() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (
                &[("GATEHOUSE_DOMAIN", "*.example.com")],
                "not a domain name",
            ),
            (&[("GATEHOUSE_DOMAIN", "192.0.2.1")], "not a domain name"),
            (&[("GATEHOUSE_DOMAIN", "localhost")], "not a domain name"),
            (&[("GATEHOUSE_DOMAIN", "a..example")], "not a domain name"),
            (&[("GATEHOUSE_DOMAIN", "-a.example")], "not a domain name"),
            (&[("GATEHOUSE_DOMAIN", " , ")], "at least one domain"),
            (&[("GATEHOUSE_TLS", "acme")], "needs a domain"),
            (&[("GATEHOUSE_TLS", "files")], "needs tls.cert_file"),
            (
                &[
                    ("GATEHOUSE_TLS", "files"),
                    ("GATEHOUSE_TLS_CERT_FILE", "/x.pem"),
                ],
                "needs tls.cert_file",
            ),
            (
                &[("GATEHOUSE_TLS_CERT_FILE", "/x.pem")],
                "only with tls.mode",
            ),
            (
                &[("GATEHOUSE_ACME_DIRECTORY", "http://ca.example/dir")],
                "https URL",
            ),
            (&[("GATEHOUSE_ACME_EMAIL", "not-an-address")], "email"),
            (&[("GATEHOUSE_ACME_EMAIL", "a@b")], "email"),
            (&[("GATEHOUSE_ACME_RETRY", "0s")], "between"),
            (&[("GATEHOUSE_HTTP_LISTEN", "port80")], "IP:PORT"),
            (
                &[
                    ("GATEHOUSE_CORS_ALLOWED_ORIGINS", "*"),
                    ("GATEHOUSE_CORS_ALLOW_CREDENTIALS", "true"),
                ],
                "refused with cors.allow_credentials",
            ),
            (
                &[("GATEHOUSE_CORS_ALLOWED_ORIGINS", "https://app.example.com/")],
                "not an origin",
            ),
            (
                &[("GATEHOUSE_CORS_ALLOWED_ORIGINS", "app.example.com")],
                "not an origin",
            ),
            (
                &[("GATEHOUSE_CORS_ALLOW_CREDENTIALS", "yes")],
                "allowed values",
            ),
            (&[("GATEHOUSE_SESSION_IDLE", "10s")], "between"),
            (&[("GATEHOUSE_ACME_EAB_KID", "kid-1")], "needs both"),
            (
                &[("GATEHOUSE_ACME_EAB_KEY_FILE", "/etc/gatehouse/eab.key")],
                "needs both",
            ),
            (
                &[
                    ("GATEHOUSE_TLS", "off"),
                    ("GATEHOUSE_HTTP_LISTEN", "127.0.0.1:8080"),
                ],
                "tls.mode is \"off\"",
            ),
            (&[("GATEHOUSE_HTTP_LISTEN", "127.0.0.1:8443")], "are both"),
        ];
        for (vars, expected) in cases {
            let err = Config::load(&Flags::default(), &env(vars))
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{vars:?}: {err}");
        }
        let many: Vec<String> = (0..101).map(|i| format!("n{i}.example")).collect();
        let err = Config::load(
            &Flags::default(),
            &env(&[("GATEHOUSE_DOMAIN", &many.join(","))]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("at most 100"), "{err}");
    }

    #[test]
    fn the_packaged_file_loads_and_shows_every_setting_in_its_section() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/gatehouse.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let flags = Flags {
            config: Some(path),
            ..Flags::default()
        };
        let c = Config::load(&flags, &Env::default()).unwrap();
        assert_eq!(c.data_path, Path::new("/var/lib/gatehouse/gatehouse.redb"));
        assert_eq!(c.admin_socket, Path::new("/run/gatehouse/admin.sock"));
        let mut section = String::new();
        let mut shown = std::collections::BTreeSet::new();
        for line in text.lines() {
            let line = line.trim();
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = format!("{name}.");
            } else if let Some((key, _)) = line.trim_start_matches('#').split_once(" = ") {
                shown.insert(format!("{section}{key}"));
            }
        }
        for s in SETTINGS {
            assert!(
                shown.contains(s.key),
                "{} is not in packaging/gatehouse.toml",
                s.key
            );
        }
    }

    #[test]
    fn a_data_path_named_above_the_file_brings_its_own_socket() {
        let (_dir, mut flags) = with_file(
            "data = \"/var/lib/gatehouse/gatehouse.redb\"\n[admin]\nsocket = \"/run/g.sock\"\n",
        );
        let c = Config::load(&flags, &Env::default()).unwrap();
        assert_eq!(c.admin_socket, Path::new("/run/g.sock"));
        flags.data = Some(PathBuf::from("/tmp/drill/x.redb"));
        let c = Config::load(&flags, &Env::default()).unwrap();
        assert_eq!(c.admin_socket, Path::new("/tmp/drill/x.redb.sock"));
        let c = Config::load(
            &flags,
            &env(&[("GATEHOUSE_ADMIN_SOCKET", "/run/other.sock")]),
        )
        .unwrap();
        assert_eq!(c.admin_socket, Path::new("/run/other.sock"));
    }

    #[test]
    fn a_systemd_credential_outranks_a_key_file_named_in_the_file_only() {
        let (_dir, flags) = with_file("master_key_file = \"/etc/gatehouse/master-key\"\n");
        let c = Config::load(&flags, &env(&[("CREDENTIALS_DIRECTORY", "/run/creds")])).unwrap();
        assert_eq!(c.master_key.path, Path::new("/run/creds/master-key"));
        assert_eq!(c.master_key.origin, KeyOrigin::SystemdCredential);
        let c = Config::load(&flags, &Env::default()).unwrap();
        assert_eq!(c.master_key.path, Path::new("/etc/gatehouse/master-key"));
        assert_eq!(c.master_key.origin, KeyOrigin::Configured);
        // Named in the environment, it outranks the credential.
        let c = Config::load(
            &flags,
            &env(&[
                ("CREDENTIALS_DIRECTORY", "/run/creds"),
                ("GATEHOUSE_MASTER_KEY_FILE", "/k"),
            ]),
        )
        .unwrap();
        assert_eq!(c.master_key.path, Path::new("/k"));
    }

    #[test]
    fn long_socket_path_is_refused() {
        let flags = Flags {
            data: Some(PathBuf::from(format!(
                "/{}/gatehouse.redb",
                "d".repeat(120)
            ))),
            ..Flags::default()
        };
        assert!(matches!(
            Config::load(&flags, &Env::default()),
            Err(ConfigError::Invalid(_))
        ));
    }

    #[test]
    fn every_setting_has_a_distinct_key_and_env() {
        let mut keys: Vec<_> = SETTINGS.iter().map(|s| s.key).collect();
        let mut envs: Vec<_> = SETTINGS.iter().map(|s| s.env).collect();
        keys.sort_unstable();
        envs.sort_unstable();
        keys.dedup();
        envs.dedup();
        assert_eq!(keys.len(), SETTINGS.len());
        assert_eq!(envs.len(), SETTINGS.len());
        assert!(SETTINGS.iter().all(|s| s.env.starts_with("GATEHOUSE_")));
    }

    #[test]
    fn config_reference_documents_every_setting() {
        let doc = include_str!("../schema/config.md");
        for s in SETTINGS {
            assert!(
                doc.contains(&format!("`{}`", s.key)),
                "schema/config.md lacks {}",
                s.key
            );
            assert!(doc.contains(s.env), "schema/config.md lacks {}", s.env);
        }
    }
}
