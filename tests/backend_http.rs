//! The backend HTTP API over real HTTP against the real daemon: every endpoint (WeChat's paths and
//! TCMPP's `/openserver` ones), every error code it promises, both answer shapes, the shared
//! per-app rate limit with the gRPC `Exchange` service, and the listener's config, CLI and status.
//! The codes redeemed here come from a real renderer over the daemon's socket.

mod support;

use std::{net::SocketAddr, process::Stdio};

use axum::{
    body::Bytes,
    http::{Method, Request},
};
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use miniapp_broker_client::{
    HostClient, RendererClient, connect,
    proto::v1::{self, ExchangeError, SignedInUser, UserProfile, exchange_client::ExchangeClient},
};
use miniapp_brokerd::config::AppConfig;
use prost::Message;
use serde_json::{Value, json};
use support::{Daemon, T0_MS, within};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

const APP: &str = "wxbackend0000001";
const PLAIN: &str = "wxbackend0000002";

/// A real HTTP/1.1 client (hyper-util's) aimed at the daemon's backend listener.
struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
}

impl Http {
    fn new(address: SocketAddr) -> Http {
        Http { client: Client::builder(TokioExecutor::new()).build_http(), base: format!("http://{address}") }
    }

    async fn send(&self, method: Method, path: &str, body: Vec<u8>) -> (u16, Value) {
        self.send_with(method, path, &[], body).await
    }

    /// With extra request headers.
    async fn send_with(&self, method: Method, path: &str, headers: &[(&str, &str)], body: Vec<u8>) -> (u16, Value) {
        let mut request = Request::builder().method(method).uri(format!("{}{path}", self.base));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Full::new(Bytes::from(body))).expect("request");
        let response = within(path, self.client.request(request)).await.expect("HTTP response");
        let status = response.status().as_u16();
        let content_type = response.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned());
        let bytes = within("body", response.into_body().collect()).await.expect("body").to_bytes();
        assert_eq!(content_type.as_deref(), Some("application/json; charset=utf-8"), "{path}");
        (status, serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {bytes:?}")))
    }

    /// A GET that must answer HTTP 200 (as WeChat always does).
    async fn get(&self, path: &str) -> Value {
        let (status, body) = self.send(Method::GET, path, Vec::new()).await;
        assert_eq!(status, 200, "{path}: {body}");
        body
    }

    async fn post(&self, path: &str, body: impl Into<Vec<u8>>) -> Value {
        let (status, body) = self.send(Method::POST, path, body.into()).await;
        assert_eq!(status, 200, "{path}: {body}");
        body
    }
}

/// The errcode and errmsg of an answer (0 / absent on WeChat successes without them).
#[track_caller]
fn assert_err(body: &Value, errcode: i64, errmsg: &str) {
    assert_eq!(body["errcode"], json!(errcode), "errcode of {body}");
    assert_eq!(body["errmsg"], json!(errmsg), "errmsg of {body}");
}

/// A WeChat error answer: exactly errcode and errmsg.
#[track_caller]
fn assert_wechat_err(body: &Value, errcode: i64, errmsg: &str) {
    assert_err(body, errcode, errmsg);
    assert_eq!(body.as_object().unwrap().len(), 2, "WeChat errors carry only errcode and errmsg: {body}");
}

fn signature(session_key: &str) -> String {
    let mac = Hmac::<sha2::Sha256>::new_from_slice(session_key.as_bytes()).unwrap();
    mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

/// A daemon with its backend listener on, a host with a signed-in user, two registered apps (one in
/// a union group), and a v2 renderer of each.
struct Backend {
    daemon: Daemon,
    http: Http,
    host: HostClient,
    secret: String,
    plain_secret: String,
    renderer: RendererClient,
    plain: RendererClient,
}

fn phone_user(uid: &str, phone: &str) -> SignedInUser {
    SignedInUser {
        uid: uid.into(),
        profile: Some(UserProfile {
            nick_name: "Nick".into(),
            avatar_url: String::new(),
            phone_number: phone.into(),
            email: format!("{uid}@example.invalid"),
        }),
    }
}

impl Backend {
    async fn start() -> Backend {
        Self::start_with(|_| {}).await
    }

    async fn start_with(tweak: impl FnOnce(&mut miniapp_brokerd::Config)) -> Backend {
        Self::start_full(tweak, |h| h).await
    }

    /// With the config and the host (its handlers) tweaked.
    async fn start_full(
        tweak: impl FnOnce(&mut miniapp_brokerd::Config),
        host: impl FnOnce(miniapp_broker_client::HostBuilder) -> miniapp_broker_client::HostBuilder,
    ) -> Backend {
        let daemon = Daemon::start_with(|c| {
            c.backend_http.listen = Some("127.0.0.1:0".into());
            c.apps.insert(APP.into(), AppConfig { union_group: Some("g".into()), secret: None });
            tweak(c);
        })
        .await;
        let address = daemon.server.backend_http_addr().expect("the backend listener is on");
        assert!(address.ip().is_loopback() && address.port() != 0, "{address}");
        let host = within("host", host(daemon.host().user(phone_user("u1", "+86 138 0013 8000"))).connect())
            .await
            .expect("host connects");
        let secret = host.register_app(APP, false).await.unwrap().secret;
        let plain_secret = host.register_app(PLAIN, false).await.unwrap().secret;
        let renderer =
            daemon.renderer(&host.launch_app(APP, r#"{"apiVersion":"v2"}"#).await.unwrap().launch_token).await;
        let plain =
            daemon.renderer(&host.launch_app(PLAIN, r#"{"apiVersion":"v2"}"#).await.unwrap().launch_token).await;
        Backend { http: Http::new(address), daemon, host, secret, plain_secret, renderer, plain }
    }

    async fn login_code(&self) -> String {
        within("login", self.renderer.call(v1::LoginRequest::default())).await.expect("login").code
    }

    async fn phone_code(&self) -> String {
        within("getPhoneNumber", self.renderer.call(v1::GetPhoneNumberRequest {})).await.expect("phone").code
    }

    async fn email_code(&self) -> String {
        within("getEmail", self.renderer.call(v1::GetEmailRequest {})).await.expect("email").code
    }

    fn session_path(&self, prefix: &str, code: &str) -> String {
        format!(
            "{prefix}/sns/jscode2session?appid={APP}&secret={}&js_code={code}&grant_type=authorization_code",
            self.secret
        )
    }

    /// A login of the app without a union group, exchanged over HTTP.
    async fn plain_session(&self) -> Value {
        let code = within("login", self.plain.call(v1::LoginRequest::default())).await.expect("login").code;
        let path = format!(
            "/sns/jscode2session?appid={PLAIN}&secret={}&js_code={code}&grant_type=authorization_code",
            self.plain_secret
        );
        self.http.get(&path).await
    }

    async fn token(&self) -> String {
        let body = self
            .http
            .get(&format!("/cgi-bin/token?grant_type=client_credential&appid={APP}&secret={}", self.secret))
            .await;
        body["access_token"].as_str().expect("an access token").to_owned()
    }
}

#[tokio::test]
async fn jscode2session_answers_openid_session_key_and_unionid_as_wechat_does() {
    let b = Backend::start().await;
    let code = b.login_code().await;
    // A stray access_token (wechatpy sends one) and unknown parameters are ignored.
    let body = b.http.get(&format!("{}&access_token=stray&lang=en", b.session_path("", &code))).await;
    let keys: Vec<&str> = body.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys, ["openid", "session_key", "unionid"], "{body}");
    let openid = body["openid"].as_str().unwrap();
    assert!(openid.starts_with('o') && openid.len() > 20, "{openid}");
    assert!(!body["session_key"].as_str().unwrap().is_empty());

    // The same user's openid as the operator's session list shows; unionid only with a union group.
    let sessions = b.host.list_sessions(APP).await.unwrap();
    assert_eq!(sessions[0].openid, openid);
    let plain = b.plain_session().await;
    assert!(plain.get("unionid").is_none() && plain["openid"].as_str().unwrap() != openid, "{plain}");

    // One platform: a code redeemed over HTTP is spent for the gRPC Exchange service too.
    let mut exchange = ExchangeClient::new(connect::channel(&b.daemon.address()).await.unwrap());
    let request = v1::Code2SessionRequest { app_id: APP.into(), secret: b.secret.clone(), code: code.clone() };
    let status = exchange.code2_session(request).await.unwrap_err();
    assert_eq!(ExchangeError::decode(status.details()).unwrap().errcode, 40163);

    // Every refusal: reused, unknown, another app's code, wrong secret, unknown app, malformed.
    assert_wechat_err(&b.http.get(&b.session_path("", &code)).await, 40163, "code been used");
    assert_wechat_err(&b.http.get(&b.session_path("", "no-such-code")).await, 40029, "invalid code");
    let foreign = within("login", b.plain.call(v1::LoginRequest::default())).await.unwrap().code;
    assert_wechat_err(&b.http.get(&b.session_path("", &foreign)).await, 40029, "invalid code");
    let fresh = b.login_code().await;
    let wrong_secret =
        format!("/sns/jscode2session?appid={APP}&secret=wrong&js_code={fresh}&grant_type=authorization_code");
    assert_wechat_err(&b.http.get(&wrong_secret).await, 40125, "invalid appsecret");
    let unknown = format!(
        "/sns/jscode2session?appid=wxnosuchapp00001&secret={}&js_code={fresh}&grant_type=authorization_code",
        b.secret
    );
    // An unknown app id hears what a wrong secret hears: the answer does not tell which apps exist.
    assert_wechat_err(&b.http.get(&unknown).await, 40125, "invalid appsecret");
    let no_grant = format!("/sns/jscode2session?appid={APP}&secret={}&js_code={fresh}", b.secret);
    // WeChat's own codes for a bad or missing parameter, never 40001: on 40001 a backend library
    // (wechatpy) fetches a new access token and retries, over and over.
    assert_wechat_err(&b.http.get(&no_grant).await, 40002, "malformed request: grant_type must be authorization_code");
    let no_code = format!("/sns/jscode2session?appid={APP}&secret={}&grant_type=authorization_code", b.secret);
    assert_wechat_err(&b.http.get(&no_code).await, 41008, "malformed request: code is required");
    let no_secret = format!("/sns/jscode2session?appid={APP}&js_code={fresh}&grant_type=authorization_code");
    assert_wechat_err(&b.http.get(&no_secret).await, 41004, "malformed request: secret is required");
    let doubled = format!("{}&appid={APP}", b.session_path("", &fresh));
    assert_wechat_err(&b.http.get(&doubled).await, 47001, "data format error");

    // None of the refusals spent the fresh code; an expired one is "invalid code" too.
    assert!(b.http.get(&b.session_path("", &fresh)).await["openid"].is_string());
    let late = b.login_code().await;
    b.daemon.clock.advance_ms(300_000);
    assert_wechat_err(&b.http.get(&b.session_path("", &late)).await, 40029, "invalid code: expired");
}

#[tokio::test]
async fn access_tokens_are_issued_bound_to_the_app_and_expire() {
    let b = Backend::start().await;
    let path = format!("/cgi-bin/token?grant_type=client_credential&appid={APP}&secret={}", b.secret);
    let first = b.http.get(&path).await;
    assert_eq!(first["expires_in"], json!(7200), "{first}");
    let keys: Vec<&str> = first.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys, ["access_token", "expires_in"]);
    let second = b.http.get(&format!("{path}&force_refresh=yes")).await;
    assert_ne!(first["access_token"], second["access_token"], "each /cgi-bin/token call issues a fresh token");

    // stable_token: the same token until force_refresh.
    let stable = |force: bool| json!({"grant_type": "client_credential", "appid": APP, "secret": b.secret, "force_refresh": force});
    let s1 = b.http.post("/cgi-bin/stable_token", stable(false).to_string()).await;
    let s2 = b.http.post("/cgi-bin/stable_token", stable(false).to_string()).await;
    assert_eq!(s1["access_token"], s2["access_token"], "{s1} {s2}");
    let s3 = b.http.post("/cgi-bin/stable_token", stable(true).to_string()).await;
    assert_ne!(s1["access_token"], s3["access_token"]);
    assert_eq!(s3["expires_in"], json!(7200));
    // Fresh tokens do not push the stable token out: a backend holding it keeps working however
    // often other code calls /cgi-bin/token (an app keeps at most 32 fresh tokens).
    let mut latest = Value::Null;
    for _ in 0..40 {
        latest = b.http.get(&path).await;
        assert!(latest["access_token"].is_string(), "{latest}");
    }
    let with_stable = format!(
        "/wxa/checksession?access_token={}&openid=o&signature=s&sig_method=hmac_sha256",
        s3["access_token"].as_str().unwrap()
    );
    assert_wechat_err(&b.http.get(&with_stable).await, 87009, "invalid signature");

    // Refusals.
    let wrong = format!("/cgi-bin/token?grant_type=client_credential&appid={APP}&secret=nope");
    assert_wechat_err(&b.http.get(&wrong).await, 40125, "invalid appsecret");
    let bad_grant = format!("/cgi-bin/token?grant_type=password&appid={APP}&secret={}", b.secret);
    assert_wechat_err(&b.http.get(&bad_grant).await, 40002, "malformed request: grant_type must be client_credential");
    assert_wechat_err(&b.http.post("/cgi-bin/stable_token", "{not json").await, 47001, "data format error");
    assert_wechat_err(&b.http.post("/cgi-bin/stable_token", "[1]").await, 47001, "data format error");
    let typed = json!({"grant_type": "client_credential", "appid": APP, "secret": b.secret, "force_refresh": "yes"});
    assert_wechat_err(&b.http.post("/cgi-bin/stable_token", typed.to_string()).await, 47001, "data format error");
    let huge = format!(
        r#"{{"grant_type":"client_credential","appid":"{APP}","secret":"{}","x":"{}"}}"#,
        b.secret,
        "a".repeat(64 * 1024)
    );
    assert_wechat_err(&b.http.post("/cgi-bin/stable_token", huge).await, 47001, "data format error");

    // Tokens are bound to their app: another app's checksession with this token sees this app's
    // users only (its own user's openid is unknown there).
    let token = latest["access_token"].as_str().unwrap();
    let plain = b.plain_session().await;
    let check = format!(
        "/wxa/checksession?access_token={token}&openid={}&signature={}&sig_method=hmac_sha256",
        plain["openid"].as_str().unwrap(),
        signature(plain["session_key"].as_str().unwrap())
    );
    assert_wechat_err(&b.http.get(&check).await, 87009, "invalid signature");

    // After 7200 s the token is expired (42001); a token never issued is 40001.
    b.daemon.clock.advance_ms(7_200_000);
    let expired = format!("/wxa/checksession?access_token={token}&openid=o&signature=s&sig_method=hmac_sha256");
    assert_wechat_err(&b.http.get(&expired).await, 42001, "access_token expired");
    let never = "/wxa/checksession?access_token=never-issued&openid=o&signature=s&sig_method=hmac_sha256";
    assert_wechat_err(&b.http.get(never).await, 40001, "invalid credential, access_token is invalid or not latest");
}

#[tokio::test]
async fn checksession_accepts_only_the_live_sessions_signature() {
    let b = Backend::start().await;
    let session = b.http.get(&b.session_path("", &b.login_code().await)).await;
    let (openid, key) = (session["openid"].as_str().unwrap(), session["session_key"].as_str().unwrap());
    let token = b.token().await;
    let path = |sig: &str, method: &str| {
        format!("/wxa/checksession?access_token={token}&openid={openid}&signature={sig}&sig_method={method}")
    };
    assert_eq!(b.http.get(&path(&signature(key), "hmac_sha256")).await, json!({"errcode": 0, "errmsg": "ok"}));
    assert_eq!(b.http.get(&path(&signature(key).to_uppercase(), "hmac_sha256")).await["errcode"], json!(0));
    assert_wechat_err(&b.http.get(&path(&signature("not-the-key"), "hmac_sha256")).await, 87009, "invalid signature");
    assert_wechat_err(
        &b.http.get(&path(&signature(key), "md5")).await,
        87009,
        "malformed request: sig_method must be hmac_sha256",
    );

    // A login after sessions.key_refresh_secs replaces the session key: the old signature no
    // longer holds.
    b.daemon.clock.advance_ms(301_000);
    let again = b.http.get(&b.session_path("", &b.login_code().await)).await;
    assert_ne!(again["session_key"].as_str().unwrap(), key);
    assert_wechat_err(&b.http.get(&path(&signature(key), "hmac_sha256")).await, 87009, "invalid signature");
    assert_eq!(
        b.http.get(&path(&signature(again["session_key"].as_str().unwrap()), "hmac_sha256")).await["errcode"],
        json!(0)
    );
}

#[tokio::test]
async fn getuserphonenumber_and_getuseremail_redeem_value_codes_with_an_access_token() {
    let b = Backend::start().await;
    let token = b.token().await;
    let phone_path = format!("/wxa/business/getuserphonenumber?access_token={token}");
    b.daemon.clock.advance_ms(5_000);
    let code = b.phone_code().await;
    let body = b.http.post(&phone_path, json!({ "code": code }).to_string()).await;
    let timestamp = (T0_MS + 5_000) / 1000;
    assert_eq!(
        body,
        json!({"errcode": 0, "errmsg": "ok", "phone_info": {
            "phoneNumber": "13800138000", "purePhoneNumber": "13800138000", "countryCode": "86",
            "watermark": {"timestamp": timestamp, "appid": APP}}})
    );
    assert_wechat_err(&b.http.post(&phone_path, json!({ "code": code }).to_string()).await, 40163, "code been used");

    // With openid, the code must be that user's: another openid is "invalid code" and spends nothing.
    let code = b.phone_code().await;
    let wrong = json!({"code": code, "openid": "o-someone-else"}).to_string();
    assert_wechat_err(&b.http.post(&phone_path, wrong).await, 40029, "invalid code");
    let session = b.http.get(&b.session_path("", &b.login_code().await)).await;
    let right = json!({"code": code, "openid": session["openid"]}).to_string();
    assert_eq!(b.http.post(&phone_path, right).await["phone_info"]["purePhoneNumber"], json!("13800138000"));

    // A login code is not a phone code; bodies and tokens are checked.
    let login = json!({ "code": b.login_code().await }).to_string();
    assert_wechat_err(&b.http.post(&phone_path, login).await, 40029, "invalid code");
    assert_wechat_err(&b.http.post(&phone_path, "code=1").await, 47001, "data format error");
    assert_wechat_err(&b.http.post(&phone_path, "{}").await, 41008, "malformed request: code is required");
    let no_token = json!({ "code": b.phone_code().await }).to_string();
    assert_wechat_err(
        &b.http.post("/wxa/business/getuserphonenumber", no_token).await,
        40001,
        "invalid credential, access_token is invalid or not latest",
    );

    // E-mail, our path in the same style.
    let email_path = format!("/wxa/business/getuseremail?access_token={token}");
    let email = b.http.post(&email_path, json!({ "code": b.email_code().await }).to_string()).await;
    assert_eq!(
        email,
        json!({"errcode": 0, "errmsg": "ok", "email_info": {"email": "u1@example.invalid",
            "watermark": {"timestamp": timestamp, "appid": APP}}})
    );
    let phone_as_email = json!({ "code": b.phone_code().await }).to_string();
    assert_wechat_err(&b.http.post(&email_path, phone_as_email).await, 40029, "invalid code");
}

#[tokio::test]
async fn openserver_paths_answer_in_tcmpp_shape() {
    let b = Backend::start().await;
    let is_request_id =
        |v: &Value| v.as_str().is_some_and(|s| s.len() == 32 && s.bytes().all(|c| c.is_ascii_hexdigit()));

    let ok = b.http.get(&b.session_path("/openserver", &b.login_code().await)).await;
    assert_eq!((ok["errcode"].clone(), ok["errmsg"].clone()), (json!(0), json!("ok")), "{ok}");
    assert!(is_request_id(&ok["requestId"]), "{ok}");
    assert!(ok["openid"].as_str().unwrap().starts_with('o') && ok["unionid"].as_str().is_some_and(|u| !u.is_empty()));
    let refused = b.http.get(&b.session_path("/openserver", "nope")).await;
    assert!(is_request_id(&refused["requestId"]), "{refused}");
    let mut without_id = refused.clone();
    without_id.as_object_mut().unwrap().remove("requestId");
    assert_eq!(
        without_id,
        json!({"errcode": 40029, "errmsg": "invalid code", "openid": "", "session_key": "", "unionid": ""})
    );

    let token_path = format!("/openserver/cgi-bin/token?grant_type=client_credential&appid={APP}&secret={}", b.secret);
    let token = b.http.get(&token_path).await;
    assert_eq!((token["errcode"].clone(), token["expires_in"].clone()), (json!(0), json!(7200)), "{token}");
    assert!(is_request_id(&token["requestId"]));
    let bad = b.http.get(&format!("/openserver/cgi-bin/token?grant_type=client_credential&appid={APP}&secret=x")).await;
    assert_eq!((bad["errcode"].clone(), bad["access_token"].clone()), (json!(40125), json!("")), "{bad}");
    assert!(is_request_id(&bad["requestId"]));

    let session = b.http.get(&b.session_path("", &b.login_code().await)).await;
    let check = |sig: String| {
        format!(
            "/openserver/wxa/checksession?access_token={}&openid={}&signature={sig}&sig_method=hmac_sha256",
            token["access_token"].as_str().unwrap(),
            session["openid"].as_str().unwrap()
        )
    };
    let good = b.http.get(&check(signature(session["session_key"].as_str().unwrap()))).await;
    assert_eq!((good["errcode"].clone(), good["errmsg"].clone()), (json!(0), json!("ok")));
    assert!(is_request_id(&good["requestId"]));
    let bad = b.http.get(&check(signature("x"))).await;
    assert_err(&bad, 87009, "invalid signature");
    assert!(is_request_id(&bad["requestId"]));
}

#[tokio::test]
async fn the_rate_limit_is_one_per_app_over_both_surfaces() {
    let b = Backend::start_with(|c| {
        c.limits.exchanges_per_minute_per_app = 1;
        c.limits.exchange_burst_per_app = 3;
    })
    .await;
    // Attempts that prove the app (its secret) spend its bucket, whatever they then ask.
    for _ in 0..3 {
        assert_wechat_err(&b.http.get(&b.session_path("", "no-such-code")).await, 40029, "invalid code");
    }
    let limited = b.http.get(&b.session_path("", &b.login_code().await)).await;
    assert_wechat_err(&limited, 45011, "api minute-quota reach limit, rate limit exceeded");
    let tcmpp = b.http.get(&b.session_path("/openserver", "x")).await;
    assert_err(&tcmpp, 45011, "api minute-quota reach limit, rate limit exceeded");

    // The gRPC Exchange service draws on the same bucket.
    let mut exchange = ExchangeClient::new(connect::channel(&b.daemon.address()).await.unwrap());
    let request = v1::Code2SessionRequest { app_id: APP.into(), secret: b.secret.clone(), code: "x".into() };
    let status = exchange.code2_session(request).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert_eq!(ExchangeError::decode(status.details()).unwrap().errcode, 45011);

    // Another app is unaffected.
    let plain = format!("/cgi-bin/token?grant_type=client_credential&appid={PLAIN}&secret={}", b.plain_secret);
    assert!(b.http.get(&plain).await["access_token"].is_string());
}

#[tokio::test]
async fn a_broken_store_answers_system_busy() {
    let dir = tempfile::Builder::new().prefix("brokerd-test").tempdir().unwrap();
    let mut config = miniapp_brokerd::Config::ephemeral_in(dir.path());
    config.ephemeral = false;
    config.backend_http.listen = Some("127.0.0.1:0".into());
    let daemon = Daemon::start_in(dir, config).await;
    let http = Http::new(daemon.server.backend_http_addr().unwrap());
    let host = within("host", daemon.host().connect()).await.unwrap();
    let secret = host.register_app(APP, false).await.unwrap().secret;
    let path = format!("/cgi-bin/token?grant_type=client_credential&appid={APP}&secret={secret}");
    assert!(http.get(&path).await["access_token"].is_string());
    // An app whose secret has not been checked yet: its first check reads the file.
    let unchecked = host.register_app(PLAIN, false).await.unwrap().secret;
    let unchecked = format!("/cgi-bin/token?grant_type=client_credential&appid={PLAIN}&secret={unchecked}");

    // The database file is overwritten under the running daemon: its next read fails.
    let db = daemon.dir.path().join("broker.db");
    std::fs::write(&db, vec![0xA5u8; 64 * 1024]).unwrap();
    for wal in ["broker.db-wal", "broker.db-shm"] {
        let _ = std::fs::write(daemon.dir.path().join(wal), vec![0xA5u8; 64 * 1024]);
    }
    let body = http.get(&unchecked).await;
    assert_eq!(body["errcode"], json!(-1), "{body}");
    assert!(body["errmsg"].as_str().unwrap().starts_with("system error"), "{body}");
    // A checked app's secret hash is kept in memory, and its tokens are too: it still gets one.
    assert!(http.get(&path).await["access_token"].is_string());
}

#[tokio::test]
async fn unknown_paths_and_methods_get_json_refusals() {
    let b = Backend::start().await;
    let (status, body) = b.http.send(Method::GET, "/cgi-bin/nothing", Vec::new()).await;
    assert_eq!((status, body["errcode"].clone()), (404, json!(40066)), "{body}");
    let (status, body) = b.http.send(Method::POST, "/sns/jscode2session", Vec::new()).await;
    assert_eq!((status, body["errcode"].clone()), (405, json!(40066)), "{body}");
    let (status, body) = b.http.send(Method::POST, "/openserver/cgi-bin/token", Vec::new()).await;
    assert_eq!((status, body["errcode"].clone()), (405, json!(40066)), "{body}");
}

#[tokio::test]
async fn the_listener_is_off_by_default_and_refuses_a_remote_address_unless_allowed() {
    let daemon = Daemon::start().await;
    assert_eq!(daemon.server.backend_http_addr(), None);
    let host = within("host", daemon.host().connect()).await.unwrap();
    let status = host.admin().status(host.authorize(v1::StatusRequest {})).await.unwrap().into_inner();
    assert_eq!(status.backend_http, "");

    let dir = tempfile::tempdir().unwrap();
    let mut config = miniapp_brokerd::Config::ephemeral_in(dir.path());
    config.backend_http.listen = Some("0.0.0.0:0".into());
    let refused = miniapp_brokerd::start(config).await.unwrap_err().to_string();
    assert!(refused.contains("allow_remote") && refused.contains("TLS"), "{refused}");
}

/// `serve --backend-listen 127.0.0.1:0` (the real binary) logs the bound address, and
/// `status --json` shows it under `backend_http`.
#[tokio::test]
async fn serve_backend_listen_logs_the_address_and_status_shows_it() {
    let bin = env!("CARGO_BIN_EXE_miniapp-brokerd");
    let dir = tempfile::Builder::new().prefix("brokerd-cli").tempdir().unwrap();
    let socket = dir.path().join("brokerd.sock");
    let data = dir.path().join("data");
    let mut child = tokio::process::Command::new(bin)
        .args(["serve", "--ephemeral", "--backend-listen", "127.0.0.1:0", "--socket"])
        .arg(&socket)
        .arg("--data-dir")
        .arg(&data)
        .env("XDG_CONFIG_HOME", dir.path().join("config"))
        .env_remove("MINIAPP_BROKERD_CONFIG")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let url = within("the backend address line", async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(url) = line.strip_prefix("miniapp-brokerd: backend HTTP API at ") {
                return url.to_owned();
            }
            seen.push(line);
        }
        panic!("serve ended without printing the backend address: {seen:#?}");
    })
    .await;
    let address: SocketAddr = url.strip_prefix("http://").unwrap().parse().unwrap();
    assert!(address.port() != 0);
    assert!(
        seen.iter().any(|l| l.contains("backend HTTP API listening") && l.contains(&address.to_string())),
        "{seen:#?}"
    );

    let out = within(
        "status --json",
        tokio::process::Command::new(bin)
            .args(["status", "--json", "--socket"])
            .arg(&socket)
            .arg("--token-file")
            .arg(data.join("host.token"))
            .env("XDG_CONFIG_HOME", dir.path().join("config"))
            .env_remove("MINIAPP_BROKERD_CONFIG")
            .output(),
    )
    .await
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["backend_http"], json!(address.to_string()), "{status}");

    // It really serves there.
    let (code, body) =
        Http::new(address).send(Method::GET, "/cgi-bin/token?grant_type=client_credential", Vec::new()).await;
    assert_eq!((code, body["errcode"].clone()), (200, json!(41002)), "{body}");
    child.kill().await.unwrap();
}

const WECHATPY_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../clients/python/backend_wechatpy.py");
const WECHATPY_INSTALL: &str = "python3 -m pip install -r clients/python/backend-requirements.txt";

/// wechatpy, unmodified from PyPI, runs a backend's login, phone and checksession against the
/// daemon with only where it connects changed (clients/python/backend_wechatpy.py). Without
/// python3 or wechatpy this test fails with the install command: it never passes unrun.
#[tokio::test]
async fn wechatpy_backend_runs_against_the_daemon() {
    let probe = tokio::process::Command::new("python3")
        .args(["-c", "import wechatpy; print(wechatpy.__version__)"])
        .kill_on_drop(true)
        .output();
    match within("python3 probe", probe).await {
        Err(e) => panic!("python3 is not available ({e}); install Python 3, then: {WECHATPY_INSTALL}"),
        Ok(out) if !out.status.success() => panic!(
            "wechatpy is not installed; run: {WECHATPY_INSTALL}\n{}",
            String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or_default()
        ),
        Ok(_) => {}
    }
    let b = Backend::start().await;
    let base = format!("http://{}", b.daemon.server.backend_http_addr().unwrap());
    let (login, phone) = (b.login_code().await, b.phone_code().await);
    let run = tokio::process::Command::new("python3")
        .arg(WECHATPY_SCRIPT)
        // `--flag=value`: secrets and codes are base64url and may start with '-'.
        .args([
            format!("--base-url={base}"),
            format!("--appid={APP}"),
            format!("--secret={}", b.secret),
            format!("--login-code={login}"),
            format!("--phone-code={phone}"),
        ])
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .kill_on_drop(true)
        .output();
    let out = within("backend_wechatpy.py", run).await.expect("python3 runs");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "wechatpy backend failed ({}):\n{stdout}\n{stderr}", out.status);
    let expected = [
        "ok access token fetched and managed by wechatpy",
        "ok code_to_session returned openid and session_key",
        "ok getuserphonenumber purePhoneNumber=13800138000 countryCode=86",
        "ok checksession accepted the session's signature",
        "ok a reused login code is refused with 40163",
        "ok a wrong checksession signature is refused with 87009",
        "wechatpy backend: all ok",
    ];
    assert_eq!(stdout.lines().collect::<Vec<_>>(), expected, "stderr:\n{stderr}");

    // The daemon agrees: the login code and the phone code are spent.
    let reuse = b.http.get(&b.session_path("", &login)).await;
    assert_wechat_err(&reuse, 40163, "code been used");
}

/// At most `max_connections` at once, and a connection that sends nothing is closed after
/// `idle_timeout_ms`: two silent clients hold both slots until the daemon closes them, and only
/// then is the next client answered.
#[tokio::test]
async fn silent_connections_are_closed_and_connections_are_capped() {
    let b = Backend::start_with(|c| {
        c.backend_http.max_connections = 2;
        c.backend_http.idle_timeout_ms = 300;
    })
    .await;
    let address = b.daemon.server.backend_http_addr().unwrap();
    let silent = [
        tokio::net::TcpStream::connect(address).await.unwrap(),
        tokio::net::TcpStream::connect(address).await.unwrap(),
    ];
    let path = format!("/cgi-bin/token?grant_type=client_credential&appid={APP}&secret={}", b.secret);
    assert!(b.http.get(&path).await["access_token"].is_string());
    // The answer came through a slot a silent client held: the daemon had closed that one first.
    let closed = silent.iter().filter(|s| matches!(s.try_read(&mut [0u8; 1]), Ok(0))).count();
    assert!(closed >= 1, "the third client was answered while both silent connections were open");
    for mut s in silent {
        let mut buf = [0u8; 1];
        let n = within("the daemon closes a silent connection", tokio::io::AsyncReadExt::read(&mut s, &mut buf)).await;
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    }
}

/// The disclosure ledger records what a backend redeemed over HTTP, with that surface (the
/// platform's one redeem path stamps it), and a phone code whose scope the user turned off is
/// refused over HTTP at once, as over gRPC.
#[tokio::test]
async fn http_redemptions_are_in_the_ledger_and_a_refused_scope_bites_over_http_too() {
    use miniapp_broker_client::proto::{api::scope, v1::Decision};
    let b = Backend::start().await;
    let token = b.token().await;
    let phone_path = format!("/wxa/business/getuserphonenumber?access_token={token}");
    let session = b.http.get(&b.session_path("", &b.login_code().await)).await;
    assert!(session["openid"].is_string(), "{session}");
    let redeemed = b.http.post(&phone_path, json!({ "code": b.phone_code().await }).to_string()).await;
    assert_eq!(redeemed["errcode"], 0, "{redeemed}");

    let outstanding = b.phone_code().await;
    let mut events = b.host.consent_changes();
    b.host.set_decision(APP, "u1", scope::PHONE_NUMBER, Decision::Refused).await.expect("the user turns it off");
    let changed = within("consent event", events.recv()).await.expect("event");
    assert_eq!((changed.scope.as_str(), changed.decision()), (scope::PHONE_NUMBER, Decision::Refused));
    let refused = b.http.post(&phone_path, json!({ "code": outstanding }).to_string()).await;
    assert_wechat_err(&refused, 40029, "invalid code");

    // The two phone codes are one row (privacy.ledger_coalesce_secs): two issued, one redeemed.
    let ledger = b.host.ledger(APP, "u1", 0).await.expect("ledger");
    let rows: Vec<_> = ledger
        .iter()
        .map(|d| (d.what.as_str(), d.via_code, d.redeemed_via.as_str(), d.count, d.redeemed_count))
        .collect();
    assert_eq!(
        rows,
        [
            ("openid", true, "backend_http", 1, 1),
            ("unionid", true, "backend_http", 1, 1),
            ("phone_number", true, "backend_http", 2, 1),
        ]
    );
}

/// The userInfo a profile host answers, and what the host puts beside it (which v2/v3 drop: the
/// host cannot know the session key) or keeps (v1: the host ran its own login).
fn profile_info() -> v1::UserInfo {
    v1::UserInfo {
        nick_name: "Ada \"the\" Countess".into(),
        avatar_url: "https://example.invalid/ada.png".into(),
        gender: 2,
        country: "UK".into(),
        province: "".into(),
        city: "London".into(),
        language: "en".into(),
    }
}

const HOST_RAW: &str = "host-raw-data";
const HOST_SIGNATURE: &str = "host-signature";

/// A backend whose host answers getUserInfo and getUserProfile with [`profile_info`] and its own
/// raw_data / signature / encrypted_data / iv, and whose logins always make a new key.
async fn profile_backend() -> Backend {
    Backend::start_full(
        |c| c.sessions.key_refresh_secs = 0,
        |host| {
            host.handle(|_app, _r: v1::GetUserInfoRequest| async move {
                Ok(v1::GetUserInfoResponse {
                    user_info: Some(profile_info()),
                    raw_data: HOST_RAW.into(),
                    signature: HOST_SIGNATURE.into(),
                    encrypted_data: "host-encrypted".into(),
                    iv: "host-iv".into(),
                    ..Default::default()
                })
            })
            .handle(|_app, _r: v1::GetUserProfileRequest| async move {
                Ok(v1::GetUserProfileResponse {
                    user_info: Some(profile_info()),
                    raw_data: HOST_RAW.into(),
                    signature: HOST_SIGNATURE.into(),
                    ..Default::default()
                })
            })
        },
    )
    .await
}

/// The four credential fields of a JSON answer, with the surface it came through.
fn credentials(surface: &str, answer: &Value) -> Value {
    let field = |name: &str| answer[name].as_str().unwrap_or_else(|| panic!("{surface}: no {name} in {answer}"));
    json!({
        "surface": surface,
        "rawData": field("rawData"),
        "signature": field("signature"),
        "encryptedData": field("encryptedData"),
        "iv": field("iv"),
    })
}

fn typed_credentials(surface: &str, raw: &str, signature: &str, encrypted: &str, iv: &str) -> Value {
    json!({ "surface": surface, "rawData": raw, "signature": signature, "encryptedData": encrypted, "iv": iv })
}

async fn profile_on_every_surface(r: &RendererClient) -> Vec<Value> {
    let profile = || v1::GetUserProfileRequest { desc: "show your name".into(), lang: "en".into() };
    let info = || v1::GetUserInfoRequest { with_credentials: true, lang: "en".into() };
    let mut out = Vec::new();
    let p = within("stream getUserProfile", r.call(profile())).await.expect("getUserProfile");
    out.push(typed_credentials("stream getUserProfile", &p.raw_data, &p.signature, &p.encrypted_data, &p.iv));
    let p = within("unary getUserProfile", r.call_unary(profile())).await.expect("getUserProfile");
    out.push(typed_credentials("unary getUserProfile", &p.raw_data, &p.signature, &p.encrypted_data, &p.iv));
    let i = within("stream getUserInfo", r.call(info())).await.expect("getUserInfo");
    out.push(typed_credentials("stream getUserInfo", &i.raw_data, &i.signature, &i.encrypted_data, &i.iv));
    let i = within("unary getUserInfo", r.call_unary(info())).await.expect("getUserInfo");
    out.push(typed_credentials("unary getUserInfo", &i.raw_data, &i.signature, &i.encrypted_data, &i.iv));
    let params = json!({"desc": "show your name", "success": "fn"});
    let j = within("Invoke getUserProfile", r.invoke_json("getUserProfile", &params)).await.expect("ok");
    out.push(credentials("Invoke getUserProfile", &j));
    let j = within("Invoke getUserInfo", r.invoke_json("getUserInfo", &json!({"withCredentials": true}))).await;
    out.push(credentials("Invoke getUserInfo", &j.expect("ok")));
    out
}

const USER_DATA_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../clients/python/backend_user_data.py");

/// What getUserInfo / getUserProfile return in v2 is what WeChat returns: wechatpy, unmodified,
/// verifies the signature (`check_wxa_signature`) and decrypts the data (`WeChatWxaCrypto`) of
/// every surface's answer with the session key it redeemed; every login code of the session
/// redeems to the session's current key; a key a later login replaced fails checksession (87009),
/// the signature and the decryption, while the current key works (clients/python/backend_user_data.py).
#[tokio::test]
async fn wechatpy_verifies_the_profile_credentials_and_a_replaced_key_fails() {
    let b = profile_backend().await;
    // A backend that redeemed its code in time holds this key ...
    let first = b.http.get(&b.session_path("", &b.login_code().await)).await;
    let stale = first["session_key"].as_str().unwrap().to_owned();
    let before = profile_on_every_surface(&b.renderer).await.swap_remove(0);
    // ... until two more logins replace it. Both codes, redeemed later, give the current key.
    let codes = [b.login_code().await, b.login_code().await];
    let answers = profile_on_every_surface(&b.renderer).await;
    for answer in &answers {
        let raw: Value = serde_json::from_str(answer["rawData"].as_str().unwrap()).unwrap();
        assert_eq!(raw["nickName"], json!("Ada \"the\" Countess"), "the daemon's rawData, not the host's: {answer}");
    }
    let input = json!({
        "base_url": format!("http://{}", b.daemon.server.backend_http_addr().unwrap()),
        "appid": APP, "secret": b.secret, "codes": codes, "stale_key": stale,
        "answers": answers, "before": before,
    });
    let lines = run_python(USER_DATA_SCRIPT, &input).await;
    let mut expected = vec![
        "ok code_to_session: all 2 login codes redeem to the session's current key".to_owned(),
        "ok checksession accepts the current key".to_owned(),
    ];
    for a in &answers {
        let surface = a["surface"].as_str().unwrap();
        expected.push(format!(
            "ok {surface}: check_wxa_signature and WeChatWxaCrypto accept it (nickName=Ada \"the\" Countess)"
        ));
    }
    expected.extend(
        [
            "ok checksession refuses the replaced key with 87009",
            "ok the replaced key fails check_wxa_signature and decryption of every later answer",
            "ok the answer made before the new logins verifies with the key of its time",
            "ok the watermark names the app: another appid is refused",
            "wechatpy user data: all ok",
        ]
        .map(String::from),
    );
    assert_eq!(lines, expected);
}

/// Runs a backend script with `input` on stdin; its stdout lines (it must succeed). Without
/// python3 or wechatpy it fails with the install command.
async fn run_python(script: &str, input: &Value) -> Vec<String> {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new("python3")
        .arg(script)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("python3 is not available ({e}); install Python 3, then: {WECHATPY_INSTALL}"));
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.to_string().as_bytes()).await.unwrap();
    drop(stdin);
    let out = within(script, child.wait_with_output()).await.expect("python3 runs");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        !stderr.contains("No module named 'wechatpy'"),
        "wechatpy is not installed; run: {WECHATPY_INSTALL}\n{stderr}"
    );
    assert!(out.status.success(), "{script} failed ({}):\n{stdout}\n{stderr}", out.status);
    stdout.lines().map(String::from).collect()
}

/// WeChat's rules: getUserInfo without `withCredentials`, and either API without a live session,
/// answer `userInfo` only (the JSON bridge leaves the four fields out); the host's own fields are
/// dropped in v2. In v1 the host ran its own login: its answer passes through untouched.
#[tokio::test]
async fn without_credentials_or_a_session_only_user_info_and_v1_passes_the_host_fields_through() {
    let b = profile_backend().await;
    let no_credentials = v1::GetUserInfoRequest { with_credentials: false, lang: String::new() };
    let profile = || v1::GetUserProfileRequest { desc: "d".into(), lang: String::new() };

    // v2, no login yet: no session, so no credentials, even for getUserProfile.
    let p = within("profile", b.renderer.call(profile())).await.unwrap();
    assert_eq!(p.user_info, Some(profile_info()));
    assert_eq!((p.raw_data.as_str(), p.signature.as_str(), p.encrypted_data.as_str(), p.iv.as_str()), ("", "", "", ""));

    // With a session: getUserInfo without withCredentials still answers userInfo only.
    b.login_code().await;
    for i in [
        within("stream", b.renderer.call(no_credentials.clone())).await.unwrap(),
        within("unary", b.renderer.call_unary(no_credentials.clone())).await.unwrap(),
    ] {
        assert_eq!(i.user_info, Some(profile_info()));
        assert_eq!(
            (i.raw_data.as_str(), i.signature.as_str(), i.encrypted_data.as_str(), i.iv.as_str()),
            ("", "", "", "")
        );
    }
    let j = within("Invoke", b.renderer.invoke_json("getUserInfo", &json!({"withCredentials": false}))).await.unwrap();
    let keys: Vec<&str> = j.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys, ["errMsg", "userInfo"], "{j}");
    assert_eq!(j["userInfo"]["nickName"], json!("Ada \"the\" Countess"));
    let p = within("profile", b.renderer.call(profile())).await.unwrap();
    assert!(p.raw_data != HOST_RAW && p.signature.len() == 40 && !p.encrypted_data.is_empty(), "{p:?}");

    // v1: the host's fields, untouched, on every surface.
    let v1_app = b.daemon.renderer(&b.host.launch_app(APP, r#"{"apiVersion":"v1"}"#).await.unwrap().launch_token).await;
    let with = v1::GetUserInfoRequest { with_credentials: true, lang: String::new() };
    for i in [
        within("v1 stream", v1_app.call(with.clone())).await.unwrap(),
        within("v1 unary", v1_app.call_unary(with.clone())).await.unwrap(),
    ] {
        assert_eq!(
            (i.raw_data.as_str(), i.signature.as_str(), i.encrypted_data.as_str(), i.iv.as_str()),
            (HOST_RAW, HOST_SIGNATURE, "host-encrypted", "host-iv")
        );
    }
    let j = within("v1 Invoke", v1_app.invoke_json("getUserProfile", &json!({"desc": "d"}))).await.unwrap();
    assert_eq!((j["rawData"].clone(), j["signature"].clone()), (json!(HOST_RAW), json!(HOST_SIGNATURE)), "{j}");
    assert!(j.get("encryptedData").is_none(), "the host sent none: {j}");
}

/// `/wxa/resetusersessionkey`: with the current key's signature the session gets a new key (the
/// old one stops working, the new one works, and later profile answers use it); a wrong
/// signature changes nothing.
#[tokio::test]
async fn resetusersessionkey_replaces_the_key_for_the_current_keys_signature() {
    let b = profile_backend().await;
    let session = b.http.get(&b.session_path("", &b.login_code().await)).await;
    let (openid, key) = (session["openid"].as_str().unwrap(), session["session_key"].as_str().unwrap());
    let token = b.token().await;
    let reset = |sig: &str| {
        format!("/wxa/resetusersessionkey?access_token={token}&openid={openid}&signature={sig}&sig_method=hmac_sha256")
    };
    let check = |k: &str| {
        format!(
            "/wxa/checksession?access_token={token}&openid={openid}&signature={}&sig_method=hmac_sha256",
            signature(k)
        )
    };
    assert_wechat_err(&b.http.get(&reset(&signature("not-the-key"))).await, 87009, "invalid signature");
    assert_eq!(b.http.get(&check(key)).await["errcode"], json!(0), "a refused reset changes nothing");
    let answer = b.http.get(&reset(&signature(key))).await;
    assert_eq!((answer["errcode"].clone(), answer["openid"].clone()), (json!(0), json!(openid)), "{answer}");
    let new = answer["session_key"].as_str().unwrap();
    assert!(new != key && new.len() == 24 && new.ends_with("=="), "{new}");
    assert_wechat_err(&b.http.get(&check(key)).await, 87009, "invalid signature");
    assert_eq!(b.http.get(&check(new)).await["errcode"], json!(0));
    let p = within("profile", b.renderer.call(v1::GetUserProfileRequest { desc: "d".into(), lang: String::new() }))
        .await
        .unwrap();
    use sha1::Digest;
    let expected: String =
        sha1::Sha1::digest(format!("{}{new}", p.raw_data)).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(p.signature, expected, "later answers are signed with the new key");
}

/// A backend that redeems the earlier of two login codes gets the session's current key, not the
/// one the later login replaced, so its checksession holds; repeated logins within
/// `sessions.key_refresh_secs` keep the key.
#[tokio::test]
async fn an_earlier_login_code_redeems_to_the_sessions_current_key() {
    // Codes that outlive the key's refresh period (300 s), so the earlier code is still good.
    let b = Backend::start_with(|c| c.sessions.code_ttl_secs = 600).await;
    let token = b.token().await;
    let check = |openid: &str, key: &str| {
        format!(
            "/wxa/checksession?access_token={token}&openid={openid}&signature={}&sig_method=hmac_sha256",
            signature(key)
        )
    };
    let earlier = b.login_code().await;
    b.daemon.clock.advance_ms(301_000);
    let later = b.login_code().await;
    let first = b.http.get(&b.session_path("", &earlier)).await;
    let (openid, key) = (first["openid"].as_str().unwrap(), first["session_key"].as_str().unwrap());
    assert_eq!(b.http.get(&check(openid, key)).await, json!({"errcode": 0, "errmsg": "ok"}), "the earlier code's key");
    let second = b.http.get(&b.session_path("", &later)).await;
    assert_eq!(second["session_key"].as_str(), Some(key), "both codes of the session give its current key");
    let decoded = base64::engine::Engine::decode(&base64::engine::general_purpose::STANDARD, key);
    assert_eq!(decoded.map(|k| k.len()).ok(), Some(16), "standard base64 of 16 bytes: {key}");

    // Within the refresh period a login keeps the key.
    let again = b.http.get(&b.session_path("", &b.login_code().await)).await;
    assert_eq!(again["session_key"].as_str(), Some(key));
}

fn token_path(app_id: &str, secret: &str) -> String {
    format!("/cgi-bin/token?grant_type=client_credential&appid={app_id}&secret={secret}")
}

/// Two peers dripping a request head, one byte every 100 ms, hold both slots
/// (`max_connections = 2`) only until `header_timeout_ms`, although each byte comes well within
/// the idle timeout of the last: the honest `/cgi-bin/token` behind them is answered, in bounded
/// time, once the daemon has closed them.
#[tokio::test]
async fn peers_dripping_request_heads_are_closed_at_the_header_timeout() {
    let b = Backend::start_with(|c| {
        c.backend_http.max_connections = 2;
        c.backend_http.header_timeout_ms = 500;
        c.backend_http.idle_timeout_ms = 60_000;
    })
    .await;
    let address = b.daemon.server.backend_http_addr().unwrap();
    let head = b"GET /cgi-bin/token?grant_type=client_credential&appid=wxdrip HTTP/1.1\r\nX-Pad: ";
    let mut drippers = Vec::new();
    for _ in 0..2 {
        drippers.push(drip(address, b"", head).await);
    }
    let started = std::time::Instant::now();
    let body = b.http.get(&token_path(APP, &b.secret)).await;
    let waited = started.elapsed();
    assert!(body["access_token"].is_string(), "{body}");
    for dripper in drippers {
        let sent = within("the dripper ends", dripper).await.unwrap();
        let sent = sent.expect("a dripping peer was kept for 300 bytes (30 s)");
        assert!(sent < 30, "a dripping peer was closed only after {sent} bytes (100 ms apart)");
    }
    assert!(waited < std::time::Duration::from_secs(5), "the honest request waited {waited:?}");
}

/// A peer that sends `at_once`, then `dripped` one byte every 100 ms (then `a`s), 300 bytes at
/// most (30 s): how many it dripped before the daemon closed it (`None`: never closed).
async fn drip(address: SocketAddr, at_once: &[u8], dripped: &'static [u8]) -> tokio::task::JoinHandle<Option<usize>> {
    let mut peer = tokio::net::TcpStream::connect(address).await.unwrap();
    peer.write_all(at_once).await.unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 64];
        for sent in 0..300 {
            let byte = dripped.get(sent).copied().unwrap_or(b'a');
            if peer.write_all(&[byte]).await.is_err() {
                return Some(sent);
            }
            // The attacker's pace (not a synchronisation): its next byte, unless closed first.
            tokio::select! {
                read = peer.read(&mut buf) => if matches!(read, Ok(0) | Err(_)) { return Some(sent) },
                () = tokio::time::sleep(std::time::Duration::from_millis(100)) => {}
            }
        }
        None
    })
}

/// Two peers that send a complete head and then drip its body hold both slots only until
/// `idle_timeout_ms` after the head (the deadline does not restart on each byte): the honest
/// request behind them is answered in bounded time.
#[tokio::test]
async fn peers_dripping_request_bodies_are_closed_at_the_idle_timeout() {
    let b = Backend::start_with(|c| {
        c.backend_http.max_connections = 2;
        c.backend_http.idle_timeout_ms = 500;
        c.backend_http.header_timeout_ms = 60_000;
    })
    .await;
    let address = b.daemon.server.backend_http_addr().unwrap();
    let head = b"POST /cgi-bin/stable_token HTTP/1.1\r\nHost: backend\r\nContent-Length: 10000\r\n\r\n";
    let mut drippers = Vec::new();
    for _ in 0..2 {
        drippers.push(drip(address, head, b"{\"appid\": \"").await);
    }
    let started = std::time::Instant::now();
    let body = b.http.get(&token_path(APP, &b.secret)).await;
    let waited = started.elapsed();
    assert!(body["access_token"].is_string(), "{body}");
    for dripper in drippers {
        let sent = within("the dripper ends", dripper).await.unwrap();
        let sent = sent.expect("a peer dripping its body was kept for 300 bytes (30 s)");
        assert!(sent < 30, "a peer dripping its body was closed only after {sent} bytes (100 ms apart)");
    }
    assert!(waited < std::time::Duration::from_secs(5), "the honest request waited {waited:?}");
}

/// Two peers that pipeline requests and never read the answers hold both slots only until
/// `write_timeout_ms`: the honest request behind them is answered, in bounded time, and they are
/// closed (each peer has a small receive buffer, so the daemon's answers back up quickly).
#[tokio::test]
async fn peers_that_pipeline_and_never_read_are_closed_at_the_write_timeout() {
    let b = Backend::start_with(|c| {
        c.backend_http.max_connections = 2;
        c.backend_http.write_timeout_ms = 500;
        c.backend_http.header_timeout_ms = 60_000;
        c.backend_http.idle_timeout_ms = 60_000;
    })
    .await;
    let address = b.daemon.server.backend_http_addr().unwrap();
    let mut unread = Vec::new();
    let mut writers = Vec::new();
    for _ in 0..2 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let (read_half, mut write_half) = socket.connect(address).await.unwrap().into_split();
        unread.push(read_half);
        writers.push(tokio::spawn(async move {
            // At most 40,000 requests, 100 at a time; the daemon stops taking them once its
            // answers back up, and this writer then waits until the test ends.
            let batch = b"GET /cgi-bin/nothing HTTP/1.1\r\nHost: backend\r\n\r\n".repeat(100);
            for _ in 0..400 {
                if write_half.write_all(&batch).await.is_err() {
                    return;
                }
            }
        }));
    }
    let started = std::time::Instant::now();
    let body = b.http.get(&token_path(APP, &b.secret)).await;
    let waited = started.elapsed();
    assert!(body["access_token"].is_string(), "{body}");
    assert!(waited < std::time::Duration::from_secs(10), "the honest request waited {waited:?}");
    // Both pipelining peers were closed: what they never read ends (or is reset).
    for mut peer in unread {
        let mut sink = Vec::new();
        // Ends at EOF or with a reset; `within` fails the test if it does not end.
        let _ended = within("the daemon closes a peer that never reads", peer.read_to_end(&mut sink)).await;
    }
    writers.iter().for_each(tokio::task::JoinHandle::abort);
}

/// The backend port speaks HTTP/1.1 only: a client opening with HTTP/2's preface (prior
/// knowledge, h2c) gets no answer but a closed connection, while HTTP/1.1 on the port works.
#[tokio::test]
async fn the_backend_port_refuses_http2_with_prior_knowledge() {
    let b = Backend::start().await;
    let address = b.daemon.server.backend_http_addr().unwrap();
    let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
    let uri = format!("http://{address}{}", token_path(APP, &b.secret));
    let answer = within("an HTTP/2 request", async move {
        let (client, connection) = h2::client::handshake(tcp).await?;
        let driver = tokio::spawn(connection);
        let mut client = client.ready().await?;
        let (response, _) = client.send_request(Request::get(uri).body(()).unwrap(), true)?;
        let response = response.await;
        driver.abort();
        response
    })
    .await;
    assert!(answer.is_err(), "an HTTP/2 request was answered: {answer:?}");
    assert!(b.http.get(&token_path(APP, &b.secret)).await["access_token"].is_string());
}

/// A flood of wrong secrets for an app, four times its whole bucket, does not spend what its real
/// backend may do: between the floods the backend keeps getting tokens over HTTP and exchanging
/// codes over gRPC, while the flood hears 40125 and, past the failure bucket, 45011.
#[tokio::test]
async fn wrong_secrets_for_an_app_do_not_lock_its_backend_out() {
    let b = Backend::start_with(|c| {
        c.limits.exchanges_per_minute_per_app = 1;
        c.limits.exchange_burst_per_app = 10;
        c.limits.failed_exchanges_per_minute = 1;
        c.limits.failed_exchange_burst = 5;
    })
    .await;
    let mut exchange = ExchangeClient::new(connect::channel(&b.daemon.address()).await.unwrap());
    let mut heard = Vec::new();
    for round in 0..4 {
        for i in 0..10 {
            let body = b.http.get(&token_path(APP, &format!("guess-{round}-{i}"))).await;
            assert!(body.get("access_token").is_none(), "{body}");
            heard.push(body["errcode"].as_i64().unwrap());
        }
        let guess = v1::Code2SessionRequest { app_id: APP.into(), secret: format!("guess-{round}"), code: "c".into() };
        let status = exchange.code2_session(guess).await.unwrap_err();
        heard.push(i64::from(ExchangeError::decode(status.details()).unwrap().errcode));

        // The real backend, between the floods: a token over HTTP, a login code over gRPC.
        let token = b.http.get(&token_path(APP, &b.secret)).await;
        assert!(token["access_token"].is_string(), "round {round}: {token}");
        let real = v1::Code2SessionRequest { app_id: APP.into(), secret: b.secret.clone(), code: b.login_code().await };
        within("code2Session", exchange.code2_session(real)).await.expect("the real backend's gRPC exchange");
    }
    assert_eq!(heard[..5], [40125; 5], "the failure bucket's burst hears 40125: {heard:?}");
    assert!(heard[5..].iter().all(|&e| e == 45011), "then 45011: {heard:?}");
}

/// A wrong secret gets the same answer whether its app id is registered or not, on both answer
/// shapes, over gRPC too, and at the failure bucket's bound as well: the answers do not tell
/// which apps exist.
#[tokio::test]
async fn registered_and_unknown_app_ids_get_one_answer_to_a_wrong_secret() {
    let b = Backend::start_with(|c| {
        c.limits.failed_exchanges_per_minute = 1;
        c.limits.failed_exchange_burst = 6;
    })
    .await;
    let unknown = "wxnosuchapp00001";
    let strip_id = |mut v: Value| {
        v.as_object_mut().unwrap().remove("requestId").expect("TCMPP answers carry a requestId");
        v
    };
    for prefix in ["", "/openserver"] {
        let registered = b.http.get(&format!("{prefix}{}", token_path(APP, "wrong"))).await;
        let not = b.http.get(&format!("{prefix}{}", token_path(unknown, "wrong"))).await;
        assert_eq!(registered["errcode"], json!(40125), "{registered}");
        if prefix.is_empty() {
            assert_eq!(registered, not);
        } else {
            assert_eq!(strip_id(registered), strip_id(not));
        }
    }
    let mut exchange = ExchangeClient::new(connect::channel(&b.daemon.address()).await.unwrap());
    let mut ask = async |app_id: &str| {
        let request = v1::Code2SessionRequest { app_id: app_id.into(), secret: "wrong".into(), code: "c".into() };
        let status = exchange.code2_session(request).await.unwrap_err();
        (status.code(), status.message().to_owned(), ExchangeError::decode(status.details()).unwrap())
    };
    let (registered, not) = (ask(APP).await, ask(unknown).await);
    assert_eq!(registered.2.errcode, 40125);
    assert_eq!(registered, not);
    // Six failures spent the failure bucket: past it, both hear 45011.
    let (registered, not) = (ask(APP).await, ask(unknown).await);
    assert_eq!(registered.2.errcode, 45011);
    assert_eq!(registered, not);
    assert_eq!(b.http.get(&token_path(APP, "wrong")).await, b.http.get(&token_path(unknown, "wrong")).await);
}

/// A request a web browser made (an `Origin` header, or fetch metadata other than
/// `Sec-Fetch-Site: none`) is refused with HTTP 403 and errcode 48001, on GET and POST paths,
/// even with the right secret; backends' libraries (no fetch metadata) and what a user typed in
/// the address bar (`none`) are answered.
#[tokio::test]
async fn requests_from_web_pages_are_refused() {
    let b = Backend::start().await;
    let path = token_path(APP, &b.secret);
    let stable = json!({ "grant_type": "client_credential", "appid": APP, "secret": b.secret }).to_string();
    let browsers: [&[(&str, &str)]; 5] = [
        &[("origin", "http://pages.example")],
        &[("origin", "null")],
        &[("sec-fetch-site", "cross-site"), ("sec-fetch-mode", "no-cors"), ("sec-fetch-dest", "image")],
        &[("sec-fetch-site", "same-site")],
        &[("sec-fetch-site", "same-origin")],
    ];
    for headers in browsers {
        for (method, path, body) in [
            (Method::GET, path.as_str(), Vec::new()),
            (Method::POST, "/cgi-bin/stable_token", stable.clone().into_bytes()),
            (Method::GET, "/openserver/cgi-bin/token", Vec::new()),
        ] {
            let (status, answer) = b.http.send_with(method, path, headers, body).await;
            assert_eq!((status, answer["errcode"].clone()), (403, json!(48001)), "{headers:?} {path}: {answer}");
            assert!(answer["errmsg"].as_str().unwrap().contains("Origin"), "{answer}");
            assert!(answer.get("access_token").is_none());
        }
    }
    let (status, typed) = b.http.send_with(Method::GET, &path, &[("sec-fetch-site", "none")], Vec::new()).await;
    assert_eq!(status, 200);
    assert!(typed["access_token"].is_string(), "{typed}");
    assert!(b.http.get(&path).await["access_token"].is_string());
}

/// A code its own app redeemed is "code been used" to that app only: another app presenting it
/// (with its own, right credentials) hears exactly what a code that never existed gets, over HTTP
/// and over gRPC, for login and phone codes, whichever surface spent it.
#[tokio::test]
async fn a_code_another_app_spent_looks_like_no_code_to_it() {
    let b = Backend::start().await;
    let as_plain = |code: &str| {
        format!(
            "/sns/jscode2session?appid={PLAIN}&secret={}&js_code={code}&grant_type=authorization_code",
            b.plain_secret
        )
    };
    let never = b.http.get(&as_plain("no-such-code")).await;
    assert_wechat_err(&never, 40029, "invalid code");
    let mut exchange = ExchangeClient::new(connect::channel(&b.daemon.address()).await.unwrap());
    let mut own_app = exchange.clone();
    let mut grpc = async |app_id: &str, secret: &str, code: &str| {
        let request = v1::Code2SessionRequest { app_id: app_id.into(), secret: secret.into(), code: code.into() };
        let status = exchange.code2_session(request).await.unwrap_err();
        (status.code(), status.message().to_owned(), ExchangeError::decode(status.details()).unwrap())
    };
    let never_grpc = grpc(PLAIN, &b.plain_secret, "no-such-code").await;

    // Spent over HTTP by its app.
    let code = b.login_code().await;
    assert!(b.http.get(&b.session_path("", &code)).await["openid"].is_string());
    assert_eq!(b.http.get(&as_plain(&code)).await, never, "another app presenting a spent code");
    assert_eq!(grpc(PLAIN, &b.plain_secret, &code).await, never_grpc);
    assert_wechat_err(&b.http.get(&b.session_path("", &code)).await, 40163, "code been used");

    // Spent over gRPC by its app.
    let code = b.login_code().await;
    let request = v1::Code2SessionRequest { app_id: APP.into(), secret: b.secret.clone(), code: code.clone() };
    within("code2Session", own_app.code2_session(request)).await.expect("its own app redeems it");
    assert_eq!(b.http.get(&as_plain(&code)).await, never);
    assert_eq!(grpc(PLAIN, &b.plain_secret, &code).await, never_grpc);
    assert_eq!(grpc(APP, &b.secret, &code).await.2.errcode, 40163, "its own app hears it was used");

    // A phone code, over getuserphonenumber with each app's own token.
    let phone = b.phone_code().await;
    let plain_token =
        b.http.get(&token_path(PLAIN, &b.plain_secret)).await["access_token"].as_str().unwrap().to_owned();
    let phone_path = |token: &str| format!("/wxa/business/getuserphonenumber?access_token={token}");
    let body = |code: &str| json!({ "code": code }).to_string();
    let never_phone = b.http.post(&phone_path(&plain_token), body("no-such-code")).await;
    assert_wechat_err(&never_phone, 40029, "invalid code");
    let own = b.http.post(&phone_path(&b.token().await), body(&phone)).await;
    assert_eq!(own["errcode"], json!(0), "{own}");
    assert_eq!(b.http.post(&phone_path(&plain_token), body(&phone)).await, never_phone);
}
