//! TLS handshakes per second on loopback: gatehouse beside Caddy, in the same run.
//!
//! Starts the real `gatehouse` binary (zero configuration: a self-signed ECDSA P-256
//! certificate kept in a data file in a temporary directory, the per-address request
//! limit off because every connection comes from 127.0.0.1) and `caddy` (a Caddyfile
//! with automatic HTTPS and the admin endpoint off, TLS 1.2 and 1.3, HTTP/1.1 and
//! HTTP/2, an ECDSA P-256 certificate made here with rcgen, answering `/healthz` with the
//! same JSON body as gatehouse). Each server's certificate is the client's only trust
//! anchor for that server.
//!
//! The client is rustls on ring, TLS 1.3 with X25519 only, on a tokio runtime in this
//! process, running `LOOPS` connection loops at once. Every handshake is followed by one
//! `GET /healthz` (HTTP/1.1, `Connection: close`) and counts only when the answer starts
//! `HTTP/1.1 200` and the server has closed the connection. Two kinds of run:
//!
//! - full: one client configuration with resumption disabled;
//! - resumed: one configuration with an in-memory session cache per loop; a handshake
//!   counts only when rustls reports it resumed, and the resumed share is printed.
//!
//! Client and servers share the machine's cores, so the servers are measured in turns
//! (gatehouse then Caddy, Caddy then gatehouse in the next round) and the report gives
//! medians over rounds, with each server's CPU time per handshake (from `/proc`) beside
//! its rate: that figure does not depend on how the cores were shared.
//!
//! Run: `cargo bench --bench tls_handshake` (`TLS_HANDSHAKE_LOOPS`, `TLS_HANDSHAKE_SECONDS`
//! and `TLS_HANDSHAKE_ROUNDS` override 16 loops, 5 s measured after 1 s of warm-up, and 5
//! rounds; `CADDY` names another caddy binary). Under `cargo test` it runs one short round
//! with 2 loops. Without caddy it measures gatehouse alone and says why, except with
//! `CI=true`, where a missing caddy fails the run.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
// A bench reads its sizes from the environment and may time against the real clock.
#![allow(clippy::disallowed_methods)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::client::Resumption;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, HandshakeKind, RootCertStore, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsConnector;

/// The name both certificates carry and the client asks for (SNI and `Host`).
const HOST: &str = "localhost";
const REQUEST: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
/// A handshake and its request that take longer than this count as an error.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy)]
struct Settings {
    loops: usize,
    warmup: Duration,
    measure: Duration,
    rounds: usize,
}

impl Settings {
    fn from_env(benching: bool) -> Self {
        fn var<T: std::str::FromStr>(name: &str) -> Option<T> {
            std::env::var(name).ok().and_then(|v| v.parse().ok())
        }
        if !benching {
            return Self {
                loops: 2,
                warmup: Duration::from_millis(100),
                measure: Duration::from_millis(300),
                rounds: 1,
            };
        }
        Self {
            loops: var("TLS_HANDSHAKE_LOOPS").unwrap_or(16),
            warmup: Duration::from_secs(1),
            measure: Duration::from_secs_f64(var("TLS_HANDSHAKE_SECONDS").unwrap_or(5.0)),
            rounds: var("TLS_HANDSHAKE_ROUNDS").unwrap_or(5),
        }
    }
}

/// Which handshakes a run makes and counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Full,
    Resumed,
}

/// A running server the client measures.
struct Target {
    name: String,
    addr: SocketAddr,
    pid: u32,
    cert: CertificateDer<'static>,
    child: Child,
    /// Holds the server's files until the server is stopped.
    dir: tempfile::TempDir,
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider.kx_groups = vec![rustls::crypto::ring::kx_group::X25519];
    Arc::new(provider)
}

/// TLS 1.3 and X25519 only, trusting exactly `cert`.
fn client_config(cert: &CertificateDer<'static>, mode: Mode) -> Arc<rustls::ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(cert.clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.resumption = match mode {
        Mode::Full => Resumption::disabled(),
        Mode::Resumed => Resumption::in_memory_sessions(64),
    };
    Arc::new(config)
}

/// Accepts any certificate once, to learn which one a server presents; handshake
/// signatures are still checked.
#[derive(Debug)]
struct Capture {
    provider: Arc<rustls::crypto::CryptoProvider>,
    seen: Mutex<Option<CertificateDer<'static>>>,
}

impl ServerCertVerifier for Capture {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        *self.seen.lock().unwrap() = Some(end_entity.clone().into_owned());
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The certificate `addr` serves, from one handshake that trusts anything.
async fn served_certificate(addr: SocketAddr) -> std::io::Result<CertificateDer<'static>> {
    let capture = Arc::new(Capture {
        provider: provider(),
        seen: Mutex::new(None),
    });
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(capture.clone())
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = ServerName::try_from(HOST).unwrap();
    let tls = TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await?;
    drop(tls);
    let seen = capture.seen.lock().unwrap().take();
    seen.ok_or_else(|| std::io::Error::other("no certificate seen"))
}

/// One connection: TCP, the TLS handshake, `GET /healthz`, the whole answer up to the
/// server's close. Returns how the handshake went and the negotiated suite.
async fn one_connection(
    connector: &TlsConnector,
    addr: SocketAddr,
) -> std::io::Result<(HandshakeKind, rustls::SupportedCipherSuite)> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from(HOST).unwrap();
    let mut tls = connector.connect(name, tcp).await?;
    let (_, conn) = tls.get_ref();
    let kind = conn
        .handshake_kind()
        .ok_or_else(|| std::io::Error::other("handshake not finished"))?;
    let suite = conn
        .negotiated_cipher_suite()
        .ok_or_else(|| std::io::Error::other("no cipher suite"))?;
    tls.write_all(REQUEST).await?;
    let mut answer = Vec::with_capacity(1024);
    let mut buf = [0u8; 2048];
    loop {
        match tls.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            // A close without close_notify once the answer is in is still a complete answer.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !answer.is_empty() => {
                break;
            }
            Err(e) => return Err(e),
        }
    }
    if !answer.starts_with(b"HTTP/1.1 200 ") {
        let head = String::from_utf8_lossy(&answer[..answer.len().min(120)]).into_owned();
        return Err(std::io::Error::other(format!(
            "unexpected answer: {head:?}"
        )));
    }
    Ok((kind, suite))
}

/// What one run of one server measured.
#[derive(Debug, Clone)]
struct Sample {
    /// Handshakes of the wanted kind completed inside the measured window.
    counted: u64,
    /// Every handshake completed inside the window.
    completed: u64,
    errors: u64,
    first_error: Option<String>,
    per_second: f64,
    /// Server CPU time (user + system) per completed handshake, microseconds.
    server_cpu_us: f64,
    /// This process's CPU time per completed handshake, microseconds.
    client_cpu_us: f64,
    /// CPU used meanwhile by everything else on the machine, in cores.
    other_cores: f64,
    suite: Option<String>,
}

impl Sample {
    fn resumed_share(&self) -> f64 {
        if self.completed == 0 {
            0.0
        } else {
            self.counted as f64 / self.completed as f64
        }
    }
}

#[derive(Debug, Default)]
struct LoopCount {
    counted: u64,
    completed: u64,
    errors: u64,
    first_error: Option<String>,
    suite: Option<String>,
}

fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// User + system CPU time of a process so far, seconds.
fn cpu_seconds(pid: &str, ticks: f64) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let utime: f64 = fields[11].parse().unwrap();
    let stime: f64 = fields[12].parse().unwrap();
    (utime + stime) / ticks
}

/// Busy CPU time of the whole machine so far (everything but idle and I/O wait), seconds.
fn machine_busy_seconds(ticks: f64) -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let line = stat.lines().next().unwrap();
    let fields: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let busy: f64 = fields.iter().take(8).sum::<f64>() - fields[3] - fields[4];
    busy / ticks
}

async fn run_loop(
    connector: TlsConnector,
    addr: SocketAddr,
    mode: Mode,
    start: Instant,
    end: Instant,
) -> LoopCount {
    let mut count = LoopCount::default();
    while Instant::now() < end {
        let result = tokio::time::timeout(CONNECTION_DEADLINE, one_connection(&connector, addr))
            .await
            .unwrap_or_else(|_| Err(std::io::Error::other("timed out")));
        let done = Instant::now();
        if done < start || done > end {
            continue;
        }
        match result {
            Ok((kind, suite)) => {
                count.completed += 1;
                let wanted = match mode {
                    Mode::Full => kind == HandshakeKind::Full,
                    Mode::Resumed => kind == HandshakeKind::Resumed,
                };
                if wanted {
                    count.counted += 1;
                }
                if count.suite.is_none() {
                    count.suite = Some(format!("{:?}", suite.suite()));
                }
            }
            Err(e) => {
                count.errors += 1;
                count.first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    count
}

async fn measure(target: &Target, mode: Mode, settings: Settings, ticks: f64) -> Sample {
    let shared = client_config(&target.cert, Mode::Full);
    let begin = Instant::now();
    let start = begin + settings.warmup;
    let end = start + settings.measure;
    let mut loops = tokio::task::JoinSet::new();
    for _ in 0..settings.loops {
        // Resumed runs: a session cache per loop, as one client each.
        let config = match mode {
            Mode::Full => shared.clone(),
            Mode::Resumed => client_config(&target.cert, Mode::Resumed),
        };
        loops.spawn(run_loop(
            TlsConnector::from(config),
            target.addr,
            mode,
            start,
            end,
        ));
    }
    tokio::time::sleep_until(start.into()).await;
    let server_pid = target.pid.to_string();
    let (server_before, client_before, machine_before) = (
        cpu_seconds(&server_pid, ticks),
        cpu_seconds("self", ticks),
        machine_busy_seconds(ticks),
    );
    tokio::time::sleep_until(end.into()).await;
    let (server_after, client_after, machine_after) = (
        cpu_seconds(&server_pid, ticks),
        cpu_seconds("self", ticks),
        machine_busy_seconds(ticks),
    );
    let mut total = LoopCount::default();
    while let Some(count) = loops.join_next().await {
        let count = count.unwrap();
        total.counted += count.counted;
        total.completed += count.completed;
        total.errors += count.errors;
        if total.first_error.is_none() {
            total.first_error = count.first_error;
        }
        if total.suite.is_none() {
            total.suite = count.suite;
        }
    }
    let per_handshake = |seconds: f64| seconds * 1e6 / total.completed.max(1) as f64;
    Sample {
        counted: total.counted,
        completed: total.completed,
        errors: total.errors,
        first_error: total.first_error,
        per_second: total.counted as f64 / settings.measure.as_secs_f64(),
        server_cpu_us: per_handshake(server_after - server_before),
        client_cpu_us: per_handshake(client_after - client_before),
        other_cores: ((machine_after - machine_before)
            - (server_after - server_before)
            - (client_after - client_before))
            .max(0.0)
            / settings.measure.as_secs_f64(),
        suite: total.suite,
    }
}

async fn start_gatehouse() -> Target {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_gatehouse"))
        .arg("--data")
        .arg(dir.path().join("gatehouse.redb"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("GATEHOUSE_LOG", "warn")
        // Every connection comes from 127.0.0.1: the per-address budget (6000 requests a
        // minute) would answer 429 within the first second.
        .env("GATEHOUSE_RATELIMIT_PER_IP", "off")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr: SocketAddr = loop {
        let line = lines.next().expect("gatehouse output").unwrap();
        if let Some(url) = line.strip_prefix("gatehouse listening on https://") {
            break url.parse().unwrap();
        }
    };
    // Keep draining stdout so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    let pid = child.id();
    Target {
        name: "gatehouse".into(),
        addr,
        pid,
        cert: served_certificate(addr).await.unwrap(),
        child,
        dir,
    }
}

/// The caddy binary, its version, or why there is none.
fn find_caddy() -> Result<(PathBuf, String), String> {
    let bin = PathBuf::from(std::env::var("CADDY").unwrap_or_else(|_| "caddy".into()));
    match Command::new(&bin).arg("version").output() {
        Ok(out) if out.status.success() => {
            let version = String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .next()
                .unwrap_or("?")
                .to_string();
            Ok((bin, version))
        }
        Ok(out) => Err(format!(
            "`{} version` failed: {}",
            bin.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Err(format!(
            "cannot run `{}` ({e}); install the Debian package caddy",
            bin.display()
        )),
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// PEM text of DER bytes (rcgen is built without its PEM feature).
fn pem(label: &str, der: &[u8]) -> String {
    let base64 = data_encoding::BASE64.encode(der);
    let mut text = format!("-----BEGIN {label}-----\n");
    for line in base64.as_bytes().chunks(64) {
        text.push_str(std::str::from_utf8(line).unwrap());
        text.push('\n');
    }
    text.push_str(&format!("-----END {label}-----\n"));
    text
}

fn write_caddy_files(dir: &Path, port: u16) -> CertificateDer<'static> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params =
        rcgen::CertificateParams::new(vec![HOST.to_string(), "127.0.0.1".to_string()]).unwrap();
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, "caddy bench self-signed");
    params.distinguished_name = dn;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - Duration::from_secs(3600);
    params.not_after = now + Duration::from_secs(30 * 24 * 3600);
    let cert = params.self_signed(&key).unwrap();
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, pem("CERTIFICATE", cert.der())).unwrap();
    std::fs::write(&key_path, pem("PRIVATE KEY", &key.serialize_der())).unwrap();
    let caddyfile = format!(
        "{{
\tadmin off
\tauto_https off
\tservers {{
\t\tprotocols h1 h2
\t}}
}}
https://{HOST}:{port} {{
\tbind 127.0.0.1
\ttls {cert} {key} {{
\t\tprotocols tls1.2 tls1.3
\t}}
\theader /healthz Content-Type application/json
\trespond /healthz `{{\"status\":\"ok\"}}` 200
}}
",
        cert = cert_path.display(),
        key = key_path.display(),
    );
    std::fs::write(dir.join("Caddyfile"), caddyfile).unwrap();
    cert.der().clone()
}

async fn start_caddy(bin: &Path, version: &str) -> Target {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cert = write_caddy_files(dir.path(), port);
    let log = std::fs::File::create(dir.path().join("caddy.log")).unwrap();
    // Caddy's storage and autosaved configuration go to the temporary directory too.
    let child = Command::new(bin)
        .args(["run", "--adapter", "caddyfile", "--config"])
        .arg(dir.path().join("Caddyfile"))
        .env("HOME", dir.path())
        .env("XDG_DATA_HOME", dir.path().join("data"))
        .env("XDG_CONFIG_HOME", dir.path().join("config"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut target = Target {
        name: format!("caddy {version}"),
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        pid,
        cert,
        child,
        dir,
    };
    let connector = TlsConnector::from(client_config(&target.cert, Mode::Full));
    let started = Instant::now();
    loop {
        if one_connection(&connector, target.addr).await.is_ok() {
            return target;
        }
        let exited = target.child.try_wait().unwrap();
        if exited.is_some() || started.elapsed() > Duration::from_secs(10) {
            let log =
                std::fs::read_to_string(target.dir.path().join("caddy.log")).unwrap_or_default();
            panic!("caddy did not start serving (exit: {exited:?}); its log:\n{log}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        values[n / 2]
    } else {
        f64::midpoint(values[n / 2 - 1], values[n / 2])
    }
}

/// Medians of one server's samples.
#[derive(Debug, Clone, Copy)]
struct Summary {
    full: f64,
    resumed: f64,
    resumed_share: f64,
    full_cpu: f64,
    resumed_cpu: f64,
    full_client_cpu: f64,
}

fn summarise(full: &[Sample], resumed: &[Sample]) -> Summary {
    let pick = |samples: &[Sample], f: fn(&Sample) -> f64| {
        median(&mut samples.iter().map(f).collect::<Vec<_>>())
    };
    Summary {
        full: pick(full, |s| s.per_second),
        resumed: pick(resumed, |s| s.per_second),
        resumed_share: pick(resumed, Sample::resumed_share),
        full_cpu: pick(full, |s| s.server_cpu_us),
        resumed_cpu: pick(resumed, |s| s.server_cpu_us),
        full_client_cpu: pick(full, |s| s.client_cpu_us),
    }
}

/// The 1-, 5- and 15-minute load averages.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn main() {
    let benching = std::env::args().any(|a| a == "--bench");
    let settings = Settings::from_env(benching);
    let in_ci = std::env::var("CI").as_deref() == Ok("true");
    let caddy = match find_caddy() {
        Ok(found) => Some(found),
        Err(reason) if in_ci => panic!("tls_handshake needs caddy in CI: {reason}"),
        Err(reason) => {
            println!("tls_handshake: measuring gatehouse alone, no comparison: {reason}");
            None
        }
    };
    let ticks = clock_ticks_per_second();
    let load_before = load_average();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut targets = Vec::new();
        targets.push(start_gatehouse().await);
        if let Some((bin, version)) = &caddy {
            targets.push(start_caddy(bin, version).await);
        }
        println!(
            "tls_handshake: {} loops, {:.1} s warm-up + {:.1} s measured per run, {} round(s); \
             client and servers share {} core(s), so the servers run in turns (order \
             alternates each round) and figures are medians over rounds",
            settings.loops,
            settings.warmup.as_secs_f64(),
            settings.measure.as_secs_f64(),
            settings.rounds,
            std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        );
        // samples[target][mode]
        let mut samples: Vec<[Vec<Sample>; 2]> =
            targets.iter().map(|_| Default::default()).collect();
        for round in 0..settings.rounds {
            let mut order: Vec<usize> = (0..targets.len()).collect();
            if round % 2 == 1 {
                order.reverse();
            }
            for (m, mode) in [Mode::Full, Mode::Resumed].into_iter().enumerate() {
                for &t in &order {
                    let target = &targets[t];
                    let sample = measure(target, mode, settings, ticks).await;
                    println!(
                        "round {} {:<9} {:<12} {:>8.0}/s  ({} of {} handshakes {}, {} errors{}), \
                         server CPU {:.0} µs, client CPU {:.0} µs per handshake, \
                         other processes {:.2} cores, {}",
                        round + 1,
                        format!("{mode:?}").to_lowercase(),
                        target.name,
                        sample.per_second,
                        sample.counted,
                        sample.completed,
                        if mode == Mode::Full {
                            "full"
                        } else {
                            "resumed"
                        },
                        sample.errors,
                        sample
                            .first_error
                            .as_deref()
                            .map(|e| format!("; first: {e}"))
                            .unwrap_or_default(),
                        sample.server_cpu_us,
                        sample.client_cpu_us,
                        sample.other_cores,
                        sample.suite.as_deref().unwrap_or("-"),
                    );
                    samples[t][m].push(sample);
                }
            }
        }
        println!(
            "load average before: {load_before}; after: {}",
            load_average()
        );
        report(&targets, &samples);
        if !benching {
            for (target, [full, resumed]) in targets.iter().zip(&samples) {
                for sample in full.iter().chain(resumed) {
                    assert_eq!(
                        sample.errors, 0,
                        "{}: {:?}",
                        target.name, sample.first_error
                    );
                }
                assert!(
                    full.iter().all(|s| s.counted > 0),
                    "{}: no full handshake",
                    target.name
                );
            }
        }
    });
}

fn report(targets: &[Target], samples: &[[Vec<Sample>; 2]]) {
    let summaries: Vec<Summary> = samples
        .iter()
        .map(|[full, resumed]| summarise(full, resumed))
        .collect();
    println!();
    println!(
        "| server | full handshakes/s | resumed handshakes/s | resumed share | server CPU per full | per resumed | client CPU per full |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (target, s) in targets.iter().zip(&summaries) {
        println!(
            "| {} | {:.0} | {:.0} | {:.1} % | {:.0} µs | {:.0} µs | {:.0} µs |",
            target.name,
            s.full,
            s.resumed,
            s.resumed_share * 100.0,
            s.full_cpu,
            s.resumed_cpu,
            s.full_client_cpu,
        );
    }
    if let ([ours, theirs], [[our_full, our_resumed], [their_full, their_resumed]]) =
        (summaries.as_slice(), samples)
    {
        let ratio = |a: f64, b: f64| {
            if b > 0.0 {
                format!("{:.2}", a / b)
            } else {
                "-".into()
            }
        };
        // The same ratio taken within each round, where both runs were seconds apart.
        let paired = |ours: &[Sample], theirs: &[Sample], f: fn(&Sample) -> f64| {
            let mut ratios: Vec<f64> = ours
                .iter()
                .zip(theirs)
                .filter(|(_, t)| f(t) > 0.0)
                .map(|(o, t)| f(o) / f(t))
                .collect();
            if ratios.is_empty() {
                "-".into()
            } else {
                format!("{:.2}", median(&mut ratios))
            }
        };
        println!(
            "| gatehouse / caddy, of medians | {} | {} | | {} | {} | |",
            ratio(ours.full, theirs.full),
            ratio(ours.resumed, theirs.resumed),
            ratio(ours.full_cpu, theirs.full_cpu),
            ratio(ours.resumed_cpu, theirs.resumed_cpu),
        );
        let rate = |s: &Sample| s.per_second;
        let cpu = |s: &Sample| s.server_cpu_us;
        println!(
            "| gatehouse / caddy, median of rounds | {} | {} | | {} | {} | |",
            paired(our_full, their_full, rate),
            paired(our_resumed, their_resumed, rate),
            paired(our_full, their_full, cpu),
            paired(our_resumed, their_resumed, cpu),
        );
        println!();
        println!(
            "Rates are medians over rounds; a rate ratio above 1 means gatehouse completed more \
             handshakes per second. CPU ratios below 1 mean gatehouse spent less CPU per handshake."
        );
    }
    let busiest = samples
        .iter()
        .flatten()
        .flatten()
        .map(|s| s.other_cores)
        .fold(0.0, f64::max);
    if busiest > 0.2 {
        println!(
            "Other processes used up to {busiest:.2} cores during a run: the rates are disturbed \
             (CPU per handshake much less so); rerun on an idle machine."
        );
    }
    if summaries.first().is_some_and(|s| s.resumed_share == 0.0) {
        println!(
            "gatehouse resumed no handshake: its server configuration issues no usable ticket"
        );
    }
}
