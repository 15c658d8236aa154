// The simulator end to end in a real browser: Debian's Chromium driven by playwright-core, the
// real dev-sim binary with its own in-memory daemon, the real backend HTTP API. The steps share
// one simulator and one page, in order (node:test runs a file's tests one after another). Each
// failure leaves a screenshot in sim/test-results/.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { appFrame, call, relaunch, root, start, startBrowser, startSim, switchUser } from './support.mjs';

let sim;
let browser;
let page;
let frame;

before(async () => {
  sim = await startSim(['--app-json', '{"apiVersion":"v2"}']);
  browser = await startBrowser();
  page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
  await page.goto(sim.url);
  frame = await appFrame(page, 1);
});

after(async () => {
  await browser?.close();
  await sim?.stop();
});

/** A test step that leaves a screenshot of the page when it fails. */
function step(name, fn) {
  test(name, async () => {
    try {
      await fn();
    } catch (e) {
      const dir = path.join(root, 'test-results');
      fs.mkdirSync(dir, { recursive: true });
      const file = path.join(dir, `${name.replace(/[^a-z0-9]+/gi, '-').slice(0, 80)}.png`);
      await page?.screenshot({ path: file, fullPage: true }).catch(() => {});
      e.message += `\n(screenshot: ${file})\n--- dev-sim output ---\n${sim?.output()}`;
      throw e;
    }
  });
}

/** The call log's rows for `api`, newest first: [route, version, answer text]. */
async function logRows(api) {
  return page.$$eval(`#calls tbody tr[data-api="${api}"]`, (rows) =>
    rows.map((r) => ({ route: r.dataset.route, version: r.dataset.version, text: r.textContent })),
  );
}

async function waitForLog(api, count) {
  await page.waitForFunction(
    ([a, n]) => document.querySelectorAll(`#calls tbody tr[data-api="${a}"]`).length >= n,
    [api, count],
  );
  return logRows(api);
}

step('the sample app logs in with v2 (login:ok) and a backend redeems the code over HTTP', async () => {
  const { kind, result } = await call(frame, 'login');
  assert.equal(kind, 'success');
  assert.equal(result.errMsg, 'login:ok');
  assert.match(result.code, /\S{16,}/);
  assert.ok(sim.secret, 'dev-sim printed the app secret');
  const url = new URL('/sns/jscode2session', sim.backend);
  for (const [k, v] of Object.entries({ appid: sim.appId, secret: sim.secret, js_code: result.code, grant_type: 'authorization_code' })) {
    url.searchParams.set(k, v);
  }
  const session = await (await fetch(url)).json();
  assert.ok(session.openid, `jscode2session answered ${JSON.stringify(session)}`);
  assert.ok(session.session_key);
  const again = await (await fetch(url)).json();
  assert.ok(again.errcode, 'a code is single use');
  const [row] = await waitForLog('login', 1);
  assert.equal(row.route, 'default');
  assert.equal(row.version, 'v2');
});

step('a user switch in the panel makes checkSession fail in the page', async () => {
  assert.equal((await call(frame, 'checkSession')).result.errMsg, 'checkSession:ok');
  await switchUser(page, 'bob');
  const { kind, result } = await call(frame, 'checkSession');
  assert.equal(kind, 'fail');
  assert.match(result.errMsg, /^checkSession:fail /);
});

step('v3 getPhoneNumber asks in the panel; "Allow" answers a code', async () => {
  frame = await relaunch(page, 'v3');
  const pending = await start(frame, 'getPhoneNumber');
  const prompt = await page.waitForSelector('.prompt[data-kind="scopes"]');
  assert.match(await prompt.textContent(), /SCOPE_PHONE_NUMBER/);
  await page.click('.prompt[data-kind="scopes"] [data-action="allow"]');
  const { kind, result } = await pending.answer();
  assert.equal(kind, 'success', JSON.stringify(result));
  assert.equal(result.errMsg, 'getPhoneNumber:ok');
  assert.ok(result.code);
  const [row] = await waitForLog('getPhoneNumber', 1);
  assert.equal(row.version, 'v3');
  assert.match(row.text, /getAuthCode/);
  // The consent settings and the ledger of this app and user, live.
  await page.waitForFunction(() => /SCOPE_PHONE_NUMBER\s*granted/.test(document.querySelector('#settings').textContent));
  await page.waitForFunction(() => /phone/i.test(document.querySelector('#ledger tbody').textContent));
});

step('v3 getPhoneNumber refused in the panel; the next call fails auth deny without a prompt', async () => {
  await switchUser(page, 'ada');
  const pending = await start(frame, 'getPhoneNumber');
  await page.waitForSelector('.prompt[data-kind="scopes"]');
  await page.click('.prompt[data-kind="scopes"] [data-action="refuse"]');
  const first = await pending.answer();
  assert.equal(first.kind, 'fail');
  assert.match(first.result.errMsg, /^getPhoneNumber:fail /);
  await page.waitForFunction(() => /SCOPE_PHONE_NUMBER\s*refused/.test(document.querySelector('#settings').textContent));
  // No one clicks now: an answer can only come without a prompt.
  const second = await call(frame, 'getPhoneNumber');
  assert.equal(second.result.errMsg, 'getPhoneNumber:fail auth deny');
  assert.equal(await page.$$eval('.prompt', (p) => p.length), 0);
  const [latest] = await waitForLog('getPhoneNumber', 3);
  assert.match(latest.text, /auth deny/);
  assert.doesNotMatch(latest.text, /getAuthCode/, 'the host was not asked again');
});

step('a payment cancelled in the panel gives the page requestPayment:fail cancel', async () => {
  const pending = await start(frame, 'requestPayment');
  await page.waitForSelector('.prompt[data-kind="payment"]');
  await page.click('.prompt[data-kind="payment"] [data-action="cancel"]');
  const { kind, result } = await pending.answer();
  assert.equal(kind, 'fail');
  assert.equal(result.errMsg, 'requestPayment:fail cancel');
  const [row] = await waitForLog('requestPayment', 1);
  assert.equal(row.route, 'host');
});

step('the call log shows each call with its version, route and answer', async () => {
  const expected = { login: 1, checkSession: 2, getPhoneNumber: 3, requestPayment: 1 };
  for (const [api, n] of Object.entries(expected)) {
    const rows = await logRows(api);
    assert.equal(rows.length, n, `${api}: ${JSON.stringify(rows)}`);
    for (const r of rows) {
      assert.match(r.version, /^v[123]$/);
      assert.match(r.route, /^(default|host)$/);
      assert.match(r.text, new RegExp(`${api}:(ok|fail)`));
    }
  }
});

step('another site in the same browser cannot drive the simulator', async () => {
  // A page of another origin posts to the simulator's API as a forged form would (no-cors:
  // the browser sends it and hides the answer), then tries to read its state.
  const evil = http.createServer((req, res) => {
    res.writeHead(200, { 'content-type': 'text/html' });
    res.end(`<!doctype html><script>
      const sim = ${JSON.stringify(sim.url)};
      Promise.allSettled([
        fetch(sim + 'api/user', { method: 'POST', mode: 'no-cors', headers: { 'content-type': 'text/plain' }, body: '{"uid":""}' }),
        fetch(sim + 'api/state', { method: 'POST', body: '{}' }).then((r) => r.text()),
      ]).then((r) => { document.title = r.map((x) => x.status).join(','); });
    </script>`);
  });
  await new Promise((r) => evil.listen(0, '127.0.0.1', r));
  try {
    const other = await browser.newPage();
    await other.goto(`http://127.0.0.1:${evil.address().port}/`);
    await other.waitForFunction(() => document.title.includes(','));
    // Neither answer reaches the other site (CORS, and the panel's Cross-Origin-Resource-Policy).
    assert.equal(await other.title(), 'rejected,rejected');
    await other.close();
  } finally {
    evil.close();
  }
  // Both requests reached the simulator and it refused them for their Origin.
  const refusals = sim.output().split('\n').filter((l) => l.includes('request refused') && l.includes('Origin'));
  assert.ok(refusals.some((l) => l.includes('/api/user')), sim.output());
  assert.ok(refusals.some((l) => l.includes('/api/state')), sim.output());
  // Ada is still signed in: the forged sign-out changed nothing.
  const state = await page.evaluate(async () => (await fetch('/api/state', { method: 'POST', body: '{}' })).json());
  assert.equal(state.user?.uid, 'ada');
  // The server itself refuses another Origin, and the app frame's (opaque "null") one.
  for (const origin of ['http://evil.example', 'null']) {
    const r = await fetch(new URL('api/user', sim.url), { method: 'POST', headers: { origin }, body: '{"uid":""}' });
    assert.equal(r.status, 403, origin);
  }
  // The mini app's own scripts cannot reach the API (CSP connect-src 'none', and Origin null).
  const fromApp = await frame.evaluate(() =>
    fetch('/api/state', { method: 'POST', body: '{}' }).then(() => 'reached', (e) => 'blocked: ' + e),
  );
  assert.match(fromApp, /^blocked/);
});
