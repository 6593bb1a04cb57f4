"""The config publisher: the instance's broker client that delivers fleet devices' desired
configurations, each a retained QoS 1 message on ``iot/device/<uuid>/config``.

Its broker client, ``<ingest user>-config`` bound to the client id ``<ingest client id>-config``,
is made through dynamic security at start with a random password that lives only in this
process, and holds only the customer's fleet role: it may publish the configuration of the
customer's own fleet devices and nothing else. It speaks MQTT 5 so that a publish the broker
refuses (the device's rights not in the fleet role yet) is seen as refused, not taken.

A configuration is published right after its row is written (``publish``); the version on the
broker is recorded in ``device_config.published_version``. A background task publishes every
configuration whose ``published_version`` is behind its ``version`` (the broker was away, or
refused), and every configuration each time it connects: a broker that restarted may have lost
its retained messages. A deleted device's retained configuration is cleared (``clear``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import aiomqtt
import asyncpg
import msgspec
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from libs.db.postgres import CONNECTION_ERRORS
from libs.mqtt.dynsec import DynSec, DynSecError
from libs.runtime.supervision import retrying
from services.instance.device_config import DesiredConfig, mark_published, payload
from services.instance.devices import BrokerUnavailable
from services.instance.fleet import config_topic, fleet_role, fleet_role_acls
from services.instance.settings import InstanceSettings, ingest_client_id

log = logging.getLogger(__name__)

PUBLISH_TIMEOUT = 5.0
# How long a publish waits for the publisher's connection (the instance has just started).
CONNECT_WAIT = 2.0
# How long the broker keeps the publisher's session (it holds no subscription) while away.
SESSION_EXPIRY = 7 * 86_400
# How often the background task looks for configurations not on the broker, besides when a
# publish fails (a safety net: it is woken for those).
SWEEP_SECONDS = 60.0
NOT_ADMINISTERED = (
    "this instance has no broker administration (MQTT_ADMIN_*): the configuration is stored "
    "but not delivered to the device"
)
_TRANSIENT = (
    aiomqtt.MqttError,
    DynSecError,
    OSError,
    TimeoutError,
    *CONNECTION_ERRORS,
    asyncpg.PostgresError,
)


class ConfigNotPublished(BrokerUnavailable):
    """The broker did not take a configuration (or its clearing): away, or refused it."""


class ConfigRefused(ConfigNotPublished):
    """The broker refused one device's configuration (its rights are not in the fleet role,
    yet: registration adds them, and the instance converges them at start)."""


class _Client(aiomqtt.Client):
    """aiomqtt's client, keeping what aiomqtt drops: the reason code of a refused publish,
    and whether the broker still had our session when we connected."""

    refusal: str | None = None
    session_present = False

    def _on_connect(
        self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any = None
    ) -> None:
        self.session_present = bool(getattr(flags, "session_present", False))
        super()._on_connect(client, userdata, flags, reason_code, properties)

    def _on_publish(
        self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any
    ) -> None:
        if isinstance(reason_code, ReasonCode) and reason_code.is_failure:
            self.refusal = str(reason_code)
        super()._on_publish(client, userdata, mid, reason_code, properties)


class ConfigPublisher:
    """Delivers desired configurations to fleet devices as retained messages."""

    def __init__(self, settings: InstanceSettings, pool: Callable[[], asyncpg.Pool | None]) -> None:
        """``pool`` may be None until the database answers; publishing waits for it."""
        self._settings = settings
        self._pool = pool
        # Made at every start and kept nowhere: the broker's copy is replaced at the next.
        self._password = secrets.token_urlsafe(24)
        self._client: _Client | None = None
        self._connected = asyncio.Event()
        # Every configuration is published at start, and after the broker lost our session.
        self._everything_due = True
        self._client_made = False
        # One publish at a time, each of the row as it is then: two PUTs close together cannot
        # leave the older version retained, nor a clearing be overtaken by a republish.
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        # Cleared uuids, and when: configurations of devices created before are not published.
        self._cleared: dict[str, datetime] = {}

    @property
    def unavailable_reason(self) -> str | None:
        """Why this instance cannot deliver configurations, or None when it can."""
        s = self._settings
        if not (s.mqtt_admin_username and s.mqtt_admin_password and s.mqtt_username):
            return NOT_ADMINISTERED
        return None

    @property
    def username(self) -> str:
        """The publisher's broker client: ``<ingest user>-config``."""
        return f"{self._settings.mqtt_username}-config"

    @property
    def client_id(self) -> str:
        """The only client id its credentials connect with."""
        return f"{ingest_client_id(self._settings)}-config"

    async def publish(self, device_id: str) -> str | None:
        """Publish the device's current configuration now; None when the broker took it,
        else why not (the background task publishes it as soon as it can)."""
        if (reason := self.unavailable_reason) is not None:
            return reason
        try:
            # Just started, or reconnecting: give the connection a moment.
            async with asyncio.timeout(CONNECT_WAIT):
                await self._connected.wait()
        except TimeoutError:
            pass
        try:
            # Bounded: behind a sweep of every configuration, or a broker that does not answer,
            # the answer does not wait; the background task publishes it.
            async with asyncio.timeout(PUBLISH_TIMEOUT):
                await self._publish_device(device_id)
        except (ConfigNotPublished, *_TRANSIENT) as exc:
            self._wake.set()
            log.warning("config of device %s not published yet: %s", device_id, exc)
            return f"the broker did not take it yet ({exc}); it is published as soon as it does"
        return None

    async def clear(self, uuid: str) -> None:
        """Remove the retained configuration of a deleted fleet device (an empty retained
        message), and publish none of a device created before now with this uuid again. Call
        it while the uuid's rights are still in the fleet role (before removing them): the
        broker refuses it after. ``ConfigNotPublished`` (a ``BrokerUnavailable``) when the
        broker did not take it."""
        if self.unavailable_reason is not None:
            return  # nothing was ever published from here
        self._cleared[uuid] = datetime.now(UTC)
        # The publisher connects after the instance is ready, and again after the broker went
        # away: a deletion just then waits for it a moment, as a publish does (bounded: the
        # deletion holds the devices' lock meanwhile).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CONNECT_WAIT):
                await self._connected.wait()
        async with self._lock:
            await self._send(config_topic(uuid), b"")

    async def run(self) -> None:
        """For ever: make the broker client and connect (with backoff while the broker or
        the database is away), publish every configuration the first time and whenever the
        broker lost our session (it restarted, and so may have lost its retained messages),
        then those behind their version whenever woken (or every ``SWEEP_SECONDS``)."""
        if self.unavailable_reason is not None:
            await asyncio.Event().wait()
        while True:
            async with contextlib.AsyncExitStack() as connection:
                async for attempt in retrying(_TRANSIENT, wait_initial=0.2, wait_max=15.0):
                    with attempt:
                        client = await self._connect(connection)
                if not client.session_present:
                    self._everything_due = True
                try:
                    await self._serve(client)
                except (*_TRANSIENT, ConfigNotPublished) as exc:
                    # The broker went away, or disconnected us (its administration may).
                    # Connect again at once; the session found, or not, tells whether the
                    # broker may have lost its retained messages.
                    log.warning("config publisher: connection ended (%s); connecting again", exc)

    async def _ensure_own_client(self) -> None:
        s = self._settings
        fleet = fleet_role(s.mqtt_username or "")
        async with DynSec(
            s.mqtt_host, s.mqtt_port, s.mqtt_admin_username or "", s.mqtt_admin_password or ""
        ) as ds:
            # Ingest makes the role too; whoever comes first makes it (empty: the devices'
            # rights are added and removed with the devices).
            await ds.create_role(fleet, fleet_role_acls([]))
            await ds.ensure_client(self.username, self._password, [fleet], clientid=self.client_id)

    async def _connect(self, connection: contextlib.AsyncExitStack) -> _Client:
        """The database first (publishing starts with reading it), then the broker."""
        self._ready_pool()
        if not self._client_made:
            # Once: setting a client's password disconnects its connection, if it has one.
            await self._ensure_own_client()
            self._client_made = True
        s = self._settings
        expiry = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        expiry.SessionExpiryInterval = SESSION_EXPIRY
        client = _Client(
            s.mqtt_host,
            s.mqtt_port,
            username=self.username,
            password=self._password,
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            # The session outlives the connection: finding it again tells a kick or a lost
            # connection from a broker that restarted.
            clean_start=False,
            properties=expiry,
            timeout=PUBLISH_TIMEOUT,
        )
        try:
            await connection.enter_async_context(client)
        except MqttConnectError:
            self._client_made = False  # refused: the broker may have lost its clients
            raise
        return client

    async def _serve(self, client: _Client) -> None:
        """Publish on this connection until it is lost."""
        self._client = client
        self._connected.set()
        lost = asyncio.create_task(self._until_lost(client))
        sweeping = asyncio.create_task(self._sweep_forever())
        try:
            done, _ = await asyncio.wait((lost, sweeping), return_when=asyncio.FIRST_COMPLETED)
            # Both may have ended (a lost connection fails a publish too): look at each.
            reasons = [e for e in (task.exception() for task in done) if e is not None]
            if reasons:
                raise reasons[0]
        finally:
            # Also when the publisher is stopped: neither outlives the connection.
            for task in (lost, sweeping):
                task.cancel()
            await asyncio.gather(lost, sweeping, return_exceptions=True)
            self._client = None
            self._connected.clear()

    @staticmethod
    async def _until_lost(client: aiomqtt.Client) -> None:
        # It subscribes to nothing: the iteration ends only when the connection does.
        async for _ in client.messages:
            pass
        raise aiomqtt.MqttError("the broker connection ended")

    async def _sweep_forever(self) -> None:
        refused_in_a_row = 0
        while True:
            self._wake.clear()
            everything = self._everything_due
            refused = await self._publish_pending(everything=everything)
            if everything:
                self._everything_due = False
            # Refused ones are tried again sooner, backing off while they stay refused.
            refused_in_a_row = refused_in_a_row + 1 if refused else 0
            wait = min(SWEEP_SECONDS, 2.0**refused_in_a_row) if refused else SWEEP_SECONDS
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()

    async def _publish_pending(self, *, everything: bool) -> int:
        """Publish the configurations behind their version (or all); how many the broker
        refused. A lost connection or database ends the sweep (and the session)."""
        pool = self._ready_pool()
        async with pool.acquire() as conn:
            rows = await conn.fetch(
                """
                SELECT c.device_id FROM device_config c JOIN devices d USING (device_id)
                WHERE d.deleted_at IS NULL AND d.uuid IS NOT NULL
                  AND ($1 OR c.published_version < c.version OR d.uuid = ANY($2::text[]))
                ORDER BY c.device_id
                """,
                everything,
                # Cleared while a deletion went on: published again where the deletion failed.
                list(self._cleared),
            )
        refused = 0
        for row in rows:
            try:
                await self._publish_device(row["device_id"])
            except ConfigRefused as exc:
                refused += 1
                log.warning("config of device %s: %s", row["device_id"], exc)
        if rows:
            log.info("config publisher: %d configurations, %d refused", len(rows), refused)
        return refused

    def _ready_pool(self) -> asyncpg.Pool:
        pool = self._pool()
        if pool is None:
            raise asyncpg.exceptions.CannotConnectNowError("no database pool yet")
        return pool

    async def _publish_device(self, device_id: str) -> None:
        """Publish the device's configuration as it is now, and record its version."""
        async with self._lock, self._ready_pool().acquire() as conn:
            row = await conn.fetchrow(
                """
                SELECT d.uuid, d.created_at, c.desired::text AS desired, c.version
                FROM device_config c JOIN devices d USING (device_id)
                WHERE c.device_id = $1 AND d.deleted_at IS NULL AND d.uuid IS NOT NULL
                """,
                device_id,
            )
            if row is None:
                return
            cleared = self._was_cleared(row["uuid"], row["created_at"])
            if cleared and not await self._deletion_failed(conn, device_id, row["uuid"]):
                return
            desired = msgspec.json.decode(row["desired"], type=DesiredConfig)
            await self._send(config_topic(row["uuid"]), payload(desired, row["version"]))
            await mark_published(conn, device_id, row["version"])

    async def _deletion_failed(self, conn: asyncpg.Connection, device_id: str, uuid: str) -> bool:
        """Whether the deletion that cleared the device's configuration failed (the broker
        refused the rest): the device is active and no deletion holds its row (``Devices.
        remove`` locks it until it commits or rolls back). Then it is ours again: the mark
        goes and its configuration is published, else it stayed suppressed until a restart."""
        active = await conn.fetchval(
            "SELECT true FROM devices WHERE device_id = $1 AND deleted_at IS NULL "
            "FOR KEY SHARE SKIP LOCKED",
            device_id,
        )
        if active:
            self._cleared.pop(uuid, None)
        return bool(active)

    def _was_cleared(self, uuid: str, created_at: datetime) -> bool:
        cleared = self._cleared.get(uuid)
        return cleared is not None and created_at <= cleared

    async def _send(self, topic: str, body: bytes) -> None:
        """One retained QoS 1 publish, acknowledged (with success) by the broker. Called with
        the lock held: the refusal seen is this publish's."""
        client = self._client
        if client is None:
            raise ConfigNotPublished("not connected to the broker")
        client.refusal = None
        try:
            await client.publish(topic, body, qos=1, retain=True, timeout=PUBLISH_TIMEOUT)
        except aiomqtt.MqttError as exc:
            self._wake.set()
            raise ConfigNotPublished(f"the broker did not take it: {exc}") from None
        if client.refusal is not None:
            raise ConfigRefused(f"the broker refused it: {client.refusal}")
