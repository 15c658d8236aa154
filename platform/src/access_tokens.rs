//! Access tokens for app backends (WeChat's `/cgi-bin/token` and `/cgi-bin/stable_token`).
//!
//! A token is 192 random bits, bound to the app it was issued for, and expires after
//! [`TOKEN_TTL_SECS`] (7200 s, as WeChat's). Tokens live in memory only, keyed by their SHA-256 (a
//! lookup compares hashes, never the token itself): a daemon restart invalidates them and the
//! backend fetches a new one, as it does when WeChat rotates tokens (docs/decisions.md). An
//! expired token is remembered for one more lifetime so that its backend hears "access_token
//! expired" (42001) rather than "invalid credential" (40001). Each app holds its stable token and
//! at most [`MAX_TOKENS_PER_APP`] other live tokens; the oldest of those is dropped first.

use std::{collections::VecDeque, sync::Arc};

use dashmap::DashMap;

use crate::{
    AccessToken, ExchangeFailure, TokenRequest,
    tokens::{hash_secret, random_token},
};

/// How long an access token is valid, as WeChat's.
pub const TOKEN_TTL_SECS: u64 = 7200;
/// Tokens one app may hold at once (a backend normally holds one or two).
pub const MAX_TOKENS_PER_APP: usize = 32;

/// What a token's hash stands for: the app it was issued to, and until when.
#[derive(Debug, Clone)]
struct Entry {
    app_id: Arc<str>,
    expires_at_ms: u64,
}

/// The issued tokens. See the module docs.
#[derive(Debug, Default)]
pub struct AccessTokens {
    by_hash: DashMap<[u8; 32], Entry>,
    /// Each app's fresh token hashes (and replaced stable ones), oldest first (bounds the tokens
    /// per app).
    per_app: DashMap<Arc<str>, VecDeque<[u8; 32]>>,
    /// Each app's current stable token (stable_token hands the same one out until it expires).
    stable: DashMap<Arc<str>, (String, u64)>,
}

impl AccessTokens {
    /// A token for `app_id`: a fresh one, or the app's stable token while it has time left.
    pub fn issue(&self, app_id: &str, request: TokenRequest, now_ms: u64) -> AccessToken {
        let ttl_ms = TOKEN_TTL_SECS * 1000;
        let app: Arc<str> = Arc::from(app_id);
        if request == (TokenRequest::Stable { force_refresh: false })
            && let Some(current) = self.stable.get(&app)
            && current.1 > now_ms
            && self.by_hash.contains_key(&hash_secret(&current.0))
        {
            return AccessToken { token: current.0.clone(), expires_in_secs: (current.1 - now_ms) / 1000 };
        }
        let token = random_token(24);
        let hash = hash_secret(&token);
        let expires_at_ms = now_ms + ttl_ms;
        self.by_hash.insert(hash, Entry { app_id: app.clone(), expires_at_ms });
        // The stable token is kept apart from the fresh ones, so no number of fresh tokens pushes
        // it out; one that force_refresh replaced joins the fresh ones and ages out with them.
        let bounded = match request {
            TokenRequest::Fresh => Some(hash),
            TokenRequest::Stable { .. } => {
                self.stable.insert(app.clone(), (token.clone(), expires_at_ms)).map(|(old, _)| hash_secret(&old))
            }
        };
        if let Some(bounded) = bounded {
            let mut owned = self.per_app.entry(app).or_default();
            owned.push_back(bounded);
            while owned.len() > MAX_TOKENS_PER_APP {
                if let Some(old) = owned.pop_front() {
                    self.by_hash.remove(&old);
                }
            }
        }
        AccessToken { token, expires_in_secs: TOKEN_TTL_SECS }
    }

    /// The app a token was issued for, if it is live.
    pub fn verify(&self, token: &str, now_ms: u64) -> Result<Arc<str>, ExchangeFailure> {
        if token.is_empty() {
            return Err(ExchangeFailure::InvalidCredential);
        }
        let entry = self.by_hash.get(&hash_secret(token)).ok_or(ExchangeFailure::InvalidCredential)?;
        if entry.expires_at_ms <= now_ms {
            return Err(ExchangeFailure::TokenExpired);
        }
        Ok(entry.app_id.clone())
    }

    /// Forgets every token of `app_id` (its secret was rotated).
    pub fn revoke_app(&self, app_id: &str) {
        if let Some((_, hashes)) = self.per_app.remove(app_id) {
            hashes.iter().for_each(|h| drop(self.by_hash.remove(h)));
        }
        if let Some((_, (token, _))) = self.stable.remove(app_id) {
            self.by_hash.remove(&hash_secret(&token));
        }
    }

    /// Drops tokens that expired more than one lifetime ago; called periodically.
    pub fn sweep(&self, now_ms: u64) {
        let forget_before = now_ms.saturating_sub(TOKEN_TTL_SECS * 1000);
        self.by_hash.retain(|_, e| e.expires_at_ms > forget_before);
        self.per_app.retain(|_, hashes| {
            hashes.retain(|h| self.by_hash.contains_key(h));
            !hashes.is_empty()
        });
        self.stable.retain(|_, (_, expires_at_ms)| *expires_at_ms > now_ms);
    }

    /// Tokens held (status, tests).
    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_bound_to_their_app_and_expire() {
        let tokens = AccessTokens::default();
        let a = tokens.issue("a", TokenRequest::Fresh, 1_000);
        assert_eq!(a.expires_in_secs, 7200);
        assert_eq!(tokens.verify(&a.token, 1_000).as_deref(), Ok("a"));
        assert_eq!(tokens.verify(&a.token, 1_000 + 7_200_000), Err(ExchangeFailure::TokenExpired));
        assert_eq!(tokens.verify("nope", 1_000), Err(ExchangeFailure::InvalidCredential));
        tokens.sweep(1_000 + 2 * 7_200_000);
        assert_eq!(tokens.verify(&a.token, 1_000 + 2 * 7_200_000), Err(ExchangeFailure::InvalidCredential));
        assert!(tokens.is_empty());
    }

    #[test]
    fn stable_tokens_repeat_until_refreshed_and_apps_hold_a_bounded_number() {
        let tokens = AccessTokens::default();
        let s1 = tokens.issue("a", TokenRequest::Stable { force_refresh: false }, 0);
        let s2 = tokens.issue("a", TokenRequest::Stable { force_refresh: false }, 60_000);
        assert_eq!(s1.token, s2.token);
        assert_eq!(s2.expires_in_secs, 7140);
        let s3 = tokens.issue("a", TokenRequest::Stable { force_refresh: true }, 60_000);
        assert_ne!(s3.token, s1.token);
        for _ in 0..MAX_TOKENS_PER_APP {
            tokens.issue("a", TokenRequest::Fresh, 0);
        }
        assert_eq!(tokens.len(), MAX_TOKENS_PER_APP + 1, "the fresh ones, and the stable one");
        assert_eq!(tokens.verify(&s1.token, 0), Err(ExchangeFailure::InvalidCredential), "the oldest went first");
        assert_eq!(tokens.verify(&s3.token, 0).as_deref(), Ok("a"), "the stable token stays");
        tokens.revoke_app("a");
        assert!(tokens.is_empty());
    }
}
