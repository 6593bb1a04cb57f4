"""The cluster's choices for a tenant's objects (``KubernetesSettings``), and the images they
run by default."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from services.provisioner.backends.kubernetes.storage import StoragePolicy

# Pinned by digest: a tag can be moved to other content, a digest cannot. These are the
# multi-arch index digests of postgres:18 and eclipse-mosquitto:2.0.22 as several public
# repositories pin them; Docker Hub cannot be reached from where this was written, so they
# were not checked against the registry here (`crane digest postgres:18` does it).
POSTGRES_IMAGE = (
    "postgres:18@sha256:3a82e1f56c8f0f5616a11103ac3d47e632c3938698946a7ad26da0df1334744a"
)
MOSQUITTO_IMAGE = (
    "eclipse-mosquitto:2.0@sha256:212f89e1eaeb2c322d6441b64396e3346026674db8fa9c27beac293405c32b3c"
)
_DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")


@dataclass(frozen=True)
class KubernetesSettings:
    """Cluster-specific choices for the rendered objects."""

    base_domain: str = "iotistic.cloud"
    instance_image: str = "ghcr.io/iotistic/iotistic:0.1.0"
    postgres_image: str = POSTGRES_IMAGE
    mosquitto_image: str = MOSQUITTO_IMAGE
    control_plane_namespace: str = "iotistic"
    # The control plane's pods (the chart's labels) and the HTTP port instances may reach on
    # those of ``control_plane_components``.
    control_plane_pod_labels: dict[str, str] = field(
        default_factory=lambda: {"app.kubernetes.io/name": "iotistic"}
    )
    control_plane_port: int = 8080
    # The cluster's pod and service networks, refused like the private ranges.
    cluster_cidrs: tuple[str, ...] = ()
    # Handed to instances: networks their webhooks may reach although not public.
    alert_webhook_allowed_cidrs: str = ""
    storage_class: str | None = None
    namespace_prefix: str = "customer-"
    # Where instances reach the control plane's owners of what they ask, from inside the
    # cluster (each target is a Service of its own): signup, for sign-ins and sessions
    # (CONTROL_PLANE_URL), and billing, for usage reports (USAGE_URL; empty: the same as
    # control_plane_url). Never an address of the pod itself (127.0.0.1 is the instance).
    control_plane_url: str = ""
    usage_url: str = ""
    # How often instances report their usage to billing.
    usage_report_seconds: float = 300.0
    # Where instances' spans go: their OTEL_EXPORTER, and OTEL_EXPORTER_OTLP_ENDPOINT (empty:
    # not set). A collector in the cluster (``otlp_collector_namespace``) is let through the
    # instance's egress policy on the endpoint's port; one outside it is reached like webhooks.
    otel_exporter: str = "none"
    otlp_endpoint: str = ""
    otlp_collector_namespace: str = ""
    # --- the tenants' network: the chart's shared Gateway (Gateway API) and Envoy Gateway
    # The Gateway every tenant's HTTPRoute attaches to, in control_plane_namespace, at its
    # listener GATEWAY_LISTENER (``*.<base domain>``, one wildcard certificate).
    gateway_name: str = "iotistic"
    # Where that Gateway's Envoy proxies run (Envoy Gateway's own namespace, or the Gateway's
    # in its "Gateway namespace" mode) and their pods' labels (Envoy Gateway's, on every proxy
    # whatever its Gateway): the only way into a tenant from outside its namespace.
    gateway_proxy_namespace: str = "envoy-gateway-system"
    gateway_proxy_pod_labels: dict[str, str] = field(
        default_factory=lambda: {
            "app.kubernetes.io/name": "envoy",
            "app.kubernetes.io/component": "proxy",
            "app.kubernetes.io/managed-by": "envoy-gateway",
        }
    )
    # The control plane's targets an instance calls: sign-in and /me (signup), usage (billing),
    # the license keys (licensing); never the provisioner, NATS or Postgres.
    control_plane_components: tuple[str, ...] = ("signup", "billing", "licensing")
    # The cluster DNS's pods, the only DNS a tenant may ask.
    dns_namespace: str = "kube-system"
    dns_pod_labels: dict[str, str] = field(default_factory=lambda: {"k8s-app": "kube-dns"})
    # Ports the instance's alert webhooks may use on public addresses: HTTPS only.
    webhook_ports: tuple[int, ...] = (443,)
    # The longest an ordinary request through the Gateway may take, and a CSV export (MQTT over
    # WebSockets and the dashboard's live stream have none: they last as long as the device or
    # page). Gateway API durations: "60s", "15m", "1h".
    gateway_request_timeout: str = "60s"
    gateway_export_timeout: str = "15m"
    # Render Envoy Gateway's BackendTrafficPolicy per tenant (off for another Gateway API
    # implementation: the HTTPRoute is portable, the policy is not).
    gateway_traffic_policy: bool = True
    # Requests a second one client address may make to one tenant (per Envoy replica and per
    # route rule); 0: no limit.
    gateway_requests_per_client: int = 50
    # Connections to a tenant's broker or instance an Envoy replica holds beyond one per
    # licensed device (people's browsers, API clients).
    gateway_connections_headroom: int = 100
    # Volumes sized by plan, and how many daily dumps each plan keeps (``storage``).
    storage: StoragePolicy = field(default_factory=StoragePolicy)
    # The backup CronJob's schedule; unset: a minute between 01:00 and 05:00 UTC by customer.
    backup_schedule: str | None = None
    # Days a deleted customer's namespace, volumes and backups are kept before the purge.
    deletion_grace_days: int = 30
    # The worker's reads in a tenant's namespace: (the reader ClusterRole, the worker's
    # ServiceAccount namespace, its name). Each namespace gets a RoleBinding of that role to
    # that ServiceAccount (``reader_binding``), the worker's only way to read what is in it.
    # None (outside the chart): no RoleBinding.
    tenant_reader: tuple[str, str, str] | None = None


def pinned_by_digest(image: str) -> bool:
    """Whether ``image`` names its content by a sha256 digest (``repo[:tag]@sha256:<hex>``)."""
    return bool(_DIGEST.search(image))
