//! What every end-to-end test needs: a real daemon on a real socket in a temp dir, and real host
//! and renderer clients connected to it. Nothing here fakes the daemon.
#![allow(dead_code)]

use std::{future::Future, sync::Arc, time::Duration};

use miniapp_broker_client::{
    HostBuilder, HostClient, RendererClient,
    proto::v1::{ApiFailure, LaunchAppResponse, SignedInUser, UserProfile},
};
use miniapp_brokerd::{Config, ManualClock, Server};
use tempfile::TempDir;

/// The clock the tests start at (2026-01-01T00:00:00Z), moved by hand instead of sleeping.
pub const T0_MS: u64 = 1_767_225_600_000;

/// A daemon in memory on a socket in its own temp dir.
pub struct Daemon {
    pub server: Server,
    pub clock: Arc<ManualClock>,
    pub dir: TempDir,
}

impl Daemon {
    /// The defaults, in memory.
    pub async fn start() -> Daemon {
        Self::start_with(|_| {}).await
    }

    /// In memory, with `tweak` applied to the config first.
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Daemon {
        let dir = tempfile::Builder::new().prefix("brokerd-test").tempdir().expect("temp dir");
        let mut config = Config::ephemeral_in(dir.path());
        tweak(&mut config);
        Self::start_in(dir, config).await
    }

    /// On disk in `dir` (for restart tests), with `config` as given.
    pub async fn start_in(dir: TempDir, config: Config) -> Daemon {
        let clock = ManualClock::new(T0_MS);
        let server = miniapp_brokerd::start_with_clock(config, clock.clone()).await.expect("daemon starts");
        Daemon { server, clock, dir }
    }

    pub fn address(&self) -> String {
        self.server.address().to_owned()
    }

    pub fn token(&self) -> String {
        self.server.host_token().to_owned()
    }

    /// A host builder with the right address and token; add handlers, then `connect()`.
    pub fn host(&self) -> HostBuilder {
        HostBuilder::new(self.server.address(), self.server.host_token())
    }

    /// A renderer for the instance `launch_token` names, connected over its own channel.
    pub async fn renderer(&self, launch_token: &str) -> RendererClient {
        RendererClient::connect(self.server.address(), launch_token).await.expect("renderer connects")
    }

    /// Stops the daemon, keeping the temp dir (for restarts).
    pub async fn stop(self) -> TempDir {
        self.server.shutdown().await;
        self.dir
    }
}

/// A signed-in user with a full profile.
pub fn user(uid: &str) -> SignedInUser {
    SignedInUser {
        uid: uid.to_owned(),
        profile: Some(UserProfile {
            nick_name: format!("nick-{uid}"),
            avatar_url: format!("https://example.invalid/{uid}.png"),
            phone_number: format!("+86 138 {uid}"),
            email: format!("{uid}@example.invalid"),
        }),
    }
}

/// Launches `app_id` with `app_json` and panics on a refusal.
pub async fn launch(host: &HostClient, app_id: &str, app_json: &str) -> LaunchAppResponse {
    host.launch_app(app_id, app_json).await.expect("launch accepted")
}

/// Runs `f` with a bound: a test must fail, not hang, when the daemon never answers.
pub async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), f).await.unwrap_or_else(|_| panic!("{what}: no answer within 20s"))
}

/// Waits until `cond` holds, checking after each scheduler turn (bounded; for state the daemon
/// updates asynchronously, such as a host link noticing its stream ended).
pub async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    within(what, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
}

/// The daemon's errno values the tests name (docs/errors.md; `daemon/src/error.rs` is the source).
pub mod errno {
    pub const NO_HOST: i64 = 1004;
    pub const HOST_GONE: i64 = 1005;
    pub const TIMEOUT: i64 = 1006;
    pub const EXHAUSTED: i64 = 1008;
    pub const SESSION_EXPIRED: i64 = 1011;
    pub const OUTCOME_UNKNOWN: i64 = 1013;
    pub const USER_CANCEL: i64 = 1014;
    pub const USER_CHANGED: i64 = 1016;
    pub const AUTH_DENY: i64 = 1017;
}

/// Asserts a failure's errMsg, errno, gRPC code and reason, and that no host error rode along.
#[track_caller]
pub fn assert_failure(f: &ApiFailure, err_msg: &str, errno: i64, code: tonic::Code, reason: &str) {
    assert_eq!(f.err_msg, err_msg, "errMsg of {f:?}");
    assert_eq!(f.errno, errno, "errno of {f:?}");
    assert_eq!(f.code(), code, "gRPC code of {f:?}");
    assert_eq!(f.reason, reason, "reason of {f:?}");
    assert_eq!(f.host_error, None, "no host error in {f:?}");
}
