// Small enhancements of server-rendered pages; every page works without them.
"use strict";

// Password strength, shown as it is typed: <input data-strength="meter-id">.
function strength(password) {
  if (!password) return { score: 0, label: "" };
  let classes = 0;
  for (const pattern of [/[a-z]/, /[A-Z]/, /[0-9]/, /[^A-Za-z0-9]/]) if (pattern.test(password)) classes++;
  const unique = new Set(password).size;
  let score = 0;
  if (password.length >= 8) score++;
  if (password.length >= 12) score++;
  if (password.length >= 16 || (password.length >= 12 && classes >= 3)) score++;
  if (classes >= 3 && unique >= 8) score++;
  if (password.length < 8 || unique < 4) score = Math.min(score, 1);
  const labels = ["too short", "weak", "fair", "good", "strong"];
  return { score, label: password.length < 8 ? "too short: at least 8 characters" : labels[score] };
}

function wireStrength(input) {
  const meter = document.getElementById(input.dataset.strength);
  if (!meter) return;
  const bar = meter.querySelector("meter");
  const text = meter.querySelector(".strength-label");
  input.addEventListener("input", () => {
    const result = strength(input.value);
    if (bar) bar.value = result.score;
    if (text) text.textContent = result.label ? "Strength: " + result.label : "";
  });
}

// Copy buttons: <button data-copy="element-id">.
function wireCopy(button) {
  button.addEventListener("click", async () => {
    const source = document.getElementById(button.dataset.copy);
    if (!source) return;
    const text = source.value !== undefined ? source.value : source.textContent;
    try {
      await navigator.clipboard.writeText(text);
      button.textContent = "Copied";
    } catch (e) {
      if (source.select) source.select();
      button.textContent = "Press Ctrl+C to copy";
    }
    setTimeout(() => { button.textContent = button.dataset.label || "Copy"; }, 2000);
  });
}

// Forms asking for confirmation: <form data-confirm="Really?">.
function wireConfirm(form) {
  form.addEventListener("submit", (event) => {
    if (!window.confirm(form.dataset.confirm)) event.preventDefault();
  });
}

// Live progress from server-sent events: <section data-progress="/events/url"> whose children
// carry data-field="label|progress|step|error|ready|instance|reload". Each "progress" event is
// a JSON object {label, tone, progress, message, error, instance_url, done}; "end" closes it.
function showProgress(section, state) {
  const field = (name) => section.querySelector('[data-field="' + name + '"]');
  const label = field("label");
  if (label) {
    label.textContent = state.label;
    label.className = "badge " + (state.tone || "");
  }
  const bar = field("progress");
  if (bar) { bar.value = state.progress; bar.textContent = state.progress + "%"; }
  const step = field("step");
  if (step) step.textContent = state.message || "";
  const error = field("error");
  if (error) { error.textContent = state.error || ""; error.hidden = !state.error; }
  const link = field("instance");
  const ready = field("ready");
  const url = state.instance_url || "";
  if (link && /^https?:\/\//.test(url)) link.href = url;
  if (ready) ready.hidden = !url;
  const reload = field("reload");
  if (reload && state.done) reload.hidden = true;
}

function wireProgress(section) {
  if (!window.EventSource) return;
  const source = new EventSource(section.dataset.progress);
  source.addEventListener("progress", (event) => {
    const state = JSON.parse(event.data);
    showProgress(section, state);
    if (state.done) source.close();
  });
  source.addEventListener("end", () => source.close());
}

// A form sent once: its buttons wait for the answer, so a double-click is not two requests
// (the server copes with both anyway). Coming back to the page by "Back" enables them again.
function wireOnce(form) {
  form.addEventListener("submit", (event) => {
    if (event.defaultPrevented) return;
    setTimeout(() => form.querySelectorAll("button[type=submit]").forEach((b) => { b.disabled = true; }), 0);
  });
}
window.addEventListener("pageshow", () => {
  document.querySelectorAll("form button[type=submit]").forEach((b) => { b.disabled = false; });
});

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("[data-progress]").forEach(wireProgress);
  document.querySelectorAll("[data-strength]").forEach(wireStrength);
  document.querySelectorAll("[data-copy]").forEach(wireCopy);
  document.querySelectorAll("form[data-confirm]").forEach(wireConfirm);
  document.querySelectorAll('form[method="post"]').forEach(wireOnce);
});
