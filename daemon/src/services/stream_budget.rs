//! Health checks and reflection hold renderer streams too. Their requests carry no launch token,
//! and `grpc.health.v1.Health/Watch` and reflection's `ServerReflectionInfo` stay open as long as
//! the peer likes, so each one holds a unit of the daemon's renderer-stream pool
//! (`limits.max_renderer_streams`) until its response ends: counted against the app and instance
//! its connection is attributed to (their caps, and the app's share of what is left, as a
//! `Session` stream is), or, on a connection of no app (the host's, an app backend's, one not yet
//! proven), against one party standing for all of those. Beyond that the request is refused with
//! RESOURCE_EXHAUSTED, as a `Session` stream would be.

use std::{
    sync::Arc,
    task::{Context, Poll},
};

use http_body_util::BodyExt;
use tonic::{
    Status,
    body::Body,
    codegen::{BoxFuture, Service, http},
    server::NamedService,
};
use tracing::debug;

use crate::{
    clock::Clock,
    config::LimitsConfig,
    limits::{Held, KeyedCount, Occupancy, Pool},
    registry::AppInstance,
    transport::ConnInfo,
};

/// The party that connections of no app count as, in the per-app counts. Not a valid app id
/// (`services::check_app_id`), so no app shares it.
const NO_APP: &str = " no app";

/// What a [`Budgeted`] service needs to count its requests.
#[derive(Debug, Clone)]
pub struct StreamBudget {
    per_app: Arc<KeyedCount>,
    streams: Arc<Pool>,
    clock: Arc<dyn Clock>,
    max_per_app: u32,
    max_per_instance: u32,
    no_app: Arc<str>,
}

impl StreamBudget {
    pub fn new(occupancy: &Occupancy, clock: Arc<dyn Clock>, limits: &LimitsConfig) -> Self {
        StreamBudget {
            per_app: occupancy.per_app.clone(),
            streams: occupancy.streams.clone(),
            clock,
            max_per_app: limits.max_renderer_streams_per_app,
            max_per_instance: limits.max_renderer_streams_per_instance,
            no_app: NO_APP.into(),
        }
    }

    /// Wraps `inner` (a health or reflection server) so that each request holds a stream.
    pub fn wrap<S>(&self, inner: S) -> Budgeted<S> {
        Budgeted { inner, budget: self.clone() }
    }

    /// Takes the stream a request on `conn` holds until its response ends.
    fn take(&self, conn: Option<&ConnInfo>) -> Result<StreamHold, Status> {
        let streams = &self.streams;
        let refused = |refused: crate::limits::Refused| {
            debug!(%refused, "health or reflection stream refused");
            Status::resource_exhausted(refused.message())
        };
        match conn.and_then(|c| c.auth.instance()) {
            Some(instance) => {
                let held = instance.open_stream(streams, self.max_per_app, self.max_per_instance).map_err(refused)?;
                Ok(StreamHold { _held: held, instance: Some((instance, self.clock.clone())) })
            }
            None => {
                let held = self.per_app.try_take_shared(&self.no_app, streams, u32::MAX).map_err(refused)?;
                Ok(StreamHold { _held: held, instance: None })
            }
        }
    }
}

/// One request's stream: the pool's unit (and its app's) and, on an attributed connection, the
/// instance's, given back when the response body is dropped.
struct StreamHold {
    _held: Held,
    instance: Option<(Arc<AppInstance>, Arc<dyn Clock>)>,
}

impl Drop for StreamHold {
    fn drop(&mut self) {
        if let Some((instance, clock)) = &self.instance {
            instance.stream_closed(clock.now_ms());
        }
    }
}

/// A service whose requests each hold a renderer stream (see the module docs).
#[derive(Debug, Clone)]
pub struct Budgeted<S> {
    inner: S,
    budget: StreamBudget,
}

impl<S: NamedService> NamedService for Budgeted<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for Budgeted<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let hold = match self.budget.take(request.extensions().get::<ConnInfo>()) {
            Ok(hold) => hold,
            Err(status) => return Box::pin(std::future::ready(Ok(status.into_http()))),
        };
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            // The closure owns the hold: it goes when the body does (answered, reset, or the
            // connection gone).
            Ok(response.map(|body| {
                Body::new(body.map_frame(move |frame| {
                    let _ = &hold;
                    frame
                }))
            }))
        })
    }
}
