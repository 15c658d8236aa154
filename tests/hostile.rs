//! Hostile input, as one table: every row is an attack on a real daemon over its real socket by a
//! renderer, a host, an app backend or another local user, the exact refusal the daemon must give
//! (gRPC code and message, or the WeChat errMsg/errno, or the errcode, or the ProtocolNotice), and
//! then proof that NOTHING CHANGED: the Admin view (status, apps, sessions, grants), the payment
//! records and the number of calls the host's handlers saw are the same before and after.
//!
//! Covered: absent, empty, garbage, forged, closed and other apps' launch tokens on every renderer
//! surface; wrong, missing and reused host tokens; renderers calling Host and Admin RPCs; unknown
//! APIs, malformed, deeply nested and oversize JSON and messages; missing and invalid payment and
//! profile fields (refused before the host sees them); invalid app.json and app ids; a raw host
//! that answers unknown, answered, cancelled calls or with the wrong result type (the renderer still
//! gets exactly one answer); Exchange with wrong secrets and reused, foreign or mismatched codes;
//! the per-instance, per-app and renderer-stream limits (another app is unaffected); one app's share
//! of renderer streams and connections (per app, per instance); a connection that never presents a
//! token (closed after `limits.auth_timeout_ms`); and a peer of another uid (when the test runs as
//! root and can become `nobody`).

mod support;

use std::{
    any::Any,
    future::Future,
    io::{Read, Write},
    pin::Pin,
    sync::{
        Arc, Mutex as StdMutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use miniapp_broker_client::{
    HostBuilder, HostClient, RendererClient, connect,
    proto::{
        api::ApiCall,
        metadata,
        v1::{
            self, ApiFailure, ApiRequest, DaemonMessage, DelegateCall, ExchangeError, HostMessage, InvokeRequest,
            RendererCall, RendererReply, admin_client::AdminClient, daemon_message, delegate_call,
            delegate_result::Outcome, exchange_client::ExchangeClient, host_client::HostClient as GrpcHost,
            host_message, open_api_client::OpenApiClient, renderer_reply,
        },
    },
};
use miniapp_brokerd::limits::Counted;
use prost::Message as _;
use serde_json::{Value, json};
use support::{Daemon, launch, until, user, within};
use tokio::sync::{Mutex, Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Status, Streaming, metadata::MetadataValue, transport::Channel};

// ---------------------------------------------------------------------------------------------
// What a refusal looks like
// ---------------------------------------------------------------------------------------------

/// One observable refusal.
#[derive(Debug, Clone, PartialEq)]
enum Refusal {
    /// A gRPC status with its exact message.
    Status(Code, String),
    /// An open-API failure: a stream reply, a unary status's details, or Invoke's failure.
    Api { code: Code, err_msg: String, errno: i64 },
    /// An Exchange failure: the status code and the WeChat errcode/errmsg in its details.
    Exchange { code: Code, errcode: i32, errmsg: String },
    /// A ProtocolNotice the daemon sent the host.
    Notice(String),
    /// The daemon closed the connection without speaking HTTP/2.
    ConnectionClosed,
}

fn st(code: Code, message: &str) -> Refusal {
    Refusal::Status(code, message.to_owned())
}

fn api_fail(code: Code, err_msg: &str, errno: i64) -> Refusal {
    Refusal::Api { code, err_msg: err_msg.to_owned(), errno }
}

/// The daemon's refusal of bad parameters: INVALID_ARGUMENT, errno 1001.
fn invalid(api: &str, why: &str) -> Refusal {
    api_fail(Code::InvalidArgument, &format!("{api}:fail invalid parameter: {why}"), 1001)
}

fn exch(code: Code, errcode: i32, errmsg: &str) -> Refusal {
    Refusal::Exchange { code, errcode, errmsg: errmsg.to_owned() }
}

fn notice(message: &str) -> Refusal {
    Refusal::Notice(message.to_owned())
}

const INVALID_TOKEN: &str = "invalid launch token";
const MISSING_TOKEN: &str = "missing launch token (x-launch-token metadata)";
const INVALID_HOST_TOKEN: &str = "invalid host token";
const MISSING_HOST_TOKEN: &str = "missing host token (authorization: Bearer <token>)";
const BAD_APP_ID: &str = "app_id must be 1-64 characters of [A-Za-z0-9_.-]";
const UNKNOWN_CALL: &str = "unknown, cancelled or already answered call id; the answer was dropped";

fn of_status(s: &Status) -> Refusal {
    Refusal::Status(s.code(), s.message().to_owned())
}

fn of_failure(f: &ApiFailure) -> Refusal {
    Refusal::Api { code: f.code(), err_msg: f.err_msg.clone(), errno: f.errno }
}

/// A failed typed unary call: the status message is the errMsg, the details the failure.
fn of_unary(s: &Status) -> Refusal {
    let f = ApiFailure::from_status(s);
    assert_eq!(s.message(), f.err_msg, "the status message is the errMsg");
    of_failure(&f)
}

/// A failed Invoke: ok=false, and the result object agrees with the failure.
fn of_invoke(r: &v1::InvokeResponse) -> Refusal {
    assert!(!r.ok, "Invoke succeeded: {}", r.result_json);
    let f = r.failure.as_ref().expect("a failed Invoke carries its failure");
    let obj: Value = serde_json::from_str(&r.result_json).expect("result_json is JSON");
    assert_eq!(obj["errMsg"], json!(f.err_msg));
    assert_eq!(obj["errno"], json!(f.errno));
    of_failure(f)
}

fn of_exchange(s: &Status) -> Refusal {
    let e = ExchangeError::decode(s.details()).expect("exchange failures carry an ExchangeError");
    assert_eq!(s.message(), format!("errcode {}: {}", e.errcode, e.errmsg));
    Refusal::Exchange { code: s.code(), errcode: e.errcode, errmsg: e.errmsg }
}

// ---------------------------------------------------------------------------------------------
// Raw requests: what a hostile peer can send without the client library's help
// ---------------------------------------------------------------------------------------------

fn with_md<T>(message: T, key: &'static str, value: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(key, MetadataValue::try_from(value).expect("ASCII metadata"));
    request
}

/// As a renderer presenting `token`.
fn as_renderer<T>(message: T, token: &str) -> Request<T> {
    with_md(message, metadata::LAUNCH_TOKEN, token)
}

/// As a host presenting `token`.
fn as_host<T>(message: T, token: &str) -> Request<T> {
    with_md(message, metadata::AUTHORIZATION, &metadata::bearer(token))
}

fn request_of<T: ApiCall>(r: T) -> ApiRequest {
    r.into_request()
}

fn payment(time_stamp: &str, nonce: &str, package: &str, sign_type: &str, pay_sign: &str) -> v1::RequestPaymentRequest {
    v1::RequestPaymentRequest {
        time_stamp: time_stamp.into(),
        nonce_str: nonce.into(),
        package: package.into(),
        sign_type: sign_type.into(),
        pay_sign: pay_sign.into(),
        idempotency_key: String::new(),
    }
}

fn good_payment() -> v1::RequestPaymentRequest {
    payment("1700000000", "nonce-1", "prepay_id=wx1", "RSA", "sig-1")
}

fn midas(sign_data: &str, pay_sig: &str, signature: &str) -> v1::RequestMidasPaymentGameItemRequest {
    v1::RequestMidasPaymentGameItemRequest {
        sign_data: sign_data.into(),
        pay_sig: pay_sig.into(),
        signature: signature.into(),
        idempotency_key: String::new(),
    }
}

fn sign_data_without(key: &str) -> String {
    let mut v = json!({
        "mode": "short_series_goods", "offerId": "1450000000", "buyQuantity": 1, "env": 0,
        "currencyType": "CNY", "productId": "gem-pack-10", "goodsPrice": 600, "outTradeNo": "order-1",
    });
    v.as_object_mut().unwrap().remove(key);
    v.to_string()
}

fn too_large(found: usize) -> String {
    format!("Error, decoded message length too large: found {found} bytes, the limit is: 65536 bytes")
}

/// A raw renderer stream (`OpenApi.Session`), read reply by reply.
struct RawRenderer {
    tx: mpsc::Sender<RendererCall>,
    rx: Streaming<RendererReply>,
}

impl RawRenderer {
    async fn open(channel: &Channel, token: &str) -> Result<RawRenderer, Status> {
        let (tx, rx) = mpsc::channel(16);
        let rx = OpenApiClient::new(channel.clone())
            .session(as_renderer(ReceiverStream::new(rx), token))
            .await?
            .into_inner();
        Ok(RawRenderer { tx, rx })
    }

    async fn send(&self, id: u64, request: ApiRequest) {
        self.tx.send(RendererCall { id, request: Some(request) }).await.expect("stream open");
    }

    async fn reply(&mut self) -> Result<Option<RendererReply>, Status> {
        within("renderer reply", self.rx.message()).await
    }
}

/// A host speaking the wire protocol by hand, so it can send what no well-behaved host would.
struct RawHost {
    tx: mpsc::Sender<HostMessage>,
    rx: Mutex<Streaming<DaemonMessage>>,
}

fn every_method() -> Vec<i32> {
    (1..=12).collect()
}

impl RawHost {
    async fn connect(d: &Daemon) -> RawHost {
        let channel = connect::channel(&d.address()).await.expect("connect");
        let (tx, rx) = mpsc::channel(64);
        let hello = v1::Hello { methods: every_method(), host_name: "raw-host".into(), user: Some(user("raw-user")) };
        tx.send(HostMessage { msg: Some(host_message::Msg::Hello(hello)) }).await.unwrap();
        let mut inbound = GrpcHost::new(channel)
            .connect(as_host(ReceiverStream::new(rx), &d.token()))
            .await
            .expect("raw host accepted")
            .into_inner();
        match within("welcome", inbound.message()).await {
            Ok(Some(DaemonMessage { msg: Some(daemon_message::Msg::Welcome(_)) })) => {}
            other => panic!("expected Welcome, got {other:?}"),
        }
        RawHost { tx, rx: Mutex::new(inbound) }
    }

    async fn next(&self) -> daemon_message::Msg {
        let mut rx = self.rx.lock().await;
        within("daemon message to the raw host", rx.message())
            .await
            .expect("host stream healthy")
            .expect("host stream open")
            .msg
            .expect("message set")
    }

    async fn next_call(&self) -> DelegateCall {
        match self.next().await {
            daemon_message::Msg::Call(call) => call,
            other => panic!("expected a DelegateCall, got {other:?}"),
        }
    }

    async fn next_notice(&self) -> v1::ProtocolNotice {
        match self.next().await {
            daemon_message::Msg::Notice(n) => n,
            other => panic!("expected a ProtocolNotice, got {other:?}"),
        }
    }

    async fn send(&self, msg: host_message::Msg) {
        self.tx.send(HostMessage { msg: Some(msg) }).await.expect("host stream open");
    }

    async fn answer(&self, call_id: u64, outcome: Option<Outcome>) {
        self.send(host_message::Msg::Result(v1::DelegateResult { call_id, outcome })).await;
    }
}

fn user_info_answer(nick: &str) -> Option<Outcome> {
    let info = v1::UserInfo { nick_name: nick.into(), ..Default::default() };
    Some(Outcome::Api(v1::GetUserInfoRequest::wrap_response(v1::GetUserInfoResponse {
        user_info: Some(info),
        ..Default::default()
    })))
}

fn api_of(call: &DelegateCall) -> Option<miniapp_broker_client::proto::Api> {
    match &call.request {
        Some(delegate_call::Request::Api(r)) => r.api(),
        _ => None,
    }
}

fn nick_of(reply: &RendererReply) -> String {
    match &reply.outcome {
        Some(renderer_reply::Outcome::Ok(v1::ApiResponse { api: Some(v1::api_response::Api::GetUserInfo(r)) })) => {
            assert_eq!(r.err_msg, "getUserInfo:ok");
            r.user_info.as_ref().map(|u| u.nick_name.clone()).unwrap_or_default()
        }
        other => panic!("expected a getUserInfo answer, got {other:?}"),
    }
}

/// Proves nothing more is queued on `renderer` for an earlier call: a fresh call's reply is the
/// next thing it reads (the raw host answers it).
async fn next_reply_is_a_fresh_call(host: &RawHost, renderer: &mut RawRenderer) {
    renderer.send(99, request_of(v1::GetUserInfoRequest::default())).await;
    let call = host.next_call().await;
    host.answer(call.call_id, user_info_answer("fresh")).await;
    let reply = renderer.reply().await.expect("stream healthy").expect("a reply");
    assert_eq!(reply.id, 99, "no second answer to an earlier call reached the renderer");
    assert_eq!(nick_of(&reply), "fresh");
}

// ---------------------------------------------------------------------------------------------
// The daemons under attack
// ---------------------------------------------------------------------------------------------

/// One daemon, an open channel to it, and how many calls its host's handlers saw.
struct Target {
    d: Daemon,
    channel: Channel,
    host_calls: Arc<AtomicU64>,
}

impl Target {
    async fn new(d: Daemon) -> Target {
        let channel = connect::channel(&d.address()).await.expect("connect");
        Target { d, channel, host_calls: Arc::new(AtomicU64::new(0)) }
    }

    fn streams(&self) -> u32 {
        self.d.server.broker().occupancy.streams.taken()
    }

    fn calls(&self) -> u64 {
        self.host_calls.load(Ordering::SeqCst)
    }

    fn open_api(&self) -> OpenApiClient<Channel> {
        OpenApiClient::new(self.channel.clone())
    }

    fn exchange(&self) -> ExchangeClient<Channel> {
        ExchangeClient::new(self.channel.clone())
    }

    async fn invoke(&self, token: &str, api: &str, params: &str) -> Result<v1::InvokeResponse, Status> {
        let request = InvokeRequest { api: api.into(), params_json: params.into() };
        self.open_api().invoke(as_renderer(request, token)).await.map(|r| r.into_inner())
    }

    async fn code2session(&self, app_id: &str, secret: &str, code: &str) -> Result<v1::Code2SessionResponse, Status> {
        let request = v1::Code2SessionRequest { app_id: app_id.into(), secret: secret.into(), code: code.into() };
        self.exchange().code2_session(request).await.map(|r| r.into_inner())
    }
}

/// Everything the daemon lets anyone see or change, minus clocks and counters of attempts.
#[derive(Debug, PartialEq)]
struct Snapshot {
    status: v1::StatusResponse,
    apps: Vec<v1::AppInstanceInfo>,
    sessions: Vec<v1::SessionInfo>,
    grants: Vec<v1::Grant>,
    host_calls: u64,
    payments_recorded: u64,
    payments_in_flight: usize,
}

async fn snapshot(t: &Target) -> Snapshot {
    let mut admin = AdminClient::new(t.channel.clone());
    let token = t.d.token();
    let mut status = admin.status(as_host(v1::StatusRequest {}, &token)).await.expect("status").into_inner();
    status.uptime_ms = 0;
    status.calls_total = 0;
    let apps = admin.list_apps(as_host(v1::ListAppsRequest {}, &token)).await.expect("apps").into_inner().apps;
    let sessions = admin
        .list_sessions(as_host(v1::ListSessionsRequest::default(), &token))
        .await
        .expect("sessions")
        .into_inner()
        .sessions;
    let grants =
        admin.list_grants(as_host(v1::ListGrantsRequest::default(), &token)).await.expect("grants").into_inner().grants;
    let broker = t.d.server.broker();
    Snapshot {
        status,
        apps,
        sessions,
        grants,
        host_calls: t.calls(),
        payments_recorded: broker.store.payment_count().expect("payment count"),
        payments_in_flight: broker.payments.len(),
    }
}

/// A launched app instance.
#[derive(Clone, Debug)]
struct Inst {
    app_id: String,
    id: String,
    token: String,
}

impl Inst {
    fn secret(&self) -> &str {
        self.token.split_once('.').expect("id.secret").1
    }
}

async fn launch_inst(host: &HostClient, app_id: &str, app_json: &str) -> Inst {
    let r = launch(host, app_id, app_json).await;
    Inst { app_id: app_id.into(), id: r.instance_id, token: r.launch_token }
}

/// A host whose handlers count their calls and answer at once; getUserInfo for `slow_app` waits
/// for a permit of `gate`.
fn counting_host(t: &Target, slow: Option<(&'static str, Arc<Semaphore>)>) -> HostBuilder {
    let mut b = t.d.host().name("counting-host").user(user("u1"));
    macro_rules! counted {
        ($($req:ty => $resp:expr;)*) => {$(
            let calls = t.host_calls.clone();
            b = b.handle(move |_app, _req: $req| {
                calls.fetch_add(1, Ordering::SeqCst);
                async move { Ok($resp) }
            });
        )*};
    }
    counted! {
        v1::LoginRequest => v1::LoginResponse { code: "host-login-code".into(), ..Default::default() };
        v1::CheckSessionRequest => v1::CheckSessionResponse::default();
        v1::GetPhoneNumberRequest => v1::GetPhoneNumberResponse { code: "host-phone-code".into(), ..Default::default() };
        v1::GetEmailRequest => v1::GetEmailResponse { code: "host-email-code".into(), ..Default::default() };
        v1::ChooseAvatarRequest => v1::ChooseAvatarResponse::default();
        v1::GetNickNameRequest => v1::GetNickNameResponse::default();
        v1::GetUserProfileRequest => v1::GetUserProfileResponse::default();
        v1::RequestPaymentRequest => v1::RequestPaymentResponse::default();
        v1::RequestMidasPaymentGameItemRequest => v1::RequestMidasPaymentGameItemResponse::default();
    }
    let calls = t.host_calls.clone();
    b = b.handle(move |app, _req: v1::GetUserInfoRequest| {
        calls.fetch_add(1, Ordering::SeqCst);
        let slow = slow.clone();
        async move {
            if let Some((_, gate)) = slow.filter(|(slow_app, _)| app.app_id == *slow_app) {
                gate.acquire().await.expect("gate open").forget();
            }
            Ok(v1::GetUserInfoResponse {
                user_info: Some(v1::UserInfo { nick_name: "host-nick".into(), ..Default::default() }),
                ..Default::default()
            })
        }
    });
    let calls = t.host_calls.clone();
    b.get_auth_code(move |_app, req: v1::GetAuthCodeRequest| {
        calls.fetch_add(1, Ordering::SeqCst);
        async move {
            Ok(v1::GetAuthCodeResponse {
                auth_code: "host-auth-code".into(),
                auth_success_scopes: req.scopes,
                ..Default::default()
            })
        }
    })
}

const SLOW_APP: &str = "wxlimitslow0001";

/// The daemons of the table, each set up once; cases run one after another.
struct Ctx {
    /// Defaults (v2), a counting host, apps A and B (v2) and V3, a session and a grant.
    main: Target,
    main_host: HostClient,
    a: Inst,
    b: Inst,
    /// A's renderer, its stream kept open for the whole run.
    ra: RendererClient,
    secret_a: String,
    secret_b: String,
    /// A raw host and a v1 app whose every call goes to it.
    raw: Target,
    raw_host: RawHost,
    raw_app: Inst,
    /// No host connected.
    bare: Target,
    /// 2 calls in flight per instance, 2 renderer streams.
    limits: Target,
    slow: Inst,
    fast: Inst,
    gate: Arc<Semaphore>,
    /// 1 call per second per app, burst 5; app R1 (two instances) and R2.
    rate: Target,
    r1a: Inst,
    r1b: Inst,
    r2: Inst,
    /// Per app: 2 renderer streams, 1 connection; per instance: 1 stream; 1 s to present a token.
    /// App F (three instances) and G.
    fair: Target,
    f1: Inst,
    f2: Inst,
    f3: Inst,
    g: Inst,
    _keep: Vec<Box<dyn Any + Send + Sync>>,
}

#[derive(Clone, Copy, Debug)]
enum On {
    Main,
    Raw,
    Bare,
    Limits,
    Rate,
    Fair,
}

impl Ctx {
    fn on(&self, on: On) -> &Target {
        match on {
            On::Main => &self.main,
            On::Raw => &self.raw,
            On::Bare => &self.bare,
            On::Limits => &self.limits,
            On::Rate => &self.rate,
            On::Fair => &self.fair,
        }
    }

    async fn build() -> Ctx {
        // main
        let main = Target::new(Daemon::start().await).await;
        let main_host = counting_host(&main, None).connect().await.expect("host connects");
        let a = launch_inst(&main_host, "wxhostile0000001", r#"{"apiVersion":"v2"}"#).await;
        let b = launch_inst(&main_host, "wxhostile0000002", r#"{"apiVersion":"v2"}"#).await;
        let v3 = launch_inst(&main_host, "wxhostile0000003", r#"{"apiVersion":"v3"}"#).await;
        let ra = main.d.renderer(&a.token).await;
        ra.call(v1::LoginRequest::default()).await.expect("A logs in");
        let rv3 = main.d.renderer(&v3.token).await;
        rv3.call(v1::GetPhoneNumberRequest::default()).await.expect("v3 phone number granted");
        assert!(!main_host.list_grants("", "").await.unwrap().is_empty(), "a grant to protect");
        let secret_a = main_host.register_app(&a.app_id, false).await.unwrap().secret;
        let secret_b = main_host.register_app(&b.app_id, false).await.unwrap().secret;

        // raw
        let raw = Target::new(Daemon::start().await).await;
        let raw_host = RawHost::connect(&raw.d).await;
        let launched = GrpcHost::new(raw.channel.clone())
            .launch_app(as_host(
                v1::LaunchAppRequest { app_id: "wxrawhost000001".into(), app_json: r#"{"apiVersion":"v1"}"#.into() },
                &raw.d.token(),
            ))
            .await
            .expect("launch")
            .into_inner();
        let raw_app = Inst { app_id: "wxrawhost000001".into(), id: launched.instance_id, token: launched.launch_token };

        // bare
        let bare = Target::new(Daemon::start().await).await;

        // limits
        let limits = Target::new(
            Daemon::start_with(|c| {
                c.limits.max_calls_in_flight_per_instance = 2;
                c.limits.max_renderer_streams = 2;
            })
            .await,
        )
        .await;
        let gate = Arc::new(Semaphore::new(0));
        let limits_host = counting_host(&limits, Some((SLOW_APP, gate.clone()))).connect().await.expect("host");
        let slow = launch_inst(&limits_host, SLOW_APP, r#"{"apiVersion":"v2"}"#).await;
        let fast = launch_inst(&limits_host, "wxlimitfast0001", r#"{"apiVersion":"v2"}"#).await;

        // rate
        let rate = Target::new(
            Daemon::start_with(|c| {
                c.limits.calls_per_second_per_app = 1;
                c.limits.burst_per_app = 5;
            })
            .await,
        )
        .await;
        let rate_host = counting_host(&rate, None).connect().await.expect("host");
        let r1a = launch_inst(&rate_host, "wxratelimited01", r#"{"apiVersion":"v2"}"#).await;
        let r1b = launch_inst(&rate_host, "wxratelimited01", r#"{"apiVersion":"v2"}"#).await;
        let r2 = launch_inst(&rate_host, "wxratelimited02", r#"{"apiVersion":"v2"}"#).await;

        // fair
        let fair = Target::new(
            Daemon::start_with(|c| {
                c.limits.max_renderer_streams_per_app = 2;
                c.limits.max_renderer_streams_per_instance = 1;
                c.limits.max_connections_per_app = 1;
                c.limits.auth_timeout_ms = 1000;
            })
            .await,
        )
        .await;
        let fair_host = counting_host(&fair, None).connect().await.expect("host");
        let f1 = launch_inst(&fair_host, "wxfairshare0001", r#"{"apiVersion":"v2"}"#).await;
        let f2 = launch_inst(&fair_host, "wxfairshare0001", r#"{"apiVersion":"v2"}"#).await;
        let f3 = launch_inst(&fair_host, "wxfairshare0001", r#"{"apiVersion":"v2"}"#).await;
        let g = launch_inst(&fair_host, "wxfairshare0002", r#"{"apiVersion":"v2"}"#).await;
        // The table's own channel presents the host token now, before the token deadline.
        snapshot(&fair).await;

        Ctx {
            main,
            main_host,
            a,
            b,
            ra,
            secret_a,
            secret_b,
            raw,
            raw_host,
            raw_app,
            bare,
            limits,
            slow,
            fast,
            gate,
            rate,
            r1a,
            r1b,
            r2,
            fair,
            f1,
            f2,
            f3,
            g,
            _keep: vec![Box::new(rv3), Box::new(limits_host), Box::new(rate_host), Box::new(fair_host)],
        }
    }

    /// A fresh login code of app A (a session already exists; the login refreshes it).
    async fn login_code_a(&self) -> String {
        self.ra.call(v1::LoginRequest::default()).await.expect("login").code
    }

    async fn phone_code_a(&self) -> String {
        self.ra.call(v1::GetPhoneNumberRequest::default()).await.expect("phone").code
    }
}

// ---------------------------------------------------------------------------------------------
// The table
// ---------------------------------------------------------------------------------------------

type Fut<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// What a case's setup leaves for its attack and its follow-up.
#[derive(Default)]
struct Prep {
    token: String,
    code: String,
    /// Things kept alive until the case ends (clients, open streams).
    keep: StdMutex<Vec<Box<dyn Any + Send>>>,
    tasks: StdMutex<Vec<tokio::task::JoinHandle<Result<v1::GetUserInfoResponse, ApiFailure>>>>,
}

type Setup = fn(Arc<Ctx>) -> Fut<Prep>;
type Attack = fn(Arc<Ctx>, Arc<Prep>) -> Fut<Vec<Refusal>>;
type Follow = fn(Arc<Ctx>, Arc<Prep>) -> Fut<()>;

/// One row: arrange (may change state), attack (must be refused exactly as `expect` says and
/// change nothing), follow up (the daemon still serves the legitimate caller).
struct Case {
    name: &'static str,
    on: On,
    setup: Setup,
    attack: Attack,
    expect: Vec<Refusal>,
    follow: Follow,
}

fn no_setup(_: Arc<Ctx>) -> Fut<Prep> {
    Box::pin(async { Prep::default() })
}

fn no_follow(_: Arc<Ctx>, _: Arc<Prep>) -> Fut<()> {
    Box::pin(async {})
}

fn row(name: &'static str, on: On, expect: Vec<Refusal>, attack: Attack) -> Case {
    Case { name, on, setup: no_setup, attack, expect, follow: no_follow }
}

impl Case {
    fn setup(mut self, setup: Setup) -> Self {
        self.setup = setup;
        self
    }

    fn follow(mut self, follow: Follow) -> Self {
        self.follow = follow;
        self
    }
}

/// Launches app D and closes it at once: its token is revoked.
fn closed_app(c: Arc<Ctx>) -> Fut<Prep> {
    Box::pin(async move {
        let d = launch_inst(&c.main_host, "wxhostileclosed1", r#"{"apiVersion":"v2"}"#).await;
        c.main_host.close_app(&d.id).await.expect("closed");
        Prep { token: d.token, ..Default::default() }
    })
}

fn login_code(c: Arc<Ctx>) -> Fut<Prep> {
    Box::pin(async move { Prep { code: c.login_code_a().await, ..Default::default() } })
}

/// The code is still good for its own app with the right secret: the refusal spent nothing.
fn code_still_redeems(c: Arc<Ctx>, p: Arc<Prep>) -> Fut<()> {
    Box::pin(async move {
        let session = c.main.code2session(&c.a.app_id, &c.secret_a, &p.code).await.expect("the code survived");
        assert!(session.openid.starts_with('o'));
    })
}

fn cases() -> Vec<Case> {
    let mut cases = vec![
        // --- launch tokens ------------------------------------------------------------------
        row("no launch token (unary)", On::Main, vec![st(Code::Unauthenticated, MISSING_TOKEN)], |c, _| {
            Box::pin(async move {
                let e = c.main.open_api().login(Request::new(v1::LoginRequest::default())).await.unwrap_err();
                vec![of_status(&e)]
            })
        }),
        row("empty launch token (Invoke)", On::Main, vec![st(Code::Unauthenticated, MISSING_TOKEN)], |c, _| {
            Box::pin(async move { vec![of_status(&c.main.invoke("", "login", "{}").await.unwrap_err())] })
        }),
        row(
            "garbage launch token without a dot (Invoke)",
            On::Main,
            vec![st(Code::Unauthenticated, INVALID_TOKEN)],
            |c, _| {
                Box::pin(async move { vec![of_status(&c.main.invoke("garbage", "login", "{}").await.unwrap_err())] })
            },
        ),
        row(
            "garbage launch token with a dot (Session stream)",
            On::Main,
            vec![st(Code::Unauthenticated, INVALID_TOKEN)],
            |c, _| {
                Box::pin(async move {
                    vec![of_status(&RawRenderer::open(&c.main.channel, "not.atoken").await.err().unwrap())]
                })
            },
        ),
        row(
            "valid instance id, wrong secret (unary)",
            On::Main,
            vec![st(Code::Unauthenticated, INVALID_TOKEN)],
            |c, _| {
                Box::pin(async move {
                    let forged = format!("{}.{}", c.a.id, "A".repeat(c.a.secret().len()));
                    let e = c
                        .main
                        .open_api()
                        .check_session(as_renderer(v1::CheckSessionRequest {}, &forged))
                        .await
                        .unwrap_err();
                    vec![of_status(&e)]
                })
            },
        ),
        row(
            "other app's instance id with this app's secret (unary)",
            On::Main,
            vec![st(Code::Unauthenticated, INVALID_TOKEN)],
            |c, _| {
                Box::pin(async move {
                    let forged = format!("{}.{}", c.b.id, c.a.secret());
                    let e = c
                        .main
                        .open_api()
                        .check_session(as_renderer(v1::CheckSessionRequest {}, &forged))
                        .await
                        .unwrap_err();
                    vec![of_status(&e)]
                })
            },
        ),
        row(
            "other app's launch token acts only for that app (A's session is out of reach)",
            On::Main,
            vec![api_fail(Code::FailedPrecondition, "checkSession:fail session expired, need relogin", 1011)],
            |c, _| {
                Box::pin(async move {
                    // A is logged in (the context did it); B's token is B's, whoever holds it.
                    let e = c
                        .main
                        .open_api()
                        .check_session(as_renderer(v1::CheckSessionRequest {}, &c.b.token))
                        .await
                        .unwrap_err();
                    vec![of_unary(&e)]
                })
            },
        ),
        row("closed app's launch token (unary)", On::Main, vec![st(Code::Unauthenticated, INVALID_TOKEN)], |c, p| {
            Box::pin(async move {
                vec![of_status(
                    &c.main.open_api().login(as_renderer(v1::LoginRequest::default(), &p.token)).await.unwrap_err(),
                )]
            })
        })
        .setup(closed_app),
        row("closed app's launch token (Invoke)", On::Main, vec![st(Code::Unauthenticated, INVALID_TOKEN)], |c, p| {
            Box::pin(async move { vec![of_status(&c.main.invoke(&p.token, "login", "{}").await.unwrap_err())] })
        })
        .setup(closed_app),
        row(
            "closed app's launch token (Session stream)",
            On::Main,
            vec![st(Code::Unauthenticated, INVALID_TOKEN)],
            |c, p| {
                Box::pin(
                    async move { vec![of_status(&RawRenderer::open(&c.main.channel, &p.token).await.err().unwrap())] },
                )
            },
        )
        .setup(closed_app),
        // --- host token -----------------------------------------------------------------------
        row(
            "Host.Connect with a wrong host token",
            On::Main,
            vec![st(Code::Unauthenticated, INVALID_HOST_TOKEN)],
            |c, _| {
                Box::pin(async move {
                    let (_tx, rx) = mpsc::channel::<HostMessage>(1);
                    let e = GrpcHost::new(c.main.channel.clone())
                        .connect(as_host(ReceiverStream::new(rx), "wrong-token"))
                        .await
                        .unwrap_err();
                    vec![of_status(&e)]
                })
            },
        ),
        row(
            "Host.Connect without a host token",
            On::Main,
            vec![st(Code::Unauthenticated, MISSING_HOST_TOKEN)],
            |c, _| {
                Box::pin(async move {
                    let (_tx, rx) = mpsc::channel::<HostMessage>(1);
                    let e = GrpcHost::new(c.main.channel.clone())
                        .connect(Request::new(ReceiverStream::new(rx)))
                        .await
                        .unwrap_err();
                    vec![of_status(&e)]
                })
            },
        ),
        row(
            "a second host reusing the token while one is connected",
            On::Main,
            vec![st(Code::AlreadyExists, "another host is connected; one host at a time")],
            |c, _| {
                Box::pin(async move {
                    let (tx, rx) = mpsc::channel::<HostMessage>(1);
                    let hello =
                        v1::Hello { methods: every_method(), host_name: "usurper".into(), user: Some(user("evil")) };
                    tx.send(HostMessage { msg: Some(host_message::Msg::Hello(hello)) }).await.unwrap();
                    let e = GrpcHost::new(c.main.channel.clone())
                        .connect(as_host(ReceiverStream::new(rx), &c.main.d.token()))
                        .await
                        .unwrap_err();
                    vec![of_status(&e)]
                })
            },
        )
        .follow(|c, _| {
            Box::pin(async move {
                // The first host still gets the calls.
                let before = c.main.calls();
                c.ra.call(v1::GetUserInfoRequest::default()).await.expect("delegated to the first host");
                assert_eq!(c.main.calls(), before + 1);
            })
        }),
        row(
            "a host whose first message is not Hello",
            On::Bare,
            vec![st(Code::FailedPrecondition, "the host's first message must be Hello")],
            |c, _| {
                Box::pin(async move {
                    let (tx, rx) = mpsc::channel::<HostMessage>(1);
                    tx.send(HostMessage { msg: Some(host_message::Msg::User(user("evil"))) }).await.unwrap();
                    let mut inbound = GrpcHost::new(c.bare.channel.clone())
                        .connect(as_host(ReceiverStream::new(rx), &c.bare.d.token()))
                        .await
                        .expect("the stream opens")
                        .into_inner();
                    let e = within("refusal", inbound.message()).await.unwrap_err();
                    vec![of_status(&e)]
                })
            },
        )
        .follow(|c, _| {
            Box::pin(async move {
                // The slot was released: a proper host connects, then leaves.
                let host = c.bare.d.host().connect().await.expect("a proper host connects");
                host.disconnect();
                let broker = c.bare.d.server.broker().clone();
                until("host gone", || broker.host.current().is_none()).await;
            })
        }),
        row(
            "Admin.Status with a wrong host token",
            On::Main,
            vec![st(Code::Unauthenticated, INVALID_HOST_TOKEN)],
            |c, _| {
                Box::pin(async move {
                    let e = AdminClient::new(c.main.channel.clone())
                        .status(as_host(v1::StatusRequest {}, "nope"))
                        .await
                        .unwrap_err();
                    vec![of_status(&e)]
                })
            },
        ),
        row(
            "Admin.ListGrants with a launch token as the bearer",
            On::Main,
            vec![st(Code::Unauthenticated, INVALID_HOST_TOKEN)],
            |c, _| {
                Box::pin(async move {
                    let e = AdminClient::new(c.main.channel.clone())
                        .list_grants(as_host(v1::ListGrantsRequest::default(), &c.a.token))
                        .await
                        .unwrap_err();
                    vec![of_status(&e)]
                })
            },
        ),
        row(
            "Admin.RevokeGrants by a renderer (launch token only)",
            On::Main,
            vec![st(Code::Unauthenticated, MISSING_HOST_TOKEN)],
            |c, _| {
                Box::pin(async move {
                    let req = v1::RevokeGrantsRequest {
                        app_id: "wxhostile0000003".into(),
                        uid: String::new(),
                        scope: String::new(),
                    };
                    let e = AdminClient::new(c.main.channel.clone())
                        .revoke_grants(as_renderer(req, &c.a.token))
                        .await
                        .unwrap_err();
                    vec![of_status(&e)]
                })
            },
        ),
        row(
            "Admin.RegisterApp (rotate) with a launch token as the bearer",
            On::Main,
            vec![st(Code::Unauthenticated, INVALID_HOST_TOKEN)],
            |c, _| {
                Box::pin(async move {
                    let req = v1::RegisterAppRequest { app_id: c.a.app_id.clone(), rotate: true };
                    let e = AdminClient::new(c.main.channel.clone())
                        .register_app(as_host(req, &c.a.token))
                        .await
                        .unwrap_err();
                    vec![of_status(&e)]
                })
            },
        )
        .setup(login_code)
        .follow(code_still_redeems),
        row("Host.LaunchApp by a renderer", On::Main, vec![st(Code::Unauthenticated, MISSING_HOST_TOKEN)], |c, _| {
            Box::pin(async move {
                let req = v1::LaunchAppRequest { app_id: "wxrendererlaunch".into(), app_json: String::new() };
                let e =
                    GrpcHost::new(c.main.channel.clone()).launch_app(as_renderer(req, &c.a.token)).await.unwrap_err();
                vec![of_status(&e)]
            })
        }),
        row(
            "Host.CloseApp of its own instance with its launch token as the bearer",
            On::Main,
            vec![st(Code::Unauthenticated, INVALID_HOST_TOKEN)],
            |c, _| {
                Box::pin(async move {
                    let req = v1::CloseAppRequest { instance_id: c.b.id.clone() };
                    let e =
                        GrpcHost::new(c.main.channel.clone()).close_app(as_host(req, &c.b.token)).await.unwrap_err();
                    vec![of_status(&e)]
                })
            },
        ),
        // --- the JSON bridge ----------------------------------------------------------------
        row(
            "Invoke of an unknown API",
            On::Main,
            vec![api_fail(Code::InvalidArgument, "getLocation:fail api not supported: getLocation", 1002)],
            |c, _| {
                Box::pin(async move { vec![of_invoke(&c.main.invoke(&c.a.token, "getLocation", "{}").await.unwrap())] })
            },
        ),
        row(
            "Invoke of an API named with markup (sanitized in errMsg)",
            On::Main,
            vec![api_fail(
                Code::InvalidArgument,
                "imgsrcxonerroralert1:fail api not supported: imgsrcxonerroralert1",
                1002,
            )],
            |c, _| {
                Box::pin(async move {
                    vec![of_invoke(&c.main.invoke(&c.a.token, "<img src=x onerror=alert(1)>", "{}").await.unwrap())]
                })
            },
        ),
        row(
            "Invoke with an empty API name",
            On::Main,
            vec![api_fail(Code::InvalidArgument, "unknown:fail api not supported: unknown", 1002)],
            |c, _| Box::pin(async move { vec![of_invoke(&c.main.invoke(&c.a.token, "", "{}").await.unwrap())] }),
        ),
        row(
            "Invoke with malformed JSON params",
            On::Main,
            vec![invalid("login", "EOF while parsing an object at line 1 column 1")],
            |c, _| Box::pin(async move { vec![of_invoke(&c.main.invoke(&c.a.token, "login", "{").await.unwrap())] }),
        ),
        row(
            "Invoke with params that are an array",
            On::Main,
            vec![invalid("login", "params must be a JSON object")],
            |c, _| Box::pin(async move { vec![of_invoke(&c.main.invoke(&c.a.token, "login", "[1]").await.unwrap())] }),
        ),
        row(
            "Invoke with params that are a string",
            On::Main,
            vec![invalid("getUserInfo", "params must be a JSON object")],
            |c, _| {
                Box::pin(
                    async move { vec![of_invoke(&c.main.invoke(&c.a.token, "getUserInfo", "\"{}\"").await.unwrap())] },
                )
            },
        ),
        row(
            "Invoke with a field of the wrong type",
            On::Main,
            vec![invalid("requestPayment", "invalid type: integer `12`, expected a string at line 1 column 15")],
            |c, _| {
                Box::pin(async move {
                    vec![of_invoke(&c.main.invoke(&c.a.token, "requestPayment", r#"{"timeStamp":12}"#).await.unwrap())]
                })
            },
        ),
        row(
            "Invoke with params nested 33 deep",
            On::Main,
            vec![invalid("getUserInfo", "params nested deeper than 32 levels")],
            |c, _| {
                Box::pin(async move {
                    let params = format!("{{\"x\":{}{}}}", "[".repeat(32), "]".repeat(32));
                    vec![of_invoke(&c.main.invoke(&c.a.token, "getUserInfo", &params).await.unwrap())]
                })
            },
        )
        .follow(|c, _| {
            Box::pin(async move {
                // 32 deep is still fine (and delegated).
                let params = format!("{{\"x\":{}{}}}", "[".repeat(31), "]".repeat(31));
                assert!(c.main.invoke(&c.a.token, "getUserInfo", &params).await.unwrap().ok);
            })
        }),
        row(
            "Invoke with params nested 30,000 deep (no stack overflow)",
            On::Main,
            vec![invalid("login", "params nested deeper than 32 levels")],
            |c, _| {
                Box::pin(async move {
                    let params = format!("{{\"x\":{}{}}}", "[".repeat(30_000), "]".repeat(30_000));
                    vec![of_invoke(&c.main.invoke(&c.a.token, "login", &params).await.unwrap())]
                })
            },
        ),
        // --- oversize messages --------------------------------------------------------------
        row(
            "Invoke params over limits.max_message_bytes",
            On::Main,
            vec![st(Code::OutOfRange, &too_large(70_031))],
            |c, _| {
                Box::pin(async move {
                    let params = json!({ "desc": "x".repeat(70_000) }).to_string();
                    let req = InvokeRequest { api: "getUserProfile".into(), params_json: params };
                    assert_eq!(req.encoded_len(), 70_031);
                    let e = c.main.open_api().invoke(as_renderer(req, &c.a.token)).await.unwrap_err();
                    vec![of_status(&e)]
                })
            },
        )
        .follow(|c, _| {
            Box::pin(async move {
                // The same connection still works.
                assert!(c.main.invoke(&c.a.token, "getNickName", "{}").await.unwrap().ok);
            })
        }),
        row("a unary payment over the size limit", On::Main, vec![st(Code::OutOfRange, &too_large(70_045))], |c, _| {
            Box::pin(async move {
                let mut req = good_payment();
                req.pay_sign = "s".repeat(70_000);
                assert_eq!(req.encoded_len(), 70_045);
                let e = c.main.open_api().request_payment(as_renderer(req, &c.a.token)).await.unwrap_err();
                vec![of_status(&e)]
            })
        }),
        row(
            "a Session stream message over the size limit ends that stream with the reason",
            On::Main,
            vec![st(Code::OutOfRange, &too_large(70_014))],
            |c, _| {
                Box::pin(async move {
                    let mut s = RawRenderer::open(&c.main.channel, &c.a.token).await.expect("stream");
                    let call = RendererCall {
                        id: 1,
                        request: Some(request_of(v1::GetUserProfileRequest {
                            desc: "x".repeat(70_000),
                            lang: String::new(),
                        })),
                    };
                    assert_eq!(call.encoded_len(), 70_014);
                    s.tx.send(call).await.unwrap();
                    vec![of_status(&s.reply().await.unwrap_err())]
                })
            },
        ),
        row(
            "RendererClient sending an oversize call fails fast, and its next call works",
            On::Main,
            vec![api_fail(Code::OutOfRange, &format!("unknown:fail {}", too_large(70_018)), 1005)],
            |c, p| {
                Box::pin(async move {
                    let r = c.main.d.renderer(&c.a.token).await;
                    let started = Instant::now();
                    let f = r
                        .call(v1::GetUserProfileRequest { desc: "x".repeat(70_000), lang: "en".into() })
                        .await
                        .unwrap_err();
                    assert!(started.elapsed() < Duration::from_secs(5), "no retry loop: {:?}", started.elapsed());
                    p.keep.lock().unwrap().push(Box::new(r));
                    vec![of_failure(&f)]
                })
            },
        )
        .follow(|c, p| {
            Box::pin(async move {
                let r = p.keep.lock().unwrap().pop().unwrap().downcast::<RendererClient>().unwrap();
                let nick = r.call(v1::GetNickNameRequest {}).await.expect("a new stream serves the next call");
                assert_eq!(nick.nick_name, "nick-u1");
                let _ = c;
            })
        }),
        // --- payments: refused before the host sees them ------------------------------------
        row(
            "requestPayment without paySign (stream)",
            On::Main,
            vec![invalid("requestPayment", "paySign is required")],
            |c, _| {
                Box::pin(async move {
                    let f = c.ra.call(payment("1700000000", "n", "prepay_id=1", "RSA", "")).await.unwrap_err();
                    vec![of_failure(&f)]
                })
            },
        ),
        row(
            "requestPayment with no fields at all (Invoke)",
            On::Main,
            vec![invalid("requestPayment", "timeStamp is required")],
            |c, _| {
                Box::pin(
                    async move { vec![of_invoke(&c.main.invoke(&c.a.token, "requestPayment", "{}").await.unwrap())] },
                )
            },
        ),
        row(
            "requestPayment with an unknown signType (unary)",
            On::Main,
            vec![invalid("requestPayment", "signType must be MD5, HMAC-SHA256 or RSA")],
            |c, _| {
                Box::pin(async move {
                    let req = payment("1700000000", "n", "prepay_id=1", "SHA1", "s");
                    vec![of_unary(&c.main.open_api().request_payment(as_renderer(req, &c.a.token)).await.unwrap_err())]
                })
            },
        ),
        row(
            "requestPayment with a non-numeric timeStamp (stream)",
            On::Main,
            vec![invalid("requestPayment", "timeStamp must be a decimal number of seconds")],
            |c, _| {
                Box::pin(async move {
                    vec![of_failure(&c.ra.call(payment("17e8", "n", "prepay_id=1", "RSA", "s")).await.unwrap_err())]
                })
            },
        ),
        row(
            "requestPayment with a blank nonceStr (Invoke)",
            On::Main,
            vec![invalid("requestPayment", "nonceStr is required")],
            |c, _| {
                Box::pin(async move {
                    let params = r#"{"timeStamp":"1","nonceStr":"   ","package":"p","signType":"RSA","paySign":"s"}"#;
                    vec![of_invoke(&c.main.invoke(&c.a.token, "requestPayment", params).await.unwrap())]
                })
            },
        ),
        row(
            "requestPayment with an idempotency key over 128 bytes",
            On::Main,
            vec![invalid("requestPayment", "idempotency key must be at most 128 bytes")],
            |c, _| {
                Box::pin(async move {
                    let mut req = good_payment();
                    req.idempotency_key = "k".repeat(129);
                    vec![of_failure(&c.ra.call(req).await.unwrap_err())]
                })
            },
        ),
        row(
            "midas payment whose signData is not JSON (stream)",
            On::Main,
            vec![invalid("requestMidasPaymentGameItem", "signData must be a JSON object")],
            |c, _| {
                Box::pin(
                    async move { vec![of_failure(&c.ra.call(midas("mode=short", "ps", "sig")).await.unwrap_err())] },
                )
            },
        ),
        row(
            "midas payment whose signData is a JSON array (unary)",
            On::Main,
            vec![invalid("requestMidasPaymentGameItem", "signData must be a JSON object")],
            |c, _| {
                Box::pin(async move {
                    let e = c
                        .main
                        .open_api()
                        .request_midas_payment_game_item(as_renderer(midas("[]", "ps", "sig"), &c.a.token))
                        .await;
                    vec![of_unary(&e.unwrap_err())]
                })
            },
        ),
        row(
            "midas payment without productId (Invoke)",
            On::Main,
            vec![invalid("requestMidasPaymentGameItem", "signData.productId is required (a string)")],
            |c, _| {
                Box::pin(async move {
                    let params =
                        json!({ "signData": sign_data_without("productId"), "paySig": "ps", "signature": "sig" });
                    vec![of_invoke(
                        &c.main.invoke(&c.a.token, "requestMidasPaymentGameItem", &params.to_string()).await.unwrap(),
                    )]
                })
            },
        ),
        row(
            "midas payment buying zero items (stream)",
            On::Main,
            vec![invalid("requestMidasPaymentGameItem", "signData.buyQuantity is required (a positive integer)")],
            |c, _| {
                Box::pin(async move {
                    let mut data: Value = serde_json::from_str(&sign_data_without("nothing")).unwrap();
                    data["buyQuantity"] = json!(0);
                    vec![of_failure(&c.ra.call(midas(&data.to_string(), "ps", "sig")).await.unwrap_err())]
                })
            },
        ),
        row(
            "midas payment with an empty paySig (stream)",
            On::Main,
            vec![invalid("requestMidasPaymentGameItem", "paySig is required")],
            |c, _| {
                Box::pin(async move {
                    vec![of_failure(&c.ra.call(midas(&sign_data_without("x"), "", "sig")).await.unwrap_err())]
                })
            },
        ),
        // --- getUserProfile's desc ----------------------------------------------------------
        row(
            "getUserProfile with an empty desc (stream)",
            On::Main,
            vec![invalid("getUserProfile", "desc is required")],
            |c, _| {
                Box::pin(async move {
                    vec![of_failure(
                        &c.ra
                            .call(v1::GetUserProfileRequest { desc: String::new(), lang: "en".into() })
                            .await
                            .unwrap_err(),
                    )]
                })
            },
        ),
        row(
            "getUserProfile with a 31-character desc (Invoke)",
            On::Main,
            vec![invalid("getUserProfile", "desc must be at most 30 characters")],
            |c, _| {
                Box::pin(async move {
                    let params = json!({ "desc": "用".repeat(31) }).to_string();
                    vec![of_invoke(&c.main.invoke(&c.a.token, "getUserProfile", &params).await.unwrap())]
                })
            },
        )
        .follow(|c, _| {
            Box::pin(async move {
                // 30 characters (90 bytes) pass and reach the host.
                let before = c.main.calls();
                let params = json!({ "desc": "用".repeat(30) }).to_string();
                assert!(c.main.invoke(&c.a.token, "getUserProfile", &params).await.unwrap().ok);
                assert_eq!(c.main.calls(), before + 1);
            })
        }),
        // --- app.json and app ids ------------------------------------------------------------
        row(
            "LaunchApp with apiVersion v4",
            On::Main,
            vec![st(Code::InvalidArgument, r#"app.json: invalid apiVersion "v4": expected "v1", "v2" or "v3""#)],
            |c, _| {
                Box::pin(async move {
                    vec![of_status(
                        &c.main_host.launch_app("wxbadversion001", r#"{"apiVersion":"v4"}"#).await.unwrap_err(),
                    )]
                })
            },
        ),
        row(
            "LaunchApp with a numeric apiVersion",
            On::Main,
            vec![st(Code::InvalidArgument, "app.json: apiVersion must be a string")],
            |c, _| {
                Box::pin(async move {
                    vec![of_status(
                        &c.main_host.launch_app("wxbadversion001", r#"{"apiVersion":3}"#).await.unwrap_err(),
                    )]
                })
            },
        ),
        row(
            "LaunchApp with an app.json that is not JSON",
            On::Main,
            vec![st(Code::InvalidArgument, "app.json: key must be a string at line 1 column 2")],
            |c, _| {
                Box::pin(async move {
                    vec![of_status(&c.main_host.launch_app("wxbadversion001", "{apiVersion: v2").await.unwrap_err())]
                })
            },
        ),
        row(
            "LaunchApp with an app.json that is an array",
            On::Main,
            vec![st(Code::InvalidArgument, "app.json is not a JSON object")],
            |c, _| {
                Box::pin(
                    async move { vec![of_status(&c.main_host.launch_app("wxbadversion001", "[]").await.unwrap_err())] },
                )
            },
        ),
        row("LaunchApp with an empty app id", On::Main, vec![st(Code::InvalidArgument, BAD_APP_ID)], |c, _| {
            Box::pin(async move { vec![of_status(&c.main_host.launch_app("", "{}").await.unwrap_err())] })
        }),
        row("LaunchApp with a path as the app id", On::Main, vec![st(Code::InvalidArgument, BAD_APP_ID)], |c, _| {
            Box::pin(
                async move { vec![of_status(&c.main_host.launch_app("../../etc/passwd", "{}").await.unwrap_err())] },
            )
        }),
        row("LaunchApp with a 65-character app id", On::Main, vec![st(Code::InvalidArgument, BAD_APP_ID)], |c, _| {
            Box::pin(async move { vec![of_status(&c.main_host.launch_app(&"w".repeat(65), "{}").await.unwrap_err())] })
        }),
        // --- a host that breaks the protocol -------------------------------------------------
        row("host answers an unknown call id", On::Raw, vec![notice(UNKNOWN_CALL)], |c, _| {
            Box::pin(async move {
                let mut r = RawRenderer::open(&c.raw.channel, &c.raw_app.token).await.unwrap();
                r.send(7, request_of(v1::GetUserInfoRequest::default())).await;
                let call = c.raw_host.next_call().await;
                assert_eq!(api_of(&call), Some(miniapp_broker_client::proto::Api::GetUserInfo));
                c.raw_host.answer(call.call_id + 1000, user_info_answer("bogus")).await;
                let n = c.raw_host.next_notice().await;
                assert_eq!(n.call_id, call.call_id + 1000);
                c.raw_host.answer(call.call_id, user_info_answer("right")).await;
                let reply = r.reply().await.unwrap().unwrap();
                assert_eq!((reply.id, nick_of(&reply)), (7, "right".to_owned()), "the renderer gets the real answer");
                next_reply_is_a_fresh_call(&c.raw_host, &mut r).await;
                vec![Refusal::Notice(n.message)]
            })
        }),
        row("host answers an already answered call id", On::Raw, vec![notice(UNKNOWN_CALL)], |c, _| {
            Box::pin(async move {
                let mut r = RawRenderer::open(&c.raw.channel, &c.raw_app.token).await.unwrap();
                r.send(7, request_of(v1::GetUserInfoRequest::default())).await;
                let call = c.raw_host.next_call().await;
                c.raw_host.answer(call.call_id, user_info_answer("right")).await;
                let reply = r.reply().await.unwrap().unwrap();
                assert_eq!((reply.id, nick_of(&reply)), (7, "right".to_owned()));
                c.raw_host.answer(call.call_id, user_info_answer("again")).await;
                let n = c.raw_host.next_notice().await;
                assert_eq!(n.call_id, call.call_id);
                next_reply_is_a_fresh_call(&c.raw_host, &mut r).await;
                vec![Refusal::Notice(n.message)]
            })
        }),
        row(
            "host answers with the wrong result type",
            On::Raw,
            vec![
                notice("host answered getUserInfo with a login result"),
                api_fail(
                    Code::Internal,
                    "getUserInfo:fail host protocol error: host answered getUserInfo with a login result",
                    1012,
                ),
                notice(UNKNOWN_CALL),
            ],
            |c, _| {
                Box::pin(async move {
                    let mut r = RawRenderer::open(&c.raw.channel, &c.raw_app.token).await.unwrap();
                    r.send(7, request_of(v1::GetUserInfoRequest::default())).await;
                    let call = c.raw_host.next_call().await;
                    let login =
                        v1::LoginRequest::wrap_response(v1::LoginResponse { code: "c".into(), ..Default::default() });
                    c.raw_host.answer(call.call_id, Some(Outcome::Api(login))).await;
                    let first = c.raw_host.next_notice().await;
                    let reply = r.reply().await.unwrap().unwrap();
                    assert_eq!(reply.id, 7);
                    let Some(renderer_reply::Outcome::Failure(f)) = reply.outcome else { panic!("expected a failure") };
                    // A late correct answer no longer counts.
                    c.raw_host.answer(call.call_id, user_info_answer("late")).await;
                    let second = c.raw_host.next_notice().await;
                    next_reply_is_a_fresh_call(&c.raw_host, &mut r).await;
                    vec![Refusal::Notice(first.message), of_failure(&f), Refusal::Notice(second.message)]
                })
            },
        ),
        row(
            "host answers with no outcome",
            On::Raw,
            vec![
                notice("host answered getUserInfo with no outcome"),
                api_fail(
                    Code::Internal,
                    "getUserInfo:fail host protocol error: host answered getUserInfo with no outcome",
                    1012,
                ),
            ],
            |c, _| {
                Box::pin(async move {
                    let mut r = RawRenderer::open(&c.raw.channel, &c.raw_app.token).await.unwrap();
                    r.send(7, request_of(v1::GetUserInfoRequest::default())).await;
                    let call = c.raw_host.next_call().await;
                    c.raw_host.answer(call.call_id, None).await;
                    let n = c.raw_host.next_notice().await;
                    let reply = r.reply().await.unwrap().unwrap();
                    let Some(renderer_reply::Outcome::Failure(f)) = reply.outcome else { panic!("expected a failure") };
                    next_reply_is_a_fresh_call(&c.raw_host, &mut r).await;
                    vec![Refusal::Notice(n.message), of_failure(&f)]
                })
            },
        ),
        row("host answers a call the renderer abandoned", On::Raw, vec![notice(UNKNOWN_CALL)], |c, _| {
            Box::pin(async move {
                let r = RawRenderer::open(&c.raw.channel, &c.raw_app.token).await.unwrap();
                r.send(7, request_of(v1::GetUserInfoRequest::default())).await;
                let call = c.raw_host.next_call().await;
                drop(r);
                match c.raw_host.next().await {
                    daemon_message::Msg::Cancel(cancel) => {
                        assert_eq!((cancel.call_id, cancel.reason.as_str()), (call.call_id, "renderer went away"))
                    }
                    other => panic!("expected CancelCall, got {other:?}"),
                }
                c.raw_host.answer(call.call_id, user_info_answer("too late")).await;
                vec![Refusal::Notice(c.raw_host.next_notice().await.message)]
            })
        }),
        row("host says Hello twice", On::Raw, vec![notice("Hello was already received; ignored")], |c, _| {
            Box::pin(async move {
                let hello =
                    v1::Hello { methods: vec![], host_name: "renamed".into(), user: Some(user("someone-else")) };
                c.raw_host.send(host_message::Msg::Hello(hello)).await;
                let n = c.raw_host.next_notice().await;
                assert_eq!(n.call_id, 0);
                vec![Refusal::Notice(n.message)]
            })
        }),
        row("host sends an empty message", On::Raw, vec![notice("empty HostMessage; ignored")], |c, _| {
            Box::pin(async move {
                c.raw_host.tx.send(HostMessage { msg: None }).await.unwrap();
                vec![Refusal::Notice(c.raw_host.next_notice().await.message)]
            })
        }),
        // --- Exchange ---------------------------------------------------------------------------
        row(
            "Code2Session with a wrong secret",
            On::Main,
            vec![exch(Code::Unauthenticated, 40125, "invalid appsecret")],
            |c, p| {
                Box::pin(async move {
                    vec![of_exchange(&c.main.code2session(&c.a.app_id, "wrong-secret", &p.code).await.unwrap_err())]
                })
            },
        )
        .setup(login_code)
        .follow(code_still_redeems),
        row(
            "Code2Session with a reused code",
            On::Main,
            vec![exch(Code::FailedPrecondition, 40163, "code been used")],
            |c, p| {
                Box::pin(async move {
                    vec![of_exchange(&c.main.code2session(&c.a.app_id, &c.secret_a, &p.code).await.unwrap_err())]
                })
            },
        )
        .setup(|c| {
            Box::pin(async move {
                let code = c.login_code_a().await;
                c.main.code2session(&c.a.app_id, &c.secret_a, &code).await.expect("first use");
                Prep { code, ..Default::default() }
            })
        }),
        row(
            "Code2Session of another app's code (with that app's own secret)",
            On::Main,
            vec![exch(Code::InvalidArgument, 40029, "invalid code")],
            |c, p| {
                Box::pin(async move {
                    vec![of_exchange(&c.main.code2session(&c.b.app_id, &c.secret_b, &p.code).await.unwrap_err())]
                })
            },
        )
        .setup(login_code)
        .follow(code_still_redeems),
        row(
            "Code2Session for an unknown app id",
            On::Main,
            vec![exch(Code::Unauthenticated, 40125, "invalid appsecret")],
            |c, p| {
                Box::pin(async move {
                    vec![of_exchange(&c.main.code2session("wxnosuchapp0001", &c.secret_a, &p.code).await.unwrap_err())]
                })
            },
        )
        .setup(login_code)
        .follow(code_still_redeems),
        row(
            "Code2Session with an empty secret",
            On::Main,
            vec![exch(Code::InvalidArgument, 41004, "malformed request: secret is required")],
            |c, p| {
                Box::pin(
                    async move { vec![of_exchange(&c.main.code2session(&c.a.app_id, "", &p.code).await.unwrap_err())] },
                )
            },
        )
        .setup(login_code)
        .follow(code_still_redeems),
        row(
            "Code2Session of a phone-number code",
            On::Main,
            vec![exch(Code::InvalidArgument, 40029, "invalid code")],
            |c, p| {
                Box::pin(async move {
                    vec![of_exchange(&c.main.code2session(&c.a.app_id, &c.secret_a, &p.code).await.unwrap_err())]
                })
            },
        )
        .setup(|c| Box::pin(async move { Prep { code: c.phone_code_a().await, ..Default::default() } }))
        .follow(|c, p| {
            Box::pin(async move {
                let req = v1::RedeemCodeRequest {
                    app_id: c.a.app_id.clone(),
                    secret: c.secret_a.clone(),
                    code: p.code.clone(),
                };
                let phone =
                    c.main.exchange().get_phone_number(req).await.expect("the phone code survived").into_inner();
                assert_eq!(phone.phone_number, "+86 138 u1");
            })
        }),
        row(
            "GetPhoneNumber with a login code",
            On::Main,
            vec![exch(Code::InvalidArgument, 40029, "invalid code")],
            |c, p| {
                Box::pin(async move {
                    let req = v1::RedeemCodeRequest {
                        app_id: c.a.app_id.clone(),
                        secret: c.secret_a.clone(),
                        code: p.code.clone(),
                    };
                    vec![of_exchange(&c.main.exchange().get_phone_number(req).await.unwrap_err())]
                })
            },
        )
        .setup(login_code)
        .follow(code_still_redeems),
        // --- limits ---------------------------------------------------------------------------
        row(
            "more calls in flight than the per-instance limit (another app unaffected)",
            On::Limits,
            vec![
                api_fail(
                    Code::ResourceExhausted,
                    "getUserInfo:fail resource exhausted: more than 2 calls in flight for this app instance",
                    1008,
                ),
                api_fail(
                    Code::ResourceExhausted,
                    "getUserInfo:fail resource exhausted: more than 2 calls in flight for this app instance",
                    1008,
                ),
            ],
            |c, _| {
                Box::pin(async move {
                    let r = c.limits.d.renderer(&c.slow.token).await;
                    let unary = r.call_unary(v1::GetUserInfoRequest::default()).await.unwrap_err();
                    let streamed = r.call(v1::GetUserInfoRequest::default()).await.unwrap_err();
                    // Another app, at the same moment, is served.
                    let other = c.limits.d.renderer(&c.fast.token).await;
                    assert_eq!(
                        other.call_unary(v1::GetNickNameRequest {}).await.expect("other app served").nick_name,
                        "nick-u1"
                    );
                    vec![of_failure(&unary), of_failure(&streamed)]
                })
            },
        )
        .setup(|c| {
            Box::pin(async move {
                let before = c.limits.calls();
                let r = c.limits.d.renderer(&c.slow.token).await;
                let prep = Prep::default();
                for _ in 0..2 {
                    let r = r.clone();
                    prep.tasks
                        .lock()
                        .unwrap()
                        .push(tokio::spawn(async move { r.call_unary(v1::GetUserInfoRequest::default()).await }));
                }
                let limits = &c.limits;
                until("two slow calls reach the host", || limits.calls() == before + 2).await;
                prep
            })
        })
        .follow(|c, p| {
            Box::pin(async move {
                let other = c.limits.d.renderer(&c.fast.token).await;
                other.call_unary(v1::GetUserInfoRequest::default()).await.expect("other app's delegated call served");
                c.gate.add_permits(2);
                let tasks: Vec<_> = std::mem::take(&mut *p.tasks.lock().unwrap());
                for task in tasks {
                    let info = task.await.unwrap().expect("the held calls complete");
                    assert_eq!(info.user_info.unwrap().nick_name, "host-nick");
                }
            })
        }),
        row(
            "more renderer streams than limits.max_renderer_streams",
            On::Limits,
            vec![
                st(Code::ResourceExhausted, "more than 2 renderer streams open"),
                api_fail(Code::ResourceExhausted, "getNickName:fail more than 2 renderer streams open", 1005),
            ],
            |c, _| {
                Box::pin(async move {
                    let raw = RawRenderer::open(&c.limits.channel, &c.fast.token).await.err().unwrap();
                    let r = c.limits.d.renderer(&c.fast.token).await;
                    let f = r.call(v1::GetNickNameRequest {}).await.unwrap_err();
                    // Unary calls do not need a stream.
                    r.call_unary(v1::GetNickNameRequest {}).await.expect("unary still served");
                    vec![of_status(&raw), of_failure(&f)]
                })
            },
        )
        .setup(|c| {
            Box::pin(async move {
                let prep = Prep::default();
                // Two apps fill the pool: one alone may hold only half of it.
                for token in [&c.slow.token, &c.fast.token] {
                    let r = c.limits.d.renderer(token).await;
                    r.call(v1::GetNickNameRequest {}).await.expect("stream opens");
                    prep.keep.lock().unwrap().push(Box::new(r));
                }
                assert_eq!(c.limits.streams(), 2);
                prep
            })
        })
        .follow(|c, p| {
            Box::pin(async move {
                drop(p.keep.lock().unwrap().pop());
                let limits = &c.limits;
                until("a stream slot frees up", || limits.streams() == 1).await;
                let r = c.limits.d.renderer(&c.fast.token).await;
                r.call(v1::GetNickNameRequest {}).await.expect("a stream opens again");
            })
        }),
        row(
            "more calls per second than the per-app rate (another app unaffected)",
            On::Rate,
            vec![api_fail(
                Code::ResourceExhausted,
                "getNickName:fail resource exhausted: app exceeded 1 calls per second",
                1008,
            )],
            |c, p| Box::pin(async move { vec![first_refusal(&c, &p.token, 10).await] }),
        )
        .setup(drain_rate)
        .follow(other_rate_app_served),
        row(
            "the per-app rate covers every instance of the app",
            On::Rate,
            vec![api_fail(
                Code::ResourceExhausted,
                "getNickName:fail resource exhausted: app exceeded 1 calls per second",
                1008,
            )],
            |c, _| Box::pin(async move { vec![first_refusal(&c, &c.r1b.token, 1).await] }),
        )
        .setup(drain_rate)
        .follow(other_rate_app_served),
        row(
            "more renderer streams than one app's or one instance's share (another app unaffected)",
            On::Fair,
            vec![
                st(Code::ResourceExhausted, "more than 2 renderer streams open for this app"),
                st(Code::ResourceExhausted, "more than 1 renderer streams open for this app instance"),
            ],
            |c, _| {
                Box::pin(async move {
                    let app = RawRenderer::open(&c.fair.channel, &c.f3.token).await.err().expect("app share full");
                    let other = RawRenderer::open(&c.fair.channel, &c.g.token).await.expect("another app is served");
                    let instance = RawRenderer::open(&c.fair.channel, &c.g.token).await.err().expect("instance full");
                    drop(other);
                    vec![of_status(&app), of_status(&instance)]
                })
            },
        )
        .setup(|c| {
            Box::pin(async move {
                let prep = Prep::default();
                for inst in [&c.f1, &c.f2] {
                    let stream = RawRenderer::open(&c.fair.channel, &inst.token).await.expect("within the share");
                    prep.keep.lock().unwrap().push(Box::new(stream));
                }
                prep
            })
        }),
        row(
            "more connections than one app's share (another app unaffected)",
            On::Fair,
            vec![api_fail(Code::ResourceExhausted, "getNickName:fail more than 1 connections for this app", 1005)],
            |c, _| {
                Box::pin(async move {
                    let second = c.fair.d.renderer(&c.f2.token).await;
                    let refused = second.call(v1::GetNickNameRequest {}).await.unwrap_err();
                    let other = c.fair.d.renderer(&c.g.token).await;
                    other.call_unary(v1::GetNickNameRequest {}).await.expect("another app is served");
                    vec![of_failure(&refused)]
                })
            },
        )
        .setup(|c| {
            Box::pin(async move {
                let first = c.fair.d.renderer(&c.f1.token).await;
                first.call_unary(v1::GetNickNameRequest {}).await.expect("the app's one connection");
                let prep = Prep::default();
                prep.keep.lock().unwrap().push(Box::new(first));
                prep
            })
        })
        .follow(|c, p| {
            Box::pin(async move {
                // Once the app's connection closes, its share is free again.
                drop(p.keep.lock().unwrap().pop());
                let broker = c.fair.d.server.broker().clone();
                until("the app's connection closed", || {
                    broker.occupancy.per_app.held("wxfairshare0001", Counted::Connections) == 0
                })
                .await;
                let again = c.fair.d.renderer(&c.f2.token).await;
                again.call_unary(v1::GetNickNameRequest {}).await.expect("the app connects again");
            })
        }),
        row(
            "a connection that never presents a token (closed after limits.auth_timeout_ms)",
            On::Fair,
            vec![Refusal::ConnectionClosed, Refusal::ConnectionClosed],
            |c, _| {
                Box::pin(async move {
                    let socket = c.fair.d.address();
                    let (silent, talking) = tokio::task::spawn_blocking(move || {
                        (until_closed(&socket, false), until_closed(&socket, true))
                    })
                    .await
                    .unwrap();
                    vec![silent, talking]
                })
            },
        ),
    ];
    if unsafe { libc::geteuid() } == 0 {
        cases.push(
            row("a peer running as another uid", On::Bare, vec![Refusal::ConnectionClosed], |c, _| {
                Box::pin(async move {
                    let socket = c.bare.d.address();
                    let out = tokio::task::spawn_blocking(move || {
                        use std::os::unix::process::CommandExt;
                        std::process::Command::new(std::env::current_exe().unwrap())
                            .args(["uid_probe_child", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
                            .env("HOSTILE_UID_PROBE", socket)
                            .uid(65534)
                            .gid(65534)
                            .output()
                            .expect("child runs")
                    })
                    .await
                    .unwrap();
                    let stdout = String::from_utf8_lossy(&out.stdout);
                    let result = stdout
                        .lines()
                        .find_map(|l| l.split_once("probe-result: ").map(|(_, r)| r))
                        .unwrap_or("no result");
                    match result {
                        "closed" => vec![Refusal::ConnectionClosed],
                        other => vec![st(
                            Code::Unknown,
                            &format!(
                                "{other}; {}; stdout: {stdout}; stderr: {}",
                                out.status,
                                String::from_utf8_lossy(&out.stderr)
                            ),
                        )],
                    }
                })
            })
            .setup(|c| {
                Box::pin(async move {
                    // Let `nobody` reach the socket file, so the daemon's own check is what refuses.
                    set_mode(c.bare.d.dir.path(), 0o711);
                    set_mode(std::path::Path::new(&c.bare.d.address()), 0o666);
                    Prep::default()
                })
            })
            .follow(|c, _| {
                Box::pin(async move {
                    set_mode(c.bare.d.dir.path(), 0o700);
                    set_mode(std::path::Path::new(&c.bare.d.address()), 0o600);
                    // The same probe as the daemon's own uid is answered: the refusal was the uid's.
                    let socket = c.bare.d.address();
                    let same_uid = tokio::task::spawn_blocking(move || probe(&socket)).await.unwrap();
                    assert!(same_uid.starts_with("open"), "same-uid probe: {same_uid}");
                })
            }),
        );
    } else {
        eprintln!("hostile: skipped 'a peer running as another uid' (needs root to become nobody)");
    }
    cases
}

fn set_mode(path: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// Spends app R1's bucket from instance R1a until the daemon refuses (bounded).
fn drain_rate(c: Arc<Ctx>) -> Fut<Prep> {
    Box::pin(async move {
        let r = c.rate.d.renderer(&c.r1a.token).await;
        let mut served = 0;
        loop {
            match r.call(v1::GetNickNameRequest {}).await {
                Ok(_) => served += 1,
                Err(f) => {
                    assert_eq!(f.code(), Code::ResourceExhausted, "{f}");
                    break;
                }
            }
            assert!(served <= 50, "the rate limit never refused");
        }
        let prep = Prep { token: c.r1a.token.clone(), ..Default::default() };
        prep.keep.lock().unwrap().push(Box::new(r));
        prep
    })
}

/// Calls getNickName as `token` (stream) until refused, at most `tries` times; returns the
/// refusal. One token refills per second, so more than one success means the limit leaks.
async fn first_refusal(c: &Ctx, token: &str, tries: usize) -> Refusal {
    let r = c.rate.d.renderer(token).await;
    let mut refusal = None;
    let mut served = 0;
    for _ in 0..tries.max(2) {
        match r.call(v1::GetNickNameRequest {}).await {
            Ok(_) => served += 1,
            Err(f) => {
                refusal = Some(of_failure(&f));
                break;
            }
        }
    }
    assert!(served <= 1, "{served} calls passed an empty bucket");
    refusal.unwrap_or(st(Code::Ok, "never refused"))
}

fn other_rate_app_served(c: Arc<Ctx>, _: Arc<Prep>) -> Fut<()> {
    Box::pin(async move {
        let r = c.rate.d.renderer(&c.r2.token).await;
        assert_eq!(r.call(v1::GetNickNameRequest {}).await.expect("another app is served").nick_name, "nick-u1");
    })
}

/// Connects to `socket` (speaking HTTP/2 without a token if `talk`) and reads until the daemon
/// closes the connection (bounded).
fn until_closed(socket: &str, talk: bool) -> Refusal {
    use std::io::ErrorKind;
    let mut s = std::os::unix::net::UnixStream::connect(socket).expect("connect");
    if talk {
        let hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
        s.write_all(hello).expect("preface");
    }
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Refusal::ConnectionClosed,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => {
                return Refusal::ConnectionClosed;
            }
            Err(e) => return st(Code::Unknown, &format!("still open: {e}")),
        }
    }
}

/// Connects to `socket`, sends the HTTP/2 preface and an empty SETTINGS frame, and reports
/// whether the daemon answered ("open: N bytes") or closed the connection ("closed").
fn probe(socket: &str) -> String {
    use std::io::ErrorKind;
    let mut s = match std::os::unix::net::UnixStream::connect(socket) {
        Ok(s) => s,
        Err(e) => return format!("connect failed: {e}"),
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let closed = |e: &std::io::Error| matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset);
    let hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
    if let Err(e) = s.write_all(hello) {
        return if closed(&e) { "closed".into() } else { format!("write failed: {e}") };
    }
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => "closed".into(),
        Ok(n) => format!("open: {n} bytes"),
        Err(e) if closed(&e) => "closed".into(),
        Err(e) => format!("read failed: {e}"),
    }
}

/// Not a test of its own: the body of the child process that the "peer running as another uid"
/// row starts as `nobody`.
#[test]
#[ignore = "run by hostile_input_is_refused_and_changes_nothing as another uid"]
fn uid_probe_child() {
    let socket = std::env::var("HOSTILE_UID_PROBE").expect("only the uid row runs this");
    println!("probe-result: {}", probe(&socket));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_is_refused_and_changes_nothing() {
    let started = Instant::now();
    let ctx = Arc::new(Ctx::build().await);
    let cases = cases();
    assert!(cases.len() >= 30, "the table has {} rows", cases.len());
    for (i, case) in cases.iter().enumerate() {
        eprintln!("hostile #{i:02}: {}", case.name);
        let t = ctx.on(case.on);
        let streams_at_start = t.streams();
        let prep = Arc::new(within(case.name, (case.setup)(ctx.clone())).await);
        let before = snapshot(t).await;
        let got = within(case.name, (case.attack)(ctx.clone(), prep.clone())).await;
        assert_eq!(got, case.expect, "#{i} {}: the refusal", case.name);
        let streams = before.status.renderer_streams;
        until(case.name, || t.streams() == streams).await;
        let after = snapshot(t).await;
        assert_eq!(after, before, "#{i} {}: state changed", case.name);
        within(case.name, (case.follow)(ctx.clone(), prep.clone())).await;
        drop(prep);
        until(case.name, || t.streams() == streams_at_start).await;
    }
    // Every daemon still serves its legitimate callers.
    assert_eq!(ctx.ra.call(v1::GetNickNameRequest {}).await.expect("main").nick_name, "nick-u1");
    let mut r = RawRenderer::open(&ctx.raw.channel, &ctx.raw_app.token).await.unwrap();
    next_reply_is_a_fresh_call(&ctx.raw_host, &mut r).await;
    println!("hostile: {} cases refused exactly, no state changed, in {:?}", cases.len(), started.elapsed());
}
