"""The queue's workers: claim the most urgent job, run it on the backend, record how it went.

Each provisioner replica runs one ``QueueWorker``; the concurrency limit is global (claims
count live leases across replicas). A running job's lease is extended while it runs. The worker
also keeps its own deadline on the monotonic clock (the last extension that went through, plus
the lease, less a margin): when the deadline passes with no extension getting through, or the
queue says the job is no longer this worker's, the job is stopped without recording anything,
since another worker may own it now. The outcome of a finished attempt is written again after
a failure for as long as the lease holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from functools import partial
from typing import TypeVar

import asyncpg
from opentelemetry.trace import Span

from libs.runtime.outbox import OutboxRelay
from libs.runtime.scheduling import PASSING
from services.provisioner.backends.base import Backend, BackendError, InstanceSpec, Progress
from services.provisioner.health import HEALTH_WATCH
from services.provisioner.job_spans import JobSteps, fail, job_span
from services.provisioner.leases import (
    Claimed,
    claim_next_job,
    complete_job,
    extend_lease,
    fail_job,
    record_progress,
    release_job,
)
from services.provisioner.metrics import QueueMetrics
from services.provisioner.queue_rules import DELETE, UPDATE
from services.provisioner.settings import ProvisionerSettings

log = logging.getLogger(__name__)
T = TypeVar("T")

# The share of the lease kept in hand: the work stops this long before the lease would run out.
LEASE_MARGIN = 0.2
# The longest wait between attempts at something that keeps failing (a claim, an outcome).
RETRY_CAP_SECONDS = 10.0
OutcomeWrite = Callable[[asyncpg.Connection], Awaitable[bool]]


def _longer(delay: float) -> float:
    return min(delay * 2, RETRY_CAP_SECONDS)


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class QueueWorker:
    """Runs up to ``queue_concurrency`` jobs at once from this replica."""

    def __init__(
        self,
        pool: Callable[[], asyncpg.Pool],
        settings: ProvisionerSettings,
        backend: Backend,
        relay: OutboxRelay,
        metrics: QueueMetrics,
        capacity: Callable[[], Awaitable[int | None]] | None = None,
        after_job: Callable[[], None] | None = None,
    ) -> None:
        """``pool`` is the provisioner's; ``relay`` is woken after each recorded change;
        ``capacity`` says how many instances may run (None, or no ``capacity``: no limit);
        ``after_job`` is called when a job ends (an instance may have started or gone)."""
        self._pool = pool
        self._capacity = capacity
        self._after_job = after_job
        self._settings = settings
        self._backend = backend
        self._relay = relay
        self._metrics = metrics
        self.worker_id = f"worker-{uuid.uuid4().hex[:12]}"
        self._running: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        # Set while the backend is started (the health watch waits for it).
        self.backend_started = asyncio.Event()

    @property
    def _lease(self) -> timedelta:
        return timedelta(seconds=self._settings.queue_lease_seconds)

    def wake(self) -> None:
        """Look for a job now rather than at the next poll."""
        self._wake.set()

    async def run(self) -> None:
        """Claim and run jobs for ever; on cancel, give running jobs back and stop the backend.

        Failures pass: starting the backend and claiming are tried again with a growing wait.
        """
        try:
            await self._start_backend()
            delay = self._settings.queue_poll_seconds
            while True:
                self._wake.clear()
                try:
                    await self._fill_slots()
                except Exception:
                    log.exception("queue: claiming jobs failed; trying again in %.1fs", delay)
                    await asyncio.sleep(delay)
                    delay = _longer(delay)
                    continue
                delay = self._settings.queue_poll_seconds
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._settings.queue_poll_seconds)
        finally:
            for task in self._running:
                task.cancel()
            await asyncio.gather(*self._running, return_exceptions=True)
            self.backend_started.clear()
            await self._backend.stop()

    async def _start_backend(self) -> None:
        delay = self._settings.queue_poll_seconds
        while True:
            try:
                await self._backend.start()
                self.backend_started.set()
                return
            except Exception:
                log.exception(
                    "queue: starting the %s backend failed; trying again in %.1fs",
                    self._backend.name,
                    delay,
                )
            await asyncio.sleep(delay)
            delay = _longer(delay)

    async def _fill_slots(self) -> None:
        while len(self._running) < self._settings.queue_concurrency:
            capacity = await self._capacity() if self._capacity is not None else None
            # Taken before the claim: the lease Postgres grants runs from a later moment.
            asked = time.monotonic()
            try:
                async with self._pool().acquire() as conn, conn.transaction():
                    job = await claim_next_job(
                        conn,
                        worker_id=self.worker_id,
                        backend=self._backend.name,
                        concurrency=self._settings.queue_concurrency,
                        lease=self._lease,
                        capacity=capacity,
                    )
            except PASSING as exc:
                log.warning("queue: cannot claim jobs now: %r", exc)
                return
            if job is None:
                # Jobs it noted waiting for capacity reach the log at the relay's next poll.
                return
            self._relay.wake()
            task = asyncio.create_task(self._run_job(job, asked), name=f"job {job.job_id}")
            self._running.add(task)
            task.add_done_callback(self._job_done)

    def _job_done(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._wake.set()  # a slot is free
        if self._after_job is not None:
            self._after_job()
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: stopped by an error", task.get_name(), exc_info=task.exception())

    async def _run_job(self, job: Claimed, asked: float) -> None:
        log.info("job %s (%s) attempt %d started", job.job_id, job.kind, job.attempt)
        started = time.monotonic()
        with job_span(job, self._backend.name) as span:
            outcome = await self._run_attempt(job, asked, span)
            span.set_attribute("iotistic.outcome", outcome)
        if outcome in ("completed", "failed"):
            self._metrics.durations.labels(job.kind, outcome).observe(time.monotonic() - started)

    async def _run_attempt(self, job: Claimed, asked: float, span: Span) -> str:
        """Run the attempt and record how it went; its outcome (``lease lost`` when it was
        stopped, or its outcome not recorded, because the job is no longer this worker's)."""
        lost = asyncio.Event()
        # Started in the job's span: the attempt's steps are its children.
        work = asyncio.create_task(self._attempt(job), name=f"job {job.job_id} work")
        keeper = asyncio.create_task(self._keep_lease(job, asked), name=f"job {job.job_id} lease")
        keeper.add_done_callback(partial(self._lease_ended, job, work, lost))
        try:
            try:
                deployed = await work
            except asyncio.CancelledError:
                if not lost.is_set():
                    # This worker is shutting down: give the job back at once for another to
                    # take, without counting the attempt.
                    span.set_attribute("iotistic.outcome", "released")
                    with contextlib.suppress(*PASSING):
                        await self._transact(lambda c: release_job(c, job, self.worker_id))
                    raise
                log.warning("job %s: lease lost; stopped without recording it", job.job_id)
                fail(span, "lease lost")
                if _being_cancelled():
                    raise
                return "lease lost"
            except BackendError as exc:
                outcome, write = "failed", self._failure(job, str(exc))
                fail(span, str(exc), exc)
            except Exception as exc:
                log.exception("job %s: unexpected error", job.job_id)
                error = f"internal error: {type(exc).__name__}"
                outcome, write = "failed", self._failure(job, error)
                fail(span, error, exc)
            else:
                outcome = "completed"
                write = partial(
                    complete_job,
                    job=job,
                    worker_id=self.worker_id,
                    backend=self._backend.name,
                    instance_url=deployed[0],
                    components=deployed[1],
                )
            if not await self._record_outcome(job, write, lost):
                log.warning("job %s: lease lost before its outcome was recorded", job.job_id)
                fail(span, "lease lost before the outcome was recorded")
                return "lease lost"
            log.info("job %s %s", job.job_id, outcome)
            return outcome
        finally:
            keeper.cancel()

    async def _attempt(self, job: Claimed) -> tuple[str | None, dict[str, str]]:
        steps = JobSteps()

        async def progress(percent: int, step: str) -> None:
            steps.enter(step)
            await self._transact(
                lambda conn: record_progress(conn, job, self.worker_id, percent, step)
            )

        try:
            return await self._apply(job, progress)
        except BackendError as exc:
            steps.fail(str(exc))
            raise
        except Exception as exc:
            steps.fail(f"internal error: {type(exc).__name__}")
            raise
        finally:
            # Also when the attempt is cancelled (lease lost, shutdown).
            steps.close()

    async def _apply(self, job: Claimed, progress: Progress) -> tuple[str | None, dict[str, str]]:
        if job.kind == DELETE:
            erase = bool(job.data.get("erase"))
            await self._backend.delete(job.customer_id, progress, erase=erase)
            return None, {"instance": "removed"}
        spec = await self._spec(job.customer_id)
        if job.data.get("requested_by") == HEALTH_WATCH:
            # A redeploy of a broken instance: replace what runs rather than wait on it.
            spec = dataclasses.replace(spec, restart_key=job.job_id)
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

    async def _keep_lease(self, job: Claimed, asked: float) -> None:
        """Extend the lease until cancelled; return once it is lost or about to run out."""
        lease = self._settings.queue_lease_seconds
        every = lease / 3
        deadline = asked + lease * (1 - LEASE_MARGIN)
        wait = every
        while True:
            await asyncio.sleep(max(0.0, min(wait, deadline - time.monotonic())))
            asked = time.monotonic()
            if asked >= deadline:
                log.warning("job %s: its lease could not be extended in time", job.job_id)
                return
            try:
                async with asyncio.timeout(deadline - asked):
                    mine = await self._transact(
                        lambda conn: extend_lease(conn, job, self.worker_id, self._lease)
                    )
            except PASSING as exc:
                log.warning("job %s: could not extend its lease: %r", job.job_id, exc)
                wait = every / 3
                continue
            if not mine:
                log.warning("job %s: the queue gave it to another worker", job.job_id)
                return
            deadline = asked + lease * (1 - LEASE_MARGIN)
            wait = every

    def _lease_ended(
        self,
        job: Claimed,
        work: asyncio.Task[tuple[str | None, dict[str, str]]],
        lost: asyncio.Event,
        keeper: asyncio.Task[None],
    ) -> None:
        # Cancelled: the job ended and let go of its lease. Anything else, the keeper gave up
        # or died: the lease cannot be counted on, so the work stops.
        if keeper.cancelled():
            return
        if keeper.exception() is not None:
            log.error("job %s: the lease keeper failed", job.job_id, exc_info=keeper.exception())
        lost.set()
        work.cancel()

    def _failure(self, job: Claimed, error: str) -> OutcomeWrite:
        log.warning("job %s attempt %d failed: %s", job.job_id, job.attempt, error)
        delay = timedelta(milliseconds=self._settings.queue_retry_delay)
        return partial(fail_job, job=job, worker_id=self.worker_id, error=error, retry_delay=delay)

    async def _record_outcome(self, job: Claimed, write: OutcomeWrite, lost: asyncio.Event) -> bool:
        """Write the attempt's outcome, again after failures that pass, while the lease holds;
        False when the job is not (or no longer) this worker's."""
        delay = 0.1
        while not lost.is_set():
            try:
                return await self._transact(write)
            except PASSING as exc:
                log.warning(
                    "job %s: recording its outcome failed: %r; again in %.1fs",
                    job.job_id,
                    exc,
                    delay,
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lost.wait(), delay)
            delay = _longer(delay)
        return False

    async def _transact(self, step: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        async with self._pool().acquire() as conn, conn.transaction():
            result = await step(conn)
        self._relay.wake()
        return result
