//! Listeners and peer identity.
//!
//! The daemon listens on an interprocess local socket: a Unix domain socket (in a private 0700
//! directory, the socket itself 0600), or a named pipe on Windows, through one code path. Each
//! accepted connection carries its peer's credentials; on Unix a peer whose uid differs from the
//! daemon's is refused before it can send a byte of gRPC. A connection limit keeps a flood of
//! connections from exhausting the daemon.

#[cfg(unix)]
mod unix;
#[cfg(windows)]
mod windows;

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use futures::Stream;
use interprocess::local_socket::{
    tokio::{Listener as LocalListener, Stream as LocalStream},
    traits::{StreamCommon, tokio::Listener as _},
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tonic::transport::server::Connected;
use tracing::{debug, warn};

#[cfg(unix)]
pub use unix::{bind, create_owned_dir, create_private_dir, default_address, systemd_listener};
#[cfg(windows)]
pub use windows::{bind, create_owned_dir, create_private_dir, default_address, systemd_listener};

/// Who is on the other end of a connection, as the OS reports it.
#[derive(Debug, Clone, Copy, Default)]
pub struct PeerInfo {
    pub pid: Option<u32>,
    pub uid: Option<u32>,
}

/// A bound listener and the address clients use to reach it.
pub struct Listener {
    pub(crate) inner: LocalListener,
    /// The socket path (Unix) or pipe name (Windows).
    pub address: String,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener").field("address", &self.address).finish()
    }
}

/// One accepted connection, counted against the connection limit until it closes.
pub struct Conn {
    io: LocalStream,
    peer: PeerInfo,
    _permit: OwnedSemaphorePermit,
}

impl Connected for Conn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.peer
    }
}

impl AsyncRead for Conn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The accepted connections of `listener`, for tonic's `serve_with_incoming`. Peers of another uid
/// and connections beyond `max_connections` are closed at once and logged; accept errors are
/// logged and retried, so the stream only ends when the server stops polling it.
pub fn incoming(listener: Listener, max_connections: usize) -> impl Stream<Item = io::Result<Conn>> {
    let limit = Arc::new(Semaphore::new(max_connections));
    futures::stream::unfold((listener, limit), |(listener, limit)| async move {
        loop {
            let io = match listener.inner.accept().await {
                Ok(io) => io,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    // EMFILE and friends: give the system a moment instead of spinning.
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            };
            let peer = peer_info(&io);
            if let Err(reason) = allowed(&peer) {
                warn!(peer_uid = peer.uid, peer_pid = peer.pid, reason, "connection refused");
                continue;
            }
            let Ok(permit) = limit.clone().try_acquire_owned() else {
                warn!(peer_pid = peer.pid, "connection refused: connection limit reached");
                continue;
            };
            debug!(peer_pid = peer.pid, "connection accepted");
            return Some((Ok(Conn { io, peer, _permit: permit }), (listener, limit)));
        }
    })
}

fn peer_info(io: &LocalStream) -> PeerInfo {
    match io.peer_creds() {
        Ok(creds) => PeerInfo {
            pid: creds.pid().map(|p| p as u32),
            #[cfg(unix)]
            #[allow(clippy::unnecessary_cast)] // uid_t is u32 on Linux, not everywhere
            uid: creds.euid().map(|u| u as u32),
            #[cfg(not(unix))]
            uid: None,
        },
        Err(_) => PeerInfo::default(),
    }
}

/// Whether a peer may talk to the daemon at all (tokens decide what it may do).
fn allowed(peer: &PeerInfo) -> Result<(), &'static str> {
    #[cfg(unix)]
    {
        let own = unsafe { libc::geteuid() } as u32;
        match peer.uid {
            Some(uid) if uid == own => Ok(()),
            Some(_) => Err("peer runs as another user"),
            None => Err("peer credentials unavailable"),
        }
    }
    #[cfg(not(unix))]
    {
        // The pipe's security descriptor admits only the daemon's own user (see windows.rs).
        let _ = peer;
        Ok(())
    }
}
