//! Versions, defaults and the embedded platform end to end (issue 3), over the daemon's real socket
//! with the real client library: how an instance's version is resolved (app.json, then the host's
//! openApiVersion, then the configured default; asked once; unchanged while its host stays, asked
//! again only after a host restart); the v2/v3 default implementations and what still goes to the
//! host; v3's getAuthCode (code pass-through, authCode binding, refused scopes, a host without it);
//! the Exchange service's rules for codes and secrets; openid/unionid; checkSession; grants; and
//! the state that survives a daemon restart. Time moves by the daemon's ManualClock, never by
//! sleeping.
mod support;

use std::sync::Arc;

use miniapp_broker_client::{
    ApiFailure, HostBuilder, HostFailure, RendererClient, connect,
    proto::{
        Api,
        api::{ApiCall, scope},
        v1::{
            self, AppInfo, Code2SessionRequest, ExchangeError, GetAuthCodeRequest, GetAuthCodeResponse,
            RedeemCodeRequest, exchange_client::ExchangeClient,
        },
    },
};
use miniapp_brokerd::{ApiVersion, Config, config::AppConfig, demo::sample_request};
use prost::Message;
use support::{Daemon, T0_MS, assert_failure, launch, until, user, within};
use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};
use tonic::{Code, Status, transport::Channel};

const FIVE_MINUTES_MS: u64 = 5 * 60 * 1000;

/// How the test host's getAuthCode answers one request.
#[derive(Clone, Debug, Default)]
struct AuthPolicy {
    /// Returned as `authCode` (bound into the daemon's code); "" for none.
    auth_code: String,
    /// Returned as `code` (passed through as the login code); "" for none.
    code: String,
    /// Scopes refused, with the reason.
    refuse: Vec<(&'static str, &'static str)>,
    /// Scopes left out of `authSuccessScopes` without a reason.
    omit: Vec<&'static str>,
}

impl AuthPolicy {
    fn auth_code(code: &str) -> Self {
        AuthPolicy { auth_code: code.into(), ..Default::default() }
    }

    fn answer(&self, req: &GetAuthCodeRequest) -> GetAuthCodeResponse {
        let refused = |s: &str| self.refuse.iter().any(|(r, _)| *r == s) || self.omit.contains(&s);
        GetAuthCodeResponse {
            auth_code: self.auth_code.clone(),
            code: self.code.clone(),
            auth_success_scopes: req.scopes.iter().filter(|s| !refused(s)).cloned().collect(),
            auth_error_scopes: self
                .refuse
                .iter()
                .filter(|(s, _)| req.scopes.iter().any(|w| w == s))
                .map(|(s, why)| (s.to_string(), why.to_string()))
                .collect(),
        }
    }
}

type Policy = Arc<dyn Fn(&AppInfo) -> AuthPolicy + Send + Sync>;
type VersionAnswer = Arc<dyn Fn(&AppInfo) -> Result<String, HostFailure> + Send + Sync>;

/// What the test host saw, per delegate method.
struct Seen {
    apis: UnboundedReceiver<(AppInfo, Api)>,
    auth: UnboundedReceiver<(AppInfo, GetAuthCodeRequest)>,
    versions: UnboundedReceiver<AppInfo>,
}

impl Seen {
    fn apis(&mut self) -> Vec<(AppInfo, Api)> {
        drain(&mut self.apis)
    }
    fn auth(&mut self) -> Vec<(AppInfo, GetAuthCodeRequest)> {
        drain(&mut self.auth)
    }
    fn versions(&mut self) -> Vec<AppInfo> {
        drain(&mut self.versions)
    }
}

fn drain<T>(rx: &mut UnboundedReceiver<T>) -> Vec<T> {
    std::iter::from_fn(|| rx.try_recv().ok()).collect()
}

fn record<T: ApiCall>(builder: HostBuilder, seen: UnboundedSender<(AppInfo, Api)>) -> HostBuilder
where
    T::Response: Default,
{
    builder.handle::<T, _, _>(move |app, _req: T| {
        let _ = seen.send((app, T::API));
        async { Ok(T::Response::default()) }
    })
}

/// A host that implements all ten open APIs (answering empty results, reporting each call), plus
/// getAuthCode when `policy` is given and openApiVersion when `version` is.
fn test_host(builder: HostBuilder, policy: Option<Policy>, version: Option<VersionAnswer>) -> (HostBuilder, Seen) {
    let (api_tx, apis) = mpsc::unbounded_channel();
    let (auth_tx, auth) = mpsc::unbounded_channel();
    let (version_tx, versions) = mpsc::unbounded_channel();
    let b = record::<v1::LoginRequest>(builder, api_tx.clone());
    let b = record::<v1::CheckSessionRequest>(b, api_tx.clone());
    let b = record::<v1::GetPhoneNumberRequest>(b, api_tx.clone());
    let b = record::<v1::GetEmailRequest>(b, api_tx.clone());
    let b = record::<v1::ChooseAvatarRequest>(b, api_tx.clone());
    let b = record::<v1::GetNickNameRequest>(b, api_tx.clone());
    let b = record::<v1::GetUserInfoRequest>(b, api_tx.clone());
    let b = record::<v1::GetUserProfileRequest>(b, api_tx.clone());
    let b = record::<v1::RequestPaymentRequest>(b, api_tx.clone());
    let mut b = record::<v1::RequestMidasPaymentGameItemRequest>(b, api_tx);
    if let Some(policy) = policy {
        b = b.get_auth_code(move |app, req| {
            let answer = policy(&app).answer(&req);
            let _ = auth_tx.send((app, req));
            async move { Ok(answer) }
        });
    }
    if let Some(version) = version {
        b = b.open_api_version(move |app| {
            let answer = version(&app);
            let _ = version_tx.send(app);
            async move { answer }
        });
    }
    (b, Seen { apis, auth, versions })
}

fn grant_all(auth_code: &'static str) -> Option<Policy> {
    Some(Arc::new(move |_: &AppInfo| AuthPolicy::auth_code(auth_code)))
}

fn app_json(version: &str) -> String {
    format!(r#"{{"apiVersion":"{version}","pages":["pages/index"]}}"#)
}

async fn exchange(daemon: &Daemon) -> ExchangeClient<Channel> {
    ExchangeClient::new(connect::channel(&daemon.address()).await.expect("exchange channel"))
}

fn c2s(app_id: &str, secret: &str, code: &str) -> Code2SessionRequest {
    Code2SessionRequest { app_id: app_id.into(), secret: secret.into(), code: code.into() }
}

fn redeem(app_id: &str, secret: &str, code: &str) -> RedeemCodeRequest {
    RedeemCodeRequest { app_id: app_id.into(), secret: secret.into(), code: code.into() }
}

/// An Exchange refusal as (gRPC code, errcode, errmsg), checking the status message agrees.
#[track_caller]
fn refusal(status: Status) -> (Code, i32, String) {
    let error = ExchangeError::decode(status.details()).expect("the details hold an ExchangeError");
    assert_eq!(status.message(), format!("errcode {}: {}", error.errcode, error.errmsg));
    (status.code(), error.errcode, error.errmsg)
}

/// Waits until the daemon has applied the user the host pushed ("" for signed out).
async fn signed_in(daemon: &Daemon, uid: &str) {
    let broker = daemon.server.broker().clone();
    until("the daemon applies the pushed user", || broker.user.get().map(|u| u.uid.clone()).unwrap_or_default() == uid)
        .await;
}

async fn list_app(host: &miniapp_broker_client::HostClient, instance_id: &str) -> v1::AppInstanceInfo {
    let apps =
        host.admin().list_apps(host.authorize(v1::ListAppsRequest {})).await.expect("list apps").into_inner().apps;
    apps.into_iter().find(|a| a.instance_id == instance_id).expect("the instance is listed")
}

async fn login(renderer: &RendererClient) -> String {
    within("login", renderer.call(v1::LoginRequest::default())).await.expect("login answered").code
}

async fn check_session(renderer: &RendererClient) -> Result<v1::CheckSessionResponse, ApiFailure> {
    within("checkSession", renderer.call(v1::CheckSessionRequest::default())).await
}

#[tokio::test]
async fn app_json_beats_the_hosts_answer_which_beats_the_default_asked_once() {
    let daemon = Daemon::start_with(|c| c.default_api_version = ApiVersion::V1).await;
    let version: VersionAnswer = Arc::new(|app: &AppInfo| match app.app_id.as_str() {
        "wxpicksv3" => Ok("v3".into()),
        "wxpicksbad" => Ok("v9".into()),
        _ => Err(HostFailure::error("HostDomain", 7, "no idea")),
    });
    let (builder, mut seen) = test_host(daemon.host().user(user("u1")), grant_all("ac"), Some(version));
    let host = builder.connect().await.expect("host connects");

    // (app id, app.json, launch answer, resolved version and source, whether the host is asked)
    let cases = [
        ("wxpicksv3", app_json("v2"), ("v2", "app.json"), ("v2", "app.json"), false),
        ("wxpicksv3", "{}".to_owned(), ("", ""), ("v3", "host"), true),
        ("wxpicksbad", r#"{"pages":[]}"#.to_owned(), ("", ""), ("v1", "default"), true),
        ("wxpickserr", String::new(), ("", ""), ("v1", "default"), true),
    ];
    for (app_id, json, at_launch, (version, source), asked) in cases {
        let what = format!("{app_id} with app.json {json:?}");
        let app = launch(&host, app_id, &json).await;
        assert_eq!((app.api_version.as_str(), app.version_source.as_str()), at_launch, "{what}: LaunchApp");
        let renderer = daemon.renderer(&app.launch_token).await;

        // Concurrent first calls wait for one resolution.
        let (a, b, c) = tokio::join!(
            renderer.call(v1::GetUserInfoRequest::default()),
            renderer.call(v1::GetUserInfoRequest::default()),
            renderer.call_unary(v1::GetUserInfoRequest::default()),
        );
        for r in [a, b, c] {
            assert_eq!(r.expect("getUserInfo answered").err_msg, "getUserInfo:ok", "{what}");
        }
        within("login", renderer.call(v1::LoginRequest::default())).await.expect("login answered");
        within("again", renderer.call(v1::GetUserInfoRequest::default())).await.expect("answered");

        let asks = seen.versions();
        assert_eq!(asks.len(), usize::from(asked), "{what}: openApiVersion asked once at most");
        for ask in asks {
            assert_eq!(
                (ask.app_id.as_str(), ask.instance_id.as_str(), ask.api_version.as_str()),
                (app_id, app.instance_id.as_str(), "")
            );
        }
        let calls = seen.apis();
        let user_info: Vec<_> = calls.iter().filter(|(_, api)| *api == Api::GetUserInfo).collect();
        assert_eq!(user_info.len(), 4, "{what}");
        assert!(
            user_info.iter().all(|(info, _)| info.api_version == version),
            "{what}: the host sees {version}: {calls:?}"
        );
        let login_delegated = calls.iter().any(|(_, api)| *api == Api::Login);
        assert_eq!(login_delegated, version == "v1", "{what}: login is a default in {version}");
        let listed = list_app(&host, &app.instance_id).await;
        assert_eq!(
            (listed.api_version.as_str(), listed.version_source.as_str()),
            (version, source),
            "{what}: ListApps"
        );
        seen.auth();
    }

    // A host without openApiVersion: the configured default.
    let daemon = Daemon::start_with(|c| c.default_api_version = ApiVersion::V3).await;
    let (builder, mut seen) = test_host(daemon.host().user(user("u1")), grant_all("ac"), None);
    let host = builder.connect().await.expect("host connects");
    let app = launch(&host, "wxnoversion", "{}").await;
    let renderer = daemon.renderer(&app.launch_token).await;
    within("getUserInfo", renderer.call(v1::GetUserInfoRequest::default())).await.expect("answered");
    assert_eq!(seen.apis()[0].0.api_version, "v3");
    let listed = list_app(&host, &app.instance_id).await;
    assert_eq!((listed.api_version.as_str(), listed.version_source.as_str()), ("v3", "default"));
}

#[tokio::test]
async fn a_version_never_changes_while_its_host_is_connected_and_a_host_restart_reasks_it() {
    // Many getUserInfo calls of one user in a row: not held to one user's rate.
    let daemon = Daemon::start_with(|c| {
        c.default_api_version = ApiVersion::V2;
        c.limits.burst_per_user = 1_000;
    })
    .await;
    // The first host would answer differently if it were asked twice.
    let asks = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let first_answer: VersionAnswer = {
        let asks = asks.clone();
        Arc::new(move |app: &AppInfo| match app.app_id.as_str() {
            "wxmixdefault" => Err(HostFailure::error("HostDomain", 1, "no answer")),
            _ if asks.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 => Ok("v3".into()),
            _ => Ok("v1".into()),
        })
    };
    let (first, mut seen1) = test_host(daemon.host().user(user("u1")), grant_all("ac1"), Some(first_answer));
    let first = first.connect().await.expect("first host connects");
    let from_host = launch(&first, "wxmixhost", "").await;
    let from_json = launch(&first, "wxmixjson", &app_json("v2")).await;
    let from_default = launch(&first, "wxmixdefault", "{}").await;
    let renderers = [
        (daemon.renderer(&from_host.launch_token).await, "v3"),
        (daemon.renderer(&from_json.launch_token).await, "v2"),
        (daemon.renderer(&from_default.launch_token).await, "v2"),
    ];

    // Every surface, many calls: one version per instance, the host asked once.
    for (r, version) in &renderers {
        for _ in 0..3 {
            within("stream", r.call(v1::GetUserInfoRequest::default())).await.expect("answered");
            within("unary", r.call_unary(v1::GetUserInfoRequest::default())).await.expect("answered");
            within("invoke", r.invoke_json("getUserInfo", &serde_json::json!({}))).await.expect("answered");
            within("login", r.call(v1::LoginRequest::default())).await.expect("answered");
        }
        let calls = seen1.apis();
        assert_eq!(calls.len(), 9, "{version}: only getUserInfo reached the host: {calls:?}");
        assert!(calls.iter().all(|(info, _)| info.api_version == *version), "{version}: {calls:?}");
    }
    let asked: Vec<String> = seen1.versions().into_iter().map(|a| a.app_id).collect();
    assert_eq!(asked, ["wxmixhost", "wxmixdefault"], "openApiVersion asked once per instance that needs it");
    assert_eq!(seen1.auth().len(), 3, "the v3 instance's logins asked getAuthCode");
    let listed = list_app(&first, &from_host.instance_id).await;
    assert_eq!((listed.api_version.as_str(), listed.version_source.as_str()), ("v3", "host"));

    // A host restart (issue 4, docs/decisions.md): only the version the old host chose is asked
    // again; app.json and the default stay.
    first.disconnect();
    let broker = daemon.server.broker().clone();
    until("the first host is gone", || broker.host.current().is_none()).await;
    let (second, mut seen2) =
        test_host(daemon.host().user(user("u1")), grant_all("ac2"), Some(Arc::new(|_: &AppInfo| Ok("v1".into()))));
    let second = within("second host", async {
        loop {
            match second.clone().connect().await {
                Ok(host) => break host,
                Err(_) => tokio::task::yield_now().await,
            }
        }
    })
    .await;
    for ((r, _), version) in renderers.iter().zip(["v1", "v2", "v2"]) {
        within("getUserInfo", r.call(v1::GetUserInfoRequest::default())).await.expect("answered");
        within("again", r.call(v1::GetUserInfoRequest::default())).await.expect("answered");
        let calls = seen2.apis();
        assert_eq!(calls.len(), 2);
        assert!(calls.iter().all(|(info, _)| info.api_version == version), "after the restart {version}: {calls:?}");
    }
    let asked: Vec<String> = seen2.versions().into_iter().map(|a| a.app_id).collect();
    assert_eq!(asked, ["wxmixhost"], "the new host is asked once, for the instance the old host chose for");
    for (launched, expected) in
        [(&from_host, ("v1", "host")), (&from_json, ("v2", "app.json")), (&from_default, ("v2", "default"))]
    {
        let listed = list_app(&second, &launched.instance_id).await;
        assert_eq!((listed.api_version.as_str(), listed.version_source.as_str()), expected);
    }
}

#[tokio::test]
async fn every_default_answers_in_v2_and_v3_and_the_rest_is_delegated() {
    let daemon = Daemon::start().await;
    let (builder, mut seen) = test_host(daemon.host().user(user("u1")), grant_all("ac-host"), None);
    let host = builder.connect().await.expect("host connects");
    let mut exchange = exchange(&daemon).await;

    for version in ["v2", "v3"] {
        let app_id = format!("wxdefaults{version}");
        let secret = host.register_app(&app_id, false).await.expect("register").secret;
        let app = launch(&host, &app_id, &app_json(version)).await;
        let r = daemon.renderer(&app.launch_token).await;

        let login_code = login(&r).await;
        assert_eq!(check_session(&r).await.expect("session alive").err_msg, "checkSession:ok", "{version}");
        let phone = within("phone", r.call(v1::GetPhoneNumberRequest {})).await.expect("phone code");
        let email = within("email", r.call(v1::GetEmailRequest {})).await.expect("email code");
        let avatar = within("avatar", r.call(v1::ChooseAvatarRequest {})).await.expect("avatar");
        let nick = within("nick", r.call(v1::GetNickNameRequest {})).await.expect("nickname");
        assert_eq!((phone.err_msg.as_str(), email.err_msg.as_str()), ("getPhoneNumber:ok", "getEmail:ok"));
        assert_eq!(
            avatar,
            v1::ChooseAvatarResponse {
                err_msg: "chooseAvatar:ok".into(),
                avatar_url: "https://example.invalid/u1.png".into()
            }
        );
        assert_eq!(nick, v1::GetNickNameResponse { err_msg: "getNickName:ok".into(), nick_name: "nick-u1".into() });
        assert!(!phone.code.contains("138") && !email.code.contains('@'), "{version}: codes, never the values");
        assert!(seen.apis().is_empty(), "{version}: no per-API host handler ran for a default");

        // The app's backend redeems the codes.
        let session =
            exchange.code2_session(c2s(&app_id, &secret, &login_code)).await.expect("code2Session").into_inner();
        assert!(session.openid.starts_with('o') && !session.session_key.is_empty(), "{version}: {session:?}");
        assert_eq!(session.auth_code, if version == "v3" { "ac-host" } else { "" }, "{version}");
        let number =
            exchange.get_phone_number(redeem(&app_id, &secret, &phone.code)).await.expect("phone").into_inner();
        assert_eq!(number.phone_number, "+86 138 u1");
        let address = exchange.get_email(redeem(&app_id, &secret, &email.code)).await.expect("email").into_inner();
        assert_eq!(address.email, "u1@example.invalid");

        // getAuthCode: in v3 once per default that reveals something, with the API's scope.
        let asked: Vec<(String, Vec<String>, String)> = seen
            .auth()
            .into_iter()
            .map(|(info, req)| {
                assert_eq!((info.app_id.as_str(), info.api_version.as_str()), (app_id.as_str(), "v3"));
                (req.api, req.scopes, info.instance_id)
            })
            .collect();
        let expected: Vec<(String, Vec<String>, String)> = if version == "v3" {
            [
                ("login", None),
                ("getPhoneNumber", Some(scope::PHONE_NUMBER)),
                ("getEmail", Some(scope::EMAIL)),
                ("chooseAvatar", Some(scope::AVATAR)),
                ("getNickName", Some(scope::NICKNAME)),
            ]
            .into_iter()
            .map(|(api, s)| (api.to_owned(), s.into_iter().map(str::to_owned).collect(), app.instance_id.clone()))
            .collect()
        } else {
            Vec::new()
        };
        assert_eq!(asked, expected, "{version}: getAuthCode calls");

        // The APIs without a default still reach the host.
        for api in [Api::GetUserInfo, Api::GetUserProfile, Api::RequestPayment, Api::RequestMidasPaymentGameItem] {
            let got = within(api.name(), r.call_request(sample_request(api)))
                .await
                .unwrap_or_else(|f| panic!("{version} {api}: {f}"));
            assert_eq!(got.err_msg(), format!("{}:ok", api.name()));
            let calls = seen.apis();
            assert_eq!(calls.len(), 1, "{version} {api}: delegated once");
            assert_eq!((calls[0].1, calls[0].0.api_version.as_str()), (api, version));
        }
        assert!(seen.auth().is_empty(), "{version}: delegated APIs need no getAuthCode");
    }
}

#[tokio::test]
async fn a_signed_out_user_fails_every_default_like_the_seeds_app_not_login() {
    let daemon = Daemon::start().await;
    let (builder, mut seen) = test_host(daemon.host(), grant_all("ac"), None);
    let host = builder.connect().await.expect("host connects");
    for version in ["v2", "v3"] {
        let app = launch(&host, "wxsignedout", &app_json(version)).await;
        let r = daemon.renderer(&app.launch_token).await;
        for api in Api::ALL.into_iter().filter(|a| a.has_default()) {
            let failure = within(api.name(), r.call_request(sample_request(api))).await.unwrap_err();
            assert_failure(
                &failure,
                &format!("{}:fail app not login", api.name()),
                -1001,
                Code::FailedPrecondition,
                "not_logged_in",
            );
        }
        assert!(seen.apis().is_empty() && seen.auth().is_empty(), "{version}: nothing asked of the host");
    }

    // Signing out after signing in does the same.
    host.set_user(user("u1")).await.expect("push user");
    signed_in(&daemon, "u1").await;
    let app = launch(&host, "wxsignedout", &app_json("v2")).await;
    let r = daemon.renderer(&app.launch_token).await;
    login(&r).await;
    host.set_user(v1::SignedInUser { uid: String::new(), profile: None }).await.expect("sign out");
    signed_in(&daemon, "").await;
    let failure = within("login", r.call(v1::LoginRequest::default())).await.unwrap_err();
    assert_failure(&failure, "login:fail app not login", -1001, Code::FailedPrecondition, "not_logged_in");
}

#[tokio::test]
async fn v3_login_passes_a_host_code_through_and_binds_an_auth_code() {
    let daemon = Daemon::start().await;
    let policy: Policy = Arc::new(|app: &AppInfo| match app.app_id.as_str() {
        "wxpassthrough" => AuthPolicy { code: "host-code-123".into(), ..Default::default() },
        "wxbound" => AuthPolicy::auth_code("ac-bound"),
        _ => AuthPolicy::default(),
    });
    let (builder, mut seen) = test_host(daemon.host().user(user("u1")), Some(policy), None);
    let host = builder.connect().await.expect("host connects");
    let mut exchange = exchange(&daemon).await;

    // code: passed through unchanged; a session starts; the daemon never issued it.
    let secret = host.register_app("wxpassthrough", false).await.expect("register").secret;
    let app = launch(&host, "wxpassthrough", &app_json("v3")).await;
    let r = daemon.renderer(&app.launch_token).await;
    assert_eq!(login(&r).await, "host-code-123");
    check_session(&r).await.expect("the pass-through login started a session");
    let refused = exchange.code2_session(c2s("wxpassthrough", &secret, "host-code-123")).await.unwrap_err();
    assert_eq!(refusal(refused), (Code::InvalidArgument, 40029, "invalid code".into()));

    // authCode: bound into the daemon's own code, returned to the backend by Code2Session.
    let secret = host.register_app("wxbound", false).await.expect("register").secret;
    let app = launch(&host, "wxbound", &app_json("v3")).await;
    let r = daemon.renderer(&app.launch_token).await;
    let code = login(&r).await;
    assert!(code.len() >= 22 && code != "ac-bound", "a daemon code of at least 128 bits: {code}");
    let session = exchange.code2_session(c2s("wxbound", &secret, &code)).await.expect("code2Session").into_inner();
    assert_eq!(session.auth_code, "ac-bound");

    // Neither: the seed's -1002.
    let app = launch(&host, "wxneither", &app_json("v3")).await;
    let r = daemon.renderer(&app.launch_token).await;
    let failure = within("login", r.call(v1::LoginRequest::default())).await.unwrap_err();
    assert_failure(&failure, "login:fail authCode is null", -1002, Code::FailedPrecondition, "auth_code_null");
    assert_eq!(seen.auth().len(), 3);
    assert!(seen.apis().is_empty());
}

#[tokio::test]
async fn a_scope_the_host_refuses_fails_that_api_with_scope_not_authorized() {
    let daemon = Daemon::start().await;
    let policy: Policy = Arc::new(|_: &AppInfo| AuthPolicy {
        auth_code: "ac".into(),
        refuse: vec![(scope::NICKNAME, "user refused")],
        omit: vec![scope::AVATAR],
        ..Default::default()
    });
    let (builder, mut seen) = test_host(daemon.host().user(user("u1")), Some(policy), None);
    let host = builder.connect().await.expect("host connects");
    let app = launch(&host, "wxrefused", &app_json("v3")).await;
    let r = daemon.renderer(&app.launch_token).await;

    let nick = within("nick", r.call(v1::GetNickNameRequest {})).await.unwrap_err();
    assert_failure(
        &nick,
        "getNickName:fail scope not authorized: SCOPE_NICKNAME: user refused",
        1009,
        Code::PermissionDenied,
        "scope_denied",
    );
    let avatar = within("avatar", r.call(v1::ChooseAvatarRequest {})).await.unwrap_err();
    assert_failure(
        &avatar,
        "chooseAvatar:fail scope not authorized: SCOPE_AVATAR: not granted",
        1009,
        Code::PermissionDenied,
        "scope_denied",
    );
    // The scopes it grants still work.
    within("phone", r.call(v1::GetPhoneNumberRequest {})).await.expect("granted scope works");
    login(&r).await;
    assert!(seen.apis().is_empty(), "a refusal is not a reason to delegate");

    let grants: Vec<String> =
        host.list_grants("wxrefused", "u1").await.expect("grants").into_iter().map(|g| g.scope).collect();
    assert_eq!(grants, [scope::PHONE_NUMBER], "refused scopes are not remembered as granted");
}

#[tokio::test]
async fn v3_without_a_get_auth_code_handler_fails_its_defaults_clearly() {
    let daemon = Daemon::start().await;
    let (builder, mut seen) = test_host(daemon.host().user(user("u1")), None, None);
    let host = builder.connect().await.expect("host connects");
    // The launch is accepted (the host may still add the handler by reconnecting).
    let app = launch(&host, "wxnoauthcode", &app_json("v3")).await;
    assert_eq!(app.api_version, "v3");
    let r = daemon.renderer(&app.launch_token).await;

    for api in [Api::Login, Api::GetPhoneNumber, Api::GetEmail, Api::ChooseAvatar, Api::GetNickName] {
        let failure = within(api.name(), r.call_request(sample_request(api))).await.unwrap_err();
        let expected = format!("{}:fail v3 requires the host to implement getAuthCode", api.name());
        assert_failure(&failure, &expected, 1010, Code::Unimplemented, "auth_code_not_implemented");
    }
    // checkSession reveals nothing and asks no getAuthCode: there is simply no session.
    let failure = check_session(&r).await.unwrap_err();
    assert_failure(
        &failure,
        "checkSession:fail session expired, need relogin",
        1011,
        Code::FailedPrecondition,
        "session_expired",
    );
    assert!(seen.apis().is_empty(), "v3 does not fall back to delegating the defaults");
    // APIs without a default are unaffected.
    within("getUserInfo", r.call(v1::GetUserInfoRequest::default())).await.expect("delegated");
    assert_eq!(seen.apis().len(), 1);
}

#[tokio::test]
async fn exchange_codes_are_single_use_expire_and_need_the_apps_own_secret() {
    let daemon = Daemon::start().await;
    let (builder, _seen) = test_host(daemon.host().user(user("u1")), None, None);
    let host = builder.connect().await.expect("host connects");
    let secret_a = host.register_app("wxexchangea", false).await.expect("register").secret;
    let secret_b = host.register_app("wxexchangeb", false).await.expect("register").secret;
    assert!(!secret_a.is_empty() && secret_a != secret_b);
    let again = host.register_app("wxexchangea", false).await.expect("register again");
    assert_eq!((again.created, again.secret.as_str()), (false, ""), "a secret is shown once");
    let app = launch(&host, "wxexchangea", &app_json("v2")).await;
    let r = daemon.renderer(&app.launch_token).await;
    let mut ex = exchange(&daemon).await;

    let code = login(&r).await;
    let wrong_secret = ex.code2_session(c2s("wxexchangea", "not-the-secret", &code)).await.unwrap_err();
    assert_eq!(refusal(wrong_secret), (Code::Unauthenticated, 40125, "invalid appsecret".into()));
    let b_secret = ex.code2_session(c2s("wxexchangea", &secret_b, &code)).await.unwrap_err();
    assert_eq!(refusal(b_secret), (Code::Unauthenticated, 40125, "invalid appsecret".into()), "another app's secret");
    let unknown = ex.code2_session(c2s("wxunregistered", "whatever", &code)).await.unwrap_err();
    assert_eq!(refusal(unknown), (Code::Unauthenticated, 40125, "invalid appsecret".into()), "as a wrong secret");
    let other_app = ex.code2_session(c2s("wxexchangeb", &secret_b, &code)).await.unwrap_err();
    assert_eq!(refusal(other_app), (Code::InvalidArgument, 40029, "invalid code".into()), "another app's code");
    let garbage = ex.code2_session(c2s("wxexchangea", &secret_a, "no-such-code")).await.unwrap_err();
    assert_eq!(refusal(garbage), (Code::InvalidArgument, 40029, "invalid code".into()));

    // None of those spent it; it works once.
    ex.code2_session(c2s("wxexchangea", &secret_a, &code)).await.expect("first use");
    let reused = ex.code2_session(c2s("wxexchangea", &secret_a, &code)).await.unwrap_err();
    assert_eq!(refusal(reused), (Code::FailedPrecondition, 40163, "code been used".into()));

    // Value codes: single use, only for their own kind.
    let phone = within("phone", r.call(v1::GetPhoneNumberRequest {})).await.expect("phone code").code;
    let as_login = ex.code2_session(c2s("wxexchangea", &secret_a, &phone)).await.unwrap_err();
    assert_eq!(refusal(as_login).1, 40029, "a phone code is not a login code");
    let as_email = ex.get_email(redeem("wxexchangea", &secret_a, &phone)).await.unwrap_err();
    assert_eq!(refusal(as_email).1, 40029, "a phone code is not an email code");
    ex.get_phone_number(redeem("wxexchangea", &secret_a, &phone)).await.expect("first use");
    let reused = ex.get_phone_number(redeem("wxexchangea", &secret_a, &phone)).await.unwrap_err();
    assert_eq!(refusal(reused).1, 40163);

    // Codes live five minutes.
    let (in_time, late) = (login(&r).await, login(&r).await);
    let late_email = within("email", r.call(v1::GetEmailRequest {})).await.expect("email code").code;
    daemon.clock.advance_ms(FIVE_MINUTES_MS - 1);
    ex.code2_session(c2s("wxexchangea", &secret_a, &in_time)).await.expect("just in time");
    daemon.clock.advance_ms(1);
    let expired = ex.code2_session(c2s("wxexchangea", &secret_a, &late)).await.unwrap_err();
    assert_eq!(refusal(expired), (Code::InvalidArgument, 40029, "invalid code: expired".into()));
    let expired = ex.get_email(redeem("wxexchangea", &secret_a, &late_email)).await.unwrap_err();
    assert_eq!(refusal(expired), (Code::InvalidArgument, 40029, "invalid code: expired".into()));
}

#[tokio::test]
async fn openid_is_stable_per_app_and_user_and_unionid_follows_union_groups() {
    let daemon = Daemon::start_with(|c| {
        for app in ["wxuniona", "wxunionb"] {
            c.apps.insert(app.into(), AppConfig { union_group: Some("group-1".into()), secret: None });
        }
    })
    .await;
    let (builder, _seen) = test_host(daemon.host().user(user("u1")), None, None);
    let host = builder.connect().await.expect("host connects");
    let mut ex = exchange(&daemon).await;
    let mut renderers = Vec::new();
    for app_id in ["wxuniona", "wxunionb", "wxloner"] {
        let secret = host.register_app(app_id, false).await.expect("register").secret;
        let app = launch(&host, app_id, &app_json("v2")).await;
        renderers.push((app_id, secret, daemon.renderer(&app.launch_token).await));
    }
    let mut sessions = Vec::new();
    for uid in ["u1", "u2"] {
        host.set_user(user(uid)).await.expect("push user");
        signed_in(&daemon, uid).await;
        for (app_id, secret, r) in &renderers {
            let first = ex.code2_session(c2s(app_id, secret, &login(r).await)).await.expect("exchange").into_inner();
            let second = ex.code2_session(c2s(app_id, secret, &login(r).await)).await.expect("exchange").into_inner();
            assert_eq!(first.openid, second.openid, "{app_id}/{uid}: openid is stable");
            assert_eq!(first.unionid, second.unionid, "{app_id}/{uid}: unionid is stable");
            // Logins within sessions.key_refresh_secs keep the session's key (WeChat's rule;
            // docs/decisions.md): both codes redeem to the one current key.
            assert_eq!(first.session_key, second.session_key, "{app_id}/{uid}: one key within key_refresh_secs");
            sessions.push((*app_id, uid, first));
        }
    }
    let get = |app: &str, uid: &str| &sessions.iter().find(|(a, u, _)| *a == app && *u == uid).expect("session").2;
    for uid in ["u1", "u2"] {
        let (a, b, c) = (get("wxuniona", uid), get("wxunionb", uid), get("wxloner", uid));
        assert!(
            a.openid != b.openid && b.openid != c.openid && a.openid != c.openid,
            "{uid}: apps cannot correlate by openid"
        );
        assert!(!a.unionid.is_empty() && a.unionid == b.unionid, "{uid}: one union group, one unionid");
        assert_eq!(c.unionid, "", "{uid}: no union group, no unionid");
    }
    assert_ne!(get("wxuniona", "u1").openid, get("wxuniona", "u2").openid);
    assert_ne!(get("wxuniona", "u1").unionid, get("wxuniona", "u2").unionid);

    // Admin lists the session with the same openid the backend got.
    let listed = host.list_sessions("wxloner").await.expect("sessions");
    assert_eq!(listed.len(), 1, "switching users ended u1's session: {listed:?}");
    assert_eq!((listed[0].uid.as_str(), listed[0].openid.as_str()), ("u2", get("wxloner", "u2").openid.as_str()));
}

#[tokio::test]
async fn check_session_ends_with_a_user_switch_a_sign_out_and_its_lifetime() {
    const LIFETIME_MS: u64 = 3_600_000;
    // Many checkSession calls of one user in a row: not held to one user's rate.
    let daemon = Daemon::start_with(|c| {
        c.sessions.lifetime_secs = LIFETIME_MS / 1000;
        c.limits.burst_per_user = 1_000;
    })
    .await;
    let (builder, _seen) = test_host(daemon.host().user(user("u1")), grant_all("ac"), None);
    let host = builder.connect().await.expect("host connects");
    let expired = |f: ApiFailure| {
        assert_failure(
            &f,
            "checkSession:fail session expired, need relogin",
            1011,
            Code::FailedPrecondition,
            "session_expired",
        )
    };

    for version in ["v2", "v3"] {
        host.set_user(user("u1")).await.expect("push user");
        signed_in(&daemon, "u1").await;
        let app = launch(&host, &format!("wxsession{version}"), &app_json(version)).await;
        let r = daemon.renderer(&app.launch_token).await;
        expired(check_session(&r).await.unwrap_err());

        login(&r).await;
        assert_eq!(check_session(&r).await.expect("alive").err_msg, "checkSession:ok");

        // Switching users ends it, and switching back does not bring it back.
        host.set_user(user("u2")).await.expect("switch");
        signed_in(&daemon, "u2").await;
        expired(check_session(&r).await.unwrap_err());
        host.set_user(user("u1")).await.expect("switch back");
        signed_in(&daemon, "u1").await;
        expired(check_session(&r).await.unwrap_err());

        // Signing out ends it.
        login(&r).await;
        check_session(&r).await.expect("alive again");
        host.set_user(v1::SignedInUser::default()).await.expect("sign out");
        signed_in(&daemon, "").await;
        let f = check_session(&r).await.unwrap_err();
        assert_failure(&f, "checkSession:fail app not login", -1001, Code::FailedPrecondition, "not_logged_in");
        host.set_user(user("u1")).await.expect("sign in");
        signed_in(&daemon, "u1").await;
        expired(check_session(&r).await.unwrap_err());

        // The lifetime ends it.
        login(&r).await;
        daemon.clock.advance_ms(LIFETIME_MS - 1);
        check_session(&r).await.expect("alive until its lifetime");
        daemon.clock.advance_ms(1);
        expired(check_session(&r).await.unwrap_err());
    }
}

#[tokio::test]
async fn grants_are_remembered_listed_and_revoked() {
    let daemon = Daemon::start().await;
    let (builder, mut seen) = test_host(daemon.host().user(user("u1")), grant_all("ac"), None);
    let host = builder.connect().await.expect("host connects");
    let a = daemon.renderer(&launch(&host, "wxgranta", &app_json("v3")).await.launch_token).await;
    let b = daemon.renderer(&launch(&host, "wxgrantb", &app_json("v3")).await.launch_token).await;
    let phone = |r: &RendererClient| {
        let r = r.clone();
        async move { within("phone", r.call(v1::GetPhoneNumberRequest {})).await.expect("granted") }
    };
    let mut previously =
        || -> Vec<Vec<String>> { seen.auth().into_iter().map(|(_, req)| req.previously_granted).collect() };
    let none: Vec<Vec<String>> = vec![vec![]];
    let phone_granted = vec![vec![scope::PHONE_NUMBER.to_owned()]];

    phone(&a).await;
    assert_eq!(previously(), none, "first time: nothing granted yet");
    phone(&a).await;
    assert_eq!(previously(), phone_granted, "second time: reported as previously granted");
    phone(&b).await;
    assert_eq!(previously(), none, "grants are per app");
    within("email", a.call(v1::GetEmailRequest {})).await.expect("granted");
    previously();

    host.set_user(user("u2")).await.expect("switch");
    signed_in(&daemon, "u2").await;
    phone(&a).await;
    assert_eq!(previously(), none, "grants are per user");

    let listed: Vec<(String, String, String, u64)> = host
        .list_grants("", "")
        .await
        .expect("list")
        .into_iter()
        .map(|g| (g.app_id, g.uid, g.scope, g.granted_at_ms))
        .collect();
    let row = |app: &str, uid: &str, s: &str| (app.to_owned(), uid.to_owned(), s.to_owned(), T0_MS);
    let mut expected = vec![
        row("wxgranta", "u1", scope::EMAIL),
        row("wxgranta", "u1", scope::PHONE_NUMBER),
        row("wxgranta", "u2", scope::PHONE_NUMBER),
        row("wxgrantb", "u1", scope::PHONE_NUMBER),
    ];
    let mut sorted = listed.clone();
    sorted.sort();
    expected.sort();
    assert_eq!(sorted, expected);
    assert_eq!(host.list_grants("wxgranta", "u1").await.expect("list").len(), 2, "filtered by app and user");

    // Revoked: asked again as new, then remembered again.
    host.set_user(user("u1")).await.expect("switch back");
    signed_in(&daemon, "u1").await;
    assert_eq!(host.revoke_grants("wxgranta", "u1", scope::PHONE_NUMBER).await.expect("revoke"), 1);
    phone(&a).await;
    assert_eq!(previously(), none, "a revoked scope is not previously granted");
    phone(&a).await;
    assert_eq!(previously(), phone_granted);
    // An empty scope revokes all of (app, uid); an empty uid means the signed-in user.
    assert_eq!(host.revoke_grants("wxgranta", "", "").await.expect("revoke all"), 2);
    assert!(host.list_grants("wxgranta", "u1").await.expect("list").is_empty());
    assert_eq!(host.list_grants("wxgranta", "u2").await.expect("list").len(), 1, "other users keep theirs");
    let bad = host.revoke_grants("wxgranta", "u1", "SCOPE_EVERYTHING").await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn an_invalid_api_version_refuses_the_launch() {
    let daemon = Daemon::start().await;
    let host = daemon.host().connect().await.expect("host connects");
    let cases = [
        (r#"{"apiVersion":"v4"}"#, r#"app.json: invalid apiVersion "v4": expected "v1", "v2" or "v3""#),
        (r#"{"apiVersion":"V2"}"#, r#"app.json: invalid apiVersion "V2": expected "v1", "v2" or "v3""#),
        (r#"{"apiVersion":""}"#, r#"app.json: invalid apiVersion "": expected "v1", "v2" or "v3""#),
        (r#"{"apiVersion":3}"#, "app.json: apiVersion must be a string"),
        ("[]", "app.json is not a JSON object"),
    ];
    for (json, message) in cases {
        let status = host.launch_app("wxbadversion", json).await.unwrap_err();
        assert_eq!((status.code(), status.message()), (Code::InvalidArgument, message), "{json}");
    }
    let status = host.launch_app("wxbadversion", "{").await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("app.json: "), "{}", status.message());
    let apps = host.admin().list_apps(host.authorize(v1::ListAppsRequest {})).await.expect("list").into_inner().apps;
    assert!(apps.is_empty(), "no refused launch left an instance: {apps:?}");
}

#[tokio::test]
async fn sessions_grants_secrets_and_openids_survive_a_restart() {
    let dir = tempfile::Builder::new().prefix("brokerd-restart").tempdir().expect("temp dir");
    let mut config = Config::ephemeral_in(dir.path());
    config.ephemeral = false;
    const APP: &str = "wxdurable";

    let daemon = Daemon::start_in(dir, config.clone()).await;
    let token = daemon.token();
    let (openid, secret) = {
        let (builder, mut seen) = test_host(daemon.host().user(user("u1")), grant_all("ac"), None);
        let host = builder.connect().await.expect("host connects");
        let secret = host.register_app(APP, false).await.expect("register").secret;
        let r = daemon.renderer(&launch(&host, APP, &app_json("v3")).await.launch_token).await;
        let code = login(&r).await;
        within("phone", r.call(v1::GetPhoneNumberRequest {})).await.expect("granted");
        check_session(&r).await.expect("alive");
        let mut ex = exchange(&daemon).await;
        let openid = ex.code2_session(c2s(APP, &secret, &code)).await.expect("exchange").into_inner().openid;
        assert_eq!(seen.auth().len(), 2);
        r.close().await;
        host.disconnect();
        (openid, secret)
    };
    let dir = within("shutdown", daemon.stop()).await;

    let daemon = Daemon::start_in(dir, config).await;
    assert_eq!(daemon.token(), token, "the host token file is kept");
    let (builder, mut seen) = test_host(daemon.host().user(user("u1")), grant_all("ac"), None);
    let host = builder.connect().await.expect("host connects after the restart");
    let again = host.register_app(APP, false).await.expect("register");
    assert_eq!((again.created, again.secret.as_str()), (false, ""), "the app secret is kept");
    let r = daemon.renderer(&launch(&host, APP, &app_json("v3")).await.launch_token).await;

    check_session(&r).await.expect("the session survived");
    within("phone", r.call(v1::GetPhoneNumberRequest {})).await.expect("granted");
    let asked = seen.auth();
    assert_eq!(asked.len(), 1);
    assert_eq!(asked[0].1.previously_granted, [scope::PHONE_NUMBER], "the grant survived");
    let grants = host.list_grants(APP, "u1").await.expect("list");
    assert_eq!(grants.len(), 1);

    let code = login(&r).await;
    let mut ex = exchange(&daemon).await;
    let after = ex.code2_session(c2s(APP, &secret, &code)).await.expect("the old secret still works").into_inner();
    assert_eq!(after.openid, openid, "openid is stable across restarts");
}
