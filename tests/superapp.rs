//! The superapp server contract over real HTTP: the platform's signed client against the
//! dev-host's superapp server (every call, its signature checks, authCodes and temporary codes
//! redeemed once) and against hostile servers (stalling, garbage, oversized, refusing, lying), and
//! the platform's signature checked by Python's `cryptography`, which shares no code with it.

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
use miniapp_brokerd::{
    dev_host::DevUser,
    dev_superapp::DevSuperapp,
    superapp::{
        ClientSettings, InfoType, PlatformKey, SuperappClient, SuperappError, contract,
        signing::{HEADER_CLIENT_KEY, HEADER_SIGNATURE, HEADER_TIMESTAMP, timestamp},
    },
};
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

/// One key pair for the whole test binary: RSA key generation is the slow part.
fn key() -> Arc<PlatformKey> {
    static KEY: std::sync::OnceLock<Arc<PlatformKey>> = std::sync::OnceLock::new();
    KEY.get_or_init(|| Arc::new(PlatformKey::generate().expect("a key pair"))).clone()
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
    let mistyped = answering(StatusCode::OK, r#"{"returnCode":"0","data":"yes"}"#, &stop).await;
    assert!(matches!(call(mistyped, 2_000).await, Err(SuperappError::Garbage(_))));
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
