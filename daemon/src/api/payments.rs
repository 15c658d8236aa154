//! Payments happen once per idempotency key.
//!
//! A key is scoped to its app and its API. The first call with a key (the leader) goes to the host
//! on a task of its own, so a renderer that goes away does not abandon a payment the user may be
//! finishing; a retry while it runs joins it; a retry after it ended gets the recorded outcome from
//! the store.
//! The outcome is recorded before the key leaves the in-flight table, so a retry always finds one
//! or the other. A call that never reached the host (no host, method not implemented, limits)
//! records nothing: the key is still unspent. A call the host took but never answered (it
//! disconnected, the deadline passed) is recorded as "payment outcome unknown": the host has seen
//! the key and must reconcile, and it will never see it again. The record is written ahead, before
//! the host can see the key, as "outcome unknown" and replaced by the outcome: a daemon that dies
//! mid-payment answers a retry after its restart with "outcome unknown", never with a second
//! payment.

use std::sync::Arc;

use dashmap::{DashMap, mapref::entry::Entry};
use miniapp_broker_proto::{
    Api,
    v1::{ApiFailure, ApiRequest, ApiResponse, api_request::Api as Req},
};
use prost::Message;
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;
use tracing::{info, warn};

use super::{delegate, request_midas_payment_game_item, request_payment};
use crate::{broker::Broker, error::ApiError, registry::AppInstance, store::PaymentRow, version::ApiVersion};

type Outcome = Result<ApiResponse, ApiError>;
type Key = (Arc<str>, String);

/// Payments on their way to the host, with the retries waiting on them.
#[derive(Debug, Default)]
pub struct InFlight(DashMap<Key, Vec<oneshot::Sender<Outcome>>>);

impl InFlight {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A key from parts, for callers that gave none.
pub fn digest_key(parts: &[&str]) -> String {
    let mut hash = Sha256::new();
    for part in parts {
        hash.update(part.as_bytes());
        hash.update([0]);
    }
    let digest = hash.finalize();
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

fn key_of(request: &ApiRequest) -> String {
    match request.api.as_ref() {
        Some(Req::RequestPayment(r)) if r.idempotency_key.is_empty() => request_payment::derived_key(r),
        Some(Req::RequestPayment(r)) => r.idempotency_key.clone(),
        Some(Req::RequestMidasPaymentGameItem(r)) if r.idempotency_key.is_empty() => {
            request_midas_payment_game_item::derived_key(r)
        }
        Some(Req::RequestMidasPaymentGameItem(r)) => r.idempotency_key.clone(),
        _ => String::new(),
    }
}

/// What a retry finds.
enum Found {
    Recorded(Box<Outcome>),
    Joined(oneshot::Receiver<Outcome>),
    Leader,
}

/// Runs a payment once per (app, API, key).
pub async fn run(
    b: &Arc<Broker>,
    inst: &Arc<AppInstance>,
    version: ApiVersion,
    api: Api,
    request: ApiRequest,
) -> Outcome {
    let key = key_of(&request);
    if key.len() > 128 {
        return Err(ApiError::InvalidParams("idempotency key must be at most 128 bytes".into()));
    }
    // Keys are scoped to their API as well as their app: the same key on requestPayment and on
    // requestMidasPaymentGameItem names two payments, never a retry of the other's.
    let key = format!("{}:{key}", api.name());
    let slot: Key = (inst.app_id.clone(), key.clone());
    let found = match b.payments.0.entry(slot.clone()) {
        Entry::Occupied(mut waiting) => {
            let (tx, rx) = oneshot::channel();
            waiting.get_mut().push(tx);
            Found::Joined(rx)
        }
        Entry::Vacant(vacant) => match b.store.payment(&inst.app_id, &key)? {
            Some(row) => Found::Recorded(Box::new(replay(api, &row))),
            None => {
                b.store.record_payment(&inst.app_id, &key, api.name(), &written_ahead(api), b.clock.now_ms())?;
                vacant.insert(Vec::new());
                Found::Leader
            }
        },
    };
    match found {
        Found::Recorded(outcome) => {
            info!(app_id = %inst.app_id, api = api.name(), "payment retry answered from the record");
            *outcome
        }
        Found::Joined(rx) => rx.await.unwrap_or(Err(ApiError::Internal("payment leader vanished".into()))),
        Found::Leader => {
            let (tx, rx) = oneshot::channel();
            let broker = b.clone();
            let instance = inst.clone();
            tokio::spawn(async move {
                let outcome = delegate(&broker, &instance, version, api, request).await;
                let outcome = settle(&broker, &instance.app_id, &key, api, outcome);
                let waiters = broker.payments.0.remove(&slot).map(|(_, w)| w).unwrap_or_default();
                for waiter in waiters {
                    let _ = waiter.send(outcome.clone());
                }
                let _ = tx.send(outcome);
            });
            rx.await.unwrap_or(Err(ApiError::Internal("payment task vanished".into())))
        }
    }
}

/// Records the outcome of a payment the host saw; returns what the renderer gets.
fn settle(b: &Broker, app_id: &str, key: &str, api: Api, outcome: Outcome) -> Outcome {
    let outcome = match outcome {
        Err(e @ (ApiError::HostGone | ApiError::Timeout | ApiError::Cancelled(_) | ApiError::HostProtocol(_))) => {
            warn!(app_id, api = api.name(), reason = e.reason(), "payment outcome unknown; the key is spent");
            Err(ApiError::PaymentOutcomeUnknown(e.to_string()))
        }
        other => other,
    };
    let row = match &outcome {
        Ok(resp) => PaymentRow { ok: true, body: resp.encode_to_vec() },
        Err(e) if reached_host(e) => PaymentRow { ok: false, body: e.failure(api).encode_to_vec() },
        Err(_) => {
            // Never reached the host: drop the record written ahead, so a retry may pay.
            if let Err(e) = b.store.forget_payment(app_id, key) {
                warn!(app_id, api = api.name(), error = %e, "could not drop the payment's write-ahead record");
            }
            return outcome;
        }
    };
    if let Err(e) = b.store.settle_payment(app_id, key, api.name(), &row, b.clock.now_ms()) {
        warn!(app_id, api = api.name(), error = %e, "could not record a payment outcome");
        return Err(ApiError::Internal("could not record the payment outcome".into()));
    }
    info!(app_id, api = api.name(), ok = row.ok, "payment outcome recorded");
    outcome
}

/// The record a payment has while the host may be working on it: what a retry gets if the daemon
/// dies before the outcome replaces it.
fn written_ahead(api: Api) -> PaymentRow {
    let unknown = ApiError::PaymentOutcomeUnknown("the daemon stopped while the payment was in flight".into());
    PaymentRow { ok: false, body: unknown.failure(api).encode_to_vec() }
}

/// Whether a failure means the host saw the key (so it is spent).
fn reached_host(e: &ApiError) -> bool {
    matches!(
        e,
        ApiError::Host(_) | ApiError::UserCancelled | ApiError::PaymentOutcomeUnknown(_) | ApiError::Replayed(_)
    )
}

fn replay(api: Api, row: &PaymentRow) -> Outcome {
    if row.ok {
        ApiResponse::decode(row.body.as_slice()).map_err(|e| ApiError::Internal(format!("stored payment outcome: {e}")))
    } else {
        let failure = ApiFailure::decode(row.body.as_slice())
            .unwrap_or_else(|_| ApiError::Internal("unreadable stored outcome".into()).failure(api));
        Err(ApiError::Replayed(Box::new(failure)))
    }
}
