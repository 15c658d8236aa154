//! The backend HTTP API: the platform's server-side paths as WeChat (`api.weixin.qq.com`) and
//! TCMPP (`/openserver/...`) serve them, so a mini app's backend runs unchanged against the daemon
//! with only its base URL changed.
//!
//! A thin surface over the [`Platform`] trait, as the gRPC `Exchange` service is: the platform
//! authenticates (secret or access token), rate-limits per app, redeems and logs; this room parses
//! the query or JSON body, calls it, and shapes the answer ([`answer`]). axum routes, on the hyper
//! server tonic already brings. The daemon serves it when `[backend_http] listen` or
//! `serve --backend-listen` is set.

mod answer;
mod handlers;
mod listener;

use std::{net::SocketAddr, sync::Arc};

use axum::{Router, extract::DefaultBodyLimit, routing};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{Platform, clock::Clock, config::HttpLimits};

pub use answer::Flavor;
pub use listener::{BoundedListener, BoundedStream};

/// Largest request body taken (the JSON bodies here are a few dozen bytes).
pub const MAX_BODY_BYTES: usize = 16 * 1024;

/// What the handlers need: the platform, the clock (for phone watermarks), and which platform's
/// answer shape the path asked for.
#[derive(Clone)]
struct Shared {
    platform: Arc<dyn Platform>,
    clock: Arc<dyn Clock>,
    flavor: Flavor,
}

/// A bound, not yet serving, listener.
pub struct BackendListener {
    listener: listener::BoundedListener,
    pub address: SocketAddr,
}

impl BackendListener {
    /// The bounded listener, for an embedder that wraps its connections (TLS) before handing them
    /// to [`serve_with`].
    pub fn into_bounded(self) -> BoundedListener {
        self.listener
    }
}

impl std::fmt::Debug for BackendListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendListener").field("address", &self.address).finish_non_exhaustive()
    }
}

/// Binds `address` (port 0: a free port) with the listener's connection bounds.
pub async fn bind(address: SocketAddr, limits: HttpLimits) -> std::io::Result<BackendListener> {
    let listener = TcpListener::bind(address).await?;
    let address = listener.local_addr()?;
    let listener = listener::BoundedListener::new(listener, limits.max_connections, limits.idle_timeout);
    Ok(BackendListener { listener, address })
}

/// The routes: WeChat's paths, and TCMPP's (the operations TCMPP's OpenServer has) under
/// `/openserver`, answered in TCMPP's shape.
fn router(platform: Arc<dyn Platform>, clock: Arc<dyn Clock>) -> Router {
    use handlers::*;
    let tcmpp = Router::new()
        .route("/sns/jscode2session", routing::get(jscode2session))
        .route("/cgi-bin/token", routing::get(token))
        .route("/wxa/checksession", routing::get(checksession))
        .with_state(Shared { platform: platform.clone(), clock: clock.clone(), flavor: Flavor::Tcmpp });
    Router::new()
        .route("/sns/jscode2session", routing::get(jscode2session))
        .route("/cgi-bin/token", routing::get(token))
        .route("/cgi-bin/stable_token", routing::post(stable_token))
        .route("/wxa/checksession", routing::get(checksession))
        .route("/wxa/resetusersessionkey", routing::get(resetusersessionkey))
        .route("/wxa/business/getuserphonenumber", routing::post(getuserphonenumber))
        .route("/wxa/business/getuseremail", routing::post(getuseremail))
        .with_state(Shared { platform, clock, flavor: Flavor::WeChat })
        .nest("/openserver", tcmpp)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
}

/// Serves until `shutdown` is cancelled, then lets requests in progress finish.
pub async fn serve(
    listener: BackendListener,
    platform: Arc<dyn Platform>,
    clock: Arc<dyn Clock>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    serve_with(listener.listener, platform, clock, Router::new(), shutdown).await
}

/// [`serve`], for an embedder that adds to it: `listener` is the bound listener's
/// ([`BackendListener::into_bounded`]), possibly wrapped (a platform service's TLS), and `extra`
/// routes are served beside the API's (a service's health probes; they must not shadow its paths).
pub async fn serve_with<L>(
    listener: L,
    platform: Arc<dyn Platform>,
    clock: Arc<dyn Clock>,
    extra: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    axum::serve(listener, router(platform, clock).merge(extra)).with_graceful_shutdown(shutdown.cancelled_owned()).await
}
