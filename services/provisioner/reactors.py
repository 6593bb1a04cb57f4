"""What the provisioner does when licenses are issued and customers leave: queue a job.

The first license of a customer deploys their instance; every later one updates it (the
instance then runs the newest license, including a final one that makes it read-only); a
closed account deletes everything, and no license after the closure deploys anything. The job
is queued in the same transaction as this consumer's checkpoint, with its DeploymentRequested
in the outbox, so a redelivered event queues nothing twice.

The handlers take what they need besides the event (how many attempts a job gets, whom to wake)
as keyword arguments: ``provisioner_reactors`` binds them in the table of handlers.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from contracts import CustomerClosed, LicenseIssued
from libs.db.postgres import Connection
from libs.projections.apply import Projection, Recorded
from services.provisioner.queue import enqueue
from services.provisioner.queue_rules import DELETE, DEPLOY, kind_for_license


async def when_license_issued_queue_deployment(
    conn: Connection, r: Recorded[LicenseIssued], *, max_attempts: int, wake: Callable[[], None]
) -> None:
    """Remember the customer's license and queue the deploy (first) or update it asks for."""
    e = r.event
    closed = await conn.fetchval(
        "SELECT closed FROM customer_licenses WHERE customer_id = $1", e.customer_id
    )
    if closed:
        return  # a license after the account closed changes nothing that runs
    await conn.execute(
        "INSERT INTO customer_licenses (customer_id, license_id, plan, jwt, max_devices) "
        "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (customer_id) DO UPDATE SET "
        "license_id = $2, plan = $3, jwt = $4, max_devices = $5",
        e.customer_id,
        e.license_id,
        e.plan,
        e.jwt,
        e.features.maxDevices,
    )
    deployed = await conn.fetchval(
        "SELECT state = 'running' FROM customer_instances WHERE customer_id = $1",
        e.customer_id,
    )
    queued = await conn.fetchval(
        "SELECT 1 FROM queue_jobs WHERE customer_id = $1 AND kind = $2 "
        "AND state IN ('waiting', 'delayed', 'active')",
        e.customer_id,
        DEPLOY,
    )
    await enqueue(
        conn,
        customer_id=e.customer_id,
        kind=kind_for_license(bool(deployed), bool(queued)),
        plan=e.plan,
        license_id=e.license_id,
        requested_by="system",
        at=r.envelope.occurred_at,
        max_attempts=max_attempts,
        causation=r.envelope,
    )
    wake()


async def when_customer_closed_queue_removal(
    conn: Connection, r: Recorded[CustomerClosed], *, max_attempts: int, wake: Callable[[], None]
) -> None:
    """Remember the closure and queue the removal of the customer's instance."""
    customer_id = r.event.customer_id
    # A closure can arrive before any license: the row, licensed or not, remembers it, so
    # that a license arriving later deploys nothing.
    await conn.execute(
        "INSERT INTO customer_licenses (customer_id, closed) VALUES ($1, true) "
        "ON CONFLICT (customer_id) DO UPDATE SET closed = true",
        customer_id,
    )
    await enqueue(
        conn,
        customer_id=customer_id,
        kind=DELETE,
        plan=None,
        license_id=None,
        requested_by=r.event.closed_by,
        at=r.envelope.occurred_at,
        max_attempts=max_attempts,
        causation=r.envelope,
        erase=r.event.erase,
    )
    wake()


def provisioner_reactors(max_attempts: int, wake: Callable[[], None]) -> list[Projection]:
    """Queue deploy, update and delete jobs as licenses and closures arrive."""
    return [
        Projection(
            name="queue_deployments",
            tables=(),
            handlers={
                LicenseIssued: partial(
                    when_license_issued_queue_deployment, max_attempts=max_attempts, wake=wake
                ),
                CustomerClosed: partial(
                    when_customer_closed_queue_removal, max_attempts=max_attempts, wake=wake
                ),
            },
        )
    ]
