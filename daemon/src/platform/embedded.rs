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

use std::{collections::BTreeMap, sync::Arc};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use dashmap::DashMap;
use hmac::{Hmac, Mac};
use miniapp_broker_proto::v1::Code2SessionResponse;
use sha2::Sha256;

use super::{Disclosed, ExchangeFailure, Platform, Surface, ValueKind};
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

    fn issue(&self, app_id: &str, uid: &str, purpose: Purpose) -> Result<String, ApiError> {
        let now = self.clock.now_ms();
        let (api, disclosed): (&str, &[Disclosed]) = match &purpose {
            Purpose::Login { .. } if self.union_group(app_id).is_some() => {
                ("login", &[Disclosed::Openid, Disclosed::Unionid])
            }
            Purpose::Login { .. } => ("login", &[Disclosed::Openid]),
            Purpose::Value { kind: ValueKind::PhoneNumber, .. } => ("getPhoneNumber", &[Disclosed::PhoneNumber]),
            Purpose::Value { kind: ValueKind::Email, .. } => ("getEmail", &[Disclosed::Email]),
        };
        let ledger = disclosed
            .iter()
            .map(|d| self.store.ledger_add(app_id, uid, d.as_str(), Surface::RendererApi.as_str(), api, now, true))
            .collect::<Result<Vec<_>, _>>()?;
        let code = random_token(18);
        let entry = CodeEntry {
            app_id: app_id.to_owned(),
            uid: uid.to_owned(),
            purpose,
            expires_at_ms: now + self.code_ttl_ms,
            ledger,
        };
        self.codes.insert(code.clone(), entry);
        Ok(code)
    }

    fn union_group(&self, app_id: &str) -> Option<&str> {
        self.apps.get(app_id).and_then(|a| a.union_group.as_deref())
    }

    /// Drops expired codes and tombstones; called periodically.
    pub fn sweep(&self) {
        let now = self.clock.now_ms();
        self.codes.retain(|_, e| e.expires_at_ms > now);
        self.spent.retain(|_, expires| *expires > now);
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
        surface: Surface,
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
        self.issue(app_id, uid, Purpose::Login { session_key, auth_code })
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
        self.issue(app_id, uid, Purpose::Value { kind, value })
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
        Ok(())
    }

    async fn code2session(
        &self,
        app_id: &str,
        secret: &str,
        code: &str,
        surface: Surface,
    ) -> Result<Code2SessionResponse, ExchangeFailure> {
        self.check_secret(app_id, secret)?;
        let entry = self.redeem(app_id, code, surface, |p| matches!(p, Purpose::Login { .. }))?;
        let Purpose::Login { session_key, auth_code } = entry.purpose else {
            return Err(ExchangeFailure::InvalidCode);
        };
        let unionid =
            self.union_group(app_id).map(|group| self.keyed("unionid", group, &entry.uid)).unwrap_or_default();
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
        surface: Surface,
    ) -> Result<String, ExchangeFailure> {
        self.check_secret(app_id, secret)?;
        let entry =
            self.redeem(app_id, code, surface, |p| matches!(p, Purpose::Value { kind: k, .. } if *k == kind))?;
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
        EmbeddedPlatform::new(store, clock, BTreeMap::new(), 300, 3600).unwrap()
    }

    #[tokio::test]
    async fn a_wrong_app_guess_leaves_the_code_usable() {
        let p = platform(ManualClock::new(1_000));
        let secret = p.register_app("a", false).await.unwrap().unwrap();
        let other = p.register_app("b", false).await.unwrap().unwrap();
        let code = p.login_code("a", "u", None).await.unwrap();
        let x = Surface::Exchange;
        assert_eq!(p.code2session("b", &other, &code, x).await, Err(ExchangeFailure::InvalidCode));
        assert!(p.code2session("a", &secret, &code, x).await.is_ok());
        assert_eq!(p.code2session("a", &secret, &code, x).await, Err(ExchangeFailure::CodeUsed));
    }

    #[tokio::test]
    async fn codes_expire_after_their_ttl() {
        let clock = ManualClock::new(1_000);
        let p = platform(clock.clone());
        let secret = p.register_app("a", false).await.unwrap().unwrap();
        let code = p.value_code("a", "u", ValueKind::Email, "e@x".into()).await.unwrap();
        clock.advance_ms(300_000);
        let x = Surface::Exchange;
        assert_eq!(p.redeem_value("a", &secret, &code, ValueKind::Email, x).await, Err(ExchangeFailure::CodeExpired));
    }

    #[tokio::test]
    async fn invalidation_takes_only_the_codes_of_that_app_user_and_kind() {
        let p = platform(ManualClock::new(1_000));
        let secret = p.register_app("a", false).await.unwrap().unwrap();
        let phone = p.value_code("a", "u", ValueKind::PhoneNumber, "1".into()).await.unwrap();
        let email = p.value_code("a", "u", ValueKind::Email, "e".into()).await.unwrap();
        let other_user = p.value_code("a", "v", ValueKind::PhoneNumber, "2".into()).await.unwrap();
        let login = p.login_code("a", "u", None).await.unwrap();
        assert_eq!(p.invalidate_codes("a", "u", Some(ValueKind::PhoneNumber)).await, 1);
        let x = Surface::Exchange;
        assert_eq!(
            p.redeem_value("a", &secret, &phone, ValueKind::PhoneNumber, x).await,
            Err(ExchangeFailure::InvalidCode)
        );
        assert_eq!(p.redeem_value("a", &secret, &email, ValueKind::Email, x).await.as_deref(), Ok("e"));
        assert_eq!(p.redeem_value("a", &secret, &other_user, ValueKind::PhoneNumber, x).await.as_deref(), Ok("2"));
        assert!(p.code2session("a", &secret, &login, x).await.is_ok());
        // Issued and redeemed codes are on record, the invalidated one unredeemed.
        let rows = p.store.ledger(Some("a"), Some("u"), 0).unwrap();
        let redeemed: Vec<_> = rows.iter().map(|r| (r.what.as_str(), r.redeemed_via.as_deref())).collect();
        assert_eq!(redeemed, [("phone_number", None), ("email", Some("exchange")), ("openid", Some("exchange"))]);
    }
}
