//! The in-memory table of every subject's TAT under every policy: sharded, bounded,
//! and able to hand out what changed for write-behind persistence.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::Mutex;

use super::Subject;
use super::gcra::{Decision, Policy, decide};

const SHARDS: usize = 64;

type Key = (u8, [u8; 17]);

#[derive(Debug, Clone, Copy)]
struct Entry {
    key: Key,
    tat_us: u64,
    /// Requests admitted since it was last written (for write-behind persistence, and
    /// for adding this node's spending to a window other nodes share).
    spent: u32,
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
    pub(crate) policy_id: u8,
    pub(crate) subject: [u8; 17],
    pub(crate) tat_us: u64,
}

/// A window changed since the last flush, and how many requests it admitted since.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Changed {
    pub(crate) window: Window,
    pub(crate) spent: u32,
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
        let found = shard.entries.get(&hash).filter(|e| e.key == key);
        let tat = found.map(|e| e.tat_us);
        let spent = found.map_or(0, |e| e.spent);
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
                    spent: spent.saturating_add(1),
                },
            );
        }
        decision
    }

    /// What `check` would decide, without spending anything.
    pub(crate) fn peek(
        &self,
        policy_id: u8,
        policy: &Policy,
        subject: &Subject,
        now_us: u64,
    ) -> Decision {
        let key = (policy_id, subject.key_bytes());
        let hash = self.hasher.hash_one(key);
        let tat = self
            .shard(hash)
            .entries
            .get(&hash)
            .filter(|e| e.key == key)
            .map(|e| e.tat_us);
        decide(policy, tat, now_us).1
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
    pub(crate) fn take_changed(&self, now_us: u64) -> Vec<Changed> {
        let mut out = Vec::new();
        for shard in &self.shards {
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            for entry in shard.entries.values_mut().filter(|e| e.spent > 0) {
                let spent = std::mem::take(&mut entry.spent);
                if entry.tat_us > now_us {
                    out.push(Changed {
                        window: Window {
                            policy_id: entry.key.0,
                            subject: entry.key.1,
                            tat_us: entry.tat_us,
                        },
                        spent,
                    });
                }
            }
        }
        out
    }

    /// Takes in the TAT nodes sharing a window left it at (`shared_tat_us`), for the
    /// window `taken` from this table: what the others spent moves it on, and what was
    /// admitted here since it was taken (still counted for the next flush) stays on top.
    pub(crate) fn merge(&self, taken: &Window, shared_tat_us: u64) {
        let key = (taken.policy_id, taken.subject);
        let hash = self.hasher.hash_one(key);
        let mut shard = self.shard(hash);
        let room = shard.entries.len() < self.per_shard;
        match shard.entries.get_mut(&hash) {
            Some(entry) if entry.key == key => {
                let since = entry.tat_us.saturating_sub(taken.tat_us);
                entry.tat_us = entry.tat_us.max(shared_tat_us.saturating_add(since));
            }
            Some(_) => {}
            None if room => {
                shard.entries.insert(
                    hash,
                    Entry {
                        key,
                        tat_us: shared_tat_us,
                        spent: 0,
                    },
                );
            }
            None => {}
        }
    }

    /// Puts back a window loaded from the data file at start (not marked changed).
    pub(crate) fn restore(&self, window: &Window) {
        let key = (window.policy_id, window.subject);
        let hash = self.hasher.hash_one(key);
        let mut shard = self.shard(hash);
        if shard.entries.len() < self.per_shard {
            shard.entries.insert(
                hash,
                Entry {
                    key,
                    tat_us: window.tat_us,
                    spent: 0,
                },
            );
        }
    }

    /// Subjects tracked now.
    pub(crate) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).entries.len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;
    use std::time::Duration;

    use super::*;

    const MIN: Duration = Duration::from_secs(60);

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
        assert_eq!(saved[0].spent, 8);
        assert!(before.take_changed(0).is_empty(), "counts are cleared");
        let after = RateTable::new(1000);
        for changed in &saved {
            after.restore(&changed.window);
        }
        assert!(after.check(0, &policy, &subject, 1).allowed);
        assert!(after.check(0, &policy, &subject, 1).allowed);
        assert!(
            !after.check(0, &policy, &subject, 1).allowed,
            "the 11th is refused"
        );
    }

    #[test]
    fn a_merged_window_counts_what_others_spent_and_keeps_what_was_spent_here() {
        let policy = Policy::new("p", 10, MIN);
        let subject = Subject::ip(IpAddr::from([192, 0, 2, 1]));
        let here = RateTable::new(1000);
        assert!(here.check(0, &policy, &subject, 0).allowed);
        let taken = here.take_changed(0)[0].window;
        // Another node spent 7 more of the same budget: the shared TAT says so.
        let shared = taken.tat_us + 7 * policy.interval_us();
        assert!(
            here.check(0, &policy, &subject, 0).allowed,
            "spent here meanwhile"
        );
        here.merge(&taken, shared);
        assert!(here.check(0, &policy, &subject, 0).allowed, "the 10th");
        assert!(
            !here.check(0, &policy, &subject, 0).allowed,
            "10 spent in all"
        );
        assert_eq!(
            here.take_changed(0)[0].spent,
            2,
            "those spent here meanwhile"
        );
        // An older TAT never moves a window back.
        here.merge(&taken, 1);
        assert!(!here.check(0, &policy, &subject, 0).allowed);
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
