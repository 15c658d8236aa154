//! The embedded database: sessions, grants and refusals, app secrets, payment outcomes, the
//! disclosure ledger and the daemon secret.
//!
//! SQLite (bundled, so nothing is needed from the system) in WAL mode: a write that returned is on
//! disk for any later reader, and survives the daemon being killed. Writes are short and few
//! (a login, a grant, a payment), so one connection behind a mutex serves them without a thread hop.
//! The in-memory mode (`ephemeral`) runs the same SQL against `:memory:`.
//!
//! What clients make it hold is bounded: the file grows to `store.max_bytes` at most (SQLite's
//! `max_page_count`; the write-ahead log is truncated to [`WAL_BYTES`] after each checkpoint), a
//! disclosure identical to a recent one adds to that row's count instead of adding a row, and the
//! sweep deletes ledger rows and payment records past their retention a bounded batch at a time.
//! A write the store cannot make (the bound, a full disk, an I/O error) fails with an error
//! [`StoreError::is_unwritable`] names, and leaves the connection serving reads.

use std::{
    path::Path,
    sync::{
        Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
};

use rusqlite::{Connection, OptionalExtension, params};

use crate::error::StoreError;

/// One stored login session of (app, user).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRow {
    pub app_id: String,
    pub uid: String,
    /// The user's openid in the app, kept so that a backend's openid finds its session by key.
    pub openid: String,
    pub session_key: String,
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
}

/// The key of one decision (grant or refusal): (app, uid, scope).
pub type DecisionKey<'a> = (&'a str, &'a str, &'a str);

/// One scope a user granted an app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantRow {
    pub app_id: String,
    pub uid: String,
    pub scope: String,
    pub granted_at_ms: u64,
}

/// One row of the disclosure ledger: what of a user's data went to an app, through which surface,
/// when (never the value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerRow {
    pub id: u64,
    pub app_id: String,
    pub uid: String,
    pub what: String,
    pub surface: String,
    pub api: String,
    /// The first of the identical disclosures the row counts.
    pub at_ms: u64,
    pub via_code: bool,
    /// When the first of its codes was redeemed, and through which surface.
    pub redeemed_at_ms: Option<u64>,
    pub redeemed_via: Option<String>,
    /// How many identical disclosures the row stands for, and the last one's time.
    pub count: u64,
    pub last_at_ms: u64,
    /// How many of its codes were redeemed.
    pub redeemed_count: u64,
}

/// The recorded outcome of a payment: `ok` with an encoded ApiResponse, else an encoded ApiFailure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentRow {
    pub ok: bool,
    pub body: Vec<u8>,
}

/// The database handle shared by the platform, the API layer and the admin service.
#[derive(Debug)]
pub struct Store {
    conn: Mutex<Connection>,
    location: String,
    /// A disclosure identical to a row this recent adds to that row (0: never).
    coalesce_ms: AtomicU64,
}

/// How large the write-ahead log may stay after a checkpoint, in bytes.
pub const WAL_BYTES: i64 = 16 << 20;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    app_id TEXT NOT NULL, uid TEXT NOT NULL, session_key TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL, expires_at_ms INTEGER NOT NULL, openid TEXT,
    PRIMARY KEY (app_id, uid));
CREATE INDEX IF NOT EXISTS sessions_uid ON sessions (uid);
CREATE TABLE IF NOT EXISTS grants (
    app_id TEXT NOT NULL, uid TEXT NOT NULL, scope TEXT NOT NULL, granted_at_ms INTEGER NOT NULL,
    PRIMARY KEY (app_id, uid, scope));
CREATE TABLE IF NOT EXISTS app_secrets (app_id TEXT PRIMARY KEY, secret_hash BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS payments (
    app_id TEXT NOT NULL, idempotency_key TEXT NOT NULL, api TEXT NOT NULL,
    ok INTEGER NOT NULL, body BLOB NOT NULL, recorded_at_ms INTEGER NOT NULL,
    PRIMARY KEY (app_id, idempotency_key));
CREATE TABLE IF NOT EXISTS refusals (
    app_id TEXT NOT NULL, uid TEXT NOT NULL, scope TEXT NOT NULL, refused_at_ms INTEGER NOT NULL,
    PRIMARY KEY (app_id, uid, scope));
CREATE TABLE IF NOT EXISTS ledger (
    id INTEGER PRIMARY KEY, app_id TEXT NOT NULL, uid TEXT NOT NULL, what TEXT NOT NULL,
    surface TEXT NOT NULL, api TEXT NOT NULL, at_ms INTEGER NOT NULL, via_code INTEGER NOT NULL,
    redeemed_at_ms INTEGER, redeemed_via TEXT,
    count INTEGER NOT NULL DEFAULT 1, last_at_ms INTEGER, redeemed_count INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS ledger_at ON ledger (at_ms);
";

/// A page of the decisions in `$table` (grants or refusals), whose time is `$at`: app filter ?1,
/// uid filter ?2, the key to start after ?3-?5 (NULL: from the first), the limit ?6.
macro_rules! decisions_page {
    ($table:literal, $at:literal) => {
        concat!(
            "SELECT app_id, uid, scope, ",
            $at,
            " FROM ",
            $table,
            " WHERE (?1 IS NULL OR app_id = ?1) AND (?2 IS NULL OR uid = ?2)
               AND (?3 IS NULL OR (app_id, uid, scope) > (?3, ?4, ?5))
             ORDER BY app_id, uid, scope LIMIT ?6"
        )
    };
}

/// Brings a database an earlier version created up to [`SCHEMA`]: sessions gained their openid
/// (NULL in the rows of before, which the platform fills in when it starts: see
/// [`Store::fill_session_openids`]) and an index on it; the ledger's ids lost AUTOINCREMENT
/// ([`LEDGER_WITHOUT_AUTOINCREMENT`]); ledger rows gained a count, a last time and a count of
/// redeemed codes ([`LEDGER_COUNTS`]: a row of before is one disclosure, redeemed once if it was)
/// and an index by (app, user, time) to find the row a disclosure adds to; payments an index by
/// time, for the retention sweep.
fn migrate(conn: &Connection) -> Result<(), StoreError> {
    let has_openid: bool =
        conn.prepare("SELECT 1 FROM pragma_table_info('sessions') WHERE name = 'openid'")?.exists([])?;
    if !has_openid {
        conn.execute_batch("ALTER TABLE sessions ADD COLUMN openid TEXT")?;
    }
    conn.execute_batch("CREATE INDEX IF NOT EXISTS sessions_openid ON sessions (app_id, openid)")?;
    let ledger_sql: String =
        conn.query_row("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'ledger'", [], |r| r.get(0))?;
    if ledger_sql.contains("AUTOINCREMENT") {
        conn.execute_batch(&format!("BEGIN IMMEDIATE;{LEDGER_WITHOUT_AUTOINCREMENT}COMMIT;"))?;
    }
    let has_count: bool =
        conn.prepare("SELECT 1 FROM pragma_table_info('ledger') WHERE name = 'count'")?.exists([])?;
    if !has_count {
        conn.execute_batch(&format!("BEGIN IMMEDIATE;{LEDGER_COUNTS}COMMIT;"))?;
    }
    conn.execute_batch(
        "CREATE INDEX IF NOT EXISTS ledger_user ON ledger (app_id, uid, at_ms);
         CREATE INDEX IF NOT EXISTS payments_at ON payments (recorded_at_ms);",
    )?;
    Ok(())
}

/// The ledger columns a row's count needs, for a table created before rows were coalesced.
const LEDGER_COUNTS: &str = "
ALTER TABLE ledger ADD COLUMN count INTEGER NOT NULL DEFAULT 1;
ALTER TABLE ledger ADD COLUMN last_at_ms INTEGER;
ALTER TABLE ledger ADD COLUMN redeemed_count INTEGER NOT NULL DEFAULT 0;
UPDATE ledger SET redeemed_count = 1 WHERE redeemed_at_ms IS NOT NULL;
";

/// `SELECT`s the columns [`session_row`] reads, in its order, followed by `$rest`.
macro_rules! select_sessions {
    ($rest:literal) => {
        concat!("SELECT app_id, uid, session_key, created_at_ms, expires_at_ms, openid FROM sessions ", $rest)
    };
}

/// Ledger ids are rowids: each new row gets the highest id + 1, and only the oldest rows are ever
/// deleted (retention), so ids grow as `ListLedger`'s paging needs. The first schema declared the
/// id AUTOINCREMENT, which costs every insert a second table's write (half a v2 login's store
/// time); such a table is rebuilt once, ids kept.
const LEDGER_WITHOUT_AUTOINCREMENT: &str = "
CREATE TABLE ledger_new (
    id INTEGER PRIMARY KEY, app_id TEXT NOT NULL, uid TEXT NOT NULL, what TEXT NOT NULL,
    surface TEXT NOT NULL, api TEXT NOT NULL, at_ms INTEGER NOT NULL, via_code INTEGER NOT NULL,
    redeemed_at_ms INTEGER, redeemed_via TEXT);
INSERT INTO ledger_new SELECT id, app_id, uid, what, surface, api, at_ms, via_code, redeemed_at_ms, redeemed_via
    FROM ledger;
DROP TABLE ledger;
ALTER TABLE ledger_new RENAME TO ledger;
CREATE INDEX ledger_at ON ledger (at_ms);
";

/// A new row's last time is its first (not NULL), so counting another disclosure rewrites the row
/// at the same size: at a full store it still fits its page.
const INSERT_LEDGER: &str = "INSERT INTO ledger (app_id, uid, what, surface, api, at_ms, via_code, last_at_ms)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?6)";
/// The newest row identical to a disclosure (?3-?6) of (app ?1, uid ?2) whose first disclosure is
/// at ?7 or later: the one it adds to. Found through `ledger_user`, among the user's recent rows.
const SAME_LEDGER_ROW: &str = "SELECT id FROM ledger
     WHERE app_id = ?1 AND uid = ?2 AND at_ms >= ?7 AND what = ?3 AND surface = ?4 AND api = ?5 AND via_code = ?6
     ORDER BY at_ms DESC LIMIT 1";
const COUNT_LEDGER_ROW: &str =
    "UPDATE ledger SET count = count + 1, last_at_ms = max(coalesce(last_at_ms, at_ms), ?2) WHERE id = ?1";

/// A new session of (app, uid) replaces the old one. The openid of (app, uid) never changes (it is
/// keyed by the daemon secret, which lives in this database), so a replacement leaves it, and its
/// index, untouched: an index entry rewritten on every login cost a third of the upsert.
const UPSERT_SESSION: &str = "INSERT INTO sessions (app_id, uid, session_key, created_at_ms, expires_at_ms, openid)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6)
     ON CONFLICT (app_id, uid) DO UPDATE SET session_key = ?3, created_at_ms = ?4, expires_at_ms = ?5";

/// A ledger row about to be written (the id is the store's).
#[derive(Debug, Clone, Copy)]
pub struct NewLedgerRow<'a> {
    pub app_id: &'a str,
    pub uid: &'a str,
    pub what: &'a str,
    pub surface: &'a str,
    pub api: &'a str,
    pub at_ms: u64,
    pub via_code: bool,
}

/// Runs `f` in one transaction on `conn`: every multi-statement write of the store goes through
/// here. rusqlite's `Transaction` parses "BEGIN" and "COMMIT" anew each time (a third of a v2
/// login's store time); these statements are prepared once.
fn in_transaction<T>(conn: &Connection, f: impl FnOnce(&Connection) -> Result<T, StoreError>) -> Result<T, StoreError> {
    conn.prepare_cached("BEGIN")?.execute([])?;
    match f(conn).and_then(|t| Ok(conn.prepare_cached("COMMIT")?.execute([]).map(|_| t)?)) {
        Ok(t) => Ok(t),
        Err(e) => {
            // After a failed COMMIT SQLite may have rolled back already; ROLLBACK then fails, harmlessly.
            if !conn.is_autocommit() {
                let _ = conn.prepare_cached("ROLLBACK").and_then(|mut s| s.execute([]));
            }
            Err(e)
        }
    }
}

/// Records a disclosure: adds to the count of an identical row whose first disclosure is less than
/// `coalesce_ms` old (a row's span is bounded, so retention by its first time stays true), else
/// adds a row. Returns the row's id.
fn insert_ledger(conn: &Connection, row: &NewLedgerRow<'_>, coalesce_ms: u64) -> Result<u64, StoreError> {
    if coalesce_ms > 0 {
        let since = row.at_ms.saturating_sub(coalesce_ms - 1);
        let same: Option<i64> = conn
            .prepare_cached(SAME_LEDGER_ROW)?
            .query_row(
                params![row.app_id, row.uid, row.what, row.surface, row.api, row.via_code as i64, since as i64],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(id) = same {
            conn.prepare_cached(COUNT_LEDGER_ROW)?.execute(params![id, row.at_ms as i64])?;
            return Ok(id as u64);
        }
    }
    conn.prepare_cached(INSERT_LEDGER)?.execute(params![
        row.app_id,
        row.uid,
        row.what,
        row.surface,
        row.api,
        row.at_ms as i64,
        row.via_code as i64
    ])?;
    Ok(conn.last_insert_rowid() as u64)
}

fn upsert_session(conn: &Connection, row: &SessionRow) -> Result<(), StoreError> {
    conn.prepare_cached(UPSERT_SESSION)?.execute(params![
        row.app_id,
        row.uid,
        row.session_key,
        row.created_at_ms as i64,
        row.expires_at_ms as i64,
        row.openid
    ])?;
    Ok(())
}

/// A payment's first record wins (the write-ahead record).
const RECORD_PAYMENT: &str = "INSERT OR IGNORE INTO payments (app_id, idempotency_key, api, ok, body, recorded_at_ms)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6)";
/// A payment's outcome replaces its write-ahead record.
const SETTLE_PAYMENT: &str = "INSERT OR REPLACE INTO payments (app_id, idempotency_key, api, ok, body, recorded_at_ms)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6)";

impl Store {
    /// Opens (creating if needed) the database at `path`, or an in-memory one for `None`.
    pub fn open(path: Option<&Path>, synchronous_full: bool) -> Result<Store, StoreError> {
        // The database holds the daemon secret and session keys: create it private (SQLite gives
        // its -wal and -shm files the database file's mode), even in a data dir others can read.
        #[cfg(unix)]
        if let Some(p) = path {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new().append(true).create(true).mode(0o600).open(p)?;
        }
        let (conn, location) = match path {
            Some(p) => (Connection::open(p)?, p.display().to_string()),
            None => (Connection::open_in_memory()?, ":memory:".to_owned()),
        };
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", if synchronous_full { "FULL" } else { "NORMAL" })?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.pragma_update(None, "journal_size_limit", WAL_BYTES)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        migrate(&conn)?;
        Ok(Store { conn: Mutex::new(conn), location, coalesce_ms: AtomicU64::new(0) })
    }

    /// Bounds the database file to `max_bytes` (whole pages; never below what it holds now).
    /// Returns the bound in bytes.
    pub fn limit_size(&self, max_bytes: u64) -> Result<u64, StoreError> {
        let conn = self.conn();
        let page: i64 = conn.pragma_query_value(None, "page_size", |r| r.get(0))?;
        let pages = (max_bytes / page.max(1) as u64).max(1) as i64;
        let set: i64 = conn.query_row(&format!("PRAGMA max_page_count = {pages}"), [], |r| r.get(0))?;
        Ok(set as u64 * page as u64)
    }

    /// Disclosures identical to a row less than `window_ms` old add to its count (0: never).
    pub fn coalesce_ledger(&self, window_ms: u64) {
        self.coalesce_ms.store(window_ms, Ordering::Relaxed);
    }

    fn coalescing(&self) -> u64 {
        self.coalesce_ms.load(Ordering::Relaxed)
    }

    /// Where the data lives, for status output.
    pub fn location(&self) -> &str {
        &self.location
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent; keep serving.
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The daemon's 32-byte secret (keys openid and unionid), created on first use.
    pub fn daemon_secret(&self, fresh: impl FnOnce() -> [u8; 32]) -> Result<[u8; 32], StoreError> {
        let conn = self.conn();
        let existing: Option<Vec<u8>> =
            conn.query_row("SELECT value FROM meta WHERE key = 'daemon_secret'", [], |r| r.get(0)).optional()?;
        if let Some(bytes) = existing.filter(|b| b.len() == 32) {
            let mut out = [0u8; 32];
            out.copy_from_slice(&bytes);
            return Ok(out);
        }
        let secret = fresh();
        conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('daemon_secret', ?1)", params![&secret[..]])?;
        Ok(secret)
    }

    pub fn upsert_session(&self, row: &SessionRow) -> Result<(), StoreError> {
        upsert_session(&self.conn(), row)
    }

    /// Writes a code's ledger rows and, for a login code, the session it starts, in one
    /// transaction (both or neither); returns the rows' ids.
    pub fn issue_code(&self, session: Option<&SessionRow>, rows: &[NewLedgerRow<'_>]) -> Result<Vec<u64>, StoreError> {
        let coalesce_ms = self.coalescing();
        in_transaction(&self.conn(), |conn| {
            if let Some(session) = session {
                upsert_session(conn, session)?;
            }
            rows.iter().map(|row| insert_ledger(conn, row, coalesce_ms)).collect()
        })
    }

    /// The session of the user whose openid in `app_id` is `openid`, by key (no scan of the app's
    /// sessions).
    pub fn session_by_openid(&self, app_id: &str, openid: &str) -> Result<Option<SessionRow>, StoreError> {
        self.one_session(select_sessions!("WHERE app_id = ?1 AND openid = ?2"), app_id, openid)
    }

    /// The session `sql` selects by the app (?1) and one other key (?2), if any.
    fn one_session(&self, sql: &'static str, app_id: &str, key: &str) -> Result<Option<SessionRow>, StoreError> {
        Ok(self.conn().prepare_cached(sql)?.query_row(params![app_id, key], session_row).optional()?)
    }

    /// Fills in the openid of the sessions stored without one (by a daemon from before sessions
    /// kept it), as `openid` of (app, uid) computes it; returns how many.
    pub fn fill_session_openids(&self, openid: impl Fn(&str, &str) -> String) -> Result<usize, StoreError> {
        in_transaction(&self.conn(), |conn| {
            let missing: Vec<(String, String)> = conn
                .prepare("SELECT app_id, uid FROM sessions WHERE openid IS NULL")?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?;
            for (app_id, uid) in &missing {
                conn.execute(
                    "UPDATE sessions SET openid = ?3 WHERE app_id = ?1 AND uid = ?2",
                    params![app_id, uid, openid(app_id, uid)],
                )?;
            }
            Ok(missing.len())
        })
    }

    pub fn session(&self, app_id: &str, uid: &str) -> Result<Option<SessionRow>, StoreError> {
        self.one_session(select_sessions!("WHERE app_id = ?1 AND uid = ?2"), app_id, uid)
    }

    /// Ends every session of `uid` (the host signed out or switched users).
    pub fn delete_sessions_of(&self, uid: &str) -> Result<usize, StoreError> {
        Ok(self.conn().execute("DELETE FROM sessions WHERE uid = ?1", params![uid])?)
    }

    /// At most `limit` sessions (of `app_id`, or every app), by app then uid, after the session
    /// `after` = (app, uid) names (`None`: from the first).
    pub fn list_sessions(
        &self,
        app_id: Option<&str>,
        after: Option<(&str, &str)>,
        limit: u32,
    ) -> Result<Vec<SessionRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(select_sessions!(
            "WHERE (?1 IS NULL OR app_id = ?1) AND (?2 IS NULL OR (app_id, uid) > (?2, ?3))
             ORDER BY app_id, uid LIMIT ?4"
        ))?;
        let (after_app, after_uid) = after.unzip();
        let rows = stmt
            .query_map(params![app_id, after_app, after_uid, i64::from(limit)], session_row)?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// The scopes `uid` granted `app_id`.
    pub fn granted_scopes(&self, app_id: &str, uid: &str) -> Result<Vec<String>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached("SELECT scope FROM grants WHERE app_id = ?1 AND uid = ?2 ORDER BY scope")?;
        let rows = stmt.query_map(params![app_id, uid], |r| r.get(0))?.collect::<Result<_, _>>()?;
        Ok(rows)
    }

    pub fn add_grants(&self, app_id: &str, uid: &str, scopes: &[String], now_ms: u64) -> Result<(), StoreError> {
        in_transaction(&self.conn(), |conn| {
            let mut stmt = conn.prepare_cached(
                "INSERT OR IGNORE INTO grants (app_id, uid, scope, granted_at_ms) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for scope in scopes {
                stmt.execute(params![app_id, uid, scope, now_ms as i64])?;
            }
            Ok(())
        })
    }

    /// At most `limit` grants, or with `refusals` remembered refusals (the time is then when the
    /// scope was refused), matching the filters (`None`: any), by app, uid and scope, after the
    /// decision `after` = (app, uid, scope) names (`None`: from the first).
    pub fn list_decisions(
        &self,
        refusals: bool,
        app_id: Option<&str>,
        uid: Option<&str>,
        after: Option<DecisionKey<'_>>,
        limit: u32,
    ) -> Result<Vec<GrantRow>, StoreError> {
        let sql = match refusals {
            false => decisions_page!("grants", "granted_at_ms"),
            true => decisions_page!("refusals", "refused_at_ms"),
        };
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(sql)?;
        let (after_app, after_uid, after_scope) = match after {
            Some((a, u, s)) => (Some(a), Some(u), Some(s)),
            None => (None, None, None),
        };
        let rows = stmt
            .query_map(params![app_id, uid, after_app, after_uid, after_scope, i64::from(limit)], |r| {
                Ok(GrantRow {
                    app_id: r.get(0)?,
                    uid: r.get(1)?,
                    scope: r.get(2)?,
                    granted_at_ms: r.get::<_, i64>(3)? as u64,
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// Revokes one scope, or every scope when `scope` is `None`; returns how many.
    pub fn revoke_grants(&self, app_id: &str, uid: &str, scope: Option<&str>) -> Result<usize, StoreError> {
        Ok(self.conn().execute(
            "DELETE FROM grants WHERE app_id = ?1 AND uid = ?2 AND (?3 IS NULL OR scope = ?3)",
            params![app_id, uid, scope],
        )?)
    }

    /// The scopes `uid` refused `app_id` (remembered refusals).
    pub fn refused_scopes(&self, app_id: &str, uid: &str) -> Result<Vec<String>, StoreError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare_cached("SELECT scope FROM refusals WHERE app_id = ?1 AND uid = ?2 ORDER BY scope")?;
        let rows = stmt.query_map(params![app_id, uid], |r| r.get(0))?.collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// Sets scopes' decisions of (app, uid): each `Some(true)` granted, `Some(false)` refused,
    /// `None` undecided. All in one transaction: every one is stored, or (on an error) none, so no
    /// reader and no restart sees half of a decision that spans scopes (scope.userInfo is avatar
    /// and nickname). Returns the decisions they replaced (the same shape), in order.
    pub fn decide(
        &self,
        app_id: &str,
        uid: &str,
        decisions: &[(&str, Option<bool>)],
        now_ms: u64,
    ) -> Result<Vec<Option<bool>>, StoreError> {
        in_transaction(&self.conn(), |tx| {
            let mut previous = Vec::with_capacity(decisions.len());
            for &(scope, decision) in decisions {
                let key = params![app_id, uid, scope];
                let was_granted =
                    tx.execute("DELETE FROM grants WHERE app_id = ?1 AND uid = ?2 AND scope = ?3", key)? > 0;
                let was_refused =
                    tx.execute("DELETE FROM refusals WHERE app_id = ?1 AND uid = ?2 AND scope = ?3", key)? > 0;
                match decision {
                    Some(true) => tx.execute(
                        "INSERT INTO grants (app_id, uid, scope, granted_at_ms) VALUES (?1, ?2, ?3, ?4)",
                        params![app_id, uid, scope, now_ms as i64],
                    )?,
                    Some(false) => tx.execute(
                        "INSERT INTO refusals (app_id, uid, scope, refused_at_ms) VALUES (?1, ?2, ?3, ?4)",
                        params![app_id, uid, scope, now_ms as i64],
                    )?,
                    None => 0,
                };
                previous.push(if was_granted {
                    Some(true)
                } else if was_refused {
                    Some(false)
                } else {
                    None
                });
            }
            Ok(previous)
        })
    }

    /// Records a disclosure (a new row, or one more of a recent identical row); returns the row's id.
    pub fn ledger_add(&self, row: &NewLedgerRow<'_>) -> Result<u64, StoreError> {
        insert_ledger(&self.conn(), row, self.coalescing())
    }

    /// Marks that a code of each of the rows was redeemed through `via` at `at_ms`: the first
    /// redemption's time and surface stay, the count of redeemed codes goes up.
    pub fn ledger_redeemed(&self, ids: &[u64], via: &str, at_ms: u64) -> Result<(), StoreError> {
        in_transaction(&self.conn(), |conn| {
            let mut stmt = conn.prepare_cached(
                "UPDATE ledger SET redeemed_at_ms = coalesce(redeemed_at_ms, ?2),
                    redeemed_via = coalesce(redeemed_via, ?3), redeemed_count = redeemed_count + 1
                 WHERE id = ?1",
            )?;
            for id in ids {
                stmt.execute(params![*id as i64, at_ms as i64, via])?;
            }
            Ok(())
        })
    }

    /// Ledger rows, oldest first; `None` filters match everything.
    pub fn ledger(&self, app_id: Option<&str>, uid: Option<&str>, since_ms: u64) -> Result<Vec<LedgerRow>, StoreError> {
        self.ledger_page(app_id, uid, since_ms, 0, u32::MAX)
    }

    /// At most `limit` of the matching rows with an id above `after_id`, oldest first.
    pub fn ledger_page(
        &self,
        app_id: Option<&str>,
        uid: Option<&str>,
        since_ms: u64,
        after_id: u64,
        limit: u32,
    ) -> Result<Vec<LedgerRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT id, app_id, uid, what, surface, api, at_ms, via_code, redeemed_at_ms, redeemed_via,
                    count, coalesce(last_at_ms, at_ms), redeemed_count FROM ledger
             WHERE (?1 IS NULL OR app_id = ?1) AND (?2 IS NULL OR uid = ?2) AND at_ms >= ?3 AND id > ?4
             ORDER BY id LIMIT ?5",
        )?;
        let rows = stmt
            .query_map(params![app_id, uid, since_ms as i64, after_id as i64, i64::from(limit)], |r| {
                Ok(LedgerRow {
                    id: r.get::<_, i64>(0)? as u64,
                    app_id: r.get(1)?,
                    uid: r.get(2)?,
                    what: r.get(3)?,
                    surface: r.get(4)?,
                    api: r.get(5)?,
                    at_ms: r.get::<_, i64>(6)? as u64,
                    via_code: r.get::<_, i64>(7)? != 0,
                    redeemed_at_ms: r.get::<_, Option<i64>>(8)?.map(|t| t as u64),
                    redeemed_via: r.get(9)?,
                    count: r.get::<_, i64>(10)? as u64,
                    last_at_ms: r.get::<_, i64>(11)? as u64,
                    redeemed_count: r.get::<_, i64>(12)? as u64,
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// Drops at most `limit` of the ledger rows older than `before_ms` (retention), oldest
    /// first; returns how many. A bounded batch holds the store for a bounded time.
    pub fn ledger_prune(&self, before_ms: u64, limit: u32) -> Result<usize, StoreError> {
        Ok(self.conn().prepare_cached(
            "DELETE FROM ledger WHERE id IN (SELECT id FROM ledger WHERE at_ms < ?1 ORDER BY at_ms LIMIT ?2)",
        )?.execute(params![before_ms as i64, i64::from(limit)])?)
    }

    /// Drops at most `limit` of the payment records older than `before_ms` (retention), oldest
    /// first; returns how many.
    pub fn payments_prune(&self, before_ms: u64, limit: u32) -> Result<usize, StoreError> {
        Ok(self.conn().prepare_cached(
            "DELETE FROM payments WHERE rowid IN
                 (SELECT rowid FROM payments WHERE recorded_at_ms < ?1 ORDER BY recorded_at_ms LIMIT ?2)",
        )?.execute(params![before_ms as i64, i64::from(limit)])?)
    }

    pub fn app_secret_hash(&self, app_id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .conn()
            .prepare_cached("SELECT secret_hash FROM app_secrets WHERE app_id = ?1")?
            .query_row(params![app_id], |r| r.get(0))
            .optional()?)
    }

    /// Stores an app's secret hash; with `replace` false an existing one is kept. Returns whether
    /// it was written.
    pub fn set_app_secret_hash(&self, app_id: &str, hash: &[u8], replace: bool) -> Result<bool, StoreError> {
        let sql = if replace {
            "INSERT OR REPLACE INTO app_secrets (app_id, secret_hash) VALUES (?1, ?2)"
        } else {
            "INSERT OR IGNORE INTO app_secrets (app_id, secret_hash) VALUES (?1, ?2)"
        };
        Ok(self.conn().execute(sql, params![app_id, hash])? == 1)
    }

    pub fn payment(&self, app_id: &str, key: &str) -> Result<Option<PaymentRow>, StoreError> {
        Ok(self
            .conn()
            .prepare_cached("SELECT ok, body FROM payments WHERE app_id = ?1 AND idempotency_key = ?2")?
            .query_row(params![app_id, key], |r| Ok(PaymentRow { ok: r.get::<_, i64>(0)? != 0, body: r.get(1)? }))
            .optional()?)
    }

    /// Records a payment's outcome; the first record for a key wins (the write-ahead record that
    /// says the host is about to see the key).
    pub fn record_payment(
        &self,
        app_id: &str,
        key: &str,
        api: &str,
        row: &PaymentRow,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        self.write_payment(RECORD_PAYMENT, app_id, key, api, row, now_ms)
    }

    /// Replaces a payment's record: its outcome takes the place of the write-ahead record.
    pub fn settle_payment(
        &self,
        app_id: &str,
        key: &str,
        api: &str,
        row: &PaymentRow,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        self.write_payment(SETTLE_PAYMENT, app_id, key, api, row, now_ms)
    }

    fn write_payment(
        &self,
        sql: &'static str,
        app_id: &str,
        key: &str,
        api: &str,
        row: &PaymentRow,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        self.conn().prepare_cached(sql)?.execute(params![app_id, key, api, row.ok as i64, row.body, now_ms as i64])?;
        Ok(())
    }

    /// Drops a payment's record (the payment never reached the host; its key is unspent).
    pub fn forget_payment(&self, app_id: &str, key: &str) -> Result<(), StoreError> {
        self.conn().execute("DELETE FROM payments WHERE app_id = ?1 AND idempotency_key = ?2", params![app_id, key])?;
        Ok(())
    }

    /// How many payment outcomes are recorded (status, tests).
    pub fn payment_count(&self) -> Result<u64, StoreError> {
        Ok(self.conn().query_row("SELECT COUNT(*) FROM payments", [], |r| r.get::<_, i64>(0))? as u64)
    }
}

fn session_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<SessionRow> {
    Ok(SessionRow {
        app_id: r.get(0)?,
        uid: r.get(1)?,
        session_key: r.get(2)?,
        created_at_ms: r.get::<_, i64>(3)? as u64,
        expires_at_ms: r.get::<_, i64>(4)? as u64,
        // NULL only until the platform fills it in at start.
        openid: r.get::<_, Option<String>>(5)?.unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_survives_reopening_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.db");
        let secret = {
            let store = Store::open(Some(&path), false).unwrap();
            let s = store.daemon_secret(|| [7; 32]).unwrap();
            store
                .upsert_session(&SessionRow {
                    app_id: "a".into(),
                    uid: "u".into(),
                    openid: "oa-u".into(),
                    session_key: "k".into(),
                    created_at_ms: 1,
                    expires_at_ms: 2,
                })
                .unwrap();
            store.add_grants("a", "u", &["SCOPE_EMAIL".into()], 3).unwrap();
            store.record_payment("a", "key", "requestPayment", &PaymentRow { ok: true, body: vec![1] }, 4).unwrap();
            s
        };
        let store = Store::open(Some(&path), false).unwrap();
        assert_eq!(store.daemon_secret(|| [9; 32]).unwrap(), secret);
        assert_eq!(store.session("a", "u").unwrap().unwrap().session_key, "k");
        assert_eq!(store.granted_scopes("a", "u").unwrap(), vec!["SCOPE_EMAIL".to_string()]);
        assert_eq!(store.payment("a", "key").unwrap(), Some(PaymentRow { ok: true, body: vec![1] }));
    }

    #[cfg(unix)]
    #[test]
    fn the_database_files_are_private_even_in_an_open_dir() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.path().join("broker.db");
        let store = Store::open(Some(&path), false).unwrap();
        store.daemon_secret(|| [7; 32]).unwrap();
        for file in ["broker.db", "broker.db-wal", "broker.db-shm"] {
            let mode = std::fs::metadata(dir.path().join(file)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{file}");
        }
    }

    #[test]
    fn the_first_payment_record_wins_and_revoke_counts() {
        let store = Store::open(None, false).unwrap();
        store.record_payment("a", "k", "requestPayment", &PaymentRow { ok: true, body: vec![1] }, 1).unwrap();
        store.record_payment("a", "k", "requestPayment", &PaymentRow { ok: false, body: vec![2] }, 2).unwrap();
        assert!(store.payment("a", "k").unwrap().unwrap().ok);
        store.add_grants("a", "u", &["S1".into(), "S2".into()], 1).unwrap();
        assert_eq!(store.revoke_grants("a", "u", Some("S1")).unwrap(), 1);
        assert_eq!(store.revoke_grants("a", "u", None).unwrap(), 1);
    }

    #[test]
    fn a_session_is_found_by_its_openid_through_an_index() {
        let store = Store::open(None, false).unwrap();
        let plan: String = store
            .conn()
            .query_row(
                concat!("EXPLAIN QUERY PLAN ", select_sessions!("WHERE app_id = ?1 AND openid = ?2")),
                params!["a", "o"],
                |r| r.get(3),
            )
            .unwrap();
        assert!(plan.contains("USING INDEX sessions_openid"), "{plan}");
    }

    #[test]
    fn a_decision_replaces_the_previous_one() {
        let store = Store::open(None, false).unwrap();
        assert_eq!(store.decide("a", "u", &[("S", Some(true))], 1).unwrap(), [None]);
        assert_eq!(store.decide("a", "u", &[("S", Some(false))], 2).unwrap(), [Some(true)]);
        assert!(store.granted_scopes("a", "u").unwrap().is_empty());
        assert_eq!(store.refused_scopes("a", "u").unwrap(), vec!["S".to_string()]);
        assert_eq!(store.decide("a", "u", &[("S", None)], 3).unwrap(), [Some(false)]);
        assert!(store.refused_scopes("a", "u").unwrap().is_empty());
    }

    fn row<'a>(what: &'a str, api: &'a str, at_ms: u64, via_code: bool) -> NewLedgerRow<'a> {
        NewLedgerRow { app_id: "a", uid: "u", what, surface: "renderer_api", api, at_ms, via_code }
    }

    #[test]
    fn a_login_code_writes_its_session_and_ledger_rows_together() {
        let store = Store::open(None, false).unwrap();
        let session = SessionRow {
            app_id: "a".into(),
            uid: "u".into(),
            openid: "oa-u".into(),
            session_key: "k".into(),
            created_at_ms: 5,
            expires_at_ms: 9,
        };
        let ids =
            store.issue_code(Some(&session), &[row("openid", "login", 5, true), row("unionid", "login", 5, true)]);
        let ids = ids.unwrap();
        assert_eq!(ids.len(), 2);
        assert!(ids[0] < ids[1]);
        assert_eq!(store.session("a", "u").unwrap(), Some(session));
        let rows = store.ledger(None, None, 0).unwrap();
        assert_eq!(
            rows.iter().map(|r| (r.id, r.what.as_str())).collect::<Vec<_>>(),
            [(ids[0], "openid"), (ids[1], "unionid")]
        );
        // A value code writes its rows only.
        assert_eq!(store.issue_code(None, &[row("phone_number", "getPhoneNumber", 6, true)]).unwrap(), [ids[1] + 1]);
        // Neither is written when the rows cannot be, and the connection is usable afterwards.
        store.conn().execute_batch("ALTER TABLE ledger RENAME TO gone").unwrap();
        let other = SessionRow { uid: "v".into(), ..store.session("a", "u").unwrap().unwrap() };
        assert!(store.issue_code(Some(&other), &[row("openid", "login", 7, true)]).is_err());
        assert_eq!(store.session("a", "v").unwrap(), None);
        store.upsert_session(&other).unwrap();
        assert_eq!(store.session("a", "v").unwrap(), Some(other));
    }

    #[test]
    fn a_ledger_of_the_first_schema_keeps_its_rows_and_ids() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "CREATE TABLE ledger (
                    id INTEGER PRIMARY KEY AUTOINCREMENT, app_id TEXT NOT NULL, uid TEXT NOT NULL,
                    what TEXT NOT NULL, surface TEXT NOT NULL, api TEXT NOT NULL, at_ms INTEGER NOT NULL,
                    via_code INTEGER NOT NULL, redeemed_at_ms INTEGER, redeemed_via TEXT);
                 CREATE INDEX ledger_at ON ledger (at_ms);
                 INSERT INTO ledger (id, app_id, uid, what, surface, api, at_ms, via_code, redeemed_at_ms, redeemed_via)
                     VALUES (7, 'a', 'u', 'openid', 'renderer_api', 'login', 10, 1, 12, 'exchange');",
            )
            .unwrap();
        }
        let store = Store::open(Some(&path), false).unwrap();
        let rows = store.ledger(None, None, 0).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!((rows[0].id, rows[0].redeemed_via.as_deref()), (7, Some("exchange")));
        assert_eq!(store.ledger_add(&row("avatar", "chooseAvatar", 20, false)).unwrap(), 8);
        drop(store);
        let sql: String = Connection::open(&path)
            .unwrap()
            .query_row("SELECT group_concat(sql, ';') FROM sqlite_master WHERE tbl_name = 'ledger'", [], |r| r.get(0))
            .unwrap();
        assert!(!sql.contains("AUTOINCREMENT") && sql.contains("ledger_at"), "{sql}");
        // Opening again leaves it as it is.
        assert_eq!(Store::open(Some(&path), false).unwrap().ledger(None, None, 0).unwrap().len(), 2);
    }

    #[test]
    fn decisions_of_several_scopes_are_stored_together_or_not_at_all() {
        let store = Store::open(None, false).unwrap();
        let both = [("AVATAR", Some(true)), ("NICKNAME", Some(true))];
        // The second write fails, as a full disk would.
        store
            .conn()
            .execute_batch(
                "CREATE TRIGGER fail BEFORE INSERT ON grants WHEN NEW.scope = 'NICKNAME'
                 BEGIN SELECT RAISE(ABORT, 'disk full'); END",
            )
            .unwrap();
        assert!(store.decide("a", "u", &both, 1).is_err());
        assert!(store.granted_scopes("a", "u").unwrap().is_empty(), "no half of the decision stays");
        store.conn().execute_batch("DROP TRIGGER fail").unwrap();
        assert_eq!(store.decide("a", "u", &both, 2).unwrap(), [None, None]);
        assert_eq!(store.granted_scopes("a", "u").unwrap(), ["AVATAR", "NICKNAME"]);
    }

    #[test]
    fn ledger_rows_are_stamped_once_and_pruned_by_age() {
        let store = Store::open(None, false).unwrap();
        let old = store.ledger_add(&row("openid", "login", 10, true)).unwrap();
        let new = store.ledger_add(&row("avatar", "chooseAvatar", 20, false)).unwrap();
        store.ledger_redeemed(&[old], "exchange", 15).unwrap();
        store.ledger_redeemed(&[old], "backend_http", 16).unwrap();
        let rows = store.ledger(Some("a"), None, 0).unwrap();
        assert_eq!((rows[0].redeemed_at_ms, rows[0].redeemed_via.as_deref()), (Some(15), Some("exchange")));
        assert_eq!(store.ledger(None, Some("u"), 11).unwrap().iter().map(|r| r.id).collect::<Vec<_>>(), [new]);
        assert_eq!(store.ledger_prune(20, 100).unwrap(), 1);
        assert_eq!(store.ledger(None, None, 0).unwrap().len(), 1);
    }
}
