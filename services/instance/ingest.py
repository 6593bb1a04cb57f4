"""MQTT ingest: the instance's subscriber (QoS 1) on its devices' readings and status, and on
its fleet devices' readings batches, heartbeats and configuration reports in the original
agent's wire format (``iot/device/<uuid>/...``; see ``intake`` and ``original_format``).

Each message is checked (known device, size, msgspec against the sensor's ranges, the license's
daily message budget and its burst allowance (``quotas``), read-only mode) and either buffered
as a row or recorded as a dead letter with its reason (a batch in the original format: each of
its readings; the batch is one message, acknowledged once). The buffer is written in one
transaction per batch (at ``INGEST_BATCH_ROWS`` messages or every ``INGEST_FLUSH_SECONDS``; see
``ingest_batch``). A reading over the quota is dropped and counted (per device and minute,
with the limit that refused it), never half-stored.

Messages are acknowledged to the broker (PUBACK) only after their batch has committed, so a
crash or a database outage loses nothing: the broker delivers what was not acknowledged again
(at least once). Delivery twice is harmless where it lands: a reading is keyed on its device
and its time, one already stored is skipped, and the rollups, the usage counts and the daily
quota count only the readings actually added. So the rows buffered when a connection is lost
are kept (the broker may not deliver them again, if it lost the session) and their copies,
delivered again on the next connection, are stored once. While the database is away the broker
holds back everything past the receive maximum, which bounds what this process buffers (in
messages: a batch in the original format holds up to 1000 readings).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import UTC, date, datetime
from typing import Any

import asyncpg

from libs.db.postgres import CONNECTION_ERRORS
from libs.mqtt.dynsec import DynSec, DynSecError, subtree_acls
from libs.mqtt.subscriber import MqttSubscriber, MqttSubscriberError, SubscriberOptions
from services.instance import fleet
from services.instance.config_reports import fleet_devices
from services.instance.devices import active_device_ids
from services.instance.fleet import fleet_role, fleet_role_acls
from services.instance.ingest_batch import Batch, write_batch
from services.instance.ingest_metrics import IngestMetrics
from services.instance.intake import Intake
from services.instance.license import LicenseHolder
from services.instance.quotas import load_bucket, save_bucket
from services.instance.settings import InstanceSettings, ingest_client_id
from services.instance.usage import usage_day

log = logging.getLogger(__name__)

__all__ = ["Ingest", "IngestMetrics"]


class Ingest(Intake):
    """Subscribes to the devices' topics and writes what they publish (``Intake`` takes each
    message into the batch)."""

    def __init__(
        self,
        settings: InstanceSettings,
        pool: Callable[[], asyncpg.Pool | None],
        license: LicenseHolder,
        metrics: IngestMetrics,
        on_stored: Callable[[list[tuple[Any, ...]]], None] | None = None,
    ) -> None:
        """``pool`` may be None until the database answers; messages wait in the buffer (and,
        unacknowledged, in the broker). ``on_stored`` sees the rows of each batch once they
        are stored (the dashboard's live charts)."""
        super().__init__(settings, license, metrics)
        self._pool = pool
        self._on_stored = on_stored
        self._devices_loaded_at = -1.0
        self._partitions: set[date] = set()
        self._subscriber: MqttSubscriber | None = None
        self._closing = False
        # Messages buffered (rows, dead letters, unknown devices') before QoS 0 ones are dropped.
        self._buffer_cap = 4 * settings.ingest_batch_rows
        self._started_at = time.monotonic()

    def disconnected_for(self) -> float:
        """Seconds ingest has not been subscribed to the broker (0 while it is): since its
        last connection was lost, or since the instance started if it never was."""
        subscriber = self._subscriber
        if subscriber is not None and subscriber.subscribed.is_set():
            return 0.0
        lost = subscriber.lost_at if subscriber is not None else None
        return time.monotonic() - (lost if lost is not None else self._started_at)

    async def ensure_own_client(self) -> None:
        """Where the instance administers its broker (its own, in Kubernetes), make sure its
        ingest client exists, bound to its client id, and may read only this customer's
        devices."""
        s = self._settings
        if not (s.mqtt_admin_username and s.mqtt_admin_password and s.mqtt_username):
            return
        fleet = fleet_role(s.mqtt_username)
        async with DynSec(
            s.mqtt_host, s.mqtt_port, s.mqtt_admin_username, s.mqtt_admin_password
        ) as ds:
            await ds.ensure_role(s.mqtt_username, subtree_acls(s.instance_customer_id))
            # The fleet devices' rights are added and removed with the devices (provisioning);
            # here the role is only made if it is missing.
            await ds.create_role(fleet, fleet_role_acls([]))
            await ds.ensure_client(
                s.mqtt_username,
                s.mqtt_password or "",
                [s.mqtt_username, fleet],
                clientid=ingest_client_id(s),
                # Checked first: its allows for the fleet's topics come before the ingest
                # role's deny of everything outside the customer's subtree.
                priorities={fleet: 1},
            )

    async def run(self) -> None:
        """Subscribe and write for ever, reconnecting to the broker when it goes away. When
        cancelled, stop taking messages, write and acknowledge what was taken, then leave."""
        writer = asyncio.create_task(self._write_forever())
        connection: asyncio.Task[None] | None = None
        at_once = -1.0
        try:
            while True:
                connection = asyncio.create_task(self._connection())
                try:
                    await asyncio.shield(connection)
                except (MqttSubscriberError, DynSecError) as exc:
                    log.warning("broker connection lost (%s); reconnecting", exc)
                    if not self._just_lost() or time.monotonic() - at_once < 1:
                        await asyncio.sleep(1)
                    else:
                        # A working connection lost (the broker's administration may end it,
                        # e.g. when the client's password or roles change): the devices' QoS 0
                        # messages are lost until it is back, so it is, at once (once a second
                        # at most).
                        at_once = time.monotonic()
        except asyncio.CancelledError:
            self._closing = True
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
            with contextlib.suppress(*CONNECTION_ERRORS, asyncpg.PostgresError, TimeoutError):
                await asyncio.wait_for(self.flush(), 10)
            raise
        finally:
            writer.cancel()
            if connection is not None:
                connection.cancel()
                with contextlib.suppress(asyncio.CancelledError, MqttSubscriberError):
                    await connection

    def _just_lost(self) -> bool:
        """Whether a subscribed connection ended just now (not a connection attempt that
        failed)."""
        lost = self._subscriber.lost_at if self._subscriber is not None else None
        return lost is not None and time.monotonic() - lost < 1

    async def _connection(self) -> None:
        s = self._settings
        await self.ensure_own_client()
        if self._subscriber is None:
            # One subscriber for the process: its connection count tells a lost connection's
            # packet ids from the current one's.
            self._subscriber = MqttSubscriber(
                SubscriberOptions(
                    host=s.mqtt_host,
                    port=s.mqtt_port,
                    client_id=ingest_client_id(s),
                    username=s.mqtt_username,
                    password=s.mqtt_password,
                    filters=(
                        f"{self.root}/+/readings",
                        f"{self.root}/+/status",
                        fleet.SUBSCRIPTION,
                    ),
                    # Room for two batches in flight while one is being written.
                    receive_maximum=min(65_535, 2 * s.ingest_batch_rows + 1000),
                ),
                self.receive,
            )
        await self._subscriber.run()

    def receive(self, topic: str, payload: bytes, packet_id: int = 0) -> None:
        """Take one message: buffer it as a row, or as a dead letter with its reason. Its
        ``packet_id`` (0 for QoS 0) is acknowledged once the batch is stored."""
        if self._closing:
            return  # not acknowledged: the broker delivers it again to the next instance run
        batch = self._batch
        if not packet_id and len(batch.rows) + len(batch.dead) + len(batch.unknown) >= (
            self._buffer_cap
        ):
            # QoS 0 is not held back by the broker: past the cap (the database is away or
            # behind) such readings are dropped, and counted.
            self._metrics.rejected.labels("buffer full (QoS 0)").inc()
            return
        self._arrived.set()
        connection = self._subscriber.connection if self._subscriber else 0
        if connection != batch.connection:
            # A lost connection's unacknowledged messages come again on the new one, and their
            # packet ids are that connection's only. Their rows stay: the copies delivered
            # again are skipped where they are stored.
            batch.acks.clear()
            batch.unknown.clear()
            batch.connection = connection
        self._take_safely(topic, payload, datetime.now(UTC), packet_id)

    async def _settle_unknown(self, pool: asyncpg.Pool) -> None:
        """Messages from devices not in the cache: reload the devices (at most once a second,
        so a stranger's flood cannot hammer the database), then take each message again or
        dead-letter it. Until a reload is allowed, they wait (with their acknowledgements)."""
        connection, unknown = self._batch.connection, self._batch.unknown
        self._batch.unknown = []
        loop = asyncio.get_running_loop()
        reloaded = False
        if loop.time() - self._devices_loaded_at >= 1.0 or self._devices_loaded_at < 0:
            self._devices_loaded_at = loop.time()
            try:
                async with pool.acquire() as conn:
                    await self._load_devices(conn)
            except BaseException:
                if connection == self._batch.connection:
                    self._batch.unknown[:0] = unknown
                raise
            reloaded = True
        if connection != self._batch.connection:
            return  # those messages come again on the new connection
        waiting = []
        for message in unknown:
            topic, payload, now, packet_id = message
            if reloaded or self._is_known(topic):
                self._take_safely(topic, payload, now, packet_id, looked_up=True)
            else:
                waiting.append(message)
        self._batch.unknown[:0] = waiting

    async def _load_devices(self, conn: asyncpg.Connection) -> None:
        self._known_devices = await active_device_ids(conn)
        self._fleet = await fleet_devices(conn)

    async def load_usage(self) -> None:
        """Start the day's quota from what was stored today before a restart, and learn the
        devices."""
        pool = self._pool()
        if pool is None:
            return
        async with pool.acquire() as conn:
            today = await usage_day(conn, self.today)
            await self._load_devices(conn)
            await self._offsets.load(conn, asyncio.get_running_loop().time())
            saved = await load_bucket(conn)
        self.accepted_today = today["mqtt_messages"] if today else 0
        if saved is not None:
            self.restore_bucket(*saved)
        self._devices_loaded_at = asyncio.get_running_loop().time()

    def _idle(self) -> bool:
        return not (self._batch.has_writes() or self._batch.unknown)

    async def _write_forever(self) -> None:
        while True:
            if self._idle():
                # Nothing to write: sleep until something arrives rather than wake every
                # INGEST_FLUSH_SECONDS (hundreds of idle instances share a host's cores).
                await self._arrived.wait()
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._full.wait(), self._settings.ingest_flush_seconds)
            self._full.clear()
            try:
                await self.flush()
            except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
                log.warning("could not write readings (%s); keeping them for the next try", exc)
                await asyncio.sleep(1)
            except Exception:
                log.exception("could not write readings; keeping them for the next try")
                await asyncio.sleep(1)

    async def _load_offsets(self, pool: asyncpg.Pool) -> None:
        """The fleet devices' temperature offsets from the database, then the reports taken
        but not yet written over them."""
        async with pool.acquire() as conn:
            await self._offsets.load(conn, asyncio.get_running_loop().time())
        for device_id, (_, report) in self._batch.reports.items():
            self._offsets.reported(device_id, report.temperature_offset)

    async def flush(self) -> int:
        """Write the buffer in one transaction and acknowledge its messages to the broker; on
        failure it stays for the next try."""
        pool = self._pool()
        if pool is None:
            return 0
        if self._fleet and self._offsets.due(asyncio.get_running_loop().time()):
            await self._load_offsets(pool)
        if self._batch.unknown:
            await self._settle_unknown(pool)
        batch = self._batch
        if not batch.has_writes():
            return 0
        # Messages of devices still being looked up stay for the next batch (with their acks).
        self._batch = Batch(connection=batch.connection, unknown=batch.unknown)
        batch.unknown = []
        try:
            async with pool.acquire() as conn, conn.transaction():
                stored, shown = await write_batch(conn, batch, self.today, self._partitions)
                if self.bucket is not None and (batch.rows or batch.refused):
                    await save_bucket(conn, self.bucket)
        except BaseException:
            batch.absorb(self._batch)
            self._batch = batch
            # A partition made in the rolled-back transaction is gone again (and retention
            # may have dropped one): make them again, as needed, on the next try.
            self._partitions.clear()
            raise
        if self._subscriber is not None:
            self._subscriber.ack(batch.connection, batch.acks)
        self._metrics.messages.inc(batch.usage["messages"])
        self._metrics.stored.inc(stored)
        if batch.usage["over_quota_readings"]:
            self._metrics.rejected.labels("over quota").inc(batch.usage["over_quota_readings"])
        repeated = len(batch.rows) - stored
        if repeated:
            # They were counted against today's quota as they arrived; they are not stored.
            self._metrics.repeated.inc(repeated)
            self.accepted_today = max(0, self.accepted_today - repeated)
            if self.bucket is not None:
                self.bucket.give_back(repeated)
        if self._on_stored is not None and shown:
            self._on_stored(shown)
        return stored
