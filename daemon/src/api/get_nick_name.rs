//! wx.getNickName. v1: delegated. v2: the profile's nickname. v3: once getAuthCode grants
//! SCOPE_NICKNAME.

use miniapp_broker_proto::{Api, v1::GetNickNameResponse};

use super::profile;
use crate::{broker::Broker, error::ApiError, registry::AppInstance, version::ApiVersion};

pub async fn default(b: &Broker, inst: &AppInstance, version: ApiVersion) -> Result<GetNickNameResponse, ApiError> {
    let (_, nick_name) = profile::value(b, inst, version, Api::GetNickName, "nickname", |p| p.nick_name).await?;
    Ok(GetNickNameResponse { err_msg: Api::GetNickName.ok_msg(), nick_name })
}
