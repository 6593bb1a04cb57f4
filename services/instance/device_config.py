"""A fleet device's remote configuration: the desired one the customer sets, checked here field
by field, kept in ``device_config`` with a version that every change increments, and shown next
to what the device last reported it applied.

The desired configuration is delivered by the config publisher (``config_publisher``) as a
retained message on ``iot/device/<uuid>/config``; ingest stores the device's reports
(``reported``, ``reported_version``, ``reported_at``), which this module only reads. A device
registered by hand has no uuid and subscribes to nothing: it has no configuration to set.
"""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec

from libs.http.errors import Conflict, NotFound
from libs.http.input_checks import control_character_reason
from libs.http.validation import FieldErrors, json_object

REPORTING_INTERVAL = (1, 86_400)
TEMPERATURE_OFFSET = (-20.0, 20.0)
HEATER_PROFILE = re.compile(r"^[A-Za-z0-9 ._-]{1,64}$")
CUSTOM_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
CUSTOM_KEYS = 32
CUSTOM_TEXT = 256
FIELDS = ("reporting_interval", "temperature_offset", "heater_profile", "custom")

CustomValue = str | int | float | bool | None


class DesiredConfig(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What the customer wants a device to apply; a field left out is not set (the device
    keeps its own default)."""

    reporting_interval: int | None = None
    temperature_offset: float | None = None
    heater_profile: str | None = None
    custom: dict[str, CustomValue] | None = None


class ConfigPayload(DesiredConfig, frozen=True, kw_only=True, omit_defaults=True):
    """The retained message on the device's config topic: the desired configuration and its
    version (the device reports the version it applied)."""

    version: int


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _reporting_interval(errors: FieldErrors, value: Any) -> int | None:
    low, high = REPORTING_INTERVAL
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        errors.add("reporting_interval", f"must be a whole number of seconds, {low} to {high}")
        return None
    return value


def _temperature_offset(errors: FieldErrors, value: Any) -> float | None:
    low, high = TEMPERATURE_OFFSET
    if not _number(value) or not math.isfinite(value) or not low <= value <= high:
        errors.add("temperature_offset", f"must be a number of °C, {low:g} to {high:g}")
        return None
    return float(value)


def _heater_profile(errors: FieldErrors, value: Any) -> str | None:
    if not isinstance(value, str) or not HEATER_PROFILE.fullmatch(value):
        errors.add(
            "heater_profile",
            "must be 1 to 64 characters: letters, digits, spaces, '.', '_' or '-'",
        )
        return None
    return value


def _custom(errors: FieldErrors, value: Any) -> dict[str, CustomValue] | None:
    if not isinstance(value, dict):
        errors.add("custom", "must be a JSON object")
        return None
    if len(value) > CUSTOM_KEYS:
        errors.add("custom", f"must have at most {CUSTOM_KEYS} keys")
        return None
    checked: dict[str, CustomValue] = {}
    for key, item in value.items():
        if not CUSTOM_KEY.fullmatch(key):
            errors.add(
                f"custom.{key[:40]}",
                "a key must be 1 to 64 characters: letters, digits, '_', '.' or '-'",
            )
        elif isinstance(item, str) and len(item) > CUSTOM_TEXT:
            errors.add(f"custom.{key}", f"must be at most {CUSTOM_TEXT} characters")
        elif isinstance(item, str) and (reason := control_character_reason(item)):
            errors.add(f"custom.{key}", reason)
        elif item is None or isinstance(item, str | bool) or (_number(item) and _finite(item)):
            checked[key] = item
        else:
            errors.add(f"custom.{key}", "must be a string, a number, true, false or null")
    return checked


def _finite(value: int | float) -> bool:
    return isinstance(value, int) or math.isfinite(value)


def desired_config(data: Any) -> DesiredConfig:
    """The desired configuration of a ``PUT`` body, or a 400 naming every bad field and why.
    A field given as null is not set."""
    body = json_object(data)
    errors = FieldErrors()
    errors.unknown(body, FIELDS)
    values: dict[str, Any] = {}
    for name, check in (
        ("reporting_interval", _reporting_interval),
        ("temperature_offset", _temperature_offset),
        ("heater_profile", _heater_profile),
        ("custom", _custom),
    ):
        if body.get(name) is not None:
            values[name] = check(errors, body[name])
    errors.raise_if_any("invalid configuration")
    return DesiredConfig(**values)


def payload(desired: DesiredConfig, version: int) -> bytes:
    """The retained message for ``desired`` at ``version`` (fields not set are left out)."""
    return msgspec.json.encode(ConfigPayload(version=version, **msgspec.structs.asdict(desired)))


async def fleet_device(conn: asyncpg.Connection, device_id: str) -> asyncpg.Record:
    """The device's row (locked against a concurrent change of its configuration):
    ``NotFound`` when there is no such device, ``Conflict`` when it was registered by hand."""
    row = await conn.fetchrow(
        "SELECT device_id, uuid, created_at FROM devices "
        "WHERE device_id = $1 AND deleted_at IS NULL FOR SHARE",
        device_id,
    )
    if row is None:
        raise NotFound(f"no device {device_id}")
    if row["uuid"] is None:
        raise _registered_by_hand()
    return row


def _registered_by_hand() -> Conflict:
    return Conflict(
        "this device was registered by hand and subscribes to nothing; register it "
        "through a provisioning key to configure it remotely"
    )


async def set_desired(
    conn: asyncpg.Connection, device_id: str, desired: DesiredConfig
) -> asyncpg.Record:
    """Replace the device's desired configuration, one version up (the first is 1)."""
    async with conn.transaction():
        await fleet_device(conn, device_id)
        await conn.execute(
            """
            INSERT INTO device_config (device_id, desired, version, desired_at)
            VALUES ($1, $2::jsonb, 1, $3)
            ON CONFLICT (device_id) DO UPDATE
            SET desired = excluded.desired, version = device_config.version + 1,
                desired_at = excluded.desired_at
            """,
            device_id,
            msgspec.json.encode(desired).decode(),
            datetime.now(UTC),
        )
        return await config_row(conn, device_id)


async def config_row(conn: asyncpg.Connection, device_id: str) -> asyncpg.Record:
    """The device (``NotFound``, ``Conflict`` as ``fleet_device``) with its configuration
    columns, null where none was ever set."""
    row = await conn.fetchrow(
        """
        SELECT d.device_id, d.uuid, c.desired::text AS desired, c.version, c.desired_at,
               c.published_version, c.reported::text AS reported, c.reported_version,
               c.reported_at
        FROM devices d LEFT JOIN device_config c USING (device_id)
        WHERE d.device_id = $1 AND d.deleted_at IS NULL
        """,
        device_id,
    )
    if row is None:
        raise NotFound(f"no device {device_id}")
    if row["uuid"] is None:
        raise _registered_by_hand()
    return row


async def mark_published(conn: asyncpg.Connection, device_id: str, version: int) -> None:
    """Record that ``version`` of the device's configuration is on the broker (never going
    back: a slower publish of an older version does not undo a newer one's mark)."""
    await conn.execute(
        "UPDATE device_config SET published_version = greatest(published_version, $2) "
        "WHERE device_id = $1",
        device_id,
        version,
    )


def config_view(row: asyncpg.Record, unpublished_reason: str | None = None) -> dict[str, Any]:
    """The configuration as the API shows it. ``published``: the current version is on the
    broker (retained); when it is not, ``unpublished_reason`` says why, if known."""
    version = row["version"] or 0
    published = version > 0 and (row["published_version"] or 0) >= version
    if version > 0 and not published and unpublished_reason is None:
        unpublished_reason = "waiting for the broker; it is published as soon as it answers"
    return {
        "device_id": row["device_id"],
        "uuid": row["uuid"],
        "desired": json.loads(row["desired"]) if row["desired"] is not None else None,
        "version": version,
        "desired_at": row["desired_at"],
        "published": published,
        "unpublished_reason": None if published else unpublished_reason,
        "reported": json.loads(row["reported"]) if row["reported"] is not None else None,
        "reported_version": row["reported_version"],
        "reported_at": row["reported_at"],
        "in_sync": version > 0 and row["reported_version"] == version,
    }
