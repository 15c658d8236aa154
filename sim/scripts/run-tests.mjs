#!/usr/bin/env node
// `npm test` (after the dist check): runs the browser tests with Node's test runner against the
// real daemon binary: $MINIAPP_BROKERD_BIN, else this repository's, built here with
// `cargo build -p miniapp-brokerd`. Chromium is $CHROMIUM_BIN or /usr/bin/chromium; without it
// the tests cannot run and this fails (scripts/test installs it, or reports the tests skipped).
// `--screenshots`: writes the README's screenshots (docs/img/) instead.
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const repo = path.resolve(root, '..');
const env = { ...process.env };
if (!env.MINIAPP_BROKERD_BIN) {
  try {
    execFileSync('cargo', ['build', '-q', '-p', 'miniapp-brokerd'], { cwd: repo, stdio: 'inherit' });
  } catch (e) {
    console.error(`sim tests: cannot build the daemon (cargo build -p miniapp-brokerd): ${e.message}`);
    process.exit(1);
  }
  env.MINIAPP_BROKERD_BIN = path.join(path.resolve(repo, env.CARGO_TARGET_DIR || 'target'), 'debug', 'miniapp-brokerd');
}
const chromium = env.CHROMIUM_BIN || '/usr/bin/chromium';
if (!fs.existsSync(chromium)) {
  console.error(`sim tests: no Chromium at ${chromium} (apt-get install chromium, or set CHROMIUM_BIN)`);
  process.exit(1);
}
const args = process.argv.includes('--screenshots')
  ? [path.join(root, 'scripts', 'screenshots.mjs')]
  : ['--test', '--test-concurrency=1', ...fs.readdirSync(path.join(root, 'test')).filter((f) => f.endsWith('.test.mjs')).map((f) => path.join(root, 'test', f))];
const run = spawnSync(process.execPath, args, { env, stdio: 'inherit' });
process.exit(run.status ?? 1);
