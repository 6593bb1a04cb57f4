"""The deployment queue: jobs, priorities, leases, retries with backoff, collapsing.

Every function here runs inside the caller's Postgres transaction and records each change of
a job as an event in the outbox, in that same transaction: the queue (private state, like the
leases) and the log always agree, and the ``deployments`` read model follows from the log.

Rules:
- priority 1 (most urgent) to 10: delete 1, enterprise 1, professional 2, update 3, starter 3,
  trial 5; among equals the oldest first;
- at most ``concurrency`` jobs hold a live lease across all replicas (claims are serialised by
  a transaction-level advisory lock, so counting and claiming are one step);
- one job at a time per customer; a job whose lease ran out (its worker died) is claimed again,
  and until then it still holds its customer's turn;
- lease and run times come from Postgres's clock, one clock for every replica;
- a worker records progress and outcomes only while it still holds the job: same attempt and
  generation, still active; a claim changes a row only if it is still as the claim read it;
- jobs read the customer's current license when they run, so a waiting deploy or update covers
  any newer license, and a delete makes waiting deploys and updates pointless;
- while the instances running or starting reach the capacity the backend reports, a job that
  would start an instance for a customer who has none waits (recorded once as
  ``DeploymentWaitingForCapacity``), neither failed nor retried; updates and deletes of
  instances that run are never held, and held jobs start in priority order as room frees.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

import asyncpg

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
    Envelope,
    Event,
)
from libs.runtime.outbox import add_to_outbox

Kind = Literal["deploy-customer-stack", "update-customer-stack", "delete-customer-stack"]
DEPLOY: Kind = "deploy-customer-stack"
UPDATE: Kind = "update-customer-stack"
DELETE: Kind = "delete-customer-stack"
STATES = ("waiting", "active", "delayed", "completed", "failed")
PENDING = ("waiting", "delayed")
FINISHED = ("completed", "failed", "superseded")
QUEUE_LOCK = "provisioner:queue"
PLAN_PRIORITY = {"enterprise": 1, "professional": 2, "starter": 3, "trial": 5}


def priority_of(kind: str, plan: str | None) -> int:
    """How urgent a job is, 1 (most) to 10."""
    if kind == DELETE:
        return 1
    if kind == UPDATE:
        return 3
    return PLAN_PRIORITY.get(plan or "trial", 5)


def job_id_for(customer_id: str, at: datetime) -> str:
    """``deploy-<customer_id>-<epoch ms>``, as the original queue named its jobs."""
    return f"deploy-{customer_id}-{int(at.timestamp() * 1000)}"


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


def _event_id(job_id: str, generation: int, *parts: object) -> str:
    # A job whose attempts start over numbers them from 1 again: the generation keeps the new
    # run's event ids apart from the old run's, which the outbox and JetStream would drop.
    run = job_id if generation == 0 else f"{job_id}:g{generation}"
    return ":".join([run, *(str(part) for part in parts)])


def _changed_one(result: str) -> bool:
    return result.endswith(" 1")


async def _record(
    conn: asyncpg.Connection,
    event: Event,
    customer_id: str,
    event_id: str,
    causation: Envelope | None = None,
) -> None:
    await add_to_outbox(
        conn, event, customer_id=customer_id, causation=causation, event_id=event_id
    )


async def lock_queue(conn: asyncpg.Connection) -> None:
    """Hold the queue's lock until the transaction ends: enqueueing, claiming and retrying
    wait for it, so what the caller reads of the queue stays true until it commits."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", QUEUE_LOCK)


_lock = lock_queue


async def _clock(conn: asyncpg.Connection) -> datetime:
    # Postgres's clock, not this replica's: leases are compared across replicas.
    now: datetime = await conn.fetchval("SELECT clock_timestamp()")
    return now


# --- enqueueing ---------------------------------------------------------------------------------


async def _make_erase(conn: asyncpg.Connection, job_id: str) -> bool:
    """Make a waiting removal erase; False when it is no longer waiting."""
    return bool(
        await conn.fetchval(
            "UPDATE queue_jobs SET data = data || '{\"erase\": true}'::jsonb "
            "WHERE job_id = $1 AND state = ANY($2) RETURNING 1",
            job_id,
            list(PENDING),
        )
    )


async def enqueue(
    conn: asyncpg.Connection,
    *,
    customer_id: str,
    kind: Kind,
    plan: str | None,
    license_id: str | None,
    requested_by: str,
    at: datetime,
    max_attempts: int,
    causation: Envelope | None = None,
    erase: bool = False,
) -> str:
    """Queue a job unless a pending one covers it; returns the id of the job that will run.
    ``erase`` (removals only): the data goes at once, not after the grace period; a pending
    removal that would keep it is made to erase."""
    await _lock(conn)
    pending = await conn.fetch(
        "SELECT job_id, kind FROM queue_jobs WHERE customer_id = $1 AND state = ANY($2) "
        "ORDER BY created_at",
        customer_id,
        list(PENDING),
    )
    kinds = {row["kind"]: row["job_id"] for row in pending}
    # Erasure asked while a removal waits: that removal erases. Had a worker taken it
    # meanwhile (with the data it had), the erasure gets a removal of its own, behind it.
    if kind == DELETE and DELETE in kinds and (not erase or await _make_erase(conn, kinds[DELETE])):
        return str(kinds[DELETE])
    if kind != DELETE:
        if DELETE in kinds:
            return str(kinds[DELETE])  # the customer is leaving: nothing to deploy
        if DEPLOY in kinds:
            return str(kinds[DEPLOY])  # it will run with the newest license anyway
    job_id = job_id_for(customer_id, at)
    while await conn.fetchval("SELECT 1 FROM queue_jobs WHERE job_id = $1", job_id):
        at += timedelta(milliseconds=1)
        job_id = job_id_for(customer_id, at)
    # A new delete makes pending deploys and updates pointless; a new deploy or update
    # replaces a pending update.
    replaced = [row["job_id"] for row in pending if row["kind"] in (DEPLOY, UPDATE)]
    for old in replaced:
        await conn.execute(
            "UPDATE queue_jobs SET state = 'superseded', superseded_by = $2, finished_on = $3 "
            "WHERE job_id = $1",
            old,
            job_id,
            at,
        )
        await _record(
            conn,
            DeploymentSuperseded(customer_id=customer_id, job_id=old, superseded_by=job_id),
            customer_id,
            f"{old}:superseded",
            causation,
        )
    priority = priority_of(kind, plan)
    data: dict[str, Any] = {"plan": plan, "license_id": license_id, "requested_by": requested_by}
    if erase and kind == DELETE:
        data["erase"] = True
    await conn.execute(
        "INSERT INTO queue_jobs (job_id, customer_id, kind, priority, state, data, max_attempts, "
        "created_at, run_after) "
        "VALUES ($1, $2, $3, $4, 'waiting', $5::jsonb, $6, $7, clock_timestamp())",
        job_id,
        customer_id,
        kind,
        priority,
        json.dumps(data),
        max_attempts,
        at,
    )
    await _record(
        conn,
        DeploymentRequested(
            customer_id=customer_id,
            job_id=job_id,
            kind=kind,
            plan=plan,  # type: ignore[arg-type]
            priority=priority,
            license_id=license_id,
            requested_by=requested_by,
            erase=bool(data.get("erase")),
        ),
        customer_id,
        f"{job_id}:requested",
        causation,
    )
    return job_id


# --- capacity -----------------------------------------------------------------------------------

# The customer of job ``j`` has an instance running (as the last finished job left it).
_HAS_INSTANCE = (
    "EXISTS (SELECT 1 FROM customer_instances i "
    "WHERE i.customer_id = j.customer_id AND i.state = 'running')"
)
# Job ``j`` would start an instance for a customer who has none: what capacity holds back.
_NEEDS_ROOM = f"(j.kind <> '{DELETE}' AND NOT {_HAS_INSTANCE})"


async def instances_held(conn: asyncpg.Connection) -> int:
    """Instances running, plus those being started (an active job of a customer with none)."""
    held: int = await conn.fetchval(
        "SELECT (SELECT count(*) FROM customer_instances WHERE state = 'running') + "
        "(SELECT count(DISTINCT j.customer_id) FROM queue_jobs j "
        f"WHERE j.state = 'active' AND {_NEEDS_ROOM})"
    )
    return held


async def waiting_for_capacity(conn: asyncpg.Connection) -> int:
    """Jobs waiting, or noted waiting, for room for another instance."""
    count: int = await conn.fetchval(
        "SELECT count(*) FROM queue_jobs WHERE state = ANY($1) "
        "AND waiting_for_capacity_since IS NOT NULL",
        list(PENDING),
    )
    return count


async def _note_waiting_for_capacity(
    conn: asyncpg.Connection, now: datetime, running: int, capacity: int
) -> None:
    """Record, once per attempt, each runnable job the full platform holds back (not one
    that waits for its customer's active job: that one may start the instance it needs)."""
    rows = await conn.fetch(
        "UPDATE queue_jobs j SET waiting_for_capacity_since = $1 "
        "WHERE j.state = ANY($2) AND j.run_after <= $1 "
        f"AND j.waiting_for_capacity_since IS NULL AND {_NEEDS_ROOM} "
        "AND NOT EXISTS (SELECT 1 FROM queue_jobs o "
        "WHERE o.customer_id = j.customer_id AND o.state = 'active') "
        "RETURNING job_id, customer_id, generation, attempts",
        now,
        list(PENDING),
    )
    for row in rows:
        await _record(
            conn,
            DeploymentWaitingForCapacity(
                customer_id=row["customer_id"],
                job_id=row["job_id"],
                running=running,
                capacity=capacity,
            ),
            row["customer_id"],
            _event_id(row["job_id"], row["generation"], "waiting-for-capacity", row["attempts"]),
        )


# --- running ------------------------------------------------------------------------------------

# A waiting or delayed job waits while any other job of its customer is active, even one whose
# lease ran out: that one is claimed again first. Of two active jobs (left by an older version)
# only a live lease blocks, so they cannot block each other for ever. While the platform is
# full ($3), a waiting job that needs room for a new instance waits (an active one whose lease
# ran out holds its room already).
_NEXT = f"""
    SELECT * FROM queue_jobs j
    WHERE ((j.state = ANY($2) AND j.run_after <= $1 AND NOT ($3 AND {_NEEDS_ROOM}))
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
    await _lock(conn)
    if await conn.fetchval("SELECT paused FROM queue_control"):
        return None
    while True:
        now = await _clock(conn)
        full = False
        if capacity is not None:
            held = await instances_held(conn)
            full = held >= capacity
            if full:
                await _note_waiting_for_capacity(conn, now, held, capacity)
        running = await conn.fetchval(
            "SELECT count(*) FROM queue_jobs WHERE state = 'active' AND lease_until > $1", now
        )
        if running >= concurrency:
            return None
        row = await conn.fetchrow(_NEXT, now, list(PENDING), full)
        if row is None:
            return None
        if row["state"] == "active" and row["attempts"] >= row["max_attempts"]:
            # Its worker died on the last attempt: that attempt failed.
            await _finish_failed(conn, row, now, "the worker running it stopped (lease expired)")
            continue
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
            continue
        await _record(
            conn,
            DeploymentStarted(
                customer_id=row["customer_id"],
                job_id=row["job_id"],
                attempt=attempt,
                backend=backend,
                worker_id=worker_id,
            ),
            row["customer_id"],
            _event_id(row["job_id"], row["generation"], "started", attempt),
        )
        return Claimed(
            job_id=row["job_id"],
            customer_id=row["customer_id"],
            kind=row["kind"],
            attempt=attempt,
            max_attempts=row["max_attempts"],
            data=json.loads(row["data"]),
            generation=row["generation"],
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
    await _record(
        conn,
        DeploymentProgressed(
            customer_id=job.customer_id, job_id=job.job_id, progress=progress, step=step
        ),
        job.customer_id,
        _event_id(job.job_id, job.generation, "progress", job.attempt, progress, step),
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
    await _record(
        conn,
        DeploymentSucceeded(
            customer_id=job.customer_id,
            job_id=job.job_id,
            backend=backend,
            instance_url=instance_url,
            components=components,
        ),
        job.customer_id,
        _event_id(job.job_id, job.generation, "succeeded"),
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
    next_at = now + retry_delay * (2 ** (job.attempt - 1))
    await conn.execute(
        "UPDATE queue_jobs SET state = 'delayed', run_after = $2, failed_reason = $3, "
        f"lease_owner = NULL, lease_until = NULL, attempt_log = {_closed_log('$4')} "
        "WHERE job_id = $1",
        job.job_id,
        next_at,
        error,
        json.dumps({"finished_at": now.isoformat(), "outcome": "failed", "error": error}),
    )
    await _record(
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
        _event_id(job.job_id, job.generation, "failed", job.attempt),
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
    await _record(
        conn,
        DeploymentFailed(
            customer_id=row["customer_id"],
            job_id=row["job_id"],
            attempt=max(1, row["attempts"]),
            error=error,
            will_retry=False,
        ),
        row["customer_id"],
        _event_id(row["job_id"], row["generation"], "failed", row["attempts"]),
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


# --- operators ----------------------------------------------------------------------------------


class JobNotFound(LookupError):
    """No job with that id."""


class JobNotRetryable(ValueError):
    """Only failed jobs go back on the queue."""


async def retry_job(conn: asyncpg.Connection, job_id: str, requested_by: str) -> None:
    """A failed job gets a fresh set of attempts, in a new generation."""
    await _lock(conn)
    row = await conn.fetchrow("SELECT * FROM queue_jobs WHERE job_id = $1 FOR UPDATE", job_id)
    if row is None:
        raise JobNotFound(job_id)
    if row["state"] != "failed":
        raise JobNotRetryable(f"job {job_id} is {row['state']}; only failed jobs are retried")
    # A later job of the customer decided what their instance should be now (a later deploy,
    # update or delete): running this one again would undo it, or queue a second job.
    newer = await conn.fetchval(
        "SELECT job_id FROM queue_jobs WHERE customer_id = $1 AND job_id <> $2 "
        "AND (created_at, job_id) > ($3, $2) AND state <> 'superseded' "
        "ORDER BY created_at DESC LIMIT 1",
        row["customer_id"],
        job_id,
        row["created_at"],
    )
    if newer is not None:
        raise JobNotRetryable(
            f"job {job_id} was overtaken by the customer's later job {newer}; retry that one"
        )
    generation = row["generation"] + 1
    await conn.execute(
        "UPDATE queue_jobs SET state = 'waiting', attempts = 0, generation = $2, "
        "run_after = clock_timestamp(), finished_on = NULL, failed_reason = NULL, progress = 0, "
        "step = NULL WHERE job_id = $1",
        job_id,
        generation,
    )
    await _record(
        conn,
        DeploymentRetried(customer_id=row["customer_id"], job_id=job_id, requested_by=requested_by),
        row["customer_id"],
        _event_id(job_id, generation, "retried"),
    )


async def clean_jobs(
    conn: asyncpg.Connection, state: str, older_than: datetime, removed_by: str, limit: int = 1000
) -> int:
    """Remove finished jobs in ``state`` that finished before ``older_than``; how many."""
    rows = await conn.fetch(
        "DELETE FROM queue_jobs WHERE job_id IN (SELECT job_id FROM queue_jobs "
        "WHERE state = $1 AND finished_on < $2 ORDER BY finished_on LIMIT $3) "
        "RETURNING job_id, customer_id",
        state,
        older_than,
        limit,
    )
    for row in rows:
        await _record(
            conn,
            DeploymentJobRemoved(
                customer_id=row["customer_id"], job_id=row["job_id"], removed_by=removed_by
            ),
            row["customer_id"],
            f"{row['job_id']}:removed",
        )
    return len(rows)


async def set_paused(conn: asyncpg.Connection, paused: bool) -> None:
    """Pause (no new claims; running jobs finish) or resume the queue, for every replica."""
    await conn.execute("UPDATE queue_control SET paused = $1", paused)


async def queue_stats(conn: asyncpg.Connection) -> dict[str, int]:
    """``{waiting, active, completed, failed, delayed, total}`` as the original queue said."""
    rows = await conn.fetch(
        "SELECT state, count(*) AS n FROM queue_jobs WHERE state <> 'superseded' GROUP BY state"
    )
    counts = {state: 0 for state in STATES}
    for row in rows:
        counts[row["state"]] = row["n"]
    counts["total"] = sum(counts[s] for s in STATES)
    return counts
