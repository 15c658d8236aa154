#!/usr/bin/env node
// `npm run screenshots`: the README's pictures of the simulator, taken with the real binary and
// headless Chromium (as the tests run them): a v3 scope prompt waiting in the panel, and a
// payment cancelled in the panel. Writes docs/img/dev-sim-*.png.
import fs from 'node:fs';
import path from 'node:path';
import { appFrame, call, root, start, startBrowser, startSim } from '../test/support.mjs';

const out = path.resolve(root, '..', 'docs', 'img');
fs.mkdirSync(out, { recursive: true });
const sim = await startSim(['--app-json', '{"apiVersion":"v3"}']);
const browser = await startBrowser();
try {
  const page = await browser.newPage({ viewport: { width: 1360, height: 900 } });
  await page.goto(sim.url);
  const frame = await appFrame(page, 1);
  await call(frame, 'login');
  await call(frame, 'checkSession');
  const phone = await start(frame, 'getPhoneNumber');
  await page.waitForSelector('.prompt[data-kind="scopes"]');
  await page.screenshot({ path: path.join(out, 'dev-sim-scope-prompt.png') });
  await page.click('.prompt[data-kind="scopes"] [data-action="allow"]');
  await phone.answer();
  const payment = await start(frame, 'requestPayment');
  await page.waitForSelector('.prompt[data-kind="payment"]');
  await page.click('.prompt[data-kind="payment"] [data-action="cancel"]');
  await payment.answer();
  await page.waitForFunction(() => document.querySelector('#calls tbody tr[data-api="requestPayment"]'));
  await page.waitForFunction(() => /phone/i.test(document.querySelector('#ledger tbody').textContent));
  await page.screenshot({ path: path.join(out, 'dev-sim-payment-cancelled.png') });
  console.log(`screenshots: wrote ${out}/dev-sim-scope-prompt.png, dev-sim-payment-cancelled.png`);
} finally {
  await browser.close();
  await sim.stop();
}
