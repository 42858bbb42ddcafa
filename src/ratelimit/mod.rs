//! Rate limits: the window arithmetic, and the in-memory table of who has spent what.
//!
//! The algorithm is GCRA (the generic cell rate algorithm), a sliding window kept as one
//! number per subject: the theoretical arrival time (TAT) of the next request. A policy
//! of `limit` requests per `window` admits a request at `now` when `TAT - now` stays
//! within `window - window/limit`, then moves TAT on by `window/limit`. It behaves like a
//! sliding window with no boundary bursts (a fixed window lets through twice the limit
//! across a boundary), needs one `u64` per subject instead of a list of timestamps or two
//! counters, and a subject whose TAT has passed is indistinguishable from a new one, so
//! idle entries can be forgotten without losing anything. That also makes persistence a
//! matter of writing one number per subject.
//!
//! The table is sharded (64 shards, each behind its own mutex) so that decisions on
//! different subjects do not contend; a subject's key is fixed-size, hashed with the
//! standard library's keyed SipHash, so an attacker choosing addresses cannot aim at one
//! bucket. Memory is bounded by `max_keys`: a full shard first forgets subjects whose
//! budget is whole again, then the one closest to it. This module must not know HTTP.

mod gcra;
mod lockout;
mod table;

use crate::audit::{AuditLog, Event, Origin, Severity};
use crate::clock::{SharedClock, format_rfc3339};
use crate::ids::{ClientId, DeviceId};
use crate::store::records::RateWindow;
use crate::store::{RATE_WINDOWS, Store, StoreError};
use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

pub use gcra::{Decision, Policy, decide};
pub use lockout::{Ban, BanError, FailedCheck, Lockout, LockoutPolicy};
pub use table::{BYTES_PER_KEY, RateTable, Window};

use table::Changed;

/// Who is limited: a client address (IPv6 by its /64, since one host usually holds a
/// whole /64), a device or an API client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Subject {
    Ip(IpAddr),
    Device(DeviceId),
    Client(ClientId),
}

impl Subject {
    /// The address as limited: IPv4 as is (also when mapped into IPv6), IPv6 cut to /64.
    pub fn ip(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Self::Ip(IpAddr::V4(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self::Ip(IpAddr::V4(v4)),
                None => {
                    let masked = u128::from(v6) & !((1u128 << 64) - 1);
                    Self::Ip(IpAddr::V6(masked.into()))
                }
            },
        }
    }

    /// Fixed-size key bytes: a tag and 16 bytes.
    pub(crate) fn key_bytes(&self) -> [u8; 17] {
        let mut out = [0u8; 17];
        match self {
            Self::Ip(IpAddr::V4(v4)) => {
                out[0] = 1;
                out[1..5].copy_from_slice(&v4.octets());
            }
            Self::Ip(IpAddr::V6(v6)) => {
                out[0] = 2;
                out[1..].copy_from_slice(&v6.octets());
            }
            Self::Device(id) => {
                out[0] = 3;
                out[1..].copy_from_slice(id.as_bytes());
            }
            Self::Client(id) => {
                out[0] = 4;
                out[1..].copy_from_slice(id.as_bytes());
            }
        }
        out
    }

    /// Reads the text form back (`ip:…`, `device:…`, `client:…`); an address is
    /// normalised as `Subject::ip` does, so `ip:2001:db8:1:2::5` names its /64.
    pub(crate) fn parse(text: &str) -> Option<Self> {
        let (kind, rest) = text.split_once(':')?;
        match kind {
            "ip" => {
                let address = rest.strip_suffix("/64").unwrap_or(rest);
                let ip: IpAddr = address.parse().ok()?;
                if rest.ends_with("/64") && !ip.is_ipv6() {
                    return None;
                }
                Some(Self::ip(ip))
            }
            "device" => rest.parse().ok().map(Self::Device),
            "client" => rest.parse().ok().map(Self::Client),
            _ => None,
        }
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ip(IpAddr::V4(v4)) => write!(f, "ip:{v4}"),
            Self::Ip(IpAddr::V6(v6)) => write!(f, "ip:{}/64", v6),
            Self::Device(id) => write!(f, "device:{id}"),
            Self::Client(id) => write!(f, "client:{id}"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The limits of the instance: policies, the table, and write-behind persistence

/// The policies gatehouse applies, by number (the number is stored: append only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub(crate) enum PolicyId {
    /// `POST /v1/pair` and WebSocket `pair`, per client address.
    Pairing = 0,
    /// Refresh-token grants (REST and WebSocket), per device.
    Refresh = 1,
    /// `POST /v1/introspect`, per client (or per address for admin tokens).
    Introspection = 2,
    /// Failed admin sign-ins per client address (a valid admin token never counts).
    AdminLogin = 3,
    /// WebSocket messages, per device (per address before authentication).
    WsMessages = 4,
    /// Every HTTP request, per client address.
    PerIp = 5,
    /// Failed secret checks per client address, toward a lockout ban.
    Failures = 6,
}

/// The configured policies; `None` turns a policy off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policies {
    pub pairing: Option<Policy>,
    pub refresh: Option<Policy>,
    pub introspection: Option<Policy>,
    pub admin_login: Option<Policy>,
    pub ws_messages: Option<Policy>,
    pub per_ip: Option<Policy>,
    pub(crate) failures: Policy,
}

impl Policies {
    fn get(&self, id: PolicyId) -> Option<&Policy> {
        match id {
            PolicyId::Pairing => self.pairing.as_ref(),
            PolicyId::Refresh => self.refresh.as_ref(),
            PolicyId::Introspection => self.introspection.as_ref(),
            PolicyId::AdminLogin => self.admin_login.as_ref(),
            PolicyId::WsMessages => self.ws_messages.as_ref(),
            PolicyId::PerIp => self.per_ip.as_ref(),
            PolicyId::Failures => Some(&self.failures),
        }
    }
}

/// A refused request: the decision and the policy that refused it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limited {
    pub(crate) decision: Decision,
    pub(crate) policy: Policy,
}

/// The first policy number of the routes' own policies (`[[routes]] rate`).
const ROUTE_POLICIES: u8 = 128;

/// Refusals are audited coalesced: one record per policy and subject per interval.
const MAX_REFUSAL_SUBJECTS: usize = 1024;

#[derive(Debug, Default)]
struct Refusals {
    /// By policy number and subject: how many, and the policy's name.
    by_subject: HashMap<(u8, Subject), (u64, String)>,
    /// Refusals of subjects beyond `MAX_REFUSAL_SUBJECTS` in one interval.
    overflow: u64,
}

/// Rate limits over the data file: decisions in memory, windows written behind.
#[derive(Debug)]
pub struct RateLimits {
    table: RateTable,
    policies: Policies,
    store: Store,
    clock: SharedClock,
    refusals: Mutex<Refusals>,
    refused_total: AtomicU64,
    /// How far one request moves the TAT, by policy number (routes' included), as last
    /// seen in a decision: what a flush adds to a window nodes share per request.
    intervals: Box<[AtomicU64]>,
}

fn window_key(policy_id: u8, subject: &[u8; 17]) -> String {
    let mut bytes = [0u8; 18];
    bytes[0] = policy_id;
    bytes[1..].copy_from_slice(subject);
    data_encoding::HEXLOWER.encode(&bytes)
}

/// The policy id and subject of a stored window's key (see `window_key`), or `None` for a
/// key this build never writes.
fn parse_window_key(key: &str) -> Option<(u8, [u8; 17])> {
    let bytes = data_encoding::HEXLOWER.decode(key.as_bytes()).ok()?;
    let (&policy_id, subject) = bytes.split_first()?;
    Some((policy_id, <[u8; 17]>::try_from(subject).ok()?))
}

impl RateLimits {
    /// Loads the windows that are still running from the data file.
    pub(crate) fn load(
        store: Store,
        clock: SharedClock,
        policies: Policies,
        max_keys: usize,
    ) -> Result<Self, StoreError> {
        let table = RateTable::new(max_keys);
        let now_us = clock.now_ms().saturating_mul(1000);
        for (key, window) in store.read(|tx| tx.all(&RATE_WINDOWS))? {
            // A damaged row is skipped: a window is only a count, and start must not fail.
            let Some((policy_id, subject)) = parse_window_key(&key) else {
                continue;
            };
            if window.tat_us > now_us {
                table.restore(&Window {
                    policy_id,
                    subject,
                    tat_us: window.tat_us,
                });
            }
        }
        Ok(Self {
            table,
            policies,
            store,
            clock,
            refusals: Mutex::default(),
            refused_total: AtomicU64::new(0),
            intervals: (0..=u8::MAX).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    /// Notes policy `number`'s interval; a read first, so that deciding on many cores
    /// does not keep writing one shared cache line.
    fn note_interval(&self, number: u8, policy: &Policy) {
        let slot = &self.intervals[usize::from(number)];
        let interval = policy.interval_us();
        if slot.load(Ordering::Relaxed) != interval {
            slot.store(interval, Ordering::Relaxed);
        }
    }

    pub fn policies(&self) -> &Policies {
        &self.policies
    }

    fn now_us(&self) -> u64 {
        self.clock.now_ms().saturating_mul(1000)
    }

    /// Spends one request of `subject` under policy `id`; `Err` when it is refused (the
    /// refusal is counted for the coalesced audit record). A policy that is off admits
    /// everything.
    pub(crate) fn limit(&self, id: PolicyId, subject: &Subject) -> Result<(), Box<Limited>> {
        match self.policies.get(id) {
            Some(policy) => self.spend(id as u8, policy, subject),
            None => Ok(()),
        }
    }

    /// Spends one request of `subject` under `policy`, stored as policy `number`; a
    /// refusal is counted for the coalesced audit record.
    fn spend(&self, number: u8, policy: &Policy, subject: &Subject) -> Result<(), Box<Limited>> {
        self.note_interval(number, policy);
        let decision = self.table.check(number, policy, subject, self.now_us());
        if decision.allowed {
            return Ok(());
        }
        self.note_refused_named(number, &policy.name, subject);
        Err(Box::new(Limited {
            decision,
            policy: policy.clone(),
        }))
    }

    /// Spends one request of `subject` on the route at `position` of `[[routes]]`, under
    /// that route's own `policy`. Its windows are stored under policy number 128 +
    /// `position`, apart from every fixed policy.
    pub(crate) fn limit_route(
        &self,
        position: usize,
        policy: &Policy,
        subject: &Subject,
    ) -> Result<(), Box<Limited>> {
        let number = u8::try_from(position).map_or(u8::MAX, |p| p.saturating_add(ROUTE_POLICIES));
        self.spend(number, policy, subject)
    }

    /// Whether `subject` has budget left under `id`, without spending any.
    pub(crate) fn has_budget(&self, id: PolicyId, subject: &Subject) -> Result<(), Box<Limited>> {
        let Some(policy) = self.policies.get(id) else {
            return Ok(());
        };
        let decision = self.table.peek(id as u8, policy, subject, self.now_us());
        if decision.allowed {
            return Ok(());
        }
        self.note_refused(id, subject);
        Err(Box::new(Limited {
            decision,
            policy: policy.clone(),
        }))
    }

    /// Charges one failed secret check; true when it went over the lockout limit.
    pub(crate) fn charge_failure(&self, subject: &Subject) -> bool {
        let policy = &self.policies.failures;
        self.note_interval(PolicyId::Failures as u8, policy);
        !self
            .table
            .check(PolicyId::Failures as u8, policy, subject, self.now_us())
            .allowed
    }

    fn note_refused(&self, id: PolicyId, subject: &Subject) {
        let name = self.policies.get(id).map_or("off", |p| p.name.as_str());
        self.note_refused_named(id as u8, name, subject);
    }

    fn note_refused_named(&self, number: u8, name: &str, subject: &Subject) {
        self.refused_total.fetch_add(1, Ordering::Relaxed);
        let mut refusals = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
        let full = refusals.by_subject.len() >= MAX_REFUSAL_SUBJECTS;
        match refusals.by_subject.get_mut(&(number, *subject)) {
            Some((count, _)) => *count += 1,
            None if full => refusals.overflow += 1,
            None => {
                refusals
                    .by_subject
                    .insert((number, *subject), (1, name.to_string()));
            }
        }
    }

    /// Subjects tracked in memory now, for metrics.
    pub(crate) fn tracked(&self) -> usize {
        self.table.len()
    }

    /// Requests refused since start, for metrics.
    pub fn refused_total(&self) -> u64 {
        self.refused_total.load(Ordering::Relaxed)
    }

    /// Writes one `ratelimit.exceeded` record per policy and subject refused since the
    /// last call (and one for the overflow), all in one transaction. Called every minute
    /// and at stop.
    pub async fn audit_refusals(
        &self,
        audit: &AuditLog,
        since_ms: u64,
    ) -> Result<usize, StoreError> {
        let taken = std::mem::take(&mut *self.refusals.lock().unwrap_or_else(|p| p.into_inner()));
        if taken.by_subject.is_empty() && taken.overflow == 0 {
            return Ok(0);
        }
        let mut events: Vec<(Origin, Event)> = Vec::with_capacity(taken.by_subject.len() + 1);
        for ((_, subject), (count, name)) in taken.by_subject {
            let origin = match subject {
                Subject::Ip(ip) => Origin::request(ip, None),
                Subject::Device(device) => {
                    Origin::system().as_actor(crate::audit::Actor::Device(device.to_string()))
                }
                Subject::Client(client) => {
                    Origin::system().as_actor(crate::audit::Actor::Client(client.to_string()))
                }
            };
            let mut event = Event::failure("ratelimit.exceeded")
                .severity(Severity::Notice)
                .detail("policy", name)
                .detail("subject", subject.to_string())
                .detail("refused", count)
                .detail("since", format_rfc3339(since_ms));
            if let Subject::Device(device) = subject {
                event = event.device(device);
            }
            events.push((origin, event));
        }
        if taken.overflow > 0 {
            events.push((
                Origin::system(),
                Event::failure("ratelimit.exceeded")
                    .severity(Severity::Notice)
                    .detail("subject", "other subjects")
                    .detail("refused", taken.overflow)
                    .detail("since", format_rfc3339(since_ms)),
            ));
        }
        let count = events.len();
        audit.record_many(events).await?;
        Ok(count)
    }

    /// Writes the windows changed since the last flush. Called about once a second and
    /// at stop; a crash loses at most the last second of counting.
    ///
    /// Nodes sharing a database share the windows too: each adds what it admitted since
    /// its last flush to the stored window (one interval per request, from the later of
    /// the stored TAT and now) and takes the sum back, so within one flush a node learns
    /// what the others spent. Until then each node decides alone: a subject spread over
    /// N nodes gets at most what each would grant it in one flush interval beyond the
    /// budget, and the shared window then holds all of it, to be paid back.
    pub(crate) async fn flush(&self) -> Result<usize, StoreError> {
        let changed = self.table.take_changed(self.now_us());
        let count = changed.len();
        if count == 0 {
            return Ok(0);
        }
        if !self.store.is_postgres() {
            self.store
                .write(move |tx| -> Result<(), StoreError> {
                    for Changed { window, .. } in &changed {
                        tx.put(
                            &RATE_WINDOWS,
                            &window_key(window.policy_id, &window.subject),
                            &RateWindow {
                                tat_us: window.tat_us,
                            },
                        )?;
                    }
                    Ok(())
                })
                .await?;
            return Ok(count);
        }
        let advances: Vec<u64> = changed
            .iter()
            .map(|c| {
                let interval =
                    self.intervals[usize::from(c.window.policy_id)].load(Ordering::Relaxed);
                interval.saturating_mul(u64::from(c.spent))
            })
            .collect();
        let clock = self.clock.clone();
        let windows: Vec<Window> = changed.iter().map(|c| c.window).collect();
        let shared = self
            .store
            .write(move |tx| -> Result<Vec<u64>, StoreError> {
                let now_us = clock.now_ms().saturating_mul(1000);
                let keys: Vec<String> = windows
                    .iter()
                    .map(|w| window_key(w.policy_id, &w.subject))
                    .collect();
                let stored = tx.get_many(&RATE_WINDOWS, &keys)?;
                let mut shared = Vec::with_capacity(keys.len());
                for ((key, stored), advance) in keys.iter().zip(stored).zip(&advances) {
                    let tat_us = stored
                        .map_or(now_us, |s| s.tat_us.max(now_us))
                        .saturating_add(*advance);
                    tx.put(&RATE_WINDOWS, key, &RateWindow { tat_us })?;
                    shared.push(tat_us);
                }
                Ok(shared)
            })
            .await?;
        for (changed, tat_us) in changed.iter().zip(shared) {
            self.table.merge(&changed.window, tat_us);
        }
        Ok(count)
    }

    /// Deletes stored windows whose budget is whole again (a missing window means the
    /// same). For the periodic housekeeping, not the per-second flush.
    pub(crate) async fn prune(&self) -> Result<u64, StoreError> {
        let now_us = self.now_us();
        self.store
            .write(move |tx| tx.retain(&RATE_WINDOWS, |_, w| w.tat_us > now_us))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_subjects_are_their_slash_64_and_mapped_ipv4_is_ipv4() {
        let a = Subject::ip(
            "2001:db8:1:2:aaaa::1"
                .parse()
                .unwrap_or(IpAddr::from([0; 4])),
        );
        let b = Subject::ip(
            "2001:db8:1:2:bbbb::9"
                .parse()
                .unwrap_or(IpAddr::from([0; 4])),
        );
        let c = Subject::ip("2001:db8:1:3::1".parse().unwrap_or(IpAddr::from([0; 4])));
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mapped = Subject::ip("::ffff:10.0.0.1".parse().unwrap_or(IpAddr::from([0; 4])));
        assert_eq!(mapped, Subject::ip(IpAddr::from([10, 0, 0, 1])));
    }

    #[test]
    fn a_window_key_round_trips_and_damaged_keys_are_refused() {
        let subject = [7u8; 17];
        assert_eq!(
            parse_window_key(&window_key(3, &subject)),
            Some((3, subject))
        );
        for damaged in ["", "zz", "03", &"00".repeat(17), &"00".repeat(19)] {
            assert_eq!(parse_window_key(damaged), None, "{damaged:?}");
        }
    }
}
