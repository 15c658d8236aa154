/**
 * The mini app frame's `wx`: the Node package's own `createWx` table (clients/node/src/wx.ts: the
 * same API list, callbacks and promises, result objects), over `postMessage` to the simulator's
 * panel, which holds the launch token and forwards each call to the daemon. This frame is
 * sandboxed (an opaque origin): it cannot read the panel, and the simulator's API refuses it.
 */
import { createWx, type WxInvokeResult, type WxInvoker } from '../../clients/node/src/wx';

/** The simulator's origin: the frame's URL is served by it (the frame's own origin is opaque). */
const PANEL_ORIGIN = location.origin;

const waiting = new Map<number, (answer: WxInvokeResult) => void>();
let nextId = 1;

window.addEventListener('message', (event: MessageEvent) => {
  // Only the panel that framed this page answers, and only calls this page made.
  if (event.source !== window.parent || event.origin !== PANEL_ORIGIN) return;
  const m = event.data as { type?: unknown; id?: unknown; answer?: WxInvokeResult } | null;
  if (!m || m.type !== 'wx-result' || typeof m.id !== 'number' || !m.answer) return;
  const resolve = waiting.get(m.id);
  if (!resolve) return;
  waiting.delete(m.id);
  resolve(m.answer);
});

const invoker: WxInvoker = {
  invoke(api: string, params: Record<string, unknown>): Promise<WxInvokeResult> {
    return new Promise((resolve) => {
      const id = nextId++;
      waiting.set(id, resolve);
      window.parent.postMessage({ type: 'wx-invoke', id, api, params }, PANEL_ORIGIN);
    });
  },
};

Object.defineProperty(window, 'wx', { value: createWx(invoker), enumerable: true });
