"""Devices: each one gets broker credentials of its own, allowed to publish only to its topics.

A device publishes to ``<customer_id>/devices/<device_id>/readings`` and ``.../status`` and
nothing else: its broker role allows exactly those two topics for publishing and no
subscription at all. Its password is made here, shown once in the answer to its registration,
and kept only by the broker (hashed). Deleting a device deletes its broker client, which also
disconnects it at once.
"""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from libs.config import ConfigError
from libs.mqtt_dynsec import Acl, DynSec, DynSecError
from services.instance.settings import InstanceSettings

ONLINE_WITHIN = timedelta(minutes=2)


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


@dataclass(frozen=True)
class Registered:
    """A new device and its credentials (the password is never shown again)."""

    device_id: str
    name: str
    mqtt_username: str
    mqtt_password: str
    topics: dict[str, str]


class Devices:
    """Registering, listing and removing the customer's devices."""

    def __init__(self, settings: InstanceSettings) -> None:
        """Broker administration uses ``MQTT_ADMIN_*`` from the settings."""
        self._settings = settings

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
            await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended('devices', 0))")
            active = await conn.fetchval("SELECT count(*) FROM devices WHERE deleted_at IS NULL")
            if active >= max_devices:
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
            topics = {k: topic(customer, device_id, k) for k in ("readings", "status")}
            try:
                async with self._dynsec() as dynsec:
                    await dynsec.ensure_role(
                        username, [Acl("publishClientSend", t) for t in topics.values()]
                    )
                    await dynsec.ensure_client(username, password, [username], textname=name)
            except (DynSecError, OSError) as exc:
                raise BrokerUnavailable(f"the broker refused the device: {exc}") from None
        return Registered(device_id, name, username, password, topics)

    async def remove(self, conn: asyncpg.Connection, device_id: str) -> bool:
        """Revoke the device's credentials (disconnecting it) and mark it deleted."""
        row = await conn.fetchrow(
            "SELECT mqtt_username FROM devices WHERE device_id = $1 AND deleted_at IS NULL",
            device_id,
        )
        if row is None:
            return False
        try:
            async with self._dynsec() as dynsec:
                await dynsec.delete_client(row["mqtt_username"])
                await dynsec.delete_role(row["mqtt_username"])
        except (DynSecError, OSError) as exc:
            raise BrokerUnavailable(f"the broker did not revoke the device: {exc}") from None
        await conn.execute(
            "UPDATE devices SET deleted_at = $2, status = 'deleted' WHERE device_id = $1",
            device_id,
            datetime.now(UTC),
        )
        return True


def device_view(
    row: asyncpg.Record, latest: dict[str, Any] | None, now: datetime
) -> dict[str, Any]:
    """A device as the API shows it: online state from its status and when it was last seen."""
    seen = row["last_seen"]
    online = row["status"] != "offline" and seen is not None and now - seen < ONLINE_WITHIN
    return {
        "device_id": row["device_id"],
        "name": row["name"],
        "mqtt_username": row["mqtt_username"],
        "created_at": row["created_at"],
        "last_seen": seen,
        "online": online,
        "latest": latest,
    }
