"""A deployment as the account page shows it, and the stream that follows it while it comes up.

The account view (``account_view.py``) holds the deployment's status, step and progress, which
signup projects from the provisioner's DeploymentRequested/Started/Progressed/Succeeded/Failed
events. The page renders it once; ``GET /account/progress`` then reads it every
``POLL_SECONDS`` and sends each change as a server-sent event until the instance is ready or
the deployment has failed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from typing import Any

import asyncpg
import msgspec
from litestar.response.sse import ServerSentEventMessage

from services.signup.account_view import deployment_of
from services.signup.models import DeploymentOut

# A deployment in one of these is still coming up: the account page follows it live.
UNDER_WAY = ("pending", "queued", "deploying", "retrying", "recovering", "waiting_for_capacity")
STATUS_LABELS = {
    "pending": "Waiting to start",
    "queued": "Queued",
    "deploying": "Deploying",
    "retrying": "Retrying after a problem",
    "recovering": "Recovering",
    "waiting_for_capacity": "Waiting for capacity",
    "ready": "Ready",
    "failed": "Failed",
    "degraded": "Degraded",
    "removed": "Removed",
}
# How often the progress stream reads the read model, and how long one stream lasts before
# the browser reconnects (EventSource does so by itself).
POLL_SECONDS = 0.5
STREAM_SECONDS = 300.0
# Streams one customer may hold open at once in one process (a few tabs): each reads the
# database twice a second, so a session must not be able to open thousands.
STREAMS_PER_CUSTOMER = 4
_open_streams: dict[str, int] = {}


def may_open_stream(customer_id: str) -> bool:
    """Whether ``customer_id`` may open one more progress stream now."""
    return _open_streams.get(customer_id, 0) < STREAMS_PER_CUSTOMER


def safe_link(url: str | None) -> str | None:
    """An instance URL fit for a link (http or https only)."""
    return url if url and url.startswith(("https://", "http://")) else None


def progress_of(deployment: DeploymentOut) -> dict[str, Any]:
    """What the account page shows of a deployment, and sends while it comes up."""
    ready = deployment.status == "ready"
    if ready:
        message = "Your instance is up and running."
    elif deployment.step and deployment.status in UNDER_WAY:
        message = f"Current step: {deployment.step.replace('_', ' ')}"
    elif deployment.status == "degraded":
        reason = deployment.health_reason or "it does not answer its health check"
        message = f"Your instance is running with a problem ({reason}); it is being watched."
    else:
        message = deployment.detail or ""
    return {
        "status": deployment.status,
        "label": STATUS_LABELS.get(deployment.status, deployment.status.replace("_", " ")),
        "progress": 100 if ready else max(0, min(100, deployment.progress)),
        "tone": "ok" if ready else ("warn" if deployment.status in UNDER_WAY else "bad"),
        "message": message,
        "error": deployment.error,
        # A degraded instance runs, and may well answer: its link stays.
        "instance_url": safe_link(deployment.instance_url)
        if deployment.status in ("ready", "degraded")
        else None,
        "done": deployment.status not in UNDER_WAY,
    }


async def progress_events(
    pool: asyncpg.Pool, customer_id: str
) -> AsyncGenerator[ServerSentEventMessage, None]:
    """The deployment of ``customer_id`` as server-sent events: a ``progress`` event at each
    change, read every ``POLL_SECONDS``; ``end`` once it is no longer under way, or at once
    when the customer holds ``STREAMS_PER_CUSTOMER`` streams already."""
    # The route checked ``may_open_stream``, but before this stream ran: requests arriving
    # together all pass that check. Checked again and counted here, with no await between
    # (one step of the event loop), a stream over the limit ends at once.
    if not may_open_stream(customer_id):
        yield ServerSentEventMessage(
            data="too many progress streams open; close a tab", event="end"
        )
        return
    last: dict[str, Any] | None = None
    deadline = time.monotonic() + STREAM_SECONDS
    _open_streams[customer_id] = _open_streams.get(customer_id, 0) + 1
    try:
        while time.monotonic() < deadline:
            row = await pool.fetchrow("SELECT * FROM accounts WHERE customer_id = $1", customer_id)
            state = progress_of(deployment_of(row))
            if state != last:
                data = msgspec.json.encode(state).decode()
                yield ServerSentEventMessage(data=data, event="progress")
                last = state
            if state["done"]:
                yield ServerSentEventMessage(data="done", event="end")
                return
            await asyncio.sleep(POLL_SECONDS)
    finally:
        left = _open_streams.pop(customer_id, 1) - 1
        if left > 0:
            _open_streams[customer_id] = left
