//! The command line: `serve`, `migrate`, `superapp add`, `superapp public-key`, `register-app`. These names and flags are
//! what operators script against (docs/platform.md).

use std::{net::SocketAddr, path::PathBuf};

use clap::{Args, Parser, Subcommand};

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
        }
    }
}
