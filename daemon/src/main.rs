//! `miniapp-brokerd`: serve (the default), the demo, the dev-host, and the operator's commands
//! (`status`, `apps`, `sessions`, `grants`, `revoke`, `ledger`, `register-app`), which talk to the running
//! daemon's Admin service over its socket with the host token.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    sync::Arc,
};

use clap::{Args, Parser, Subcommand};
use miniapp_broker_client::{
    connect, pages,
    proto::{metadata, v1, v1::admin_client::AdminClient},
};
use miniapp_brokerd::{ApiVersion, Clock, Config, SystemClock, default_config_path, dev_host, dev_sim};
use tonic::{Code, Request, transport::Channel};

/// The daemon's allocator: a call allocates and frees a few dozen small buffers on the daemon's
/// one worker thread, which mimalloc's thread-local free lists serve in fewer instructions than
/// glibc's malloc. Built without transparent huge pages (`no_thp`), so an idle renderer costs the
/// same resident memory as with glibc.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "miniapp-brokerd",
    version,
    about = "The local daemon between a superapp host and its mini app renderers"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve until SIGINT/SIGTERM (the default when no command is given).
    Serve(ServeArgs),
    /// Start a daemon in memory with a demo host and renderer; call every API in v1, v2 and v3.
    Demo,
    /// Whether a host is connected, the apps, versions, calls in flight, uptime.
    Status(AdminArgs),
    /// The running app instances and their resolved versions.
    Apps(AdminArgs),
    /// Login sessions in the store.
    Sessions {
        #[command(flatten)]
        admin: AdminArgs,
        /// Only this app.
        #[arg(long)]
        app: Option<String>,
    },
    /// The v3 scopes users granted apps.
    Grants {
        #[command(flatten)]
        admin: AdminArgs,
        #[arg(long)]
        app: Option<String>,
        #[arg(long)]
        uid: Option<String>,
    },
    /// Revoke decisions (grants and remembered refusals): the next call asks the user again, and
    /// the app's outstanding codes of a revoked scope stop working at once.
    Revoke {
        #[command(flatten)]
        admin: AdminArgs,
        #[arg(long)]
        app: String,
        /// Default: the signed-in user.
        #[arg(long)]
        uid: Option<String>,
        /// Default: every scope.
        #[arg(long)]
        scope: Option<String>,
    },
    /// The disclosure ledger: which app got which of a user's data, through which surface, when.
    Ledger {
        #[command(flatten)]
        admin: AdminArgs,
        /// Only this app.
        #[arg(long)]
        app: Option<String>,
        /// Only this user.
        #[arg(long)]
        uid: Option<String>,
        /// Only rows since TIME: an RFC 3339 time or date (2026-01-31, 2026-01-31T08:00:00Z), or an
        /// age (30m, 24h, 7d).
        #[arg(long, value_parser = parse_since)]
        since: Option<u64>,
    },
    /// Create (or with --rotate, replace) an app's backend secret for the Exchange service.
    RegisterApp {
        #[command(flatten)]
        admin: AdminArgs,
        app_id: String,
        #[arg(long)]
        rotate: bool,
    },
    /// Act as the host: a simulated superapp with a signed-in user, for developing mini apps.
    DevHost(DevHostArgs),
    /// A simulator in the browser: your mini app's page calls `wx.*` through the daemon, and a
    /// panel lets you play the superapp's user (sign-in, scope and payment prompts, versions).
    DevSim(DevSimArgs),
    /// Print the embedded platform's public key (PEM) for the superapp's server to install,
    /// making the key pair first if there is none (docs/superapp-server.md).
    PlatformPublicKey {
        #[arg(long, env = "MINIAPP_BROKERD_CONFIG")]
        config: Option<PathBuf>,
        /// The daemon's data dir (default: the config's, else $XDG_DATA_HOME/miniapp-broker).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
}

/// Flags of `serve`; each overrides the config file.
#[derive(Args, Debug, Default)]
struct ServeArgs {
    /// Config file (default: $XDG_CONFIG_HOME/miniapp-broker/config.toml, if present).
    #[arg(long, env = "MINIAPP_BROKERD_CONFIG")]
    config: Option<PathBuf>,
    /// Socket path (Unix) or pipe name (Windows).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Where the database and the host token live.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Keep sessions, grants and payments in memory only.
    #[arg(long)]
    ephemeral: bool,
    /// v1, v2 or v3: for apps whose app.json and host choose none.
    #[arg(long)]
    default_api_version: Option<ApiVersion>,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
    /// Serve the backend HTTP API (WeChat/TCMPP server paths for app backends) on IP:PORT
    /// (port 0: a free port; a non-loopback address needs `[backend_http] allow_remote`).
    #[arg(long, value_name = "ADDR")]
    backend_listen: Option<String>,
    /// Use the platform service at URL (`http(s)://HOST:PORT`, its `--daemon-listen`) instead of
    /// the embedded platform: `[platform] url`; the client key and secret file come from `[platform]`.
    #[arg(long, value_name = "URL")]
    platform_url: Option<String>,
}

/// How an operator command finds the daemon and its host token.
#[derive(Args, Debug, Clone)]
struct AdminArgs {
    #[arg(long, env = "MINIAPP_BROKERD_CONFIG")]
    config: Option<PathBuf>,
    #[arg(long)]
    socket: Option<PathBuf>,
    /// The host token file (default: <data dir>/host.token).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct DevHostArgs {
    #[command(flatten)]
    admin: AdminArgs,
    /// The dev-host profile (see dev-host.example.toml); default: a built-in user.
    #[arg(long)]
    profile: Option<PathBuf>,
    /// Launch these app ids and print their launch tokens for your renderer.
    #[arg(long = "launch")]
    launch: Vec<String>,
    /// The app.json to launch them with.
    #[arg(long, default_value = "{}")]
    app_json: String,
    /// Also play the superapp's server (docs/superapp-server.md) on IP:PORT, from the profile:
    /// its getAuthCode then issues authCodes this server redeems.
    #[arg(long, value_name = "ADDR")]
    superapp_listen: Option<std::net::SocketAddr>,
    /// The platform's public key (PEM, as `platform-public-key` prints it) that requests to the
    /// superapp server must be signed by (default: the profile's, else the daemon's own key).
    #[arg(long, value_name = "FILE")]
    platform_public_key: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct DevSimArgs {
    /// The running daemon's config file (its socket and data dir); without a daemon there, the
    /// simulator starts one of its own in memory.
    #[arg(long, env = "MINIAPP_BROKERD_CONFIG")]
    config: Option<PathBuf>,
    /// The running daemon's socket (default: the configured one).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// The running daemon's host token file (default: <data dir>/host.token).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// The mini app's directory: its index.html, scripts and assets (default: a built-in sample
    /// app with a button per API).
    #[arg(long, value_name = "DIR")]
    app_dir: Option<PathBuf>,
    /// The app id to launch.
    #[arg(long, value_name = "ID", default_value = dev_sim::DEFAULT_APP_ID)]
    app_id: String,
    /// The app.json to launch with (default: DIR/app.json if there is one, else {}).
    #[arg(long, value_name = "JSON")]
    app_json: Option<String>,
    /// Where the simulator's page is served (a loopback address; port 0: a free port).
    #[arg(long, value_name = "127.0.0.1:PORT", default_value = dev_sim::DEFAULT_LISTEN)]
    listen: String,
    /// The dev-host profile (see dev-host.example.toml; `users` lists the users to switch to).
    #[arg(long, value_name = "FILE")]
    profile: Option<PathBuf>,
    /// The backend HTTP API's address for the simulator's own daemon (when none is running).
    #[arg(long, value_name = "ADDR")]
    backend_listen: Option<String>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("miniapp-brokerd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            None => serve(cli.serve).await,
            Some(Command::Serve(args)) => serve(args).await,
            Some(Command::Demo) => demo().await,
            Some(Command::Status(a)) => status(&a).await,
            Some(Command::Apps(a)) => apps(&a).await,
            Some(Command::Sessions { admin, app }) => sessions(&admin, app).await,
            Some(Command::Grants { admin, app, uid }) => grants(&admin, app, uid).await,
            Some(Command::Revoke { admin, app, uid, scope }) => revoke(&admin, app, uid, scope).await,
            Some(Command::Ledger { admin, app, uid, since }) => ledger(&admin, app, uid, since).await,
            Some(Command::RegisterApp { admin, app_id, rotate }) => register_app(&admin, app_id, rotate).await,
            Some(Command::PlatformPublicKey { config, data_dir }) => platform_public_key(config, data_dir),
            Some(Command::DevHost(args)) => dev_host(args).await,
            Some(Command::DevSim(args)) => dev_sim(args).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("miniapp-brokerd: {e}");
            ExitCode::FAILURE
        }
    }
}

/// One worker thread, unless `TOKIO_WORKER_THREADS` says otherwise. A call costs the daemon a few
/// microseconds, and a mediated call wakes tasks on two connections (renderer and host): with a
/// second worker, tokio hands one of them to it, and each such hand-off is a futex wake-up of a
/// parked thread that costs more than the work it moves (docs/benchmarks.md, issue 13: the unary
/// and Invoke paths were ~0.3x direct slower with two). Store writes run on the worker: with
/// `store.synchronous = "normal"` (the default) only a WAL checkpoint waits for the disk; a
/// deployment with `"full"` may set `TOKIO_WORKER_THREADS=2` so that renderers are served while
/// a write waits.
///
/// The one worker takes from the runtime's shared queue every 4th task instead of at tokio's
/// self-tuned interval: with many busy renderers, the tasks beyond its local queue of 256 wait
/// there, and at 1,024 renderers calling back to back some v2 logins waited 290–380 ms while
/// others took 1 ms; every 4th brings that p99 to 58–73 ms (docs/benchmarks.md, "Fairness under
/// overload"), for ~10 % fewer calls per second at that load and no change below it.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        builder.worker_threads(1).global_queue_interval(4);
    }
    builder.enable_all().build()
}

/// The config file named, else the default one if it exists, else the defaults.
fn load_config(path: Option<&Path>) -> Result<Config, BoxError> {
    let (path, required) = match path {
        Some(p) => (p.to_path_buf(), true),
        None => match default_config_path() {
            Some(p) => (p, false),
            None => return Ok(Config::default()),
        },
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => Config::from_toml(&text).map_err(|e| format!("config {}: {e}", path.display()).into()),
        Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
        Err(e) => Err(format!("config {}: {e}", path.display()).into()),
    }
}

fn init_logs(config: &Config, json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log.filter));
    // Colour only for a person at a terminal: files, pipes and journald get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    if json || config.log.format == "json" {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}

async fn serve(args: ServeArgs) -> Result<ExitCode, BoxError> {
    let mut config = load_config(args.config.as_deref())?;
    if args.socket.is_some() {
        config.socket = args.socket;
    }
    if args.data_dir.is_some() {
        config.data_dir = args.data_dir;
    }
    config.ephemeral |= args.ephemeral;
    if let Some(v) = args.default_api_version {
        config.default_api_version = v;
    }
    if args.backend_listen.is_some() {
        config.backend_http.listen = args.backend_listen;
    }
    if args.platform_url.is_some() {
        config.platform.url = args.platform_url;
    }
    init_logs(&config, args.log_json);
    let server = miniapp_brokerd::start(config).await?;
    eprintln!("miniapp-brokerd: listening on {}; host token in {}", server.address(), server.token_file().display());
    if let Some(address) = server.backend_http_addr() {
        eprintln!("miniapp-brokerd: backend HTTP API at http://{address}");
    }

    // The handlers are installed before readiness is announced: a SIGTERM right after READY=1
    // shuts down cleanly instead of killing the process.
    let signals = signals();
    let stop = server.shutdown_token();
    tokio::spawn(async move {
        signals.await;
        tracing::info!("signal received; shutting down");
        stop.cancel();
    });
    notify_ready();
    server.wait().await;
    Ok(ExitCode::SUCCESS)
}

/// Tells systemd (Type=notify) the socket accepts; a no-op elsewhere.
fn notify_ready() {
    #[cfg(unix)]
    if let Err(e) = sd_notify::notify(true, &[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

async fn wait_for_signal() {
    signals().await
}

/// Installs the SIGTERM/SIGINT (Ctrl-C) handlers now; the future resolves on the first signal.
fn signals() -> impl std::future::Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let handlers = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()));
        async move {
            let (Ok(mut term), Ok(mut int)) = handlers else {
                return std::future::pending().await;
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
    }
    #[cfg(not(unix))]
    {
        let ctrl_c = tokio::signal::ctrl_c();
        async move {
            let _ = ctrl_c.await;
        }
    }
}

async fn demo() -> Result<ExitCode, BoxError> {
    // Logs only when asked for (`RUST_LOG=trace miniapp-brokerd demo`): the demo's own lines are the point.
    if std::env::var_os("RUST_LOG").is_some() {
        init_logs(&Config::default(), false);
    }
    let ok = miniapp_brokerd::demo::run().await?;
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// The socket and host token an operator command uses.
struct Target {
    address: String,
    token_file: PathBuf,
}

fn target(a: &AdminArgs) -> Result<Target, BoxError> {
    let config = load_config(a.config.as_deref())?;
    let address = a
        .socket
        .clone()
        .or(config.socket.clone())
        .map(|p| p.display().to_string())
        .unwrap_or_else(connect::default_address);
    let token_file = match a.token_file.clone().or(config.host.token_file.clone()) {
        Some(file) => file,
        None => config
            .data_dir
            .clone()
            .or_else(miniapp_brokerd::default_data_dir)
            .ok_or("no data directory to find the host token in: set XDG_DATA_HOME or HOME, or pass --token-file")?
            .join("host.token"),
    };
    Ok(Target { address, token_file })
}

fn read_token(t: &Target) -> Result<String, BoxError> {
    std::fs::read_to_string(&t.token_file).map(|s| s.trim().to_owned()).map_err(|e| {
        format!(
            "cannot read the host token {}: {e} (is the daemon's data dir elsewhere? pass --token-file)",
            t.token_file.display()
        )
        .into()
    })
}

async fn admin(t: &Target) -> Result<(AdminClient<Channel>, String), BoxError> {
    // Connect first: with no daemon running there is usually no token file either, and "no daemon"
    // is the message that helps.
    let channel = connect::channel(&t.address).await.map_err(|e| match connect::foreign_server(&e) {
        // Not ours: the host token is never sent to it.
        Some(foreign) => foreign.to_string(),
        None => format!("no daemon is listening at {} (start one with `miniapp-brokerd serve`)", t.address),
    })?;
    // Under socket activation this connection may be what starts the daemon, and the daemon creates
    // the token file as it starts: wait for an answer (health is not token-gated) before reading it.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let request = tonic_health::pb::HealthCheckRequest { service: String::new() };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), health.check(request)).await;
    let token = read_token(t)?;
    Ok((AdminClient::new(channel), token))
}

fn authorized<T>(token: &str, message: T) -> Result<Request<T>, BoxError> {
    let mut r = Request::new(message);
    r.metadata_mut().insert(metadata::AUTHORIZATION, metadata::bearer(token).parse()?);
    Ok(r)
}

/// Every row of an Admin listing: `call` asks for one page at a time (the daemon answers in pages
/// that fit one message), each authorized with the host token.
async fn every_page<R, Fut>(
    t: &Target,
    c: &AdminClient<Channel>,
    token: &str,
    request: R,
    call: impl Fn(AdminClient<Channel>, Request<R>) -> Fut,
) -> Result<Vec<R::Row>, BoxError>
where
    R: pages::Paged,
    Fut: std::future::Future<Output = Result<tonic::Response<R::Page>, tonic::Status>>,
{
    pages::read_all(request, |r| {
        let reply = authorized(token, r).map(|r| call(c.clone(), r));
        async move { Ok(reply?.await.map_err(|e| explain(t, e))?.into_inner()) }
    })
    .await
}

fn explain(t: &Target, s: tonic::Status) -> BoxError {
    match s.code() {
        Code::Unauthenticated => {
            format!("the daemon at {} refused the host token in {}: {}", t.address, t.token_file.display(), s.message())
                .into()
        }
        Code::Unavailable => format!("no daemon is listening at {} ({})", t.address, s.message()).into(),
        _ => format!("{}: {}", s.code(), s.message()).into(),
    }
}

fn print_json(value: serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(&value).unwrap_or_default());
}

fn print_table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_uppercase()).collect());
    if rows.is_empty() {
        println!("(none)");
    }
    for row in rows {
        line(row);
    }
}

fn ago(ms_since_epoch: u64) -> String {
    human(SystemClock.now_ms().saturating_sub(ms_since_epoch))
}

fn human(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86400, s % 86400 / 3600),
    }
}

async fn status(a: &AdminArgs) -> Result<ExitCode, BoxError> {
    let t = target(a)?;
    let (mut c, token) = admin(&t).await?;
    let s = c.status(authorized(&token, v1::StatusRequest {})?).await.map_err(|e| explain(&t, e))?.into_inner();
    let apps =
        c.list_apps(authorized(&token, v1::ListAppsRequest {})?).await.map_err(|e| explain(&t, e))?.into_inner().apps;
    if a.json {
        print_json(serde_json::json!({
            "daemonVersion": s.daemon_version, "uptimeMs": s.uptime_ms, "listenAddress": s.listen_address,
            "store": s.store, "hostConnected": s.host_connected, "hostName": s.host_name, "hostMethods": s.host_methods,
            "userSignedIn": s.user_signed_in, "defaultApiVersion": s.default_api_version, "apps": s.apps,
            "callsInFlight": s.calls_in_flight, "callsTotal": s.calls_total, "rendererStreams": s.renderer_streams,
            "backend_http": (!s.backend_http.is_empty()).then_some(&s.backend_http),
            "instances": apps.iter().map(app_json).collect::<Vec<_>>(),
        }));
        return Ok(ExitCode::SUCCESS);
    }
    let host = if s.host_connected {
        format!("connected ({}), {} delegate methods", s.host_name, s.host_methods.len())
    } else {
        "not connected".into()
    };
    println!("daemon            miniapp-brokerd {} at {}", s.daemon_version, s.listen_address);
    println!("uptime            {}", human(s.uptime_ms));
    println!("store             {}", s.store);
    println!("host              {host}");
    println!("user              {}", if s.user_signed_in { "signed in" } else { "signed out" });
    println!("default version   {}", s.default_api_version);
    println!("calls             {} in flight, {} total", s.calls_in_flight, s.calls_total);
    println!("renderer streams  {}", s.renderer_streams);
    if s.backend_http.is_empty() {
        println!("backend HTTP API  off (serve --backend-listen ADDR)");
    } else {
        println!("backend HTTP API  http://{}", s.backend_http);
    }
    println!();
    print_apps(&apps);
    Ok(ExitCode::SUCCESS)
}

fn app_json(i: &v1::AppInstanceInfo) -> serde_json::Value {
    serde_json::json!({
        "instanceId": i.instance_id, "appId": i.app_id, "apiVersion": i.api_version,
        "versionSource": i.version_source, "callsInFlight": i.calls_in_flight, "launchedAtMs": i.launched_at_ms,
    })
}

fn print_apps(apps: &[v1::AppInstanceInfo]) {
    let rows = apps
        .iter()
        .map(|i| {
            let version = if i.api_version.is_empty() {
                "(unresolved)".to_owned()
            } else {
                format!("{} ({})", i.api_version, i.version_source)
            };
            vec![i.app_id.clone(), i.instance_id.clone(), version, i.calls_in_flight.to_string(), ago(i.launched_at_ms)]
        })
        .collect();
    print_table(&["app", "instance", "version", "in flight", "up"], rows);
}

async fn apps(a: &AdminArgs) -> Result<ExitCode, BoxError> {
    let t = target(a)?;
    let (mut c, token) = admin(&t).await?;
    let apps =
        c.list_apps(authorized(&token, v1::ListAppsRequest {})?).await.map_err(|e| explain(&t, e))?.into_inner().apps;
    if a.json {
        print_json(apps.iter().map(app_json).collect());
    } else {
        print_apps(&apps);
    }
    Ok(ExitCode::SUCCESS)
}

async fn sessions(a: &AdminArgs, app: Option<String>) -> Result<ExitCode, BoxError> {
    let t = target(a)?;
    let (c, token) = admin(&t).await?;
    let request = v1::ListSessionsRequest { app_id: app.unwrap_or_default(), after: String::new() };
    let rows = every_page(&t, &c, &token, request, |mut c, r| async move { c.list_sessions(r).await }).await?;
    if a.json {
        print_json(
            rows.iter()
                .map(|s| serde_json::json!({"appId": s.app_id, "uid": s.uid, "openid": s.openid, "createdAtMs": s.created_at_ms, "expiresAtMs": s.expires_at_ms}))
                .collect(),
        );
    } else {
        let now = SystemClock.now_ms();
        let rows = rows
            .iter()
            .map(|s| {
                vec![
                    s.app_id.clone(),
                    s.uid.clone(),
                    s.openid.clone(),
                    ago(s.created_at_ms),
                    human(s.expires_at_ms.saturating_sub(now)),
                ]
            })
            .collect();
        print_table(&["app", "uid", "openid", "age", "expires in"], rows);
    }
    Ok(ExitCode::SUCCESS)
}

async fn grants(a: &AdminArgs, app: Option<String>, uid: Option<String>) -> Result<ExitCode, BoxError> {
    let t = target(a)?;
    let (c, token) = admin(&t).await?;
    let request = v1::ListGrantsRequest {
        app_id: app.unwrap_or_default(),
        uid: uid.unwrap_or_default(),
        include_refusals: false,
        after: String::new(),
    };
    let rows = every_page(&t, &c, &token, request, |mut c, r| async move { c.list_grants(r).await }).await?;
    if a.json {
        print_json(
            rows.iter()
                .map(|g| serde_json::json!({"appId": g.app_id, "uid": g.uid, "scope": g.scope, "grantedAtMs": g.granted_at_ms}))
                .collect(),
        );
    } else {
        let rows =
            rows.iter().map(|g| vec![g.app_id.clone(), g.uid.clone(), g.scope.clone(), ago(g.granted_at_ms)]).collect();
        print_table(&["app", "uid", "scope", "granted"], rows);
    }
    Ok(ExitCode::SUCCESS)
}

async fn revoke(a: &AdminArgs, app: String, uid: Option<String>, scope: Option<String>) -> Result<ExitCode, BoxError> {
    let t = target(a)?;
    let (mut c, token) = admin(&t).await?;
    let request =
        v1::RevokeGrantsRequest { app_id: app, uid: uid.unwrap_or_default(), scope: scope.unwrap_or_default() };
    let revoked = c.revoke_grants(authorized(&token, request)?).await.map_err(|e| explain(&t, e))?.into_inner().revoked;
    if a.json {
        print_json(serde_json::json!({ "revoked": revoked }));
    } else {
        println!("revoked {revoked} grant(s)");
    }
    Ok(ExitCode::SUCCESS)
}

/// `--since`: an RFC 3339 time or date, or an age before now; as milliseconds since the epoch.
fn parse_since(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let time =
        if text.len() == 10 && text.as_bytes()[4] == b'-' { format!("{text}T00:00:00Z") } else { text.to_owned() };
    if let Ok(at) = humantime::parse_rfc3339_weak(&time) {
        return at
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .map_err(|_| "a time before 1970".to_owned());
    }
    match humantime::parse_duration(text) {
        Ok(age) => Ok(SystemClock.now_ms().saturating_sub(age.as_millis() as u64)),
        Err(_) => Err(format!("{text:?} is neither a time (2026-01-31, 2026-01-31T08:00:00Z) nor an age (7d, 24h)")),
    }
}

/// A time as RFC 3339 (UTC, seconds).
fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms)).to_string()
}

async fn ledger(
    a: &AdminArgs,
    app: Option<String>,
    uid: Option<String>,
    since: Option<u64>,
) -> Result<ExitCode, BoxError> {
    let t = target(a)?;
    let (c, token) = admin(&t).await?;
    let request = v1::ListLedgerRequest {
        app_id: app.unwrap_or_default(),
        uid: uid.unwrap_or_default(),
        since_ms: since.unwrap_or(0),
        after_id: 0,
    };
    let rows = every_page(&t, &c, &token, request, |mut c, r| async move { c.list_ledger(r).await }).await?;
    if a.json {
        print_json(
            rows.iter()
                .map(|d| {
                    serde_json::json!({
                        "id": d.id, "appId": d.app_id, "uid": d.uid, "what": d.what, "surface": d.surface,
                        "api": d.api, "atMs": d.at_ms, "viaCode": d.via_code,
                        "redeemedAtMs": (d.redeemed_at_ms > 0).then_some(d.redeemed_at_ms),
                        "redeemedVia": (!d.redeemed_via.is_empty()).then_some(&d.redeemed_via),
                        "count": d.count, "lastAtMs": d.last_at_ms, "redeemedCount": d.redeemed_count,
                    })
                })
                .collect(),
        );
    } else {
        let rows = rows
            .iter()
            .map(|d| {
                let redeemed = match (d.via_code, d.redeemed_at_ms) {
                    (false, _) => "-".to_owned(),
                    (true, 0) => "not redeemed".to_owned(),
                    (true, at) if d.count > 1 => {
                        format!("{} of {}, first {} via {}", d.redeemed_count, d.count, rfc3339(at), d.redeemed_via)
                    }
                    (true, at) => format!("{} via {}", rfc3339(at), d.redeemed_via),
                };
                let when = match d.count {
                    0 | 1 => rfc3339(d.at_ms),
                    n => format!("{} .. {} ({n}x)", rfc3339(d.at_ms), rfc3339(d.last_at_ms)),
                };
                vec![when, d.app_id.clone(), d.uid.clone(), d.what.clone(), d.surface.clone(), d.api.clone(), redeemed]
            })
            .collect();
        print_table(&["when", "app", "uid", "what", "surface", "api", "code redeemed"], rows);
    }
    Ok(ExitCode::SUCCESS)
}

async fn register_app(a: &AdminArgs, app_id: String, rotate: bool) -> Result<ExitCode, BoxError> {
    let t = target(a)?;
    let (mut c, token) = admin(&t).await?;
    let request = v1::RegisterAppRequest { app_id: app_id.clone(), rotate };
    let r = c.register_app(authorized(&token, request)?).await.map_err(|e| explain(&t, e))?.into_inner();
    if a.json {
        print_json(serde_json::json!({ "appId": app_id, "created": r.created, "secret": r.secret }));
    } else if r.created {
        println!("secret for {app_id} (shown once; give it to the app's backend):\n{}", r.secret);
    } else {
        println!("{app_id} already has a secret; pass --rotate to replace it");
    }
    Ok(ExitCode::SUCCESS)
}

async fn dev_host(args: DevHostArgs) -> Result<ExitCode, BoxError> {
    let t = target(&args.admin)?;
    let profile = match &args.profile {
        Some(p) => read_profile(p)?,
        None => dev_host::DevHostConfig::default(),
    };
    let (mut status_client, token) = admin(&t).await?;
    let printer: dev_host::Printer = Arc::new(|line| println!("{line}"));
    let superapp_stop = tokio_util::sync::CancellationToken::new();
    let _stop_superapp = superapp_stop.clone().drop_guard();
    let superapp = match args.superapp_listen {
        Some(address) => Some(dev_superapp(&args, &profile, address, superapp_stop).await?),
        None => None,
    };
    let builder = dev_host::builder(&t.address, &token, &profile, printer, superapp);
    let stop = wait_for_signal();
    tokio::pin!(stop);
    let mut first = true;
    loop {
        // The first connection must work now; after the daemon restarts, wait for it to come back.
        let connecting = if first {
            builder.clone().connect().await
        } else {
            tokio::select! {
                host = builder.clone().connect_retrying(DEV_HOST_RECONNECT) => host,
                _ = &mut stop => return Ok(ExitCode::SUCCESS),
            }
        };
        let host = connecting.map_err(|e| format!("cannot connect to the daemon at {} as host: {e}", t.address))?;
        println!(
            "dev-host connected to {} as {:?}; user {:?} signed in; payments {}; scopes {}{}",
            t.address,
            profile.name,
            profile.user.uid,
            profile.payments,
            profile.scopes,
            if profile.refuse.is_empty() {
                String::new()
            } else {
                format!(" (refusing {})", profile.refuse.join(", "))
            }
        );
        for app_id in &args.launch {
            let launched = host
                .launch_app(app_id, &args.app_json)
                .await
                .map_err(|s| format!("launch {app_id}: {}", s.message()))?;
            let version = if launched.api_version.is_empty() {
                "asked on first call".to_owned()
            } else {
                format!("{} ({})", launched.api_version, launched.version_source)
            };
            println!("launched {app_id}: instance {} version {version}", launched.instance_id);
            println!("  MINIAPP_LAUNCH_TOKEN={}", launched.launch_token);
        }
        let mut consent = host.consent_changes();
        let consent_printer = tokio::spawn(async move {
            while let Ok(changed) = consent.recv().await {
                println!("{}", dev_host::describe_consent(&changed));
            }
        });
        // Where the app's backend points its WeChat library (the daemon's backend HTTP API).
        match status_client.status(authorized(&token, v1::StatusRequest {})?).await {
            Ok(s) if !s.get_ref().backend_http.is_empty() => {
                println!("app backends: set your WeChat library's base URL to http://{}", s.get_ref().backend_http)
            }
            _ => println!("app backends: the daemon's backend HTTP API is off (serve --backend-listen 127.0.0.1:8088)"),
        }
        println!("answering delegate calls; Ctrl-C to stop");
        tokio::select! {
            _ = &mut stop => {
                host.disconnect();
                return Ok(ExitCode::SUCCESS);
            }
            _ = host.closed() => {
                eprintln!("dev-host: the daemon closed the host link; reconnecting (apps are launched again)");
            }
        }
        consent_printer.abort();
        first = false;
    }
}

/// The platform key pair's file for the daemon `config` (and `--data-dir`) describes.
fn platform_key_path(config: &Config, data_dir: Option<PathBuf>) -> Result<PathBuf, BoxError> {
    let data_dir = data_dir
        .or(config.data_dir.clone())
        .or_else(miniapp_brokerd::default_data_dir)
        .ok_or("no data directory: set XDG_DATA_HOME or HOME, or pass --data-dir")?;
    Ok(config.superapp.key_path(&data_dir))
}

fn platform_public_key(config: Option<PathBuf>, data_dir: Option<PathBuf>) -> Result<ExitCode, BoxError> {
    let config = load_config(config.as_deref())?;
    let path = platform_key_path(&config, data_dir)?;
    let key = miniapp_brokerd::platform_key(&path)?;
    print!("{}", key.public_key_pem());
    Ok(ExitCode::SUCCESS)
}

/// Starts the dev-host's superapp server on `address` until `stop`.
async fn dev_superapp(
    args: &DevHostArgs,
    profile: &dev_host::DevHostConfig,
    address: std::net::SocketAddr,
    stop: tokio_util::sync::CancellationToken,
) -> Result<Arc<miniapp_brokerd::dev_superapp::DevSuperapp>, BoxError> {
    use miniapp_brokerd::superapp::{PlatformKey, PlatformPublicKey};
    let named = args.platform_public_key.clone().or_else(|| {
        (!profile.superapp.platform_public_key.is_empty()).then(|| profile.superapp.platform_public_key.clone().into())
    });
    let (public_key, from) = match named {
        Some(file) => {
            let text =
                std::fs::read_to_string(&file).map_err(|e| format!("platform public key {}: {e}", file.display()))?;
            (PlatformPublicKey::from_pem(&text).map_err(|e| format!("{}: {e}", file.display()))?, file)
        }
        None => {
            let config = load_config(args.admin.config.as_deref())?;
            let path = platform_key_path(&config, None)?;
            let key = PlatformKey::read(&path)?.ok_or_else(|| {
                format!(
                    "no platform key at {} to verify requests with: start the daemon with [superapp] server_url, \
                     or pass --platform-public-key FILE",
                    path.display()
                )
            })?;
            (key.public_key(), path)
        }
    };
    let server = Arc::new(miniapp_brokerd::dev_superapp::DevSuperapp::new(
        profile.superapp_users(),
        &profile.superapp.client_key,
        public_key,
    ));
    let bound = server.clone().spawn(address, stop).await.map_err(|e| format!("superapp server on {address}: {e}"))?;
    println!(
        "superapp server on http://{bound} (client key {:?}; verifying the platform's signature with {}); \
         the daemon's [superapp] server_url = \"http://{bound}\"",
        profile.superapp.client_key,
        from.display()
    );
    Ok(server)
}

/// How long the dev-host waits for a restarting daemon before it gives up.
const DEV_HOST_RECONNECT: std::time::Duration = std::time::Duration::from_secs(60);

fn read_profile(path: &Path) -> Result<dev_host::DevHostConfig, BoxError> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("profile {}: {e}", path.display()))?;
    Ok(dev_host::DevHostConfig::from_toml(&text).map_err(|e| format!("profile {}: {e}", path.display()))?)
}

async fn dev_sim(args: DevSimArgs) -> Result<ExitCode, BoxError> {
    if std::env::var_os("RUST_LOG").is_some() {
        init_logs(&Config::default(), false);
    }
    let profile = match &args.profile {
        Some(p) => read_profile(p)?,
        None => dev_sim::default_profile(),
    };
    let options = dev_sim::DevSimOptions {
        app_dir: args.app_dir.clone(),
        app_id: args.app_id.clone(),
        app_json: args.app_json.clone(),
        listen: args.listen.clone(),
        profile,
    };
    let t = target(&AdminArgs {
        config: args.config.clone(),
        socket: args.socket.clone(),
        token_file: args.token_file.clone(),
        json: false,
    })?;
    // A daemon answering at the socket is used as it is; else the simulator brings its own.
    let running = tokio::time::timeout(std::time::Duration::from_secs(3), connect::channel(&t.address)).await;
    let stop = wait_for_signal();
    if let Ok(Ok(_)) = running {
        if args.backend_listen.is_some() {
            eprintln!("dev-sim: --backend-listen applies to the simulator's own daemon; the running one keeps its own");
        }
        let (mut admin_client, token) = admin(&t).await?;
        let backend = match admin_client.status(authorized(&token, v1::StatusRequest {})?).await {
            Ok(s) if !s.get_ref().backend_http.is_empty() => Some(s.into_inner().backend_http),
            _ => None,
        };
        let daemon = dev_sim::DaemonAt { address: t.address.clone(), token };
        dev_sim::run(options, daemon, backend, stop).await?;
        return Ok(ExitCode::SUCCESS);
    }
    let own = dev_sim::daemon::start_own(args.backend_listen.clone()).await?;
    println!("dev-sim: no daemon at {}; started one in memory", t.address);
    let daemon =
        dev_sim::DaemonAt { address: own.server.address().to_owned(), token: own.server.host_token().to_owned() };
    let backend = own.server.backend_http_addr().map(|a| a.to_string());
    let result = dev_sim::run(options, daemon, backend, stop).await;
    own.stop().await;
    result?;
    Ok(ExitCode::SUCCESS)
}
