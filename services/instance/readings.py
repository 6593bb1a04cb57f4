"""BME688 readings: what a device may publish, how it is stored, and how it is queried.

A reading is validated by msgspec against the sensor's ranges (and the BSEC outputs when
present) before it is stored; anything else goes to the dead-letter table with the reason.
Readings live in a table partitioned by UTC day (partitions are made as days arrive and
dropped whole when they pass the license's retention) with hourly rollups per metric, so a
30-day query reads about 720 rows per metric and device instead of millions.

Longer than 400 lines because it is the one place that knows the readings' columns: how a
reading is checked, stored, rolled up and read back must change together.
"""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any, Literal

import asyncpg
import msgspec
from msgspec import Meta

METRICS = (
    "temperature",
    "humidity",
    "pressure",
    "gas_resistance",
    "iaq",
    "iaq_accuracy",
    "co2_equivalent",
    "breath_voc_equivalent",
)
COLUMNS = ("device_id", "ts", *METRICS)
# The columns of a row as ingest writes it: the reading's, then the temperature offset the
# platform added (null when none; see ``record``).
ROW_COLUMNS = (*COLUMNS, "temperature_offset")
# A reading taken before its sensor was calibrated (BSEC's accuracy below 3, see
# ``calibration``): marked in the charts and the CSV, left out of alerts by default.
CALIBRATING_SQL = "(iaq_accuracy IS NOT NULL AND iaq_accuracy < 3)"
# The readings CSV's columns after ``ts``: the reading's, the temperature offset the platform
# added, and whether it was taken before calibration (``true``/``false``).
CSV_COLUMNS = (*METRICS, "temperature_offset", "calibrating")
# Stored as float4 (real); the rest are whole numbers.
REAL_METRICS = frozenset(METRICS) - {"iaq_accuracy"}
BucketName = Literal["1m", "5m", "1h", "1d"]  # the keys of BUCKETS
BUCKETS: dict[str, timedelta] = {
    "1m": timedelta(minutes=1),
    "5m": timedelta(minutes=5),
    "1h": timedelta(hours=1),
    "1d": timedelta(days=1),
}
# Ranges longer than this are answered from the hourly rollups.
RAW_LIMIT = timedelta(days=2)
MAX_PAYLOAD = 4096
CSV_ROWS = 1_000_000
CSV_CHUNK = 65536
FUTURE_SLACK = timedelta(minutes=5)


class Reading(msgspec.Struct, frozen=True, kw_only=True):
    """One BME688 reading as a device publishes it (JSON)."""

    ts: str | int
    temperature: Annotated[float, Meta(ge=-40, le=85, description="°C")]
    humidity: Annotated[float, Meta(ge=0, le=100, description="%RH")]
    pressure: Annotated[float, Meta(ge=300, le=1100, description="hPa")]
    gas_resistance: Annotated[float, Meta(gt=0, le=1e9, description="Ω")]
    iaq: Annotated[float, Meta(ge=0, le=500)] | None = None
    iaq_accuracy: Annotated[int, Meta(ge=0, le=3)] | None = None
    co2_equivalent: Annotated[float, Meta(ge=0, le=100_000, description="ppm")] | None = None
    breath_voc_equivalent: Annotated[float, Meta(ge=0, le=100_000, description="ppm")] | None = None


DECODER = msgspec.json.Decoder(Reading)


class Rejected(ValueError):
    """A payload that is not a reading we store, and why."""


def parse_reading(payload: bytes, now: datetime, oldest: datetime) -> tuple[datetime, Reading]:
    """The reading and its time, or ``Rejected`` with the reason."""
    if len(payload) > MAX_PAYLOAD:
        raise Rejected(f"oversized: {len(payload)} bytes (at most {MAX_PAYLOAD})")
    try:
        reading = DECODER.decode(payload)
    except msgspec.ValidationError as exc:
        raise Rejected(f"invalid: {exc}") from None
    except msgspec.DecodeError as exc:
        raise Rejected(f"malformed: {exc}") from None
    except RecursionError:  # nested deeper than the decoder goes (in a field it skips)
        raise Rejected("malformed: nested too deeply") from None
    return reading_time(reading.ts, now, oldest), reading


def reading_time(value: str | int, now: datetime, oldest: datetime, field: str = "ts") -> datetime:
    """The time a reading states in ``field`` (RFC 3339 with an offset, or epoch
    milliseconds), within the retention and not in the future; else ``Rejected``."""
    ts = _time(value, field)
    if ts > now + FUTURE_SLACK:
        raise Rejected(f"invalid: {field} is in the future")
    if ts < oldest:
        raise Rejected(f"invalid: {field} is older than the data retention")
    return ts


def _time(value: str | int, field: str) -> datetime:
    if isinstance(value, int):
        try:
            return datetime.fromtimestamp(value / 1000, UTC)
        except (OverflowError, OSError, ValueError):
            raise Rejected(f"invalid: {field} is not a time in epoch milliseconds") from None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise Rejected(f"invalid: {field} is not RFC 3339") from None
    if parsed.tzinfo is None:
        raise Rejected(f"invalid: {field} has no UTC offset")
    try:
        return parsed.astimezone(UTC)
    except OverflowError:  # a date at the very edge of the calendar, with an offset
        raise Rejected(f"invalid: {field} is out of range") from None


def record(
    device_id: str, ts: datetime, r: Reading, temperature_offset: float | None = None
) -> tuple[Any, ...]:
    """The row of ``readings`` for this reading, in ``ROW_COLUMNS`` order: its temperature
    plus ``temperature_offset`` (what the platform applies for the device), and that offset."""
    return (
        device_id,
        ts,
        r.temperature + temperature_offset if temperature_offset else r.temperature,
        r.humidity,
        r.pressure,
        r.gas_resistance,
        r.iaq,
        r.iaq_accuracy,
        r.co2_equivalent,
        r.breath_voc_equivalent,
        temperature_offset or None,
    )


# --- storage ------------------------------------------------------------------------------------


def partition_name(day: date) -> str:
    """``readings_YYYYMMDD``."""
    return f"readings_{day:%Y%m%d}"


async def ensure_partitions(
    conn: asyncpg.Connection, days: Iterable[date], known: set[date]
) -> None:
    """Make the daily partitions the rows need (``known`` remembers the ones made)."""
    for day in sorted(set(days) - known):
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {partition_name(day)} PARTITION OF readings "
            f"FOR VALUES FROM ('{day.isoformat()}') TO ('{(day + timedelta(days=1)).isoformat()}')"
        )
        known.add(day)


# The hourly rollups of the readings in ``{source}``, added to what is there (Postgres does the
# sums: in Python they cost more than everything else ingest does with a reading).
ROLLUP_SQL = (
    """
    INSERT INTO readings_hourly (device_id, hour, metric, n, total, low, high)
    SELECT r.device_id, date_trunc('hour', r.ts, 'UTC'), m.metric, count(*), sum(m.value),
           min(m.value), max(m.value)
    FROM {source} r
    CROSS JOIN LATERAL (VALUES """
    + ", ".join(f"('{metric}', r.{metric}::double precision)" for metric in METRICS)
    + """) AS m (metric, value)
    WHERE m.value IS NOT NULL
    GROUP BY 1, 2, 3
    ON CONFLICT (device_id, metric, hour) DO UPDATE SET
        n = readings_hourly.n + EXCLUDED.n,
        total = readings_hourly.total + EXCLUDED.total,
        low = LEAST(readings_hourly.low, EXCLUDED.low),
        high = GREATEST(readings_hourly.high, EXCLUDED.high)
    """
)


# Readings are stored once: a redelivered message (the broker delivers at least once) or a
# reading published twice finds its (device_id, ts) taken and is skipped, and only the rows
# actually inserted are folded into the rollups, in the same statement, which answers how many
# they were. (Answering their keys instead costs a tenth more per batch; see readings_added.)
STORE_SQL = (
    """
    WITH stored AS (
        INSERT INTO readings SELECT * FROM readings_in
        ON CONFLICT (device_id, ts) DO NOTHING
        RETURNING *
    ), rolled_up AS ("""
    + ROLLUP_SQL.format(source="stored")
    + """)
    SELECT count(*) FROM stored
    """
)


async def store_readings(
    conn: asyncpg.Connection, rows: Sequence[tuple[Any, ...]], known: set[date]
) -> int:
    """COPY the rows in and add those not stored before to ``readings`` and to the hourly
    rollups, in the caller's transaction; return how many were added.

    The rows go first to a temporary table of the connection (emptied at commit), from which
    one statement moves the new ones into ``readings`` and adds them to the rollups."""
    await ensure_partitions(conn, {row[1].date() for row in rows}, known)
    await conn.execute(
        "CREATE TEMPORARY TABLE IF NOT EXISTS readings_in "
        "(LIKE readings INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
    )
    await conn.copy_records_to_table("readings_in", records=rows, columns=ROW_COLUMNS)
    return int(await conn.fetchval(STORE_SQL))


async def readings_added(conn: asyncpg.Connection) -> set[tuple[str, datetime]]:
    """The (device_id, ts) of the rows ``store_readings`` added in this transaction (those it
    skipped were written by an earlier one), before it commits."""
    rows = await conn.fetch(
        "SELECT DISTINCT r.device_id, r.ts FROM readings_in i "
        "JOIN readings r ON r.device_id = i.device_id AND r.ts = i.ts "
        "WHERE r.xmin = pg_current_xact_id()::xid"
    )
    return {(r["device_id"], r["ts"]) for r in rows}


async def drop_expired_partitions(conn: asyncpg.Connection, keep_from: date) -> list[str]:
    """Drop whole daily partitions older than ``keep_from``; and their rollups."""
    names = await conn.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'readings'"
    )
    dropped = []
    for row in names:
        name = row["relname"]
        try:
            day = datetime.strptime(name, "readings_%Y%m%d").date()
        except ValueError:
            continue
        if day < keep_from:
            await conn.execute(f"DROP TABLE {name}")
            dropped.append(name)
    await conn.execute(
        "DELETE FROM readings_hourly WHERE hour < $1",
        datetime.combine(keep_from, datetime.min.time(), UTC),
    )
    return dropped


# --- queries ------------------------------------------------------------------------------------


def as_sent(expr: str) -> str:
    """SQL for ``expr`` as the float4 it was stored as, in the fewest digits that are that
    float4 (Postgres prints float4 so): a value sent as 40.2 comes back as 40.2, not as the
    40.20000076293945 a float4 widened to a double would print."""
    return f"(({expr})::real::text::double precision)"


def stored_column(metric: str) -> str:
    """SQL for a metric's column of ``readings`` as it was sent."""
    return as_sent(metric) if metric in REAL_METRICS else metric


def parse_metrics(value: str | None) -> list[str]:
    """The metrics asked for (all when none; each once), or ValueError naming the unknown one."""
    if not value:
        return list(METRICS)
    asked = list(dict.fromkeys(m.strip() for m in value.split(",") if m.strip()))
    unknown = [m for m in asked if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric {unknown[0]!r}; choose from {', '.join(METRICS)}")
    return asked


Series = dict[str, list[dict[str, Any]]]


async def aggregate(
    conn: asyncpg.Connection,
    device_id: str,
    start: datetime,
    end: datetime,
    bucket: str,
    metrics: list[str],
) -> dict[str, Any]:
    """avg/min/max of each metric per bucket; long ranges from the hourly rollups."""
    step = BUCKETS[bucket]
    from_rollups = step >= BUCKETS["1h"] and (end - start) > RAW_LIMIT
    query = _from_rollups if from_rollups else _from_readings
    series, calibrating = await query(conn, device_id, start, end, step, metrics)
    return {
        "device_id": device_id,
        "from": start,
        "to": end,
        "bucket": bucket,
        "source": "rollups" if from_rollups else "readings",
        "series": series,
        "calibrating": spans(calibrating, step),
    }


def spans(buckets: Sequence[datetime], step: timedelta) -> list[dict[str, datetime]]:
    """The buckets (their starts, in order) that hold readings taken before calibration, as
    ranges: consecutive buckets make one."""
    found: list[dict[str, datetime]] = []
    for bucket in buckets:
        if found and found[-1]["to"] == bucket:
            found[-1]["to"] = bucket + step
        else:
            found.append({"from": bucket, "to": bucket + step})
    return found


async def _from_rollups(
    conn: asyncpg.Connection,
    device_id: str,
    start: datetime,
    end: datetime,
    step: timedelta,
    metrics: list[str],
) -> tuple[Series, list[datetime]]:
    rows = await conn.fetch(
        f"""
        SELECT date_bin($4::interval, hour, '2000-01-01') AS bucket, metric,
               {as_sent("sum(total) / sum(n)")} AS avg, {as_sent("min(low)")} AS min,
               {as_sent("max(high)")} AS max
        FROM readings_hourly
        WHERE device_id = $1 AND hour >= $2 AND hour < $3 AND metric = ANY($5::text[])
        GROUP BY 1, 2 ORDER BY 1
        """,
        device_id,
        start,
        end,
        step,
        metrics,
    )
    series: Series = {m: [] for m in metrics}
    for row in rows:
        series[row["metric"]].append(
            {"t": row["bucket"], "avg": row["avg"], "min": row["min"], "max": row["max"]}
        )
    # An hour whose lowest accuracy is below 3 held readings taken before calibration.
    calibrating = await conn.fetch(
        "SELECT DISTINCT date_bin($4::interval, hour, '2000-01-01') AS bucket "
        "FROM readings_hourly WHERE device_id = $1 AND metric = 'iaq_accuracy' "
        "AND hour >= $2 AND hour < $3 AND low < 3 ORDER BY 1",
        device_id,
        start,
        end,
        step,
    )
    return series, [row["bucket"] for row in calibrating]


async def _from_readings(
    conn: asyncpg.Connection,
    device_id: str,
    start: datetime,
    end: datetime,
    step: timedelta,
    metrics: list[str],
) -> tuple[Series, list[datetime]]:
    columns = ", ".join(
        f"{as_sent(f'avg({m})')} AS {m}_avg, {_sent_if_real(m, f'min({m})')} AS {m}_min, "
        f"{_sent_if_real(m, f'max({m})')} AS {m}_max"
        for m in metrics
    )
    rows = await conn.fetch(
        f"SELECT date_bin($4::interval, ts, '2000-01-01') AS bucket, {columns}, "
        f"bool_or({CALIBRATING_SQL}) AS calibrating "
        "FROM readings WHERE device_id = $1 AND ts >= $2 AND ts < $3 GROUP BY 1 ORDER BY 1",
        device_id,
        start,
        end,
        step,
    )
    series = {
        m: [
            {"t": r["bucket"], "avg": r[f"{m}_avg"], "min": r[f"{m}_min"], "max": r[f"{m}_max"]}
            for r in rows
            if r[f"{m}_avg"] is not None
        ]
        for m in metrics
    }
    return series, [r["bucket"] for r in rows if r["calibrating"]]


def _sent_if_real(metric: str, expr: str) -> str:
    return as_sent(expr) if metric in REAL_METRICS else expr


async def latest(conn: asyncpg.Connection, device_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The newest reading of each device (one index probe per device)."""
    columns = ", ".join(f"{stored_column(m)} AS {m}" for m in METRICS)
    rows = await conn.fetch(
        f"""
        SELECT d.id AS device_id, r.*
        FROM unnest($1::text[]) AS d(id)
        CROSS JOIN LATERAL (
            SELECT ts, {columns}
            FROM readings WHERE device_id = d.id ORDER BY ts DESC LIMIT 1
        ) r
        """,
        list(device_ids),
    )
    return {r["device_id"]: {k: r[k] for k in ("ts", *METRICS)} for r in rows}


async def export_csv(
    pool: asyncpg.Pool, device_id: str, start: datetime, end: datetime, limit: int = CSV_ROWS
) -> AsyncIterator[str]:
    """Every stored reading of a device from ``start`` to ``end`` (at most ``limit``) as CSV,
    its header first, in chunks of about ``CSV_CHUNK`` characters. The last columns are the
    temperature offset the platform added to the reading (empty when none) and whether it was
    taken before calibration."""
    columns = CSV_COLUMNS
    chunk = io.StringIO()
    writer = csv.writer(chunk)
    writer.writerow(["ts", *columns])
    async with pool.acquire() as conn, conn.transaction():
        cursor = conn.cursor(
            # Postgres prints each float4 as it was sent (40.2, not 40.20000076293945).
            "SELECT ts, "
            + ", ".join(f"{m}::text AS {m}" for m in columns[:-1])
            + f", {CALIBRATING_SQL}::text AS calibrating FROM readings "
            "WHERE device_id = $1 "
            "AND ts >= $2 AND ts < $3 ORDER BY ts LIMIT $4",
            device_id,
            start,
            end,
            limit,
        )
        async for row in cursor:
            writer.writerow([row["ts"].isoformat(), *(row[m] for m in columns)])
            if chunk.tell() > CSV_CHUNK:
                yield chunk.getvalue()
                chunk.seek(0)
                chunk.truncate()
        yield chunk.getvalue()
