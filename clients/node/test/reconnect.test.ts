/**
 * Reconnecting: the host after a daemon restart (it connects again and launches its apps again),
 * the renderer while the daemon is unreachable (backoff), and a payment whose answer is lost on a
 * broken connection: the retry carries the same idempotency key and the host sees it once.
 */
import assert from 'node:assert/strict';
import { once } from 'node:events';
import * as fs from 'node:fs';
import { test } from 'node:test';
import { ApiError, createWx, HostClient, RendererClient, type Relaunched } from '../src/index';
import { Daemon, signal, SocketProxy, tempDir, within } from './support';

const APP = 'wxnode00000000003';

test('after a daemon restart the host connects again, launches its apps again, and the renderer goes on', async () => {
  const dir = tempDir();
  let daemon = await Daemon.start({ dir, ephemeral: false });
  let logins = 0;
  const host = await HostClient.connect({
    address: daemon.socket,
    tokenFile: daemon.tokenFile,
    user: { uid: 'user-r', profile: { nickName: 'Re' } },
    handlers: { login: () => ({ code: `host-login-${++logins}` }) },
  });
  const launched = await host.launchApp(APP, '{"apiVersion":"v1"}');
  const renderer = new RendererClient(daemon.socket, launched.launchToken);
  const wx = createWx(renderer);
  try {
    assert.deepEqual(await wx.login(), { errMsg: 'login:ok', code: 'host-login-1' });

    const disconnected = once(host, 'disconnected');
    const relaunched = once(host, 'relaunched') as Promise<[Relaunched]>;
    await daemon.stop('SIGKILL');
    await within('the host to see the daemon go', disconnected);
    assert.equal(host.connected, false);
    daemon = await Daemon.start({ dir, ephemeral: false });

    const [again] = await within('the host to launch its app again', relaunched);
    assert.equal(host.connected, true);
    assert.equal(again.appId, APP);
    assert.equal(again.previousInstanceId, launched.instanceId);
    assert.notEqual(again.launched.launchToken, launched.launchToken);
    assert.equal(again.launched.apiVersion, 'v1');

    // The old token died with the old daemon; with the new one the same client goes on.
    await assert.rejects(renderer.call('checkSession'), (e: ApiError) => e.reason === 'unauthenticated');
    renderer.setLaunchToken(again.launched.launchToken);
    assert.deepEqual(await within('login after the restart', wx.login()), { errMsg: 'login:ok', code: 'host-login-2' });
    const status = await host.status();
    assert.equal(status.hostConnected, true);
    assert.equal(status.apps, 1);
  } finally {
    renderer.close();
    host.close();
    await daemon.dispose();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('a renderer call retries with backoff while the daemon cannot be reached', async () => {
  const daemon = await Daemon.start();
  const proxy = new SocketProxy(daemon.socket, daemon.dir);
  const host = await HostClient.connect({ address: daemon.socket, tokenFile: daemon.tokenFile, user: { uid: 'u', profile: { nickName: 'N' } } });
  try {
    const launched = await host.launchApp(APP, '{"apiVersion":"v2"}');
    // The first three connections are refused; the call keeps trying and is answered.
    proxy.refuse = 3;
    await proxy.listen();
    const renderer = new RendererClient(proxy.path, launched.launchToken);
    try {
      assert.deepEqual(await within('the call to get through', createWx(renderer).getNickName()), { errMsg: 'getNickName:ok', nickName: 'N' });
      assert.equal(proxy.refused, 3);
      // A budget that runs out ends the call with a transport failure, never a hang.
      proxy.refuse = Infinity;
      proxy.cut();
      const short = new RendererClient(proxy.path, launched.launchToken, { reconnectBudgetMs: 300 });
      await assert.rejects(within('the budget to run out', short.call('checkSession')), (e: ApiError) => e.reason === 'transport' && e.errMsg.startsWith('checkSession:fail'));
      short.close();
    } finally {
      renderer.close();
    }
  } finally {
    host.close();
    await proxy.close();
    await daemon.dispose();
  }
});

test('a payment whose answer is lost on a broken connection is retried with its key and reaches the host once', async () => {
  const daemon = await Daemon.start();
  const proxy = new SocketProxy(daemon.socket, daemon.dir);
  await proxy.listen();
  const keys: string[] = [];
  const seen = signal<void>();
  const release = signal<void>();
  const host = await HostClient.connect({
    address: daemon.socket,
    tokenFile: daemon.tokenFile,
    user: { uid: 'payer' },
    handlers: {
      requestPayment: async (r) => {
        keys.push(r.idempotencyKey);
        seen.resolve();
        await release.promise;
        return {};
      },
    },
  });
  const launched = await host.launchApp(APP, '{"apiVersion":"v2"}');
  const renderer = new RendererClient(proxy.path, launched.launchToken);
  try {
    const payment = { timeStamp: '1700000000', nonceStr: 'n-lost', package: 'prepay_id=wxlost', signType: 'RSA', paySign: 'sig-lost' };
    const paid = renderer.call('requestPayment', payment);
    await within('the host to see the payment', seen.promise);
    // From now on the daemon's bytes to the renderer are lost; the first DATA frame is the answer.
    const answered = signal<void>();
    proxy.swallow = (type) => type === 0x0 && answered.resolve();
    release.resolve();
    await within('the daemon to send the answer', answered.promise);
    proxy.swallow = undefined;
    proxy.cut();
    // The renderer never got the answer: it retries on a new connection with the same key, and
    // the daemon answers from its record without asking the host again.
    assert.equal((await within('the retried payment', paid)).errMsg, 'requestPayment:ok');
    assert.equal(keys.length, 1, `the host saw the payment ${keys.length} times`);
    assert.match(keys[0], /^[0-9a-f]{32}$/);
    // A new logical payment gets a new key and does reach the host.
    assert.equal((await renderer.call('requestPayment', { ...payment, nonceStr: 'n-2', paySign: 'sig-2' })).errMsg, 'requestPayment:ok');
    assert.equal(keys.length, 2);
    assert.notEqual(keys[1], keys[0]);
  } finally {
    renderer.close();
    host.close();
    await proxy.close();
    await daemon.dispose();
  }
});
