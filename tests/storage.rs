//! Stored data is bounded: what one app and one user of it can make the store hold per unit of
//! time, identical disclosures coalesced into one ledger row, payment records pruned after their
//! retention in bounded batches, and a store that cannot write failing the calls that must write
//! while reads and other apps go on. Real daemon, real socket, real clients.
mod support;

use std::time::Instant;

use miniapp_broker_client::{
    HostClient, HostFailure, RendererClient, connect,
    proto::v1::{self, RedeemCodeRequest, exchange_client::ExchangeClient},
};
use miniapp_brokerd::{retention, store::NewLedgerRow};
use serde_json::json;
use support::{Daemon, T0_MS, assert_failure, errno, launch, user, within};
use tokio::sync::mpsc;
use tonic::Code;

const APP: &str = "wxstorage0000001";
const OTHER: &str = "wxstorage0000002";
const V2: &str = r#"{"apiVersion":"v2"}"#;
const HOUR_MS: u64 = 3600 * 1000;
const DAY_MS: u64 = 24 * HOUR_MS;
const STORE_UNAVAILABLE: i64 = 1022;

/// A host signed in as `uid` that pays every requestPayment (and reports each key it saw).
async fn paying_host(daemon: &Daemon, uid: &str) -> (HostClient, mpsc::UnboundedReceiver<String>) {
    let (seen_tx, seen) = mpsc::unbounded_channel();
    let host = daemon
        .host()
        .user(user(uid))
        .handle(move |_app, req: v1::RequestPaymentRequest| {
            let _ = seen_tx.send(req.idempotency_key.clone());
            async { Ok::<_, HostFailure>(v1::RequestPaymentResponse::default()) }
        })
        .connect()
        .await
        .expect("host connects");
    (host, seen)
}

async fn renderer(daemon: &Daemon, host: &HostClient, app_id: &str) -> RendererClient {
    let app = launch(host, app_id, V2).await;
    daemon.renderer(&app.launch_token).await
}

fn payment(key: &str) -> v1::RequestPaymentRequest {
    v1::RequestPaymentRequest {
        time_stamp: "1767225600".into(),
        nonce_str: "n0nce".into(),
        package: "prepay_id=wx1".into(),
        sign_type: "MD5".into(),
        pay_sign: "sig".into(),
        idempotency_key: key.into(),
    }
}

/// The ledger of `app_id` as (what, count), sorted.
async fn ledger(host: &HostClient, app_id: &str) -> Vec<(String, u64)> {
    let rows = host.ledger(app_id, "", 0).await.expect("ledger");
    let mut rows: Vec<_> = rows.into_iter().map(|d| (d.what, d.count)).collect();
    rows.sort();
    rows
}

/// A call the daemon refused: typed (stream, unary) or as the JSON bridge answers it.
#[derive(Debug)]
enum Refusal {
    Typed(v1::ApiFailure),
    Json(serde_json::Value),
}

/// A hostile renderer calls wx.login, getPhoneNumber and chooseAvatar as fast as it can, over the
/// stream, unary and `Invoke`, from 8 tasks at once: at most its user's bucket for each API
/// (`limits.calls_per_second_per_user`, burst `burst_per_user`, the defaults) gets through, every
/// other call is refused at once with a clear 1008, and what got through is one ledger row per
/// kind of data, its count the calls that disclosed it. The same user in another app is not held
/// back by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_user_of_one_app_cannot_grow_the_store_at_the_call_rate() {
    let daemon = Daemon::start().await;
    let (host, _seen) = paying_host(&daemon, "u1").await;
    let hostile = renderer(&daemon, &host, APP).await;
    let other = renderer(&daemon, &host, OTHER).await;
    const CALLS: usize = 600;
    let started = Instant::now();
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let r = hostile.clone();
            tokio::spawn(async move {
                let (mut ok, mut refused) = (0usize, Vec::new());
                for n in 0..CALLS / 8 {
                    let outcome = match (i + n) % 5 {
                        0 => r.call(v1::LoginRequest::default()).await.map(drop).map_err(Refusal::Typed),
                        1 => r.call(v1::GetPhoneNumberRequest {}).await.map(drop).map_err(Refusal::Typed),
                        2 => r.call(v1::ChooseAvatarRequest {}).await.map(drop).map_err(Refusal::Typed),
                        3 => r.call_unary(v1::LoginRequest::default()).await.map(drop).map_err(Refusal::Typed),
                        _ => r.invoke_json("chooseAvatar", &json!({})).await.map(drop).map_err(Refusal::Json),
                    };
                    match outcome {
                        Ok(()) => ok += 1,
                        Err(f) => refused.push(f),
                    }
                }
                (ok, refused)
            })
        })
        .collect();
    // Meanwhile the same user logs in to another app.
    within("login in another app", other.call(v1::LoginRequest::default())).await.expect("another app is not held");
    let (mut ok, mut refused) = (0, Vec::new());
    for task in tasks {
        let (n, r) = within("a caller ends", task).await.expect("task");
        ok += n;
        refused.extend(r);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let limits = &daemon.server.broker().config.limits;
    assert_eq!((limits.calls_per_second_per_user, limits.burst_per_user), (4, 10), "the defaults");
    // One bucket per API: login, getPhoneNumber and chooseAvatar.
    let most = f64::from(limits.burst_per_user) + f64::from(limits.calls_per_second_per_user) * (elapsed + 1.0);
    assert!(ok as f64 <= 3.0 * most, "{ok} calls got through in {elapsed:.2}s; the buckets allow 3 x {most}");
    assert_eq!(ok + refused.len(), CALLS);
    let expected =
        |api: &str| format!("{api}:fail resource exhausted: more than 4 calls a second by this user in this app");
    for refusal in &refused {
        match refusal {
            Refusal::Typed(f) => {
                let api = f.err_msg.split(':').next().unwrap_or_default();
                assert_failure(f, &expected(api), errno::EXHAUSTED, Code::ResourceExhausted, "resource_exhausted");
            }
            Refusal::Json(j) => {
                assert_eq!(j["errMsg"], expected("chooseAvatar"), "{j}");
                assert_eq!(j["errno"], errno::EXHAUSTED, "{j}");
            }
        }
    }
    // What got through is one row per kind of data, its count the calls that disclosed it: each
    // API's burst, and no more than its bucket allows.
    let rows = ledger(&host, APP).await;
    let kinds: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(kinds, ["avatar", "openid", "phone_number"], "{rows:?}");
    for (what, count) in &rows {
        assert!(*count >= u64::from(limits.burst_per_user) && *count as f64 <= most, "{what}: {count}, most {most}");
    }
    assert_eq!(rows.iter().map(|r| r.1).sum::<u64>(), ok as u64, "{rows:?}");
    assert_eq!(ledger(&host, OTHER).await, [("openid".to_owned(), 1)]);
}

/// Identical disclosures within `privacy.ledger_coalesce_secs` of a row's first are that row's
/// count and last time; each redeemed code is counted on its row (the first redemption's time and
/// surface kept); after the window a new row starts.
#[tokio::test]
async fn identical_disclosures_are_one_row_with_a_count_and_first_and_last_time() {
    let daemon = Daemon::start().await;
    let (host, _seen) = paying_host(&daemon, "u1").await;
    let secret = host.register_app(APP, false).await.expect("register").secret;
    let r = renderer(&daemon, &host, APP).await;
    let mut ex = ExchangeClient::new(connect::channel(&daemon.address()).await.expect("channel"));
    let mut redeem = async |code: String| {
        let redeem = RedeemCodeRequest { app_id: APP.into(), secret: secret.clone(), code };
        ex.get_phone_number(redeem).await.expect("each code redeems");
    };
    let first = within("phone", r.call(v1::GetPhoneNumberRequest {})).await.expect("phone").code;
    daemon.clock.advance_ms(60_000);
    redeem(first).await;
    daemon.clock.advance_ms(HOUR_MS / 2);
    let second = within("phone", r.call(v1::GetPhoneNumberRequest {})).await.expect("phone again").code;
    redeem(second).await;
    daemon.clock.advance_ms(HOUR_MS / 2);
    within("phone", r.call(v1::GetPhoneNumberRequest {})).await.expect("a new window");
    let rows = host.ledger(APP, "u1", 0).await.expect("ledger");
    let rows: Vec<_> = rows
        .iter()
        .map(|d| (d.what.as_str(), d.count, d.at_ms, d.last_at_ms, d.redeemed_count, d.redeemed_at_ms))
        .collect();
    let (second_at, third_at) = (T0_MS + 60_000 + HOUR_MS / 2, T0_MS + 60_000 + HOUR_MS);
    assert_eq!(
        rows,
        [("phone_number", 2, T0_MS, second_at, 2, T0_MS + 60_000), ("phone_number", 1, third_at, third_at, 0, 0)]
    );
}

/// A payment's record keeps its idempotency promise for `payments.retention_days`: a retry within
/// it gets the first outcome without reaching the host; the sweep then deletes it, and the same
/// key is a new payment.
#[tokio::test]
async fn payment_records_are_pruned_after_their_retention_and_keep_their_key_until_then() {
    let daemon = Daemon::start_with(|c| c.payments.retention_days = 30).await;
    let (host, mut seen) = paying_host(&daemon, "u1").await;
    let r = renderer(&daemon, &host, APP).await;
    let broker = daemon.server.broker().clone();
    within("pay", r.call(payment("order-1"))).await.expect("paid");
    assert_eq!(within("the host saw it", seen.recv()).await.as_deref(), Some("order-1"));
    daemon.clock.advance_ms(29 * DAY_MS);
    assert_eq!(retention::prune(&broker).await.payments, 0, "inside the retention");
    within("retry", r.call(payment("order-1"))).await.expect("the first outcome");
    assert!(seen.try_recv().is_err(), "a retry inside the retention never reaches the host");
    daemon.clock.advance_ms(2 * DAY_MS);
    assert_eq!(retention::prune(&broker).await.payments, 1);
    assert_eq!(broker.store.payment_count().unwrap(), 0);
    within("pay again", r.call(payment("order-1"))).await.expect("a new payment");
    assert_eq!(within("the host saw it again", seen.recv()).await.as_deref(), Some("order-1"));
}

/// A backlog far larger than one sweep tick's share is pruned a bounded batch at a time: one tick
/// deletes at most `BATCHES_PER_TICK` x `BATCH` rows of each table and the next ticks take the
/// rest, while calls that write are answered between the batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_prune_backlog_is_worked_off_in_bounded_batches() {
    use retention::{BATCH, BATCHES_PER_TICK};
    let daemon = Daemon::start_with(|c| {
        c.privacy.ledger_days = 1;
        c.payments.retention_days = 1;
    })
    .await;
    let broker = daemon.server.broker().clone();
    let per_tick = BATCH as usize * BATCHES_PER_TICK;
    let backlog = per_tick * 2 + 123;
    let record = miniapp_brokerd::store::PaymentRow { ok: true, body: vec![0] };
    for i in 0..backlog {
        let uid = format!("u{i}");
        let row = NewLedgerRow {
            app_id: APP,
            uid: &uid,
            what: "openid",
            surface: "renderer_api",
            api: "login",
            at_ms: T0_MS,
            via_code: true,
        };
        broker.store.ledger_add(&row).expect("row");
        broker.store.record_payment(APP, &uid, "requestPayment", &record, T0_MS).expect("payment");
    }
    daemon.clock.advance_ms(2 * DAY_MS);
    let (host, mut seen) = paying_host(&daemon, "u1").await;
    let r = renderer(&daemon, &host, OTHER).await;
    let mut ticks = Vec::new();
    loop {
        let pruning = tokio::spawn({
            let broker = broker.clone();
            async move { retention::prune(&broker).await }
        });
        // A payment (two writes) and a login (a session and a ledger row) while the tick runs.
        let key = format!("during-{}", ticks.len());
        within("pay during a prune", r.call(payment(&key))).await.expect("paid");
        assert_eq!(within("the host saw it", seen.recv()).await, Some(key));
        within("login during a prune", r.call(v1::LoginRequest::default())).await.expect("login");
        let pruned = within("a tick ends", pruning).await.expect("tick");
        ticks.push((pruned.ledger, pruned.payments));
        if pruned.ledger < per_tick && pruned.payments < per_tick {
            break;
        }
    }
    assert_eq!(ticks, [(per_tick, per_tick), (per_tick, per_tick), (123, 123)]);
    assert!(broker.store.ledger(Some(APP), None, 0).unwrap().is_empty());
    assert_eq!(broker.store.payment_count().unwrap(), 3, "only the payments made during the ticks are left");
}

/// The store at `store.max_bytes` (SQLite's max_page_count, on a real file): the calls that must
/// add something fail at once with "storage unavailable" (1022) and leave nothing behind, and a
/// payment never reaches the host; reads (checkSession, getSetting, the ledger listing) and
/// another app's session go on; once the sweep frees room the same calls work again. The daemon
/// neither crashes nor wedges.
#[tokio::test]
async fn a_full_store_fails_the_writes_clearly_and_keeps_serving_reads() {
    let dir = tempfile::Builder::new().prefix("brokerd-test").tempdir().expect("temp dir");
    let mut config = miniapp_brokerd::Config::ephemeral_in(dir.path());
    config.ephemeral = false;
    config.store.max_bytes = miniapp_brokerd::config::MIN_STORE_BYTES;
    config.privacy.ledger_days = 1;
    config.sessions.lifetime_secs = 30 * 24 * 3600;
    let daemon = Daemon::start_in(dir, config).await;
    let (host, mut seen) = paying_host(&daemon, "u1").await;
    let r = renderer(&daemon, &host, APP).await;
    let other = renderer(&daemon, &host, OTHER).await;
    within("login", r.call(v1::LoginRequest::default())).await.expect("login");
    within("login", other.call(v1::LoginRequest::default())).await.expect("login in the other app");

    // Fill the store with disclosures of another user, each a new row, until a write fails.
    let broker = daemon.server.broker().clone();
    let mut filled = 0;
    let refusal = loop {
        let what = format!("f{filled}");
        let row = NewLedgerRow {
            app_id: APP,
            uid: "filler",
            what: &what,
            surface: "s",
            api: "a",
            at_ms: T0_MS,
            via_code: false,
        };
        match broker.store.ledger_add(&row) {
            Ok(_) => filled += 1,
            Err(e) => break e,
        }
        assert!(filled < 100_000, "the store never filled");
    };
    assert!(refusal.is_unwritable(), "{refusal}");
    // And payment records, until one fails too.
    let ahead = miniapp_brokerd::store::PaymentRow { ok: false, body: vec![0] };
    for i in 0.. {
        match broker.store.record_payment(APP, &format!("order-f{i}"), "requestPayment", &ahead, T0_MS) {
            Ok(inserted) => assert!(inserted && i < 100_000, "the payments never filled"),
            Err(e) => {
                assert!(e.is_unwritable(), "{e}");
                break;
            }
        }
    }
    let rows_when_full = broker.store.ledger(None, None, 0).unwrap().len();
    let payments_when_full = broker.store.payment_count().unwrap();

    let full = |api: &str| format!("{api}:fail storage unavailable: database or disk is full");
    let f = within("phone", r.call(v1::GetPhoneNumberRequest {})).await.expect_err("full");
    assert_failure(&f, &full("getPhoneNumber"), STORE_UNAVAILABLE, Code::Unavailable, "store_unavailable");
    let f = within("avatar", r.call(v1::ChooseAvatarRequest {})).await.expect_err("full");
    assert_failure(&f, &full("chooseAvatar"), STORE_UNAVAILABLE, Code::Unavailable, "store_unavailable");
    let f = within("pay", r.call(payment("order-full"))).await.expect_err("full");
    assert_failure(&f, &full("requestPayment"), STORE_UNAVAILABLE, Code::Unavailable, "store_unavailable");
    assert!(seen.try_recv().is_err(), "a payment that cannot be recorded never reaches the host");
    assert_eq!(broker.store.ledger(None, None, 0).unwrap().len(), rows_when_full, "no row was added");
    assert_eq!(broker.store.payment_count().unwrap(), payments_when_full, "no payment was recorded");

    // Reads go on, in this app and the other.
    within("checkSession", r.call(v1::CheckSessionRequest {})).await.expect("reads work");
    within("getSetting", r.call(v1::GetSettingRequest::default())).await.expect("reads work");
    within("other app", other.call(v1::CheckSessionRequest {})).await.expect("another app's session");
    let listed = host.ledger(APP, "", 0).await.expect("the ledger lists");
    assert_eq!(listed.len(), rows_when_full - 1, "every row of this app (the other app's login row aside)");

    // The sweep frees room (the filler is past privacy.ledger_days); the same calls work again.
    daemon.clock.advance_ms(2 * DAY_MS);
    while retention::prune(&broker).await.ledger > 0 {}
    within("phone", r.call(v1::GetPhoneNumberRequest {})).await.expect("room again");
    within("pay", r.call(payment("order-after"))).await.expect("paid");
    assert_eq!(within("the host saw it", seen.recv()).await.as_deref(), Some("order-after"));
}

/// `register-app --rotate` of an app whose secret is set in the config is refused with a clear
/// FAILED_PRECONDITION (the config's secret would come back at the next start and undo it); the
/// config's secret keeps working, before and after a restart. An app registered through the admin
/// API rotates, and its rotated secret is the one that works after a restart.
#[tokio::test]
async fn a_config_pinned_secret_is_not_rotated_and_a_rotation_survives_a_restart() {
    const PINNED: &str = "wxpinnedsecret01";
    const PINNED_SECRET: &str = "the-secret-in-the-config";
    let dir = tempfile::Builder::new().prefix("brokerd-test").tempdir().expect("temp dir");
    let mut config = miniapp_brokerd::Config::ephemeral_in(dir.path());
    config.ephemeral = false;
    let pinned = miniapp_brokerd::config::AppConfig { union_group: None, secret: Some(PINNED_SECRET.into()) };
    config.apps.insert(PINNED.into(), pinned);
    let mut daemon = Daemon::start_in(dir, config.clone()).await;
    // Whether `secret` logs a backend of `app_id` in, with a fresh login code of `daemon`'s.
    async fn logs_in(daemon: &Daemon, host: &HostClient, app_id: &str, secret: &str) -> bool {
        let r = renderer(daemon, host, app_id).await;
        let code = within("login", r.call(v1::LoginRequest::default())).await.expect("login").code;
        let mut ex = ExchangeClient::new(connect::channel(&daemon.address()).await.expect("channel"));
        let request = v1::Code2SessionRequest { app_id: app_id.into(), secret: secret.into(), code };
        within("code2session", ex.code2_session(request)).await.is_ok()
    }

    let (host, _seen) = paying_host(&daemon, "u1").await;
    let refused = host.register_app(PINNED, true).await.expect_err("a pinned secret is not rotated");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert_eq!(
        refused.message(),
        format!(
            "the secret of {PINNED} is set in the config (apps.{PINNED}.secret) and comes back at every start: \
             change it there and restart the daemon"
        )
    );
    let kept = host.register_app(PINNED, false).await.expect("registering without --rotate changes nothing");
    assert!(!kept.created && kept.secret.is_empty(), "{kept:?}");
    assert!(logs_in(&daemon, &host, PINNED, PINNED_SECRET).await, "the config's secret still works");

    let first = host.register_app(APP, false).await.expect("register").secret;
    let rotated = host.register_app(APP, true).await.expect("rotate");
    assert!(rotated.created && rotated.secret != first);
    drop(host);

    let dir = within("shutdown", daemon.stop()).await;
    daemon = Daemon::start_in(dir, config).await;
    let (host, _seen) = paying_host(&daemon, "u1").await;
    assert!(logs_in(&daemon, &host, PINNED, PINNED_SECRET).await, "the config's secret after a restart");
    assert!(logs_in(&daemon, &host, APP, &rotated.secret).await, "the rotation held over the restart");
    assert!(!logs_in(&daemon, &host, APP, &first).await, "the secret it replaced does not come back");
}
