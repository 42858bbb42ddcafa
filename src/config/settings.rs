//! Every setting, declared once: its file key, environment variable, flag, built-in
//! default, one line of documentation, the parser of its values (with its range) and the
//! field of `Config` it sets.
//!
//! To add a setting: add its field to a section of `Config` (`mod.rs`), one entry here,
//! and a row in `schema/config.md` (a unit test fails until it is there). The loader,
//! the error messages and `config check` all read this list.

use std::time::Duration;

use super::jobs::{JobName, job_list, job_schedule, parse_timezone};
use super::values::{
    Address, AddressOrOff, Choice, Custom, FilePath, KeyAlgorithm, LETSENCRYPT, LogFormat,
    MasterKeySource, Parser, RateSpec, Span, Switch, TlsMode, Whole, acme_directory, audience,
    domains, eab_kid, email, issuer, log_level, networks, origins, storage_url, upstream_url,
};
use super::{Config, PAIRING_MAX_TTL};

/// One setting.
#[derive(Debug)]
pub struct Setting {
    /// The key in the file: `section.name`, or `name` at the top level.
    pub key: &'static str,
    /// The environment variable.
    pub env: &'static str,
    /// The command-line flag, for the few settings that have one.
    pub flag: Option<&'static str>,
    /// What applies when no layer sets it.
    pub default: Builtin,
    /// One line: what it is for.
    pub doc: &'static str,
    field: &'static (dyn Field + Sync),
}

/// A setting's built-in default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Builtin {
    /// This text, read by the setting's own parser before any other layer.
    Value(&'static str),
    /// Worked out from other settings once every layer is applied; the text says how.
    Derived(&'static str),
    /// Not set: the feature it configures is off, or the field stays empty.
    Unset,
}

impl Setting {
    /// Parses `text` and stores it in `config`; the error says what is allowed.
    pub(super) fn apply(&self, config: &mut Config, text: &str) -> Result<(), String> {
        self.field.set(config, text)
    }

    /// The value's type and range (`duration, 1s to 5m`).
    pub fn describe(&self) -> String {
        self.field.describe()
    }
}

/// A parser and the field of `Config` its values go to.
trait Field {
    fn set(&self, config: &mut Config, text: &str) -> Result<(), String>;
    fn describe(&self) -> String;
}

impl std::fmt::Debug for dyn Field + Sync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

struct Slot<P: Parser> {
    parser: P,
    store: fn(&mut Config, P::Output),
}

impl<P: Parser> Field for Slot<P> {
    fn set(&self, config: &mut Config, text: &str) -> Result<(), String> {
        (self.store)(config, self.parser.parse(text)?);
        Ok(())
    }

    fn describe(&self) -> String {
        self.parser.describe()
    }
}

/// `u64` to `usize`, saturating (ranges keep real values far below either limit).
fn size(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// `u64` to `u32`, saturating (ranges keep real values far below either limit).
fn small(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

const fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

const HOUR: u64 = 3600;
const DAY: u64 = 24 * HOUR;

macro_rules! setting {
    (
        $key:literal, $env:literal, $flag:expr, $default:expr, $doc:literal,
        $parser:expr, |$config:ident, $value:ident| $store:expr
    ) => {
        Setting {
            key: $key,
            env: $env,
            flag: $flag,
            default: $default,
            doc: $doc,
            field: &Slot {
                parser: $parser,
                store: |$config: &mut Config, $value| {
                    $store;
                },
            },
        }
    };
}

use Builtin::{Derived, Unset, Value};

/// Every setting gatehouse has, in the order `schema/config.md` lists them.
pub static SETTINGS: &[Setting] = &[
    setting!(
        "data",
        "GATEHOUSE_DATA",
        Some("--data"),
        Derived("$STATE_DIRECTORY/gatehouse.redb under systemd, else ./gatehouse.redb"),
        "the data file",
        FilePath,
        |c, v| c.data_path = v
    ),
    setting!(
        "storage.url",
        "GATEHOUSE_STORAGE",
        Some("--storage"),
        Unset,
        "a PostgreSQL database that several nodes share, postgres://USER@HOST/DB (no password in it); without it, the data file",
        Custom {
            what: "postgres:// URL",
            parse: storage_url
        },
        |c, v| c.storage.url = Some(v)
    ),
    setting!(
        "storage.password_file",
        "GATEHOUSE_STORAGE_PASSWORD_FILE",
        None,
        Derived(
            "PostgreSQL's password file (PGPASSFILE, else ~/.pgpass), if it has a line for the URL"
        ),
        "the file holding the database password (its first line)",
        FilePath,
        |c, v| c.storage.password_file = Some(v)
    ),
    setting!(
        "storage.ca_file",
        "GATEHOUSE_STORAGE_CA_FILE",
        None,
        Derived("Mozilla's roots, built in"),
        "the certificates (PEM) trusted to sign the database server's TLS certificate",
        FilePath,
        |c, v| c.storage.ca_file = Some(v)
    ),
    setting!(
        "master_key_file",
        "GATEHOUSE_MASTER_KEY_FILE",
        Some("--master-key-file"),
        Derived("$CREDENTIALS_DIRECTORY/master-key, else <data>.key"),
        "the file holding the master key",
        FilePath,
        |c, v| c.master_key = MasterKeySource {
            path: v,
            origin: super::KeyOrigin::Configured
        }
    ),
    setting!(
        "admin.socket",
        "GATEHOUSE_ADMIN_SOCKET",
        None,
        Derived("<data>.sock"),
        "the Unix socket management commands use",
        FilePath,
        |c, v| c.admin_socket = v
    ),
    setting!(
        "admin.session_idle",
        "GATEHOUSE_SESSION_IDLE",
        None,
        Value("30m"),
        "an admin UI session ends after this long without a request",
        Span {
            min: secs(60),
            max: secs(DAY)
        },
        |c, v| c.sessions.idle = v
    ),
    setting!(
        "admin.session_max",
        "GATEHOUSE_SESSION_MAX",
        None,
        Value("12h"),
        "an admin UI session ends this long after sign-in",
        Span {
            min: secs(5 * 60),
            max: secs(7 * DAY)
        },
        |c, v| c.sessions.max = v
    ),
    setting!(
        "cors.allowed_origins",
        "GATEHOUSE_CORS_ALLOWED_ORIGINS",
        None,
        Unset,
        "browser origins allowed to call the API",
        Custom {
            what: "origins",
            parse: origins
        },
        |c, v| c.cors.allowed_origins = v
    ),
    setting!(
        "cors.allow_credentials",
        "GATEHOUSE_CORS_ALLOW_CREDENTIALS",
        None,
        Value("false"),
        "whether those origins may send cookies and Authorization",
        Switch,
        |c, v| c.cors.allow_credentials = v
    ),
    setting!(
        "server.listen",
        "GATEHOUSE_LISTEN",
        Some("--listen"),
        Derived("127.0.0.1:8443; with tls.mode \"acme\": [::]:443"),
        "the HTTPS listener's address",
        Address,
        |c, v| c.server.listen = v
    ),
    setting!(
        "server.max_body_bytes",
        "GATEHOUSE_MAX_BODY_BYTES",
        None,
        Value("65536"),
        "the largest request body read",
        Whole {
            min: 1024,
            max: 16 * 1024 * 1024
        },
        |c, v| c.server.max_body_bytes = size(v)
    ),
    setting!(
        "server.header_read_timeout",
        "GATEHOUSE_HEADER_READ_TIMEOUT",
        None,
        Value("10s"),
        "time allowed for a request's headers",
        Span {
            min: secs(1),
            max: secs(300)
        },
        |c, v| c.server.header_read_timeout = v
    ),
    setting!(
        "server.request_timeout",
        "GATEHOUSE_REQUEST_TIMEOUT",
        None,
        Value("30s"),
        "time allowed for a whole request",
        Span {
            min: secs(1),
            max: secs(600)
        },
        |c, v| c.server.request_timeout = v
    ),
    setting!(
        "server.tls_handshake_timeout",
        "GATEHOUSE_TLS_HANDSHAKE_TIMEOUT",
        None,
        Value("10s"),
        "time allowed for a TLS handshake",
        Span {
            min: secs(1),
            max: secs(120)
        },
        |c, v| c.server.tls_handshake_timeout = v
    ),
    setting!(
        "server.idle_timeout",
        "GATEHOUSE_IDLE_TIMEOUT",
        None,
        Value("120s"),
        "a connection silent this long is closed",
        Span {
            min: secs(1),
            max: secs(HOUR)
        },
        |c, v| c.server.idle_timeout = v
    ),
    setting!(
        "server.max_connections",
        "GATEHOUSE_MAX_CONNECTIONS",
        None,
        Value("4096"),
        "open connections at most",
        Whole {
            min: 1,
            max: 1_000_000
        },
        |c, v| c.server.max_connections = size(v)
    ),
    setting!(
        "server.max_connections_per_ip",
        "GATEHOUSE_MAX_CONNECTIONS_PER_IP",
        None,
        Value("256"),
        "open connections from one address at most (trusted proxies are exempt)",
        Whole {
            min: 1,
            max: 1_000_000
        },
        |c, v| c.server.max_connections_per_ip = size(v)
    ),
    setting!(
        "server.trusted_proxies",
        "GATEHOUSE_TRUSTED_PROXIES",
        Some("--trusted-proxies"),
        Unset,
        "proxies whose X-Forwarded-For and Forwarded headers name the client",
        Custom {
            what: "networks",
            parse: networks
        },
        |c, v| c.server.trusted_proxies = v
    ),
    setting!(
        "upstream.url",
        "GATEHOUSE_UPSTREAM",
        Some("--upstream"),
        Unset,
        "the app behind the front door: requests gatehouse does not answer go there",
        Custom {
            what: "upstream",
            parse: upstream_url
        },
        |c, v| c.front.upstream = Some(v)
    ),
    setting!(
        "upstream.connect_timeout",
        "GATEHOUSE_UPSTREAM_CONNECT_TIMEOUT",
        None,
        Value("5s"),
        "how long to wait for a connection to the app",
        Span {
            min: Duration::from_millis(100),
            max: secs(60)
        },
        |c, v| c.front.connect_timeout = v
    ),
    setting!(
        "upstream.response_timeout",
        "GATEHOUSE_UPSTREAM_RESPONSE_TIMEOUT",
        None,
        Value("60s"),
        "how long to wait for the head of the app's answer",
        Span {
            min: secs(1),
            max: secs(3600)
        },
        |c, v| c.front.response_timeout = v
    ),
    setting!(
        "upstream.idle_timeout",
        "GATEHOUSE_UPSTREAM_IDLE_TIMEOUT",
        None,
        Value("60s"),
        "the longest silence while a body streams between client and app, either way",
        Span {
            min: secs(1),
            max: secs(3600)
        },
        |c, v| c.front.idle_timeout = v
    ),
    setting!(
        "upstream.assertion",
        "GATEHOUSE_UPSTREAM_ASSERTION",
        None,
        Value("false"),
        "whether requests for the app carry X-Gatehouse-Assertion, a JWT the app can verify with the JWKS",
        Switch,
        |c, v| c.front.assertion = v
    ),
    setting!(
        "upstream.ws_max_message",
        "GATEHOUSE_UPSTREAM_WS_MAX_MESSAGE",
        None,
        Value("1048576"),
        "the largest message a client may send through a relayed WebSocket (bytes)",
        Whole {
            min: 1024,
            max: 64 * 1024 * 1024
        },
        |c, v| c.front.ws_max_message = size(v)
    ),
    setting!(
        "upstream.ws_max_duration",
        "GATEHOUSE_UPSTREAM_WS_MAX_DURATION",
        None,
        Value("24h"),
        "the longest a relayed WebSocket stays open",
        Span {
            min: secs(60),
            max: secs(7 * DAY)
        },
        |c, v| c.front.ws_max_duration = v
    ),
    setting!(
        "upstream.ws_messages_per_second",
        "GATEHOUSE_UPSTREAM_WS_MESSAGES_PER_SECOND",
        None,
        Value("100"),
        "messages a device may send a second through its relayed WebSockets (bursts of twice that)",
        Whole {
            min: 1,
            max: 100_000
        },
        |c, v| c.front.ws_messages_per_second = u32::try_from(v).unwrap_or(u32::MAX)
    ),
    setting!(
        "upstream.ws_max_connections_per_device",
        "GATEHOUSE_UPSTREAM_WS_MAX_CONNECTIONS_PER_DEVICE",
        None,
        Value("8"),
        "relayed WebSockets one device may hold open at once",
        Whole {
            min: 1,
            max: 1_000_000
        },
        |c, v| c.front.ws_max_connections_per_device = size(v)
    ),
    setting!(
        "server.max_header_bytes",
        "GATEHOUSE_MAX_HEADER_BYTES",
        None,
        Value("16384"),
        "the largest request head read",
        Whole {
            min: 1024,
            max: 1024 * 1024
        },
        |c, v| c.server.max_header_bytes = size(v)
    ),
    setting!(
        "server.max_headers",
        "GATEHOUSE_MAX_HEADERS",
        None,
        Value("64"),
        "headers per request at most",
        Whole { min: 8, max: 1000 },
        |c, v| c.server.max_headers = size(v)
    ),
    setting!(
        "server.shutdown_grace",
        "GATEHOUSE_SHUTDOWN_GRACE",
        None,
        Value("10s"),
        "time given to requests in flight at stop",
        Span {
            min: secs(0),
            max: secs(300)
        },
        |c, v| c.server.shutdown_grace = v
    ),
    setting!(
        "server.h2_max_concurrent_streams",
        "GATEHOUSE_H2_MAX_CONCURRENT_STREAMS",
        None,
        Value("64"),
        "HTTP/2 streams per connection at most",
        Whole { min: 1, max: 1000 },
        |c, v| c.server.h2_max_concurrent_streams = small(v)
    ),
    setting!(
        "server.http_listen",
        "GATEHOUSE_HTTP_LISTEN",
        None,
        Derived("[::]:80 with tls.mode \"acme\" on port 443, else off"),
        "the plain-HTTP listener that redirects to HTTPS",
        AddressOrOff,
        |c, v| c.server.http_listen = v
    ),
    setting!(
        "tls.mode",
        "GATEHOUSE_TLS",
        Some("--tls"),
        Derived("acme with a domain, else self-signed"),
        "where the certificate comes from",
        Choice(&[
            ("self-signed", TlsMode::SelfSigned),
            ("acme", TlsMode::Acme),
            ("files", TlsMode::Files),
            ("off", TlsMode::Off),
        ]),
        |c, v| c.tls_mode = v
    ),
    setting!(
        "tls.domains",
        "GATEHOUSE_DOMAIN",
        Some("--domain"),
        Unset,
        "the names this server answers for",
        Custom {
            what: "names",
            parse: domains
        },
        |c, v| c.tls.domains = v
    ),
    setting!(
        "tls.acme_directory",
        "GATEHOUSE_ACME_DIRECTORY",
        Some("--acme-directory"),
        Value(LETSENCRYPT),
        "the ACME CA's directory",
        Custom {
            what: "URL",
            parse: acme_directory
        },
        |c, v| c.tls.acme.directory = v
    ),
    setting!(
        "tls.acme_email",
        "GATEHOUSE_ACME_EMAIL",
        Some("--acme-email"),
        Unset,
        "the ACME account's contact address",
        Custom {
            what: "email",
            parse: email
        },
        |c, v| c.tls.acme.contact = vec![v]
    ),
    setting!(
        "tls.acme_ca_root",
        "GATEHOUSE_ACME_CA_ROOT",
        Some("--acme-ca-root"),
        Unset,
        "CA certificates to trust for the ACME directory",
        FilePath,
        |c, v| c.tls.acme.ca_root = Some(v)
    ),
    setting!(
        "tls.acme_retry",
        "GATEHOUSE_ACME_RETRY",
        None,
        Value("5m"),
        "first wait after a failed order",
        Span {
            min: secs(1),
            max: secs(HOUR)
        },
        |c, v| c.tls.acme.retry = v
    ),
    setting!(
        "tls.acme_eab_kid",
        "GATEHOUSE_ACME_EAB_KID",
        None,
        Unset,
        "the External Account Binding key id",
        Custom {
            what: "text",
            parse: eab_kid
        },
        |c, v| c.tls.acme.eab_kid = Some(v)
    ),
    setting!(
        "tls.acme_eab_key_file",
        "GATEHOUSE_ACME_EAB_KEY_FILE",
        None,
        Unset,
        "the file holding the External Account Binding MAC key",
        FilePath,
        |c, v| c.tls.acme.eab_key_file = Some(v)
    ),
    setting!(
        "tls.cert_file",
        "GATEHOUSE_TLS_CERT_FILE",
        Some("--tls-cert"),
        Unset,
        "a PEM certificate chain (tls.mode \"files\")",
        FilePath,
        |c, v| c.tls.cert_file = Some(v)
    ),
    setting!(
        "tls.key_file",
        "GATEHOUSE_TLS_KEY_FILE",
        Some("--tls-key"),
        Unset,
        "its private key (tls.mode \"files\")",
        FilePath,
        |c, v| c.tls.key_file = Some(v)
    ),
    setting!(
        "log.format",
        "GATEHOUSE_LOG_FORMAT",
        None,
        Value("auto"),
        "text on a terminal and JSON otherwise, or one of them",
        Choice(&[
            ("auto", LogFormat::Auto),
            ("text", LogFormat::Text),
            ("json", LogFormat::Json)
        ]),
        |c, v| c.log_format = v
    ),
    setting!(
        "log.level",
        "GATEHOUSE_LOG",
        None,
        Value("info"),
        "the log filter",
        Custom {
            what: "filter",
            parse: log_level
        },
        |c, v| c.log_filter = v
    ),
    setting!(
        "tokens.issuer",
        "GATEHOUSE_ISSUER",
        None,
        Derived("https://<first domain>, else the listen URL"),
        "the iss of every token",
        Custom {
            what: "URL",
            parse: issuer
        },
        |c, v| c.tokens.issuer = Some(v)
    ),
    setting!(
        "tokens.audience",
        "GATEHOUSE_AUDIENCE",
        None,
        Derived("the issuer"),
        "the aud of every token",
        Custom {
            what: "text",
            parse: audience
        },
        |c, v| c.tokens.audience = Some(v)
    ),
    setting!(
        "tokens.access_ttl",
        "GATEHOUSE_ACCESS_TTL",
        None,
        Value("15m"),
        "how long an access token lives",
        Span {
            min: secs(60),
            max: secs(DAY)
        },
        |c, v| c.tokens.access_ttl = v
    ),
    setting!(
        "tokens.refresh_ttl",
        "GATEHOUSE_REFRESH_TTL",
        None,
        Value("7d"),
        "how long a refresh token lives",
        Span {
            min: secs(300),
            max: secs(365 * DAY)
        },
        |c, v| c.tokens.refresh_ttl = v
    ),
    setting!(
        "tokens.leeway",
        "GATEHOUSE_TOKEN_LEEWAY",
        None,
        Value("30s"),
        "clock skew allowed when checking exp and nbf",
        Span {
            min: secs(0),
            max: secs(300)
        },
        |c, v| c.tokens.leeway = v
    ),
    setting!(
        "tokens.require_dpop",
        "GATEHOUSE_REQUIRE_DPOP",
        None,
        Value("false"),
        "whether pairing and the device code grant refuse a request without a DPoP proof, so that every token is bound to its device's key",
        Switch,
        |c, v| c.tokens.require_dpop = v
    ),
    setting!(
        "tokens.dpop_nonce",
        "GATEHOUSE_DPOP_NONCE",
        None,
        Value("false"),
        "whether DPoP proofs must carry a nonce this server handed out in DPoP-Nonce (RFC 9449 section 8)",
        Switch,
        |c, v| c.tokens.dpop_nonce = v
    ),
    setting!(
        "tokens.status_list_ttl",
        "GATEHOUSE_STATUS_LIST_TTL",
        None,
        Value("1m"),
        "how long an app that verifies tokens offline may keep a token status list before fetching it again (its ttl claim and Cache-Control max-age): the most a revocation may take to reach it",
        Span {
            min: secs(1),
            max: secs(DAY)
        },
        |c, v| c.tokens.status_list_ttl = v
    ),
    setting!(
        "keys.algorithm",
        "GATEHOUSE_KEY_ALGORITHM",
        None,
        Value("EdDSA"),
        "the algorithm of new signing keys",
        Choice(&[
            ("EdDSA", KeyAlgorithm::Ed25519),
            ("Ed25519", KeyAlgorithm::Ed25519),
            ("ES256", KeyAlgorithm::EcdsaP256),
        ]),
        |c, v| c.tokens.key_algorithm = v
    ),
    setting!(
        "pairing.ttl",
        "GATEHOUSE_PAIRING_TTL",
        None,
        Value("5m"),
        "how long a pairing session stays open",
        Span {
            min: secs(30),
            max: PAIRING_MAX_TTL
        },
        |c, v| c.tokens.pairing_ttl = v
    ),
    setting!(
        "pairing.device_code_ttl",
        "GATEHOUSE_PAIRING_DEVICE_CODE_TTL",
        None,
        Value("10m"),
        "how long a device code and its user code (RFC 8628) stay valid",
        Span {
            min: secs(60),
            max: PAIRING_MAX_TTL
        },
        |c, v| c.tokens.device_code_ttl = v
    ),
    setting!(
        "pairing.device_poll_interval",
        "GATEHOUSE_PAIRING_DEVICE_POLL_INTERVAL",
        None,
        Value("5s"),
        "how long a device waits between polls of the token endpoint (RFC 8628)",
        Span {
            min: secs(1),
            max: secs(60)
        },
        |c, v| c.tokens.device_poll_interval = v
    ),
    setting!(
        "ratelimit.pairing",
        "GATEHOUSE_RATELIMIT_PAIRING",
        None,
        Value("10/1m"),
        "pairing attempts per address",
        RateSpec,
        |c, v| c.ratelimit.pairing = v
    ),
    setting!(
        "ratelimit.refresh",
        "GATEHOUSE_RATELIMIT_REFRESH",
        None,
        Value("60/1m"),
        "refreshes per device",
        RateSpec,
        |c, v| c.ratelimit.refresh = v
    ),
    setting!(
        "ratelimit.introspection",
        "GATEHOUSE_RATELIMIT_INTROSPECTION",
        None,
        Value("6000/1m"),
        "introspections per client",
        RateSpec,
        |c, v| c.ratelimit.introspection = v
    ),
    setting!(
        "ratelimit.admin_login",
        "GATEHOUSE_RATELIMIT_ADMIN_LOGIN",
        None,
        Value("10/1m"),
        "failed admin sign-ins per address",
        RateSpec,
        |c, v| c.ratelimit.admin_login = v
    ),
    setting!(
        "ratelimit.ws_messages",
        "GATEHOUSE_RATELIMIT_WS_MESSAGES",
        None,
        Value("60/1m"),
        "WebSocket messages per device",
        RateSpec,
        |c, v| c.ratelimit.ws_messages = v
    ),
    setting!(
        "ratelimit.per_ip",
        "GATEHOUSE_RATELIMIT_PER_IP",
        None,
        Value("6000/1m"),
        "requests per address",
        RateSpec,
        |c, v| c.ratelimit.per_ip = v
    ),
    setting!(
        "lockout.max_failures",
        "GATEHOUSE_LOCKOUT_MAX_FAILURES",
        None,
        Value("10"),
        "failed secret checks that earn a ban",
        Whole {
            min: 1,
            max: 10_000
        },
        |c, v| c.lockout.max_failures = small(v)
    ),
    setting!(
        "lockout.window",
        "GATEHOUSE_LOCKOUT_WINDOW",
        None,
        Value("10m"),
        "the window those failures are counted in",
        Span {
            min: secs(1),
            max: secs(DAY)
        },
        |c, v| c.lockout.window = v
    ),
    setting!(
        "lockout.ban",
        "GATEHOUSE_LOCKOUT_BAN",
        None,
        Value("15m"),
        "the first ban's length",
        Span {
            min: secs(1),
            max: secs(30 * DAY)
        },
        |c, v| c.lockout.ban = v
    ),
    setting!(
        "lockout.max_ban",
        "GATEHOUSE_LOCKOUT_MAX_BAN",
        None,
        Value("24h"),
        "the longest ban, after doublings",
        Span {
            min: secs(1),
            max: secs(365 * DAY)
        },
        |c, v| c.lockout.max_ban = v
    ),
    setting!(
        "jobs.rotate_keys",
        "GATEHOUSE_JOBS_ROTATE_KEYS",
        None,
        Value(JobName::RotateKeys.default_schedule()),
        "when the signing key rotates",
        Custom {
            what: "cron",
            parse: job_schedule
        },
        |c, v| c.jobs.schedules.insert(JobName::RotateKeys, v)
    ),
    setting!(
        "jobs.prune_audit",
        "GATEHOUSE_JOBS_PRUNE_AUDIT",
        None,
        Value(JobName::PruneAudit.default_schedule()),
        "when old audit records go",
        Custom {
            what: "cron",
            parse: job_schedule
        },
        |c, v| c.jobs.schedules.insert(JobName::PruneAudit, v)
    ),
    setting!(
        "jobs.prune_revocations",
        "GATEHOUSE_JOBS_PRUNE_REVOCATIONS",
        None,
        Value(JobName::PruneRevocations.default_schedule()),
        "when spent tokens and expired revocations go",
        Custom {
            what: "cron",
            parse: job_schedule
        },
        |c, v| c.jobs.schedules.insert(JobName::PruneRevocations, v)
    ),
    setting!(
        "jobs.prune_expired",
        "GATEHOUSE_JOBS_PRUNE_EXPIRED",
        None,
        Value(JobName::PruneExpired.default_schedule()),
        "when expired sessions, windows and bans go",
        Custom {
            what: "cron",
            parse: job_schedule
        },
        |c, v| c.jobs.schedules.insert(JobName::PruneExpired, v)
    ),
    setting!(
        "jobs.backup",
        "GATEHOUSE_JOBS_BACKUP",
        None,
        Value(JobName::Backup.default_schedule()),
        "when a scheduled backup is written",
        Custom {
            what: "cron",
            parse: job_schedule
        },
        |c, v| c.jobs.schedules.insert(JobName::Backup, v)
    ),
    setting!(
        "jobs.catch_up",
        "GATEHOUSE_JOBS_CATCH_UP",
        None,
        Value("all"),
        "jobs run once at start when a run was missed",
        Custom {
            what: "list",
            parse: job_list
        },
        |c, v| c.jobs.catch_up = v
    ),
    setting!(
        "jobs.timezone",
        "GATEHOUSE_JOBS_TIMEZONE",
        None,
        Value("UTC"),
        "the zone job schedules are read in",
        Custom {
            what: "zone",
            parse: parse_timezone
        },
        |c, v| c.jobs.timezone = v
    ),
    setting!(
        "backup.dir",
        "GATEHOUSE_BACKUP_DIR",
        None,
        Derived("backups beside the data file"),
        "where scheduled backups go",
        FilePath,
        |c, v| c.backup.dir = v
    ),
    setting!(
        "backup.keep",
        "GATEHOUSE_BACKUP_KEEP",
        None,
        Value("7"),
        "scheduled backups kept",
        Whole { min: 1, max: 1000 },
        |c, v| c.backup.keep = size(v)
    ),
    setting!(
        "audit.retention",
        "GATEHOUSE_AUDIT_RETENTION",
        None,
        Value("90d"),
        "how long audit records are kept",
        Span {
            min: secs(DAY),
            max: secs(10 * 366 * DAY)
        },
        |c, v| c.audit.retention = v
    ),
    setting!(
        "audit.checkpoint_every",
        "GATEHOUSE_AUDIT_CHECKPOINT_EVERY",
        None,
        Value("1m"),
        "how often the leader of nodes on one database binds their audit chains",
        Span {
            min: secs(1),
            max: secs(DAY)
        },
        |c, v| c.audit.checkpoint_every = v
    ),
    setting!(
        "ratelimit.max_keys",
        "GATEHOUSE_RATELIMIT_MAX_KEYS",
        None,
        Value("100000"),
        "rate-limit subjects held in memory at most",
        Whole {
            min: 1000,
            max: 100_000_000
        },
        |c, v| c.ratelimit.max_keys = size(v)
    ),
    setting!(
        "ws.max_connections",
        "GATEHOUSE_WS_MAX_CONNECTIONS",
        None,
        Value("10000"),
        "open WebSocket connections at most",
        Whole {
            min: 1,
            max: 1_000_000
        },
        |c, v| c.ws.max_connections = size(v)
    ),
    setting!(
        "ws.max_connections_per_ip",
        "GATEHOUSE_WS_MAX_CONNECTIONS_PER_IP",
        None,
        Value("64"),
        "open WebSocket connections per address at most",
        Whole {
            min: 1,
            max: 1_000_000
        },
        |c, v| c.ws.max_connections_per_ip = size(v)
    ),
    setting!(
        "ws.messages_per_second",
        "GATEHOUSE_WS_MESSAGES_PER_SECOND",
        None,
        Value("10"),
        "a device's WebSocket message burst guard",
        Whole { min: 1, max: 1000 },
        |c, v| c.ws.messages_per_second = small(v)
    ),
];

/// The setting with this file key.
pub(super) fn by_key(key: &str) -> Option<&'static Setting> {
    SETTINGS.iter().find(|s| s.key == key)
}
