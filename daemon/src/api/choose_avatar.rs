//! wx.chooseAvatar. v1: delegated. v2: the profile's avatar. v3: once getAuthCode grants
//! SCOPE_AVATAR. (An avatar is shown to the user anyway, so it goes to the renderer in clear.)

use miniapp_broker_proto::{Api, v1::ChooseAvatarResponse};

use super::profile;
use crate::{
    broker::Broker,
    error::ApiError,
    platform::{Disclosed, ProfileField},
    registry::AppInstance,
    version::ApiVersion,
};

pub async fn default(b: &Broker, inst: &AppInstance, version: ApiVersion) -> Result<ChooseAvatarResponse, ApiError> {
    let (hold, source) = profile::value(b, inst, version, Api::ChooseAvatar, "avatar", |p| p.avatar_url).await?;
    let avatar_url = match source {
        profile::Source::Profile(value) => value,
        profile::Source::Superapp => b.platform.vouched_profile(&inst.app_id, hold.uid(), ProfileField::Avatar).await?,
    };
    b.consent.ledger.record(&inst.app_id, hold.uid(), Disclosed::Avatar, Api::ChooseAvatar)?;
    Ok(ChooseAvatarResponse { err_msg: Api::ChooseAvatar.ok_msg(), avatar_url })
}
