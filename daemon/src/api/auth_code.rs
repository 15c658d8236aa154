//! v3 "mutual trust": before a default implementation runs, the host's getAuthCode must vouch for
//! the call, and grant the scope the API needs.
//!
//! The daemon tells the host which of the requested scopes this user already granted this app (its
//! permission store), records the scopes the host grants, and fails the API with "scope not
//! authorized" for a scope the host did not grant. A v3 instance whose host does not implement
//! getAuthCode fails its defaults with a clear error instead of silently running v2
//! (docs/decisions.md).

use miniapp_broker_proto::{
    Api,
    api::scope,
    v1::{DelegateMethod, GetAuthCodeRequest, delegate_call},
};
use tracing::debug;

use crate::{
    broker::Broker,
    error::ApiError,
    host_link::{Expect, HostAnswer},
    registry::AppInstance,
    version::ApiVersion,
};

/// What getAuthCode gave: the host's login `code` (passed through) or an `authCode` (bound into
/// the daemon's code).
#[derive(Debug, Default)]
pub struct Authorized {
    pub auth_code: Option<String>,
    pub code: Option<String>,
}

/// Asks the host's getAuthCode for `api` on behalf of `uid`.
pub async fn authorize(b: &Broker, inst: &AppInstance, api: Api, uid: &str) -> Result<Authorized, ApiError> {
    if b.host.current().is_some_and(|h| !h.implements(DelegateMethod::GetAuthCode)) {
        return Err(ApiError::AuthCodeNotImplemented);
    }
    let scopes: Vec<String> = api.scope().into_iter().map(str::to_owned).collect();
    let granted = b.store.granted_scopes(&inst.app_id, uid)?;
    let previously_granted = scopes.iter().filter(|s| granted.contains(s)).cloned().collect();
    let request = GetAuthCodeRequest { scopes: scopes.clone(), previously_granted, api: api.name().to_owned() };
    let app = Broker::app_info(inst, Some(ApiVersion::V3));
    let answer = match b.host.call(app, delegate_call::Request::GetAuthCode(request), Expect::AuthCode).await {
        Ok(HostAnswer::AuthCode(answer)) => answer,
        Ok(_) => return Err(ApiError::HostProtocol("unexpected answer type".into())),
        Err(ApiError::NotImplementedByHost(_)) => return Err(ApiError::AuthCodeNotImplemented),
        Err(e) => return Err(e),
    };
    if answer.auth_code.is_empty() && answer.code.is_empty() {
        return Err(ApiError::AuthCodeNull);
    }
    for wanted in &scopes {
        if !answer.auth_success_scopes.contains(wanted) {
            let message = answer.auth_error_scopes.get(wanted).cloned().unwrap_or_else(|| "not granted".to_owned());
            return Err(ApiError::ScopeDenied { scope: wanted.clone(), message });
        }
    }
    let new: Vec<String> = answer
        .auth_success_scopes
        .iter()
        .filter(|s| scope::ALL.contains(&s.as_str()) && !granted.contains(s))
        .cloned()
        .collect();
    if !new.is_empty() {
        debug!(app_id = %inst.app_id, scopes = ?new, "scopes granted");
        b.store.add_grants(&inst.app_id, uid, &new, b.clock.now_ms())?;
    }
    let non_empty = |s: String| (!s.is_empty()).then_some(s);
    Ok(Authorized { auth_code: non_empty(answer.auth_code), code: non_empty(answer.code) })
}
