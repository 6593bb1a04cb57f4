"""The indoor-air kinds in the alert loop: ``offline`` from each device's last message, and the
reading kinds (mould risk, stale sensor, CO₂) from the readings that arrived since the last pass.

A pass costs a few queries whatever the number of rules: the devices' configurations (reporting
interval, surface temperature), the runs kept in ``alert_windows``, the states, and the readings
newer than each device's oldest cursor, read through the (device_id, ts) key, at most
``BATCH`` per device (the next pass goes on from there). A rule first met (new, changed, or a
device new to it) looks back as far as its longest condition, so a condition that already holds
fires at once. A reading older than the cursor (sent late, out of order) is not looked at.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from services.instance.alerts.history import record_event, set_state
from services.instance.alerts.kinds import (
    OFFLINE,
    READING_KINDS,
    defaults,
    duration_text,
    max_gap,
    stored_params,
)
from services.instance.alerts.windows import Part, Run, evidence, parts, stamp

BATCH = 5000
READING_COLUMNS = (
    "ts, temperature, humidity, pressure, gas_resistance, co2_equivalent, iaq_accuracy"
)


@dataclass
class Pass:
    """What one pass knows about the devices, read once for every rule."""

    intervals: dict[str, int] = field(default_factory=dict)
    surfaces: dict[str, float] = field(default_factory=dict)
    windows: dict[tuple[str, str, str], Run] = field(default_factory=dict)
    states: dict[tuple[str, str], asyncpg.Record] = field(default_factory=dict)
    readings: dict[str, list[asyncpg.Record]] = field(default_factory=dict)


def rule_params(rule: asyncpg.Record) -> dict[str, Any]:
    """The rule's parameters, the defaults filled in."""
    return {**defaults(rule["kind"]), **stored_params(rule["params"])}


def in_scope(rule: asyncpg.Record, devices: Sequence[asyncpg.Record]) -> list[asyncpg.Record]:
    """The devices a rule looks at (none named: every device)."""
    return [d for d in devices if not rule["devices"] or d["device_id"] in rule["devices"]]


def _interval(ctx: Pass, device_id: str, params: dict[str, Any]) -> int:
    return ctx.intervals.get(device_id) or int(
        params.get("default_interval_seconds") or defaults(OFFLINE)["default_interval_seconds"]
    )


def _lookback(rule: asyncpg.Record, ctx: Pass, device_id: str) -> timedelta:
    params = rule_params(rule)
    found = parts(rule["kind"], params, ctx.surfaces.get(device_id))
    longest = max((p.duration for p in found), default=timedelta(0))
    return longest + max_gap(_interval(ctx, device_id, params))


async def load_pass(
    conn: asyncpg.Connection,
    rules: Sequence[asyncpg.Record],
    devices: Sequence[asyncpg.Record],
    now: datetime,
) -> Pass:
    """Everything the indoor kinds need for one pass, in four queries at most."""
    ctx = Pass()
    indoor = [r for r in rules if r["kind"] in (OFFLINE, *READING_KINDS)]
    if not indoor:
        return ctx
    for row in await conn.fetch(
        "SELECT device_id, desired->'reporting_interval' AS interval, "
        "desired->'custom'->'surface_temperature' AS surface FROM device_config"
    ):
        interval, surface = (
            json.loads(row["interval"] or "null"),
            json.loads(row["surface"] or "null"),
        )
        if isinstance(interval, int) and not isinstance(interval, bool) and interval > 0:
            ctx.intervals[row["device_id"]] = interval
        if isinstance(surface, int | float) and not isinstance(surface, bool):
            ctx.surfaces[row["device_id"]] = float(surface)
    ids = [r["rule_id"] for r in indoor]
    for row in await conn.fetch("SELECT * FROM alert_windows WHERE rule_id = ANY($1)", ids):
        ctx.windows[(row["rule_id"], row["device_id"], row["part"])] = _run(row)
    for row in await conn.fetch("SELECT * FROM alert_states WHERE rule_id = ANY($1)", ids):
        ctx.states[(row["rule_id"], row["device_id"])] = row
    await _load_readings(conn, ctx, [r for r in indoor if r["kind"] in READING_KINDS], devices, now)
    return ctx


def _run(row: asyncpg.Record) -> Run:
    ref = json.loads(row["ref"]) if row["ref"] is not None else None
    return Run(
        evaluated_to=row["evaluated_to"],
        run_from=row["run_from"],
        run_to=row["run_to"],
        n=row["n"],
        low=row["low"],
        high=row["high"],
        ref=ref,
    )


async def _load_readings(
    conn: asyncpg.Connection,
    ctx: Pass,
    rules: Sequence[asyncpg.Record],
    devices: Sequence[asyncpg.Record],
    now: datetime,
) -> None:
    """Each device's readings after the oldest cursor of the reading rules that look at it."""
    after: dict[str, datetime] = {}
    for rule in rules:
        try:
            _cursors(rule, ctx, devices, now, after)
        except (KeyError, TypeError, ValueError):
            # Parameters this version cannot read (stored by another): the rule's own
            # evaluation fails, alone, and is logged and counted there.
            continue
    if not after:
        return
    rows = await conn.fetch(
        f"SELECT c.device_id, r.* FROM unnest($1::text[], $2::timestamptz[]) AS c (device_id, "
        f"after) CROSS JOIN LATERAL (SELECT {READING_COLUMNS} FROM readings "
        "WHERE readings.device_id = c.device_id AND readings.ts > c.after "
        "ORDER BY readings.ts LIMIT $3) r ORDER BY c.device_id, r.ts",
        list(after),
        list(after.values()),
        BATCH,
    )
    for row in rows:
        ctx.readings.setdefault(row["device_id"], []).append(row)


def _cursors(
    rule: asyncpg.Record,
    ctx: Pass,
    devices: Sequence[asyncpg.Record],
    now: datetime,
    after: dict[str, datetime],
) -> None:
    """Lower ``after`` (per device) to where each part of ``rule`` has got to."""
    params = rule_params(rule)
    for device in in_scope(rule, devices):
        device_id = device["device_id"]
        for part in parts(rule["kind"], params, ctx.surfaces.get(device_id)):
            run = ctx.windows.get((rule["rule_id"], device_id, part.name))
            cursor = run.evaluated_to if run else now - _lookback(rule, ctx, device_id)
            after[device_id] = min(after.get(device_id, cursor), cursor)


def calibrating(reading: asyncpg.Record) -> bool:
    """Taken before the sensor was calibrated: BSEC's accuracy reported and below 3."""
    accuracy = reading["iaq_accuracy"]
    return accuracy is not None and accuracy < 3


async def evaluate_offline(
    conn: asyncpg.Connection,
    customer_id: str,
    rule: asyncpg.Record,
    device: asyncpg.Record,
    ctx: Pass,
    now: datetime,
) -> int:
    """Fire when the device, once seen, has been silent for its intervals; resolve when it
    speaks again. A device never seen is not offline: it was not installed yet."""
    device_id, seen = device["device_id"], device["last_seen"]
    params = rule_params(rule)
    interval = _interval(ctx, device_id, params)
    limit = timedelta(seconds=params["missed_intervals"] * interval)
    state = ctx.states.get((rule["rule_id"], device_id))
    current = state["state"] if state else "ok"
    silent = now - seen if seen else timedelta(0)
    if seen is not None and silent >= limit and current != "firing":
        why = (
            f"no data since {stamp(seen)} ({duration_text(silent.total_seconds())}; threshold "
            f"{params['missed_intervals']} times the {interval} s reporting interval = "
            f"{duration_text(limit.total_seconds())})"
        )
        facts = {
            "last_seen": seen,
            "silent_seconds": silent.total_seconds(),
            "interval_seconds": interval,
            "required_seconds": limit.total_seconds(),
        }
        value = silent.total_seconds()
        await set_state(conn, rule["rule_id"], device_id, "firing", seen, value, why)
        await record_event(conn, customer_id, rule, device_id, "firing", now, value, why, facts)
        return 1
    if current == "firing" and (seen is None or silent < limit):
        why = f"data again: last message at {stamp(seen)}" if seen else "the device was reset"
        await set_state(conn, rule["rule_id"], device_id, "ok", now, None, why)
        await record_event(conn, customer_id, rule, device_id, "resolved", now, None, why)
        return 1
    return 0


@dataclass
class _Follow:
    """A rule's state for one device, followed reading by reading within a pass."""

    state: str
    since: datetime
    explanation: str | None
    value: float | None
    events: list[tuple[str, float | None, str, dict[str, Any] | None]] = field(default_factory=list)


def _value(run: Run) -> float | None:
    return run.high if run.high is not None else round(run.lasted.total_seconds() / 3600, 2)


def _follow(found: list[Part], runs: dict[str, Run], f: _Follow) -> None:
    """The state after one reading: firing once a part holds, resolved once none does,
    pending while a run goes on that is not long enough yet."""
    holding = [p for p in found if p.holds(runs[p.name])]
    active = [p for p in found if p.active(runs[p.name])]
    if holding:
        part, run = holding[0], runs[holding[0].name]
        f.explanation, f.value = part.tell_run(run), _value(run)
        if f.state != "firing":
            f.events.append(("firing", f.value, f.explanation, evidence(part, run)))
            f.state, f.since = "firing", run.run_from or run.evaluated_to
        return
    if f.state == "firing":
        why = "; ".join(r.ended for r in runs.values() if r.ended) or "the condition ended"
        f.events.append(("resolved", f.value, why, None))
    if active:
        part, run = active[0], runs[active[0].name]
        # Pending since the current run began (a run broken and begun again starts over).
        f.state, f.since = "pending", run.run_from or run.evaluated_to
        f.explanation, f.value = f"so far {part.tell_run(run)}", _value(run)
    elif f.state != "ok":
        f.state, f.since, f.value = "ok", run_end(runs), None
        f.explanation = None


def run_end(runs: dict[str, Run]) -> datetime:
    """When the parts were last looked at."""
    return max(r.evaluated_to for r in runs.values())


async def evaluate_readings(
    conn: asyncpg.Connection,
    customer_id: str,
    rule: asyncpg.Record,
    device_id: str,
    ctx: Pass,
    now: datetime,
) -> int:
    """Follow the rule's parts over the device's new readings; record each firing and
    resolution, keep the runs and the state. Returns how many events were recorded."""
    params, rule_id = rule_params(rule), rule["rule_id"]
    found = parts(rule["kind"], params, ctx.surfaces.get(device_id))
    if not found:
        return 0
    gap = max_gap(_interval(ctx, device_id, params))
    start = now - _lookback(rule, ctx, device_id)
    runs = {p.name: ctx.windows.get((rule_id, device_id, p.name)) or Run(start) for p in found}
    kept = {name: (run.evaluated_to, run.n, run.run_from) for name, run in runs.items()}
    state = ctx.states.get((rule_id, device_id))
    f = _Follow(
        state=state["state"] if state else "ok",
        since=state["since"] if state else now,
        explanation=state["explanation"] if state else None,
        value=state["value"] if state else None,
    )
    before = (f.state, f.explanation)
    for reading in ctx.readings.get(device_id, []):
        ts = reading["ts"]
        skip = calibrating(reading) and not rule["include_calibrating"]
        for part in found:
            run = runs[part.name]
            run.ended = None
            if ts <= run.evaluated_to:
                continue
            if skip:
                run.evaluated_to = ts
            else:
                part.step(run, reading, gap)
        if not skip:
            _follow(found, runs, f)
    for name, run in runs.items():
        if (run.evaluated_to, run.n, run.run_from) != kept[name]:
            await _keep(conn, rule_id, device_id, name, run)
    for event, value, why, facts in f.events:
        await record_event(conn, customer_id, rule, device_id, event, now, value, why, facts)
    if (f.state, f.explanation) != before:
        await set_state(conn, rule_id, device_id, f.state, f.since, f.value, f.explanation)
    return len(f.events)


async def _keep(
    conn: asyncpg.Connection, rule_id: str, device_id: str, part: str, run: Run
) -> None:
    await conn.execute(
        "INSERT INTO alert_windows (rule_id, device_id, part, evaluated_to, run_from, run_to, n, "
        "low, high, ref) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10::jsonb) "
        "ON CONFLICT (rule_id, device_id, part) DO UPDATE SET evaluated_to = $4, run_from = $5, "
        "run_to = $6, n = $7, low = $8, high = $9, ref = $10::jsonb",
        rule_id,
        device_id,
        part,
        run.evaluated_to,
        run.run_from,
        run.run_to,
        run.n,
        run.low,
        run.high,
        json.dumps(run.ref) if run.ref is not None else None,
    )
