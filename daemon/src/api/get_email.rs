//! wx.getEmail. As getPhoneNumber, for the profile's e-mail address and SCOPE_EMAIL.

use miniapp_broker_proto::{Api, v1::GetEmailResponse};

use super::profile;
use crate::{broker::Broker, error::ApiError, platform::ValueKind, registry::AppInstance, version::ApiVersion};

pub async fn default(b: &Broker, inst: &AppInstance, version: ApiVersion) -> Result<GetEmailResponse, ApiError> {
    let (hold, email) = profile::value(b, inst, version, Api::GetEmail, "email", |p| p.email).await?;
    let code = match email {
        profile::Source::Profile(value) => {
            b.platform.value_code(&inst.app_id, hold.uid(), ValueKind::Email, value).await?
        }
        profile::Source::Superapp => b.platform.vouched_value_code(&inst.app_id, hold.uid(), ValueKind::Email).await?,
    };
    Ok(GetEmailResponse { err_msg: Api::GetEmail.ok_msg(), code })
}
