"""The indoor-air rule kinds next to the threshold rules, their parameters (checked, with their
defaults) and the presets every instance gets, on, by default.

- ``offline``: no data from a device for ``missed_intervals`` times its reporting interval (its
  desired configuration's ``reporting_interval``, else ``default_interval_seconds``).
- ``mould_risk``: relative humidity above ``humidity_above`` % continuously for
  ``humidity_hours``, or the dew point (Magnus formula) within ``dew_point_margin`` °C of the
  surface temperature, where one is given (``surface_temperature`` here, else the device
  configuration's custom key ``surface_temperature``), for ``dew_point_minutes``.
- ``stale_sensor``: temperature, humidity, pressure and gas resistance all unchanged for
  ``hours`` (a frozen sensor).
- ``co2_high``: CO₂-equivalent above ``ppm_above`` continuously for ``minutes``.

"Continuously" means readings that meet the condition with no gap longer than ``max_gap``
between them. Readings taken before the sensor was calibrated (``iaq_accuracy`` 0 to 2) are left
out unless a rule says ``include_calibrating``.
"""

from __future__ import annotations

import json
import math
from datetime import timedelta
from typing import Any

import msgspec

from libs.http.validation import FieldErrors

THRESHOLD = "threshold"
OFFLINE = "offline"
MOULD_RISK = "mould_risk"
STALE_SENSOR = "stale_sensor"
CO2_HIGH = "co2_high"
KINDS = (THRESHOLD, OFFLINE, MOULD_RISK, STALE_SENSOR, CO2_HIGH)
# The kinds that look at runs of readings (``windows``); offline looks at the last message.
READING_KINDS = (MOULD_RISK, STALE_SENSOR, CO2_HIGH)

# The interval assumed for a device whose configuration sets none.
DEFAULT_INTERVAL_SECONDS = 60
# Readings further apart than this (or three reporting intervals, if longer) break a run.
MIN_GAP = timedelta(minutes=15)


class Param(msgspec.Struct, frozen=True, kw_only=True):
    """One tunable parameter: its range, its default, whether it must be whole, whether it may
    be null (not given), and its unit as people read it."""

    low: float
    high: float
    default: float | None
    whole: bool = False
    nullable: bool = False
    unit: str = ""


PARAMS: dict[str, dict[str, Param]] = {
    OFFLINE: {
        "missed_intervals": Param(low=2, high=1000, default=5, whole=True, unit="intervals"),
        "default_interval_seconds": Param(
            low=1, high=86_400, default=DEFAULT_INTERVAL_SECONDS, whole=True, unit="s"
        ),
    },
    MOULD_RISK: {
        "humidity_above": Param(low=0, high=100, default=70, unit="%"),
        "humidity_hours": Param(low=0.25, high=168, default=24, unit="h"),
        "dew_point_margin": Param(low=0, high=20, default=2, unit="°C"),
        "dew_point_minutes": Param(low=0, high=1440, default=0, whole=True, unit="min"),
        "surface_temperature": Param(low=-40, high=85, default=None, nullable=True, unit="°C"),
    },
    STALE_SENSOR: {"hours": Param(low=0.25, high=168, default=3, unit="h")},
    CO2_HIGH: {
        "ppm_above": Param(low=0, high=100_000, default=1000, unit="ppm"),
        "minutes": Param(low=1, high=1440, default=30, whole=True, unit="min"),
    },
}

# The rules every instance gets, on, once (``presets.install_presets``): the preset's name,
# the rule's name and kind (its parameters are the defaults).
PRESETS: tuple[tuple[str, str, str], ...] = (
    (OFFLINE, "Device offline", OFFLINE),
    (MOULD_RISK, "Mould risk", MOULD_RISK),
    (STALE_SENSOR, "Stale sensor", STALE_SENSOR),
    (CO2_HIGH, "CO₂ too high", CO2_HIGH),
)


def defaults(kind: str) -> dict[str, Any]:
    """The parameters of a rule of ``kind`` that sets none."""
    return {name: p.default for name, p in PARAMS.get(kind, {}).items()}


def check_params(
    kind: str, given: Any, stored: dict[str, Any], errors: FieldErrors
) -> dict[str, Any]:
    """``stored`` (the defaults for a new rule) with the parameters ``given`` applied, each
    checked; every bad one is recorded as ``params.<name>`` with the reason."""
    if given is None:
        given = {}
    if not isinstance(given, dict):
        errors.add("params", "must be a JSON object")
        return stored
    specs = PARAMS[kind]
    merged = dict(stored)
    for name in sorted(set(given) - set(specs), key=str):
        errors.add(f"params.{str(name)[:40]}", f"is not a parameter of {kind}: {', '.join(specs)}")
    for name, spec in specs.items():
        if name not in given:
            continue
        value = given[name]
        if value is None and spec.nullable:
            merged[name] = None
        elif not _number(value) or not math.isfinite(float(value)):
            errors.add(f"params.{name}", "must be a number")
        elif spec.whole and not (isinstance(value, int) or float(value).is_integer()):
            errors.add(f"params.{name}", "must be a whole number")
        elif not spec.low <= value <= spec.high:
            errors.add(f"params.{name}", f"must be from {spec.low:g} to {spec.high:g} {spec.unit}")
        else:
            merged[name] = int(value) if spec.whole else float(value)
    return merged


def stored_params(value: Any) -> dict[str, Any]:
    """A stored rule's ``params`` column (JSON text, or already decoded) as a dict; empty for a
    threshold rule."""
    params = json.loads(value) if isinstance(value, str) else value
    return dict(params) if isinstance(params, dict) else {}


def _number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        float(value)
    except OverflowError:  # an integer too large for a float
        return False
    return True


def max_gap(interval_seconds: int) -> timedelta:
    """The longest silence between two readings that still counts as "continuously"."""
    return max(MIN_GAP, timedelta(seconds=3 * interval_seconds))


def duration_text(seconds: float) -> str:
    """``24 h 10 min``, ``7 min 12 s``, ``45 s``: a duration as people read it."""
    seconds = round(seconds)
    # Up to two days in hours: "for 24 h", as a threshold is said.
    days, rest = divmod(seconds, 86_400) if seconds >= 2 * 86_400 else (0, seconds)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h" if hours else f"{days} d"
    if hours:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    if minutes:
        return f"{minutes} min {secs} s" if secs else f"{minutes} min"
    return f"{secs} s"


def condition_text(kind: str, params: dict[str, Any]) -> str:
    """What a rule of ``kind`` with ``params`` watches for, in one sentence."""
    p = {**defaults(kind), **params}
    if kind == OFFLINE:
        return (
            f"no data for {p['missed_intervals']} times the device's reporting interval "
            f"({p['default_interval_seconds']} s where none is set)"
        )
    if kind == MOULD_RISK:
        surface = (
            f"{p['surface_temperature']:g} °C"
            if p["surface_temperature"] is not None
            else "the device's surface_temperature"
        )
        held = f" for {p['dew_point_minutes']} min" if p["dew_point_minutes"] else ""
        return (
            f"RH above {p['humidity_above']:g}% for {duration_text(p['humidity_hours'] * 3600)}, "
            f"or dew point within {p['dew_point_margin']:g} °C of {surface}{held}"
        )
    if kind == STALE_SENSOR:
        return (
            "temperature, humidity, pressure and gas all unchanged for "
            f"{duration_text(p['hours'] * 3600)}"
        )
    if kind == CO2_HIGH:
        return f"CO₂-equivalent above {p['ppm_above']:g} ppm for {p['minutes']} min"
    return kind


def dew_point(temperature: float, humidity: float) -> float:
    """The dew point (°C) of air at ``temperature`` °C and ``humidity`` % RH: the Magnus
    formula with Sonntag's constants (b = 17.62, c = 243.12 °C), good to about 0.35 °C from
    -45 to 60 °C."""
    b, c = 17.62, 243.12
    gamma = math.log(max(humidity, 0.01) / 100.0) + b * temperature / (c + temperature)
    return c * gamma / (b - gamma)
