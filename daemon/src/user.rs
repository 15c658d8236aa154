//! The user signed in to the superapp, as the host pushed it (the seed's `getAppUID`).
//!
//! It outlives a host connection: a host that restarts pushes it again in Hello, and a login session
//! should not end because the shell's process was replaced. Changing or clearing the uid ends the
//! previous user's sessions (the platform is told).

use std::sync::Arc;

use arc_swap::ArcSwapOption;
use miniapp_broker_proto::v1::{SignedInUser, UserProfile};

/// The signed-in user, read on every default implementation without a lock.
#[derive(Debug, Default)]
pub struct CurrentUser(ArcSwapOption<SignedInUser>);

impl CurrentUser {
    /// The signed-in user, or `None` when signed out.
    pub fn get(&self) -> Option<Arc<SignedInUser>> {
        self.0.load_full().filter(|u| !u.uid.is_empty())
    }

    /// Replaces the user; returns the previous uid if the uid changed (so its sessions end).
    pub fn set(&self, user: SignedInUser) -> Option<String> {
        let new = if user.uid.is_empty() { None } else { Some(Arc::new(user)) };
        let new_uid = new.as_ref().map(|u| u.uid.clone());
        let old = self.0.swap(new);
        match old {
            Some(old) if Some(&old.uid) != new_uid.as_ref() => Some(old.uid.clone()),
            _ => None,
        }
    }

    /// The profile of the signed-in user.
    pub fn profile(&self) -> Option<(String, UserProfile)> {
        self.get().map(|u| (u.uid.clone(), u.profile.clone().unwrap_or_default()))
    }
}
