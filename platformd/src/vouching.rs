//! Which superapp server vouches for an app's users in the platform service: the one stored with
//! the app's tenant (`superapp add NAME --server-url URL`), called with the tenant's client key and
//! signed with the tenant's own key pair. The key pair is kept in the database, so every instance
//! signs with the same key; `superapp public-key NAME` prints its public half for the superapp to
//! install (docs/superapp-server.md).
//!
//! A tenant's server URL and key never change once stored, so each tenant's client is made once
//! per instance and kept; an app registered while the platform runs is looked up at its first
//! vouched step, so no login of it ever skips the server.

use std::{sync::Arc, time::Duration};

use dashmap::DashMap;
use miniapp_platform::{
    StoreError,
    superapp::{ClientSettings, Directory, PlatformKey, SuperappClient},
};
use tracing::info;

use crate::tenants::{TenantError, TenantStore, Tenants};

/// The largest answer read from a superapp server.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// Calls to one superapp server in flight at once, per instance; one more fails at once.
pub const MAX_IN_FLIGHT: usize = 64;
/// Most tenants' clients kept (a map past it starts over; the database has the truth).
const MAX_CLIENTS: usize = 10_000;

/// Why a tenant's signing key could not be had.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("no superapp named {0}")]
    NoSuperapp(String),
    #[error(transparent)]
    Tenant(#[from] TenantError),
    #[error(transparent)]
    Key(#[from] miniapp_platform::superapp::signing::KeyError),
}

/// The superapp's key pair, made and stored when it has none. The first instance to store one
/// wins; the others read it.
pub async fn signing_key(store: &dyn TenantStore, superapp: &str) -> Result<PlatformKey, KeyError> {
    // Most calls find a key: offer none first, so that a key is generated only when needed.
    if let Some(pem) = store.signing_key(superapp, None).await? {
        return Ok(PlatformKey::from_private_key_pem(superapp, &pem)?);
    }
    if store.superapp_server(superapp).await?.is_none() {
        return Err(KeyError::NoSuperapp(superapp.to_owned()));
    }
    let fresh = tokio::task::spawn_blocking(PlatformKey::generate)
        .await
        .map_err(|e| miniapp_platform::superapp::signing::KeyError::Generate(e.to_string()))??;
    let pem = store
        .signing_key(superapp, Some(&fresh.private_key_pem()?))
        .await?
        .ok_or_else(|| KeyError::NoSuperapp(superapp.to_owned()))?;
    Ok(PlatformKey::from_private_key_pem(superapp, &pem)?)
}

/// The tenants' superapp servers, as the platform's [`Directory`]. See the module docs.
pub struct TenantServers {
    tenants: Arc<Tenants>,
    timeout: Duration,
    /// Each tenant's client (`None`: the tenant has no server), by tenant name.
    clients: DashMap<String, Option<Arc<SuperappClient>>>,
}

impl TenantServers {
    pub fn new(tenants: Arc<Tenants>, timeout: Duration) -> TenantServers {
        TenantServers { tenants, timeout, clients: DashMap::new() }
    }

    async fn client_of(&self, superapp: &str) -> Result<Option<Arc<SuperappClient>>, StoreError> {
        if let Some(client) = self.clients.get(superapp) {
            return Ok(client.clone());
        }
        let store = self.tenants.store();
        let client = match store.superapp_server(superapp).await.map_err(store_error)? {
            Some((Some(server_url), client_key)) => {
                let key = signing_key(store.as_ref(), superapp).await.map_err(|e| match e {
                    KeyError::Tenant(e) => store_error(e),
                    other => StoreError::Other(other.to_string()),
                })?;
                let settings = ClientSettings {
                    server_url: server_url.clone(),
                    client_key,
                    timeout: self.timeout,
                    max_answer_bytes: MAX_ANSWER_BYTES,
                    max_in_flight: MAX_IN_FLIGHT,
                };
                let client = SuperappClient::new(&settings, Arc::new(key))
                    .map_err(|e| StoreError::Other(format!("superapp {superapp}: {e}")))?
                    .for_namespace(superapp);
                info!(superapp, server_url = %server_url, "a superapp server vouches for this superapp's users");
                Some(Arc::new(client))
            }
            _ => None,
        };
        if self.clients.len() >= MAX_CLIENTS {
            self.clients.clear();
        }
        self.clients.insert(superapp.to_owned(), client.clone());
        Ok(client)
    }
}

fn store_error(e: TenantError) -> StoreError {
    if e.is_unavailable() { StoreError::Unavailable(e.to_string()) } else { StoreError::Other(e.to_string()) }
}

#[async_trait::async_trait]
impl Directory for TenantServers {
    async fn server_for(&self, app_id: &str) -> Result<Option<Arc<SuperappClient>>, StoreError> {
        match self.tenants.owner(app_id).await.map_err(store_error)? {
            Some(superapp) => self.client_of(&superapp).await,
            None => Ok(None),
        }
    }
}
