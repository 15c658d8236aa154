//! Crash safety: what the daemon acknowledged survives SIGKILL.
//!
//! The real `miniapp-brokerd serve` runs as a child process on a data dir. A host and renderers put
//! it under load (v2 and v3 logins, v3 scope grants, payments answered ok or cancelled by the
//! user), and a few payments are held open in the host's payment sheet. While calls are in flight
//! the child gets SIGKILL, and is started again on the same data dir. Then:
//! - every acknowledged login's session is listed by `Admin.ListSessions` (at least as new as the
//!   acknowledged login) and checkSession is ok for the same user in a new instance;
//! - every scope acknowledged in a v3 answer is listed by `Admin.ListGrants`;
//! - every acknowledged payment answers a retry with the same idempotency key with its recorded
//!   outcome, and the new host never sees the key;
//! - a payment the host was holding when the daemon died answers its retry with "payment outcome
//!   unknown" and does not reach the host again (the host already has the key);
//! - the app secret and the daemon secret survive: the app's backend exchanges a fresh login code
//!   with its old secret and gets the same openid; codes issued before the crash are invalid
//!   (they live in memory only, as documented).

mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use dashmap::DashMap;
use miniapp_broker_client::{
    HostBuilder, HostClient, HostFailure, RendererClient, connect,
    proto::{
        api::Api,
        v1::{self, ApiRequest, AppInfo, api_request, exchange_client::ExchangeClient},
    },
};
use miniapp_brokerd::demo::sample_request;
use support::{
    errno::{OUTCOME_UNKNOWN, USER_CANCEL},
    user, within,
};

const UID: &str = "u-crash";
const V2_APPS: usize = 6;
const V3_APPS: usize = 6;
const RENDERERS_PER_APP: usize = 2;
/// Payments the host holds open (never answers) when the daemon is killed.
const HELD: usize = 3;
/// What must be acknowledged before the kill.
const MIN_SESSIONS: usize = 120;
const MIN_GRANTS: usize = 20;
const MIN_PAYMENTS: usize = 120;

/// The daemon as a child process; killed when dropped, so a failing test leaves nothing behind.
struct ChildDaemon {
    child: Child,
}

impl Drop for ChildDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ChildDaemon {
    /// Starts `miniapp-brokerd serve` on `dir` and waits (bounded) until its socket accepts.
    async fn start(dir: &Path, run: u32) -> ChildDaemon {
        let log = std::fs::File::create(dir.join(format!("daemon-{run}.log"))).expect("log file");
        // The load is one user's calls, many a second in each app: past one user's rate by design.
        let config_dir = dir.join("config").join("miniapp-broker");
        std::fs::create_dir_all(&config_dir).expect("config dir");
        std::fs::write(
            config_dir.join("config.toml"),
            "[limits]\ncalls_per_second_per_user = 1000000\nburst_per_user = 1000000\n",
        )
        .expect("config file");
        let child = Command::new(env!("CARGO_BIN_EXE_miniapp-brokerd"))
            .arg("serve")
            .arg("--socket")
            .arg(socket(dir))
            .arg("--data-dir")
            .arg(dir.join("data"))
            // No config file from the environment but the one above; keep the log small.
            .env("XDG_CONFIG_HOME", dir.join("config"))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("the daemon binary starts");
        let daemon = ChildDaemon { child };
        let path = socket(dir);
        within("the daemon's socket accepts", async {
            while tokio::net::UnixStream::connect(&path).await.is_err() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        daemon
    }

    /// SIGKILL: no shutdown path runs.
    fn kill(mut self) {
        self.child.kill().expect("SIGKILL the daemon");
        let status = self.child.wait().expect("reap the daemon");
        assert!(!status.success(), "the daemon was killed, not stopped: {status}");
    }
}

fn socket(dir: &Path) -> PathBuf {
    dir.join("s.sock")
}

fn address(dir: &Path) -> String {
    socket(dir).display().to_string()
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_millis() as u64
}

/// What the host saw: idempotency key → times.
#[derive(Default)]
struct Ledger {
    payments: DashMap<String, u32>,
}

/// A host on the daemon in `dir`. Payments whose key starts with "held-" stay open in the
/// payment sheet while `hold` is set; 1 in 5 other payments the user cancels.
async fn connect_host(
    dir: &Path,
    ledger: &Arc<Ledger>,
    hold: bool,
    held_seen: Option<tokio::sync::mpsc::UnboundedSender<String>>,
) -> HostClient {
    let token = std::fs::read_to_string(dir.join("data").join("host.token")).expect("host token file");
    let ledger = ledger.clone();
    HostBuilder::new(&address(dir), &token)
        .name("crash-host")
        .user(user(UID))
        .handle(move |_: AppInfo, r: v1::RequestPaymentRequest| {
            let ledger = ledger.clone();
            let held_seen = held_seen.clone();
            async move {
                *ledger.payments.entry(r.idempotency_key.clone()).or_insert(0) += 1;
                if r.idempotency_key.starts_with("held-") && hold {
                    if let Some(seen) = held_seen {
                        let _ = seen.send(r.idempotency_key.clone());
                    }
                    // The user never finishes this payment before the daemon dies.
                    std::future::pending::<()>().await;
                }
                let n: u64 = r.idempotency_key.bytes().map(u64::from).sum();
                if n.is_multiple_of(5) {
                    Err(HostFailure::cancelled())
                } else {
                    Ok(v1::RequestPaymentResponse::default())
                }
            }
        })
        .get_auth_code(|_: AppInfo, r: v1::GetAuthCodeRequest| async move {
            Ok(v1::GetAuthCodeResponse {
                auth_code: "ac-crash".into(),
                auth_success_scopes: r.scopes,
                ..Default::default()
            })
        })
        .connect()
        .await
        .expect("host connects")
}

fn payment(key: &str) -> ApiRequest {
    let mut request = sample_request(Api::RequestPayment);
    if let Some(api_request::Api::RequestPayment(r)) = request.api.as_mut() {
        r.idempotency_key = key.to_owned();
    }
    request
}

/// Everything the daemon acknowledged before it died.
#[derive(Default)]
struct Acks {
    /// app id → start time of its latest acknowledged login.
    sessions: Mutex<BTreeMap<String, u64>>,
    session_count: AtomicUsize,
    /// (app id, scope) granted in an ok v3 answer.
    grants: Mutex<BTreeSet<(String, String)>>,
    /// (app id, key) → the errno of the acknowledged outcome (0: ok).
    payments: Mutex<BTreeMap<(String, String), i64>>,
}

/// A renderer looping login → a scope API → a payment until it is aborted.
async fn load(renderer: RendererClient, app_id: String, v3: bool, tag: String, acks: Arc<Acks>) {
    let scoped = [Api::GetPhoneNumber, Api::GetEmail, Api::ChooseAvatar, Api::GetNickName];
    for round in 0usize.. {
        let started = now_ms();
        if renderer.call(v1::LoginRequest::default()).await.is_ok() {
            acks.sessions.lock().unwrap().insert(app_id.clone(), started);
            acks.session_count.fetch_add(1, Ordering::SeqCst);
        }
        let api = scoped[round % scoped.len()];
        if renderer.call_request(sample_request(api)).await.is_ok()
            && v3
            && let Some(scope) = api.scope()
        {
            acks.grants.lock().unwrap().insert((app_id.clone(), scope.to_owned()));
        }
        let key = format!("{tag}-{round}");
        let outcome = match renderer.call_request(payment(&key)).await {
            Ok(_) => Some(0),
            Err(f) if f.errno == USER_CANCEL => Some(USER_CANCEL),
            Err(_) => None,
        };
        if let Some(errno) = outcome {
            acks.payments.lock().unwrap().insert((app_id.clone(), key), errno);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_acknowledged_before_sigkill_is_there_after_a_restart() {
    let dir = tempfile::Builder::new().prefix("brokerd-crash").tempdir().expect("temp dir");
    let dir = dir.path();
    let ledger = Arc::new(Ledger::default());

    let daemon = ChildDaemon::start(dir, 1).await;
    let (held_tx, mut held_rx) = tokio::sync::mpsc::unbounded_channel();
    let host = connect_host(dir, &ledger, true, Some(held_tx)).await;

    // Apps: v2 and v3 by app.json, each with a backend secret.
    let apps: Vec<(String, bool)> = (0..V2_APPS)
        .map(|i| (format!("wxcrashv2{i:02}"), false))
        .chain((0..V3_APPS).map(|i| (format!("wxcrashv3{i:02}"), true)))
        .collect();
    let app_json = |v3: bool| if v3 { r#"{"apiVersion":"v3"}"# } else { r#"{"apiVersion":"v2"}"# };
    let mut exchange = ExchangeClient::new(connect::channel(&address(dir)).await.expect("exchange channel"));
    let mut secrets = BTreeMap::new();
    let mut openids = BTreeMap::new();
    let mut stale_codes = BTreeMap::new();
    let mut tasks = Vec::new();
    let acks = Arc::new(Acks::default());
    for (app_id, v3) in &apps {
        let secret = host.register_app(app_id, false).await.expect("register app").secret;
        let launched = support::launch(&host, app_id, app_json(*v3)).await;
        let renderer = RendererClient::connect(&address(dir), &launched.launch_token).await.expect("renderer connects");
        let code = renderer.call(v1::LoginRequest::default()).await.expect("login").code;
        let session = exchange
            .code2_session(v1::Code2SessionRequest { app_id: app_id.clone(), secret: secret.clone(), code })
            .await
            .expect("code2Session")
            .into_inner();
        openids.insert(app_id.clone(), session.openid);
        // A code issued but not redeemed before the crash.
        stale_codes.insert(app_id.clone(), renderer.call(v1::LoginRequest::default()).await.expect("login").code);
        secrets.insert(app_id.clone(), secret);
        for n in 0..RENDERERS_PER_APP {
            let renderer =
                RendererClient::connect(&address(dir), &launched.launch_token).await.expect("renderer connects");
            tasks.push(tokio::spawn(load(renderer, app_id.clone(), *v3, format!("{app_id}-r{n}"), acks.clone())));
        }
    }
    // Payments the host holds open, on renderers of their own.
    let mut held_keys = Vec::new();
    for (n, (app_id, v3)) in apps.iter().take(HELD).enumerate() {
        let launched = support::launch(&host, app_id, app_json(*v3)).await;
        let renderer = RendererClient::connect(&address(dir), &launched.launch_token).await.expect("renderer connects");
        let key = format!("held-{n}");
        held_keys.push((app_id.clone(), key.clone()));
        tasks.push(tokio::spawn(async move {
            let _ = renderer.call_request(payment(&key)).await;
        }));
    }

    // Kill once enough is acknowledged and every held payment is at the host.
    for _ in 0..HELD {
        within("the host holds a payment", held_rx.recv()).await.expect("held payment seen");
    }
    support::until("enough acknowledged under load", || {
        acks.session_count.load(Ordering::SeqCst) >= MIN_SESSIONS
            && acks.grants.lock().unwrap().len() >= MIN_GRANTS
            && acks.payments.lock().unwrap().len() >= MIN_PAYMENTS
    })
    .await;
    daemon.kill();
    for task in &tasks {
        task.abort();
    }
    for task in tasks {
        let _ = task.await;
    }
    drop(host);
    let sessions = acks.sessions.lock().unwrap().clone();
    let grants = acks.grants.lock().unwrap().clone();
    let payments = acks.payments.lock().unwrap().clone();
    assert!(
        payments.values().any(|e| *e == 0) && payments.values().any(|e| *e == USER_CANCEL),
        "both payment outcomes acknowledged: {payments:?}"
    );

    // Restart on the same data dir, with a host that would answer any payment it is given.
    let _daemon = ChildDaemon::start(dir, 2).await;
    let host = connect_host(dir, &ledger, false, None).await;
    let seen_before: BTreeMap<String, u32> = ledger.payments.iter().map(|e| (e.key().clone(), *e.value())).collect();

    // Sessions: listed, at least as new as the acknowledged login, and checkSession is ok.
    let listed = host.list_sessions("").await.expect("ListSessions");
    for (app_id, started) in &sessions {
        let row = listed.iter().find(|s| &s.app_id == app_id && s.uid == UID);
        let row = row.unwrap_or_else(|| panic!("acknowledged session of {app_id} lost; listed: {listed:?}"));
        // A login renews its session (a key younger than sessions.key_refresh_secs is kept, and
        // created_at_ms is the key's birth): the acknowledged login's write is the expiry it set,
        // or an earlier login's within the renewal slack (a renewal moving it less is not written).
        let lifetime_ms = miniapp_brokerd::Config::default().sessions.lifetime_secs * 1000;
        let slack_ms = miniapp_brokerd::platform::embedded::renewal_slack_ms(lifetime_ms);
        assert!(
            row.expires_at_ms + slack_ms >= *started + lifetime_ms,
            "{app_id}: the session is older than the acknowledged login"
        );
    }
    let mut renderers = BTreeMap::new();
    for (app_id, v3) in &apps {
        let launched = support::launch(&host, app_id, app_json(*v3)).await;
        let renderer = RendererClient::connect(&address(dir), &launched.launch_token).await.expect("renderer connects");
        if sessions.contains_key(app_id) {
            within("checkSession", renderer.call(v1::CheckSessionRequest {}))
                .await
                .unwrap_or_else(|f| panic!("{app_id}: checkSession after the crash: {}", f.err_msg));
        }
        renderers.insert(app_id.clone(), renderer);
    }

    // Grants: every acknowledged scope is listed.
    let listed: BTreeSet<(String, String)> =
        host.list_grants("", UID).await.expect("ListGrants").into_iter().map(|g| (g.app_id, g.scope)).collect();
    let lost: Vec<_> = grants.difference(&listed).collect();
    assert!(lost.is_empty(), "acknowledged grants lost: {lost:?}");

    // Payments: a retry gets the recorded outcome, and the host does not see the key again.
    for ((app_id, key), errno) in &payments {
        let retry = within("payment retry", renderers[app_id].call_request(payment(key))).await;
        match (errno, &retry) {
            (0, Ok(_)) => {}
            (&USER_CANCEL, Err(f)) if f.errno == USER_CANCEL && f.err_msg == "requestPayment:fail cancel" => {}
            _ => panic!("payment {key} was acknowledged with errno {errno}; its retry after the crash got {retry:?}"),
        }
        assert_eq!(
            ledger.payments.get(key).map(|c| *c),
            seen_before.get(key).copied(),
            "payment {key} reached the host again"
        );
    }
    // A payment the host held when the daemon died: the key is spent, the outcome unknown.
    for (app_id, key) in &held_keys {
        let retry = within("held payment retry", renderers[app_id].call_request(payment(key))).await;
        let failure = retry.expect_err("a held payment has no outcome to replay");
        assert_eq!(failure.errno, OUTCOME_UNKNOWN, "held payment {key}: {}", failure.err_msg);
        assert_eq!(ledger.payments.get(key).map(|c| *c), Some(1), "held payment {key} reached the host again");
    }

    // Secrets: the old app secret exchanges a fresh code for the same openid; old codes are gone.
    for (app_id, _) in &apps {
        let code = renderers[app_id].call(v1::LoginRequest::default()).await.expect("login after the crash").code;
        let session =
            exchange_after(dir, app_id, &secrets[app_id], &code).await.expect("code2Session with the old secret");
        assert_eq!(session.openid, openids[app_id], "{app_id}: openid changed across the crash");
        let stale = exchange_after(dir, app_id, &secrets[app_id], &stale_codes[app_id]).await;
        let status = stale.expect_err("a code from before the crash");
        assert!(status.message().contains("40029"), "{app_id}: stale code: {}", status.message());
    }
}

async fn exchange_after(
    dir: &Path,
    app_id: &str,
    secret: &str,
    code: &str,
) -> Result<v1::Code2SessionResponse, tonic::Status> {
    let mut exchange = ExchangeClient::new(connect::channel(&address(dir)).await.expect("exchange channel"));
    let request =
        v1::Code2SessionRequest { app_id: app_id.to_owned(), secret: secret.to_owned(), code: code.to_owned() };
    exchange.code2_session(request).await.map(|r| r.into_inner())
}
