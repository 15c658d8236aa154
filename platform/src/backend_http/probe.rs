//! The backend HTTP API driven in-process with untrusted request parts, and the properties every
//! answer must have. It exists so that the fuzz target (`fuzz/fuzz_targets/backend_http.rs`) and
//! the property tests check one and the same thing, without sockets.
//!
//! The properties, for any method, path, query, headers and body: the answer comes (no panic);
//! its status is 200, 403 (a browser's request), 404 or 405; it is a JSON object whose `errcode`,
//! when present, is an integer; and a success (no `errcode`, or 0) is only ever given to a request
//! that carried the registered app's real secret (the input's `SECRET` marker stands for it).

use std::sync::Arc;

use axum::{body::Body, http::Request};
use http_body_util::BodyExt;
use serde_json::Value;

use super::Api;
use crate::{
    Platform, Surface,
    clock::ManualClock,
    config::EmbeddedConfig,
    disclosures::{CodeDisclosure, Disclosures},
    embedded::EmbeddedPlatform,
    store::sqlite::SqliteStore,
};

/// The paths a probe picks from (the selector's value modulo their count), unknown ones included.
pub const PATHS: [&str; 12] = [
    "/sns/jscode2session",
    "/cgi-bin/token",
    "/cgi-bin/stable_token",
    "/wxa/checksession",
    "/wxa/resetusersessionkey",
    "/wxa/business/getuserphonenumber",
    "/wxa/business/getuseremail",
    "/openserver/sns/jscode2session",
    "/openserver/cgi-bin/token",
    "/openserver/wxa/checksession",
    "/nothing",
    "/",
];

/// The registered app's id in every probe.
pub const APP_ID: &str = "wxprobe000000001";

/// An in-memory platform with one registered app and the API over it.
pub struct Probe {
    api: Api,
    secret: String,
    runtime: tokio::runtime::Runtime,
}

/// A ledger that records nothing but numbers the rows, as the codes need ids.
struct NoLedger;

impl Disclosures for NoLedger {
    fn issued(&self, rows: &[CodeDisclosure<'_>]) -> Result<Vec<u64>, crate::disclosures::LedgerError> {
        Ok((0..rows.len() as u64).collect())
    }
    fn withdrawn(&self, _: &[u64]) {}
    fn redeemed(&self, _: &[u64], _: Surface, _: u64) -> Result<(), crate::disclosures::LedgerError> {
        Ok(())
    }
}

impl Default for Probe {
    fn default() -> Self {
        Probe::new()
    }
}

impl Probe {
    pub fn new() -> Probe {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
        let (api, secret) = runtime.block_on(async {
            let store = Arc::new(SqliteStore::open(None, false).expect("an in-memory store"));
            let clock = ManualClock::new(1_767_225_600_000);
            let platform = EmbeddedPlatform::new(store, Arc::new(NoLedger), clock.clone(), EmbeddedConfig::default())
                .await
                .expect("a platform");
            let secret = platform.register_app(APP_ID, false).await.expect("registered").expect("a new secret");
            (Api::new(Arc::new(platform), clock), secret)
        });
        Probe { api, secret, runtime }
    }

    /// Sends one request and checks its answer against the properties (panics if one fails).
    /// `selector` picks the method (bit 0), a browser's header (bits 1-2: 1 `Origin`, 2
    /// `Sec-Fetch-Site: cross-site`, else none) and the path (the rest).
    pub fn check(&self, selector: u16, query: &str, body: &[u8]) {
        let post = selector & 1 == 1;
        let browser = (selector >> 1) & 3;
        let path = PATHS[(selector >> 3) as usize % PATHS.len()];
        let with_secret = query.contains("SECRET") || body.windows(6).any(|w| w == b"SECRET");
        let query = query.replace("SECRET", &self.secret);
        let body = String::from_utf8_lossy(body).replace("SECRET", &self.secret).into_bytes();
        let uri = if query.is_empty() { path.to_owned() } else { format!("{path}?{query}") };
        let mut request = Request::builder().method(if post { "POST" } else { "GET" }).uri(uri);
        request = match browser {
            1 => request.header("origin", "http://pages.example"),
            2 => request.header("sec-fetch-site", "cross-site"),
            _ => request,
        };
        // A URI that is not one (hyper would refuse it before any handler) is no probe.
        let Ok(request) = request.body(Body::from(body)) else { return };
        let (status, bytes) = self.runtime.block_on(async {
            let answer = self.api.answer(request).await;
            let status = answer.status().as_u16();
            let content_type = answer.headers().get("content-type").cloned();
            assert_eq!(
                content_type.as_ref().map(|v| v.as_bytes()),
                Some(&b"application/json; charset=utf-8"[..]),
                "every answer is JSON"
            );
            (status, answer.into_body().collect().await.expect("an answer's body").to_bytes())
        });
        let answer: Value = serde_json::from_slice(&bytes).expect("every answer is JSON");
        let fields = answer.as_object().expect("every answer is a JSON object");
        if matches!(browser, 1 | 2) {
            assert_eq!((status, fields.get("errcode")), (403, Some(&Value::from(48001))), "{answer}");
            return;
        }
        assert!(matches!(status, 200 | 404 | 405), "status {status}: {answer}");
        let errcode = fields.get("errcode").map(|e| e.as_i64().expect("an integer errcode"));
        if errcode.is_none_or(|e| e == 0) {
            assert!(with_secret, "a success without the secret: {answer}");
        }
    }
}
