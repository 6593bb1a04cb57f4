// Quotas that explain themselves: the live meters of GET /api/quotas (devices, messages today
// with the burst allowance's level, API requests today), a banner while a notice holds (80% or
// 100% of a limit), and what the limits refused (GET /api/quotas/limited). Every request counts
// against the license's API requests a day: the meters are fetched every 10 s while the
// "Usage and license" section is in view and the page visible, once a minute otherwise.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const LIVE_MS = 10000, BACKGROUND_MS = 60000;
  const LABELS = {devices: "Devices", mqtt_messages: "Messages today", api_requests: "API requests today"};
  let last = 0, lastSection = null, busy = false;

  const n = (v) => Number(v).toLocaleString();
  const time = (iso) => new Date(iso).toLocaleTimeString([], {hour: "2-digit", minute: "2-digit"});

  function meter(el, id, label, used, limit, text, level) {
    return el("div", {class: "meter"}, el("label", {for: id}, label),
      el("p", {class: "big"}, text),
      el("progress", {id, class: level ? `level-${level}` : "", max: String(limit || 1), value: String(Math.min(used, limit || 1))}));
  }

  function showMeters(el, q) {
    const levels = Object.fromEntries(q.notices.map((x) => [x.meter, x.level]));
    const cards = Object.entries(LABELS).map(([key, label]) => {
      const m = q.meters[key];
      return meter(el, `quota-${key}`, label, m.used, m.limit, `${n(m.used)} of ${n(m.limit)} (${m.percent}%)`, levels[key]);
    });
    const b = q.meters.mqtt_messages.bucket;
    cards.splice(2, 0, meter(el, "quota-bucket", "Burst allowance", b.level, b.capacity,
      `${n(b.level)} of ${n(b.capacity)} readings, refilling ${n(b.refill_per_minute)} a minute`));
    cards.push(el("div", {class: "meter"}, el("p", {class: "big"}, "Refused today"),
      el("p", {}, `${n(q.refused_today)} over a limit (below); rejected readings are in Data problems.`)));
    $("quota-meters").replaceChildren(...cards);
    $("meters").hidden = true;  // the page's first meters, fetched once a minute: these are live
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

  async function load(withLimited) {
    const {api, el} = window.iotistic;
    const [q, limited] = await Promise.all([api("/api/quotas"), withLimited ? api("/api/quotas/limited") : null]);
    showMeters(el, q);
    showNotices(el, q.notices);
    if (limited) showLimited(el, limited.limited);
    $("quota-updated").textContent = `Updated ${new Date().toLocaleTimeString()}.`;
    window.quotasShown = (window.quotasShown || 0) + 1;
  }

  async function tick() {
    const iq = window.iotistic;
    if (!iq || busy || $("app").hidden || !window.dashboardReady) return;
    const inView = iq.state.section === "usage";
    const opened = inView && lastSection !== "usage";
    lastSection = iq.state.section;
    if (document.hidden && !opened) return;
    if (!opened && Date.now() - last < (inView ? LIVE_MS : BACKGROUND_MS)) return;
    busy = true;
    last = Date.now();
    try { await load(inView); } catch (e) { /* signed out or away: the next turn tries again */ }
    finally { busy = false; }
  }
  setInterval(tick, 1000);
})();
