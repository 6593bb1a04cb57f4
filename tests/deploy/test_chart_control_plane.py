"""The chart runs the whole control plane (issue 14, item 2), rendered by Helm's own library.

helm_python (helm-python-sdk) wraps Helm v4's Go library, so these renders are real Helm renders
of charts/iotistic, without a cluster: `lookup` finds nothing, as on a first install. They check
what `helm install` would create: every target gets exactly the secrets it uses, one key at a
time; generated secrets are long enough and the license key is one licensing loads; the
provisioner hands instances the chart's own image and the control plane's Service URLs; the
bundled Postgres is hardened and DATABASE_URL is derived from it; the Gateway routes each public
path to the service that serves it (read from the services' own route decorators) and no admin
path by default; NetworkPolicies select the pods they mean to; `helm lint --strict` is clean.
The NATS the chart runs is tested in test_chart_nats.py.
"""

from __future__ import annotations

import base64
import re
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from litestar import Litestar

from services.billing.settings import BillingSettings
from services.catalogue import listing_runtime
from services.licensing.keys import load_keyring
from services.licensing.settings import LicensingSettings
from services.provisioner.settings import ProvisionerSettings
from services.signup.settings import SignupSettings
from services.targets import CONTROL_PLANE

helm_python = pytest.importorskip("helm_python")

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "iotistic"
RELEASE = "demo"
NAMESPACE = "iotistic"
FULLNAME = f"{RELEASE}-iotistic"
DOMAIN = "example.com"
TARGETS = ("signup", "licensing", "billing", "provisioner")
DIGEST = "sha256:" + "ab" * 32
# Settings a target reads from a Secret, by target (besides DATABASE_URL, every target's).
SECRET_KEYS = {
    "signup": {
        "ADMIN_TOKEN",
        "SESSION_SECRET",
        "LOGIN_RELAY_SECRET",
        "DATA_KEYS_MASTER_KEY",
        "NATS_URL",
    },
    "licensing": {"ADMIN_TOKEN", "SESSION_SECRET", "LICENSE_PRIVATE_KEY", "NATS_URL"},
    "billing": {
        "ADMIN_TOKEN",
        "SESSION_SECRET",
        "USAGE_SECRET",
        "DATA_KEYS_MASTER_KEY",
        "STRIPE_SECRET_KEY",
        "STRIPE_WEBHOOK_SECRET",
        "NATS_URL",
    },
    "provisioner": {
        "ADMIN_TOKEN",
        "SESSION_SECRET",
        "PROVISIONER_SECRET",
        "USAGE_SECRET",
        "LOGIN_RELAY_SECRET",
        "NATS_URL",
    },
}
SETTINGS = {
    "signup": SignupSettings,
    "licensing": LicensingSettings,
    "billing": BillingSettings,
    "provisioner": ProvisionerSettings,
}


@cache
def signing_key() -> str:
    """A 2048-bit key made here, so that renders need not make a 4096-bit one each time."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and key in out else value
    return out


def render(values: dict[str, Any] | None = None, *, key: bool = True) -> list[dict[str, Any]]:
    """Every object the chart renders with ``values`` (baseDomain set), as a first install."""
    base: dict[str, Any] = {"baseDomain": DOMAIN}
    if key:
        base["secrets"] = {"licensePrivateKey": signing_key()}
    out = helm_python.Chart.load(str(CHART)).render(
        merged(base, values or {}), name=RELEASE, namespace=NAMESPACE, is_install=True
    )
    docs = []
    for path, text in out.items():
        if path.endswith(".yaml"):
            docs += [doc for doc in yaml.safe_load_all(text) if doc]
    return docs


def render_error(values: dict[str, Any]) -> str:
    with pytest.raises(helm_python.HelmError) as caught:
        render(values)
    return str(caught.value)


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind} {name}: {len(found)} found"
    return found[0]


def kinds(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def secret_data(secret: dict[str, Any]) -> dict[str, str]:
    data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
    data.update(secret.get("stringData") or {})
    return data


def container(docs: list[dict[str, Any]], target: str) -> dict[str, Any]:
    deployment = find(docs, "Deployment", f"{FULLNAME}-{target}")
    containers: list[dict[str, Any]] = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env_of(docs: list[dict[str, Any]], target: str) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container(docs, target).get("env", [])}


def plain_env(docs: list[dict[str, Any]], target: str) -> dict[str, str]:
    return {k: v["value"] for k, v in env_of(docs, target).items() if "value" in v}


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    """The default install, with the licensing key the chart generates itself."""
    return render(key=False)


# --- secrets --------------------------------------------------------------------------------


def test_each_target_reads_only_its_own_secrets_one_key_at_a_time(
    docs: list[dict[str, Any]],
) -> None:
    for target in TARGETS:
        spec = container(docs, target)
        # Never a whole Secret: a pod would see every other target's keys.
        assert all("secretRef" not in source for source in spec.get("envFrom", [])), target
        refs = {
            name: e["valueFrom"]["secretKeyRef"]
            for name, e in env_of(docs, target).items()
            if "secretKeyRef" in e.get("valueFrom", {})
        }
        assert set(refs) == SECRET_KEYS[target] | {"DATABASE_URL"}, target
        assert all(ref["key"] == name for name, ref in refs.items())
        # The bundled Postgres's own Secret holds DATABASE_URL.
        assert refs["DATABASE_URL"]["name"] == f"{FULLNAME}-postgresql"
        # Every name is one the program reads (NATS_URL is a common setting too).
        fields = {f.upper() for f in SETTINGS[target].__struct_fields__}
        assert set(refs) <= fields, set(refs) - fields
    # Only licensing's pods hold the signing key; signup never holds Stripe's.
    holders = [t for t in TARGETS if "LICENSE_PRIVATE_KEY" in env_of(docs, t)]
    assert holders == ["licensing"]
    assert "STRIPE_SECRET_KEY" not in env_of(docs, "signup")


def test_generated_secrets_are_long_random_and_distinct(docs: list[dict[str, Any]]) -> None:
    data = secret_data(find(docs, "Secret", FULLNAME))
    generated = ("ADMIN_TOKEN", "SESSION_SECRET", "PROVISIONER_SECRET")
    generated += ("USAGE_SECRET", "LOGIN_RELAY_SECRET", "DATA_KEYS_MASTER_KEY")
    assert set(data) == set(generated)
    for key in generated:
        # The services refuse fewer than 32 characters (libs/config.py and the settings).
        assert re.fullmatch(r"[A-Za-z0-9]{48}", data[key]), key
    assert len(set(data.values())) == len(generated)
    # Every target's required key is in the Secret it names; Stripe's are optional there.
    for target in TARGETS:
        for name, e in env_of(docs, target).items():
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref and ref["name"] == FULLNAME and not ref.get("optional"):
                assert ref["key"] in data, (target, name)
    billing = env_of(docs, "billing")
    for key in ("STRIPE_SECRET_KEY", "STRIPE_WEBHOOK_SECRET", "NATS_URL"):
        assert billing[key]["valueFrom"]["secretKeyRef"]["optional"] is True


def test_the_generated_license_key_is_one_licensing_signs_with(docs: list[dict[str, Any]]) -> None:
    secret = find(docs, "Secret", f"{FULLNAME}-licensing-key")
    pem = secret_data(secret)["LICENSE_PRIVATE_KEY"]
    # The code licensing runs with its environment's LICENSE_PRIVATE_KEY (services/licensing).
    ring = load_keyring(None, pem)
    assert ring.current.private_key is not None
    assert ring.current.private_key.key_size == 4096
    ref = env_of(docs, "licensing")["LICENSE_PRIVATE_KEY"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": f"{FULLNAME}-licensing-key", "key": "LICENSE_PRIVATE_KEY"}
    # Kept when the release is uninstalled: the licenses it signed must keep verifying.
    for name in (FULLNAME, f"{FULLNAME}-licensing-key", f"{FULLNAME}-postgresql"):
        annotations = find(docs, "Secret", name)["metadata"]["annotations"]
        assert annotations["helm.sh/resource-policy"] == "keep"


def test_given_secrets_are_used_and_short_ones_refused() -> None:
    given = "s" * 40
    docs = render(
        {
            "secrets": {
                "sessionSecret": given,
                "stripeSecretKey": "sk_test_abcdefgh",
                "stripeWebhookSecret": "whsec_abcdefgh",
            }
        }
    )
    data = secret_data(find(docs, "Secret", FULLNAME))
    assert data["SESSION_SECRET"] == given
    assert data["STRIPE_SECRET_KEY"] == "sk_test_abcdefgh"
    assert data["STRIPE_WEBHOOK_SECRET"] == "whsec_abcdefgh"
    assert secret_data(find(docs, "Secret", f"{FULLNAME}-licensing-key")) == {
        "LICENSE_PRIVATE_KEY": signing_key()
    }
    message = render_error({"secrets": {"usageSecret": "short"}})
    assert "USAGE_SECRET" in message and "at least 32 characters" in message
    assert "whsec_" in render_error({"secrets": {"stripeWebhookSecret": "sk_wrong_key"}})


def test_an_existing_secret_replaces_every_generated_one() -> None:
    docs = render({"secrets": {"existingSecret": "mine"}})
    assert not [
        d for d in kinds(docs, "Secret") if d["metadata"]["name"].startswith(f"{FULLNAME}-lic")
    ]
    assert not [d for d in kinds(docs, "Secret") if d["metadata"]["name"] == FULLNAME]
    for target in TARGETS:
        for name, e in env_of(docs, target).items():
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                expected = f"{FULLNAME}-postgresql" if name == "DATABASE_URL" else "mine"
                assert ref["name"] == expected, (target, name)
    # Without the bundled Postgres, DATABASE_URL comes from yours as well.
    docs = render({"secrets": {"existingSecret": "mine"}, "postgresql": {"enabled": False}})
    ref = env_of(docs, "billing")["DATABASE_URL"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == "mine"


# --- the provisioner: the instance image and the control plane's URLs -------------------------


def test_instances_run_the_charts_own_image(docs: list[dict[str, Any]]) -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    image = f"iotistic:{chart['appVersion']}"
    assert plain_env(docs, "provisioner")["INSTANCE_IMAGE"] == image
    assert all(container(docs, t)["image"] == image for t in TARGETS)
    pinned = render({"image": {"repository": "registry.example/iotistic", "digest": DIGEST}})
    image = f"registry.example/iotistic:{chart['appVersion']}@{DIGEST}"
    assert plain_env(pinned, "provisioner")["INSTANCE_IMAGE"] == image
    assert all(container(pinned, t)["image"] == image for t in TARGETS)
    job = find(pinned, "Job", f"{FULLNAME}-events-init")
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == image
    assert "image.digest" in render_error({"image": {"digest": "latest"}})


def test_the_provisioner_hands_instances_the_control_planes_services(
    docs: list[dict[str, Any]],
) -> None:
    env = plain_env(docs, "provisioner")
    assert env["BASE_DOMAIN"] == DOMAIN
    services = {d["metadata"]["name"]: d for d in kinds(docs, "Service")}
    expected = {
        "LICENSE_JWKS_URL": ("licensing", "/.well-known/jwks.json"),
        "CONTROL_PLANE_URL": ("signup", ""),
        "USAGE_URL": ("billing", ""),
    }
    for variable, (target, path) in expected.items():
        service = f"{FULLNAME}-{target}"
        port = services[service]["spec"]["ports"][0]["port"]
        assert env[variable] == f"http://{service}.{NAMESPACE}.svc:{port}{path}", variable
    fields = {f.upper() for f in ProvisionerSettings.__struct_fields__}
    # USAGE_URL is the setting the instances' usage reports are getting (issue 14, item 1).
    assert {"INSTANCE_IMAGE", "BASE_DOMAIN", "LICENSE_JWKS_URL", "CONTROL_PLANE_URL"} <= fields
    assert "USAGE_URL" in fields
    # Tenants' routes attach to this release's Gateway; their policies admit this release's pods.
    assert env["KUBERNETES_CONTROL_PLANE_NAMESPACE"] == NAMESPACE
    assert env["KUBERNETES_GATEWAY_NAME"] == find(docs, "Gateway", "iotistic")["metadata"]["name"]
    renamed = render(
        {
            "nameOverride": "air",
            "fullnameOverride": FULLNAME,
            "gateway": {"name": "edge", "namespace": "gw"},
        }
    )
    renamed_env = plain_env(renamed, "provisioner")
    assert renamed_env["KUBERNETES_CONTROL_PLANE_NAME"] == "air"
    assert renamed_env["KUBERNETES_GATEWAY_NAME"] == "edge"
    assert renamed_env["KUBERNETES_GATEWAY_PROXY_NAMESPACE"] == "gw"
    assert {k for k in renamed_env if k.startswith("KUBERNETES_")} <= fields
    assert "PROVISIONER_BACKEND" not in env
    kube = render({"targets": {"provisioner": {"kubernetesBackend": {"enabled": True}}}})
    assert plain_env(kube, "provisioner")["PROVISIONER_BACKEND"] == "kubernetes"
    # Signup counts sign-ups and failures per client address: behind the gateway, one hop.
    assert plain_env(docs, "signup")["TRUSTED_PROXY_HOPS"] == "1"
    # Links in mail go to the public API address, or where targets.signup.publicUrl says.
    assert plain_env(docs, "signup")["PUBLIC_URL"] == f"https://api.{DOMAIN}"
    own = render({"targets": {"signup": {"publicUrl": "https://iot.example.org"}}})
    assert plain_env(own, "signup")["PUBLIC_URL"] == "https://iot.example.org"


def test_base_domain_is_required() -> None:
    with pytest.raises(helm_python.HelmError, match="baseDomain is required"):
        helm_python.Chart.load(str(CHART)).render(
            {"secrets": {"licensePrivateKey": signing_key()}}, name=RELEASE, namespace="x"
        )
    assert "not a lower-case DNS name" in render_error({"baseDomain": "https://Example.com"})


# --- Postgres ---------------------------------------------------------------------------------


def test_the_bundled_postgres_is_pinned_probed_and_hardened(docs: list[dict[str, Any]]) -> None:
    name = f"{FULLNAME}-postgresql"
    sts = find(docs, "StatefulSet", name)
    pod = sts["spec"]["template"]["spec"]
    [pg] = pod["containers"]
    assert re.fullmatch(r"postgres:18@sha256:[0-9a-f]{64}", pg["image"])
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert pg[probe]["exec"]["command"][0] == "pg_isready", probe
        assert "127.0.0.1" in pg[probe]["exec"]["command"]
    context = pg["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] >= 10000
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    mounts = {m["mountPath"]: m["name"] for m in pg["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for path in ("/var/run/postgresql", "/tmp"):  # noqa: S108 - the pod's paths
        assert "emptyDir" in volumes[mounts[path]], path
    assert mounts["/var/lib/postgresql"] == "data"
    [claim] = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    assert pg["resources"]["limits"]["memory"]
    # Its password is a file, not an environment variable.
    env = {e["name"]: e for e in pg["env"]}
    assert "POSTGRES_PASSWORD" not in env
    password_file = env["POSTGRES_PASSWORD_FILE"]["value"]
    password_volume = volumes[mounts[str(Path(password_file).parent)]]
    assert password_volume["secret"]["secretName"] == name
    # DATABASE_URL is derived from the same password and the Service.
    data = secret_data(find(docs, "Secret", name))
    assert re.fullmatch(r"[A-Za-z0-9]{40}", data["password"])
    service = find(docs, "Service", name)
    assert service["spec"]["ports"][0]["port"] == 5432
    assert data["DATABASE_URL"] == (
        f"postgresql://iotistic:{data['password']}@{name}.{NAMESPACE}.svc:5432/iotistic"
    )


def test_an_external_postgres_needs_its_url() -> None:
    assert "secrets.databaseUrl is required" in render_error({"postgresql": {"enabled": False}})
    url = "postgresql://iotistic:pw@db.example:5432/iotistic"  # a test value, not a secret
    docs = render({"postgresql": {"enabled": False}, "secrets": {"databaseUrl": url}})
    assert not kinds(docs, "StatefulSet") or all(
        d["metadata"]["name"] != f"{FULLNAME}-postgresql" for d in kinds(docs, "StatefulSet")
    )
    assert secret_data(find(docs, "Secret", FULLNAME))["DATABASE_URL"] == url
    ref = env_of(docs, "signup")["DATABASE_URL"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": FULLNAME, "key": "DATABASE_URL"}


# --- the gateway ------------------------------------------------------------------------------


def served_paths(target: str) -> set[str]:
    """The HTTP paths a service serves, from the litestar app of its own routes."""
    definition = CONTROL_PLANE[target]
    app = Litestar(route_handlers=list(definition.routes(listing_runtime(definition))))
    return {route.path for route in app.routes}


def route_rules(docs: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(match type, path, backend Service) of the control plane's HTTPRoute."""
    route = find(docs, "HTTPRoute", FULLNAME)
    out = []
    for rule in route["spec"]["rules"]:
        [backend] = rule["backendRefs"]
        for match in rule["matches"]:
            out.append((match["path"]["type"], match["path"]["value"], backend["name"]))
    return out


def test_the_gateway_serves_api_and_tenants_under_one_wildcard_certificate(
    docs: list[dict[str, Any]],
) -> None:
    gateway = find(docs, "Gateway", "iotistic")
    assert gateway["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert gateway["spec"]["gatewayClassName"] == "eg"
    listeners = {item["name"]: item for item in gateway["spec"]["listeners"]}
    assert listeners["api"]["hostname"] == f"api.{DOMAIN}"
    assert listeners["tenants"]["hostname"] == f"*.{DOMAIN}"
    certificate = find(docs, "Certificate", "iotistic-wildcard")
    assert set(certificate["spec"]["dnsNames"]) == {f"*.{DOMAIN}", f"api.{DOMAIN}"}
    assert certificate["spec"]["issuerRef"]["kind"] == "ClusterIssuer"
    for name in ("api", "tenants"):
        assert listeners[name]["protocol"] == "HTTPS" and listeners[name]["port"] == 443
        [ref] = listeners[name]["tls"]["certificateRefs"]
        assert ref["name"] == certificate["spec"]["secretName"]
    # Tenants' routes only from tenant namespaces; the API's only from this one.
    allowed = listeners["tenants"]["allowedRoutes"]["namespaces"]
    assert allowed == {
        "from": "Selector",
        "selector": {"matchLabels": {"iotistic.io/tenant": "true"}},
    }
    assert listeners["api"]["allowedRoutes"]["namespaces"] == {"from": "Same"}
    redirect = find(docs, "HTTPRoute", "iotistic-https-redirect")
    [rule] = redirect["spec"]["rules"]
    assert rule["filters"][0]["requestRedirect"]["scheme"] == "https"


def test_each_public_path_goes_to_the_service_that_serves_it(docs: list[dict[str, Any]]) -> None:
    route = find(docs, "HTTPRoute", FULLNAME)
    assert route["spec"]["hostnames"] == [f"api.{DOMAIN}"]
    assert route["spec"]["parentRefs"] == [{"name": "iotistic", "sectionName": "api"}]
    services = {d["metadata"]["name"]: d for d in kinds(docs, "Service")}
    rules = route_rules(docs)
    for kind, path, backend in rules:
        target = backend.removeprefix(f"{FULLNAME}-")
        assert backend in services
        paths = served_paths(target)
        if kind == "Exact":
            assert path in paths, (target, path)
        else:
            assert any(p.startswith(f"{path}/") for p in paths), (target, path)
    by_path = {path: backend.removeprefix(f"{FULLNAME}-") for _, path, backend in rules}
    assert by_path["/api/customers/login"] == "signup"
    assert by_path["/api/customers"] == "provisioner"
    assert by_path["/webhooks/stripe"] == "billing"
    assert by_path["/.well-known/jwks.json"] == "licensing"
    # The customer's pages are signup's, but for billing's two forms under /account.
    assert {by_path[p] for p in ("/", "/signup", "/login", "/logout", "/account")} == {"signup"}
    assert by_path["/static/signup"] == "signup"
    assert by_path["/account/upgrade"] == by_path["/account/billing"] == "billing"
    # Exact paths of signup under the provisioner's prefix: Gateway API prefers Exact.
    exact = {path for kind, path, _ in rules if kind == "Exact"}
    assert {"/api/customers/signup", "/api/customers/login", "/api/customers/me"} <= exact
    for rule in route["spec"]["rules"]:
        for ref in rule["backendRefs"]:
            assert ref["port"] == services[ref["name"]]["spec"]["ports"][0]["port"]


def test_admin_routes_are_not_public_unless_asked(docs: list[dict[str, Any]]) -> None:
    admin = ("/api/admin", "/api/queue", "/admin")

    def public(paths: list[tuple[str, str, str]]) -> set[str]:
        return {path for _, path, _ in paths}

    assert not any(p.startswith(admin) for p in public(route_rules(docs)))
    exposed = render({"gateway": {"exposeAdmin": True}})
    assert set(admin) <= public(route_rules(exposed))
    # The operators' customers page is signup's, under the provisioner's /admin.
    [(kind, backend)] = [(k, b) for k, p, b in route_rules(exposed) if p == "/admin/customers"]
    assert (kind, backend) == ("PathPrefix", f"{FULLNAME}-signup")
    assert {"/admin/customers", "/admin/customers/{customer_id:str}"} <= served_paths("signup")


def test_envoy_gateway_limits_requests_per_client_and_connections(
    docs: list[dict[str, Any]],
) -> None:
    target = [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "iotistic"}]
    backend = find(docs, "BackendTrafficPolicy", "iotistic-rate-limit")
    assert backend["spec"]["targetRefs"] == target
    limit = backend["spec"]["rateLimit"]
    assert limit["type"] == "Local"
    cidrs = set()
    for rule in limit["local"]["rules"]:
        [selector] = rule["clientSelectors"]
        assert selector["sourceCIDR"]["type"] == "Distinct"
        cidrs.add(selector["sourceCIDR"]["value"])
        assert rule["limit"] == {"requests": 20, "unit": "Second"}
    assert cidrs == {"0.0.0.0/0", "::/0"}
    client = find(docs, "ClientTrafficPolicy", "iotistic-connections")
    assert client["spec"]["targetRefs"] == target
    assert client["spec"]["connection"]["connectionLimit"]["value"] == 10000
    off = render({"gateway": {"envoyGateway": {"enabled": False}}})
    assert not kinds(off, "BackendTrafficPolicy") and not kinds(off, "ClientTrafficPolicy")
    none = render({"gateway": {"enabled": False}})
    assert not kinds(none, "Gateway") and not kinds(none, "HTTPRoute")


# --- NetworkPolicies --------------------------------------------------------------------------


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        assert expr["operator"] == "In"
        if labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


def pod_labels(doc: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = doc["spec"]["template"]["metadata"]["labels"]
    return labels


def test_network_policies_deny_by_default_and_admit_each_path(docs: list[dict[str, Any]]) -> None:
    policies = {d["metadata"]["name"]: d["spec"] for d in kinds(docs, "NetworkPolicy")}
    deny = policies[f"{FULLNAME}-default-deny"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    gateway_ns = {"kubernetes.io/metadata.name": "envoy-gateway-system"}
    tenants = {"iotistic.io/tenant": "true"}
    for target in TARGETS:
        spec = policies[f"{FULLNAME}-{target}"]
        labels = pod_labels(find(docs, "Deployment", f"{FULLNAME}-{target}"))
        assert selects(spec["podSelector"], labels)
        sources = [
            peer["namespaceSelector"]["matchLabels"]
            for rule in spec["ingress"]
            for peer in rule["from"]
        ]
        assert all(p["port"] == 8080 for r in spec["ingress"] for p in r["ports"])
        assert gateway_ns in sources
        assert (tenants in sources) == (target != "provisioner"), target
        https_out = [
            rule
            for rule in spec["egress"]
            if any(peer.get("ipBlock", {}).get("cidr") == "0.0.0.0/0" for peer in rule["to"])
        ]
        if target == "billing":
            [rule] = https_out
            assert rule["ports"] == [{"protocol": "TCP", "port": 443}]
            assert "10.0.0.0/8" in rule["to"][0]["ipBlock"]["except"]
        else:
            assert not https_out, target
    # Postgres: 5432 from the targets only, and it reaches nothing.
    pg = policies[f"{FULLNAME}-postgresql"]
    assert selects(
        pg["podSelector"], pod_labels(find(docs, "StatefulSet", f"{FULLNAME}-postgresql"))
    )
    [rule] = pg["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 5432}]
    for target in TARGETS:
        labels = pod_labels(find(docs, "Deployment", f"{FULLNAME}-{target}"))
        assert selects(rule["from"][0]["podSelector"], labels), target
    job = pod_labels(find(docs, "Job", f"{FULLNAME}-events-init"))
    assert not selects(rule["from"][0]["podSelector"], job)
    assert pg["egress"] == []
    # NATS clients: the targets and the events-init Job.
    nats_policy = policies[f"{FULLNAME}-nats"]
    clients = nats_policy["ingress"][0]
    assert clients["ports"] == [{"protocol": "TCP", "port": 4222}]
    assert selects(clients["from"][0]["podSelector"], job)
    assert nats_policy["ingress"][1]["ports"] == [{"protocol": "TCP", "port": 6222}]
    # The Kubernetes API only for the provisioner's worker, and only with the kubernetes
    # backend: never for the web-facing provisioner pods, which hold no token and never apply
    # (with kubernetesApi.cidrs unset, the rule opens 443 and 6443 to every address).
    assert f"{FULLNAME}-kubernetes-api" not in policies
    kube = render({"targets": {"provisioner": {"kubernetesBackend": {"enabled": True}}}})
    api = next(d for d in kinds(kube, "NetworkPolicy") if d["metadata"]["name"].endswith("-api"))
    worker = pod_labels(find(kube, "Deployment", f"{FULLNAME}-provisioner-worker"))
    assert selects(api["spec"]["podSelector"], worker)
    web = pod_labels(find(kube, "Deployment", f"{FULLNAME}-provisioner"))
    assert not selects(api["spec"]["podSelector"], web)
    assert not selects(
        api["spec"]["podSelector"], pod_labels(find(kube, "Deployment", f"{FULLNAME}-billing"))
    )


def test_every_object_names_the_release_namespace(docs: list[dict[str, Any]]) -> None:
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding"}
    for doc in docs:
        if doc["kind"] not in cluster_scoped:
            assert doc["metadata"].get("namespace") == NAMESPACE, doc["metadata"]["name"]


# --- helm lint --------------------------------------------------------------------------------


def test_helm_lint_strict_finds_nothing() -> None:
    # The chart has no dependency to fetch: lint runs on what is committed.
    result = helm_python.lint(str(CHART), strict=True)
    assert result["errors"] == []
    # Helm's severities: 1 info, 2 warning, 3 error. Only "icon is recommended" (info) is left.
    assert [m for m in result["messages"] if m["severity"] >= 2] == []
