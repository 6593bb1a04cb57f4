"""Backfills: stored readings of a time range replayed to an integration, so a new system
starts with the past.

A backfill is ``{from, to}`` (and at most ``rate`` readings a second). An integration runs one
at a time, oldest first; the others wait (``queued``). The readings go in pages of up to
``PAGE`` in (device, time) order, each page from a cursor kept in the backfill's row and moved
only once the page was delivered: a restart resumes where it stood, and a POST that failed is
retried with backoff, never skipped. ``GET`` shows done/total, the rate and the state; a
backfill can be cancelled. The same ``{from, to}`` asked again while one is queued or running
finds that one (a retry after a lost answer makes no second).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from libs.http.errors import Conflict
from libs.http.validation import FieldErrors, json_object
from services.instance.readings import FUTURE_SLACK, METRICS, as_sent, stored_column

FIELDS = ("from", "to", "rate")
PAGE = 500
DEFAULT_RATE = 500
MAX_RATE = 5000
MAX_WAITING = 5
INVALID = "invalid backfill"
ACTIVE = ("queued", "running")
# The readings as sent: values as the device sent them, then the offset added at ingest.
READING_COLUMNS = ", ".join(
    [
        "device_id",
        "ts",
        *(f"{stored_column(m)} AS {m}" for m in METRICS),
        f"{as_sent('temperature_offset')} AS temperature_offset",
        # Taken before the sensor was calibrated (BSEC's accuracy below 3).
        "(iaq_accuracy IS NOT NULL AND iaq_accuracy < 3) AS calibrating",
    ]
)


def _instant(body: dict[str, Any], name: str, errors: FieldErrors) -> datetime | None:
    value = body.get(name)
    if not isinstance(value, str):
        errors.add(name, "is required: an ISO 8601 time with its offset")
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        errors.add(name, "must be an ISO 8601 time with its offset")
        return None
    if when.tzinfo is None:
        errors.add(name, "must carry its offset (e.g. Z or +02:00)")
        return None
    try:
        return when.astimezone(UTC)
    except OverflowError:  # 0001-01-01 at +14:00 is before the first year
        errors.add(name, "is out of range")
        return None


def parse_backfill(data: Any, now: datetime) -> tuple[datetime, datetime, int]:
    """``(from, to, rate)`` from a request body, or a 400 naming each bad field."""
    body = json_object(data, INVALID)
    errors = FieldErrors()
    errors.unknown(body, FIELDS)
    start, end = _instant(body, "from", errors), _instant(body, "to", errors)
    rate = body.get("rate", DEFAULT_RATE)
    if not isinstance(rate, int) or isinstance(rate, bool) or not 1 <= rate <= MAX_RATE:
        errors.add("rate", f"must be whole readings a second from 1 to {MAX_RATE}")
    if start is not None and end is not None:
        if start >= end:
            errors.add("to", "must be after from")
        elif start > now + FUTURE_SLACK:
            errors.add("from", "must not be in the future")
    errors.raise_if_any(INVALID)
    assert start is not None
    assert end is not None
    return start, end, rate


async def start_backfill(
    conn: asyncpg.Connection,
    integration_id: str,
    span: tuple[datetime, datetime, int],
    now: datetime,
) -> tuple[dict[str, Any], bool]:
    """Queue a backfill (or find the same one queued or running); and whether it is new.
    ``Conflict`` when ``MAX_WAITING`` are queued or running already."""
    start, end, rate = span
    async with conn.transaction():
        # One request at a time per integration, so two cannot both pass the checks below.
        await conn.execute(
            "SELECT 1 FROM integrations WHERE integration_id = $1 FOR UPDATE", integration_id
        )
        same = await conn.fetchrow(
            "SELECT * FROM integration_backfills WHERE integration_id = $1 AND from_ts = $2 "
            "AND to_ts = $3 AND state = ANY($4::text[])",
            integration_id,
            start,
            end,
            list(ACTIVE),
        )
        if same is not None:
            return progress(same, now), False
        waiting = await conn.fetchval(
            "SELECT count(*) FROM integration_backfills WHERE integration_id = $1 "
            "AND state = ANY($2::text[])",
            integration_id,
            list(ACTIVE),
        )
        if waiting >= MAX_WAITING:
            raise Conflict(
                f"{MAX_WAITING} backfills of this integration are queued or running already; "
                "wait for one to finish or cancel one"
            )
        row = await conn.fetchrow(
            "INSERT INTO integration_backfills (backfill_id, integration_id, from_ts, to_ts, "
            "rate, state, created_at, next_at) VALUES ($1, $2, $3, $4, $5, 'queued', $6, $6) "
            "RETURNING *",
            uuid.uuid4().hex[:16],
            integration_id,
            start,
            end,
            rate,
            now,
        )
    return progress(row, now), True


async def backfill_of(
    conn: asyncpg.Connection, integration_id: str, backfill_id: str
) -> asyncpg.Record | None:
    """One backfill of the integration; None when it has none by that id."""
    return await conn.fetchrow(
        "SELECT * FROM integration_backfills WHERE integration_id = $1 AND backfill_id = $2",
        integration_id,
        backfill_id,
    )


async def backfills_of(conn: asyncpg.Connection, integration_id: str) -> list[asyncpg.Record]:
    """The integration's backfills, newest first (the last 50)."""
    rows: list[asyncpg.Record] = await conn.fetch(
        "SELECT * FROM integration_backfills WHERE integration_id = $1 "
        "ORDER BY created_at DESC LIMIT 50",
        integration_id,
    )
    return rows


async def cancel_backfill(
    conn: asyncpg.Connection, integration_id: str, backfill_id: str, now: datetime
) -> asyncpg.Record | None:
    """Cancel it if it is queued or running (a finished one stays as it is); None when the
    integration has no such backfill."""
    await conn.execute(
        "UPDATE integration_backfills SET state = 'cancelled', finished_at = $3 "
        "WHERE integration_id = $1 AND backfill_id = $2 AND state = ANY($4::text[])",
        integration_id,
        backfill_id,
        now,
        list(ACTIVE),
    )
    return await backfill_of(conn, integration_id, backfill_id)


def progress(row: asyncpg.Record, now: datetime) -> dict[str, Any]:
    """A backfill as the API shows it: its range, state, done/total and rate."""
    rate = None
    if row["started_at"] is not None and row["progressed_at"] is not None:
        took = (row["progressed_at"] - row["started_at"]).total_seconds()
        rate = round(row["done"] / took, 1) if took > 0 else None
    return {
        "backfill_id": row["backfill_id"],
        "integration_id": row["integration_id"],
        "from": row["from_ts"],
        "to": row["to_ts"],
        "state": row["state"],
        "done": row["done"],
        "total": row["total"],
        "rate_limit": row["rate"],
        "rate": rate,
        "created_at": row["created_at"],
        "started_at": row["started_at"],
        "finished_at": row["finished_at"],
        "failures": row["failures"],
        "last_error": row["last_error"],
        "next_attempt_at": row["next_at"] if row["failures"] else None,
    }


async def begin(conn: asyncpg.Connection, backfill: asyncpg.Record, now: datetime) -> None:
    """Start a queued backfill: count what it will send (once; a restart keeps the count)."""
    total = await conn.fetchval(
        "SELECT count(*) FROM readings WHERE ts >= $1 AND ts < $2",
        backfill["from_ts"],
        backfill["to_ts"],
    )
    await conn.execute(
        "UPDATE integration_backfills SET state = 'running', started_at = $2, total = $3, "
        "progressed_at = $2 WHERE backfill_id = $1 AND state = 'queued'",
        backfill["backfill_id"],
        now,
        total,
    )


async def next_page(conn: asyncpg.Connection, backfill: asyncpg.Record) -> list[asyncpg.Record]:
    """The readings after the backfill's cursor, in (device, time) order: at most a page, and
    at most a second's worth of its rate."""
    rows: list[asyncpg.Record] = await conn.fetch(
        f"SELECT {READING_COLUMNS} FROM readings WHERE ts >= $1 AND ts < $2 "
        "AND (device_id, ts) > ($3, coalesce($4, '-infinity'::timestamptz)) "
        "ORDER BY device_id, ts LIMIT $5",
        backfill["from_ts"],
        backfill["to_ts"],
        backfill["cursor_device"] or "",
        backfill["cursor_ts"],
        min(PAGE, backfill["rate"]),
    )
    return rows


async def page_delivered(
    conn: asyncpg.Connection,
    backfill: asyncpg.Record,
    page: list[asyncpg.Record],
    started: datetime,
    now: datetime,
) -> None:
    """Move the cursor past a delivered page; the next is due when the rate allows, counted
    from when this one was ``started`` (so the time it took is not added to the wait)."""
    last = page[-1]
    await conn.execute(
        "UPDATE integration_backfills SET cursor_device = $2, cursor_ts = $3, "
        "done = done + $4, failures = 0, last_error = NULL, next_at = $5, progressed_at = $6 "
        "WHERE backfill_id = $1 AND state = 'running'",
        backfill["backfill_id"],
        last["device_id"],
        last["ts"],
        len(page),
        started + timedelta(seconds=len(page) / backfill["rate"]),
        now,
    )


async def finish(conn: asyncpg.Connection, backfill: asyncpg.Record, now: datetime) -> None:
    """Nothing is left after the cursor: the backfill is done."""
    await conn.execute(
        "UPDATE integration_backfills SET state = 'done', finished_at = $2, progressed_at = $2 "
        "WHERE backfill_id = $1 AND state = 'running'",
        backfill["backfill_id"],
        now,
    )


async def page_failed(
    conn: asyncpg.Connection, backfill: asyncpg.Record, error: str, now: datetime
) -> None:
    """The page is due again after a backoff; the cursor stays where it was."""
    await conn.execute(
        "UPDATE integration_backfills SET failures = failures + 1, last_error = $2, "
        "next_at = $3 WHERE backfill_id = $1 AND state = 'running'",
        backfill["backfill_id"],
        error[:500],
        now + backoff(backfill["failures"] + 1),
    )


def backoff(failures: int) -> timedelta:
    """How long to wait after that many failed attempts in a row: 1 s, 2 s, 4 s ... 5 min."""
    return timedelta(seconds=min(2 ** max(failures - 1, 0), 300))
