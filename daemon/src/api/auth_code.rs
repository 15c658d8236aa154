//! v3 "mutual trust": before a default implementation runs, the host's getAuthCode must vouch for
//! the call, and grant the scope the API needs.
//!
//! The daemon tells the host which user it asks about and which of the requested scopes this user
//! already granted this app (the consent store), records the host's decisions through
//! [`Consent`](crate::consent::Consent) (grants, and refusals when they are remembered), and fails
//! the API with "scope not authorized" for a scope the host did not grant. A v3 instance whose host
//! does not implement getAuthCode fails its defaults with a clear error instead of silently running
//! v2 (docs/decisions.md). Nothing is recorded or issued unless the user asked about is still
//! signed in when the answer arrives: the decisions are recorded, and the caller issues, under the
//! returned [`UserHold`].

use miniapp_broker_proto::{
    Api,
    api::scope,
    v1::{DecisionSource, DelegateMethod, GetAuthCodeRequest, GetAuthCodeResponse, delegate_call},
};

use crate::{
    broker::Broker,
    error::ApiError,
    host_link::{Expect, HostAnswer},
    registry::AppInstance,
    user::{UserHold, UserTicket},
    version::ApiVersion,
};

/// What getAuthCode gave: the host's login `code` (passed through) or an `authCode` (bound into
/// the daemon's code).
#[derive(Debug, Default)]
pub struct Authorized {
    pub auth_code: Option<String>,
    pub code: Option<String>,
}

/// Asks the host's getAuthCode about `scopes` for the ticket's user, on behalf of `api`. Returns
/// the host's answer once the user is known to be still signed in, with the hold that keeps them
/// so; records nothing.
pub async fn ask<'a>(
    b: &'a Broker,
    inst: &AppInstance,
    version: ApiVersion,
    api: Api,
    scopes: &[&str],
    ticket: &UserTicket,
) -> Result<(GetAuthCodeResponse, UserHold<'a>), ApiError> {
    if b.host.current().is_some_and(|h| !h.implements(DelegateMethod::GetAuthCode)) {
        return Err(not_implemented(version));
    }
    let granted = b.consent.granted(&inst.app_id, &ticket.uid)?;
    let request = GetAuthCodeRequest {
        scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        previously_granted: scopes
            .iter()
            .filter(|s| granted.iter().any(|g| g == *s))
            .map(|s| (*s).to_owned())
            .collect(),
        api: api.name().to_owned(),
        uid: ticket.uid.clone(),
    };
    let app = Broker::app_info(inst, Some(version));
    let answer = match b.host.call(app, delegate_call::Request::GetAuthCode(request), Expect::AuthCode).await {
        Ok(HostAnswer::AuthCode(answer)) => answer,
        Ok(_) => return Err(ApiError::HostProtocol("unexpected answer type".into())),
        Err(ApiError::NotImplementedByHost(_)) => return Err(not_implemented(version)),
        Err(e) => return Err(e),
    };
    let hold = b.user.hold(ticket).await?;
    Ok((answer, hold))
}

fn not_implemented(version: ApiVersion) -> ApiError {
    if version == ApiVersion::V3 {
        ApiError::AuthCodeNotImplemented
    } else {
        ApiError::NotImplementedByHost(DelegateMethod::GetAuthCode)
    }
}

/// Records the host's decision about each of `scopes` (a grant, or a refusal when refusals are
/// remembered); returns the refused ones with the host's reason.
pub async fn record(
    b: &Broker,
    inst: &AppInstance,
    hold: &UserHold<'_>,
    scopes: &[&str],
    answer: &GetAuthCodeResponse,
    source: DecisionSource,
) -> Result<Vec<(String, String)>, ApiError> {
    let (mut refused, mut decisions) = (Vec::new(), Vec::new());
    for wanted in scopes {
        if !scope::ALL.contains(wanted) {
            continue;
        }
        if answer.auth_success_scopes.iter().any(|s| s == wanted) {
            decisions.push((*wanted, Some(true)));
        } else {
            if b.consent.remembers_refusals() {
                decisions.push((*wanted, Some(false)));
            }
            let message = answer.auth_error_scopes.get(*wanted).cloned().unwrap_or_else(|| "not granted".to_owned());
            refused.push(((*wanted).to_owned(), message));
        }
    }
    // One answer's decisions (scope.userInfo is two scopes) are stored together.
    b.consent.decide(&inst.app_id, &hold.uid, &decisions, source).await?;
    Ok(refused)
}

/// The v3 step before a default: asks getAuthCode for `api`'s scope on behalf of the ticket's user
/// and records the decision. Returns what to bind or pass through, and the hold under which the
/// caller issues its answer.
pub async fn authorize<'a>(
    b: &'a Broker,
    inst: &AppInstance,
    api: Api,
    ticket: &UserTicket,
) -> Result<(Authorized, UserHold<'a>), ApiError> {
    let scopes: Vec<&str> = api.scope().into_iter().collect();
    let (answer, hold) = ask(b, inst, ApiVersion::V3, api, &scopes, ticket).await?;
    if answer.auth_code.is_empty() && answer.code.is_empty() {
        return Err(ApiError::AuthCodeNull);
    }
    let refused = record(b, inst, &hold, &scopes, &answer, DecisionSource::GetAuthCode).await?;
    if let Some((scope, message)) = refused.into_iter().next() {
        return Err(ApiError::ScopeDenied { scope, message });
    }
    let non_empty = |s: String| (!s.is_empty()).then_some(s);
    Ok((Authorized { auth_code: non_empty(answer.auth_code), code: non_empty(answer.code) }, hold))
}
