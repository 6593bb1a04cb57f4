"""The tenants' network on Kubernetes: the NetworkPolicies, HTTPRoute and Envoy Gateway policy
that ``kubernetes.manifests.render`` gives each customer.

No cluster or network plugin runs here, so the policies are checked by an evaluator of the
Kubernetes NetworkPolicy semantics (``Cluster.may_connect`` below: a connection needs the
source's egress and the destination's ingress; a pod that no policy selects for a direction is
open in it; rules, peers and ports are ORed, a peer's namespace and pod selectors ANDed) over a
model cluster with two tenants, the control plane, the Gateway's proxies and the cluster DNS.
Where plugins differ (whether an ``ipBlock`` also matches pod addresses), an allowed connection
must be allowed under the strict reading and a denied one denied under the permissive one.
The Gateway API's and Envoy Gateway's kinds are CRDs, outside kubernetes-validate's schemas:
their shape is checked against the rules of their CRDs that matter here.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import kubernetes_validate
import pytest
from k8s_standin import KubeStandIn, api_client_for, backend_running, served, starter_spec

from libs.config import ConfigError, load_settings
from libs.servers.mosquitto import MAX_CONNECTIONS
from services.provisioner.app import kubernetes_settings
from services.provisioner.backends.base import InstanceSpec
from services.provisioner.backends.kubernetes.api import object_path
from services.provisioner.backends.kubernetes.backend import KubernetesBackend
from services.provisioner.backends.kubernetes.manifests.render import render
from services.provisioner.backends.kubernetes.manifests.settings import KubernetesSettings
from services.provisioner.settings import ProvisionerSettings, parse_ports

K8S_VERSION = "1.37.0"
TENANT_A = "8f14e45f-ceea-4e7a-9c3b-2d1f0a6b7c11"
TENANT_B = "c9f0f895-fb98-4b91-9c1e-7e0a1f2b3c44"
NS_A = f"customer-{TENANT_A}"
NS_B = f"customer-{TENANT_B}"
# The cluster's pod network (inside 10/8) and a Service network outside the private ranges,
# as some clusters have: only KUBERNETES_CLUSTER_CIDRS tells the policy about the latter.
CLUSTER_CIDRS = ("10.244.0.0/16", "11.0.0.0/16", "2001:db8:42::/56")
SETTINGS = KubernetesSettings(cluster_cidrs=CLUSTER_CIDRS)
# Gateway API patterns, from the standard channel's CRDs (v1.4 and later).
DURATION = re.compile(r"^([0-9]{1,5}(h|m|s|ms)){1,4}$")
HOSTNAME = re.compile(r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
RULE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def spec(customer_id: str = TENANT_A, max_devices: int = 10) -> InstanceSpec:
    return starter_spec(customer_id, max_devices=max_devices)


def objects_of(
    customer_id: str = TENANT_A, settings: KubernetesSettings = SETTINGS, max_devices: int = 10
) -> dict[tuple[str, str], dict[str, Any]]:
    rendered = render(spec(customer_id, max_devices), settings, "p" * 32)
    return {(o["kind"], o["metadata"]["name"]): o for o in rendered}


# --- a NetworkPolicy evaluator


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str
    labels: Mapping[str, str]
    ip: str


@dataclass(frozen=True)
class Address:
    """An address that is no pod's: the internet, a private network, a Service's."""

    ip: str


def selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """A label selector: matchLabels and matchExpressions, all of them; {} selects all."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        key, operator = expression["key"], expression["operator"]
        present, values = key in labels, expression.get("values") or []
        held = {
            "In": present and labels.get(key) in values,
            "NotIn": not present or labels.get(key) not in values,
            "Exists": present,
            "DoesNotExist": not present,
        }[operator]
        if not held:
            return False
    return True


@dataclass
class Cluster:
    namespaces: dict[str, dict[str, str]]
    policies: list[dict[str, Any]]

    def may_connect(
        self,
        source: Pod | Address,
        target: Pod | Address,
        port: int,
        protocol: str = "TCP",
        ipblocks_match_pods: bool = False,
    ) -> bool:
        """Whether ``source`` may open a connection to ``target`` on ``port``."""
        allowed = True
        if isinstance(source, Pod):
            allowed &= self._allows(source, "Egress", target, port, protocol, ipblocks_match_pods)
        if isinstance(target, Pod):
            allowed &= self._allows(target, "Ingress", source, port, protocol, ipblocks_match_pods)
        return allowed

    def _allows(
        self,
        pod: Pod,
        direction: str,
        peer: Pod | Address,
        port: int,
        protocol: str,
        ipblocks_match_pods: bool,
    ) -> bool:
        selecting = [
            p
            for p in self.policies
            if p["metadata"]["namespace"] == pod.namespace
            and selects(p["spec"]["podSelector"], pod.labels)
            and direction in _policy_types(p["spec"])
        ]
        if not selecting:
            return True  # not isolated in this direction
        key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
        return any(
            _ports_match(rule.get("ports"), port, protocol)
            and _peers_match(rule.get(peers_key), policy, peer, self, ipblocks_match_pods)
            for policy in selecting
            for rule in policy["spec"].get(key) or []
        )


def _policy_types(spec: Mapping[str, Any]) -> list[str]:
    if "policyTypes" in spec:
        return list(spec["policyTypes"])
    return ["Ingress", *(["Egress"] if "egress" in spec else [])]


def _ports_match(ports: list[dict[str, Any]] | None, port: int, protocol: str) -> bool:
    if not ports:
        return True
    for allowed in ports:
        if allowed.get("protocol", "TCP") != protocol:
            continue
        if "port" not in allowed:
            return True
        assert isinstance(allowed["port"], int), "named ports are not modelled"
        if allowed["port"] <= port <= allowed.get("endPort", allowed["port"]):
            return True
    return False


def _peers_match(
    peers: list[dict[str, Any]] | None,
    policy: dict[str, Any],
    other: Pod | Address,
    cluster: Cluster,
    ipblocks_match_pods: bool,
) -> bool:
    if not peers:
        return True
    for peer in peers:
        if "ipBlock" in peer:
            if isinstance(other, Pod) and not ipblocks_match_pods:
                continue
            address = ipaddress.ip_address(other.ip)
            block = peer["ipBlock"]
            if address in ipaddress.ip_network(block["cidr"]) and not any(
                address in ipaddress.ip_network(e) for e in block.get("except", [])
            ):
                return True
            continue
        if not isinstance(other, Pod):
            continue
        if "namespaceSelector" in peer:
            in_namespace = selects(peer["namespaceSelector"], cluster.namespaces[other.namespace])
        else:
            in_namespace = other.namespace == policy["metadata"]["namespace"]
        if in_namespace and selects(peer.get("podSelector", {}), other.labels):
            return True
    return False


def test_the_evaluator_follows_the_networkpolicy_semantics() -> None:
    ns = {"a": {"kubernetes.io/metadata.name": "a"}, "b": {"kubernetes.io/metadata.name": "b"}}
    web = Pod("web", "a", {"app": "web"}, "10.1.0.1")
    db = Pod("db", "a", {"app": "db"}, "10.1.0.2")
    other = Pod("other", "b", {"app": "web"}, "10.1.0.3")
    assert Cluster(ns, []).may_connect(other, db, 5432)  # no policy: open
    only_web = {
        "metadata": {"namespace": "a"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "db"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}]}],
        },
    }
    cluster = Cluster(ns, [only_web])
    assert cluster.may_connect(web, db, 5432)
    assert not cluster.may_connect(other, db, 5432)  # a podSelector alone: own namespace
    assert cluster.may_connect(db, web, 80)  # egress not isolated, web not selected
    both = {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "web"}}}
    only_web["spec"]["ingress"] = [{"from": [both], "ports": [{"port": 5432}]}]
    assert cluster.may_connect(other, db, 5432) and not cluster.may_connect(other, db, 5433)
    assert not cluster.may_connect(other, db, 5432, "UDP")
    blocked = {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.3/32"]}}
    only_web["spec"]["ingress"] = [{"from": [blocked]}]
    assert cluster.may_connect(Address("10.9.9.9"), db, 1)
    assert not cluster.may_connect(Address("10.1.0.3"), db, 1)
    assert not cluster.may_connect(web, db, 1)  # a pod is no ipBlock's, strictly read
    assert cluster.may_connect(web, db, 1, ipblocks_match_pods=True)


# --- the model cluster

CHART = {"app.kubernetes.io/name": "iotistic", "app.kubernetes.io/instance": "iotistic"}
ENVOY = {
    "app.kubernetes.io/name": "envoy",
    "app.kubernetes.io/component": "proxy",
    "app.kubernetes.io/managed-by": "envoy-gateway",
    "gateway.envoyproxy.io/owning-gateway-name": "iotistic",
    "gateway.envoyproxy.io/owning-gateway-namespace": "iotistic",
}


def tenant_pods(namespace: str, subnet: int) -> dict[str, Pod]:
    return {
        name: Pod(name, namespace, {"app.kubernetes.io/name": name}, f"10.244.{subnet}.{i}")
        for i, name in enumerate(("instance", "postgres", "mosquitto"), start=10)
    }


A = tenant_pods(NS_A, 1)
B = tenant_pods(NS_B, 2)
CONTROL_PLANE = {
    target: Pod(target, "iotistic", {**CHART, "app.kubernetes.io/component": target}, ip)
    for target, ip in (
        ("signup", "10.244.3.1"),
        ("billing", "10.244.3.2"),
        ("licensing", "10.244.3.3"),
        ("provisioner", "10.244.3.4"),
        # Had anything of the chart's own run NATS or Postgres under its name.
        ("nats", "10.244.3.5"),
        ("postgres", "10.244.3.6"),
    )
}
NATS = Pod("nats", "iotistic", {"app.kubernetes.io/name": "nats"}, "10.244.3.7")
POSTGRES = Pod("postgresql", "iotistic", {"app.kubernetes.io/name": "postgresql"}, "10.244.3.8")
PROXY = Pod("envoy", "envoy-gateway-system", ENVOY, "10.244.4.1")
EG_CONTROLLER = Pod(
    "envoy-gateway", "envoy-gateway-system", {"control-plane": "envoy-gateway"}, "10.244.4.2"
)
PROXY_ELSEWHERE = Pod("envoy", "iotistic", ENVOY, "10.244.3.9")  # Gateway namespace mode
KUBE_DNS = Pod("coredns", "kube-system", {"k8s-app": "kube-dns"}, "10.244.5.1")
METRICS_SERVER = Pod("metrics-server", "kube-system", {"k8s-app": "metrics-server"}, "10.244.5.2")
ELSEWHERE = Pod("app", "default", {"app": "web"}, "10.244.6.1")
INTERNET = (Address("93.184.216.34"), Address("2606:4700:4700::1111"))
NOT_PUBLIC = tuple(
    Address(ip)
    for ip in (
        "10.0.0.5",
        "172.16.0.1",
        "192.168.1.1",
        "127.0.0.1",
        "169.254.169.254",  # a cloud's metadata service
        "100.64.0.1",
        "0.0.0.1",
        "224.0.0.1",
        "240.0.0.1",
        "198.18.0.1",
        "11.0.0.7",  # the cluster's Service network, public as an address
        "10.244.2.10",  # another tenant's pod address
        "::1",
        "fd00::1",
        "fe80::1",
        "::ffff:10.0.0.5",
        "2001:db8:42::9",
        "64:ff9b::a9fe:a9fe",  # the metadata service through NAT64
        "2002:a00:5::1",  # 10.0.0.5 through 6to4
    )
)


def namespaces() -> dict[str, dict[str, str]]:
    labelled = {"kubernetes.io/metadata.name"}
    tenants = {ns: {"iotistic.io/tenant": "true"} for ns in (NS_A, NS_B)}
    names = [NS_A, NS_B, "iotistic", "envoy-gateway-system", "kube-system", "default"]
    return {n: {**tenants.get(n, {}), **dict.fromkeys(labelled, n)} for n in names}


def cluster(settings: KubernetesSettings = SETTINGS) -> Cluster:
    policies = [
        o
        for tenant in (TENANT_A, TENANT_B)
        for o in render(spec(tenant), settings, "p" * 32)
        if o["kind"] == "NetworkPolicy"
    ]
    return Cluster(namespaces(), policies)


def test_every_network_policy_is_valid_against_the_kubernetes_schemas() -> None:
    policies = cluster().policies
    assert {p["metadata"]["name"] for p in policies} == {
        "isolate-customer",
        "gateway-to-instance",
        "gateway-to-mosquitto",
        "instance-egress",
    }
    for policy in policies:
        kubernetes_validate.validate(policy, K8S_VERSION, strict=True)


ALLOWED = [
    ("gateway to the instance's HTTP port", PROXY, A["instance"], 8080, "TCP"),
    ("gateway to the broker's WebSockets", PROXY, A["mosquitto"], 9001, "TCP"),
    ("instance to its database", A["instance"], A["postgres"], 5432, "TCP"),
    ("instance to its broker", A["instance"], A["mosquitto"], 1883, "TCP"),
    ("instance to DNS", A["instance"], KUBE_DNS, 53, "UDP"),
    ("instance to DNS over TCP", A["instance"], KUBE_DNS, 53, "TCP"),
    ("postgres to DNS", A["postgres"], KUBE_DNS, 53, "UDP"),
    ("instance to sign-in", A["instance"], CONTROL_PLANE["signup"], 8080, "TCP"),
    ("instance to usage", A["instance"], CONTROL_PLANE["billing"], 8080, "TCP"),
    ("instance to the license keys", A["instance"], CONTROL_PLANE["licensing"], 8080, "TCP"),
    ("webhook over IPv4 HTTPS", A["instance"], INTERNET[0], 443, "TCP"),
    ("webhook over IPv6 HTTPS", A["instance"], INTERNET[1], 443, "TCP"),
]


@pytest.mark.parametrize(
    ("source", "target", "port", "protocol"),
    [case[1:] for case in ALLOWED],
    ids=[case[0] for case in ALLOWED],
)
def test_what_a_tenant_needs_is_allowed(
    source: Pod, target: Pod | Address, port: int, protocol: str
) -> None:
    assert cluster().may_connect(source, target, port, protocol)


DENIED = [
    ("gateway to the database", PROXY, A["postgres"], 5432),
    ("gateway to plain MQTT", PROXY, A["mosquitto"], 1883),
    ("gateway to the broker on the instance's port", PROXY, A["mosquitto"], 8080),
    ("gateway to the instance on the broker's port", PROXY, A["instance"], 9001),
    ("Envoy Gateway's controller to the instance", EG_CONTROLLER, A["instance"], 8080),
    ("a proxy in another namespace", PROXY_ELSEWHERE, A["instance"], 8080),
    ("the internet straight to the instance", INTERNET[0], A["instance"], 8080),
    ("the internet straight to the broker", INTERNET[0], A["mosquitto"], 1883),
    ("another namespace's pod to the broker", ELSEWHERE, A["mosquitto"], 1883),
    ("the control plane to the database", CONTROL_PLANE["provisioner"], A["postgres"], 5432),
    ("instance to NATS clients", A["instance"], NATS, 4222),
    ("instance to NATS routes", A["instance"], NATS, 6222),
    ("instance to NATS monitoring", A["instance"], NATS, 8222),
    ("instance to the control plane's Postgres", A["instance"], POSTGRES, 5432),
    ("instance to a chart-named NATS", A["instance"], CONTROL_PLANE["nats"], 4222),
    ("instance to a chart-named Postgres", A["instance"], CONTROL_PLANE["postgres"], 8080),
    ("instance to the provisioner", A["instance"], CONTROL_PLANE["provisioner"], 8080),
    ("instance to signup off its HTTP port", A["instance"], CONTROL_PLANE["signup"], 4222),
    ("instance to the proxies", A["instance"], PROXY, 10443),
    ("instance to kube-system besides DNS", A["instance"], METRICS_SERVER, 53),
    ("instance to DNS on another port", A["instance"], KUBE_DNS, 8080),
    ("instance to a public DNS server", A["instance"], Address("8.8.8.8"), 53),
    ("instance to plain HTTP on the internet", A["instance"], INTERNET[0], 80),
    ("instance to SSH on the internet", A["instance"], INTERNET[0], 22),
    ("instance to another HTTPS port", A["instance"], INTERNET[1], 8443),
    ("postgres to the internet", A["postgres"], INTERNET[0], 443),
    ("mosquitto to the internet", A["mosquitto"], INTERNET[1], 443),
    ("postgres to the control plane", A["postgres"], CONTROL_PLANE["signup"], 8080),
    ("mosquitto to the control plane", A["mosquitto"], CONTROL_PLANE["billing"], 8080),
    ("mosquitto to another namespace", A["mosquitto"], ELSEWHERE, 80),
]


@pytest.mark.parametrize(
    ("source", "target", "port"),
    [case[1:] for case in DENIED],
    ids=[case[0] for case in DENIED],
)
def test_what_a_tenant_does_not_need_is_denied(
    source: Pod | Address, target: Pod | Address, port: int
) -> None:
    model = cluster()
    for protocol in ("TCP", "UDP"):
        assert not model.may_connect(source, target, port, protocol, ipblocks_match_pods=True)


@pytest.mark.parametrize("address", NOT_PUBLIC, ids=[a.ip for a in NOT_PUBLIC])
def test_the_instance_reaches_no_private_address_on_the_webhook_port(address: Address) -> None:
    assert not cluster().may_connect(A["instance"], address, 443, ipblocks_match_pods=True)


def test_no_tenant_reaches_another_in_either_direction() -> None:
    model = cluster()
    ports = (53, 80, 443, 1883, 5432, 8080, 9001)
    for mine, theirs in ((A, B), (B, A)):
        for source in mine.values():
            for target in theirs.values():
                for port in ports:
                    assert not model.may_connect(source, target, port, ipblocks_match_pods=True), (
                        source.name,
                        target.name,
                        port,
                    )
    # Each side refuses on its own: the other tenant's ingress closes even to a source that
    # no egress policy holds back (a namespace with no policies, the tenant label notwithstanding).
    for target in B.values():
        for port in ports:
            assert not model.may_connect(ELSEWHERE, target, port)


def test_no_tenant_policy_names_another_tenant_or_the_tenant_label() -> None:
    for policy in cluster().policies:
        for rule in [*policy["spec"].get("ingress", []), *policy["spec"].get("egress", [])]:
            for peer in [*rule.get("from", []), *rule.get("to", [])]:
                if "namespaceSelector" in peer:
                    selector = peer["namespaceSelector"]
                    assert set(selector) == {"matchLabels"}, peer
                    named = selector["matchLabels"]["kubernetes.io/metadata.name"]
                    assert named in ("kube-system", "iotistic", "envoy-gateway-system"), peer


def test_the_settings_move_the_peers() -> None:
    moved = KubernetesSettings(
        gateway_proxy_namespace="iotistic",
        control_plane_namespace="platform",
        control_plane_components=("signup",),
        webhook_ports=(443, 8443),
    )
    model = cluster(moved)
    model.namespaces["platform"] = {"kubernetes.io/metadata.name": "platform"}
    assert model.may_connect(PROXY_ELSEWHERE, A["instance"], 8080)
    assert not model.may_connect(PROXY, A["instance"], 8080)
    signup = Pod("signup", "platform", {**CHART, "app.kubernetes.io/component": "signup"}, "x")
    billing = Pod("billing", "platform", {**CHART, "app.kubernetes.io/component": "billing"}, "x")
    assert model.may_connect(A["instance"], signup, 8080)
    assert not model.may_connect(A["instance"], billing, 8080)
    assert not model.may_connect(A["instance"], CONTROL_PLANE["signup"], 8080)
    assert model.may_connect(A["instance"], INTERNET[0], 8443)


def test_networks_the_operator_allows_webhooks_are_open_less_the_cluster() -> None:
    allowed = KubernetesSettings(
        cluster_cidrs=CLUSTER_CIDRS, alert_webhook_allowed_cidrs="10.0.0.0/8,fd12::/64"
    )
    model = cluster(allowed)
    for ip in ("10.20.0.5", "fd12::7"):
        assert model.may_connect(A["instance"], Address(ip), 443)
        assert not model.may_connect(A["instance"], Address(ip), 80)
    # Inside the allowed 10/8, the cluster's pods stay refused, whatever the plugin reads.
    assert not model.may_connect(A["instance"], Address("10.244.2.10"), 443)
    assert not model.may_connect(A["instance"], B["instance"], 443, ipblocks_match_pods=True)
    # Postgres and Mosquitto stay out all the same.
    assert not model.may_connect(A["postgres"], Address("10.20.0.5"), 443)
    # A network inside the cluster's is no webhook's.
    inside = KubernetesSettings(
        cluster_cidrs=CLUSTER_CIDRS, alert_webhook_allowed_cidrs="11.0.1.0/24"
    )
    assert not cluster(inside).may_connect(A["instance"], Address("11.0.1.5"), 443)
    for policy in cluster(allowed).policies:
        kubernetes_validate.validate(policy, K8S_VERSION, strict=True)


# --- the route on the shared Gateway


def resolve(route: dict[str, Any], path: str) -> dict[str, Any]:
    """The rule Envoy Gateway picks for ``path``: an Exact match, else a RegularExpression (RE2,
    the whole path), else the longest PathPrefix (whole segments)."""
    matches = [(m["path"], r) for r in route["spec"]["rules"] for m in r["matches"]]
    for kind, hit in (
        ("Exact", lambda value: path == value),
        ("RegularExpression", lambda value: re.fullmatch(value, path) is not None),
    ):
        found = [r for m, r in matches if m["type"] == kind and hit(m["value"])]
        if found:
            return found[0]
    prefixes = [
        (len(m["value"]), r)
        for m, r in matches
        if m["type"] == "PathPrefix"
        and (path == m["value"] or path.startswith(m["value"].rstrip("/") + "/"))
    ]
    assert prefixes, path
    return max(prefixes, key=lambda p: p[0])[1]


def test_the_route_attaches_to_the_shared_gateways_tenant_listener() -> None:
    settings = KubernetesSettings(base_domain="example.io", gateway_name="edge")
    route = objects_of(settings=settings)[("HTTPRoute", "instance")]
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert route["metadata"]["namespace"] == NS_A
    assert route["spec"]["parentRefs"] == [
        {
            "group": "gateway.networking.k8s.io",
            "kind": "Gateway",
            "name": "edge",
            "namespace": "iotistic",
            "sectionName": "tenants",
        }
    ]
    # One label under the base domain: what the listener's *.example.io and its one wildcard
    # certificate cover (a wildcard covers one label only).
    assert route["spec"]["hostnames"] == [f"{TENANT_A}.example.io"]
    for hostname in route["spec"]["hostnames"]:
        assert HOSTNAME.match(hostname) and len(hostname) <= 253
        assert hostname.removesuffix(".example.io").count(".") == 0
    # Nothing asks for a certificate of its own, nor names ingress-nginx.
    assert not any(k in str(route) for k in ("cert-manager", "nginx", "tls"))


def test_the_route_sends_each_path_where_it_belongs_with_its_timeout() -> None:
    by = objects_of()
    route = by[("HTTPRoute", "instance")]
    rules = route["spec"]["rules"]
    names = [r["name"] for r in rules]
    assert len(set(names)) == len(names) and all(RULE_NAME.match(n) for n in names)
    for rule in rules:
        assert all(m["path"]["value"].startswith("/") for m in rule["matches"])
        kinds = ("Exact", "PathPrefix", "RegularExpression")
        assert all(m["path"]["type"] in kinds for m in rule["matches"])
        assert DURATION.match(rule["timeouts"]["request"])
        assert "backendRequest" not in rule["timeouts"]
    expected = {
        # A device's MQTT session and a page's live stream last as long as they are open:
        # "0s" disables Envoy's request timeout (15 s by default, whole response included).
        "/mqtt": ("mosquitto", 9001, "0s"),
        "/api/stream": ("instance", 80, "0s"),
        "/api/readings/latest": ("instance", 80, "60s"),
        # A million rows of CSV take longer than an ordinary request.
        "/api/devices/d-1/readings.csv": ("instance", 80, "15m"),
        "/api/devices/d-1/readings": ("instance", 80, "60s"),
        "/api/devices/d-1/readings.csvx": ("instance", 80, "60s"),
        "/dashboard/login": ("instance", 80, "60s"),
        "/": ("instance", 80, "60s"),
        "/mqtt/other": ("instance", 80, "60s"),
        "/mqttx": ("instance", 80, "60s"),
    }
    for path, (service, port, timeout) in expected.items():
        rule = resolve(route, path)
        assert rule["backendRefs"] == [{"kind": "Service", "name": service, "port": port}], path
        assert rule["timeouts"]["request"] == timeout, path


def test_each_backend_leads_to_a_port_the_gateway_may_reach() -> None:
    """Service port → targetPort → container port → the gateway's NetworkPolicy: a route to
    a port the policy refuses would answer 503 for every request."""
    by = objects_of()
    model = cluster()
    pods = {"instance": A["instance"], "mosquitto": A["mosquitto"]}
    for rule in by[("HTTPRoute", "instance")]["spec"]["rules"]:
        for ref in rule["backendRefs"]:
            assert "namespace" not in ref  # same namespace: no ReferenceGrant needed
            service = by[("Service", ref["name"])]["spec"]
            (service_port,) = [p for p in service["ports"] if p["port"] == ref["port"]]
            workload = next(
                o
                for (kind, name), o in by.items()
                if kind in ("Deployment", "StatefulSet") and name == ref["name"]
            )
            container = workload["spec"]["template"]["spec"]["containers"][0]
            target = service_port["targetPort"]
            (container_port,) = [
                p["containerPort"]
                for p in container["ports"]
                if target in (p.get("name"), p["containerPort"])
            ]
            assert model.may_connect(PROXY, pods[ref["name"]], container_port), ref


def test_the_request_timeout_is_a_setting() -> None:
    settings = KubernetesSettings(gateway_request_timeout="5m", gateway_export_timeout="1h")
    route = objects_of(settings=settings)[("HTTPRoute", "instance")]
    assert resolve(route, "/api/devices")["timeouts"]["request"] == "5m"
    assert resolve(route, "/api/devices/d/readings.csv")["timeouts"]["request"] == "1h"
    assert resolve(route, "/mqtt")["timeouts"]["request"] == "0s"


# --- Envoy Gateway's limits on a tenant


def test_each_client_address_has_a_request_rate_on_the_tenants_route() -> None:
    by = objects_of()
    policy = by[("BackendTrafficPolicy", "instance")]
    assert policy["apiVersion"] == "gateway.envoyproxy.io/v1alpha1"
    assert policy["metadata"]["namespace"] == NS_A
    assert policy["spec"]["targetRefs"] == [
        {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "instance"}
    ]
    local = policy["spec"]["rateLimit"]["local"]
    # A bucket per address, in both families; no rule without a selector (Envoy Gateway would
    # make it the route's bucket, which requests matching a per-address rule never consume).
    assert [r["clientSelectors"] for r in local["rules"]] == [
        [{"sourceCIDR": {"type": "Distinct", "value": "0.0.0.0/0"}}],
        [{"sourceCIDR": {"type": "Distinct", "value": "::/0"}}],
    ]
    assert all(r["limit"] == {"requests": 50, "unit": "Second"} for r in local["rules"])
    assert len(local["rules"]) <= 16  # the CRD's bound
    # Applied before the route, so the route never serves unlimited.
    kinds = [o["kind"] for o in render(spec(), SETTINGS, "p")]
    assert kinds.index("BackendTrafficPolicy") < kinds.index("HTTPRoute")
    unlimited = objects_of(settings=KubernetesSettings(gateway_requests_per_client=0))
    assert "rateLimit" not in unlimited[("BackendTrafficPolicy", "instance")]["spec"]


def test_connections_to_a_tenant_follow_its_licensed_devices() -> None:
    def breaker(devices: int) -> dict[str, Any]:
        by = objects_of(max_devices=devices)
        return dict(by[("BackendTrafficPolicy", "instance")]["spec"]["circuitBreaker"])

    # Each device holds a connection (and a request in flight) for its session; people's
    # browsers and API clients get the headroom. Envoy's default, 1024, would refuse devices
    # of a large plan; nothing beyond the broker's own limit is useful.
    assert breaker(10) == {"maxConnections": 110, "maxParallelRequests": 110}
    assert breaker(5000) == {"maxConnections": 5100, "maxParallelRequests": 5100}
    assert breaker(10**6)["maxConnections"] == MAX_CONNECTIONS


def test_without_envoy_gateway_the_route_stands_alone() -> None:
    by = objects_of(settings=KubernetesSettings(gateway_traffic_policy=False))
    assert ("BackendTrafficPolicy", "instance") not in by
    assert ("HTTPRoute", "instance") in by


# --- settings, and the calls the backend makes


def test_the_provisioners_settings_reach_the_manifests() -> None:
    provisioner = load_settings(
        ProvisionerSettings,
        {
            "KUBERNETES_CONTROL_PLANE_NAMESPACE": "platform",
            "KUBERNETES_GATEWAY_NAME": "edge",
            "KUBERNETES_GATEWAY_PROXY_NAMESPACE": "gateways",
            "KUBERNETES_GATEWAY_TRAFFIC_POLICY": "false",
            "KUBERNETES_GATEWAY_REQUESTS_PER_CLIENT": "20",
            "KUBERNETES_WEBHOOK_PORTS": "443, 8443",
            "HTTP_PORT": "8081",
            "KUBERNETES_CONTROL_PLANE_NAME": "iot",
        },
    )
    settings = kubernetes_settings(provisioner)
    assert settings.control_plane_namespace == "platform"
    assert settings.gateway_name == "edge"
    assert settings.gateway_proxy_namespace == "gateways"
    assert settings.gateway_traffic_policy is False
    assert settings.gateway_requests_per_client == 20
    assert settings.webhook_ports == (443, 8443)
    assert settings.control_plane_port == 8081  # the chart's one httpPort, this process's too
    assert settings.control_plane_pod_labels == {"app.kubernetes.io/name": "iot"}
    defaults = kubernetes_settings(load_settings(ProvisionerSettings, {}))
    assert defaults.webhook_ports == (443,)
    assert defaults.gateway_proxy_namespace == "envoy-gateway-system"
    for bad in ("0", "65536", "https", ""):
        with pytest.raises(ConfigError, match="KUBERNETES_WEBHOOK_PORTS"):
            parse_ports(bad, "KUBERNETES_WEBHOOK_PORTS")


def test_the_gateway_kinds_have_their_rest_paths() -> None:
    assert (
        object_path("gateway.networking.k8s.io/v1", "HTTPRoute", "instance", NS_A)
        == f"/apis/gateway.networking.k8s.io/v1/namespaces/{NS_A}/httproutes/instance"
    )
    assert (
        object_path("gateway.envoyproxy.io/v1alpha1", "BackendTrafficPolicy", "instance", NS_A)
        == f"/apis/gateway.envoyproxy.io/v1alpha1/namespaces/{NS_A}/backendtrafficpolicies/instance"
    )


@pytest.fixture
async def standin() -> AsyncIterator[tuple[KubeStandIn, KubernetesBackend]]:
    cluster_api = KubeStandIn()
    async with served(cluster_api) as url:
        backend = KubernetesBackend(
            KubernetesSettings(),
            b"k" * 40,
            api_client_for(url),
            ready_timeout=20,
            poll_seconds=0.05,
        )
        async with backend_running(backend):
            yield cluster_api, backend


async def test_a_deploy_applies_the_route_and_removes_an_older_versions_ingress(
    standin: tuple[KubeStandIn, KubernetesBackend],
) -> None:
    cluster_api, backend = standin

    async def progress(percent: int, step: str) -> None:
        pass

    ingress = f"/apis/networking.k8s.io/v1/namespaces/{NS_A}/ingresses/instance"
    await backend.deploy(spec(), progress)
    requests = [(r["method"], "/" + r["path"].lstrip("/")) for r in cluster_api.requests]
    route = f"/apis/gateway.networking.k8s.io/v1/namespaces/{NS_A}/httproutes/instance"
    policy = (
        f"/apis/gateway.envoyproxy.io/v1alpha1/namespaces/{NS_A}/backendtrafficpolicies/instance"
    )
    assert requests.index(("PATCH", policy)) < requests.index(("PATCH", route))
    assert cluster_api.objects[route]["spec"]["hostnames"] == [f"{TENANT_A}.iotistic.cloud"]
    # A first deploy had no Ingress to remove: asked, absent, fine.
    assert ("DELETE", ingress) in requests
    # A customer deployed by an older version still has its Ingress: an update removes it.
    cluster_api.objects[ingress] = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": {"name": "instance", "namespace": NS_A, "uid": "old", "generation": 1},
        "status": {},
    }
    before = len(cluster_api.requests)
    await backend.update(spec(), progress)
    later = [(r["method"], "/" + r["path"].lstrip("/")) for r in cluster_api.requests[before:]]
    assert ("DELETE", ingress) in later
    assert later.index(("DELETE", ingress)) > later.index(("PATCH", route))
