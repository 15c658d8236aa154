//! wx.getPhoneNumber. v1: delegated. v2: a one-time code for the profile's phone number, which the
//! app's backend redeems with its secret (the number never reaches the renderer). v3: only once
//! getAuthCode grants SCOPE_PHONE_NUMBER.

use miniapp_broker_proto::{Api, v1::GetPhoneNumberResponse};

use super::profile;
use crate::{broker::Broker, error::ApiError, platform::ValueKind, registry::AppInstance, version::ApiVersion};

pub async fn default(b: &Broker, inst: &AppInstance, version: ApiVersion) -> Result<GetPhoneNumberResponse, ApiError> {
    let (hold, phone) =
        profile::value(b, inst, version, Api::GetPhoneNumber, "phone number", |p| p.phone_number).await?;
    let code = match phone {
        profile::Source::Profile(value) => {
            b.platform.value_code(&inst.app_id, hold.uid(), ValueKind::PhoneNumber, value).await?
        }
        profile::Source::Superapp => {
            b.platform.vouched_value_code(&inst.app_id, hold.uid(), ValueKind::PhoneNumber).await?
        }
    };
    Ok(GetPhoneNumberResponse { err_msg: Api::GetPhoneNumber.ok_msg(), code })
}
