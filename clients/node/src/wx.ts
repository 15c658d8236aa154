/**
 * The mini program surface: `wx.login({success, fail, complete})` and `await wx.login()`, for
 * every API the daemon's JSON bridge serves, with the exact objects `OpenApi.Invoke` returns.
 *
 * This module imports nothing (no gRPC), so a sandboxed renderer's preload can bundle it and pass
 * an invoker that forwards to the shell over IPC, where a `RendererClient` does the call.
 */

/** Every API `wx` offers, by its mini program name. Adding an API the daemon serves is one line. */
export const WX_APIS = [
  'login',
  'checkSession',
  'getPhoneNumber',
  'getEmail',
  'chooseAvatar',
  'getNickName',
  'getUserInfo',
  'getUserProfile',
  'requestPayment',
  'requestMidasPaymentGameItem',
  'getSetting',
  'authorize',
  'openSetting',
] as const;

export type WxApiName = (typeof WX_APIS)[number];

/** A result object of the JSON bridge: always an `errMsg`, `errno` on failures, the API's fields. */
export interface WxResult {
  errMsg: string;
  errno?: number;
  [field: string]: unknown;
}

/** What `invoke` answers: `ok` picks `success` or `fail`, `result` is the callback's argument. */
export interface WxInvokeResult {
  ok: boolean;
  result: WxResult;
}

/** Anything that calls the JSON bridge: a `RendererClient`, or an IPC proxy to one. */
export interface WxInvoker {
  invoke(api: string, params: Record<string, unknown>): Promise<WxInvokeResult>;
}

/** The params of a wx call: the API's fields plus the three optional callbacks. */
export interface WxOptions {
  success?: (result: WxResult) => void;
  fail?: (result: WxResult) => void;
  complete?: (result: WxResult) => void;
  [param: string]: unknown;
}

/**
 * One wx API: with any of `success`/`fail`/`complete` it calls them and returns nothing, as in
 * WeChat; without, it returns a promise that resolves with the success object and rejects with
 * the fail object.
 */
export interface WxFunction {
  (options: WxOptions & ({ success: WxOptions['success'] } | { fail: WxOptions['fail'] } | { complete: WxOptions['complete'] })): void;
  (options?: WxOptions): Promise<WxResult>;
}

export type Wx = { readonly [N in WxApiName]: WxFunction };

const CALLBACKS = ['success', 'fail', 'complete'];

/** The `wx` object for a renderer (or anything with its `invoke`). */
export function createWx(renderer: WxInvoker): Wx {
  const wx: Record<string, WxFunction> = {};
  for (const api of WX_APIS) wx[api] = wxFunction(renderer, api);
  return Object.freeze(wx) as Wx;
}

function wxFunction(renderer: WxInvoker, api: string): WxFunction {
  return function (options: WxOptions = {}): Promise<WxResult> | undefined {
    const params: Record<string, unknown> = {};
    for (const [k, v] of Object.entries(options ?? {})) if (!CALLBACKS.includes(k) && typeof v !== 'function') params[k] = v;
    const answer = renderer.invoke(api, params).catch(
      (e: unknown): WxInvokeResult => ({ ok: false, result: { errMsg: `${api}:fail ${String(e)}`, errno: 1005 } }),
    );
    const { success, fail, complete } = options ?? {};
    if (typeof success !== 'function' && typeof fail !== 'function' && typeof complete !== 'function') {
      return answer.then(({ ok, result }) => (ok ? result : Promise.reject(result)));
    }
    void answer.then(({ ok, result }) => {
      try {
        if (ok) success?.(result);
        else fail?.(result);
      } finally {
        complete?.(result);
      }
    });
    return undefined;
  } as WxFunction;
}
