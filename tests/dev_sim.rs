//! `miniapp-brokerd dev-sim` over real HTTP (the browser tests in sim/ drive it with Chromium):
//! the real binary with its own in-memory daemon, a real HTTP/1.1 client. Its page is served with
//! strict Content-Security-Policies, its API answers only its own page's Origin at its own Host,
//! a refused request changes nothing, and the bridge calls the daemon with the launch token the
//! panel holds.

mod support;

use std::process::Stdio;

use axum::{
    body::Bytes,
    http::{Method, Request},
};
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use miniapp_brokerd::dev_sim::{APP_CSP, PANEL_CSP};
use serde_json::{Value, json};
use support::within;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

const BIN: &str = env!("CARGO_BIN_EXE_miniapp-brokerd");

/// A running `dev-sim` and the address of its page.
struct Sim {
    child: Child,
    /// `127.0.0.1:PORT`
    address: String,
    _dir: tempfile::TempDir,
}

impl Sim {
    async fn start(args: &[&str]) -> Sim {
        let dir = tempfile::tempdir().unwrap();
        let none = dir.path().join("none.sock");
        let mut child = Command::new(BIN)
            .args(["dev-sim", "--listen", "127.0.0.1:0", "--socket"])
            .arg(&none)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn dev-sim");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let address = within("dev-sim's URL", async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(rest) = line.strip_prefix("dev-sim: open http://") {
                    return rest.split('/').next().unwrap().to_owned();
                }
            }
            panic!("dev-sim exited without printing its URL");
        })
        .await;
        // Keep reading so the simulator never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Sim { child, address, _dir: dir }
    }

    fn origin(&self) -> String {
        format!("http://{}", self.address)
    }
}

/// One HTTP/1.1 request with the given headers; the status, the headers and the body.
async fn send(
    sim: &Sim,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, axum::http::HeaderMap, String) {
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut request = Request::builder().method(method).uri(format!("http://{}{path}", sim.address));
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let request = request.body(Full::new(Bytes::from(body.to_owned()))).unwrap();
    let response = within(path, client.request(request)).await.expect("HTTP response");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = within("body", response.into_body().collect()).await.unwrap().to_bytes();
    (status, headers, String::from_utf8_lossy(&bytes).into_owned())
}

/// A POST from the simulator's own page.
async fn api(sim: &Sim, path: &str, body: Value) -> (u16, Value) {
    let origin = sim.origin();
    let (status, _, text) = send(sim, Method::POST, path, &[("origin", &origin)], &body.to_string()).await;
    (status, serde_json::from_str(&text).unwrap_or_else(|_| panic!("{path}: not JSON: {text}")))
}

#[tokio::test]
async fn pages_carry_strict_csps_and_the_api_answers_only_its_own_origin_and_host() {
    let sim = Sim::start(&[]).await;
    let (status, headers, body) = send(&sim, Method::GET, "/", &[], "").await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-security-policy"], PANEL_CSP);
    assert!(PANEL_CSP.contains("script-src 'self'") && !PANEL_CSP.contains("unsafe"));
    assert!(body.contains("/sim/panel.js"));
    let (status, headers, page) = send(&sim, Method::GET, "/app/index.html", &[], "").await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-security-policy"], APP_CSP);
    assert!(APP_CSP.starts_with("sandbox allow-scripts") && APP_CSP.contains("connect-src 'none'"));
    assert!(page.contains("<head><script src=\"/sim/bridge.js\"></script>"), "wx comes first: {page}");
    let (_, _, bridge) = send(&sim, Method::GET, "/sim/bridge.js", &[], "").await;
    assert!(bridge.contains("wx-invoke") && bridge.contains("requestMidasPaymentGameItem"));

    let (status, state) = api(&sim, "/api/state", json!({})).await;
    assert_eq!(status, 200, "{state}");
    assert_eq!(state["user"]["uid"], "dev-user-1");
    let token = state["app"]["launchToken"].as_str().unwrap().to_owned();

    // Refused: another site's Origin, the sandboxed frame's opaque one, none, a rebound Host, a GET.
    let own = sim.origin();
    let forged = r#"{"uid":""}"#;
    for headers in [
        vec![("origin", "http://evil.example")],
        vec![("origin", "null")],
        vec![],
        vec![("origin", own.as_str()), ("sec-fetch-site", "cross-site")],
        vec![("origin", "http://evil.example:1"), ("host", "evil.example:1")],
    ] {
        let (status, _, body) = send(&sim, Method::POST, "/api/user", &headers, forged).await;
        assert_eq!(status, 403, "{headers:?}: {body}");
        assert!(body.contains("refused"), "{body}");
    }
    let (status, _, _) = send(&sim, Method::GET, "/api/state", &[("origin", &own)], "").await;
    assert_eq!(status, 403);
    let (status, _, _) = send(&sim, Method::GET, "/", &[("host", "evil.example")], "").await;
    assert_eq!(status, 403, "a DNS-rebound name does not get the page either");
    // A uid the profile does not have: refused too. None of it signed anyone out.
    let (status, _) = api(&sim, "/api/user", json!({ "uid": "mallory" })).await;
    assert_eq!(status, 400);
    let (_, state) = api(&sim, "/api/state", json!({})).await;
    assert_eq!(state["user"]["uid"], "dev-user-1");

    // The bridge: the panel's token calls the daemon; a made-up token is the daemon's to refuse.
    let (status, login) = api(&sim, "/api/invoke", json!({ "token": token, "api": "login" })).await;
    assert_eq!(status, 200);
    assert_eq!(login["ok"], true, "{login}");
    assert_eq!(login["result"]["errMsg"], "login:ok");
    let (_, refused) = api(&sim, "/api/invoke", json!({ "token": "not-a-token", "api": "login" })).await;
    assert_eq!(refused["ok"], false, "{refused}");
    assert!(refused["result"]["errMsg"].as_str().unwrap().starts_with("login:fail "), "{refused}");
    let (status, _) = api(&sim, "/api/invoke", json!({ "token": token, "api": "login", "params": [1] })).await;
    assert_eq!(status, 400, "params must be an object");
    let (_, state) = api(&sim, "/api/state", json!({})).await;
    let log = state["log"].as_array().unwrap();
    assert_eq!(log.len(), 2, "{log:?}");
    assert_eq!(
        (log[0]["api"].as_str(), log[0]["route"].as_str(), log[0]["version"].as_str()),
        (Some("login"), Some("default"), Some("v2"))
    );
    drop(sim.child);
}

#[tokio::test]
async fn dev_sim_listens_on_loopback_only() {
    let out = Command::new(BIN)
        .args(["dev-sim", "--listen", "0.0.0.0:0", "--socket", "/nonexistent/none.sock"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("loopback address only"), "{err}");
}
