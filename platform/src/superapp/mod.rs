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
