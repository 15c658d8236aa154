//! The embedded engine: sessions, app secrets and the openid secret in SQLite (bundled, WAL mode);
//! codes, access tokens and attempt buckets in memory.
//!
//! Codes and access tokens live in memory only: a restart invalidates outstanding codes (the mini
//! app logs in again) and tokens (the backend fetches a new one), while sessions and secrets are
//! durable. One process owns them, so a map's entry lock decides
//! each redemption. The tables (`meta`, `sessions`, `app_secrets`) may share a database file with
//! other tables of the embedder (the daemon keeps its grants, payments and ledger in the same
//! `broker.db`): each side creates and migrates only its own.

use std::{
    collections::VecDeque,
    path::Path,
    sync::{Arc, Mutex, MutexGuard},
};

use dashmap::DashMap;
use rusqlite::{Connection, OptionalExtension, params};

use super::{CodeRecord, OpenidOf, PlatformStore, Purpose, Quota, Redemption, SessionRow, TokenCheck, Wanted};
use crate::{
    AccessToken, ExchangeFailure, StoreError, TokenRequest, ValueKind, access_tokens::AccessTokens, rate::Buckets,
};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    app_id TEXT NOT NULL, uid TEXT NOT NULL, session_key TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL, expires_at_ms INTEGER NOT NULL, openid TEXT,
    PRIMARY KEY (app_id, uid));
CREATE INDEX IF NOT EXISTS sessions_uid ON sessions (uid);
CREATE TABLE IF NOT EXISTS app_secrets (app_id TEXT PRIMARY KEY, secret_hash BLOB NOT NULL);
";

/// Brings a database an earlier version created up to [`SCHEMA`]: sessions gained their openid
/// (NULL in the rows of before, which the platform fills in when it starts: see
/// [`PlatformStore::fill_session_openids`]) and an index on it.
fn migrate(conn: &Connection) -> Result<(), StoreError> {
    let has_openid: bool =
        conn.prepare("SELECT 1 FROM pragma_table_info('sessions') WHERE name = 'openid'")?.exists([])?;
    if !has_openid {
        conn.execute_batch("ALTER TABLE sessions ADD COLUMN openid TEXT")?;
    }
    conn.execute_batch("CREATE INDEX IF NOT EXISTS sessions_openid ON sessions (app_id, openid)")?;
    Ok(())
}

/// `SELECT`s the columns [`session_row`] reads, in its order, followed by `$rest`.
macro_rules! select_sessions {
    ($rest:literal) => {
        concat!("SELECT app_id, uid, session_key, created_at_ms, expires_at_ms, openid FROM sessions ", $rest)
    };
}

/// A new session of (app, uid) replaces the old one. The openid of (app, uid) never changes (it is
/// keyed by the platform's secret, which lives in this database), so a replacement leaves it, and
/// its index, untouched: an index entry rewritten on every login cost a third of the upsert.
const UPSERT_SESSION: &str = "INSERT INTO sessions (app_id, uid, session_key, created_at_ms, expires_at_ms, openid)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6)
     ON CONFLICT (app_id, uid) DO UPDATE SET session_key = ?3, created_at_ms = ?4, expires_at_ms = ?5";

/// Creates the database file private (mode 0600) if it does not exist: it holds the openid secret
/// and session keys, and SQLite gives its -wal and -shm files the database file's mode, even in a
/// data dir others can read.
pub fn create_private(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new().append(true).create(true).mode(0o600).open(path)?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Opens a database that lives in this process's memory only (`--ephemeral`), whose page cache is
/// bounded like a file's.
///
/// SQLite's own `:memory:` database keeps every page in its page cache, and a commit after a
/// b-tree rebalance (which renumbers pages through a temporary page number past the end) walks
/// that whole cache: every such commit costs time in proportion to the database's size. The
/// `memdb` VFS keeps the pages in memory behind a bounded cache instead, so a commit costs the
/// same however much the store holds. The journal and temporary tables stay in memory too (no
/// file is ever created); the name is private to the connection (no leading `/`), which holds
/// it exclusively.
pub fn open_in_memory() -> rusqlite::Result<Connection> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE
        | rusqlite::OpenFlags::SQLITE_OPEN_CREATE
        | rusqlite::OpenFlags::SQLITE_OPEN_URI
        | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn =
        Connection::open_with_flags(format!("file:miniapp-ephemeral-{}-{n}?vfs=memdb", std::process::id()), flags)?;
    conn.pragma_update(None, "journal_mode", "MEMORY")?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    // No other connection can open it: holding its lock for good spares every transaction the
    // lock calls and the rewrite of the header's change counter.
    conn.pragma_update(None, "locking_mode", "EXCLUSIVE")?;
    Ok(conn)
}

/// The connection of a store at `path` (WAL mode), or of an in-memory one for `None`
/// ([`open_in_memory`]), with the settings the daemon's store and the platform's share: the
/// `synchronous` level (`synchronous_full`: every commit waits for the disk, else only a WAL
/// checkpoint does) and how long a statement waits for another connection's lock. Returns it with
/// where it is, for status output. The caller makes the file private first ([`create_private`]).
pub fn open_connection(path: Option<&Path>, synchronous_full: bool) -> rusqlite::Result<(Connection, String)> {
    let (conn, location) = match path {
        Some(p) => {
            let conn = Connection::open(p)?;
            conn.pragma_update(None, "journal_mode", "WAL")?;
            (conn, p.display().to_string())
        }
        None => (open_in_memory()?, ":memory:".to_owned()),
    };
    conn.pragma_update(None, "synchronous", if synchronous_full { "FULL" } else { "NORMAL" })?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok((conn, location))
}

/// The bytes `conn`'s page cache holds now (`SQLITE_DBSTATUS_CACHE_USED`): what the tests of an
/// in-memory store's bounded cache read.
pub fn page_cache_bytes(conn: &Connection) -> rusqlite::Result<i64> {
    let (mut now, mut highest) = (0, 0);
    // SAFETY: the handle is `conn`'s own, open for the call; the query only reads counters.
    let rc = unsafe {
        rusqlite::ffi::sqlite3_db_status(
            conn.handle(),
            rusqlite::ffi::SQLITE_DBSTATUS_CACHE_USED,
            &mut now,
            &mut highest,
            0,
        )
    };
    match rc {
        rusqlite::ffi::SQLITE_OK => Ok(i64::from(now)),
        code => Err(rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), None)),
    }
}

/// The write-ahead log is truncated to this after each checkpoint: with `max_page_count`, what the
/// database takes on disk is bounded.
pub const WAL_BYTES: i64 = 16 * 1024 * 1024;

/// Bounds the database file `conn` writes to `max_bytes` (whole pages, and never below what it
/// holds now: SQLite keeps the larger), and its write-ahead log to [`WAL_BYTES`] after each
/// checkpoint. A write beyond the bound fails with SQLITE_FULL ([`unwritable`]) and leaves the
/// connection serving reads. Returns the bound in bytes. Every connection to the file sets it.
pub fn limit_size(conn: &Connection, max_bytes: u64) -> rusqlite::Result<u64> {
    let page: i64 = conn.pragma_query_value(None, "page_size", |r| r.get(0))?;
    let page = page.max(512) as u64;
    let pages = (max_bytes / page).clamp(1, i64::MAX as u64);
    let set: i64 = conn.query_row(&format!("PRAGMA max_page_count = {pages}"), [], |r| r.get(0))?;
    conn.pragma_update(None, "journal_size_limit", WAL_BYTES)?;
    Ok(set as u64 * page)
}

/// Whether `e` says the database cannot write now (full: `max_page_count` or the disk;
/// read-only; an I/O error) rather than that the statement was wrong: such a failure is the
/// machine's, the call changed nothing, reads go on, and the same call works once there is room.
pub fn unwritable(e: &rusqlite::Error) -> bool {
    use rusqlite::ErrorCode::*;
    matches!(e, rusqlite::Error::SqliteFailure(f, _)
        if matches!(f.code, DiskFull | ReadOnly | SystemIoFailure | CannotOpen))
}

/// What a caller is told about a database that cannot write: SQLite's own words ("database or
/// disk is full", "attempt to write a readonly database"), never a path.
pub fn unwritable_reason(e: &rusqlite::Error) -> String {
    match e {
        rusqlite::Error::SqliteFailure(f, message) => message.clone().unwrap_or_else(|| f.to_string()),
        other => other.to_string(),
    }
}

/// Runs `f` in one transaction on `conn`: every multi-statement write of a SQLite store (this
/// engine's and the daemon's) goes through here. rusqlite's `Transaction` parses "BEGIN" and
/// "COMMIT" anew each time; these statements are prepared once.
pub fn in_transaction<T, E: From<rusqlite::Error>>(
    conn: &Connection,
    f: impl FnOnce(&Connection) -> Result<T, E>,
) -> Result<T, E> {
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

/// How many codes the sweep looks at before it lets other work on its runtime worker run: the
/// sweep of a large store is spread over many short steps instead of holding the worker.
const SWEEP_STEP: usize = 128;

/// The embedded engine. See the module docs.
pub struct SqliteStore {
    conn: Mutex<Connection>,
    location: String,
    /// Outstanding codes. A code's text is shared (one allocation) by this map, its owner's
    /// `issued` queue, `expiring` and, once redeemed, `spent`.
    codes: DashMap<Arc<str>, CodeRecord>,
    /// Redeemed codes (the app each was for, and when it would have expired) until they would have
    /// expired, so that a replay by that app gets "code been used"; any other app hears what a
    /// code that never existed gets.
    spent: DashMap<Arc<str>, (String, u64)>,
    /// The outstanding codes issued to each (app, uid), oldest first. A code leaves its queue when
    /// it leaves `codes`, so an empty queue is dropped and the map holds only users with codes.
    issued: DashMap<(String, String), VecDeque<Arc<str>>>,
    /// Every code issued, with its expiry, in the order issued: the sweep's work list. Codes live
    /// one validity period (`code_ttl_secs`) from a clock that moves forward, so the front expires
    /// first and a sweep touches only what expired (a code that left earlier is skipped then).
    expiring: Mutex<VecDeque<(u64, Arc<str>)>>,
    tokens: AccessTokens,
    buckets: Buckets,
    /// Registered apps' secret hashes, once read ([`SqliteStore::caching_app_secrets`]); `None`:
    /// every check reads the file.
    secrets: Option<DashMap<String, Vec<u8>>>,
    /// Sessions by (app, uid), once read ([`SqliteStore::caching_sessions`]); `None`: every read
    /// reads the file. Read, filled, written and dropped under the connection's lock, so a kept
    /// session is never older than the file's.
    sessions: Option<DashMap<(String, String), Option<SessionRow>>>,
}

/// Most secret hashes kept in memory (the map starts over past it; the file has the truth).
const MAX_CACHED_SECRETS: usize = 10_000;

/// Most sessions kept in memory (the map starts over past it; the file has the truth).
const MAX_CACHED_SESSIONS: usize = 10_000;

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("location", &self.location)
            .field("codes", &self.codes.len())
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`, or an in-memory one for `None`.
    /// `synchronous_full`: every commit waits for the disk (else only a WAL checkpoint does).
    pub fn open(path: Option<&Path>, synchronous_full: bool) -> Result<SqliteStore, StoreError> {
        if let Some(p) = path {
            create_private(p)?;
        }
        let (conn, location) = open_connection(path, synchronous_full)?;
        conn.execute_batch(SCHEMA)?;
        migrate(&conn)?;
        Ok(SqliteStore {
            conn: Mutex::new(conn),
            location,
            codes: DashMap::new(),
            spent: DashMap::new(),
            issued: DashMap::new(),
            expiring: Mutex::new(VecDeque::new()),
            tokens: AccessTokens::default(),
            buckets: Buckets::default(),
            secrets: None,
            sessions: None,
        })
    }

    /// This store keeping registered apps' secret hashes in memory once read, so that a backend's
    /// check reads no file. Only for an embedder whose process alone writes secrets to the file
    /// (the daemon: its `register-app` goes through its admin API); a file another process writes
    /// secrets to (a single `miniapp-platformd` instance, whose `register-app` is its own process)
    /// must be read on every check. Unknown app ids are not kept, so guessing fills nothing.
    pub fn caching_app_secrets(mut self) -> SqliteStore {
        self.secrets = Some(DashMap::new());
        self
    }

    /// This store keeping the sessions it read or wrote in memory, so that a login that renews a
    /// session reads no file. The same condition as [`caching_app_secrets`](Self::caching_app_secrets):
    /// only this process writes the file's sessions (the daemon; not a `miniapp-platformd`, where
    /// several processes may share a database).
    pub fn caching_sessions(mut self) -> SqliteStore {
        self.sessions = Some(DashMap::new());
        self
    }

    /// Writes `row` (an upsert: an existing row keeps its openid) and drops what is kept of it, both
    /// under the connection's lock.
    fn write_session(&self, conn: &Connection, row: &SessionRow) -> Result<(), StoreError> {
        upsert_session(conn, row)?;
        if let Some(kept) = &self.sessions {
            kept.remove(&(row.app_id.clone(), row.uid.clone()));
        }
        Ok(())
    }

    /// Bounds the database file to `max_bytes` ([`limit_size`]); returns the bound in bytes.
    pub fn limit_size(&self, max_bytes: u64) -> Result<u64, StoreError> {
        Ok(limit_size(&self.conn(), max_bytes)?)
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent; keep serving.
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The session `sql` selects by the app (?1) and one other key (?2), if any.
    fn one_session(&self, sql: &'static str, app_id: &str, key: &str) -> Result<Option<SessionRow>, StoreError> {
        Ok(self.conn().prepare_cached(sql)?.query_row(params![app_id, key], session_row).optional()?)
    }

    /// Takes `code` (which just left `codes`) out of the queue of the (app, uid) it was issued to,
    /// dropping the queue when it empties.
    fn unqueue(&self, app_id: &str, uid: &str, code: &Arc<str>) {
        let key = (app_id.to_owned(), uid.to_owned());
        if let Some(mut queue) = self.issued.get_mut(&key) {
            // The queue holds the very text the map's key does: a pointer compare finds it, at most
            // `max_codes_per_user` of them (the oldest first, which a redemption usually is).
            if let Some(at) = queue.iter().position(|c| Arc::ptr_eq(c, code)) {
                queue.remove(at);
            }
            if !queue.is_empty() {
                return;
            }
        }
        self.issued.remove_if(&key, |_, queue| queue.is_empty());
    }

    /// The next at most [`SWEEP_STEP`] entries of `expiring` that expired at `now_ms`.
    fn expired_step(&self, now_ms: u64) -> Vec<(u64, Arc<str>)> {
        let mut expiring = self.expiring.lock().unwrap_or_else(|e| e.into_inner());
        let due = expiring.iter().take(SWEEP_STEP).take_while(|(expires, _)| *expires <= now_ms).count();
        expiring.drain(..due).collect()
    }

    /// Runs `sql` on the connection (tests that break the database on purpose).
    #[cfg(test)]
    pub(crate) fn execute_batch(&self, sql: &str) -> rusqlite::Result<()> {
        self.conn().execute_batch(sql)
    }
}

#[async_trait::async_trait]
impl PlatformStore for SqliteStore {
    fn location(&self) -> String {
        self.location.clone()
    }

    async fn openid_secret(&self, fresh: [u8; 32]) -> Result<[u8; 32], StoreError> {
        let conn = self.conn();
        // The key's name is from when the daemon alone held it.
        let existing: Option<Vec<u8>> =
            conn.query_row("SELECT value FROM meta WHERE key = 'daemon_secret'", [], |r| r.get(0)).optional()?;
        if let Some(bytes) = existing.filter(|b| b.len() == 32) {
            let mut out = [0u8; 32];
            out.copy_from_slice(&bytes);
            return Ok(out);
        }
        conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('daemon_secret', ?1)", params![&fresh[..]])?;
        Ok(fresh)
    }

    async fn fill_session_openids(&self, openid: &OpenidOf) -> Result<usize, StoreError> {
        let conn = self.conn();
        if let Some(kept) = &self.sessions {
            kept.clear();
        }
        in_transaction(&conn, |conn| {
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

    async fn app_secret_hash(&self, app_id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(hash) = self.secrets.as_ref().and_then(|kept| kept.get(app_id).map(|h| h.clone())) {
            return Ok(Some(hash));
        }
        // The lock is held until the hash is kept, so a rotation (which drops it under the same
        // lock) cannot be overtaken by an older read.
        let conn = self.conn();
        let stored: Option<Vec<u8>> = conn
            .prepare_cached("SELECT secret_hash FROM app_secrets WHERE app_id = ?1")?
            .query_row(params![app_id], |r| r.get(0))
            .optional()?;
        if let (Some(kept), Some(hash)) = (&self.secrets, &stored) {
            if kept.len() >= MAX_CACHED_SECRETS {
                kept.clear();
            }
            kept.insert(app_id.to_owned(), hash.clone());
        }
        Ok(stored)
    }

    async fn set_app_secret_hash(&self, app_id: &str, hash: &[u8], replace: bool) -> Result<bool, StoreError> {
        let sql = if replace {
            "INSERT OR REPLACE INTO app_secrets (app_id, secret_hash) VALUES (?1, ?2)"
        } else {
            "INSERT OR IGNORE INTO app_secrets (app_id, secret_hash) VALUES (?1, ?2)"
        };
        // Held across the write and the cache's update, so a check never keeps the old hash.
        let conn = self.conn();
        let written = conn.execute(sql, params![app_id, hash])? == 1;
        if let Some(kept) = &self.secrets {
            kept.remove(app_id);
        }
        Ok(written)
    }

    async fn start_session(&self, session: &SessionRow) -> Result<(), StoreError> {
        self.write_session(&self.conn(), session)
    }

    async fn session(&self, app_id: &str, uid: &str) -> Result<Option<SessionRow>, StoreError> {
        const SQL: &str = select_sessions!("WHERE app_id = ?1 AND uid = ?2");
        let Some(kept) = &self.sessions else { return self.one_session(SQL, app_id, uid) };
        let key = (app_id.to_owned(), uid.to_owned());
        if let Some(session) = kept.get(&key) {
            return Ok(session.clone());
        }
        // The lock is held until the row is kept, so a write (which drops it under the same lock)
        // cannot be overtaken by an older read. An absent session is kept too: the first login of
        // an app reads once.
        let conn = self.conn();
        let stored = conn.prepare_cached(SQL)?.query_row(params![app_id, uid], session_row).optional()?;
        if kept.len() >= MAX_CACHED_SESSIONS {
            kept.clear();
        }
        kept.insert(key, stored.clone());
        Ok(stored)
    }

    async fn session_by_openid(&self, app_id: &str, openid: &str) -> Result<Option<SessionRow>, StoreError> {
        self.one_session(select_sessions!("WHERE app_id = ?1 AND openid = ?2"), app_id, openid)
    }

    async fn list_sessions(
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

    async fn user_changed(&self, uid: &str) -> Result<usize, StoreError> {
        let conn = self.conn();
        let ended = conn.execute("DELETE FROM sessions WHERE uid = ?1", params![uid])?;
        if let Some(kept) = &self.sessions {
            kept.retain(|(_, u), _| u != uid);
        }
        drop(conn);
        // (Their entries in `expiring` are skipped by the sweep.)
        self.codes.retain(|_, e| e.uid != uid);
        self.issued.retain(|(_, u), _| u != uid);
        Ok(ended)
    }

    async fn issue_code(
        &self,
        code: &str,
        record: CodeRecord,
        session: Option<&SessionRow>,
        max_per_user: usize,
    ) -> Result<(), StoreError> {
        if let Some(session) = session {
            self.write_session(&self.conn(), session)?;
        }
        // The (app, uid) entry stays locked until the code is in: concurrent issues count right.
        // At the cap the oldest outstanding code goes (a code that leaves `codes` otherwise leaves
        // its queue too), so an issue costs O(1) even at the cap.
        let code: Arc<str> = Arc::from(code);
        let expires_at_ms = record.expires_at_ms;
        let mut issued = self.issued.entry((record.app_id.clone(), record.uid.clone())).or_default();
        while issued.len() >= max_per_user.max(1) {
            if let Some(oldest) = issued.pop_front() {
                self.codes.remove(&oldest);
            }
        }
        self.codes.insert(code.clone(), record);
        issued.push_back(code.clone());
        drop(issued);
        self.expiring.lock().unwrap_or_else(|e| e.into_inner()).push_back((expires_at_ms, code));
        Ok(())
    }

    async fn redeem_code(
        &self,
        app_id: &str,
        code: &str,
        wanted: Wanted<'_>,
        now_ms: u64,
    ) -> Result<Redemption, StoreError> {
        let taken = self.codes.remove_if(code, |_, e| wanted.takes(app_id, e) && e.expires_at_ms > now_ms);
        if let Some((code, record)) = taken {
            self.unqueue(&record.app_id, &record.uid, &code);
            self.spent.insert(code, (record.app_id.clone(), record.expires_at_ms));
            return Ok(Redemption::Redeemed(record));
        }
        if self.spent.get(code).is_some_and(|spent| spent.0 == app_id) {
            return Ok(Redemption::Used);
        }
        Ok(match self.codes.get(code) {
            Some(e) if wanted.takes(app_id, &e) && e.expires_at_ms <= now_ms => Redemption::Expired,
            _ => Redemption::Invalid,
        })
    }

    async fn invalidate_codes(&self, app_id: &str, uid: &str, kind: Option<ValueKind>) -> Result<usize, StoreError> {
        // The user's own queue names every outstanding code of theirs: no walk of every code.
        let key = (app_id.to_owned(), uid.to_owned());
        let Some(queue) = self.issued.get(&key).map(|q| q.clone()) else { return Ok(0) };
        let mut dropped = 0;
        for code in &queue {
            let of_kind = |e: &CodeRecord| matches!(e.purpose, Purpose::Value { kind: k, .. } if kind.is_none_or(|want| want == k));
            if self.codes.remove_if(code, |_, e| of_kind(e)).is_some() {
                self.unqueue(app_id, uid, code);
                dropped += 1;
            }
        }
        Ok(dropped)
    }

    /// Walks only what expired, oldest first, [`SWEEP_STEP`] codes at a time, yielding to the
    /// runtime between steps: the worker is never held for the whole store.
    async fn sweep(&self, now_ms: u64) -> Result<(), StoreError> {
        loop {
            let step = self.expired_step(now_ms);
            for (_, code) in &step {
                if let Some((code, record)) = self.codes.remove_if(code, |_, e| e.expires_at_ms <= now_ms) {
                    self.unqueue(&record.app_id, &record.uid, &code);
                }
                // A redeemed code's tombstone lasts as long as the code would have.
                self.spent.remove_if(code, |_, (_, until)| *until <= now_ms);
            }
            if step.len() < SWEEP_STEP {
                break;
            }
            tokio::task::yield_now().await;
        }
        self.tokens.sweep(now_ms);
        self.buckets.sweep(now_ms);
        Ok(())
    }

    async fn outstanding_codes(&self) -> Result<usize, StoreError> {
        Ok(self.codes.len())
    }

    async fn issue_token(&self, app_id: &str, request: TokenRequest, now_ms: u64) -> Result<AccessToken, StoreError> {
        Ok(self.tokens.issue(app_id, request, now_ms))
    }

    async fn verify_token(&self, token: &str, now_ms: u64) -> Result<TokenCheck, StoreError> {
        Ok(match self.tokens.verify(token, now_ms) {
            Ok(app_id) => TokenCheck::Valid(app_id.to_string()),
            Err(ExchangeFailure::TokenExpired) => TokenCheck::Expired,
            Err(_) => TokenCheck::Unknown,
        })
    }

    async fn revoke_tokens(&self, app_id: &str) -> Result<(), StoreError> {
        self.tokens.revoke_app(app_id);
        Ok(())
    }

    async fn take_attempt(&self, key: &str, quota: Quota, now_ms: u64) -> Result<bool, StoreError> {
        Ok(self.buckets.take(key, quota, now_ms))
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
    fn an_in_memory_store_keeps_its_page_cache_bounded_as_it_grows() {
        // A page cache that holds the whole database is walked whole by commits after a
        // rebalance: bounded, a commit costs the same however much the store holds.
        let store = SqliteStore::open(None, false).unwrap();
        let conn = store.conn();
        conn.execute_batch("CREATE TABLE filler (k BLOB PRIMARY KEY, v BLOB NOT NULL)").unwrap();
        let value = vec![7u8; 4000];
        for _ in 0..6000 {
            let key = crate::tokens::random_token(24);
            conn.execute("INSERT INTO filler (k, v) VALUES (?1, ?2)", params![key, value]).unwrap();
        }
        let held: i64 = conn.query_row("SELECT SUM(LENGTH(v)) FROM filler", [], |r| r.get(0)).unwrap();
        assert!(held >= 24_000_000, "the store holds {held} bytes");
        let used = page_cache_bytes(&conn).unwrap();
        assert!(used < 8 * 1024 * 1024, "the page cache holds {used} bytes of a {held}-byte store");
    }

    fn session(uid: &str) -> SessionRow {
        SessionRow {
            app_id: "a".into(),
            uid: uid.into(),
            openid: format!("oa-{uid}"),
            session_key: "k".into(),
            created_at_ms: 1,
            expires_at_ms: 2,
        }
    }

    #[tokio::test]
    async fn kept_secret_hashes_follow_a_rotation_and_unknown_apps_are_not_kept() {
        let store = SqliteStore::open(None, false).unwrap().caching_app_secrets();
        assert_eq!(store.app_secret_hash("wxnone").await.unwrap(), None);
        assert!(store.secrets.as_ref().unwrap().is_empty(), "an unknown app id is not kept");
        assert!(store.set_app_secret_hash("wxa", b"old", false).await.unwrap());
        assert_eq!(store.app_secret_hash("wxa").await.unwrap().as_deref(), Some(&b"old"[..]));
        assert!(!store.set_app_secret_hash("wxa", b"new", false).await.unwrap(), "no replace without rotate");
        assert_eq!(store.app_secret_hash("wxa").await.unwrap().as_deref(), Some(&b"old"[..]));
        assert!(store.set_app_secret_hash("wxa", b"new", true).await.unwrap());
        assert_eq!(store.app_secret_hash("wxa").await.unwrap().as_deref(), Some(&b"new"[..]), "the rotation is seen");
    }

    /// Kept sessions answer as the file does through every write: absent, started, renewed,
    /// replaced by a code's issue, ended by a user change.
    #[tokio::test]
    async fn kept_sessions_follow_every_write() {
        for store in
            [SqliteStore::open(None, false).unwrap(), SqliteStore::open(None, false).unwrap().caching_sessions()]
        {
            assert_eq!(store.session("a", "u").await.unwrap(), None);
            store.start_session(&session("u")).await.unwrap();
            assert_eq!(store.session("a", "u").await.unwrap(), Some(session("u")), "a started session is seen");
            let renewed = SessionRow { expires_at_ms: 9, ..session("u") };
            store.start_session(&renewed).await.unwrap();
            assert_eq!(store.session("a", "u").await.unwrap(), Some(renewed.clone()), "a renewal is seen");
            let replaced = SessionRow { session_key: "k2".into(), created_at_ms: 5, ..renewed };
            store.issue_code("c", code_of("u", 100), Some(&replaced), 10).await.unwrap();
            assert_eq!(store.session("a", "u").await.unwrap(), Some(replaced), "a code's session is seen");
            store.start_session(&session("v")).await.unwrap();
            assert_eq!(store.user_changed("u").await.unwrap(), 1);
            assert_eq!(store.session("a", "u").await.unwrap(), None, "an ended session is gone");
            assert_eq!(store.session("a", "v").await.unwrap(), Some(session("v")), "another user's stays");
        }
    }

    #[tokio::test]
    async fn data_survives_reopening_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.db");
        let secret = {
            let store = SqliteStore::open(Some(&path), false).unwrap();
            let s = store.openid_secret([7; 32]).await.unwrap();
            store.start_session(&session("u")).await.unwrap();
            assert!(store.set_app_secret_hash("a", &[1; 32], false).await.unwrap());
            s
        };
        let store = SqliteStore::open(Some(&path), false).unwrap();
        assert_eq!(store.openid_secret([9; 32]).await.unwrap(), secret);
        assert_eq!(store.session("a", "u").await.unwrap(), Some(session("u")));
        assert_eq!(store.session_by_openid("a", "oa-u").await.unwrap(), Some(session("u")));
        assert_eq!(store.app_secret_hash("a").await.unwrap(), Some(vec![1; 32]));
        assert!(!store.set_app_secret_hash("a", &[2; 32], false).await.unwrap(), "kept without replace");
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn the_database_files_are_private_even_in_an_open_dir() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.path().join("broker.db");
        let store = SqliteStore::open(Some(&path), false).unwrap();
        store.openid_secret([7; 32]).await.unwrap();
        for file in ["broker.db", "broker.db-wal", "broker.db-shm"] {
            let mode = std::fs::metadata(dir.path().join(file)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{file}");
        }
    }

    #[test]
    fn a_session_is_found_by_its_openid_through_an_index() {
        let store = SqliteStore::open(None, false).unwrap();
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

    fn code_of(uid: &str, expires_at_ms: u64) -> CodeRecord {
        CodeRecord {
            app_id: "a".into(),
            uid: uid.into(),
            openid: format!("oa-{uid}"),
            purpose: Purpose::Login { auth_code: None },
            expires_at_ms,
            ledger: vec![],
        }
    }

    #[tokio::test]
    async fn the_sweep_drops_what_expired_and_its_users_queues() {
        let store = SqliteStore::open(None, false).unwrap();
        store.issue_code("old-1", code_of("u", 100), None, 10).await.unwrap();
        store.issue_code("old-2", code_of("v", 100), None, 10).await.unwrap();
        store.issue_code("new", code_of("u", 300), None, 10).await.unwrap();
        assert!(matches!(store.redeem_code("a", "old-2", Wanted::Login, 50).await.unwrap(), Redemption::Redeemed(_)));
        store.sweep(200).await.unwrap();
        assert_eq!(store.outstanding_codes().await.unwrap(), 1);
        assert_eq!(store.redeem_code("a", "old-1", Wanted::Login, 200).await.unwrap(), Redemption::Invalid);
        assert_eq!(
            store.redeem_code("a", "old-2", Wanted::Login, 200).await.unwrap(),
            Redemption::Invalid,
            "tombstone gone"
        );
        assert_eq!(store.issued.len(), 1, "only u, whose newer code is outstanding");
        assert_eq!(store.expiring.lock().unwrap().len(), 1);
        store.sweep(300).await.unwrap();
        assert_eq!(store.outstanding_codes().await.unwrap(), 0);
        assert!(store.issued.is_empty() && store.spent.is_empty() && store.expiring.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_redeemed_code_leaves_its_users_count_at_once() {
        let store = SqliteStore::open(None, false).unwrap();
        for code in ["c1", "c2", "c3"] {
            store.issue_code(code, code_of("u", 100), None, 3).await.unwrap();
        }
        assert!(matches!(store.redeem_code("a", "c2", Wanted::Login, 50).await.unwrap(), Redemption::Redeemed(_)));
        // Two are outstanding: a fourth fits under the cap of three, and drops none.
        store.issue_code("c4", code_of("u", 100), None, 3).await.unwrap();
        assert!(matches!(store.redeem_code("a", "c1", Wanted::Login, 50).await.unwrap(), Redemption::Redeemed(_)));
        // An invalidated value code leaves it too.
        let value = |uid: &str| CodeRecord {
            purpose: Purpose::Value { kind: ValueKind::PhoneNumber, value: "1".into() },
            ..code_of(uid, 100)
        };
        store.issue_code("p1", value("w"), None, 3).await.unwrap();
        assert_eq!(store.invalidate_codes("a", "w", None).await.unwrap(), 1);
        assert!(!store.issued.contains_key(&("a".to_owned(), "w".to_owned())));
    }

    #[test]
    fn the_sweep_of_a_large_store_lets_other_work_run_between_steps() {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        runtime.block_on(async {
            let store = Arc::new(SqliteStore::open(None, false).unwrap());
            let total = SWEEP_STEP * 20;
            for i in 0..total {
                store.issue_code(&format!("c{i}"), code_of(&format!("u{i}"), 100), None, 10).await.unwrap();
            }
            // Another task on the same (only) worker: what it sees of the store while the sweep runs.
            let seen = {
                let store = store.clone();
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    loop {
                        let left = store.codes.len();
                        seen.push(left);
                        if left == 0 {
                            return seen;
                        }
                        tokio::task::yield_now().await;
                    }
                })
            };
            tokio::task::yield_now().await;
            store.sweep(200).await.unwrap();
            let seen = seen.await.unwrap();
            assert!(
                seen.iter().any(|&left| left > 0 && left < total),
                "the other task ran only before or after the whole sweep: {seen:?}"
            );
        });
    }

    #[tokio::test]
    async fn a_login_code_whose_session_cannot_be_written_is_not_stored() {
        let store = SqliteStore::open(None, false).unwrap();
        let record = |uid: &str| CodeRecord {
            app_id: "a".into(),
            uid: uid.into(),
            openid: format!("oa-{uid}"),
            purpose: Purpose::Login { auth_code: None },
            expires_at_ms: 100,
            ledger: vec![],
        };
        store.issue_code("c1", record("u"), Some(&session("u")), 10).await.unwrap();
        assert_eq!(store.session("a", "u").await.unwrap(), Some(session("u")));
        store.execute_batch("ALTER TABLE sessions RENAME TO gone").unwrap();
        assert!(store.issue_code("c2", record("v"), Some(&session("v")), 10).await.is_err());
        assert_eq!(store.outstanding_codes().await.unwrap(), 1, "only the code whose session was written");
        store.execute_batch("ALTER TABLE gone RENAME TO sessions").unwrap();
        let taken = store.redeem_code("a", "c1", Wanted::Login, 50).await.unwrap();
        assert_eq!(taken, Redemption::Redeemed(record("u")));
        assert_eq!(store.redeem_code("a", "c1", Wanted::Login, 50).await.unwrap(), Redemption::Used);
        assert_eq!(store.redeem_code("a", "c2", Wanted::Login, 50).await.unwrap(), Redemption::Invalid);
    }
}
