//! A real PostgreSQL for tests: a throwaway cluster in a temp dir, or the server
//! `MINIAPP_TEST_DATABASE_URL` names.
//!
//! [`shared`] starts one cluster per test binary (initdb takes a second or two; a database is
//! cheap), and [`Postgres::database`] gives each test a database of its own. A test that stops and
//! starts the server makes its own cluster with [`Postgres::start`].
//!
//! PostgreSQL refuses to run as root: when the tests run as root the cluster's files belong to
//! `nobody` and every PostgreSQL process runs as it. The server listens on a free loopback port
//! only, with durability off (the data is thrown away). It runs under a small `sh` watchdog that
//! reads its stdin: when the test binary exits (however it exits: the end of `main`, a panic, a
//! kill), the pipe closes, and the watchdog stops the server and removes the cluster's directory.
//! So no server outlives its tests, though a static is never dropped.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::{
        OnceLock,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

/// The environment variable naming an existing server to use instead of a cluster of our own
/// (`postgres://USER:PASSWORD@HOST:PORT/DB`; the user must be allowed to create databases).
pub const DATABASE_URL_VAR: &str = "MINIAPP_TEST_DATABASE_URL";
/// The environment variable naming the directory of `initdb` and `postgres` (else Debian's
/// `/usr/lib/postgresql/<newest>/bin`, else `pg_config --bindir`, else `$PATH`).
pub const BIN_DIR_VAR: &str = "MINIAPP_TEST_PG_BIN";

/// How long a server may take to accept connections after it was started.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// Stops the server when its stdin ends; removes the cluster unless told `keep` first.
const WATCHDOG: &str = r#"
"$@" </dev/null >>"$PG_LOG" 2>&1 &
pid=$!
read -r cmd
kill -INT "$pid" 2>/dev/null
wait "$pid"
[ "$cmd" = keep ] || rm -rf "$PG_DIR"
"#;

/// A PostgreSQL server the tests may use.
#[derive(Debug)]
pub struct Postgres {
    /// The server's URL up to (not including) the database name, and its query part.
    base: String,
    query: String,
    cluster: Option<Cluster>,
}

/// A cluster of our own: its directory, its port and the watchdog running it.
#[derive(Debug)]
struct Cluster {
    dir: PathBuf,
    port: u16,
    bin: PathBuf,
    owner: Option<(u32, u32)>,
    watchdog: Option<(Child, ChildStdin)>,
    /// Keeps the directory's name reserved; the watchdog removes the directory itself.
    _dir: tempfile::TempDir,
}

static SHARED: OnceLock<Postgres> = OnceLock::new();
static NEXT_DB: AtomicU32 = AtomicU32::new(0);

/// The server of this test binary: the one `MINIAPP_TEST_DATABASE_URL` names, else a cluster
/// started on first use. Panics (failing the test with the reason) when neither can be had: a
/// test that needs PostgreSQL never passes without it.
pub fn shared() -> &'static Postgres {
    SHARED.get_or_init(|| match std::env::var(DATABASE_URL_VAR) {
        Ok(url) if !url.is_empty() => Postgres::external(&url),
        _ => Postgres::start().unwrap_or_else(|e| panic!("cannot start a PostgreSQL cluster for the tests: {e}")),
    })
}

impl Postgres {
    /// The server at `url` (its database part is replaced by each test's).
    pub fn external(url: &str) -> Postgres {
        let (base, query) = split_url(url);
        Postgres { base, query, cluster: None }
    }

    /// A new cluster of our own, initialised and running.
    pub fn start() -> Result<Postgres, String> {
        let bin = bin_dir()?;
        let dir = tempfile::Builder::new().prefix("miniapp-pg").tempdir().map_err(|e| format!("temp dir: {e}"))?;
        let owner = unprivileged_owner()?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).map_err(|e| format!("chown temp dir: {e}"))?;
        }
        let data = dir.path().join("data");
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .args(["-D"])
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-locale", "--no-sync", "--no-instructions"])
            .current_dir(dir.path())
            .stdin(Stdio::null());
        as_owner(&mut initdb, owner);
        let out = initdb.output().map_err(|e| format!("run {}: {e}", bin.join("initdb").display()))?;
        if !out.status.success() {
            return Err(format!(
                "initdb failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let mut cluster = Cluster { dir: dir.path().to_owned(), port: 0, bin, owner, watchdog: None, _dir: dir };
        cluster.run()?;
        let base = format!("postgres://postgres@127.0.0.1:{}", cluster.port);
        Ok(Postgres { base, query: String::new(), cluster: Some(cluster) })
    }

    /// The URL of database `name` on this server.
    pub fn url(&self, name: &str) -> String {
        format!("{}/{name}{}", self.base, self.query)
    }

    /// The server's address, when the cluster is ours (a test may put a proxy in front of it).
    pub fn port(&self) -> Option<u16> {
        self.cluster.as_ref().map(|c| c.port)
    }

    /// A fresh, empty database of its own for one test; returns its URL.
    pub async fn database(&self) -> String {
        let name = format!("t{}_{}_{}", std::process::id(), NEXT_DB.fetch_add(1, Ordering::Relaxed), nonce());
        let admin = self.url("postgres");
        let (client, connection) =
            tokio::time::timeout(Duration::from_secs(20), tokio_postgres::connect(&admin, tokio_postgres::NoTls))
                .await
                .unwrap_or_else(|_| panic!("connecting to the test PostgreSQL timed out"))
                .unwrap_or_else(|e| panic!("cannot connect to the test PostgreSQL: {e}"));
        let task = tokio::spawn(connection);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
        drop(client);
        let _ = task.await;
        self.url(&name)
    }

    /// Stops the server (a fast shutdown: clients are disconnected), keeping its data.
    pub fn stop(&mut self) {
        let cluster = self.cluster.as_mut().expect("only a cluster of our own can be stopped");
        cluster.halt(true);
    }

    /// Starts a stopped server again on the same port and data.
    pub fn restart(&mut self) -> Result<(), String> {
        let cluster = self.cluster.as_mut().expect("only a cluster of our own can be started");
        cluster.run()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(cluster) = &mut self.cluster {
            cluster.halt(false);
        }
    }
}

impl Cluster {
    /// Starts the server under its watchdog and waits until it accepts connections. A first start
    /// picks a free port; should another process take it in between, the next one is tried.
    fn run(&mut self) -> Result<(), String> {
        let fixed = self.port != 0;
        let mut last = String::new();
        for _ in 0..5 {
            let port = if fixed { self.port } else { free_port()? };
            match self.run_on(port) {
                Ok(()) => {
                    self.port = port;
                    return Ok(());
                }
                Err(e) => last = e,
            }
            if fixed {
                break;
            }
        }
        Err(last)
    }

    fn run_on(&mut self, port: u16) -> Result<(), String> {
        let log = self.dir.join("postgres.log");
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(WATCHDOG)
            .arg("pg-watchdog")
            .arg(self.bin.join("postgres"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-p", &port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories="])
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"])
            .args(["-c", "max_connections=400", "-c", "shared_buffers=32MB"])
            .env("PG_LOG", &log)
            .env("PG_DIR", &self.dir)
            .current_dir(&self.dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        as_owner(&mut cmd, self.owner);
        let mut child = cmd.spawn().map_err(|e| format!("start postgres: {e}"))?;
        let stdin = child.stdin.take().expect("piped stdin");
        let deadline = Instant::now() + READY_WITHIN;
        let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        loop {
            if accepts_connections(address) {
                self.watchdog = Some((child, stdin));
                return Ok(());
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("postgres exited ({status}) before accepting connections:\n{}", tail(&log)));
            }
            if Instant::now() > deadline {
                drop(stdin);
                let _ = child.wait();
                return Err(format!("postgres did not accept connections within {READY_WITHIN:?}:\n{}", tail(&log)));
            }
            // Polling a connection attempt: each try is itself the check.
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the server and waits for it; `keep` leaves the data for a restart.
    fn halt(&mut self, keep: bool) {
        if let Some((mut child, mut stdin)) = self.watchdog.take() {
            if keep {
                let _ = stdin.write_all(b"keep\n");
            }
            drop(stdin);
            let _ = child.wait();
        }
    }
}

/// True when the server at `address` answers a startup packet with an authentication request
/// (it is up and accepting), not with an error (starting up, shutting down) or nothing.
fn accepts_connections(address: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&address, Duration::from_millis(500)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut body = Vec::new();
    body.extend_from_slice(&196_608u32.to_be_bytes()); // protocol 3.0
    for part in ["user", "postgres", "database", "postgres"] {
        body.extend_from_slice(part.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut packet = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    if stream.write_all(&packet).is_err() {
        return false;
    }
    let mut first = [0u8; 1];
    matches!(stream.read_exact(&mut first), Ok(())) && first[0] == b'R'
}

/// A loopback port nothing listens on right now.
fn free_port() -> Result<u16, String> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(|e| format!("find a free port: {e}"))?;
    Ok(listener.local_addr().map_err(|e| e.to_string())?.port())
}

/// The directory holding `initdb` and `postgres`.
fn bin_dir() -> Result<PathBuf, String> {
    if let Ok(dir) = std::env::var(BIN_DIR_VAR)
        && !dir.is_empty()
    {
        return Ok(PathBuf::from(dir));
    }
    let mut debian: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    debian.sort();
    if let Some((_, bin)) = debian.pop() {
        return Ok(bin);
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return Ok(dir);
        }
    }
    for dir in std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect::<Vec<_>>()).unwrap_or_default() {
        if dir.join("initdb").exists() {
            return Ok(dir);
        }
    }
    Err(format!(
        "no PostgreSQL binaries (initdb) found: install Debian's `postgresql` package (scripts/test does), \
         set {BIN_DIR_VAR} to their directory, or set {DATABASE_URL_VAR} to a server"
    ))
}

/// `nobody`'s uid and gid when we are root (PostgreSQL will not run as root), else `None`.
fn unprivileged_owner() -> Result<Option<(u32, u32)>, String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let name = c"nobody";
    // SAFETY: a NUL-terminated name; the returned record is read at once, before any other
    // getpw* call on this thread.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        return Err("running as root and there is no user `nobody` to run PostgreSQL as".into());
    }
    // SAFETY: non-null, as checked.
    let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
    Ok(Some((uid, gid)))
}

/// Runs `cmd` as `owner` (std clears the supplementary groups when it sets the uid as root).
fn as_owner(cmd: &mut Command, owner: Option<(u32, u32)>) {
    use std::os::unix::process::CommandExt;
    if let Some((uid, gid)) = owner {
        cmd.uid(uid).gid(gid);
    }
}

/// The URL's part before its path, and its query (with the `?`).
fn split_url(url: &str) -> (String, String) {
    let (main, query) = match url.find('?') {
        Some(i) => (&url[..i], url[i..].to_owned()),
        None => (url, String::new()),
    };
    let after_scheme = main.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match main[after_scheme..].find('/') {
        Some(i) => main[..after_scheme + i].to_owned(),
        None => main.to_owned(),
    };
    (base, query)
}

fn nonce() -> u32 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    t.subsec_nanos() % 100_000
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_is_split_before_its_database() {
        assert_eq!(
            split_url("postgres://u:p@h:5/db?sslmode=disable"),
            ("postgres://u:p@h:5".to_owned(), "?sslmode=disable".to_owned())
        );
        assert_eq!(split_url("postgres://h"), ("postgres://h".to_owned(), String::new()));
    }

    #[tokio::test]
    async fn a_test_gets_a_database_of_its_own_and_a_stopped_cluster_starts_again() {
        let url = shared().database().await;
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        client.batch_execute("CREATE TABLE t (x int); INSERT INTO t VALUES (1)").await.unwrap();
        let other = shared().database().await;
        assert_ne!(url, other);
        let (client2, conn2) = tokio_postgres::connect(&other, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn2);
        assert!(client2.query("SELECT x FROM t", &[]).await.is_err(), "the table is in the other database");

        let mut own = Postgres::start().unwrap();
        let url = own.database().await;
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        let task = tokio::spawn(conn);
        client.batch_execute("CREATE TABLE kept (x int); INSERT INTO kept VALUES (7)").await.unwrap();
        own.stop();
        assert!(task.await.unwrap().is_err() || client.is_closed(), "the connection ended with the server");
        assert!(tokio_postgres::connect(&url, tokio_postgres::NoTls).await.is_err(), "nothing listens while stopped");
        own.restart().unwrap();
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        let x: i32 = client.query_one("SELECT x FROM kept", &[]).await.unwrap().get(0);
        assert_eq!(x, 7, "the data survived the restart");
        let dir = own.cluster.as_ref().unwrap().dir.clone();
        drop(own);
        assert!(!dir.exists(), "the cluster's directory is removed with it");
    }
}
