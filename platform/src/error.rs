//! The platform's own errors: what a renderer-side operation can fail with ([`PlatformError`],
//! mapped once to the embedder's answer, the daemon's `ApiError`) and what a store engine can fail
//! with ([`StoreError`]). Backend-side failures carry WeChat's errcode: [`crate::ExchangeFailure`].

/// Why a renderer-side platform operation (login, checkSession, a value code, a session listing,
/// registering an app) failed.
#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    /// wx.checkSession: the (app, uid) session is gone or expired.
    #[error("session expired")]
    SessionExpired,
    /// The platform's store could not read or write.
    #[error("platform store: {0}")]
    Store(#[from] StoreError),
    /// The disclosure ledger could not record a code, so the code is not issued.
    #[error("disclosure ledger: {0}")]
    Ledger(crate::disclosures::LedgerError),
    /// The host's userInfo could not be made into signed and encrypted user data.
    #[error("user data: {0}")]
    UserData(String),
    /// A remote platform is down, slow past the call's deadline, or refused the caller.
    #[error("platform unavailable: {0}")]
    Unavailable(String),
    /// The superapp's server, which vouches for the user, was slow, down, answered garbage or
    /// refused the call (docs/superapp-server.md): nothing was issued or recorded.
    #[error("superapp server: {0}")]
    Superapp(String),
    /// The superapp's server does not know the signed-in user (checkUser answered false).
    #[error("user unknown to the superapp server")]
    UnknownUser,
    /// The superapp's server refused the host's authCode, or it stands for another user than the
    /// one the host says is signed in: no code for either.
    #[error("authCode refused: {0}")]
    AuthCodeRefused(String),
}

/// Errors from a platform store engine.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("data dir: {0}")]
    Io(#[from] std::io::Error),
    /// Another engine's failure, in its own words.
    #[error("database: {0}")]
    Other(String),
    /// A shared engine's database is unreachable, or did not answer within the call's deadline.
    #[error("database unavailable: {0}")]
    Unavailable(String),
}

impl StoreError {
    /// Whether the engine failed because it cannot write now (full, read-only, an I/O error;
    /// [`crate::store::sqlite::unwritable`]), not because of the operation: it changed nothing.
    pub fn is_unwritable(&self) -> bool {
        match self {
            StoreError::Sqlite(e) => crate::store::sqlite::unwritable(e),
            StoreError::Io(_) => true,
            StoreError::Other(_) | StoreError::Unavailable(_) => false,
        }
    }
}

impl PlatformError {
    /// Whether the operation failed only because a store (the platform's or the ledger's) cannot
    /// write now: nothing was issued or stored.
    pub fn is_unwritable(&self) -> bool {
        match self {
            PlatformError::Store(e) => e.is_unwritable(),
            PlatformError::Ledger(e) => matches!(e, crate::disclosures::LedgerError::Unwritable(_)),
            _ => false,
        }
    }
}
