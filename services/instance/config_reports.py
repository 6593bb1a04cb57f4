"""Fleet devices' configuration as ingest meets it: the reports a device publishes on
``iot/device/<uuid>/config/reported`` (what it applied), and the temperature offset ingest adds
to its readings.

A report is a JSON object ``{"version": n, <the values it applied>}`` of at most ``MAX_REPORT``
bytes; ``version`` is a whole number from 0, and ``temperature_offset``, when present, a number.
It is stored in ``device_config`` (``reported`` = the values without ``version``,
``reported_version``, ``reported_at``) with the batch it came in; a device with no desired
configuration yet gets a row with ``desired`` ``{}`` at version 0 (the configuration API shows
version 0 as nothing desired).

The temperature offset: a device whose desired configuration has ``temperature_offset`` ``d``
and whose last report says it applies ``r`` itself (none when it does not say) gets ``d - r``
added by the platform, so the stored temperature carries ``d`` once: ``d`` when the device
applies nothing, nothing once it reports applying ``d``. (While a device still applies an older
offset, it gets the difference, not ``d`` on top of its own.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any

import asyncpg
import msgspec
from msgspec import Meta

# Room for the device to report back the largest desired configuration it can be sent (a PUT
# body is at most 16 KB), as the original agent does, with what it adds of its own.
MAX_REPORT = 32 * 1024
# How long ingest trusts its copy of the offsets: changes made by another replica (or by hand)
# are seen within this.
REFRESH_SECONDS = 5.0


class ReportShape(msgspec.Struct, frozen=True, kw_only=True):
    """The keys of a report ingest relies on (the others are kept as they are)."""

    version: Annotated[int, Meta(ge=0, le=2**31 - 1)]
    temperature_offset: float | None = None


class Report(msgspec.Struct, frozen=True, kw_only=True):
    """A report taken: its version, its values as JSON, and the offset the device applies."""

    version: int
    values: str
    temperature_offset: float | None


def parse_report(payload: bytes) -> Report:
    """The report in ``payload``; ``ValueError`` with the reason when it is not one."""
    if len(payload) > MAX_REPORT:
        raise ValueError(f"report oversized: {len(payload)} bytes (at most {MAX_REPORT})")
    try:
        body = msgspec.json.decode(payload)
    except msgspec.DecodeError as exc:
        raise ValueError(f"report malformed: {exc}") from None
    except RecursionError:  # nested deeper than the decoder goes
        raise ValueError("report malformed: nested too deeply") from None
    if not isinstance(body, dict):
        raise ValueError('report invalid: a report is a JSON object {"version": n, ...}')
    try:
        shape = msgspec.convert(body, ReportShape)
    except msgspec.ValidationError as exc:
        raise ValueError(f"report invalid: {exc}") from None
    if _holds_nul(body):
        # Postgres's jsonb cannot store it: the batch's transaction would fail with it.
        raise ValueError("report invalid: a key or string holds a NUL character (\\u0000)")
    values = {k: v for k, v in body.items() if k != "version"}
    return Report(
        version=shape.version,
        values=msgspec.json.encode(values).decode(),
        temperature_offset=shape.temperature_offset,
    )


async def store_reports(
    conn: asyncpg.Connection, reports: Mapping[str, tuple[datetime, Report]]
) -> None:
    """Store each device's latest report (in the caller's transaction)."""
    await conn.executemany(
        """
        INSERT INTO device_config (device_id, desired, version, desired_at,
                                   reported, reported_version, reported_at)
        VALUES ($1, '{}'::jsonb, 0, $2, $3::jsonb, $4, $2)
        ON CONFLICT (device_id) DO UPDATE SET
            reported = EXCLUDED.reported,
            reported_version = EXCLUDED.reported_version,
            reported_at = EXCLUDED.reported_at
        """,
        [(device_id, at, r.values, r.version) for device_id, (at, r) in reports.items()],
    )


async def fleet_devices(conn: asyncpg.Connection) -> dict[str, str]:
    """The active fleet devices: their device ids by uuid."""
    rows = await conn.fetch(
        "SELECT uuid, device_id FROM devices WHERE deleted_at IS NULL AND uuid IS NOT NULL"
    )
    return {r["uuid"]: r["device_id"] for r in rows}


class TemperatureOffsets:
    """Ingest's copy of each fleet device's desired and reported temperature offsets."""

    def __init__(self) -> None:
        """Empty, and due to be loaded."""
        self._desired: dict[str, float] = {}
        self._reported: dict[str, float | None] = {}
        self._loaded_at: float | None = None

    def mark_stale(self) -> None:
        """A configuration changed: load again before the next batch."""
        self._loaded_at = None

    def due(self, clock: float) -> bool:
        """Whether the copy is stale or older than ``REFRESH_SECONDS`` at ``clock``."""
        return self._loaded_at is None or clock - self._loaded_at >= REFRESH_SECONDS

    async def load(self, conn: asyncpg.Connection, clock: float) -> None:
        """Load every active device's offsets from the database, as of ``clock``."""
        rows = await conn.fetch(
            """
            SELECT c.device_id,
                   CASE WHEN jsonb_typeof(c.desired -> 'temperature_offset') = 'number'
                        THEN (c.desired ->> 'temperature_offset')::double precision END
                       AS desired,
                   CASE WHEN jsonb_typeof(c.reported -> 'temperature_offset') = 'number'
                        THEN (c.reported ->> 'temperature_offset')::double precision END
                       AS reported
            FROM device_config c JOIN devices d USING (device_id)
            WHERE d.deleted_at IS NULL
            """
        )
        self._desired = {r["device_id"]: r["desired"] for r in rows if r["desired"] is not None}
        self._reported = {r["device_id"]: r["reported"] for r in rows}
        self._loaded_at = clock

    def reported(self, device_id: str, temperature_offset: float | None) -> None:
        """The device reported the offset it applies itself (None: none)."""
        self._reported[device_id] = temperature_offset

    def forget(self, device_id: str) -> None:
        """A deleted device has no offsets."""
        self._desired.pop(device_id, None)
        self._reported.pop(device_id, None)

    def applied(self, device_id: str) -> float | None:
        """What the platform adds to the device's temperatures (None: nothing)."""
        desired = self._desired.get(device_id)
        if desired is None:
            return None
        offset = round(desired - (self._reported.get(device_id) or 0.0), 6)
        return offset if offset and math.isfinite(offset) else None


def _holds_nul(value: Any) -> bool:
    """Whether a decoded JSON value has a NUL character in any key or string."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False
