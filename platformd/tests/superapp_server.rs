//! The superapp's server vouching through the platform service: a real `miniapp-platformd` whose
//! tenant was added with `--server-url`, a real daemon in remote mode with the dev-host as its
//! host, and the dev-host's superapp server checking the signature by the public key
//! `superapp public-key` printed. Whatever the renderer or the backend gets of the user comes from
//! that server; the host's profile is empty. Then a server that stalls, and a host that lies.

mod support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{Router, body::Bytes, http::HeaderMap, routing};
use miniapp_broker_client::{
    HostClient, RendererClient,
    proto::{
        platform::v1::{self as pv1, platform_client::PlatformClient},
        v1::{self, SignedInUser, UserProfile},
    },
};
use miniapp_brokerd::{
    dev_host::{DevHostConfig, DevUser},
    dev_superapp::DevSuperapp,
    superapp::{PlatformPublicKey, contract},
};
use serde_json::{Value, json};
use support::{APP, Http, Instance, command_json, within};
use tokio::{net::TcpListener, process::Command};
use tokio_util::sync::CancellationToken;

fn alice() -> DevUser {
    DevUser {
        uid: "alice".into(),
        nick_name: "Alice".into(),
        avatar_url: "https://example.invalid/alice.png".into(),
        phone_number: "15800002850".into(),
        email: "alice@example.invalid".into(),
    }
}

fn empty(uid: &str) -> DevUser {
    DevUser {
        uid: uid.into(),
        nick_name: String::new(),
        avatar_url: String::new(),
        phone_number: String::new(),
        email: String::new(),
    }
}

/// The dev-host's superapp server behind a switch: with `stall` set, every request hangs (the
/// server is up but never answers).
struct Switchable {
    server: Arc<DevSuperapp>,
    stall: AtomicBool,
}

async fn serve_switchable(listener: TcpListener, s: Arc<Switchable>, stop: CancellationToken) {
    let mut router = Router::new();
    for path in contract::ALL_PATHS {
        let s = s.clone();
        router = router.route(
            path,
            routing::post(move |headers: HeaderMap, body: Bytes| {
                let s = s.clone();
                async move {
                    if s.stall.load(Ordering::SeqCst) {
                        std::future::pending::<()>().await;
                    }
                    s.server.answer(path, &headers, &body).to_string()
                }
            }),
        );
    }
    tokio::spawn(async move {
        axum::serve(listener, router).with_graceful_shutdown(stop.cancelled_owned()).await.unwrap();
    });
}

/// A platform (SQLite) with the tenant `acme` whose server is the dev-host's, and an app of it.
struct Chain {
    _dir: tempfile::TempDir,
    instance: Instance,
    superapp: Arc<Switchable>,
    client_key: String,
    client_secret: String,
    app_secret: String,
    stop: CancellationToken,
}

async fn chain(users: Vec<DevUser>) -> Chain {
    chain_trusting(users, None).await
}

/// [`chain`] whose superapp server trusts `key` instead of the key `superapp public-key` printed.
async fn chain_trusting(users: Vec<DevUser>, key: Option<PlatformPublicKey>) -> Chain {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("platform.db").display());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server_url = format!("http://{}", listener.local_addr().unwrap());
    let sa =
        command_json(&["superapp", "add", "acme", "--server-url", &server_url, "--json", "--database-url", &db]).await;
    let app = command_json(&["register-app", APP, "--superapp", "acme", "--json", "--database-url", &db]).await;
    let pem = public_key(&db).await;
    assert_eq!(pem, public_key(&db).await, "the key pair is made once and kept");
    let client_key = sa["client_key"].as_str().unwrap().to_owned();
    let trusted = key.unwrap_or_else(|| PlatformPublicKey::from_pem(&pem).unwrap());
    let server = Arc::new(DevSuperapp::new(users, &client_key, trusted));
    let superapp = Arc::new(Switchable { server, stall: AtomicBool::new(false) });
    let stop = CancellationToken::new();
    serve_switchable(listener, superapp.clone(), stop.clone()).await;
    let instance = Instance::start_with(&db, "127.0.0.1:0", "127.0.0.1:0", &["--superapp-timeout-ms", "400"]).await;
    Chain {
        _dir: dir,
        instance,
        superapp,
        client_key,
        client_secret: sa["client_secret"].as_str().unwrap().to_owned(),
        app_secret: app["secret"].as_str().unwrap().to_owned(),
        stop,
    }
}

async fn public_key(db: &str) -> String {
    let out = within(
        "public-key",
        Command::new(support::BIN).args(["superapp", "public-key", "acme", "--database-url", db]).output(),
    )
    .await
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let pem = String::from_utf8(out.stdout).unwrap();
    assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----"), "{pem}");
    pem
}

/// A daemon in remote mode pointed at the chain's platform, with the dev-host (signing in `uid`
/// with an empty profile; its getAuthCode answers the superapp server's authCodes for `auth_as`)
/// and a renderer of the app at `version`.
struct Desktop {
    _dir: tempfile::TempDir,
    server: miniapp_brokerd::Server,
    host: HostClient,
    renderer: RendererClient,
}

async fn desktop(c: &Chain, host_user: &str, auth_as: &str, version: &str, timeout_ms: u64) -> Desktop {
    let (dir, server) = c.remote_daemon(timeout_ms).await;
    // The dev-host's getAuthCode issues the superapp server's authCodes for the user it signs in:
    // a host that lies signs in `host_user` while its authCodes are `auth_as`'s.
    let profile = DevHostConfig { user: empty(auth_as), ..Default::default() };
    let builder = miniapp_brokerd::dev_host::builder(
        server.address(),
        server.host_token(),
        &profile,
        Arc::new(|_| {}),
        Some(c.superapp.server.clone()),
    )
    .user(SignedInUser { uid: host_user.into(), profile: Some(UserProfile::default()) });
    let host = within("dev-host", builder.connect()).await.expect("dev-host connects");
    let launch = host.launch_app(APP, &format!(r#"{{"apiVersion":"{version}"}}"#)).await.unwrap();
    let renderer = RendererClient::connect(server.address(), &launch.launch_token).await.unwrap();
    Desktop { _dir: dir, server, host, renderer }
}

impl Chain {
    /// A daemon in remote mode pointed at this platform with the tenant's credentials, each call
    /// to it at most `timeout_ms`; its data dir lives as long as the returned guard.
    async fn remote_daemon(&self, timeout_ms: u64) -> (tempfile::TempDir, miniapp_brokerd::Server) {
        let dir = tempfile::Builder::new().prefix("brokerd-vouched").tempdir().unwrap();
        let secret_file = dir.path().join("client.secret");
        std::fs::write(&secret_file, &self.client_secret).unwrap();
        let mut config = miniapp_brokerd::Config::ephemeral_in(dir.path());
        config.platform.url = Some(format!("http://{}", self.instance.daemon));
        config.platform.client_key = Some(self.client_key.clone());
        config.platform.client_secret_file = Some(secret_file);
        config.platform.timeout_ms = timeout_ms;
        let server = miniapp_brokerd::start(config).await.expect("daemon starts in remote mode");
        (dir, server)
    }

    fn url(&self) -> String {
        self.instance.url()
    }

    async fn token(&self, http: &Http) -> String {
        let path = format!("/cgi-bin/token?grant_type=client_credential&appid={APP}&secret={}", self.app_secret);
        let (_, token) = http.get(&self.url(), &path).await;
        token["access_token"].as_str().unwrap_or_else(|| panic!("a token: {token}")).to_owned()
    }

    async fn session(&self, http: &Http, code: &str) -> Value {
        http.get(&self.url(), &support::session_path(&self.app_secret, code)).await.1
    }

    async fn daemon_client(&self) -> PlatformClient<tonic::transport::Channel> {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", self.instance.daemon)).unwrap();
        PlatformClient::new(within("connect", endpoint.connect()).await.unwrap())
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(message);
        r.metadata_mut().insert("client-key", self.client_key.parse().unwrap());
        r.metadata_mut().insert("client-secret", self.client_secret.parse().unwrap());
        r
    }
}

#[tokio::test]
async fn through_the_service_every_value_comes_from_the_superapps_server() {
    let c = chain(vec![alice()]).await;
    let http = Http::new();
    let d = desktop(&c, "alice", "alice", "v3", 5_000).await;

    // v3 login: the authCode is redeemed at the server; the backend gets alice's openid.
    let code = within("login", d.renderer.call(v1::LoginRequest::default())).await.expect("login").code;
    let session = c.session(&http, &code).await;
    let openid = session["openid"].as_str().unwrap_or_else(|| panic!("a session: {session}")).to_owned();
    assert!(session.get("auth_code").is_none_or(|a| a == ""), "the authCode was spent: {session}");
    let again = within("login", d.renderer.call(v1::LoginRequest::default())).await.expect("login again").code;
    assert_eq!(c.session(&http, &again).await["openid"], openid.as_str(), "one openid per (app, user)");

    // Phone and e-mail: the host's profile has neither; the backend gets the server's.
    let token = c.token(&http).await;
    let phone_code = within("phone", d.renderer.call(v1::GetPhoneNumberRequest {})).await.expect("phone").code;
    let (_, phone) = http
        .post(&c.url(), &format!("/wxa/business/getuserphonenumber?access_token={token}"), &json!({"code": phone_code}))
        .await;
    assert_eq!(phone["phone_info"]["phoneNumber"], "15800002850", "{phone}");
    let email_code = within("email", d.renderer.call(v1::GetEmailRequest {})).await.expect("email").code;
    let (_, email) = http
        .post(&c.url(), &format!("/wxa/business/getuseremail?access_token={token}"), &json!({"code": email_code}))
        .await;
    assert!(email.to_string().contains("alice@example.invalid"), "{email}");

    // Avatar and nickname, to the renderer.
    let avatar = within("avatar", d.renderer.call(v1::ChooseAvatarRequest {})).await.expect("avatar");
    assert_eq!(avatar.avatar_url, "https://example.invalid/alice.png");
    let nick = within("nick", d.renderer.call(v1::GetNickNameRequest {})).await.expect("nickname");
    assert_eq!(nick.nick_name, "Alice");

    // The daemon's ledger holds what went out, and sees the platform's redemptions.
    let rows = within("ledger", d.host.ledger(APP, "alice", 0)).await.unwrap();
    for what in ["openid", "phone_number", "email", "avatar", "nickname"] {
        assert!(rows.iter().any(|r| r.what == what), "{what} on record: {rows:?}");
    }
    assert!(rows.iter().any(|r| r.what == "phone_number" && r.redeemed_at_ms > 0), "{rows:?}");

    // A daemon of this superapp cannot hand the platform a value of its own for a vouched app.
    let mut client = c.daemon_client().await;
    let refused = client
        .issue_value_code(c.request(pv1::IssueValueCodeRequest {
            app_id: APP.into(),
            uid: "alice".into(),
            kind: pv1::ValueKind::PhoneNumber as i32,
            value: "+1 555 0100".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
    let vouching = client.vouching(c.request(pv1::VouchingRequest { app_id: APP.into() })).await.unwrap();
    assert!(vouching.into_inner().vouched);
    d.server.shutdown().await;
    c.stop.cancel();
}

#[tokio::test]
async fn a_host_claiming_bob_with_alices_auth_code_gets_no_code_for_either_through_the_service() {
    let c = chain(vec![alice(), DevUser { uid: "bob".into(), ..alice() }]).await;
    let d = desktop(&c, "bob", "alice", "v3", 5_000).await;
    let failure = within("login", d.renderer.call(v1::LoginRequest::default())).await.unwrap_err();
    assert_eq!((failure.errno, failure.reason.as_str()), (1021, "auth_code_refused"), "{failure:?}");
    // No session for bob (nor for alice, whose authCode it was).
    let check = within("checkSession", d.renderer.call(v1::CheckSessionRequest {})).await.unwrap_err();
    assert!(check.err_msg.contains("session expired") || check.errno != 0, "{check:?}");
    for uid in ["alice", "bob"] {
        let rows = within("ledger", d.host.ledger(APP, uid, 0)).await.unwrap();
        assert!(rows.is_empty(), "nothing recorded for {uid}: {rows:?}");
    }
    let mut client = c.daemon_client().await;
    for uid in ["alice", "bob"] {
        let check = client
            .check_session(c.request(pv1::CheckSessionRequest { app_id: APP.into(), uid: uid.into() }))
            .await
            .unwrap_err();
        assert_eq!(check.code(), tonic::Code::FailedPrecondition, "{uid}: {check:?}");
    }
    d.server.shutdown().await;
    c.stop.cancel();
}

#[tokio::test]
async fn an_unknown_user_gets_no_login_and_a_stalled_server_fails_each_call_by_its_deadline() {
    let c = chain(vec![alice()]).await;
    let http = Http::new();
    // v2: checkUser must know the user.
    let stranger = desktop(&c, "mallory", "mallory", "v2", 5_000).await;
    let failure = within("login", stranger.renderer.call(v1::LoginRequest::default())).await.unwrap_err();
    assert_eq!((failure.errno, failure.reason.as_str()), (1020, "unknown_user"), "{failure:?}");
    stranger.server.shutdown().await;

    let d = desktop(&c, "alice", "alice", "v2", 5_000).await;
    let code = within("login", d.renderer.call(v1::LoginRequest::default())).await.expect("v2 login").code;
    assert!(c.session(&http, &code).await["openid"].is_string());
    let phone_code = within("phone", d.renderer.call(v1::GetPhoneNumberRequest {})).await.expect("phone").code;

    // The server now stalls: the platform's 400 ms deadline ends each call with a clear error.
    c.superapp.stall.store(true, Ordering::SeqCst);
    let started = Instant::now();
    let failure = within("login", d.renderer.call(v1::LoginRequest::default())).await.unwrap_err();
    assert_eq!((failure.errno, failure.reason.as_str()), (1019, "superapp_unavailable"), "{failure:?}");
    assert!(started.elapsed() < Duration::from_secs(3), "ended by the deadline: {:?}", started.elapsed());
    let started = Instant::now();
    let failure = within("nick", d.renderer.call(v1::GetNickNameRequest {})).await.unwrap_err();
    assert_eq!(failure.errno, 1019, "{failure:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
    // The backend redeeming the phone code hears WeChat's "system busy" by the deadline.
    let token = c.token(&http).await;
    let started = Instant::now();
    let (_, busy) = http
        .post(&c.url(), &format!("/wxa/business/getuserphonenumber?access_token={token}"), &json!({"code": phone_code}))
        .await;
    assert_eq!((busy["errcode"].as_i64(), busy["errmsg"].as_str()), (Some(-1), Some("system busy")), "{busy}");
    assert!(started.elapsed() < Duration::from_secs(3));

    // Back up: the platform recovers by itself.
    c.superapp.stall.store(false, Ordering::SeqCst);
    let code = within("login", d.renderer.call(v1::LoginRequest::default())).await.expect("login once more").code;
    assert!(c.session(&http, &code).await["openid"].is_string());
    d.server.shutdown().await;
    c.stop.cancel();
}

#[tokio::test]
async fn an_auth_code_is_redeemed_once_and_a_server_refusing_the_signature_fails_the_login() {
    let c = chain(vec![alice()]).await;
    let once = c.superapp.server.issue_auth_code("alice", &[]).expect("an authCode");
    let (_dir, server) = c.remote_daemon(miniapp_brokerd::Config::default().platform.timeout_ms).await;
    // A host whose getAuthCode answers the same authCode every time.
    let host = miniapp_broker_client::HostBuilder::new(server.address(), server.host_token())
        .user(SignedInUser { uid: "alice".into(), profile: Some(UserProfile::default()) })
        .get_auth_code(move |_app, req: v1::GetAuthCodeRequest| {
            let once = once.clone();
            async move {
                Ok(v1::GetAuthCodeResponse { auth_code: once, auth_success_scopes: req.scopes, ..Default::default() })
            }
        });
    let host = within("host", host.connect()).await.expect("host connects");
    let launch = host.launch_app(APP, r#"{"apiVersion":"v3"}"#).await.unwrap();
    let renderer = RendererClient::connect(server.address(), &launch.launch_token).await.unwrap();
    let code = within("login", renderer.call(v1::LoginRequest::default())).await.expect("the first login").code;
    assert!(c.session(&Http::new(), &code).await["openid"].is_string());
    let replay = within("login", renderer.call(v1::LoginRequest::default())).await.unwrap_err();
    assert_eq!((replay.errno, replay.reason.as_str()), (1021, "auth_code_refused"), "{replay:?}");
    server.shutdown().await;
    c.stop.cancel();

    // A server that trusts another key refuses every request: no login.
    let other = miniapp_brokerd::superapp::PlatformKey::generate().unwrap().public_key();
    let c = chain_trusting(vec![alice()], Some(other)).await;
    let d = desktop(&c, "alice", "alice", "v2", 5_000).await;
    let refused = within("login", d.renderer.call(v1::LoginRequest::default())).await.unwrap_err();
    assert_eq!((refused.errno, refused.reason.as_str()), (1019, "superapp_unavailable"), "{refused:?}");
    d.server.shutdown().await;
    c.stop.cancel();
}
