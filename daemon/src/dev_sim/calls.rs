//! The bridge's daemon side and the call log. The panel posts each `wx` call of the mini app
//! frame with the launch token it holds; this calls the daemon's JSON bridge (`OpenApi.Invoke`,
//! through the Rust client) with that token, exactly as a renderer process would, and records the
//! call: API, version, route (answered by the daemon's default or by the host), params, answer,
//! latency.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use miniapp_broker_client::{RendererClient, proto::v1::AppInfo, renderer::new_payment_key};
use serde::Serialize;
use serde_json::{Value, json};

use super::changes::Changes;

/// Calls the log keeps (the oldest go first).
pub const MAX_LOG: usize = 200;
/// Renderer connections kept (one per launch token seen; the oldest is closed first).
pub const MAX_RENDERERS: usize = 4;

/// One call as the log shows it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LogEntry {
    pub id: u64,
    pub api: String,
    pub version: String,
    /// "default" (the daemon answered) or "host" (delegated to the host).
    pub route: &'static str,
    /// Host methods asked along the way (`getAuthCode` for a v3 default).
    pub asked: Vec<String>,
    pub params: Value,
    pub ok: bool,
    pub answer: Value,
    pub latency_ms: f64,
    pub at_ms: u64,
}

/// A call still waiting for its answer, and what the host saw of it so far.
#[derive(Debug)]
struct InFlight {
    instance_id: String,
    api: String,
    delegated: bool,
    asked: Vec<String>,
    version: String,
}

/// The log, the calls in flight, and the renderer connections by launch token.
pub struct Calls {
    daemon: String,
    log: Mutex<VecDeque<LogEntry>>,
    in_flight: Mutex<HashMap<u64, InFlight>>,
    renderers: Mutex<VecDeque<(String, RendererClient)>>,
    next: AtomicU64,
    changes: Changes,
}

impl std::fmt::Debug for Calls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Calls").field("daemon", &self.daemon).finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Calls {
    pub fn new(daemon: &str, changes: Changes) -> Arc<Calls> {
        Arc::new(Calls {
            daemon: daemon.to_owned(),
            log: Mutex::new(VecDeque::new()),
            in_flight: Mutex::new(HashMap::new()),
            renderers: Mutex::new(VecDeque::new()),
            next: AtomicU64::new(1),
            changes,
        })
    }

    /// The log, oldest first.
    pub fn log(&self) -> Vec<LogEntry> {
        lock(&self.log).iter().cloned().collect()
    }

    /// The host saw a delegate call `what` for `app` (the dev-host's observer): the calls of that
    /// instance waiting on it are routed to the host, or asked it something along the way.
    pub fn observe(&self, app: &AppInfo, what: &str) {
        for call in lock(&self.in_flight).values_mut().filter(|c| c.instance_id == app.instance_id) {
            if what == call.api {
                call.delegated = true;
            } else if what.ends_with(&format!("({})", call.api)) || what == "openApiVersion" {
                call.asked.push(what.split('(').next().unwrap_or(what).to_owned());
            }
            if !app.api_version.is_empty() {
                call.version = app.api_version.clone();
            }
        }
    }

    fn renderer(&self, token: &str) -> RendererClient {
        let mut renderers = lock(&self.renderers);
        if let Some((_, r)) = renderers.iter().find(|(t, _)| t == token) {
            return r.clone();
        }
        let r = RendererClient::connect_lazy(&self.daemon, token);
        if renderers.len() >= MAX_RENDERERS {
            renderers.pop_front();
        }
        renderers.push_back((token.to_owned(), r.clone()));
        r
    }

    /// Calls `api` with `params` as the renderer holding `token`; `(ok, result)` as `wx` takes it,
    /// and the call's log id. `instance` and `version` are what the simulator knows of the
    /// token's app instance.
    pub async fn invoke(
        &self,
        token: &str,
        instance: &str,
        version: &str,
        api: &str,
        mut params: Value,
    ) -> (bool, Value, u64) {
        // As the client libraries do: one idempotency key per logical payment.
        if matches!(api, "requestPayment" | "requestMidasPaymentGameItem")
            && let Value::Object(map) = &mut params
            && !map.contains_key("idempotencyKey")
        {
            map.insert("idempotencyKey".into(), json!(new_payment_key()));
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        lock(&self.in_flight).insert(
            id,
            InFlight {
                instance_id: instance.to_owned(),
                api: api.to_owned(),
                delegated: false,
                asked: Vec::new(),
                version: version.to_owned(),
            },
        );
        // The call leaves the in-flight table however it ends (a panel request dropped midway too).
        struct Done<'a>(&'a Calls, u64);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                lock(&self.0.in_flight).remove(&self.1);
            }
        }
        let done = Done(self, id);
        let started = Instant::now();
        let renderer = self.renderer(token);
        let (ok, answer) = match renderer.invoke_json(api, &params).await {
            Ok(v) => (true, v),
            Err(v) => (false, v),
        };
        let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
        let call = lock(&self.in_flight).remove(&id);
        drop(done);
        let (route, asked, version) = match call {
            Some(c) => (if c.delegated { "host" } else { "default" }, c.asked, c.version),
            None => ("default", Vec::new(), version.to_owned()),
        };
        let at_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        let entry = LogEntry {
            id,
            api: api.to_owned(),
            version,
            route,
            asked,
            params,
            ok,
            answer: answer.clone(),
            latency_ms,
            at_ms,
        };
        {
            let mut log = lock(&self.log);
            if log.len() >= MAX_LOG {
                log.pop_front();
            }
            log.push_back(entry);
        }
        self.changes.bump();
        (ok, answer, id)
    }

    /// Fills in the version of logged call `id` when it was not known as it ran (the daemon
    /// resolved it on this very call, from the host or its default).
    pub fn learned_version(&self, id: u64, version: &str) {
        if let Some(entry) = lock(&self.log).iter_mut().find(|e| e.id == id && e.version.is_empty()) {
            entry.version = version.to_owned();
            self.changes.bump();
        }
    }

    /// Drops the connections of launch tokens other than `keep_token` (a relaunch killed them).
    pub fn forget_renderers(&self, keep_token: &str) {
        lock(&self.renderers).retain(|(t, _)| t == keep_token);
    }
}
