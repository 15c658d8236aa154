//! The platform's own settings. An embedder (the daemon, the platform service) maps its config
//! file and flags into these; the crate reads no config file.

use std::{collections::BTreeMap, time::Duration};

/// One app as the platform knows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppSettings {
    /// Apps in the same union group get the same `unionid` for a user.
    pub union_group: Option<String>,
    /// The backend secret provisioned from config (else registered at run time).
    pub secret: Option<String>,
}

/// What [`crate::embedded::EmbeddedPlatform`] is built with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbeddedConfig {
    pub apps: BTreeMap<String, AppSettings>,
    /// How long a one-time code may wait for its redemption.
    pub code_ttl_secs: u64,
    /// How long a login session lives.
    pub session_ttl_secs: u64,
    /// Outstanding codes per (app, uid); one more drops the oldest.
    pub max_codes_per_user: u32,
    /// A login keeps the session's key while the key is younger than this; 0: every login makes
    /// a new key.
    pub key_refresh_secs: u64,
    /// App backends' attempts per minute per app (both backend surfaces together).
    pub exchanges_per_minute_per_app: u32,
    /// Burst of attempts above that rate.
    pub exchange_burst_per_app: u32,
    /// Wrong secrets per minute, all apps (and unknown app ids) together; past them a wrong secret
    /// hears 45011 (the right one is still taken).
    pub failed_exchanges_per_minute: u32,
    /// Burst of wrong secrets above that rate.
    pub failed_exchange_burst: u32,
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        EmbeddedConfig {
            apps: BTreeMap::new(),
            code_ttl_secs: 300,
            session_ttl_secs: 7 * 24 * 3600,
            max_codes_per_user: 100,
            key_refresh_secs: 300,
            exchanges_per_minute_per_app: 600,
            exchange_burst_per_app: 100,
            failed_exchanges_per_minute: 600,
            failed_exchange_burst: 100,
        }
    }
}

/// The backend HTTP listener's bounds ([`crate::backend_http::serve`]): what one peer can make the
/// listener hold, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Connections open at once; more wait in the kernel's backlog.
    pub max_connections: usize,
    /// A connection that gets no answer for this long (since it opened, or since its last answer)
    /// is closed, however many bytes it trickles in meanwhile.
    pub idle_timeout: Duration,
    /// From the moment a connection waits for a request (opened, or its last answer given) to the
    /// end of that request's head; past it the connection is closed.
    pub header_timeout: Duration,
    /// How long an answer may wait for the peer to take it (a write the socket cannot take, or
    /// takes only in part); past it the connection is closed.
    pub write_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_connections: 256,
            idle_timeout: Duration::from_secs(30),
            header_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
        }
    }
}
