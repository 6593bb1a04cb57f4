"""The config publisher on its own, with a real Postgres and Mosquitto: an instance without
broker administration stores configurations and says why they are not delivered; a
configuration the broker refuses (the device's rights not in the fleet role yet) is not
marked published and is delivered once the rights are there; a cleared configuration is gone
from the broker and not published again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiomqtt
import asyncpg
import pytest

from libs.db.postgres import create_pool, load_migrations, migrate
from libs.mqtt.dynsec import DynSec
from libs.servers.mosquitto import EmbeddedMosquitto
from services.instance.config_publisher import NOT_ADMINISTERED, ConfigPublisher
from services.instance.device_config import (
    DesiredConfig,
    config_row,
    config_view,
    desired_config,
    set_desired,
)
from services.instance.fleet import broker_username, config_topic, device_acls, reader_acls
from services.instance.settings import InstanceSettings
from support import create_database, eventually

pytestmark = pytest.mark.slow


@pytest.fixture
async def database(postgres_server_url: str) -> AsyncIterator[tuple[str, asyncpg.Pool]]:
    url = await create_database(postgres_server_url)
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn, "instance", load_migrations("services.instance.migrations", "service"))
    finally:
        await conn.close()
    pool = await create_pool(url, "instance", max_size=3)
    try:
        yield url, pool
    finally:
        await pool.close()


def settings_for(url: str, broker: EmbeddedMosquitto | None) -> InstanceSettings:
    administered: dict[str, Any] = {}
    if broker is not None:
        administered = {
            "mqtt_host": broker.host,
            "mqtt_port": broker.port,
            "mqtt_username": f"inst_{secrets.token_hex(8)}",
            "mqtt_password": secrets.token_urlsafe(18),
            "mqtt_admin_username": broker.admin_username,
            "mqtt_admin_password": broker.admin_password,
        }
    return InstanceSettings(
        instance_customer_id=str(uuid.uuid4()),
        database_url=url,
        license_jwks_url="http://127.0.0.1:9/jwks",
        **administered,
    )


async def fleet_row(pool: asyncpg.Pool) -> tuple[str, str]:
    """A fleet device's row (id and uuid), as registration writes it."""
    device_id, device_uuid = secrets.token_hex(8), uuid.uuid4().hex
    async with pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO devices (device_id, name, mqtt_username, created_at, uuid) "
            "VALUES ($1, 'fleet', $2, $3, $4)",
            device_id,
            broker_username(device_uuid),
            datetime.now(UTC),
            device_uuid,
        )
    return device_id, device_uuid


@contextlib.asynccontextmanager
async def running(publisher: ConfigPublisher) -> AsyncIterator[None]:
    task = asyncio.create_task(publisher.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def device_client(broker: EmbeddedMosquitto, device_uuid: str) -> aiomqtt.Client:
    """The device's own broker client (made here as registration makes it)."""
    username, password = broker_username(device_uuid), secrets.token_urlsafe(18)
    async with DynSec(broker.host, broker.port, broker.admin_username, broker.admin_password) as ds:
        await ds.ensure_role(username, device_acls(device_uuid))
        await ds.ensure_client(username, password, [username], clientid=device_uuid)
    return aiomqtt.Client(
        broker.host, broker.port, username=username, password=password, identifier=device_uuid
    )


async def retained(client: aiomqtt.Client, device_uuid: str) -> dict[str, Any] | None:
    """The retained configuration a subscriber gets now, or None when there is none."""
    async with client:
        await client.subscribe(config_topic(device_uuid), qos=1)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1):
                async for message in client.messages:
                    if message.retain and message.payload:
                        return dict(json.loads(bytes(message.payload)))
    return None


async def test_without_broker_administration_it_is_stored_and_says_why_it_is_not_sent(
    database,
) -> None:
    url, pool = database
    publisher = ConfigPublisher(settings_for(url, None), lambda: pool)
    device_id, _ = await fleet_row(pool)
    async with pool.acquire() as conn:
        await set_desired(conn, device_id, desired_config({"reporting_interval": 60}))
    reason = await publisher.publish(device_id)
    assert reason == NOT_ADMINISTERED
    async with pool.acquire() as conn:
        view = config_view(await config_row(conn, device_id), publisher.unavailable_reason)
    assert view["desired"] == {"reporting_interval": 60} and view["version"] == 1
    assert view["published"] is False
    assert "MQTT_ADMIN" in view["unpublished_reason"]


async def test_a_refused_configuration_is_delivered_once_the_device_may_receive_it(
    database, broker
) -> None:
    url, pool = database
    settings = settings_for(url, broker)
    publisher = ConfigPublisher(settings, lambda: pool)
    device_id, device_uuid = await fleet_row(pool)
    async with pool.acquire() as conn:
        await set_desired(conn, device_id, DesiredConfig(heater_profile="eco"))
    async with running(publisher):
        reason = await publisher.publish(device_id)
        assert reason is not None and "refused" in reason, reason
        async with pool.acquire() as conn:
            assert (await config_row(conn, device_id))["published_version"] == 0
        # Registration adds the device's rights to the fleet role.
        async with DynSec(
            broker.host, broker.port, broker.admin_username, broker.admin_password
        ) as ds:
            await ds.add_role_acls(f"{settings.mqtt_username}-fleet", reader_acls(device_uuid))

        async def published() -> int:
            async with pool.acquire() as conn:
                return int((await config_row(conn, device_id))["published_version"])

        await eventually(published, lambda v: v == 1, timeout=30, what="published after all")
        device = await device_client(broker, device_uuid)
        assert await retained(device, device_uuid) == {"version": 1, "heater_profile": "eco"}

        async with pool.acquire() as removing, removing.transaction():
            # As a deletion does (Devices.remove): the row locked until it commits.
            await removing.execute(
                "SELECT 1 FROM devices WHERE device_id = $1 FOR UPDATE", device_id
            )
            await publisher.clear(device_uuid)
            assert await retained(device, device_uuid) is None
            # Not published again, even when asked: the device is being deleted...
            assert await publisher.publish(device_id) is None
            assert await retained(device, device_uuid) is None
            await removing.execute(
                "UPDATE devices SET deleted_at = now() WHERE device_id = $1", device_id
            )
        # ...and then was.
        assert await publisher.publish(device_id) is None
        assert await retained(device, device_uuid) is None
