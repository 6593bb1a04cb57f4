"""Deployment jobs and their progress, as the deployment events record them; and the platform's
capacity as last recorded."""

from __future__ import annotations

from typing import Any

from contracts import (
    Cause,
    DeploymentFailed,
    DeploymentJobRemoved,
    DeploymentProgressed,
    DeploymentRequested,
    DeploymentRetried,
    DeploymentStarted,
    DeploymentSucceeded,
    DeploymentSuperseded,
    InstanceCapacityChanged,
    InstanceDegraded,
    InstanceRecovered,
)
from libs.db.postgres import Connection
from libs.projections.apply import Projection, Recorded, update_row
from services.provisioner.queue import encode_cause


async def when_deployment_requested_record_job(
    conn: Connection, r: Recorded[DeploymentRequested]
) -> None:
    e = r.event
    await conn.execute(
        """
        INSERT INTO deployments (job_id, customer_id, kind, plan, priority, state, requested_at)
        VALUES ($1, $2, $3, $4, $5, 'waiting', $6)
        ON CONFLICT (job_id) DO NOTHING
        """,
        e.job_id,
        e.customer_id,
        e.kind,
        e.plan,
        e.priority,
        r.envelope.occurred_at,
    )


async def _update(conn: Connection, r: Recorded[Any], sets: str, *args: object) -> None:
    await update_row(conn, "deployments", "job_id", r.event.job_id, sets, *args)


async def when_deployment_started_mark_active(
    conn: Connection, r: Recorded[DeploymentStarted]
) -> None:
    await _update(
        conn,
        r,
        "state = 'active', attempts = $2, backend = $3, started_at = COALESCE(started_at, $4)",
        r.event.attempt,
        r.event.backend,
        r.envelope.occurred_at,
    )


async def when_deployment_progressed_record_progress(
    conn: Connection, r: Recorded[DeploymentProgressed]
) -> None:
    await _update(conn, r, "progress = $2, step = $3", r.event.progress, r.event.step)


async def when_deployment_succeeded_mark_completed(
    conn: Connection, r: Recorded[DeploymentSucceeded]
) -> None:
    await _update(
        conn,
        r,
        "state = 'completed', progress = 100, instance_url = $2, "
        "backend = $3, error = NULL, finished_at = $4",
        r.event.instance_url,
        r.event.backend,
        r.envelope.occurred_at,
    )


async def when_deployment_failed_record_failure(
    conn: Connection, r: Recorded[DeploymentFailed]
) -> None:
    state = "delayed" if r.event.will_retry else "failed"
    finished = None if r.event.will_retry else r.envelope.occurred_at
    await _update(
        conn,
        r,
        "state = $2, error = $3, attempts = $4, finished_at = $5",
        state,
        r.event.error,
        r.event.attempt,
        finished,
    )


async def when_deployment_retried_mark_waiting(
    conn: Connection, r: Recorded[DeploymentRetried]
) -> None:
    await _update(
        conn,
        r,
        "state = 'waiting', attempts = 0, progress = 0, step = NULL, error = NULL, "
        "finished_at = NULL",
    )


async def when_deployment_superseded_mark_it(
    conn: Connection, r: Recorded[DeploymentSuperseded]
) -> None:
    await _update(conn, r, "state = 'superseded', finished_at = $2", r.envelope.occurred_at)


async def when_deployment_job_removed_forget_it(
    conn: Connection, r: Recorded[DeploymentJobRemoved]
) -> None:
    await conn.execute("DELETE FROM deployments WHERE job_id = $1", r.event.job_id)


DEPLOYMENTS = Projection(
    name="deployments",
    tables=("deployments",),
    handlers={
        DeploymentRequested: when_deployment_requested_record_job,
        DeploymentStarted: when_deployment_started_mark_active,
        DeploymentProgressed: when_deployment_progressed_record_progress,
        DeploymentSucceeded: when_deployment_succeeded_mark_completed,
        DeploymentFailed: when_deployment_failed_record_failure,
        DeploymentRetried: when_deployment_retried_mark_waiting,
        DeploymentSuperseded: when_deployment_superseded_mark_it,
        DeploymentJobRemoved: when_deployment_job_removed_forget_it,
    },
)


async def when_instance_capacity_changed_remember_it(
    conn: Connection, r: Recorded[InstanceCapacityChanged]
) -> None:
    e = r.event
    await conn.execute(
        """
        INSERT INTO capacity_recorded (only_row, seq, running, capacity, limited_by, "full",
                                       changed_at)
        VALUES (true, $1, $2, $3, $4, $5, $6)
        ON CONFLICT (only_row) DO UPDATE SET seq = $1, running = $2, capacity = $3,
            limited_by = $4, "full" = $5, changed_at = $6
        """,
        r.seq,
        e.running,
        e.capacity,
        e.limited_by,
        e.full,
        r.envelope.occurred_at,
    )


# What the capacity watch compares with before it records a change (``capacity.py``).
CAPACITY_RECORDED = Projection(
    name="capacity",
    tables=("capacity_recorded",),
    handlers={InstanceCapacityChanged: when_instance_capacity_changed_remember_it},
)


# --- instance health ------------------------------------------------------------------------------


async def when_instance_degraded_open_episode(
    conn: Connection, r: Recorded[InstanceDegraded]
) -> None:
    await conn.execute(
        """
        INSERT INTO instance_health (customer_id, state, reason, degraded_since, episodes,
                                     updated_at, degraded_cause)
        VALUES ($1, 'degraded', $2, $3, 1, $4, $5::jsonb)
        ON CONFLICT (customer_id) DO UPDATE SET state = 'degraded', reason = $2,
            degraded_since = $3, episodes = instance_health.episodes + 1, updated_at = $4,
            degraded_cause = $5::jsonb
        """,
        r.event.customer_id,
        r.event.reason,
        r.event.since,
        r.envelope.occurred_at,
        # What the health watch's redeploy of the instance names as its cause.
        encode_cause(Cause.of(r.envelope)),
    )


async def _healthy(conn: Connection, customer_id: str, at: object) -> None:
    await update_row(
        conn,
        "instance_health",
        "customer_id",
        customer_id,
        "state = 'healthy', reason = NULL, degraded_since = NULL, degraded_cause = NULL, "
        "updated_at = $2",
        at,
    )


async def when_instance_recovered_close_episode(
    conn: Connection, r: Recorded[InstanceRecovered]
) -> None:
    await _healthy(conn, r.event.customer_id, r.envelope.occurred_at)


async def when_deployment_succeeded_close_episode(
    conn: Connection, r: Recorded[DeploymentSucceeded]
) -> None:
    # A deployment succeeds only once the instance answers ready: whatever was degraded before
    # is over (a redeploy's own recovery). A removed instance has no health to keep.
    if r.event.components.get("instance") == "removed":
        await conn.execute(
            "DELETE FROM instance_health WHERE customer_id = $1", r.event.customer_id
        )
    else:
        await _healthy(conn, r.event.customer_id, r.envelope.occurred_at)


INSTANCE_HEALTH = Projection(
    name="instance_health",
    tables=("instance_health",),
    handlers={
        InstanceDegraded: when_instance_degraded_open_episode,
        InstanceRecovered: when_instance_recovered_close_episode,
        DeploymentSucceeded: when_deployment_succeeded_close_episode,
    },
)
