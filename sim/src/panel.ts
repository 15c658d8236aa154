/**
 * The host panel: the superapp's side of the simulator. It holds the launch token (the mini app
 * frame never sees it), forwards the frame's `wx` calls to the simulator's server, and shows
 * what the server reports: the signed-in user, the prompts waiting for a click, the call log,
 * the consent settings and the disclosure ledger. Plain DOM, no framework: a handful of lists
 * re-rendered from one state object.
 */

interface Launch {
  appId: string;
  instanceId: string;
  launchToken: string;
  apiVersion: string;
  versionSource: string;
  appJson: string;
  generation: number;
}

interface UserView { uid: string; nickName: string }

interface Prompt {
  id: number;
  kind: 'scopes' | 'payment' | 'setting';
  api?: string;
  app: { appId: string; apiVersion: string };
  scopes?: string[];
  previouslyGranted?: string[];
  authSetting?: Record<string, boolean>;
}

interface LogEntry {
  id: number;
  api: string;
  version: string;
  route: 'default' | 'host';
  asked: string[];
  params: unknown;
  ok: boolean;
  answer: { errMsg?: string } & Record<string, unknown>;
  latencyMs: number;
}

interface State {
  version: number;
  app: Launch;
  appSource: string;
  user: UserView | null;
  users: UserView[];
  prompts: Prompt[];
  log: LogEntry[];
  settings: { scope: string; decision: string }[];
  ledger: { what: string; surface: string; api: string; atMs: number; viaCode: boolean; redeemedAtMs: number; redeemedVia: string }[];
  backendHttp: string | null;
}

const $ = <T extends HTMLElement>(id: string): T => document.getElementById(id) as T;

/** An element with attributes and children (text is always text, never HTML). */
function h(tag: string, attrs: Record<string, string> = {}, ...children: (Node | string)[]): HTMLElement {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  for (const c of children) el.append(c);
  return el;
}

async function api<T = unknown>(path: string, body: unknown): Promise<T> {
  const response = await fetch(path, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify(body),
  });
  const text = await response.text();
  if (!response.ok) throw new Error(`${path}: ${response.status} ${text}`);
  return JSON.parse(text) as T;
}

let state: State | null = null;
let shownGeneration = 0;

// ---- the bridge: the frame's calls, with the token only this frame holds ----

const frame = $<HTMLIFrameElement>('app');

window.addEventListener('message', (event: MessageEvent) => {
  // The sandboxed frame has an opaque origin ("null"); it must be our own frame.
  if (event.source !== frame.contentWindow || event.origin !== 'null' || !state) return;
  const m = event.data as { type?: unknown; id?: unknown; api?: unknown; params?: unknown } | null;
  if (!m || m.type !== 'wx-invoke' || typeof m.id !== 'number' || typeof m.api !== 'string') return;
  const params = m.params && typeof m.params === 'object' ? m.params : {};
  const source = event.source as Window;
  const generation = shownGeneration;
  const id = m.id;
  api<{ ok: boolean; result: unknown }>('/api/invoke', { token: state.app.launchToken, api: m.api, params })
    .catch((e: unknown) => ({ ok: false, result: { errMsg: `${String(m.api)}:fail ${String(e)}`, errno: 1005 } }))
    .then((answer) => {
      // A relaunched app is a new page: the old one's answers are not its business.
      if (generation !== shownGeneration || source !== frame.contentWindow) return;
      // '*' because the frame's origin is opaque; the panel's frame-src 'self' keeps it ours.
      source.postMessage({ type: 'wx-result', id, answer }, '*');
    });
});

// ---- the host controls ----

$<HTMLSelectElement>('user').addEventListener('change', (e) => {
  void api('/api/user', { uid: (e.target as HTMLSelectElement).value }).catch(report);
});
$('sign-out').addEventListener('click', () => void api('/api/user', { uid: '' }).catch(report));
$<HTMLSelectElement>('version').addEventListener('change', (e) => {
  void api('/api/launch', { apiVersion: (e.target as HTMLSelectElement).value }).catch(report);
});
$('relaunch').addEventListener('click', () => {
  void api('/api/launch', { apiVersion: $<HTMLSelectElement>('version').value }).catch(report);
});

function report(e: unknown): void {
  $('conn').textContent = String(e);
}

function answerPrompt(body: Record<string, unknown>): void {
  void api('/api/prompt', body).catch(report);
}

// ---- rendering ----

function render(s: State): void {
  const a = s.app;
  $('app-line').textContent = `${a.appId} · instance ${a.instanceId} · ${a.apiVersion || 'version asked on first call'}${a.versionSource ? ` (${a.versionSource})` : ''} · ${s.appSource}`;
  $('bar-title').textContent = a.appId;
  if (a.generation !== shownGeneration) {
    shownGeneration = a.generation;
    frame.src = `/app/index.html?launch=${a.generation}`;
  }
  const version = $<HTMLSelectElement>('version');
  if (a.apiVersion && document.activeElement !== version) version.value = a.apiVersion;

  const user = $<HTMLSelectElement>('user');
  user.replaceChildren(
    h('option', { value: '' }, '(signed out)'),
    ...s.users.map((u) => h('option', { value: u.uid }, `${u.nickName} (${u.uid})`)),
  );
  user.value = s.user?.uid ?? '';
  $('backend-line').textContent = s.backendHttp
    ? `Backend HTTP API: http://${s.backendHttp}`
    : 'Backend HTTP API: off';

  renderPrompts(s.prompts);
  renderLog(s.log);
  const settings = s.settings.map((g) =>
    h('tr', {}, h('td', {}, g.scope), h('td', { class: `decision-${g.decision}` }, g.decision)),
  );
  $('settings').querySelector('tbody')!.replaceChildren(
    ...(settings.length ? settings : [h('tr', {}, h('td', { colspan: '2', class: 'none' }, 'No decision yet.'))]),
  );
  const ledger = [...s.ledger].reverse().map((d) =>
    h(
      'tr',
      {},
      h('td', {}, new Date(d.atMs).toLocaleTimeString()),
      h('td', {}, d.what),
      h('td', {}, d.surface),
      h('td', {}, d.api),
      h('td', {}, !d.viaCode ? '–' : d.redeemedAtMs ? `via ${d.redeemedVia}` : 'not yet'),
    ),
  );
  $('ledger').querySelector('tbody')!.replaceChildren(
    ...(ledger.length ? ledger : [h('tr', {}, h('td', { colspan: '5', class: 'none' }, 'Nothing disclosed yet.'))]),
  );
}

function renderPrompts(prompts: Prompt[]): void {
  const box = $('prompts');
  // Keep the prompts still waiting as they are (a half-ticked checkbox survives a refresh).
  const keep = new Set(prompts.map((p) => String(p.id)));
  for (const el of [...box.querySelectorAll<HTMLElement>('.prompt')]) if (!keep.has(el.dataset.id!)) el.remove();
  for (const p of prompts) {
    if (box.querySelector(`.prompt[data-id="${p.id}"]`)) continue;
    box.append(promptView(p));
  }
  const none = box.querySelector('.none');
  if (prompts.length && none) none.remove();
  if (!prompts.length && !none) box.append(h('p', { class: 'none' }, 'No prompt waiting.'));
}

function promptView(p: Prompt): HTMLElement {
  const el = h('div', { class: 'prompt', 'data-id': String(p.id), 'data-kind': p.kind });
  if (p.kind === 'scopes') {
    el.append(h('div', { class: 'title' }, `${p.app.appId} asks (${p.api}) for:`));
    const boxes = (p.scopes ?? []).map((scope) => {
      const box = h('input', { type: 'checkbox', value: scope }) as HTMLInputElement;
      box.checked = true;
      return { scope, box };
    });
    el.append(h('div', { class: 'scopes' }, ...boxes.map(({ scope, box }) => h('label', {}, box, ` ${scope}`))));
    const allow = h('button', { type: 'button', class: 'primary', 'data-action': 'allow' }, 'Allow');
    const refuse = h('button', { type: 'button', class: 'danger', 'data-action': 'refuse' }, 'Refuse');
    allow.addEventListener('click', () =>
      answerPrompt({ id: p.id, granted: boxes.filter((b) => b.box.checked).map((b) => b.scope) }),
    );
    refuse.addEventListener('click', () => answerPrompt({ id: p.id, granted: [] }));
    el.append(h('div', { class: 'actions' }, allow, refuse));
  } else if (p.kind === 'payment') {
    el.append(h('div', { class: 'title' }, `${p.app.appId}: ${p.api} — the payment sheet`));
    const domain = h('input', { value: 'DevSimPaymentDomain', 'aria-label': 'error domain' }) as HTMLInputElement;
    const code = h('input', { value: '-2', 'aria-label': 'error code', type: 'number' }) as HTMLInputElement;
    const message = h('input', { value: 'insufficient balance', 'aria-label': 'error message' }) as HTMLInputElement;
    const pay = h('button', { type: 'button', class: 'primary', 'data-action': 'pay' }, 'Pay');
    const cancel = h('button', { type: 'button', 'data-action': 'cancel' }, 'Cancel');
    const fail = h('button', { type: 'button', class: 'danger', 'data-action': 'fail' }, 'Fail with host error');
    pay.addEventListener('click', () => answerPrompt({ id: p.id, outcome: 'pay' }));
    cancel.addEventListener('click', () => answerPrompt({ id: p.id, outcome: 'cancel' }));
    fail.addEventListener('click', () =>
      answerPrompt({ id: p.id, outcome: 'fail', domain: domain.value, code: Number(code.value) || 0, message: message.value }),
    );
    el.append(h('div', { class: 'actions' }, pay, cancel), h('div', { class: 'actions fail' }, fail, domain, code, message));
  } else {
    el.append(h('div', { class: 'title' }, `${p.app.appId}: the settings page`));
    const toggles = Object.entries(p.authSetting ?? {}).map(([scope, on]) => {
      const box = h('input', { type: 'checkbox', value: scope }) as HTMLInputElement;
      box.checked = on;
      return { scope, box, on };
    });
    el.append(
      h(
        'div',
        { class: 'toggles' },
        ...(toggles.length ? toggles.map(({ scope, box }) => h('label', {}, box, ` ${scope}`)) : ['This app has asked for nothing yet.']),
      ),
    );
    const done = h('button', { type: 'button', class: 'primary', 'data-action': 'done' }, 'Done');
    done.addEventListener('click', () => {
      const authSetting: Record<string, boolean> = {};
      for (const t of toggles) if (t.box.checked !== t.on) authSetting[t.scope] = t.box.checked;
      answerPrompt({ id: p.id, authSetting });
    });
    el.append(h('div', { class: 'actions' }, done));
  }
  return el;
}

function renderLog(log: LogEntry[]): void {
  const rows = [...log].reverse().map((c) =>
    h(
      'tr',
      { class: c.ok ? 'ok' : 'fail', 'data-api': c.api, 'data-route': c.route, 'data-version': c.version },
      h('td', {}, String(c.id)),
      h('td', {}, c.api),
      h('td', {}, c.version || '?'),
      h('td', { class: `route-${c.route}` }, c.route + (c.asked.length ? ` (+${c.asked.join(', ')})` : '')),
      h('td', { class: 'json' }, JSON.stringify(c.params)),
      h('td', { class: 'json answer' }, JSON.stringify(c.answer)),
      h('td', {}, `${c.latencyMs.toFixed(1)} ms`),
    ),
  );
  $('calls').querySelector('tbody')!.replaceChildren(
    ...(rows.length ? rows : [h('tr', {}, h('td', { colspan: '7', class: 'none' }, 'No call yet: use the mini app.'))]),
  );
}

// ---- the long poll ----

async function poll(): Promise<void> {
  let failures = 0;
  for (;;) {
    try {
      const next = await api<State>('/api/state', state ? { after: state.version } : {});
      failures = 0;
      $('conn').textContent = '';
      if (!state || next.version !== state.version) {
        state = next;
        render(next);
      }
    } catch (e) {
      failures++;
      report(`the simulator is not answering (${String(e)}); retrying`);
      await new Promise((r) => setTimeout(r, Math.min(5000, 250 * 2 ** failures)));
    }
  }
}

void poll();
