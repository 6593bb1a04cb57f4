"""Quotas that explain themselves: the readings' token bucket, the meters' notices at 80% and
100%, and the record of what a limit refused.

The bucket: the license's ``mqttMessagesPerDay`` is the day's budget, and readings are also
taken from a bucket that refills at that budget spread over the day (budget / 86,400 a second)
and holds at most ``capacity`` = two hours' worth (budget / 12, at least 1,000 readings or the
whole budget if smaller: one batch of the original agent always fits in a full bucket). So a
busy stretch spends at most a twelfth of the day at once, then goes on at the day's average
rate; no single hour can spend more than an eighth of the day, and the rest of the fleet still
has the other seven eighths. The daily count stays a limit of its own (a full bucket at dawn
plus a day's refill would otherwise allow more than the budget). The level is saved with every
batch of readings, so a restart continues from it (refilled for the time it was away).

Notices at 80% and 100% of each meter: ``quota_notices``.

Limited: readings over the budget or the bucket, API requests over the day's limit and device
registrations over ``maxDevices`` are buffered by ingest per meter, device and minute and
written with its next batch (``quota_limited``), each new minute appended as ``quota.limited``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from services.instance.integration_events import QUOTA_LIMITED, enqueue

LEVELS = (80, 100)
# The meters, as the API names them.
DEVICES, MESSAGES, API_REQUESTS = "devices", "mqtt_messages", "api_requests"
# The limits that refuse something, as the license names them (and ``burst``, the bucket).
DAILY_BUDGET, BURST, API_LIMIT, DEVICE_LIMIT = (
    "mqttMessagesPerDay",
    "burst",
    "apiRequestsPerDay",
    "maxDevices",
)
MIN_BURST = 1000
# Rows of ``quota_limited`` read at most for one answer of the API.
LIMITED_ROWS = 2000


def bucket_shape(daily: int) -> tuple[float, float]:
    """The bucket of a daily budget: its capacity and its refill a second (see above)."""
    capacity = float(min(daily, max(MIN_BURST, daily // 12)))
    return capacity, daily / 86_400


@dataclass
class TokenBucket:
    """The readings' bucket: ``level`` readings may be taken at ``at``. Taken once per reading
    at ingest, so kept to a few arithmetic steps."""

    capacity: float
    refill: float
    level: float
    at: datetime
    daily: int = 0

    @classmethod
    def full(cls, daily: int, now: datetime) -> TokenBucket:
        """A full bucket for ``daily`` readings a day."""
        capacity, refill = bucket_shape(daily)
        return cls(capacity, refill, capacity, now, daily)

    def reshape(self, daily: int) -> None:
        """Follow a new budget (a license changed), keeping the level within it."""
        if daily != self.daily:
            self.daily = daily
            self.capacity, self.refill = bucket_shape(daily)
            self.level = min(self.level, self.capacity)

    def level_at(self, now: datetime) -> float:
        """The level at ``now`` (refilled since ``at``; a clock going back refills nothing)."""
        elapsed = max(0.0, (now - self.at).total_seconds())
        return min(self.capacity, self.level + elapsed * self.refill)

    def take(self, now: datetime) -> bool:
        """Take one reading's token at ``now``; False when the bucket is empty."""
        elapsed = (now - self.at).total_seconds()
        if elapsed > 0:
            self.level = min(self.capacity, self.level + elapsed * self.refill)
            self.at = now
        if self.level < 1:
            return False
        self.level -= 1
        return True

    def give_back(self, count: int) -> None:
        """Readings taken but not stored (delivered twice) cost nothing."""
        self.level = min(self.capacity, self.level + count)

    def view(self, now: datetime) -> dict[str, Any]:
        """The bucket as the API shows it."""
        return {
            "level": math.floor(self.level_at(now)),
            "capacity": int(self.capacity),
            "refill_per_minute": round(self.refill * 60, 2),
        }


async def load_bucket(conn: asyncpg.Connection) -> tuple[float, datetime] | None:
    """The bucket's saved level and its time, or None if it was never saved."""
    row = await conn.fetchrow("SELECT level, at FROM quota_bucket")
    return (float(row["level"]), row["at"]) if row else None


async def save_bucket(conn: asyncpg.Connection, bucket: TokenBucket) -> None:
    """Save the bucket's level (in the caller's transaction: the batch's)."""
    await conn.execute(
        "INSERT INTO quota_bucket (id, level, at) VALUES (true, $1, $2) "
        "ON CONFLICT (id) DO UPDATE SET level = EXCLUDED.level, at = EXCLUDED.at",
        bucket.level,
        bucket.at,
    )


# --- what a limit refused -------------------------------------------------------------------

# (meter, device_id, minute) -> [count, first_at, last_at, quota, what]
Refusals = dict[tuple[str, str | None, datetime], list[Any]]


def note_refused(
    refusals: Refusals,
    meter: str,
    device_id: str | None,
    now: datetime,
    quota: int,
    what: str,
) -> None:
    """One more thing refused by ``meter`` at ``now``, counted in its minute."""
    key = (meter, device_id, now.replace(second=0, microsecond=0))
    entry = refusals.get(key)
    if entry is None:
        refusals[key] = [1, now, now, quota, what]
    else:
        entry[0] += 1
        entry[1], entry[2] = min(entry[1], now), max(entry[2], now)


def merge_refusals(into: Refusals, later: Refusals) -> None:
    """Add ``later``'s counts to ``into``."""
    for key, (count, first, last, quota, what) in later.items():
        entry = into.get(key)
        if entry is None:
            into[key] = [count, first, last, quota, what]
        else:
            entry[0] += count
            entry[1], entry[2] = min(entry[1], first), max(entry[2], last)


async def record_refusals(conn: asyncpg.Connection, refusals: Refusals) -> None:
    """Add the refusals to their minutes' rows (in the batch's transaction); a minute's first
    row is appended for the integrations as ``quota.limited``."""
    for (meter, device_id, minute), (count, first, last, quota, what) in refusals.items():
        row = await conn.fetchrow(
            """
            INSERT INTO quota_limited (minute, meter, device_id, quota, what, count, first_at,
                                       last_at)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
            ON CONFLICT (meter, (coalesce(device_id, '')), minute) DO UPDATE SET
                count = quota_limited.count + EXCLUDED.count,
                first_at = LEAST(quota_limited.first_at, EXCLUDED.first_at),
                last_at = GREATEST(quota_limited.last_at, EXCLUDED.last_at),
                quota = EXCLUDED.quota
            RETURNING (xmax = 0) AS new
            """,
            minute,
            meter,
            device_id,
            quota,
            what,
            count,
            first,
            last,
        )
        if row["new"]:
            body = {
                "meter": meter,
                "limit": quota,
                "device_id": device_id,
                "dropped": what,
                "count": count,
                "minute": minute,
                "message": limited_message(meter, quota, device_id, what, count),
            }
            await enqueue(conn, QUOTA_LIMITED, body, first, device_id)


def limited_message(
    meter: str,
    quota: int,
    device_id: str | None,
    what: str,
    count: int,
    name: str | None = None,
    during: str = "",
) -> str:
    """What a refusal means, in words: who, how many of what (``during`` when), and which limit:
    "device Kitchen: 1,234 readings refused 14:02-14:05 UTC, daily budget 100,000 used"."""
    who = f"device {name or device_id}: " if device_id else ""
    if count == 1 and what.endswith("s"):
        what = what[:-1]
    why = {
        DAILY_BUDGET: f"daily budget {quota:,} used",
        BURST: f"burst allowance used (it refills at {quota:,} a day)",
        API_LIMIT: f"daily limit of {quota:,} API requests used",
        DEVICE_LIMIT: f"the license allows {quota:,} devices",
    }.get(meter, f"{meter} {quota:,}")
    return f"{who}{count:,} {what} refused{' ' + during if during else ''}, {why}"


async def limited_spans(
    conn: asyncpg.Connection, since: datetime, names: dict[str, str]
) -> list[dict[str, Any]]:
    """The refusals since ``since``, newest first, with consecutive minutes of one meter and
    device joined into one span ("device X: 1,234 readings refused 14:02-14:05, ...")."""
    rows = await conn.fetch(
        "SELECT * FROM quota_limited WHERE minute >= $1 ORDER BY minute DESC LIMIT $2",
        since,
        LIMITED_ROWS,
    )
    spans: list[dict[str, Any]] = []
    open_spans: dict[tuple[str, str | None], dict[str, Any]] = {}
    for row in reversed(rows):  # oldest first, so a span grows forwards
        key = (row["meter"], row["device_id"])
        span = open_spans.get(key)
        if span is None or row["minute"] - span["_minute"] > timedelta(minutes=1):
            span = {"meter": row["meter"], "device_id": row["device_id"], "count": 0}
            span.update(what=row["what"], **{"from": row["first_at"]})
            spans.append(span)
            open_spans[key] = span
        span["count"] += row["count"]
        span.update(_minute=row["minute"], to=row["last_at"], limit=row["quota"])
    for span in spans:
        del span["_minute"]
        device = span["device_id"]
        span["device_name"] = name = names.get(device) if device else None
        facts = (span["meter"], span["limit"], device, span["what"], span["count"], name)
        span["summary"] = limited_message(*facts)
        during = f"{span['from']:%H:%M}-{span['to']:%H:%M} UTC"
        span["message"] = limited_message(*facts, during=during)
    return spans[::-1]


async def forget_old_refusals(conn: asyncpg.Connection, keep_days: int) -> int:
    """Drop the refusals older than the license's retention (housekeeping, hourly); how many
    rows went."""
    done = await conn.execute(
        "DELETE FROM quota_limited WHERE minute < now() - make_interval(days => $1)", keep_days
    )
    return int(done.split()[-1])
