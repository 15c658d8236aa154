//! What the platformd end-to-end tests share: `serve` processes of the real binary, the tenant they
//! serve, a real daemon in remote mode with a real host and renderer, and a plain HTTP client.

#![allow(dead_code)] // each test file uses its own part

use std::{net::SocketAddr, path::Path, process::Stdio, time::Duration};

use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioExecutor;
use miniapp_broker_client::{
    HostClient, RendererClient,
    proto::v1::{self, SignedInUser, UserProfile},
};
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    process::{Child, Command},
};

pub const BIN: &str = env!("CARGO_BIN_EXE_miniapp-platformd");
pub const APP: &str = "wx-remote-app";
pub const WECHATPY_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../clients/python/backend_wechatpy.py");
pub const WECHATPY_INSTALL: &str = "python3 -m pip install -r clients/python/backend-requirements.txt";

/// Without python3 or wechatpy the wechatpy test fails with the install command (scripts/test
/// installs it): it never passes unrun.
pub async fn require_wechatpy() {
    let probe = Command::new("python3").args(["-c", "import wechatpy"]).kill_on_drop(true).output();
    match within("python3 probe", probe).await {
        Err(e) => panic!("python3 is not available ({e}); install Python 3, then: {WECHATPY_INSTALL}"),
        Ok(out) if !out.status.success() => panic!(
            "wechatpy is not installed; run: {WECHATPY_INSTALL}\n{}",
            String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or_default()
        ),
        Ok(_) => {}
    }
}

pub async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), f).await.unwrap_or_else(|_| panic!("{what}: no answer within 30s"))
}

/// Runs a platformd command to completion and returns its stdout as JSON.
pub async fn command_json(args: &[&str]) -> Value {
    let out = within("platformd command", Command::new(BIN).args(args).kill_on_drop(true).output()).await.unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// One `serve` process: its addresses, read from its start-up log line.
pub struct Instance {
    pub child: Child,
    pub http: SocketAddr,
    pub daemon: SocketAddr,
    /// Every line it logged, until its stderr closes.
    pub log: tokio::task::JoinHandle<String>,
}

impl Instance {
    pub async fn start(database_url: &str, http: &str, daemon: &str) -> Instance {
        Instance::start_with(database_url, http, daemon, &["--database-deadline-ms", "500"]).await
    }

    /// [`Instance::start`] with more flags (`--tls-cert`, ...).
    pub async fn start_with(database_url: &str, http: &str, daemon: &str, extra: &[&str]) -> Instance {
        let mut child = Command::new(BIN)
            .args(["serve", "--database-url", database_url, "--listen", http, "--daemon-listen", daemon])
            .args(extra)
            .args(["--log-json"])
            // 200 codes of one user outstanding at once (the default keeps the latest 100).
            .args(["--max-codes-per-user", "256"])
            // 400 redemption attempts at once (the per-app limit has its own test).
            .args(["--exchanges-per-minute-per-app", "6000000", "--exchange-burst-per-app", "100000"])
            .env("MINIAPP_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("platformd starts");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let (http, daemon) = within("platform serving", async {
            loop {
                let line = lines.next_line().await.unwrap().expect("platformd exited before serving");
                let Ok(v) = serde_json::from_str::<Value>(&line) else { continue };
                if v["fields"]["message"] == "platform serving" {
                    let addr = |k: &str| v["fields"][k].as_str().unwrap().parse::<SocketAddr>().unwrap();
                    return (addr("listen"), addr("daemon_listen"));
                }
            }
        })
        .await;
        // Keep draining its log so it never blocks on a full pipe.
        let log = tokio::spawn(async move {
            let mut log = String::new();
            while let Ok(Some(line)) = lines.next_line().await {
                log.push_str(&line);
                log.push('\n');
            }
            log
        });
        Instance { child, http, daemon, log }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.http)
    }

    pub async fn kill(&mut self) {
        self.child.kill().await.unwrap();
    }

    /// What it logged after its start-up line (once it exited).
    pub async fn log(self) -> String {
        within("its log", self.log).await.unwrap()
    }
}

/// A plain HTTP/1.1 client (a backend would use its own; wechatpy is the real one below).
#[derive(Clone)]
pub struct Http {
    pub client:
        hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Full<bytes::Bytes>>,
}

impl Http {
    pub fn new() -> Http {
        Http { client: hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http() }
    }

    pub async fn get(&self, base: &str, path: &str) -> (u16, Value) {
        let uri: hyper::Uri = format!("{base}{path}").parse().unwrap();
        let response = within("http", self.client.get(uri)).await.expect("http answers");
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    /// POST `json` to `path`: the status and the JSON answer.
    pub async fn post(&self, base: &str, path: &str, json: &Value) -> (u16, Value) {
        let request = hyper::Request::post(format!("{base}{path}"))
            .header("content-type", "application/json")
            .body(Full::new(bytes::Bytes::from(json.to_string())))
            .unwrap();
        let response = within("http", self.client.request(request)).await.expect("http answers");
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    /// The status of a GET, `None` when the connection failed or closed without an answer.
    pub async fn try_get(&self, base: &str, path: &str) -> (Option<u16>, ()) {
        let uri: hyper::Uri = format!("{base}{path}").parse().unwrap();
        (within("http", self.client.get(uri)).await.ok().map(|r| r.status().as_u16()), ())
    }
}

pub fn user(uid: &str) -> SignedInUser {
    SignedInUser {
        uid: uid.into(),
        profile: Some(UserProfile {
            nick_name: "Nick".into(),
            avatar_url: String::new(),
            phone_number: "+86 138 0013 8000".into(),
            email: format!("{uid}@example.invalid"),
        }),
    }
}

/// The tenant of these tests: a superapp and its app registered at the platform.
pub struct Tenant {
    pub client_key: String,
    pub client_secret: String,
    pub app_secret: String,
}

pub async fn tenant(database_url: &str) -> Tenant {
    let sa = command_json(&["superapp", "add", "acme", "--json", "--database-url", database_url]).await;
    let app =
        command_json(&["register-app", APP, "--superapp", "acme", "--json", "--database-url", database_url]).await;
    assert_eq!(app["app_id"], APP);
    Tenant {
        client_key: sa["client_key"].as_str().unwrap().into(),
        client_secret: sa["client_secret"].as_str().unwrap().into(),
        app_secret: app["secret"].as_str().unwrap().into(),
    }
}

/// A daemon in remote mode pointed at `daemon_addr`, with a host and a v2 renderer of the app.
pub struct Desktop {
    pub _dir: tempfile::TempDir,
    pub server: miniapp_brokerd::Server,
    pub host: HostClient,
    pub renderer: RendererClient,
}

pub async fn desktop(t: &Tenant, daemon_addr: SocketAddr, timeout_ms: u64) -> Desktop {
    desktop_at(t, &format!("http://{daemon_addr}"), None, timeout_ms).await
}

/// [`desktop`] for a platform at `url` (`https://…` with the CA in `ca_file`).
pub async fn desktop_at(t: &Tenant, url: &str, ca_file: Option<&Path>, timeout_ms: u64) -> Desktop {
    let (dir, config) = remote_config(t, url, ca_file, timeout_ms);
    let server = miniapp_brokerd::start(config).await.expect("daemon starts in remote mode");
    connect_desktop(dir, server).await
}

/// The config of a daemon in remote mode pointed at the platform at `url`, in its own directory.
pub fn remote_config(
    t: &Tenant,
    url: &str,
    ca_file: Option<&Path>,
    timeout_ms: u64,
) -> (tempfile::TempDir, miniapp_brokerd::Config) {
    let dir = tempfile::Builder::new().prefix("brokerd-remote").tempdir().unwrap();
    let secret_file = dir.path().join("client.secret");
    std::fs::write(&secret_file, &t.client_secret).unwrap();
    let mut config = miniapp_brokerd::Config::ephemeral_in(dir.path());
    config.platform.url = Some(url.to_owned());
    config.platform.ca_file = ca_file.map(Path::to_path_buf);
    config.platform.client_key = Some(t.client_key.clone());
    config.platform.client_secret_file = Some(secret_file);
    config.platform.timeout_ms = timeout_ms;
    // Hundreds of logins of one user back to back (the per-user rate has its own tests).
    config.limits.calls_per_second_per_user = 100_000;
    config.limits.burst_per_user = 100_000;
    (dir, config)
}

/// A host signed in as u1 and a v2 renderer of the app, on a started daemon.
pub async fn connect_desktop(dir: tempfile::TempDir, server: miniapp_brokerd::Server) -> Desktop {
    let host = within(
        "host",
        miniapp_broker_client::HostBuilder::new(server.address(), server.host_token())
            .user(user("u1"))
            .handle(|_app, _r: v1::GetUserInfoRequest| async move {
                Ok(v1::GetUserInfoResponse {
                    user_info: Some(v1::UserInfo {
                        nick_name: "Nick".into(),
                        language: "en".into(),
                        ..Default::default()
                    }),
                    raw_data: "host-raw-data".into(),
                    signature: "host-signature".into(),
                    ..Default::default()
                })
            })
            .connect(),
    )
    .await
    .unwrap();
    let launch = host.launch_app(APP, r#"{"apiVersion":"v2"}"#).await.unwrap();
    let renderer = RendererClient::connect(server.address(), &launch.launch_token).await.unwrap();
    Desktop { _dir: dir, server, host, renderer }
}

pub async fn login(r: &RendererClient) -> Result<String, v1::ApiFailure> {
    r.call(v1::LoginRequest::default()).await.map(|l| l.code)
}

pub fn session_path(secret: &str, code: &str) -> String {
    format!("/sns/jscode2session?appid={APP}&secret={secret}&js_code={code}&grant_type=authorization_code")
}

/// Runs openssl with `args` in `dir`.
pub fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl makes the test's certificates (apt-get install openssl)");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A test CA and a certificate it signed for 127.0.0.1 and localhost, made by openssl: (the CA's
/// certificate, the server's chain, its key).
pub fn certificate(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    openssl(
        dir,
        &[&["req", "-x509"], &ec[..], &["-days", "1", "-subj", "/CN=test CA", "-keyout", "ca.key", "-out", "ca.pem"]]
            .concat(),
    );
    openssl(
        dir,
        &[&["req"], &ec[..], &["-subj", "/CN=localhost", "-keyout", "key.pem", "-out", "server.csr"]].concat(),
    );
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1,DNS:localhost\n").unwrap();
    openssl(
        dir,
        &["x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "1"]
            .into_iter()
            .chain(["-extfile", "san.ext", "-out", "cert.pem"])
            .collect::<Vec<_>>(),
    );
    (dir.join("ca.pem"), dir.join("cert.pem"), dir.join("key.pem"))
}

/// GET `path` over TLS (trusting only the CA `ca`), HTTP/1.1: the status line and the body.
pub async fn https_get(addr: std::net::SocketAddr, ca: &std::path::Path, path: &str) -> (String, String) {
    use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = within("TLS handshake", connector.connect(name, tcp)).await.expect("the platform's certificate");
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    within("HTTPS answer", tls.read_to_string(&mut answer)).await.ok();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    (head.lines().next().unwrap_or("").to_owned(), body.to_owned())
}
