"""A device's BME688 calibration, as Bosch's BSEC reports it in each reading's ``iaq_accuracy``:
0 while the sensor stabilises (the first minutes after power-on), 1-2 while it calibrates (a
burn-in of up to days for a new sensor), 3 once calibrated. A drop back to 0 after having been
at 1 or more is a reset or a power cut, and starts a new run.

Followed at ingest, in the transaction that stores the readings, with one statement a batch
and nothing a reading: Postgres notes the newest reading of each device whose accuracy stayed
what it was (the usual batch), and picks for the others only the points where their accuracy
changes (and their newest reading), which alone are folded here. Readings older than the
newest already taken into account (arriving late, or delivered again) change nothing. Each
change of state is kept (``calibration_changes``), each run with the time it took to reach 3
(``calibration_runs``), and each is appended for the customer's integrations as
``calibration.changed``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from services.instance.integration_events import CALIBRATION_CHANGED, enqueue_many

STABILISING, CALIBRATING, CALIBRATED, UNKNOWN = (
    "stabilising",
    "calibrating",
    "calibrated",
    "unknown",
)
# What BSEC's burn-in of a new sensor usually takes, and a known sensor's settling after a
# power cycle (Bosch's BSEC integration guide; a sensor whose BSEC state is kept is quicker).
NEW_SENSOR = timedelta(days=4)
NEW_SENSOR_TEXT = "usually 4 days for a new sensor"
KNOWN_SENSOR = (timedelta(minutes=5), timedelta(minutes=30))
KNOWN_SENSOR_TEXT = "usually 5 to 30 min after a power cycle of a sensor calibrated before"
# How much history one answer carries, newest first.
HISTORY_LIMIT = 100


def state_of(accuracy: int) -> str:
    """The state BSEC's ``iaq_accuracy`` means."""
    if accuracy <= 0:
        return STABILISING
    return CALIBRATED if accuracy >= 3 else CALIBRATING


@dataclass(frozen=True)
class Tracked:
    """One device's calibration (a row of ``calibration``)."""

    device_id: str
    accuracy: int
    state: str
    since: datetime
    run_started: datetime
    run_calibrated: datetime | None
    run_reached_one: bool
    first_seen: datetime
    first_calibrated: datetime | None
    drops: int
    last_reading: datetime


@dataclass(frozen=True)
class Change:
    """A change of state: ``dropped`` when it is a drop back to 0 (a new run starts)."""

    device_id: str
    at: datetime
    from_state: str
    to_state: str
    accuracy: int
    dropped: bool
    run_started: datetime
    # Set when the run reaches accuracy 3 for the first time: how long that took.
    took: timedelta | None = None


@dataclass
class Folded:
    """What a batch changed: the devices' new rows, the changes, and the runs begun, reaching
    3 or ended (``(device_id, started_at)``: ``(calibrated_at, ended_at)``)."""

    tracked: dict[str, Tracked]
    changes: list[Change]
    runs: dict[tuple[str, datetime], tuple[datetime | None, datetime | None]]


def first(device_id: str, at: datetime, accuracy: int) -> tuple[Tracked, Change]:
    """A device's first reading with BSEC's accuracy: its first run begins."""
    state = state_of(accuracy)
    calibrated = at if accuracy >= 3 else None
    tracked = Tracked(
        device_id, accuracy, state, at, at, calibrated, accuracy >= 1, at, calibrated, 0, at
    )
    took = timedelta(0) if calibrated else None
    return tracked, Change(device_id, at, UNKNOWN, state, accuracy, False, at, took)


def step(tracked: Tracked, at: datetime, accuracy: int) -> tuple[Tracked, Change | None]:
    """``tracked`` after one more reading (newer than its ``last_reading``), and the change of
    state it made, if any."""
    moved = replace(tracked, last_reading=max(at, tracked.last_reading))
    if accuracy == tracked.accuracy:
        return moved, None
    dropped = accuracy <= 0 and tracked.run_reached_one
    if dropped:
        moved = replace(
            moved, run_started=at, run_calibrated=None, run_reached_one=False, drops=moved.drops + 1
        )
    if accuracy >= 1:
        moved = replace(moved, run_reached_one=True)
    if accuracy >= 3 and moved.run_calibrated is None:
        moved = replace(moved, run_calibrated=at, first_calibrated=moved.first_calibrated or at)
    state = state_of(accuracy)
    moved = replace(moved, accuracy=accuracy)
    if state == tracked.state and not dropped:
        return moved, None
    reached = moved.run_calibrated == at and tracked.run_calibrated is None
    took = at - moved.run_started if reached else None
    change = Change(
        tracked.device_id, at, tracked.state, state, accuracy, dropped, moved.run_started, took
    )
    return replace(moved, state=state, since=at), change


def fold(known: dict[str, Tracked], points: list[tuple[str, datetime, int]]) -> Folded:
    """Fold the batch's points (device, time, accuracy; each device's in time order) into the
    devices' rows."""
    folded = Folded(dict(known), [], {})
    for device_id, at, accuracy in points:
        before = folded.tracked.get(device_id)
        change: Change | None
        if before is None:
            after, change = first(device_id, at, accuracy)
            folded.runs[(device_id, at)] = (after.run_calibrated, None)
        else:
            after, change = step(before, at, accuracy)
            if change is not None and change.dropped:
                folded.runs[(device_id, before.run_started)] = (before.run_calibrated, at)
                folded.runs[(device_id, at)] = (None, None)
            elif after.run_calibrated != before.run_calibrated:
                folded.runs[(device_id, after.run_started)] = (after.run_calibrated, None)
        folded.tracked[device_id] = after
        if change is not None:
            folded.changes.append(change)
    return folded


FIELDS = tuple(Tracked.__dataclass_fields__)
# One statement a batch (``readings_in``, see ``readings.store_readings``), of its readings newer
# than what was taken into account before: a device whose accuracy stayed what it was (the
# usual batch) only has its newest reading noted, here; for the others, the points where their
# accuracy changes and their newest reading are answered, with their row, to be folded.
POINTS_SQL = f"""
    WITH fresh AS (
        SELECT i.device_id, i.ts, i.iaq_accuracy AS accuracy
        FROM readings_in i LEFT JOIN calibration c ON c.device_id = i.device_id
        WHERE i.iaq_accuracy IS NOT NULL
          AND (c.last_reading IS NULL OR i.ts > c.last_reading)
    ), per_device AS (
        SELECT device_id, max(ts) AS newest, min(accuracy) AS low, max(accuracy) AS high
        FROM fresh GROUP BY device_id
    ), steady AS (
        UPDATE calibration c SET last_reading = p.newest FROM per_device p
        WHERE c.device_id = p.device_id AND p.low = c.accuracy AND p.high = c.accuracy
        RETURNING c.device_id
    )
    SELECT p.device_id, p.ts, p.accuracy, {", ".join(f"c.{f} AS was_{f}" for f in FIELDS[1:])}
    FROM (
        SELECT f.device_id, f.ts, f.accuracy,
               lag(f.accuracy) OVER w AS before, lead(f.ts) OVER w IS NULL AS newest
        FROM fresh f
        WHERE f.device_id NOT IN (SELECT device_id FROM steady)
        WINDOW w AS (PARTITION BY f.device_id ORDER BY f.ts)
    ) p LEFT JOIN calibration c ON c.device_id = p.device_id
    WHERE p.before IS DISTINCT FROM p.accuracy OR p.newest
    ORDER BY p.device_id, p.ts
"""
SAVE_SQL = f"""
    INSERT INTO calibration ({", ".join(FIELDS)})
    SELECT * FROM unnest($1::text[], $2::smallint[], $3::text[], $4::timestamptz[],
        $5::timestamptz[], $6::timestamptz[], $7::boolean[], $8::timestamptz[],
        $9::timestamptz[], $10::integer[], $11::timestamptz[])
    ON CONFLICT (device_id) DO UPDATE SET
        {", ".join(f"{f} = EXCLUDED.{f}" for f in FIELDS[1:])}
"""


async def track_calibration(conn: asyncpg.Connection) -> list[Change]:
    """Follow the calibration of the devices whose readings were just stored (in
    ``readings_in``, in the caller's transaction); the changes of state."""
    rows = await conn.fetch(POINTS_SQL)
    if not rows:
        return []
    known = {
        r["device_id"]: Tracked(r["device_id"], *(r[f"was_{f}"] for f in FIELDS[1:]))
        for r in rows
        if r["was_state"] is not None
    }
    folded = fold(known, [(r["device_id"], r["ts"], r["accuracy"]) for r in rows])
    await _save(conn, folded)
    return folded.changes


async def _save(conn: asyncpg.Connection, folded: Folded) -> None:
    rows = list(folded.tracked.values())
    await conn.execute(SAVE_SQL, *([getattr(t, f) for t in rows] for f in FIELDS))
    if folded.runs:
        runs = [(d, started, cal, end) for (d, started), (cal, end) in folded.runs.items()]
        await conn.execute(
            "INSERT INTO calibration_runs (device_id, started_at, calibrated_at, ended_at) "
            "SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::timestamptz[], "
            "$4::timestamptz[]) "
            "ON CONFLICT (device_id, started_at) DO UPDATE SET "
            "calibrated_at = coalesce(calibration_runs.calibrated_at, EXCLUDED.calibrated_at), "
            "ended_at = coalesce(calibration_runs.ended_at, EXCLUDED.ended_at)",
            *([run[i] for run in runs] for i in range(4)),
        )
    if not folded.changes:
        return
    # Each change kept and told, however many (a broken sensor may flap every reading): one
    # statement each for all of them.
    await conn.execute(
        "INSERT INTO calibration_changes "
        "(device_id, at, from_state, to_state, accuracy, dropped) "
        "SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::text[], $4::text[], "
        "$5::smallint[], $6::boolean[])",
        *(
            [getattr(c, f) for c in folded.changes]
            for f in ("device_id", "at", "from_state", "to_state", "accuracy", "dropped")
        ),
    )
    await enqueue_many(
        conn,
        CALIBRATION_CHANGED,
        [(c.at, c.device_id, event_body(c)) for c in folded.changes],
    )


def event_body(change: Change) -> dict[str, Any]:
    """What integrations are told of a change (``calibration.changed``)."""
    return {
        "device_id": change.device_id,
        "at": change.at.isoformat(),
        "from": change.from_state,
        "to": change.to_state,
        "iaq_accuracy": change.accuracy,
        "dropped": change.dropped,
        "run_started": change.run_started.isoformat(),
        "seconds_to_calibrated": (
            int(change.took.total_seconds()) if change.took is not None else None
        ),
    }


async def forget_old_changes(conn: asyncpg.Connection, keep_from: datetime) -> None:
    """Drop the history (changes, and runs ended) older than the data retention; each
    device's current state stays."""
    await conn.execute("DELETE FROM calibration_changes WHERE at < $1", keep_from)
    await conn.execute("DELETE FROM calibration_runs WHERE ended_at < $1", keep_from)


# --- reading it back -----------------------------------------------------------------------------


def expected(row: asyncpg.Record | Tracked | None, now: datetime) -> dict[str, Any] | None:
    """How long calibration usually takes from the current run's start (a known sensor, one
    calibrated before, settles in minutes; a new one burns in for days), how long it has taken
    so far, and whether that is longer than usual; None once calibrated or when unknown."""
    if row is None:
        return None
    get = row.__getitem__ if isinstance(row, asyncpg.Record) else row.__getattribute__
    if get("state") == CALIBRATED:
        return None
    known = get("first_calibrated") is not None
    low, high = KNOWN_SENSOR if known else (NEW_SENSOR, NEW_SENSOR)
    so_far = max(timedelta(0), now - get("run_started"))
    return {
        "sensor": "known" if known else "new",
        "text": KNOWN_SENSOR_TEXT if known else NEW_SENSOR_TEXT,
        "usual_seconds": [int(low.total_seconds()), int(high.total_seconds())],
        "so_far_seconds": int(so_far.total_seconds()),
        "longer_than_usual": so_far > high * (1 if known else 2),
    }


def summary(row: asyncpg.Record | None, now: datetime) -> dict[str, Any]:
    """A device's calibration in short (the device list)."""
    if row is None:
        return {
            "state": UNKNOWN,
            "iaq_accuracy": None,
            "since": None,
            "run_started": None,
            "expected": None,
        }
    return {
        "state": row["state"],
        "iaq_accuracy": row["accuracy"],
        "since": row["since"],
        "run_started": row["run_started"],
        "expected": expected(row, now),
    }


async def states(conn: asyncpg.Connection, device_ids: list[str]) -> dict[str, asyncpg.Record]:
    """The calibration rows of these devices (those that have one)."""
    rows = await conn.fetch(
        "SELECT * FROM calibration WHERE device_id = ANY($1::text[])", device_ids
    )
    return {r["device_id"]: r for r in rows}


async def calibration_view(
    conn: asyncpg.Connection, device_id: str, now: datetime
) -> dict[str, Any]:
    """A device's calibration with its history: its runs (each with the time it took to reach
    accuracy 3) and its changes, newest first, and the temperature offset applied at ingest
    to its newest reading."""
    row = await conn.fetchrow("SELECT * FROM calibration WHERE device_id = $1", device_id)
    runs = await conn.fetch(
        "SELECT * FROM calibration_runs WHERE device_id = $1 ORDER BY started_at DESC LIMIT $2",
        device_id,
        HISTORY_LIMIT,
    )
    changes = await conn.fetch(
        "SELECT at, from_state, to_state, accuracy, dropped FROM calibration_changes "
        "WHERE device_id = $1 ORDER BY at DESC, id DESC LIMIT $2",
        device_id,
        HISTORY_LIMIT,
    )
    offset = await conn.fetchval(
        "SELECT temperature_offset::text::double precision FROM readings "
        "WHERE device_id = $1 ORDER BY ts DESC LIMIT 1",
        device_id,
    )
    view = summary(row, now)
    return view | {
        "device_id": device_id,
        "first_seen": row["first_seen"] if row else None,
        "first_calibrated": row["first_calibrated"] if row else None,
        "last_reading": row["last_reading"] if row else None,
        "drops": row["drops"] if row else 0,
        "expected": expected(row, now),
        "runs": [_run(r) for r in runs],
        "changes": [
            {
                "at": c["at"],
                "from": c["from_state"],
                "to": c["to_state"],
                "iaq_accuracy": c["accuracy"],
                "dropped": c["dropped"],
            }
            for c in changes
        ],
        "temperature_offset": offset,
    }


def _run(row: asyncpg.Record) -> dict[str, Any]:
    calibrated = row["calibrated_at"]
    took = calibrated - row["started_at"] if calibrated is not None else None
    return {
        "started_at": row["started_at"],
        "calibrated_at": calibrated,
        "seconds_to_calibrated": int(took.total_seconds()) if took is not None else None,
        "ended_at": row["ended_at"],
        "ended_by": "drop to 0 (reset or power cut)" if row["ended_at"] is not None else None,
    }
