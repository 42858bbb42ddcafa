//! The types setting values take, and the parsers that read them from text.
//!
//! Every value, from the file, the environment, a flag or a built-in default, arrives as
//! text and goes through one `Parser`, which also describes what it accepts (for error
//! messages and `config check`). A parser knows nothing of the setting it serves; the
//! declaration in `settings.rs` pairs the two.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// How the server gets its certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsMode {
    /// A self-signed certificate kept (sealed) in the data file. The default without a
    /// domain.
    #[default]
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
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::SelfSigned => "self-signed",
            Self::Acme => "acme",
            Self::Files => "files",
            Self::Off => "off",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Text on a terminal, JSON otherwise.
    #[default]
    Auto,
    Text,
    Json,
}

/// The algorithm of a signing key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum KeyAlgorithm {
    /// EdDSA over Ed25519 (RFC 8037). The default.
    #[default]
    Ed25519,
    /// ECDSA over P-256 with SHA-256 (ES256).
    EcdsaP256,
}

impl KeyAlgorithm {
    /// The JWS `alg` value.
    pub(crate) fn jws_alg(self) -> &'static str {
        match self {
            Self::Ed25519 => "EdDSA",
            Self::EcdsaP256 => "ES256",
        }
    }
}

/// Where the master key comes from, which decides whether gatehouse may create it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum KeyOrigin {
    /// `--master-key-file`, `GATEHOUSE_MASTER_KEY_FILE` or `master_key_file`: must exist.
    Configured,
    /// `$CREDENTIALS_DIRECTORY/master-key` (systemd): must exist.
    SystemdCredential,
    /// `<data>.key`: created on first start, with a warning.
    #[default]
    BesideDataFile,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MasterKeySource {
    pub path: PathBuf,
    pub(crate) origin: KeyOrigin,
}

/// A rate-limit policy's setting: a budget of requests per window, or no limit at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Rate {
    /// The policy is turned off.
    #[default]
    Off,
    /// At most `requests` per `window`.
    Limit { requests: u32, window: Duration },
}

/// Reads one kind of value from text and says what it accepts.
pub(super) trait Parser {
    type Output;
    fn parse(&self, text: &str) -> Result<Self::Output, String>;
    /// The type and range, as `config check` and `schema/config.md` name them.
    fn describe(&self) -> String;
}

/// A duration such as `10s` or `5m`, between `min` and `max` inclusive.
pub(super) struct Span {
    pub(super) min: Duration,
    pub(super) max: Duration,
}

impl Parser for Span {
    type Output = Duration;

    fn parse(&self, text: &str) -> Result<Duration, String> {
        let (min, max) = (
            humantime::format_duration(self.min),
            humantime::format_duration(self.max),
        );
        let d = humantime::parse_duration(text).map_err(|_| {
            format!("expected a duration such as \"10s\" or \"5m\" between {min} and {max}")
        })?;
        if d < self.min || d > self.max {
            return Err(format!("must be between {min} and {max}"));
        }
        Ok(d)
    }

    fn describe(&self) -> String {
        format!(
            "duration, {} to {}",
            humantime::format_duration(self.min),
            humantime::format_duration(self.max)
        )
    }
}

/// A whole number between `min` and `max` inclusive.
pub(super) struct Whole {
    pub(super) min: u64,
    pub(super) max: u64,
}

impl Parser for Whole {
    type Output = u64;

    fn parse(&self, text: &str) -> Result<u64, String> {
        let (min, max) = (self.min, self.max);
        let n: u64 = text
            .trim()
            .parse()
            .map_err(|_| format!("expected a whole number between {min} and {max}"))?;
        if !(min..=max).contains(&n) {
            return Err(format!("must be between {min} and {max}"));
        }
        Ok(n)
    }

    fn describe(&self) -> String {
        format!("integer, {} to {}", self.min, self.max)
    }
}

/// `true` or `false`.
pub(super) struct Switch;

impl Parser for Switch {
    type Output = bool;

    fn parse(&self, text: &str) -> Result<bool, String> {
        match text.trim() {
            "true" => Ok(true),
            "false" => Ok(false),
            _ => Err("allowed values: \"true\", \"false\"".into()),
        }
    }

    fn describe(&self) -> String {
        "boolean".into()
    }
}

/// A file path: any non-empty text.
pub(super) struct FilePath;

impl Parser for FilePath {
    type Output = PathBuf;

    fn parse(&self, text: &str) -> Result<PathBuf, String> {
        if text.trim().is_empty() {
            return Err("expected a file path".into());
        }
        Ok(PathBuf::from(text))
    }

    fn describe(&self) -> String {
        "path".into()
    }
}

/// One of a fixed list of words, each standing for a value.
pub(super) struct Choice<T: 'static>(pub(super) &'static [(&'static str, T)]);

impl<T: Copy> Parser for Choice<T> {
    type Output = T;

    fn parse(&self, text: &str) -> Result<T, String> {
        let text = text.trim();
        self.0
            .iter()
            .find(|(word, _)| *word == text)
            .map(|(_, value)| *value)
            .ok_or_else(|| format!("allowed values: {}", self.words()))
    }

    fn describe(&self) -> String {
        format!("choice: {}", self.words())
    }
}

impl<T> Choice<T> {
    fn words(&self) -> String {
        self.0
            .iter()
            .map(|(word, _)| format!("\"{word}\""))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// `IP:PORT`.
pub(super) struct Address;

impl Parser for Address {
    type Output = SocketAddr;

    fn parse(&self, text: &str) -> Result<SocketAddr, String> {
        text.trim()
            .parse()
            .map_err(|_| "expected IP:PORT, such as 127.0.0.1:8443 or [::1]:8443".to_string())
    }

    fn describe(&self) -> String {
        "address".into()
    }
}

/// `IP:PORT`, or `off`.
pub(super) struct AddressOrOff;

impl Parser for AddressOrOff {
    type Output = Option<SocketAddr>;

    fn parse(&self, text: &str) -> Result<Option<SocketAddr>, String> {
        match text.trim() {
            "off" => Ok(None),
            v => v
                .parse()
                .map(Some)
                .map_err(|_| "expected IP:PORT, such as [::]:80, or \"off\"".to_string()),
        }
    }

    fn describe(&self) -> String {
        "address or off".into()
    }
}

/// `N/DURATION` (at most N requests, 1 to 1 000 000, per DURATION, 1s to 24h), or `off`.
pub(super) struct RateSpec;

impl Parser for RateSpec {
    type Output = Rate;

    fn parse(&self, text: &str) -> Result<Rate, String> {
        let allowed = "expected REQUESTS/WINDOW such as \"10/1m\" (1 to 1000000 requests per \
                       1s to 24h), or \"off\"";
        if text.trim() == "off" {
            return Ok(Rate::Off);
        }
        let (n, window) = text
            .trim()
            .split_once('/')
            .ok_or_else(|| allowed.to_string())?;
        let requests: u32 = n.trim().parse().map_err(|_| allowed.to_string())?;
        let window = humantime::parse_duration(window.trim()).map_err(|_| allowed.to_string())?;
        if !(1..=1_000_000).contains(&requests)
            || window < Duration::from_secs(1)
            || window > Duration::from_secs(24 * 3600)
        {
            return Err(allowed.into());
        }
        Ok(Rate::Limit { requests, window })
    }

    fn describe(&self) -> String {
        "rate".into()
    }
}

/// A value with a syntax of its own, read by `parse`.
pub(super) struct Custom<T: 'static> {
    pub(super) what: &'static str,
    pub(super) parse: fn(&str) -> Result<T, String>,
}

impl<T> Parser for Custom<T> {
    type Output = T;

    fn parse(&self, text: &str) -> Result<T, String> {
        (self.parse)(text)
    }

    fn describe(&self) -> String {
        self.what.into()
    }
}

/// The ACME directories that have a short name.
pub(super) const LETSENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";
pub(super) const LETSENCRYPT_STAGING: &str =
    "https://acme-staging-v02.api.letsencrypt.org/directory";

/// Origins allowed to call the API from a browser: `scheme://host[:port]` each (no path),
/// separated by commas, or `*`. An empty string allows none.
/// `server.trusted_proxies`: comma-separated CIDR networks or single addresses.
pub(super) fn networks(v: &str) -> Result<Vec<ipnet::IpNet>, String> {
    let mut list = Vec::new();
    for item in v.split(',').map(str::trim).filter(|o| !o.is_empty()) {
        let net = match item.parse::<ipnet::IpNet>() {
            Ok(net) => net.trunc(),
            Err(_) => match item.parse::<std::net::IpAddr>() {
                Ok(ip) => ipnet::IpNet::from(ip),
                Err(_) => {
                    return Err(format!(
                        "{item:?} is not an address or network: expected CIDR such as \
                         \"127.0.0.1/32\", \"10.0.0.0/8\" or \"::1/128\", or one address"
                    ));
                }
            },
        };
        list.push(net);
    }
    Ok(list)
}

pub(super) fn origins(v: &str) -> Result<Vec<String>, String> {
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
pub(super) fn domains(v: &str) -> Result<Vec<String>, String> {
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
pub(super) fn acme_directory(v: &str) -> Result<String, String> {
    let v = v.trim();
    match v {
        "letsencrypt" => return Ok(LETSENCRYPT.into()),
        "letsencrypt-staging" => return Ok(LETSENCRYPT_STAGING.into()),
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
pub(super) fn email(v: &str) -> Result<String, String> {
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

/// The key id a CA gave for External Account Binding.
pub(super) fn eab_kid(v: &str) -> Result<String, String> {
    let v = v.trim();
    if v.is_empty() || v.len() > 256 || v.chars().any(char::is_control) {
        return Err("expected the key id the CA gave, 1 to 256 characters".into());
    }
    Ok(v.to_string())
}

/// A log filter: a level or a `tracing` directive list.
pub(super) fn log_level(v: &str) -> Result<String, String> {
    tracing_subscriber::EnvFilter::builder()
        .parse(v.trim())
        .map_err(|e| {
            format!(
                "expected error, warn, info, debug, trace or a filter such as \
                 \"info,gatehouse=debug\" ({e})"
            )
        })?;
    Ok(v.trim().to_string())
}

/// Where the app behind the front door listens (`upstream.url`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Upstream {
    /// `HOST:PORT`, as written in the URL.
    Tcp(String),
    Unix(std::path::PathBuf),
}

impl std::fmt::Display for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(authority) => write!(f, "http://{authority}"),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// Parses `upstream.url`: `http://HOST:PORT` or `unix:/absolute/path`.
pub(super) fn upstream_url(text: &str) -> Result<Upstream, String> {
    if let Some(path) = text.strip_prefix("unix:") {
        let path = std::path::PathBuf::from(path);
        if !path.is_absolute() {
            return Err(format!(
                "{text:?}: a Unix socket is named by an absolute path, such as unix:/run/app.sock"
            ));
        }
        return Ok(Upstream::Unix(path));
    }
    let uri: http::Uri = text
        .parse()
        .map_err(|_| format!("{text:?} is not a URL such as http://127.0.0.1:3000"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!(
            "{text:?}: the app is reached over plain http (on loopback or a private network) \
             or a Unix socket; gatehouse terminates TLS"
        ));
    }
    let Some(authority) = uri.authority() else {
        return Err(format!("{text:?} names no host"));
    };
    if authority.port_u16().is_none() {
        return Err(format!(
            "{text:?} names no port, such as http://127.0.0.1:3000"
        ));
    }
    if uri.path() != "/" && !uri.path().is_empty() || uri.query().is_some() {
        return Err(format!(
            "{text:?}: the upstream is a host and port only; paths go through unchanged"
        ));
    }
    if authority.as_str().contains('@') {
        return Err(format!("{text:?}: no user information in the upstream URL"));
    }
    Ok(Upstream::Tcp(authority.as_str().to_string()))
}

/// An issuer is an https URL without query or fragment (RFC 8414 section 2).
pub(super) fn issuer(v: &str) -> Result<String, String> {
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

pub(super) fn audience(v: &str) -> Result<String, String> {
    let v = v.trim();
    if v.is_empty() || v.len() > 255 || v.chars().any(|c| c.is_control() || c == ' ') {
        return Err("expected 1 to 255 characters without spaces, such as \
                    \"https://api.example.com\""
            .into());
    }
    Ok(v.to_string())
}

/// `storage.url`: a `postgres://USER@HOST[:PORT]/DB[?…]` URL naming its user and holding
/// no password (a password there would show in process lists, logs and unit files).
pub(crate) fn storage_url(text: &str) -> Result<String, String> {
    let Some(rest) = text
        .strip_prefix("postgres://")
        .or_else(|| text.strip_prefix("postgresql://"))
    else {
        return Err(format!(
            "{text:?}: a storage URL starts with postgres:// (PostgreSQL is the one shared \
             storage; without storage.url the data file is used)"
        ));
    };
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    let Some((user_info, host)) = authority.rsplit_once('@') else {
        return Err(format!(
            "{text:?}: name the database user, as in postgres://gatehouse@db.example/gatehouse"
        ));
    };
    if user_info.contains(':') {
        return Err(
            "the storage URL holds a password, which would show in process lists and logs: \
             remove it and put it in storage.password_file or PostgreSQL's password file \
             (~/.pgpass)"
                .to_string(),
        );
    }
    if user_info.is_empty() || host.is_empty() {
        return Err(format!(
            "{text:?}: name the user and the host, as in postgres://gatehouse@db.example/gatehouse"
        ));
    }
    Ok(text.to_string())
}
