"""The queue and deployment API, with the original design's paths and shapes.

Admin credential for everything, except a customer's own job list (their session token).
Times in job views are epoch milliseconds, as the original (Bull) answered them.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from litestar import Request, Router, delete, get, post
from litestar.params import FromPath, JSONBody
from litestar.types import ControllerRouterHandler

from libs.auth import SessionTokens, admin_guard
from libs.http import Conflict, InvalidRequest, NotFound
from libs.outbox import OutboxRelay
from libs.runtime import ServiceRuntime
from services.provisioner.admin_page import admin_page_routes
from services.provisioner.backends.base import Backend
from services.provisioner.queue import (
    DELETE,
    DEPLOY,
    FINISHED,
    PENDING,
    JobNotFound,
    JobNotRetryable,
    clean_jobs,
    enqueue,
    queue_stats,
    retry_job,
    set_paused,
)
from services.provisioner.settings import ProvisionerSettings
from services.provisioner.worker import QueueWorker

BODY_LIMIT = 4 * 1024
# Older than any job can be, and far from where "now minus grace" leaves the calendar.
MAX_GRACE_SECONDS = 10 * 365 * 86400


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


def provisioner_routes(
    runtime: ServiceRuntime, backend: Backend, relay: OutboxRelay, worker: QueueWorker
) -> list[ControllerRouterHandler]:
    """``/api/queue/...`` and ``/api/customers/{id}/deploy|deployment``, and ``/admin/queues``."""
    settings = runtime.settings_as(ProvisionerSettings)
    sessions = SessionTokens(settings.session_secret, settings.session_ttl_seconds)

    async def changed() -> None:
        relay.wake()
        worker.wake()

    @get("/api/queue/stats")
    async def stats() -> dict[str, int]:
        """How many jobs are in each state."""
        async with runtime.db().acquire() as conn:
            return await queue_stats(conn)

    @get("/api/queue/jobs/{job_id:str}")
    async def job(job_id: FromPath[str]) -> dict[str, Any]:
        """One job, with its attempts and errors."""
        async with runtime.db().acquire() as conn:
            return job_view(await find_job(conn, job_id))

    @post("/api/queue/jobs/{job_id:str}/retry", status_code=200)
    async def retry(job_id: FromPath[str]) -> dict[str, Any]:
        """Run a failed job again, with a fresh set of attempts."""
        async with runtime.db().acquire() as conn, conn.transaction():
            await retry_or_refuse(conn, job_id, "admin")
            row = await find_job(conn, job_id)
        await changed()
        return job_view(row)

    @post("/api/queue/pause", status_code=200)
    async def pause() -> dict[str, bool]:
        """No new jobs start (on any replica); running ones finish."""
        async with runtime.db().acquire() as conn:
            await set_paused(conn, True)
        return {"paused": True}

    @post("/api/queue/resume", status_code=200)
    async def resume() -> dict[str, bool]:
        """Jobs start again."""
        async with runtime.db().acquire() as conn:
            await set_paused(conn, False)
        await changed()
        return {"paused": False}

    @post("/api/queue/clean", status_code=200, request_max_body_size=BODY_LIMIT)
    async def clean(data: JSONBody[dict[str, Any]]) -> dict[str, int]:
        """Remove finished jobs (``state``: completed, failed or superseded) older than
        ``grace_seconds`` from the queue; their events stay on the log."""
        state, grace = _parse_clean(data)
        async with runtime.db().acquire() as conn, conn.transaction():
            removed = await clean_jobs(
                conn, state, datetime.now(UTC) - timedelta(seconds=grace), "admin"
            )
        await changed()
        return {"removed": removed}

    @post("/api/customers/{customer_id:str}/deploy", status_code=202)
    async def deploy(customer_id: FromPath[str]) -> dict[str, Any]:
        """Queue a deployment of the customer's instance with their current license."""
        async with runtime.db().acquire() as conn, conn.transaction():
            license_row = await conn.fetchrow(
                "SELECT * FROM customer_licenses WHERE customer_id = $1", customer_id
            )
            if license_row is None:
                raise NotFound(f"no license has been issued to customer {customer_id}")
            if license_row["closed"]:
                raise Conflict("the customer's account is closed")
            job_id = await enqueue(
                conn,
                customer_id=customer_id,
                kind=DEPLOY,
                plan=license_row["plan"],
                license_id=license_row["license_id"],
                requested_by="admin",
                at=datetime.now(UTC),
                max_attempts=settings.queue_max_retries,
            )
            row = await find_job(conn, job_id)
        await changed()
        return job_view(row)

    @delete("/api/customers/{customer_id:str}/deployment", status_code=202)
    async def remove(customer_id: FromPath[str]) -> dict[str, Any]:
        """Queue the removal of everything the customer's instance has."""
        async with runtime.db().acquire() as conn, conn.transaction():
            known = await conn.fetchval(
                "SELECT 1 FROM customer_licenses WHERE customer_id = $1 UNION ALL "
                "SELECT 1 FROM customer_instances WHERE customer_id = $1 LIMIT 1",
                customer_id,
            )
            if not known:
                raise NotFound(f"no deployment for customer {customer_id}")
            job_id = await enqueue(
                conn,
                customer_id=customer_id,
                kind=DELETE,
                plan=None,
                license_id=None,
                requested_by="admin",
                at=datetime.now(UTC),
                max_attempts=settings.queue_max_retries,
            )
            row = await find_job(conn, job_id)
        await changed()
        return job_view(row)

    @get("/api/customers/{customer_id:str}/deployment/status")
    async def deployment_status(customer_id: FromPath[str]) -> dict[str, Any]:
        """The customer record, the backend's release state and each component's state."""
        async with runtime.db().acquire() as conn:
            license_row = await conn.fetchrow(
                "SELECT customer_id, license_id, plan, closed FROM customer_licenses "
                "WHERE customer_id = $1",
                customer_id,
            )
            instance = await conn.fetchrow(
                "SELECT state, instance_url, backend, updated_at FROM customer_instances "
                "WHERE customer_id = $1",
                customer_id,
            )
            latest = await conn.fetchrow(
                "SELECT * FROM queue_jobs WHERE customer_id = $1 ORDER BY created_at DESC LIMIT 1",
                customer_id,
            )
        if license_row is None and instance is None and latest is None:
            raise NotFound(f"no deployment for customer {customer_id}")
        return {
            "customer": dict(license_row) if license_row else {"customer_id": customer_id},
            "instance": dict(instance) if instance else None,
            "backend": {"name": backend.name, **await backend.status(customer_id)},
            "latestJob": job_view(latest) if latest else None,
        }

    admin = Router(
        path="/",
        route_handlers=[stats, job, retry, pause, resume, clean, deploy, remove, deployment_status],
        guards=[admin_guard(settings.admin_token)],
        tags=["queue"],
    )

    @get("/api/queue/customer/{customer_id:str}/jobs", tags=["queue"])
    async def customer_jobs(
        customer_id: FromPath[str], request: Request[Any, Any, Any]
    ) -> dict[str, Any]:
        """The customer's jobs, newest first (an admin, or the customer's own session)."""
        if not sessions.caller(request, settings.admin_token).may_see(customer_id):
            raise NotFound(f"no jobs for customer {customer_id}")
        async with runtime.db().acquire() as conn:
            rows = await conn.fetch(
                "SELECT * FROM queue_jobs WHERE customer_id = $1 ORDER BY created_at DESC "
                "LIMIT 100",
                customer_id,
            )
        return {"customerId": customer_id, "jobs": [job_view(r) for r in rows]}

    return [admin, customer_jobs, *admin_page_routes(runtime, settings, changed)]


def _parse_clean(data: dict[str, Any]) -> tuple[str, float]:
    fields = [
        {"field": str(k)[:64], "reason": "is not a known field"}
        for k in sorted(set(data) - {"state", "grace_seconds"}, key=str)
    ]
    state = data.get("state", "completed")
    if state not in FINISHED:
        fields.append({"field": "state", "reason": f"must be one of {', '.join(FINISHED)}"})
    grace = data.get("grace_seconds", 0)
    if (
        not isinstance(grace, int | float)
        or isinstance(grace, bool)
        or not 0 <= grace <= MAX_GRACE_SECONDS
    ):
        fields.append(
            {
                "field": "grace_seconds",
                "reason": f"must be a number of seconds from 0 to {MAX_GRACE_SECONDS} (ten years)",
            }
        )
    if fields:
        raise InvalidRequest("invalid request", fields=fields)
    return str(state), float(grace)
