"""A worker's side of the deployment queue: claiming a job, its lease, its progress and its
outcome. Each change is made only while the job is still as the worker last saw it, and goes to
the outbox in the caller's transaction (see ``queue.py`` for the queue's rules as a whole)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from contracts import (
    Cause,
    DeploymentFailed,
    DeploymentProgressed,
    DeploymentStarted,
    DeploymentSucceeded,
)
from services.provisioner.queue import (
    NEEDS_ROOM,
    instances_held,
    job_cause,
    lock_queue,
    note_waiting_for_capacity,
    record_job_event,
)
from services.provisioner.queue_rules import (
    DELETE,
    PENDING,
    job_event_id,
    lease_ran_out_on_last_attempt,
    next_attempt_delay,
)


@dataclass(frozen=True)
class Claimed:
    """A job a worker now holds a lease on."""

    job_id: str
    customer_id: str
    kind: str
    attempt: int
    max_attempts: int
    data: dict[str, Any]
    # Counted up each time the job's attempts start over (a retry, a job given back).
    generation: int = 0
    # What asked for the job (its DeploymentRequested, or an operator's DeploymentRetried):
    # what each event of the attempt names as its cause, and whose trace the attempt continues.
    # None for a job queued before causes were kept.
    cause: Cause | None = None


def _changed_one(result: str) -> bool:
    return result.endswith(" 1")


async def _clock(conn: asyncpg.Connection) -> datetime:
    # Postgres's clock, not this replica's: leases are compared across replicas.
    now: datetime = await conn.fetchval("SELECT clock_timestamp()")
    return now


# --- running ------------------------------------------------------------------------------------

# A waiting or delayed job waits while any other job of its customer is active, even one whose
# lease ran out: that one is claimed again first. Of two active jobs (left by an older version)
# only a live lease blocks, so they cannot block each other for ever. While the platform is
# full ($3), a waiting job that needs room for a new instance waits (an active one whose lease
# ran out holds its room already).
_NEXT = f"""
    SELECT * FROM queue_jobs j
    WHERE ((j.state = ANY($2) AND j.run_after <= $1 AND NOT ($3 AND {NEEDS_ROOM}))
           OR (j.state = 'active' AND j.lease_until <= $1))
      AND NOT EXISTS (
          SELECT 1 FROM queue_jobs o
          WHERE o.customer_id = j.customer_id AND o.state = 'active' AND o.job_id <> j.job_id
            AND (j.state <> 'active' OR o.lease_until > $1)
      )
    ORDER BY j.priority, j.created_at
    LIMIT 1
"""

# The row is still as it was read: nobody finished, extended or claimed it meanwhile.
_AS_READ = (
    "job_id = $1 AND state = $2 AND attempts = $3 AND generation = $4 "
    "AND lease_until IS NOT DISTINCT FROM $5"
)


def _as_read(row: asyncpg.Record) -> tuple[Any, ...]:
    return (row["job_id"], row["state"], row["attempts"], row["generation"], row["lease_until"])


async def claim_next_job(
    conn: asyncpg.Connection,
    *,
    worker_id: str,
    backend: str,
    concurrency: int,
    lease: timedelta,
    capacity: int | None = None,
) -> Claimed | None:
    """Lease the most urgent runnable job to ``worker_id``, if a slot is free.

    The lease runs for ``lease`` from now on Postgres's clock. Finishing and extending do not
    take the queue's lock, so the job is changed only if it is still as it was read; if it is
    not (its old worker just finished it, say), the next one is looked for. With ``capacity``
    (instances the backend can hold; None: no limit) reached, jobs that would start another
    instance wait, each recorded once as waiting for capacity.
    """
    await lock_queue(conn)
    if await conn.fetchval("SELECT paused FROM queue_control"):
        return None
    while True:
        now = await _clock(conn)
        row = await _next_runnable(conn, now, concurrency, capacity)
        if row is None:
            return None
        if lease_ran_out_on_last_attempt(row["state"], row["attempts"], row["max_attempts"]):
            # Its worker died on the last attempt: that attempt failed.
            await _finish_failed(conn, row, now, "the worker running it stopped (lease expired)")
            continue
        claimed = await _lease(conn, row, now, worker_id, backend, lease)
        if claimed is not None:
            return claimed


async def _next_runnable(
    conn: asyncpg.Connection, now: datetime, concurrency: int, capacity: int | None
) -> asyncpg.Record | None:
    """The most urgent job that may start now, or None (no slot free, or nothing to run)."""
    full = False
    if capacity is not None:
        held = await instances_held(conn)
        full = held >= capacity
        if full:
            await note_waiting_for_capacity(conn, now, held, capacity)
    running = await conn.fetchval(
        "SELECT count(*) FROM queue_jobs WHERE state = 'active' AND lease_until > $1", now
    )
    if running >= concurrency:
        return None
    row: asyncpg.Record | None = await conn.fetchrow(_NEXT, now, list(PENDING), full)
    return row


async def _lease(
    conn: asyncpg.Connection,
    row: asyncpg.Record,
    now: datetime,
    worker_id: str,
    backend: str,
    lease: timedelta,
) -> Claimed | None:
    """The job leased to ``worker_id`` for its next attempt; None if it changed since read."""
    attempt = row["attempts"] + 1
    entry = {"attempt": attempt, "worker": worker_id, "started_at": now.isoformat()}
    result = await conn.execute(
        "UPDATE queue_jobs SET state = 'active', attempts = $6, lease_owner = $7, "
        "lease_until = $8, processed_on = COALESCE(processed_on, $9), progress = 0, "
        "step = NULL, waiting_for_capacity_since = NULL, "
        f"attempt_log = attempt_log || $10::jsonb WHERE {_AS_READ}",
        *_as_read(row),
        attempt,
        worker_id,
        now + lease,
        now,
        json.dumps([entry]),
    )
    if not _changed_one(result):
        return None
    cause = job_cause(row["cause"])
    # Recorded before the worker's span of the attempt exists: it carries the cause's trace.
    await record_job_event(
        conn,
        DeploymentStarted(
            customer_id=row["customer_id"],
            job_id=row["job_id"],
            attempt=attempt,
            backend=backend,
            worker_id=worker_id,
        ),
        row["customer_id"],
        job_event_id(row["job_id"], row["generation"], "started", attempt),
        cause,
    )
    return Claimed(
        job_id=row["job_id"],
        customer_id=row["customer_id"],
        kind=row["kind"],
        attempt=attempt,
        max_attempts=row["max_attempts"],
        data=json.loads(row["data"]),
        generation=row["generation"],
        cause=cause,
    )


# The job is still this worker's: same attempt of the same generation, still active.
_MINE = (
    "job_id = $1 AND state = 'active' AND lease_owner = $2 AND attempts = $3 AND generation = $4"
)


def _mine(job: Claimed, worker_id: str) -> tuple[Any, ...]:
    return (job.job_id, worker_id, job.attempt, job.generation)


async def extend_lease(
    conn: asyncpg.Connection, job: Claimed, worker_id: str, lease: timedelta
) -> bool:
    """Keep the lease alive for ``lease`` from now (Postgres's clock); False when the job is
    no longer this worker's."""
    result = await conn.execute(
        f"UPDATE queue_jobs SET lease_until = clock_timestamp() + $5 WHERE {_MINE}",
        *_mine(job, worker_id),
        lease,
    )
    return _changed_one(result)


async def record_progress(
    conn: asyncpg.Connection, job: Claimed, worker_id: str, progress: int, step: str
) -> bool:
    """Note how far the job got; False when it is no longer this worker's."""
    result = await conn.execute(
        f"UPDATE queue_jobs SET progress = $5, step = $6 WHERE {_MINE}",
        *_mine(job, worker_id),
        progress,
        step,
    )
    if not _changed_one(result):
        return False
    await record_job_event(
        conn,
        DeploymentProgressed(
            customer_id=job.customer_id, job_id=job.job_id, progress=progress, step=step
        ),
        job.customer_id,
        job_event_id(job.job_id, job.generation, "progress", job.attempt, progress, step),
        job.cause,
    )
    return True


async def complete_job(
    conn: asyncpg.Connection,
    job: Claimed,
    worker_id: str,
    *,
    backend: str,
    instance_url: str | None,
    components: dict[str, str],
) -> bool:
    """The attempt succeeded; False (and nothing recorded) if the job is no longer this
    worker's."""
    now = await _clock(conn)
    result = await conn.execute(
        "UPDATE queue_jobs SET state = 'completed', progress = 100, finished_on = $5, "
        "lease_owner = NULL, lease_until = NULL, failed_reason = NULL, "
        f"attempt_log = {_closed_log('$6')} WHERE {_MINE}",
        *_mine(job, worker_id),
        now,
        json.dumps({"finished_at": now.isoformat(), "outcome": "completed"}),
    )
    if not _changed_one(result):
        return False
    await conn.execute(
        "INSERT INTO customer_instances (customer_id, state, instance_url, backend, updated_at) "
        "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (customer_id) DO UPDATE SET state = $2, "
        "instance_url = $3, backend = $4, updated_at = $5",
        job.customer_id,
        "removed" if job.kind == DELETE else "running",
        instance_url,
        backend,
        now,
    )
    await record_job_event(
        conn,
        DeploymentSucceeded(
            customer_id=job.customer_id,
            job_id=job.job_id,
            backend=backend,
            instance_url=instance_url,
            components=components,
        ),
        job.customer_id,
        job_event_id(job.job_id, job.generation, "succeeded"),
        job.cause,
    )
    return True


def _closed_log(param: str) -> str:
    # The attempt log's last entry gets the attempt's end and outcome merged in.
    return (
        f"jsonb_set(attempt_log, ARRAY[(jsonb_array_length(attempt_log) - 1)::text], "
        f"attempt_log -> (jsonb_array_length(attempt_log) - 1) || {param}::jsonb)"
    )


async def fail_job(
    conn: asyncpg.Connection,
    job: Claimed,
    worker_id: str,
    error: str,
    retry_delay: timedelta,
) -> bool:
    """The attempt failed: delayed with backoff while attempts remain, else failed; False (and
    nothing recorded) if the job is no longer this worker's."""
    row = await conn.fetchrow(
        f"SELECT * FROM queue_jobs WHERE {_MINE} FOR UPDATE", *_mine(job, worker_id)
    )
    if row is None:
        return False
    now = await _clock(conn)
    if job.attempt >= job.max_attempts:
        return await _finish_failed(conn, row, now, error)
    next_at = now + next_attempt_delay(retry_delay, job.attempt)
    await conn.execute(
        "UPDATE queue_jobs SET state = 'delayed', run_after = $2, failed_reason = $3, "
        f"lease_owner = NULL, lease_until = NULL, attempt_log = {_closed_log('$4')} "
        "WHERE job_id = $1",
        job.job_id,
        next_at,
        error,
        json.dumps({"finished_at": now.isoformat(), "outcome": "failed", "error": error}),
    )
    await record_job_event(
        conn,
        DeploymentFailed(
            customer_id=job.customer_id,
            job_id=job.job_id,
            attempt=job.attempt,
            error=error,
            will_retry=True,
            next_attempt_at=next_at,
        ),
        job.customer_id,
        job_event_id(job.job_id, job.generation, "failed", job.attempt),
        job.cause,
    )
    return True


async def _finish_failed(
    conn: asyncpg.Connection, row: asyncpg.Record, now: datetime, error: str
) -> bool:
    result = await conn.execute(
        "UPDATE queue_jobs SET state = 'failed', finished_on = $6, failed_reason = $7, "
        f"lease_owner = NULL, lease_until = NULL, attempt_log = {_closed_log('$8')} "
        f"WHERE {_AS_READ}",
        *_as_read(row),
        now,
        error,
        json.dumps({"finished_at": now.isoformat(), "outcome": "failed", "error": error}),
    )
    if not _changed_one(result):
        return False
    await record_job_event(
        conn,
        DeploymentFailed(
            customer_id=row["customer_id"],
            job_id=row["job_id"],
            attempt=max(1, row["attempts"]),
            error=error,
            will_retry=False,
        ),
        row["customer_id"],
        job_event_id(row["job_id"], row["generation"], "failed", row["attempts"]),
        job_cause(row["cause"]),
    )
    return True


async def release_job(conn: asyncpg.Connection, job: Claimed, worker_id: str) -> bool:
    """A worker shutting down gives its job back at once instead of waiting out the lease: the
    job waits again and the attempt does not count. False if it was no longer this worker's."""
    now = await _clock(conn)
    result = await conn.execute(
        "UPDATE queue_jobs SET state = 'waiting', attempts = attempts - 1, "
        "generation = generation + 1, run_after = $5, lease_owner = NULL, lease_until = NULL, "
        f"progress = 0, step = NULL, attempt_log = {_closed_log('$6')} WHERE {_MINE}",
        *_mine(job, worker_id),
        now,
        json.dumps({"finished_at": now.isoformat(), "outcome": "released"}),
    )
    return _changed_one(result)
