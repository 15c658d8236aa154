//! The backend HTTP API: the platform's server-side paths as WeChat (`api.weixin.qq.com`) and
//! TCMPP (`/openserver/...`) serve them, so a mini app's backend runs unchanged against the daemon
//! with only its base URL changed.
//!
//! A thin surface over the [`Platform`] trait, as the gRPC `Exchange` service is: the platform
//! authenticates (secret or access token), rate-limits per app, redeems and logs; this room parses
//! the query or JSON body, calls it, and shapes the answer ([`answer`]). axum routes, served by
//! this module's own accept loop over hyper's HTTP/1.1 server ([`serve`]), which bounds what a
//! slow or hostile peer can hold ([`listener`]). The daemon serves it when `[backend_http] listen`
//! or `serve --backend-listen` is set.

mod answer;
mod handlers;
mod listener;
pub mod probe;

use std::{sync::Arc, time::Duration};

use axum::{Router, body::Body, extract::DefaultBodyLimit, http::Request, response::Response, routing};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower::ServiceExt;
use tracing::{debug, warn};

use crate::{Platform, clock::Clock, config::HttpLimits};

pub use answer::Flavor;
pub use listener::BoundedStream;

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

/// The API as one request-to-answer function: what the accept loop calls for every request, and
/// what the fuzz target and the property tests drive without a socket.
#[derive(Clone)]
pub struct Api {
    router: Router,
}

impl Api {
    pub fn new(platform: Arc<dyn Platform>, clock: Arc<dyn Clock>) -> Api {
        Api { router: router(platform, clock) }
    }

    /// The API with an embedder's own routes beside it (a platform service's `/healthz` and
    /// `/readyz`); they must not shadow the API's paths.
    pub fn with_routes(self, extra: Router) -> Api {
        Api { router: self.router.merge(extra) }
    }

    /// The answer to one request: a browser's refused, else routed to its endpoint.
    pub async fn answer(&self, request: Request<Body>) -> Response {
        match browser_request(request.headers()) {
            Some(refusal) => refusal,
            None => self.router.clone().oneshot(request).await.unwrap_or_else(|never| match never {}),
        }
    }
}

/// Serves `listener` (plain HTTP/1.1) until `shutdown` is cancelled, within `limits` (see
/// [`listener`]'s bounds); then stops accepting, lets requests in progress finish and returns once
/// every connection has closed.
pub async fn serve(
    listener: TcpListener,
    platform: Arc<dyn Platform>,
    clock: Arc<dyn Clock>,
    limits: HttpLimits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    serve_with(listener, Api::new(platform, clock), limits, shutdown, |stream| std::future::ready(Ok(stream))).await
}

/// [`serve`] for an embedder: `api` may carry routes of its own ([`Api::with_routes`]), and each
/// accepted connection is first passed through `handshake` (a TLS acceptor, say), which must end
/// within `limits.header_timeout`; the connection's deadlines ([`BoundedStream`]) apply to the
/// bytes under it.
pub async fn serve_with<H, F, Io>(
    listener: TcpListener,
    api: Api,
    limits: HttpLimits,
    shutdown: CancellationToken,
    handshake: H,
) -> std::io::Result<()>
where
    H: Fn(BoundedStream) -> F + Clone + Send + 'static,
    F: Future<Output = std::io::Result<Io>> + Send + 'static,
    Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let connections = TaskTracker::new();
    loop {
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            permit = slots.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        let stream = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors, say: back off a little rather than spin.
                    warn!(error = %e, "backend HTTP: accept failed");
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                    }
                }
            },
        };
        let progress = listener::Progress::new();
        let stream = BoundedStream::new(stream, permit, &limits, progress.clone());
        let (api, shutdown, handshake) = (api.clone(), shutdown.clone(), handshake.clone());
        connections.spawn(async move {
            let io = match tokio::time::timeout(limits.header_timeout, handshake(stream)).await {
                Ok(Ok(io)) => io,
                Ok(Err(e)) => return debug!(error = %e, "backend HTTP: handshake failed"),
                Err(_) => return debug!("backend HTTP: handshake timed out"),
            };
            serve_connection(io, api, progress, limits, shutdown).await;
        });
    }
    connections.close();
    connections.wait().await;
    Ok(())
}

/// How long the accept loop waits after a failed accept.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// One connection, HTTP/1.1 only, until it closes (or, after `shutdown`, once its request in
/// progress is answered).
async fn serve_connection<Io>(
    io: Io,
    api: Api,
    progress: Arc<listener::Progress>,
    limits: HttpLimits,
    shutdown: CancellationToken,
) where
    Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let (api, progress) = (api.clone(), progress.clone());
        async move {
            progress.progressed();
            let answer = api.answer(request.map(Body::new)).await;
            progress.progressed();
            Ok::<_, std::convert::Infallible>(answer)
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout);
    let connection = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);
    let outcome = tokio::select! {
        outcome = connection.as_mut() => outcome,
        () = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.as_mut().await
        }
    };
    if let Err(e) = outcome {
        debug!(error = %e, "backend HTTP: connection closed");
    }
}

/// The refusal of a request a web browser made (its fetch metadata says so): a page the user
/// visits must not reach the API through the user's browser (`<img src=http://127.0.0.1:…>`).
/// Backends' HTTP libraries send neither header; a browser sends `Sec-Fetch-Site: none` only for
/// what the user typed or bookmarked, which is let through.
fn browser_request(headers: &axum::http::HeaderMap) -> Option<Response> {
    let cross = match headers.get("sec-fetch-site") {
        Some(site) => site.as_bytes() != b"none",
        None => false,
    };
    if !cross && !headers.contains_key(axum::http::header::ORIGIN) {
        return None;
    }
    let body = serde_json::json!({
        "errcode": BROWSER_REFUSED,
        "errmsg": "api unauthorized: requests from web pages (an Origin or Sec-Fetch-Site header) are refused; \
                   call this API from the app's backend",
    });
    let mut answer = answer::json_response(axum::http::StatusCode::FORBIDDEN, body);
    answer.headers_mut().insert(axum::http::header::CONNECTION, axum::http::HeaderValue::from_static("close"));
    Some(answer)
}

/// WeChat's "api unauthorized", for a request a browser made.
pub const BROWSER_REFUSED: i32 = 48001;

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::probe::{APP_ID, Probe};

    /// A query: pairs of the endpoints' own keys (and others) with any values, or any text.
    fn query() -> impl Strategy<Value = String> {
        let key = prop_oneof![
            Just("appid".to_owned()),
            Just("secret".to_owned()),
            Just("grant_type".to_owned()),
            Just("js_code".to_owned()),
            Just("access_token".to_owned()),
            Just("openid".to_owned()),
            Just("signature".to_owned()),
            Just("sig_method".to_owned()),
            "[ -~]{0,8}",
        ];
        let value = prop_oneof![
            Just(APP_ID.to_owned()),
            Just("SECRET".to_owned()),
            Just("client_credential".to_owned()),
            Just("authorization_code".to_owned()),
            Just("hmac_sha256".to_owned()),
            "[ -~]{0,24}",
            "%[0-9A-Fa-f]{2}(%[0-9A-Fa-f]{2}){0,6}",
        ];
        let either = |right: &'static str| prop_oneof![3 => Just(right.to_owned()), 1 => "[ -~]{0,12}"];
        // Every endpoint's parameters at once, each mostly right: reaches past the checks.
        let whole = (
            prop_oneof![Just("client_credential".to_owned()), Just("authorization_code".to_owned()), "[ -~]{0,12}"],
            either(APP_ID),
            either("SECRET"),
            "[ -~]{0,16}",
            either("hmac_sha256"),
        )
            .prop_map(|(grant, appid, secret, code, sig)| {
                let tail = format!("js_code={code}&openid=o&signature={code}&sig_method={sig}");
                format!("grant_type={grant}&appid={appid}&secret={secret}&{tail}")
            });
        let pairs = proptest::collection::vec((key, value), 0..6)
            .prop_map(|pairs| pairs.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&"));
        prop_oneof![
            3 => whole,
            2 => pairs,
            1 => "[ -~]{0,64}",
        ]
    }

    /// A body: JSON objects of the endpoints' own keys, other JSON, or any bytes.
    fn body() -> impl Strategy<Value = Vec<u8>> {
        let json = (
            proptest::option::of(prop_oneof![Just("client_credential".to_owned()), "[ -~]{0,12}"]),
            proptest::option::of(prop_oneof![Just(APP_ID.to_owned()), "[ -~]{0,12}"]),
            proptest::option::of(prop_oneof![Just("SECRET".to_owned()), "[ -~]{0,12}"]),
            proptest::option::of(any::<bool>()),
            proptest::option::of("[ -~]{0,24}"),
        )
            .prop_map(|(grant, appid, secret, force, code)| {
                let mut o = serde_json::Map::new();
                let mut put = |k: &str, v: Option<serde_json::Value>| {
                    if let Some(v) = v {
                        o.insert(k.to_owned(), v);
                    }
                };
                put("grant_type", grant.map(Into::into));
                put("appid", appid.map(Into::into));
                put("secret", secret.map(Into::into));
                put("force_refresh", force.map(Into::into));
                put("code", code.map(Into::into));
                serde_json::Value::Object(o).to_string().into_bytes()
            });
        prop_oneof![json, "[ -~]{0,64}".prop_map(String::into_bytes), proptest::collection::vec(any::<u8>(), 0..256)]
    }

    proptest! {
        /// The fuzz target's property (see [`super::probe`]) over structured inputs.
        #[test]
        fn every_request_gets_a_json_answer_and_only_the_secret_succeeds(
            selector in any::<u16>(),
            query in query(),
            body in body(),
        ) {
            thread_local!(static PROBE: Probe = Probe::new());
            PROBE.with(|probe| probe.check(selector, &query, &body));
        }
    }
}
