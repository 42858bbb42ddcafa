//! The TLS policy and the modes other than ACME (which has `acme.rs`): `files` with its
//! SIGHUP reload through the real binary, the port-80 redirect, resumption, ALPN and
//! protocol versions, and the external scan by `testssl`.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::binary::{Server, gatehouse};
use crate::helpers::{self, tool_available};
use crate::test_ca::{Leaf, TestCa};

const NAME: &str = "files.test";

fn client_config(root: &[u8]) -> Arc<rustls::ClientConfig> {
    gatehouse::tls::install_default_provider();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(root.to_vec())).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(gatehouse::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

async fn connect(
    config: &Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    name: &str,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(name.to_string()).unwrap();
    TlsConnector::from(config.clone()).connect(name, tcp).await
}

fn leaf_of(stream: &TlsStream<TcpStream>) -> Vec<u8> {
    stream.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// One `GET /healthz` on a kept-alive HTTP/1.1 connection; the status code.
async fn get_healthz(stream: &mut TlsStream<TcpStream>) -> u16 {
    stream
        .write_all(format!("GET /healthz HTTP/1.1\r\nhost: {NAME}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut reader = BufReader::new(stream);
    let mut status = String::new();
    reader.read_line(&mut status).await.unwrap();
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).await.unwrap();
        if line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap();
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).await.unwrap();
    status.split(' ').nth(1).unwrap().parse().unwrap()
}

/// `gatehouse serve` in `files` mode on a free loopback port.
fn serve_files(data: &Path, cert: &Path, key: &Path) -> Command {
    let mut cmd = gatehouse(data);
    cmd.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--tls",
        "files",
        "--tls-cert",
    ])
    .arg(cert)
    .arg("--tls-key")
    .arg(key);
    cmd
}

/// Replaces `dst`'s files with `src`'s the way deployment tools do: write, then rename.
fn install(src: &Leaf, dst: &Leaf) {
    for (from, to) in [(&src.key, &dst.key), (&src.cert, &dst.cert)] {
        let tmp = to.with_extension("tmp");
        std::fs::copy(from, &tmp).unwrap();
        std::fs::rename(&tmp, to).unwrap();
    }
}

fn hangup(server: &Server) {
    let sent = Command::new("kill")
        .args(["-HUP", &server.pid().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}

async fn served_leaf(config: &Arc<rustls::ClientConfig>, addr: SocketAddr) -> Vec<u8> {
    leaf_of(&connect(config, addr, NAME).await.expect("handshake"))
}

async fn audit_types(server: &Server, root: &[u8], token: &str, family: &str) -> Vec<String> {
    let config = (*client_config(root)).clone();
    let client = reqwest::Client::builder()
        .tls_backend_preconfigured(config)
        .resolve(NAME, server.addr)
        .build()
        .unwrap();
    let body: serde_json::Value = client
        .get(format!(
            "https://{NAME}:{}/v1/audit?type={family}",
            server.addr.port()
        ))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_mode_reloads_on_sighup_without_dropping_connections() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("files test CA");
    let served = ca.issue(dir.path(), "served", &[NAME, "127.0.0.1"], 30);
    let first = std::fs::read(&served.cert).unwrap();
    let next = ca.issue(dir.path(), "next", &[NAME, "127.0.0.1"], 60);
    let other = ca.issue(dir.path(), "other", &[NAME], 60);
    let data = dir.path().join("gatehouse.redb");
    let cmd = serve_files(&data, &served.cert, &served.key);
    let server = Server::start_ok(cmd);
    assert!(
        server
            .stdout
            .iter()
            .any(|l| l.starts_with("TLS: certificate for files.test")),
        "{:?}",
        server.stdout
    );
    let token = server.bootstrap_token.clone().unwrap();
    let config = client_config(&ca.root_der);

    // A connection opened before the reload, kept alive across it.
    let mut kept = connect(&config, server.addr, NAME).await.unwrap();
    let first_der = leaf_of(&kept);
    assert_eq!(get_healthz(&mut kept).await, 200);

    install(&next, &served);
    hangup(&server);
    let mut reloaded = false;
    for _ in 0..100 {
        if served_leaf(&config, server.addr).await != first_der {
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(reloaded, "new connections get the reloaded certificate");
    assert_eq!(served_leaf(&config, server.addr).await, next.der);
    assert_eq!(
        get_healthz(&mut kept).await,
        200,
        "the connection opened before the reload still works"
    );
    assert_eq!(leaf_of(&kept), first_der);

    // A bad pair (the key of another certificate) changes nothing.
    std::fs::copy(&other.key, &served.key).unwrap();
    hangup(&server);
    let mut failed = false;
    for _ in 0..100 {
        if audit_types(&server, &ca.root_der, &token, "tls.")
            .await
            .contains(&"tls.reload_failed".to_string())
        {
            failed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(failed, "a failed reload is audited");
    assert_eq!(served_leaf(&config, server.addr).await, next.der);
    let kinds = audit_types(&server, &ca.root_der, &token, "tls.").await;
    assert!(
        kinds.contains(&"tls.certificate_loaded".to_string()),
        "{kinds:?}"
    );
    let stopped = server.stop_ok();
    assert!(
        stopped
            .stderr
            .contains("not the private key of the certificate"),
        "{}",
        stopped.stderr
    );
    assert_ne!(first, std::fs::read(&served.cert).unwrap());
}

#[test]
fn files_mode_refuses_to_start_with_a_bad_pair_and_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("files test CA");
    let a = ca.issue(dir.path(), "a", &[NAME], 30);
    let b = ca.issue(dir.path(), "b", &[NAME], 30);
    let data = dir.path().join("gatehouse.redb");
    let cmd = serve_files(&data, &a.cert, &b.key);
    let Err(done) = Server::start(cmd) else {
        panic!("a key of another certificate must be refused");
    };
    assert!(!done.status.success());
    assert!(
        done.stderr.contains("b.key") && done.stderr.contains("not the private key"),
        "{}",
        done.stderr
    );
}

#[tokio::test]
async fn port_80_redirects_to_https_on_the_configured_names_only() {
    let app = helpers::spawn_app_with(&[
        ("GATEHOUSE_TLS", "self-signed"),
        ("GATEHOUSE_DOMAIN", "auth.example.com,www.example.com"),
        ("GATEHOUSE_HTTP_LISTEN", "127.0.0.1:0"),
    ])
    .await;
    let http = app.running.http_addr.expect("the redirect listener");
    let port = app.running.local_addr.port();
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let cases = [
        (
            "www.example.com",
            "/v1/devices?x=1",
            format!("https://www.example.com:{port}/v1/devices?x=1"),
        ),
        (
            "evil.example",
            "/login",
            format!("https://auth.example.com:{port}/login"),
        ),
        (
            "auth.example.com:80",
            "/",
            format!("https://auth.example.com:{port}/"),
        ),
    ];
    for (host, path, location) in cases {
        let response = client
            .get(format!("http://{http}{path}"))
            .header("host", host)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 308, "{host}");
        assert_eq!(response.headers()["location"], location.as_str(), "{host}");
        assert!(
            response
                .headers()
                .get("strict-transport-security")
                .is_none()
        );
    }
    let challenge = client
        .get(format!("http://{http}/.well-known/acme-challenge/abc"))
        .send()
        .await
        .unwrap();
    assert_eq!(challenge.status(), 404, "HTTP-01 is not offered");
    // HTTPS itself sends HSTS for two years.
    let response = app.client().get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(
        response.headers()["strict-transport-security"],
        "max-age=63072000; includeSubDomains"
    );
    app.stop().await;
}

#[tokio::test]
async fn the_policy_is_tls_12_and_13_with_alpn_and_resumption() {
    let app = helpers::spawn_app().await;
    let cert = app.running.tls.as_ref().unwrap().cert_der();
    let addr = app.running.local_addr;

    // TLS 1.3 resumes with a ticket; ALPN picks h2 when offered.
    let mut config = (*client_config(&cert)).clone();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let config = Arc::new(config);
    let mut kinds = Vec::new();
    for _ in 0..3 {
        let mut stream = connect(&config, addr, "localhost").await.unwrap();
        // Tickets arrive after the handshake: read until the server has sent them.
        let _ = tokio::time::timeout(Duration::from_millis(200), stream.read(&mut [0u8; 1])).await;
        let (_, conn) = stream.get_ref();
        assert_eq!(
            conn.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        assert_eq!(conn.alpn_protocol(), Some(&b"h2"[..]));
        kinds.push(conn.handshake_kind());
    }
    assert_eq!(kinds[0], Some(rustls::HandshakeKind::Full));
    assert!(
        kinds[1..]
            .iter()
            .all(|k| *k == Some(rustls::HandshakeKind::Resumed)),
        "{kinds:?}"
    );

    // TLS 1.2 works, with an ECDHE AEAD suite, and resumes too.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(cert.clone())).unwrap();
    let tls12 = Arc::new(
        rustls::ClientConfig::builder_with_provider(gatehouse::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let mut kinds = Vec::new();
    for _ in 0..2 {
        let stream = connect(&tls12, addr, "localhost").await.unwrap();
        let (_, conn) = stream.get_ref();
        assert_eq!(
            conn.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_2)
        );
        let suite = format!("{:?}", conn.negotiated_cipher_suite().unwrap().suite());
        assert!(
            suite.contains("ECDHE") && (suite.contains("GCM") || suite.contains("CHACHA20")),
            "{suite}"
        );
        kinds.push(conn.handshake_kind());
    }
    assert_eq!(kinds[1], Some(rustls::HandshakeKind::Resumed), "{kinds:?}");
    app.stop().await;
}

/// testssl's findings at severity LOW or above, from its JSON file.
fn findings_at_low_or_above(json: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(json).unwrap();
    let findings: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    findings
        .iter()
        .filter(|f| {
            matches!(
                f["severity"].as_str(),
                Some("LOW" | "MEDIUM" | "HIGH" | "CRITICAL")
            )
        })
        .map(|f| format!("{} ({}): {}", f["id"], f["severity"], f["finding"]))
        .collect()
}

#[test]
fn doctor_reports_mode_issuer_names_and_expiry_online_and_offline() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("gatehouse.redb");
    let server = Server::start_ok(crate::binary::serve_cmd(&data));
    let mut cmd = gatehouse(&data);
    cmd.arg("doctor");
    let online = crate::binary::run_ok(cmd);
    let has = |out: &str, prefix: &str, text: &str| {
        out.lines()
            .any(|l| l.starts_with(prefix) && l.contains(text))
    };
    let out = &online.stdout;
    assert!(has(out, "ok    server", "running"), "{out}");
    assert!(has(out, "ok    tls", "mode self-signed"), "{out}");
    assert!(
        has(out, "ok    tls", "certificate for localhost, 127.0.0.1")
            && has(out, "ok    tls", "CN=gatehouse self-signed")
            && has(out, "ok    tls", "(396 days)"),
        "{out}"
    );
    assert!(
        has(out, "warn  master key", "beside the data file"),
        "{out}"
    );
    // What the admin UI's overview warns about, read from the running server.
    assert!(
        has(out, "warn  bootstrap_token_active", "bootstrap admin token"),
        "{out}"
    );
    let port = server.addr;
    server.stop_ok();

    let mut cmd = gatehouse(&data);
    cmd.args(["doctor"]);
    let offline = crate::binary::run_ok(cmd);
    let out = &offline.stdout;
    assert!(has(out, "warn  server", "not running"), "{out}");
    assert!(has(out, "ok    port", "127.0.0.1:8443"), "{out}");
    assert!(has(out, "ok    tls", "certificate for localhost"), "{out}");
    let _ = port;

    // A key file others can read is a failure, and the exit status says so.
    std::fs::set_permissions(
        crate::binary::key_path(&data),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let mut cmd = gatehouse(&data);
    cmd.arg("doctor");
    let done = crate::binary::run(cmd);
    assert!(!done.status.success());
    assert!(
        has(&done.stdout, "FAIL  master key", "chmod 600"),
        "{}",
        done.stdout
    );
}

/// Findings that describe the scanned name's DNS rather than the server, with why each
/// is excused. Everything else at LOW or above fails the test.
const NOT_ABOUT_THE_SERVER: &[(&str, &str)] = &[(
    "DNS_CAArecord",
    "a CAA record is published in the domain's DNS by its owner; a loopback test name has none",
)];

/// testssl (Debian's testssl.sh) scans a server in `files` mode with a CA-signed
/// certificate: protocols, ciphers and their order, forward secrecy, resumption, the
/// certificate, HSTS and the known vulnerabilities. Any finding of severity LOW or above
/// fails, except the DNS-only ones listed above.
#[test]
fn testssl_finds_nothing_of_severity_low_or_above() {
    let test = "tls::testssl";
    if !tool_available(
        test,
        "testssl",
        &["--version"],
        "apt-get install testssl.sh",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("scan test CA");
    let root = ca.write_root(&dir.path().join("ca.pem"));
    let leaf = ca.issue(dir.path(), "leaf", &["localhost", "127.0.0.1"], 90);
    let data = dir.path().join("gatehouse.redb");
    let cmd = serve_files(&data, &leaf.cert, &leaf.key);
    let server = Server::start_ok(cmd);
    let json = dir.path().join("testssl.json");
    let output = Command::new("testssl")
        .args(["--quiet", "--warnings", "off", "--color", "0", "--add-ca"])
        .arg(&root)
        .arg("--jsonfile")
        .arg(&json)
        .arg(format!("https://127.0.0.1:{}", server.addr.port()))
        .output()
        .expect("testssl runs");
    server.stop_ok();
    assert!(
        json.exists(),
        "testssl wrote no JSON; stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let findings: Vec<String> = findings_at_low_or_above(&json)
        .into_iter()
        .filter(|f| {
            !NOT_ABOUT_THE_SERVER
                .iter()
                .any(|(id, _)| f.starts_with(&format!("\"{id}\"")))
        })
        .collect();
    assert!(
        findings.is_empty(),
        "testssl findings of severity LOW or above:\n{}",
        findings.join("\n")
    );
    // The scan really ran: it saw both protocols and HSTS.
    let text = std::fs::read_to_string(&json).unwrap();
    for id in [
        "\"TLS1_3\"",
        "\"TLS1_2\"",
        "\"HSTS_time\"",
        "\"cipher_order\"",
    ] {
        assert!(text.contains(id), "no {id} in the scan");
    }
}

/// A self-signed certificate a month from expiry is renewed while the server runs, with
/// the same key: the pin apps hold stays valid, and new handshakes get the new one (the
/// slot every handshake reads). A client cannot check it here: the clock was moved
/// ahead, so the new certificate is not valid yet in real time.
#[tokio::test]
async fn the_self_signed_certificate_is_renewed_while_serving_with_the_same_pin() {
    let app = helpers::spawn_app().await;
    let tls = app.running.tls.clone().unwrap();
    let before = tls.slot.current().info.clone();
    let pin = tls.pin.clone().unwrap();
    let spki = |der: &[u8]| {
        use x509_parser::prelude::FromDer;
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).unwrap();
        cert.public_key().raw.to_vec()
    };
    let old_der = tls.cert_der();
    app.clock.set(before.not_after_ms - 29 * 24 * 3600 * 1000);
    let mut renewed = None;
    for _ in 0..100 {
        let now = tls.slot.current().info.clone();
        if now.not_after_ms > before.not_after_ms {
            renewed = Some(now);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let renewed = renewed.expect("renewed within seconds of becoming due");
    let new_der = tls.cert_der();
    assert_eq!(spki(&new_der), spki(&old_der), "same key");
    assert_eq!(tls.pin.clone().unwrap(), pin);
    let stored = app
        .running
        .store
        .read(|tx| tx.self_signed_cert())
        .unwrap()
        .unwrap();
    assert_eq!(stored.cert_der, new_der, "stored before it is served");
    let events = app
        .running
        .services
        .audit
        .query(&gatehouse::audit::Query {
            kind: Some("tls.self_signed_renewed".into()),
            limit: 10,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(events.events.len(), 1);
    assert!(renewed.not_after_ms > before.not_after_ms);
    app.stop().await;
}
