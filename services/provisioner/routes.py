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
from litestar.params import FromPath, FromQuery, JSONBody
from litestar.types import ControllerRouterHandler

from libs.http.auth import SessionTokens, admin_guard
from libs.http.errors import Conflict, InvalidRequest, NotFound
from libs.runtime.outbox import OutboxRelay
from libs.runtime.service import ServiceRuntime
from services.provisioner.admin_page import admin_page_routes
from services.provisioner.backends.base import Backend, BackendError
from services.provisioner.health import HEALTH_WATCH
from services.provisioner.jobs_view import find_job, job_view, retry_or_refuse
from services.provisioner.queue import (
    DELETE,
    DEPLOY,
    FINISHED,
    PENDING,
    clean_jobs,
    enqueue,
    queue_stats,
    set_paused,
)
from services.provisioner.settings import ProvisionerSettings
from services.provisioner.worker import QueueWorker

BODY_LIMIT = 4 * 1024
# Older than any job can be, and far from where "now minus grace" leaves the calendar.
MAX_GRACE_SECONDS = 10 * 365 * 86400


async def backend_view(
    backend: Backend | None, backend_name: str, customer_id: str
) -> dict[str, object]:
    """The backend's own view of the customer's instance, or why there is none: this process
    does not run the backend (``backend`` None: ``PROVISIONER_WORKER=false``), or the backend
    cannot tell now. The rest of the status comes from the projections either way."""
    if backend is None:
        return {
            "name": backend_name,
            "release": None,
            "components": {},
            "unavailable": "this provisioner does not run the backend (PROVISIONER_WORKER=false);"
            " the instance's state and health are the worker's, from the log",
        }
    try:
        return {"name": backend.name, **await backend.status(customer_id)}
    except BackendError as exc:
        return {"name": backend.name, "release": None, "components": {}, "unavailable": str(exc)}


def provisioner_routes(
    runtime: ServiceRuntime,
    backend: Backend | None,
    relay: OutboxRelay,
    worker: QueueWorker | None,
) -> list[ControllerRouterHandler]:
    """``/api/queue/...`` and ``/api/customers/{id}/deploy|deployment``, and ``/admin/queues``.

    ``backend`` and ``worker`` are None in a process that does not apply (``PROVISIONER_WORKER``
    false): jobs are queued here and run by a worker elsewhere."""
    settings = runtime.settings_as(ProvisionerSettings)
    sessions = SessionTokens(settings.session_secret, settings.session_ttl_seconds)

    async def changed() -> None:
        relay.wake()
        if worker is not None:
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
    async def remove(customer_id: FromPath[str], erase: FromQuery[bool] = False) -> dict[str, Any]:
        """Queue the removal of the customer's instance: its data kept for the grace period
        (Kubernetes), or erased at once with ``?erase=true``."""
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
                erase=erase,
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
            deciding = await conn.fetchrow(
                "SELECT * FROM queue_jobs WHERE customer_id = $1 AND state <> 'superseded' "
                "ORDER BY created_at DESC LIMIT 1",
                customer_id,
            )
            releases = await conn.fetchrow(
                "SELECT count(*) AS revisions, max(finished_on) AS last FROM queue_jobs "
                "WHERE customer_id = $1 AND state = 'completed' AND kind <> $2",
                customer_id,
                DELETE,
            )
            health = await conn.fetchrow(
                "SELECT state, reason, degraded_since FROM instance_health WHERE customer_id = $1",
                customer_id,
            )
        if license_row is None and instance is None and latest is None:
            raise NotFound(f"no deployment for customer {customer_id}")
        view = await backend_view(backend, settings.provisioner_backend, customer_id)
        degraded = health is not None and health["state"] == "degraded"
        running = instance is not None and instance["state"] == "running"
        deployed_at = releases["last"] or (instance["updated_at"] if running else None)
        return {
            "customer": {
                **(dict(license_row) if license_row else {"customer_id": customer_id}),
                # The original design's fields.
                "customerId": customer_id,
                "deploymentStatus": deployment_state(instance, deciding, degraded),
                "instanceUrl": instance["instance_url"] if running else None,
                "deployedAt": deployed_at,
            },
            "instance": dict(instance) if instance else None,
            "backend": view,
            "latestJob": job_view(latest) if latest else None,
            "health": dict(health) if health else None,
            # The backend's release: its state, how many times it was (re)deployed, when last.
            "release": {
                "name": view["name"],
                "status": view.get("release"),
                "version": releases["revisions"],
                "lastDeployed": releases["last"],
            },
            "components": component_list(view.get("components")),
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


def deployment_state(
    instance: asyncpg.Record | None, job: asyncpg.Record | None, degraded: bool
) -> str:
    """The customer's deployment in the original design's words: ``pending``, ``deploying``,
    ``recovering`` (the health watch's redeploy), ``removing``, ``deployed``, ``degraded``,
    ``failed`` or ``removed``. ``job`` is the customer's newest job that was not superseded."""
    if job is not None and job["state"] in (*PENDING, "active"):
        if json.loads(job["data"]).get("requested_by") == HEALTH_WATCH:
            return "recovering"
        if job["kind"] == DELETE:
            return "removing"
        return "deploying" if job["state"] == "active" else "pending"
    if instance is not None and instance["state"] == "removed":
        return "removed"
    if job is not None and job["state"] == "failed":
        return "failed"
    if instance is not None and instance["state"] == "running":
        return "degraded" if degraded else "deployed"
    return "pending"


def component_list(components: object) -> list[dict[str, Any]]:
    """The backend's components (name to state) as the original design listed them."""
    if not isinstance(components, dict):
        return []
    return [
        {"name": str(name), "status": str(state), "ready": state == "ready"}
        for name, state in components.items()
    ]


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
