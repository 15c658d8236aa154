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
    let stream = LocalStream::connect(name).await?;
    check_server_owner(address, &stream)?;
    Ok(stream)
}

/// The server at an address runs as another user than this process: nothing was sent to it.
/// Every connection the library makes checks this before a byte goes out, so no launch token, host
/// token or secret reaches a process that squats the daemon's address.
#[derive(Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the server at {address} runs as uid {server_uid}, not as this user (uid {own_uid}); refusing to send it anything"
)]
pub struct ForeignServer {
    pub address: String,
    pub server_uid: u32,
    pub own_uid: u32,
}

impl std::fmt::Debug for ForeignServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// The [`ForeignServer`] refusal somewhere in `error`'s chain of sources, if that is why it failed.
pub fn foreign_server<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a ForeignServer> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<ForeignServer>() {
            return Some(found);
        }
        if let Some(found) =
            e.downcast_ref::<io::Error>().and_then(|io| io.get_ref()).and_then(|inner| inner.downcast_ref())
        {
            return Some(found);
        }
        current = e.source();
    }
    None
}

/// Unix: the peer's effective uid (SO_PEERCRED, getpeereid) must be this process's. Windows: the
/// daemon's pipe admits only its own user, but a client does not check who created the pipe (see
/// docs/windows.md).
#[cfg(unix)]
fn check_server_owner(address: &str, stream: &LocalStream) -> io::Result<()> {
    use interprocess::local_socket::traits::StreamCommon as _;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let own_uid = unsafe { libc::geteuid() } as u32;
    #[allow(clippy::unnecessary_cast)] // uid_t is u32 on Linux, not everywhere
    let server_uid = stream.peer_creds()?.euid().map(|u| u as u32).ok_or_else(|| {
        io::Error::new(io::ErrorKind::PermissionDenied, format!("cannot tell which user runs the server at {address}"))
    })?;
    if server_uid == own_uid {
        return Ok(());
    }
    Err(io::Error::new(
        io::ErrorKind::PermissionDenied,
        ForeignServer { address: address.to_owned(), server_uid, own_uid },
    ))
}

#[cfg(not(unix))]
fn check_server_owner(_address: &str, _stream: &LocalStream) -> io::Result<()> {
    Ok(())
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
