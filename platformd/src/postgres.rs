//! The platform's PostgreSQL engine: the state every `miniapp-platformd serve` instance shares.
//!
//! Nothing that decides an answer lives in an instance: codes, sessions, access tokens, the openid
//! secret, tenants and the per-app rate buckets are rows here, so any instance answers any request.
//! Each decision is one statement, which PostgreSQL serialises on the row it touches:
//! - a code is redeemed by `UPDATE … WHERE redeemed_at_ms IS NULL … RETURNING` (of two instances
//!   racing for it, the second finds the row already redeemed once the first commits);
//! - issuing a login code upserts the session and inserts the code in one statement (one
//!   transaction, one round trip);
//! - the rate limit is a GCRA bucket per app (its theoretical arrival time, in the database's own
//!   clock so that instances' clocks do not matter), taken by one conditional upsert together with
//!   the credential check;
//! - the openid secret is inserted once (`ON CONFLICT DO NOTHING`) and read back, so instances
//!   starting together agree on it.
//!
//! Every call has a deadline (the pool's wait and connect timeouts, the server's
//! `statement_timeout`, and an outer timeout around the whole call); past it the call fails with
//! [`PgError::Unavailable`], which the platform answers as "system busy" at once.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use tokio_postgres::{NoTls, Row, types::ToSql};

/// Why a database call failed.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// The database could not be reached, or did not answer within the call's deadline.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The database answered with an error.
    #[error("database: {0}")]
    Db(#[from] tokio_postgres::Error),
    /// A `--database-url` that is not a PostgreSQL URL.
    #[error("database url: {0}")]
    Url(String),
}

/// What to connect with.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// Connections per instance.
    pub pool_size: usize,
    /// The longest any one call may take, waiting for a connection included.
    pub deadline: Duration,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions { pool_size: 16, deadline: Duration::from_secs(2) }
    }
}

/// The schema, one step per version; a step runs once, in order, in a transaction holding an
/// advisory lock, so instances starting together migrate once.
const MIGRATIONS: &[&str] = &[
    // 1: the first schema.
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value BYTEA NOT NULL);
     CREATE TABLE superapps (
         name TEXT PRIMARY KEY, client_key TEXT NOT NULL UNIQUE, secret_hash BYTEA NOT NULL,
         created_at_ms BIGINT NOT NULL);
     CREATE TABLE app_owners (app_id TEXT PRIMARY KEY, superapp TEXT NOT NULL REFERENCES superapps (name));
     CREATE INDEX app_owners_superapp ON app_owners (superapp);
     CREATE TABLE app_secrets (app_id TEXT PRIMARY KEY, secret_hash BYTEA NOT NULL, set_at_ms BIGINT NOT NULL);
     CREATE TABLE sessions (
         app_id TEXT NOT NULL, uid TEXT NOT NULL, openid TEXT NOT NULL, session_key TEXT NOT NULL,
         created_at_ms BIGINT NOT NULL, expires_at_ms BIGINT NOT NULL,
         PRIMARY KEY (app_id, uid));
     CREATE INDEX sessions_openid ON sessions (app_id, openid);
     CREATE INDEX sessions_uid ON sessions (uid);
     CREATE TABLE codes (
         code_id BIGSERIAL PRIMARY KEY, code_hash BYTEA NOT NULL UNIQUE,
         app_id TEXT NOT NULL, uid TEXT NOT NULL, openid TEXT NOT NULL,
         purpose SMALLINT NOT NULL, session_key TEXT, auth_code TEXT, value TEXT,
         issued_at_ms BIGINT NOT NULL, expires_at_ms BIGINT NOT NULL,
         redeemed_at_ms BIGINT, redeemed_via TEXT, invalidated BOOLEAN NOT NULL DEFAULT FALSE,
         ledger BIGINT[] NOT NULL DEFAULT '{}');
     CREATE INDEX codes_outstanding ON codes (app_id, uid) WHERE redeemed_at_ms IS NULL AND NOT invalidated;
     CREATE INDEX codes_expires ON codes (expires_at_ms);
     CREATE TABLE access_tokens (
         token_hash BYTEA PRIMARY KEY, app_id TEXT NOT NULL, issued_at_ms BIGINT NOT NULL,
         expires_at_ms BIGINT NOT NULL);
     CREATE INDEX access_tokens_app ON access_tokens (app_id, issued_at_ms);
     CREATE TABLE stable_tokens (app_id TEXT PRIMARY KEY, token TEXT NOT NULL, expires_at_ms BIGINT NOT NULL);
     CREATE TABLE rate_buckets (app_id TEXT PRIMARY KEY, tat_us BIGINT NOT NULL);
     CREATE INDEX sessions_expires ON sessions (expires_at_ms);",
    // 2: the superapp's server (`superapp add --server-url`), for v3.
    "ALTER TABLE superapps ADD COLUMN server_url TEXT;",
    // 3: the key pair the platform signs its requests to that server with (PKCS#8 PEM), made at
    // first need and shared by every instance.
    "ALTER TABLE superapps ADD COLUMN signing_key TEXT;",
];

/// The advisory lock key migrations hold ("miniapp" in ASCII).
const MIGRATION_LOCK: i64 = 0x6d_69_6e_69_61_70_70;

/// What a code stands for, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredPurpose {
    Login = 1,
    PhoneNumber = 2,
    Email = 3,
}

/// A code about to be stored (its hash: the code itself is never stored).
#[derive(Debug, Clone)]
pub struct NewCode<'a> {
    pub code_hash: [u8; 32],
    pub app_id: &'a str,
    pub uid: &'a str,
    pub openid: &'a str,
    pub purpose: StoredPurpose,
    pub session_key: Option<&'a str>,
    pub auth_code: Option<&'a str>,
    pub value: Option<&'a str>,
    pub issued_at_ms: u64,
    pub expires_at_ms: u64,
}

/// A session to start with a login code, or alone.
#[derive(Debug, Clone)]
pub struct NewSession<'a> {
    pub app_id: &'a str,
    pub uid: &'a str,
    pub openid: &'a str,
    pub session_key: &'a str,
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
}

/// A redeemed code's contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taken {
    pub code_id: i64,
    pub uid: String,
    pub session_key: Option<String>,
    pub auth_code: Option<String>,
    pub value: Option<String>,
    pub openid: String,
    pub expires_at_ms: u64,
    /// The code's rows in the issuer's disclosure ledger.
    pub ledger: Vec<i64>,
}

/// The outcome of a redemption attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redeemed {
    Taken(Taken),
    /// Redeemed before.
    Used,
    Expired,
    /// Unknown, another app's, another purpose or user, invalidated.
    Invalid,
}

/// An app's rate: a GCRA with this emission interval and burst.
#[derive(Debug, Clone, Copy)]
pub struct Rate {
    pub per_minute: u32,
    pub burst: u32,
}

impl Rate {
    fn interval_us(self) -> i64 {
        60_000_000 / i64::from(self.per_minute.max(1))
    }

    fn tolerance_us(self) -> i64 {
        self.interval_us() * i64::from(self.burst.max(1) - 1)
    }
}

/// One GCRA take for the app `$1` (the interval `$2`, the tolerance `$3`, in µs of the database's
/// clock), as a CTE named `take` yielding a row when the attempt is allowed; `$SOURCE` names the
/// CTE whose `app_id` it takes for.
macro_rules! take_for {
    ($source:literal) => {
        concat!(
            "take AS (
               INSERT INTO rate_buckets AS b (app_id, tat_us)
               SELECT app_id, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint + $2 FROM ",
            $source,
            " ON CONFLICT (app_id) DO UPDATE
                 SET tat_us = GREATEST(b.tat_us, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint) + $2
                 WHERE GREATEST(b.tat_us, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint)
                       - (extract(epoch FROM clock_timestamp()) * 1000000)::bigint <= $3
               RETURNING 1)"
        )
    };
}

/// The PostgreSQL engine. See the module docs.
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    deadline: Duration,
    /// Where, for status output (never the password).
    location: String,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").field("deadline", &self.deadline).finish_non_exhaustive()
    }
}

impl PgStore {
    /// A pool for `url` (no connection is made until the first call).
    pub fn connect(url: &str, options: &PgOptions) -> Result<PgStore, PgError> {
        let mut config: tokio_postgres::Config =
            url.parse().map_err(|e: tokio_postgres::Error| PgError::Url(e.to_string()))?;
        let deadline_ms = options.deadline.as_millis().max(1);
        config
            .connect_timeout(options.deadline)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(10))
            .application_name("miniapp-platformd")
            .options(format!(
                "-c statement_timeout={deadline_ms} -c lock_timeout={deadline_ms} -c idle_in_transaction_session_timeout={}",
                deadline_ms * 5
            ));
        let hosts: Vec<String> = config
            .get_hosts()
            .iter()
            .map(|h| match h {
                tokio_postgres::config::Host::Tcp(name) => name.clone(),
                #[cfg(unix)]
                tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
            })
            .collect();
        let location = format!("postgres://{}/{}", hosts.join(","), config.get_dbname().unwrap_or(""));
        let manager = Manager::from_config(config, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(manager)
            .max_size(options.pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(options.deadline))
            .create_timeout(Some(options.deadline))
            .recycle_timeout(Some(options.deadline))
            .build()
            .map_err(|e| PgError::Url(e.to_string()))?;
        Ok(PgStore { pool, deadline: options.deadline, location })
    }

    /// Where the data lives, for status output (no credentials).
    pub fn location(&self) -> &str {
        &self.location
    }

    /// Runs `f` on a pooled connection within the deadline.
    async fn with<T, F>(&self, f: F) -> Result<T, PgError>
    where
        F: AsyncFnOnce(&Object) -> Result<T, PgError>,
    {
        let call = async {
            let client = self.pool.get().await.map_err(|e| PgError::Unavailable(e.to_string()))?;
            f(&client).await
        };
        match tokio::time::timeout(self.deadline, call).await {
            Ok(Err(PgError::Db(e))) if e.is_closed() || e.as_db_error().is_none() => {
                Err(PgError::Unavailable(e.to_string()))
            }
            Ok(Err(PgError::Db(e))) if is_timeout(&e) => Err(PgError::Unavailable(e.to_string())),
            Ok(result) => result,
            Err(_) => Err(PgError::Unavailable(format!("no answer within {:?}", self.deadline))),
        }
    }

    pub(crate) async fn query(&self, sql: &'static str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, PgError> {
        self.with(async |c| {
            let stmt = c.prepare_cached(sql).await?;
            Ok(c.query(&stmt, params).await?)
        })
        .await
    }

    pub(crate) async fn execute(&self, sql: &'static str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, PgError> {
        self.with(async |c| {
            let stmt = c.prepare_cached(sql).await?;
            Ok(c.execute(&stmt, params).await?)
        })
        .await
    }

    /// Brings the schema up to date (run at start and by `migrate`); returns how many steps ran.
    pub async fn migrate(&self) -> Result<usize, PgError> {
        let client = tokio::time::timeout(self.deadline, self.pool.get())
            .await
            .map_err(|_| PgError::Unavailable("no connection within the deadline".into()))?
            .map_err(|e| PgError::Unavailable(e.to_string()))?;
        let mut client = client;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INT PRIMARY KEY, applied_at_ms BIGINT NOT NULL)",
        )
        .await?;
        let done: i32 = tx.query_one("SELECT COALESCE(MAX(version), 0) FROM schema_migrations", &[]).await?.get(0);
        let mut ran = 0;
        for (i, step) in MIGRATIONS.iter().enumerate().skip(done.max(0) as usize) {
            tx.batch_execute(step).await?;
            tx.execute(
                "INSERT INTO schema_migrations (version, applied_at_ms) VALUES ($1, $2)",
                &[&(i as i32 + 1), &now_ms()],
            )
            .await?;
            ran += 1;
        }
        tx.commit().await?;
        Ok(ran)
    }

    /// The database answers (`/readyz`).
    pub async fn ping(&self) -> Result<(), PgError> {
        self.query("SELECT 1", &[]).await.map(drop)
    }

    /// The 32-byte secret that keys openids, created once for every instance.
    pub async fn openid_secret(&self, fresh: [u8; 32]) -> Result<[u8; 32], PgError> {
        let rows = self
            .query(
                "WITH ins AS (INSERT INTO meta (key, value) VALUES ('openid_secret', $1)
                              ON CONFLICT (key) DO NOTHING RETURNING value)
                 SELECT value FROM ins UNION ALL SELECT value FROM meta WHERE key = 'openid_secret'",
                &[&&fresh[..]],
            )
            .await?;
        // An instance that lost the race inserted nothing, and its statement's snapshot may predate
        // the winner's commit: a second statement (a new snapshot) reads the winner's secret.
        let rows = match rows.is_empty() {
            false => rows,
            true => self.query("SELECT value FROM meta WHERE key = 'openid_secret'", &[]).await?,
        };
        let bytes: Vec<u8> = rows.first().map(|r| r.get(0)).ok_or_else(|| PgError::Unavailable("no secret".into()))?;
        bytes.try_into().map_err(|_| PgError::Url("the stored openid secret is not 32 bytes".into()))
    }

    /// Adds a superapp (with its server's URL, when it has one); false when the name is taken.
    pub async fn add_superapp(
        &self,
        name: &str,
        client_key: &str,
        secret_hash: &[u8; 32],
        server_url: Option<&str>,
    ) -> Result<bool, PgError> {
        let n = self
            .execute(
                "INSERT INTO superapps (name, client_key, secret_hash, created_at_ms, server_url)
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                &[&name, &client_key, &&secret_hash[..], &now_ms(), &server_url],
            )
            .await?;
        Ok(n == 1)
    }

    /// The superapp's server URL (if it has one) and client key; `None` for no such superapp.
    pub async fn superapp_server(&self, name: &str) -> Result<Option<(Option<String>, String)>, PgError> {
        let rows = self.query("SELECT server_url, client_key FROM superapps WHERE name = $1", &[&name]).await?;
        Ok(rows.first().map(|r| (r.get(0), r.get(1))))
    }

    /// The superapp's signing key, `fresh` stored first when it has none (the first instance to
    /// store one wins; every instance then reads that one; `None`: only read). `None` for no such
    /// superapp, or none stored and none offered.
    pub async fn signing_key(&self, name: &str, fresh: Option<&str>) -> Result<Option<String>, PgError> {
        let Some(fresh) = fresh else {
            let rows = self.query("SELECT signing_key FROM superapps WHERE name = $1", &[&name]).await?;
            return Ok(rows.first().and_then(|r| r.get(0)));
        };
        let rows = self
            .query(
                "WITH up AS (UPDATE superapps SET signing_key = $2 WHERE name = $1 AND signing_key IS NULL
                             RETURNING signing_key)
                 SELECT COALESCE((SELECT signing_key FROM up), (SELECT signing_key FROM superapps WHERE name = $1))",
                &[&name, &fresh],
            )
            .await?;
        Ok(rows.first().and_then(|r| r.get(0)))
    }

    /// The superapp holding `client_key`, with its secret's hash.
    pub async fn superapp_by_key(&self, client_key: &str) -> Result<Option<(String, Vec<u8>)>, PgError> {
        let rows = self.query("SELECT name, secret_hash FROM superapps WHERE client_key = $1", &[&client_key]).await?;
        Ok(rows.first().map(|r| (r.get(0), r.get(1))))
    }

    /// Makes `app_id` `superapp`'s, unless it is another's: one statement.
    pub async fn claim_app(&self, app_id: &str, superapp: &str) -> Result<crate::tenants::Claim, PgError> {
        use crate::tenants::Claim;
        let rows = self
            .query(
                "WITH s AS (SELECT name FROM superapps WHERE name = $2),
                      ins AS (INSERT INTO app_owners (app_id, superapp) SELECT $1::TEXT, name FROM s
                              ON CONFLICT (app_id) DO NOTHING RETURNING superapp)
                 SELECT EXISTS (SELECT 1 FROM s),
                        COALESCE((SELECT superapp FROM ins), (SELECT superapp FROM app_owners WHERE app_id = $1))",
                &[&app_id, &superapp],
            )
            .await?;
        let (exists, owner): (bool, Option<String>) = (rows[0].get(0), rows[0].get(1));
        Ok(match (exists, owner) {
            (false, _) => Claim::NoSuperapp,
            (true, Some(owner)) if owner == superapp => Claim::Ours,
            _ => Claim::OtherSuperapp,
        })
    }

    /// Sets the app's secret (replaces one only with `rotate`; then the app's access tokens go
    /// too, on every instance at once): one statement. Returns whether it was written.
    pub async fn set_app_secret_hash(
        &self,
        app_id: &str,
        secret_hash: &[u8; 32],
        rotate: bool,
    ) -> Result<bool, PgError> {
        let rows = self
            .query(
                "WITH up AS (INSERT INTO app_secrets AS a (app_id, secret_hash, set_at_ms) VALUES ($1, $2, $4)
                             ON CONFLICT (app_id) DO UPDATE SET secret_hash = $2, set_at_ms = $4 WHERE $3::BOOLEAN
                             RETURNING 1),
                      revoke AS (DELETE FROM access_tokens WHERE app_id = $1 AND EXISTS (SELECT 1 FROM up)),
                      unstable AS (DELETE FROM stable_tokens WHERE app_id = $1 AND EXISTS (SELECT 1 FROM up))
                 SELECT EXISTS (SELECT 1 FROM up)",
                &[&app_id, &&secret_hash[..], &rotate, &now_ms()],
            )
            .await?;
        Ok(rows[0].get(0))
    }

    /// The superapp an app belongs to.
    pub async fn app_superapp(&self, app_id: &str) -> Result<Option<String>, PgError> {
        let rows = self.query("SELECT superapp FROM app_owners WHERE app_id = $1", &[&app_id]).await?;
        Ok(rows.first().map(|r| r.get(0)))
    }

    /// Takes one attempt from the bucket `key` if it has one left: one conditional upsert of the
    /// bucket's theoretical arrival time, in the database's clock.
    pub async fn take(&self, key: &str, rate: Rate) -> Result<bool, PgError> {
        let rows = self
            .query(
                concat!(
                    "WITH k AS (SELECT $1::TEXT AS app_id), ",
                    take_for!("k"),
                    " SELECT EXISTS (SELECT 1 FROM take)"
                ),
                &[&key, &rate.interval_us(), &rate.tolerance_us()],
            )
            .await?;
        Ok(rows[0].get(0))
    }

    /// Stores a fresh token of `app_id`, keeping at most `max_per_app` of its fresh tokens (the
    /// oldest go first).
    pub async fn insert_token(
        &self,
        token_hash: &[u8; 32],
        app_id: &str,
        now_ms: u64,
        expires_at_ms: u64,
        max_per_app: i64,
    ) -> Result<(), PgError> {
        self.execute(
            "WITH ins AS (INSERT INTO access_tokens (token_hash, app_id, issued_at_ms, expires_at_ms)
                          VALUES ($1, $2, $3, $4))
             DELETE FROM access_tokens WHERE token_hash IN (
                 SELECT token_hash FROM access_tokens WHERE app_id = $2
                 ORDER BY issued_at_ms DESC, token_hash OFFSET $5)",
            &[&&token_hash[..], &app_id, &(now_ms as i64), &(expires_at_ms as i64), &(max_per_app - 1).max(0)],
        )
        .await
        .map(drop)
    }

    /// The app's stable token while it has time left, else `fresh` becomes it (also its hash as
    /// an access token): one statement, so instances racing agree on one stable token.
    pub async fn stable_token(
        &self,
        app_id: &str,
        fresh: &str,
        fresh_hash: &[u8; 32],
        force_refresh: bool,
        now_ms: u64,
        expires_at_ms: u64,
    ) -> Result<(String, u64), PgError> {
        let rows = self
            .query(
                "WITH up AS (INSERT INTO stable_tokens AS s (app_id, token, expires_at_ms) VALUES ($1, $2, $6)
                             ON CONFLICT (app_id) DO UPDATE SET token = $2, expires_at_ms = $6
                               WHERE $4::BOOLEAN OR s.expires_at_ms <= $5
                             RETURNING token, expires_at_ms),
                      tok AS (INSERT INTO access_tokens (token_hash, app_id, issued_at_ms, expires_at_ms)
                              SELECT $3::BYTEA, $1::TEXT, $5::BIGINT, $6::BIGINT FROM up)
                 SELECT token, expires_at_ms FROM up
                 UNION ALL SELECT token, expires_at_ms FROM stable_tokens WHERE app_id = $1 AND NOT EXISTS (SELECT 1 FROM up)",
                &[&app_id, &fresh, &&fresh_hash[..], &force_refresh, &(now_ms as i64), &(expires_at_ms as i64)],
            )
            .await?;
        // Lost a race to another instance whose row this statement's snapshot predates: read it
        // with a new one.
        let rows = match rows.is_empty() {
            false => rows,
            true => self.query("SELECT token, expires_at_ms FROM stable_tokens WHERE app_id = $1", &[&app_id]).await?,
        };
        let row = rows.first().ok_or_else(|| PgError::Unavailable("no stable token".into()))?;
        Ok((row.get(0), row.get::<_, i64>(1) as u64))
    }

    /// Stores a code and, for a login code, upserts its session, in one statement (both or
    /// neither); at most `cap` codes of (app, uid) stay outstanding (the oldest are invalidated).
    /// Returns the code's id.
    pub async fn issue_code(
        &self,
        code: &NewCode<'_>,
        session: Option<&NewSession<'_>>,
        cap: i64,
        ledger: &[i64],
    ) -> Result<i64, PgError> {
        let s = session;
        let rows = self
            .query(
                "WITH sess AS (INSERT INTO sessions (app_id, uid, openid, session_key, created_at_ms, expires_at_ms)
                               SELECT $2::TEXT, $3::TEXT, $4::TEXT, $12::TEXT, $13::BIGINT, $14::BIGINT WHERE $11::BOOLEAN
                               ON CONFLICT (app_id, uid) DO UPDATE
                                 SET session_key = $12, created_at_ms = $13, expires_at_ms = $14),
                      old AS (UPDATE codes SET invalidated = TRUE WHERE code_id IN (
                                 SELECT code_id FROM codes
                                 WHERE app_id = $2 AND uid = $3 AND redeemed_at_ms IS NULL AND NOT invalidated
                                 ORDER BY code_id DESC OFFSET $15::BIGINT))
                 INSERT INTO codes (code_hash, app_id, uid, openid, purpose, session_key, auth_code, value,
                                    issued_at_ms, expires_at_ms, ledger)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $16)
                 RETURNING code_id",
                &[
                    &&code.code_hash[..],
                    &code.app_id,
                    &code.uid,
                    &code.openid,
                    &(code.purpose as i16),
                    &code.session_key,
                    &code.auth_code,
                    &code.value,
                    &(code.issued_at_ms as i64),
                    &(code.expires_at_ms as i64),
                    &s.is_some(),
                    &s.map(|s| s.session_key),
                    &s.map(|s| s.created_at_ms as i64),
                    &s.map(|s| s.expires_at_ms as i64),
                    &(cap - 1).max(0),
                    &ledger,
                ],
            )
            .await?;
        Ok(rows[0].get(0))
    }

    /// Redeems the code with `code_hash` if it is `app_id`'s, of `purpose`, live, not redeemed
    /// nor invalidated, and (with `openid`) that user's: one statement decides, and the value
    /// leaves the database with the redemption (the row keeps only that it was redeemed).
    pub async fn redeem_code(
        &self,
        code_hash: &[u8; 32],
        app_id: &str,
        purpose: StoredPurpose,
        openid: Option<&str>,
        surface: &str,
        now_ms: u64,
    ) -> Result<Redeemed, PgError> {
        let now = now_ms as i64;
        let rows = self
            .query(
                "UPDATE codes c SET redeemed_at_ms = $4, redeemed_via = $5, value = NULL, session_key = NULL
                 FROM codes o
                 WHERE c.code_hash = $1 AND o.code_id = c.code_id AND c.app_id = $2 AND c.purpose = $3
                   AND c.redeemed_at_ms IS NULL AND NOT c.invalidated AND c.expires_at_ms > $4
                   AND ($6::TEXT IS NULL OR c.openid = $6)
                 RETURNING c.code_id, c.uid, o.session_key, o.auth_code, o.value, c.openid, c.expires_at_ms, c.ledger",
                &[&&code_hash[..], &app_id, &(purpose as i16), &now, &surface, &openid],
            )
            .await?;
        if let Some(r) = rows.first() {
            return Ok(Redeemed::Taken(Taken {
                code_id: r.get(0),
                uid: r.get(1),
                session_key: r.get(2),
                auth_code: r.get(3),
                value: r.get(4),
                openid: r.get(5),
                expires_at_ms: r.get::<_, i64>(6) as u64,
                ledger: r.get(7),
            }));
        }
        // Why not (the refusal path only): the app's own replay hears "code been used" from any
        // instance; another app's code is, to this app, a code that never existed.
        let rows = self
            .query(
                "SELECT redeemed_at_ms IS NOT NULL AND app_id = $2, expires_at_ms <= $4, app_id = $2 AND purpose = $3
                        AND NOT invalidated AND ($5::TEXT IS NULL OR openid = $5)
                 FROM codes WHERE code_hash = $1",
                &[&&code_hash[..], &app_id, &(purpose as i16), &now, &openid],
            )
            .await?;
        Ok(match rows.first().map(|r| (r.get::<_, bool>(0), r.get::<_, bool>(1), r.get::<_, bool>(2))) {
            Some((true, _, _)) => Redeemed::Used,
            Some((false, true, true)) => Redeemed::Expired,
            _ => Redeemed::Invalid,
        })
    }

    /// Starts (or replaces) the session of (app, uid).
    pub async fn upsert_session(&self, s: &NewSession<'_>) -> Result<(), PgError> {
        self.execute(
            "INSERT INTO sessions (app_id, uid, openid, session_key, created_at_ms, expires_at_ms)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (app_id, uid) DO UPDATE SET session_key = $4, created_at_ms = $5, expires_at_ms = $6",
            &[&s.app_id, &s.uid, &s.openid, &s.session_key, &(s.created_at_ms as i64), &(s.expires_at_ms as i64)],
        )
        .await
        .map(drop)
    }

    /// The session of (app, uid): its key and expiry.
    pub async fn session(&self, app_id: &str, uid: &str) -> Result<Option<(String, u64)>, PgError> {
        let rows = self
            .query("SELECT session_key, expires_at_ms FROM sessions WHERE app_id = $1 AND uid = $2", &[&app_id, &uid])
            .await?;
        Ok(rows.first().map(|r| (r.get(0), r.get::<_, i64>(1) as u64)))
    }

    /// The session of the user whose openid in `app_id` is `openid`: its key and expiry.
    pub async fn session_by_openid(&self, app_id: &str, openid: &str) -> Result<Option<(String, u64)>, PgError> {
        let rows = self
            .query(
                "SELECT session_key, expires_at_ms FROM sessions WHERE app_id = $1 AND openid = $2",
                &[&app_id, &openid],
            )
            .await?;
        Ok(rows.first().map(|r| (r.get(0), r.get::<_, i64>(1) as u64)))
    }

    /// The user `uid` of `superapp` signed out: the sessions and outstanding codes of `uid` in the
    /// superapp's apps end (another superapp's user of the same uid is another user).
    pub async fn user_changed(&self, superapp: &str, uid: &str) -> Result<(), PgError> {
        self.execute(
            "WITH apps_of AS (SELECT app_id FROM app_owners WHERE superapp = $1),
                  ended AS (DELETE FROM sessions WHERE uid = $2 AND app_id IN (SELECT app_id FROM apps_of))
             UPDATE codes SET invalidated = TRUE
             WHERE uid = $2 AND app_id IN (SELECT app_id FROM apps_of) AND redeemed_at_ms IS NULL AND NOT invalidated",
            &[&superapp, &uid],
        )
        .await
        .map(drop)
    }

    /// Invalidates the outstanding value codes of (app, uid) of `purpose` (every value purpose for
    /// `None`); returns how many.
    pub async fn invalidate_codes(
        &self,
        app_id: &str,
        uid: &str,
        purpose: Option<StoredPurpose>,
    ) -> Result<u64, PgError> {
        self.execute(
            "UPDATE codes SET invalidated = TRUE, value = NULL
             WHERE app_id = $1 AND uid = $2 AND redeemed_at_ms IS NULL AND NOT invalidated
               AND purpose <> 1 AND ($3::SMALLINT IS NULL OR purpose = $3)",
            &[&app_id, &uid, &purpose.map(|p| p as i16)],
        )
        .await
    }

    /// Which of the codes with `code_hashes` (of `superapp`'s apps) were redeemed: (hash, when,
    /// surface).
    pub async fn redemptions(
        &self,
        superapp: &str,
        code_hashes: &[Vec<u8>],
    ) -> Result<Vec<(Vec<u8>, u64, String)>, PgError> {
        let rows = self
            .query(
                "SELECT code_hash, redeemed_at_ms, redeemed_via FROM codes
                 WHERE code_hash = ANY($2) AND redeemed_at_ms IS NOT NULL
                   AND app_id IN (SELECT app_id FROM app_owners WHERE superapp = $1)",
                &[&superapp, &code_hashes],
            )
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get::<_, i64>(1) as u64, r.get(2))).collect())
    }

    /// Forgets codes and tokens past any use: codes `keep_ms` after they expired (a replay until
    /// then hears "code been used"), tokens one lifetime after they expired, sessions that ended.
    pub async fn sweep(&self, now_ms: u64, keep_ms: u64) -> Result<(), PgError> {
        let before = now_ms.saturating_sub(keep_ms) as i64;
        let now = now_ms as i64;
        self.execute("DELETE FROM codes WHERE expires_at_ms < $1", &[&before]).await?;
        self.execute("DELETE FROM access_tokens WHERE expires_at_ms < $1", &[&before]).await?;
        self.execute("DELETE FROM sessions WHERE expires_at_ms < $1", &[&now]).await?;
        Ok(())
    }
}

/// A statement or lock timeout: the database is overloaded, not wrong.
fn is_timeout(e: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    e.code().is_some_and(|c| {
        *c == SqlState::QUERY_CANCELED
            || *c == SqlState::LOCK_NOT_AVAILABLE
            || *c == SqlState::ADMIN_SHUTDOWN
            || *c == SqlState::CANNOT_CONNECT_NOW
    })
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}
