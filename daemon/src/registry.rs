//! App instances and their launch tokens.
//!
//! The host launches an app instance and gets a launch token `<instance_id>.<secret>`; the renderer
//! presents it on every call. The instance id finds the entry, the secret is compared in constant
//! time, and closing the instance revokes the token and ends its calls and streams.

use std::sync::{
    Arc,
    atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering},
};

use dashmap::DashMap;
use tokio_util::sync::CancellationToken;

use crate::{
    error::ApiError,
    tokens::{random_token, secrets_equal},
    version::{ApiVersion, AppJson, VersionSource},
};

/// One launched app instance: who it is, how it authenticates, which version it runs.
#[derive(Debug)]
pub struct AppInstance {
    pub instance_id: Arc<str>,
    pub app_id: Arc<str>,
    pub app_json: AppJson,
    pub launched_at_ms: u64,
    secret: String,
    /// Packed resolved version: 0 unresolved, else `version | source << 4`.
    version: AtomicU8,
    /// The host session whose openApiVersion answer the version came from.
    version_host: AtomicU64,
    /// Serializes resolution so the host is asked once per instance.
    pub(crate) resolving: tokio::sync::Mutex<()>,
    in_flight: AtomicU32,
    max_in_flight: u32,
    closed: CancellationToken,
}

/// Counts one call against its instance's in-flight limit until dropped.
#[derive(Debug)]
pub struct CallSlot(Arc<AppInstance>);

impl CallSlot {
    /// A token that is cancelled when the calling instance closes.
    pub(crate) fn closed_token(&self) -> tokio_util::sync::CancellationToken {
        self.0.closed.clone()
    }
}

impl Drop for CallSlot {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl AppInstance {
    /// The resolved version, if any, and where it came from. A version that came from a host
    /// other than `current_host` does not count: the new host is asked again.
    pub fn resolved(&self, current_host: u64) -> Option<(ApiVersion, VersionSource)> {
        let packed = self.version.load(Ordering::Acquire);
        let version = ApiVersion::from_u8(packed & 0x0f)?;
        let source = match packed >> 4 {
            0 => VersionSource::AppJson,
            1 => VersionSource::Host,
            _ => VersionSource::Default,
        };
        if source == VersionSource::Host && self.version_host.load(Ordering::Acquire) != current_host {
            return None;
        }
        Some((version, source))
    }

    /// The version as last resolved, without the host check (status output).
    pub fn version_label(&self) -> (&'static str, &'static str) {
        match self.resolved(self.version_host.load(Ordering::Acquire)) {
            Some((v, s)) => (v.as_str(), s.as_str()),
            None => ("", ""),
        }
    }

    pub(crate) fn set_version(&self, version: ApiVersion, source: VersionSource, host: u64) {
        let source_bits = match source {
            VersionSource::AppJson => 0,
            VersionSource::Host => 1,
            VersionSource::Default => 2,
        };
        self.version_host.store(host, Ordering::Release);
        self.version.store(version.to_u8() | source_bits << 4, Ordering::Release);
    }

    /// Takes an in-flight slot, or refuses with RESOURCE_EXHAUSTED.
    pub fn begin_call(self: &Arc<Self>) -> Result<CallSlot, ApiError> {
        let before = self.in_flight.fetch_add(1, Ordering::AcqRel);
        let slot = CallSlot(self.clone());
        if before >= self.max_in_flight {
            return Err(ApiError::Exhausted(format!(
                "more than {} calls in flight for this app instance",
                self.max_in_flight
            )));
        }
        Ok(slot)
    }

    pub fn calls_in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Resolves when the instance is closed.
    pub fn closed(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.closed.cancelled()
    }

    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }
}

/// Why a launch token was refused. The messages say what is wrong without echoing the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("missing launch token (x-launch-token metadata)")]
    Missing,
    #[error("invalid launch token")]
    Invalid,
}

/// Every live app instance, keyed by instance id.
#[derive(Debug)]
pub struct AppRegistry {
    instances: DashMap<Arc<str>, Arc<AppInstance>>,
    max_in_flight: u32,
}

impl AppRegistry {
    pub fn new(max_in_flight: u32) -> Self {
        AppRegistry { instances: DashMap::new(), max_in_flight }
    }

    /// Registers a new instance; returns it and its launch token.
    pub fn launch(&self, app_id: &str, app_json: AppJson, now_ms: u64) -> (Arc<AppInstance>, String) {
        let instance_id: Arc<str> = random_token(9).into();
        let secret = random_token(32);
        let instance = Arc::new(AppInstance {
            instance_id: instance_id.clone(),
            app_id: app_id.into(),
            app_json,
            launched_at_ms: now_ms,
            secret: secret.clone(),
            version: AtomicU8::new(0),
            version_host: AtomicU64::new(0),
            resolving: tokio::sync::Mutex::new(()),
            in_flight: AtomicU32::new(0),
            max_in_flight: self.max_in_flight,
            closed: CancellationToken::new(),
        });
        self.instances.insert(instance_id.clone(), instance.clone());
        (instance, format!("{instance_id}.{secret}"))
    }

    /// Finds the instance a launch token names, if the token is valid and the instance open.
    pub fn authenticate(&self, token: Option<&str>) -> Result<Arc<AppInstance>, TokenError> {
        let token = token.filter(|t| !t.is_empty()).ok_or(TokenError::Missing)?;
        let (id, secret) = token.split_once('.').ok_or(TokenError::Invalid)?;
        let instance = self.instances.get(id).map(|e| e.value().clone()).ok_or(TokenError::Invalid)?;
        if !secrets_equal(secret.as_bytes(), instance.secret.as_bytes()) || instance.is_closed() {
            return Err(TokenError::Invalid);
        }
        Ok(instance)
    }

    /// Closes an instance: its token stops working and waiters on `closed()` wake.
    pub fn close(&self, instance_id: &str) -> Option<Arc<AppInstance>> {
        let (_, instance) = self.instances.remove(instance_id)?;
        instance.closed.cancel();
        Some(instance)
    }

    pub fn get(&self, instance_id: &str) -> Option<Arc<AppInstance>> {
        self.instances.get(instance_id).map(|e| e.value().clone())
    }

    pub fn len(&self) -> usize {
        self.instances.len()
    }

    pub fn is_empty(&self) -> bool {
        self.instances.is_empty()
    }

    /// Every live instance, oldest first.
    pub fn list(&self) -> Vec<Arc<AppInstance>> {
        let mut all: Vec<_> = self.instances.iter().map(|e| e.value().clone()).collect();
        all.sort_by(|a, b| a.launched_at_ms.cmp(&b.launched_at_ms).then(a.instance_id.cmp(&b.instance_id)));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_name_one_instance_and_die_with_it() {
        let reg = AppRegistry::new(2);
        let (a, token_a) = reg.launch("app-a", AppJson::default(), 0);
        let (_b, token_b) = reg.launch("app-b", AppJson::default(), 0);
        assert_eq!(reg.authenticate(Some(&token_a)).unwrap().instance_id, a.instance_id);
        assert_eq!(reg.authenticate(None).unwrap_err(), TokenError::Missing);
        let (b_id, _) = token_b.split_once('.').unwrap();
        let (_, a_secret) = token_a.split_once('.').unwrap();
        let forged = format!("{b_id}.{a_secret}");
        assert_eq!(reg.authenticate(Some(&forged)).unwrap_err(), TokenError::Invalid);
        reg.close(&a.instance_id);
        assert_eq!(reg.authenticate(Some(&token_a)).unwrap_err(), TokenError::Invalid);
    }

    #[test]
    fn in_flight_slots_are_bounded_and_returned() {
        let reg = AppRegistry::new(2);
        let (a, _) = reg.launch("app", AppJson::default(), 0);
        let s1 = a.begin_call().unwrap();
        let _s2 = a.begin_call().unwrap();
        assert!(matches!(a.begin_call(), Err(ApiError::Exhausted(_))));
        drop(s1);
        assert!(a.begin_call().is_ok());
    }
}
