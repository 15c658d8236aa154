//! The daemon's settings: a TOML file (every key documented in `miniapp-brokerd.example.toml`),
//! overridden by command-line flags. Every field has a default, so an empty file is a valid config.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use crate::version::ApiVersion;

/// The least `store.max_bytes` takes: the schema and a few pages of rows.
pub const MIN_STORE_BYTES: u64 = 256 * 1024;

/// Everything `serve` needs to know.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where to listen. Unix: a socket path (default `$XDG_RUNTIME_DIR/miniapp-broker/brokerd.sock`);
    /// Windows: a pipe name (default `miniapp-brokerd`).
    pub socket: Option<PathBuf>,
    /// Where the database and the host token live (default: `$XDG_DATA_HOME/miniapp-broker`).
    pub data_dir: Option<PathBuf>,
    /// Keep everything in memory; nothing is written to disk except the host token file.
    pub ephemeral: bool,
    /// The version an app instance gets when neither its app.json nor the host chooses one.
    pub default_api_version: ApiVersion,
    pub host: HostConfig,
    pub limits: LimitsConfig,
    pub sessions: SessionConfig,
    pub store: StoreConfig,
    pub log: LogConfig,
    pub consent: ConsentConfig,
    pub privacy: PrivacyConfig,
    pub payments: PaymentsConfig,
    pub backend_http: BackendHttpConfig,
    pub superapp: SuperappConfig,
    pub platform: PlatformConfig,
    /// Per-app settings, keyed by app id.
    pub apps: BTreeMap<String, AppConfig>,
}

/// How users' decisions about scopes are kept.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ConsentConfig {
    /// A scope the user refused fails at once ("<api>:fail auth deny") without asking the host,
    /// until the decision changes (openSetting, the host, the CLI). Off: the host is asked again.
    pub remember_refusals: bool,
}

/// What the daemon keeps about disclosures of users' data.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PrivacyConfig {
    /// Ledger rows older than this many days are deleted by the daemon's sweep.
    pub ledger_days: u32,
    /// A disclosure identical to one recorded less than this many seconds earlier (same app,
    /// user, what, surface and API) adds to that row's count instead of adding a row (0: never).
    pub ledger_coalesce_secs: u64,
}

/// How long payment outcomes are kept.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PaymentsConfig {
    /// A payment's recorded outcome (what a retry with its idempotency key gets) is kept this
    /// many days after it was recorded, then deleted by the daemon's sweep.
    pub retention_days: u32,
}

impl Default for PaymentsConfig {
    fn default() -> Self {
        PaymentsConfig { retention_days: 30 }
    }
}

impl Default for ConsentConfig {
    fn default() -> Self {
        ConsentConfig { remember_refusals: true }
    }
}

impl Default for PrivacyConfig {
    fn default() -> Self {
        PrivacyConfig { ledger_days: 365, ledger_coalesce_secs: 3600 }
    }
}

/// How the daemon treats its host.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HostConfig {
    /// How long a delegate call may take before the renderer gets a timeout.
    pub call_timeout_ms: u64,
    /// How long a call that arrives while no host is connected waits for one (0: fail at once).
    pub grace_ms: u64,
    /// How long a connected host has to send Hello.
    pub hello_timeout_ms: u64,
    /// A host that leaves the daemon's messages unread this long is disconnected, so its calls
    /// fail at once and another host can connect.
    pub stall_timeout_ms: u64,
    /// How many messages may wait for the host to read them; a call beyond that fails at once
    /// with "host is not keeping up".
    pub queue_messages: u32,
    /// Where the host token file lives (default: `<data_dir>/host.token`).
    pub token_file: Option<PathBuf>,
}

/// Protection against a misbehaving app or a flood of connections.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest gRPC message, decoded or encoded, in bytes.
    pub max_message_bytes: usize,
    /// Calls one app instance may have in flight at once.
    pub max_calls_in_flight_per_instance: u32,
    /// Calls in flight at once over all apps. One app may hold at most half of what the other apps
    /// leave of it (docs/reliability.md, "A share of what is left").
    pub max_calls_in_flight: u32,
    /// Sustained calls per second per app id (all its instances together).
    pub calls_per_second_per_app: u32,
    /// Burst above the sustained rate.
    pub burst_per_app: u32,
    /// Renderer streams (`OpenApi.Session`) open at once, over all apps.
    pub max_renderer_streams: u32,
    /// Renderer streams open at once for one app id (all its instances), so one app cannot take
    /// all of `max_renderer_streams`.
    pub max_renderer_streams_per_app: u32,
    /// Renderer streams open at once for one app instance.
    pub max_renderer_streams_per_instance: u32,
    /// HTTP/2 streams (requests of any service) open at once on one connection; the peer's next
    /// stream is refused (RST_STREAM REFUSED_STREAM) until one ends.
    pub max_streams_per_connection: u32,
    /// Connections open at once, over everything.
    pub max_connections: u32,
    /// Connections attributed to one app id at once (a connection belongs to the app whose launch
    /// token or secret it first presents; see docs/reliability.md).
    pub max_connections_per_app: u32,
    /// Connections attributed to one app instance at once.
    pub max_connections_per_instance: u32,
    /// A connection that has presented no valid token (launch token, host token, app secret)
    /// this long after it was accepted is closed.
    pub auth_timeout_ms: u64,
    /// An app instance whose host has disconnected, with no renderer stream open and no call in
    /// flight, is closed after this many seconds.
    pub orphan_idle_secs: u64,
    /// Exchange attempts (gRPC `Exchange` and the backend HTTP API together) per minute per app.
    pub exchanges_per_minute_per_app: u32,
    /// Burst of exchange attempts above that rate.
    pub exchange_burst_per_app: u32,
    /// Wrong secrets per minute, every app and unknown app id together (they never draw on an
    /// app's own bucket); past them a wrong secret hears 45011, the right one is still taken.
    pub failed_exchanges_per_minute: u32,
    /// Burst of wrong secrets above that rate.
    pub failed_exchange_burst: u32,
    /// Sustained calls per second of one API by one user in one app, for the calls that may add to
    /// the store (every default implementation, payments, and a delegated API whose answer is
    /// recorded in the ledger), as WeChat limits one user's wx.login, checkSession and
    /// getUserProfile each.
    pub calls_per_second_per_user: u32,
    /// Burst of one user's such calls of one API in one app above that rate.
    pub burst_per_user: u32,
}

/// The embedded platform's session rules.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SessionConfig {
    /// How long a login session lives (checkSession fails after it).
    pub lifetime_secs: u64,
    /// How long a one-time code may wait to be exchanged (the design fixes 5 minutes).
    pub code_ttl_secs: u64,
    /// Outstanding one-time codes per (app, user); issuing one more drops the oldest.
    pub max_codes_per_user: u32,
    /// A login keeps the session's key while the key is younger than this, as WeChat keeps it
    /// across repeated `wx.login` calls in a short time; an older key is replaced. 0: every login
    /// makes a new key.
    pub key_refresh_secs: u64,
}

/// The embedded database.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// `"normal"`: durable across a daemon crash (WAL, the default). `"full"`: also across power loss.
    pub synchronous: String,
    /// The most the database file may grow to, in bytes (its write-ahead log is truncated to
    /// 16 MiB after each checkpoint). A call that must write beyond it fails "storage
    /// unavailable" (errno 1022); reads go on.
    pub max_bytes: u64,
}

/// Log output.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// An env-filter directive, overridden by `RUST_LOG`.
    pub filter: String,
    /// `"text"` or `"json"`.
    pub format: String,
}

/// The backend HTTP API: WeChat's and TCMPP's server-side paths for app backends, served from the
/// embedded platform. Off unless `listen` is set.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BackendHttpConfig {
    /// `IP:PORT` to listen on (port 0 picks a free port); unset: no listener.
    pub listen: Option<String>,
    /// Accept a non-loopback `listen` address (plain HTTP: put a TLS proxy in front).
    pub allow_remote: bool,
    /// Connections open at once; more wait in the kernel's backlog.
    pub max_connections: u32,
    /// A connection on which no request starts and none is answered for this long is closed,
    /// however many bytes it trickles in (a body dripped after a complete head).
    pub idle_timeout_ms: u64,
    /// A request head must be complete this long after the connection waits for it (opened, or
    /// its last answer given); else the connection is closed.
    pub header_timeout_ms: u64,
    /// An answer the client does not take within this long closes the connection (a client that
    /// pipelines requests and never reads).
    pub write_timeout_ms: u64,
}

impl Default for BackendHttpConfig {
    fn default() -> Self {
        BackendHttpConfig {
            listen: None,
            allow_remote: false,
            max_connections: 256,
            idle_timeout_ms: 30_000,
            header_timeout_ms: 10_000,
            write_timeout_ms: 10_000,
        }
    }
}

impl BackendHttpConfig {
    /// The address to bind, if the listener is on; refuses a non-loopback one unless allowed.
    pub fn address(&self) -> Result<Option<std::net::SocketAddr>, String> {
        let in_range = |ms: u64| (1..=86_400_000).contains(&ms);
        if self.max_connections == 0
            || !in_range(self.idle_timeout_ms)
            || !in_range(self.header_timeout_ms)
            || !in_range(self.write_timeout_ms)
        {
            return Err("backend_http.max_connections must be above 0, idle_timeout_ms, header_timeout_ms and \
                        write_timeout_ms 1..=86400000"
                .into());
        }
        let Some(listen) = &self.listen else { return Ok(None) };
        let addr: std::net::SocketAddr = listen
            .parse()
            .map_err(|_| format!("backend_http.listen must be IP:PORT (such as 127.0.0.1:8088), not {listen:?}"))?;
        if !addr.ip().is_loopback() && !self.allow_remote {
            return Err(format!(
                "backend_http.listen {addr} is not a loopback address; set backend_http.allow_remote = true \
                 to serve other machines (and put TLS in front)"
            ));
        }
        Ok(Some(addr))
    }
}

/// The remote platform (`miniapp-platformd`, docs/platform.md): with `url` set, every v2/v3 default
/// (login, checkSession, phone and e-mail codes, sessions, user changes, revocations) goes to it,
/// and the daemon's own backend HTTP API and `Exchange` service are off (backends redeem at the
/// platform). Unset: the embedded platform, as on one machine.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PlatformConfig {
    /// `http(s)://HOST:PORT` of the platform's daemon listener (`serve --daemon-listen`).
    pub url: Option<String>,
    /// The superapp's client key (`miniapp-platformd superapp add`).
    pub client_key: Option<String>,
    /// The file holding the superapp's client secret (its first line).
    pub client_secret_file: Option<PathBuf>,
    /// PEM of the CA that signed the platform's certificate (https; default: the system's roots).
    pub ca_file: Option<PathBuf>,
    /// The longest one platform call may take when the renderer's own deadline is not shorter.
    pub timeout_ms: u64,
}

impl Default for PlatformConfig {
    fn default() -> Self {
        PlatformConfig { url: None, client_key: None, client_secret_file: None, ca_file: None, timeout_ms: 3_000 }
    }
}

impl PlatformConfig {
    fn validate(&self) -> Result<(), String> {
        if !(1..=60_000).contains(&self.timeout_ms) {
            return Err("platform.timeout_ms must be 1..=60000".into());
        }
        if let Some(url) = &self.url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(format!("platform.url must be http(s)://HOST:PORT, not {url:?}"));
            }
            if self.client_key.as_deref().is_none_or(str::is_empty) || self.client_secret_file.is_none() {
                return Err("platform.url needs platform.client_key and platform.client_secret_file".into());
            }
        }
        Ok(())
    }
}

/// The superapp's server, which vouches for the user (docs/superapp-server.md): v3 authCodes are
/// redeemed there, users checked there, and phone, e-mail, avatar and nickname fetched from there.
/// Off while `server_url` is empty: the host's pushed profile serves, as on one machine.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SuperappConfig {
    /// `http://host:port` or `https://host[:port]` of the superapp's server (a path prefix is
    /// kept; https with the system's roots, `SSL_CERT_FILE` names another bundle); empty: none.
    pub server_url: String,
    /// `X-CLIENT-KEY`: the key the superapp gave this platform.
    pub client_key: String,
    /// The deadline of one call to the server, connect to last byte.
    pub timeout_ms: u64,
    /// The largest answer read from the server; a larger one is a failure.
    pub max_answer_bytes: u32,
    /// Calls to the server in flight at once; one more fails at once ("system busy").
    pub max_in_flight: u32,
    /// The platform's RSA key pair, made at first start (default `<data_dir>/platform.key`).
    pub key_file: Option<PathBuf>,
}

impl Default for SuperappConfig {
    fn default() -> Self {
        SuperappConfig {
            server_url: String::new(),
            client_key: String::new(),
            timeout_ms: 3_000,
            max_answer_bytes: 64 * 1024,
            max_in_flight: 64,
            key_file: None,
        }
    }
}

impl SuperappConfig {
    /// Whether a superapp server is configured.
    pub fn enabled(&self) -> bool {
        !self.server_url.is_empty()
    }

    fn validate(&self) -> Result<(), String> {
        if !(1..=60_000).contains(&self.timeout_ms)
            || !(1024..=16 * 1024 * 1024).contains(&self.max_answer_bytes)
            || self.max_in_flight == 0
        {
            return Err("superapp.timeout_ms must be 1..=60000, max_answer_bytes 1024..=16777216, \
                        max_in_flight above 0"
                .into());
        }
        if self.enabled() {
            if !(self.server_url.starts_with("http://") || self.server_url.starts_with("https://")) {
                return Err(format!(
                    "superapp.server_url must be an http:// or https:// URL, not {:?}",
                    self.server_url
                ));
            }
            if self.client_key.is_empty() {
                return Err("superapp.client_key is required with superapp.server_url".into());
            }
        }
        Ok(())
    }

    /// Where the platform's key pair lives for a daemon whose data dir is `data_dir`.
    pub fn key_path(&self, data_dir: &std::path::Path) -> PathBuf {
        self.key_file.clone().unwrap_or_else(|| data_dir.join("platform.key"))
    }

    /// The client's settings, when a server is configured.
    pub fn client_settings(&self) -> Option<crate::superapp::ClientSettings> {
        self.enabled().then(|| crate::superapp::ClientSettings {
            server_url: self.server_url.clone(),
            client_key: self.client_key.clone(),
            timeout: Duration::from_millis(self.timeout_ms),
            max_answer_bytes: self.max_answer_bytes as usize,
            max_in_flight: self.max_in_flight as usize,
        })
    }
}

/// One app's settings.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AppConfig {
    /// Apps in the same union group get the same `unionid` for a user.
    pub union_group: Option<String>,
    /// The backend secret for Exchange, provisioned from config (else `Admin.RegisterApp`).
    pub secret: Option<String>,
}

/// The platform's per-user directory for `kind` ("data" or "config"), with `miniapp-broker` below
/// it: `$XDG_DATA_HOME` / `$XDG_CONFIG_HOME` (or their `~/.local/share`, `~/.config` defaults) on
/// Unix; `%LOCALAPPDATA%` / `%APPDATA%` on Windows.
fn user_dir(xdg_var: &str, home_default: &str, windows_var: &str) -> Option<PathBuf> {
    let base = if cfg!(windows) {
        std::env::var_os(windows_var).map(PathBuf::from)
    } else {
        std::env::var_os(xdg_var)
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(home_default)))
    };
    base.map(|b| b.join("miniapp-broker"))
}

/// Where the database and the host token live by default: `$XDG_DATA_HOME/miniapp-broker`. `None`
/// when the environment names no per-user directory: the daemon then refuses to start rather than
/// put its secrets in a shared directory such as `/tmp`.
pub fn default_data_dir() -> Option<PathBuf> {
    user_dir("XDG_DATA_HOME", ".local/share", "LOCALAPPDATA")
}

/// Where `serve` and the operator commands look for a config file when none is named:
/// `$XDG_CONFIG_HOME/miniapp-broker/config.toml`.
pub fn default_config_path() -> Option<PathBuf> {
    user_dir("XDG_CONFIG_HOME", ".config", "APPDATA").map(|d| d.join("config.toml"))
}

impl Default for Config {
    fn default() -> Self {
        Config {
            socket: None,
            data_dir: None,
            ephemeral: false,
            default_api_version: ApiVersion::V2,
            host: HostConfig::default(),
            limits: LimitsConfig::default(),
            sessions: SessionConfig::default(),
            store: StoreConfig::default(),
            log: LogConfig::default(),
            consent: ConsentConfig::default(),
            privacy: PrivacyConfig::default(),
            payments: PaymentsConfig::default(),
            backend_http: BackendHttpConfig::default(),
            superapp: SuperappConfig::default(),
            platform: PlatformConfig::default(),
            apps: BTreeMap::new(),
        }
    }
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            call_timeout_ms: 30_000,
            grace_ms: 0,
            hello_timeout_ms: 5_000,
            stall_timeout_ms: 10_000,
            queue_messages: 4096,
            token_file: None,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_message_bytes: 64 * 1024,
            max_calls_in_flight_per_instance: 64,
            max_calls_in_flight: 4_096,
            calls_per_second_per_app: 2_000,
            burst_per_app: 4_000,
            max_renderer_streams: 10_000,
            max_renderer_streams_per_app: 1_000,
            max_renderer_streams_per_instance: 100,
            max_streams_per_connection: 100,
            max_connections: 10_240,
            max_connections_per_app: 1_000,
            max_connections_per_instance: 100,
            auth_timeout_ms: 10_000,
            orphan_idle_secs: 600,
            exchanges_per_minute_per_app: 600,
            exchange_burst_per_app: 100,
            failed_exchanges_per_minute: 600,
            failed_exchange_burst: 100,
            calls_per_second_per_user: 4,
            burst_per_user: 10,
        }
    }
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            lifetime_secs: 7 * 24 * 3600,
            code_ttl_secs: 300,
            max_codes_per_user: 100,
            key_refresh_secs: 300,
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig { synchronous: "normal".into(), max_bytes: 1 << 30 }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { filter: "info".into(), format: "text".into() }
    }
}

impl Config {
    /// Reads a TOML config file.
    pub fn from_toml(text: &str) -> Result<Config, String> {
        let config: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what serde cannot: ranges and enumerations.
    pub fn validate(&self) -> Result<(), String> {
        if !matches!(self.store.synchronous.as_str(), "normal" | "full") {
            return Err(format!("store.synchronous must be \"normal\" or \"full\", not {:?}", self.store.synchronous));
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return Err(format!("log.format must be \"text\" or \"json\", not {:?}", self.log.format));
        }
        if self.host.call_timeout_ms == 0 || self.host.stall_timeout_ms == 0 || self.host.queue_messages == 0 {
            return Err("host.call_timeout_ms, host.stall_timeout_ms and host.queue_messages must be above 0".into());
        }
        if self.limits.max_message_bytes < 1024 {
            return Err("limits.max_message_bytes must be at least 1024".into());
        }
        if self.limits.max_calls_in_flight_per_instance == 0
            || self.limits.calls_per_second_per_app == 0
            || self.limits.max_renderer_streams == 0
            || self.limits.max_renderer_streams_per_app == 0
            || self.limits.max_renderer_streams_per_instance == 0
            || self.limits.max_connections == 0
            || self.limits.max_connections_per_app == 0
            || self.limits.max_connections_per_instance == 0
            || self.limits.auth_timeout_ms == 0
            || self.limits.orphan_idle_secs == 0
            || self.limits.exchanges_per_minute_per_app == 0
            || self.limits.exchange_burst_per_app == 0
            || self.limits.failed_exchanges_per_minute == 0
            || self.limits.failed_exchange_burst == 0
            || self.limits.max_calls_in_flight == 0
            || self.limits.max_streams_per_connection == 0
            || self.limits.calls_per_second_per_user == 0
            || self.limits.burst_per_user == 0
        {
            return Err("limits must be above 0".into());
        }
        if self.sessions.code_ttl_secs == 0 || self.sessions.lifetime_secs == 0 || self.sessions.max_codes_per_user == 0
        {
            return Err("sessions.* must be above 0".into());
        }
        // Upper bounds keep the millisecond arithmetic (and the u32 deadline a host sees) exact.
        const TEN_YEARS_SECS: u64 = 10 * 366 * 24 * 3600;
        if self.sessions.lifetime_secs > TEN_YEARS_SECS
            || self.sessions.code_ttl_secs > TEN_YEARS_SECS
            || self.sessions.key_refresh_secs > TEN_YEARS_SECS
        {
            return Err("sessions.* must be at most ten years".into());
        }
        if !(1..=36_600).contains(&self.privacy.ledger_days) {
            return Err("privacy.ledger_days must be between 1 and 36600".into());
        }
        if self.privacy.ledger_coalesce_secs > 86_400 {
            return Err("privacy.ledger_coalesce_secs must be at most one day (86400)".into());
        }
        if !(1..=36_600).contains(&self.payments.retention_days) {
            return Err("payments.retention_days must be between 1 and 36600".into());
        }
        if self.store.max_bytes < MIN_STORE_BYTES {
            return Err(format!("store.max_bytes must be at least {MIN_STORE_BYTES}"));
        }
        if self.limits.orphan_idle_secs > TEN_YEARS_SECS {
            return Err("limits.orphan_idle_secs must be at most ten years".into());
        }
        const DAY_MS: u64 = 24 * 3600 * 1000;
        if self.host.call_timeout_ms > DAY_MS
            || self.host.grace_ms > DAY_MS
            || self.host.hello_timeout_ms > DAY_MS
            || self.host.stall_timeout_ms > DAY_MS
        {
            return Err("host.*_ms must be at most one day (86400000)".into());
        }
        if self.limits.auth_timeout_ms > DAY_MS {
            return Err("limits.auth_timeout_ms must be at most one day (86400000)".into());
        }
        self.backend_http.address()?;
        self.superapp.validate()?;
        self.platform.validate()?;
        if self.platform.url.is_some() && self.backend_http.listen.is_some() {
            return Err("backend_http.listen (--backend-listen) is off with a remote platform (platform.url): \
                        app backends redeem at the platform service's --listen"
                .into());
        }
        Ok(())
    }

    /// A config for tests and the demo: in memory, with the socket in `dir`.
    pub fn ephemeral_in(dir: &std::path::Path) -> Config {
        Config {
            socket: Some(dir.join("brokerd.sock")),
            data_dir: Some(dir.to_path_buf()),
            ephemeral: true,
            ..Config::default()
        }
    }

    pub(crate) fn call_timeout(&self) -> Duration {
        Duration::from_millis(self.host.call_timeout_ms)
    }

    pub(crate) fn stall_timeout(&self) -> Duration {
        Duration::from_millis(self.host.stall_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_example_file_is_a_valid_config_with_the_defaults() {
        let example = include_str!("../../miniapp-brokerd.example.toml");
        let parsed = Config::from_toml(example).unwrap();
        let mut expected = Config::default();
        expected.apps.insert("wxdemo0000000001".into(), AppConfig { union_group: Some("demo".into()), secret: None });
        assert_eq!(parsed, expected, "the example documents the defaults");

        // Every key, optional ones included (commented out), appears in the example.
        let mut all = expected.clone();
        all.socket = Some("/s".into());
        all.data_dir = Some("/d".into());
        all.host.token_file = Some("/t".into());
        all.backend_http.listen = Some("127.0.0.1:0".into());
        all.superapp.key_file = Some("/k".into());
        all.apps.insert("x".into(), AppConfig { union_group: Some("g".into()), secret: Some("s".into()) });
        let toml::Value::Table(table) = toml::Value::try_from(&all).unwrap() else { panic!("a table") };
        let mut keys = Vec::new();
        for (key, value) in &table {
            match value {
                toml::Value::Table(section) if key == "apps" => {
                    section.values().for_each(|app| keys.extend(app.as_table().unwrap().keys().cloned()))
                }
                toml::Value::Table(section) => keys.extend(section.keys().cloned()),
                _ => keys.push(key.clone()),
            }
        }
        for key in keys {
            let documented = example.lines().any(|l| l.trim_start_matches(['#', ' ']).starts_with(&format!("{key} =")));
            assert!(documented, "{key} is missing from miniapp-brokerd.example.toml");
        }
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        assert!(Config::from_toml("sockett = \"/x\"").is_err());
        assert!(Config::from_toml("default_api_version = \"v4\"").is_err());
        assert!(Config::from_toml("[store]\nsynchronous = \"off\"").is_err());
        assert!(Config::from_toml("").is_ok());
        assert!(Config::from_toml("[sessions]\nlifetime_secs = 18446744073709551615").is_err());
        assert!(Config::from_toml("[host]\ncall_timeout_ms = 4294967296000").is_err());
        assert!(Config::from_toml("[privacy]\nledger_days = 0").is_err());
        assert!(Config::from_toml("[privacy]\nledger_coalesce_secs = 86401").is_err());
        assert!(Config::from_toml("[payments]\nretention_days = 0").is_err());
        assert!(Config::from_toml("[store]\nmax_bytes = 4096").is_err());
        assert!(Config::from_toml("[limits]\ncalls_per_second_per_user = 0").is_err());
        assert!(Config::from_toml("[limits]\nburst_per_user = 0").is_err());
        assert!(Config::from_toml("[consent]\nremember_refusal = false").is_err());
        assert!(Config::from_toml("[backend_http]\nlisten = \"127.0.0.1:0\"").is_ok());
        assert!(Config::from_toml("[backend_http]\nlisten = \"[::1]:8088\"").is_ok());
        assert!(Config::from_toml("[backend_http]\nlisten = \"localhost\"").is_err());
        let remote = Config::from_toml("[backend_http]\nlisten = \"0.0.0.0:8088\"").unwrap_err();
        assert!(remote.contains("allow_remote"), "{remote}");
        assert!(Config::from_toml("[backend_http]\nlisten = \"0.0.0.0:8088\"\nallow_remote = true").is_ok());
    }

    fn path() -> impl Strategy<Value = Option<PathBuf>> {
        proptest::option::of("/[a-zA-Z0-9 ._-]{1,20}(/[a-zA-Z0-9 ._-]{1,12}){0,3}".prop_map(PathBuf::from))
    }

    /// Any config `validate` accepts (host times up to a day, session times up to ten years).
    fn any_valid_config() -> impl Strategy<Value = Config> {
        const DAY_MS: u64 = 86_400_000;
        let host = (1u64..=DAY_MS, 0u64..=DAY_MS, 0u64..=DAY_MS, 1u64..=DAY_MS, 1u32.., path()).prop_map(
            |(call_timeout_ms, grace_ms, hello_timeout_ms, stall_timeout_ms, queue_messages, token_file)| HostConfig {
                call_timeout_ms,
                grace_ms,
                hello_timeout_ms,
                stall_timeout_ms,
                queue_messages,
                token_file,
            },
        );
        let limits = (
            (1024usize..1 << 30, 1u32.., 1u32.., any::<u32>()),
            (1u32.., 1u32.., 1u32..),
            (1u32.., 1u32.., 1u32..),
            (1u64..=DAY_MS, 1u64..315_000_000),
            (1u32.., 1u32.., 1u32.., 1u32..),
            (1u32.., 1u32..),
            (1u32.., 1u32..),
        )
            .prop_map(
                |(
                    (max_message_bytes, max_calls_in_flight_per_instance, calls_per_second_per_app, burst_per_app),
                    (max_renderer_streams, max_renderer_streams_per_app, max_renderer_streams_per_instance),
                    (max_connections, max_connections_per_app, max_connections_per_instance),
                    (auth_timeout_ms, orphan_idle_secs),
                    (
                        exchanges_per_minute_per_app,
                        exchange_burst_per_app,
                        failed_exchanges_per_minute,
                        failed_exchange_burst,
                    ),
                    (max_calls_in_flight, max_streams_per_connection),
                    (calls_per_second_per_user, burst_per_user),
                )| {
                    LimitsConfig {
                        max_message_bytes,
                        max_calls_in_flight_per_instance,
                        calls_per_second_per_app,
                        burst_per_app,
                        max_renderer_streams,
                        max_renderer_streams_per_app,
                        max_renderer_streams_per_instance,
                        max_connections,
                        max_connections_per_app,
                        max_connections_per_instance,
                        auth_timeout_ms,
                        orphan_idle_secs,
                        exchanges_per_minute_per_app,
                        exchange_burst_per_app,
                        failed_exchanges_per_minute,
                        failed_exchange_burst,
                        max_calls_in_flight,
                        max_streams_per_connection,
                        calls_per_second_per_user,
                        burst_per_user,
                    }
                },
            );
        let backend_http = (
            proptest::option::of((any::<bool>(), any::<u16>())),
            any::<bool>(),
            1u32..,
            (1u64..=86_400_000, 1u64..=86_400_000, 1u64..=86_400_000),
        )
            .prop_map(
                |(listen, allow_remote, max_connections, (idle_timeout_ms, header_timeout_ms, write_timeout_ms))| {
                    BackendHttpConfig {
                        listen: listen.map(
                            |(v6, port)| {
                                if v6 { format!("[::1]:{port}") } else { format!("127.0.0.1:{port}") }
                            },
                        ),
                        allow_remote,
                        max_connections,
                        idle_timeout_ms,
                        header_timeout_ms,
                        write_timeout_ms,
                    }
                },
            );
        let superapp = (
            proptest::option::of(("[a-z0-9.]{1,12}", 1u16.., "[ -~]{1,16}")),
            1u64..=60_000,
            1024u32..=16 * 1024 * 1024,
            1u32..,
            path(),
        )
            .prop_map(|(server, timeout_ms, max_answer_bytes, max_in_flight, key_file)| {
                let (server_url, client_key) = match server {
                    Some((host, port, key)) => (format!("http://{host}:{port}"), key),
                    None => (String::new(), String::new()),
                };
                SuperappConfig { server_url, client_key, timeout_ms, max_answer_bytes, max_in_flight, key_file }
            });
        let sessions = (1u64..315_000_000, 1u64..315_000_000, 1u32.., 0u64..315_000_000).prop_map(
            |(lifetime_secs, code_ttl_secs, max_codes_per_user, key_refresh_secs)| SessionConfig {
                lifetime_secs,
                code_ttl_secs,
                max_codes_per_user,
                key_refresh_secs,
            },
        );
        let platform =
            (proptest::option::of(("[a-z0-9.]{1,12}", 1u16.., "[ -~]{1,16}", path())), path(), 1u64..=60_000).prop_map(
                |(remote, ca_file, timeout_ms)| {
                    let (url, client_key, client_secret_file) = match remote {
                        Some((host, port, key, file)) => (
                            Some(format!("https://{host}:{port}")),
                            Some(key),
                            Some(file.unwrap_or_else(|| PathBuf::from("/client.secret"))),
                        ),
                        None => (None, None, None),
                    };
                    PlatformConfig { url, client_key, client_secret_file, ca_file, timeout_ms }
                },
            );
        let app = (proptest::option::of(".{0,16}"), proptest::option::of(".{0,16}"))
            .prop_map(|(union_group, secret)| AppConfig { union_group, secret });
        (
            (
                path(),
                path(),
                any::<bool>(),
                prop_oneof![Just(ApiVersion::V1), Just(ApiVersion::V2), Just(ApiVersion::V3)],
            ),
            host,
            limits,
            sessions,
            (prop_oneof![Just("normal"), Just("full")], MIN_STORE_BYTES..),
            (".{0,24}", prop_oneof![Just("text"), Just("json")]),
            prop::collection::btree_map("[a-zA-Z0-9_.-]{1,16}", app, 0..4),
            (any::<bool>(), 1u32..=36_600, 0u64..=86_400, 1u32..=36_600),
            backend_http,
            superapp,
            platform,
        )
            .prop_map(
                |(
                    (socket, data_dir, ephemeral, default_api_version),
                    host,
                    limits,
                    sessions,
                    (synchronous, max_bytes),
                    (filter, format),
                    apps,
                    (remember_refusals, ledger_days, ledger_coalesce_secs, retention_days),
                    backend_http,
                    superapp,
                    platform,
                )| Config {
                    // A remote platform turns the daemon's backend HTTP API off.
                    backend_http: match platform.url {
                        Some(_) => BackendHttpConfig { listen: None, ..backend_http },
                        None => backend_http,
                    },
                    socket,
                    data_dir,
                    ephemeral,
                    default_api_version,
                    host,
                    limits,
                    sessions,
                    store: StoreConfig { synchronous: synchronous.into(), max_bytes },
                    log: LogConfig { filter, format: format.into() },
                    consent: ConsentConfig { remember_refusals },
                    privacy: PrivacyConfig { ledger_days, ledger_coalesce_secs },
                    payments: PaymentsConfig { retention_days },
                    superapp,
                    platform,
                    apps,
                },
            )
    }

    /// A line of config-shaped TOML: a known section and key with a plausible or hostile value.
    fn config_line() -> impl Strategy<Value = (&'static str, &'static str, String)> {
        const KEYS: &[(&str, &str)] = &[
            ("", "socket"),
            ("", "data_dir"),
            ("", "ephemeral"),
            ("", "default_api_version"),
            ("host", "call_timeout_ms"),
            ("host", "grace_ms"),
            ("host", "hello_timeout_ms"),
            ("host", "stall_timeout_ms"),
            ("host", "queue_messages"),
            ("host", "token_file"),
            ("limits", "max_message_bytes"),
            ("limits", "max_calls_in_flight_per_instance"),
            ("limits", "calls_per_second_per_app"),
            ("limits", "burst_per_app"),
            ("limits", "max_renderer_streams"),
            ("limits", "max_connections"),
            ("limits", "max_renderer_streams_per_app"),
            ("limits", "max_renderer_streams_per_instance"),
            ("limits", "max_connections_per_app"),
            ("limits", "max_connections_per_instance"),
            ("limits", "auth_timeout_ms"),
            ("limits", "orphan_idle_secs"),
            ("sessions", "max_codes_per_user"),
            ("limits", "exchanges_per_minute_per_app"),
            ("limits", "exchange_burst_per_app"),
            ("limits", "failed_exchanges_per_minute"),
            ("limits", "failed_exchange_burst"),
            ("limits", "max_calls_in_flight"),
            ("limits", "max_streams_per_connection"),
            ("sessions", "lifetime_secs"),
            ("sessions", "code_ttl_secs"),
            ("sessions", "key_refresh_secs"),
            ("store", "synchronous"),
            ("log", "filter"),
            ("log", "format"),
            ("consent", "remember_refusals"),
            ("privacy", "ledger_days"),
            ("privacy", "ledger_coalesce_secs"),
            ("payments", "retention_days"),
            ("store", "max_bytes"),
            ("limits", "calls_per_second_per_user"),
            ("limits", "burst_per_user"),
            ("backend_http", "listen"),
            ("backend_http", "allow_remote"),
            ("backend_http", "max_connections"),
            ("backend_http", "idle_timeout_ms"),
            ("backend_http", "header_timeout_ms"),
            ("backend_http", "write_timeout_ms"),
            ("superapp", "server_url"),
            ("superapp", "client_key"),
            ("superapp", "timeout_ms"),
            ("superapp", "max_answer_bytes"),
            ("superapp", "max_in_flight"),
            ("superapp", "key_file"),
            ("apps.wxa", "union_group"),
            ("apps.wxa", "secret"),
            ("limits", "max_sockets"),
        ];
        let value = prop_oneof![
            any::<i64>().prop_map(|n| n.to_string()),
            (-3i64..70_000).prop_map(|n| n.to_string()),
            any::<bool>().prop_map(|b| b.to_string()),
            any::<f64>().prop_map(|f| toml::Value::Float(f).to_string()),
            prop_oneof![
                Just("v1"),
                Just("v3"),
                Just("v4"),
                Just("normal"),
                Just("full"),
                Just("off"),
                Just("text"),
                Just("json"),
                Just("127.0.0.1:0"),
                Just("0.0.0.0:8088")
            ]
            .prop_map(|s| format!("\"{s}\"")),
            ".{0,16}".prop_map(|s| toml::Value::String(s).to_string()),
            Just("[1, \"a\"]".to_owned()),
        ];
        (proptest::sample::select(KEYS), value).prop_map(|((section, key), value)| (section, key, value))
    }

    proptest! {
        #[test]
        fn any_text_is_a_config_or_an_error(text in ".{0,200}") {
            let _ = Config::from_toml(&text);
        }

        #[test]
        fn any_valid_config_round_trips_through_toml(config in any_valid_config()) {
            let text = toml::to_string(&config).expect("a config serializes");
            prop_assert_eq!(Config::from_toml(&text), Ok(config));
        }

        #[test]
        fn config_shaped_text_is_refused_cleanly_or_valid(lines in prop::collection::vec(config_line(), 0..12)) {
            let mut sections: BTreeMap<&str, Vec<(&str, String)>> = BTreeMap::new();
            for (section, key, value) in lines {
                sections.entry(section).or_default().push((key, value));
            }
            let mut text = String::new();
            for (section, entries) in sections {
                if !section.is_empty() {
                    text.push_str(&format!("[{section}]\n"));
                }
                for (key, value) in entries {
                    text.push_str(&format!("{key} = {value}\n"));
                }
            }
            // Whatever is accepted is a valid config that survives being written back out.
            if let Ok(config) = Config::from_toml(&text) {
                let again = toml::to_string(&config).expect("an accepted config serializes");
                prop_assert_eq!(Config::from_toml(&again), Ok(config));
            }
        }
    }
}
