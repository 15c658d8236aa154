//! Typed errors inside the daemon, and their one mapping to the edge: a gRPC status code plus the
//! WeChat-style `errMsg`/`errno` that mini program code reads (docs/errors.md lists them).

use miniapp_broker_proto::{
    Api,
    v1::{ApiFailure, DelegateMethod, HostError},
};
pub use miniapp_platform::PlatformError;
use tonic::Code;

/// Why an open-API call failed. Every variant ends a call with exactly one answer.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum ApiError {
    #[error("no host connected")]
    NoHost,
    #[error("host disconnected")]
    HostGone,
    #[error("{} not implemented by host", method_name(*.0))]
    NotImplementedByHost(DelegateMethod),
    #[error("timeout")]
    Timeout,
    #[error("call cancelled: {0}")]
    Cancelled(&'static str),
    /// The user cancelled on the host (closed the payment sheet, refused consent).
    #[error("cancel")]
    UserCancelled,
    /// The host's own error, passed to the renderer unchanged.
    #[error("{}", .0.message)]
    Host(HostError),
    /// No user is signed in to the superapp (the seed's -1001).
    #[error("app not login")]
    NotLoggedIn,
    /// getAuthCode returned neither authCode nor code (the seed's -1002).
    #[error("authCode is null")]
    AuthCodeNull,
    #[error("scope not authorized: {scope}: {message}")]
    ScopeDenied { scope: String, message: String },
    /// The instance runs v3 but the host does not implement getAuthCode.
    #[error("v3 requires the host to implement getAuthCode")]
    AuthCodeNotImplemented,
    #[error("session expired, need relogin")]
    SessionExpired,
    #[error("invalid parameter: {0}")]
    InvalidParams(String),
    #[error("api not supported: {0}")]
    UnknownApi(String),
    #[error("resource exhausted: {0}")]
    Exhausted(String),
    /// The host broke the protocol (a result of the wrong type for the call).
    #[error("host protocol error: {0}")]
    HostProtocol(String),
    /// The host took a payment's idempotency key but never answered: the payment may have
    /// happened, so the key is spent and the host must reconcile.
    #[error("payment outcome unknown: {0}")]
    PaymentOutcomeUnknown(String),
    /// The user's profile has no such value (no phone number bound, ...).
    #[error("user has no {0}")]
    NoProfileValue(&'static str),
    /// A payment retry: the first outcome, exactly as the first caller got it.
    #[error("{}", .0.err_msg)]
    Replayed(Box<ApiFailure>),
    /// The signed-in user changed (or signed out) while the call waited on the host: nothing was
    /// issued or recorded for either user.
    #[error("signed-in user changed")]
    UserChanged,
    /// The user refused the scope for this app earlier (a remembered refusal), or refused it when
    /// wx.authorize asked: WeChat's "auth deny".
    #[error("auth deny")]
    AuthDeny,
    /// The superapp's server, which vouches for the user, was slow, down, answered garbage or
    /// refused the call (docs/superapp-server.md): nothing was issued or recorded.
    #[error("{0}")]
    Superapp(String),
    /// The superapp's server does not know the signed-in user (checkUser answered false).
    #[error("user unknown to the superapp server")]
    UnknownUser,
    /// The superapp's server refused the host's authCode, or it stands for another user than the
    /// one the host says is signed in: no code for either.
    #[error("authCode refused: {0}")]
    AuthCodeRefused(String),
    /// The store cannot write (`store.max_bytes` reached, the disk full or read-only, an I/O
    /// error): the call needed to record something and did nothing; reads go on.
    #[error("storage unavailable: {0}")]
    StoreUnavailable(String),
    /// The remote platform (`[platform] url`) is down, slow past the call's deadline, or refused
    /// the daemon's credentials: nothing was issued.
    #[error("platform unavailable")]
    PlatformUnavailable,
    #[error("internal error: {0}")]
    Internal(String),
}

fn method_name(m: DelegateMethod) -> &'static str {
    match m {
        DelegateMethod::GetAuthCode => "getAuthCode",
        DelegateMethod::OpenApiVersion => "openApiVersion",
        DelegateMethod::OpenSetting => "openSetting",
        other => Api::ALL.into_iter().find(|a| a.method() == other).map(Api::name).unwrap_or("unknown method"),
    }
}

impl ApiError {
    /// The gRPC status code this failure maps to.
    pub fn code(&self) -> Code {
        match self {
            ApiError::NoHost
            | ApiError::HostGone
            | ApiError::StoreUnavailable(_)
            | ApiError::PlatformUnavailable => Code::Unavailable,
            ApiError::NotImplementedByHost(_) | ApiError::AuthCodeNotImplemented => Code::Unimplemented,
            ApiError::Timeout => Code::DeadlineExceeded,
            ApiError::Cancelled(_) | ApiError::UserCancelled => Code::Cancelled,
            ApiError::Host(_) => Code::Unknown,
            ApiError::Replayed(f) => Code::from_i32(f.grpc_code),
            ApiError::NotLoggedIn | ApiError::AuthCodeNull | ApiError::SessionExpired | ApiError::NoProfileValue(_) => {
                Code::FailedPrecondition
            }
            ApiError::ScopeDenied { .. } => Code::PermissionDenied,
            ApiError::InvalidParams(_) | ApiError::UnknownApi(_) => Code::InvalidArgument,
            ApiError::Exhausted(_) => Code::ResourceExhausted,
            ApiError::PaymentOutcomeUnknown(_) | ApiError::UserChanged => Code::Aborted,
            ApiError::AuthDeny => Code::PermissionDenied,
            ApiError::Superapp(_) => Code::Unavailable,
            ApiError::UnknownUser => Code::FailedPrecondition,
            ApiError::AuthCodeRefused(_) => Code::PermissionDenied,
            ApiError::HostProtocol(_) | ApiError::Internal(_) => Code::Internal,
        }
    }

    /// The WeChat-style errno: the host's code for host errors, the seed's -1001/-1002, else the
    /// daemon's own 1000-range number.
    pub fn errno(&self) -> i64 {
        match self {
            ApiError::Host(h) => h.code,
            ApiError::NotLoggedIn => -1001,
            ApiError::AuthCodeNull => -1002,
            ApiError::Internal(_) => 1000,
            ApiError::InvalidParams(_) => 1001,
            ApiError::UnknownApi(_) => 1002,
            ApiError::NotImplementedByHost(_) => 1003,
            ApiError::NoHost => 1004,
            ApiError::HostGone => 1005,
            ApiError::Timeout => 1006,
            ApiError::Cancelled(_) => 1007,
            ApiError::Exhausted(_) => 1008,
            ApiError::ScopeDenied { .. } => 1009,
            ApiError::AuthCodeNotImplemented => 1010,
            ApiError::SessionExpired => 1011,
            ApiError::HostProtocol(_) => 1012,
            ApiError::PaymentOutcomeUnknown(_) => 1013,
            ApiError::UserCancelled => 1014,
            ApiError::NoProfileValue(_) => 1015,
            ApiError::UserChanged => 1016,
            ApiError::AuthDeny => 1017,
            ApiError::Superapp(_) => 1019,
            ApiError::UnknownUser => 1020,
            ApiError::AuthCodeRefused(_) => 1021,
            ApiError::StoreUnavailable(_) => 1022,
            ApiError::PlatformUnavailable => 1018,
            ApiError::Replayed(f) => f.errno,
        }
    }

    /// A stable machine-readable name for the failure (logs, `ApiFailure.reason`).
    pub fn reason(&self) -> &'static str {
        match self {
            ApiError::NoHost => "no_host",
            ApiError::HostGone => "host_gone",
            ApiError::NotImplementedByHost(_) => "not_implemented_by_host",
            ApiError::Timeout => "timeout",
            ApiError::Cancelled(_) => "cancelled",
            ApiError::UserCancelled => "cancel",
            ApiError::Host(_) => "host_error",
            ApiError::NotLoggedIn => "not_logged_in",
            ApiError::AuthCodeNull => "auth_code_null",
            ApiError::ScopeDenied { .. } => "scope_denied",
            ApiError::AuthCodeNotImplemented => "auth_code_not_implemented",
            ApiError::SessionExpired => "session_expired",
            ApiError::InvalidParams(_) => "invalid_params",
            ApiError::UnknownApi(_) => "unknown_api",
            ApiError::Exhausted(_) => "resource_exhausted",
            ApiError::HostProtocol(_) => "host_protocol",
            ApiError::PaymentOutcomeUnknown(_) => "payment_outcome_unknown",
            ApiError::NoProfileValue(_) => "no_profile_value",
            ApiError::Replayed(_) => "replayed",
            ApiError::UserChanged => "user_changed",
            ApiError::AuthDeny => "auth_deny",
            ApiError::Superapp(_) => "superapp_unavailable",
            ApiError::UnknownUser => "unknown_user",
            ApiError::AuthCodeRefused(_) => "auth_code_refused",
            ApiError::StoreUnavailable(_) => "store_unavailable",
            ApiError::PlatformUnavailable => "platform_unavailable",
            ApiError::Internal(_) => "internal",
        }
    }

    /// The failure as the renderer sees it: `errMsg` is `"<api>:fail <reason>"`.
    pub fn to_failure(&self, api_name: &str) -> ApiFailure {
        if let ApiError::Replayed(first) = self {
            return (**first).clone();
        }
        ApiFailure {
            err_msg: format!("{api_name}:fail {self}"),
            errno: self.errno(),
            grpc_code: self.code() as i32,
            reason: self.reason().to_owned(),
            host_error: match self {
                ApiError::Host(h) => Some(h.clone()),
                _ => None,
            },
        }
    }

    /// [`ApiError::to_failure`] for a known API.
    pub fn failure(&self, api: Api) -> ApiFailure {
        self.to_failure(api.name())
    }
}

/// Errors from the store, mapped at the API boundary to [`ApiError::StoreUnavailable`] when the
/// store cannot write ([`StoreError::is_unwritable`]), else to [`ApiError::Internal`].
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("data dir: {0}")]
    Io(#[from] std::io::Error),
}

impl StoreError {
    /// Whether the store failed because it cannot write now (full, read-only, an I/O error):
    /// the machine's failure, not the call's; the call changed nothing and reads go on.
    pub fn is_unwritable(&self) -> bool {
        match self {
            StoreError::Sqlite(e) => miniapp_platform::store::sqlite::unwritable(e),
            StoreError::Io(_) => true,
        }
    }

    /// What a renderer is told about a store that cannot write (never a path).
    pub fn unwritable_reason(&self) -> String {
        match self {
            StoreError::Sqlite(e) => miniapp_platform::store::sqlite::unwritable_reason(e),
            StoreError::Io(io) => io.kind().to_string(),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        if e.is_unwritable() {
            ApiError::StoreUnavailable(e.unwritable_reason())
        } else {
            ApiError::Internal(e.to_string())
        }
    }
}

/// The platform's failures as a renderer sees them: the one mapping at the daemon's edge.
impl From<PlatformError> for ApiError {
    fn from(e: PlatformError) -> Self {
        match e {
            PlatformError::SessionExpired => ApiError::SessionExpired,
            PlatformError::Store(s) if s.is_unwritable() => ApiError::StoreUnavailable(match &s {
                miniapp_platform::StoreError::Sqlite(e) => miniapp_platform::store::sqlite::unwritable_reason(e),
                other => other.to_string(),
            }),
            PlatformError::Ledger(miniapp_platform::disclosures::LedgerError::Unwritable(reason)) => {
                ApiError::StoreUnavailable(reason)
            }
            PlatformError::Unavailable(_) | PlatformError::Store(miniapp_platform::StoreError::Unavailable(_)) => {
                ApiError::PlatformUnavailable
            }
            PlatformError::Store(_) | PlatformError::Ledger(_) => ApiError::Internal(e.to_string()),
            PlatformError::UserData(_) => ApiError::HostProtocol(e.to_string()),
            PlatformError::Superapp(_) => ApiError::Superapp(e.to_string()),
            PlatformError::UnknownUser => ApiError::UnknownUser,
            PlatformError::AuthCodeRefused(reason) => ApiError::AuthCodeRefused(reason),
        }
    }
}

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("another daemon is already listening on {0}")]
    AlreadyRunning(String),
    #[error("cannot listen on {path}: {source}")]
    Listen { path: String, source: std::io::Error },
    #[error("data dir {path}: {source}")]
    DataDir { path: String, source: std::io::Error },
    /// A directory the daemon would use is not its user's alone.
    #[error("{what} {path} {why}; refusing to use it")]
    UnsafeDir { what: &'static str, path: String, why: String },
    #[error("no data directory: set XDG_DATA_HOME or HOME, or pass --data-dir")]
    NoDataDir,
    /// Another daemon holds the data dir's lock.
    #[error("another daemon uses {0}")]
    DataDirLocked(String),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("platform: {0}")]
    Platform(#[from] PlatformError),
    #[error("config: {0}")]
    Config(String),
    /// The platform's key pair for superapp servers could not be read or made.
    #[error("platform key: {0}")]
    PlatformKey(#[from] crate::superapp::signing::KeyError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_cancel_reads_exactly_as_mini_programs_test_for_it() {
        let f = ApiError::UserCancelled.failure(Api::RequestPayment);
        assert_eq!(f.err_msg, "requestPayment:fail cancel");
        assert_eq!(f.grpc_code, Code::Cancelled as i32);
    }

    #[test]
    fn host_errors_keep_domain_code_and_message() {
        let h = HostError { domain: "TCMPPLoginErrorDomain".into(), code: -1001, message: "app not login".into() };
        let f = ApiError::Host(h.clone()).failure(Api::Login);
        assert_eq!(f.err_msg, "login:fail app not login");
        assert_eq!(f.errno, -1001);
        assert_eq!(f.host_error, Some(h));
    }

    #[test]
    fn not_implemented_names_the_method() {
        let f = ApiError::NotImplementedByHost(DelegateMethod::GetUserInfo).failure(Api::GetUserInfo);
        assert_eq!(f.err_msg, "getUserInfo:fail getUserInfo not implemented by host");
    }
}
