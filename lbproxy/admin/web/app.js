// lbproxy admin page, entry point: login and logout, backup / restore, and the wiring of every
// form and button. The page is plain ES modules served by the admin listener: no CDN, no build.
import { $, api, busy, clearErrors, formError, hooks, notice, setFieldError, state } from "./core.js";
import { refreshLe, register, setDirectory, setPeriod, uploadKey } from "./certs.js";
import { addSan, challengeChanged, renumberSans, requestCert, stopWatching } from "./request.js";
import { loadVs } from "./vs.js";

// -- login / logout ----------------------------------------------------------------------------

function showLogin(msg) {
  state.csrf = "";
  stopWatching();
  $("#app").hidden = true;
  $("#nav").hidden = true;
  $("#logout").hidden = true;
  $("#login").hidden = false;
  if (msg) notice(msg);
  $("#login-token").focus();
}

async function showApp() {
  $("#login").hidden = true;
  $("#app").hidden = false;
  $("#nav").hidden = false;
  $("#logout").hidden = false;
  await refreshAll();
}

async function login(ev) {
  ev.preventDefault();
  const form = ev.target, input = $("#login-token");
  clearErrors(form);
  if (!input.value.trim()) { setFieldError(input, "Enter the admin token.").focus(); return; }
  try {
    const data = await api("POST", "/ui/login", { token: input.value.trim() });
    state.csrf = data.csrf;
    input.value = "";
    notice("Logged in.");
    await showApp();
  } catch (e) {
    setFieldError(input, e.text).focus();
  }
}

async function logout() {
  try { await api("POST", "/ui/logout"); } catch (_e) { /* the session is gone either way */ }
  showLogin("Logged out.");
}

// -- backup / restore --------------------------------------------------------------------------

function b64ToBytes(b64) {
  const bin = atob(b64);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

function bytesToB64(buf) {
  const bytes = new Uint8Array(buf);
  let bin = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    bin += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return btoa(bin);
}

async function backup(ev) {
  ev.preventDefault();
  const form = ev.target, pass = $("#backup-pass");
  clearErrors(form);
  if (!pass.value) { setFieldError(pass, "Enter a passphrase to encrypt the backup.").focus(); return; }
  await busy(form.querySelector("button"), async () => {
    try {
      const data = await api("POST", "/api/le/backup", { passphrase: pass.value,
        vs: $("#backup-vs").checked, certs: $("#backup-certs").checked });
      const blob = new Blob([b64ToBytes(data.backup)], { type: "application/octet-stream" });
      const link = $("#backup-link");
      if (link.href) URL.revokeObjectURL(link.href);
      link.href = URL.createObjectURL(blob);
      link.download = `lbproxy-backup-${new Date().toISOString().slice(0, 10)}.bin`;
      link.hidden = false;
      link.click();
      pass.value = "";
      notice("Backup made (encrypted with the passphrase).");
    } catch (e) { formError(form, e, pass); }
  });
}

async function restore(ev) {
  ev.preventDefault();
  const form = ev.target, file = $("#restore-file"), pass = $("#restore-pass");
  clearErrors(form);
  if (!file.files.length) { setFieldError(file, "Choose a backup file.").focus(); return; }
  if (!pass.value) { setFieldError(pass, "Enter the backup's passphrase.").focus(); return; }
  const body = { backup: bytesToB64(await file.files[0].arrayBuffer()), passphrase: pass.value,
    vs: $("#restore-vs").checked, certs: $("#restore-certs").checked };
  await busy(form.querySelector("button"), async () => {
    try {
      await api("POST", "/api/le/restore", body);
      pass.value = "";
      notice("Backup restored.");
      await refreshAll();
    } catch (e) { formError(form, e, /passphrase/i.test(e.text) ? pass : file); }
  });
}

// -- start -------------------------------------------------------------------------------------

async function refreshAll() {
  try {
    await refreshLe();
  } catch (e) {
    if (e.status !== 401) notice(e.text, true);
  }
}

async function start() {
  $("#login-form").addEventListener("submit", login);
  $("#logout").addEventListener("click", logout);
  $("#dir-form").addEventListener("submit", setDirectory);
  $("#reg-form").addEventListener("submit", register);
  $("#key-form").addEventListener("submit", uploadKey);
  $("#period-form").addEventListener("submit", setPeriod);
  $("#req-form").addEventListener("submit", requestCert);
  $("#san-add").addEventListener("click", () => addSan().focus());
  $("#req-challenge").addEventListener("change", challengeChanged);
  $("#req-ec").addEventListener("change", ev => { $("#req-size").disabled = ev.target.checked; });
  $("#vs-refresh").addEventListener("click", () => loadVs().catch(e => notice(e.text, true)));
  $("#backup-form").addEventListener("submit", backup);
  $("#restore-form").addEventListener("submit", restore);
  renumberSans();
  const s = await api("GET", "/ui/session");
  if (s.logged_in) {
    state.csrf = s.csrf;
    await showApp();
  } else {
    showLogin("");
  }
  document.body.dataset.ready = "1";
}

hooks.sessionEnded = showLogin;
// A module runs once the document is parsed.
start().catch(e => notice(e.text || String(e), true));