// Built by sim/scripts/build.mjs from sim/src (npm run build in sim/); do not edit.
"use strict";
(() => {
  // ../clients/node/src/wx.ts
  var WX_APIS = [
    "login",
    "checkSession",
    "getPhoneNumber",
    "getEmail",
    "chooseAvatar",
    "getNickName",
    "getUserInfo",
    "getUserProfile",
    "requestPayment",
    "requestMidasPaymentGameItem",
    "getSetting",
    "authorize",
    "openSetting"
  ];
  var CALLBACKS = ["success", "fail", "complete"];
  function createWx(renderer) {
    const wx = {};
    for (const api of WX_APIS) wx[api] = wxFunction(renderer, api);
    return Object.freeze(wx);
  }
  function wxFunction(renderer, api) {
    return function(options = {}) {
      const params = {};
      for (const [k, v] of Object.entries(options ?? {})) if (!CALLBACKS.includes(k) && typeof v !== "function") params[k] = v;
      const answer = renderer.invoke(api, params).catch(
        (e) => ({ ok: false, result: { errMsg: `${api}:fail ${String(e)}`, errno: 1005 } })
      );
      const { success, fail, complete } = options ?? {};
      if (typeof success !== "function" && typeof fail !== "function" && typeof complete !== "function") {
        return answer.then(({ ok, result }) => ok ? result : Promise.reject(result));
      }
      void answer.then(({ ok, result }) => {
        try {
          if (ok) success?.(result);
          else fail?.(result);
        } finally {
          complete?.(result);
        }
      });
      return void 0;
    };
  }

  // src/bridge.ts
  var PANEL_ORIGIN = location.origin;
  var waiting = /* @__PURE__ */ new Map();
  var nextId = 1;
  window.addEventListener("message", (event) => {
    if (event.source !== window.parent || event.origin !== PANEL_ORIGIN) return;
    const m = event.data;
    if (!m || m.type !== "wx-result" || typeof m.id !== "number" || !m.answer) return;
    const resolve = waiting.get(m.id);
    if (!resolve) return;
    waiting.delete(m.id);
    resolve(m.answer);
  });
  var invoker = {
    invoke(api, params) {
      return new Promise((resolve) => {
        const id = nextId++;
        waiting.set(id, resolve);
        window.parent.postMessage({ type: "wx-invoke", id, api, params }, PANEL_ORIGIN);
      });
    }
  };
  Object.defineProperty(window, "wx", { value: createWx(invoker), enumerable: true });
})();
