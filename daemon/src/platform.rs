//! The daemon's one adapter to the platform crate (`miniapp-platform`): its types under the names
//! the API layer uses, the embedded platform built from the daemon's config, and the disclosure
//! ledger hook through which the platform records its codes in the daemon's ledger.
//!
//! The platform's errors are mapped to the daemon's `ApiError` once, in `error.rs`.

use std::{path::Path, sync::Arc};

pub use miniapp_platform::{
    AccessToken, AuthorizedApp, Credential, Disclosed, ExchangeFailure, Platform, PlatformError, SessionInfo, Surface,
    TokenRequest, ValueKind, access_tokens, backend_http, embedded, superapp::vouch::ProfileField,
};
use miniapp_platform::{
    config::{AppSettings, EmbeddedConfig, HttpLimits},
    disclosures::{CodeDisclosure, Disclosures, LedgerError},
    embedded::EmbeddedPlatform,
    store::sqlite::SqliteStore,
    superapp::SuperappClient,
};

use crate::{
    clock::Clock,
    config::{BackendHttpConfig, Config},
    error::{StartError, StoreError},
    store::{NewLedgerRow, Store},
};

/// The embedded platform's settings from the daemon's config (`[sessions]`, `[limits]`, `[apps]`).
pub fn embedded_config(config: &Config) -> EmbeddedConfig {
    EmbeddedConfig {
        apps: config
            .apps
            .iter()
            .map(|(id, app)| {
                (id.clone(), AppSettings { union_group: app.union_group.clone(), secret: app.secret.clone() })
            })
            .collect(),
        code_ttl_secs: config.sessions.code_ttl_secs,
        session_ttl_secs: config.sessions.lifetime_secs,
        max_codes_per_user: config.sessions.max_codes_per_user,
        key_refresh_secs: config.sessions.key_refresh_secs,
        exchanges_per_minute_per_app: config.limits.exchanges_per_minute_per_app,
        exchange_burst_per_app: config.limits.exchange_burst_per_app,
        failed_exchanges_per_minute: config.limits.failed_exchanges_per_minute,
        failed_exchange_burst: config.limits.failed_exchange_burst,
    }
}

/// The backend HTTP listener's bounds from `[backend_http]`.
pub fn http_limits(config: &BackendHttpConfig) -> HttpLimits {
    HttpLimits {
        max_connections: config.max_connections as usize,
        idle_timeout: std::time::Duration::from_millis(config.idle_timeout_ms),
        header_timeout: std::time::Duration::from_millis(config.header_timeout_ms),
        write_timeout: std::time::Duration::from_millis(config.write_timeout_ms),
    }
}

/// The embedded platform over the daemon's data: its tables in the daemon's database file
/// (`db_path`; `None`: in memory), its codes' ledger rows in the daemon's ledger.
pub async fn embedded(
    config: &Config,
    db_path: Option<&Path>,
    data_dir: &Path,
    store: Arc<Store>,
    clock: Arc<dyn Clock>,
) -> Result<EmbeddedPlatform, StartError> {
    // The daemon alone writes its file's secrets (register-app goes through its admin API) and
    // sessions.
    let engine = SqliteStore::open(db_path, config.store.synchronous == "full")
        .map_err(|e| StartError::Platform(PlatformError::Store(e)))?
        .caching_app_secrets()
        .caching_sessions();
    // The same bound as the daemon's connection to the file: whichever writes, the file stops there.
    engine.limit_size(config.store.max_bytes).map_err(|e| StartError::Platform(PlatformError::Store(e)))?;
    let ledger = Arc::new(LedgerHook(store));
    let platform = EmbeddedPlatform::new(Arc::new(engine), ledger, clock, embedded_config(config)).await?;
    Ok(platform.with_superapp(superapp_client(config, data_dir)?))
}

/// The superapp server's client when `[superapp] server_url` is set, with the platform's key pair
/// (made at first start).
fn superapp_client(config: &Config, data_dir: &Path) -> Result<Option<Arc<SuperappClient>>, StartError> {
    let Some(settings) = config.superapp.client_settings() else { return Ok(None) };
    let key_path = config.superapp.key_path(data_dir);
    let key = Arc::new(crate::platform_key(&key_path)?);
    let client = SuperappClient::new(&settings, key).map_err(|e| StartError::Config(e.to_string()))?;
    tracing::info!(
        server_url = %settings.server_url,
        key_file = %key_path.display(),
        "a superapp server vouches for users"
    );
    Ok(Some(Arc::new(client)))
}

/// The platform's codes in the daemon's disclosure ledger (the ledger's one owner is the daemon's
/// store; consent's ledger reads and prunes it).
struct LedgerHook(Arc<Store>);

impl Disclosures for LedgerHook {
    fn issued(&self, rows: &[CodeDisclosure<'_>]) -> Result<Vec<u64>, LedgerError> {
        let rows: Vec<NewLedgerRow<'_>> = rows
            .iter()
            .map(|r| NewLedgerRow {
                app_id: r.app_id,
                uid: r.uid,
                what: r.what,
                surface: Surface::RendererApi.as_str(),
                api: r.api,
                at_ms: r.at_ms,
                via_code: true,
            })
            .collect();
        self.0.ledger_add_all(&rows).map_err(ledger_error)
    }

    fn withdrawn(&self, ids: &[u64]) {
        if let Err(e) = self.0.ledger_remove(ids) {
            tracing::warn!(error = %e, "could not remove the ledger rows of a code that was not issued");
        }
    }

    fn redeemed(&self, ids: &[u64], surface: Surface, at_ms: u64) -> Result<(), LedgerError> {
        self.0.ledger_redeemed(ids, surface.as_str(), at_ms).map_err(ledger_error)
    }
}

/// The daemon store's failure as the platform's ledger hook reports it.
pub(crate) fn ledger_error(e: StoreError) -> LedgerError {
    if e.is_unwritable() { LedgerError::Unwritable(e.unwritable_reason()) } else { LedgerError::Failed(e.to_string()) }
}
