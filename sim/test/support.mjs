// Shared by the browser tests and the screenshot script: starts `miniapp-brokerd dev-sim` (its
// own in-memory daemon, on free ports) and a headless Chromium driven by playwright-core.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

export const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

/** A profile with two users to switch between. */
export const PROFILE = `name = "dev-sim-test"
[user]
uid = "ada"
nick_name = "Ada"
phone_number = "+86 138 0000 0001"
email = "ada@example.invalid"

[[users]]
uid = "bob"
nick_name = "Bob"
phone_number = "+86 138 0000 0002"
email = "bob@example.invalid"
`;

/** Starts dev-sim with `args`; resolves once it printed its URL. */
export async function startSim(args = []) {
  const bin = process.env.MINIAPP_BROKERD_BIN;
  if (!bin) throw new Error('MINIAPP_BROKERD_BIN is not set (npm test sets it)');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dev-sim-test-'));
  const profile = path.join(dir, 'profile.toml');
  fs.writeFileSync(profile, PROFILE);
  const child = spawn(
    bin,
    ['dev-sim', '--listen', '127.0.0.1:0', '--backend-listen', '127.0.0.1:0', '--socket', path.join(dir, 'none.sock'),
      '--profile', profile, ...args],
    // Warnings on: the tests read the simulator's refusals in its output.
    { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, RUST_LOG: 'miniapp_brokerd=warn' } },
  );
  let output = '';
  const seen = new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`dev-sim printed no URL within 30 s:\n${output}`)), 30_000);
    const onData = (chunk) => {
      output += chunk;
      const url = /open (http:\/\/127\.0\.0\.1:\d+\/)/.exec(output);
      if (url) {
        clearTimeout(timer);
        resolve(url[1]);
      }
    };
    child.stdout.on('data', onData);
    child.stderr.on('data', (c) => (output += c));
    child.on('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`dev-sim exited (${code}) before printing its URL:\n${output}`));
    });
  });
  const url = await seen;
  const backend = /backend HTTP API at (http:\/\/[\d.:]+)/.exec(output)?.[1];
  const secret = /app secret for (\S+) \(shown once\): (\S+)/.exec(output);
  return {
    url,
    backend,
    appId: secret?.[1],
    secret: secret?.[2],
    output: () => output,
    async stop() {
      if (child.exitCode === null) {
        const exited = new Promise((r) => child.once('exit', r));
        child.kill('SIGTERM');
        await exited;
      }
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** A headless Chromium (Debian's, at $CHROMIUM_BIN or /usr/bin/chromium). */
export async function startBrowser() {
  const executablePath = process.env.CHROMIUM_BIN || '/usr/bin/chromium';
  const args = ['--disable-background-networking', '--disable-dev-shm-usage'];
  if (process.getuid?.() === 0) args.push('--no-sandbox');
  return chromium.launch({ executablePath, headless: true, args });
}

/** The mini app's frame of launch `generation`, once its page loaded. */
export async function appFrame(page, generation) {
  const deadline = Date.now() + 15_000;
  for (;;) {
    const frame = page.frames().find((f) => f.url().includes(`/app/index.html?launch=${generation}`));
    if (frame) {
      await frame.waitForSelector('#call-login');
      return frame;
    }
    if (Date.now() > deadline) throw new Error(`no app frame for launch ${generation}`);
    await page.waitForEvent('framenavigated', { timeout: 15_000 }).catch(() => {});
  }
}

/** The launch generation the panel shows now. */
export async function generation(page) {
  return page.evaluate(() => Number(new URL(document.getElementById('app').src).searchParams.get('launch')));
}

/** Clicks the sample app's button for `api` and waits for its answer; the result object. */
export async function call(frame, api) {
  await frame.click(`#call-${api}`);
  const out = await frame.waitForSelector(`#result-${api}.success, #result-${api}.fail`);
  return { kind: await out.getAttribute('class'), result: JSON.parse(await out.getAttribute('data-result')) };
}

/** Clicks `#call-<api>` without waiting for the answer (a prompt will hold it). */
export async function start(frame, api) {
  await frame.click(`#call-${api}`);
  return {
    async answer() {
      const out = await frame.waitForSelector(`#result-${api}.success, #result-${api}.fail`);
      return { kind: await out.getAttribute('class'), result: JSON.parse(await out.getAttribute('data-result')) };
    },
  };
}

/** Picks `version` in the panel and waits for the relaunched app's frame. */
export async function relaunch(page, version) {
  const before = await generation(page);
  await page.selectOption('#version', version);
  await page.waitForFunction((g) => Number(new URL(document.getElementById('app').src).searchParams.get('launch')) > g, before);
  const frame = await appFrame(page, await generation(page));
  await page.waitForFunction((v) => document.getElementById('app-line').textContent.includes(` ${v} `), version);
  return frame;
}

/** Signs `uid` in from the panel ('' signs out) and waits for the panel to show it. */
export async function switchUser(page, uid) {
  await page.selectOption('#user', uid);
  await page.waitForFunction(async (u) => {
    const r = await fetch('/api/state', { method: 'POST', body: '{}' });
    const s = await r.json();
    return (s.user?.uid ?? '') === u;
  }, uid);
}
