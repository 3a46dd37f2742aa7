// lbproxy admin page, the Let's Encrypt Certs screen's Request New Certificate form (challenge
// type, each name's Virtual Service, the API's checks mirrored, its errors shown at their field)
// and the watching of an order's progress (polled), for a new certificate or a renewal. The rest
// of the screen (directory, account, renew period, the certificate table) is certs.js, which
// imports this module, not the reverse: it hands the table over with setCertTable().
import { $, $$, api, busy, clearErrors, h, notice, setFieldError, state, when } from "./core.js";
import { loadVs, renderVs } from "./vs.js";

const MAX_SANS = 10;                       // lbproxy.config.model.MAX_SANS
const ID_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;   // lbproxy.certs.store.ID_RE
const FQDN_RE = /^(?=.{1,253}$)(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))*$/;
const POLL_MS = 250;                       // while an order runs
const ORDER_LIMIT_MS = 360000;             // give up watching after this (the order keeps going)
const SUBJECT = ["country", "state", "city", "company", "unit", "email"];
// acmeclient.challenges.CHALLENGE_TYPES and each one's VS as letsencrypt/solvers.py checks it:
// http-01 one eligible for challenges (/api/le/eligible-vs, code 17), tls-alpn-01 an HTTPS one
// (17.4), dns-01 none ([letsencrypt.dns] instead, code 104). A wildcard: dns-01 only (code 11).
const CHALLENGES = {
  "http-01": { vs: "eligible", label: "Virtual Service (HTTP challenge)", san: "",
    hint: "The CA fetches a token over HTTP (port 80) through each name's Virtual Service." },
  "tls-alpn-01": { vs: "https", label: "Virtual Service (HTTPS, TLS-ALPN challenge)", san: "",
    hint: "The CA checks a validation certificate in the TLS handshake on port 443: each " +
      "name's Virtual Service must be an HTTPS VS that the name's port 443 reaches." },
  "dns-01": { vs: "", label: "Virtual Service (not needed: the DNS challenge uses none)",
    san: " (not needed: DNS challenge)", hint: "lbproxy puts a TXT record in the name's zone " +
      "([letsencrypt.dns] in the config); no Virtual Service is used. Wildcards need it." },
};

// The certificate table (certs.js), which the order watcher redraws on each poll and reloads
// when the order ends: issued, the whole screen; failed, the table.
const table = { render: () => {}, reload: async () => {}, refreshAll: async () => {} };

export function setCertTable(t) {
  Object.assign(table, t);
}

// -- request form ------------------------------------------------------------------------------

function challenge() {
  const c = $("#req-challenge").value;
  return CHALLENGES[c] ? c : "http-01";
}
const needsVs = (ch = challenge()) => Boolean(CHALLENGES[ch].vs);

// A VS drop-down for the challenge type: the VSs that can answer it, required; for dns-01
// disabled and empty (the choice kept aside for when the type changes back).
function fillVsSelect(sel) {
  const need = CHALLENGES[challenge()].vs, keep = sel.value || sel.dataset.keep || "";
  const choices = need === "eligible" ? state.eligible :
    need === "https" ? state.vs.filter(v => v.protocol === "https") : [];
  sel.replaceChildren(h("option", { value: "",
    text: need ? "choose a Virtual Service" : "none: DNS-01 uses no Virtual Service" }),
    ...choices.map(v => h("option", { value: v.name,
      text: `${v.name} (${v.protocol} ${v.listen})` })));
  sel.disabled = !need;
  sel.required = Boolean(need);
  sel.setAttribute("aria-required", String(Boolean(need)));
  if (!need) {
    if (keep) sel.dataset.keep = keep;
  } else {
    delete sel.dataset.keep;
    if (choices.some(v => v.name === keep)) sel.value = keep;
  }
}

export function fillVsSelects() {
  for (const sel of $$(".vs-select")) fillVsSelect(sel);
}

// The VSs that can answer an HTTP-01 challenge, for the drop-downs (refreshLe calls it too).
export async function loadEligible() {
  state.eligible = await api("GET", "/api/le/eligible-vs");
}

// The challenge type changed: the VS drop-downs, their labels and the hint follow it (an error
// shown at a VS that is no longer used goes).
export function challengeChanged() {
  const c = CHALLENGES[challenge()];
  $("#req-vs-label").textContent = c.label;
  $("#hint-req-challenge").textContent = c.hint;
  $("#sans-legend").textContent = `SAN/UCC names (up to 10${c.vs ?
    ", each with its Virtual Service)" : "; DNS-01 needs no Virtual Service)"}`;
  if (!c.vs) for (const sel of $$(".vs-select")) clearErrors(sel.parentElement);
  fillVsSelects();
  renumberSans();
}

export function renumberSans() {
  $$("#sans li").forEach((li, i) => {
    const n = i + 1;
    const [name, vs] = [li.querySelector("input"), li.querySelector("select")];
    name.id = `san-${n}-name`; vs.id = `san-${n}-vs`;
    const labels = li.querySelectorAll("label");
    labels[0].htmlFor = name.id; labels[0].textContent = `SAN ${n} name`;
    labels[1].htmlFor = vs.id;
    labels[1].textContent = `SAN ${n} Virtual Service${CHALLENGES[challenge()].san}`;
    const errs = li.querySelectorAll(".field-error");
    errs[0].id = `err-san-${n}-name`; errs[1].id = `err-san-${n}-vs`;
    name.setAttribute("aria-describedby", errs[0].id);
    vs.setAttribute("aria-describedby", errs[1].id);
    li.querySelector("button").setAttribute("aria-label", `Remove SAN ${n}`);
  });
  $("#san-add").textContent = `Add SAN (${$$("#sans li").length} of ${MAX_SANS})`;
}

export function addSan(name = "", vs = "") {
  const sel = h("select", { class: "vs-select", name: "san-vs" });
  fillVsSelect(sel);
  const input = h("input", { name: "san-name", value: name, autocomplete: "off" });
  const li = h("li", {},
    h("div", { class: "field" }, h("label"), input, h("p", { class: "field-error", hidden: true })),
    h("div", { class: "field" }, h("label"), sel, h("p", { class: "field-error", hidden: true })),
    h("button", { type: "button", class: "secondary", text: "Remove",
      onclick: () => { li.remove(); renumberSans(); } }));
  $("#sans").append(li);
  if (vs) sel.value = vs;
  renumberSans();
  return input;
}

// The request body; with dns-01 no VS is sent (the server would keep one without checking it).
function readRequest() {
  const v = id => $(id).value.trim();
  const ch = challenge(), needed = needsVs(ch);
  const body = { id: v("#req-id"), common_name: v("#req-cn").toLowerCase(), challenge: ch,
    sans: $$("#sans li").map(li => {
      const san = { name: li.querySelector("input").value.trim().toLowerCase() };
      if (needed) san.vs = li.querySelector("select").value;
      return san;
    }),
    key_type: $("#req-ec").checked ? "ec" : "rsa", wait: false };
  if (needed) body.vs = v("#req-vs");
  if (body.key_type === "rsa") body.key_size = Number($("#req-size").value);
  for (const k of SUBJECT) if (v(`#req-${k}`)) body[k] = v(`#req-${k}`);
  return body;
}

// What is wrong with a name for the challenge type, or "": a fully qualified name, or "*." and
// one with dns-01 only (letsencrypt/checks.py, solvers.check_challenge: code 11).
function nameProblem(name, ch) {
  const bare = name.startsWith("*.") ? name.slice(2) : name;
  if (!FQDN_RE.test(bare)) return `'${name}' is not a fully qualified domain name.`;
  if (bare !== name && ch !== "dns-01") return `'${name}' is a wildcard name: only the ` +
    "DNS-01 challenge can prove it; choose DNS-01 (code 11).";
  return "";
}

// The API's checks, mirrored: [element, message] for each problem.
function checkRequest(b) {
  const out = [];
  const needed = needsVs(b.challenge);
  if (!ID_RE.test(b.id)) out.push([$("#req-id"),
    "The identifier is 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit."]);
  if (!b.common_name) out.push([$("#req-cn"), "No domain to sign: enter the Common Name (code 18)."]);
  else if (nameProblem(b.common_name, b.challenge)) out.push([$("#req-cn"),
    nameProblem(b.common_name, b.challenge)]);
  if (needed && !b.vs) out.push([$("#req-vs"),
    "Choose the Virtual Service that answers the challenge."]);
  const rows = $$("#sans li");
  if (b.sans.length > MAX_SANS) out.push([$("#sans-box"),
    `'sans' has ${b.sans.length} items; at most ${MAX_SANS} are allowed.`]);
  const seen = new Set([b.common_name]);
  b.sans.forEach((s, i) => {
    const [name, vs] = [rows[i].querySelector("input"), rows[i].querySelector("select")];
    if (!s.name) out.push([name, "Enter the name, or remove this SAN."]);
    else if (nameProblem(s.name, b.challenge)) out.push([name, nameProblem(s.name, b.challenge)]);
    else if (seen.has(s.name)) out.push([name, `'${s.name}' is listed twice.`]);
    seen.add(s.name);
    if (needed && !s.vs) out.push([vs,
      "Choose the Virtual Service that answers this name's challenge."]);
  });
  if (b.country && !/^[A-Za-z]{2}$/.test(b.country)) out.push([$("#req-country"),
    "The country is a 2 letter code (e.g. DE)."]);
  if (b.email && !/^[^@\s]+@[^@\s]+$/.test(b.email)) out.push([$("#req-email"),
    "Not an email address."]);
  if (b.key_type === "rsa" && ![2048, 3072, 4096].includes(b.key_size)) out.push([$("#req-size"),
    "The RSA key size is 2048, 3072 or 4096."]);
  return out;
}

// Where an API error about a request belongs: the field it names, the VS or name it quotes.
function requestErrorTarget(e) {
  const d = e.data || {}, msg = d.error || "";
  const rows = $$("#sans li");
  if (d.field) {
    const m = /^sans\[(\d+)\]\.(name|vs)$/.exec(d.field);
    if (m && rows[Number(m[1])]) return rows[Number(m[1])].querySelector(m[2] === "name" ? "input" : "select");
    if (d.field === "sans") return $("#sans-box");
    const byName = { id: "#req-id", common_name: "#req-cn", vs: "#req-vs", key_size: "#req-size",
                     key_type: "#req-size", challenge: "#req-challenge" };
    const sel = byName[d.field] || (SUBJECT.includes(d.field) ? `#req-${d.field}` : null);
    if (sel) return $(sel);
  }
  const vsName = /VS '([^']*)'/.exec(msg);
  if (vsName) {
    const sels = [$("#req-vs"), ...rows.map(r => r.querySelector("select"))];
    const hit = sels.find(s => s.value === vsName[1]);
    if (hit) return hit;
  }
  if (d.code === 18) return $("#req-cn");
  // 11: a wildcard without dns-01; 104: dns-01 without a DNS provider (the type is the fix)
  if (d.code === 11 || d.code === 104) return $("#req-challenge");
  if (d.code === 16 && /names and VSs/.test(msg)) {
    const sels = [$("#req-vs"), ...rows.map(r => r.querySelector("select"))];
    return sels.find(s => !s.value) || $("#req-vs");
  }
  if (d.code === 16 || /certificate id .* already exists/.test(msg)) return $("#req-id");
  const q = /^'([^']+)' is not a fully qualified/.exec(msg);
  if (q) {
    if ($("#req-cn").value.trim().toLowerCase() === q[1]) return $("#req-cn");
    const r = rows.find(li => li.querySelector("input").value.trim().toLowerCase() === q[1]);
    if (r) return r.querySelector("input");
  }
  if (/SANs|listed twice/.test(msg)) return $("#sans-box");
  if (/^key /.test(msg)) return $("#req-size");
  return $("#req-submit");
}

export async function requestCert(ev) {
  ev.preventDefault();
  const form = ev.target;
  clearErrors(form);
  const body = readRequest();
  const problems = checkRequest(body);
  if (problems.length) {
    for (const [el, msg] of problems) setFieldError(el, msg);
    (problems[0][0].matches("fieldset") ? $("#san-add") : problems[0][0]).focus();
    return;
  }
  await busy($("#req-submit"), async () => {
    try {
      const view = await api("POST", "/api/le/certs", body);
      notice(`Order placed for ${view.id}.`);
      watchOrder(view.id, "");
    } catch (e) {
      const el = requestErrorTarget(e);
      setFieldError(el, e.text);
      (el.matches("fieldset") ? $("#san-add") : el).focus();
      await Promise.all([loadEligible(), loadVs()]);   // the VSs may have changed under the form
      fillVsSelects();
    }
  });
}

// -- order progress ----------------------------------------------------------------------------

export function stopWatching() {
  if (state.watching) { clearTimeout(state.watching.timer); state.watching = null; }
}

function setPhase(phase, text) {
  const box = $("#progress");
  const order = ["pending", "validating", "issued"];
  box.dataset.phase = phase;
  const seen = (box.dataset.seen || "").split(" ").filter(Boolean);
  if (!seen.includes(phase)) seen.push(phase);
  box.dataset.seen = seen.join(" ");
  // failed: the steps reached are done, the last one reads "failed"
  const at = phase === "failed" ? order.length - 1 : order.indexOf(phase);
  const reached = phase === "failed" ? order.indexOf(box.dataset.last || "pending") : at;
  order.forEach((p, i) => {
    const li = $(`#step-${p}`);
    li.className = phase === "failed" ? (i === at ? "failed" : i <= reached ? "done" : "") :
      i < at || (phase === "issued" && i === at) ? "done" : i === at ? "current" : "";
  });
  if (phase !== "failed") box.dataset.last = phase;
  $("#step-issued").textContent = phase === "failed" ? "failed" : "issued";
  $("#progress-text").textContent = text;
}

// What the order's challenges are answered by now, from the certificate's "validating" (the
// API's: an injected SubVS for http-01, a validation certificate on a VS for tls-alpn-01, a TXT
// record for dns-01), each place once (a wildcard and its base name share their TXT record).
function validatingText(items) {
  const where = [...new Set((items || []).map(i => i.where))];
  return where.length ? `Validating: ${where.join(", ")}` : "";
}

export function watchOrder(id, beforeSerial) {
  stopWatching();
  const box = $("#progress");
  box.hidden = false;
  box.dataset.seen = "";
  box.dataset.last = "pending";
  box.dataset.cert = id;
  $("#progress-id").textContent = id;
  setPhase("pending", "Order placed; waiting for the CA's challenges.");
  const started = Date.now();
  const w = { id, timer: 0 };
  state.watching = w;
  const tick = async () => {
    if (state.watching !== w) return;
    try {
      const [view, vsList] = await Promise.all([
        api("GET", `/api/le/certs/${encodeURIComponent(id)}`), api("GET", "/api/vs")]);
      if (state.watching !== w) return;
      state.vs = vsList.virtual_services;
      const i = state.certs.findIndex(c => c.id === id);
      if (i >= 0) state.certs[i] = view; else state.certs.push(view);
      renderVs();
      table.render();
      const validating = validatingText(view.validating);
      if (view.serial && view.serial !== beforeSerial && ["valid", "due"].includes(view.status)) {
        setPhase("issued", `Issued: serial ${view.serial}, expires ${when(view.not_after)}.`);
        notice(`Certificate ${id} issued.`);
        stopWatching();
        await table.refreshAll();
        return;
      }
      if (view.status === "backoff" || (view.status !== "renewing" && view.last_code)) {
        setPhase("failed", `Failed: ${view.last_error} (code ${view.last_code}` +
          (view.last_subcode ? `, sub-code ${view.last_subcode}` : "") + ")");
        notice(`Certificate ${id}: the order failed (code ${view.last_code}).`, true);
        stopWatching();
        await table.reload();
        return;
      }
      if (validating) setPhase("validating", validating);
    } catch (e) {
      if (e.status === 404) {
        setPhase("failed", `Failed: ${e.text}`);
        stopWatching();
        return;
      }
      if (e.status === 401) return;
    }
    if (Date.now() - started > ORDER_LIMIT_MS) {
      $("#progress-text").textContent = "Still running; see the certificate table.";
      stopWatching();
      return;
    }
    w.timer = setTimeout(tick, POLL_MS);
  };
  w.timer = setTimeout(tick, 0);
}
