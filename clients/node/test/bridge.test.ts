/**
 * The JSON bridge on the Session stream: `invoke` (and so `wx`) answers, over the stream, the very
 * objects the daemon's `OpenApi.Invoke` answers, key for key and in the same order, for every
 * API, success and failure, in v1, v2 and v3; params it cannot map exactly take `Invoke` itself.
 * Which route a call took is read off the wire: a call on the open stream brings no HTTP/2
 * HEADERS frame back, a unary `Invoke` brings its own.
 */
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import { after, before, test } from 'node:test';
import * as grpc from '@grpc/grpc-js';
import { requestFromParams, STREAM_PARAMS_MAX_CHARS } from '../src/bridge';
import { CHANNEL_OPTIONS, HostClient, HostError, LAUNCH_TOKEN_HEADER, RendererClient, target, UserCancelled, v1, type WxResult } from '../src/index';
import type { OpenApiClient } from '../src/generated/miniapp/broker/v1/OpenApi';
import { Daemon, SocketProxy, tempDir, within } from './support';

const USER_INFO = { nickName: 'Ida', avatarUrl: 'https://example.invalid/ida.png', gender: 1, country: 'NO', province: '', city: 'Oslo', language: 'nb' };
/** Fields whose values differ from call to call (fresh codes, per-session keys): compared by type. */
const VARYING = ['code', 'encryptedData', 'iv', 'signature'];
const HEADERS = 1;

let daemon: Daemon;
let host: HostClient;
let invoker: OpenApiClient;
let proxyDir: string;
let apps = 0;

before(async () => {
  daemon = await Daemon.start();
  host = await HostClient.connect({
    address: daemon.socket,
    tokenFile: daemon.tokenFile,
    user: { uid: 'user-ida', profile: { nickName: 'Ida', avatarUrl: USER_INFO.avatarUrl, phoneNumber: '+47 555 0100', email: 'ida@example.invalid' } },
    handlers: {
      login: () => ({ code: 'host-code' }),
      checkSession: () => {
        throw new HostError('TCMPPLoginErrorDomain', -1001, 'app not login');
      },
      getPhoneNumber: () => ({ code: 'host-phone' }),
      getEmail: () => {
        throw new UserCancelled();
      },
      // chooseAvatar: not implemented, so the daemon fails it.
      getNickName: () => ({ nickName: 'host-nick' }),
      getUserInfo: () => ({ userInfo: USER_INFO, rawData: '{}' }),
      getUserProfile: () => ({}),
      requestPayment: () => ({}),
      requestMidasPaymentGameItem: () => {
        throw new HostError('MidasDomain', 2 ** 40, 'a large code');
      },
      getAuthCode: (r) => ({
        authCode: 'auth',
        authSuccessScopes: r.scopes.filter((s) => s !== 'SCOPE_NICKNAME'),
        authErrorScopes: Object.fromEntries(r.scopes.filter((s) => s === 'SCOPE_NICKNAME').map((s) => [s, 'refused'])),
      }),
      openSetting: () => ({ authSetting: { SCOPE_NICKNAME: true, SCOPE_EMAIL: false } }),
    },
  });
  invoker = new v1.OpenApi(target(daemon.socket), grpc.credentials.createInsecure(), CHANNEL_OPTIONS) as unknown as OpenApiClient;
  proxyDir = tempDir('miniapp-node-bridge-');
});

after(async () => {
  invoker?.close();
  host?.close();
  await daemon?.dispose();
  if (proxyDir) fs.rmSync(proxyDir, { recursive: true, force: true });
});

/** The daemon's own `Invoke` answer, as `invoke` returns it, and its text. */
function rawInvoke(token: string, api: string, params: Record<string, unknown>): Promise<{ ok: boolean; result: WxResult }> {
  const md = new grpc.Metadata();
  md.set(LAUNCH_TOKEN_HEADER, token);
  return new Promise((resolve, reject) =>
    invoker.Invoke({ api, paramsJson: JSON.stringify(params) }, md, (err, r) => (err || !r ? reject(err) : resolve({ ok: r.ok, result: JSON.parse(r.resultJson) }))),
  );
}

/** The answer as text with the varying fields' values replaced by their type: key order counts. */
function shape(answer: { ok: boolean; result: WxResult }): string {
  const result = Object.fromEntries(Object.entries(answer.result).map(([k, v]) => [k, VARYING.includes(k) ? `<${typeof v}>` : v]));
  return JSON.stringify({ ok: answer.ok, result });
}

type Step = [api: string, params: Record<string, unknown>];

/**
 * Runs `steps` on two fresh instances of two apps of `version` (same user): one through
 * `renderer.invoke` behind a proxy that counts the HEADERS frames coming back, one through the
 * daemon's `Invoke`. Returns, per step, both answers and the frames the step brought.
 */
async function both(version: string, steps: Step[]): Promise<{ step: Step; streamed: string; invoked: string; headers: number }[]> {
  const n = ++apps;
  const appJson = JSON.stringify({ apiVersion: version });
  const mine = await host.launchApp(`wxbridge${version}00000${n}`, appJson);
  const theirs = await host.launchApp(`wxbridge${version}10000${n}`, appJson);
  const proxy = new SocketProxy(daemon.socket, fs.mkdtempSync(`${proxyDir}/p`));
  await proxy.listen();
  let headers = 0;
  proxy.observe = (type) => void (type === HEADERS && headers++);
  const renderer = new RendererClient(proxy.path, mine.launchToken);
  try {
    // The stream opens (one HEADERS frame: the Session's response headers) before the steps.
    await within('the stream to open', renderer.invoke('getSetting', {}));
    await rawInvoke(theirs.launchToken, 'getSetting', {});
    assert.equal(headers, 1, 'the Session stream answered with its headers');
    const out = [];
    for (const step of steps) {
      const before = headers;
      const streamed = await within(`invoke ${step[0]}`, renderer.invoke(step[0], { ...step[1] }));
      const brought = headers - before;
      const invoked = await within(`Invoke ${step[0]}`, rawInvoke(theirs.launchToken, step[0], { ...step[1] }));
      out.push({ step, streamed: shape(streamed), invoked: shape(invoked), headers: brought });
    }
    return out;
  } finally {
    renderer.close();
    await proxy.close();
  }
}

function assertSameOnTheStream(results: Awaited<ReturnType<typeof both>>): void {
  for (const { step, streamed, invoked, headers } of results) {
    assert.equal(streamed, invoked, `${step[0]} ${JSON.stringify(step[1])}`);
    assert.equal(headers, 0, `${step[0]} went over the stream`);
  }
}

const PAYMENT = { timeStamp: '1700000000', nonceStr: 'n-1', package: 'prepay_id=wx1', signType: 'RSA', paySign: 's-1' };
const MIDAS = { signData: JSON.stringify({ offerId: '1', buyQuantity: 1, env: 0, currencyType: 'CNY', productId: 'p', goodsPrice: 1, outTradeNo: 'o-1' }), paySig: 'ps', signature: 'sg' };

test('v1: every API over the stream answers what Invoke answers (host answers, host errors, cancel, not implemented)', async () => {
  assertSameOnTheStream(
    await both('v1', [
      ['login', {}],
      ['login', { timeout: 5000, zzUnknown: 'ignored', zzNull: null, zzNumber: 1.5, zzFlag: true }],
      ['checkSession', {}],
      ['getPhoneNumber', {}],
      ['getEmail', {}],
      ['chooseAvatar', {}],
      ['getNickName', {}],
      ['getUserInfo', { withCredentials: false, lang: 'en' }],
      ['getUserProfile', { desc: 'why', lang: 'en' }],
      ['requestPayment', { ...PAYMENT, nonceStr: 'n-v1' }],
      ['requestMidasPaymentGameItem', MIDAS],
    ]),
  );
});

test('v2: the daemon\'s own answers, credentials included, are the same over the stream', async () => {
  const results = await both('v2', [
    ['login', {}],
    ['checkSession', {}],
    ['getNickName', {}],
    ['chooseAvatar', {}],
    ['getPhoneNumber', {}],
    ['getUserInfo', { withCredentials: true, lang: 'en' }],
    ['getUserInfo', { withCredentials: false }],
    ['getUserProfile', { desc: 'why' }],
  ]);
  assertSameOnTheStream(results);
  assert.match(results[5].streamed, /"encryptedData":"<string>"/, 'the credentials are there');
});

test('v3: consent (authorize, a refusal remembered, getSetting\'s map, openSetting) is the same over the stream', async () => {
  assertSameOnTheStream(
    await both('v3', [
      ['getSetting', {}],
      ['authorize', { scope: 'SCOPE_PHONE_NUMBER' }],
      ['authorize', { scope: 'SCOPE_NICKNAME' }],
      ['getNickName', {}],
      ['getPhoneNumber', {}],
      ['getSetting', {}],
      ['openSetting', {}],
      ['getSetting', {}],
      ['authorize', { scope: 'no-such-scope' }],
    ]),
  );
});

test('params the client cannot map exactly take Invoke, and get the daemon\'s answer', async () => {
  const steps: Step[] = [
    ['requestPayment', { timeStamp: 12 }],
    ['login', { timeout: -1 }],
    ['login', { timeout: 2.5 }],
    ['login', { timeout: '10' }],
    ['login', { zzNested: { a: 1 } }],
    ['getUserProfile', { desc: 'lone \ud800 surrogate' }],
    ['getUserProfile', { desc: 'x'.repeat(STREAM_PARAMS_MAX_CHARS + 1) }],
    ['openSetting', { authSetting: { SCOPE_EMAIL: true } }],
    ['noSuchApi', {}],
  ];
  for (const { step, streamed, invoked, headers } of await both('v1', steps)) {
    assert.equal(streamed, invoked, `${step[0]} ${JSON.stringify(step[1])}`);
    assert.ok(headers > 0, `${step[0]} ${JSON.stringify(step[1]).slice(0, 60)} took Invoke`);
  }
});

test('requestFromParams maps exactly what the daemon would read, and nothing else', () => {
  assert.deepEqual(requestFromParams('login', {}), { login: {} });
  assert.deepEqual(requestFromParams('login', { timeout: 0xffff_ffff, other: 'x', undef: undefined }), { login: { timeout: 0xffff_ffff } });
  assert.equal(requestFromParams('login', { timeout: 0x1_0000_0000 }), undefined);
  assert.equal(requestFromParams('login', { timeout: null }), undefined);
  assert.equal(requestFromParams('getUserInfo', { withCredentials: 1 }), undefined);
  assert.equal(requestFromParams('getUserInfo', { lang: new String('en') }), undefined);
  assert.equal(requestFromParams('login', { when: new Date(0) }), undefined);
  assert.equal(requestFromParams('login', { big: 1n }), undefined);
  assert.deepEqual(requestFromParams('requestPayment', { ...PAYMENT, idempotencyKey: 'k' }), { requestPayment: { ...PAYMENT, idempotencyKey: 'k' } });
  assert.deepEqual(requestFromParams('getUserProfile', { desc: 'pair \ud83d\ude00 is fine' }), { getUserProfile: { desc: 'pair \ud83d\ude00 is fine' } });
  assert.deepEqual(requestFromParams('openSetting', { uid: 'someone' }), { openSetting: { uid: 'someone' } });
  for (const name of ['constructor', '__proto__', 'toString', 'Login', '']) assert.equal(requestFromParams(name, {}), undefined, name);
});
