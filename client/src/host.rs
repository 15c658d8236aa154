//! The host side: the superapp shell that implements the delegate methods.
//!
//! ```no_run
//! # async fn demo(socket: &str, host_token: &str) -> Result<(), Box<dyn std::error::Error>> {
//! use miniapp_broker_client::{HostBuilder, HostFailure};
//! use miniapp_broker_client::proto::v1::{RequestPaymentRequest, RequestPaymentResponse, SignedInUser};
//!
//! let host = HostBuilder::new(socket, host_token)
//!     .name("my-superapp")
//!     .user(SignedInUser { uid: "user-1".into(), profile: None })
//!     .handle(|_app, _req: RequestPaymentRequest| async {
//!         // Show the payment sheet; the user closed it:
//!         Err::<RequestPaymentResponse, _>(HostFailure::cancelled())
//!     })
//!     .connect()
//!     .await?;
//! let app = host.launch_app("wx1234567890abcdef", r#"{"apiVersion":"v2"}"#).await?;
//! // hand app.launch_token to the renderer process you start
//! # Ok(()) }
//! ```

use std::{collections::HashMap, future::Future, pin::Pin, sync::Arc, task::Poll};

use dashmap::DashMap;
use miniapp_broker_proto::{
    api::ApiCall,
    metadata,
    v1::{
        self, AppInfo, ConsentChanged, DaemonMessage, Decision, DelegateMethod, DelegateResult, GetAuthCodeRequest,
        GetAuthCodeResponse, HostMessage, OpenApiVersionResponse, SignedInUser, Welcome, admin_client::AdminClient,
        daemon_message, delegate_call, delegate_result::Outcome, host_client::HostClient as GrpcHostClient,
        host_message,
    },
};
use tokio::{
    sync::{broadcast, mpsc, watch},
    task::AbortHandle,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Request, Status, Streaming,
    metadata::{Ascii, MetadataValue},
    transport::Channel,
};
use tracing::{debug, warn};

use crate::{connect, pages};

/// Why a host handler did not produce a result.
#[derive(Debug, Clone, PartialEq)]
pub enum HostFailure {
    /// An error shaped like the seed's NSError; the renderer gets it unchanged.
    Error(v1::HostError),
    /// The user cancelled (closed the payment sheet, refused consent): `"<api>:fail cancel"`.
    Cancelled(String),
}

impl HostFailure {
    /// An NSError-style failure, e.g. `HostFailure::error("TCMPPLoginErrorDomain", -1001, "app not login")`.
    pub fn error(domain: impl Into<String>, code: i64, message: impl Into<String>) -> Self {
        HostFailure::Error(v1::HostError { domain: domain.into(), code, message: message.into() })
    }

    /// The user cancelled.
    pub fn cancelled() -> Self {
        HostFailure::Cancelled(String::new())
    }

    fn into_outcome(self) -> Outcome {
        match self {
            HostFailure::Error(e) => Outcome::Error(e),
            HostFailure::Cancelled(message) => Outcome::Cancelled(v1::Cancelled { message }),
        }
    }
}

/// Errors of the host client itself (connecting, the daemon refusing it).
#[derive(Debug, thiserror::Error)]
pub enum HostClientError {
    #[error("cannot reach the daemon: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("the daemon refused: {}", .0.message())]
    Refused(#[from] Status),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("the host stream is closed")]
    Closed,
}

type BoxOutcome = Pin<Box<dyn Future<Output = Outcome> + Send>>;
type Handler = Arc<dyn Fn(AppInfo, delegate_call::Request) -> BoxOutcome + Send + Sync>;

const CLIENT_DOMAIN: &str = "miniapp-broker-client";

fn client_error(message: &str) -> Outcome {
    Outcome::Error(v1::HostError { domain: CLIENT_DOMAIN.into(), code: -1, message: message.into() })
}

/// Builds a host: its name, its signed-in user and a handler per delegate method it implements.
/// Cloning keeps the handlers, so a host can reconnect with `builder.clone().connect()`.
#[derive(Clone)]
pub struct HostBuilder {
    address: String,
    token: String,
    name: String,
    user: Option<SignedInUser>,
    handlers: HashMap<i32, Handler>,
}

impl std::fmt::Debug for HostBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostBuilder").field("address", &self.address).field("name", &self.name).finish_non_exhaustive()
    }
}

impl HostBuilder {
    /// A host for the daemon at `address`, authenticated by the host token (the contents of the
    /// daemon's `host.token` file).
    pub fn new(address: &str, token: &str) -> Self {
        HostBuilder {
            address: address.to_owned(),
            token: token.trim().to_owned(),
            name: "host".into(),
            user: None,
            handlers: HashMap::new(),
        }
    }

    pub fn name(mut self, name: &str) -> Self {
        self.name = name.to_owned();
        self
    }

    /// The user signed in when the host connects (the seed's getAppUID).
    pub fn user(mut self, user: SignedInUser) -> Self {
        self.user = Some(user);
        self
    }

    /// Implements the delegate method of the open API whose request type is `T`.
    pub fn handle<T, F, Fut>(mut self, handler: F) -> Self
    where
        T: ApiCall,
        F: Fn(AppInfo, T) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T::Response, HostFailure>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let erased: Handler = Arc::new(move |app, request| {
            let handler = handler.clone();
            Box::pin(async move {
                let delegate_call::Request::Api(request) = request else {
                    return client_error("request of the wrong kind");
                };
                let Some(typed) = T::from_request(request) else { return client_error("request of the wrong type") };
                match handler(app, typed).await {
                    Ok(response) => Outcome::Api(T::wrap_response(response)),
                    Err(failure) => failure.into_outcome(),
                }
            })
        });
        self.handlers.insert(T::API.method() as i32, erased);
        self
    }

    /// Implements getAuthCode (v3 "mutual trust").
    pub fn get_auth_code<F, Fut>(mut self, handler: F) -> Self
    where
        F: Fn(AppInfo, GetAuthCodeRequest) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<GetAuthCodeResponse, HostFailure>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let erased: Handler = Arc::new(move |app, request| {
            let handler = handler.clone();
            Box::pin(async move {
                let delegate_call::Request::GetAuthCode(request) = request else {
                    return client_error("request of the wrong kind");
                };
                match handler(app, request).await {
                    Ok(answer) => Outcome::GetAuthCode(answer),
                    Err(failure) => failure.into_outcome(),
                }
            })
        });
        self.handlers.insert(DelegateMethod::GetAuthCode as i32, erased);
        self
    }

    /// Implements openApiVersion: the version ("v1", "v2", "v3") an app instance uses when its
    /// app.json sets none.
    pub fn open_api_version<F, Fut>(mut self, handler: F) -> Self
    where
        F: Fn(AppInfo) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String, HostFailure>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let erased: Handler = Arc::new(move |app, _request| {
            let handler = handler.clone();
            Box::pin(async move {
                match handler(app).await {
                    Ok(version) => Outcome::OpenApiVersion(OpenApiVersionResponse { version }),
                    Err(failure) => failure.into_outcome(),
                }
            })
        });
        self.handlers.insert(DelegateMethod::OpenApiVersion as i32, erased);
        self
    }

    /// Like [`connect`](Self::connect), but while the daemon is not reachable yet (it is starting,
    /// or restarting) or still holds the previous host's slot, retries with backoff for up to
    /// `budget`. A refused token fails at once. A host process that outlives daemon restarts runs
    /// `loop { let host = builder.clone().connect_retrying(budget).await?; host.closed().await; }`.
    pub async fn connect_retrying(self, budget: std::time::Duration) -> Result<HostClient, HostClientError> {
        let deadline = tokio::time::Instant::now() + budget;
        let mut backoff = connect::Backoff::default();
        loop {
            let retryable = match self.clone().connect().await {
                Ok(host) => return Ok(host),
                // A server of another user is not the daemon restarting: refuse at once.
                Err(HostClientError::Transport(e)) if connect::foreign_server(&e).is_some() => {
                    return Err(HostClientError::Transport(e));
                }
                Err(HostClientError::Transport(e)) => HostClientError::Transport(e),
                Err(HostClientError::Refused(s))
                    if matches!(s.code(), tonic::Code::Unavailable | tonic::Code::AlreadyExists) =>
                {
                    HostClientError::Refused(s)
                }
                Err(other) => return Err(other),
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(retryable);
            }
            backoff.wait().await;
        }
    }

    /// Connects, says Hello, and waits for the daemon's Welcome. Delegate calls are answered from
    /// then on, until the returned client is dropped or disconnected.
    pub async fn connect(self) -> Result<HostClient, HostClientError> {
        let channel = connect::channel(&self.address).await?;
        let token = MetadataValue::try_from(metadata::bearer(&self.token))
            .map_err(|_| HostClientError::Protocol("the host token is not valid metadata".into()))?;
        let (tx, rx) = mpsc::channel(4096);
        let mut methods: Vec<i32> = self.handlers.keys().copied().collect();
        methods.sort_unstable();
        let hello = v1::Hello { methods, host_name: self.name.clone(), user: self.user.clone() };
        tx.send(HostMessage { msg: Some(host_message::Msg::Hello(hello)) })
            .await
            .map_err(|_| HostClientError::Closed)?;
        let mut grpc = GrpcHostClient::new(channel.clone());
        let mut request = Request::new(ReceiverStream::new(rx));
        request.metadata_mut().insert(metadata::AUTHORIZATION, token.clone());
        let mut inbound = grpc.connect(request).await?.into_inner();
        let welcome = match inbound.message().await? {
            Some(DaemonMessage { msg: Some(daemon_message::Msg::Welcome(w)) }) => w,
            Some(_) => return Err(HostClientError::Protocol("the daemon's first message was not Welcome".into())),
            None => return Err(HostClientError::Closed),
        };
        let (closed_tx, closed_rx) = watch::channel(false);
        let (consent, _) = broadcast::channel(CONSENT_EVENTS);
        let driver = tokio::spawn(drive(inbound, tx.clone(), Arc::new(self.handlers), closed_tx, consent.clone()));
        Ok(HostClient { channel, token, tx, welcome, driver: driver.abort_handle(), closed: closed_rx, consent })
    }
}

/// A connected host.
#[derive(Debug)]
pub struct HostClient {
    channel: Channel,
    token: MetadataValue<Ascii>,
    tx: mpsc::Sender<HostMessage>,
    welcome: Welcome,
    driver: AbortHandle,
    closed: watch::Receiver<bool>,
    consent: broadcast::Sender<ConsentChanged>,
}

/// How many consent events a slow reader of [`HostClient::consent_changes`] may fall behind.
const CONSENT_EVENTS: usize = 256;

impl Drop for HostClient {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl HostClient {
    /// The daemon's Welcome (its version, default API version, this host session's id).
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    /// A request carrying the host token, for calling `Host` or `Admin` RPCs directly.
    pub fn authorize<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        request.metadata_mut().insert(metadata::AUTHORIZATION, self.token.clone());
        request
    }

    /// The `Admin` service, for status, grants and app registration.
    pub fn admin(&self) -> AdminClient<Channel> {
        AdminClient::new(self.channel.clone())
    }

    /// Pushes the signed-in user (an empty uid signs out).
    pub async fn set_user(&self, user: SignedInUser) -> Result<(), HostClientError> {
        self.tx
            .send(HostMessage { msg: Some(host_message::Msg::User(user)) })
            .await
            .map_err(|_| HostClientError::Closed)
    }

    /// Launches an app instance; hand the returned launch token to its renderer.
    pub async fn launch_app(&self, app_id: &str, app_json: &str) -> Result<v1::LaunchAppResponse, Status> {
        let request = v1::LaunchAppRequest { app_id: app_id.to_owned(), app_json: app_json.to_owned() };
        Ok(GrpcHostClient::new(self.channel.clone()).launch_app(self.authorize(request)).await?.into_inner())
    }

    /// Closes an app instance: its token stops working, its pending calls fail.
    pub async fn close_app(&self, instance_id: &str) -> Result<v1::CloseAppResponse, Status> {
        let request = v1::CloseAppRequest { instance_id: instance_id.to_owned() };
        Ok(GrpcHostClient::new(self.channel.clone()).close_app(self.authorize(request)).await?.into_inner())
    }

    /// The scopes users granted apps (v3); empty filters match everything: every page of them.
    pub async fn list_grants(&self, app_id: &str, uid: &str) -> Result<Vec<v1::Grant>, Status> {
        self.list_decisions(app_id, uid, false).await
    }

    /// The grants and, with `include_refusals`, the remembered refusals (`Grant.refused`) of
    /// users for apps; empty filters match everything: every page of them.
    pub async fn list_decisions(
        &self,
        app_id: &str,
        uid: &str,
        include_refusals: bool,
    ) -> Result<Vec<v1::Grant>, Status> {
        let request = v1::ListGrantsRequest {
            app_id: app_id.to_owned(),
            uid: uid.to_owned(),
            include_refusals,
            after: String::new(),
        };
        pages::read_all(request, |r| async { Ok(self.admin().list_grants(self.authorize(r)).await?.into_inner()) })
            .await
    }

    /// The stored login sessions of an app (empty: every app): every page of them.
    pub async fn list_sessions(&self, app_id: &str) -> Result<Vec<v1::SessionInfo>, Status> {
        let request = v1::ListSessionsRequest { app_id: app_id.to_owned(), after: String::new() };
        pages::read_all(request, |r| async { Ok(self.admin().list_sessions(self.authorize(r)).await?.into_inner()) })
            .await
    }

    /// Revokes one scope (or all, with an empty scope) of (app, uid); an empty uid means the
    /// signed-in user.
    pub async fn revoke_grants(&self, app_id: &str, uid: &str, scope: &str) -> Result<u32, Status> {
        let request =
            v1::RevokeGrantsRequest { app_id: app_id.to_owned(), uid: uid.to_owned(), scope: scope.to_owned() };
        Ok(self.admin().revoke_grants(self.authorize(request)).await?.into_inner().revoked)
    }

    /// Every change of a user's decision the daemon reports from now on (grants, refusals,
    /// revocations, from any source), so a settings page stays true. Subscribe right after
    /// connecting.
    pub fn consent_changes(&self) -> broadcast::Receiver<ConsentChanged> {
        self.consent.subscribe()
    }

    /// Sets one scope's decision for (app, uid), as the user chose it in the host's own settings
    /// UI: granted, refused, or undecided (revoked: asked again). An empty uid is the signed-in
    /// user; an empty scope with `Decision::Undecided` revokes every scope. The daemon answers
    /// with a ConsentChanged event per changed scope, or a notice if it refused the message.
    pub async fn set_decision(
        &self,
        app_id: &str,
        uid: &str,
        scope: &str,
        decision: Decision,
    ) -> Result<(), HostClientError> {
        let decision = v1::SetDecision {
            app_id: app_id.to_owned(),
            uid: uid.to_owned(),
            scope: scope.to_owned(),
            decision: decision as i32,
        };
        self.tx
            .send(HostMessage { msg: Some(host_message::Msg::Decision(decision)) })
            .await
            .map_err(|_| HostClientError::Closed)
    }

    /// The disclosure ledger (empty filters match everything), for a privacy page: every page of it.
    pub async fn ledger(&self, app_id: &str, uid: &str, since_ms: u64) -> Result<Vec<v1::Disclosure>, Status> {
        let request = v1::ListLedgerRequest { app_id: app_id.to_owned(), uid: uid.to_owned(), since_ms, after_id: 0 };
        pages::read_all(request, |r| async { Ok(self.admin().list_ledger(self.authorize(r)).await?.into_inner()) })
            .await
    }

    /// Registers an app's backend secret (returned once), for the Exchange service.
    pub async fn register_app(&self, app_id: &str, rotate: bool) -> Result<v1::RegisterAppResponse, Status> {
        let request = v1::RegisterAppRequest { app_id: app_id.to_owned(), rotate };
        Ok(self.admin().register_app(self.authorize(request)).await?.into_inner())
    }

    /// Whether the host stream is still open.
    pub fn is_connected(&self) -> bool {
        !*self.closed.borrow()
    }

    /// Resolves when the daemon ends the host stream (it stopped, or refused something).
    pub async fn closed(&self) {
        let mut closed = self.closed.clone();
        let _ = closed.wait_for(|c| *c).await;
    }

    /// Ends the host stream, as a host process that exits would.
    pub fn disconnect(self) {
        drop(self);
    }
}

/// Reads the daemon's messages and answers its calls. Each handler is polled once inline; only a
/// handler that has to wait gets a task of its own.
async fn drive(
    mut inbound: Streaming<DaemonMessage>,
    tx: mpsc::Sender<HostMessage>,
    handlers: Arc<HashMap<i32, Handler>>,
    closed: watch::Sender<bool>,
    consent: broadcast::Sender<ConsentChanged>,
) {
    let running: Arc<DashMap<u64, AbortHandle>> = Arc::new(DashMap::new());
    // Handlers still working hold the stream's sender: when this driver ends, or is aborted
    // because the client was dropped, they must go too, or the stream would stay open.
    let _abort_running = AbortAll(running.clone());
    loop {
        let message = match inbound.message().await {
            Ok(Some(message)) => message,
            Ok(None) => break,
            Err(status) => {
                debug!(code = ?status.code(), message = status.message(), "host stream ended");
                break;
            }
        };
        match message.msg {
            Some(daemon_message::Msg::Call(call)) => {
                let id = call.call_id;
                let app = call.app.unwrap_or_default();
                let Some(request) = call.request else {
                    answer(&tx, id, client_error("empty call")).await;
                    continue;
                };
                let method = match &request {
                    delegate_call::Request::Api(r) => r.api().map(|a| a.method() as i32).unwrap_or(0),
                    delegate_call::Request::GetAuthCode(_) => DelegateMethod::GetAuthCode as i32,
                    delegate_call::Request::OpenApiVersion(_) => DelegateMethod::OpenApiVersion as i32,
                };
                let Some(handler) = handlers.get(&method) else {
                    answer(&tx, id, client_error("not implemented by this host")).await;
                    continue;
                };
                let mut fut = handler(app, request);
                match futures::poll!(fut.as_mut()) {
                    Poll::Ready(outcome) => answer(&tx, id, outcome).await,
                    Poll::Pending => {
                        let tx = tx.clone();
                        let done = running.clone();
                        // The task removes its entry only once the entry is there, so a handler
                        // that finishes at once cannot leave one behind.
                        let (registered_tx, registered) = tokio::sync::oneshot::channel::<()>();
                        let task = tokio::spawn(async move {
                            let outcome = fut.await;
                            let _ = registered.await;
                            done.remove(&id);
                            answer(&tx, id, outcome).await;
                        });
                        running.insert(id, task.abort_handle());
                        let _ = registered_tx.send(());
                    }
                }
            }
            Some(daemon_message::Msg::Cancel(cancel)) => {
                if let Some((_, task)) = running.remove(&cancel.call_id) {
                    task.abort();
                    debug!(call_id = cancel.call_id, reason = %cancel.reason, "delegate call cancelled by the daemon");
                }
            }
            Some(daemon_message::Msg::Notice(notice)) => {
                warn!(call_id = notice.call_id, message = %notice.message, "daemon refused something this host sent");
            }
            Some(daemon_message::Msg::Consent(changed)) => {
                // Nobody listening is fine.
                let _ = consent.send(changed);
            }
            Some(daemon_message::Msg::Welcome(_)) | None => {}
        }
    }
    let _ = closed.send(true);
}

/// Aborts every running handler task when dropped.
struct AbortAll(Arc<DashMap<u64, AbortHandle>>);

impl Drop for AbortAll {
    fn drop(&mut self) {
        for entry in self.0.iter() {
            entry.value().abort();
        }
    }
}

async fn answer(tx: &mpsc::Sender<HostMessage>, call_id: u64, outcome: Outcome) {
    let result = DelegateResult { call_id, outcome: Some(outcome) };
    let _ = tx.send(HostMessage { msg: Some(host_message::Msg::Result(result)) }).await;
}
