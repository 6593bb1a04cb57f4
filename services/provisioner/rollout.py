"""Fleet rollout: every deployed customer's instance brought to the manifest set the
provisioner renders now (a new ``INSTANCE_IMAGE``, new objects), in batches with health gates.

Why through the queue rather than applying here: each tenant gets an ``update`` job, enqueued the
way the reactors and the admin routes enqueue one (``queue.enqueue``: the job row and its
``DeploymentRequested`` in one transaction, the outbox carrying it to the log). So the worker
that runs it holds the customer's turn (one job at a time per customer, leases, retries with
backoff), the admin page shows it, the log records who asked (``requested_by`` ``rollout:<id>``)
and how it went, and a license event that arrives meanwhile collapses with it instead of racing
it. The rollout itself decides nothing the log must know beyond those jobs.

Which tenants: those whose last finished job left an instance running on this backend
(``customer_instances``) and whose account is open (``customer_licenses``), trials first and
enterprise last (the least at stake goes first), the first batch a canary. Each is checked
again under the queue's lock when its job is enqueued: one that closed meanwhile is left alone.

Resumable: a deploy or update stamps the namespace with the digest of the objects it applied,
once they are ready (``KubernetesBackend.stamp_manifest``). A tenant whose stamp equals what
would be rendered now is done and skipped (``--force`` applies anyway), so a rollout stopped
halfway and run again carries on where it stopped, and a license update that already brought a
tenant to the new objects counts too.

A batch passes its gate when every job of it succeeded, the stamp its job left is the digest
this rollout wanted (else the worker renders something else: another INSTANCE_IMAGE or version),
and every tenant of it is healthy (``backend.health``), again after ``settle`` seconds. A tenant
that fails the gate after its job had it stamped has the stamp removed, so a rerun applies it
again. More than ``max_failures`` failed tenants stop the rollout: the later batches are not
touched, and the report names each failed tenant and why. The gate is ``rollout_gate.py``.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import asyncpg
from kubernetes_asyncio import client as k8s

from services.provisioner.backends.base import InstanceSpec
from services.provisioner.backends.kubernetes.api import cluster_client
from services.provisioner.backends.kubernetes.backend import KubernetesBackend
from services.provisioner.queue import enqueue, lock_queue
from services.provisioner.queue_rules import DELETE, PLAN_PRIORITY, UPDATE
from services.provisioner.rollout_gate import BatchGate, Failure, ManifestBackend
from services.provisioner.settings import ProvisionerSettings

log = logging.getLogger(__name__)

REQUESTED_BY = "rollout"
# The User-Agent of the rollout's own calls to the cluster (its health gate), told apart from
# the worker's in the API server's audit log.
USER_AGENT = "iotistic-provisioner-rollout"
# Stamps read from the cluster at once while planning (one GET of a namespace each).
READS_AT_ONCE = 16
# Held (a session advisory lock) while a rollout runs: one at a time across the platform.
LOCK_KEY = "provisioner:rollout"

# Deployed, open customers on one backend (or those named): what a rollout may touch. Trials
# first, enterprise last; within a plan by id, so a rerun plans the same order.
_DEPLOYED = """
    SELECT i.customer_id, l.plan, l.license_id, l.jwt, l.max_devices
    FROM customer_instances i JOIN customer_licenses l USING (customer_id)
    WHERE i.state = 'running' AND i.backend = $1 AND NOT l.closed AND l.jwt IS NOT NULL
      AND ($2::text[] IS NULL OR i.customer_id = ANY($2))
"""


class RolloutBusy(RuntimeError):
    """Another rollout is running (from another shell, pod or replica)."""


@dataclass(frozen=True)
class Tenant:
    """A deployed customer, what would be applied now and what was."""

    customer_id: str
    plan: str
    wanted: str
    applied: str | None

    @property
    def up_to_date(self) -> bool:
        """Its stamped manifest set is the one that would be applied now."""
        return self.applied == self.wanted


@dataclass(frozen=True)
class RolloutPlan:
    """The tenants to update, in batches, and those already up to date (skipped)."""

    batches: list[list[Tenant]]
    skipped: list[Tenant]
    # Named with --only but not deployed here (unknown, closed, removed, another backend).
    not_deployed: list[str] = field(default_factory=list)

    @property
    def tenants(self) -> list[Tenant]:
        """Every tenant to update, in order."""
        return [tenant for batch in self.batches for tenant in batch]


@dataclass
class RolloutReport:
    """How a rollout went."""

    rollout_id: str
    plan: RolloutPlan
    updated: list[str] = field(default_factory=list)
    # Closed (or removed) after the plan was made: left alone.
    left: list[str] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    # The batches that ran (1-based count); fewer than planned when it stopped.
    batches_run: int = 0
    stopped: bool = False

    @property
    def untouched(self) -> list[str]:
        """Tenants of the batches that never ran."""
        return [t.customer_id for batch in self.plan.batches[self.batches_run :] for t in batch]


def spec_of(row: asyncpg.Record, settings: ProvisionerSettings) -> InstanceSpec:
    """The instance spec the queue worker builds for a job of this customer (``worker._spec``)."""
    return InstanceSpec(
        customer_id=row["customer_id"],
        plan=row["plan"],
        license_jwt=row["jwt"],
        license_id=row["license_id"],
        jwks_url=settings.license_jwks_url,
        max_devices=row["max_devices"],
    )


def batches_of(tenants: Sequence[Tenant], batch_size: int, canary: int) -> list[list[Tenant]]:
    """A first batch of ``canary`` tenants (none: 0), then batches of ``batch_size``."""
    if batch_size < 1 or canary < 0:
        raise ValueError("a batch holds at least one tenant, a canary none or more")
    batches = [list(tenants[:canary])] if canary and tenants else []
    rest = list(tenants[canary:])
    batches += [rest[i : i + batch_size] for i in range(0, len(rest), batch_size)]
    return batches


async def plan_rollout(
    pool: asyncpg.Pool,
    backend: ManifestBackend,
    settings: ProvisionerSettings,
    *,
    only: Sequence[str] | None = None,
    force: bool = False,
    batch_size: int = 10,
    canary: int = 1,
) -> RolloutPlan:
    """Which deployed tenants differ from what would be applied now (all with ``force``), in
    batches; reads the stamps from the backend."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(_DEPLOYED, backend.name, list(only) if only else None)
    rows = sorted(rows, key=lambda r: (-PLAN_PRIORITY.get(r["plan"], 5), r["customer_id"]))
    limit = asyncio.Semaphore(READS_AT_ONCE)

    async def tenant(row: asyncpg.Record) -> Tenant:
        async with limit:
            applied = await backend.applied_manifest(row["customer_id"])
        return Tenant(
            customer_id=row["customer_id"],
            plan=row["plan"],
            wanted=backend.manifest_digest(spec_of(row, settings)),
            applied=applied,
        )

    tenants = await asyncio.gather(*(tenant(row) for row in rows))
    found = {t.customer_id for t in tenants}
    todo = [t for t in tenants if force or not t.up_to_date]
    return RolloutPlan(
        batches=batches_of(todo, batch_size, canary),
        skipped=[t for t in tenants if not force and t.up_to_date],
        not_deployed=[c for c in only or () if c not in found],
    )


class Rollout:
    """Runs a plan batch by batch through the queue, each behind its health gate."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        backend: ManifestBackend,
        settings: ProvisionerSettings,
        *,
        batch_timeout: float = 900.0,
        settle_seconds: float = 10.0,
        max_failures: int = 0,
        poll_seconds: float = 1.0,
        say: Callable[[str], None] = lambda line: None,
        rollout_id: str | None = None,
    ) -> None:
        """``batch_timeout``: how long a batch's jobs and gate may take in all; ``say`` is
        told each step in a line."""
        self._pool = pool
        self._backend = backend
        self._settings = settings
        self._timeout = batch_timeout
        self._max_failures = max_failures
        self._gate = BatchGate(
            pool,
            backend,
            self._wanted,
            timeout=batch_timeout,
            settle_seconds=settle_seconds,
            poll_seconds=poll_seconds,
        )
        self._say = say
        self.rollout_id = rollout_id or uuid.uuid4().hex[:12]

    @property
    def requested_by(self) -> str:
        """What the jobs (and their DeploymentRequested) say asked for them."""
        return f"{REQUESTED_BY}:{self.rollout_id}"

    async def run(self, plan: RolloutPlan) -> RolloutReport:
        """Every batch in turn; stops after the batch that took failures past the limit.
        Raises ``RolloutBusy`` while another rollout runs (two would queue each tenant
        twice, and neither gate would know what the other changed)."""
        async with self._pool.acquire() as conn:
            if not await conn.fetchval(
                "SELECT pg_try_advisory_lock(hashtextextended($1, 0))", LOCK_KEY
            ):
                raise RolloutBusy("another rollout is running; wait for it, or stop it")
            try:
                return await self._run(plan)
            finally:
                await conn.execute("SELECT pg_advisory_unlock(hashtextextended($1, 0))", LOCK_KEY)

    async def _run(self, plan: RolloutPlan) -> RolloutReport:
        report = RolloutReport(rollout_id=self.rollout_id, plan=plan)
        for number, batch in enumerate(plan.batches, start=1):
            names = ", ".join(t.customer_id for t in batch)
            self._say(f"batch {number}/{len(plan.batches)}: {names}")
            updated, left, failures = await self._run_batch(batch)
            report.batches_run = number
            report.updated += updated
            report.left += left
            report.failures += failures
            for failure in failures:
                self._say(f"  FAILED {failure.customer_id}: {failure.reason}")
            if len(report.failures) > self._max_failures:
                report.stopped = True
                self._say(
                    f"stopped after batch {number}: {len(report.failures)} failed "
                    f"(at most {self._max_failures} allowed); {len(report.untouched)} "
                    "tenants of later batches untouched"
                )
                break
            if failures:
                self._say(f"  batch {number}: {len(updated)} updated, {len(failures)} failed")
            else:
                self._say(f"  batch {number} healthy ({len(updated)} updated)")
        return report

    async def _run_batch(self, batch: list[Tenant]) -> tuple[list[str], list[str], list[Failure]]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        jobs: dict[str, str] = {}
        left: list[str] = []
        for tenant in batch:
            job_id = await self._enqueue(tenant)
            if job_id is None:
                left.append(tenant.customer_id)
                self._say(f"  {tenant.customer_id}: closed or removed meanwhile, left alone")
            else:
                jobs[tenant.customer_id] = job_id
        outcomes = await asyncio.gather(
            *(self._gate.job_outcome(cid, job_id, deadline) for cid, job_id in jobs.items())
        )
        failures = [outcome for outcome in outcomes if outcome is not None]
        failed = {f.customer_id for f in failures}
        gated = await self._gate.gate([cid for cid in jobs if cid not in failed], deadline)
        failures += gated
        failed |= {f.customer_id for f in gated}
        return [cid for cid in jobs if cid not in failed], left, failures

    async def _enqueue(self, tenant: Tenant) -> str | None:
        """Queue the tenant's update, unless they closed or lost their instance since the
        plan (checked under the queue's lock, as the reactors queue); None then."""
        async with self._pool.acquire() as conn, conn.transaction():
            await lock_queue(conn)
            row = await conn.fetchrow(
                f"{_DEPLOYED} LIMIT 1", self._backend.name, [tenant.customer_id]
            )
            if row is None:
                return None
            job_id = await enqueue(
                conn,
                customer_id=tenant.customer_id,
                kind=UPDATE,
                plan=row["plan"],
                license_id=row["license_id"],
                requested_by=self.requested_by,
                at=datetime.now(UTC),
                max_attempts=self._settings.queue_max_retries,
            )
            kind = await conn.fetchval("SELECT kind FROM queue_jobs WHERE job_id = $1", job_id)
        # A pending delete covers it (the customer is leaving); a pending deploy will apply
        # today's objects as well and is waited for like our own job.
        return None if kind == DELETE else job_id

    async def _wanted(self, customer_id: str) -> str | None:
        """The digest of what the customer would be applied with now, from their license now;
        None once they are no longer deployed here (closed since: their delete follows)."""
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(f"{_DEPLOYED} LIMIT 1", self._backend.name, [customer_id])
        return None if row is None else self._backend.manifest_digest(spec_of(row, self._settings))


def kubernetes_backend(
    settings: ProvisionerSettings,
    api_client: Callable[[], Awaitable[k8s.ApiClient]] | None = None,
) -> KubernetesBackend:
    """The kubernetes backend as the provisioner's workers have it (``app.kubernetes_backend``:
    the objects rendered here must be theirs), its calls marked with the rollout's User-Agent.
    ``api_client``: the cluster's (in-cluster, else kubeconfig) by default."""
    from services.provisioner.app import kubernetes_backend as workers_backend

    make = api_client or cluster_client

    async def marked() -> k8s.ApiClient:
        client = await make()
        client.user_agent = USER_AGENT
        return client

    return workers_backend(settings, marked)
