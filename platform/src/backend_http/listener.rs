//! The backend listener's own bounds, so that no peer holds a slot for long whatever it sends or
//! leaves unread:
//! - at most `max_connections` connections at once (the next waits in the kernel's backlog until
//!   one closes);
//! - a request head must be complete within `header_timeout` of the connection waiting for it
//!   (hyper's header-read timeout: it runs from the connection's opening, or from its last
//!   answer, not from the first byte, so it also closes idle keep-alive connections);
//! - a connection on which no request starts (its head complete) and none is answered for
//!   `idle_timeout` is closed, however many bytes it trickles in (the deadline restarts at those
//!   two moments, not when a byte arrives): a body dripped after a complete head is bounded by it;
//! - an answer the peer does not take within `write_timeout` (a peer that pipelines requests and
//!   never reads) closes the connection: the deadline starts when a write cannot be taken whole
//!   and is cleared only when one is.
//!
//! HTTP/1.1 only: a peer opening with the HTTP/2 preface (h2c prior knowledge) is refused by
//! hyper's HTTP/1 parser and closed.

use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::OwnedSemaphorePermit,
    time::{Instant, Sleep},
};

use crate::config::HttpLimits;

/// When a connection last made progress (a request head complete, an answer given): shared by
/// the connection's stream (whose idle deadline it moves) and its service (which marks both).
#[derive(Debug)]
pub(super) struct Progress {
    opened: Instant,
    /// Milliseconds after `opened` of the last progress (0: none yet).
    progressed_ms: AtomicU64,
}

impl Progress {
    pub(super) fn new() -> Arc<Progress> {
        Arc::new(Progress { opened: Instant::now(), progressed_ms: AtomicU64::new(0) })
    }

    /// A request started, or was answered, now: the idle deadline starts again.
    pub(super) fn progressed(&self) {
        let ms = self.opened.elapsed().as_millis() as u64;
        self.progressed_ms.store(ms, Ordering::Relaxed);
    }

    fn last_progress(&self) -> Instant {
        self.opened + Duration::from_millis(self.progressed_ms.load(Ordering::Relaxed))
    }
}

/// One accepted connection with its deadlines (see the module docs): holds its listener slot
/// until dropped; reads fail once it made no progress for `idle`, writes once an answer waited
/// unread for `write_timeout`.
pub struct BoundedStream {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
    progress: Arc<Progress>,
    idle: Duration,
    idle_deadline: Pin<Box<Sleep>>,
    write_timeout: Duration,
    /// Running while a write could not be taken whole.
    write_deadline: Option<Pin<Box<Sleep>>>,
}

impl std::fmt::Debug for BoundedStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoundedStream").field("peer", &self.stream.peer_addr().ok()).finish_non_exhaustive()
    }
}

impl BoundedStream {
    pub(super) fn new(
        stream: TcpStream,
        permit: OwnedSemaphorePermit,
        limits: &HttpLimits,
        progress: Arc<Progress>,
    ) -> BoundedStream {
        let _ = stream.set_nodelay(true);
        let idle_deadline = Box::pin(tokio::time::sleep_until(progress.last_progress() + limits.idle_timeout));
        BoundedStream {
            stream,
            _permit: permit,
            progress,
            idle: limits.idle_timeout,
            idle_deadline,
            write_timeout: limits.write_timeout,
            write_deadline: None,
        }
    }

    /// The underlying TCP connection (its peer address, for a TLS layer's logs).
    pub fn tcp(&self) -> &TcpStream {
        &self.stream
    }
}

fn timed_out(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, what)
}

impl AsyncRead for BoundedStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(result) => Poll::Ready(result),
            Poll::Pending => {
                let deadline = this.progress.last_progress() + this.idle;
                if this.idle_deadline.deadline() != deadline {
                    this.idle_deadline.as_mut().reset(deadline);
                }
                match this.idle_deadline.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        Poll::Ready(Err(timed_out("no request started or answered within the idle timeout")))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl AsyncWrite for BoundedStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let timeout = this.write_timeout;
        match Pin::new(&mut this.stream).poll_write(cx, buf) {
            Poll::Ready(Ok(n)) if n == buf.len() => {
                this.write_deadline = None;
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Ok(n)) => {
                // Taken in part: the answer still waits; the deadline keeps running.
                this.write_deadline.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                let deadline = this.write_deadline.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                match deadline.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(timed_out("an answer waited unread past the write timeout"))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
