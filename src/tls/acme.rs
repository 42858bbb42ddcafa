//! `acme` mode: certificates from an ACME CA (RFC 8555), proved with TLS-ALPN-01 on the
//! HTTPS port itself, kept sealed in the store.
//!
//! [`super::order`] takes an order's protocol steps and [`super::challenge`] makes and
//! answers the challenges; this module decides everything around them:
//! - **where things live**: the account key and each certificate are sealed in
//!   `secrets.v1` through [`StoreCache`], written durably together with their audit
//!   record, so a restart, a restored backup or another node serves the same certificate
//!   at once, with no new order;
//! - **when to order**: at start when no stored certificate covers the configured names,
//!   then a third of the lifetime before expiry (at most 30 days), by gatehouse's clock;
//! - **who orders**: one node at a time, the holder of the order lease
//!   (`acme/order/…` in `secrets.v1`), taken in a serializable write. The others wait and
//!   serve the certificate the holder stores. A lease outlives a crashed holder by at
//!   most the order timeout and a minute; on a data file there is no one else, so a lease
//!   left by an earlier process is ignored;
//! - **what a failure does**: nothing to the certificate being served; the attempt is
//!   logged, audited (`tls.certificate_failed`), counted in metrics and `/readyz`, and
//!   retried after `tls.acme_retry`, doubling up to 12 hours. The holder keeps the lease
//!   through the wait, so the backoff is the cluster's, not each node's;
//! - **what is served before the first certificate**: the self-signed one, so the
//!   server is reachable for diagnosis, with `/readyz` answering 503 until the CA's
//!   certificate arrives.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, pem::PemObject};
use serde::{Deserialize, Serialize};

use super::challenge::{Challenges, challenge_certificate};
use super::order::Ca;
use super::{CertSlot, ServedCert, TlsError, provider};
use crate::audit::{self, Event, Origin, Severity};
use crate::clock::{SharedClock, format_rfc3339};
use crate::config::Config;
use crate::store::records::{AcmeAccount, AcmeCertificate, AcmeOrderLease};
use crate::store::{ReadTx, Store, StoreError};

/// Retries double from `tls.acme_retry` up to this.
const MAX_RETRY: Duration = Duration::from_secs(12 * 3600);
/// An order that has not finished by then is abandoned and counted as a failure.
const ORDER_TIMEOUT: Duration = Duration::from_secs(10 * 60);
/// How long past its term a lease still holds, so that a holder waking a little late
/// for its retry finds its lease still its own.
const TAKEOVER_GRACE: Duration = Duration::from_secs(60);
/// How often a node that waits on another's order looks for the certificate.
const WAIT_POLL: Duration = Duration::from_secs(2);
/// How long a stopping node tries to hand its lease back.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);
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
    /// An order is in progress on this node.
    Ordering,
    /// The last order failed; the next is scheduled.
    Retrying,
    /// Another node holds the order lease: this node serves what it stores.
    Waiting,
}

/// A snapshot of the ACME state, for `/readyz`, metrics and `doctor`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AcmeSnapshot {
    pub(crate) directory: String,
    pub(crate) domains: Vec<String>,
    pub phase: AcmePhase,
    /// A certificate from the CA is served (not the self-signed stand-in).
    pub issued: bool,
    /// Orders this node started.
    pub orders_started: u64,
    /// Certificates this node ordered and stored (not those it took from the store).
    pub certificates_issued: u64,
    pub(crate) failures_total: u64,
    /// Failed orders in a row for this certificate, on whichever node placed them.
    pub failures_in_row: u32,
    pub last_error: Option<String>,
    pub(crate) last_failure_at_ms: Option<u64>,
    pub(crate) next_attempt_at_ms: Option<u64>,
    pub renew_at_ms: Option<u64>,
    /// The node holding the order lease while this one waits (or this one, ordering).
    pub ordering_node: Option<String>,
}

/// The live ACME state and the challenges this node answers.
#[derive(Debug)]
pub struct AcmeStatus {
    snapshot: Mutex<AcmeSnapshot>,
    challenges: Challenges,
}

impl AcmeStatus {
    pub(crate) fn new(
        settings: &AcmeSettings,
        issued: bool,
        store: Store,
        clock: SharedClock,
    ) -> Self {
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
                ordering_node: None,
            }),
            challenges: Challenges::new(&settings.domains, store, clock),
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

    /// The TLS-ALPN-01 challenges this node answers validation connections with.
    pub(crate) fn challenges(&self) -> &Challenges {
        &self.challenges
    }
}

/// Forgets the in-memory challenges when an order ends, however it ends (the stored
/// ones go in the write that records the outcome).
struct ChallengeGuard<'a>(&'a Challenges);

impl Drop for ChallengeGuard<'_> {
    fn drop(&mut self) {
        self.0.close_all();
    }
}

/// The ACME account and certificates, sealed in the store, each written durably with its
/// audit record.
#[derive(Debug, Clone)]
struct StoreCache {
    store: Store,
    clock: SharedClock,
}

impl StoreCache {
    /// The account key (PKCS#8) for `directory`, if one was made.
    fn load_account(&self, directory: &str) -> Result<Option<Vec<u8>>, String> {
        let account = self
            .store
            .read(|tx| tx.acme_account(directory))
            .map_err(|e| e.to_string())?;
        Ok(account.map(|a| a.key_pkcs8))
    }

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

    /// Stores a new certificate with its audit record, and in the same write ends the
    /// order: the lease goes (so the waiting nodes find the certificate, not a lease) and
    /// so do the challenges.
    async fn store_cert(
        &self,
        settings: &AcmeSettings,
        node: &str,
        pem: Vec<u8>,
    ) -> Result<ServedCert, String> {
        let served = ServedCert::from_pem(&pem)
            .map_err(|e| format!("the CA sent an unusable certificate: {e}"))?;
        let now = self.clock.now_ms();
        let directory = settings.directory.clone();
        let domains = settings.domains.clone();
        let record = AcmeCertificate {
            directory: directory.clone(),
            domains: domains.clone(),
            pem,
            issued_at_ms: now,
            not_after_ms: served.info.not_after_ms,
        };
        let event = Event::new("tls.certificate_issued")
            .severity(Severity::Notice)
            .detail("names", domains.clone())
            .detail("issuer", served.info.issuer.clone())
            .detail("not_after", format_rfc3339(served.info.not_after_ms))
            .detail("sha256", served.info.sha256.clone())
            .detail("directory", directory.clone())
            .detail("node", node.to_string());
        let node = node.to_string();
        self.store
            .write(move |tx| {
                tx.put_acme_certificate(&record)?;
                audit::append(tx, &Origin::system(), &event, now)?;
                // Challenges in the store are the lease holder's: never another's.
                if tx
                    .acme_order_lease(&directory, &domains)?
                    .is_some_and(|lease| lease.holder == node)
                {
                    tx.delete_acme_order_lease(&directory, &domains)?;
                    for name in &domains {
                        tx.delete_acme_challenge(name)?;
                    }
                }
                Ok::<_, StoreError>(())
            })
            .await
            .map_err(|e| e.to_string())?;
        Ok(served)
    }
}

/// What the store says about ordering, as one node sees it.
#[derive(Debug)]
enum Decision {
    /// A certificate newer than the one served: serve it, order nothing.
    Stored(AcmeCertificate),
    /// Another node holds the order lease.
    Held(AcmeOrderLease),
    /// The lease is free (none, expired, or this node's): this node may order, carrying
    /// on the failure count of the lease it finds.
    Free(Option<AcmeOrderLease>),
}

/// The facts a decision is taken on.
#[derive(Debug, Clone)]
struct Ask {
    directory: String,
    domains: Vec<String>,
    node: String,
    now_ms: u64,
    /// Several nodes may share the store. On a data file no other process can hold the
    /// lease (redb locks the file), so a lease left by another is stale: a crash during
    /// an order, or a backup taken during one.
    shared: bool,
    /// A stored certificate is newer when it expires after this: the served one's expiry
    /// (now, while the self-signed stand-in is served).
    newer_than_ms: u64,
}

fn decide(tx: &ReadTx<'_>, ask: &Ask) -> Result<Decision, StoreError> {
    if let Some(cert) = tx.acme_certificate(&ask.directory, &ask.domains)?
        && cert.not_after_ms > ask.newer_than_ms
    {
        return Ok(Decision::Stored(cert));
    }
    let lease = tx.acme_order_lease(&ask.directory, &ask.domains)?;
    Ok(match lease {
        Some(lease) if lease.holder == ask.node => Decision::Free(Some(lease)),
        Some(lease) if ask.shared && lease.expires_at_ms > ask.now_ms => Decision::Held(lease),
        Some(lease) if ask.shared => Decision::Free(Some(lease)),
        _ => Decision::Free(None),
    })
}

/// This node's name in order leases and audit records: the host name, and a random part
/// so that two processes on one host (or one restarted) are told apart.
fn node_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_string())
        .filter(|name| {
            !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_graphic())
        })
        .unwrap_or_else(|| "node".to_string());
    let mut raw = [0u8; 4];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw);
    format!("{host}:{}", data_encoding::HEXLOWER.encode(&raw))
}

/// Orders and renews for the life of the server, one order at a time across the nodes
/// that share the store.
#[derive(Debug)]
pub(crate) struct AcmeDriver {
    settings: AcmeSettings,
    status: Arc<AcmeStatus>,
    slot: Arc<CertSlot>,
    store: Store,
    clock: SharedClock,
    cache: StoreCache,
    node: String,
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
        };
        Self {
            settings,
            status,
            slot,
            store,
            clock,
            cache,
            node: node_name(),
        }
    }

    /// Runs until `stop` resolves: sleeps until a renewal or a retry is due, takes the
    /// order lease, orders, serves what it gets; or, while another node holds the lease,
    /// waits for the certificate that node stores.
    ///
    /// A certificate another node ordered is found by reading the store again (every
    /// `WAIT_POLL` while waiting, at every wake-up otherwise) rather than through the
    /// change feed: every node that needs the new certificate has found it due at the
    /// same time and is waiting on the lease, so the read costs nothing extra, works the
    /// same on a data file, and needs no part of the sealed secrets table to be followed.
    pub(crate) async fn run(self, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        tracing::debug!(node = %self.node, "ACME: this node's name in order leases");
        // Retries wait in real time (the backoff is about the CA, not the certificate);
        // the renewal date and the lease's expiry are read from gatehouse's clock.
        let mut retry_at: Option<tokio::time::Instant> = None;
        loop {
            if let Some(at) = retry_at.take() {
                tokio::select! {
                    () = &mut stop => return,
                    () = tokio::time::sleep_until(at) => {}
                }
            }
            let now = self.clock.now_ms();
            let decision = match self.store.read(|tx| decide(tx, &self.ask(now))) {
                Ok(decision) => decision,
                Err(err) => {
                    tracing::warn!(error = %err, "ACME: cannot read the stored certificate and order lease");
                    tokio::select! {
                        () = &mut stop => return,
                        () = tokio::time::sleep(WAIT_POLL) => continue,
                    }
                }
            };
            if let Decision::Stored(cert) = decision {
                if let Err(err) = self.adopt(&cert) {
                    let delay = self.failed(err).await;
                    retry_at = Some(tokio::time::Instant::now() + delay);
                }
                continue;
            }
            if let Some(at) = self.renewal_not_due(now) {
                let wait = Duration::from_millis(at - now).min(MAX_SLEEP);
                tokio::select! {
                    () = &mut stop => return,
                    () = tokio::time::sleep(wait) => continue,
                }
            }
            let failures = match self.claim(decision, now).await {
                Ok(Some(failures)) => failures,
                Ok(None) => {
                    tokio::select! {
                        () = &mut stop => return,
                        () = tokio::time::sleep(WAIT_POLL) => continue,
                    }
                }
                Err(err) => {
                    tracing::warn!(error = %err, "ACME: cannot take the order lease");
                    tokio::select! {
                        () = &mut stop => return,
                        () = tokio::time::sleep(WAIT_POLL) => continue,
                    }
                }
            };
            self.status.with(|s| {
                s.phase = AcmePhase::Ordering;
                s.orders_started += 1;
                s.failures_in_row = failures;
                s.ordering_node = Some(self.node.clone());
            });
            tracing::info!(domains = ?self.settings.domains, directory = %self.settings.directory, node = %self.node, "ordering a certificate");
            let outcome = tokio::select! {
                () = &mut stop => {
                    self.release().await;
                    return;
                }
                outcome = tokio::time::timeout(ORDER_TIMEOUT, self.order()) => outcome,
            };
            let error = match outcome {
                Ok(Ok(pem)) => match self.cache.store_cert(&self.settings, &self.node, pem).await {
                    Ok(cert) => {
                        self.served(cert);
                        continue;
                    }
                    Err(err) => format!("cannot store the issued certificate: {err}"),
                },
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

    fn ask(&self, now_ms: u64) -> Ask {
        let issued = self.status.snapshot().issued;
        Ask {
            directory: self.settings.directory.clone(),
            domains: self.settings.domains.clone(),
            node: self.node.clone(),
            now_ms,
            shared: self.store.is_postgres(),
            newer_than_ms: if issued {
                self.slot.current().info.not_after_ms
            } else {
                now_ms
            },
        }
    }

    /// Takes the order lease in one serializable write, so that of several nodes finding
    /// it free at once exactly one gets it. `Some(failures)`: this node orders,
    /// continuing from that many failures in a row; `None`: it does not (another node
    /// holds the lease, or has stored the certificate, which is then served).
    async fn claim(&self, seen: Decision, now: u64) -> Result<Option<u32>, StoreError> {
        let decision = match seen {
            Decision::Free(_) => {
                let ask = self.ask(now);
                self.store
                    .write(move |tx| {
                        let decision = decide(tx, &ask)?;
                        if let Decision::Free(previous) = &decision {
                            let previous = previous.as_ref();
                            tx.put_acme_order_lease(&AcmeOrderLease {
                                directory: ask.directory.clone(),
                                domains: ask.domains.clone(),
                                holder: ask.node.clone(),
                                taken_at_ms: ask.now_ms,
                                expires_at_ms: ask.now_ms.saturating_add(crate::clock::millis(
                                    ORDER_TIMEOUT + TAKEOVER_GRACE,
                                )),
                                failures_in_row: previous.map_or(0, |lease| lease.failures_in_row),
                                last_error: previous.and_then(|lease| lease.last_error.clone()),
                                retry_at_ms: None,
                            })?;
                            // What an interrupted order left behind is no one's.
                            for name in &ask.domains {
                                tx.delete_acme_challenge(name)?;
                            }
                        }
                        Ok::<_, StoreError>(decision)
                    })
                    .await?
            }
            seen => seen,
        };
        match decision {
            Decision::Free(previous) => {
                if let Some(lease) = previous.as_ref().filter(|lease| lease.holder != self.node) {
                    tracing::warn!(
                        holder = %lease.holder,
                        "ACME: took over an order lease that had expired (its node stopped or lost the database)"
                    );
                }
                Ok(Some(previous.map_or(0, |lease| lease.failures_in_row)))
            }
            Decision::Held(lease) => {
                self.waiting(&lease);
                Ok(None)
            }
            Decision::Stored(cert) => {
                if let Err(err) = self.adopt(&cert) {
                    tracing::error!(error = %err, "ACME: the stored certificate cannot be served");
                }
                Ok(None)
            }
        }
    }

    /// Shows that another node orders (and how its orders fare).
    fn waiting(&self, lease: &AcmeOrderLease) {
        let first = self.status.with(|s| {
            let first = s.phase != AcmePhase::Waiting;
            s.phase = AcmePhase::Waiting;
            s.ordering_node = Some(lease.holder.clone());
            s.failures_in_row = lease.failures_in_row;
            s.last_error.clone_from(&lease.last_error);
            s.next_attempt_at_ms = lease.retry_at_ms;
            first
        });
        if first {
            tracing::info!(
                holder = %lease.holder,
                until = %format_rfc3339(lease.expires_at_ms),
                "ACME: another node is ordering the certificate; waiting for it"
            );
        }
    }

    /// Serves a certificate another node (or an earlier run) stored.
    fn adopt(&self, cert: &AcmeCertificate) -> Result<(), String> {
        let served = ServedCert::from_pem(&cert.pem)
            .map_err(|e| format!("the stored certificate cannot be served: {e}"))?;
        let info = served.info.clone();
        tracing::info!(
            names = ?info.names,
            issuer = %info.issuer,
            not_after = %format_rfc3339(info.not_after_ms),
            "serving the certificate another node ordered"
        );
        self.slot.replace(served);
        self.status.with(|s| {
            s.phase = AcmePhase::Valid;
            s.issued = true;
            s.failures_in_row = 0;
            s.last_error = None;
            s.next_attempt_at_ms = None;
            s.ordering_node = None;
            s.renew_at_ms = Some(info.renew_at_ms());
        });
        Ok(())
    }

    /// Ends an order cut short by a stop: the lease expires at once (keeping its failure
    /// count) and the challenges go, so another node need not wait for the timeout.
    async fn release(&self) {
        let now = self.clock.now_ms();
        let (directory, domains, node) = (
            self.settings.directory.clone(),
            self.settings.domains.clone(),
            self.node.clone(),
        );
        let write = self.store.write(move |tx| {
            if let Some(mut lease) = tx.acme_order_lease(&directory, &domains)?
                && lease.holder == node
            {
                lease.expires_at_ms = now;
                tx.put_acme_order_lease(&lease)?;
                for name in &domains {
                    tx.delete_acme_challenge(name)?;
                }
            }
            Ok::<_, StoreError>(())
        });
        match tokio::time::timeout(RELEASE_TIMEOUT, write).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                tracing::warn!(error = %err, "ACME: could not release the order lease; it expires by itself");
            }
            Err(_) => tracing::warn!(
                "ACME: releasing the order lease took too long; it expires by itself"
            ),
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

    /// The account key for the directory, made and stored on the first order.
    async fn account_key(&self) -> Result<Vec<u8>, String> {
        if let Some(key) = self.cache.load_account(&self.settings.directory)? {
            return Ok(key);
        }
        let key = rustls_acme::acme::Account::generate_key_pair();
        self.cache
            .save_account(&self.settings.contact, &self.settings.directory, &key, None)
            .await?;
        Ok(key)
    }

    /// One order, start to finish; the PEM to store (key, then chain). Each challenge is
    /// sealed in the store before the CA is told to validate, so whichever node the CA
    /// reaches can answer it.
    async fn order(&self) -> Result<Vec<u8>, String> {
        self.bind_account().await?;
        let key = self.account_key().await?;
        let settings = &self.settings;
        let ca = Ca::connect(
            &settings.client,
            &settings.directory,
            &settings.contact,
            &key,
        )
        .await?;
        let open = ca.new_order(&settings.domains).await?;
        let challenges = self.status.challenges();
        let _forget = ChallengeGuard(challenges);
        for authorization in open.authorizations() {
            let Some(challenge) = ca.challenge(&authorization, &settings.domains).await? else {
                continue;
            };
            let record = challenge_certificate(
                &settings.directory,
                &challenge.name,
                &challenge.key_authorization_sha256,
                self.clock.now_ms(),
                ORDER_TIMEOUT,
            )
            .map_err(|e| format!("cannot make the challenge certificate: {e}"))?;
            challenges
                .open(&record)
                .map_err(|e| format!("cannot serve the challenge certificate: {e}"))?;
            let stored = record.clone();
            self.store
                .write(move |tx| tx.put_acme_challenge(&stored))
                .await
                .map_err(|e| format!("cannot store the challenge: {e}"))?;
            let validated = ca.validate(&challenge).await;
            challenges.close(&challenge.name);
            let name = challenge.name.clone();
            if let Err(err) = self
                .store
                .write(move |tx| tx.delete_acme_challenge(&name))
                .await
            {
                tracing::warn!(error = %err, "ACME: cannot remove a finished challenge; it expires by itself");
            }
            validated?;
        }
        ca.finish(open, &settings.domains).await
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
            s.ordering_node = None;
            s.renew_at_ms = Some(info.renew_at_ms());
        });
    }

    /// Records a failed order; returns how long to wait before the next. The lease stays
    /// this node's until then (and a grace after), so the backoff holds for the cluster:
    /// the other nodes wait rather than order in turn.
    async fn failed(&self, error: String) -> Duration {
        let error: String = error.chars().take(MAX_ERROR_CHARS).collect();
        let now = self.clock.now_ms();
        // Worked out now, shown once the failure's record is written (one order runs at
        // a time, so nothing changes the count meanwhile): whoever sees the state can
        // read the record.
        let attempt = self.status.with(|s| s.failures_in_row.saturating_add(1));
        let delay = retry_delay(self.settings.retry, attempt);
        let serving = self.slot.current().info.clone();
        tracing::warn!(
            %error,
            attempt,
            retry_in = %humantime::format_duration(delay),
            serving_until = %format_rfc3339(serving.not_after_ms),
            "ACME order failed; the current certificate is still served"
        );
        let shown_error = error.clone();
        let event = Event::failure("tls.certificate_failed")
            .detail("error", error.clone())
            .detail("attempt", attempt)
            .detail("retry_in_seconds", delay.as_secs())
            .detail("directory", self.settings.directory.clone())
            .detail("names", self.settings.domains.clone())
            .detail("node", self.node.clone());
        let (directory, domains, node) = (
            self.settings.directory.clone(),
            self.settings.domains.clone(),
            self.node.clone(),
        );
        let retry_at = now.saturating_add(crate::clock::millis(delay));
        if let Err(err) = self
            .store
            .write(move |tx| {
                audit::append(tx, &Origin::system(), &event, now)?;
                if let Some(mut lease) = tx.acme_order_lease(&directory, &domains)?
                    && lease.holder == node
                {
                    lease.failures_in_row = attempt;
                    lease.last_error = Some(error.clone());
                    lease.retry_at_ms = Some(retry_at);
                    lease.expires_at_ms =
                        retry_at.saturating_add(crate::clock::millis(TAKEOVER_GRACE));
                    tx.put_acme_order_lease(&lease)?;
                    for name in &domains {
                        tx.delete_acme_challenge(name)?;
                    }
                }
                Ok::<_, StoreError>(())
            })
            .await
        {
            tracing::error!(error = %err, "cannot audit the failed ACME order");
        }
        self.status.with(|s| {
            s.failures_in_row = attempt;
            s.failures_total += 1;
            s.phase = AcmePhase::Retrying;
            s.last_error = Some(shown_error);
            s.last_failure_at_ms = Some(now);
            s.next_attempt_at_ms = Some(now + crate::clock::millis(delay));
            s.ordering_node = Some(self.node.clone());
        });
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
