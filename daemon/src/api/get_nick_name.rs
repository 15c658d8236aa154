//! wx.getNickName. v1: delegated. v2: the profile's nickname. v3: once getAuthCode grants
//! SCOPE_NICKNAME.

use miniapp_broker_proto::{Api, v1::GetNickNameResponse};

use super::profile;
use crate::{
    broker::Broker,
    error::ApiError,
    platform::{Disclosed, ProfileField},
    registry::AppInstance,
    version::ApiVersion,
};

pub async fn default(b: &Broker, inst: &AppInstance, version: ApiVersion) -> Result<GetNickNameResponse, ApiError> {
    let (hold, source) = profile::value(b, inst, version, Api::GetNickName, "nickname", |p| p.nick_name).await?;
    let nick_name = match source {
        profile::Source::Profile(value) => value,
        profile::Source::Superapp => {
            b.platform.vouched_profile(&inst.app_id, hold.uid(), ProfileField::Nickname).await?
        }
    };
    b.consent.ledger.record(&inst.app_id, hold.uid(), Disclosed::Nickname, Api::GetNickName)?;
    Ok(GetNickNameResponse { err_msg: Api::GetNickName.ok_msg(), nick_name })
}
