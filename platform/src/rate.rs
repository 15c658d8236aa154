//! Attempt buckets in memory (GCRA, on the platform's clock): the embedded engine's
//! [`crate::store::PlatformStore::take_attempt`]. A bucket of `burst` attempts refills at
//! `per_minute`; a key's state is one number, the time its bucket is full again ("theoretical
//! arrival time"), so a shared engine keeps the same state in one row per key.

use dashmap::DashMap;

use crate::store::Quota;

/// Per-key attempt buckets. See the module docs.
#[derive(Debug, Default)]
pub struct Buckets {
    /// Per key, when (µs on the platform's clock) its bucket is full again.
    full_at_us: DashMap<String, u64>,
}

impl Buckets {
    /// Takes one attempt from `key`'s bucket at `now_ms` if it has one left.
    pub fn take(&self, key: &str, quota: Quota, now_ms: u64) -> bool {
        let now = now_ms.saturating_mul(1000);
        let interval = quota.interval_us();
        let tolerance = interval.saturating_mul(u64::from(quota.burst.max(1)) - 1);
        let mut full_at = self.full_at_us.entry(key.to_owned()).or_insert(now);
        let at = (*full_at).max(now);
        if at - now > tolerance {
            return false;
        }
        *full_at = at + interval;
        true
    }

    /// Forgets buckets that are full again at `now_ms`.
    pub fn sweep(&self, now_ms: u64) {
        let now = now_ms.saturating_mul(1000);
        self.full_at_us.retain(|_, full_at| *full_at > now);
    }

    /// Keys with a bucket that is not full (tests).
    pub fn len(&self) -> usize {
        self.full_at_us.len()
    }

    pub fn is_empty(&self) -> bool {
        self.full_at_us.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_gives_its_burst_then_refills_at_its_rate() {
        let buckets = Buckets::default();
        let quota = Quota { per_minute: 60, burst: 3 };
        assert!((0..3).all(|_| buckets.take("a", quota, 0)));
        assert!(!buckets.take("a", quota, 0), "the burst is spent");
        assert!(buckets.take("b", quota, 0), "another key has its own bucket");
        assert!(!buckets.take("a", quota, 999));
        assert!(buckets.take("a", quota, 1_000), "one more a second at 60 a minute");
        assert!(!buckets.take("a", quota, 1_000));
        buckets.sweep(3_999);
        assert_eq!(buckets.len(), 1, "a's bucket is not full yet");
        buckets.sweep(4_000);
        assert!(buckets.is_empty());
    }
}
