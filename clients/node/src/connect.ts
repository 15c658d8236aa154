/**
 * Reaching the daemon: the gRPC target for a socket path or pipe name, the channel options every
 * client uses, and the backoff the reconnecting clients share (as client/src/connect.rs).
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as grpc from '@grpc/grpc-js';

/**
 * The daemon's default address, as the daemon computes it: `$XDG_RUNTIME_DIR/miniapp-broker/brokerd.sock`
 * (a per-user temp directory without a runtime dir) on Unix, the pipe `miniapp-brokerd` on Windows.
 */
export function defaultAddress(): string {
  if (process.platform === 'win32') return 'miniapp-brokerd';
  const runtime = process.env.XDG_RUNTIME_DIR;
  const base =
    runtime && path.isAbsolute(runtime) ? runtime : path.join(os.tmpdir(), `miniapp-broker-${process.getuid?.() ?? 0}`);
  return path.join(base, 'miniapp-broker', 'brokerd.sock');
}

/**
 * The grpc-js target for `address`: a socket path (Unix), a pipe name or `\\.\pipe\...` path
 * (Windows), or an explicit `unix:` target.
 */
export function target(address: string): string {
  if (address.startsWith('unix:')) return address;
  if (process.platform === 'win32' && !address.startsWith('\\\\')) return `unix:\\\\.\\pipe\\${address}`;
  return `unix:${address}`;
}

/**
 * Channel options: a plain `:authority` (grpc-core clients need it, grpc-js does no harm with it),
 * a reconnect backoff as short as the clients' own (the default starts at 1 s and grows to 120 s,
 * far too slow for a local daemon that restarts), and the daemon's message size limit.
 */
export const CHANNEL_OPTIONS: grpc.ChannelOptions = {
  'grpc.default_authority': 'localhost',
  'grpc.initial_reconnect_backoff_ms': 50,
  'grpc.min_reconnect_backoff_ms': 20,
  'grpc.max_reconnect_backoff_ms': 2000,
  'grpc.max_receive_message_length': 16 << 20,
};

export const CREDENTIALS = grpc.credentials.createInsecure();

/** Exponential backoff with jitter: 20 ms doubling to 2 s, as the Rust client's. */
export class Backoff {
  private next = 20;
  constructor(private readonly max = 2000) {}

  /** Waits the current delay (plus up to 50% jitter), then doubles it; ends early on `signal`. */
  async wait(signal?: AbortSignal): Promise<void> {
    const delay = this.next * (1 + Math.random() * 0.5);
    this.next = Math.min(this.next * 2, this.max);
    await new Promise<void>((resolve) => {
      const timer = setTimeout(done, delay);
      function done() {
        clearTimeout(timer);
        signal?.removeEventListener('abort', done);
        resolve();
      }
      signal?.addEventListener('abort', done, { once: true });
    });
  }

  reset(): void {
    this.next = 20;
  }
}

/** Waits until `client`'s channel is connected, or fails after `timeoutMs`. */
export function waitForReady(client: grpc.Client, timeoutMs: number): Promise<void> {
  return new Promise((resolve, reject) =>
    client.waitForReady(Date.now() + timeoutMs, (err) => (err ? reject(err) : resolve())),
  );
}

/**
 * The server at an address runs as another user than this process: nothing was sent to it (the
 * Rust client's `ForeignServer`, same words). A squatter on the daemon's address never gets a
 * host token or a launch token.
 */
export class ForeignServerError extends Error {
  constructor(
    readonly address: string,
    readonly serverUid: number,
    readonly ownUid: number,
  ) {
    super(`the server at ${address} runs as uid ${serverUid}, not as this user (uid ${ownUid}); refusing to send it anything`);
    this.name = 'ForeignServerError';
  }
}

/**
 * Unix: throws `ForeignServerError` unless the socket at `address` belongs to this process's
 * effective uid. Node cannot read a Unix socket peer's credentials (no SO_PEERCRED in `net`), so
 * this checks the socket file instead: its owner is the uid of the process that bound it, and no
 * other (non-root) user can make one owned by this user. (The Rust client checks the connected
 * peer itself; here a squatter would have to replace the file between this check and grpc-js's
 * connect, which needs write access to the daemon's private socket directory.) No socket there
 * yet: nothing to check, the connection will fail. Windows: nothing to check (docs/windows.md).
 */
export function checkServerOwner(address: string): void {
  if (process.platform === 'win32' || !process.geteuid) return;
  const file = address.startsWith('unix:') ? address.slice('unix:'.length) : address;
  let owner: number;
  try {
    owner = fs.statSync(file).uid;
  } catch {
    return;
  }
  const own = process.geteuid();
  if (owner !== own) throw new ForeignServerError(address, owner, own);
}
