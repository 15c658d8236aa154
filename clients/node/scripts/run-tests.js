#!/usr/bin/env node
// `npm test`: runs the compiled tests (dist/test/*.test.js) with Node's built-in runner against
// the real daemon. The daemon binary is $MINIAPP_BROKERD_BIN, else this repository's, built once
// here with `cargo build -p miniapp-brokerd` so every test file uses the same fresh binary.
'use strict';
const { execFileSync, spawnSync } = require('node:child_process');
const fs = require('node:fs');
const path = require('node:path');

const root = path.resolve(__dirname, '..');
const repo = path.resolve(root, '..', '..');
const env = { ...process.env };
if (!env.MINIAPP_BROKERD_BIN) {
  try {
    execFileSync('cargo', ['build', '-q', '-p', 'miniapp-brokerd'], { cwd: repo, stdio: 'inherit' });
  } catch (e) {
    console.error(`npm test: cannot build the daemon (cargo build -p miniapp-brokerd): ${e.message}`);
    console.error('npm test: set MINIAPP_BROKERD_BIN to a miniapp-brokerd binary instead');
    process.exit(1);
  }
  const target = path.resolve(repo, env.CARGO_TARGET_DIR || 'target');
  env.MINIAPP_BROKERD_BIN = path.join(target, 'debug', process.platform === 'win32' ? 'miniapp-brokerd.exe' : 'miniapp-brokerd');
}
if (!fs.existsSync(env.MINIAPP_BROKERD_BIN)) {
  console.error(`npm test: no daemon binary at ${env.MINIAPP_BROKERD_BIN}`);
  process.exit(1);
}
const dir = path.join(root, 'dist', 'test');
const files = fs.readdirSync(dir).filter((f) => f.endsWith('.test.js')).sort().map((f) => path.join(dir, f));
const run = spawnSync(process.execPath, ['--test', ...process.argv.slice(2), ...files], { env, stdio: 'inherit' });
process.exit(run.status ?? 1);
