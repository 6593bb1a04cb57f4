"""The queue and deployment API, with the original design's paths and shapes.

Admin credential for everything, except a customer's own job list (their session token).
Times in job views are epoch milliseconds, as the original (Bull) answered them. The handlers
only translate: what they run is in ``deployments.py``, ``jobs_view.py`` and ``queue.py``, and
what they work with (``Provisioning``) is injected by the router ``provisioner_routes`` builds.
"""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, Router, delete, get, post
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, FromQuery, JSONBody
from litestar.types import ControllerRouterHandler

from libs.http.auth import SessionTokens, admin_guard
from libs.http.errors import NotFound
from libs.runtime.outbox import OutboxRelay
from libs.runtime.service import ServiceRuntime
from services.provisioner.admin_page import admin_page_router
from services.provisioner.backends.base import Backend
from services.provisioner.deployments import (
    Provisioning,
    backend_view,
    clean_before,
    deployment_facts,
    deployment_status,
    parse_clean,
    queue_deployment,
    queue_removal,
)
from services.provisioner.jobs_view import find_job, job_view, jobs_of_customer, retry_or_refuse
from services.provisioner.queue import clean_jobs, queue_stats, set_paused
from services.provisioner.settings import ProvisionerSettings
from services.provisioner.worker import QueueWorker

BODY_LIMIT = 4 * 1024


class QueueController(Controller):
    """``/api/queue/...``: the queue's counts, its jobs, retries, pause and clean."""

    path = "/api/queue"

    @get("/stats")
    async def stats(self, provisioning: NamedDependency[Provisioning]) -> dict[str, int]:
        """How many jobs are in each state."""
        async with provisioning.db().acquire() as conn:
            return await queue_stats(conn)

    @get("/jobs/{job_id:str}")
    async def job(
        self, job_id: FromPath[str], provisioning: NamedDependency[Provisioning]
    ) -> dict[str, Any]:
        """One job, with its attempts and errors."""
        async with provisioning.db().acquire() as conn:
            return job_view(await find_job(conn, job_id))

    @post("/jobs/{job_id:str}/retry", status_code=200)
    async def retry(
        self, job_id: FromPath[str], provisioning: NamedDependency[Provisioning]
    ) -> dict[str, Any]:
        """Run a failed job again, with a fresh set of attempts."""
        async with provisioning.db().acquire() as conn, conn.transaction():
            await retry_or_refuse(conn, job_id, "admin")
            row = await find_job(conn, job_id)
        provisioning.wake()
        return job_view(row)

    @post("/pause", status_code=200)
    async def pause(self, provisioning: NamedDependency[Provisioning]) -> dict[str, bool]:
        """No new jobs start (on any replica); running ones finish."""
        async with provisioning.db().acquire() as conn:
            await set_paused(conn, True)
        return {"paused": True}

    @post("/resume", status_code=200)
    async def resume(self, provisioning: NamedDependency[Provisioning]) -> dict[str, bool]:
        """Jobs start again."""
        async with provisioning.db().acquire() as conn:
            await set_paused(conn, False)
        provisioning.wake()
        return {"paused": False}

    @post("/clean", status_code=200, request_max_body_size=BODY_LIMIT)
    async def clean(
        self, data: JSONBody[dict[str, Any]], provisioning: NamedDependency[Provisioning]
    ) -> dict[str, int]:
        """Remove finished jobs (``state``: completed, failed or superseded) older than
        ``grace_seconds`` from the queue; their events stay on the log."""
        state, grace = parse_clean(data)
        async with provisioning.db().acquire() as conn, conn.transaction():
            removed = await clean_jobs(conn, state, clean_before(grace), "admin")
        provisioning.wake()
        return {"removed": removed}


class DeploymentController(Controller):
    """``/api/customers/{id}/deploy|deployment``: a customer's instance, queued and shown."""

    path = "/api/customers/{customer_id:str}"

    @post("/deploy", status_code=202)
    async def deploy(
        self, customer_id: FromPath[str], provisioning: NamedDependency[Provisioning]
    ) -> dict[str, Any]:
        """Queue a deployment of the customer's instance with their current license."""
        max_attempts = provisioning.settings.queue_max_retries
        async with provisioning.db().acquire() as conn, conn.transaction():
            job_id = await queue_deployment(conn, customer_id, max_attempts)
            row = await find_job(conn, job_id)
        provisioning.wake()
        return job_view(row)

    @delete("/deployment", status_code=202)
    async def remove(
        self,
        customer_id: FromPath[str],
        provisioning: NamedDependency[Provisioning],
        erase: FromQuery[bool] = False,
    ) -> dict[str, Any]:
        """Queue the removal of the customer's instance: its data kept for the grace period
        (Kubernetes), or erased at once with ``?erase=true``."""
        max_attempts = provisioning.settings.queue_max_retries
        async with provisioning.db().acquire() as conn, conn.transaction():
            job_id = await queue_removal(conn, customer_id, erase, max_attempts)
            row = await find_job(conn, job_id)
        provisioning.wake()
        return job_view(row)

    @get("/deployment/status")
    async def deployment_status(
        self, customer_id: FromPath[str], provisioning: NamedDependency[Provisioning]
    ) -> dict[str, Any]:
        """The customer record, the backend's release state and each component's state."""
        async with provisioning.db().acquire() as conn:
            facts = await deployment_facts(conn, customer_id)
        if not facts.known:
            raise NotFound(f"no deployment for customer {customer_id}")
        name = provisioning.settings.provisioner_backend
        view = await backend_view(provisioning.backend, name, customer_id)
        return deployment_status(customer_id, facts, view)


@get("/api/queue/customer/{customer_id:str}/jobs", tags=["queue"])
async def customer_jobs(
    customer_id: FromPath[str],
    request: Request[Any, Any, Any],
    provisioning: NamedDependency[Provisioning],
    sessions: NamedDependency[SessionTokens],
) -> dict[str, Any]:
    """The customer's jobs, newest first (an admin, or the customer's own session)."""
    if not sessions.caller(request, provisioning.settings.admin_token).may_see(customer_id):
        raise NotFound(f"no jobs for customer {customer_id}")
    async with provisioning.db().acquire() as conn:
        rows = await jobs_of_customer(conn, customer_id)
    return {"customerId": customer_id, "jobs": [job_view(r) for r in rows]}


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

    def wake() -> None:
        relay.wake()
        if worker is not None:
            worker.wake()

    provisioning = Provisioning(runtime.db, settings, backend, wake)
    admin = Router(
        path="/",
        route_handlers=[QueueController, DeploymentController],
        guards=[admin_guard(settings.admin_token)],
        tags=["queue"],
    )
    return [
        Router(
            path="/",
            route_handlers=[admin, customer_jobs, admin_page_router(provisioning)],
            dependencies={
                "provisioning": Provide(lambda: provisioning, sync_to_thread=False),
                "sessions": Provide(lambda: sessions, sync_to_thread=False),
            },
        )
    ]
