//! `OpenApi`: the renderer's surface. Typed unary RPCs, the JSON `Invoke`, and the multiplexed
//! `Session` stream all authenticate by launch token and end in [`Broker::call`] or
//! [`Broker::call_streamed`].

use std::{
    convert::Infallible,
    pin::Pin,
    sync::{Arc, atomic::Ordering},
    task::{Context, Poll},
};

use miniapp_broker_proto::{
    Api,
    api::ApiCall,
    json, metadata,
    v1::{
        self,
        open_api_server::{OpenApi, OpenApiServer},
    },
};
use tokio_util::sync::WaitForCancellationFuture;
use tonic::{
    Request, Response, Status, Streaming,
    codec::{BufferSettings, Codec},
    codegen::{Body, BoxFuture, Service, StdError, http},
    metadata::MetadataMap,
    server::NamedService,
};
use tonic_prost::{ProstDecoder, ProstEncoder};
use tracing::{debug, info};

use crate::{
    broker::Broker,
    error::ApiError,
    host_link::{RendererGone, ReplyPermit, ReplySender, ReplyStream, reply_queue},
    registry::AppInstance,
};

/// How many answers a renderer stream may have queued before the daemon stops reading its calls.
const STREAM_REPLY_CAPACITY: usize = 256;

/// The `OpenApi` service.
#[derive(Debug, Clone)]
pub struct OpenApiService {
    broker: Arc<Broker>,
}

impl OpenApiService {
    pub fn new(broker: Arc<Broker>) -> Self {
        OpenApiService { broker }
    }

    fn instance(&self, md: &MetadataMap) -> Result<Arc<AppInstance>, Status> {
        let token = md.get(metadata::LAUNCH_TOKEN).and_then(|v| v.to_str().ok());
        self.broker.registry.authenticate(token).map_err(|e| Status::unauthenticated(e.to_string()))
    }

    async fn unary<T: ApiCall>(&self, request: Request<T>) -> Result<Response<T::Response>, Status> {
        let instance = self.instance(request.metadata())?;
        let deadline = call_deadline(request.metadata());
        let call = self.broker.call(&instance, request.into_inner().into_request());
        match crate::deadline::with_deadline(deadline, call).await {
            Ok(resp) => T::unwrap_response(resp)
                .map(Response::new)
                .ok_or_else(|| ApiError::HostProtocol("answer of the wrong type".into()).failure(T::API).into_status()),
            Err(e) => Err(e.failure(T::API).into_status()),
        }
    }
}

/// What `Invoke` makes of a renderer's API name and params text before anything else happens: the
/// API and its request, or the name its errMsg uses and why it is refused. (The fuzz target
/// `invoke` drives it with arbitrary bytes.)
pub fn parse_invoke(api: &str, params_json: &str) -> Result<(Api, v1::ApiRequest), (String, ApiError)> {
    match Api::from_name(api) {
        None => Err((sanitize(api), ApiError::UnknownApi(sanitize(api)))),
        Some(api) => match json::request_from_json(api, params_json) {
            Err(e) => Err((api.name().to_owned(), ApiError::InvalidParams(e.to_string()))),
            Ok(request) => Ok((api, request)),
        },
    }
}

/// `Invoke`'s answer: the response as WeChat-style JSON, or the failure of the API `name`d.
pub fn invoke_response(outcome: Result<v1::ApiResponse, (String, ApiError)>) -> v1::InvokeResponse {
    match outcome {
        Ok(resp) => v1::InvokeResponse { ok: true, result_json: json::response_to_json_text(&resp), failure: None },
        Err((name, e)) => {
            let failure = e.to_failure(&name);
            v1::InvokeResponse {
                ok: false,
                result_json: json::failure_to_json(&failure).to_string(),
                failure: Some(failure),
            }
        }
    }
}

/// When the renderer stops waiting for this call (its `grpc-timeout`), less a margin so that the
/// daemon's own answer arrives first: the deadline of the platform calls it makes (remote mode).
fn call_deadline(md: &MetadataMap) -> Option<tokio::time::Instant> {
    let value = md.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    let timeout = match unit {
        "H" => std::time::Duration::from_secs(n.saturating_mul(3600)),
        "M" => std::time::Duration::from_secs(n.saturating_mul(60)),
        "S" => std::time::Duration::from_secs(n),
        "m" => std::time::Duration::from_millis(n),
        "u" => std::time::Duration::from_micros(n),
        "n" => std::time::Duration::from_nanos(n),
        _ => return None,
    };
    let margin = (timeout / 10).min(std::time::Duration::from_millis(100));
    Some(tokio::time::Instant::now() + timeout.saturating_sub(margin))
}

/// An unknown API name as it may appear in an errMsg: printable, short.
fn sanitize(name: &str) -> String {
    let clean: String = name.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == '_').take(64).collect();
    if clean.is_empty() { "unknown".to_owned() } else { clean }
}

type Unary<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl OpenApi for OpenApiService {
    async fn login(&self, r: Request<v1::LoginRequest>) -> Unary<v1::LoginResponse> {
        self.unary(r).await
    }
    async fn check_session(&self, r: Request<v1::CheckSessionRequest>) -> Unary<v1::CheckSessionResponse> {
        self.unary(r).await
    }
    async fn get_phone_number(&self, r: Request<v1::GetPhoneNumberRequest>) -> Unary<v1::GetPhoneNumberResponse> {
        self.unary(r).await
    }
    async fn get_email(&self, r: Request<v1::GetEmailRequest>) -> Unary<v1::GetEmailResponse> {
        self.unary(r).await
    }
    async fn choose_avatar(&self, r: Request<v1::ChooseAvatarRequest>) -> Unary<v1::ChooseAvatarResponse> {
        self.unary(r).await
    }
    async fn get_nick_name(&self, r: Request<v1::GetNickNameRequest>) -> Unary<v1::GetNickNameResponse> {
        self.unary(r).await
    }
    async fn get_user_info(&self, r: Request<v1::GetUserInfoRequest>) -> Unary<v1::GetUserInfoResponse> {
        self.unary(r).await
    }
    async fn get_user_profile(&self, r: Request<v1::GetUserProfileRequest>) -> Unary<v1::GetUserProfileResponse> {
        self.unary(r).await
    }
    async fn request_payment(&self, r: Request<v1::RequestPaymentRequest>) -> Unary<v1::RequestPaymentResponse> {
        self.unary(r).await
    }
    async fn request_midas_payment_game_item(
        &self,
        r: Request<v1::RequestMidasPaymentGameItemRequest>,
    ) -> Unary<v1::RequestMidasPaymentGameItemResponse> {
        self.unary(r).await
    }
    async fn get_setting(&self, r: Request<v1::GetSettingRequest>) -> Unary<v1::GetSettingResponse> {
        self.unary(r).await
    }
    async fn authorize(&self, r: Request<v1::AuthorizeRequest>) -> Unary<v1::AuthorizeResponse> {
        self.unary(r).await
    }
    async fn open_setting(&self, r: Request<v1::OpenSettingRequest>) -> Unary<v1::OpenSettingResponse> {
        // What a renderer puts in the request is the daemon's to fill in.
        let (metadata, extensions, _) = r.into_parts();
        self.unary(Request::from_parts(metadata, extensions, v1::OpenSettingRequest::default())).await
    }

    async fn invoke(&self, r: Request<v1::InvokeRequest>) -> Unary<v1::InvokeResponse> {
        let instance = self.instance(r.metadata())?;
        let deadline = call_deadline(r.metadata());
        let v1::InvokeRequest { api, params_json } = r.into_inner();
        let outcome = match parse_invoke(&api, &params_json) {
            Err(refused) => Err(refused),
            Ok((api, request)) => crate::deadline::with_deadline(deadline, self.broker.call(&instance, request))
                .await
                .map_err(|e| (api.name().to_owned(), e)),
        };
        Ok(Response::new(invoke_response(outcome)))
    }

    type SessionStream = ReplyStream;

    async fn session(&self, r: Request<Streaming<v1::RendererCall>>) -> Unary<Self::SessionStream> {
        let instance = self.instance(r.metadata())?;
        let broker = self.broker.clone();
        // The daemon's pool, within the app's share of what is left and its cap, and the
        // instance's cap.
        let limits = &broker.config.limits;
        let app_stream = instance
            .open_stream(
                &broker.occupancy.streams,
                limits.max_renderer_streams_per_app,
                limits.max_renderer_streams_per_instance,
            )
            .map_err(|refused| Status::resource_exhausted(refused.message()))?;
        let instance_stream = InstanceStream { instance: instance.clone(), broker: broker.clone(), _app: app_stream };
        let stream_id = broker.stats.next_stream.fetch_add(1, Ordering::Relaxed) + 1;
        // `gone` is set when the response body goes (a reset, the connection's end, or the last
        // answer sent): the one signal that the renderer is gone. The end of its request side is not.
        let (tx, rx, gone) = reply_queue(STREAM_REPLY_CAPACITY);
        let mut inbound = r.into_inner();
        debug!(app_id = %instance.app_id, instance = %instance.instance_id, stream = stream_id, "renderer stream opened");
        tokio::spawn(async move {
            // Used in place: moving a captured value into a local would store it twice.
            let _instance_stream = &instance_stream;
            // Made once, not per call: each registers a waiter when first polled. This task lives as
            // long as its renderer's stream, idle most of the time: what it keeps while it waits
            // for the next call is what every connected renderer costs (docs/benchmarks.md).
            let mut closed = std::pin::pin!(instance.closed());
            let mut stopping = std::pin::pin!(broker.shutdown.cancelled());
            let end = loop {
                // Room for the answer first, then the call: a call is never held while the
                // renderer's replies are backed up, and the stream's final status has its room.
                // A renderer that stops reading its replies must not keep a closed instance's (or a
                // stopping daemon's) stream alive: nobody reads a final status then, so none is sent.
                let reserved = match tx.try_reserve() {
                    Ok(Some(permit)) => Ok(permit),
                    Ok(None) => {
                        // Only a stream whose replies back up waits here, on the heap.
                        let room = Box::pin(tx.reserve());
                        tokio::select! {
                            biased;
                            permit = room => permit,
                            _ = &mut closed => break StreamEnd::Abandoned,
                            _ = &mut stopping => break StreamEnd::Abandoned,
                        }
                    }
                    Err(queue_closed) => Err(queue_closed),
                };
                let Ok(permit) = reserved else { break StreamEnd::Abandoned };
                // Biased: a call read after the instance closed (or the daemon began stopping)
                // must not be served.
                let message = tokio::select! {
                    biased;
                    _ = &mut closed => break StreamEnd::Closed(permit),
                    _ = &mut stopping => break StreamEnd::Status(Box::new(Status::unavailable("daemon shutting down")), permit),
                    m = inbound.message() => m,
                };
                let call = match message {
                    Ok(Some(call)) => call,
                    // The renderer sent its last call and half-closed: its answers still come.
                    Ok(None) => break StreamEnd::HalfClosed,
                    Err(status) => {
                        // A message the daemon refused to read (larger than limits.max_message_bytes,
                        // undecodable) ends the stream with that status, so the renderer learns why
                        // instead of seeing a silent close; after a broken connection nobody reads it.
                        debug!(stream = stream_id, code = ?status.code(), "renderer stream error");
                        break StreamEnd::Status(Box::new(status), permit);
                    }
                };
                if let Some(rest) = broker.call_streamed(&instance, call, permit, stream_id, &gone) {
                    // Only a call waiting for a host (within the grace period) waits here; it ends
                    // by itself when its app closes. (`rest` is on the heap already.)
                    let renderer_gone = gone.wait();
                    let waited = async {
                        tokio::select! {
                            biased;
                            _ = &mut stopping => false,
                            _ = renderer_gone => false,
                            _ = rest => true,
                        }
                    };
                    if !Box::pin(waited).await {
                        break StreamEnd::Abandoned;
                    }
                }
            };
            // On the heap too: the end's waits would otherwise size the task for its whole life.
            Box::pin(end.finish(tx, closed, stopping, &gone)).await;
            // Whatever is still pending now has nobody to answer to.
            gone.set();
            let cancelled = broker.host.cancel_stream(stream_id);
            if cancelled > 0 {
                info!(app_id = %instance.app_id, stream = stream_id, cancelled, "renderer went away; its host calls were cancelled");
            }
        });
        Ok(Response::new(rx))
    }
}

/// The `OpenApi` service as the daemon serves it: the generated server, except that the `Session`
/// stream is served with small codec buffers. The generated code gives every stream an 8 KiB
/// encode and an 8 KiB decode buffer for its whole life; an idle renderer stream holds them while
/// it waits, and renderer calls and replies are a few hundred bytes. The buffers grow when a larger
/// message comes, so nothing else changes: same limits, no compression, same errors.
#[derive(Debug, Clone)]
pub struct OpenApiRoutes {
    generated: OpenApiServer<OpenApiService>,
    service: Arc<OpenApiService>,
    max_message_bytes: usize,
}

const SESSION_PATH: &str = "/miniapp.broker.v1.OpenApi/Session";

/// Initial size of a Session stream's encode and decode buffers.
const SESSION_BUFFER_BYTES: usize = 128;
/// tonic's default: how much encoded data a stream buffers before it yields to the connection.
const SESSION_YIELD_BYTES: usize = 32 * 1024;

impl OpenApiRoutes {
    pub fn new(broker: Arc<Broker>, max_message_bytes: usize) -> Self {
        let service = Arc::new(OpenApiService::new(broker));
        let generated = OpenApiServer::from_arc(service.clone())
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes);
        OpenApiRoutes { generated, service, max_message_bytes }
    }
}

impl NamedService for OpenApiRoutes {
    const NAME: &'static str = <OpenApiServer<OpenApiService> as NamedService>::NAME;
}

impl<B> Service<http::Request<B>> for OpenApiRoutes
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() != SESSION_PATH {
            return self.generated.call(request);
        }
        let method = SessionMethod(self.service.clone());
        let limit = Some(self.max_message_bytes);
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(SessionCodec).apply_max_message_size_config(limit, limit);
            Ok(grpc.streaming(method, request).await)
        })
    }
}

struct SessionMethod(Arc<OpenApiService>);

impl tonic::server::StreamingService<v1::RendererCall> for SessionMethod {
    type Response = v1::RendererReply;
    type ResponseStream = <OpenApiService as OpenApi>::SessionStream;
    type Future = BoxFuture<Response<Self::ResponseStream>, Status>;

    fn call(&mut self, request: Request<Streaming<v1::RendererCall>>) -> Self::Future {
        let service = self.0.clone();
        Box::pin(async move { service.session(request).await })
    }
}

/// The generated code's protobuf codec (tonic-prost), with small buffers for the Session stream.
#[derive(Debug, Clone, Copy, Default)]
struct SessionCodec;

impl Codec for SessionCodec {
    type Encode = v1::RendererReply;
    type Decode = v1::RendererCall;
    type Encoder = ProstEncoder<v1::RendererReply>;
    type Decoder = ProstDecoder<v1::RendererCall>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::new(SESSION_BUFFER_BYTES, SESSION_YIELD_BYTES))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(BufferSettings::new(SESSION_BUFFER_BYTES, SESSION_YIELD_BYTES))
    }
}

/// How a renderer stream's reading loop ended.
enum StreamEnd {
    /// The renderer closed its request side; its pending calls are still answered.
    HalfClosed,
    /// The stream ends with this status (sent in the room reserved for it).
    Status(Box<Status>, ReplyPermit),
    /// The app instance closed: pending calls are answered first, then the stream ends.
    Closed(ReplyPermit),
    /// Nobody will read a final status (the renderer stopped reading, the app closed while it
    /// did, the daemon stopped, or the renderer is gone).
    Abandoned,
}

impl StreamEnd {
    /// Ends the stream as its reading loop ended: waits for what must still go out, until the
    /// renderer goes (`gone`), its app closes or the daemon stops.
    async fn finish(
        self,
        tx: ReplySender,
        closed: Pin<&mut impl Future<Output = ()>>,
        stopping: Pin<&mut WaitForCancellationFuture<'_>>,
        gone: &RendererGone,
    ) {
        match self {
            StreamEnd::HalfClosed => {
                // Once the sender goes, the stream ends after the last pending answer; until then
                // the calls run on. Only the renderer going (or its app, or the daemon) ends them.
                drop(tx);
                tokio::select! {
                    _ = gone.wait() => {}
                    _ = closed => {}
                    _ = stopping => {}
                }
            }
            StreamEnd::Status(status, permit) => permit.send(Err(*status)),
            StreamEnd::Closed(permit) => {
                // Closing the app ends every pending call at once (a payment the host may have
                // seen with "outcome unknown"): those answers go out, then the final status.
                drop(tx);
                tokio::select! {
                    _ = permit.wait_until_last() => permit.send(Err(Status::unauthenticated("app instance closed"))),
                    _ = gone.wait() => {}
                    _ = stopping => {}
                }
            }
            StreamEnd::Abandoned => {}
        }
    }
}

/// Holds a renderer stream's place in the daemon's, its app's and its instance's stream counts,
/// and marks when
/// the instance was last used, however the stream ends.
struct InstanceStream {
    instance: Arc<AppInstance>,
    broker: Arc<Broker>,
    _app: crate::limits::Held,
}

impl Drop for InstanceStream {
    fn drop(&mut self) {
        self.instance.stream_closed(self.broker.clock.now_ms());
    }
}
