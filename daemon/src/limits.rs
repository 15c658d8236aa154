//! Per-app call rate limits, and per-app counts of held resources (renderer streams and
//! connections). (Per-instance calls in flight, streams and connections are counted on the
//! instance in the registry; message size limits are set on the gRPC services; the global
//! connection limit in transport.)

use std::{
    num::NonZeroU32,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
};

use dashmap::{DashMap, mapref::entry::Entry};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use miniapp_broker_proto::Api;

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

/// A token bucket per (app, user, API) for the calls that may add to the store: each v2 login,
/// phone or avatar call writes (a session, a ledger row, a payment record), so the per-app rate
/// alone would let one renderer write thousands of times a second; WeChat, too, allows one user a
/// few wx.login, checkSession or getUserProfile calls a second, each API on its own. The user is
/// keyed by a hash of the uid (no per-call copy of it; a collision of two users' 64-bit hashes
/// would only share a bucket).
pub struct UserRates {
    per_user: DefaultKeyedRateLimiter<(Arc<str>, u64, Api)>,
    hasher: std::hash::RandomState,
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
        UserRates {
            per_user: RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)),
            hasher: std::hash::RandomState::new(),
            rate: rate.get(),
        }
    }

    /// Takes one call of `api` by `uid` in `app_id` from its bucket, or refuses with
    /// RESOURCE_EXHAUSTED.
    pub fn check(&self, app_id: &Arc<str>, uid: &str, api: Api) -> Result<(), ApiError> {
        use std::hash::BuildHasher;
        if self.per_user.check_key(&(app_id.clone(), self.hasher.hash_one(uid), api)).is_ok() {
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

/// What apps hold of the pools they share (`[limits]` in the config): renderer streams,
/// connections and calls in flight. Per-instance streams, connections and calls are counted on the
/// instance itself.
#[derive(Debug)]
pub struct Occupancy {
    pub per_app: Arc<KeyedCount>,
    /// Renderer streams: `OpenApi.Session` streams, and health and reflection requests.
    pub streams: Arc<Pool>,
    /// Every connection, taken when it is accepted (see `transport::incoming`).
    pub connections: Arc<Pool>,
    /// Calls in flight on every surface.
    pub calls: Arc<Pool>,
}

impl Occupancy {
    pub fn new(limits: &LimitsConfig) -> Self {
        Occupancy {
            per_app: Arc::default(),
            streams: Arc::new(Pool::new(Counted::Streams, limits.max_renderer_streams)),
            connections: Arc::new(Pool::new(Counted::Connections, limits.max_connections)),
            calls: Arc::new(Pool::new(Counted::Calls, limits.max_calls_in_flight)),
        }
    }
}

/// What a [`KeyedCount`] counts per key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    Streams = 0,
    Connections = 1,
    Calls = 2,
}

impl Counted {
    /// How a refusal names what was counted.
    fn label(self) -> &'static str {
        match self {
            Counted::Streams => "renderer streams open",
            Counted::Connections => "connections",
            Counted::Calls => "calls in flight",
        }
    }

    /// The setting that sizes the pool every app shares.
    fn pool_key(self) -> &'static str {
        match self {
            Counted::Streams => "limits.max_renderer_streams",
            Counted::Connections => "limits.max_connections",
            Counted::Calls => "limits.max_calls_in_flight",
        }
    }
}

/// Whether a party holding `held` units of a pool may take one more, when `free_after` units are
/// free once it has: it may hold at most half (rounded up) of what the others leave of the pool,
/// which is what it holds plus what is free. So one party alone gets half of a pool, the next half
/// of the rest, and so on: nobody can take the last of it, whatever the pool's size, and a party
/// holding nothing gets a unit while any is free.
pub fn share_allows(held: u32, free_after: u32) -> bool {
    let left_to_it = u64::from(held) + 1 + u64::from(free_after);
    // After the take it holds `held + 1`: at most half of `left_to_it`, rounded up.
    u64::from(held) < left_to_it.div_ceil(2)
}

/// Why a unit of a shared pool was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Nothing of the pool is free (`total` is its size).
    PoolFull { what: Counted, total: u32 },
    /// The app holds its own cap (`limits.max_*_per_app`).
    AppCap { what: Counted, cap: u32 },
    /// The app holds half of what the other apps leave of the pool.
    Share { what: Counted, held: u32, total: u32 },
    /// The instance holds its own cap (`limits.max_*_per_instance`).
    InstanceCap { what: Counted, cap: u32 },
}

impl Refused {
    /// The RESOURCE_EXHAUSTED message: which limit, without naming anything of the caller's.
    pub fn message(&self) -> String {
        match *self {
            Refused::PoolFull { what, total } => format!("more than {total} {}", what.label()),
            Refused::AppCap { what, cap } => format!("more than {cap} {} for this app", what.label()),
            Refused::Share { what, held, total } => format!(
                "this app holds {held} {}, its share of {} = {total}: one app may hold at most half of \
                 what the other apps leave",
                what.label(),
                what.pool_key()
            ),
            Refused::InstanceCap { what, cap } => format!("more than {cap} {} for this app instance", what.label()),
        }
    }
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message())
    }
}

/// A pool every app draws on, counted in one atomic: a total and how much of it is taken.
#[derive(Debug)]
pub struct Pool {
    what: Counted,
    total: u32,
    taken: AtomicU32,
}

impl Pool {
    pub fn new(what: Counted, total: u32) -> Self {
        Pool { what, total, taken: AtomicU32::new(0) }
    }

    /// Takes one unit for the whole daemon; how many are free once it is, or the refusal.
    fn reserve(&self) -> Result<u32, Refused> {
        let before = self.taken.fetch_add(1, Ordering::AcqRel);
        if before >= self.total {
            self.taken.fetch_sub(1, Ordering::AcqRel);
            return Err(Refused::PoolFull { what: self.what, total: self.total });
        }
        Ok(self.total - before - 1)
    }

    fn release(&self) {
        self.taken.fetch_sub(1, Ordering::AcqRel);
    }

    /// Takes one unit that belongs to no app yet (an accepted connection), if any is free.
    pub fn try_acquire(self: &Arc<Self>) -> Option<PoolUnit> {
        self.reserve().ok().map(|_| PoolUnit(self.clone()))
    }

    /// Units free now.
    pub fn free(&self) -> u32 {
        self.total.saturating_sub(self.taken())
    }

    /// The pool's size.
    pub fn total(&self) -> u32 {
        self.total
    }

    /// Units taken now.
    pub fn taken(&self) -> u32 {
        self.taken.load(Ordering::Acquire)
    }
}

/// One unit of a [`Pool`] held by no app, given back when dropped.
#[derive(Debug)]
pub struct PoolUnit(Arc<Pool>);

impl Drop for PoolUnit {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// How many renderer streams, connections and calls in flight each key (an app id) holds, so one
/// key cannot take what a pool leaves for everyone. A key's entry exists only while it holds
/// something; one entry counts all three, so an app costs one map entry however it connects.
#[derive(Debug, Default)]
pub struct KeyedCount {
    counts: DashMap<Arc<str>, [u32; 3]>,
}

/// One unit held by a key in a [`KeyedCount`] (and of its pool, if any), given back when dropped.
#[derive(Debug)]
pub struct Held {
    owner: Arc<KeyedCount>,
    key: Arc<str>,
    what: Counted,
    pool: Option<Arc<Pool>>,
}

impl KeyedCount {
    /// Takes one unit of `what` for `key` unless it already holds `max`.
    pub fn try_take(self: &Arc<Self>, key: &Arc<str>, what: Counted, max: u32) -> Option<Held> {
        self.try_add(key, what, max, None).is_ok().then(|| Held {
            owner: self.clone(),
            key: key.clone(),
            what,
            pool: None,
        })
    }

    /// Takes one unit of `pool` for `key`, within `max` and within its share of what is left of
    /// the pool ([`share_allows`]).
    pub fn try_take_shared(self: &Arc<Self>, key: &Arc<str>, pool: &Arc<Pool>, max: u32) -> Result<Held, Refused> {
        let free_after = pool.reserve()?;
        match self.try_add(key, pool.what, max, Some(free_after)) {
            Ok(()) => Ok(Held { owner: self.clone(), key: key.clone(), what: pool.what, pool: Some(pool.clone()) }),
            Err(refused) => {
                pool.release();
                Err(refused.with_total(pool.total))
            }
        }
    }

    /// Counts one unit of `what` for `key` unless it already holds `max`, or more than its share
    /// of a pool with `free_after` units free once it has this one ([`share_allows`]; `None`: no
    /// pool); whoever counted it gives it back with [`KeyedCount::give_back`].
    pub fn try_add(&self, key: &Arc<str>, what: Counted, max: u32, free_after: Option<u32>) -> Result<(), Refused> {
        let mut counts = self.counts.entry(key.clone()).or_insert([0; 3]);
        let count = &mut counts[what as usize];
        let refused = if *count >= max {
            Refused::AppCap { what, cap: max }
        } else if free_after.is_some_and(|free| !share_allows(*count, free)) {
            Refused::Share { what, held: *count, total: 0 }
        } else {
            *count += 1;
            return Ok(());
        };
        let empty = *counts == [0; 3];
        drop(counts);
        if empty {
            self.counts.remove_if(key, |_, c| *c == [0; 3]);
        }
        Err(refused)
    }

    /// Gives `n` units of `what` back for `key`.
    pub fn give_back(&self, key: &Arc<str>, what: Counted, n: u32) {
        if let Entry::Occupied(mut entry) = self.counts.entry(key.clone()) {
            let count = &mut entry.get_mut()[what as usize];
            *count = count.saturating_sub(n);
            if *entry.get() == [0; 3] {
                entry.remove();
            }
        }
    }

    /// How many units of `what` `key` holds.
    pub fn held(&self, key: &str, what: Counted) -> u32 {
        self.counts.get(key).map_or(0, |c| c[what as usize])
    }
}

impl Refused {
    /// The same refusal, naming the pool's size.
    pub(crate) fn with_total(self, pool_total: u32) -> Refused {
        match self {
            Refused::Share { what, held, .. } => Refused::Share { what, held, total: pool_total },
            other => other,
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.owner.give_back(&self.key, self.what, 1);
        if let Some(pool) = &self.pool {
            pool.release();
        }
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
        assert!(rates.check(&a, "u", Api::Login).is_ok() && rates.check(&a, "u", Api::Login).is_ok());
        let refused = rates.check(&a, "u", Api::Login).unwrap_err();
        assert_eq!(refused.to_string(), "resource exhausted: more than 1 calls a second by this user in this app");
        assert!(rates.check(&a, "u", Api::CheckSession).is_ok(), "another API");
        assert!(rates.check(&a, "v", Api::Login).is_ok(), "another user of the app");
        assert!(rates.check(&b, "u", Api::Login).is_ok(), "the same user in another app");
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

    /// Each party takes all it can, in turn: what it gets, whatever the pool's size.
    #[test]
    fn each_party_gets_half_of_what_the_others_leave() {
        for (total, expected) in [
            (1, vec![1, 0, 0]),
            (2, vec![1, 1, 0]),
            (3, vec![2, 1, 0]),
            (4, vec![2, 1, 1]),
            (40, vec![20, 10, 5]),
            (10_000, vec![5_000, 2_500, 1_250]),
        ] {
            let counts = Arc::new(KeyedCount::default());
            let pool = Arc::new(Pool::new(Counted::Streams, total));
            let mut held = Vec::new();
            let got: Vec<u32> = ["a", "b", "c"]
                .into_iter()
                .map(|key| {
                    let key: Arc<str> = key.into();
                    let mut n = 0;
                    while let Ok(unit) = counts.try_take_shared(&key, &pool, u32::MAX) {
                        held.push(unit);
                        n += 1;
                    }
                    n
                })
                .collect();
            assert_eq!(got, expected, "pool of {total}");
            drop(held);
            assert_eq!((pool.taken(), counts.counts.len()), (0, 0), "everything given back");
        }
    }

    #[test]
    fn an_apps_cap_binds_below_its_share_and_refusals_say_which() {
        let counts = Arc::new(KeyedCount::default());
        let pool = Arc::new(Pool::new(Counted::Streams, 40));
        let a: Arc<str> = "a".into();
        let _held: Vec<Held> = (0..3).map(|_| counts.try_take_shared(&a, &pool, 3).unwrap()).collect();
        let capped = counts.try_take_shared(&a, &pool, 3).unwrap_err();
        assert_eq!(capped.message(), "more than 3 renderer streams open for this app");
        assert_eq!(pool.taken(), 3, "a refusal gives its pool unit back");
        let b: Arc<str> = "b".into();
        let _b: Vec<Held> = (0..19).map(|_| counts.try_take_shared(&b, &pool, 100).unwrap()).collect();
        let share = counts.try_take_shared(&b, &pool, 100).unwrap_err();
        assert_eq!(
            share.message(),
            "this app holds 19 renderer streams open, its share of limits.max_renderer_streams = 40: one app may \
             hold at most half of what the other apps leave"
        );
        let full = Arc::new(Pool::new(Counted::Calls, 1));
        let _one = full.try_acquire().unwrap();
        assert_eq!(counts.try_take_shared(&a, &full, 9).unwrap_err().message(), "more than 1 calls in flight");
    }
}
