//! The daemon gRPC listener (`--daemon-listen`) and what one peer can make it hold:
//! - at most `max_connections` connections at once: the accept loop takes a slot before it
//!   accepts, so the next connection waits in the kernel's backlog until one closes;
//! - a connection must start its first call within `handshake_timeout` of being accepted (the
//!   TLS handshake, the HTTP/2 preface and a request's headers): one that stays silent, drips
//!   bytes or stalls its handshake is closed then. tonic itself never closes a connection that
//!   has not sent the HTTP/2 preface, and its TLS handshakes have no deadline unless given one;
//! - once a call started, HTTP/2 keepalive closes a peer that stops reading or answering pings
//!   (an interval, then a timeout), and every connection is asked to close (tonic's GOAWAY) at
//!   `max_connection_age` and closed by its stream `age_grace` later, so no peer, however well
//!   it speaks HTTP/2, keeps a slot for longer (one that neither finishes its calls nor answers
//!   the GOAWAY's ping would otherwise hold it for good); a daemon's channel reconnects on its
//!   next call.
//!   (tonic's own `max_connection_age_grace` would replace the GOAWAY by the forced close, not
//!   follow it, so the forced close is this module's.)
//! - a message is at most [`MAX_MESSAGE_BYTES`] (tonic's codec answers OUT_OF_RANGE past it), a
//!   call's headers at most hyper's 16 KiB, and a call lasts at most [`CALL_TIMEOUT`].

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use futures::Stream;
use miniapp_broker_proto::platform::v1::platform_server::PlatformServer;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Sleep,
};
use tokio_util::sync::CancellationToken;
use tonic::{
    codegen::{Service, http},
    transport::server::{Connected, TlsConnectInfo},
};
use tracing::{debug, warn};

use crate::{daemon_api::DaemonApi, tls};

/// The longest one call may take; past it the daemon hears DEADLINE_EXCEEDED.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest message a daemon may send: a `Redemptions` of 1,000 code ids is about 66 KB.
pub const MAX_MESSAGE_BYTES: usize = 128 * 1024;
/// Calls in flight on one connection; more wait for a slot.
const CALLS_PER_CONNECTION: usize = 256;
/// HTTP/2 keepalive: a ping after this much silence, and the connection closed if it is not
/// answered within [`KEEPALIVE_TIMEOUT`].
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the accept loop waits after a failed accept (out of descriptors, say).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The listener's bounds (`serve`'s `--daemon-*` flags).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    pub max_connection_age: Duration,
    /// How long a connection asked to close (its maximum age reached) has for its calls in
    /// progress before it is closed: longer than a call may take ([`CALL_TIMEOUT`]) by default.
    pub age_grace: Duration,
}

/// The daemon API on `listener` (over TLS with `tls`) within `limits`, served until `shutdown` by
/// the future returned; a TLS identity tonic cannot take is an error at once.
pub fn serve(
    listener: TcpListener,
    api: PlatformServer<DaemonApi>,
    tls: Option<&tls::Identity>,
    limits: Limits,
    shutdown: CancellationToken,
) -> Result<impl Future<Output = Result<(), tonic::transport::Error>> + use<>, tonic::transport::Error> {
    let mut builder = tonic::transport::Server::builder()
        .timeout(CALL_TIMEOUT)
        .concurrency_limit_per_connection(CALLS_PER_CONNECTION)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .max_connection_age(limits.max_connection_age);
    if let Some(identity) = tls {
        builder = builder.tls_config(identity.tonic())?;
    }
    let router =
        builder.layer(tower::layer::layer_fn(MarkCalls)).add_service(api.max_decoding_message_size(MAX_MESSAGE_BYTES));
    Ok(router.serve_with_incoming_shutdown(incoming(listener, limits), shutdown.cancelled_owned()))
}

/// Whether a connection has started a call: set by [`MarkCalls`] when one arrives, read by the
/// connection's [`Conn`], whose handshake deadline it ends.
#[derive(Debug, Default)]
struct Started(AtomicBool);

/// What each call learns about its connection (tonic puts it in the request's extensions, inside
/// a [`TlsConnectInfo`] over TLS).
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub remote: Option<SocketAddr>,
    started: Arc<Started>,
}

/// One accepted connection: holds its slot until dropped; its reads fail once the handshake
/// deadline passes with no call started, and once its age and the grace after it have passed.
pub struct Conn {
    stream: TcpStream,
    info: ConnInfo,
    /// Until a call starts (`None` after).
    handshake: Option<Pin<Box<Sleep>>>,
    /// When the connection is closed, however its calls stand.
    end_of_grace: Pin<Box<Sleep>>,
    _slot: OwnedSemaphorePermit,
}

impl Connected for Conn {
    type ConnectInfo = ConnInfo;
    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        // Checked before reading, so a peer that keeps dripping bytes cannot keep the connection.
        // The server always has a read pending (the TLS handshake's, then HTTP/2's), so the
        // timer's wake-up lands here.
        if let Some(deadline) = this.handshake.as_mut() {
            if this.info.started.0.load(Ordering::Acquire) {
                this.handshake = None;
            } else if deadline.as_mut().poll(cx).is_ready() {
                debug!(peer = ?this.info.remote, "daemon connection closed: no call within the handshake timeout");
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no call within the handshake timeout",
                )));
            }
        }
        if this.end_of_grace.as_mut().poll(cx).is_ready() {
            debug!(peer = ?this.info.remote, "daemon connection closed: its age and grace are over");
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "connection age and grace over")));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    // Forwarded, so that HTTP/2 writes a frame's header and payload with one writev.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The accepted connections of `listener`, for tonic's `serve_with_incoming`: a slot is taken
/// before each accept, so at most `limits.max_connections` are open and the rest wait in the
/// kernel's backlog. Accept errors are logged and retried: the stream ends only when the server
/// stops polling it.
fn incoming(listener: TcpListener, limits: Limits) -> impl Stream<Item = io::Result<Conn>> {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    futures::stream::unfold((listener, slots), move |(listener, slots)| async move {
        let slot = slots.clone().acquire_owned().await.expect("the semaphore is never closed");
        loop {
            match listener.accept().await {
                Ok((stream, remote)) => {
                    let _ = stream.set_nodelay(true);
                    let conn = Conn {
                        stream,
                        info: ConnInfo { remote: Some(remote), started: Arc::default() },
                        handshake: Some(Box::pin(tokio::time::sleep(limits.handshake_timeout))),
                        end_of_grace: Box::pin(tokio::time::sleep(limits.max_connection_age + limits.age_grace)),
                        _slot: slot,
                    };
                    return Some((Ok(conn), (listener, slots)));
                }
                Err(e) => {
                    warn!(error = %e, "daemon gRPC: accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            }
        }
    })
}

/// The layer that marks a connection as having started a call (see [`Conn`]).
#[derive(Debug, Clone)]
pub struct MarkCalls<S>(S);

impl<S, B> Service<http::Request<B>> for MarkCalls<S>
where
    S: Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let extensions = request.extensions();
        let info = extensions
            .get::<ConnInfo>()
            .or_else(|| extensions.get::<TlsConnectInfo<ConnInfo>>().map(TlsConnectInfo::get_ref));
        if let Some(info) = info {
            info.started.0.store(true, Ordering::Release);
        }
        self.0.call(request)
    }
}
