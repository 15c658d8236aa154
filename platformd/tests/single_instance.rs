//! One `miniapp-platformd serve` on SQLite (the README's local chain, no PostgreSQL): a real daemon
//! in remote mode issues codes through it, a backend redeems them at its HTTP API, and the user's
//! ledger shows the redemptions. Then TLS on both listeners (a certificate made by openssl for the
//! test), and the refusal of a plain listener off loopback.

mod support;

use miniapp_broker_client::proto::v1;
use support::*;
use tokio::process::Command;

fn sqlite_url(dir: &tempfile::TempDir) -> String {
    format!("sqlite://{}", dir.path().join("platform.db").display())
}

#[tokio::test]
async fn a_sqlite_instance_serves_the_local_chain_and_the_ledger_shows_its_redemptions() {
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_url(&dir);
    let t = tenant(&url).await;
    let a = Instance::start(&url, "127.0.0.1:0", "127.0.0.1:0").await;
    let d = desktop(&t, a.daemon, 3000).await;
    let http = Http::new();
    assert_eq!(http.get(&a.url(), "/readyz").await.0, 200);
    assert_eq!(http.get(&a.url(), "/healthz").await.0, 200);

    let code = within("login", login(&d.renderer)).await.expect("login through the platform");
    let (_, body) = http.get(&a.url(), &session_path(&t.app_secret, &code)).await;
    assert!(body["openid"].is_string() && body["session_key"].is_string(), "{body}");
    let (_, again) = http.get(&a.url(), &session_path(&t.app_secret, &code)).await;
    assert_eq!(again["errcode"], 40163, "{again}");
    let unredeemed = within("login", login(&d.renderer)).await.expect("a second login");
    assert_ne!(unredeemed, code);
    within("checkSession", d.renderer.call(v1::CheckSessionRequest::default())).await.expect("the session is live");

    // The ledger: two login codes issued (one row, coalesced), the redeemed one stamped by the
    // platform's report.
    let ledger = within("ledger", d.host.ledger(APP, "u1", 0)).await.unwrap();
    let logins: Vec<_> = ledger.iter().filter(|r| r.api == "login").collect();
    assert_eq!(logins.iter().map(|r| r.count).sum::<u64>(), 2, "{ledger:?}");
    assert_eq!(logins.iter().map(|r| r.redeemed_count).sum::<u64>(), 1, "{ledger:?}");
    assert!(logins.iter().all(|r| r.redeemed_via == "backend_http"), "{ledger:?}");
}

#[tokio::test]
async fn with_a_certificate_both_listeners_speak_tls_and_the_daemon_trusts_its_ca_file() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = certificate(dir.path());
    let url = sqlite_url(&dir);
    let t = tenant(&url).await;
    let (cert_s, key_s) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let a = Instance::start_with(&url, "127.0.0.1:0", "127.0.0.1:0", &["--tls-cert", cert_s, "--tls-key", key_s]).await;

    // The daemon API over TLS, trusting the test's CA.
    let d = desktop_at(&t, &format!("https://localhost:{}", a.daemon.port()), Some(&ca), 3000).await;
    let code = within("login", login(&d.renderer)).await.expect("login over TLS");
    // The backend HTTP API over TLS.
    let (status, body) = https_get(a.http, &ca, &session_path(&t.app_secret, &code)).await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert!(body.contains("\"openid\""), "{body}");
    assert!(https_get(a.http, &ca, "/readyz").await.0.starts_with("HTTP/1.1 200"));
    // Plain HTTP to the TLS listener gets no API answer.
    let (plain_status, _) = Http::new().try_get(&a.url(), "/healthz").await;
    assert_ne!(plain_status, Some(200), "the backend listener answered plain HTTP");

    // A daemon that does not trust the certificate hears "platform unavailable".
    let untrusting = desktop_at(&t, &format!("https://localhost:{}", a.daemon.port()), None, 1000).await;
    let failure = within("login", login(&untrusting.renderer)).await.expect_err("an untrusted certificate");
    assert_eq!(failure.err_msg, "login:fail platform unavailable");
}

#[tokio::test]
async fn a_plain_listener_off_loopback_is_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_url(&dir);
    let out = within(
        "serve",
        Command::new(BIN)
            .args(["serve", "--database-url", &url, "--listen", "0.0.0.0:0", "--daemon-listen", "127.0.0.1:0"])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--listen 0.0.0.0:0 is not a loopback address"), "{stderr}");
    // Allowed (a TLS proxy in front), it serves.
    let a = Instance::start_with(&url, "0.0.0.0:0", "127.0.0.1:0", &["--allow-plain-remote"]).await;
    let local = format!("http://127.0.0.1:{}", a.http.port());
    assert_eq!(within("healthz", Http::new().get(&local, "/healthz")).await.0, 200);
}

/// getUserInfo in remote mode: the platform signs and encrypts the host's profile with the
/// session's key (which never reaches the desktop); the backend checks the signature with the key
/// it redeemed: `sha1(rawData + session_key)`, computed here independently.
#[tokio::test]
async fn get_user_info_in_remote_mode_is_signed_with_the_key_the_backend_redeems() {
    use sha1::{Digest, Sha1};
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_url(&dir);
    let t = tenant(&url).await;
    let a = Instance::start(&url, "127.0.0.1:0", "127.0.0.1:0").await;
    let d = desktop(&t, a.daemon, 3000).await;
    let code = within("login", login(&d.renderer)).await.expect("login");
    let (_, session) = Http::new().get(&a.url(), &session_path(&t.app_secret, &code)).await;
    let key = session["session_key"].as_str().expect("a session key").to_owned();
    let info =
        within("getUserInfo", d.renderer.call(v1::GetUserInfoRequest { with_credentials: true, lang: "en".into() }))
            .await
            .expect("getUserInfo through the platform");
    assert_ne!(info.raw_data, "host-raw-data", "the platform's rawData, not the host's");
    assert!(info.raw_data.contains("Nick"), "{}", info.raw_data);
    let expected: String =
        Sha1::digest(format!("{}{key}", info.raw_data).as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(info.signature, expected);
    assert!(!info.encrypted_data.is_empty() && !info.iv.is_empty());
}
