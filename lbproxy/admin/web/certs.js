// lbproxy admin page, the Let's Encrypt Certs screen: directory, account, renew period, and the
// certificate table with its actions (renew, delete, assign, unassign); refreshLe() reloads the
// whole screen. The Request New Certificate form and the order's progress are in request.js.
import { $, api, busy, clearErrors, daysLeft, formError, h, notice, setFieldError, state,
  when } from "./core.js";
import { fillVsSelects, loadEligible, setCertTable, watchOrder } from "./request.js";
import { loadVs } from "./vs.js";

// -- account and settings ----------------------------------------------------------------------

async function loadAccount() {
  const a = await api("GET", "/api/le/account");
  const s = a.settings || {};
  $("#acct-id").textContent = a.account_id || "(not registered)";
  $("#acct-email").textContent = a.email || s.email || "-";
  $("#acct-period").textContent = `${s.renew_period_days} days`;
  if (document.activeElement !== $("#dir-url")) $("#dir-url").value = s.directory_url || "";
  if (document.activeElement !== $("#dir-ca")) $("#dir-ca").value = s.ca_bundle || "";
  if (document.activeElement !== $("#period-days")) $("#period-days").value = s.renew_period_days;
}

export async function setDirectory(ev) {
  ev.preventDefault();
  const form = ev.target, url = $("#dir-url");
  clearErrors(form);
  if (!/^https:\/\/\S+$/.test(url.value.trim())) {
    setFieldError(url, "The directory URL must be an https:// URL.").focus();
    return;
  }
  await busy(form.querySelector("button"), async () => {
    try {
      await api("PUT", "/api/le/settings",
        { directory_url: url.value.trim(), ca_bundle: $("#dir-ca").value.trim() });
      notice("Directory set.");
      await loadAccount();
    } catch (e) { formError(form, e, url); }
  });
}

export async function register(ev) {
  ev.preventDefault();
  const form = ev.target, email = $("#reg-email");
  clearErrors(form);
  const body = email.value.trim() ? { email: email.value.trim() } : {};
  await busy(form.querySelector("button"), async () => {
    try {
      const a = await api("POST", "/api/le/account", body);
      clearErrors($("#key-form"));
      notice(`Account registered: ${a.account_id}`);
      await loadAccount();
    } catch (e) { formError(form, e, email); }
  });
}

export async function uploadKey(ev) {
  ev.preventDefault();
  const form = ev.target, file = $("#key-file");
  clearErrors(form);
  if (!file.files.length) { setFieldError(file, "Choose the account key file.").focus(); return; }
  const body = { key: await file.files[0].text(), replace: $("#key-replace").checked };
  if ($("#key-pass").value) body.passphrase = $("#key-pass").value;
  await busy(form.querySelector("button[type=submit]"), async () => {
    try {
      const a = await api("POST", "/api/le/account/key", body);
      $("#key-pass").value = "";
      clearErrors($("#reg-form"));
      notice(`Account linked: ${a.account_id}`);
      await loadAccount();
    } catch (e) { formError(form, e, file); }
  });
}

export async function setPeriod(ev) {
  ev.preventDefault();
  const form = ev.target, days = $("#period-days");
  clearErrors(form);
  const n = Number(days.value);
  if (!Number.isInteger(n) || n < 1 || n > 60) {
    setFieldError(days, "The renew period is a whole number of days from 1 to 60.").focus();
    return;
  }
  await busy(form.querySelector("button"), async () => {
    try {
      await api("PUT", "/api/le/settings", { renew_period_days: n });
      notice(`Renew period set to ${n} days.`);
      await loadAccount();
      await loadCerts();
    } catch (e) { formError(form, e, days); }
  });
}

// -- certificate table -------------------------------------------------------------------------

function httpsVs() {
  return state.vs.filter(v => v.protocol === "https").map(v => v.name);
}

export async function loadCerts() {
  state.certs = await api("GET", "/api/le/certs");
  renderCerts();
}

function cell(label, ...content) {
  return h("td", { "data-label": label }, ...content);
}

let shownCerts = "";

// Re-rendered only when what it shows changed (polling must not reset a half-made choice).
export function renderCerts() {
  const key = JSON.stringify([state.certs, httpsVs(), new Date().toISOString().slice(0, 10)]);
  if (key === shownCerts) return;
  shownCerts = key;
  const body = $("#certs tbody");
  body.replaceChildren(...state.certs.map(certRow));
  $("#certs-empty").hidden = state.certs.length > 0;
}

// The challenge type beside the VSs when it is not HTTP-01 (the column's name is LoadMaster's).
function challengeBadge(c) {
  if (!c.challenge || c.challenge === "http-01") return null;
  return [h("span", { class: "badge challenge-type", text: c.challenge.toUpperCase() }), " "];
}

function certRow(c) {
  const safe = c.id.replace(/[^A-Za-z0-9_-]/g, "_");
  const users = c.in_use_by || [];
  const targets = httpsVs().filter(v => !users.includes(v));
  const reasonId = `del-reason-${safe}`;
  const renew = h("button", { type: "button", class: "secondary", text: "Renew",
    "data-action": "renew", onclick: ev => renewCert(c, ev.target) });
  const del = h("button", { type: "button", class: "danger", text: "Delete", "data-action": "delete",
    disabled: users.length > 0, "aria-describedby": users.length ? reasonId : null,
    onclick: ev => deleteCert(c, ev.target) });
  const reason = users.length ? h("span", { class: "reason", id: reasonId,
    text: `In use by ${users.join(", ")}: unassign it first.` }) : null;
  const sel = h("select", { id: `assign-${safe}`, "aria-label": `HTTPS Virtual Service for ${c.id}` },
    h("option", { value: "", text: targets.length ? "HTTPS VS..." : "no other HTTPS VS" }),
    ...targets.map(v => h("option", { value: v, text: v })));
  const assign = h("button", { type: "button", class: "secondary", text: "Assign",
    "data-action": "assign", disabled: !targets.length || !c.serial,
    onclick: ev => assignCert(c, sel, ev.target) });
  const status = h("span", { class: `state-${c.status}`, text: c.status });
  const error = c.last_error ? h("div", { class: "last-error",
    text: `${c.last_error} (code ${c.last_code}${c.last_subcode ? `, sub-code ${c.last_subcode}` : ""})` }) : null;
  return h("tr", { "data-id": c.id },
    cell("Identifier", h("strong", { text: c.id })),
    cell("Names", c.names.join(", ")),
    cell("Key", c.key_type === "ec" ? "EC P-256" : `RSA ${c.key_size}`),
    cell("Expires", h("span", { class: "expires", text: when(c.not_after) })),
    cell("Days left", h("span", { class: "days-left", text: daysLeft(c.not_after) })),
    cell("Next renewal", when(c.next_attempt)),
    cell("HTTP challenge VS(s)", challengeBadge(c), c.http_challenge_vs.join("; ")),
    cell("Assigned to", h("span", { class: "assigned", text: users.length ? users.join(", ") : "-" })),
    cell("Status", status, error),
    cell("Actions", h("div", { class: "actions" }, renew, h("div", {}, del, " ", reason),
      ...users.map(u => h("button", { type: "button", class: "secondary", "data-action": "unassign",
        text: `Unassign from ${u}`, onclick: ev => unassignCert(c, u, ev.target) })),
      h("div", { class: "assign" }, sel, assign))));
}

async function renewCert(c, button) {
  await busy(button, async () => {
    try {
      await api("POST", `/api/le/certs/${encodeURIComponent(c.id)}/renew`, { wait: false });
      notice(`Renewing ${c.id}.`);
      watchOrder(c.id, c.serial);
      $("#progress").scrollIntoView({ block: "nearest" });
    } catch (e) { notice(`Renew ${c.id}: ${e.text}`, true); }
  });
}

async function deleteCert(c, button) {
  if (button.dataset.armed !== "1") {
    button.dataset.armed = "1";
    button.textContent = "Confirm delete";
    return;
  }
  await busy(button, async () => {
    try {
      await api("DELETE", `/api/le/certs/${encodeURIComponent(c.id)}`);
      notice(`Deleted ${c.id}.`);
      await refreshLe();
    } catch (e) { notice(`Delete ${c.id}: ${e.text}`, true); }
  });
}

async function unassignCert(c, target, button) {
  await busy(button, async () => {
    try {
      await api("POST", `/api/certs/${encodeURIComponent(c.id)}/unassign`, { target });
      notice(`${c.id} no longer assigned to ${target}.`);
      await refreshLe();
    } catch (e) { notice(`Unassign ${c.id}: ${e.text}`, true); }
  });
}

async function assignCert(c, sel, button) {
  if (!sel.value) { notice(`Choose the HTTPS Virtual Service for ${c.id}.`, true); sel.focus(); return; }
  await busy(button, async () => {
    try {
      await api("POST", `/api/certs/${encodeURIComponent(c.id)}/assign`, { target: sel.value });
      notice(`${c.id} assigned to ${sel.value}.`);
      await refreshLe();
    } catch (e) { notice(`Assign ${c.id}: ${e.text}`, true); }
  });
}

// Everything the screen shows, fetched again.
export async function refreshLe() {
  await Promise.all([loadAccount(), loadEligible(), loadVs()]);
  fillVsSelects();
  await loadCerts();
}

// The order watcher (request.js) redraws and reloads this table.
setCertTable({ render: renderCerts, reload: loadCerts, refreshAll: refreshLe });
