//! Payments happen once per idempotency key.
//!
//! A key is scoped to its app, its API and the signed-in user: one user never gets another's
//! recorded outcome. The first call with a key (the leader) goes to the host on a task of its own,
//! which holds the caller's in-flight slot until the host answers or the deadline passes; a retry
//! while it runs joins it; a retry after it ended gets the recorded outcome from the store.
//!
//! The line that matters is the hand-off: the moment the call is written to the host's queue.
//! Before it, the payment can still be called off: if the app closes, or every caller waiting on
//! it (the first and the retries that joined it) goes away, while the leader waits for a host, the
//! payment never reaches any host, the callers are told "cancelled", and nothing is recorded (the
//! key is unspent). The first caller leaving alone calls nothing off: the retries that joined it
//! still want the payment, and get its answer. After it, the host may have seen the
//! key: a host that never answers (it disconnected, the deadline passed, the app closed) leaves
//! the payment "outcome unknown", recorded, and the host never sees the key again. The record is
//! written ahead, right before the hand-off, as "outcome unknown" and replaced by the outcome: a
//! daemon that dies mid-payment answers a retry after its restart with "outcome unknown", never
//! with a second payment.
//!
//! The outcome is recorded before the key leaves the in-flight table, so a retry always finds one
//! or the other.

use std::sync::{Arc, OnceLock, Weak};

use dashmap::{DashMap, mapref::entry::Entry};
use miniapp_broker_proto::{
    Api,
    v1::{ApiFailure, ApiRequest, ApiResponse, api_request::Api as Req},
};
use prost::Message;
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{debug, warn};

use miniapp_broker_proto::v1::delegate_call;

use super::{request_midas_payment_game_item, request_payment};
use crate::{
    broker::Broker,
    error::ApiError,
    host_link::{Expect, HostLink, HostSession},
    registry::{AppInstance, CallSlot},
    store::PaymentRow,
    version::ApiVersion,
};

type Outcome = Result<ApiResponse, ApiError>;
type Key = (Arc<str>, String);

/// Payments on their way to the host, with the retries waiting on them.
#[derive(Debug, Default)]
pub struct InFlight(DashMap<Key, Pending>);

impl InFlight {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// How many callers wait on the payments in flight, first callers and joined retries alike
    /// (status, tests).
    pub fn callers(&self) -> usize {
        self.0.iter().map(|p| p.callers.strong_count()).sum()
    }
}

/// One payment on its way to the host: the retries to answer when it ends, and the callers still
/// waiting on it. Each waiting caller holds a strong reference to `callers`; when the last one
/// lets go (they all went away), the guard cancels the leader's token and a payment not yet handed
/// off is called off.
#[derive(Debug)]
struct Pending {
    waiters: Vec<oneshot::Sender<Outcome>>,
    callers: Weak<DropGuard>,
}

/// A key from parts, for callers that gave none.
pub fn digest_key(parts: &[&str]) -> String {
    let mut hash = Sha256::new();
    for part in parts {
        hash.update(part.as_bytes());
        hash.update([0]);
    }
    hex::encode(&hash.finalize()[..16])
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

/// What a retry finds. A caller that waits holds its share of the payment's callers while it does.
enum Found {
    Recorded(Box<Outcome>),
    Joined(oneshot::Receiver<Outcome>, Option<Arc<DropGuard>>),
    /// The first caller; with the host session its write-ahead record was written for, if it was.
    Leader(Arc<DropGuard>, Option<Arc<HostSession>>),
}

/// The store key of a payment: its API, the signed-in user and the caller's key. The uid is
/// length-prefixed, so no (uid, key) pair can spell another's.
fn scoped_key(api: Api, uid: &str, key: &str) -> String {
    format!("{}:{}:{uid}:{key}", api.name(), uid.len())
}

/// Runs a payment once per (app, API, user, key). `slot` is the caller's in-flight slot: the
/// leader's task holds it until the host answers.
pub async fn run(
    b: &Arc<Broker>,
    inst: &Arc<AppInstance>,
    version: ApiVersion,
    api: Api,
    request: ApiRequest,
    slot: CallSlot,
) -> Outcome {
    let key = key_of(&request);
    if key.len() > 128 {
        return Err(ApiError::InvalidParams("idempotency key must be at most 128 bytes".into()));
    }
    // Keys are scoped to their API as well as their app: the same key on requestPayment and on
    // requestMidasPaymentGameItem names two payments, never a retry of the other's. And to the
    // user: after a switch, the same key is the new user's own payment.
    let uid = b.user.get().map(|u| u.uid.clone()).unwrap_or_default();
    let key = scoped_key(api, &uid, &key);
    let slot_key: Key = (inst.app_id.clone(), key.clone());
    // Cancelled when every caller stopped waiting (their streams or connections went away).
    let caller = CancellationToken::new();
    let found = match b.payments.0.entry(slot_key.clone()) {
        Entry::Occupied(mut pending) => {
            let (tx, rx) = oneshot::channel();
            let pending = pending.get_mut();
            pending.waiters.push(tx);
            // None: every caller went already, and the payment is being called off (or was
            // handed off, and this retry gets its answer).
            Found::Joined(rx, pending.callers.upgrade())
        }
        Entry::Vacant(vacant) => {
            // With a host there (the usual case) the write-ahead record goes in at once: whether
            // it went in says whether the key was spent before, one statement where a read and
            // then a write would be two. Without one, nothing is written until a host comes.
            let host = b.host.current().filter(|_| !inst.is_closed());
            let ahead = match host {
                Some(session) => {
                    let at = b.clock.now_ms();
                    b.store.record_payment(&inst.app_id, &key, api.name(), written_ahead(api), at)?.then_some(session)
                }
                None => None,
            };
            let recorded = match ahead {
                Some(_) => None,
                None => b.store.payment(&inst.app_id, &key)?,
            };
            match recorded {
                Some(row) => Found::Recorded(Box::new(replay(api, &row))),
                None => {
                    let waits = Arc::new(caller.clone().drop_guard());
                    vacant.insert(Pending { waiters: Vec::new(), callers: Arc::downgrade(&waits) });
                    Found::Leader(waits, ahead)
                }
            }
        }
    };
    match found {
        Found::Recorded(outcome) => {
            debug!(app_id = %inst.app_id, api = api.name(), "payment retry answered from the record");
            *outcome
        }
        Found::Joined(rx, _waits) => rx.await.unwrap_or(Err(ApiError::Internal("payment leader vanished".into()))),
        Found::Leader(_waits, ahead) => {
            let (tx, rx) = oneshot::channel();
            let broker = b.clone();
            let instance = inst.clone();
            tokio::spawn(async move {
                let (handed_off, outcome) = pay(&broker, &instance, version, api, request, &key, &caller, ahead).await;
                drop(slot);
                let outcome = settle(&broker, &instance.app_id, &key, api, handed_off, outcome);
                let waiters = broker.payments.0.remove(&slot_key).map(|(_, p)| p.waiters).unwrap_or_default();
                for waiter in waiters {
                    let _ = waiter.send(outcome.clone());
                }
                let _ = tx.send(outcome);
            });
            rx.await.unwrap_or(Err(ApiError::Internal("payment task vanished".into())))
        }
    }
}

/// The leader's work: waits for a host (called off if the app closes or every caller goes first),
/// writes the record ahead (unless `ahead` says it is written, for that host session), hands the
/// payment to the host and waits for its answer. Returns whether the host may have seen the
/// payment, and the outcome.
#[allow(clippy::too_many_arguments)]
async fn pay(
    b: &Broker,
    inst: &AppInstance,
    version: ApiVersion,
    api: Api,
    request: ApiRequest,
    key: &str,
    caller: &CancellationToken,
    ahead: Option<Arc<HostSession>>,
) -> (bool, Outcome) {
    let session = match ahead {
        // Written ahead for this host: if it has gone meanwhile, the start below fails and the
        // record is dropped, as for a payment that never reached a host.
        Some(session) => session,
        None => {
            let session = match b.host.current() {
                // A host is there: nothing to wait for (nor to register for).
                Some(session) if !inst.is_closed() && !caller.is_cancelled() => Ok(session),
                _ => tokio::select! {
                    biased;
                    _ = inst.closed() => Err(ApiError::Cancelled("app instance closed")),
                    _ = caller.cancelled() => Err(ApiError::Cancelled("renderer went away")),
                    session = b.host.wait_current() => session,
                },
            };
            let session = match session {
                Ok(session) => session,
                Err(e) => return (false, Err(e)),
            };
            let at = b.clock.now_ms();
            // The key was vacant when the payment began, and it is pending since: nothing else
            // can have written it.
            if let Err(e) = b.store.record_payment(&inst.app_id, key, api.name(), written_ahead(api), at) {
                return (false, Err(e.into()));
            }
            session
        }
    };
    let app = Broker::app_info(inst, Some(version));
    let delegated = super::Delegated::new(b, inst, api, version, &request);
    let call = match HostLink::start(&session, app, delegate_call::Request::Api(request), Expect::Api(api)) {
        Ok(call) => call,
        Err(e) => return (false, Err(e)),
    };
    // Handed off: from here on only the host's answer, the deadline, the host's departure or the
    // app's closing (which cancels the call on the host) ends it.
    let outcome = super::finish_delegated(b, &delegated, call.await).await;
    (true, outcome)
}

/// Records the outcome of a payment; returns what the renderer gets. A payment the host may have
/// seen (`handed_off`) and did not answer is "outcome unknown"; one it cannot have seen leaves no
/// record.
fn settle(b: &Broker, app_id: &str, key: &str, api: Api, handed_off: bool, outcome: Outcome) -> Outcome {
    let outcome = match outcome {
        Err(e @ (ApiError::HostGone | ApiError::Timeout | ApiError::Cancelled(_) | ApiError::HostProtocol(_)))
            if handed_off =>
        {
            warn!(app_id, api = api.name(), reason = e.reason(), "payment outcome unknown; the key is spent");
            Err(ApiError::PaymentOutcomeUnknown(e.to_string()))
        }
        other => other,
    };
    let row = match &outcome {
        Ok(resp) => PaymentRow { ok: true, body: resp.encode_to_vec() },
        Err(e) if handed_off && reached_host(e) => PaymentRow { ok: false, body: e.failure(api).encode_to_vec() },
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
    debug!(app_id, api = api.name(), ok = row.ok, "payment outcome recorded");
    outcome
}

/// The record a payment has while the host may be working on it: what a retry gets if the daemon
/// dies before the outcome replaces it.
fn written_ahead(api: Api) -> &'static PaymentRow {
    fn make(api: Api) -> PaymentRow {
        let unknown = ApiError::PaymentOutcomeUnknown("the daemon stopped while the payment was in flight".into());
        PaymentRow { ok: false, body: unknown.failure(api).encode_to_vec() }
    }
    // Made once per API (the two payment APIs): the same bytes for every payment.
    static PAYMENT: OnceLock<PaymentRow> = OnceLock::new();
    static MIDAS: OnceLock<PaymentRow> = OnceLock::new();
    match api {
        Api::RequestMidasPaymentGameItem => MIDAS.get_or_init(|| make(api)),
        _ => PAYMENT.get_or_init(|| make(api)),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_derived_key_is_the_digest_in_lowercase_hex() {
        // Keys derived by earlier versions are stored: the spelling must not change.
        let mut hash = Sha256::new();
        for part in ["requestPayment", "prepay_id=1", "n"] {
            hash.update(part.as_bytes());
            hash.update([0]);
        }
        let expected: String = hash.finalize()[..16].iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(digest_key(&["requestPayment", "prepay_id=1", "n"]), expected);
        assert_eq!(expected.len(), 32);
    }
}
