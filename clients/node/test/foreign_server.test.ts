/**
 * A server of another uid on the daemon's address (a squatter) never gets a token: the host
 * refuses before Connect or an Admin call carries the host token, the renderer before a stream
 * or `Invoke` carries the launch token, both naming the uid, as the Rust client and the CLI do.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { test } from 'node:test';
import * as grpc from '@grpc/grpc-js';
import { ForeignServerError, HostClient, HostConnectError, RendererClient } from '../src/index';
import { rejection, tempDir, within } from './support';

const NOBODY = 65534;

/** The squatter's body: listens on argv[1], reports the bytes each connection sent, ends on "end". */
const SQUATTER = `
const net = require('node:net'), fs = require('node:fs');
const server = net.createServer((c) => {
  const got = [];
  c.on('data', (d) => got.push(d));
  c.on('end', () => {
    const all = Buffer.concat(got);
    if (all.toString() === 'end') { server.close(); return; }
    console.log('sent ' + all.length);
  });
});
server.listen(process.argv[1], () => { fs.chmodSync(process.argv[1], 0o777); console.log('ready'); });
`;

test('a host and a renderer refuse a server of another uid before sending a token', async () => {
  assert.equal(process.geteuid?.(), 0, 'running a server as another uid needs root; the suite runs as root');
  const dir = tempDir();
  fs.chmodSync(dir, 0o777);
  const socket = path.join(dir, 'brokerd.sock');
  const squatter = spawn(process.execPath, ['-e', SQUATTER, socket], { uid: NOBODY, gid: NOBODY, stdio: ['ignore', 'pipe', 'inherit'] });
  const lines: string[] = [];
  const ended = new Promise<void>((resolve) => squatter.on('exit', () => resolve()));
  const ready = new Promise<void>((resolve, reject) => {
    squatter.stdout!.setEncoding('utf8');
    squatter.stdout!.on('data', (chunk: string) => {
      lines.push(...chunk.split('\n').filter(Boolean));
      if (lines.includes('ready')) resolve();
    });
    squatter.on('exit', (code) => reject(new Error(`the squatter exited (${code}) before listening`)));
  });
  try {
    await within('the squatter listens', ready);
    assert.equal(fs.statSync(socket).uid, NOBODY);
    const expected = `the server at ${socket} runs as uid ${NOBODY}, not as this user (uid 0); refusing to send it anything`;

    // A host: Connect would carry the host token.
    const refused = await within('host connect', rejection(HostClient.connect({ address: socket, token: 'the-host-token', connectTimeoutMs: 3000 })));
    assert.ok(refused instanceof HostConnectError, String(refused));
    assert.equal(refused.message, expected);
    assert.equal(refused.code, grpc.status.PERMISSION_DENIED, 'not retried: the refusal is at once');

    // A renderer: its stream and Invoke would carry the launch token.
    const renderer = new RendererClient(socket, 'instance.launch-secret', { reconnectBudgetMs: 1000 });
    const streamed = await within('a streamed call', rejection(renderer.call('login', {})));
    assert.ok(streamed instanceof ForeignServerError, String(streamed));
    assert.equal(streamed.message, expected);
    const invoked = await within('Invoke', renderer.invoke('login', {}));
    assert.deepEqual(invoked, { ok: false, result: { errMsg: `login:fail ${expected}`, errno: 1005 } });
    renderer.close();

    // The squatter counts what reached it: only this test's own probe, then "end".
    await new Promise<void>((resolve) => net.connect(socket, function (this: net.Socket) { this.end('x', resolve); }));
    await new Promise<void>((resolve) => net.connect(socket, function (this: net.Socket) { this.end('end', resolve); }));
    await within('the squatter ends', ended);
    assert.deepEqual(lines, ['ready', 'sent 1'], 'no connection of the clients reached the other uid');
  } finally {
    squatter.kill();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
