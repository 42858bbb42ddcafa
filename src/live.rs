//! Live connections of devices (the WebSocket channel): how many may be open, who is
//! told when something is revoked, and how fast each device may send.
//!
//! `Changes` is a counter that the revocation list and the key ring bump after every
//! revocation, rotation or retirement; each authenticated connection watches it and
//! re-verifies its token when it moves, so a revoked device's sockets close at once
//! without any work while nothing changes. `LiveConnections` hands out one `Slot` per
//! open connection within a total and a per-address cap; dropping the slot frees it.
//! `MessageBudget` is a token bucket per device shared by all its connections.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::ids::DeviceId;

/// A counter of security-relevant changes, watched by live connections.
#[derive(Debug, Clone)]
pub struct Changes {
    sender: Arc<watch::Sender<u64>>,
}

impl Default for Changes {
    fn default() -> Self {
        Self {
            sender: Arc::new(watch::channel(0).0),
        }
    }
}

impl Changes {
    /// Something was revoked or a key changed: every watcher re-checks its token.
    pub fn bump(&self) {
        self.sender.send_modify(|n| *n = n.wrapping_add(1));
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.sender.subscribe()
    }
}

/// Why a connection was refused before it was upgraded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Refused {
    #[error("the server holds its maximum number of live connections")]
    Full,
    #[error("this address holds its maximum number of live connections")]
    PerAddressFull,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// The caps on live connections, and the per-device message budgets.
#[derive(Debug)]
pub struct LiveConnections {
    max_total: usize,
    max_per_ip: usize,
    counts: Mutex<Counts>,
    budgets: Mutex<HashMap<DeviceId, Arc<Mutex<MessageBudget>>>>,
    messages_per_second: u32,
    /// Set at shutdown: every live connection closes with "going away".
    closing: watch::Sender<bool>,
}

/// One open connection's place; dropping it frees the place.
#[derive(Debug)]
pub(crate) struct Slot {
    live: Arc<LiveConnections>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.live.counts.lock().unwrap_or_else(|p| p.into_inner());
        counts.total = counts.total.saturating_sub(1);
        if let Some(n) = counts.per_ip.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.per_ip.remove(&self.ip);
            }
        }
    }
}

impl LiveConnections {
    pub(crate) fn new(max_total: usize, max_per_ip: usize, messages_per_second: u32) -> Arc<Self> {
        Arc::new(Self {
            max_total,
            max_per_ip,
            counts: Mutex::default(),
            budgets: Mutex::default(),
            messages_per_second,
            closing: watch::channel(false).0,
        })
    }

    /// Tells every live connection to close (the server is stopping).
    pub(crate) fn close_all(&self) {
        self.closing.send_replace(true);
    }

    pub(crate) fn closing(&self) -> watch::Receiver<bool> {
        self.closing.subscribe()
    }

    /// Takes a place for a connection from `ip`, or says why there is none.
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Refused> {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if counts.total >= self.max_total {
            return Err(Refused::Full);
        }
        let here = counts.per_ip.entry(ip).or_insert(0);
        if *here >= self.max_per_ip {
            return Err(Refused::PerAddressFull);
        }
        *here += 1;
        counts.total += 1;
        Ok(Slot {
            live: self.clone(),
            ip,
        })
    }

    /// Open connections: (total, from `ip`).
    pub fn open(&self, ip: IpAddr) -> (usize, usize) {
        let counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        (counts.total, counts.per_ip.get(&ip).copied().unwrap_or(0))
    }

    /// The message budget of a device, shared by all its connections.
    pub(crate) fn budget(&self, device: DeviceId) -> Arc<Mutex<MessageBudget>> {
        let mut budgets = self.budgets.lock().unwrap_or_else(|p| p.into_inner());
        // Budgets of devices with no connection left are dropped as the map grows.
        if budgets.len() > 4 * self.max_total.max(1) {
            budgets.retain(|_, b| Arc::strong_count(b) > 1);
        }
        budgets
            .entry(device)
            .or_insert_with(|| Arc::new(Mutex::new(MessageBudget::new(self.messages_per_second))))
            .clone()
    }

    pub(crate) fn messages_per_second(&self) -> u32 {
        self.messages_per_second
    }
}

/// A token bucket: `rate` messages a second, bursts up to twice that.
#[derive(Debug, Clone)]
pub(crate) struct MessageBudget {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Option<std::time::Instant>,
}

impl MessageBudget {
    pub(crate) fn new(per_second: u32) -> Self {
        let rate = f64::from(per_second.max(1));
        Self {
            rate,
            burst: rate * 2.0,
            tokens: rate * 2.0,
            last: None,
        }
    }

    /// Spends one message at `now`; `false` when the budget is exhausted.
    pub(crate) fn spend(&mut self, now: std::time::Instant) -> bool {
        if let Some(last) = self.last {
            let elapsed = now.saturating_duration_since(last).as_secs_f64();
            self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        }
        self.last = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn slots_respect_both_caps_and_free_on_drop() {
        let live = LiveConnections::new(3, 2, 10);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let s1 = live.admit(a).unwrap();
        let _s2 = live.admit(a).unwrap();
        assert_eq!(live.admit(a).unwrap_err(), Refused::PerAddressFull);
        let _s3 = live.admit(b).unwrap();
        assert_eq!(live.admit(b).unwrap_err(), Refused::Full);
        drop(s1);
        assert_eq!(live.open(a), (2, 1));
        assert!(live.admit(b).is_ok());
    }

    #[test]
    fn the_budget_allows_a_burst_then_the_rate() {
        let mut budget = MessageBudget::new(10);
        let t0 = Instant::now();
        assert_eq!((0..25).filter(|_| budget.spend(t0)).count(), 20);
        assert!(!budget.spend(t0));
        assert!(budget.spend(t0 + Duration::from_millis(150)));
        assert!(!budget.spend(t0 + Duration::from_millis(150)));
    }

    #[test]
    fn changes_wake_watchers() {
        let changes = Changes::default();
        let rx = changes.subscribe();
        assert!(!rx.has_changed().unwrap());
        changes.bump();
        assert!(rx.has_changed().unwrap());
    }
}
