//! The simulator's state: the host connection, the launched app instance, the signed-in user, and
//! what the panel shows (prompts, calls, the consent settings and the disclosure ledger of this
//! app and user). The routes call into it; it calls the daemon through the host client.

use std::{sync::Arc, time::Duration};

use miniapp_broker_client::HostClient;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::{Mutex, Notify};

use super::{app, calls::Calls, changes::Changes, error::DevSimError, prompts::Prompts};
use crate::dev_host::{CurrentDevUser, DevUser};

/// How long a read of the consent settings or the ledger may take.
const PRIVACY_DEADLINE: Duration = Duration::from_secs(5);
/// Ledger rows the panel shows (the newest).
pub const MAX_LEDGER_ROWS: usize = 100;

/// The app instance the simulator launched (a relaunch replaces it).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Launch {
    pub app_id: String,
    pub instance_id: String,
    /// The page's frame holds it; it never reaches the mini app's own scripts.
    pub launch_token: String,
    pub api_version: String,
    pub version_source: String,
    pub app_json: String,
    /// Counts launches: the panel reloads the app's frame when it changes.
    pub generation: u64,
}

/// The consent settings and ledger rows of (app, signed-in user), as last read.
#[derive(Debug, Clone, Default, Serialize)]
struct Privacy {
    settings: Vec<Value>,
    ledger: Vec<Value>,
}

/// Everything the simulator's routes work with.
pub struct Sim {
    pub host: HostClient,
    pub app_id: String,
    pub app_description: String,
    base_app_json: serde_json::Map<String, Value>,
    launch: Mutex<Launch>,
    users: Vec<DevUser>,
    current: CurrentDevUser,
    pub prompts: Arc<Prompts>,
    pub calls: Arc<Calls>,
    privacy: std::sync::Mutex<Privacy>,
    refresh: Notify,
    pub changes: Changes,
    pub backend_http: Option<String>,
}

impl std::fmt::Debug for Sim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sim").field("app_id", &self.app_id).finish_non_exhaustive()
    }
}

/// What [`Sim::new`] takes.
pub struct SimParts {
    pub host: HostClient,
    pub app_id: String,
    pub app_description: String,
    pub base_app_json: serde_json::Map<String, Value>,
    pub users: Vec<DevUser>,
    pub current: CurrentDevUser,
    pub prompts: Arc<Prompts>,
    pub calls: Arc<Calls>,
    pub changes: Changes,
    pub backend_http: Option<String>,
}

impl Sim {
    /// Launches the app (with its app.json as given) and returns the simulator.
    pub async fn new(parts: SimParts) -> Result<Arc<Sim>, DevSimError> {
        let app_json = serde_json::Value::Object(parts.base_app_json.clone()).to_string();
        let launch = launch(&parts.host, &parts.app_id, &app_json, 1).await?;
        Ok(Arc::new(Sim {
            host: parts.host,
            app_id: parts.app_id,
            app_description: parts.app_description,
            base_app_json: parts.base_app_json,
            launch: Mutex::new(launch),
            users: parts.users,
            current: parts.current,
            prompts: parts.prompts,
            calls: parts.calls,
            privacy: std::sync::Mutex::new(Privacy::default()),
            refresh: Notify::new(),
            changes: parts.changes,
            backend_http: parts.backend_http,
        }))
    }

    /// The current launch.
    pub async fn launch(&self) -> Launch {
        self.launch.lock().await.clone()
    }

    /// Closes the app instance and launches it again with `apiVersion` set to `version` ("v1",
    /// "v2", "v3"; empty: app.json's own, else the host's or the daemon's default).
    pub async fn relaunch(&self, version: &str) -> Result<Launch, DevSimError> {
        if !matches!(version, "" | "v1" | "v2" | "v3") {
            return Err(DevSimError::BadRequest(format!("apiVersion must be v1, v2, v3 or empty, not {version:?}")));
        }
        let json = if version.is_empty() {
            Value::Object(self.base_app_json.clone()).to_string()
        } else {
            app::with_version(&self.base_app_json, version)
        };
        let mut current = self.launch.lock().await;
        // The old instance's token stops working and its pending calls fail, as when a superapp
        // closes a mini app; a close that fails (already gone) does not stop the relaunch.
        let _ = self.host.close_app(&current.instance_id).await;
        let next = launch(&self.host, &self.app_id, &json, current.generation + 1).await?;
        *current = next.clone();
        drop(current);
        self.calls.forget_renderers(&next.launch_token);
        self.changes.bump();
        self.refresh.notify_one();
        Ok(next)
    }

    /// The instance and version the simulator knows for `token` (empty when it is not the current
    /// launch's: the daemon then judges the token itself).
    pub async fn instance_of(&self, token: &str) -> (String, String) {
        let l = self.launch.lock().await;
        if l.launch_token == token { (l.instance_id.clone(), l.api_version.clone()) } else { Default::default() }
    }

    /// Learns the version the daemon resolved on the first call, for an app.json without one;
    /// the current launch's version (empty if still unknown).
    pub async fn learn_version(&self) -> String {
        let instance = {
            let l = self.launch.lock().await;
            if !l.api_version.is_empty() {
                return l.api_version.clone();
            }
            l.instance_id.clone()
        };
        let mut admin = self.host.admin();
        let apps = admin.list_apps(self.host.authorize(miniapp_broker_client::proto::v1::ListAppsRequest {}));
        if let Ok(Ok(apps)) = tokio::time::timeout(PRIVACY_DEADLINE, apps).await
            && let Some(i) = apps.into_inner().apps.into_iter().find(|a| a.instance_id == instance)
            && !i.api_version.is_empty()
        {
            let mut l = self.launch.lock().await;
            if l.instance_id == instance {
                l.api_version = i.api_version;
                l.version_source = i.version_source;
                self.changes.bump();
            }
            return l.api_version.clone();
        }
        String::new()
    }

    /// Signs `uid` in (one of the profile's users), or signs out with an empty uid.
    pub async fn switch_user(&self, uid: &str) -> Result<(), DevSimError> {
        let user = if uid.is_empty() {
            DevUser::signed_out()
        } else {
            self.users
                .iter()
                .find(|u| u.uid == uid)
                .cloned()
                .ok_or_else(|| DevSimError::BadRequest(format!("{uid:?} is not a user of the profile")))?
        };
        self.host.set_user(user.signed_in()).await.map_err(|e| DevSimError::Daemon(e.to_string()))?;
        self.current.store(Arc::new(user));
        self.changes.bump();
        self.refresh.notify_one();
        Ok(())
    }

    /// Asks for a fresh read of the consent settings and the ledger.
    pub fn refresh_privacy(&self) {
        self.refresh.notify_one();
    }

    /// Reads the consent settings and the ledger whenever asked, until `stop`.
    pub async fn privacy_reader(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.refresh.notified() => {}
            }
            let uid = self.current.load().uid.clone();
            let read = async {
                let settings = if uid.is_empty() {
                    Vec::new()
                } else {
                    self.host.list_decisions(&self.app_id, &uid, true).await?
                };
                let ledger = if uid.is_empty() { Vec::new() } else { self.host.ledger(&self.app_id, &uid, 0).await? };
                Ok::<_, tonic::Status>((settings, ledger))
            };
            let (settings, ledger) = match tokio::time::timeout(PRIVACY_DEADLINE, read).await {
                Ok(Ok(read)) => read,
                Ok(Err(status)) => {
                    tracing::warn!(code = ?status.code(), "dev-sim: cannot read consent settings or the ledger");
                    continue;
                }
                Err(_) => {
                    tracing::warn!("dev-sim: reading consent settings and the ledger timed out");
                    continue;
                }
            };
            let settings = settings
                .iter()
                .map(|g| json!({ "scope": g.scope, "decision": if g.refused { "refused" } else { "granted" }, "atMs": g.granted_at_ms }))
                .collect();
            let skip = ledger.len().saturating_sub(MAX_LEDGER_ROWS);
            let ledger = ledger
                .iter()
                .skip(skip)
                .map(|d| {
                    json!({
                        "what": d.what, "surface": d.surface, "api": d.api, "atMs": d.at_ms, "viaCode": d.via_code,
                        "redeemedAtMs": d.redeemed_at_ms, "redeemedVia": d.redeemed_via,
                    })
                })
                .collect();
            *self.privacy.lock().unwrap_or_else(|e| e.into_inner()) = Privacy { settings, ledger };
            self.changes.bump();
        }
    }

    /// Everything the panel shows, at change counter `version`.
    pub async fn snapshot(&self, version: u64) -> Value {
        let launch = self.launch().await;
        let user = self.current.load();
        let privacy = self.privacy.lock().unwrap_or_else(|e| e.into_inner()).clone();
        json!({
            "version": version,
            "app": launch,
            "appSource": self.app_description,
            "user": (!user.uid.is_empty()).then(|| json!({ "uid": user.uid, "nickName": user.nick_name })),
            "users": self.users.iter().map(|u| json!({ "uid": u.uid, "nickName": u.nick_name })).collect::<Vec<_>>(),
            "prompts": self.prompts.views(),
            "log": self.calls.log(),
            "settings": privacy.settings,
            "ledger": privacy.ledger,
            "backendHttp": self.backend_http,
        })
    }
}

async fn launch(host: &HostClient, app_id: &str, app_json: &str, generation: u64) -> Result<Launch, DevSimError> {
    let r = host.launch_app(app_id, app_json).await.map_err(|s| DevSimError::Daemon(s.message().to_owned()))?;
    Ok(Launch {
        app_id: app_id.to_owned(),
        instance_id: r.instance_id,
        launch_token: r.launch_token,
        api_version: r.api_version,
        version_source: r.version_source,
        app_json: app_json.to_owned(),
        generation,
    })
}
