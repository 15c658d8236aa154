//! Per-app call rate limits, and per-app counts of held resources (renderer streams and
//! connections). (Per-instance calls in flight, streams and connections are counted on the
//! instance in the registry; message size limits are set on the gRPC services; the global
//! connection limit in transport.)

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

/// A token bucket per (app, user): how often one user's calls in one app may reach the store.
/// Each v2 login, phone or avatar call writes (a session, a ledger row), so the per-app rate
/// alone would let one renderer write thousands of rows a second; WeChat, too, allows one user a
/// few wx.login and getUserProfile calls a second.
pub struct UserRates {
    per_user: DefaultKeyedRateLimiter<(Arc<str>, Arc<str>)>,
    rate: u32,
}

impl std::fmt::Debug for UserRates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserRates").field("rate", &self.rate).finish()
    }
}

impl UserRates {
    /// `calls_per_second_per_user`, with `burst_per_user` above it.
    pub fn new(config: &LimitsConfig) -> Self {
        let rate = NonZeroU32::new(config.calls_per_second_per_user).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(config.burst_per_user).unwrap_or(NonZeroU32::MIN);
        UserRates { per_user: RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)), rate: rate.get() }
    }

    /// Takes one call of `uid` in `app_id` from its bucket, or refuses with RESOURCE_EXHAUSTED.
    pub fn check(&self, app_id: &Arc<str>, uid: &str) -> Result<(), ApiError> {
        if self.per_user.check_key(&(app_id.clone(), Arc::from(uid))).is_ok() {
            Ok(())
        } else {
            Err(ApiError::Exhausted(format!("more than {} calls a second by this user in this app", self.rate)))
        }
    }

    /// Forgets buckets that are full again (called periodically).
    pub fn sweep(&self) {
        self.per_user.retain_recent();
    }
}

/// What apps hold against the per-app caps on renderer streams and connections (`[limits]` in
/// the config). Per-instance streams and connections are counted on the instance itself.
#[derive(Debug, Default)]
pub struct Occupancy {
    pub per_app: Arc<KeyedCount>,
}

/// What a [`KeyedCount`] counts per key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    Streams = 0,
    Connections = 1,
}

/// How many renderer streams and connections each key (an app id) holds, so one key cannot take
/// what a global limit leaves for everyone. A key's entry exists only while it holds something;
/// one entry counts both, so an app costs one map entry however it connects.
#[derive(Debug, Default)]
pub struct KeyedCount {
    counts: DashMap<Arc<str>, [u32; 2]>,
}

/// One unit held by a key in a [`KeyedCount`], given back when dropped.
#[derive(Debug)]
pub struct Held {
    owner: Arc<KeyedCount>,
    key: Arc<str>,
    what: Counted,
}

impl KeyedCount {
    /// Takes one unit of `what` for `key` unless it already holds `max`.
    pub fn try_take(self: &Arc<Self>, key: &Arc<str>, what: Counted, max: u32) -> Option<Held> {
        self.try_add(key, what, max).then(|| Held { owner: self.clone(), key: key.clone(), what })
    }

    /// Counts one unit of `what` for `key` unless it already holds `max`; whoever counted it
    /// gives it back with [`KeyedCount::give_back`].
    pub fn try_add(&self, key: &Arc<str>, what: Counted, max: u32) -> bool {
        let mut counts = self.counts.entry(key.clone()).or_insert([0, 0]);
        let count = &mut counts[what as usize];
        if *count < max {
            *count += 1;
            return true;
        }
        let empty = *counts == [0, 0];
        drop(counts);
        if empty {
            self.counts.remove_if(key, |_, c| *c == [0, 0]);
        }
        false
    }

    /// Gives `n` units of `what` back for `key`.
    pub fn give_back(&self, key: &Arc<str>, what: Counted, n: u32) {
        if let Entry::Occupied(mut entry) = self.counts.entry(key.clone()) {
            let count = &mut entry.get_mut()[what as usize];
            *count = count.saturating_sub(n);
            if *entry.get() == [0, 0] {
                entry.remove();
            }
        }
    }

    /// How many units of `what` `key` holds.
    pub fn held(&self, key: &str, what: Counted) -> u32 {
        self.counts.get(key).map_or(0, |c| c[what as usize])
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.owner.give_back(&self.key, self.what, 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_bucket_is_per_app_and_user() {
        let config = LimitsConfig { calls_per_second_per_user: 1, burst_per_user: 2, ..LimitsConfig::default() };
        let rates = UserRates::new(&config);
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        assert!(rates.check(&a, "u").is_ok() && rates.check(&a, "u").is_ok());
        let refused = rates.check(&a, "u").unwrap_err();
        assert_eq!(refused.to_string(), "resource exhausted: more than 1 calls a second by this user in this app");
        assert!(rates.check(&a, "v").is_ok(), "another user of the app");
        assert!(rates.check(&b, "u").is_ok(), "the same user in another app");
    }

    #[test]
    fn a_key_holds_at_most_its_cap_and_gives_units_back() {
        use Counted::*;
        let counts = Arc::new(KeyedCount::default());
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let first = counts.try_take(&a, Streams, 2).unwrap();
        let _second = counts.try_take(&a, Streams, 2).unwrap();
        assert!(counts.try_take(&a, Streams, 2).is_none());
        let conn = counts.try_take(&a, Connections, 1).expect("connections are counted apart from streams");
        assert!(counts.try_take(&a, Connections, 1).is_none());
        assert!(counts.try_take(&b, Streams, 2).is_some(), "another key is unaffected");
        drop(first);
        assert_eq!((counts.held("a", Streams), counts.held("a", Connections)), (1, 1));
        assert!(counts.try_take(&a, Streams, 2).is_some());
        assert_eq!(counts.held("b", Streams), 0, "a key that holds nothing has no entry");
        assert!(counts.counts.get("b").is_none());
        assert!(counts.try_take(&b, Streams, 0).is_none());
        assert!(counts.counts.get("b").is_none(), "a refusal leaves no entry behind");
        drop(conn);
        assert_eq!(counts.held("a", Connections), 0);
    }
}
