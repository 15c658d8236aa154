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
    let request = host.authorize(v1::ListSessionsRequest { app_id: APP.into() });
    host.admin().list_sessions(request).await.expect("list sessions").into_inner().sessions
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
    assert_eq!(grants.iter().map(|g| (g.uid.as_str(), g.scope.as_str())).collect::<Vec<_>>(), [(
        "u1",
        scope::PHONE_NUMBER
    )]);
}
