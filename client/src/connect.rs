//! Reaching the daemon: a tonic channel over an interprocess local socket, and the backoff that
//! reconnecting clients share.

use std::{io, time::Duration};

use hyper_util::rt::TokioIo;
use interprocess::local_socket::tokio::Stream as LocalStream;
use interprocess::local_socket::traits::tokio::Stream as _;
use tonic::transport::{Channel, Endpoint};
use tower::service_fn;

/// The daemon's default address, as the daemon computes it: `$XDG_RUNTIME_DIR/miniapp-broker/brokerd.sock`
/// on Unix (a per-user temp directory without a runtime dir), the pipe `miniapp-brokerd` on Windows.
pub fn default_address() -> String {
    #[cfg(unix)]
    {
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(std::path::PathBuf::from)
            .filter(|p| p.is_absolute())
            .unwrap_or_else(|| {
                // SAFETY: geteuid has no preconditions and cannot fail.
                std::env::temp_dir().join(format!("miniapp-broker-{}", unsafe { libc::geteuid() }))
            });
        base.join("miniapp-broker").join("brokerd.sock").display().to_string()
    }
    #[cfg(windows)]
    {
        "miniapp-brokerd".to_owned()
    }
}

/// Opens one local-socket connection to `address` (a socket path, or a pipe name on Windows).
pub async fn local_stream(address: &str) -> io::Result<LocalStream> {
    #[cfg(unix)]
    let name = {
        use interprocess::local_socket::{GenericFilePath, ToFsName};
        address.to_fs_name::<GenericFilePath>()?
    };
    #[cfg(windows)]
    let name = {
        use interprocess::local_socket::{GenericNamespaced, ToNsName};
        address.to_ns_name::<GenericNamespaced>()?
    };
    LocalStream::connect(name).await
}

fn endpoint() -> Endpoint {
    // The URI is never resolved: the connector below decides where bytes go.
    Endpoint::from_static("http://miniapp-broker.local")
        .http2_adaptive_window(false)
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(4 << 20)
}

/// A channel to the daemon at `address`, connected now (fails if no daemon listens there).
pub async fn channel(address: &str) -> Result<Channel, tonic::transport::Error> {
    let address = address.to_owned();
    endpoint()
        .connect_with_connector(service_fn(move |_| {
            let address = address.clone();
            async move { local_stream(&address).await.map(TokioIo::new) }
        }))
        .await
}

/// A channel that connects on first use and reconnects after the daemon restarts.
pub fn channel_lazy(address: &str) -> Channel {
    let address = address.to_owned();
    endpoint().connect_with_connector_lazy(service_fn(move |_| {
        let address = address.clone();
        async move { local_stream(&address).await.map(TokioIo::new) }
    }))
}

/// Exponential backoff with jitter: 20 ms doubling to 2 s.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: Duration::from_millis(20), max: Duration::from_secs(2) }
    }
}

impl Backoff {
    /// Waits the current delay (plus up to 50% jitter), then doubles it.
    pub async fn wait(&mut self) {
        let jitter = rand::random::<f64>() * 0.5;
        tokio::time::sleep(self.next.mul_f64(1.0 + jitter)).await;
        self.next = (self.next * 2).min(self.max);
    }

    pub fn reset(&mut self) {
        *self = Backoff::default();
    }
}
