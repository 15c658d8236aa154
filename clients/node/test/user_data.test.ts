/**
 * What a Node backend verifies of wx.getUserInfo / wx.getUserProfile, with node-easywechat
 * (unmodified, from npm) as the backend library: its MiniApp redeems the login code over the
 * daemon's backend HTTP API (`getUtils().codeToSession`) and decrypts `encryptedData` with the
 * session key (`getUtils().decryptSession`, its `Decryptor`); the signature is checked as WeChat
 * documents it, `sha1(rawData + session_key)`. The answers come through the Node client's typed
 * stream calls (`RendererClient.call`) and its `wx` facade (`invoke`, the JSON bridge).
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import { after, before, test } from 'node:test';
import { MiniApp } from 'node-easywechat';
import { createWx, HostClient, RendererClient, type WxResult } from '../src/index';
import { Daemon, tempDir, within } from './support';

const APP = 'wxnodeuserdata001';
const USER_INFO = { nickName: 'Grace', avatarUrl: 'https://example.invalid/grace.png', gender: 2, country: 'US', province: 'NY', city: 'New York', language: 'en' };

let daemon: Daemon;
let host: HostClient;
let renderer: RendererClient;
let backend: MiniApp;
let cacheDir: string;

/** The backend HTTP API's base URL, from the line the daemon logs when it binds it. */
async function backendUrl(d: Daemon): Promise<string> {
  const found = /backend HTTP API at (http:\/\/127\.0\.0\.1:\d+)/.exec(d.log);
  assert.ok(found, `the daemon did not log its backend address:\n${d.log}`);
  return found[1];
}

before(async () => {
  daemon = await Daemon.start({ args: ['--backend-listen', '127.0.0.1:0'] });
  host = await HostClient.connect({
    address: daemon.socket,
    tokenFile: daemon.tokenFile,
    name: 'node-user-data-host',
    user: { uid: 'user-grace', profile: { nickName: 'Grace', avatarUrl: '', phoneNumber: '', email: '' } },
    handlers: {
      // The host answers userInfo; it cannot sign it (the session key is the platform's).
      getUserInfo: async () => ({ userInfo: USER_INFO, rawData: 'made up by the host' }),
      getUserProfile: async () => ({ userInfo: USER_INFO }),
    },
  });
  const { secret } = await host.registerApp(APP);
  const launched = await host.launchApp(APP, JSON.stringify({ apiVersion: 'v2' }));
  renderer = await RendererClient.connect(daemon.socket, launched.launchToken);
  cacheDir = tempDir('miniapp-node-easywechat-');
  backend = new MiniApp({
    app_id: APP,
    secret,
    http: { baseURL: `${await backendUrl(daemon)}/` },
    file_cache: { path: cacheDir, dirMode: 0o700, fileMode: 0o600, ext: '.cache' },
  });
});

after(async () => {
  renderer?.close();
  host?.close();
  await daemon?.dispose();
  if (cacheDir) fs.rmSync(cacheDir, { recursive: true, force: true });
});

interface Credentials {
  rawData: string;
  signature: string;
  encryptedData: string;
  iv: string;
}

/** Checks one answer as a backend does: the signature, then node-easywechat's decryption. */
function verify(surface: string, answer: Credentials, session: Record<string, any>): Record<string, any> {
  const expected = createHash('sha1').update(answer.rawData + session.session_key).digest('hex');
  assert.equal(answer.signature, expected, `${surface}: signature`);
  const data = backend.getUtils().decryptSession(session.session_key, answer.iv, answer.encryptedData);
  assert.equal(data.openId, session.openid, `${surface}: openId`);
  assert.equal(data.watermark.appid, APP, `${surface}: watermark appid`);
  assert.equal(typeof data.watermark.timestamp, 'number', `${surface}: watermark timestamp`);
  assert.deepEqual(JSON.parse(answer.rawData), USER_INFO, `${surface}: rawData is the userInfo`);
  for (const [field, value] of Object.entries(USER_INFO)) assert.equal(data[field], value, `${surface}: ${field}`);
  return data;
}

test('node-easywechat decrypts and verifies the profile answers of the stream and the wx facade', async () => {
  const login = await within('login', renderer.call('login', {}));
  const session = await within('codeToSession', backend.getUtils().codeToSession(login.code));
  assert.match(session.session_key, /^[A-Za-z0-9+/]{22}==$/, 'standard base64 of 16 bytes');
  assert.equal(Buffer.from(session.session_key, 'base64').length, 16);

  const wx = createWx(renderer);
  const answers: [string, Credentials][] = [
    ['stream getUserProfile', await within('stream profile', renderer.call('getUserProfile', { desc: 'show your name' }))],
    ['stream getUserInfo', await within('stream info', renderer.call('getUserInfo', { withCredentials: true }))],
    ['wx.getUserProfile', (await within('wx profile', wx.getUserProfile({ desc: 'show your name' }))) as unknown as Credentials],
    ['wx.getUserInfo', (await within('wx info', wx.getUserInfo({ withCredentials: true }))) as unknown as Credentials],
  ];
  const ivs = new Set<string>();
  for (const [surface, answer] of answers) {
    verify(surface, answer, session);
    ivs.add(answer.iv);
  }
  assert.equal(ivs.size, answers.length, 'a fresh IV for every answer');

  // A wrong key cannot read it.
  const [, first] = answers[0];
  const otherKey = Buffer.alloc(16, 7).toString('base64');
  assert.throws(() => backend.getUtils().decryptSession(otherKey, first.iv, first.encryptedData), /Fail to decrypt/);
});

test('wx.getUserInfo without withCredentials answers userInfo only', async () => {
  const wx = createWx(renderer);
  const answer: WxResult = await within('wx info', wx.getUserInfo({ withCredentials: false }));
  assert.deepEqual(answer, { errMsg: 'getUserInfo:ok', userInfo: USER_INFO });
  const typed = await within('stream info', renderer.call('getUserInfo', { withCredentials: false }));
  assert.deepEqual([typed.rawData, typed.signature, typed.encryptedData, typed.iv], ['', '', '', '']);
});
