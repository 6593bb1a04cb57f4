"""The tenant's way in from outside: an HTTPRoute ``<id>.<base domain>`` on the chart's shared
Gateway (Gateway API), which also carries devices' MQTT over WebSockets to the broker, and the
Envoy Gateway BackendTrafficPolicy that limits it."""

from __future__ import annotations

from typing import Any

from libs.servers.mosquitto import MAX_CONNECTIONS
from services.provisioner.backends.base import InstanceSpec
from services.provisioner.backends.kubernetes.manifests.metadata import host_of, object_meta
from services.provisioner.backends.kubernetes.manifests.mosquitto import MQTT_WEBSOCKETS_PORT
from services.provisioner.backends.kubernetes.manifests.settings import KubernetesSettings

MQTT_PATH = "/mqtt"
# The dashboard's server-sent events: open as long as the page is.
LIVE_STREAM_PATH = "/api/stream"
# A device's readings as CSV, up to a million rows streamed: longer than an ordinary request.
EXPORT_PATH = r"/api/devices/[^/]+/readings\.csv"
GATEWAY_API = "gateway.networking.k8s.io"
# The shared Gateway's HTTPS listener for ``*.<base domain>`` that tenants' routes attach to.
GATEWAY_LISTENER = "tenants"


def mqtt_public_url(customer_id: str, settings: KubernetesSettings) -> str:
    """Where the customer's devices connect: MQTT over WebSockets through the shared Gateway."""
    return f"wss://{host_of(customer_id, settings)}{MQTT_PATH}"


def http_route(spec: InstanceSpec, ns: str, settings: KubernetesSettings) -> list[dict[str, Any]]:
    """The tenant's HTTPRoute on the shared Gateway, after the traffic policy that limits it
    (applied first, so the route never serves unlimited)."""
    route = _route(ns, spec.customer_id, settings)
    if not settings.gateway_traffic_policy:
        return [route]
    return [_traffic_policy(spec, ns, settings), route]


def _route(ns: str, cid: str, settings: KubernetesSettings) -> dict[str, Any]:
    """``<id>.<base domain>``: ``/mqtt`` to the broker's WebSockets, the rest to the instance.
    TLS ends at the Gateway's wildcard listener, so nothing here asks for a certificate. Envoy
    ends a route's request after 15 s unless told otherwise, whole response included: a
    device's MQTT session and a page's live stream would be cut, so their rules have no request
    timeout ("0s" disables it, in Gateway API), and a CSV export has a long one; a WebSocket
    upgrade needs nothing else, Envoy Gateway allows it on every route. Envoy Gateway ranks an
    Exact path, then a RegularExpression, then the longest PathPrefix."""

    def rule(name: str, path: str, match: str, service: str, port: int, timeout: str) -> Any:
        return {
            "name": name,
            "matches": [{"path": {"type": match, "value": path}}],
            "backendRefs": [{"kind": "Service", "name": service, "port": port}],
            "timeouts": {"request": timeout},
        }

    return {
        "apiVersion": f"{GATEWAY_API}/v1",
        "kind": "HTTPRoute",
        "metadata": object_meta("instance", ns, cid),
        "spec": {
            "parentRefs": [
                {
                    "group": GATEWAY_API,
                    "kind": "Gateway",
                    "name": settings.gateway_name,
                    "namespace": settings.control_plane_namespace,
                    "sectionName": GATEWAY_LISTENER,
                }
            ],
            "hostnames": [host_of(cid, settings)],
            "rules": [
                rule("mqtt", MQTT_PATH, "Exact", "mosquitto", MQTT_WEBSOCKETS_PORT, "0s"),
                rule("live", LIVE_STREAM_PATH, "Exact", "instance", 80, "0s"),
                rule(
                    "export",
                    EXPORT_PATH,
                    "RegularExpression",
                    "instance",
                    80,
                    settings.gateway_export_timeout,
                ),
                rule("app", "/", "PathPrefix", "instance", 80, settings.gateway_request_timeout),
            ],
        },
    }


def _traffic_policy(spec: InstanceSpec, ns: str, settings: KubernetesSettings) -> dict[str, Any]:
    """Envoy Gateway's limits on this tenant's route, so one tenant's flood or one client's
    cannot take the shared proxies from the others: a request rate per client address (a
    bucket per address, IPv4 and IPv6), and circuit breakers sized by the license: Envoy's
    default of 1024 connections and requests in flight to a backend would refuse devices of a
    large plan (each holds one for its session), and nothing larger than the broker's own
    limit is useful. Both count per Envoy replica; the Gateway must see the client's address
    (its Service's externalTrafficPolicy Local, or PROXY protocol), or every client shares one
    bucket. A per-tenant total rate cannot be added: with per-address rules Envoy Gateway's
    local rate limit never consumes its default bucket."""
    connections = min(spec.max_devices + settings.gateway_connections_headroom, MAX_CONNECTIONS)
    policy: dict[str, Any] = {
        "targetRefs": [{"group": GATEWAY_API, "kind": "HTTPRoute", "name": "instance"}],
        "circuitBreaker": {
            "maxConnections": connections,
            "maxParallelRequests": connections,
        },
    }
    if settings.gateway_requests_per_client:
        policy["rateLimit"] = {
            # ``type`` is deprecated since Envoy Gateway 1.6 and required before it.
            "type": "Local",
            "local": {
                "rules": [
                    {
                        "clientSelectors": [{"sourceCIDR": {"type": "Distinct", "value": cidr}}],
                        "limit": {
                            "requests": settings.gateway_requests_per_client,
                            "unit": "Second",
                        },
                    }
                    for cidr in ("0.0.0.0/0", "::/0")
                ]
            },
        }
    return {
        "apiVersion": "gateway.envoyproxy.io/v1alpha1",
        "kind": "BackendTrafficPolicy",
        "metadata": object_meta("instance", ns, spec.customer_id),
        "spec": policy,
    }
