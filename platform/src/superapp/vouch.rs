//! The platform's side of the superapp server's vouching (docs/superapp-server.md): what it asks
//! the server at each step, and how the server's failures become the platform's answers.
//!
//! - wx.login, v3 with an authCode: redeemed at the server (`access_token/b2b2c`) when the platform
//!   issues its code, not at jscode2session (docs/superapp-server.md says why); the server's userId
//!   must be the user the host named, and the openid is derived from it.
//! - wx.login, v2 (and v3 with the host's own code): checkUser must know the user.
//! - phone and e-mail: a value code stands for the server's temporary code ([`Held`]); the value is
//!   fetched from the server only when an app's backend redeems the code, and is never stored.
//! - avatar and nickname: fetched when asked.
//!
//! A server that is slow, down, answers garbage or a returnCode other than "0" fails the renderer's
//! call with [`PlatformError::Superapp`] and the backend's request with errcode -1 (system busy).

use std::{collections::VecDeque, sync::Mutex};

use sha2::{Digest, Sha256};
use tracing::warn;

use super::{InfoType, SuperappClient, SuperappError};
use crate::{ExchangeFailure, PlatformError, ValueKind};

/// How long the platform remembers an authCode it redeemed.
pub const SPENT_AUTH_CODE_TTL_MS: u64 = 60 * 60 * 1000;
/// How many redeemed authCodes it remembers at most; one more forgets the oldest.
pub const MAX_SPENT_AUTH_CODES: usize = 65_536;

/// The authCodes this platform has sent to the superapp server (their SHA-256, never the code),
/// each for [`SPENT_AUTH_CODE_TTL_MS`]: an authCode is redeemed once even when the server would
/// answer it again (a replaying or buggy server), and two logins racing with one authCode send it
/// once. Bounded by [`MAX_SPENT_AUTH_CODES`], oldest first.
#[derive(Debug, Default)]
pub struct SpentAuthCodes(Mutex<SpentInner>);

#[derive(Debug, Default)]
struct SpentInner {
    by_hash: std::collections::HashSet<[u8; 32]>,
    /// (hash, until) in the order they were spent.
    order: VecDeque<([u8; 32], u64)>,
}

impl SpentAuthCodes {
    /// Records `auth_code` as spent at `now_ms`; false when it already was (and is not forgotten).
    pub fn spend(&self, auth_code: &str, now_ms: u64) -> bool {
        let hash: [u8; 32] = Sha256::digest(auth_code.as_bytes()).into();
        let mut inner = self.0.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(&(old, until)) = inner.order.front() {
            if until > now_ms && inner.order.len() < MAX_SPENT_AUTH_CODES {
                break;
            }
            inner.order.pop_front();
            inner.by_hash.remove(&old);
        }
        if !inner.by_hash.insert(hash) {
            return false;
        }
        inner.order.push_back((hash, now_ms + SPENT_AUTH_CODE_TTL_MS));
        true
    }

    /// How many are remembered now.
    pub fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Which profile value the superapp server is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProfileField {
    Avatar,
    Nickname,
}

/// The contract's type for a value kind.
pub fn info_type(kind: ValueKind) -> InfoType {
    match kind {
        ValueKind::PhoneNumber => InfoType::Phone,
        ValueKind::Email => InfoType::Email,
    }
}

/// What a value code's stored value is: the value itself (from the host's profile), or the
/// superapp server's temporary code for it. Stored as one string, so every store engine keeps
/// value codes unchanged: a temporary code carries a prefix no profile value has (a control
/// character), and a platform with no superapp server never hands one out as a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held<'a> {
    Value(&'a str),
    TemporaryCode(&'a str),
}

const TEMPORARY: &str = "\u{1}superapp-temporary-code:";

impl<'a> Held<'a> {
    pub fn decode(stored: &'a str) -> Held<'a> {
        match stored.strip_prefix(TEMPORARY) {
            Some(code) => Held::TemporaryCode(code),
            None => Held::Value(stored),
        }
    }

    pub fn encode_temporary(code: &str) -> String {
        format!("{TEMPORARY}{code}")
    }
}

fn unavailable(call: &'static str, e: SuperappError) -> PlatformError {
    warn!(call, error = %e, "superapp server call failed");
    PlatformError::Superapp(e.to_string())
}

/// wx.login's check: with the host's authCode, the server's userId for it must be `uid` (and the
/// authCode not one this platform sent before: `spent`); without one, the server must know `uid`.
pub async fn login(
    server: &SuperappClient,
    spent: &SpentAuthCodes,
    now_ms: u64,
    uid: &str,
    auth_code: Option<&str>,
) -> Result<(), PlatformError> {
    let Some(auth_code) = auth_code else { return check_user(server, uid).await };
    if !spent.spend(auth_code, now_ms) {
        warn!("the host's authCode was redeemed before");
        return Err(PlatformError::AuthCodeRefused("already redeemed".into()));
    }
    match server.redeem_auth_code(auth_code).await {
        Ok(grant) if server.is_user(uid, &grant.user_id) => Ok(()),
        Ok(_) => {
            warn!("the superapp server's user for the host's authCode is not the signed-in user");
            Err(PlatformError::AuthCodeRefused("it stands for another user than the signed-in one".into()))
        }
        Err(e @ SuperappError::Refused { .. }) => {
            warn!(error = %e, "the superapp server refused the host's authCode");
            Err(PlatformError::AuthCodeRefused(e.to_string()))
        }
        Err(e) => Err(unavailable("access_token/b2b2c", e)),
    }
}

/// checkUser: an unknown user gets no session.
pub async fn check_user(server: &SuperappClient, uid: &str) -> Result<(), PlatformError> {
    match server.check_user(uid).await {
        Ok(true) => Ok(()),
        Ok(false) => {
            warn!("the superapp server does not know the signed-in user");
            Err(PlatformError::UnknownUser)
        }
        Err(e) => Err(unavailable("checkUser", e)),
    }
}

/// getUserInfoTemporaryCode: what a value code stores ([`Held::encode_temporary`]).
pub async fn temporary_code(server: &SuperappClient, uid: &str, kind: ValueKind) -> Result<String, PlatformError> {
    let answer =
        server.temporary_code(uid, info_type(kind)).await.map_err(|e| unavailable("getUserInfoTemporaryCode", e))?;
    Ok(Held::encode_temporary(&answer.code))
}

/// getUserPhoneNumber / getUserEmail, when a backend redeems a value code.
pub async fn value(
    server: &SuperappClient,
    uid: &str,
    kind: ValueKind,
    temporary_code: &str,
) -> Result<String, ExchangeFailure> {
    server.value(uid, info_type(kind), temporary_code).await.map_err(|e| {
        warn!(call = info_type(kind).value_path(), error = %e, "superapp server call failed");
        ExchangeFailure::Busy
    })
}

/// getUserAvatar / getUserNick.
pub async fn profile(server: &SuperappClient, uid: &str, field: ProfileField) -> Result<String, PlatformError> {
    match field {
        ProfileField::Avatar => server.avatar(uid).await.map_err(|e| unavailable("getUserAvatar", e)),
        ProfileField::Nickname => server.nickname(uid).await.map_err(|e| unavailable("getUserNick", e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_auth_code_is_spent_once_until_forgotten_and_the_memory_is_bounded() {
        let spent = SpentAuthCodes::default();
        assert!(spent.spend("a", 0));
        assert!(!spent.spend("a", 1));
        assert!(spent.spend("b", 1));
        assert!(spent.spend("a", SPENT_AUTH_CODE_TTL_MS), "forgotten after its time");
        for i in 0..MAX_SPENT_AUTH_CODES + 10 {
            spent.spend(&i.to_string(), SPENT_AUTH_CODE_TTL_MS);
        }
        assert_eq!(spent.len(), MAX_SPENT_AUTH_CODES);
    }

    #[test]
    fn a_temporary_code_is_told_from_a_value() {
        let stored = Held::encode_temporary("t-1");
        assert_eq!(Held::decode(&stored), Held::TemporaryCode("t-1"));
        assert_eq!(Held::decode("+86 138 0000 0000"), Held::Value("+86 138 0000 0000"));
        assert_eq!(Held::decode("superapp-temporary-code:x"), Held::Value("superapp-temporary-code:x"));
    }
}
