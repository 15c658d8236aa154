//! wx.openSetting: the host shows its settings page for this app (delegate method OPEN_SETTING,
//! in every version), given the current decisions and the user; it answers with the user's
//! choices, which the daemon checks whole (an unknown scope changes nothing), records for the
//! user still signed in, and answers with the new authSetting.

use miniapp_broker_proto::{
    Api,
    api::{ApiCall, scope},
    v1::{DecisionSource, OpenSettingRequest, OpenSettingResponse, delegate_call},
};

use crate::{
    broker::Broker,
    error::ApiError,
    host_link::{Expect, HostAnswer},
    registry::AppInstance,
    version::ApiVersion,
};

pub async fn run(b: &Broker, inst: &AppInstance, version: ApiVersion) -> Result<OpenSettingResponse, ApiError> {
    let (ticket, _) = b.user.ticket()?;
    let request = OpenSettingRequest {
        auth_setting: b.consent.auth_setting(&inst.app_id, &ticket.uid)?,
        uid: ticket.uid.clone(),
    };
    let app = Broker::app_info(inst, Some(version));
    let request = delegate_call::Request::Api(request.into_request());
    let answer = match b.host.call(app, request, Expect::Api(Api::OpenSetting)).await? {
        HostAnswer::Api(resp) => OpenSettingRequest::unwrap_response(resp)
            .ok_or_else(|| ApiError::HostProtocol("unexpected answer type".into()))?,
        _ => return Err(ApiError::HostProtocol("unexpected answer type".into())),
    };
    // One decision per scope. A scope named by itself wins over `scope.userInfo` (which stands for
    // avatar and nickname together): a host that answers the whole page echoes userInfo as it was,
    // and the user's change is the single scope.
    let mut choices = std::collections::BTreeMap::new();
    let mut named = Vec::new();
    for (name, granted) in &answer.auth_setting {
        let scopes = scope::expand(name)
            .ok_or_else(|| ApiError::HostProtocol("openSetting answered a scope the daemon does not know".into()))?;
        match scopes {
            [single] => named.push((*single, *granted)),
            several => choices.extend(several.iter().map(|s| (*s, *granted))),
        }
    }
    choices.extend(named);
    let hold = b.user.hold(&ticket).await?;
    // The page's choices are stored together: none is seen without the others.
    let decisions: Vec<(&str, Option<bool>)> = choices.into_iter().map(|(s, granted)| (s, Some(granted))).collect();
    b.consent.decide(&inst.app_id, &hold.uid, &decisions, DecisionSource::OpenSetting).await?;
    let auth_setting = b.consent.auth_setting(&inst.app_id, &hold.uid)?;
    Ok(OpenSettingResponse { err_msg: Api::OpenSetting.ok_msg(), auth_setting })
}
