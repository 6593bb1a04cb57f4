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

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("[data-strength]").forEach(wireStrength);
  document.querySelectorAll("[data-copy]").forEach(wireCopy);
  document.querySelectorAll("form[data-confirm]").forEach(wireConfirm);
});
