//! `Admin`: the operator's surface (the CLI's status, apps, sessions, grants, revoke and app
//! registration), gated by the host token.

use std::sync::{Arc, atomic::Ordering};

use miniapp_broker_proto::{
    api::scope,
    v1::{self, DecisionSource, admin_server::Admin},
};
use tonic::{Request, Response, Status};
use tracing::info;

use super::{check_app_id, require_host_token};
use crate::{broker::Broker, page};

/// The `Admin` service.
#[derive(Debug, Clone)]
pub struct AdminService {
    broker: Arc<Broker>,
}

impl AdminService {
    pub fn new(broker: Arc<Broker>) -> Self {
        AdminService { broker }
    }

    /// How many bytes one page of a listing may take: one message.
    fn page_bytes(&self) -> usize {
        self.broker.config.limits.max_message_bytes
    }

    /// One page of `rows` (read from the store, at most [`page::ROWS`]) that fits one message with
    /// its continuation token, and that token: `key` of the page's last row, or empty when the
    /// page ends the listing.
    fn page<T: prost::Message>(&self, rows: Vec<T>, key: impl Fn(&T) -> String) -> (Vec<T>, String) {
        let more = rows.len() == page::ROWS as usize;
        let (rows, cut) = page::fit(rows, self.page_bytes(), |row| page::field_bytes(key(row).len()));
        let next = match rows.last() {
            Some(row) if cut || more => key(row),
            _ => String::new(),
        };
        (rows, next)
    }
}

/// A listing's continuation key as the opaque `next_after` token: the last row's key, as JSON.
fn token(key: &impl serde::Serialize) -> String {
    serde_json::to_string(key).expect("a key of strings serializes")
}

/// The key a request's `after` token names (`None` for an empty one: from the first row).
fn cursor<K: serde::de::DeserializeOwned>(after: &str) -> Result<Option<K>, Status> {
    if after.is_empty() {
        return Ok(None);
    }
    serde_json::from_str(after)
        .map(Some)
        .map_err(|_| Status::invalid_argument("after must be empty or the next_after of an earlier page"))
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

fn filter(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn status(&self, r: Request<v1::StatusRequest>) -> Result<Response<v1::StatusResponse>, Status> {
        require_host_token(&self.broker, r.metadata())?;
        let b = &self.broker;
        let host = b.host.current();
        Ok(Response::new(v1::StatusResponse {
            daemon_version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_ms: b.started.elapsed().as_millis() as u64,
            host_connected: host.is_some(),
            host_name: host.as_ref().map(|h| h.name.clone()).unwrap_or_default(),
            host_methods: host
                .as_ref()
                .map(|h| h.methods().iter().map(|m| m.as_str_name().to_owned()).collect())
                .unwrap_or_default(),
            user_signed_in: b.user.get().is_some(),
            apps: b.registry.len() as u32,
            calls_in_flight: b.host.calls_in_flight() as u64,
            renderer_streams: b.occupancy.streams.taken(),
            default_api_version: b.config.default_api_version.as_str().to_owned(),
            listen_address: b.listen_address.clone(),
            store: b.store.location().to_owned(),
            calls_total: b.stats.calls_total.load(Ordering::Relaxed),
            backend_http: b.backend_http.map(|a| a.to_string()).unwrap_or_default(),
        }))
    }

    async fn list_apps(&self, r: Request<v1::ListAppsRequest>) -> Result<Response<v1::ListAppsResponse>, Status> {
        require_host_token(&self.broker, r.metadata())?;
        let apps = self
            .broker
            .registry
            .list()
            .into_iter()
            .map(|i| {
                let (version, source) = i.version_label();
                v1::AppInstanceInfo {
                    instance_id: i.instance_id.to_string(),
                    app_id: i.app_id.to_string(),
                    api_version: version.to_owned(),
                    version_source: source.to_owned(),
                    calls_in_flight: i.calls_in_flight() as u64,
                    launched_at_ms: i.launched_at_ms,
                }
            })
            .collect();
        Ok(Response::new(v1::ListAppsResponse { apps }))
    }

    async fn list_sessions(
        &self,
        r: Request<v1::ListSessionsRequest>,
    ) -> Result<Response<v1::ListSessionsResponse>, Status> {
        require_host_token(&self.broker, r.metadata())?;
        let q = r.into_inner();
        let after: Option<(String, String)> = cursor(&q.after)?;
        let after = after.as_ref().map(|(app, uid)| (app.as_str(), uid.as_str()));
        let rows = self.broker.platform.list_sessions(filter(&q.app_id), after, page::ROWS).await.map_err(internal)?;
        let rows: Vec<_> = rows
            .into_iter()
            .map(|s| v1::SessionInfo {
                openid: s.openid,
                app_id: s.app_id,
                uid: s.uid,
                created_at_ms: s.created_at_ms,
                expires_at_ms: s.expires_at_ms,
            })
            .collect();
        let (sessions, next_after) = self.page(rows, |s| token(&(&s.app_id, &s.uid)));
        Ok(Response::new(v1::ListSessionsResponse { sessions, next_after }))
    }

    async fn list_grants(&self, r: Request<v1::ListGrantsRequest>) -> Result<Response<v1::ListGrantsResponse>, Status> {
        require_host_token(&self.broker, r.metadata())?;
        let q = r.into_inner();
        let (app_id, uid) = (filter(&q.app_id), filter(&q.uid));
        // The grants come first, then the refusals: the cursor says which, and the key in it.
        let after: Option<(bool, String, String, String)> = cursor(&q.after)?;
        let in_refusals = after.as_ref().is_some_and(|a| a.0);
        let key = after.as_ref().map(|(_, app, uid, scope)| (app.as_str(), uid.as_str(), scope.as_str()));
        let store = &self.broker.store;
        let grant = |refused: bool| {
            move |g: crate::store::GrantRow| v1::Grant {
                app_id: g.app_id,
                uid: g.uid,
                scope: g.scope,
                granted_at_ms: g.granted_at_ms,
                refused,
            }
        };
        let mut rows = Vec::new();
        if !in_refusals {
            rows.extend(
                store
                    .list_decisions(false, app_id, uid, key, page::ROWS)
                    .map_err(internal)?
                    .into_iter()
                    .map(grant(false)),
            );
        }
        if q.include_refusals && rows.len() < page::ROWS as usize {
            let key = if in_refusals { key } else { None };
            let limit = page::ROWS - rows.len() as u32;
            rows.extend(
                store.list_decisions(true, app_id, uid, key, limit).map_err(internal)?.into_iter().map(grant(true)),
            );
        }
        let (grants, next_after) = self.page(rows, |g| token(&(g.refused, &g.app_id, &g.uid, &g.scope)));
        Ok(Response::new(v1::ListGrantsResponse { grants, next_after }))
    }

    async fn revoke_grants(
        &self,
        r: Request<v1::RevokeGrantsRequest>,
    ) -> Result<Response<v1::RevokeGrantsResponse>, Status> {
        require_host_token(&self.broker, r.metadata())?;
        let q = r.into_inner();
        check_app_id(&q.app_id)?;
        if !q.scope.is_empty() && !scope::ALL.contains(&q.scope.as_str()) {
            return Err(Status::invalid_argument(format!("unknown scope; expected one of {}", scope::ALL.join(", "))));
        }
        let uid = match filter(&q.uid) {
            Some(uid) => uid.to_owned(),
            None => self
                .broker
                .user
                .get()
                .map(|u| u.uid.clone())
                .ok_or_else(|| Status::invalid_argument("no uid given and no user signed in"))?,
        };
        let revoked = self
            .broker
            .consent
            .revoke(&q.app_id, &uid, filter(&q.scope), DecisionSource::Admin)
            .await
            .map_err(internal)?;
        info!(app_id = %q.app_id, scope = %q.scope, revoked, "grants revoked");
        Ok(Response::new(v1::RevokeGrantsResponse { revoked: revoked as u32 }))
    }

    async fn list_ledger(&self, r: Request<v1::ListLedgerRequest>) -> Result<Response<v1::ListLedgerResponse>, Status> {
        require_host_token(&self.broker, r.metadata())?;
        if self.broker.config.platform.url.is_some() {
            // A remote platform reports its redemptions when asked: ask now, so that the listing
            // shows what backends redeemed up to this moment (a platform down leaves the stamps
            // for the next sweep).
            crate::deadline::with_deadline(
                Some(tokio::time::Instant::now() + std::time::Duration::from_secs(2)),
                self.broker.platform.sweep(),
            )
            .await;
        }
        let q = r.into_inner();
        let (disclosures, next_after_id) = self
            .broker
            .consent
            .ledger
            .page(&q.app_id, &q.uid, q.since_ms, q.after_id, self.page_bytes())
            .map_err(internal)?;
        Ok(Response::new(v1::ListLedgerResponse { disclosures, next_after_id }))
    }

    async fn register_app(
        &self,
        r: Request<v1::RegisterAppRequest>,
    ) -> Result<Response<v1::RegisterAppResponse>, Status> {
        require_host_token(&self.broker, r.metadata())?;
        let q = r.into_inner();
        check_app_id(&q.app_id)?;
        // A secret set in the config is provisioned again at every start: a rotation here would
        // hold only until then, so it is refused rather than silently undone.
        if q.rotate && self.broker.config.apps.get(&q.app_id).is_some_and(|a| a.secret.is_some()) {
            return Err(Status::failed_precondition(format!(
                "the secret of {} is set in the config (apps.{}.secret) and comes back at every start: \
                 change it there and restart the daemon",
                q.app_id, q.app_id
            )));
        }
        let secret = self.broker.platform.register_app(&q.app_id, q.rotate).await.map_err(internal)?;
        info!(app_id = %q.app_id, created = secret.is_some(), rotate = q.rotate, "app registered");
        Ok(Response::new(v1::RegisterAppResponse { created: secret.is_some(), secret: secret.unwrap_or_default() }))
    }
}
