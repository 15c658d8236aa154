//! The daemon the simulator drives: a running one (found at the configured socket), or one of its
//! own, in memory on a temporary socket, when none answers there.

use std::time::Duration;

use super::error::DevSimError;
use crate::{Config, Server};

/// How long a person may take to answer a prompt in the panel, in the simulator's own daemon
/// (`host.call_timeout_ms`): minutes, not the seconds a program answers in.
pub const OWN_CALL_TIMEOUT_MS: u64 = 300_000;

/// The simulator's own daemon and the directory its socket and token live in.
pub struct OwnDaemon {
    pub server: Server,
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for OwnDaemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnDaemon").field("address", &self.server.address()).finish_non_exhaustive()
    }
}

/// Starts a daemon in memory (sessions, grants and the ledger last as long as the simulator)
/// with the backend HTTP API on `backend_listen` if given.
pub async fn start_own(backend_listen: Option<String>) -> Result<OwnDaemon, DevSimError> {
    let dir = tempfile::Builder::new()
        .prefix("miniapp-broker-dev-sim")
        .tempdir()
        .map_err(|e| DevSimError::Setup(format!("cannot make a temporary directory: {e}")))?;
    let mut config = Config::ephemeral_in(dir.path());
    config.host.call_timeout_ms = OWN_CALL_TIMEOUT_MS;
    config.backend_http.listen = backend_listen;
    let server = crate::start(config).await.map_err(|e| DevSimError::Setup(format!("cannot start a daemon: {e}")))?;
    Ok(OwnDaemon { server, _dir: dir })
}

impl OwnDaemon {
    /// Stops the daemon, as `serve` does on SIGTERM.
    pub async fn stop(self) {
        tokio::time::timeout(Duration::from_secs(10), self.server.shutdown()).await.ok();
    }
}
