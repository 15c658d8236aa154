//! `miniapp-platformd serve`: opens the database (migrating it), builds the platform crate's
//! platform over it, and serves the backend HTTP API (`--listen`, with `/healthz` and `/readyz`)
//! and the daemon gRPC API (`--daemon-listen`) until SIGINT/SIGTERM.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{Router, extract::State, http::StatusCode, routing};
use miniapp_platform::{
    Platform, backend_http,
    clock::SystemClock,
    config::EmbeddedConfig,
    disclosures::NoLedger,
    embedded::EmbeddedPlatform,
    store::{PlatformStore, sqlite::SqliteStore},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

use crate::{
    cli::{DatabaseArgs, ServeArgs},
    daemon_api::{DaemonApi, RedemptionSource},
    daemon_listener,
    local_redemptions::RecordingStore,
    postgres::{PgOptions, PgStore},
    tenants::{SqliteTenants, TenantStore, Tenants},
    tls,
    vouching::TenantServers,
};

/// How often expired codes, tokens and sessions are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(30);
/// How long a graceful stop may take.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Why the service could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Config(String),
    #[error("database: {0}")]
    Database(String),
    #[error("listen on {0}: {1}")]
    Listen(SocketAddr, std::io::Error),
    #[error("tls: {0}")]
    Tls(String),
}

/// An opened database: the platform store, the tenant store, and the shared engine when it is
/// PostgreSQL.
pub struct Database {
    pub store: Arc<dyn PlatformStore>,
    pub tenants: Arc<dyn TenantStore>,
    /// Where the daemon API's `Redemptions` looks.
    pub redemptions: RedemptionSource,
    /// How to check the database answers (`/readyz`).
    probe: Probe,
}

#[derive(Clone)]
enum Probe {
    Pg(PgStore),
    Sqlite,
}

/// Opens (and migrates) the database `args` names, for a command that serves nothing.
pub async fn open(args: &DatabaseArgs) -> Result<Database, ServeError> {
    open_for(args, EmbeddedConfig::default().code_ttl_secs).await
}

/// Opens (and migrates) the database `args` names, for a platform whose codes live
/// `code_ttl_secs`.
pub async fn open_for(args: &DatabaseArgs, code_ttl_secs: u64) -> Result<Database, ServeError> {
    let url = args.url().map_err(ServeError::Config)?;
    if let Some(path) = url.strip_prefix("sqlite://") {
        let path = std::path::PathBuf::from(path);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| ServeError::Database(format!("{}: {e}", dir.display())))?;
        }
        let store = SqliteStore::open(Some(&path), true).map_err(|e| ServeError::Database(e.to_string()))?;
        let tenants = SqliteTenants::open(&path).map_err(|e| ServeError::Database(e.to_string()))?;
        // Kept as long as a daemon asks about a code: its lifetime and a few sweeps more.
        let keep_ms = (code_ttl_secs + 600) * 1000;
        let store = Arc::new(RecordingStore::new(Arc::new(store), keep_ms));
        return Ok(Database {
            store: store.clone(),
            tenants: Arc::new(tenants),
            redemptions: RedemptionSource::Local(store),
            probe: Probe::Sqlite,
        });
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let options = PgOptions {
            pool_size: args.database_pool_size,
            deadline: Duration::from_millis(args.database_deadline_ms.max(1)),
        };
        let pg = PgStore::connect(&url, &options).map_err(|e| ServeError::Database(e.to_string()))?;
        let ran = pg.migrate().await.map_err(|e| ServeError::Database(e.to_string()))?;
        if ran > 0 {
            info!(steps = ran, "database schema migrated");
        }
        return Ok(Database {
            store: Arc::new(pg.clone()),
            tenants: Arc::new(pg.clone()),
            redemptions: RedemptionSource::Pg(pg.clone()),
            probe: Probe::Pg(pg),
        });
    }
    Err(ServeError::Config("--database-url must be postgres://… or sqlite://PATH".into()))
}

/// The platform over `db` with `args`' settings; each app's users vouched for by its tenant's
/// superapp server, if the tenant has one.
pub async fn platform(
    db: &Database,
    args: &ServeArgs,
    tenants: &Arc<Tenants>,
) -> Result<Arc<EmbeddedPlatform>, ServeError> {
    let config = EmbeddedConfig {
        apps: Default::default(),
        code_ttl_secs: args.code_ttl_secs,
        session_ttl_secs: args.session_ttl_secs,
        max_codes_per_user: args.max_codes_per_user,
        exchanges_per_minute_per_app: args.exchanges_per_minute_per_app,
        exchange_burst_per_app: args.exchange_burst_per_app,
        ..EmbeddedConfig::default()
    };
    let platform = EmbeddedPlatform::new(db.store.clone(), Arc::new(NoLedger), Arc::new(SystemClock), config)
        .await
        .map_err(|e| ServeError::Database(e.to_string()))?;
    let servers = TenantServers::new(tenants.clone(), Duration::from_millis(args.superapp_timeout_ms.max(1)));
    Ok(Arc::new(platform.with_superapps(Arc::new(servers))))
}

/// Refuses a plain listener off loopback unless allowed.
fn check_plain(address: SocketAddr, tls: bool, allow_plain_remote: bool, flag: &str) -> Result<(), ServeError> {
    if !tls && !address.ip().is_loopback() && !allow_plain_remote {
        return Err(ServeError::Config(format!(
            "{flag} {address} is not a loopback address: give --tls-cert/--tls-key, or --allow-plain-remote when a TLS proxy is in front"
        )));
    }
    Ok(())
}

/// A running service (tests start it in process; the CLI runs it until a signal).
pub struct Running {
    pub http_addr: SocketAddr,
    pub daemon_addr: SocketAddr,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl Running {
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops both listeners and the sweeper, waiting (a few seconds at most) for them.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.wait().await;
    }

    /// Serves until the shutdown token is cancelled.
    pub async fn wait(self) {
        self.shutdown.cancelled().await;
        self.tasks.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, self.tasks.wait()).await.is_err() {
            warn!("connections still open after the shutdown grace period; dropping them");
        }
        info!("platform stopped");
    }
}

/// Starts serving.
pub async fn start(args: ServeArgs) -> Result<Running, ServeError> {
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(tls::Identity::load(cert, key).map_err(ServeError::Tls)?),
        _ => None,
    };
    check_plain(args.listen, tls.is_some(), args.allow_plain_remote, "--listen")?;
    check_plain(args.daemon_listen, tls.is_some(), args.allow_plain_remote, "--daemon-listen")?;
    let db = open_for(&args.db, args.code_ttl_secs).await?;
    let location = db.store.location();
    let tenants = Arc::new(Tenants::new(db.tenants.clone()));
    let platform = platform(&db, &args, &tenants).await?;
    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();

    // The backend HTTP API: the crate's routes and accept loop, with the probes beside them.
    let dyn_platform: Arc<dyn Platform> = platform.clone();
    let probes = Router::new()
        .route("/healthz", routing::get(|| async { "ok\n" }))
        .route("/readyz", routing::get(ready))
        .with_state(db.probe.clone());
    let http = tokio::net::TcpListener::bind(args.listen).await.map_err(|e| ServeError::Listen(args.listen, e))?;
    let http_addr = http.local_addr().map_err(|e| ServeError::Listen(args.listen, e))?;
    let api = backend_http::Api::new(dyn_platform.clone(), Arc::new(SystemClock)).with_routes(probes);
    let (stop, limits) = (shutdown.clone(), args.listeners.http());
    match &tls {
        Some(identity) => {
            // Each handshake runs on its connection's own task, within the loop's header deadline.
            let acceptor = identity.acceptor().map_err(ServeError::Tls)?;
            let handshake = move |stream| {
                let acceptor = acceptor.clone();
                async move { acceptor.accept(stream).await }
            };
            tasks.spawn(async move {
                if let Err(e) = backend_http::serve_with(http, api, limits, stop, handshake).await {
                    warn!(error = %e, "backend HTTP API stopped");
                }
            });
        }
        None => {
            let plain = |stream| std::future::ready(Ok(stream));
            tasks.spawn(async move {
                if let Err(e) = backend_http::serve_with(http, api, limits, stop, plain).await {
                    warn!(error = %e, "backend HTTP API stopped");
                }
            });
        }
    }

    // The daemon gRPC API.
    let daemon_listener = tokio::net::TcpListener::bind(args.daemon_listen)
        .await
        .map_err(|e| ServeError::Listen(args.daemon_listen, e))?;
    let daemon_addr = daemon_listener.local_addr().map_err(|e| ServeError::Listen(args.daemon_listen, e))?;
    let api = DaemonApi::new(dyn_platform.clone(), tenants, db.redemptions.clone(), args.code_ttl_secs).into_server();
    let served = daemon_listener::serve(daemon_listener, api, tls.as_ref(), args.listeners.daemon(), shutdown.clone())
        .map_err(|e| ServeError::Tls(e.to_string()))?;
    tasks.spawn(async move {
        if let Err(e) = served.await {
            warn!(error = %e, "daemon gRPC API stopped");
        }
    });

    // The sweeper.
    let stop = shutdown.clone();
    tasks.spawn(async move {
        let mut every = tokio::time::interval(SWEEP_EVERY);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = every.tick() => platform.sweep().await,
            }
        }
    });

    info!(
        listen = %http_addr,
        daemon_listen = %daemon_addr,
        tls = tls.is_some(),
        database = %location,
        "platform serving"
    );
    Ok(Running { http_addr, daemon_addr, shutdown, tasks })
}

/// `/readyz`: 200 when the database answers within its deadline, else 503.
async fn ready(State(probe): State<Probe>) -> (StatusCode, &'static str) {
    let ok = match probe {
        Probe::Pg(pg) => pg.ping().await.is_ok(),
        Probe::Sqlite => true,
    };
    if ok { (StatusCode::OK, "ready\n") } else { (StatusCode::SERVICE_UNAVAILABLE, "database unavailable\n") }
}
