#!/usr/bin/env node
// Builds the simulator's two scripts from their TypeScript sources, offline, with esbuild:
//   src/panel.ts  -> dist/panel.js   (the host panel, an ES module)
//   src/bridge.ts -> dist/bridge.js  (the mini app frame's wx: clients/node/src/wx.ts's createWx)
// after type-checking them with tsc. The daemon embeds dist/ (and src/*.html, src/*.css,
// sample/) with include_bytes!, so dist/ is committed: `cargo build` needs no Node.
// `--check` builds in memory and fails if dist/ differs (a source changed, dist/ was not rebuilt).
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { createRequire } from 'node:module';
import * as esbuild from 'esbuild';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const check = process.argv.includes('--check');
const require = createRequire(import.meta.url);

try {
  execFileSync(process.execPath, [require.resolve('typescript/bin/tsc'), '-p', root], { stdio: 'inherit' });
} catch {
  console.error('sim build: tsc failed');
  process.exit(1);
}

const banner = '// Built by sim/scripts/build.mjs from sim/src (npm run build in sim/); do not edit.';
const outputs = [
  { entry: 'src/panel.ts', out: 'dist/panel.js', format: 'esm' },
  { entry: 'src/bridge.ts', out: 'dist/bridge.js', format: 'iife' },
];
let stale = [];
for (const { entry, out, format } of outputs) {
  const result = await esbuild.build({
    absWorkingDir: root,
    entryPoints: [entry],
    bundle: true,
    format,
    target: 'es2020',
    charset: 'utf8',
    legalComments: 'none',
    banner: { js: banner },
    write: false,
    logLevel: 'warning',
  });
  const text = result.outputFiles[0].text;
  const file = path.join(root, out);
  if (check) {
    const current = fs.existsSync(file) ? fs.readFileSync(file, 'utf8') : '';
    if (current !== text) stale.push(out);
  } else {
    fs.mkdirSync(path.dirname(file), { recursive: true });
    fs.writeFileSync(file, text);
  }
}
if (stale.length) {
  console.error(`sim check: ${stale.join(', ')} no longer match their sources (src/, clients/node/src/wx.ts).`);
  console.error('sim check: run `npm run build` in sim/ and commit sim/dist/.');
  process.exit(1);
}
console.log(check ? 'sim check: dist/ matches its sources' : 'sim build: wrote dist/panel.js, dist/bridge.js');
