/**
 * The host's answers as a renderer sees them: a host error reaches it unchanged, a user who
 * cancels gives "fail cancel", a method the host lacks fails at once, and the daemon's CancelCall
 * reaches the handler's AbortSignal.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import * as grpc from '@grpc/grpc-js';
import { ApiError, createWx, HostClient, HostConnectError, HostError, RendererClient, UserCancelled, type WxResult } from '../src/index';
import { RunningCall } from '../src/host';
import { Daemon, rejection, signal, until, within } from './support';

const APP = 'wxnode00000000002';
const PAY = { timeStamp: '1700000000', package: 'prepay_id=wx1', signType: 'RSA' };
const pay = (n: string) => ({ ...PAY, nonceStr: `nonce-${n}`, paySign: `sig-${n}` });

let daemon: Daemon;
let host: HostClient;
/** Set by each test: what the payment handler does. */
let onPayment: (nonce: string, signal: AbortSignal) => Promise<Record<string, never>> = async () => ({});
let onProfile: (desc: string, signal: AbortSignal) => Promise<Record<string, never>> = async () => ({});

before(async () => {
  daemon = await Daemon.start();
  host = await HostClient.connect({
    address: daemon.socket,
    tokenFile: daemon.tokenFile,
    name: 'node-host-behaviour',
    user: { uid: 'user-1', profile: { nickName: 'Bo' } },
    handlers: {
      login: () => {
        throw new HostError('TCMPPLoginErrorDomain', -1001, 'app not login');
      },
      getUserInfo: () => {
        throw new Error('a bug with personal data: bo@example.invalid');
      },
      requestPayment: (r, { signal }) => onPayment(r.nonceStr, signal),
      getUserProfile: (r, { signal }) => onProfile(r.desc, signal),
      requestMidasPaymentGameItem: () => {
        throw new UserCancelled();
      },
    },
  });
});

after(async () => {
  host?.close();
  await daemon?.dispose();
});

async function renderer(version = 'v1'): Promise<RendererClient> {
  const launched = await host.launchApp(APP, JSON.stringify({ apiVersion: version }));
  return RendererClient.connect(daemon.socket, launched.launchToken);
}

test('a host error reaches the renderer unchanged (domain, code, message)', async () => {
  const r = await renderer();
  try {
    const failure = await rejection(createWx(r).login());
    assert.deepEqual(failure, {
      errMsg: failure.errMsg,
      errno: -1001,
      hostError: { domain: 'TCMPPLoginErrorDomain', code: -1001, message: 'app not login' },
    });
    assert.match(failure.errMsg, /^login:fail .*app not login/);
    await assert.rejects(r.call('login'), (e: ApiError) => {
      assert.ok(e instanceof ApiError);
      assert.equal(e.errMsg, failure.errMsg);
      assert.equal(e.errno, -1001);
      assert.deepEqual({ ...e.hostError }, { domain: 'TCMPPLoginErrorDomain', code: -1001, message: 'app not login' });
      return true;
    });
  } finally {
    r.close();
  }
});

test('a user who cancels gives "fail cancel"', async () => {
  const r = await renderer();
  try {
    const signData = { mode: 'short_series_goods', offerId: '1450000000', buyQuantity: 1, env: 0, currencyType: 'CNY', productId: 'p', goodsPrice: 600, outTradeNo: 'order-1' };
    const midas = { signData: JSON.stringify(signData), paySig: 'ps', signature: 'sg' };
    const failure = await rejection(createWx(r).requestMidasPaymentGameItem(midas));
    assert.equal(failure.errMsg, 'requestMidasPaymentGameItem:fail cancel');
    assert.equal(typeof failure.errno, 'number');
    assert.equal(failure.hostError, undefined);
    await assert.rejects(r.call('requestMidasPaymentGameItem', { ...midas, paySig: 'ps2' }), (e: ApiError) => e.isCancel && e.reason === 'cancel');
  } finally {
    r.close();
  }
});

test('a handler that throws something else fails without passing its message on', async () => {
  const r = await renderer();
  try {
    const failure = await rejection(createWx(r).getUserInfo());
    assert.match(failure.errMsg, /^getUserInfo:fail /);
    assert.doesNotMatch(JSON.stringify(failure), /bo@example/);
    assert.equal((failure.hostError as { domain: string }).domain, 'miniapp-broker-client');
  } finally {
    r.close();
  }
});

test('a method the host does not implement fails at once', async () => {
  const r = await renderer();
  try {
    const failure = await rejection(createWx(r).chooseAvatar());
    assert.equal(failure.errMsg, 'chooseAvatar:fail chooseAvatar not implemented by host');
  } finally {
    r.close();
  }
});

test("the daemon's CancelCall reaches the handler's AbortSignal when the renderer goes away", async () => {
  const r = await renderer();
  const started = signal<string>();
  const aborted = signal<unknown>();
  onProfile = (desc, sig) => {
    sig.addEventListener('abort', () => aborted.resolve(sig.reason));
    started.resolve(desc);
    return new Promise(() => {}); // the consent sheet stays open
  };
  try {
    const pending = r.call('getUserProfile', { desc: 'held' });
    assert.equal(await within('the host to see the call', started.promise), 'held');
    r.close();
    await assert.rejects(pending, (e: ApiError) => e.reason === 'cancelled');
    const reason = await within('CancelCall to reach the AbortSignal', aborted.promise);
    assert.match(String(reason), /cancelled by the daemon/);
  } finally {
    onProfile = async () => ({});
  }
});

test('a payment is not abandoned when its renderer goes away: the host still answers it', async () => {
  const r = await renderer();
  const started = signal<AbortSignal>();
  const answer = signal<void>();
  onPayment = async (_nonce, sig) => {
    started.resolve(sig);
    await answer.promise;
    return {};
  };
  try {
    const pending = r.call('requestPayment', pay('kept'));
    const sig = await within('the host to see the payment', started.promise);
    r.close();
    await assert.rejects(pending, (e: ApiError) => e.reason === 'cancelled');
    // The daemon keeps waiting for the user's decision; it sends no CancelCall for a payment.
    const status = await host.status();
    assert.equal(status.callsInFlight, 1);
    assert.equal(sig.aborted, false);
    answer.resolve();
  } finally {
    onPayment = async () => ({});
  }
});

test('closing the app cancels the call on the host and fails it for the renderer', async () => {
  const launched = await host.launchApp(APP, '{"apiVersion":"v1"}');
  const r = await RendererClient.connect(daemon.socket, launched.launchToken);
  const started = signal<string>();
  const aborted = signal<void>();
  onProfile = (desc, sig) => {
    sig.addEventListener('abort', () => aborted.resolve());
    started.resolve(desc);
    return new Promise(() => {});
  };
  try {
    const pending = rejection(createWx(r).getUserProfile({ desc: 'closing' }));
    assert.equal(await within('the host to see the call', started.promise), 'closing');
    const closed = await host.closeApp(launched.instanceId);
    assert.equal(closed.cancelledCalls, 1);
    const failure = await within('the renderer to hear', pending);
    assert.deepEqual(failure, { errMsg: 'getUserProfile:fail call cancelled: app instance closed', errno: 1007 });
    await within('CancelCall to reach the AbortSignal', aborted.promise);
    // The token is dead now: a call fails as unauthenticated, without retrying for 10 s.
    await assert.rejects(within('a call on a closed app', r.call('checkSession'), 5000), (e: ApiError) => e.reason === 'unauthenticated');
  } finally {
    onProfile = async () => ({});
    r.close();
  }
});

test('the pushed user changes what the daemon answers (v2)', async () => {
  const r = await renderer('v2');
  try {
    const wx = createWx(r);
    assert.deepEqual(await wx.getNickName(), { errMsg: 'getNickName:ok', nickName: 'Bo' });
    host.setUser({ uid: 'user-2', profile: { nickName: 'Cy' } });
    // The user message and the next call travel on different streams: wait for it to apply.
    await until('the new user to apply', async () => ((await wx.getNickName()).nickName === 'Cy' ? true : undefined));
    host.setUser({ uid: '' });
    const signedOut = await until('the sign-out to apply', () => wx.login().then(() => undefined, (e: WxResult) => e));
    assert.match(signedOut.errMsg, /^login:fail /);
  } finally {
    host.setUser({ uid: 'user-1', profile: { nickName: 'Bo' } });
    r.close();
  }
});

test('a wrong host token is refused at once, without retrying for the connect budget', async () => {
  const started = Date.now();
  await assert.rejects(
    within('the refusal', HostClient.connect({ address: daemon.socket, token: 'not-the-token', connectTimeoutMs: 8000 })),
    (e: HostConnectError) => e instanceof HostConnectError && e.code === grpc.status.UNAUTHENTICATED && !e.retryable,
  );
  assert.ok(Date.now() - started < 5000, 'refused without waiting out the budget');
  assert.equal((await host.status()).hostName, 'node-host-behaviour', 'the connected host is untouched');
});

test('a wrong launch token fails every surface at once with a clear answer', async () => {
  const r = new RendererClient(daemon.socket, 'no-such-instance.secret');
  try {
    await assert.rejects(within('the stream call', r.call('login'), 5000), (e: ApiError) => e.reason === 'unauthenticated' && e.errMsg.startsWith('login:fail'));
    const failure = await within('the wx call', rejection(createWx(r).login()), 5000);
    assert.match(failure.errMsg, /^login:fail /);
    assert.equal(typeof failure.errno, 'number');
  } finally {
    r.close();
  }
});

test("a handler's signal is made when it is read, and is already aborted if the cancel came first", () => {
  const app = { appId: 'a', instanceId: 'i', apiVersion: 'v1' };
  const early = new RunningCall(app, 1000);
  const reason = new Error('cancelled by the daemon: gone');
  early.abort(reason);
  early.abort(new Error('a second cancel is ignored'));
  assert.equal(early.signal.aborted, true);
  assert.equal(early.signal.reason, reason);

  const late = new RunningCall(app, 1000);
  const heard: unknown[] = [];
  late.signal.addEventListener('abort', () => heard.push(late.signal.reason));
  assert.equal(late.signal.aborted, false);
  late.abort(reason);
  late.abort(new Error('again'));
  assert.deepEqual(heard, [reason]);
  assert.equal(late.signal, late.signal, 'one signal per call');
  assert.deepEqual([late.app, late.deadlineMs], [app, 1000]);
});
