//! The daemon's benchmark: what mediation costs against the transport's own floor, in one run.
//!
//! ```text
//! cargo bench -p miniapp-brokerd --bench broker            # full run (the figures to quote)
//! cargo bench -p miniapp-brokerd --bench broker -- --quick # about a minute
//! ```
//!
//! It measures, on the same machine and in the same run:
//! 1. **raw**: a 64-byte ping-pong over a plain Unix domain socket (blocking threads: the floor);
//! 2. **direct**: a tonic unary echo of a 64-byte message over a Unix domain socket, to a tiny echo
//!    service defined here and run in its own process (the cost of one gRPC hop);
//! 3. **mediated**: a v1 `login` from a renderer, forwarded by the real daemon (the release binary,
//!    as a child process) to a trivial host and back, over every renderer surface: the client
//!    library's multiplexed stream (`RendererClient::call`, the default), the typed unary RPC
//!    (`call_unary`) and the JSON `Invoke` (`invoke_json("login", {timeout})`); and a
//!    `requestPayment` over `Invoke` with a realistic params object (a new order per call);
//! 4. **default**: a v2 `login` answered by the daemon itself, over the same three surfaces.
//!
//! For each: p50/p99 latency with one client (the kinds are measured in interleaved rounds so that
//! drift on a shared machine hits them alike) and throughput with 64 concurrent clients, each on
//! its own connection (and, for renderers, its own app instance and stream), with the server's
//! CPU time per call (user + system from /proc/<pid>/stat of the daemon or of the echo server),
//! in windows taken in turn (four in the full run, the order rotating) and summed per kind; the
//! payment runs in the same rotation through a second daemon on a file-backed store.
//! Then the scale curve (1, 16, 256, 1,024 concurrently active clients of the direct, mediated
//! and default kinds), a soak (the daemon under full load for 60 s, its RSS after 10 s and at
//! the end), the daemon's RSS growth with 5,000 idle connected renderers (each with an open
//! Session stream), and the time from spawning the daemon until its socket accepts. Figures go to
//! `target/bench/summary.json` and a table with the targets of issues 6 and 13.
//!
//! Clients run on a multi-thread tokio runtime (the default: one worker per CPU), the host on its
//! own current-thread runtime and thread, the daemon and the echo server each in its own process.
//!
//! `--soak=KIND:SECS` (KIND: direct, mediated, mediated-unary, invoke-mediated, invoke-payment,
//! default, default-unary, invoke-default) skips the report and keeps 64 clients busy for SECS
//! seconds, printing the server's pid: for `perf record -p`. `--calls=KIND:N` makes exactly N calls
//! (after one checked call per client) and stops: run it twice under
//! `BROKER_BENCH_WRAPPER="valgrind --tool=callgrind"` for the daemon's instructions per call
//! (`BROKER_BENCH_ECHO_WRAPPER` does the same for the echo server).
//! Every figure but one is taken on the daemon's in-memory store (`--ephemeral`); the payment is
//! also measured on a file-backed store (SQLite in WAL mode, the default `store.synchronous`:
//! what users run), and the difference per call is what its two durable writes cost alone.
//! `BROKER_BENCH_STORE=file` runs every daemon on the file-backed store.
//! `--latency=KIND,... [--samples=N] [--current-thread] [--floor]` runs only the latency rounds
//! (with `BROKER_BENCH_DAEMON_B`, two daemon builds in the same rounds); `--current-thread` drives
//! the clients from one current-thread runtime instead of the multi-thread one, to see how much of
//! a figure is the client's own scheduling; `--floor` adds the least a unary call through the
//! daemon costs (its Health/Check, and a renderer call whose launch token is refused).
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
    proto::v1::{LoginRequest, LoginResponse, RequestPaymentRequest, RequestPaymentResponse, SignedInUser},
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
/// Concurrently active renderers at each point of the scale curve.
const SCALE_LEVELS: [usize; 4] = [1, 16, 256, 1024];

#[derive(Debug, Clone, Copy)]
struct Params {
    /// Latency samples per kind.
    samples: usize,
    /// Latency rounds the samples are split into (kinds interleaved per round).
    rounds: usize,
    warmup: usize,
    /// Seconds of throughput each kind is measured for, in all its windows together.
    throughput_secs: f64,
    /// Windows the throughput seconds are split into, the kinds taken in turn (a rotating order).
    throughput_rounds: usize,
    /// Seconds every client calls before a throughput window opens (split like the window, when
    /// the window is).
    throughput_warmup_secs: f64,
    startup_runs: usize,
    idle_renderers: usize,
    /// Seconds each kind runs at each level of the scale curve.
    scale_secs: f64,
    /// The concurrency levels of the scale curve.
    scale_levels: &'static [usize],
    /// Seconds of the soak, and the point (seconds in) its first RSS is read.
    soak_secs: f64,
    soak_base_secs: f64,
    /// Outstanding codes in the store the sweep part sweeps.
    sweep_codes: usize,
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
                throughput_rounds: 1,
                throughput_warmup_secs: 0.02,
                startup_runs: 1,
                idle_renderers: 20,
                scale_secs: 0.1,
                scale_levels: &[1, 16],
                soak_secs: 0.4,
                soak_base_secs: 0.1,
                sweep_codes: 5_000,
            }
        } else if quick {
            Params {
                samples: 3_000,
                rounds: 3,
                warmup: 300,
                throughput_secs: 1.0,
                throughput_rounds: 2,
                throughput_warmup_secs: 0.2,
                startup_runs: 3,
                idle_renderers: 5_000,
                scale_secs: 0.5,
                scale_levels: &SCALE_LEVELS,
                soak_secs: 5.0,
                soak_base_secs: 1.0,
                sweep_codes: 500_000,
            }
        } else {
            Params {
                samples: 30_000,
                rounds: 10,
                warmup: 2_000,
                throughput_secs: 4.0,
                throughput_rounds: 4,
                throughput_warmup_secs: 0.5,
                startup_runs: 11,
                idle_renderers: 5_000,
                scale_secs: 2.0,
                scale_levels: &SCALE_LEVELS,
                soak_secs: 60.0,
                soak_base_secs: 10.0,
                sweep_codes: 500_000,
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

/// The body of the echo server's own process (`broker --echo-server=PATH`): serves
/// [`EchoService`] on `path` from a multi-thread runtime with two workers (one on a one-CPU
/// machine), says "ready" on stdout, and exits when stdin closes (the bench went away). The daemon
/// runs one worker, but the echo is the floor and two is its better setting: 56.0–56.6k calls/s
/// against 46.6–51.3k with one, and a p50 as low or lower (docs/benchmarks.md, third session).
fn echo_server_main(path: &Path) {
    // TOKIO_WORKER_THREADS overrides, as it does for the daemon.
    let workers = std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()).min(2));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
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
    println!("ready");
    std::io::stdout().flush().expect("stdout");
    let _ = std::io::stdin().read(&mut [0u8; 1]);
}

/// The bare HTTP server the backend HTTP API is compared with: axum on the daemon's runtime
/// settings (one worker taking from the shared queue every 4th task, unless TOKIO_WORKER_THREADS
/// says otherwise), answering `/cgi-bin/token` and `/sns/jscode2session` with a fixed JSON object
/// of the sizes given (`TOKEN_BYTES,JSCODE_BYTES`), on a loopback port it prints.
fn http_bare_main(sizes: &str) {
    let (token, jscode) = sizes.split_once(',').expect("--http-bare=TOKEN_BYTES,JSCODE_BYTES");
    let body = |n: &str| -> &'static str {
        let n: usize = n.parse().expect("a size");
        // {"pad":"…"} is 10 bytes around the padding.
        format!("{{\"pad\":\"{}\"}}", "x".repeat(n.saturating_sub(10))).leak()
    };
    let (token, jscode) = (body(token), body(jscode));
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        builder.worker_threads(1).global_queue_interval(4);
    }
    let runtime = builder.enable_all().build().expect("runtime");
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bare server binds");
    let address = listener.local_addr().expect("address");
    let json = |text: &'static str| {
        move || async move { ([(http::header::CONTENT_TYPE, "application/json; charset=utf-8")], text) }
    };
    let app = axum::Router::new()
        .route("/cgi-bin/token", axum::routing::get(json(token)))
        .route("/sns/jscode2session", axum::routing::get(json(jscode)));
    runtime.spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    println!("ready {address}");
    std::io::stdout().flush().expect("stdout");
    let _ = std::io::stdin().read(&mut [0u8; 1]);
}

/// The bare HTTP server's process; it ends when this is dropped (its stdin closes).
struct HttpBareProcess {
    child: Child,
    address: std::net::SocketAddr,
}

impl HttpBareProcess {
    fn spawn(token_bytes: usize, jscode_bytes: usize) -> HttpBareProcess {
        let exe = std::env::current_exe().expect("bench executable");
        let mut child = Command::new(exe)
            .arg(format!("--http-bare={token_bytes},{jscode_bytes}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("bare HTTP server process");
        let mut line = String::new();
        let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        std::io::BufRead::read_line(&mut out, &mut line).expect("bare server ready");
        let address = line.trim().strip_prefix("ready ").expect("ready ADDR").parse().expect("an address");
        HttpBareProcess { child, address }
    }
}

impl Drop for HttpBareProcess {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// The direct echo server, in its own process like the daemon, so that its CPU time can be read
/// from /proc the same way and the comparison is fair.
struct EchoProcess {
    child: Child,
}

impl EchoProcess {
    fn spawn(path: &Path) -> EchoProcess {
        let exe = std::env::current_exe().expect("bench executable");
        // BROKER_BENCH_ECHO_WRAPPER runs it under a tool, as BROKER_BENCH_WRAPPER does the daemon.
        let wrapper: Vec<String> = std::env::var("BROKER_BENCH_ECHO_WRAPPER")
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        let mut command = match wrapper.split_first() {
            Some((tool, args)) => {
                let mut c = Command::new(tool);
                c.args(args).arg(exe);
                c
            }
            None => Command::new(exe),
        };
        let mut child = command
            .arg(format!("--echo-server={}", path.display()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("echo server process");
        let mut ready = [0u8; 6];
        child.stdout.as_mut().expect("echo stdout").read_exact(&mut ready).expect("echo server ready");
        assert_eq!(&ready, b"ready\n", "the echo server says ready");
        EchoProcess { child }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for EchoProcess {
    fn drop(&mut self) {
        // Closing its stdin ends it (and lets a wrapping tool write its output); then make sure.
        drop(self.child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
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

/// User + system CPU seconds a process has used so far, from /proc/<pid>/stat.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("process stat");
    // Fields after the command name (which may hold spaces), which ends with the last ')'.
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let ticks: u64 = fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    // SAFETY: a plain sysconf query.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 / hz
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

/// The release binary next to this bench (cargo builds it for bench targets), or the one
/// `BROKER_BENCH_DAEMON` names (to compare two builds of the daemon with the same bench).
fn daemon_binary() -> PathBuf {
    std::env::var_os("BROKER_BENCH_DAEMON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_miniapp-brokerd")))
}

/// Limits high enough that the benchmark measures speed, not the daemon's protection.
const BENCH_CONFIG: &str = r#"
[limits]
max_calls_in_flight_per_instance = 1024
calls_per_second_per_app = 100000000
burst_per_app = 100000000
calls_per_second_per_user = 100000000
burst_per_user = 100000000
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
        DaemonProcess::spawn_binary(&daemon_binary())
    }

    fn spawn_binary(binary: &Path) -> (DaemonProcess, Duration) {
        DaemonProcess::spawn_configured(binary, BENCH_CONFIG)
    }

    /// The daemon with `config_text` as its config file, its store where `BROKER_BENCH_STORE`
    /// says (in memory unless it says `file`).
    fn spawn_configured(binary: &Path, config_text: &str) -> (DaemonProcess, Duration) {
        let file_store = std::env::var("BROKER_BENCH_STORE").as_deref() == Ok("file");
        DaemonProcess::spawn_with_store(binary, config_text, file_store)
    }

    /// The daemon with `config_text` as its config file; `file_store` keeps its store in files
    /// under its data dir (SQLite in WAL mode, the default `store.synchronous`: what users run)
    /// instead of in memory (`--ephemeral`).
    fn spawn_with_store(binary: &Path, config_text: &str, file_store: bool) -> (DaemonProcess, Duration) {
        let dir = tempfile::Builder::new().prefix("brokerd-bench").tempdir().expect("temp dir");
        let socket = dir.path().join("brokerd.sock");
        let data = dir.path().join("data");
        let config = dir.path().join("config.toml");
        std::fs::write(&config, config_text).expect("config written");
        let log = std::fs::File::create(dir.path().join("daemon.log")).expect("log file");
        let start = Instant::now();
        // BROKER_BENCH_WRAPPER runs the daemon under a tool, e.g. "valgrind --tool=massif".
        let wrapper: Vec<String> =
            std::env::var("BROKER_BENCH_WRAPPER").unwrap_or_default().split_whitespace().map(str::to_owned).collect();
        let mut command = match wrapper.split_first() {
            Some((tool, args)) => {
                let mut c = Command::new(tool);
                c.args(args).arg(binary);
                c
            }
            None => Command::new(binary),
        };
        let patience = if wrapper.is_empty() { 10 } else { 120 };
        command.arg("serve").arg("--config").arg(&config).arg("--socket").arg(&socket).arg("--data-dir").arg(&data);
        if !file_store {
            command.arg("--ephemeral");
        }
        let child = command
            .env_remove("RUST_LOG")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDS")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
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

    /// The backend HTTP API's address, from the daemon's log line saying where it listens.
    fn backend_http_address(&self) -> std::net::SocketAddr {
        let log = self.socket.with_file_name("daemon.log");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(line) = text.lines().find(|l| l.contains("backend HTTP API listening")) {
                let at = line.split("Some(").nth(1).and_then(|rest| rest.split(')').next()).expect("an address");
                return at.parse().expect("a socket address");
            }
            assert!(Instant::now() < deadline, "the daemon did not say where its backend HTTP API listens:\n{text}");
            std::thread::sleep(Duration::from_millis(5));
        }
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
            })
            .handle(|_app, _request: RequestPaymentRequest| async {
                Ok(RequestPaymentResponse { err_msg: String::new() })
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
        self.launch_over(prefix, app_json, n, n).await
    }

    /// Launches `n` app instances of `app_json`, spread over `apps` app ids; returns their tokens.
    async fn launch_over(&self, prefix: &str, app_json: &str, n: usize, apps: usize) -> Vec<String> {
        stream::iter(0..n)
            .map(|i| async move {
                let app_id = format!("wx{prefix}{:08}", i % apps.max(1));
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
    InvokeMediated,
    InvokePayment,
    Default,
    DefaultUnary,
    InvokeDefault,
}

impl Kind {
    const ALL: [Kind; 8] = [
        Kind::Direct,
        Kind::Mediated,
        Kind::MediatedUnary,
        Kind::InvokeMediated,
        Kind::InvokePayment,
        Kind::Default,
        Kind::DefaultUnary,
        Kind::InvokeDefault,
    ];

    fn key(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Mediated => "mediated",
            Kind::MediatedUnary => "mediated_unary",
            Kind::InvokeMediated => "invoke_mediated",
            Kind::InvokePayment => "invoke_payment",
            Kind::Default => "default",
            Kind::DefaultUnary => "default_unary",
            Kind::InvokeDefault => "invoke_default",
        }
    }

    fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.key().replace('_', "-") == s || k.key() == s)
    }

    /// Whether the host answers (v1) rather than the daemon (v2 defaults).
    fn mediated(self) -> bool {
        matches!(self, Kind::Mediated | Kind::MediatedUnary | Kind::InvokeMediated | Kind::InvokePayment)
    }
}

/// wx.login's params as a mini program passes them (the callbacks stay in the bridge).
fn login_params() -> serde_json::Value {
    serde_json::json!({ "timeout": 10000 })
}

/// wx.requestPayment's params as a mini program passes them: a fresh order (nonceStr) per call,
/// signed with RSA (a 344-character base64 paySign), so that every call is a new payment.
fn payment_params(order: u64) -> serde_json::Value {
    use base64::Engine as _;
    let sign: Vec<u8> = (0..256u32).map(|i| (i as u64 * 31 + order) as u8).collect();
    serde_json::json!({
        "timeStamp": "1764000000",
        "nonceStr": format!("bench{order:016x}"),
        "package": "prepay_id=wx2017033010242291fcfe0db70013231072",
        "signType": "RSA",
        "paySign": base64::engine::general_purpose::STANDARD.encode(sign),
    })
}

/// One client of some kind: an echo channel or a renderer (or, for `--latency --floor`, the
/// daemon's Health service with the host token, or a renderer whose launch token is refused).
#[derive(Clone)]
enum Client {
    Echo(Channel),
    Renderer(RendererClient, Kind),
    Health(Channel, tonic::metadata::MetadataValue<tonic::metadata::Ascii>),
    Refused(RendererClient),
}

/// Orders of the payment kind, unique across the run.
static NEXT_ORDER: AtomicU64 = AtomicU64::new(1);

impl Client {
    async fn call(&self) {
        match self {
            Client::Echo(channel) => echo_call(channel.clone(), echo_message()).await,
            Client::Health(channel, token) => {
                use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
                let mut request = Request::new(HealthCheckRequest { service: String::new() });
                request.metadata_mut().insert("authorization", token.clone());
                HealthClient::new(channel.clone()).check(request).await.expect("the daemon's health check");
            }
            Client::Refused(r) => {
                let refused = r.call_unary(LoginRequest::default()).await.expect_err("a refused launch token");
                debug_assert_eq!(refused.grpc_code, tonic::Code::Unauthenticated as i32);
            }
            Client::Renderer(r, Kind::MediatedUnary) => {
                let answer = r.call_unary(LoginRequest::default()).await.expect("mediated unary login");
                debug_assert_eq!(answer.code, HOST_CODE);
            }
            Client::Renderer(r, Kind::DefaultUnary) => {
                let answer = r.call_unary(LoginRequest::default()).await.expect("default unary login");
                debug_assert!(!answer.code.is_empty());
            }
            Client::Renderer(r, Kind::InvokeMediated | Kind::InvokeDefault) => {
                let answer = r.invoke_json("login", &login_params()).await.expect("login over Invoke");
                debug_assert!(answer["code"].is_string());
            }
            Client::Renderer(r, Kind::InvokePayment) => {
                let order = NEXT_ORDER.fetch_add(1, Ordering::Relaxed);
                let answer =
                    r.invoke_json("requestPayment", &payment_params(order)).await.expect("payment over Invoke");
                debug_assert_eq!(answer["errMsg"], "requestPayment:ok");
            }
            Client::Renderer(r, kind) => {
                let answer = r.call(LoginRequest::default()).await.expect("login over the stream");
                debug_assert!(*kind != Kind::Mediated || answer.code == HOST_CODE);
            }
        }
    }

    /// One call, checked: each kind answers as expected before anything is timed.
    async fn check(&self) {
        match self {
            Client::Echo(_) | Client::Health(..) | Client::Refused(_) => self.call().await,
            Client::Renderer(r, kind) => {
                let code = match kind {
                    Kind::Mediated | Kind::Default => r.call(LoginRequest::default()).await.expect("login").code,
                    Kind::MediatedUnary | Kind::DefaultUnary => {
                        r.call_unary(LoginRequest::default()).await.expect("unary login").code
                    }
                    Kind::InvokeMediated | Kind::InvokeDefault => {
                        let answer = r.invoke_json("login", &login_params()).await.expect("login over Invoke");
                        assert_eq!(answer["errMsg"], "login:ok");
                        answer["code"].as_str().expect("a code").to_owned()
                    }
                    Kind::InvokePayment => {
                        let order = NEXT_ORDER.fetch_add(1, Ordering::Relaxed);
                        let answer = r.invoke_json("requestPayment", &payment_params(order)).await.expect("payment");
                        assert_eq!(answer, serde_json::json!({ "errMsg": "requestPayment:ok" }));
                        return;
                    }
                    Kind::Direct => unreachable!("renderers are not direct"),
                };
                if kind.mediated() {
                    assert_eq!(code, HOST_CODE, "{} is answered by the host", kind.key());
                } else {
                    assert!(!code.is_empty() && code != HOST_CODE, "{} is answered by the daemon", kind.key());
                }
            }
        }
    }
}

/// Clients of one kind, each on its own connection (renderers: own instance too).
struct Fleet {
    clients: Vec<Client>,
}

async fn fleet(kind: Kind, n: usize, echo_path: &Path, daemon: &DaemonProcess, host: &Host) -> Fleet {
    let clients = match kind {
        Kind::Direct => {
            let address = echo_path.display().to_string();
            stream::iter(0..n)
                .map(|_| {
                    let address = address.clone();
                    async move {
                        Client::Echo(miniapp_broker_client::connect::channel(&address).await.expect("echo channel"))
                    }
                })
                .buffered(32)
                .collect()
                .await
        }
        _ => {
            let json = if kind.mediated() { V1 } else { V2 };
            let tokens = host.launch(kind.key(), json, n).await;
            renderers(&daemon.address(), &tokens).await.into_iter().map(|r| Client::Renderer(r, kind)).collect()
        }
    };
    Fleet { clients }
}

/// Throughput of a fleet, and what the server answering it spent on each call.
#[derive(Debug, Clone, Copy, Default)]
struct Load {
    calls_per_sec: f64,
    /// The server's (daemon's or echo server's) user + system CPU time per call.
    cpu_us_per_call: f64,
}

/// What a fleet did in its throughput windows, summed: calls, seconds, and the server's CPU seconds.
#[derive(Debug, Clone, Copy, Default)]
struct Windows {
    calls: f64,
    secs: f64,
    cpu_secs: f64,
}

impl Windows {
    fn add(&mut self, other: Windows) {
        self.calls += other.calls;
        self.secs += other.secs;
        self.cpu_secs += other.cpu_secs;
    }

    fn load(&self) -> Load {
        Load {
            calls_per_sec: self.calls / self.secs.max(f64::MIN_POSITIVE),
            cpu_us_per_call: self.cpu_secs * 1e6 / self.calls.max(1.0),
        }
    }
}

/// The throughput of each fleet, measured in `p.throughput_rounds` windows per fleet with the
/// fleets taken in turn, the order rotating each round: a shared machine's slow patch lands on
/// every kind alike instead of on whichever ran then. `server` names the process whose CPU a
/// fleet's calls are charged to.
async fn throughputs<K: Copy>(fleets: &[(K, Fleet, u32)], p: &Params) -> Vec<(K, Load)> {
    let rounds = p.throughput_rounds.max(1);
    let split = rounds as f64;
    let window = Params {
        throughput_secs: p.throughput_secs / split,
        throughput_warmup_secs: p.throughput_warmup_secs / split,
        ..*p
    };
    let mut sums = vec![Windows::default(); fleets.len()];
    for round in 0..rounds {
        for i in 0..fleets.len() {
            let at = (i + round) % fleets.len();
            let (_, fleet, server) = &fleets[at];
            sums[at].add(throughput_window(fleet, &window, *server).await);
        }
    }
    fleets.iter().zip(sums).map(|((kind, _, _), sum)| (*kind, sum.load())).collect()
}

/// Calls per second with every client of `fleet` calling back to back, and the CPU time per call
/// of the process `server` (read from /proc over the same window).
async fn throughput(fleet: &Fleet, p: &Params, server: u32) -> Load {
    throughput_window(fleet, p, server).await.load()
}

/// One window of [`throughput`]: `p.throughput_secs` of calls after `p.throughput_warmup_secs`.
async fn throughput_window(fleet: &Fleet, p: &Params, server: u32) -> Windows {
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
    let (c0, t0, cpu0) = (count.load(Ordering::Relaxed), Instant::now(), cpu_secs(server));
    tokio::time::sleep(Duration::from_secs_f64(p.throughput_secs)).await;
    let (c1, t1, cpu1) = (count.load(Ordering::Relaxed), Instant::now(), cpu_secs(server));
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("client task");
    }
    Windows { calls: (c1 - c0) as f64, secs: (t1 - t0).as_secs_f64(), cpu_secs: cpu1 - cpu0 }
}

/// One point of the scale curve: `n` clients calling back to back, each call timed.
#[derive(Debug, Clone, Copy, Default)]
struct ScalePoint {
    latency: Latency,
    calls_per_sec: f64,
}

async fn scale_point(clients: &[Client], secs: f64) -> ScalePoint {
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = clients
        .iter()
        .cloned()
        .map(|c| {
            let (stop, measuring) = (stop.clone(), measuring.clone());
            tokio::spawn(async move {
                let mut samples = Samples::default();
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    c.call().await;
                    if measuring.load(Ordering::Relaxed) {
                        samples.record(t.elapsed());
                    }
                }
                samples
            })
        })
        .collect();
    // Warm-up: every client has its connection and stream busy before the window opens.
    tokio::time::sleep(Duration::from_secs_f64((secs / 4.0).max(0.05))).await;
    measuring.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    measuring.store(false, Ordering::Relaxed);
    let took = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut all = Samples::default();
    for t in tasks {
        all.0.extend(t.await.expect("client task").0);
    }
    ScalePoint { latency: all.summary(), calls_per_sec: all.0.len() as f64 / took.as_secs_f64() }
}

/// The scale curve: at each level, `n` echo clients, `n` mediated and `n` default renderers (each
/// its own connection and launch token; the renderers spread over 64 apps), one kind at a time.
async fn scale_curve(
    p: &Params,
    echo_path: &Path,
    daemon: &DaemonProcess,
    host: &Host,
) -> Vec<(usize, Kind, ScalePoint)> {
    let most = p.scale_levels.iter().copied().max().unwrap_or(1);
    let direct = fleet(Kind::Direct, most, echo_path, daemon, host).await.clients;
    let mut pools = vec![(Kind::Direct, direct)];
    for kind in [Kind::Mediated, Kind::Default] {
        let json = if kind.mediated() { V1 } else { V2 };
        let tokens = host.launch_over(&format!("scale{}", kind.key()), json, most, 64).await;
        let clients: Vec<Client> =
            renderers(&daemon.address(), &tokens).await.into_iter().map(|r| Client::Renderer(r, kind)).collect();
        // Open every renderer's stream (and resolve its version) before anything is timed.
        stream::iter(clients.iter()).for_each_concurrent(64, |c| c.check()).await;
        pools.push((kind, clients));
    }
    let mut points = Vec::new();
    for &n in p.scale_levels {
        for (kind, pool) in &pools {
            let point = scale_point(&pool[..n], p.scale_secs).await;
            println!(
                "scale {n:>5} {:<9} p50 {:>8.1} us  p99 {:>8.1} us  {:>9.0} calls/s",
                kind.key(),
                point.latency.p50_us,
                point.latency.p99_us,
                point.calls_per_sec
            );
            points.push((n, *kind, point));
        }
    }
    points
}

/// The soak: a fresh daemon under full load for `soak_secs` (64 clients making v1 logins that the
/// host answers, over the stream, the unary RPC and Invoke), its RSS read after `soak_base_secs`
/// and at the end. v2 logins are left out on purpose: each issues a code the daemon keeps for its
/// 5-minute validity (memory that grows with the login rate by design, until the codes expire),
/// and each payment is a row in the store; neither is a leak, and either would hide one.
#[derive(Debug, Clone, Copy, Default)]
struct Soak {
    rss_base_kib: u64,
    rss_end_kib: u64,
    calls_per_sec: f64,
}

async fn soak(p: &Params, echo_path: &Path) -> Soak {
    let (daemon, _) = DaemonProcess::spawn();
    let host = Host::connect(&daemon.address(), &daemon.host_token());
    let mut clients = Vec::new();
    for (kind, n) in [(Kind::Mediated, 22), (Kind::MediatedUnary, 21), (Kind::InvokeMediated, 21)] {
        clients.extend(fleet(kind, n, echo_path, &daemon, &host).await.clients);
    }
    stream::iter(clients.iter()).for_each_concurrent(None, |c| c.check()).await;
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = clients
        .into_iter()
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
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(p.soak_base_secs)).await;
    let rss_base_kib = daemon.rss_kib();
    tokio::time::sleep(Duration::from_secs_f64(p.soak_secs - p.soak_base_secs)).await;
    let rss_end_kib = daemon.rss_kib();
    let calls = count.load(Ordering::Relaxed);
    let took = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("client task");
    }
    Soak { rss_base_kib, rss_end_kib, calls_per_sec: calls as f64 / took.as_secs_f64() }
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

/// The next request's path and query of an HTTP load, or none: the load ends.
type NextRequest = Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// Requests per second and latency of one HTTP load.
#[derive(Debug, Default, Clone, Copy)]
struct HttpLoad {
    per_sec: f64,
    latency: Latency,
}

/// 64 keep-alive connections (one hyper client with one connection each) sending GETs back to back
/// for `secs`, or until `next` has no request left; every answer must be HTTP 200 and, when
/// `expect` is given, contain it.
async fn http_load(
    address: std::net::SocketAddr,
    secs: f64,
    next: NextRequest,
    expect: Option<&'static str>,
) -> HttpLoad {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::{client::legacy::Client, rt::TokioExecutor};
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(secs);
    let tasks: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let next = next.clone();
            tokio::spawn(async move {
                let client = Client::builder(TokioExecutor::new())
                    .pool_max_idle_per_host(1)
                    .build_http::<Empty<tonic::codegen::Bytes>>();
                let mut samples = Samples::default();
                while Instant::now() < deadline {
                    let Some(path) = next() else { break };
                    let uri: http::Uri = format!("http://{address}{path}").parse().expect("a URI");
                    let t = Instant::now();
                    let response = client.get(uri).await.expect("an HTTP answer");
                    let status = response.status();
                    let body = response.into_body().collect().await.expect("a body").to_bytes();
                    samples.record(t.elapsed());
                    assert_eq!(status, 200, "{path}: {body:?}");
                    if let Some(expect) = expect {
                        assert!(body.windows(expect.len()).any(|w| w == expect.as_bytes()), "{path}: {body:?}");
                    }
                }
                samples
            })
        })
        .collect();
    let mut all = Samples::default();
    for task in tasks {
        all.0.extend(task.await.expect("client").0);
    }
    let elapsed = started.elapsed().min(Duration::from_secs_f64(secs)).as_secs_f64().max(1e-3);
    HttpLoad { per_sec: all.0.len() as f64 / elapsed, latency: all.summary() }
}

/// The backend HTTP API against a bare axum handler.
#[derive(Debug, Default, Clone, Copy)]
struct BackendHttp {
    token: HttpLoad,
    token_bare: HttpLoad,
    jscode: HttpLoad,
    jscode_bare: HttpLoad,
    token_bytes: usize,
    jscode_bytes: usize,
}

/// The backend HTTP part: a daemon with its backend listener on loopback and one app with a
/// secret, at the default log settings (`info`); `/cgi-bin/token` (the app's stable token, handed
/// out again) and `/sns/jscode2session` (each request redeems a fresh login code made beforehand
/// by 64 renderers) at 64 keep-alive connections, each against a bare axum handler answering as
/// many bytes on the same runtime settings, measured in turn in the same run, twice each.
async fn backend_http(p: &Params) -> BackendHttp {
    const APP: &str = "wxbenchhttp00000000";
    const SECRET: &str = "bench-backend-secret-0123456789";
    let config = format!(
        "{BENCH_CONFIG}exchanges_per_minute_per_app = 4000000000\nexchange_burst_per_app = 4000000000\n\
         failed_exchanges_per_minute = 4000000000\nfailed_exchange_burst = 4000000000\n\
         [sessions]\nmax_codes_per_user = 10000000\n\
         [backend_http]\nlisten = \"127.0.0.1:0\"\nmax_connections = 1024\n\
         [apps.{APP}]\nsecret = \"{SECRET}\"\n"
    );
    let (daemon, _) = DaemonProcess::spawn_configured(&daemon_binary(), &config);
    let backend = daemon.backend_http_address();
    let host = Host::connect(&daemon.address(), &daemon.host_token());
    let tokens = host.launch_over("benchhttp", V2, CONCURRENCY, 1).await;
    let clients = renderers(&daemon.address(), &tokens).await;
    let secs = p.throughput_secs / 2.0;
    // Enough codes for the fastest jscode2session seen here, twice over, and the warm-up.
    let wanted = ((secs * 2.0 + p.throughput_warmup_secs) * 30_000.0) as usize + 1_000;
    let per_client = wanted.div_ceil(CONCURRENCY);
    let codes: Vec<String> = stream::iter(clients.iter())
        .map(|r| async move {
            let mut codes = Vec::with_capacity(per_client);
            for _ in 0..per_client {
                codes.push(r.call(LoginRequest::default()).await.expect("login").code);
            }
            codes
        })
        .buffer_unordered(CONCURRENCY)
        .flat_map(stream::iter)
        .collect()
        .await;
    // Redeemed in the order issued, as a backend redeems its mini program's logins.
    let codes = Arc::new(std::sync::Mutex::new(std::collections::VecDeque::from(codes)));
    let token_path = format!("/cgi-bin/token?grant_type=client_credential&appid={APP}&secret={SECRET}");
    let token: NextRequest = Arc::new(move || Some(token_path.clone()));
    let jscode: NextRequest = {
        let codes = codes.clone();
        Arc::new(move || {
            let code = codes.lock().expect("codes").pop_front()?;
            Some(format!(
                "/sns/jscode2session?appid={APP}&secret={SECRET}&js_code={code}&grant_type=authorization_code"
            ))
        })
    };
    // One answer of each, for the bare server's sizes.
    let size = |next: &NextRequest| {
        let path = next().expect("a request");
        async move {
            use http_body_util::{BodyExt, Empty};
            let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<Empty<tonic::codegen::Bytes>>();
            let uri: http::Uri = format!("http://{backend}{path}").parse().expect("a URI");
            let answer = client.get(uri).await.expect("an answer").into_body().collect().await.expect("a body");
            answer.to_bytes().len()
        }
    };
    let (token_bytes, jscode_bytes) = (size(&token).await, size(&jscode).await);
    let bare = HttpBareProcess::spawn(token_bytes, jscode_bytes);
    let bare_token: NextRequest = Arc::new(|| Some("/cgi-bin/token".to_owned()));
    let bare_jscode: NextRequest = Arc::new(|| Some("/sns/jscode2session".to_owned()));
    let warm = p.throughput_warmup_secs;
    http_load(backend, warm, token.clone(), None).await;
    http_load(bare.address, warm, bare_token.clone(), None).await;
    let mut out = BackendHttp { token_bytes, jscode_bytes, ..BackendHttp::default() };
    let add = |sum: &mut HttpLoad, one: HttpLoad| {
        sum.per_sec += one.per_sec / 2.0;
        sum.latency.p50_us += one.latency.p50_us / 2.0;
        sum.latency.p99_us += one.latency.p99_us / 2.0;
        sum.latency.mean_us += one.latency.mean_us / 2.0;
    };
    for _ in 0..2 {
        add(&mut out.token, http_load(backend, secs, token.clone(), Some("access_token")).await);
        add(&mut out.token_bare, http_load(bare.address, secs, bare_token.clone(), None).await);
        add(&mut out.jscode, http_load(backend, secs, jscode.clone(), Some("session_key")).await);
        add(&mut out.jscode_bare, http_load(bare.address, secs, bare_jscode.clone(), None).await);
    }
    drop(clients);
    drop(host);
    out
}

/// What the codes sweep of a large store does to a login load on one runtime worker (the daemon
/// runs one): logins' p99 while a sweep runs, against p99 just before it.
#[derive(Debug, Default, Clone, Copy)]
struct SweepLoad {
    without: Latency,
    during: Latency,
    sweep_ms: f64,
    samples_during: usize,
}

/// The sweep part. The daemon's embedded platform runs in this process on a current-thread
/// runtime, over its SQLite store in memory, with `p.sweep_codes` outstanding codes of as many
/// users put in the store directly (a daemon has one signed-in user, whose codes are capped) and
/// then expired, so the sweep has all of them to drop: its worst case. 64 clients log in back to
/// back (the platform's `login_code`: the session read and upsert, the code), each call timed from
/// the moment it is ready to run, as a call waiting for the worker is. Samples: every login that
/// ended while the sweep ran, and as many ending just before it started.
fn sweep_load(p: &Params) -> SweepLoad {
    use miniapp_platform::{
        Platform,
        clock::ManualClock,
        config::EmbeddedConfig,
        disclosures::NoLedger,
        embedded::EmbeddedPlatform,
        store::{CodeRecord, PlatformStore, Purpose, sqlite::SqliteStore},
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let clock = ManualClock::new(1_700_000_000_000);
        let config = EmbeddedConfig::default();
        let ttl_ms = config.code_ttl_secs * 1000;
        let store = Arc::new(SqliteStore::open(None, false).expect("store"));
        let platform = Arc::new(
            EmbeddedPlatform::new(store.clone(), Arc::new(NoLedger), clock.clone(), config.clone())
                .await
                .expect("platform"),
        );
        let now = miniapp_platform::clock::Clock::now_ms(clock.as_ref());
        for i in 0..p.sweep_codes {
            let record = CodeRecord {
                app_id: "bench.app".into(),
                uid: format!("user-{i}"),
                openid: format!("o-{i}"),
                purpose: Purpose::Login { auth_code: None },
                expires_at_ms: now + ttl_ms,
                ledger: Vec::new(),
            };
            store.issue_code(&format!("code-{i:08}"), record, None, 100).await.expect("code stored");
        }
        clock.advance_ms(ttl_ms + 1);
        let epoch = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let clients: Vec<_> = (0..CONCURRENCY)
            .map(|c| {
                let (platform, stop) = (platform.clone(), stop.clone());
                tokio::spawn(async move {
                    // (ready, ended) in ns since `epoch`, per login.
                    let mut calls = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let ready = epoch.elapsed().as_nanos() as u64;
                        // The call is ready; it runs when the worker gets to it.
                        tokio::task::yield_now().await;
                        platform.login_code("bench.app", &format!("load-{c}"), None).await.expect("login");
                        calls.push((ready, epoch.elapsed().as_nanos() as u64));
                    }
                    calls
                })
            })
            .collect();
        // Warm-up and the load alone for a while, then the sweep under it, then the load a while.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let sweep_start = epoch.elapsed().as_nanos() as u64;
        platform.sweep().await;
        let sweep_end = epoch.elapsed().as_nanos() as u64;
        tokio::time::sleep(Duration::from_millis(50)).await;
        stop.store(true, Ordering::Relaxed);
        let mut calls = Vec::new();
        for client in clients {
            calls.extend(client.await.expect("client"));
        }
        // Every expired code went; what is left is the load's own (at most 100 per user).
        let left = store.outstanding_codes().await.expect("count");
        assert!(left <= CONCURRENCY * 100, "{left} codes left after the sweep");
        // During: every login whose wait or run overlapped the sweep. Without: as many (at least
        // 100) of the last logins that ended before it started.
        let during: Vec<u64> = calls
            .iter()
            .filter(|(ready, ended)| *ready < sweep_end && *ended > sweep_start)
            .map(|(r, e)| e - r)
            .collect();
        let mut before: Vec<(u64, u64)> = calls.iter().copied().filter(|(_, ended)| *ended <= sweep_start).collect();
        before.sort_unstable_by_key(|(_, ended)| *ended);
        let keep = during.len().max(100).min(before.len());
        let before = Samples(before[before.len() - keep..].iter().map(|(r, e)| e - r).collect());
        let sweep_took = Duration::from_nanos(sweep_end - sweep_start);
        SweepLoad {
            without: before.summary(),
            during: Samples(during.clone()).summary(),
            sweep_ms: sweep_took.as_secs_f64() * 1000.0,
            samples_during: during.len(),
        }
    })
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

/// The daemon's CPU per call on every surface, at most this many times the echo server's.
const CPU_RATIO_TARGET: f64 = 1.5;
/// A payment's, its two durable writes included.
const PAYMENT_CPU_RATIO_TARGET: f64 = 3.0;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(path) = args.iter().find_map(|a| a.strip_prefix("--echo-server=")) {
        echo_server_main(Path::new(path));
        return;
    }
    if let Some(sizes) = args.iter().find_map(|a| a.strip_prefix("--http-bare=")) {
        http_bare_main(sizes);
        return;
    }
    let quick = args.iter().any(|a| a == "--quick");
    // `cargo bench` passes `--bench`; `cargo test` runs the target bare: then it is a smoke test
    // that keeps the benchmark from rotting, with no figures worth quoting and no summary written.
    let smoke = !args.iter().any(|a| {
        a == "--bench"
            || a.starts_with("--soak")
            || a.starts_with("--calls")
            || a.starts_with("--latency")
            || a == "--scale-only"
            || a.starts_with("--idle")
            || a == "--sweep-only"
            || a == "--backend-only"
            || a == "--sizes"
    });
    let kind_arg = |flag: &str| {
        args.iter().find_map(|a| a.strip_prefix(flag)).map(|s| {
            let (kind, n) = s.split_once(':').unwrap_or((s, "10"));
            let kind = Kind::parse(kind).unwrap_or_else(|| {
                let kinds: Vec<String> = Kind::ALL.iter().map(|k| k.key().replace('_', "-")).collect();
                panic!("{flag}KIND:N, KIND one of {}", kinds.join(", "))
            });
            (kind, n.parse::<f64>().expect("a number after the colon"))
        })
    };
    let soak_only = kind_arg("--soak=");
    let calls_only = kind_arg("--calls=");
    let mut p = Params::new(quick, smoke);
    if let Some(n) = args.iter().find_map(|a| a.strip_prefix("--idle-renderers=")) {
        p.idle_renderers = n.parse().expect("--idle-renderers=N");
    }
    let fds = raise_fd_limit();
    assert!(fds as usize > 2 * p.idle_renderers + 256, "need more file descriptors than RLIMIT_NOFILE allows ({fds})");
    let began = Instant::now();
    // The load generator serves its clients in turn: with tokio's default interval, at 1,024
    // clients the tasks beyond a worker's local queue waited in the shared queue, and the direct
    // echo's p50 came out at a quarter of its own mean (p99 110-180 ms): the scale curve measured
    // the generator's scheduling, not the servers (docs/benchmarks.md, "Fairness under overload").
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .global_queue_interval(4)
        .enable_all()
        .build()
        .expect("client runtime");
    let dir = tempfile::Builder::new().prefix("broker-bench").tempdir().expect("temp dir");
    let echo_path = dir.path().join("echo.sock");
    let echo = EchoProcess::spawn(&echo_path);

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
    if args.iter().any(|a| a == "--sweep-only") {
        let swept = sweep_load(&p);
        println!(
            "sweep: {} expired codes swept in {:.1} ms under 64 logins: p99 {:.1} us during ({} logins), {:.1} us before: {:.2}x",
            p.sweep_codes,
            swept.sweep_ms,
            swept.during.p99_us,
            swept.samples_during,
            swept.without.p99_us,
            swept.during.p99_us / swept.without.p99_us
        );
        return;
    }
    if args.iter().any(|a| a == "--backend-only") {
        let http = runtime.block_on(backend_http(&p));
        println!(
            "backend HTTP, 64 keep-alive connections: /cgi-bin/token {:.0} req/s against bare {:.0} ({:.2}x); \
             /sns/jscode2session {:.0} against bare {:.0} ({:.2}x)",
            http.token.per_sec,
            http.token_bare.per_sec,
            http.token.per_sec / http.token_bare.per_sec,
            http.jscode.per_sec,
            http.jscode_bare.per_sec,
            http.jscode.per_sec / http.jscode_bare.per_sec
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
    if let Some((kind, secs)) = soak_only {
        let (daemon, _) = DaemonProcess::spawn();
        let host = Host::connect(&daemon.address(), &daemon.host_token());
        // --clients=N: fewer (or more) than the usual 64, e.g. one for a trace of one call's path.
        let clients = args
            .iter()
            .find_map(|a| a.strip_prefix("--clients="))
            .map_or(CONCURRENCY, |n| n.parse().expect("--clients=N"));
        runtime.block_on(async {
            let fleet = fleet(kind, clients, &echo_path, &daemon, &host).await;
            let server = if kind == Kind::Direct { echo.pid() } else { daemon.pid() };
            println!("soak: {} with {clients} clients for {secs} s; server pid {server}", kind.key());
            let soak = Params { throughput_secs: secs, throughput_warmup_secs: 0.0, ..p };
            let load = throughput(&fleet, &soak, server).await;
            println!("{:.0} calls/s, {:.1} us of server CPU per call", load.calls_per_sec, load.cpu_us_per_call);
        });
        return;
    }
    if args.iter().any(|a| a == "--scale-only") {
        // Only the scale curve, at the full run's levels and duration.
        let p = Params::new(false, false);
        let (daemon, _) = DaemonProcess::spawn();
        let host = Host::connect(&daemon.address(), &daemon.host_token());
        runtime.block_on(scale_curve(&p, &echo_path, &daemon, &host));
        return;
    }
    if let Some(kinds) = args.iter().find_map(|a| a.strip_prefix("--latency=")) {
        // Only the latency rounds, for the kinds named (direct is always measured), with
        // --samples=N per kind; with BROKER_BENCH_DAEMON_B a second daemon build is measured in
        // the same interleaved rounds: an A/B of two builds on a noisy machine.
        let kinds: Vec<Kind> = kinds.split(',').map(|k| Kind::parse(k).expect("--latency=KIND,KIND")).collect();
        let samples = args.iter().find_map(|a| a.strip_prefix("--samples=")).map_or(20_000, |n| n.parse().unwrap());
        let p = Params { samples, rounds: 10, warmup: 1_000, ..p };
        let mut binaries = vec![("A", daemon_binary())];
        if let Some(b) = std::env::var_os("BROKER_BENCH_DAEMON_B") {
            binaries.push(("B", PathBuf::from(b)));
        }
        let daemons: Vec<(&str, DaemonProcess, Host)> = binaries
            .iter()
            .map(|(name, bin)| {
                let (daemon, _) = DaemonProcess::spawn_binary(bin);
                let host = Host::connect(&daemon.address(), &daemon.host_token());
                (*name, daemon, host)
            })
            .collect();
        // --current-thread: the clients on one current-thread runtime (no hand-off between the
        // calling thread and a worker): how much of each figure is the client's own scheduling.
        let current_thread = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let clients = if args.iter().any(|a| a == "--current-thread") { &current_thread } else { &runtime };
        clients.block_on(async {
            let mut singles = Vec::new();
            let mut names = Vec::new();
            let direct = fleet(Kind::Direct, 1, &echo_path, &daemons[0].1, &daemons[0].2).await;
            singles.push((Kind::Direct, direct.clients.into_iter().next().expect("one")));
            names.push("direct".to_owned());
            if args.iter().any(|a| a == "--floor") {
                // The least a unary call through the daemon costs: its Health/Check (a plain tonic
                // service behind the daemon's connection gate), and a renderer unary call whose
                // launch token is refused before any API work. (That renderer's connection proves
                // nothing, so the daemon closes it every limits.auth_timeout_ms, 10 s, and the client
                // reconnects: a handful of slow samples in a run, far fewer than its slowest 1 %.)
                let daemon = &daemons[0].1;
                let channel = miniapp_broker_client::connect::channel(&daemon.address()).await.expect("channel");
                let token = format!("Bearer {}", daemon.host_token()).parse().expect("token metadata");
                let refused = RendererClient::connect(&daemon.address(), "bench.refused").await.expect("connects");
                for (label, client) in
                    [("daemon_health", Client::Health(channel, token)), ("refused_token", Client::Refused(refused))]
                {
                    client.check().await;
                    singles.push((Kind::Direct, client));
                    names.push(label.to_owned());
                }
            }
            for kind in kinds.iter().filter(|k| **k != Kind::Direct) {
                for (name, daemon, host) in &daemons {
                    let f = fleet(*kind, 1, &echo_path, daemon, host).await;
                    let client = f.clients.into_iter().next().expect("one client");
                    client.check().await;
                    singles.push((*kind, client));
                    names.push(format!("{} {name}", kind.key()));
                }
            }
            let lat = latencies(&singles, &p).await;
            let direct = lat[0].1;
            for ((_, l), name) in lat.iter().zip(&names) {
                println!(
                    "{:<18} p50 {:>7.1} us ({:.2}x)  p99 {:>7.1} us ({:.2}x)  mean {:>7.1} us",
                    name,
                    l.p50_us,
                    l.p50_us / direct.p50_us,
                    l.p99_us,
                    l.p99_us / direct.p99_us,
                    l.mean_us
                );
            }
        });
        return;
    }
    if let Some((kind, n)) = calls_only {
        // Exactly N calls from 64 clients, then the daemon is stopped: run twice with two values of
        // N under BROKER_BENCH_WRAPPER="valgrind --tool=callgrind" for instructions per call.
        let (daemon, _) = DaemonProcess::spawn();
        let host = Host::connect(&daemon.address(), &daemon.host_token());
        runtime.block_on(async {
            let fleet = fleet(kind, CONCURRENCY, &echo_path, &daemon, &host).await;
            stream::iter(fleet.clients.iter()).for_each_concurrent(None, |c| c.check()).await;
            let per_client = (n as usize).div_ceil(CONCURRENCY);
            stream::iter(fleet.clients.iter())
                .for_each_concurrent(None, |c| async move {
                    for _ in 0..per_client {
                        c.call().await;
                    }
                })
                .await;
            println!("calls: {} x {per_client} {} calls done; daemon pid {}", CONCURRENCY, kind.key(), daemon.pid());
        });
        drop(host);
        drop(daemon);
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
    println!("load average before the run: {}", load_average());

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

    // 2-4 through one daemon (and the payment through a second one, on a file-backed store)
    let (daemon, _) = DaemonProcess::spawn();
    let host = Host::connect(&daemon.address(), &daemon.host_token());
    let (file_daemon, _) = DaemonProcess::spawn_with_store(&daemon_binary(), BENCH_CONFIG, true);
    let file_host = Host::connect(&file_daemon.address(), &file_daemon.host_token());
    let (lat, thr, payment_file, scale, soaked) = runtime.block_on(async {
        let mut singles = Vec::new();
        for kind in Kind::ALL {
            let f = fleet(kind, 1, &echo_path, &daemon, &host).await;
            let client = f.clients.into_iter().next().expect("one client");
            // Sanity: each kind answers as expected before anything is timed.
            client.check().await;
            singles.push((kind, client));
        }
        let lat = latencies(&singles, &p).await;
        for (k, l) in &lat {
            println!("{:<16} p50 {:>7.1} us  p99 {:>7.1} us  mean {:>7.1} us", k.key(), l.p50_us, l.p99_us, l.mean_us);
        }
        // Each kind is labelled with whether it runs on the file-backed store: the payment runs on
        // both, in the same rotation, so their difference is the durable writes alone.
        let mut fleets = Vec::new();
        for kind in Kind::ALL {
            let f = fleet(kind, CONCURRENCY, &echo_path, &daemon, &host).await;
            let server = if kind == Kind::Direct { echo.pid() } else { daemon.pid() };
            fleets.push(((kind, false), f, server));
        }
        let f = fleet(Kind::InvokePayment, CONCURRENCY, &echo_path, &file_daemon, &file_host).await;
        fleets.push(((Kind::InvokePayment, true), f, file_daemon.pid()));
        let measured = throughputs(&fleets, &p).await;
        drop(fleets);
        let payment_file = measured.iter().find(|((_, file), _)| *file).map(|(_, load)| *load).unwrap_or_default();
        let thr: Vec<(Kind, Load)> =
            measured.into_iter().filter(|((_, file), _)| !file).map(|((kind, _), load)| (kind, load)).collect();
        println!(
            "payment on the file store: {:.0} calls/s with {CONCURRENCY} clients, {:.1} us daemon CPU per call",
            payment_file.calls_per_sec, payment_file.cpu_us_per_call
        );
        for (kind, load) in &thr {
            println!(
                "{:<16} {:>9.0} calls/s with {CONCURRENCY} clients, {:>6.1} us server CPU per call",
                kind.key(),
                load.calls_per_sec,
                load.cpu_us_per_call
            );
        }
        let scale = scale_curve(&p, &echo_path, &daemon, &host).await;
        let soaked = soak(&p, &echo_path).await;
        println!(
            "soak:     {:.0} s at {:.0} calls/s: RSS {} KiB after {:.0} s, {} KiB at the end",
            p.soak_secs, soaked.calls_per_sec, soaked.rss_base_kib, p.soak_base_secs, soaked.rss_end_kib
        );
        (lat, thr, payment_file, scale, soaked)
    });
    let daemon_threads = daemon.threads();
    drop((file_host, file_daemon));
    drop(host);
    drop(daemon);

    // idle renderers
    let idle = runtime.block_on(idle_rss(&p));
    println!(
        "idle:     {} renderers: RSS {} -> {} (instances) -> {} KiB (streams); {:.2} KiB per renderer",
        idle.renderers, idle.rss_base_kib, idle.rss_launched_kib, idle.rss_connected_kib, idle.per_renderer_kib
    );

    let http = runtime.block_on(backend_http(&p));
    println!(
        "backend HTTP: /cgi-bin/token {:.0}/s p50 {:.1} us ({} bytes) against bare axum {:.0}/s p50 {:.1} us; \
         /sns/jscode2session {:.0}/s p50 {:.1} us ({} bytes) against {:.0}/s p50 {:.1} us",
        http.token.per_sec,
        http.token.latency.p50_us,
        http.token_bytes,
        http.token_bare.per_sec,
        http.token_bare.latency.p50_us,
        http.jscode.per_sec,
        http.jscode.latency.p50_us,
        http.jscode_bytes,
        http.jscode_bare.per_sec,
        http.jscode_bare.latency.p50_us
    );
    let swept = sweep_load(&p);
    println!(
        "sweep:    {} expired codes swept in {:.1} ms under 64 logins: p99 {:.1} us during ({} logins), {:.1} us before",
        p.sweep_codes, swept.sweep_ms, swept.during.p99_us, swept.samples_during, swept.without.p99_us
    );

    let l = |k: Kind| lat.iter().find(|(kind, _)| *kind == k).map(|(_, l)| *l).unwrap_or_default();
    let load = |k: Kind| thr.iter().find(|(kind, _)| *kind == k).map(|(_, t)| *t).unwrap_or_default();
    let t = |k: Kind| load(k).calls_per_sec;
    let direct = l(Kind::Direct);
    let mut rows = vec![
        Row { key: "raw_p50_us", value: raw.p50_us, unit: "us", target: None },
        Row { key: "raw_p99_us", value: raw.p99_us, unit: "us", target: None },
        Row { key: "raw_throughput", value: raw_thr, unit: "calls/s", target: None },
    ];
    const KEYS: [[&str; 3]; 8] = [
        ["direct_p50_us", "direct_p99_us", "direct_throughput"],
        ["mediated_p50_us", "mediated_p99_us", "mediated_throughput"],
        ["mediated_unary_p50_us", "mediated_unary_p99_us", "mediated_unary_throughput"],
        ["invoke_mediated_p50_us", "invoke_mediated_p99_us", "invoke_mediated_throughput"],
        ["invoke_payment_p50_us", "invoke_payment_p99_us", "invoke_payment_throughput"],
        ["default_p50_us", "default_p99_us", "default_throughput"],
        ["default_unary_p50_us", "default_unary_p99_us", "default_unary_throughput"],
        ["invoke_default_p50_us", "invoke_default_p99_us", "invoke_default_throughput"],
    ];
    for (kind, [p50, p99, thr]) in Kind::ALL.into_iter().zip(KEYS) {
        rows.push(Row { key: p50, value: l(kind).p50_us, unit: "us", target: None });
        rows.push(Row { key: p99, value: l(kind).p99_us, unit: "us", target: None });
        rows.push(Row { key: thr, value: t(kind), unit: "calls/s", target: None });
    }
    let cpu = |k: Kind| load(k).cpu_us_per_call;
    rows.extend([
        Row { key: "direct_cpu_us_per_call", value: cpu(Kind::Direct), unit: "us", target: None },
        Row { key: "daemon_cpu_us_per_mediated_call", value: cpu(Kind::Mediated), unit: "us", target: None },
        Row { key: "daemon_cpu_us_per_mediated_unary_call", value: cpu(Kind::MediatedUnary), unit: "us", target: None },
        Row {
            key: "daemon_cpu_us_per_invoke_mediated_call",
            value: cpu(Kind::InvokeMediated),
            unit: "us",
            target: None,
        },
        Row { key: "daemon_cpu_us_per_invoke_payment_call", value: cpu(Kind::InvokePayment), unit: "us", target: None },
        Row { key: "daemon_cpu_us_per_default_call", value: cpu(Kind::Default), unit: "us", target: None },
        Row { key: "daemon_cpu_us_per_default_unary_call", value: cpu(Kind::DefaultUnary), unit: "us", target: None },
        Row { key: "daemon_cpu_us_per_invoke_default_call", value: cpu(Kind::InvokeDefault), unit: "us", target: None },
    ]);
    // The scale curve: per level, each kind's figures and, for the daemon's kinds, p50 ratios.
    let point = |n: usize, k: Kind| {
        scale.iter().find(|(level, kind, _)| *level == n && *kind == k).map(|(_, _, pt)| *pt).unwrap_or_default()
    };
    for &n in p.scale_levels {
        for kind in [Kind::Direct, Kind::Mediated, Kind::Default] {
            let pt = point(n, kind);
            let name = |what: &str| -> &'static str { format!("scale_{n}_{}_{what}", kind.key()).leak() };
            rows.push(Row { key: name("p50_us"), value: pt.latency.p50_us, unit: "us", target: None });
            rows.push(Row { key: name("p99_us"), value: pt.latency.p99_us, unit: "us", target: None });
            rows.push(Row { key: name("throughput"), value: pt.calls_per_sec, unit: "calls/s", target: None });
            if kind != Kind::Direct {
                let ratio = pt.latency.p50_us / point(n, Kind::Direct).latency.p50_us;
                rows.push(Row { key: name("p50_ratio"), value: ratio, unit: "x", target: None });
            }
        }
    }
    // How much the ratio to direct grows from 16 renderers to the most (1,024 in full and quick
    // runs): the worse of the mediated and default p50 ratios.
    let (low, high) = (16.min(*p.scale_levels.last().unwrap_or(&16)), *p.scale_levels.last().unwrap_or(&16));
    let growth = |k: Kind| {
        let ratio = |n: usize| point(n, k).latency.p50_us / point(n, Kind::Direct).latency.p50_us;
        ratio(high) / ratio(low) - 1.0
    };
    let scale_ratio_growth = growth(Kind::Mediated).max(growth(Kind::Default));
    // The same growth for the mean latency (by Little's law, clients / throughput: the ratio of
    // the throughputs), which the service order under overload does not skew as it does the p50.
    let mean_growth = |k: Kind| {
        let ratio = |n: usize| point(n, Kind::Direct).calls_per_sec / point(n, k).calls_per_sec;
        ratio(high) / ratio(low) - 1.0
    };
    let scale_mean_ratio_growth = mean_growth(Kind::Mediated).max(mean_growth(Kind::Default));
    let soak_rss_growth_pct =
        (soaked.rss_end_kib as f64 - soaked.rss_base_kib as f64) / soaked.rss_base_kib.max(1) as f64 * 100.0;
    let ratio = |a: f64, b: f64| a / b;
    rows.extend([
        Row { key: "idle_rss_per_renderer_kib", value: idle.per_renderer_kib, unit: "KiB", target: Some(("<=", 24.0)) },
        Row { key: "startup_ms", value: startup_ms, unit: "ms", target: Some(("<=", 30.0)) },
        Row {
            key: "mediated_p50_ratio",
            value: ratio(l(Kind::Mediated).p50_us, direct.p50_us),
            unit: "x",
            target: Some(("<=", 1.25)),
        },
        Row {
            key: "mediated_p99_ratio",
            value: ratio(l(Kind::Mediated).p99_us, direct.p99_us),
            unit: "x",
            target: Some(("<=", 1.5)),
        },
        Row {
            key: "mediated_throughput_ratio",
            value: ratio(t(Kind::Mediated), t(Kind::Direct)),
            unit: "x",
            target: Some((">=", 1.2)),
        },
        Row {
            key: "mediated_unary_p50_ratio",
            value: ratio(l(Kind::MediatedUnary).p50_us, direct.p50_us),
            unit: "x",
            target: None,
        },
        Row {
            key: "mediated_unary_throughput_ratio",
            value: ratio(t(Kind::MediatedUnary), t(Kind::Direct)),
            unit: "x",
            target: None,
        },
        Row {
            key: "invoke_mediated_p50_ratio",
            value: ratio(l(Kind::InvokeMediated).p50_us, direct.p50_us),
            unit: "x",
            target: None,
        },
        Row {
            key: "invoke_mediated_throughput_ratio",
            value: ratio(t(Kind::InvokeMediated), t(Kind::Direct)),
            unit: "x",
            target: None,
        },
        Row {
            key: "default_p50_ratio",
            value: ratio(l(Kind::Default).p50_us, direct.p50_us),
            unit: "x",
            target: Some(("<=", 1.1)),
        },
        Row {
            key: "default_unary_p50_ratio",
            value: ratio(l(Kind::DefaultUnary).p50_us, direct.p50_us),
            unit: "x",
            target: None,
        },
        Row {
            key: "invoke_default_p50_ratio",
            value: ratio(l(Kind::InvokeDefault).p50_us, direct.p50_us),
            unit: "x",
            target: None,
        },
        Row {
            key: "mediated_cpu_ratio",
            value: ratio(cpu(Kind::Mediated), cpu(Kind::Direct)),
            unit: "x",
            target: Some(("<=", CPU_RATIO_TARGET)),
        },
        Row {
            key: "mediated_unary_cpu_ratio",
            value: ratio(cpu(Kind::MediatedUnary), cpu(Kind::Direct)),
            unit: "x",
            target: Some(("<=", CPU_RATIO_TARGET)),
        },
        Row {
            key: "invoke_mediated_cpu_ratio",
            value: ratio(cpu(Kind::InvokeMediated), cpu(Kind::Direct)),
            unit: "x",
            target: Some(("<=", CPU_RATIO_TARGET)),
        },
        Row {
            key: "default_cpu_ratio",
            value: ratio(cpu(Kind::Default), cpu(Kind::Direct)),
            unit: "x",
            target: Some(("<=", CPU_RATIO_TARGET)),
        },
        Row {
            key: "default_unary_cpu_ratio",
            value: ratio(cpu(Kind::DefaultUnary), cpu(Kind::Direct)),
            unit: "x",
            target: Some(("<=", CPU_RATIO_TARGET)),
        },
        Row {
            key: "invoke_default_cpu_ratio",
            value: ratio(cpu(Kind::InvokeDefault), cpu(Kind::Direct)),
            unit: "x",
            target: Some(("<=", CPU_RATIO_TARGET)),
        },
        Row {
            key: "invoke_payment_cpu_ratio",
            value: ratio(cpu(Kind::InvokePayment), cpu(Kind::Direct)),
            unit: "x",
            target: Some(("<=", PAYMENT_CPU_RATIO_TARGET)),
        },
        Row {
            key: "daemon_cpu_us_per_invoke_payment_file_call",
            value: payment_file.cpu_us_per_call,
            unit: "us",
            target: None,
        },
        Row {
            key: "invoke_payment_file_cpu_ratio",
            value: ratio(payment_file.cpu_us_per_call, cpu(Kind::Direct)),
            unit: "x",
            target: None,
        },
        Row {
            key: "payment_durable_writes_cpu_us",
            value: payment_file.cpu_us_per_call - cpu(Kind::InvokePayment),
            unit: "us",
            target: None,
        },
        Row { key: "scale_ratio_growth", value: scale_ratio_growth, unit: "x", target: Some(("<=", 0.10)) },
        Row { key: "soak_rss_growth_pct", value: soak_rss_growth_pct, unit: "%", target: Some(("<=", 5.0)) },
        Row {
            key: "sweep_p99_ratio",
            value: ratio(swept.during.p99_us, swept.without.p99_us),
            unit: "x",
            target: Some(("<=", 2.0)),
        },
        Row { key: "sweep_p99_us", value: swept.during.p99_us, unit: "us", target: None },
        Row {
            key: "backend_token_throughput_ratio",
            value: ratio(http.token.per_sec, http.token_bare.per_sec),
            unit: "x",
            target: Some((">=", 0.8)),
        },
        Row {
            key: "backend_jscode2session_throughput_ratio",
            value: ratio(http.jscode.per_sec, http.jscode_bare.per_sec),
            unit: "x",
            target: None,
        },
        Row {
            key: "backend_token_p50_ratio",
            value: ratio(http.token.latency.p50_us, http.token_bare.latency.p50_us),
            unit: "x",
            target: None,
        },
        Row {
            key: "backend_jscode2session_p50_ratio",
            value: ratio(http.jscode.latency.p50_us, http.jscode_bare.latency.p50_us),
            unit: "x",
            target: None,
        },
        Row { key: "backend_token_throughput", value: http.token.per_sec, unit: "req/s", target: None },
        Row { key: "backend_token_p50_us", value: http.token.latency.p50_us, unit: "us", target: None },
        Row { key: "backend_token_bare_throughput", value: http.token_bare.per_sec, unit: "req/s", target: None },
        Row { key: "backend_token_bare_p50_us", value: http.token_bare.latency.p50_us, unit: "us", target: None },
        Row { key: "backend_jscode2session_throughput", value: http.jscode.per_sec, unit: "req/s", target: None },
        Row { key: "backend_jscode2session_p50_us", value: http.jscode.latency.p50_us, unit: "us", target: None },
        Row {
            key: "backend_jscode2session_bare_throughput",
            value: http.jscode_bare.per_sec,
            unit: "req/s",
            target: None,
        },
        Row {
            key: "backend_jscode2session_bare_p50_us",
            value: http.jscode_bare.latency.p50_us,
            unit: "us",
            target: None,
        },
        Row { key: "sweep_without_p99_us", value: swept.without.p99_us, unit: "us", target: None },
        Row { key: "sweep_ms", value: swept.sweep_ms, unit: "ms", target: None },
        Row {
            key: "mediated_unary_p99_ratio",
            value: ratio(l(Kind::MediatedUnary).p99_us, direct.p99_us),
            unit: "x",
            target: None,
        },
        Row {
            key: "invoke_mediated_p99_ratio",
            value: ratio(l(Kind::InvokeMediated).p99_us, direct.p99_us),
            unit: "x",
            target: None,
        },
        Row {
            key: "invoke_payment_p50_ratio",
            value: ratio(l(Kind::InvokePayment).p50_us, direct.p50_us),
            unit: "x",
            target: None,
        },
        Row {
            key: "invoke_payment_throughput_ratio",
            value: ratio(t(Kind::InvokePayment), t(Kind::Direct)),
            unit: "x",
            target: None,
        },
        Row { key: "default_p99_ratio", value: ratio(l(Kind::Default).p99_us, direct.p99_us), unit: "x", target: None },
        Row {
            key: "default_throughput_ratio",
            value: ratio(t(Kind::Default), t(Kind::Direct)),
            unit: "x",
            target: None,
        },
        Row {
            key: "default_unary_throughput_ratio",
            value: ratio(t(Kind::DefaultUnary), t(Kind::Direct)),
            unit: "x",
            target: None,
        },
        Row {
            key: "invoke_default_throughput_ratio",
            value: ratio(t(Kind::InvokeDefault), t(Kind::Direct)),
            unit: "x",
            target: None,
        },
        Row { key: "scale_mean_ratio_growth", value: scale_mean_ratio_growth, unit: "x", target: None },
        Row { key: "soak_throughput", value: soaked.calls_per_sec, unit: "calls/s", target: None },
    ]);
    print_table(&rows);
    if smoke {
        for row in &rows {
            // Growths and differences may be zero or negative; everything else is a measured,
            // positive figure.
            let signed = matches!(
                row.key,
                "scale_ratio_growth"
                    | "scale_mean_ratio_growth"
                    | "soak_rss_growth_pct"
                    | "payment_durable_writes_cpu_us"
            );
            assert!(
                row.value.is_finite() && (signed || row.value > 0.0),
                "{} = {}: every figure is measured",
                row.key,
                row.value
            );
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
        "throughput_rounds": p.throughput_rounds,
        "startup_answer_ms": (startup_answer_ms * 1000.0).round() / 1000.0,
        "idle_renderers": idle.renderers,
        "idle_rss_base_kib": idle.rss_base_kib,
        "idle_rss_launched_kib": idle.rss_launched_kib,
        "idle_rss_connected_kib": idle.rss_connected_kib,
        "idle_rss_per_stream_kib": (idle.per_stream_kib * 1000.0).round() / 1000.0,
        "scale_levels": p.scale_levels,
        "scale_secs": p.scale_secs,
        "soak_secs": p.soak_secs,
        "soak_rss_base_kib": soaked.rss_base_kib,
        "soak_rss_end_kib": soaked.rss_end_kib,
        "daemon_threads": daemon_threads,
        "idle_daemon_threads": idle.threads,
        "load_average_after": load_average(),
        "targets_met": rows.iter().all(|r| r.pass() != Some(false)),
        "targets_missed": rows.iter().filter(|r| r.pass() == Some(false)).map(|r| r.key).collect::<Vec<_>>(),
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

/// /proc/loadavg's first three figures: how busy the shared machine was.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}
