//! `OpenApi`: the renderer's surface. Typed unary RPCs, the JSON `Invoke`, and the multiplexed
//! `Session` stream all authenticate by launch token and end in [`Broker::call`] or
//! [`Broker::call_streamed`].

use std::sync::{Arc, atomic::Ordering};

use miniapp_broker_proto::{
    Api,
    api::ApiCall,
    json, metadata,
    v1::{self, open_api_server::OpenApi},
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming, metadata::MetadataMap};
use tracing::{debug, info};

use crate::{broker::Broker, error::ApiError, registry::AppInstance};

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
        match self.broker.call(&instance, request.into_inner().into_request()).await {
            Ok(resp) => T::unwrap_response(resp)
                .map(Response::new)
                .ok_or_else(|| ApiError::HostProtocol("answer of the wrong type".into()).failure(T::API).into_status()),
            Err(e) => Err(e.failure(T::API).into_status()),
        }
    }
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

    async fn invoke(&self, r: Request<v1::InvokeRequest>) -> Unary<v1::InvokeResponse> {
        let instance = self.instance(r.metadata())?;
        let v1::InvokeRequest { api, params_json } = r.into_inner();
        let outcome = match Api::from_name(&api) {
            None => Err((sanitize(&api), ApiError::UnknownApi(sanitize(&api)))),
            Some(api) => match json::request_from_json(api, &params_json) {
                Err(e) => Err((api.name().to_owned(), ApiError::InvalidParams(e.to_string()))),
                Ok(request) => self.broker.call(&instance, request).await.map_err(|e| (api.name().to_owned(), e)),
            },
        };
        Ok(Response::new(match outcome {
            Ok(resp) => v1::InvokeResponse {
                ok: true,
                result_json: json::response_to_json(&resp).to_string(),
                failure: None,
            },
            Err((name, e)) => {
                let failure = e.to_failure(&name);
                v1::InvokeResponse { ok: false, result_json: json::failure_to_json(&failure).to_string(), failure: Some(failure) }
            }
        }))
    }

    type SessionStream = ReceiverStream<Result<v1::RendererReply, Status>>;

    async fn session(&self, r: Request<Streaming<v1::RendererCall>>) -> Unary<Self::SessionStream> {
        let instance = self.instance(r.metadata())?;
        let broker = self.broker.clone();
        let open = broker.stats.renderer_streams.fetch_add(1, Ordering::AcqRel);
        let guard = StreamCount(broker.clone());
        if open >= broker.config.limits.max_renderer_streams {
            return Err(Status::resource_exhausted(format!(
                "more than {} renderer streams open",
                broker.config.limits.max_renderer_streams
            )));
        }
        let stream_id = broker.stats.next_stream.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = mpsc::channel(STREAM_REPLY_CAPACITY);
        let mut inbound = r.into_inner();
        debug!(app_id = %instance.app_id, instance = %instance.instance_id, stream = stream_id, "renderer stream opened");
        tokio::spawn(async move {
            let _guard = guard;
            let end = loop {
                let message = tokio::select! {
                    m = inbound.message() => m,
                    _ = instance.closed() => break Some(Status::unauthenticated("app instance closed")),
                    _ = broker.shutdown.cancelled() => break Some(Status::unavailable("daemon shutting down")),
                };
                let call = match message {
                    Ok(Some(call)) => call,
                    Ok(None) => break None,
                    Err(status) => {
                        debug!(stream = stream_id, code = ?status.code(), "renderer stream error");
                        break None;
                    }
                };
                let Ok(permit) = tx.clone().reserve_owned().await else { break None };
                broker.call_streamed(&instance, call, permit, stream_id).await;
            };
            let cancelled = broker.host.cancel_stream(stream_id);
            if let Some(status) = end {
                let _ = tx.send(Err(status)).await;
            }
            if cancelled > 0 {
                info!(app_id = %instance.app_id, stream = stream_id, cancelled, "renderer went away; its host calls were cancelled");
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Keeps the open-renderer-streams count honest however a stream ends.
struct StreamCount(Arc<Broker>);

impl Drop for StreamCount {
    fn drop(&mut self) {
        self.0.stats.renderer_streams.fetch_sub(1, Ordering::AcqRel);
    }
}
