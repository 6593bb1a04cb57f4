"""MQTT ingest: the instance's subscriber (QoS 1) on its devices' readings and status.

Each message is checked (known device, size, msgspec against the sensor's ranges, the license's
daily message quota, read-only mode) and either buffered as a row or recorded as a dead letter
with its reason. The buffer is written with COPY in one transaction per batch (at
``INGEST_BATCH_ROWS`` rows or every ``INGEST_FLUSH_SECONDS``), together with the rollups,
dead letters, the day's usage counters and the devices' last-seen times. A reading over the
quota is dropped and counted, never half-stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import aiomqtt
import asyncpg
from prometheus_client import CollectorRegistry
from prometheus_client import Counter as PromCounter

from libs.db import CONNECTION_ERRORS
from libs.mqtt_dynsec import DynSec, DynSecError, instance_acls
from services.instance.license import LicenseHolder
from services.instance.readings import METRICS, Rejected, parse_reading, record, store_readings
from services.instance.settings import InstanceSettings

log = logging.getLogger(__name__)

DEAD_LETTER_PAYLOAD = 4096


@dataclass
class Batch:
    """What arrived since the last write."""

    rows: list[tuple[Any, ...]] = field(default_factory=list)
    dead: list[tuple[Any, ...]] = field(default_factory=list)
    seen: dict[str, tuple[datetime, str]] = field(default_factory=dict)
    usage: Counter[str] = field(default_factory=Counter)


class IngestMetrics:
    """Readings received, stored and rejected (by reason) since the instance started."""

    def __init__(self, registry: CollectorRegistry) -> None:
        """Registers the counters."""
        self.messages = PromCounter(
            "iotistic_instance_mqtt_messages_total", "MQTT messages received", registry=registry
        )
        self.stored = PromCounter(
            "iotistic_instance_readings_stored_total", "Readings stored", registry=registry
        )
        self.rejected = PromCounter(
            "iotistic_instance_readings_rejected_total",
            "Readings not stored, by reason",
            ["reason"],
            registry=registry,
        )


class Ingest:
    """Subscribes to the devices' topics and writes what they publish."""

    def __init__(
        self,
        settings: InstanceSettings,
        pool: Callable[[], asyncpg.Pool | None],
        license: LicenseHolder,
        metrics: IngestMetrics,
        on_stored: Callable[[dict[str, Any]], None] = lambda _: None,
    ) -> None:
        """``pool`` may be None until the database answers; messages wait in the buffer.
        ``on_stored`` sees each reading once it is stored (the dashboard's live charts)."""
        self._settings = settings
        self._pool = pool
        self._license = license
        self._metrics = metrics
        self._on_stored = on_stored
        self._batch = Batch()
        self._known_devices: set[str] = set()
        self._devices_loaded_at = 0.0
        self._partitions: set[date] = set()
        self._full = asyncio.Event()
        self.today: date = datetime.now(UTC).date()
        self.accepted_today = 0

    @property
    def root(self) -> str:
        """``<customer_id>/devices``."""
        return f"{self._settings.instance_customer_id}/devices"

    async def ensure_own_client(self) -> None:
        """Where the instance administers its broker (its own, in Kubernetes), make sure its
        ingest client exists and may read only this customer's devices."""
        s = self._settings
        if not (s.mqtt_admin_username and s.mqtt_admin_password and s.mqtt_username):
            return
        async with DynSec(
            s.mqtt_host, s.mqtt_port, s.mqtt_admin_username, s.mqtt_admin_password
        ) as ds:
            await ds.ensure_role(s.mqtt_username, instance_acls(s.instance_customer_id))
            await ds.ensure_client(s.mqtt_username, s.mqtt_password or "", [s.mqtt_username])

    async def run(self) -> None:
        """Subscribe and write for ever, reconnecting to the broker when it goes away."""
        writer = asyncio.create_task(self._write_forever())
        try:
            while True:
                try:
                    await self.ensure_own_client()
                    await self._subscribe()
                except (aiomqtt.MqttError, DynSecError) as exc:
                    log.warning("broker connection lost (%s); reconnecting", exc)
                    await asyncio.sleep(1)
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer

    async def _subscribe(self) -> None:
        s = self._settings
        async with aiomqtt.Client(
            s.mqtt_host,
            s.mqtt_port,
            username=s.mqtt_username,
            password=s.mqtt_password,
            identifier=f"instance-{s.instance_customer_id}",
            clean_session=False,
        ) as client:
            await client.subscribe(f"{self.root}/+/readings", qos=1)
            await client.subscribe(f"{self.root}/+/status", qos=1)
            async for message in client.messages:
                await self.receive(str(message.topic), bytes(message.payload))

    async def receive(self, topic: str, payload: bytes) -> None:
        """Take one message: buffer it as a row, or as a dead letter with its reason."""
        now = datetime.now(UTC)
        self._metrics.messages.inc()
        parts = topic.split("/")
        if len(parts) != 4 or f"{parts[0]}/{parts[1]}" != self.root:
            return self._reject(topic, None, "unknown topic", payload, now)
        device_id, kind = parts[2], parts[3]
        if not await self._known(device_id):
            return self._reject(topic, device_id, "unknown device", payload, now)
        batch = self._batch
        if kind == "status":
            state = payload.decode(errors="replace").strip().strip('"').lower()
            batch.seen[device_id] = (now, "offline" if state == "offline" else "online")
            return None
        if self._license.read_only(now):
            return self._reject(
                topic, device_id, "read-only: the license has expired", payload, now
            )
        try:
            ts, reading = parse_reading(payload, now, now - timedelta(days=self._retention()))
        except Rejected as exc:
            return self._reject(topic, device_id, str(exc), payload, now)
        self._roll_day(now)
        if self.accepted_today >= self._quota():
            batch.usage["over_quota_readings"] += 1
            self._metrics.rejected.labels("over quota").inc()
            return None
        self.accepted_today += 1
        batch.rows.append(record(device_id, ts, reading))
        batch.usage["mqtt_messages"] += 1
        batch.seen[device_id] = (now, "online")
        if len(batch.rows) >= self._settings.ingest_batch_rows:
            self._full.set()
        return None

    def _reject(
        self, topic: str, device_id: str | None, reason: str, payload: bytes, now: datetime
    ) -> None:
        self._batch.dead.append(
            (now, topic[:512], device_id, reason[:500], payload[:DEAD_LETTER_PAYLOAD])
        )
        self._batch.usage["rejected_readings"] += 1
        self._metrics.rejected.labels(reason.split(":")[0]).inc()

    def _retention(self) -> int:
        claims = self._license.claims
        return claims.features.dataRetentionDays if claims is not None else 1

    def _quota(self) -> int:
        claims = self._license.claims
        return claims.limits.mqttMessagesPerDay if claims is not None else 0

    def _roll_day(self, now: datetime) -> None:
        if now.date() != self.today:
            self.today, self.accepted_today = now.date(), 0

    async def _known(self, device_id: str) -> bool:
        loop = asyncio.get_running_loop()
        if device_id in self._known_devices:
            return True
        if loop.time() - self._devices_loaded_at < 1.0:
            return False
        pool = self._pool()
        if pool is None:
            return False
        self._devices_loaded_at = loop.time()
        async with pool.acquire() as conn:
            rows = await conn.fetch("SELECT device_id FROM devices WHERE deleted_at IS NULL")
        self._known_devices = {r["device_id"] for r in rows}
        return device_id in self._known_devices

    def count_api_request(self) -> None:
        """One more API request today, written with the next batch."""
        self._batch.usage["api_requests"] += 1

    def know_device(self, device_id: str) -> None:
        """A device registered just now may publish at once."""
        self._known_devices.add(device_id)

    def forget_device(self, device_id: str) -> None:
        """A deleted device's messages are refused from now on."""
        self._known_devices.discard(device_id)

    async def load_usage(self) -> None:
        """Start the day's quota from what was stored today before a restart."""
        pool = self._pool()
        if pool is None:
            return
        async with pool.acquire() as conn:
            stored = await conn.fetchval(
                "SELECT mqtt_messages FROM usage_days WHERE day = $1", self.today
            )
        self.accepted_today = int(stored or 0)

    async def _write_forever(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._full.wait(), self._settings.ingest_flush_seconds)
            self._full.clear()
            try:
                await self.flush()
            except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
                log.warning("could not write readings (%s); keeping them for the next try", exc)
                await asyncio.sleep(1)

    async def flush(self) -> int:
        """Write the buffer in one transaction; on failure it stays for the next try."""
        batch = self._batch
        if not (batch.rows or batch.dead or batch.seen or batch.usage):
            return 0
        pool = self._pool()
        if pool is None:
            return 0
        self._batch = Batch()
        try:
            async with pool.acquire() as conn, conn.transaction():
                if batch.rows:
                    await store_readings(conn, batch.rows, self._partitions)
                if batch.dead:
                    await conn.executemany(
                        "INSERT INTO dead_letters (received_at, topic, device_id, reason, payload) "
                        "VALUES ($1, $2, $3, $4, $5)",
                        batch.dead,
                    )
                await self._record_usage(conn, batch)
                for device_id, (seen, status) in batch.seen.items():
                    await conn.execute(
                        "UPDATE devices SET last_seen = GREATEST(last_seen, $2), status = $3 "
                        "WHERE device_id = $1",
                        device_id,
                        seen,
                        status,
                    )
        except BaseException:
            self._merge_back(batch)
            raise
        self._metrics.stored.inc(len(batch.rows))
        for row in batch.rows:
            self._on_stored(
                {
                    "device_id": row[0],
                    "ts": row[1].isoformat(),
                    **dict(zip(METRICS, row[2:], strict=True)),
                }
            )
        return len(batch.rows)

    async def _record_usage(self, conn: asyncpg.Connection, batch: Batch) -> None:
        usage = batch.usage
        await conn.execute(
            """
            INSERT INTO usage_days (day, mqtt_messages, stored_readings, rejected_readings,
                                    over_quota_readings, api_requests)
            VALUES ($1, $2, $3, $4, $5, $6)
            ON CONFLICT (day) DO UPDATE SET
                mqtt_messages = usage_days.mqtt_messages + EXCLUDED.mqtt_messages,
                stored_readings = usage_days.stored_readings + EXCLUDED.stored_readings,
                rejected_readings = usage_days.rejected_readings + EXCLUDED.rejected_readings,
                over_quota_readings = usage_days.over_quota_readings
                    + EXCLUDED.over_quota_readings,
                api_requests = usage_days.api_requests + EXCLUDED.api_requests
            """,
            self.today,
            usage["mqtt_messages"],
            len(batch.rows),
            usage["rejected_readings"],
            usage["over_quota_readings"],
            usage["api_requests"],
        )

    def _merge_back(self, batch: Batch) -> None:
        current = self._batch
        batch.rows.extend(current.rows)
        batch.dead.extend(current.dead)
        batch.seen.update(current.seen)
        batch.usage.update(current.usage)
        self._batch = batch
