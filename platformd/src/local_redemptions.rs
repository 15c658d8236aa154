//! Which codes a single SQLite instance redeemed, for the daemons that issued them.
//!
//! A daemon in remote mode stamps its user's disclosure ledger with what the platform reports
//! redeemed (`Redemptions`). On PostgreSQL the codes' rows answer that; the platform crate's SQLite
//! engine keeps codes in memory and forgets a redeemed one's details, so [`RecordingStore`] wraps it
//! and remembers each redemption (by the code's hash) for as long as a daemon may still ask.

use std::sync::Arc;

use dashmap::DashMap;
use miniapp_platform::{
    AccessToken, StoreError, TokenRequest, ValueKind,
    store::{CodeRecord, OpenidOf, PlatformStore, Quota, Redemption, SessionRow, TokenCheck, Wanted},
    tokens::hash_secret,
};
use tracing::warn;

/// Most redemptions remembered at once; past it a redemption is still made, only not reported
/// (its ledger row keeps no stamp).
const MAX_REMEMBERED: usize = 1_000_000;
/// The surface a code redeemed at the platform service went through.
const REDEEMED_VIA: &str = "backend_http";

/// One remembered redemption.
#[derive(Debug, Clone)]
struct Redeemed {
    /// The platform's uid of the code's user (`<superapp>/<uid>`).
    uid: String,
    at_ms: u64,
}

/// A platform store that remembers its redemptions. See the module docs.
#[derive(Debug)]
pub struct RecordingStore {
    inner: Arc<dyn PlatformStore>,
    redeemed: DashMap<[u8; 32], Redeemed>,
    /// How long a redemption is remembered.
    keep_ms: u64,
}

impl RecordingStore {
    pub fn new(inner: Arc<dyn PlatformStore>, keep_ms: u64) -> RecordingStore {
        RecordingStore { inner, redeemed: DashMap::new(), keep_ms }
    }

    /// Of `code_hashes`, the codes of `superapp`'s users that were redeemed: (hash, when, how).
    pub fn redemptions(&self, superapp: &str, code_hashes: &[Vec<u8>]) -> Vec<(Vec<u8>, u64, String)> {
        let prefix = crate::daemon_api::platform_uid(superapp, "");
        code_hashes
            .iter()
            .filter_map(|hash| {
                let key: [u8; 32] = hash.as_slice().try_into().ok()?;
                let found = self.redeemed.get(&key)?;
                found.uid.starts_with(&prefix).then(|| (hash.clone(), found.at_ms, REDEEMED_VIA.to_owned()))
            })
            .collect()
    }
}

#[async_trait::async_trait]
impl PlatformStore for RecordingStore {
    fn location(&self) -> String {
        self.inner.location()
    }

    async fn openid_secret(&self, fresh: [u8; 32]) -> Result<[u8; 32], StoreError> {
        self.inner.openid_secret(fresh).await
    }

    async fn fill_session_openids(&self, openid: &OpenidOf) -> Result<usize, StoreError> {
        self.inner.fill_session_openids(openid).await
    }

    async fn app_secret_hash(&self, app_id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.app_secret_hash(app_id).await
    }

    async fn set_app_secret_hash(&self, app_id: &str, hash: &[u8], replace: bool) -> Result<bool, StoreError> {
        self.inner.set_app_secret_hash(app_id, hash, replace).await
    }

    async fn start_session(&self, session: &SessionRow) -> Result<(), StoreError> {
        self.inner.start_session(session).await
    }

    async fn session(&self, app_id: &str, uid: &str) -> Result<Option<SessionRow>, StoreError> {
        self.inner.session(app_id, uid).await
    }

    async fn session_by_openid(&self, app_id: &str, openid: &str) -> Result<Option<SessionRow>, StoreError> {
        self.inner.session_by_openid(app_id, openid).await
    }

    async fn list_sessions(
        &self,
        app_id: Option<&str>,
        after: Option<(&str, &str)>,
        limit: u32,
    ) -> Result<Vec<SessionRow>, StoreError> {
        self.inner.list_sessions(app_id, after, limit).await
    }

    async fn user_changed(&self, uid: &str) -> Result<usize, StoreError> {
        self.inner.user_changed(uid).await
    }

    async fn issue_code(
        &self,
        code: &str,
        record: CodeRecord,
        session: Option<&SessionRow>,
        max_per_user: usize,
    ) -> Result<(), StoreError> {
        self.inner.issue_code(code, record, session, max_per_user).await
    }

    async fn redeem_code(
        &self,
        app_id: &str,
        code: &str,
        wanted: Wanted<'_>,
        now_ms: u64,
    ) -> Result<Redemption, StoreError> {
        let outcome = self.inner.redeem_code(app_id, code, wanted, now_ms).await?;
        if let Redemption::Redeemed(record) = &outcome {
            if self.redeemed.len() < MAX_REMEMBERED {
                self.redeemed.insert(hash_secret(code), Redeemed { uid: record.uid.clone(), at_ms: now_ms });
            } else {
                warn!(app_id, "too many redemptions remembered; this one is not reported to its daemon");
            }
        }
        Ok(outcome)
    }

    async fn invalidate_codes(&self, app_id: &str, uid: &str, kind: Option<ValueKind>) -> Result<usize, StoreError> {
        self.inner.invalidate_codes(app_id, uid, kind).await
    }

    async fn sweep(&self, now_ms: u64) -> Result<(), StoreError> {
        let keep_from = now_ms.saturating_sub(self.keep_ms);
        self.redeemed.retain(|_, r| r.at_ms >= keep_from);
        self.inner.sweep(now_ms).await
    }

    async fn outstanding_codes(&self) -> Result<usize, StoreError> {
        self.inner.outstanding_codes().await
    }

    async fn issue_token(&self, app_id: &str, request: TokenRequest, now_ms: u64) -> Result<AccessToken, StoreError> {
        self.inner.issue_token(app_id, request, now_ms).await
    }

    async fn verify_token(&self, token: &str, now_ms: u64) -> Result<TokenCheck, StoreError> {
        self.inner.verify_token(token, now_ms).await
    }

    async fn revoke_tokens(&self, app_id: &str) -> Result<(), StoreError> {
        self.inner.revoke_tokens(app_id).await
    }

    async fn take_attempt(&self, key: &str, quota: Quota, now_ms: u64) -> Result<bool, StoreError> {
        self.inner.take_attempt(key, quota, now_ms).await
    }
}
