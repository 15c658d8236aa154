/**
 * The host side: the superapp shell that implements the delegate methods, pushes the signed-in
 * user and launches app instances, as client/src/host.rs does. After a daemon restart it connects
 * again with backoff and launches its apps again (their launch tokens change: listen for
 * `relaunched`).
 */
import { EventEmitter } from 'node:events';
import * as fs from 'node:fs';
import * as grpc from '@grpc/grpc-js';
import { OPEN_APIS, OPEN_API_NAMES, type DelegatedApiName, type OpenApiName, type ReceivedRequestOf, type ResponseOf } from './apis';
import { Backoff, CHANNEL_OPTIONS, CREDENTIALS, checkServerOwner, defaultAddress, ForeignServerError, target } from './connect';
import { HostError, UserCancelled } from './failure';
import type { AdminClient } from './generated/miniapp/broker/v1/Admin';
import type { AppInfo__Output } from './generated/miniapp/broker/v1/AppInfo';
import type { CloseAppResponse__Output } from './generated/miniapp/broker/v1/CloseAppResponse';
import type { DaemonMessage__Output } from './generated/miniapp/broker/v1/DaemonMessage';
import type { DelegateCall__Output } from './generated/miniapp/broker/v1/DelegateCall';
import type { DelegateMethod } from './generated/miniapp/broker/v1/DelegateMethod';
import type { DelegateResult } from './generated/miniapp/broker/v1/DelegateResult';
import type { GetAuthCodeRequest__Output } from './generated/miniapp/broker/v1/GetAuthCodeRequest';
import type { GetAuthCodeResponse } from './generated/miniapp/broker/v1/GetAuthCodeResponse';
import type { HostClient as GrpcHostClient } from './generated/miniapp/broker/v1/Host';
import type { HostMessage } from './generated/miniapp/broker/v1/HostMessage';
import type { LaunchAppResponse__Output } from './generated/miniapp/broker/v1/LaunchAppResponse';
import type { RegisterAppResponse__Output } from './generated/miniapp/broker/v1/RegisterAppResponse';
import type { SetDecision } from './generated/miniapp/broker/v1/SetDecision';
import type { SignedInUser } from './generated/miniapp/broker/v1/SignedInUser';
import type { StatusResponse__Output } from './generated/miniapp/broker/v1/StatusResponse';
import type { Welcome__Output } from './generated/miniapp/broker/v1/Welcome';
import { v1 } from './proto';

/** What a handler learns about the call besides its request. */
export interface CallContext {
  /** The app instance the call is made for. */
  app: AppInfo__Output;
  /** Fires when the daemon sends CancelCall (the renderer went away or gave up, the deadline
   * passed) or the host link ends; an answer after that is dropped. */
  signal: AbortSignal;
  /** How long the daemon waits for the answer. */
  deadlineMs: number;
}

/** A delegate handler: resolve with the result, or throw `HostError` / `UserCancelled`. */
export type ApiHandler<N extends OpenApiName> = (
  request: ReceivedRequestOf<N>,
  ctx: CallContext,
) => ResponseOf<N> | Promise<ResponseOf<N>>;

export type HostHandlers = { [N in DelegatedApiName]?: ApiHandler<N> } & {
  /** v3 "mutual trust": asked before a default implementation runs. */
  getAuthCode?: (request: GetAuthCodeRequest__Output, ctx: CallContext) => GetAuthCodeResponse | Promise<GetAuthCodeResponse>;
  /** The version ("v1", "v2", "v3") an app instance uses when its app.json sets none. */
  openApiVersion?: (ctx: CallContext) => string | Promise<string>;
};

export interface HostOptions {
  /** Socket path (pipe name on Windows); default: the daemon's default address. */
  address?: string;
  /** The daemon's `host.token` file; read again at every (re)connect. */
  tokenFile?: string;
  /** The token itself, instead of `tokenFile`. */
  token?: string;
  name?: string;
  /** The user signed in when the host connects (the seed's getAppUID). */
  user?: SignedInUser;
  handlers?: HostHandlers;
  /** Connect again after the daemon ends the link (it restarted), and launch the apps again. Default true. */
  reconnect?: boolean;
  /** How long the first connect keeps trying while the daemon is not up yet. Default 10 s. */
  connectTimeoutMs?: number;
}

/** Emitted after a reconnect for each app launched again. */
export interface Relaunched {
  appId: string;
  /** The instance id before the daemon restarted. */
  previousInstanceId: string;
  launched: LaunchAppResponse__Output;
}

/** Why connecting failed, and whether trying again may help. */
export class HostConnectError extends Error {
  constructor(
    message: string,
    readonly code: grpc.status,
  ) {
    super(message);
    this.name = 'HostConnectError';
  }
  get retryable(): boolean {
    return [grpc.status.UNAVAILABLE, grpc.status.ALREADY_EXISTS, grpc.status.DEADLINE_EXCEEDED].includes(this.code);
  }
}

const CLIENT_DOMAIN = 'miniapp-broker-client';

type Link = grpc.ClientDuplexStream<HostMessage, DaemonMessage__Output>;

/**
 * A connected host. Events: `connected` (Welcome), `disconnected` (reason), `relaunched`
 * (`Relaunched`), `reconnectFailed` (Error; it keeps trying), `consent` (ConsentChanged: a user's
 * decision changed), `notice` (ProtocolNotice: the daemon refused something the host sent).
 */
export class HostClient extends EventEmitter {
  private readonly grpc: GrpcHostClient;
  private readonly admin: AdminClient;
  private readonly handlers: HostHandlers;
  private link: Link | undefined;
  private running = new Map<number, RunningCall>();
  /** Launched apps by instance id, to launch again after a reconnect. */
  private apps = new Map<string, { appId: string; appJson: string }>();
  private user: SignedInUser | undefined;
  private closedByUser = false;
  private readonly closing = new AbortController();
  private token = '';
  welcome: Welcome__Output | undefined;

  private constructor(private readonly options: HostOptions) {
    super();
    this.grpc = new v1.Host(target(options.address ?? defaultAddress()), CREDENTIALS, CHANNEL_OPTIONS) as unknown as GrpcHostClient;
    this.admin = new v1.Admin('unused', CREDENTIALS, { channelOverride: this.grpc.getChannel() }) as unknown as AdminClient;
    this.handlers = options.handlers ?? {};
    this.user = options.user;
  }

  /** Connects, says Hello, and waits for Welcome, retrying with backoff while the daemon is not
   * up (or still holds the previous host's slot) for up to `connectTimeoutMs`. */
  static async connect(options: HostOptions): Promise<HostClient> {
    const host = new HostClient(options);
    const deadline = Date.now() + (options.connectTimeoutMs ?? 10_000);
    const backoff = new Backoff();
    for (;;) {
      try {
        await host.open();
        return host;
      } catch (e) {
        if (!(e instanceof HostConnectError && e.retryable) || Date.now() >= deadline) {
          host.shutdown();
          throw e;
        }
        await backoff.wait();
      }
    }
  }

  /** Whether the host link is open. */
  get connected(): boolean {
    return this.link !== undefined;
  }

  private readToken(): string {
    if (this.options.token !== undefined) return this.options.token.trim();
    if (!this.options.tokenFile) throw new HostConnectError('give HostOptions.token or tokenFile', grpc.status.INVALID_ARGUMENT);
    return fs.readFileSync(this.options.tokenFile, 'utf8').trim();
  }

  /** The host token's metadata, once the daemon's address is known to be this user's
   * (`checkServerOwner`): every send of the token goes through here. */
  private metadata(): grpc.Metadata {
    checkServerOwner(this.address);
    const md = new grpc.Metadata();
    md.set('authorization', `Bearer ${this.token}`);
    return md;
  }

  private methods(): DelegateMethod[] {
    const methods: DelegateMethod[] = [];
    for (const name of OPEN_API_NAMES) {
      const method = OPEN_APIS[name];
      if (method && this.handlers[name as DelegatedApiName]) methods.push(method);
    }
    if (this.handlers.getAuthCode) methods.push('GET_AUTH_CODE');
    if (this.handlers.openApiVersion) methods.push('OPEN_API_VERSION');
    return methods;
  }

  /** Opens the host link and resolves on Welcome. */
  private open(): Promise<void> {
    let md: grpc.Metadata;
    try {
      this.token = this.readToken();
      md = this.metadata();
    } catch (e) {
      if (e instanceof ForeignServerError) return Promise.reject(new HostConnectError(e.message, grpc.status.PERMISSION_DENIED));
      return Promise.reject(e instanceof HostConnectError ? e : new HostConnectError(String(e), grpc.status.UNAVAILABLE));
    }
    const link = this.grpc.Connect(md);
    link.write({ hello: { methods: this.methods(), hostName: this.options.name ?? 'host', user: this.user } });
    return new Promise((resolve, reject) => {
      let welcomed = false;
      link.on('data', (message: DaemonMessage__Output) => {
        if (!welcomed) {
          if (message.msg !== 'welcome' || !message.welcome) {
            link.cancel();
            return reject(new HostConnectError("the daemon's first message was not Welcome", grpc.status.INTERNAL));
          }
          welcomed = true;
          this.welcome = message.welcome;
          this.link = link;
          this.emit('connected', message.welcome);
          return resolve();
        }
        this.onMessage(link, message);
      });
      link.on('error', () => {});
      link.on('status', (status: grpc.StatusObject) => {
        if (!welcomed) return reject(new HostConnectError(`the daemon refused: ${status.details}`, status.code));
        this.onClosed(link, status.details || 'the daemon closed the host link');
      });
    });
  }

  private onMessage(link: Link, message: DaemonMessage__Output): void {
    if (message.msg === 'call' && message.call) this.onCall(link, message.call);
    else if (message.msg === 'cancel' && message.cancel) {
      const controller = this.running.get(Number(message.cancel.callId));
      this.running.delete(Number(message.cancel.callId));
      controller?.abort(new Error(`cancelled by the daemon: ${message.cancel.reason}`));
    } else if (message.msg === 'notice' && message.notice) {
      this.emit('notice', message.notice);
    } else if (message.msg === 'consent' && message.consent) {
      this.emit('consent', message.consent);
    }
  }

  private onCall(link: Link, call: DelegateCall__Output): void {
    const callId = Number(call.callId);
    const controller = new RunningCall(call.app ?? { appId: '', instanceId: '', apiVersion: '' }, call.deadlineMs);
    const ctx: CallContext = controller;
    let run: (() => Promise<DelegateResult>) | undefined;
    if (call.request === 'api' && call.api?.api && call.api.api in OPEN_APIS) {
      const api = call.api.api as OpenApiName;
      const handler = OPEN_APIS[api] ? (this.handlers[api as DelegatedApiName] as ApiHandler<OpenApiName> | undefined) : undefined;
      const request = call.api[api] as ReceivedRequestOf<OpenApiName>;
      if (handler) run = async () => ({ callId, api: { [api]: await handler(request, ctx) } });
    } else if (call.request === 'getAuthCode' && call.getAuthCode) {
      const handler = this.handlers.getAuthCode;
      const request = call.getAuthCode;
      if (handler) run = async () => ({ callId, getAuthCode: await handler(request, ctx) });
    } else if (call.request === 'openApiVersion') {
      const handler = this.handlers.openApiVersion;
      if (handler) run = async () => ({ callId, openApiVersion: { version: await handler(ctx) } });
    }
    if (!run) {
      link.write({ result: { callId, error: { domain: CLIENT_DOMAIN, code: -1, message: 'not implemented by this host' } } });
      return;
    }
    this.running.set(callId, controller);
    run()
      .catch((e: unknown) => failureResult(callId, e))
      .then((result) => {
        // After CancelCall (or the link's end) the daemon drops an answer: send none.
        if (controller.aborted || this.link !== link) return;
        this.running.delete(callId);
        link.write({ result });
      });
  }

  private onClosed(link: Link, reason: string): void {
    if (this.link !== link) return;
    this.link = undefined;
    const running = [...this.running.values()];
    this.running.clear();
    for (const c of running) c.abort(new Error(`the host link ended: ${reason}`));
    this.emit('disconnected', reason);
    if (!this.closedByUser && this.options.reconnect !== false) void this.reconnect();
  }

  /** Connects again until it succeeds or `close` is called, then launches the apps again. */
  private async reconnect(): Promise<void> {
    const backoff = new Backoff();
    while (!this.closedByUser) {
      await backoff.wait(this.closing.signal);
      if (this.closedByUser) return;
      try {
        await this.open();
      } catch (e) {
        this.emit('reconnectFailed', e);
        continue;
      }
      const apps = [...this.apps.entries()];
      this.apps.clear();
      for (const [previousInstanceId, { appId, appJson }] of apps) {
        try {
          const launched = await this.launchApp(appId, appJson);
          this.emit('relaunched', { appId, previousInstanceId, launched } satisfies Relaunched);
        } catch (e) {
          this.emit('reconnectFailed', e);
        }
      }
      return;
    }
  }

  private unary<Res>(send: (md: grpc.Metadata, done: grpc.requestCallback<Res>) => void): Promise<Res> {
    return new Promise((resolve, reject) =>
      send(this.metadata(), (err, res) => (err || !res ? reject(err ?? new Error('no answer')) : resolve(res))),
    );
  }

  private get address(): string {
    return this.options.address ?? defaultAddress();
  }

  /** Launches an app instance; hand `launchToken` to the renderer process you start. */
  async launchApp(appId: string, appJson = '{}'): Promise<LaunchAppResponse__Output> {
    const launched = await this.unary<LaunchAppResponse__Output>((md, done) =>
      this.grpc.LaunchApp({ appId, appJson }, md, done),
    );
    this.apps.set(launched.instanceId, { appId, appJson });
    return launched;
  }

  /** Closes an app instance: its token stops working, its pending calls fail. */
  async closeApp(instanceId: string): Promise<CloseAppResponse__Output> {
    this.apps.delete(instanceId);
    return this.unary<CloseAppResponse__Output>((md, done) => this.grpc.CloseApp({ instanceId }, md, done));
  }

  /** Pushes the signed-in user (an empty uid signs out); kept for the next reconnect's Hello. */
  setUser(user: SignedInUser): void {
    this.user = user;
    this.link?.write({ user });
  }

  /**
   * Sets one scope's decision for a user of an app, as the host's own settings UI would (an empty
   * `uid`: the signed-in user; `DECISION_UNDECIDED` with an empty scope: every scope). The daemon
   * answers with a `consent` event, or a `notice` if it refuses (unknown app or scope).
   */
  setDecision(decision: SetDecision): void {
    this.link?.write({ decision });
  }

  /** The daemon's status (Admin.Status). */
  status(): Promise<StatusResponse__Output> {
    return this.unary<StatusResponse__Output>((md, done) => this.admin.Status({}, md, done));
  }

  /** Registers an app's backend secret for the Exchange service (returned once). */
  registerApp(appId: string, rotate = false): Promise<RegisterAppResponse__Output> {
    return this.unary<RegisterAppResponse__Output>((md, done) => this.admin.RegisterApp({ appId, rotate }, md, done));
  }

  /** Ends the host link for good (no reconnect) and closes the connection. */
  close(): void {
    this.closedByUser = true;
    this.closing.abort();
    const link = this.link;
    if (link) {
      this.onClosed(link, 'closed by the host');
      link.cancel();
    }
    this.shutdown();
  }

  private shutdown(): void {
    this.closedByUser = true;
    this.grpc.close();
  }
}

/**
 * A delegate call in the handler's hands: its context, and its cancellation. The `AbortSignal` is
 * made when the handler first reads `ctx.signal` (Node makes an AbortController slowly, a large
 * part of a call that a handler answers at once), already aborted if the cancel came first.
 * (Exported for its test.)
 */
export class RunningCall implements CallContext {
  private controller: AbortController | undefined;
  private reason: unknown;
  aborted = false;

  constructor(
    readonly app: AppInfo__Output,
    readonly deadlineMs: number,
  ) {}

  get signal(): AbortSignal {
    if (!this.controller) {
      this.controller = new AbortController();
      if (this.aborted) this.controller.abort(this.reason);
    }
    return this.controller.signal;
  }

  abort(reason: unknown): void {
    if (this.aborted) return;
    this.aborted = true;
    this.reason = reason;
    this.controller?.abort(reason);
  }
}

/** The answer for a handler that threw. */
function failureResult(callId: number, e: unknown): DelegateResult {
  if (e instanceof UserCancelled) return { callId, cancelled: { message: e.message } };
  if (e instanceof HostError) return { callId, error: { domain: e.domain, code: e.code, message: e.message } };
  // Anything else is a bug in the handler; its message may hold personal data, so it stays here.
  return { callId, error: { domain: CLIENT_DOMAIN, code: -1, message: 'the host handler failed' } };
}
