//! The daemon's promises under pressure (issue 9, items 1, 2 and 5): a renderer that half-closes
//! still gets every answer and one that leaves cancels everything it started; a host that stops
//! reading cannot make any call outlive its deadline and is disconnected so another can take
//! over; a payment the renderer was told was cancelled never reaches a host, one the host may have
//! seen is "outcome unknown", it holds its in-flight slot until the host answers, and its key
//! belongs to one user. Real daemon, real sockets, real host and renderer clients.
mod support;

use std::sync::Arc;

use hyper_util::rt::TokioIo;
use miniapp_broker_client::{
    HostFailure, RendererClient, connect,
    proto::{
        Api,
        api::ApiCall,
        metadata,
        v1::{
            self, ApiRequest, HostMessage, RendererCall, api_request, host_client::HostClient as GrpcHostClient,
            host_message, open_api_client::OpenApiClient, renderer_reply,
        },
    },
};
use miniapp_brokerd::demo::sample_request;
use support::{Daemon, assert_failure, errno, launch, until, user, within};
use tokio::sync::{Notify, mpsc};
use tonic::{Code, Request, transport::Endpoint};
use tower::service_fn;

const APP: &str = "wxpromises0000001";
const OTHER_APP: &str = "wxpromises0000002";
const V1: &str = r#"{"apiVersion":"v1"}"#;

fn tagged(tag: &str) -> v1::GetUserInfoRequest {
    v1::GetUserInfoRequest { with_credentials: false, lang: tag.into() }
}

fn user_info_answer(tag: &str) -> v1::GetUserInfoResponse {
    v1::GetUserInfoResponse { raw_data: format!("answer-{tag}"), ..Default::default() }
}

/// Sends its tag when dropped: the host client dropped a handler's work (the daemon cancelled it).
struct ReportDrop(mpsc::UnboundedSender<String>, String);

impl Drop for ReportDrop {
    fn drop(&mut self) {
        let _ = self.0.send(std::mem::take(&mut self.1));
    }
}

fn with_key(mut request: ApiRequest, key: &str) -> ApiRequest {
    match request.api.as_mut() {
        Some(api_request::Api::RequestPayment(r)) => r.idempotency_key = key.into(),
        Some(api_request::Api::RequestMidasPaymentGameItem(r)) => r.idempotency_key = key.into(),
        _ => unreachable!("a payment"),
    }
    request
}

fn launch_token_metadata<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(metadata::LAUNCH_TOKEN, token.parse().unwrap());
    request
}

/// A stock gRPC renderer that sends its calls and then closes its sending side, as grpcio,
/// grpc-js and grpcurl do when their request iterator ends, still gets every answer.
#[tokio::test]
async fn a_half_closed_session_stream_still_gets_every_answer() {
    let daemon = Daemon::start().await;
    // The host answers only once it holds both calls, long after the daemon read the end of the
    // renderer's request side (it came in the same write as the calls).
    let (seen_tx, mut seen) = mpsc::unbounded_channel::<String>();
    let both = Arc::new(Notify::new());
    let host = daemon
        .host()
        .handle({
            let both = both.clone();
            move |_app, req: v1::GetUserInfoRequest| {
                let _ = seen_tx.send(req.lang.clone());
                let both = both.clone();
                async move {
                    both.notified().await;
                    Ok::<_, HostFailure>(user_info_answer(&req.lang))
                }
            }
        })
        .connect()
        .await
        .expect("host connects");
    let app = launch(&host, APP, V1).await;

    let mut raw = OpenApiClient::new(connect::channel(&daemon.address()).await.expect("channel"));
    let calls: Vec<RendererCall> = ["a", "b"]
        .iter()
        .enumerate()
        .map(|(i, tag)| RendererCall { id: i as u64 + 1, request: Some(tagged(tag).into_request()) })
        .collect();
    let request = launch_token_metadata(tokio_stream::iter(calls), &app.launch_token);
    let mut replies = within("session opens", raw.session(request)).await.expect("session accepted").into_inner();

    let mut tags = vec![within("call 1", seen.recv()).await.unwrap(), within("call 2", seen.recv()).await.unwrap()];
    tags.sort();
    assert_eq!(tags, ["a", "b"]);
    both.notify_waiters();

    let mut answers = Vec::new();
    while let Some(reply) = within("a reply", replies.message()).await.expect("stream ok") {
        match reply.outcome {
            Some(renderer_reply::Outcome::Ok(resp)) => {
                let info = v1::GetUserInfoRequest::unwrap_response(resp).expect("a getUserInfo answer");
                answers.push((reply.id, info.raw_data));
            }
            other => panic!("call {} failed: {other:?}", reply.id),
        }
    }
    answers.sort();
    assert_eq!(answers, [(1, "answer-a".to_owned()), (2, "answer-b".to_owned())]);
}

/// A call that runs on a task of its own (an instance's first call asks the host for the version;
/// a v3 default asks getAuthCode) is cancelled on the host when its renderer goes away, like a
/// forwarded call.
#[tokio::test]
async fn a_call_on_its_own_task_is_cancelled_on_the_host_when_its_renderer_goes() {
    let daemon = Daemon::start_with(|c| c.host.call_timeout_ms = 120_000).await;
    let (started_tx, mut started) = mpsc::unbounded_channel::<String>();
    let (dropped_tx, mut dropped) = mpsc::unbounded_channel::<String>();
    let host = daemon
        .host()
        .user(user("u-spawned"))
        .open_api_version({
            let (started, dropped) = (started_tx.clone(), dropped_tx.clone());
            move |_app| {
                let _ = started.send("openApiVersion".into());
                let on_drop = ReportDrop(dropped.clone(), "openApiVersion".into());
                async move {
                    let _on_drop = on_drop;
                    std::future::pending::<Result<String, HostFailure>>().await
                }
            }
        })
        .get_auth_code(move |_app, _req| {
            let _ = started_tx.send("getAuthCode".into());
            let on_drop = ReportDrop(dropped_tx.clone(), "getAuthCode".into());
            async move {
                let _on_drop = on_drop;
                std::future::pending::<Result<v1::GetAuthCodeResponse, HostFailure>>().await
            }
        })
        .connect()
        .await
        .expect("host connects");

    for (app_json, asked) in [("{}", "openApiVersion"), (r#"{"apiVersion":"v3"}"#, "getAuthCode")] {
        let app = launch(&host, APP, app_json).await;
        let renderer = daemon.renderer(&app.launch_token).await;
        let call = tokio::spawn({
            let r = renderer.clone();
            async move { r.call(v1::LoginRequest { timeout: 0 }).await }
        });
        assert_eq!(within("the host is asked", started.recv()).await.as_deref(), Some(asked));
        renderer.close().await;
        assert!(within("the closed call", call).await.expect("task").is_err());
        assert_eq!(within("the host is told to stop", dropped.recv()).await.as_deref(), Some(asked), "{app_json}");
        until("nothing left in flight", || daemon.server.broker().host.calls_in_flight() == 0).await;
    }
}

/// A raw host connection whose receive window is zero: it says Hello and is published, but can
/// never read a single message the daemon sends it, as a stopped process or a blocked thread.
async fn stalled_host(daemon: &Daemon) -> (GrpcHostClient<tonic::transport::Channel>, mpsc::Sender<HostMessage>) {
    let address = daemon.address();
    let channel = Endpoint::from_static("http://miniapp-broker.local")
        .http2_adaptive_window(false)
        .initial_stream_window_size(0)
        .connect_with_connector(service_fn(move |_| {
            let address = address.clone();
            async move { connect::local_stream(&address).await.map(TokioIo::new) }
        }))
        .await
        .expect("channel");
    let mut client = GrpcHostClient::new(channel);
    let (tx, rx) = mpsc::channel(4);
    let hello = v1::Hello {
        methods: vec![v1::DelegateMethod::GetUserInfo as i32, v1::DelegateMethod::RequestPayment as i32],
        host_name: "stalled".into(),
        user: Some(user("u-stalled")),
    };
    tx.send(HostMessage { msg: Some(host_message::Msg::Hello(hello)) }).await.unwrap();
    let mut request = Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    request.metadata_mut().insert(metadata::AUTHORIZATION, metadata::bearer(&daemon.token()).parse().unwrap());
    // The response (headers only) arrives; its messages never can.
    let _response = within("connect", client.connect(request)).await.expect("connected");
    std::mem::forget(_response);
    (client, tx)
}

/// A [`stalled_host`], published, and an app launched for it through a plain host client (the
/// stalled connection cannot launch one itself), which the test may use to close the app.
async fn stalled_host_with_app(
    daemon: &Daemon,
) -> (
    (GrpcHostClient<tonic::transport::Channel>, mpsc::Sender<HostMessage>),
    GrpcHostClient<tonic::transport::Channel>,
    v1::LaunchAppResponse,
) {
    let stalled = stalled_host(daemon).await;
    let broker = daemon.server.broker().clone();
    until("the stalled host is published", || broker.host.current().is_some()).await;
    let mut launcher = GrpcHostClient::new(connect::channel(&daemon.address()).await.expect("channel"));
    let mut launch = Request::new(v1::LaunchAppRequest { app_id: APP.into(), app_json: V1.into() });
    launch.metadata_mut().insert(metadata::AUTHORIZATION, metadata::bearer(&daemon.token()).parse().unwrap());
    let app = launcher.launch_app(launch).await.expect("launched").into_inner();
    (stalled, launcher, app)
}

/// A host that stays connected but stops reading fills its queue. No call waits for room: every
/// surface answers at once ("host is not keeping up") or by its deadline, the renderer's stream
/// keeps reading calls and still ends when its app closes.
#[tokio::test]
async fn a_host_that_stops_reading_cannot_make_calls_outlive_their_deadline() {
    const QUEUE: u32 = 4096;
    let daemon = Daemon::start_with(|c| {
        c.host.call_timeout_ms = 60_000;
        c.limits.max_calls_in_flight_per_instance = 2 * QUEUE;
        // One app may hold half of the daemon's calls in flight: room for all of them.
        c.limits.max_calls_in_flight = 4 * QUEUE;
        c.limits.calls_per_second_per_app = 100_000;
        c.limits.burst_per_app = 100_000;
        c.limits.calls_per_second_per_user = 100_000;
        c.limits.burst_per_user = 100_000;
    })
    .await;
    let (_stalled, mut launcher, app) = stalled_host_with_app(&daemon).await;
    let broker = daemon.server.broker().clone();
    let renderer = daemon.renderer(&app.launch_token).await;

    // Fill the host's queue (the Welcome already holds one place) through renderer streams, each
    // with at most 256 calls pending; the last call finds the queue full.
    let mut filling = Vec::new();
    for r in 0..16 {
        let renderer = daemon.renderer(&app.launch_token).await;
        for i in 0..QUEUE / 16 {
            let r2 = renderer.clone();
            filling.push(tokio::spawn(async move { r2.call(tagged(&format!("fill-{r}-{i}"))).await }));
        }
    }
    until("the host's calls are in the table", || broker.host.calls_in_flight() >= QUEUE as usize - 1).await;

    // Every surface answers now instead of waiting for room that never comes.
    let streamed = within("a streamed call", renderer.call(tagged("streamed"))).await.unwrap_err();
    assert_eq!((streamed.errno, streamed.code()), (errno::EXHAUSTED, Code::ResourceExhausted), "{streamed:?}");
    assert!(streamed.err_msg.contains("host is not keeping up"), "{streamed:?}");
    let unary = within("a unary call", renderer.call_unary(tagged("unary"))).await.unwrap_err();
    assert_eq!(unary.errno, errno::EXHAUSTED, "{unary:?}");
    let invoked =
        within("an Invoke call", renderer.invoke_json("getUserInfo", &serde_json::json!({}))).await.unwrap_err();
    assert_eq!(invoked["errno"], errno::EXHAUSTED, "{invoked}");
    let paid = within("a payment", renderer.call_request(sample_request(Api::RequestPayment))).await.unwrap_err();
    assert_eq!(paid.errno, errno::EXHAUSTED, "{paid:?}");
    assert_eq!(broker.store.payment_count().unwrap(), 0, "a payment the host never got leaves no record");

    // The stream still serves its app's closing: the queued calls end, now.
    let mut closer = Request::new(v1::CloseAppRequest { instance_id: app.instance_id.clone() });
    closer.metadata_mut().insert(metadata::AUTHORIZATION, metadata::bearer(&daemon.token()).parse().unwrap());
    launcher.close_app(closer).await.expect("closed");
    let (mut cancelled, mut refused) = (0, 0);
    for call in filling {
        let failure = within("a queued call after close", call).await.expect("task").unwrap_err();
        match failure.errno {
            1007 => cancelled += 1,
            errno::EXHAUSTED => refused += 1,
            _ => panic!("{failure:?}"),
        }
    }
    // The Welcome may or may not still hold its place: one call may have found the queue full.
    assert!(cancelled >= QUEUE - 1 && cancelled + refused == QUEUE, "queued calls end when their app closes");
}

/// A host that leaves its messages unread past `host.stall_timeout_ms` is disconnected: its calls
/// fail at once with "host disconnected", and a healthy host connects and serves the next call.
#[tokio::test]
async fn a_stalled_host_is_disconnected_and_another_takes_over() {
    let daemon = Daemon::start_with(|c| {
        c.host.call_timeout_ms = 120_000;
        c.host.stall_timeout_ms = 300;
    })
    .await;
    let (_stalled, _launcher, app) = stalled_host_with_app(&daemon).await;
    let broker = daemon.server.broker().clone();
    let renderer = daemon.renderer(&app.launch_token).await;

    let failure = within("a call to the stalled host", renderer.call(tagged("stuck"))).await.unwrap_err();
    assert_failure(&failure, "getUserInfo:fail host disconnected", errno::HOST_GONE, Code::Unavailable, "host_gone");
    until("the host slot is free", || broker.host.current().is_none()).await;

    let host = daemon
        .host()
        .handle(|_app, req: v1::GetUserInfoRequest| async move { Ok::<_, HostFailure>(user_info_answer(&req.lang)) })
        .connect()
        .await
        .expect("a healthy host takes over");
    let answer = within("a call to the new host", renderer.call(tagged("fresh"))).await.expect("answered");
    assert_eq!(answer.raw_data, "answer-fresh");
    drop(host);
}

/// A payment waiting for a host when its app closes is called off: the renderer is told
/// "cancelled", and no host ever sees it, not even one that connects right after.
#[tokio::test]
async fn a_payment_called_off_by_its_app_closing_never_reaches_a_later_host() {
    let daemon = Daemon::start_with(|c| c.host.grace_ms = 60_000).await;
    let (seen_tx, mut seen) = mpsc::unbounded_channel::<&'static str>();
    let paying_host = |seen: mpsc::UnboundedSender<&'static str>| {
        let other = seen.clone();
        daemon
            .host()
            .handle(move |_app, _req: v1::RequestPaymentRequest| {
                let _ = seen.send("payment");
                async { Ok::<_, HostFailure>(v1::RequestPaymentResponse::default()) }
            })
            .handle(move |_app, _req: v1::GetUserInfoRequest| {
                let _ = other.send("userInfo");
                async { Ok::<_, HostFailure>(v1::GetUserInfoResponse::default()) }
            })
    };
    let host = paying_host(seen_tx.clone()).connect().await.expect("host connects");
    let app = launch(&host, APP, V1).await;
    host.disconnect();
    let broker = daemon.server.broker().clone();
    until("the host is gone", || broker.host.current().is_none()).await;

    let renderer = daemon.renderer(&app.launch_token).await;
    let paying = tokio::spawn({
        let r = renderer.clone();
        async move { r.call_unary(payment_of(with_key(sample_request(Api::RequestPayment), "order-closed"))).await }
    });
    until("the payment waits for a host", || broker.payments.len() == 1).await;
    let mut raw = GrpcHostClient::new(connect::channel(&daemon.address()).await.expect("channel"));
    let mut close = Request::new(v1::CloseAppRequest { instance_id: app.instance_id.clone() });
    close.metadata_mut().insert(metadata::AUTHORIZATION, metadata::bearer(&daemon.token()).parse().unwrap());
    raw.close_app(close).await.expect("closed");
    let failure = within("the payment after close", paying).await.expect("task").unwrap_err();
    assert_failure(
        &failure,
        "requestPayment:fail call cancelled: app instance closed",
        1007,
        Code::Cancelled,
        "cancelled",
    );

    // A host connects: another app's call reaches it, the called-off payment never does.
    let host = paying_host(seen_tx).connect().await.expect("a new host");
    let other = launch(&host, OTHER_APP, V1).await;
    let renderer_b = daemon.renderer(&other.launch_token).await;
    within("the other app's call", renderer_b.call(tagged("b"))).await.expect("served");
    assert_eq!(within("what the host saw", seen.recv()).await, Some("userInfo"));
    until("the leader is gone", || broker.payments.is_empty()).await;
    assert!(seen.try_recv().is_err(), "the called-off payment never reached a host");
    assert_eq!(broker.store.payment_count().unwrap(), 0, "nothing recorded: the key is unspent");
}

/// Retries of one payment (the same idempotency key) join the first call. Before the hand-off the
/// payment is called off only when every caller waiting on it went away: the first leaving alone
/// leaves the payment to the retries, which get its answer.
#[tokio::test]
async fn a_payment_waits_for_a_host_while_any_of_its_callers_remains() {
    let daemon = Daemon::start_with(|c| c.host.grace_ms = 60_000).await;
    let (seen_tx, mut seen) = mpsc::unbounded_channel::<String>();
    let paying_host = || {
        let seen = seen_tx.clone();
        daemon.host().handle(move |_app, req: v1::RequestPaymentRequest| {
            let _ = seen.send(req.idempotency_key.clone());
            async { Ok::<_, HostFailure>(v1::RequestPaymentResponse::default()) }
        })
    };
    let host = paying_host().connect().await.expect("host connects");
    let app = launch(&host, APP, V1).await;
    host.disconnect();
    let broker = daemon.server.broker().clone();
    until("the host is gone", || broker.host.current().is_none()).await;

    // Two callers of one payment on their own connections: the first, and a retry that joins it.
    let pay = |key: &'static str| {
        let (address, token) = (daemon.address(), app.launch_token.clone());
        tokio::spawn(async move {
            let renderer = RendererClient::connect(&address, &token).await.expect("renderer connects");
            renderer.call_unary(payment_of(with_key(sample_request(Api::RequestPayment), key))).await
        })
    };
    let first = pay("order-both-leave");
    until("the payment waits for a host", || broker.payments.callers() == 1).await;
    let retry = pay("order-both-leave");
    until("the retry joined it", || broker.payments.callers() == 2 && broker.payments.len() == 1).await;
    // Both go: the payment is called off, nothing recorded.
    first.abort();
    retry.abort();
    until("the payment is called off", || broker.payments.is_empty()).await;

    let first = pay("order-retry-stays");
    until("the payment waits for a host", || broker.payments.callers() == 1).await;
    let retry = pay("order-retry-stays");
    until("the retry joined it", || broker.payments.callers() == 2 && broker.payments.len() == 1).await;
    // The first caller goes; the retry still waits, and so does the payment.
    first.abort();
    until("the first caller is gone", || broker.payments.callers() < 2).await;
    assert_eq!(broker.payments.len(), 1, "the payment still waits for a host");
    let host = paying_host().connect().await.expect("a host comes");
    let answer = within("the retry's answer", retry).await.expect("task");
    assert_eq!(answer.expect("the payment went through").err_msg, "requestPayment:ok");
    assert_eq!(within("what the host saw", seen.recv()).await.as_deref(), Some("order-retry-stays"));
    assert!(seen.try_recv().is_err(), "the payment every caller left never reached a host");
    assert_eq!(broker.store.payment_count().unwrap(), 1, "only the payment that went through is recorded");
    drop(host);
}

/// A payment the host holds when its app closes may have happened: the renderer is told "outcome
/// unknown" (1013), never "cancelled", and a retry gets the same answer without reaching a host.
#[tokio::test]
async fn a_payment_the_host_holds_when_its_app_closes_is_outcome_unknown() {
    let daemon = Daemon::start_with(|c| c.host.call_timeout_ms = 120_000).await;
    let (started_tx, mut started) = mpsc::unbounded_channel::<()>();
    let host = daemon
        .host()
        .handle(move |_app, _req: v1::RequestPaymentRequest| {
            let _ = started_tx.send(());
            std::future::pending::<Result<v1::RequestPaymentResponse, HostFailure>>()
        })
        .connect()
        .await
        .expect("host connects");
    for unary in [false, true] {
        let app = launch(&host, APP, V1).await;
        let renderer = daemon.renderer(&app.launch_token).await;
        let request = with_key(sample_request(Api::RequestPayment), &format!("order-held-{unary}"));
        let paying = tokio::spawn(async move {
            if unary {
                renderer.call_unary(payment_of(request)).await.map(|_| ())
            } else {
                renderer.call_request(request).await.map(|_| ())
            }
        });
        within("the host has the payment", started.recv()).await.expect("started");
        host.close_app(&app.instance_id).await.expect("closed");
        let failure = within("the payment after close", paying).await.expect("task").unwrap_err();
        assert_eq!(
            (failure.errno, failure.code()),
            (errno::OUTCOME_UNKNOWN, Code::Aborted),
            "unary={unary}: {failure:?}"
        );
    }
}

fn payment_of(request: ApiRequest) -> v1::RequestPaymentRequest {
    match request.api {
        Some(api_request::Api::RequestPayment(r)) => r,
        _ => unreachable!("a requestPayment"),
    }
}

/// A payment keeps its place in the instance's in-flight limit until the host answers it, even
/// when the caller resets its request: a renderer cannot pile up payments on the host by leaving.
#[tokio::test]
async fn a_payment_holds_its_in_flight_slot_after_its_caller_resets() {
    let daemon = Daemon::start_with(|c| {
        c.host.call_timeout_ms = 120_000;
        c.limits.max_calls_in_flight_per_instance = 1;
    })
    .await;
    let (started_tx, mut started) = mpsc::unbounded_channel::<()>();
    let release = Arc::new(Notify::new());
    let host = daemon
        .host()
        .handle({
            let release = release.clone();
            move |_app, _req: v1::RequestPaymentRequest| {
                let _ = started_tx.send(());
                let release = release.clone();
                async move {
                    release.notified().await;
                    Ok::<_, HostFailure>(v1::RequestPaymentResponse::default())
                }
            }
        })
        .handle(|_app, req: v1::GetUserInfoRequest| async move { Ok::<_, HostFailure>(user_info_answer(&req.lang)) })
        .connect()
        .await
        .expect("host connects");
    let app = launch(&host, APP, V1).await;
    let renderer = daemon.renderer(&app.launch_token).await;
    let paying = tokio::spawn({
        let r = renderer.clone();
        async move {
            let request = with_key(sample_request(Api::RequestPayment), "order-reset");
            r.call_unary(payment_of(request)).await
        }
    });
    within("the host has the payment", started.recv()).await.expect("started");
    paying.abort();
    // The reset travels on the same connection ahead of each probe; none of them gets a slot.
    for probe in 0..50 {
        let refused = within("a probe", renderer.call_unary(tagged(&format!("probe-{probe}")))).await.unwrap_err();
        assert_eq!(refused.errno, errno::EXHAUSTED, "probe {probe}: {refused:?}");
    }
    release.notify_waiters();
    let instance = daemon.server.broker().registry.get(&app.instance_id).expect("instance");
    until("the payment's slot comes back", || instance.calls_in_flight() == 0).await;
    let answer = within("a call after the payment", renderer.call_unary(tagged("after"))).await.expect("served");
    assert_eq!(answer.raw_data, "answer-after");
}

/// An idempotency key belongs to the user who paid: after a switch, the same key from the same app
/// is the new user's own payment and reaches the host, never the first user's recorded outcome.
#[tokio::test]
async fn an_idempotency_key_is_scoped_to_the_signed_in_user() {
    let daemon = Daemon::start().await;
    let (seen_tx, mut seen) = mpsc::unbounded_channel::<String>();
    let host = daemon
        .host()
        .user(user("u-first"))
        .handle(move |_app, req: v1::RequestPaymentRequest| {
            let _ = seen_tx.send(req.nonce_str.clone());
            async { Ok::<_, HostFailure>(v1::RequestPaymentResponse::default()) }
        })
        .connect()
        .await
        .expect("host connects");
    let app = launch(&host, APP, V1).await;
    let renderer: RendererClient = daemon.renderer(&app.launch_token).await;
    let pay =
        || within("a payment", renderer.call_request(with_key(sample_request(Api::RequestPayment), "shared-key")));
    pay().await.expect("the first user's payment");
    pay().await.expect("the first user's retry");
    host.set_user(user("u-second")).await.expect("switched");
    until("the switch is seen", || daemon.server.broker().user.get().is_some_and(|u| u.uid == "u-second")).await;
    pay().await.expect("the second user's payment");
    assert!(seen.try_recv().is_ok(), "the first payment reached the host");
    assert!(seen.try_recv().is_ok(), "the second user's payment reached the host: it is not a retry");
    assert!(seen.try_recv().is_err(), "the first user's retry did not");
}
