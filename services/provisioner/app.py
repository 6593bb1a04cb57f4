"""Wiring of the provisioner: the deployment queue, its workers and the instance backends."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any
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
from libs.outbox import OutboxRelay, outbox_relay, outbox_worker
from libs.projections import Projection
from libs.runtime import ServiceDefinition, ServiceRuntime
from libs.supervision import Worker
from services.provisioner.backends.base import Backend
from services.provisioner.backends.k8s_manifests import KubernetesSettings
from services.provisioner.capacity import CapacityWatch
from services.provisioner.health import HealthWatch
from services.provisioner.metrics import HealthMetrics, QueueMetrics
from services.provisioner.projections import CAPACITY_RECORDED, DEPLOYMENTS, INSTANCE_HEALTH
from services.provisioner.reactors import provisioner_reactors
from services.provisioner.settings import ProvisionerSettings, parse_cidrs, parse_ports
from services.provisioner.worker import QueueWorker

METRICS_REFRESH_SECONDS = 5.0


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
            from services.provisioner.backends.k8s import KubernetesBackend, cluster_client

            check_reachable_from_pods(settings)
            return KubernetesBackend(
                kubernetes_settings(settings),
                (settings.provisioner_secret or "").encode(),
                cluster_client,
                ready_timeout=settings.kubernetes_ready_timeout_seconds,
                login_relay_secret=settings.login_relay_secret,
                max_instances=settings.max_instances,
                usage_secret=settings.usage_secret,
            )
        from services.provisioner.backends.local import LocalBackend

        return LocalBackend(settings, runtime.db)

    return runtime.shared("backend", make)


def kubernetes_settings(settings: ProvisionerSettings) -> KubernetesSettings:
    """What the rendered Kubernetes objects depend on, from the provisioner's settings."""
    return KubernetesSettings(
        base_domain=settings.base_domain,
        instance_image=settings.instance_image,
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
