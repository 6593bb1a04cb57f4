"""What ingest buffers between two writes, and how one batch is written: in one transaction,
the new readings with their rollups and the devices' calibration, the dead letters, the day's
usage counters, the devices' last-seen times, the firmware they reported and the fleet devices'
configuration reports. A reading already stored (delivered again) is skipped and counted
nowhere, so every count is of readings actually added."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

import asyncpg

from services.instance.calibration import track_calibration
from services.instance.config_reports import Report, store_reports
from services.instance.dead_letters import record_dead_letters
from services.instance.quotas import Refusals, merge_refusals, record_refusals
from services.instance.readings import readings_added, store_readings


@dataclass
class Batch:
    """What arrived since the last write."""

    rows: list[tuple[Any, ...]] = field(default_factory=list)
    dead: list[tuple[Any, ...]] = field(default_factory=list)
    seen: dict[str, tuple[datetime, str]] = field(default_factory=dict)
    # The firmware each device last reported in a JSON status, and when.
    firmware: dict[str, tuple[datetime, str]] = field(default_factory=dict)
    # The configuration each fleet device last reported applying, and when.
    reports: dict[str, tuple[datetime, Report]] = field(default_factory=dict)
    usage: Counter[str] = field(default_factory=Counter)
    # Messages from devices not known yet: looked up again before the batch is written.
    unknown: list[tuple[str, bytes, datetime, int]] = field(default_factory=list)
    # The broker's packet ids to acknowledge once the batch is stored, and their connection.
    acks: list[int] = field(default_factory=list)
    connection: int = 0
    # What the quotas refused, per limit, device and minute (``quotas``).
    refused: Refusals = field(default_factory=dict)

    def has_writes(self) -> bool:
        """Whether writing the batch would store or acknowledge anything."""
        return bool(
            self.rows
            or self.dead
            or self.seen
            or self.firmware
            or self.reports
            or +self.usage
            or self.acks
            or self.refused
        )

    def absorb(self, later: Batch) -> None:
        """Take in what arrived in ``later`` while this batch failed to be written, so both
        are written (and acknowledged) together on the next try."""
        self.rows.extend(later.rows)
        self.dead.extend(later.dead)
        self.seen.update(later.seen)
        self.firmware.update(later.firmware)
        self.reports.update(later.reports)
        self.usage.update(later.usage)
        self.unknown.extend(later.unknown)
        merge_refusals(self.refused, later.refused)
        if later.connection == self.connection:
            self.acks.extend(later.acks)
        else:
            self.acks, self.connection = later.acks, later.connection


async def write_batch(
    conn: asyncpg.Connection, batch: Batch, day: date, partitions: set[date]
) -> tuple[int, list[tuple[Any, ...]]]:
    """Write ``batch`` (in the caller's transaction), counting its usage on ``day``; returns
    how many readings were added and their rows."""
    stored, added = 0, batch.rows
    if batch.rows:
        stored = await store_readings(conn, batch.rows, partitions)
        if stored < len(batch.rows):  # some came again: only the new ones are added
            added = _only(batch.rows, await readings_added(conn))
        await track_calibration(conn)
    if batch.dead:
        await record_dead_letters(conn, batch.dead)
    await _record_usage(conn, batch.usage, day, stored)
    for device_id, (seen, status) in batch.seen.items():
        await conn.execute(
            "UPDATE devices SET last_seen = GREATEST(last_seen, $2), status = $3 "
            "WHERE device_id = $1",
            device_id,
            seen,
            status,
        )
    for device_id, (reported, firmware) in batch.firmware.items():
        await conn.execute(
            "UPDATE devices SET firmware = $2, firmware_reported_at = $3 WHERE device_id = $1",
            device_id,
            firmware,
            reported,
        )
    if batch.reports:
        await store_reports(conn, batch.reports)
    if batch.refused:
        await record_refusals(conn, batch.refused)
    return stored, added


async def _record_usage(
    conn: asyncpg.Connection, usage: Counter[str], day: date, stored: int
) -> None:
    await conn.execute(
        """
        INSERT INTO usage_days (day, mqtt_messages, stored_readings, rejected_readings,
                                over_quota_readings, api_requests)
        VALUES ($1, $2, $3, $4, $5, $6)
        ON CONFLICT (day) DO UPDATE SET
            mqtt_messages = usage_days.mqtt_messages + EXCLUDED.mqtt_messages,
            stored_readings = usage_days.stored_readings + EXCLUDED.stored_readings,
            rejected_readings = usage_days.rejected_readings + EXCLUDED.rejected_readings,
            over_quota_readings = usage_days.over_quota_readings
                + EXCLUDED.over_quota_readings,
            api_requests = usage_days.api_requests + EXCLUDED.api_requests
        """,
        day,
        stored,
        stored,
        usage["rejected_readings"],
        usage["over_quota_readings"],
        usage["api_requests"],
    )


def _only(rows: list[tuple[Any, ...]], keys: set[tuple[str, datetime]]) -> list[tuple[Any, ...]]:
    """The rows whose (device_id, ts) is in ``keys``, each key once."""
    left = set(keys)
    found = []
    for row in rows:
        if (row[0], row[1]) in left:
            left.discard((row[0], row[1]))
            found.append(row)
    return found
