//! What the benchmarks that talk to a real `gatehouse serve` over TLS share: the server,
//! started on a temporary data file, and a client configuration that accepts its
//! self-signed certificate.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use gatehouse::audit::{self, Actor, Event, Origin};
use gatehouse::ids::{DeviceId, FamilyId};
use gatehouse::store::records::Device;
use gatehouse::store::{DEVICES, StoreError};
use gatehouse::tokens::NewFamily;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// Loopback benchmark client: accepts the server's self-signed certificate without
/// checking it (these benchmarks measure the server, not trust), but still checks
/// handshake signatures.
#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
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
            &self.0.signature_verification_algorithms,
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
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

pub(crate) fn tls_config(alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let provider = gatehouse::tls::provider();
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// A running `gatehouse serve` (the binary of this build), stopped when dropped.
pub(crate) struct Server {
    pub(crate) child: Child,
    pub(crate) addr: SocketAddr,
    /// The bootstrap admin token it printed.
    pub(crate) admin_token: String,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `gatehouse serve` on loopback (a free port, self-signed TLS) with `args` after
/// `serve` and the settings in `env`; returns once it listens.
pub(crate) fn start_server(args: &[String], env: &[(&str, String)]) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_gatehouse"))
        .args(["--data"])
        .arg(dir.path().join("gatehouse.redb"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(args)
        .env("GATEHOUSE_LOG", "warn")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut admin_token = None;
    let addr = loop {
        let line = lines.next().expect("server output").unwrap();
        if let Some(token) = line.trim().strip_prefix("gha_") {
            admin_token = Some(format!("gha_{token}"));
        }
        if let Some(url) = line.strip_prefix("gatehouse listening on https://") {
            break url.parse().unwrap();
        }
    };
    // Keep draining stdout so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Server {
        child,
        addr,
        admin_token: admin_token.expect("bootstrap token"),
        _dir: dir,
    }
}

// ---------------------------------------------------------------------------------------
// What a bench reads of a process and of the machine. Each bench uses a part of it.

/// `name` from the environment, parsed, or `default`.
#[allow(dead_code)]
pub(crate) fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A value in kB of `/proc/<pid>/status` (`VmRSS:` and the like).
#[allow(dead_code)]
pub(crate) fn proc_status(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(key)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// User + system CPU time of `pid` so far, in seconds.
#[allow(dead_code)]
pub(crate) fn cpu_seconds(pid: u32) -> f64 {
    stat_cpu_seconds(&std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap())
}

/// User + system CPU time so far of the first thread of `pid` whose name starts with
/// `name` (the kernel cuts names to 15 bytes), in seconds; 0 if there is none.
#[allow(dead_code)]
pub(crate) fn thread_cpu_seconds(pid: u32, name: &str) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("stat")).ok())
        .find(|stat| {
            stat.find('(')
                .zip(stat.rfind(')'))
                .is_some_and(|(open, close)| stat[open + 1..close].starts_with(name))
        })
        .map_or(0.0, |stat| stat_cpu_seconds(&stat))
}

/// utime + stime of a `stat` line, in seconds.
fn stat_cpu_seconds(stat: &str) -> f64 {
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 of the rest.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / clock_ticks_per_second()
}

fn clock_ticks_per_second() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// The three load averages.
#[allow(dead_code)]
pub(crate) fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Waits (at most 90 s) for the 1-minute load average to fall under 1, so that a build
/// or another run does not weigh on the measurement; returns the load average then.
#[allow(dead_code)]
pub(crate) fn settle() -> String {
    for _ in 0..18 {
        let one: f64 = load_average()
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        if one < 1.0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_secs(5));
    }
    load_average()
}

/// Open descriptors of `pid`.
#[allow(dead_code)]
pub(crate) fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The soft and hard limits on open files of this process.
#[allow(dead_code)]
pub(crate) fn nofile_limits() -> (u64, u64) {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let mut values = line["Max open files".len()..]
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(u64::MAX));
    (values.next().unwrap(), values.next().unwrap())
}

/// Token families written per write job by `create_families`.
const PREPARE_BATCH: usize = 1_000;

/// Writes `count` families the way pairing does (device, family, refresh token and the
/// `token.issued` record), `PREPARE_BATCH` per durable write job, a few jobs in flight.
/// Returns each family's device, family id and refresh token.
#[allow(dead_code)]
pub(crate) async fn create_families(
    running: &gatehouse::app::Running,
    count: usize,
) -> Vec<(DeviceId, FamilyId, String)> {
    let services = &running.services;
    let mut tokens = Vec::with_capacity(count);
    let mut jobs = tokio::task::JoinSet::new();
    let mut left = count;
    while left > 0 {
        let n = left.min(PREPARE_BATCH);
        left -= n;
        let batch: Vec<(DeviceId, NewFamily)> = (0..n)
            .map(|_| {
                (
                    DeviceId::generate().unwrap(),
                    NewFamily::generate().unwrap(),
                )
            })
            .collect();
        tokens.extend(
            batch
                .iter()
                .map(|(d, f)| (*d, f.family, f.refresh.as_str().to_string())),
        );
        let (store, authority) = (services.store.clone(), services.tokens.clone());
        let now = services.clock.now_ms();
        jobs.spawn(async move {
            store
                .write(move |tx| {
                    for (device, family) in &batch {
                        let record = Device {
                            name: "bench".into(),
                            platform: "linux".into(),
                            app_version: "1".into(),
                            created_at_ms: now,
                            last_seen_ms: now,
                            paired_from: "127.0.0.1".into(),
                            pairing_session: "ps_bench".into(),
                            revoked_at_ms: None,
                        };
                        tx.put(&DEVICES, &device.to_string(), &record)?;
                        authority.write_family_in(tx, family, device, now)?;
                        let event = Event::new("token.issued")
                            .device(device)
                            .detail("family", family.family.to_string())
                            .detail("grant", "bench");
                        let origin = Origin::operator().as_actor(Actor::Device(device.to_string()));
                        audit::append(tx, &origin, &event, now)?;
                    }
                    Ok::<_, StoreError>(())
                })
                .await
                .unwrap();
        });
        if jobs.len() >= 4 {
            jobs.join_next().await.unwrap().unwrap();
        }
    }
    jobs.join_all().await;
    tokens
}

/// The `p` quantile of sorted samples.
#[allow(dead_code)]
pub(crate) fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let at = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[at]
}

/// A reqwest client with one kept-alive HTTP/1.1 connection that accepts the server's
/// self-signed certificate (`tls_config`).
#[allow(dead_code)]
pub(crate) fn loopback_client() -> reqwest::Client {
    reqwest::Client::builder()
        .tls_backend_preconfigured((*tls_config(&[b"http/1.1"])).clone())
        .pool_max_idle_per_host(1)
        .build()
        .unwrap()
}

/// A reqwest client with one trust anchor, the server's certificate, speaking HTTP/1.1
/// over one kept-alive connection.
#[allow(dead_code)]
pub(crate) fn client(cert_der: &[u8]) -> reqwest::Client {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(cert_der.to_vec()))
        .unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(gatehouse::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .pool_max_idle_per_host(1)
        .build()
        .unwrap()
}

/// Pairs `count` devices the way devices pair, over `client` to the server at `base`:
/// an admin (`admin`) opens a session, the device claims it. Each device's answer to
/// `POST /v1/pair` (its id and tokens).
#[allow(dead_code)]
pub(crate) async fn pair_devices(
    client: &reqwest::Client,
    base: &str,
    admin: &str,
    count: usize,
) -> Vec<serde_json::Value> {
    let mut paired = Vec::with_capacity(count);
    for i in 0..count {
        let session: serde_json::Value = client
            .post(format!("{base}/v1/pairing/sessions"))
            .bearer_auth(admin)
            .json(&serde_json::json!({}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let response = client
            .post(format!("{base}/v1/pair"))
            .json(&serde_json::json!({
                "session_id": session["session_id"],
                "secret": session["secret"],
                "device": {"name": format!("bench {i}"), "platform": "linux", "app_version": "1"},
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        paired.push(response.json().await.unwrap());
    }
    paired
}
