"""The provisioner's Prometheus metrics: the queue's jobs by state, workers, how long jobs
take, and capacity; the health watch's unhealthy instances and redeploys."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable

import asyncpg
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from libs.runtime.scheduling import PASSING
from services.provisioner.queue import queue_stats
from services.provisioner.queue_rules import DELETE, DEPLOY, STATES, UPDATE

log = logging.getLogger(__name__)


class QueueMetrics:
    """``deployment_queue_<state>`` gauges, ``deployment_queue_workers``, job durations, and
    instances running against the capacity."""

    def __init__(self, registry: CollectorRegistry) -> None:
        """Registers the metrics in ``registry``."""
        self.by_state = {
            state: Gauge(
                f"deployment_queue_{state}",
                f"Deployment jobs {state} (across every provisioner replica)",
                registry=registry,
            )
            for state in STATES
        }
        self.workers = Gauge(
            "deployment_queue_workers",
            "Queue workers running in this process (0 while the queue is paused)",
            registry=registry,
        )
        self.durations = Histogram(
            "deployment_job_duration_seconds",
            "Time from claiming a deployment job to the end of its attempt",
            ["kind", "outcome"],
            buckets=(0.5, 1, 2, 3, 5, 10, 30, 60, 120, 300, 600),
            registry=registry,
        )
        # Every kind and outcome exists at 0 from the start: a failure rate is 0 (not absent)
        # while nothing failed, and increase() counts a process's first deployment.
        for kind in (DEPLOY, UPDATE, DELETE):
            for outcome in ("completed", "failed"):
                self.durations.labels(kind, outcome)
        self.instances_running = Gauge(
            "iotistic_instances_running",
            "Customer instances running or being started",
            registry=registry,
        )
        self.instances_capacity = Gauge(
            "iotistic_instances_capacity",
            "Customer instances the platform can hold (+Inf: no limit)",
            registry=registry,
        )
        self.waiting_for_capacity = Gauge(
            "iotistic_deployments_waiting_for_capacity",
            "Deployment jobs waiting for room for another instance",
            registry=registry,
        )

    def show_capacity(self, running: int, capacity: int | None, waiting: int) -> None:
        """Set the capacity gauges."""
        self.instances_running.set(running)
        self.instances_capacity.set(math.inf if capacity is None else capacity)
        self.waiting_for_capacity.set(waiting)

    async def refresh(self, pool: asyncpg.Pool) -> None:
        """Read the queue's counts into the gauges."""
        async with pool.acquire() as conn:
            counts = await queue_stats(conn)
            paused = await conn.fetchval("SELECT paused FROM queue_control")
        for state, gauge in self.by_state.items():
            gauge.set(counts[state])
        self.workers.set(0 if paused else 1)

    async def refresh_every(self, pool: Callable[[], asyncpg.Pool], seconds: float) -> None:
        """Keep the gauges current; while Postgres is away they keep their last values."""
        while True:
            try:
                await self.refresh(pool())
            except PASSING as exc:
                log.warning("queue metrics: %r", exc)
            await asyncio.sleep(seconds)


class HealthMetrics:
    """``instances_unhealthy``, ``instance_health_checks_total`` and
    ``instance_health_redeploys_total``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        """Registers the metrics in ``registry``."""
        self.unhealthy = Gauge(
            "instances_unhealthy",
            "Deployed instances the health watch found unhealthy at its last pass",
            registry=registry,
        )
        self.checks = Counter(
            "instance_health_checks",
            "Health checks of deployed instances, by outcome (healthy, unhealthy, unknown)",
            ["outcome"],
            registry=registry,
        )
        self.redeploys = Counter(
            "instance_health_redeploys",
            "Redeploys the health watch queued for instances unhealthy for too long",
            registry=registry,
        )
