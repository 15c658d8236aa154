//! What the platform persists, behind one trait so that an engine can be swapped: sessions, app
//! secrets, the openid secret, the codes (outstanding, and spent ones until they would have
//! expired), access tokens and the backends' attempt buckets. [`sqlite::SqliteStore`] is the embedded engine (one machine, one process); a shared
//! engine (many platform instances on one database) implements the same trait.
//!
//! Each method is one operation the platform needs and one transaction on the engine: the engine,
//! not the platform, decides how it is atomic (a row lock, `UPDATE … RETURNING`, a mutex). A code
//! is redeemed by exactly one caller however many race for it: [`PlatformStore::redeem_code`]
//! decides in one step.

pub mod sqlite;

use crate::{AccessToken, StoreError, TokenRequest, ValueKind};

/// One stored login session of (app, user).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRow {
    pub app_id: String,
    pub uid: String,
    /// The user's openid in the app, kept so that a backend's openid finds its session by key.
    pub openid: String,
    pub session_key: String,
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
}

/// How the platform computes the openid of (app, uid).
pub type OpenidOf = dyn Fn(&str, &str) -> String + Send + Sync;

/// What a code stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Purpose {
    /// A login code, with the host's v3 authCode bound in. It redeems to the session's key at
    /// redemption, not at issue, so every code of a session gives the key current then.
    Login { auth_code: Option<String> },
    /// A phone or e-mail code: the value it stands for.
    Value { kind: ValueKind, value: String },
}

/// One code as the store keeps it (the code itself is its key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodeRecord {
    pub app_id: String,
    pub uid: String,
    /// The user's openid in the app (a value code may be redeemed only for it).
    pub openid: String,
    pub purpose: Purpose,
    pub expires_at_ms: u64,
    /// Its rows in the disclosure ledger ([`crate::disclosures::Disclosures`]).
    pub ledger: Vec<u64>,
}

/// Which codes a redemption takes: a login code, or a value code of `kind` (with `openid`, only
/// that user's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wanted<'a> {
    Login,
    Value { kind: ValueKind, openid: Option<&'a str> },
}

impl Wanted<'_> {
    /// Whether `record` is a code of `app_id` this redemption takes (expiry aside).
    pub fn takes(&self, app_id: &str, record: &CodeRecord) -> bool {
        record.app_id == app_id
            && match (self, &record.purpose) {
                (Wanted::Login, Purpose::Login { .. }) => true,
                (Wanted::Value { kind, openid }, Purpose::Value { kind: k, .. }) => {
                    kind == k && openid.is_none_or(|o| o == record.openid)
                }
                _ => false,
            }
    }
}

/// What a redemption found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redemption {
    /// The code, taken: no one else redeems it.
    Redeemed(CodeRecord),
    /// The code was redeemed already, by the app presenting it (another app presenting it hears
    /// [`Redemption::Invalid`], as for a code that never existed).
    Used,
    /// The code is one this redemption would take, but it expired.
    Expired,
    /// No such code, or not one this redemption takes (it stays usable for its own app).
    Invalid,
}

/// What an access token presented by a backend turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenCheck {
    /// Live, issued to this app.
    Valid(String),
    /// Expired (remembered for one more lifetime, so its backend hears 42001).
    Expired,
    /// Never issued, revoked, or long forgotten.
    Unknown,
}

/// A bucket's size and refill: `burst` attempts at once, `per_minute` more a minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub per_minute: u32,
    pub burst: u32,
}

impl Quota {
    /// The time one attempt takes to refill, in µs.
    pub fn interval_us(&self) -> u64 {
        60_000_000 / u64::from(self.per_minute.max(1))
    }
}

/// The platform's persistence. See the module docs.
#[async_trait::async_trait]
pub trait PlatformStore: Send + Sync + std::fmt::Debug + 'static {
    /// Where the data lives, for status output.
    fn location(&self) -> String;

    /// The platform's 32-byte secret (keys openid and unionid): the stored one, or `fresh`,
    /// stored, when there is none yet. Every instance on one database reads the same.
    async fn openid_secret(&self, fresh: [u8; 32]) -> Result<[u8; 32], StoreError>;

    /// Fills in the openid of sessions stored without one (by a daemon from before sessions kept
    /// it), as `openid` of (app, uid) computes it; returns how many. Engines that never stored a
    /// session without one have nothing to do.
    async fn fill_session_openids(&self, _openid: &OpenidOf) -> Result<usize, StoreError> {
        Ok(0)
    }

    /// The hash of an app's backend secret, if the app is registered.
    async fn app_secret_hash(&self, app_id: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// Stores an app's secret hash; with `replace` false an existing one is kept. Returns whether
    /// it was written.
    async fn set_app_secret_hash(&self, app_id: &str, hash: &[u8], replace: bool) -> Result<bool, StoreError>;

    /// Stores a session of (app, uid), replacing the one before (v3's session without a code).
    async fn start_session(&self, session: &SessionRow) -> Result<(), StoreError>;

    /// The session of (app, uid), live or expired.
    async fn session(&self, app_id: &str, uid: &str) -> Result<Option<SessionRow>, StoreError>;

    /// The session of the user whose openid in `app_id` is `openid`, by key.
    async fn session_by_openid(&self, app_id: &str, openid: &str) -> Result<Option<SessionRow>, StoreError>;

    /// At most `limit` sessions (of `app_id`, or every app), by app then uid, after the session
    /// `after` = (app, uid) names (`None`: from the first).
    async fn list_sessions(
        &self,
        app_id: Option<&str>,
        after: Option<(&str, &str)>,
        limit: u32,
    ) -> Result<Vec<SessionRow>, StoreError>;

    /// The user `uid` signed out or another signed in: its sessions and its outstanding codes go.
    /// Returns how many sessions ended.
    async fn user_changed(&self, uid: &str) -> Result<usize, StoreError>;

    /// Stores `code` for `record` and, for a login code, the `session` it starts, in one
    /// transaction. At most `max_per_user` codes of (app, uid) are outstanding: one more drops
    /// the oldest.
    async fn issue_code(
        &self,
        code: &str,
        record: CodeRecord,
        session: Option<&SessionRow>,
        max_per_user: usize,
    ) -> Result<(), StoreError>;

    /// Takes `code` if `wanted` takes it for `app_id` and it has not expired at `now_ms`; a code
    /// that does not match stays where it is (a wrong guess changes nothing). A taken code is
    /// remembered as spent until it would have expired.
    async fn redeem_code(
        &self,
        app_id: &str,
        code: &str,
        wanted: Wanted<'_>,
        now_ms: u64,
    ) -> Result<Redemption, StoreError>;

    /// Drops every outstanding value code of (app, uid) standing for `kind` (every kind for
    /// `None`). Returns how many.
    async fn invalidate_codes(&self, app_id: &str, uid: &str, kind: Option<ValueKind>) -> Result<usize, StoreError>;

    /// Drops codes and spent-code tombstones expired at `now_ms`.
    async fn sweep(&self, now_ms: u64) -> Result<(), StoreError>;

    /// Outstanding codes (status, tests).
    async fn outstanding_codes(&self) -> Result<usize, StoreError>;

    /// An access token for `app_id` at `now_ms` ([`crate::access_tokens`] has the rules: 7200 s,
    /// a stable token handed out again until it expires or is force-refreshed, a bounded number
    /// per app). Stored by hash: a token works on every instance of a shared engine.
    async fn issue_token(&self, app_id: &str, request: TokenRequest, now_ms: u64) -> Result<AccessToken, StoreError>;

    /// What `token` is at `now_ms`.
    async fn verify_token(&self, token: &str, now_ms: u64) -> Result<TokenCheck, StoreError>;

    /// Forgets every token of `app_id` (its secret was rotated).
    async fn revoke_tokens(&self, app_id: &str) -> Result<(), StoreError>;

    /// Takes one attempt from the bucket `key` at `now_ms` if it has one left (GCRA: the bucket's
    /// state is when it is full again, [`crate::rate`]). Shared by every instance of a shared
    /// engine.
    async fn take_attempt(&self, key: &str, quota: Quota, now_ms: u64) -> Result<bool, StoreError>;
}
