//! miniapp-brokerd: the local daemon between a superapp host and its mini app renderers.
//!
//! A renderer's call flows `services` → `registry` (who is calling) → `version` (v1/v2/v3) →
//! `api/<name>` (default or delegate) → `platform` or `host_link` → back. [`start`] is the
//! embedding API the CLI, the demo and the tests use: it binds the socket, opens the store and
//! serves until [`Server::shutdown`].

pub mod api;
pub mod broker;
pub mod config;
pub mod consent;
pub mod deadline;
pub mod demo;
pub mod dev_host;
pub mod dev_sim;
pub mod dev_superapp;
pub mod error;
pub mod host_link;
pub mod limits;
pub mod page;
pub mod platform;
pub mod registry;
pub mod remote_platform;
pub mod retention;
pub mod services;
pub mod store;
pub use miniapp_platform::superapp;
pub mod tokens;
pub mod transport;
pub mod user;
pub mod version;

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use miniapp_broker_proto::v1::{
    admin_server::AdminServer, exchange_server::ExchangeServer, host_server::HostServer, open_api_server::OpenApiServer,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    broker::{Broker, Stats},
    consent::Consent,
    host_link::HostLink,
    limits::RateLimits,
    platform::{Platform, backend_http},
    registry::AppRegistry,
    store::Store,
    tokens::HostToken,
    user::CurrentUser,
};
/// The platform's clock: the daemon reads time from the same one.
pub use miniapp_platform::clock;

pub use crate::{
    clock::{Clock, ManualClock, SystemClock},
    config::{Config, default_config_path, default_data_dir},
    error::StartError,
    version::ApiVersion,
};

/// How often expired codes and idle rate buckets are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(30);
/// How long a graceful shutdown may take before connections are dropped.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// A running daemon.
#[derive(Debug)]
pub struct Server {
    broker: Arc<Broker>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
    /// The backend HTTP API's task, when its listener is on.
    backend_http: Option<JoinHandle<std::io::Result<()>>>,
    token_file: PathBuf,
    /// The data dir's lock, released when the server is dropped.
    _lock: std::fs::File,
}

impl Server {
    /// The socket path (Unix) or pipe name (Windows) clients connect to.
    pub fn address(&self) -> &str {
        &self.broker.listen_address
    }

    /// The host token, for in-process hosts (the demo, tests). Real hosts read the token file.
    pub fn host_token(&self) -> &str {
        self.broker.host_token.reveal()
    }

    /// The backend HTTP API's bound address (`[backend_http] listen`; port 0 resolved), if it is on.
    pub fn backend_http_addr(&self) -> Option<std::net::SocketAddr> {
        self.broker.backend_http
    }

    /// Where the host token file is.
    pub fn token_file(&self) -> &std::path::Path {
        &self.token_file
    }

    /// The shared state, for tests that inspect it.
    pub fn broker(&self) -> &Arc<Broker> {
        &self.broker
    }

    /// A token that stops the server when cancelled (signal handlers use it).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.broker.shutdown.clone()
    }

    /// Stops accepting, ends every stream with a clear status, fails calls still waiting, and
    /// waits (up to a few seconds) for connections to close.
    pub async fn shutdown(self) {
        self.broker.shutdown.cancel();
        self.wait().await;
    }

    /// Serves until the shutdown token is cancelled, then finishes as [`Server::shutdown`] does.
    pub async fn wait(mut self) {
        // Biased: once shutdown began, the server task ending too is part of the graceful stop,
        // not an unexpected end (either way the stop is logged).
        tokio::select! {
            biased;
            _ = self.broker.shutdown.cancelled() => {}
            result = &mut self.task => {
                if let Ok(Err(e)) = result { warn!(error = %e, "server stopped"); }
                self.write_ledger_counts();
                info!("daemon stopped");
                return;
            }
        }
        if let Some(host) = self.broker.host.current() {
            self.broker.host.retire(&host);
        }
        let backend_http = async {
            if let Some(task) = &mut self.backend_http {
                let _ = task.await;
            }
        };
        match tokio::time::timeout(SHUTDOWN_GRACE, async { tokio::join!(&mut self.task, backend_http) }).await {
            Ok(_) => info!("daemon stopped"),
            Err(_) => {
                warn!("connections still open after the shutdown grace period; dropping them");
                self.task.abort();
                self.backend_http.as_ref().map(JoinHandle::abort);
            }
        }
        self.write_ledger_counts();
    }

    /// The ledger's counts held in memory (a row's repeats within a second) go to the file.
    fn write_ledger_counts(&self) {
        if let Err(e) = self.broker.store.write_ledger_counts() {
            warn!(error = %e, "could not write the ledger's last counts");
        }
    }
}

/// Starts a daemon with the real clock.
pub async fn start(config: Config) -> Result<Server, StartError> {
    start_with_clock(config, Arc::new(SystemClock)).await
}

/// Starts a daemon whose platform reads time from `clock` (tests move it instead of sleeping).
pub async fn start_with_clock(mut config: Config, clock: Arc<dyn Clock>) -> Result<Server, StartError> {
    config.validate().map_err(StartError::Config)?;
    // The backend HTTP API's connections, when it listens, take descriptors too.
    let http_connections = match config.backend_http.listen {
        Some(_) => config.backend_http.max_connections,
        None => 0,
    };
    config.limits.max_connections = fit_open_files(config.limits.max_connections, http_connections);
    let data_dir = config.data_dir.clone().or_else(default_data_dir).ok_or(StartError::NoDataDir)?;
    transport::create_owned_dir(&data_dir, "data directory")?;
    let lock = lock_data_dir(&data_dir)?;
    let token_file = config.host.token_file.clone().unwrap_or_else(|| data_dir.join("host.token"));
    let host_token = HostToken::load_or_create(&token_file)
        .map_err(|source| StartError::DataDir { path: token_file.display().to_string(), source })?;
    let db_path = data_dir.join("broker.db");
    let store =
        Arc::new(Store::open((!config.ephemeral).then_some(db_path.as_path()), config.store.synchronous == "full")?);
    let max_bytes = store.limit_size(config.store.max_bytes)?;
    if max_bytes > config.store.max_bytes {
        warn!(max_bytes, "the database is already larger than store.max_bytes: it may not grow further");
    }
    store.coalesce_ledger(config.privacy.ledger_coalesce_secs * 1000);
    let db_path = (!config.ephemeral).then_some(db_path.as_path());
    let platform: Arc<dyn Platform> = match &config.platform.url {
        Some(url) => Arc::new(remote_platform(&config.platform, url, store.clone(), clock.clone())?),
        None => Arc::new(platform::embedded(&config, db_path, &data_dir, store.clone(), clock.clone()).await?),
    };

    let backend_listener = match config.backend_http.address().map_err(StartError::Config)? {
        Some(address) => Some(
            tokio::net::TcpListener::bind(address)
                .await
                .map_err(|source| StartError::Listen { path: format!("backend_http {address}"), source })?,
        ),
        None => None,
    };

    let listener = match transport::systemd_listener()? {
        Some(listener) => listener,
        None => transport::bind(&config.socket.clone().unwrap_or_else(transport::default_address)).await?,
    };

    let consent = Consent::new(
        store.clone(),
        platform.clone(),
        clock.clone(),
        config.consent.remember_refusals,
        config.privacy.ledger_days,
    );
    let occupancy = limits::Occupancy::new(&config.limits);
    let broker = Arc::new(Broker {
        registry: AppRegistry::new(config.limits.max_calls_in_flight_per_instance, &occupancy),
        host: Arc::new(HostLink::new(
            config.call_timeout(),
            Duration::from_millis(config.host.grace_ms),
            config.stall_timeout(),
        )),
        user: CurrentUser::default(),
        platform: platform.clone(),
        consent,
        store,
        rates: RateLimits::new(&config.limits),
        user_rates: limits::UserRates::new(&config.limits),
        occupancy,
        payments: Default::default(),
        clock,
        host_token,
        stats: Stats::default(),
        started: Instant::now(),
        shutdown: CancellationToken::new(),
        listen_address: listener.address.clone(),
        backend_http: backend_listener.as_ref().and_then(|l| l.local_addr().ok()),
        config,
    });

    tokio::spawn(sweep(broker.clone()));
    let task = tokio::spawn(serve(broker.clone(), listener));
    let backend_http = backend_listener.map(|listener| {
        info!(address = ?broker.backend_http, "backend HTTP API listening");
        let shutdown = broker.shutdown.clone();
        let limits = platform::http_limits(&broker.config.backend_http);
        tokio::spawn(backend_http::serve(listener, broker.platform.clone(), broker.clock.clone(), limits, shutdown))
    });
    info!(
        address = %broker.listen_address,
        token_file = %token_file.display(),
        store = broker.store.location(),
        default_api_version = broker.config.default_api_version.as_str(),
        "miniapp-brokerd listening"
    );
    Ok(Server { broker, task, backend_http, token_file, _lock: lock })
}

/// The remote platform `[platform]` names (remote mode): the client secret read from its file.
fn remote_platform(
    config: &config::PlatformConfig,
    url: &str,
    store: Arc<Store>,
    clock: Arc<dyn Clock>,
) -> Result<remote_platform::RemotePlatform, StartError> {
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|source| StartError::DataDir { path: path.display().to_string(), source })
    };
    let secret_file = config.client_secret_file.as_deref().ok_or_else(|| {
        StartError::Config("platform.url needs platform.client_key and platform.client_secret_file".into())
    })?;
    let secret = String::from_utf8_lossy(&read(secret_file)?).lines().next().unwrap_or("").trim().to_owned();
    if secret.is_empty() {
        return Err(StartError::Config(format!("platform.client_secret_file {} is empty", secret_file.display())));
    }
    let ca_pem = config.ca_file.as_deref().map(read).transpose()?;
    let remote = remote_platform::RemoteConfig {
        url: url.to_owned(),
        client_key: config.client_key.clone().unwrap_or_default(),
        client_secret: secret,
        ca_pem,
        timeout: Duration::from_millis(config.timeout_ms),
    };
    info!(platform = url, "remote platform: backends redeem at the platform service");
    remote_platform::RemotePlatform::new(remote, store, clock).map_err(StartError::Config)
}

/// The platform's key pair for superapp servers at `path` (`[superapp] key_file`), made there at
/// first use; a directory it makes is private. Written atomically, so `platform-public-key` and a
/// starting daemon never make two.
pub fn platform_key(path: &std::path::Path) -> Result<superapp::PlatformKey, StartError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        transport::create_owned_dir(dir, "data directory")?;
    }
    Ok(superapp::PlatformKey::load_or_create(path)?)
}

/// Takes the data dir's exclusive lock (`<data dir>/daemon.lock`), held until the [`Server`] is
/// dropped (or the process dies: the OS releases it), so two daemons never share a database, a
/// host token or a daemon secret.
fn lock_data_dir(data_dir: &std::path::Path) -> Result<std::fs::File, StartError> {
    let path = data_dir.join("daemon.lock");
    let io_err = |source| StartError::DataDir { path: path.display().to_string(), source };
    let mut options = std::fs::OpenOptions::new();
    options.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let file = options.open(&path).map_err(io_err)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StartError::DataDirLocked(data_dir.display().to_string())),
        Err(std::fs::TryLockError::Error(e)) => Err(io_err(e)),
    }
}

async fn serve(broker: Arc<Broker>, listener: transport::Listener) -> Result<(), tonic::transport::Error> {
    let limit = broker.config.limits.max_message_bytes;
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<OpenApiServer<services::open_api::OpenApiService>>().await;
    health_reporter.set_serving::<HostServer<services::host::HostService>>().await;
    health_reporter.set_serving::<ExchangeServer<services::exchange::ExchangeService>>().await;
    health_reporter.set_serving::<AdminServer<services::admin::AdminService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(miniapp_broker_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the embedded descriptor set is valid");

    // The generated server, with the Session stream's buffers sized for idle renderers.
    let open_api = services::open_api::OpenApiRoutes::new(broker.clone(), limit);
    let host = HostServer::new(services::host::HostService::new(broker.clone()))
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit);
    let exchange = ExchangeServer::new(services::exchange::ExchangeService::new(broker.platform.clone()))
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit);
    let admin = AdminServer::new(services::admin::AdminService::new(broker.clone()))
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit);
    // Health checks and reflection hold renderer streams like a Session stream does.
    let budget =
        services::stream_budget::StreamBudget::new(&broker.occupancy, broker.clock.clone(), &broker.config.limits);

    let auth_timeout = Duration::from_millis(broker.config.limits.auth_timeout_ms);
    let incoming = transport::incoming(listener, broker.occupancy.connections.clone(), auth_timeout);
    let shutdown = broker.shutdown.clone();
    tonic::transport::Server::builder()
        // Every service's streams on one connection (hyper's default would be unbounded here):
        // the peer's next stream is refused with REFUSED_STREAM until one ends.
        .max_concurrent_streams(broker.config.limits.max_streams_per_connection)
        .layer(services::gate::GateLayer::new(broker.clone()))
        .add_service(open_api)
        .add_service(host)
        .add_service(exchange)
        .add_service(admin)
        .add_service(budget.wrap(health))
        .add_service(budget.wrap(reflection))
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await
}

/// Sweeps expired codes, idle rate buckets, idle orphaned app instances and rows past their
/// retention (a bounded share a tick: [`retention`]): every 30 s, or a quarter of
/// `limits.orphan_idle_secs` if that is shorter.
async fn sweep(broker: Arc<Broker>) {
    let orphan_idle = Duration::from_secs(broker.config.limits.orphan_idle_secs);
    let mut every = tokio::time::interval((orphan_idle / 4).clamp(Duration::from_millis(50), SWEEP_EVERY));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {
                broker.platform.sweep().await;
                broker.rates.sweep();
                broker.user_rates.sweep();
                retention::prune(&broker).await;
                close_idle_orphans(&broker, orphan_idle);
            }
            _ = broker.shutdown.cancelled() => return,
        }
    }
}

/// Closes the app instances whose host left and that no renderer has used for `idle`
/// (docs/reliability.md, "Memory stays bounded").
fn close_idle_orphans(broker: &Broker, idle: Duration) {
    let now = broker.clock.now_ms();
    for instance in broker.registry.idle_orphans(broker.host.current_id(), now, idle.as_millis() as u64) {
        info!(
            app_id = %instance.app_id,
            instance = %instance.instance_id,
            idle_secs = idle.as_secs(),
            "closing an idle app instance: its host left and no renderer uses it"
        );
        broker.close_app(&instance.instance_id);
    }
}

/// Descriptors the daemon needs besides its connections: the listener, the store's files, the
/// runtime's, standard streams and a margin.
#[cfg(unix)]
const FD_RESERVE: u64 = 64;

/// Raises the open-file soft limit to what `max_connections` needs (one descriptor each, plus the
/// backend HTTP API's `http_connections` and [`FD_RESERVE`]); when the hard limit does not allow
/// it, returns the number of gRPC connections that fit (and says so), so that connections beyond
/// it are refused at once instead of failing to be accepted while the daemon itself runs out of
/// descriptors.
#[cfg(unix)]
fn fit_open_files(max_connections: u32, http_connections: u32) -> u32 {
    let reserve = FD_RESERVE + u64::from(http_connections);
    let needed = u64::from(max_connections) + reserve;
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        warn!(error = %std::io::Error::last_os_error(), "cannot read the open-file limit");
        return max_connections;
    }
    #[allow(clippy::unnecessary_cast)] // rlim_t is u64 on Linux, not everywhere
    let (soft, hard) = (limit.rlim_cur as u64, limit.rlim_max as u64);
    if soft >= needed {
        return max_connections;
    }
    let target = needed.min(hard);
    let raised = libc::rlimit { rlim_cur: target as libc::rlim_t, rlim_max: limit.rlim_max };
    // SAFETY: setrlimit reads the struct it is given.
    let soft = if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 { target } else { soft };
    if soft >= needed {
        info!(open_files = soft, "raised the open-file limit to what limits.max_connections needs");
        return max_connections;
    }
    let fit = soft.saturating_sub(reserve).max(1) as u32;
    warn!(
        "limits.max_connections lowered from {max_connections} to {fit}: the open-file limit is {soft} \
         (raise it with `ulimit -n` or LimitNOFILE= to serve more)"
    );
    fit
}

#[cfg(not(unix))]
fn fit_open_files(max_connections: u32, _http_connections: u32) -> u32 {
    max_connections
}
