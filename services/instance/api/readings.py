"""Readings: aggregates per bucket, the CSV export, the newest of every device, and the live
stream the dashboard's charts draw (server-sent events)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from litestar import Controller, Request, get
from litestar.params import FromPath, QueryParameter
from litestar.response import ServerSentEvent, ServerSentEventMessage, Stream

from libs.http.auth import bearer
from libs.http.errors import invalid
from libs.http.validation import FieldErrors
from services.instance.api.access import COOKIE, INSTANCE, Instance, customer_session
from services.instance.auth import ControlPlaneUnavailable
from services.instance.devices import active_devices, known_device
from services.instance.live import LiveReadings
from services.instance.readings import (
    METRICS,
    BucketName,
    aggregate,
    export_csv,
    latest,
    parse_metrics,
)

# Times a query may name, in UTC: a timestamptz, a Python datetime and every offset of both
# hold them, so no range arithmetic overflows.
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(9999, 12, 30, tzinfo=UTC)
MAX_RANGE = timedelta(days=400)
KEEP_ALIVE_SECONDS = 15
TIME_DOC = "RFC 3339 time (UTC without an offset), from 1970-01-01 to 9999-12-30 in UTC"
METRICS_PATTERN = f"^(({'|'.join(METRICS)})(,({'|'.join(METRICS)}))*)?$"
From = Annotated[
    datetime | None,
    QueryParameter(name="from", description=f"{TIME_DOC}; default: `to` minus 24 hours"),
]
To = Annotated[datetime | None, QueryParameter(name="to", description=f"{TIME_DOC}; default: now")]
Bucket = Annotated[BucketName, QueryParameter(description="bucket width")]
Metrics = Annotated[
    str | None,
    QueryParameter(
        description=f"comma-separated, any of {', '.join(METRICS)}; absent or empty: all",
        max_length=len(",".join(METRICS)),
        pattern=METRICS_PATTERN,
    ),
]


def utc(value: datetime | None, field: str, default: datetime) -> datetime:
    """``value`` in UTC (naive: taken as UTC), ``default`` when absent; a 400 naming ``field``
    outside ``EARLIEST``..``LATEST``."""
    if value is None:
        return default
    try:
        moment = value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    except OverflowError:  # 9999-12-31T23:59-14:00 is in the year 10000 in UTC
        moment = None
    if moment is None or not EARLIEST <= moment <= LATEST:
        raise invalid(field, "must be from 1970-01-01 to 9999-12-30 (UTC)")
    return moment


def time_range(
    start_at: datetime | None, end_at: datetime | None, metrics: str | None = None
) -> tuple[datetime, datetime, list[str]]:
    """The range asked for (by default the last 24 hours) and the metrics, or a 400 naming
    every bad parameter."""
    end = utc(end_at, "to", datetime.now(UTC))
    start = utc(start_at, "from", end - timedelta(hours=24))
    errors = FieldErrors()
    if start >= end:
        errors.add("from", "must be before to")
    if end - start > MAX_RANGE:
        errors.add("from", "the range may span at most 400 days")
    try:
        asked = parse_metrics(metrics)
    except ValueError as exc:
        errors.add("metrics", str(exc))
        asked = []
    errors.raise_if_any()
    return start, end, asked


async def _started(body: AsyncIterator[str]) -> AsyncIterator[str]:
    """``body`` with its first part made before the answer starts: the query's arguments and
    its first rows are taken while an error can still be a status, not a cut-off body."""
    first = await anext(body)

    async def whole() -> AsyncIterator[str]:
        yield first
        async for part in body:
            yield part

    return whole()


async def _live(
    live: LiveReadings, still_signed_in: Callable[[], Awaitable[bool]]
) -> AsyncIterator[ServerSentEventMessage]:
    """Each reading as it is stored, with a comment every ``KEEP_ALIVE_SECONDS`` of quiet.
    The session that opened the stream is checked as often (the instance caches the control
    plane's answer for a minute): a stream outlives no password reset, closing or expiry; the
    browser's EventSource reconnects, with the session it has then."""
    with live.watch() as queue:
        yield ServerSentEventMessage(comment="connected")
        checked = time.monotonic()
        while True:
            try:
                reading = await asyncio.wait_for(queue.get(), KEEP_ALIVE_SECONDS)
            except TimeoutError:
                reading = None
            if time.monotonic() - checked >= KEEP_ALIVE_SECONDS:
                if not await still_signed_in():
                    return
                checked = time.monotonic()
            if reading is None:
                yield ServerSentEventMessage(comment="keep-alive")
            else:
                yield ServerSentEventMessage(event="reading", data=json.dumps(reading))


class ReadingsController(Controller):
    """The devices' readings."""

    path = "/api"
    guards = (customer_session,)
    dependencies = INSTANCE

    @get("/devices/{device_id:str}/readings", tags=["readings"])
    async def readings(
        self,
        device_id: FromPath[str],
        instance: Instance,
        start_at: From = None,
        end_at: To = None,
        bucket: Bucket = "5m",
        metrics: Metrics = None,
    ) -> dict[str, Any]:
        """avg/min/max per bucket (``1m``, ``5m``, ``1h``, ``1d``) between ``from`` and ``to``,
        and the spans of buckets that hold readings taken before calibration
        (``calibrating``: BSEC's ``iaq_accuracy`` below 3)."""
        start, end, metrics_asked = time_range(start_at, end_at, metrics)
        async with instance.pool().acquire() as conn:
            await known_device(conn, device_id, include_deleted=True)
            return await aggregate(conn, device_id, start, end, bucket, metrics_asked)

    @get("/devices/{device_id:str}/readings.csv", tags=["readings"])
    async def readings_csv(
        self,
        device_id: FromPath[str],
        instance: Instance,
        start_at: From = None,
        end_at: To = None,
    ) -> Stream:
        """Every stored reading between ``from`` and ``to`` as CSV; its last columns are the
        temperature offset applied at ingest and ``calibrating`` (``true`` for a reading taken
        before calibration)."""
        start, end, _ = time_range(start_at, end_at)
        async with instance.pool().acquire() as conn:
            await known_device(conn, device_id, include_deleted=True)
        return Stream(
            await _started(export_csv(instance.pool(), device_id, start, end)),
            media_type="text/csv",
            headers={"Content-Disposition": f'attachment; filename="{device_id}.csv"'},
        )

    @get("/readings/latest", tags=["readings"])
    async def latest_readings(self, instance: Instance) -> dict[str, Any]:
        """The newest reading of every device."""
        async with instance.pool().acquire() as conn:
            ids = [r["device_id"] for r in await active_devices(conn)]
            return {"latest": await latest(conn, ids)}

    @get("/stream", tags=["readings"])
    async def stream(self, request: Request[Any, Any, Any], instance: Instance) -> ServerSentEvent:
        """Readings as they are stored (server-sent events, event ``reading``), while the
        session that asked is valid."""
        token = bearer(request) or request.cookies.get(COOKIE)

        async def still_signed_in() -> bool:
            try:
                return await instance.sessions.caller(token) == "customer"
            except ControlPlaneUnavailable:
                return True  # the control plane away a moment does not stop the charts

        return ServerSentEvent(_live(instance.live, still_signed_in))
