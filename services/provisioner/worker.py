"""The queue's workers: claim the most urgent job, run it on the backend, record how it went.

Each provisioner replica runs one ``QueueWorker``; the concurrency limit is global (claims
count live leases across replicas). A running job's lease is extended while it runs; a worker
that loses its lease (paused for longer than the lease, say) stops the job without recording
anything, since another worker owns it now.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import asyncpg

from libs.outbox import OutboxRelay
from libs.scheduling import PASSING
from services.provisioner.backends.base import Backend, BackendError, InstanceSpec
from services.provisioner.metrics import QueueMetrics
from services.provisioner.queue import (
    DELETE,
    UPDATE,
    Claimed,
    claim_next_job,
    complete_job,
    extend_lease,
    fail_job,
    record_progress,
    release_job,
)
from services.provisioner.settings import ProvisionerSettings

log = logging.getLogger(__name__)
T = TypeVar("T")


def _now() -> datetime:
    return datetime.now(UTC)


class QueueWorker:
    """Runs up to ``queue_concurrency`` jobs at once from this replica."""

    def __init__(
        self,
        pool: Callable[[], asyncpg.Pool],
        settings: ProvisionerSettings,
        backend: Backend,
        relay: OutboxRelay,
        metrics: QueueMetrics,
    ) -> None:
        """``pool`` is the provisioner's; ``relay`` is woken after each recorded change."""
        self._pool = pool
        self._settings = settings
        self._backend = backend
        self._relay = relay
        self._metrics = metrics
        self.worker_id = f"worker-{uuid.uuid4().hex[:12]}"
        self._running: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()

    @property
    def _lease(self) -> timedelta:
        return timedelta(seconds=self._settings.queue_lease_seconds)

    def wake(self) -> None:
        """Look for a job now rather than at the next poll."""
        self._wake.set()

    async def run(self) -> None:
        """Claim and run jobs for ever; on cancel, give running jobs back and stop the backend."""
        await self._backend.start()
        try:
            while True:
                self._wake.clear()
                await self._fill_slots()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._settings.queue_poll_seconds)
        finally:
            for task in self._running:
                task.cancel()
            await asyncio.gather(*self._running, return_exceptions=True)
            await self._backend.stop()

    async def _fill_slots(self) -> None:
        while len(self._running) < self._settings.queue_concurrency:
            try:
                async with self._pool().acquire() as conn, conn.transaction():
                    job = await claim_next_job(
                        conn,
                        worker_id=self.worker_id,
                        backend=self._backend.name,
                        now=_now(),
                        concurrency=self._settings.queue_concurrency,
                        lease=self._lease,
                    )
            except PASSING as exc:
                log.warning("queue: cannot claim jobs now: %r", exc)
                return
            if job is None:
                return
            self._relay.wake()
            task = asyncio.create_task(self._run_job(job), name=f"job {job.job_id}")
            self._running.add(task)
            task.add_done_callback(self._job_done)

    def _job_done(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._wake.set()  # a slot is free

    async def _run_job(self, job: Claimed) -> None:
        log.info("job %s (%s) attempt %d started", job.job_id, job.kind, job.attempt)
        started = time.monotonic()
        lost = asyncio.Event()
        work = asyncio.create_task(self._attempt(job))
        keeper = asyncio.create_task(self._keep_lease(job, work, lost))
        outcome = "failed"
        try:
            deployed = await work
        except asyncio.CancelledError:
            if lost.is_set():
                log.warning("job %s: lease lost; another worker has it", job.job_id)
                return
            # This worker is shutting down: give the job back at once for another to take.
            with contextlib.suppress(*PASSING):
                await self._transact(lambda c: release_job(c, job, self.worker_id, _now()))
            raise
        except BackendError as exc:
            await self._record_failure(job, str(exc))
        except Exception as exc:
            log.exception("job %s: unexpected error", job.job_id)
            await self._record_failure(job, f"internal error: {type(exc).__name__}")
        else:
            outcome = "completed"
            await self._transact(
                lambda conn: complete_job(
                    conn,
                    job,
                    self.worker_id,
                    _now(),
                    backend=self._backend.name,
                    instance_url=deployed[0],
                    components=deployed[1],
                )
            )
            log.info("job %s completed", job.job_id)
        finally:
            keeper.cancel()
        self._metrics.durations.labels(job.kind, outcome).observe(time.monotonic() - started)

    async def _attempt(self, job: Claimed) -> tuple[str | None, dict[str, str]]:
        async def progress(percent: int, step: str) -> None:
            await self._transact(
                lambda conn: record_progress(conn, job, self.worker_id, percent, step)
            )

        if job.kind == DELETE:
            await self._backend.delete(job.customer_id, progress)
            return None, {"instance": "removed"}
        spec = await self._spec(job.customer_id)
        if job.kind == UPDATE:
            deployed = await self._backend.update(spec, progress)
        else:
            deployed = await self._backend.deploy(spec, progress)
        return deployed.instance_url, deployed.components

    async def _spec(self, customer_id: str) -> InstanceSpec:
        async with self._pool().acquire() as conn:
            row = await conn.fetchrow(
                "SELECT * FROM customer_licenses WHERE customer_id = $1", customer_id
            )
        if row is None:
            raise BackendError("no license has been issued to this customer yet")
        if row["closed"]:
            raise BackendError("the customer's account is closed")
        return InstanceSpec(
            customer_id=customer_id,
            plan=row["plan"],
            license_jwt=row["jwt"],
            license_id=row["license_id"],
            jwks_url=self._settings.license_jwks_url,
            max_devices=row["max_devices"],
        )

    async def _keep_lease(
        self,
        job: Claimed,
        work: asyncio.Task[tuple[str | None, dict[str, str]]],
        lost: asyncio.Event,
    ) -> None:
        every = self._settings.queue_lease_seconds / 3
        while True:
            await asyncio.sleep(every)
            try:
                mine = await self._transact(
                    lambda conn: extend_lease(conn, job, self.worker_id, _now() + self._lease)
                )
            except PASSING as exc:
                log.warning("job %s: could not extend its lease: %r", job.job_id, exc)
                continue
            if not mine:
                lost.set()
                work.cancel()
                return

    async def _record_failure(self, job: Claimed, error: str) -> None:
        log.warning("job %s attempt %d failed: %s", job.job_id, job.attempt, error)
        delay = timedelta(milliseconds=self._settings.queue_retry_delay)
        await self._transact(lambda conn: fail_job(conn, job, self.worker_id, _now(), error, delay))

    async def _transact(self, step: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        async with self._pool().acquire() as conn, conn.transaction():
            result = await step(conn)
        self._relay.wake()
        return result
