"""The queue's jobs as the HTTP API and the admin page show them, the reads both make, and the
one way either retries a job: shared by both, so neither imports the other."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import asyncpg

from libs.http.errors import Conflict, NotFound
from services.provisioner.queue import JobNotFound, JobNotRetryable, queue_stats, retry_job
from services.provisioner.queue_rules import PENDING


def _ms(value: datetime | None) -> int | None:
    return int(value.timestamp() * 1000) if value is not None else None


def job_view(row: asyncpg.Record) -> dict[str, Any]:
    """A job as the original queue API showed it, plus our priority, step and attempt log."""
    return {
        "id": row["job_id"],
        "name": row["kind"],
        "state": row["state"],
        "progress": row["progress"],
        "step": row["step"],
        "priority": row["priority"],
        "attempts": row["attempts"],
        "maxAttempts": row["max_attempts"],
        "timestamp": _ms(row["created_at"]),
        "processedOn": _ms(row["processed_on"]),
        "finishedOn": _ms(row["finished_on"]),
        "failedReason": row["failed_reason"],
        "supersededBy": row["superseded_by"],
        # A deploy held while the platform runs all the instances it can hold.
        "waitingFor": "capacity"
        if row["waiting_for_capacity_since"] is not None and row["state"] in PENDING
        else None,
        "data": {"customerId": row["customer_id"], **json.loads(row["data"])},
        "attemptsLog": json.loads(row["attempt_log"]),
    }


async def find_job(conn: asyncpg.Connection, job_id: str) -> asyncpg.Record:
    """The job's row, or 404."""
    row = await conn.fetchrow("SELECT * FROM queue_jobs WHERE job_id = $1", job_id)
    if row is None:
        raise NotFound(f"no job {job_id}")
    return row


async def retry_or_refuse(conn: asyncpg.Connection, job_id: str, by: str) -> None:
    """Retry a failed job; 404 for no such job, 409 for one that has not failed."""
    try:
        await retry_job(conn, job_id, by)
    except JobNotFound:
        raise NotFound(f"no job {job_id}") from None
    except JobNotRetryable as exc:
        raise Conflict(str(exc)) from None


async def jobs_of_customer(conn: asyncpg.Connection, customer_id: str) -> list[asyncpg.Record]:
    """The customer's last 100 jobs, newest first."""
    rows: list[asyncpg.Record] = await conn.fetch(
        "SELECT * FROM queue_jobs WHERE customer_id = $1 ORDER BY created_at DESC LIMIT 100",
        customer_id,
    )
    return rows


async def jobs_in_state(conn: asyncpg.Connection, state: str) -> list[asyncpg.Record]:
    """The first 200 jobs in ``state``, in the order they would run."""
    rows: list[asyncpg.Record] = await conn.fetch(
        "SELECT * FROM queue_jobs WHERE state = $1 ORDER BY priority, created_at LIMIT 200",
        state,
    )
    return rows


async def counts_and_pause(conn: asyncpg.Connection) -> tuple[dict[str, int], bool]:
    """How many jobs are in each state (superseded ones too), and whether the queue is
    paused."""
    counts = await queue_stats(conn)
    counts["superseded"] = await conn.fetchval(
        "SELECT count(*) FROM queue_jobs WHERE state = 'superseded'"
    )
    paused = bool(await conn.fetchval("SELECT paused FROM queue_control"))
    return counts, paused
