"""Settings of the provisioner: the queue, and the backend that runs customers' instances."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Literal

from msgspec import Meta

from libs.config import ConfigError, ServiceSettings


class ProvisionerSettings(ServiceSettings, frozen=True, kw_only=True):
    """The queue's limits and timings; where and how instances run."""

    # Jobs running at once across every provisioner replica.
    queue_concurrency: Annotated[int, Meta(ge=1, le=100)] = 3
    # Attempts per job (the first one included) before it fails for good.
    queue_max_retries: Annotated[int, Meta(ge=1, le=20)] = 3
    # Backoff before the second attempt, doubling for each one after (ms).
    queue_retry_delay: Annotated[int, Meta(ge=1, le=86_400_000)] = 60_000
    # A running job's lease: a worker that dies loses its job to another after this long.
    queue_lease_seconds: Annotated[float, Meta(gt=0, le=3600)] = 30.0
    # How often idle workers look for jobs another replica queued.
    queue_poll_seconds: Annotated[float, Meta(gt=0, le=60)] = 0.25
    # The health watch: how often each deployed instance is checked through its backend, how
    # long one check may take, how long an instance may stay unhealthy before it is redeployed,
    # and the longest wait between redeploys of an instance that keeps breaking (the wait
    # doubles from INSTANCE_UNHEALTHY_REDEPLOY_SECONDS with each redeploy in that window).
    instance_health_check_seconds: Annotated[float, Meta(gt=0, le=3600)] = 10.0
    instance_health_timeout_seconds: Annotated[float, Meta(gt=0, le=120)] = 5.0
    instance_unhealthy_redeploy_seconds: Annotated[float, Meta(ge=0, le=86400)] = 60.0
    instance_redeploy_backoff_max_seconds: Annotated[float, Meta(gt=0, le=604800)] = 3600.0
    provisioner_backend: Literal["local", "kubernetes"] = "local"
    # Derives each instance's database and broker passwords (HMAC), so retries converge.
    provisioner_secret: Annotated[str, Meta(min_length=32)] | None = None
    # Billing's USAGE_SECRET: each instance gets the usage token derived from it.
    usage_secret: Annotated[str, Meta(min_length=32)] | None = None
    # Signup's LOGIN_RELAY_SECRET: each instance gets the key its dashboard signs with.
    login_relay_secret: Annotated[str, Meta(min_length=32)] | None = None
    # How often instances report their usage to billing.
    instance_usage_report_seconds: Annotated[float, Meta(gt=0, le=86400)] = 300.0
    # Where instances reach the control plane (customers' sign-in is checked there).
    control_plane_url: str = "http://127.0.0.1:8080"
    # Where instances fetch the keys that verify their license.
    license_jwks_url: str = "http://127.0.0.1:8080/.well-known/jwks.json"
    # Handed to every instance: networks its alert webhooks may reach although they are not
    # public (comma-separated CIDRs); unset: public addresses only.
    alert_webhook_allowed_cidrs: str = ""
    # Instances this platform may run at most, whatever the backend counts it can hold;
    # unset: as many as the backend can hold (the kubernetes backend: no limit).
    max_instances: Annotated[int, Meta(ge=0)] | None = None
    # How often the capacity is measured again (and a change of it recorded on the log).
    capacity_check_seconds: Annotated[float, Meta(gt=0, le=300)] = 5.0
    # --- local backend
    # A folder for each instance's license file and log.
    local_instances_dir: str = ".iotistic/instances"
    # Postgres where each instance gets a database and role (needs CREATEDB and CREATEROLE);
    # unset: the provisioner's own DATABASE_URL server.
    local_admin_database_url: str | None = None
    # The broker instances and devices use, and its dynamic-security admin.
    mqtt_host: str = "127.0.0.1"
    mqtt_port: Annotated[int, Meta(ge=1, le=65535)] = 1883
    mqtt_admin_username: str | None = None
    mqtt_admin_password: str | None = None
    # The command that runs an instance (its environment says which customer); space-separated.
    local_instance_command: str | None = None
    local_instance_host: str = "127.0.0.1"
    # How long a started instance has to answer /health/ready.
    local_ready_timeout_seconds: Annotated[float, Meta(gt=0, le=600)] = 60.0
    # Capacity of this machine. Connections of the instances' Postgres kept for the control
    # plane (its services' pools, the provisioner's admin work, psql), beyond the superusers'.
    local_control_plane_connections: Annotated[int, Meta(ge=0)] = 100
    # Connections budgeted for each idle instance.
    local_connections_per_instance: Annotated[int, Meta(ge=1, le=100)] = 2
    # Memory budgeted for each idle instance (MiB): its RSS, 62 MiB measured by `./dev bench
    # density`, its Postgres backend's share (~6 MiB) and room to grow; and the share of the
    # memory available to instances (what is free now plus what the running ones hold) that
    # they may take.
    local_memory_per_instance_mib: Annotated[int, Meta(ge=1)] = 80
    local_memory_share: Annotated[float, Meta(gt=0, le=1)] = 0.9
    # --- kubernetes backend
    base_domain: str = "iotistic.cloud"
    instance_image: str = "ghcr.io/iotistic/iotistic:0.1.0"
    kubernetes_ready_timeout_seconds: Annotated[float, Meta(gt=0, le=3600)] = 300.0
    storage_class: str | None = None
    # The namespace the chart runs in: its Gateway (KUBERNETES_GATEWAY_NAME, whose "tenants"
    # listener every customer's HTTPRoute attaches to) and the targets instances call.
    kubernetes_control_plane_namespace: str = "iotistic"
    # The chart's app.kubernetes.io/name label on its pods (the chart's name, or nameOverride).
    kubernetes_control_plane_name: str = "iotistic"
    kubernetes_gateway_name: str = "iotistic"
    # Where the Gateway's Envoy proxies run: the only pods let into a customer's namespace.
    kubernetes_gateway_proxy_namespace: str = "envoy-gateway-system"
    # An Envoy Gateway BackendTrafficPolicy per customer (false for another Gateway API
    # implementation), with a request rate per client address (0: none) per Envoy replica.
    kubernetes_gateway_traffic_policy: bool = True
    kubernetes_gateway_requests_per_client: Annotated[int, Meta(ge=0)] = 50
    # Ports alert webhooks may use on public addresses (comma-separated): HTTPS only unless
    # a receiver needs another.
    kubernetes_webhook_ports: str = "443"
    # The cluster's pod and service networks (comma-separated CIDRs), which instances may not
    # reach beyond their namespace, where they are not in the private ranges already refused.
    kubernetes_cluster_cidrs: str = ""
    # Billing's URL as instances reach it, where they report their usage: its own Service,
    # e.g. http://<release>-iotistic-billing.<namespace>.svc:8080, while CONTROL_PLANE_URL
    # names signup's. Unset: CONTROL_PLANE_URL (the local backend's instances always use that).
    usage_url: str | None = None
    # Where the kubernetes backend's instances send their spans: their OTEL_EXPORTER (unset:
    # this process's) and OTEL_EXPORTER_OTLP_ENDPOINT (unset: this process's, the standard
    # variable read here too), and the namespace of a collector inside the cluster, which their
    # egress policy then lets them reach on that endpoint's port (unset: a collector outside
    # the cluster, reached on the webhook ports as public HTTPS is).
    instance_otel_exporter: Literal["none", "console", "otlp"] | None = None
    instance_otlp_endpoint: str | None = None
    otel_exporter_otlp_endpoint: str | None = None
    kubernetes_otlp_collector_namespace: str = ""
    # Each customer's namespace is <prefix><customer id>.
    kubernetes_namespace_prefix: Annotated[
        str, Meta(pattern=r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9-])?$")
    ] = "customer-"
    # Every tenant's Postgres and Mosquitto, pinned by digest (repo:tag@sha256:...); an image
    # that is not is refused at start unless ALLOW_UNPINNED_IMAGES says so (a tag can be moved
    # to other content under running customers). Unset: the digests this version was tested
    # with. INSTANCE_IMAGE without a digest is only warned about (see kubernetes_settings).
    postgres_image: str | None = None
    mosquitto_image: str | None = None
    allow_unpinned_images: bool = False
    # --- where jobs run
    # Whether this process applies: starts the backend, claims queued jobs and runs the health
    # and capacity watches. false: it serves the routes and projections only, and queued jobs
    # wait for a process where it is true. On Kubernetes the web-facing pods run with false and
    # no service-account token; only the worker pods (no Service) hold the cluster rights.
    provisioner_worker: bool = True
    # --- kubernetes: storage by plan, backups, deletion (services/provisioner/backends/
    # kubernetes/storage.py and kubernetes/backups.py say how they are used)
    # What one stored reading costs on disk, indexes and rollups included (`./dev bench backup`:
    # 239 B with readings that vary as a sensor's do),
    # and the headroom over messages/day x retention days x that (WAL, dead letters).
    storage_bytes_per_reading: Annotated[int, Meta(ge=1, le=100_000)] = 240
    storage_headroom: Annotated[float, Meta(ge=1, le=10)] = 1.3
    storage_min_data_gib: Annotated[int, Meta(ge=1)] = 2
    # A compressed dump's size against the data volume's; daily dumps kept, per plan.
    backup_dump_ratio: Annotated[float, Meta(gt=0, le=2)] = 0.2
    backups_kept: str = "trial=3,starter=7,professional=14,enterprise=14"
    # The backup CronJob's schedule (cron, UTC); unset: a minute between 01:00 and 05:00
    # that each customer's id decides.
    backup_schedule: str | None = None
    # Days a deleted customer's namespace, volumes and backups are kept (unless the customer
    # asked for erasure) before the hourly purge deletes them.
    deletion_grace_days: Annotated[int, Meta(ge=0, le=3650)] = 30
    # --- kubernetes: the worker's reads, confined to tenant namespaces. The ClusterRole the
    # worker may read tenants' workloads, volumes, Jobs and pods with, and its ServiceAccount
    # (<namespace>:<name>): each tenant's namespace gets a RoleBinding of the one to the other
    # (the chart sets both; its ClusterRole holds no cluster-wide read of those kinds). Both
    # unset (the default, and outside a cluster): no RoleBinding is rendered.
    kubernetes_tenant_reader_role: str = ""
    kubernetes_worker_service_account: str = ""


def parse_cidrs(text: str, variable: str) -> tuple[str, ...]:
    """Comma-separated networks in CIDR notation, normalised; a ``ConfigError`` names one
    that is not."""
    networks = []
    for item in (part.strip() for part in text.split(",")):
        if item:
            try:
                networks.append(str(ipaddress.ip_network(item, strict=False)))
            except ValueError:
                raise ConfigError(f"{variable}: {item[:64]!r} is not a CIDR network") from None
    return tuple(networks)


def parse_ports(text: str, variable: str) -> tuple[int, ...]:
    """Comma-separated TCP ports (1 to 65535); a ``ConfigError`` names one that is not."""
    ports = []
    for item in (part.strip() for part in text.split(",")):
        if item:
            if not item.isdigit() or not 0 < int(item) < 65536:
                raise ConfigError(f"{variable}: {item[:16]!r} is not a port from 1 to 65535")
            ports.append(int(item))
    if not ports:
        raise ConfigError(f"{variable}: no port given")
    return tuple(ports)


def parse_backups_kept(text: str) -> tuple[tuple[str, int], ...]:
    """``trial=3,starter=7``: dumps kept per plan; a ``ConfigError`` names a bad item."""
    kept = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        plan, _, count = item.partition("=")
        if not plan.strip() or not count.strip().isdigit() or int(count) < 1:
            raise ConfigError(f"BACKUPS_KEPT: {item[:64]!r} is not <plan>=<dumps, 1 or more>")
        kept.append((plan.strip(), int(count)))
    return tuple(kept)


_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_RBAC_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.:]{0,251}[A-Za-z0-9])?$")


def parse_tenant_reader(role: str, service_account: str) -> tuple[str, str, str] | None:
    """(reader ClusterRole, the worker's ServiceAccount namespace, its name) from
    KUBERNETES_TENANT_READER_ROLE and KUBERNETES_WORKER_SERVICE_ACCOUNT (``<namespace>:<name>``);
    None when both are unset. One without the other is a ``ConfigError``: the worker would
    either read nothing in a tenant's namespace or bind a role to nobody."""
    role, service_account = role.strip(), service_account.strip()
    if not role and not service_account:
        return None
    if not role or not service_account:
        raise ConfigError(
            "KUBERNETES_TENANT_READER_ROLE and KUBERNETES_WORKER_SERVICE_ACCOUNT go together"
        )
    if not _RBAC_NAME.match(role):
        raise ConfigError(f"KUBERNETES_TENANT_READER_ROLE: {role[:64]!r} is not a role name")
    namespace, _, name = service_account.partition(":")
    if not _DNS_LABEL.match(namespace) or not _DNS_SUBDOMAIN.match(name):
        raise ConfigError(
            f"KUBERNETES_WORKER_SERVICE_ACCOUNT: {service_account[:64]!r} is not"
            " <namespace>:<service account name>"
        )
    return role, namespace, name
