//! The platform store trait on PostgreSQL: the platform crate's logic (codes, sessions, openid,
//! access tokens, rate limits, the backend HTTP API) runs unchanged over [`PgStore`], so every
//! instance on one database is the same platform. Each method is one statement (one transaction)
//! except where noted; the statements are in [`crate::postgres`] and here.

use miniapp_platform::{
    AccessToken, StoreError, TokenRequest, ValueKind,
    access_tokens::{MAX_TOKENS_PER_APP, TOKEN_TTL_SECS},
    store::{CodeRecord, PlatformStore, Purpose, Quota, Redemption, SessionRow, TokenCheck, Wanted},
    tokens::{hash_secret, random_token},
};
use tokio_postgres::Row;

use crate::postgres::{NewCode, NewSession, PgError, PgStore, Rate, StoredPurpose};

impl From<PgError> for StoreError {
    fn from(e: PgError) -> Self {
        match e {
            PgError::Unavailable(why) => StoreError::Unavailable(why),
            other => StoreError::Other(other.to_string()),
        }
    }
}

fn purpose_of(kind: ValueKind) -> StoredPurpose {
    match kind {
        ValueKind::PhoneNumber => StoredPurpose::PhoneNumber,
        ValueKind::Email => StoredPurpose::Email,
    }
}

fn session_row(r: &Row) -> SessionRow {
    SessionRow {
        app_id: r.get(0),
        uid: r.get(1),
        openid: r.get(2),
        session_key: r.get(3),
        created_at_ms: r.get::<_, i64>(4) as u64,
        expires_at_ms: r.get::<_, i64>(5) as u64,
    }
}

/// The surface a code redeemed at the platform service went through: its backend HTTP API.
const REDEEMED_VIA: &str = "backend_http";

#[async_trait::async_trait]
impl PlatformStore for PgStore {
    fn location(&self) -> String {
        self.location().to_owned()
    }

    async fn openid_secret(&self, fresh: [u8; 32]) -> Result<[u8; 32], StoreError> {
        Ok(PgStore::openid_secret(self, fresh).await?)
    }

    async fn app_secret_hash(&self, app_id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let rows = self.query("SELECT secret_hash FROM app_secrets WHERE app_id = $1", &[&app_id]).await?;
        Ok(rows.first().map(|r| r.get(0)))
    }

    async fn set_app_secret_hash(&self, app_id: &str, hash: &[u8], replace: bool) -> Result<bool, StoreError> {
        let hash: [u8; 32] = hash.try_into().map_err(|_| StoreError::Other("a secret hash is 32 bytes".into()))?;
        Ok(PgStore::set_app_secret_hash(self, app_id, &hash, replace).await?)
    }

    async fn start_session(&self, s: &SessionRow) -> Result<(), StoreError> {
        Ok(self
            .upsert_session(&NewSession {
                app_id: &s.app_id,
                uid: &s.uid,
                openid: &s.openid,
                session_key: &s.session_key,
                created_at_ms: s.created_at_ms,
                expires_at_ms: s.expires_at_ms,
            })
            .await?)
    }

    async fn session(&self, app_id: &str, uid: &str) -> Result<Option<SessionRow>, StoreError> {
        let rows = self
            .query(
                "SELECT app_id, uid, openid, session_key, created_at_ms, expires_at_ms FROM sessions
                 WHERE app_id = $1 AND uid = $2",
                &[&app_id, &uid],
            )
            .await?;
        Ok(rows.first().map(session_row))
    }

    async fn session_by_openid(&self, app_id: &str, openid: &str) -> Result<Option<SessionRow>, StoreError> {
        let rows = self
            .query(
                "SELECT app_id, uid, openid, session_key, created_at_ms, expires_at_ms FROM sessions
                 WHERE app_id = $1 AND openid = $2",
                &[&app_id, &openid],
            )
            .await?;
        Ok(rows.first().map(session_row))
    }

    async fn list_sessions(
        &self,
        app_id: Option<&str>,
        after: Option<(&str, &str)>,
        limit: u32,
    ) -> Result<Vec<SessionRow>, StoreError> {
        let (after_app, after_uid) = after.unzip();
        let rows = self
            .query(
                "SELECT app_id, uid, openid, session_key, created_at_ms, expires_at_ms FROM sessions
                 WHERE ($1::TEXT IS NULL OR app_id = $1) AND ($2::TEXT IS NULL OR (app_id, uid) > ($2, $3::TEXT))
                 ORDER BY app_id, uid LIMIT $4",
                &[&app_id, &after_app, &after_uid, &i64::from(limit)],
            )
            .await?;
        Ok(rows.iter().map(session_row).collect())
    }

    async fn user_changed(&self, uid: &str) -> Result<usize, StoreError> {
        let rows = self
            .query(
                "WITH ended AS (DELETE FROM sessions WHERE uid = $1 RETURNING 1),
                      dropped AS (UPDATE codes SET invalidated = TRUE, value = NULL, session_key = NULL
                                  WHERE uid = $1 AND redeemed_at_ms IS NULL AND NOT invalidated)
                 SELECT COUNT(*) FROM ended",
                &[&uid],
            )
            .await?;
        Ok(rows[0].get::<_, i64>(0) as usize)
    }

    async fn issue_code(
        &self,
        code: &str,
        record: CodeRecord,
        session: Option<&SessionRow>,
        max_per_user: usize,
    ) -> Result<(), StoreError> {
        let (purpose, session_key, auth_code, value) = match &record.purpose {
            // A login code redeems to its session's key at redemption, not at issue.
            Purpose::Login { auth_code } => (StoredPurpose::Login, None, auth_code.as_deref(), None),
            Purpose::Value { kind, value } => (purpose_of(*kind), None, None, Some(value.as_str())),
        };
        let ledger: Vec<i64> = record.ledger.iter().map(|&id| id as i64).collect();
        let new = NewCode {
            code_hash: hash_secret(code),
            app_id: &record.app_id,
            uid: &record.uid,
            openid: &record.openid,
            purpose,
            session_key,
            auth_code,
            value,
            issued_at_ms: session.map_or(0, |s| s.created_at_ms),
            expires_at_ms: record.expires_at_ms,
        };
        let session = session.map(|s| NewSession {
            app_id: &s.app_id,
            uid: &s.uid,
            openid: &s.openid,
            session_key: &s.session_key,
            created_at_ms: s.created_at_ms,
            expires_at_ms: s.expires_at_ms,
        });
        PgStore::issue_code(self, &new, session.as_ref(), max_per_user as i64, &ledger).await?;
        Ok(())
    }

    async fn redeem_code(
        &self,
        app_id: &str,
        code: &str,
        wanted: Wanted<'_>,
        now_ms: u64,
    ) -> Result<Redemption, StoreError> {
        let (purpose, openid) = match wanted {
            Wanted::Login => (StoredPurpose::Login, None),
            Wanted::Value { kind, openid } => (purpose_of(kind), openid),
        };
        use crate::postgres::Redeemed;
        Ok(
            match PgStore::redeem_code(self, &hash_secret(code), app_id, purpose, openid, REDEEMED_VIA, now_ms).await? {
                Redeemed::Taken(t) => Redemption::Redeemed(CodeRecord {
                    app_id: app_id.to_owned(),
                    uid: t.uid,
                    openid: t.openid,
                    purpose: match wanted {
                        Wanted::Login => Purpose::Login { auth_code: t.auth_code },
                        Wanted::Value { kind, .. } => Purpose::Value { kind, value: t.value.unwrap_or_default() },
                    },
                    expires_at_ms: t.expires_at_ms,
                    ledger: t.ledger.into_iter().map(|id| id as u64).collect(),
                }),
                Redeemed::Used => Redemption::Used,
                Redeemed::Expired => Redemption::Expired,
                Redeemed::Invalid => Redemption::Invalid,
            },
        )
    }

    async fn invalidate_codes(&self, app_id: &str, uid: &str, kind: Option<ValueKind>) -> Result<usize, StoreError> {
        Ok(PgStore::invalidate_codes(self, app_id, uid, kind.map(purpose_of)).await? as usize)
    }

    async fn sweep(&self, now_ms: u64) -> Result<(), StoreError> {
        Ok(PgStore::sweep(self, now_ms, TOKEN_TTL_SECS * 1000).await?)
    }

    async fn outstanding_codes(&self) -> Result<usize, StoreError> {
        let rows =
            self.query("SELECT COUNT(*) FROM codes WHERE redeemed_at_ms IS NULL AND NOT invalidated", &[]).await?;
        Ok(rows[0].get::<_, i64>(0) as usize)
    }

    async fn issue_token(&self, app_id: &str, request: TokenRequest, now_ms: u64) -> Result<AccessToken, StoreError> {
        let ttl_ms = TOKEN_TTL_SECS * 1000;
        let token = random_token(24);
        let hash = hash_secret(&token);
        match request {
            TokenRequest::Fresh => {
                self.insert_token(&hash, app_id, now_ms, now_ms + ttl_ms, MAX_TOKENS_PER_APP as i64).await?;
                Ok(AccessToken { token, expires_in_secs: TOKEN_TTL_SECS })
            }
            TokenRequest::Stable { force_refresh } => {
                let (token, expires_at_ms) =
                    self.stable_token(app_id, &token, &hash, force_refresh, now_ms, now_ms + ttl_ms).await?;
                Ok(AccessToken { token, expires_in_secs: expires_at_ms.saturating_sub(now_ms) / 1000 })
            }
        }
    }

    async fn verify_token(&self, token: &str, now_ms: u64) -> Result<TokenCheck, StoreError> {
        if token.is_empty() {
            return Ok(TokenCheck::Unknown);
        }
        let rows = self
            .query("SELECT app_id, expires_at_ms FROM access_tokens WHERE token_hash = $1", &[&&hash_secret(token)[..]])
            .await?;
        Ok(match rows.first() {
            None => TokenCheck::Unknown,
            Some(r) if r.get::<_, i64>(1) as u64 <= now_ms => TokenCheck::Expired,
            Some(r) => TokenCheck::Valid(r.get(0)),
        })
    }

    async fn revoke_tokens(&self, app_id: &str) -> Result<(), StoreError> {
        self.execute(
            "WITH a AS (DELETE FROM access_tokens WHERE app_id = $1) DELETE FROM stable_tokens WHERE app_id = $1",
            &[&app_id],
        )
        .await?;
        Ok(())
    }

    async fn take_attempt(&self, key: &str, quota: Quota, _now_ms: u64) -> Result<bool, StoreError> {
        // The database's clock, not the instance's: every instance takes from one bucket on one
        // clock.
        Ok(self.take(key, Rate { per_minute: quota.per_minute, burst: quota.burst }).await?)
    }
}
