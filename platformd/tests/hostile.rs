//! Hostile clients of one `miniapp-platformd serve` (SQLite) past each listener's bounds: raw TCP
//! peers that connect and say nothing, drip bytes or stall a TLS handshake, more of them than the
//! listener's connection cap, while a well-behaved client still gets its answer; and a real gRPC
//! client sending every daemon API field over its bound.

mod support;

use std::{
    net::SocketAddr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use miniapp_broker_proto::platform::v1::{self as pv1, platform_client::PlatformClient};
use support::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tonic::{
    Code, Request,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
};

fn sqlite_url(dir: &tempfile::TempDir) -> String {
    format!("sqlite://{}", dir.path().join("platform.db").display())
}

/// How long any one peer's fate may take to show in these tests.
const SETTLE: Duration = Duration::from_secs(5);
/// The HTTP/2 client preface.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The first bytes of a TLS ClientHello (a record header announcing 512 bytes, the handshake
/// header, the client version and part of its random): the rest never comes.
const PARTIAL_CLIENT_HELLO: &[u8] = &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03, 0xaa, 0xbb];

/// What a hostile peer does once connected.
#[derive(Debug, Clone, Copy)]
enum Peer {
    /// Nothing at all (and never reads).
    Silent,
    /// Sends these bytes at once, then nothing.
    Sends(&'static [u8]),
    /// Sends these bytes one at a time, 50 ms apart, then nothing.
    Drips(&'static [u8]),
}

/// A hostile peer's connection, watched until the server closes it.
struct Hostile {
    what: Peer,
    closed: tokio::task::JoinHandle<Instant>,
}

impl Hostile {
    /// Connects to `addr` (the kernel completes it even while the listener is at its cap) and
    /// starts behaving as `what`.
    async fn connect(addr: SocketAddr, what: Peer) -> Hostile {
        let stream = within("connect", TcpStream::connect(addr)).await.expect("the kernel takes the connection");
        let (mut read, mut write) = stream.into_split();
        let closed = tokio::spawn(async move {
            // The write half is kept open (a half-close would be an end of its own) until the
            // connection is closed.
            let sender = tokio::spawn(async move {
                match what {
                    Peer::Silent => {}
                    Peer::Sends(bytes) => {
                        let _ = write.write_all(bytes).await;
                    }
                    Peer::Drips(bytes) => {
                        for b in bytes {
                            if write.write_all(&[*b]).await.is_err() {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
                std::future::pending::<()>().await;
            });
            // Whatever the server writes (its HTTP/2 settings, a TLS alert) is read and dropped;
            // the connection is closed when the read ends.
            let mut buf = [0u8; 4096];
            while let Ok(1..) = read.read(&mut buf).await {}
            let at = Instant::now();
            sender.abort();
            at
        });
        Hostile { what, closed }
    }

    /// When the server closed it, `SETTLE` at most from now.
    async fn closed_at(self) -> Instant {
        match tokio::time::timeout(SETTLE, self.closed).await {
            Ok(done) => done.unwrap(),
            Err(_) => panic!("a {:?} peer's connection was still open {SETTLE:?} later", self.what),
        }
    }
}

/// A daemon-API client of `addr` (over TLS trusting `ca` when given) that counts the connections
/// it opens.
fn daemon_client(addr: SocketAddr, ca: Option<&Path>) -> (PlatformClient<Channel>, Arc<AtomicUsize>) {
    let scheme = if ca.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://localhost:{}", addr.port())).unwrap();
    if let Some(ca) = ca {
        let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()));
        endpoint = endpoint.tls_config(tls.domain_name("localhost")).unwrap();
    }
    let connects = Arc::new(AtomicUsize::new(0));
    let counted = connects.clone();
    let connector = tower::service_fn(move |_uri: tonic::codegen::http::Uri| {
        counted.fetch_add(1, Ordering::SeqCst);
        async move { TcpStream::connect(addr).await.map(hyper_util::rt::TokioIo::new) }
    });
    (PlatformClient::new(endpoint.connect_with_connector_lazy(connector)), connects)
}

/// `message` with the tenant's credentials.
fn signed<T>(t: &Tenant, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert("client-key", t.client_key.parse().unwrap());
    request.metadata_mut().insert("client-secret", t.client_secret.parse().unwrap());
    request
}

/// A call that must be answered within `SETTLE`.
async fn answered<T>(what: &str, call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>) -> T {
    match tokio::time::timeout(SETTLE, call).await {
        Ok(Ok(answer)) => answer.into_inner(),
        Ok(Err(status)) => panic!("{what}: {status:?}"),
        Err(_) => panic!("{what}: no answer within {SETTLE:?}"),
    }
}

/// Each hostile peer was closed, none before `timeout` after `start`.
async fn all_closed_no_sooner_than(peers: Vec<Hostile>, start: Instant, timeout: Duration) {
    for peer in peers {
        let what = peer.what;
        let after = peer.closed_at().await - start;
        assert!(after >= timeout, "a {what:?} peer was closed {after:?} after connecting, before {timeout:?}");
    }
}

#[tokio::test]
async fn silent_and_dripping_daemon_connections_are_closed_at_the_handshake_timeout_and_the_cap_holds() {
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_url(&dir);
    let t = tenant(&url).await;
    let flags = ["--daemon-max-connections", "2", "--daemon-handshake-timeout-ms", "300"];
    let a = Instance::start_with(&url, "127.0.0.1:0", "127.0.0.1:0", &flags).await;
    let timeout = Duration::from_millis(300);

    // Twice the cap: two hold the slots, two wait in the backlog behind them.
    let start = Instant::now();
    let mut peers = Vec::new();
    for what in [Peer::Silent, Peer::Sends(PREFACE), Peer::Drips(PREFACE), Peer::Silent] {
        peers.push(Hostile::connect(a.daemon, what).await);
    }
    // The honest daemon's connection waits behind all four: two rounds of the handshake timeout.
    let (mut client, connects) = daemon_client(a.daemon, None);
    let first = answered("redemptions", client.redemptions(signed(&t, pv1::RedemptionsRequest::default()))).await;
    assert!(first.redeemed.is_empty());
    let waited = start.elapsed();
    assert!(waited >= 2 * timeout, "answered after {waited:?}: the cap of 2 did not hold four silent peers");
    all_closed_no_sooner_than(peers, start, timeout).await;

    // A connection that started a call is past its handshake deadline: it is kept.
    tokio::time::sleep(3 * timeout).await;
    answered("redemptions", client.redemptions(signed(&t, pv1::RedemptionsRequest::default()))).await;
    assert_eq!(connects.load(Ordering::SeqCst), 1, "the honest connection was closed and reopened");
}

#[tokio::test]
async fn a_daemon_connection_idle_after_its_calls_is_recycled_at_its_maximum_age() {
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_url(&dir);
    let t = tenant(&url).await;
    let flags = ["--daemon-max-connections", "1", "--daemon-max-connection-age-ms", "500"];
    let a = Instance::start_with(&url, "127.0.0.1:0", "127.0.0.1:0", &flags).await;

    // One well-behaved client takes the only slot, calls, and stays connected (answering pings).
    let start = Instant::now();
    let (mut first, first_connects) = daemon_client(a.daemon, None);
    answered("first", first.redemptions(signed(&t, pv1::RedemptionsRequest::default()))).await;
    // Another is served once the first connection reaches its age and closes.
    let (mut second, _) = daemon_client(a.daemon, None);
    answered("second", second.redemptions(signed(&t, pv1::RedemptionsRequest::default()))).await;
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(500),
        "the second client was served after {waited:?}, within the first's age"
    );
    // The first reconnects for its next call (once the second's connection ages out in turn).
    answered("first again", first.redemptions(signed(&t, pv1::RedemptionsRequest::default()))).await;
    assert_eq!(first_connects.load(Ordering::SeqCst), 2, "the first connection was not closed at its age");
}

/// The HTTP/2 preface, an empty SETTINGS frame and the HEADERS of a gRPC call on stream 1 whose
/// body never comes (HPACK literals, no Huffman coding): a call the server starts and that never
/// ends on its own.
fn a_call_left_open() -> &'static [u8] {
    let headers = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/miniapp.platform.v1.Platform/Redemptions"),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ];
    let mut block = Vec::new();
    for (name, value) in headers {
        block.push(0x00); // literal, not indexed, new name
        block.push(name.len() as u8);
        block.extend_from_slice(name.as_bytes());
        block.push(value.len() as u8);
        block.extend_from_slice(value.as_bytes());
    }
    let mut bytes = PREFACE.to_vec();
    bytes.extend_from_slice(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]); // SETTINGS, empty
    let len = block.len() as u32;
    bytes.extend_from_slice(&len.to_be_bytes()[1..]);
    bytes.extend_from_slice(&[0x1, 0x4, 0, 0, 0, 1]); // HEADERS, END_HEADERS, stream 1
    bytes.extend_from_slice(&block);
    Box::leak(bytes.into_boxed_slice())
}

#[tokio::test]
async fn a_daemon_connection_that_neither_ends_its_call_nor_answers_the_goaway_is_closed_after_its_grace() {
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_url(&dir);
    let flags = [
        "--daemon-max-connections",
        "1",
        "--daemon-max-connection-age-ms",
        "300",
        "--daemon-connection-age-grace-ms",
        "300",
    ];
    let a = Instance::start_with(&url, "127.0.0.1:0", "127.0.0.1:0", &flags).await;

    // Its call started (so the handshake deadline is over) and stays open: the server's own
    // call timeout is 30 s, far past the age and its grace.
    let start = Instant::now();
    let peer = Hostile::connect(a.daemon, Peer::Sends(a_call_left_open())).await;
    let closed = peer.closed_at().await - start;
    assert!(closed >= Duration::from_millis(600), "closed after {closed:?}, before its age and grace");
}

#[tokio::test]
async fn silent_backend_connections_are_closed_at_the_header_timeout_and_the_cap_holds() {
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_url(&dir);
    let flags = ["--max-connections", "2", "--header-timeout-ms", "300"];
    let a = Instance::start_with(&url, "127.0.0.1:0", "127.0.0.1:0", &flags).await;
    let timeout = Duration::from_millis(300);

    let start = Instant::now();
    let mut peers = Vec::new();
    for what in [Peer::Silent, Peer::Drips(b"GET /healthz HTTP/1.1\r\n"), Peer::Silent, Peer::Silent] {
        peers.push(Hostile::connect(a.http, what).await);
    }
    let (status, _) = Http::new().get(&a.url(), "/healthz").await;
    assert_eq!(status, 200);
    let waited = start.elapsed();
    assert!(waited >= 2 * timeout, "answered after {waited:?}: the cap of 2 did not hold four silent peers");
    all_closed_no_sooner_than(peers, start, timeout).await;
}

#[tokio::test]
async fn stalled_tls_handshakes_hold_a_slot_of_either_listener_only_until_its_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = certificate(dir.path());
    let url = sqlite_url(&dir);
    let t = tenant(&url).await;
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let flags = [
        ["--tls-cert", cert],
        ["--tls-key", key],
        ["--max-connections", "2"],
        ["--header-timeout-ms", "300"],
        ["--daemon-max-connections", "2"],
        ["--daemon-handshake-timeout-ms", "300"],
    ]
    .concat();
    let a = Instance::start_with(&url, "127.0.0.1:0", "127.0.0.1:0", &flags).await;
    let timeout = Duration::from_millis(300);
    let stalls = [Peer::Silent, Peer::Sends(PARTIAL_CLIENT_HELLO), Peer::Drips(PARTIAL_CLIENT_HELLO)];

    // The backend listener: three stalled handshakes for two slots, then a real TLS client.
    let start = Instant::now();
    let mut peers = Vec::new();
    for what in stalls {
        peers.push(Hostile::connect(a.http, what).await);
    }
    let (status, body) = https_get(a.http, &ca, "/healthz").await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert_eq!(body, "ok\n");
    let waited = start.elapsed();
    assert!(waited >= timeout, "answered after {waited:?}: the stalled handshakes held no slot");
    all_closed_no_sooner_than(peers, start, timeout).await;

    // The daemon listener: the same, then a real daemon-API client over TLS.
    let start = Instant::now();
    let mut peers = Vec::new();
    for what in stalls {
        peers.push(Hostile::connect(a.daemon, what).await);
    }
    let (mut client, _) = daemon_client(a.daemon, Some(&ca));
    answered("redemptions over TLS", client.redemptions(signed(&t, pv1::RedemptionsRequest::default()))).await;
    let waited = start.elapsed();
    assert!(waited >= timeout, "answered after {waited:?}: the stalled handshakes held no slot");
    all_closed_no_sooner_than(peers, start, timeout).await;
}

/// Every row of every table of the SQLite database at `path`, as text.
fn snapshot(path: &Path) -> Vec<String> {
    let db = rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let tables: Vec<String> = db
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let mut rows = Vec::new();
    for table in tables {
        let mut statement = db.prepare(&format!("SELECT * FROM \"{table}\"")).unwrap();
        let columns = statement.column_count();
        let mut found = statement.query([]).unwrap();
        while let Some(row) = found.next().unwrap() {
            let values: Vec<rusqlite::types::Value> = (0..columns).map(|i| row.get(i).unwrap()).collect();
            rows.push(format!("{table}: {values:?}"));
        }
    }
    rows.sort();
    rows
}

#[tokio::test]
async fn every_daemon_api_field_over_its_bound_is_an_invalid_argument_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_url(&dir);
    let t = tenant(&url).await;
    let a = Instance::start(&url, "127.0.0.1:0", "127.0.0.1:0").await;
    let (mut c, _) = daemon_client(a.daemon, None);
    let db = dir.path().join("platform.db");

    // A session to call UserCredentials on, so its refusal is the field's and not the session's.
    let (app, uid) = (APP.to_owned(), "u1".to_owned());
    let started = pv1::StartSessionRequest { app_id: app.clone(), uid: uid.clone() };
    answered("start session", c.start_session(signed(&t, started))).await;
    let before = snapshot(&db);

    let long = "x".repeat(1025);
    let phone = pv1::ValueKind::PhoneNumber as i32;
    let login = |app_id: &str, uid: &str, auth_code: &str| pv1::IssueLoginCodeRequest {
        app_id: app_id.into(),
        uid: uid.into(),
        auth_code: auth_code.into(),
    };
    let value = |uid: &str, value: &str| pv1::IssueValueCodeRequest {
        app_id: app.clone(),
        uid: uid.into(),
        kind: phone,
        value: value.into(),
    };
    let credentials =
        |json: String| pv1::UserCredentialsRequest { app_id: app.clone(), uid: uid.clone(), user_info_json: json };
    let too_much_info = format!(r#"{{"nickName":"{}"}}"#, "n".repeat(16 * 1024));
    let too_many_ids = pv1::RedemptionsRequest { code_ids: vec!["0".repeat(64); 1001] };

    let mut refusals = Vec::new();
    refusals.push(("IssueLoginCode app_id", c.issue_login_code(signed(&t, login(&long, &uid, ""))).await.err()));
    refusals.push(("IssueLoginCode uid", c.issue_login_code(signed(&t, login(&app, &long, ""))).await.err()));
    refusals.push(("IssueLoginCode auth_code", c.issue_login_code(signed(&t, login(&app, &uid, &long))).await.err()));
    let session = |app_id: &str, uid: &str| pv1::StartSessionRequest { app_id: app_id.into(), uid: uid.into() };
    refusals.push(("StartSession app_id", c.start_session(signed(&t, session(&long, &uid))).await.err()));
    refusals.push(("StartSession uid", c.start_session(signed(&t, session(&app, &long))).await.err()));
    let check = pv1::CheckSessionRequest { app_id: app.clone(), uid: long.clone() };
    refusals.push(("CheckSession uid", c.check_session(signed(&t, check)).await.err()));
    refusals.push(("IssueValueCode uid", c.issue_value_code(signed(&t, value(&long, "+86 138"))).await.err()));
    refusals.push(("IssueValueCode value", c.issue_value_code(signed(&t, value(&uid, &long))).await.err()));
    let invalidate = pv1::InvalidateCodesRequest { app_id: app.clone(), uid: long.clone(), kind: 0 };
    refusals.push(("InvalidateCodes uid", c.invalidate_codes(signed(&t, invalidate)).await.err()));
    let changed = pv1::UserChangedRequest { old_uid: long.clone() };
    refusals.push(("UserChanged old_uid", c.user_changed(signed(&t, changed)).await.err()));
    refusals.push(("Redemptions code_ids", c.redemptions(signed(&t, too_many_ids)).await.err()));
    let info = credentials(too_much_info);
    refusals.push(("UserCredentials user_info_json", c.user_credentials(signed(&t, info)).await.err()));
    for (field, refusal) in &refusals {
        let status = refusal.as_ref().unwrap_or_else(|| panic!("{field} over its bound was taken"));
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
    }
    // A message over the decoding limit is refused by the codec before any field is read.
    let huge = login(&app, &uid, &"x".repeat(1024 * 1024));
    let status = c.issue_login_code(signed(&t, huge)).await.expect_err("a 1 MiB message");
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("too large"), "{status:?}");
    assert_eq!(snapshot(&db), before, "a refused call changed the database");

    // Each field at its bound is taken: the channel and the tenant still work.
    let at_bound = "y".repeat(1024);
    answered("a value at 1 KiB", c.issue_value_code(signed(&t, value(&uid, &at_bound)))).await;
    let login_code =
        answered("a login at the bounds", c.issue_login_code(signed(&t, login(&app, &at_bound, "")))).await;
    let info = format!(r#"{{"nickName":"{}"}}"#, "n".repeat(16 * 1024 - 15));
    assert_eq!(info.len(), 16 * 1024);
    answered("user info at 16 KiB", c.user_credentials(signed(&t, credentials(info)))).await;
    let ids = pv1::RedemptionsRequest { code_ids: vec![login_code.code_id.clone(); 1000] };
    let none = answered("1,000 ids", c.redemptions(signed(&t, ids))).await;
    assert!(none.redeemed.is_empty(), "{none:?}");
    assert_ne!(snapshot(&db), before, "the snapshot does not see what the calls wrote");
}
