//! The `miniapp-brokerd` binary as operators and mini app developers use it: `serve` notifies
//! readiness (NOTIFY_SOCKET) and takes a systemd-style activated socket (LISTEN_FDS/LISTEN_PID on
//! fd 3); `status` (text and `--json`), `apps`, `sessions`, `grants`, `revoke` and `register-app`
//! report and change the running daemon's state as real clients left it; the operator's mistakes
//! (no daemon, a wrong token) get clear refusals; `dev-host` lets a mini app's login flow run
//! without a superapp; `demo` runs end to end with nothing unexpected.
//!
//! Every process is the real binary; every wait is on a line, a datagram or an exit, and bounded.
#![cfg(unix)]

mod support;

use std::{
    os::{fd::AsRawFd, unix::fs::DirBuilderExt},
    path::{Path, PathBuf},
    process::{Output, Stdio},
};

use miniapp_broker_client::{
    HostBuilder, HostClient, RendererClient, connect,
    proto::{
        api::{Api, scope},
        v1::{self, exchange_client::ExchangeClient},
    },
};
use miniapp_brokerd::demo::sample_request;
use serde_json::Value;
use support::{user, within};
use tempfile::TempDir;
use tokio::{
    io::{AsyncBufReadExt, BufReader, Lines},
    net::UnixDatagram,
    process::{Child, ChildStdout, Command},
};

const BIN: &str = env!("CARGO_BIN_EXE_miniapp-brokerd");
const PROFILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../dev-host.example.toml");

/// The binary with a clean environment: no user config, no inherited systemd variables.
fn bin(dir: &Path) -> Command {
    let mut c = Command::new(BIN);
    clean(&mut c, dir);
    c
}

fn clean(c: &mut Command, dir: &Path) {
    for var in ["MINIAPP_BROKERD_CONFIG", "NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        c.env_remove(var);
    }
    c.env("XDG_CONFIG_HOME", dir.join("config")).env("RUST_LOG", "info").stdin(Stdio::null()).kill_on_drop(true);
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A datagram socket standing in for systemd's notification socket.
struct Notify {
    path: PathBuf,
    socket: UnixDatagram,
}

impl Notify {
    fn bind(dir: &Path) -> Notify {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind notify socket");
        Notify { path, socket }
    }

    /// Waits for the daemon's `READY=1`, failing at once (with its log) if it exits first.
    async fn ready(&self, child: &mut Child, log: &Path) {
        let mut buf = [0u8; 512];
        let received = within("READY=1 on NOTIFY_SOCKET", async {
            tokio::select! {
                r = self.socket.recv(&mut buf) => r.expect("notify recv"),
                status = child.wait() => panic!("daemon exited before READY=1: {status:?}\n{}", std::fs::read_to_string(log).unwrap_or_default()),
            }
        })
        .await;
        let message = text(&buf[..received]);
        assert!(message.lines().any(|l| l == "READY=1"), "notification was {message:?}");
    }
}

/// A `miniapp-brokerd serve` process on a socket in its own temp dir.
struct Brokerd {
    child: Child,
    dir: TempDir,
    socket: PathBuf,
    token_file: PathBuf,
}

impl Brokerd {
    async fn start() -> Brokerd {
        let dir = tempfile::Builder::new().prefix("brokerd-cli").tempdir().expect("temp dir");
        let socket = dir.path().join("brokerd.sock");
        let data = dir.path().join("data");
        let child = Self::spawn(dir.path(), &socket, &data).await;
        Brokerd { child, token_file: data.join("host.token"), socket, dir }
    }

    /// `serve` on `socket` with `data`, once it has told its NOTIFY_SOCKET it is ready.
    async fn spawn(dir: &Path, socket: &Path, data: &Path) -> Child {
        let log = dir.join("daemon.log");
        let notify = Notify::bind(dir);
        let mut child = bin(dir)
            .arg("serve")
            .arg("--socket")
            .arg(socket)
            .arg("--data-dir")
            .arg(data)
            .arg("--ephemeral")
            .env("NOTIFY_SOCKET", &notify.path)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn serve");
        notify.ready(&mut child, &log).await;
        drop(notify);
        std::fs::remove_file(dir.join("notify.sock")).expect("notify socket removed");
        child
    }

    /// SIGTERM, then `serve` again on the same socket and data dir (so the same host token).
    async fn restart(&mut self) {
        assert!(self.stop().await.success());
        self.child = Self::spawn(self.dir.path(), &self.socket, &self.dir.path().join("data")).await;
    }

    fn address(&self) -> String {
        self.socket.display().to_string()
    }

    fn token(&self) -> String {
        std::fs::read_to_string(&self.token_file).expect("host token file").trim().to_owned()
    }

    /// An operator command aimed at this daemon.
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = bin(self.dir.path());
        c.args(args).arg("--socket").arg(&self.socket).arg("--token-file").arg(&self.token_file);
        c
    }

    async fn run(&self, args: &[&str]) -> Output {
        let what = format!("miniapp-brokerd {}", args.join(" "));
        within(&what, self.cmd(args).output()).await.expect("run the binary")
    }

    /// Runs `args --json`, which must succeed, and parses its output.
    async fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.run(&all).await;
        assert!(out.status.success(), "{all:?} failed: {}", text(&out.stderr));
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{all:?} printed no JSON ({e}): {}", text(&out.stdout)))
    }

    /// Runs `args`, which must succeed, and returns its stdout.
    async fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args).await;
        assert!(out.status.success(), "{args:?} failed: {}", text(&out.stderr));
        text(&out.stdout)
    }

    /// SIGTERM, then the exit status (a clean shutdown exits 0).
    async fn stop(&mut self) -> std::process::ExitStatus {
        terminate(&self.child, libc::SIGTERM);
        within("daemon exits on SIGTERM", self.child.wait()).await.expect("wait")
    }
}

fn terminate(child: &Child, signal: i32) {
    let pid = child.id().expect("child still running") as i32;
    // SAFETY: kill has no memory-safety preconditions; pid is our own child.
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
}

/// Waits until the daemon reports a connected host (it publishes the host just after Welcome).
async fn host_published(host: &HostClient) {
    within("host shows as connected", async {
        loop {
            let status = host.admin().status(host.authorize(v1::StatusRequest {})).await.expect("status").into_inner();
            if status.host_connected {
                return;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
}

/// The README's `cargo run --release -- demo` runs the one binary among the workspace's default
/// members: with a second one there, cargo refuses to choose.
#[test]
fn the_readme_run_command_finds_one_binary_to_run() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let manifest = |dir: &Path| -> toml::Value {
        toml::from_str(&std::fs::read_to_string(dir.join("Cargo.toml")).expect("manifest")).expect("manifest TOML")
    };
    let workspace = manifest(&root);
    let members = workspace["workspace"]["default-members"].as_array().expect("default-members");
    let with_binaries: Vec<&str> = members
        .iter()
        .map(|m| m.as_str().expect("a member path"))
        .filter(|m| {
            let dir = root.join(m);
            let declared = manifest(&dir).get("bin").and_then(|b| b.as_array()).is_some_and(|b| !b.is_empty());
            declared || dir.join("src/main.rs").exists()
        })
        .collect();
    assert_eq!(with_binaries, ["daemon"], "default members with a binary");
}

#[tokio::test]
async fn operator_mistakes_get_clear_refusals() {
    let mut daemon = Brokerd::start().await;
    let dir = daemon.dir.path();
    let nowhere = dir.join("nobody-here.sock");
    let wrong_token = dir.join("wrong.token");
    std::fs::write(&wrong_token, "0123456789abcdef\n").unwrap();
    let missing_token = dir.join("missing.token");
    let nowhere_s = nowhere.display().to_string();

    // (what, socket, token file, expected on stderr)
    let cases: [(&str, &Path, &Path, String); 4] = [
        ("no daemon, token present", &nowhere, &daemon.token_file, format!("no daemon is listening at {nowhere_s}")),
        (
            "no daemon, no token file (fresh machine)",
            &nowhere,
            &missing_token,
            format!("no daemon is listening at {nowhere_s}"),
        ),
        ("daemon, wrong token", &daemon.socket, &wrong_token, "refused the host token".to_owned()),
        ("daemon, missing token file", &daemon.socket, &missing_token, "cannot read the host token".to_owned()),
    ];
    for (what, socket, token, expected) in cases {
        for command in ["status", "apps", "grants"] {
            let out =
                within(what, bin(dir).arg(command).arg("--socket").arg(socket).arg("--token-file").arg(token).output())
                    .await
                    .unwrap();
            let stderr = text(&out.stderr);
            assert!(!out.status.success(), "{what}: `{command}` must fail");
            assert!(stderr.contains(&expected), "{what}: `{command}` stderr {stderr:?} lacks {expected:?}");
            assert!(out.stdout.is_empty(), "{what}: nothing on stdout, got {:?}", text(&out.stdout));
        }
    }
    assert!(daemon.stop().await.success());
}

#[tokio::test]
async fn status_apps_sessions_grants_revoke_register_app() {
    let mut daemon = Brokerd::start().await;
    let address = daemon.address();

    let s = daemon.json(&["status"]).await;
    assert_eq!(s["hostConnected"], false, "{s}");
    assert_eq!(s["apps"], 0);
    assert_eq!(s["listenAddress"], address.as_str());
    assert_eq!(s["store"], ":memory:");
    assert!(daemon.ok(&["status"]).await.contains("host              not connected"));

    // A host that grants every v3 scope asked for, with user u1 signed in.
    let host = HostBuilder::new(&address, &daemon.token())
        .name("cli-test-host")
        .user(user("u1"))
        .get_auth_code(|_app, req: v1::GetAuthCodeRequest| async move {
            Ok(v1::GetAuthCodeResponse {
                auth_code: "auth-cli".into(),
                code: String::new(),
                auth_success_scopes: req.scopes,
                auth_error_scopes: Default::default(),
            })
        })
        .connect()
        .await
        .expect("host connects");
    host_published(&host).await;

    let s = daemon.json(&["status"]).await;
    assert_eq!(s["hostConnected"], true, "{s}");
    assert_eq!(s["hostName"], "cli-test-host");
    assert_eq!(s["userSignedIn"], true);
    assert_eq!(s["hostMethods"], serde_json::json!(["GET_AUTH_CODE"]));
    assert!(daemon.ok(&["status"]).await.contains("host              connected (cli-test-host), 1 delegate methods"));

    const APP: &str = "wxclitest0000001";
    let launched = support::launch(&host, APP, r#"{"apiVersion":"v3"}"#).await;
    let apps = daemon.json(&["apps"]).await;
    assert_eq!(apps.as_array().map(Vec::len), Some(1), "{apps}");
    assert_eq!(apps[0]["appId"], APP);
    assert_eq!(apps[0]["instanceId"], launched.instance_id.as_str());
    assert_eq!(apps[0]["apiVersion"], "v3");
    assert_eq!(apps[0]["versionSource"], "app.json");
    let table = daemon.ok(&["apps"]).await;
    assert!(
        table.lines().any(|l| l.starts_with(APP) && l.contains(&launched.instance_id) && l.contains("v3 (app.json)")),
        "{table}"
    );
    let s = daemon.json(&["status"]).await;
    assert_eq!((s["apps"].clone(), s["instances"][0]["appId"].clone()), (1.into(), APP.into()), "{s}");

    // The renderer logs in and asks for the phone number: a session and a grant now exist.
    let renderer = RendererClient::connect(&address, &launched.launch_token).await.expect("renderer connects");
    within("login", renderer.call(v1::LoginRequest::default())).await.expect("login ok");
    within("getPhoneNumber", renderer.call(v1::GetPhoneNumberRequest {})).await.expect("getPhoneNumber ok");

    let grants = daemon.json(&["grants"]).await;
    assert_eq!(grants.as_array().map(Vec::len), Some(1), "{grants}");
    assert_eq!((grants[0]["appId"].as_str(), grants[0]["uid"].as_str()), (Some(APP), Some("u1")));
    assert_eq!(grants[0]["scope"], scope::PHONE_NUMBER);
    assert!(daemon.ok(&["grants", "--app", APP]).await.contains(scope::PHONE_NUMBER));
    assert_eq!(daemon.json(&["grants", "--uid", "someone-else"]).await, serde_json::json!([]));

    let sessions = daemon.json(&["sessions"]).await;
    assert_eq!(sessions.as_array().map(Vec::len), Some(1), "{sessions}");
    assert_eq!((sessions[0]["appId"].as_str(), sessions[0]["uid"].as_str()), (Some(APP), Some("u1")));
    assert!(sessions[0]["openid"].as_str().is_some_and(|o| !o.is_empty()));
    assert!(daemon.ok(&["sessions", "--app", APP]).await.contains("u1"));

    // The ledger: the login code (openid) and the phone code, issued to the renderer, unredeemed.
    let ledger = daemon.json(&["ledger", "--app", APP]).await;
    let whats: Vec<_> = ledger.as_array().expect("rows").iter().map(|d| d["what"].as_str().unwrap_or("?")).collect();
    assert_eq!(whats, ["openid", "phone_number"], "{ledger}");
    assert_eq!((ledger[1]["uid"].as_str(), ledger[1]["viaCode"].as_bool()), (Some("u1"), Some(true)));
    assert_eq!((ledger[1]["surface"].as_str(), ledger[1]["redeemedAtMs"].is_null()), (Some("renderer_api"), true));
    assert!(daemon.ok(&["ledger", "--uid", "u1", "--since", "1h"]).await.contains("phone_number"));
    assert_eq!(daemon.json(&["ledger", "--uid", "someone-else"]).await, serde_json::json!([]));
    assert_eq!(daemon.json(&["ledger", "--since", "2999-01-01"]).await, serde_json::json!([]));
    let bad = daemon.run(&["ledger", "--since", "last tuesday"]).await;
    assert!(!bad.status.success() && text(&bad.stderr).contains("neither a time"), "{}", text(&bad.stderr));

    // Revoking: a bad scope is refused, then the grant goes and the next call asks the host again.
    let bad = daemon.run(&["revoke", "--app", APP, "--scope", "SCOPE_EVERYTHING"]).await;
    assert!(!bad.status.success() && text(&bad.stderr).contains("unknown scope"), "{}", text(&bad.stderr));
    assert_eq!(daemon.ok(&["revoke", "--app", APP, "--uid", "u1"]).await.trim(), "revoked 1 grant(s)");
    assert_eq!(daemon.json(&["grants"]).await, serde_json::json!([]));
    assert!(daemon.ok(&["grants"]).await.contains("(none)"));

    // register-app: a secret shown once; a second time only with --rotate.
    let first = daemon.ok(&["register-app", APP]).await;
    assert!(first.starts_with(&format!("secret for {APP}")), "{first}");
    let secret = first.lines().nth(1).expect("the secret line").trim().to_owned();
    assert!(daemon.ok(&["register-app", APP]).await.contains("already has a secret; pass --rotate"));
    let rotated = daemon.json(&["register-app", APP, "--rotate"]).await;
    assert_eq!(rotated["created"], true);
    let new_secret = rotated["secret"].as_str().expect("secret");
    assert!(!new_secret.is_empty() && new_secret != secret);

    // Once the host goes, status says so.
    host.disconnect();
    within("host shows as gone", async {
        while daemon.json(&["status"]).await["hostConnected"] != false {
            tokio::task::yield_now().await;
        }
    })
    .await;
    renderer.close().await;
    assert!(daemon.stop().await.success(), "SIGTERM is a clean shutdown");
}

/// A running `dev-host` and its stdout, line by line.
struct DevHost {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    launch_token: String,
}

impl DevHost {
    async fn start(daemon: &Brokerd, app_id: &str, app_json: &str) -> DevHost {
        let mut child = daemon
            .cmd(&["dev-host", "--launch", app_id, "--profile", PROFILE, "--app-json", app_json])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn dev-host");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let (seen, launch_token) = match Self::connected(&mut lines).await {
            Ok(block) => block,
            Err(seen) => {
                let err = within("dev-host stderr", child.wait_with_output()).await.unwrap();
                panic!("dev-host exited early: {seen:?} {}", text(&err.stderr));
            }
        };
        assert!(seen[0].starts_with(&format!("dev-host connected to {}", daemon.address())), "{seen:?}");
        assert!(
            seen[0].contains("user \"dev-user-1\" signed in") && seen[0].contains("refusing SCOPE_NICKNAME"),
            "{seen:?}"
        );
        assert!(seen.iter().any(|l| l.starts_with(&format!("launched {app_id}: instance "))), "{seen:?}");
        // This daemon runs without --backend-listen, and the dev-host says how to turn it on.
        assert!(seen.iter().any(|l| l.starts_with("app backends: ") && l.contains("--backend-listen")), "{seen:?}");
        DevHost { child, lines, launch_token }
    }

    /// Reads the block the dev-host prints each time it connects, up to "answering delegate
    /// calls": its lines and the launch token in them (Err: the lines before stdout ended).
    async fn connected(lines: &mut Lines<BufReader<ChildStdout>>) -> Result<(Vec<String>, String), Vec<String>> {
        let mut seen = Vec::new();
        let mut launch_token = None;
        loop {
            let Some(line) = within("dev-host connects", lines.next_line()).await.unwrap() else { return Err(seen) };
            if let Some(token) = line.trim().strip_prefix("MINIAPP_LAUNCH_TOKEN=") {
                launch_token = Some(token.to_owned());
            }
            let done = line.starts_with("answering delegate calls");
            seen.push(line);
            if done {
                let token = launch_token.unwrap_or_else(|| panic!("a MINIAPP_LAUNCH_TOKEN line in {seen:?}"));
                return Ok((seen, token));
            }
        }
    }

    /// The next line the dev-host prints, which must report a delegate call.
    async fn next_delegate(&mut self) -> String {
        let line = within("dev-host prints the delegate call", self.lines.next_line())
            .await
            .unwrap()
            .expect("dev-host still running");
        assert!(line.starts_with("delegate "), "{line}");
        line
    }

    /// Ctrl-C: the dev-host disconnects and exits 0.
    async fn stop(mut self) {
        terminate(&self.child, libc::SIGINT);
        let status = within("dev-host exits on SIGINT", self.child.wait()).await.unwrap();
        assert!(status.success(), "dev-host exit: {status}");
    }
}

#[tokio::test]
async fn dev_host_answers_a_v1_apps_delegate_calls() {
    let mut daemon = Brokerd::start().await;
    const APP: &str = "wxdevhostv1app01";
    let mut dev = DevHost::start(&daemon, APP, r#"{"apiVersion":"v1"}"#).await;
    let s = daemon.json(&["status"]).await;
    assert_eq!((s["hostConnected"].clone(), s["hostName"].clone()), (true.into(), "dev-host".into()), "{s}");

    let renderer = RendererClient::connect(&daemon.address(), &dev.launch_token).await.expect("renderer connects");
    // login, getUserInfo and requestPayment are all the host's in v1: the dev-host answers them.
    let login = within("v1 login", renderer.call(v1::LoginRequest::default())).await.expect("login ok");
    assert_eq!(login.err_msg, "login:ok");
    assert!(login.code.starts_with("devhost-"), "the dev-host's code: {}", login.code);
    let info =
        within("v1 getUserInfo", renderer.call(v1::GetUserInfoRequest { with_credentials: false, lang: "en".into() }))
            .await
            .expect("getUserInfo ok");
    assert_eq!(info.user_info.map(|u| u.nick_name).as_deref(), Some("Dev User"));
    let paid = within("v1 requestPayment", renderer.call_request(sample_request(Api::RequestPayment)))
        .await
        .expect("payment ok");
    assert_eq!(paid.err_msg(), "requestPayment:ok");

    for api in ["login", "getUserInfo", "requestPayment"] {
        let line = dev.next_delegate().await;
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(fields[1], api, "{line}");
        assert!(fields.contains(&format!("app={APP}").as_str()) && fields.contains(&"version=v1"), "{line}");
    }
    renderer.close().await;
    dev.stop().await;
    assert!(daemon.stop().await.success());
}

#[tokio::test]
async fn dev_host_lets_a_v2_login_reach_code2session() {
    let mut daemon = Brokerd::start().await;
    const APP: &str = "wxdevhostv2app01";
    let mut dev = DevHost::start(&daemon, APP, r#"{"apiVersion":"v2"}"#).await;
    let renderer = RendererClient::connect(&daemon.address(), &dev.launch_token).await.expect("renderer connects");

    // v2: the daemon answers login itself for the dev-host's signed-in user.
    let login = within("v2 login", renderer.call(v1::LoginRequest::default())).await.expect("login ok");
    assert!(!login.code.starts_with("devhost-"), "v2 login is the daemon's: {}", login.code);
    within("v2 checkSession", renderer.call(v1::CheckSessionRequest {})).await.expect("session alive");
    // getUserInfo is still the host's: the first delegate line is it, so login never reached the host.
    within("v2 getUserInfo", renderer.call(v1::GetUserInfoRequest::default())).await.expect("getUserInfo ok");
    let line = dev.next_delegate().await;
    assert!(line.starts_with("delegate getUserInfo") && line.contains("version=v2"), "{line}");

    // The app's backend: a secret from the CLI, then code2Session.
    let registered = daemon.json(&["register-app", APP]).await;
    let secret = registered["secret"].as_str().expect("secret").to_owned();
    let mut exchange = ExchangeClient::new(connect::channel(&daemon.address()).await.expect("channel"));
    let request = v1::Code2SessionRequest { app_id: APP.into(), secret, code: login.code };
    let session = within("code2Session", exchange.code2_session(request)).await.expect("code2Session ok").into_inner();
    assert!(!session.openid.is_empty() && !session.session_key.is_empty());

    let sessions = daemon.json(&["sessions", "--app", APP]).await;
    assert_eq!(sessions[0]["uid"], "dev-user-1", "{sessions}");
    assert_eq!(sessions[0]["openid"], session.openid.as_str());
    renderer.close().await;
    dev.stop().await;
    assert!(daemon.stop().await.success());
}

#[tokio::test]
async fn demo_runs_with_nothing_unexpected() {
    let dir = tempfile::tempdir().unwrap();
    let out = within("demo", bin(dir.path()).arg("demo").output()).await.unwrap();
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{}", text(&out.stderr));
    let summary = stdout.lines().last().unwrap_or_default();
    assert!(summary.starts_with("demo: ") && summary.ends_with(", 4 expected failures, 0 unexpected"), "{summary}");
    for version in ["v1", "v2", "v3"] {
        assert!(
            stdout.lines().any(|l| l.starts_with(version) && l.contains("login:ok")),
            "{version} login line:\n{stdout}"
        );
    }
    // The app backend's exchange over real HTTP, on the demo daemon's backend HTTP API.
    for (what, shows) in [
        ("http GET /sns/jscode2session", "openid=o"),
        ("http POST getuserphonenumber", "phoneNumber=13800138000"),
        ("http POST getuseremail", "email=demo-user-1@"),
    ] {
        assert!(
            stdout.lines().any(|l| l.starts_with("v2") && l.contains(what) && l.contains(shows)),
            "{what}:\n{stdout}"
        );
    }
}

/// Starts `serve` the way systemd does: a listening socket on fd 3, LISTEN_FDS=1, and LISTEN_PID
/// naming the daemon (a `sh` wrapper sets it to its own pid, then `exec`s the daemon, keeping it).
fn socket_activated(dir: &Path, listener: &std::os::unix::net::UnixListener, listen_pid: &str, notify: &Path) -> Child {
    let mut c = Command::new("sh");
    clean(&mut c, dir);
    let script = r#"LISTEN_PID="${LISTEN_PID:-$$}"; LISTEN_FDS=1; export LISTEN_PID LISTEN_FDS; exec "$0" "$@""#;
    c.arg("-c").arg(script).arg(BIN).arg("serve");
    c.arg("--socket").arg(dir.join("own.sock")).arg("--data-dir").arg(dir.join("data")).arg("--ephemeral");
    if !listen_pid.is_empty() {
        c.env("LISTEN_PID", listen_pid);
    }
    c.env("NOTIFY_SOCKET", notify).stdout(Stdio::null()).stderr(std::fs::File::create(dir.join("daemon.log")).unwrap());
    let fd = listener.as_raw_fd();
    // SAFETY: only async-signal-safe calls (dup2, fcntl) between fork and exec.
    unsafe {
        c.pre_exec(move || {
            if fd == 3 {
                // Already fd 3: just let it survive exec.
                if libc::fcntl(3, libc::F_SETFD, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, 3) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    c.spawn().expect("spawn sh wrapper")
}

#[tokio::test]
async fn serve_takes_a_socket_activated_listener_and_notifies_readiness() {
    // (LISTEN_PID: "" = the daemon's own pid, whether the daemon must use the passed socket)
    for (listen_pid, activated) in [("", true), ("1", false)] {
        let dir = tempfile::Builder::new().prefix("brokerd-sd").tempdir().unwrap();
        let activated_path = dir.path().join("activated.sock");
        let own_path = dir.path().join("own.sock");
        let listener = std::os::unix::net::UnixListener::bind(&activated_path).unwrap();
        // The operator provisioned the host token, so a host can start before the daemon does.
        let token = "provisioned-host-token-0123456789";
        std::fs::DirBuilder::new().mode(0o700).create(dir.path().join("data")).unwrap();
        std::fs::write(dir.path().join("data/host.token"), format!("{token}\n")).unwrap();
        let notify = Notify::bind(dir.path());
        let mut child = socket_activated(dir.path(), &listener, listen_pid, &notify.path);
        drop(listener);
        let host = HostBuilder::new(&activated_path.display().to_string(), token).user(user("u-sd"));
        // Socket activation's promise: a client that connects before the daemon is ready waits in
        // the listen backlog instead of failing.
        let early_host = activated.then(|| tokio::spawn(host.clone().connect()));
        notify.ready(&mut child, &dir.path().join("daemon.log")).await;

        let (serving, unused) = if activated { (&activated_path, &own_path) } else { (&own_path, &activated_path) };
        let mut daemon =
            Brokerd { child, socket: serving.clone(), token_file: dir.path().join("data/host.token"), dir };
        let s = daemon.json(&["status"]).await;
        assert_eq!(s["listenAddress"], serving.display().to_string(), "LISTEN_PID={listen_pid:?}: {s}");
        if !activated {
            assert_eq!(s["hostConnected"], false);
        }

        // A host and a renderer talk through whichever socket the daemon serves.
        let host = match early_host {
            Some(early) => within("early host", early).await.unwrap().expect("the early host is served"),
            None => HostBuilder::new(&daemon.address(), &daemon.token())
                .user(user("u-sd"))
                .connect()
                .await
                .expect("host connects"),
        };
        host_published(&host).await;
        assert_eq!(daemon.json(&["status"]).await["hostConnected"], true);
        let launched = support::launch(&host, "wxactivated00001", r#"{"apiVersion":"v2"}"#).await;
        let renderer =
            RendererClient::connect(&daemon.address(), &launched.launch_token).await.expect("renderer connects");
        let login = within("login", renderer.call(v1::LoginRequest::default())).await.expect("login ok");
        assert_eq!(login.err_msg, "login:ok");
        renderer.close().await;
        host.disconnect();

        let status = daemon.stop().await;
        assert!(status.success(), "LISTEN_PID={listen_pid:?}: exit {status}");
        if activated {
            assert!(!unused.exists(), "an activated daemon binds nothing itself");
            assert!(activated_path.exists(), "the activated socket belongs to systemd: the daemon must not unlink it");
        }
    }
}

#[tokio::test]
async fn the_first_status_starts_an_on_demand_daemon() {
    // systemd-socket-activate (from systemd) holds the socket and starts the daemon only when the
    // first client connects, as the user units do; the token file does not exist until then.
    let Ok(found) = std::process::Command::new("sh").args(["-c", "command -v systemd-socket-activate"]).output() else {
        return println!("skipped: no sh");
    };
    if !found.status.success() {
        return println!("skipped: systemd-socket-activate is not installed");
    }
    let dir = tempfile::Builder::new().prefix("brokerd-ondemand").tempdir().unwrap();
    let socket = dir.path().join("brokerd.sock");
    let mut c = Command::new("systemd-socket-activate");
    clean(&mut c, dir.path());
    c.arg("-l").arg(&socket).arg(BIN).arg("serve").arg("--data-dir").arg(dir.path().join("data")).arg("--ephemeral");
    let mut child = c.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("spawn systemd-socket-activate");
    // It reports "Listening on <path> as 3." once the socket is bound.
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    within("systemd-socket-activate listens", async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.starts_with("Listening on ") {
                return;
            }
        }
        panic!("systemd-socket-activate exited");
    })
    .await;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let token_file = dir.path().join("data/host.token");
    assert!(!token_file.exists());

    let mut daemon = Brokerd { child, socket: socket.clone(), token_file, dir };
    let s = daemon.json(&["status"]).await;
    assert_eq!(s["listenAddress"], socket.display().to_string(), "{s}");
    assert_eq!(s["hostConnected"], false);
    let status = daemon.stop().await;
    assert!(status.success(), "exit {status}");
}

/// What `grpcurl -unix ... list` and a health probe do: server reflection names every service the
/// contract defines (and can describe their files), and health checking reports each one serving.
#[tokio::test]
async fn reflection_and_health_serve_standard_tools() {
    use tokio_stream::StreamExt as _;
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };

    let daemon = support::Daemon::start().await;
    let channel = connect::channel(&daemon.address()).await.expect("channel");

    let mut reflection = ServerReflectionClient::new(channel.clone());
    let requests = [
        MessageRequest::ListServices(String::new()),
        MessageRequest::FileContainingSymbol("miniapp.broker.v1.OpenApi".into()),
    ]
    .map(|m| ServerReflectionRequest { host: String::new(), message_request: Some(m) });
    let mut answers = within("reflection", reflection.server_reflection_info(tokio_stream::iter(requests)))
        .await
        .expect("reflection answers")
        .into_inner();
    let Some(Ok(first)) = within("list", answers.next()).await else { panic!("no list answer") };
    let Some(MessageResponse::ListServicesResponse(list)) = first.message_response else {
        panic!("not a list: {first:?}")
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    for expected in [
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "miniapp.broker.v1.Admin",
        "miniapp.broker.v1.Exchange",
        "miniapp.broker.v1.Host",
        "miniapp.broker.v1.OpenApi",
    ] {
        assert!(names.iter().any(|n| n == expected), "{expected} missing from {names:?}");
    }
    let Some(Ok(second)) = within("describe", answers.next()).await else { panic!("no describe answer") };
    let Some(MessageResponse::FileDescriptorResponse(files)) = second.message_response else {
        panic!("not files: {second:?}")
    };
    assert!(!files.file_descriptor_proto.is_empty(), "OpenApi's file is described");

    let mut health = HealthClient::new(channel);
    for service in ["", "miniapp.broker.v1.OpenApi", "miniapp.broker.v1.Host"] {
        let answer = within("health", health.check(HealthCheckRequest { service: service.into() }))
            .await
            .unwrap_or_else(|s| panic!("health {service:?}: {s}"))
            .into_inner();
        assert_eq!(answer.status, ServingStatus::Serving as i32, "{service:?}");
    }
    let unknown = within("health", health.check(HealthCheckRequest { service: "no.such.Service".into() })).await;
    assert_eq!(unknown.expect_err("unknown service").code(), tonic::Code::NotFound);
    daemon.stop().await;
}

/// A daemon restart does not end a mini app developer's session: the dev-host waits for the daemon
/// to come back, connects again, launches its apps again and prints their new launch tokens.
#[tokio::test]
async fn dev_host_reconnects_after_the_daemon_restarts() {
    let mut daemon = Brokerd::start().await;
    const APP: &str = "wxdevhostrestart";
    let mut dev = DevHost::start(&daemon, APP, r#"{"apiVersion":"v1"}"#).await;
    let before = dev.launch_token.clone();

    daemon.restart().await;
    let (seen, after) = DevHost::connected(&mut dev.lines).await.expect("the dev-host connects again");
    assert!(seen[0].starts_with(&format!("dev-host connected to {}", daemon.address())), "{seen:?}");
    assert_ne!(after, before, "a new instance after the restart");

    let renderer = RendererClient::connect(&daemon.address(), &after).await.expect("renderer connects");
    let login = within("v1 login after the restart", renderer.call(v1::LoginRequest::default())).await.expect("login");
    assert!(login.code.starts_with("devhost-"), "answered by the dev-host: {}", login.code);
    assert!(dev.next_delegate().await.starts_with("delegate login"));
    renderer.close().await;
    dev.stop().await;
    assert!(daemon.stop().await.success());
}
