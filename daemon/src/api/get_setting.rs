//! wx.getSetting: this app's decisions for the signed-in user, from the consent store, in every
//! version. Never reaches the host. `scope.userInfo` stands for avatar and nickname together
//! (docs/decisions.md).

use miniapp_broker_proto::{Api, v1::GetSettingResponse};

use crate::{broker::Broker, error::ApiError, registry::AppInstance};

pub fn run(b: &Broker, inst: &AppInstance) -> Result<GetSettingResponse, ApiError> {
    let (ticket, _) = b.user.ticket()?;
    let auth_setting = b.consent.auth_setting(&inst.app_id, &ticket.uid)?;
    Ok(GetSettingResponse { err_msg: Api::GetSetting.ok_msg(), auth_setting })
}
