"use strict";
// Indoor-air alerts in the Alerts section: the rules every instance has by default (offline,
// mould risk, stale sensor, CO₂) tuned here, new ones added, and why each alert fired.
// dashboard.js draws the rules table and calls show() after each load, tune() for Edit.
(() => {
  const {api, el, when, state} = window.iotistic;
  const $ = (id) => document.getElementById(id);
  const KINDS = {offline: "Device offline", mould_risk: "Mould risk", stale_sensor: "Stale sensor", co2_high: "CO₂ too high"};
  const PARAMS = {
    missed_intervals: ["Missed reporting intervals", "", "1"],
    default_interval_seconds: ["Reporting interval where a device sets none", "s", "1"],
    humidity_above: ["Relative humidity above", "%", "any"],
    humidity_hours: ["for", "h", "any"],
    dew_point_margin: ["Dew point within", "°C of the surface", "any"],
    dew_point_minutes: ["for (0: at once)", "min", "1"],
    surface_temperature: ["Surface temperature (empty: the device's custom surface_temperature)", "°C", "any"],
    hours: ["Unchanged for", "h", "any"],
    ppm_above: ["CO₂-equivalent above", "ppm", "any"],
    minutes: ["for", "min", "1"],
  };
  let tuning = null;

  function deviceName(id) { return (state.devices.find((d) => d.device_id === id) || {name: id}).name; }

  function tune(rule) {
    tuning = rule;
    $("indoor-tune-name").textContent = rule.name;
    $("indoor-error").textContent = "";
    $("indoor-params").replaceChildren(...Object.entries(rule.params).map(([name, value]) => {
      const [label, unit, step] = PARAMS[name] || [name, "", "any"];
      const id = `indoor-param-${name}`;
      return el("div", {class: "indoor-param"}, el("label", {for: id}, `${label}${unit ? ` (${unit})` : ""}`),
        el("input", {id, name, type: "number", step, value: value == null ? "" : String(value)}));
    }));
    $("indoor-name").value = rule.name;
    $("indoor-calibrating").checked = !!rule.include_calibrating;
    $("indoor-tune").hidden = false;
    $("indoor-tune").scrollIntoView({block: "nearest"});
    $("indoor-name").focus();
  }

  function tuned() {
    const params = {};
    for (const input of $("indoor-params").querySelectorAll("input")) {
      params[input.name] = input.value.trim() === "" ? null : Number(input.value);
    }
    return {name: $("indoor-name").value.trim() || tuning.name, params, include_calibrating: $("indoor-calibrating").checked};
  }

  function whyItem(h, resolution, rules) {
    const rule = rules.find((r) => r.rule_id === h.rule_id);
    return el("li", {"data-rule": h.rule_id},
      el("strong", {}, `${rule ? rule.name : h.message.split(":")[0]} on ${deviceName(h.device_id)}`),
      ` fired ${when(h.at)}: `, el("span", {class: "why"}, h.explanation || h.message),
      resolution ? el("div", {class: "muted"}, `Resolved ${when(resolution.at)}: ${resolution.explanation || resolution.message}`) : null);
  }

  // Under each indoor-air rule's state: what it sees now, per device (pending: so far; firing).
  function explainStates(rules) {
    for (const r of rules.filter((x) => x.kind && x.kind !== "threshold")) {
      const cell = document.querySelector(`#rules tr[data-rule="${r.rule_id}"] td:nth-child(4)`);
      if (!cell || r.muted) continue;
      for (const s of (r.states || []).filter((x) => x.explanation && x.state !== "ok")) {
        cell.append(el("div", {class: `state-why ${s.state}`}, `${deviceName(s.device_id)} ${s.state}: ${s.explanation}`));
      }
    }
  }

  function show(rules, history) {
    explainStates(rules);
    const resolved = new Map();  // a firing's resolution: the next "resolved" of its rule and device
    const open = new Map();
    for (const h of [...history].reverse()) {
      const key = `${h.rule_id} ${h.device_id}`;
      if (h.event === "firing") open.set(key, h);
      else if (open.has(key)) { resolved.set(open.get(key).id, h); open.delete(key); }
    }
    const firings = history.filter((h) => h.event === "firing").slice(0, 20);
    $("indoor-why").replaceChildren(...firings.map((h) => whyItem(h, resolved.get(h.id), rules)));
    $("indoor-why-empty").hidden = firings.length > 0;
    const present = new Set(rules.map((r) => r.kind));
    $("indoor-kind").replaceChildren(...Object.entries(KINDS).map(([kind, name]) =>
      el("option", {value: kind}, present.has(kind) ? name : `${name} (not in your rules)`)));
  }

  async function reload() { await window.loadAlerts(); }  // dashboard.js redraws the rules

  $("indoor-tune").addEventListener("submit", async (event) => {
    event.preventDefault();
    $("indoor-error").textContent = "";
    try {
      await api(`/api/alerts/rules/${tuning.rule_id}`, {method: "PUT", body: tuned()});
      $("indoor-tune").hidden = true; tuning = null;
      await reload();
    } catch (e) { $("indoor-error").textContent = e.message; }
  });
  $("indoor-cancel").addEventListener("click", () => { $("indoor-tune").hidden = true; tuning = null; });
  $("indoor-add").addEventListener("submit", async (event) => {
    event.preventDefault();
    const kind = $("indoor-kind").value;
    try { await api("/api/alerts/rules", {method: "POST", body: {kind, name: KINDS[kind]}}); await reload(); }
    catch (e) { $("indoor-error").textContent = e.message; }
  });

  window.indoorAlerts = {show, tune};
})();
