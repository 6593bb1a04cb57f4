// The BME688's calibration in the dashboard: a badge per device in the device list ("calibrating:
// 2 h so far, usually 4 days for a new sensor"), a panel with the device's calibration history
// (opened from the badge), and the readings taken before calibration shaded in the charts, the
// live ones included. Works over dashboard.js's window.iotistic and its events.
"use strict";

(() => {
  const {api, el, when, state} = window.iotistic;
  const $ = (id) => document.getElementById(id);
  const BUCKET_MS = {"1m": 60e3, "5m": 300e3, "1h": 3600e3, "1d": 86400e3};
  const ORIGIN = Date.UTC(2000, 0, 1);  // the API's buckets start from here (date_bin)
  const SHADE = "#f59e0b";
  let charted = null;  // {spans: [{device_id, from, to}], bucket}: what the charts shade
  let opened = null;  // the device whose panel is open

  function duration(seconds) {
    if (seconds < 60) return `${Math.max(0, Math.round(seconds))} s`;
    if (seconds < 3600) return `${Math.round(seconds / 60)} min`;
    if (seconds < 2 * 86400) return `${Math.round(seconds / 3600)} h`;
    return `${(seconds / 86400).toFixed(1).replace(/\.0$/, "")} days`;
  }
  // A table's rows, or one saying it is empty; each cell labelled with its column for phones.
  function fill(selector, rows, empty) {
    const table = document.querySelector(selector), tbody = table.tBodies[0];
    const heads = [...table.querySelectorAll("thead th")].map((th) => th.textContent);
    tbody.replaceChildren(...rows);
    if (!rows.length) tbody.append(el("tr", {}, el("td", {colspan: String(heads.length), class: "empty"}, empty)));
    for (const row of tbody.rows) [...row.cells].forEach((cell, i) => { cell.dataset.label = heads[i] || ""; });
  }
  const soFar = (c) => (Date.now() - new Date(c.run_started)) / 1000;

  // --- the badge in the device list -----------------------------------------------------------
  function badgeText(c) {
    if (c.state === "calibrated") return "calibrated";
    const usual = c.expected ? `, ${c.expected.text}` : "";
    return `${c.state}: ${duration(soFar(c))} so far${usual}`;
  }
  function badge(d) {
    const c = d.calibration;
    if (!c || c.state === "unknown") return el("small", {class: "muted calibration-none"}, "calibration: no BSEC data yet");
    const late = c.expected && c.expected.longer_than_usual;
    const title = c.state === "calibrated" ? `calibrated since ${when(c.since)}` : `current run started ${when(c.run_started)}`;
    return el("button", {type: "button", class: `badge calibration-badge ${c.state}${late ? " late" : ""}`, title,
      "aria-haspopup": "dialog", onclick: () => openPanel(d)},
      badgeText(c), late ? " (longer than usual)" : "");
  }
  function decorate() {
    for (const row of document.querySelectorAll("#devices tbody tr[data-device]")) {
      if (row.querySelector(".calibration-badge, .calibration-none")) continue;
      const d = state.devices.find((x) => x.device_id === row.dataset.device);
      const cell = row.cells[1];
      if (d && cell) cell.append(el("br"), badge(d));
    }
  }
  new MutationObserver(decorate).observe(document.querySelector("#devices tbody"), {childList: true});

  // --- the panel: state and history -----------------------------------------------------------
  function facts(c) {
    const offset = c.temperature_offset == null ? "none" : `${c.temperature_offset > 0 ? "+" : ""}${c.temperature_offset} °C (self-heating; stored temperatures include it, the CSV lists it)`;
    const rows = [
      ["State", c.state === "unknown" ? "unknown: no reading with BSEC's iaq_accuracy yet" : `${c.state} (accuracy ${c.iaq_accuracy}) since ${when(c.since)}`],
      ["Current run started", when(c.run_started)],
      ["So far", c.expected ? `${duration(soFar(c))}; ${c.expected.text}${c.expected.longer_than_usual ? " (longer than usual: is the BSEC state kept, and does the sensor see fresh air?)" : ""}` : "–"],
      ["Sensor first seen", when(c.first_seen)],
      ["First calibrated", when(c.first_calibrated)],
      ["Drops to 0", String(c.drops)],
      ["Temperature offset applied", offset],
    ];
    return rows.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]);
  }
  const CHANGE = {unknown: "first reading", stabilising: "stabilising", calibrating: "calibrating", calibrated: "calibrated"};
  async function openPanel(d) {
    opened = d;
    $("calibration-name").textContent = d.name;
    $("calibration").hidden = false;
    const c = await api(`/api/devices/${d.device_id}/calibration`);
    if (opened !== d) return;
    d.calibration = {...d.calibration, ...c};
    $("calibration-facts").replaceChildren(...facts(c));
    fill("#calibration-runs", c.runs.map((r) => el("tr", {}, el("td", {}, when(r.started_at)),
      el("td", {}, r.calibrated_at ? when(r.calibrated_at) : "not yet"),
      el("td", {}, r.seconds_to_calibrated == null ? "–" : duration(r.seconds_to_calibrated)),
      el("td", {}, r.ended_at ? `${when(r.ended_at)}: ${r.ended_by}` : "current run"))), "No runs yet.");
    fill("#calibration-changes", c.changes.map((x) => el("tr", {class: x.dropped ? "dropped" : ""}, el("td", {}, when(x.at)),
      el("td", {}, `${CHANGE[x.from] || x.from} → ${x.to}${x.dropped ? " (drop to 0: a reset or a power cut)" : ""}`),
      el("td", {}, String(x.iaq_accuracy)))), "No changes yet.");
    $("calibration").focus();
  }
  $("calibration-close").addEventListener("click", () => {
    const id = opened && opened.device_id;
    opened = null; $("calibration").hidden = true;
    const back = id && document.querySelector(`#devices tr[data-device="${id}"] .calibration-badge`);
    (back || $("device-name")).focus();
  });

  // --- the charts: readings taken before calibration, shaded -----------------------------------
  function note() {
    let p = $("calibration-chart-note");
    if (!p) {
      p = el("p", {id: "calibration-chart-note", class: "muted", hidden: ""});
      $("chart-note").after(p);
    }
    return p;
  }
  function shade() {
    const shapes = charted.spans.map((s) => ({type: "rect", name: "calibrating", xref: "x", yref: "paper",
      x0: new Date(s.from).toISOString(), x1: new Date(s.to).toISOString(), y0: 0, y1: 1,
      fillcolor: SHADE, opacity: 0.2, line: {width: 0}, layer: "below"}));
    for (const chart of document.querySelectorAll(".charts .chart")) {
      if (!chart.layout) continue;
      const others = (chart.layout.shapes || []).filter((s) => s.name !== "calibrating");
      Plotly.relayout(chart, {shapes: [...others, ...shapes]});
    }
    const names = [...new Set(charted.spans.map((s) => s.name))];
    const p = note();
    p.hidden = !names.length;
    p.replaceChildren(el("span", {class: "calibration-swatch", "aria-hidden": "true"}),
      ` Shaded: readings taken before the sensor was calibrated (BSEC accuracy below 3), of ${names.join(", ")}.`);
  }
  document.addEventListener("iotistic:charts", (event) => {
    const {answers, devices, bucket} = event.detail;
    const spans = answers.flatMap((a, i) => (a.calibrating || []).map((s) =>
      ({device_id: devices[i].device_id, name: devices[i].name, from: Date.parse(s.from), to: Date.parse(s.to)})));
    charted = {spans, bucket};
    shade();
  });
  // A live reading taken before calibration widens its device's shading to its bucket's end.
  function shadeLive(r) {
    const shown = state.shown;
    if (!charted || !shown || !shown.live || !shown.devices.some((d) => d.device_id === r.device_id)) return;
    const step = BUCKET_MS[charted.bucket];
    const start = ORIGIN + Math.floor((Date.parse(r.ts) - ORIGIN) / step) * step;
    const span = charted.spans.find((s) => s.device_id === r.device_id && s.from <= start && s.to >= start);
    if (span && span.to >= start + step) return;
    if (span) span.to = start + step;
    else {
      const d = shown.devices.find((x) => x.device_id === r.device_id);
      charted.spans.push({device_id: r.device_id, name: d.name, from: start, to: start + step});
    }
    shade();
  }
  // A reading whose accuracy means another state than the device's badge shows: ask again.
  const STATE_OF = (a) => a <= 0 ? "stabilising" : a >= 3 ? "calibrated" : "calibrating";
  const asking = new Set();
  async function follow(r) {
    const d = state.devices.find((x) => x.device_id === r.device_id);
    if (!d || asking.has(d.device_id) || (d.calibration && d.calibration.state === STATE_OF(r.iaq_accuracy))) return;
    asking.add(d.device_id);
    try {
      d.calibration = await api(`/api/devices/${d.device_id}/calibration`);
      const row = document.querySelector(`#devices tr[data-device="${d.device_id}"]`);
      const old = row && row.querySelector(".calibration-badge, .calibration-none");
      if (old) old.replaceWith(badge(d));
      if (opened && opened.device_id === d.device_id) openPanel(d);
    } catch (e) { /* the next list refresh shows it */ }
    finally { asking.delete(d.device_id); }
  }
  document.addEventListener("iotistic:reading", (event) => {
    const r = event.detail;
    if (r.iaq_accuracy == null) return;
    if (r.iaq_accuracy < 3) shadeLive(r);
    follow(r);
  });
})();
