//! The connection gate, in front of every service: the first request on a connection that
//! presents a valid launch token or host token proves the connection (the transport closes a
//! connection that proves nothing within `limits.auth_timeout_ms`). A launch token also attributes
//! the connection to its app and instance, within `limits.max_connections_per_app` and
//! `max_connections_per_instance` and the app's share of what is left of `max_connections`, so
//! one app cannot hold every connection. A valid host token comes first: a request that carries it
//! proves the connection as the host's, unattributed, whatever launch token it also carries (the
//! host may do anything a renderer may). Requests with an invalid token pass on to their service,
//! which refuses them with its own message; Exchange proves its connection itself, once an app
//! secret checks out ([`prove_backend`]).

use std::{
    future::{Ready, ready},
    sync::Arc,
    task::{Context, Poll},
};

use futures::future::Either;
use miniapp_broker_proto::metadata;
use tonic::{
    Status,
    codegen::{Service, http},
};
use tracing::debug;

use crate::{
    broker::Broker,
    transport::{ConnAuth, ConnInfo},
};

/// Puts a [`Gate`] in front of a service.
#[derive(Debug, Clone)]
pub struct GateLayer {
    broker: Arc<Broker>,
}

impl GateLayer {
    pub fn new(broker: Arc<Broker>) -> Self {
        GateLayer { broker }
    }
}

impl<S> tower::Layer<S> for GateLayer {
    type Service = Gate<S>;
    fn layer(&self, inner: S) -> Gate<S> {
        Gate { inner, broker: self.broker.clone() }
    }
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct Gate<S> {
    inner: S,
    broker: Arc<Broker>,
}

impl<S, B> Service<http::Request<B>> for Gate<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<S::Future, Ready<Result<S::Response, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if let Some(conn) = request.extensions().get::<ConnInfo>()
            && !conn.auth.is_proven()
            && let Err(status) = prove(&self.broker, &conn.auth, request.headers())
        {
            return Either::Right(ready(Ok(status.into_http())));
        }
        Either::Left(self.inner.call(request))
    }
}

/// Proves `auth`'s connection if `headers` carry a valid token (the host token first); refuses
/// the request when its app or instance already holds all the connections it may.
fn prove(broker: &Broker, auth: &ConnAuth, headers: &http::HeaderMap) -> Result<(), Status> {
    if let Some(value) = headers.get(metadata::AUTHORIZATION).and_then(|v| v.to_str().ok())
        && broker.host_token.verify(value)
    {
        auth.prove(None);
        return Ok(());
    }
    let Some(token) = headers.get(metadata::LAUNCH_TOKEN).and_then(|v| v.to_str().ok()) else { return Ok(()) };
    let Ok(instance) = broker.registry.authenticate(Some(token)) else { return Ok(()) };
    let limits = &broker.config.limits;
    let (max_app, max_instance) = (limits.max_connections_per_app, limits.max_connections_per_instance);
    match instance.connection_opened(&broker.occupancy.connections, max_app, max_instance) {
        Ok(Some(slot)) => {
            auth.prove(Some(slot));
        }
        // The instance closed meanwhile: its service refuses the token.
        Ok(None) => {}
        Err(refused) => {
            debug!(app_id = %instance.app_id, instance = %instance.instance_id, %refused, "connection refused");
            return Err(Status::resource_exhausted(refused.message()));
        }
    }
    Ok(())
}

/// An Exchange request's app secret checked out: its connection (an app backend's) is proven. It
/// is not counted against the app's renderer connections.
pub(crate) fn prove_backend(connection: Option<ConnInfo>) {
    if let Some(conn) = connection {
        conn.auth.prove(None);
    }
}
