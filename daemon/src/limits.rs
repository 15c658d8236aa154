//! Per-app call rate limits. (Per-instance in-flight limits live with the instance in the
//! registry; message size limits are set on the gRPC services; connection limits in transport.)

use std::{num::NonZeroU32, sync::Arc};

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
