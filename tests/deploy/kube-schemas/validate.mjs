import { readFileSync } from "node:fs";

// Validates custom resources against the schemas of the @kubernetes-models packages
// (package-lock.json pins them). Reads a JSON array of objects on stdin; prints a JSON array
// with one result per object, in order: {"ok": true}, or {"ok": false, "errors": [{"path",
// "message"}, ...]}. Called once per rendered set by tests/deploy/kube_checks.py.
//
// Two checks per object:
// - the package's ajv-compiled validator for its apiVersion and kind (types, enums, patterns,
//   bounds, required fields, ObjectMeta); an object of a kind no package has fails;
// - unknown fields, which those validators let through: the object is validated through
//   proxies that note every key the validator reads, and a key of an object the validator read
//   other keys of, but never this one, is a field the schema does not declare. Objects the
//   validator reads no key of (free-form values, `x-kubernetes-preserve-unknown-fields`) are
//   left open, and so is whatever lies beneath them.

// The packages, by API group. A group not here has no schema.
const PACKAGES = {
  "gateway.networking.k8s.io": "@kubernetes-models/gateway-api",
  "gateway.networking.x-k8s.io": "@kubernetes-models/gateway-api",
  "gateway.envoyproxy.io": "@kubernetes-models/envoy-gateway",
  "cert-manager.io": "@kubernetes-models/cert-manager",
  "acme.cert-manager.io": "@kubernetes-models/cert-manager",
};
// What may go into a module path: a version such as v1alpha2 and a kind such as HTTPRoute.
const VERSION = /^v[0-9]+(?:(?:alpha|beta)[0-9]+)?$/;
const KIND = /^[A-Z][A-Za-z0-9]*$/;

function packageVersion(pkg) {
  const file = new URL(`./node_modules/${pkg}/package.json`, import.meta.url);
  return JSON.parse(readFileSync(file, "utf8")).version;
}

async function modelFor(apiVersion, kind) {
  const [group, version, extra] = String(apiVersion).split("/");
  const pkg = PACKAGES[group];
  if (!pkg || !VERSION.test(version ?? "") || extra !== undefined || !KIND.test(String(kind))) {
    return null;
  }
  let module;
  try {
    module = await import(`${pkg}/${group}/${version}/${kind}`);
  } catch (error) {
    if (["ERR_MODULE_NOT_FOUND", "ERR_PACKAGE_PATH_NOT_EXPORTED"].includes(error.code)) {
      return null;
    }
    throw error;
  }
  const model = module[kind];
  // The module of a part of a kind (HTTPRouteRule) exports a model with no apiVersion.
  if (model?.apiVersion !== apiVersion || model?.kind !== kind) return null;
  return { model, source: `${pkg}@${packageVersion(pkg)}` };
}

// A proxy over `value` (and, as they are read, over everything in it) noting in `reads` every
// key read of each object.
function watched(value, reads, proxies) {
  if (value === null || typeof value !== "object") return value;
  let proxy = proxies.get(value);
  if (proxy) return proxy;
  const note = (target, key) => {
    if (typeof key !== "string" || Array.isArray(target)) return;
    if (!reads.has(target)) reads.set(target, new Set());
    reads.get(target).add(key);
  };
  proxy = new Proxy(value, {
    get(target, key, receiver) {
      note(target, key);
      return watched(Reflect.get(target, key, receiver), reads, proxies);
    },
    has(target, key) {
      note(target, key);
      return Reflect.has(target, key);
    },
  });
  proxies.set(value, proxy);
  return proxy;
}

// Every key of an object the validator read other keys of, but never this one.
function unknownFields(value, reads, path, found) {
  if (value === null || typeof value !== "object") return found;
  if (Array.isArray(value)) {
    value.forEach((item, index) => unknownFields(item, reads, `${path}/${index}`, found));
    return found;
  }
  const read = reads.get(value);
  if (!read) return found; // free-form: the schema says nothing of its keys
  for (const [key, item] of Object.entries(value)) {
    const where = `${path}/${key}`;
    if (!read.has(key)) {
      found.push({ path: where, message: "is not a field the schema declares" });
    } else {
      unknownFields(item, reads, where, found);
    }
  }
  return found;
}

async function check(obj) {
  if (obj === null || typeof obj !== "object" || Array.isArray(obj)) {
    return { ok: false, errors: [{ path: "", message: "is not an object" }] };
  }
  const found = await modelFor(obj.apiVersion, obj.kind);
  if (!found) {
    const message = `no schema for ${obj.apiVersion}/${obj.kind}`;
    return { ok: false, errors: [{ path: "", message }] };
  }
  const reads = new Map();
  const errors = [];
  try {
    // The model's validate on the object itself (through the proxies), not on a copy.
    found.model.prototype.validate.call(watched(obj, reads, new WeakMap()));
  } catch (error) {
    if (!Array.isArray(error.errors)) throw error;
    const seen = new Set();
    for (const e of error.errors) {
      const allowed = e.params?.allowedValues;
      const message = (e.message ?? e.keyword) + (allowed ? `: ${allowed.join(", ")}` : "");
      // A type checked by a wrapper and by the type itself is reported twice.
      if (seen.has(`${e.instancePath} ${message}`)) continue;
      seen.add(`${e.instancePath} ${message}`);
      errors.push({ path: e.instancePath, message });
    }
  }
  errors.push(...unknownFields(obj, reads, "", []));
  return errors.length
    ? { ok: false, source: found.source, errors }
    : { ok: true, source: found.source };
}

async function main() {
  const chunks = [];
  for await (const chunk of process.stdin) chunks.push(chunk);
  const objects = JSON.parse(Buffer.concat(chunks).toString("utf8"));
  if (!Array.isArray(objects)) throw new Error("stdin: expected a JSON array of objects");
  const results = [];
  for (const obj of objects) results.push(await check(obj));
  process.stdout.write(JSON.stringify(results));
}

await main();
