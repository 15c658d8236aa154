//! `Host`: the superapp shell's surface. `Connect` runs the host link (Hello, then answers and
//! user pushes); `LaunchApp` / `CloseApp` manage app instances and their launch tokens.

use std::{sync::Arc, time::Duration};

use miniapp_broker_proto::{
    api::scope,
    v1::{
        self, DaemonMessage, Decision, DecisionSource, DelegateMethod, HostMessage, SetDecision, Welcome,
        daemon_message, host_message, host_server::Host,
    },
};
use tokio::sync::broadcast;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};

use super::{check_app_id, require_host_token};
use crate::{
    broker::Broker,
    host_link::{HostOutbound, HostSender, HostSlot, Progress, host_channel},
    version::{AppJson, VersionSource},
};

/// The `Host` service.
#[derive(Debug, Clone)]
pub struct HostService {
    broker: Arc<Broker>,
}

impl HostService {
    pub fn new(broker: Arc<Broker>) -> Self {
        HostService { broker }
    }
}

#[tonic::async_trait]
impl Host for HostService {
    type ConnectStream = HostOutbound;

    async fn connect(&self, r: Request<Streaming<HostMessage>>) -> Result<Response<Self::ConnectStream>, Status> {
        require_host_token(&self.broker, r.metadata())?;
        let slot = self
            .broker
            .host
            .reserve()
            .ok_or_else(|| Status::already_exists("another host is connected; one host at a time"))?;
        let (tx, outbound) = host_channel(self.broker.config.host.queue_messages as usize);
        tokio::spawn(run_host(self.broker.clone(), slot, r.into_inner(), tx, outbound.progress()));
        Ok(Response::new(outbound))
    }

    async fn launch_app(&self, r: Request<v1::LaunchAppRequest>) -> Result<Response<v1::LaunchAppResponse>, Status> {
        require_host_token(&self.broker, r.metadata())?;
        let v1::LaunchAppRequest { app_id, app_json } = r.into_inner();
        check_app_id(&app_id)?;
        let app_json = AppJson::parse(&app_json).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let (instance, launch_token) = self.broker.registry.launch(&app_id, app_json, self.broker.clock.now_ms());
        instance.set_launched_by(self.broker.host.current_id());
        if let Some(v) = instance.app_json.api_version {
            instance.set_version(v, VersionSource::AppJson, 0);
            if v == crate::version::ApiVersion::V3
                && self.broker.host.current().is_some_and(|h| !h.implements(DelegateMethod::GetAuthCode))
            {
                warn!(
                    app_id,
                    "app.json asks for v3 but the host does not implement getAuthCode; its defaults will fail"
                );
            }
        }
        let (api_version, version_source) = instance.version_label();
        info!(app_id, instance = %instance.instance_id, api_version, "app instance launched");
        Ok(Response::new(v1::LaunchAppResponse {
            instance_id: instance.instance_id.to_string(),
            launch_token,
            api_version: api_version.to_owned(),
            version_source: version_source.to_owned(),
        }))
    }

    async fn close_app(&self, r: Request<v1::CloseAppRequest>) -> Result<Response<v1::CloseAppResponse>, Status> {
        require_host_token(&self.broker, r.metadata())?;
        let instance_id = r.into_inner().instance_id;
        let cancelled = self.broker.close_app(&instance_id).ok_or_else(|| Status::not_found("no such app instance"))?;
        Ok(Response::new(v1::CloseAppResponse { cancelled_calls: cancelled as u32 }))
    }
}

/// One host connection, from Hello to the end of its stream.
async fn run_host(
    broker: Arc<Broker>,
    slot: HostSlot,
    mut inbound: Streaming<HostMessage>,
    tx: HostSender,
    progress: Arc<Progress>,
) {
    let hello_timeout = Duration::from_millis(broker.config.host.hello_timeout_ms);
    let hello = match tokio::time::timeout(hello_timeout, inbound.message()).await {
        Ok(Ok(Some(HostMessage { msg: Some(host_message::Msg::Hello(hello)) }))) => hello,
        Ok(Ok(Some(_))) => {
            let _ = tx.send(Err(Status::failed_precondition("the host's first message must be Hello"))).await;
            return;
        }
        Err(_) => {
            let _ = tx.send(Err(Status::deadline_exceeded("no Hello within the hello timeout"))).await;
            return;
        }
        Ok(_) => return,
    };
    if let Some(user) = hello.user.clone() {
        broker.set_user(user).await;
    }
    let session = broker.host.prepare(&slot, &hello, tx.clone(), progress);
    let consent_events = broker.consent.subscribe();
    let welcome = Welcome {
        daemon_version: env!("CARGO_PKG_VERSION").to_owned(),
        default_api_version: broker.config.default_api_version.as_str().to_owned(),
        host_session: session.id,
    };
    if tx.send(Ok(DaemonMessage { msg: Some(daemon_message::Msg::Welcome(welcome)) })).await.is_err() {
        return;
    }
    broker.host.publish(&session);
    let consent_forwarder = tokio::spawn(forward_consent(consent_events, tx.clone()));
    let methods: Vec<&str> = session.methods().iter().map(|m| m.as_str_name()).collect();
    info!(host_session = session.id, host_name = %session.name, ?methods, "host connected");

    // Made once, not per message: each registers a waiter with the token.
    let stopping = broker.shutdown.cancelled();
    tokio::pin!(stopping);
    let reason = loop {
        let message = tokio::select! {
            m = inbound.message() => m,
            _ = &mut stopping => break "daemon shutting down",
            _ = session.stalled() => break "host left its messages unread past host.stall_timeout_ms",
        };
        match message {
            Ok(Some(HostMessage { msg: Some(host_message::Msg::Result(result)) })) => session.on_result(result),
            Ok(Some(HostMessage { msg: Some(host_message::Msg::User(user)) })) => broker.set_user(user).await,
            Ok(Some(HostMessage { msg: Some(host_message::Msg::Decision(decision)) })) => {
                if let Err(why) = set_decision(&broker, decision).await {
                    session.notice(0, &format!("SetDecision refused: {why}"));
                }
            }
            Ok(Some(HostMessage { msg: Some(host_message::Msg::Hello(_)) })) => {
                session.notice(0, "Hello was already received; ignored")
            }
            Ok(Some(HostMessage { msg: None })) => session.notice(0, "empty HostMessage; ignored"),
            Ok(None) => break "host closed its stream",
            Err(_) => break "host stream broke",
        }
    };
    consent_forwarder.abort();
    // Before the session stops being current, so whoever sees the host gone sees this too.
    broker.registry.host_left(session.id, broker.clock.now_ms());
    let failed = broker.host.retire(&session);
    drop(slot);
    info!(host_session = session.id, reason, failed_calls = failed, "host disconnected");
}

/// Tells the host of every decision change, on its own task so a host that reads slowly delays
/// only its own events (a host that falls more than the channel's capacity behind misses the
/// oldest; the Admin service's ListGrants has the truth).
async fn forward_consent(mut events: broadcast::Receiver<v1::ConsentChanged>, tx: HostSender) {
    loop {
        match events.recv().await {
            Ok(changed) => {
                let message = DaemonMessage { msg: Some(daemon_message::Msg::Consent(changed)) };
                if tx.send(Ok(message)).await.is_err() {
                    return;
                }
            }
            Err(broadcast::error::RecvError::Lagged(missed)) => warn!(missed, "host missed consent events"),
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Applies the host's SetDecision; a refusal changes nothing.
async fn set_decision(broker: &Broker, d: SetDecision) -> Result<(), String> {
    check_app_id(&d.app_id).map_err(|s| s.message().to_owned())?;
    let decision = match Decision::try_from(d.decision) {
        Ok(Decision::Granted) => Some(true),
        Ok(Decision::Refused) => Some(false),
        Ok(Decision::Undecided) => None,
        _ => return Err("decision must be GRANTED, REFUSED or UNDECIDED".into()),
    };
    let scopes: Option<&[&str]> = match d.scope.as_str() {
        "" if decision.is_none() => None,
        "" => return Err("a scope is required unless the decision is UNDECIDED".into()),
        name => Some(scope::expand(name).ok_or("unknown scope")?),
    };
    let uid = match d.uid.as_str() {
        "" => broker.user.get().map(|u| u.uid.clone()).ok_or("no uid given and no user signed in")?,
        uid => uid.to_owned(),
    };
    let consent = &broker.consent;
    let outcome = match scopes {
        None => consent.revoke(&d.app_id, &uid, None, DecisionSource::Host).await.map(drop),
        Some(scopes) => {
            // scope.userInfo's two scopes are decided together, in one transaction.
            let decisions: Vec<(&str, Option<bool>)> = scopes.iter().map(|s| (*s, decision)).collect();
            consent.decide(&d.app_id, &uid, &decisions, DecisionSource::Host).await.map(drop)
        }
    };
    outcome.map_err(|e| e.to_string())
}
