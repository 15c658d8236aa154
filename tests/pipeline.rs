//! One path for every renderer surface (issue 18, items 1, 5 and 9), over the daemon's real socket
//! with the real client library, each check run on the multiplexed stream, the typed unary RPCs
//! and the JSON `Invoke` alike:
//! - the first calls of a fresh instance share one `openApiVersion` question: a host that stays
//!   silent or goes away is asked once, and every waiting call is answered by its own deadline;
//! - bad parameters are refused (1001) before the rate token, the in-flight slot and the version
//!   question;
//! - a remembered refusal bites on the delegate route as on the default one: the API fails
//!   `auth deny` without reaching the host (the table in docs/decisions.md).
mod support;

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use miniapp_broker_client::{
    HostBuilder, HostFailure, RendererClient,
    proto::{
        Api,
        api::{ApiCall, scope},
        json,
        v1::{self, ApiRequest, Decision, api_request},
    },
};
use serde_json::{Value, json};
use support::{Daemon, errno, launch, until, user, within};
use tokio::sync::{Notify, broadcast};

/// The three ways a renderer calls an open API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Surface {
    Stream,
    Unary,
    Invoke,
}

const SURFACES: [Surface; 3] = [Surface::Stream, Surface::Unary, Surface::Invoke];

/// A call's answer as a mini program sees it: its `errMsg`, and the errno of a failure.
type Answer = Result<String, (String, i64)>;

/// Calls `api` with the mini program's `params` on `surface`.
async fn call(r: &RendererClient, surface: Surface, api: Api, params: &Value) -> Answer {
    if surface == Surface::Invoke {
        let field = |v: &Value, k: &str| v.get(k).cloned().unwrap_or(Value::Null);
        return match r.invoke_json(api.name(), params).await {
            Ok(v) => Ok(field(&v, "errMsg").as_str().unwrap_or_default().to_owned()),
            Err(v) => Err((
                field(&v, "errMsg").as_str().unwrap_or_default().to_owned(),
                field(&v, "errno").as_i64().unwrap_or_default(),
            )),
        };
    }
    let request = json::request_from_json(api, &params.to_string()).expect("params the bridge accepts");
    let outcome = match surface {
        Surface::Stream => r.call_request(request).await,
        _ => unary(r, request).await,
    };
    outcome.map(|resp| resp.err_msg().to_owned()).map_err(|f| (f.err_msg, f.errno))
}

/// `request` through its typed unary RPC.
async fn unary(r: &RendererClient, request: ApiRequest) -> Result<v1::ApiResponse, v1::ApiFailure> {
    use api_request::Api as R;
    macro_rules! typed {
        ($req:ident, $x:expr) => {
            r.call_unary($x).await.map(v1::$req::wrap_response)
        };
    }
    match request.api.expect("names an API") {
        R::Login(x) => typed!(LoginRequest, x),
        R::CheckSession(x) => typed!(CheckSessionRequest, x),
        R::GetPhoneNumber(x) => typed!(GetPhoneNumberRequest, x),
        R::GetEmail(x) => typed!(GetEmailRequest, x),
        R::ChooseAvatar(x) => typed!(ChooseAvatarRequest, x),
        R::GetNickName(x) => typed!(GetNickNameRequest, x),
        R::GetUserInfo(x) => typed!(GetUserInfoRequest, x),
        R::GetUserProfile(x) => typed!(GetUserProfileRequest, x),
        R::RequestPayment(x) => typed!(RequestPaymentRequest, x),
        R::RequestMidasPaymentGameItem(x) => typed!(RequestMidasPaymentGameItemRequest, x),
        R::GetSetting(x) => typed!(GetSettingRequest, x),
        R::Authorize(x) => typed!(AuthorizeRequest, x),
        R::OpenSetting(x) => typed!(OpenSettingRequest, x),
    }
}

/// The open APIs the host answered, per app id.
#[derive(Clone, Default)]
struct Reached(Arc<Mutex<Vec<(String, Api)>>>);

impl Reached {
    fn of(&self, app_id: &str) -> Vec<Api> {
        self.0.lock().unwrap().iter().filter(|(a, _)| a == app_id).map(|(_, api)| *api).collect()
    }
}

fn answering<T: ApiCall>(b: HostBuilder, reached: &Reached) -> HostBuilder
where
    T::Response: Default,
{
    let reached = reached.clone();
    b.handle::<T, _, _>(move |app, _req: T| {
        reached.0.lock().unwrap().push((app.app_id, T::API));
        async { Ok(T::Response::default()) }
    })
}

/// A host for user `uid` that answers every delegated open API with an empty result, recording
/// which reached it.
fn answering_host(b: HostBuilder) -> (HostBuilder, Reached) {
    let reached = Reached::default();
    let b = answering::<v1::LoginRequest>(b, &reached);
    let b = answering::<v1::GetPhoneNumberRequest>(b, &reached);
    let b = answering::<v1::GetEmailRequest>(b, &reached);
    let b = answering::<v1::ChooseAvatarRequest>(b, &reached);
    let b = answering::<v1::GetNickNameRequest>(b, &reached);
    let b = answering::<v1::GetUserInfoRequest>(b, &reached);
    let b = answering::<v1::GetUserProfileRequest>(b, &reached);
    (b, reached)
}

/// A host whose openApiVersion never answers (counting each question), and whose getUserInfo
/// answers at once.
fn silent_version_host(daemon: &Daemon, asked: Arc<AtomicUsize>) -> HostBuilder {
    daemon
        .host()
        .user(user("u-silent"))
        .open_api_version(move |_app| {
            asked.fetch_add(1, Ordering::SeqCst);
            std::future::pending::<Result<String, HostFailure>>()
        })
        .handle::<v1::GetUserInfoRequest, _, _>(|_app, _req| async { Ok(v1::GetUserInfoResponse::default()) })
}

/// `n` concurrent first calls of getUserInfo on a fresh instance, spread over the three
/// surfaces (one renderer each); returns each answer with the time it took.
async fn first_calls(daemon: &Daemon, launch_token: &str, n: usize) -> Vec<(Surface, Duration, Answer)> {
    let mut calls = Vec::new();
    for i in 0..n {
        let surface = SURFACES[i % SURFACES.len()];
        let renderer = daemon.renderer(launch_token).await;
        calls.push(tokio::spawn(async move {
            let started = Instant::now();
            let answer = call(&renderer, surface, Api::GetUserInfo, &json!({})).await;
            (surface, started.elapsed(), answer)
        }));
    }
    let mut answers = Vec::new();
    for c in calls {
        answers.push(within("a first call", c).await.expect("call task"));
    }
    answers
}

/// Item 1: a host that stays silent on openApiVersion is asked once, however many first calls wait,
/// and each waiting call is answered by its deadline (`host.call_timeout_ms`) with a timeout.
#[tokio::test]
async fn first_calls_share_one_version_question_and_each_ends_by_its_deadline() {
    const TIMEOUT_MS: u64 = 1_000;
    let daemon = Daemon::start_with(|c| c.host.call_timeout_ms = TIMEOUT_MS).await;
    let asked = Arc::new(AtomicUsize::new(0));
    let host = silent_version_host(&daemon, asked.clone()).connect().await.expect("host connects");

    for n in [8, 64] {
        let app = launch(&host, "wxpipelinesilent1", "{}").await;
        let answers = first_calls(&daemon, &app.launch_token, n).await;
        let slowest = answers.iter().map(|(_, t, _)| *t).max().unwrap();
        println!("{n} concurrent first calls, host silent: slowest answered after {slowest:?}");
        for (surface, took, answer) in &answers {
            assert_eq!(
                answer,
                &Err(("getUserInfo:fail timeout".to_owned(), errno::TIMEOUT)),
                "{surface:?}: the version question timed out"
            );
            // The deadline plus the sweeper's tick and a loaded machine's slack; one more turn of
            // the question would be a whole second more.
            assert!(*took < Duration::from_millis(TIMEOUT_MS + 700), "{surface:?} answered after {took:?}");
        }
        assert_eq!(asked.swap(0, Ordering::SeqCst), 1, "{n} first calls: the host is asked once");
        host.close_app(&app.instance_id).await.expect("close");
    }
}

/// Item 1: a host that goes away while it is asked fails every waiting first call at once with
/// "host disconnected", asked once; the next call asks the next host, which answers.
#[tokio::test]
async fn a_host_that_goes_away_mid_question_fails_every_waiter_at_once() {
    let daemon = Daemon::start_with(|c| {
        c.host.call_timeout_ms = 60_000;
        c.host.grace_ms = 5_000;
    })
    .await;
    let asked = Arc::new(AtomicUsize::new(0));
    let host = silent_version_host(&daemon, asked.clone()).connect().await.expect("host connects");
    let app = launch(&host, "wxpipelinegone01", "{}").await;
    let token = app.launch_token.clone();

    let waiting = {
        let daemon_address = daemon.address();
        tokio::spawn(async move {
            let mut calls = Vec::new();
            for i in 0..24 {
                let surface = SURFACES[i % SURFACES.len()];
                let renderer = RendererClient::connect(&daemon_address, &token).await.expect("renderer");
                calls.push(tokio::spawn(async move {
                    (surface, call(&renderer, surface, Api::GetUserInfo, &json!({})).await, Instant::now())
                }));
            }
            calls
        })
    };
    let calls = within("renderers", waiting).await.expect("task");
    until("the host is asked", || asked.load(Ordering::SeqCst) == 1).await;
    // Every call is waiting on the one question (none has an answer yet).
    let broker = daemon.server.broker().clone();
    let instance = broker.registry.get(&app.instance_id).expect("instance");
    until("all 24 calls wait", || instance.calls_in_flight() == 24).await;
    let gone_at = Instant::now();
    host.disconnect();
    let mut latest = Duration::ZERO;
    for c in calls {
        let (surface, answer, at) = within("a waiting call", c).await.expect("call task");
        assert_eq!(
            answer,
            Err(("getUserInfo:fail host disconnected".to_owned(), errno::HOST_GONE)),
            "{surface:?}: the question's failure is every waiter's"
        );
        latest = latest.max(at.duration_since(gone_at));
    }
    println!("host gone with 24 first calls waiting: the last answered {latest:?} after");
    // At once, not after the grace period each would wait for a host of its own.
    assert!(latest < Duration::from_millis(2_000), "answered {latest:?} after the host left");
    assert_eq!(asked.load(Ordering::SeqCst), 1, "asked once");

    // The next host is asked afresh, once, and its answer serves the call.
    let (builder, reached) = answering_host(daemon.host().user(user("u-next")));
    let next_asked = Arc::new(AtomicUsize::new(0));
    let counter = next_asked.clone();
    let _next = builder
        .open_api_version(move |_app| {
            counter.fetch_add(1, Ordering::SeqCst);
            async { Ok("v1".to_owned()) }
        })
        .connect_retrying(Duration::from_secs(5))
        .await
        .expect("next host connects");
    let renderer = daemon.renderer(&app.launch_token).await;
    for surface in SURFACES {
        assert_eq!(call(&renderer, surface, Api::GetUserInfo, &json!({})).await, Ok("getUserInfo:ok".to_owned()));
    }
    assert_eq!(next_asked.load(Ordering::SeqCst), 1);
    assert_eq!(reached.of("wxpipelinegone01"), [Api::GetUserInfo; 3]);
}

/// A request on each surface whose parameters the daemon refuses: (API, params, errMsg).
fn invalid_calls() -> Vec<(Api, Value, &'static str)> {
    vec![
        (Api::GetUserProfile, json!({}), "getUserProfile:fail invalid parameter: desc is required"),
        (
            Api::RequestPayment,
            json!({"timeStamp": "x", "nonceStr": "", "package": "", "signType": "MD5", "paySign": ""}),
            "",
        ),
        (Api::Authorize, json!({"scope": "scope.nothing"}), ""),
    ]
}

#[track_caller]
fn assert_invalid(answer: &Answer, api: Api, err_msg: &str, what: &str) {
    match answer {
        Err((msg, code)) => {
            assert_eq!(*code, 1001, "{what}: {api} answers invalid parameters ({msg})");
            assert!(msg.starts_with(&format!("{api}:fail invalid parameter")), "{what}: {msg}");
            if !err_msg.is_empty() {
                assert_eq!(msg, err_msg, "{what}");
            }
        }
        Ok(msg) => panic!("{what}: {api} accepted: {msg}"),
    }
}

/// Item 5: on a fresh instance, bad parameters are answered 1001 at once on every surface, and the
/// host is never asked the instance's version for them.
#[tokio::test]
async fn bad_parameters_are_refused_before_the_version_question() {
    let daemon = Daemon::start_with(|c| c.host.call_timeout_ms = 5_000).await;
    let asked = Arc::new(AtomicUsize::new(0));
    let host = silent_version_host(&daemon, asked.clone()).connect().await.expect("host connects");
    let app = launch(&host, "wxpipelinefresh1", "{}").await;
    let renderer = daemon.renderer(&app.launch_token).await;
    for surface in SURFACES {
        for (api, params, err_msg) in invalid_calls() {
            let started = Instant::now();
            let answer = within("an invalid call", call(&renderer, surface, api, &params)).await;
            let took = started.elapsed();
            assert_invalid(&answer, api, err_msg, &format!("{surface:?}"));
            assert!(took < Duration::from_millis(1_000), "{surface:?} {api}: answered after {took:?}");
        }
    }
    assert_eq!(asked.load(Ordering::SeqCst), 0, "no openApiVersion asked for a call that was refused");
    let info = daemon.server.broker().registry.get(&app.instance_id).expect("instance").version_label();
    assert_eq!(info, ("", ""), "the version is still unresolved");
}

/// Item 5: bad parameters spend no rate token and take no in-flight slot: with the app's bucket
/// empty, or the instance's one slot held, they still answer 1001.
#[tokio::test]
async fn bad_parameters_are_refused_before_the_rate_token_and_the_slot() {
    let daemon = Daemon::start_with(|c| {
        c.limits.calls_per_second_per_app = 1;
        c.limits.burst_per_app = 2;
        c.limits.max_calls_in_flight_per_instance = 1;
    })
    .await;
    let hold = Arc::new(Notify::new());
    let held = Arc::new(AtomicUsize::new(0));
    let (builder, _reached) = answering_host(daemon.host().user(user("u-limits")));
    let host = builder
        .handle::<v1::CheckSessionRequest, _, _>({
            let (hold, held) = (hold.clone(), held.clone());
            move |_app, _req| {
                held.fetch_add(1, Ordering::SeqCst);
                let hold = hold.clone();
                async move {
                    hold.notified().await;
                    Ok(v1::CheckSessionResponse::default())
                }
            }
        })
        .connect()
        .await
        .expect("host connects");
    let v1_json = r#"{"apiVersion":"v1"}"#;

    // The one slot of the instance is held by a call the host sits on.
    let app = launch(&host, "wxpipelineslot01", v1_json).await;
    let renderer = daemon.renderer(&app.launch_token).await;
    let holder = tokio::spawn({
        let r = renderer.clone();
        async move { r.call(v1::CheckSessionRequest {}).await }
    });
    until("the host holds the call", || held.load(Ordering::SeqCst) == 1).await;
    let full = call(&renderer, Surface::Unary, Api::Login, &json!({})).await;
    assert_eq!(full.as_ref().map_err(|(_, e)| *e), Err(errno::EXHAUSTED), "the slot is taken: {full:?}");
    for surface in SURFACES {
        for (api, params, err_msg) in invalid_calls() {
            let answer = within("an invalid call", call(&renderer, surface, api, &params)).await;
            assert_invalid(&answer, api, err_msg, &format!("{surface:?}, slot held"));
        }
    }
    hold.notify_one();
    within("the held call", holder).await.expect("task").expect("answered");

    // Empty the app's bucket (one token a second comes back; a few calls take them all).
    let mut emptied = false;
    for _ in 0..10 {
        if let Err((_, errno::EXHAUSTED)) = call(&renderer, Surface::Unary, Api::Login, &json!({})).await {
            emptied = true;
            break;
        }
    }
    assert!(emptied, "the app's bucket empties");
    for surface in SURFACES {
        for (api, params, err_msg) in invalid_calls() {
            let answer = within("an invalid call", call(&renderer, surface, api, &params)).await;
            assert_invalid(&answer, api, err_msg, &format!("{surface:?}, bucket empty"));
        }
    }
}

/// Waits for `n` consent events (the daemon applied a SetDecision).
async fn applied(events: &mut broadcast::Receiver<v1::ConsentChanged>, n: usize) {
    for _ in 0..n {
        within("a consent event", events.recv()).await.expect("event");
    }
}

/// Item 9: a remembered refusal bites on every route and every surface. Each row: the app's
/// version, the scopes the user refused (through the host's SetDecision), the API called, and
/// whether it is denied (`auth deny`, never reaching the host) or answered.
#[tokio::test]
async fn a_remembered_refusal_bites_on_every_route_and_surface() {
    let daemon = Daemon::start().await;
    let (builder, reached) = answering_host(daemon.host().user(user("u-refuses")));
    let host = builder.connect().await.expect("host connects");
    let mut events = host.consent_changes();
    let profile = json!({"desc": "to show your name"});
    let rows: Vec<(&str, &[&str], Api, Value, bool)> = vec![
        // The delegate route: v1, and the APIs without a default in every version.
        ("v1", &[scope::USER_INFO], Api::GetUserInfo, json!({}), true),
        ("v1", &[scope::USER_INFO], Api::GetUserProfile, profile.clone(), true),
        ("v2", &[scope::AVATAR], Api::GetUserInfo, json!({}), true),
        ("v3", &[scope::NICKNAME], Api::GetUserProfile, profile.clone(), true),
        ("v1", &[scope::PHONE_NUMBER], Api::GetPhoneNumber, json!({}), true),
        ("v1", &[scope::EMAIL], Api::GetEmail, json!({}), true),
        ("v1", &[scope::AVATAR], Api::ChooseAvatar, json!({}), true),
        ("v1", &[scope::NICKNAME], Api::GetNickName, json!({}), true),
        // The default route, as before.
        ("v2", &[scope::PHONE_NUMBER], Api::GetPhoneNumber, json!({}), true),
        ("v2", &[scope::AVATAR], Api::ChooseAvatar, json!({}), true),
        // A refusal of another scope changes nothing; login and checkSession need none.
        ("v1", &[scope::EMAIL], Api::GetPhoneNumber, json!({}), false),
        ("v1", &[scope::PHONE_NUMBER, scope::EMAIL], Api::GetUserInfo, json!({}), false),
        ("v1", &[scope::USER_INFO, scope::PHONE_NUMBER, scope::EMAIL], Api::Login, json!({}), false),
    ];
    for (i, (version, refused, api, params, denied)) in rows.into_iter().enumerate() {
        let app_id = format!("wxpiperefusal{i:03}");
        let app = launch(&host, &app_id, &format!(r#"{{"apiVersion":"{version}"}}"#)).await;
        for s in refused {
            host.set_decision(&app_id, "", s, Decision::Refused).await.expect("set decision");
            applied(&mut events, if *s == scope::USER_INFO { 2 } else { 1 }).await;
        }
        let renderer = daemon.renderer(&app.launch_token).await;
        let what = format!("{version} {api} with {refused:?} refused");
        for surface in SURFACES {
            let answer = within("a call", call(&renderer, surface, api, &params)).await;
            if denied {
                assert_eq!(answer, Err((format!("{api}:fail auth deny"), errno::AUTH_DENY)), "{what}, {surface:?}");
            } else {
                assert_eq!(answer, Ok(format!("{api}:ok")), "{what}, {surface:?}");
            }
        }
        let at_host = reached.of(&app_id);
        if denied {
            assert!(at_host.is_empty(), "{what}: a refused call never reaches the host ({at_host:?})");
        } else if version == "v1" {
            assert_eq!(at_host, [api; 3], "{what}: answered by the host on each surface");
        }
    }
}
