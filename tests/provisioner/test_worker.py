"""The queue worker against trouble, on a real Postgres with the local backend: a backend that
will not start and claims that fail, an outcome whose connection is cut while it is written, and
a lease that cannot be extended. The trouble is real: renamed tables, a connection terminated
by Postgres, a row another transaction holds. No instance ever answers here (the instance
command is ``sleep``), so deploys wait for one; deletes find nothing and complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from contracts import decode_envelope
from libs.eventlog.store import EventStore
from libs.runtime.outbox import OutboxRelay
from services.provisioner.backends.local.backend import LocalBackend, instance_name
from services.provisioner.metrics import QueueMetrics
from services.provisioner.queue import enqueue
from services.provisioner.queue_rules import DELETE, DEPLOY, Kind
from services.provisioner.settings import ProvisionerSettings
from services.provisioner.worker import QueueWorker
from support import eventually

pytestmark = pytest.mark.slow

# Backends waiting on a lock, by what they run.
WAITING = (
    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
    "AND wait_event_type = 'Lock' AND query LIKE $1"
)


def worker_settings(database_url: str, folder: Path) -> ProvisionerSettings:
    return ProvisionerSettings(
        database_url=database_url,
        provisioner_secret="s" * 40,
        local_instances_dir=str(folder / "instances"),
        local_instance_command=f"{shutil.which('sleep')} 600",
        local_ready_timeout_seconds=120,
        queue_concurrency=1,
        queue_lease_seconds=3,
    )


@contextlib.asynccontextmanager
async def running_worker(
    pool: asyncpg.Pool, settings: ProvisionerSettings, store: EventStore
) -> AsyncIterator[asyncio.Task[None]]:
    """A worker running; cancelled (as at shutdown) on leaving. Its outbox is not relayed, so
    the events it recorded stay there to be read."""
    worker = QueueWorker(
        lambda: pool,
        settings,
        LocalBackend(settings, lambda: pool),
        OutboxRelay(lambda: pool, lambda: store, "provisioner:outbox"),
        QueueMetrics(CollectorRegistry()),
    )
    task = asyncio.create_task(worker.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def queue(pool: asyncpg.Pool, customer_id: str, kind: Kind) -> str:
    async with pool.acquire() as conn, conn.transaction():
        return await enqueue(
            conn,
            customer_id=customer_id,
            kind=kind,
            plan="starter",
            license_id=None,
            requested_by="test",
            at=datetime.now(UTC),
            max_attempts=3,
        )


async def job(pool: asyncpg.Pool, job_id: str) -> Any:
    async with pool.acquire() as conn:
        return await conn.fetchrow("SELECT * FROM queue_jobs WHERE job_id = $1", job_id)


async def events_of(pool: asyncpg.Pool, job_id: str) -> list[str]:
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT envelope FROM outbox ORDER BY id")
    envelopes = [decode_envelope(r["envelope"]) for r in rows]
    return [e.type for e in envelopes if json.loads(bytes(e.data))["job_id"] == job_id]


async def rename(pool: asyncpg.Pool, table: str, to: str) -> None:
    async with pool.acquire() as conn:
        await conn.execute(f"ALTER TABLE {table} RENAME TO {to}")


async def test_the_worker_rides_out_a_backend_that_will_not_start_and_failing_claims(
    pool, provisioner_database, store, tmp_path, caplog
) -> None:
    caplog.set_level(logging.ERROR, logger="services.provisioner.worker")

    async def logged(text: str) -> bool:
        return any(text in record.getMessage() for record in caplog.records)

    job_id = await queue(pool, str(uuid.uuid4()), DELETE)
    await rename(pool, "local_instances", "local_instances_away")
    await rename(pool, "queue_control", "queue_control_away")
    settings = worker_settings(provisioner_database, tmp_path)
    async with running_worker(pool, settings, store) as worker:
        await eventually(lambda: logged("starting the local backend failed"), what="start failed")
        await rename(pool, "local_instances_away", "local_instances")
        await eventually(lambda: logged("claiming jobs failed"), what="a claim failed")
        await rename(pool, "queue_control_away", "queue_control")
        done = await eventually(
            lambda: job(pool, job_id), lambda r: r["state"] == "completed", what="the delete done"
        )
        assert not worker.done()
    assert done["attempts"] == 1


async def test_an_outcome_cut_off_while_written_is_written_again_and_the_job_runs_once(
    pool, provisioner_database, store, tmp_path
) -> None:
    customer_id = str(uuid.uuid4())
    job_id = await queue(pool, customer_id, DELETE)
    settings = worker_settings(provisioner_database, tmp_path)
    async with pool.acquire() as holder, pool.acquire() as watcher:
        # The customer's instance row, not committed yet: the outcome's write of that row
        # waits for this transaction, and Postgres cuts its connection meanwhile.
        holding = holder.transaction()
        await holding.start()
        await holder.execute(
            "INSERT INTO customer_instances (customer_id, state, backend, updated_at) "
            "VALUES ($1, 'removed', 'local', now())",
            customer_id,
        )
        async with running_worker(pool, settings, store):
            pid = await eventually(
                lambda: watcher.fetchval(WAITING, "INSERT INTO customer_instances%"),
                what="the outcome being written",
            )
            assert await watcher.fetchval("SELECT pg_terminate_backend($1)", pid)
            await holding.rollback()
            done = await eventually(
                lambda: job(pool, job_id), lambda r: r["state"] == "completed", what="completed"
            )
    assert done["attempts"] == 1
    assert await events_of(pool, job_id) == [
        "DeploymentRequested",
        "DeploymentStarted",
        "DeploymentProgressed",
        "DeploymentProgressed",
        "DeploymentProgressed",
        "DeploymentProgressed",
        "DeploymentSucceeded",
    ]


async def test_a_lease_that_cannot_be_extended_stops_the_attempt_before_it_runs_out(
    pool, provisioner_database, store, tmp_path
) -> None:
    customer_id = str(uuid.uuid4())
    async with pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO customer_licenses (customer_id, license_id, plan, jwt, max_devices) "
            "VALUES ($1, 'l1', 'starter', 'a.b.c', 10)",
            customer_id,
        )
    job_id = await queue(pool, customer_id, DEPLOY)
    settings = worker_settings(provisioner_database, tmp_path)
    try:
        async with (
            running_worker(pool, settings, store),
            pool.acquire() as holder,
            pool.acquire() as watcher,
        ):
            await eventually(
                lambda: job(pool, job_id),
                lambda r: r["step"] == "health",
                what="the deploy waiting for its instance",
            )
            # Another transaction holds the job's row: the lease cannot be extended.
            holding = holder.transaction()
            await holding.start()
            await holder.execute("SELECT 1 FROM queue_jobs WHERE job_id = $1 FOR UPDATE", job_id)

            async def extensions_waiting() -> int:
                return len(await watcher.fetch(WAITING, "UPDATE queue_jobs SET lease_until%"))

            await eventually(extensions_waiting, lambda n: n == 1, what="an extension waiting")
            # Before the lease runs out the worker stops waiting, and stops the attempt.
            await eventually(extensions_waiting, lambda n: n == 0, what="the extension dropped")
            await holding.rollback()
            # Its one slot is free again: once the lease has run out it claims the job again.
            await eventually(
                lambda: job(pool, job_id),
                lambda r: r["attempts"] == 2 and r["state"] == "active",
                what="the job claimed again",
            )
        # Stopping, the worker gave the second attempt back.
        row = await job(pool, job_id)
        assert (row["state"], row["attempts"], row["lease_owner"]) == ("waiting", 1, None)
        attempts = json.loads(row["attempt_log"])
        assert "outcome" not in attempts[0]  # the stopped attempt recorded nothing
        assert attempts[1]["outcome"] == "released"
        events = await events_of(pool, job_id)
        assert events.count("DeploymentStarted") == 2
        assert not {"DeploymentFailed", "DeploymentSucceeded"} & set(events)
    finally:
        name = instance_name(customer_id)
        async with pool.acquire() as conn:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await conn.execute(f'DROP ROLE IF EXISTS "{name}"')
