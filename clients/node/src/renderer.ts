/**
 * The renderer side: a mini app process calling the open APIs of its own app instance, as
 * client/src/renderer.rs does. Calls are multiplexed on one `OpenApi.Session` stream; `invoke` is
 * the JSON bridge, on the same stream whenever its params map to a typed request exactly (else
 * through `OpenApi.Invoke`). Both retry with backoff while the daemon is unreachable, and a payment keeps
 * one idempotency key across those retries, so it never reaches the host twice.
 */
import { randomBytes } from 'node:crypto';
import * as grpc from '@grpc/grpc-js';
import { isOpenApi, PAYMENT_APIS, type OpenApiName, type ReceivedResponseOf, type RequestOf } from './apis';
import { Backoff, CHANNEL_OPTIONS, CREDENTIALS, checkServerOwner, target, waitForReady } from './connect';
import { failureObject, requestFromParams, successObject } from './bridge';
import { ApiError, isTransportCode, TRANSPORT_REASON, transportError } from './failure';
import type { ApiRequest } from './generated/miniapp/broker/v1/ApiRequest';
import type { ApiResponse__Output } from './generated/miniapp/broker/v1/ApiResponse';
import type { InvokeResponse__Output } from './generated/miniapp/broker/v1/InvokeResponse';
import type { OpenApiClient } from './generated/miniapp/broker/v1/OpenApi';
import type { RendererCall } from './generated/miniapp/broker/v1/RendererCall';
import type { RendererReply__Output } from './generated/miniapp/broker/v1/RendererReply';
import { v1 } from './proto';
import type { WxInvokeResult, WxResult } from './wx';

/** The metadata entry carrying the launch token. */
export const LAUNCH_TOKEN_HEADER = 'x-launch-token';

export interface RendererOptions {
  /** How long a call keeps retrying while the daemon is unreachable (it restarts, say). Default 10 s. */
  reconnectBudgetMs?: number;
}

/** What `invoke` returns: `ok` picks the callback (`success` or `fail`), `result` is its argument. */
export type InvokeResult = WxInvokeResult;

/** A call waiting on the stream: it gets the daemon's reply (an answer or the daemon's failure), or
 * an `ApiError` the client made (the stream ended, the renderer closed). */
type Waiter = { api: string; resolve: (r: RendererReply__Output) => void; reject: (e: ApiError) => void };

/** One open `OpenApi.Session` stream and the calls waiting on it. */
class Mux {
  readonly pending = new Map<number, Waiter>();
  alive = true;
  constructor(readonly call: grpc.ClientDuplexStream<RendererCall, RendererReply__Output>) {}

  /** Marks the stream dead and fails every waiting call with what `failure` makes of its API. */
  fail(failure: (api: string) => ApiError): void {
    this.alive = false;
    const waiting = [...this.pending.values()];
    this.pending.clear();
    for (const w of waiting) w.reject(failure(w.api));
  }
}

/** A fresh idempotency key for a payment, as the client library makes one per logical payment. */
export function newPaymentKey(): string {
  return randomBytes(16).toString('hex');
}

/** A connection to the daemon for one app instance. */
export class RendererClient {
  private readonly client: OpenApiClient;
  private token: string;
  private mux: Mux | undefined;
  private nextId = 1;
  private closed = false;
  private readonly budgetMs: number;
  /** Aborted by `close`, to end retry waits at once. */
  private readonly closing = new AbortController();

  /** A client for the daemon at `address` (socket path, or pipe name on Windows) that connects on
   * first use, so it can be made before the daemon is up. */
  constructor(
    private readonly address: string,
    launchToken: string,
    options: RendererOptions = {},
  ) {
    this.client = new v1.OpenApi(target(address), CREDENTIALS, CHANNEL_OPTIONS) as unknown as OpenApiClient;
    this.token = launchToken;
    this.budgetMs = options.reconnectBudgetMs ?? 10_000;
  }

  /** Connects now: fails if no daemon answers at `address` within `timeoutMs` (default 5 s). The
   * token is checked on the first call. */
  static async connect(
    address: string,
    launchToken: string,
    options: RendererOptions & { timeoutMs?: number } = {},
  ): Promise<RendererClient> {
    const renderer = new RendererClient(address, launchToken, options);
    try {
      await waitForReady(renderer.client, options.timeoutMs ?? 5000);
    } catch (e) {
      renderer.close();
      throw e;
    }
    return renderer;
  }

  /**
   * Replaces the launch token, for when the host launched this app again (after a daemon restart
   * the old token is gone). The current stream ends; the next call opens one with the new token.
   */
  setLaunchToken(launchToken: string): void {
    this.token = launchToken;
    const mux = this.mux;
    this.mux = undefined;
    if (mux) {
      mux.fail((api) => transportError(api, grpc.status.UNAVAILABLE, 'the launch token changed'));
      mux.call.cancel();
    }
  }

  /** The launch token's metadata, once the daemon's address is known to be this user's
   * (`checkServerOwner`; throws `ForeignServerError` otherwise): every stream and `Invoke` that
   * carries the token gets it here. */
  private metadata(): grpc.Metadata {
    checkServerOwner(this.address);
    const md = new grpc.Metadata();
    md.set(LAUNCH_TOKEN_HEADER, this.token);
    return md;
  }

  /**
   * Calls an open API over the multiplexed stream, the default way, e.g.
   * `await renderer.call('login', {})` → `{errMsg: "login:ok", code: "..."}`. Fails with an
   * `ApiError`. A payment without an idempotency key gets one here, kept across this call's own
   * reconnect retries.
   */
  async call<N extends OpenApiName>(api: N, request: RequestOf<N> = {} as RequestOf<N>): Promise<ReceivedResponseOf<N>> {
    const response = await this.callRequest({ [api]: request } as ApiRequest);
    const arm = response[api];
    if (!arm) throw transportError(api, grpc.status.INTERNAL, 'answer of the wrong type');
    return arm as ReceivedResponseOf<N>;
  }

  /** Calls with an already built `ApiRequest` (one arm set) over the stream. */
  async callRequest(request: ApiRequest): Promise<ApiResponse__Output> {
    const api = Object.keys(request).find(isOpenApi);
    if (!api) throw new ApiError({ errMsg: 'unknown:fail the request names no API', errno: 1001, grpcCode: grpc.status.INVALID_ARGUMENT, reason: 'invalid_params', hostError: null });
    const keyed = withPaymentKey(api, request);
    const reply = await this.retrying(api, () => this.streamCall(api, keyed));
    if (reply.outcome === 'ok' && reply.ok) return reply.ok;
    if (reply.outcome === 'failure' && reply.failure) throw new ApiError(reply.failure);
    throw transportError(api, grpc.status.INTERNAL, 'empty reply');
  }

  /** Runs `attempt` again with backoff while it fails for want of the daemon, within the budget. */
  private async retrying<T>(api: string, attempt: () => Promise<T>): Promise<T> {
    const deadline = Date.now() + this.budgetMs;
    const backoff = new Backoff();
    for (;;) {
      try {
        return await attempt();
      } catch (e) {
        const retry = e instanceof ApiError && e.reason === TRANSPORT_REASON && !this.closed && Date.now() < deadline;
        if (!retry) throw e;
        await backoff.wait(this.closing.signal);
        if (this.closed) throw cancelledError(api);
      }
    }
  }

  private streamCall(api: string, request: ApiRequest): Promise<RendererReply__Output> {
    if (this.closed) return Promise.reject(cancelledError(api));
    const mux = this.openMux();
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      mux.pending.set(id, { api, resolve, reject });
      mux.call.write({ id, request });
    });
  }

  /** The open stream, opening one if there is none (or the last one died). */
  private openMux(): Mux {
    if (this.mux?.alive) return this.mux;
    const call = this.client.Session(this.metadata());
    const mux = new Mux(call);
    this.mux = mux;
    call.on('data', (reply: RendererReply__Output) => {
      const waiter = mux.pending.get(Number(reply.id));
      if (!waiter) return;
      mux.pending.delete(Number(reply.id));
      waiter.resolve(reply);
    });
    // 'status' comes exactly once, whichever way the stream ends; 'error' repeats it for non-OK.
    call.on('error', () => {});
    call.on('status', (status: grpc.StatusObject) =>
      mux.fail((api) =>
        status.code === grpc.status.OK
          ? transportError(api, grpc.status.UNAVAILABLE, 'stream closed by the daemon')
          : streamEndFailure(api, status.code, status.details),
      ),
    );
    return mux;
  }

  /**
   * The JSON bridge: calls `api` ("login", "requestPayment", ...) with the params object a mini
   * program passed (functions in it are dropped) and returns the object for its `success`
   * callback (`ok`) or its `fail` callback, exactly as the daemon's `OpenApi.Invoke` shapes it.
   * Never throws. A payment without an `idempotencyKey` gets one, kept across retries.
   *
   * The call goes on the Session stream, with the object made here as the daemon's bridge makes
   * it (./bridge), when the params map to a typed request exactly; otherwise (a value of the wrong
   * type, an unknown API, nested values) through `Invoke`, so the daemon words the refusal.
   */
  async invoke(api: string, params: Record<string, unknown> = {}): Promise<InvokeResult> {
    const clean: Record<string, unknown> = {};
    for (const [k, v] of Object.entries(params ?? {})) if (typeof v !== 'function') clean[k] = v;
    if (PAYMENT_APIS.includes(api) && !clean.idempotencyKey) clean.idempotencyKey = newPaymentKey();
    try {
      const request = requestFromParams(api, clean);
      if (request) {
        const reply = await this.retrying(api, () => this.streamCall(api, request));
        const answer = reply.outcome === 'ok' && reply.ok ? successObject(api, reply.ok) : undefined;
        if (answer) return { ok: true, result: answer };
        if (reply.outcome === 'failure' && reply.failure) return { ok: false, result: failureObject(reply.failure) };
        throw transportError(api, grpc.status.INTERNAL, reply.ok ? 'answer of the wrong type' : 'empty reply');
      }
      const paramsJson = JSON.stringify(clean);
      const response = await this.retrying(api, () => this.invokeOnce(api, paramsJson));
      return { ok: response.ok, result: JSON.parse(response.resultJson) as WxResult };
    } catch (e) {
      const message = e instanceof ApiError ? e.errMsg : `${api}:fail ${e instanceof Error ? e.message : String(e)}`;
      return { ok: false, result: { errMsg: message, errno: e instanceof ApiError ? bridgeErrno(e) : 1005 } };
    }
  }

  private invokeOnce(api: string, paramsJson: string): Promise<InvokeResponse__Output> {
    if (this.closed) return Promise.reject(cancelledError(api));
    return new Promise((resolve, reject) => {
      this.client.Invoke({ api, paramsJson }, this.metadata(), (err, response) => {
        if (!err && response) return resolve(response);
        const code = err?.code ?? grpc.status.UNKNOWN;
        const details = err?.details ?? 'no answer';
        reject(
          isTransportCode(code)
            ? transportError(api, code, details)
            : new ApiError({ errMsg: `${api}:fail ${details}`, errno: 1005, grpcCode: code, reason: grpc.status[code] ?? 'unknown', hostError: null }),
        );
      });
    });
  }

  /** Closes the stream and the connection: pending calls fail, the daemon cancels them on the host. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.closing.abort();
    const mux = this.mux;
    this.mux = undefined;
    if (mux) {
      mux.fail(cancelledError);
      mux.call.cancel();
    }
    this.client.close();
  }
}

/**
 * The errno of a failure the client made, in the object `invoke` answers. A call the daemon
 * refused with a status (a bad or closed launch token) has no object from the daemon; on either
 * route it gets 1005, as a refused `Invoke` always did (and as the Rust client's `invoke_json`).
 */
function bridgeErrno(e: ApiError): number {
  return e.reason === 'unauthenticated' ? 1005 : e.errno;
}

function cancelledError(api: string): ApiError {
  return new ApiError({ errMsg: `${api}:fail call cancelled: the renderer closed its stream`, errno: 1007, grpcCode: grpc.status.CANCELLED, reason: 'cancelled', hostError: null });
}

/** How the stream's end fails the calls still waiting on it (as read_replies in the Rust client). */
function streamEndFailure(api: string, code: grpc.status, details: string): ApiError {
  switch (code) {
    // The app instance was closed or its token is bad: final, not worth a retry.
    case grpc.status.UNAUTHENTICATED:
      return new ApiError({ errMsg: `${api}:fail ${details}`, errno: 1007, grpcCode: code, reason: 'unauthenticated', hostError: null });
    // The daemon refused what this stream sent: final, a retry would send the same thing again.
    case grpc.status.OUT_OF_RANGE:
    case grpc.status.RESOURCE_EXHAUSTED:
    case grpc.status.INVALID_ARGUMENT:
      return new ApiError({ errMsg: `${api}:fail ${details}`, errno: 1005, grpcCode: code, reason: grpc.status[code], hostError: null });
    default:
      return transportError(api, code, details);
  }
}

/** The request with an idempotency key for a payment that has none (a copy; the caller's is untouched). */
function withPaymentKey(api: OpenApiName, request: ApiRequest): ApiRequest {
  if (api !== 'requestPayment' && api !== 'requestMidasPaymentGameItem') return request;
  const arm = request[api] ?? {};
  if (arm.idempotencyKey) return request;
  return { [api]: { ...arm, idempotencyKey: newPaymentKey() } } as ApiRequest;
}
