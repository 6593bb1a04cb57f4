"""Reporting the instance's usage to billing: today's counts every few minutes, and each
finished day once more as final. A report that does not get through is sent again at the next
turn; billing stores each distinct report once and keeps the highest counts."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
import httpx

from libs.db.postgres import CONNECTION_ERRORS, Turns
from libs.observability.telemetry import traced_hooks
from services.instance.devices import count_active_devices
from services.instance.settings import InstanceSettings
from services.instance.start import reporting

log = logging.getLogger(__name__)


async def usage_day(conn: asyncpg.Connection, day: date) -> asyncpg.Record | None:
    """The counters of ``day`` (``usage_days``), or None before anything was counted."""
    return await conn.fetchrow("SELECT * FROM usage_days WHERE day = $1", day)


async def database_size(conn: asyncpg.Connection) -> int:
    """The size of the instance's database, in bytes."""
    return int(await conn.fetchval("SELECT pg_database_size(current_database())"))


async def usage_of(conn: asyncpg.Connection, day: date) -> dict[str, Any]:
    """The instance's counts for ``day``."""
    row = await usage_day(conn, day)
    return {
        "day": day.isoformat(),
        "devices": await count_active_devices(conn),
        "mqtt_messages": row["mqtt_messages"] if row else 0,
        "api_requests": row["api_requests"] if row else 0,
        "rejected_readings": row["rejected_readings"] if row else 0,
        "storage_bytes": await database_size(conn),
    }


class UsageReporter:
    """Posts usage to ``<USAGE_URL>/api/instances/<customer>/usage`` (billing; USAGE_URL
    defaults to CONTROL_PLANE_URL)."""

    def __init__(
        self, settings: InstanceSettings, pool: Callable[[], asyncpg.Pool | Turns]
    ) -> None:
        """Does nothing without a usage token (an instance started by hand)."""
        self._settings = settings
        self._pool = pool
        self._final_sent: date | None = None

    @property
    def url(self) -> str:
        """Where reports go."""
        base = (self._settings.usage_url or self._settings.control_plane_url).rstrip("/")
        return f"{base}/api/instances/{self._settings.instance_customer_id}/usage"

    async def report(self, now: datetime) -> None:
        """Send today's counts, and yesterday's as final once."""
        today = now.date()
        async with self._pool().acquire() as conn:
            reports = [{**await usage_of(conn, today), "final": False}]
            if self._final_sent != today - timedelta(days=1):
                reports.insert(
                    0, {**await usage_of(conn, today - timedelta(days=1)), "final": True}
                )
        async with httpx.AsyncClient(timeout=10, event_hooks=traced_hooks()) as client:
            for body in reports:
                answer = await client.post(
                    self.url,
                    json=body,
                    headers={"Authorization": f"Bearer {self._settings.usage_token}"},
                )
                answer.raise_for_status()
                if body["final"]:
                    self._final_sent = today - timedelta(days=1)

    async def run(self) -> None:
        """Report every ``USAGE_REPORT_SECONDS`` (the first time soon after start)."""
        if not self._settings.usage_token:
            log.warning("no USAGE_TOKEN: usage is not reported to billing")
            await asyncio.Event().wait()  # nothing to do, and nothing wrong: a task that ends
            # while the instance runs is restarted and reported by its supervisor
        await asyncio.sleep(min(5.0, self._settings.usage_report_seconds))
        while True:
            try:
                # A trace of its own, which billing's handling of it joins.
                with reporting("report usage", self._settings):
                    await self.report(datetime.now(UTC))
            except (httpx.HTTPError, *CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
                log.warning("usage report not sent (%s); next turn", type(exc).__name__)
            await asyncio.sleep(self._settings.usage_report_seconds)
