// Built by sim/scripts/build.mjs from sim/src (npm run build in sim/); do not edit.

// src/panel.ts
var $ = (id) => document.getElementById(id);
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  for (const c of children) el.append(c);
  return el;
}
async function api(path, body) {
  const response = await fetch(path, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body)
  });
  const text = await response.text();
  if (!response.ok) throw new Error(`${path}: ${response.status} ${text}`);
  return JSON.parse(text);
}
var state = null;
var shownGeneration = 0;
var frame = $("app");
window.addEventListener("message", (event) => {
  if (event.source !== frame.contentWindow || event.origin !== "null" || !state) return;
  const m = event.data;
  if (!m || m.type !== "wx-invoke" || typeof m.id !== "number" || typeof m.api !== "string") return;
  const params = m.params && typeof m.params === "object" ? m.params : {};
  const source = event.source;
  const generation = shownGeneration;
  const id = m.id;
  api("/api/invoke", { token: state.app.launchToken, api: m.api, params }).catch((e) => ({ ok: false, result: { errMsg: `${String(m.api)}:fail ${String(e)}`, errno: 1005 } })).then((answer) => {
    if (generation !== shownGeneration || source !== frame.contentWindow) return;
    source.postMessage({ type: "wx-result", id, answer }, "*");
  });
});
$("user").addEventListener("change", (e) => {
  void api("/api/user", { uid: e.target.value }).catch(report);
});
$("sign-out").addEventListener("click", () => void api("/api/user", { uid: "" }).catch(report));
$("version").addEventListener("change", (e) => {
  void api("/api/launch", { apiVersion: e.target.value }).catch(report);
});
$("relaunch").addEventListener("click", () => {
  void api("/api/launch", { apiVersion: $("version").value }).catch(report);
});
function report(e) {
  $("conn").textContent = String(e);
}
function answerPrompt(body) {
  void api("/api/prompt", body).catch(report);
}
function render(s) {
  const a = s.app;
  $("app-line").textContent = `${a.appId} · instance ${a.instanceId} · ${a.apiVersion || "version asked on first call"}${a.versionSource ? ` (${a.versionSource})` : ""} · ${s.appSource}`;
  $("bar-title").textContent = a.appId;
  if (a.generation !== shownGeneration) {
    shownGeneration = a.generation;
    frame.src = `/app/index.html?launch=${a.generation}`;
  }
  const version = $("version");
  if (a.apiVersion && document.activeElement !== version) version.value = a.apiVersion;
  const user = $("user");
  user.replaceChildren(
    h("option", { value: "" }, "(signed out)"),
    ...s.users.map((u) => h("option", { value: u.uid }, `${u.nickName} (${u.uid})`))
  );
  user.value = s.user?.uid ?? "";
  $("backend-line").textContent = s.backendHttp ? `Backend HTTP API: http://${s.backendHttp}` : "Backend HTTP API: off";
  renderPrompts(s.prompts);
  renderLog(s.log);
  const settings = s.settings.map(
    (g) => h("tr", {}, h("td", {}, g.scope), h("td", { class: `decision-${g.decision}` }, g.decision))
  );
  $("settings").querySelector("tbody").replaceChildren(
    ...settings.length ? settings : [h("tr", {}, h("td", { colspan: "2", class: "none" }, "No decision yet."))]
  );
  const ledger = [...s.ledger].reverse().map(
    (d) => h(
      "tr",
      {},
      h("td", {}, new Date(d.atMs).toLocaleTimeString()),
      h("td", {}, d.what),
      h("td", {}, d.surface),
      h("td", {}, d.api),
      h("td", {}, !d.viaCode ? "–" : d.redeemedAtMs ? `via ${d.redeemedVia}` : "not yet")
    )
  );
  $("ledger").querySelector("tbody").replaceChildren(
    ...ledger.length ? ledger : [h("tr", {}, h("td", { colspan: "5", class: "none" }, "Nothing disclosed yet."))]
  );
}
function renderPrompts(prompts) {
  const box = $("prompts");
  const keep = new Set(prompts.map((p) => String(p.id)));
  for (const el of [...box.querySelectorAll(".prompt")]) if (!keep.has(el.dataset.id)) el.remove();
  for (const p of prompts) {
    if (box.querySelector(`.prompt[data-id="${p.id}"]`)) continue;
    box.append(promptView(p));
  }
  const none = box.querySelector(".none");
  if (prompts.length && none) none.remove();
  if (!prompts.length && !none) box.append(h("p", { class: "none" }, "No prompt waiting."));
}
function promptView(p) {
  const el = h("div", { class: "prompt", "data-id": String(p.id), "data-kind": p.kind });
  if (p.kind === "scopes") {
    el.append(h("div", { class: "title" }, `${p.app.appId} asks (${p.api}) for:`));
    const boxes = (p.scopes ?? []).map((scope) => {
      const box = h("input", { type: "checkbox", value: scope });
      box.checked = true;
      return { scope, box };
    });
    el.append(h("div", { class: "scopes" }, ...boxes.map(({ scope, box }) => h("label", {}, box, ` ${scope}`))));
    const allow = h("button", { type: "button", class: "primary", "data-action": "allow" }, "Allow");
    const refuse = h("button", { type: "button", class: "danger", "data-action": "refuse" }, "Refuse");
    allow.addEventListener(
      "click",
      () => answerPrompt({ id: p.id, granted: boxes.filter((b) => b.box.checked).map((b) => b.scope) })
    );
    refuse.addEventListener("click", () => answerPrompt({ id: p.id, granted: [] }));
    el.append(h("div", { class: "actions" }, allow, refuse));
  } else if (p.kind === "payment") {
    el.append(h("div", { class: "title" }, `${p.app.appId}: ${p.api} — the payment sheet`));
    const domain = h("input", { value: "DevSimPaymentDomain", "aria-label": "error domain" });
    const code = h("input", { value: "-2", "aria-label": "error code", type: "number" });
    const message = h("input", { value: "insufficient balance", "aria-label": "error message" });
    const pay = h("button", { type: "button", class: "primary", "data-action": "pay" }, "Pay");
    const cancel = h("button", { type: "button", "data-action": "cancel" }, "Cancel");
    const fail = h("button", { type: "button", class: "danger", "data-action": "fail" }, "Fail with host error");
    pay.addEventListener("click", () => answerPrompt({ id: p.id, outcome: "pay" }));
    cancel.addEventListener("click", () => answerPrompt({ id: p.id, outcome: "cancel" }));
    fail.addEventListener(
      "click",
      () => answerPrompt({ id: p.id, outcome: "fail", domain: domain.value, code: Number(code.value) || 0, message: message.value })
    );
    el.append(h("div", { class: "actions" }, pay, cancel), h("div", { class: "actions fail" }, fail, domain, code, message));
  } else {
    el.append(h("div", { class: "title" }, `${p.app.appId}: the settings page`));
    const toggles = Object.entries(p.authSetting ?? {}).map(([scope, on]) => {
      const box = h("input", { type: "checkbox", value: scope });
      box.checked = on;
      return { scope, box, on };
    });
    el.append(
      h(
        "div",
        { class: "toggles" },
        ...toggles.length ? toggles.map(({ scope, box }) => h("label", {}, box, ` ${scope}`)) : ["This app has asked for nothing yet."]
      )
    );
    const done = h("button", { type: "button", class: "primary", "data-action": "done" }, "Done");
    done.addEventListener("click", () => {
      const authSetting = {};
      for (const t of toggles) if (t.box.checked !== t.on) authSetting[t.scope] = t.box.checked;
      answerPrompt({ id: p.id, authSetting });
    });
    el.append(h("div", { class: "actions" }, done));
  }
  return el;
}
function renderLog(log) {
  const rows = [...log].reverse().map(
    (c) => h(
      "tr",
      { class: c.ok ? "ok" : "fail", "data-api": c.api, "data-route": c.route, "data-version": c.version },
      h("td", {}, String(c.id)),
      h("td", {}, c.api),
      h("td", {}, c.version || "?"),
      h("td", { class: `route-${c.route}` }, c.route + (c.asked.length ? ` (+${c.asked.join(", ")})` : "")),
      h("td", { class: "json" }, JSON.stringify(c.params)),
      h("td", { class: "json answer" }, JSON.stringify(c.answer)),
      h("td", {}, `${c.latencyMs.toFixed(1)} ms`)
    )
  );
  $("calls").querySelector("tbody").replaceChildren(
    ...rows.length ? rows : [h("tr", {}, h("td", { colspan: "7", class: "none" }, "No call yet: use the mini app."))]
  );
}
async function poll() {
  let failures = 0;
  for (; ; ) {
    try {
      const next = await api("/api/state", state ? { after: state.version } : {});
      failures = 0;
      $("conn").textContent = "";
      if (!state || next.version !== state.version) {
        state = next;
        render(next);
      }
    } catch (e) {
      failures++;
      report(`the simulator is not answering (${String(e)}); retrying`);
      await new Promise((r) => setTimeout(r, Math.min(5e3, 250 * 2 ** failures)));
    }
  }
}
void poll();
