// lbproxy admin page, Virtual Services view: every VS with its listener, rules in precedence
// order (injected ACME challenge rules marked), SubVSs and real servers with health, state and
// weight, and the run-time enable / disable / drain / weight buttons (POST /api/servers).
import { $, api, busy, h, notice, state } from "./core.js";

export async function loadVs() {
  const [vs, status] = await Promise.all([api("GET", "/api/vs"), api("GET", "/api/status")]);
  state.vs = vs.virtual_services;
  state.status = status;
  renderVs();
}

function liveServer(vsName, subvs, address) {
  const svc = ((state.status && state.status.services) || []).find(s => s.name === vsName);
  if (!svc) return null;
  const pool = subvs ? (svc.subvs.find(s => s.name === subvs) || {}).real_servers : svc.real_servers;
  return (pool || []).find(r => r.address === address) || null;
}

function serverRow(vs, subvs, rs) {
  const live = liveServer(vs.name, subvs, rs.address) || {};
  const up = live.up !== undefined ? live.up : (rs.health && rs.health.healthy);
  const st = live.state || (rs.enabled ? "enabled" : "disabled");
  const weight = live.weight !== undefined && live.weight !== null ? live.weight : rs.weight;
  const where = `${rs.address} in ${vs.name}${subvs ? "/" + subvs : ""}`;
  const send = async (body, button) => busy(button, async () => {
    try {
      await api("POST", "/api/servers", { address: rs.address, vs: vs.name,
        ...(subvs ? { subvs } : {}), ...body });
      notice(`${where}: ${body.state || "weight " + body.weight}.`);
      await loadVs();
    } catch (e) { notice(`${where}: ${e.text}`, true); }
  });
  const w = h("input", { type: "number", min: 0, max: 65535, value: weight,
    "aria-label": `Weight of ${where}` });
  const act = (label, s) => h("button", { type: "button", class: "secondary", text: label,
    disabled: st === s, "aria-label": `${label} ${where}`,
    onclick: ev => send({ state: s }, ev.target) });
  return h("div", { class: "rs-row", "data-address": rs.address, "data-state": st },
    h("span", { class: "addr", text: rs.address }),
    h("span", { class: `badge ${up === true ? "up" : up === false ? "down" : ""}`,
      text: up === true ? "up" : up === false ? "down" : "health unknown" }),
    h("span", { class: "rs-state", text: st }),
    h("span", { text: `weight ${weight}` }),
    act("Enable", "enabled"), act("Disable", "disabled"), act("Drain", "drain"),
    w, h("button", { type: "button", class: "secondary", text: "Set weight",
      onclick: ev => send({ weight: Number(w.value) }, ev.target) }));
}

let shownVs = "";

// Re-rendered only when what it shows changed (polling must not reset a weight being typed).
export function renderVs() {
  const list = $("#vs-list");
  const services = (state.status && state.status.services) || [];
  const servers = rs => rs.map(r => [r.address, r.up, r.state, r.weight, r.enabled,
    r.health && r.health.healthy]);
  const key = JSON.stringify([
    state.vs.map(vs => [vs.name, vs.listen, vs.protocol, vs.kind, vs.tls, vs.rules,
      servers(vs.real_servers), vs.subvs.map(s => [s.name, s.not_available_status,
        servers(s.real_servers)])]),
    services.map(s => [s.name, s.listening, servers(s.real_servers),
      s.subvs.map(x => [x.name, servers(x.real_servers)])])]);
  if (key === shownVs) return;
  shownVs = key;
  list.replaceChildren(...state.vs.map(vs => {
    const svc = services.find(s => s.name === vs.name);
    const listening = svc ? svc.listening : null;
    const injectedSubvs = new Set(vs.rules.filter(r => r.injected).map(r => r.subvs));
    return h("article", { class: "vs-card", "data-vs": vs.name, "aria-label": `Virtual Service ${vs.name}` },
      h("h3", {}, vs.name, h("span", { class: "badge", text: vs.protocol }),
        h("span", { text: vs.listen }),
        h("span", { class: `badge ${listening ? "up" : listening === false ? "down" : ""}`,
          text: listening ? "listening" : listening === false ? "not listening" : vs.kind })),
      vs.tls ? h("p", { text: `Certificates: ${vs.tls.certificates.join(", ") || "-"}` +
        (vs.tls.default_certificate ? ` (default ${vs.tls.default_certificate})` : "") }) : null,
      vs.rules.length ? h("div", {}, h("h4", { text: "Rules (precedence order)" }),
        h("ol", { class: "rules" }, ...vs.rules.map(r => h("li", { "data-injected": r.injected ? "1" : null },
          `${r.rule} \u2192 ${r.subvs}`, r.injected ? " " : null,
          r.injected ? h("span", { class: "badge challenge", text: "ACME challenge (temporary)" }) : null))))
        : null,
      vs.real_servers.length ? h("div", {}, h("h4", { text: "Real servers" }),
        ...vs.real_servers.map(rs => serverRow(vs, "", rs))) : null,
      ...vs.subvs.map(s => h("div", { class: `subvs${injectedSubvs.has(s.name) ? " challenge" : ""}`,
        "data-subvs": s.name },
        h("h4", {}, `SubVS ${s.name}`, injectedSubvs.has(s.name) ?
          h("span", { class: "badge challenge", text: " challenge SubVS" }) : null),
        s.real_servers.length ? s.real_servers.map(rs => serverRow(vs, s.name, rs)) :
          h("p", { class: "hint", text: `No real servers: answers ${s.not_available_status}.` }))));
  }));
}

