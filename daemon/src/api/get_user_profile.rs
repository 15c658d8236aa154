//! wx.getUserProfile: no default implementation; always delegated. `desc` (what the profile is
//! for, shown to the user) is required and, as in WeChat, at most 30 characters.

use miniapp_broker_proto::v1::GetUserProfileRequest;

use crate::error::ApiError;

pub fn validate(r: &GetUserProfileRequest) -> Result<(), ApiError> {
    if r.desc.trim().is_empty() {
        return Err(ApiError::InvalidParams("desc is required".into()));
    }
    if r.desc.chars().count() > 30 {
        return Err(ApiError::InvalidParams("desc must be at most 30 characters".into()));
    }
    Ok(())
}
