"use strict";
// Integrations (Alerts section): the customer's systems, sent readings and events as they
// happen, and backfills of a past range, with their progress. Uses the page's helpers
// (window.iotistic, from dashboard.js); fetched when the Alerts section is shown, and every
// five seconds while a backfill runs there.
(() => {
  const {api, el, when, ago} = window.iotistic;
  const $ = (id) => document.getElementById(id);
  const KINDS = {readings: "readings as they are stored", alert: "alert firings", "calibration.changed": "calibration changes",
    "quota.notice": "quota notices (80%, 100%)", "quota.limited": "readings dropped over a limit"};
  const POLL_MS = 5000;
  let integrations = [], latest = {}, backfilling = null, poll = null;

  function visible() { return !$("section-alerts").hidden && !document.hidden; }
  function fail(id, error) { $(id).textContent = error.message; }

  function deliveryCell(i) {
    const d = i.delivery;
    if (d.state === "failing") {
      return el("td", {}, el("span", {class: "badge failing"}, "failing"),
        ` since ${when(d.failing_since)}: ${d.last_error || ""}; ${d.failures} tries, next ${when(d.next_attempt_at)}`);
    }
    const last = d.delivered_at ? `last POST ${ago(d.delivered_at)}` : "nothing new to send yet";
    return el("td", {}, el("span", {class: "badge sync"}, "ok"), ` ${last}`);
  }
  function backfillCell(i) {
    const b = latest[i.integration_id];
    if (!b) return el("td", {}, "–");
    const total = b.total == null ? "…" : b.total.toLocaleString();
    const cell = el("td", {}, el("span", {class: `badge ${b.state === "running" ? "running" : b.state === "done" ? "sync" : ""}`}, b.state),
      ` ${b.done.toLocaleString()} of ${total}`);
    if (b.total) cell.append(" ", el("progress", {max: String(b.total), value: String(b.done), "aria-label": "backfill progress"}));
    if (b.rate) cell.append(` at ${Math.round(b.rate)}/s`);
    if (b.last_error) cell.append(` (retrying: ${b.last_error})`);
    if (b.state === "queued" || b.state === "running") {
      cell.append(" ", el("button", {type: "button", onclick: () => cancel(i, b)}, "Cancel"));
    }
    return cell;
  }
  function row(i) {
    return el("tr", {},
      el("td", {}, el("strong", {}, i.name), el("br"), el("code", {}, i.url)),
      el("td", {}, i.kinds.map((k) => KINDS[k] || k).join(", ")),
      deliveryCell(i), backfillCell(i),
      el("td", {class: "actions"},
        el("button", {type: "button", onclick: () => openBackfill(i)}, "Backfill…"), " ",
        el("button", {type: "button", onclick: () => remove(i)}, "Delete")));
  }
  function draw() {
    const tbody = document.querySelector("#integrations-table tbody");
    const heads = [...document.querySelectorAll("#integrations-table thead th")].map((th) => th.textContent);
    tbody.replaceChildren(...integrations.map(row));
    if (!integrations.length) tbody.append(el("tr", {}, el("td", {colspan: "5", class: "empty"}, "No integrations yet.")));
    for (const tr of tbody.rows) [...tr.cells].forEach((cell, n) => { cell.dataset.label = heads[n] || ""; });
  }
  async function load() {
    integrations = (await api("/api/integrations")).integrations || [];
    const lists = await Promise.all(integrations.map((i) => api(`/api/integrations/${i.integration_id}/backfills`)));
    latest = {};
    integrations.forEach((i, n) => { latest[i.integration_id] = (lists[n].backfills || [])[0]; });
    draw();
    const running = Object.values(latest).some((b) => b && (b.state === "queued" || b.state === "running"));
    clearTimeout(poll);
    if (running) poll = setTimeout(() => { if (visible()) load().catch(() => {}); }, POLL_MS);
  }
  function showSecret(answer) {
    if (!answer || !answer.secret) return;
    $("integration-secret-value").textContent = answer.secret;
    $("integration-secret").hidden = false; $("integration-secret").focus();
  }
  async function remove(i) {
    if (!confirm(`Delete the integration ${i.name}? Nothing more is sent to it.`)) return;
    try { await api(`/api/integrations/${i.integration_id}`, {method: "DELETE"}); await load(); }
    catch (e) { fail("integration-error", e); }
  }
  async function cancel(i, b) {
    try { await api(`/api/integrations/${i.integration_id}/backfills/${b.backfill_id}`, {method: "DELETE"}); await load(); }
    catch (e) { fail("integration-error", e); }
  }
  function openBackfill(i) {
    backfilling = i;
    $("backfill-title").textContent = `Backfill ${i.name}`;
    $("backfill-error").textContent = "";
    const local = (d) => new Date(d - d.getTimezoneOffset() * 60000).toISOString().slice(0, 16);
    const now = new Date();
    $("backfill-to").value = local(now);
    $("backfill-from").value = local(new Date(now - 7 * 86400e3));
    $("backfill-form").hidden = false; $("backfill-from").focus();
  }

  $("integration-kinds").replaceChildren(...Object.entries(KINDS).map(([kind, text]) =>
    el("label", {}, el("input", {type: "checkbox", value: kind, ...(kind === "readings" ? {checked: ""} : {})}), ` ${text}`)));
  $("integration-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    $("integration-error").textContent = "";
    const body = {name: $("integration-name").value.trim(), url: $("integration-url").value.trim(),
      kinds: [...document.querySelectorAll("#integration-kinds input:checked")].map((c) => c.value)};
    try {
      showSecret(await api("/api/integrations", {method: "POST", body}));
      $("integration-form").reset();
      await load();
    } catch (e) { fail("integration-error", e); }
  });
  $("integration-secret-done").addEventListener("click", () => {
    $("integration-secret").hidden = true; $("integration-secret-value").textContent = "";
  });
  $("backfill-close").addEventListener("click", () => { $("backfill-form").hidden = true; backfilling = null; });
  $("backfill-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!backfilling) return;
    const body = {from: new Date($("backfill-from").value).toISOString(), to: new Date($("backfill-to").value).toISOString(),
      rate: Number($("backfill-rate").value || 500)};
    try {
      await api(`/api/integrations/${backfilling.integration_id}/backfills`, {method: "POST", body});
      $("backfill-form").hidden = true; backfilling = null;
      await load();
    } catch (e) { fail("backfill-error", e); }
  });
  document.querySelector('nav button[data-section="alerts"]').addEventListener("click", () => load().catch(() => {}));
  document.addEventListener("visibilitychange", () => { if (visible()) load().catch(() => {}); });
  if (location.hash === "#alerts") load().catch(() => {});
})();
