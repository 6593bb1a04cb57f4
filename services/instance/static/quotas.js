// Quotas that explain themselves: the live meters (devices, messages today with the burst
// allowance's level, API requests today), a banner while a notice holds (80% or 100% of a
// limit), and what the limits refused. They come over one server-sent stream
// (/api/quotas/stream: the meters every few seconds, what was refused when it changes), since
// every request counts against the license's API requests a day and polling would spend them.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const LABELS = {devices: "Devices", mqtt_messages: "Messages today", api_requests: "API requests today"};

  const n = (v) => Number(v).toLocaleString();
  const time = (iso) => new Date(iso).toLocaleTimeString([], {hour: "2-digit", minute: "2-digit"});

  function meter(el, id, label, used, limit, text, level) {
    return el("div", {class: "meter"}, el("label", {for: id}, label),
      el("p", {class: "big"}, text),
      el("progress", {id, class: level ? `level-${level}` : "", max: String(limit || 1), value: String(Math.min(used, limit || 1))}));
  }

  // The section's own meters (dashboard.js draws them once a minute) are kept live here; the
  // burst allowance and what was refused today are this block's own.
  function showMeters(el, q) {
    const levels = Object.fromEntries(q.notices.map((x) => [x.meter, x.level]));
    for (const key of Object.keys(LABELS)) {
      const m = q.meters[key], bar = $(`meter-${key}`);
      if (!bar) continue;
      bar.max = m.limit || 1; bar.value = Math.min(m.used, m.limit || 1);
      bar.className = levels[key] ? `level-${levels[key]}` : "";
      const big = bar.previousElementSibling;
      if (big) big.textContent = `${n(m.used)} of ${n(m.limit)} (${m.percent}%)`;
    }
    const b = q.meters.mqtt_messages.bucket;
    $("quota-meters").replaceChildren(
      meter(el, "quota-bucket", "Burst allowance", b.level, b.capacity,
        `${n(b.level)} of ${n(b.capacity)} readings, refilling ${n(b.refill_per_minute)} a minute`),
      el("div", {class: "meter"}, el("p", {class: "big"}, "Refused today"),
        el("p", {}, `${n(q.refused_today)} over a limit (below); rejected readings are in Data problems.`)));
  }

  function showNotices(el, notices) {
    $("quota-notices").replaceChildren(...notices.map((x) =>
      el("li", {class: x.level >= 100 ? "full" : ""}, `${x.message} (since ${time(x.at)})`)));
    const banner = $("quota-banner");
    banner.hidden = !notices.length;
    banner.classList.toggle("full", notices.some((x) => x.level >= 100));
    banner.textContent = notices.map((x) => x.message).join(" ");
  }

  function showLimited(el, spans) {
    const rows = spans.map((s) => el("tr", {},
      el("td", {}, s.summary), el("td", {}, time(s.from)), el("td", {}, time(s.to)),
      el("td", {}, n(s.count)), el("td", {}, s.meter === "burst" ? "burst allowance" : `${s.meter} ${n(s.limit)}`)));
    const tbody = document.querySelector("#quota-limited tbody");
    tbody.replaceChildren(...rows);
    if (!rows.length) tbody.append(el("tr", {}, el("td", {colspan: "5", class: "empty"}, "Nothing was refused: every reading and request was within the limits.")));
    const heads = [...document.querySelectorAll("#quota-limited thead th")].map((th) => th.textContent);
    for (const row of tbody.rows) [...row.cells].forEach((cell, i) => { cell.dataset.label = heads[i] || ""; });
  }

  let source = null, opened = 0;
  function connect() {
    const {el} = window.iotistic;
    source = new EventSource("/api/quotas/stream");
    source.addEventListener("quotas", (event) => {
      const q = JSON.parse(event.data);
      showMeters(el, q);
      showNotices(el, q.notices);
      $("quota-updated").textContent = `Updated ${new Date().toLocaleTimeString()}.`;
    });
    source.addEventListener("limited", (event) => showLimited(el, JSON.parse(event.data).limited));
  }
  // Opened once the page is signed in; opened again (at most every 30 s) if it was closed for
  // good (signed out, then in again). EventSource reconnects by itself after a network error.
  setInterval(() => {
    if (!window.iotistic || !window.dashboardReady || $("app").hidden) return;
    if (source && source.readyState !== EventSource.CLOSED) return;
    if (Date.now() - opened < 30000) return;
    opened = Date.now();
    connect();
  }, 1000);
})();
