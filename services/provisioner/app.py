"""Wiring of the provisioner: the deployment queue, its workers and the instance backends."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

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
from libs.outbox import OutboxRelay, outbox_relay, outbox_worker
from libs.projections import Projection
from libs.runtime import ServiceDefinition, ServiceRuntime
from libs.scheduling import every
from libs.supervision import Worker
from services.provisioner.backends.base import Backend, BackendError
from services.provisioner.backends.k8s_manifests import KubernetesSettings
from services.provisioner.backends.k8s_storage import StoragePolicy
from services.provisioner.capacity import CapacityWatch
from services.provisioner.health import HealthWatch
from services.provisioner.metrics import HealthMetrics, QueueMetrics
from services.provisioner.projections import CAPACITY_RECORDED, DEPLOYMENTS, INSTANCE_HEALTH
from services.provisioner.reactors import provisioner_reactors
from services.provisioner.settings import ProvisionerSettings, parse_backups_kept, parse_cidrs
from services.provisioner.worker import QueueWorker

METRICS_REFRESH_SECONDS = 5.0
# How often deleted customers' namespaces are checked for the end of their grace period.
PURGE_SECONDS = 3600.0
log = logging.getLogger(__name__)


def settings_of(runtime: ServiceRuntime) -> ProvisionerSettings:
    """The provisioner's settings."""
    return runtime.settings_as(ProvisionerSettings)


def backend_of(runtime: ServiceRuntime) -> Backend:
    """The backend this provisioner runs instances with (one per process)."""

    def make() -> Backend:
        settings = settings_of(runtime)
        if settings.provisioner_backend == "kubernetes":
            from services.provisioner.backends.k8s import KubernetesBackend, cluster_client

            return KubernetesBackend(
                kubernetes_settings(settings),
                (settings.provisioner_secret or "").encode(),
                cluster_client,
                ready_timeout=settings.kubernetes_ready_timeout_seconds,
                login_relay_secret=settings.login_relay_secret,
                max_instances=settings.max_instances,
            )
        from services.provisioner.backends.local import LocalBackend

        return LocalBackend(settings, runtime.db)

    return runtime.shared("backend", make)


def kubernetes_settings(settings: ProvisionerSettings) -> KubernetesSettings:
    """What the rendered Kubernetes objects depend on, from the provisioner's settings."""
    return KubernetesSettings(
        base_domain=settings.base_domain,
        instance_image=settings.instance_image,
        cluster_issuer=settings.cluster_issuer,
        ingress_class=settings.ingress_class,
        storage_class=settings.storage_class,
        cluster_cidrs=parse_cidrs(settings.kubernetes_cluster_cidrs, "KUBERNETES_CLUSTER_CIDRS"),
        alert_webhook_allowed_cidrs=",".join(
            parse_cidrs(settings.alert_webhook_allowed_cidrs, "ALERT_WEBHOOK_ALLOWED_CIDRS")
        ),
        storage=StoragePolicy(
            bytes_per_reading=settings.storage_bytes_per_reading,
            headroom=settings.storage_headroom,
            min_data_gib=settings.storage_min_data_gib,
            dump_ratio=settings.backup_dump_ratio,
            backups_kept=parse_backups_kept(settings.backups_kept),
        ),
        backup_schedule=settings.backup_schedule,
        deletion_grace_days=settings.deletion_grace_days,
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
        worker_of(runtime).wake()
        relay_of(runtime).wake()

    return provisioner_reactors(settings_of(runtime).queue_max_retries, wake)


def _workers(runtime: ServiceRuntime) -> list[Worker]:
    return [
        Worker("queue worker", worker_of(runtime).run),
        outbox_worker(runtime),
        Worker(
            "queue metrics",
            lambda: metrics_of(runtime).refresh_every(runtime.db, METRICS_REFRESH_SECONDS),
        ),
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


def _readiness(runtime: ServiceRuntime) -> Mapping[str, Any]:
    # Full is not unhealthy: shown, never a reason for 503.
    return {"capacity": capacity_of(runtime).readiness()}


def _routes(runtime: ServiceRuntime) -> Sequence[ControllerRouterHandler]:
    from services.provisioner.routes import provisioner_routes

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
