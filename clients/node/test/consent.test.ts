/**
 * The consent APIs from Node: wx.getSetting, wx.authorize (asked through the host's getAuthCode),
 * wx.openSetting (the host's settings page), and the host's own SetDecision with the ConsentChanged
 * events it gets back, through the real daemon.
 */
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { after, before, test } from 'node:test';
import { createWx, HostClient, RendererClient, type ConsentChanged, type Wx } from '../src/index';
import { Daemon, rejection, until, within } from './support';

const APP = 'wxnode00000000004';

let daemon: Daemon;
let host: HostClient;
const asked: string[] = [];
let settingsPage: { authSetting: Record<string, boolean>; uid: string } | undefined;

before(async () => {
  daemon = await Daemon.start();
  host = await HostClient.connect({
    address: daemon.socket,
    tokenFile: daemon.tokenFile,
    user: { uid: 'user-c', profile: { nickName: 'Cy', avatarUrl: 'https://example.invalid/cy.png' } },
    handlers: {
      getAuthCode: (req) => {
        asked.push(`${req.api}:${req.scopes.join('+')}`);
        // The user refuses the nickname when asked, unless already granted (on the settings page).
        const refused = req.scopes.filter((s) => s === 'SCOPE_NICKNAME' && !req.previouslyGranted.includes(s));
        return {
          authCode: 'auth',
          authSuccessScopes: req.scopes.filter((s) => !refused.includes(s)),
          authErrorScopes: Object.fromEntries(refused.map((s) => [s, 'user refused'])),
        };
      },
      // The settings page: the user turns the nickname on.
      openSetting: (req) => {
        settingsPage = { authSetting: { ...req.authSetting }, uid: req.uid };
        return { authSetting: { SCOPE_NICKNAME: true } };
      },
    },
  });
});

after(async () => {
  host?.close();
  await daemon?.dispose();
});

async function v3(): Promise<{ renderer: RendererClient; wx: Wx }> {
  const launched = await host.launchApp(APP, '{"apiVersion":"v3"}');
  const renderer = new RendererClient(daemon.socket, launched.launchToken);
  return { renderer, wx: createWx(renderer) };
}

test('authorize asks the host once, getSetting reports it, a refusal is remembered, openSetting changes it', async () => {
  const { renderer, wx } = await v3();
  try {
    assert.deepEqual(await wx.getSetting(), { errMsg: 'getSetting:ok', authSetting: {} });

    const granted = once(host, 'consent') as Promise<[ConsentChanged]>;
    assert.deepEqual(await wx.authorize({ scope: 'SCOPE_PHONE_NUMBER' }), { errMsg: 'authorize:ok' });
    const [event] = await within('ConsentChanged for the grant', granted);
    assert.deepEqual(
      { appId: event.appId, uid: event.uid, scope: event.scope, decision: event.decision, source: event.source },
      { appId: APP, uid: 'user-c', scope: 'SCOPE_PHONE_NUMBER', decision: 'DECISION_GRANTED', source: 'DECISION_SOURCE_AUTHORIZE' },
    );
    assert.deepEqual(asked, ['authorize:SCOPE_PHONE_NUMBER']);
    // Decided: a second authorize answers without asking.
    assert.deepEqual(await wx.authorize({ scope: 'SCOPE_PHONE_NUMBER' }), { errMsg: 'authorize:ok' });
    assert.equal(asked.length, 1);

    const refused = await rejection(wx.authorize({ scope: 'SCOPE_NICKNAME' }));
    assert.match(refused.errMsg, /^authorize:fail /);
    // The refusal is remembered: getNickName fails at once with "auth deny", without asking.
    asked.length = 0;
    assert.deepEqual(await rejection(wx.getNickName()), { errMsg: 'getNickName:fail auth deny', errno: 1017 });
    assert.deepEqual(asked, []);
    assert.deepEqual(await wx.getSetting(), {
      errMsg: 'getSetting:ok',
      authSetting: { SCOPE_PHONE_NUMBER: true, SCOPE_NICKNAME: false, 'scope.userInfo': false },
    });

    // The host's settings page sees the current decisions and the user; its answer is recorded.
    const opened = await wx.openSetting();
    assert.equal(opened.errMsg, 'openSetting:ok');
    assert.deepEqual(settingsPage, { authSetting: { SCOPE_PHONE_NUMBER: true, SCOPE_NICKNAME: false, 'scope.userInfo': false }, uid: 'user-c' });
    assert.equal((opened.authSetting as Record<string, boolean>).SCOPE_NICKNAME, true);
    assert.deepEqual(await wx.getNickName(), { errMsg: 'getNickName:ok', nickName: 'Cy' });

    // On the typed stream the same APIs answer the same.
    const setting = await renderer.call('getSetting');
    assert.equal(setting.errMsg, 'getSetting:ok');
    assert.equal(setting.authSetting.SCOPE_NICKNAME, true);
  } finally {
    renderer.close();
  }
});

test("the host's own SetDecision changes what the app gets, and comes back as a ConsentChanged", async () => {
  const { renderer, wx } = await v3();
  try {
    assert.deepEqual(await wx.authorize({ scope: 'SCOPE_EMAIL' }), { errMsg: 'authorize:ok' });
    const changed = new Promise<ConsentChanged>((resolve) => {
      const listener = (c: ConsentChanged) => {
        if (c.scope !== 'SCOPE_EMAIL' || c.source !== 'DECISION_SOURCE_HOST') return;
        host.off('consent', listener);
        resolve(c);
      };
      host.on('consent', listener);
    });
    host.setDecision({ appId: APP, scope: 'SCOPE_EMAIL', decision: 'DECISION_REFUSED' });
    const event = await within('ConsentChanged for SetDecision', changed);
    assert.equal(event.decision, 'DECISION_REFUSED');
    assert.deepEqual(await rejection(wx.getEmail()), { errMsg: 'getEmail:fail auth deny', errno: 1017 });

    // An unknown scope is refused with a notice and changes nothing.
    const notice = once(host, 'notice');
    host.setDecision({ appId: APP, scope: 'SCOPE_NOPE', decision: 'DECISION_GRANTED' });
    await within('the notice', notice);
    const setting = await until('getSetting', async () => (await wx.getSetting()).authSetting as Record<string, boolean>);
    assert.equal(setting.SCOPE_NOPE, undefined);
    assert.equal(setting.SCOPE_EMAIL, false);
  } finally {
    renderer.close();
  }
});
