"""Remote configuration when a deletion fails half-way, and when the publisher stops.

A fleet device's deletion clears its retained configuration first, then revokes its rights
and client on the broker. When the broker fails after the clearing (here the relay cuts the
administration's connection at its first ``removeRoleACL``), the deletion is refused and the
device stays, working: its configuration must be delivered again, not suppressed as a deleted
device's until the instance restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import pytest
from fleet_fault_steps import KEY, running_instance
from fleet_steps import fleet_mqtt_client, register_fleet_device
from tcp_relay import TcpRelay

from libs.http.errors import NotFound
from libs.servers.mosquitto import EmbeddedMosquitto
from services.instance import fleet
from services.instance.device_config import DesiredConfig, set_desired
from services.instance.devices import BrokerUnavailable
from support import eventually

pytestmark = pytest.mark.slow


async def retained_config(broker: EmbeddedMosquitto, device: dict[str, Any]) -> Any:
    """The retained configuration the device gets when it subscribes, or None."""
    async with fleet_mqtt_client(broker, device) as mqtt:
        await mqtt.subscribe(fleet.config_topic(device["uuid"]), qos=1)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1):
                async for message in mqtt.messages:
                    if message.retain and message.payload:
                        return json.loads(bytes(message.payload))
    return None


async def test_a_deletion_that_fails_after_clearing_the_config_leaves_it_deliverable(
    postgres_server_url: str, broker: EmbeddedMosquitto
) -> None:
    relay = TcpRelay(broker.url)
    async with relay, running_instance(postgres_server_url, broker, mqtt_port=relay.port) as inst:
        device = await register_fleet_device(inst.url, KEY)
        publisher = inst.state.config_publisher

        async def configure(interval: int) -> str | None:
            async with inst.state.pool().acquire() as conn:
                await set_desired(conn, device["id"], DesiredConfig(reporting_interval=interval))
            return await publisher.publish(device["id"])

        assert await configure(30) is None
        relay.cut_client_at(b"removeRoleACL")
        with pytest.raises(BrokerUnavailable):
            async with inst.state.pool().acquire() as conn:
                await inst.state.devices.remove(conn, device["id"])
        assert relay.cut.is_set()
        assert await inst.db.fetchval(
            "SELECT deleted_at IS NULL FROM devices WHERE device_id = $1", device["id"]
        )

        # The device is still ours and working: a new configuration reaches it.
        await eventually(
            lambda: configure(45),
            lambda reason: reason is None,
            what="a configuration taken once the publisher is connected again",
        )
        await eventually(
            lambda: retained_config(broker, device),
            lambda config: config is not None and config["reporting_interval"] == 45,
            what="the configuration retained for the device whose deletion failed",
        )
        assert await inst.db.fetchval(
            "SELECT published_version = version FROM device_config WHERE device_id = $1",
            device["id"],
        )


async def test_a_device_deleted_just_after_another_registered_is_deleted(
    postgres_server_url: str, broker: EmbeddedMosquitto
) -> None:
    """The config publisher connects after the instance is ready (and again after the broker
    went away); a deletion just then, which clears the device's retained configuration
    through the publisher, waits for it to be connected, as a publish does, rather than fail
    with "not connected to the broker" (registrations meanwhile change the fleet role)."""
    async with running_instance(postgres_server_url, broker) as inst:
        previous = await register_fleet_device(inst.url, KEY)
        for _ in range(5):
            registered = await register_fleet_device(inst.url, KEY)
            async with inst.state.pool().acquire() as conn:
                assert await inst.state.devices.remove(conn, previous["id"])
            previous = registered
        assert await inst.db.fetchval("SELECT count(*) FROM devices WHERE deleted_at IS NULL") == 1


async def test_a_device_deleted_while_its_configuration_is_published_leaves_none_retained(
    postgres_server_url: str, broker: EmbeddedMosquitto
) -> None:
    """A PUT's publish and the device's deletion at the same moment, in both orders: whoever
    registers the uuid next is handed no configuration of the deleted device."""
    async with running_instance(postgres_server_url, broker) as inst:
        publisher = inst.state.config_publisher
        devices = [await register_fleet_device(inst.url, KEY) for _ in range(4)]

        async def configure(device: dict[str, Any]) -> str | None:
            try:
                async with inst.state.pool().acquire() as conn:
                    await set_desired(conn, device["id"], DesiredConfig(heater_profile="secret"))
            except NotFound:
                return "deleted first: the PUT is answered 404"
            return await publisher.publish(device["id"])

        async def delete(device: dict[str, Any]) -> bool:
            async with inst.state.pool().acquire() as conn:
                return await inst.state.devices.remove(conn, device["id"])

        for n, device in enumerate(devices):
            steps = [configure(device), delete(device)]
            await asyncio.gather(*(steps if n % 2 else reversed(steps)))
        for device in devices:
            again = await register_fleet_device(inst.url, KEY, uuid=device["uuid"])
            assert await retained_config(broker, again) is None
