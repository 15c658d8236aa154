//! The superapp's server, as the platform uses it to vouch for the user (TCMPP's "superapp
//! backend" contract): it redeems the host's v3 authCode to learn who the user is, checks that a
//! user exists, and holds the user's phone, e-mail, avatar and nickname, which the platform fetches
//! only when an app's backend redeems a code for them. docs/superapp-server.md is the contract as
//! a superapp backend team implements it.
//!
//! [`contract`] is the JSON of each call, [`signing`] the platform's key pair and its signature on
//! every request, [`client`] the calls themselves, and [`vouch`] what the platform asks at each step.
//! It lives in the platform crate so the embedded platform and `miniapp-platformd` call the same
//! contract; the daemon only maps its `[superapp]` config into [`ClientSettings`].

pub mod client;
pub mod contract;
pub mod signing;
pub mod vouch;

pub use client::{ClientSettings, SuperappClient, SuperappError};
pub use contract::InfoType;
pub use signing::{PlatformKey, PlatformPublicKey};

use std::sync::Arc;

use crate::StoreError;

/// Which superapp server vouches for the users of an app: the same one for every app (the daemon's
/// `[superapp]`), the server stored with the app's tenant (the platform service, which looks it up
/// in its database), or none. Asked on every vouched step, so an app registered while the platform
/// runs is vouched for from its first login.
#[async_trait::async_trait]
pub trait Directory: Send + Sync + 'static {
    async fn server_for(&self, app_id: &str) -> Result<Option<Arc<SuperappClient>>, StoreError>;
}

/// A fixed answer per app id, as the embedded platform (one server or none) and tests use it.
#[async_trait::async_trait]
impl<F> Directory for F
where
    F: Fn(&str) -> Option<Arc<SuperappClient>> + Send + Sync + 'static,
{
    async fn server_for(&self, app_id: &str) -> Result<Option<Arc<SuperappClient>>, StoreError> {
        Ok(self(app_id))
    }
}
