//! The host link: the one registered host's stream and the calls waiting on it.
//!
//! Each delegate call gets an id and an entry in the session's call table (a sharded map, no global
//! lock), then goes out on the host stream. The host's answer removes the entry and is delivered
//! where the entry says: to a waiting unary call (a oneshot), or straight into the renderer's
//! stream through a reply slot reserved when the call arrived, so no task sits between the host's
//! answer and the renderer's write. Removing the entry is the single point where a call ends, so
//! every call gets exactly one answer: the host's, a timeout (the sweeper), a cancellation (the
//! renderer or its app went away), or "host disconnected" (the stream ended).

use std::{
    collections::VecDeque,
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use arc_swap::ArcSwapOption;
use dashmap::DashMap;
use futures::{Stream, task::AtomicWaker};
use miniapp_broker_proto::{
    Api,
    v1::{
        ApiRequest, ApiResponse, AppInfo, CancelCall, DaemonMessage, DelegateCall, DelegateMethod, DelegateResult,
        GetAuthCodeResponse, Hello, OpenApiVersionResponse, ProtocolNotice, RendererReply, daemon_message,
        delegate_call, delegate_result, renderer_reply,
    },
};
use tokio::sync::{Notify, Semaphore, TryAcquireError, mpsc, oneshot};
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tonic::Status;
use tracing::{debug, warn};

use crate::{error::ApiError, registry::CallSlot};

/// What the daemon writes to the host stream.
pub type HostSender = mpsc::Sender<Result<DaemonMessage, Status>>;
/// The part of a streamed call that has to wait (no host is connected yet, within the grace
/// period), for the renderer stream's task to await. The common case needs none: the call is
/// written to the host's queue without waiting.
pub type Deferred = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Milliseconds since the process's first use of this clock: a cheap, monotonic timestamp that
/// fits an atomic (the host's last sign of progress).
fn monotonic_ms() -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// When the host last took a message from its queue (or the queue was last seen empty), shared by
/// the session (which reads it in its watchdog) and the outbound stream (which moves it).
#[derive(Debug, Default)]
pub struct Progress(AtomicU64);

impl Progress {
    fn mark(&self) {
        self.0.store(monotonic_ms(), Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        Duration::from_millis(monotonic_ms().saturating_sub(self.0.load(Ordering::Relaxed)))
    }
}

/// The host's queue: what the daemon sends to the host, and the stream its response body reads.
/// The stream marks progress each time the connection asks it for more, which it does only while
/// the host reads: a host that stops reading stops the marks, and the watchdog sees it.
pub fn host_channel(capacity: usize) -> (HostSender, HostOutbound) {
    let (tx, rx) = mpsc::channel(capacity);
    let progress = Arc::new(Progress::default());
    progress.mark();
    (tx, HostOutbound { rx, progress })
}

/// The host stream's outgoing messages (see [`host_channel`]).
#[derive(Debug)]
pub struct HostOutbound {
    rx: mpsc::Receiver<Result<DaemonMessage, Status>>,
    progress: Arc<Progress>,
}

impl HostOutbound {
    /// The progress marks this stream makes, for the host's session to watch.
    pub fn progress(&self) -> Arc<Progress> {
        self.progress.clone()
    }
}

impl Stream for HostOutbound {
    type Item = Result<DaemonMessage, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.progress.mark();
        self.rx.poll_recv(cx)
    }
}

/// Which answer a call expects: an open API's, or one of the host-only methods'.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    Api(Api),
    AuthCode,
    Version,
}

impl Expect {
    pub fn method(self) -> DelegateMethod {
        match self {
            Expect::Api(api) => api.method(),
            Expect::AuthCode => DelegateMethod::GetAuthCode,
            Expect::Version => DelegateMethod::OpenApiVersion,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Expect::Api(api) => api.name(),
            Expect::AuthCode => "getAuthCode",
            Expect::Version => "openApiVersion",
        }
    }
}

/// The host's successful answer.
#[derive(Debug, Clone, PartialEq)]
pub enum HostAnswer {
    Api(ApiResponse),
    AuthCode(GetAuthCodeResponse),
    Version(OpenApiVersionResponse),
}

impl HostAnswer {
    /// The open-API answer, stamped `"<api>:ok"` (a host need not fill in errMsg); any other kind
    /// of answer is a protocol error.
    pub fn into_api_response(self) -> Result<ApiResponse, ApiError> {
        match self {
            HostAnswer::Api(mut resp) => {
                resp.stamp_ok();
                Ok(resp)
            }
            _ => Err(ApiError::HostProtocol("unexpected answer type".into())),
        }
    }
}

/// Where a call's answer goes.
#[derive(Debug)]
pub enum ReplyTo {
    /// A task awaits it (unary calls, and the daemon's own getAuthCode/openApiVersion calls).
    Wait(oneshot::Sender<Result<HostAnswer, ApiError>>),
    /// Straight into a renderer stream, as the reply to the renderer's call `id`.
    Stream { permit: ReplyPermit, id: u64 },
    /// As `Stream`, through `finish` (the broker's post-processing of a delegated answer, e.g. its
    /// ledger row): the renderer gets what it returns.
    StreamFinished { permit: ReplyPermit, id: u64, finish: AnswerFinish },
}

/// What turns a host's outcome into a renderer's answer, where the answer is delivered.
pub struct AnswerFinish(pub Box<FinishFn>);

/// The step itself: runs once, on whatever ended the call.
type FinishFn = dyn FnOnce(Result<HostAnswer, ApiError>) -> Result<ApiResponse, ApiError> + Send + Sync;

impl std::fmt::Debug for AnswerFinish {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AnswerFinish")
    }
}

/// One call waiting for the host.
#[derive(Debug)]
pub struct Pending {
    reply: ReplyTo,
    expect: Expect,
    deadline: Instant,
    started: Instant,
    instance: Arc<str>,
    /// The renderer stream the call came from (0: none).
    stream: u64,
    /// Holds the instance's in-flight slot until the answer is delivered.
    slot: Option<CallSlot>,
}

impl Pending {
    pub fn new(reply: ReplyTo, expect: Expect, instance: Arc<str>, stream: u64, slot: Option<CallSlot>) -> Self {
        let now = Instant::now();
        // The deadline is set when the call is registered (see `HostSession::register`).
        Pending { reply, expect, deadline: now, started: now, instance, stream, slot }
    }

    /// Delivers the call's one answer.
    fn finish(self, call_id: u64, outcome: Result<HostAnswer, ApiError>) {
        if tracing::enabled!(tracing::Level::DEBUG) {
            let latency_us = self.started.elapsed().as_micros() as u64;
            match &outcome {
                Ok(_) => {
                    debug!(call_id, method = self.expect.label(), instance = %self.instance, latency_us, "delegate call answered")
                }
                Err(e) => {
                    debug!(call_id, method = self.expect.label(), instance = %self.instance, latency_us, reason = e.reason(), "delegate call failed")
                }
            }
        }
        let api = match self.expect {
            Expect::Api(api) => api,
            // Only open-API calls are forwarded onto renderer streams.
            Expect::AuthCode | Expect::Version => Api::Login,
        };
        let (permit, id, answer) = match self.reply {
            ReplyTo::Wait(tx) => {
                let _ = tx.send(outcome);
                return;
            }
            ReplyTo::Stream { permit, id } => (permit, id, outcome.and_then(HostAnswer::into_api_response)),
            ReplyTo::StreamFinished { permit, id, finish } => (permit, id, (finish.0)(outcome)),
        };
        let outcome = match answer {
            Ok(resp) => renderer_reply::Outcome::Ok(resp),
            Err(e) => renderer_reply::Outcome::Failure(e.failure(api)),
        };
        permit.send(Ok(RendererReply { id, outcome: Some(outcome) }));
    }
}

/// Hashes call ids for the call table. The daemon makes the ids (a counter), so no peer can pick
/// colliding keys, and a multiply spreads consecutive ids over the shards and buckets at a
/// fraction of SipHash's cost.
type CallIdHash = std::hash::BuildHasherDefault<CallIdHasher>;

#[derive(Default)]
struct CallIdHasher(u64);

impl std::hash::Hasher for CallIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, id: u64) {
        self.0 = id.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// One connected host: what it implements, its stream, and the calls waiting on it.
#[derive(Debug)]
pub struct HostSession {
    pub id: u64,
    pub name: String,
    methods: u32,
    tx: HostSender,
    calls: DashMap<u64, Pending, CallIdHash>,
    next_call: AtomicU64,
    closed: AtomicBool,
    wake_sweeper: Notify,
    call_timeout: Duration,
    /// How long the host may leave messages unread before it is disconnected.
    stall_timeout: Duration,
    progress: Arc<Progress>,
    /// Cancelled when the watchdog gives up on the host; its connection task then ends the link.
    stalled: CancellationToken,
}

impl HostSession {
    /// Whether the host registered `method` in its Hello.
    pub fn implements(&self, method: DelegateMethod) -> bool {
        let bit = method as i32;
        (0..32).contains(&bit) && self.methods & (1 << bit) != 0
    }

    /// The methods the host registered, for status output.
    pub fn methods(&self) -> Vec<DelegateMethod> {
        (1..32).filter_map(|b| DelegateMethod::try_from(b).ok()).filter(|m| self.implements(*m)).collect()
    }

    pub fn calls_in_flight(&self) -> usize {
        self.calls.len()
    }

    /// Puts a call in the table and returns its id. If the session closed meanwhile, the call
    /// fails with "host disconnected" at once.
    fn register(&self, mut pending: Pending) -> Option<u64> {
        let id = self.next_call.fetch_add(1, Ordering::Relaxed);
        pending.deadline = pending.started + self.call_timeout;
        self.calls.insert(id, pending);
        // `close` sets the flag before draining, so either it sees this entry or we see the flag.
        if self.closed.load(Ordering::SeqCst) {
            self.fail(id, ApiError::HostGone);
            return None;
        }
        self.wake_sweeper.notify_one();
        Some(id)
    }

    fn call_message(&self, id: u64, app: AppInfo, request: delegate_call::Request) -> DaemonMessage {
        let call = DelegateCall {
            call_id: id,
            app: Some(app),
            deadline_ms: self.call_timeout.as_millis() as u32,
            request: Some(request),
        };
        DaemonMessage { msg: Some(daemon_message::Msg::Call(call)) }
    }

    /// Writes a registered call to the host's queue, without waiting. A full queue means the host
    /// has stopped keeping up: the call fails at once instead of waiting for room (a wait could
    /// outlast its deadline, and would stall the renderer stream it came from).
    fn send(&self, id: u64, app: AppInfo, request: delegate_call::Request) -> Result<(), ApiError> {
        if self.tx.capacity() == self.tx.max_capacity() {
            // The queue was empty: the host has nothing unread, so it is not stalling yet.
            self.progress.mark();
        }
        let error = match self.tx.try_send(Ok(self.call_message(id, app, request))) {
            Ok(()) => return Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => ApiError::Exhausted(format!(
                "host is not keeping up: {} messages wait for it to read",
                self.tx.max_capacity()
            )),
            Err(mpsc::error::TrySendError::Closed(_)) => ApiError::HostGone,
        };
        self.fail(id, error.clone());
        Err(error)
    }

    /// Whether the host has left messages unread for longer than the stall timeout.
    fn is_stalled(&self) -> bool {
        self.tx.capacity() < self.tx.max_capacity() && self.progress.idle_for() > self.stall_timeout
    }

    /// Resolves when the watchdog has given up on this host.
    pub fn stalled(&self) -> WaitForCancellationFuture<'_> {
        self.stalled.cancelled()
    }

    /// Ends call `id` with `error`, if it is still waiting. Returns whether it was.
    fn fail(&self, id: u64, error: ApiError) -> bool {
        match self.calls.remove(&id) {
            Some((_, pending)) => {
                pending.finish(id, Err(error));
                true
            }
            None => false,
        }
    }

    /// Fails a call and tells the host to stop working on it.
    fn abandon(&self, id: u64, error: ApiError, reason: &str) -> bool {
        let failed = self.fail(id, error);
        if failed {
            let cancel = DaemonMessage {
                msg: Some(daemon_message::Msg::Cancel(CancelCall { call_id: id, reason: reason.to_owned() })),
            };
            // Advisory: if the host's queue is full it will answer, and the answer is dropped.
            if self.tx.try_send(Ok(cancel)).is_err() {
                debug!(call_id = id, "cancellation not sent: host queue full or closed");
            }
        }
        failed
    }

    /// Fails (and cancels on the host) every call that `matches`; returns how many.
    fn abandon_where(&self, matches: impl Fn(&Pending) -> bool, error: ApiError, reason: &str) -> usize {
        let ids: Vec<u64> = self.calls.iter().filter(|e| matches(e.value())).map(|e| *e.key()).collect();
        ids.into_iter().filter(|id| self.abandon(*id, error.clone(), reason)).count()
    }

    /// Handles one DelegateResult from the host.
    pub fn on_result(&self, result: DelegateResult) {
        let call_id = result.call_id;
        let Some((_, pending)) = self.calls.remove(&call_id) else {
            warn!(call_id, "host answered an unknown, cancelled or already answered call; dropped");
            self.notice(call_id, "unknown, cancelled or already answered call id; the answer was dropped");
            return;
        };
        use delegate_result::Outcome;
        let outcome = match (result.outcome, pending.expect) {
            (Some(Outcome::Api(resp)), Expect::Api(api)) if resp.api() == Some(api) => Ok(HostAnswer::Api(resp)),
            (Some(Outcome::GetAuthCode(a)), Expect::AuthCode) => Ok(HostAnswer::AuthCode(a)),
            (Some(Outcome::OpenApiVersion(v)), Expect::Version) => Ok(HostAnswer::Version(v)),
            (Some(Outcome::Error(e)), _) => Err(ApiError::Host(e)),
            (Some(Outcome::Cancelled(_)), _) => Err(ApiError::UserCancelled),
            (other, expect) => {
                let got = match other {
                    None => "no outcome".to_owned(),
                    Some(Outcome::Api(r)) => format!("a {} result", r.api().map(Api::name).unwrap_or("empty")),
                    Some(Outcome::GetAuthCode(_)) => "a getAuthCode result".to_owned(),
                    Some(Outcome::OpenApiVersion(_)) => "an openApiVersion result".to_owned(),
                    Some(_) => "an unexpected result".to_owned(),
                };
                let message = format!("host answered {} with {got}", expect.label());
                warn!(call_id, method = expect.label(), "host answered with the wrong result type");
                self.notice(call_id, &message);
                Err(ApiError::HostProtocol(message))
            }
        };
        pending.finish(call_id, outcome);
    }

    /// Tells the host it sent something the daemon refused.
    pub fn notice(&self, call_id: u64, message: &str) {
        let notice = DaemonMessage {
            msg: Some(daemon_message::Msg::Notice(ProtocolNotice { call_id, message: message.to_owned() })),
        };
        let _ = self.tx.try_send(Ok(notice));
    }

    /// Marks the session closed and fails every waiting call with "host disconnected".
    fn close(&self) -> usize {
        self.closed.store(true, Ordering::SeqCst);
        let ids: Vec<u64> = self.calls.iter().map(|e| *e.key()).collect();
        let failed = ids.into_iter().filter(|id| self.fail(*id, ApiError::HostGone)).count();
        self.wake_sweeper.notify_one();
        failed
    }

    /// Fails calls past their deadline, and watches for a host that stopped reading, until the
    /// session closes. Sleeps while no call waits (a host with nothing to answer cannot stall).
    async fn sweep_deadlines(self: Arc<Self>) {
        let tick = (self.call_timeout.min(self.stall_timeout) / 20)
            .clamp(Duration::from_millis(5), Duration::from_millis(100));
        loop {
            if self.closed.load(Ordering::SeqCst) {
                return;
            }
            if self.calls.is_empty() {
                self.wake_sweeper.notified().await;
                continue;
            }
            tokio::time::sleep(tick).await;
            let now = Instant::now();
            let expired = self.abandon_where(|p| p.deadline <= now, ApiError::Timeout, "deadline exceeded");
            if expired > 0 {
                warn!(host_session = self.id, expired, "delegate calls timed out");
            }
            if self.is_stalled() {
                warn!(
                    host_session = self.id,
                    stall_ms = self.stall_timeout.as_millis() as u64,
                    "host left its messages unread for too long; disconnecting it"
                );
                self.stalled.cancel();
                return;
            }
        }
    }
}

/// The daemon's side of the host connection: at most one active [`HostSession`].
#[derive(Debug)]
pub struct HostLink {
    current: ArcSwapOption<HostSession>,
    slot_taken: AtomicBool,
    sessions: AtomicU64,
    ready: Notify,
    call_timeout: Duration,
    grace: Duration,
    stall_timeout: Duration,
}

/// Proof that this connection holds the one host slot; released on drop.
#[derive(Debug)]
pub struct HostSlot(Arc<HostLink>);

impl Drop for HostSlot {
    fn drop(&mut self) {
        self.0.slot_taken.store(false, Ordering::SeqCst);
    }
}

impl HostLink {
    pub fn new(call_timeout: Duration, grace: Duration, stall_timeout: Duration) -> Self {
        HostLink {
            current: ArcSwapOption::empty(),
            slot_taken: AtomicBool::new(false),
            sessions: AtomicU64::new(0),
            ready: Notify::new(),
            call_timeout,
            grace,
            stall_timeout,
        }
    }

    /// The connected host, if any.
    pub fn current(&self) -> Option<Arc<HostSession>> {
        self.current.load_full()
    }

    /// The id of the connected host session (0: none). Versions learned from a host are tagged
    /// with it, so a new host is asked again.
    pub fn current_id(&self) -> u64 {
        self.current.load().as_ref().map_or(0, |s| s.id)
    }

    /// Takes the one host slot, or `None` while another host is connected.
    pub fn reserve(self: &Arc<Self>) -> Option<HostSlot> {
        self.slot_taken
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .ok()
            .map(|_| HostSlot(self.clone()))
    }

    /// Builds the session for a host that said Hello. It takes calls once [`publish`](Self::publish)ed.
    pub fn prepare(
        &self,
        _slot: &HostSlot,
        hello: &Hello,
        tx: HostSender,
        progress: Arc<Progress>,
    ) -> Arc<HostSession> {
        let methods = hello.methods.iter().filter(|m| (1..32).contains(*m)).fold(0u32, |acc, m| acc | 1 << *m);
        Arc::new(HostSession {
            id: self.sessions.fetch_add(1, Ordering::SeqCst) + 1,
            name: hello.host_name.chars().take(64).collect(),
            methods,
            tx,
            calls: DashMap::default(),
            next_call: AtomicU64::new(1),
            closed: AtomicBool::new(false),
            wake_sweeper: Notify::new(),
            call_timeout: self.call_timeout,
            stall_timeout: self.stall_timeout,
            progress,
            stalled: CancellationToken::new(),
        })
    }

    /// Makes `session` the host that calls go to, and starts its deadline sweeper.
    pub fn publish(&self, session: &Arc<HostSession>) {
        tokio::spawn(session.clone().sweep_deadlines());
        self.current.store(Some(session.clone()));
        self.ready.notify_waiters();
    }

    /// Removes `session` (its stream ended) and fails its waiting calls; returns how many.
    pub fn retire(&self, session: &Arc<HostSession>) -> usize {
        let current = self.current.load();
        if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, session)) {
            self.current.store(None);
        }
        session.close()
    }

    /// The connected host, waiting up to the configured grace period for one.
    pub async fn wait_current(&self) -> Result<Arc<HostSession>, ApiError> {
        if let Some(s) = self.current() {
            return Ok(s);
        }
        if self.grace.is_zero() {
            return Err(ApiError::NoHost);
        }
        let deadline = tokio::time::Instant::now() + self.grace;
        loop {
            let ready = self.ready.notified();
            if let Some(s) = self.current() {
                return Ok(s);
            }
            if tokio::time::timeout_at(deadline, ready).await.is_err() {
                return self.current().ok_or(ApiError::NoHost);
            }
        }
    }

    /// Sends a call to the host and waits for its answer. Dropping the future (the renderer gave
    /// up) cancels the call on the host.
    pub async fn call(
        &self,
        app: AppInfo,
        request: delegate_call::Request,
        expect: Expect,
    ) -> Result<HostAnswer, ApiError> {
        let session = self.wait_current().await?;
        Self::call_on(&session, app, request, expect).await
    }

    /// As [`call`](Self::call), but on `session` only: if that host is gone the call fails with
    /// "host disconnected" instead of going to its successor (a version must be tagged with the
    /// host that chose it).
    pub async fn call_on(
        session: &Arc<HostSession>,
        app: AppInfo,
        request: delegate_call::Request,
        expect: Expect,
    ) -> Result<HostAnswer, ApiError> {
        Self::start(session, app, request, expect)?.await
    }

    /// Hands a call to `session` now, without waiting: once this returns `Ok`, the host may see
    /// the call (payments write their record before this point). The returned future is the
    /// answer; dropping it cancels the call on the host.
    pub fn start(
        session: &Arc<HostSession>,
        app: AppInfo,
        request: delegate_call::Request,
        expect: Expect,
    ) -> Result<HostCall, ApiError> {
        let instance: Arc<str> = app.instance_id.as_str().into();
        Self::start_for(session, app, instance, request, expect)
    }

    /// As [`start`](Self::start), with the instance's id already shared (no copy per call).
    pub fn start_for(
        session: &Arc<HostSession>,
        app: AppInfo,
        instance: Arc<str>,
        request: delegate_call::Request,
        expect: Expect,
    ) -> Result<HostCall, ApiError> {
        let method = expect.method();
        if !session.implements(method) {
            return Err(ApiError::NotImplementedByHost(method));
        }
        let (tx, rx) = oneshot::channel();
        let Some(id) = session.register(Pending::new(ReplyTo::Wait(tx), expect, instance, 0, None)) else {
            return Err(ApiError::HostGone);
        };
        session.send(id, app, request)?;
        Ok(HostCall { session: session.clone(), id, rx, answered: false })
    }

    /// Forwards a renderer-stream call to the host, from the renderer stream's own task: the call
    /// is registered and written to the host's queue right here, and the answer goes straight
    /// into the renderer's stream. Never waits for the answer; returns what is left to wait for
    /// only when no host is connected yet (see [`Deferred`]).
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        self: &Arc<Self>,
        app: AppInfo,
        instance: Arc<str>,
        request: ApiRequest,
        api: Api,
        reply: ReplyTo,
        stream: u64,
        slot: CallSlot,
    ) -> Option<Deferred> {
        let pending = Pending::new(reply, Expect::Api(api), instance, stream, Some(slot));
        match self.current() {
            Some(session) => {
                Self::dispatch(&session, pending, app, request, api);
                None
            }
            None if self.grace.is_zero() => {
                pending.finish(0, Err(ApiError::NoHost));
                None
            }
            None => {
                let link = self.clone();
                let instance = pending.slot.as_ref().map(|slot| slot.instance().clone());
                Some(Box::pin(async move {
                    // An app closed while its call waits for a host: the call ends now and never
                    // reaches the next host.
                    let waited = match instance {
                        Some(instance) => tokio::select! {
                            biased;
                            _ = instance.closed() => Err(ApiError::Cancelled("app instance closed")),
                            session = link.wait_current() => session,
                        },
                        None => link.wait_current().await,
                    };
                    match waited {
                        Ok(session) => Self::dispatch(&session, pending, app, request, api),
                        Err(e) => pending.finish(0, Err(e)),
                    }
                }))
            }
        }
    }

    /// Registers a streamed call on `session` and writes it to the host's queue; a call that
    /// cannot be written is answered at once.
    fn dispatch(session: &Arc<HostSession>, pending: Pending, app: AppInfo, request: ApiRequest, api: Api) {
        if !session.implements(api.method()) {
            pending.finish(0, Err(ApiError::NotImplementedByHost(api.method())));
            return;
        }
        if let Some(id) = session.register(pending) {
            // A refusal has already answered the call.
            let _ = session.send(id, app, delegate_call::Request::Api(request));
        }
    }

    /// A renderer stream closed: cancel its calls on the host.
    pub fn cancel_stream(&self, stream: u64) -> usize {
        self.current().map_or(0, |s| {
            s.abandon_where(|p| p.stream == stream, ApiError::Cancelled("renderer went away"), "renderer went away")
        })
    }

    /// An app instance closed: fail and cancel its calls.
    pub fn cancel_instance(&self, instance_id: &str) -> usize {
        self.current().map_or(0, |s| {
            s.abandon_where(
                |p| &*p.instance == instance_id,
                ApiError::Cancelled("app instance closed"),
                "app instance closed",
            )
        })
    }

    pub fn calls_in_flight(&self) -> usize {
        self.current().map_or(0, |s| s.calls_in_flight())
    }
}

/// A call handed to the host, as a future of its answer. It always resolves: the host's answer,
/// or the error that ended the call (deadline, host gone, cancellation), since every way a call
/// ends goes through the call table. Dropping it before then cancels the call on the host.
#[derive(Debug)]
pub struct HostCall {
    session: Arc<HostSession>,
    id: u64,
    rx: oneshot::Receiver<Result<HostAnswer, ApiError>>,
    answered: bool,
}

impl Future for HostCall {
    type Output = Result<HostAnswer, ApiError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let answer = std::task::ready!(Pin::new(&mut self.rx).poll(cx));
        self.answered = true;
        Poll::Ready(answer.unwrap_or(Err(ApiError::Internal("call dropped without an answer".into()))))
    }
}

impl Drop for HostCall {
    fn drop(&mut self) {
        if !self.answered {
            self.session.abandon(self.id, ApiError::Cancelled("renderer went away"), "renderer went away");
        }
    }
}

/// A renderer stream's replies: a bounded queue whose room is reserved when a call arrives, filled
/// later by whichever task has the answer (the host link's, usually), and read by the stream's
/// response body. tokio's mpsc channel does the same, but costs ~800 bytes per stream up front (a
/// cache-padded channel and a first block of 32 slots); an idle renderer stream keeps this one at
/// ~150. Each reply is boxed, so the queue's own buffer stays a few pointers.
struct ReplyQueue {
    room: Semaphore,
    items: std::sync::Mutex<VecDeque<Box<Result<RendererReply, Status>>>>,
    reader: AtomicWaker,
    /// The sender and the reserved, not yet used permits. The stream ends when this reaches 0 and
    /// the queue is empty.
    writers: AtomicUsize,
    /// Woken each time a writer is done (for a final status that must go out last) and when the
    /// renderer goes; whoever waits checks which.
    changed: Notify,
    /// Set when the renderer is gone: see [`RendererGone`].
    gone: AtomicBool,
}

impl ReplyQueue {
    fn items(&self) -> std::sync::MutexGuard<'_, VecDeque<Box<Result<RendererReply, Status>>>> {
        self.items.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn pop(&self) -> Option<Result<RendererReply, Status>> {
        let item = self.items().pop_front()?;
        self.room.add_permits(1);
        Some(*item)
    }

    fn writer_done(&self) {
        self.writers.fetch_sub(1, Ordering::AcqRel);
        self.reader.wake();
        self.changed.notify_waiters();
    }
}

/// A renderer stream's reply queue with room for `capacity` replies: the writing half (its
/// session task's), the stream the response body reads, and the signal that the renderer is gone
/// ([`RendererGone`]), which the response body gives when it is dropped: the renderer reset the
/// stream or its connection ended, or every answer went out. (The end of the renderer's request
/// side is not the end: a client that half-closes still reads its answers.)
pub fn reply_queue(capacity: usize) -> (ReplySender, ReplyStream, RendererGone) {
    let queue = Arc::new(ReplyQueue {
        room: Semaphore::new(capacity),
        items: std::sync::Mutex::new(VecDeque::new()),
        reader: AtomicWaker::new(),
        writers: AtomicUsize::new(1),
        changed: Notify::new(),
        gone: AtomicBool::new(false),
    });
    (ReplySender(queue.clone()), ReplyStream(queue.clone()), RendererGone(queue))
}

/// Whether a renderer stream's renderer is gone, and a wait for it: what calls on their own task
/// watch to cancel their host calls. It lives in the stream's reply queue (a cancellation token of
/// its own cost every connected renderer ~100 bytes more).
#[derive(Clone)]
pub struct RendererGone(Arc<ReplyQueue>);

impl RendererGone {
    /// Marks the renderer gone and wakes whoever waits for it.
    pub fn set(&self) {
        self.0.gone.store(true, Ordering::Release);
        self.0.changed.notify_waiters();
    }

    pub fn is_set(&self) -> bool {
        self.0.gone.load(Ordering::Acquire)
    }

    /// Resolves once the renderer is gone.
    pub async fn wait(&self) {
        loop {
            let changed = self.0.changed.notified();
            tokio::pin!(changed);
            // Registered before the check, so a `set` in between is not missed.
            changed.as_mut().enable();
            if self.is_set() {
                return;
            }
            changed.await;
        }
    }
}

impl std::fmt::Debug for RendererGone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("RendererGone").field(&self.is_set()).finish()
    }
}

/// Reserves room for replies on a renderer stream.
pub struct ReplySender(Arc<ReplyQueue>);

/// The renderer stream's response body went away: nobody reads replies any more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyQueueClosed;

impl ReplySender {
    /// Room for one reply if there is some now; `None` if the queue is full.
    pub fn try_reserve(&self) -> Result<Option<ReplyPermit>, ReplyQueueClosed> {
        match self.0.room.try_acquire() {
            Ok(room) => room.forget(),
            Err(TryAcquireError::NoPermits) => return Ok(None),
            Err(TryAcquireError::Closed) => return Err(ReplyQueueClosed),
        }
        self.0.writers.fetch_add(1, Ordering::AcqRel);
        Ok(Some(ReplyPermit { queue: self.0.clone(), used: false }))
    }

    /// Waits for room for one reply.
    pub async fn reserve(&self) -> Result<ReplyPermit, ReplyQueueClosed> {
        self.0.room.acquire().await.map_err(|_| ReplyQueueClosed)?.forget();
        self.0.writers.fetch_add(1, Ordering::AcqRel);
        Ok(ReplyPermit { queue: self.0.clone(), used: false })
    }
}

impl Drop for ReplySender {
    fn drop(&mut self) {
        self.0.writer_done();
    }
}

/// Room for one reply on a renderer stream, reserved when the call arrived. Sending never waits;
/// dropping it unused gives the room back.
pub struct ReplyPermit {
    queue: Arc<ReplyQueue>,
    used: bool,
}

impl std::fmt::Debug for ReplyPermit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplyPermit").finish_non_exhaustive()
    }
}

impl ReplyPermit {
    /// Waits until this permit is the stream's last writer (the sender is gone and every other
    /// call has been answered), so what it sends, a final status, goes out after every answer.
    pub async fn wait_until_last(&self) {
        loop {
            let left = self.queue.changed.notified();
            if self.queue.writers.load(Ordering::Acquire) <= 1 {
                return;
            }
            left.await;
        }
    }

    /// Queues the reply (dropped if the stream is gone).
    pub fn send(mut self, reply: Result<RendererReply, Status>) {
        self.used = true;
        if !self.queue.room.is_closed() {
            self.queue.items().push_back(Box::new(reply));
        }
    }
}

impl Drop for ReplyPermit {
    fn drop(&mut self) {
        if !self.used {
            self.queue.room.add_permits(1);
        }
        self.queue.writer_done();
    }
}

/// The replies of a renderer stream, in the order they were sent; ends once the sender and every
/// permit are gone. Dropping it tells the stream's calls their renderer is gone.
pub struct ReplyStream(Arc<ReplyQueue>);

impl Stream for ReplyStream {
    type Item = Result<RendererReply, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let queue = &self.0;
        if let Some(reply) = queue.pop() {
            return Poll::Ready(Some(reply));
        }
        queue.reader.register(cx.waker());
        if let Some(reply) = queue.pop() {
            return Poll::Ready(Some(reply));
        }
        if queue.writers.load(Ordering::Acquire) == 0 {
            // A writer queues before it counts itself out, so a last reply is visible here.
            return Poll::Ready(queue.pop());
        }
        Poll::Pending
    }
}

impl Drop for ReplyStream {
    fn drop(&mut self) {
        self.0.room.close();
        self.0.items().clear();
        RendererGone(self.0.clone()).set();
    }
}

impl std::fmt::Debug for ReplyStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplyStream").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;

    fn reply(id: u64) -> Result<RendererReply, Status> {
        Ok(RendererReply { id, outcome: None })
    }

    #[tokio::test]
    async fn the_renderer_is_gone_once_its_reply_stream_is_dropped_or_it_is_set() {
        let (_tx, rx, gone) = reply_queue(1);
        let waiting = gone.clone();
        let mut wait = Box::pin(async move { waiting.wait().await });
        assert!(futures::poll!(wait.as_mut()).is_pending());
        assert!(!gone.is_set());
        drop(rx);
        assert!(gone.is_set());
        wait.await;
        // Set before anyone waits: the wait ends at once.
        let (_tx, _rx, gone) = reply_queue(1);
        gone.set();
        gone.wait().await;
    }

    #[tokio::test]
    async fn replies_arrive_in_order_and_the_stream_ends_with_its_last_writer() {
        let (tx, mut rx, _) = reply_queue(2);
        let first = tx.reserve().await.unwrap();
        let second = tx.reserve().await.unwrap();
        // Full: a third reservation waits until a reply is read.
        assert!(futures::poll!(Box::pin(tx.reserve())).is_pending());
        second.send(reply(2));
        first.send(reply(1));
        assert_eq!(rx.next().await.unwrap().unwrap().id, 2);
        let third = tx.reserve().await.unwrap();
        drop(tx);
        assert_eq!(rx.next().await.unwrap().unwrap().id, 1);
        // An outstanding permit keeps the stream open; its reply is the last.
        assert!(futures::poll!(rx.next()).is_pending());
        third.send(Err(Status::unavailable("bye")));
        assert_eq!(rx.next().await.unwrap().unwrap_err().code(), tonic::Code::Unavailable);
        assert!(rx.next().await.is_none());
    }

    #[tokio::test]
    async fn unused_room_comes_back_and_a_dropped_stream_refuses_writers() {
        let (tx, rx, _) = reply_queue(1);
        drop(tx.reserve().await.unwrap());
        let permit = tx.reserve().await.expect("the unused permit gave its room back");
        drop(rx);
        permit.send(reply(1));
        assert_eq!(tx.reserve().await.unwrap_err(), ReplyQueueClosed);
    }
}
