//! The renderer side: a mini app process calling the open APIs of its own app instance.
//!
//! ```no_run
//! # async fn demo(socket: &str, launch_token: &str) -> Result<(), Box<dyn std::error::Error>> {
//! use miniapp_broker_client::RendererClient;
//! use miniapp_broker_client::proto::v1::LoginRequest;
//!
//! let renderer = RendererClient::connect(socket, launch_token).await?;
//! let login = renderer.call(LoginRequest::default()).await?;
//! println!("{} {}", login.err_msg, login.code); // "login:ok" and a one-time code
//! # Ok(()) }
//! ```

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use dashmap::DashMap;
use miniapp_broker_proto::{
    Api,
    api::ApiCall,
    metadata,
    v1::{
        self, ApiFailure, ApiRequest, ApiResponse, InvokeRequest, RendererCall, RendererReply, api_request,
        open_api_client::OpenApiClient, renderer_reply,
    },
};
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Code, Request, Streaming,
    metadata::{Ascii, MetadataValue},
    transport::Channel,
};
use tracing::debug;

use crate::connect::{self, Backoff};

/// How long a call keeps retrying while the daemon is unreachable (it restarts, say).
const RECONNECT_BUDGET: Duration = Duration::from_secs(10);

/// The failure reason the client uses when the daemon could not be reached at all.
pub const TRANSPORT_REASON: &str = "transport";

/// A connection to the daemon for one app instance. Cheap to clone; clones share the stream.
#[derive(Clone)]
pub struct RendererClient {
    inner: Arc<Inner>,
}

struct Inner {
    client: OpenApiClient<Channel>,
    token: MetadataValue<Ascii>,
    mux: Mutex<Option<Arc<Mux>>>,
    next_id: AtomicU64,
}

/// One open `OpenApi.Session` stream and the calls waiting on it.
struct Mux {
    tx: mpsc::Sender<RendererCall>,
    pending: DashMap<u64, oneshot::Sender<Result<ApiResponse, ApiFailure>>>,
    alive: AtomicBool,
    /// The task reading replies. It holds the stream (and, through `Mux`, its sender) open, so
    /// dropping the client aborts it: the daemon then sees the renderer go away.
    reader: std::sync::OnceLock<tokio::task::AbortHandle>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(reader) = self.mux.get_mut().take().as_ref().and_then(|mux| mux.reader.get()) {
            reader.abort();
        }
    }
}

impl std::fmt::Debug for RendererClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RendererClient").finish_non_exhaustive()
    }
}

/// A failure made by the client itself, when no answer came from the daemon.
fn transport_failure(api: &str, code: Code, message: &str) -> ApiFailure {
    ApiFailure {
        err_msg: format!("{api}:fail {message}"),
        errno: 1005,
        grpc_code: code as i32,
        reason: TRANSPORT_REASON.to_owned(),
        host_error: None,
    }
}

fn is_transport(f: &ApiFailure) -> bool {
    f.reason == TRANSPORT_REASON
}

impl RendererClient {
    /// Connects to the daemon at `address` (a socket path, or a pipe name on Windows) as the app
    /// instance `launch_token` names. The token is checked on the first call.
    pub async fn connect(address: &str, launch_token: &str) -> Result<RendererClient, tonic::transport::Error> {
        let channel = connect::channel(address).await?;
        Ok(Self::with_channel(channel, launch_token))
    }

    /// Like [`connect`](Self::connect), but connects on first use, so it can be made before the
    /// daemon is up.
    pub fn connect_lazy(address: &str, launch_token: &str) -> RendererClient {
        Self::with_channel(connect::channel_lazy(address), launch_token)
    }

    fn with_channel(channel: Channel, launch_token: &str) -> RendererClient {
        let mut token = MetadataValue::try_from(launch_token).unwrap_or_else(|_| MetadataValue::from_static("invalid"));
        // Never indexed by HPACK: the token is a secret, and the daemon keeps no copy of it in its
        // per-connection header table.
        token.set_sensitive(true);
        let client = OpenApiClient::new(channel).max_decoding_message_size(16 << 20);
        RendererClient { inner: Arc::new(Inner { client, token, mux: Mutex::new(None), next_id: AtomicU64::new(1) }) }
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        request.metadata_mut().insert(metadata::LAUNCH_TOKEN, self.inner.token.clone());
        request
    }

    /// Calls an open API over the multiplexed stream, the default way.
    ///
    /// Payments get an idempotency key here if they carry none, and keep it across the retries
    /// this client makes while the daemon is unreachable, so a payment never happens twice.
    pub async fn call<T: ApiCall>(&self, request: T) -> Result<T::Response, ApiFailure> {
        let response = self.call_request(request.into_request()).await?;
        T::unwrap_response(response)
            .ok_or_else(|| transport_failure(T::API.name(), Code::Internal, "answer of the wrong type"))
    }

    /// Calls with an already built [`ApiRequest`] over the stream. A payment without an
    /// idempotency key gets a fresh one here, kept across this call's own reconnect retries.
    pub async fn call_request(&self, request: ApiRequest) -> Result<ApiResponse, ApiFailure> {
        let request = with_payment_key(request);
        let api = request.api().map(Api::name).unwrap_or("unknown");
        let mut backoff = Backoff::default();
        let deadline = tokio::time::Instant::now() + RECONNECT_BUDGET;
        loop {
            match self.stream_call(api, request.clone()).await {
                Err(f) if is_transport(&f) && tokio::time::Instant::now() < deadline => {
                    debug!(api, error = %f.err_msg, "daemon unreachable; retrying");
                    backoff.wait().await;
                }
                other => return other,
            }
        }
    }

    async fn stream_call(&self, api: &str, request: ApiRequest) -> Result<ApiResponse, ApiFailure> {
        let mux = self.mux(api).await?;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        mux.pending.insert(id, tx);
        // Armed from here: a caller that gives up while the send waits leaves no entry behind.
        let mut guard = Forget { mux: &mux, id, armed: true };
        // The reader marks the stream dead before draining: either it drains this entry or we
        // see the mark.
        if !mux.alive.load(Ordering::SeqCst) {
            return Err(transport_failure(api, Code::Unavailable, "stream closed"));
        }
        if mux.tx.send(RendererCall { id, request: Some(request) }).await.is_err() {
            return Err(transport_failure(api, Code::Unavailable, "stream closed"));
        }
        let outcome = rx.await.unwrap_or_else(|_| Err(transport_failure(api, Code::Unavailable, "stream closed")));
        guard.armed = false;
        outcome
    }

    /// The open stream, opening one if there is none (or the last one died).
    async fn mux(&self, api: &str) -> Result<Arc<Mux>, ApiFailure> {
        let mut slot = self.inner.mux.lock().await;
        if let Some(mux) = slot.as_ref().filter(|m| m.alive.load(Ordering::SeqCst)) {
            return Ok(mux.clone());
        }
        let (tx, rx) = mpsc::channel(1024);
        let mut client = self.inner.client.clone();
        let replies = client
            .session(self.request(ReceiverStream::new(rx)))
            .await
            .map_err(|s| status_failure(api, &s))?
            .into_inner();
        let mux =
            Arc::new(Mux { tx, pending: DashMap::new(), alive: AtomicBool::new(true), reader: Default::default() });
        let reader = tokio::spawn(read_replies(mux.clone(), replies));
        let _ = mux.reader.set(reader.abort_handle());
        *slot = Some(mux.clone());
        Ok(mux)
    }

    /// Calls an open API through its plain unary RPC.
    pub async fn call_unary<T: ApiCall>(&self, request: T) -> Result<T::Response, ApiFailure> {
        let api = T::API.name();
        let request = with_payment_key(request.into_request());
        let mut backoff = Backoff::default();
        let deadline = tokio::time::Instant::now() + RECONNECT_BUDGET;
        loop {
            match self.unary_once(request.clone()).await {
                Err(f) if is_transport(&f) && tokio::time::Instant::now() < deadline => backoff.wait().await,
                other => {
                    return other.and_then(|r| {
                        T::unwrap_response(r)
                            .ok_or_else(|| transport_failure(api, Code::Internal, "answer of the wrong type"))
                    });
                }
            }
        }
    }

    async fn unary_once(&self, request: ApiRequest) -> Result<ApiResponse, ApiFailure> {
        use api_request::Api as R;
        let mut c = self.inner.client.clone();
        let api = request.api().map(Api::name).unwrap_or("unknown");
        macro_rules! unary {
            ($method:ident, $req:ident, $r:expr) => {
                c.$method(self.request($r)).await.map(|resp| v1::$req::wrap_response(resp.into_inner()))
            };
        }
        let result = match request.api {
            Some(R::Login(r)) => unary!(login, LoginRequest, r),
            Some(R::CheckSession(r)) => unary!(check_session, CheckSessionRequest, r),
            Some(R::GetPhoneNumber(r)) => unary!(get_phone_number, GetPhoneNumberRequest, r),
            Some(R::GetEmail(r)) => unary!(get_email, GetEmailRequest, r),
            Some(R::ChooseAvatar(r)) => unary!(choose_avatar, ChooseAvatarRequest, r),
            Some(R::GetNickName(r)) => unary!(get_nick_name, GetNickNameRequest, r),
            Some(R::GetUserInfo(r)) => unary!(get_user_info, GetUserInfoRequest, r),
            Some(R::GetUserProfile(r)) => unary!(get_user_profile, GetUserProfileRequest, r),
            Some(R::RequestPayment(r)) => unary!(request_payment, RequestPaymentRequest, r),
            Some(R::RequestMidasPaymentGameItem(r)) => {
                unary!(request_midas_payment_game_item, RequestMidasPaymentGameItemRequest, r)
            }
            Some(R::GetSetting(r)) => unary!(get_setting, GetSettingRequest, r),
            Some(R::Authorize(r)) => unary!(authorize, AuthorizeRequest, r),
            Some(R::OpenSetting(r)) => unary!(open_setting, OpenSettingRequest, r),
            None => return Err(transport_failure(api, Code::InvalidArgument, "the request names no API")),
        };
        result.map_err(|s| status_failure(api, &s))
    }

    /// The JSON bridge: calls `api` ("login", "requestPayment", ...) with the params object a
    /// mini program passed, and returns the object for its `success` callback (`Ok`) or its
    /// `fail` callback (`Err`), both with `errMsg`.
    pub async fn invoke_json(
        &self,
        api: &str,
        params: &serde_json::Value,
    ) -> Result<serde_json::Value, serde_json::Value> {
        let mut c = self.inner.client.clone();
        let request = InvokeRequest { api: api.to_owned(), params_json: params.to_string() };
        match c.invoke(self.request(request)).await {
            Ok(resp) => {
                let resp = resp.into_inner();
                let value = serde_json::from_str(&resp.result_json).unwrap_or(serde_json::Value::Null);
                if resp.ok { Ok(value) } else { Err(value) }
            }
            Err(status) => Err(serde_json::json!({
                "errMsg": format!("{api}:fail {}", status.message()),
                "errno": 1005,
            })),
        }
    }

    /// Closes the stream; pending calls fail and the daemon cancels them on the host.
    pub async fn close(&self) {
        let Some(mux) = self.inner.mux.lock().await.take() else { return };
        // The reader holds the stream's sender (through `mux`), and so do the calls waiting on it:
        // stop the reader and fail the waiting calls (not as a transport failure, which the
        // caller would retry on a new stream), so the last sender goes and the stream ends.
        mux.alive.store(false, Ordering::SeqCst);
        if let Some(reader) = mux.reader.get() {
            reader.abort();
        }
        let ids: Vec<u64> = mux.pending.iter().map(|e| *e.key()).collect();
        for id in ids {
            if let Some((_, waiter)) = mux.pending.remove(&id) {
                let _ = waiter.send(Err(ApiFailure {
                    err_msg: "unknown:fail call cancelled: the renderer closed its stream".into(),
                    errno: 1007,
                    grpc_code: Code::Cancelled as i32,
                    reason: "cancelled".into(),
                    host_error: None,
                }));
            }
        }
    }
}

/// A fresh idempotency key for a payment, as the client library makes one per logical payment.
pub fn new_payment_key() -> String {
    let bytes: [u8; 16] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn with_payment_key(mut request: ApiRequest) -> ApiRequest {
    match request.api.as_mut() {
        Some(api_request::Api::RequestPayment(r)) if r.idempotency_key.is_empty() => {
            r.idempotency_key = new_payment_key()
        }
        Some(api_request::Api::RequestMidasPaymentGameItem(r)) if r.idempotency_key.is_empty() => {
            r.idempotency_key = new_payment_key()
        }
        _ => {}
    }
    request
}

/// The failure a status stands for: the daemon's own ApiFailure when it sent one, else a
/// transport failure (the daemon was not reached, or refused the caller outright).
fn status_failure(api: &str, status: &tonic::Status) -> ApiFailure {
    let failure = ApiFailure::from_status(status);
    if !status.details().is_empty() && !failure.reason.is_empty() && failure.err_msg.contains(":fail") {
        return failure;
    }
    match status.code() {
        Code::Unavailable | Code::Unknown | Code::Cancelled => transport_failure(api, status.code(), status.message()),
        code => ApiFailure {
            err_msg: format!("{api}:fail {}", status.message()),
            errno: 1005,
            grpc_code: code as i32,
            reason: format!("{code:?}"),
            host_error: None,
        },
    }
}

async fn read_replies(mux: Arc<Mux>, mut replies: Streaming<RendererReply>) {
    let end = loop {
        match replies.message().await {
            Ok(Some(reply)) => {
                if let Some((_, waiter)) = mux.pending.remove(&reply.id) {
                    let outcome = match reply.outcome {
                        Some(renderer_reply::Outcome::Ok(resp)) => Ok(resp),
                        Some(renderer_reply::Outcome::Failure(f)) => Err(f),
                        None => Err(transport_failure("unknown", Code::Internal, "empty reply")),
                    };
                    let _ = waiter.send(outcome);
                }
            }
            Ok(None) => break (Code::Unavailable, "stream closed by the daemon".to_owned()),
            Err(status) => break (status.code(), status.message().to_owned()),
        }
    };
    mux.alive.store(false, Ordering::SeqCst);
    let ids: Vec<u64> = mux.pending.iter().map(|e| *e.key()).collect();
    for id in ids {
        if let Some((_, waiter)) = mux.pending.remove(&id) {
            let failure = match end.0 {
                // The app instance was closed or its token is bad: final, not worth a retry.
                Code::Unauthenticated => ApiFailure {
                    err_msg: format!("unknown:fail {}", end.1),
                    errno: 1007,
                    grpc_code: end.0 as i32,
                    reason: "unauthenticated".into(),
                    host_error: None,
                },
                // The daemon refused what this stream sent (a message over its size limit): final,
                // a retry would send the same thing again.
                code @ (Code::OutOfRange | Code::ResourceExhausted | Code::InvalidArgument) => ApiFailure {
                    err_msg: format!("unknown:fail {}", end.1),
                    errno: 1005,
                    grpc_code: code as i32,
                    reason: format!("{code:?}"),
                    host_error: None,
                },
                code => transport_failure("unknown", code, &end.1),
            };
            let _ = waiter.send(Err(failure));
        }
    }
}

/// Drops a waiting entry if the caller gives up (the stream tells the daemon nothing per call;
/// closing the stream cancels everything).
struct Forget<'a> {
    mux: &'a Mux,
    id: u64,
    armed: bool,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.mux.pending.remove(&self.id);
        }
    }
}
