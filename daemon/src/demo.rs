//! `miniapp-brokerd demo`: the whole product in one command. It starts a daemon in memory on a
//! temporary socket, connects the dev-host (with a demo profile that refuses one v3 scope) and a
//! renderer as separate connections, calls every open API in v1, v2 and v3, exchanges the codes as
//! an app backend would (v2's over the backend HTTP API, with real HTTP requests, as a WeChat
//! backend library makes them; v3's over the gRPC `Exchange` service), and prints one line per call.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    body::Bytes,
    http::{Method, Request},
};
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};

use miniapp_broker_client::{
    RendererClient, connect,
    proto::{
        api::{Api, scope},
        v1::{self, ApiRequest, ApiResponse, api_request, api_response, exchange_client::ExchangeClient},
    },
};

use crate::{Config, config::AppConfig, dev_host};

/// The demo app's id.
pub const DEMO_APP: &str = "wxdemo0000000001";

/// A valid request for `api`, as a mini program would make it (payments get fresh order fields).
pub fn sample_request(api: Api) -> ApiRequest {
    use api_request::Api as R;
    let nonce = connect_nonce();
    let request = match api {
        Api::Login => R::Login(v1::LoginRequest { timeout: 0 }),
        Api::CheckSession => R::CheckSession(v1::CheckSessionRequest {}),
        Api::GetPhoneNumber => R::GetPhoneNumber(v1::GetPhoneNumberRequest {}),
        Api::GetEmail => R::GetEmail(v1::GetEmailRequest {}),
        Api::ChooseAvatar => R::ChooseAvatar(v1::ChooseAvatarRequest {}),
        Api::GetNickName => R::GetNickName(v1::GetNickNameRequest {}),
        Api::GetUserInfo => R::GetUserInfo(v1::GetUserInfoRequest { with_credentials: true, lang: "en".into() }),
        Api::GetUserProfile => R::GetUserProfile(v1::GetUserProfileRequest {
            desc: "show your name on the scoreboard".chars().take(30).collect(),
            lang: "en".into(),
        }),
        Api::RequestPayment => R::RequestPayment(v1::RequestPaymentRequest {
            time_stamp: "1700000000".into(),
            nonce_str: nonce.clone(),
            package: format!("prepay_id=wx{nonce}"),
            sign_type: "RSA".into(),
            pay_sign: format!("sig-{nonce}"),
            idempotency_key: String::new(),
        }),
        Api::RequestMidasPaymentGameItem => R::RequestMidasPaymentGameItem(v1::RequestMidasPaymentGameItemRequest {
            sign_data: serde_json::json!({
                "offerId": "1450000000", "buyQuantity": 1, "env": 0, "currencyType": "CNY",
                "productId": "gem-pack-10", "goodsPrice": 600, "outTradeNo": format!("order-{nonce}"),
                "mode": "short_series_goods",
            })
            .to_string(),
            pay_sig: format!("paysig-{nonce}"),
            signature: format!("signature-{nonce}"),
            idempotency_key: String::new(),
        }),
        Api::GetSetting => R::GetSetting(v1::GetSettingRequest {}),
        Api::Authorize => R::Authorize(v1::AuthorizeRequest { scope: scope::USER_INFO.into() }),
        Api::OpenSetting => R::OpenSetting(v1::OpenSettingRequest::default()),
    };
    ApiRequest { api: Some(request) }
}

fn connect_nonce() -> String {
    miniapp_broker_client::renderer::new_payment_key()
}

/// The code a login / getPhoneNumber / getEmail answer carries, if any.
fn code_of(response: &ApiResponse) -> Option<&str> {
    use api_response::Api as A;
    match response.api.as_ref()? {
        A::Login(r) => Some(&r.code),
        A::GetPhoneNumber(r) => Some(&r.code),
        A::GetEmail(r) => Some(&r.code),
        _ => None,
    }
}

/// The `encryptedData` a getUserInfo / getUserProfile answer carries, if any (v2/v3, with a session).
fn encrypted_data_of(response: &ApiResponse) -> Option<&str> {
    use api_response::Api as A;
    let encrypted = match response.api.as_ref()? {
        A::GetUserInfo(r) => &r.encrypted_data,
        A::GetUserProfile(r) => &r.encrypted_data,
        _ => return None,
    };
    (!encrypted.is_empty()).then_some(encrypted.as_str())
}

/// The demo host's profile: the dev-host with a demo user that refuses the nickname scope.
pub fn demo_profile() -> dev_host::DevHostConfig {
    dev_host::DevHostConfig {
        name: "demo-host".into(),
        user: dev_host::DevUser {
            uid: "demo-user-1".into(),
            nick_name: "Demo User".into(),
            avatar_url: "https://example.invalid/avatar/demo-user-1.png".into(),
            phone_number: "+86 138 0013 8000".into(),
            email: "demo-user-1@example.invalid".into(),
        },
        refuse: vec![scope::NICKNAME.into()],
        ..Default::default()
    }
}

/// What a demo run did: whether every line was `:ok` or expected, and every secret or personal
/// value it handed out (tokens, the app secret, codes, session keys, authCodes, the phone number
/// and e-mail), so a test can check none of them reached the logs.
#[derive(Debug, Default)]
pub struct DemoReport {
    pub passed: bool,
    pub handed_out: Vec<(&'static str, String)>,
}

/// Runs the demo; `Ok(true)` when every line is `:ok` or an expected failure.
pub async fn run() -> Result<bool, Box<dyn std::error::Error + Send + Sync>> {
    Ok(run_reporting().await?.passed)
}

/// Runs the demo and reports what it handed out.
pub async fn run_reporting() -> Result<DemoReport, Box<dyn std::error::Error + Send + Sync>> {
    let mut handed: Vec<(&'static str, String)> = Vec::new();
    let dir = tempfile::Builder::new().prefix("miniapp-broker-demo").tempdir()?;
    let mut config = Config::ephemeral_in(dir.path());
    config.apps.insert(DEMO_APP.into(), AppConfig { union_group: Some("demo".into()), secret: None });
    config.backend_http.listen = Some("127.0.0.1:0".into());
    let server = crate::start(config).await?;
    let address = server.address().to_owned();
    println!("daemon   listening on {address} (in memory; host token in {})", server.token_file().display());
    let backend = BackendHttp::new(server.backend_http_addr().ok_or("the backend HTTP API is off")?);
    println!("daemon   backend HTTP API at {} (WeChat's and TCMPP's server paths)", backend.base);

    handed.push(("host token", server.host_token().to_owned()));
    let profile = demo_profile();
    handed.push(("phone number", profile.user.phone_number.clone()));
    handed.push(("e-mail", profile.user.email.clone()));
    // What getUserInfo / getUserProfile carry, in rawData and encrypted.
    handed.push(("nickname", profile.user.nick_name.clone()));
    handed.push(("avatar", profile.user.avatar_url.clone()));
    let host = dev_host::builder(&address, server.host_token(), &profile, Arc::new(|_| {}), None).connect().await?;
    println!("host     {:?} connected, user {} signed in, refuses {}", profile.name, profile.user.uid, scope::NICKNAME);
    let secret = host.register_app(DEMO_APP, false).await?.secret;
    handed.push(("app secret", secret.clone()));
    println!("backend  app {DEMO_APP} registered; its secret goes to the app's backend");
    let mut exchange = ExchangeClient::new(connect::channel(&address).await?);

    let (mut ok, mut expected, mut unexpected) = (0, 0, 0);
    println!();
    println!("{:<8} {:<28} errMsg", "version", "api");
    for version in ["v1", "v2", "v3"] {
        let launched = host.launch_app(DEMO_APP, &format!(r#"{{"apiVersion":"{version}"}}"#)).await?;
        handed.push(("launch token", launched.launch_token.clone()));
        let renderer = RendererClient::connect(&address, &launched.launch_token).await?;
        let mut codes = Vec::new();
        // The settings APIs run in v3, after the refusal the demo host makes there.
        let settings: &[Api] = if version == "v3" { &Api::CONSENT } else { &[] };
        for &api in Api::ALL.iter().chain(settings) {
            let outcome =
                tokio::time::timeout(Duration::from_secs(10), renderer.call_request(sample_request(api))).await;
            let (err_msg, good, note) = match outcome {
                Err(_) => (format!("{}:fail no answer within 10s", api.name()), false, ""),
                Ok(Ok(response)) => {
                    if let Some(code) = code_of(&response) {
                        handed.push(("code", code.to_owned()));
                        codes.push((api, code.to_owned()));
                    }
                    if let Some(encrypted) = encrypted_data_of(&response) {
                        handed.push(("encryptedData", encrypted.to_owned()));
                    }
                    let setting = match response.api.as_ref() {
                        Some(api_response::Api::GetSetting(r)) => format!(" authSetting={:?}", r.auth_setting),
                        Some(api_response::Api::OpenSetting(r)) => format!(" authSetting={:?}", r.auth_setting),
                        _ => String::new(),
                    };
                    (format!("{}{setting}", response.err_msg()), true, "")
                }
                Ok(Err(failure)) => {
                    let refused =
                        version == "v3" && api == Api::GetNickName && failure.err_msg.contains(scope::NICKNAME);
                    // scope.userInfo needs the nickname: authorize, and the APIs whose answer
                    // carries it, fail at once once the refusal is remembered.
                    let remembered = version == "v3"
                        && matches!(api, Api::Authorize | Api::GetUserInfo | Api::GetUserProfile)
                        && failure.reason == "auth_deny";
                    let note = if refused {
                        "   (expected: the demo host refuses SCOPE_NICKNAME)"
                    } else if remembered {
                        "   (expected: scope.userInfo needs the nickname, refused above and remembered)"
                    } else {
                        ""
                    };
                    (failure.err_msg, refused || remembered, note)
                }
            };
            match (good, note.is_empty()) {
                (true, true) => ok += 1,
                (true, false) => expected += 1,
                (false, _) => unexpected += 1,
            }
            println!("{version:<8} {:<28} {err_msg}{note}", api.name());
        }
        renderer.close().await;
        host.close_app(&launched.instance_id).await?;

        // The app's backend redeems what the renderer got. v1 codes are the host's own business.
        if version == "v1" {
            continue;
        }
        if version == "v2" {
            // Over HTTP, as a WeChat backend library does it.
            for (what, outcome) in backend.exchange(&secret, &codes, &mut handed).await {
                match outcome {
                    Ok(line) => {
                        ok += 1;
                        println!("{version:<8} {what:<28} {line}");
                    }
                    Err(e) => {
                        unexpected += 1;
                        println!("{version:<8} {what:<28} FAILED {e}");
                    }
                }
            }
            continue;
        }
        for (api, code) in codes {
            let redeem = v1::RedeemCodeRequest { app_id: DEMO_APP.into(), secret: secret.clone(), code: code.clone() };
            let line = match api {
                Api::Login => exchange
                    .code2_session(v1::Code2SessionRequest { app_id: DEMO_APP.into(), secret: secret.clone(), code })
                    .await
                    .map(|r| {
                        let r = r.into_inner();
                        handed.push(("session key", r.session_key.clone()));
                        if !r.auth_code.is_empty() {
                            handed.push(("authCode", r.auth_code.clone()));
                        }
                        let auth = if r.auth_code.is_empty() {
                            String::new()
                        } else {
                            format!(" authCode={}…", prefix(&r.auth_code))
                        };
                        format!(
                            "openid={} unionid={} session_key={}…{auth}",
                            r.openid,
                            r.unionid,
                            prefix(&r.session_key)
                        )
                    }),
                Api::GetPhoneNumber => exchange
                    .get_phone_number(redeem)
                    .await
                    .map(|r| format!("phoneNumber={}", r.into_inner().phone_number)),
                Api::GetEmail => exchange.get_email(redeem).await.map(|r| format!("email={}", r.into_inner().email)),
                _ => continue,
            };
            let name = match api {
                Api::Login => "code2Session",
                Api::GetPhoneNumber => "getPhoneNumber",
                _ => "getEmail",
            };
            match line {
                Ok(line) => {
                    ok += 1;
                    println!("{version:<8} {:<28} {line}", format!("exchange.{name}"));
                }
                Err(status) => {
                    unexpected += 1;
                    println!("{version:<8} {:<28} FAILED {}", format!("exchange.{name}"), status.message());
                }
            }
        }
    }

    // What the host's privacy page shows: every disclosure, never a value.
    println!();
    println!("ledger   {:<6} {:<14} {:<14} {:<16} code redeemed", "uid", "what", "surface", "api");
    for d in host.ledger(DEMO_APP, "", 0).await? {
        let redeemed = match (d.via_code, d.redeemed_via.as_str()) {
            (false, _) => "-",
            (true, "") => "no",
            (true, via) => via,
        };
        println!("ledger   {:<6} {:<14} {:<14} {:<16} {redeemed}", short(&d.uid), d.what, d.surface, d.api);
    }

    host.disconnect();
    server.shutdown().await;
    println!();
    println!("demo: {ok} ok, {expected} expected failures, {unexpected} unexpected");
    Ok(DemoReport { passed: unexpected == 0 && expected == 4, handed_out: handed })
}

/// A uid shortened for the ledger table.
fn short(uid: &str) -> String {
    uid.chars().rev().take(6).collect::<Vec<_>>().into_iter().rev().collect()
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The demo's app backend on the backend HTTP API: real HTTP/1.1 requests (hyper-util's client).
struct BackendHttp {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
}

impl BackendHttp {
    fn new(address: SocketAddr) -> BackendHttp {
        BackendHttp { client: Client::builder(TokioExecutor::new()).build_http(), base: format!("http://{address}") }
    }

    /// One request; its JSON answer, or the errcode it carries as an error.
    async fn call(&self, method: Method, path: &str, body: serde_json::Value) -> Result<serde_json::Value, BoxError> {
        let body = if method == Method::GET { Bytes::new() } else { Bytes::from(body.to_string()) };
        let request = Request::builder().method(method).uri(format!("{}{path}", self.base)).body(Full::new(body))?;
        let response = tokio::time::timeout(Duration::from_secs(10), self.client.request(request)).await??;
        let answer: serde_json::Value = serde_json::from_slice(&response.into_body().collect().await?.to_bytes())?;
        match answer["errcode"].as_i64() {
            None | Some(0) => Ok(answer),
            Some(errcode) => Err(format!("errcode {errcode}: {}", answer["errmsg"]).into()),
        }
    }

    /// An access token, then each code through its endpoint; one line per request.
    async fn exchange(
        &self,
        secret: &str,
        codes: &[(Api, String)],
        handed: &mut Vec<(&'static str, String)>,
    ) -> Vec<(&'static str, Result<String, BoxError>)> {
        let path = format!("/cgi-bin/token?grant_type=client_credential&appid={DEMO_APP}&secret={secret}");
        let token = match self.call(Method::GET, &path, serde_json::Value::Null).await {
            Ok(t) => t["access_token"].as_str().unwrap_or_default().to_owned(),
            Err(e) => return vec![("http GET /cgi-bin/token", Err(e))],
        };
        let mut lines =
            vec![("http GET /cgi-bin/token", Ok(format!("access_token={}… expires_in=7200", prefix(&token))))];
        for (api, code) in codes {
            let (what, outcome) = match api {
                Api::Login => {
                    let path = format!(
                        "/sns/jscode2session?appid={DEMO_APP}&secret={secret}&js_code={code}&grant_type=authorization_code"
                    );
                    let outcome = self.call(Method::GET, &path, serde_json::Value::Null).await.map(|r| {
                        let field = |name: &str| r[name].as_str().unwrap_or_default().to_owned();
                        let (openid, unionid) = (field("openid"), field("unionid"));
                        handed.push(("session key", field("session_key")));
                        format!("openid={openid} unionid={unionid} session_key={}…", prefix(&field("session_key")))
                    });
                    ("http GET /sns/jscode2session", outcome)
                }
                Api::GetPhoneNumber => {
                    let path = format!("/wxa/business/getuserphonenumber?access_token={token}");
                    let outcome = self.call(Method::POST, &path, serde_json::json!({ "code": code })).await;
                    (
                        "http POST getuserphonenumber",
                        outcome.map(|r| {
                            let info = &r["phone_info"];
                            let field = |name: &str| info[name].as_str().unwrap_or_default().to_owned();
                            format!("phoneNumber={} countryCode={}", field("phoneNumber"), field("countryCode"))
                        }),
                    )
                }
                Api::GetEmail => {
                    let path = format!("/wxa/business/getuseremail?access_token={token}");
                    let outcome = self.call(Method::POST, &path, serde_json::json!({ "code": code })).await;
                    (
                        "http POST getuseremail",
                        outcome.map(|r| format!("email={}", r["email_info"]["email"].as_str().unwrap_or_default())),
                    )
                }
                _ => continue,
            };
            lines.push((what, outcome));
        }
        lines
    }
}

fn prefix(s: &str) -> &str {
    &s[..s.len().min(8)]
}
