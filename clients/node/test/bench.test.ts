/**
 * A smoke run of `npm run bench` (bench/bench.ts) against the test daemon, so that the benchmark
 * cannot rot: tiny sample counts and windows, 4 clients for the many-clients point, and no
 * thresholds, only that every figure is measured (finite; positive where it cannot be otherwise)
 * and the summary carries the keys the issue names.
 */
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { test } from 'node:test';
import { KINDS, runBench } from '../bench/bench';
import { daemonBinary, tempDir } from './support';

test('the benchmark runs end to end and measures every figure (smoke: tiny counts, no thresholds)', async () => {
  const dir = tempDir('miniapp-node-bench-smoke-');
  const out = path.join(dir, 'summary.json');
  try {
    const summary = await runBench({ daemon: daemonBinary(), samples: 60, rounds: 2, warmup: 10, windowMs: 200, clients: 4, out });
    const expected = ['mediated_stream_p50_ratio', 'wx_overhead_pct', 'mediated_unary_p50_ratio', 'daemon_stream_p50_ratio', 'wx_invoke_overhead_pct', 'mediated_stream_throughput_ratio_4'];
    for (const kind of KINDS) {
      for (const suffix of ['p50_us', 'p99_us', 'throughput_1', 'p50_us_4', 'p99_us_4', 'throughput_4']) expected.push(`${kind}_${suffix}`);
    }
    assert.deepEqual(Object.keys(summary.figures).sort(), [...expected].sort());
    for (const [key, value] of Object.entries(summary.figures)) {
      assert.ok(Number.isFinite(value), `${key} = ${value}`);
      // The overheads are differences of two medians: noise can make them negative.
      if (!key.endsWith('_pct')) assert.ok(value > 0, `${key} = ${value}`);
    }
    const written = JSON.parse(fs.readFileSync(out, 'utf8'));
    assert.deepEqual(written.figures, summary.figures);
    assert.equal(typeof written.targets_met, 'boolean');
    assert.deepEqual(Object.keys(written.targets).sort(), ['mediated_stream_p50_ratio', 'wx_overhead_pct']);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
