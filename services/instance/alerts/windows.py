"""Runs of readings that meet a condition, followed one reading at a time, and the sentences that
say why a rule fired or resolved.

A rule of a reading kind (``kinds.READING_KINDS``) has one or more parts (mould risk: humidity
and dew point); each part keeps, per device, the newest reading it looked at and its current
run: the readings since the condition last failed, with no gap longer than ``max_gap`` between
them. A part holds when its run has lasted its duration. Nothing here does I/O: ``indoor``
reads the readings and keeps the runs in ``alert_windows``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from services.instance.alerts.kinds import (
    CO2_HIGH,
    MOULD_RISK,
    STALE_SENSOR,
    dew_point,
    duration_text,
)


def stamp(ts: datetime) -> str:
    """``12-06 09:00 UTC``: a time in an explanation."""
    return ts.astimezone(UTC).strftime("%m-%d %H:%M UTC")


@dataclass
class Run:
    """Where one part of a rule has got to for one device."""

    evaluated_to: datetime
    run_from: datetime | None = None
    run_to: datetime | None = None
    n: int = 0
    low: float | None = None
    high: float | None = None
    ref: Any = None
    # Why the last run ended (in memory: the explanation of a resolution).
    ended: str | None = field(default=None, compare=False)

    def start(self, ts: datetime, value: float | None, ref: Any) -> None:
        """A new run, of this one reading."""
        self.run_from, self.run_to, self.n, self.ref = ts, ts, 1, ref
        self.low = self.high = value

    def extend(self, ts: datetime, value: float | None) -> None:
        """One more reading in the run."""
        self.run_to, self.n = ts, self.n + 1
        if value is not None:
            self.low = value if self.low is None else min(self.low, value)
            self.high = value if self.high is None else max(self.high, value)

    def end(self, why: str) -> None:
        """No run any more, because ``why``."""
        self.run_from = self.run_to = self.low = self.high = self.ref = None
        self.n, self.ended = 0, why

    @property
    def lasted(self) -> timedelta:
        """How long the current run has lasted (zero when there is none)."""
        if self.run_from is None or self.run_to is None:
            return timedelta(0)
        return self.run_to - self.run_from


# What one reading means to a part: whether it is looked at (None: it says nothing, e.g. no
# CO₂ value), whether it meets the condition, the value kept, and what the run is of.
Verdict = tuple[bool, float | None, Any] | None


@dataclass(frozen=True)
class Part:
    """One condition of a rule: how a reading is judged, how long a run must last, and how
    it is told."""

    name: str
    duration: timedelta
    judge: Callable[[Any], Verdict]
    tell_run: Callable[[Run], str]
    tell_break: Callable[[Any, Verdict], str]
    min_readings: int = 1

    def active(self, run: Run) -> bool:
        """Whether ``run`` is under way: enough readings to be a run at all (a stale sensor's
        run begins with every reading, and is worth a look only from the second alike)."""
        return run.run_from is not None and run.n >= self.min_readings

    def holds(self, run: Run) -> bool:
        """Whether ``run`` has met the condition for long enough."""
        return (
            run.run_from is not None
            and run.n >= self.min_readings
            and (run.lasted >= self.duration)
        )

    def step(self, run: Run, reading: Any, gap: timedelta) -> None:
        """Follow ``run`` over one more reading (newer than any it has seen)."""
        run.evaluated_to = reading["ts"]
        verdict = self.judge(reading)
        if verdict is None:
            return
        meets, value, ref = verdict
        ts = reading["ts"]
        if not meets:
            if run.run_from is not None:
                run.end(self.tell_break(reading, verdict))
            return
        if run.run_from is None:
            run.start(ts, value, ref)
        elif run.run_to is not None and ts - run.run_to > gap:
            why = (
                f"no reading between {stamp(run.run_to)} and {stamp(ts)} "
                f"({duration_text((ts - run.run_to).total_seconds())}; continuously means at "
                f"most {duration_text(gap.total_seconds())} apart)"
            )
            run.end(why)
            run.start(ts, value, ref)
        elif ref != run.ref:
            run.end(self.tell_break(reading, verdict))
            run.start(ts, value, ref)
        else:
            run.extend(ts, value)


def parts(kind: str, params: dict[str, Any], surface: float | None) -> list[Part]:
    """The parts of a rule of ``kind``; ``surface`` is the surface temperature known for the
    device (the rule's own ``surface_temperature`` wins), if any."""
    if kind == MOULD_RISK:
        found = [_humidity(params)]
        given = params.get("surface_temperature")
        surface = given if given is not None else surface
        if surface is not None:
            found.append(_dew_point(params, float(surface)))
        return found
    if kind == STALE_SENSOR:
        return [_stale(params)]
    if kind == CO2_HIGH:
        return [_co2(params)]
    return []


def _humidity(params: dict[str, Any]) -> Part:
    above, hours = params["humidity_above"], params["humidity_hours"]
    wanted = f"(threshold {above:g}% for {duration_text(hours * 3600)})"
    return Part(
        name="humidity",
        duration=timedelta(hours=hours),
        judge=lambda r: (r["humidity"] > above, float(r["humidity"]), None),
        tell_run=lambda run: (
            f"RH {run.low:g} to {run.high:g}% for {duration_text(run.lasted.total_seconds())} "
            f"since {stamp(run.run_from or run.evaluated_to)} {wanted}"
        ),
        tell_break=lambda r, _: f"RH {r['humidity']:g}% at {stamp(r['ts'])} {wanted}",
    )


def _dew_point(params: dict[str, Any], surface: float) -> Part:
    margin, minutes = params["dew_point_margin"], params["dew_point_minutes"]
    held = f" for {minutes} min" if minutes else ""
    wanted = f"(threshold: within {margin:g} °C of the surface at {surface:g} °C{held})"

    def judge(r: Any) -> Verdict:
        point = round(dew_point(float(r["temperature"]), float(r["humidity"])), 2)
        return surface - point <= margin, point, surface

    return Part(
        name="dew_point",
        duration=timedelta(minutes=minutes),
        judge=judge,
        tell_run=lambda run: (
            f"dew point {run.low:.1f} to {run.high:.1f} °C, within {margin:g} °C of the surface at "
            f"{surface:g} °C, for {duration_text(run.lasted.total_seconds())} since "
            f"{stamp(run.run_from or run.evaluated_to)} {wanted}"
        ),
        tell_break=lambda r, _: (
            f"dew point {dew_point(float(r['temperature']), float(r['humidity'])):.1f} °C at "
            f"{stamp(r['ts'])} {wanted}"
        ),
    )


def _stale(params: dict[str, Any]) -> Part:
    hours = params["hours"]

    def judge(r: Any) -> Verdict:
        values = [
            float(r["temperature"]),
            float(r["humidity"]),
            float(r["pressure"]),
            float(r["gas_resistance"]),
        ]
        return True, None, values

    def tell_run(run: Run) -> str:
        t, h, p, g = run.ref or (0, 0, 0, 0)
        return (
            f"temperature {t:g} °C, RH {h:g}%, pressure {p:g} hPa and gas {g:g} Ω unchanged in "
            f"{run.n} readings for {duration_text(run.lasted.total_seconds())} since "
            f"{stamp(run.run_from or run.evaluated_to)} "
            f"(threshold: unchanged for {duration_text(hours * 3600)})"
        )

    return Part(
        name="stale",
        duration=timedelta(hours=hours),
        judge=judge,
        tell_run=tell_run,
        tell_break=lambda r, _: f"the values changed at {stamp(r['ts'])}",
        min_readings=2,
    )


def _co2(params: dict[str, Any]) -> Part:
    ppm, minutes = params["ppm_above"], params["minutes"]
    wanted = f"(threshold {ppm:g} ppm for {minutes} min)"

    def judge(r: Any) -> Verdict:
        value = r["co2_equivalent"]
        if value is None:
            return None
        return value > ppm, float(value), None

    return Part(
        name="co2",
        duration=timedelta(minutes=minutes),
        judge=judge,
        tell_run=lambda run: (
            f"CO₂-equivalent {run.low:g} to {run.high:g} ppm for "
            f"{duration_text(run.lasted.total_seconds())} since "
            f"{stamp(run.run_from or run.evaluated_to)} {wanted}"
        ),
        tell_break=lambda r, _: (
            f"CO₂-equivalent {r['co2_equivalent']:g} ppm at {stamp(r['ts'])} {wanted}"
        ),
    )


def evidence(part: Part, run: Run) -> dict[str, Any]:
    """The values and window behind a firing, as the API and integrations get them."""
    return {
        "part": part.name,
        "from": run.run_from,
        "to": run.run_to,
        "readings": run.n,
        "low": run.low,
        "high": run.high,
        "values": run.ref if part.name == "stale" else None,
        "required_seconds": part.duration.total_seconds(),
    }
