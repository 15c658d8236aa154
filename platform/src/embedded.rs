//! The platform's logic over a [`PlatformStore`]: codes and sessions in the store, openid and
//! unionid as keyed hashes of the platform's secret (the daemon secret, when embedded).
//!
//! Codes are 144 random bits, single use, bound to (app, uid, purpose) and expire after
//! `code_ttl_secs` (5 minutes). The embedded engine keeps them in memory only: a daemon restart
//! invalidates outstanding codes (the mini app logs in again), while sessions and secrets are
//! durable.
//!
//! Every code is a disclosure: issuing one writes its ledger rows (what it stands for, to which app
//! and user) through the [`Disclosures`] hook, and redeeming it stamps them with when and through
//! which surface, whichever surface redeems it. A code whose rows cannot be written is not issued.
//!
//! App backends (the gRPC `Exchange` service and the backend HTTP API alike) authenticate here,
//! with the app's secret or an access token ([`crate::access_tokens`]), and every attempt is taken
//! from the app's exchange bucket (`exchanges_per_minute_per_app`).
//! At most `max_codes_per_user` codes of one (app, uid) are outstanding: issuing one more
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

use tracing::{debug, info};

use crate::{
    AccessToken, AuthorizedApp, Credential, Disclosed, ExchangeFailure, Platform, PlatformError, SessionInfo, Surface,
    TokenRequest, ValueKind,
    clock::Clock,
    config::{AppSettings, EmbeddedConfig},
    disclosures::{CodeDisclosure, Disclosures},
    store::{CodeRecord, PlatformStore, Purpose, Quota, Redemption, SessionRow, TokenCheck, Wanted},
    superapp::{
        Directory, SuperappClient,
        vouch::{self, Held, ProfileField},
    },
    tokens::{hash_secret, random_key, random_token, secrets_equal},
    user_data::{self, Identity, SessionKey, UserCredentials},
};

/// The platform: its rules over a store. See the module docs.
pub struct EmbeddedPlatform {
    store: Arc<dyn PlatformStore>,
    ledger: Arc<dyn Disclosures>,
    clock: Arc<dyn Clock>,
    secret: [u8; 32],
    apps: BTreeMap<String, AppSettings>,
    max_codes_per_user: usize,
    code_ttl_ms: u64,
    session_ttl_ms: u64,
    /// A login keeps the session's key while the key is younger than this (`key_refresh_secs`).
    key_refresh_ms: u64,
    /// The checksession signatures of keys a later login (or a reset) replaced, per (app, openid),
    /// newest last, each until the replaced session would have expired: only so that a backend
    /// presenting one is told at debug why it failed. At most [`REPLACED_KEPT`] per session; swept.
    replaced: DashMap<(String, String), VecDeque<(String, u64)>>,
    /// App backends' attempts that proved the app, per app, over both surfaces.
    exchange_quota: Quota,
    /// The superapp server that vouches for an app's users, if any ([`crate::superapp::vouch`]).
    superapp: SuperappOf,
    /// The authCodes sent to the superapp server, so each is redeemed once.
    spent_auth_codes: vouch::SpentAuthCodes,
    /// Wrong secrets, all apps and unknown app ids together.
    failed_quota: Quota,
}

/// The failure bucket's key: every wrong secret, whichever app id it names, draws on it. Not an app
/// id (app ids have no NUL), so no app's own bucket is it.
const FAILED_ATTEMPTS: &str = "\0failed-secrets";

/// What a presented secret is compared with when its app id is not registered (no secret hashes to
/// it): the same work as for a registered app, so the time does not tell either.
const UNKNOWN_APP_HASH: [u8; 32] = [0; 32];

/// Which superapp server vouches for the users of an app ([`Directory`]): one for every app in the
/// daemon's embedded platform, the app's tenant's in the platform service, none by default.
pub type SuperappOf = Arc<dyn Directory>;

/// The most a login's renewal may leave a session's stored expiry short of a full lifetime from
/// now without writing it again: repeated logins of one user in a short time (a mini app calls
/// wx.login at each launch) renew the session once, not once each. The slack is a thousandth of
/// the session's lifetime, at most this.
pub const MAX_RENEWAL_SLACK_MS: u64 = 60_000;

/// The renewal slack of sessions that live `session_ttl_ms` (see [`MAX_RENEWAL_SLACK_MS`]): a
/// session's stored expiry is at most this short of its last login's plus the lifetime.
pub fn renewal_slack_ms(session_ttl_ms: u64) -> u64 {
    (session_ttl_ms / 1000).min(MAX_RENEWAL_SLACK_MS)
}

/// The session a login leaves: a row to write (fresh, a new key, or an expiry moved), or the
/// stored one, whose expiry is within the slack of a renewal's.
#[derive(Debug)]
enum Renewal {
    Write(SessionRow),
    Unchanged(SessionRow),
}

impl Renewal {
    fn row(&self) -> &SessionRow {
        match self {
            Renewal::Write(row) | Renewal::Unchanged(row) => row,
        }
    }
}

/// How many replaced keys of one session are remembered for the stale-key diagnostic.
const REPLACED_KEPT: usize = 4;

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
        f.debug_struct("EmbeddedPlatform").field("store", &self.store).finish_non_exhaustive()
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
    /// The platform over `store`, writing its codes' ledger rows through `ledger`. Provisions the
    /// secrets of `config`'s apps that carry one, and stores the openid of sessions from before
    /// sessions kept it.
    pub async fn new(
        store: Arc<dyn PlatformStore>,
        ledger: Arc<dyn Disclosures>,
        clock: Arc<dyn Clock>,
        config: EmbeddedConfig,
    ) -> Result<EmbeddedPlatform, PlatformError> {
        let secret = store.openid_secret(random_key()).await?;
        // Sessions a daemon from before sessions kept their openid stored: find them by it too.
        let filled = store.fill_session_openids(&move |app_id, uid| openid_of(&secret, app_id, uid)).await?;
        if filled > 0 {
            info!(sessions = filled, "stored the openid of sessions from an earlier version");
        }
        for (app_id, app) in &config.apps {
            if let Some(secret) = &app.secret {
                store.set_app_secret_hash(app_id, &hash_secret(secret), true).await?;
            }
        }
        Ok(EmbeddedPlatform {
            store,
            ledger,
            clock,
            secret,
            apps: config.apps,
            max_codes_per_user: config.max_codes_per_user.max(1) as usize,
            code_ttl_ms: config.code_ttl_secs * 1000,
            session_ttl_ms: config.session_ttl_secs * 1000,
            key_refresh_ms: config.key_refresh_secs.saturating_mul(1000),
            replaced: DashMap::new(),
            exchange_quota: Quota {
                per_minute: config.exchanges_per_minute_per_app,
                burst: config.exchange_burst_per_app,
            },
            superapp: Arc::new(|_: &str| None),
            spent_auth_codes: Default::default(),
            failed_quota: Quota { per_minute: config.failed_exchanges_per_minute, burst: config.failed_exchange_burst },
        })
    }

    /// This platform with `server` vouching for the users of every app (`[superapp] server_url`
    /// in the daemon).
    pub fn with_superapp(self, server: Option<Arc<SuperappClient>>) -> EmbeddedPlatform {
        match server {
            Some(server) => self.with_superapps(Arc::new(move |_: &str| Some(server.clone()))),
            None => self,
        }
    }

    /// This platform with `of` naming the server that vouches for each app's users (in the
    /// platform service: the server URL stored with the app's tenant).
    pub fn with_superapps(mut self, of: SuperappOf) -> EmbeddedPlatform {
        self.superapp = of;
        self
    }

    fn keyed(&self, label: &str, a: &str, b: &str) -> String {
        keyed(&self.secret, label, a, b)
    }

    /// Issues a code for `purpose`; a login code's `session` is written with the code (unless
    /// it is a [`Renewal::Unchanged`] one), after its ledger rows (a code is never out without
    /// them; rows of a code the store refused go again).
    async fn issue(
        &self,
        app_id: &str,
        uid: &str,
        purpose: Purpose,
        session: Option<&Renewal>,
    ) -> Result<String, PlatformError> {
        let (session, write) = match session {
            Some(Renewal::Write(row)) => (Some(row), Some(row)),
            Some(Renewal::Unchanged(row)) => (Some(row), None),
            None => (None, None),
        };
        let now = self.clock.now_ms();
        let (api, disclosed): (&str, &[Disclosed]) = match &purpose {
            Purpose::Login { .. } if self.union_group(app_id).is_some() => {
                ("login", &[Disclosed::Openid, Disclosed::Unionid])
            }
            Purpose::Login { .. } => ("login", &[Disclosed::Openid]),
            Purpose::Value { kind: ValueKind::PhoneNumber, .. } => ("getPhoneNumber", &[Disclosed::PhoneNumber]),
            Purpose::Value { kind: ValueKind::Email, .. } => ("getEmail", &[Disclosed::Email]),
        };
        let rows: Vec<CodeDisclosure<'_>> =
            disclosed.iter().map(|d| CodeDisclosure { app_id, uid, what: d.as_str(), api, at_ms: now }).collect();
        let ledger = self.ledger.issued(&rows).map_err(PlatformError::Ledger)?;
        let code = random_token(18);
        let record = CodeRecord {
            app_id: app_id.to_owned(),
            uid: uid.to_owned(),
            // A login's session carries the openid of (app, uid) already: no second HMAC.
            openid: match session {
                Some(s) if !s.openid.is_empty() => s.openid.clone(),
                _ => self.openid(app_id, uid),
            },
            purpose,
            expires_at_ms: now + self.code_ttl_ms,
            ledger: ledger.clone(),
        };
        if let Err(e) = self.store.issue_code(&code, record, write, self.max_codes_per_user).await {
            self.ledger.withdrawn(&ledger);
            return Err(e.into());
        }
        Ok(code)
    }

    /// The session a login of (app, uid) leaves, not yet stored: the live session renewed, with
    /// its key when the key is a WeChat key younger than `key_refresh_ms` (as WeChat, repeated
    /// logins in a short time keep one key), else with a fresh key (`created_at_ms` is the key's
    /// birth). A replaced key's signature is remembered for the stale-key diagnostic.
    async fn session_for_login(&self, app_id: &str, uid: &str) -> Result<Renewal, PlatformError> {
        let now = self.clock.now_ms();
        let expires_at_ms = now + self.session_ttl_ms;
        if let Some(live) = self.live_session(app_id, uid).await? {
            let young = now.saturating_sub(live.created_at_ms) < self.key_refresh_ms;
            if young && SessionKey::parse(&live.session_key).is_some() {
                // A renewal that would move the expiry by less than the slack is not written.
                let slack = renewal_slack_ms(self.session_ttl_ms);
                if live.expires_at_ms + slack >= expires_at_ms {
                    return Ok(Renewal::Unchanged(live));
                }
                return Ok(Renewal::Write(SessionRow { expires_at_ms, ..live }));
            }
            self.remember_replaced(&live);
        }
        Ok(Renewal::Write(self.fresh_session(app_id, uid, now, expires_at_ms)))
    }

    fn fresh_session(&self, app_id: &str, uid: &str, now: u64, expires_at_ms: u64) -> SessionRow {
        SessionRow {
            app_id: app_id.to_owned(),
            uid: uid.to_owned(),
            openid: self.openid(app_id, uid),
            session_key: SessionKey::random(&mut rand::rng()).encode(),
            created_at_ms: now,
            expires_at_ms,
        }
    }

    /// Remembers that `old`'s key is being replaced (see `replaced`).
    fn remember_replaced(&self, old: &SessionRow) {
        let key = (old.app_id.clone(), old.openid.clone());
        let mut kept = self.replaced.entry(key).or_default();
        if kept.len() >= REPLACED_KEPT {
            kept.pop_front();
        }
        kept.push_back((session_signature(&old.session_key), old.expires_at_ms));
    }

    /// Whether `signature` is that of a key of (app, openid)'s session that was replaced.
    fn was_replaced(&self, app_id: &str, openid: &str, signature: &str) -> bool {
        let now = self.clock.now_ms();
        self.replaced.get(&(app_id.to_owned(), openid.to_owned())).is_some_and(|kept| {
            kept.iter().any(|(old, until)| *until > now && secrets_equal(old.as_bytes(), signature.as_bytes()))
        })
    }

    /// The live session of (app, uid), if any.
    async fn live_session(&self, app_id: &str, uid: &str) -> Result<Option<SessionRow>, crate::StoreError> {
        let now = self.clock.now_ms();
        Ok(self.store.session(app_id, uid).await?.filter(|s| s.expires_at_ms > now))
    }

    fn union_group(&self, app_id: &str) -> Option<&str> {
        self.apps.get(app_id).and_then(|a| a.union_group.as_deref())
    }

    /// Outstanding codes (status, tests).
    pub async fn outstanding_codes(&self) -> Result<usize, PlatformError> {
        Ok(self.store.outstanding_codes().await?)
    }

    /// Who the credential proves the caller to be, and whether the app id it names is a registered
    /// app (for the log only: the answer never tells).
    ///
    /// Only a credential that checks out draws on the app's exchange bucket, so no one without the
    /// secret (or a token) spends the budget of the app's real backend. A wrong secret, for a
    /// registered app or an unknown one alike, draws on the one failure bucket of the platform
    /// ([`FAILED_ATTEMPTS`]) and hears the same answer either way (40125; past the failure bucket
    /// 45011), after the same work (a presented secret is hashed and compared even for an unknown
    /// app). The secret is checked whatever the failure bucket holds: a flood of wrong secrets
    /// cannot lock the right one out.
    async fn authenticate_now(&self, credential: Credential<'_>) -> (Result<AuthorizedApp, ExchangeFailure>, bool) {
        match credential {
            Credential::Secret { app_id, secret } => {
                if app_id.is_empty() {
                    return (Err(ExchangeFailure::Malformed(41002, "app id is required")), false);
                }
                if secret.is_empty() {
                    return (Err(ExchangeFailure::Malformed(41004, "secret is required")), false);
                }
                let stored = match self.store.app_secret_hash(app_id).await {
                    Ok(stored) => stored,
                    Err(e) => return (Err(system(e)), false),
                };
                let known = stored.is_some();
                let presented = hash_secret(secret);
                let expected = stored.unwrap_or_else(|| UNKNOWN_APP_HASH.to_vec());
                if known && secrets_equal(&expected, &presented) {
                    return (
                        self.take_attempt(app_id, self.exchange_quota).await.map(|()| AuthorizedApp::new(app_id)),
                        true,
                    );
                }
                let outcome = match self.take_attempt(FAILED_ATTEMPTS, self.failed_quota).await {
                    Ok(()) => Err(ExchangeFailure::InvalidSecret),
                    Err(e) => Err(e),
                };
                (outcome, known)
            }
            Credential::AccessToken(token) => {
                if token.is_empty() {
                    return (Err(ExchangeFailure::InvalidCredential), false);
                }
                let found = match self.store.verify_token(token, self.clock.now_ms()).await {
                    Ok(found) => found,
                    Err(e) => return (Err(system(e)), false),
                };
                let app_id = match found {
                    TokenCheck::Valid(app_id) => app_id,
                    TokenCheck::Expired => return (Err(ExchangeFailure::TokenExpired), false),
                    TokenCheck::Unknown => return (Err(ExchangeFailure::InvalidCredential), false),
                };
                let outcome =
                    self.take_attempt(&app_id, self.exchange_quota).await.map(|()| AuthorizedApp::new(&app_id));
                (outcome, false)
            }
        }
    }

    async fn take_attempt(&self, key: &str, quota: Quota) -> Result<(), ExchangeFailure> {
        let now = self.clock.now_ms();
        match self.store.take_attempt(key, quota, now).await.map_err(system)? {
            true => Ok(()),
            false => Err(ExchangeFailure::RateLimited),
        }
    }

    /// The one point every redemption passes, whichever surface it came through: the disclosure
    /// ledger records `what` went to `app` through `surface` here (never the value).
    fn redeemed(&self, surface: Surface, app: &AuthorizedApp, _uid: &str, what: Redeemed) {
        debug!(app_id = app.app_id(), surface = surface.as_str(), redeemed = what.as_str(), "code exchanged");
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

    /// Takes a code out if it belongs to `app_id` and `wanted` takes it; a code that does not
    /// match stays where it is (a wrong guess changes nothing). A redeemed code's ledger rows are
    /// stamped with `surface` before its value may leave.
    async fn redeem(
        &self,
        app_id: &str,
        code: &str,
        surface: Surface,
        wanted: Wanted<'_>,
    ) -> Result<CodeRecord, ExchangeFailure> {
        let record = self.take(app_id, code, wanted).await?;
        self.stamp(&record, surface)?;
        Ok(record)
    }

    /// [`Self::redeem`] without the ledger's stamp: the code is spent, its disclosure not yet
    /// on record (a value fetched from the superapp server is stamped once it is in hand).
    async fn take(&self, app_id: &str, code: &str, wanted: Wanted<'_>) -> Result<CodeRecord, ExchangeFailure> {
        if code.is_empty() {
            return Err(ExchangeFailure::Malformed(41008, "code is required"));
        }
        let now = self.clock.now_ms();
        match self.store.redeem_code(app_id, code, wanted, now).await.map_err(system)? {
            Redemption::Redeemed(record) => Ok(record),
            Redemption::Used => Err(ExchangeFailure::CodeUsed),
            Redemption::Expired => Err(ExchangeFailure::CodeExpired),
            Redemption::Invalid => Err(ExchangeFailure::InvalidCode),
        }
    }

    /// The value leaves only once its disclosure is on record.
    fn stamp(&self, record: &CodeRecord, surface: Surface) -> Result<(), ExchangeFailure> {
        self.ledger
            .redeemed(&record.ledger, surface, self.clock.now_ms())
            .map_err(|e| ExchangeFailure::System(e.to_string()))
    }
}

impl EmbeddedPlatform {
    async fn check_signature_now(
        &self,
        app: &AuthorizedApp,
        openid: &str,
        signature: &str,
    ) -> Result<(), ExchangeFailure> {
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
            .await
            .map_err(system)?
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

impl EmbeddedPlatform {
    /// checksession's answer, with the stale-key diagnostic: a signature of a key a later login
    /// replaced is said so at debug, for the app and openid (never the key).
    async fn check_signature_diagnosed(
        &self,
        app: &AuthorizedApp,
        openid: &str,
        signature: &str,
    ) -> Result<(), ExchangeFailure> {
        let outcome = self.check_signature_now(app, openid, signature).await;
        if outcome == Err(ExchangeFailure::InvalidSignature)
            && self.was_replaced(app.app_id(), openid, &signature.to_ascii_lowercase())
        {
            debug!(
                app_id = app.app_id(),
                openid,
                "checksession: the signature is of a session key that a later login replaced; \
                 redeem the latest login code for the current key"
            );
        }
        outcome
    }
}

/// A store failure as a backend hears it: -1, system busy when the database is unreachable or
/// slow (the backend retries later), -1 system error otherwise.
fn system(e: crate::StoreError) -> ExchangeFailure {
    match e {
        crate::StoreError::Unavailable(_) => ExchangeFailure::Busy,
        e => ExchangeFailure::System(e.to_string()),
    }
}

/// checksession's signature of a session: hex(hmac_sha256(key = session_key, message = "")).
pub fn session_signature(session_key: &str) -> String {
    let mac = HmacSha256::new_from_slice(session_key.as_bytes()).expect("HMAC takes any key length");
    hex::encode(mac.finalize().into_bytes())
}

#[async_trait::async_trait]
impl Platform for EmbeddedPlatform {
    async fn login_code(&self, app_id: &str, uid: &str, auth_code: Option<String>) -> Result<String, PlatformError> {
        // A vouched authCode is spent at the superapp server before anything is started or issued:
        // the backend gets the openid of the server's userId, not the authCode.
        let auth_code = match self.superapp.server_for(app_id).await? {
            Some(server) => {
                let now = self.clock.now_ms();
                vouch::login(&server, &self.spent_auth_codes, now, uid, auth_code.as_deref()).await?;
                None
            }
            None => auth_code,
        };
        // The session and the code are one write: both or neither.
        let session = self.session_for_login(app_id, uid).await?;
        self.issue(app_id, uid, Purpose::Login { auth_code }, Some(&session)).await
    }

    async fn start_session(&self, app_id: &str, uid: &str) -> Result<String, PlatformError> {
        if let Some(server) = self.superapp.server_for(app_id).await? {
            vouch::check_user(&server, uid).await?;
        }
        let session = self.session_for_login(app_id, uid).await?;
        if let Renewal::Write(row) = &session {
            self.store.start_session(row).await?;
        }
        Ok(session.row().session_key.clone())
    }

    async fn check_session(&self, app_id: &str, uid: &str) -> Result<(), PlatformError> {
        match self.store.session(app_id, uid).await? {
            Some(s) if s.expires_at_ms > self.clock.now_ms() => Ok(()),
            _ => Err(PlatformError::SessionExpired),
        }
    }

    async fn value_code(
        &self,
        app_id: &str,
        uid: &str,
        kind: ValueKind,
        value: String,
    ) -> Result<String, PlatformError> {
        self.issue(app_id, uid, Purpose::Value { kind, value }, None).await
    }

    async fn vouches(&self, app_id: &str) -> Result<bool, PlatformError> {
        Ok(self.superapp.server_for(app_id).await?.is_some())
    }

    async fn vouched_value_code(&self, app_id: &str, uid: &str, kind: ValueKind) -> Result<String, PlatformError> {
        let Some(server) = self.superapp.server_for(app_id).await? else {
            return Err(PlatformError::Superapp("no superapp server is configured".into()));
        };
        let temporary = vouch::temporary_code(&server, uid, kind).await?;
        self.issue(app_id, uid, Purpose::Value { kind, value: temporary }, None).await
    }

    async fn vouched_profile(&self, app_id: &str, uid: &str, field: ProfileField) -> Result<String, PlatformError> {
        match self.superapp.server_for(app_id).await? {
            Some(server) => vouch::profile(&server, uid, field).await,
            None => Err(PlatformError::Superapp("no superapp server is configured".into())),
        }
    }

    async fn invalidate_codes(&self, app_id: &str, uid: &str, kind: Option<ValueKind>) -> usize {
        match self.store.invalidate_codes(app_id, uid, kind).await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(app_id, error = %e, "could not invalidate codes");
                0
            }
        }
    }

    async fn user_changed(&self, old_uid: &str) -> Result<(), PlatformError> {
        self.store.user_changed(old_uid).await?;
        Ok(())
    }

    async fn authenticate(
        &self,
        surface: Surface,
        credential: Credential<'_>,
    ) -> Result<AuthorizedApp, ExchangeFailure> {
        let (outcome, known) = self.authenticate_now(credential).await;
        if let Err(e) = &outcome {
            // The app id is named only when it is a registered app.
            let known = match credential {
                Credential::Secret { app_id, .. } if known => Some(AuthorizedApp::new(app_id)),
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
        let entry = match self.redeem(app.app_id(), code, surface, Wanted::Login).await {
            Ok(entry) => entry,
            Err(e) => {
                self.refused(surface, Some(app), "code2Session", &e);
                return Err(e);
            }
        };
        let Purpose::Login { auth_code } = entry.purpose else {
            return Err(ExchangeFailure::InvalidCode);
        };
        // The session's key now, whichever of its codes this is: a later login may have replaced
        // the key this code's login made.
        let session =
            self.live_session(app.app_id(), &entry.uid).await.map_err(system)?.ok_or(ExchangeFailure::CodeExpired)?;
        self.redeemed(surface, app, &entry.uid, Redeemed::Login);
        let unionid = self
            .apps
            .get(app.app_id())
            .and_then(|a| a.union_group.as_deref())
            .map(|group| self.keyed("unionid", group, &entry.uid))
            .unwrap_or_default();
        Ok(Code2SessionResponse {
            openid: self.openid(app.app_id(), &entry.uid),
            session_key: session.session_key,
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
        let exchange = if kind == ValueKind::PhoneNumber { "getPhoneNumber" } else { "getEmail" };
        let outcome = async {
            let entry = self.take(app.app_id(), code, Wanted::Value { kind, openid }).await?;
            let Purpose::Value { value, .. } = &entry.purpose else { return Err(ExchangeFailure::InvalidCode) };
            // A code standing for the superapp server's temporary code: the value is fetched now,
            // never stored, and the disclosure stamped only once it is in hand. A failing server
            // leaves the code spent (codes are redeemed once) and the ledger unstamped.
            let value = match Held::decode(value) {
                Held::Value(value) => value.to_owned(),
                Held::TemporaryCode(temporary) => match self.superapp.server_for(app.app_id()).await.map_err(system)? {
                    Some(server) => vouch::value(&server, &entry.uid, kind, temporary).await?,
                    None => {
                        return Err(ExchangeFailure::System(
                            "no superapp server is configured to redeem this code".into(),
                        ));
                    }
                },
            };
            self.stamp(&entry, surface)?;
            Ok((entry.uid, value))
        }
        .await;
        match outcome {
            Ok((uid, value)) => {
                self.redeemed(surface, app, &uid, Redeemed::Value(kind));
                Ok(value)
            }
            Err(e) => {
                self.refused(surface, Some(app), exchange, &e);
                Err(e)
            }
        }
    }

    async fn access_token(&self, app: &AuthorizedApp, request: TokenRequest) -> Result<AccessToken, ExchangeFailure> {
        let token = self.store.issue_token(app.app_id(), request, self.clock.now_ms()).await.map_err(system)?;
        debug!(app_id = app.app_id(), stable = request != TokenRequest::Fresh, "access token issued");
        Ok(token)
    }

    async fn check_session_signature(
        &self,
        app: &AuthorizedApp,
        openid: &str,
        signature: &str,
    ) -> Result<(), ExchangeFailure> {
        let outcome = self.check_signature_diagnosed(app, openid, signature).await;
        if let Err(e) = &outcome {
            self.refused(Surface::BackendHttp, Some(app), "checkSession", e);
        }
        outcome
    }

    async fn reset_session_key(
        &self,
        app: &AuthorizedApp,
        openid: &str,
        signature: &str,
    ) -> Result<String, ExchangeFailure> {
        let outcome = self.check_signature_diagnosed(app, openid, signature).await;
        if let Err(e) = &outcome {
            self.refused(Surface::BackendHttp, Some(app), "resetUserSessionKey", e);
            return Err(e.clone());
        }
        let old = self.store.session_by_openid(app.app_id(), openid).await.map_err(system)?;
        let old = old.ok_or(ExchangeFailure::InvalidSignature)?;
        self.remember_replaced(&old);
        // A new key for the same session: its lifetime is unchanged.
        let session = self.fresh_session(&old.app_id, &old.uid, self.clock.now_ms(), old.expires_at_ms);
        self.store.start_session(&session).await.map_err(system)?;
        info!(app_id = app.app_id(), "session key reset by the app's backend");
        Ok(session.session_key)
    }

    async fn user_credentials(
        &self,
        app_id: &str,
        uid: &str,
        user_info_json: &str,
    ) -> Result<Option<UserCredentials>, PlatformError> {
        let Some(session) = self.live_session(app_id, uid).await? else {
            return Ok(None);
        };
        // A key stored by an earlier version is not a WeChat key: the next login replaces it.
        let Some(key) = SessionKey::parse(&session.session_key) else {
            debug!(app_id, "no user credentials: the session's key predates WeChat-form keys; log in again");
            return Ok(None);
        };
        let unionid = self.union_group(app_id).map(|group| self.keyed("unionid", group, uid));
        let who = Identity { app_id, openid: &session.openid, unionid: unionid.as_deref() };
        let now_secs = self.clock.now_ms() / 1000;
        user_data::make(user_info_json, &key, who, now_secs, &mut rand::rng())
            .map(Some)
            .map_err(|e| PlatformError::UserData(e.to_string()))
    }

    fn openid(&self, app_id: &str, uid: &str) -> String {
        openid_of(&self.secret, app_id, uid)
    }

    async fn register_app(&self, app_id: &str, rotate: bool) -> Result<Option<String>, PlatformError> {
        let secret = random_token(24);
        let written = self.store.set_app_secret_hash(app_id, &hash_secret(&secret), rotate).await?;
        if written {
            // The old secret's access tokens stop working with it.
            self.store.revoke_tokens(app_id).await?;
        }
        Ok(written.then_some(secret))
    }

    async fn list_sessions(
        &self,
        app_id: Option<&str>,
        after: Option<(&str, &str)>,
        limit: u32,
    ) -> Result<Vec<SessionInfo>, PlatformError> {
        let rows = self.store.list_sessions(app_id, after, limit).await?;
        Ok(rows
            .into_iter()
            .map(|s| SessionInfo {
                // Stored with the session (the openid of (app, uid)): no HMAC per row.
                openid: s.openid,
                app_id: s.app_id,
                uid: s.uid,
                created_at_ms: s.created_at_ms,
                expires_at_ms: s.expires_at_ms,
            })
            .collect())
    }

    /// Drops expired codes, tombstones, access tokens and full rate buckets.
    async fn sweep(&self) {
        let now = self.clock.now_ms();
        if let Err(e) = self.store.sweep(now).await {
            tracing::warn!(error = %e, "could not sweep expired codes");
        }
        self.replaced.retain(|_, kept| {
            kept.retain(|(_, until)| *until > now);
            !kept.is_empty()
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::{clock::ManualClock, disclosures::LedgerError, store::sqlite::SqliteStore};

    /// A ledger in memory: (what, redeemed through) per row id.
    #[derive(Debug, Default)]
    pub(crate) struct TestLedger(Mutex<Vec<(String, Option<&'static str>)>>);

    impl Disclosures for TestLedger {
        fn issued(&self, rows: &[CodeDisclosure<'_>]) -> Result<Vec<u64>, LedgerError> {
            let mut all = self.0.lock().unwrap();
            Ok(rows
                .iter()
                .map(|r| {
                    all.push((r.what.to_owned(), None));
                    all.len() as u64 - 1
                })
                .collect())
        }

        fn withdrawn(&self, _: &[u64]) {}

        fn redeemed(&self, ids: &[u64], surface: Surface, _: u64) -> Result<(), LedgerError> {
            let mut all = self.0.lock().unwrap();
            ids.iter().for_each(|&id| all[id as usize].1 = Some(surface.as_str()));
            Ok(())
        }
    }

    fn config() -> EmbeddedConfig {
        EmbeddedConfig { session_ttl_secs: 3600, ..EmbeddedConfig::default() }
    }

    async fn platform_with(
        clock: Arc<ManualClock>,
        ledger: Arc<TestLedger>,
        config: EmbeddedConfig,
    ) -> EmbeddedPlatform {
        let store = Arc::new(SqliteStore::open(None, false).unwrap());
        EmbeddedPlatform::new(store, ledger, clock, config).await.unwrap()
    }

    async fn platform(clock: Arc<ManualClock>) -> EmbeddedPlatform {
        platform_with(clock, Arc::default(), config()).await
    }

    async fn app(p: &EmbeddedPlatform, app_id: &str, secret: &str) -> AuthorizedApp {
        p.authenticate(Surface::Exchange, Credential::Secret { app_id, secret }).await.unwrap()
    }

    #[tokio::test]
    async fn repeated_logins_renew_the_session_once_within_the_slack_and_again_past_it() {
        let clock = ManualClock::new(1_000);
        let p = platform(clock.clone()).await;
        let stored = |p: &EmbeddedPlatform| {
            let store = p.store.clone();
            async move { store.session("a", "u1").await.unwrap().unwrap() }
        };
        p.login_code("a", "u1", None).await.unwrap();
        let first = stored(&p).await;
        assert_eq!(first.expires_at_ms, 1_000 + 3_600_000);
        // A thousandth of the hour's lifetime (3.6 s) later: the stored row stays as it was.
        clock.advance_ms(3_000);
        p.login_code("a", "u1", None).await.unwrap();
        assert_eq!(stored(&p).await, first, "a renewal within the slack is not written");
        assert_eq!(p.check_session("a", "u1").await.ok(), Some(()));
        // Past the slack: renewed, with the same key.
        clock.advance_ms(1_000);
        p.login_code("a", "u1", None).await.unwrap();
        let renewed = stored(&p).await;
        assert_eq!(renewed.expires_at_ms, 5_000 + 3_600_000);
        assert_eq!(renewed.session_key, first.session_key, "a young key is kept");
    }

    #[tokio::test]
    async fn checksession_finds_the_session_of_the_openid_among_many() {
        let clock = ManualClock::new(1_000);
        let p = platform(clock.clone()).await;
        let secret = p.register_app("a", false).await.unwrap().unwrap();
        let a = app(&p, "a", &secret).await;
        let mut keys = Vec::new();
        for i in 0..300 {
            let uid = format!("u{i}");
            keys.push((p.openid("a", &uid), p.start_session("a", &uid).await.unwrap()));
            p.start_session("b", &uid).await.unwrap();
        }
        for (openid, key) in keys.iter().step_by(37) {
            assert_eq!(p.check_signature_now(&a, openid, &session_signature(key)).await, Ok(()));
        }
        let (openid, key) = &keys[5];
        let other_key = &keys[6].1;
        let fail = async |openid: &str, key: &str| p.check_signature_now(&a, openid, &session_signature(key)).await;
        let bad = Err(ExchangeFailure::InvalidSignature);
        assert_eq!(fail(openid, other_key).await, bad, "another user's session");
        assert_eq!(fail(&p.openid("b", "u5"), key).await, bad, "another app's openid");
        assert_eq!(fail(&p.openid("a", "nobody"), key).await, bad, "no session");
        clock.advance_ms(3_600_000);
        assert_eq!(fail(openid, key).await, bad, "expired");
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
        let store = Arc::new(SqliteStore::open(Some(&path), false).unwrap());
        let clock = ManualClock::new(2_000);
        let p = EmbeddedPlatform::new(store, Arc::new(TestLedger::default()), clock, config()).await.unwrap();
        let secret = p.register_app("a", false).await.unwrap().unwrap();
        let a = app(&p, "a", &secret).await;
        let signature = session_signature("key-from-before");
        assert_eq!(p.check_signature_now(&a, &p.openid("a", "u"), &signature).await, Ok(()));
    }

    #[tokio::test]
    async fn a_wrong_app_guess_leaves_the_code_usable() {
        let p = platform(ManualClock::new(1_000)).await;
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
        let p = platform(clock.clone()).await;
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
        let ledger = Arc::new(TestLedger::default());
        let p = platform_with(ManualClock::new(1_000), ledger.clone(), config()).await;
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
        let rows = ledger.0.lock().unwrap().clone();
        let redeemed: Vec<_> = rows.iter().map(|(what, via)| (what.as_str(), *via)).collect();
        let expected = [
            ("phone_number", None),
            ("email", Some("backend_http")),
            ("phone_number", Some("exchange")),
            ("openid", Some("exchange")),
        ];
        assert_eq!(redeemed, expected);
    }

    #[tokio::test]
    async fn a_value_code_presented_for_another_user_stays_usable() {
        let p = platform(ManualClock::new(1_000)).await;
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
        let p = platform(ManualClock::new(1_000)).await;
        let secret = p.register_app("a", false).await.unwrap().unwrap();
        let token = p.access_token(&app(&p, "a", &secret).await, TokenRequest::Fresh).await.unwrap().token;
        assert!(p.authenticate(Surface::BackendHttp, Credential::AccessToken(&token)).await.is_ok());
        p.register_app("a", true).await.unwrap().unwrap();
        assert_eq!(
            p.authenticate(Surface::BackendHttp, Credential::AccessToken(&token)).await,
            Err(ExchangeFailure::InvalidCredential)
        );
    }

    #[tokio::test]
    async fn every_login_code_redeems_to_the_sessions_current_key() {
        let clock = ManualClock::new(1_000);
        let p = platform_with(clock.clone(), Arc::default(), EmbeddedConfig { key_refresh_secs: 60, ..config() }).await;
        let secret = p.register_app("a", false).await.unwrap().unwrap();
        let a = app(&p, "a", &secret).await;
        // Two logins within key_refresh_secs (60 s) keep one key.
        let first = p.login_code("a", "u", None).await.unwrap();
        clock.advance_ms(59_000);
        let second = p.login_code("a", "u", None).await.unwrap();
        let k2 = p.code2session(Surface::Exchange, &a, &second).await.unwrap().session_key;
        assert!(SessionKey::parse(&k2).is_some(), "a WeChat key: standard base64 of 16 bytes");
        // A login after it replaces the key; the code of the first login, redeemed last, gives
        // the key that is current now, not the one its login had.
        clock.advance_ms(1_000);
        let third = p.login_code("a", "u", None).await.unwrap();
        let k1 = p.code2session(Surface::Exchange, &a, &first).await.unwrap().session_key;
        let k3 = p.code2session(Surface::Exchange, &a, &third).await.unwrap().session_key;
        assert_ne!(k1, k2, "the third login replaced the key");
        assert_eq!(k1, k3, "the first code redeems to the current key");
        let openid = p.openid("a", "u");
        assert_eq!(p.check_signature_now(&a, &openid, &session_signature(&k1)).await, Ok(()));
        assert_eq!(
            p.check_signature_now(&a, &openid, &session_signature(&k2)).await,
            Err(ExchangeFailure::InvalidSignature)
        );
        assert!(p.was_replaced("a", &openid, &session_signature(&k2)), "the stale key is recognised");
        assert!(!p.was_replaced("a", &openid, &session_signature("never-a-key")));
    }

    #[tokio::test]
    async fn a_session_remembers_at_most_its_last_replaced_keys() {
        let clock = ManualClock::new(1_000);
        let p = platform_with(clock.clone(), Arc::default(), EmbeddedConfig { key_refresh_secs: 0, ..config() }).await;
        let secret = p.register_app("a", false).await.unwrap().unwrap();
        let a = app(&p, "a", &secret).await;
        // Every login replaces the key (key_refresh_secs = 0): ten keys, of which nine replaced.
        let mut keys = Vec::new();
        for _ in 0..10 {
            let code = p.login_code("a", "u", None).await.unwrap();
            keys.push(p.code2session(Surface::Exchange, &a, &code).await.unwrap().session_key);
            clock.advance_ms(1);
        }
        let openid = p.openid("a", "u");
        let kept = p.replaced.get(&("a".to_owned(), openid.clone())).map(|k| k.len());
        assert_eq!(kept, Some(REPLACED_KEPT), "a session keeps at most REPLACED_KEPT replaced keys");
        let recognised: Vec<bool> =
            keys[..9].iter().map(|k| p.was_replaced("a", &openid, &session_signature(k))).collect();
        assert_eq!(
            recognised,
            [vec![false; 9 - REPLACED_KEPT], vec![true; REPLACED_KEPT]].concat(),
            "the newest are kept"
        );
        assert!(!p.was_replaced("a", &openid, &session_signature(&keys[9])), "the current key is not replaced");
    }

    #[tokio::test]
    async fn a_reset_gives_the_session_a_new_key_only_for_the_current_ones_signature() {
        let clock = ManualClock::new(1_000);
        let p = platform(clock.clone()).await;
        let secret = p.register_app("a", false).await.unwrap().unwrap();
        let a = app(&p, "a", &secret).await;
        let code = p.login_code("a", "u", None).await.unwrap();
        let key = p.code2session(Surface::Exchange, &a, &code).await.unwrap().session_key;
        let openid = p.openid("a", "u");
        assert_eq!(
            p.reset_session_key(&a, &openid, &session_signature("wrong")).await,
            Err(ExchangeFailure::InvalidSignature)
        );
        let before = p.store.session("a", "u").await.unwrap().unwrap();
        let new = p.reset_session_key(&a, &openid, &session_signature(&key)).await.unwrap();
        assert_ne!(new, key);
        assert!(SessionKey::parse(&new).is_some());
        let after = p.store.session("a", "u").await.unwrap().unwrap();
        assert_eq!((after.session_key.as_str(), after.expires_at_ms), (new.as_str(), before.expires_at_ms));
        assert_eq!(
            p.check_signature_now(&a, &openid, &session_signature(&key)).await,
            Err(ExchangeFailure::InvalidSignature)
        );
        assert!(p.was_replaced("a", &openid, &session_signature(&key)));
        // Credentials are made with the new key; without a session there are none.
        let made = p.user_credentials("a", "u", r#"{"nickName":"N"}"#).await.unwrap().unwrap();
        assert_eq!(made.signature, user_data::signature(r#"{"nickName":"N"}"#, &new));
        assert_eq!(p.user_credentials("a", "nobody", "{}").await.unwrap(), None);
        clock.advance_ms(3_600_000);
        assert_eq!(p.user_credentials("a", "u", "{}").await.unwrap(), None, "expired");
        p.sweep().await;
        assert!(p.replaced.is_empty(), "the sweep forgets replaced keys with their sessions");
    }

    #[test]
    fn the_session_signature_is_the_hex_hmac_of_the_empty_message() {
        // HMAC-SHA256 with key "key" over "" (a published test value).
        assert_eq!(session_signature("key"), "5d5d139563c95b5967b9bd9a8c9b233a9dedb45072794cd232dc1b74832607d0");
    }

    #[tokio::test]
    async fn each_app_is_vouched_for_by_its_own_superapp_server_or_none() {
        use crate::superapp::{ClientSettings, PlatformKey};
        // Nothing listens there: a call to it fails at once.
        let down = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let settings = ClientSettings {
            server_url: format!("http://{down}"),
            client_key: "k".into(),
            timeout: std::time::Duration::from_secs(2),
            max_answer_bytes: 1024,
            max_in_flight: 2,
        };
        let client = Arc::new(SuperappClient::new(&settings, Arc::new(PlatformKey::generate().unwrap())).unwrap());
        let p = platform(ManualClock::new(0))
            .await
            .with_superapps(Arc::new(move |app_id: &str| (app_id == "wxvouched").then(|| client.clone())));
        assert!(p.vouches("wxvouched").await.unwrap() && !p.vouches("wxplain").await.unwrap());
        assert!(p.login_code("wxplain", "u1", Some("host-auth-code".into())).await.is_ok(), "no server: as before");
        let refused = p.login_code("wxvouched", "u1", Some("host-auth-code".into())).await;
        assert!(matches!(refused, Err(PlatformError::Superapp(_))), "{refused:?}");
        assert!(matches!(p.start_session("wxvouched", "u1").await, Err(PlatformError::Superapp(_))));
        assert!(p.check_session("wxvouched", "u1").await.is_err(), "no session started");
    }
}
