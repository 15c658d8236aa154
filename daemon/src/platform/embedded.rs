//! The platform embedded in the daemon: one-time codes in memory, sessions in the store, openid and
//! unionid as keyed hashes of the daemon secret.
//!
//! Codes are 144 random bits, single use, bound to (app, uid, purpose) and expire after
//! `sessions.code_ttl_secs` (5 minutes). They live in memory only: a daemon restart invalidates
//! outstanding codes (the mini app logs in again), while sessions, grants and secrets are durable.
//!
//! Every code is a disclosure: issuing one writes its ledger rows (what it stands for, to which app
//! and user), and redeeming it stamps them with when and through which surface, whichever surface
//! redeems it. A code whose rows cannot be written is not issued.
//!
//! App backends (the gRPC `Exchange` service and the backend HTTP API alike) authenticate here,
//! with the app's secret or an access token ([`super::access_tokens`]), and every attempt is taken
//! from the app's exchange bucket (`limits.exchanges_per_minute_per_app`).
//! At most `sessions.max_codes_per_user` codes of one (app, uid) are outstanding: issuing one more
//! drops the oldest, so an app that logs in without ever exchanging cannot grow memory.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::Arc,
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use dashmap::DashMap;
use hmac::{Hmac, Mac};
use miniapp_broker_proto::v1::Code2SessionResponse;
use sha2::Sha256;

use tracing::info;

use super::{
    AccessToken, AuthorizedApp, Credential, Disclosed, ExchangeFailure, Platform, ProfileField, Surface, TokenRequest,
    ValueKind,
    access_tokens::AccessTokens,
    vouch::{self, Held},
};
use crate::{
    clock::Clock,
    config::AppConfig,
    error::ApiError,
    limits::RateLimits,
    store::{NewLedgerRow, SessionRow, Store},
    tokens::{hash_secret, random_token, secrets_equal},
};

/// What a code stands for.
#[derive(Debug, Clone)]
enum Purpose {
    Login { session_key: String, auth_code: Option<String> },
    Value { kind: ValueKind, value: String },
}

#[derive(Debug, Clone)]
struct CodeEntry {
    app_id: String,
    uid: String,
    purpose: Purpose,
    expires_at_ms: u64,
    /// Its rows in the disclosure ledger.
    ledger: Vec<u64>,
}

/// The embedded platform. See the module docs.
pub struct EmbeddedPlatform {
    store: Arc<Store>,
    clock: Arc<dyn Clock>,
    secret: [u8; 32],
    apps: BTreeMap<String, AppConfig>,
    codes: DashMap<String, CodeEntry>,
    /// Redeemed codes until they would have expired, so a replay gets "code been used".
    spent: DashMap<String, u64>,
    /// The codes issued to each (app, uid), oldest first (some may be redeemed or expired by now).
    issued: DashMap<(String, String), VecDeque<String>>,
    max_codes_per_user: usize,
    code_ttl_ms: u64,
    session_ttl_ms: u64,
    /// App backends' attempts, per app, over both surfaces.
    exchange_rate: RateLimits,
    tokens: AccessTokens,
    /// The superapp's server, when one vouches for users ([`super::vouch`]).
    superapp: Option<Arc<crate::superapp::SuperappClient>>,
}

/// What a backend redeemed (for the log and the disclosure ledger; never the value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redeemed {
    Login,
    Value(ValueKind),
}

impl Redeemed {
    fn as_str(self) -> &'static str {
        match self {
            Redeemed::Login => "login",
            Redeemed::Value(ValueKind::PhoneNumber) => "phone_number",
            Redeemed::Value(ValueKind::Email) => "email",
        }
    }
}

impl std::fmt::Debug for EmbeddedPlatform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedPlatform").field("codes", &self.codes.len()).finish_non_exhaustive()
    }
}

type HmacSha256 = Hmac<Sha256>;

/// A stable identifier of (`a`, `b`) for `label`, keyed by the daemon secret: openid, unionid.
fn keyed(secret: &[u8; 32], label: &str, a: &str, b: &str) -> String {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
    for part in [label, a, b] {
        mac.update(part.as_bytes());
        mac.update(&[0]);
    }
    URL_SAFE_NO_PAD.encode(&mac.finalize().into_bytes()[..21])
}

/// The openid of (app, uid): see [`keyed`].
fn openid_of(secret: &[u8; 32], app_id: &str, uid: &str) -> String {
    format!("o{}", keyed(secret, "openid", app_id, uid))
}

impl EmbeddedPlatform {
    pub fn new(
        store: Arc<Store>,
        clock: Arc<dyn Clock>,
        apps: BTreeMap<String, AppConfig>,
        code_ttl_secs: u64,
        session_ttl_secs: u64,
        max_codes_per_user: u32,
        exchange_rate: RateLimits,
    ) -> Result<EmbeddedPlatform, crate::error::StoreError> {
        let secret = store.daemon_secret(crate::tokens::random_key)?;
        // Sessions a daemon from before sessions kept their openid stored: find them by it too.
        let filled = store.fill_session_openids(|app_id, uid| openid_of(&secret, app_id, uid))?;
        if filled > 0 {
            info!(sessions = filled, "stored the openid of sessions from an earlier version");
        }
        for (app_id, app) in &apps {
            if let Some(secret) = &app.secret {
                store.set_app_secret_hash(app_id, &hash_secret(secret), true)?;
            }
        }
        Ok(EmbeddedPlatform {
            store,
            clock,
            secret,
            apps,
            codes: DashMap::new(),
            spent: DashMap::new(),
            issued: DashMap::new(),
            max_codes_per_user: max_codes_per_user.max(1) as usize,
            code_ttl_ms: code_ttl_secs * 1000,
            session_ttl_ms: session_ttl_secs * 1000,
            exchange_rate,
            tokens: AccessTokens::default(),
            superapp: None,
        })
    }

    /// This platform with `server` vouching for its users (`[superapp] server_url`).
    pub fn with_superapp(mut self, server: Option<Arc<crate::superapp::SuperappClient>>) -> EmbeddedPlatform {
        self.superapp = server;
        self
    }

    fn keyed(&self, label: &str, a: &str, b: &str) -> String {
        keyed(&self.secret, label, a, b)
    }

    /// Issues a code for `purpose`; a login code's `session` is written with its ledger rows.
    fn issue(
        &self,
        app_id: &str,
        uid: &str,
        purpose: Purpose,
        session: Option<&SessionRow>,
    ) -> Result<String, ApiError> {
        let now = self.clock.now_ms();
        let (api, disclosed): (&str, &[Disclosed]) = match &purpose {
            Purpose::Login { .. } if self.union_group(app_id).is_some() => {
                ("login", &[Disclosed::Openid, Disclosed::Unionid])
            }
            Purpose::Login { .. } => ("login", &[Disclosed::Openid]),
            Purpose::Value { kind: ValueKind::PhoneNumber, .. } => ("getPhoneNumber", &[Disclosed::PhoneNumber]),
            Purpose::Value { kind: ValueKind::Email, .. } => ("getEmail", &[Disclosed::Email]),
        };
        let rows: Vec<NewLedgerRow<'_>> = disclosed
            .iter()
            .map(|d| NewLedgerRow {
                app_id,
                uid,
                what: d.as_str(),
                surface: Surface::RendererApi.as_str(),
                api,
                at_ms: now,
                via_code: true,
            })
            .collect();
        let ledger = self.store.issue_code(session, &rows)?;
        let code = random_token(18);
        let entry = CodeEntry {
            app_id: app_id.to_owned(),
            uid: uid.to_owned(),
            purpose,
            expires_at_ms: now + self.code_ttl_ms,
            ledger,
        };
        // The (app, uid) entry stays locked until the code is in: concurrent issues count right.
        // At the cap the oldest entry goes: a code already gone (redeemed, expired, invalidated)
        // for free, else the oldest outstanding one. Each code leaves the queue once, so an issue
        // costs O(1) even at the cap (a scan of the queue here cost every login at the cap ~100
        // map lookups); gone codes further back count until they reach the front or the sweep.
        let mut issued = self.issued.entry((app_id.to_owned(), uid.to_owned())).or_default();
        while issued.len() >= self.max_codes_per_user {
            if let Some(oldest) = issued.pop_front() {
                self.codes.remove(&oldest);
            }
        }
        self.codes.insert(code.clone(), entry);
        issued.push_back(code.clone());
        Ok(code)
    }

    /// A fresh session of (app, uid), not yet stored.
    fn new_session(&self, app_id: &str, uid: &str) -> SessionRow {
        let now = self.clock.now_ms();
        SessionRow {
            app_id: app_id.to_owned(),
            uid: uid.to_owned(),
            openid: self.openid(app_id, uid),
            session_key: random_token(16),
            created_at_ms: now,
            expires_at_ms: now + self.session_ttl_ms,
        }
    }

    fn union_group(&self, app_id: &str) -> Option<&str> {
        self.apps.get(app_id).and_then(|a| a.union_group.as_deref())
    }

    /// Drops expired codes and tombstones; called periodically.
    pub fn sweep(&self) {
        let now = self.clock.now_ms();
        self.codes.retain(|_, e| e.expires_at_ms > now);
        self.spent.retain(|_, expires| *expires > now);
        self.issued.retain(|_, issued| {
            issued.retain(|c| self.codes.contains_key(c));
            !issued.is_empty()
        });
        self.tokens.sweep(now);
        self.exchange_rate.sweep();
    }

    /// Outstanding codes (status, tests).
    pub fn outstanding_codes(&self) -> usize {
        self.codes.len()
    }

    /// Who the credential proves the caller to be; counts the attempt against the app's bucket
    /// once the app is known to exist (so unknown app ids make no buckets).
    fn authenticate_now(&self, credential: Credential<'_>) -> Result<AuthorizedApp, ExchangeFailure> {
        match credential {
            Credential::Secret { app_id, secret } => {
                if app_id.is_empty() {
                    return Err(ExchangeFailure::Malformed(41002, "app id is required"));
                }
                if secret.is_empty() {
                    return Err(ExchangeFailure::Malformed(41004, "secret is required"));
                }
                let stored = self
                    .store
                    .app_secret_hash(app_id)
                    .map_err(|e| ExchangeFailure::System(e.to_string()))?
                    .ok_or(ExchangeFailure::InvalidAppId)?;
                self.take_attempt(app_id)?;
                if secrets_equal(&stored, &hash_secret(secret)) {
                    Ok(AuthorizedApp::new(app_id))
                } else {
                    Err(ExchangeFailure::InvalidSecret)
                }
            }
            Credential::AccessToken(token) => {
                let app_id = self.tokens.verify(token, self.clock.now_ms())?;
                self.take_attempt(&app_id)?;
                Ok(AuthorizedApp::new(&app_id))
            }
        }
    }

    fn take_attempt(&self, app_id: &str) -> Result<(), ExchangeFailure> {
        if self.exchange_rate.allows(&Arc::from(app_id)) { Ok(()) } else { Err(ExchangeFailure::RateLimited) }
    }

    /// The one point every redemption passes, whichever surface it came through: the disclosure
    /// ledger records `what` went to `app` through `surface` here (never the value).
    fn redeemed(&self, surface: Surface, app: &AuthorizedApp, _uid: &str, what: Redeemed) {
        info!(app_id = app.app_id(), surface = surface.as_str(), redeemed = what.as_str(), "code exchanged");
    }

    /// Logs a refusal with the app id only when the platform validated it.
    fn refused(&self, surface: Surface, app: Option<&AuthorizedApp>, exchange: &'static str, e: &ExchangeFailure) {
        match app {
            Some(app) => info!(
                app_id = app.app_id(),
                surface = surface.as_str(),
                exchange,
                errcode = e.errcode(),
                "exchange refused"
            ),
            None => info!(surface = surface.as_str(), exchange, errcode = e.errcode(), "exchange refused"),
        }
    }

    /// Takes a code out if it belongs to `app_id` and `accept` likes its purpose; a code that does
    /// not match stays where it is (a wrong guess changes nothing). A redeemed code's ledger rows
    /// are stamped with `surface` before its value may leave.
    fn redeem(
        &self,
        app_id: &str,
        code: &str,
        surface: Surface,
        accept: impl Fn(&str, &Purpose) -> bool,
    ) -> Result<CodeEntry, ExchangeFailure> {
        if code.is_empty() {
            return Err(ExchangeFailure::Malformed(41008, "code is required"));
        }
        let now = self.clock.now_ms();
        let taken = self
            .codes
            .remove_if(code, |_, e| e.app_id == app_id && accept(&e.uid, &e.purpose) && e.expires_at_ms > now);
        if let Some((code, entry)) = taken {
            self.spent.insert(code, entry.expires_at_ms);
            // The value leaves only once its disclosure is on record.
            self.store
                .ledger_redeemed(&entry.ledger, surface.as_str(), now)
                .map_err(|e| ExchangeFailure::System(e.to_string()))?;
            return Ok(entry);
        }
        if self.spent.contains_key(code) {
            return Err(ExchangeFailure::CodeUsed);
        }
        match self.codes.get(code) {
            Some(e) if e.app_id == app_id && accept(&e.uid, &e.purpose) && e.expires_at_ms <= now => {
                Err(ExchangeFailure::CodeExpired)
            }
            _ => Err(ExchangeFailure::InvalidCode),
        }
    }
}

impl EmbeddedPlatform {
    /// The user and the superapp temporary code of a live value code `accept` takes, without
    /// taking it.
    fn peek_temporary(
        &self,
        app_id: &str,
        code: &str,
        accept: &impl Fn(&str, &Purpose) -> bool,
    ) -> Option<(String, String)> {
        let now = self.clock.now_ms();
        let entry = self.codes.get(code)?;
        if entry.app_id != app_id || !accept(&entry.uid, &entry.purpose) || entry.expires_at_ms <= now {
            return None;
        }
        match &entry.purpose {
            Purpose::Value { value, .. } => match Held::decode(value) {
                Held::TemporaryCode(t) => Some((entry.uid.clone(), t.to_owned())),
                Held::Value(_) => None,
            },
            Purpose::Login { .. } => None,
        }
    }

    fn check_signature_now(&self, app: &AuthorizedApp, openid: &str, signature: &str) -> Result<(), ExchangeFailure> {
        if openid.is_empty() {
            return Err(ExchangeFailure::Malformed(41009, "openid is required"));
        }
        if signature.is_empty() {
            return Err(ExchangeFailure::Malformed(87009, "signature is required"));
        }
        let now = self.clock.now_ms();
        // The session by its (app, openid) key: the store keeps each session's openid.
        let session = self
            .store
            .session_by_openid(app.app_id(), openid)
            .map_err(|e| ExchangeFailure::System(e.to_string()))?
            .filter(|s| s.expires_at_ms > now)
            .ok_or(ExchangeFailure::InvalidSignature)?;
        let expected = session_signature(&session.session_key);
        if secrets_equal(expected.as_bytes(), signature.to_ascii_lowercase().as_bytes()) {
            Ok(())
        } else {
            Err(ExchangeFailure::InvalidSignature)
        }
    }
}

/// checksession's signature of a session: hex(hmac_sha256(key = session_key, message = "")).
pub fn session_signature(session_key: &str) -> String {
    let mac = HmacSha256::new_from_slice(session_key.as_bytes()).expect("HMAC takes any key length");
    mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

#[tonic::async_trait]
impl Platform for EmbeddedPlatform {
    async fn login_code(&self, app_id: &str, uid: &str, auth_code: Option<String>) -> Result<String, ApiError> {
        // A vouched authCode is spent at the superapp server: the backend gets the openid, not it.
        let auth_code = match &self.superapp {
            Some(server) => {
                vouch::login(server, uid, auth_code.as_deref()).await?;
                None
            }
            None => auth_code,
        };
        // The session and the code's ledger rows are one write: both or neither.
        let session = self.new_session(app_id, uid);
        let session_key = session.session_key.clone();
        self.issue(app_id, uid, Purpose::Login { session_key, auth_code }, Some(&session))
    }

    async fn start_session(&self, app_id: &str, uid: &str) -> Result<String, ApiError> {
        if let Some(server) = &self.superapp {
            vouch::check_user(server, uid).await?;
        }
        let session = self.new_session(app_id, uid);
        self.store.upsert_session(&session)?;
        Ok(session.session_key)
    }

    async fn check_session(&self, app_id: &str, uid: &str) -> Result<(), ApiError> {
        match self.store.session(app_id, uid)? {
            Some(s) if s.expires_at_ms > self.clock.now_ms() => Ok(()),
            _ => Err(ApiError::SessionExpired),
        }
    }

    async fn value_code(&self, app_id: &str, uid: &str, kind: ValueKind, value: String) -> Result<String, ApiError> {
        self.issue(app_id, uid, Purpose::Value { kind, value }, None)
    }

    fn vouches(&self) -> bool {
        self.superapp.is_some()
    }

    async fn vouched_value_code(&self, app_id: &str, uid: &str, kind: ValueKind) -> Result<String, ApiError> {
        let Some(server) = &self.superapp else {
            return Err(ApiError::Superapp("no superapp server is configured".into()));
        };
        let temporary = vouch::temporary_code(server, uid, kind).await?;
        self.issue(app_id, uid, Purpose::Value { kind, value: temporary }, None)
    }

    async fn vouched_profile(&self, uid: &str, field: ProfileField) -> Result<String, ApiError> {
        match &self.superapp {
            Some(server) => vouch::profile(server, uid, field).await,
            None => Err(ApiError::Superapp("no superapp server is configured".into())),
        }
    }

    async fn invalidate_codes(&self, app_id: &str, uid: &str, kind: Option<ValueKind>) -> usize {
        let before = self.codes.len();
        self.codes.retain(|_, e| {
            let of_kind = matches!(e.purpose, Purpose::Value { kind: k, .. } if kind.is_none_or(|want| want == k));
            !(of_kind && e.app_id == app_id && e.uid == uid)
        });
        before.saturating_sub(self.codes.len())
    }

    async fn user_changed(&self, old_uid: &str) -> Result<(), ApiError> {
        self.store.delete_sessions_of(old_uid)?;
        self.codes.retain(|_, e| e.uid != old_uid);
        self.issued.retain(|(_, uid), _| uid != old_uid);
        Ok(())
    }

    async fn authenticate(
        &self,
        surface: Surface,
        credential: Credential<'_>,
    ) -> Result<AuthorizedApp, ExchangeFailure> {
        let outcome = self.authenticate_now(credential);
        if let Err(e) = &outcome {
            // The app id is named only when it is a registered app (a wrong secret, a limit).
            let known = match (credential, e) {
                (Credential::Secret { app_id, .. }, ExchangeFailure::InvalidSecret | ExchangeFailure::RateLimited) => {
                    Some(AuthorizedApp::new(app_id))
                }
                _ => None,
            };
            self.refused(surface, known.as_ref(), "authenticate", e);
        }
        outcome
    }

    async fn code2session(
        &self,
        surface: Surface,
        app: &AuthorizedApp,
        code: &str,
    ) -> Result<Code2SessionResponse, ExchangeFailure> {
        let entry = match self.redeem(app.app_id(), code, surface, |_, p| matches!(p, Purpose::Login { .. })) {
            Ok(entry) => entry,
            Err(e) => {
                self.refused(surface, Some(app), "code2Session", &e);
                return Err(e);
            }
        };
        let Purpose::Login { session_key, auth_code } = entry.purpose else {
            return Err(ExchangeFailure::InvalidCode);
        };
        self.redeemed(surface, app, &entry.uid, Redeemed::Login);
        let unionid = self
            .apps
            .get(app.app_id())
            .and_then(|a| a.union_group.as_deref())
            .map(|group| self.keyed("unionid", group, &entry.uid))
            .unwrap_or_default();
        Ok(Code2SessionResponse {
            openid: self.openid(app.app_id(), &entry.uid),
            session_key,
            unionid,
            auth_code: auth_code.unwrap_or_default(),
        })
    }

    async fn redeem_value(
        &self,
        surface: Surface,
        app: &AuthorizedApp,
        code: &str,
        kind: ValueKind,
        openid: Option<&str>,
    ) -> Result<String, ExchangeFailure> {
        let accept = |uid: &str, p: &Purpose| {
            matches!(p, Purpose::Value { kind: k, .. } if *k == kind)
                && openid.is_none_or(|o| self.openid(app.app_id(), uid) == o)
        };
        let exchange = if kind == ValueKind::PhoneNumber { "getPhoneNumber" } else { "getEmail" };
        // A code standing for the superapp server's temporary code: the value is fetched before
        // the code is taken, so a failing server leaves it unspent and off the ledger (the backend
        // may retry), and the value is never stored.
        let fetched = match self.peek_temporary(app.app_id(), code, &accept) {
            Some((uid, temporary)) => {
                let Some(server) = &self.superapp else {
                    let e = ExchangeFailure::System("no superapp server is configured to redeem this code".into());
                    self.refused(surface, Some(app), exchange, &e);
                    return Err(e);
                };
                match vouch::value(server, &uid, kind, &temporary).await {
                    Ok(value) => Some(value),
                    Err(e) => {
                        self.refused(surface, Some(app), exchange, &e);
                        return Err(e);
                    }
                }
            }
            None => None,
        };
        let entry = match self.redeem(app.app_id(), code, surface, accept) {
            Ok(entry) => entry,
            Err(e) => {
                self.refused(surface, Some(app), exchange, &e);
                return Err(e);
            }
        };
        match (entry.purpose, fetched) {
            (Purpose::Value { value, .. }, fetched) => {
                let value = match (Held::decode(&value), fetched) {
                    (Held::Value(value), _) => value.to_owned(),
                    (Held::TemporaryCode(_), Some(fetched)) => fetched,
                    // Issued as a temporary code after the peek (cannot happen: codes are never
                    // rewritten); refuse rather than hand out a temporary code as the value.
                    (Held::TemporaryCode(_), None) => return Err(ExchangeFailure::InvalidCode),
                };
                self.redeemed(surface, app, &entry.uid, Redeemed::Value(kind));
                Ok(value)
            }
            (Purpose::Login { .. }, _) => Err(ExchangeFailure::InvalidCode),
        }
    }

    async fn access_token(&self, app: &AuthorizedApp, request: TokenRequest) -> Result<AccessToken, ExchangeFailure> {
        let token = self.tokens.issue(app.app_id(), request, self.clock.now_ms());
        info!(app_id = app.app_id(), stable = request != TokenRequest::Fresh, "access token issued");
        Ok(token)
    }

    async fn check_session_signature(
        &self,
        app: &AuthorizedApp,
        openid: &str,
        signature: &str,
    ) -> Result<(), ExchangeFailure> {
        let outcome = self.check_signature_now(app, openid, signature);
        if let Err(e) = &outcome {
            self.refused(Surface::BackendHttp, Some(app), "checkSession", e);
        }
        outcome
    }

    fn openid(&self, app_id: &str, uid: &str) -> String {
        openid_of(&self.secret, app_id, uid)
    }

    async fn register_app(&self, app_id: &str, rotate: bool) -> Result<Option<String>, ApiError> {
        let secret = random_token(24);
        let written = self.store.set_app_secret_hash(app_id, &hash_secret(&secret), rotate)?;
        if written {
            // The old secret's access tokens stop working with it.
            self.tokens.revoke_app(app_id);
        }
        Ok(written.then_some(secret))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{clock::ManualClock, config::LimitsConfig};

    fn platform(clock: Arc<ManualClock>) -> EmbeddedPlatform {
        let store = Arc::new(Store::open(None, false).unwrap());
        let rate = RateLimits::exchanges(&LimitsConfig::default());
        EmbeddedPlatform::new(store, clock, BTreeMap::new(), 300, 3600, 100, rate).unwrap()
    }

    async fn app(p: &EmbeddedPlatform, app_id: &str, secret: &str) -> AuthorizedApp {
        p.authenticate(Surface::Exchange, Credential::Secret { app_id, secret }).await.unwrap()
    }

    #[tokio::test]
    async fn checksession_finds_the_session_of_the_openid_among_many() {
        let clock = ManualClock::new(1_000);
        let p = platform(clock.clone());
        let secret = p.register_app("a", false).await.unwrap().unwrap();
        let a = app(&p, "a", &secret).await;
        let mut keys = Vec::new();
        for i in 0..300 {
            let uid = format!("u{i}");
            keys.push((p.openid("a", &uid), p.start_session("a", &uid).await.unwrap()));
            p.start_session("b", &uid).await.unwrap();
        }
        for (openid, key) in keys.iter().step_by(37) {
            assert_eq!(p.check_signature_now(&a, openid, &session_signature(key)), Ok(()));
        }
        let (openid, key) = &keys[5];
        let other_key = &keys[6].1;
        let fail = |openid: &str, key: &str| p.check_signature_now(&a, openid, &session_signature(key));
        assert_eq!(fail(openid, other_key), Err(ExchangeFailure::InvalidSignature), "another user's session");
        assert_eq!(fail(&p.openid("b", "u5"), key), Err(ExchangeFailure::InvalidSignature), "another app's openid");
        assert_eq!(fail(&p.openid("a", "nobody"), key), Err(ExchangeFailure::InvalidSignature), "no session");
        clock.advance_ms(3_600_000);
        assert_eq!(fail(openid, key), Err(ExchangeFailure::InvalidSignature), "expired");
    }

    #[tokio::test]
    async fn a_session_stored_before_sessions_kept_their_openid_is_found_by_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.db");
        {
            // The sessions table as an earlier version created it, with one live session.
            let old = rusqlite::Connection::open(&path).unwrap();
            old.execute_batch(
                "CREATE TABLE sessions (
                    app_id TEXT NOT NULL, uid TEXT NOT NULL, session_key TEXT NOT NULL,
                    created_at_ms INTEGER NOT NULL, expires_at_ms INTEGER NOT NULL,
                    PRIMARY KEY (app_id, uid));
                 INSERT INTO sessions VALUES ('a', 'u', 'key-from-before', 1000, 9000000);",
            )
            .unwrap();
        }
        let store = Arc::new(Store::open(Some(&path), false).unwrap());
        let rate = RateLimits::exchanges(&LimitsConfig::default());
        let clock = ManualClock::new(2_000);
        let p = EmbeddedPlatform::new(store, clock, BTreeMap::new(), 300, 3600, 100, rate).unwrap();
        let secret = p.register_app("a", false).await.unwrap().unwrap();
        let a = app(&p, "a", &secret).await;
        let signature = session_signature("key-from-before");
        assert_eq!(p.check_signature_now(&a, &p.openid("a", "u"), &signature), Ok(()));
    }

    #[tokio::test]
    async fn a_wrong_app_guess_leaves_the_code_usable() {
        let p = platform(ManualClock::new(1_000));
        let secret = p.register_app("a", false).await.unwrap().unwrap();
        let other = p.register_app("b", false).await.unwrap().unwrap();
        let (a, b) = (app(&p, "a", &secret).await, app(&p, "b", &other).await);
        let code = p.login_code("a", "u", None).await.unwrap();
        assert_eq!(p.code2session(Surface::Exchange, &b, &code).await, Err(ExchangeFailure::InvalidCode));
        assert!(p.code2session(Surface::BackendHttp, &a, &code).await.is_ok());
        assert_eq!(p.code2session(Surface::Exchange, &a, &code).await, Err(ExchangeFailure::CodeUsed));
    }

    #[tokio::test]
    async fn codes_expire_after_their_ttl() {
        let clock = ManualClock::new(1_000);
        let p = platform(clock.clone());
        let secret = p.register_app("a", false).await.unwrap().unwrap();
        let a = app(&p, "a", &secret).await;
        let code = p.value_code("a", "u", ValueKind::Email, "e@x".into()).await.unwrap();
        clock.advance_ms(300_000);
        assert_eq!(
            p.redeem_value(Surface::Exchange, &a, &code, ValueKind::Email, None).await,
            Err(ExchangeFailure::CodeExpired)
        );
    }

    #[tokio::test]
    async fn invalidation_takes_only_the_codes_of_that_app_user_and_kind() {
        let p = platform(ManualClock::new(1_000));
        let secret = p.register_app("a", false).await.unwrap().unwrap();
        let a = app(&p, "a", &secret).await;
        let phone = p.value_code("a", "u", ValueKind::PhoneNumber, "1".into()).await.unwrap();
        let email = p.value_code("a", "u", ValueKind::Email, "e".into()).await.unwrap();
        let other_user = p.value_code("a", "v", ValueKind::PhoneNumber, "2".into()).await.unwrap();
        let login = p.login_code("a", "u", None).await.unwrap();
        assert_eq!(p.invalidate_codes("a", "u", Some(ValueKind::PhoneNumber)).await, 1);
        let (x, h) = (Surface::Exchange, Surface::BackendHttp);
        let phone_kind = ValueKind::PhoneNumber;
        assert_eq!(p.redeem_value(x, &a, &phone, phone_kind, None).await, Err(ExchangeFailure::InvalidCode));
        assert_eq!(p.redeem_value(h, &a, &email, ValueKind::Email, None).await.as_deref(), Ok("e"));
        assert_eq!(p.redeem_value(x, &a, &other_user, phone_kind, None).await.as_deref(), Ok("2"));
        assert!(p.code2session(x, &a, &login).await.is_ok());
        // Issued and redeemed codes are on record with the redeeming surface, the invalidated one
        // unredeemed.
        let rows = p.store.ledger(Some("a"), Some("u"), 0).unwrap();
        let redeemed: Vec<_> = rows.iter().map(|r| (r.what.as_str(), r.redeemed_via.as_deref())).collect();
        assert_eq!(redeemed, [("phone_number", None), ("email", Some("backend_http")), ("openid", Some("exchange"))]);
    }

    #[tokio::test]
    async fn a_value_code_presented_for_another_user_stays_usable() {
        let p = platform(ManualClock::new(1_000));
        let secret = p.register_app("a", false).await.unwrap().unwrap();
        let a = app(&p, "a", &secret).await;
        let code = p.value_code("a", "u", ValueKind::PhoneNumber, "+86 1".into()).await.unwrap();
        let wrong = p.openid("a", "someone-else");
        let kind = ValueKind::PhoneNumber;
        assert_eq!(
            p.redeem_value(Surface::BackendHttp, &a, &code, kind, Some(&wrong)).await,
            Err(ExchangeFailure::InvalidCode)
        );
        let right = p.openid("a", "u");
        assert_eq!(p.redeem_value(Surface::BackendHttp, &a, &code, kind, Some(&right)).await.unwrap(), "+86 1");
    }

    #[tokio::test]
    async fn rotating_a_secret_revokes_its_access_tokens() {
        let p = platform(ManualClock::new(1_000));
        let secret = p.register_app("a", false).await.unwrap().unwrap();
        let token = p.access_token(&app(&p, "a", &secret).await, TokenRequest::Fresh).await.unwrap().token;
        assert!(p.authenticate(Surface::BackendHttp, Credential::AccessToken(&token)).await.is_ok());
        p.register_app("a", true).await.unwrap().unwrap();
        assert_eq!(
            p.authenticate(Surface::BackendHttp, Credential::AccessToken(&token)).await,
            Err(ExchangeFailure::InvalidCredential)
        );
    }

    #[test]
    fn the_session_signature_is_the_hex_hmac_of_the_empty_message() {
        // HMAC-SHA256 with key "key" over "" (a published test value).
        assert_eq!(session_signature("key"), "5d5d139563c95b5967b9bd9a8c9b233a9dedb45072794cd232dc1b74832607d0");
    }
}
