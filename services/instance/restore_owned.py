"""The parts of an archive restored after the devices, rules and series (``restore.py``): the
alert presets installed, the sensors' calibration, the quota notices and refusals, and the
integrations, each device id under its new one.

The presets: the archive's replace those of the new instance (whose rules the archive's
replaced too), so a preset whose rule the customer deleted stays deleted after an import and a
restart; a preset the archive's instance never had (an older version's archive) is installed
now, as an upgrade would have. Quota notices come back as reported (the customer was told, or
the instance left behind was to tell them); refusals as they were. The token bucket's level and
the meters' levels noticed are this instance's working state: not restored.

Integrations come back with their configuration and a new signing secret each (in the answer,
once); they are sent what happens from the import's end on: nothing from the archive (readings,
events) is sent again, and backfills are not restored (ask for one). Their outbox
(``integration_events``) was not exported: what it recorded is in the archive's tables.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import asyncpg

from services.instance.alerts.presets import install_presets
from services.instance.archive import ArchiveRefused, CheckedArchive
from services.instance.integrations.store import (
    KINDS,
    MAX_INTEGRATIONS,
    MAX_URL_LENGTH,
    NAME_LIMIT,
    readings_noted_while_taken,
)


class Restore(Protocol):
    """The restore under way (``restore.Restore``): its transaction's connection, the archive,
    the counts so far and the devices' new ids."""

    conn: asyncpg.Connection
    checked: CheckedArchive
    counts: dict[str, int]

    def batches(self, name: str) -> Iterator[list[dict[str, Any]]]:
        """The JSON lines of file ``name``, in batches (one empty batch if it is not there)."""
        ...

    def new_id(self, old: Any, name: str) -> str:
        """The device's new id (``ArchiveRefused`` naming ``name`` for one not in the archive)."""
        ...


# Tables whose ids are a sequence's: rows come back in order under this instance's next ids.
FRESH_IDS = {"calibration_changes", "quota_notices", "quota_limited"}


async def _insert(conn: asyncpg.Connection, table: str, rows: list[dict[str, Any]]) -> None:
    """Rows into ``table`` in their order; a sequence's id made anew, and a row this instance
    has already (a notice of the same meter and period, say) kept as it is."""
    name = f"{table}.jsonl"
    columns = [
        r["attname"]
        for r in await conn.fetch(
            "SELECT attname FROM pg_attribute WHERE attrelid = $1::regclass AND attnum > 0 "
            "AND NOT attisdropped ORDER BY attnum",
            table,
        )
    ]
    if table in FRESH_IDS:
        columns.remove("id")
    listed = ", ".join(columns)
    try:
        await conn.execute(
            f"INSERT INTO {table} ({listed}) SELECT {listed} FROM jsonb_populate_recordset("
            f"NULL::{table}, $1::jsonb) WITH ORDINALITY ORDER BY ordinality "
            "ON CONFLICT DO NOTHING",
            json.dumps(rows),
        )
    except (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError) as exc:
        raise ArchiveRefused(name, f"cannot be restored: {exc}") from None


async def restore_table(
    job: Restore,
    table: str,
    device_column: str | None = "device_id",
    fix: Callable[[dict[str, Any]], None] | None = None,
) -> int:
    """``table``'s file restored, its device ids (null ones stay null) under the new ones."""
    name = f"{table}.jsonl"
    count = 0
    for batch in job.batches(name):
        for row in batch:
            if device_column is not None and row.get(device_column) is not None:
                row[device_column] = job.new_id(row[device_column], name)
            if fix is not None:
                fix(row)
        if batch:
            await _insert(job.conn, table, batch)
        count += len(batch)
    job.counts[table] = count
    return count


async def presets(job: Restore) -> None:
    """The archive's presets in place of this instance's (whose rules it replaced); those its
    instance never had installed now."""
    if "alert_rules.jsonl" not in job.checked.files:
        return  # the instance's own rules stay, and its presets with them
    await job.conn.execute("DELETE FROM alert_presets")
    await restore_table(job, "alert_presets", device_column=None)
    # An archive made before the presets were exported: its rules (deleted ones too, as a
    # deletion keeps the row) say which presets they were made from.
    await job.conn.execute(
        "INSERT INTO alert_presets (preset, rule_id, installed_at) "
        "SELECT preset, rule_id, created_at FROM alert_rules WHERE preset IS NOT NULL "
        "ON CONFLICT DO NOTHING"
    )
    await install_presets(job.conn)


def _as_reported(row: dict[str, Any]) -> None:
    row["reported_at"] = row.get("reported_at") or row.get("at")


def _check_integration(row: dict[str, Any], seen: set[str], names: set[str]) -> None:
    file = "integrations.jsonl"
    integration_id, name = row.get("integration_id"), row.get("name")
    if not isinstance(integration_id, str) or integration_id in seen:
        raise ArchiveRefused(file, f"integration id {integration_id!r} is missing or repeated")
    seen.add(integration_id)
    kinds = row.get("kinds")
    if not isinstance(kinds, list) or not kinds or any(k not in KINDS for k in kinds):
        raise ArchiveRefused(file, f"integration {integration_id!r} has kinds {kinds!r}")
    url = row.get("url")
    if not isinstance(url, str) or not isinstance(name, str):
        raise ArchiveRefused(file, f"integration {integration_id!r} lacks its name or url")
    # As the API would take them (the host is checked again at every POST).
    if not url.startswith(("https://", "http://")) or len(url) > MAX_URL_LENGTH:
        why = f"has a url that is no http(s) URL of at most {MAX_URL_LENGTH} characters"
        raise ArchiveRefused(file, f"integration {integration_id!r} {why}")
    if not 1 <= len(name) <= NAME_LIMIT:
        raise ArchiveRefused(
            file,
            f"integration {integration_id!r} has a name of {len(name)} characters "
            f"(1 to {NAME_LIMIT})",
        )
    if row.get("deleted_at") is None:
        if name in names:
            raise ArchiveRefused(file, f"two integrations in force are named {name!r}")
        names.add(name)


async def integrations(job: Restore) -> dict[str, str]:
    """The integrations, each with a new secret (those in force: in the answer), sent what
    happens from the end of this import's transaction on."""
    made: dict[str, str] = {}
    seen: set[str] = set()
    names: set[str] = set()
    # This transaction's id and the newest rows: what it wrote (none is sent) is before here.
    start = await job.conn.fetchrow(
        "SELECT pg_current_xact_id()::text AS xid, "
        "(SELECT coalesce(max(id), 0) FROM integration_events) AS events_id, "
        "(SELECT coalesce(max(id), 0) FROM reading_batches) AS readings_id, now() AS now"
    )
    assert start is not None

    def fix(row: dict[str, Any]) -> None:
        _check_integration(row, seen, names)
        secret = secrets.token_urlsafe(32)
        if row.get("deleted_at") is None:
            made[row["integration_id"]] = secret
            if len(made) > MAX_INTEGRATIONS:
                why = f"has more than {MAX_INTEGRATIONS} integrations in force"
                raise ArchiveRefused("integrations.jsonl", why)
        row |= {"secret": secret, "events_xid": start["xid"], "readings_xid": start["xid"]}
        row |= {"events_id": start["events_id"], "readings_id": start["readings_id"]}
        row |= {"readings_n": 0, "failures": 0, "next_at": start["now"].isoformat()}
        row |= {"last_error": None, "failing_since": None, "delivered_at": None}

    await restore_table(job, "integrations", device_column=None, fix=fix)
    await readings_noted_while_taken(job.conn)
    return made


async def restore_owned(job: Restore) -> dict[str, str]:
    """Everything of this module restored; the integrations' new secrets."""
    await presets(job)
    for table in ("calibration", "calibration_runs", "calibration_changes"):
        await restore_table(job, table)
    await restore_table(job, "quota_notices", device_column=None, fix=_as_reported)
    await restore_table(job, "quota_limited")
    return await integrations(job)
