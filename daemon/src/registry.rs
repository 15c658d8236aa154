//! App instances and their launch tokens.
//!
//! The host launches an app instance and gets a launch token `<instance_id>.<secret>`; the renderer
//! presents it on every call. The instance id finds the entry, the secret is compared in constant
//! time, and closing the instance revokes the token and ends its calls and streams.

use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering},
};

use dashmap::DashMap;
use tokio::sync::Notify;

use crate::{
    error::ApiError,
    limits::{Counted, Held, KeyedCount, Occupancy, Pool, Refused},
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
    /// The open version question, shared by the calls that wait for it.
    pub(crate) question: crate::version::Question,
    in_flight: AtomicU32,
    max_in_flight: u32,
    /// The daemon's pool of calls in flight, and what each app holds of it.
    calls: Arc<Pool>,
    per_app: Arc<KeyedCount>,
    /// Set when the instance closes; `closing` wakes whoever waits for it. (A cancellation token
    /// would cost every instance ~100 bytes more.)
    closed: AtomicBool,
    closing: Notify,
    /// The host session that launched the instance (0: none was connected).
    launched_by: AtomicU64,
    /// When that host session ended (0: not yet).
    host_left_ms: AtomicU64,
    /// Renderer streams open on the instance.
    streams: AtomicU32,
    /// Renderer connections attributed to the instance (see [`ConnSlot`]).
    conns: AtomicU32,
    /// When a renderer last stopped using the instance (a stream closed, a unary call ended).
    last_active_ms: AtomicU64,
}

/// The bit of [`AppInstance`]'s connection count that says the instance closed and gave its
/// connections' units of its app's connection count back.
const CONNS_CLOSED: u32 = 1 << 31;

/// Counts one connection against its instance's and its app's connection limits until dropped
/// (the connection closes) or its instance closes, whichever comes first: a closed instance's
/// lingering renderers hold nothing of their app's share, so the app can be launched again.
#[derive(Debug)]
pub struct ConnSlot {
    instance: Arc<AppInstance>,
    per_app: Arc<KeyedCount>,
}

impl ConnSlot {
    /// The instance the connection is attributed to.
    pub fn instance(&self) -> &Arc<AppInstance> {
        &self.instance
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let was = self.instance.conns.fetch_sub(1, Ordering::AcqRel);
        if was & CONNS_CLOSED == 0 {
            self.per_app.give_back(&self.instance.app_id, Counted::Connections, 1);
        }
    }
}

/// Counts one call against its instance's in-flight limit, and against the daemon's pool of
/// calls in flight (within its app's share), until dropped.
#[derive(Debug)]
pub struct CallSlot {
    instance: Arc<AppInstance>,
    /// `None` only while [`AppInstance::begin_call`] is refusing it.
    _app: Option<Held>,
}

impl CallSlot {
    /// The calling instance.
    pub(crate) fn instance(&self) -> &Arc<AppInstance> {
        &self.instance
    }
}

impl Drop for CallSlot {
    fn drop(&mut self) {
        self.instance.in_flight.fetch_sub(1, Ordering::AcqRel);
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

    /// Takes an in-flight slot of the instance and a unit of the daemon's calls in flight (within
    /// the app's share of what is left), or refuses with RESOURCE_EXHAUSTED.
    pub fn begin_call(self: &Arc<Self>) -> Result<CallSlot, ApiError> {
        let before = self.in_flight.fetch_add(1, Ordering::AcqRel);
        let mut slot = CallSlot { instance: self.clone(), _app: None };
        if before >= self.max_in_flight {
            return Err(ApiError::Exhausted(format!(
                "more than {} calls in flight for this app instance",
                self.max_in_flight
            )));
        }
        let held = self.per_app.try_take_shared(&self.app_id, &self.calls, u32::MAX);
        slot._app = Some(held.map_err(|refused| ApiError::Exhausted(refused.message()))?);
        Ok(slot)
    }

    pub fn calls_in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Resolves when the instance is closed.
    pub async fn closed(&self) {
        loop {
            // Made before the check: a close in between wakes it.
            let closing = self.closing.notified();
            if self.is_closed() {
                return;
            }
            closing.await;
        }
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Records the host session that launched the instance.
    pub(crate) fn set_launched_by(&self, host_session: u64) {
        self.launched_by.store(host_session, Ordering::Release);
    }

    /// Takes a renderer-stream slot of this instance unless it has `max` open; the slot is given
    /// back by [`AppInstance::stream_closed`].
    pub fn stream_opened(&self, max: u32) -> bool {
        let before = self.streams.fetch_add(1, Ordering::AcqRel);
        if before >= max {
            self.streams.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// Opens a renderer stream of this instance: a unit of the daemon's stream pool within the
    /// app's share of what is left and `max_per_app`, and one of the instance's `max_per_instance`.
    /// The returned unit gives the pool and the app theirs back when dropped; the instance's is
    /// given back by [`AppInstance::stream_closed`].
    pub fn open_stream(&self, streams: &Arc<Pool>, max_per_app: u32, max_per_instance: u32) -> Result<Held, Refused> {
        let held = self.per_app.try_take_shared(&self.app_id, streams, max_per_app)?;
        if !self.stream_opened(max_per_instance) {
            return Err(Refused::InstanceCap { what: Counted::Streams, cap: max_per_instance });
        }
        Ok(held)
    }

    /// Attributes a connection to this instance and its app unless either holds its maximum or
    /// the app holds its share of what is left of `connections` (this connection's unit already
    /// taken). `Ok(None)`: the instance closed meanwhile, and nothing is attributed.
    pub fn connection_opened(
        self: &Arc<Self>,
        connections: &Pool,
        max_per_app: u32,
        max_per_instance: u32,
    ) -> Result<Option<ConnSlot>, Refused> {
        let per_app = &self.per_app;
        // The app's unit first: once the instance counts the connection, its closing gives the
        // unit back (`AppRegistry::close`); until then this call does.
        per_app
            .try_add(&self.app_id, Counted::Connections, max_per_app, Some(connections.free()))
            .map_err(|refused| refused.with_total(connections.total()))?;
        let before = self.conns.fetch_add(1, Ordering::AcqRel);
        if before & CONNS_CLOSED == 0 && before < max_per_instance {
            return Ok(Some(ConnSlot { instance: self.clone(), per_app: per_app.clone() }));
        }
        let was = self.conns.fetch_sub(1, Ordering::AcqRel);
        // A close between the two counted this connection and gave its unit back already.
        if before & CONNS_CLOSED != 0 || was & CONNS_CLOSED == 0 {
            per_app.give_back(&self.app_id, Counted::Connections, 1);
        }
        if before & CONNS_CLOSED != 0 {
            Ok(None)
        } else {
            Err(Refused::InstanceCap { what: Counted::Connections, cap: max_per_instance })
        }
    }

    /// A renderer stream of this instance ended at `now_ms`.
    pub fn stream_closed(&self, now_ms: u64) {
        self.touch(now_ms);
        self.streams.fetch_sub(1, Ordering::AcqRel);
    }

    pub fn streams(&self) -> u32 {
        self.streams.load(Ordering::Acquire)
    }

    /// A renderer finished using the instance at `now_ms` (a unary call ended).
    pub fn touch(&self, now_ms: u64) {
        self.last_active_ms.fetch_max(now_ms, Ordering::AcqRel);
    }

    /// Since when the instance has been an orphan: its launching host is not `current_host`
    /// (it left), and no renderer stream or call uses it. `None` while it is in use or its host is
    /// connected. `now_ms` stands in for a host departure nobody recorded (a launch that raced
    /// with its host's disconnect).
    pub fn orphaned_since(&self, current_host: u64, now_ms: u64) -> Option<u64> {
        let launched_by = self.launched_by.load(Ordering::Acquire);
        if launched_by != 0 && launched_by == current_host {
            return None;
        }
        let host_left = self.host_left_ms.load(Ordering::Acquire);
        if launched_by != 0 && host_left == 0 {
            let _ = self.host_left_ms.compare_exchange(0, now_ms, Ordering::AcqRel, Ordering::Acquire);
            return None;
        }
        if self.streams() > 0 || self.calls_in_flight() > 0 {
            return None;
        }
        Some(host_left.max(self.last_active_ms.load(Ordering::Acquire)).max(self.launched_at_ms))
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
    /// The per-app counts the instances' connections and calls are counted in (see [`ConnSlot`]).
    per_app: Arc<KeyedCount>,
    /// The daemon's pool of calls in flight.
    calls: Arc<Pool>,
}

impl AppRegistry {
    pub fn new(max_in_flight: u32, occupancy: &Occupancy) -> Self {
        AppRegistry {
            instances: DashMap::new(),
            max_in_flight,
            per_app: occupancy.per_app.clone(),
            calls: occupancy.calls.clone(),
        }
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
            question: Default::default(),
            in_flight: AtomicU32::new(0),
            max_in_flight: self.max_in_flight,
            calls: self.calls.clone(),
            per_app: self.per_app.clone(),
            closed: AtomicBool::new(false),
            closing: Notify::new(),
            launched_by: AtomicU64::new(0),
            host_left_ms: AtomicU64::new(0),
            streams: AtomicU32::new(0),
            conns: AtomicU32::new(0),
            last_active_ms: AtomicU64::new(now_ms),
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
        instance.closed.store(true, Ordering::Release);
        instance.closing.notify_waiters();
        // Its lingering connections count no more against the app.
        let was = instance.conns.fetch_or(CONNS_CLOSED, Ordering::AcqRel);
        if was & CONNS_CLOSED == 0 && was > 0 {
            self.per_app.give_back(&instance.app_id, Counted::Connections, was);
        }
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

    /// The host session `host_session` ended at `now_ms`: the instances it launched are orphans
    /// from then on, unless a renderer uses them.
    pub fn host_left(&self, host_session: u64, now_ms: u64) {
        for entry in self.instances.iter() {
            if entry.launched_by.load(Ordering::Acquire) == host_session {
                entry.host_left_ms.store(now_ms, Ordering::Release);
            }
        }
    }

    /// The instances that have been orphans (see [`AppInstance::orphaned_since`]) for at least
    /// `idle_ms` at `now_ms`.
    pub fn idle_orphans(&self, current_host: u64, now_ms: u64, idle_ms: u64) -> Vec<Arc<AppInstance>> {
        self.instances
            .iter()
            .filter(|e| {
                e.orphaned_since(current_host, now_ms).is_some_and(|since| now_ms.saturating_sub(since) >= idle_ms)
            })
            .map(|e| e.value().clone())
            .collect()
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
    use crate::config::LimitsConfig;

    fn occupancy(max_calls_in_flight: u32, max_connections: u32) -> Occupancy {
        Occupancy::new(&LimitsConfig { max_calls_in_flight, max_connections, ..LimitsConfig::default() })
    }

    #[test]
    fn tokens_name_one_instance_and_die_with_it() {
        let reg = AppRegistry::new(2, &occupancy(10, 10));
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
    fn a_closed_instance_gives_its_connections_back_once() {
        use Counted::Connections;
        let occupancy = occupancy(10, 100);
        let (per_app, conns) = (occupancy.per_app.clone(), occupancy.connections.clone());
        let reg = AppRegistry::new(2, &occupancy);
        let (a, _) = reg.launch("app", AppJson::default(), 0);
        let (b, _) = reg.launch("app", AppJson::default(), 0);
        let app: Arc<str> = "app".into();
        let a1 = a.connection_opened(&conns, 3, 2).unwrap().unwrap();
        let a2 = a.connection_opened(&conns, 3, 2).unwrap().unwrap();
        let instance_cap = Refused::InstanceCap { what: Connections, cap: 2 };
        assert_eq!(a.connection_opened(&conns, 3, 2).unwrap_err(), instance_cap);
        let b1 = b.connection_opened(&conns, 3, 2).unwrap().unwrap();
        assert_eq!(b.connection_opened(&conns, 3, 2).unwrap_err(), Refused::AppCap { what: Connections, cap: 3 });
        assert_eq!(per_app.held("app", Connections), 3, "refusals took nothing");
        drop(a1);
        assert_eq!(per_app.held("app", Connections), 2);
        // Closing gives the lingering connection's unit back, and its end gives nothing again.
        reg.close(&a.instance_id);
        assert_eq!(per_app.held("app", Connections), 1);
        drop(a2);
        assert_eq!(per_app.held("app", Connections), 1);
        assert!(a.connection_opened(&conns, 3, 2).unwrap().is_none(), "a closed instance takes none");
        assert_eq!(per_app.held(&app, Connections), 1);
        drop(b1);
        assert_eq!(per_app.held("app", Connections), 0);
    }

    #[test]
    fn in_flight_slots_are_bounded_and_returned() {
        let occupancy = occupancy(10, 10);
        let reg = AppRegistry::new(2, &occupancy);
        let (a, _) = reg.launch("app", AppJson::default(), 0);
        let s1 = a.begin_call().unwrap();
        let _s2 = a.begin_call().unwrap();
        assert!(matches!(a.begin_call(), Err(ApiError::Exhausted(_))));
        assert_eq!(occupancy.calls.taken(), 2, "a refused call holds nothing of the pool");
        drop(s1);
        assert!(a.begin_call().is_ok());
        assert_eq!(occupancy.calls.taken(), 1);
    }

    #[test]
    fn one_app_takes_at_most_half_of_what_the_others_leave_of_the_calls_in_flight() {
        let occupancy = occupancy(8, 10);
        let reg = AppRegistry::new(100, &occupancy);
        let (a, _) = reg.launch("a", AppJson::default(), 0);
        let (b, _) = reg.launch("b", AppJson::default(), 0);
        let (c, _) = reg.launch("c", AppJson::default(), 0);
        let take_all = |i: &Arc<AppInstance>| {
            let mut slots = Vec::new();
            while let Ok(slot) = i.begin_call() {
                slots.push(slot);
            }
            slots
        };
        let (held_a, held_b, held_c) = (take_all(&a), take_all(&b), take_all(&c));
        assert_eq!((held_a.len(), held_b.len(), held_c.len()), (4, 2, 1));
        let Err(ApiError::Exhausted(why)) = a.begin_call() else { panic!("refused") };
        assert!(why.contains("its share of limits.max_calls_in_flight = 8"), "{why}");
        drop(held_a);
        let more_b = take_all(&b);
        assert_eq!(more_b.len(), 2, "b's share grows with what a gave back");
        assert_eq!(occupancy.calls.taken(), 5);
        drop((held_b, held_c, more_b));
        assert_eq!(occupancy.calls.taken(), 0);
    }
}
