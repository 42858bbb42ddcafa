//! `gatehouse doctor`: checks what a first start or a failing renewal usually trips on,
//! and says what to do. Each line is `ok`, `warn` or `FAIL`; any failure makes the exit
//! status non-zero.
//!
//! Checks: the master key and data file (present, private), the clock, whether a server
//! runs and the ports are free or held by it, TLS (mode, issuer, names, expiry, and the
//! ACME state of a running server), and DNS (whether each domain resolves to an address
//! of this host).

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::Duration;

use crate::clock::{Clock, SystemClock, format_rfc3339};
use crate::config::{Config, KeyOrigin, TlsMode};
use crate::manage::{Command, Outcome};
use crate::tls::{CertInfo, TlsStatus};

use super::Session;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Level {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug, Default)]
struct Report {
    failures: usize,
}

impl Report {
    fn line(&mut self, level: Level, topic: &str, text: impl AsRef<str>) {
        let tag = match level {
            Level::Ok => "ok  ",
            Level::Warn => "warn",
            Level::Fail => {
                self.failures += 1;
                "FAIL"
            }
        };
        println!("{tag}  {topic:<10} {}", text.as_ref());
    }
}

const DAY_MS: u64 = 24 * 3600 * 1000;
/// 2024-01-01: a clock before this is wrong (certificates and tokens would be refused).
const EARLIEST_SANE_MS: u64 = 1_704_067_200_000;

pub(super) async fn doctor(config: &Config) -> anyhow::Result<()> {
    let mut report = Report::default();
    let now = SystemClock.now_ms();
    files(&mut report, config);
    let database_ready = database(&mut report, config).await;
    if now < EARLIEST_SANE_MS {
        report.line(
            Level::Fail,
            "clock",
            format!(
                "the system clock says {}: set it (timedatectl set-ntp true)",
                format_rfc3339(now)
            ),
        );
    } else {
        report.line(Level::Ok, "clock", format!("{} (UTC)", format_rfc3339(now)));
    }

    let mut session = Session::new(config);
    let running = crate::admin_socket::request(&config.admin_socket, &Command::Ping)
        .await
        .ok()
        .flatten()
        .is_some();
    let status = if running {
        report.line(
            Level::Ok,
            "server",
            format!("running (admin socket {})", config.admin_socket.display()),
        );
        match session.run(Command::TlsStatus).await {
            Ok(Outcome::Tls { status }) => status.map(|s| *s),
            Ok(other) => anyhow::bail!("unexpected answer {other:?}"),
            Err(err) => {
                report.line(Level::Fail, "server", format!("does not answer: {err}"));
                None
            }
        }
    } else {
        report.line(
            Level::Warn,
            "server",
            format!(
                "not running (nothing answers on {})",
                config.admin_socket.display()
            ),
        );
        ports(&mut report, config);
        offline_tls(&mut report, &mut session, config, now).await
    };
    // What the admin UI's overview warns about; nothing to read before the first start.
    let store_exists = match config.storage.url {
        Some(_) => database_ready,
        None => config.data_path.exists(),
    };
    if running || store_exists {
        let tls_off = config.tls_mode == crate::config::TlsMode::Off;
        match session.run(Command::Status { tls_off }).await {
            Ok(Outcome::Warnings { warnings }) => {
                // The key's place is checked above, with the files.
                for warning in warnings
                    .iter()
                    .filter(|w| w.code != "master_key_beside_data")
                {
                    report.line(Level::Warn, &warning.code, &warning.message);
                }
            }
            Ok(other) => anyhow::bail!("unexpected answer {other:?}"),
            Err(err) => report.line(Level::Warn, "status", format!("cannot read: {err}")),
        }
    }
    session.close().await?;
    tls(&mut report, config, status.as_ref(), now);
    dns(&mut report, config).await;

    if report.failures > 0 {
        anyhow::bail!("{} problem(s) found", report.failures);
    }
    Ok(())
}

fn files(report: &mut Report, config: &Config) {
    let key = &config.master_key.path;
    match std::fs::metadata(key) {
        Ok(meta) if meta.permissions().mode() & 0o077 != 0 => report.line(
            Level::Fail,
            "master key",
            format!(
                "{} is readable by others (mode {:o}): chmod 600 {}",
                key.display(),
                meta.permissions().mode() & 0o777,
                key.display()
            ),
        ),
        Ok(_) if config.master_key.origin == KeyOrigin::BesideDataFile => report.line(
            Level::Warn,
            "master key",
            format!(
                "{} sits beside the data file: whoever copies that directory has both; hand \
                 it over as a systemd credential or GATEHOUSE_MASTER_KEY_FILE",
                key.display()
            ),
        ),
        Ok(_) => report.line(
            Level::Ok,
            "master key",
            format!("{} (private)", key.display()),
        ),
        Err(_) if config.master_key.origin == KeyOrigin::BesideDataFile => report.line(
            Level::Warn,
            "master key",
            format!(
                "{} does not exist yet; the first start creates it",
                key.display()
            ),
        ),
        Err(err) => report.line(
            Level::Fail,
            "master key",
            format!("{}: {err}", key.display()),
        ),
    }
    if config.storage.url.is_some() {
        // The data file is not used: the database is looked at instead (`database`).
        return;
    }
    let data = &config.data_path;
    match std::fs::metadata(data) {
        Ok(meta) if meta.permissions().mode() & 0o077 != 0 => report.line(
            Level::Warn,
            "data file",
            format!(
                "{} is readable by others (mode {:o}); its secrets are sealed, but chmod 600",
                data.display(),
                meta.permissions().mode() & 0o777
            ),
        ),
        Ok(meta) => report.line(
            Level::Ok,
            "data file",
            format!(
                "{} ({} bytes, owner uid {})",
                data.display(),
                meta.len(),
                meta.uid()
            ),
        ),
        Err(_) => report.line(
            Level::Warn,
            "data file",
            format!(
                "{} does not exist yet; the first start creates it",
                data.display()
            ),
        ),
    }
    if let Some(dir) = data.parent().filter(|d| !d.as_os_str().is_empty())
        && let Err(err) = std::fs::metadata(dir)
    {
        report.line(
            Level::Fail,
            "data file",
            format!("its directory {}: {err}", dir.display()),
        );
    }
}

/// With `storage.url`: whether the database can be reached as a node would reach it,
/// over TLS or not, and what runs on it. True when it holds gatehouse's tables.
async fn database(report: &mut Report, config: &Config) -> bool {
    let target = match crate::app::storage_target(config) {
        Ok(Some(target)) => target,
        Ok(None) => return false,
        Err(err) => {
            report.line(Level::Fail, "database", err.to_string());
            return false;
        }
    };
    let location = target.url.clone();
    let local = crate::store::probe_is_local(&location);
    let probed = tokio::task::spawn_blocking(move || crate::store::probe(&target)).await;
    let probe = match probed {
        Ok(Ok(probe)) => probe,
        Ok(Err(err)) => {
            report.line(Level::Fail, "database", err.to_string());
            return false;
        }
        Err(err) => {
            report.line(Level::Fail, "database", format!("the check failed: {err}"));
            return false;
        }
    };
    let encrypted = if probe.tls { "TLS" } else { "not encrypted" };
    let level = if probe.tls || local {
        Level::Ok
    } else {
        Level::Warn
    };
    report.line(
        level,
        "database",
        format!(
            "{location} (PostgreSQL {}, {encrypted})",
            probe.server_version
        ),
    );
    if !probe.initialised {
        report.line(
            Level::Warn,
            "database",
            "holds no gatehouse tables yet; the first node to start creates them",
        );
        return false;
    }
    match (probe.processes, probe.led) {
        (0, _) => report.line(Level::Warn, "nodes", "no gatehouse node is connected"),
        (n, true) => report.line(
            Level::Ok,
            "nodes",
            format!("{n} gatehouse process(es) connected; one leads the scheduled jobs"),
        ),
        (n, false) => report.line(
            Level::Warn,
            "nodes",
            format!(
                "{n} gatehouse process(es) connected, but none holds the leader lock: \
                 scheduled jobs do not run"
            ),
        ),
    }
    true
}

fn ports(report: &mut Report, config: &Config) {
    let mut addrs = vec![config.server.listen];
    addrs.extend(config.server.http_listen);
    for addr in addrs {
        match std::net::TcpListener::bind(addr) {
            Ok(_) => report.line(Level::Ok, "port", format!("{addr} is free")),
            Err(err) if err.kind() == std::io::ErrorKind::PermissionDenied => report.line(
                Level::Fail,
                "port",
                format!(
                    "{addr}: permission denied (ports below 1024 need CAP_NET_BIND_SERVICE; \
                     the systemd unit grants it)"
                ),
            ),
            Err(err) => report.line(Level::Fail, "port", format!("{addr}: {err}")),
        }
    }
}

/// What a start would serve, read without a server: the stored certificate, or the files.
async fn offline_tls(
    report: &mut Report,
    session: &mut Session<'_>,
    config: &Config,
    now: u64,
) -> Option<TlsStatus> {
    let status = |certificate: Option<CertInfo>| TlsStatus {
        mode: config.tls_mode.as_str().to_string(),
        certificate,
        acme: None,
    };
    match config.tls_mode {
        TlsMode::Off => Some(TlsStatus::off()),
        TlsMode::Files => {
            let files = crate::tls::files::CertFiles {
                cert: config.tls.cert_file.clone()?,
                key: config.tls.key_file.clone()?,
            };
            match files.load() {
                Ok(cert) => Some(status(Some(cert.info))),
                Err(err) => {
                    report.line(Level::Fail, "tls", err.to_string());
                    None
                }
            }
        }
        TlsMode::SelfSigned | TlsMode::Acme => {
            if !config.data_path.exists() {
                return Some(status(None));
            }
            let services = session.local_services().await.ok().flatten()?;
            let store = services.store.clone();
            let info = if config.tls_mode == TlsMode::Acme {
                let settings = crate::tls::acme::AcmeSettings::from_config(config).ok()?;
                crate::tls::acme::stored_certificate(&store, &settings, now)
                    .ok()
                    .flatten()
                    .map(|cert| cert.info)
            } else {
                store
                    .read(|tx| tx.self_signed_cert())
                    .ok()
                    .flatten()
                    .and_then(|cert| CertInfo::parse(&cert.cert_der).ok())
            };
            Some(status(info))
        }
    }
}

fn tls(report: &mut Report, config: &Config, status: Option<&TlsStatus>, now: u64) {
    let Some(status) = status else {
        report.line(Level::Fail, "tls", "could not read the TLS state");
        return;
    };
    if config.tls_mode == TlsMode::Off {
        report.line(
            Level::Warn,
            "tls",
            "off: plain HTTP on loopback, for a reverse proxy on this host only",
        );
        return;
    }
    report.line(Level::Ok, "tls", format!("mode {}", status.mode));
    match &status.certificate {
        Some(cert) => {
            let days_left = cert.not_after_ms.saturating_sub(now) / DAY_MS;
            let expiry = format!(
                "certificate for {} from {}, expires {} ({days_left} days)",
                cert.names.join(", "),
                cert.issuer,
                format_rfc3339(cert.not_after_ms)
            );
            let stand_in = config.tls_mode == TlsMode::Acme && cert.is_self_signed();
            let level = if cert.not_after_ms <= now {
                Level::Fail
            } else if days_left < 14 || stand_in {
                Level::Warn
            } else {
                Level::Ok
            };
            let suffix = if stand_in {
                " (self-signed stand-in until the CA's certificate arrives)"
            } else {
                ""
            };
            report.line(level, "tls", format!("{expiry}{suffix}"));
            let missing: Vec<&String> = config
                .tls
                .domains
                .iter()
                .filter(|d| !cert.names.contains(d))
                .collect();
            if !missing.is_empty() && !stand_in {
                report.line(
                    Level::Warn,
                    "tls",
                    format!(
                        "the certificate does not name {}",
                        missing
                            .iter()
                            .map(|d| d.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                );
            }
        }
        None if config.tls_mode == TlsMode::Acme => report.line(
            Level::Warn,
            "tls",
            format!(
                "no certificate from {} yet; the next start orders one",
                config.tls.acme.directory
            ),
        ),
        None => report.line(
            Level::Warn,
            "tls",
            "no certificate yet; the first start makes one",
        ),
    }
    if let Some(acme) = &status.acme {
        let text = format!(
            "{:?} ({} orders, {} issued, {} failures in a row){}{}{}",
            acme.phase,
            acme.orders_started,
            acme.certificates_issued,
            acme.failures_in_row,
            acme.last_error
                .as_ref()
                .map(|e| format!("; last error: {e}"))
                .unwrap_or_default(),
            acme.next_attempt_at_ms
                .map(|t| format!("; next attempt {}", format_rfc3339(t)))
                .unwrap_or_default(),
            acme.ordering_node
                .as_ref()
                .map(|node| format!("; ordering node {node}"))
                .unwrap_or_default()
        );
        let level = if acme.failures_in_row > 0 {
            Level::Warn
        } else {
            Level::Ok
        };
        report.line(level, "acme", text.to_lowercase_first());
    }
}

trait LowerFirst {
    fn to_lowercase_first(&self) -> String;
}

impl LowerFirst for String {
    fn to_lowercase_first(&self) -> String {
        let mut chars = self.chars();
        match chars.next() {
            Some(first) => first.to_lowercase().chain(chars).collect(),
            None => String::new(),
        }
    }
}

async fn dns(report: &mut Report, config: &Config) {
    for domain in &config.tls.domains {
        let lookup = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::lookup_host((domain.as_str(), 443)),
        )
        .await;
        let addrs: Vec<IpAddr> = match lookup {
            Ok(Ok(addrs)) => addrs.map(|a: SocketAddr| a.ip()).collect(),
            Ok(Err(err)) => {
                report.line(
                    Level::Fail,
                    "dns",
                    format!("{domain} does not resolve ({err}): add an A or AAAA record"),
                );
                continue;
            }
            Err(_) => {
                report.line(Level::Fail, "dns", format!("{domain}: no answer within 5s"));
                continue;
            }
        };
        let (here, elsewhere): (Vec<IpAddr>, Vec<IpAddr>) =
            addrs.into_iter().partition(|ip| is_local_address(*ip));
        let list = |ips: &[IpAddr]| {
            ips.iter()
                .map(IpAddr::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        if elsewhere.is_empty() {
            report.line(
                Level::Ok,
                "dns",
                format!(
                    "{domain} resolves to {}, an address of this host",
                    list(&here)
                ),
            );
        } else {
            report.line(
                Level::Warn,
                "dns",
                format!(
                    "{domain} resolves to {}, not an address of this host{}: fine behind NAT \
                     that forwards ports 443 and 80 here, else the CA cannot validate",
                    list(&elsewhere),
                    if here.is_empty() {
                        String::new()
                    } else {
                        format!(" (and to {}, which is)", list(&here))
                    }
                ),
            );
        }
    }
}

/// Whether `ip` is assigned to this host: binding a socket to it succeeds only then.
fn is_local_address(ip: IpAddr) -> bool {
    std::net::UdpSocket::bind((ip, 0)).is_ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn local_addresses_are_told_from_others() {
        assert!(is_local_address("127.0.0.1".parse().unwrap()));
        // TEST-NET-3: never assigned to a host.
        assert!(!is_local_address("203.0.113.9".parse().unwrap()));
    }
}
