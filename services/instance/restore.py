"""Restoring an export archive into a new, empty instance (``POST /api/import``).

The archive is checked whole first (``archive.check_archive``: the format, every file against
the manifest's size and sha256) and only then restored, in one transaction: devices, their
desired configurations, alert rules and history, rollups and readings, then the rest
(``restore_owned``: presets, calibration, quota notices, integrations). Either all of it is
there after the commit or none of it, and the archive's sha256 is recorded in ``imports`` in the
same transaction: a retry of an import that failed runs again from nothing, and a retry of one
that succeeded (its answer lost) finds the first outcome instead of importing twice.

Devices get new ids here, and new broker credentials: their broker passwords were never
exportable (the broker keeps only hashes, the instance not even those), their topics name this
instance's customer, and on a shared broker the old ids may still be in use by the instance
the archive came from. The answer maps each old id to its new one and gives each device in
use its new password, once. Devices that had registered themselves with a provisioning key
come back as registered by hand (their API keys' hashes were not exported): they are given
credentials like the others. Provisioning keys are not restored (only their metadata was
exported; a key without its hash can never be used): make new ones. Alert rules' webhook
secrets were not exported either: a rule with a webhook gets a new secret, in the answer.
"""

from __future__ import annotations

import json
import secrets
import tarfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import IO, Any

import asyncpg

from libs.mqtt.dynsec import DynSecError, device_acls
from services.instance.archive import ArchiveRefused, CheckedArchive
from services.instance.devices import DEVICES_LOCK, BrokerUnavailable, Devices, device_topics
from services.instance.export import READING_COLUMNS, ROLLUP_COLUMNS
from services.instance.readings import ensure_partitions
from services.instance.restore_owned import restore_owned

JSON_BATCH = 1000
MAX_LINE = 1 << 20
# Devices an archive may hold, deleted ones included (ten times the largest plan's).
MAX_DEVICES = 5000
# Readings staged before they are moved into their table under their devices' new ids.
STAGED_ROWS = 500_000
# Moving a batch may take longer than the pool's usual 30 s on a busy database.
STATEMENT_SECONDS = 600.0


class InstanceNotEmpty(Exception):
    """The instance holds data already: an archive is restored only into a new one."""


class TooManyDevices(Exception):
    """The archive has more devices in use than the license allows."""


@dataclass(frozen=True)
class Imported:
    """What an import did (``first`` False: it had been done before, by this archive)."""

    first: bool
    imported_at: datetime
    from_customer_id: str | None
    counts: dict[str, int]
    device_ids: dict[str, str]
    credentials: list[dict[str, Any]]
    webhook_secrets: dict[str, str]
    integration_secrets: dict[str, str]


async def earlier_import(conn: asyncpg.Connection, sha256: str) -> Imported | None:
    """The import of this archive done before, if there was one."""
    row = await conn.fetchrow("SELECT * FROM imports WHERE archive_sha256 = $1", sha256)
    if row is None:
        return None
    return Imported(
        first=False,
        imported_at=row["imported_at"],
        from_customer_id=row["from_customer_id"],
        counts=json.loads(row["counts"]),
        device_ids=json.loads(row["device_ids"]),
        credentials=[],
        webhook_secrets={},
        integration_secrets={},
    )


async def _holds_data(conn: asyncpg.Connection) -> str | None:
    # Alert rules are not the customer's data yet in a new instance: it may have made rules on
    # by default. The archive's rules replace them (``Restore.rules``).
    for table in ("devices", "readings", "readings_hourly", "imports", "integrations"):
        if await conn.fetchval(f"SELECT EXISTS (SELECT 1 FROM {table})"):
            return table
    return None


def _lines(stream: IO[bytes], name: str) -> Iterator[list[dict[str, Any]]]:
    """The JSON lines of a file, in batches of ``JSON_BATCH`` (a line at most ``MAX_LINE``
    bytes: no line of ours is near it, and a forged one is not read into memory whole)."""
    batch: list[dict[str, Any]] = []
    number = 0
    while line := stream.readline(MAX_LINE + 1):
        number += 1
        if len(line) > MAX_LINE:
            raise ArchiveRefused(name, f"line {number} is longer than {MAX_LINE} bytes")
        try:
            row = json.loads(line)
        except ValueError:
            raise ArchiveRefused(name, f"line {number} is not JSON") from None
        if not isinstance(row, dict):
            raise ArchiveRefused(name, f"line {number} is not an object")
        batch.append(row)
        if len(batch) >= JSON_BATCH:
            yield batch
            batch = []
    yield batch


async def insert_json(
    conn: asyncpg.Connection, table: str, rows: list[dict[str, Any]], name: str
) -> None:
    """Rows as the export wrote them (``row_to_json``) back into ``table``; columns missing
    take their defaults as null, unknown keys are ignored."""
    if not rows:
        return
    try:
        await conn.execute(
            f"INSERT INTO {table} SELECT * FROM jsonb_populate_recordset(NULL::{table}, $1::jsonb)",
            json.dumps(rows),
        )
    except (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError) as exc:
        raise ArchiveRefused(name, f"cannot be restored: {exc}") from None


class Restore:
    """One archive restored into this instance's database, in the caller's transaction."""

    def __init__(
        self, conn: asyncpg.Connection, checked: CheckedArchive, tar: tarfile.TarFile
    ) -> None:
        """Restore ``checked`` (opened as ``tar``) over ``conn``."""
        self.conn = conn
        self.checked = checked
        self.tar = tar
        self.device_ids: dict[str, str] = {}
        self.counts: dict[str, int] = {}

    def batches(self, name: str) -> Iterator[list[dict[str, Any]]]:
        if name not in self.checked.files:
            return iter([[]])
        return _lines(self.checked.open(self.tar, name), name)

    def new_id(self, old: Any, name: str) -> str:
        if not isinstance(old, str) or old not in self.device_ids:
            why = f"names a device {old!r:.80} that devices.jsonl does not have"
            raise ArchiveRefused(name, why)
        return self.device_ids[old]

    async def devices(self) -> None:
        """Devices under new ids, registered by hand, without credentials yet."""
        for batch in self.batches("devices.jsonl"):
            for row in batch:
                old = row.get("device_id")
                if len(self.device_ids) >= MAX_DEVICES:
                    raise ArchiveRefused("devices.jsonl", f"has more than {MAX_DEVICES} devices")
                if not isinstance(old, str) or old in self.device_ids:
                    why = f"device id {old!r} is missing or repeated"
                    raise ArchiveRefused("devices.jsonl", why)
                new = uuid.uuid4().hex[:16]
                self.device_ids[old] = new
                row |= {"device_id": new, "mqtt_username": f"dev-{new}", "uuid": None}
                row |= {"provisioning_key_id": None, "key_exchanged_at": None}
                row |= {"api_key_hash": None}
                if row.get("deleted_at") is None:
                    row["status"] = "unknown"
            await insert_json(self.conn, "devices", batch, "devices.jsonl")
        self.counts["devices"] = len(self.device_ids)

    async def configs(self) -> None:
        """Desired (and last reported) configurations, as delivered already: the devices come
        back registered by hand, to which nothing is published."""
        count = 0
        for batch in self.batches("device_config.jsonl"):
            for row in batch:
                row["device_id"] = self.new_id(row.get("device_id"), "device_config.jsonl")
                row["published_version"] = row.get("version")
            await insert_json(self.conn, "device_config", batch, "device_config.jsonl")
            count += len(batch)
        self.counts["device_config"] = count

    async def rules(self) -> dict[str, str]:
        """Alert rules (a new webhook secret for each with a webhook) and their history, in
        place of the rules a new instance had (those it makes on by default: they were in the
        archive too, as the customer had them, or the customer had deleted them)."""
        made: dict[str, str] = {}
        count = 0
        if "alert_rules.jsonl" in self.checked.files:
            for table in (
                "alert_states",
                "alert_windows",
                "webhook_deliveries",
                "alert_history",
                "alert_rules",
            ):
                await self.conn.execute(f"DELETE FROM {table}")
        for batch in self.batches("alert_rules.jsonl"):
            for row in batch:
                devices = row.get("devices") or []
                if not isinstance(devices, list):
                    raise ArchiveRefused("alert_rules.jsonl", "a rule's devices is not a list")
                row["devices"] = [self.new_id(d, "alert_rules.jsonl") for d in devices]
                if row.get("webhook_url"):
                    row["webhook_secret"] = made[str(row.get("rule_id"))] = secrets.token_urlsafe(
                        32
                    )
            await insert_json(self.conn, "alert_rules", batch, "alert_rules.jsonl")
            count += len(batch)
        self.counts["alert_rules"] = count
        count = 0
        for batch in self.batches("alert_history.jsonl"):
            for row in batch:
                row["device_id"] = self.new_id(row.get("device_id"), "alert_history.jsonl")
            await insert_json(self.conn, "alert_history", batch, "alert_history.jsonl")
            count += len(batch)
        self.counts["alert_history"] = count
        await self.conn.execute(
            "SELECT setval(pg_get_serial_sequence('alert_history', 'id'), "
            "greatest((SELECT max(id) FROM alert_history), 1))"
        )
        return made

    async def _stage(self, entry: dict[str, Any], staging: str, columns: tuple[str, ...]) -> int:
        """COPY one file into the staging table; its rows, which must be the manifest's."""
        name = entry["name"]
        self.new_id(entry.get("device_id"), name)
        try:
            status = await self.conn.copy_to_table(
                staging,
                source=self.checked.open(self.tar, name),
                columns=columns,
                format="csv",
                header=True,
                timeout=STATEMENT_SECONDS,
            )
        except (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError) as exc:
            raise ArchiveRefused(name, f"cannot be restored: {exc}") from None
        rows = int(status.split()[-1])
        if rows != entry.get("rows"):
            said = entry.get("rows")
            raise ArchiveRefused(name, f"holds {rows} rows; the manifest says {said}")
        return rows

    async def _move(
        self, staging: str, columns: tuple[str, ...], into: str, first: str, staged: int
    ) -> None:
        """The staged rows into ``into`` under their devices' new ids; the staging emptied."""
        try:
            moved = await self.conn.execute(
                f"INSERT INTO {into} ({', '.join(columns)}) "
                f"SELECT m.new_id, {', '.join('s.' + c for c in columns[1:])} "
                f"FROM {staging} s JOIN device_map m ON m.old_id = s.device_id",
                timeout=STATEMENT_SECONDS,
            )
        except (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError) as exc:
            raise ArchiveRefused(first, f"cannot be restored: {exc}") from None
        if int(moved.split()[-1]) != staged:
            stranger = await self.conn.fetchval(
                f"SELECT device_id FROM {staging} WHERE device_id NOT IN "
                "(SELECT old_id FROM device_map) LIMIT 1"
            )
            raise ArchiveRefused(first, f"has rows of a device devices.jsonl lacks: {stranger!r}")
        await self.conn.execute(f"TRUNCATE {staging}")

    async def _restore_kind(
        self, kind: str, staging: str, columns: tuple[str, ...], into: str
    ) -> int:
        """Every file of ``kind``, staged a batch of about ``STAGED_ROWS`` rows at a time."""
        total = staged = 0
        first = ""
        for entry in self.checked.of_kind(kind):
            first = first or entry["name"]
            staged += await self._stage(entry, staging, columns)
            if staged >= STAGED_ROWS:
                await self._move(staging, columns, into, first, staged)
                total, staged, first = total + staged, 0, ""
        if staged:
            await self._move(staging, columns, into, first, staged)
        return total + staged

    async def series(self) -> None:
        """Rollups and readings, through staging tables, a batch of files at a time."""
        conn = self.conn
        await conn.execute(
            "CREATE TEMPORARY TABLE rollups_in (LIKE readings_hourly) ON COMMIT DROP; "
            "CREATE TEMPORARY TABLE readings_restored (LIKE readings) ON COMMIT DROP; "
            "CREATE TEMPORARY TABLE device_map (old_id text PRIMARY KEY, new_id text) "
            "ON COMMIT DROP"
        )
        await conn.executemany(
            "INSERT INTO device_map VALUES ($1, $2)", list(self.device_ids.items())
        )
        self.counts["rollups"] = await self._restore_kind(
            "rollups-csv", "rollups_in", ROLLUP_COLUMNS, "readings_hourly"
        )
        days: set[date] = set()
        for entry in self.checked.of_kind("readings-csv"):
            try:
                days.add(date.fromisoformat(str(entry.get("day"))))
            except ValueError:
                raise ArchiveRefused(entry["name"], "has no day in the manifest") from None
        await ensure_partitions(conn, days, set())
        self.counts["readings"] = await self._restore_kind(
            "readings-csv", "readings_restored", READING_COLUMNS, "readings"
        )


async def issue_credentials(devices: Devices, rows: list[asyncpg.Record]) -> list[dict[str, Any]]:
    """New broker credentials for each device registered by hand (``device_id``,
    ``mqtt_username``, ``name``): its role, its client bound to its id, a new password; the
    earlier password, if any, stops working."""
    customer = devices.settings.instance_customer_id
    issued = []
    try:
        async with devices.broker_admin() as dynsec:
            for row in rows:
                device_id, username = row["device_id"], row["mqtt_username"]
                password = secrets.token_urlsafe(24)
                topics = device_topics(customer, device_id)
                await dynsec.ensure_role(username, device_acls(list(topics.values())))
                await dynsec.ensure_client(
                    username, password, [username], textname=row["name"], clientid=device_id
                )
                issued.append(
                    {
                        "device_id": device_id,
                        "username": username,
                        "password": password,
                        "client_id": device_id,
                        "topics": topics,
                    }
                )
    except (DynSecError, OSError) as exc:
        raise BrokerUnavailable(f"the broker refused the devices' credentials: {exc}") from None
    return issued


async def restore(
    conn: asyncpg.Connection,
    checked: CheckedArchive,
    sha256: str,
    devices: Devices,
    max_devices: int,
) -> Imported:
    """Restore the checked archive in one transaction (``InstanceNotEmpty`` when the instance
    holds data, ``TooManyDevices`` past the license); the earlier outcome when this archive
    was imported before."""
    with tarfile.open(checked.path, mode="r:") as tar:
        async with conn.transaction():
            await conn.execute(DEVICES_LOCK)
            if (before := await earlier_import(conn, sha256)) is not None:
                return before
            if (table := await _holds_data(conn)) is not None:
                raise InstanceNotEmpty(
                    f"this instance holds data already ({table}); an archive is restored only "
                    "into a new instance"
                )
            job = Restore(conn, checked, tar)
            await job.devices()
            in_use = await conn.fetch(
                "SELECT device_id, mqtt_username, name FROM devices WHERE deleted_at IS NULL "
                "ORDER BY created_at"
            )
            if len(in_use) > max_devices:
                raise TooManyDevices(
                    f"the archive has {len(in_use)} devices in use; "
                    f"the license allows {max_devices}"
                )
            await job.configs()
            made = await job.rules()
            await job.series()
            secrets_made = await restore_owned(job)
            now = datetime.now(UTC)
            customer = checked.manifest.get("customer_id")
            from_customer = customer if isinstance(customer, str) else None
            await conn.execute(
                "INSERT INTO imports (archive_sha256, imported_at, from_customer_id, counts, "
                "device_ids) VALUES ($1, $2, $3, $4, $5)",
                sha256,
                now,
                from_customer,
                json.dumps(job.counts),
                json.dumps(job.device_ids),
            )
            credentials = await issue_credentials(devices, in_use)
    return Imported(
        True, now, from_customer, job.counts, job.device_ids, credentials, made, secrets_made
    )
