//! GCRA window arithmetic: pure functions over microseconds, no state and no I/O.

use std::time::Duration;

/// `limit` requests per `window`, under a name that appears in `RateLimit-Policy`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub(crate) name: String,
    pub(crate) limit: u32,
    pub(crate) window: Duration,
}

impl Policy {
    pub fn new(name: &str, limit: u32, window: Duration) -> Self {
        Self {
            name: name.to_string(),
            limit: limit.max(1),
            window: window.max(Duration::from_millis(1)),
        }
    }

    /// Time between requests at the sustained rate, in microseconds: how far one
    /// admitted request moves the TAT.
    pub(crate) fn interval_us(&self) -> u64 {
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
    pub(crate) allowed: bool,
    /// Requests still allowed right now after this one.
    pub(crate) remaining: u32,
    /// When a refused request may be retried.
    pub(crate) retry_after: Duration,
    /// When the budget is whole again.
    pub(crate) reset: Duration,
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
}
