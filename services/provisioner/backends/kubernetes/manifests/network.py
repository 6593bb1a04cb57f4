"""The tenant's NetworkPolicies: every pod isolated in its namespace (in: its own pods; out:
its own pods and the cluster DNS), the shared Gateway's proxies let in to the instance's HTTP
port and the broker's WebSockets port only, and the instance pods, only them, let out to the
control plane's HTTP targets, to public HTTPS (alert webhooks) and to the OTLP collector's
namespace if one is named, never to private, loopback, link-local, shared or reserved addresses
nor the cluster's own networks."""

from __future__ import annotations

import ipaddress
from typing import Any
from urllib.parse import urlsplit

from services.provisioner.backends.kubernetes.manifests.instance import INSTANCE_PORT
from services.provisioner.backends.kubernetes.manifests.metadata import object_meta
from services.provisioner.backends.kubernetes.manifests.mosquitto import MQTT_WEBSOCKETS_PORT
from services.provisioner.backends.kubernetes.manifests.settings import KubernetesSettings

# What instances may not reach outside their namespace, although it is not the control plane:
# every private, loopback, link-local, shared, multicast and reserved range (and IPv4 in IPv6).
NOT_PUBLIC_V4 = (
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/4",
    "240.0.0.0/4",
)
NOT_PUBLIC_V6 = (
    "::1/128",
    "::ffff:0:0/96",
    "64:ff9b:1::/48",  # local-use NAT64 (RFC 8215): where it carries IPv4 is the network's
    "fc00::/7",
    "fe80::/10",
    "ff00::/8",
)
# IPv6 prefixes that carry an IPv4 address (NAT64's well-known prefix, RFC 6052, in its last
# 32 bits; 6to4, RFC 3056, right after its 16): open only as far as the IPv4 address they
# carry is public, as the instance's own webhook check reads them, else a cluster with NAT64
# (IPv6-only pods) lets 64:ff9b::a9fe:a9fe through to the cloud's metadata.
IPV4_IN_IPV6 = (("64:ff9b::/96", 0), ("2002::/16", 80))


def _namespace_peer(name: str, pod_labels: dict[str, str] | None = None) -> dict[str, Any]:
    """A NetworkPolicy peer: the pods (with ``pod_labels``, or all) of the namespace ``name``."""
    peer: dict[str, Any] = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": name}}
    }
    if pod_labels is not None:
        peer["podSelector"] = {"matchLabels": dict(pod_labels)}
    return peer


def _tcp(*ports: int) -> list[dict[str, Any]]:
    return [{"protocol": "TCP", "port": port} for port in ports]


def isolation_policy(ns: str, cid: str, settings: KubernetesSettings) -> dict[str, Any]:
    """Every pod of the tenant: in from its own namespace only (the Gateway's way in is
    ``gateway_ingress``, pod by pod), out to its own namespace and the cluster DNS only."""
    dns = _namespace_peer(settings.dns_namespace, settings.dns_pod_labels)
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": object_meta("isolate-customer", ns, cid),
        "spec": {
            "podSelector": {},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [{"podSelector": {}}]}],
            "egress": [
                {"to": [{"podSelector": {}}]},
                {"to": [dns], "ports": [{"protocol": "UDP", "port": 53}, *_tcp(53)]},
            ],
        },
    }


def gateway_ingress(ns: str, cid: str, settings: KubernetesSettings) -> list[dict[str, Any]]:
    """The Gateway's Envoy proxies in: to the instance's HTTP port, and (devices' MQTT over
    WebSockets, TLS ended at the Gateway) to the broker's WebSockets port; nothing else, and
    no other pod of the tenant."""
    proxies = _namespace_peer(settings.gateway_proxy_namespace, settings.gateway_proxy_pod_labels)
    return [
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": object_meta(f"gateway-to-{target}", ns, cid),
            "spec": {
                "podSelector": {"matchLabels": {"app.kubernetes.io/name": target}},
                "policyTypes": ["Ingress"],
                "ingress": [{"from": [proxies], "ports": _tcp(port)}],
            },
        }
        for target, port in (("instance", INSTANCE_PORT), ("mosquitto", MQTT_WEBSOCKETS_PORT))
    ]


def instance_egress(ns: str, cid: str, settings: KubernetesSettings) -> dict[str, Any]:
    """The instance pods, besides their namespace and DNS: the control plane's HTTP targets on
    their port only (never its NATS, Postgres or provisioner), and public addresses on the
    webhook ports (alert webhooks), plus the networks the operator allowed webhooks to reach.
    Postgres and Mosquitto get nothing beyond their namespace and DNS."""
    control_plane = _namespace_peer(settings.control_plane_namespace)
    control_plane["podSelector"] = {
        "matchLabels": dict(settings.control_plane_pod_labels),
        "matchExpressions": [
            {
                "key": "app.kubernetes.io/component",
                "operator": "In",
                "values": list(settings.control_plane_components),
            }
        ],
    }
    webhooks = public_internet(settings.cluster_cidrs) + _allowed_networks(settings)
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": object_meta("instance-egress", ns, cid),
        "spec": {
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "instance"}},
            "policyTypes": ["Egress"],
            "egress": [
                {"to": [control_plane], "ports": _tcp(settings.control_plane_port)},
                {"to": webhooks, "ports": _tcp(*settings.webhook_ports)},
                *_collector(settings),
            ],
        },
    }


def _collector(settings: KubernetesSettings) -> list[dict[str, Any]]:
    """The OTLP collector's namespace on its endpoint's port, where instances export to one
    inside the cluster (``otlp_collector_namespace``); else nothing."""
    if not (settings.otlp_collector_namespace and settings.otlp_endpoint):
        return []
    endpoint = urlsplit(settings.otlp_endpoint)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    return [{"to": [_namespace_peer(settings.otlp_collector_namespace)], "ports": _tcp(port)}]


def public_internet(cluster_cidrs: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """``ipBlock`` peers for every public address: all of IPv4 and IPv6 except the ranges that
    are not public and the cluster's own networks (as far as a NetworkPolicy can say it: pod
    addresses are matched by ipBlock only where the network plugin does so)."""
    blocks = []
    carriers = tuple(prefix for prefix, _ in IPV4_IN_IPV6)
    for everything, refused in (("0.0.0.0/0", NOT_PUBLIC_V4), ("::/0", NOT_PUBLIC_V6 + carriers)):
        excepted = [ipaddress.ip_network(c) for c in refused]
        blocks.append(_block(ipaddress.ip_network(everything), excepted, cluster_cidrs))
    not_public_v4 = [ipaddress.IPv4Network(c) for c in NOT_PUBLIC_V4] + [
        net for net in map(ipaddress.ip_network, cluster_cidrs) if net.version == 4
    ]
    for prefix, shift in IPV4_IN_IPV6:
        carrier = ipaddress.IPv6Network(prefix)
        carried: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = [
            ipaddress.IPv6Network(
                (
                    int(carrier.network_address) | (int(v4.network_address) << shift),
                    carrier.prefixlen + v4.prefixlen,
                )
            )
            for v4 in not_public_v4
        ]
        blocks.append(_block(carrier, _outermost(carried), ()))
    return blocks


def _outermost(
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network],
) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """``networks`` less those inside another of them (an ipBlock's exceptions may not nest)."""
    return [
        net
        for net in networks
        if not any(
            other != net and net.subnet_of(other)  # type: ignore[arg-type]
            for other in networks
        )
    ]


def _allowed_networks(settings: KubernetesSettings) -> list[dict[str, Any]]:
    """``ipBlock`` peers for ALERT_WEBHOOK_ALLOWED_CIDRS, which the instance lets its webhooks
    reach although they are not public: the policy must agree, less the cluster's networks (a
    pod or Service address stays refused even inside an allowed private range)."""
    clusters = [ipaddress.ip_network(c, strict=False) for c in settings.cluster_cidrs]
    blocks = []
    for item in settings.alert_webhook_allowed_cidrs.split(","):
        if item.strip():
            allowed = ipaddress.ip_network(item.strip(), strict=False)
            same_version = [c for c in clusters if c.version == allowed.version]
            if not any(allowed.subnet_of(c) for c in same_version):  # type: ignore[arg-type]
                blocks.append(_block(allowed, [], settings.cluster_cidrs))
    return blocks


def _block(
    network: ipaddress.IPv4Network | ipaddress.IPv6Network,
    excepted: list[ipaddress.IPv4Network | ipaddress.IPv6Network],
    cluster_cidrs: tuple[str, ...],
) -> dict[str, Any]:
    """An ``ipBlock`` of ``network`` less ``excepted`` and the cluster networks inside it (an
    exception must lie inside the block; one already inside another exception is left out)."""
    for cidr in cluster_cidrs:
        cluster = ipaddress.ip_network(cidr, strict=False)
        if (
            cluster.version == network.version
            and cluster.subnet_of(network)  # type: ignore[arg-type]
            and cluster != network
            and not any(cluster.subnet_of(e) for e in excepted)  # type: ignore[arg-type]
        ):
            excepted.append(cluster)
    block: dict[str, Any] = {"cidr": str(network)}
    if excepted:
        block["except"] = [str(e) for e in excepted]
    return {"ipBlock": block}
