"""A fleet rollout's gate: a batch's jobs waited for, then its tenants held to what the batch
wanted. A tenant passes when its job (or the one that superseded it) succeeded, the stamp the job
left is the digest the rollout wants for it now, and it is healthy, again after ``settle``
seconds; one that fails after its job stamped it has the stamp removed, so a rerun applies it
again. ``rollout.py`` runs the batches and says what each tenant should have.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import asyncpg

from services.provisioner.backends.base import BackendError, InstanceHealth, InstanceSpec


class ManifestBackend(Protocol):
    """What a rollout needs of a backend: the kubernetes backend has it."""

    name: str

    def manifest_digest(self, spec: InstanceSpec) -> str:
        """The digest of the objects the customer would be applied with now."""

    async def applied_manifest(self, customer_id: str) -> str | None:
        """The digest stamped when the customer's objects were last applied and ready."""

    async def clear_manifest_stamp(self, customer_id: str) -> None:
        """Forget the stamp, so the next rollout applies the customer again."""

    async def health(self, customer_id: str) -> InstanceHealth:
        """Whether the customer's instance serves now."""


@dataclass(frozen=True)
class Failure:
    """A tenant the rollout could not bring to the new manifest set, and why."""

    customer_id: str
    reason: str
    job_id: str | None = None


class BatchGate:
    """Waits for a batch's jobs and holds its tenants to the gate."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        backend: ManifestBackend,
        wanted: Callable[[str], Awaitable[str | None]],
        *,
        timeout: float,
        settle_seconds: float,
        poll_seconds: float,
    ) -> None:
        """``wanted``: the digest the rollout wants for a tenant now, None once it is no longer
        deployed (closed since); ``timeout`` is a batch's in all, for the messages."""
        self._pool = pool
        self._backend = backend
        self._wanted = wanted
        self._timeout = timeout
        self._settle = settle_seconds
        self._poll = poll_seconds

    async def job_outcome(self, customer_id: str, job_id: str, deadline: float) -> Failure | None:
        """Wait for the job (or the one that superseded it) to finish; None if it succeeded
        and left the stamp this rollout wanted."""
        loop = asyncio.get_running_loop()
        while True:
            async with self._pool.acquire() as conn:
                row = await conn.fetchrow(
                    "SELECT state, failed_reason, superseded_by FROM queue_jobs WHERE job_id = $1",
                    job_id,
                )
                paused = await conn.fetchval("SELECT paused FROM queue_control")
            if row is None:
                return Failure(customer_id, "its job was removed from the queue", job_id)
            if row["state"] == "superseded" and row["superseded_by"]:
                job_id = row["superseded_by"]  # a later license: its job applies everything
                continue
            if row["state"] == "failed":
                return Failure(customer_id, f"job failed: {row['failed_reason']}", job_id)
            if row["state"] == "completed":
                return await self._check_stamp(customer_id, job_id)
            if loop.time() > deadline:
                why = (
                    "the queue is paused"
                    if paused
                    else f"its job is still {row['state']} (is a provisioner worker running?)"
                )
                return Failure(customer_id, f"no outcome after {self._timeout:.0f}s: {why}", job_id)
            await asyncio.sleep(self._poll)

    async def _check_stamp(self, customer_id: str, job_id: str) -> Failure | None:
        # From the license now: one issued meanwhile is in what the job applied.
        wanted = await self._wanted(customer_id)
        if wanted is None:
            return None  # closed since; its delete follows
        try:
            applied = await self._backend.applied_manifest(customer_id)
        except BackendError as exc:
            return Failure(customer_id, f"its stamp cannot be read: {exc}", job_id)
        if applied != wanted:
            return Failure(
                customer_id,
                f"the provisioner applied manifest set {str(applied)[:12]}, not the "
                f"{wanted[:12]} this rollout renders: run the rollout with the provisioner's own "
                "settings (INSTANCE_IMAGE, secrets), after its workers restarted with them",
                job_id,
            )
        return None

    async def gate(self, customers: list[str], deadline: float) -> list[Failure]:
        """Every tenant healthy before the deadline, and again ``settle`` seconds later."""
        if not customers:
            return []
        waiting = await self._until_healthy(customers, deadline)
        failures = [Failure(cid, f"not healthy: {why}") for cid, why in waiting.items()]
        ready = [cid for cid in customers if cid not in waiting]
        if ready and self._settle > 0:
            await asyncio.sleep(self._settle)
            found = await self._healths(ready)
            failures += [
                Failure(cid, f"healthy after its update, then not: {why}")
                for cid, why in found.items()
                if why is not None
            ]
        for failure in failures:
            # Stamped by its job, yet it does not serve: the next rollout must not skip it.
            with contextlib.suppress(BackendError):
                await self._backend.clear_manifest_stamp(failure.customer_id)
        return failures

    async def _until_healthy(self, customers: list[str], deadline: float) -> dict[str, str]:
        """Poll until all are healthy or the deadline passes; those still not, and why."""
        loop = asyncio.get_running_loop()
        waiting = dict.fromkeys(customers, "not checked")
        while True:
            found = await self._healths(list(waiting))
            waiting = {cid: why for cid, why in found.items() if why is not None}
            if not waiting or loop.time() > deadline:
                return waiting
            await asyncio.sleep(self._poll)

    async def _healths(self, customers: list[str]) -> dict[str, str | None]:
        """Each tenant's trouble, None when healthy."""

        async def one(customer_id: str) -> str | None:
            try:
                health = await self._backend.health(customer_id)
            except BackendError as exc:
                return f"cannot tell: {exc}"
            return None if health.healthy else health.reason

        results = await asyncio.gather(*(one(cid) for cid in customers))
        return dict(zip(customers, results, strict=True))
