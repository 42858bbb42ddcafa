//! The compiled `gatehouse` started as a user would: real process, real TLS, real data
//! file, stopped with SIGTERM. Also the start-up refusals (port in use, wrong or exposed
//! master key, configuration errors), which must exit without touching the data file.
//!
//! The helpers here (`gatehouse`, `run`, `Server`, `PinnedSpki`) are shared with `cli.rs`.
//! A client trusts the binary's self-signed certificate through the SPKI pin the binary
//! prints at start (checked against the certificate and its handshake signature), and
//! again through the certificate read back from the stopped server's data file.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use gatehouse::clock::SystemClock;
use gatehouse::store::seal::MasterKey;
use gatehouse::store::{Store, StoreError};
use rustls::DigitallySignedStruct;
use rustls::SignatureScheme;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

use crate::helpers;

/// How long the binary may take to print its listening line.
pub(crate) const START_DEADLINE: Duration = Duration::from_secs(10);
/// How long the binary may take to exit (after SIGTERM, or a one-shot command).
pub(crate) const EXIT_DEADLINE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// Running the binary

/// `gatehouse --data <data>` with a clean environment: no inherited `GATEHOUSE_*`
/// variable (an unknown one is a configuration error) and no systemd directories (they
/// would move the key file and the default data file).
pub(crate) fn gatehouse(data: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gatehouse"));
    for (name, _) in std::env::vars_os() {
        let text = name.to_string_lossy();
        if text.starts_with("GATEHOUSE_")
            || text == "CREDENTIALS_DIRECTORY"
            || text == "STATE_DIRECTORY"
        {
            cmd.env_remove(&name);
        }
    }
    cmd.env("GATEHOUSE_LOG_FORMAT", "text")
        .arg("--data")
        .arg(data)
        .stdin(Stdio::null());
    cmd
}

/// `gatehouse --data <data> serve --listen 127.0.0.1:0`.
pub(crate) fn serve_cmd(data: &Path) -> Command {
    let mut cmd = gatehouse(data);
    cmd.args(["serve", "--listen", "127.0.0.1:0"]);
    cmd
}

/// `<data>.key`, the default master key file.
pub(crate) fn key_path(data: &Path) -> PathBuf {
    sibling(data, ".key")
}

/// `<data>.sock`, the default admin socket.
pub(crate) fn socket_path(data: &Path) -> PathBuf {
    sibling(data, ".sock")
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// A process that has exited.
#[derive(Debug)]
pub(crate) struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

fn read_all(reader: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = BufReader::new(reader).read_to_string(&mut text);
        text
    })
}

/// Polls until the child exits or `limit` passes.
fn wait_until(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a command that must exit by itself within `EXIT_DEADLINE`.
pub(crate) fn run(mut cmd: Command) -> Finished {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn gatehouse");
    let stdout = read_all(child.stdout.take().expect("stdout"));
    let stderr = read_all(child.stderr.take().expect("stderr"));
    let Some(status) = wait_until(&mut child, EXIT_DEADLINE) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "gatehouse did not exit within {EXIT_DEADLINE:?}; stderr:\n{}",
            stderr.join().unwrap_or_default()
        );
    };
    Finished {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

/// Runs `cmd` (which must not be `serve`) and requires success.
pub(crate) fn run_ok(cmd: Command) -> Finished {
    let done = run(cmd);
    assert!(
        done.status.success(),
        "command failed ({}); stdout:\n{}\nstderr:\n{}",
        done.status,
        done.stdout,
        done.stderr
    );
    done
}

/// A `gatehouse serve` process that has printed its listening line.
pub(crate) struct Server {
    child: Child,
    pub addr: SocketAddr,
    /// `https://127.0.0.1:PORT` or `http://...`.
    pub url: String,
    /// The SPKI pin printed on the `TLS:` line (`sha256/` removed), when TLS is on.
    pub pin: Option<String>,
    /// The bootstrap token printed on a first start.
    pub bootstrap_token: Option<String>,
    /// Every stdout line read so far.
    pub stdout: Vec<String>,
    lines: Option<Receiver<String>>,
    stderr: Option<JoinHandle<String>>,
}

/// A server that has exited.
#[derive(Debug)]
pub(crate) struct Stopped {
    pub status: ExitStatus,
    pub stdout: Vec<String>,
    pub stderr: String,
}

impl Server {
    /// Starts `cmd` and waits for the listening line (and the TLS line when TLS is on).
    /// A process that exits first is returned as `Err`.
    pub(crate) fn start(mut cmd: Command) -> Result<Self, Finished> {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn gatehouse serve");
        let stderr = read_all(child.stderr.take().expect("stderr"));
        let (send, lines) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + START_DEADLINE;
        let mut seen = Vec::new();
        let mut listening: Option<String> = None;
        let mut pin = None;
        let mut tls_line = false;
        let mut bootstrap_token = None;
        loop {
            let done = match &listening {
                Some(url) => url.starts_with("http://") || tls_line,
                None => false,
            };
            if done {
                break;
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(remaining) {
                Ok(line) => {
                    if let Some(url) = line.strip_prefix("gatehouse listening on ") {
                        listening = Some(url.trim().to_string());
                    }
                    if let Some(rest) = line.split("SPKI pin sha256/").nth(1) {
                        pin = Some(rest.trim().to_string());
                    }
                    tls_line |= line.starts_with("TLS: ");
                    if line.trim().starts_with("gha_") {
                        bootstrap_token = Some(line.trim().to_string());
                    }
                    seen.push(line);
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = wait_until(&mut child, EXIT_DEADLINE).unwrap_or_else(|| {
                        let _ = child.kill();
                        child.wait().expect("wait")
                    });
                    return Err(Finished {
                        status,
                        stdout: seen.join("\n"),
                        stderr: stderr.join().unwrap_or_default(),
                    });
                }
                Err(RecvTimeoutError::Timeout) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "gatehouse printed no listening line within {START_DEADLINE:?}; \
                         stdout so far: {seen:?}; stderr:\n{}",
                        stderr.join().unwrap_or_default()
                    );
                }
            }
        }
        let url = listening.expect("listening line");
        let addr = url
            .split("://")
            .nth(1)
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("bad listening address in {url:?}"));
        Ok(Self {
            child,
            addr,
            url,
            pin,
            bootstrap_token,
            stdout: seen,
            lines: Some(lines),
            stderr: Some(stderr),
        })
    }

    /// Starts `cmd`, which must come up.
    pub(crate) fn start_ok(cmd: Command) -> Self {
        match Self::start(cmd) {
            Ok(server) => server,
            Err(done) => panic!(
                "gatehouse serve exited ({}) before listening; stderr:\n{}",
                done.status, done.stderr
            ),
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits (bounded) for the exit; collects all output.
    pub(crate) fn stop(mut self) -> Stopped {
        terminate(self.pid());
        let Some(status) = wait_until(&mut self.child, EXIT_DEADLINE) else {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let stderr = self.stderr.take().map(|h| h.join().unwrap_or_default());
            panic!(
                "gatehouse did not exit within {EXIT_DEADLINE:?} of SIGTERM; stderr:\n{stderr:?}"
            );
        };
        let mut stdout = std::mem::take(&mut self.stdout);
        if let Some(lines) = self.lines.take() {
            stdout.extend(lines.iter());
        }
        let stderr = self
            .stderr
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default();
        Stopped {
            status,
            stdout,
            stderr,
        }
    }

    /// Stops the server and requires a clean exit (status 0).
    pub(crate) fn stop_ok(self) -> Stopped {
        let stopped = self.stop();
        assert_eq!(
            stopped.status.code(),
            Some(0),
            "gatehouse did not exit cleanly ({}); stderr:\n{}",
            stopped.status,
            stopped.stderr
        );
        stopped
    }
}

/// Sends SIGTERM to `pid`.
fn terminate(pid: u32) {
    let sent = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(sent.success(), "kill -TERM {pid} failed");
}

impl Drop for Server {
    fn drop(&mut self) {
        // A failed test must not leave its server running.
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------
// Trusting the binary's self-signed certificate

/// Accepts exactly the server certificate whose SubjectPublicKeyInfo hashes to the pin
/// the binary printed, and checks the handshake signature made with its key. Records
/// the certificate it accepted.
#[derive(Debug)]
pub(crate) struct PinnedSpki {
    pin: String,
    algorithms: WebPkiSupportedAlgorithms,
    seen: Mutex<Option<Vec<u8>>>,
}

impl PinnedSpki {
    pub(crate) fn new(pin: &str) -> Arc<Self> {
        Arc::new(Self {
            pin: pin.to_string(),
            algorithms: gatehouse::tls::provider().signature_verification_algorithms,
            seen: Mutex::new(None),
        })
    }

    /// The certificate (DER) accepted last.
    pub(crate) fn seen(&self) -> Option<Vec<u8>> {
        self.seen.lock().expect("lock").clone()
    }
}

impl ServerCertVerifier for PinnedSpki {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let spki = spki_of(end_entity.as_ref()).ok_or(rustls::Error::InvalidCertificate(
            rustls::CertificateError::BadEncoding,
        ))?;
        let hash = ring::digest::digest(&ring::digest::SHA256, spki);
        if data_encoding::BASE64.encode(hash.as_ref()) != self.pin {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            ));
        }
        *self.seen.lock().expect("lock") = Some(end_entity.to_vec());
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// One DER element.
struct Der<'a> {
    tag: u8,
    /// The element without its tag and length.
    contents: &'a [u8],
    /// The whole element.
    whole: &'a [u8],
    /// What follows it.
    rest: &'a [u8],
}

fn der(input: &[u8]) -> Option<Der<'_>> {
    let tag = *input.first()?;
    let first = *input.get(1)?;
    let (len, header) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..count {
            len = (len << 8) | usize::from(*input.get(2 + i)?);
        }
        (len, 2 + count)
    };
    let end = header.checked_add(len)?;
    let whole = input.get(..end)?;
    Some(Der {
        tag,
        contents: &whole[header..],
        whole,
        rest: &input[end..],
    })
}

/// The SubjectPublicKeyInfo (whole DER element) of an X.509 certificate.
fn spki_of(cert: &[u8]) -> Option<&[u8]> {
    const SEQUENCE: u8 = 0x30;
    let certificate = der(cert)?;
    let tbs = der(certificate.contents)?;
    if certificate.tag != SEQUENCE || tbs.tag != SEQUENCE {
        return None;
    }
    let mut rest = tbs.contents;
    if rest.first() == Some(&0xA0) {
        rest = der(rest)?.rest; // [0] version
    }
    for _ in 0..5 {
        rest = der(rest)?.rest; // serial, signature, issuer, validity, subject
    }
    let spki = der(rest)?;
    (spki.tag == SEQUENCE).then_some(spki.whole)
}

/// A client that trusts the server through `verifier` only.
pub(crate) fn client_with(verifier: Arc<PinnedSpki>) -> reqwest::Client {
    gatehouse::tls::install_default_provider();
    let tls = rustls::ClientConfig::builder_with_provider(gatehouse::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client builds")
}

/// A client for `server` that trusts its printed pin, and the verifier it uses.
pub(crate) fn pinned_client(server: &Server) -> (reqwest::Client, Arc<PinnedSpki>) {
    let pin = server
        .pin
        .as_deref()
        .expect("the server printed an SPKI pin");
    let verifier = PinnedSpki::new(pin);
    (client_with(verifier.clone()), verifier)
}

/// GET `{url}/healthz`, which must answer 200; returns the certificate the pin accepted.
pub(crate) async fn healthz_via_pin(server: &Server) -> Vec<u8> {
    let (client, verifier) = pinned_client(server);
    let response = client
        .get(format!("{}/healthz", server.url))
        .send()
        .await
        .expect("GET /healthz");
    assert_eq!(response.status(), 200);
    verifier.seen().expect("a certificate was verified")
}

/// The self-signed certificate stored in a data file no process holds.
pub(crate) fn stored_cert(data: &Path) -> Vec<u8> {
    let key = MasterKey::load(&key_path(data)).expect("master key loads");
    let (store, _) = Store::open(data, &key, &SystemClock).expect("data file opens");
    let cert = store
        .read(|tx| tx.self_signed_cert())
        .expect("read")
        .expect("a stored certificate");
    store.close();
    cert.cert_der
}

/// Asserts that `key` no longer opens the (closed) data file, and that trying left it as
/// it was.
pub(crate) fn assert_key_refused(data: &Path, key: &MasterKey) {
    let before = std::fs::read(data).expect("read data file");
    let err = Store::open(data, key, &SystemClock).expect_err("the key must be refused");
    assert!(matches!(err, StoreError::WrongMasterKey { .. }), "{err}");
    assert!(
        same_bytes(data, &before),
        "trying a wrong key changed the data file"
    );
}

/// Whether the file at `path` holds exactly `before` (no multi-megabyte diff on failure).
fn same_bytes(path: &Path, before: &[u8]) -> bool {
    std::fs::read(path).expect("read file") == before
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).expect("metadata").mode() & 0o777
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Creates an instance with the binary (start, then SIGTERM); returns the data path.
pub(crate) fn create_instance(dir: &Path) -> PathBuf {
    let data = dir.join("gatehouse.redb");
    Server::start_ok(serve_cmd(&data)).stop_ok();
    assert!(data.exists() && key_path(&data).exists());
    data
}

// ---------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_config_start_serves_hardened_https_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("gatehouse.redb");
    let server = Server::start_ok(serve_cmd(&data));
    assert!(
        server.url.starts_with("https://127.0.0.1:"),
        "{}",
        server.url
    );
    assert_ne!(server.addr.port(), 0);
    let token = server
        .bootstrap_token
        .clone()
        .expect("a first start prints a bootstrap token");
    assert!(token.starts_with("gha_") && token.len() == 64, "{token}");
    // The next step: the admin UI, and the link that makes the first admin user.
    let has = |line: &str| server.stdout.iter().any(|l| l.trim() == line);
    let setup = format!("{}/admin/#setup={token}", server.url);
    assert!(has(&setup), "{:?}", server.stdout);
    assert!(has(&format!("admin UI: {}/admin/", server.url)));
    assert!(
        server
            .stdout
            .iter()
            .any(|l| l == &format!("admin socket: {}", socket_path(&data).display())),
        "{:?}",
        server.stdout
    );
    let socket = socket_path(&data);
    assert_eq!(mode(&socket), 0o600, "admin socket mode");
    assert_eq!(mode(&key_path(&data)), 0o600, "created key file mode");
    assert_eq!(mode(&data), 0o600, "data file mode");

    let (client, verifier) = pinned_client(&server);
    let response = client
        .get(format!("{}/healthz", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    let expect = [
        (
            "strict-transport-security",
            "max-age=63072000; includeSubDomains",
        ),
        (
            "content-security-policy",
            "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
        ),
        ("x-content-type-options", "nosniff"),
        ("x-frame-options", "DENY"),
        ("referrer-policy", "no-referrer"),
        (
            "permissions-policy",
            "accelerometer=(), camera=(), geolocation=(), gyroscope=(), magnetometer=(), \
             microphone=(), payment=(), usb=(), interest-cohort=()",
        ),
        ("cross-origin-opener-policy", "same-origin"),
        ("cross-origin-resource-policy", "same-origin"),
        ("cache-control", "no-store"),
        ("content-type", "application/json"),
    ];
    for (name, value) in expect {
        assert_eq!(
            headers.get(name).and_then(|v| v.to_str().ok()),
            Some(value),
            "header {name}"
        );
        assert_eq!(headers.get_all(name).iter().count(), 1, "{name} repeated");
    }
    let request_id = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .expect("x-request-id")
        .to_string();
    assert!(
        request_id.len() == 24 && request_id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{request_id}"
    );
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body, serde_json::json!({"status": "ok"}));
    // Each request gets its own id.
    let again = client
        .get(format!("{}/healthz", server.url))
        .send()
        .await
        .unwrap();
    assert_ne!(
        again
            .headers()
            .get("x-request-id")
            .unwrap()
            .to_str()
            .unwrap(),
        request_id
    );
    let served = verifier.seen().expect("certificate seen");

    let stopped = server.stop_ok();
    assert!(!socket.exists(), "the admin socket was left behind");
    assert!(stopped.stderr.contains("SIGTERM"), "{}", stopped.stderr);
    // The certificate it served is the one sealed in its data file.
    assert_eq!(stored_cert(&data), served);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_serves_the_same_certificate_and_no_new_bootstrap_token() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("gatehouse.redb");
    let first = Server::start_ok(serve_cmd(&data));
    assert!(first.bootstrap_token.is_some());
    let first_pin = first.pin.clone().unwrap();
    let first_cert = healthz_via_pin(&first).await;
    first.stop_ok();
    assert_eq!(stored_cert(&data), first_cert);

    let second = Server::start_ok(serve_cmd(&data));
    assert_eq!(second.pin.as_deref(), Some(first_pin.as_str()));
    assert_eq!(healthz_via_pin(&second).await, first_cert);
    // Verified the ordinary way too: the only trust anchor is the first run's certificate.
    let response = helpers::client_trusting(&first_cert)
        .get(format!("{}/healthz", second.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let stopped = second.stop_ok();
    assert!(
        !stopped
            .stdout
            .iter()
            .any(|l| l.contains("gha_") || l.contains("bootstrap")),
        "a second bootstrap token was printed: {:?}",
        stopped.stdout
    );
    assert_eq!(stored_cert(&data), first_cert);
}

#[test]
fn port_in_use_is_refused_before_any_file_is_created() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("gatehouse.redb");
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = holder.local_addr().unwrap();
    let mut cmd = gatehouse(&data);
    cmd.args(["serve", "--listen", &addr.to_string()]);
    let done = run(cmd);
    assert!(!done.status.success(), "{done:?}");
    assert!(done.stderr.contains("already in use"), "{}", done.stderr);
    assert!(done.stderr.contains(&addr.to_string()), "{}", done.stderr);
    assert!(!data.exists(), "a data file was created");
    assert_eq!(names_in(dir.path()), Vec::<String>::new());
    drop(holder);
}

#[test]
fn wrong_master_key_is_refused_and_the_data_file_is_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let data = create_instance(dir.path());
    let key = key_path(&data);
    std::fs::remove_file(&key).unwrap();
    MasterKey::generate().unwrap().write_new_file(&key).unwrap();
    assert_eq!(mode(&key), 0o600);
    let key_before = std::fs::read(&key).unwrap();
    let before = std::fs::read(&data).unwrap();
    let files_before = names_in(dir.path());

    let done = run(serve_cmd(&data));
    assert!(!done.status.success(), "{done:?}");
    assert!(done.stderr.contains("master key"), "{}", done.stderr);
    assert!(done.stderr.contains("does not open"), "{}", done.stderr);
    assert!(!done.stdout.contains("listening"), "{}", done.stdout);
    assert!(same_bytes(&data, &before), "data file changed");
    assert!(same_bytes(&key, &key_before), "key file changed");
    assert_eq!(
        names_in(dir.path()),
        files_before,
        "files appeared or vanished"
    );
}

/// Error text says each thing once and in the operator's own terms: the wrong-key hint
/// names the flag or the variable that was used; an operating-system error is not
/// repeated; a command other than `serve` prints no log line unless asked.
#[test]
fn error_text_names_what_was_used_says_things_once_and_logs_nothing_unasked() {
    let dir = tempfile::tempdir().unwrap();
    let data = create_instance(dir.path());
    let other = dir.path().join("other.key");
    MasterKey::generate()
        .unwrap()
        .write_new_file(&other)
        .unwrap();

    let mut by_flag = gatehouse(&data);
    by_flag
        .arg("--master-key-file")
        .arg(&other)
        .args(["devices", "list"]);
    let done = run(by_flag);
    assert_eq!(done.status.code(), Some(1), "{done:?}");
    assert!(done.stderr.contains("does not open"), "{}", done.stderr);
    assert!(done.stderr.contains("--master-key-file"), "{}", done.stderr);
    assert!(
        !done.stderr.contains("GATEHOUSE_MASTER_KEY_FILE"),
        "{}",
        done.stderr
    );

    let mut by_env = gatehouse(&data);
    by_env
        .env("GATEHOUSE_MASTER_KEY_FILE", &other)
        .args(["devices", "list"]);
    let done = run(by_env);
    assert!(
        done.stderr.contains("point GATEHOUSE_MASTER_KEY_FILE"),
        "{}",
        done.stderr
    );

    // An offline command on a file that needs attention: only its own answer.
    let done = run({
        let mut cmd = gatehouse(&data);
        cmd.args(["devices", "list"]);
        cmd
    });
    assert!(done.status.success(), "{done:?}");
    for level in ["INFO", "WARN", "info ", "warn "] {
        assert!(!done.stderr.contains(level), "a log line: {}", done.stderr);
    }
    let done = run({
        let mut cmd = gatehouse(&data);
        cmd.env("GATEHOUSE_LOG", "info").args(["devices", "list"]);
        cmd
    });
    assert!(
        done.stderr.contains("master key"),
        "asked for: {}",
        done.stderr
    );

    // An OS error, once.
    let missing = dir.path().join("no-such-dir").join("gatehouse.redb");
    let done = run(serve_cmd(&missing));
    assert!(!done.status.success());
    assert_eq!(
        done.stderr.matches("os error").count(),
        1,
        "{}",
        done.stderr
    );
}

/// A data file this process cannot write (a backup on read-only media, a file of another
/// user) still answers every command that only reads it, and a backup can be copied off
/// it; a command that would change it says why it cannot, and the file stays as it was.
/// Run as an unprivileged user on a file owned by root, which is how the kernel refuses
/// the write without a read-only mount.
#[test]
fn read_only_commands_work_on_a_file_that_cannot_be_written() {
    use std::os::unix::fs::{PermissionsExt, chown};
    use std::os::unix::process::CommandExt;
    if !nix_is_root() {
        eprintln!(
            "skipped read_only_commands_work_on_a_file_that_cannot_be_written: needs root to act as another user"
        );
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI runs as root"
        );
        return;
    }
    const NOBODY: u32 = 65534;
    let dir = tempfile::tempdir().unwrap();
    let data = create_instance(dir.path());
    let key = key_path(&data);
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o644)).unwrap();
    chown(&key, Some(NOBODY), Some(NOBODY)).unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    chown(&out, Some(NOBODY), Some(NOBODY)).unwrap();
    let before = std::fs::read(&data).unwrap();
    let as_nobody = |args: &[&str]| {
        let mut cmd = gatehouse(&data);
        cmd.arg("--master-key-file").arg(&key).args(args);
        cmd.uid(NOBODY).gid(NOBODY).env("HOME", &out);
        run(cmd)
    };
    for args in [
        &["admin-token", "list"][..],
        &["devices", "list"],
        &["keys", "list"],
        &["audit", "verify"],
        &["jobs", "list"],
    ] {
        let done = as_nobody(args);
        assert!(done.status.success(), "{args:?}: {done:?}");
    }
    let copy = out.join("copy.redb");
    let done = as_nobody(&["backup", copy.to_str().unwrap()]);
    assert!(done.status.success(), "{done:?}");
    assert!(copy.exists());
    let done = as_nobody(&["admin-token", "create", "--name", "x"]);
    assert_eq!(done.status.code(), Some(1), "{done:?}");
    assert!(done.stderr.contains("read-only"), "{}", done.stderr);
    assert!(same_bytes(&data, &before), "the file was not changed");
}

fn nix_is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

#[test]
fn group_readable_key_file_is_refused_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let data = create_instance(dir.path());
    let key = key_path(&data);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let before = std::fs::read(&data).unwrap();

    let done = run(serve_cmd(&data));
    assert!(!done.status.success(), "{done:?}");
    assert!(
        done.stderr
            .contains(&format!("chmod 600 {}", key.display())),
        "{}",
        done.stderr
    );
    assert!(same_bytes(&data, &before), "data file changed");
    assert_eq!(
        mode(&key),
        0o644,
        "gatehouse must not change the mode itself"
    );
    assert!(!socket_path(&data).exists());
}

#[test]
fn configuration_errors_exit_2_and_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("gatehouse.redb");
    let config = dir.path().join("gatehouse.toml");
    std::fs::write(&config, "[server]\nlisen = \"127.0.0.1:0\"\n").unwrap();

    let in_file = {
        let mut cmd = gatehouse(&data);
        cmd.arg("--config").arg(&config).arg("serve");
        cmd
    };
    let in_env = {
        let mut cmd = serve_cmd(&data);
        cmd.env("GATEHOUSE_LISTN", "127.0.0.1:0");
        cmd
    };
    let plain_http = {
        let mut cmd = gatehouse(&data);
        cmd.args(["serve", "--tls", "off", "--listen", "0.0.0.0:0"]);
        cmd
    };
    let bad_duration = {
        let mut cmd = serve_cmd(&data);
        cmd.env("GATEHOUSE_HEADER_READ_TIMEOUT", "forever");
        cmd
    };
    // (what is wrong, the command, what the error must name)
    let cases = [
        ("a misspelt key in the file", in_file, "server.lisen"),
        ("a misspelt environment variable", in_env, "GATEHOUSE_LISTN"),
        ("plain HTTP beyond loopback", plain_http, "loopback"),
        (
            "a duration that is not one",
            bad_duration,
            "GATEHOUSE_HEADER_READ_TIMEOUT",
        ),
    ];
    for (what, command, named) in cases {
        let done = run(command);
        assert_eq!(done.status.code(), Some(2), "{what}: {done:?}");
        assert!(done.stderr.contains(named), "{what}: {}", done.stderr);
    }
    assert_eq!(
        names_in(dir.path()),
        vec!["gatehouse.toml".to_string()],
        "a refused configuration created files"
    );
}

/// `gatehouse config check` validates without starting anything and names, for every
/// setting, its value and where it came from; an invalid configuration exits 2.
#[test]
fn config_check_shows_every_setting_and_its_source() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("gatehouse.redb");
    let config = dir.path().join("gatehouse.toml");
    std::fs::write(
        &config,
        "[cors]\nallow_credentials = false\n[server]\nmax_headers = 20\n",
    )
    .unwrap();
    let mut cmd = gatehouse(&data);
    cmd.arg("--config")
        .arg(&config)
        .args(["config", "check", "--json"])
        .env("GATEHOUSE_LOG", "debug");
    let done = run_ok(cmd);
    let lines: Vec<serde_json::Value> = done
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let find = |key: &str| {
        lines
            .iter()
            .find(|l| l["key"] == key)
            .unwrap_or_else(|| panic!("{key} missing: {}", done.stdout))
            .clone()
    };
    assert_eq!(lines.len(), gatehouse::config::SETTINGS.len());
    assert_eq!(find("server.max_headers")["value"], "20");
    assert!(
        find("server.max_headers")["source"]
            .as_str()
            .unwrap()
            .starts_with("config file ")
    );
    assert_eq!(find("cors.allow_credentials")["value"], "false");
    assert_eq!(
        find("log.level")["source"],
        "environment variable GATEHOUSE_LOG"
    );
    assert_eq!(find("data")["source"], "flag --data");
    assert_eq!(find("server.listen")["value"], "127.0.0.1:8443");
    assert_eq!(find("server.listen")["source"], "default");
    assert!(find("tls.domains")["value"].is_null());
    assert_eq!(
        names_in(dir.path()),
        vec!["gatehouse.toml".to_string()],
        "checking created files"
    );

    std::fs::write(&config, "[server]\nlisen = \"127.0.0.1:0\"\n").unwrap();
    let mut cmd = gatehouse(&data);
    cmd.arg("--config").arg(&config).args(["config", "check"]);
    let done = run(cmd);
    assert_eq!(done.status.code(), Some(2), "{done:?}");
    assert!(
        done.stderr.contains("did you mean `server.listen`"),
        "{}",
        done.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_off_serves_plain_http_on_loopback_without_hsts() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("gatehouse.redb");
    let mut cmd = gatehouse(&data);
    cmd.args(["serve", "--tls", "off", "--listen", "127.0.0.1:0"]);
    let server = Server::start_ok(cmd);
    assert!(
        server.url.starts_with("http://127.0.0.1:"),
        "{}",
        server.url
    );
    assert!(server.pin.is_none());
    gatehouse::tls::install_default_provider();
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let response = client
        .get(format!("{}/healthz", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response
            .headers()
            .get("strict-transport-security")
            .is_none(),
        "HSTS over plain HTTP"
    );
    assert_eq!(response.headers()["x-content-type-options"], "nosniff");
    assert_eq!(response.headers()["x-frame-options"], "DENY");
    assert!(response.headers().contains_key("x-request-id"));
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body, serde_json::json!({"status": "ok"}));
    let ready: serde_json::Value = client
        .get(format!("{}/readyz", server.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["tls"], "off");
    server.stop_ok();
}

/// A supervisor or script may send SIGTERM the moment the server says it is listening:
/// the handlers must already be installed then (they are, before `start`), or the
/// process dies without draining, leaving its socket and an unclean data file.
///
/// The test holds the server exactly between the two steps: its stderr is a pipe the
/// test pre-fills so that the "serving" log line (written after the listening line,
/// before the handlers) cannot be written until the test starts reading.
#[test]
fn sigterm_right_after_the_listening_line_stops_cleanly() {
    const PIPE_CAPACITY: usize = 65_536; // Linux default
    let dir = tempfile::tempdir().unwrap();
    let data = create_instance(dir.path());
    // A restart's stderr: where the "serving" line starts, and how long it is. Every
    // restart of this instance logs the same lines with the same lengths before it.
    let measured = Server::start_ok(serve_cmd(&data)).stop_ok().stderr;
    let mut offset = 0;
    let mut serving = None;
    for line in measured.split_inclusive('\n') {
        if line.contains("gatehouse::app: serving") {
            serving = Some((offset, line.len()));
            break;
        }
        offset += line.len();
    }
    let (before, length) = serving.unwrap_or_else(|| panic!("no serving line in:\n{measured}"));

    let (reader, writer) = std::io::pipe().unwrap();
    // Leave room for what comes before the serving line and half of that line.
    let filler = vec![b'.'; PIPE_CAPACITY - before - length / 2];
    let mut prefill = writer.try_clone().unwrap();
    let (filled, done) = mpsc::channel();
    std::thread::spawn(move || {
        let result = std::io::Write::write_all(&mut prefill, &filler);
        let _ = filled.send(result.is_ok());
    });
    assert_eq!(
        done.recv_timeout(Duration::from_secs(2)),
        Ok(true),
        "this pipe holds less than 64 KiB"
    );
    let mut cmd = serve_cmd(&data);
    cmd.stdout(Stdio::piped()).stderr(Stdio::from(writer));
    let mut child = cmd.spawn().unwrap();
    drop(cmd);
    let stdout = child.stdout.take().unwrap();
    let (send, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = send.send(line);
        }
    });
    let deadline = Instant::now() + START_DEADLINE;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(remaining) {
            Ok(line) if line.starts_with("gatehouse listening on ") => break,
            Ok(_) => {}
            Err(err) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("no listening line: {err}");
            }
        }
    }
    // The server has said it is listening; a supervisor may now stop it.
    terminate(child.id());
    let stderr = read_all(reader);
    let status = wait_until(&mut child, EXIT_DEADLINE).unwrap_or_else(|| {
        let _ = child.kill();
        child.wait().unwrap()
    });
    let stderr = stderr.join().unwrap_or_default();
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM after the listening line killed the server ({status}); stderr tail:\n{}",
        &stderr[stderr.len().saturating_sub(2000)..]
    );
}

// ---------------------------------------------------------------------------------------
// Durability across SIGKILL

impl Server {
    /// Sends SIGKILL (`Child::kill` on Unix): no drain, no clean close of the data file.
    /// Returns the exit status, which must say the process died of that signal.
    pub(crate) fn kill(mut self) -> ExitStatus {
        use std::os::unix::process::ExitStatusExt;
        self.child.kill().expect("SIGKILL");
        let status = self.child.wait().expect("wait");
        assert_eq!(status.signal(), Some(9), "not killed by SIGKILL: {status}");
        status
    }
}

/// A device as `/v1/pair` and `/v1/token` answer it.
#[derive(Debug, Clone, serde::Deserialize)]
pub(crate) struct Paired {
    pub device_id: String,
    pub access_token: String,
    pub refresh_token: String,
}

/// The HTTP API of a running binary, as the admin (bootstrap token) and as devices.
pub(crate) struct Api {
    pub client: reqwest::Client,
    pub url: String,
    pub admin: String,
}

impl Api {
    /// Trusts `server` through its printed pin.
    pub(crate) fn new(server: &Server, admin: &str) -> Self {
        Self {
            client: pinned_client(server).0,
            url: server.url.clone(),
            admin: admin.to_string(),
        }
    }

    /// Opens a pairing session as the admin and pairs a device through it.
    pub(crate) async fn pair(&self, name: &str) -> Paired {
        let response = self
            .client
            .post(format!("{}/v1/pairing/sessions", self.url))
            .bearer_auth(&self.admin)
            .json(&serde_json::json!({"name": name}))
            .send()
            .await
            .expect("POST /v1/pairing/sessions");
        assert_eq!(response.status(), 201, "pairing session");
        let session: serde_json::Value = response.json().await.expect("json");
        let response = self
            .client
            .post(format!("{}/v1/pair", self.url))
            .json(&serde_json::json!({
                "session_id": session["session_id"],
                "secret": session["secret"],
                "device": {"name": name, "platform": "ios", "app_version": "2.1.0"},
            }))
            .send()
            .await
            .expect("POST /v1/pair");
        assert_eq!(response.status(), 200, "paired");
        response.json().await.expect("token pair")
    }

    /// `/v1/introspect` as the admin.
    pub(crate) async fn introspect(&self, token: &str) -> serde_json::Value {
        let response = self
            .client
            .post(format!("{}/v1/introspect", self.url))
            .bearer_auth(&self.admin)
            .form(&[("token", token)])
            .send()
            .await
            .expect("POST /v1/introspect");
        assert_eq!(response.status(), 200, "introspection");
        response.json().await.expect("json")
    }

    /// Whether introspection calls `token` active; anything but a boolean fails.
    pub(crate) async fn active(&self, token: &str) -> bool {
        let answer = self.introspect(token).await;
        answer["active"]
            .as_bool()
            .unwrap_or_else(|| panic!("no boolean active in {answer}"))
    }

    /// `POST /v1/token` with the refresh grant: status and JSON body.
    pub(crate) async fn refresh(&self, refresh_token: &str) -> (u16, serde_json::Value) {
        let response = self
            .client
            .post(format!("{}/v1/token", self.url))
            .form(&[
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh_token),
            ])
            .send()
            .await
            .expect("POST /v1/token");
        let status = response.status().as_u16();
        (status, response.json().await.expect("json"))
    }
}

/// A fresh instance of the binary with two paired devices: the server, its API as the
/// bootstrap admin, the device the test acts on and a bystander device.
async fn instance_with_two_devices(data: &Path) -> (Server, Api, Paired, Paired) {
    let server = Server::start_ok(serve_cmd(data));
    let admin = server
        .bootstrap_token
        .clone()
        .expect("a first start prints a bootstrap token");
    let api = Api::new(&server, &admin);
    let target = api.pair("target phone").await;
    let bystander = api.pair("bystander phone").await;
    assert_ne!(target.device_id, bystander.device_id);
    for token in [
        &target.access_token,
        &target.refresh_token,
        &bystander.access_token,
        &bystander.refresh_token,
    ] {
        assert!(api.active(token).await, "a fresh token is inactive");
    }
    (server, api, target, bystander)
}

/// Restarts the binary on `data` after a SIGKILL, on the address the killed one used:
/// the default issuer (and audience) is the listen address, so a restart on another port
/// would refuse every token for that reason alone. The same admin token still works.
fn restart_after_kill(data: &Path, addr: SocketAddr, admin: &str) -> (Server, Api) {
    let mut cmd = gatehouse(data);
    cmd.args(["serve", "--listen", &addr.to_string()]);
    let server = Server::start_ok(cmd);
    assert_eq!(server.addr, addr);
    assert!(
        server.bootstrap_token.is_none(),
        "a restart printed a new bootstrap token"
    );
    let api = Api::new(&server, admin);
    (server, api)
}

/// `POST /v1/revoke` with `token` (answered 200), SIGKILL at once, restart.
async fn revoke_then_kill_and_restart(
    server: Server,
    api: Api,
    token: &str,
    data: &Path,
) -> (Server, Api) {
    let response = api
        .client
        .post(format!("{}/v1/revoke", api.url))
        .form(&[("token", token)])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let addr = server.addr;
    server.kill();
    restart_after_kill(data, addr, &api.admin)
}

/// Stops the restarted server and checks that it had found the file not closed cleanly,
/// so the kill really happened before any orderly close.
fn stop_after_recovery(server: Server) {
    let stopped = server.stop_ok();
    assert!(
        stopped.stderr.contains("not closed cleanly"),
        "the restart did not see an unclean data file; stderr:\n{}",
        stopped.stderr
    );
}

/// RFC 7009 revocation of an access token is durable when the 200 arrives: SIGKILL at
/// once, restart, and the token is inactive while another device's token is active.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_access_token_stays_revoked_after_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("gatehouse.redb");
    let (server, api, target, bystander) = instance_with_two_devices(&data).await;

    let (server, api) =
        revoke_then_kill_and_restart(server, api, &target.access_token, &data).await;
    assert_eq!(
        api.introspect(&target.access_token).await,
        serde_json::json!({"active": false})
    );
    assert!(
        api.active(&bystander.access_token).await,
        "another device's token must still be active (introspection works)"
    );
    // Only the access token was revoked: the device's refresh token still works.
    assert!(api.active(&target.refresh_token).await);
    stop_after_recovery(server);
}

/// A refresh token sent to `/v1/revoke` revokes its family through the revocation journal,
/// durable when the answer arrives: after SIGKILL and a restart (no fold ran) the family's
/// tokens are refused, another device's are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_family_stays_revoked_after_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("gatehouse.redb");
    let (server, api, target, bystander) = instance_with_two_devices(&data).await;

    let (server, api) =
        revoke_then_kill_and_restart(server, api, &target.refresh_token, &data).await;
    for token in [&target.access_token, &target.refresh_token] {
        assert_eq!(
            api.introspect(token).await,
            serde_json::json!({"active": false})
        );
    }
    let (status, body) = api.refresh(&target.refresh_token).await;
    assert_eq!((status, &body["error"]), (400, &"invalid_grant".into()));
    assert!(api.active(&bystander.refresh_token).await);
    stop_after_recovery(server);
}

/// `DELETE /v1/devices/{id}` is durable when its answer arrives: after SIGKILL and a
/// restart the device's tokens are refused, another device's are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_device_stays_revoked_after_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("gatehouse.redb");
    let (server, api, target, bystander) = instance_with_two_devices(&data).await;

    let response = api
        .client
        .delete(format!("{}/v1/devices/{}", api.url, target.device_id))
        .bearer_auth(&api.admin)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let addr = server.addr;
    server.kill();

    let (server, api) = restart_after_kill(&data, addr, &api.admin);
    assert_eq!(
        api.introspect(&target.access_token).await,
        serde_json::json!({"active": false})
    );
    assert_eq!(
        api.introspect(&target.refresh_token).await,
        serde_json::json!({"active": false})
    );
    let (status, body) = api.refresh(&target.refresh_token).await;
    assert_eq!((status, &body["error"]), (400, &"invalid_grant".into()));
    let device: serde_json::Value = api
        .client
        .get(format!("{}/v1/devices/{}", api.url, target.device_id))
        .bearer_auth(&api.admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(device["status"], "revoked", "{device}");
    assert!(api.active(&bystander.access_token).await);
    assert!(api.active(&bystander.refresh_token).await);
    stop_after_recovery(server);
}

/// Presenting a spent refresh token revokes its family, durably before the
/// `invalid_grant` answer: after SIGKILL and a restart the family's newest refresh token
/// and access token are still refused, another device's are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_token_reuse_stays_detected_after_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("gatehouse.redb");
    let (server, api, target, bystander) = instance_with_two_devices(&data).await;

    let (status, body) = api.refresh(&target.refresh_token).await;
    assert_eq!(status, 200, "{body}");
    let newest: Paired = serde_json::from_value(body).unwrap();
    assert_eq!(newest.device_id, target.device_id);
    assert!(api.active(&newest.refresh_token).await);
    assert!(api.active(&newest.access_token).await);
    assert!(
        !api.active(&target.refresh_token).await,
        "a spent token is not active"
    );

    let (status, body) = api.refresh(&target.refresh_token).await;
    assert_eq!((status, &body["error"]), (400, &"invalid_grant".into()));
    let addr = server.addr;
    server.kill();

    let (server, api) = restart_after_kill(&data, addr, &api.admin);
    let (status, body) = api.refresh(&newest.refresh_token).await;
    assert_eq!(
        (status, &body["error"]),
        (400, &"invalid_grant".into()),
        "the family's newest refresh token was accepted after the restart: {body}"
    );
    assert_eq!(
        api.introspect(&newest.access_token).await,
        serde_json::json!({"active": false})
    );
    assert!(api.active(&bystander.access_token).await);
    let (status, _) = api.refresh(&bystander.refresh_token).await;
    assert_eq!(status, 200, "another device's family still refreshes");
    stop_after_recovery(server);
}
