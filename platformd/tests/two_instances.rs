//! End to end: two `miniapp-platformd serve` processes on one real PostgreSQL, a real daemon in
//! remote mode with a real host and renderer, and unmodified wechatpy redeeming at the instance
//! that did not issue. Then the races and failures the service must survive: 200 codes redeemed
//! through both instances at once, an instance killed under load, the database stopped and
//! started, the platform down while renderers call.

mod support;

use std::{
    collections::HashSet,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use miniapp_broker_client::proto::v1;
use support::*;
use tokio::process::Command;

#[tokio::test]
async fn codes_issued_through_one_instance_are_redeemed_at_the_other_by_wechatpy_and_each_exactly_once() {
    require_wechatpy().await;
    let url = miniapp_test_postgres::shared().database().await;
    let t = tenant(&url).await;
    // 400 redemptions at once on a shared 2-core machine: a database deadline that waits for the
    // pool rather than answering "system busy" (that answer has its own test).
    let patient = ["--database-deadline-ms", "10000"];
    let a = Instance::start_with(&url, "127.0.0.1:0", "127.0.0.1:0", &patient).await;
    let b = Instance::start_with(&url, "127.0.0.1:0", "127.0.0.1:0", &patient).await;
    let d = desktop(&t, a.daemon, 3000).await;

    // The daemon's own backend API is off: the platform serves backends.
    assert!(d.server.backend_http_addr().is_none());

    // wechatpy at instance B redeems codes instance A issued.
    let login_code = within("login", login(&d.renderer)).await.expect("login through the platform");
    let phone_code =
        within("getPhoneNumber", d.renderer.call(v1::GetPhoneNumberRequest {})).await.expect("phone code").code;
    let out = within(
        "backend_wechatpy.py",
        Command::new("python3")
            .arg(WECHATPY_SCRIPT)
            .args([
                format!("--base-url={}", b.url()),
                format!("--appid={APP}"),
                format!("--secret={}", t.app_secret),
                format!("--login-code={login_code}"),
                format!("--phone-code={phone_code}"),
            ])
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("python3 runs (scripts/test installs wechatpy)");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "wechatpy backend failed ({}):\n{stdout}\n{stderr}", out.status);
    assert_eq!(stdout.lines().last(), Some("wechatpy backend: all ok"), "{stdout}\n{stderr}");

    // A's own HTTP API agrees the login code is spent.
    let http = Http::new();
    let (_, body) = http.get(&a.url(), &session_path(&t.app_secret, &login_code)).await;
    assert_eq!(body["errcode"], 40163, "{body}");

    // 200 codes, each redeemed through both instances at once: each exactly once.
    let mut codes = Vec::new();
    for _ in 0..200 {
        codes.push(within("login", login(&d.renderer)).await.expect("login"));
    }
    let attempts = codes.iter().flat_map(|code| {
        [a.url(), b.url()].into_iter().map(|base| {
            let http = http.clone();
            let path = session_path(&t.app_secret, code);
            let code = code.clone();
            async move { (code, http.get(&base, &path).await.1) }
        })
    });
    let outcomes = futures::future::join_all(attempts).await;
    let mut redeemed = HashSet::new();
    for (code, body) in &outcomes {
        if body["openid"].is_string() {
            assert!(redeemed.insert(code.clone()), "{code} redeemed twice");
        } else {
            assert_eq!(body["errcode"], 40163, "the loser hears 'code been used': {body}");
        }
    }
    assert_eq!(redeemed.len(), 200);

    // The user's ledger says what the platform redeemed (asked of the platform by the daemon).
    let ledger = within("ledger", d.host.ledger(APP, "u1", 0)).await.unwrap();
    let stamped: u64 = ledger.iter().filter(|r| r.redeemed_via == "backend_http").map(|r| r.redeemed_count).sum();
    assert_eq!(stamped, 202, "every redeemed code is counted in the user's ledger: {ledger:?}");
}

#[tokio::test]
async fn an_instance_killed_under_load_loses_no_acknowledged_code_and_the_daemon_recovers_on_its_own() {
    let url = miniapp_test_postgres::shared().database().await;
    let t = tenant(&url).await;
    let mut a = Instance::start(&url, "127.0.0.1:0", "127.0.0.1:0").await;
    let b = Instance::start(&url, "127.0.0.1:0", "127.0.0.1:0").await;
    let daemon_port = a.daemon;
    let d = Arc::new(desktop(&t, a.daemon, 1000).await);

    // Renderer logins in a loop while the instance they go through is killed.
    let issued = Arc::new(tokio::sync::Semaphore::new(0));
    let load = {
        let (d, issued) = (d.clone(), issued.clone());
        tokio::spawn(async move {
            let mut outcomes = Vec::new();
            for _ in 0..120 {
                let started = Instant::now();
                let outcome = login(&d.renderer).await;
                if outcome.is_ok() {
                    issued.add_permits(1);
                }
                outcomes.push((outcome, started.elapsed()));
            }
            outcomes
        })
    };
    // Kill it once some logins went through.
    drop(within("some logins", issued.acquire_many(10)).await);
    a.kill().await;
    let outcomes = within("the load", load).await.unwrap();
    let mut ok = Vec::new();
    let mut unavailable = 0;
    for (outcome, took) in outcomes {
        assert!(took < Duration::from_millis(1800), "a call took {took:?}: past its deadline");
        match outcome {
            Ok(code) => ok.push(code),
            Err(f) => {
                assert_eq!(f.err_msg, "login:fail platform unavailable", "{f:?}");
                unavailable += 1;
            }
        }
    }
    assert!(ok.len() >= 10 && unavailable > 0, "{} ok, {unavailable} unavailable", ok.len());
    // Every acknowledged code is redeemable, once, at the surviving instance.
    let http = Http::new();
    for code in &ok {
        let (_, body) = http.get(&b.url(), &session_path(&t.app_secret, code)).await;
        assert!(body["openid"].is_string(), "an acknowledged code was lost: {body}");
        let (_, again) = http.get(&b.url(), &session_path(&t.app_secret, code)).await;
        assert_eq!(again["errcode"], 40163);
    }
    // The instance comes back on its address: the daemon recovers by itself.
    let _a = Instance::start(&url, "127.0.0.1:0", &daemon_port.to_string()).await;
    within("the daemon recovers", async {
        loop {
            if login(&d.renderer).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn the_database_stopped_answers_system_busy_at_once_and_started_again_serves() {
    let mut pg = miniapp_test_postgres::Postgres::start().expect("a cluster of its own");
    let url = pg.database().await;
    let t = tenant(&url).await;
    let a = Instance::start(&url, "127.0.0.1:0", "127.0.0.1:0").await;
    let d = desktop(&t, a.daemon, 2000).await;
    let http = Http::new();
    let code = within("login", login(&d.renderer)).await.expect("login");
    assert_eq!(http.get(&a.url(), "/readyz").await.0, 200);

    pg.stop();
    let started = Instant::now();
    let (_, body) = http.get(&a.url(), &session_path(&t.app_secret, &code)).await;
    assert_eq!(body["errcode"], -1, "{body}");
    assert_eq!(body["errmsg"], "system busy", "{body}");
    assert!(started.elapsed() < Duration::from_secs(2), "answered after {:?}", started.elapsed());
    assert_eq!(http.get(&a.url(), "/readyz").await.0, 503);
    assert_eq!(http.get(&a.url(), "/healthz").await.0, 200, "live, though not ready");
    let failure = within("login", login(&d.renderer)).await.expect_err("no code without the database");
    assert_eq!(failure.err_msg, "login:fail platform unavailable");

    pg.restart().unwrap();
    within("ready again", async {
        while http.get(&a.url(), "/readyz").await.0 != 200 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    // The code issued before the outage was acknowledged: it is still there, once.
    let (_, body) = http.get(&a.url(), &session_path(&t.app_secret, &code)).await;
    assert!(body["openid"].is_string(), "{body}");
    assert!(within("login", login(&d.renderer)).await.is_ok());
}

#[tokio::test]
async fn renderers_calling_while_the_platform_is_down_hear_platform_unavailable_within_their_deadline() {
    // Nothing listens on the platform's address.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_addr = closed.local_addr().unwrap();
    drop(closed);
    // A platform that accepts and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let t = Tenant { client_key: "ck_x".into(), client_secret: "s".into(), app_secret: String::new() };
    for addr in [closed_addr, silent_addr] {
        let d = desktop(&t, addr, 800).await;
        let started = Instant::now();
        let failure = within("login", login(&d.renderer)).await.expect_err("no platform, no code");
        assert_eq!(failure.err_msg, "login:fail platform unavailable", "{addr}");
        assert!(started.elapsed() < Duration::from_millis(1500), "{addr}: {:?}", started.elapsed());
        let check = within("checkSession", d.renderer.call(v1::CheckSessionRequest::default())).await;
        assert_eq!(check.expect_err("no platform").err_msg, "checkSession:fail platform unavailable");
        // The rows written while the code was asked for are taken back: nothing was disclosed.
        let ledger = within("ledger", d.host.ledger(APP, "u1", 0)).await.unwrap();
        assert!(ledger.is_empty(), "{addr}: {ledger:?}");
    }
    drop(silent);
}

/// Whether the platform at `daemon` has a live session of (APP, uid), asked with `t`'s credentials.
async fn session_live(daemon: SocketAddr, t: &Tenant, uid: &str) -> bool {
    use miniapp_broker_proto::platform::v1::{CheckSessionRequest, platform_client::PlatformClient};
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{daemon}")).unwrap();
    let mut client = PlatformClient::new(within("connect", endpoint.connect()).await.unwrap());
    let mut request = tonic::Request::new(CheckSessionRequest { app_id: APP.into(), uid: uid.into() });
    request.metadata_mut().insert("client-key", t.client_key.parse().unwrap());
    request.metadata_mut().insert("client-secret", t.client_secret.parse().unwrap());
    match within("CheckSession", client.check_session(request)).await {
        Ok(_) => true,
        Err(status) if status.code() == tonic::Code::FailedPrecondition => false,
        Err(status) => panic!("CheckSession: {status}"),
    }
}

/// A daemon API call with these credentials: its gRPC status code.
async fn issue_as(daemon: SocketAddr, key: &str, secret: &str, app_id: &str) -> tonic::Code {
    use miniapp_broker_proto::platform::v1::{IssueLoginCodeRequest, platform_client::PlatformClient};
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{daemon}")).unwrap();
    let mut client = PlatformClient::new(within("connect", endpoint.connect()).await.unwrap());
    let mut request = tonic::Request::new(IssueLoginCodeRequest {
        app_id: app_id.into(),
        uid: "u1".into(),
        auth_code: String::new(),
    });
    request.metadata_mut().insert("client-key", key.parse().unwrap());
    request.metadata_mut().insert("client-secret", secret.parse().unwrap());
    match within("IssueLoginCode", client.issue_login_code(request)).await {
        Ok(_) => tonic::Code::Ok,
        Err(status) => status.code(),
    }
}

#[tokio::test]
async fn only_a_superapps_own_daemons_issue_its_apps_codes_and_no_credential_reaches_the_log() {
    let url = miniapp_test_postgres::shared().database().await;
    let t = tenant(&url).await;
    let other = command_json(&["superapp", "add", "other", "--json", "--database-url", &url]).await;
    let (other_key, other_secret) = (other["client_key"].as_str().unwrap(), other["client_secret"].as_str().unwrap());
    // An app belongs to one superapp: registering it for another is refused.
    let out = Command::new(BIN)
        .args(["register-app", APP, "--superapp", "other", "--database-url", &url])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success(), "an app registered to acme cannot be claimed by other");
    let mut a = Instance::start(&url, "127.0.0.1:0", "127.0.0.1:0").await;

    assert_eq!(issue_as(a.daemon, &t.client_key, &t.client_secret, APP).await, tonic::Code::Ok);
    assert_eq!(issue_as(a.daemon, &t.client_key, "not-the-secret-4f9a1c", APP).await, tonic::Code::Unauthenticated);
    assert_eq!(issue_as(a.daemon, "ck_unknown", &t.client_secret, APP).await, tonic::Code::Unauthenticated);
    assert_eq!(issue_as(a.daemon, other_key, other_secret, APP).await, tonic::Code::PermissionDenied);
    assert_eq!(
        issue_as(a.daemon, &t.client_key, &t.client_secret, "wx-unregistered").await,
        tonic::Code::PermissionDenied
    );

    // A daemon with a wrong secret hears "platform unavailable" (nothing was issued).
    let wrong = Tenant { client_secret: "not-the-secret-4f9a1c".into(), ..t };
    let d = desktop(&wrong, a.daemon, 2000).await;
    let failure = within("login", login(&d.renderer)).await.expect_err("refused credentials issue nothing");
    assert_eq!(failure.err_msg, "login:fail platform unavailable");
    let ledger = within("ledger", d.host.ledger(APP, "u1", 0)).await.unwrap();
    assert!(ledger.is_empty(), "a refused code discloses nothing: {ledger:?}");

    // Nothing the instance logged carries a client key or secret, right or wrong.
    a.kill().await;
    let log = a.log().await;
    assert!(log.contains("daemon call refused"), "the refusals were logged: {log}");
    for secret in [wrong.client_key.as_str(), &t.client_secret, "not-the-secret-4f9a1c", other_secret, other_key] {
        assert!(!log.contains(secret), "{secret} is in the log");
    }
}

#[tokio::test]
async fn a_revocation_and_a_user_change_on_the_desktop_end_codes_at_every_instance() {
    let url = miniapp_test_postgres::shared().database().await;
    let t = tenant(&url).await;
    let a = Instance::start(&url, "127.0.0.1:0", "127.0.0.1:0").await;
    let b = Instance::start(&url, "127.0.0.1:0", "127.0.0.1:0").await;
    let d = desktop(&t, a.daemon, 3000).await;
    let http = Http::new();
    let (_, token) = http
        .get(&b.url(), &format!("/cgi-bin/token?grant_type=client_credential&appid={APP}&secret={}", t.app_secret))
        .await;
    let token = token["access_token"].as_str().expect("an access token").to_owned();
    let phone_path = format!("/wxa/business/getuserphonenumber?access_token={token}");

    // Revoking the phone scope on the desktop kills the outstanding phone codes at the platform.
    let kept = within("getPhoneNumber", d.renderer.call(v1::GetPhoneNumberRequest {})).await.expect("phone code").code;
    let (_, body) = http.post(&b.url(), &phone_path, &serde_json::json!({ "code": kept })).await;
    assert_eq!(body["errcode"], 0, "a phone code redeems before any revocation: {body}");
    let revoked =
        within("getPhoneNumber", d.renderer.call(v1::GetPhoneNumberRequest {})).await.expect("phone code").code;
    within("revoke", d.host.revoke_grants(APP, "u1", "SCOPE_PHONE_NUMBER")).await.unwrap();
    let (_, body) = http.post(&b.url(), &phone_path, &serde_json::json!({ "code": revoked })).await;
    assert_eq!(body["errcode"], 40029, "a revoked scope's code is dead at every instance: {body}");

    // Another user signs in: the previous user's codes and session end at the platform.
    let before = within("login", login(&d.renderer)).await.expect("login");
    assert!(session_live(b.daemon, &t, "u1").await, "the login started u1's session at the platform");
    within("set_user", d.host.set_user(user("u2"))).await.unwrap();
    // The daemon tells the platform after it switched users: wait until the platform says u1's
    // session ended (asked as the superapp's daemons ask, over gRPC, at the other instance).
    within("the platform hears of the user change", async {
        while session_live(b.daemon, &t, "u1").await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let (_, body) = http.get(&b.url(), &session_path(&t.app_secret, &before)).await;
    assert_eq!(body["errcode"], 40029, "the previous user's login code is dead: {body}");
    let after = within("login", login(&d.renderer)).await.expect("u2 logs in");
    let (_, body) = http.get(&b.url(), &session_path(&t.app_secret, &after)).await;
    assert!(body["openid"].is_string(), "{body}");
}
