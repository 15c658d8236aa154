//! Tenants: superapps, their client credentials, and which superapp each app belongs to.
//!
//! A daemon proves its superapp with the client key and secret on every call ([`Tenants::verify`]:
//! the secret's SHA-256 compared in constant time; neither is ever logged); an app's codes are
//! issued only for the superapp the app was registered to ([`Tenants::owns`]). Both answers are
//! cached per instance: a superapp's credentials and an app's owner never change once written (a
//! leaked key is replaced by adding a new superapp), so a cached answer is never stale, and a
//! daemon call costs no tenant query after the first.

use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use rusqlite::{OptionalExtension, params};

use crate::postgres::{PgError, PgStore};

/// A superapp's client secret is stored as the platform stores every secret: its SHA-256.
pub use miniapp_platform::tokens::hash_secret;
use miniapp_platform::tokens::secrets_equal;

/// Why a tenant operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TenantError {
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
}

impl TenantError {
    /// The database is unreachable or busy (answer "unavailable", not "denied").
    pub fn is_unavailable(&self) -> bool {
        matches!(self, TenantError::Pg(PgError::Unavailable(_)))
    }
}

/// How claiming an app for a superapp went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The app is now (or already was) this superapp's.
    Ours,
    OtherSuperapp,
    NoSuperapp,
}

/// Where tenants are stored.
#[tonic::async_trait]
pub trait TenantStore: Send + Sync + 'static {
    /// Adds a superapp with its credentials and its server's URL (v3; `None`: none yet); false
    /// when the name is taken.
    async fn add_superapp(
        &self,
        name: &str,
        client_key: &str,
        secret_hash: &[u8; 32],
        server_url: Option<&str>,
    ) -> Result<bool, TenantError>;
    async fn superapp_by_key(&self, client_key: &str) -> Result<Option<(String, Vec<u8>)>, TenantError>;
    /// The superapp's server URL (`None`: it has none) and its client key; `None` for no such
    /// superapp.
    async fn superapp_server(&self, name: &str) -> Result<Option<(Option<String>, String)>, TenantError>;
    /// The superapp's signing key (PKCS#8 PEM), `fresh` stored first when it has none yet (`None`:
    /// only read); `None` for no such superapp, or none stored and none offered.
    async fn signing_key(&self, name: &str, fresh: Option<&str>) -> Result<Option<String>, TenantError>;
    async fn claim_app(&self, app_id: &str, superapp: &str) -> Result<Claim, TenantError>;
    async fn app_superapp(&self, app_id: &str) -> Result<Option<String>, TenantError>;
}

/// The tenant store with its per-instance caches. See the module docs.
pub struct Tenants {
    store: Arc<dyn TenantStore>,
    superapps: DashMap<String, (String, Vec<u8>)>,
    owners: DashMap<String, String>,
}

impl std::fmt::Debug for Tenants {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tenants").field("cached_owners", &self.owners.len()).finish_non_exhaustive()
    }
}

/// Most entries each cache holds (a cache past it starts over; the database has the truth).
const MAX_CACHED: usize = 100_000;

impl Tenants {
    pub fn new(store: Arc<dyn TenantStore>) -> Tenants {
        Tenants { store, superapps: DashMap::new(), owners: DashMap::new() }
    }

    pub fn store(&self) -> &Arc<dyn TenantStore> {
        &self.store
    }

    /// The superapp whose client credentials these are, if they are.
    pub async fn verify(&self, client_key: &str, client_secret: &str) -> Result<Option<String>, TenantError> {
        if client_key.is_empty() || client_secret.is_empty() {
            return Ok(None);
        }
        let entry = match self.superapps.get(client_key) {
            Some(e) => e.clone(),
            None => {
                let Some(found) = self.store.superapp_by_key(client_key).await? else {
                    return Ok(None);
                };
                if self.superapps.len() >= MAX_CACHED {
                    self.superapps.clear();
                }
                self.superapps.insert(client_key.to_owned(), found.clone());
                found
            }
        };
        let given = hash_secret(client_secret);
        Ok(secrets_equal(&entry.1, &given).then_some(entry.0))
    }

    /// Whether `app_id` is `superapp`'s.
    pub async fn owns(&self, superapp: &str, app_id: &str) -> Result<bool, TenantError> {
        Ok(self.owner(app_id).await?.is_some_and(|owner| owner == superapp))
    }

    /// The superapp `app_id` is registered to, if any.
    pub async fn owner(&self, app_id: &str) -> Result<Option<String>, TenantError> {
        if let Some(owner) = self.owners.get(app_id) {
            return Ok(Some(owner.clone()));
        }
        let Some(owner) = self.store.app_superapp(app_id).await? else {
            return Ok(None);
        };
        if self.owners.len() >= MAX_CACHED {
            self.owners.clear();
        }
        self.owners.insert(app_id.to_owned(), owner.clone());
        Ok(Some(owner))
    }
}

#[tonic::async_trait]
impl TenantStore for PgStore {
    async fn add_superapp(
        &self,
        name: &str,
        client_key: &str,
        secret_hash: &[u8; 32],
        server_url: Option<&str>,
    ) -> Result<bool, TenantError> {
        Ok(PgStore::add_superapp(self, name, client_key, secret_hash, server_url).await?)
    }

    async fn superapp_by_key(&self, client_key: &str) -> Result<Option<(String, Vec<u8>)>, TenantError> {
        Ok(PgStore::superapp_by_key(self, client_key).await?)
    }

    async fn superapp_server(&self, name: &str) -> Result<Option<(Option<String>, String)>, TenantError> {
        Ok(PgStore::superapp_server(self, name).await?)
    }

    async fn signing_key(&self, name: &str, fresh: Option<&str>) -> Result<Option<String>, TenantError> {
        Ok(PgStore::signing_key(self, name, fresh).await?)
    }

    async fn claim_app(&self, app_id: &str, superapp: &str) -> Result<Claim, TenantError> {
        Ok(PgStore::claim_app(self, app_id, superapp).await?)
    }

    async fn app_superapp(&self, app_id: &str) -> Result<Option<String>, TenantError> {
        Ok(PgStore::app_superapp(self, app_id).await?)
    }
}

/// Tenants in the SQLite file of a single-instance platform.
pub struct SqliteTenants {
    conn: Mutex<rusqlite::Connection>,
}

impl SqliteTenants {
    pub fn open(path: &std::path::Path) -> Result<SqliteTenants, TenantError> {
        let conn = rusqlite::Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(2))?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS superapps (
                 name TEXT PRIMARY KEY, client_key TEXT NOT NULL UNIQUE, secret_hash BLOB NOT NULL,
                 created_at_ms INTEGER NOT NULL, server_url TEXT, signing_key TEXT);
             CREATE TABLE IF NOT EXISTS app_owners (
                 app_id TEXT PRIMARY KEY, superapp TEXT NOT NULL REFERENCES superapps (name));",
        )?;
        // A file from before superapps had a signing key.
        let has_key: bool = conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM pragma_table_info('superapps') WHERE name = 'signing_key')",
            [],
            |r| r.get(0),
        )?;
        if !has_key {
            conn.execute_batch("ALTER TABLE superapps ADD COLUMN signing_key TEXT")?;
        }
        Ok(SqliteTenants { conn: Mutex::new(conn) })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, rusqlite::Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[tonic::async_trait]
impl TenantStore for SqliteTenants {
    async fn add_superapp(
        &self,
        name: &str,
        client_key: &str,
        secret_hash: &[u8; 32],
        server_url: Option<&str>,
    ) -> Result<bool, TenantError> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis();
        let n = self.conn().execute(
            "INSERT OR IGNORE INTO superapps (name, client_key, secret_hash, created_at_ms, server_url)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![name, client_key, &secret_hash[..], now as i64, server_url],
        )?;
        Ok(n == 1)
    }

    async fn superapp_by_key(&self, client_key: &str) -> Result<Option<(String, Vec<u8>)>, TenantError> {
        Ok(self
            .conn()
            .query_row("SELECT name, secret_hash FROM superapps WHERE client_key = ?1", params![client_key], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?)
    }

    async fn superapp_server(&self, name: &str) -> Result<Option<(Option<String>, String)>, TenantError> {
        Ok(self
            .conn()
            .query_row("SELECT server_url, client_key FROM superapps WHERE name = ?1", params![name], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?)
    }

    async fn signing_key(&self, name: &str, fresh: Option<&str>) -> Result<Option<String>, TenantError> {
        let conn = self.conn();
        if let Some(fresh) = fresh {
            conn.execute(
                "UPDATE superapps SET signing_key = ?2 WHERE name = ?1 AND signing_key IS NULL",
                params![name, fresh],
            )?;
        }
        Ok(conn
            .query_row("SELECT signing_key FROM superapps WHERE name = ?1", params![name], |r| r.get(0))
            .optional()?
            .flatten())
    }

    async fn claim_app(&self, app_id: &str, superapp: &str) -> Result<Claim, TenantError> {
        let conn = self.conn();
        let exists: bool =
            conn.query_row("SELECT EXISTS (SELECT 1 FROM superapps WHERE name = ?1)", params![superapp], |r| r.get(0))?;
        if !exists {
            return Ok(Claim::NoSuperapp);
        }
        conn.execute("INSERT OR IGNORE INTO app_owners (app_id, superapp) VALUES (?1, ?2)", params![app_id, superapp])?;
        let owner: String =
            conn.query_row("SELECT superapp FROM app_owners WHERE app_id = ?1", params![app_id], |r| r.get(0))?;
        Ok(if owner == superapp { Claim::Ours } else { Claim::OtherSuperapp })
    }

    async fn app_superapp(&self, app_id: &str) -> Result<Option<String>, TenantError> {
        Ok(self
            .conn()
            .query_row("SELECT superapp FROM app_owners WHERE app_id = ?1", params![app_id], |r| r.get(0))
            .optional()?)
    }
}
