//! The platform embedded in the daemon: one-time codes in memory, sessions in the store, openid and
//! unionid as keyed hashes of the daemon secret.
//!
//! Codes are 144 random bits, single use, bound to (app, uid, purpose) and expire after
//! `sessions.code_ttl_secs` (5 minutes). They live in memory only: a daemon restart invalidates
//! outstanding codes (the mini app logs in again), while sessions, grants and secrets are durable.
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

use super::{ExchangeFailure, Platform, ValueKind};
use crate::{
    clock::Clock,
    config::AppConfig,
    error::ApiError,
    store::{SessionRow, Store},
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
}

impl std::fmt::Debug for EmbeddedPlatform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedPlatform").field("codes", &self.codes.len()).finish_non_exhaustive()
    }
}

type HmacSha256 = Hmac<Sha256>;

impl EmbeddedPlatform {
    pub fn new(
        store: Arc<Store>,
        clock: Arc<dyn Clock>,
        apps: BTreeMap<String, AppConfig>,
        code_ttl_secs: u64,
        session_ttl_secs: u64,
        max_codes_per_user: u32,
    ) -> Result<EmbeddedPlatform, crate::error::StoreError> {
        let secret = store.daemon_secret(crate::tokens::random_key)?;
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
        })
    }

    fn keyed(&self, label: &str, a: &str, b: &str) -> String {
        let mut mac = HmacSha256::new_from_slice(&self.secret).expect("HMAC takes any key length");
        for part in [label, a, b] {
            mac.update(part.as_bytes());
            mac.update(&[0]);
        }
        URL_SAFE_NO_PAD.encode(&mac.finalize().into_bytes()[..21])
    }

    fn issue(&self, app_id: &str, uid: &str, purpose: Purpose) -> String {
        let code = random_token(18);
        let entry = CodeEntry {
            app_id: app_id.to_owned(),
            uid: uid.to_owned(),
            purpose,
            expires_at_ms: self.clock.now_ms() + self.code_ttl_ms,
        };
        // The (app, uid) entry stays locked until the code is in: concurrent issues count right.
        let mut issued = self.issued.entry((app_id.to_owned(), uid.to_owned())).or_default();
        if issued.len() >= self.max_codes_per_user {
            issued.retain(|c| self.codes.contains_key(c));
        }
        while issued.len() >= self.max_codes_per_user {
            if let Some(oldest) = issued.pop_front() {
                self.codes.remove(&oldest);
            }
        }
        self.codes.insert(code.clone(), entry);
        issued.push_back(code.clone());
        code
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
    }

    /// Outstanding codes (status, tests).
    pub fn outstanding_codes(&self) -> usize {
        self.codes.len()
    }

    fn check_secret(&self, app_id: &str, secret: &str) -> Result<(), ExchangeFailure> {
        if app_id.is_empty() || secret.is_empty() {
            return Err(ExchangeFailure::Malformed("app_id and secret are required"));
        }
        let stored = self
            .store
            .app_secret_hash(app_id)
            .map_err(|e| ExchangeFailure::System(e.to_string()))?
            .ok_or(ExchangeFailure::InvalidAppId)?;
        if secrets_equal(&stored, &hash_secret(secret)) { Ok(()) } else { Err(ExchangeFailure::InvalidSecret) }
    }

    /// Takes a code out if it belongs to `app_id` and `accept` likes its purpose; a code that does
    /// not match stays where it is (a wrong guess changes nothing).
    fn redeem(
        &self,
        app_id: &str,
        code: &str,
        accept: impl Fn(&Purpose) -> bool,
    ) -> Result<CodeEntry, ExchangeFailure> {
        if code.is_empty() {
            return Err(ExchangeFailure::Malformed("code is required"));
        }
        let now = self.clock.now_ms();
        let taken =
            self.codes.remove_if(code, |_, e| e.app_id == app_id && accept(&e.purpose) && e.expires_at_ms > now);
        if let Some((code, entry)) = taken {
            self.spent.insert(code, entry.expires_at_ms);
            return Ok(entry);
        }
        if self.spent.contains_key(code) {
            return Err(ExchangeFailure::CodeUsed);
        }
        match self.codes.get(code) {
            Some(e) if e.app_id == app_id && accept(&e.purpose) && e.expires_at_ms <= now => {
                Err(ExchangeFailure::CodeExpired)
            }
            _ => Err(ExchangeFailure::InvalidCode),
        }
    }
}

#[tonic::async_trait]
impl Platform for EmbeddedPlatform {
    async fn login_code(&self, app_id: &str, uid: &str, auth_code: Option<String>) -> Result<String, ApiError> {
        let session_key = self.start_session(app_id, uid).await?;
        Ok(self.issue(app_id, uid, Purpose::Login { session_key, auth_code }))
    }

    async fn start_session(&self, app_id: &str, uid: &str) -> Result<String, ApiError> {
        let now = self.clock.now_ms();
        let session_key = random_token(16);
        self.store.upsert_session(&SessionRow {
            app_id: app_id.to_owned(),
            uid: uid.to_owned(),
            session_key: session_key.clone(),
            created_at_ms: now,
            expires_at_ms: now + self.session_ttl_ms,
        })?;
        Ok(session_key)
    }

    async fn check_session(&self, app_id: &str, uid: &str) -> Result<(), ApiError> {
        match self.store.session(app_id, uid)? {
            Some(s) if s.expires_at_ms > self.clock.now_ms() => Ok(()),
            _ => Err(ApiError::SessionExpired),
        }
    }

    async fn value_code(&self, app_id: &str, uid: &str, kind: ValueKind, value: String) -> Result<String, ApiError> {
        Ok(self.issue(app_id, uid, Purpose::Value { kind, value }))
    }

    async fn user_changed(&self, old_uid: &str) -> Result<(), ApiError> {
        self.store.delete_sessions_of(old_uid)?;
        self.codes.retain(|_, e| e.uid != old_uid);
        self.issued.retain(|(_, uid), _| uid != old_uid);
        Ok(())
    }

    async fn code2session(
        &self,
        app_id: &str,
        secret: &str,
        code: &str,
    ) -> Result<Code2SessionResponse, ExchangeFailure> {
        self.check_secret(app_id, secret)?;
        let entry = self.redeem(app_id, code, |p| matches!(p, Purpose::Login { .. }))?;
        let Purpose::Login { session_key, auth_code } = entry.purpose else {
            return Err(ExchangeFailure::InvalidCode);
        };
        let unionid = self
            .apps
            .get(app_id)
            .and_then(|a| a.union_group.as_deref())
            .map(|group| self.keyed("unionid", group, &entry.uid))
            .unwrap_or_default();
        Ok(Code2SessionResponse {
            openid: self.openid(app_id, &entry.uid),
            session_key,
            unionid,
            auth_code: auth_code.unwrap_or_default(),
        })
    }

    async fn redeem_value(
        &self,
        app_id: &str,
        secret: &str,
        code: &str,
        kind: ValueKind,
    ) -> Result<String, ExchangeFailure> {
        self.check_secret(app_id, secret)?;
        let entry = self.redeem(app_id, code, |p| matches!(p, Purpose::Value { kind: k, .. } if *k == kind))?;
        match entry.purpose {
            Purpose::Value { value, .. } => Ok(value),
            Purpose::Login { .. } => Err(ExchangeFailure::InvalidCode),
        }
    }

    fn openid(&self, app_id: &str, uid: &str) -> String {
        format!("o{}", self.keyed("openid", app_id, uid))
    }

    async fn register_app(&self, app_id: &str, rotate: bool) -> Result<Option<String>, ApiError> {
        let secret = random_token(24);
        let written = self.store.set_app_secret_hash(app_id, &hash_secret(&secret), rotate)?;
        Ok(written.then_some(secret))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    fn platform(clock: Arc<ManualClock>) -> EmbeddedPlatform {
        let store = Arc::new(Store::open(None, false).unwrap());
        EmbeddedPlatform::new(store, clock, BTreeMap::new(), 300, 3600, 100).unwrap()
    }

    #[tokio::test]
    async fn a_wrong_app_guess_leaves_the_code_usable() {
        let p = platform(ManualClock::new(1_000));
        let secret = p.register_app("a", false).await.unwrap().unwrap();
        let other = p.register_app("b", false).await.unwrap().unwrap();
        let code = p.login_code("a", "u", None).await.unwrap();
        assert_eq!(p.code2session("b", &other, &code).await, Err(ExchangeFailure::InvalidCode));
        assert!(p.code2session("a", &secret, &code).await.is_ok());
        assert_eq!(p.code2session("a", &secret, &code).await, Err(ExchangeFailure::CodeUsed));
    }

    #[tokio::test]
    async fn codes_expire_after_their_ttl() {
        let clock = ManualClock::new(1_000);
        let p = platform(clock.clone());
        let secret = p.register_app("a", false).await.unwrap().unwrap();
        let code = p.value_code("a", "u", ValueKind::Email, "e@x".into()).await.unwrap();
        clock.advance_ms(300_000);
        assert_eq!(p.redeem_value("a", &secret, &code, ValueKind::Email).await, Err(ExchangeFailure::CodeExpired));
    }
}
