"""Where each integration stands in what it is sent live, read and moved in Postgres.

Positions are ``(xid, id)`` of the outbox rows (``integration_events``) and of the batches of
readings stored (``reading_batches``, plus the reading's place ``n`` in its batch). Rows become
visible in the order their transactions commit, not in their ids' order, so only rows whose
transaction ended before the oldest one still running (``SETTLED``) are read, in (xid, id)
order: nothing committed late is passed over (migration 012 says more).
"""

from __future__ import annotations

from datetime import datetime, timedelta

import asyncpg

from services.instance.integrations.backfills import READING_COLUMNS
from services.instance.integrations.store import READINGS

EVENTS_PAGE = 100
READINGS_PAGE = 500
# Readings an integration has not taken for this long (its receiver failing all along, or the
# license without webhooks) are no longer kept for it: they stay stored, to be backfilled.
BACKLOG_DAYS = 30
# Only rows whose transaction ended can be passed for good.
SETTLED = "pg_snapshot_xmin(pg_current_snapshot())"
INTEGRATIONS_SQL = (
    "SELECT integration_id, url, kinds, secret, next_at, failures, "
    "events_xid::text AS events_xid, events_id, readings_xid::text AS readings_xid, "
    "readings_id, readings_n FROM integrations WHERE deleted_at IS NULL"
)
EVENTS_SQL = (
    "SELECT xid::text AS xid, id, kind, at, device_id, body::text AS body "
    "FROM integration_events WHERE (xid, id) > ($1::text::xid8, $2::bigint) "
    f"AND xid < {SETTLED} ORDER BY xid, id LIMIT $3"
)
READINGS_SQL = (
    f"SELECT b.xid::text AS xid, b.id, k.n, r.device_id IS NOT NULL AS present, "
    f"{READING_COLUMNS} FROM reading_batches b "
    "CROSS JOIN LATERAL unnest(b.device_ids, b.times) WITH ORDINALITY AS k(k_device, k_ts, n) "
    "LEFT JOIN readings r ON r.device_id = k.k_device AND r.ts = k.k_ts "
    "WHERE (b.xid, b.id) >= ($1::text::xid8, $2::bigint) "
    f"AND b.xid < {SETTLED} "
    "AND (b.xid, b.id, k.n) > ($1::text::xid8, $2::bigint, $3::bigint) "
    "ORDER BY b.xid, b.id, k.n LIMIT $4"
)
# A batch goes once every integration taking readings has passed its last reading.
PRUNE_SQL = (
    f"DELETE FROM reading_batches b WHERE b.xid < {SETTLED} AND (NOT EXISTS ("
    "SELECT 1 FROM integrations i WHERE i.deleted_at IS NULL AND $1 = ANY (i.kinds) "
    "AND (i.readings_xid, i.readings_id, i.readings_n) "
    "< (b.xid, b.id, cardinality(b.device_ids))) "
    "OR b.stored_at < now() - make_interval(days => $2))"
)
# The columns of a row of ``READINGS_SQL`` that say where it is, not what was read.
POSITION_COLUMNS = ("xid", "id", "n", "present")
SUCCEEDED = "failures = 0, last_error = NULL, failing_since = NULL, delivered_at = $2, next_at = $2"


async def integrations_in_force(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    """Every integration not deleted, with its positions and its delivery's state."""
    rows: list[asyncpg.Record] = await conn.fetch(INTEGRATIONS_SQL)
    return rows


async def new_events(conn: asyncpg.Connection, integration: asyncpg.Record) -> list[asyncpg.Record]:
    """The settled outbox rows after the integration's position (of every kind: the position
    moves past those it does not take too), at most ``EVENTS_PAGE``."""
    rows: list[asyncpg.Record] = await conn.fetch(
        EVENTS_SQL, integration["events_xid"], integration["events_id"], EVENTS_PAGE
    )
    return rows


async def new_readings(
    conn: asyncpg.Connection, integration: asyncpg.Record
) -> list[asyncpg.Record]:
    """The readings of the settled batches after the integration's position, at most
    ``READINGS_PAGE``; one deleted since it was stored comes with ``present`` false."""
    rows: list[asyncpg.Record] = await conn.fetch(
        READINGS_SQL,
        integration["readings_xid"],
        integration["readings_id"],
        integration["readings_n"],
        READINGS_PAGE,
    )
    return rows


async def passed_events(
    conn: asyncpg.Connection, integration_id: str, last: asyncpg.Record, now: datetime
) -> None:
    """Move the integration past ``last`` of its events: they were delivered (or not its)."""
    await conn.execute(
        f"UPDATE integrations SET events_xid = $3::text::xid8, events_id = $4, {SUCCEEDED} "
        "WHERE integration_id = $1",
        integration_id,
        now,
        last["xid"],
        last["id"],
    )


async def passed_readings(
    conn: asyncpg.Connection, integration_id: str, last: asyncpg.Record, now: datetime
) -> None:
    """Move the integration past ``last`` of its readings: they were delivered."""
    await conn.execute(
        f"UPDATE integrations SET readings_xid = $3::text::xid8, readings_id = $4, "
        f"readings_n = $5, {SUCCEEDED} WHERE integration_id = $1",
        integration_id,
        now,
        last["xid"],
        last["id"],
        last["n"],
    )


async def delivery_failed(
    conn: asyncpg.Connection,
    integration: asyncpg.Record,
    error: str,
    now: datetime,
    backoff: timedelta,
) -> None:
    """Record a failed attempt; the position stays, and the next try is due after
    ``backoff``."""
    await conn.execute(
        "UPDATE integrations SET failures = failures + 1, last_error = $2, "
        "failing_since = coalesce(failing_since, $3), next_at = $4 "
        "WHERE integration_id = $1",
        integration["integration_id"],
        error[:500],
        now,
        now + backoff,
    )


async def prune(conn: asyncpg.Connection) -> int:
    """Delete the batches of readings every integration has passed, and those older than
    ``BACKLOG_DAYS``; how many."""
    done = await conn.execute(PRUNE_SQL, READINGS, BACKLOG_DAYS)
    return int(done.split()[-1])
