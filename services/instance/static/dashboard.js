// The instance's dashboard: plain JavaScript over the instance's JSON API, no build step.
// Reads use the session cookie; every change sends the session's CSRF token (X-CSRF-Token).
"use strict";

const $ = (id) => document.getElementById(id);
const METRICS = {
  temperature: {title: "Temperature", unit: "°C"},
  humidity: {title: "Humidity", unit: "%RH"},
  pressure: {title: "Pressure", unit: "hPa"},
  gas_resistance: {title: "Gas resistance", unit: "Ω"},
  iaq: {title: "IAQ (Bosch index)", unit: ""},
  co2_equivalent: {title: "CO₂-equivalent", unit: "ppm"},
  breath_voc_equivalent: {title: "Breath-VOC equivalent", unit: "ppm"},
};
const OPTIONAL = ["co2_equivalent", "breath_voc_equivalent"];
const IAQ_BANDS = [
  [0, 50, "excellent", "#00e400"], [51, 100, "good", "#92d050"], [101, 150, "lightly polluted", "#ffff00"],
  [151, 200, "moderately polluted", "#ff7e00"], [201, 250, "heavily polluted", "#ff0000"],
  [251, 350, "severely polluted", "#99004c"], [351, 500, "extremely polluted", "#663300"],
];
const RANGES = {"1h": 3600e3, "24h": 86400e3, "7d": 7 * 86400e3, "30d": 30 * 86400e3};
const BUCKET_TEXT = {"1m": "1 minute", "5m": "5 minutes", "1h": "1 hour", "1d": "1 day"};
const state = {csrf: null, devices: [], selected: [], rules: [], editing: null, renaming: null, shown: null,
  section: "devices", started: false, keys: [], configuring: null, configPoll: null};

// --- small helpers ------------------------------------------------------------------------------
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) if (child != null) node.append(child instanceof Node ? child : String(child));
  return node;
}
const fmt = (v) => v == null ? "–" : typeof v === "number" ? String(Number(v.toPrecision(6))) : String(v);
const when = (iso) => iso ? new Date(iso).toLocaleString() : "–";
function ago(iso) {
  if (!iso) return "never";
  const s = Math.max(0, Math.round((Date.now() - new Date(iso)) / 1000));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} days ago`;
}
// On a phone each row is a card, each cell labelled with its column (data-label, in the CSS).
function labelCells(table) {
  const heads = [...table.querySelectorAll("thead th")].map((th) => th.textContent);
  for (const row of table.tBodies[0].rows) [...row.cells].forEach((cell, i) => { cell.dataset.label = heads[i] || ""; });
}
function fill(selector, rows, empty) {
  const tbody = document.querySelector(`${selector} tbody`);
  const columns = String(tbody.closest("table").querySelectorAll("thead th").length);
  tbody.replaceChildren(...rows);
  if (!rows.length) tbody.append(el("tr", {}, el("td", {colspan: columns, class: "empty"}, empty)));
  labelCells(tbody.closest("table"));
}
function notice(text) { const n = $("notice"); n.textContent = text; n.hidden = !text; }

async function api(path, options = {}) {
  const method = options.method || "GET";
  const headers = {};
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  if (method !== "GET") headers["X-CSRF-Token"] = state.csrf || "";
  const answer = await fetch(path, {method, headers, credentials: "same-origin",
    body: options.body === undefined ? undefined : JSON.stringify(options.body)});
  if (answer.status === 401) { showLogin(); throw new Error("signed out"); }
  if (answer.status === 403 && method !== "GET" && !options.retried) {
    const body = await answer.clone().json().catch(() => ({}));
    if (/CSRF/.test((body.error || {}).message || "")) {  // e.g. the instance restarted
      await loadCsrf();
      return api(path, {...options, retried: true});
    }
  }
  if (answer.status === 204) return null;
  const body = await answer.json().catch(() => ({}));
  if (!answer.ok) {
    const error = body.error || {};
    const fields = (error.fields || []).map((f) => `${f.field} ${f.reason}`).join("; ");
    throw new Error([error.message || `HTTP ${answer.status}`, fields].filter(Boolean).join(": "));
  }
  return body;
}
async function loadCsrf() { state.csrf = (await api("/dashboard/session")).csrf_token; }

async function copyText(text, button) {
  try { await navigator.clipboard.writeText(text); }
  catch (e) {  // no clipboard API outside a secure context: select and copy
    const area = el("textarea", {class: "sr-only", "aria-hidden": "true"}, text);
    document.body.append(area); area.select(); document.execCommand("copy"); area.remove();
  }
  button.dataset.label = button.dataset.label || button.textContent;
  button.textContent = "Copied"; setTimeout(() => { button.textContent = button.dataset.label; }, 1500);
}
document.addEventListener("click", (event) => {
  const button = event.target.closest("button[data-copy]");
  if (!button) return;
  const source = $(button.dataset.copy);
  copyText(source.dataset.value || source.textContent, button);
});

// --- sign-in and sections -------------------------------------------------------------------------
function showLogin() { $("app").hidden = true; $("login").hidden = false; }
$("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const answer = await fetch("/dashboard/login", {method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify({email: $("email").value, password: $("password").value})});
  const body = await answer.json().catch(() => ({}));
  if (answer.ok) { state.csrf = body.csrf_token; $("login").hidden = true; start(); }
  else $("login-error").textContent = (body.error && body.error.message) || "sign-in failed";
});
$("logout").addEventListener("click", async () => {
  await fetch("/dashboard/logout", {method: "POST"}); location.reload();
});
const LOADERS = {devices: () => Promise.all([loadDevices(), loadProvisioning(), refreshConfig()]), charts: () => loadCharts(), alerts: () => loadAlerts(),
  problems: () => loadProblems(), usage: () => loadUsage()};
function showSection(name, load = true) {
  state.section = name;
  for (const button of document.querySelectorAll("nav button")) {
    if (button.dataset.section === name) button.setAttribute("aria-current", "page");
    else button.removeAttribute("aria-current");
  }
  for (const section of document.querySelectorAll("main > section")) section.hidden = section.id !== `section-${name}`;
  if (name === "charts") for (const metric of Object.keys(METRICS)) {
    const chart = $(`chart-${metric}`); if (chart.data && !chart.hidden) Plotly.Plots.resize(chart);
  }
  if (location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
  if (load) LOADERS[name]().catch((e) => notice(e.message));
}
for (const button of document.querySelectorAll("nav button")) button.addEventListener("click", () => showSection(button.dataset.section));

// --- devices --------------------------------------------------------------------------------------
function accuracy(latest) {
  if (!latest || latest.iaq_accuracy == null) return "";
  const a = latest.iaq_accuracy;
  return ` (accuracy ${a}: ${a >= 3 ? "calibrated" : "calibrating"})`;
}
const PROVISIONING = {provisioned: "provisioned", pending: "pending: waiting for its key exchange", manual: "added by hand"};
function fleetFacts(d) {  // a device that registered itself: its uuid, type and where its registration is
  if (!d.uuid) return [];
  return [el("br"), el("small", {}, "uuid ", el("code", {}, d.uuid)), el("br"),
    el("small", {}, `type ${d.device_type || "–"} · `,
      el("span", {class: d.provisioning === "provisioned" ? "on" : "pending"}, PROVISIONING[d.provisioning] || d.provisioning))];
}
function deviceRow(d) {
  const l = d.latest || {};
  const online = d.online && Date.now() - new Date(d.last_seen) < 120e3;  // as the API counts it
  const name = el("td", {}, el("strong", {}, d.name), el("br"), el("small", {class: "muted"}, d.device_id), ...fleetFacts(d));
  const actions = el("td", {class: "actions"},
    el("button", {type: "button", class: "secondary", "aria-label": `Configuration of ${d.name}`, onclick: () => openConfig(d)}, "Configuration"),
    el("button", {type: "button", class: "secondary", onclick: () => renameForm(d, name)}, "Rename"),
    el("button", {type: "button", class: "danger", onclick: () => deleteDevice(d)}, "Delete"));
  return el("tr", {"data-device": d.device_id}, name,
    el("td", {}, el("span", {class: online ? "on" : "off"}, online ? "online" : "offline"), el("br"),
      el("small", {}, `last seen ${ago(d.last_seen)}`), el("br"),
      el("small", {class: "muted", title: d.firmware_reported_at ? `reported ${when(d.firmware_reported_at)}` : ""},
        `firmware ${d.firmware || "—"}`)),
    el("td", {}, fmt(l.iaq), el("small", {}, accuracy(l))),
    el("td", {}, l.temperature == null ? "–" : `${fmt(l.temperature)} °C`),
    el("td", {}, l.humidity == null ? "–" : `${fmt(l.humidity)} %`),
    el("td", {}, l.pressure == null ? "–" : `${fmt(l.pressure)} hPa`), actions);
}
function renameForm(d, cell) {
  const input = el("input", {value: d.name, maxlength: "100", "aria-label": `New name for ${d.name}`, required: ""});
  const form = el("form", {class: "inline"}, input, el("button", {type: "submit"}, "Save"),
    el("button", {type: "button", class: "secondary", onclick: () => { state.renaming = null; loadDevices(); }}, "Cancel"));
  state.renaming = d.device_id;  // the list is not redrawn under the form meanwhile
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    state.renaming = null;
    try { await api(`/api/devices/${d.device_id}`, {method: "PATCH", body: {name: input.value}}); notice(`Renamed to ${input.value.trim()}.`); }
    catch (e) { notice(`Could not rename: ${e.message}`); }
    await loadDevices();
  });
  cell.replaceChildren(form); input.focus();
}
async function deleteDevice(d) {
  if (!confirm(`Delete ${d.name}? Its credentials stop working at once; its readings stay until retention.`)) return;
  try {
    await api(`/api/devices/${d.device_id}`, {method: "DELETE"}); notice(`${d.name} deleted; its credentials no longer work.`);
    if (state.configuring && state.configuring.device_id === d.device_id) closeConfig();
  }
  catch (e) { notice(`Could not delete: ${e.message}`); }
  await loadDevices();
}
async function loadDevices() {
  state.devices = (await api("/api/devices")).devices;
  if (!state.renaming) fill("#devices", state.devices.map(deviceRow), "No devices yet: add one above.");
  const ids = state.devices.map((d) => d.device_id);
  state.selected = state.selected.filter((id) => ids.includes(id));
  if (!state.selected.length && ids.length) state.selected = [ids[0]];
  deviceChecks("chart-devices", state.selected, (id, on) => {
    state.selected = on ? [...state.selected, id] : state.selected.filter((x) => x !== id); loadCharts();
  });
  if (!state.editing) deviceChecks("rule-devices", [...document.querySelectorAll("#rule-devices input:checked")].map((i) => i.value));
}
function deviceChecks(id, checked, onchange) {
  $(id).replaceChildren(...state.devices.map((d) => {
    const input = el("input", {type: "checkbox", value: d.device_id, id: `${id}-${d.device_id}`});
    input.checked = checked.includes(d.device_id);
    if (onchange) input.addEventListener("change", () => onchange(d.device_id, input.checked));
    return el("label", {for: input.id}, input, ` ${d.name}`);
  }));
}

// --- a new device's credentials and snippets ------------------------------------------------------
const SAMPLE = {temperature: 21.5, humidity: 45.2, pressure: 1013.2, gas_resistance: 125000, iaq: 42,
  iaq_accuracy: 3, co2_equivalent: 612, breath_voc_equivalent: 0.8};
function brokerOf(mqtt) {  // where devices connect: the first mqtt:// or mqtts:// URL, else a ws(s):// one
  const urls = mqtt.urls || [];
  const url = urls.find((u) => /^mqtts?:/.test(u)) || urls[0] || `mqtt://${mqtt.host}:${mqtt.port}`;
  const tls = /^(mqtts|wss):/.test(url), ws = /^wss?:/.test(url);
  const parsed = new URL(url.replace(/^mqtts?:/, "http:"));
  const port = Number(parsed.port) || (ws ? (tls ? 443 : 80) : (tls ? 8883 : 1883));
  return {url, host: parsed.hostname, port, tls, ws, path: parsed.pathname || "/mqtt"};
}
function mosquittoSnippet(m, b) {
  if (b.ws) return `# This broker takes devices over WebSockets only (${b.url}), which mosquitto_pub does not speak: use the Python snippet.`;
  const json = JSON.stringify({ts: "TS", ...SAMPLE}).replace(/"/g, '\\"').replace('\\"TS\\"', '\\"$(date -u +%Y-%m-%dT%H:%M:%SZ)\\"');
  return `mosquitto_pub -h ${b.host} -p ${b.port}${b.tls ? " --capath /etc/ssl/certs" : ""} -i '${m.client_id}' -u '${m.username}' -P '${m.password}' -q 1 -t '${m.topics.readings}' -m "${json}"`;
}
function pythonSnippet(m, b) {
  return `# pip install paho-mqtt   (paho-mqtt 2.x)
import json
from datetime import datetime, timezone

import paho.mqtt.client as mqtt

FIRMWARE = "1.0.0"  # your device's version, shown in the dashboard
STATUS_TOPIC = "${m.topics.status}"

client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="${m.client_id}"${b.ws ? ', transport="websockets"' : ""})
client.username_pw_set("${m.username}", "${m.password}")
${b.ws ? `client.ws_set_options(path="${b.path}")\n` : ""}${b.tls ? "client.tls_set()\n" : ""}# If the device drops off without saying goodbye, the broker says it went offline.
client.will_set(STATUS_TOPIC, json.dumps({"state": "offline"}), qos=1)
client.connect("${b.host}", ${b.port})
client.loop_start()
client.publish(STATUS_TOPIC, json.dumps({"state": "online", "firmware": FIRMWARE}), qos=1)
reading = {
    "ts": datetime.now(timezone.utc).isoformat(),
${Object.entries(SAMPLE).map(([k, v]) => `    "${k}": ${v},`).join("\n")}
}
client.publish("${m.topics.readings}", json.dumps(reading), qos=1).wait_for_publish()
client.loop_stop()
client.disconnect()
`;
}
function esp32Snippet(m, b) {
  const wsNote = b.ws ? `// This broker takes devices over WebSockets only (${b.url}); PubSubClient speaks plain
// MQTT, so run it over a WebSocket client (e.g. the "ArduinoHttpClient" WebSocketClient).
` : "";
  return `${wsNote}// ESP32 + BME688, Arduino IDE or PlatformIO. Libraries: "PubSubClient" (Nick O'Leary),
// "BSEC2 Software Library" and "BME68x Sensor library" (Bosch Sensortec).
#include <WiFi.h>
${b.tls ? "#include <WiFiClientSecure.h>\n" : ""}#include <Wire.h>
#include <time.h>
#include <PubSubClient.h>
#include <bsec2.h>

const char* WIFI_SSID = "your-wifi";
const char* WIFI_PASSWORD = "your-wifi-password";
const char* MQTT_HOST = "${b.host}";
const uint16_t MQTT_PORT = ${b.port};
const char* MQTT_USER = "${m.username}";
const char* MQTT_PASSWORD = "${m.password}";
const char* MQTT_CLIENT_ID = "${m.client_id}";
const char* TOPIC = "${m.topics.readings}";
const char* STATUS_TOPIC = "${m.topics.status}";
const char* FIRMWARE_VERSION = "1.0.0";  // your sketch's version, shown in the dashboard

${b.tls ? "WiFiClientSecure net;  // net.setCACert(...) with your broker's CA" : "WiFiClient net;"}
PubSubClient mqtt(net);
Bsec2 envSensor;

void newData(const bme68xData data, const bsecOutputs outputs, Bsec2 bsec) {
  float t = NAN, h = NAN, p = NAN, gas = NAN, iaq = NAN, co2 = NAN, voc = NAN;
  int accuracy = 0;
  for (uint8_t i = 0; i < outputs.nOutputs; i++) {
    const bsecData o = outputs.output[i];
    switch (o.sensor_id) {
      case BSEC_OUTPUT_SENSOR_HEAT_COMPENSATED_TEMPERATURE: t = o.signal; break;
      case BSEC_OUTPUT_SENSOR_HEAT_COMPENSATED_HUMIDITY: h = o.signal; break;
      case BSEC_OUTPUT_RAW_PRESSURE: p = o.signal / 100.0f; break;  // Pa to hPa
      case BSEC_OUTPUT_RAW_GAS: gas = o.signal; break;
      case BSEC_OUTPUT_IAQ: iaq = o.signal; accuracy = o.accuracy; break;
      case BSEC_OUTPUT_CO2_EQUIVALENT: co2 = o.signal; break;
      case BSEC_OUTPUT_BREATH_VOC_EQUIVALENT: voc = o.signal; break;
    }
  }
  if (isnan(t) || isnan(gas)) return;
  char payload[320];
  snprintf(payload, sizeof payload,
    "{\\"ts\\":%llu,\\"temperature\\":%.2f,\\"humidity\\":%.2f,\\"pressure\\":%.2f,"
    "\\"gas_resistance\\":%.0f,\\"iaq\\":%.1f,\\"iaq_accuracy\\":%d,"
    "\\"co2_equivalent\\":%.1f,\\"breath_voc_equivalent\\":%.2f}",
    (unsigned long long)time(nullptr) * 1000ULL, t, h, p, gas, iaq, accuracy, co2, voc);
  mqtt.publish(TOPIC, payload);
}

void connectMqtt() {
  while (!mqtt.connected()) {
    // Last will: if the device drops off without saying goodbye, the broker says it is offline.
    if (!mqtt.connect(MQTT_CLIENT_ID, MQTT_USER, MQTT_PASSWORD, STATUS_TOPIC, 1, false,
                      "{\\"state\\":\\"offline\\"}")) { delay(5000); continue; }
    char status[128];
    snprintf(status, sizeof status, "{\\"state\\":\\"online\\",\\"firmware\\":\\"%s\\"}", FIRMWARE_VERSION);
    mqtt.publish(STATUS_TOPIC, status);
  }
}

void setup() {
  WiFi.begin(WIFI_SSID, WIFI_PASSWORD);
  while (WiFi.status() != WL_CONNECTED) delay(500);
  configTime(0, 0, "pool.ntp.org");  // readings carry UTC time
  while (time(nullptr) < 1700000000) delay(200);
  mqtt.setServer(MQTT_HOST, MQTT_PORT);
  mqtt.setBufferSize(512);
  Wire.begin();
  bsecSensor outputs[] = {BSEC_OUTPUT_IAQ, BSEC_OUTPUT_RAW_PRESSURE, BSEC_OUTPUT_RAW_GAS,
    BSEC_OUTPUT_SENSOR_HEAT_COMPENSATED_TEMPERATURE, BSEC_OUTPUT_SENSOR_HEAT_COMPENSATED_HUMIDITY,
    BSEC_OUTPUT_CO2_EQUIVALENT, BSEC_OUTPUT_BREATH_VOC_EQUIVALENT};
  envSensor.begin(BME68X_I2C_ADDR_HIGH, Wire);  // BME68X_I2C_ADDR_LOW if SDO is tied to GND
  envSensor.updateSubscription(outputs, sizeof outputs / sizeof outputs[0], BSEC_SAMPLE_RATE_LP);
  envSensor.attachCallback(newData);
}

void loop() {
  connectMqtt();
  mqtt.loop();
  envSensor.run();  // calls newData every 3 s (low-power rate)
}
`;
}
function showCredentials(device) {
  const m = device.mqtt, b = brokerOf(m);
  $("cred-name").textContent = device.name;
  const fields = [["Broker", b.url], ["Username", m.username], ["Password", m.password],
    ["Client id", m.client_id], ["Readings topic", m.topics.readings], ["Status topic", m.topics.status]];
  $("cred-fields").replaceChildren(...fields.flatMap(([label, value], i) => [
    el("dt", {}, label),
    el("dd", {}, el("code", {id: `cred-${i}`}, value),
      el("button", {type: "button", class: "secondary", "data-copy": `cred-${i}`, "aria-label": `Copy ${label.toLowerCase()}`}, "Copy"))]));
  $("snippet-mosquitto").textContent = mosquittoSnippet(m, b);
  $("snippet-python").textContent = pythonSnippet(m, b);
  $("snippet-esp32").textContent = esp32Snippet(m, b);
  $("payload-format").textContent = JSON.stringify({ts: "2026-01-01T12:00:00Z", ...SAMPLE}, null, 2);
  $("credentials").hidden = false; $("credentials").focus();
}
function hideCredentials() {
  $("credentials").hidden = true; for (const id of ["snippet-mosquitto", "snippet-python", "snippet-esp32"]) $(id).textContent = "";
  $("cred-fields").replaceChildren();
}
$("credentials-done").addEventListener("click", hideCredentials);
$("add-device").addEventListener("submit", async (event) => {
  event.preventDefault();
  hideCredentials();
  try {
    const device = await api("/api/devices", {method: "POST", body: {name: $("device-name").value}});
    $("device-name").value = ""; showCredentials(device); notice(""); await loadDevices();
  } catch (e) { notice(`Could not add the device: ${e.message}`); }
});

// --- provisioning keys and the registration audit -------------------------------------------------
const KEY_STATES = {active: "on", expired: "off", "used up": "off", revoked: "firing"};
function keyName(id) {
  const key = state.keys.find((k) => k.key_id === id);
  return key ? key.name : "";
}
function keyRow(k) {
  const uses = k.max_uses == null ? `${k.uses} (no limit)` : `${k.uses} of ${k.max_uses}`;
  const actions = el("td", {class: "actions"}, k.state === "revoked" ? "–"
    : el("button", {type: "button", class: "danger", "aria-label": `Revoke ${k.name}`, onclick: () => revokeKey(k)}, "Revoke"));
  return el("tr", {"data-key": k.key_id},
    el("td", {}, el("strong", {}, k.name), el("br"), el("small", {class: "muted"}, `${k.key_id} · created ${when(k.created_at)}`)),
    el("td", {}, uses), el("td", {}, el("span", {class: KEY_STATES[k.state] || ""}, k.state),
      k.revoked_at ? el("br") : null, k.revoked_at ? el("small", {}, when(k.revoked_at)) : null),
    el("td", {}, fmt(k.devices)), el("td", {}, k.expires_at ? when(k.expires_at) : "never"), actions);
}
function auditRow(a) {
  return el("tr", {}, el("td", {}, when(a.at)), el("td", {}, a.action),
    el("td", {}, el("span", {class: a.outcome === "accepted" ? "on" : "firing"}, a.outcome)), el("td", {}, a.reason || "–"),
    el("td", {}, el("code", {}, a.address)),
    el("td", {}, ...(a.key_id ? [keyName(a.key_id), el("br"), el("small", {class: "muted"}, a.key_id)] : ["–"])),
    el("td", {}, a.uuid ? el("code", {}, a.uuid) : "–"));
}
async function loadProvisioning() {
  const [keys, audit] = await Promise.all([api("/api/provisioning-keys"), api("/api/provisioning-keys/audit?limit=100")]);
  state.keys = keys.keys || [];
  fill("#keys", state.keys.map(keyRow), "No provisioning keys yet: create one above.");
  fill("#registrations", (audit.entries || []).map(auditRow), "No device has tried to register yet.");
}
function registerSnippet(key) {
  const origin = location.origin;
  return `# Each device: a uuid and a secret API key of its own (keep both on the device).
UUID=$(uuidgen 2>/dev/null || cat /proc/sys/kernel/random/uuid)
DEVICE_API_KEY=$(openssl rand -hex 32)
curl -sS --fail-with-body -X POST '${origin}/api/v1/device/register' \\
  -H 'Authorization: Bearer ${key}' \\
  -H 'Content-Type: application/json' \\
  -d '{"uuid": "'"$UUID"'", "deviceName": "sensor-1", "deviceType": "bme688", "deviceApiKey": "'"$DEVICE_API_KEY"'"}' &&
echo &&
# The key exchange: the device proves it holds its API key, and its registration is complete.
curl -sS --fail-with-body -X POST "${origin}/api/v1/device/$UUID/key-exchange" \\
  -H "Authorization: Bearer $DEVICE_API_KEY" &&
echo
`;
}
function showKey(made) {
  $("key-shown-name").textContent = made.name;
  $("key-value").textContent = made.key;
  $("key-curl").textContent = registerSnippet(made.key);
  $("key-shown").hidden = false; $("key-shown").focus();
}
function hideKey() {
  $("key-shown").hidden = true; $("key-value").textContent = ""; $("key-curl").textContent = "";
}
async function revokeKey(k) {
  const devices = k.devices ? ` The ${k.devices} device${k.devices === 1 ? "" : "s"} registered with it keep working.` : "";
  if (!confirm(`Revoke the provisioning key ${k.name}? No device can register with it any more.${devices}`)) return;
  try { await api(`/api/provisioning-keys/${k.key_id}`, {method: "DELETE"}); notice(`${k.name} revoked: it registers no more devices.`); }
  catch (e) { notice(`Could not revoke: ${e.message}`); }
  await loadProvisioning();
  $("keys").closest(".table-wrap").focus();  // the button pressed is gone: stay in the list
}
$("key-form").addEventListener("submit", async (event) => {
  event.preventDefault(); $("key-error").textContent = ""; hideKey();
  const body = {name: $("key-name").value.trim()};
  if ($("key-expires").value) body.expires_at = new Date($("key-expires").value).toISOString();
  if ($("key-max-uses").value) body.max_uses = Number($("key-max-uses").value);
  try {
    const made = await api("/api/provisioning-keys", {method: "POST", body});
    $("key-form").reset(); showKey(made); await loadProvisioning();
  } catch (e) { $("key-error").textContent = e.message; }
});
$("key-shown-done").addEventListener("click", () => { hideKey(); $("key-name").focus(); });

// --- a device's remote configuration ---------------------------------------------------------------
const POLL_MS = 5000, POLL_TIMES = 24;  // after a change, look for the device's report for two minutes
function customValue(text) {  // true, false, null and numbers as such; "…" for text that looks like one
  const t = text.trim();
  if (/^(true|false|null|-?\d+(\.\d+)?([eE][+-]?\d+)?|".*")$/.test(t)) { try { return JSON.parse(t); } catch (e) { /* text */ } }
  return text;
}
function customText(v) { return typeof v === "string" && customValue(v) === v ? v : JSON.stringify(v); }
let customRows = 0;  // ids stay unique as rows come and go
function customRow(key = "", value = "") {
  const n = ++customRows;
  const keyInput = el("input", {id: `custom-key-${n}`, maxlength: "64", value: key, class: "custom-key"});
  const valueInput = el("input", {id: `custom-value-${n}`, maxlength: "256", value, class: "custom-value"});
  const row = el("div", {class: "kv", role: "group", "aria-label": `Custom key ${n}`},
    el("label", {for: keyInput.id}, "Key"), keyInput, el("label", {for: valueInput.id}, "Value"), valueInput);
  row.append(el("button", {type: "button", class: "secondary", "aria-label": `Remove custom key ${n}`,
    onclick: () => { row.remove(); $("config-add-key").focus(); }}, "Remove"));
  $("config-custom").append(row);
  return keyInput;
}
function fillDesired(c) {
  const d = c.desired || {};
  $("config-interval").value = d.reporting_interval ?? ""; $("config-offset").value = d.temperature_offset ?? "";
  $("config-heater").value = d.heater_profile ?? "";
  $("config-custom").replaceChildren(); customRows = 0;
  for (const [k, v] of Object.entries(d.custom || {})) customRow(k, customText(v));
}
function configFacts(values) {
  return Object.entries(values).filter(([k]) => k !== "version").flatMap(([k, v]) =>
    [el("dt", {}, k), el("dd", {}, el("code", {}, typeof v === "object" && v !== null ? JSON.stringify(v) : String(v)))]);
}
function renderReported(c) {
  const delivery = c.published ? "on the broker for the device (retained)"
    : `not on the broker yet: ${c.unpublished_reason || "it is published as soon as the broker answers"}`;
  $("config-desired-at").textContent = c.version ? `Version ${c.version}, set ${when(c.desired_at)}; ${delivery}.` : "No configuration set yet.";
  const badge = $("config-sync");
  if (!c.version) { badge.textContent = "no configuration set"; badge.className = "badge"; }
  else if (c.in_sync) { badge.textContent = "in sync"; badge.className = "badge sync"; }
  else { badge.textContent = `waiting for the device to apply version ${c.version}`; badge.className = "badge waiting"; }
  $("config-reported-at").textContent = c.reported_at
    ? `Version ${c.reported_version}, last reported ${when(c.reported_at)} (${ago(c.reported_at)}).`
    : "The device has not reported a configuration yet.";
  $("config-reported").replaceChildren(...configFacts(c.reported || {}));
}
function stopPolling() { clearInterval(state.configPoll); state.configPoll = null; }
function pollConfig() {  // until the device reports the version set, for a while
  stopPolling();
  let left = POLL_TIMES;
  state.configPoll = setInterval(async () => {
    if (document.hidden) return;
    const c = await refreshConfig().catch(() => null);
    if (--left <= 0 || !c || c.in_sync || !c.version) stopPolling();
  }, POLL_MS);
}
async function refreshConfig() {
  const d = state.configuring;
  if (!d || !d.uuid) return null;
  const c = await api(`/api/devices/${d.device_id}/config`);
  if (state.configuring === d) renderReported(c);
  return c;
}
async function openConfig(d) {
  state.configuring = d; stopPolling();
  $("config-name").textContent = d.name; $("config-error").textContent = "";
  $("config-manual").hidden = !!d.uuid; $("config-panes").hidden = !d.uuid;
  $("device-config").hidden = false; $("device-config").focus();
  if (!d.uuid) return;
  try {
    const c = await api(`/api/devices/${d.device_id}/config`);
    fillDesired(c); renderReported(c);
    if (c.version && !c.in_sync) pollConfig();
  } catch (e) { $("config-error").textContent = e.message; }
}
function closeConfig() { state.configuring = null; stopPolling(); $("device-config").hidden = true; }
function desiredBody() {
  const body = {}, custom = {};
  if ($("config-interval").value !== "") body.reporting_interval = Number($("config-interval").value);
  if ($("config-offset").value !== "") body.temperature_offset = Number($("config-offset").value);
  if ($("config-heater").value.trim()) body.heater_profile = $("config-heater").value.trim();
  for (const row of $("config-custom").children) {
    const key = row.querySelector(".custom-key").value.trim(), value = row.querySelector(".custom-value").value;
    if (key || value) custom[key] = customValue(value);  // a value without a key: the API names it
  }
  if (Object.keys(custom).length) body.custom = custom;
  return body;
}
$("config-form").addEventListener("submit", async (event) => {
  event.preventDefault(); $("config-error").textContent = "";
  const d = state.configuring;
  try {
    const c = await api(`/api/devices/${d.device_id}/config`, {method: "PUT", body: desiredBody()});
    fillDesired(c); renderReported(c); notice(`Configuration version ${c.version} of ${d.name} saved; it reaches the device when it is connected.`);
    if (!c.in_sync) pollConfig();
  } catch (e) { $("config-error").textContent = e.message; }
});
$("config-add-key").addEventListener("click", () => customRow().focus());
$("config-refresh").addEventListener("click", () => refreshConfig().catch((e) => { $("config-error").textContent = e.message; }));
$("config-close").addEventListener("click", () => {  // back to the device's row
  const id = state.configuring && state.configuring.device_id;
  closeConfig();
  const back = id && document.querySelector(`#devices tr[data-device="${id}"] button`);
  (back || $("device-name")).focus();
});

// --- charts ---------------------------------------------------------------------------------------
function chosenRange() {
  const range = $("range").value;
  if (range !== "custom") { const to = new Date(); return {from: new Date(to - RANGES[range]), to, live: true}; }
  const from = new Date($("from").value), to = new Date($("to").value);
  return {from, to, live: false};
}
function bucketFor(ms) { return ms <= 3 * 3600e3 ? "1m" : ms <= 2 * 86400e3 ? "5m" : ms <= 14 * 86400e3 ? "1h" : "1d"; }
function iaqShapes() {
  return IAQ_BANDS.map(([low, high, , colour]) => ({type: "rect", xref: "paper", x0: 0, x1: 1, y0: low, y1: high + 1,
    fillcolor: colour, opacity: 0.18, line: {width: 0}, layer: "below"}));
}
function layout(metric, from, to, extra = {}) {
  const m = METRICS[metric];
  return {title: {text: m.unit ? `${m.title} (${m.unit})` : m.title, font: {size: 14}}, margin: {t: 36, l: 56, r: 12, b: 40},
    xaxis: {type: "date", range: [from.toISOString(), to.toISOString()]}, showlegend: state.selected.length > 1,
    legend: {orientation: "h", y: -0.2}, paper_bgcolor: "#fff", plot_bgcolor: "#fff", ...extra};
}
async function loadCharts() {
  const {from, to, live} = chosenRange();
  if (!(from < to)) { $("chart-note").textContent = "Choose a start before the end."; return; }
  const bucket = bucketFor(to - from);
  const devices = state.selected.map((id) => state.devices.find((d) => d.device_id === id)).filter(Boolean);
  const answers = await Promise.all(devices.map((d) => api(`/api/devices/${d.device_id}/readings?bucket=${bucket}` +
    `&from=${from.toISOString()}&to=${to.toISOString()}`)));
  state.shown = {from, to, live, bucket, devices};
  for (const metric of Object.keys(METRICS)) {
    const traces = devices.map((d, i) => ({x: answers[i].series[metric].map((p) => p.t), y: answers[i].series[metric].map((p) => p.avg),
      name: plotText(d.name), meta: d.name, mode: "lines+markers", type: "scatter", marker: {size: 6}}));
    const chart = $(`chart-${metric}`);
    chart.hidden = OPTIONAL.includes(metric) && !traces.some((t) => t.y.length);
    const extra = metric === "iaq" ? {shapes: iaqShapes(), yaxis: {range: [0, 500]}} : {};
    Plotly.react(chart, traces.length ? traces : [{x: [], y: [], name: "no device", mode: "lines"}], layout(metric, from, to, extra),
      {displayModeBar: false, responsive: true});
    // Drawn while hidden, a chart takes plotly's default size: fit it once it can be seen.
    if (state.section === "charts" && !chart.hidden) Plotly.Plots.resize(chart);
  }
  $("chart-note").textContent = devices.length
    ? `Each point is the average over ${BUCKET_TEXT[bucket]}${live ? "; new readings appear as they arrive" : ""}.`
    : "Tick a device to see its readings.";
  $("csv-raw").replaceChildren(...devices.map((d) => el("a", {download: `${d.name}.csv`,
    href: `/api/devices/${d.device_id}/readings.csv?from=${from.toISOString()}&to=${to.toISOString()}`}, `every reading of ${d.name} (CSV)`))
    .flatMap((a) => [" · ", a]));
}
// Plotly reads a trace's name as its own small HTML (links, bold, styles): a device's name (a
// fleet device chooses its own) is shown as the text it is, its markup escaped.
const plotText = (text) => text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
function shownCsv() {  // exactly the points on the charts, live ones included
  const rows = [["device", "metric", "time", "value"]];
  for (const metric of Object.keys(METRICS)) {
    for (const trace of $(`chart-${metric}`).data || []) {
      trace.x.forEach((t, i) => rows.push([trace.meta ?? trace.name, metric, t, trace.y[i]]));
    }
  }
  return rows.map((r) => r.map(csvCell).join(",")).join("\n") + "\n";
}
// A text cell a spreadsheet would run as a formula (a device named "=HYPERLINK(...)") is written
// as text, with a leading apostrophe (OWASP's advice on CSV injection); numbers stay numbers.
function csvCell(c) {
  if (c == null) return "";  // a gap in a series, as join() wrote it before
  const text = typeof c === "string" && /^[=+\-@\t\r]/.test(c) ? `'${c}` : String(c);
  return /[",\n\r]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
}
$("csv-shown").addEventListener("click", (event) => {
  const link = event.currentTarget;
  link.href = URL.createObjectURL(new Blob([shownCsv()], {type: "text/csv"}));
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
});
$("range").addEventListener("change", () => {
  const custom = $("range").value === "custom"; $("custom-range").hidden = !custom;
  if (custom) {
    const local = (d) => new Date(d - d.getTimezoneOffset() * 60e3).toISOString().slice(0, 16);
    $("to").value = local(new Date()); $("from").value = local(new Date(Date.now() - 86400e3));
  }
  loadCharts();
});
$("chart-form").addEventListener("submit", (event) => { event.preventDefault(); loadCharts(); });

// --- live readings --------------------------------------------------------------------------------
function onReading(r) {
  const device = state.devices.find((d) => d.device_id === r.device_id);
  if (device) {
    device.latest = r; device.last_seen = new Date().toISOString(); device.online = true;
    const row = document.querySelector(`#devices tr[data-device="${r.device_id}"]`);
    if (row && state.renaming !== r.device_id) { row.replaceWith(deviceRow(device)); labelCells($("devices")); }
  } else loadDevices();
  const shown = state.shown;
  const index = shown && shown.live ? shown.devices.findIndex((d) => d.device_id === r.device_id) : -1;
  if (index < 0) return;
  const slide = new Date(r.ts) > shown.to;  // keep the window on the last hour, day...
  if (slide) { const span = shown.to - shown.from; shown.to = new Date(); shown.from = new Date(shown.to - span); }
  for (const metric of Object.keys(METRICS)) {
    if (r[metric] == null) continue;
    const chart = $(`chart-${metric}`);
    if (chart.hidden) { chart.hidden = false; Plotly.Plots.resize(chart); }
    Plotly.extendTraces(chart, {x: [[r.ts]], y: [[r[metric]]]}, [index], 5000);
    if (slide) Plotly.relayout(chart, {"xaxis.range": [shown.from.toISOString(), shown.to.toISOString()]});
  }
  window.lastLiveReading = r;
}
function live() {
  const source = new EventSource("/api/stream");
  source.addEventListener("reading", (event) => onReading(JSON.parse(event.data)));
}

// --- alerts ---------------------------------------------------------------------------------------
function condition(r) {
  return r.metric === "no_data" ? `no data for ${r.for_seconds} s` : `${r.metric} ${r.operator} ${fmt(r.threshold)} for ${r.for_seconds} s`;
}
function deviceNames(ids) {
  if (!ids || !ids.length) return "every device";
  return ids.map((id) => (state.devices.find((d) => d.device_id === id) || {name: id}).name).join(", ");
}
function ruleRow(r) {
  const firing = (r.states || []).filter((s) => s.state === "firing").map((s) => deviceNames([s.device_id]));
  const stateCell = r.muted ? el("span", {class: "off"}, "muted")
    : firing.length ? el("span", {class: "firing"}, `firing on ${firing.join(", ")}`) : el("span", {class: "on"}, "ok");
  return el("tr", {"data-rule": r.rule_id}, el("td", {}, r.name, r.webhook_url ? el("br") : null,
    r.webhook_url ? el("small", {class: "muted"}, `webhook: ${r.webhook_url}`) : null),
    el("td", {}, condition(r)), el("td", {}, deviceNames(r.devices)), el("td", {}, stateCell),
    el("td", {class: "actions"},
      el("button", {type: "button", class: "secondary", onclick: () => editRule(r)}, "Edit"),
      el("button", {type: "button", class: "secondary", onclick: () => changeRule(r, {muted: !r.muted})}, r.muted ? "Unmute" : "Mute"),
      el("button", {type: "button", class: "danger", onclick: () => deleteRule(r)}, "Delete")));
}
function historyRows(history) {  // firings paired with their resolutions, newest first
  const open = new Map(), pairs = [];
  for (const h of [...history].reverse()) {
    const key = `${h.rule_id} ${h.device_id}`;
    if (h.event === "firing") { const pair = {...h, resolved: null}; open.set(key, pair); pairs.push(pair); }
    else if (open.has(key)) { open.get(key).resolved = h.at; open.delete(key); }
  }
  return pairs.reverse().map((p) => {
    const rule = state.rules.find((r) => r.rule_id === p.rule_id);
    return el("tr", {}, el("td", {}, rule ? rule.name : p.message.split(":")[0]), el("td", {}, deviceNames([p.device_id])),
      el("td", {}, when(p.at)), el("td", {}, p.resolved ? when(p.resolved) : el("span", {class: "firing"}, "still firing")),
      el("td", {}, fmt(p.value)));
  });
}
async function loadAlerts() {
  state.rules = (await api("/api/alerts/rules")).rules || [];
  fill("#rules", state.rules.map(ruleRow), "No rules yet.");
  const rows = historyRows((await api("/api/alerts/history")).history || []);
  fill("#history", rows.slice(0, 100), "Nothing has fired yet.");
}
function ruleBody() {
  const metric = $("rule-metric").value;
  const body = {name: $("rule-name").value.trim(), metric, for_seconds: Number($("rule-for").value || 0),
    devices: [...document.querySelectorAll("#rule-devices input:checked")].map((i) => i.value),
    webhook_url: $("rule-webhook").value.trim() || null};
  if (metric !== "no_data") { body.operator = $("rule-operator").value; body.threshold = Number($("rule-threshold").value); }
  return body;
}
function editRule(r) {
  state.editing = r.rule_id;
  $("rule-form-title").textContent = `Edit rule ${r.name}`; $("rule-submit").textContent = "Save changes"; $("rule-cancel").hidden = false;
  $("rule-name").value = r.name; $("rule-metric").value = r.metric; $("rule-operator").value = r.operator || ">";
  $("rule-threshold").value = r.threshold == null ? "" : r.threshold; $("rule-for").value = r.for_seconds;
  $("rule-webhook").value = r.webhook_url || ""; deviceChecks("rule-devices", r.devices || []); $("rule-name").focus();
}
function resetRuleForm() {
  state.editing = null; $("rule-form").reset(); $("rule-form-title").textContent = "New rule";
  $("rule-submit").textContent = "Create rule"; $("rule-cancel").hidden = true; deviceChecks("rule-devices", []);
}
function showSecret(answer) {
  if (!answer.webhook_secret) return;
  $("rule-secret-value").textContent = answer.webhook_secret; $("rule-secret").hidden = false; $("rule-secret").focus();
}
async function changeRule(r, change) {
  try { showSecret(await api(`/api/alerts/rules/${r.rule_id}`, {method: "PATCH", body: change})); }
  catch (e) { notice(`Could not change the rule: ${e.message}`); }
  await loadAlerts();
}
async function deleteRule(r) {
  if (!confirm(`Delete the rule ${r.name}? Its history stays.`)) return;
  try { await api(`/api/alerts/rules/${r.rule_id}`, {method: "DELETE"}); } catch (e) { notice(`Could not delete: ${e.message}`); }
  await loadAlerts();
}
$("rule-form").addEventListener("submit", async (event) => {
  event.preventDefault(); $("rule-error").textContent = "";
  try {
    const body = ruleBody();
    const answer = state.editing
      ? await api(`/api/alerts/rules/${state.editing}`, {method: "PATCH", body})
      : await api("/api/alerts/rules", {method: "POST", body: body.webhook_url ? body : {...body, webhook_url: undefined}});
    resetRuleForm(); showSecret(answer); await loadAlerts();
  } catch (e) { $("rule-error").textContent = e.message; }
});
$("rule-cancel").addEventListener("click", resetRuleForm);
$("rule-secret-done").addEventListener("click", () => { $("rule-secret").hidden = true; $("rule-secret-value").textContent = ""; });
$("rule-metric").addEventListener("change", () => {
  const noData = $("rule-metric").value === "no_data"; $("rule-operator").disabled = noData; $("rule-threshold").disabled = noData;
});

// --- data problems --------------------------------------------------------------------------------
const REQUIRED = "ts, temperature, humidity, pressure and gas_resistance";
const FIELDS = ["ts", ...Object.keys(METRICS), "iaq_accuracy"];
function unknownFields(payload) {  // a misspelt field is why a required one is "missing"
  try {
    const body = JSON.parse(payload);
    return body && typeof body === "object" ? Object.keys(body).filter((k) => !FIELDS.includes(k)) : [];
  } catch (e) { return []; }
}
function explain(reason, payload) {
  let m;
  if ((m = reason.match(/missing required field `(\w+)`/))) {
    const unknown = unknownFields(payload || "");
    const hint = unknown.length ? ` It sent ${unknown.map((k) => `"${k}"`).join(", ")}, which is not a field the instance reads: rename it.` : "";
    return `The reading has no "${m[1]}". Every reading needs ${REQUIRED}.${hint}`;
  }
  if ((m = reason.match(/Expected `(\w+)`, got `(\w+)` - at `\$\.(\w+)`/))) return `"${m[3]}" must be a ${m[1] === "float" ? "number" : m[1]}, not ${m[2] === "str" ? "text" : m[2]} (send 21.5, not "21.5").`;
  if ((m = reason.match(/Expected `\w+` ([<>]=?) ([-\d.e+]+) - at `\$\.(\w+)`/))) return `"${m[3]}" is outside what the sensor can measure (it must be ${m[1]} ${m[2]}).`;
  if (/^malformed/.test(reason)) return "The message is not valid JSON.";
  if (/^oversized/.test(reason)) return "The message is larger than 4 KiB.";
  if (/ts has no UTC offset/.test(reason)) return 'The time "ts" needs an offset, e.g. 2026-01-01T12:00:00Z.';
  if (/ts is in the future/.test(reason)) return "The time \"ts\" is in the future: check the device's clock (NTP).";
  if (/ts is older/.test(reason)) return "The time \"ts\" is older than your plan keeps data: check the device's clock.";
  if (/ts is not/.test(reason)) return "The time \"ts\" must be RFC 3339 text or epoch milliseconds.";
  if (/unknown device/.test(reason)) return "No registered device publishes to this topic (deleted, or a wrong topic).";
  if (/read-only/.test(reason)) return "The license has expired: readings are not stored until it is renewed.";
  return reason;
}
async function loadProblems() {
  const letters = (await api("/api/dead-letters")).dead_letters || [];
  $("problems-count").textContent = letters.length ? `(${letters.length})` : "";
  fill("#dead-letters", letters.map((d) => el("tr", {}, el("td", {}, when(d.received_at)),
    el("td", {}, d.device_id ? deviceNames([d.device_id]) : d.topic),
    el("td", {}, explain(d.reason, d.payload), el("br"), el("small", {class: "muted"}, d.reason)),
    el("td", {}, el("code", {}, d.payload)))), "No problems: every message was stored.");
}

// --- usage and license ----------------------------------------------------------------------------
const AT_LIMIT = {
  devices: "At 100%, adding a device is refused; the registered ones keep sending.",
  mqtt_messages: "At 100%, further readings are not stored until midnight UTC: they are dropped (counted as over quota below), and devices stay connected.",
  api_requests: "At 100%, every API request, this dashboard's included, is refused (HTTP 429) until midnight UTC.",
};
const LABELS = {devices: "Devices", mqtt_messages: "Messages today", api_requests: "API requests today"};
async function loadUsage() {
  const [u, lic] = await Promise.all([api("/api/usage"), api("/api/license")]);
  $("meters").replaceChildren(...Object.keys(LABELS).map((key) => {
    const {used, limit} = u[key], share = limit ? Math.min(100, Math.round((used / limit) * 100)) : 100;
    const id = `meter-${key}`;
    return el("div", {class: "meter"}, el("label", {for: id}, LABELS[key]),
      el("p", {class: "big"}, `${used.toLocaleString()} of ${limit.toLocaleString()} (${share}%)`),
      el("progress", {id, max: String(limit || 1), value: String(Math.min(used, limit || 1))}),
      el("p", {class: "muted"}, AT_LIMIT[key]));
  }));
  $("meters").append(el("div", {class: "meter"}, el("p", {class: "big"}, "Not stored today"),
    el("p", {}, `${u.rejected_readings} rejected (see Data problems), ${u.over_quota_readings} over the daily quota.`)));
  const facts = [["Plan", lic.plan], ["Status", lic.status], ["Mode", lic.mode], ["Expires", when(lic.expires_at)],
    ["Grace until", when(lic.grace_until)], ["Data kept", lic.features ? `${lic.features.dataRetentionDays} days` : "–"]];
  $("license").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v == null ? "–" : v)]));
  $("plan").textContent = `${lic.plan || ""} plan · license ${lic.status || "missing"}`;
  const banner = $("readonly");
  banner.hidden = lic.mode !== "read-only";
  if (lic.mode === "read-only") banner.textContent = `Read-only: the license expired on ${when(lic.expires_at)}. Readings are not stored until the subscription is renewed.`;
}

// --- start ----------------------------------------------------------------------------------------
// Every request counts against the license's API requests a day, this page's too: live
// readings come over the stream, and only the section in view is fetched again, once a minute
// while the page is visible ("last seen" is recounted in the page meanwhile).
const REFRESH_MS = 60000;
function refresh() {
  if (document.hidden) return;
  LOADERS[state.section]().catch(() => {});
  if (state.section !== "problems") loadProblems().catch(() => {});  // the count on its tab
}
function redrawDevices() {
  if (state.renaming || !state.devices.length) return;
  fill("#devices", state.devices.map(deviceRow), "");
}
async function start() {
  try { await loadDevices(); } catch (e) { return; }
  $("app").hidden = false;
  if (!state.csrf) await loadCsrf();
  $("rule-metric").replaceChildren(...[...Object.keys(METRICS), "iaq_accuracy", "no_data"].map((m) => el("option", {value: m}, m)));
  $("iaq-legend").replaceChildren(...IAQ_BANDS.map(([low, high, name, colour]) =>
    el("li", {}, el("span", {style: `background:${colour}`}), high === 500 ? `over 350: ${name}` : `${low}–${high}: ${name}`)));
  showSection(location.hash.slice(1) in LOADERS ? location.hash.slice(1) : "devices", false);
  await Promise.all([loadUsage(), loadCharts(), loadAlerts(), loadProblems(), loadProvisioning().catch((e) => notice(e.message))]);
  if (state.started) return;  // signed in again after the session ran out: all runs already
  state.started = true;
  live();
  setInterval(refresh, REFRESH_MS);
  setInterval(redrawDevices, 15000);
  window.dashboardReady = true;
}
start();
window.iotistic = {api, el, fmt, when, ago, state};
