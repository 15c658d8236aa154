//! The platform: codes, sessions, openid and the backend exchange.
//!
//! In the cloud product a platform server plays this role; the daemon embeds it
//! ([`embedded::EmbeddedPlatform`]) so that it works alone on one machine. Everything goes through
//! the [`Platform`] trait, so a remote platform can replace the embedded one without touching the
//! API layer.

pub mod embedded;

use miniapp_broker_proto::v1::{Code2SessionResponse, ExchangeError};

use crate::error::ApiError;

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

    /// The value a code of a scope stands for; `None` for scopes without codes (avatar, nickname).
    pub fn of_scope(scope: &str) -> Option<ValueKind> {
        [ValueKind::PhoneNumber, ValueKind::Email].into_iter().find(|k| k.scope() == scope)
    }
}

/// The surface through which user data leaves the daemon for an app (the ledger's `surface`).
/// Code redemptions take it as a parameter, so every surface is recorded by the one redeem path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    /// The renderer's OpenApi (typed RPCs, Invoke, the Session stream).
    RendererApi,
    /// The gRPC Exchange service.
    Exchange,
    /// The backend HTTP API (WeChat / TCMPP paths).
    BackendHttp,
}

impl Surface {
    pub const fn as_str(self) -> &'static str {
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

/// Exchange failures with their WeChat-style errcode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExchangeFailure {
    #[error("invalid appid")]
    InvalidAppId,
    #[error("invalid appsecret")]
    InvalidSecret,
    #[error("invalid code")]
    InvalidCode,
    #[error("code been used")]
    CodeUsed,
    #[error("invalid code: expired")]
    CodeExpired,
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    #[error("system error: {0}")]
    System(String),
}

impl ExchangeFailure {
    /// WeChat's errcode for the failure.
    pub fn errcode(&self) -> i32 {
        match self {
            ExchangeFailure::InvalidAppId => 40013,
            ExchangeFailure::InvalidSecret => 40125,
            ExchangeFailure::InvalidCode | ExchangeFailure::CodeExpired => 40029,
            ExchangeFailure::CodeUsed => 40163,
            ExchangeFailure::Malformed(_) => 40001,
            ExchangeFailure::System(_) => -1,
        }
    }

    pub fn to_error(&self) -> ExchangeError {
        ExchangeError { errcode: self.errcode(), errmsg: self.to_string() }
    }
}

/// The platform's operations, as the API layer and the Exchange service use them.
#[tonic::async_trait]
pub trait Platform: Send + Sync + 'static {
    /// wx.login: starts a fresh session for (app, uid) and returns a one-time code for it, with
    /// the host's v3 authCode bound in when there is one.
    async fn login_code(&self, app_id: &str, uid: &str, auth_code: Option<String>) -> Result<String, ApiError>;

    /// Starts a fresh session for (app, uid) without issuing a code (v3, when the host's own
    /// `code` is passed through as the login code). Returns the session key.
    async fn start_session(&self, app_id: &str, uid: &str) -> Result<String, ApiError>;

    /// wx.checkSession: ok while the (app, uid) session exists and has not expired.
    async fn check_session(&self, app_id: &str, uid: &str) -> Result<(), ApiError>;

    /// wx.getPhoneNumber / wx.getEmail: a one-time code standing for `value`. Codes are recorded
    /// in the disclosure ledger when issued and stamped when redeemed.
    async fn value_code(&self, app_id: &str, uid: &str, kind: ValueKind, value: String) -> Result<String, ApiError>;

    /// The signed-in user changed away from `old_uid`: its sessions end.
    async fn user_changed(&self, old_uid: &str) -> Result<(), ApiError>;

    /// Invalidates at once every outstanding value code of (app, uid) standing for `kind` (every
    /// kind for `None`): the user revoked the scope. Returns how many.
    async fn invalidate_codes(&self, app_id: &str, uid: &str, kind: Option<ValueKind>) -> usize;

    /// Exchange.Code2Session, through `surface` (recorded in the ledger).
    async fn code2session(
        &self,
        app_id: &str,
        secret: &str,
        code: &str,
        surface: Surface,
    ) -> Result<Code2SessionResponse, ExchangeFailure>;

    /// Exchange.GetPhoneNumber / GetEmail, through `surface` (recorded in the ledger).
    async fn redeem_value(
        &self,
        app_id: &str,
        secret: &str,
        code: &str,
        kind: ValueKind,
        surface: Surface,
    ) -> Result<String, ExchangeFailure>;

    /// The stable openid of (app, uid).
    fn openid(&self, app_id: &str, uid: &str) -> String;

    /// Registers (or rotates) an app's backend secret; returns the new secret, or `None` when one
    /// exists and `rotate` is false.
    async fn register_app(&self, app_id: &str, rotate: bool) -> Result<Option<String>, ApiError>;
}
