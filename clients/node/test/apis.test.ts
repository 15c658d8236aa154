/**
 * Every open API in v1, v2 and v3, from a Node host and Node renderers through the real daemon:
 * once typed on the Session stream (`renderer.call`) and once through `wx` (promise and callback
 * forms) with the exact objects of the JSON bridge.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import * as grpc from '@grpc/grpc-js';
import {
  ApiError,
  createWx,
  HostClient,
  OPEN_API_NAMES,
  RendererClient,
  v1,
  WX_APIS,
  type HostHandlers,
  type OpenApiName,
  type RequestOf,
  type WxResult,
} from '../src/index';
import type { ExchangeClient } from '../src/generated/miniapp/broker/v1/Exchange';
import { Daemon, rejection, signal, within } from './support';

const APP = 'wxnode00000000001';
/** The APIs of v1-v3; the consent APIs (getSetting, authorize, openSetting) are in consent.test.ts. */
const APIS = OPEN_API_NAMES.filter((n) => !['getSetting', 'authorize', 'openSetting'].includes(n));
const PROFILE = { nickName: 'Ada', avatarUrl: 'https://example.invalid/ada.png', phoneNumber: '+1 555 0100', email: 'ada@example.invalid' };
const USER_INFO = { nickName: 'Ada (host)', avatarUrl: 'https://example.invalid/host.png', gender: 2, country: 'UK', province: '', city: 'London', language: 'en' };

/** The params each API needs (payments: the signed WeChat fields). */
function paramsOf(api: OpenApiName, n: number): Record<string, unknown> {
  switch (api) {
    case 'getUserInfo':
      return { withCredentials: false, lang: 'en' };
    case 'getUserProfile':
      return { desc: 'show your name', lang: 'en' };
    case 'requestPayment':
      return { timeStamp: '1700000000', nonceStr: `nonce-${n}`, package: `prepay_id=wx${n}`, signType: 'RSA', paySign: `sig-${n}` };
    case 'requestMidasPaymentGameItem':
      return {
        signData: JSON.stringify({ offerId: '1450000000', buyQuantity: 1, env: 0, currencyType: 'CNY', productId: 'gem', goodsPrice: 600, outTradeNo: `order-${n}`, mode: 'short_series_goods' }),
        paySig: `paysig-${n}`,
        signature: `signature-${n}`,
      };
    default:
      return {};
  }
}

/** What the host saw: the API (or "getAuthCode:<api>") and the app's version. */
const seen: string[] = [];
const paymentKeys: string[] = [];

const handlers: HostHandlers = {
  login: (_r, { app }) => (seen.push(`login@${app.apiVersion}`), { code: `host-code-${app.instanceId}` }),
  checkSession: (_r, { app }) => (seen.push(`checkSession@${app.apiVersion}`), {}),
  getPhoneNumber: (_r, { app }) => (seen.push(`getPhoneNumber@${app.apiVersion}`), { code: 'host-phone-code' }),
  getEmail: (_r, { app }) => (seen.push(`getEmail@${app.apiVersion}`), { code: 'host-email-code' }),
  chooseAvatar: (_r, { app }) => (seen.push(`chooseAvatar@${app.apiVersion}`), { avatarUrl: 'https://example.invalid/chosen.png' }),
  getNickName: (_r, { app }) => (seen.push(`getNickName@${app.apiVersion}`), { nickName: 'host-nick' }),
  getUserInfo: async (r, { app }) => {
    seen.push(`getUserInfo@${app.apiVersion}`);
    assert.equal(r.lang, 'en');
    return { userInfo: USER_INFO, rawData: '{}' };
  },
  getUserProfile: async (r, { app }) => {
    seen.push(`getUserProfile@${app.apiVersion}`);
    assert.equal(r.desc, 'show your name');
    return { userInfo: USER_INFO };
  },
  requestPayment: async (r, { app }) => {
    seen.push(`requestPayment@${app.apiVersion}`);
    paymentKeys.push(r.idempotencyKey);
    assert.match(r.package, /^prepay_id=wx/);
    return {};
  },
  requestMidasPaymentGameItem: async (r, { app }) => {
    seen.push(`requestMidasPaymentGameItem@${app.apiVersion}`);
    paymentKeys.push(r.idempotencyKey);
    assert.equal(JSON.parse(r.signData).productId, 'gem');
    return {};
  },
  getAuthCode: async (r, { app }) => {
    seen.push(`getAuthCode:${r.api}@${app.apiVersion}`);
    const refused = r.scopes.filter((s) => s === 'SCOPE_NICKNAME');
    return {
      authCode: `auth-${r.api}`,
      authSuccessScopes: r.scopes.filter((s) => s !== 'SCOPE_NICKNAME'),
      authErrorScopes: Object.fromEntries(refused.map((s) => [s, 'user refused'])),
    };
  },
};

let daemon: Daemon;
let host: HostClient;

before(async () => {
  daemon = await Daemon.start();
  host = await HostClient.connect({ address: daemon.socket, tokenFile: daemon.tokenFile, name: 'node-test-host', user: { uid: 'user-ada', profile: PROFILE }, handlers });
});

after(async () => {
  host?.close();
  await daemon?.dispose();
});

async function launch(version: string): Promise<RendererClient> {
  const launched = await host.launchApp(APP, JSON.stringify({ apiVersion: version }));
  assert.equal(launched.apiVersion, version);
  assert.equal(launched.versionSource, 'app.json');
  return RendererClient.connect(daemon.socket, launched.launchToken);
}

test('the host is welcomed and the daemon reports it', async () => {
  assert.equal(host.connected, true);
  assert.match(host.welcome!.daemonVersion, /^\d+\.\d+\.\d+/);
  const status = await host.status();
  assert.equal(status.hostConnected, true);
  assert.equal(status.hostName, 'node-test-host');
  assert.equal(status.userSignedIn, true);
  assert.equal(status.hostMethods.length, 11, status.hostMethods.join());
});

test('v1: every API is delegated to the Node host, on the stream and through wx', async () => {
  const renderer = await launch('v1');
  const wx = createWx(renderer);
  try {
    for (const [i, api] of APIS.entries()) {
      seen.length = 0;
      const typed = await within(`v1 ${api}`, renderer.call(api, paramsOf(api, i) as RequestOf<typeof api>));
      assert.equal(typed.errMsg, `${api}:ok`);
      assert.deepEqual(seen, [`${api}@v1`]);
      const viaWx = await within(`v1 wx.${api}`, wx[api](paramsOf(api, 100 + i)));
      assert.equal(viaWx.errMsg, `${api}:ok`);
    }
    // The exact success objects, field for field.
    const login = await wx.login();
    assert.match(String(login.code), /^host-code-/);
    assert.deepEqual(login, { errMsg: 'login:ok', code: login.code });
    assert.deepEqual(await wx.getNickName(), { errMsg: 'getNickName:ok', nickName: 'host-nick' });
    assert.deepEqual(await wx.chooseAvatar(), { errMsg: 'chooseAvatar:ok', avatarUrl: 'https://example.invalid/chosen.png' });
    const info = await wx.getUserInfo({ lang: 'en' });
    assert.equal(info.errMsg, 'getUserInfo:ok');
    assert.deepEqual(info.userInfo, USER_INFO);
    assert.deepEqual(await wx.requestPayment(paramsOf('requestPayment', 900)), { errMsg: 'requestPayment:ok' });
    // Payments got a fresh idempotency key each (32 hex digits), on both surfaces.
    assert.ok(paymentKeys.length >= 5);
    for (const key of paymentKeys) assert.match(key, /^[0-9a-f]{32}$/);
    assert.equal(new Set(paymentKeys).size, paymentKeys.length);
  } finally {
    renderer.close();
  }
});

test('v2: the daemon answers the defaults from the pushed user; the rest reaches the host', async () => {
  const renderer = await launch('v2');
  const wx = createWx(renderer);
  try {
    seen.length = 0;
    const login = await wx.login();
    assert.equal(login.errMsg, 'login:ok');
    assert.ok(typeof login.code === 'string' && login.code.length > 0);
    assert.deepEqual(Object.keys(login).sort(), ['code', 'errMsg']);
    assert.deepEqual(await wx.checkSession(), { errMsg: 'checkSession:ok' });
    assert.deepEqual(await wx.getNickName(), { errMsg: 'getNickName:ok', nickName: 'Ada' });
    assert.deepEqual(await wx.chooseAvatar(), { errMsg: 'chooseAvatar:ok', avatarUrl: PROFILE.avatarUrl });
    const phone = await renderer.call('getPhoneNumber');
    const email = await renderer.call('getEmail');
    assert.deepEqual(seen, [], 'the defaults never reach the host');
    for (const [i, api] of APIS.entries()) {
      assert.equal((await renderer.call(api, paramsOf(api, 200 + i) as RequestOf<typeof api>)).errMsg, `${api}:ok`);
    }
    assert.deepEqual(seen, ['getUserInfo@v2', 'getUserProfile@v2', 'requestPayment@v2', 'requestMidasPaymentGameItem@v2']);

    // The app's backend swaps the codes for what they stand for, with its secret.
    const { secret } = await host.registerApp(APP);
    const exchange = new v1.Exchange(`unix:${daemon.socket}`, grpc.credentials.createInsecure()) as unknown as ExchangeClient;
    try {
      const ask = <T>(f: (cb: grpc.requestCallback<T>) => void) => new Promise<T>((res, rej) => f((e, r) => (e || !r ? rej(e) : res(r))));
      const session = await ask<{ openid: string }>((cb) => exchange.Code2Session({ appId: APP, secret, code: String(login.code) }, cb));
      assert.ok(session.openid.length > 0);
      const number = await ask<{ phoneNumber: string }>((cb) => exchange.GetPhoneNumber({ appId: APP, secret, code: phone.code }, cb));
      assert.equal(number.phoneNumber, PROFILE.phoneNumber);
      const mail = await ask<{ email: string }>((cb) => exchange.GetEmail({ appId: APP, secret, code: email.code }, cb));
      assert.equal(mail.email, PROFILE.email);
    } finally {
      exchange.close();
    }
  } finally {
    renderer.close();
  }
});

test('v3: getAuthCode is asked first; a refused scope fails with the bridge object', async () => {
  const renderer = await launch('v3');
  const wx = createWx(renderer);
  try {
    seen.length = 0;
    assert.equal((await wx.login()).errMsg, 'login:ok');
    assert.deepEqual(seen, ['getAuthCode:login@v3']);
    for (const api of ['getPhoneNumber', 'getEmail', 'chooseAvatar'] as const) {
      seen.length = 0;
      assert.equal((await wx[api]()).errMsg, `${api}:ok`);
      assert.deepEqual(seen, [`getAuthCode:${api}@v3`]);
    }
    // The host refuses SCOPE_NICKNAME: the fail callback gets errMsg and errno, complete follows.
    const failed = signal<WxResult>();
    const completed = signal<WxResult>();
    const result = wx.getNickName({ success: () => assert.fail('success for a refused scope'), fail: failed.resolve, complete: completed.resolve });
    assert.equal(result, undefined, 'the callback form returns nothing');
    const failure = await within('getNickName fail', failed.promise);
    assert.equal(await within('getNickName complete', completed.promise), failure);
    assert.match(failure.errMsg, /^getNickName:fail scope not authorized: SCOPE_NICKNAME/);
    assert.equal(typeof failure.errno, 'number');
    assert.notEqual(failure.errno, 0);
    // The refusal is remembered: from now on the call fails at once with "auth deny", on the
    // promise form and on the stream alike.
    assert.deepEqual(await rejection(wx.getNickName()), { errMsg: 'getNickName:fail auth deny', errno: 1017 });
    await assert.rejects(renderer.call('getNickName'), (e: ApiError) => e.errMsg === 'getNickName:fail auth deny' && e.errno === 1017);
    // getUserInfo and getUserProfile carry the nickname too: the refusal denies them as well
    // (docs/decisions.md, what a remembered refusal means on each route); the rest still work.
    for (const [i, api] of APIS.entries()) {
      if (api === 'getNickName') continue;
      if (api === 'getUserInfo' || api === 'getUserProfile') {
        const denied = (e: ApiError) => e.errMsg === `${api}:fail auth deny` && e.errno === 1017;
        await assert.rejects(renderer.call(api, paramsOf(api, 300 + i) as RequestOf<typeof api>), denied);
        continue;
      }
      assert.equal((await renderer.call(api, paramsOf(api, 300 + i) as RequestOf<typeof api>)).errMsg, `${api}:ok`);
    }
  } finally {
    renderer.close();
  }
});

test('wx offers every API of the table, and a bad params object fails cleanly', async () => {
  const renderer = await launch('v2');
  const wx = createWx(renderer);
  try {
    assert.deepEqual(Object.keys(wx), [...WX_APIS]);
    // requestPayment without its signed fields: a fail object, no host call.
    seen.length = 0;
    const bad = await rejection(wx.requestPayment({ timeStamp: 12 }));
    assert.match(bad.errMsg, /^requestPayment:fail /);
    assert.equal(typeof bad.errno, 'number');
    assert.deepEqual(seen, []);
  } finally {
    renderer.close();
  }
});
