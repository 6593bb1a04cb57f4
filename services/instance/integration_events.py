"""Events the instance has for the customer's integrations, appended in the transaction of what
they report (``integration_events``) and delivered from there to every integration subscribed to
their kind.

Each feature that tells integrations something names its kind here, so the API can list the
kinds an integration may subscribe to and refuse any other.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import asyncpg

# A quota meter reached 80% or 100% of its limit (``quotas``).
QUOTA_NOTICE = "quota.notice"
# A limit bit: readings or requests were refused, naming the device, the limit and what was
# dropped (``quotas``).
QUOTA_LIMITED = "quota.limited"
# A device's BME688 changed calibration state (``calibration``).
CALIBRATION_CHANGED = "calibration.changed"
# An alert rule fired or resolved for a device (``alerts``).
ALERT = "alert"

KINDS = (QUOTA_NOTICE, QUOTA_LIMITED, CALIBRATION_CHANGED, ALERT)


async def enqueue(
    conn: asyncpg.Connection,
    kind: str,
    body: dict[str, Any],
    at: datetime,
    device_id: str | None = None,
) -> int:
    """Append one event for the integrations, in the caller's transaction; its id."""
    if kind not in KINDS:
        raise ValueError(f"unknown integration event kind {kind!r}")
    return int(
        await conn.fetchval(
            "INSERT INTO integration_events (kind, at, device_id, body) "
            "VALUES ($1, $2, $3, $4::jsonb) RETURNING id",
            kind,
            at,
            device_id,
            json.dumps(body, default=str),
        )
    )


async def enqueue_many(
    conn: asyncpg.Connection,
    kind: str,
    events: list[tuple[datetime, str | None, dict[str, Any]]],
) -> None:
    """Append events of one kind (each its time, device and body), in the caller's
    transaction, with one statement whatever their number."""
    if kind not in KINDS:
        raise ValueError(f"unknown integration event kind {kind!r}")
    if not events:
        return
    await conn.execute(
        "INSERT INTO integration_events (kind, at, device_id, body) "
        "SELECT $1, at, device_id, body::jsonb "
        "FROM unnest($2::timestamptz[], $3::text[], $4::text[]) AS e (at, device_id, body)",
        kind,
        [at for at, _, _ in events],
        [device_id for _, device_id, _ in events],
        [json.dumps(body, default=str) for _, _, body in events],
    )
