"""What the queue and deployment API does, apart from HTTP: queue a customer's deployment or
removal, clean finished jobs, and tell a deployment's status in the original design's words.

The routes (``routes.py``) only translate; these functions read and write the queue's tables in
the caller's transaction, and raise the domain's HTTP errors (404, 409) where the original did.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from libs.http.errors import Conflict, NotFound
from libs.http.validation import FieldErrors
from services.provisioner.backends.base import Backend, BackendError
from services.provisioner.health import HEALTH_WATCH
from services.provisioner.jobs_view import job_view
from services.provisioner.queue import enqueue
from services.provisioner.queue_rules import DELETE, DEPLOY, FINISHED, PENDING
from services.provisioner.settings import ProvisionerSettings

# Older than any job can be, and far from where "now minus grace" leaves the calendar.
MAX_GRACE_SECONDS = 10 * 365 * 86400


@dataclass(frozen=True)
class Provisioning:
    """What the queue's HTTP handlers work with (injected by litestar): the service's database,
    its settings, the backend (None in a process that does not apply, ``PROVISIONER_WORKER``
    false: jobs are queued here and run by a worker elsewhere) and ``wake``, called after the
    queue changed."""

    db: Callable[[], asyncpg.Pool]
    settings: ProvisionerSettings
    backend: Backend | None
    wake: Callable[[], None]


async def queue_deployment(conn: asyncpg.Connection, customer_id: str, max_attempts: int) -> str:
    """Queue a deployment of the customer's instance with their current license; its job id.
    404 for a customer never licensed, 409 for a closed account."""
    license_row = await conn.fetchrow(
        "SELECT * FROM customer_licenses WHERE customer_id = $1", customer_id
    )
    if license_row is None:
        raise NotFound(f"no license has been issued to customer {customer_id}")
    if license_row["closed"]:
        raise Conflict("the customer's account is closed")
    return await enqueue(
        conn,
        customer_id=customer_id,
        kind=DEPLOY,
        plan=license_row["plan"],
        license_id=license_row["license_id"],
        requested_by="admin",
        at=datetime.now(UTC),
        max_attempts=max_attempts,
    )


async def queue_removal(
    conn: asyncpg.Connection, customer_id: str, erase: bool, max_attempts: int
) -> str:
    """Queue the removal of the customer's instance; its job id. 404 for a customer this
    provisioner never heard of."""
    known = await conn.fetchval(
        "SELECT 1 FROM customer_licenses WHERE customer_id = $1 UNION ALL "
        "SELECT 1 FROM customer_instances WHERE customer_id = $1 LIMIT 1",
        customer_id,
    )
    if not known:
        raise NotFound(f"no deployment for customer {customer_id}")
    return await enqueue(
        conn,
        customer_id=customer_id,
        kind=DELETE,
        plan=None,
        license_id=None,
        requested_by="admin",
        at=datetime.now(UTC),
        max_attempts=max_attempts,
        erase=erase,
    )


def parse_clean(data: dict[str, Any]) -> tuple[str, float]:
    """``state`` and ``grace_seconds`` of a clean request, or a 400 naming each bad field."""
    errors = FieldErrors()
    errors.unknown(data, ("state", "grace_seconds"))
    state = data.get("state", "completed")
    if state not in FINISHED:
        errors.add("state", f"must be one of {', '.join(FINISHED)}")
    grace = data.get("grace_seconds", 0)
    if (
        not isinstance(grace, int | float)
        or isinstance(grace, bool)
        or not 0 <= grace <= MAX_GRACE_SECONDS
    ):
        errors.add(
            "grace_seconds",
            f"must be a number of seconds from 0 to {MAX_GRACE_SECONDS} (ten years)",
        )
    errors.raise_if_any()
    return str(state), float(grace)


def clean_before(grace_seconds: float) -> datetime:
    """Jobs that finished before this are cleaned."""
    return datetime.now(UTC) - timedelta(seconds=grace_seconds)


# --- a deployment's status ----------------------------------------------------------------------


@dataclass(frozen=True)
class DeploymentFacts:
    """What the provisioner's tables know of one customer's deployment."""

    license: asyncpg.Record | None
    instance: asyncpg.Record | None
    # The customer's newest job, and their newest that was not superseded.
    latest: asyncpg.Record | None
    deciding: asyncpg.Record | None
    # How many times the instance was (re)deployed (``revisions``) and when last (``last``).
    releases: asyncpg.Record
    health: asyncpg.Record | None

    @property
    def known(self) -> bool:
        """Whether the provisioner has heard of the customer at all."""
        return not (self.license is None and self.instance is None and self.latest is None)


async def deployment_facts(conn: asyncpg.Connection, customer_id: str) -> DeploymentFacts:
    """The customer's license, instance, jobs, releases and health, as the tables have them."""
    newest = "SELECT * FROM queue_jobs WHERE customer_id = $1 {} ORDER BY created_at DESC LIMIT 1"
    return DeploymentFacts(
        license=await conn.fetchrow(
            "SELECT customer_id, license_id, plan, closed FROM customer_licenses "
            "WHERE customer_id = $1",
            customer_id,
        ),
        instance=await conn.fetchrow(
            "SELECT state, instance_url, backend, updated_at FROM customer_instances "
            "WHERE customer_id = $1",
            customer_id,
        ),
        latest=await conn.fetchrow(newest.format(""), customer_id),
        deciding=await conn.fetchrow(newest.format("AND state <> 'superseded'"), customer_id),
        releases=await conn.fetchrow(
            "SELECT count(*) AS revisions, max(finished_on) AS last FROM queue_jobs "
            "WHERE customer_id = $1 AND state = 'completed' AND kind <> $2",
            customer_id,
            DELETE,
        ),
        health=await conn.fetchrow(
            "SELECT state, reason, degraded_since FROM instance_health WHERE customer_id = $1",
            customer_id,
        ),
    )


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


def deployment_status(
    customer_id: str,
    facts: DeploymentFacts,
    view: dict[str, object],
) -> dict[str, Any]:
    """The customer record, the backend's release state and each component's state."""
    instance, health = facts.instance, facts.health
    degraded = health is not None and health["state"] == "degraded"
    running = instance is not None and instance["state"] == "running"
    last = facts.releases["last"]
    deployed_at = last or (instance["updated_at"] if instance is not None and running else None)
    return {
        "customer": {
            **(dict(facts.license) if facts.license else {"customer_id": customer_id}),
            # The original design's fields.
            "customerId": customer_id,
            "deploymentStatus": deployment_state(instance, facts.deciding, degraded),
            "instanceUrl": instance["instance_url"] if instance is not None and running else None,
            "deployedAt": deployed_at,
        },
        "instance": dict(instance) if instance else None,
        "backend": view,
        "latestJob": job_view(facts.latest) if facts.latest else None,
        "health": dict(health) if health else None,
        # The backend's release: its state, how many times it was (re)deployed, when last.
        "release": {
            "name": view["name"],
            "status": view.get("release"),
            "version": facts.releases["revisions"],
            "lastDeployed": last,
        },
        "components": component_list(view.get("components")),
    }


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
