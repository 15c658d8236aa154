//! The daemon's benchmark: what mediation costs against the transport's own floor, in one run.
//!
//! ```text
//! cargo bench -p miniapp-brokerd --bench broker            # full run (the figures to quote)
//! cargo bench -p miniapp-brokerd --bench broker -- --quick # under a minute
//! ```
//!
//! It measures, on the same machine and in the same run:
//! 1. **raw**: a 64-byte ping-pong over a plain Unix domain socket (blocking threads: the floor);
//! 2. **direct**: a tonic unary echo of a 64-byte message over a Unix domain socket, to a tiny echo
//!    service defined here (the cost of one gRPC hop);
//! 3. **mediated**: a v1 `login` from a renderer, forwarded by the real daemon (the release binary,
//!    as a child process) to a trivial host and back, over the client library's multiplexed stream
//!    (`RendererClient::call`, the default) and over the plain unary RPC (`call_unary`);
//! 4. **default**: a v2 `login` answered by the daemon itself, both ways.
//!
//! For each: p50/p99 latency with one client (the kinds are measured in interleaved rounds so that
//! drift on a shared machine hits them alike) and throughput with 64 concurrent clients, each on
//! its own connection (and, for renderers, its own app instance and stream). Then the daemon's RSS
//! growth with 5,000 idle connected renderers (each with an open Session stream), and the time from
//! spawning the daemon until its socket accepts. Figures go to `target/bench/summary.json` and a
//! table with the targets of issue 6.
//!
//! Clients run on a multi-thread tokio runtime (the default: one worker per CPU), the echo server on
//! another, the host on its own current-thread runtime and thread, the daemon in its own process.
//!
//! `--soak=KIND:SECS` (KIND: direct, mediated, mediated-unary, default, default-unary) skips the
//! report and keeps 64 clients busy for SECS seconds, printing the daemon's pid: for `perf record -p`.
//! `--idle-only [--idle-renderers=N]` runs only the idle-RSS part; with `BROKER_BENCH_WRAPPER` set
//! (e.g. `valgrind --tool=massif`) the daemon runs under that tool.

use std::{
    convert::Infallible,
    io::{Read, Write},
    os::unix::net::{UnixListener as StdUnixListener, UnixStream as StdUnixStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use futures::{StreamExt, stream};
use miniapp_broker_client::{
    HostBuilder, HostClient, RendererClient,
    proto::v1::{LoginRequest, LoginResponse, SignedInUser},
};
use tonic::{
    Request, Response, Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    codegen::{BoxFuture, Service, http},
    transport::Channel,
};

// ---------------------------------------------------------------------------------------------
// Parameters

const PAYLOAD: usize = 64;
const CONCURRENCY: usize = 64;
const HOST_CODE: &str = "0123456789abcdef0123456789abcdef";

#[derive(Debug, Clone, Copy)]
struct Params {
    /// Latency samples per kind.
    samples: usize,
    /// Latency rounds the samples are split into (kinds interleaved per round).
    rounds: usize,
    warmup: usize,
    throughput_secs: f64,
    throughput_warmup_secs: f64,
    startup_runs: usize,
    idle_renderers: usize,
}

impl Params {
    fn new(quick: bool, smoke: bool) -> Params {
        if smoke {
            // `cargo test` runs this target once without `--bench`: every path, a few calls each.
            Params {
                samples: 100,
                rounds: 1,
                warmup: 10,
                throughput_secs: 0.1,
                throughput_warmup_secs: 0.02,
                startup_runs: 1,
                idle_renderers: 20,
            }
        } else if quick {
            Params {
                samples: 3_000,
                rounds: 3,
                warmup: 300,
                throughput_secs: 1.0,
                throughput_warmup_secs: 0.2,
                startup_runs: 3,
                idle_renderers: 5_000,
            }
        } else {
            Params {
                samples: 30_000,
                rounds: 10,
                warmup: 2_000,
                throughput_secs: 4.0,
                throughput_warmup_secs: 0.5,
                startup_runs: 11,
                idle_renderers: 5_000,
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Statistics

#[derive(Debug, Clone, Default)]
struct Samples(Vec<u64>);

#[derive(Debug, Clone, Copy, Default)]
struct Latency {
    p50_us: f64,
    p99_us: f64,
    mean_us: f64,
}

impl Samples {
    fn record(&mut self, d: Duration) {
        self.0.push(d.as_nanos() as u64);
    }

    fn summary(&self) -> Latency {
        let mut v = self.0.clone();
        v.sort_unstable();
        if v.is_empty() {
            return Latency::default();
        }
        let at = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)] as f64 / 1_000.0;
        let mean = v.iter().sum::<u64>() as f64 / v.len() as f64 / 1_000.0;
        Latency { p50_us: at(0.50), p99_us: at(0.99), mean_us: mean }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

// ---------------------------------------------------------------------------------------------
// 1. raw: a Unix domain socket ping-pong between blocking threads

fn raw_server(path: &Path) -> std::io::Result<()> {
    let listener = StdUnixListener::bind(path)?;
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; PAYLOAD];
                while conn.read_exact(&mut buf).is_ok() {
                    if conn.write_all(&buf).is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok(())
}

fn raw_ping(conn: &mut StdUnixStream, buf: &mut [u8; PAYLOAD]) {
    conn.write_all(buf).expect("raw write");
    conn.read_exact(buf).expect("raw read");
}

fn raw_latency(path: &Path, p: &Params) -> Latency {
    let mut conn = StdUnixStream::connect(path).expect("raw connect");
    let mut buf = [7u8; PAYLOAD];
    for _ in 0..p.warmup {
        raw_ping(&mut conn, &mut buf);
    }
    let mut samples = Samples::default();
    for _ in 0..p.samples {
        let t = Instant::now();
        raw_ping(&mut conn, &mut buf);
        samples.record(t.elapsed());
    }
    samples.summary()
}

fn raw_throughput(path: &Path, p: &Params) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let mut conn = StdUnixStream::connect(path).expect("raw connect");
            let (stop, count) = (stop.clone(), count.clone());
            std::thread::spawn(move || {
                let mut buf = [7u8; PAYLOAD];
                while !stop.load(Ordering::Relaxed) {
                    raw_ping(&mut conn, &mut buf);
                    count.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(p.throughput_warmup_secs));
    let (c0, t0) = (count.load(Ordering::Relaxed), Instant::now());
    std::thread::sleep(Duration::from_secs_f64(p.throughput_secs));
    let (c1, t1) = (count.load(Ordering::Relaxed), Instant::now());
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    (c1 - c0) as f64 / (t1 - t0).as_secs_f64()
}

// ---------------------------------------------------------------------------------------------
// 2. direct: a tonic unary echo service, written by hand over tonic's server and client plumbing

/// The echoed message: 64 bytes of payload.
#[derive(Clone, PartialEq, prost::Message)]
struct Echo {
    #[prost(bytes = "vec", tag = "1")]
    payload: Vec<u8>,
}

/// Prost encoding for [`Echo`], both ways.
#[derive(Debug, Clone, Copy, Default)]
struct EchoCodec;

impl Codec for EchoCodec {
    type Encode = Echo;
    type Decode = Echo;
    type Encoder = EchoCodec;
    type Decoder = EchoCodec;
    fn encoder(&mut self) -> EchoCodec {
        EchoCodec
    }
    fn decoder(&mut self) -> EchoCodec {
        EchoCodec
    }
}

impl Encoder for EchoCodec {
    type Item = Echo;
    type Error = Status;
    fn encode(&mut self, item: Echo, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        prost::Message::encode(&item, buf).map_err(|e| Status::internal(e.to_string()))
    }
}

impl Decoder for EchoCodec {
    type Item = Echo;
    type Error = Status;
    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Echo>, Status> {
        <Echo as prost::Message>::decode(buf).map(Some).map_err(|e| Status::internal(e.to_string()))
    }
}

const ECHO_PATH: &str = "/bench.Echo/Echo";

/// The `bench.Echo` service: one unary method that answers with its request.
#[derive(Debug, Clone, Copy)]
struct EchoService;

impl tonic::server::NamedService for EchoService {
    const NAME: &'static str = "bench.Echo";
}

struct EchoUnary;

impl tonic::server::UnaryService<Echo> for EchoUnary {
    type Response = Echo;
    type Future = std::future::Ready<Result<Response<Echo>, Status>>;
    fn call(&mut self, request: Request<Echo>) -> Self::Future {
        std::future::ready(Ok(Response::new(request.into_inner())))
    }
}

impl<B> Service<http::Request<B>> for EchoService
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() != ECHO_PATH {
            return Box::pin(async { Ok(Status::unimplemented("bench.Echo has one method").into_http()) });
        }
        Box::pin(async move { Ok(tonic::server::Grpc::new(EchoCodec).unary(EchoUnary, request).await) })
    }
}

/// Serves [`EchoService`] on `path` from its own multi-thread runtime (returned: keep it alive).
fn echo_server(path: &Path) -> tokio::runtime::Runtime {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .thread_name("echo-server")
        .enable_all()
        .build()
        .expect("echo server runtime");
    let listener = {
        let _guard = runtime.enter();
        tokio::net::UnixListener::bind(path).expect("echo server binds")
    };
    runtime.spawn(async move {
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
        let _ = tonic::transport::Server::builder().add_service(EchoService).serve_with_incoming(incoming).await;
    });
    runtime
}

fn echo_message() -> Echo {
    Echo { payload: vec![7u8; PAYLOAD] }
}

async fn echo_call(channel: Channel, message: Echo) {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("echo channel ready");
    let path = http::uri::PathAndQuery::from_static(ECHO_PATH);
    let answer = grpc.unary(Request::new(message), path, EchoCodec).await.expect("echo answers");
    debug_assert_eq!(answer.get_ref().payload.len(), PAYLOAD);
}

// ---------------------------------------------------------------------------------------------
// 3/4. the daemon (the real binary), a trivial host, renderers

/// The release binary next to this bench (cargo builds it for bench targets).
fn daemon_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_miniapp-brokerd"))
}

/// Limits high enough that the benchmark measures speed, not the daemon's protection.
const BENCH_CONFIG: &str = r#"
[limits]
max_calls_in_flight_per_instance = 1024
calls_per_second_per_app = 100000000
burst_per_app = 100000000
max_renderer_streams = 100000
max_connections = 100000
"#;

struct DaemonProcess {
    child: Child,
    socket: PathBuf,
    data: PathBuf,
    _dir: tempfile::TempDir,
}

impl DaemonProcess {
    /// Spawns `miniapp-brokerd serve` in a fresh temp dir; returns once the socket accepts, with
    /// the time that took.
    fn spawn() -> (DaemonProcess, Duration) {
        let dir = tempfile::Builder::new().prefix("brokerd-bench").tempdir().expect("temp dir");
        let socket = dir.path().join("brokerd.sock");
        let data = dir.path().join("data");
        let config = dir.path().join("config.toml");
        std::fs::write(&config, BENCH_CONFIG).expect("config written");
        let log = std::fs::File::create(dir.path().join("daemon.log")).expect("log file");
        let start = Instant::now();
        // BROKER_BENCH_WRAPPER runs the daemon under a tool, e.g. "valgrind --tool=massif".
        let wrapper: Vec<String> =
            std::env::var("BROKER_BENCH_WRAPPER").unwrap_or_default().split_whitespace().map(str::to_owned).collect();
        let mut command = match wrapper.split_first() {
            Some((tool, args)) => {
                let mut c = Command::new(tool);
                c.args(args).arg(daemon_binary());
                c
            }
            None => Command::new(daemon_binary()),
        };
        let patience = if wrapper.is_empty() { 10 } else { 120 };
        let child = command
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .arg("--socket")
            .arg(&socket)
            .arg("--data-dir")
            .arg(&data)
            .arg("--ephemeral")
            .env_remove("RUST_LOG")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDS")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", daemon_binary().display()));
        let mut daemon = DaemonProcess { child, socket, data, _dir: dir };
        let deadline = start + Duration::from_secs(patience);
        loop {
            if StdUnixStream::connect(&daemon.socket).is_ok() {
                break;
            }
            if let Ok(Some(status)) = daemon.child.try_wait() {
                panic!("the daemon exited before accepting: {status}");
            }
            assert!(Instant::now() < deadline, "the daemon did not accept within {patience} s");
            std::thread::sleep(Duration::from_micros(50));
        }
        let took = start.elapsed();
        (daemon, took)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn address(&self) -> String {
        self.socket.display().to_string()
    }

    fn host_token(&self) -> String {
        std::fs::read_to_string(self.data.join("host.token")).expect("host token").trim().to_owned()
    }

    /// VmRSS in KiB, from /proc.
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("daemon status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }

    fn threads(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status.lines().find_map(|l| l.strip_prefix("Threads:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        // SIGTERM: the daemon's orderly shutdown; then make sure.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The time from spawning the daemon until its socket accepts, and until it answers a gRPC call.
fn startup(p: &Params, runtime: &tokio::runtime::Runtime) -> (f64, f64) {
    // One unmeasured run warms the page cache.
    drop(DaemonProcess::spawn());
    let mut accept_ms = Vec::new();
    let mut answer_ms = Vec::new();
    for _ in 0..p.startup_runs {
        let start = Instant::now();
        let (daemon, took) = DaemonProcess::spawn();
        accept_ms.push(took.as_secs_f64() * 1e3);
        // A renderer call with a bad token: answered (refused) by the gRPC server itself.
        runtime.block_on(async {
            let renderer = RendererClient::connect(&daemon.address(), "bench.invalid").await.expect("connects");
            let refused = renderer.call_unary(LoginRequest::default()).await;
            assert!(refused.is_err(), "a bad launch token is refused");
        });
        answer_ms.push(start.elapsed().as_secs_f64() * 1e3);
    }
    (median(accept_ms), median(answer_ms))
}

/// A host with a trivial login handler, on its own thread and current-thread runtime.
struct Host {
    client: HostClient,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Host {
    fn connect(address: &str, token: &str) -> Host {
        let builder = HostBuilder::new(address, token)
            .name("bench-host")
            .user(SignedInUser { uid: "bench-user".into(), profile: None })
            .handle(|_app, _request: LoginRequest| async {
                Ok(LoginResponse { err_msg: String::new(), code: HOST_CODE.to_owned() })
            });
        let (client_tx, client_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("bench-host".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("host runtime");
                runtime.block_on(async move {
                    let client = builder.connect().await.expect("host connects");
                    let _ = client_tx.send(client);
                    let _ = stop_rx.await;
                });
            })
            .expect("host thread");
        let client = client_rx.recv_timeout(Duration::from_secs(10)).expect("host connected");
        Host { client, stop: Some(stop_tx), thread: Some(thread) }
    }

    /// Launches `n` app instances of `app_json` with distinct app ids; returns their launch tokens.
    async fn launch(&self, prefix: &str, app_json: &str, n: usize) -> Vec<String> {
        stream::iter(0..n)
            .map(|i| async move {
                let app_id = format!("wx{prefix}{i:08}");
                self.client.launch_app(&app_id, app_json).await.expect("launch").launch_token
            })
            .buffered(32)
            .collect()
            .await
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

const V1: &str = r#"{"apiVersion":"v1"}"#;
const V2: &str = r#"{"apiVersion":"v2"}"#;

async fn renderers(address: &str, tokens: &[String]) -> Vec<RendererClient> {
    stream::iter(tokens.iter())
        .map(|t| async move { RendererClient::connect(address, t).await.expect("renderer connects") })
        .buffered(32)
        .collect()
        .await
}

// ---------------------------------------------------------------------------------------------
// The kinds of call measured through tonic

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Direct,
    Mediated,
    MediatedUnary,
    Default,
    DefaultUnary,
}

impl Kind {
    const ALL: [Kind; 5] = [Kind::Direct, Kind::Mediated, Kind::MediatedUnary, Kind::Default, Kind::DefaultUnary];

    fn key(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Mediated => "mediated",
            Kind::MediatedUnary => "mediated_unary",
            Kind::Default => "default",
            Kind::DefaultUnary => "default_unary",
        }
    }

    fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.key().replace('_', "-") == s || k.key() == s)
    }
}

/// One client of some kind: an echo channel or a renderer.
#[derive(Clone)]
enum Client {
    Echo(Channel),
    Renderer(RendererClient, Kind),
}

impl Client {
    async fn call(&self) {
        match self {
            Client::Echo(channel) => echo_call(channel.clone(), echo_message()).await,
            Client::Renderer(r, Kind::MediatedUnary) => {
                let answer = r.call_unary(LoginRequest::default()).await.expect("mediated unary login");
                debug_assert_eq!(answer.code, HOST_CODE);
            }
            Client::Renderer(r, Kind::DefaultUnary) => {
                let answer = r.call_unary(LoginRequest::default()).await.expect("default unary login");
                debug_assert!(!answer.code.is_empty());
            }
            Client::Renderer(r, kind) => {
                let answer = r.call(LoginRequest::default()).await.expect("login over the stream");
                debug_assert!(*kind != Kind::Mediated || answer.code == HOST_CODE);
            }
        }
    }
}

/// `CONCURRENCY` clients of `kind`, each on its own connection (renderers: own instance too).
struct Fleet {
    clients: Vec<Client>,
}

async fn fleet(kind: Kind, n: usize, echo_path: &Path, daemon: &DaemonProcess, host: &Host) -> Fleet {
    let clients = match kind {
        Kind::Direct => {
            let mut v = Vec::new();
            for _ in 0..n {
                let ch = miniapp_broker_client::connect::channel(&echo_path.display().to_string())
                    .await
                    .expect("echo channel");
                v.push(Client::Echo(ch));
            }
            v
        }
        _ => {
            let json = if matches!(kind, Kind::Mediated | Kind::MediatedUnary) { V1 } else { V2 };
            let tokens = host.launch(kind.key(), json, n).await;
            renderers(&daemon.address(), &tokens).await.into_iter().map(|r| Client::Renderer(r, kind)).collect()
        }
    };
    Fleet { clients }
}

/// Calls per second with every client of `fleet` calling back to back.
async fn throughput(fleet: &Fleet, p: &Params) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = fleet
        .clients
        .iter()
        .cloned()
        .map(|c| {
            let (stop, count) = (stop.clone(), count.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    c.call().await;
                    count.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs_f64(p.throughput_warmup_secs)).await;
    let (c0, t0) = (count.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(Duration::from_secs_f64(p.throughput_secs)).await;
    let (c1, t1) = (count.load(Ordering::Relaxed), Instant::now());
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("client task");
    }
    (c1 - c0) as f64 / (t1 - t0).as_secs_f64()
}

/// Latency with one client per kind, the kinds interleaved in rounds.
async fn latencies(singles: &[(Kind, Client)], p: &Params) -> Vec<(Kind, Latency)> {
    let mut samples: Vec<Samples> = vec![Samples::default(); singles.len()];
    for (_, client) in singles {
        for _ in 0..p.warmup {
            client.call().await;
        }
    }
    let per_round = p.samples / p.rounds;
    for _ in 0..p.rounds {
        for ((_, client), s) in singles.iter().zip(samples.iter_mut()) {
            for _ in 0..per_round {
                let t = Instant::now();
                client.call().await;
                s.record(t.elapsed());
            }
        }
    }
    singles.iter().zip(samples).map(|((k, _), s)| (*k, s.summary())).collect()
}

// ---------------------------------------------------------------------------------------------
// Idle renderers

struct Idle {
    renderers: usize,
    rss_base_kib: u64,
    rss_launched_kib: u64,
    rss_connected_kib: u64,
    per_renderer_kib: f64,
    per_stream_kib: f64,
    threads: u64,
}

async fn idle_rss(p: &Params) -> Idle {
    let (daemon, _) = DaemonProcess::spawn();
    let host = Host::connect(&daemon.address(), &daemon.host_token());
    // One renderer call first, so that lazily built state is in the base figure.
    let warm = host.launch("warm", V1, 1).await;
    let warm = renderers(&daemon.address(), &warm).await;
    warm[0].call(LoginRequest::default()).await.expect("warm-up call");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_base_kib = daemon.rss_kib();

    let tokens = host.launch("idle", V1, p.idle_renderers).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_launched_kib = daemon.rss_kib();

    let address = daemon.address();
    let clients: Vec<RendererClient> = stream::iter(tokens.iter())
        .map(|t| {
            let address = address.clone();
            async move {
                let r = RendererClient::connect(&address, t).await.expect("renderer connects");
                r.call(LoginRequest::default()).await.expect("first call");
                r
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    // Let the daemon's allocator settle after the connection burst (a measurement, not a sync).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_connected_kib = daemon.rss_kib();
    let threads = daemon.threads();
    let n = clients.len() as f64;
    let idle = Idle {
        renderers: clients.len(),
        rss_base_kib,
        rss_launched_kib,
        rss_connected_kib,
        per_renderer_kib: rss_connected_kib.saturating_sub(rss_base_kib) as f64 / n,
        per_stream_kib: rss_connected_kib.saturating_sub(rss_launched_kib) as f64 / n,
        threads,
    };
    if let Some(secs) = std::env::var("BROKER_BENCH_PAUSE_SECS").ok().and_then(|s| s.parse().ok()) {
        println!("idle daemon pid {} kept for {secs} s", daemon.pid());
        tokio::time::sleep(Duration::from_secs(secs)).await;
    }
    drop(clients);
    drop(warm);
    drop(host);
    drop(daemon);
    idle
}

// ---------------------------------------------------------------------------------------------
// Report

struct Row {
    key: &'static str,
    value: f64,
    unit: &'static str,
    target: Option<(&'static str, f64)>,
}

impl Row {
    fn pass(&self) -> Option<bool> {
        self.target.map(|(op, t)| match op {
            "<=" => self.value <= t,
            _ => self.value >= t,
        })
    }
}

fn print_table(rows: &[Row]) {
    println!();
    println!("{:<34} {:>14}  {:<8} TARGET", "METRIC", "VALUE", "UNIT");
    for row in rows {
        let target = row.target.map(|(op, t)| format!("{op} {t}")).unwrap_or_default();
        let verdict = match row.pass() {
            Some(true) => "PASS",
            Some(false) => "MISS",
            None => "",
        };
        let value = if row.value >= 1000.0 { format!("{:.0}", row.value) } else { format!("{:.2}", row.value) };
        println!("{:<34} {:>14}  {:<8} {:<10} {}", row.key, value, row.unit, target, verdict);
    }
}

fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    // <target>/<profile>/deps/broker-<hash>
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.ancestors().nth(3).map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        }
    }
    limit.rlim_cur
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    // `cargo bench` passes `--bench`; `cargo test` runs the target bare: then it is a smoke test
    // that keeps the benchmark from rotting, with no figures worth quoting and no summary written.
    let smoke =
        !args.iter().any(|a| a == "--bench" || a.starts_with("--soak") || a.starts_with("--idle") || a == "--sizes");
    let soak = args.iter().find_map(|a| a.strip_prefix("--soak=")).map(|s| {
        let (kind, secs) = s.split_once(':').unwrap_or((s, "10"));
        (
            Kind::parse(kind)
                .expect("--soak=KIND:SECS, KIND one of direct, mediated, mediated-unary, default, default-unary"),
            secs.parse::<f64>().expect("seconds"),
        )
    });
    let mut p = Params::new(quick, smoke);
    if let Some(n) = args.iter().find_map(|a| a.strip_prefix("--idle-renderers=")) {
        p.idle_renderers = n.parse().expect("--idle-renderers=N");
    }
    let fds = raise_fd_limit();
    assert!(fds as usize > 2 * p.idle_renderers + 256, "need more file descriptors than RLIMIT_NOFILE allows ({fds})");
    let began = Instant::now();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("client runtime");
    let dir = tempfile::Builder::new().prefix("broker-bench").tempdir().expect("temp dir");
    let echo_path = dir.path().join("echo.sock");
    let _echo = echo_server(&echo_path);

    if args.iter().any(|a| a == "--sizes") {
        use miniapp_broker_client::proto::v1::*;
        println!(
            "RendererReply {} Status {} Result {} ApiResponse {} ApiFailure {} RendererCall {} DaemonMessage {} HostMessage {}",
            std::mem::size_of::<RendererReply>(),
            std::mem::size_of::<Status>(),
            std::mem::size_of::<Result<RendererReply, Status>>(),
            std::mem::size_of::<ApiResponse>(),
            std::mem::size_of::<ApiFailure>(),
            std::mem::size_of::<RendererCall>(),
            std::mem::size_of::<DaemonMessage>(),
            std::mem::size_of::<HostMessage>()
        );
        let token = tokio_util::sync::CancellationToken::new();
        println!(
            "Streaming {} WaitForCancellation {} Sender {} Status {}",
            std::mem::size_of::<tonic::Streaming<RendererCall>>(),
            std::mem::size_of_val(&token.cancelled()),
            std::mem::size_of::<tokio::sync::mpsc::Sender<u8>>(),
            std::mem::size_of::<Option<Status>>()
        );
        return;
    }
    if args.iter().any(|a| a == "--idle-only") {
        let idle = runtime.block_on(idle_rss(&p));
        println!(
            "idle:     {} renderers: RSS {} -> {} (instances) -> {} KiB (streams); {:.2} KiB per renderer",
            idle.renderers, idle.rss_base_kib, idle.rss_launched_kib, idle.rss_connected_kib, idle.per_renderer_kib
        );
        return;
    }
    if let Some((kind, secs)) = soak {
        let (daemon, _) = DaemonProcess::spawn();
        let host = Host::connect(&daemon.address(), &daemon.host_token());
        runtime.block_on(async {
            let fleet = fleet(kind, CONCURRENCY, &echo_path, &daemon, &host).await;
            println!("soak: {} with {CONCURRENCY} clients for {secs} s; daemon pid {}", kind.key(), daemon.pid());
            let soak = Params { throughput_secs: secs, throughput_warmup_secs: 0.0, ..p };
            println!("{:.0} calls/s", throughput(&fleet, &soak).await);
        });
        return;
    }

    let mode = if smoke {
        "smoke"
    } else if quick {
        "quick"
    } else {
        "full"
    };
    println!("miniapp-brokerd benchmark ({mode} mode), daemon: {}", daemon_binary().display());

    // 1. raw
    let raw_path = dir.path().join("raw.sock");
    raw_server(&raw_path).expect("raw server");
    let raw = raw_latency(&raw_path, &p);
    let raw_thr = raw_throughput(&raw_path, &p);
    println!("raw:      p50 {:.1} us  p99 {:.1} us  {:.0} calls/s", raw.p50_us, raw.p99_us, raw_thr);

    // startup
    let (startup_ms, startup_answer_ms) = startup(&p, &runtime);
    println!(
        "startup:  {startup_ms:.2} ms until the socket accepts, {startup_answer_ms:.2} ms until a call is answered"
    );

    // 2-4 through one daemon
    let (daemon, _) = DaemonProcess::spawn();
    let host = Host::connect(&daemon.address(), &daemon.host_token());
    let (lat, thr) = runtime.block_on(async {
        let mut singles = Vec::new();
        for kind in Kind::ALL {
            let f = fleet(kind, 1, &echo_path, &daemon, &host).await;
            let client = f.clients.into_iter().next().expect("one client");
            // Sanity: each kind answers as expected before anything is timed.
            match (&client, kind) {
                (Client::Renderer(r, _), Kind::Mediated) => {
                    assert_eq!(r.call(LoginRequest::default()).await.expect("mediated").code, HOST_CODE)
                }
                (Client::Renderer(r, _), Kind::Default) => {
                    let code = r.call(LoginRequest::default()).await.expect("default").code;
                    assert!(!code.is_empty() && code != HOST_CODE, "v2 login is answered by the daemon");
                }
                _ => client.call().await,
            }
            singles.push((kind, client));
        }
        let lat = latencies(&singles, &p).await;
        for (k, l) in &lat {
            println!("{:<16} p50 {:>7.1} us  p99 {:>7.1} us  mean {:>7.1} us", k.key(), l.p50_us, l.p99_us, l.mean_us);
        }
        let mut thr = Vec::new();
        for kind in Kind::ALL {
            let f = fleet(kind, CONCURRENCY, &echo_path, &daemon, &host).await;
            let t = throughput(&f, &p).await;
            println!("{:<16} {:>9.0} calls/s with {CONCURRENCY} clients", kind.key(), t);
            thr.push((kind, t));
        }
        (lat, thr)
    });
    let daemon_threads = daemon.threads();
    drop(host);
    drop(daemon);

    // idle renderers
    let idle = runtime.block_on(idle_rss(&p));
    println!(
        "idle:     {} renderers: RSS {} -> {} (instances) -> {} KiB (streams); {:.2} KiB per renderer",
        idle.renderers, idle.rss_base_kib, idle.rss_launched_kib, idle.rss_connected_kib, idle.per_renderer_kib
    );

    let l = |k: Kind| lat.iter().find(|(kind, _)| *kind == k).map(|(_, l)| *l).unwrap_or_default();
    let t = |k: Kind| thr.iter().find(|(kind, _)| *kind == k).map(|(_, t)| *t).unwrap_or_default();
    let (direct, mediated, mediated_unary, default, default_unary) =
        (l(Kind::Direct), l(Kind::Mediated), l(Kind::MediatedUnary), l(Kind::Default), l(Kind::DefaultUnary));
    let rows = vec![
        Row { key: "raw_p50_us", value: raw.p50_us, unit: "us", target: None },
        Row { key: "raw_p99_us", value: raw.p99_us, unit: "us", target: None },
        Row { key: "raw_throughput", value: raw_thr, unit: "calls/s", target: None },
        Row { key: "direct_p50_us", value: direct.p50_us, unit: "us", target: None },
        Row { key: "direct_p99_us", value: direct.p99_us, unit: "us", target: None },
        Row { key: "direct_throughput", value: t(Kind::Direct), unit: "calls/s", target: None },
        Row { key: "mediated_p50_us", value: mediated.p50_us, unit: "us", target: None },
        Row { key: "mediated_p99_us", value: mediated.p99_us, unit: "us", target: None },
        Row { key: "mediated_throughput", value: t(Kind::Mediated), unit: "calls/s", target: None },
        Row { key: "mediated_unary_p50_us", value: mediated_unary.p50_us, unit: "us", target: None },
        Row { key: "mediated_unary_p99_us", value: mediated_unary.p99_us, unit: "us", target: None },
        Row { key: "mediated_unary_throughput", value: t(Kind::MediatedUnary), unit: "calls/s", target: None },
        Row { key: "default_p50_us", value: default.p50_us, unit: "us", target: None },
        Row { key: "default_p99_us", value: default.p99_us, unit: "us", target: None },
        Row { key: "default_throughput", value: t(Kind::Default), unit: "calls/s", target: None },
        Row { key: "default_unary_p50_us", value: default_unary.p50_us, unit: "us", target: None },
        Row { key: "default_unary_p99_us", value: default_unary.p99_us, unit: "us", target: None },
        Row { key: "default_unary_throughput", value: t(Kind::DefaultUnary), unit: "calls/s", target: None },
        Row { key: "idle_rss_per_renderer_kib", value: idle.per_renderer_kib, unit: "KiB", target: Some(("<=", 24.0)) },
        Row { key: "startup_ms", value: startup_ms, unit: "ms", target: Some(("<=", 30.0)) },
        Row { key: "mediated_p50_ratio", value: mediated.p50_us / direct.p50_us, unit: "x", target: Some(("<=", 1.5)) },
        Row { key: "mediated_p99_ratio", value: mediated.p99_us / direct.p99_us, unit: "x", target: Some(("<=", 2.0)) },
        Row {
            key: "mediated_throughput_ratio",
            value: t(Kind::Mediated) / t(Kind::Direct),
            unit: "x",
            target: Some((">=", 1.0)),
        },
        Row { key: "default_p50_ratio", value: default.p50_us / direct.p50_us, unit: "x", target: Some(("<=", 1.0)) },
        Row { key: "mediated_unary_p50_ratio", value: mediated_unary.p50_us / direct.p50_us, unit: "x", target: None },
        Row { key: "mediated_unary_p99_ratio", value: mediated_unary.p99_us / direct.p99_us, unit: "x", target: None },
        Row {
            key: "mediated_unary_throughput_ratio",
            value: t(Kind::MediatedUnary) / t(Kind::Direct),
            unit: "x",
            target: None,
        },
        Row { key: "default_p99_ratio", value: default.p99_us / direct.p99_us, unit: "x", target: None },
        Row { key: "default_throughput_ratio", value: t(Kind::Default) / t(Kind::Direct), unit: "x", target: None },
        Row { key: "default_unary_p50_ratio", value: default_unary.p50_us / direct.p50_us, unit: "x", target: None },
    ];
    print_table(&rows);
    if smoke {
        for row in &rows {
            assert!(row.value.is_finite() && row.value > 0.0, "{} = {}: every figure is measured", row.key, row.value);
        }
        println!(
            "\nsmoke run ok ({:.1} s); run `cargo bench -p miniapp-brokerd --bench broker` for figures",
            began.elapsed().as_secs_f64()
        );
        return;
    }

    let mut summary = serde_json::Map::new();
    for row in &rows {
        summary.insert(row.key.to_owned(), serde_json::json!((row.value * 1000.0).round() / 1000.0));
    }
    let extra = serde_json::json!({
        "mode": mode,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "concurrency": CONCURRENCY,
        "payload_bytes": PAYLOAD,
        "latency_samples": p.samples,
        "throughput_secs": p.throughput_secs,
        "startup_answer_ms": (startup_answer_ms * 1000.0).round() / 1000.0,
        "idle_renderers": idle.renderers,
        "idle_rss_base_kib": idle.rss_base_kib,
        "idle_rss_launched_kib": idle.rss_launched_kib,
        "idle_rss_connected_kib": idle.rss_connected_kib,
        "idle_rss_per_stream_kib": (idle.per_stream_kib * 1000.0).round() / 1000.0,
        "daemon_threads": daemon_threads,
        "idle_daemon_threads": idle.threads,
        "targets_met": rows.iter().all(|r| r.pass() != Some(false)),
        "wall_secs": (began.elapsed().as_secs_f64() * 10.0).round() / 10.0,
    });
    if let serde_json::Value::Object(extra) = extra {
        summary.extend(extra);
    }
    let out = target_dir().join("bench");
    std::fs::create_dir_all(&out).expect("target/bench");
    let file = out.join("summary.json");
    std::fs::write(&file, serde_json::to_string_pretty(&summary).expect("json")).expect("summary written");
    println!("\nwrote {} ({:.1} s)", file.display(), began.elapsed().as_secs_f64());
}
