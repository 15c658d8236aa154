//! The signed-in user's data, as the user-information defaults hand it out: signed in (else the
//! seed's -1001), v3-authorized for the API's scope, and present in the profile.

use miniapp_broker_proto::{Api, v1::UserProfile};

use super::auth_code;
use crate::{broker::Broker, error::ApiError, registry::AppInstance, version::ApiVersion};

/// The uid and the profile field `pick` chooses, once the call is allowed.
pub async fn value(
    b: &Broker,
    inst: &AppInstance,
    version: ApiVersion,
    api: Api,
    field: &'static str,
    pick: fn(UserProfile) -> String,
) -> Result<(String, String), ApiError> {
    let (uid, profile) = b.user.profile().ok_or(ApiError::NotLoggedIn)?;
    if version == ApiVersion::V3 {
        auth_code::authorize(b, inst, api, &uid).await?;
    }
    let value = pick(profile);
    if value.is_empty() {
        return Err(ApiError::NoProfileValue(field));
    }
    Ok((uid, value))
}
