//! The daemon's database: grants and refusals, payment outcomes and the disclosure ledger. The
//! embedded platform keeps its own tables (sessions, app secrets, the daemon secret) in the same
//! file through its own engine (`miniapp_platform::store::sqlite`); each side creates and migrates
//! only its tables, so a data dir of an earlier version keeps working as it is.
//!
//! SQLite (bundled, so nothing is needed from the system) in WAL mode: a write that returned is on
//! disk for any later reader, and survives the daemon being killed. Writes are short and few
//! (a login, a grant, a payment), so one connection behind a mutex serves them without a thread hop.
//! The in-memory mode (`ephemeral`) runs the same SQL against `:memory:`.
//!
//! What clients make it hold is bounded: the file grows to `store.max_bytes` at most
//! ([`Store::limit_size`]), a disclosure identical to a recent one adds to that row's count
//! instead of adding a row (`privacy.ledger_coalesce_secs`; its count is written at most once a
//! second while repeats keep coming, see `RecentRow`), and the sweep deletes ledger rows and
//! payment records past their retention a bounded batch at a time (`crate::retention`). A write
//! the store cannot make (the bound, a full disk, an I/O error) fails with an error
//! [`StoreError::is_unwritable`] names, and leaves the connection serving reads.

use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    path::Path,
    sync::{
        Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
};

use miniapp_platform::store::sqlite::in_transaction;
use rusqlite::{Connection, OptionalExtension, params};

use crate::error::StoreError;

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

/// The database handle shared by consent, the API layer and the admin service.
#[derive(Debug)]
pub struct Store {
    conn: Mutex<Connection>,
    location: String,
    /// A disclosure identical to a row whose first disclosure is this recent adds to that row
    /// (0: never).
    coalesce_ms: AtomicU64,
    /// The ledger rows identical disclosures recently added to, and what they added that is not
    /// written yet. Locked only while `conn` is held.
    recent: Mutex<RecentRows>,
}

/// A ledger row identical disclosures add to, kept so that the next one needs no lookup: its id,
/// what it is of, its first disclosure's time, and the disclosures counted since its count was
/// last written (at `written_ms`). A row's count and last time are written at most once per
/// [`COUNT_SLACK_MS`] while identical disclosures keep coming, and whenever the ledger is read,
/// a row of it is taken back, the sweep runs or the store closes: a crash loses at most the counts
/// of the repeats since (the row itself, its first time and its redemptions are written before
/// the call that made them is answered).
#[derive(Debug, Clone)]
struct RecentRow {
    id: u64,
    app_id: String,
    uid: String,
    what: String,
    surface: String,
    api: String,
    via_code: bool,
    at_ms: u64,
    written_ms: u64,
    unwritten: u64,
    unwritten_last_ms: u64,
}

impl RecentRow {
    fn new(id: u64, at_ms: u64, row: &NewLedgerRow<'_>) -> RecentRow {
        RecentRow {
            id,
            app_id: row.app_id.to_owned(),
            uid: row.uid.to_owned(),
            what: row.what.to_owned(),
            surface: row.surface.to_owned(),
            api: row.api.to_owned(),
            via_code: row.via_code,
            at_ms,
            written_ms: row.at_ms,
            unwritten: 0,
            unwritten_last_ms: 0,
        }
    }

    fn is_of(&self, row: &NewLedgerRow<'_>) -> bool {
        self.via_code == row.via_code
            && self.api == row.api
            && self.what == row.what
            && self.surface == row.surface
            && self.uid == row.uid
            && self.app_id == row.app_id
    }

    /// Writes the disclosures counted and not written yet.
    fn write(&mut self, conn: &Connection) -> Result<(), StoreError> {
        if self.unwritten > 0 {
            conn.prepare_cached(ADD_TO_LEDGER_ROW)?.execute(params![
                self.id as i64,
                self.unwritten as i64,
                self.unwritten_last_ms as i64
            ])?;
            self.unwritten = 0;
            self.written_ms = self.unwritten_last_ms;
        }
        Ok(())
    }
}

/// The recent ledger rows by what they are of (a hash of it; the row itself is compared too).
#[derive(Debug, Clone, Default)]
struct RecentRows {
    rows: HashMap<u64, RecentRow>,
    keys: RandomState,
}

impl RecentRows {
    fn key(&self, row: &NewLedgerRow<'_>) -> u64 {
        self.keys.hash_one((row.app_id, row.uid, row.what, row.surface, row.api, row.via_code))
    }

    /// Writes every recent row's unwritten count.
    fn write(&mut self, conn: &Connection) -> Result<(), StoreError> {
        self.rows.values_mut().try_for_each(|r| r.write(conn))
    }

    fn clear(&mut self) {
        self.rows.clear();
    }
}

/// How long a recent row's count may go unwritten while identical disclosures keep coming.
const COUNT_SLACK_MS: u64 = 1_000;
/// Most recent rows kept (the signed-in user's apps and APIs; past it they are written and the
/// list starts over).
const MAX_RECENT_ROWS: usize = 1_024;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS grants (
    app_id TEXT NOT NULL, uid TEXT NOT NULL, scope TEXT NOT NULL, granted_at_ms INTEGER NOT NULL,
    PRIMARY KEY (app_id, uid, scope));
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

/// Brings a database an earlier version created up to [`SCHEMA`]: the ledger's ids lost
/// AUTOINCREMENT ([`LEDGER_WITHOUT_AUTOINCREMENT`]); ledger rows gained a count, a last time and
/// a count of redeemed codes ([`LEDGER_COUNTS`]: a row of before is one disclosure, redeemed once
/// if it was) and an index by (app, user, time) to find the row a disclosure adds to; payments lost
/// their index by time, which every record paid a third b-tree's write for ([`Store::payments_prune`]
/// walks the records in the order they were written instead). (The platform's engine migrates its
/// tables.)
fn migrate(conn: &Connection) -> Result<(), StoreError> {
    let ledger_sql: String =
        conn.query_row("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'ledger'", [], |r| r.get(0))?;
    if ledger_sql.contains("AUTOINCREMENT") {
        conn.execute_batch(&format!("BEGIN IMMEDIATE;{LEDGER_WITHOUT_AUTOINCREMENT}COMMIT;"))?;
    }
    let has_count: bool = conn.prepare("SELECT 1 FROM pragma_table_info('ledger') WHERE name = 'count'")?.exists([])?;
    if !has_count {
        conn.execute_batch(&format!("BEGIN IMMEDIATE;{LEDGER_COUNTS}COMMIT;"))?;
    }
    conn.execute_batch(
        "CREATE INDEX IF NOT EXISTS ledger_user ON ledger (app_id, uid, at_ms);
         DROP INDEX IF EXISTS payments_at;",
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
/// at nearly the same size.
const INSERT_LEDGER: &str = "INSERT INTO ledger (app_id, uid, what, surface, api, at_ms, via_code, last_at_ms)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?6)";
/// The newest row identical to a disclosure (?3-?6) of (app ?1, uid ?2) whose first disclosure is
/// at ?7 or later: the one it adds to. Found through `ledger_user`, among the user's recent rows.
const SAME_LEDGER_ROW: &str = "SELECT id, at_ms FROM ledger
     WHERE app_id = ?1 AND uid = ?2 AND at_ms >= ?7 AND what = ?3 AND surface = ?4 AND api = ?5 AND via_code = ?6
     ORDER BY at_ms DESC LIMIT 1";
/// Adds ?2 disclosures, the last at ?3, to row ?1.
const ADD_TO_LEDGER_ROW: &str =
    "UPDATE ledger SET count = count + ?2, last_at_ms = max(coalesce(last_at_ms, at_ms), ?3) WHERE id = ?1";

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

/// Records a disclosure: adds to the count of an identical row whose first disclosure is less than
/// `coalesce_ms` old (so a row spans at most that long, and retention by its first time stays
/// true), else adds a row. Returns the row's id. A row in `recent` is added to without a lookup,
/// and in memory within [`COUNT_SLACK_MS`] of its last written count.
fn insert_ledger(
    conn: &Connection,
    recent: &mut RecentRows,
    row: &NewLedgerRow<'_>,
    coalesce_ms: u64,
) -> Result<u64, StoreError> {
    if coalesce_ms > 0 {
        let since = row.at_ms.saturating_sub(coalesce_ms - 1);
        let key = recent.key(row);
        if let Some(kept) = recent.rows.get_mut(&key) {
            if kept.is_of(row) && kept.at_ms >= since {
                kept.unwritten += 1;
                kept.unwritten_last_ms = kept.unwritten_last_ms.max(row.at_ms);
                if row.at_ms.saturating_sub(kept.written_ms) >= COUNT_SLACK_MS {
                    kept.write(conn).inspect_err(|_| kept.unwritten -= 1)?;
                }
                return Ok(kept.id);
            }
            // Its window passed (or another row of the same hash): it gives way below.
            kept.write(conn)?;
            recent.rows.remove(&key);
        }
        let same: Option<(i64, i64)> = conn
            .prepare_cached(SAME_LEDGER_ROW)?
            .query_row(
                params![row.app_id, row.uid, row.what, row.surface, row.api, row.via_code as i64, since as i64],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        if let Some((id, at_ms)) = same {
            conn.prepare_cached(ADD_TO_LEDGER_ROW)?.execute(params![id, 1, row.at_ms as i64])?;
            keep(conn, recent, key, RecentRow::new(id as u64, at_ms as u64, row));
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
    let id = conn.last_insert_rowid() as u64;
    if coalesce_ms > 0 {
        keep(conn, recent, recent.key(row), RecentRow::new(id, row.at_ms, row));
    }
    Ok(id)
}

/// Adds `row` to `recent`, writing and dropping the others first when it is full (when they cannot
/// be written, they stay and `row` is not kept: the next identical disclosure looks it up).
fn keep(conn: &Connection, recent: &mut RecentRows, key: u64, row: RecentRow) {
    if recent.rows.len() >= MAX_RECENT_ROWS && recent.write(conn).is_ok() {
        recent.clear();
    }
    if recent.rows.len() < MAX_RECENT_ROWS {
        recent.rows.insert(key, row);
    }
}

/// A payment's first record wins (the write-ahead record).
const RECORD_PAYMENT: &str = "INSERT OR IGNORE INTO payments (app_id, idempotency_key, api, ok, body, recorded_at_ms)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6)";
/// A payment's outcome replaces its write-ahead record in place: the key, its index entry and the
/// record's time (which retention goes by, and which the time index holds) stay; only the outcome
/// changes (an INSERT OR REPLACE deleted and re-inserted the row and both index entries).
const SETTLE_PAYMENT: &str = "UPDATE payments SET ok = ?3, body = ?4 WHERE app_id = ?1 AND idempotency_key = ?2";
/// A payment's outcome when its write-ahead record is gone (pruned meanwhile).
const REPLACE_PAYMENT: &str = "INSERT OR REPLACE INTO payments (app_id, idempotency_key, api, ok, body, recorded_at_ms)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6)";

impl Drop for Store {
    /// The counts the recent ledger rows hold in memory go to the file with the store.
    fn drop(&mut self) {
        let _ = self.write_ledger_counts();
    }
}

impl Store {
    /// Opens (creating if needed) the database at `path`, or an in-memory one for `None`.
    pub fn open(path: Option<&Path>, synchronous_full: bool) -> Result<Store, StoreError> {
        // The file holds the user's ledger, and the platform's secrets beside it: private.
        if let Some(p) = path {
            miniapp_platform::store::sqlite::create_private(p)?;
        }
        let (conn, location) = miniapp_platform::store::sqlite::open_connection(path, synchronous_full)?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.execute_batch(SCHEMA)?;
        migrate(&conn)?;
        Ok(Store {
            conn: Mutex::new(conn),
            location,
            coalesce_ms: AtomicU64::new(0),
            recent: Mutex::new(RecentRows::default()),
        })
    }

    /// Bounds the database file to `max_bytes` (whole pages, never below what it holds now) and
    /// its write-ahead log ([`miniapp_platform::store::sqlite::limit_size`]); returns the bound.
    pub fn limit_size(&self, max_bytes: u64) -> Result<u64, StoreError> {
        Ok(miniapp_platform::store::sqlite::limit_size(&self.conn(), max_bytes)?)
    }

    /// Disclosures identical to a row whose first is less than `window_ms` old add to its count
    /// (0: never).
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

    /// The connection and the recent ledger rows, locked in that order.
    fn ledger_conn(&self) -> (MutexGuard<'_, Connection>, MutexGuard<'_, RecentRows>) {
        let conn = self.conn();
        (conn, self.recent.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Writes the counts the recent ledger rows hold in memory (the sweep calls it, and every
    /// ledger read does first).
    pub fn write_ledger_counts(&self) -> Result<(), StoreError> {
        let (conn, mut recent) = self.ledger_conn();
        recent.write(&conn)
    }

    /// Records a code's disclosures in one transaction (each a new row or one more of a recent
    /// identical row); returns the rows' ids. One row (a login's openid) needs no BEGIN and COMMIT
    /// around it: the connection's lock keeps its statements together, and a crash between them
    /// leaves nothing half-written.
    pub fn ledger_add_all(&self, rows: &[NewLedgerRow<'_>]) -> Result<Vec<u64>, StoreError> {
        let coalesce_ms = self.coalescing();
        let (conn, mut recent) = self.ledger_conn();
        match rows {
            [row] => Ok(vec![insert_ledger(&conn, &mut recent, row, coalesce_ms)?]),
            _ => {
                // A transaction that fails leaves the ledger as it was: the recent rows too.
                let before = recent.clone();
                in_transaction(&conn, |conn| {
                    rows.iter().map(|row| insert_ledger(conn, &mut recent, row, coalesce_ms)).collect()
                })
                .inspect_err(|_| *recent = before)
            }
        }
    }

    /// Takes back one disclosure from each row (those of a code that was not issued after all): a
    /// row that counted only it goes.
    pub fn ledger_remove(&self, ids: &[u64]) -> Result<(), StoreError> {
        let (conn, mut recent) = self.ledger_conn();
        // The counts written first, so that taking one back sees them; a row that goes leaves
        // the recent ones with the rest.
        recent.write(&conn)?;
        recent.clear();
        in_transaction(&conn, |conn| {
            let mut less = conn.prepare_cached("UPDATE ledger SET count = count - 1 WHERE id = ?1 AND count > 1")?;
            let mut gone = conn.prepare_cached("DELETE FROM ledger WHERE id = ?1 AND count <= 1")?;
            for id in ids {
                if less.execute(params![*id as i64])? == 0 {
                    gone.execute(params![*id as i64])?;
                }
            }
            Ok(())
        })
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
        let (conn, mut recent) = self.ledger_conn();
        insert_ledger(&conn, &mut recent, row, self.coalescing())
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
        let (conn, mut recent) = self.ledger_conn();
        recent.write(&conn)?;
        drop(recent);
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

    /// Drops at most `limit` of the ledger rows first disclosed before `before_ms` (retention),
    /// oldest first; returns how many. A bounded batch holds the store for a bounded time.
    /// The recent rows' counts are written first; a prune that deletes anything lets them go.
    pub fn ledger_prune(&self, before_ms: u64, limit: u32) -> Result<usize, StoreError> {
        let (conn, mut recent) = self.ledger_conn();
        recent.write(&conn)?;
        let deleted = conn
            .prepare_cached(
                "DELETE FROM ledger WHERE id IN (SELECT id FROM ledger WHERE at_ms < ?1 ORDER BY at_ms LIMIT ?2)",
            )?
            .execute(params![before_ms as i64, i64::from(limit)])?;
        if deleted > 0 {
            recent.clear();
        }
        Ok(deleted)
    }

    /// Drops the payment records recorded before `before_ms` (retention) among the `limit` oldest
    /// written; returns how many.
    ///
    /// Records are taken in the order they were written (rowid order: a new record's rowid is past
    /// every live one's, and pruning only takes from the front), which is their time order while
    /// the clock runs forward. So no index by time is kept for this sweep. A record written after
    /// the clock stepped back may wait behind younger ones for as long as the step was.
    pub fn payments_prune(&self, before_ms: u64, limit: u32) -> Result<usize, StoreError> {
        Ok(self
            .conn()
            .prepare_cached(
                "DELETE FROM payments WHERE rowid IN (SELECT rowid FROM payments ORDER BY rowid LIMIT ?2)
                     AND recorded_at_ms < ?1",
            )?
            .execute(params![before_ms as i64, i64::from(limit)])?)
    }

    pub fn payment(&self, app_id: &str, key: &str) -> Result<Option<PaymentRow>, StoreError> {
        Ok(self
            .conn()
            .prepare_cached("SELECT ok, body FROM payments WHERE app_id = ?1 AND idempotency_key = ?2")?
            .query_row(params![app_id, key], |r| Ok(PaymentRow { ok: r.get::<_, i64>(0)? != 0, body: r.get(1)? }))
            .optional()?)
    }

    /// Records a payment if its key has no record yet (the write-ahead record that says the host
    /// is about to see the key): the first record for a key wins. Returns whether this one did
    /// (`false`: the key was spent before, and its record stands).
    pub fn record_payment(
        &self,
        app_id: &str,
        key: &str,
        api: &str,
        row: &PaymentRow,
        now_ms: u64,
    ) -> Result<bool, StoreError> {
        self.write_payment(RECORD_PAYMENT, app_id, key, api, row, now_ms).map(|inserted| inserted == 1)
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
        let conn = self.conn();
        let settled = conn.prepare_cached(SETTLE_PAYMENT)?.execute(params![app_id, key, row.ok as i64, row.body])?;
        if settled == 0 {
            drop(conn);
            self.write_payment(REPLACE_PAYMENT, app_id, key, api, row, now_ms)?;
        }
        Ok(())
    }

    fn write_payment(
        &self,
        sql: &'static str,
        app_id: &str,
        key: &str,
        api: &str,
        row: &PaymentRow,
        now_ms: u64,
    ) -> Result<usize, StoreError> {
        Ok(self.conn().prepare_cached(sql)?.execute(params![
            app_id,
            key,
            api,
            row.ok as i64,
            row.body,
            now_ms as i64
        ])?)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_survives_reopening_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.db");
        {
            let store = Store::open(Some(&path), false).unwrap();
            store.add_grants("a", "u", &["SCOPE_EMAIL".into()], 3).unwrap();
            store.record_payment("a", "key", "requestPayment", &PaymentRow { ok: true, body: vec![1] }, 4).unwrap();
        }
        let store = Store::open(Some(&path), false).unwrap();
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
        store.add_grants("a", "u", &["SCOPE_EMAIL".into()], 3).unwrap();
        for file in ["broker.db", "broker.db-wal", "broker.db-shm"] {
            let mode = std::fs::metadata(dir.path().join(file)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{file}");
        }
    }

    #[test]
    fn an_in_memory_store_keeps_its_page_cache_bounded_as_payments_accumulate() {
        // `--ephemeral`: every page in the cache would make each commit after a rebalance walk
        // them all, a payment costing more the more payments are recorded.
        let store = Store::open(None, false).unwrap();
        let body = vec![3u8; 1000];
        for i in 0..20_000 {
            let key = format!(
                "requestPayment:1:u:{:032x}",
                (i as u128).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835)
            );
            assert!(
                store
                    .record_payment("a", &key, "requestPayment", &PaymentRow { ok: true, body: body.clone() }, 1)
                    .unwrap()
            );
        }
        assert_eq!(store.payment_count().unwrap(), 20_000);
        let used = miniapp_platform::store::sqlite::page_cache_bytes(&store.conn()).unwrap();
        assert!(used < 8 * 1024 * 1024, "the page cache holds {used} bytes of 20,000 payments of 1 kB");
    }

    #[test]
    fn the_first_payment_record_wins_and_revoke_counts() {
        let store = Store::open(None, false).unwrap();
        assert!(store.record_payment("a", "k", "requestPayment", &PaymentRow { ok: true, body: vec![1] }, 1).unwrap());
        assert!(
            !store.record_payment("a", "k", "requestPayment", &PaymentRow { ok: false, body: vec![2] }, 2).unwrap()
        );
        assert!(store.payment("a", "k").unwrap().unwrap().ok);
        store.add_grants("a", "u", &["S1".into(), "S2".into()], 1).unwrap();
        assert_eq!(store.revoke_grants("a", "u", Some("S1")).unwrap(), 1);
        assert_eq!(store.revoke_grants("a", "u", None).unwrap(), 1);
    }

    #[test]
    fn a_settled_payment_replaces_its_write_ahead_record_or_stands_alone() {
        let store = Store::open(None, false).unwrap();
        store.record_payment("a", "k", "requestPayment", &PaymentRow { ok: false, body: vec![9] }, 1).unwrap();
        store.settle_payment("a", "k", "requestPayment", &PaymentRow { ok: true, body: vec![1, 2] }, 2).unwrap();
        assert_eq!(store.payment("a", "k").unwrap(), Some(PaymentRow { ok: true, body: vec![1, 2] }));
        // The write-ahead record went meanwhile (pruned): the outcome is recorded all the same.
        store.settle_payment("a", "gone", "requestPayment", &PaymentRow { ok: false, body: vec![3] }, 3).unwrap();
        assert_eq!(store.payment("a", "gone").unwrap(), Some(PaymentRow { ok: false, body: vec![3] }));
        assert_eq!(store.payment_count().unwrap(), 2);
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
    fn a_codes_ledger_rows_are_written_together_or_not_at_all() {
        let store = Store::open(None, false).unwrap();
        let ids = store.ledger_add_all(&[row("openid", "login", 5, true), row("unionid", "login", 5, true)]).unwrap();
        assert_eq!(ids.len(), 2);
        assert!(ids[0] < ids[1]);
        let rows = store.ledger(None, None, 0).unwrap();
        assert_eq!(
            rows.iter().map(|r| (r.id, r.what.as_str())).collect::<Vec<_>>(),
            [(ids[0], "openid"), (ids[1], "unionid")]
        );
        // The rows of a code that was not issued after all go again.
        store.ledger_remove(&ids).unwrap();
        assert!(store.ledger(None, None, 0).unwrap().is_empty());
        // Neither row is written when the second cannot be, and the connection is usable afterwards.
        store
            .conn()
            .execute_batch(
                "CREATE TRIGGER fail BEFORE INSERT ON ledger WHEN NEW.what = 'unionid'
                 BEGIN SELECT RAISE(ABORT, 'disk full'); END",
            )
            .unwrap();
        assert!(store.ledger_add_all(&[row("openid", "login", 7, true), row("unionid", "login", 7, true)]).is_err());
        assert!(store.ledger(None, None, 0).unwrap().is_empty());
        assert_eq!(store.ledger_add_all(&[row("openid", "login", 8, true)]).unwrap().len(), 1);
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
    fn payment_records_are_pruned_in_the_order_they_were_written() {
        let store = Store::open(None, false).unwrap();
        let row = PaymentRow { ok: true, body: vec![1] };
        // Written at 10, 20, 30, then at 5 after the clock stepped back.
        for (key, at) in [("a", 10), ("b", 20), ("c", 30), ("d", 5)] {
            assert!(store.record_payment("app", key, "requestPayment", &row, at).unwrap());
        }
        // The two oldest written: only the one recorded before 15 goes.
        assert_eq!(store.payments_prune(15, 2).unwrap(), 1);
        assert_eq!(store.payment("app", "a").unwrap(), None);
        assert!(store.payment("app", "b").unwrap().is_some());
        // "d", before 15 too, waits behind "b" and "c" until they are past the retention.
        assert_eq!(store.payments_prune(15, 2).unwrap(), 0);
        assert!(store.payment("app", "d").unwrap().is_some());
        assert_eq!(store.payments_prune(31, 10).unwrap(), 3);
        assert_eq!(store.payment_count().unwrap(), 0);
        // A record replaced after its write-ahead record was forgotten is written anew, last.
        store.record_payment("app", "e", "requestPayment", &row, 40).unwrap();
        store.record_payment("app", "f", "requestPayment", &row, 50).unwrap();
        store.forget_payment("app", "e").unwrap();
        store.settle_payment("app", "e", "requestPayment", &row, 60).unwrap();
        assert_eq!(store.payments_prune(55, 1).unwrap(), 1, "f, written before e's replacement");
        assert!(store.payment("app", "e").unwrap().is_some());
    }

    #[test]
    fn a_payments_table_with_the_index_by_time_loses_it_and_keeps_its_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.db");
        {
            let store = Store::open(Some(&path), false).unwrap();
            store.record_payment("a", "key", "requestPayment", &PaymentRow { ok: true, body: vec![1] }, 4).unwrap();
            store.conn().execute_batch("CREATE INDEX payments_at ON payments (recorded_at_ms)").unwrap();
        }
        let store = Store::open(Some(&path), false).unwrap();
        assert_eq!(store.payment("a", "key").unwrap(), Some(PaymentRow { ok: true, body: vec![1] }));
        let indexes: i64 = store
            .conn()
            .query_row("SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND name = 'payments_at'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(indexes, 0);
        assert_eq!(store.payments_prune(5, 10).unwrap(), 1);
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
    fn identical_disclosures_are_counted_on_one_row_and_a_withdrawn_one_is_taken_back() {
        let store = Store::open(None, false).unwrap();
        store.coalesce_ledger(100);
        let first = store.ledger_add_all(&[row("openid", "login", 10, true)]).unwrap();
        let again = store.ledger_add_all(&[row("openid", "login", 60, true)]).unwrap();
        assert_eq!(first, again, "within the window: the same row");
        assert_ne!(store.ledger_add(&row("avatar", "chooseAvatar", 60, false)).unwrap(), first[0], "another kind");
        let counts = |store: &Store| -> Vec<(String, u64, u64, u64)> {
            let rows = store.ledger(None, None, 0).unwrap();
            rows.into_iter().map(|r| (r.what, r.count, r.at_ms, r.last_at_ms)).collect()
        };
        assert_eq!(counts(&store), [("openid".into(), 2, 10, 60), ("avatar".into(), 1, 60, 60)]);
        // A code that was not issued after all takes its disclosure back; the row stays for the other.
        store.ledger_remove(&again).unwrap();
        assert_eq!(counts(&store)[0].1, 1);
        store.ledger_remove(&first).unwrap();
        assert_eq!(counts(&store), [("avatar".into(), 1, 60, 60)], "a row that counted only it goes");
        // Past the window (measured from the row's first disclosure): a new row.
        let a = store.ledger_add(&row("openid", "login", 200, true)).unwrap();
        let b = store.ledger_add(&row("openid", "login", 299, true)).unwrap();
        let c = store.ledger_add(&row("openid", "login", 300, true)).unwrap();
        assert_eq!((a == b, b == c), (true, false));
    }

    /// Repeats within a second of a row's last written count are counted in memory: every read
    /// sees them, the file has them within the slack, and a process that dies loses only those.
    #[test]
    fn repeats_are_written_within_the_slack_and_every_read_sees_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.db");
        let in_file = |id: u64| -> (u64, u64) {
            let conn = Connection::open(&path).unwrap();
            conn.query_row("SELECT count, coalesce(last_at_ms, at_ms) FROM ledger WHERE id = ?1", [id as i64], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
            })
            .unwrap()
        };
        let store = Store::open(Some(&path), false).unwrap();
        store.coalesce_ledger(3_600_000);
        let id = store.ledger_add(&row("openid", "login", 1_000, true)).unwrap();
        for at in [1_100, 1_500, 1_999] {
            assert_eq!(store.ledger_add(&row("openid", "login", at, true)).unwrap(), id);
        }
        assert_eq!(in_file(id), (1, 1_000), "the repeats within the slack are not written yet");
        assert_eq!(store.ledger_add(&row("openid", "login", 2_000, true)).unwrap(), id);
        assert_eq!(in_file(id), (5, 2_000), "a second after the last write: written");
        assert_eq!(store.ledger_add(&row("openid", "login", 2_100, true)).unwrap(), id);
        let read = store.ledger(None, None, 0).unwrap();
        assert_eq!((read[0].count, read[0].last_at_ms), (6, 2_100), "a read sees every disclosure");
        assert_eq!(in_file(id), (6, 2_100), "and writes them first");
        // The sweep's prune writes them too, and a store that closes.
        store.ledger_add(&row("openid", "login", 2_200, true)).unwrap();
        assert_eq!(store.ledger_prune(0, 10).unwrap(), 0);
        assert_eq!(in_file(id), (7, 2_200));
        store.ledger_add(&row("openid", "login", 2_300, true)).unwrap();
        store.write_ledger_counts().unwrap();
        assert_eq!(in_file(id), (8, 2_300));
        // A store opened afresh (after a crash, say) finds the row and adds to it.
        drop(store);
        let store = Store::open(Some(&path), false).unwrap();
        store.coalesce_ledger(3_600_000);
        assert_eq!(store.ledger_add(&row("openid", "login", 2_400, true)).unwrap(), id);
        assert_eq!(in_file(id), (9, 2_400), "a row looked up is written at once");
    }

    /// A code's rows that fail to be written leave every count as it was, those kept in memory too.
    #[test]
    fn a_failed_codes_rows_leave_the_counts_in_memory_as_they_were() {
        let store = Store::open(None, false).unwrap();
        store.coalesce_ledger(3_600_000);
        let id = store.ledger_add(&row("openid", "login", 10, true)).unwrap();
        store
            .conn()
            .execute_batch(
                "CREATE TRIGGER fail BEFORE INSERT ON ledger WHEN NEW.what = 'unionid'
                 BEGIN SELECT RAISE(ABORT, 'no'); END;",
            )
            .unwrap();
        assert!(store.ledger_add_all(&[row("openid", "login", 20, true), row("unionid", "login", 20, true)]).is_err());
        let rows = store.ledger(None, None, 0).unwrap();
        assert_eq!(
            rows.iter().map(|r| (r.id, r.count)).collect::<Vec<_>>(),
            [(id, 1)],
            "the failed code counted nothing"
        );
        store.conn().execute_batch("DROP TRIGGER fail").unwrap();
        let ids = store.ledger_add_all(&[row("openid", "login", 30, true), row("unionid", "login", 30, true)]).unwrap();
        assert_eq!(ids[0], id);
        let rows = store.ledger(None, None, 0).unwrap();
        assert_eq!(rows.iter().map(|r| r.count).collect::<Vec<_>>(), [2, 1]);
    }

    /// A hostile mix of disclosures (more kinds than are kept) counts every one of them.
    #[test]
    fn more_kinds_than_are_kept_are_all_counted() {
        let store = Store::open(None, false).unwrap();
        store.coalesce_ledger(3_600_000);
        let kinds: Vec<String> = (0..MAX_RECENT_ROWS + 16).map(|i| format!("w{i}")).collect();
        for round in 0..3u64 {
            for what in &kinds {
                store.ledger_add(&row(what, "login", 10 + round, false)).unwrap();
            }
        }
        assert!(store.recent.lock().unwrap().rows.len() <= MAX_RECENT_ROWS);
        let rows = store.ledger(None, None, 0).unwrap();
        assert_eq!(rows.len(), kinds.len());
        assert!(rows.iter().all(|r| r.count == 3), "{:?}", rows.iter().map(|r| r.count).collect::<Vec<_>>());
    }

    #[test]
    fn a_ledger_of_before_counts_gets_its_counts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "CREATE TABLE ledger (
                    id INTEGER PRIMARY KEY, app_id TEXT NOT NULL, uid TEXT NOT NULL, what TEXT NOT NULL,
                    surface TEXT NOT NULL, api TEXT NOT NULL, at_ms INTEGER NOT NULL, via_code INTEGER NOT NULL,
                    redeemed_at_ms INTEGER, redeemed_via TEXT);
                 CREATE INDEX ledger_at ON ledger (at_ms);
                 INSERT INTO ledger VALUES (1, 'a', 'u', 'openid', 'renderer_api', 'login', 10, 1, 12, 'exchange');
                 INSERT INTO ledger VALUES (2, 'a', 'u', 'avatar', 'renderer_api', 'chooseAvatar', 11, 0, NULL, NULL);",
            )
            .unwrap();
        }
        let store = Store::open(Some(&path), false).unwrap();
        let rows: Vec<_> = store
            .ledger(None, None, 0)
            .unwrap()
            .into_iter()
            .map(|r| (r.id, r.count, r.last_at_ms, r.redeemed_count))
            .collect();
        assert_eq!(rows, [(1, 1, 10, 1), (2, 1, 11, 0)]);
    }

    #[test]
    fn a_store_at_its_size_bound_refuses_writes_as_unwritable_and_keeps_reading() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(Some(&dir.path().join("broker.db")), false).unwrap();
        let bound = store.limit_size(crate::config::MIN_STORE_BYTES).unwrap();
        assert!(bound <= crate::config::MIN_STORE_BYTES, "{bound}");
        let mut added = 0u64;
        let refused = loop {
            let what = format!("w{added}");
            match store.ledger_add(&row(&what, "login", 1, false)) {
                Ok(_) => added += 1,
                Err(e) => break e,
            }
            assert!(added < 100_000, "never full");
        };
        assert!(refused.is_unwritable(), "{refused}");
        assert_eq!(refused.unwritable_reason(), "database or disk is full");
        assert_eq!(store.ledger(None, None, 0).unwrap().len() as u64, added, "reads go on");
        assert_eq!(store.ledger_prune(2, 1_000).unwrap(), 1_000, "deleting needs no room");
        assert!(store.ledger_add(&row("again", "login", 3, false)).is_ok(), "room again");
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
