//! The signed-in user's data, as the user-information defaults hand it out: signed in (else the
//! seed's -1001), not refused for the API's scope (a remembered refusal fails at once, in every
//! version, before the route: `api::gate`), v3-authorized for the scope, and present in the profile. The value comes with the hold
//! under which the caller issues it, so it goes to no one but the user still signed in, and not
//! past a decision about the scope made meanwhile (the consent store's [`Cleared`]).
//!
//! When a superapp server vouches for users (`[superapp] server_url`), the host's profile is not
//! read: the caller asks the platform, which fetches the value from that server ([`Source`]).

use miniapp_broker_proto::{Api, v1::UserProfile};

use super::auth_code;
use crate::{
    broker::Broker, consent::Cleared, error::ApiError, registry::AppInstance, user::UserHold, version::ApiVersion,
};

/// What the caller issues or hands out under: the user is still signed in, and the scope's
/// decision cannot change, until it is dropped.
#[derive(Debug)]
pub struct Issuing<'a> {
    user: UserHold<'a>,
    _scope: Option<Cleared<'a>>,
}

impl Issuing<'_> {
    /// The user the value is for.
    pub fn uid(&self) -> &str {
        &self.user.uid
    }
}

/// Where the value an allowed call hands out comes from.
#[derive(Debug)]
pub enum Source {
    /// The host's pushed profile had it.
    Profile(String),
    /// The superapp's server holds it: the platform fetches it (for phone and e-mail, only when
    /// the app's backend redeems the code).
    Superapp,
}

/// The profile field `pick` chooses, once the call is allowed, with the hold on its user.
pub async fn value<'a>(
    b: &'a Broker,
    inst: &AppInstance,
    version: ApiVersion,
    api: Api,
    field: &'static str,
    pick: fn(UserProfile) -> String,
) -> Result<(Issuing<'a>, Source), ApiError> {
    // A remembered refusal was checked before the call got here (`api::gate`), and is checked
    // again below under the decision lock.
    let (ticket, profile) = b.user.ticket()?;
    let user = if version == ApiVersion::V3 {
        auth_code::authorize(b, inst, api, &ticket).await?.1
    } else {
        b.user.hold(&ticket).await?
    };
    // A superapp server that vouches holds the value; else the host's profile must have it.
    let value = if b.platform.vouches(&inst.app_id).await? {
        Source::Superapp
    } else {
        match pick(profile) {
            value if value.is_empty() => return Err(ApiError::NoProfileValue(field)),
            value => Source::Profile(value),
        }
    };
    // Checked again under the lock a decision takes: the host may have refused (or revoked) the
    // scope since the first check, or since getAuthCode granted it.
    let scope = match api.scope() {
        Some(scope) => Some(b.consent.clear(&inst.app_id, &user.uid, scope, version == ApiVersion::V3).await?),
        None => None,
    };
    Ok((Issuing { user, _scope: scope }, value))
}
