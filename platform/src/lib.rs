//! The platform: codes, sessions, openid and the backend exchange.
//!
//! In the cloud product a platform server plays this role; the daemon embeds it
//! ([`embedded::EmbeddedPlatform`]) so that it works alone on one machine. Everything goes through
//! the [`Platform`] trait, so a remote platform can replace the embedded one without touching the
//! API layer.
//!
//! The crate knows nothing of the daemon's broker. Its seams:
//! - [`Platform`]: what the daemon's API handlers, the gRPC `Exchange` service and the backend
//!   HTTP API ([`backend_http`]) call; errors are [`PlatformError`] (renderer side) and
//!   [`ExchangeFailure`] (backend side, with WeChat's errcode).
//! - [`store::PlatformStore`]: what the platform persists (sessions, app secrets, the openid secret,
//!   outstanding and spent codes), one operation one transaction; [`store::sqlite::SqliteStore`] is
//!   the embedded engine.
//! - [`disclosures::Disclosures`]: the hook through which the platform writes a code's rows in the
//!   disclosure ledger that its embedder owns (the daemon's consent ledger).
//! - [`config::EmbeddedConfig`]: the platform's own settings; an embedder maps its config into it.

pub mod access_tokens;
pub mod backend_http;
pub mod clock;
pub mod config;
pub mod disclosures;
pub mod embedded;
pub mod error;
pub mod rate;
pub mod store;
pub mod superapp;
pub mod tokens;
pub mod user_data;

use miniapp_broker_proto::v1::{Code2SessionResponse, ExchangeError};

pub use error::{PlatformError, StoreError};

/// What a one-time value code stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueKind {
    PhoneNumber,
    Email,
}

impl ValueKind {
    /// The v3 scope that grants this value.
    pub const fn scope(self) -> &'static str {
        match self {
            ValueKind::PhoneNumber => miniapp_broker_proto::api::scope::PHONE_NUMBER,
            ValueKind::Email => miniapp_broker_proto::api::scope::EMAIL,
        }
    }

    /// What a code of this kind discloses (the ledger's `what`).
    pub const fn disclosed(self) -> Disclosed {
        match self {
            ValueKind::PhoneNumber => Disclosed::PhoneNumber,
            ValueKind::Email => Disclosed::Email,
        }
    }

    /// The value a code of a scope stands for; `None` for scopes without codes (avatar, nickname).
    pub fn of_scope(scope: &str) -> Option<ValueKind> {
        [ValueKind::PhoneNumber, ValueKind::Email].into_iter().find(|k| k.scope() == scope)
    }
}

/// The surface through which user data leaves the daemon for an app (the disclosure ledger's
/// `surface`): the renderer's OpenApi, where codes and profile values go, or the surface an app
/// backend used, the gRPC `Exchange` service or the backend HTTP API. Every redemption is recorded
/// with it at one point in the platform (the disclosure ledger's hook).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    Exchange,
    BackendHttp,
    /// The renderer's OpenApi (typed RPCs, Invoke, the Session stream).
    RendererApi,
}

impl Surface {
    pub fn as_str(self) -> &'static str {
        match self {
            Surface::RendererApi => "renderer_api",
            Surface::Exchange => "exchange",
            Surface::BackendHttp => "backend_http",
        }
    }
}

/// What of a user's data a disclosure carries (the ledger's `what`; never the value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disclosed {
    Openid,
    Unionid,
    PhoneNumber,
    Email,
    Avatar,
    Nickname,
    /// The host's getUserInfo answer, passed through to a renderer.
    UserInfo,
    /// The host's getUserProfile answer, passed through to a renderer.
    UserProfile,
}

impl Disclosed {
    pub const fn as_str(self) -> &'static str {
        match self {
            Disclosed::Openid => "openid",
            Disclosed::Unionid => "unionid",
            Disclosed::PhoneNumber => "phone_number",
            Disclosed::Email => "email",
            Disclosed::Avatar => "avatar",
            Disclosed::Nickname => "nickname",
            Disclosed::UserInfo => "user_info",
            Disclosed::UserProfile => "user_profile",
        }
    }
}

/// What an app backend proves itself with: the app's secret, or an access token the platform issued
/// for that secret.
#[derive(Clone, Copy)]
pub enum Credential<'a> {
    Secret { app_id: &'a str, secret: &'a str },
    AccessToken(&'a str),
}

/// An app backend the platform has authenticated (and counted against the app's rate limit). Only
/// the platform makes one, so a surface cannot skip the check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorizedApp {
    app_id: String,
}

impl AuthorizedApp {
    pub(crate) fn new(app_id: &str) -> AuthorizedApp {
        AuthorizedApp { app_id: app_id.to_owned() }
    }

    /// The app id, validated: safe to log.
    pub fn app_id(&self) -> &str {
        &self.app_id
    }
}

/// An access token for an app's backend (WeChat's `/cgi-bin/token`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessToken {
    pub token: String,
    pub expires_in_secs: u64,
}

/// Which access token a backend asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRequest {
    /// `/cgi-bin/token`: a fresh token; earlier ones stay valid until they expire.
    Fresh,
    /// `/cgi-bin/stable_token`: the app's current stable token (a new one with `force_refresh`).
    Stable { force_refresh: bool },
}

/// Exchange failures with their WeChat-style errcode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExchangeFailure {
    /// A wrong secret, or an app id that is not registered: one answer for both, so that it does
    /// not tell which apps exist.
    #[error("invalid appsecret")]
    InvalidSecret,
    #[error("invalid code")]
    InvalidCode,
    #[error("code been used")]
    CodeUsed,
    #[error("invalid code: expired")]
    CodeExpired,
    /// A parameter is missing or wrong, with WeChat's errcode for it (40002 grant_type, 41002
    /// appid, 41004 secret, 41008 code, 41009 openid, 87009 signature). Never 40001: on 40001 a
    /// backend library (wechatpy) fetches a new access token and retries the request.
    #[error("malformed request: {1}")]
    Malformed(i32, &'static str),
    /// The access token is unknown (or was never issued).
    #[error("invalid credential, access_token is invalid or not latest")]
    InvalidCredential,
    #[error("access_token expired")]
    TokenExpired,
    /// The app's backend made more attempts than its per-app limit allows.
    #[error("api minute-quota reach limit, rate limit exceeded")]
    RateLimited,
    /// A request body that is not the JSON the endpoint takes.
    #[error("data format error")]
    DataFormat,
    /// checksession: the signature is not hmac_sha256(session_key, "") of a live session.
    #[error("invalid signature")]
    InvalidSignature,
    #[error("system error: {0}")]
    System(String),
    /// The platform's database is unreachable or did not answer within its deadline: WeChat's
    /// "system busy", answered at once; the backend retries later.
    #[error("system busy")]
    Busy,
}

impl ExchangeFailure {
    /// WeChat's errcode for the failure.
    pub fn errcode(&self) -> i32 {
        match self {
            ExchangeFailure::InvalidSecret => 40125,
            ExchangeFailure::InvalidCode | ExchangeFailure::CodeExpired => 40029,
            ExchangeFailure::CodeUsed => 40163,
            ExchangeFailure::Malformed(errcode, _) => *errcode,
            ExchangeFailure::InvalidCredential => 40001,
            ExchangeFailure::TokenExpired => 42001,
            ExchangeFailure::RateLimited => 45011,
            ExchangeFailure::DataFormat => 47001,
            ExchangeFailure::InvalidSignature => 87009,
            ExchangeFailure::System(_) | ExchangeFailure::Busy => -1,
        }
    }

    pub fn to_error(&self) -> ExchangeError {
        ExchangeError { errcode: self.errcode(), errmsg: self.to_string() }
    }
}

/// The platform's operations, as the API layer and the Exchange service use them.
#[async_trait::async_trait]
pub trait Platform: Send + Sync + 'static {
    /// wx.login: starts a fresh session for (app, uid) and returns a one-time code for it, with
    /// the host's v3 authCode bound in when there is one. When a superapp server vouches, the
    /// authCode is redeemed there first and must stand for `uid` (without one, checkUser must know
    /// `uid`); nothing is started or issued otherwise.
    async fn login_code(&self, app_id: &str, uid: &str, auth_code: Option<String>) -> Result<String, PlatformError>;

    /// Starts a fresh session for (app, uid) without issuing a code (v3, when the host's own
    /// `code` is passed through as the login code). Returns the session key.
    async fn start_session(&self, app_id: &str, uid: &str) -> Result<String, PlatformError>;

    /// wx.checkSession: ok while the (app, uid) session exists and has not expired.
    async fn check_session(&self, app_id: &str, uid: &str) -> Result<(), PlatformError>;

    /// wx.getPhoneNumber / wx.getEmail: a one-time code standing for `value`. Codes are recorded
    /// in the disclosure ledger when issued and stamped when redeemed.
    async fn value_code(
        &self,
        app_id: &str,
        uid: &str,
        kind: ValueKind,
        value: String,
    ) -> Result<String, PlatformError>;

    /// The signed-in user changed away from `old_uid`: its sessions end.
    async fn user_changed(&self, old_uid: &str) -> Result<(), PlatformError>;

    /// Invalidates at once every outstanding value code of (app, uid) standing for `kind` (every
    /// kind for `None`): the user revoked the scope. Returns how many.
    async fn invalidate_codes(&self, app_id: &str, uid: &str, kind: Option<ValueKind>) -> usize;

    /// Authenticates an app's backend and takes one attempt from the app's rate limit; every
    /// backend operation (both surfaces, every endpoint) starts here. Refusals are logged here too,
    /// with the app id only once it is known to be a registered app.
    async fn authenticate(
        &self,
        surface: Surface,
        credential: Credential<'_>,
    ) -> Result<AuthorizedApp, ExchangeFailure>;

    /// code2Session: a login code of `app` for the user's openid and the session key.
    async fn code2session(
        &self,
        surface: Surface,
        app: &AuthorizedApp,
        code: &str,
    ) -> Result<Code2SessionResponse, ExchangeFailure>;

    /// A phone or e-mail code of `app` for its value; with `openid`, the code must be that user's.
    async fn redeem_value(
        &self,
        surface: Surface,
        app: &AuthorizedApp,
        code: &str,
        kind: ValueKind,
        openid: Option<&str>,
    ) -> Result<String, ExchangeFailure>;

    /// An access token bound to `app` (WeChat's `/cgi-bin/token` and `/cgi-bin/stable_token`).
    async fn access_token(&self, app: &AuthorizedApp, request: TokenRequest) -> Result<AccessToken, ExchangeFailure>;

    /// checksession: ok when `signature` is hex(hmac_sha256(session_key, "")) of the live session
    /// of the user `openid` names in `app`.
    async fn check_session_signature(
        &self,
        app: &AuthorizedApp,
        openid: &str,
        signature: &str,
    ) -> Result<(), ExchangeFailure>;

    /// WeChat's `/wxa/resetusersessionkey`: the backend proves it holds the current key of the
    /// session of `openid` (its checksession signature) and the session gets a new key, returned.
    async fn reset_session_key(
        &self,
        app: &AuthorizedApp,
        openid: &str,
        signature: &str,
    ) -> Result<String, ExchangeFailure>;

    /// getUserInfo / getUserProfile: `rawData`, `signature`, `encryptedData` and `iv` of
    /// `user_info_json` for the app's backend, made with the current key of the (app, uid)
    /// session (the key never leaves the platform); `None` without a live session.
    async fn user_credentials(
        &self,
        app_id: &str,
        uid: &str,
        user_info_json: &str,
    ) -> Result<Option<user_data::UserCredentials>, PlatformError>;

    /// The stable openid of (app, uid).
    fn openid(&self, app_id: &str, uid: &str) -> String;

    /// Whether a superapp server vouches for the users of `app_id` ([`superapp::vouch`]): logins are checked
    /// there, and phone, e-mail, avatar and nickname come from it instead of the host's profile.
    async fn vouches(&self, _app_id: &str) -> Result<bool, PlatformError> {
        Ok(false)
    }

    /// wx.getPhoneNumber / wx.getEmail when a superapp server vouches: a one-time code standing
    /// for the server's temporary code; the value is fetched only when a backend redeems it.
    async fn vouched_value_code(&self, _app_id: &str, _uid: &str, _kind: ValueKind) -> Result<String, PlatformError> {
        Err(PlatformError::Superapp("no superapp server is configured".into()))
    }

    /// wx.chooseAvatar / wx.getNickName when a superapp server vouches: the value from it.
    async fn vouched_profile(
        &self,
        _app_id: &str,
        _uid: &str,
        _field: superapp::vouch::ProfileField,
    ) -> Result<String, PlatformError> {
        Err(PlatformError::Superapp("no superapp server is configured".into()))
    }

    /// Registers (or rotates) an app's backend secret; returns the new secret, or `None` when one
    /// exists and `rotate` is false.
    async fn register_app(&self, app_id: &str, rotate: bool) -> Result<Option<String>, PlatformError>;

    /// At most `limit` live or expired sessions (of `app_id`, or every app), by app then uid, after
    /// the session `after` = (app, uid) names (`None`: from the first). Never the session keys.
    async fn list_sessions(
        &self,
        app_id: Option<&str>,
        after: Option<(&str, &str)>,
        limit: u32,
    ) -> Result<Vec<SessionInfo>, PlatformError>;

    /// Drops what has expired (codes, spent-code tombstones, access tokens, idle rate buckets);
    /// the embedder calls it periodically.
    async fn sweep(&self);
}

/// One session as an operator's listing shows it: whose, and for how long (never the key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    pub app_id: String,
    pub uid: String,
    /// The user's openid in the app.
    pub openid: String,
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
}
