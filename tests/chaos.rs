//! Chaos: a crowd of renderers calls every open API while the host process keeps dying.
//!
//! 210 renderers (one `RendererClient` each, spread over 15 app instances: v1, v2 and v3, each
//! both from app.json and chosen by the host's openApiVersion) make more than 10,000 calls over the
//! multiplexed stream and the JSON bridge; a payment that fails is retried with the same
//! idempotency key, and some payments are "double-clicked" (two concurrent calls, one key).
//! Meanwhile the host is killed at seeded random points and reconnected, at least 20 times: most
//! kills drop the host's whole runtime, as a crashed process would (its socket closes with calls
//! in flight on both sides); the others end the stream with `HostClient::disconnect`. The daemon
//! runs with a grace period, so calls that arrive while the host restarts wait for the next one.
//!
//! It proves, and prints as one line:
//! - every call got exactly one answer, ok or a clear error (host disconnected, payment outcome
//!   unknown, the user's cancel), within its deadline: each host round trip of a call is bounded
//!   by the grace period plus the call timeout, and a call makes at most two (the version, then the
//!   API or getAuthCode);
//! - no idempotency key reached the host twice, and every payment answered ok was seen by the
//!   host exactly once; two concurrent calls with one key get the same answer;
//! - an instance never mixes versions, and a version the host chose is asked again of each new
//!   host (once per host);
//! - no limit fired (RESOURCE_EXHAUSTED) and nothing leaked: no call, payment or in-flight slot is
//!   left in the daemon's tables afterwards.
//!
//! Reproduce a run with `CHAOS_SEED=<n> cargo test -p miniapp-brokerd --test chaos -- --nocapture`.

mod support;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use dashmap::DashMap;
use miniapp_broker_client::{
    HostBuilder, HostClient, HostClientError, HostFailure, RendererClient,
    proto::{
        api::Api,
        v1::{self, ApiRequest, AppInfo, api_request, api_response},
    },
};
use miniapp_brokerd::demo::sample_request;
use rand::{Rng, SeedableRng, rngs::StdRng};
use support::{
    Daemon,
    errno::{EXHAUSTED, HOST_GONE, NO_HOST, OUTCOME_UNKNOWN, SESSION_EXPIRED, TIMEOUT, USER_CANCEL},
    user, within,
};
use tokio::sync::watch;

/// The default seed; `CHAOS_SEED` overrides it.
const SEED: u64 = 0x00c4_a05e_ed20_2601;
const RENDERERS_PER_INSTANCE: usize = 14;
/// Logical operations per renderer (a payment and its retries are one operation).
const OPS_PER_RENDERER: usize = 50;
const RESTARTS: usize = 24;
const CALL_TIMEOUT_MS: u64 = 2_000;
const GRACE_MS: u64 = 2_000;
/// A call's deadline: two host round trips, each waiting at most the grace period and the call
/// timeout, plus slack for a loaded 2-core machine.
const ANSWER_BOUND: Duration = Duration::from_millis(2 * (GRACE_MS + CALL_TIMEOUT_MS) + 2_000);
/// Attempts per logical payment (the first and its retries with the same key).
const PAYMENT_ATTEMPTS: usize = 3;
const UID: &str = "u-chaos";

/// What the hosts saw, shared by every host incarnation (the "host's database").
#[derive(Default)]
struct Ledger {
    /// Payment idempotency key → times a host handler saw it.
    payments: DashMap<String, u32>,
    /// (instance id, host incarnation) → openApiVersion asks.
    version_asks: DashMap<(String, u32), u32>,
    /// Instance id → getAuthCode asks.
    auth_code_asks: DashMap<String, u32>,
}

/// One launched app instance.
struct Instance {
    app_id: String,
    instance_id: String,
    launch_token: String,
    version: &'static str,
    /// The version comes from the host's openApiVersion (app.json sets none).
    host_chosen: bool,
}

/// A small stable hash, so the host's behaviour for a key does not depend on the run.
fn fnv(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// What the host does with a payment: how long the user spends in the payment sheet, and whether
/// they close it (1 in 8).
fn payment_behaviour(key: &str) -> (Duration, bool) {
    let h = fnv(key);
    (Duration::from_millis(h % 4), (h >> 8).is_multiple_of(8))
}

/// A host that implements everything, for incarnation `incarnation`.
fn host_builder(
    daemon: &Daemon,
    ledger: &Arc<Ledger>,
    chosen: &Arc<HashMap<String, &'static str>>,
    incarnation: u32,
) -> HostBuilder {
    let l1 = ledger.clone();
    let l2 = ledger.clone();
    let l3 = ledger.clone();
    let l4 = ledger.clone();
    let chosen = chosen.clone();
    daemon
        .host()
        .name(&format!("chaos-host-{incarnation}"))
        .user(user(UID))
        .handle(|_: AppInfo, _: v1::LoginRequest| async {
            Ok(v1::LoginResponse { code: "host-login".into(), ..Default::default() })
        })
        .handle(|_: AppInfo, _: v1::CheckSessionRequest| async { Ok(v1::CheckSessionResponse::default()) })
        .handle(|_: AppInfo, _: v1::GetPhoneNumberRequest| async {
            Ok(v1::GetPhoneNumberResponse { code: "host-phone".into(), ..Default::default() })
        })
        .handle(|_: AppInfo, _: v1::GetEmailRequest| async {
            Ok(v1::GetEmailResponse { code: "host-email".into(), ..Default::default() })
        })
        .handle(|_: AppInfo, _: v1::ChooseAvatarRequest| async {
            Ok(v1::ChooseAvatarResponse { avatar_url: "host-avatar".into(), ..Default::default() })
        })
        .handle(|_: AppInfo, _: v1::GetNickNameRequest| async {
            Ok(v1::GetNickNameResponse { nick_name: "host-nick".into(), ..Default::default() })
        })
        .handle(|_: AppInfo, _: v1::GetUserInfoRequest| async {
            Ok(v1::GetUserInfoResponse {
                user_info: Some(v1::UserInfo { nick_name: "host-nick".into(), ..Default::default() }),
                ..Default::default()
            })
        })
        .handle(|_: AppInfo, _: v1::GetUserProfileRequest| async {
            Ok(v1::GetUserProfileResponse {
                user_info: Some(v1::UserInfo { nick_name: "host-nick".into(), ..Default::default() }),
                ..Default::default()
            })
        })
        .handle(move |_: AppInfo, r: v1::RequestPaymentRequest| {
            let ledger = l1.clone();
            async move {
                *ledger.payments.entry(r.idempotency_key.clone()).or_insert(0) += 1;
                let (sheet, cancel) = payment_behaviour(&r.idempotency_key);
                // The user in the payment sheet: the host is busy with the payment for a moment,
                // so a kill can land in the middle of it.
                tokio::time::sleep(sheet).await;
                if cancel { Err(HostFailure::cancelled()) } else { Ok(v1::RequestPaymentResponse::default()) }
            }
        })
        .handle(move |_: AppInfo, r: v1::RequestMidasPaymentGameItemRequest| {
            let ledger = l2.clone();
            async move {
                *ledger.payments.entry(r.idempotency_key.clone()).or_insert(0) += 1;
                let (sheet, cancel) = payment_behaviour(&r.idempotency_key);
                tokio::time::sleep(sheet).await;
                if cancel {
                    Err(HostFailure::cancelled())
                } else {
                    Ok(v1::RequestMidasPaymentGameItemResponse::default())
                }
            }
        })
        .get_auth_code(move |app: AppInfo, r: v1::GetAuthCodeRequest| {
            *l3.auth_code_asks.entry(app.instance_id).or_insert(0) += 1;
            async move {
                Ok(v1::GetAuthCodeResponse {
                    auth_code: "ac-chaos".into(),
                    auth_success_scopes: r.scopes,
                    ..Default::default()
                })
            }
        })
        .open_api_version(move |app: AppInfo| {
            *l4.version_asks.entry((app.instance_id.clone(), incarnation)).or_insert(0) += 1;
            let version = chosen.get(&app.app_id).copied();
            async move {
                version
                    .map(str::to_owned)
                    .ok_or_else(|| HostFailure::error("chaos", -1, "app.json chooses this instance's version"))
            }
        })
}

/// A host "process": its own runtime, so killing it drops its tasks and closes its socket with
/// whatever was in flight, as a crash would.
struct HostProcess {
    runtime: tokio::runtime::Runtime,
    client: HostClient,
}

impl HostProcess {
    /// Starts a host on its own runtime; retries while the daemon still holds the previous host's
    /// slot (it is released as soon as the daemon has seen the old stream end).
    async fn start(builder: HostBuilder) -> HostProcess {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("chaos-host")
            .enable_all()
            .build()
            .expect("host runtime");
        let connecting = runtime.spawn(async move {
            loop {
                match builder.clone().connect().await {
                    Ok(client) => return client,
                    Err(HostClientError::Refused(s)) if s.code() == tonic::Code::AlreadyExists => {
                        tokio::task::yield_now().await
                    }
                    Err(e) => panic!("host could not connect: {e}"),
                }
            }
        });
        let client = within("host connects", connecting).await.expect("host connect task");
        HostProcess { runtime, client }
    }

    /// The daemon's id for this host session.
    fn session(&self) -> u64 {
        self.client.welcome().host_session
    }

    /// Kills the host: `crash` drops its runtime (the socket closes mid-call); otherwise the host
    /// ends its stream with `disconnect` and the process goes away once the daemon has noticed.
    async fn kill(self, daemon: &Daemon, crash: bool) {
        let session = self.session();
        let HostProcess { runtime, client } = self;
        let broker = daemon.server.broker().clone();
        if crash {
            runtime.shutdown_background();
            drop(client);
            support::until("the daemon notices the host is gone", || broker.host.current_id() != session).await;
        } else {
            client.disconnect();
            support::until("the daemon notices the host is gone", || broker.host.current_id() != session).await;
            runtime.shutdown_background();
        }
    }
}

/// How one call ended, whichever surface carried it.
#[derive(Debug, Clone, PartialEq)]
struct Answer {
    ok: bool,
    errno: i64,
    err_msg: String,
    /// The login code or nickname an ok answer carries (it tells who answered: host or daemon).
    marker: String,
}

fn marker_of(resp: &v1::ApiResponse) -> String {
    match resp.api.as_ref() {
        Some(api_response::Api::Login(r)) => r.code.clone(),
        Some(api_response::Api::GetNickName(r)) => r.nick_name.clone(),
        _ => String::new(),
    }
}

/// The params object a JavaScript bridge would pass for `request`.
fn params_json(request: &ApiRequest) -> serde_json::Value {
    use api_request::Api as R;
    let value = match request.api.as_ref().expect("a request names its API") {
        R::Login(r) => serde_json::to_value(r),
        R::CheckSession(r) => serde_json::to_value(r),
        R::GetPhoneNumber(r) => serde_json::to_value(r),
        R::GetEmail(r) => serde_json::to_value(r),
        R::ChooseAvatar(r) => serde_json::to_value(r),
        R::GetNickName(r) => serde_json::to_value(r),
        R::GetUserInfo(r) => serde_json::to_value(r),
        R::GetUserProfile(r) => serde_json::to_value(r),
        R::RequestPayment(r) => serde_json::to_value(r),
        R::RequestMidasPaymentGameItem(r) => serde_json::to_value(r),
        R::GetSetting(r) => serde_json::to_value(r),
        R::Authorize(r) => serde_json::to_value(r),
        R::OpenSetting(r) => serde_json::to_value(r),
    };
    value.expect("requests serialize")
}

fn with_key(mut request: ApiRequest, key: &str) -> ApiRequest {
    match request.api.as_mut() {
        Some(api_request::Api::RequestPayment(r)) => r.idempotency_key = key.to_owned(),
        Some(api_request::Api::RequestMidasPaymentGameItem(r)) => r.idempotency_key = key.to_owned(),
        _ => {}
    }
    request
}

/// One call over the stream (`json` false) or the JSON bridge, bounded by [`ANSWER_BOUND`].
/// `None`: no answer in time. `Err`: an answer that is not a well-formed one for `api`.
async fn call(renderer: &RendererClient, api: Api, request: ApiRequest, json: bool) -> Option<Result<Answer, String>> {
    let name = api.name();
    let answer = async {
        if json {
            let params = params_json(&request);
            match renderer.invoke_json(name, &params).await {
                Ok(v) => {
                    let err_msg = v["errMsg"].as_str().unwrap_or_default().to_owned();
                    let marker = v["code"].as_str().or(v["nickName"].as_str()).unwrap_or_default().to_owned();
                    let marker = if matches!(api, Api::Login | Api::GetNickName) { marker } else { String::new() };
                    Ok(Answer { ok: true, errno: 0, err_msg, marker })
                }
                Err(v) => Ok(Answer {
                    ok: false,
                    errno: v["errno"].as_i64().unwrap_or_default(),
                    err_msg: v["errMsg"].as_str().unwrap_or_default().to_owned(),
                    marker: String::new(),
                }),
            }
        } else {
            match renderer.call_request(request).await {
                Ok(resp) if resp.api() != Some(api) => Err(format!("{name} answered with {:?}", resp.api())),
                Ok(resp) => {
                    Ok(Answer { ok: true, errno: 0, err_msg: resp.err_msg().to_owned(), marker: marker_of(&resp) })
                }
                Err(f) if f.reason == miniapp_broker_client::renderer::TRANSPORT_REASON => {
                    Err(format!("{name}: the client could not reach the daemon: {}", f.err_msg))
                }
                Err(f) => Ok(Answer { ok: false, errno: f.errno, err_msg: f.err_msg, marker: String::new() }),
            }
        }
    };
    let answer = tokio::time::timeout(ANSWER_BOUND, answer).await.ok()?;
    Some(answer.and_then(|a| {
        let expected = if a.ok { format!("{name}:ok") } else { format!("{name}:fail ") };
        if (a.ok && a.err_msg != expected) || (!a.ok && !a.err_msg.starts_with(&expected)) {
            return Err(format!("malformed answer for {name}: {a:?}"));
        }
        Ok(a)
    }))
}

/// What one renderer saw.
#[derive(Default)]
struct Log {
    calls: u64,
    unanswered: u64,
    /// errno → count, for failed answers.
    failures: BTreeMap<i64, u64>,
    /// Answers that are not a clear, expected ending (with what was wrong).
    bad: Vec<String>,
    /// Ok answers that came from the wrong side for the instance's version.
    mixups: Vec<String>,
    /// Double-clicked payments whose two answers differed.
    join_mismatches: u64,
    /// Idempotency key → its final answer (ok, errno).
    payments: Vec<(String, Option<(bool, i64)>)>,
}

impl Log {
    fn merge(&mut self, other: Log) {
        self.calls += other.calls;
        self.unanswered += other.unanswered;
        for (errno, n) in other.failures {
            *self.failures.entry(errno).or_default() += n;
        }
        self.bad.extend(other.bad);
        self.mixups.extend(other.mixups);
        self.join_mismatches += other.join_mismatches;
        self.payments.extend(other.payments);
    }

    /// Books one call's outcome; returns the answer if there was a well-formed one.
    fn book(
        &mut self,
        api: Api,
        inst: &Instance,
        outcome: Option<Result<Answer, String>>,
        progress: &watch::Sender<u64>,
    ) -> Option<Answer> {
        self.calls += 1;
        progress.send_modify(|n| *n += 1);
        let answer = match outcome {
            None => {
                self.unanswered += 1;
                return None;
            }
            Some(Err(e)) => {
                self.bad.push(e);
                return None;
            }
            Some(Ok(a)) => a,
        };
        if answer.ok {
            let from_host = match api {
                Api::Login => Some(answer.marker == "host-login"),
                Api::GetNickName => Some(answer.marker == "host-nick"),
                _ => None,
            };
            if let Some(from_host) = from_host
                && from_host != (inst.version == "v1")
            {
                self.mixups.push(format!(
                    "{} ({}) answered {} with {:?}",
                    inst.app_id,
                    inst.version,
                    api.name(),
                    answer.marker
                ));
            }
        } else {
            *self.failures.entry(answer.errno).or_default() += 1;
            let expected = match answer.errno {
                // A payment fails so only before it was handed to a host: the host that was asked
                // for its instance's version died first, or the host the payment was about to be
                // written to had just gone. The key is unspent.
                HOST_GONE => answer.err_msg.ends_with("host disconnected"),
                NO_HOST | TIMEOUT => !api.is_payment(),
                // checkSession before any login of the app succeeded.
                SESSION_EXPIRED => api == Api::CheckSession && inst.version != "v1",
                OUTCOME_UNKNOWN | USER_CANCEL => api.is_payment(),
                _ => false,
            };
            if !expected {
                self.bad.push(format!(
                    "{} ({}): unexpected failure {} {:?}",
                    inst.app_id, inst.version, answer.errno, answer.err_msg
                ));
            }
        }
        Some(answer)
    }
}

/// One renderer: `OPS_PER_RENDERER` operations on its instance, APIs and surfaces drawn from `rng`.
async fn run_renderer(
    index: usize,
    inst: Arc<Instance>,
    address: String,
    seed: u64,
    progress: Arc<watch::Sender<u64>>,
) -> Log {
    let renderer = RendererClient::connect(&address, &inst.launch_token).await.expect("renderer connects");
    let mut rng = StdRng::seed_from_u64(seed ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut log = Log::default();
    for op in 0..OPS_PER_RENDERER {
        let api = Api::ALL[rng.random_range(0..Api::ALL.len())];
        if !api.is_payment() {
            let json = rng.random_bool(0.15);
            let outcome = call(&renderer, api, sample_request(api), json).await;
            log.book(api, &inst, outcome, &progress);
            continue;
        }
        // One logical payment: one key, retried after a failure that may not be final.
        let key = format!("r{index:03}-op{op:03}");
        let request = with_key(sample_request(api), &key);
        let double_click = rng.random_bool(0.1);
        let mut last = None;
        for attempt in 0..PAYMENT_ATTEMPTS {
            let json = rng.random_bool(0.2);
            let answer = if attempt == 0 && double_click {
                let (a, b) = tokio::join!(
                    call(&renderer, api, request.clone(), json),
                    call(&renderer, api, request.clone(), !json)
                );
                let a = log.book(api, &inst, a, &progress);
                let b = log.book(api, &inst, b, &progress);
                // Both calls that reached the payment step (one led, one joined or read the
                // record) got the same outcome.
                let reached = |a: &Answer| a.ok || a.errno == OUTCOME_UNKNOWN || a.errno == USER_CANCEL;
                if let (Some(a), Some(b)) = (&a, &b)
                    && reached(a)
                    && reached(b)
                    && (a.ok, a.errno) != (b.ok, b.errno)
                {
                    log.join_mismatches += 1;
                    log.bad.push(format!("{key}: two calls with one key answered differently: {a:?} / {b:?}"));
                }
                a
            } else {
                let outcome = call(&renderer, api, request.clone(), json).await;
                log.book(api, &inst, outcome, &progress)
            };
            let settled = answer.as_ref().is_some_and(|a| a.ok || a.errno == USER_CANCEL);
            last = answer.map(|a| (a.ok, a.errno));
            if settled {
                break;
            }
        }
        log.payments.push((key, last));
    }
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renderers_get_one_answer_per_call_and_payments_happen_once_while_the_host_keeps_dying() {
    let seed = std::env::var("CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(SEED);
    let daemon = Daemon::start_with(|c| {
        c.host.call_timeout_ms = CALL_TIMEOUT_MS;
        c.host.grace_ms = GRACE_MS;
        c.limits.calls_per_second_per_app = 1_000_000;
        c.limits.burst_per_app = 1_000_000;
        c.limits.calls_per_second_per_user = 1_000_000;
        c.limits.burst_per_user = 1_000_000;
        c.limits.max_calls_in_flight_per_instance = 1_024;
    })
    .await;
    let ledger = Arc::new(Ledger::default());

    // 15 instances: for each version, three choose it in app.json and two let the host choose.
    let mut plan = Vec::new();
    for version in ["v1", "v2", "v3"] {
        for n in 0..5 {
            plan.push((format!("wxchaos{version}{n:02}"), version, n >= 3));
        }
    }
    let chosen: Arc<HashMap<String, &'static str>> =
        Arc::new(plan.iter().filter(|(_, _, host)| *host).map(|(app, v, _)| (app.clone(), *v)).collect());

    let mut incarnation = 1;
    let mut host = HostProcess::start(host_builder(&daemon, &ledger, &chosen, incarnation)).await;
    let mut instances = Vec::new();
    for (app_id, version, host_chosen) in &plan {
        let app_json = if *host_chosen { "{}".to_owned() } else { format!(r#"{{"apiVersion":"{version}"}}"#) };
        let launched = support::launch(&host.client, app_id, &app_json).await;
        instances.push(Arc::new(Instance {
            app_id: app_id.clone(),
            instance_id: launched.instance_id,
            launch_token: launched.launch_token,
            version,
            host_chosen: *host_chosen,
        }));
    }

    let (progress, mut progress_rx) = watch::channel(0u64);
    let progress = Arc::new(progress);
    let running = Arc::new(AtomicUsize::new(0));
    let mut renderers = Vec::new();
    for (index, inst) in instances.iter().flat_map(|i| std::iter::repeat_n(i, RENDERERS_PER_INSTANCE)).enumerate() {
        let (inst, address, progress, running) = (inst.clone(), daemon.address(), progress.clone(), running.clone());
        running.fetch_add(1, Ordering::SeqCst);
        renderers.push(tokio::spawn(async move {
            let log = run_renderer(index, inst, address, seed, progress).await;
            running.fetch_sub(1, Ordering::SeqCst);
            log
        }));
    }
    let renderer_count = renderers.len();

    // The killer: at seeded points of progress, kill the host (mostly as a crash), keep it dead
    // for a moment, and start the next one.
    let planned = (renderer_count * OPS_PER_RENDERER) as u64;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut points: Vec<u64> = (0..RESTARTS).map(|_| rng.random_range(planned / 50..planned * 17 / 20)).collect();
    points.sort_unstable();
    let (mut restarts, mut restarts_under_load) = (0u32, 0u32);
    for point in points {
        within("progress reaches the next kill point", progress_rx.wait_for(|n| *n >= point)).await.expect("progress");
        let under_load = running.load(Ordering::SeqCst) > 0;
        host.kill(&daemon, rng.random_bool(0.75)).await;
        restarts += 1;
        restarts_under_load += under_load as u32;
        // How long the host process takes to come back (a modelled outage, well within the grace period).
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..20))).await;
        incarnation += 1;
        host = HostProcess::start(host_builder(&daemon, &ledger, &chosen, incarnation)).await;
    }

    let mut log = Log::default();
    for r in renderers {
        log.merge(within("a renderer finishes", r).await.expect("renderer task"));
    }

    let duplicate_payments = ledger.payments.iter().filter(|e| *e.value() > 1).count();
    println!(
        "chaos: calls={} renderers={renderer_count} host_restarts={restarts} unanswered={} duplicate_payments={duplicate_payments}",
        log.calls, log.unanswered
    );

    let context = format!("seed {seed}; failures by errno {:?}", log.failures);
    assert!(renderer_count >= 200, "renderers: {renderer_count}");
    assert!(log.calls >= 10_000, "calls: {}", log.calls);
    assert!(
        restarts_under_load >= 20,
        "only {restarts_under_load} of {restarts} restarts happened under load ({context})"
    );
    assert_eq!(log.unanswered, 0, "calls without an answer within {ANSWER_BOUND:?} ({context})");
    assert_eq!(duplicate_payments, 0, "idempotency keys the host saw twice ({context})");
    assert_eq!(log.failures.get(&EXHAUSTED), None, "a limit fired ({context})");
    assert!(
        log.bad.is_empty(),
        "{} answers were not a clear expected ending ({context}), e.g. {:?}",
        log.bad.len(),
        &log.bad[..log.bad.len().min(5)]
    );
    assert_eq!(log.join_mismatches, 0, "concurrent calls with one key disagreed ({context})");
    assert!(
        log.mixups.is_empty(),
        "instances mixed versions ({context}): {:?}",
        &log.mixups[..log.mixups.len().min(5)]
    );

    // A payment answered ok (or cancelled by the user) happened exactly once at the host.
    let settled: Vec<&(String, Option<(bool, i64)>)> =
        log.payments.iter().filter(|(_, last)| matches!(last, Some((true, _)) | Some((false, USER_CANCEL)))).collect();
    assert!(settled.iter().any(|(_, last)| matches!(last, Some((true, _)))), "no payment succeeded ({context})");
    for (key, last) in settled {
        assert_eq!(
            ledger.payments.get(key).map(|c| *c),
            Some(1),
            "payment {key} ended {last:?}: the host must have seen it once"
        );
    }

    // Versions: getAuthCode only for v3; a host-chosen version asked again of each new host, once.
    for inst in &instances {
        let auth_asks = ledger.auth_code_asks.get(&inst.instance_id).map_or(0, |c| *c);
        assert_eq!(
            auth_asks > 0,
            inst.version == "v3",
            "{} ({}) getAuthCode asks: {auth_asks}",
            inst.app_id,
            inst.version
        );
        let asks: Vec<(u32, u32)> = ledger
            .version_asks
            .iter()
            .filter(|e| e.key().0 == inst.instance_id)
            .map(|e| (e.key().1, *e.value()))
            .collect();
        if inst.host_chosen {
            assert!(
                asks.len() >= 2,
                "{} ({}): its host-chosen version was asked by {} host(s) only",
                inst.app_id,
                inst.version,
                asks.len()
            );
            assert!(asks.iter().all(|(_, n)| *n == 1), "{}: asked more than once by one host: {asks:?}", inst.app_id);
        } else {
            assert!(asks.is_empty(), "{}: app.json chose its version, yet the host was asked", inst.app_id);
        }
    }

    // Nothing is left behind in the daemon.
    let broker = daemon.server.broker().clone();
    support::until("no delegate call left in the host's table", || broker.host.calls_in_flight() == 0).await;
    support::until("no payment left in flight", || broker.payments.is_empty()).await;
    support::until("every in-flight slot returned", || broker.registry.list().iter().all(|i| i.calls_in_flight() == 0))
        .await;
    host.kill(&daemon, true).await;
}
