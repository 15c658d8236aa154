/**
 * `npm run bench`: what a call costs from Node, against the release daemon, next to grpc-js's own
 * floor measured in the same run over the same kind of socket.
 *
 * One process runs every client; the daemon (the real binary), a `HostClient` (bench/peer.ts,
 * `host`) and a grpc-js echo server (bench/peer.ts, `echo`) each run in a process of their own.
 * The kinds:
 *
 * - `renderer_stream`: `RendererClient.call('login')`, a v1 login the host answers at once, on the
 *   client's multiplexed Session stream: renderer → daemon → host → daemon → renderer;
 * - `daemon_stream`: `RendererClient.call('getSetting')` on a v3 app instance, which the daemon
 *   answers itself from its store: one stream hop, renderer → daemon → renderer (a diagnostic: the
 *   mediated call is this hop plus the daemon → host → daemon one);
 * - `renderer_unary`: the same login as the typed unary `OpenApi.Login`, on a grpc-js client made
 *   as `RendererClient` makes its own (channel options, owner check and token per call);
 * - `wx_login`: `createWx(renderer).login()` on the same renderer;
 * - `wx_login_invoke`: `wx.login()` over the unary JSON `OpenApi.Invoke`, as `invoke` always went
 *   before it used the stream (params to JSON, the owner check and token per call, JSON back);
 * - `echo_unary`, `echo_stream`: a 64-character message to the echo server and back, one unary
 *   call, or one round trip on a bidi stream held open.
 *
 * Latency: one client, back to back, the kinds in many short interleaved rounds (the order
 * rotating) after a warm-up, so that drift on a shared machine hits them alike. Throughput: 1 and N (64) clients
 * calling back to back, each kind twice for half the window, in turn, after a warm-up; for
 * renderers each client has its own app instance (and Session stream). grpc-js puts clients of
 * one target and options on one connection, so the N clients of a kind share one connection to
 * their server, as the app instances of one shell do.
 *
 * `--quick` for a short run; `--daemon=PATH` for another binary; writes bench/summary.json.
 */
import { type ChildProcess, fork, spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { performance } from 'node:perf_hooks';
import * as grpc from '@grpc/grpc-js';
import { checkServerOwner, CHANNEL_OPTIONS, CREDENTIALS, target } from '../src/connect';
import { createWx, LAUNCH_TOKEN_HEADER, RendererClient, v1, type WxInvoker, type WxResult } from '../src/index';
import type { OpenApiClient } from '../src/generated/miniapp/broker/v1/OpenApi';
import { echoService, type FromPeer, type ToPeer } from './peer';

/** Where the repository is, from dist/bench/. */
const REPO = path.resolve(__dirname, '..', '..', '..', '..');
/** Where the summary goes by default: clients/node/bench/summary.json. */
export const SUMMARY_PATH = path.resolve(__dirname, '..', '..', 'bench', 'summary.json');

/** Limits high enough that the benchmark measures speed, not the daemon's protection (the Rust
 * bench's, plus room for every client's streams on the one connection grpc-js shares). */
const BENCH_CONFIG = `
[limits]
max_calls_in_flight_per_instance = 1024
calls_per_second_per_app = 100000000
burst_per_app = 100000000
calls_per_second_per_user = 100000000
burst_per_user = 100000000
max_renderer_streams = 100000
max_connections = 100000
max_streams_per_connection = 100000
`;

const PAYLOAD = 'x'.repeat(64);

/** The targets of the summary's two ratios. */
export const TARGETS = { mediated_stream_p50_ratio: 2.2, wx_overhead_pct: 5 } as const;

export const KINDS = ['renderer_stream', 'daemon_stream', 'renderer_unary', 'wx_login', 'wx_login_invoke', 'echo_unary', 'echo_stream'] as const;
export type KindName = (typeof KINDS)[number];

export interface BenchOptions {
  /** The daemon binary. */
  daemon: string;
  /** Latency samples per kind (one client), over all rounds. */
  samples: number;
  rounds: number;
  /** Calls per kind before the rounds. */
  warmup: number;
  /** Throughput window per kind and client count (two halves). */
  windowMs: number;
  /** The many-clients point. */
  clients: number;
  /** Where to write the summary; nothing is written without it. */
  out?: string;
  log?: (line: string) => void;
}

// Many short rounds: a chain of processes on few CPUs settles into one placement per stretch of
// calls, fast or slow, and many rounds give every kind about the same share of each.
export const FULL: Omit<BenchOptions, 'daemon'> = { samples: 20_000, rounds: 40, warmup: 2_000, windowMs: 4_000, clients: 64 };
export const QUICK: Omit<BenchOptions, 'daemon'> = { samples: 3_000, rounds: 15, warmup: 1_000, windowMs: 1_000, clients: 64 };

/** The summary: `figures` holds every number (the keys the issue names among them). */
export interface Summary {
  figures: Record<string, number>;
  targets: Record<string, number>;
  targets_met: boolean;
  targets_missed: string[];
  run: Record<string, unknown>;
}

/** One way of calling, per client: `callers[i]` makes one call for client i and checks its answer. */
interface Kind {
  name: KindName;
  callers: (() => Promise<void>)[];
}

// ---------------------------------------------------------------------------------------------
// The processes

/** `miniapp-brokerd serve` on a socket in `dir`, with the bench's limits. */
class DaemonProcess {
  private tail = '';
  private readonly exited: Promise<void>;
  private constructor(
    private readonly child: ChildProcess,
    readonly socket: string,
    readonly tokenFile: string,
  ) {
    this.exited = new Promise((resolve) => child.on('exit', () => resolve()));
  }

  static async start(binary: string, dir: string): Promise<DaemonProcess> {
    const config = path.join(dir, 'config.toml');
    fs.writeFileSync(config, BENCH_CONFIG);
    const data = path.join(dir, 'data');
    const socket = path.join(dir, 'brokerd.sock');
    const env: NodeJS.ProcessEnv = { ...process.env, XDG_CONFIG_HOME: path.join(dir, 'config') };
    for (const k of ['RUST_LOG', 'MINIAPP_BROKERD_CONFIG', 'LISTEN_PID', 'LISTEN_FDS']) delete env[k];
    const args = ['serve', '--config', config, '--socket', socket, '--data-dir', data, '--ephemeral'];
    const child = spawn(binary, args, { env, stdio: ['ignore', 'ignore', 'pipe'] });
    const daemon = new DaemonProcess(child, socket, path.join(data, 'host.token'));
    await bounded('the daemon to listen', 20_000, new Promise<void>((resolve, reject) => {
      child.stderr!.setEncoding('utf8');
      child.stderr!.on('data', (chunk: string) => {
        // Only a tail is kept, for the message if it dies.
        daemon.tail = (daemon.tail + chunk).slice(-4096);
        if (daemon.tail.includes('listening on')) resolve();
      });
      child.on('exit', (code) => reject(new Error(`the daemon exited (${code}) before listening:\n${daemon.tail}`)));
      child.on('error', reject);
    }));
    return daemon;
  }

  async stop(): Promise<void> {
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill('SIGTERM');
    await bounded('the daemon to exit', 10_000, this.exited);
  }
}

/** A bench/peer.ts process in `role`, once it is ready. */
async function startPeer(role: 'host' | 'echo', args: string[]): Promise<ChildProcess> {
  const child = fork(path.join(__dirname, 'peer.js'), [role, ...args], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
  await bounded(`the ${role} process to be ready`, 20_000, nextMessage(child, 'ready'));
  return child;
}

function nextMessage<T extends FromPeer['type']>(child: ChildProcess, type: T): Promise<Extract<FromPeer, { type: T }>> {
  return new Promise((resolve, reject) => {
    const onMessage = (m: FromPeer) => {
      if (m.type === 'error') return done(() => reject(new Error(`peer: ${m.message}`)));
      if (m.type === type) done(() => resolve(m as Extract<FromPeer, { type: T }>));
    };
    const onExit = (code: number | null) => done(() => reject(new Error(`a peer process exited (${code})`)));
    const done = (then: () => void) => {
      child.off('message', onMessage);
      child.off('exit', onExit);
      then();
    };
    child.on('message', onMessage);
    child.on('exit', onExit);
  });
}

async function stopPeer(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise<void>((resolve) => child.on('exit', () => resolve()));
  child.disconnect();
  await bounded('a peer process to exit', 10_000, exited);
}

async function bounded<T>(what: string, ms: number, promise: Promise<T>): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms)));
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

// ---------------------------------------------------------------------------------------------
// The callers

function tokenMetadata(address: string, token: string): grpc.Metadata {
  checkServerOwner(address);
  const md = new grpc.Metadata();
  md.set(LAUNCH_TOKEN_HEADER, token);
  return md;
}

function expectLogin(result: { errMsg?: string }): void {
  if (result.errMsg !== 'login:ok') throw new Error(`login answered ${JSON.stringify(result)}`);
}

/** `wx`'s invoker as `RendererClient.invoke` was before it used the stream: the unary Invoke. */
function unaryInvoker(client: OpenApiClient, address: string, token: string): WxInvoker {
  return {
    invoke: (api, params) => {
      const clean: Record<string, unknown> = {};
      for (const [k, v] of Object.entries(params ?? {})) if (typeof v !== 'function') clean[k] = v;
      const paramsJson = JSON.stringify(clean);
      return new Promise((resolve, reject) =>
        client.Invoke({ api, paramsJson }, tokenMetadata(address, token), (err, r) =>
          err || !r ? reject(err ?? new Error('no answer')) : resolve({ ok: r.ok, result: JSON.parse(r.resultJson) as WxResult }),
        ),
      );
    },
  };
}

/** One round trip on a bidi echo stream held open: a ping, then its echo. */
function streamEcho(call: grpc.ClientDuplexStream<unknown, { id: number }>): () => Promise<void> {
  let waiting: ((ping: { id: number }) => void) | undefined;
  let failed: Error | undefined;
  let id = 0;
  call.on('data', (ping: { id: number }) => {
    const w = waiting;
    waiting = undefined;
    w?.(ping);
  });
  call.on('error', (e: Error) => (failed = e));
  return () =>
    new Promise<void>((resolve, reject) => {
      if (failed) return reject(failed);
      const mine = ++id;
      waiting = (ping) => (ping.id === mine ? resolve() : reject(new Error(`echo ${ping.id} for ${mine}`)));
      call.write({ id: mine, payload: PAYLOAD });
    });
}

// ---------------------------------------------------------------------------------------------
// Measuring

/** The value at `q` (0..1) of sorted `v`, nearest rank. */
function quantile(sorted: Float64Array, q: number): number {
  if (sorted.length === 0) return NaN;
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1))];
}

function sortedOf(values: number[]): Float64Array {
  return Float64Array.from(values).sort();
}

/** `n` calls one after the other, each timed (µs). */
async function sequential(call: () => Promise<void>, n: number, into?: number[]): Promise<void> {
  for (let i = 0; i < n; i++) {
    const start = performance.now();
    await call();
    into?.push((performance.now() - start) * 1000);
  }
}

/** `callers` calling back to back for `ms`: calls answered, seconds taken, each call's µs. */
async function window(callers: (() => Promise<void>)[], ms: number, into?: number[]): Promise<{ calls: number; seconds: number }> {
  const started = performance.now();
  const end = started + ms;
  let calls = 0;
  await Promise.all(
    callers.map(async (call) => {
      while (performance.now() < end) {
        const start = performance.now();
        await call();
        into?.push((performance.now() - start) * 1000);
        calls++;
      }
    }),
  );
  return { calls, seconds: (performance.now() - started) / 1000 };
}

// ---------------------------------------------------------------------------------------------
// The run

/** Runs the benchmark; writes `options.out` if given. */
export async function runBench(options: BenchOptions): Promise<Summary> {
  const log = options.log ?? (() => {});
  if (!fs.existsSync(options.daemon)) throw new Error(`no daemon binary at ${options.daemon}`);
  const loadBefore = os.loadavg();
  const startedAt = new Date().toISOString();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'miniapp-node-bench-'));
  const cleanup: (() => Promise<void> | void)[] = [() => fs.rmSync(dir, { recursive: true, force: true })];
  try {
    const daemon = await DaemonProcess.start(options.daemon, dir);
    cleanup.unshift(() => daemon.stop());
    const host = await startPeer('host', [daemon.socket, daemon.tokenFile]);
    cleanup.unshift(() => stopPeer(host));
    const echoSocket = path.join(dir, 'echo.sock');
    const echo = await startPeer('echo', [echoSocket]);
    cleanup.unshift(() => stopPeer(echo));

    const n = Math.max(1, options.clients);
    host.send({ type: 'launch', count: n, appJson: '{"apiVersion":"v1"}', appsOf: 8 } satisfies ToPeer);
    const { tokens } = await bounded('the host to launch the app instances', 60_000, nextMessage(host, 'launched'));
    host.send({ type: 'launch', count: n, appJson: '{"apiVersion":"v3"}', appsOf: 8 } satisfies ToPeer);
    const { tokens: v3Tokens } = await bounded('the host to launch the v3 app instances', 60_000, nextMessage(host, 'launched'));

    const Echo = (echoService() as unknown as { miniapp: { bench: { v1: { Echo: grpc.ServiceClientConstructor } } } }).miniapp.bench.v1.Echo;
    const kinds: Kind[] = KINDS.map((name) => ({ name, callers: [] }));
    const kind = (name: KindName) => kinds.find((k) => k.name === name)!;
    for (const [i, token] of tokens.entries()) {
      const renderer = new RendererClient(daemon.socket, token);
      const v3Renderer = new RendererClient(daemon.socket, v3Tokens[i]);
      const wx = createWx(renderer);
      const openApi = new v1.OpenApi(target(daemon.socket), CREDENTIALS, CHANNEL_OPTIONS) as unknown as OpenApiClient;
      const wxInvoke = createWx(unaryInvoker(openApi, daemon.socket, token));
      const echoClient = new Echo(target(echoSocket), CREDENTIALS, CHANNEL_OPTIONS) as grpc.Client & Record<string, (...args: unknown[]) => unknown>;
      const echoCall = echoClient.Stream() as grpc.ClientDuplexStream<unknown, { id: number }>;
      cleanup.unshift(() => {
        renderer.close();
        v3Renderer.close();
        openApi.close();
        echoCall.end();
        echoClient.close();
      });
      kind('renderer_stream').callers.push(async () => expectLogin(await renderer.call('login')));
      kind('daemon_stream').callers.push(async () => {
        const setting = await v3Renderer.call('getSetting');
        if (setting.errMsg !== 'getSetting:ok') throw new Error(`getSetting answered ${JSON.stringify(setting)}`);
      });
      kind('renderer_unary').callers.push(
        () =>
          new Promise<void>((resolve, reject) =>
            openApi.Login({}, tokenMetadata(daemon.socket, token), (err, r) => {
              if (err || !r) return reject(err ?? new Error('no answer'));
              expectLogin(r);
              resolve();
            }),
          ),
      );
      kind('wx_login').callers.push(async () => expectLogin(await wx.login()));
      kind('wx_login_invoke').callers.push(async () => expectLogin(await wxInvoke.login()));
      kind('echo_unary').callers.push(
        () =>
          new Promise<void>((resolve, reject) =>
            echoClient.Unary({ id: 7, payload: PAYLOAD }, (err: grpc.ServiceError | null, r: { id: number } | undefined) =>
              err || r?.id !== 7 ? reject(err ?? new Error('wrong echo')) : resolve(),
            ),
          ),
      );
      kind('echo_stream').callers.push(streamEcho(echoCall));
    }

    const figures: Record<string, number> = {};

    // Latency: one client, interleaved rounds.
    log(`latency: ${options.samples} samples per kind in ${options.rounds} rounds, after ${options.warmup} warm-up calls`);
    for (const k of kinds) await sequential(k.callers[0], options.warmup);
    const samples = new Map<KindName, number[]>(KINDS.map((name) => [name, []]));
    const perRound = Math.max(1, Math.ceil(options.samples / options.rounds));
    // Each round's median per kind, to show how far the rounds spread (drift, a noisy neighbour).
    const roundMedians: Record<string, number[]> = Object.fromEntries(KINDS.map((name) => [name, []]));
    for (let round = 0; round < options.rounds; round++) {
      for (let i = 0; i < kinds.length; i++) {
        const k = kinds[(i + round) % kinds.length];
        const these: number[] = [];
        await sequential(k.callers[0], perRound, these);
        samples.get(k.name)!.push(...these);
        roundMedians[k.name].push(Math.round(quantile(sortedOf(these), 0.5)));
      }
    }
    for (const [name, values] of samples) {
      const sorted = sortedOf(values);
      figures[`${name}_p50_us`] = quantile(sorted, 0.5);
      figures[`${name}_p99_us`] = quantile(sorted, 0.99);
    }

    // Throughput at 1 and n clients: two halves per kind, in turn, after a warm-up.
    for (const clients of [1, n]) {
      const suffix = clients === 1 ? '1' : String(options.clients);
      log(`throughput: ${clients} client(s), ${options.windowMs} ms per kind`);
      const totals = new Map<KindName, { calls: number; seconds: number; latencies: number[] }>();
      for (const k of kinds) {
        await window(k.callers.slice(0, clients), Math.min(500, options.windowMs / 4));
        totals.set(k.name, { calls: 0, seconds: 0, latencies: [] });
      }
      for (let half = 0; half < 2; half++) {
        for (let i = 0; i < kinds.length; i++) {
          const k = kinds[(i + half * 3) % kinds.length];
          const t = totals.get(k.name)!;
          const w = await window(k.callers.slice(0, clients), options.windowMs / 2, t.latencies);
          t.calls += w.calls;
          t.seconds += w.seconds;
        }
      }
      for (const [name, t] of totals) {
        figures[`${name}_throughput_${suffix}`] = t.calls / t.seconds;
        if (clients !== 1) {
          const sorted = sortedOf(t.latencies);
          figures[`${name}_p50_us_${suffix}`] = quantile(sorted, 0.5);
          figures[`${name}_p99_us_${suffix}`] = quantile(sorted, 0.99);
        }
      }
    }

    const stream = figures.renderer_stream_p50_us;
    figures.mediated_stream_p50_ratio = stream / figures.echo_stream_p50_us;
    figures.daemon_stream_p50_ratio = figures.daemon_stream_p50_us / figures.echo_stream_p50_us;
    figures.mediated_unary_p50_ratio = figures.renderer_unary_p50_us / figures.echo_unary_p50_us;
    figures.wx_overhead_pct = ((figures.wx_login_p50_us - stream) / stream) * 100;
    figures.wx_invoke_overhead_pct = ((figures.wx_login_invoke_p50_us - stream) / stream) * 100;
    figures[`mediated_stream_throughput_ratio_${options.clients}`] =
      figures[`renderer_stream_throughput_${options.clients}`] / figures[`echo_stream_throughput_${options.clients}`];

    const missed = Object.entries(TARGETS)
      .filter(([key, bound]) => !(figures[key] <= bound))
      .map(([key]) => key);
    const summary: Summary = {
      figures,
      targets: { ...TARGETS },
      targets_met: missed.length === 0,
      targets_missed: missed,
      run: {
        started_at: startedAt,
        node: process.version,
        daemon: options.daemon,
        cpus: os.cpus().length,
        load_average_before: loadBefore,
        load_average_after: os.loadavg(),
        samples: options.samples,
        rounds: options.rounds,
        warmup: options.warmup,
        window_ms: options.windowMs,
        clients: options.clients,
        round_p50_us: roundMedians,
      },
    };
    if (options.out) fs.writeFileSync(options.out, `${JSON.stringify(summary, null, 2)}\n`);
    return summary;
  } finally {
    for (const step of cleanup) {
      try {
        await step();
      } catch (e) {
        log(`cleanup: ${String(e)}`);
      }
    }
  }
}

/** The summary as a table, with the targets. */
export function table(summary: Summary): string {
  const f = summary.figures;
  const c = String(summary.run.clients);
  const num = (v: number | undefined, digits = 0) => (v === undefined || !Number.isFinite(v) ? '-' : v.toFixed(digits));
  const lines = [
    `${'kind'.padEnd(16)} ${'p50 µs'.padStart(8)} ${'p99 µs'.padStart(8)} ${'calls/s 1'.padStart(10)} ${`p50 µs ${c}`.padStart(10)} ${`p99 µs ${c}`.padStart(10)} ${`calls/s ${c}`.padStart(11)}`,
  ];
  for (const k of KINDS) {
    lines.push(
      `${k.padEnd(16)} ${num(f[`${k}_p50_us`]).padStart(8)} ${num(f[`${k}_p99_us`]).padStart(8)} ${num(f[`${k}_throughput_1`]).padStart(10)} ${num(f[`${k}_p50_us_${c}`]).padStart(10)} ${num(f[`${k}_p99_us_${c}`]).padStart(10)} ${num(f[`${k}_throughput_${c}`]).padStart(11)}`,
    );
  }
  lines.push('');
  lines.push(`mediated_stream_p50_ratio ${num(f.mediated_stream_p50_ratio, 2)} (target <= ${TARGETS.mediated_stream_p50_ratio})`);
  lines.push(`wx_overhead_pct           ${num(f.wx_overhead_pct, 1)} (target <= ${TARGETS.wx_overhead_pct}; over the unary Invoke: ${num(f.wx_invoke_overhead_pct, 1)})`);
  lines.push(`daemon_stream_p50_ratio   ${num(f.daemon_stream_p50_ratio, 2)} (one hop, the daemon answering)`);
  lines.push(`mediated_unary_p50_ratio  ${num(f.mediated_unary_p50_ratio, 2)}`);
  lines.push(`targets ${summary.targets_met ? 'met' : `missed: ${summary.targets_missed.join(', ')}`}`);
  return lines.join('\n');
}

function releaseDaemon(): string {
  const targetDir = path.resolve(REPO, process.env.CARGO_TARGET_DIR ?? 'target');
  return path.join(targetDir, 'release', process.platform === 'win32' ? 'miniapp-brokerd.exe' : 'miniapp-brokerd');
}

async function main(argv: string[]): Promise<number> {
  const options: BenchOptions = { ...(argv.includes('--quick') ? QUICK : FULL), daemon: releaseDaemon(), out: SUMMARY_PATH, log: (l) => console.log(l) };
  for (const arg of argv) {
    const [key, value] = arg.split('=', 2);
    if (key === '--quick') continue;
    else if (key === '--daemon' && value) options.daemon = path.resolve(value);
    else if (key === '--out' && value) options.out = path.resolve(value);
    else if (key === '--samples' && value) options.samples = Number(value);
    else if (key === '--window-ms' && value) options.windowMs = Number(value);
    else if (key === '--clients' && value) options.clients = Number(value);
    else {
      console.error(`npm run bench: unknown argument ${arg} (known: --quick, --daemon=PATH, --out=PATH, --samples=N, --window-ms=N, --clients=N)`);
      return 2;
    }
  }
  if (!fs.existsSync(options.daemon)) {
    console.error(`npm run bench: no release daemon at ${options.daemon}`);
    console.error('npm run bench: build it first from the repository root: cargo build --release -p miniapp-brokerd (or pass --daemon=PATH)');
    return 1;
  }
  console.log(`node bench: ${options.daemon}, load average ${os.loadavg().map((l) => l.toFixed(2)).join(' ')}`);
  const summary = await runBench(options);
  console.log(table(summary));
  console.log(`summary: ${options.out}`);
  return 0;
}

if (require.main === module) {
  main(process.argv.slice(2)).then(
    (code) => process.exit(code),
    (e: unknown) => {
      console.error(`npm run bench: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}`);
      process.exit(1);
    },
  );
}
