//! Brute-force lockout: failed secret checks counted per client address, and bans.
//!
//! Every failed check of a pairing secret, an admin token, an admin password or a
//! client credential is charged to the caller's address under the `failures` policy
//! (a GCRA window like any other). When a failure does not fit in that window the
//! address is banned for `ban`, doubled for each ban in a row up to `max_ban`; a ban
//! in a row is one that starts while the previous one is remembered (until `max_ban`
//! after it ended). Bans are written through: the ban row and its audit record commit
//! in the same transaction as the failure's own audit record, before the refusal is
//! sent. They are mirrored in memory, so the check on every request is an atomic load
//! while no ban is active.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::RwLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde::Serialize;

use super::{RateLimits, Subject};
use crate::audit::{self, Event, Origin, Severity};
use crate::clock::{SharedClock, format_rfc3339, millis};
use crate::error_kind::{Classify, ErrorKind};
use crate::store::records::Ban as BanRecord;
use crate::store::{BANS, Store, StoreError};

/// When failures turn into bans, and for how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockoutPolicy {
    /// Failures allowed per `window` before a ban.
    pub(crate) max_failures: u32,
    pub(crate) window: Duration,
    /// The first ban's length.
    pub(crate) ban: Duration,
    /// The longest ban, and how long a past ban counts toward the next one.
    pub(crate) max_ban: Duration,
}

/// Which secret check failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailedCheck {
    PairingSecret,
    AdminToken,
    AdminPassword,
    ClientCredential,
    /// A device polling with a device code that is not one (RFC 8628).
    DeviceCode,
    /// An operator typing a user code that names no waiting device.
    UserCode,
}

impl FailedCheck {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::PairingSecret => "pairing_secret",
            Self::AdminToken => "admin_token",
            Self::AdminPassword => "admin_password",
            Self::ClientCredential => "client_credential",
            Self::DeviceCode => "device_code",
            Self::UserCode => "user_code",
        }
    }
}

/// A ban as the API and the CLI show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Ban {
    /// The subject: `ip:203.0.113.7` or `ip:2001:db8:1:2::/64`.
    pub key: String,
    pub since: String,
    pub until: String,
    /// Seconds left (0 once it has ended).
    pub remaining_seconds: u64,
    /// Bans in a row for this subject, this one included.
    pub offences: u32,
    pub reason: String,
    pub active: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum BanError {
    #[error("no ban for {0}")]
    NotFound(String),
    #[error(
        "{0} is not a ban key; expected ip:ADDRESS (IPv6 as its /64, e.g. ip:2001:db8:1:2::/64)"
    )]
    BadKey(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Classify for BanError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::NotFound(_) => ErrorKind::NotFound,
            Self::BadKey(_) => ErrorKind::Invalid,
            Self::Store(err) => err.kind(),
        }
    }
}

fn view(subject: &Subject, ban: &BanRecord, now_ms: u64) -> Ban {
    let active = ban.lifted_at_ms.is_none() && ban.until_ms > now_ms;
    Ban {
        key: subject.to_string(),
        since: format_rfc3339(ban.since_ms),
        until: format_rfc3339(ban.lifted_at_ms.unwrap_or(ban.until_ms)),
        remaining_seconds: if active {
            (ban.until_ms - now_ms).div_ceil(1000)
        } else {
            0
        },
        offences: ban.offences,
        reason: ban.reason.clone(),
        active,
    }
}

/// The lockout of one instance.
#[derive(Debug)]
pub struct Lockout {
    policy: LockoutPolicy,
    /// Every ban row, active or remembered, by subject.
    bans: RwLock<HashMap<Subject, BanRecord>>,
    /// How many of those are active (or were at their last check): zero skips the map.
    active: AtomicUsize,
    store: Store,
    clock: SharedClock,
}

impl Lockout {
    /// Loads the bans from the data file.
    pub(crate) fn load(
        store: Store,
        clock: SharedClock,
        policy: LockoutPolicy,
    ) -> Result<Self, StoreError> {
        let now = clock.now_ms();
        let mut bans = HashMap::new();
        for (key, ban) in store.read(|tx| tx.all(&BANS))? {
            match Subject::parse(&key) {
                Some(subject) => {
                    bans.insert(subject, ban);
                }
                None => tracing::warn!(key, "ignoring a ban with an unreadable key"),
            }
        }
        let active = bans
            .values()
            .filter(|b| b.lifted_at_ms.is_none() && b.until_ms > now)
            .count();
        Ok(Self {
            policy,
            bans: RwLock::new(bans),
            active: AtomicUsize::new(active),
            store,
            clock,
        })
    }

    /// Mirrors one ban row another node wrote or removed (the change feed).
    pub(crate) fn apply_change(&self, key: &str, value: Option<&[u8]>) -> Result<(), StoreError> {
        let Some(subject) = Subject::parse(key) else {
            return Ok(());
        };
        let row = value.map(|value| BANS.decode_row(key, value)).transpose()?;
        {
            let mut bans = self.bans.write().unwrap_or_else(|p| p.into_inner());
            match row {
                Some(ban) => bans.insert(subject, ban),
                None => bans.remove(&subject),
            };
        }
        self.recount(self.clock.now_ms());
        Ok(())
    }

    /// Re-reads every ban (after a break in the change feed).
    pub(crate) fn reload(&self) -> Result<(), StoreError> {
        let fresh = Self::load(self.store.clone(), self.clock.clone(), self.policy.clone())?;
        let bans = std::mem::take(&mut *fresh.bans.write().unwrap_or_else(|p| p.into_inner()));
        *self.bans.write().unwrap_or_else(|p| p.into_inner()) = bans;
        self.recount(self.clock.now_ms());
        Ok(())
    }

    /// Bans in force now, for metrics.
    pub(crate) fn active(&self) -> usize {
        self.recount(self.clock.now_ms());
        self.active.load(Ordering::Relaxed)
    }

    /// The time left on `ip`'s ban, if it is banned now. Checked by every HTTP request
    /// and by pairing (so a WebSocket opened before a ban cannot keep guessing).
    pub fn banned(&self, ip: IpAddr) -> Option<Duration> {
        if self.active.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let now = self.clock.now_ms();
        let bans = self.bans.read().unwrap_or_else(|p| p.into_inner());
        let ban = bans.get(&Subject::ip(ip))?;
        (ban.lifted_at_ms.is_none() && ban.until_ms > now)
            .then(|| Duration::from_millis(ban.until_ms - now))
    }

    /// Records a failed secret check: `event` (the failure's own audit record) is
    /// written, the failure is charged to the caller's address, and when that goes over
    /// the limit a ban is written in the same transaction. Returns the new ban, if any.
    pub(crate) async fn record_failure(
        &self,
        limits: &RateLimits,
        origin: &Origin,
        check: FailedCheck,
        event: Event,
    ) -> Result<Option<Ban>, StoreError> {
        let event = event.detail("check", check.as_str());
        let Some(ip) = origin.source else {
            let origin = origin.clone();
            let clock = self.clock.clone();
            self.store
                .write(move |tx| audit::append(tx, &origin, &event, clock.now_ms()))
                .await?;
            return Ok(None);
        };
        let subject = Subject::ip(ip);
        let over = limits.charge_failure(&subject);
        let now = self.clock.now_ms();
        // Decided and put in force under the map's write lock, before the durable write:
        // of concurrent failures exactly one starts the ban, and a failure while a ban
        // runs (a socket opened before it) neither replaces nor escalates it.
        let new_ban = if over {
            self.start_ban(&subject, check, now)
        } else {
            None
        };
        let origin = origin.clone();
        let key = subject.to_string();
        let written = new_ban.clone();
        let clock = self.clock.clone();
        self.store
            .write(move |tx| {
                let now = clock.now_ms();
                audit::append(tx, &origin, &event, now)?;
                if let Some(ban) = &written {
                    tx.put(&BANS, &key, ban)?;
                    let event = Event::new("ban.created")
                        .severity(Severity::High)
                        .detail("key", key.clone())
                        .detail("until", format_rfc3339(ban.until_ms))
                        .detail("offences", ban.offences)
                        .detail("reason", ban.reason.clone());
                    audit::append(tx, &origin.as_actor(audit::Actor::System), &event, now)?;
                }
                Ok::<_, StoreError>(())
            })
            .await?;
        let Some(ban) = new_ban else {
            return Ok(None);
        };
        tracing::warn!(subject = %subject, until = %format_rfc3339(ban.until_ms), offences = ban.offences, "banned after repeated failed secret checks");
        Ok(Some(view(&subject, &ban, now)))
    }

    /// Starts a ban on `subject` unless one is in force; returns the new ban.
    fn start_ban(&self, subject: &Subject, check: FailedCheck, now: u64) -> Option<BanRecord> {
        let mut bans = self.bans.write().unwrap_or_else(|p| p.into_inner());
        if bans
            .get(subject)
            .is_some_and(|b| b.lifted_at_ms.is_none() && b.until_ms > now)
        {
            return None;
        }
        let ban = Self::next_ban(&self.policy, bans.get(subject), check, now);
        bans.insert(*subject, ban.clone());
        let active = bans
            .values()
            .filter(|b| b.lifted_at_ms.is_none() && b.until_ms > now)
            .count();
        self.active.store(active, Ordering::Relaxed);
        Some(ban)
    }

    fn next_ban(
        policy: &LockoutPolicy,
        previous: Option<&BanRecord>,
        check: FailedCheck,
        now: u64,
    ) -> BanRecord {
        let max_ban = millis(policy.max_ban);
        let offences = match previous {
            Some(previous)
                if previous
                    .lifted_at_ms
                    .unwrap_or(previous.until_ms)
                    .saturating_add(max_ban)
                    > now =>
            {
                previous.offences.saturating_add(1)
            }
            _ => 1,
        };
        let factor = 1u64 << (offences - 1).min(32);
        let length = millis(policy.ban).saturating_mul(factor).min(max_ban);
        BanRecord {
            since_ms: now,
            until_ms: now.saturating_add(length),
            offences,
            reason: check.as_str().to_string(),
            lifted_at_ms: None,
        }
    }

    fn recount(&self, now: u64) {
        let bans = self.bans.read().unwrap_or_else(|p| p.into_inner());
        let active = bans
            .values()
            .filter(|b| b.lifted_at_ms.is_none() && b.until_ms > now)
            .count();
        self.active.store(active, Ordering::Relaxed);
    }

    /// Every ban that is active or still remembered, newest first.
    pub fn list(&self) -> Vec<Ban> {
        let now = self.clock.now_ms();
        self.recount(now);
        let bans = self.bans.read().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<(u64, Ban)> = bans
            .iter()
            .map(|(subject, ban)| (ban.since_ms, view(subject, ban, now)))
            .collect();
        out.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.key.cmp(&b.1.key)));
        out.into_iter().map(|(_, ban)| ban).collect()
    }

    /// Lifts the ban on `key` now (its memory stays, so a repeat still escalates), and
    /// writes `ban.lifted` in the same transaction.
    pub(crate) async fn lift(&self, key: &str, origin: &Origin) -> Result<Ban, BanError> {
        let subject = Subject::parse(key).ok_or_else(|| BanError::BadKey(key.to_string()))?;
        let mut ban = self
            .bans
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&subject)
            .cloned()
            .ok_or_else(|| BanError::NotFound(subject.to_string()))?;
        let now = self.clock.now_ms();
        let was_active = ban.lifted_at_ms.is_none() && ban.until_ms > now;
        if was_active {
            ban.lifted_at_ms = Some(now);
        }
        let key = subject.to_string();
        let written = ban.clone();
        let origin = origin.clone();
        let clock = self.clock.clone();
        self.store
            .write(move |tx| {
                tx.put(&BANS, &key, &written)?;
                let event = Event::new("ban.lifted")
                    .severity(Severity::Notice)
                    .detail("key", key.clone())
                    .detail("was_active", was_active);
                audit::append(tx, &origin, &event, clock.now_ms())?;
                Ok::<_, StoreError>(())
            })
            .await?;
        let shown = view(&subject, &ban, now);
        self.bans
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(subject, ban);
        self.recount(now);
        Ok(shown)
    }

    /// Forgets bans that no longer count toward a next one.
    pub async fn prune(&self) -> Result<u64, StoreError> {
        let now = self.clock.now_ms();
        let max_ban = millis(self.policy.max_ban);
        let lapsed = move |b: &BanRecord| {
            b.lifted_at_ms.unwrap_or(b.until_ms).saturating_add(max_ban) <= now
        };
        let removed = self
            .store
            .write(move |tx| tx.retain(&BANS, |_, b| !lapsed(b)))
            .await?;
        self.bans
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, b| !lapsed(b));
        self.recount(now);
        Ok(removed)
    }
}
