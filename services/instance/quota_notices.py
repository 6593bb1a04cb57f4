"""Quota notices: each meter (devices, messages today, API requests today) is checked every few
seconds (``QuotaWatch``); at 80% and at 100% of its limit a notice is recorded once per period
(the UTC day; for devices, the crossing: a device count that falls back below a level noticed
can cross it again), appended for the integrations as ``quota.notice`` in the same
transaction, and reported to the control plane (billing receives it as it receives usage, with
the instance's usage token; signup mails the customer). A notice not reported yet is sent again
at the next turn; billing stores each (meter, period, level) once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx

from libs.db.postgres import CONNECTION_ERRORS, Turns
from libs.observability.telemetry import traced_hooks
from services.instance.devices import count_active_devices
from services.instance.integration_events import QUOTA_NOTICE, enqueue
from services.instance.quotas import API_REQUESTS, DEVICES, LEVELS, MESSAGES
from services.instance.settings import InstanceSettings
from services.instance.start import reporting

log = logging.getLogger(__name__)

WATCH_SECONDS = 5.0
MAX_BACKOFF_SECONDS = 300.0


@dataclass(frozen=True)
class Meter:
    """One meter's reading: ``used`` of ``limit`` in ``period``."""

    name: str
    used: int
    limit: int
    daily: bool

    @property
    def reached(self) -> int:
        """The highest level reached (0, 80 or 100)."""
        if self.limit <= 0:
            return 0
        return max((level for level in LEVELS if self.used * 100 >= level * self.limit), default=0)


def percent(used: int, limit: int) -> float:
    """``used`` as a percentage of ``limit`` (100 for a limit of 0 once anything is used)."""
    if limit <= 0:
        return 100.0 if used else 0.0
    return round(100 * used / limit, 1)


async def notice_levels(conn: asyncpg.Connection, meter: Meter, now: datetime) -> list[int]:
    """Record the notices ``meter`` is due (in the caller's transaction); the levels new."""
    row = await conn.fetchrow(
        "SELECT period, level FROM quota_meter_levels WHERE meter = $1 FOR UPDATE", meter.name
    )
    reached = meter.reached
    if meter.daily:
        period = now.date().isoformat()
        noticed = row["level"] if row and row["period"] == period else 0
    else:
        period = row["period"] if row else f"from {now.isoformat()}"
        noticed = row["level"] if row else 0
        if reached < noticed:  # back below a level noticed: the next crossing is a new one
            period, noticed = f"from {now.isoformat()}", reached
    new = [level for level in LEVELS if noticed < level <= reached]
    for level in new:
        await _notice(conn, meter, period, level, now)
    if row is None or new or (period, noticed) != (row["period"], row["level"]):
        await conn.execute(
            "INSERT INTO quota_meter_levels (meter, period, level) VALUES ($1, $2, $3) "
            "ON CONFLICT (meter) DO UPDATE SET period = EXCLUDED.period, level = EXCLUDED.level",
            meter.name,
            period,
            max([noticed, *new]),
        )
    return new


def notice_message(meter: str, level: int, used: int, limit: int) -> str:
    """A notice in words."""
    what = {
        DEVICES: f"{used:,} of {limit:,} devices registered",
        MESSAGES: f"{used:,} of {limit:,} readings of today's budget used",
        API_REQUESTS: f"{used:,} of {limit:,} API requests of today used",
    }.get(meter, f"{meter}: {used:,} of {limit:,}")
    then = {
        DEVICES: "new devices are refused",
        MESSAGES: "readings are dropped until midnight UTC",
        API_REQUESTS: "API requests are refused until midnight UTC",
    }.get(meter, "more is refused")
    if level >= 100:
        return f"Limit reached: {what}; {then}."
    return f"{level}% of a limit: {what}; at 100% {then}."


async def _notice(
    conn: asyncpg.Connection, meter: Meter, period: str, level: int, now: datetime
) -> None:
    inserted = await conn.fetchval(
        "INSERT INTO quota_notices (at, meter, period, level, used, quota) "
        "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (meter, period, level) DO NOTHING "
        "RETURNING id",
        now,
        meter.name,
        period,
        level,
        meter.used,
        meter.limit,
    )
    if inserted is None:
        return
    body = {
        "meter": meter.name,
        "level": level,
        "used": meter.used,
        "limit": meter.limit,
        "period": period,
        "message": notice_message(meter.name, level, meter.used, meter.limit),
    }
    await enqueue(conn, QUOTA_NOTICE, body, now)


async def current_notices(conn: asyncpg.Connection, now: datetime) -> list[dict[str, Any]]:
    """The notices that still hold: today's of the daily meters, the devices' of their current
    crossing (the highest level of each meter only)."""
    rows = await conn.fetch(
        """
        SELECT DISTINCT ON (n.meter) n.* FROM quota_notices n
        JOIN quota_meter_levels m ON m.meter = n.meter AND m.period = n.period
        WHERE n.level <= m.level AND (n.meter = $1 OR n.period = $2)
        ORDER BY n.meter, n.level DESC
        """,
        DEVICES,
        now.date().isoformat(),
    )
    return [
        {
            "meter": r["meter"],
            "level": r["level"],
            "used": r["used"],
            "limit": r["quota"],
            "at": r["at"],
            "message": notice_message(r["meter"], r["level"], r["used"], r["quota"]),
        }
        for r in rows
    ]


class QuotaWatch:
    """Checks the meters every ``WATCH_SECONDS`` and reports new notices to the control plane
    (``<USAGE_URL>/api/instances/<customer>/quota-notices``, with the usage token)."""

    def __init__(
        self,
        settings: InstanceSettings,
        pool: Callable[[], asyncpg.Pool | Turns],
        meters: Callable[[int], list[Meter]],
    ) -> None:
        """``meters`` gives the daily meters' readings, given the devices registered."""
        self._settings = settings
        self._pool = pool
        self._meters = meters
        # What each meter read at the last check (and its day): an unchanged meter is not
        # looked at again, so an idle instance's turn is one query.
        self._seen: dict[str, tuple[int, int, str]] = {}
        # Whether notices may wait to be reported (at start: those of before a restart).
        self._unreported = True

    @property
    def url(self) -> str:
        """Where notices go (billing receives them, as it receives usage)."""
        base = (self._settings.usage_url or self._settings.control_plane_url).rstrip("/")
        return f"{base}/api/instances/{self._settings.instance_customer_id}/quota-notices"

    async def check(self, now: datetime) -> list[tuple[str, int]]:
        """Record the notices due now; the (meter, level) of each new one."""
        new: list[tuple[str, int]] = []
        async with self._pool().acquire() as conn:
            devices = await count_active_devices(conn)
            for meter in self._meters(devices):
                reading = (meter.used, meter.limit, now.date().isoformat())
                if self._seen.get(meter.name) == reading:
                    continue
                async with conn.transaction():
                    new += [(meter.name, level) for level in await notice_levels(conn, meter, now)]
                self._seen[meter.name] = reading
        self._unreported = self._unreported or bool(new)
        return new

    async def report(self) -> int:
        """Send the notices the control plane does not have yet; how many went."""
        if not self._settings.usage_token or not self._unreported:
            return 0
        # A trace of its own (when there is something to send), which billing's joins.
        with reporting("report quota notices", self._settings):
            return await self._send()

    async def _send(self) -> int:
        async with self._pool().acquire() as conn:
            rows = await conn.fetch(
                "SELECT * FROM quota_notices WHERE reported_at IS NULL ORDER BY id LIMIT 20"
            )
        sent = 0
        async with httpx.AsyncClient(timeout=10, event_hooks=traced_hooks()) as client:
            for row in rows:
                answer = await client.post(
                    self.url,
                    json={
                        "meter": row["meter"],
                        "level": row["level"],
                        "used": row["used"],
                        "limit": row["quota"],
                        "period": row["period"],
                        "noticed_at": row["at"].isoformat(),
                    },
                    headers={"Authorization": f"Bearer {self._settings.usage_token}"},
                )
                answer.raise_for_status()
                async with self._pool().acquire() as conn:
                    await conn.execute(
                        "UPDATE quota_notices SET reported_at = now() WHERE id = $1", row["id"]
                    )
                sent += 1
        # All went (a failure above leaves it set, for the next turn); 20: more may wait.
        self._unreported = len(rows) == 20
        return sent

    async def run(self) -> None:
        """Check and report for ever (a failed turn is tried again at the next)."""
        failures = 0
        while True:
            # After failures, wait longer (up to 5 minutes): a control plane that refuses the
            # notices is not asked again every few seconds.
            await asyncio.sleep(min(MAX_BACKOFF_SECONDS, WATCH_SECONDS * 2**failures))
            try:
                await self.check(datetime.now(UTC))
                await self.report()
                failures = 0
            except (httpx.HTTPError, *CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
                failures = min(failures + 1, 10)
                log.warning("quota notices: %s; trying again later", type(exc).__name__)
