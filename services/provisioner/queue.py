"""The deployment queue: jobs, priorities, leases, retries with backoff, collapsing.

Every function here and in ``leases.py`` runs inside the caller's Postgres transaction and
records each change of a job as an event in the outbox, in that same transaction: the queue
(private state, like the leases) and the log always agree, and the ``deployments`` read model
follows from the log. This module queues jobs and serves operators; ``leases.py`` is the
workers' side (claims, leases, outcomes); the rules both apply are pure functions in
``queue_rules.py``.

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
import logging
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import msgspec

from contracts import (
    Cause,
    DeploymentJobRemoved,
    DeploymentRequested,
    DeploymentRetried,
    DeploymentSuperseded,
    DeploymentWaitingForCapacity,
    Envelope,
    Event,
)
from libs.runtime.outbox import add_to_outbox
from services.provisioner.queue_rules import (
    DELETE,
    PENDING,
    STATES,
    Kind,
    collapse,
    job_event_id,
    job_id_for,
    priority_of,
    retry_refusal,
)

log = logging.getLogger(__name__)

QUEUE_LOCK = "provisioner:queue"


async def record_job_event(
    conn: asyncpg.Connection,
    event: Event,
    customer_id: str,
    event_id: str,
    causation: Envelope | Cause | None = None,
) -> Envelope:
    """Put a change of a job in the outbox, in the caller's transaction; its envelope.

    ``causation`` is the job's cause (``job_cause``) for every change of a job after its
    request: the event then names the request as its cause and shares its correlation id."""
    return await add_to_outbox(
        conn, event, customer_id=customer_id, causation=causation, event_id=event_id
    )


def encode_cause(cause: Cause) -> str:
    """A cause as the ``queue_jobs.cause`` column stores it."""
    return msgspec.json.encode(cause).decode()


def job_cause(stored: str | None) -> Cause | None:
    """The cause ``queue_jobs.cause`` holds; None for a job queued before causes were kept,
    or one whose cause does not read (the job runs without it rather than stop the queue)."""
    if stored is None:
        return None
    try:
        return msgspec.json.decode(stored, type=Cause)
    except msgspec.DecodeError as exc:
        log.warning("a job's cause does not read, so it is left out: %s", exc)
        return None


async def lock_queue(conn: asyncpg.Connection) -> None:
    """Hold the queue's lock until the transaction ends: enqueueing, claiming and retrying
    wait for it, so what the caller reads of the queue stays true until it commits."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", QUEUE_LOCK)


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
    causation: Envelope | Cause | None = None,
    erase: bool = False,
) -> str:
    """Queue a job unless a pending one covers it (``queue_rules.collapse``); returns the id of
    the job that will run. ``erase`` (removals only): the data goes at once, not after the
    grace period; a pending removal that would keep it is made to erase."""
    await lock_queue(conn)
    pending = await conn.fetch(
        "SELECT job_id, kind FROM queue_jobs WHERE customer_id = $1 AND state = ANY($2) "
        "ORDER BY created_at",
        customer_id,
        list(PENDING),
    )
    rule = collapse(kind, erase, [(row["job_id"], row["kind"]) for row in pending])
    # Had a worker taken the removal meanwhile (with the data it had), the erasure gets a
    # removal of its own, behind it.
    if rule.covered_by is not None and (
        not rule.only_if_it_erases or await _make_erase(conn, rule.covered_by)
    ):
        return rule.covered_by
    job_id = await _free_job_id(conn, customer_id, at)
    for old in rule.supersedes:
        await _supersede(conn, old, job_id, customer_id, at, causation)
    data: dict[str, Any] = {"plan": plan, "license_id": license_id, "requested_by": requested_by}
    if erase and kind == DELETE:
        data["erase"] = True
    await _insert_job(conn, job_id, customer_id, kind, data, max_attempts, at, causation)
    return job_id


async def _free_job_id(conn: asyncpg.Connection, customer_id: str, at: datetime) -> str:
    """The job id for ``at``, a millisecond later for each id already taken."""
    job_id = job_id_for(customer_id, at)
    while await conn.fetchval("SELECT 1 FROM queue_jobs WHERE job_id = $1", job_id):
        at += timedelta(milliseconds=1)
        job_id = job_id_for(customer_id, at)
    return job_id


async def _supersede(
    conn: asyncpg.Connection,
    old: str,
    job_id: str,
    customer_id: str,
    at: datetime,
    causation: Envelope | Cause | None,
) -> None:
    stored = await conn.fetchval(
        "UPDATE queue_jobs SET state = 'superseded', superseded_by = $2, finished_on = $3 "
        "WHERE job_id = $1 RETURNING cause",
        old,
        job_id,
        at,
    )
    # A change of the old job, so caused by its request like its other changes; it is
    # recorded in the trace of what superseded it (the span recording it).
    await record_job_event(
        conn,
        DeploymentSuperseded(customer_id=customer_id, job_id=old, superseded_by=job_id),
        customer_id,
        f"{old}:superseded",
        job_cause(stored) or causation,
    )


async def _insert_job(
    conn: asyncpg.Connection,
    job_id: str,
    customer_id: str,
    kind: Kind,
    data: dict[str, Any],
    max_attempts: int,
    at: datetime,
    causation: Envelope | Cause | None,
) -> None:
    priority = priority_of(kind, data["plan"])
    requested = await record_job_event(
        conn,
        DeploymentRequested(
            customer_id=customer_id,
            job_id=job_id,
            kind=kind,
            plan=data["plan"],
            priority=priority,
            license_id=data["license_id"],
            requested_by=data["requested_by"],
            erase=bool(data.get("erase")),
        ),
        customer_id,
        f"{job_id}:requested",
        causation,
    )
    # The request is what every later change of the job was caused by.
    await conn.execute(
        "INSERT INTO queue_jobs (job_id, customer_id, kind, priority, state, data, max_attempts, "
        "created_at, run_after, cause) "
        "VALUES ($1, $2, $3, $4, 'waiting', $5::jsonb, $6, $7, clock_timestamp(), $8::jsonb)",
        job_id,
        customer_id,
        kind,
        priority,
        json.dumps(data),
        max_attempts,
        at,
        encode_cause(Cause.of(requested)),
    )


# --- capacity -----------------------------------------------------------------------------------

# The customer of job ``j`` has an instance running (as the last finished job left it).
_HAS_INSTANCE = (
    "EXISTS (SELECT 1 FROM customer_instances i "
    "WHERE i.customer_id = j.customer_id AND i.state = 'running')"
)
# Job ``j`` would start an instance for a customer who has none: what capacity holds back.
NEEDS_ROOM = f"(j.kind <> '{DELETE}' AND NOT {_HAS_INSTANCE})"


async def instances_held(conn: asyncpg.Connection) -> int:
    """Instances running, plus those being started (an active job of a customer with none)."""
    held: int = await conn.fetchval(
        "SELECT (SELECT count(*) FROM customer_instances WHERE state = 'running') + "
        "(SELECT count(DISTINCT j.customer_id) FROM queue_jobs j "
        f"WHERE j.state = 'active' AND {NEEDS_ROOM})"
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


async def note_waiting_for_capacity(
    conn: asyncpg.Connection, now: datetime, running: int, capacity: int
) -> None:
    """Record, once per attempt, each runnable job the full platform holds back (not one
    that waits for its customer's active job: that one may start the instance it needs)."""
    rows = await conn.fetch(
        "UPDATE queue_jobs j SET waiting_for_capacity_since = $1 "
        "WHERE j.state = ANY($2) AND j.run_after <= $1 "
        f"AND j.waiting_for_capacity_since IS NULL AND {NEEDS_ROOM} "
        "AND NOT EXISTS (SELECT 1 FROM queue_jobs o "
        "WHERE o.customer_id = j.customer_id AND o.state = 'active') "
        "RETURNING job_id, customer_id, generation, attempts, cause",
        now,
        list(PENDING),
    )
    for row in rows:
        await record_job_event(
            conn,
            DeploymentWaitingForCapacity(
                customer_id=row["customer_id"],
                job_id=row["job_id"],
                running=running,
                capacity=capacity,
            ),
            row["customer_id"],
            job_event_id(row["job_id"], row["generation"], "waiting-for-capacity", row["attempts"]),
            job_cause(row["cause"]),
        )


# --- operators ----------------------------------------------------------------------------------


class JobNotFound(LookupError):
    """No job with that id."""


class JobNotRetryable(ValueError):
    """Only failed jobs go back on the queue."""


async def retry_job(conn: asyncpg.Connection, job_id: str, requested_by: str) -> None:
    """A failed job gets a fresh set of attempts, in a new generation
    (``queue_rules.retry_refusal`` says which may not).

    The retry becomes the job's cause: its attempts from now on continue the trace of the
    operator's request (the span recording the retry), and their events name the
    ``DeploymentRetried``, which names the job's first cause."""
    await lock_queue(conn)
    row = await conn.fetchrow("SELECT * FROM queue_jobs WHERE job_id = $1 FOR UPDATE", job_id)
    if row is None:
        raise JobNotFound(job_id)
    newer = await conn.fetchval(
        "SELECT job_id FROM queue_jobs WHERE customer_id = $1 AND job_id <> $2 "
        "AND (created_at, job_id) > ($3, $2) AND state <> 'superseded' "
        "ORDER BY created_at DESC LIMIT 1",
        row["customer_id"],
        job_id,
        row["created_at"],
    )
    refusal = retry_refusal(job_id, row["state"], newer)
    if refusal is not None:
        raise JobNotRetryable(refusal)
    generation = row["generation"] + 1
    retried = await record_job_event(
        conn,
        DeploymentRetried(customer_id=row["customer_id"], job_id=job_id, requested_by=requested_by),
        row["customer_id"],
        job_event_id(job_id, generation, "retried"),
        job_cause(row["cause"]),
    )
    await conn.execute(
        "UPDATE queue_jobs SET state = 'waiting', attempts = 0, generation = $2, "
        "run_after = clock_timestamp(), finished_on = NULL, failed_reason = NULL, progress = 0, "
        "step = NULL, cause = $3::jsonb WHERE job_id = $1",
        job_id,
        generation,
        encode_cause(Cause.of(retried)),
    )


async def clean_jobs(
    conn: asyncpg.Connection, state: str, older_than: datetime, removed_by: str, limit: int = 1000
) -> int:
    """Remove finished jobs in ``state`` that finished before ``older_than``; how many."""
    rows = await conn.fetch(
        "DELETE FROM queue_jobs WHERE job_id IN (SELECT job_id FROM queue_jobs "
        "WHERE state = $1 AND finished_on < $2 ORDER BY finished_on LIMIT $3) "
        "RETURNING job_id, customer_id, cause",
        state,
        older_than,
        limit,
    )
    for row in rows:
        await record_job_event(
            conn,
            DeploymentJobRemoved(
                customer_id=row["customer_id"], job_id=row["job_id"], removed_by=removed_by
            ),
            row["customer_id"],
            f"{row['job_id']}:removed",
            job_cause(row["cause"]),
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
