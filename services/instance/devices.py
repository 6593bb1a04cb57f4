"""Devices: each one gets broker credentials of its own, allowed to publish only to its topics.

A device publishes to ``<customer_id>/devices/<device_id>/readings`` and ``.../status`` and
nothing else: its broker role allows exactly those two topics for publishing and denies
subscribing and receiving everywhere. Its broker client is bound to the client id
``<device_id>``, so its credentials work under no other id (and, as every client is bound to
its own, no other client can use its id). Its password is made here, shown once in the answer
to its registration, and kept only by the broker (hashed). Deleting a device deletes its broker
client, which also disconnects it at once. Devices registered before the binding are brought to
this shape when the instance starts.
"""

from __future__ import annotations

import logging
import secrets
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from libs.config import ConfigError
from libs.db.postgres import CONNECTION_ERRORS
from libs.http.errors import NotFound
from libs.mqtt.dynsec import DynSec, DynSecError, device_acls
from libs.runtime.supervision import retrying
from services.instance import fleet
from services.instance.settings import InstanceSettings

log = logging.getLogger(__name__)

ONLINE_WITHIN = timedelta(minutes=2)
# Taken by every registration (by hand or a fleet device's), removal and convergence, in their
# transactions: the license's maxDevices and the fleet role's rights are decided one at a time.
DEVICES_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended('devices', 0))"


class DeviceLimitReached(Exception):
    """The license allows no more devices."""


class BrokerUnavailable(Exception):
    """The broker did not take the device's credentials."""


MQTT_SCHEMES = {"mqtt": 1883, "mqtts": 8883, "ws": 80, "wss": 443}


def broker_urls(settings: InstanceSettings) -> list[str]:
    """Where devices connect (``MQTT_PUBLIC_URLS``, else the broker the instance uses); a
    ``ConfigError`` names a URL that is not one."""
    urls = [u.strip() for u in settings.mqtt_public_urls.split(",") if u.strip()]
    if not urls:
        return [f"mqtt://{settings.mqtt_host}:{settings.mqtt_port}"]
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in MQTT_SCHEMES or not parts.hostname:
            raise ConfigError(
                f"MQTT_PUBLIC_URLS: {url!r} is not an mqtt://, mqtts://, ws:// or wss:// URL"
            )
    return urls


def broker_address(url: str) -> tuple[str, int]:
    """The host and port of one of ``broker_urls``."""
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or MQTT_SCHEMES[parts.scheme]


def topic(customer_id: str, device_id: str, kind: str) -> str:
    """``<customer_id>/devices/<device_id>/<kind>``."""
    return f"{customer_id}/devices/{device_id}/{kind}"


def device_topics(customer_id: str, device_id: str) -> dict[str, str]:
    """The two topics a device publishes to, by kind: ``readings`` and ``status``."""
    return {kind: topic(customer_id, device_id, kind) for kind in ("readings", "status")}


@dataclass(frozen=True)
class Registered:
    """A new device and its credentials (the password is never shown again)."""

    device_id: str
    name: str
    mqtt_username: str
    mqtt_password: str
    topics: dict[str, str]

    @property
    def mqtt_client_id(self) -> str:
        """The only client id its credentials connect with: the device id."""
        return self.device_id


class Devices:
    """Registering, listing and removing the customer's devices."""

    def __init__(
        self,
        settings: InstanceSettings,
        clear_config: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        """Broker administration uses ``MQTT_ADMIN_*`` from the settings. ``clear_config``
        empties a fleet device's retained desired configuration (the config publisher's
        ``clear``, the only client that may publish it), before the device is removed."""
        self._settings = settings
        self._clear_config = clear_config

    @property
    def settings(self) -> InstanceSettings:
        """The instance's settings."""
        return self._settings

    def broker_admin(self) -> DynSec:
        """A connection to the broker as its admin (``async with``); ``BrokerUnavailable``
        when none is configured."""
        return self._dynsec()

    def _dynsec(self) -> DynSec:
        s = self._settings
        if not s.mqtt_admin_username or not s.mqtt_admin_password:
            raise BrokerUnavailable("no broker administration is configured for this instance")
        return DynSec(s.mqtt_host, s.mqtt_port, s.mqtt_admin_username, s.mqtt_admin_password)

    async def register(self, conn: asyncpg.Connection, name: str, max_devices: int) -> Registered:
        """A new device, unless the license's ``maxDevices`` are all taken."""
        customer = self._settings.instance_customer_id
        device_id = uuid.uuid4().hex[:16]
        username = f"dev-{device_id}"
        password = secrets.token_urlsafe(24)
        async with conn.transaction():
            # Serialise registrations so two at once cannot both take the last slot.
            await conn.execute(DEVICES_LOCK)
            if await count_active_devices(conn) >= max_devices:
                raise DeviceLimitReached(
                    f"the license allows {max_devices} devices and all are registered"
                )
            await conn.execute(
                "INSERT INTO devices (device_id, name, mqtt_username, created_at) "
                "VALUES ($1, $2, $3, $4)",
                device_id,
                name,
                username,
                datetime.now(UTC),
            )
            topics = device_topics(customer, device_id)
            try:
                async with self._dynsec() as dynsec:
                    await dynsec.ensure_role(username, device_acls(list(topics.values())))
                    await dynsec.ensure_client(
                        username, password, [username], textname=name, clientid=device_id
                    )
            except (DynSecError, OSError) as exc:
                raise BrokerUnavailable(f"the broker refused the device: {exc}") from None
        return Registered(device_id, name, username, password, topics)

    async def converge(self, conn: asyncpg.Connection) -> int:
        """Bring every registered device's broker client and role to today's shape (bound to
        its device id, or a fleet device's to its uuid; publishing only its own topics), keeping
        its password, and the fleet role to exactly the fleet devices' rights; idempotent.
        Returns how many devices it went over."""
        try:
            # Connected before the lock: a broker that does not answer holds up no
            # registration or removal while this waits for it (and retries).
            async with self._dynsec() as dynsec, conn.transaction():
                # No registration or removal meanwhile: the fleet role is written from this
                # list.
                await conn.execute(DEVICES_LOCK)
                rows = await conn.fetch(
                    "SELECT device_id, mqtt_username, uuid FROM devices WHERE deleted_at IS NULL"
                )
                held = [row["uuid"] for row in rows if await self._converge_device(dynsec, row)]
                if self._settings.mqtt_username:
                    await dynsec.ensure_role(
                        fleet.fleet_role(self._settings.mqtt_username),
                        fleet.fleet_role_acls([uuid for uuid in held if uuid]),
                    )
                await self._remove_orphans(dynsec, {r["mqtt_username"] for r in rows})
        except (DynSecError, OSError) as exc:
            raise BrokerUnavailable(f"the broker did not take the devices' shape: {exc}") from None
        return len(rows)

    async def _remove_orphans(self, dynsec: DynSec, registered: set[str]) -> None:
        """Delete the broker clients of this customer that no registered device has: a
        registration that reached the broker and not the commit (the instance killed, the
        database gone), whose device never came back to be adopted. Left, it would keep its
        uuid from any other account on a shared broker. (Under the devices' lock: no
        registration is between the broker and its commit now.)"""
        owner = fleet.owner_text(self._settings.instance_customer_id)
        for username in set(await dynsec.clients_named(owner)) - registered:
            uuid = username.removeprefix("iot-")
            if username == fleet.broker_username(uuid) and fleet.valid_uuid(uuid):
                await dynsec.clear_retained(username, uuid, fleet.device_root(uuid))
            log.warning("removing broker client %s: no device of ours has it", username)
            await dynsec.delete_client(username)
            await dynsec.delete_role(username)

    async def _converge_device(self, dynsec: DynSec, row: asyncpg.Record) -> bool:
        """Converge one device's client and role; whether its client is there (and, for a
        fleet device, ours: only then may the fleet role receive its uuid's topics, which on a
        shared broker another customer may hold once our client is gone)."""
        username, device_id, uuid = row["mqtt_username"], row["device_id"], row["uuid"]
        if uuid:
            client = await dynsec.get_client(username)
            owner = fleet.owner_text(self._settings.instance_customer_id)
            if client is None or client.get("textname") != owner:
                log.warning("fleet device %s has no broker client of ours", device_id)
                return False
            await dynsec.ensure_role(username, fleet.device_acls(uuid))
            bound = uuid
        else:
            topics = list(device_topics(self._settings.instance_customer_id, device_id).values())
            await dynsec.ensure_role(username, device_acls(topics))
            bound = device_id
        if not await dynsec.bind_client(username, bound, [username]):
            log.warning("device %s has no broker client", device_id)
            return False
        return True

    async def converge_at_start(self, pool: Callable[[], asyncpg.Pool | None]) -> None:
        """``converge`` once the database answers, retried with backoff until it succeeds
        (the broker or the database may come later than the instance)."""
        s = self._settings
        if not s.mqtt_admin_username or not s.mqtt_admin_password:
            return  # devices' credentials are not made here
        async for attempt in retrying(
            (BrokerUnavailable, *CONNECTION_ERRORS, asyncpg.PostgresError), wait_max=30.0
        ):
            with attempt:
                found = pool()
                if found is None:
                    raise asyncpg.exceptions.CannotConnectNowError("no database pool yet")
                try:
                    async with found.acquire() as conn:
                        count = await self.converge(conn)
                except (BrokerUnavailable, *CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
                    log.warning("devices' broker clients not converged yet: %s", exc)
                    raise
        log.info("broker clients of %d devices converged", count)

    async def remove(
        self, conn: asyncpg.Connection, device_id: str, *, pending_only: bool = False
    ) -> bool:
        """Revoke the device's credentials (disconnecting it) and mark it deleted; a fleet
        device's rights are also taken from the fleet role, so its uuid, once free on the
        broker, gives this instance nothing of whoever registers it next. ``pending_only``:
        only while its key exchange has not come (housekeeping's abandoned registrations; the
        row is locked, so a key exchange either came before, and it stays, or finds it gone)."""
        async with conn.transaction():
            await conn.execute(DEVICES_LOCK)
            # The row stays locked until the deletion commits or fails: the config publisher
            # tells a deletion going on (its clearing holds) from one that failed by it.
            row = await conn.fetchrow(
                "SELECT mqtt_username, uuid FROM devices "
                "WHERE device_id = $1 AND deleted_at IS NULL "
                "AND NOT ($2 AND key_exchanged_at IS NOT NULL) FOR UPDATE",
                device_id,
                pending_only,
            )
            if row is None:
                return False
            try:
                async with self._dynsec() as dynsec:
                    ours = await self._holds(dynsec, row["mqtt_username"], row["uuid"])
                    if row["uuid"] and ours and self._clear_config is not None:
                        # While the uuid's rights are still ours: whoever registers it next
                        # must not be handed this customer's configuration.
                        await self._clear_config(row["uuid"])
                    await self._revoke(dynsec, row["mqtt_username"], row["uuid"], ours)
            except (DynSecError, OSError) as exc:
                raise BrokerUnavailable(f"the broker did not revoke the device: {exc}") from None
            await conn.execute(
                "UPDATE devices SET deleted_at = $2, status = 'deleted' WHERE device_id = $1",
                device_id,
                datetime.now(UTC),
            )
        return True

    async def _holds(self, dynsec: DynSec, username: str, uuid: str | None) -> bool:
        """Whether the device's broker client is this customer's to remove. A fleet device's
        may be gone, or another customer's: an earlier removal that reached the broker and not
        the commit (it had cleared the retained configuration and freed the uuid), after which
        another customer's device of the uuid may have registered. Theirs is never touched."""
        if not uuid:
            return True
        client = await dynsec.get_client(username)
        owner = fleet.owner_text(self._settings.instance_customer_id)
        return client is not None and client.get("textname") == owner

    async def _revoke(self, dynsec: DynSec, username: str, uuid: str | None, ours: bool) -> None:
        if uuid and self._settings.mqtt_username:
            # The fleet role's rights go first: once the client is gone the uuid is free on a
            # shared broker, and another customer's device of that uuid must reach nothing of
            # ours even if what follows fails. (The retained desired configuration on
            # iot/device/<uuid>/config was cleared before, by ``clear_config``.)
            await dynsec.remove_role_acls(
                fleet.fleet_role(self._settings.mqtt_username), fleet.reader_acls(uuid)
            )
        if uuid and ours:
            # Its retained messages (with our fleet role's rights gone, ingest takes none of
            # the emptying): not for whoever holds the uuid next.
            await dynsec.clear_retained(username, uuid, fleet.device_root(uuid))
        if ours:  # a fleet device's client and role, by name, are whoever holds the uuid
            await dynsec.delete_client(username)
            await dynsec.delete_role(username)


def device_view(
    row: asyncpg.Record, latest: dict[str, Any] | None, now: datetime
) -> dict[str, Any]:
    """A device as the API shows it: online state from its status and when it was last seen,
    and the firmware it last reported (None until it reports one)."""
    seen = row["last_seen"]
    online = row["status"] != "offline" and seen is not None and now - seen < ONLINE_WITHIN
    return {
        "device_id": row["device_id"],
        "name": row["name"],
        "mqtt_username": row["mqtt_username"],
        "created_at": row["created_at"],
        "last_seen": seen,
        "online": online,
        "firmware": row["firmware"],
        "firmware_reported_at": row["firmware_reported_at"],
        "uuid": row["uuid"],
        "device_type": row["device_type"],
        "provisioning": provisioning_state(row),
        "provisioning_key_id": row["provisioning_key_id"],
        "latest": latest,
    }


def provisioning_state(row: asyncpg.Record) -> str:
    """``manual`` (registered by hand), ``pending`` (registered itself, key exchange not done)
    or ``provisioned``."""
    if row["uuid"] is None:
        return "manual"
    return "provisioned" if row["key_exchanged_at"] is not None else "pending"


async def rename_device(conn: asyncpg.Connection, device_id: str, name: str) -> bool:
    """Give a registered device a new name; False when there is no such device. Its
    credentials, topics and readings stay as they are (they go by its id)."""
    done = await conn.execute(
        "UPDATE devices SET name = $2 WHERE device_id = $1 AND deleted_at IS NULL",
        device_id,
        name,
    )
    return not done.endswith(" 0")


async def active_devices(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    """The registered devices (not deleted), oldest first."""
    return list(
        await conn.fetch("SELECT * FROM devices WHERE deleted_at IS NULL ORDER BY created_at")
    )


async def active_device_ids(conn: asyncpg.Connection) -> set[str]:
    """The devices that may publish (registered, not deleted)."""
    rows = await conn.fetch("SELECT device_id FROM devices WHERE deleted_at IS NULL")
    return {r["device_id"] for r in rows}


async def count_active_devices(conn: asyncpg.Connection) -> int:
    """How many devices are registered (not deleted)."""
    return int(await conn.fetchval("SELECT count(*) FROM devices WHERE deleted_at IS NULL"))


async def known_device(
    conn: asyncpg.Connection, device_id: str, *, include_deleted: bool = False
) -> asyncpg.Record:
    """The device's row; ``NotFound`` when there is none (or it is deleted, unless
    ``include_deleted``: its readings stay until retention)."""
    row = await conn.fetchrow("SELECT * FROM devices WHERE device_id = $1", device_id)
    if row is None or (row["deleted_at"] is not None and not include_deleted):
        raise NotFound(f"no device {device_id}")
    return row
