"""Everything a customer owns, as one archive streamed from a snapshot of the database.

The archive (``archive.py``) holds the devices (with their desired configurations), the
provisioning keys' metadata, the alert rules, their history and the presets installed, the
sensors' calibration (state, runs, changes), the quota notices and refusals, the integrations'
configuration, the hourly rollups, every reading once per device and UTC day in CSV and in
Parquet, optionally the dead letters, and the customer's own events from the control plane's
log; ``manifest.json`` last. Everything is read in one repeatable-read transaction, so the
archive is one moment's state while ingest goes on.

Memory stays bounded whatever the size: a device-day of readings at a time (COPY'd out of
Postgres as CSV, parsed by pyarrow into Parquet), and every other file through a spooled
temporary file (in memory up to ``SPOOL_BYTES``, on disk beyond) whose size the tar header
needs before its bytes. Nothing secret leaves: no broker passwords (the broker keeps only
their hashes, and the instance not even those), no hashes of provisioning or device API keys,
no webhook or integration signing secrets. Left out as state of this instance's own working,
not the customer's data: the alert rules' evaluation (``alert_windows``, ``alert_states``: a
new instance evaluates from the readings), the quota bucket's level and the meters' levels
noticed, the integrations' outbox (``integration_events``, ``reading_batches``: what they
record is in the tables above) and their backfills. An integration's delivery position is in
its row but means nothing elsewhere: an import starts it anew.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import IO, Any

import asyncpg

from services.instance.archive import (
    END,
    FORMAT,
    FORMAT_VERSION,
    HEADER_NAME,
    MANIFEST_NAME,
    FileEntry,
    header_file,
    member_header,
    padding,
    safe_part,
)
from services.instance.readings import METRICS

SPOOL_BYTES = 8 << 20
# A device's rollups of years may take longer to copy out than the pool's usual 30 s.
STATEMENT_SECONDS = 600.0
CHUNK = 1 << 20
# The readings' columns in the archive: the table's, the time in RFC 3339 UTC.
READING_COLUMNS = ("device_id", "ts", *METRICS, "temperature_offset")
TS_TEXT = """to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS ts"""
ROLLUP_COLUMNS = ("device_id", "hour", "metric", "n", "total", "low", "high")
HOUR_TEXT = """to_char(hour AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"') AS hour"""

# The tables exported as JSON lines: every column of each row (so columns added later come
# along), less the secret ones named here, which never leave the instance.
SECRET_COLUMNS: dict[str, tuple[str, ...]] = {
    "devices": ("api_key_hash",),
    "device_config": (),
    "provisioning_keys": ("key_hash",),
    "alert_rules": ("webhook_secret",),
    "alert_history": (),
    "alert_presets": (),
    "calibration": (),
    "calibration_runs": (),
    "calibration_changes": (),
    "quota_notices": (),
    "quota_limited": (),
    "integrations": ("secret",),
}
ORDER = {
    "devices": "created_at, device_id",
    "device_config": "device_id",
    "provisioning_keys": "created_at, key_id",
    "alert_rules": "created_at, rule_id",
    "alert_history": "id",
    "alert_presets": "installed_at, preset",
    "calibration": "device_id",
    "calibration_runs": "device_id, started_at",
    "calibration_changes": "id",
    "quota_notices": "id",
    "quota_limited": "id",
    "integrations": "created_at, integration_id",
}


def table_query(table: str) -> str:
    """A table's rows as JSON text, its secret columns left out."""
    secret = ", ".join(f"'{c}'" for c in SECRET_COLUMNS[table])
    drop = f" - ARRAY[{secret}]::text[]" if secret else ""
    return f"SELECT (to_jsonb(t){drop})::text FROM {table} t ORDER BY {ORDER[table]}"


DEAD_LETTERS = (
    "SELECT row_to_json(t)::text FROM (SELECT id, received_at, topic, device_id, reason, "
    "encode(payload, 'base64') AS payload FROM dead_letters ORDER BY id) t"
)


@dataclass
class Spooled:
    """A file being made for the archive: its bytes (spooled), hash, size and rows."""

    body: IO[bytes] = field(
        default_factory=lambda: tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # noqa: SIM115
    )
    digest: Any = field(default_factory=hashlib.sha256)
    size: int = 0
    rows: int = 0

    def write(self, data: bytes) -> None:
        """Add ``data`` to the file."""
        self.body.write(data)
        self.digest.update(data)
        self.size += len(data)


class ArchiveWriter:
    """Tar members as bytes, each recorded for the manifest."""

    def __init__(self) -> None:
        """An archive with nothing written yet."""
        self.entries: list[FileEntry] = []
        self.mtime = time.time()

    def small(
        self, name: str, kind: str, data: bytes, rows: int | None = None, **extra: Any
    ) -> bytes:
        """A member held in memory whole."""
        self.entries.append(
            FileEntry(name, kind, hashlib.sha256(data).hexdigest(), len(data), rows, extra)
        )
        return member_header(name, len(data), self.mtime) + data + padding(len(data))

    def spooled(self, name: str, kind: str, file: Spooled, **extra: Any) -> Iterator[bytes]:
        """A member from a spooled file, in chunks; the file is closed after."""
        self.entries.append(
            FileEntry(name, kind, file.digest.hexdigest(), file.size, file.rows, extra)
        )
        yield member_header(name, file.size, self.mtime)
        file.body.seek(0)
        while chunk := file.body.read(CHUNK):
            yield chunk
        file.body.close()
        yield padding(file.size)


async def _jsonl(conn: asyncpg.Connection, query: str) -> Spooled:
    """The rows of ``query`` (each one JSON text) as JSON lines, spooled."""
    out = Spooled()
    async for row in conn.cursor(query, prefetch=500):
        out.write(row[0].encode() + b"\n")
        out.rows += 1
    return out


async def _copy_csv(conn: asyncpg.Connection, query: str, *args: Any) -> tuple[bytes, int]:
    """The rows of ``query`` as CSV with a header, and how many there were."""
    buffer = io.BytesIO()

    async def take(chunk: bytes) -> None:
        buffer.write(chunk)

    status = await conn.copy_from_query(
        query, *args, output=take, format="csv", header=True, timeout=STATEMENT_SECONDS
    )
    return buffer.getvalue(), int(status.split()[-1])


def literal(value: str) -> str:
    """``value`` as an SQL string literal (standard-conforming strings, as Postgres has them
    by default): COPY of a query takes no parameters, and asyncpg's way round that costs a
    statement's preparation and a round trip per device-day."""
    if "\0" in value:
        raise ValueError("a text value with a NUL byte")
    return "'" + value.replace("'", "''") + "'"


def _readings_sql(device_id: str, day: date) -> str:
    columns = ", ".join(TS_TEXT if c == "ts" else c for c in READING_COLUMNS)
    start, end = _day_range(day)
    # One partition (pruned by the range), the device's rows of the day by the key's index.
    return (
        f"SELECT {columns} FROM readings WHERE device_id = {literal(device_id)} "
        f"AND ts >= {literal(start.isoformat())} AND ts < {literal(end.isoformat())} "
        "ORDER BY ts"
    )


def _day_range(day: date) -> tuple[datetime, datetime]:
    start = datetime.combine(day, datetime.min.time(), UTC)
    return start, start + timedelta(days=1)


async def reading_days(conn: asyncpg.Connection) -> list[date]:
    """The UTC days that have a partition of readings, oldest first."""
    names = await conn.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'readings' "
        "AND p.relnamespace = current_schema()::regnamespace"
    )
    days = []
    for row in names:
        try:
            days.append(datetime.strptime(row["relname"], "readings_%Y%m%d").date())
        except ValueError:
            continue
    return sorted(days)


async def devices_of_day(conn: asyncpg.Connection, day: date) -> list[str]:
    """The devices with readings on ``day`` (a skip over the key's index, not a scan)."""
    rows = await conn.fetch(
        """
        WITH RECURSIVE d AS (
            SELECT min(device_id) AS id FROM readings WHERE ts >= $1 AND ts < $2
            UNION ALL
            SELECT (
                SELECT min(device_id) FROM readings
                WHERE device_id > d.id AND ts >= $1 AND ts < $2
            )
            FROM d WHERE d.id IS NOT NULL
        )
        SELECT id FROM d WHERE id IS NOT NULL
        """,
        *_day_range(day),
    )
    return [r["id"] for r in rows]


def parquet_of(csv_bytes: bytes) -> bytes:
    """The same rows as Parquet (zstd), with the columns' own types: float32 for the values
    stored as float4, int16 for the accuracy, microsecond UTC timestamps."""
    import pyarrow as pa  # loaded by an export only: most instances never pay for it
    from pyarrow import csv as pacsv
    from pyarrow import parquet as pq

    types: dict[str, Any] = {
        c: pa.float32() for c in (*METRICS, "temperature_offset") if c != "iaq_accuracy"
    }
    types |= {"device_id": pa.string(), "iaq_accuracy": pa.int16()}
    types["ts"] = pa.timestamp("us", tz="UTC")
    table = pacsv.read_csv(
        io.BytesIO(csv_bytes),
        # A device-day is small: a pool of threads for it costs more than it saves.
        read_options=pacsv.ReadOptions(use_threads=False),
        convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=False),
    )
    out = io.BytesIO()
    pq.write_table(table, out, compression="zstd")
    del table
    # Arrow's allocator keeps what it freed for a while; an instance should not.
    pa.default_memory_pool().release_unused()
    return out.getvalue()


@dataclass
class ReadingsSpan:
    """The first and last reading time seen, and how many readings."""

    first: str | None = None
    last: str | None = None
    count: int = 0

    def add(self, csv_bytes: bytes, rows: int) -> None:
        """Take a device-day's CSV (ordered by time) into account."""
        if not rows:
            return
        lines = csv_bytes.rstrip(b"\n").split(b"\n", 2)
        first = lines[1].split(b",")[1].decode()
        last = csv_bytes.rstrip(b"\n").rsplit(b"\n", 1)[-1].split(b",")[1].decode()
        self.first = first if self.first is None or first < self.first else self.first
        self.last = last if self.last is None or last > self.last else self.last
        self.count += rows


async def _readings(
    conn: asyncpg.Connection, writer: ArchiveWriter, span: ReadingsSpan
) -> AsyncIterator[bytes]:
    # A device-day's Parquet is made in a thread (pyarrow lets go of the GIL) while the next
    # device-day is read from Postgres: two device-days in memory at most.
    pending: tuple[asyncio.Future[bytes], str, int, dict[str, Any]] | None = None
    for day in await reading_days(conn):
        for device_id in await devices_of_day(conn, day):
            csv_bytes, rows = await _copy_csv(conn, _readings_sql(device_id, day))
            span.add(csv_bytes, rows)
            base = f"readings/{safe_part(device_id)}/{day.isoformat()}"
            extra = {"device_id": device_id, "day": day.isoformat()}
            # One conversion at a time: the last one ends before this one starts.
            done = None if pending is None else (pending, await pending[0])
            making = asyncio.ensure_future(asyncio.to_thread(parquet_of, csv_bytes))
            yield writer.small(f"{base}.csv", "readings-csv", csv_bytes, rows, **extra)
            if done is not None:
                yield _parquet_member(writer, *done[0], done[1])
            pending = (making, base, rows, extra)
    if pending is not None:
        yield _parquet_member(writer, *pending, await pending[0])


def _parquet_member(
    writer: ArchiveWriter,
    _: asyncio.Future[bytes],
    base: str,
    rows: int,
    extra: dict[str, Any],
    parquet: bytes,
) -> bytes:
    return writer.small(f"{base}.parquet", "readings-parquet", parquet, rows, **extra)


async def _rollups(conn: asyncpg.Connection, writer: ArchiveWriter) -> AsyncIterator[bytes]:
    devices = await conn.fetch("SELECT DISTINCT device_id FROM readings_hourly ORDER BY 1")
    columns = ", ".join(HOUR_TEXT if c == "hour" else c for c in ROLLUP_COLUMNS)
    for row in devices:
        device_id = row["device_id"]
        out = Spooled()

        async def take(chunk: bytes, out: Spooled = out) -> None:
            out.write(chunk)

        status = await conn.copy_from_query(
            f"SELECT {columns} FROM readings_hourly WHERE device_id = $1 ORDER BY hour, metric",
            device_id,
            output=take,
            format="csv",
            header=True,
            timeout=STATEMENT_SECONDS,
        )
        out.rows = int(status.split()[-1])
        name = f"rollups/{safe_part(device_id)}.csv"
        for part in writer.spooled(name, "rollups-csv", out, device_id=device_id):
            yield part


@dataclass(frozen=True)
class ExportRequest:
    """What an export holds besides the database: the customer, their events from the log
    (JSON lines, spooled; None with the reason when they could not be had)."""

    customer_id: str
    events: Spooled | None
    events_note: str | None = None
    dead_letters: bool = False


async def export_archive(pool: asyncpg.Pool, request: ExportRequest) -> AsyncIterator[bytes]:
    """The archive, in parts, from one snapshot of the database."""
    writer = ArchiveWriter()
    span = ReadingsSpan()
    yield writer.small(HEADER_NAME, "format", header_file())
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        counts: dict[str, int] = {}
        tables = {f"{table}.jsonl": table_query(table) for table in SECRET_COLUMNS}
        if request.dead_letters:
            tables["dead_letters.jsonl"] = DEAD_LETTERS
        for name, query in tables.items():
            spooled = await _jsonl(conn, query)
            counts[name.removesuffix(".jsonl")] = spooled.rows
            for part in writer.spooled(name, name.removesuffix(".jsonl"), spooled):
                yield part
        async for part in _rollups(conn, writer):
            yield part
        async for part in _readings(conn, writer, span):
            yield part
        counts["rollups"] = sum(e.rows or 0 for e in writer.entries if e.kind == "rollups-csv")
    counts["readings"] = span.count
    events: dict[str, Any] = {"included": request.events is not None}
    if request.events is not None:
        counts["events"] = request.events.rows
        for part in writer.spooled("events.jsonl", "events", request.events):
            yield part
    else:
        events["reason"] = request.events_note
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "customer_id": request.customer_id,
        "exported_at": datetime.now(UTC).isoformat(),
        "time_range": {"from": span.first, "to": span.last},
        "counts": counts,
        "events": events,
        "dead_letters": request.dead_letters,
        "files": [e.as_json() for e in writer.entries if e.name != HEADER_NAME],
    }
    yield writer.small(MANIFEST_NAME, "manifest", json.dumps(manifest, indent=1).encode())
    yield END
