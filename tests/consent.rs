//! Consent end to end (issues 9 and 11), over the daemon's real socket with the real client
//! library: an answer that waited on the host is for the user signed in when it is issued.
mod support;

use miniapp_broker_client::{
    HostClient, RendererClient,
    proto::{
        api::scope,
        v1::{self, GetAuthCodeRequest, GetAuthCodeResponse},
    },
};
use support::{Daemon, assert_failure, errno, launch, until, user, within};
use tokio::sync::{mpsc, oneshot};
use tonic::Code;

const APP: &str = "wxconsent0000001";

/// One getAuthCode request the test host holds until the test answers it.
type HeldAuth = (GetAuthCodeRequest, oneshot::Sender<GetAuthCodeResponse>);

/// A host whose getAuthCode hands each request to the test and answers what the test sends back.
async fn holding_host(daemon: &Daemon, uid: &str) -> (HostClient, mpsc::UnboundedReceiver<HeldAuth>) {
    let (tx, rx) = mpsc::unbounded_channel::<HeldAuth>();
    let host = daemon
        .host()
        .user(user(uid))
        .get_auth_code(move |_app, req| {
            let (answer, answered) = oneshot::channel();
            let _ = tx.send((req, answer));
            async move { answered.await.map_err(|_| miniapp_broker_client::HostFailure::cancelled()) }
        })
        .connect()
        .await
        .expect("host connects");
    (host, rx)
}

async fn signed_in(daemon: &Daemon, uid: &str) {
    let broker = daemon.server.broker().clone();
    until("the daemon applies the pushed user", || broker.user.get().map(|u| u.uid.clone()).unwrap_or_default() == uid)
        .await;
}

async fn sessions(host: &HostClient) -> Vec<v1::SessionInfo> {
    host.list_sessions(APP).await.expect("list sessions")
}

fn granting(req: &GetAuthCodeRequest, auth_code: &str, code: &str) -> GetAuthCodeResponse {
    GetAuthCodeResponse {
        auth_code: auth_code.into(),
        code: code.into(),
        auth_success_scopes: req.scopes.clone(),
        ..Default::default()
    }
}

/// Starts `call` on a renderer, waits for its getAuthCode to reach the host, switches (or signs
/// out) the user on the host, and only then lets the host answer with `answer`.
async fn switch_while_asking<T>(
    daemon: &Daemon,
    host: &HostClient,
    held: &mut mpsc::UnboundedReceiver<HeldAuth>,
    to: &str,
    call: impl std::future::Future<Output = T> + Send + 'static,
    answer: impl FnOnce(&GetAuthCodeRequest) -> GetAuthCodeResponse,
) -> (GetAuthCodeRequest, T)
where
    T: Send + 'static,
{
    let call = tokio::spawn(call);
    let (req, reply) = within("getAuthCode reaches the host", held.recv()).await.expect("host saw getAuthCode");
    let next = if to.is_empty() { v1::SignedInUser::default() } else { user(to) };
    host.set_user(next).await.expect("push user");
    signed_in(daemon, to).await;
    let _ = reply.send(answer(&req));
    (req, within("the call ends", call).await.expect("call task"))
}

#[tokio::test]
async fn a_user_switch_while_the_host_decides_issues_and_records_nothing() {
    let daemon = Daemon::start().await;
    let (host, mut held) = holding_host(&daemon, "u1").await;
    let app = launch(&host, APP, r#"{"apiVersion":"v3"}"#).await;
    let renderer = daemon.renderer(&app.launch_token).await;

    // wx.login with an authCode: no code, no session for either user.
    let r = renderer.clone();
    let (req, outcome) = switch_while_asking(
        &daemon,
        &host,
        &mut held,
        "u2",
        async move { r.call(v1::LoginRequest::default()).await },
        |req| granting(req, "ac-1", ""),
    )
    .await;
    assert_eq!(req.uid, "u1", "getAuthCode names the user it asks about");
    let failure = outcome.expect_err("the login was for u1, who is gone");
    assert_failure(&failure, "login:fail signed-in user changed", errno::USER_CHANGED, Code::Aborted, "user_changed");
    assert!(sessions(&host).await.is_empty(), "no session for either user");

    // wx.login with the host's own code passed through: no session started either.
    let r = renderer.clone();
    let (req, outcome) = switch_while_asking(
        &daemon,
        &host,
        &mut held,
        "u1",
        async move { r.call(v1::LoginRequest::default()).await },
        |req| granting(req, "", "host-code"),
    )
    .await;
    assert_eq!(req.uid, "u2");
    assert_failure(
        &outcome.expect_err("switched"),
        "login:fail signed-in user changed",
        errno::USER_CHANGED,
        Code::Aborted,
        "user_changed",
    );
    assert!(sessions(&host).await.is_empty(), "no session for either user");

    // wx.getPhoneNumber granted for u1 after u1 signed out: no code, no grant for anyone.
    let r = renderer.clone();
    let (req, outcome) = switch_while_asking(
        &daemon,
        &host,
        &mut held,
        "",
        async move { r.call(v1::GetPhoneNumberRequest {}).await },
        |req| granting(req, "ac-2", ""),
    )
    .await;
    assert_eq!((req.uid.as_str(), req.scopes.as_slice()), ("u1", [scope::PHONE_NUMBER.to_owned()].as_slice()));
    assert_failure(
        &outcome.expect_err("signed out"),
        "getPhoneNumber:fail signed-in user changed",
        errno::USER_CHANGED,
        Code::Aborted,
        "user_changed",
    );
    assert!(host.list_grants(APP, "").await.expect("grants").is_empty(), "no grant recorded for anyone");

    // wx.authorize (a consent dialog) answered after a switch: no grant for anyone.
    host.set_user(user("u1")).await.expect("push user");
    signed_in(&daemon, "u1").await;
    let r = renderer.clone();
    let (req, outcome) = switch_while_asking(
        &daemon,
        &host,
        &mut held,
        "u2",
        async move { r.call(v1::AuthorizeRequest { scope: scope::USER_INFO.into() }).await },
        |req| granting(req, "", ""),
    )
    .await;
    assert_eq!((req.uid.as_str(), req.api.as_str()), ("u1", "authorize"));
    assert_failure(
        &outcome.expect_err("switched"),
        "authorize:fail signed-in user changed",
        errno::USER_CHANGED,
        Code::Aborted,
        "user_changed",
    );
    assert!(host.list_grants(APP, "").await.expect("grants").is_empty(), "no grant recorded for anyone");
    // Every code the platform issues is on the ledger when issued: none was.
    assert!(host.ledger(APP, "", 0).await.expect("ledger").is_empty(), "no code issued for anyone");

    // The same call with nobody switching works, so the failures above were the switch.
    host.set_user(user("u1")).await.expect("push user");
    signed_in(&daemon, "u1").await;
    let r: RendererClient = renderer.clone();
    let call = tokio::spawn(async move { r.call(v1::GetPhoneNumberRequest {}).await });
    let (req, reply) = within("getAuthCode", held.recv()).await.expect("asked");
    let _ = reply.send(granting(&req, "ac-3", ""));
    let got = within("phone", call).await.expect("task").expect("granted for the user still signed in");
    assert!(!got.code.is_empty());
    let grants = host.list_grants(APP, "").await.expect("grants");
    assert_eq!(
        grants.iter().map(|g| (g.uid.as_str(), g.scope.as_str())).collect::<Vec<_>>(),
        [("u1", scope::PHONE_NUMBER)]
    );
    let issued = host.ledger(APP, "", 0).await.expect("ledger");
    assert_eq!(issued.iter().map(|d| (d.uid.as_str(), d.what.as_str())).collect::<Vec<_>>(), [("u1", "phone_number")]);
}

// ---------------------------------------------------------------------------------------------
// Settings, remembered refusals, revocation, events and the ledger (issue 11).

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use miniapp_broker_client::{
    connect,
    proto::{
        Api,
        v1::{
            Code2SessionRequest, ConsentChanged, Decision, DecisionSource, ExchangeError, RedeemCodeRequest,
            exchange_client::ExchangeClient,
        },
    },
};
use prost::Message;

/// What the test host decides and what it saw.
#[derive(Default)]
struct Desk {
    /// Scopes getAuthCode refuses.
    refuse: Vec<&'static str>,
    /// What openSetting answers (the user's choices), or an error.
    choices: BTreeMap<String, bool>,
    auth: Vec<GetAuthCodeRequest>,
    settings: Vec<v1::OpenSettingRequest>,
    /// getUserInfo / getUserProfile answers seen.
    delegated: Vec<Api>,
}

type Shared = Arc<Mutex<Desk>>;

/// A host with getAuthCode (granting all but `desk.refuse`), openSetting (when `open_setting`),
/// getUserInfo and getUserProfile, recording everything in the shared desk.
async fn consent_host(daemon: &Daemon, uid: &str, open_setting: bool) -> (HostClient, Shared) {
    let desk: Shared = Arc::default();
    let d = desk.clone();
    let mut builder = daemon.host().user(user(uid)).get_auth_code(move |_app, req: GetAuthCodeRequest| {
        let mut desk = d.lock().unwrap();
        let refused: Vec<String> = req.scopes.iter().filter(|s| desk.refuse.contains(&s.as_str())).cloned().collect();
        let answer = GetAuthCodeResponse {
            auth_code: "ac".into(),
            auth_success_scopes: req.scopes.iter().filter(|s| !refused.contains(s)).cloned().collect(),
            auth_error_scopes: refused.into_iter().map(|s| (s, "the user said no".to_owned())).collect(),
            ..Default::default()
        };
        desk.auth.push(req);
        async move { Ok(answer) }
    });
    let d = desk.clone();
    builder = builder.handle(move |_app, _req: v1::GetUserInfoRequest| {
        d.lock().unwrap().delegated.push(Api::GetUserInfo);
        async { Ok(v1::GetUserInfoResponse { user_info: Some(v1::UserInfo::default()), ..Default::default() }) }
    });
    let d = desk.clone();
    builder = builder.handle(move |_app, _req: v1::GetUserProfileRequest| {
        d.lock().unwrap().delegated.push(Api::GetUserProfile);
        async { Ok(v1::GetUserProfileResponse { user_info: Some(v1::UserInfo::default()), ..Default::default() }) }
    });
    if open_setting {
        let d = desk.clone();
        builder = builder.handle(move |_app, req: v1::OpenSettingRequest| {
            let mut desk = d.lock().unwrap();
            desk.settings.push(req);
            let auth_setting = desk.choices.clone();
            async move { Ok(v1::OpenSettingResponse { auth_setting, ..Default::default() }) }
        });
    }
    (builder.connect().await.expect("host connects"), desk)
}

fn asked(desk: &Shared) -> Vec<GetAuthCodeRequest> {
    std::mem::take(&mut desk.lock().unwrap().auth)
}

async fn setting(r: &RendererClient) -> BTreeMap<String, bool> {
    within("getSetting", r.call(v1::GetSettingRequest {})).await.expect("getSetting answers").auth_setting
}

fn map(entries: &[(&str, bool)]) -> BTreeMap<String, bool> {
    entries.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
}

/// The next consent event the host receives.
async fn event(events: &mut tokio::sync::broadcast::Receiver<ConsentChanged>) -> (String, Decision, DecisionSource) {
    let e = within("a consent event", events.recv()).await.expect("event stream open");
    let (decision, source) = (e.decision(), e.source());
    (e.scope, decision, source)
}

fn no_more_events(events: &mut tokio::sync::broadcast::Receiver<ConsentChanged>) {
    assert!(events.try_recv().is_err(), "no further consent event");
}

#[tokio::test]
async fn settings_follow_grants_refusals_and_revocations_and_the_host_hears_each_change() {
    let daemon = Daemon::start().await;
    let (host, desk) = consent_host(&daemon, "u1", false).await;
    let mut events = host.consent_changes();
    desk.lock().unwrap().refuse = vec![scope::EMAIL];
    let app = launch(&host, APP, r#"{"apiVersion":"v3"}"#).await;
    let r = daemon.renderer(&app.launch_token).await;
    assert_eq!(setting(&r).await, map(&[]), "nothing asked yet");

    // A grant.
    within("phone", r.call(v1::GetPhoneNumberRequest {})).await.expect("granted");
    assert_eq!(asked(&desk).len(), 1);
    assert_eq!(event(&mut events).await, (scope::PHONE_NUMBER.into(), Decision::Granted, DecisionSource::GetAuthCode));
    assert_eq!(setting(&r).await, map(&[(scope::PHONE_NUMBER, true)]));

    // A refusal: the first call fails as before; the second fails at once without the host.
    let first = within("email", r.call(v1::GetEmailRequest {})).await.expect_err("refused");
    assert_eq!(first.err_msg, "getEmail:fail scope not authorized: SCOPE_EMAIL: the user said no");
    assert_eq!(asked(&desk).len(), 1);
    assert_eq!(event(&mut events).await, (scope::EMAIL.into(), Decision::Refused, DecisionSource::GetAuthCode));
    assert_eq!(setting(&r).await, map(&[(scope::EMAIL, false), (scope::PHONE_NUMBER, true)]));
    for surface in ["stream", "unary", "invoke"] {
        let again = match surface {
            "stream" => within("email", r.call(v1::GetEmailRequest {})).await.map(drop),
            "unary" => within("email", r.call_unary(v1::GetEmailRequest {})).await.map(drop),
            _ => within("email", r.invoke_json("getEmail", &serde_json::json!({}))).await.map(drop).map_err(|v| {
                assert_eq!(v["errMsg"], "getEmail:fail auth deny");
                assert_eq!(v["errno"], errno::AUTH_DENY);
                v1::ApiFailure {
                    err_msg: "getEmail:fail auth deny".into(),
                    errno: errno::AUTH_DENY,
                    grpc_code: Code::PermissionDenied as i32,
                    reason: "auth_deny".into(),
                    host_error: None,
                }
            }),
        };
        let f = again.expect_err("remembered");
        assert_failure(&f, "getEmail:fail auth deny", errno::AUTH_DENY, Code::PermissionDenied, "auth_deny");
    }
    assert!(asked(&desk).is_empty(), "a remembered refusal never reaches the host");
    let listed = host.list_decisions(APP, "u1", true).await.expect("list grants");
    let listed: Vec<_> = listed.iter().map(|g| (g.scope.as_str(), g.refused)).collect();
    assert_eq!(listed, [(scope::PHONE_NUMBER, false), (scope::EMAIL, true)], "the operator sees refusals on request");
    assert_eq!(host.list_grants(APP, "u1").await.expect("grants").len(), 1, "and only grants by default");

    // The operator revokes the grant: asked again next time.
    assert_eq!(host.revoke_grants(APP, "u1", scope::PHONE_NUMBER).await.expect("revoke"), 1);
    assert_eq!(event(&mut events).await, (scope::PHONE_NUMBER.into(), Decision::Undecided, DecisionSource::Admin));
    assert_eq!(setting(&r).await, map(&[(scope::EMAIL, false)]));

    // The host clears the refusal (its own settings UI): the host is asked again, and grants.
    host.set_decision(APP, "", scope::EMAIL, Decision::Undecided).await.expect("set decision");
    assert_eq!(event(&mut events).await, (scope::EMAIL.into(), Decision::Undecided, DecisionSource::Host));
    assert_eq!(setting(&r).await, map(&[]));
    desk.lock().unwrap().refuse.clear();
    within("email", r.call(v1::GetEmailRequest {})).await.expect("asked again and granted");
    assert_eq!(asked(&desk).len(), 1);
    assert_eq!(event(&mut events).await, (scope::EMAIL.into(), Decision::Granted, DecisionSource::GetAuthCode));

    // The host refuses avatar through scope.userInfo; a bad SetDecision changes nothing.
    host.set_decision(APP, "u1", scope::USER_INFO, Decision::Refused).await.expect("set decision");
    assert_eq!(event(&mut events).await, (scope::AVATAR.into(), Decision::Refused, DecisionSource::Host));
    assert_eq!(event(&mut events).await, (scope::NICKNAME.into(), Decision::Refused, DecisionSource::Host));
    host.set_decision(APP, "u1", "scope.userLocation", Decision::Granted).await.expect("sent");
    host.set_decision(APP, "u1", scope::EMAIL, Decision::Unspecified).await.expect("sent");
    assert_eq!(
        setting(&r).await,
        map(&[(scope::AVATAR, false), (scope::EMAIL, true), (scope::NICKNAME, false), (scope::USER_INFO, false)])
    );
    let f = within("avatar", r.call(v1::ChooseAvatarRequest {})).await.expect_err("refused by the host");
    assert_failure(&f, "chooseAvatar:fail auth deny", errno::AUTH_DENY, Code::PermissionDenied, "auth_deny");
    assert!(asked(&desk).is_empty());
    no_more_events(&mut events);
}

#[tokio::test]
async fn authorize_asks_once_and_answers_from_the_store_afterwards() {
    let daemon = Daemon::start().await;
    let (host, desk) = consent_host(&daemon, "u1", false).await;
    let mut events = host.consent_changes();
    desk.lock().unwrap().refuse = vec![scope::PHONE_NUMBER];
    // authorize works in any version: the host's getAuthCode asks.
    let app = launch(&host, APP, r#"{"apiVersion":"v2"}"#).await;
    let r = daemon.renderer(&app.launch_token).await;

    let ok = within("authorize", r.call(v1::AuthorizeRequest { scope: scope::USER_INFO.into() })).await;
    assert_eq!(ok.expect("granted").err_msg, "authorize:ok");
    let first = asked(&desk);
    assert_eq!(first.len(), 1);
    assert_eq!((first[0].api.as_str(), first[0].uid.as_str()), ("authorize", "u1"));
    assert_eq!(first[0].scopes, [scope::AVATAR, scope::NICKNAME]);
    assert_eq!(event(&mut events).await.1, Decision::Granted);
    assert_eq!(event(&mut events).await.1, Decision::Granted);
    assert_eq!(
        setting(&r).await,
        map(&[(scope::AVATAR, true), (scope::NICKNAME, true), (scope::USER_INFO, true)]),
        "scope.userInfo is avatar and nickname together"
    );
    for scope in [scope::USER_INFO, scope::AVATAR, scope::NICKNAME] {
        let again = within("authorize", r.call(v1::AuthorizeRequest { scope: scope.into() })).await;
        assert_eq!(again.expect("already granted").err_msg, "authorize:ok");
    }
    assert!(asked(&desk).is_empty(), "a decided scope is not asked again");

    // A refusal is "auth deny", the first time and (without the host) every time after.
    for _ in 0..2 {
        let f = within("authorize", r.call_unary(v1::AuthorizeRequest { scope: scope::PHONE_NUMBER.into() }))
            .await
            .expect_err("refused");
        assert_failure(&f, "authorize:fail auth deny", errno::AUTH_DENY, Code::PermissionDenied, "auth_deny");
    }
    assert_eq!(asked(&desk).len(), 1, "asked once");
    assert_eq!(event(&mut events).await, (scope::PHONE_NUMBER.into(), Decision::Refused, DecisionSource::Authorize));
    // In v2 a refused scope blocks the default too.
    let f = within("phone", r.call(v1::GetPhoneNumberRequest {})).await.expect_err("refused");
    assert_failure(&f, "getPhoneNumber:fail auth deny", errno::AUTH_DENY, Code::PermissionDenied, "auth_deny");

    // A scope the daemon does not know is a bad parameter and asks nobody.
    let bad = within("authorize", r.invoke_json("authorize", &serde_json::json!({"scope": "scope.userLocation"})))
        .await
        .expect_err("unknown scope");
    assert_eq!(bad["errno"], 1001);
    assert!(bad["errMsg"].as_str().unwrap().starts_with("authorize:fail invalid parameter: unknown scope"));
    assert!(asked(&desk).is_empty());
    no_more_events(&mut events);
}

#[tokio::test]
async fn open_setting_goes_through_the_host_and_records_its_choices() {
    let daemon = Daemon::start().await;
    // A host without openSetting.
    {
        let (host, _desk) = consent_host(&daemon, "u1", false).await;
        let app = launch(&host, APP, r#"{"apiVersion":"v3"}"#).await;
        let r = daemon.renderer(&app.launch_token).await;
        let f = within("openSetting", r.call(v1::OpenSettingRequest::default())).await.expect_err("no page");
        assert_eq!(f.err_msg, "openSetting:fail openSetting not implemented by host");
        host.disconnect();
        let broker = daemon.server.broker().clone();
        until("the host is gone", || broker.host.current().is_none()).await;
    }
    let (host, desk) = consent_host(&daemon, "u1", true).await;
    let mut events = host.consent_changes();
    let app = launch(&host, APP, r#"{"apiVersion":"v3"}"#).await;
    let r = daemon.renderer(&app.launch_token).await;
    within("phone", r.call(v1::GetPhoneNumberRequest {})).await.expect("granted");
    assert_eq!(event(&mut events).await.1, Decision::Granted);

    // The user turns phone off and user info on.
    desk.lock().unwrap().choices = map(&[(scope::PHONE_NUMBER, false), (scope::USER_INFO, true)]);
    let answer = within("openSetting", r.invoke_json("openSetting", &serde_json::json!({"uid": "not-me"})))
        .await
        .expect("the host answered");
    assert_eq!(
        answer,
        serde_json::json!({"errMsg": "openSetting:ok", "authSetting": {
            "SCOPE_AVATAR": true, "SCOPE_NICKNAME": true, "SCOPE_PHONE_NUMBER": false, "scope.userInfo": true}})
    );
    let seen = std::mem::take(&mut desk.lock().unwrap().settings);
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].uid, "u1", "the daemon names the signed-in user, whatever the renderer sent");
    assert_eq!(seen[0].auth_setting, map(&[(scope::PHONE_NUMBER, true)]), "the host sees the current decisions");
    let mut changed = vec![event(&mut events).await, event(&mut events).await, event(&mut events).await];
    changed.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        changed,
        [
            (scope::AVATAR.into(), Decision::Granted, DecisionSource::OpenSetting),
            (scope::NICKNAME.into(), Decision::Granted, DecisionSource::OpenSetting),
            (scope::PHONE_NUMBER.into(), Decision::Refused, DecisionSource::OpenSetting),
        ]
    );
    asked(&desk);
    let f = within("phone", r.call(v1::GetPhoneNumberRequest {})).await.expect_err("turned off");
    assert_failure(&f, "getPhoneNumber:fail auth deny", errno::AUTH_DENY, Code::PermissionDenied, "auth_deny");
    assert!(asked(&desk).is_empty());

    // A host that answers the whole page, as WeChat's openSetting does, with the user's one change:
    // avatar off. The echoed scope.userInfo (true) must not undo it.
    desk.lock().unwrap().choices =
        map(&[(scope::AVATAR, false), (scope::NICKNAME, true), (scope::PHONE_NUMBER, false), (scope::USER_INFO, true)]);
    within("openSetting", r.call_unary(v1::OpenSettingRequest::default())).await.expect("the host answered");
    assert_eq!(event(&mut events).await, (scope::AVATAR.into(), Decision::Refused, DecisionSource::OpenSetting));
    let now = setting(&r).await;
    assert_eq!((now[scope::AVATAR], now[scope::NICKNAME], now[scope::USER_INFO]), (false, true, false));

    // A host answer naming an unknown scope is refused whole: nothing changes.
    desk.lock().unwrap().choices = map(&[(scope::PHONE_NUMBER, true), ("scope.userLocation", true)]);
    let f = within("openSetting", r.call_unary(v1::OpenSettingRequest::default())).await.expect_err("bad answer");
    assert_eq!(f.reason, "host_protocol");
    assert!(!setting(&r).await[scope::PHONE_NUMBER], "the phone stays refused");
    no_more_events(&mut events);
}

async fn exchange(daemon: &Daemon) -> ExchangeClient<tonic::transport::Channel> {
    ExchangeClient::new(connect::channel(&daemon.address()).await.expect("exchange channel"))
}

fn redeem(secret: &str, code: &str) -> RedeemCodeRequest {
    RedeemCodeRequest { app_id: APP.into(), secret: secret.into(), code: code.into() }
}

fn errcode(status: tonic::Status) -> i32 {
    ExchangeError::decode(status.details()).expect("an ExchangeError").errcode
}

#[tokio::test]
async fn a_revoked_scope_takes_its_outstanding_codes_with_it() {
    let daemon = Daemon::start().await;
    let (host, desk) = consent_host(&daemon, "u1", true).await;
    let secret = host.register_app(APP, false).await.expect("register").secret;
    let app = launch(&host, APP, r#"{"apiVersion":"v3"}"#).await;
    let r = daemon.renderer(&app.launch_token).await;
    let mut ex = exchange(&daemon).await;

    // Revoked by the operator: the phone code dies, the e-mail code of the same user lives.
    let phone = within("phone", r.call(v1::GetPhoneNumberRequest {})).await.expect("granted").code;
    let email = within("email", r.call(v1::GetEmailRequest {})).await.expect("granted").code;
    assert_eq!(host.revoke_grants(APP, "", scope::PHONE_NUMBER).await.expect("revoke"), 1);
    let refused = ex.get_phone_number(redeem(&secret, &phone)).await.expect_err("revoked");
    assert_eq!(errcode(refused), 40029, "invalid code");
    assert!(ex.get_email(redeem(&secret, &email)).await.is_ok(), "another scope's code is untouched");

    // Turned off on the settings page, and by the host: the same.
    let phone = within("phone", r.call(v1::GetPhoneNumberRequest {})).await.expect("granted again").code;
    desk.lock().unwrap().choices = map(&[(scope::PHONE_NUMBER, false)]);
    within("openSetting", r.call(v1::OpenSettingRequest::default())).await.expect("page");
    assert_eq!(errcode(ex.get_phone_number(redeem(&secret, &phone)).await.expect_err("turned off")), 40029);
    let mut events = host.consent_changes();
    host.set_decision(APP, "", scope::PHONE_NUMBER, Decision::Granted).await.expect("host grants");
    assert_eq!(event(&mut events).await, (scope::PHONE_NUMBER.into(), Decision::Granted, DecisionSource::Host));
    let email = within("email", r.call(v1::GetEmailRequest {})).await.expect("granted").code;
    host.set_decision(APP, "", "", Decision::Undecided).await.expect("host revokes all");
    let mut revoked: Vec<String> = Vec::new();
    for _ in 0..2 {
        let (scope, decision, source) = event(&mut events).await;
        assert_eq!((decision, source), (Decision::Undecided, DecisionSource::Host));
        revoked.push(scope);
    }
    revoked.sort();
    assert_eq!(revoked, [scope::EMAIL, scope::PHONE_NUMBER]);
    assert_eq!(errcode(ex.get_email(redeem(&secret, &email)).await.expect_err("revoked")), 40029);
}

/// The ledger as (app, what, surface, api, redeemed via).
fn rows(ledger: &[v1::Disclosure]) -> Vec<(String, String, String, String, String)> {
    let mut out: Vec<_> = ledger
        .iter()
        .map(|d| (d.uid.clone(), d.what.clone(), d.surface.clone(), d.api.clone(), d.redeemed_via.clone()))
        .collect();
    out.sort();
    out
}

fn row(uid: &str, what: &str, api: &str, redeemed: &str) -> (String, String, String, String, String) {
    (uid.into(), what.into(), "renderer_api".into(), api.into(), redeemed.into())
}

#[tokio::test]
async fn every_disclosure_of_a_v2_and_v3_flow_is_in_the_ledger_and_survives_a_restart() {
    let dir = tempfile::Builder::new().prefix("brokerd-ledger").tempdir().expect("temp dir");
    let mut config = miniapp_brokerd::Config::ephemeral_in(dir.path());
    config.ephemeral = false;
    config.apps.insert(APP.into(), miniapp_brokerd::config::AppConfig { union_group: Some("g".into()), secret: None });
    let daemon = Daemon::start_in(dir, config.clone()).await;
    let expected = {
        let (host, desk) = consent_host(&daemon, "u1", false).await;
        let secret = host.register_app(APP, false).await.expect("register").secret;
        let mut ex = exchange(&daemon).await;
        desk.lock().unwrap().refuse = vec![scope::NICKNAME];
        for (version, uid) in [("v2", "u1"), ("v3", "u2")] {
            host.set_user(user(uid)).await.expect("user");
            signed_in(&daemon, uid).await;
            let app = launch(&host, APP, &format!(r#"{{"apiVersion":"{version}"}}"#)).await;
            let r = daemon.renderer(&app.launch_token).await;
            let login = within("login", r.call(v1::LoginRequest::default())).await.expect("login").code;
            let phone = within("phone", r.call(v1::GetPhoneNumberRequest {})).await.expect("phone").code;
            let email = within("email", r.call(v1::GetEmailRequest {})).await.expect("email").code;
            within("avatar", r.call(v1::ChooseAvatarRequest {})).await.expect("avatar");
            let nick = within("nickname", r.call(v1::GetNickNameRequest {})).await;
            assert_eq!(nick.is_ok(), version == "v2", "{version}: the v3 host refuses the nickname");
            // getUserInfo and getUserProfile carry the nickname: refused with it (docs/decisions.md).
            let info = within("info", r.call(v1::GetUserInfoRequest::default())).await;
            let profile = v1::GetUserProfileRequest { desc: "scoreboard".into(), lang: String::new() };
            let profiles = [
                within("profile", r.call(profile.clone())).await.map(|_| ()),
                within("profile", r.call_unary(profile)).await.map(|_| ()),
            ];
            for answer in [info.map(|_| ())].iter().chain(&profiles) {
                match answer {
                    Ok(()) => assert_eq!(version, "v2", "v3 refused the nickname"),
                    Err(f) => {
                        assert_eq!(version, "v3", "{f:?}");
                        assert!(f.err_msg.ends_with(":fail auth deny"), "{f:?}");
                        assert_failure(f, &f.err_msg, errno::AUTH_DENY, Code::PermissionDenied, "auth_deny");
                    }
                }
            }
            within("setting", r.call(v1::GetSettingRequest {})).await.expect("getSetting discloses nothing");
            let c2s = Code2SessionRequest { app_id: APP.into(), secret: secret.clone(), code: login };
            ex.code2_session(c2s).await.expect("code2session");
            ex.get_phone_number(redeem(&secret, &phone)).await.expect("phone redeemed");
            if version == "v3" {
                // Issued but never redeemed: on record, unredeemed.
                let _ = email;
            } else {
                ex.get_email(redeem(&secret, &email)).await.expect("email redeemed");
            }
        }
        assert_eq!(desk.lock().unwrap().delegated.len(), 3, "u2's refused nickname kept its user info from the host");
        let mut expected = Vec::new();
        for uid in ["u1", "u2"] {
            expected.extend([
                row(uid, "avatar", "chooseAvatar", ""),
                row(uid, "email", "getEmail", if uid == "u1" { "exchange" } else { "" }),
                row(uid, "openid", "login", "exchange"),
                row(uid, "phone_number", "getPhoneNumber", "exchange"),
                row(uid, "unionid", "login", "exchange"),
            ]);
        }
        expected.extend([
            row("u1", "nickname", "getNickName", ""),
            row("u1", "user_info", "getUserInfo", ""),
            row("u1", "user_profile", "getUserProfile", ""),
        ]);
        expected.sort();
        let ledger = host.ledger(APP, "", 0).await.expect("ledger");
        assert_eq!(rows(&ledger), expected, "one row per kind of disclosure, none for the refused nickname");
        // The stream's and the unary getUserProfile are one row counting both (privacy.ledger_coalesce_secs).
        let counts: Vec<u64> =
            ledger.iter().map(|d| if d.what == "user_profile" { d.count - 1 } else { d.count }).collect();
        assert!(counts.iter().all(|&c| c == 1), "{ledger:?}");
        for d in &ledger {
            assert_eq!(d.via_code, ["openid", "unionid", "phone_number", "email"].contains(&d.what.as_str()));
            assert_eq!(d.redeemed_at_ms > 0, !d.redeemed_via.is_empty());
            assert_eq!(d.at_ms, support::T0_MS);
        }
        expected
    };
    let dir = within("shutdown", daemon.stop()).await;
    let daemon = Daemon::start_in(dir, config).await;
    let (host, _desk) = consent_host(&daemon, "u1", false).await;
    assert_eq!(rows(&host.ledger(APP, "", 0).await.expect("ledger")), expected, "the ledger survived the restart");
    let u2: Vec<_> = expected.iter().filter(|r| r.0 == "u2").cloned().collect();
    assert_eq!(rows(&host.ledger("", "u2", 0).await.expect("ledger")), u2, "filtered by user");
    assert!(host.ledger(APP, "", support::T0_MS + 1).await.expect("ledger").is_empty(), "filtered by time");
}

#[tokio::test]
async fn the_ledger_keeps_rows_for_privacy_ledger_days() {
    let daemon = Daemon::start_with(|c| c.privacy.ledger_days = 1).await;
    let (host, _desk) = consent_host(&daemon, "u1", false).await;
    let app = launch(&host, APP, r#"{"apiVersion":"v2"}"#).await;
    let r = daemon.renderer(&app.launch_token).await;
    within("avatar", r.call(v1::ChooseAvatarRequest {})).await.expect("avatar");
    daemon.clock.advance_ms(23 * 3600 * 1000);
    within("nickname", r.call(v1::GetNickNameRequest {})).await.expect("nickname");
    daemon.clock.advance_ms(2 * 3600 * 1000);
    // The daemon's sweep enforces the retention; run it now instead of waiting for its timer.
    daemon.server.broker().consent.ledger.prune(u32::MAX).expect("prune");
    let left: Vec<_> = host.ledger(APP, "", 0).await.expect("ledger").into_iter().map(|d| d.what).collect();
    assert_eq!(left, ["nickname"]);
}

#[tokio::test]
async fn a_ledger_larger_than_one_message_is_listed_whole() {
    // Small messages, so a few hundred rows are more than one answer can carry.
    // And one row per login: neither coalesced nor held to one user's rate.
    let daemon = Daemon::start_with(|c| {
        c.limits.max_message_bytes = 4096;
        c.privacy.ledger_coalesce_secs = 0;
        c.limits.burst_per_user = 1_000;
    })
    .await;
    let (host, _desk) = consent_host(&daemon, "u1", false).await;
    let app = launch(&host, APP, r#"{"apiVersion":"v2"}"#).await;
    let r = daemon.renderer(&app.launch_token).await;
    for _ in 0..150 {
        within("login", r.call(v1::LoginRequest::default())).await.expect("login");
    }
    let ledger = host.ledger(APP, "", 0).await.expect("a long ledger still lists");
    assert_eq!(ledger.len(), 150, "one openid row per login code");
    let ids: Vec<u64> = ledger.iter().map(|d| d.id).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "oldest first, no row twice");
}

#[tokio::test]
async fn grants_refusals_and_sessions_larger_than_one_message_are_listed_whole() {
    // Small messages, so a hundred decisions or sessions are more than one answer can carry.
    let daemon = Daemon::start_with(|c| c.limits.max_message_bytes = 4096).await;
    let (host, _desk) = consent_host(&daemon, "u1", false).await;
    let mut events = host.consent_changes();
    const USERS: usize = 100;
    let uids: Vec<String> = (0..USERS).map(|i| format!("user{i:03}")).collect();
    for uid in &uids {
        host.set_decision(APP, uid, scope::EMAIL, Decision::Granted).await.expect("grant");
        host.set_decision(APP, uid, scope::PHONE_NUMBER, Decision::Refused).await.expect("refuse");
    }
    for _ in 0..2 * USERS {
        event(&mut events).await;
    }
    let listed = host.list_decisions(APP, "", true).await.expect("a long list of decisions still lists");
    let listed: Vec<_> = listed.iter().map(|g| (g.refused, g.uid.as_str(), g.scope.as_str())).collect();
    let grants = uids.iter().map(|u| (false, u.as_str(), scope::EMAIL));
    let refusals = uids.iter().map(|u| (true, u.as_str(), scope::PHONE_NUMBER));
    assert_eq!(listed, grants.chain(refusals).collect::<Vec<_>>(), "every grant, then every refusal, each once");
    assert_eq!(host.list_grants(APP, "").await.expect("grants").len(), USERS, "only grants by default");

    // A session per app the user logged in to.
    const APPS: usize = 80;
    let mut apps = Vec::new();
    for i in 0..APPS {
        let app_id = format!("wxpaged{i:03}");
        let app = launch(&host, &app_id, r#"{"apiVersion":"v2"}"#).await;
        let r = daemon.renderer(&app.launch_token).await;
        within("login", r.call(v1::LoginRequest::default())).await.expect("login");
        apps.push(app_id);
    }
    let sessions = host.list_sessions("").await.expect("a long list of sessions still lists");
    let listed: Vec<_> = sessions.iter().map(|s| (s.app_id.as_str(), s.uid.as_str())).collect();
    assert_eq!(listed, apps.iter().map(|a| (a.as_str(), "u1")).collect::<Vec<_>>(), "every session once, in order");

    // A token that no page gave is refused, not read as a place to start.
    let bad = v1::ListSessionsRequest { app_id: String::new(), after: "not a token".into() };
    let err = host.admin().list_sessions(host.authorize(bad)).await.expect_err("a made-up token");
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn scope_user_info_is_decided_whole_or_not_at_all() {
    // On disk, so the test can make the store fail the second of userInfo's two scopes, as a full
    // disk (or a crash) between two writes would.
    let daemon = Daemon::start_with(|c| c.ephemeral = false).await;
    let (host, _desk) = consent_host(&daemon, "u1", false).await;
    let mut events = host.consent_changes();
    let [first, second] = scope::expand(scope::USER_INFO).expect("userInfo") else { panic!("two scopes") };
    let db = rusqlite::Connection::open(daemon.dir.path().join("broker.db")).expect("open the daemon's store");
    db.execute_batch(&format!(
        "CREATE TRIGGER fail_second BEFORE INSERT ON grants WHEN NEW.scope = '{second}'
         BEGIN SELECT RAISE(ABORT, 'disk full'); END"
    ))
    .expect("trigger");
    host.set_decision(APP, "u1", scope::USER_INFO, Decision::Granted).await.expect("send");
    // The host's messages are applied in order: once a later decision is announced, the first
    // was tried.
    host.set_decision(APP, "u1", scope::EMAIL, Decision::Granted).await.expect("send");
    assert_eq!(event(&mut events).await, (scope::EMAIL.into(), Decision::Granted, DecisionSource::Host));
    let listed: Vec<_> =
        host.list_decisions(APP, "u1", true).await.expect("list").into_iter().map(|g| g.scope).collect();
    assert_eq!(listed, [scope::EMAIL], "neither half of the failed userInfo decision is stored");

    // The store works again: userInfo is granted whole.
    db.execute_batch("DROP TRIGGER fail_second").expect("drop trigger");
    host.set_decision(APP, "u1", scope::USER_INFO, Decision::Granted).await.expect("send");
    assert_eq!(event(&mut events).await, ((*first).into(), Decision::Granted, DecisionSource::Host));
    assert_eq!(event(&mut events).await, ((*second).into(), Decision::Granted, DecisionSource::Host));
    let mut listed: Vec<_> = host.list_grants(APP, "u1").await.expect("list").into_iter().map(|g| g.scope).collect();
    listed.sort();
    let mut expected = vec![scope::EMAIL, first, second];
    expected.sort();
    assert_eq!(listed, expected);
}

#[tokio::test]
async fn with_remember_refusals_off_the_host_is_asked_again() {
    let daemon = Daemon::start_with(|c| c.consent.remember_refusals = false).await;
    let (host, desk) = consent_host(&daemon, "u1", false).await;
    desk.lock().unwrap().refuse = vec![scope::EMAIL];
    let app = launch(&host, APP, r#"{"apiVersion":"v3"}"#).await;
    let r = daemon.renderer(&app.launch_token).await;
    for _ in 0..2 {
        let f = within("email", r.call(v1::GetEmailRequest {})).await.expect_err("refused");
        assert_eq!(f.reason, "scope_denied", "the host's refusal each time, never a remembered one");
    }
    assert_eq!(asked(&desk).len(), 2, "asked every time");
    assert_eq!(setting(&r).await, map(&[]), "nothing remembered");
}

/// A v2 host's phone and e-mail codes are issued with no stored decision: revoking the scope (the
/// operator's RevokeGrants, the host's SetDecision UNDECIDED, either's "revoke all") still kills
/// the codes already out, while a code issued after the revocation works (v2 asks no one).
#[tokio::test]
async fn revoking_a_scope_never_decided_kills_its_outstanding_codes() {
    let daemon = Daemon::start().await;
    let (host, _desk) = consent_host(&daemon, "u1", false).await;
    let secret = host.register_app(APP, false).await.expect("register").secret;
    let app = launch(&host, APP, r#"{"apiVersion":"v2"}"#).await;
    let r = daemon.renderer(&app.launch_token).await;
    let mut ex = exchange(&daemon).await;
    let mut events = host.consent_changes();
    let phone = || async { within("phone", r.call(v1::GetPhoneNumberRequest {})).await.expect("phone").code };
    let email = || async { within("email", r.call(v1::GetEmailRequest {})).await.expect("email").code };

    // The operator revokes one scope, then every scope: nothing was decided, so nothing "changed".
    let (p, e) = (phone().await, email().await);
    assert_eq!(host.revoke_grants(APP, "", scope::PHONE_NUMBER).await.expect("revoke"), 0);
    assert_eq!(errcode(ex.get_phone_number(redeem(&secret, &p)).await.expect_err("revoked")), 40029);
    assert_eq!(host.revoke_grants(APP, "u1", "").await.expect("revoke all"), 0);
    assert_eq!(errcode(ex.get_email(redeem(&secret, &e)).await.expect_err("revoked")), 40029);

    // The host does the same; a later SetDecision's event says the earlier one was applied
    // (the host's messages are applied in order).
    let (p, e) = (phone().await, email().await);
    host.set_decision(APP, "", scope::PHONE_NUMBER, Decision::Undecided).await.expect("sent");
    host.set_decision(APP, "", scope::AVATAR, Decision::Granted).await.expect("sent");
    assert_eq!(event(&mut events).await, (scope::AVATAR.into(), Decision::Granted, DecisionSource::Host));
    assert_eq!(errcode(ex.get_phone_number(redeem(&secret, &p)).await.expect_err("revoked")), 40029);
    assert_eq!(
        ex.get_email(redeem(&secret, &e)).await.expect("another scope's code lives").into_inner().email,
        "u1@example.invalid"
    );
    let e = email().await;
    host.set_decision(APP, "", "", Decision::Undecided).await.expect("host revokes all");
    assert_eq!(event(&mut events).await, (scope::AVATAR.into(), Decision::Undecided, DecisionSource::Host));
    assert_eq!(errcode(ex.get_email(redeem(&secret, &e)).await.expect_err("revoked")), 40029);

    // After the revocation a new code is the user's to give again.
    let p = phone().await;
    assert_eq!(
        ex.get_phone_number(redeem(&secret, &p)).await.expect("a new code").into_inner().phone_number,
        "+86 138 u1"
    );
    no_more_events(&mut events);
}

/// Many getPhoneNumber calls race the host's refusal (SetDecision REFUSED, never decided before):
/// once its event arrived, no code any of them got redeems, and every call after it is refused.
/// Then the operator's RevokeGrants races them: no code answered before it was sent redeems.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_decision_racing_many_phone_number_calls_leaves_no_code_issued_past_it() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let daemon = Daemon::start_with(|c| {
        c.limits.exchanges_per_minute_per_app = 100_000;
        c.limits.exchange_burst_per_app = 100_000;
        c.limits.calls_per_second_per_app = 100_000;
        c.limits.burst_per_app = 100_000;
        c.limits.calls_per_second_per_user = 100_000;
        c.limits.burst_per_user = 100_000;
    })
    .await;
    let (host, _desk) = consent_host(&daemon, "u1", false).await;
    let secret = host.register_app(APP, false).await.expect("register").secret;
    let app = launch(&host, APP, r#"{"apiVersion":"v2"}"#).await;
    let renderers = [daemon.renderer(&app.launch_token).await, daemon.renderer(&app.launch_token).await];
    let mut ex = exchange(&daemon).await;
    let mut events = host.consent_changes();
    const CALLERS: usize = 8;
    const MOST: usize = 400;
    for round in 0..30 {
        // Callers ask for phone codes until they are refused (each a bounded number of times).
        let issued = Arc::new(AtomicUsize::new(0));
        let callers: Vec<_> = (0..CALLERS)
            .map(|i| {
                let (r, issued) = (renderers[i % 2].clone(), issued.clone());
                tokio::spawn(async move {
                    let mut codes = Vec::new();
                    for _ in 0..MOST {
                        match r.call(v1::GetPhoneNumberRequest {}).await {
                            Ok(answer) => codes.push(answer.code),
                            Err(f) => return (codes, Some(f)),
                        }
                        issued.fetch_add(1, Ordering::SeqCst);
                    }
                    (codes, None)
                })
            })
            .collect();
        until("codes are being issued", || issued.load(Ordering::SeqCst) >= 40).await;
        host.set_decision(APP, "", scope::PHONE_NUMBER, Decision::Refused).await.expect("sent");
        assert_eq!(event(&mut events).await, (scope::PHONE_NUMBER.into(), Decision::Refused, DecisionSource::Host));
        let mut codes = Vec::new();
        for caller in callers {
            let (got, refused) = within("a caller ends", caller).await.expect("caller task");
            let f = refused.unwrap_or_else(|| panic!("round {round}: {MOST} codes and never refused"));
            assert_failure(&f, "getPhoneNumber:fail auth deny", errno::AUTH_DENY, Code::PermissionDenied, "auth_deny");
            codes.extend(got);
        }
        for code in &codes {
            match ex.get_phone_number(redeem(&secret, code)).await {
                Ok(_) => panic!("round {round}: one of {} codes redeemed after the refusal", codes.len()),
                Err(refused) => assert_eq!(errcode(refused), 40029),
            }
        }
        host.set_decision(APP, "", scope::PHONE_NUMBER, Decision::Undecided).await.expect("sent");
        assert_eq!(event(&mut events).await, (scope::PHONE_NUMBER.into(), Decision::Undecided, DecisionSource::Host));
    }

    // The operator's revocation of the never-decided scope, racing the same callers: every code
    // answered before the revocation was sent is dead once it answered.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (sent_tx, sent_rx) = tokio::sync::watch::channel(false);
    let issued = Arc::new(AtomicUsize::new(0));
    let callers: Vec<_> = (0..CALLERS)
        .map(|i| {
            let (r, stop, sent, issued) = (renderers[i % 2].clone(), stop.clone(), sent_rx.clone(), issued.clone());
            tokio::spawn(async move {
                let mut before = Vec::new();
                for _ in 0..MOST {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let answer = r.call(v1::GetPhoneNumberRequest {}).await.expect("v2 issues while undecided");
                    if !*sent.borrow() {
                        before.push(answer.code);
                    }
                    issued.fetch_add(1, Ordering::SeqCst);
                }
                before
            })
        })
        .collect();
    until("codes are being issued", || issued.load(Ordering::SeqCst) >= 40).await;
    sent_tx.send(true).expect("callers watch");
    assert_eq!(host.revoke_grants(APP, "", scope::PHONE_NUMBER).await.expect("revoke"), 0);
    stop.store(true, Ordering::SeqCst);
    let mut before = Vec::new();
    for caller in callers {
        before.extend(within("a caller ends", caller).await.expect("caller task"));
    }
    assert!(!before.is_empty());
    for code in &before {
        let refused = ex.get_phone_number(redeem(&secret, code)).await.expect_err("answered before the revoke");
        assert_eq!(errcode(refused), 40029);
    }
}
