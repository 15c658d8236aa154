//! Consent: users' decisions about scopes per app (grants and remembered refusals, as a permission
//! store keeps them), the events that tell the host of every change, and the disclosure
//! [`ledger`].
//!
//! Every source of a decision (the host's getAuthCode answer, wx.authorize, wx.openSetting, the
//! host's SetDecision, the operator's revoke) goes through [`Consent::decide`], so each change is
//! stored, announced, and, whenever a scope is not granted afterwards (revoked, refused, or
//! returned to undecided, whether or not a decision was stored before), bites at once: the app's
//! outstanding codes of that scope for that user are invalidated on the platform.
//!
//! A decision and an issue of the same (app, uid) never interleave: [`Consent::clear`] checks the
//! stored decision and holds a shared lock until the caller has issued its code, and
//! [`Consent::decide`] holds the same lock exclusively while it stores and invalidates. So a code
//! is issued either before a decision (and invalidated by it) or after it (and allowed by it).

pub mod ledger;

use std::{
    collections::BTreeMap,
    hash::{BuildHasher, RandomState},
    sync::Arc,
};

use miniapp_broker_proto::{
    api::scope,
    v1::{ConsentChanged, Decision, DecisionSource},
};
use tokio::sync::{RwLock, RwLockReadGuard, broadcast};
use tracing::info;

use crate::{
    clock::Clock,
    error::{ApiError, StoreError},
    platform::{Platform, ValueKind},
    store::Store,
};
pub use ledger::Ledger;

/// How many decision events may wait for a slow host before the oldest are dropped.
const EVENTS: usize = 256;
/// How many locks the (app, uid) pairs share between issues and decisions: a decision waits only
/// for the issues of the pairs in its shard, never for every app's.
const SHARDS: usize = 64;

/// Proof that a scope's value may go to (app, uid) now: the stored decision allowed it when this
/// was taken, and no decision about that pair can be stored until it is dropped. Keep it only
/// around the short, local step that issues the code or hands the value out.
#[derive(Debug)]
pub struct Cleared<'a> {
    _shard: RwLockReadGuard<'a, ()>,
}

/// The consent store and its change events. See the module docs.
pub struct Consent {
    store: Arc<Store>,
    platform: Arc<dyn Platform>,
    clock: Arc<dyn Clock>,
    remember_refusals: bool,
    events: broadcast::Sender<ConsentChanged>,
    /// Issues (shared) against decisions (exclusive), per shard of (app, uid): see the module docs.
    shards: Box<[RwLock<()>]>,
    hasher: RandomState,
    pub ledger: Ledger,
}

impl std::fmt::Debug for Consent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consent").field("remember_refusals", &self.remember_refusals).finish_non_exhaustive()
    }
}

impl Consent {
    pub fn new(
        store: Arc<Store>,
        platform: Arc<dyn Platform>,
        clock: Arc<dyn Clock>,
        remember_refusals: bool,
        ledger_days: u32,
    ) -> Consent {
        let ledger = Ledger::new(store.clone(), clock.clone(), ledger_days);
        Consent {
            store,
            platform,
            clock,
            remember_refusals,
            events: broadcast::channel(EVENTS).0,
            shards: (0..SHARDS).map(|_| RwLock::new(())).collect(),
            hasher: RandomState::new(),
            ledger,
        }
    }

    fn shard(&self, app_id: &str, uid: &str) -> &RwLock<()> {
        let hash = self.hasher.hash_one((app_id, uid)) as usize;
        &self.shards[hash % self.shards.len()]
    }

    /// Clears `scope`'s value to go to (app, uid) now, as the stored decision stands: refused
    /// (and remembered) fails with `AuthDeny`; with `needs_grant` (v3) a scope not granted fails
    /// with `ScopeDenied`. The caller issues under the returned [`Cleared`]; see the module docs.
    pub async fn clear(
        &self,
        app_id: &str,
        uid: &str,
        scope: &str,
        needs_grant: bool,
    ) -> Result<Cleared<'_>, ApiError> {
        let shard = self.shard(app_id, uid).read().await;
        if self.refuses_any(app_id, uid, &[scope])? {
            return Err(ApiError::AuthDeny);
        }
        if needs_grant && !self.store.granted_scopes(app_id, uid)?.iter().any(|s| s == scope) {
            return Err(ApiError::ScopeDenied { scope: scope.to_owned(), message: "revoked".to_owned() });
        }
        Ok(Cleared { _shard: shard })
    }

    /// Every decision change from now on (the host link forwards them to the host).
    pub fn subscribe(&self) -> broadcast::Receiver<ConsentChanged> {
        self.events.subscribe()
    }

    /// Whether a refusal is remembered (config `consent.remember_refusals`).
    pub fn remembers_refusals(&self) -> bool {
        self.remember_refusals
    }

    /// The scopes `uid` granted `app_id`.
    pub fn granted(&self, app_id: &str, uid: &str) -> Result<Vec<String>, StoreError> {
        self.store.granted_scopes(app_id, uid)
    }

    /// Whether `uid` refused any of `scopes` for `app_id` and the refusal stands (remembered
    /// refusals on).
    pub fn refuses_any(&self, app_id: &str, uid: &str, scopes: &[&str]) -> Result<bool, StoreError> {
        Ok(self.remember_refusals
            && self.store.refused_scopes(app_id, uid)?.iter().any(|s| scopes.contains(&s.as_str())))
    }

    /// The decided scopes of (app, uid): scope → granted.
    pub fn decisions(&self, app_id: &str, uid: &str) -> Result<BTreeMap<String, bool>, StoreError> {
        let mut out: BTreeMap<String, bool> =
            self.store.refused_scopes(app_id, uid)?.into_iter().map(|s| (s, false)).collect();
        out.extend(self.store.granted_scopes(app_id, uid)?.into_iter().map(|s| (s, true)));
        Ok(out)
    }

    /// The decisions as wx.getSetting answers them: the v3 scopes, plus `scope.userInfo`, true when
    /// avatar and nickname are both granted and false when either is refused.
    pub fn auth_setting(&self, app_id: &str, uid: &str) -> Result<BTreeMap<String, bool>, StoreError> {
        let mut setting = self.decisions(app_id, uid)?;
        let (avatar, nickname) = (setting.get(scope::AVATAR).copied(), setting.get(scope::NICKNAME).copied());
        if avatar == Some(false) || nickname == Some(false) {
            setting.insert(scope::USER_INFO.to_owned(), false);
        } else if avatar == Some(true) && nickname == Some(true) {
            setting.insert(scope::USER_INFO.to_owned(), true);
        }
        Ok(setting)
    }

    /// Sets scopes' decisions of (app, uid) (`Some(true)` granted, `Some(false)` refused, `None`
    /// undecided), stored together in one transaction (scope.userInfo is two scopes, and no reader
    /// may see one without the other), and tells the host of each that changed; a scope that is
    /// not granted afterwards invalidates the app's outstanding codes of it for that user, changed
    /// or not (a v2 code is issued with no decision stored). Returns how many changed. Callers
    /// that acted on behalf of the signed-in user hold its ticket around this (see `user.rs`);
    /// none holds a [`Cleared`] (this waits for every one of its shard).
    pub async fn decide(
        &self,
        app_id: &str,
        uid: &str,
        decisions: &[(&str, Option<bool>)],
        source: DecisionSource,
    ) -> Result<usize, StoreError> {
        // No code of this pair is issued from the decision's store until its codes are gone.
        let _deciding = self.shard(app_id, uid).write().await;
        let now = self.clock.now_ms();
        let previous = self.store.decide(app_id, uid, decisions, now)?;
        let mut changed = 0;
        for (&(scope, decision), previous) in decisions.iter().zip(previous) {
            let mut invalidated = 0;
            if decision != Some(true)
                && let Some(kind) = ValueKind::of_scope(scope)
            {
                invalidated = self.platform.invalidate_codes(app_id, uid, Some(kind)).await;
            }
            if previous == decision {
                if invalidated > 0 {
                    info!(app_id, scope, source = source.as_str_name(), invalidated, "undecided scope's codes revoked");
                }
                continue;
            }
            changed += 1;
            let proto = match decision {
                Some(true) => Decision::Granted,
                Some(false) => Decision::Refused,
                None => Decision::Undecided,
            };
            info!(
                app_id,
                scope,
                decision = proto.as_str_name(),
                source = source.as_str_name(),
                invalidated,
                "consent changed"
            );
            let event = ConsentChanged {
                app_id: app_id.to_owned(),
                uid: uid.to_owned(),
                scope: scope.to_owned(),
                decision: proto as i32,
                source: source as i32,
                at_ms: now,
            };
            // No receiver (no host connected) is fine: the store is the truth, the event a courtesy.
            let _ = self.events.send(event);
        }
        Ok(changed)
    }

    /// Returns one scope, or every scope for `None`, of (app, uid) to undecided: the user is asked
    /// again, and the app's outstanding codes of the scope (of every scope) for the user die,
    /// decided before or not. Returns how many stored decisions were revoked.
    pub async fn revoke(
        &self,
        app_id: &str,
        uid: &str,
        scope: Option<&str>,
        source: DecisionSource,
    ) -> Result<usize, StoreError> {
        let scopes: Vec<String> = match scope {
            Some(s) => vec![s.to_owned()],
            None => {
                let mut all: Vec<String> = self.decisions(app_id, uid)?.into_keys().collect();
                // The scopes with codes, decided or not.
                for kind in [ValueKind::PhoneNumber, ValueKind::Email] {
                    if !all.iter().any(|s| s == kind.scope()) {
                        all.push(kind.scope().to_owned());
                    }
                }
                all
            }
        };
        let undecided: Vec<(&str, Option<bool>)> = scopes.iter().map(|s| (s.as_str(), None)).collect();
        self.decide(app_id, uid, &undecided, source).await
    }
}
