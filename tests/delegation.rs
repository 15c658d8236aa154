//! v1 delegation end to end (issue 2), over the daemon's real socket with the real client library:
//! every open API reaches the host with its typed params and comes back with the host's fields and
//! `"<api>:ok"`; a host error reaches the renderer unchanged; every way a delegate call can fail to
//! be answered (method not registered, no host, host gone mid-call, deadline) ends the renderer's
//! call with its own clear error instead of a hang; launch tokens and the host token gate who may
//! call what; the JSON bridge, the unary RPCs and the multiplexed stream (answers out of order) all
//! take the same path.
mod support;

use std::{sync::Arc, time::Instant};

use miniapp_broker_client::{
    HostBuilder, HostClient, HostClientError, HostFailure, RendererClient, connect,
    proto::{
        Api,
        api::ApiCall,
        metadata,
        v1::{
            self, ApiRequest, ApiResponse, AppInfo, HostError, UserInfo, api_request, api_response,
            host_client::HostClient as GrpcHostClient, open_api_client::OpenApiClient,
        },
    },
};
use miniapp_brokerd::demo::sample_request;
use serde_json::json;
use support::{Daemon, assert_failure, launch, until, user, within};
use tokio::sync::{Notify, mpsc, oneshot};
use tonic::{Code, Request};

const APP_A: &str = "wxdelegation0000a";
const APP_B: &str = "wxdelegation0000b";
const V1: &str = r#"{"apiVersion":"v1","pages":["pages/index"]}"#;

/// What the host saw: the app a call was made for, and the typed request (as its oneof).
type Seen = mpsc::UnboundedSender<(AppInfo, ApiRequest)>;

/// The answer the test host gives for `api`: distinctive values in every field, and no errMsg
/// (the daemon stamps `"<api>:ok"` itself).
fn host_answer(api: Api) -> ApiResponse {
    use api_response::Api as R;
    let info = |who: &str| UserInfo {
        nick_name: format!("{who}-nick"),
        avatar_url: format!("https://example.invalid/{who}.png"),
        gender: 2,
        country: "CN".into(),
        province: "Guangdong".into(),
        city: "Shenzhen".into(),
        language: "zh_CN".into(),
    };
    let arm = match api {
        Api::Login => R::Login(v1::LoginResponse { err_msg: String::new(), code: "host-login-code".into() }),
        Api::CheckSession => R::CheckSession(v1::CheckSessionResponse { err_msg: String::new() }),
        Api::GetPhoneNumber => {
            R::GetPhoneNumber(v1::GetPhoneNumberResponse { err_msg: String::new(), code: "host-phone-code".into() })
        }
        Api::GetEmail => R::GetEmail(v1::GetEmailResponse { err_msg: String::new(), code: "host-email-code".into() }),
        Api::ChooseAvatar => R::ChooseAvatar(v1::ChooseAvatarResponse {
            err_msg: String::new(),
            avatar_url: "https://example.invalid/host.png".into(),
        }),
        Api::GetNickName => {
            R::GetNickName(v1::GetNickNameResponse { err_msg: String::new(), nick_name: "host-nick".into() })
        }
        Api::GetUserInfo => R::GetUserInfo(v1::GetUserInfoResponse {
            err_msg: String::new(),
            user_info: Some(info("info")),
            raw_data: r#"{"nickName":"info-nick"}"#.into(),
            signature: "info-signature".into(),
            encrypted_data: "info-encrypted".into(),
            iv: "info-iv".into(),
        }),
        Api::GetUserProfile => R::GetUserProfile(v1::GetUserProfileResponse {
            err_msg: String::new(),
            user_info: Some(info("profile")),
            raw_data: r#"{"nickName":"profile-nick"}"#.into(),
            signature: "profile-signature".into(),
            encrypted_data: "profile-encrypted".into(),
            iv: "profile-iv".into(),
        }),
        Api::RequestPayment => R::RequestPayment(v1::RequestPaymentResponse { err_msg: String::new() }),
        Api::RequestMidasPaymentGameItem => {
            R::RequestMidasPaymentGameItem(v1::RequestMidasPaymentGameItemResponse { err_msg: String::new() })
        }
        // The settings APIs (tests/consent.rs): only openSetting reaches a host, as its page.
        Api::GetSetting => R::GetSetting(v1::GetSettingResponse::default()),
        Api::Authorize => R::Authorize(v1::AuthorizeResponse::default()),
        Api::OpenSetting => R::OpenSetting(v1::OpenSettingResponse::default()),
    };
    ApiResponse { api: Some(arm) }
}

/// `host_answer(api)` as the renderer must get it: with `"<api>:ok"`.
fn stamped(api: Api) -> ApiResponse {
    let mut resp = host_answer(api);
    resp.stamp_ok();
    resp
}

/// Registers a handler for `T` that reports what it saw and answers with `host_answer`.
fn answer<T: ApiCall>(builder: HostBuilder, seen: Seen) -> HostBuilder {
    builder.handle::<T, _, _>(move |app, req: T| {
        let _ = seen.send((app, req.into_request()));
        let resp = T::unwrap_response(host_answer(T::API)).expect("host_answer has the API's arm");
        async move { Ok(resp) }
    })
}

/// A host that implements all ten open APIs.
fn answering_host(builder: HostBuilder, seen: &Seen) -> HostBuilder {
    let b = answer::<v1::LoginRequest>(builder, seen.clone());
    let b = answer::<v1::CheckSessionRequest>(b, seen.clone());
    let b = answer::<v1::GetPhoneNumberRequest>(b, seen.clone());
    let b = answer::<v1::GetEmailRequest>(b, seen.clone());
    let b = answer::<v1::ChooseAvatarRequest>(b, seen.clone());
    let b = answer::<v1::GetNickNameRequest>(b, seen.clone());
    let b = answer::<v1::GetUserInfoRequest>(b, seen.clone());
    let b = answer::<v1::GetUserProfileRequest>(b, seen.clone());
    let b = answer::<v1::RequestPaymentRequest>(b, seen.clone());
    answer::<v1::RequestMidasPaymentGameItemRequest>(b, seen.clone())
}

/// A getUserInfo request whose `lang` tags it, so a handler can tell calls apart.
fn tagged_user_info(tag: &str) -> v1::GetUserInfoRequest {
    v1::GetUserInfoRequest { with_credentials: false, lang: tag.into() }
}

/// A host whose getUserInfo handler reports that it started, then never answers. When the daemon
/// cancels the call the client drops the handler's future, which reports that too.
fn stuck_host(
    builder: HostBuilder,
    started: mpsc::UnboundedSender<String>,
    dropped: mpsc::UnboundedSender<String>,
) -> HostBuilder {
    builder.handle(move |_app, req: v1::GetUserInfoRequest| {
        let _ = started.send(req.lang.clone());
        let on_drop = ReportDrop(dropped.clone(), req.lang);
        async move {
            let _on_drop = on_drop;
            std::future::pending::<Result<v1::GetUserInfoResponse, HostFailure>>().await
        }
    })
}

/// Sends its tag when dropped (the host stopped working on a call).
struct ReportDrop(mpsc::UnboundedSender<String>, String);

impl Drop for ReportDrop {
    fn drop(&mut self) {
        let _ = self.0.send(std::mem::take(&mut self.1));
    }
}

/// A daemon with a [`stuck_host`] connected, an app launched on it and its renderer connected:
/// what the tests of calls the host holds start from.
struct Stuck {
    daemon: Daemon,
    host: HostClient,
    app: v1::LaunchAppResponse,
    renderer: RendererClient,
    /// The tag of each call the host started.
    started: mpsc::UnboundedReceiver<String>,
    /// The tag of each call the host was told to stop working on.
    dropped: mpsc::UnboundedReceiver<String>,
}

impl Stuck {
    /// With the host's deadline `call_timeout_ms`.
    async fn start(call_timeout_ms: u64) -> Stuck {
        let daemon = Daemon::start_with(|c| c.host.call_timeout_ms = call_timeout_ms).await;
        let (started_tx, started) = mpsc::unbounded_channel();
        let (dropped_tx, dropped) = mpsc::unbounded_channel();
        let host = stuck_host(daemon.host(), started_tx, dropped_tx).connect().await.expect("host connects");
        let app = launch(&host, APP_A, V1).await;
        let renderer = daemon.renderer(&app.launch_token).await;
        Stuck { daemon, host, app, renderer, started, dropped }
    }

    /// The tags of the next `n` calls the host started, sorted.
    async fn started(&mut self, n: usize) -> Vec<String> {
        tags(&mut self.started, "the host gets a call", n).await
    }

    /// The tags of the next `n` calls the host was told to stop working on, sorted.
    async fn dropped(&mut self, n: usize) -> Vec<String> {
        tags(&mut self.dropped, "a cancel reaches the host", n).await
    }
}

/// The next `n` tags from `rx`, sorted (calls on their own tasks reach the host in any order).
async fn tags(rx: &mut mpsc::UnboundedReceiver<String>, what: &str, n: usize) -> Vec<String> {
    let mut tags = Vec::new();
    for i in 0..n {
        tags.push(within(&format!("{what} ({i})"), rx.recv()).await.expect(what));
    }
    tags.sort();
    tags
}

/// A getUserInfo tagged `tag` on its own task, as a unary call or over the renderer's stream.
fn user_info_task(
    renderer: &RendererClient,
    tag: &'static str,
    unary: bool,
) -> tokio::task::JoinHandle<Result<v1::GetUserInfoResponse, v1::ApiFailure>> {
    let r = renderer.clone();
    tokio::spawn(async move {
        if unary { r.call_unary(tagged_user_info(tag)).await } else { r.call(tagged_user_info(tag)).await }
    })
}

/// Each of the getUserInfo `calls` (by surface) ended "cancelled" by its app's closing.
async fn assert_ended_by_close(
    calls: Vec<(&str, tokio::task::JoinHandle<Result<v1::GetUserInfoResponse, v1::ApiFailure>>)>,
) {
    for (surface, waiting) in calls {
        let failure = within(surface, waiting).await.expect("task").unwrap_err();
        assert_failure(
            &failure,
            "getUserInfo:fail call cancelled: app instance closed",
            1007,
            Code::Cancelled,
            "cancelled",
        );
    }
}

/// The request with its payment idempotency key taken out, after checking the client library gave
/// a payment one (the key is the library's, so it cannot be compared with what the test sent).
fn without_key(mut request: ApiRequest) -> ApiRequest {
    use miniapp_broker_client::proto::v1::api_request::Api as R;
    match request.api.as_mut() {
        Some(R::RequestPayment(r)) => assert_eq!(std::mem::take(&mut r.idempotency_key).len(), 32, "a fresh key"),
        Some(R::RequestMidasPaymentGameItem(r)) => {
            assert_eq!(std::mem::take(&mut r.idempotency_key).len(), 32, "a fresh key")
        }
        _ => {}
    }
    request
}

#[tokio::test]
async fn every_api_is_delegated_in_v1_and_answered_with_the_hosts_fields() {
    let daemon = Daemon::start().await;
    let (seen, mut saw) = mpsc::unbounded_channel();
    let host = answering_host(daemon.host().user(user("u1")), &seen).connect().await.expect("host connects");
    let app = launch(&host, APP_A, V1).await;
    assert_eq!((app.api_version.as_str(), app.version_source.as_str()), ("v1", "app.json"));
    let renderer = daemon.renderer(&app.launch_token).await;

    for api in Api::ALL {
        let sent = sample_request(api);
        let got =
            within(api.name(), renderer.call_request(sent.clone())).await.unwrap_or_else(|f| panic!("{api}: {f}"));
        assert_eq!(got, stamped(api), "{api}: the renderer gets the host's fields");
        assert_eq!(got.err_msg(), format!("{}:ok", api.name()));

        let (app_info, host_saw) = saw.try_recv().unwrap_or_else(|_| panic!("{api}: the host saw no call"));
        assert_eq!(app_info.app_id, APP_A, "{api}");
        assert_eq!(app_info.instance_id, app.instance_id, "{api}");
        assert_eq!(app_info.api_version, "v1", "{api}");
        assert_eq!(without_key(host_saw), sent, "{api}: the host sees the typed params as sent");
        assert!(saw.try_recv().is_err(), "{api}: one call reached the host once");
    }
}

#[tokio::test]
async fn a_host_error_reaches_the_renderer_unchanged_on_every_surface() {
    let daemon = Daemon::start().await;
    let host = daemon
        .host()
        .user(user("u1"))
        .handle(|_app, _req: v1::LoginRequest| async {
            Err::<v1::LoginResponse, _>(HostFailure::error("TCMPPLoginErrorDomain", -1001, "app not login"))
        })
        .handle(|_app, _req: v1::RequestPaymentRequest| async {
            Err::<v1::RequestPaymentResponse, _>(HostFailure::cancelled())
        })
        .connect()
        .await
        .expect("host connects");
    let app = launch(&host, APP_A, V1).await;
    let renderer = daemon.renderer(&app.launch_token).await;
    let seed_error = HostError { domain: "TCMPPLoginErrorDomain".into(), code: -1001, message: "app not login".into() };

    let streamed = within("login", renderer.call(v1::LoginRequest::default())).await.unwrap_err();
    let unary = within("unary login", renderer.call_unary(v1::LoginRequest::default())).await.unwrap_err();
    for f in [&streamed, &unary] {
        assert_eq!(f.err_msg, "login:fail app not login");
        assert_eq!(f.errno, -1001);
        assert_eq!(f.host_error.as_ref(), Some(&seed_error), "domain, code and message unchanged");
        assert_eq!(f.reason, "host_error");
        assert_eq!(f.code(), Code::Unknown);
    }
    let json = within("invoke login", renderer.invoke_json("login", &json!({}))).await.unwrap_err();
    assert_eq!(
        json,
        json!({
            "errMsg": "login:fail app not login",
            "errno": -1001,
            "hostError": {"domain": "TCMPPLoginErrorDomain", "code": -1001, "message": "app not login"},
        })
    );

    // A user who closes the payment sheet is a cancel, the exact string mini programs test for.
    let cancel = within("payment", renderer.call_request(sample_request(Api::RequestPayment))).await.unwrap_err();
    assert_eq!(cancel.err_msg, "requestPayment:fail cancel");
    assert!(cancel.is_cancel());
    assert_eq!(cancel.code(), Code::Cancelled);
}

#[tokio::test]
async fn a_method_the_host_did_not_register_fails_at_once() {
    let daemon = Daemon::start().await;
    let (seen, mut saw) = mpsc::unbounded_channel();
    let host = answer::<v1::LoginRequest>(daemon.host().user(user("u1")), seen).connect().await.expect("host connects");
    let app = launch(&host, APP_A, V1).await;
    let renderer = daemon.renderer(&app.launch_token).await;

    // The default deadline is 30 s; `within` allows 20 s, so an answer here is not the deadline.
    let started = Instant::now();
    let streamed = within("getUserInfo", renderer.call(tagged_user_info("x"))).await.unwrap_err();
    let unary = within("unary getUserInfo", renderer.call_unary(tagged_user_info("x"))).await.unwrap_err();
    for f in [&streamed, &unary] {
        assert_failure(
            f,
            "getUserInfo:fail getUserInfo not implemented by host",
            1003,
            Code::Unimplemented,
            "not_implemented_by_host",
        );
    }
    let json = within("invoke", renderer.invoke_json("getNickName", &json!({}))).await.unwrap_err();
    assert_eq!(json, json!({"errMsg": "getNickName:fail getNickName not implemented by host", "errno": 1003}));
    assert!(started.elapsed().as_secs() < 10, "refused without waiting: {:?}", started.elapsed());
    assert!(saw.try_recv().is_err(), "nothing reached the host");

    // The method it did register still works.
    let login = within("login", renderer.call(v1::LoginRequest::default())).await.expect("login answered");
    assert_eq!(login.code, "host-login-code");
}

#[tokio::test]
async fn with_no_host_connected_a_call_fails_clearly() {
    let daemon = Daemon::start().await;
    let host = daemon.host().connect().await.expect("host connects");
    let app = launch(&host, APP_A, V1).await;
    host.disconnect();
    let broker = daemon.server.broker().clone();
    until("the daemon notices the host left", || broker.host.current().is_none()).await;

    let renderer = daemon.renderer(&app.launch_token).await;
    let streamed = within("login", renderer.call(v1::LoginRequest::default())).await.unwrap_err();
    let unary = within("unary", renderer.call_unary(v1::GetUserInfoRequest::default())).await.unwrap_err();
    assert_failure(&streamed, "login:fail no host connected", 1004, Code::Unavailable, "no_host");
    assert_failure(&unary, "getUserInfo:fail no host connected", 1004, Code::Unavailable, "no_host");
    let json = within("invoke", renderer.invoke_json("checkSession", &json!({}))).await.unwrap_err();
    assert_eq!(json, json!({"errMsg": "checkSession:fail no host connected", "errno": 1004}));
}

#[tokio::test]
async fn a_host_that_disconnects_mid_call_fails_the_call_promptly() {
    // A deadline far beyond `within`'s bound: the answer below can only come from the disconnect.
    let mut s = Stuck::start(120_000).await;
    let streamed = user_info_task(&s.renderer, "streamed", false);
    let unary = user_info_task(&s.renderer, "unary", true);
    assert_eq!(s.started(2).await, ["streamed", "unary"]);

    let gone = Instant::now();
    s.host.disconnect();
    let streamed = within("streamed call after disconnect", streamed).await.expect("task").unwrap_err();
    let unary = within("unary call after disconnect", unary).await.expect("task").unwrap_err();
    assert_failure(&streamed, "getUserInfo:fail host disconnected", 1005, Code::Unavailable, "host_gone");
    assert_failure(&unary, "getUserInfo:fail host disconnected", 1005, Code::Unavailable, "host_gone");
    assert!(gone.elapsed().as_secs() < 10, "failed promptly: {:?}", gone.elapsed());
    assert!(s.daemon.server.broker().host.current().is_none());
}

#[tokio::test]
async fn a_host_answer_past_the_deadline_times_out_and_is_cancelled_on_the_host() {
    const DEADLINE_MS: u64 = 200;
    let mut s = Stuck::start(DEADLINE_MS).await;
    let renderer = s.renderer.clone();

    for (surface, unary) in [("streamed", false), ("unary", true)] {
        let asked = Instant::now();
        let call = async {
            if unary {
                renderer.call_unary(tagged_user_info(surface)).await
            } else {
                renderer.call(tagged_user_info(surface)).await
            }
        };
        let failure = within(surface, call).await.unwrap_err();
        let waited = asked.elapsed();
        assert_failure(&failure, "getUserInfo:fail timeout", 1006, Code::DeadlineExceeded, "timeout");
        assert!(waited.as_millis() >= DEADLINE_MS as u128, "{surface}: not before the deadline ({waited:?})");
        assert_eq!(s.started.try_recv().as_deref(), Ok(surface), "{surface}: the host had the call");
        // The daemon told the host to stop: the client dropped the handler's work.
        assert_eq!(s.dropped(1).await, [surface]);
    }
    assert!(s.host.is_connected(), "a slow answer does not cost the host its link");
}

#[tokio::test]
async fn launch_tokens_gate_every_surface_and_name_one_instance() {
    let daemon = Daemon::start().await;
    let (seen, mut saw) = mpsc::unbounded_channel();
    let host = answering_host(daemon.host().user(user("u1")), &seen).connect().await.expect("host connects");
    let a = launch(&host, APP_A, V1).await;
    let b = launch(&host, APP_B, V1).await;
    let closed = launch(&host, APP_A, V1).await;
    host.close_app(&closed.instance_id).await.expect("close");

    let (_, a_secret) = a.launch_token.split_once('.').expect("token is <instance>.<secret>");
    let other_apps = format!("{}.{a_secret}", b.instance_id);
    let wrong_secret = format!("{}.{}", a.instance_id, "x".repeat(a_secret.len()));
    let refusals = [
        ("empty", String::new(), "missing launch token (x-launch-token metadata)"),
        ("garbage", "not-a-token".to_owned(), "invalid launch token"),
        ("wrong secret", wrong_secret, "invalid launch token"),
        ("other instance's id with this secret", other_apps, "invalid launch token"),
        ("closed instance", closed.launch_token.clone(), "invalid launch token"),
    ];
    for (what, token, message) in refusals {
        let renderer = daemon.renderer(&token).await;
        let streamed = within(what, renderer.call(v1::LoginRequest::default())).await.unwrap_err();
        let unary = within(what, renderer.call_unary(v1::LoginRequest::default())).await.unwrap_err();
        for f in [&streamed, &unary] {
            assert_eq!(f.code(), Code::Unauthenticated, "{what}: {f:?}");
            assert_eq!(f.err_msg, format!("login:fail {message}"), "{what}");
        }
        let json = within(what, renderer.invoke_json("login", &json!({}))).await.unwrap_err();
        assert_eq!(json["errMsg"], format!("login:fail {message}"), "{what}");
    }

    // No token at all (not even an empty entry).
    let mut raw = OpenApiClient::new(connect::channel(&daemon.address()).await.expect("channel"));
    let status = within("no token", raw.login(v1::LoginRequest::default())).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(status.message(), "missing launch token (x-launch-token metadata)");
    assert!(saw.try_recv().is_err(), "no refused call reached the host");

    // Each valid token acts for its own instance, and only for it.
    for (app_id, launched) in [(APP_A, &a), (APP_B, &b)] {
        let renderer = daemon.renderer(&launched.launch_token).await;
        within(app_id, renderer.call(v1::GetNickNameRequest::default())).await.expect("own token works");
        let (info, _) = saw.try_recv().expect("the host saw the call");
        assert_eq!((info.app_id.as_str(), info.instance_id.as_str()), (app_id, launched.instance_id.as_str()));
    }

    // Closing an instance ends an open renderer stream too.
    let renderer = daemon.renderer(&a.launch_token).await;
    within("before close", renderer.call(v1::CheckSessionRequest::default())).await.expect("open instance answers");
    let _ = saw.try_recv();
    host.close_app(&a.instance_id).await.expect("close");
    let after = within("after close", renderer.call(v1::CheckSessionRequest::default())).await.unwrap_err();
    assert_eq!(after.code(), Code::Unauthenticated, "{after:?}");
    assert!(saw.try_recv().is_err(), "nothing reached the host after the close");
}

#[tokio::test]
async fn one_host_at_a_time_and_only_with_the_host_token() {
    let daemon = Daemon::start().await;

    // Wrong and missing host tokens: refused everywhere, and they take no slot.
    match HostBuilder::new(&daemon.address(), "not-the-token").connect().await {
        Err(HostClientError::Refused(status)) => {
            assert_eq!(status.code(), Code::Unauthenticated);
            assert_eq!(status.message(), "invalid host token");
        }
        other => panic!("wrong host token accepted: {other:?}"),
    }
    let channel = connect::channel(&daemon.address()).await.expect("channel");
    let mut raw = GrpcHostClient::new(channel.clone());
    let launch_request = || v1::LaunchAppRequest { app_id: APP_A.into(), app_json: V1.into() };
    let mut wrong = Request::new(launch_request());
    wrong.metadata_mut().insert(metadata::AUTHORIZATION, "Bearer not-the-token".parse().unwrap());
    let status = raw.launch_app(wrong).await.unwrap_err();
    assert_eq!((status.code(), status.message()), (Code::Unauthenticated, "invalid host token"));
    let status = raw.launch_app(Request::new(launch_request())).await.unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (Code::Unauthenticated, "missing host token (authorization: Bearer <token>)")
    );
    let mut admin = v1::admin_client::AdminClient::new(channel);
    let mut wrong = Request::new(v1::ListAppsRequest {});
    wrong.metadata_mut().insert(metadata::AUTHORIZATION, "Bearer not-the-token".parse().unwrap());
    assert_eq!(admin.list_apps(wrong).await.unwrap_err().code(), Code::Unauthenticated);

    let (seen, _saw) = mpsc::unbounded_channel();
    let first = answering_host(daemon.host().name("first"), &seen).connect().await.expect("first host connects");
    match daemon.host().name("second").connect().await {
        Err(HostClientError::Refused(status)) => {
            assert_eq!(status.code(), Code::AlreadyExists);
            assert_eq!(status.message(), "another host is connected; one host at a time");
        }
        other => panic!("a second host was accepted: {other:?}"),
    }
    // The first host keeps its link.
    let app = launch(&first, APP_A, V1).await;
    let renderer = daemon.renderer(&app.launch_token).await;
    within("first host answers", renderer.call(v1::GetNickNameRequest::default())).await.expect("answered");
    assert_eq!(daemon.server.broker().host.current().map(|h| h.name.clone()).as_deref(), Some("first"));

    // Once it leaves, another host may take its place.
    first.disconnect();
    let broker = daemon.server.broker().clone();
    until("the first host is gone", || broker.host.current().is_none()).await;
    let replacement = within("a new host connects", async {
        loop {
            match daemon.host().name("replacement").connect().await {
                Ok(host) => break host,
                // The slot is released right after the session is retired.
                Err(HostClientError::Refused(s)) if s.code() == Code::AlreadyExists => tokio::task::yield_now().await,
                Err(e) => panic!("replacement refused: {e}"),
            }
        }
    })
    .await;
    assert!(replacement.is_connected());
}

#[tokio::test]
async fn the_json_bridge_and_the_unary_rpcs_take_the_same_path() {
    let daemon = Daemon::start().await;
    let (seen, mut saw) = mpsc::unbounded_channel();
    let host = answering_host(daemon.host(), &seen).connect().await.expect("host connects");
    let app = launch(&host, APP_A, V1).await;
    let renderer = daemon.renderer(&app.launch_token).await;

    // JSON in with WeChat names (and a callback a bridge forgot to strip), WeChat JSON out.
    let params = json!({
        "timeStamp": "1700000000", "nonceStr": "n0nce", "package": "prepay_id=wx42",
        "signType": "RSA", "paySign": "sig-42", "success": "function() {}",
    });
    let result = within("invoke requestPayment", renderer.invoke_json("requestPayment", &params)).await.expect("ok");
    assert_eq!(result, json!({"errMsg": "requestPayment:ok"}));
    let (info, host_saw) = saw.try_recv().expect("the host saw the payment");
    assert_eq!(info.instance_id, app.instance_id);
    let Some(api_request::Api::RequestPayment(p)) = host_saw.api else { panic!("wrong arm: {host_saw:?}") };
    assert_eq!(
        (p.time_stamp.as_str(), p.nonce_str.as_str(), p.package.as_str(), p.sign_type.as_str(), p.pay_sign.as_str()),
        ("1700000000", "n0nce", "prepay_id=wx42", "RSA", "sig-42")
    );

    let result = within("invoke getUserInfo", renderer.invoke_json("wx.getUserInfo", &json!({"lang": "zh_CN"})))
        .await
        .expect("ok");
    assert_eq!(result["errMsg"], "getUserInfo:ok");
    assert_eq!(result["userInfo"]["nickName"], "info-nick");
    assert_eq!(result["userInfo"]["gender"], 2);
    assert_eq!(result["signature"], "info-signature");
    let (_, host_saw) = saw.try_recv().expect("the host saw getUserInfo");
    assert_eq!(host_saw, tagged_user_info("zh_CN").into_request());

    // The typed unary RPC.
    let sent = v1::GetUserProfileRequest { desc: "show your name".into(), lang: "en".into() };
    let got = within("unary getUserProfile", renderer.call_unary(sent.clone())).await.expect("ok");
    assert_eq!(v1::GetUserProfileRequest::wrap_response(got), stamped(Api::GetUserProfile));
    let (_, host_saw) = saw.try_recv().expect("the host saw getUserProfile");
    assert_eq!(host_saw, sent.into_request());
}

#[tokio::test]
async fn one_renderer_stream_takes_answers_out_of_order() {
    let daemon = Daemon::start().await;
    let (started_tx, mut started) = mpsc::unbounded_channel::<String>();
    let release_first = Arc::new(Notify::new());
    let gate = release_first.clone();
    let host = daemon
        .host()
        .handle(move |_app, req: v1::GetUserInfoRequest| {
            let _ = started_tx.send(req.lang.clone());
            let gate = gate.clone();
            async move {
                if req.lang == "first" {
                    gate.notified().await;
                }
                let info = UserInfo { nick_name: req.lang, ..Default::default() };
                Ok(v1::GetUserInfoResponse { user_info: Some(info), ..Default::default() })
            }
        })
        .connect()
        .await
        .expect("host connects");
    let app = launch(&host, APP_A, V1).await;
    let renderer: RendererClient = daemon.renderer(&app.launch_token).await;

    let (first_done_tx, mut first_done) = oneshot::channel();
    let first = tokio::spawn({
        let r = renderer.clone();
        async move {
            let answer = r.call(tagged_user_info("first")).await;
            let _ = first_done_tx.send(());
            answer
        }
    });
    assert_eq!(within("the host has the first call", started.recv()).await.as_deref(), Some("first"));

    let second = within("the second call", renderer.call(tagged_user_info("second"))).await.expect("second answered");
    assert_eq!(second.user_info.expect("user info").nick_name, "second");
    assert_eq!(second.err_msg, "getUserInfo:ok");
    assert!(first_done.try_recv().is_err(), "the first call is still waiting while the second was answered");

    release_first.notify_one();
    let first = within("the first call", first).await.expect("task").expect("first answered");
    assert_eq!(first.user_info.expect("user info").nick_name, "first");

    // Both travelled on one stream.
    let status = host.admin().status(host.authorize(v1::StatusRequest {})).await.expect("status").into_inner();
    assert_eq!(status.renderer_streams, 1);
}

#[tokio::test]
async fn closing_a_renderer_fails_its_pending_calls_and_cancels_them_on_the_host() {
    // A deadline far beyond `within`'s bound: the answer can only come from the close.
    let mut s = Stuck::start(120_000).await;
    let pending = user_info_task(&s.renderer, "closed", false);
    assert_eq!(s.started(1).await, ["closed"]);
    s.renderer.close().await;
    let failure = within("the pending call after close", pending).await.expect("task").unwrap_err();
    assert_eq!(
        (failure.code(), failure.errno, failure.reason.as_str()),
        (Code::Cancelled, 1007, "cancelled"),
        "{failure:?}"
    );
    // The daemon saw the stream end and told the host to stop.
    assert_eq!(s.dropped(1).await, ["closed"]);
    until("no call left in the daemon", || s.daemon.server.broker().host.calls_in_flight() == 0).await;

    // The client is still usable: the next call opens a new stream.
    let next = within("a call after close", s.renderer.call(v1::CheckSessionRequest {})).await.unwrap_err();
    assert_eq!(next.err_msg, "checkSession:fail checkSession not implemented by host");
}

/// An idempotency key names one payment of one API: a retry on the same API is answered from the
/// record without reaching the host again, while the same key on the other payment API is a
/// payment of its own and gets its own, correctly typed answer.
#[tokio::test]
async fn a_payment_key_is_scoped_to_its_api() {
    let daemon = Daemon::start().await;
    let (seen, mut saw) = mpsc::unbounded_channel();
    let host = answering_host(daemon.host(), &seen).connect().await.expect("host connects");
    let app = launch(&host, APP_A, V1).await;
    let renderer = daemon.renderer(&app.launch_token).await;
    let with_key = |api: Api| {
        let mut request = sample_request(api);
        match request.api.as_mut() {
            Some(api_request::Api::RequestPayment(r)) => r.idempotency_key = "order-42".into(),
            Some(api_request::Api::RequestMidasPaymentGameItem(r)) => r.idempotency_key = "order-42".into(),
            _ => unreachable!("a payment"),
        }
        request
    };

    for api in [Api::RequestPayment, Api::RequestPayment, Api::RequestMidasPaymentGameItem] {
        let got = within(api.name(), renderer.call_request(with_key(api))).await.expect("paid");
        assert_eq!(got, stamped(api), "{api}: its own answer");
    }
    let first = saw.try_recv().expect("the host saw the first requestPayment");
    assert_eq!(first.1.api(), Some(Api::RequestPayment));
    let second = saw.try_recv().expect("the host saw the Midas payment");
    assert_eq!(second.1.api(), Some(Api::RequestMidasPaymentGameItem));
    assert!(saw.try_recv().is_err(), "the requestPayment retry never reached the host");
}

/// Closing an app instance ends its calls at once, even one that is still waiting out the grace
/// period for a host to connect: it is never handed to a host later, for an app that is gone.
#[tokio::test]
async fn closing_an_app_ends_a_call_waiting_for_a_host() {
    let daemon = Daemon::start_with(|c| c.host.grace_ms = 60_000).await;
    let (seen, mut saw) = mpsc::unbounded_channel();
    let host = answering_host(daemon.host(), &seen).connect().await.expect("host connects");
    let app = launch(&host, APP_A, V1).await;
    host.disconnect();
    let broker = daemon.server.broker().clone();
    until("the host is gone", || broker.host.current().is_none()).await;

    let renderer = daemon.renderer(&app.launch_token).await;
    let unary = user_info_task(&renderer, "unary", true);
    let streamed = user_info_task(&renderer, "streamed", false);
    until("both calls wait for a host", || broker.registry.list().iter().any(|i| i.calls_in_flight() == 2)).await;

    let mut raw = GrpcHostClient::new(connect::channel(&daemon.address()).await.expect("channel"));
    let mut close = Request::new(v1::CloseAppRequest { instance_id: app.instance_id.clone() });
    close.metadata_mut().insert(metadata::AUTHORIZATION, metadata::bearer(&daemon.token()).parse().unwrap());
    within("close", raw.close_app(close)).await.expect("closed");
    assert_ended_by_close(vec![("unary", unary), ("stream", streamed)]).await;

    // A host that connects now gets nothing for the closed app.
    let host = answering_host(daemon.host(), &seen).connect().await.expect("a new host connects");
    let other = launch(&host, APP_B, V1).await;
    let renderer_b = daemon.renderer(&other.launch_token).await;
    within("app B's call", renderer_b.call(tagged_user_info("b"))).await.expect("app B is served");
    let (app_info, _) = saw.try_recv().expect("the host saw app B's call");
    assert_eq!(app_info.app_id, APP_B);
    assert!(saw.try_recv().is_err(), "the closed app's calls never reached a host");
}

/// Closing an app instance ends its calls that the host holds, on every surface, and tells the
/// host to stop working on them. Unary and Invoke calls of an instance whose version is known go
/// to the host straight from the request's task (as stream calls do), so it is the call table's
/// sweep on close, not a wait on the instance, that must end them.
#[tokio::test]
async fn closing_an_app_ends_the_calls_its_host_holds_on_every_surface() {
    let mut s = Stuck::start(120_000).await;
    // A first call resolves the instance's version (login is not registered: it fails at once).
    within("first call", s.renderer.call_unary(v1::LoginRequest::default())).await.unwrap_err();

    let unary = user_info_task(&s.renderer, "unary", true);
    let invoked = tokio::spawn({
        let r = s.renderer.clone();
        async move { r.invoke_json("getUserInfo", &json!({ "lang": "invoke" })).await }
    });
    let streamed = user_info_task(&s.renderer, "streamed", false);
    assert_eq!(s.started(3).await, ["invoke", "streamed", "unary"]);

    s.host.close_app(&s.app.instance_id).await.expect("closed");
    assert_ended_by_close(vec![("unary", unary), ("stream", streamed)]).await;
    let failure = within("invoke", invoked).await.expect("task").unwrap_err();
    assert_eq!(failure["errMsg"], "getUserInfo:fail call cancelled: app instance closed");
    // The host was told to stop working on each of them.
    assert_eq!(s.dropped(3).await, ["invoke", "streamed", "unary"]);
}
