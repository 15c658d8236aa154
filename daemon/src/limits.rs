//! Per-app call rate limits, and per-key counts of held resources (renderer streams and
//! connections per app and per instance). (Per-instance in-flight limits live with the instance in
//! the registry; message size limits are set on the gRPC services; the global connection limit in
//! transport.)

use std::{num::NonZeroU32, sync::Arc};

use dashmap::{DashMap, mapref::entry::Entry};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::{config::LimitsConfig, error::ApiError};

/// A token bucket per app id, so one noisy app cannot starve the others.
pub struct RateLimits {
    per_app: DefaultKeyedRateLimiter<Arc<str>>,
    rate: u32,
}

impl std::fmt::Debug for RateLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimits").field("rate", &self.rate).finish()
    }
}

impl RateLimits {
    pub fn new(config: &LimitsConfig) -> Self {
        let rate = NonZeroU32::new(config.calls_per_second_per_app).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(config.burst_per_app.max(config.calls_per_second_per_app)).unwrap_or(rate);
        RateLimits { per_app: RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)), rate: rate.get() }
    }

    /// A bucket per app for its backend's exchange attempts (both backend surfaces share it):
    /// `exchanges_per_minute_per_app`, with `exchange_burst_per_app` above it.
    pub fn exchanges(config: &LimitsConfig) -> Self {
        let rate = NonZeroU32::new(config.exchanges_per_minute_per_app).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(config.exchange_burst_per_app).unwrap_or(NonZeroU32::MIN);
        RateLimits { per_app: RateLimiter::keyed(Quota::per_minute(rate).allow_burst(burst)), rate: rate.get() }
    }

    /// Takes one call from the app's bucket, or refuses with RESOURCE_EXHAUSTED.
    pub fn check(&self, app_id: &Arc<str>) -> Result<(), ApiError> {
        if self.allows(app_id) {
            Ok(())
        } else {
            Err(ApiError::Exhausted(format!("app exceeded {} calls per second", self.rate)))
        }
    }

    /// Takes one from the app's bucket if it has one left.
    pub fn allows(&self, app_id: &Arc<str>) -> bool {
        self.per_app.check_key(app_id).is_ok()
    }

    /// Forgets buckets that are full again (called periodically).
    pub fn sweep(&self) {
        self.per_app.retain_recent();
    }
}

/// What apps and instances hold against the per-app and per-instance caps on renderer streams and
/// connections (`[limits]` in the config). Per-instance streams are counted on the instance.
#[derive(Debug, Default)]
pub struct Occupancy {
    pub streams_per_app: Arc<KeyedCount>,
    pub conns_per_app: Arc<KeyedCount>,
    pub conns_per_instance: Arc<KeyedCount>,
}

/// How many of something (renderer streams, connections) each key (an app id, an instance id)
/// holds, so one key cannot take what a global limit leaves for everyone. A key's entry exists only
/// while it holds something.
#[derive(Debug, Default)]
pub struct KeyedCount {
    counts: DashMap<Arc<str>, u32>,
}

/// One unit held by a key in a [`KeyedCount`], given back when dropped.
#[derive(Debug)]
pub struct Held {
    owner: Arc<KeyedCount>,
    key: Arc<str>,
}

impl KeyedCount {
    /// Takes one unit for `key` unless it already holds `max`.
    pub fn try_take(self: &Arc<Self>, key: &Arc<str>, max: u32) -> Option<Held> {
        let mut count = self.counts.entry(key.clone()).or_insert(0);
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(Held { owner: self.clone(), key: key.clone() })
    }

    /// How many units `key` holds.
    pub fn held(&self, key: &str) -> u32 {
        self.counts.get(key).map_or(0, |c| *c)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Entry::Occupied(mut entry) = self.owner.counts.entry(self.key.clone()) {
            *entry.get_mut() -= 1;
            if *entry.get() == 0 {
                entry.remove();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_holds_at_most_its_cap_and_gives_units_back() {
        let counts = Arc::new(KeyedCount::default());
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let first = counts.try_take(&a, 2).unwrap();
        let _second = counts.try_take(&a, 2).unwrap();
        assert!(counts.try_take(&a, 2).is_none());
        assert!(counts.try_take(&b, 2).is_some(), "another key is unaffected");
        drop(first);
        assert_eq!(counts.held("a"), 1);
        assert!(counts.try_take(&a, 2).is_some());
        assert_eq!(counts.held("b"), 0, "a key that holds nothing has no entry");
        assert!(counts.counts.get("b").is_none());
    }
}
