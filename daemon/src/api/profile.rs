//! The signed-in user's data, as the user-information defaults hand it out: signed in (else the
//! seed's -1001), not refused for the API's scope (a remembered refusal fails at once, in every
//! version, before the route: `api::gate`), v3-authorized for the scope, and present in the profile. The value comes with the hold
//! under which the caller issues it, so it goes to no one but the user still signed in.

use miniapp_broker_proto::{Api, v1::UserProfile};

use super::auth_code;
use crate::{broker::Broker, error::ApiError, registry::AppInstance, user::UserHold, version::ApiVersion};

/// The profile field `pick` chooses, once the call is allowed, with the hold on its user.
pub async fn value<'a>(
    b: &'a Broker,
    inst: &AppInstance,
    version: ApiVersion,
    api: Api,
    field: &'static str,
    pick: fn(UserProfile) -> String,
) -> Result<(UserHold<'a>, String), ApiError> {
    // A remembered refusal was checked before the call got here (`api::gate`).
    let (ticket, profile) = b.user.ticket()?;
    let hold = if version == ApiVersion::V3 {
        auth_code::authorize(b, inst, api, &ticket).await?.1
    } else {
        b.user.hold(&ticket).await?
    };
    let value = pick(profile);
    if value.is_empty() {
        return Err(ApiError::NoProfileValue(field));
    }
    Ok((hold, value))
}
