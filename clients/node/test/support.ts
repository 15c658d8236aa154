/**
 * The test harness: the real `miniapp-brokerd` binary as a child process on a temporary socket,
 * and `within`, which bounds every wait (no sleeps as synchronisation).
 */
import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as net from 'node:net';

const REPO = path.resolve(__dirname, '..', '..', '..', '..');

let binary: string | undefined;

/**
 * The daemon binary: `$MINIAPP_BROKERD_BIN` when set, else built from this repository with
 * `cargo build -p miniapp-brokerd` (a no-op when it is up to date).
 */
export function daemonBinary(): string {
  if (binary) return binary;
  const fromEnv = process.env.MINIAPP_BROKERD_BIN;
  if (fromEnv) {
    if (!fs.existsSync(fromEnv)) throw new Error(`MINIAPP_BROKERD_BIN=${fromEnv} does not exist`);
    return (binary = fromEnv);
  }
  execFileSync('cargo', ['build', '-q', '-p', 'miniapp-brokerd'], { cwd: REPO, stdio: 'inherit' });
  const targetDir = path.resolve(REPO, process.env.CARGO_TARGET_DIR ?? 'target');
  return (binary = path.join(targetDir, 'debug', process.platform === 'win32' ? 'miniapp-brokerd.exe' : 'miniapp-brokerd'));
}

/** Resolves with `promise`, or fails naming `what` after `ms` (default 10 s). */
export async function within<T>(what: string, promise: Promise<T>, ms = 10_000): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** A promise and the function that resolves it, for waiting on an event in a handler. */
export function signal<T = void>(): { promise: Promise<T>; resolve: (value: T) => void } {
  let resolve!: (value: T) => void;
  const promise = new Promise<T>((r) => (resolve = r));
  return { promise, resolve };
}

export function tempDir(prefix = 'miniapp-node-'): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), prefix));
}

export interface DaemonOptions {
  /** The directory for the socket and the data (kept across restarts); default a new temp dir. */
  dir?: string;
  ephemeral?: boolean;
  args?: string[];
}

/** `miniapp-brokerd serve` as a child process. */
export class Daemon {
  readonly socket: string;
  readonly dataDir: string;
  readonly tokenFile: string;
  private stderr = '';
  private exited: Promise<number | null>;

  private constructor(
    readonly dir: string,
    private readonly child: ChildProcess,
  ) {
    this.socket = path.join(dir, 'brokerd.sock');
    this.dataDir = path.join(dir, 'data');
    this.tokenFile = path.join(this.dataDir, 'host.token');
    this.exited = new Promise((resolve) => child.on('exit', (code) => resolve(code)));
  }

  static async start(options: DaemonOptions = {}): Promise<Daemon> {
    const dir = options.dir ?? tempDir();
    const env: NodeJS.ProcessEnv = { ...process.env, XDG_CONFIG_HOME: path.join(dir, 'config'), RUST_LOG: 'warn' };
    delete env.MINIAPP_BROKERD_CONFIG;
    const args = ['serve', '--socket', path.join(dir, 'brokerd.sock'), '--data-dir', path.join(dir, 'data')];
    if (options.ephemeral !== false) args.push('--ephemeral');
    const child = spawn(daemonBinary(), [...args, ...(options.args ?? [])], { env, stdio: ['ignore', 'ignore', 'pipe'] });
    const daemon = new Daemon(dir, child);
    const ready = new Promise<void>((resolve, reject) => {
      child.stderr!.setEncoding('utf8');
      child.stderr!.on('data', (chunk: string) => {
        daemon.stderr += chunk;
        if (daemon.stderr.includes('listening on')) resolve();
      });
      child.on('exit', (code) => reject(new Error(`the daemon exited (${code}) before listening:\n${daemon.stderr}`)));
      child.on('error', reject);
    });
    await within('the daemon to listen', ready);
    return daemon;
  }

  /** Stops the daemon (SIGTERM: graceful; SIGKILL: a crash) and waits for it to exit. */
  async stop(sig: NodeJS.Signals = 'SIGTERM'): Promise<void> {
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill(sig);
    await within('the daemon to exit', this.exited);
  }

  /** Stops the daemon and removes its directory. */
  async dispose(): Promise<void> {
    await this.stop();
    fs.rmSync(this.dir, { recursive: true, force: true });
  }

  get log(): string {
    return this.stderr;
  }
}

/**
 * A Unix-socket proxy between a client and the daemon, standing in for a connection that breaks:
 * it can refuse connections, swallow what the daemon sends (while telling which HTTP/2 frames it
 * swallowed), and cut every connection.
 */
export class SocketProxy {
  readonly path: string;
  private readonly server: net.Server;
  private readonly pairs = new Set<{ client: net.Socket; upstream: net.Socket }>();
  /** Connections to refuse (closed at once) before forwarding again. */
  refuse = 0;
  refused = 0;
  /** While set, bytes from the daemon are dropped; the hook hears the type of each dropped frame. */
  swallow: ((frameType: number) => void) | undefined;
  /** While set, hears the type of each frame from the daemon that is passed on. */
  observe: ((frameType: number) => void) | undefined;

  constructor(
    private readonly upstream: string,
    dir: string,
  ) {
    this.path = path.join(dir, 'proxy.sock');
    this.server = net.createServer((client) => {
      if (this.refused < this.refuse) {
        this.refused++;
        client.destroy();
        return;
      }
      const upstream = net.connect(this.upstream);
      const pair = { client, upstream };
      this.pairs.add(pair);
      let pending = Buffer.alloc(0);
      upstream.on('data', (chunk: Buffer) => {
        // Split the daemon's bytes into HTTP/2 frames (9-byte header: length, type, flags, stream).
        pending = Buffer.concat([pending, chunk]);
        while (pending.length >= 9) {
          const length = pending.readUIntBE(0, 3);
          if (pending.length < 9 + length) break;
          const frame = pending.subarray(0, 9 + length);
          pending = pending.subarray(9 + length);
          if (this.swallow) this.swallow(frame[3]);
          else {
            this.observe?.(frame[3]);
            client.write(frame);
          }
        }
      });
      client.on('data', (chunk: Buffer) => upstream.write(chunk));
      const end = () => {
        this.pairs.delete(pair);
        client.destroy();
        upstream.destroy();
      };
      client.on('close', end);
      upstream.on('close', end);
      client.on('error', end);
      upstream.on('error', end);
    });
  }

  listen(): Promise<void> {
    return new Promise((resolve) => this.server.listen(this.path, resolve));
  }

  /** Breaks every open connection, as a network blip would. */
  cut(): void {
    for (const { client, upstream } of this.pairs) {
      client.destroy();
      upstream.destroy();
    }
    this.pairs.clear();
  }

  close(): Promise<void> {
    this.cut();
    return new Promise((resolve) => this.server.close(() => resolve()));
  }
}

/** What `promise` rejects with; fails the test if it resolves. */
export function rejection<T = import('../src/wx').WxResult>(promise: Promise<unknown>): Promise<T> {
  return promise.then(
    (value) => {
      throw new Error(`expected a rejection, got ${JSON.stringify(value)}`);
    },
    (e: T) => e,
  );
}

/** Runs `attempt` (a round trip to the daemon) again until it yields a value, for up to `ms`. */
export async function until<T>(what: string, attempt: () => Promise<T | undefined>, ms = 10_000): Promise<T> {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await attempt();
    if (value !== undefined) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms: ${what}`);
  }
}
