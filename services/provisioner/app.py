"""Wiring of the provisioner: the deployment queue, its workers and the instance backends."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from litestar.types import ControllerRouterHandler

from contracts import (
    DeploymentFailed,
    DeploymentJobRemoved,
    DeploymentProgressed,
    DeploymentRequested,
    DeploymentRetried,
    DeploymentStarted,
    DeploymentSucceeded,
    DeploymentSuperseded,
    DeploymentWaitingForCapacity,
    InstanceCapacityChanged,
    InstanceDegraded,
    InstanceRecovered,
)
from libs.config import ConfigError
from libs.projections.apply import Projection
from libs.runtime.outbox import OutboxRelay, outbox_relay, outbox_worker
from libs.runtime.scheduling import every
from libs.runtime.service import ServiceDefinition, ServiceRuntime
from libs.runtime.supervision import Worker
from services.provisioner.backends.base import Backend, BackendError
from services.provisioner.backends.kubernetes.manifests.settings import (
    KubernetesSettings,
    pinned_by_digest,
)
from services.provisioner.backends.kubernetes.storage import StoragePolicy
from services.provisioner.capacity import CapacityWatch
from services.provisioner.health import HealthWatch
from services.provisioner.metrics import HealthMetrics, QueueMetrics
from services.provisioner.projections import CAPACITY_RECORDED, DEPLOYMENTS, INSTANCE_HEALTH
from services.provisioner.reactors import provisioner_reactors
from services.provisioner.settings import (
    ProvisionerSettings,
    parse_backups_kept,
    parse_cidrs,
    parse_ports,
    parse_tenant_reader,
)
from services.provisioner.worker import QueueWorker

if TYPE_CHECKING:  # kubernetes-asyncio is imported only by a provisioner that uses it
    from kubernetes_asyncio import client as k8s

    from services.provisioner.backends.kubernetes.backend import KubernetesBackend

METRICS_REFRESH_SECONDS = 5.0
# How often deleted customers' namespaces are checked for the end of their grace period.
PURGE_SECONDS = 3600.0
log = logging.getLogger(__name__)


def settings_of(runtime: ServiceRuntime) -> ProvisionerSettings:
    """The provisioner's settings."""
    return runtime.settings_as(ProvisionerSettings)


def applies_here(runtime: ServiceRuntime) -> bool:
    """Whether this process runs the backend and the queue's jobs (``PROVISIONER_WORKER``)."""
    return settings_of(runtime).provisioner_worker


def backend_of(runtime: ServiceRuntime) -> Backend:
    """The backend this provisioner runs instances with (one per process)."""

    def make() -> Backend:
        settings = settings_of(runtime)
        if settings.provisioner_backend == "kubernetes":
            check_reachable_from_pods(settings)
            return kubernetes_backend(settings)
        from services.provisioner.backends.local.backend import LocalBackend

        return LocalBackend(settings, runtime.db)

    return runtime.shared("backend", make)


def kubernetes_backend(
    settings: ProvisionerSettings,
    api_client: Callable[[], Awaitable[k8s.ApiClient]] | None = None,
) -> KubernetesBackend:
    """The kubernetes backend these settings describe: the workers', and the fleet rollout's,
    which must render exactly what the workers apply. ``api_client``: the cluster's by default
    (in-cluster, else the kubeconfig). The operator's commands (render, rotate-credentials) use it
    too, so they apply the same objects."""
    from services.provisioner.backends.kubernetes.api import cluster_client
    from services.provisioner.backends.kubernetes.backend import KubernetesBackend

    return KubernetesBackend(
        kubernetes_settings(settings),
        (settings.provisioner_secret or "").encode(),
        api_client or cluster_client,
        ready_timeout=settings.kubernetes_ready_timeout_seconds,
        login_relay_secret=settings.login_relay_secret,
        max_instances=settings.max_instances,
        usage_secret=settings.usage_secret,
    )


def kubernetes_settings(settings: ProvisionerSettings) -> KubernetesSettings:
    """What the rendered Kubernetes objects depend on, from the provisioner's settings.
    Raises ``ConfigError`` for a Postgres or Mosquitto image not pinned by digest (unless
    ALLOW_UNPINNED_IMAGES), and warns of an instance image that is not."""
    images = tenant_images(settings)
    return KubernetesSettings(
        postgres_image=images["postgres_image"],
        mosquitto_image=images["mosquitto_image"],
        instance_image=images["instance_image"],
        namespace_prefix=settings.kubernetes_namespace_prefix,
        base_domain=settings.base_domain,
        control_plane_namespace=settings.kubernetes_control_plane_namespace,
        control_plane_pod_labels={"app.kubernetes.io/name": settings.kubernetes_control_plane_name},
        # Every target of the chart serves HTTP on its one httpPort, this process's too.
        control_plane_port=settings.http_port,
        gateway_name=settings.kubernetes_gateway_name,
        gateway_proxy_namespace=settings.kubernetes_gateway_proxy_namespace,
        gateway_traffic_policy=settings.kubernetes_gateway_traffic_policy,
        gateway_requests_per_client=settings.kubernetes_gateway_requests_per_client,
        webhook_ports=parse_ports(settings.kubernetes_webhook_ports, "KUBERNETES_WEBHOOK_PORTS"),
        storage_class=settings.storage_class,
        cluster_cidrs=parse_cidrs(settings.kubernetes_cluster_cidrs, "KUBERNETES_CLUSTER_CIDRS"),
        alert_webhook_allowed_cidrs=",".join(
            parse_cidrs(settings.alert_webhook_allowed_cidrs, "ALERT_WEBHOOK_ALLOWED_CIDRS")
        ),
        control_plane_url=settings.control_plane_url,
        usage_url=settings.usage_url or settings.control_plane_url,
        usage_report_seconds=settings.instance_usage_report_seconds,
        otel_exporter=settings.instance_otel_exporter or settings.otel_exporter,
        otlp_endpoint=settings.instance_otlp_endpoint or settings.otel_exporter_otlp_endpoint or "",
        otlp_collector_namespace=settings.kubernetes_otlp_collector_namespace,
        storage=StoragePolicy(
            bytes_per_reading=settings.storage_bytes_per_reading,
            headroom=settings.storage_headroom,
            min_data_gib=settings.storage_min_data_gib,
            dump_ratio=settings.backup_dump_ratio,
            backups_kept=parse_backups_kept(settings.backups_kept),
        ),
        backup_schedule=settings.backup_schedule,
        deletion_grace_days=settings.deletion_grace_days,
        tenant_reader=parse_tenant_reader(
            settings.kubernetes_tenant_reader_role, settings.kubernetes_worker_service_account
        ),
    )


def check_reachable_from_pods(settings: ProvisionerSettings) -> None:
    """A ``ConfigError`` when an address the kubernetes backend hands to instances is the
    pod's own (loopback, as the defaults made for the local backend are): there 127.0.0.1 is
    the instance itself, which answers its own sign-ins with 404."""
    for variable, url, owner in (
        ("CONTROL_PLANE_URL", settings.control_plane_url, "signup"),
        ("USAGE_URL", settings.usage_url or settings.control_plane_url, "billing"),
        ("LICENSE_JWKS_URL", settings.license_jwks_url, "licensing"),
    ):
        host = urlsplit(url).hostname or ""
        try:
            address = ipaddress.ip_address(host)
            itself = address.is_loopback or address.is_unspecified
        except ValueError:
            itself = host == "localhost" or host.endswith(".localhost")
        if not host or itself:
            raise ConfigError(
                f"{variable}: {url[:120]!r} is not an address of the control plane inside the "
                "cluster (the kubernetes backend's instances would ask themselves); set it to "
                f"{owner}'s Service, e.g. http://<release>-iotistic-{owner}.<namespace>.svc:8080"
            )


def tenant_images(settings: ProvisionerSettings) -> dict[str, str]:
    """The tenants' images, checked: Postgres and Mosquitto pinned by digest or refused, the
    instance's warned about. The instance image is our own build: a developer's cluster runs
    one made (and loaded) locally, which has no registry digest, while production gets it from
    the chart as repo:tag@digest. Refusing it would only push developers to the opt-out."""
    defaults = KubernetesSettings()
    images = {
        "postgres_image": settings.postgres_image or defaults.postgres_image,
        "mosquitto_image": settings.mosquitto_image or defaults.mosquitto_image,
        "instance_image": settings.instance_image,
    }
    for name in ("postgres_image", "mosquitto_image"):
        if not pinned_by_digest(images[name]) and not settings.allow_unpinned_images:
            raise ConfigError(
                f"{name.upper()} {images[name]!r} is not pinned by digest "
                "(name:tag@sha256:<64 hex>); pin it, or set ALLOW_UNPINNED_IMAGES=true"
            )
    if not pinned_by_digest(images["instance_image"]):
        log.warning(
            "INSTANCE_IMAGE %r is not pinned by digest: a moved tag would reach customers "
            "at their next rollout; production should give repo:tag@sha256:...",
            images["instance_image"],
        )
    return images


def relay_of(runtime: ServiceRuntime) -> OutboxRelay:
    """Appends the queue's events to the log."""
    return outbox_relay(runtime)


def metrics_of(runtime: ServiceRuntime) -> QueueMetrics:
    """The queue's metrics, registered once in the process's registry."""
    return runtime.shared("metrics", lambda: QueueMetrics(runtime.registry))


def capacity_of(runtime: ServiceRuntime) -> CapacityWatch:
    """Keeps the backend's capacity measured, shown and recorded on changes."""
    return runtime.shared(
        "capacity",
        lambda: CapacityWatch(
            backend=backend_of(runtime),
            pool=runtime.db,
            events=runtime.events,
            metrics=metrics_of(runtime),
            every=settings_of(runtime).capacity_check_seconds,
        ),
    )


def worker_of(runtime: ServiceRuntime) -> QueueWorker:
    """This replica's queue worker."""
    return runtime.shared(
        "worker",
        lambda: QueueWorker(
            runtime.db,
            settings_of(runtime),
            backend_of(runtime),
            relay_of(runtime),
            metrics_of(runtime),
            capacity=capacity_of(runtime).limit,
            after_job=capacity_of(runtime).wake,
        ),
    )


def health_watch_of(runtime: ServiceRuntime) -> HealthWatch:
    """This replica's health watch over the deployed instances."""

    def make() -> HealthWatch:
        worker = worker_of(runtime)
        return HealthWatch(
            runtime.db,
            runtime.events,
            settings_of(runtime),
            backend_of(runtime),
            runtime.shared("health metrics", lambda: HealthMetrics(runtime.registry)),
            worker.backend_started,
            worker.wake,
        )

    return runtime.shared("health watch", make)


def _reactors(runtime: ServiceRuntime) -> Sequence[Projection]:
    def wake() -> None:
        # After the reactor's transaction commits the job is claimable; the next poll (a
        # quarter second) finds it anyway, waking just saves that wait.
        if applies_here(runtime):
            worker_of(runtime).wake()
        relay_of(runtime).wake()

    return provisioner_reactors(settings_of(runtime).queue_max_retries, wake)


def _workers(runtime: ServiceRuntime) -> list[Worker]:
    # The routes' and reactor's events reach the log from any process; the metrics read the
    # queue's table. Only a process that applies makes the backend and holds its rights.
    everywhere = [
        outbox_worker(runtime),
        Worker(
            "queue metrics",
            lambda: metrics_of(runtime).refresh_every(runtime.db, METRICS_REFRESH_SECONDS),
        ),
    ]
    if not applies_here(runtime):
        return everywhere
    return [
        Worker("queue worker", worker_of(runtime).run),
        *everywhere,
        Worker("capacity", capacity_of(runtime).run),
        health_watch_of(runtime).worker(),
        *_purge_workers(runtime),
    ]


def _purge_workers(runtime: ServiceRuntime) -> list[Worker]:
    """On Kubernetes: every hour, delete deleted customers' namespaces past their grace."""
    backend = backend_of(runtime)
    purge = getattr(backend, "purge_expired", None)
    if purge is None:
        return []
    started = worker_of(runtime).backend_started

    async def purge_namespaces_past_their_grace() -> int:
        if not started.is_set():
            return 0  # the worker has not connected to the cluster yet
        try:
            return len(await purge())
        except BackendError as exc:
            log.warning("purge: %s; next pass in an hour", exc)
            return 0

    return [
        every(
            PURGE_SECONDS,
            "provisioner: purging deleted namespaces",
            purge_namespaces_past_their_grace,
        )
    ]


# What readiness shows in a process that does not apply (PROVISIONER_WORKER=false).
NOT_APPLYING = "not here (PROVISIONER_WORKER=false): the provisioner's worker runs the jobs"


def _readiness(runtime: ServiceRuntime) -> Mapping[str, Any]:
    if not applies_here(runtime):
        return {"worker": NOT_APPLYING}
    # Full is not unhealthy: shown, never a reason for 503.
    return {"capacity": capacity_of(runtime).readiness()}


def _routes(runtime: ServiceRuntime) -> Sequence[ControllerRouterHandler]:
    from services.provisioner.routes import provisioner_routes

    if not applies_here(runtime):
        return provisioner_routes(runtime, None, relay_of(runtime), None)
    return provisioner_routes(runtime, backend_of(runtime), relay_of(runtime), worker_of(runtime))


PROVISIONER = ServiceDefinition(
    name="provisioner",
    migrations_package="services.provisioner.migrations",
    projections=(DEPLOYMENTS, CAPACITY_RECORDED, INSTANCE_HEALTH),
    reactors=_reactors,
    routes=_routes,
    workers=_workers,
    emits=(
        DeploymentFailed,
        DeploymentJobRemoved,
        DeploymentProgressed,
        DeploymentRequested,
        DeploymentRetried,
        DeploymentStarted,
        DeploymentSucceeded,
        DeploymentSuperseded,
        DeploymentWaitingForCapacity,
        InstanceCapacityChanged,
        InstanceDegraded,
        InstanceRecovered,
    ),
    reactor_names=("queue_deployments",),
    readiness_detail=_readiness,
    settings_type=ProvisionerSettings,
)
