//! Listeners and peer identity.
//!
//! The daemon listens on an interprocess local socket: a Unix domain socket (in a private 0700
//! directory, the socket itself 0600), or a named pipe on Windows, through one code path. Each
//! accepted connection carries its peer's credentials; on Unix a peer whose uid differs from the
//! daemon's is refused before it can send a byte of gRPC. A connection limit keeps a flood of
//! connections from exhausting the daemon, and a connection that proves nothing (no valid token
//! on any request, see `services::gate`) within `limits.auth_timeout_ms` is closed.

#[cfg(unix)]
mod unix;
#[cfg(windows)]
mod windows;

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use futures::Stream;
use interprocess::local_socket::{
    tokio::{Listener as LocalListener, Stream as LocalStream},
    traits::{StreamCommon, tokio::Listener as _},
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;
use tracing::{debug, warn};

use crate::{
    limits::{Pool, PoolUnit},
    registry::{AppInstance, ConnSlot},
};

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

/// What a connection has proven so far. Nothing, when accepted; a request that presents a valid
/// launch token, host token or app secret proves it, and may attach what the connection then
/// holds against its app's and instance's limits (released when the connection closes, or when
/// its instance does: [`ConnSlot`]). Shared between the
/// connection, which closes itself if nothing is proven in time, and its requests.
#[derive(Debug, Default)]
pub struct ConnAuth {
    proven: AtomicBool,
    holds: Mutex<Option<ConnSlot>>,
}

impl ConnAuth {
    pub fn is_proven(&self) -> bool {
        self.proven.load(Ordering::Acquire)
    }

    /// Marks the connection proven, holding `holds` until it closes. Returns false (and drops
    /// `holds`) if it already was.
    pub fn prove(&self, holds: Option<ConnSlot>) -> bool {
        let mut held = self.holds.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if self.proven.swap(true, Ordering::AcqRel) {
            return false;
        }
        *held = holds;
        true
    }

    /// The app instance the connection is attributed to, if any.
    pub fn instance(&self) -> Option<Arc<AppInstance>> {
        let held = self.holds.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        held.as_ref().map(|slot| slot.instance().clone())
    }
}

/// What each request of a connection learns about it (tonic puts it in the request extensions).
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub peer: PeerInfo,
    pub auth: Arc<ConnAuth>,
}

/// One accepted connection, counted against the connection limit until it closes.
pub struct Conn {
    io: LocalStream,
    peer: PeerInfo,
    auth: Arc<ConnAuth>,
    /// When the connection is closed unless a request proved it by then (`None` once proven).
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Its unit of the daemon's connections (`limits.max_connections`).
    _unit: PoolUnit,
}

impl Connected for Conn {
    type ConnectInfo = ConnInfo;
    fn connect_info(&self) -> ConnInfo {
        ConnInfo { peer: self.peer, auth: self.auth.clone() }
    }
}

impl AsyncRead for Conn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        // Checked before reading, so a peer that keeps sending cannot keep an unproven connection.
        // The server always has a read pending on a connection, so the timer's wake-up lands here.
        if let Some(deadline) = this.deadline.as_mut() {
            if this.auth.is_proven() {
                this.deadline = None;
            } else if deadline.as_mut().poll(cx).is_ready() {
                debug!(peer_pid = this.peer.pid, "connection closed: no valid token within limits.auth_timeout_ms");
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "no valid token presented in time")));
            }
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    // Forwarded, so that h2 writes a frame's header and its payload with one writev instead of
    // copying payloads up to 1 KiB into its own buffer (or writing larger ones separately).
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The accepted connections of `listener`, for tonic's `serve_with_incoming`. Peers of another uid
/// and connections beyond what `limit` (the daemon's `limits.max_connections`) has free are closed
/// at once and logged; accept errors are logged and retried, so the stream only ends when the
/// server stops polling it. Each connection must be proven within `auth_timeout` (see
/// [`ConnAuth`]) or it is closed.
pub fn incoming(listener: Listener, limit: Arc<Pool>, auth_timeout: Duration) -> impl Stream<Item = io::Result<Conn>> {
    futures::stream::unfold((listener, limit), move |(listener, limit)| async move {
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
            let Some(unit) = limit.try_acquire() else {
                warn!(peer_pid = peer.pid, "connection refused: connection limit reached");
                continue;
            };
            debug!(peer_pid = peer.pid, "connection accepted");
            let conn = Conn {
                io,
                peer,
                auth: Arc::default(),
                deadline: Some(Box::pin(tokio::time::sleep(auth_timeout))),
                _unit: unit,
            };
            return Some((Ok(conn), (listener, limit)));
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
