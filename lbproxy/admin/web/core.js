// lbproxy admin page, shared parts: the page's state, DOM helpers, the admin API client (session
// cookie + X-CSRF-Token header) and the field error display. ES module, no dependencies.

export const state = { csrf: "", eligible: [], vs: [], status: null, certs: [], watching: null };
// Set by app.js: what happens when the API says the session has ended (401).
export const hooks = { sessionEnded: (_msg) => {} };

// -- small helpers -----------------------------------------------------------------------------

export const $ = (sel, root = document) => root.querySelector(sel);
export const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === false || v === null || v === undefined) continue;
    if (k === "class") el.className = v;
    else if (k === "text") el.textContent = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

export function when(iso) {
  if (!iso) return "-";
  const d = new Date(iso);
  if (isNaN(d)) return iso;
  return d.toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC").replace(/Z$/, " UTC");
}

export function daysLeft(iso) {
  if (!iso) return "-";
  return String(Math.floor((new Date(iso) - Date.now()) / 86400000));
}

export class ApiError extends Error {
  constructor(status, data) {
    super((data && data.error) || `HTTP ${status}`);
    this.status = status;
    this.data = data || {};
  }
  get text() {
    const d = this.data;
    let s = d.error || `HTTP ${this.status}`;
    if (/\(code:? \d+\)$/.test(s)) {
      // the message already ends with its LoadMaster code
    } else if (d.code !== undefined && d.code !== null) {
      s += ` (code ${d.code}` + (d.sub_code !== undefined && !/sub-code/.test(s) ?
        `, sub-code ${d.sub_code}` : "") + ")";
    } else {
      s += ` (HTTP ${this.status})`;
    }
    return s;
  }
}

export async function api(method, path, body) {
  const headers = { "Accept": "application/json" };
  if (!["GET", "HEAD"].includes(method)) headers["X-CSRF-Token"] = state.csrf;
  const opts = { method, headers, credentials: "same-origin", cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  let r;
  try {
    r = await fetch(path, opts);
  } catch (e) {
    throw new ApiError(0, { error: `the admin API cannot be reached: ${e.message}` });
  }
  let data = null;
  try { data = await r.json(); } catch (_e) { data = null; }
  if (r.status === 401 && path !== "/ui/login") {
    hooks.sessionEnded("Your session has ended; log in again.");
  }
  if (!r.ok) throw new ApiError(r.status, data);
  return data;
}

export function notice(msg, isError = false) {
  const n = $("#notice");
  n.textContent = msg;
  n.classList.toggle("error", isError);
  n.setAttribute("role", isError ? "alert" : "status");
}

export function errFor(el) {
  const id = (el.getAttribute("aria-describedby") || "").split(" ").find(x => x.startsWith("err-"));
  return id ? document.getElementById(id) : null;
}

export function setFieldError(el, msg) {
  const p = errFor(el) || $("#err-req-form");
  p.textContent = msg;
  p.hidden = false;
  if (el.matches("input, select")) el.setAttribute("aria-invalid", "true");
  return el;
}

export function clearErrors(root) {
  for (const p of $$(".field-error", root)) { p.textContent = ""; p.hidden = true; }
  for (const el of $$("[aria-invalid]", root)) el.removeAttribute("aria-invalid");
}

export async function busy(button, work) {
  button.disabled = true;
  try { return await work(); } finally { button.disabled = false; }
}


// Shows an API error next to the field named by "field", else next to `fallback`.
export function formError(form, e, fallback) {
  const f = e.data && e.data.field;
  const el = (f && form.querySelector(`[name="${CSS.escape(f)}"]`)) || fallback;
  setFieldError(el, e.text).focus();
}
