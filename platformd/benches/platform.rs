//! The platform service's benchmark, ratios in one run on one PostgreSQL:
//!
//! ```text
//! cargo bench -p miniapp-platformd --bench platform      # the figures (docs/benchmarks.md)
//! ```
//!
//! 1. **pairs**: login codes issued and redeemed per second, 16 clients at once, each pair a
//!    daemon-API `IssueLoginCode` (gRPC, client credentials) and a backend `jscode2session` (HTTP)
//!    at one `miniapp-platformd serve` (the release binary, its own process) — against a bare
//!    client running the same statements the service runs for a pair (read the session, issue the
//!    code (with its session only when there is none live, as the service's logins do), read the
//!    app's secret hash, take the rate bucket, redeem, read the session) straight on the engine,
//!    over the same pool size, on the same database. The two kinds run in alternating windows,
//!    and the CPU each pair cost the service, PostgreSQL and the clients is printed beside;
//! 2. **login**: the p50/p99 of a v2 `wx.login` from a renderer through a daemon in remote mode
//!    against the same through the embedded platform, beside one platform round trip (a bare
//!    `IssueLoginCode`); the kinds interleaved in rounds.
//!
//! `cargo test` runs it bare as a smoke test (a few pairs and logins, no figures quoted).

#[path = "../tests/support/mod.rs"]
mod support;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use miniapp_broker_proto::platform::v1::{IssueLoginCodeRequest, platform_client::PlatformClient};
use miniapp_platform::{
    store::{CodeRecord, PlatformStore, Purpose, Quota, SessionRow, Wanted},
    tokens::random_token,
};
use miniapp_platformd::postgres::{PgOptions, PgStore};
use support::*;

const CLIENTS: usize = 16;

struct Mode {
    pair_secs: f64,
    login_samples: usize,
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let mode = Mode { pair_secs: if full { 5.0 } else { 0.3 }, login_samples: if full { 2000 } else { 20 } };
    // The daemons run as `miniapp-brokerd` runs them (main.rs `runtime`): one worker of their own,
    // apart from the runtime of the renderers and hosts that call them (other processes in a
    // deployment).
    let daemons = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .global_queue_interval(4)
        .enable_all()
        .build()
        .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(run(mode, daemons.handle().clone()));
    drop(rt);
    daemons.shutdown_timeout(Duration::from_secs(5));
}

/// A daemon started on the daemons' runtime.
async fn start_daemon(daemons: &tokio::runtime::Handle, config: miniapp_brokerd::Config) -> miniapp_brokerd::Server {
    daemons.spawn(miniapp_brokerd::start(config)).await.unwrap().expect("the daemon starts")
}

async fn run(mode: Mode, daemons: tokio::runtime::Handle) {
    let url = miniapp_test_postgres::shared().database().await;
    let t = tenant(&url).await;
    let instance = Instance::start(&url, "127.0.0.1:0", "127.0.0.1:0").await;

    let pid = instance.child.id().unwrap_or_default();
    let (service, bare) = pairs(&instance, &t, &url, mode.pair_secs, pid).await;
    println!(
        "pairs/s (issue + redeem, {CLIENTS} clients, {ROUNDS} windows each, in turn): service {:.0}, bare statements {:.0}",
        service.rate(),
        bare.rate()
    );
    let (s, b) = (service.cpu(), bare.cpu());
    println!(
        "CPU per pair (user + system, µs): service {:.1}, PostgreSQL {:.1}, clients {:.1}",
        s.service, s.postgres, s.clients
    );
    println!("CPU per bare pair (µs): PostgreSQL {:.1}, the bare client {:.1}", b.postgres, b.clients);
    let (service, bare) = (service.rate(), bare.rate());
    println!("ratio service / bare: {:.2} (target >= 0.7)", service / bare);

    let (remote, embedded, rtt) = logins(&instance, &t, mode.login_samples, &daemons).await;
    println!("v2 login p50/p99 (µs): embedded {} / {}", embedded.0, embedded.1);
    println!("v2 login p50/p99 (µs): remote   {} / {}", remote.0, remote.1);
    println!("one platform round trip (IssueLoginCode) p50/p99 (µs): {} / {}", rtt.0, rtt.1);
    println!(
        "remote p50 - embedded p50 = {} µs (target <= one round trip, {} µs)",
        remote.0 as i64 - embedded.0 as i64,
        rtt.0
    );
    assert!(service > 0.0 && bare > 0.0 && remote.0 > 0 && embedded.0 > 0, "every figure is measured");
}

async fn daemon_client(instance: &Instance) -> PlatformClient<tonic::transport::Channel> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", instance.daemon)).unwrap();
    PlatformClient::new(endpoint.connect().await.unwrap())
}

fn issue_request(t: &Tenant, uid: &str) -> tonic::Request<IssueLoginCodeRequest> {
    let mut request =
        tonic::Request::new(IssueLoginCodeRequest { app_id: APP.into(), uid: uid.into(), auth_code: String::new() });
    request.metadata_mut().insert("client-key", t.client_key.parse().unwrap());
    request.metadata_mut().insert("client-secret", t.client_secret.parse().unwrap());
    request
}

/// Windows of each kind of pairs, the kinds in turn (the order alternating), so that a drift of
/// the machine's speed weighs on both alike.
const ROUNDS: usize = 5;

/// What one kind of pairs did over its windows.
#[derive(Default)]
struct Tally {
    pairs: u64,
    elapsed: Duration,
    service: f64,
    postgres: f64,
    clients: f64,
}

impl Tally {
    fn add(&mut self, pairs: u64, elapsed: Duration, before: &Cpu, after: &Cpu) {
        self.pairs += pairs;
        self.elapsed += elapsed;
        self.service += after.service - before.service;
        self.postgres += after.postgres - before.postgres;
        self.clients += after.clients - before.clients;
    }

    fn rate(&self) -> f64 {
        self.pairs as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Microseconds of CPU per pair.
    fn cpu(&self) -> Cpu {
        let per = |secs: f64| secs * 1e6 / self.pairs.max(1) as f64;
        Cpu { service: per(self.service), postgres: per(self.postgres), clients: per(self.clients) }
    }
}

/// Pairs through the service and bare pairs on the same database, `secs` of each in [`ROUNDS`]
/// windows; the CPU is read around each window while every connection (so every backend) is open.
async fn pairs(instance: &Instance, t: &Tenant, url: &str, secs: f64, service_pid: u32) -> (Tally, Tally) {
    let t = Arc::new(Tenant {
        client_key: t.client_key.clone(),
        client_secret: t.client_secret.clone(),
        app_secret: t.app_secret.clone(),
    });
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push((daemon_client(instance).await, Http::new()));
    }
    let store = Arc::new(PgStore::connect(url, &PgOptions::default()).unwrap());
    store.migrate().await.unwrap();
    let window = Duration::from_secs_f64(secs / ROUNDS as f64);
    let (mut service, mut bare) = (Tally::default(), Tally::default());
    for round in 0..ROUNDS {
        for kind in if round % 2 == 0 { [0, 1] } else { [1, 0] } {
            let before = Cpu::now(service_pid);
            let started = Instant::now();
            let done = match kind {
                0 => service_window(&clients, &t, &instance.url(), started + window).await,
                _ => bare_window(&store, started + window).await,
            };
            let elapsed = started.elapsed();
            let tally = if kind == 0 { &mut service } else { &mut bare };
            tally.add(done, elapsed, &before, &Cpu::now(service_pid));
        }
    }
    (service, bare)
}

/// Pairs through the service until `until`, one task per client.
async fn service_window(
    clients: &[(PlatformClient<tonic::transport::Channel>, Http)],
    t: &Arc<Tenant>,
    base: &str,
    until: Instant,
) -> u64 {
    let tasks: Vec<_> = clients
        .iter()
        .enumerate()
        .map(|(i, (client, http))| {
            let (t, base, mut client, http) = (t.clone(), base.to_owned(), client.clone(), http.clone());
            tokio::spawn(async move {
                let uid = format!("bench-{i}");
                let mut pairs = 0u64;
                while Instant::now() < until {
                    let code = client.issue_login_code(issue_request(&t, &uid)).await.unwrap().into_inner().code;
                    let (_, body) = http.get(&base, &session_path(&t.app_secret, &code)).await;
                    assert!(body["openid"].is_string(), "{body}");
                    pairs += 1;
                }
                pairs
            })
        })
        .collect();
    let mut pairs = 0;
    for task in tasks {
        pairs += task.await.unwrap();
    }
    pairs
}

/// CPU seconds used so far by the service, by PostgreSQL's processes and by this process (the
/// clients, bare or not, and the daemons of the login phase).
struct Cpu {
    service: f64,
    postgres: f64,
    clients: f64,
}

impl Cpu {
    fn now(service: u32) -> Cpu {
        Cpu { service: cpu_secs(service), postgres: postgres_cpu_secs(), clients: cpu_secs(std::process::id()) }
    }
}

/// CPU seconds of every process named `postgres` still running (the server and its backends; a
/// backend that ended meanwhile takes its share with it, so this may undercount a little).
fn postgres_cpu_secs() -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else { return 0.0 };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "postgres"))
        .map(cpu_secs)
        .sum()
}

/// User + system CPU seconds the process `pid` has used so far (/proc/PID/stat; 0 elsewhere).
fn cpu_secs(pid: u32) -> f64 {
    #[cfg(target_os = "linux")]
    {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
        // The fields after the command name (which may hold spaces, and ends with the last ')').
        let Some(end) = stat.rfind(')') else { return 0.0 };
        let fields: Vec<&str> = stat[end + 1..].split_whitespace().collect();
        // utime and stime: fields 14 and 15 of the line, 12 and 13 after the name.
        let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
        // SAFETY: a plain sysconf query.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        (ticks(11) + ticks(12)) as f64 / hz
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = pid;
        0.0
    }
}

/// Pairs of the same statements run straight on the engine (no service) until `until`.
async fn bare_window(store: &Arc<PgStore>, until: Instant) -> u64 {
    let quota = Quota { per_minute: 6_000_000, burst: 100_000 };
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let (app, uid) = ("wx-bare-app", format!("bare-{i}"));
                let mut pairs = 0u64;
                while Instant::now() < until {
                    let now = now_ms();
                    // The service writes a login's session only when it starts or renews one (a
                    // young session's renewal within the slack is not written): so here.
                    let live = PlatformStore::session(&*store, app, &uid).await.unwrap();
                    let session = live.clone().unwrap_or_else(|| SessionRow {
                        app_id: app.into(),
                        uid: uid.clone(),
                        openid: format!("o-{uid}"),
                        session_key: random_token(16),
                        created_at_ms: now,
                        expires_at_ms: now + 3_600_000,
                    });
                    let write = live.is_none().then_some(&session);
                    let code = random_token(18);
                    let record = CodeRecord {
                        app_id: app.into(),
                        uid: uid.clone(),
                        openid: session.openid.clone(),
                        purpose: Purpose::Login { auth_code: None },
                        expires_at_ms: now + 300_000,
                        ledger: Vec::new(),
                    };
                    PlatformStore::issue_code(&*store, &code, record, write, 100).await.unwrap();
                    let _ = PlatformStore::app_secret_hash(&*store, app).await.unwrap();
                    assert!(PlatformStore::take_attempt(&*store, app, quota, now).await.unwrap());
                    let taken = PlatformStore::redeem_code(&*store, app, &code, Wanted::Login, now_ms()).await.unwrap();
                    assert!(matches!(taken, miniapp_platform::store::Redemption::Redeemed(_)));
                    let _ = PlatformStore::session(&*store, app, &uid).await.unwrap();
                    pairs += 1;
                }
                pairs
            })
        })
        .collect();
    let mut pairs = 0;
    for task in tasks {
        pairs += task.await.unwrap();
    }
    pairs
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

/// p50 and p99 of `samples`, µs.
fn percentiles(mut samples: Vec<Duration>) -> (u128, u128) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize].as_micros();
    (at(0.50), at(0.99))
}

/// v2 logins through the remote platform and the embedded one, and bare platform round trips,
/// interleaved in ten rounds.
async fn logins(
    instance: &Instance,
    t: &Tenant,
    samples: usize,
    daemons: &tokio::runtime::Handle,
) -> ((u128, u128), (u128, u128), (u128, u128)) {
    let (remote_dir, remote_config) = remote_config(t, &format!("http://{}", instance.daemon), None, 3000);
    let remote = connect_desktop(remote_dir, start_daemon(daemons, remote_config).await).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = miniapp_brokerd::Config::ephemeral_in(dir.path());
    // The same limits as the remote desktop's (support::remote_config): back-to-back logins of one user.
    config.limits.calls_per_second_per_user = 100_000;
    config.limits.burst_per_user = 100_000;
    let server = start_daemon(daemons, config).await;
    let host = miniapp_broker_client::HostBuilder::new(server.address(), server.host_token())
        .user(user("u1"))
        .connect()
        .await
        .unwrap();
    let launch = host.launch_app(APP, r#"{"apiVersion":"v2"}"#).await.unwrap();
    let embedded =
        miniapp_broker_client::RendererClient::connect(server.address(), &launch.launch_token).await.unwrap();
    let mut client = daemon_client(instance).await;
    for _ in 0..20 {
        login(&remote.renderer).await.unwrap();
        login(&embedded).await.unwrap();
    }
    let (mut r, mut e, mut p) = (Vec::new(), Vec::new(), Vec::new());
    let per_round = (samples / 10).max(1);
    for _ in 0..10 {
        for _ in 0..per_round {
            let started = Instant::now();
            login(&remote.renderer).await.unwrap();
            r.push(started.elapsed());
        }
        for _ in 0..per_round {
            let started = Instant::now();
            login(&embedded).await.unwrap();
            e.push(started.elapsed());
        }
        for _ in 0..per_round {
            let started = Instant::now();
            client.issue_login_code(issue_request(t, "rtt")).await.unwrap();
            p.push(started.elapsed());
        }
    }
    (percentiles(r), percentiles(e), percentiles(p))
}
