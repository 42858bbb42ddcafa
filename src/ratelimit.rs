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

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use crate::clock::SharedClock;
use crate::ids::{ClientId, DeviceId};
use crate::store::records::RateWindow;
use crate::store::{RATE_WINDOWS, Store, StoreError};

const SHARDS: usize = 64;

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
    fn key_bytes(&self) -> [u8; 17] {
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
}

/// `limit` requests per `window`, under a name that appears in `RateLimit-Policy`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub name: String,
    pub limit: u32,
    pub window: Duration,
}

impl Policy {
    pub fn new(name: &str, limit: u32, window: Duration) -> Self {
        Self {
            name: name.to_string(),
            limit: limit.max(1),
            window: window.max(Duration::from_millis(1)),
        }
    }

    /// Time between requests at the sustained rate, in microseconds.
    fn interval_us(&self) -> u64 {
        (u64::try_from(self.window.as_micros()).unwrap_or(u64::MAX) / u64::from(self.limit)).max(1)
    }

    /// How far ahead of now the TAT may run: the burst the policy allows.
    fn tolerance_us(&self) -> u64 {
        u64::try_from(self.window.as_micros())
            .unwrap_or(u64::MAX)
            .saturating_sub(self.interval_us())
    }
}

/// The answer for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// Requests still allowed right now after this one.
    pub remaining: u32,
    /// When a refused request may be retried.
    pub retry_after: Duration,
    /// When the budget is whole again.
    pub reset: Duration,
}

/// One GCRA step: the new TAT (if admitted) and the decision. Pure arithmetic on
/// microseconds.
pub fn decide(policy: &Policy, tat_us: Option<u64>, now_us: u64) -> (Option<u64>, Decision) {
    let interval = policy.interval_us();
    let tolerance = policy.tolerance_us();
    let tat = tat_us.unwrap_or(now_us).max(now_us);
    let ahead = tat - now_us;
    if ahead > tolerance {
        let wait = ahead - tolerance;
        return (
            None,
            Decision {
                allowed: false,
                remaining: 0,
                retry_after: Duration::from_micros(wait),
                reset: Duration::from_micros(ahead),
            },
        );
    }
    let new_tat = tat.saturating_add(interval);
    let used = new_tat - now_us;
    let remaining = (tolerance + interval).saturating_sub(used) / interval;
    (
        Some(new_tat),
        Decision {
            allowed: true,
            remaining: u32::try_from(remaining).unwrap_or(u32::MAX),
            retry_after: Duration::ZERO,
            reset: Duration::from_micros(used),
        },
    )
}

type Key = (u8, [u8; 17]);

#[derive(Debug, Clone, Copy)]
struct Entry {
    key: Key,
    tat_us: u64,
    /// Changed since it was last written (for write-behind persistence).
    changed: bool,
}

/// The shard maps hold the key's keyed SipHash, computed once per decision, so the map
/// itself must not hash again: this hasher passes the `u64` through.
#[derive(Debug, Default, Clone, Copy)]
struct PassThrough(u64);

impl std::hash::Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used; anything else folds in, so it is still correct.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type ShardMap = HashMap<u64, Entry, std::hash::BuildHasherDefault<PassThrough>>;

/// One shard, on its own cache lines so that two cores deciding in two shards do not
/// bounce a line between them.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Shard {
    entries: ShardMap,
}

/// One subject's window as it is persisted: policy number, subject key bytes and TAT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub policy_id: u8,
    pub subject: [u8; 17],
    pub tat_us: u64,
}

/// The in-memory table of every subject's TAT under every policy.
#[derive(Debug)]
pub struct RateTable {
    shards: Vec<Mutex<Shard>>,
    hasher: RandomState,
    per_shard: usize,
}

/// Bytes one tracked subject costs at most: a 40-byte slot (the 8-byte hash, then the
/// entry: TAT 8, key 18, flag 1, padded to 32) and a control byte, in a hash table kept
/// between half and 7/8 full, so 47 to 82 bytes; `max_keys` × 82 bounds the table.
pub const BYTES_PER_KEY: usize = 82;

impl RateTable {
    /// A table that tracks at most `max_keys` subjects (policy and subject pairs).
    pub fn new(max_keys: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            hasher: RandomState::new(),
            per_shard: max_keys.div_ceil(SHARDS).max(1),
        }
    }

    fn shard(&self, hash: u64) -> std::sync::MutexGuard<'_, Shard> {
        // The high bits pick the shard; the map inside uses the whole hash.
        #[allow(clippy::cast_possible_truncation)]
        let index = (hash >> 58) as usize % SHARDS;
        self.shards[index].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Decides one request of `subject` under policy number `policy_id`.
    pub fn check(
        &self,
        policy_id: u8,
        policy: &Policy,
        subject: &Subject,
        now_us: u64,
    ) -> Decision {
        let key = (policy_id, subject.key_bytes());
        let hash = self.hasher.hash_one(key);
        let mut shard = self.shard(hash);
        // Two keys with one 64-bit keyed hash would share an entry; the key is compared
        // so that the other is treated as new (its budget whole) rather than mixed in.
        let tat = shard
            .entries
            .get(&hash)
            .filter(|e| e.key == key)
            .map(|e| e.tat_us);
        let (new_tat, decision) = decide(policy, tat, now_us);
        if let Some(tat_us) = new_tat {
            if tat.is_none() && shard.entries.len() >= self.per_shard {
                Self::make_room(&mut shard, now_us);
            }
            shard.entries.insert(
                hash,
                Entry {
                    key,
                    tat_us,
                    changed: true,
                },
            );
        }
        decision
    }

    /// Forgets subjects whose budget is whole again; if none, the one nearest to it.
    fn make_room(shard: &mut Shard, now_us: u64) {
        let before = shard.entries.len();
        shard.entries.retain(|_, e| e.tat_us > now_us);
        if shard.entries.len() == before
            && let Some(hash) = shard
                .entries
                .iter()
                .min_by_key(|(_, e)| e.tat_us)
                .map(|(h, _)| *h)
        {
            shard.entries.remove(&hash);
        }
    }

    /// Entries changed since the last call, for the write-behind flush; entries whose
    /// budget is whole again are left out (a missing entry means the same).
    pub fn take_changed(&self, now_us: u64) -> Vec<Window> {
        let mut out = Vec::new();
        for shard in &self.shards {
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            for entry in shard.entries.values_mut().filter(|e| e.changed) {
                entry.changed = false;
                if entry.tat_us > now_us {
                    out.push(Window {
                        policy_id: entry.key.0,
                        subject: entry.key.1,
                        tat_us: entry.tat_us,
                    });
                }
            }
        }
        out
    }

    /// Puts back a window loaded from the data file at start (not marked changed).
    pub fn restore(&self, window: &Window) {
        let key = (window.policy_id, window.subject);
        let hash = self.hasher.hash_one(key);
        let mut shard = self.shard(hash);
        if shard.entries.len() < self.per_shard {
            shard.entries.insert(
                hash,
                Entry {
                    key,
                    tat_us: window.tat_us,
                    changed: false,
                },
            );
        }
    }

    /// Subjects tracked now.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).entries.len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

// ---------------------------------------------------------------------------------------
// The limits of the instance: policies, the table, and write-behind persistence

/// The policies gatehouse applies, by number (the number is stored: append only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PolicyId {
    /// `POST /v1/pair` and WebSocket `pair`, per client address.
    Pairing = 0,
}

/// The configured policies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policies {
    pub pairing: Policy,
}

impl Policies {
    fn get(&self, id: PolicyId) -> &Policy {
        match id {
            PolicyId::Pairing => &self.pairing,
        }
    }
}

/// Rate limits over the data file: decisions in memory, windows written behind.
#[derive(Debug)]
pub struct RateLimits {
    table: RateTable,
    policies: Policies,
    store: Store,
    clock: SharedClock,
}

fn window_key(policy_id: u8, subject: &[u8; 17]) -> String {
    let mut bytes = [0u8; 18];
    bytes[0] = policy_id;
    bytes[1..].copy_from_slice(subject);
    data_encoding::HEXLOWER.encode(&bytes)
}

impl RateLimits {
    /// Loads the windows that are still running from the data file.
    pub fn load(
        store: Store,
        clock: SharedClock,
        policies: Policies,
        max_keys: usize,
    ) -> Result<Self, StoreError> {
        let table = RateTable::new(max_keys);
        let now_us = clock.now_ms().saturating_mul(1000);
        for (key, window) in store.read(|tx| tx.all(&RATE_WINDOWS))? {
            let Ok(bytes) = data_encoding::HEXLOWER.decode(key.as_bytes()) else {
                continue;
            };
            let (Some(&policy_id), Ok(subject)) =
                (bytes.first(), <[u8; 17]>::try_from(&bytes[1..]))
            else {
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
        })
    }

    /// Decides one request of `subject` under policy `id`, now.
    pub fn check(&self, id: PolicyId, subject: &Subject) -> (Decision, &Policy) {
        let policy = self.policies.get(id);
        let now_us = self.clock.now_ms().saturating_mul(1000);
        (self.table.check(id as u8, policy, subject, now_us), policy)
    }

    /// Writes the windows changed since the last flush. Called about once a second and
    /// at stop; a crash loses at most the last second of counting.
    pub async fn flush(&self) -> Result<usize, StoreError> {
        let now_us = self.clock.now_ms().saturating_mul(1000);
        let changed = self.table.take_changed(now_us);
        let count = changed.len();
        if count == 0 {
            return Ok(0);
        }
        self.store
            .write(move |tx| -> Result<(), StoreError> {
                for window in &changed {
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
        Ok(count)
    }

    /// Deletes stored windows whose budget is whole again (a missing window means the
    /// same). For the periodic housekeeping, not the per-second flush.
    pub async fn prune(&self) -> Result<u64, StoreError> {
        let now_us = self.clock.now_ms().saturating_mul(1000);
        self.store
            .write(move |tx| tx.retain(&RATE_WINDOWS, |_, w| w.tat_us > now_us))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    fn us(secs: f64) -> u64 {
        (secs * 1e6) as u64
    }

    #[test]
    fn a_fresh_subject_gets_the_whole_limit_at_once_then_the_rate() {
        let policy = Policy::new("pairing", 10, MIN);
        let mut tat = None;
        for i in 0..10u32 {
            let (next, d) = decide(&policy, tat, 0);
            assert!(d.allowed, "request {i}");
            assert_eq!(d.remaining, 9 - i);
            tat = next;
        }
        let (_, refused) = decide(&policy, tat, 0);
        assert!(!refused.allowed);
        assert_eq!(refused.retry_after, Duration::from_secs(6));
        // One interval (6 s) later exactly one more fits.
        let (next, d) = decide(&policy, tat, us(6.0));
        assert!(d.allowed && d.remaining == 0);
        assert!(!decide(&policy, next, us(6.0)).1.allowed);
    }

    #[test]
    fn no_boundary_burst_unlike_a_fixed_window() {
        // 10 at 59 s, then at 61 s only what refilled in 2 s (none at 6 s per request).
        let policy = Policy::new("p", 10, MIN);
        let mut tat = None;
        for _ in 0..10 {
            tat = decide(&policy, tat, us(59.0)).0;
        }
        assert!(!decide(&policy, tat, us(61.0)).1.allowed);
        assert!(decide(&policy, tat, us(65.0)).1.allowed);
    }

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
    fn changed_windows_carry_a_budget_across_a_restart() {
        let policy = Policy::new("p", 10, MIN);
        let subject = Subject::ip(IpAddr::from([192, 0, 2, 1]));
        let before = RateTable::new(1000);
        for _ in 0..8 {
            assert!(before.check(0, &policy, &subject, 0).allowed);
        }
        let saved = before.take_changed(0);
        assert_eq!(saved.len(), 1);
        assert!(before.take_changed(0).is_empty(), "flags are cleared");
        let after = RateTable::new(1000);
        for window in &saved {
            after.restore(window);
        }
        assert!(after.check(0, &policy, &subject, 1).allowed);
        assert!(after.check(0, &policy, &subject, 1).allowed);
        assert!(
            !after.check(0, &policy, &subject, 1).allowed,
            "the 11th is refused"
        );
    }

    #[test]
    fn a_slot_is_40_bytes() {
        assert_eq!(std::mem::size_of::<(u64, Entry)>(), 40);
    }

    #[test]
    fn the_table_limits_per_policy_and_subject_and_stays_bounded() {
        let table = RateTable::new(SHARDS * 4);
        let policy = Policy::new("p", 2, MIN);
        let one = Subject::ip(IpAddr::from([10, 0, 0, 1]));
        let two = Subject::ip(IpAddr::from([10, 0, 0, 2]));
        assert!(table.check(0, &policy, &one, 0).allowed);
        assert!(table.check(0, &policy, &one, 0).allowed);
        assert!(!table.check(0, &policy, &one, 0).allowed);
        assert!(table.check(1, &policy, &one, 0).allowed, "another policy");
        assert!(table.check(0, &policy, &two, 0).allowed, "another subject");
        for i in 0..10_000u32 {
            let ip = IpAddr::from(i.to_be_bytes());
            table.check(0, &policy, &Subject::ip(ip), 0);
        }
        assert!(table.len() <= SHARDS * 4);
    }
}
