/**
 * The wx facade's own rules, over a recording invoker (no daemon needed): which callbacks run and
 * when, what the promise form does, what crosses to `invoke`, and that `miniapp-broker/wx` loads
 * without gRPC (so a sandboxed preload can bundle it).
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import * as path from 'node:path';
import { test } from 'node:test';
import { createWx, type WxInvokeResult, type WxResult } from '../src/wx';
import { signal, within } from './support';

function invoker(answer: (api: string, params: Record<string, unknown>) => Promise<WxInvokeResult>) {
  const calls: [string, Record<string, unknown>][] = [];
  return {
    calls,
    invoke(api: string, params: Record<string, unknown>) {
      calls.push([api, params]);
      return answer(api, params);
    },
  };
}

test('callback form: success then complete with the same object; callbacks never cross to invoke', async () => {
  const ok = { errMsg: 'login:ok', code: 'c1' };
  const inv = invoker(async () => ({ ok: true, result: ok }));
  const order: string[] = [];
  const done = signal<WxResult>();
  const returned = createWx(inv).login({
    timeout: 500,
    success: (r) => order.push(`success ${r.errMsg}`),
    fail: () => order.push('fail'),
    complete: (r) => (order.push('complete'), done.resolve(r)),
  });
  assert.equal(returned, undefined);
  assert.equal(await within('complete', done.promise), ok);
  assert.deepEqual(order, ['success login:ok', 'complete']);
  assert.deepEqual(inv.calls, [['login', { timeout: 500 }]]);
});

test('callback form: fail then complete; promise form rejects with the fail object', async () => {
  const failure = { errMsg: 'requestPayment:fail cancel', errno: 1 };
  const inv = invoker(async () => ({ ok: false, result: failure }));
  const order: string[] = [];
  const done = signal<void>();
  createWx(inv).requestPayment({ fail: (r) => order.push(r.errMsg), complete: () => done.resolve() });
  await within('complete', done.promise);
  assert.deepEqual(order, ['requestPayment:fail cancel']);
  await assert.rejects(createWx(inv).requestPayment({}), (e) => e === failure);
});

test('an invoker that throws becomes a fail object, never an exception', async () => {
  const inv = invoker(async () => {
    throw new Error('bridge gone');
  });
  await assert.rejects(createWx(inv).getEmail(), (e: WxResult) => e.errMsg === 'getEmail:fail Error: bridge gone' && e.errno === 1005);
});

test('miniapp-broker/wx loads without gRPC', () => {
  const root = path.resolve(__dirname, '..', '..');
  const script = "require('miniapp-broker/wx'); console.log(Object.keys(require.cache).filter((k) => k.includes('node_modules')).length)";
  assert.equal(execFileSync(process.execPath, ['-e', script], { cwd: root, encoding: 'utf8' }).trim(), '0');
});
