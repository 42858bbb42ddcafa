//! Shared test fixtures: an in-process server and clients that trust its certificate.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use gatehouse::app::{self, Running};
use gatehouse::clock::{FixedClock, SharedClock};
use gatehouse::config::{Config, Env, Flags};

/// 2026-11-23T00:00:00Z: the fixed "now" of in-process tests.
pub const TEST_NOW_MS: u64 = 1_795_392_000_000;

/// What `/v1/pair` and `/v1/token` answer.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct PairedDevice {
    pub device_id: String,
    pub access_token: String,
    pub refresh_token: String,
    pub token_type: String,
    pub expires_in: u64,
}

/// A running in-process server on a temporary data file.
pub struct TestApp {
    pub dir: tempfile::TempDir,
    pub config: Config,
    pub clock: Arc<FixedClock>,
    pub running: Running,
    pub base_url: String,
}

impl TestApp {
    pub fn data_path(&self) -> &Path {
        &self.config.data_path
    }

    /// A client that trusts exactly this server's certificate.
    pub fn client(&self) -> reqwest::Client {
        let cert = self
            .running
            .tls
            .as_ref()
            .expect("TLS is on")
            .cert_der()
            .clone();
        client_trusting(&cert)
    }

    /// The bootstrap admin token of a fresh instance.
    pub fn admin_token(&self) -> String {
        self.running
            .bootstrap_token
            .as_ref()
            .expect("a fresh instance has a bootstrap token")
            .token
            .clone()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    /// Opens a pairing session over HTTP as the bootstrap admin: `(session_id, secret)`.
    pub async fn open_pairing_session(&self) -> (String, String) {
        self.open_pairing_session_as(&self.admin_token()).await
    }

    /// Opens a pairing session over HTTP with the admin token `admin`.
    pub async fn open_pairing_session_as(&self, admin: &str) -> (String, String) {
        let response = self
            .client()
            .post(self.url("/v1/pairing/sessions"))
            .bearer_auth(admin)
            .json(&serde_json::json!({"name": "test phone"}))
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 201, "pairing session created");
        let body: serde_json::Value = response.json().await.expect("json");
        (
            body["session_id"].as_str().expect("session_id").to_string(),
            body["secret"].as_str().expect("secret").to_string(),
        )
    }

    /// `POST /v1/token` with the refresh grant.
    pub async fn refresh(&self, refresh_token: &str) -> reqwest::Response {
        self.client()
            .post(self.url("/v1/token"))
            .form(&[
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh_token),
            ])
            .send()
            .await
            .expect("request")
    }

    /// `POST /v1/revoke` (no credentials: RFC 7009 needs none here).
    pub async fn revoke(&self, token: &str) -> reqwest::Response {
        self.client()
            .post(self.url("/v1/revoke"))
            .form(&[("token", token)])
            .send()
            .await
            .expect("request")
    }

    /// Pairs a new device over HTTP: the answer of `/v1/pair`.
    pub async fn pair_device(&self) -> PairedDevice {
        self.pair_device_as(&self.admin_token()).await
    }

    /// Pairs a new device, its session opened with the admin token `admin`.
    pub async fn pair_device_as(&self, admin: &str) -> PairedDevice {
        let (session_id, secret) = self.open_pairing_session_as(admin).await;
        let response = self
            .client()
            .post(self.url("/v1/pair"))
            .json(&serde_json::json!({
                "session_id": session_id,
                "secret": secret,
                "device": {"name": "Pixel", "platform": "android", "app_version": "1.0.0"},
            }))
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 200, "paired");
        response.json().await.expect("token pair")
    }

    /// How many rows the table `table` holds.
    pub fn table_count(&self, table: &str) -> u64 {
        let counts = self
            .running
            .services
            .store
            .read(|tx| tx.table_counts())
            .expect("table counts");
        counts
            .iter()
            .find(|(name, _)| *name == table)
            .unwrap_or_else(|| panic!("no table {table} in {counts:?}"))
            .1
    }

    /// The audit records of one type, oldest first (at most 100).
    pub fn audit_events(&self, kind: &str) -> Vec<gatehouse::audit::EventView> {
        self.running
            .services
            .audit
            .query(&gatehouse::audit::Query {
                kind: Some(kind.into()),
                limit: 100,
                ..Default::default()
            })
            .expect("audit query")
            .events
    }

    /// A new admin token, for a server that has no bootstrap token (a restart, a fixture).
    pub async fn create_admin_token(&self) -> String {
        self.running
            .services
            .admin_tokens
            .create("test", &gatehouse::audit::Origin::operator())
            .await
            .expect("admin token")
            .token
    }

    /// `/v1/introspect` as the bootstrap admin: the JSON answer.
    pub async fn introspect(&self, token: &str) -> serde_json::Value {
        self.introspect_as(&self.admin_token(), token).await
    }

    /// `/v1/introspect` with the admin token `admin`: the JSON answer.
    pub async fn introspect_as(&self, admin: &str, token: &str) -> serde_json::Value {
        let response = self
            .client()
            .post(self.url("/v1/introspect"))
            .bearer_auth(admin)
            .form(&[("token", token)])
            .send()
            .await
            .expect("request");
        let status = response.status();
        let body = response.text().await.expect("body");
        assert_eq!(status, 200, "introspection answers 200: {body}");
        serde_json::from_str(&body).expect("json")
    }

    /// `GET /metrics` from loopback (no token needed): the Prometheus text.
    pub async fn metrics(&self) -> String {
        let response = self
            .client()
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 200, "/metrics answers 200");
        response.text().await.expect("body")
    }

    pub async fn stop(self) -> tempfile::TempDir {
        self.running.stop().await.expect("clean stop");
        self.dir
    }
}

/// The configuration a test server uses: everything inside `dir`, port 0.
pub fn test_config(dir: &Path, extra_env: &[(&str, &str)]) -> Config {
    let mut env: BTreeMap<String, String> = extra_env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    env.entry("GATEHOUSE_LOG".into())
        .or_insert_with(|| "warn".into());
    // Tests move the fixed clock by hours and days: scheduled jobs (a key rotation, a
    // backup) must not fire behind their backs. Tests of the scheduler turn jobs on.
    for job in [
        "ROTATE_KEYS",
        "PRUNE_AUDIT",
        "PRUNE_REVOCATIONS",
        "PRUNE_EXPIRED",
        "BACKUP",
    ] {
        env.entry(format!("GATEHOUSE_JOBS_{job}"))
            .or_insert_with(|| "off".into());
    }
    // A test that needs a known port (an ACME CA connects back to it) sets
    // GATEHOUSE_LISTEN; every other test gets a free port.
    let listen = (!env.contains_key("GATEHOUSE_LISTEN")).then(|| "127.0.0.1:0".to_string());
    let flags = Flags::default()
        .with("--data", dir.join("gatehouse.redb").display().to_string())
        .with_some("--listen", listen);
    Config::load(&flags, &Env(env)).expect("test config is valid")
}

/// Starts a server on a fresh temporary data file.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(&[]).await
}

/// Starts a server with extra `GATEHOUSE_*` settings.
pub async fn spawn_app_with(extra_env: &[(&str, &str)]) -> TestApp {
    let dir = tempfile::tempdir().expect("temp dir");
    spawn_app_in(dir, extra_env).await
}

/// Starts a server on the data file inside `dir` (kept from an earlier run, or new).
pub async fn spawn_app_in(dir: tempfile::TempDir, extra_env: &[(&str, &str)]) -> TestApp {
    spawn_app_in_at(dir, extra_env, TEST_NOW_MS).await
}

/// Like `spawn_app_in`, with the fixed clock starting at `now_ms` (a restart after a
/// while).
pub async fn spawn_app_in_at(
    dir: tempfile::TempDir,
    extra_env: &[(&str, &str)],
    now_ms: u64,
) -> TestApp {
    let config = test_config(dir.path(), extra_env);
    let clock = Arc::new(FixedClock::new(now_ms));
    let shared: SharedClock = clock.clone();
    let running = app::start(&config, shared).await.expect("server starts");
    let scheme = if running.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let base_url = format!("{scheme}://{}", running.local_addr);
    TestApp {
        dir,
        config,
        clock,
        running,
        base_url,
    }
}

/// A reqwest client (rustls on ring) whose only trust anchor is `cert_der`.
pub fn client_trusting(cert_der: &[u8]) -> reqwest::Client {
    gatehouse::tls::install_default_provider();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(cert_der.to_vec()))
        .expect("certificate parses");
    let tls = rustls::ClientConfig::builder_with_provider(gatehouse::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .build()
        .expect("client builds")
}

/// A copy of `src` at a new path inside `dir`.
pub fn copy_into(src: &Path, dir: &Path, name: &str) -> PathBuf {
    let dst = dir.join(name);
    std::fs::copy(src, &dst).expect("copy");
    dst
}

/// What every fixture recipe writes first, as every format so far stored it: `meta` (the
/// format version, an instance id of sixteen `instance` bytes, the creation time and the
/// master-key check value) and a sealed self-signed certificate in `secrets.v1`.
pub fn write_fixture_base(
    tx: &redb::WriteTransaction,
    sealer: &gatehouse::store::seal::Sealer,
    format: u32,
    instance: u8,
) {
    use gatehouse::store::records;
    let raw = |name| redb::TableDefinition::<&str, &[u8]>::new(name);
    let mut meta = tx.open_table(raw("meta")).unwrap();
    meta.insert("format_version", format.to_le_bytes().as_slice())
        .unwrap();
    meta.insert("instance_id", records::encode(&[instance; 16]).as_slice())
        .unwrap();
    meta.insert("created_at_ms", records::encode(&TEST_NOW_MS).as_slice())
        .unwrap();
    let check = sealer
        .seal(
            "meta",
            b"master_key_check",
            gatehouse::store::MASTER_KEY_CHECK_PLAINTEXT,
        )
        .unwrap();
    meta.insert("master_key_check", check.as_slice()).unwrap();
    let cert = gatehouse::tls::generate_self_signed(
        &gatehouse::tls::self_signed_names("127.0.0.1:0".parse().unwrap()),
        TEST_NOW_MS,
    )
    .unwrap();
    let plain = records::encode(&records::SelfSignedCertRecord::V1(cert));
    let sealed = sealer
        .seal("secrets.v1", b"tls/self-signed", &plain)
        .unwrap();
    tx.open_table(raw("secrets.v1"))
        .unwrap()
        .insert("tls/self-signed", sealed.as_slice())
        .unwrap();
}

/// Whether an external program runs (`program args`, any exit status). When it cannot,
/// a CI run (`CI=true`) fails with `install`, and a local run skips with a printed reason.
pub fn tool_available(test: &str, program: &str, args: &[&str], install: &str) -> bool {
    match std::process::Command::new(program)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
    {
        Ok(_) => true,
        Err(err) => {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("{test}: {program} cannot run ({err}); CI must have it: {install}");
            }
            eprintln!("{test}: skipped, {program} cannot run ({err}); {install}");
            false
        }
    }
}

/// A free TCP port on loopback for a test that must name its port before the server
/// starts (an ACME CA connects back to it, a restart reuses it). It is taken below the
/// kernel's ephemeral range (32768 and up on Linux), so no socket bound to port 0 by a
/// test running alongside can be handed the port between this check and the server's
/// bind; tests of this binary take distinct ports through one counter.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    // Each test process starts at its own offset, so two test runs at once rarely meet.
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 20_000 + (std::process::id() % 100) as u16 * 100;
    for _ in 0..10_000 {
        let port = 20_000 + (base - 20_000 + NEXT.fetch_add(1, Ordering::Relaxed)) % 12_000;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port between 20000 and 32000 on loopback");
}

/// Milliseconds since the epoch, from the system clock (for tests whose certificates come
/// from a real CA and must be valid now).
pub fn system_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
