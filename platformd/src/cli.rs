//! The command line: `serve`, `migrate`, `superapp add`, `superapp public-key`, `register-app`. These names and flags are
//! what operators script against (docs/platform.md).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};
use miniapp_platform::config::HttpLimits;

#[derive(Debug, Parser)]
#[command(name = "miniapp-platformd", version, about = "The miniapp platform as a service")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Where the platform's data is.
#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// `postgres://USER@HOST:PORT/DB` (many instances) or `sqlite://PATH` (one instance); default
    /// a SQLite file `platform.db` in the data dir.
    #[arg(long, env = "MINIAPP_PLATFORM_DATABASE_URL")]
    pub database_url: Option<String>,
    /// The data dir (default: $XDG_DATA_HOME/miniapp-platformd, ~/.local/share/miniapp-platformd).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// The longest one database call may take (waiting for a connection included); past it the
    /// call answers "system busy".
    #[arg(long, default_value_t = 2000)]
    pub database_deadline_ms: u64,
    /// PostgreSQL connections per instance.
    #[arg(long, default_value_t = 16)]
    pub database_pool_size: usize,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serves the backend HTTP API (`--listen`) and the daemon gRPC API (`--daemon-listen`).
    Serve(ServeArgs),
    /// Brings the database schema up to date and exits (serve does this at start too).
    Migrate {
        #[command(flatten)]
        db: DatabaseArgs,
    },
    /// Tenants.
    Superapp {
        #[command(subcommand)]
        command: SuperappCommand,
    },
    /// Registers a mini app to a superapp and prints its backend secret.
    RegisterApp {
        app_id: String,
        /// The superapp the app belongs to (only its daemons may issue the app's codes).
        #[arg(long)]
        superapp: String,
        /// Replace the secret of an app that has one (its access tokens stop working).
        #[arg(long)]
        rotate: bool,
        /// Print one JSON object: {"app_id", "secret"}.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        db: DatabaseArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum SuperappCommand {
    /// Adds a superapp and prints its client key and secret (shipped with its shell).
    Add {
        name: String,
        /// Print one JSON object: {"client_key", "client_secret"}.
        #[arg(long)]
        json: bool,
        /// The superapp's own server (`https://HOST[:PORT]`), which vouches for its users
        /// (docs/superapp-server.md); stored with the tenant, with the key pair the platform signs
        /// its requests to it with.
        #[arg(long, value_name = "URL")]
        server_url: Option<String>,
        #[command(flatten)]
        db: DatabaseArgs,
    },
    /// Prints the public key (PEM) the platform signs its requests to the superapp's server with,
    /// for the superapp to install; makes the key pair if the superapp has none yet.
    PublicKey {
        name: String,
        #[command(flatten)]
        db: DatabaseArgs,
    },
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub db: DatabaseArgs,
    /// The backend HTTP API (WeChat's and TCMPP's paths, /healthz, /readyz).
    #[arg(long, default_value = "127.0.0.1:8440")]
    pub listen: SocketAddr,
    /// The gRPC API daemons use (miniapp.platform.v1).
    #[arg(long, default_value = "127.0.0.1:8441")]
    pub daemon_listen: SocketAddr,
    /// TLS certificate chain (PEM) for both listeners; with --tls-key.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM); with --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Allow plain (non-TLS) listeners on non-loopback addresses (a TLS proxy is in front).
    #[arg(long)]
    pub allow_plain_remote: bool,
    /// A login or value code's lifetime.
    #[arg(long, default_value_t = 300)]
    pub code_ttl_secs: u64,
    /// A session's lifetime.
    #[arg(long, default_value_t = 7 * 24 * 3600)]
    pub session_ttl_secs: u64,
    /// Outstanding codes per (app, user); issuing one more drops the oldest.
    #[arg(long, default_value_t = 100)]
    pub max_codes_per_user: u32,
    /// An app backend's attempts per minute (over every instance).
    #[arg(long, default_value_t = 600)]
    pub exchanges_per_minute_per_app: u32,
    /// Attempts above the per-minute rate an app may make at once.
    #[arg(long, default_value_t = 60)]
    pub exchange_burst_per_app: u32,
    /// The deadline of one call to a superapp's server (`superapp add --server-url`), connect to
    /// last byte.
    #[arg(long, default_value_t = 3000)]
    pub superapp_timeout_ms: u64,
    /// Log as JSON lines.
    #[arg(long)]
    pub log_json: bool,
    #[command(flatten)]
    pub listeners: ListenerArgs,
}

const DAEMON_MAX_CONNECTIONS: usize = 256;
const DAEMON_HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
const DAEMON_MAX_CONNECTION_AGE_MS: u64 = 600_000;
/// Longer than a call may take (30 s).
const DAEMON_CONNECTION_AGE_GRACE_MS: u64 = 35_000;

/// What one peer can make each listener hold, and for how long (docs/reliability.md).
#[derive(Debug, Clone, Args)]
pub struct ListenerArgs {
    /// Backend HTTP connections open at once; more wait in the kernel's backlog until one closes.
    #[arg(long, default_value_t = HttpLimits::default().max_connections, value_parser = at_least_one)]
    pub max_connections: usize,
    /// A backend HTTP request head (and, with TLS, the handshake before it) must be complete within
    /// this of the connection waiting for it; past it the connection is closed.
    #[arg(long, default_value_t = millis(HttpLimits::default().header_timeout), value_parser = positive_ms)]
    pub header_timeout_ms: u64,
    /// A backend HTTP connection on which no request starts and none is answered for this long is
    /// closed.
    #[arg(long, default_value_t = millis(HttpLimits::default().idle_timeout), value_parser = positive_ms)]
    pub idle_timeout_ms: u64,
    /// A backend HTTP answer the peer does not take within this closes its connection.
    #[arg(long, default_value_t = millis(HttpLimits::default().write_timeout), value_parser = positive_ms)]
    pub write_timeout_ms: u64,
    /// Daemon gRPC connections open at once; more wait in the kernel's backlog until one closes.
    #[arg(long, default_value_t = DAEMON_MAX_CONNECTIONS, value_parser = at_least_one)]
    pub daemon_max_connections: usize,
    /// A daemon connection must start its first call (TLS handshake and HTTP/2 preface included)
    /// within this of being accepted; past it the connection is closed.
    #[arg(long, default_value_t = DAEMON_HANDSHAKE_TIMEOUT_MS, value_parser = positive_ms)]
    pub daemon_handshake_timeout_ms: u64,
    /// A daemon connection is asked to close (HTTP/2 GOAWAY) this long after it opened and closed
    /// a grace period later; the daemon reconnects on its next call.
    #[arg(long, default_value_t = DAEMON_MAX_CONNECTION_AGE_MS, value_parser = positive_ms)]
    pub daemon_max_connection_age_ms: u64,
    /// How long a daemon connection past its age has to finish its calls before it is closed
    /// whatever they are doing.
    #[arg(long, default_value_t = DAEMON_CONNECTION_AGE_GRACE_MS, value_parser = positive_ms)]
    pub daemon_connection_age_grace_ms: u64,
}

impl Default for ListenerArgs {
    fn default() -> ListenerArgs {
        let http = HttpLimits::default();
        ListenerArgs {
            max_connections: http.max_connections,
            header_timeout_ms: millis(http.header_timeout),
            idle_timeout_ms: millis(http.idle_timeout),
            write_timeout_ms: millis(http.write_timeout),
            daemon_max_connections: DAEMON_MAX_CONNECTIONS,
            daemon_handshake_timeout_ms: DAEMON_HANDSHAKE_TIMEOUT_MS,
            daemon_max_connection_age_ms: DAEMON_MAX_CONNECTION_AGE_MS,
            daemon_connection_age_grace_ms: DAEMON_CONNECTION_AGE_GRACE_MS,
        }
    }
}

impl ListenerArgs {
    /// The backend HTTP listener's bounds.
    pub fn http(&self) -> HttpLimits {
        HttpLimits {
            max_connections: self.max_connections,
            header_timeout: Duration::from_millis(self.header_timeout_ms),
            idle_timeout: Duration::from_millis(self.idle_timeout_ms),
            write_timeout: Duration::from_millis(self.write_timeout_ms),
        }
    }
}

impl ListenerArgs {
    /// The daemon gRPC listener's bounds.
    pub fn daemon(&self) -> crate::daemon_listener::Limits {
        crate::daemon_listener::Limits {
            max_connections: self.daemon_max_connections,
            handshake_timeout: Duration::from_millis(self.daemon_handshake_timeout_ms),
            max_connection_age: Duration::from_millis(self.daemon_max_connection_age_ms),
            age_grace: Duration::from_millis(self.daemon_connection_age_grace_ms),
        }
    }
}

fn millis(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// A count of at least one.
fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// Milliseconds, at least one and at most a day.
fn positive_ms(s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(ms @ 1..=86_400_000) => Ok(ms),
        Ok(_) => Err("must be between 1 and 86400000 (a day)".into()),
        Err(e) => Err(e.to_string()),
    }
}

impl DatabaseArgs {
    /// The database URL, the default SQLite file when none is given.
    pub fn url(&self) -> Result<String, String> {
        if let Some(url) = &self.database_url {
            return Ok(url.clone());
        }
        let dir = match &self.data_dir {
            Some(dir) => dir.clone(),
            None => default_data_dir().ok_or("no data dir: pass --data-dir or --database-url")?,
        };
        Ok(format!("sqlite://{}", dir.join("platform.db").display()))
    }
}

fn default_data_dir() -> Option<PathBuf> {
    if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(xdg).join("miniapp-platformd"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share/miniapp-platformd"))
}

impl ServeArgs {
    /// The serve defaults over `db`, for the commands that build a platform without serving.
    pub fn for_commands(db: DatabaseArgs) -> ServeArgs {
        ServeArgs {
            db,
            listen: ([127, 0, 0, 1], 8440).into(),
            daemon_listen: ([127, 0, 0, 1], 8441).into(),
            tls_cert: None,
            tls_key: None,
            allow_plain_remote: false,
            code_ttl_secs: 300,
            session_ttl_secs: 7 * 24 * 3600,
            max_codes_per_user: 100,
            exchanges_per_minute_per_app: 600,
            exchange_burst_per_app: 60,
            superapp_timeout_ms: 3000,
            log_json: false,
            listeners: ListenerArgs::default(),
        }
    }
}
