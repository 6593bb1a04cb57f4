"""The health watch: deployed instances that stop serving are noticed, recorded and repaired.

Every ``INSTANCE_HEALTH_CHECK_SECONDS`` one provisioner replica (an advisory lock) asks the
backend about each instance whose deployment succeeded and that no job is changing now:

- unhealthy (not ready, not answering) at two checks in a row, and not yet recorded so:
  ``InstanceDegraded``, ``since`` the first of them;
- healthy again while recorded degraded: ``InstanceRecovered``;
- degraded for longer than ``INSTANCE_UNHEALTHY_REDEPLOY_SECONDS``: a deploy job on the queue,
  requested by ``health-watch`` (the local backend then starts a fresh process). Its success
  ends the episode (the ``instance_health`` read model closes it on ``DeploymentSucceeded``).

The events are decisions taken against the log (``libs/eventlog/decisions.py``): each is appended
only if nothing about the customer reached the log since what the ``instance_health`` read model has
applied, and its id comes from the episode it opens or closes, so replicas and restarts append it
once. A redeploy is decided against the queue itself, under the queue's lock: none while a job of
the customer is waiting or running, and each further one waits twice as long as the one before (up
to ``INSTANCE_REDEPLOY_BACKOFF_MAX_SECONDS``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta

import asyncpg
from opentelemetry import context as otel_context
from opentelemetry.trace import Span

from contracts import Cause, Event, InstanceDegraded, InstanceRecovered
from libs.eventlog.decisions import Decision, append_decisions
from libs.eventlog.store import EventStore
from libs.observability.telemetry import SERVICE_ATTRIBUTE, link_to, tracer
from libs.projections.runner import durable_name
from libs.runtime.scheduling import STUCK_GRACE_SECONDS, run_every
from libs.runtime.supervision import Worker, beat
from services.provisioner.backends.base import Backend, BackendError, InstanceHealth
from services.provisioner.metrics import HealthMetrics
from services.provisioner.queue import enqueue, job_cause, lock_queue
from services.provisioner.queue_rules import DEPLOY, PENDING
from services.provisioner.settings import ProvisionerSettings

log = logging.getLogger(__name__)

TRACER = "iotistic.provisioner"
HEALTH_WATCH = "health-watch"
LOCK_KEY = "provisioner:health-watch"
# The consumer behind the read model the decisions are taken from.
CONSUMERS = (durable_name("provisioner", "instance_health"),)
# Checks in flight at once; each waits at most INSTANCE_HEALTH_TIMEOUT_SECONDS (a host's few
# hundred hung instances are checked within a few timeouts).
CHECKS_AT_ONCE = 32

# Instances whose deployment succeeded and that no job is changing now (or customer $1 alone),
# with their health as the log has it. The customer's queue events must all be on the log
# (none left in the outbox): an InstanceDegraded appended before the DeploymentSucceeded it
# judges would be undone by it.
_WATCHED = """
    SELECT i.customer_id, h.degraded_since, COALESCE(h.episodes, 0) AS episodes,
           h.degraded_cause
    FROM customer_instances i
    LEFT JOIN instance_health h USING (customer_id)
    WHERE i.state = 'running'
      AND ($1::text IS NULL OR i.customer_id = $1)
      AND NOT EXISTS (
          SELECT 1 FROM queue_jobs j
          WHERE j.customer_id = i.customer_id AND j.state IN ('waiting', 'delayed', 'active')
      )
      AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.subject_key = i.customer_id)
    ORDER BY i.customer_id
"""


def degraded_id(customer_id: str, episode: int) -> str:
    """The id of the InstanceDegraded that opens the customer's ``episode``-th episode."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"instance-degraded:{customer_id}:{episode}"))


def recovered_id(customer_id: str, episode: int) -> str:
    """The id of the InstanceRecovered that closes the customer's ``episode``-th episode."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"instance-recovered:{customer_id}:{episode}"))


class HealthWatch:
    """Checks deployed instances through the backend; records and repairs what it finds."""

    def __init__(
        self,
        pool: Callable[[], asyncpg.Pool],
        store: Callable[[], EventStore],
        settings: ProvisionerSettings,
        backend: Backend,
        metrics: HealthMetrics,
        backend_started: asyncio.Event,
        wake_queue: Callable[[], None],
    ) -> None:
        """``backend_started`` is set while the queue worker has the backend started (the
        local backend knows its instances only then); ``wake_queue`` after a redeploy."""
        self._pool = pool
        self._store = store
        self._settings = settings
        self._backend = backend
        self._metrics = metrics
        self._backend_started = backend_started
        self._wake_queue = wake_queue
        # Instances this replica found unhealthy, since when: one failed check alone (an
        # instance still starting, a slow answer) records nothing; the next one does.
        self._failing_since: dict[str, datetime] = {}

    def worker(self) -> Worker:
        """The supervised task: a pass every INSTANCE_HEALTH_CHECK_SECONDS."""
        seconds = self._settings.instance_health_check_seconds
        return Worker(
            name="health watch",
            start=self.run,
            stuck_after=3 * seconds
            + self._settings.instance_health_timeout_seconds
            + STUCK_GRACE_SECONDS,
        )

    async def run(self) -> None:
        """Wait for the backend, then a pass every INSTANCE_HEALTH_CHECK_SECONDS for ever."""
        seconds = self._settings.instance_health_check_seconds
        while not self._backend_started.is_set():
            beat()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._backend_started.wait(), seconds)
        await run_every(seconds, "health watch: events and redeploys", self.check_once)

    async def check_once(self) -> int:
        """One pass; how many events it appended and redeploys it queued."""
        now = datetime.now(UTC)
        async with self._pool().acquire() as conn, conn.transaction():
            # One replica at a time; the others find the lock taken and skip this pass.
            if not await conn.fetchval(
                "SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0))", LOCK_KEY
            ):
                return 0
            watched = await conn.fetch(_WATCHED, None)
            found = await self._check_all([row["customer_id"] for row in watched])
            self._metrics.unhealthy.set(sum(1 for h in found.values() if not h.healthy))
            self._remember_failures(found, {row["customer_id"] for row in watched}, now)
            beat()  # a long pass over many hung instances is progress, not a stuck task
            decisions = [
                decision
                for row in watched
                if row["customer_id"] in found
                and (decision := self._decision(conn, row, found[row["customer_id"]], now))
            ]
            # Each in a trace of its own (``schedule <event>``), until the read model is found
            # behind the log (the rest wait for the next pass).
            appended = await append_decisions(self._store(), decisions, CONSUMERS, "health watch")
        bound = timedelta(seconds=self._settings.instance_unhealthy_redeploy_seconds)
        redeployed = 0
        for row in watched:
            health = found.get(row["customer_id"])
            since = row["degraded_since"]
            # Still unhealthy, and recorded so for longer than the bound: redeploy it.
            if health is not None and not health.healthy and since and now - since >= bound:
                redeployed += await self._redeploy(row["customer_id"], now, _degraded_cause(row))
        return appended + redeployed

    async def _check_all(self, customers: list[str]) -> dict[str, InstanceHealth]:
        """Each instance's health; one the backend cannot tell about now is left out."""
        limit = asyncio.Semaphore(CHECKS_AT_ONCE)

        async def check(customer_id: str) -> tuple[str, InstanceHealth | None]:
            async with limit:
                try:
                    health = await self._backend.health(customer_id)
                except BackendError as exc:
                    log.warning("health watch: %s: cannot tell: %s", customer_id, exc)
                    self._metrics.checks.labels("unknown").inc()
                    return customer_id, None
            self._metrics.checks.labels("healthy" if health.healthy else "unhealthy").inc()
            return customer_id, health

        results = await asyncio.gather(*(check(c) for c in customers))
        return {customer_id: health for customer_id, health in results if health is not None}

    def _remember_failures(
        self, found: dict[str, InstanceHealth], watched: set[str], now: datetime
    ) -> None:
        for customer_id, health in found.items():
            if health.healthy:
                self._failing_since.pop(customer_id, None)
            else:
                self._failing_since.setdefault(customer_id, now)
        for customer_id in set(self._failing_since) - watched:
            del self._failing_since[customer_id]  # a job took it up, or it is gone

    def _decision(
        self, conn: asyncpg.Connection, row: asyncpg.Record, health: InstanceHealth, now: datetime
    ) -> Decision | None:
        """What to append about the instance (InstanceDegraded or InstanceRecovered), if
        anything."""
        customer_id = row["customer_id"]
        degraded = row["degraded_since"] is not None
        if not health.healthy and not degraded:
            since = self._failing_since.get(customer_id, now)
            if since >= now:
                log.info("health watch: instance of %s unhealthy once: %s", customer_id, health)
                return None
            log.warning("health watch: instance of %s unhealthy: %s", customer_id, health.reason)
            return Decision(
                customer_id=customer_id,
                event_id=degraded_id(customer_id, row["episodes"] + 1),
                decide=functools.partial(_still_unrecorded, conn, customer_id, health, since),
            )
        if health.healthy and degraded:
            log.info("health watch: instance of %s healthy again", customer_id)
            return Decision(
                customer_id=customer_id,
                event_id=recovered_id(customer_id, row["episodes"]),
                decide=functools.partial(_still_degraded, conn, customer_id, now),
            )
        return None

    def redeploy_wait(self, recent: int) -> timedelta:
        """How long after the last health-watch redeploy the next may be queued, when
        ``recent`` of them were queued within the backoff window."""
        first = max(
            self._settings.instance_unhealthy_redeploy_seconds,
            self._settings.instance_health_check_seconds,
        )
        cap = self._settings.instance_redeploy_backoff_max_seconds
        return timedelta(seconds=min(cap, first * 2 ** min(recent, 30)))

    async def _redeploy(self, customer_id: str, now: datetime, degraded: Cause) -> int:
        """Queue a deploy of the customer's instance, unless a job of theirs is waiting or
        running, or the last health-watch redeploy was too recent; 1 when queued. The job is
        caused by the ``degraded`` InstanceDegraded and queued in a span of its own (``health
        redeploy``, linked to the InstanceDegraded's), whose trace the deploy continues."""
        window = timedelta(seconds=self._settings.instance_redeploy_backoff_max_seconds)
        async with self._pool().acquire() as conn, conn.transaction():
            await lock_queue(conn)
            if await conn.fetchval(
                "SELECT 1 FROM queue_jobs WHERE customer_id = $1 AND state = ANY($2)",
                customer_id,
                [*PENDING, "active"],
            ):
                return 0
            license_row = await conn.fetchrow(
                "SELECT license_id, plan, closed FROM customer_licenses WHERE customer_id = $1",
                customer_id,
            )
            if license_row is None or license_row["closed"] or license_row["license_id"] is None:
                return 0
            earlier = await conn.fetchrow(
                "SELECT count(*) AS recent, max(created_at) AS last FROM queue_jobs "
                "WHERE customer_id = $1 AND data->>'requested_by' = $2 AND created_at > $3",
                customer_id,
                HEALTH_WATCH,
                now - window,
            )
            if earlier["last"] is not None and now - earlier["last"] < self.redeploy_wait(
                earlier["recent"]
            ):
                return 0
            with _decision_span("redeploy", customer_id, degraded):
                job_id = await enqueue(
                    conn,
                    customer_id=customer_id,
                    kind=DEPLOY,
                    plan=license_row["plan"],
                    license_id=license_row["license_id"],
                    requested_by=HEALTH_WATCH,
                    at=now,
                    max_attempts=self._settings.queue_max_retries,
                    causation=degraded,
                )
        log.warning("health watch: instance of %s redeployed (job %s)", customer_id, job_id)
        self._metrics.redeploys.inc()
        self._wake_queue()
        return 1


def _decision_span(
    what: str, customer_id: str, cause: Cause | None = None
) -> AbstractContextManager[Span]:
    """A root span for one decision about one instance, linked to the trace of ``cause``."""
    return tracer(TRACER).start_as_current_span(
        f"health {what}",
        context=otel_context.Context(),
        links=link_to(cause),
        attributes={SERVICE_ATTRIBUTE: "provisioner", "iotistic.customer_id": customer_id},
    )


def _degraded_cause(row: asyncpg.Record) -> Cause:
    """The InstanceDegraded that opened the instance's current episode. Recorded before the
    read model kept it, it is known by its id alone: appended with no cause, it is its own
    correlation."""
    cause = job_cause(row["degraded_cause"])
    if cause is None:
        event_id = degraded_id(row["customer_id"], row["episodes"])
        cause = Cause(event_id=event_id, correlation_id=event_id)
    return cause


async def _still_unrecorded(
    conn: asyncpg.Connection, customer_id: str, health: InstanceHealth, now: datetime
) -> Event | None:
    row = await conn.fetchrow(_WATCHED, customer_id)
    if row is None or row["degraded_since"] is not None:
        return None  # a job took it up, or the log says it is degraded already
    return InstanceDegraded(customer_id=customer_id, reason=health.reason[:500], since=now)


async def _still_degraded(
    conn: asyncpg.Connection, customer_id: str, now: datetime
) -> Event | None:
    row = await conn.fetchrow(_WATCHED, customer_id)
    if row is None or row["degraded_since"] is None:
        return None
    return InstanceRecovered(
        customer_id=customer_id, degraded_since=row["degraded_since"], recovered_at=now
    )
