//! The user signed in to the superapp, as the host pushed it (the seed's `getAppUID`).
//!
//! It outlives a host connection: a host that restarts pushes it again in Hello, and a login session
//! should not end because the shell's process was replaced. Changing or clearing the uid ends the
//! previous user's sessions (the platform is told).
//!
//! Each sign-in is an epoch: the number goes up whenever the uid changes (a switch or a sign-out).
//! A call takes a [`UserTicket`] (uid and epoch) when it starts; before it issues a code, starts a
//! session or records a decision, it [`holds`](CurrentUser::hold) the ticket, which checks the
//! epoch is unchanged and keeps it so (a switch waits) until the hold is dropped. So an answer
//! that waited on the host is for the user signed in when it is issued, or it is not issued.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use arc_swap::ArcSwapOption;
use miniapp_broker_proto::v1::{SignedInUser, UserProfile};
use tokio::sync::{RwLock, RwLockReadGuard};

use crate::error::ApiError;

/// The signed-in user, read on every default implementation without a lock.
#[derive(Debug, Default)]
pub struct CurrentUser {
    user: ArcSwapOption<SignedInUser>,
    /// Goes up on every change of uid; read under `switch`.
    epoch: AtomicU64,
    /// Held shared while something is issued for a ticket, exclusively while the uid changes.
    switch: RwLock<()>,
}

/// Who a call is for: the uid signed in when it started, and that sign-in's epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserTicket {
    pub uid: String,
    epoch: u64,
}

/// Proof that a ticket's user is still signed in; the user cannot change while it lives. Keep it
/// only around the short, local step that issues or records (never around a host call).
#[derive(Debug)]
pub struct UserHold<'a> {
    pub uid: String,
    _switch: RwLockReadGuard<'a, ()>,
}

impl CurrentUser {
    /// The signed-in user, or `None` when signed out.
    pub fn get(&self) -> Option<Arc<SignedInUser>> {
        self.user.load_full().filter(|u| !u.uid.is_empty())
    }

    /// Replaces the user; returns the previous uid if the uid changed (so its sessions end). Waits
    /// for any hold on the previous user to end first.
    pub async fn set(&self, user: SignedInUser) -> Option<String> {
        let new = if user.uid.is_empty() { None } else { Some(Arc::new(user)) };
        let new_uid = new.as_ref().map(|u| u.uid.clone());
        let _switching = self.switch.write().await;
        let old = self.user.swap(new);
        let changed = match old {
            Some(old) if Some(&old.uid) != new_uid.as_ref() => Some(old.uid.clone()),
            Some(_) => None,
            None => new_uid.is_some().then(String::new),
        };
        if changed.is_some() {
            self.epoch.fetch_add(1, Ordering::SeqCst);
        }
        changed.filter(|uid| !uid.is_empty())
    }

    /// The signed-in user's ticket and profile, or `NotLoggedIn`.
    pub fn ticket(&self) -> Result<(UserTicket, UserProfile), ApiError> {
        // The epoch first: a switch between the two reads makes the ticket stale, never wrong.
        let epoch = self.epoch.load(Ordering::SeqCst);
        let user = self.get().ok_or(ApiError::NotLoggedIn)?;
        Ok((UserTicket { uid: user.uid.clone(), epoch }, user.profile.clone().unwrap_or_default()))
    }

    /// Holds `ticket`'s user signed in, or fails with `UserChanged` if it no longer is.
    pub async fn hold(&self, ticket: &UserTicket) -> Result<UserHold<'_>, ApiError> {
        let guard = self.switch.read().await;
        if self.epoch.load(Ordering::SeqCst) != ticket.epoch {
            return Err(ApiError::UserChanged);
        }
        Ok(UserHold { uid: ticket.uid.clone(), _switch: guard })
    }

    /// The profile of the signed-in user.
    pub fn profile(&self) -> Option<(String, UserProfile)> {
        self.get().map(|u| (u.uid.clone(), u.profile.clone().unwrap_or_default()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(uid: &str) -> SignedInUser {
        SignedInUser { uid: uid.into(), profile: None }
    }

    #[tokio::test]
    async fn a_ticket_holds_only_while_its_sign_in_lasts() {
        let current = CurrentUser::default();
        assert_eq!(current.ticket().unwrap_err(), ApiError::NotLoggedIn);
        assert_eq!(current.set(user("a")).await, None);
        let (a, _) = current.ticket().unwrap();
        assert_eq!(current.hold(&a).await.unwrap().uid, "a");
        // A profile update for the same uid keeps the ticket.
        assert_eq!(current.set(user("a")).await, None);
        assert!(current.hold(&a).await.is_ok());
        // Away and back again is a new sign-in: the old ticket is stale.
        assert_eq!(current.set(user("b")).await, Some("a".into()));
        assert_eq!(current.set(user("a")).await, Some("b".into()));
        assert_eq!(current.hold(&a).await.unwrap_err(), ApiError::UserChanged);
        let (again, _) = current.ticket().unwrap();
        assert_eq!(current.set(SignedInUser::default()).await, Some("a".into()));
        assert_eq!(current.hold(&again).await.unwrap_err(), ApiError::UserChanged);
    }

    #[tokio::test]
    async fn a_switch_waits_for_a_hold_to_end() {
        let current = Arc::new(CurrentUser::default());
        current.set(user("a")).await;
        let (ticket, _) = current.ticket().unwrap();
        let hold = current.hold(&ticket).await.unwrap();
        let switching = tokio::spawn({
            let current = current.clone();
            async move { current.set(user("b")).await }
        });
        for _ in 0..8 {
            tokio::task::yield_now().await;
        }
        assert!(!switching.is_finished(), "the switch waits while the hold lives");
        assert_eq!(current.get().unwrap().uid, "a");
        drop(hold);
        assert_eq!(switching.await.unwrap(), Some("a".into()));
        assert_eq!(current.hold(&ticket).await.unwrap_err(), ApiError::UserChanged);
    }
}
