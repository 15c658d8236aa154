//! The backend exchange is rate-limited per app, whichever surface it arrives on (the gRPC
//! `Exchange` service here; the HTTP API in tests/backend_http.rs shares the same platform bucket).
//! Only attempts that prove the app (its secret) draw on it; wrong secrets draw on a failure bucket
//! of their own. Over a limit an attempt gets WeChat's errcode 45011 and changes nothing; another
//! app is unaffected. Refusals never echo unvalidated input into the daemon's logs.

mod support;

use std::{
    io::Write,
    sync::{Arc, Mutex, OnceLock},
};

use miniapp_broker_client::{
    connect,
    proto::v1::{self, ExchangeError, exchange_client::ExchangeClient},
};
use prost::Message;
use support::{Daemon, user, within};
use tonic::Code;

/// Attempts an app may make back to back before the limit must have answered (the default burst
/// is well below it; the test's own config lowers it further where it says so).
const ATTEMPTS: usize = 400;

fn errcode(s: &tonic::Status) -> (Code, i32, String) {
    let e = ExchangeError::decode(s.details()).expect("exchange failures carry an ExchangeError");
    (s.code(), e.errcode, e.errmsg)
}

/// Everything the daemon logs while this test binary runs, kept for inspection.
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = logs.clone();
        tracing_subscriber::fmt()
            .with_env_filter("info")
            .with_ansi(false)
            .with_writer(move || Sink(sink.clone()))
            .init();
        logs
    })
    .clone()
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn exchange_attempts_are_rate_limited_per_app_with_errcode_45011() {
    let daemon = Daemon::start().await;
    let host = within("host", daemon.host().user(user("u1")).connect()).await.expect("host connects");
    let secret_a = host.register_app("wxlimited0000001", false).await.unwrap().secret;
    let secret_b = host.register_app("wxbystander00001", false).await.unwrap().secret;
    let mut exchange = ExchangeClient::new(connect::channel(&daemon.address()).await.expect("channel"));

    // A backend with the secret guessing codes is stopped by the app's bucket.
    let mut limited_after = None;
    for attempt in 0..ATTEMPTS {
        let request = v1::Code2SessionRequest {
            app_id: "wxlimited0000001".into(),
            secret: secret_a.clone(),
            code: format!("guess-{attempt}"),
        };
        let status = within("code2Session", exchange.code2_session(request)).await.unwrap_err();
        match errcode(&status) {
            (Code::InvalidArgument, 40029, _) => {}
            (Code::ResourceExhausted, 45011, msg) => {
                assert!(msg.contains("limit"), "errmsg {msg:?}");
                limited_after = Some(attempt);
                break;
            }
            other => panic!("attempt {attempt}: unexpected {other:?}"),
        }
    }
    let limited_after = limited_after.expect("no 45011 within the attempts: exchanges are not rate-limited");
    assert!(limited_after >= 10, "the burst allows a normal backend some attempts ({limited_after})");

    // Over the limit, even a real code is refused.
    let launched = host.launch_app("wxlimited0000001", r#"{"apiVersion":"v2"}"#).await.unwrap();
    let renderer = daemon.renderer(&launched.launch_token).await;
    let login = renderer.call(v1::LoginRequest::default()).await.expect("login");
    let request = v1::Code2SessionRequest {
        app_id: "wxlimited0000001".into(),
        secret: secret_a.clone(),
        code: login.code.clone(),
    };
    let refused = exchange.code2_session(request).await.unwrap_err();
    assert_eq!(errcode(&refused).1, 45011);

    // Another app's backend is unaffected.
    let other = v1::Code2SessionRequest { app_id: "wxbystander00001".into(), secret: secret_b, code: "nope".into() };
    assert_eq!(errcode(&exchange.code2_session(other).await.unwrap_err()).1, 40029);
}

/// Wrong secrets never draw on the app's bucket: a flood of them (registered app id or not) is
/// stopped by the failure bucket (40125, then 45011), while the app's real backend, with its
/// secret, keeps exchanging codes over gRPC.
#[tokio::test]
async fn wrong_secrets_are_limited_apart_and_never_lock_out_the_right_one() {
    let daemon = Daemon::start_with(|c| {
        c.limits.exchanges_per_minute_per_app = 1;
        c.limits.exchange_burst_per_app = 10;
    })
    .await;
    let host = within("host", daemon.host().user(user("u1")).connect()).await.expect("host connects");
    let secret = host.register_app("wxlimited0000001", false).await.unwrap().secret;
    let launched = host.launch_app("wxlimited0000001", r#"{"apiVersion":"v2"}"#).await.unwrap();
    let renderer = daemon.renderer(&launched.launch_token).await;
    let mut exchange = ExchangeClient::new(connect::channel(&daemon.address()).await.expect("channel"));

    let mut limited_after = None;
    for attempt in 0..ATTEMPTS {
        // Registered and unknown app ids alternate: they hear the same and share one bucket.
        let app_id = if attempt % 2 == 0 { "wxlimited0000001" } else { "wxnosuchapp00001" };
        let request =
            v1::Code2SessionRequest { app_id: app_id.into(), secret: format!("guess-{attempt}"), code: "c".into() };
        let status = within("code2Session", exchange.code2_session(request)).await.unwrap_err();
        match errcode(&status) {
            (Code::Unauthenticated, 40125, msg) => assert_eq!(msg, "invalid appsecret"),
            (Code::ResourceExhausted, 45011, _) => {
                limited_after = Some(attempt);
                break;
            }
            other => panic!("attempt {attempt}: unexpected {other:?}"),
        }
    }
    let limited_after = limited_after.expect("wrong secrets are never limited");
    assert!(limited_after > 10, "more wrong secrets than the app's whole bucket were taken ({limited_after})");

    // The app's bucket is whole: its real backend exchanges its codes, up to its burst.
    for i in 0..10 {
        let code = within("login", renderer.call(v1::LoginRequest::default())).await.expect("login").code;
        let request = v1::Code2SessionRequest { app_id: "wxlimited0000001".into(), secret: secret.clone(), code };
        within("code2Session", exchange.code2_session(request)).await.unwrap_or_else(|s| panic!("exchange {i}: {s:?}"));
    }
}

#[tokio::test]
async fn refused_exchanges_log_no_unvalidated_input() {
    let logs = captured_logs();
    let daemon = Daemon::start().await;
    let host = within("host", daemon.host().connect()).await.expect("host connects");
    host.register_app("wxlogged00000001", false).await.unwrap();
    let mut exchange = ExchangeClient::new(connect::channel(&daemon.address()).await.expect("channel"));

    let forged = "wxnosuchapp\nINFO forged-line-7d1f app_id=wxlogged00000001 code exchanged";
    let requests = [
        (forged.to_owned(), "s".to_owned(), "c".to_owned()),
        ("wxlogged00000001".to_owned(), "secret-marker-7d1f".to_owned(), "code-marker-7d1f".to_owned()),
    ];
    for (app_id, secret, code) in requests {
        let request = v1::Code2SessionRequest { app_id, secret, code };
        within("code2Session", exchange.code2_session(request)).await.unwrap_err();
    }
    let text = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    assert!(
        text.contains("exchange refused") || text.contains("code exchange refused"),
        "refusals are logged:\n{text}"
    );
    assert!(!text.contains("7d1f"), "unvalidated input reached the log:\n{text}");
}
