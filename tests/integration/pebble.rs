//! A real ACME CA for the tests: Debian's `pebble`, with `pebble-challtestsrv` as its DNS
//! (every name resolves to 127.0.0.1). pebble validates through real TLS-ALPN-01: it
//! connects back to the port it is told and checks the challenge certificate. Also the
//! clients and waits the ACME tests share (`acme.rs`, one node on a data file;
//! `acme_cluster.rs`, several nodes on PostgreSQL).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::helpers::{self, TestApp, free_port, tool_available};
use crate::test_ca::TestCa;

/// The name every ACME test orders.
pub const DOMAIN: &str = "gatehouse.test";

/// A pebble and its DNS server (killed on drop). The DNS server runs from
/// [`Pebble::prepare`]; pebble itself from [`Pebble::validate_on`], which names the port
/// it validates TLS-ALPN-01 on.
pub struct Pebble {
    dir: PathBuf,
    pebble: Option<Child>,
    dns: Child,
    config: PathBuf,
    dns_port: u16,
    listen: u16,
    management_port: u16,
    leaf: crate::test_ca::Leaf,
    eab: Option<(String, String)>,
    directory: String,
    management: String,
    /// Trusts the test CA that signs pebble's own HTTPS certificate.
    ca_root: PathBuf,
}

impl Pebble {
    /// pebble validating TLS-ALPN-01 on `tls_port`; `None` when pebble is missing outside CI.
    /// With `eab`, new accounts need an External Account Binding to `(kid, key)`.
    pub fn start(test: &str, dir: &Path, tls_port: u16, eab: Option<(&str, &str)>) -> Option<Self> {
        let mut pebble = Self::prepare(test, dir, eab)?;
        pebble.validate_on(tls_port);
        Some(pebble)
    }

    /// Everything but pebble itself: its certificate, ports and directory URL, and the DNS
    /// server (every name resolves to 127.0.0.1). Until [`Self::validate_on`], the
    /// directory refuses connections, like a CA that is down. `None` when pebble is missing
    /// outside CI.
    pub fn prepare(test: &str, dir: &Path, eab: Option<(&str, &str)>) -> Option<Self> {
        let install = "apt-get install pebble";
        if !tool_available(test, "pebble", &["-h"], install)
            || !tool_available(test, "pebble-challtestsrv", &["-h"], install)
        {
            return None;
        }
        let ca = TestCa::new("pebble test CA");
        let ca_root = ca.write_root(&dir.join("pebble-ca.pem"));
        let leaf = ca.issue(dir, "pebble", &["localhost", "127.0.0.1"], 30);
        let (listen, management, dns_port) = (free_port(), free_port(), free_port());
        let dns = Command::new("pebble-challtestsrv")
            .args([
                "-dns01",
                &format!("127.0.0.1:{dns_port}"),
                "-defaultIPv4",
                "127.0.0.1",
                "-defaultIPv6",
                "",
                "-http01",
                "",
                "-https01",
                "",
                "-tlsalpn01",
                "",
                "-management",
                &format!("127.0.0.1:{}", free_port()),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("pebble-challtestsrv starts");
        Some(Self {
            dir: dir.to_path_buf(),
            pebble: None,
            dns,
            config: dir.join("pebble.json"),
            dns_port,
            listen,
            management_port: management,
            leaf,
            eab: eab.map(|(kid, key)| (kid.to_string(), key.to_string())),
            directory: format!("https://127.0.0.1:{listen}/dir"),
            management: format!("https://127.0.0.1:{management}"),
            ca_root,
        })
    }

    /// Starts pebble, validating TLS-ALPN-01 by connecting to `tls_port` on 127.0.0.1.
    pub fn validate_on(&mut self, tls_port: u16) {
        let json = serde_json::json!({
            "pebble": {
                "listenAddress": format!("127.0.0.1:{}", self.listen),
                "managementListenAddress": format!("127.0.0.1:{}", self.management_port),
                "certificate": self.leaf.cert,
                "privateKey": self.leaf.key,
                "httpPort": free_port(),
                "tlsPort": tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": self.eab.is_some(),
                "externalAccountMACKeys": self.eab
                    .as_ref()
                    .map(|(kid, key)| serde_json::json!({ kid: key }))
                    .unwrap_or_else(|| serde_json::json!({})),
            }
        });
        std::fs::write(&self.config, json.to_string()).unwrap();
        self.resume();
    }

    /// Starts (or starts again) the pebble process and waits for its directory.
    pub fn resume(&mut self) {
        let log = std::fs::File::create(self.dir.join("pebble.log")).unwrap();
        let child = Command::new("pebble")
            .args([
                "-config",
                self.config.to_str().unwrap(),
                "-dnsserver",
                &format!("127.0.0.1:{}", self.dns_port),
            ])
            // No random sleeps before validation, no randomly refused nonces.
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("pebble starts");
        self.pebble = Some(child);
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", self.listen)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("pebble did not start: {}", self.log());
    }

    /// Stops the pebble process (a CA outage); the DNS server stays.
    pub fn halt(&mut self) {
        if let Some(mut child) = self.pebble.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pebble.log")).unwrap_or_default()
    }

    /// The root pebble issues under (made fresh each time pebble starts).
    pub async fn issuing_root(&self) -> Vec<u8> {
        let ca = std::fs::read(&self.ca_root).unwrap();
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(client_config(&[pem_to_der(&ca)]))
            .build()
            .unwrap();
        let pem = client
            .get(format!("{}/roots/0", self.management))
            .send()
            .await
            .expect("pebble management answers")
            .bytes()
            .await
            .unwrap();
        pem_to_der(&pem)
    }

    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("GATEHOUSE_DOMAIN", DOMAIN.to_string()),
            ("GATEHOUSE_ACME_DIRECTORY", self.directory.clone()),
            ("GATEHOUSE_ACME_CA_ROOT", self.ca_root.display().to_string()),
            ("GATEHOUSE_ACME_EMAIL", "ops@gatehouse.test".to_string()),
            ("GATEHOUSE_ACME_RETRY", "1s".to_string()),
        ]
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        self.halt();
        let _ = self.dns.kill();
        let _ = self.dns.wait();
    }
}

pub fn pem_to_der(pem: &[u8]) -> Vec<u8> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    CertificateDer::from_pem_slice(pem)
        .expect("a PEM certificate")
        .to_vec()
}

pub fn client_config(roots: &[Vec<u8>]) -> rustls::ClientConfig {
    gatehouse::tls::install_default_provider();
    let mut store = rustls::RootCertStore::empty();
    for root in roots {
        store
            .add(rustls::pki_types::CertificateDer::from(root.clone()))
            .unwrap();
    }
    rustls::ClientConfig::builder_with_provider(gatehouse::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(store)
        .with_no_client_auth()
}

/// A client that trusts only `root` and reaches `DOMAIN` at the server's address: the
/// handshake succeeds only if the served chain leads to `root` and names `DOMAIN`.
pub fn client_for(app: &TestApp, root: &[u8]) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_backend_preconfigured(client_config(&[root.to_vec()]))
        .resolve(DOMAIN, app.running.local_addr)
        .build()
        .unwrap()
}

pub fn url(app: &TestApp, path: &str) -> String {
    format!("https://{DOMAIN}:{}{path}", app.running.local_addr.port())
}

pub async fn start_app(
    dir: tempfile::TempDir,
    env: &[(&'static str, String)],
    now_ms: u64,
) -> TestApp {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    helpers::spawn_app_in_at(dir, &env, now_ms).await
}

pub fn acme(app: &TestApp) -> gatehouse::tls::acme::AcmeSnapshot {
    app.running
        .tls
        .as_ref()
        .and_then(|tls| tls.acme.as_ref())
        .expect("acme mode")
        .snapshot()
}

pub async fn wait_for(
    app: &TestApp,
    what: &str,
    done: impl Fn(&gatehouse::tls::acme::AcmeSnapshot) -> bool,
) {
    for _ in 0..600 {
        let snapshot = acme(app);
        if done(&snapshot) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}: {:?}", acme(app));
}

pub async fn audit_kinds(app: &TestApp, kind: &str) -> Vec<serde_json::Value> {
    let events = app
        .running
        .services
        .audit
        .query(&gatehouse::audit::Query {
            kind: Some(kind.to_string()),
            limit: 1000,
            ..Default::default()
        })
        .unwrap();
    events
        .events
        .into_iter()
        .map(|e| serde_json::to_value(e).unwrap())
        .collect()
}
