//! The simulator's safety layer, in front of every route. The server drives a real daemon with
//! a real host token, so a page of another site open in the same browser must not be able to use
//! it: every request must name the simulator's own address in `Host` (a DNS-rebound name does
//! not), every `/api/` request must be a POST whose `Origin` is the simulator's own (the mini
//! app's sandboxed frame has the opaque origin `null`, so it cannot call the API either; it talks
//! to the panel by `postMessage`), and every answer carries a strict Content-Security-Policy.

use std::sync::Arc;

use axum::{
    extract::{Request, State},
    http::{HeaderMap, HeaderValue, Method, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use tokio::sync::Semaphore;

use super::error::DevSimError;

/// Requests served at once; one more is answered 503 at once.
pub const MAX_REQUESTS: usize = 64;

/// The panel: its own scripts, styles and frames only; it talks to its own server only.
pub const PANEL_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
     connect-src 'self'; frame-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";
/// The mini app's page: sandboxed even when opened on its own, no network (it has `wx`), only
/// the files of its own app (no inline scripts), framed by the panel only.
pub const APP_CSP: &str = "sandbox allow-scripts allow-forms allow-modals; default-src 'self'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'none'; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'self'";

/// What a request must match.
#[derive(Debug, Clone)]
pub struct Guard {
    /// `127.0.0.1:PORT`, as the printed URL names it.
    host: String,
    /// `http://127.0.0.1:PORT`.
    origin: String,
    permits: Arc<Semaphore>,
}

impl Guard {
    pub fn new(address: std::net::SocketAddr) -> Guard {
        Guard {
            host: address.to_string(),
            origin: format!("http://{address}"),
            permits: Arc::new(Semaphore::new(MAX_REQUESTS)),
        }
    }

    /// Why `request` is refused, if it is.
    pub fn check(&self, method: &Method, path: &str, headers: &HeaderMap) -> Result<(), DevSimError> {
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
        if host != self.host {
            return Err(DevSimError::Forbidden(format!("Host {host:?} is not this simulator's {:?}", self.host)));
        }
        if path.starts_with("/api/") {
            if method != Method::POST {
                return Err(DevSimError::Forbidden("the API takes POST only".into()));
            }
            let origin = headers.get(header::ORIGIN).and_then(|h| h.to_str().ok()).unwrap_or("");
            if origin != self.origin {
                return Err(DevSimError::Forbidden(format!(
                    "Origin {origin:?} is not this simulator's page ({})",
                    self.origin
                )));
            }
            // Browsers that send Fetch Metadata say where the request came from, too.
            if let Some(site) = headers.get("sec-fetch-site").and_then(|h| h.to_str().ok())
                && site != "same-origin"
            {
                return Err(DevSimError::Forbidden(format!("a {site} request")));
            }
        } else if method != Method::GET && method != Method::HEAD {
            return Err(DevSimError::Forbidden("pages take GET only".into()));
        }
        Ok(())
    }
}

/// The middleware: refuses what [`Guard::check`] refuses, bounds requests in flight, and sets the
/// security headers on every answer.
pub async fn guard(State(guard): State<Guard>, request: Request, next: Next) -> Response {
    let path = request.uri().path().to_owned();
    if let Err(refused) = guard.check(request.method(), &path, request.headers()) {
        tracing::warn!(path = %path, reason = %refused, "dev-sim: request refused");
        return with_headers(refused.into_response(), &path);
    }
    let Ok(_permit) = guard.permits.clone().try_acquire_owned() else {
        return with_headers(DevSimError::Busy(MAX_REQUESTS).into_response(), &path);
    };
    with_headers(next.run(request).await, &path)
}

fn with_headers(mut response: Response, path: &str) -> Response {
    let csp = if path.starts_with("/app/") { APP_CSP } else { PANEL_CSP };
    let h = response.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(csp));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if !path.starts_with("/app/") && path != "/sim/bridge.js" {
        // Another site may not even embed the panel's resources. (The app's files are loaded by
        // the sandboxed frame, whose origin is opaque, so they cannot carry this.)
        h.insert("cross-origin-resource-policy", HeaderValue::from_static("same-origin"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn only_the_simulators_own_page_may_call_the_api() {
        let g = Guard::new("127.0.0.1:4000".parse().unwrap());
        let own = [("host", "127.0.0.1:4000"), ("origin", "http://127.0.0.1:4000")];
        assert!(g.check(&Method::POST, "/api/state", &headers(&own)).is_ok());
        let refused = [
            (Method::POST, vec![("host", "127.0.0.1:4000"), ("origin", "http://evil.example")]),
            (Method::POST, vec![("host", "127.0.0.1:4000"), ("origin", "null")]),
            (Method::POST, vec![("host", "127.0.0.1:4000")]),
            (Method::POST, vec![("host", "evil.example:4000"), ("origin", "http://evil.example:4000")]),
            (Method::GET, own.to_vec()),
            (
                Method::POST,
                vec![("host", "127.0.0.1:4000"), ("origin", "http://127.0.0.1:4000"), ("sec-fetch-site", "cross-site")],
            ),
        ];
        for (method, h) in refused {
            assert!(
                matches!(g.check(&method, "/api/invoke", &headers(&h)), Err(DevSimError::Forbidden(_))),
                "{method} {h:?}"
            );
        }
        assert!(g.check(&Method::GET, "/", &headers(&[("host", "127.0.0.1:4000")])).is_ok());
        assert!(g.check(&Method::GET, "/", &headers(&[("host", "localhost.evil:4000")])).is_err());
        assert!(g.check(&Method::POST, "/", &headers(&own)).is_err());
    }
}
