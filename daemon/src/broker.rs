//! The broker: the shared state of a running daemon, and the one path every renderer call takes,
//! whichever surface it arrived on (the typed unary RPCs, `Invoke`, the `Session` stream):
//! authenticate (the surface) → validate → rate token and in-flight slot → version → the route's
//! gate (a remembered refusal) → the default, or the host and `api::finish_delegated`.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use miniapp_broker_proto::{
    Api,
    v1::{ApiRequest, ApiResponse, AppInfo, RendererCall, RendererReply, SignedInUser, delegate_call, renderer_reply},
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    api,
    clock::Clock,
    config::Config,
    consent::Consent,
    error::ApiError,
    host_link::{AnswerFinish, Deferred, Expect, HostCall, HostLink, RendererGone, ReplyPermit, ReplyTo},
    limits::{Occupancy, RateLimits, UserRates},
    platform::Platform,
    registry::{AppInstance, AppRegistry, CallSlot},
    store::Store,
    tokens::HostToken,
    user::CurrentUser,
    version::{self, ApiVersion},
};

/// Counters for status output.
#[derive(Debug, Default)]
pub struct Stats {
    pub calls_total: AtomicU64,
    pub next_stream: AtomicU64,
}

/// Everything a running daemon shares between its services.
pub struct Broker {
    pub config: Config,
    pub registry: AppRegistry,
    pub host: Arc<HostLink>,
    pub user: CurrentUser,
    pub platform: Arc<dyn Platform>,
    pub consent: Consent,
    pub store: Arc<Store>,
    pub rates: RateLimits,
    /// Calls per (app, user) among those that may add to the store (see [`api::gate`]).
    pub user_rates: UserRates,
    /// Streams and connections held per app and instance.
    pub occupancy: Occupancy,
    pub payments: api::payments::InFlight,
    pub clock: Arc<dyn Clock>,
    pub host_token: HostToken,
    pub stats: Stats,
    pub started: Instant,
    pub shutdown: CancellationToken,
    pub listen_address: String,
    /// The backend HTTP API's bound address, when its listener is on.
    pub backend_http: Option<std::net::SocketAddr>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").field("listen_address", &self.listen_address).finish_non_exhaustive()
    }
}

impl Broker {
    /// The AppInfo a host sees with a delegate call.
    pub fn app_info(instance: &AppInstance, version: Option<ApiVersion>) -> AppInfo {
        AppInfo {
            app_id: instance.app_id.to_string(),
            instance_id: instance.instance_id.to_string(),
            api_version: version.map(|v| v.as_str().to_owned()).unwrap_or_default(),
        }
    }

    /// The steps of every call that come before anything is spent, the same on every surface:
    /// the request's parameters are checked (a bad one is answered at once, and costs no rate
    /// token, no in-flight slot and no version question), then the app's rate token and the
    /// instance's in-flight slot are taken.
    fn admit(&self, instance: &Arc<AppInstance>, request: &ApiRequest) -> Result<(Api, CallSlot), ApiError> {
        let api = api::validate(request)?;
        self.stats.calls_total.fetch_add(1, Ordering::Relaxed);
        self.rates.check(&instance.app_id)?;
        Ok((api, instance.begin_call()?))
    }

    /// The longest a call waits for its instance's version: a host within the grace period, and
    /// its answer within the call deadline.
    fn version_deadline(&self) -> tokio::time::Instant {
        let host = &self.config.host;
        tokio::time::Instant::now()
            + std::time::Duration::from_millis(host.grace_ms.saturating_add(host.call_timeout_ms))
    }

    /// One call, answered when it completes (typed unary RPCs and Invoke). The path every surface
    /// takes: [`admit`](Self::admit) (validate, rate, slot) → the instance's version → the route's
    /// [`gate`](api::gate) (a remembered refusal) → the default, or the host and
    /// [`api::finish_delegated`].
    pub async fn call(
        self: &Arc<Self>,
        instance: &Arc<AppInstance>,
        request: ApiRequest,
    ) -> Result<ApiResponse, ApiError> {
        let started = log_start();
        let (api, slot) = self.admit(instance, &request)?;
        let (version, result) = match self.delegate_now(instance, api, request) {
            Ok((version, Ok((call, host_call)))) => {
                let result = api::finish_delegated(self, &call, host_call.await).await;
                drop(slot);
                (Some(version), result)
            }
            Ok((version, Err(e))) => (Some(version), Err(e)),
            Err(request) => self.resolve_and_handle(instance, api, request, slot).await,
        };
        instance.touch(self.clock.now_ms());
        log_answer(started, instance, Some(api), version, &result);
        result
    }

    /// The common unary call, taken as the stream takes it: the instance's version is known and
    /// the host answers, so the call passes its gate and is written to the host's queue right
    /// here, and only its answer is awaited (no version lookup, no race with the instance's
    /// closing: closing an app fails its calls in the host's call table, and a close that came
    /// first is seen here). Any other call is handed back for
    /// [`resolve_and_handle`](Self::resolve_and_handle).
    // The Err arm hands the request back untouched for the slow path; boxing it would add an
    // allocation to every unary call.
    #[allow(clippy::type_complexity, clippy::result_large_err)]
    fn delegate_now(
        &self,
        instance: &AppInstance,
        api: Api,
        request: ApiRequest,
    ) -> Result<(ApiVersion, Result<(api::Delegated, HostCall), ApiError>), ApiRequest> {
        let Some(session) = self.host.current() else { return Err(request) };
        let Some((version, _)) = instance.resolved(session.id) else { return Err(request) };
        if api::route(api, version) != api::Route::Delegate || instance.is_closed() {
            return Err(request);
        }
        if let Err(e) = api::gate(self, instance, api, version) {
            return Ok((version, Err(e)));
        }
        let app = Broker::app_info(instance, Some(version));
        let call = api::Delegated::new(self, instance, api, version, &request);
        let request = delegate_call::Request::Api(request);
        let started = HostLink::start_for(&session, app, instance.instance_id.clone(), request, Expect::Api(api));
        // A close that ran its sweep of the call table before this call was in it: dropping the
        // call cancels it on the host.
        if instance.is_closed() {
            return Ok((version, Err(ApiError::Cancelled("app instance closed"))));
        }
        Ok((version, started.map(|host_call| (call, host_call))))
    }

    /// Resolves the instance's version, passes the route's gate and answers the call, unless the
    /// instance is closed first (then the call ends as cancelled, and dropping the work cancels
    /// its host calls). `slot` is held until the answer; a payment's moves to the task that pays,
    /// which holds it until the host answers, and a payment answers an app's closing itself:
    /// "cancelled" only while the host cannot have seen it, "outcome unknown" once it may have.
    async fn resolve_and_handle(
        self: &Arc<Self>,
        instance: &Arc<AppInstance>,
        api: Api,
        request: ApiRequest,
        slot: CallSlot,
    ) -> (Option<ApiVersion>, Result<ApiResponse, ApiError>) {
        let closed = || async { (None, Err(ApiError::Cancelled("app instance closed"))) };
        if instance.is_closed() {
            return closed().await;
        }
        // A version already known is taken without waiting (nor registering to hear of a close).
        let version = match instance.resolved(self.host.current_id()) {
            Some((v, _)) => Ok(v),
            None => {
                let resolving =
                    version::resolve(&self.host, self.config.default_api_version, instance, self.version_deadline());
                tokio::select! {
                    biased;
                    _ = instance.closed() => return closed().await,
                    v = resolving => v,
                }
            }
        };
        let version = match version {
            Ok(v) => v,
            Err(e) => return (None, Err(e)),
        };
        let route = match api::gate(self, instance, api, version) {
            Ok(route) => route,
            Err(e) => return (Some(version), Err(e)),
        };
        let work = api::handle(self, instance, version, api, route, request, slot);
        if route == api::Route::Payment {
            return (Some(version), work.await);
        }
        // The work first: one that is done when first polled (a default answered from the store)
        // never registers to hear of a close; a close that came first was seen above.
        let outcome = tokio::select! {
            biased;
            done = work => done,
            _ = instance.closed() => Err(ApiError::Cancelled("app instance closed")),
        };
        (Some(version), outcome)
    }

    /// One call from a renderer stream; the answer goes out through `permit`. The same path as
    /// [`call`](Self::call)'s, taken without a task of its own where nothing waits: calls the host
    /// answers are gated and written to the host's queue right here, from the stream's own task,
    /// without waiting; v2 defaults are answered by the returned future, which the stream's task
    /// awaits before it reads the next call (as it awaits a forward whose host queue is full);
    /// anything that may wait longer (v3's getAuthCode, payments, a first call that resolves the
    /// version) runs on its own task so the stream keeps flowing. Returning the waiting part
    /// instead of being `async` keeps the stream task small while it is idle.
    pub fn call_streamed(
        self: &Arc<Self>,
        instance: &Arc<AppInstance>,
        call: RendererCall,
        permit: ReplyPermit,
        stream: u64,
        renderer_gone: &RendererGone,
    ) -> Option<Deferred> {
        let id = call.id;
        let request = call.request.unwrap_or_default();
        let fail = |permit: ReplyPermit, api: &str, e: ApiError| {
            permit.send(Ok(RendererReply { id, outcome: Some(renderer_reply::Outcome::Failure(e.to_failure(api))) }));
            None
        };
        let (api, slot) = match self.admit(instance, &request) {
            Ok(admitted) => admitted,
            // Name the API the request is for ("requestPayment:fail ..."), as the other surfaces do.
            Err(e) => return fail(permit, request.api().map_or("unknown", |a| a.name()), e),
        };
        // A call whose answer gets credentials made by the platform waits for them: it takes the
        // task path below, which finishes it with `api::finish_delegated`.
        let resolved = instance.resolved(self.host.current_id()).map(|(v, _)| v).filter(|v| {
            api::credentials::Credentials::of_call(api, *v, &request) == api::credentials::Credentials::Untouched
        });
        let gated = resolved.map(|v| (v, api::gate(self, instance, api, v)));
        match gated {
            Some((_, Err(e))) => fail(permit, api.name(), e),
            Some((v, Ok(api::Route::Delegate))) => {
                let app = Broker::app_info(instance, Some(v));
                let delegated = api::Delegated::new(self, instance, api, v, &request);
                let reply = if delegated.post_processed() {
                    let broker = self.clone();
                    let finish =
                        AnswerFinish(Box::new(move |answer| api::finish_delegated_now(&broker, &delegated, answer)));
                    ReplyTo::StreamFinished { permit, id, finish }
                } else {
                    ReplyTo::Stream { permit, id }
                };
                self.host.forward(app, instance.instance_id.clone(), request, api, reply, stream, slot)
            }
            Some((ApiVersion::V2, Ok(api::Route::Default))) => {
                let (broker, instance) = (self.clone(), instance.clone());
                Some(Box::pin(async move {
                    let started = log_start();
                    let outcome = api::run_default(&broker, &instance, ApiVersion::V2, request).await;
                    drop(slot);
                    log_answer(started, &instance, Some(api), Some(ApiVersion::V2), &outcome);
                    permit.send(Ok(reply(id, api, outcome)));
                }))
            }
            _ => {
                // Its own task, so the stream keeps flowing; it ends with the stream's renderer
                // like a forwarded call does (dropping the work cancels its host calls).
                let broker = self.clone();
                let instance = instance.clone();
                let gone = renderer_gone.clone();
                tokio::spawn(async move {
                    let started = log_start();
                    let (version, outcome) = tokio::select! {
                        biased;
                        _ = gone.wait() => (None, Err(ApiError::Cancelled("renderer went away"))),
                        done = broker.resolve_and_handle(&instance, api, request, slot) => done,
                    };
                    log_answer(started, &instance, Some(api), version, &outcome);
                    permit.send(Ok(reply(id, api, outcome)));
                });
                None
            }
        }
    }

    /// The host pushed a (possibly new) signed-in user.
    pub async fn set_user(&self, user: SignedInUser) {
        let signed_in = !user.uid.is_empty();
        if let Some(previous) = self.user.set(user).await {
            info!(signed_in, "signed-in user changed; ending the previous user's sessions");
            if let Err(e) = self.platform.user_changed(&previous).await {
                warn!(error = %e, "could not end the previous user's sessions");
            }
        }
    }

    /// Closes an app instance: revokes its token, fails its calls.
    pub fn close_app(&self, instance_id: &str) -> Option<usize> {
        let instance = self.registry.close(instance_id)?;
        let cancelled = self.host.cancel_instance(instance_id);
        info!(app_id = %instance.app_id, instance = instance_id, cancelled, "app instance closed");
        Some(cancelled)
    }
}

fn reply(id: u64, api: miniapp_broker_proto::Api, outcome: Result<ApiResponse, ApiError>) -> RendererReply {
    let outcome = match outcome {
        Ok(resp) => renderer_reply::Outcome::Ok(resp),
        Err(e) => renderer_reply::Outcome::Failure(e.failure(api)),
    };
    RendererReply { id, outcome: Some(outcome) }
}

/// The start of a call, when debug logs are on (no clock read otherwise).
fn log_start() -> Option<Instant> {
    tracing::enabled!(tracing::Level::DEBUG).then(Instant::now)
}

/// One debug line per answered call: app, instance, API, version, latency and, on failure, the
/// reason (never parameters or results: they may hold codes or user data). Delegate calls on a
/// renderer stream are logged by the host link instead, with their call id.
fn log_answer(
    started: Option<Instant>,
    instance: &AppInstance,
    api: Option<Api>,
    version: Option<ApiVersion>,
    outcome: &Result<ApiResponse, ApiError>,
) {
    let Some(started) = started else { return };
    let latency_us = started.elapsed().as_micros() as u64;
    let api = api.map_or("unknown", Api::name);
    let version = version.map_or("unresolved", ApiVersion::as_str);
    match outcome {
        Ok(_) => {
            tracing::debug!(app_id = %instance.app_id, instance = %instance.instance_id, api, version, latency_us, "call answered")
        }
        Err(e) => {
            tracing::debug!(app_id = %instance.app_id, instance = %instance.instance_id, api, version, latency_us, reason = e.reason(), "call failed")
        }
    }
}
