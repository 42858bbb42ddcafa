//! ACME against a real CA: Debian's `pebble`, with `pebble-challtestsrv` as its DNS (every
//! name resolves to 127.0.0.1). pebble validates through real TLS-ALPN-01: it connects
//! back to gatehouse's HTTPS port and checks the challenge certificate.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::helpers::{self, TestApp, free_port, system_now_ms, tool_available};
use crate::test_ca::TestCa;

const DOMAIN: &str = "gatehouse.test";

/// A running pebble and its DNS server, killed on drop.
struct Pebble {
    dir: PathBuf,
    pebble: Option<Child>,
    dns: Child,
    config: PathBuf,
    dns_port: u16,
    directory: String,
    management: String,
    /// Trusts the test CA that signs pebble's own HTTPS certificate.
    ca_root: PathBuf,
}

impl Pebble {
    /// pebble validating TLS-ALPN-01 on `tls_port`; `None` when pebble is missing outside CI.
    /// With `eab`, new accounts need an External Account Binding to `(kid, key)`.
    fn start(test: &str, dir: &Path, tls_port: u16, eab: Option<(&str, &str)>) -> Option<Self> {
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
        let config = dir.join("pebble.json");
        let json = serde_json::json!({
            "pebble": {
                "listenAddress": format!("127.0.0.1:{listen}"),
                "managementListenAddress": format!("127.0.0.1:{management}"),
                "certificate": leaf.cert,
                "privateKey": leaf.key,
                "httpPort": free_port(),
                "tlsPort": tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": eab.is_some(),
                "externalAccountMACKeys": eab
                    .map(|(kid, key)| serde_json::json!({ kid: key }))
                    .unwrap_or_else(|| serde_json::json!({})),
            }
        });
        std::fs::write(&config, json.to_string()).unwrap();
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
        let mut pebble = Self {
            dir: dir.to_path_buf(),
            pebble: None,
            dns,
            config,
            dns_port,
            directory: format!("https://127.0.0.1:{listen}/dir"),
            management: format!("https://127.0.0.1:{management}"),
            ca_root,
        };
        pebble.resume();
        Some(pebble)
    }

    /// Starts (or starts again) the pebble process and waits for its directory.
    fn resume(&mut self) {
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
        let port: u16 = self
            .directory
            .trim_start_matches("https://127.0.0.1:")
            .trim_end_matches("/dir")
            .parse()
            .unwrap();
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("pebble did not start: {}", self.log());
    }

    /// Stops the pebble process (a CA outage); the DNS server stays.
    fn halt(&mut self) {
        if let Some(mut child) = self.pebble.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pebble.log")).unwrap_or_default()
    }

    /// The root pebble issues under (made fresh each time pebble starts).
    async fn issuing_root(&self) -> Vec<u8> {
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

    fn env(&self) -> Vec<(&'static str, String)> {
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

fn pem_to_der(pem: &[u8]) -> Vec<u8> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    CertificateDer::from_pem_slice(pem)
        .expect("a PEM certificate")
        .to_vec()
}

fn client_config(roots: &[Vec<u8>]) -> rustls::ClientConfig {
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
fn client_for(app: &TestApp, root: &[u8]) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_backend_preconfigured(client_config(&[root.to_vec()]))
        .resolve(DOMAIN, app.running.local_addr)
        .build()
        .unwrap()
}

fn url(app: &TestApp, path: &str) -> String {
    format!("https://{DOMAIN}:{}{path}", app.running.local_addr.port())
}

async fn start_app(dir: tempfile::TempDir, env: &[(&'static str, String)], now_ms: u64) -> TestApp {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    helpers::spawn_app_in_at(dir, &env, now_ms).await
}

fn acme(app: &TestApp) -> gatehouse::tls::acme::AcmeSnapshot {
    app.running
        .tls
        .as_ref()
        .and_then(|tls| tls.acme.as_ref())
        .expect("acme mode")
        .snapshot()
}

async fn wait_for(
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

async fn audit_kinds(app: &TestApp, kind: &str) -> Vec<serde_json::Value> {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_pebble_is_served_kept_across_restarts_and_survives_an_outage() {
    let test = "acme::pebble";
    let dir = tempfile::tempdir().unwrap();
    let pebble_dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let Some(mut pebble) = Pebble::start(test, pebble_dir.path(), port, None) else {
        return;
    };
    let mut env = pebble.env();
    env.push(("GATEHOUSE_LISTEN", format!("127.0.0.1:{port}")));
    let now = system_now_ms();

    // First start: nothing stored. The self-signed stand-in is served and /readyz says
    // not ready until pebble has validated (connecting back to this port) and issued.
    let app = start_app(dir, &env, now).await;
    let before = app
        .running
        .tls
        .as_ref()
        .unwrap()
        .slot
        .current()
        .info
        .clone();
    assert!(before.is_self_signed(), "the stand-in is self-signed");
    wait_for(&app, "a certificate from pebble", |s| s.issued).await;
    let root = pebble.issuing_root().await;
    let client = client_for(&app, &root);
    let ready = client
        .get(url(&app, "/readyz"))
        .send()
        .await
        .expect("the served chain leads to pebble's root and names the domain");
    assert_eq!(ready.status(), 200);
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(body["tls"], "acme");
    assert_eq!(body["acme"]["state"], "valid");
    assert_eq!(body["acme"]["issued"], true);
    assert_eq!(body["certificate"]["names"][0], DOMAIN);
    let first = app.running.tls.as_ref().unwrap().cert_der();
    let issued = audit_kinds(&app, "tls.certificate_issued").await;
    assert_eq!(issued.len(), 1, "{issued:?}");
    assert_eq!(audit_kinds(&app, "acme.account_created").await.len(), 1);
    let metrics = client
        .get(url(&app, "/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("gatehouse_acme_certificate_issued 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("gatehouse_acme_certificates_issued_total 1"),
        "{metrics}"
    );

    // Restart: the stored certificate is served at once, with no new order.
    let dir = app.stop().await;
    let app = start_app(dir, &env, now).await;
    assert_eq!(app.running.tls.as_ref().unwrap().cert_der(), first);
    assert!(acme(&app).issued);
    let response = client_for(&app, &root)
        .get(url(&app, "/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(acme(&app).orders_started, 0, "no order after a restart");
    assert_eq!(audit_kinds(&app, "tls.certificate_issued").await.len(), 1);

    // CA outage: pebble stops, and the clock reaches the renewal date. The current
    // certificate keeps being served; orders fail and are retried with backoff.
    let renew_at = acme(&app).renew_at_ms.expect("a renewal date");
    let dir = app.stop().await;
    pebble.halt();
    let app = start_app(dir, &env, renew_at + 1000).await;
    assert_eq!(app.running.tls.as_ref().unwrap().cert_der(), first);
    wait_for(&app, "three failed orders", |s| s.failures_in_row >= 3).await;
    let snapshot = acme(&app);
    assert!(snapshot.issued, "the CA's certificate is still served");
    assert_eq!(format!("{:?}", snapshot.phase), "Retrying");
    assert!(snapshot.last_error.is_some());
    let failures = audit_kinds(&app, "tls.certificate_failed").await;
    let delays: Vec<u64> = failures
        .iter()
        .map(|e| e["details"]["retry_in_seconds"].as_u64().unwrap())
        .collect();
    assert!(delays.len() >= 3, "{failures:?}");
    assert_eq!(&delays[..3], &[1, 2, 4], "retries double: {failures:?}");
    let client = client_for(&app, &root);
    let ready = client.get(url(&app, "/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200, "a renewal failing is not an outage");
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(body["acme"]["state"], "retrying");
    assert!(body["acme"]["failures_in_row"].as_u64().unwrap() >= 3);
    assert!(body["acme"]["last_error"].is_string());
    assert!(body["acme"]["next_attempt"].is_string());
    assert_eq!(app.running.tls.as_ref().unwrap().cert_der(), first);

    // The CA comes back: the next retry renews, and the new certificate is served.
    pebble.resume();
    wait_for(&app, "the renewal", |s| s.certificates_issued == 1).await;
    let renewed = app.running.tls.as_ref().unwrap().cert_der();
    assert_ne!(renewed, first, "a new certificate after the outage");
    let root = pebble.issuing_root().await;
    let ready = client_for(&app, &root)
        .get(url(&app, "/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    assert_eq!(acme(&app).failures_in_row, 0);
    app.stop().await;
}

/// A CA that demands External Account Binding: without it the account is refused (and
/// retried, audited); with a wrong MAC key too; with the right one a certificate is
/// issued, and the account records the binding's key id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_that_demands_external_account_binding_issues_only_with_it() {
    let test = "acme::eab";
    const KID: &str = "kid-1";
    const KEY: &str = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W";
    let pebble_dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let Some(pebble) = Pebble::start(test, pebble_dir.path(), port, Some((KID, KEY))) else {
        return;
    };
    let mut env = pebble.env();
    env.push(("GATEHOUSE_LISTEN", format!("127.0.0.1:{port}")));
    let now = system_now_ms();

    // No binding: the CA refuses the account; nothing is issued.
    let dir = tempfile::tempdir().unwrap();
    let app = start_app(dir, &env, now).await;
    wait_for(&app, "a refused order", |s| s.failures_in_row >= 1).await;
    let error = acme(&app).last_error.unwrap();
    assert!(error.contains("externalAccountRequired"), "{error}");
    assert!(!acme(&app).issued);
    let dir = app.stop().await;

    // A wrong MAC key: refused, naming the binding.
    let wrong = pebble_dir.path().join("wrong.key");
    std::fs::write(
        &wrong,
        "b10lLJs8l1GPIzsLP0s6pMt8O0XVGnfTaCeROxQM0BIt2XrJMDHJZBM5NuQmQJQH",
    )
    .unwrap();
    let mut with_wrong = env.clone();
    with_wrong.push(("GATEHOUSE_ACME_EAB_KID", KID.to_string()));
    with_wrong.push(("GATEHOUSE_ACME_EAB_KEY_FILE", wrong.display().to_string()));
    let app = start_app(dir, &with_wrong, now).await;
    wait_for(&app, "a refused binding", |s| s.failures_in_row >= 1).await;
    let error = acme(&app).last_error.unwrap();
    assert!(
        error.contains("refused the account with its external binding"),
        "{error}"
    );
    let dir = app.stop().await;

    // The right binding: the account is registered with it and the order goes through.
    let right = pebble_dir.path().join("right.key");
    std::fs::write(&right, format!("{KEY}\n")).unwrap();
    let mut with_right = env.clone();
    with_right.push(("GATEHOUSE_ACME_EAB_KID", KID.to_string()));
    with_right.push(("GATEHOUSE_ACME_EAB_KEY_FILE", right.display().to_string()));
    let app = start_app(dir, &with_right, now).await;
    wait_for(&app, "a certificate", |s| s.issued).await;
    let root = pebble.issuing_root().await;
    let ready = client_for(&app, &root)
        .get(url(&app, "/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let accounts = audit_kinds(&app, "acme.account_created").await;
    assert!(
        accounts.iter().any(|a| a["details"]["eab_kid"] == KID),
        "{accounts:?}"
    );
    app.stop().await;
}
