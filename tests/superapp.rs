//! The superapp server contract over real HTTP: the platform's signed client against the
//! dev-host's superapp server (every call, its signature checks, authCodes and temporary codes
//! redeemed once) and against hostile servers (stalling, garbage, oversized, refusing, lying), and
//! the platform's signature checked by Python's `cryptography`, which shares no code with it.
//! Then the whole chain: a real daemon whose embedded platform the superapp server vouches for,
//! a real host, renderer and backend (the gRPC Exchange service and the backend HTTP API).

mod support;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Bytes,
    http::{HeaderMap, StatusCode, header::CONTENT_TYPE},
    routing,
};
use miniapp_broker_client::{
    connect,
    proto::v1::{self, SignedInUser, UserProfile, exchange_client::ExchangeClient},
};
use miniapp_brokerd::{
    dev_host::DevUser,
    dev_superapp::DevSuperapp,
    superapp::{
        ClientSettings, InfoType, PlatformKey, SuperappClient, SuperappError, contract,
        signing::{HEADER_CLIENT_KEY, HEADER_SIGNATURE, HEADER_TIMESTAMP, timestamp},
    },
};
use prost::Message;
use support::within;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const CLIENT_KEY: &str = "test-client-key";

fn alice() -> DevUser {
    DevUser {
        uid: "alice".into(),
        nick_name: "Alice".into(),
        avatar_url: "https://example.invalid/alice.png".into(),
        phone_number: "15800002850".into(),
        email: "alice@example.invalid".into(),
    }
}

fn bob() -> DevUser {
    DevUser { uid: "bob".into(), nick_name: "Bob".into(), phone_number: String::new(), ..alice() }
}

/// One key pair for the whole test binary (RSA key generation is the slow part), in a key file
/// the daemons of these tests are configured with (`superapp.key_file`).
fn key_file() -> &'static (tempfile::TempDir, std::path::PathBuf, Arc<PlatformKey>) {
    static KEY: std::sync::OnceLock<(tempfile::TempDir, std::path::PathBuf, Arc<PlatformKey>)> =
        std::sync::OnceLock::new();
    KEY.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/platform.key");
        let key = Arc::new(miniapp_brokerd::platform_key(&path).expect("a key pair"));
        (dir, path, key)
    })
}

fn key() -> Arc<PlatformKey> {
    key_file().2.clone()
}

fn settings(address: SocketAddr, timeout_ms: u64) -> ClientSettings {
    ClientSettings {
        server_url: format!("http://{address}"),
        client_key: CLIENT_KEY.into(),
        timeout: Duration::from_millis(timeout_ms),
        max_answer_bytes: 16 * 1024,
        max_in_flight: 4,
    }
}

/// The dev-host's superapp server on a free port, trusting `key`'s public half.
async fn dev_server(key: &PlatformKey, stop: &CancellationToken) -> (Arc<DevSuperapp>, SocketAddr) {
    let server = Arc::new(DevSuperapp::new([alice(), bob()], CLIENT_KEY, key.public_key()));
    let address = server.clone().spawn("127.0.0.1:0".parse().unwrap(), stop.clone()).await.expect("bind");
    (server, address)
}

/// A server answering every path with `router`'s answer, on a free port until `stop`.
async fn serve(router: Router, stop: &CancellationToken) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let stop = stop.clone();
    tokio::spawn(async move { axum::serve(listener, router).with_graceful_shutdown(stop.cancelled_owned()).await });
    address
}

/// A superapp server that answers every path with `status` and `body`.
async fn answering(status: StatusCode, body: &'static str, stop: &CancellationToken) -> SocketAddr {
    serve(Router::new().fallback(move || async move { (status, [(CONTENT_TYPE, "application/json")], body) }), stop)
        .await
}

#[tokio::test]
async fn every_call_of_the_contract_works_against_the_dev_hosts_server() {
    let stop = CancellationToken::new();
    let key = key();
    let (server, address) = dev_server(&key, &stop).await;
    let client = SuperappClient::new(&settings(address, 5_000), key.clone()).unwrap();

    assert_eq!(within("checkUser", client.check_user("alice")).await, Ok(true));
    assert_eq!(client.check_user("mallory").await, Ok(false));
    assert_eq!(client.avatar("alice").await.as_deref(), Ok("https://example.invalid/alice.png"));
    assert_eq!(client.nickname("bob").await.as_deref(), Ok("Bob"));
    assert!(matches!(client.nickname("mallory").await, Err(SuperappError::Refused { code, .. }) if code == "2001"));

    // Phone and e-mail: a temporary code with the masked value, redeemed once for the value.
    let phone = client.temporary_code("alice", InfoType::Phone).await.unwrap();
    assert_eq!(phone.data, "158****2850");
    assert!(
        matches!(client.value("bob", InfoType::Phone, &phone.code).await, Err(SuperappError::Refused { .. })),
        "another user's temporary code"
    );
    assert!(
        matches!(client.value("alice", InfoType::Email, &phone.code).await, Err(SuperappError::Refused { .. })),
        "a phone code for the e-mail"
    );
    assert_eq!(client.value("alice", InfoType::Phone, &phone.code).await.as_deref(), Ok("15800002850"));
    assert!(
        matches!(client.value("alice", InfoType::Phone, &phone.code).await, Err(SuperappError::Refused { code, .. }) if code == "2003"),
        "a temporary code is redeemed once"
    );
    let email = client.temporary_code("alice", InfoType::Email).await.unwrap();
    assert_eq!(email.data, "al****ce@example.invalid");
    assert_eq!(client.value("alice", InfoType::Email, &email.code).await.as_deref(), Ok("alice@example.invalid"));
    assert!(
        matches!(client.temporary_code("bob", InfoType::Phone).await, Err(SuperappError::Refused { code, .. }) if code == "2002"),
        "bob has no phone number"
    );

    // v3: the host's authCode names its user, once.
    let scopes = vec!["SCOPE_PHONE_NUMBER".to_owned()];
    let auth_code = server.issue_auth_code("alice", &scopes).unwrap();
    let grant = client.redeem_auth_code(&auth_code).await.unwrap();
    assert_eq!((grant.user_id.as_str(), grant.auth_success_scopes), ("alice", scopes));
    assert!(!grant.access_token.is_empty());
    assert!(
        matches!(client.redeem_auth_code(&auth_code).await, Err(SuperappError::Refused { code, .. }) if code == "2005"),
        "an authCode is redeemed once"
    );
    assert!(
        matches!(client.redeem_auth_code("made-up").await, Err(SuperappError::Refused { code, .. }) if code == "2004")
    );
    stop.cancel();
}

#[tokio::test]
async fn the_dev_hosts_server_refuses_requests_the_platform_did_not_sign() {
    let stop = CancellationToken::new();
    let key = key();
    let (_server, address) = dev_server(&key, &stop).await;
    let refused = |e: Result<bool, SuperappError>| match e {
        Err(SuperappError::Refused { code, .. }) => code,
        other => panic!("expected a refusal, got {other:?}"),
    };

    // Another key pair: a platform whose public key the superapp did not install.
    let stranger = Arc::new(PlatformKey::generate().unwrap());
    let client = SuperappClient::new(&settings(address, 5_000), stranger).unwrap();
    assert_eq!(refused(client.check_user("alice").await), "1003");
    // The right key, the wrong client key.
    let wrong_client = ClientSettings { client_key: "someone-else".into(), ..settings(address, 5_000) };
    let client = SuperappClient::new(&wrong_client, key.clone()).unwrap();
    assert_eq!(refused(client.check_user("alice").await), "1001");

    // By hand: a signature over another body, a stale timestamp, none at all.
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let post = |body: &'static str, stamp: String, signature: Option<String>| {
        let mut request = axum::http::Request::post(format!("http://{address}{}", contract::CHECK_USER))
            .header(HEADER_CLIENT_KEY, CLIENT_KEY)
            .header(HEADER_TIMESTAMP, stamp);
        if let Some(signature) = signature {
            request = request.header(HEADER_SIGNATURE, signature);
        }
        let request = request.body(http_body_util::Full::new(Bytes::from(body))).unwrap();
        let http = http.clone();
        async move {
            let response = http.request(request).await.unwrap();
            let body = http_body_util::BodyExt::collect(response.into_body()).await.unwrap().to_bytes();
            serde_json::from_slice::<serde_json::Value>(&body).unwrap()["returnCode"].as_str().unwrap().to_owned()
        }
    };
    let sign = |body: &str, stamp: &str| {
        key.sign(&miniapp_brokerd::superapp::signing::string_to_sign(contract::CHECK_USER, body.as_bytes(), stamp))
    };
    let now = timestamp(time::OffsetDateTime::now_utc());
    let body = r#"{"userId":"alice"}"#;
    assert_eq!(post(body, now.clone(), Some(sign(body, &now))).await, "0", "the hand-made request is right");
    assert_eq!(post(body, now.clone(), Some(sign(r#"{"userId":"bob"}"#, &now))).await, "1003", "another body");
    let stale = timestamp(time::OffsetDateTime::now_utc() - Duration::from_secs(600));
    assert_eq!(post(body, stale.clone(), Some(sign(body, &stale))).await, "1002", "ten minutes old");
    assert_eq!(post(body, now.clone(), None).await, "1003", "unsigned");
    assert_eq!(post(body, now.clone(), Some("AAAA".into())).await, "1003", "not a signature");
    stop.cancel();
}

#[tokio::test]
async fn a_hostile_server_ends_each_call_in_a_clear_error_by_its_deadline() {
    let stop = CancellationToken::new();
    let key = key();
    let call = |address: SocketAddr, timeout_ms: u64| {
        let client = SuperappClient::new(&settings(address, timeout_ms), key.clone()).unwrap();
        async move { client.check_user("alice").await }
    };

    // Stalls: answers nothing, ever.
    let stalls = serve(Router::new().fallback(std::future::pending::<&'static str>), &stop).await;
    let started = Instant::now();
    assert_eq!(within("stall", call(stalls, 300)).await, Err(SuperappError::Timeout(300)));
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(300) && took < Duration::from_secs(3), "took {took:?}");

    // Sends headers, then dribbles a body that never ends: the deadline covers the body too.
    let dribbles = serve(
        Router::new().fallback(|| async {
            let chunks = futures::stream::unfold((), |()| async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Some((Ok::<_, std::io::Error>(Bytes::from_static(b" ")), ()))
            });
            axum::body::Body::from_stream(chunks)
        }),
        &stop,
    )
    .await;
    assert_eq!(within("dribble", call(dribbles, 300)).await, Err(SuperappError::Timeout(300)));

    // Down: nothing listens there.
    let down = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    assert!(matches!(within("down", call(down, 2_000)).await, Err(SuperappError::Unreachable(_))));

    // Garbage, an oversized answer, an HTTP error, a refusal, success without data, a wrong type.
    let garbage = answering(StatusCode::OK, "<html>not json</html>", &stop).await;
    assert!(matches!(call(garbage, 2_000).await, Err(SuperappError::Garbage(_))));
    let huge: &'static str =
        Box::leak(format!(r#"{{"returnCode":"0","data":true,"pad":"{}"}}"#, "x".repeat(64 * 1024)).into_boxed_str());
    let oversized = answering(StatusCode::OK, huge, &stop).await;
    assert_eq!(call(oversized, 2_000).await, Err(SuperappError::TooLarge(16 * 1024)));
    let failing = answering(StatusCode::INTERNAL_SERVER_ERROR, "{}", &stop).await;
    assert_eq!(call(failing, 2_000).await, Err(SuperappError::Status(500)));
    let refusing = answering(StatusCode::OK, r#"{"returnCode":"9999","returnMessage":"no"}"#, &stop).await;
    assert_eq!(call(refusing, 2_000).await, Err(SuperappError::Refused { code: "9999".into(), message: "no".into() }));
    let empty = answering(StatusCode::OK, r#"{"returnCode":"0","returnMessage":"ok"}"#, &stop).await;
    assert!(matches!(call(empty, 2_000).await, Err(SuperappError::Garbage(_))));
    // A value where a bool belongs: the error names the shape, never the value (it may be a user's).
    let mistyped = answering(StatusCode::OK, r#"{"returnCode":"0","data":"15800002850"}"#, &stop).await;
    match call(mistyped, 2_000).await {
        Err(SuperappError::Garbage(why)) => assert!(!why.contains("158"), "{why}"),
        other => panic!("{other:?}"),
    }
    let long_id = format!(r#"{{"returnCode":"0","data":{{"accessToken":"t","userId":"{}"}}}}"#, "u".repeat(3000));
    let long = answering(StatusCode::OK, Box::leak(long_id.into_boxed_str()), &stop).await;
    let client = SuperappClient::new(&settings(long, 2_000), key.clone()).unwrap();
    assert!(matches!(client.redeem_auth_code("a").await, Err(SuperappError::Garbage(_))), "a 3000-character userId");
    stop.cancel();
}

#[tokio::test]
async fn calls_beyond_max_in_flight_fail_at_once_with_busy() {
    let stop = CancellationToken::new();
    let stalls = serve(Router::new().fallback(std::future::pending::<&'static str>), &stop).await;
    let client = Arc::new(SuperappClient::new(&settings(stalls, 5_000), key()).unwrap());
    let mut stalled = Vec::new();
    for _ in 0..4 {
        let client = client.clone();
        stalled.push(tokio::spawn(async move { client.check_user("alice").await }));
    }
    // The four take their places before they reach the server; wait until all four are parked.
    support::until("four calls in flight", || client.in_flight() == 4).await;
    let started = Instant::now();
    assert_eq!(client.check_user("alice").await, Err(SuperappError::Busy));
    assert!(started.elapsed() < Duration::from_millis(500), "the fifth fails at once");
    for task in stalled {
        task.abort();
    }
    stop.cancel();
}

/// What a capturing superapp server saw of one request.
#[derive(Debug, Clone, Default)]
struct Seen {
    path: String,
    headers: HeaderMap,
    body: Bytes,
}

#[tokio::test]
async fn pythons_cryptography_verifies_the_signature_the_platform_sent() {
    let stop = CancellationToken::new();
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let record = seen.clone();
    let router = Router::new().fallback(routing::any(move |uri: axum::http::Uri, headers: HeaderMap, body: Bytes| {
        let record = record.clone();
        async move {
            record.lock().unwrap().push(Seen { path: uri.path().to_owned(), headers, body });
            ([(CONTENT_TYPE, "application/json")], r#"{"returnCode":"0","data":true,"requestId":"r"}"#)
        }
    }));
    let address = serve(router, &stop).await;
    let key = key();
    let client = SuperappClient::new(&settings(address, 5_000), key.clone()).unwrap();
    assert_eq!(client.check_user("alice \u{4e2d}\u{6587}").await, Ok(true));
    let seen = seen.lock().unwrap()[0].clone();
    assert_eq!(seen.path, contract::CHECK_USER);
    let header = |name: &str| seen.headers.get(name).unwrap().to_str().unwrap().to_owned();
    assert_eq!(header(HEADER_CLIENT_KEY), CLIENT_KEY);
    let stamp = header(HEADER_TIMESTAMP);
    assert!(stamp.ends_with("+00:00") && stamp.len() == 25, "RFC 3339 with an offset: {stamp}");

    let dir = tempfile::tempdir().unwrap();
    let pem = dir.path().join("platform.pem");
    std::fs::write(&pem, key.public_key_pem()).unwrap();
    let verify = |body: &[u8], path: &str| {
        let body_file = dir.path().join("body");
        std::fs::write(&body_file, body).unwrap();
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../clients/python/verify_superapp_signature.py");
        let out = std::process::Command::new("python3")
            .args([script, pem.to_str().unwrap(), path, body_file.to_str().unwrap(), &stamp, &header(HEADER_SIGNATURE)])
            .output()
            .expect("python3 runs (python3 -m pip install -r clients/python/backend-requirements.txt)");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("ModuleNotFoundError"), "install clients/python/backend-requirements.txt: {stderr}");
        (out.status.code(), String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    assert_eq!(verify(&seen.body, &seen.path), (Some(0), "valid".to_owned()), "the request as sent");
    assert_eq!(verify(br#"{"userId":"bob"}"#, &seen.path), (Some(1), "invalid".to_owned()), "another body");
    assert_eq!(verify(&seen.body, contract::NICKNAME), (Some(1), "invalid".to_owned()), "another path");
    stop.cancel();
}

// The whole chain: daemon (embedded platform), host, renderer, backend, superapp server.

const APP: &str = "wxsuperapp000001";
const APP2: &str = "wxsuperapp000002";

/// A daemon whose platform the superapp server at `address` vouches for, its backend HTTP API on.
async fn vouched_daemon(address: SocketAddr, timeout_ms: u64) -> support::Daemon {
    support::Daemon::start_with(|c| {
        c.superapp.server_url = format!("http://{address}");
        c.superapp.client_key = CLIENT_KEY.into();
        c.superapp.key_file = Some(key_file().1.clone());
        c.superapp.timeout_ms = timeout_ms;
        c.backend_http.listen = Some("127.0.0.1:0".into());
    })
    .await
}

/// The signed-in user as a host pushes it with nothing in its profile: whatever a renderer or a
/// backend gets must come from the superapp server.
fn bare(uid: &str) -> SignedInUser {
    SignedInUser { uid: uid.into(), profile: Some(UserProfile::default()) }
}

/// A host that signs in `claims` and whose getAuthCode answers `auth_code()` for every scope.
async fn host_with(
    daemon: &support::Daemon,
    claims: &str,
    auth_code: impl Fn() -> String + Send + Sync + 'static,
) -> miniapp_broker_client::HostClient {
    let auth_code = Arc::new(auth_code);
    let host = daemon.host().user(bare(claims)).get_auth_code(move |_app, req: v1::GetAuthCodeRequest| {
        let auth_code = auth_code.clone();
        async move {
            Ok(v1::GetAuthCodeResponse {
                auth_code: auth_code(),
                auth_success_scopes: req.scopes,
                ..Default::default()
            })
        }
    });
    within("host", host.connect()).await.expect("host connects")
}

async fn exchange(daemon: &support::Daemon) -> ExchangeClient<tonic::transport::Channel> {
    ExchangeClient::new(connect::channel(&daemon.address()).await.unwrap())
}

fn errcode(status: tonic::Status) -> i32 {
    v1::ExchangeError::decode(status.details()).expect("an ExchangeError").errcode
}

fn ledger(daemon: &support::Daemon) -> Vec<miniapp_brokerd::store::LedgerRow> {
    daemon.server.broker().store.ledger(None, None, 0).unwrap()
}

async fn has_session(daemon: &support::Daemon, app_id: &str, uid: &str) -> bool {
    daemon.server.broker().platform.check_session(app_id, uid).await.is_ok()
}

/// One POST to the daemon's backend HTTP API; the answer's JSON.
async fn backend_post(daemon: &support::Daemon, path: &str, body: String) -> serde_json::Value {
    use http_body_util::{BodyExt, Full};
    use hyper_util::{client::legacy::Client, rt::TokioExecutor};
    let address = daemon.server.backend_http_addr().expect("the backend listener is on");
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let request =
        axum::http::Request::post(format!("http://{address}{path}")).body(Full::new(Bytes::from(body))).unwrap();
    let response = within(path, client.request(request)).await.expect("HTTP response");
    let bytes = within("body", response.into_body().collect()).await.expect("body").to_bytes();
    serde_json::from_slice(&bytes).expect("JSON")
}

/// An access token for the app's backend over the backend HTTP API.
async fn http_token(daemon: &support::Daemon, secret: &str) -> String {
    let path = format!("/cgi-bin/token?grant_type=client_credential&appid={APP}&secret={secret}");
    let address = daemon.server.backend_http_addr().unwrap();
    use http_body_util::{BodyExt, Empty};
    use hyper_util::{client::legacy::Client, rt::TokioExecutor};
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let uri: axum::http::Uri = format!("http://{address}{path}").parse().unwrap();
    let response = within("token", client.get(uri)).await.unwrap();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    body["access_token"].as_str().unwrap_or_else(|| panic!("a token: {body}")).to_owned()
}

#[tokio::test]
async fn through_the_dev_host_v3_logs_in_as_the_servers_user_and_every_value_comes_from_the_server() {
    let stop = CancellationToken::new();
    let (server, address) = dev_server(&key(), &stop).await;
    let daemon = vouched_daemon(address, 5_000).await;
    // The dev-host, with its own superapp server's authCodes and an empty profile for alice.
    let profile = miniapp_brokerd::dev_host::DevHostConfig {
        user: DevUser {
            uid: "alice".into(),
            nick_name: String::new(),
            avatar_url: String::new(),
            phone_number: String::new(),
            email: String::new(),
        },
        ..Default::default()
    };
    let host = miniapp_brokerd::dev_host::builder(
        &daemon.address(),
        &daemon.token(),
        &profile,
        Arc::new(|_| {}),
        Some(server),
    );
    let host = within("dev-host", host.connect()).await.expect("dev-host connects");
    let secret = host.register_app(APP, false).await.unwrap().secret;
    let renderer = daemon.renderer(&support::launch(&host, APP, r#"{"apiVersion":"v3"}"#).await.launch_token).await;
    let mut backend = exchange(&daemon).await;

    let code = within("login", renderer.call(v1::LoginRequest::default())).await.expect("login").code;
    let request = v1::Code2SessionRequest { app_id: APP.into(), secret: secret.clone(), code };
    let session = backend.code2_session(request).await.expect("code2Session").into_inner();
    assert_eq!(session.openid, daemon.server.broker().platform.openid(APP, "alice"));
    assert_eq!(session.auth_code, "", "the authCode was spent at the superapp server");

    let code = within("phone", renderer.call(v1::GetPhoneNumberRequest {})).await.expect("phone").code;
    let redeem = |code: &str| v1::RedeemCodeRequest { app_id: APP.into(), secret: secret.clone(), code: code.into() };
    assert!(
        ledger(&daemon).iter().any(|r| r.what == "phone_number" && r.redeemed_at_ms.is_none()),
        "issued, on record"
    );
    let phone = backend.get_phone_number(redeem(&code)).await.expect("phone redeemed").into_inner();
    assert_eq!(phone.phone_number, "15800002850");
    assert_eq!(errcode(backend.get_phone_number(redeem(&code)).await.unwrap_err()), 40163, "redeemed once");
    let code = within("email", renderer.call(v1::GetEmailRequest {})).await.expect("email").code;
    assert_eq!(backend.get_email(redeem(&code)).await.expect("email").into_inner().email, "alice@example.invalid");

    // The backend HTTP API's getuserphonenumber fetches it the same way.
    let token = http_token(&daemon, &secret).await;
    let code = within("phone", renderer.call(v1::GetPhoneNumberRequest {})).await.expect("phone").code;
    let path = format!("/wxa/business/getuserphonenumber?access_token={token}");
    let body = backend_post(&daemon, &path, serde_json::json!({ "code": code }).to_string()).await;
    assert_eq!(body["phone_info"]["purePhoneNumber"], "15800002850", "{body}");
    let code = within("email", renderer.call(v1::GetEmailRequest {})).await.expect("email").code;
    let path = format!("/wxa/business/getuseremail?access_token={token}");
    let body = backend_post(&daemon, &path, serde_json::json!({ "code": code }).to_string()).await;
    assert_eq!(body["email_info"]["email"], "alice@example.invalid", "{body}");

    let avatar = within("avatar", renderer.call(v1::ChooseAvatarRequest {})).await.expect("avatar");
    assert_eq!(avatar.avatar_url, "https://example.invalid/alice.png");
    let nick = within("nickname", renderer.call(v1::GetNickNameRequest {})).await.expect("nickname");
    assert_eq!(nick.nick_name, "Alice");
    let what: Vec<_> = ledger(&daemon).iter().map(|r| (r.what.clone(), r.redeemed_via.clone())).collect();
    for (w, via) in [
        ("openid", Some("exchange")),
        // Rows of one kind within `privacy.ledger_coalesce_secs` are one row with a count.
        ("phone_number", Some("exchange")),
        ("email", Some("exchange")),
        ("avatar", None),
        ("nickname", None),
    ] {
        assert!(what.contains(&(w.to_owned(), via.map(str::to_owned))), "{w} in {what:?}");
    }
    daemon.stop().await;
    stop.cancel();
}

#[tokio::test]
async fn a_host_claiming_bob_with_alices_auth_code_gets_no_code_for_either() {
    let stop = CancellationToken::new();
    let (server, address) = dev_server(&key(), &stop).await;
    let daemon = vouched_daemon(address, 5_000).await;
    let alices = server.issue_auth_code("alice", &[]).unwrap();
    let code = alices.clone();
    let host = host_with(&daemon, "bob", move || code.clone()).await;
    let renderer = daemon.renderer(&support::launch(&host, APP, r#"{"apiVersion":"v3"}"#).await.launch_token).await;
    let failure = within("login", renderer.call(v1::LoginRequest::default())).await.unwrap_err();
    support::assert_failure(
        &failure,
        "login:fail authCode refused: it stands for another user than the signed-in one",
        1021,
        tonic::Code::PermissionDenied,
        "auth_code_refused",
    );
    assert!(!has_session(&daemon, APP, "bob").await && !has_session(&daemon, APP, "alice").await);
    assert!(ledger(&daemon).is_empty(), "nothing recorded: {:?}", ledger(&daemon));

    // The same authCode with alice signed in: it was redeemed once already.
    host.set_user(bare("alice")).await.unwrap();
    let failure = within("login", renderer.call(v1::LoginRequest::default())).await.unwrap_err();
    assert_eq!((failure.errno, failure.reason.as_str()), (1021, "auth_code_refused"), "{failure:?}");
    assert!(!has_session(&daemon, APP, "alice").await && ledger(&daemon).is_empty());
    daemon.stop().await;
    stop.cancel();
}

#[tokio::test]
async fn an_auth_code_is_redeemed_once_and_unknown_v2_users_get_no_login() {
    let stop = CancellationToken::new();
    let (server, address) = dev_server(&key(), &stop).await;
    let daemon = vouched_daemon(address, 5_000).await;
    let once = server.issue_auth_code("alice", &[]).unwrap();
    let host = host_with(&daemon, "alice", move || once.clone()).await;
    let v3 = daemon.renderer(&support::launch(&host, APP, r#"{"apiVersion":"v3"}"#).await.launch_token).await;
    within("first login", v3.call(v1::LoginRequest::default())).await.expect("the first redemption logs in");
    assert!(has_session(&daemon, APP, "alice").await);
    let replay = within("replay", v3.call(v1::LoginRequest::default())).await.unwrap_err();
    assert_eq!((replay.errno, replay.reason.as_str()), (1021, "auth_code_refused"), "{replay:?}");
    // The platform remembers what it redeemed (the dev-host's server would refuse it too: 2005).
    assert_eq!(replay.err_msg, "login:fail authCode refused: already redeemed");

    // v2: checkUser vouches; a user the superapp does not know gets nothing.
    let v2 = daemon.renderer(&support::launch(&host, APP2, r#"{"apiVersion":"v2"}"#).await.launch_token).await;
    within("v2 login", v2.call(v1::LoginRequest::default())).await.expect("alice is known");
    host.set_user(bare("mallory")).await.unwrap();
    let failure = within("v2 login", v2.call(v1::LoginRequest::default())).await.unwrap_err();
    support::assert_failure(
        &failure,
        "login:fail user unknown to the superapp server",
        1020,
        tonic::Code::FailedPrecondition,
        "unknown_user",
    );
    assert!(!has_session(&daemon, APP2, "mallory").await);
    daemon.stop().await;
    stop.cancel();
}

#[tokio::test]
async fn without_a_superapp_server_the_hosts_profile_serves_as_before() {
    let daemon = support::Daemon::start().await;
    let user = SignedInUser {
        uid: "alice".into(),
        profile: Some(UserProfile { nick_name: "From the host".into(), ..Default::default() }),
    };
    let host = within("host", daemon.host().user(user).connect()).await.unwrap();
    let renderer = daemon.renderer(&support::launch(&host, APP, r#"{"apiVersion":"v2"}"#).await.launch_token).await;
    within("login", renderer.call(v1::LoginRequest::default())).await.expect("login without checkUser");
    let nick = within("nickname", renderer.call(v1::GetNickNameRequest {})).await.expect("nickname");
    assert_eq!(nick.nick_name, "From the host");
    let failure = within("phone", renderer.call(v1::GetPhoneNumberRequest {})).await.unwrap_err();
    assert_eq!(failure.reason, "no_profile_value", "{failure:?}");
    daemon.stop().await;
}

#[tokio::test]
async fn a_hostile_superapp_server_fails_each_renderer_call_by_its_deadline_and_nothing_is_recorded() {
    let stop = CancellationToken::new();
    let stalls = serve(Router::new().fallback(std::future::pending::<&'static str>), &stop).await;
    let garbage = answering(StatusCode::OK, "<html>", &stop).await;
    let refuses = answering(StatusCode::OK, r#"{"returnCode":"5001","returnMessage":"maintenance"}"#, &stop).await;
    let oversized: &'static str =
        Box::leak(format!(r#"{{"returnCode":"0","data":"{}"}}"#, "x".repeat(200 * 1024)).into_boxed_str());
    let oversized = answering(StatusCode::OK, oversized, &stop).await;
    // Lies: every authCode is bob's, whoever it was issued for (and checkUser gets no bool).
    let lies =
        answering(StatusCode::OK, r#"{"returnCode":"0","data":{"accessToken":"t","userId":"bob"}}"#, &stop).await;
    // Trusts another platform's key: every request's signature is refused.
    let other = PlatformKey::generate().unwrap();
    let (_server, wrong_key) = dev_server(&other, &stop).await;

    for (name, address, v3_errno) in [
        ("stalls", stalls, 1019),
        ("garbage", garbage, 1019),
        ("bad returnCode", refuses, 1021),
        ("oversized", oversized, 1019),
        ("lies about the userId", lies, 1021),
        ("bad signature", wrong_key, 1021),
    ] {
        let daemon = vouched_daemon(address, 300).await;
        let host = host_with(&daemon, "alice", || "some-auth-code".into()).await;
        let v2 = daemon.renderer(&support::launch(&host, APP, r#"{"apiVersion":"v2"}"#).await.launch_token).await;
        let v3 = daemon.renderer(&support::launch(&host, APP2, r#"{"apiVersion":"v3"}"#).await.launch_token).await;
        let started = Instant::now();
        let login = within(name, v2.call(v1::LoginRequest::default())).await.unwrap_err();
        assert_eq!((login.errno, login.reason.as_str()), (1019, "superapp_unavailable"), "{name}: v2 login {login:?}");
        let login = within(name, v3.call(v1::LoginRequest::default())).await.unwrap_err();
        assert_eq!(login.errno, v3_errno, "{name}: v3 login {login:?}");
        for failure in [
            within(name, v2.call(v1::GetPhoneNumberRequest {})).await.unwrap_err(),
            within(name, v2.call(v1::GetEmailRequest {})).await.unwrap_err(),
            within(name, v2.call(v1::ChooseAvatarRequest {})).await.unwrap_err(),
            within(name, v2.call(v1::GetNickNameRequest {})).await.unwrap_err(),
        ] {
            assert_eq!((failure.errno, failure.reason.as_str()), (1019, "superapp_unavailable"), "{name}: {failure:?}");
            assert!(failure.err_msg.contains(":fail superapp server"), "{name}: {}", failure.err_msg);
        }
        // Six calls, each ended by the 300 ms deadline at the latest.
        assert!(started.elapsed() < Duration::from_secs(6), "{name}: took {:?}", started.elapsed());
        assert!(!has_session(&daemon, APP, "alice").await && !has_session(&daemon, APP2, "alice").await, "{name}");
        assert!(ledger(&daemon).is_empty(), "{name}: nothing recorded: {:?}", ledger(&daemon));
        daemon.stop().await;
    }
    stop.cancel();
}

/// A server whose getUserInfoTemporaryCode works and whose getUserPhoneNumber answers `phone`.
async fn failing_at_redemption(phone: Router, stop: &CancellationToken) -> SocketAddr {
    let router = Router::new()
        .route(
            contract::TEMPORARY_CODE,
            routing::post(|| async { r#"{"returnCode":"0","data":{"code":"t-1","data":"158****2850"}}"# }),
        )
        .merge(phone);
    serve(router, stop).await
}

#[tokio::test]
async fn a_server_failing_at_redemption_gives_the_backend_minus_one_in_time_and_nothing_is_stamped() {
    let stop = CancellationToken::new();
    let at = |answer: &'static str| {
        Router::new().route(contract::PHONE_NUMBER, routing::post(move || async move { answer }))
    };
    let stalls = Router::new().route(contract::PHONE_NUMBER, routing::post(std::future::pending::<&'static str>));
    let cases = [
        ("stalls", failing_at_redemption(stalls, &stop).await),
        ("garbage", failing_at_redemption(at("garbage"), &stop).await),
        ("bad returnCode", failing_at_redemption(at(r#"{"returnCode":"2003","returnMessage":"used"}"#), &stop).await),
    ];
    for (name, address) in cases {
        let daemon = vouched_daemon(address, 300).await;
        let host = host_with(&daemon, "alice", String::new).await;
        let secret = host.register_app(APP, false).await.unwrap().secret;
        let renderer = daemon.renderer(&support::launch(&host, APP, r#"{"apiVersion":"v2"}"#).await.launch_token).await;
        let mut backend = exchange(&daemon).await;
        let code = within(name, renderer.call(v1::GetPhoneNumberRequest {})).await.expect("phone code").code;
        let redeem = v1::RedeemCodeRequest { app_id: APP.into(), secret: secret.clone(), code };
        let started = Instant::now();
        let status = within(name, backend.get_phone_number(redeem.clone())).await.unwrap_err();
        assert_eq!(errcode(status), -1, "{name}: system busy");
        assert!(started.elapsed() < Duration::from_secs(3), "{name}: took {:?}", started.elapsed());
        // Spent, as the server's temporary code may be: the mini app asks the user again.
        assert_eq!(errcode(backend.get_phone_number(redeem).await.unwrap_err()), 40163, "{name}: spent");

        // The backend HTTP API's getuserphonenumber hears the same.
        let token = http_token(&daemon, &secret).await;
        let code = within(name, renderer.call(v1::GetPhoneNumberRequest {})).await.expect("phone code").code;
        let path = format!("/wxa/business/getuserphonenumber?access_token={token}");
        let body = backend_post(&daemon, &path, serde_json::json!({ "code": code }).to_string()).await;
        assert_eq!(body["errcode"], -1, "{name}: {body}");
        assert!(body.get("phone_info").is_none(), "{name}: {body}");
        assert!(ledger(&daemon).iter().all(|r| r.redeemed_at_ms.is_none()), "{name}: not stamped as redeemed");
        daemon.stop().await;
    }
    stop.cancel();
}

#[tokio::test]
async fn an_auth_code_a_replaying_server_would_answer_again_is_redeemed_once() {
    let stop = CancellationToken::new();
    // Answers every authCode, however often, as alice's.
    let replays =
        answering(StatusCode::OK, r#"{"returnCode":"0","data":{"accessToken":"t","userId":"alice"}}"#, &stop).await;
    let daemon = vouched_daemon(replays, 2_000).await;
    // The host answers the same authCode until `fresh` is set, then a new one each time.
    let fresh = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let counter = std::sync::atomic::AtomicU32::new(0);
    let switch = fresh.clone();
    let host = host_with(&daemon, "alice", move || {
        if switch.load(std::sync::atomic::Ordering::SeqCst) {
            format!("fresh-{}", counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst))
        } else {
            "the-same-auth-code".into()
        }
    })
    .await;
    let v3 = daemon.renderer(&support::launch(&host, APP, r#"{"apiVersion":"v3"}"#).await.launch_token).await;
    within("first", v3.call(v1::LoginRequest::default())).await.expect("the first redemption logs in");
    let replay = within("replay", v3.call(v1::LoginRequest::default())).await.unwrap_err();
    support::assert_failure(
        &replay,
        "login:fail authCode refused: already redeemed",
        1021,
        tonic::Code::PermissionDenied,
        "auth_code_refused",
    );
    // Fresh authCodes log in again.
    fresh.store(true, std::sync::atomic::Ordering::SeqCst);
    for _ in 0..2 {
        within("fresh", v3.call(v1::LoginRequest::default())).await.expect("a fresh authCode logs in");
    }
    daemon.stop().await;
    stop.cancel();
}

#[tokio::test]
async fn a_v3_login_with_the_hosts_own_code_needs_a_user_the_server_knows() {
    let stop = CancellationToken::new();
    let (_server, address) = dev_server(&key(), &stop).await;
    let daemon = vouched_daemon(address, 5_000).await;
    let host = daemon.host().user(bare("mallory")).get_auth_code(|_app, req: v1::GetAuthCodeRequest| async move {
        Ok(v1::GetAuthCodeResponse {
            code: "hosts-own-code".into(),
            auth_success_scopes: req.scopes,
            ..Default::default()
        })
    });
    let host = within("host", host.connect()).await.expect("host connects");
    let v3 = daemon.renderer(&support::launch(&host, APP, r#"{"apiVersion":"v3"}"#).await.launch_token).await;
    let failure = within("login", v3.call(v1::LoginRequest::default())).await.unwrap_err();
    assert_eq!((failure.errno, failure.reason.as_str()), (1020, "unknown_user"), "{failure:?}");
    assert!(!has_session(&daemon, APP, "mallory").await, "no session for a user the server does not know");
    host.set_user(bare("alice")).await.unwrap();
    let login = within("login", v3.call(v1::LoginRequest::default())).await.expect("alice is known");
    assert_eq!(login.code, "hosts-own-code");
    assert!(has_session(&daemon, APP, "alice").await);
    daemon.stop().await;
    stop.cancel();
}

/// Every log line of one test, in memory.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// The vouched flow and a server that answers a user's values where they do not belong, every
/// log at TRACE on this (current-thread) runtime, where the daemon, the platform's client and the
/// dev-host's server all run: no line holds a value the server handed out, nor an authCode.
#[tokio::test]
async fn the_vouched_flow_logs_no_value_the_server_handed_out() {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(captured.clone())
        .finish();
    // The process's global subscriber (this is the only test here that sets one): a thread-local
    // one misses lines whose callsite another test's thread reached first, with none set. The
    // other tests' lines land in the capture too, and must carry no value either.
    tracing::subscriber::set_global_default(subscriber).expect("no other test sets a global subscriber");
    let carol = DevUser {
        uid: "carol".into(),
        nick_name: "Carol Nickname-7731".into(),
        avatar_url: "https://example.invalid/carol-avatar-7731.png".into(),
        phone_number: "13977317731".into(),
        email: "carol-7731@example.invalid".into(),
    };
    let stop = CancellationToken::new();
    let server = Arc::new(DevSuperapp::new([carol.clone()], CLIENT_KEY, key().public_key()));
    let address = server.clone().spawn("127.0.0.1:0".parse().unwrap(), stop.clone()).await.unwrap();
    let daemon = vouched_daemon(address, 5_000).await;
    let auth_code = server.issue_auth_code("carol", &[]).unwrap();
    let once = auth_code.clone();
    let host = host_with(&daemon, "carol", move || once.clone()).await;
    let secret = host.register_app(APP, false).await.unwrap().secret;
    let renderer = daemon.renderer(&support::launch(&host, APP, r#"{"apiVersion":"v3"}"#).await.launch_token).await;
    let mut backend = exchange(&daemon).await;
    within("login", renderer.call(v1::LoginRequest::default())).await.expect("login");
    let redeem = |code: String| v1::RedeemCodeRequest { app_id: APP.into(), secret: secret.clone(), code };
    let code = within("phone", renderer.call(v1::GetPhoneNumberRequest {})).await.unwrap().code;
    assert_eq!(backend.get_phone_number(redeem(code)).await.unwrap().into_inner().phone_number, carol.phone_number);
    let code = within("email", renderer.call(v1::GetEmailRequest {})).await.unwrap().code;
    assert_eq!(backend.get_email(redeem(code)).await.unwrap().into_inner().email, carol.email);
    assert_eq!(within("avatar", renderer.call(v1::ChooseAvatarRequest {})).await.unwrap().avatar_url, carol.avatar_url);
    assert_eq!(within("nick", renderer.call(v1::GetNickNameRequest {})).await.unwrap().nick_name, carol.nick_name);
    daemon.stop().await;

    // A server answering the phone number where checkUser's bool belongs, and the e-mail address
    // as its returnMessage's neighbour in a refusal: the failures are logged, the values not.
    let mistyped = answering(
        StatusCode::OK,
        r#"{"returnCode":"0","data":"13977317731","requestId":"carol-7731@example.invalid"}"#,
        &stop,
    )
    .await;
    let daemon = vouched_daemon(mistyped, 2_000).await;
    let host = host_with(&daemon, "carol", String::new).await;
    let v2 = daemon.renderer(&support::launch(&host, APP, r#"{"apiVersion":"v2"}"#).await.launch_token).await;
    let failure = within("login", v2.call(v1::LoginRequest::default())).await.unwrap_err();
    assert_eq!(failure.reason, "superapp_unavailable", "{failure:?}");
    assert!(!failure.err_msg.contains("13977317731"), "{}", failure.err_msg);
    daemon.stop().await;
    stop.cancel();

    let logs = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
    for expected in ["superapp server call failed", "TRACE"] {
        assert!(logs.contains(expected), "the logs lack {expected:?}: is the capture working?");
    }
    for (what, value) in [
        ("phone number", carol.phone_number.as_str()),
        ("e-mail", carol.email.as_str()),
        ("nickname", carol.nick_name.as_str()),
        ("avatar", carol.avatar_url.as_str()),
        ("authCode", auth_code.as_str()),
    ] {
        if let Some(line) = logs.lines().find(|l| l.contains(value)) {
            panic!("the {what} is in a log line: {line}");
        }
    }
}
