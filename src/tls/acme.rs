//! `acme` mode: certificates from an ACME CA (RFC 8555), proved with TLS-ALPN-01 on the
//! HTTPS port itself, kept sealed in the data file.
//!
//! rustls-acme speaks the protocol (account, order, challenge, finalize, download); this
//! module decides everything around it:
//! - **where things live**: the account key and each certificate are sealed in
//!   `secrets.v1` through [`StoreCache`], written durably together with their audit
//!   record, so a restart or a restored backup serves the same certificate at once, with
//!   no new order;
//! - **when to order**: at start when no stored certificate covers the configured names,
//!   then a third of the lifetime before expiry (at most 30 days), by gatehouse's clock;
//! - **what a failure does**: nothing to the certificate being served; the attempt is
//!   logged, audited (`tls.certificate_failed`), counted in metrics and `/readyz`, and
//!   retried after `tls.acme_retry`, doubling up to 12 hours;
//! - **what is served before the first certificate**: the self-signed one, so the
//!   server is reachable for diagnosis, with `/readyz` answering 503 until the CA's
//!   certificate arrives.

use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures_util::StreamExt;
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, pem::PemObject};
use rustls_acme::{AccountCache, CertCache, EventOk};
use serde::{Deserialize, Serialize};

use super::{CertSlot, ServedCert, TlsError, provider};
use crate::audit::{self, Event, Origin, Severity};
use crate::clock::{SharedClock, format_rfc3339};
use crate::config::Config;
use crate::store::records::{AcmeAccount, AcmeCertificate};
use crate::store::{Store, StoreError};

/// Retries double from `tls.acme_retry` up to this.
const MAX_RETRY: Duration = Duration::from_secs(12 * 3600);
/// An order that has not finished by then is abandoned and counted as a failure.
const ORDER_TIMEOUT: Duration = Duration::from_secs(10 * 60);
/// The longest sleep between looks at the clock, so a changed clock (or a test's) is
/// noticed within the hour.
const MAX_SLEEP: Duration = Duration::from_secs(3600);
/// Error texts from a CA are cut to this many characters in status and audit records.
const MAX_ERROR_CHARS: usize = 400;

/// What to order, from whom, and how to reach the CA.
#[derive(Debug, Clone)]
pub(crate) struct AcmeSettings {
    pub(crate) directory: String,
    pub(crate) domains: Vec<String>,
    pub(crate) contact: Vec<String>,
    pub(crate) retry: Duration,
    /// External Account Binding, when the CA demands it.
    pub(crate) eab: Option<super::eab::EabCredentials>,
    client: Arc<rustls::ClientConfig>,
}

impl AcmeSettings {
    /// Reads `tls.acme_ca_root` if set: its certificates are trusted for the directory
    /// beside Mozilla's roots.
    pub(crate) fn from_config(config: &Config) -> Result<Self, TlsError> {
        let mut roots = RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = &config.tls.acme.ca_root {
            let bad = |reason: String| TlsError::BadFile {
                path: path.clone(),
                reason,
            };
            let pem = std::fs::read(path).map_err(|source| TlsError::ReadFile {
                path: path.clone(),
                source,
            })?;
            let certs = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad(format!("not a PEM certificate file: {e}")))?;
            if certs.is_empty() {
                return Err(bad("holds no certificate".into()));
            }
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| bad(format!("not a usable CA certificate: {e}")))?;
            }
        }
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut domains = config.tls.domains.clone();
        domains.sort();
        let eab = match (&config.tls.acme.eab_kid, &config.tls.acme.eab_key_file) {
            (Some(kid), Some(path)) => {
                let text = std::fs::read_to_string(path).map_err(|source| TlsError::ReadFile {
                    path: path.clone(),
                    source,
                })?;
                Some(
                    super::eab::EabCredentials::new(kid, &text).map_err(|reason| {
                        TlsError::BadFile {
                            path: path.clone(),
                            reason,
                        }
                    })?,
                )
            }
            _ => None,
        };
        Ok(Self {
            eab,
            directory: config.tls.acme.directory.clone(),
            domains,
            contact: config.tls.acme.contact.clone(),
            retry: config.tls.acme.retry,
            client: Arc::new(client),
        })
    }
}

/// The stored certificate for these settings, if there is one and it has not expired.
pub(crate) fn stored_certificate(
    store: &Store,
    settings: &AcmeSettings,
    now_ms: u64,
) -> Result<Option<ServedCert>, TlsError> {
    let Some(stored) =
        store.read(|tx| tx.acme_certificate(&settings.directory, &settings.domains))?
    else {
        return Ok(None);
    };
    let served = ServedCert::from_pem(&stored.pem)?;
    Ok((served.info.not_after_ms > now_ms).then_some(served))
}

/// Where the ACME work stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AcmePhase {
    /// A CA certificate is served and its renewal is not due.
    Valid,
    /// An order is in progress.
    Ordering,
    /// The last order failed; the next is scheduled.
    Retrying,
}

/// A snapshot of the ACME state, for `/readyz`, metrics and `doctor`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AcmeSnapshot {
    pub(crate) directory: String,
    pub(crate) domains: Vec<String>,
    pub phase: AcmePhase,
    /// A certificate from the CA is served (not the self-signed stand-in).
    pub issued: bool,
    pub orders_started: u64,
    pub certificates_issued: u64,
    pub(crate) failures_total: u64,
    pub failures_in_row: u32,
    pub last_error: Option<String>,
    pub(crate) last_failure_at_ms: Option<u64>,
    pub(crate) next_attempt_at_ms: Option<u64>,
    pub renew_at_ms: Option<u64>,
}

/// The live ACME state and the challenge responder of the order in progress.
#[derive(Debug)]
pub struct AcmeStatus {
    snapshot: Mutex<AcmeSnapshot>,
    challenge: RwLock<Option<Arc<rustls::ServerConfig>>>,
}

impl AcmeStatus {
    pub(crate) fn new(settings: &AcmeSettings, issued: bool) -> Self {
        Self {
            snapshot: Mutex::new(AcmeSnapshot {
                directory: settings.directory.clone(),
                domains: settings.domains.clone(),
                phase: if issued {
                    AcmePhase::Valid
                } else {
                    AcmePhase::Ordering
                },
                issued,
                orders_started: 0,
                certificates_issued: 0,
                failures_total: 0,
                failures_in_row: 0,
                last_error: None,
                last_failure_at_ms: None,
                next_attempt_at_ms: None,
                renew_at_ms: None,
            }),
            challenge: RwLock::new(None),
        }
    }

    pub fn snapshot(&self) -> AcmeSnapshot {
        self.with(|s| s.clone())
    }

    fn with<R>(&self, f: impl FnOnce(&mut AcmeSnapshot) -> R) -> R {
        match self.snapshot.lock() {
            Ok(mut guard) => f(&mut guard),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }

    /// The rustls configuration answering TLS-ALPN-01 validations, while an order runs.
    pub(crate) fn challenge_config(&self) -> Option<Arc<rustls::ServerConfig>> {
        match self.challenge.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn set_challenge_config(&self, config: Option<Arc<rustls::ServerConfig>>) {
        match self.challenge.write() {
            Ok(mut guard) => *guard = config,
            Err(poisoned) => *poisoned.into_inner() = config,
        }
    }
}

/// Clears the challenge responder when an order ends, however it ends.
struct ChallengeGuard<'a>(&'a AcmeStatus);

impl Drop for ChallengeGuard<'_> {
    fn drop(&mut self) {
        self.0.set_challenge_config(None);
    }
}

/// rustls-acme's cache over the sealed store. It never hands back a certificate (an
/// order is started only when one is wanted); it keeps the account key per directory,
/// and writes each new certificate durably with its audit record before it is served.
#[derive(Debug, Clone)]
struct StoreCache {
    store: Store,
    clock: SharedClock,
    issued: Arc<Mutex<Option<ServedCert>>>,
}

impl StoreCache {
    fn take_issued(&self) -> Option<ServedCert> {
        match self.issued.lock() {
            Ok(mut guard) => guard.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        }
    }
}

#[async_trait::async_trait]
impl CertCache for StoreCache {
    type EC = String;

    async fn load_cert(&self, _: &[String], _: &str) -> Result<Option<Vec<u8>>, String> {
        Ok(None)
    }

    async fn store_cert(
        &self,
        domains: &[String],
        directory: &str,
        pem: &[u8],
    ) -> Result<(), String> {
        let served = ServedCert::from_pem(pem).map_err(|e| e.to_string())?;
        let now = self.clock.now_ms();
        let mut sorted = domains.to_vec();
        sorted.sort();
        let record = AcmeCertificate {
            directory: directory.to_string(),
            domains: sorted.clone(),
            pem: pem.to_vec(),
            issued_at_ms: now,
            not_after_ms: served.info.not_after_ms,
        };
        let event = Event::new("tls.certificate_issued")
            .severity(Severity::Notice)
            .detail("names", sorted)
            .detail("issuer", served.info.issuer.clone())
            .detail("not_after", format_rfc3339(served.info.not_after_ms))
            .detail("sha256", served.info.sha256.clone())
            .detail("directory", directory.to_string());
        self.store
            .write(move |tx| {
                tx.put_acme_certificate(&record)?;
                audit::append(tx, &Origin::system(), &event, now)?;
                Ok::<_, StoreError>(())
            })
            .await
            .map_err(|e| e.to_string())?;
        match self.issued.lock() {
            Ok(mut guard) => *guard = Some(served),
            Err(poisoned) => *poisoned.into_inner() = Some(served),
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl AccountCache for StoreCache {
    type EA = String;

    async fn load_account(&self, _: &[String], directory: &str) -> Result<Option<Vec<u8>>, String> {
        let account = self
            .store
            .read(|tx| tx.acme_account(directory))
            .map_err(|e| e.to_string())?;
        Ok(account.map(|a| a.key_pkcs8))
    }

    async fn store_account(
        &self,
        contact: &[String],
        directory: &str,
        key: &[u8],
    ) -> Result<(), String> {
        self.save_account(contact, directory, key, None).await
    }
}

impl StoreCache {
    /// Seals the account key with its audit record, in one durable write.
    async fn save_account(
        &self,
        contact: &[String],
        directory: &str,
        key: &[u8],
        eab_kid: Option<&str>,
    ) -> Result<(), String> {
        let now = self.clock.now_ms();
        let account = AcmeAccount {
            directory: directory.to_string(),
            contact: contact.to_vec(),
            key_pkcs8: key.to_vec(),
            created_at_ms: now,
            eab_kid: eab_kid.map(str::to_string),
        };
        let mut event = Event::new("acme.account_created")
            .severity(Severity::Notice)
            .detail("directory", directory.to_string())
            .detail("contact", contact.to_vec());
        if let Some(kid) = eab_kid {
            event = event.detail("eab_kid", kid.to_string());
        }
        self.store
            .write(move |tx| {
                tx.put_acme_account(&account)?;
                audit::append(tx, &Origin::system(), &event, now)?;
                Ok::<_, StoreError>(())
            })
            .await
            .map_err(|e| e.to_string())
    }
}

/// Orders and renews for the life of the server.
#[derive(Debug)]
pub(crate) struct AcmeDriver {
    settings: AcmeSettings,
    status: Arc<AcmeStatus>,
    slot: Arc<CertSlot>,
    store: Store,
    clock: SharedClock,
    cache: StoreCache,
}

impl AcmeDriver {
    pub(crate) fn new(
        settings: AcmeSettings,
        status: Arc<AcmeStatus>,
        slot: Arc<CertSlot>,
        store: Store,
        clock: SharedClock,
    ) -> Self {
        let cache = StoreCache {
            store: store.clone(),
            clock: clock.clone(),
            issued: Arc::new(Mutex::new(None)),
        };
        Self {
            settings,
            status,
            slot,
            store,
            clock,
            cache,
        }
    }

    /// Runs until `stop` resolves: sleeps until a renewal or a retry is due, orders,
    /// serves what it gets.
    pub(crate) async fn run(self, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        // Retries wait in real time (the backoff is about the CA, not the certificate);
        // only the renewal date is read from gatehouse's clock.
        let mut retry_at: Option<tokio::time::Instant> = None;
        loop {
            if let Some(at) = retry_at.take() {
                tokio::select! {
                    () = &mut stop => return,
                    () = tokio::time::sleep_until(at) => {}
                }
            }
            let now = self.clock.now_ms();
            if let Some(at) = self.renewal_not_due(now) {
                let wait = Duration::from_millis(at - now).min(MAX_SLEEP);
                tokio::select! {
                    () = &mut stop => return,
                    () = tokio::time::sleep(wait) => continue,
                }
            }
            self.status.with(|s| {
                s.phase = AcmePhase::Ordering;
                s.orders_started += 1;
            });
            tracing::info!(domains = ?self.settings.domains, directory = %self.settings.directory, "ordering a certificate");
            let outcome = tokio::select! {
                () = &mut stop => return,
                outcome = tokio::time::timeout(ORDER_TIMEOUT, self.order()) => outcome,
            };
            let error = match outcome {
                Ok(Ok(cert)) => {
                    self.served(cert);
                    continue;
                }
                Ok(Err(err)) => err,
                Err(_) => format!(
                    "the order did not finish within {}",
                    humantime::format_duration(ORDER_TIMEOUT)
                ),
            };
            let delay = self.failed(error).await;
            retry_at = Some(tokio::time::Instant::now() + delay);
        }
    }

    /// When the served certificate is due for renewal, if that is still ahead; `None`:
    /// order now (nothing from the CA is served yet, or the renewal is due).
    fn renewal_not_due(&self, now: u64) -> Option<u64> {
        if !self.status.snapshot().issued {
            return None;
        }
        let renew_at = self.slot.current().info.renew_at_ms();
        self.status.with(|s| {
            s.renew_at_ms = Some(renew_at);
            s.phase = if renew_at > now && s.failures_in_row == 0 {
                AcmePhase::Valid
            } else {
                s.phase
            };
        });
        (renew_at > now).then_some(renew_at)
    }

    /// With External Account Binding and no account bound with this key id yet, registers
    /// one (the binding is needed once: later orders use the stored account). An account
    /// key made without the binding (before it was configured) is replaced.
    async fn bind_account(&self) -> Result<(), String> {
        let Some(eab) = &self.settings.eab else {
            return Ok(());
        };
        let directory = self.settings.directory.clone();
        let known = self
            .store
            .read(|tx| tx.acme_account(&directory))
            .map_err(|e| e.to_string())?;
        if known.is_some_and(|account| account.eab_kid.as_deref() == Some(eab.kid.as_str())) {
            return Ok(());
        }
        let key = super::eab::register(
            &self.settings.client,
            &self.settings.directory,
            &self.settings.contact,
            eab,
        )
        .await?;
        self.cache
            .save_account(&self.settings.contact, &directory, &key, Some(&eab.kid))
            .await
    }

    async fn order(&self) -> Result<ServedCert, String> {
        self.bind_account().await?;
        let config = rustls_acme::AcmeConfig::new_with_client_config(
            &self.settings.domains,
            self.settings.client.clone(),
        )
        .directory(&self.settings.directory)
        .contact(&self.settings.contact)
        .cache(self.cache.clone());
        let mut state = Box::pin(config.state());
        self.status.set_challenge_config(Some(
            state.challenge_rustls_config_with_provider(provider()),
        ));
        let _clear = ChallengeGuard(&self.status);
        loop {
            match state.next().await {
                Some(Ok(EventOk::CertCacheStore)) => {
                    return self
                        .cache
                        .take_issued()
                        .ok_or_else(|| "the issued certificate was not kept".to_string());
                }
                Some(Ok(event)) => tracing::debug!(?event, "ACME progress"),
                Some(Err(err)) => return Err(err.to_string()),
                None => return Err("the ACME client stopped".into()),
            }
        }
    }

    fn served(&self, cert: ServedCert) {
        let info = cert.info.clone();
        tracing::info!(
            names = ?info.names,
            issuer = %info.issuer,
            not_after = %format_rfc3339(info.not_after_ms),
            "serving a new certificate from the ACME CA"
        );
        self.slot.replace(cert);
        self.status.with(|s| {
            s.phase = AcmePhase::Valid;
            s.issued = true;
            s.certificates_issued += 1;
            s.failures_in_row = 0;
            s.last_error = None;
            s.next_attempt_at_ms = None;
            s.renew_at_ms = Some(info.renew_at_ms());
        });
    }

    /// Records a failed order; returns how long to wait before the next.
    async fn failed(&self, error: String) -> Duration {
        let error: String = error.chars().take(MAX_ERROR_CHARS).collect();
        let now = self.clock.now_ms();
        let (attempt, delay) = self.status.with(|s| {
            s.failures_in_row = s.failures_in_row.saturating_add(1);
            s.failures_total += 1;
            let delay = retry_delay(self.settings.retry, s.failures_in_row);
            s.phase = AcmePhase::Retrying;
            s.last_error = Some(error.clone());
            s.last_failure_at_ms = Some(now);
            s.next_attempt_at_ms = Some(now + crate::clock::millis(delay));
            (s.failures_in_row, delay)
        });
        let serving = self.slot.current().info.clone();
        tracing::warn!(
            %error,
            attempt,
            retry_in = %humantime::format_duration(delay),
            serving_until = %format_rfc3339(serving.not_after_ms),
            "ACME order failed; the current certificate is still served"
        );
        let event = Event::failure("tls.certificate_failed")
            .detail("error", error)
            .detail("attempt", attempt)
            .detail("retry_in_seconds", delay.as_secs())
            .detail("directory", self.settings.directory.clone())
            .detail("names", self.settings.domains.clone());
        if let Err(err) = self
            .store
            .write(move |tx| audit::append(tx, &Origin::system(), &event, now))
            .await
        {
            tracing::error!(error = %err, "cannot audit the failed ACME order");
        }
        delay
    }
}

/// `first`, doubled for each failure after the first, at most 12 hours, plus up to a
/// tenth more at random so many servers failing together do not retry together.
fn retry_delay(first: Duration, failures_in_row: u32) -> Duration {
    let doublings = failures_in_row.saturating_sub(1).min(20);
    let base = first.saturating_mul(1 << doublings).min(MAX_RETRY);
    let mut byte = [0u8; 1];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut byte);
    base + base.mul_f64(f64::from(byte[0]) / 2550.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_double_up_to_twelve_hours() {
        let first = Duration::from_secs(300);
        let within = |d: Duration, base: u64| {
            d >= Duration::from_secs(base) && d <= Duration::from_secs(base + base / 10 + 1)
        };
        assert!(within(retry_delay(first, 1), 300));
        assert!(within(retry_delay(first, 2), 600));
        assert!(within(retry_delay(first, 4), 2400));
        assert!(within(retry_delay(first, 30), 12 * 3600));
        assert!(within(retry_delay(first, u32::MAX), 12 * 3600));
    }
}
