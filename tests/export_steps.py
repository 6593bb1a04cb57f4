"""Steps the export tests and ``./dev bench export`` share: readings written as ingest writes
them, and an archive's members read back."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from services.instance.calibration import track_calibration
from services.instance.readings import store_readings

START = datetime(2026, 3, 1, tzinfo=UTC)


def reading_row(device_id: str, ts: datetime, i: int) -> tuple[Any, ...]:
    """One row of ``readings`` (ROW_COLUMNS order), its values varying with ``i``."""
    return (
        device_id,
        ts,
        20.0 + (i % 100) / 10,
        40.0 + (i % 50) / 5,
        1000.0 + (i % 30) / 3,
        1.2e5 + i % 1000,
        25.0 + i % 200 if i % 7 else None,
        i % 4 if i % 7 else None,
        600.0 + i % 400,
        0.5 + (i % 10) / 10,
        0.4 if i % 3 == 0 else None,
    )


async def seed_readings(
    conn: asyncpg.Connection,
    device_ids: list[str],
    days: int,
    per_day: int,
    start: datetime = START,
    batch: int = 50_000,
) -> int:
    """``per_day`` readings a day for ``days`` days for each device, stored (with their hourly
    rollups and the sensors' calibration followed) as ingest stores them; how many."""
    step = timedelta(days=1) / per_day
    known: set[Any] = set()
    count = 0
    for device_id in device_ids:
        rows: list[tuple[Any, ...]] = []
        for i in range(days * per_day):
            rows.append(reading_row(device_id, start + i * step, i))
            if len(rows) >= batch:
                async with conn.transaction():
                    count += await store_readings(conn, rows, known)
                    await track_calibration(conn)
                rows = []
        if rows:
            async with conn.transaction():
                count += await store_readings(conn, rows, known)
                await track_calibration(conn)
    return count


def members(archive: bytes) -> dict[str, bytes]:
    """Every member of a tar archive, by name, in order."""
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:") as tar:
        out = {}
        for member in tar.getmembers():
            body = tar.extractfile(member)
            out[member.name] = body.read() if body else b""
        return out


def manifest_of(archive: bytes) -> dict[str, Any]:
    """The archive's manifest."""
    return dict(json.loads(members(archive)["manifest.json"]))


def sha256(data: bytes) -> str:
    """Hex sha256."""
    return hashlib.sha256(data).hexdigest()


def retar(parts: dict[str, bytes]) -> bytes:
    """An archive of ``parts`` in their order (to make a damaged or forged archive)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:", format=tarfile.PAX_FORMAT) as tar:
        for name, data in parts.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()
