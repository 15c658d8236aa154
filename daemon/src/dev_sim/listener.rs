//! The simulator's loopback listener: it refuses any other address, and holds at most
//! [`MAX_CONNECTIONS`] connections at once (the next waits in the kernel's backlog until one
//! closes), since axum's server bounds neither.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};

use super::error::DevSimError;

/// Connections open at once (a browser opens about six per site).
pub const MAX_CONNECTIONS: usize = 32;

/// A bound loopback listener.
pub struct LoopbackListener {
    listener: TcpListener,
    permits: Arc<Semaphore>,
}

impl LoopbackListener {
    /// Binds `address`, which must be a loopback address (port 0: a free port).
    pub async fn bind(address: &str) -> Result<LoopbackListener, DevSimError> {
        let addr: SocketAddr = address
            .parse()
            .map_err(|_| DevSimError::Setup(format!("--listen {address:?} is not IP:PORT (e.g. 127.0.0.1:8089)")))?;
        if !addr.ip().is_loopback() {
            return Err(DevSimError::Setup(format!(
                "--listen {addr}: the simulator listens on a loopback address only (127.0.0.1 or [::1])"
            )));
        }
        let listener =
            TcpListener::bind(addr).await.map_err(|e| DevSimError::Setup(format!("--listen {addr}: {e}")))?;
        Ok(LoopbackListener { listener, permits: Arc::new(Semaphore::new(MAX_CONNECTIONS)) })
    }

    pub fn address(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

impl axum::serve::Listener for LoopbackListener {
    type Io = Counted;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let permit = self.permits.clone().acquire_owned().await.expect("the semaphore is never closed");
        let (stream, addr) = axum::serve::Listener::accept(&mut self.listener).await;
        let _ = stream.set_nodelay(true);
        (Counted { stream, _permit: permit }, addr)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

/// One accepted connection, holding its slot until dropped.
pub struct Counted {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl AsyncRead for Counted {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
