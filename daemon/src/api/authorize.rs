//! wx.authorize({scope}): asks the user ahead of use, in every version, through the host's
//! getAuthCode (with `api` "authorize"), and records the decision. A scope already granted
//! answers ok at once; one already refused fails at once with "authorize:fail auth deny" (when
//! refusals are remembered); neither reaches the host. A refusal now is "auth deny" too.

use miniapp_broker_proto::{
    Api,
    api::scope,
    v1::{AuthorizeRequest, AuthorizeResponse, DecisionSource},
};

use super::auth_code;
use crate::{broker::Broker, error::ApiError, registry::AppInstance, version::ApiVersion};

pub fn validate(r: &AuthorizeRequest) -> Result<(), ApiError> {
    scope::expand(&r.scope).map(|_| ()).ok_or_else(|| {
        ApiError::InvalidParams(format!(
            "unknown scope; expected {} or one of {}",
            scope::USER_INFO,
            scope::ALL.join(", ")
        ))
    })
}

pub async fn run(
    b: &Broker,
    inst: &AppInstance,
    version: ApiVersion,
    r: AuthorizeRequest,
) -> Result<AuthorizeResponse, ApiError> {
    validate(&r)?;
    let scopes = scope::expand(&r.scope).unwrap_or_default();
    let (ticket, _) = b.user.ticket()?;
    let decided = b.consent.decisions(&inst.app_id, &ticket.uid)?;
    if scopes.iter().any(|s| decided.get(*s) == Some(&false)) && b.consent.remembers_refusals() {
        return Err(ApiError::AuthDeny);
    }
    if scopes.iter().all(|s| decided.get(*s) == Some(&true)) {
        return Ok(AuthorizeResponse { err_msg: Api::Authorize.ok_msg() });
    }
    let (answer, hold) = auth_code::ask(b, inst, version, Api::Authorize, scopes, &ticket).await?;
    let refused = auth_code::record(b, inst, &hold, scopes, &answer, DecisionSource::Authorize).await?;
    if !refused.is_empty() {
        return Err(ApiError::AuthDeny);
    }
    Ok(AuthorizeResponse { err_msg: Api::Authorize.ok_msg() })
}
