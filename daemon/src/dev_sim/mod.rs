//! `miniapp-brokerd dev-sim`: a simulator in the browser. A mini app's page runs in a sandboxed
//! frame with a `wx` object whose calls go through the real daemon, beside a host panel where the
//! developer plays the superapp's user (signs in and out, answers scope, payment and settings
//! prompts, picks the API version) and a live log of every call.
//!
//! The path of one call: the app's script calls `wx.login()` (the Node package's `createWx`,
//! bundled into `bridge.js`) → `postMessage` to the panel, which holds the launch token → a POST
//! to this server (`routes`, behind `guard`) → `calls`: the daemon's JSON bridge with that token,
//! through the Rust client, as a renderer process → the daemon answers by default or delegates to
//! the host, which is the dev-host (`crate::dev_host`) with [`prompts::PanelUser`] answering what
//! a person would → back the same way, logged. Why this bridge and not gRPC-Web: docs/decisions.md.

mod app;
mod assets;
mod calls;
mod changes;
pub mod daemon;
mod error;
mod guard;
mod listener;
mod prompts;
mod routes;
mod sim;

use std::{future::IntoFuture, path::PathBuf, sync::Arc};

use arc_swap::ArcSwap;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::dev_host::{self, DevHostConfig};
pub use error::DevSimError;
pub use guard::{APP_CSP, PANEL_CSP};

/// The app id launched when `--app-id` is not given.
pub const DEFAULT_APP_ID: &str = "wxdemo0000000001";
/// Where the simulator listens when `--listen` is not given.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8089";

/// What `dev-sim` was asked to do.
#[derive(Debug, Clone)]
pub struct DevSimOptions {
    /// The mini app's directory (its `index.html`, scripts and assets); `None`: the sample app.
    pub app_dir: Option<PathBuf>,
    pub app_id: String,
    /// app.json as given on the command line; else the app directory's `app.json`, else `{}`.
    pub app_json: Option<String>,
    pub listen: String,
    pub profile: DevHostConfig,
}

/// The daemon to drive: its socket address and host token.
#[derive(Debug, Clone)]
pub struct DaemonAt {
    pub address: String,
    pub token: String,
}

/// Runs the simulator against the daemon at `daemon` until `stop` resolves.
pub async fn run(
    options: DevSimOptions,
    daemon: DaemonAt,
    backend_http: Option<String>,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), DevSimError> {
    let files = app::AppFiles::new(options.app_dir.as_deref())?;
    let app_json_text = match (&options.app_json, files.app_json_file()) {
        (Some(text), _) => text.clone(),
        (None, Some(file)) => {
            std::fs::read_to_string(&file).map_err(|e| DevSimError::Setup(format!("{}: {e}", file.display())))?
        }
        (None, None) => "{}".into(),
    };
    let base_app_json = app::parse_app_json(&app_json_text)?;
    let listener = listener::LoopbackListener::bind(&options.listen).await?;
    let address = listener.address().map_err(|e| DevSimError::Setup(e.to_string()))?;

    let changes = changes::Changes::new();
    let prompts = prompts::Prompts::new(changes.clone());
    let calls = calls::Calls::new(&daemon.address, changes.clone());
    let current: dev_host::CurrentDevUser = Arc::new(ArcSwap::from_pointee(options.profile.user.clone()));
    let observe: dev_host::Observer = {
        let calls = calls.clone();
        Arc::new(move |app, what| calls.observe(app, what))
    };
    let host = dev_host::builder_with(
        &daemon.address,
        &daemon.token,
        &options.profile,
        current.clone(),
        Arc::new(prompts::PanelUser(prompts.clone())),
        observe,
        None,
    )
    .connect()
    .await
    .map_err(|e| DevSimError::Setup(format!("cannot connect to the daemon at {} as host: {e}", daemon.address)))?;

    // The app's backend needs its secret to redeem codes: made now (shown once), unless it has one.
    let secret = host
        .register_app(&options.app_id, false)
        .await
        .map_err(|s| DevSimError::Daemon(format!("register {}: {}", options.app_id, s.message())))?;
    let mut consent = host.consent_changes();
    let sim = sim::Sim::new(sim::SimParts {
        host,
        app_id: options.app_id.clone(),
        app_description: files.describe(),
        base_app_json,
        users: options.profile.all_users(),
        current,
        prompts,
        calls,
        changes,
        backend_http: backend_http.clone(),
    })
    .await?;

    let launch = sim.launch().await;
    println!("dev-sim: daemon at {}", daemon.address);
    println!(
        "dev-sim: launched {} ({}) instance {} version {}",
        launch.app_id,
        files.describe(),
        launch.instance_id,
        if launch.api_version.is_empty() { "asked on first call".to_owned() } else { launch.api_version.clone() }
    );
    match &backend_http {
        Some(b) => println!("dev-sim: backend HTTP API at http://{b} (your backend's WeChat library base URL)"),
        None => println!("dev-sim: the daemon's backend HTTP API is off (--backend-listen 127.0.0.1:8088)"),
    }
    if secret.created {
        println!("dev-sim: app secret for {} (shown once): {}", options.app_id, secret.secret);
    }
    println!("dev-sim: open http://{address}/ in your browser; Ctrl-C to stop");

    let stopping = CancellationToken::new();
    let tasks = TaskTracker::new();
    tasks.spawn(sim.clone().privacy_reader(stopping.clone()));
    {
        let (sim, stopping) = (sim.clone(), stopping.clone());
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = stopping.cancelled() => return,
                    changed = consent.recv() => match changed {
                        Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => sim.refresh_privacy(),
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    },
                }
            }
        });
    }
    sim.refresh_privacy();
    let router = routes::router(sim.clone(), files, guard::Guard::new(address));
    let served = axum::serve(listener, router).with_graceful_shutdown(stopping.clone().cancelled_owned()).into_future();
    let host_closed = async { sim.host.closed().await };
    tokio::pin!(served);
    let outcome = tokio::select! {
        r = &mut served => r.map_err(|e| DevSimError::Setup(format!("the simulator's server stopped: {e}"))),
        _ = stop => Ok(()),
        _ = host_closed => Err(DevSimError::Setup("the daemon closed the host link".into())),
    };
    stopping.cancel();
    tasks.close();
    // Long polls end at their next change or deadline; do not wait for them past a moment.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), served).await;
    tasks.wait().await;
    outcome
}

/// The profile `dev-sim` uses without `--profile`: the dev-host's user, and a second one to
/// switch to.
pub fn default_profile() -> DevHostConfig {
    let mut p = DevHostConfig { name: "dev-sim".into(), ..DevHostConfig::default() };
    p.users.push(dev_host::DevUser {
        uid: "dev-user-2".into(),
        nick_name: "Second User".into(),
        avatar_url: "https://example.invalid/avatar/dev-user-2.png".into(),
        phone_number: "+86 139 0000 0000".into(),
        email: "dev-user-2@example.invalid".into(),
    });
    p
}
